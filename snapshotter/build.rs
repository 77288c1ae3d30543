//! Build-time work for the snapshotter: the FUSE server's seccomp allowlist
//! (`seccomp-profiles/fuse-server.json`) is validated and compiled to BPF
//! with seccompiler, so a profile that does not
//! compile fails the build and the server only installs bytes.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let profile = manifest.join("../seccomp-profiles/fuse-server.json");
    println!("cargo:rerun-if-changed={}", profile.display());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    let target: seccompiler::TargetArch = arch
        .as_str()
        .try_into()
        .unwrap_or_else(|_| panic!("seccomp profiles cannot be compiled for {arch}"));
    let file = fs::File::open(&profile).unwrap_or_else(|e| panic!("{}: {e}", profile.display()));
    let map = seccompiler::compile_from_json(file, target).unwrap_or_else(|e| {
        panic!(
            "seccomp profile {} does not compile: {e}",
            profile.display()
        )
    });
    // The server installs one filter, `main`, the allowlist.
    let names: Vec<&String> = map.keys().collect();
    assert_eq!(
        names,
        ["main"],
        "{}: the profile must have one filter, `main`",
        profile.display()
    );
    // as Rust source: the program is a constant the server hands the
    // kernel as it is
    let mut src = String::from("[\n");
    for ins in &map["main"] {
        src.push_str(&format!(
            "    libc::sock_filter {{ code: {}, jt: {}, jf: {}, k: {} }},\n",
            ins.code, ins.jt, ins.jf, ins.k
        ));
    }
    src.push_str("]\n");
    fs::write(out.join("fuse-server-seccomp.rs"), src).expect("write the seccomp program");
}
