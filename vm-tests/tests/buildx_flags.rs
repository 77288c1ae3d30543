//! `kiln build` as a drop-in for `docker buildx build` in CI scripts: the
//! flags scripts pass and the files they read afterwards, checked end to
//! end with the real binary as the unprivileged test user.

use std::fs;
use std::process::Command;

use kiln_vm_tests::{expect_failure, expect_success, kiln, run_checked, Project};

/// The image ID docker and buildx print and write: a sha256 digest.
fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[test]
fn iidfile_metadata_quiet_tags_and_labels_as_buildx_writes_them() {
    let p = Project::new(
        "buildx-flags",
        "FROM scratch\nCOPY rootfs/ /\nLABEL from=dockerfile\nRUN true\n",
    );
    let (iid, meta, tar) = (
        p.dir.join("iid"),
        p.dir.join("meta.json"),
        p.dir.join("img.tar"),
    );
    let (out, err) = expect_success(p.build(&[
        "-q",
        "--network",
        "default",
        "--iidfile",
        &iid.display().to_string(),
        "--metadata-file",
        &meta.display().to_string(),
        "-t",
        "kiln-flags:v1",
        "--label",
        "team=ci",
        "--label",
        "from=flag",
        "-o",
        &format!("type=oci,dest={}", tar.display()),
    ]));
    // -q: the image ID alone on stdout, no progress on stderr
    let id = out.trim();
    assert!(is_digest(id), "stdout is not an image ID: {out:?}");
    assert!(!err.contains("#1 "), "-q printed progress:\n{err}");
    // --iidfile: the same ID, without a newline (as docker writes it)
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), id);
    // --metadata-file: buildx's keys
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(m["containerimage.config.digest"], id, "{m}");
    let digest = m["containerimage.digest"].as_str().unwrap_or_default();
    assert!(is_digest(digest), "{m}");
    assert_eq!(m["containerimage.descriptor"]["digest"], digest, "{m}");
    assert_eq!(
        m["containerimage.descriptor"]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(m["containerimage.descriptor"]["size"].as_u64() > Some(0));
    assert_eq!(m["image.name"], "docker.io/library/kiln-flags:v1");
    // -t names the OCI output too: its index carries the tag umoci reads
    let layout = p.dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run_checked(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&layout),
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(entry["digest"], digest);
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "v1"
    );
    // --label: set on the config, over the Dockerfile's, with no history
    // entry of its own
    let inspect = run_checked(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci-archive:{}:v1", tar.display())),
    );
    let config: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        config["config"]["Labels"],
        serde_json::json!({"from": "flag", "team": "ci"})
    );
    assert_eq!(config["history"].as_array().map(Vec::len), Some(3));

    // what a docker-compatible tool calls the image's ID is the iidfile's:
    // rootless podman loads the docker archive of the same build
    let archive = p.dir.join("img-docker.tar");
    let (out2, _) = expect_success(p.build(&[
        "-q",
        "-t",
        "kiln-flags:v1",
        "--label",
        "team=ci",
        "--label",
        "from=flag",
        "-o",
        &format!("type=docker,dest={}", archive.display()),
    ]));
    assert_eq!(out2.trim(), id, "a rebuild gives the same ID");
    let archive_arg = archive.display().to_string();
    let load = kiln_vm_tests::podman(&p.dir, "bxf", &["load", "-i", &archive_arg]);
    expect_success(load);
    let inspect = kiln_vm_tests::podman(
        &p.dir,
        "bxf",
        &["image", "inspect", "--format", "{{.Id}}", "kiln-flags:v1"],
    );
    let (podman_id, _) = expect_success(inspect);
    assert_eq!(
        format!("sha256:{}", podman_id.trim()),
        std::fs::read_to_string(&iid).unwrap()
    );
}

#[test]
fn a_label_without_a_value_is_refused_before_the_build() {
    let p = Project::new("buildx-label", "FROM scratch\nCOPY rootfs/ /\n");
    let err = expect_failure(p.build(&["--label", "novalue"]));
    assert!(err.contains("--label \"novalue\""), "{err}");
}

#[test]
fn cache_flags_take_a_bare_reference_and_ignore_error() {
    let p = Project::new("buildx-cache", "FROM scratch\nCOPY rootfs/ /\n");
    // a file where the cache directory would go: the export cannot write
    let blocked = p.dir.join("blocked");
    std::fs::write(&blocked, "a file").unwrap();
    kiln_vm_tests::give_to_test_user(&p.dir);
    let dest = format!("type=local,dest={}/cache", blocked.display());
    let err = expect_failure(p.build(&["--cache-to", &dest]));
    assert!(err.contains("blocked/cache"), "{err}");
    let (_, err) = expect_success(p.build(&["--cache-to", &format!("{dest},ignore-error=true")]));
    assert!(
        err.contains("WARNING: --cache-to (ignore-error=true)"),
        "{err}"
    );
    // a bare --cache-from is a registry reference: nothing listens there,
    // so it warns and the build goes on (with type=local it would be a
    // directory, and fail differently)
    let (_, err) =
        expect_success(p.build(&["--no-cache", "--cache-from", "127.0.0.1:9/kiln/none:cache"]));
    assert!(
        err.contains("WARNING: --cache-from") && err.contains("127.0.0.1:9"),
        "{err}"
    );
    let err = expect_failure(p.build(&["--cache-to", "type=local,dest=x,colour=blue"]));
    assert!(err.contains("unknown key \"colour\""), "{err}");
}

#[test]
fn a_multi_platform_build_reports_its_index() {
    let p = Project::new("buildx-multi", "FROM scratch\nCOPY rootfs/ /\n");
    let (iid, meta, dir) = (
        p.dir.join("iid"),
        p.dir.join("meta.json"),
        p.dir.join("layout"),
    );
    expect_success(p.build(&[
        "--platform",
        "linux/amd64,linux/arm64",
        "--iidfile",
        &iid.display().to_string(),
        "--metadata-file",
        &meta.display().to_string(),
        "-o",
        &format!("type=oci,dest={},tar=false", dir.display()),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap_or_default();
    // the ID and the metadata name the index; there is no one config
    assert!(is_digest(digest), "{index}");
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), digest);
    assert_eq!(m["containerimage.digest"], digest, "{m}");
    assert_eq!(
        m["containerimage.descriptor"]["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert!(m.get("containerimage.config.digest").is_none(), "{m}");
}

#[test]
fn shm_size_and_ulimits_reach_run_steps_and_their_keys() {
    let p = Project::new(
        "buildx-limits",
        "FROM scratch\nCOPY rootfs/ /\nRUN df -k /dev/shm | tail -n 1 > /shm && ulimit -n > /soft && ulimit -Hn > /hard\n",
    );
    let out = p.local_out();
    expect_success(p.build(&["-o", &out]));
    let shm_kib = |p: &Project| -> String {
        p.out("shm")
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    // Docker's default: 64 MiB
    assert_eq!(shm_kib(&p), "65536", "{}", p.out("shm"));
    let (_, err) = expect_success(p.build(&[
        "--progress",
        "plain",
        "--shm-size",
        "128m",
        "--ulimit",
        "nofile=512:1024",
        "-o",
        &out,
    ]));
    // a new key: the RUN step ran again with the new limits
    assert!(err.contains("1 steps run, 1 cached"), "{err}");
    assert_eq!(shm_kib(&p), "131072", "{}", p.out("shm"));
    assert_eq!(p.out("soft").trim(), "512");
    assert_eq!(p.out("hard").trim(), "1024");
    let err = expect_failure(p.build(&["--ulimit", "files=1"]));
    assert!(err.contains("--ulimit \"files=1\""), "{err}");
}

#[test]
fn load_keeps_the_image_in_the_store_beside_other_outputs() {
    let p = Project::new("buildx-load", "FROM scratch\nCOPY rootfs/ /\n");
    let out = p.local_out();
    let images = |p: &Project| {
        let o = kiln_vm_tests::kiln(["--root", &p.state("state"), "images", "-q", "--no-trunc"])
            .output()
            .expect("kiln images");
        expect_success(o).0
    };
    expect_success(p.build(&["-o", &out]));
    assert_eq!(images(&p).trim(), "", "a local output alone stores nothing");
    let (id, _) = expect_success(p.build(&["-q", "--load", "-o", &out]));
    assert!(images(&p).contains(id.trim()), "{}", images(&p));
}

/// A blob of an OCI layout directory, as JSON.
fn layout_blob(layout: &std::path::Path, digest: &str) -> serde_json::Value {
    let hex = digest.trim_start_matches("sha256:");
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

#[test]
fn annotations_land_on_the_levels_buildx_puts_them() {
    let p = Project::new("buildx-annotations", "FROM scratch\nCOPY rootfs/ /\n");
    let one = p.dir.join("one");
    expect_success(p.build(&[
        "--annotation",
        "org.opencontainers.image.title=kiln",
        "--annotation",
        "manifest-descriptor:d=1",
        "-o",
        &format!("type=oci,dest={},tar=false", one.display()),
    ]));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(entry["annotations"]["d"], "1", "{index}");
    let manifest = layout_blob(&one, entry["digest"].as_str().unwrap());
    assert_eq!(
        manifest["annotations"],
        serde_json::json!({"org.opencontainers.image.title": "kiln"})
    );
    // a single-platform image has no index to annotate
    let err = expect_failure(p.build(&["--annotation", "index:i=1"]));
    assert!(err.contains("has no index"), "{err}");

    let multi = p.dir.join("multi");
    expect_success(p.build(&[
        "--platform",
        "linux/amd64,linux/arm64",
        "--annotation",
        "index:i=1",
        "--annotation",
        "manifest[linux/arm64]:m=arm",
        "--annotation",
        "manifest-descriptor:md=2",
        "--annotation",
        "index-descriptor:x=3",
        "-o",
        &format!("type=oci,dest={},tar=false", multi.display()),
    ]));
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(multi.join("index.json")).unwrap()).unwrap();
    assert_eq!(layout["manifests"][0]["annotations"]["x"], "3", "{layout}");
    let index = layout_blob(&multi, layout["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(index["annotations"], serde_json::json!({"i": "1"}));
    for m in index["manifests"].as_array().unwrap() {
        assert_eq!(m["annotations"]["md"], "2", "{m}");
        let manifest = layout_blob(&multi, m["digest"].as_str().unwrap());
        match m["platform"]["architecture"].as_str() {
            Some("arm64") => assert_eq!(manifest["annotations"], serde_json::json!({"m": "arm"})),
            _ => assert!(manifest.get("annotations").is_none(), "{manifest}"),
        }
    }

    // the same as the exporter's annotation keys of -o: the same index
    let keys = p.dir.join("keys");
    expect_success(p.build(&[
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        &format!(
            "type=oci,dest={},tar=false,annotation-index.i=1,annotation-manifest[linux/arm64].m=arm,annotation-manifest-descriptor.md=2,annotation-index-descriptor.x=3",
            keys.display()
        ),
    ]));
    let by_keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(keys.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        by_keys["manifests"][0]["digest"],
        layout["manifests"][0]["digest"]
    );
    assert_eq!(
        by_keys["manifests"][0]["annotations"]["x"], "3",
        "{by_keys}"
    );
    let err = expect_failure(p.build(&["-o", "type=oci,dest=/tmp/x,annotation-oops.k=v"]));
    assert!(err.contains("unknown level \"oops\""), "{err}");
}

/// `kiln build` with `input` on standard input and `args` (the context or
/// `-f` among them), as the test user.
fn build_with_stdin(p: &Project, args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut all = vec!["--root".to_string(), p.state("state"), "build".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    let mut child = kiln(&all)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kiln build");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().expect("wait for kiln")
}

#[test]
fn a_context_or_a_dockerfile_comes_from_standard_input() {
    let p = Project::new(
        "stdin-input",
        "FROM scratch\nCOPY rootfs/bin/busybox /bin/busybox\nCOPY hello /hello\n",
    );
    p.write("hello", "from the tar\n");
    let out_dir = p.dir.join("out");
    let local = format!("type=local,dest={}", out_dir.display());
    // a gzipped tar of the context: its Dockerfile is used
    let tar = Command::new("tar")
        .arg("-C")
        .arg(p.ctx())
        .args(["-czf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    expect_success(build_with_stdin(&p, &["-o", &local, "-"], &tar.stdout));
    assert_eq!(
        fs::read_to_string(out_dir.join("hello")).unwrap(),
        "from the tar\n"
    );
    // -f names a file inside the tar
    p.write("other.Dockerfile", "FROM scratch\nCOPY hello /again\n");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(p.ctx())
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    expect_success(build_with_stdin(
        &p,
        &["-o", &local, "-f", "other.Dockerfile", "-"],
        &tar.stdout,
    ));
    assert_eq!(
        fs::read_to_string(out_dir.join("again")).unwrap(),
        "from the tar\n"
    );
    // -f - with a context directory
    let ctx = p.ctx().display().to_string();
    expect_success(build_with_stdin(
        &p,
        &["-o", &local, "-f", "-", &ctx],
        b"FROM scratch\nCOPY hello /from-stdin\n",
    ));
    assert_eq!(
        fs::read_to_string(out_dir.join("from-stdin")).unwrap(),
        "from the tar\n"
    );
    // a Dockerfile alone: the context is empty
    let err = expect_failure(build_with_stdin(
        &p,
        &["-o", &local, "-"],
        b"FROM scratch\nCOPY hello /x\n",
    ));
    assert!(err.contains("\"hello\" not found"), "{err}");
    expect_success(build_with_stdin(
        &p,
        &["-o", &local, "-"],
        b"FROM scratch\nLABEL a=b\n",
    ));
    // both at once
    let err = expect_failure(build_with_stdin(&p, &["-f", "-", "-"], b"FROM scratch\n"));
    assert!(
        err.contains("cannot both be read from standard input"),
        "{err}"
    );
    // nothing left behind in the state directory
    let left: Vec<_> = fs::read_dir(p.dir.join("state/stdin")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_syntax_directive_naming_another_frontend_is_a_warning() {
    let p = Project::new(
        "syntax-other",
        "# syntax=example.com/acme/frontend:2\nFROM scratch\nLABEL a=b\n",
    );
    let (_, err) = expect_success(p.build(&["--progress", "plain"]));
    assert!(
        err.contains("WARNING: Dockerfile:1: # syntax=example.com/acme/frontend:2 names a frontend image kiln does not run"),
        "{err}"
    );
    fs::write(
        p.ctx().join("Dockerfile"),
        "# syntax=docker/dockerfile:1\nFROM scratch\nLABEL a=b\n",
    )
    .unwrap();
    let (_, err) = expect_success(p.build(&["--progress", "plain"]));
    assert!(!err.contains("WARNING"), "{err}");
}

#[test]
fn name_canonical_also_names_the_image_by_its_digest() {
    let p = Project::new("buildx-canonical", "FROM scratch\nCOPY rootfs/ /\n");
    let meta = p.dir.join("meta.json");
    expect_success(p.build(&[
        "-o",
        "type=image,name=canon:v1,name-canonical=true",
        "--metadata-file",
        &meta.display().to_string(),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&meta).unwrap()).unwrap();
    let digest = m["containerimage.digest"].as_str().unwrap().to_string();
    let listed = |args: &[&str]| {
        let mut all = vec!["--root".to_string(), p.state("state"), "images".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        expect_success(kiln(&all).output().expect("kiln images")).0
    };
    let rows = listed(&["--digests", "canon"]);
    // the tag, and the canonical name (no tag), both at the digest
    let at_digest: Vec<&str> = rows.lines().filter(|l| l.contains(&digest)).collect();
    assert_eq!(at_digest.len(), 2, "{rows}");
    assert!(at_digest.iter().any(|l| l.contains("<none>")), "{rows}");
    // the canonical name resolves
    let by_digest = format!("canon@{digest}");
    let out = p.dir.join("saved");
    expect_success(
        kiln([
            "--root",
            &p.state("state"),
            "save",
            "--output",
            &format!("type=local,dest={}", out.display()),
            &by_digest,
        ])
        .output()
        .expect("kiln save"),
    );
    // only type=image names an image in the store
    let err = expect_failure(p.build(&["-o", "type=oci,dest=/tmp/x.tar,name-canonical=true"]));
    assert!(err.contains("unknown key \"name-canonical\""), "{err}");
}

#[test]
fn attestations_turned_off_are_taken_and_asked_for_are_refused() {
    let p = Project::new("attest-flags", "FROM scratch\nCOPY rootfs/bin/busybox /\n");
    // what CI scripts pass for registries without attestation support
    expect_success(p.build(&[
        "-q",
        "--provenance=false",
        "--sbom=false",
        "--attest",
        "type=provenance,disabled=true",
    ]));
    for (flags, named) in [
        (&["--provenance"][..], "--provenance=true"),
        (&["--provenance=mode=max"][..], "--provenance=mode=max"),
        (&["--sbom=true"][..], "--sbom=true"),
        (&["--attest", "type=sbom"][..], "--attest type=sbom"),
    ] {
        let err = expect_failure(p.build(flags));
        assert!(
            err.contains(named) && err.contains("does not make attestations yet"),
            "{flags:?}: {err}"
        );
    }
}
