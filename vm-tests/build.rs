//! Builds the static test programs that run inside sandboxes: `kiln-probe`
//! (one syscall per line, in the spirit of bubblewrap's try-syscall).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("probe/probe.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let bin = out.join("kiln-probe");
    let status = Command::new(env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-static", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("run the C compiler");
    assert!(
        status.success(),
        "compiling {} failed (a static libc, libc6-dev, is needed)",
        src.display()
    );
    println!("cargo:rustc-env=KILN_PROBE={}", bin.display());
}
