//! End-to-end test of `kiln build --progress tty`, run under `script` so
//! that kiln's stderr is a pseudo-terminal, as the unprivileged test user.

use std::path::Path;

use kiln_vm_tests::{
    busybox_rootfs, give_to_test_user, kiln_binary, running_as_root, stage_file, test_dir,
    unprivileged,
};

/// Single-quotes `s` for `sh -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn tty_progress_shows_vertices_and_done_lines_on_a_terminal() {
    let dir = test_dir("progress-tty");
    busybox_rootfs(&dir.join("ctx/rootfs"));
    std::fs::write(
        dir.join("ctx/Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nRUN echo tty-step-output && sleep 1\n",
    )
    .unwrap();
    give_to_test_user(&dir);
    let kiln = if running_as_root() {
        stage_file(&kiln_binary())
    } else {
        kiln_binary()
    };
    let command = [
        kiln.display().to_string(),
        "--root".into(),
        dir.join("state").display().to_string(),
        "build".into(),
        "--progress".into(),
        "tty".into(),
        dir.join("ctx").display().to_string(),
    ]
    .iter()
    .map(|a| sh_quote(a))
    .collect::<Vec<_>>()
    .join(" ");
    let out = unprivileged(Path::new("/usr/bin/script"))
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("run script");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kiln build --progress tty failed: {:?}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = text.replace("\r\n", "\n");
    assert!(text.contains("COPY rootfs/ /"), "{text}");
    assert!(text.contains("RUN echo tty-step-output"), "{text}");
    assert!(
        text.contains("#1 tty-step-output") || text.contains("tty-step-output\n"),
        "{text}"
    );
    assert!(text.contains(" DONE "), "{text}");
    assert!(
        text.contains("[+] Building"),
        "the live frame was drawn: {text}"
    );
    assert!(
        text.contains("\x1b["),
        "the live frame is redrawn in place: {text}"
    );
}
