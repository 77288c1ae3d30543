//! File-tree mechanics shared by apply and the copy backend, all relative to
//! directory fds and never following a symlink: copying one node with its
//! full metadata (owner, mode including setuid/setgid, xattrs, times), and
//! setting metadata in the order the kernel requires (chown clears setuid
//! bits and file capabilities, so it comes first; times come last).
//!
//! It decides nothing about which paths are allowed; callers validate paths
//! before they reach this module.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use crate::sys::{self, Time};

/// Metadata kiln keeps for every node of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// permission bits including setuid, setgid and sticky
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    pub xattrs: Vec<(CString, Vec<u8>)>,
}

/// Whether an xattr name is overlay bookkeeping, which never travels
/// between layers as content.
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.overlay.") || name.starts_with(b"trusted.overlay.")
}

/// `/proc/self/fd/<dir>/<name>`: lets the `l*xattr` calls reach a node of
/// any type (fifos cannot be opened without blocking, symlinks not at all)
/// while resolution stays anchored at an fd we hold.
pub fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    CString::new(p).expect("no NUL inside")
}

/// Metadata of `name` in `dir` (not following a symlink), keeping all
/// xattrs except overlay ones.
pub fn read_meta_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<(libc::stat, Meta)> {
    let st = sys::lstat_at(dir, name)?;
    // an empty name means `dir` itself: through the descriptor (the
    // l*xattr calls on /proc/self/fd/N would read the magic link's own,
    // which are none)
    let names = if name.is_empty() {
        sys::flistxattr(dir)?
    } else {
        sys::llistxattr(&proc_path(dir, name))?
    };
    let mut xattrs = Vec::new();
    for n in names {
        if is_overlay_xattr(&n) {
            continue;
        }
        let cn = CString::new(n).expect("xattr names have no NUL");
        let v = if name.is_empty() {
            sys::fgetxattr(dir, &cn)?
        } else {
            sys::lgetxattr(&proc_path(dir, name), &cn)?
        };
        xattrs.push((cn, v));
    }
    let meta = Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: Time {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec,
        },
        xattrs,
    };
    Ok((st, meta))
}

/// Set owner, mode, xattrs and times on an open file or directory.
pub fn set_meta_fd(fd: BorrowedFd<'_>, meta: &Meta) -> io::Result<()> {
    sys::lchown_at(fd, c"", meta.uid, meta.gid)?;
    sys::fchmod(fd, meta.mode)?;
    for (name, value) in &meta.xattrs {
        sys::fsetxattr(fd, name, value)?;
    }
    sys::set_times_at(fd, c"", meta.mtime, meta.mtime)
}

/// Set owner, mode (not for symlinks), xattrs and times on `name` in `dir`
/// without opening it.
pub fn set_meta_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    meta: &Meta,
    is_symlink: bool,
) -> io::Result<()> {
    sys::lchown_at(dir, name, meta.uid, meta.gid)?;
    if !is_symlink {
        sys::fchmodat(dir, name, meta.mode)?;
    }
    if !meta.xattrs.is_empty() {
        let path = proc_path(dir, name);
        for (n, v) in &meta.xattrs {
            // the kernel refuses user.* xattrs on symlinks; such an xattr
            // cannot exist on a symlink we read either
            if is_symlink && n.to_bytes().starts_with(b"user.") {
                continue;
            }
            sys::lsetxattr(&path, n, v)?;
        }
    }
    sys::set_times_at(dir, name, meta.mtime, meta.mtime)
}

/// Write `data` to `file` keeping runs of zero blocks as holes, then set
/// the file's length: sparse files stay sparse. `buf` is scratch space
/// reused across calls (one allocation per apply, not per file).
pub fn write_sparse(file: &mut File, mut data: impl Read, buf: &mut Vec<u8>) -> io::Result<u64> {
    const BLOCK: usize = 4096;
    const BUF: usize = 1 << 20;
    if buf.len() < BUF {
        buf.resize(BUF, 0);
    }
    let is_zero = |b: &[u8]| {
        b.len() == BLOCK
            && b.chunks_exact(16)
                .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
    };
    let mut pos: u64 = 0;
    let mut seeked = false;
    loop {
        let mut filled = 0;
        while filled < BUF {
            let n = data.read(&mut buf[filled..BUF])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        // one write per run of data blocks, one seek per run of zero blocks
        let mut at = 0;
        while at < filled {
            let zero = is_zero(&buf[at..filled.min(at + BLOCK)]);
            let mut end = at;
            while end < filled && is_zero(&buf[end..filled.min(end + BLOCK)]) == zero {
                end = filled.min(end + BLOCK);
            }
            if zero {
                file.seek(SeekFrom::Current(
                    i64::try_from(end - at).expect("at most 1 MiB"),
                ))?;
                seeked = true;
            } else {
                file.write_all(&buf[at..end])?;
            }
            at = end;
        }
        pos += filled as u64;
        if filled < BUF {
            break;
        }
    }
    if seeked {
        file.set_len(pos)?;
    }
    Ok(pos)
}

/// Copy the non-directory `name` in `src` to `dst_name` in `dst` with its
/// metadata. Sockets are skipped (returns false); everything else,
/// including whiteouts, is copied.
pub fn copy_node_at(
    src: BorrowedFd<'_>,
    name: &CStr,
    st: &libc::stat,
    meta: &Meta,
    dst: BorrowedFd<'_>,
    dst_name: &CStr,
) -> io::Result<bool> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let from = File::from(sys::openat(src, name, libc::O_RDONLY, 0)?);
            let mut to = File::from(sys::openat(
                dst,
                dst_name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )?);
            // io::copy between files uses copy_file_range (reflinks where
            // the file system has them)
            io::copy(&mut &from, &mut to)?;
            set_meta_fd(to.as_fd(), meta)?;
        }
        libc::S_IFLNK => {
            let target = sys::readlinkat(src, name)?;
            let target = CString::new(target).expect("link targets have no NUL");
            sys::symlinkat(&target, dst, dst_name)?;
            set_meta_at(dst, dst_name, meta, true)?;
        }
        libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK => {
            let ft = st.st_mode & libc::S_IFMT;
            sys::mknodat(dst, dst_name, ft | (meta.mode & 0o777), st.st_rdev)?;
            set_meta_at(dst, dst_name, meta, false)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Clamp the mtime of everything under the directory `dir` (not `dir`
/// itself) to at most `epoch`, dropping sub-second parts of clamped times,
/// so a layer directory matches a layer tar written with SOURCE_DATE_EPOCH.
pub fn clamp_mtimes(dir: BorrowedFd<'_>, epoch: i64) -> io::Result<()> {
    let limit = Time {
        sec: epoch,
        nsec: 0,
    };
    for name in sys::list_dir(dir)? {
        let st = sys::lstat_at(dir, &name)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let sub = sys::open_dir_at(dir, &name)?;
            clamp_mtimes(sub.as_fd(), epoch)?;
        }
        if st.st_mtime >= epoch {
            let atime = Time {
                sec: st.st_atime.min(epoch),
                nsec: 0,
            };
            sys::set_times_at(dir, &name, atime, limit)?;
        }
    }
    Ok(())
}
