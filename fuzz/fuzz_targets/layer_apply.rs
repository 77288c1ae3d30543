//! Layer apply: a layer tar is untrusted (pulled, loaded, or imported from
//! a build context). `apply` must never panic and must never create, change
//! or follow anything outside the directory it applies into, whatever the
//! entries' paths, link targets and types.
//!
//! Each input is applied into `TMP/root` of a fresh temporary directory
//! `TMP`, beside a sentinel file `TMP/outside` and a lower layer `TMP/lower`
//! (read to copy up hard link targets, never written); afterwards `TMP`
//! must hold exactly those three and the sentinel and lower file must be
//! unchanged.

#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;

const SENTINEL: &[u8] = b"must not change";

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let root = tmp.path().join("root");
    fs::create_dir(&root).expect("create root");
    fs::write(tmp.path().join("outside"), SENTINEL).expect("write sentinel");
    let lower = tmp.path().join("lower");
    fs::create_dir_all(lower.join("etc")).expect("create lower");
    fs::write(lower.join("etc/passwd"), SENTINEL).expect("write lower file");

    let _ = kiln_snapshotter::apply::apply(data, &root, std::slice::from_ref(&lower));

    let mut names: Vec<_> = fs::read_dir(tmp.path())
        .expect("read the temporary directory")
        .map(|e| e.expect("directory entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["lower", "outside", "root"],
        "apply created or removed something outside its target"
    );
    let meta = fs::symlink_metadata(tmp.path().join("outside")).expect("sentinel");
    assert!(meta.file_type().is_file(), "sentinel replaced");
    assert_eq!(
        fs::read(tmp.path().join("outside")).expect("read sentinel"),
        SENTINEL
    );
    assert_eq!(
        fs::read(lower.join("etc/passwd")).expect("read lower file"),
        SENTINEL,
        "apply wrote into a lower layer"
    );
    let root_meta = fs::symlink_metadata(&root).expect("root");
    assert!(
        root_meta.file_type().is_dir(),
        "the target itself was replaced"
    );
    // an entry may have made a directory read-only; let the temporary
    // directory's removal descend into it
    make_writable(&root);
});

fn make_writable(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}
