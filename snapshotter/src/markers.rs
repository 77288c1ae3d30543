//! Before an upper directory becomes a layer: drop the whiteouts and opaque
//! markers that hide nothing of the lower layers.
//!
//! The three view backends reach the same tree by different ways, and each
//! can leave a marker the others do not: kernel overlayfs makes every
//! directory created over a whiteout opaque, even where the lower layers
//! had a file or nothing; the FUSE view carries the whiteouts of a
//! directory it moves; the copy backend marks only what it must. A marker
//! that hides nothing changes no tree, but it changes the layer's bytes, so
//! the same build would give a different digest per backend. Here a
//! whiteout stays only where the lower layers show an entry, and an opaque
//! marker only where they show a directory, and nothing is kept beneath a
//! directory that stays opaque (it hides everything below already).
//!
//! It never touches a lower layer, and keeps the times of every directory
//! it changes (a layer records them).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Time};

/// The opaque markers kiln's layer format and overlayfs use.
const OPAQUE: [&CStr; 2] = [c"user.overlay.opaque", c"trusted.overlay.opaque"];

/// Drop the needless markers of `upper`, a view over `lowers` (topmost
/// first), and the entries that are what the lowers show already.
pub fn drop_needless(upper: &Path, lowers: &[PathBuf]) -> io::Result<()> {
    let dir = sys::open_dir(upper)?;
    walk(dir.as_fd(), Path::new(""), lowers, false)?;
    Ok(())
}

/// What the lower layers show at a path.
#[derive(Debug, PartialEq, Eq)]
enum Below {
    Nothing,
    Dir,
    Other,
}

/// Clean the directory `dir` (at `rel`); returns whether it is now empty
/// and itself the same as the lowers' directory there (its parent may
/// drop it).
fn walk(dir: BorrowedFd<'_>, rel: &Path, lowers: &[PathBuf], hidden: bool) -> io::Result<bool> {
    let times = dir_times(&sys::lstat_at(dir, c"")?);
    let mut changed = false;
    let mut kept = 0usize;
    for name in sys::list_dir(dir)? {
        let path = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let st = sys::lstat_at(dir, &name)?;
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if sys::is_whiteout(&st) {
            if hidden || below(lowers, &path)? == Below::Nothing {
                sys::unlinkat(dir, &name, false)?;
                changed = true;
                continue;
            }
        } else if is_dir {
            let sub = sys::open_dir_at(dir, &name)?;
            let mut opaque = false;
            for x in OPAQUE {
                if sys::fgetxattr(sub.as_fd(), x).is_ok_and(|v| v == b"y") {
                    if hidden || below(lowers, &path)? != Below::Dir {
                        sys::fremovexattr(sub.as_fd(), x)?;
                    } else {
                        opaque = true;
                    }
                }
            }
            let empty_and_same = walk(sub.as_fd(), &path, lowers, hidden || opaque)?;
            drop(sub);
            if empty_and_same && !opaque && !hidden {
                sys::unlinkat(dir, &name, true)?;
                changed = true;
                continue;
            }
        } else if !hidden
            && st.st_nlink == 1
            && same_as_shown(dir, &name, &st, lowers, path.as_os_str().as_bytes())?
        {
            // a copy-up that changed nothing (a chown to the same owner)
            sys::unlinkat(dir, &name, false)?;
            changed = true;
            continue;
        }
        kept += 1;
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
    if lst.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Ok(false);
    }
    let (parent, lname) = open_parent(&lower)?;
    Ok(crate::tree::read_meta_at(dir, c"")?.1
        == crate::tree::read_meta_at(parent.as_fd(), &lname)?.1)
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
