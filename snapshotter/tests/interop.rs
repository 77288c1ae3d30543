//! Interop with the OCI tools that serve as oracles: an image kiln writes
//! unpacks with `umoci unpack` to exactly kiln's own view of it, and an
//! image built by `umoci` (copied into kiln's store by `skopeo`) unpacks in
//! kiln to exactly what `umoci unpack` gives.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::*;
use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::compression::Compression;
use kiln_snapshotter::diff::DiffOptions;
use kiln_snapshotter::snapshot::{Committed, Snapshotter};
use oci_spec::image::{
    Arch, Descriptor, ImageConfigurationBuilder, ImageManifestBuilder, MediaType, Os, RootFs,
};

/// Write a config and manifest for `layers` and name the image `name`.
fn write_image(snap: &Snapshotter, layers: &[Committed], name: &str) -> Descriptor {
    let mut rootfs = RootFs::default();
    rootfs.set_diff_ids(layers.iter().map(|l| l.diff_id.to_string()).collect());
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .rootfs(rootfs)
        .build()
        .unwrap();
    let cfg = snap
        .content()
        .put_bytes(
            MediaType::ImageConfig,
            &serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(cfg)
        .layers(layers.iter().map(|l| l.blob.clone()).collect::<Vec<_>>())
        .build()
        .unwrap();
    let m = snap
        .content()
        .put_bytes(
            MediaType::ImageManifest,
            &serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
    snap.content().set_ref(name, &m).unwrap();
    m
}

fn populate(root: &Path) {
    kiln_vm_tests::busybox_rootfs(root);
    let deep = root
        .join("usr/share")
        .join("a-rather-long-directory-name-".repeat(4));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("file-with-a-long-name-".repeat(3)), b"deep").unwrap();
    fs::write(root.join("etc/motd"), b"hello").unwrap();
    fs::hard_link(root.join("etc/motd"), root.join("etc/motd.link")).unwrap();
    fs::write(root.join("bin/setuid-tool"), b"#!/bin/sh\n").unwrap();
    run(Command::new("chmod")
        .arg("4755")
        .arg(root.join("bin/setuid-tool")));
    chown(&root.join("home/user"), 1000, 1000);
    fs::write(root.join("home/user/notes"), b"mine").unwrap();
    chown(&root.join("home/user/notes"), 1000, 1000);
    set_xattr(&root.join("etc/motd"), "user.kiln.test", b"value");
    fs::create_dir_all(root.join("var/cache/apt")).unwrap();
    fs::write(root.join("var/cache/apt/pkg"), b"cached").unwrap();
}

fn kiln_image_unpacks_with_umoci() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("kiln");
    let snap = Snapshotter::open(&root, BackendKind::Copy).unwrap();
    let v = snap.prepare("base", None).unwrap();
    populate(v.path());
    let base = snap.commit(v, DiffOptions::default()).unwrap();
    let v = snap.prepare("step", Some(&base.chain_id)).unwrap();
    fs::remove_file(v.path().join("bin/ls")).unwrap();
    fs::remove_dir_all(v.path().join("var/cache")).unwrap();
    fs::create_dir_all(v.path().join("var/cache/new")).unwrap();
    fs::write(v.path().join("etc/motd"), b"changed").unwrap();
    let step = snap
        .commit(
            v,
            DiffOptions {
                // umoci 0.4 reads gzip and plain layers, not zstd
                compression: Compression::None,
                source_date_epoch: None,
            },
        )
        .unwrap();
    // a plain layer a commit made stays unpacked (ContentStore::put_lazy):
    // written out as a file here, so that umoci finds a whole OCI layout
    let plain = step.blob.digest();
    assert!(!snap.content().blob_path(plain).unwrap().exists());
    let bytes = snap.content().read_blob(plain).unwrap();
    let mut w = snap.content().writer(Some(plain.clone())).unwrap();
    w.write_all(&bytes).unwrap();
    w.commit().unwrap();
    write_image(&snap, &[base, step.clone()], "latest");

    let v = snap.view("check", Some(&step.chain_id)).unwrap();
    let kiln = listing(v.path());
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:latest", snap.content().root().display()))
        .arg(&bundle));
    let umoci = listing(&bundle.join("rootfs"));
    assert_eq!(umoci, kiln, "umoci unpacks kiln's image to kiln's view");
    assert!(kiln.iter().any(|l| l.starts_with("var/cache/new ")));
    assert!(!kiln
        .iter()
        .any(|l| l.starts_with("bin/ls ") || l.starts_with("var/cache/apt")));
}

fn umoci_image_applies_in_kiln() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let src = dir.path().join("src");
    populate(&src);
    let extra = dir.path().join("extra");
    fs::create_dir_all(extra.join("sub")).unwrap();
    fs::write(extra.join("sub/data"), b"extra data").unwrap();
    let etc = dir.path().join("newetc");
    fs::create_dir_all(&etc).unwrap();
    fs::write(etc.join("only-file"), b"opaque etc").unwrap();
    let image = format!("{}:base", layout.display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&src)
        .arg("/"));
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&extra)
        .arg("/opt/extra"));
    run(Command::new("umoci").args(["insert", "--image", &image, "--whiteout", "/bin/ls"]));
    run(Command::new("umoci")
        .args(["insert", "--image", &image, "--opaque"])
        .arg(&etc)
        .arg("/etc"));

    let root = dir.path().join("kiln");
    let snap = Snapshotter::open(&root, BackendKind::Copy).unwrap();
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy"])
        .arg(format!("oci:{image}"))
        .arg(format!("oci:{}:base", snap.content().root().display())));
    let desc = snap
        .content()
        .resolve("base")
        .unwrap()
        .expect("skopeo named the image");
    let (top, reports) = snap.unpack_image(desc.digest()).unwrap();
    assert_eq!(reports.len(), 4);
    let v = snap.view("check", top.as_ref()).unwrap();
    let kiln = listing(v.path());

    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let umoci = listing(&bundle.join("rootfs"));
    assert_eq!(kiln, umoci, "kiln applies umoci's image as umoci does");
    assert!(kiln.iter().any(|l| l.starts_with("etc/only-file ")));
    assert!(!kiln
        .iter()
        .any(|l| l.starts_with("etc/passwd ") || l.starts_with("bin/ls ")));
    // all blobs skopeo wrote verify, and GC keeps the named image
    for d in snap.content().list().unwrap() {
        snap.content().verify(&d).unwrap();
    }
    drop(v);
    let (report, removed) = snap.gc().unwrap();
    assert!(
        report.removed.is_empty() && removed.is_empty(),
        "{report:?} {removed:?}"
    );
}

#[test]
fn kiln_layers_unpack_with_umoci() {
    if in_userns("kiln_layers_unpack_with_umoci") {
        kiln_image_unpacks_with_umoci();
    }
}

#[test]
fn umoci_and_skopeo_images_apply_in_kiln() {
    if in_userns("umoci_and_skopeo_images_apply_in_kiln") {
        umoci_image_applies_in_kiln();
    }
}
