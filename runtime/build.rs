//! Build-time work for the runtime, so that nothing a user's step depends on
//! can fail to compile at run time:
//! - the seccomp profile in `seccomp-profiles/` is validated with
//!   seccompiler and compiled to one compact BPF program (`src/bpf.rs`); a
//!   profile that does not compile fails the build;
//! - `init/init.c`, the sandbox's PID 1, is compiled into a tiny static
//!   binary (no libc) that the runtime embeds and executes from a sealed
//!   memfd.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    compile_seccomp(&manifest, &out);
    compile_init(&manifest, &out);
}

fn compile_seccomp(manifest: &std::path::Path, out: &std::path::Path) {
    let profile = manifest.join("../seccomp-profiles/default.json");
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
    // seccompiler validated the profile (names, argument syntax); kiln
    // compiles it itself into one compact program (src/bpf.rs, whose tests
    // check that it answers every syscall as seccompiler's filters do).
    let _ = map;
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(&profile).expect("read profile"))
            .expect("profile is JSON");
    let prog = bpf::compile(&json, target, &arch);
    let mut bytes = Vec::with_capacity(prog.len() * 8);
    for ins in &prog {
        bytes.extend_from_slice(&ins.0.to_ne_bytes());
        bytes.push(ins.1);
        bytes.push(ins.2);
        bytes.extend_from_slice(&ins.3.to_ne_bytes());
    }
    fs::write(out.join("seccomp-default.bpf"), bytes).expect("write bpf");
}

/// kiln's own BPF compiler, shared with the library's tests (which compare
/// it with seccompiler).
#[path = "src/bpf.rs"]
mod bpf;

fn compile_init(manifest: &std::path::Path, out: &std::path::Path) {
    let src = manifest.join("init/init.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let bin = out.join("kiln-init");
    let status = Command::new(&cc)
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fno-pie",
            "-no-pie",
            "-Os",
            "-s",
            "-Wl,--build-id=none",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C compiler {cc:?} for {}: {e}",
                src.display()
            )
        });
    assert!(
        status.success(),
        "compiling {} failed (a static libc, libc6-dev, is needed)",
        src.display()
    );
}
