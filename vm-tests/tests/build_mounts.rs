//! End-to-end tests of `RUN --mount` (bind, cache, tmpfs, secret, ssh),
//! run as the unprivileged test user: what each mount shows a step, what
//! it leaves in the image (nothing), and the attacks on mount points and
//! cache directories that hit BuildKit and Buildah.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_vm_tests::{
    expect_failure, expect_success, give_to_test_user, kiln, kiln_binary, run_checked,
    running_as_root, stage_file, test_dir, unprivileged, Project,
};

/// `kiln build EXTRA...` of `p` with environment variables (setpriv
/// resets the environment, so they go through env(1)).
fn build_env(p: &Project, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut cmd = unprivileged(Path::new("/usr/bin/env"));
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(stage_file(&kiln_binary()));
    cmd.args(p.build_args("state", extra));
    cmd.output().expect("run kiln")
}

fn ok(o: Output) -> (String, String) {
    expect_success(o)
}

fn failed(o: Output) -> String {
    expect_failure(o)
}

#[test]
fn bind_mounts_show_context_and_stages_read_only_and_leave_nothing() {
    let p = Project::new(
        "mount-bind",
        r#"FROM scratch AS tools
COPY rootfs/ /
RUN mkdir -p /data && echo from-stage > /data/f && ln -s / /data/root-link

FROM tools
RUN --mount=type=bind,source=files,target=/ctx cat /ctx/a > /out-a && ls -a /ctx > /out-ls && (touch /ctx/new 2>/dev/null && echo writable || echo readonly) > /out-ro
RUN --mount=type=bind,source=files/a,target=/etc/one cat /etc/one > /out-one
RUN --mount=type=bind,source=files,target=/rw,rw echo changed > /rw/a && cat /rw/a > /out-rw
RUN --mount=type=bind,from=tools,source=/data,target=/d cat /d/f > /out-stage
RUN --mount=type=bind,from=tools,source=/data/root-link,target=/d2 ls /d2 > /out-link
"#,
    );
    p.write("files/a", "alpha\n");
    p.write("files/ignored", "must not be seen\n");
    p.write(".dockerignore", "files/ignored\n");
    let (_, err) = ok(p.build(&["--progress", "plain", "-o", &p.local_out()]));
    assert_eq!(p.out("out-a"), "alpha\n");
    let ls = p.out("out-ls");
    assert!(ls.contains("a\n") && !ls.contains("ignored"), "{ls}");
    assert_eq!(p.out("out-ro"), "readonly\n");
    assert_eq!(p.out("out-one"), "alpha\n");
    assert_eq!(p.out("out-rw"), "changed\n");
    assert_eq!(p.out("out-stage"), "from-stage\n");
    // A source that is a symlink to / names the stage's root, never the
    // host's (Buildah CVE-2024-1753): the stage has /data, the host /usr.
    let link = p.out("out-link");
    assert!(link.contains("data") && !link.contains("usr"), "{link}");
    // rw writes were thrown away: the context is untouched.
    assert_eq!(
        std::fs::read_to_string(p.ctx().join("files/a")).unwrap(),
        "alpha\n"
    );
    // Mount points kiln made are not in the image; /etc was there before.
    for gone in ["ctx", "rw", "d", "d2", "etc/one"] {
        assert!(
            !p.dir.join("out").join(gone).exists(),
            "/{gone} left in the image\n{err}"
        );
    }
    assert!(p.dir.join("out/etc/passwd").exists());

    // The bound content is part of the step's key: a changed bound file
    // reruns the first step that binds it (and so every step after it);
    // a changed file no step reads reruns nothing.
    p.write("files/a", "beta\n");
    let (_, err) = ok(p.build(&["--progress", "plain", "-o", &p.local_out()]));
    assert_eq!(p.out("out-a"), "beta\n");
    assert_eq!(p.out("out-one"), "beta\n");
    assert!(err.contains("5 steps run"), "{err}");
    p.write("unrelated.txt", "x\n");
    let (_, err) = ok(p.build(&["--progress", "plain"]));
    assert!(err.contains("0 steps run"), "{err}");
}

#[test]
fn tmpfs_mounts_are_memory_with_their_size_and_leave_nothing() {
    let p = Project::new(
        "mount-tmpfs",
        r#"FROM scratch
COPY rootfs/ /
RUN --mount=type=tmpfs,target=/scratch/deep,size=1m grep ' /scratch/deep ' /proc/mounts > /out-mount && echo x > /scratch/deep/f
RUN --mount=type=tmpfs,target=/sys/kernel echo y > /sys/kernel/f && grep ' /sys/kernel ' /proc/mounts > /out-sys
RUN --mount=type=tmpfs,target=/t --mount=type=cache,target=/t/c/d --mount=type=bind,source=a,target=/t/one cat /t/one > /out-nested && grep -c ' /t' /proc/mounts >> /out-nested
"#,
    );
    p.write("a", "alpha\n");
    ok(p.build(&["-o", &p.local_out()]));
    // mounts inside a mount of the same step get their mount points made
    // in it (a file for a file), as runc makes them
    assert_eq!(p.out("out-nested"), "alpha\n3\n");
    assert!(!p.dir.join("out/t").exists());
    let m = p.out("out-mount");
    assert!(m.contains("tmpfs") && m.contains("size=1024k"), "{m}");
    assert!(m.contains("nosuid") && m.contains("nodev"), "{m}");
    assert!(!p.dir.join("out/scratch").exists());
    // a mount aimed under /sys lands on the step's sysfs, not under it
    let m = p.out("out-sys");
    assert!(m.starts_with("tmpfs /sys/kernel tmpfs"), "{m}");
}

/// Every byte of every file under `dir`, and of every gzip stream and tar
/// member inside those files, searched for `needle`. Returns the places
/// it was found.
fn find_bytes(dir: &Path, needle: &[u8]) -> Vec<String> {
    fn search(data: &[u8], needle: &[u8], at: &str, hits: &mut Vec<String>) {
        if data.windows(needle.len()).any(|w| w == needle) {
            hits.push(at.to_string());
        }
        if data.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            if flate2::read::MultiGzDecoder::new(data)
                .read_to_end(&mut out)
                .is_ok()
            {
                search(&out, needle, &format!("{at} (gunzip)"), hits);
            }
        } else if data.len() > 262 && &data[257..262] == b"ustar" {
            let mut ar = tar::Archive::new(data);
            if let Ok(entries) = ar.entries() {
                for mut e in entries.flatten() {
                    let name = e
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    let mut buf = Vec::new();
                    if e.read_to_end(&mut buf).is_ok() {
                        search(&buf, needle, &format!("{at}:{name}"), hits);
                    }
                }
            }
        }
    }
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                if let Ok(data) = std::fs::read(&path) {
                    search(&data, needle, &path.display().to_string(), &mut hits);
                }
            }
        }
    }
    hits
}

#[test]
fn secrets_reach_only_their_step_and_are_found_nowhere_after() {
    // Unique per run so no earlier run's files could match.
    let secret = format!("kiln-s3cret-{}-{}", std::process::id(), line!());
    let env_secret = format!("kiln-envtok-{}", std::process::id());
    let p = Project::new(
        "mount-secret",
        r#"FROM scratch
COPY rootfs/ /
RUN --mount=type=secret,id=tok stat -c '%a %u %g' /run/secrets/tok > /out-stat && grep ' /run/secrets/tok ' /proc/mounts > /out-mount && echo "leak: $(cat /run/secrets/tok)"
RUN --mount=type=secret,id=tok,target=/etc/app.key,mode=0440,uid=1000,gid=1000 stat -c '%a %u %g' /etc/app.key > /out-stat2 && wc -c < /etc/app.key > /out-len
RUN --mount=type=secret,id=envtok,env=API_TOKEN echo "len ${#API_TOKEN}" > /out-env && test ! -e /run/secrets/envtok
RUN --mount=type=secret,id=absent (ls /run/secrets 2>&1 || true) > /out-absent
"#,
    );
    let file = p.dir.join("secret.txt");
    std::fs::write(&file, &secret).unwrap();
    give_to_test_user(&p.dir);
    let secret_flag = format!("id=tok,src={}", file.display());
    let oci = p.dir.join("image-oci.tar");
    let docker = p.dir.join("image-docker.tar");
    let (_, plain) = ok(build_env(
        &p,
        &[("ENVTOK", &env_secret)],
        &[
            "--progress",
            "plain",
            "--secret",
            &secret_flag,
            "--secret",
            "id=envtok,env=ENVTOK",
            "-t",
            "secret-test",
            "-o",
            &p.local_out(),
            "-o",
            &format!("type=oci,dest={}", oci.display()),
            "-o",
            &format!("type=docker,dest={}", docker.display()),
            "-o",
            &format!("type=tar,dest={}", p.dir.join("fs.tar").display()),
        ],
    ));
    assert_eq!(p.out("out-stat"), "400 0 0\n");
    let mount = p.out("out-mount");
    assert!(
        mount.contains("tmpfs") && mount.contains("ro,") && mount.contains("noexec"),
        "{mount}"
    );
    assert_eq!(p.out("out-stat2"), "440 1000 1000\n");
    assert_eq!(p.out("out-len").trim(), secret.len().to_string());
    assert_eq!(p.out("out-env"), format!("len {}\n", env_secret.len()));
    assert!(!p.out("out-absent").contains("absent"));
    // The step printed the secret: the output shows ****.
    assert!(plain.contains("leak: ****"), "{plain}");
    for dir in ["run/secrets", "etc/app.key"] {
        assert!(
            !p.dir.join("out").join(dir).exists(),
            "/{dir} left in the image"
        );
    }

    // Rebuilding with another secret value is a cache hit (the value is
    // not in the key), with kiln's JSON events captured too.
    std::fs::write(&file, format!("{secret}-rotated")).unwrap();
    let (_, raw) = ok(build_env(
        &p,
        &[("ENVTOK", &env_secret)],
        &[
            "--progress",
            "events",
            "--secret",
            &secret_flag,
            "--secret",
            "id=envtok,env=ENVTOK",
        ],
    ));
    assert!(raw.contains("0 steps run"), "{raw}");
    // And run everything again with rawjson (BuildKit's SolveStatus, whose
    // logs are base64), so its events are searched too, decoded.
    let (_, raw2) = ok(build_env(
        &p,
        &[("ENVTOK", &env_secret)],
        &[
            "--progress",
            "rawjson",
            "--no-cache",
            "--secret",
            &secret_flag,
            "--secret",
            "id=envtok,env=ENVTOK",
        ],
    ));
    let raw2 = format!("{raw2}\n{}", decoded_logs(&raw2));
    assert!(raw2.contains("leak: ****"), "{raw2}");

    // The secrets are nowhere: not in the state directory (blobs, layers,
    // cache records, cache mounts), not in any exported format, not in the
    // progress output.
    std::fs::remove_file(&file).unwrap();
    for (what, text) in [("plain", &plain), ("events", &raw), ("rawjson", &raw2)] {
        assert!(!text.contains(&secret), "secret in {what} output");
        assert!(!text.contains(&env_secret), "env secret in {what} output");
    }
    for needle in [&secret, &env_secret] {
        let hits = find_bytes(&p.dir, needle.as_bytes());
        assert!(hits.is_empty(), "secret found in {hits:?}");
    }
    // The search itself works: a planted copy is found.
    std::fs::write(p.dir.join("out/planted"), format!("x{secret}x")).unwrap();
    assert_eq!(find_bytes(&p.dir, secret.as_bytes()).len(), 1);
}

#[test]
fn a_required_secret_that_is_missing_fails_before_the_step_runs() {
    let p = Project::new(
        "mount-secret-required",
        r#"FROM scratch
COPY rootfs/ /
RUN --mount=type=secret,id=deploy-key,required=true echo "the-step-$((1+1))-ran"
"#,
    );
    let err = failed(p.build(&["--progress", "plain"]));
    assert!(
        err.contains("deploy-key") && err.contains("--secret"),
        "{err}"
    );
    assert!(!err.contains("the-step-2-ran"), "{err}");
    assert!(err.contains("Dockerfile:3"), "{err}");
}

#[test]
fn cache_mounts_persist_across_builds_and_never_enter_the_image() {
    let p = Project::new(
        "mount-cache",
        r#"FROM scratch AS seed
COPY rootfs/ /
RUN mkdir -p /seed && echo seeded > /seed/s

FROM seed
ARG RUN=0
RUN --mount=type=cache,target=/var/cache/app echo "$RUN" >> /var/cache/app/log && cat /var/cache/app/log > /out-log
RUN --mount=type=cache,id=owned,target=/c2,uid=1000,gid=1000,mode=0700 echo "$RUN" > /dev/null && stat -c '%a %u %g' /c2 > /out-owned
RUN --mount=type=cache,id=seeded,target=/c3,from=seed,source=/seed echo "$RUN" > /dev/null && cat /c3/s > /out-seeded
RUN --mount=type=cache,target=/var/cache/app,ro echo "$RUN" > /dev/null && (touch /var/cache/app/x 2>/dev/null && echo rw || echo ro) > /out-ro
"#,
    );
    ok(p.build(&["--build-arg", "RUN=1", "-o", &p.local_out()]));
    assert_eq!(p.out("out-log"), "1\n");
    ok(p.build(&["--build-arg", "RUN=2", "-o", &p.local_out()]));
    assert_eq!(p.out("out-log"), "1\n2\n");
    assert_eq!(p.out("out-owned"), "700 1000 1000\n");
    assert_eq!(p.out("out-seeded"), "seeded\n");
    assert_eq!(p.out("out-ro"), "ro\n");
    // The cache's directory exists only as the mount point kiln removed.
    assert!(!p.dir.join("out/var/cache").exists());
    assert!(!p.dir.join("out/c2").exists());

    // Cache mounts count in du and go with prune.
    let (du, _) = ok(kiln(["--root", &p.state("state"), "du"]).output().unwrap());
    let row = du
        .lines()
        .find(|l| l.starts_with("Cache Mounts"))
        .unwrap_or_default();
    assert!(
        !row.contains(" 0B") && !row.trim_end().ends_with(" 0"),
        "{du}"
    );
    ok(kiln(["--root", &p.state("state"), "prune", "--all"])
        .output()
        .unwrap());
    ok(p.build(&["--build-arg", "RUN=3", "-o", &p.local_out()]));
    assert_eq!(p.out("out-log"), "3\n");
}

/// Two builds of `dockerfile` at once on one state directory, with
/// `--build-arg TAG=a` and `TAG=b`; returns both local outputs' directory.
fn concurrent_builds(p: &Project) -> (PathBuf, PathBuf) {
    let outs = (p.dir.join("out-a"), p.dir.join("out-b"));
    let spawn = |tag: &str, out: &Path| {
        kiln(p.build_args(
            "state",
            &[
                "--build-arg",
                &format!("TAG={tag}"),
                "-o",
                &format!("type=local,dest={}", out.display()),
            ],
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kiln")
    };
    let a = spawn("a", &outs.0);
    let b = spawn("b", &outs.1);
    ok(a.wait_with_output().unwrap());
    ok(b.wait_with_output().unwrap());
    outs
}

/// A step fragment: write our marker to /s and wait (up to 60 s) until
/// the other build's marker appears; records `met` or `timeout` in
/// /out-met-N.
fn rendezvous(n: u32) -> String {
    format!(
        r#"if [ $TAG = a ]; then OTHER=b; else OTHER=a; fi; touch /s/$TAG; i=0; while [ ! -e /s/$OTHER ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; [ -e /s/$OTHER ] && echo met > /out-met-{n} || echo timeout > /out-met-{n}"#
    )
}

#[test]
fn cache_sharing_modes_hold_under_two_concurrent_builds() {
    // shared: both builds see one directory at the same time (they meet).
    // private: meeting in a shared cache proves they run together, and
    // the private cache of each holds only its own marker.
    // locked: right after meeting, both reach a step with a locked cache;
    // each appends in/out with a pause between, and the log shows one
    // whole step after the other, never interleaved.
    let p = Project::new(
        "mount-cache-sharing",
        &format!(
            r#"FROM scratch
COPY rootfs/ /
ARG TAG
RUN --mount=type=cache,id=rv1,target=/s,sharing=shared {}
RUN --mount=type=cache,id=rv2,target=/s --mount=type=cache,id=priv,target=/p,sharing=private touch /p/$TAG; {}; ls /p > /out-private
RUN --mount=type=cache,id=rv3,target=/s {}
RUN --mount=type=cache,id=lock,target=/l,sharing=locked echo in-$TAG >> /l/log; sleep 1; echo out-$TAG >> /l/log; cat /l/log > /out-locked
"#,
            rendezvous(1),
            rendezvous(2),
            rendezvous(3)
        ),
    );
    let (a, b) = concurrent_builds(&p);
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    for n in 1..=3 {
        assert_eq!(read(&a, &format!("out-met-{n}")), "met\n", "step {n}");
        assert_eq!(read(&b, &format!("out-met-{n}")), "met\n", "step {n}");
    }
    assert_eq!(read(&a, "out-private"), "a\n");
    assert_eq!(read(&b, "out-private"), "b\n");
    // The later of the two saw the whole log.
    let (la, lb) = (read(&a, "out-locked"), read(&b, "out-locked"));
    let full = if la.lines().count() == 4 { la } else { lb };
    let lines: Vec<&str> = full.lines().collect();
    assert_eq!(lines.len(), 4, "{full}");
    assert_eq!(
        lines[0].replace("in-", ""),
        lines[1].replace("out-", ""),
        "{full}"
    );
    assert_eq!(
        lines[2].replace("in-", ""),
        lines[3].replace("out-", ""),
        "{full}"
    );
}

#[test]
fn stub_cleanup_never_follows_a_symlink_the_step_planted() {
    // The step moves the stub's parent away and puts a symlink to a
    // directory holding a same-named empty directory in its place, both
    // inside the image and on the host (BuildKit CVE-2024-23652): kiln
    // must remove neither.
    let canary = test_dir("mount-stub-canary");
    std::fs::create_dir_all(canary.join("stub")).unwrap();
    std::fs::write(canary.join("keep"), "host canary\n").unwrap();
    give_to_test_user(&canary);
    let c = canary.display();
    let p = Project::new(
        "mount-stub",
        &format!(
            r#"FROM scratch
COPY rootfs/ /
RUN mkdir -p {c}/stub
RUN --mount=type=tmpfs,target=/parent/stub mv /parent /moved && ln -s {c} /parent
"#
        ),
    );
    ok(p.build(&["-o", &p.local_out()]));
    assert!(
        canary.join("stub").is_dir(),
        "host canary directory removed"
    );
    assert_eq!(
        std::fs::read_to_string(canary.join("keep")).unwrap(),
        "host canary\n"
    );
    let out = p.dir.join("out");
    assert!(
        out.join(canary.strip_prefix("/").unwrap())
            .join("stub")
            .is_dir(),
        "the image's own directory was removed through the symlink"
    );
    // What the step made stays as it made it.
    assert!(out.join("parent").is_symlink());
    assert!(out.join("moved").is_dir());
}

#[test]
fn cache_source_and_id_cannot_leave_the_cache() {
    // An earlier step plants symlinks in the cache; a later one mounts
    // them as source=, and an id with ../ is used (BuildKit
    // CVE-2024-23651, Buildah CVE-2024-9675): everything stays in the
    // cache root.
    let marker = format!("kiln-pwned-{}", std::process::id());
    let p = Project::new(
        "mount-cache-escape",
        &format!(
            r#"FROM scratch
COPY rootfs/ /
RUN --mount=type=cache,id=evil,target=/c ln -sfn / /c/up && ln -sfn ../../../../../../ /c/rel && touch /c/inside
RUN --mount=type=cache,id=evil,target=/d,source=up ls /d > /out-up && touch /d/{marker}
RUN --mount=type=cache,id=evil,target=/e,source=rel/tmp ls /e > /out-rel
RUN --mount=type=cache,id=../../../../../../../tmp,target=/f touch /f/{marker}
"#
        ),
    );
    ok(p.build(&["-o", &p.local_out()]));
    let up = p.out("out-up");
    assert!(up.contains("inside") && !up.contains("usr"), "{up}");
    assert!(!Path::new("/").join(&marker).exists());
    assert!(!Path::new("/tmp").join(&marker).exists());
    let found = run_checked(Command::new("find").arg(&p.dir).arg("-name").arg(&marker));
    let found = String::from_utf8_lossy(&found.stdout);
    assert!(
        found.lines().all(|l| l.contains("/state/")),
        "marker outside the state directory: {found}"
    );
}

/// A client key pair in `keys` and an authorized_keys file holding its
/// public half: (private key, authorized_keys).
fn client_key(keys: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(keys).unwrap();
    let key = keys.join("id_ed25519");
    run_checked(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key),
    );
    let authorized = keys.join("authorized_keys");
    std::fs::copy(keys.join("id_ed25519.pub"), &authorized).unwrap();
    (key, authorized)
}

/// An sshd on 127.0.0.1, run as the test user, accepting one key.
struct Sshd {
    child: std::process::Child,
    port: u16,
    user: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd(dir: &Path, authorized: &Path) -> Sshd {
    std::fs::create_dir_all(dir).unwrap();
    let host_key = dir.join("host_key");
    run_checked(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key),
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPidFile none\n",
            host_key.display(),
            authorized.display()
        ),
    )
    .unwrap();
    give_to_test_user(dir);
    run_checked(Command::new("chmod").arg("600").arg(&host_key));
    let user = if running_as_root() {
        "kiln-test".to_string()
    } else {
        String::from_utf8_lossy(&run_checked(Command::new("id").arg("-un")).stdout)
            .trim()
            .to_string()
    };
    let mut cmd = unprivileged(Path::new("/usr/sbin/sshd"));
    cmd.args(["-D", "-e", "-f"]).arg(&config);
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sshd");
    let sshd = Sshd { child, port, user };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return sshd;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("sshd did not start on port {port}");
}

/// Copy the host's ssh client and the libraries it needs into `rootfs`.
fn install_ssh_client(rootfs: &Path) {
    install_host_binary(rootfs, "/usr/bin/ssh");
}

/// Copy a host binary and the libraries it links into `rootfs`.
fn install_host_binary(rootfs: &Path, binary: &str) {
    let ldd = run_checked(Command::new("ldd").arg(binary));
    let mut files = vec![PathBuf::from(binary)];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(path) = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from)
        {
            files.push(path);
        }
    }
    for f in files {
        let real = std::fs::canonicalize(&f).unwrap();
        for (at, src) in [(&f, &real), (&real, &real)] {
            let dst = rootfs.join(at.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            if !dst.exists() {
                std::fs::copy(src, &dst).unwrap();
            }
        }
    }
}

const SSH_DOCKERFILE: &str = r#"FROM scratch
COPY rootfs/ /
ARG PORT USER MODE
RUN --network=host --mount=type=ssh echo "$MODE" > /dev/null && stat -c '%a %u %F' $SSH_AUTH_SOCK > /out-sock && ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -p $PORT $USER@127.0.0.1 echo ssh-round-trip-ok > /out-ssh
RUN --mount=type=ssh,id=default,target=/tmp/agent.sock,mode=0660,uid=1000,gid=10,required=true echo "$MODE" > /dev/null && stat -c '%a %u %g %F' /tmp/agent.sock > /out-sock2 && echo "$SSH_AUTH_SOCK" > /out-env
"#;

#[test]
fn ssh_agents_reach_a_real_sshd_and_give_no_key_away() {
    let p = Project::new("mount-ssh", SSH_DOCKERFILE);
    install_ssh_client(&p.ctx().join("rootfs"));
    let (key, authorized) = client_key(&p.dir.join("keys"));
    give_to_test_user(&p.dir);
    run_checked(Command::new("chmod").arg("600").arg(&key));
    let sshd = start_sshd(&p.dir.join("sshd"), &authorized);
    let port = sshd.port.to_string();
    let common = |mode: &str| -> Vec<String> {
        [
            "--progress",
            "plain",
            "--allow",
            "network.host",
            "--build-arg",
            &format!("PORT={port}"),
            "--build-arg",
            &format!("USER={}", sshd.user),
            "--build-arg",
            &format!("MODE={mode}"),
            "-o",
            &p.local_out(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // --ssh default=KEYFILE: kiln serves the key itself.
    let mut args = common("keyfile");
    args.extend(["--ssh".to_string(), format!("default={}", key.display())]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(p.build(&refs));
    assert_eq!(p.out("out-ssh"), "ssh-round-trip-ok\n");
    assert_eq!(p.out("out-sock"), "600 0 socket\n");
    assert_eq!(p.out("out-sock2"), "660 1000 10 socket\n");
    assert_eq!(p.out("out-env"), "/tmp/agent.sock\n");
    assert!(!p.dir.join("out/run/buildkit").exists());
    assert!(!p.dir.join("out/tmp/agent.sock").exists());

    // required=true with no such --ssh id fails before the step, naming it.
    std::fs::write(
        p.ctx().join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nRUN --mount=type=ssh,id=deploy,required=true echo \"ran-$((1+1))\"\n",
    )
    .unwrap();
    let err = failed(p.build(&[
        "--progress",
        "plain",
        "--ssh",
        &format!("default={}", key.display()),
    ]));
    assert!(
        err.contains("\"deploy\"") && err.contains("--ssh deploy"),
        "{err}"
    );
    assert!(!err.contains("ran-2"), "{err}");
    std::fs::write(p.ctx().join("Dockerfile"), SSH_DOCKERFILE).unwrap();

    // --ssh default: forward the agent at $SSH_AUTH_SOCK.
    let agent_sock = p.dir.join("agent.sock");
    let agent = unprivileged(Path::new("/usr/bin/ssh-agent"))
        .args(["-D", "-a"])
        .arg(&agent_sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start ssh-agent");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(agent);
    for _ in 0..100 {
        if agent_sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sock = agent_sock.display().to_string();
    run_checked(
        unprivileged(Path::new("/usr/bin/env"))
            .arg(format!("SSH_AUTH_SOCK={sock}"))
            .arg("ssh-add")
            .arg(&key),
    );
    let mut args = common("forward");
    args.extend(["--ssh".to_string(), "default".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(build_env(&p, &[("SSH_AUTH_SOCK", &sock)], &refs));
    assert_eq!(p.out("out-ssh"), "ssh-round-trip-ok\n");
}

#[test]
fn an_env_secret_is_wiped_from_kiln_when_its_step_ends() {
    if !kiln_vm_tests::root_for("reading kiln's memory") {
        return;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("kiln-wipe-{}-{stamp:040x}-{stamp:040x}", std::process::id());
    // the allocator writes its free-list pointers over the first bytes of
    // a freed buffer: look for the secret's tail
    let tail = &secret.as_bytes()[secret.len() - 48..];
    let nap = format!("7.{}", std::process::id() % 1000);
    let p = Project::new(
        "mount-secret-wipe",
        &format!(
            "FROM scratch\nCOPY rootfs/ /\nRUN --mount=type=secret,id=tok,env=TOK test -n \"$TOK\" && touch /a\nRUN sleep {nap}\n"
        ),
    );
    let file = p.dir.join("secret.txt");
    std::fs::write(&file, &secret).unwrap();
    give_to_test_user(&p.dir);
    let flag = format!("id=tok,src={}", file.display());
    let mut child = kiln(p.build_args("state", &["--progress", "plain", "--secret", &flag]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let kiln_pid = child.id();
    // wait for the second step's sleep: the first step has ended then
    let sleeping = kiln_vm_tests::wait_for_process_with_arg(&nap);
    let copies = kiln_vm_tests::copies_in_memory(kiln_pid, tail);
    let status = child.wait().unwrap();
    assert!(sleeping, "the second step never started");
    assert!(status.success());
    // what stays for the whole build: the secret itself and the output
    // redactor's copy; the step's environment (four copies on the way
    // to execve: seven copies before they were wiped) is wiped
    assert!(
        copies <= 2,
        "{copies} copies of the secret in kiln's memory"
    );
}

/// The fuse view servers started by kiln process `kiln_pid`.
fn fuse_servers_of(kiln_pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // the parent is the 2nd field after the command in parentheses
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(kiln_pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"__kiln-fuse-server"))
        })
        .collect()
}

#[test]
fn the_fuse_server_is_a_confined_process_without_the_steps_secrets() {
    if !kiln_vm_tests::root_for("reading the fuse server's memory") {
        return;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("kiln-fuse-{}-{stamp:040x}", std::process::id());
    let from_env = format!("kiln-fuse-env-{}-{stamp:040x}", std::process::id());
    let nap = format!("6.{}", std::process::id() % 1000);
    let p = Project::new(
        "mount-fuse-server",
        &format!(
            "FROM scratch\nCOPY rootfs/ /\nRUN --mount=type=secret,id=tok,env=TOK --mount=type=secret,id=envtok,env=ETOK test -n \"$TOK$ETOK\" && sleep {nap}\n"
        ),
    );
    let file = p.dir.join("secret.txt");
    std::fs::write(&file, &secret).unwrap();
    give_to_test_user(&p.dir);
    let mut cmd = unprivileged(Path::new("/usr/bin/env"));
    cmd.arg(format!("KILN_TEST_TOKEN={from_env}"))
        .arg(stage_file(&kiln_binary()))
        .args(p.build_args(
            "state",
            &[
                "--snapshotter",
                "fuse",
                "--progress",
                "plain",
                "--secret",
                &format!("id=tok,src={}", file.display()),
                "--secret",
                "id=envtok,env=KILN_TEST_TOKEN",
            ],
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let kiln_pid = child.id();
    // while the step sleeps with both secrets mounted and in its
    // environment, its root filesystem is served. (A step that writes a
    // secret into its own root filesystem sends it through the server:
    // that is the step's doing, and the bytes land in its layer anyway.)
    let sleeping = kiln_vm_tests::wait_for_process_with_arg(&nap);
    let servers = fuse_servers_of(kiln_pid);
    let in_kiln = kiln_vm_tests::copies_in_memory(kiln_pid, secret.as_bytes())
        + kiln_vm_tests::copies_in_memory(kiln_pid, from_env.as_bytes());
    let mut found = Vec::new();
    for &pid in &servers {
        let copies = kiln_vm_tests::copies_in_memory(pid, secret.as_bytes())
            + kiln_vm_tests::copies_in_memory(pid, from_env.as_bytes());
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let kiln_net = std::fs::read_link(format!("/proc/{kiln_pid}/ns/net")).unwrap();
        found.push((
            copies,
            environ.len(),
            net != kiln_net,
            kiln_vm_tests::status_field(pid, "Seccomp"),
            kiln_vm_tests::status_field(pid, "NoNewPrivs"),
            kiln_vm_tests::status_field(pid, "CapEff"),
            kiln_vm_tests::status_field(pid, "CapBnd"),
        ));
    }
    let status = child.wait().unwrap();
    assert!(sleeping, "the step never started");
    assert!(status.success());
    assert!(
        in_kiln > 0,
        "the secrets are not in kiln's memory either: the scan proves nothing"
    );
    assert!(
        !servers.is_empty(),
        "no fuse server process of kiln was found"
    );
    // CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID MKNOD SETFCAP
    let kept = "000000008800001f";
    for f in found {
        assert_eq!(
            f,
            (0, 0, true, "2".into(), "1".into(), kept.into(), kept.into()),
            "(copies of the secrets, environment bytes, own network namespace, seccomp, no_new_privs, effective and bounding capabilities) of a fuse server"
        );
    }
}

#[test]
fn a_step_gets_a_bounded_number_of_signatures() {
    let p = Project::new(
        "mount-ssh-budget",
        "FROM scratch\nCOPY rootfs/ /\nCOPY key.pub msg /\nRUN --mount=type=ssh i=0; ok=0; while [ $i -lt 70 ]; do ssh-keygen -Y sign -n t -f /key.pub < /msg > /dev/null 2>&1 && ok=$((ok+1)); i=$((i+1)); done; echo \"signed $ok\"\n",
    );
    install_host_binary(&p.ctx().join("rootfs"), "/usr/bin/ssh-keygen");
    let key = p.dir.join("key");
    run_checked(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key),
    );
    std::fs::copy(key.with_extension("pub"), p.ctx().join("key.pub")).unwrap();
    std::fs::write(p.ctx().join("msg"), "sign me\n").unwrap();
    give_to_test_user(&p.dir);
    run_checked(Command::new("chmod").arg("600").arg(&key));
    let ssh = format!("default={}", key.display());
    let (_, err) = ok(p.build(&["--progress", "plain", "--ssh", &ssh]));
    assert!(err.contains("signed 64"), "{err}");
    assert!(
        err.contains("asked its SSH agent for more than 64 signatures; 6 refused"),
        "{err}"
    );
}

/// The log data of rawjson (BuildKit's SolveStatus) lines, decoded.
fn decoded_logs(text: &str) -> String {
    use base64::Engine as _;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|e| e["logs"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| {
            base64::engine::general_purpose::STANDARD
                .decode(l["data"].as_str()?)
                .ok()
        })
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .collect()
}

#[test]
fn add_of_a_git_repository_over_ssh_uses_the_ssh_agent_and_known_hosts() {
    let p = Project::new("add-git-ssh", "FROM scratch\n");
    let (key, authorized) = client_key(&p.dir.join("keys"));
    // the repository the sshd's user serves with git-upload-pack
    let repo = p.dir.join("repo.git");
    std::fs::create_dir_all(&repo).unwrap();
    run_checked(
        Command::new("sh")
            .arg("-ec")
            .arg("git init -q -b main . && echo over-ssh > hello && git add hello && git -c user.name=k -c user.email=k@example.invalid commit -qm one")
            .current_dir(&repo),
    );
    // HOME holds the known_hosts kiln checks the server's key against
    let home = p.dir.join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let known = home.join(".ssh/known_hosts");
    std::fs::write(&known, "").unwrap();
    give_to_test_user(&p.dir);
    run_checked(Command::new("chmod").arg("600").arg(&key));
    let sshd = start_sshd(&p.dir.join("sshd"), &authorized);
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}#main",
        sshd.user,
        sshd.port,
        repo.display()
    );
    std::fs::write(
        p.ctx().join("Dockerfile"),
        format!("FROM scratch\nADD {url} /src/\n"),
    )
    .unwrap();
    let host_key = std::fs::read_to_string(p.dir.join("sshd/host_key.pub")).unwrap();
    let home_s = home.display().to_string();
    let key_s = format!("default={}", key.display());
    let local = p.local_out();
    let args = [
        "--network",
        "host",
        "--allow",
        "network.host",
        "--ssh",
        &key_s,
        "-o",
        &local,
    ];
    // an unknown host key is refused, never accepted on first use
    let err = failed(build_env(&p, &[("HOME", &home_s)], &args));
    assert!(err.contains("Host key verification failed"), "{err}");
    // without --ssh the error says what to give
    let err = failed(build_env(
        &p,
        &[("HOME", &home_s)],
        &["--network", "host", "--allow", "network.host"],
    ));
    assert!(err.contains("--ssh default"), "{err}");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}", sshd.port, host_key.trim()),
    )
    .unwrap();
    ok(build_env(&p, &[("HOME", &home_s)], &args));
    assert_eq!(p.out("src/hello"), "over-ssh\n");
    assert!(!p.dir.join("out/src/.git").exists());
}
