//! The small helpers around raw system calls that more than one of kiln's
//! crates needs (the runtime and the snapshotter do not depend on each
//! other): C strings from paths, a syscall's return value as a result, a
//! whole write to a descriptor, a new directory or empty file that follows
//! no symlink, the kernel release, and an error's cause
//! chain as one line of text.
//!
//! It owns no policy and no state but the cached kernel release: which
//! path is safe to touch, and what an error means, stay with the callers.
//! Anything only one crate needs stays in that crate. [`check`],
//! [`write_all`] and [`create_at`] allocate nothing, so the sandbox child (which must stay
//! async-signal-safe) may call them.

// Functions stay a screenful or two long (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;

/// A name or path as a C string: `&str`, `&OsStr`, `&Path` and their owned
/// forms (for raw bytes, `OsStr::from_bytes`). A NUL byte inside is an
/// `InvalidInput` error.
pub fn cstr(s: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A raw system call's return value as a result: negative means failure,
/// with the cause in errno.
pub fn check(rc: impl Into<i64>) -> io::Result<()> {
    if rc.into() < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Write all of `buf` to `fd`, retrying on EINTR and after short writes.
/// A write that makes no progress is ENOSPC (a full tmpfs).
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice, readable for `buf.len()` bytes for
        // the duration of the call; write(2) only reads it. A closed `fd`
        // fails with EBADF.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match n {
            n if n > 0 => buf = &buf[n.unsigned_abs().min(buf.len())..],
            0 => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Create `name` in the directory `parent`: a directory (mode 0755) when
/// `dir`, else an empty file (0644, made with O_EXCL). Neither follows a
/// symlink at `name`: one there is EEXIST. Allocates nothing, so the
/// sandbox child may call it.
pub fn create_at(parent: RawFd, name: &std::ffi::CStr, dir: bool) -> io::Result<()> {
    if dir {
        // SAFETY: `name` is NUL-terminated; a bad `parent` fails with EBADF.
        return check(unsafe { libc::mkdirat(parent, name.as_ptr(), 0o755) });
    }
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as above; the new descriptor is closed right away.
    let fd = unsafe { libc::openat(parent, name.as_ptr(), flags, 0o644) };
    check(fd)?;
    // SAFETY: `fd` was just opened here and nothing else holds it.
    unsafe { libc::close(fd) };
    Ok(())
}

/// The running kernel's release (`6.18.0-1-amd64`), asked once: it does
/// not change under a running kiln. By uname(2), one syscall, where
/// reading /proc/sys/kernel/osrelease is three. Empty if uname fails.
pub fn kernel_release() -> &'static str {
    static RELEASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RELEASE.get_or_init(|| {
        // SAFETY: utsname is plain old data (arrays of c_char); all zeroes
        // is a valid value.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: `u` is a writable utsname on our stack, which uname(2)
        // fills.
        if unsafe { libc::uname(&mut u) } != 0 {
            return String::new();
        }
        // SAFETY: uname succeeded, so `release` holds a NUL-terminated
        // string inside the array, which lives until the end of this block.
        let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
        release.to_string_lossy().into_owned()
    })
}

/// An error and its causes (`source()`, recursively) as one line, joined
/// with ": ": what failed, then why. For the places an error is flattened
/// into text, where a message alone would lose the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cstr_takes_paths_and_refuses_nul() {
        assert_eq!(cstr("a/b").unwrap().as_bytes(), b"a/b");
        assert_eq!(cstr(std::path::Path::new("/x")).unwrap().as_bytes(), b"/x");
        assert_eq!(
            cstr(OsStr::from_bytes(b"\xff")).unwrap().as_bytes(),
            b"\xff"
        );
        let e = cstr("a\0b").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn check_reads_errno_on_failure_only() {
        assert!(check(0).is_ok());
        assert!(check(7i64).is_ok());
        // SAFETY: close(-1) touches no memory; it fails with EBADF.
        let rc = unsafe { libc::close(-1) };
        assert_eq!(check(rc).unwrap_err().raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn write_all_writes_everything_or_says_why() {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe(2) fills.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        write_all(fds[1], b"hello").unwrap();
        let mut buf = [0u8; 8];
        // SAFETY: `buf` is writable for its length; fds[0] is the pipe's
        // read end, open.
        let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(&buf[..usize::try_from(n).unwrap()], b"hello");
        // SAFETY: closing the two descriptors pipe(2) gave us, once each.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let e = write_all(fds[1], b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn kernel_release_is_cached_and_looks_like_one() {
        let r = kernel_release();
        assert!(r.starts_with(|c: char| c.is_ascii_digit()), "{r}");
        assert!(std::ptr::eq(r, kernel_release()));
    }

    #[test]
    fn error_chain_joins_the_causes() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("cannot read /x")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(io::Error::from_raw_os_error(libc::ENOENT));
        let text = error_chain(&e);
        assert!(text.starts_with("cannot read /x: No such file"), "{text}");
    }
}
