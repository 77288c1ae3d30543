//! kiln inside a container: rootless Podman (runc) as the unprivileged
//! test user runs kiln from a rootfs holding it, pasta and busybox, with
//! the options README documents (`--security-opt seccomp=deploy/seccomp.json`,
//! `--security-opt unmask=/proc/*`, `--device /dev/net/tun`; no added
//! capability, not privileged). A two-stage build with a cache mount, a
//! `--network sandbox` step and a USER switch must pass, and the nested
//! step must have the posture it has on a bare host; with each option
//! removed the build fails naming that option.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_vm_tests::{busybox_rootfs, give_to_test_user, kiln_binary, run_checked, test_dir};

const DOCKERFILE: &str = r#"FROM scratch AS base
COPY rootfs/ /

FROM base AS cached
RUN --mount=type=cache,target=/cache echo from-cache > /cache/c && cp /cache/c /from-cache

FROM base
COPY --from=cached /from-cache /from-cache
RUN --network=sandbox ip -o link show > /links
USER 1000:1000
RUN mkdir /tmp/p && grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd):' /proc/self/status > /tmp/p/posture && id -u > /tmp/p/uid && for n in user pid mnt net; do readlink /proc/self/ns/$n; done > /tmp/p/ns
"#;

/// Copy `bin` to the same path under `root`, with the shared libraries
/// ldd names for it.
fn install(root: &Path, bin: &Path, at: &str) {
    let dest = root.join(at.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(bin, &dest).unwrap();
    let ldd = run_checked(Command::new("ldd").arg(bin));
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        if !to.exists() {
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(lib, &to).unwrap();
        }
    }
}

/// The container's root: busybox, kiln, pasta, and the build's context.
fn container_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    busybox_rootfs(&root);
    install(&root, &kiln_binary(), "/bin/kiln");
    assert!(
        Path::new("/usr/bin/pasta").exists(),
        "pasta is missing: run scripts/setup-host.sh (apt-get install passt)"
    );
    install(&root, Path::new("/usr/bin/pasta"), "/usr/bin/pasta");
    fs::create_dir_all(root.join("dev/net")).unwrap();
    let ctx = root.join("work/ctx");
    busybox_rootfs(&ctx.join("rootfs"));
    fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    give_to_test_user(dir);
    root
}

/// `podman run` of the build in `root` with `options`, as the test user.
fn run_build(dir: &Path, root: &Path, options: &[&str]) -> Output {
    let script = "for n in user pid mnt net; do readlink /proc/self/ns/$n; done > /work/outer-ns && cd /work && HOME=/work kiln --root /work/state build --no-cache --progress plain -o type=local,dest=/work/out ctx";
    let mut args = vec!["run", "--rm", "--runtime", "runc"];
    args.extend_from_slice(options);
    let root_arg = root.display().to_string();
    args.extend(["--rootfs", &root_arg, "/bin/sh", "-c", script]);
    kiln_vm_tests::podman(dir, "inc", &args)
}

/// The documented options; the seccomp profile is `deploy/seccomp.json`,
/// copied where the test user can read it.
fn options(dir: &Path) -> [[String; 2]; 3] {
    let profile = dir.join("seccomp.json");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/seccomp.json"),
        &profile,
    )
    .unwrap();
    give_to_test_user(&profile);
    [
        [
            "--security-opt".into(),
            format!("seccomp={}", profile.display()),
        ],
        ["--security-opt".into(), "unmask=/proc/*".into()],
        ["--device".into(), "/dev/net/tun".into()],
    ]
}

#[test]
fn kiln_builds_in_rootless_podman_with_the_documented_options_only() {
    assert!(
        Path::new("/usr/sbin/runc").exists(),
        "runc is missing: run scripts/setup-host.sh"
    );
    let dir = test_dir("in-container");
    let root = container_root(&dir);
    let options = options(&dir);
    let all: Vec<&str> = options.iter().flatten().map(String::as_str).collect();
    let out = run_build(&dir, &root, &all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "the build failed in the container:\n{err}"
    );
    let work = root.join("work");
    let read =
        |p: &str| fs::read_to_string(work.join(p)).unwrap_or_else(|e| panic!("{p}: {e}\n{err}"));
    assert_eq!(read("out/from-cache"), "from-cache\n");
    // --network sandbox: the step had its own loopback and a tap
    assert!(read("out/links").contains("lo:"), "{}", read("out/links"));
    assert_eq!(read("out/tmp/p/uid"), "1000\n");
    // the nested step's posture, as on a bare host
    let posture = read("out/tmp/p/posture");
    for want in [
        "Seccomp:\t2",
        "NoNewPrivs:\t1",
        "CapEff:\t0000000000000000",
        "CapBnd:\t00000000a80405fb",
    ] {
        assert!(posture.contains(want), "{want} missing from:\n{posture}");
    }
    // its own user, PID, mount and network namespaces, none the container's
    let outer: Vec<String> = read("outer-ns").lines().map(String::from).collect();
    let inner: Vec<String> = read("out/tmp/p/ns").lines().map(String::from).collect();
    assert_eq!(outer.len(), 4, "{outer:?}");
    assert_eq!(inner.len(), 4, "{inner:?}");
    for (o, i) in outer.iter().zip(&inner) {
        assert_ne!(o, i, "the step shares a namespace with the container");
    }

    // each documented option left out: the build fails naming it
    for (i, [_, opt]) in options.iter().enumerate() {
        let fewer: Vec<&str> = options
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, o)| o.iter().map(String::as_str))
            .collect();
        // the error names the option's key (`seccomp=`), not the path
        let opt = opt.split('=').next().map_or(opt.as_str(), |k| k);
        let out = run_build(&dir, &root, &fewer);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "built without {opt}:\n{err}");
        assert!(err.contains(opt), "the error does not name {opt}:\n{err}");
    }
    // without CAP_SETUID/CAP_SETGID kiln cannot map its namespace: it says
    // so (it used to wait forever for a pause process that waited for it)
    let mut fewer = all.clone();
    fewer.extend(["--cap-drop", "setuid,setgid", "--timeout", "60"]);
    let out = run_build(&dir, &root, &fewer);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "built without CAP_SETUID:\n{err}");
    assert!(err.contains("needs CAP_SETUID and CAP_SETGID"), "{err}");
}

#[test]
fn kilns_own_image_built_by_kiln_runs_a_build_in_podman() {
    let dir = test_dir("kiln-image");
    // scripts/image.sh and deploy/Dockerfile as the repository has them
    let repo = dir.join("repo");
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for f in ["scripts/image.sh", "deploy/Dockerfile"] {
        let to = repo.join(f);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(here.join(f), &to).unwrap();
    }
    let kiln = dir.join("kiln");
    fs::copy(kiln_binary(), &kiln).unwrap();
    let archive = dir.join("kiln-image.tar");
    let ctx = dir.join("ctx");
    busybox_rootfs(&ctx.join("rootfs"));
    fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nRUN --network=sandbox ip -o link show > /links && echo built-in-kiln > /made\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join("out")).unwrap();
    give_to_test_user(&dir);
    // the image, built by kiln as the test user (its state under
    // XDG_DATA_HOME, as scripts/image.sh passes its options to `kiln build`)
    let mut image = kiln_vm_tests::unprivileged(Path::new("/usr/bin/env"));
    image
        .arg(format!("XDG_DATA_HOME={}", dir.join("xdg").display()))
        .arg("/bin/bash")
        .arg(repo.join("scripts/image.sh"))
        .arg("-b")
        .arg(&kiln)
        .args(["-t", "kiln:dev", "-o"])
        .arg(format!("type=docker,dest={}", archive.display()));
    let out = image.output().expect("scripts/image.sh");
    assert!(
        out.status.success(),
        "scripts/image.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archive_arg = archive.display().to_string();
    let load = kiln_vm_tests::podman(&dir, "kim", &["load", "-i", &archive_arg]);
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let ctx_vol = format!("{}:/work/ctx:ro", ctx.display());
    let out_vol = format!("{}:/work/out", dir.join("out").display());
    let options = options(&dir);
    let mut args = vec!["run", "--rm", "--runtime", "runc"];
    args.extend(options.iter().flatten().map(String::as_str));
    args.extend([
        "--volume",
        &ctx_vol,
        "--volume",
        &out_vol,
        "docker.io/library/kiln:dev",
        "--root",
        "/work/state",
        "build",
        "--progress",
        "plain",
        "-o",
        "type=local,dest=/work/out",
        "/work/ctx",
    ]);
    let run = kiln_vm_tests::podman(&dir, "kim", &args);
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "kiln's image could not build:\n{err}");
    assert_eq!(
        fs::read_to_string(dir.join("out/made")).unwrap(),
        "built-in-kiln\n"
    );
    assert!(fs::read_to_string(dir.join("out/links"))
        .unwrap()
        .contains("lo:"));
}
