//! A program that only serves kiln's FUSE views: what the snapshotter's
//! own tests start as the view server (`fuse::set_server_program`), since a
//! test harness cannot serve itself. kiln serves its views from its own
//! executable.

fn main() {
    kiln_snapshotter::backend::fuse::serve_if_asked();
    eprintln!(
        "kiln-fuse-server: started by kiln's fuse backend only (first argument {})",
        kiln_snapshotter::backend::fuse::SERVER_ARG
    );
    std::process::exit(2);
}
