//! End-to-end tests of `--cache-to` / `--cache-from`: a cache exported by
//! one build lets a build on an empty state directory skip the steps it
//! covers; a damaged cache costs a rebuild, never a wrong result.

use kiln_vm_tests::{expect_success, kiln, Project};

const DOCKERFILE: &str = r#"FROM scratch AS builder
COPY rootfs/ /
RUN echo built-in-builder > /artifact && echo not-copied > /other

FROM scratch
COPY rootfs/ /
COPY --from=builder /artifact /artifact
RUN cat /artifact > /final && echo final-step-$((6*7))
"#;

fn project(name: &str) -> Project {
    Project::new(name, DOCKERFILE)
}

/// `kiln build --progress plain EXTRA...` on state directory `state`.
fn build(p: &Project, state: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["--progress", "plain"];
    args.extend_from_slice(extra);
    expect_success(kiln(p.build_args(state, &args)).output().unwrap())
}

#[test]
fn an_exported_cache_warms_an_empty_state_directory() {
    let p = project("cache-export");
    let max = p.state("cache-max");
    let min = p.state("cache-min");
    let (digest, err) = build(
        &p,
        "state-1",
        &[
            "--cache-to",
            &format!("type=local,dest={max},mode=max"),
            "--cache-to",
            &format!("type=local,dest={min}"),
        ],
    );
    assert!(err.contains("2 steps run"), "{err}");
    assert!(
        std::path::Path::new(&max).join("index.json").is_file(),
        "{err}"
    );
    // the build's own layers (stored plain) travel as gzip, as a push
    // sends them
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let max_dir = std::path::Path::new(&max);
    let index = read(max_dir.join("index.json"));
    let manifest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read(max_dir.join("blobs/sha256").join(&manifest[7..]));
    let types = kiln_vm_tests::layer_media_types(&manifest);
    assert!(
        !types.is_empty() && types.iter().all(|t| t.ends_with("+gzip")),
        "{types:?}"
    );

    // mode=max: a fresh state directory runs nothing and gives the same
    // image.
    let (digest2, err) = build(
        &p,
        "state-2",
        &["--cache-from", &format!("type=local,src={max}")],
    );
    assert!(err.contains("0 steps run"), "{err}");
    assert!(!err.contains("final-step-42"), "{err}");
    assert_eq!(digest, digest2);
    // the imported layers stay unpacked only: kiln's tar of each gives
    // back its plain digest, so no plain blob is written ...
    let content = std::path::Path::new(&p.state("state-2")).join("snapshots/content/blobs/sha256");
    let manifest2 = read(content.join(digest2.trim().trim_start_matches("sha256:")));
    let plain: Vec<String> = manifest2["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar")
        .map(|l| l["digest"].as_str().unwrap()[7..].to_string())
        .collect();
    assert!(!plain.is_empty(), "{manifest2}");
    for d in &plain {
        assert!(!content.join(d).exists(), "plain blob {d} was written");
    }
    // ... and they leave the store as they would have from the cold one
    let oci = |state: &str| {
        let dest = p.state(&format!("{state}.oci"));
        build(
            &p,
            state,
            &["-o", &format!("type=oci,dest={dest},tar=false")],
        );
        read(std::path::Path::new(&dest).join("index.json"))["manifests"][0]["digest"].clone()
    };
    assert_eq!(oci("state-1"), oci("state-2"));

    // mode=min holds only the final image's steps: the builder stage's
    // RUN runs again, the final stage's is a hit.
    let (digest3, err) = build(
        &p,
        "state-3",
        &["--cache-from", &format!("type=local,src={min}")],
    );
    assert!(err.contains("1 steps run"), "{err}");
    assert!(!err.contains("final-step-42"), "{err}");
    assert_eq!(digest, digest3);
}

#[test]
fn a_damaged_or_missing_cache_only_costs_a_rebuild() {
    let p = project("cache-export-damaged");
    let dir = p.state("cache");
    build(
        &p,
        "state-1",
        &["--cache-to", &format!("type=local,dest={dir},mode=max")],
    );
    // Flip a byte in every layer blob: their digests no longer hold.
    let blobs = std::path::Path::new(&dir).join("blobs/sha256");
    for e in std::fs::read_dir(&blobs).unwrap().flatten() {
        let mut bytes = std::fs::read(e.path()).unwrap();
        if bytes.len() > 1000 {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(e.path(), bytes).unwrap();
        }
    }
    let (_, err) = build(
        &p,
        "state-2",
        &["--cache-from", &format!("type=local,src={dir}")],
    );
    assert!(err.contains("WARNING: --cache-from"), "{err}");
    assert!(err.contains("final-step-42"), "{err}");
    assert!(err.contains("2 steps run"), "{err}");

    // A cache directory that does not exist: a warning, a full build.
    let (_, err) = build(
        &p,
        "state-3",
        &["--cache-from", &format!("type=local,src={dir}-missing")],
    );
    assert!(err.contains("WARNING: --cache-from"), "{err}");
    assert!(err.contains("2 steps run"), "{err}");
}

#[test]
fn a_zstd_cache_warms_an_empty_state_directory() {
    let p = project("cache-export-zstd");
    let dir = p.state("cache-zstd");
    let (digest, _) = build(
        &p,
        "state-1",
        &[
            "--cache-to",
            &format!("type=local,dest={dir},mode=max,compression=zstd,compression-level=5"),
        ],
    );
    let read = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let cache = std::path::Path::new(&dir);
    let index = read(cache.join("index.json"));
    let manifest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read(cache.join("blobs/sha256").join(&manifest[7..]));
    let types = kiln_vm_tests::layer_media_types(&manifest);
    assert!(
        !types.is_empty() && types.iter().all(|t| t.ends_with("+zstd")),
        "{types:?}"
    );
    let (digest2, err) = build(
        &p,
        "state-2",
        &["--cache-from", &format!("type=local,src={dir}")],
    );
    assert!(err.contains("0 steps run"), "{err}");
    assert_eq!(digest, digest2);
    let bad = kiln(p.build_args(
        "state-1",
        &[
            "--cache-to",
            &format!("type=local,dest={dir},compression=brotli"),
        ],
    ))
    .output()
    .unwrap();
    let err = kiln_vm_tests::expect_failure(bad);
    assert!(
        err.contains("compression") && err.contains("brotli"),
        "{err}"
    );
}
