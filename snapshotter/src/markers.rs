//! Before an upper directory becomes a layer: write it in the one form
//! that depends only on the tree the step left, not on how a backend got
//! there.
//!
//! The three view backends reach the same tree by different ways, and each
//! would leave markers the others do not: kernel overlayfs makes every
//! directory created over a whiteout opaque, even where the lower layers
//! had a file or nothing; the FUSE view copies a renamed directory up whole
//! and marks it opaque, even when it is renamed back; the copy backend sees
//! only the final tree. A marker that changes no tree still changes the
//! layer's bytes, so the same build would give a different digest per
//! backend. The canonical form, a function of the lowers and the final
//! tree alone:
//! - a directory over a lower directory is opaque exactly when something
//!   of the lower one is gone and nothing of it is left as it was (no name
//!   shows through unchanged, no subdirectory stays merged); otherwise it
//!   is merged, with a whiteout per lower name that is gone;
//! - a whiteout stays only where the lowers show an entry, and nothing is
//!   kept beneath an opaque directory but what it holds;
//! - an entry that is what the lowers show already is left out.
//!
//! It never touches a lower layer, and keeps the times of every directory
//! it changes (a layer records them).

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Time};

/// The opaque markers kiln's layer format and overlayfs use.
const OPAQUE: [&CStr; 2] = [c"user.overlay.opaque", c"trusted.overlay.opaque"];

/// Rewrite `upper`, a view over `lowers` (topmost first), in the canonical
/// form.
pub fn drop_needless(upper: &Path, lowers: &[PathBuf]) -> io::Result<()> {
    let dir = sys::open_dir(upper)?;
    let mut opaque = HashMap::new();
    decide(dir.as_fd(), Path::new(""), lowers, false, &mut opaque)?;
    let state = State {
        hidden: false,
        was_opaque: false,
    };
    walk(dir.as_fd(), Path::new(""), lowers, state, &opaque)?;
    Ok(())
}

/// What the lower layers show at a path.
#[derive(Debug, PartialEq, Eq)]
enum Below {
    Nothing,
    Dir,
    Other,
}

fn is_opaque(dir: BorrowedFd<'_>) -> bool {
    OPAQUE
        .iter()
        .any(|x| sys::fgetxattr(dir, x).is_ok_and(|v| v == b"y"))
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Whether the upper directory `dir` at `rel`, over a lower directory,
/// is opaque in the canonical form; records the answer for each
/// subdirectory over a lower directory in `out` (by path). `was_opaque`:
/// whether nothing of the lowers shows through it now (it or a parent is
/// marked opaque).
fn decide(
    dir: BorrowedFd<'_>,
    rel: &Path,
    lowers: &[PathBuf],
    was_opaque: bool,
    out: &mut HashMap<PathBuf, bool>,
) -> io::Result<bool> {
    let mut whiteouts = false;
    let mut kept = false;
    let mut files = Vec::new();
    for name in sys::list_dir(dir)? {
        let st = sys::lstat_at(dir, &name)?;
        let path = rel.join(OsStr::from_bytes(name.to_bytes()));
        if sys::is_whiteout(&st) {
            whiteouts = true;
        } else if is_dir(&st) {
            if below(lowers, &path)? == Below::Dir {
                let sub = sys::open_dir_at(dir, &name)?;
                let sub_opaque = was_opaque || is_opaque(sub.as_fd());
                let opaque = decide(sub.as_fd(), &path, lowers, sub_opaque, out)?;
                out.insert(path, opaque);
                kept |= !opaque;
            }
        } else if st.st_nlink == 1 {
            files.push((name, st, path));
        }
    }
    // Nothing of the lowers can be gone from a merged directory without a
    // whiteout: the common case on every commit, decided without listing
    // the lower directories.
    if rel.as_os_str().is_empty() || kept || !(was_opaque || whiteouts) {
        return Ok(false);
    }
    let mut gone = false;
    for name in &shown_names(lowers, rel)? {
        match sys::lstat_at(dir, name) {
            Ok(st) if sys::is_whiteout(&st) => gone = true,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if was_opaque {
                    gone = true;
                } else {
                    // shows through as it was
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
    if !gone {
        return Ok(false);
    }
    for (name, st, path) in files {
        if same_as_shown(dir, &name, &st, lowers, path.as_os_str().as_bytes())? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where `walk` is: under a directory that is opaque in the canonical
/// form (`hidden`), and whether nothing of the lowers showed through the
/// directory before (`was_opaque`).
#[derive(Clone, Copy)]
struct State {
    hidden: bool,
    was_opaque: bool,
}

/// Rewrite the directory `dir` (at `rel`) as `decide` chose; returns
/// whether it is now empty and itself the same as the lowers' directory
/// there (its parent may drop it).
fn walk(
    dir: BorrowedFd<'_>,
    rel: &Path,
    lowers: &[PathBuf],
    state: State,
    opaque: &HashMap<PathBuf, bool>,
) -> io::Result<bool> {
    let times = dir_times(&sys::lstat_at(dir, c"")?);
    let mut changed = false;
    let mut kept = 0usize;
    let mut present = BTreeSet::new();
    for name in sys::list_dir(dir)? {
        let path = rel.join(OsStr::from_bytes(name.to_bytes()));
        let st = sys::lstat_at(dir, &name)?;
        if sys::is_whiteout(&st) {
            if state.hidden || below(lowers, &path)? == Below::Nothing {
                sys::unlinkat(dir, &name, false)?;
                changed = true;
                continue;
            }
            present.insert(name);
        } else if is_dir(&st) {
            present.insert(name.clone());
            let sub = sys::open_dir_at(dir, &name)?;
            let was_opaque = state.was_opaque || is_opaque(sub.as_fd());
            let make_opaque = !state.hidden && opaque.get(&path) == Some(&true);
            for x in OPAQUE {
                if sys::fgetxattr(sub.as_fd(), x).is_ok() && (!make_opaque || x != OPAQUE[0]) {
                    sys::fremovexattr(sub.as_fd(), x)?;
                }
            }
            if make_opaque && !is_opaque(sub.as_fd()) {
                sys::fsetxattr(sub.as_fd(), OPAQUE[0], b"y")?;
            }
            let sub_state = State {
                hidden: state.hidden || make_opaque,
                was_opaque,
            };
            let empty_and_same = walk(sub.as_fd(), &path, lowers, sub_state, opaque)?;
            drop(sub);
            if empty_and_same && !make_opaque && !state.hidden {
                sys::unlinkat(dir, &name, true)?;
                changed = true;
                continue;
            }
        } else {
            present.insert(name.clone());
            if !state.hidden
                && st.st_nlink == 1
                && same_as_shown(dir, &name, &st, lowers, path.as_os_str().as_bytes())?
            {
                // a copy-up that changed nothing (a chown to the same owner)
                sys::unlinkat(dir, &name, false)?;
                changed = true;
                continue;
            }
        }
        kept += 1;
    }
    // a directory that hid the lowers and now merges with them: a
    // whiteout for each lower name it does not hold
    if state.was_opaque && !state.hidden && !rel.as_os_str().is_empty() {
        for name in shown_names(lowers, rel)? {
            if !present.contains(&name) {
                sys::mknod_whiteout(dir, &name)?;
                changed = true;
                kept += 1;
            }
        }
    }
    if changed {
        sys::set_times_at(dir, c"", times.0, times.1)?;
    }
    // the root is never dropped; any other empty directory whose own
    // metadata is the lowers' adds nothing to the layer
    if kept > 0 || rel.as_os_str().is_empty() {
        return Ok(false);
    }
    let Some((lower, lst)) = shown(lowers, rel)? else {
        return Ok(false);
    };
    if !is_dir(&lst) {
        return Ok(false);
    }
    let (parent, lname) = open_parent(&lower)?;
    Ok(crate::tree::read_meta_at(dir, c"")?.1
        == crate::tree::read_meta_at(parent.as_fd(), &lname)?.1)
}

/// The names the lower layers (topmost first), merged, show in the
/// directory at `rel`; none if they show no directory there.
fn shown_names(lowers: &[PathBuf], rel: &Path) -> io::Result<BTreeSet<CString>> {
    let mut names = BTreeSet::new();
    let mut hidden = BTreeSet::new();
    let parts: Vec<&OsStr> = rel.iter().collect();
    'layers: for layer in lowers {
        let mut at = layer.clone();
        let mut stop = false;
        for part in parts.iter() {
            at.push(part);
            let c = path_c(&at)?;
            let st = match lstat(&c) {
                Ok(st) => st,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if stop {
                        break 'layers;
                    }
                    continue 'layers;
                }
                Err(e) => return Err(e),
            };
            if !is_dir(&st) {
                break 'layers;
            }
            stop |= OPAQUE
                .iter()
                .any(|x| sys::lgetxattr(&c, x).is_ok_and(|v| v == b"y"));
        }
        if parts.is_empty() {
            let c = path_c(&at)?;
            stop |= OPAQUE
                .iter()
                .any(|x| sys::lgetxattr(&c, x).is_ok_and(|v| v == b"y"));
        }
        let d = sys::open_dir(&at)?;
        for name in sys::list_dir(d.as_fd())? {
            if names.contains(&name) || hidden.contains(&name) {
                continue;
            }
            if sys::is_whiteout(&sys::lstat_at(d.as_fd(), &name)?) {
                hidden.insert(name);
            } else {
                names.insert(name);
            }
        }
        if stop {
            break;
        }
    }
    Ok(names)
}

fn path_c(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The directory holding `path`, opened, and its last component.
fn open_parent(path: &Path) -> io::Result<(std::os::fd::OwnedFd, CString)> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let name =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((sys::open_dir(parent)?, name))
}

fn dir_times(st: &libc::stat) -> (Time, Time) {
    (
        Time {
            sec: st.st_atime,
            nsec: st.st_atime_nsec,
        },
        Time {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec,
        },
    )
}

/// What the lower layers (topmost first) show at `rel`.
fn below(lowers: &[PathBuf], rel: &Path) -> io::Result<Below> {
    Ok(match shown(lowers, rel)? {
        None => Below::Nothing,
        Some((_, st)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Below::Dir,
        Some(_) => Below::Other,
    })
}

/// The entry the lower layers (topmost first) show at `rel`, merged as
/// overlayfs merges them: its path and status. A whiteout or a
/// non-directory on the way hides the layers beneath, and so does an
/// opaque directory, below itself.
pub(crate) fn shown(lowers: &[PathBuf], rel: &Path) -> io::Result<Option<(PathBuf, libc::stat)>> {
    let parts: Vec<&std::ffi::OsStr> = rel.iter().collect();
    'layers: for layer in lowers {
        let mut last_of_merge = false;
        let mut at = layer.clone();
        for (k, part) in parts.iter().enumerate() {
            at.push(part);
            let c = CString::new(at.as_os_str().as_bytes())
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let st = match lstat(&c) {
                Ok(st) => st,
                // this layer holds nothing here; the next may
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if last_of_merge {
                        return Ok(None);
                    }
                    continue 'layers;
                }
                Err(e) => return Err(e),
            };
            if sys::is_whiteout(&st) {
                return Ok(None);
            }
            if k + 1 == parts.len() {
                return Ok(Some((at, st)));
            }
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Ok(None);
            }
            if OPAQUE
                .iter()
                .any(|x| sys::lgetxattr(&c, x).is_ok_and(|v| v == b"y"))
            {
                last_of_merge = true;
            }
        }
    }
    Ok(None)
}

/// Whether the non-directory `name` in `dir` (status `st`, at `rel`) has
/// the type, size, device, owner, mode, times, xattrs, link target and
/// bytes of the entry the lower layers show at `rel`.
pub(crate) fn same_as_shown(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    st: &libc::stat,
    lowers: &[std::path::PathBuf],
    rel: &[u8],
) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let Some((lower, lst)) = shown(
        lowers,
        std::path::Path::new(std::ffi::OsStr::from_bytes(rel)),
    )?
    else {
        return Ok(false);
    };
    if (lst.st_mode, lst.st_size, lst.st_rdev) != (st.st_mode, st.st_size, st.st_rdev) {
        return Ok(false);
    }
    // A file with as many names as below, or more, may have a new one,
    // which the layer must record as a link to it; fewer (a name removed)
    // or one on both sides leaves nothing new to record.
    if st.st_nlink > lst.st_nlink || (st.st_nlink == lst.st_nlink && st.st_nlink > 1) {
        return Ok(false);
    }
    let (parent, lname) = open_parent(&lower)?;
    if crate::tree::read_meta_at(dir, name)?.1
        != crate::tree::read_meta_at(parent.as_fd(), &lname)?.1
    {
        return Ok(false);
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFLNK => {
            Ok(sys::readlinkat(dir, name)? == sys::readlinkat(parent.as_fd(), &lname)?)
        }
        libc::S_IFREG => {
            use std::io::Read;
            let open = |d: BorrowedFd<'_>, n: &std::ffi::CStr| {
                sys::openat(d, n, libc::O_RDONLY | libc::O_NONBLOCK, 0).map(std::fs::File::from)
            };
            let (mut a, mut b) = (open(dir, name)?, open(parent.as_fd(), &lname)?);
            let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
            loop {
                let n = a.read(&mut x)?;
                if n == 0 {
                    return Ok(b.read(&mut y[..1])? == 0);
                }
                b.read_exact(&mut y[..n])?;
                if x[..n] != y[..n] {
                    return Ok(false);
                }
            }
        }
        _ => Ok(true),
    }
}

fn lstat(path: &CStr) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated; `st` is writable.
    if unsafe { libc::lstat(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}
