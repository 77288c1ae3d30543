//! End-to-end tests of what a long-lived runner or a shared build host
//! needs, as the unprivileged test user: the automatic GC after builds,
//! kiln.toml (precedence, errors, `kiln info`), per-step time limits and
//! rlimits, and the refusal of a state directory other users could change.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_vm_tests::{
    busybox_rootfs, expect_failure, expect_success, kiln_binary, stage_file, test_dir, unprivileged,
};

/// A context (busybox under `rootfs/`, Dockerfiles), a state directory and
/// a kiln.toml, all owned by the test user; every kiln run reads that
/// kiln.toml through `$KILN_CONFIG`.
struct Runner {
    dir: PathBuf,
}

impl Runner {
    fn new(name: &str, dockerfiles: &[(&str, &str)], config: &str) -> Runner {
        let dir = test_dir(name);
        busybox_rootfs(&dir.join("ctx/rootfs"));
        for (file, text) in dockerfiles {
            fs::write(dir.join("ctx").join(file), text).unwrap();
        }
        kiln_vm_tests::give_to_test_user(&dir);
        let r = Runner { dir };
        r.config(config);
        r
    }

    /// Write kiln.toml (mode 0644, the test user's); only that file is
    /// touched, never the state directory's owners or modes.
    fn config(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join("kiln.toml");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        if kiln_vm_tests::running_as_root() {
            let (uid, gid) = kiln_vm_tests::test_ids();
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// `KILN_CONFIG=DIR/kiln.toml kiln --root STATE ARGS...` (setpriv
    /// resets the environment, so the variable goes through env(1))
    fn kiln(&self, args: &[&str]) -> Command {
        let mut cmd = unprivileged(Path::new("/usr/bin/env"));
        cmd.arg(format!(
            "KILN_CONFIG={}",
            self.dir.join("kiln.toml").display()
        ))
        .arg(stage_file(&kiln_binary()))
        .arg("--root")
        .arg(self.state())
        .args(args);
        cmd
    }

    fn build_cmd(&self, file: &str, extra: &[&str]) -> Command {
        let f = self.dir.join("ctx").join(file);
        let ctx = self.dir.join("ctx");
        let mut args = vec!["build", "--progress", "plain", "-f", s(&f)];
        args.extend(extra);
        args.push(s(&ctx));
        self.kiln(&args)
    }

    fn build(&self, file: &str, extra: &[&str]) -> Output {
        self.build_cmd(file, extra)
            .output()
            .expect("run kiln build")
    }

    fn info(&self) -> serde_json::Value {
        let (out, _) = expect_success(self.kiln(&["info", "--format", "json"]).output().unwrap());
        serde_json::from_str(&out).unwrap()
    }

    fn gc_record(&self) -> Option<serde_json::Value> {
        let text = fs::read(self.state().join("gc.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// A file of the context, readable by the test user.
fn write_ctx(r: &Runner, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = r.dir.join("ctx").join(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test paths")
}

/// The setting `key` of `kiln info --format json`: (value, from, enforced).
fn setting(info: &serde_json::Value, key: &str) -> (String, String) {
    let row = info["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .unwrap_or_else(|| panic!("no setting {key}: {info}"));
    (
        row["value"].as_str().unwrap().to_string(),
        row["from"].as_str().unwrap().to_string(),
    )
}

/// A stage writing `mb` MB of random data to `/NAME`.
fn filler(name: &str, mb: u32) -> String {
    format!(
        "FROM scratch\nCOPY rootfs/ /\nRUN head -c {} /dev/urandom > /{name}\n",
        mb * 1_000_000
    )
}

fn steps_run(o: Output) -> String {
    let (_, err) = expect_success(o);
    err.lines()
        .find(|l| l.contains("steps run"))
        .map_or(err.clone(), String::from)
}

#[test]
fn automatic_gc_keeps_the_state_under_its_limit_and_named_images_whole() {
    let files: Vec<(String, String)> = (0..5)
        .map(|i| (format!("Dockerfile.{i}"), filler(&format!("f{i}"), 2)))
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let r = Runner::new("gc-auto", &refs, "gc = false\n");
    // a named image and four builds whose layers only the cache holds
    steps_run(r.build("Dockerfile.0", &["-t", "keep:1"]));
    for i in 1..5 {
        let out = format!("type=local,dest={}/out{i}", r.dir.display());
        steps_run(r.build(&format!("Dockerfile.{i}"), &["-o", &out]));
    }
    assert!(r.gc_record().is_none(), "gc = false: no collection ran");
    let (du, _) = expect_success(r.kiln(&["du", "--format", "json"]).output().unwrap());
    let du: serde_json::Value = serde_json::from_str(&du).unwrap();
    let on_disk = du["on_disk"].as_u64().unwrap();
    assert!(on_disk > 10_000_000, "{du}");
    assert_eq!(du["gc"]["enabled"], false);

    // limit 6 MB: the next build's collector must bring the state under it
    r.config("gc-keep-storage = \"6MB\"\n");
    let t = Instant::now();
    let out = r.build(
        "Dockerfile.4",
        &["-o", &format!("type=local,dest={}/again", r.dir.display())],
    );
    let reported = t.elapsed();
    steps_run(out);
    let record = loop {
        if let Some(rec) = r.gc_record() {
            break rec;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no collection ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(record["error"], serde_json::Value::Null, "{record}");
    assert!(record["removed"].as_u64().unwrap() >= 1, "{record}");
    let after = record["after"].as_u64().unwrap();
    assert!(after <= 6 << 20, "{record}");
    // the build did not wait for it: its result came first
    assert!(reported < Duration::from_secs(30));
    // `kiln du` shows the policy and the run
    let (text, _) = expect_success(r.kiln(&["du"]).output().unwrap());
    assert!(
        text.contains("Automatic GC: after each build, when over 6.29MB")
            && text.contains("last ran"),
        "{text}"
    );
    // the named image and the records it holds survive
    assert!(steps_run(r.build("Dockerfile.0", &["-t", "keep:1"])).contains("0 steps run"));
    let (out, _) = expect_success(
        r.kiln(&["run", "keep:1", "--", "wc", "-c", "/f0"])
            .output()
            .unwrap(),
    );
    assert!(out.contains("2000000"), "{out}");
    // a collected step runs again
    let outdir = format!("type=local,dest={}/again2", r.dir.display());
    assert!(steps_run(r.build("Dockerfile.1", &["-o", &outdir])).contains("1 steps run"));
}

#[test]
fn a_collection_during_a_build_leaves_the_build_whole() {
    let slow = "FROM scratch\nCOPY rootfs/ /\nRUN head -c 3000000 /dev/urandom > /a && sleep 3 && echo done > /b\nRUN cat /b\n";
    let files: Vec<(String, String)> = (0..3)
        .map(|i| (format!("Dockerfile.{i}"), filler(&format!("g{i}"), 2)))
        .collect();
    let mut refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    refs.push(("Dockerfile.slow", slow));
    let r = Runner::new("gc-concurrent", &refs, "gc = false\n");
    for i in 0..3 {
        let out = format!("type=local,dest={}/o{i}", r.dir.display());
        steps_run(r.build(&format!("Dockerfile.{i}"), &["-o", &out]));
    }
    // a limit of 1 byte: everything a build does not hold goes
    r.config("gc = false\ngc-keep-storage = \"1\"\n");
    let build = r
        .build_cmd("Dockerfile.slow", &["-t", "slow:1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut removed = 0;
    for _ in 0..3 {
        expect_success(r.kiln(&["prune", "--auto"]).output().unwrap());
        let rec = r.gc_record().expect("prune --auto records its run");
        assert_eq!(rec["error"], serde_json::Value::Null, "{rec}");
        removed += rec["removed"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(removed >= 3, "the earlier builds' records went: {removed}");
    let out = build.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (txt, _) = expect_success(
        r.kiln(&["run", "slow:1", "--", "cat", "/b"])
            .output()
            .unwrap(),
    );
    assert_eq!(txt, "done\n");
}

#[test]
fn settings_come_from_kiln_toml_under_the_command_line() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN echo hi\n";
    let r = Runner::new(
        "config-layers",
        &[("Dockerfile", df)],
        "network = \"none\"\njobs = 3\n[limits]\nstep-timeout = \"10m\"\nnofile = \"512:1024\"\n",
    );
    let info = r.info();
    let file = s(&r.dir.join("kiln.toml")).to_string();
    assert_eq!(setting(&info, "network"), ("none".into(), file.clone()));
    assert_eq!(setting(&info, "jobs"), ("3".into(), file.clone()));
    assert_eq!(
        setting(&info, "limits.step-timeout"),
        ("600s".into(), file.clone())
    );
    assert_eq!(
        setting(&info, "limits.core"),
        ("0:0".into(), "default".into())
    );
    assert_eq!(setting(&info, "gc"), ("true".into(), "default".into()));
    let (text, _) = expect_success(r.kiln(&["info"]).output().unwrap());
    assert!(
        text.contains("Step limits: rlimits only") && text.contains(&format!("(from {file})")),
        "{text}"
    );

    // the file's rlimits reach the step; --ulimit wins over them
    let limits = "FROM scratch\nCOPY rootfs/ /\nRUN echo nofile=$(ulimit -n) core=$(ulimit -c)\n";
    write_ctx(&r, "Dockerfile.limits", limits);
    let (_, err) = expect_success(r.build("Dockerfile.limits", &[]));
    assert!(err.contains("nofile=512 core=0"), "{err}");
    let (_, err) = expect_success(r.build("Dockerfile.limits", &["--ulimit", "nofile=256:1024"]));
    assert!(err.contains("nofile=256 core=0"), "{err}");

    // network = "none" is the build's default: a step asking for the
    // sandbox network cannot raise it; --network on the command line wins
    let net = "FROM scratch\nCOPY rootfs/ /\nRUN --network=sandbox true\n";
    write_ctx(&r, "Dockerfile.net", net);
    let err = expect_failure(r.build("Dockerfile.net", &[]));
    assert!(err.contains("network"), "{err}");
    expect_success(r.build("Dockerfile.net", &["--network", "sandbox"]));

    // errors name the key and the file
    r.config("netwrok = \"none\"\n");
    let err = expect_failure(r.build("Dockerfile", &[]));
    assert!(err.contains(&file) && err.contains("netwrok"), "{err}");
    r.config("[limits]\nstep-timeout = \"soon\"\n");
    let err = expect_failure(r.kiln(&["info"]).output().unwrap());
    assert!(
        err.contains(&file) && err.contains("limits.step-timeout"),
        "{err}"
    );
    r.config("[[registry]]\nlocation = \"r.example\"\nblocked = true\n");
    let err = expect_failure(r.kiln(&["pull", "r.example/x:1"]).output().unwrap());
    assert!(err.contains(&file) && err.contains("blocked"), "{err}");
    // $KILN_CONFIG naming a missing file is an error, not no config
    fs::remove_file(r.dir.join("kiln.toml")).unwrap();
    let err = expect_failure(r.kiln(&["info"]).output().unwrap());
    assert!(
        err.contains("cannot read the config") && err.contains(&file),
        "{err}"
    );
}

#[test]
fn a_step_past_its_timeout_is_killed_with_its_grandchildren() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN echo started; (sleep 3071 &); sleep 3072 & sleep 3073; echo never\n";
    let r = Runner::new("step-timeout", &[("Dockerfile", df)], "");
    let t = Instant::now();
    let err = expect_failure(r.build("Dockerfile", &["--step-timeout", "2s"]));
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(
        err.contains("RUN echo started")
            && err.contains(
                "ran past --step-timeout 2s and was killed with every process it started"
            ),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    for secs in ["3071", "3072", "3073"] {
        assert!(
            kiln_vm_tests::sleepers(secs).is_empty(),
            "sleep {secs} survived the step"
        );
    }
    // from kiln.toml as well
    r.config("[limits]\nstep-timeout = \"1s\"\n");
    let err = expect_failure(r.build("Dockerfile", &[]));
    assert!(err.contains("--step-timeout 1s"), "{err}");
    // the build's own limit
    r.config("");
    let err = expect_failure(r.build("Dockerfile", &["--timeout", "3s"]));
    assert!(err.contains("--timeout 3s (the build's)"), "{err}");
    for secs in ["3071", "3072", "3073"] {
        assert!(
            kiln_vm_tests::sleepers(secs).is_empty(),
            "sleep {secs} survived the build"
        );
    }
    // work that is not a RUN step (here: waiting for a context on
    // standard input that never comes) is stopped by the build's limit too
    let t = Instant::now();
    let mut child = r
        .kiln(&["build", "--timeout", "1s", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success() && t.elapsed() < Duration::from_secs(30));
    assert!(
        err.contains("ran past --timeout 1s and was stopped"),
        "{err}"
    );
}

#[test]
fn a_fork_bomb_is_stopped_by_nproc() {
    // the limit is checked before the bomb goes off: without it the bomb
    // would take the whole host's share of the test user
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN echo limit=$(ulimit -u); [ $(ulimit -u) = 64 ] || exit 9; bomb() { bomb | bomb & }; bomb; sleep 2; echo survived-the-bomb\n";
    let r = Runner::new("nproc", &[("Dockerfile", df)], "[limits]\nnproc = 64\n");
    let (_, err) = expect_success(r.build("Dockerfile", &["--step-timeout", "60s"]));
    assert!(
        err.contains("limit=64") && err.contains("survived-the-bomb"),
        "{err}"
    );
    assert!(
        err.contains("can't fork"),
        "the bomb never hit the limit: {err}"
    );
}

#[test]
fn limits_kiln_cannot_enforce_here_are_refused() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN true\n";
    let r = Runner::new("cgroup-limits", &[("Dockerfile", df)], "");
    // where the host delegates cgroups these flags work (cgroup_limits.rs
    // tests that in a VM); this test is about a host that does not
    let (info, _) = expect_success(r.kiln(&["info"]).output().unwrap());
    if !info.contains("Step limits: rlimits only") {
        kiln_vm_tests::missing_prerequisite(
            "this host delegates cgroup v2 controllers: no refusal to test here",
        );
        return;
    }
    for (flag, value) in [("--memory", "1g"), ("--pids-limit", "100"), ("--cpus", "1")] {
        let err = expect_failure(r.build("Dockerfile", &[flag, value]));
        assert!(
            err.contains("cannot enforce") && err.contains(flag) && err.contains("rlimits only"),
            "{flag}: {err}"
        );
    }
    r.config("[limits]\nmemory = \"1GB\"\n");
    let err = expect_failure(r.build("Dockerfile", &[]));
    assert!(err.contains("limits.memory (from"), "{err}");
}

#[test]
fn a_state_directory_other_users_can_change_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN true\n";
    let r = Runner::new("shared-root", &[("Dockerfile", df)], "");
    expect_success(r.kiln(&["images"]).output().unwrap());
    fs::set_permissions(r.state(), fs::Permissions::from_mode(0o777)).unwrap();
    let err = expect_failure(r.build("Dockerfile", &[]));
    assert!(
        err.contains(s(&r.state())) && err.contains("mode 0777") && err.contains("chmod go-w"),
        "{err}"
    );
    fs::set_permissions(r.state(), fs::Permissions::from_mode(0o700)).unwrap();
    // a parent another user can write into could replace it
    fs::set_permissions(&r.dir, fs::Permissions::from_mode(0o777)).unwrap();
    let err = expect_failure(r.kiln(&["images"]).output().unwrap());
    assert!(
        err.contains(&format!("{} is writable by other users", r.dir.display())),
        "{err}"
    );
    fs::set_permissions(&r.dir, fs::Permissions::from_mode(0o755)).unwrap();
    expect_success(r.kiln(&["images"]).output().unwrap());
    // a config file others can write is refused the same way
    fs::set_permissions(r.dir.join("kiln.toml"), fs::Permissions::from_mode(0o666)).unwrap();
    let err = expect_failure(r.kiln(&["images"]).output().unwrap());
    assert!(
        err.contains("kiln.toml is writable by other users"),
        "{err}"
    );
}

#[test]
fn kilns_own_rlimit_defaults_do_not_split_the_cache_between_hosts() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN echo nproc=$(ulimit -u)\n";
    let r = Runner::new("default-ulimits-key", &[("Dockerfile", df)], "");
    let (_, err) = expect_success(r.build("Dockerfile", &[]));
    assert!(err.contains("nproc=8192"), "{err}");
    // the same build where the caller's own hard limit is lower (a small
    // VM): kiln's default nproc is lowered to it, and the step still hits
    // the cache the first build made
    let out = unprivileged(Path::new("/usr/bin/prlimit"))
        .args(["--nproc=4000:4000", "--", "/usr/bin/env"])
        .arg(format!("KILN_CONFIG={}", r.dir.join("kiln.toml").display()))
        .arg(stage_file(&kiln_binary()))
        .arg("--root")
        .arg(r.state())
        .args(["build", "--progress", "plain"])
        .arg(r.dir.join("ctx"))
        .output()
        .unwrap();
    assert!(steps_run(out).contains("0 steps run"));
}
