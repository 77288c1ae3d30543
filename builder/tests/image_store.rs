//! The image store, `load` and the exporters through the library, in a user
//! namespace as kiln runs them: archives built here byte by byte, malformed
//! ones refused naming the entry with nothing named and nothing left after
//! GC, and exports read back by kiln's own loader.

use std::fs;
use std::io::{Cursor, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_builder::image::archive;
use kiln_builder::image::export::{export_to, ExportOptions};
use kiln_builder::image::import::{self, ImportOptions, Source};
use kiln_builder::image::output::OutputSpec;
use kiln_builder::image::store::{ImageStore, Platform};
use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::snapshot::Snapshotter;
use sha2::{Digest as _, Sha256};

/// Re-run this test inside a user namespace as the unprivileged test user;
/// true when already inside (run the body).
fn in_userns(name: &str) -> bool {
    kiln_vm_tests::rerun_in_userns(name, &[])
}

fn sha(b: &[u8]) -> String {
    let h = Sha256::digest(b);
    format!(
        "sha256:{}",
        h.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn add(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, data).unwrap();
}

fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (n, d) in files {
        add(&mut b, n, d);
    }
    b.into_inner().unwrap()
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"]},
        "container_config": {"Hostname": "docker-only field"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// A docker-archive with the given (path, bytes) files and manifest.json.
fn docker_archive(files: &[(&str, Vec<u8>)], manifest: serde_json::Value) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (n, d) in files {
        add(&mut b, n, d);
    }
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    b.into_inner().unwrap()
}

/// A well-formed two-layer docker-archive tagged `names`.
fn good_archive(names: &[&str]) -> (Vec<u8>, String) {
    let l1 = layer_tar(&[("etc/hello", b"hello\n")]);
    let l2 = layer_tar(&[("etc/second", b"2\n")]);
    let cfg = config_json(&[sha(&l1), sha(&l2)]);
    let id = sha(&cfg);
    let a = docker_archive(
        &[
            ("aaa/layer.tar", l1),
            ("bbb/layer.tar", l2),
            ("cfg.json", cfg),
        ],
        serde_json::json!([{"Config": "cfg.json", "RepoTags": names,
                            "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]),
    );
    (a, id)
}

fn open(dir: &Path) -> Snapshotter {
    Snapshotter::open(dir, BackendKind::Copy).unwrap()
}

/// Nothing named, the store consistent, and GC leaves no blob or layer.
fn assert_store_empty(dir: &Path) {
    let snap = open(dir);
    let store = ImageStore::new(&snap);
    assert!(store.list().unwrap().is_empty());
    let check = snap.check().unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    drop(store);
    snap.gc().unwrap();
    assert!(snap.content().list().unwrap().is_empty());
    assert!(snap.layers().list().unwrap().is_empty());
}

#[test]
fn load_docker_archive_then_resolve_and_remove() {
    if !in_userns("load_docker_archive_then_resolve_and_remove") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = open(tmp.path());
    let store = ImageStore::new(&snap);
    let (bytes, id) = good_archive(&["busybox:1", "localhost/two"]);
    let loaded = archive::load(&store, Cursor::new(bytes)).unwrap();
    assert_eq!(loaded.format, archive::Format::DockerArchive);
    assert_eq!(
        loaded.images[0].names,
        vec!["docker.io/library/busybox:1", "localhost/two:latest"]
    );
    // the config is kept byte for byte: the ID is docker's
    assert_eq!(loaded.images[0].id.to_string(), id);
    let img = store.resolve("busybox:1").unwrap();
    assert_eq!(img.id().to_string(), id);
    assert_eq!(img.layers().len(), 2);
    let hex = &id["sha256:".len()..];
    assert_eq!(store.resolve(&hex[..12]).unwrap().id(), img.id());
    assert_eq!(store.resolve(&id).unwrap().id(), img.id());
    let by_digest = format!("busybox@{}", img.target.digest());
    assert_eq!(store.resolve(&by_digest).unwrap().id(), img.id());
    assert!(
        store.resolve("busybox").is_err(),
        "busybox:latest was never loaded"
    );
    let rows = store.list().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].created.as_deref(), Some("2024-01-01T00:00:00Z"));
    // the unpacked chain holds both layers' files
    let (chain, _) = store.unpack(&img).unwrap();
    assert_eq!(chain, img.chain_id().unwrap());
    // removing by ID with two names needs --force
    let err = store.remove(&hex[..12], false).unwrap_err().to_string();
    assert!(err.contains("several names"), "{err}");
    let r = store.remove("localhost/two", false).unwrap();
    assert_eq!(r.untagged, vec!["localhost/two:latest"]);
    assert!(r.deleted.is_empty());
    let r = store.remove("busybox:1", false).unwrap();
    assert_eq!(r.deleted.len(), 1);
    drop(store);
    drop(snap);
    assert_store_empty(tmp.path());
}

#[test]
fn malformed_archives_are_refused_naming_the_entry() {
    if !in_userns("malformed_archives_are_refused_naming_the_entry") {
        return;
    }
    let l1 = layer_tar(&[("etc/hello", b"hello\n")]);
    let good_cfg = config_json(&[sha(&l1)]);
    let wrong_cfg = config_json(&[sha(b"something else")]);
    let two_cfg = config_json(&[sha(&l1), sha(&l1)]);
    let entry = |cfg: &str, layers: &[&str]| serde_json::json!([{"Config": cfg, "RepoTags": ["bad:1"], "Layers": layers}]);
    let (good, _) = good_archive(&["bad:1"]);
    let mut evil_layer = tar::Builder::new(Vec::new());
    {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // tar's safe setters refuse `..`: write the name bytes directly
        h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../../escape");
        h.set_cksum();
        evil_layer.append(&h, &b"x"[..]).unwrap();
    }
    let evil_layer = evil_layer.into_inner().unwrap();
    let evil_cfg = config_json(&[sha(&evil_layer)]);
    let mut bad_blob = tar::Builder::new(Vec::new());
    add(
        &mut bad_blob,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    add(
        &mut bad_blob,
        &format!("blobs/sha256/{}", "ab".repeat(32)),
        b"not that",
    );
    let bad_blob = bad_blob.into_inner().unwrap();
    let mut dangling = tar::Builder::new(Vec::new());
    add(
        &mut dangling,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    let m = sha(b"missing manifest");
    add(
        &mut dangling,
        "index.json",
        serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m, "size": 16}]})
        .to_string()
        .as_bytes(),
    );
    let dangling = dangling.into_inner().unwrap();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "missing layer",
            docker_archive(
                &[("cfg.json", good_cfg.clone())],
                entry("cfg.json", &["l/layer.tar"]),
            ),
            "l/layer.tar",
        ),
        (
            "missing config",
            docker_archive(
                &[("l/layer.tar", l1.clone())],
                entry("cfg.json", &["l/layer.tar"]),
            ),
            "cfg.json",
        ),
        (
            "diffID mismatch",
            docker_archive(
                &[("l/layer.tar", l1.clone()), ("cfg.json", wrong_cfg)],
                entry("cfg.json", &["l/layer.tar"]),
            ),
            "l/layer.tar",
        ),
        (
            "layer count",
            docker_archive(
                &[("l/layer.tar", l1.clone()), ("cfg.json", two_cfg)],
                entry("cfg.json", &["l/layer.tar"]),
            ),
            "cfg.json",
        ),
        (
            "bad manifest.json",
            docker_archive(&[], serde_json::json!({"not": "a list"})),
            "manifest.json",
        ),
        (
            "config not json",
            docker_archive(
                &[("l/layer.tar", l1.clone()), ("cfg.json", b"{".to_vec())],
                entry("cfg.json", &["l/layer.tar"]),
            ),
            "cfg.json",
        ),
        (
            "bad name",
            docker_archive(
                &[("l/layer.tar", l1.clone()), ("cfg.json", good_cfg.clone())],
                serde_json::json!([{"Config": "cfg.json", "RepoTags": ["UPPER:1"], "Layers": ["l/layer.tar"]}]),
            ),
            "UPPER",
        ),
        (
            "layer escaping with ..",
            docker_archive(
                &[("l/layer.tar", evil_layer), ("cfg.json", evil_cfg)],
                entry("cfg.json", &["l/layer.tar"]),
            ),
            "..",
        ),
        (
            "oci blob with the wrong digest",
            bad_blob,
            "blobs/sha256/abab",
        ),
        ("oci index naming a missing blob", dangling, &m[7..]),
        ("truncated", good[..good.len() / 2].to_vec(), "archive"),
        ("not an archive", b"hello, world".repeat(100), "archive"),
        ("empty tar", vec![0u8; 1024], "neither a docker-archive"),
    ];
    for (what, bytes, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let snap = open(tmp.path());
        let store = ImageStore::new(&snap);
        let err = match archive::load(&store, Cursor::new(bytes)) {
            Ok(l) => panic!("{what}: loaded {:?}", l.images),
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    s.push_str(&format!(": {c}"));
                    src = c.source();
                }
                s
            }
        };
        eprintln!("{what}: {err}");
        assert!(
            err.contains(needle),
            "{what}: {err:?} does not name {needle:?}"
        );
        drop(store);
        drop(snap);
        assert_store_empty(tmp.path());
    }
}

fn rootfs(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/hello"), b"hello\n").unwrap();
    fs::write(dir.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    std::os::unix::fs::symlink("tool", dir.join("bin/link")).unwrap();
    std::os::unix::fs::chown(dir.join("etc/hello"), Some(1000), Some(1000)).unwrap();
}

#[test]
fn import_export_and_load_back() {
    if !in_userns("import_export_and_load_back") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    rootfs(&src);
    let snap = open(&tmp.path().join("state"));
    let store = ImageStore::new(&snap);
    let opts = ImportOptions {
        platform: Platform::parse("linux/arm64/v8").unwrap(),
        source_label: "src".into(),
        created: Some(0),
    };
    let img = import::import(&store, Source::Dir(&src), &opts).unwrap();
    assert_eq!(img.config.architecture().to_string(), "arm64");
    assert_eq!(img.config.variant().as_deref(), Some("v8"));
    assert_eq!(
        img.config.created().as_deref(),
        Some("1970-01-01T00:00:00Z")
    );
    assert_eq!(img.config.history().as_ref().unwrap().len(), 1);
    let name = store.tag("localhost/imp", &img.target).unwrap();
    assert_eq!(name, "localhost/imp:latest");
    let img = store.resolve("localhost/imp").unwrap();
    let none = ExportOptions::default();

    // oci tar, recompressed to zstd: same diffIDs, new layer digests
    let spec = OutputSpec::parse("type=oci,dest=-,compression=zstd,name=localhost/z").unwrap();
    let mut out = Vec::new();
    let ex = export_to(&store, &img, &spec, &none, &mut out).unwrap();
    assert_ne!(ex.manifest.digest(), img.manifest_descriptor.digest());
    let other = tempfile::tempdir().unwrap();
    let snap2 = open(other.path());
    let store2 = ImageStore::new(&snap2);
    let loaded = archive::load(&store2, Cursor::new(&out)).unwrap();
    assert_eq!(loaded.format, archive::Format::OciArchive);
    assert_eq!(loaded.images[0].names, vec!["localhost/z:latest"]);
    let back = store2.resolve("localhost/z").unwrap();
    assert_eq!(back.diff_ids().unwrap(), img.diff_ids().unwrap());
    assert_eq!(
        back.layers()[0].media_type().to_string(),
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );

    // docker archive, unchanged layers: the same image ID comes back
    let spec = OutputSpec::parse("type=docker,dest=-,name=localhost/d:1").unwrap();
    let mut out = Vec::new();
    export_to(&store, &img, &spec, &none, &mut out).unwrap();
    let loaded = archive::load(&store2, Cursor::new(&out)).unwrap();
    assert_eq!(loaded.format, archive::Format::DockerArchive);
    assert_eq!(loaded.images[0].names, vec!["localhost/d:1"]);
    let back = store2.resolve("localhost/d:1").unwrap();
    assert_eq!(back.diff_ids().unwrap(), img.diff_ids().unwrap());

    // rewrite-timestamp: every layer entry's mtime clamped, new diffIDs in
    // the config
    let spec = OutputSpec::parse("type=oci,dest=-,rewrite-timestamp=true").unwrap();
    let err = export_to(&store, &img, &spec, &none, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("SOURCE_DATE_EPOCH"), "{err}");
    let epoch = ExportOptions {
        source_date_epoch: Some(1000),
    };
    let mut out = Vec::new();
    let ex = export_to(&store, &img, &spec, &epoch, &mut out).unwrap();
    let blob = |d: &oci_spec::image::Digest| -> Vec<u8> {
        let mut a = tar::Archive::new(Cursor::new(&out));
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().ends_with(d.digest()) {
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                return v;
            }
        }
        panic!("{d} not in the export")
    };
    let manifest: serde_json::Value = serde_json::from_slice(&blob(ex.manifest.digest())).unwrap();
    let layer_digest: oci_spec::image::Digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let layer = blob(&layer_digest);
    let mut plain = Vec::new();
    flate2_free_gunzip(&layer, &mut plain);
    let mut a = tar::Archive::new(Cursor::new(&plain));
    let mut n = 0;
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        assert!(e.header().mtime().unwrap() <= 1000, "{:?}", e.path());
        n += 1;
    }
    assert!(n >= 4, "{n} entries");
    let config: serde_json::Value = serde_json::from_slice(&blob(&ex.config)).unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str().unwrap(),
        sha(&plain)
    );

    // local: the merged tree, every file owned by 0 (the caller on the host)
    let local = tmp.path().join("local");
    let spec = OutputSpec::parse(&format!("type=local,dest={}", local.display())).unwrap();
    export_to(&store, &img, &spec, &epoch, &mut Vec::new()).unwrap();
    assert_eq!(fs::read(local.join("etc/hello")).unwrap(), b"hello\n");
    assert_eq!(
        fs::read_link(local.join("bin/link")).unwrap(),
        Path::new("tool")
    );
    for p in ["etc/hello", "bin/tool", "bin/link", "etc"] {
        let m = fs::symlink_metadata(local.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{p}");
        assert!(m.mtime() <= 1000, "{p}");
    }

    // tar: the same tree as a stream, owners kept
    let spec = OutputSpec::parse("type=tar,dest=-").unwrap();
    let mut out = Vec::new();
    export_to(&store, &img, &spec, &none, &mut out).unwrap();
    let mut a = tar::Archive::new(Cursor::new(&out));
    let mut names = Vec::new();
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        let p = e.path().unwrap().display().to_string();
        if p == "etc/hello" {
            assert_eq!(e.header().uid().unwrap(), 1000);
        }
        names.push(p);
    }
    names.sort();
    assert_eq!(names, ["bin", "bin/link", "bin/tool", "etc", "etc/hello"]);

    // type=image names the (re-written) image in the store
    let spec = OutputSpec::parse("type=image,name=localhost/u,compression=uncompressed").unwrap();
    let ex = export_to(&store, &img, &spec, &none, &mut Vec::new()).unwrap();
    assert_eq!(ex.names, vec!["localhost/u:latest"]);
    let u = store.resolve("localhost/u").unwrap();
    assert_eq!(
        u.layers()[0].media_type().to_string(),
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(u.diff_ids().unwrap(), img.diff_ids().unwrap());
}

/// gunzip with the snapshotter's decoder (no extra dependency).
fn flate2_free_gunzip(data: &[u8], out: &mut Vec<u8>) {
    use kiln_snapshotter::compression::{decoder, detect};
    let mut r = std::io::BufReader::new(data);
    let kind = detect(&mut r).unwrap();
    decoder(r, kind).unwrap().read_to_end(out).unwrap();
}

/// An image without layers, distinguished by `n` (nothing to unpack, so
/// no user namespace is needed).
fn empty_image(store: &ImageStore<'_>, n: u32) -> kiln_builder::image::Image {
    let config: oci_spec::image::ImageConfiguration = serde_json::from_value(serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": {"n": n.to_string()}},
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .unwrap();
    store.write_image(&config, Vec::new()).unwrap()
}

#[test]
fn names_move_prefixes_resolve_or_are_ambiguous() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = open(tmp.path());
    let store = ImageStore::new(&snap);
    let a = empty_image(&store, 0);
    let b = empty_image(&store, 1);
    store.tag("app", &a.target).unwrap();
    assert_eq!(
        store.resolve("docker.io/library/app:latest").unwrap().id(),
        a.id()
    );
    // retagging moves the name; the old image is no longer listed
    store.tag("app:latest", &b.target).unwrap();
    assert_eq!(store.resolve("app").unwrap().id(), b.id());
    assert_eq!(store.list().unwrap().len(), 1);
    // an unnamed image is listed once, and dropped from the unnamed list
    // when it gets a name
    store.add_unnamed(&a.target).unwrap();
    store.add_unnamed(&a.target).unwrap();
    let rows = store.list().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().any(|r| r.name.is_none() && r.id == *a.id()));
    store.tag("localhost/a", &a.target).unwrap();
    assert!(store.list().unwrap().iter().all(|r| r.name.is_some()));
    // 17 images: two share a first hex digit, so one digit is ambiguous
    let mut ids = vec![a.id().digest().to_string(), b.id().digest().to_string()];
    for n in 2..17 {
        let i = empty_image(&store, n);
        store.add_unnamed(&i.target).unwrap();
        ids.push(i.id().digest().to_string());
    }
    let shared = (0..ids.len())
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .find(|&(i, j)| ids[i][..1] == ids[j][..1])
        .map(|(i, _)| ids[i][..1].to_string())
        .unwrap();
    let err = store.resolve(&shared).unwrap_err().to_string();
    assert!(err.contains("ambiguous"), "{err}");
    // a full ID always resolves
    assert_eq!(store.resolve(&ids[5]).unwrap().id().digest(), &ids[5]);
    assert!(store
        .resolve("localhost/none")
        .unwrap_err()
        .to_string()
        .contains("no image named"));
    assert!(store.resolve("Bad Name").is_err());
}

#[test]
fn written_json_is_canonical_so_digests_are_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = open(tmp.path());
    let store = ImageStore::new(&snap);
    let labels: serde_json::Map<String, serde_json::Value> = (0..40)
        .rev()
        .map(|i| {
            (
                format!("label{i:02}"),
                serde_json::Value::from(i.to_string()),
            )
        })
        .collect();
    let config: oci_spec::image::ImageConfiguration = serde_json::from_value(serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": labels, "ExposedPorts": {"80/tcp": {}, "443/tcp": {}, "22/tcp": {}}},
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .unwrap();
    let img = store.write_image(&config, Vec::new()).unwrap();
    let text = String::from_utf8(img.config_bytes.clone()).unwrap();
    let positions: Vec<usize> = (0..40)
        .map(|i| text.find(&format!("\"label{i:02}\"")).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    // the digest is a function of the content alone
    let again = store.write_image(&config, Vec::new()).unwrap();
    assert_eq!(again.id(), img.id());
    assert_eq!(again.target.digest(), img.target.digest());
}

#[test]
fn oci_archive_with_a_multi_platform_index_loads_the_host_platform() {
    if !in_userns("oci_archive_with_a_multi_platform_index_loads_the_host_platform") {
        return;
    }
    let host = Platform::host();
    let layer = layer_tar(&[("etc/os", b"host\n")]);
    let mut cfg: serde_json::Value = serde_json::from_slice(&config_json(&[sha(&layer)])).unwrap();
    cfg["architecture"] = host.architecture.clone().into();
    let cfg = serde_json::to_vec(&cfg).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(&cfg), "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha(&layer), "size": layer.len()}],
    }))
    .unwrap();
    // the other platform's manifest is not in the archive (skopeo copy
    // without --all leaves it out)
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": sha(b"elsewhere"), "size": 9,
             "platform": {"os": "linux", "architecture": "s390x"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": sha(&manifest), "size": manifest.len(),
             "platform": {"os": host.os, "architecture": host.architecture}},
        ],
    }))
    .unwrap();
    let top = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                       "digest": sha(&index), "size": index.len(),
                       "annotations": {"io.containerd.image.name": "localhost/multi:1",
                                       "org.opencontainers.image.ref.name": "1"}}],
    }))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, "index.json", &top);
    for blob in [&layer, &cfg, &manifest, &index] {
        add(&mut b, &format!("blobs/sha256/{}", &sha(blob)[7..]), blob);
    }
    add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    let bytes = b.into_inner().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let snap = open(tmp.path());
    let store = ImageStore::new(&snap);
    let loaded = archive::load(&store, Cursor::new(bytes)).unwrap();
    assert_eq!(loaded.images[0].names, vec!["localhost/multi:1"]);
    let img = store.resolve("localhost/multi:1").unwrap();
    assert_eq!(img.target.digest().to_string(), sha(&index));
    assert_eq!(img.manifest_descriptor.digest().to_string(), sha(&manifest));
    let s390x = ImageStore::new(&snap).with_platform(Platform::parse("linux/s390x").unwrap());
    let err = s390x.resolve("localhost/multi:1").unwrap_err().to_string();
    assert!(err.contains("no manifest for linux/s390x"), "{err}");
    // exporting writes the host platform's image (its plain layer kept
    // plain: by default an OCI output sends plain layers as gzip)
    let spec = OutputSpec::parse("type=oci,dest=-,compression=uncompressed").unwrap();
    let mut out = Vec::new();
    let ex = export_to(&store, &img, &spec, &ExportOptions::default(), &mut out).unwrap();
    assert_eq!(ex.manifest.digest().to_string(), sha(&manifest));
}

#[test]
fn oci_layout_directories_serve_as_build_contexts() {
    if !in_userns("oci_layout_directories_serve_as_build_contexts") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snap = open(&tmp.path().join("a"));
    let store = ImageStore::new(&snap);
    let (bytes, id) = good_archive(&["localhost/ctx:v1"]);
    archive::load(&store, Cursor::new(bytes)).unwrap();
    let img = store.resolve("localhost/ctx:v1").unwrap();
    let layout = tmp.path().join("layout");
    // layers kept as they are, so the layout holds the stored manifest
    let spec = OutputSpec::parse(&format!(
        "type=oci,dest={}/,name=localhost/ctx:v1,compression=uncompressed",
        layout.display()
    ))
    .unwrap();
    export_to(
        &store,
        &img,
        &spec,
        &ExportOptions::default(),
        &mut Vec::new(),
    )
    .unwrap();

    let snap2 = open(&tmp.path().join("b"));
    let store2 = ImageStore::new(&snap2);
    let sel = |s: &str| archive::parse_layout_ref(s);
    let (dir, only) = sel(layout.to_str().unwrap());
    let a = archive::load_layout_dir(&store2, &dir, &only).unwrap();
    assert_eq!(a.id().to_string(), id);
    let (dir, tag) = sel(&format!("{}:v1", layout.display()));
    assert_eq!(
        archive::load_layout_dir(&store2, &dir, &tag)
            .unwrap()
            .id()
            .to_string(),
        id
    );
    let (dir, digest) = sel(&format!(
        "{}@{}",
        layout.display(),
        img.manifest_descriptor.digest()
    ));
    assert_eq!(
        archive::load_layout_dir(&store2, &dir, &digest)
            .unwrap()
            .id()
            .to_string(),
        id
    );
    let (dir, missing) = sel(&format!("{}:v2", layout.display()));
    let err = archive::load_layout_dir(&store2, &dir, &missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains(":v2") && err.contains("v1"), "{err}");
    // the image is usable (unpacked), yet unnamed
    assert!(store2.list().unwrap().is_empty());
    assert!(snap2.layers().contains(&a.chain_id().unwrap().unwrap()));
}
