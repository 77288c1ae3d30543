//! The `overlay` backend: kernel overlayfs mounted inside kiln's user
//! namespace with `userxattr` (Linux 5.11 or later), so whiteouts and opaque
//! markers are exactly the layer format every backend shares.
//!
//! It owns building the mount (through mount(2) when the options fit in one
//! page, else through the fd-based mount API with one `lowerdir+` per layer)
//! and unmounting. It must never mount outside kiln's own mount namespace
//! and never pass options that make the kernel write anything but the layer
//! format into `upper` (no index, metacopy or redirects).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{MountedView, ViewSpec};

/// Errors of the kernel overlay backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory of the view spec is missing or unusable.
    #[error("cannot prepare {role} directory {path}")]
    Dir {
        role: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A path holds a NUL byte.
    #[error("path {0} holds a NUL byte and cannot be passed to the kernel")]
    NulInPath(PathBuf),
    /// The kernel refused the mount.
    #[error("kernel overlayfs mount at {target} failed at {step}{detail} (needs Linux 5.11+ with overlayfs usable in a user namespace; use --snapshotter fuse|copy)")]
    Mount {
        target: PathBuf,
        step: &'static str,
        source: io::Error,
        detail: String,
    },
}

/// Result of the kernel overlay backend.
pub type Result<T> = std::result::Result<T, Error>;

/// Longest option string mount(2) takes: one page, NUL included.
const MAX_MOUNT_DATA: usize = 4095;

/// Escape a path for overlayfs' option parser: `,` separates options, `:`
/// separates lower layers, `\` escapes.
fn escape(path: &Path, colon: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        if b == b',' || b == b'\\' || (colon && b == b':') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// Mount kernel overlayfs for `spec` at `spec.target`.
pub fn mount(spec: &ViewSpec) -> Result<Box<dyn MountedView>> {
    // overlayfs wants its own empty work directory and at least one lower
    // layer; both live inside the spec's work dir.
    let workdir = spec.work.join("ovl-work");
    mkdir(&workdir, "work")?;
    let mut lowers = spec.lowers.clone();
    if lowers.is_empty() {
        let empty = spec.work.join("ovl-empty-lower");
        mkdir(&empty, "lower")?;
        lowers.push(empty);
    }
    let mut data = b"lowerdir=".to_vec();
    for (i, l) in lowers.iter().enumerate() {
        if i > 0 {
            data.push(b':');
        }
        data.extend(escape(l, true));
    }
    data.extend(b",upperdir=");
    data.extend(escape(&spec.upper, false));
    data.extend(b",workdir=");
    data.extend(escape(&workdir, false));
    data.extend(b",userxattr");
    if data.len() <= MAX_MOUNT_DATA {
        mount_legacy(&spec.target, data)?;
    } else {
        mount_fd_api(&lowers, &spec.upper, &workdir, &spec.target)?;
    }
    Ok(Box::new(OverlayView {
        target: spec.target.clone(),
    }))
}

fn mkdir(path: &Path, role: &'static str) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::Dir {
            role,
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::NulInPath(p.to_path_buf()))
}

fn mount_legacy(target: &Path, data: Vec<u8>) -> Result<()> {
    let data = OsStr::from_bytes(&data);
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data),
    )
    .map_err(|e| Error::Mount {
        target: target.to_path_buf(),
        step: "mount(2)",
        source: io::Error::from(e),
        detail: String::new(),
    })
}

// Constants of the fd-based mount API (linux/mount.h).
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// Mount through fsopen/fsconfig/fsmount/move_mount: each lower layer is its
/// own `lowerdir+` (Linux 6.8+), so the number of layers is not limited by
/// the one-page option string.
fn mount_fd_api(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<()> {
    let fail = |step: &'static str, fs: Option<&OwnedFd>| {
        let source = io::Error::last_os_error();
        Error::Mount {
            target: target.to_path_buf(),
            step,
            source,
            detail: fs.map(kernel_log).unwrap_or_default(),
        }
    };
    // SAFETY: the type name is a NUL-terminated literal; fsopen has no
    // other preconditions.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(fail("fsopen", None));
    }
    let fd = i32::try_from(fd).map_err(|_| fail("fsopen", None))?;
    // SAFETY: `fd` was just returned by fsopen and is owned by nobody else.
    let fs = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |key: &std::ffi::CStr, value: Option<&CString>| -> i64 {
        let (cmd, v) = match value {
            Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
            None => (FSCONFIG_SET_FLAG, std::ptr::null()),
        };
        // SAFETY: `fs` is an open fs context; key and value are
        // NUL-terminated strings (or null for a flag) alive for the call.
        unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, key.as_ptr(), v, 0) }
    };
    for l in lowers {
        if set(c"lowerdir+", Some(&cpath(l)?)) < 0 {
            return Err(fail("fsconfig lowerdir+", Some(&fs)));
        }
    }
    if set(c"upperdir", Some(&cpath(upper)?)) < 0 {
        return Err(fail("fsconfig upperdir", Some(&fs)));
    }
    if set(c"workdir", Some(&cpath(work)?)) < 0 {
        return Err(fail("fsconfig workdir", Some(&fs)));
    }
    if set(c"userxattr", None) < 0 {
        return Err(fail("fsconfig userxattr", Some(&fs)));
    }
    // SAFETY: `fs` is an open fs context; the other arguments are unused.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        return Err(fail("fsconfig create", Some(&fs)));
    }
    // SAFETY: `fs` is a created fs context; flags are valid constants.
    let m = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0) };
    if m < 0 {
        return Err(fail("fsmount", Some(&fs)));
    }
    let m = i32::try_from(m).map_err(|_| fail("fsmount", None))?;
    // SAFETY: `m` was just returned by fsmount and is owned by nobody else.
    let mnt = unsafe { OwnedFd::from_raw_fd(m) };
    let t = cpath(target)?;
    // SAFETY: `mnt` is a detached mount fd, the empty path with
    // MOVE_MOUNT_F_EMPTY_PATH names it, and `t` is NUL-terminated.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(fail("move_mount", None));
    }
    Ok(())
}

/// The messages the kernel left on an fs context fd (why a parameter was
/// refused), as one string for the error.
fn kernel_log(fs: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: `buf` is writable for its length; `fs` is open.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.push_str(": ");
        out.push_str(&String::from_utf8_lossy(&buf[..n.unsigned_abs()]));
    }
    out
}

/// A mounted kernel overlay; dropping it unmounts.
struct OverlayView {
    target: PathBuf,
}

impl MountedView for OverlayView {
    fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for OverlayView {
    fn drop(&mut self) {
        // Kernel overlayfs writes straight to upper, so even a lazy unmount
        // leaves upper complete once the last user is gone.
        if nix::mount::umount2(&self.target, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_separators() {
        assert_eq!(
            escape(Path::new("/a,b:c\\d"), true),
            b"/a\\,b\\:c\\\\d".to_vec()
        );
        assert_eq!(escape(Path::new("/a,b:c"), false), b"/a\\,b:c".to_vec());
    }
}
