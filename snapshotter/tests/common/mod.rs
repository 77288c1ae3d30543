//! Shared helpers of the snapshotter's integration tests: running a test
//! body inside a user namespace the way kiln runs (uid 0 = the test user,
//! 1..65536 = its subordinate ids, private mount namespace), and comparing
//! trees file by file.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

/// Serve fuse views from the snapshotter's server program: a test binary
/// cannot serve them itself.
pub fn use_fuse_server() {
    kiln_snapshotter::backend::fuse::set_server_program(env!("CARGO_BIN_EXE_kiln-fuse-server"));
}

/// Run the test `name` (this very test) inside a fresh user namespace as
/// the unprivileged test user ([`kiln_vm_tests::rerun_in_userns`], which
/// echoes the `differential:` summary lines). Returns true when the caller
/// is already inside and should run its body; views are then served by the
/// snapshotter's fuse server program.
pub fn in_userns(name: &str) -> bool {
    if !kiln_vm_tests::rerun_in_userns(name, &["differential:"]) {
        return false;
    }
    use_fuse_server();
    true
}

/// A description of every node under `root` (not `root` itself): path,
/// type, mode, owner, mtime, size and content hash, link target, xattrs and
/// hard-link group. Two trees with equal listings are equal for a build.
pub fn listing(root: &Path) -> Vec<String> {
    listing_clamped(root, None)
}

/// [`listing`] with mtimes clamped to at most `epoch`, as a layer written
/// with SOURCE_DATE_EPOCH has them.
pub fn listing_clamped(root: &Path, epoch: Option<i64>) -> Vec<String> {
    let mut out = Vec::new();
    let mut links = HashMap::new();
    walk(root, root, &mut out, &mut links, epoch);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<String>,
    links: &mut HashMap<u64, String>,
    epoch: Option<i64>,
) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let path = dir.join(&name);
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let m = fs::symlink_metadata(&path).unwrap();
        let ft = m.file_type();
        let mut line = format!("{rel} {:o} {}:{}", m.mode(), m.uid(), m.gid());
        if !ft.is_dir() {
            line += &format!(" mtime={}", epoch.map_or(m.mtime(), |e| m.mtime().min(e)));
        }
        if ft.is_file() {
            let mut h = Sha256::new();
            let mut f = fs::File::open(&path).unwrap();
            let mut buf = vec![0; 1 << 16];
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            line += &format!(" size={} sha={:x}", m.len(), h.finalize());
            if m.nlink() > 1 {
                let first = links.entry(m.ino()).or_insert_with(|| rel.clone());
                line += &format!(" linkgroup={first}");
            }
        }
        if ft.is_symlink() {
            line += &format!(" -> {}", fs::read_link(&path).unwrap().display());
        }
        for (k, v) in xattrs(&path) {
            line += &format!(" xattr:{k}={v}");
        }
        out.push(line);
        if ft.is_dir() {
            walk(root, &path, out, links, epoch);
        }
    }
}

/// Content xattrs of a path (overlay ones excluded), as `name=value` text.
pub fn xattrs(path: &Path) -> Vec<(String, String)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for its length and `c` is NUL-terminated.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf.truncate(usize::try_from(n).unwrap());
    let mut out = Vec::new();
    for name in buf.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let s = String::from_utf8_lossy(name).into_owned();
        if s.starts_with("user.overlay.")
            || s.starts_with("trusted.overlay.")
            || s == "security.selinux"
        {
            continue;
        }
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: `v` is writable for its length; both strings are NUL-terminated.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        v.truncate(usize::try_from(len.max(0)).unwrap());
        out.push((s, String::from_utf8_lossy(&v).into_owned()));
    }
    out.sort();
    out
}

/// Run a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Set an xattr on a path (panics on failure).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: strings are NUL-terminated; `value` readable for its length.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Remove an xattr from a path (panics on failure).
pub fn remove_xattr(path: &Path, name: &str) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated.
    let rc = unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) };
    assert_eq!(
        rc,
        0,
        "removexattr {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// Set a path's mtime (and atime), not following symlinks.
pub fn set_mtime(path: &Path, secs: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: `ts` holds two valid timespecs and `c` is NUL-terminated.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// `lchown` (panics on failure).
pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}
