//! The `copy` backend: a writable view made by copying the merged tree of
//! the lower layers into a fresh directory. Slow, but it needs nothing from
//! the kernel beyond plain file operations, so it works everywhere.
//!
//! After copying, it records each path's inode number and change time in
//! `work/copy-manifest` and waits until the kernel's coarse clock has moved
//! past the newest recorded change time, so any later change to a path
//! (content, mode, owner, xattr, link, rename, replace) shows as a new ctime
//! or inode. [`write_changes`] then compares the view with that manifest
//! (the equivalent of BuildKit's native-snapshotter double walk, without
//! re-reading the lowers) and writes the changes into `upper` in the shared
//! layer format, moving changed files rather than copying them.
//!
//! It never modifies a lower layer and never follows a symlink in the view.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{MountedView, ViewSpec};
use crate::content::hex;
use crate::diff::OPAQUE_XATTR;
use crate::sys::{self, Time};
use crate::tree::{self, Meta};

/// Errors of the copy backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("copy backend: {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("copy backend: manifest {0} is damaged; prepare the view again")]
    Manifest(PathBuf),
}

/// Result type of the copy backend.
pub type Result<T> = std::result::Result<T, Error>;

fn err<'a>(
    op: &'static str,
    path: impl Into<PathBuf> + 'a,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.into(),
        source,
    }
}

const MANIFEST: &str = "copy-manifest";

/// A materialised copy view. Dropping it leaves the tree in place: keeping
/// its changes is [`write_changes`] (called by `backend::unmount`), and the
/// snapshotter removes the view directory afterwards.
#[derive(Debug)]
pub struct CopyView {
    target: PathBuf,
}

impl MountedView for CopyView {
    fn path(&self) -> &Path {
        &self.target
    }
}

/// Copy the merged lowers into `spec.target` and record the manifest.
pub fn mount(spec: &ViewSpec) -> Result<CopyView> {
    let target = sys::open_dir(&spec.target).map_err(err("open", &spec.target))?;
    for lower in spec.lowers.iter().rev() {
        let src = sys::open_dir(lower).map_err(err("open", lower))?;
        merge_dir(src.as_fd(), target.as_fd(), lower)?;
    }
    let mut manifest = String::new();
    let mut newest = Time { sec: 0, nsec: 0 };
    record(target.as_fd(), &mut Vec::new(), &mut manifest, &mut newest)
        .map_err(err("scan", &spec.target))?;
    let mpath = spec.work.join(MANIFEST);
    fs::write(&mpath, manifest).map_err(err("write", &mpath))?;
    // ctimes come from the coarse clock: once it has moved past the newest
    // recorded ctime, every later change gets a larger one
    while (sys::coarse_now().sec, sys::coarse_now().nsec) <= (newest.sec, newest.nsec) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(CopyView {
        target: spec.target.clone(),
    })
}

/// Merge one layer directory onto `dst` as overlayfs would show it.
fn merge_dir(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, path: &Path) -> Result<()> {
    // hard links inside one layer stay links in the view
    let mut links: HashMap<u64, (OwnedFd, CString)> = HashMap::new();
    merge_rec(src, dst, path, &mut links)
}

fn merge_rec(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    path: &Path,
    links: &mut HashMap<u64, (OwnedFd, CString)>,
) -> Result<()> {
    for name in sys::list_dir(src).map_err(err("list", path))? {
        let p = path.join(OsStr::from_bytes(name.to_bytes()));
        let (st, meta) = tree::read_meta_at(src, &name).map_err(err("stat", &p))?;
        if sys::is_whiteout(&st) {
            sys::remove_all_at(dst, &name).map_err(err("remove", &p))?;
            continue;
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let existing = sys::lstat_at(dst, &name).ok();
            let is_dir = existing.is_some_and(|e| e.st_mode & libc::S_IFMT == libc::S_IFDIR);
            let sub_src = sys::open_dir_at(src, &name).map_err(err("open", &p))?;
            let opaque = sys::fgetxattr(
                sub_src.as_fd(),
                &CString::new(OPAQUE_XATTR).expect("no NUL"),
            )
            .map(|v| v == b"y")
            .unwrap_or(false);
            if existing.is_some() && (!is_dir || opaque) {
                sys::remove_all_at(dst, &name).map_err(err("remove", &p))?;
            }
            if !is_dir || opaque {
                sys::mkdirat(dst, &name, 0o700).map_err(err("mkdir", &p))?;
            }
            let sub_dst = sys::open_dir_at(dst, &name).map_err(err("open", &p))?;
            merge_rec(sub_src.as_fd(), sub_dst.as_fd(), &p, links)?;
            // a merged directory has the upper one's metadata, all of it:
            // xattrs only the lower one had go (as in overlayfs)
            if is_dir && !opaque {
                for x in sys::flistxattr(sub_dst.as_fd()).map_err(err("list xattrs", &p))? {
                    if !meta
                        .xattrs
                        .iter()
                        .any(|(n, _)| n.as_bytes() == x.as_slice())
                    {
                        kiln_sys::cstr(OsStr::from_bytes(&x))
                            .and_then(|x| sys::fremovexattr(sub_dst.as_fd(), &x))
                            .map_err(err("remove xattr", &p))?;
                    }
                }
            }
            tree::set_meta_fd(sub_dst.as_fd(), &meta).map_err(err("set metadata", &p))?;
            continue;
        }
        sys::remove_all_at(dst, &name).map_err(err("remove", &p))?;
        if st.st_nlink > 1 {
            if let Some((ldir, lname)) = links.get(&st.st_ino) {
                sys::linkat(ldir.as_fd(), lname, dst, &name).map_err(err("link", &p))?;
                continue;
            }
        }
        let copied =
            tree::copy_node_at(src, &name, &st, &meta, dst, &name).map_err(err("copy", &p))?;
        if copied && st.st_nlink > 1 {
            let d = dst.try_clone_to_owned().map_err(err("dup", &p))?;
            links.insert(st.st_ino, (d, name.clone()));
        }
    }
    Ok(())
}

/// Birth time as one number (0 when the file system has none): with the
/// inode number it tells a replaced file from the original even when the
/// file system reuses the inode number.
fn birth(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<i128> {
    Ok(sys::btime_at(dir, name)?.map_or(0, |t| {
        i128::from(t.sec) * 1_000_000_000 + i128::from(t.nsec)
    }))
}

/// One manifest line per path: `ino birth ctime_sec ctime_nsec d|f hexpath`.
fn record(
    dir: BorrowedFd<'_>,
    rel: &mut Vec<Vec<u8>>,
    out: &mut String,
    newest: &mut Time,
) -> io::Result<()> {
    for name in sys::list_dir(dir)? {
        let st = sys::lstat_at(dir, &name)?;
        rel.push(name.to_bytes().to_vec());
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let _ = writeln!(
            out,
            "{} {} {} {} {} {}",
            st.st_ino,
            birth(dir, &name)?,
            st.st_ctime,
            st.st_ctime_nsec,
            if is_dir { 'd' } else { 'f' },
            hex(&rel.join(&b'/'))
        );
        if (st.st_ctime, st.st_ctime_nsec) > (newest.sec, newest.nsec) {
            *newest = Time {
                sec: st.st_ctime,
                nsec: st.st_ctime_nsec,
            };
        }
        if is_dir {
            let sub = sys::open_dir_at(dir, &name)?;
            record(sub.as_fd(), rel, out, newest)?;
        }
        rel.pop();
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    ino: u64,
    birth: i128,
    ctime: (i64, i64),
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn load_manifest(path: &Path) -> Result<HashMap<Vec<u8>, Rec>> {
    let text = fs::read_to_string(path).map_err(err("read", path))?;
    let bad = || Error::Manifest(path.to_path_buf());
    let mut out = HashMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [ino, birth, cs, cn, kind, p] = f[..] else {
            return Err(bad());
        };
        if kind != "d" && kind != "f" {
            return Err(bad());
        }
        let rec = Rec {
            ino: ino.parse().map_err(|_| bad())?,
            birth: birth.parse().map_err(|_| bad())?,
            ctime: (
                cs.parse().map_err(|_| bad())?,
                cn.parse().map_err(|_| bad())?,
            ),
        };
        out.insert(unhex(p).ok_or_else(bad)?, rec);
    }
    Ok(out)
}

#[derive(Debug)]
enum Change {
    /// a new directory, or one whose own metadata changed (one that
    /// replaced a lower directory is written merged, with whiteouts for
    /// what is gone; `markers` then decides whether it is opaque)
    Dir,
    /// a new or changed non-directory, moved from the view
    Node,
    /// a path of the lowers that is gone
    Whiteout,
}

struct Scan {
    changes: Vec<(Vec<u8>, Change)>,
    /// metadata of every directory in the view, read before anything moves
    dir_meta: HashMap<Vec<u8>, Meta>,
    /// paths present in the view: (inode, birth, is directory)
    present: HashMap<Vec<u8>, (u64, i128, bool)>,
}

fn scan(
    dir: BorrowedFd<'_>,
    rel: &[u8],
    manifest: &HashMap<Vec<u8>, Rec>,
    lowers: &[std::path::PathBuf],
    s: &mut Scan,
) -> io::Result<()> {
    for name in sys::list_dir(dir)? {
        let mut p = rel.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.to_bytes());
        let st = sys::lstat_at(dir, &name)?;
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let born = birth(dir, &name)?;
        s.present.insert(p.clone(), (st.st_ino, born, is_dir));
        let old = manifest.get(&p);
        let same_inode = |r: &Rec| r.ino == st.st_ino && r.birth == born;
        let changed = match old {
            None => true,
            Some(r) => !same_inode(r) || r.ctime != (st.st_ctime, st.st_ctime_nsec),
        };
        if is_dir {
            let (_, meta) = tree::read_meta_at(dir, &name)?;
            s.dir_meta.insert(p.clone(), meta);
            if changed {
                s.changes.push((p.clone(), Change::Dir));
            }
            let sub = sys::open_dir_at(dir, &name)?;
            scan(sub.as_fd(), &p, manifest, lowers, s)?;
        } else if changed {
            // Same inode, new ctime: a change, unless the file is still
            // what the lowers show (its link count moved when another name
            // of it was removed, or a chmod was undone): kernel overlayfs
            // and the FUSE view leave such a file out of the layer too.
            let same_inode_only = old.is_some_and(same_inode);
            if !(same_inode_only && crate::markers::same_as_shown(dir, &name, &st, lowers, &p)?) {
                s.changes.push((p, Change::Node));
            }
        }
    }
    Ok(())
}

fn parent_of(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|b| *b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

/// Compare the view in `spec.target` with the manifest recorded at mount
/// and write its changes into `spec.upper` in the shared layer format.
/// Changed files are moved out of the view, which is spent afterwards.
pub fn write_changes(spec: &ViewSpec) -> Result<()> {
    let manifest = load_manifest(&spec.work.join(MANIFEST))?;
    let target = sys::open_dir(&spec.target).map_err(err("open", &spec.target))?;
    let upper = sys::open_dir(&spec.upper).map_err(err("open", &spec.upper))?;
    let mut s = Scan {
        changes: Vec::new(),
        dir_meta: HashMap::new(),
        present: HashMap::new(),
    };
    scan(target.as_fd(), b"", &manifest, &spec.lowers, &mut s)
        .map_err(err("scan", &spec.target))?;
    for p in manifest.keys() {
        if s.present.contains_key(p) {
            continue;
        }
        let (parent, _) = parent_of(p);
        // a deletion under a deleted directory, or one replaced by a
        // non-directory, is implied by that entry
        let parent_dir = parent.is_empty() || matches!(s.present.get(parent), Some((_, _, true)));
        if parent_dir {
            s.changes.push((p.clone(), Change::Whiteout));
        }
    }
    // parents before children; component-wise byte order
    s.changes
        .sort_by(|a, b| a.0.split(|c| *c == b'/').cmp(b.0.split(|c| *c == b'/')));

    let mut created: HashMap<Vec<u8>, OwnedFd> = HashMap::new();
    let mut dirs_done: Vec<Vec<u8>> = Vec::new();
    let mut target_dirs: HashMap<Vec<u8>, OwnedFd> = HashMap::new();
    let up = |p: &[u8]| spec.upper.join(OsStr::from_bytes(p));
    for (p, change) in &s.changes {
        let (parent, base) = parent_of(p);
        let pdir = ensure_upper_dir(
            upper.as_fd(),
            parent,
            &s.dir_meta,
            &mut created,
            &mut dirs_done,
        )
        .map_err(err("create parent of", up(p)))?;
        let cbase = kiln_sys::cstr(OsStr::from_bytes(base)).map_err(err("name", up(p)))?;
        match change {
            Change::Whiteout => {
                sys::mknod_whiteout(pdir.as_fd(), &cbase).map_err(err("whiteout", up(p)))?;
            }
            Change::Node => {
                let tdir = match target_dirs.get(parent) {
                    Some(fd) => fd.try_clone().map_err(err("dup", up(p)))?,
                    None => {
                        let fd = walk(target.as_fd(), parent).map_err(err("open", up(parent)))?;
                        target_dirs
                            .insert(parent.to_vec(), fd.try_clone().map_err(err("dup", up(p)))?);
                        fd
                    }
                };
                sys::renameat(tdir.as_fd(), &cbase, pdir.as_fd(), &cbase)
                    .map_err(err("move", up(p)))?;
            }
            Change::Dir => {
                ensure_upper_dir(upper.as_fd(), p, &s.dir_meta, &mut created, &mut dirs_done)
                    .map_err(err("mkdir", up(p)))?;
            }
        }
    }
    // directory times last, deepest first: creating children changed them
    let mut seen = HashSet::new();
    for p in dirs_done.iter().rev() {
        if seen.insert(p.clone()) {
            if let (Some(fd), Some(meta)) = (created.get(p), s.dir_meta.get(p)) {
                sys::set_times_at(fd.as_fd(), c"", meta.mtime, meta.mtime)
                    .map_err(err("set times", up(p)))?;
            }
        }
    }
    Ok(())
}

fn walk(root: BorrowedFd<'_>, p: &[u8]) -> io::Result<OwnedFd> {
    let mut fd = root.try_clone_to_owned()?;
    if p.is_empty() {
        return Ok(fd);
    }
    for c in p.split(|b| *b == b'/') {
        fd = sys::open_dir_at(fd.as_fd(), &kiln_sys::cstr(OsStr::from_bytes(c))?)?;
    }
    Ok(fd)
}

/// The upper directory for view path `p`, created (with the view's
/// metadata for it, like an overlay copy-up) together with its parents.
fn ensure_upper_dir(
    upper: BorrowedFd<'_>,
    p: &[u8],
    meta: &HashMap<Vec<u8>, Meta>,
    created: &mut HashMap<Vec<u8>, OwnedFd>,
    done: &mut Vec<Vec<u8>>,
) -> io::Result<OwnedFd> {
    if p.is_empty() {
        return upper.try_clone_to_owned();
    }
    if let Some(fd) = created.get(p) {
        return fd.try_clone();
    }
    let (parent, base) = parent_of(p);
    let pfd = ensure_upper_dir(upper, parent, meta, created, done)?;
    let name = kiln_sys::cstr(OsStr::from_bytes(base))?;
    sys::mkdirat(pfd.as_fd(), &name, 0o700)?;
    let fd = sys::open_dir_at(pfd.as_fd(), &name)?;
    if let Some(m) = meta.get(p) {
        tree::set_meta_fd(fd.as_fd(), m)?;
    }
    created.insert(p.to_vec(), fd.try_clone()?);
    done.push(p.to_vec());
    Ok(fd)
}
