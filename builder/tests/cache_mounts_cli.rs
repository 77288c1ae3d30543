//! `kiln du` and `kiln prune` over cache mounts, end to end through the
//! binary: instances made with the store's API (as a build step would get
//! them) are counted, a held one survives prune, a free one goes, and
//! `--keep-duration` keeps a recently used one.

use std::path::Path;
use std::process::Command;

use kiln_builder::image::cache_mounts::{CacheMounts, Init, Sharing};
use kiln_builder::image::StateDir;

fn kiln(root: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mounts_row(root: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&kiln(root, &["du", "--format", "json"])).unwrap();
    v["cache_mounts"].clone()
}

#[test]
fn du_counts_and_prune_frees_cache_mounts_no_build_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    // du on a new state directory: nothing, and no store created
    assert_eq!(mounts_row(&root)["total"], 0);
    let state = StateDir::open(Some(&root)).unwrap();
    assert!(!state.cache_mounts_dir().exists());

    let store = CacheMounts::open(&state.cache_mounts_dir()).unwrap();
    let held = store
        .acquire("/root/.cache", Sharing::Shared, Init::default())
        .unwrap();
    let free = store
        .acquire("/go/pkg", Sharing::Locked, Init::default())
        .unwrap();
    std::fs::write(held.path().join("a"), vec![1u8; 200_000]).unwrap();
    std::fs::write(free.path().join("b"), vec![2u8; 300_000]).unwrap();
    drop(free);

    let row = mounts_row(&root);
    assert_eq!(row["total"], 2, "{row}");
    assert_eq!(row["active"], 1, "{row}");
    let size = row["size"].as_u64().unwrap();
    let reclaimable = row["reclaimable"].as_u64().unwrap();
    assert!(size >= 500_000 && reclaimable >= 300_000, "{row}");
    assert!(reclaimable < size, "{row}");

    // used just now: kept
    kiln(&root, &["prune", "--keep-duration", "1h"]);
    assert_eq!(mounts_row(&root)["total"], 2);

    let out = kiln(&root, &["prune"]);
    assert!(out.contains("cache mount /go/pkg"), "{out}");
    assert!(!out.contains("/root/.cache"), "{out}");
    let row = mounts_row(&root);
    assert_eq!(row["total"], 1, "{row}");
    assert_eq!(row["active"], 1, "{row}");
    assert_eq!(std::fs::read(held.path().join("a")).unwrap().len(), 200_000);

    drop(held);
    kiln(&root, &["prune"]);
    assert_eq!(mounts_row(&root)["total"], 0);
}
