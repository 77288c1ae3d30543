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
/// first).
pub fn drop_needless(upper: &Path, lowers: &[PathBuf]) -> io::Result<()> {
    let dir = sys::open_dir(upper)?;
    walk(dir.as_fd(), Path::new(""), lowers, false)
}

/// What the lower layers show at a path.
#[derive(Debug, PartialEq, Eq)]
enum Below {
    Nothing,
    Dir,
    Other,
}

fn walk(dir: BorrowedFd<'_>, rel: &Path, lowers: &[PathBuf], hidden: bool) -> io::Result<()> {
    let times = dir_times(&sys::lstat_at(dir, c"")?);
    let mut changed = false;
    for name in sys::list_dir(dir)? {
        let path = rel.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let st = sys::lstat_at(dir, &name)?;
        if sys::is_whiteout(&st) {
            if hidden || below(lowers, &path)? == Below::Nothing {
                sys::unlinkat(dir, &name, false)?;
                changed = true;
            }
        } else if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
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
            walk(sub.as_fd(), &path, lowers, hidden || opaque)?;
        }
    }
    if changed {
        sys::set_times_at(dir, c"", times.0, times.1)?;
    }
    Ok(())
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

/// What the lower layers (topmost first) show at `rel`, merged as overlayfs
/// merges them: a whiteout or a non-directory on the way hides the layers
/// beneath, and so does an opaque directory, below itself.
fn below(lowers: &[PathBuf], rel: &Path) -> io::Result<Below> {
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
                        return Ok(Below::Nothing);
                    }
                    continue 'layers;
                }
                Err(e) => return Err(e),
            };
            let leaf = k + 1 == parts.len();
            if sys::is_whiteout(&st) {
                return Ok(Below::Nothing);
            }
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            if leaf {
                return Ok(if is_dir { Below::Dir } else { Below::Other });
            }
            if !is_dir {
                return Ok(Below::Nothing);
            }
            if OPAQUE
                .iter()
                .any(|x| sys::lgetxattr(&c, x).is_ok_and(|v| v == b"y"))
            {
                last_of_merge = true;
            }
        }
    }
    Ok(Below::Nothing)
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
