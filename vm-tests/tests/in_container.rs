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

/// The container's root: busybox, kiln, pasta, and the build's context.
fn container_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    busybox_rootfs(&root);
    kiln_vm_tests::install_with_libs(&root, &kiln_binary(), "/bin/kiln", false);
    assert!(
        Path::new("/usr/bin/pasta").exists(),
        "pasta is missing: run scripts/setup-host.sh (apt-get install passt)"
    );
    kiln_vm_tests::install_with_libs(&root, Path::new("/usr/bin/pasta"), "/usr/bin/pasta", false);
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

/// kiln's own image, built by kiln as the test user from
/// `scripts/image.sh` and `deploy/Dockerfile` as the repository has them,
/// as a docker-archive in `dir`; and a context under `dir/ctx` whose one
/// RUN uses the sandbox network and writes `/made`, `/links`, `/posture`.
fn kiln_image(dir: &Path) -> PathBuf {
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
        "FROM scratch\nCOPY rootfs/ /\nRUN --network=sandbox ip -o link show > /links && echo built-in-kiln > /made && grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status > /posture\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join("out")).unwrap();
    give_to_test_user(dir);
    // built by kiln as the test user (its state under XDG_DATA_HOME, as
    // scripts/image.sh passes its options to `kiln build`)
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
    archive
}

/// The build `kiln_image`'s context asks for, in its container: what it
/// wrote, and that its step had a sandbox network and kiln's posture.
fn assert_built_in_container(dir: &Path, err: &str) {
    let read = |p: &str| {
        fs::read_to_string(dir.join("out").join(p)).unwrap_or_else(|e| panic!("{p}: {e}\n{err}"))
    };
    assert_eq!(read("made"), "built-in-kiln\n");
    assert!(read("links").contains("lo:"));
    let posture = read("posture");
    assert!(
        posture.contains("Seccomp:\t2") && posture.contains("NoNewPrivs:\t1"),
        "{posture}"
    );
}

/// The `run` arguments of kiln's image building `/work/ctx` into
/// `/work/out`, after `options`.
fn image_run_args(dir: &Path, options: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), "--rm".into()];
    args.extend(options.iter().map(|o| o.to_string()));
    args.extend([
        "--volume".into(),
        format!("{}:/work/ctx:ro", dir.join("ctx").display()),
        "--volume".into(),
        format!("{}:/work/out", dir.join("out").display()),
        "docker.io/library/kiln:dev".into(),
        "--root".into(),
        "/work/state".into(),
        "build".into(),
        "--no-cache".into(),
        "--progress".into(),
        "plain".into(),
        "-o".into(),
        "type=local,dest=/work/out".into(),
        "/work/ctx".into(),
    ]);
    args
}

#[test]
fn kilns_own_image_built_by_kiln_runs_a_build_in_podman() {
    let dir = test_dir("kiln-image");
    let archive = kiln_image(&dir);
    let archive_arg = archive.display().to_string();
    let load = kiln_vm_tests::podman(&dir, "kim", &["load", "-i", &archive_arg]);
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let options = options(&dir);
    let mut opts = vec!["--runtime", "runc"];
    opts.extend(options.iter().flatten().map(String::as_str));
    let args = image_run_args(&dir, &opts);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = kiln_vm_tests::podman(&dir, "kim", &args);
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "kiln's image could not build:\n{err}");
    assert_built_in_container(&dir, &err);
}

/// A rootless Docker daemon of the test user, stopped when dropped.
struct RootlessDocker {
    daemon: std::process::Child,
    run: PathBuf,
}

impl RootlessDocker {
    fn start(dir: &Path) -> RootlessDocker {
        let script = Path::new("/usr/share/docker.io/contrib/dockerd-rootless.sh");
        assert!(
            script.exists(),
            "{} is missing: run scripts/setup-host.sh (apt-get install docker.io rootlesskit)",
            script.display()
        );
        let run = dir.join("docker-run");
        fs::create_dir_all(&run).unwrap();
        give_to_test_user(dir);
        run_checked(Command::new("chmod").arg("700").arg(&run));
        let mut cmd = kiln_vm_tests::unprivileged(Path::new("/usr/bin/env"));
        cmd.arg(format!("XDG_RUNTIME_DIR={}", run.display()))
            .arg("PATH=/usr/share/docker.io/contrib:/usr/bin:/usr/sbin:/bin:/sbin")
            .arg(script)
            .arg("--data-root")
            .arg(dir.join("docker-data"))
            .args(["--storage-driver", "vfs", "--exec-root"])
            .arg(run.join("exec"))
            .arg("--pidfile")
            .arg(run.join("docker.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(dir.join("dockerd.log")).unwrap());
        let daemon = cmd.spawn().expect("start rootless dockerd");
        let d = RootlessDocker { daemon, run };
        let start = std::time::Instant::now();
        while !d.docker(&["info"]).status.success() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "rootless dockerd did not start:\n{}",
                fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        d
    }

    fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = kiln_vm_tests::unprivileged(Path::new("/usr/bin/env"));
        cmd.arg(format!(
            "DOCKER_HOST=unix://{}",
            self.run.join("docker.sock").display()
        ))
        .arg("/usr/bin/docker")
        .args(args);
        cmd.output().expect("run docker")
    }
}

impl Drop for RootlessDocker {
    fn drop(&mut self) {
        // rootlesskit passes SIGTERM on to dockerd, which stops its
        // containers and exits; the whole tree goes with it
        if let Ok(pid) = fs::read_to_string(self.run.join("docker.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = Command::new("kill")
            .arg(self.daemon.id().to_string())
            .status();
        let _ = self.daemon.wait();
    }
}

#[test]
fn kilns_own_image_runs_a_build_in_rootless_docker_with_the_documented_options() {
    let dir = test_dir("in-docker");
    let archive = kiln_image(&dir);
    let docker = RootlessDocker::start(&dir);
    let load = docker.docker(&["load", "-i", &archive.display().to_string()]);
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let profile = options(&dir)[0][1].clone();
    // Docker's names for what Podman calls unmask=/proc/*
    let all = [
        ["--security-opt", profile.as_str()],
        ["--security-opt", "systempaths=unconfined"],
        ["--device", "/dev/net/tun"],
    ];
    let flat: Vec<&str> = all.iter().flatten().copied().collect();
    let run = docker.docker(
        &image_run_args(&dir, &flat)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        run.status.success(),
        "kiln's image could not build in rootless Docker:\n{err}"
    );
    assert_built_in_container(&dir, &err);
    // each option left out: the error names it
    for (i, [_, opt]) in all.iter().enumerate() {
        let fewer: Vec<&str> = all
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, o)| o.iter().copied())
            .collect();
        let args = image_run_args(&dir, &fewer);
        let run = docker.docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(!run.status.success(), "built without {opt}:\n{err}");
        let key = opt.split('=').next().unwrap_or(opt);
        assert!(err.contains(key), "the error does not name {key}:\n{err}");
    }
}
