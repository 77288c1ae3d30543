//! End-to-end tests of kiln's state directory under real use, as the
//! unprivileged test user: concurrent builds on one state directory, a
//! build killed with SIGKILL mid-RUN, `kiln du` and `kiln prune`, and an
//! image kiln built read back by rootless podman.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_vm_tests::{busybox_rootfs, kiln, run_checked, test_dir};

/// A context with a busybox tree under `rootfs/` and any number of
/// Dockerfiles, and one state directory, all owned by the test user.
struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str, dockerfiles: &[(&str, &str)]) -> Project {
        let dir = test_dir(name);
        busybox_rootfs(&dir.join("ctx/rootfs"));
        for (file, text) in dockerfiles {
            fs::write(dir.join("ctx").join(file), text).unwrap();
        }
        let p = Project { dir };
        p.chown();
        p
    }

    fn chown(&self) {
        kiln_vm_tests::give_to_test_user(&self.dir);
    }

    fn ctx(&self) -> PathBuf {
        self.dir.join("ctx")
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// `kiln --root STATE ARGS...`
    fn kiln(&self, args: &[&str]) -> Command {
        let mut all: Vec<String> = vec!["--root".into(), p(&self.state()).into()];
        all.extend(args.iter().map(|s| s.to_string()));
        kiln(&all)
    }

    /// `kiln build -f FILE EXTRA... CTX`
    fn build_cmd(&self, file: &str, extra: &[&str]) -> Command {
        let f = self.ctx().join(file);
        let ctx = self.ctx();
        let mut args = vec!["build", "-f", p(&f)];
        args.extend(extra);
        args.push(p(&ctx));
        // the strings above live in this frame only: build the command now
        self.kiln(&args)
    }

    fn build(&self, file: &str, extra: &[&str]) -> (String, String) {
        ok(self
            .build_cmd(file, extra)
            .output()
            .expect("run kiln build"))
    }

    fn local(&self, name: &str) -> String {
        format!("type=local,dest={}", self.dir.join(name).display())
    }

    /// `kiln du --format json`
    fn du(&self) -> serde_json::Value {
        let (out, _) = ok(self
            .kiln(&["du", "--format", "json"])
            .output()
            .expect("run kiln du"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln du json: {e}\n{out}"))
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 test paths")
}

fn ok(o: Output) -> (String, String) {
    kiln_vm_tests::expect_success(o)
}

/// Entries of a directory (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

const BASE: &str = "FROM scratch AS base\nCOPY rootfs/ /\nRUN sleep 1 && echo base > /base\n\n";

#[test]
fn two_builds_on_one_state_dir_at_once_both_succeed() {
    let a = format!("{BASE}FROM base\nRUN echo a > /a\nCMD [\"cat\", \"/a\"]\n");
    let b = format!("{BASE}FROM base\nRUN echo b > /b\nCMD [\"cat\", \"/b\"]\n");
    let pr = Project::new(
        "state-concurrent",
        &[("Dockerfile.a", a.as_str()), ("Dockerfile.b", b.as_str())],
    );
    let (la, lb) = (pr.local("out-a"), pr.local("out-b"));
    let mut ca = pr.build_cmd(
        "Dockerfile.a",
        &["--progress", "plain", "-t", "conc-a", "-o", &la],
    );
    let mut cb = pr.build_cmd(
        "Dockerfile.b",
        &["--progress", "plain", "-t", "conc-b", "-o", &lb],
    );
    for c in [&mut ca, &mut cb] {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let (ha, hb) = (ca.spawn().unwrap(), cb.spawn().unwrap());
    let (oa, ob) = (
        ha.wait_with_output().unwrap(),
        hb.wait_with_output().unwrap(),
    );
    ok(oa);
    ok(ob);
    let out = pr.dir.join("out-a");
    assert_eq!(fs::read_to_string(out.join("a")).unwrap(), "a\n");
    assert_eq!(fs::read_to_string(out.join("base")).unwrap(), "base\n");
    let out = pr.dir.join("out-b");
    assert_eq!(fs::read_to_string(out.join("b")).unwrap(), "b\n");
    assert_eq!(fs::read_to_string(out.join("base")).unwrap(), "base\n");
    let (images, _) = ok(pr.kiln(&["images"]).output().unwrap());
    assert!(
        images.contains("conc-a") && images.contains("conc-b"),
        "{images}"
    );
    // both results are in the cache: rebuilding either runs nothing
    let (_, err) = pr.build("Dockerfile.a", &["--progress", "plain", "-t", "conc-a"]);
    assert!(err.contains("0 steps run"), "{err}");
    let (_, err) = pr.build("Dockerfile.b", &["--progress", "plain"]);
    assert!(err.contains("0 steps run"), "{err}");
}

#[test]
fn a_build_killed_mid_run_leaves_a_usable_state_dir() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN echo before > /before\nRUN echo long-run-started && sleep 8 && echo done > /long\nCMD [\"cat\", \"/long\"]\n";
    let pr = Project::new("state-kill", &[("Dockerfile", df)]);
    let log = pr.dir.join("killed.log");
    let file = fs::File::create(&log).unwrap();
    let mut cmd = pr.build_cmd("Dockerfile", &["--progress", "plain", "-t", "killed"]);
    cmd.stdout(Stdio::null()).stderr(file);
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains("long-run-started") {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the build ended before the long RUN: {status:?}\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the long RUN never started:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL: no destructor, no cleanup runs
    child.kill().unwrap();
    child.wait().unwrap();
    // let the step's sandbox notice its parent is gone
    std::thread::sleep(Duration::from_millis(500));

    // The store reads fine and holds no image of the killed build.
    let (images, _) = ok(pr.kiln(&["images"]).output().unwrap());
    assert!(!images.contains("killed"), "{images}");
    // The same build again: the RUN before the kill is cached, the killed
    // one runs to the end.
    let (_, err) = pr.build(
        "Dockerfile",
        &[
            "--progress",
            "plain",
            "-t",
            "killed",
            "-o",
            &pr.local("out"),
        ],
    );
    assert!(err.contains("long-run-started"), "{err}");
    assert!(err.contains("1 steps run"), "{err}");
    assert_eq!(
        fs::read_to_string(pr.dir.join("out/long")).unwrap(),
        "done\n"
    );
    assert_eq!(
        fs::read_to_string(pr.dir.join("out/before")).unwrap(),
        "before\n"
    );
    let (images, _) = ok(pr.kiln(&["images"]).output().unwrap());
    assert!(images.contains("killed"), "{images}");
    // nothing half-written is left: no view, no scratch layer, no
    // half-written cache record
    let snaps = pr.state().join("snapshots");
    assert_eq!(entries(&snaps.join("views")), Vec::<String>::new());
    assert_eq!(entries(&snaps.join("tmp")), Vec::<String>::new());
    let cache = entries(&pr.state().join("cache"));
    assert!(cache.iter().all(|n| n.ends_with(".json")), "{cache:?}");
    // and a rebuild is all cached
    let (_, err) = pr.build("Dockerfile", &["--progress", "plain"]);
    assert!(err.contains("0 steps run"), "{err}");
    ok(pr.kiln(&["du"]).output().unwrap());
}

#[test]
fn prune_frees_the_cache_and_keeps_tagged_images_usable() {
    let kept = "FROM scratch\nCOPY rootfs/ /\nRUN echo one > /one\nCMD [\"cat\", \"/one\"]\n";
    // a build whose layers only the cache holds
    let loose = "FROM scratch\nCOPY rootfs/ /\nRUN head -c 16 /dev/urandom | od -An -tx1 > /stamp && head -c 2000000 /dev/zero > /zeros\n";
    let on_top = "FROM kept\nRUN cat /one > /two\n";
    let pr = Project::new(
        "state-prune",
        &[
            ("Dockerfile.kept", kept),
            ("Dockerfile.loose", loose),
            ("Dockerfile.on-top", on_top),
        ],
    );
    pr.build("Dockerfile.kept", &["--progress", "plain", "-t", "kept"]);
    pr.build(
        "Dockerfile.loose",
        &["--progress", "plain", "-o", &pr.local("loose1")],
    );
    let stamp1 = fs::read(pr.dir.join("loose1/stamp")).unwrap();
    let before = pr.du();
    let cache_before = before["build_cache"]["size"].as_u64().unwrap();
    let layers_before = before["layers"]["size"].as_u64().unwrap();
    assert!(cache_before > 2_000_000, "{before}");
    // COPY (shared by both), two RUNs
    assert_eq!(before["build_cache"]["total"], 3, "{before}");
    // the tagged image holds the layers of two of them
    assert_eq!(before["build_cache"]["active"], 2, "{before}");
    assert!(before["build_cache"]["reclaimable"].as_u64().unwrap() > 2_000_000);
    assert_eq!(before["cache_mounts"]["size"], 0, "{before}");
    let (table, _) = ok(pr.kiln(&["du"]).output().unwrap());
    for row in ["Images", "Layers", "Build Cache", "Cache Mounts"] {
        assert!(table.contains(row), "{table}");
    }

    // keep-duration protects what was just used
    ok(pr
        .kiln(&["prune", "--keep-duration", "1h"])
        .output()
        .unwrap());
    assert_eq!(pr.du()["build_cache"]["size"], cache_before);
    // and keep-storage above the cache's size keeps it all
    ok(pr
        .kiln(&["prune", "--keep-storage", "10GB"])
        .output()
        .unwrap());
    assert_eq!(pr.du()["build_cache"]["size"], cache_before);

    let (out, _) = ok(pr.kiln(&["prune"]).output().unwrap());
    assert!(out.contains("Total reclaimed space"), "{out}");
    let after = pr.du();
    let cache_after = after["build_cache"]["size"].as_u64().unwrap();
    let layers_after = after["layers"]["size"].as_u64().unwrap();
    assert!(
        cache_after < cache_before && layers_after < layers_before,
        "before: {before}\nafter: {after}"
    );
    assert!(
        layers_before - layers_after > 1_000_000,
        "{before}\n{after}"
    );
    assert_eq!(after["images"]["total"], 1, "{after}");
    assert_eq!(after["build_cache"]["total"], 2, "{after}");
    assert_eq!(after["build_cache"]["reclaimable"], 0, "{after}");

    // The tagged image is whole: FROM it works, and so does a local export.
    pr.build(
        "Dockerfile.on-top",
        &["--progress", "plain", "-o", &pr.local("on-top")],
    );
    assert_eq!(
        fs::read_to_string(pr.dir.join("on-top/two")).unwrap(),
        "one\n"
    );
    assert!(pr.dir.join("on-top/bin/busybox").exists());
    ok(pr
        .kiln(&["save", "kept", "--output", &pr.local("saved")])
        .output()
        .unwrap());
    assert_eq!(
        fs::read_to_string(pr.dir.join("saved/one")).unwrap(),
        "one\n"
    );
    // The image's own steps are still cached; the freed RUN runs again.
    let (_, err) = pr.build("Dockerfile.kept", &["--progress", "plain", "-t", "kept"]);
    assert!(err.contains("0 steps run"), "{err}");
    let (_, err) = pr.build(
        "Dockerfile.loose",
        &["--progress", "plain", "-o", &pr.local("loose2")],
    );
    assert!(err.contains("1 steps run"), "{err}");
    assert_ne!(fs::read(pr.dir.join("loose2/stamp")).unwrap(), stamp1);

    // the records the image's layers keep stayed; --all drops them too,
    // and still keeps the named image whole
    ok(pr.kiln(&["prune", "--all"]).output().unwrap());
    let all = pr.du();
    assert_eq!(all["build_cache"]["total"], 0, "{all}");
    assert_eq!(all["images"]["total"], 1, "{all}");
    ok(pr
        .kiln(&["save", "kept", "--output", &pr.local("saved2")])
        .output()
        .unwrap());
    assert!(pr.dir.join("saved2/one").exists());
}

fn podman(dir: &Path, args: &[&str]) -> Output {
    kiln_vm_tests::podman(dir, "pst", args)
}

#[test]
fn a_built_image_runs_in_rootless_podman() {
    assert!(
        Path::new("/usr/bin/podman").exists(),
        "podman is missing: run scripts/setup-host.sh (apt-get install podman runc)"
    );
    let df =
        "FROM scratch\nCOPY rootfs/ /\nRUN echo made by kiln > /msg\nCMD [\"cat\", \"/msg\"]\n";
    let pr = Project::new("state-podman", &[("Dockerfile", df)]);
    let archive = pr.dir.join("image.tar");
    pr.build(
        "Dockerfile",
        &[
            "--progress",
            "quiet",
            "-o",
            &format!(
                "type=docker,dest={},name=localhost/kiln-built:v1",
                p(&archive)
            ),
        ],
    );
    let out = podman(&pr.dir, &["load", "-i", p(&archive)]);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success() && text(&out.stdout).contains("localhost/kiln-built:v1"),
        "podman load: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // crun refuses this host's hybrid cgroups: runc with cgroupfs first
    let attempts: [&[&str]; 3] = [
        &["--runtime", "runc", "run", "--rm"],
        &["run", "--rm"],
        &["--runtime", "runc", "run", "--rm", "--cgroups=disabled"],
    ];
    let mut errors = Vec::new();
    for a in attempts {
        let mut args = a.to_vec();
        args.push("localhost/kiln-built:v1");
        let out = podman(&pr.dir, &args);
        if out.status.success() {
            assert_eq!(text(&out.stdout), "made by kiln\n");
            kiln_vm_tests::remove_tree(&kiln_vm_tests::podman_runroot("pst"));
            return;
        }
        errors.push(format!("podman {args:?}: {}", text(&out.stderr)));
    }
    kiln_vm_tests::remove_tree(&kiln_vm_tests::podman_runroot("pst"));
    panic!("podman run failed:\n{}", errors.join("\n"));
}

#[test]
fn prune_during_a_build_takes_nothing_the_build_uses() {
    let first = "FROM scratch\nCOPY rootfs/ /\nRUN echo first > /first\n";
    let second = "FROM scratch\nCOPY rootfs/ /\nRUN echo first > /first\nRUN echo started && sleep 3 && echo second > /second\nCMD [\"cat\", \"/second\"]\n";
    let pr = Project::new(
        "state-prune-race",
        &[("Dockerfile.first", first), ("Dockerfile.second", second)],
    );
    // cache records the second build will hit, held by no image
    pr.build("Dockerfile.first", &["--progress", "plain"]);
    let log = pr.dir.join("second.log");
    let mut cmd = pr.build_cmd(
        "Dockerfile.second",
        &["--progress", "plain", "-t", "second"],
    );
    cmd.stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("started")
    {
        assert!(child.try_wait().unwrap().is_none(), "build ended early");
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(50));
    }
    // everything not in use goes, repeatedly, while the RUN runs
    while child.try_wait().unwrap().is_none() {
        ok(pr.kiln(&["prune", "--all"]).output().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    ok(pr.kiln(&["prune", "--all"]).output().unwrap());
    ok(pr
        .kiln(&["save", "second", "--output", &pr.local("out")])
        .output()
        .unwrap());
    assert_eq!(
        fs::read_to_string(pr.dir.join("out/second")).unwrap(),
        "second\n"
    );
    assert_eq!(
        fs::read_to_string(pr.dir.join("out/first")).unwrap(),
        "first\n"
    );
}

#[test]
fn a_killed_build_leaves_no_step_running() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN echo long-run-started && sleep 37\n";
    let pr = Project::new("state-kill-orphan", &[("Dockerfile", df)]);
    let log = pr.dir.join("killed.log");
    let mut cmd = pr.build_cmd("Dockerfile", &["--progress", "plain"]);
    cmd.stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("long-run-started")
    {
        assert!(child.try_wait().unwrap().is_none(), "build ended early");
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let left = kiln_vm_tests::sleepers("37");
    for pid in &left {
        // SAFETY: plain kill of a pid this test's build started.
        unsafe { libc::kill(i32::try_from(*pid).unwrap(), libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "the killed build's RUN still runs: {left:?}"
    );
}

/// Set every cache record's last use to `ago` (a `touch -d` date).
fn age_records(pr: &Project, ago: &str) {
    for name in entries(&pr.state().join("cache")) {
        run_checked(
            Command::new("touch")
                .arg("-d")
                .arg(ago)
                .arg(pr.state().join("cache").join(name)),
        );
    }
}

#[test]
fn keep_storage_and_keep_duration_free_the_least_recently_used() {
    let x = "FROM scratch\nCOPY rootfs/ /\nRUN head -c 2000000 /dev/urandom > /x\n";
    let y = "FROM scratch\nCOPY rootfs/ /\nRUN head -c 2000000 /dev/urandom > /y\n";
    let pr = Project::new("state-keep", &[("Dockerfile.x", x), ("Dockerfile.y", y)]);
    let steps_run = |file: &str| {
        let (_, err) = pr.build(file, &["--progress", "plain"]);
        err.lines()
            .find(|l| l.contains("steps run"))
            .map(String::from)
            .unwrap_or(err)
    };
    steps_run("Dockerfile.x");
    steps_run("Dockerfile.y");
    // x's records are old; a rebuild of y uses (and so refreshes) y's and
    // the shared COPY
    age_records(&pr, "3 hours ago");
    assert!(steps_run("Dockerfile.y").contains("0 steps run"));

    // keep-storage just under the cache size: only the least recently used
    // record (x's RUN: a 2 MB unpacked layer; its plain blob is made only
    // when something reads it) goes
    let size = pr.du()["build_cache"]["size"].as_u64().unwrap();
    let keep = (size - 1_000_000).to_string();
    ok(pr
        .kiln(&["prune", "--keep-storage", &keep])
        .output()
        .unwrap());
    let after = pr.du()["build_cache"]["size"].as_u64().unwrap();
    assert!(after <= size - 1_900_000, "{size} -> {after}");
    assert!(steps_run("Dockerfile.y").contains("0 steps run"));
    assert!(steps_run("Dockerfile.x").contains("1 steps run"));

    // keep-duration: what was used within it stays
    age_records(&pr, "3 hours ago");
    assert!(steps_run("Dockerfile.y").contains("0 steps run"));
    ok(pr
        .kiln(&["prune", "--keep-duration", "1h"])
        .output()
        .unwrap());
    assert!(steps_run("Dockerfile.y").contains("0 steps run"));
    assert!(steps_run("Dockerfile.x").contains("1 steps run"));
    // nothing older than 30m now: all stays
    ok(pr
        .kiln(&["prune", "--keep-duration", "30m"])
        .output()
        .unwrap());
    assert!(steps_run("Dockerfile.x").contains("0 steps run"));
}

#[test]
fn kill_at_any_moment_then_the_build_succeeds() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN head -c 30000000 /dev/urandom > /big && mkdir /many && for i in $(seq 1 300); do echo $i > /many/$i; done\nRUN echo after > /after\nCMD [\"cat\", \"/after\"]\n";
    let pr = Project::new("state-kill-any", &[("Dockerfile", df)]);
    // SIGKILL after each delay: during COPY, RUN, commit, the next step
    for ms in [150u64, 400, 800, 1300, 2000, 3000] {
        let mut child = pr
            .build_cmd("Dockerfile", &["--progress", "quiet", "-t", "any"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill();
        child.wait().unwrap();
        ok(pr.kiln(&["images"]).output().unwrap());
        ok(pr.kiln(&["du"]).output().unwrap());
    }
    pr.build(
        "Dockerfile",
        &["--progress", "plain", "-t", "any", "-o", &pr.local("out")],
    );
    assert_eq!(
        fs::read_to_string(pr.dir.join("out/after")).unwrap(),
        "after\n"
    );
    assert_eq!(
        fs::metadata(pr.dir.join("out/big")).unwrap().len(),
        30_000_000
    );
    assert_eq!(entries(&pr.dir.join("out/many")).len(), 300);
    let (_, err) = pr.build("Dockerfile", &["--progress", "plain"]);
    assert!(err.contains("0 steps run"), "{err}");
    let snaps = pr.state().join("snapshots");
    assert_eq!(entries(&snaps.join("views")), Vec::<String>::new());
    assert_eq!(entries(&snaps.join("tmp")), Vec::<String>::new());
}

/// The media types of the layers of the manifest `digest` in the OCI
/// layout (or content store) at `layout`.
fn layer_types(layout: &Path, digest: &str) -> Vec<String> {
    let hex = digest.trim_start_matches("sha256:");
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap();
    kiln_vm_tests::layer_media_types(&m)
}

#[test]
fn builds_store_plain_layers_and_outputs_compress_them_once() {
    let df = "FROM scratch\nCOPY rootfs/ /\nRUN head -c 300000 /dev/zero > /zeros\n";
    let pr = Project::new("state-lazy", &[("Dockerfile", df)]);
    // the stored image: no step waited for a compressor
    pr.build("Dockerfile", &["-t", "lazy"]);
    let content = pr.state().join("snapshots/content");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(content.join("index.json")).unwrap()).unwrap();
    let stored = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .is_some_and(|n| n.ends_with("lazy:latest"))
        })
        .expect("the image is stored")["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let plain = "application/vnd.oci.image.layer.v1.tar";
    assert_eq!(layer_types(&content, &stored), [plain, plain]);
    // an OCI export sends them gzip-compressed, as BuildKit does
    let export = |dir: &str, extra: &str| -> (PathBuf, String) {
        let out = pr.dir.join(dir);
        let spec = format!("type=oci,dest={}/,name=lazy{extra}", out.display());
        pr.build("Dockerfile", &["-o", &spec]);
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        (out, digest)
    };
    let (oci, exported) = export("out-oci", "");
    let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
    assert_eq!(layer_types(&oci, &exported), [gzip, gzip]);
    // the gzip variants are kept: a second export makes no new blob
    let blobs = || entries(&content.join("blobs/sha256")).len();
    let before = blobs();
    assert_eq!(export("out-oci2", "").1, exported);
    assert_eq!(blobs(), before, "the second export compressed again");
    // asked for, zstd works end to end
    let (oci3, z) = export("out-zstd", ",compression=zstd");
    let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
    assert_eq!(layer_types(&oci3, &z), [zstd, zstd]);
    // a prune keeps the variants of what it keeps, and the store stays
    // consistent: the image still exports to the same digest
    ok(pr.kiln(&["prune"]).output().unwrap());
    assert_eq!(export("out-oci4", "").1, exported);
}
