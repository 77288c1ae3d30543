//! Crash safety: a process killed with SIGKILL in the middle of a commit
//! leaves a store that the next open cleans up and that verifies and keeps
//! working.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::compression::Compression;
use kiln_snapshotter::diff::DiffOptions;
use kiln_snapshotter::snapshot::Snapshotter;

const ROOT_ENV: &str = "KILN_CRASH_ROOT";

/// Helper run as a child process by the test below: a large commit.
#[test]
#[ignore = "helper process of kill_during_commit_leaves_a_consistent_store"]
fn crash_helper() {
    let Ok(root) = std::env::var(ROOT_ENV) else {
        return;
    };
    let snap = Snapshotter::open(Path::new(&root), BackendKind::Copy).unwrap();
    let v = snap
        .prepare(&format!("big-{}", std::process::id()), None)
        .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let files: usize = std::env::var("KILN_HELPER_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    for i in 0..files {
        let dir = v.path().join(format!("d{}", i % 8));
        fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..256 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        fs::write(dir.join(format!("f{i}")), data).unwrap();
    }
    println!("COMMITTING");
    std::io::stdout().flush().unwrap();
    let c = snap
        .commit(
            v,
            DiffOptions {
                compression: Compression::Gzip { level: 9 },
                source_date_epoch: None,
            },
        )
        .unwrap();
    snap.content()
        .set_ref(&format!("img-{}", std::process::id()), &c.blob)
        .unwrap();
    snap.layers()
        .pin(&format!("img-{}", std::process::id()), &c.chain_id)
        .unwrap();
    println!("DONE");
}

fn kill_at(root: &Path, delay: Duration) -> bool {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(kiln_vm_tests::one_test_args("crash_helper"))
        .env(ROOT_ENV, root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "helper exited before committing"
        );
        if line.contains("COMMITTING") {
            break;
        }
    }
    std::thread::sleep(delay);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    rest.contains("DONE")
}

fn body() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let mut killed_mid_commit = 0;
    let mut partial_blobs = 0;
    for ms in [0, 150, 600, 1500, 3000] {
        let finished = kill_at(&root, Duration::from_millis(ms));
        killed_mid_commit += usize::from(!finished);
        // what the kill left behind, before anything cleans it
        let partial = fs::read_dir(root.join("content/.kiln/ingest")).map_or(0, |d| d.count());
        partial_blobs += partial;
        eprintln!("killed at {ms} ms: finished={finished}, partial blobs={partial}");
        let snap = Snapshotter::open(&root, BackendKind::Copy).unwrap();
        // the dead process's scratch files are gone
        let ingest: Vec<_> = fs::read_dir(root.join("content/.kiln/ingest"))
            .unwrap()
            .collect();
        assert!(
            ingest.is_empty(),
            "ingest leftovers after {ms} ms: {ingest:?}"
        );
        let tmp: Vec<_> = fs::read_dir(root.join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "tmp leftovers after {ms} ms: {tmp:?}");
        let views: Vec<_> = fs::read_dir(root.join("views")).unwrap().collect();
        assert!(views.is_empty(), "view leftovers after {ms} ms: {views:?}");
        // every visible blob and layer is whole
        let report = snap.check().unwrap();
        assert!(
            report.problems.is_empty(),
            "after kill at {ms} ms: {:?}",
            report.problems
        );
        // and the store works
        let v = snap.prepare("after", None).unwrap();
        fs::write(v.path().join("f"), format!("after {ms}")).unwrap();
        let c = snap.commit(v, DiffOptions::default()).unwrap();
        let v = snap.view("look", Some(&c.chain_id)).unwrap();
        assert_eq!(
            fs::read_to_string(v.path().join("f")).unwrap(),
            format!("after {ms}")
        );
        drop(v);
        drop(snap);
        let snap = Snapshotter::open(&root, BackendKind::Copy).unwrap();
        snap.gc().unwrap();
        assert!(snap.check().unwrap().problems.is_empty());
    }
    assert!(
        killed_mid_commit >= 2,
        "the helper must be killed inside its commit"
    );
    assert!(
        partial_blobs >= 1,
        "at least one kill must hit the blob write"
    );
}

#[test]
fn kill_during_commit_leaves_a_consistent_store() {
    if in_userns("kill_during_commit_leaves_a_consistent_store") {
        body();
    }
}

fn concurrent_body() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(&exe)
                .args(kiln_vm_tests::one_test_args("crash_helper"))
                .env(ROOT_ENV, &root)
                .env("KILN_HELPER_FILES", "16")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("DONE"),
            "writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let snap = Snapshotter::open(&root, BackendKind::Copy).unwrap();
    assert_eq!(
        snap.content().index().unwrap().manifests().len(),
        3,
        "no index update lost"
    );
    let report = snap.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // writers that finish within the same second commit identical layers,
    // which the store keeps once
    assert!((1..=3).contains(&report.layers), "{report:?}");
    // pinned by each writer: GC keeps them
    let (gc, _) = snap.gc().unwrap();
    assert!(gc.removed.is_empty(), "{gc:?}");
}

#[test]
fn concurrent_processes_share_a_store() {
    if in_userns("concurrent_processes_share_a_store") {
        concurrent_body();
    }
}
