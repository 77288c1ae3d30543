//! The overlayfs unionmount test suite (`../shared/conformance/
//! unionmount-testsuite` beside the repository; GPL, a separate tool that
//! is run, not copied into the project) against kernel overlayfs and
//! against kiln's FUSE view on the same machine: every test that passes on
//! kernel overlayfs must pass on the FUSE view.
//!
//! The FUSE view is mounted by the suite through `mount -t fuse.kiln`,
//! served by the `mount_fuse_kiln` example (built by `cargo build
//! --examples`, as scripts/test.sh does), installed as
//! /sbin/mount.fuse.kiln. The suite runs as root, in a private mount
//! namespace, with its default directories (/base, /lower, /upper).

use std::path::{Path, PathBuf};
use std::process::Command;

fn suite() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/conformance/unionmount-testsuite"
    ))
}

/// The helper binary, next to this test's target directory.
fn helper() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/examples/mount_fuse_kiln
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples/mount_fuse_kiln"))
        .expect("target dir")
}

/// Run the suite (`./run --ov [EXTRA] --samefs`) from a scratch copy;
/// returns whether it passed, how many tests it ran, and its output.
fn run_suite(copy: &Path, extra: &[&str]) -> (bool, usize, String) {
    let mut args = vec!["--ov"];
    args.extend_from_slice(extra);
    args.push("--samefs");
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mkdir -p /base /lower /upper && exec ./run \"$@\"")
        .arg("sh")
        .args(&args)
        .current_dir(copy)
        .output()
        .expect("run the unionmount suite");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let tests = text.lines().filter(|l| l.starts_with("TEST ")).count();
    (o.status.success(), tests, text)
}

#[test]
fn fuse_view_passes_the_unionmount_suite_as_kernel_overlayfs_does() {
    if !kiln_vm_tests::root_for("the unionmount suite (it mounts overlayfs and FUSE as root)") {
        return;
    }
    let src = suite();
    if !src.join("run").exists() {
        kiln_vm_tests::missing_prerequisite(&format!(
            "the unionmount test suite is not at {}",
            src.display()
        ));
        return;
    }
    let helper = helper();
    assert!(
        helper.exists(),
        "{} is missing: build it with `cargo build --examples` (scripts/test.sh does)",
        helper.display()
    );
    // mount(8) runs /sbin/mount.fuse.kiln for `-t fuse.kiln`
    let sbin = Path::new("/sbin/mount.fuse.kiln");
    let _ = std::fs::remove_file(sbin);
    std::os::unix::fs::symlink(&helper, sbin).expect("install /sbin/mount.fuse.kiln");
    let copy = kiln_vm_tests::test_dir("unionmount");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(cp.success(), "copy the suite to {}", copy.display());

    let (ok, kernel_tests, out) = run_suite(&copy, &[]);
    assert!(ok, "the suite fails on kernel overlayfs here:\n{out}");
    let (ok, fuse_tests, out) = run_suite(&copy, &["--fuse=kiln"]);
    let _ = std::fs::remove_file(sbin);
    // a helper whose mount namespace outlived the suite (it keeps that
    // namespace alive itself) would serve forever: end them
    let _ = Command::new("pkill")
        .args(["-f", "^/sbin/mount.fuse.kiln kiln /base/"])
        .status();
    let tail: Vec<&str> = out.lines().rev().take(30).collect();
    assert!(
        ok,
        "the FUSE view fails a test kernel overlayfs passes:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(
        kernel_tests > 300,
        "kernel overlayfs ran only {kernel_tests} tests"
    );
    assert_eq!(
        fuse_tests, kernel_tests,
        "the FUSE view ran another number of tests"
    );
}
