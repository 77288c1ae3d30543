//! Thin, safe wrappers over the raw file-system system calls the snapshotter
//! needs and `std` does not offer: `*at` calls relative to a directory fd that
//! never follow a symlink in the final component, whiteout device nodes,
//! extended attributes, timestamps and `flock`.
//!
//! This is the only module that calls `libc` for file-system work. It holds
//! no policy: it never decides which path is safe to touch, it only makes sure
//! that the call it is asked for cannot follow a symlink unless the caller
//! says so.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_ssize(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc.unsigned_abs())
    }
}

/// `openat(dir, name, flags | O_CLOEXEC | O_NOFOLLOW, mode)`.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is a valid borrowed fd and `name` a NUL-terminated string
    // that outlives the call; the kernel returns a new fd that nobody else owns.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a directory by absolute or relative path (following symlinks in the
/// path, which callers only use for trusted roots).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = kiln_sys::cstr(path)?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open the directory `name` inside `dir`, refusing symlinks.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; an empty `name` stats `dir`.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    let flags = if name.is_empty() {
        libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: `st` points to writable memory of the right size; `name` is
    // NUL-terminated; `dir` is a valid fd.
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `dir` is a BorrowedFd, so open for the call; `name` is a &CStr,
    // NUL-terminated, which the kernel only reads.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// `mknodat(dir, name, mode, dev)`; used for whiteouts (char 0:0) and fifos.
pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: `dir` is a BorrowedFd, so open for the call; `name` is a &CStr,
    // NUL-terminated, which the kernel only reads. mknodat does not follow a
    // symlink in the final component (it fails with EEXIST).
    cvt(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            dev as libc::dev_t,
        )
    })?;
    Ok(())
}

/// Create the overlayfs whiteout for `name`: a character device 0:0.
pub fn mknod_whiteout(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    mknodat(dir, name, libc::S_IFCHR, 0)
}

/// `symlinkat(target, dir, name)`.
pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated; `dir` is valid.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// `linkat(old_dir, old, new_dir, new, 0)`: never follows a symlink.
pub fn linkat(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: both directories are BorrowedFds, so open for the call; both
    // names are &CStrs the kernel only reads. Flags 0: a symlink is linked
    // itself, not followed.
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })?;
    Ok(())
}

/// `unlinkat(dir, name, AT_REMOVEDIR if dir)`.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `dir` is a BorrowedFd, so open for the call; `name` is a &CStr,
    // NUL-terminated, which the kernel only reads.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

/// `renameat(old_dir, old, new_dir, new)`.
pub fn renameat(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: both directories are BorrowedFds, so open for the call; both
    // names are &CStrs, NUL-terminated, which the kernel only reads.
    cvt(unsafe {
        libc::renameat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
        )
    })?;
    Ok(())
}

/// `readlinkat(dir, name)`.
pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is writable for `buf.len()` bytes; name NUL-terminated.
        let n = cvt_ssize(unsafe {
            libc::readlinkat(
                dir.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        })?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)`; an empty name
/// changes `dir` itself.
pub fn lchown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    let flags = if name.is_empty() {
        libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: `dir` is a BorrowedFd, so open for the call; `name` is a &CStr,
    // NUL-terminated, which the kernel only reads.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, flags) })?;
    Ok(())
}

/// `fchmod(fd, mode)`.
pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: `fd` is a BorrowedFd, so open for the call; fchmod takes no
    // pointer.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    Ok(())
}

/// `fchmodat(dir, name, mode, 0)`, for fifos just created by the caller
/// (fchmodat cannot refuse symlinks portably; callers never pass one).
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `dir` is a BorrowedFd, so open for the call; `name` is a &CStr,
    // NUL-terminated, which the kernel only reads.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) })?;
    Ok(())
}

/// A timestamp for [`set_times_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: i64,
}

fn timespec(t: Time) -> libc::timespec {
    libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: t.nsec as libc::c_long,
    }
}

/// Set atime and mtime of `name` in `dir` without following a symlink; an
/// empty name sets them on `dir` itself.
pub fn set_times_at(dir: BorrowedFd<'_>, name: &CStr, atime: Time, mtime: Time) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    let flags = if name.is_empty() {
        // utimensat with a NULL path would be needed for AT_EMPTY_PATH;
        // futimens is the documented way to set times on an fd.
        // SAFETY: `ts` is an array of two timespecs on our stack, read for the
        // call; `dir` is a BorrowedFd, so open.
        cvt(unsafe { libc::futimens(dir.as_raw_fd(), ts.as_ptr()) })?;
        return Ok(());
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: `ts` is an array of two timespecs on our stack and `name` a NUL-
    // terminated &CStr, both only read; `dir` is a BorrowedFd, so open.
    cvt(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), ts.as_ptr(), flags) })?;
    Ok(())
}

/// Extended attribute names of a path without following a final symlink.
pub fn llistxattr(path: &CStr) -> io::Result<Vec<Vec<u8>>> {
    list_with(|buf, len| {
        // SAFETY: `buf` is writable for `len` bytes; path NUL-terminated.
        unsafe { libc::llistxattr(path.as_ptr(), buf, len) }
    })
}

/// Extended attribute names of an open file.
pub fn flistxattr(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    list_with(|buf, len| {
        // SAFETY: `buf` is writable for `len` bytes; `fd` is a valid descriptor.
        unsafe { libc::flistxattr(fd.as_raw_fd(), buf, len) }
    })
}

fn list_with(
    mut call: impl FnMut(*mut libc::c_char, usize) -> libc::ssize_t,
) -> io::Result<Vec<Vec<u8>>> {
    loop {
        let size = match cvt_ssize(call(std::ptr::null_mut(), 0)) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match cvt_ssize(call(buf.as_mut_ptr().cast(), buf.len())) {
            Ok(n) => {
                buf.truncate(n);
                let mut names: Vec<Vec<u8>> = buf
                    .split(|b| *b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect();
                names.sort();
                return Ok(names);
            }
            // the list grew between the two calls: ask again
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn get_with(
    mut call: impl FnMut(*mut libc::c_void, usize) -> libc::ssize_t,
) -> io::Result<Vec<u8>> {
    loop {
        let size = cvt_ssize(call(std::ptr::null_mut(), 0))?;
        let mut buf = vec![0u8; size];
        if size == 0 {
            return Ok(buf);
        }
        match cvt_ssize(call(buf.as_mut_ptr().cast(), buf.len())) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Value of an extended attribute of an open file.
pub fn fgetxattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    get_with(|buf, len| {
        // SAFETY: `buf` is writable for `len` bytes; name NUL-terminated.
        unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), buf, len) }
    })
}

/// Value of an extended attribute of a path, not following a final symlink.
pub fn lgetxattr(path: &CStr, name: &CStr) -> io::Result<Vec<u8>> {
    get_with(|buf, len| {
        // SAFETY: `buf` is writable for `len` bytes; strings NUL-terminated.
        unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf, len) }
    })
}

/// Remove an extended attribute from an open file.
pub fn fremovexattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: name NUL-terminated; `fd` is a valid descriptor.
    cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// Set an extended attribute on an open file.
pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is readable for its length; name NUL-terminated.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })?;
    Ok(())
}

/// Set an extended attribute on a path without following a final symlink.
pub fn lsetxattr(path: &CStr, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is readable for its length; strings NUL-terminated.
    cvt(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })?;
    Ok(())
}

/// Try to take an `flock` on `fd`; `Ok(false)` when another open file
/// description holds a conflicting lock and `block` is false.
pub fn flock(fd: BorrowedFd<'_>, exclusive: bool, block: bool) -> io::Result<bool> {
    let mut op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if !block {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: `fd` is a BorrowedFd, so open for the call; flock takes no
        // pointer.
        let rc = unsafe { libc::flock(fd.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// `fsync` the directory at `path` so a rename inside it is durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Major and minor numbers of a device id.
pub fn dev_major_minor(dev: u64) -> (u32, u32) {
    (
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t),
    )
}

/// Whether `st` describes an overlayfs whiteout (char device 0:0).
pub fn is_whiteout(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// The current `CLOCK_REALTIME_COARSE` time, the clock the kernel stamps
/// inode change times from on file systems without fine-grained stamps.
pub fn coarse_now() -> Time {
    let mut ts = std::mem::MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: `ts` is writable; CLOCK_REALTIME_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, ts.as_mut_ptr()) };
    // SAFETY: clock_gettime with a valid clock id fills `ts`.
    let ts = unsafe { ts.assume_init() };
    Time {
        sec: ts.tv_sec,
        nsec: ts.tv_nsec,
    }
}

/// Names in the directory open at `dir` (without `.` and `..`), sorted by
/// bytes. Takes a duplicate of the fd, so `dir` stays usable.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let fd = dir.try_clone_to_owned()?;
    let mut d = nix::dir::Dir::from(fd).map_err(io::Error::from)?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(io::Error::from)?;
        let n = e.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            names.push(n.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Remove `name` in `dir` and, if it is a directory, everything under it,
/// never following a symlink.
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let st = match lstat_at(dir, name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let sub = open_dir_at(dir, name)?;
        for child in list_dir(sub.as_fd())? {
            remove_all_at(sub.as_fd(), &child)?;
        }
        unlinkat(dir, name, true)
    } else {
        unlinkat(dir, name, false)
    }
}

/// Birth time of `name` in `dir` (not following a symlink), if the file
/// system records one.
pub fn btime_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Time>> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `stx` is writable and sized for struct statx; name is
    // NUL-terminated; `dir` is a valid fd.
    cvt(unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BTIME,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled the struct (it was zeroed anyway).
    let stx = unsafe { stx.assume_init() };
    Ok((stx.stx_mask & libc::STATX_BTIME != 0).then_some(Time {
        sec: stx.stx_btime.tv_sec,
        nsec: i64::from(stx.stx_btime.tv_nsec),
    }))
}
