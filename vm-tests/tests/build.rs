//! End-to-end tests of `kiln build`, run as the unprivileged test user:
//! stages, caching, parallelism and interop of the result.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_vm_tests::{busybox_rootfs, kiln, run_checked, test_dir};

/// A context directory with a busybox tree under `rootfs/`, and a state
/// directory, both owned by the test user.
struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str, dockerfile: &str) -> Project {
        let dir = test_dir(name);
        busybox_rootfs(&dir.join("ctx/rootfs"));
        std::fs::write(dir.join("ctx/Dockerfile"), dockerfile).unwrap();
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

    fn build_in(&self, state: &str, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "--root".into(),
            self.dir.join(state).display().to_string(),
            "build".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.ctx().display().to_string());
        kiln(&args).output().expect("run kiln build")
    }

    fn build(&self, extra: &[&str]) -> Output {
        self.build_in("state", extra)
    }
}

fn ok(o: Output) -> (String, String) {
    kiln_vm_tests::expect_success(o)
}

const STAGES: &str = r#"FROM scratch AS base
COPY rootfs/ /
ENV GREETING=hello
WORKDIR /app
RUN echo "$GREETING from $(id -u)" > greeting

FROM base AS other
RUN echo other > /other

FROM base AS unused
RUN echo this must never run && exit 1

FROM base
COPY --from=other /other /copied
RUN cat /copied /app/greeting > /result
CMD ["cat", "/result"]
"#;

#[test]
fn stages_build_and_unused_ones_never_run() {
    let p = Project::new("build-stages", STAGES);
    let out = p.dir.join("out");
    let (_, err) = ok(p.build(&[
        "--progress",
        "plain",
        "-t",
        "stages",
        "-o",
        &format!("type=local,dest={}", out.display()),
    ]));
    assert!(!err.contains("this must never run"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("result")).unwrap(),
        "other\nhello from 0\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("app/greeting")).unwrap(),
        "hello from 0\n"
    );
    // The stored image runs its CMD in kiln's sandbox, or a given command.
    let state = p.dir.join("state").display().to_string();
    let (printed, _) = ok(kiln(["--root", &state, "run", "stages"]).output().unwrap());
    assert_eq!(printed, "other\nhello from 0\n");
    let (printed, _) = ok(kiln([
        "--root",
        &state,
        "run",
        "stages",
        "--",
        "sh",
        "-c",
        "pwd; echo $GREETING",
    ])
    .output()
    .unwrap());
    assert_eq!(printed, "/app\nhello\n");
}

#[test]
fn rebuild_runs_nothing_and_a_changed_byte_reruns_only_its_dependents() {
    let p = Project::new(
        "build-cache",
        "FROM scratch\nCOPY rootfs/ /\nCOPY a.txt /a.txt\nRUN date +%s%N > /stamp\nCOPY b.txt /b.txt\nRUN cat /b.txt > /b-copy\n",
    );
    std::fs::write(p.ctx().join("a.txt"), "a").unwrap();
    std::fs::write(p.ctx().join("b.txt"), "b").unwrap();
    p.chown();
    let local = |n: &str| format!("type=local,dest={}", p.dir.join(n).display());
    let (digest1, err1) = ok(p.build(&["--progress", "plain", "-o", &local("o1")]));
    assert!(err1.contains("2 steps run"), "{err1}");
    let stamp1 = std::fs::read(p.dir.join("o1/stamp")).unwrap();
    // Nothing changed: no RUN executes, same image.
    let (digest2, err2) = ok(p.build(&["--progress", "plain", "-o", &local("o2")]));
    assert!(err2.contains("0 steps run"), "{err2}");
    assert_eq!(digest1, digest2);
    assert_eq!(
        std::fs::read(p.dir.join("o2/stamp")).unwrap(),
        stamp1,
        "the RUN was not executed again"
    );
    // Touching mtime changes nothing.
    run_checked(
        Command::new("touch")
            .arg("-d")
            .arg("2001-01-01")
            .arg(p.ctx().join("a.txt")),
    );
    let (_, err3) = ok(p.build(&["--progress", "plain"]));
    assert!(err3.contains("0 steps run"), "{err3}");
    // A changed byte of b.txt re-runs only what comes after it.
    std::fs::write(p.ctx().join("b.txt"), "B").unwrap();
    p.chown();
    let (_, err4) = ok(p.build(&["--progress", "plain", "-o", &local("o4")]));
    assert!(err4.contains("1 steps run"), "{err4}");
    assert_eq!(std::fs::read(p.dir.join("o4/stamp")).unwrap(), stamp1);
    assert_eq!(
        std::fs::read_to_string(p.dir.join("o4/b-copy")).unwrap(),
        "B"
    );
    // --no-cache runs everything again.
    let (_, err5) = ok(p.build(&["--progress", "plain", "--no-cache"]));
    assert!(err5.contains("2 steps run"), "{err5}");
}

#[test]
fn independent_stages_run_concurrently() {
    let p = Project::new(
        "build-parallel",
        "FROM scratch AS base\nCOPY rootfs/ /\n\nFROM base AS a\nRUN sleep 1 && echo a > /a\n\nFROM base AS b\nRUN sleep 1 && echo b > /b\n\nFROM base\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
    );
    let (_, err) = ok(p.build(&["--progress", "rawjson", "--jobs", "2"]));
    // BuildKit's SolveStatus lines: find the two RUN vertices' start and
    // completion times.
    let mut spans: Vec<(String, String)> = Vec::new();
    let vertexes: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|e| e["vertexes"].as_array().cloned().unwrap_or_default())
        .collect();
    for v in &vertexes {
        if v["name"]
            .as_str()
            .is_some_and(|n| n.contains("RUN sleep 1"))
            && v.get("completed").is_none()
        {
            let done = vertexes
                .iter()
                .find(|d| d["digest"] == v["digest"] && d["completed"].is_string())
                .expect("completed vertex");
            spans.push((
                v["started"].as_str().unwrap().to_string(),
                done["completed"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert_eq!(spans.len(), 2, "{err}");
    // RFC 3339 UTC strings of equal form compare in time order.
    let overlap = spans[0].0 < spans[1].1 && spans[1].0 < spans[0].1;
    assert!(overlap, "the two stages overlapped: {spans:?}");
}

#[test]
fn reproducible_with_source_date_epoch_across_state_dirs() {
    let p = Project::new(
        "build-repro",
        "FROM scratch\nCOPY rootfs/ /\nRUN echo hi > /hi\nCMD [\"sh\"]\n",
    );
    let a = ok(p.build_in(
        "state-a",
        &[
            "--progress",
            "quiet",
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000000",
        ],
    ))
    .0;
    let b = ok(p.build_in(
        "state-b",
        &[
            "--progress",
            "quiet",
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000000",
        ],
    ))
    .0;
    assert_eq!(a, b, "same digest from two state directories");
    // a cache made without an epoch, or with another one, gives its
    // layers to no build with this one: their file times differ
    let quiet_with = |epoch: Option<&str>| {
        let mut args = vec!["--progress", "quiet"];
        if let Some(e) = epoch {
            args.extend(["--build-arg", e]);
        }
        ok(p.build_in("state-c", &args)).0
    };
    quiet_with(None);
    quiet_with(Some("SOURCE_DATE_EPOCH=1600000000"));
    let c = quiet_with(Some("SOURCE_DATE_EPOCH=1700000000"));
    assert_eq!(a, c, "same digest after builds with other epochs");
}

#[test]
fn skopeo_and_umoci_read_the_image() {
    let p = Project::new("build-interop", "FROM scratch\nCOPY rootfs/ /\nRUN echo interop > /made-by-kiln\nCMD [\"cat\", \"/made-by-kiln\"]\n");
    let tar = p.dir.join("image.tar");
    ok(p.build(&[
        "--progress",
        "quiet",
        "-o",
        &format!("type=oci,dest={},name=kiln-interop:v1", tar.display()),
    ]));
    let inspect = run_checked(
        Command::new("skopeo")
            .arg("inspect")
            .arg("--config")
            .arg(format!("oci-archive:{}", tar.display())),
    );
    let config: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["cat", "/made-by-kiln"])
    );
    let layout = p.dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run_checked(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&layout),
    );
    let bundle = p.dir.join("bundle");
    let tag = std::fs::read_to_string(layout.join("index.json")).unwrap();
    let idx: serde_json::Value = serde_json::from_str(&tag).unwrap();
    let reference = idx["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(String::from);
    let image = match reference {
        Some(r) => format!("{}:{r}", layout.display()),
        None => layout.display().to_string(),
    };
    run_checked(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image", &image])
            .arg(&bundle),
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/made-by-kiln")).unwrap(),
        "interop\n"
    );
}

#[test]
fn a_failing_step_names_the_line_and_shows_its_output() {
    let p = Project::new(
        "build-fail",
        "FROM scratch\nCOPY rootfs/ /\nRUN echo about to fail && exit 3\n",
    );
    let o = p.build(&["--progress", "plain"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Dockerfile:3"), "{err}");
    assert!(err.contains("exit code 3"), "{err}");
    assert!(err.contains("about to fail"), "{err}");
    let o = p.build(&["--progress", "plain", "--target", "nope"]);
    assert!(!o.status.success());
    let o = Project::new("build-missing-base", "FROM nosuchimage\nRUN true\n").build(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nosuchimage"), "{err}");
}

#[test]
fn copy_never_follows_context_symlinks_out() {
    let p = Project::new(
        "build-symlinks",
        "FROM scratch\nCOPY rootfs/ /\nCOPY dir/ /dir/\n",
    );
    std::fs::create_dir_all(p.ctx().join("dir")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", p.ctx().join("dir/host-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../etc", p.ctx().join("dir/up")).unwrap();
    p.chown();
    let out = p.dir.join("out");
    ok(p.build(&[
        "--progress",
        "quiet",
        "-o",
        &format!("type=local,dest={}", out.display()),
    ]));
    let link = std::fs::symlink_metadata(out.join("dir/host-link")).unwrap();
    assert!(link.file_type().is_symlink(), "copied as a symlink");
    assert_eq!(
        std::fs::read_link(out.join("dir/host-link")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert!(std::fs::symlink_metadata(out.join("dir/up"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn copy_from_an_image_and_a_named_context() {
    let p = Project::new(
        "build-from-sources",
        "FROM scratch\nCOPY rootfs/ /\nRUN echo base > /made\n",
    );
    ok(p.build(&["--progress", "quiet", "-t", "src-image"]));
    std::fs::create_dir_all(p.dir.join("extra/sub")).unwrap();
    std::fs::write(p.dir.join("extra/sub/file.txt"), "from a named context\n").unwrap();
    std::fs::write(p.dir.join("extra/.dockerignore"), "secret\n").unwrap();
    std::fs::write(p.dir.join("extra/secret"), "ignored\n").unwrap();
    // FROM the image through a docker-image:// context too.
    std::fs::write(
        p.ctx().join("Dockerfile.two"),
        "FROM base2 AS b\n\nFROM scratch\nCOPY --from=src-image /made /from-image\nCOPY --from=extra / /ctx/\nCOPY --from=b /made /from-alias\n",
    )
    .unwrap();
    p.chown();
    let out = p.dir.join("out");
    ok(p.build(&[
        "--progress",
        "quiet",
        "-f",
        &p.ctx().join("Dockerfile.two").display().to_string(),
        "--build-context",
        &format!("extra={}", p.dir.join("extra").display()),
        "--build-context",
        "base2=docker-image://src-image",
        "-o",
        &format!("type=local,dest={}", out.display()),
    ]));
    assert_eq!(
        std::fs::read_to_string(out.join("from-image")).unwrap(),
        "base\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("from-alias")).unwrap(),
        "base\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("ctx/sub/file.txt")).unwrap(),
        "from a named context\n"
    );
    assert!(
        !out.join("ctx/secret").exists(),
        "the named context's .dockerignore applies"
    );
}

#[test]
fn onbuild_triggers_of_a_base_image_run_in_the_child() {
    let p = Project::new(
        "build-onbuild",
        "FROM scratch\nCOPY rootfs/ /\nENV WHO=parent\nONBUILD RUN echo \"triggered for $WHO\" > /onbuild\nONBUILD COPY marker /marker\n",
    );
    ok(p.build(&["--progress", "quiet", "-t", "with-triggers"]));
    std::fs::write(p.ctx().join("marker"), "child context\n").unwrap();
    std::fs::write(
        p.ctx().join("Dockerfile.child"),
        "FROM with-triggers\nRUN cat /onbuild /marker > /seen\n",
    )
    .unwrap();
    p.chown();
    let out = p.dir.join("out");
    let tar = p.dir.join("child.tar");
    let file = p.ctx().join("Dockerfile.child").display().to_string();
    ok(p.build(&[
        "--progress",
        "quiet",
        "-f",
        &file,
        "-o",
        &format!("type=local,dest={}", out.display()),
    ]));
    assert_eq!(
        std::fs::read_to_string(out.join("seen")).unwrap(),
        "triggered for parent\nchild context\n"
    );
    ok(p.build(&[
        "--progress",
        "quiet",
        "-f",
        &file,
        "-o",
        &format!("type=oci,dest={}", tar.display()),
    ]));
    let inspect = run_checked(
        Command::new("skopeo")
            .arg("inspect")
            .arg("--config")
            .arg(format!("oci-archive:{}", tar.display())),
    );
    let config: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert!(
        config["config"]["OnBuild"].is_null(),
        "triggers are not inherited: {}",
        config["config"]
    );
}

#[test]
fn a_changed_build_arg_reruns_only_from_its_first_use() {
    let p = Project::new(
        "build-args",
        "FROM scratch\nCOPY rootfs/ /\nRUN date +%s%N > /before\nARG V=1\nRUN echo $V > /v\n",
    );
    let local = |n: &str| format!("type=local,dest={}", p.dir.join(n).display());
    ok(p.build(&[
        "--progress",
        "quiet",
        "--build-arg",
        "V=1",
        "-o",
        &local("a"),
    ]));
    let (_, err) = ok(p.build(&[
        "--progress",
        "plain",
        "--build-arg",
        "V=2",
        "-o",
        &local("b"),
    ]));
    assert!(err.contains("1 steps run"), "{err}");
    assert_eq!(
        std::fs::read(p.dir.join("a/before")).unwrap(),
        std::fs::read(p.dir.join("b/before")).unwrap()
    );
    assert_eq!(std::fs::read_to_string(p.dir.join("b/v")).unwrap(), "2\n");
}

#[test]
fn files_no_step_copies_and_ignored_files_are_never_read() {
    let p = Project::new(
        "build-lazy-context",
        "FROM scratch\nCOPY rootfs/ /\nCOPY app/ /app/\n",
    );
    std::fs::create_dir_all(p.ctx().join("app")).unwrap();
    std::fs::write(p.ctx().join("app/main.txt"), "main\n").unwrap();
    std::fs::write(p.ctx().join("app/ignored.key"), "never read\n").unwrap();
    std::fs::write(p.ctx().join("elsewhere.bin"), "not copied\n").unwrap();
    std::fs::write(p.ctx().join(".dockerignore"), "app/*.key\n").unwrap();
    p.chown();
    // Unreadable to the builder: reading either would fail the build. Mode
    // 000 alone does not stop kiln, which is root (with CAP_DAC_OVERRIDE)
    // in its own user namespace; a file of real root is not mapped there.
    for f in ["app/ignored.key", "elsewhere.bin"] {
        let path = p.ctx().join(f);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        if kiln_vm_tests::running_as_root() {
            std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
        }
    }
    let out = p.dir.join("out");
    ok(p.build(&[
        "--progress",
        "quiet",
        "-o",
        &format!("type=local,dest={}", out.display()),
    ]));
    assert_eq!(
        std::fs::read_to_string(out.join("app/main.txt")).unwrap(),
        "main\n"
    );
    assert!(!out.join("app/ignored.key").exists());
}

#[test]
fn an_ignore_file_that_cannot_be_read_or_parsed_stops_the_build() {
    let p = Project::new(
        "build-bad-ignore",
        "FROM scratch\nCOPY rootfs/ /\nCOPY . /ctx/\n",
    );
    std::fs::write(p.ctx().join("secret.key"), "never sent\n").unwrap();
    let ignore = p.ctx().join(".dockerignore");
    std::fs::write(&ignore, "# keys\nsecret.key\n[unclosed\n").unwrap();
    p.chown();
    let out = p.dir.join("out");
    let dest = format!("type=local,dest={}", out.display());
    let o = p.build(&["--progress", "quiet", "-o", &dest]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "built with a broken .dockerignore");
    assert!(
        err.contains(&format!("{}: syntax error", ignore.display())) && err.contains("on line 3"),
        "{err}"
    );
    assert!(!out.join("ctx/secret.key").exists());

    // unreadable: a file of real root, mode 0600, is not kiln's to read
    if !kiln_vm_tests::root_for("a .dockerignore kiln cannot read (owned by real root)") {
        return;
    }
    std::fs::write(&ignore, "secret.key\n").unwrap();
    std::fs::set_permissions(&ignore, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&ignore, Some(0), Some(0)).unwrap();
    let o = p.build(&["--progress", "quiet", "-o", &dest]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "built with an unreadable .dockerignore"
    );
    assert!(
        err.contains(&format!("cannot read {}", ignore.display())),
        "{err}"
    );
    assert!(!out.join("ctx/secret.key").exists());
}

/// Whether the step named `name` (a prefix of its progress name) was
/// reported CACHED in the plain progress `err`.
fn was_cached(err: &str, name: &str) -> bool {
    let vertex = err.lines().find_map(|l| {
        let (v, rest) = l.split_once(' ')?;
        rest.starts_with(name).then_some(v)
    });
    vertex.is_some_and(|v| err.lines().any(|l| l == format!("{v} CACHED")))
}

#[test]
fn steps_reading_a_rebuilt_stage_hit_when_its_files_are_the_same() {
    let p = Project::new(
        "build-content-keys",
        "FROM scratch AS tools\nCOPY rootfs/ /\n\nFROM scratch AS src\nCOPY bust /bust\nCOPY word /out\n\nFROM tools AS copier\nCOPY --from=src /out /out\n\nFROM tools AS mounter\nRUN --mount=from=src,source=/out,target=/m cat /m > /seen\n",
    );
    let build = |bust: &str, word: &str| {
        std::fs::write(p.ctx().join("bust"), bust).unwrap();
        std::fs::write(p.ctx().join("word"), word).unwrap();
        p.chown();
        let a = ok(p.build(&["--progress", "plain", "--target", "copier"])).1;
        let b = ok(p.build(&["--progress", "plain", "--target", "mounter"])).1;
        (a, b)
    };
    build("1", "same");
    // src is made again (its first input changed) into the same /out: the
    // COPY --from and the RUN that mounts it hit by what they read
    let (copier, mounter) = build("2", "same");
    assert!(!was_cached(&copier, "[src 2/2] COPY word /out"), "{copier}");
    assert!(
        was_cached(&copier, "[copier 1/1] COPY --from=src /out /out"),
        "{copier}"
    );
    assert!(
        was_cached(&mounter, "[mounter 1/1] RUN --mount=from=src"),
        "{mounter}"
    );
    // a source made again into other files is a miss
    let (copier, mounter) = build("3", "other");
    assert!(
        !was_cached(&copier, "[copier 1/1] COPY --from=src"),
        "{copier}"
    );
    assert!(
        !was_cached(&mounter, "[mounter 1/1] RUN --mount=from=src"),
        "{mounter}"
    );
}

#[test]
fn stages_that_need_no_image_run_while_the_images_are_pulled() {
    use std::io::{BufRead, BufReader, Write};
    // a registry that answers every request after a second, with a 404
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
                let _ = conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            });
        }
    });
    let p = Project::new(
        "build-early-stages",
        &format!(
            "FROM scratch AS early\nCOPY rootfs/ /\nRUN echo early > /x\n\nFROM 127.0.0.1:{port}/base:1\nCOPY --from=early /x /x\n"
        ),
    );
    let insecure = format!("--insecure-registry=127.0.0.1:{port}");
    let o = p.build(&["--progress", "plain", &insecure]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{err}");
    // the pull failed, and the stage that needs no image had run by then
    assert!(err.contains("cannot pull the base image"), "{err}");
    let run = err
        .lines()
        .find_map(|l| l.strip_suffix(" [early 2/2] RUN echo early > /x"))
        .unwrap_or_else(|| panic!("no early RUN step:\n{err}"));
    assert!(
        err.lines()
            .any(|l| l == format!("{run} DONE") || l.starts_with(&format!("{run} DONE "))),
        "{err}"
    );
}
