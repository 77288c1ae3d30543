//! End-to-end tests of the image commands (`kiln import`, `load`, `images`,
//! `rmi`, `save`): the real kiln binary as the unprivileged test user, with
//! skopeo, umoci and rootless podman as the oracles that read kiln's images
//! back.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_vm_tests::{
    busybox_rootfs, kiln, kiln_binary, run_checked, running_as_root, stage_file, test_dir,
    test_ids, unprivileged,
};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kiln --root STATE ARGS...`, which must succeed; returns stdout.
fn kiln_ok(state: &Path, args: &[&str]) -> String {
    let out = kiln_out(state, args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn kiln_out(state: &Path, args: &[&str]) -> Output {
    kiln(
        ["--root", state.to_str().expect("utf-8 path")]
            .iter()
            .chain(args),
    )
    .output()
    .expect("run kiln")
}

fn chown_to_test_user(p: &Path) {
    if running_as_root() {
        let (uid, gid) = test_ids();
        run_checked(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(p),
        );
    }
}

/// A test directory with a busybox rootfs imported as `localhost/bb`;
/// returns (dir, state dir, image ID).
fn with_busybox_image(name: &str) -> (PathBuf, PathBuf, String) {
    let dir = test_dir(name);
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs);
    fs::write(rootfs.join("etc/kiln-marker"), "made by kiln import\n").expect("marker");
    chown_to_test_user(&rootfs);
    let state = dir.join("state");
    let out = kiln_ok(
        &state,
        &["import", rootfs.to_str().unwrap(), "-t", "localhost/bb"],
    );
    let id = out.trim().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{out}");
    (dir, state, id)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn import_lists_and_oci_export_reads_in_skopeo_and_umoci() {
    let (dir, state, id) = with_busybox_image("images-oci");
    let list = kiln_ok(&state, &["images"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[0].starts_with("REPOSITORY") && lines[0].contains("IMAGE ID"),
        "{list}"
    );
    assert!(
        lines[1].starts_with("localhost/bb")
            && lines[1].contains("latest")
            && lines[1].contains(&id[7..19]),
        "{list}"
    );
    // the state directory exists with mode 0700
    let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // type=oci to a file: skopeo reads it
    let tarball = dir.join("bb-oci.tar");
    kiln_ok(
        &state,
        &[
            "save",
            "localhost/bb",
            "--output",
            &format!("type=oci,dest={}", p(&tarball)),
        ],
    );
    let out = run_checked(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci-archive:{}", p(&tarball)),
    ]));
    let config = text(&out.stdout);
    assert!(config.contains("\"diff_ids\""), "{config}");
    assert!(
        config.contains("kiln import"),
        "history entry missing: {config}"
    );

    // type=oci to a directory (trailing slash): umoci unpacks the files
    let layout = dir.join("layout");
    kiln_ok(
        &state,
        &[
            "save",
            "localhost/bb",
            "--output",
            &format!("type=oci,dest={}/", p(&layout)),
        ],
    );
    let bundle = dir.join("bundle");
    run_checked(Command::new("umoci").args([
        "unpack",
        "--rootless",
        "--image",
        &format!("{}:latest", p(&layout)),
        p(&bundle),
    ]));
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/kiln-marker")).unwrap(),
        "made by kiln import\n"
    );
    assert_eq!(
        fs::read(rootfs.join("bin/busybox")).unwrap(),
        fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        fs::read_link(rootfs.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
}

#[test]
fn default_state_dir_is_xdg_data_home_kiln_0700() {
    let dir = test_dir("images-xdg");
    let mut cmd = unprivileged(Path::new("/usr/bin/env"));
    cmd.arg(format!("XDG_DATA_HOME={}", p(&dir.join("xdg"))))
        .arg(stage_file(&kiln_binary()))
        .arg("images");
    let out = run_checked(&mut cmd);
    assert!(text(&out.stdout).starts_with("REPOSITORY"));
    let state = dir.join("xdg/kiln");
    let meta = fs::metadata(&state).expect("state dir created");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(meta.uid(), test_ids().0);
}

fn podman(dir: &Path, args: &[&str]) -> Output {
    kiln_vm_tests::podman(dir, "img", args)
}

#[test]
fn docker_export_loads_and_runs_in_rootless_podman() {
    assert!(
        Path::new("/usr/bin/podman").exists(),
        "podman is missing: run scripts/setup-host.sh (apt-get install podman runc)"
    );
    let (dir, state, _) = with_busybox_image("images-podman");
    let archive = dir.join("bb-docker.tar");
    kiln_ok(
        &state,
        &[
            "save",
            "localhost/bb",
            "--output",
            &format!("type=docker,dest={},name=localhost/bb:run", p(&archive)),
        ],
    );
    let out = podman(&dir, &["load", "-i", p(&archive)]);
    assert!(
        out.status.success() && text(&out.stdout).contains("localhost/bb:run"),
        "podman load: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // crun refuses hybrid cgroup hierarchies; runc with cgroupfs, or no
    // cgroups at all, work on more hosts
    let attempts: [&[&str]; 3] = [
        &["run", "--rm"],
        &["--runtime", "runc", "run", "--rm"],
        &["run", "--rm", "--cgroups=disabled"],
    ];
    let mut errors = Vec::new();
    for a in attempts {
        let mut args = a.to_vec();
        args.extend(["localhost/bb:run", "/bin/busybox", "echo", "hi"]);
        let out = podman(&dir, &args);
        if out.status.success() {
            assert_eq!(text(&out.stdout), "hi\n");
            kiln_vm_tests::remove_tree(&kiln_vm_tests::podman_runroot("img"));
            return;
        }
        errors.push(format!("podman {args:?}: {}", text(&out.stderr)));
    }
    let all = errors.join("\n");
    if all.contains("cgroup") {
        kiln_vm_tests::missing_prerequisite(&format!(
            "podman cannot run containers on this host because of its cgroup setup:\n{all}"
        ));
        return;
    }
    panic!("podman run failed:\n{all}");
}

#[test]
fn skopeo_docker_archive_loads_back_to_the_same_image() {
    let (dir, state, id) = with_busybox_image("images-load");
    let layout = dir.join("layout");
    kiln_ok(
        &state,
        &[
            "save",
            "localhost/bb",
            "--output",
            &format!("type=oci,dest={}/", p(&layout)),
        ],
    );
    let archive = dir.join("skopeo-docker.tar");
    run_checked(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci:{}:latest", p(&layout)),
        &format!("docker-archive:{}:localhost/sk:1", p(&archive)),
    ]));
    chown_to_test_user(&archive);
    let other = dir.join("state2");
    let out = kiln_ok(&other, &["load", "-i", p(&archive)]);
    assert_eq!(out, "Loaded image: localhost/sk:1\n");
    // skopeo writes uncompressed layers; the config is kept byte for byte, so
    // the image ID (and with it every diffID) is the one kiln imported
    let ids = kiln_ok(&other, &["images", "-q", "--no-trunc"]);
    assert_eq!(ids.trim(), id);

    // from standard input too, into a third store
    let third = dir.join("state3");
    let out = kiln(["--root", p(&third), "load"])
        .stdin(Stdio::from(fs::File::open(&archive).unwrap()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Loaded image: localhost/sk:1\n");
}

#[test]
fn malformed_archives_fail_clearly_and_leave_the_store_as_it_was() {
    let (dir, state, _) = with_busybox_image("images-bad");
    let good = dir.join("good.tar");
    kiln_ok(&state, &["save", "localhost/bb", "-o", p(&good)]);
    let before = kiln_ok(&state, &["images", "--no-trunc"]);

    // truncated in the middle of the layer
    let bytes = fs::read(&good).unwrap();
    let truncated = dir.join("truncated.tar");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // manifest.json naming a layer the archive lacks
    let missing = dir.join("missing");
    fs::create_dir_all(&missing).unwrap();
    fs::write(
        missing.join("manifest.json"),
        r#"[{"Config":"c.json","RepoTags":["localhost/bad:1"],"Layers":["nope/layer.tar"]}]"#,
    )
    .unwrap();
    fs::write(
        missing.join("c.json"),
        r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#,
    )
    .unwrap();
    let missing_tar = dir.join("missing.tar");
    run_checked(
        Command::new("tar")
            .arg("-cf")
            .arg(&missing_tar)
            .arg("-C")
            .arg(&missing)
            .args(["manifest.json", "c.json"]),
    );
    chown_to_test_user(&dir);
    for (file, needle) in [
        (&truncated, "blobs/sha256/"),
        (&missing_tar, "nope/layer.tar"),
    ] {
        let out = kiln_out(&state, &["load", "-i", p(file)]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.starts_with("kiln: error: cannot load"), "{err}");
        assert!(err.contains(needle), "{err} does not name {needle}");
        assert_eq!(kiln_ok(&state, &["images", "--no-trunc"]), before);
    }
    // the store still works: the good archive loads
    let out = kiln_ok(&state, &["load", "-i", p(&good)]);
    assert_eq!(out, "Loaded image: localhost/bb:latest\n");
}

#[test]
fn rmi_untags_and_frees_the_blobs_and_layers() {
    let (dir, state, id) = with_busybox_image("images-rmi");
    let out = kiln_out(&state, &["rmi", "localhost/nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no image named"),
        "{}",
        text(&out.stderr)
    );
    let out = kiln_ok(&state, &["rmi", "localhost/bb"]);
    assert_eq!(
        out,
        format!("Untagged: localhost/bb:latest\nDeleted: {id}\n")
    );
    assert_eq!(kiln_ok(&state, &["images", "-q"]), "");
    let blobs: Vec<_> = fs::read_dir(state.join("snapshots/content/blobs/sha256"))
        .unwrap()
        .collect();
    assert!(blobs.is_empty(), "{blobs:?}");
    let layers: Vec<_> = fs::read_dir(state.join("snapshots/layers"))
        .unwrap()
        .collect();
    assert!(layers.is_empty(), "{layers:?}");
    let _ = dir;
}

#[test]
fn local_and_tar_outputs_hold_the_root_filesystem() {
    let (dir, state, _) = with_busybox_image("images-local");
    let local = dir.join("out");
    kiln_ok(
        &state,
        &[
            "save",
            "localhost/bb",
            "--output",
            &format!("type=local,dest={}", p(&local)),
        ],
    );
    let (uid, gid) = test_ids();
    for f in ["bin/busybox", "etc/kiln-marker", "etc", "bin/sh"] {
        let m = fs::symlink_metadata(local.join(f)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (uid, gid),
            "{f} is not owned by the caller"
        );
    }
    let out = kiln([
        "--root",
        p(&state),
        "save",
        "localhost/bb",
        "--output",
        "type=tar,dest=-",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = dir.join("rootfs.tar");
    fs::write(&listing, &out.stdout).unwrap();
    let names = text(&run_checked(Command::new("tar").arg("-tf").arg(&listing)).stdout);
    for f in ["bin/busybox", "etc/kiln-marker", "etc/passwd"] {
        assert!(names.lines().any(|l| l == f), "{f} missing from {names}");
    }
}

/// `env VARS... kiln --root STATE ARGS...` as the test user (setpriv
/// resets the environment, so variables go through env).
fn kiln_env(state: &Path, vars: &[&str], args: &[&str]) -> String {
    let mut cmd = unprivileged(Path::new("/usr/bin/env"));
    cmd.args(vars)
        .arg(stage_file(&kiln_binary()))
        .args(["--root", p(state)])
        .args(args);
    text(&run_checked(&mut cmd).stdout)
}

#[test]
fn same_rootfs_and_epoch_give_byte_identical_exports() {
    let dir = test_dir("images-repro");
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs);
    chown_to_test_user(&rootfs);
    let epoch = "SOURCE_DATE_EPOCH=1700000000";
    let mut archives = Vec::new();
    let mut ids = Vec::new();
    for n in 0..2 {
        if n == 1 {
            // a clock-based `created` would now differ
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        let state = dir.join(format!("state{n}"));
        ids.push(kiln_env(
            &state,
            &[epoch],
            &["import", p(&rootfs), "-t", "localhost/repro"],
        ));
        let out = dir.join(format!("repro{n}.tar"));
        kiln_env(
            &state,
            &[epoch],
            &[
                "save",
                "localhost/repro",
                "--output",
                &format!(
                    "type=oci,dest={},compression=zstd,rewrite-timestamp=true",
                    p(&out)
                ),
            ],
        );
        archives.push(fs::read(&out).unwrap());
    }
    assert_eq!(ids[0], ids[1], "image IDs differ across state directories");
    assert!(archives[0] == archives[1], "the two OCI archives differ");
    // skopeo reads the zstd layers kiln wrote
    let out = run_checked(Command::new("skopeo").args([
        "inspect",
        "--raw",
        &format!("oci-archive:{}", p(&dir.join("repro0.tar"))),
    ]));
    assert!(
        text(&out.stdout).contains("application/vnd.oci.image.layer.v1.tar+zstd"),
        "{}",
        text(&out.stdout)
    );
    let copy = dir.join("copied");
    run_checked(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci-archive:{}", p(&dir.join("repro0.tar"))),
        &format!("dir:{}", p(&copy)),
    ]));
}

#[test]
fn concurrent_loads_imports_and_rmi_on_one_state_dir() {
    let (dir, state, id) = with_busybox_image("images-concurrent");
    let archive = dir.join("bb.tar");
    kiln_ok(&state, &["save", "localhost/bb", "-o", p(&archive)]);
    kiln_ok(&state, &["tag", "localhost/bb", "localhost/doomed"]);
    let spawn = |args: Vec<String>| {
        kiln(
            ["--root".to_string(), p(&state).to_string()]
                .into_iter()
                .chain(args),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln")
    };
    let mut children = Vec::new();
    for n in 0..3 {
        children.push(spawn(vec!["load".into(), "-i".into(), p(&archive).into()]));
        children.push(spawn(vec![
            "tag".into(),
            "localhost/bb".into(),
            format!("localhost/copy{n}"),
        ]));
    }
    children.push(spawn(vec!["rmi".into(), "localhost/doomed".into()]));
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let names = kiln_ok(&state, &["images"]);
    for n in [
        "localhost/bb",
        "localhost/copy0",
        "localhost/copy1",
        "localhost/copy2",
    ] {
        assert!(
            names.lines().any(|l| l.starts_with(n)),
            "{n} missing:\n{names}"
        );
    }
    assert!(!names.contains("doomed"), "{names}");
    // the image still exports completely after the rmi's GC
    let layout = dir.join("after");
    kiln_ok(
        &state,
        &[
            "save",
            "localhost/copy2",
            "--output",
            &format!("type=oci,dest={}/", p(&layout)),
        ],
    );
    let out = run_checked(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci:{}:latest", p(&layout)),
    ]));
    assert!(text(&out.stdout).contains("diff_ids"));
    assert_eq!(kiln_ok(&state, &["images", "-q", "--no-trunc"]).trim(), id);
}
