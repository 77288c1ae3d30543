//! File operations confined to a root directory. Every path inside an image
//! or a build context is attacker-controlled: a component may be a symlink
//! to `/etc` or `..`. Everything here resolves paths with openat2's
//! RESOLVE_IN_ROOT against a directory descriptor, creates and writes
//! through descriptors, and never follows a final symlink it did not mean
//! to, so nothing outside the root is read or written (docker cp
//! CVE-2018-15664 class).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kiln_sys::{check, cstr};

/// A directory that paths are resolved inside of.
pub struct Root {
    fd: OwnedFd,
}

/// The metadata kiln copies and hashes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    /// identity and change time: what a cached checksum is valid for
    /// (engine::statcache); zero for content that is not a file on disk
    pub ino: u64,
    pub dev: u64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl Meta {
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFLNK
    }
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

fn stat_fd(fd: RawFd, name: &CString, flags: libc::c_int) -> io::Result<Meta> {
    // SAFETY: libc::stat is plain integers, for which all-zero bytes are a
    // valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a NUL-terminated CString that outlives the call and
    // `st` a live, writable stat buffer; fstatat writes only into it, and a
    // bad `fd` is reported as EBADF, not undefined behaviour.
    check(unsafe { libc::fstatat(fd, name.as_ptr(), &mut st, flags) })?;
    Ok(Meta {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec,
        ino: st.st_ino,
        dev: st.st_dev,
        ctime: st.st_ctime,
        ctime_nsec: st.st_ctime_nsec,
    })
}

/// Names in the open directory `fd`, sorted, without `.` and `..`.
fn names_of(fd: OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let dir =
        nix::dir::Dir::from_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)).map_err(io::Error::from)?;
    let mut names: Vec<Vec<u8>> = Vec::new();
    for entry in dir {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// An open directory inside a [`Root`], walked one name at a time: each
/// call takes a single name read from the directory itself (never a path),
/// and a directory is entered with O_NOFOLLOW, so a walk cannot leave the
/// root even when the tree changes under it. One openat and one fstatat a
/// name, where a lookup from the root pays a whole path resolution.
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    fn name(name: &[u8]) -> io::Result<CString> {
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a single file name",
            ));
        }
        cstr(OsStr::from_bytes(name))
    }

    /// Names in this directory, sorted.
    pub fn list(&self) -> io::Result<Vec<Vec<u8>>> {
        let fd = self.subdir_fd(b".")?;
        names_of(fd)
    }

    fn subdir_fd(&self, name: &[u8]) -> io::Result<OwnedFd> {
        let c = if name == b"." {
            cstr(OsStr::from_bytes(name))?
        } else {
            Self::name(name)?
        };
        // SAFETY: `c` is NUL-terminated; the result is checked.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by openat, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The directory `name` in this one (not through a symlink).
    pub fn subdir(&self, name: &[u8]) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.subdir_fd(name)?,
        })
    }

    /// lstat of `name` in this directory.
    pub fn lstat(&self, name: &[u8]) -> io::Result<Meta> {
        stat_fd(
            self.fd.as_raw_fd(),
            &Self::name(name)?,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    }

    /// The target of the symlink `name` in this directory.
    pub fn read_link(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        read_link_at(self.fd.as_raw_fd(), &Self::name(name)?)
    }
}

fn read_link_at(dir: RawFd, name: &CString) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` has the given capacity; `name` is NUL-terminated.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(usize::try_from(n).unwrap_or(0));
    Ok(buf)
}

impl Root {
    pub fn open(dir: &Path) -> io::Result<Root> {
        let f = File::open(dir)?;
        Ok(Root {
            fd: OwnedFd::from(f),
        })
    }

    /// openat2 of `rel` with every component resolved inside the root.
    pub fn open_at(&self, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
        let rel = rel.as_os_str().as_bytes();
        let rel = if rel.is_empty() { b"." as &[u8] } else { rel };
        let path = cstr(OsStr::from_bytes(rel))?;
        kiln_runtime::open_in_root_at(self.fd.as_raw_fd(), &path, flags)
    }

    /// lstat of `rel` inside the root: intermediate symlinks resolve inside
    /// the root, the final component is not followed.
    pub fn lstat(&self, rel: &Path) -> io::Result<Meta> {
        let (parent, name) = split(rel);
        let dir = self.open_at(parent, libc::O_PATH | libc::O_DIRECTORY)?;
        stat_fd(dir.as_raw_fd(), &cstr(name)?, libc::AT_SYMLINK_NOFOLLOW)
    }

    /// stat following symlinks, all inside the root.
    pub fn stat(&self, rel: &Path) -> io::Result<Meta> {
        let fd = self.open_at(rel, libc::O_PATH)?;
        stat_fd(fd.as_raw_fd(), &cstr("")?, libc::AT_EMPTY_PATH)
    }

    /// Whether `rel` is a symlink that resolves, inside the root, to a
    /// directory.
    pub fn is_link_to_dir(&self, rel: &Path) -> bool {
        let (parent, name) = split(rel);
        let Ok(dir) = self.open_at(parent, libc::O_PATH | libc::O_DIRECTORY) else {
            return false;
        };
        let Ok(name) = cstr(name) else {
            return false;
        };
        stat_fd(dir.as_raw_fd(), &name, libc::AT_SYMLINK_NOFOLLOW).is_ok_and(|m| m.is_symlink())
            && self.stat(rel).is_ok_and(|m| m.is_dir())
    }

    /// Open a regular file for reading, inside the root.
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        Ok(File::from(
            self.open_at(rel, libc::O_RDONLY | libc::O_NOFOLLOW)?,
        ))
    }

    pub fn read_link(&self, rel: &Path) -> io::Result<Vec<u8>> {
        let (parent, name) = split(rel);
        let dir = self.open_at(parent, libc::O_PATH | libc::O_DIRECTORY)?;
        read_link_at(dir.as_raw_fd(), &cstr(name)?)
    }

    /// Names in the directory `rel` (inside the root), sorted.
    pub fn list(&self, rel: &Path) -> io::Result<Vec<Vec<u8>>> {
        names_of(self.open_at(rel, libc::O_RDONLY | libc::O_DIRECTORY)?)
    }

    /// The directory `rel`, resolved inside the root, to walk from.
    pub fn dir(&self, rel: &Path) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.open_at(rel, libc::O_RDONLY | libc::O_DIRECTORY)?,
        })
    }

    /// Create every missing directory of `rel` inside the root (0755,
    /// owned by `uid:gid`), resolving existing components inside the root.
    /// Returns a descriptor of the last one.
    pub fn mkdir_all(&self, rel: &Path, uid: u32, gid: u32) -> io::Result<OwnedFd> {
        self.mkdir_all_depth(rel, uid, gid, None, None)
    }

    /// [`Root::mkdir_all`] for a copy's destination: the directories it
    /// makes get `mode` (as BuildKit gives a COPY --chmod's mode to the
    /// parents it creates), and a symlink to a directory that does not
    /// exist makes that directory (resolved inside the root), as
    /// BuildKit's copy does. Cache mount sources and
    /// the like do not follow links this way: they use `mkdir_all`.
    pub fn mkdir_dest(
        &self,
        rel: &Path,
        uid: u32,
        gid: u32,
        mode: Option<u32>,
    ) -> io::Result<OwnedFd> {
        self.mkdir_all_depth(rel, uid, gid, mode, Some(0))
    }

    /// Where the symlink `link` (a path inside the root, its parent open
    /// as `parent`) points, as a path inside the root; None when it is
    /// not a symlink.
    fn link_target(&self, link: &Path, parent: &OwnedFd) -> io::Result<Option<std::path::PathBuf>> {
        match self.lstat(link) {
            Ok(m) if m.is_symlink() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        let target = std::path::PathBuf::from(OsStr::from_bytes(&self.read_link(link)?));
        let fd_path = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}"));
        let root = fd_path(self.fd.as_raw_fd())?;
        let base = if target.is_absolute() {
            std::path::PathBuf::new()
        } else {
            // the link's real directory, as the kernel resolved it
            let real = fd_path(parent.as_raw_fd())?;
            real.strip_prefix(&root)
                .map(Path::to_path_buf)
                .unwrap_or_default()
        };
        let mut out = std::path::PathBuf::new();
        for c in base.join(&target).components() {
            match c {
                std::path::Component::Normal(n) => out.push(n),
                // `..` stops at the root, as resolution inside it does
                std::path::Component::ParentDir => {
                    out.pop();
                }
                _ => {}
            }
        }
        Ok(Some(out))
    }

    fn mkdir_all_depth(
        &self,
        rel: &Path,
        uid: u32,
        gid: u32,
        mode: Option<u32>,
        // links followed so far, when dangling links are followed
        links: Option<usize>,
    ) -> io::Result<OwnedFd> {
        // most often it is there already: one lookup, not one a component
        match self.open_at(rel, libc::O_PATH | libc::O_DIRECTORY) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            found => return found,
        }
        let mut done = std::path::PathBuf::new();
        let mut fd = self.open_at(Path::new(""), libc::O_PATH | libc::O_DIRECTORY)?;
        for comp in rel.components() {
            let std::path::Component::Normal(name) = comp else {
                continue;
            };
            done.push(name);
            match self.open_at(&done, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(next) => fd = next,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    // a symlink to a missing directory: make that
                    // directory (inside the root), as BuildKit's copy does
                    let target = match links {
                        Some(_) => self.link_target(&done, &fd)?,
                        None => None,
                    };
                    if let (Some(target), Some(depth)) = (target, links) {
                        if depth >= 40 {
                            return Err(io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        self.mkdir_all_depth(&target, uid, gid, mode, Some(depth + 1))?;
                        fd = self.open_at(&done, libc::O_PATH | libc::O_DIRECTORY)?;
                        continue;
                    }
                    let n = cstr(name)?;
                    // SAFETY: `fd` is a directory descriptor, `n` a name.
                    let rc = unsafe { libc::mkdirat(fd.as_raw_fd(), n.as_ptr(), 0o755) };
                    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: `n` is a NUL-terminated CString alive across
                    // the call and `fd` an open descriptor owned here;
                    // fchownat takes no other pointers, and
                    // AT_SYMLINK_NOFOLLOW means no symlink is followed.
                    check(unsafe {
                        libc::fchownat(
                            fd.as_raw_fd(),
                            n.as_ptr(),
                            uid,
                            gid,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?;
                    if let Some(mode) = mode {
                        // SAFETY: as fchownat above; the name is the
                        // directory just made (fchmodat never follows a
                        // link in the last component when it is one).
                        check(unsafe { libc::fchmodat(fd.as_raw_fd(), n.as_ptr(), mode, 0) })?;
                    }
                    fd = self.open_at(&done, libc::O_PATH | libc::O_DIRECTORY)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(fd)
    }
}

/// Split a relative path into its parent and final name.
pub fn split(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name().unwrap_or(OsStr::new(".")),
    )
}

/// What to create at a destination name.
pub enum Node<'a> {
    Dir,
    File(&'a mut File),
    /// a regular file with these bytes (a heredoc source)
    Bytes(&'a [u8]),
    Symlink(&'a [u8]),
}

/// Create `name` in directory `dir` with `meta`'s mode and times and the
/// given owner, replacing a non-directory that is there (a symlink is
/// replaced, never followed).
pub fn create(
    dir: RawFd,
    name: &OsStr,
    node: Node<'_>,
    mode: u32,
    uid: u32,
    gid: u32,
    meta: &Meta,
) -> io::Result<()> {
    let n = cstr(name)?;
    let existing = stat_fd(dir, &n, libc::AT_SYMLINK_NOFOLLOW).ok();
    let want_dir = matches!(node, Node::Dir);
    if let Some(e) = existing {
        if !(e.is_dir() && want_dir) {
            let flags = if e.is_dir() { libc::AT_REMOVEDIR } else { 0 };
            // SAFETY: `dir` is a directory descriptor and `n` a plain name.
            check(unsafe { libc::unlinkat(dir, n.as_ptr(), flags) })?;
        }
    }
    let perm = mode & 0o7777;
    let is_link = matches!(node, Node::Symlink(_));
    match node {
        Node::Dir => {
            if existing.is_none_or(|e| !e.is_dir()) {
                // SAFETY: `n` is a NUL-terminated CString alive across the
                // call; mkdirat reads only it, and a bad `dir` is EBADF.
                check(unsafe { libc::mkdirat(dir, n.as_ptr(), 0o700) })?;
            }
        }
        Node::File(_) | Node::Bytes(_) => {
            // SAFETY: `n` is a NUL-terminated CString alive across the
            // call and openat reads only it; the returned descriptor is
            // checked before it is owned. O_NOFOLLOW|O_EXCL: a fresh file
            // only.
            let fd = unsafe {
                libc::openat(
                    dir,
                    n.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a descriptor we just opened.
            let mut out = unsafe { File::from_raw_fd(fd) };
            match node {
                Node::File(src) => {
                    io::copy(src, &mut out)?;
                }
                Node::Bytes(bytes) => io::Write::write_all(&mut out, bytes)?,
                Node::Dir | Node::Symlink(_) => {}
            }
        }
        Node::Symlink(target) => {
            let t = cstr(OsStr::from_bytes(target))?;
            // SAFETY: NUL-terminated strings, a directory descriptor.
            check(unsafe { libc::symlinkat(t.as_ptr(), dir, n.as_ptr()) })?;
        }
    }
    // SAFETY: plain *at calls on a name inside `dir`, never following a
    // final symlink.
    unsafe {
        check(libc::fchownat(
            dir,
            n.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        if !is_link {
            // fchmodat cannot refuse to follow; the node was just made by
            // us (or is a directory we checked), so no symlink is there.
            check(libc::fchmodat(dir, n.as_ptr(), perm, 0))?;
        }
        let t = libc::timespec {
            tv_sec: meta.mtime,
            tv_nsec: meta.mtime_nsec,
        };
        let times = [t, t];
        check(libc::utimensat(
            dir,
            n.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod link_tests {
    use super::*;

    #[test]
    fn mkdir_dest_makes_what_a_dangling_link_points_at_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../tmp/target", t.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/data/dir", t.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("loop", t.path().join("loop")).unwrap();
        let root = Root::open(t.path()).unwrap();
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        // mkdir_all itself never follows a dangling link
        assert!(root.mkdir_all(Path::new("link/sub"), uid, gid).is_err());
        root.mkdir_dest(Path::new("link/sub"), uid, gid, None)
            .unwrap();
        assert!(t.path().join("tmp/target/sub").is_dir());
        root.mkdir_dest(Path::new("abs/x"), uid, gid, None).unwrap();
        assert!(
            t.path().join("data/dir/x").is_dir(),
            "an absolute link is inside the root"
        );
        assert!(root
            .mkdir_dest(Path::new("loop/x"), uid, gid, None)
            .is_err());
    }
}
