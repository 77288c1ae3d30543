//! Multi-platform builds end to end, as the unprivileged test user: an
//! amd64 and an arm64 busybox combined into one multi-platform base, a
//! build for both platforms whose arm64 steps run under qemu-user in the
//! step's own binfmt_misc, and the host's binfmt_misc left untouched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_vm_tests::{
    busybox_rootfs, give_to_test_user, kiln, run_checked, running_as_root, test_dir,
};

const FIXTURES: &str = "/var/tmp/kiln-fixtures";

fn ok(o: Output) -> (String, String) {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "kiln failed: {}\n{out}\n{err}",
        o.status
    );
    (out, err)
}

/// Debian's busybox-static:arm64 .deb: from the fixtures directory, or
/// fetched when running as root. `None` (the test skips loudly) otherwise.
fn arm64_deb() -> Option<PathBuf> {
    let find = || {
        fs::read_dir(FIXTURES)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                n.starts_with("busybox-static_") && n.ends_with("_arm64.deb")
            })
    };
    if let Some(p) = find() {
        return Some(p);
    }
    if !running_as_root() {
        return None;
    }
    run_checked(Command::new("sh").args([
        "-c",
        "dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64 && apt-get update -q; }; \
         mkdir -p /var/tmp/kiln-fixtures && cd /var/tmp/kiln-fixtures && apt-get download -q busybox-static:arm64 && chmod -R a+rX .",
    ]));
    find()
}

fn arm64_rootfs(deb: &Path, dir: &Path) {
    let x = dir.with_extension("deb-x");
    fs::create_dir_all(&x).unwrap();
    run_checked(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x));
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let bb = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| x.join(p))
        .find(|p| p.exists())
        .expect("busybox in the .deb");
    fs::copy(bb, dir.join("bin/busybox")).unwrap();
    for l in ["sh", "uname", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(l)).unwrap();
    }
}

fn binfmt_listing() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/proc/sys/fs/binfmt_misc")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn two_platforms_one_index_emulated_arm64_and_a_shared_native_stage() {
    let Some(deb) = arm64_deb() else {
        kiln_vm_tests::missing_prerequisite(&format!(
            "no busybox-static arm64 .deb in {FIXTURES}; run scripts/setup-host.sh as root"
        ));
        return;
    };
    let dir = test_dir("platform");
    let (amd, arm) = (dir.join("amd"), dir.join("arm"));
    busybox_rootfs(&amd);
    arm64_rootfs(&deb, &arm);
    let base = dir.join("base");
    let ctx = dir.join("ctx");
    fs::create_dir_all(&base).unwrap();
    fs::create_dir_all(&ctx).unwrap();
    fs::write(base.join("Dockerfile"), "FROM base-$TARGETARCH\n").unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM --platform=$BUILDPLATFORM multibase AS native\nRUN uname -m > /native\n\
         FROM multibase\nARG TARGETARCH\nRUN uname -m > /arch\nRUN echo $TARGETARCH > /targetarch\n\
         COPY --from=native /native /native\n",
    )
    .unwrap();
    give_to_test_user(&dir);
    let state = dir.join("state");
    let k = |args: &[&str]| {
        let mut c = kiln(["--root".as_ref(), state.as_os_str()]);
        c.args(args);
        c
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(k(&[
        "import",
        "--platform",
        "linux/amd64",
        &s(&amd),
        "-t",
        "base-amd64",
    ])
    .output()
    .unwrap());
    ok(k(&[
        "import",
        "--platform",
        "linux/arm64",
        &s(&arm),
        "-t",
        "base-arm64",
    ])
    .output()
    .unwrap());
    // the multi-platform base: an index made by a build for both platforms
    ok(k(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "multibase",
        &s(&base),
    ])
    .output()
    .unwrap());

    let before = binfmt_listing();
    let archive = dir.join("out.tar");
    let (_, err) = ok(k(&[
        "build",
        "--progress",
        "plain",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        &format!("type=oci,dest={}", s(&archive)),
        "-o",
        &format!("type=local,dest={}", s(&dir.join("local"))),
        "--cache-to",
        &format!("type=local,dest={},mode=max", s(&dir.join("cache"))),
        &s(&ctx),
    ])
    .output()
    .unwrap());
    assert_eq!(before, binfmt_listing(), "the host's binfmt_misc changed");
    assert!(err.contains("[linux/arm64, emulated]"), "{err}");
    // the $BUILDPLATFORM stage's RUN ran once: its other appearance is cached
    let native_runs = err
        .lines()
        .filter(|l| l.ends_with("RUN uname -m > /native"))
        .count();
    assert_eq!(native_runs, 2, "{err}");
    assert_eq!(err.matches("] built ").count(), 2, "{err}");

    let raw = run_checked(Command::new("skopeo").args([
        "inspect",
        "--raw",
        &format!("oci-archive:{}", s(&archive)),
    ]));
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let mut archs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    archs.sort();
    assert_eq!(archs, ["amd64", "arm64"]);

    let read = |p: &str| {
        fs::read_to_string(dir.join("local").join(p))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read("linux_amd64/arch"), "x86_64");
    assert_eq!(read("linux_arm64/arch"), "aarch64");
    assert_eq!(read("linux_amd64/targetarch"), "amd64");
    assert_eq!(read("linux_arm64/targetarch"), "arm64");
    assert_eq!(read("linux_amd64/native"), "x86_64");
    assert_eq!(read("linux_arm64/native"), "x86_64");

    // one cache holds both platforms' steps: with the local cache pruned,
    // importing it runs nothing for either platform
    ok(k(&["prune", "--all"]).output().unwrap());
    let (_, err) = ok(k(&[
        "build",
        "--progress",
        "plain",
        "--platform",
        "linux/amd64,linux/arm64",
        "--cache-from",
        &format!("type=local,src={}", s(&dir.join("cache"))),
        &s(&ctx),
    ])
    .output()
    .unwrap());
    assert_eq!(err.matches(": 0 steps run").count(), 2, "{err}");

    // type=docker cannot hold two platforms
    let o = k(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        &format!("type=docker,dest={}", s(&dir.join("d.tar"))),
        &s(&ctx),
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("type=docker cannot hold several platforms")
    );

    // a missing interpreter is named, with the package that provides it
    // (setpriv resets the environment: the variable goes through env)
    let o = kiln_vm_tests::unprivileged(Path::new("/usr/bin/env"))
        .arg("KILN_QEMU_DIR=/nonexistent")
        .arg(kiln_vm_tests::stage_file(&kiln_vm_tests::kiln_binary()))
        .args([
            "--root",
            &s(&state),
            "build",
            "--platform",
            "linux/arm64",
            "--no-cache",
            &s(&ctx),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("apt-get install qemu-user-static") && err.contains("qemu-aarch64-static"),
        "{err}"
    );
    // a base lacking the platform names both
    let o = k(&["build", "--platform", "linux/riscv64", &s(&ctx)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("linux/riscv64") && err.contains("linux/arm64"),
        "{err}"
    );
}
