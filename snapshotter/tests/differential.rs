//! Differential fuzzing of the view backends: random operation sequences
//! over two lower layers (the second with whiteouts and opaque
//! directories), run in lockstep on the FUSE view, kernel overlayfs and the
//! copy backend, and compared call by call (result and errno, data read),
//! by what the step sees at the end (type, mode, owner, size, content, link
//! target, xattrs, hard-link groups, directory listings) and by the
//! committed layer tar, byte for byte. A difference fails with the shortest
//! sequence that still shows it.
//!
//! The copy backend is a plain directory, so it is the reference for what
//! a step sees: the FUSE view must match it in everything. Kernel overlayfs
//! (as kiln mounts it: no index, no redirect_dir) differs from a plain
//! directory in two documented ways, which the harness accounts for:
//! renaming a directory that has lower content answers EXDEV (the harness
//! then does what `mv` does: copy, then remove), and a hard-linked lower
//! file is broken apart by copy-up (so sequences over lower hard links are
//! compared with overlayfs only up to that point, see `overlay_comparable`).
//!
//! CI runs a fixed list of seeds; `KILN_DIFF_SECONDS=N` runs random seeds
//! for N seconds instead (`KILN_DIFF_SEED=S` replays one).

mod common;

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::compression::Compression;
use kiln_snapshotter::diff::DiffOptions;
use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::Digest;

/// Times of files the base layers write and of those the steps set.
const BASE_TIME: i64 = 1_600_000_000;
/// SOURCE_DATE_EPOCH of every commit: changed files are clamped to it.
const EPOCH: i64 = 1_700_000_000;
/// Seeds CI runs (each a base and a sequence).
const CI_SEEDS: std::ops::Range<u64> = 1..41;
/// Operations per sequence.
const OPS: usize = 24;

/// xorshift64*: a small, seedable generator (no crate needed for this).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// A path of one to three components from a small alphabet, so that
    /// operations collide often.
    fn path(&mut self) -> String {
        let depth = 1 + self.below(3);
        (0..depth)
            .map(|_| ["a", "b", "c"][self.below(3)])
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// open (creating, optionally truncating) and write `len` bytes of
    /// `byte` at `offset`
    Write {
        path: String,
        byte: u8,
        len: usize,
        offset: i64,
        trunc: bool,
    },
    Append {
        path: String,
        byte: u8,
    },
    Truncate {
        path: String,
        len: i64,
    },
    Read {
        path: String,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    /// renameat2 with flags 0, RENAME_NOREPLACE or RENAME_EXCHANGE
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    /// `rm -r`
    RmTree {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        id: u32,
    },
    Utimes {
        path: String,
        secs: i64,
    },
    Symlink {
        target: String,
        path: String,
    },
    Mkfifo {
        path: String,
    },
    SetXattr {
        path: String,
        name: &'static str,
        value: u8,
    },
    RemoveXattr {
        path: String,
        name: &'static str,
    },
    /// keep a descriptor in `slot` (read-write, or read-only)
    Open {
        slot: usize,
        path: String,
        write: bool,
    },
    WriteFd {
        slot: usize,
        byte: u8,
        len: usize,
    },
    ReadFd {
        slot: usize,
    },
    Close {
        slot: usize,
    },
}

const XATTRS: [&str; 2] = ["user.one", "user.two"];
const SLOTS: usize = 2;

fn random_op(r: &mut Rng) -> Op {
    match r.below(22) {
        0..=2 => Op::Write {
            path: r.path(),
            byte: b'a' + u8::try_from(r.below(26)).unwrap_or(0),
            len: 1 + r.below(6000),
            offset: i64::try_from(if r.chance(70) { 0 } else { r.below(9000) }).unwrap_or(0),
            trunc: r.chance(40),
        },
        3 => Op::Append {
            path: r.path(),
            byte: b'A' + u8::try_from(r.below(26)).unwrap_or(0),
        },
        4 => Op::Truncate {
            path: r.path(),
            len: i64::try_from(r.below(5000)).unwrap_or(0),
        },
        5 => Op::Read { path: r.path() },
        6 => Op::Link {
            from: r.path(),
            to: r.path(),
        },
        7 => Op::Unlink { path: r.path() },
        8 | 9 => Op::Rename {
            from: r.path(),
            to: r.path(),
            flags: [0, 0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][r.below(5)],
        },
        10 | 11 => Op::Mkdir { path: r.path() },
        12 => Op::Rmdir { path: r.path() },
        13 => Op::RmTree { path: r.path() },
        14 => Op::Chmod {
            path: r.path(),
            mode: [0o600, 0o644, 0o755, 0o4755, 0o700][r.below(5)],
        },
        15 => Op::Chown {
            path: r.path(),
            id: [0, 1000][r.below(2)],
        },
        16 => Op::Utimes {
            path: r.path(),
            secs: BASE_TIME - 1000 * i64::try_from(r.below(50)).unwrap_or(0),
        },
        17 => {
            if r.chance(50) {
                Op::Symlink {
                    target: r.path(),
                    path: r.path(),
                }
            } else {
                Op::Mkfifo { path: r.path() }
            }
        }
        18 => {
            if r.chance(60) {
                Op::SetXattr {
                    path: r.path(),
                    name: XATTRS[r.below(2)],
                    value: b'0' + u8::try_from(r.below(10)).unwrap_or(0),
                }
            } else {
                Op::RemoveXattr {
                    path: r.path(),
                    name: XATTRS[r.below(2)],
                }
            }
        }
        19 => Op::Open {
            slot: r.below(SLOTS),
            path: r.path(),
            write: r.chance(70),
        },
        20 => {
            if r.chance(70) {
                Op::WriteFd {
                    slot: r.below(SLOTS),
                    byte: b'0' + u8::try_from(r.below(10)).unwrap_or(0),
                    len: 1 + r.below(3000),
                }
            } else {
                Op::ReadFd {
                    slot: r.below(SLOTS),
                }
            }
        }
        _ => Op::Close {
            slot: r.below(SLOTS),
        },
    }
}

/// Runs operations on one view, keeping the descriptors they open.
struct Exec {
    root: PathBuf,
    fds: Vec<Option<OwnedFd>>,
    /// the copy backend's view: where operations the backends may
    /// legitimately refuse are judged
    reference: bool,
    /// a rename fell back to copying (EXDEV, as `mv` does) a tree holding
    /// a file with other names: the copy breaks those links
    broke_links: bool,
}

fn cpath(root: &Path, rel: &str) -> CString {
    CString::new(root.join(rel).as_os_str().as_bytes()).unwrap()
}

/// `rc` of a libc call as the result text: "ok" or the errno's name.
fn result(rc: libc::c_long) -> String {
    if rc >= 0 {
        "ok".into()
    } else {
        errno_text()
    }
}

fn errno_text() -> String {
    let e = std::io::Error::last_os_error();
    format!("err:{}", e.raw_os_error().unwrap_or(0))
}

/// What a read returned, short enough to print.
fn content(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("ok:{}:{:.12x}", bytes.len(), sha2::Sha256::digest(bytes))
}

fn read_fd(fd: i32) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut off: i64 = 0;
    loop {
        // SAFETY: `buf` is valid for its length; `fd` is open.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) };
        if n < 0 {
            return errno_text();
        }
        if n == 0 {
            break;
        }
        let n = usize::try_from(n).unwrap_or(0);
        out.extend_from_slice(&buf[..n]);
        off += i64::try_from(n).unwrap_or(0);
    }
    content(&out)
}

impl Exec {
    fn new(root: &Path) -> Exec {
        Exec {
            root: root.to_path_buf(),
            fds: (0..SLOTS).map(|_| None).collect(),
            reference: false,
            broke_links: false,
        }
    }

    fn close_all(&mut self) {
        for f in &mut self.fds {
            *f = None;
        }
    }

    /// Run `op`, returning what it did as text.
    fn run(&mut self, op: &Op) -> String {
        let p = |rel: &str| cpath(&self.root, rel);
        // SAFETY: for every libc call below, the paths are NUL-terminated
        // strings that live across the call, buffers are valid for the
        // lengths given, and descriptors are open ones we own.
        unsafe {
            match op {
                Op::Write {
                    path,
                    byte,
                    len,
                    offset,
                    trunc,
                } => {
                    let mut flags =
                        libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NONBLOCK;
                    if *trunc {
                        flags |= libc::O_TRUNC;
                    }
                    let fd = libc::open(p(path).as_ptr(), flags, 0o644);
                    if fd < 0 {
                        return errno_text();
                    }
                    let fd = OwnedFd::from_raw_fd(fd);
                    let data = vec![*byte; *len];
                    result(
                        libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), *offset)
                            as libc::c_long,
                    )
                }
                Op::Append { path, byte } => {
                    let fd = libc::open(
                        p(path).as_ptr(),
                        libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC | libc::O_NONBLOCK,
                    );
                    if fd < 0 {
                        return errno_text();
                    }
                    let fd = OwnedFd::from_raw_fd(fd);
                    let data = [*byte, b'\n'];
                    result(libc::write(fd.as_raw_fd(), data.as_ptr().cast(), 2) as libc::c_long)
                }
                Op::Truncate { path, len } => {
                    // to the size the file has: ext4 (the copy backend,
                    // overlayfs) moves mtime, the FUSE view (writeback
                    // cache) keeps it; POSIX asks neither. Not compared:
                    // judged on the reference view.
                    let same = fs::symlink_metadata(self.root.join(path))
                        .is_ok_and(|m| m.is_file() && i64::try_from(m.len()) == Ok(*len));
                    if self.reference && same {
                        return "skip:truncate-same-size".into();
                    }
                    result(libc::truncate(p(path).as_ptr(), *len).into())
                }
                Op::Read { path } => {
                    let fd = libc::open(
                        p(path).as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
                    );
                    if fd < 0 {
                        return errno_text();
                    }
                    let fd = OwnedFd::from_raw_fd(fd);
                    read_fd(fd.as_raw_fd())
                }
                Op::Link { from, to } => {
                    result(libc::link(p(from).as_ptr(), p(to).as_ptr()).into())
                }
                Op::Unlink { path } => result(libc::unlink(p(path).as_ptr()).into()),
                Op::Rename { from, to, flags } => self.rename(from, to, *flags),
                Op::Mkdir { path } => result(libc::mkdir(p(path).as_ptr(), 0o755).into()),
                Op::Rmdir { path } => result(libc::rmdir(p(path).as_ptr()).into()),
                Op::RmTree { path } => {
                    let full = self.root.join(path);
                    match fs::symlink_metadata(&full) {
                        Err(e) => format!("err:{}", e.raw_os_error().unwrap_or(0)),
                        Ok(m) if m.is_dir() => match fs::remove_dir_all(&full) {
                            Ok(()) => "ok".into(),
                            Err(e) => format!("err:{}", e.raw_os_error().unwrap_or(0)),
                        },
                        Ok(_) => result(libc::unlink(p(path).as_ptr()).into()),
                    }
                }
                Op::Chmod { path, mode } => result(libc::chmod(p(path).as_ptr(), *mode).into()),
                Op::Chown { path, id } => result(libc::lchown(p(path).as_ptr(), *id, *id).into()),
                Op::Utimes { path, secs } => {
                    let ts = [
                        libc::timespec {
                            tv_sec: *secs,
                            tv_nsec: 0,
                        },
                        libc::timespec {
                            tv_sec: *secs,
                            tv_nsec: 0,
                        },
                    ];
                    result(
                        libc::utimensat(
                            libc::AT_FDCWD,
                            p(path).as_ptr(),
                            ts.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                        .into(),
                    )
                }
                Op::Symlink { target, path } => {
                    let t = CString::new(target.as_str()).unwrap();
                    result(libc::symlink(t.as_ptr(), p(path).as_ptr()).into())
                }
                Op::Mkfifo { path } => result(libc::mkfifo(p(path).as_ptr(), 0o644).into()),
                Op::SetXattr { path, name, value } => {
                    let n = CString::new(*name).unwrap();
                    result(
                        libc::lsetxattr(
                            p(path).as_ptr(),
                            n.as_ptr(),
                            (value as *const u8).cast(),
                            1,
                            0,
                        )
                        .into(),
                    )
                }
                Op::RemoveXattr { path, name } => {
                    let n = CString::new(*name).unwrap();
                    result(libc::lremovexattr(p(path).as_ptr(), n.as_ptr()).into())
                }
                Op::Open { slot, path, write } => {
                    let flags = if *write { libc::O_RDWR } else { libc::O_RDONLY }
                        | libc::O_CLOEXEC
                        | libc::O_NONBLOCK;
                    let fd = libc::open(p(path).as_ptr(), flags);
                    if fd < 0 {
                        return errno_text();
                    }
                    self.fds[*slot] = Some(OwnedFd::from_raw_fd(fd));
                    "ok".into()
                }
                Op::WriteFd { slot, byte, len } => match &self.fds[*slot] {
                    None => "closed".into(),
                    Some(fd) => {
                        let data = vec![*byte; *len];
                        result(
                            libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0)
                                as libc::c_long,
                        )
                    }
                },
                Op::ReadFd { slot } => match &self.fds[*slot] {
                    None => "closed".into(),
                    Some(fd) => read_fd(fd.as_raw_fd()),
                },
                Op::Close { slot } => {
                    self.fds[*slot] = None;
                    "ok".into()
                }
            }
        }
    }

    /// renameat2; a plain rename of a directory that answers EXDEV (kernel
    /// overlayfs without redirect_dir) is done the way `mv` does it: copy
    /// the tree, then remove the source.
    fn rename(&mut self, from: &str, to: &str, flags: u32) -> String {
        let (f, t) = (cpath(&self.root, from), cpath(&self.root, to));
        if flags & libc::RENAME_EXCHANGE != 0 {
            // Exchanging directories is EXDEV in the FUSE view (the layer
            // format cannot say it) and in overlayfs for merged ones; a
            // plain directory does it. Not compared: judged on the
            // reference view, so every backend skips the same operations.
            let is_dir =
                |p: &str| fs::symlink_metadata(self.root.join(p)).is_ok_and(|m| m.is_dir());
            if self.reference && (is_dir(from) || is_dir(to)) {
                return "skip:exchange-dir".into();
            }
        }
        // SAFETY: both paths are NUL-terminated and live across the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                f.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                flags,
            )
        };
        if rc == 0 {
            return "ok".into();
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EXDEV) || flags & libc::RENAME_EXCHANGE != 0 {
            return format!("err:{}", err.raw_os_error().unwrap_or(0));
        }
        let (src, dst) = (self.root.join(from), self.root.join(to));
        if flags & libc::RENAME_NOREPLACE != 0 && fs::symlink_metadata(&dst).is_ok() {
            return format!("err:{}", libc::EEXIST);
        }
        // mv's order: an existing empty directory is replaced, a non-empty
        // one refused
        if let Ok(m) = fs::symlink_metadata(&dst) {
            if !m.is_dir() {
                return format!("err:{}", libc::ENOTDIR);
            }
            if fs::remove_dir(&dst).is_err() {
                return format!("err:{}", libc::ENOTEMPTY);
            }
        }
        let mut tree = vec![src.clone()];
        collect(&src, &mut tree);
        self.broke_links |= tree.iter().any(|p| {
            fs::symlink_metadata(p)
                .is_ok_and(|m| m.is_file() && std::os::unix::fs::MetadataExt::nlink(&m) > 1)
        });
        run(std::process::Command::new("cp")
            .args(["-a", "--preserve=all", "--no-target-directory"])
            .arg(&src)
            .arg(&dst));
        fs::remove_dir_all(&src).unwrap();
        "ok".into()
    }
}

/// The lower layers of one case: a random tree, then a random second layer
/// over it (removals, so whiteouts and opaque directories, and changes).
fn base_ops(r: &mut Rng) -> (Vec<Op>, Vec<Op>) {
    let mut first = Vec::new();
    for _ in 0..14 {
        first.push(match r.below(6) {
            0 | 1 => Op::Mkdir { path: r.path() },
            2 | 3 => Op::Write {
                path: r.path(),
                byte: b'a' + u8::try_from(r.below(26)).unwrap_or(0),
                len: 1 + r.below(3000),
                offset: 0,
                trunc: true,
            },
            4 => Op::Link {
                from: r.path(),
                to: r.path(),
            },
            _ => {
                if r.chance(50) {
                    Op::Symlink {
                        target: r.path(),
                        path: r.path(),
                    }
                } else {
                    Op::SetXattr {
                        path: r.path(),
                        name: XATTRS[r.below(2)],
                        value: b'x',
                    }
                }
            }
        });
    }
    let mut second = Vec::new();
    for _ in 0..8 {
        second.push(match r.below(5) {
            0 => Op::RmTree { path: r.path() },
            1 => Op::Mkdir { path: r.path() },
            2 => Op::Write {
                path: r.path(),
                byte: b'q',
                len: 1 + r.below(100),
                offset: 0,
                trunc: true,
            },
            3 => Op::Unlink { path: r.path() },
            _ => Op::Chmod {
                path: r.path(),
                mode: 0o700,
            },
        });
    }
    (first, second)
}

/// Every entry's mtime and atime set to BASE_TIME (children first), so a
/// lower layer's bytes do not depend on when it was made.
fn settle_times(root: &Path) {
    let mut paths = Vec::new();
    collect(root, &mut paths);
    for p in paths.iter().rev() {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let ts = libc::timespec {
            tv_sec: BASE_TIME,
            tv_nsec: 0,
        };
        // SAFETY: `c` is a valid path; the times array has two entries.
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                [ts, ts].as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().unwrap().is_dir() {
            collect(&p, out);
        }
    }
}

/// The two lower layers as tars, made on the copy backend.
fn base_layers(dir: &Path, first: &[Op], second: &[Op]) -> (Vec<u8>, Vec<u8>) {
    let snap = Snapshotter::open(&dir.join("base"), BackendKind::Copy).unwrap();
    let opts = DiffOptions {
        compression: Compression::None,
        source_date_epoch: Some(EPOCH),
    };
    let v = snap.prepare("l1", None).unwrap();
    let mut e = Exec::new(v.path());
    for op in first {
        e.run(op);
    }
    settle_times(v.path());
    let l1 = snap.commit(v, opts).unwrap();
    let v = snap.prepare("l2", Some(&l1.chain_id)).unwrap();
    let mut e = Exec::new(v.path());
    for op in second {
        e.run(op);
    }
    settle_times(v.path());
    let l2 = snap.commit(v, opts).unwrap();
    let t1 = snap.content().read_blob(l1.blob.digest()).unwrap();
    let t2 = snap.content().read_blob(l2.blob.digest()).unwrap();
    (t1, t2)
}

const KINDS: [(BackendKind, &str); 3] = [
    (BackendKind::Copy, "copy"),
    (BackendKind::Fuse, "fuse"),
    (BackendKind::Overlay, "overlay"),
];

/// One store per backend holding the two lower layers.
fn stores(dir: &Path, l1: &[u8], l2: &[u8]) -> Vec<(Snapshotter, Digest)> {
    KINDS
        .iter()
        .map(|(kind, name)| {
            let snap = Snapshotter::open(&dir.join(name), *kind).unwrap();
            let (i1, _) = snap.import(l1, None, None).unwrap();
            let (i2, _) = snap.import(l2, Some(&i1.chain_id), None).unwrap();
            (snap, i2.chain_id)
        })
        .collect()
}

/// Whether the lower layers hold a hard-linked file: overlayfs breaks such
/// a pair apart at copy-up, where a plain directory (and the FUSE view)
/// keeps it linked, so overlayfs is not an oracle for that case.
fn lower_hard_links(l1: &[u8], l2: &[u8]) -> bool {
    [l1, l2].iter().any(|t| {
        tar::Archive::new(*t)
            .entries()
            .unwrap()
            .flatten()
            .any(|e| e.header().entry_type() == tar::EntryType::Link)
    })
}

/// Run `ops` on all three backends; the first difference, described.
fn check(dir: &Path, l1: &[u8], l2: &[u8], ops: &[Op]) -> Result<(), String> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let stores = stores(dir, l1, l2);
    let mut overlay_ok = !lower_hard_links(l1, l2);
    let views: Vec<_> = stores
        .iter()
        .map(|(s, chain)| s.prepare("step", Some(chain)).unwrap())
        .collect();
    let mut execs: Vec<Exec> = views.iter().map(|v| Exec::new(v.path())).collect();
    execs[0].reference = true;
    let mut outcome: Result<(), String> = Ok(());
    for (i, op) in ops.iter().enumerate() {
        let first = execs[0].run(op);
        if first.starts_with("skip:") {
            continue;
        }
        let mut got = vec![first];
        got.extend(execs[1..].iter_mut().map(|e| e.run(op)));
        // overlayfs answers ESTALE to renaming one name of a file linked
        // in the step onto another (a kernel limitation, not a result to
        // match): it is no oracle for the rest of such a sequence
        if overlay_ok && got[2] == format!("err:{}", libc::ESTALE) && got[1] == got[0] {
            overlay_ok = false;
        }
        // overlayfs renamed a directory by copying it (EXDEV), which broke
        // the hard links of a file in it to names outside: no oracle for
        // the rest of the sequence (kiln keeps the links, as rename(2) on
        // a plain directory does)
        if execs[2].broke_links {
            overlay_ok = false;
        }
        let compared = if overlay_ok { 3 } else { 2 };
        if got[..compared].iter().any(|g| *g != got[0]) {
            outcome = Err(format!(
                "op {i} {op:?}: copy {}, fuse {}, overlay {}",
                got[0], got[1], got[2]
            ));
            break;
        }
    }
    for e in &mut execs {
        e.close_all();
    }
    let mut reference = Vec::new();
    if outcome.is_ok() {
        let seen: Vec<Vec<String>> = views
            .iter()
            .map(|v| listing_clamped(v.path(), Some(EPOCH)))
            .collect();
        if seen[1] != seen[0] {
            outcome = Err(format!(
                "the step sees a different tree on fuse:\n{}",
                diff_lines(&seen[0], &seen[1])
            ));
        } else if overlay_ok && without_links(&seen[2]) != without_links(&seen[0]) {
            outcome = Err(format!(
                "the step sees a different tree on overlay:\n{}",
                diff_lines(&without_links(&seen[0]), &without_links(&seen[2]))
            ));
        }
        reference = seen.into_iter().next().unwrap_or_default();
    }
    let opts = DiffOptions {
        compression: Compression::None,
        source_date_epoch: Some(EPOCH),
    };
    let tars: Vec<Vec<u8>> = stores
        .iter()
        .zip(views)
        .map(|((s, _), v)| {
            let c = s.commit(v, opts).unwrap();
            s.content().read_blob(c.blob.digest()).unwrap()
        })
        .collect();
    outcome?;
    // the layer, applied over the lowers, gives back the tree the step saw
    let (copy, chain) = &stores[0];
    let (top, _) = copy.import(&tars[0][..], Some(chain), None).unwrap();
    let applied = copy.view("applied", Some(&top.chain_id)).unwrap();
    let got = listing_clamped(applied.path(), Some(EPOCH));
    if got != reference {
        return Err(format!(
            "the layer, applied, is not the tree the step saw:\n{}the layer:\n{}",
            diff_lines(&reference, &got),
            tar_entries(&tars[0])
                .iter()
                .map(|l| format!("  {l}\n"))
                .collect::<String>()
        ));
    }
    drop(applied);
    if tars[1] != tars[0] {
        return Err(format!(
            "the layer differs on fuse:\n{}",
            diff_lines(&tar_entries(&tars[0]), &tar_entries(&tars[1]))
        ));
    }
    if overlay_ok {
        // overlayfs copies a file up when it is opened for writing, and
        // its parents with it: entries the same as the lower layers'
        // (kiln copies up at the first change instead, so its layers
        // match a plain directory's)
        let want = tar_entries(&tars[0]);
        let lower = lower_entries(l1, l2);
        let got: Vec<String> = tar_entries(&tars[2])
            .into_iter()
            .filter(|l| want.contains(l) || !lower.contains(l))
            .collect();
        if got != want {
            return Err(format!(
                "the layer differs on overlay:\n{}",
                diff_lines(&want, &got)
            ));
        }
    }
    Ok(())
}

/// A listing without hard-link groups: overlayfs (without index) reports
/// the inode numbers of hard links it copied up inconsistently, so for it
/// only the layer bytes say whether links were kept.
fn without_links(listing: &[String]) -> Vec<String> {
    listing
        .iter()
        .map(|line| match line.find(" linkgroup=") {
            Some(i) => {
                let end = line[i + 1..].find(' ').map_or(line.len(), |j| i + 1 + j);
                format!("{}{}", &line[..i], &line[end..])
            }
            None => line.clone(),
        })
        .collect()
}

/// The entries of the lower layers as they show in the view: the second
/// layer's, then the first's under names the second does not have.
fn lower_entries(l1: &[u8], l2: &[u8]) -> Vec<String> {
    let name = |l: &String| l.split(' ').next().unwrap_or("").to_string();
    let top = tar_entries(l2);
    let names: Vec<String> = top.iter().map(name).collect();
    let mut out = top;
    out.extend(
        tar_entries(l1)
            .into_iter()
            .filter(|l| !names.contains(&name(l))),
    );
    out
}

/// Tar entries in a comparable form.
fn tar_entries(bytes: &[u8]) -> Vec<String> {
    use std::io::Read;
    let mut out = Vec::new();
    for e in tar::Archive::new(bytes).entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut line = format!(
            "{} {:?} {:o} {}:{} mtime={}",
            e.path().unwrap().display(),
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap()
        );
        if let Ok(Some(l)) = e.link_name() {
            line += &format!(" -> {}", l.display());
        }
        if let Ok(Some(x)) = e.pax_extensions() {
            for x in x.flatten() {
                line += &format!(
                    " {}={}",
                    x.key().unwrap_or("?"),
                    String::from_utf8_lossy(x.value_bytes())
                );
            }
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if !data.is_empty() {
            line += &format!(" {}", content(&data));
        }
        out.push(line);
    }
    out
}

fn diff_lines(want: &[String], got: &[String]) -> String {
    let mut out = String::new();
    for l in want.iter().filter(|l| !got.contains(l)) {
        out += &format!("  copy only: {l}\n");
    }
    for l in got.iter().filter(|l| !want.contains(l)) {
        out += &format!("  here only: {l}\n");
    }
    if out.is_empty() {
        out = "  (same entries, another order)\n".into();
    }
    out
}

/// The shortest sequence (one operation removed at a time, until none can
/// be) that still fails.
fn shrink(dir: &Path, l1: &[u8], l2: &[u8], mut ops: Vec<Op>) -> (Vec<Op>, String) {
    let mut why = check(dir, l1, l2, &ops).unwrap_err();
    loop {
        let mut smaller = false;
        let mut i = 0;
        while i < ops.len() {
            let mut fewer = ops.clone();
            fewer.remove(i);
            match check(dir, l1, l2, &fewer) {
                Err(w) => {
                    ops = fewer;
                    why = w;
                    smaller = true;
                }
                Ok(()) => i += 1,
            }
        }
        if !smaller {
            return (ops, why);
        }
    }
}

/// One seed: its lower layers and sequence, checked; on a difference, the
/// shrunk sequence and the lower layers' operations.
fn run_seed(dir: &Path, seed: u64) -> Result<(), String> {
    let mut r = Rng::new(seed);
    let (first, second) = base_ops(&mut r);
    let ops: Vec<Op> = (0..OPS).map(|_| random_op(&mut r)).collect();
    let case = dir.join(format!("seed-{seed}"));
    let (l1, l2) = base_layers(&case.join("base"), &first, &second);
    let work = case.join("run");
    if check(&work, &l1, &l2, &ops).is_ok() {
        let _ = fs::remove_dir_all(&case);
        return Ok(());
    }
    let (ops, why) = shrink(&work, &l1, &l2, ops);
    let _ = fs::remove_dir_all(&case);
    Err(format!(
        "seed {seed}: {why}\nlower layer 1: {first:?}\nlower layer 2: {second:?}\nsequence ({} ops):\n{}",
        ops.len(),
        ops.iter().map(|o| format!("  {o:?}\n")).collect::<String>()
    ))
}

fn w(path: &str, byte: u8, len: usize) -> Op {
    Op::Write {
        path: path.into(),
        byte,
        len,
        offset: 0,
        trunc: true,
    }
}

fn mkdir(path: &str) -> Op {
    Op::Mkdir { path: path.into() }
}

fn mv(from: &str, to: &str) -> Op {
    Op::Rename {
        from: from.into(),
        to: to.into(),
        flags: 0,
    }
}

/// A fixed case: what it checks, lower layer 1, lower layer 2, the step.
type Case = (&'static str, Vec<Op>, Vec<Op>, Vec<Op>);

/// Sequences found by the fuzzer or reported against the FUSE view, kept
/// as regression cases.
fn known_cases() -> Vec<Case> {
    let hard_pair = vec![
        mkdir("d"),
        w("d/hard", b'h', 2),
        Op::Link {
            from: "d/hard".into(),
            to: "d/hard2".into(),
        },
    ];
    vec![
        (
            "a renamed directory's hard-linked lower file keeps its data",
            hard_pair.clone(),
            vec![],
            vec![
                mv("d", "dd"),
                Op::Append {
                    path: "dd/hard".into(),
                    byte: b'x',
                },
                Op::Read {
                    path: "dd/hard".into(),
                },
                Op::Read {
                    path: "dd/hard2".into(),
                },
            ],
        ),
        (
            "a write through one name of a lower hard link shows in the layer under both",
            hard_pair.clone(),
            vec![],
            vec![Op::Append {
                path: "d/hard".into(),
                byte: b'x',
            }],
        ),
        (
            "times set through one name of a lower hard link the kernel never looked up",
            vec![
                w("a", b'a', 10),
                mkdir("c"),
                Op::Link {
                    from: "a".into(),
                    to: "c/a".into(),
                },
            ],
            vec![],
            vec![Op::Utimes {
                path: "a".into(),
                secs: BASE_TIME - 5000,
            }],
        ),
        (
            "no whiteout for a subdirectory moved inside a directory that moves",
            vec![mkdir("d"), mkdir("d/sub"), w("d/sub/f", b's', 3)],
            vec![],
            vec![mv("d/sub", "d/moved"), mv("d", "dd")],
        ),
        (
            "a directory made where a lower file was removed needs no opaque marker",
            vec![w("b", b'b', 5)],
            vec![],
            vec![Op::Unlink { path: "b".into() }, mkdir("b")],
        ),
        (
            "a lower directory renamed onto a name removed in the step",
            vec![mkdir("b"), mkdir("c"), mkdir("c/c"), w("c/c/f", b'f', 4)],
            vec![],
            vec![Op::RmTree { path: "c/c".into() }, mv("b", "c/c")],
        ),
        (
            "a directory made in the step and moved into a merged one",
            vec![mkdir("b"), w("b/f", b'f', 4)],
            vec![],
            vec![mkdir("c"), mv("c", "b/c")],
        ),
        (
            "utimes to the times a lower file has leaves it out of the layer",
            vec![mkdir("c"), w("c/c", b'c', 65)],
            vec![],
            vec![Op::Utimes {
                path: "c/c".into(),
                secs: BASE_TIME,
            }],
        ),
        (
            "a lower file's link count is that of the names the view shows",
            vec![
                w("a", b'a', 10),
                mkdir("d"),
                Op::Link {
                    from: "a".into(),
                    to: "d/a".into(),
                },
                Op::Link {
                    from: "a".into(),
                    to: "b".into(),
                },
            ],
            vec![Op::Unlink { path: "b".into() }],
            vec![Op::RmTree { path: "d".into() }],
        ),
        (
            "a lower directory renamed away and back is not opaque",
            vec![
                mkdir("d"),
                w("d/f", b'f', 3),
                mkdir("d/s"),
                w("d/s/g", b'g', 2),
            ],
            vec![],
            vec![mv("d", "e"), mv("e", "d")],
        ),
        (
            "a lower directory renamed away and back, less one file",
            vec![mkdir("d"), w("d/f", b'f', 3), w("d/g", b'g', 3)],
            vec![],
            vec![
                mv("d", "e"),
                Op::Unlink { path: "e/g".into() },
                mv("e", "d"),
            ],
        ),
        (
            "a lower file moved into a directory made where its own was",
            vec![mkdir("d"), w("d/x", b'x', 3), w("d/y", b'y', 3)],
            vec![],
            vec![mv("d", "e"), mkdir("d"), mv("e/x", "d/x")],
        ),
        (
            "a lower directory emptied in the step",
            vec![mkdir("d"), w("d/x", b'x', 3), w("d/y", b'y', 3)],
            vec![],
            vec![
                Op::Unlink { path: "d/x".into() },
                Op::Unlink { path: "d/y".into() },
            ],
        ),
        (
            "an xattr set on a lower directory",
            vec![mkdir("a"), w("a/f", b'f', 2)],
            vec![],
            vec![Op::SetXattr {
                path: "a".into(),
                name: "user.one",
                value: b'1',
            }],
        ),
        (
            "an xattr removed from a lower directory",
            vec![
                mkdir("a"),
                Op::SetXattr {
                    path: "a".into(),
                    name: "user.one",
                    value: b'x',
                },
            ],
            vec![],
            vec![Op::RemoveXattr {
                path: "a".into(),
                name: "user.one",
            }],
        ),
        (
            "a moved directory does not carry the whiteouts of its old place",
            vec![
                mkdir("a"),
                w("a/b", b'b', 3),
                w("a/k", b'k', 3),
                w("c", b'c', 3),
            ],
            vec![],
            vec![
                Op::RmTree { path: "a/b".into() },
                Op::Unlink { path: "c".into() },
                mv("a", "c"),
            ],
        ),
    ]
}

#[test]
fn fuse_overlay_and_copy_agree_on_known_cases() {
    if !in_userns("fuse_overlay_and_copy_agree_on_known_cases") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (k, (what, first, second, ops)) in known_cases().into_iter().enumerate() {
        let case = dir.path().join(format!("case-{k}"));
        let (l1, l2) = base_layers(&case.join("base"), &first, &second);
        if let Err(e) = check(&case.join("run"), &l1, &l2, &ops) {
            failures.push(format!("{what}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn fuse_overlay_and_copy_agree_on_random_sequences() {
    if !in_userns("fuse_overlay_and_copy_agree_on_random_sequences") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seconds: Option<u64> = std::env::var("KILN_DIFF_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let replay: Option<u64> = std::env::var("KILN_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut failures = Vec::new();
    let mut ran = 0u64;
    match (replay, seconds) {
        (Some(seed), _) => {
            ran = 1;
            if let Err(e) = run_seed(dir.path(), seed) {
                failures.push(e);
            }
        }
        (None, Some(secs)) => {
            let start = Instant::now();
            let mut seed = std::process::id() as u64 * 1_000_003 + 1000;
            while start.elapsed() < Duration::from_secs(secs) && failures.len() < 5 {
                if let Err(e) = run_seed(dir.path(), seed) {
                    failures.push(e);
                }
                seed += 1;
                ran += 1;
            }
        }
        (None, None) => {
            for seed in CI_SEEDS {
                ran += 1;
                if let Err(e) = run_seed(dir.path(), seed) {
                    failures.push(e);
                }
            }
        }
    }
    eprintln!(
        "differential: {ran} sequences of {OPS} operations, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
