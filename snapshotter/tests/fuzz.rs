//! Mutation fuzzing of apply: thousands of damaged variants of a valid
//! layer (bytes flipped, truncated, gzip-wrapped) never panic, and never
//! write outside the target directory.

mod common;

use std::fs;
use std::io::Write;

use common::*;
use kiln_snapshotter::apply::apply;

/// A small but varied valid layer, from kiln's own diff.
fn seed_layer(dir: &std::path::Path) -> Vec<u8> {
    let src = dir.join("seed");
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/file"), b"content").unwrap();
    fs::write(src.join("a").join("long-".repeat(30)), b"long name").unwrap();
    std::os::unix::fs::symlink("../a/b/file", src.join("a/link")).unwrap();
    fs::hard_link(src.join("a/b/file"), src.join("hard")).unwrap();
    set_xattr(&src.join("hard"), "user.x", b"1");
    kiln_snapshotter::diff::write_tar(&src, Vec::new(), Some(1)).unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

fn body() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed_layer(dir.path());
    let canary = dir.path().join("canary");
    fs::create_dir_all(&canary).unwrap();
    fs::write(canary.join("file"), b"canary").unwrap();
    let outside_before = listing(dir.path());
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut failures = 0;
    for i in 0..600 {
        let mut data = seed.clone();
        match i % 3 {
            // flip a few bytes, mostly in headers
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(data.len());
                    data[at] ^= 1 << rng.below(8);
                }
            }
            // truncate anywhere
            _ => data.truncate(rng.below(data.len())),
        }
        if i % 5 == 0 {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&data).unwrap();
            data = gz.finish().unwrap();
        }
        let target = dir.path().join("work/target");
        fs::create_dir_all(&target).unwrap();
        if apply(&data[..], &target, &[]).is_err() {
            failures += 1;
        }
        fs::remove_dir_all(dir.path().join("work")).unwrap();
    }
    assert_eq!(
        listing(dir.path()),
        outside_before,
        "nothing outside the target changed"
    );
    assert!(
        failures > 50,
        "most damaged layers are refused ({failures})"
    );
}

#[test]
fn damaged_layers_never_panic_or_escape() {
    if in_userns("damaged_layers_never_panic_or_escape") {
        body();
    }
}
