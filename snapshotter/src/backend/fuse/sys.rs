//! Thin, safe wrappers over the raw Linux calls the FUSE overlay makes on its
//! layer directories: `*at` calls relative to a layer's directory fd, xattrs
//! by path, data copy. Every raw `libc` call of the overlay lives here.
//!
//! A relative path of several components is never handed to the kernel
//! whole: its parent is opened with `openat2` and `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS` ([`beneath`]), so no symlink
//! or `..` on the way can lead out of the layer, whatever a mistake in the
//! node table asks; the last component is then used relative to that
//! parent, never followed unless the caller asks.
//!
//! Nothing in this module knows about layers, whiteouts or FUSE.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// `stat` as the kernel fills it for every call here.
pub type Stat = libc::stat64;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A path relative to a layer root as a C string; the root itself is ".".
pub fn rel_cstr(rel: &[u8]) -> CString {
    if rel.is_empty() {
        return CString::from(c".");
    }
    // Names come from the kernel (NUL-free C strings) or from readdir, so a
    // NUL inside cannot happen; map it to EINVAL at the caller instead of
    // panicking if it ever does.
    CString::new(rel).unwrap_or_else(|_| CString::from(c"\u{1}invalid"))
}

/// Open a directory by absolute path as an `O_PATH` fd.
pub fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated string for the whole call.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// `openat2(dir, rel, flags)` resolved strictly beneath `dir`: no `..` out
/// of it, no symlink or magic link anywhere in `rel`.
pub fn open_beneath(dir: RawFd, rel: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: u64::from((flags | libc::O_CLOEXEC).unsigned_abs()),
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `rel` is NUL-terminated, `how` is a valid open_how of the
    // size passed, `dir` is an open directory fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            rel.as_ptr(),
            std::ptr::from_ref(&how),
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `fd` was just returned by openat2 and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A path below a directory, ready for one `*at` call: the directory
/// holding its last component (opened beneath the root when the path has
/// several components) and that component.
pub struct At {
    parent: Option<OwnedFd>,
    root: RawFd,
    name: CString,
}

impl At {
    /// The directory fd to pass to the `*at` call.
    pub fn dir(&self) -> RawFd {
        self.parent.as_ref().map_or(self.root, AsRawFd::as_raw_fd)
    }

    /// The last component, relative to [`At::dir`].
    pub fn name(&self) -> &CStr {
        &self.name
    }

    /// `/proc/self/fd/N/NAME`: the path for the xattr calls that have no
    /// `*at` form. The kernel jumps to the directory the descriptor holds
    /// and looks NAME up there; the `l*` calls do not follow it.
    pub fn proc_path(&self) -> Vec<u8> {
        let mut p = format!("/proc/self/fd/{}/", self.dir()).into_bytes();
        p.extend_from_slice(self.name.as_bytes());
        p
    }
}

/// Split `rel` (below the directory `root`) for a `*at` call: a single
/// component is used as is; the parent of a longer path is opened with
/// [`open_beneath`].
pub fn beneath(root: RawFd, rel: &CStr) -> io::Result<At> {
    let bytes = rel.to_bytes();
    match bytes.iter().rposition(|b| *b == b'/') {
        // `.` is the root itself; `..` would be its parent
        None if bytes == b".." => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        None => Ok(At {
            parent: None,
            root,
            name: rel.to_owned(),
        }),
        Some(i) => {
            let parent = CString::new(&bytes[..i])
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let name = CString::new(&bytes[i + 1..])
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            if parent.as_bytes().is_empty() || matches!(name.as_bytes(), b"" | b"." | b"..") {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let fd = open_beneath(root, &parent, libc::O_PATH | libc::O_DIRECTORY)?;
            Ok(At {
                parent: Some(fd),
                root,
                name,
            })
        }
    }
}

/// `fstatat(dir, rel, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: RawFd, rel: &CStr) -> io::Result<Stat> {
    let at = beneath(dir, rel)?;
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: the name is NUL-terminated, `st` points to writable memory of
    // the right size, and the directory fd is open.
    cvt(unsafe {
        libc::fstatat64(
            at.dir(),
            at.name().as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat64 returned success, so it initialised the whole struct.
    Ok(unsafe { st.assume_init() })
}

/// `fstat(fd)`.
pub fn fstat(fd: RawFd) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: `st` is writable memory of the right size; `fd` is open.
    cvt(unsafe { libc::fstat64(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat64 returned success, so it initialised the whole struct.
    Ok(unsafe { st.assume_init() })
}

/// `openat(dir, rel, flags | O_CLOEXEC | O_NOFOLLOW, mode)`.
pub fn open_at(dir: RawFd, rel: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let at = beneath(dir, rel)?;
    // SAFETY: the name is NUL-terminated and the directory fd is open.
    let fd = cvt(unsafe {
        libc::openat(
            at.dir(),
            at.name().as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat(dir, rel, mode)`.
pub fn mkdir_at(dir: RawFd, rel: &CStr, mode: u32) -> io::Result<()> {
    let at = beneath(dir, rel)?;
    // SAFETY: the name is NUL-terminated and the directory fd is open.
    cvt(unsafe { libc::mkdirat(at.dir(), at.name().as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// `mknodat(dir, rel, mode, rdev)`.
pub fn mknod_at(dir: RawFd, rel: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    let at = beneath(dir, rel)?;
    // SAFETY: the name is NUL-terminated and the directory fd is open.
    cvt(unsafe { libc::mknodat(at.dir(), at.name().as_ptr(), mode as libc::mode_t, rdev) })
        .map(drop)
}

/// `symlinkat(target, dir, rel)`.
pub fn symlink_at(target: &CStr, dir: RawFd, rel: &CStr) -> io::Result<()> {
    let at = beneath(dir, rel)?;
    // SAFETY: both strings are NUL-terminated; the directory fd is open.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), at.dir(), at.name().as_ptr()) }).map(drop)
}

/// `linkat(odir, orel, ndir, nrel, 0)`: never follows a symlink.
pub fn link_at(odir: RawFd, orel: &CStr, ndir: RawFd, nrel: &CStr) -> io::Result<()> {
    let (from, to) = (beneath(odir, orel)?, beneath(ndir, nrel)?);
    // SAFETY: both names are NUL-terminated; both directory fds are open.
    cvt(unsafe {
        libc::linkat(
            from.dir(),
            from.name().as_ptr(),
            to.dir(),
            to.name().as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `unlinkat(dir, rel, flags)`.
pub fn unlink_at(dir: RawFd, rel: &CStr, flags: i32) -> io::Result<()> {
    let at = beneath(dir, rel)?;
    // SAFETY: the name is NUL-terminated and the directory fd is open.
    cvt(unsafe { libc::unlinkat(at.dir(), at.name().as_ptr(), flags) }).map(drop)
}

/// `renameat2(odir, orel, ndir, nrel, flags)`.
pub fn rename_at(odir: RawFd, orel: &CStr, ndir: RawFd, nrel: &CStr, flags: u32) -> io::Result<()> {
    let (from, to) = (beneath(odir, orel)?, beneath(ndir, nrel)?);
    // SAFETY: both names are NUL-terminated; both directory fds are open.
    cvt(unsafe {
        libc::renameat2(
            from.dir(),
            from.name().as_ptr(),
            to.dir(),
            to.name().as_ptr(),
            flags as libc::c_uint,
        )
    })
    .map(drop)
}

/// `readlinkat(dir, rel)`.
pub fn readlink_at(dir: RawFd, rel: &CStr) -> io::Result<Vec<u8>> {
    let at = beneath(dir, rel)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for `buf.len()` bytes; the name is
    // NUL-terminated and the directory fd is open.
    let n = unsafe {
        libc::readlinkat(
            at.dir(),
            at.name().as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n.unsigned_abs());
    Ok(buf)
}

/// `fchownat(dir, rel, uid, gid, AT_SYMLINK_NOFOLLOW)`; `u32::MAX` leaves an
/// id unchanged.
pub fn lchown_at(dir: RawFd, rel: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    let at = beneath(dir, rel)?;
    // SAFETY: the name is NUL-terminated and the directory fd is open.
    cvt(unsafe {
        libc::fchownat(
            at.dir(),
            at.name().as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `fchown(fd, uid, gid)`; `u32::MAX` leaves an id unchanged.
pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchown takes a descriptor and integers, no pointer; a closed
    // `fd` fails with EBADF.
    cvt(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

/// `futimens(fd, [atime, mtime])`.
pub fn futimens(fd: RawFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: `times` borrows two timespecs for the call, which the kernel
    // only reads; a closed `fd` fails with EBADF.
    cvt(unsafe { libc::futimens(fd, times.as_ptr()) }).map(drop)
}

/// `fchmod(fd, mode)`.
pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: fchmod takes a descriptor and an integer, no pointer; a closed
    // `fd` fails with EBADF.
    cvt(unsafe { libc::fchmod(fd, mode as libc::mode_t) }).map(drop)
}

/// `fchmodat(dir, rel, mode, 0)`. Callers never pass a symlink.
pub fn chmod_at(dir: RawFd, rel: &CStr, mode: u32) -> io::Result<()> {
    let at = beneath(dir, rel)?;
    // SAFETY: the name is NUL-terminated and the directory fd is open.
    cvt(unsafe { libc::fchmodat(at.dir(), at.name().as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

/// `utimensat(dir, rel, [atime, mtime], AT_SYMLINK_NOFOLLOW)`.
pub fn lutimens_at(dir: RawFd, rel: &CStr, times: &[libc::timespec; 2]) -> io::Result<()> {
    let at = beneath(dir, rel)?;
    // SAFETY: the name is NUL-terminated, `times` points to two timespecs.
    cvt(unsafe {
        libc::utimensat(
            at.dir(),
            at.name().as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// The access and modification times of `st` as `utimensat` takes them.
pub fn stat_times(st: &Stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// `ftruncate(fd, len)`.
pub fn ftruncate(fd: RawFd, len: u64) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate takes a descriptor and an integer, no pointer; a
    // closed `fd` fails with EBADF.
    cvt(unsafe { libc::ftruncate64(fd, len) }).map(drop)
}

/// `fsync` or `fdatasync`.
pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    // SAFETY: fsync and fdatasync take a descriptor only, no pointer; a closed
    // `fd` fails with EBADF.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

/// `fstatvfs(fd)`.
pub fn fstatvfs(fd: RawFd) -> io::Result<libc::statvfs64> {
    let mut st = MaybeUninit::<libc::statvfs64>::uninit();
    // SAFETY: `st` is writable memory of the right size; `fd` is open.
    cvt(unsafe { libc::fstatvfs64(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs64 returned success, so it initialised the struct.
    Ok(unsafe { st.assume_init() })
}

/// Copy the first `len` bytes of `src` to the start of `dst`, by offset:
/// neither file position is used or moved (a kept descriptor is shared
/// with concurrent requests). In-kernel where the filesystems allow.
pub fn copy_data(src: &std::fs::File, dst: &std::fs::File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let (mut off_in, mut off_out): (i64, i64) = (0, 0);
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    while off_in < len {
        let chunk = usize::try_from((len - off_in).min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: both fds are open for the call; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => break,
                Some(libc::EINTR) => continue,
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Ok(());
        }
    }
    // What copy_file_range could not do, by reads and writes at offsets.
    let mut buf = vec![0u8; 1 << 20];
    while off_in < len {
        let want = usize::try_from(len - off_in)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = src.read_at(&mut buf[..want], off_in.unsigned_abs())?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], off_out.unsigned_abs())?;
        let n = i64::try_from(n).unwrap_or(0);
        off_in += n;
        off_out += n;
    }
    Ok(())
}

fn path_cstr(path: &[u8]) -> io::Result<CString> {
    CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `lgetxattr(path, name)`: `Ok(None)` when the attribute is absent.
pub fn lgetxattr(path: &[u8], name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let p = path_cstr(path)?;
    loop {
        // SAFETY: both strings are NUL-terminated; a null buffer of size 0
        // asks for the size only.
        let size = unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENODATA) => Ok(None),
                _ => Err(err),
            };
        }
        let mut buf = vec![0u8; size.unsigned_abs()];
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // the value grew between the two calls: ask again
                Some(libc::ERANGE) => continue,
                Some(libc::ENODATA) => return Ok(None),
                _ => return Err(err),
            }
        }
        buf.truncate(n.unsigned_abs());
        return Ok(Some(buf));
    }
}

/// `llistxattr(path)`: the NUL-separated list of names.
pub fn llistxattr(path: &[u8]) -> io::Result<Vec<u8>> {
    let p = path_cstr(path)?;
    loop {
        // SAFETY: `p` is NUL-terminated; a null buffer asks for the size.
        let size = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size.unsigned_abs()];
        if buf.is_empty() {
            return Ok(buf);
        }
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(err);
        }
        buf.truncate(n.unsigned_abs());
        return Ok(buf);
    }
}

/// `lsetxattr(path, name, value, flags)`.
pub fn lsetxattr(path: &[u8], name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = path_cstr(path)?;
    // SAFETY: strings are NUL-terminated, `value` is readable for its length.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `lremovexattr(path, name)`.
pub fn lremovexattr(path: &[u8], name: &CStr) -> io::Result<()> {
    let p = path_cstr(path)?;
    // SAFETY: both strings are NUL-terminated.
    cvt(unsafe { libc::lremovexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// Entries of the directory `rel` below `root` (without "." and ".."),
/// with their `d_type`; the directory is opened with [`open_beneath`].
pub fn read_dir(root: RawFd, rel: &CStr) -> io::Result<Vec<(Vec<u8>, u8)>> {
    let fd = open_beneath(root, rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut dir = nix::dir::Dir::from(fd).map_err(io::Error::from)?;
    let mut out = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let t = match entry.file_type() {
            Some(nix::dir::Type::Directory) => libc::DT_DIR,
            Some(nix::dir::Type::File) => libc::DT_REG,
            Some(nix::dir::Type::Symlink) => libc::DT_LNK,
            Some(nix::dir::Type::CharacterDevice) => libc::DT_CHR,
            Some(nix::dir::Type::BlockDevice) => libc::DT_BLK,
            Some(nix::dir::Type::Fifo) => libc::DT_FIFO,
            Some(nix::dir::Type::Socket) => libc::DT_SOCK,
            None => libc::DT_UNKNOWN,
        };
        out.push((name.to_vec(), t));
    }
    Ok(out)
}

/// Tell the kernel to forget the cached attributes of FUSE inode `ino`
/// (FUSE_NOTIFY_INVAL_INODE with offset -1: attributes only, no pages).
pub fn fuse_notify_inval_attr(dev: RawFd, ino: u64) -> io::Result<()> {
    const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
    let mut msg = [0u8; 40];
    msg[0..4].copy_from_slice(&40u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_INVAL_INODE.to_ne_bytes());
    // bytes 8..16: unique 0 marks a notification
    msg[16..24].copy_from_slice(&ino.to_ne_bytes());
    msg[24..32].copy_from_slice(&(-1i64).to_ne_bytes());
    // bytes 32..40: length 0
    // SAFETY: `msg` is readable for its length; `dev` is the open device.
    let n = unsafe { libc::write(dev, msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pipe (read end, write end) resized to at least `size` bytes, or None
/// when the system refuses (its size limit is then too small to help).
pub fn sized_pipe(size: usize) -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let want = libc::c_int::try_from(size).ok()?;
    // SAFETY: F_SETPIPE_SZ takes the pipe's write end, open because `w` owns
    // it, and an integer, no pointer.
    let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    (got >= want).then_some((r, w))
}

/// `splice(2)` without offsets on the pipe side; `off` is the file offset
/// when `from` is a file (advanced by the kernel).
///
/// No SPLICE_F_MOVE: into /dev/fuse it asks the kernel to steal the pipe's
/// pages into the view's page cache (`fuse_try_move_folio`). That path had
/// a use-after-free on connection abort until 2026 (upstream a0784849210,
/// backported to the stable kernels), a steal that succeeds takes the page
/// out of the lower layer's own cache, and it is no faster here: a cold
/// 512 MiB read was 216 ms with it and 203 ms without (medians of 12
/// alternating pairs). fuse-overlayfs splices without it too.
pub fn splice(from: RawFd, off: Option<&mut i64>, to: RawFd, len: usize) -> io::Result<usize> {
    let off_ptr = off.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    // SAFETY: both fds are open for the call; `off_ptr` is null or points to
    // an i64 the caller owns for the call.
    let n = unsafe { libc::splice(from, off_ptr, to, std::ptr::null_mut(), len, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

/// Throw away up to `len` bytes waiting in a pipe.
pub fn drain(fd: RawFd, mut len: usize) {
    let mut buf = [0u8; 8192];
    while len > 0 {
        // SAFETY: `buf` is writable for its length; `fd` is open.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len().min(len)) };
        if n <= 0 {
            return;
        }
        len -= n.unsigned_abs();
    }
}

/// A new descriptor of the FUSE connection `dev` is attached to
/// (`FUSE_DEV_IOC_CLONE`), so each server thread reads its own: the kernel
/// then wakes one reader per request.
pub fn clone_fuse_dev(dev: RawFd) -> io::Result<OwnedFd> {
    // FUSE_DEV_IOC_CLONE = _IOR(229, 0, uint32_t)
    nix::ioctl_read!(fuse_dev_ioc_clone, 229, 0, u32);
    let new = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut old = u32::try_from(dev).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `new` is an open /dev/fuse fd and `old` a u32 the ioctl reads
    // for the duration of the call.
    unsafe { fuse_dev_ioc_clone(new.as_raw_fd(), &mut old) }.map_err(io::Error::from)?;
    Ok(new.into())
}

/// Close every descriptor from `first` up.
pub fn close_from(first: u32) {
    // SAFETY: close_range only closes descriptors; the caller owns every
    // descriptor from `first` up (nothing else in the process uses them).
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
}

/// Name the calling thread (`comm`, at most 15 bytes).
pub fn set_thread_name(name: &CStr) {
    // SAFETY: `name` is a NUL-terminated string valid for the call; the
    // kernel copies at most 16 bytes of it.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
}

/// Set `no_new_privs` for the calling thread and threads it starts.
pub fn no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only, no pointer.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
}

/// Install a seccomp filter on every thread of this process
/// (`SECCOMP_FILTER_FLAG_TSYNC`), and on threads they start. Needs
/// `no_new_privs` or CAP_SYS_ADMIN.
pub fn install_seccomp_all_threads(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `prog`, which is valid for the call; the
    // kernel copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &fprog as *const libc::sock_fprog,
        )
    };
    match rc {
        0 => Ok(()),
        rc if rc < 0 => Err(io::Error::last_os_error()),
        // the id of a thread that could not take the filter
        _ => Err(io::Error::from_raw_os_error(libc::ESRCH)),
    }
}

/// Whether `st` is an overlayfs whiteout: a character device 0:0.
pub fn is_whiteout(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_leave_the_root_through_a_symlink_or_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path().join("root");
        std::fs::create_dir_all(root_path.join("d/e")).unwrap();
        std::fs::write(root_path.join("d/e/f"), "inside").unwrap();
        std::fs::write(dir.path().join("outside"), "host").unwrap();
        std::os::unix::fs::symlink(dir.path(), root_path.join("up")).unwrap();
        std::os::unix::fs::symlink("e", root_path.join("d/link")).unwrap();
        let root = open_dir(&root_path).unwrap();
        let r = root.as_raw_fd();
        let c = |s: &str| CString::new(s).unwrap();
        // the real tree works, at any depth
        assert!(lstat_at(r, &c("d/e/f")).is_ok());
        assert_eq!(read_dir(r, &c("d/e")).unwrap().len(), 1);
        // a symlinked parent, inside or out, is refused (ELOOP)
        for p in ["up/outside", "d/link/f"] {
            let e = lstat_at(r, &c(p)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{p}");
        }
        assert_eq!(
            open_at(r, &c("up/outside"), libc::O_RDONLY, 0)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ELOOP)
        );
        // `..` out of the root is refused (EXDEV), as is `..` alone
        let e = lstat_at(r, &c("d/../../outside")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
        assert!(lstat_at(r, &c("..")).is_err());
        // a listing through a symlink is refused too
        assert_eq!(
            read_dir(r, &c("up")).unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        // xattr paths name the entry in its real parent
        let at = beneath(r, &c("d/e/f")).unwrap();
        assert!(lgetxattr(&at.proc_path(), c"user.none").unwrap().is_none());
    }
}
