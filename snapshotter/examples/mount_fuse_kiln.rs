//! A mount helper that serves kiln's FUSE overlay view for test suites
//! written against overlayfs (the unionmount test suite's `--fuse=kiln`):
//! `mount -t fuse.kiln NAME MNT -o lowerdir=L1:L2,upperdir=U,workdir=W`
//! runs it (as `/sbin/mount.fuse.kiln NAME MNT -o OPTIONS`). It mounts the
//! view, returns once the mount is there, and keeps serving from a child
//! process until the mount goes away (`umount MNT`).
//!
//! Test tooling, not part of kiln: builds mount views from kiln's own
//! process. Options other than the three directories and the generic ones
//! mount(8) adds are refused.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_snapshotter::backend::{fuse, ViewSpec};

/// Options mount(8) may pass that mean nothing for this view.
const GENERIC: [&str; 8] = [
    "rw", "dev", "suid", "exec", "atime", "relatime", "async", "auto",
];

fn fail(msg: &str) -> ! {
    eprintln!("mount.fuse.kiln: {msg}");
    std::process::exit(1)
}

fn spec(args: &[String]) -> ViewSpec {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-o" {
            options.extend(
                it.next()
                    .unwrap_or_else(|| fail("-o needs options"))
                    .split(',')
                    .map(str::to_string),
            );
        } else if let Some(o) = a.strip_prefix("-o") {
            options.extend(o.split(',').map(str::to_string));
        } else if a.starts_with('-') {
            fail(&format!("unknown flag {a}"));
        } else {
            positional.push(a.clone());
        }
    }
    let [_name, target] = &positional[..] else {
        fail("usage: mount.fuse.kiln NAME MOUNTPOINT -o lowerdir=L1:L2,upperdir=U,workdir=W");
    };
    let (mut lowers, mut upper, mut work) = (Vec::new(), None, None);
    for o in options.iter().filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            Some(("lowerdir", v)) => lowers = v.split(':').map(PathBuf::from).collect(),
            Some(("upperdir", v)) => upper = Some(PathBuf::from(v)),
            Some(("workdir", v)) => work = Some(PathBuf::from(v)),
            None if GENERIC.contains(&o.as_str()) => {}
            _ => fail(&format!("unsupported option {o}")),
        }
    }
    ViewSpec {
        lowers,
        upper: upper.unwrap_or_else(|| fail("upperdir= is required")),
        work: work.unwrap_or_else(|| fail("workdir= is required")),
        target: PathBuf::from(target),
    }
}

/// The id of the newest mount at `target` in this mount namespace
/// (mountinfo's first field; ids are not reused while the namespace lives).
fn mount_id(target: &Path) -> Option<String> {
    let t = std::fs::canonicalize(target).ok()?;
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(&*t.to_string_lossy()))
        .and_then(|l| l.split(' ').next())
        .map(str::to_string)
}

/// Whether the mount with this id is still there.
fn still_mounted(id: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').next() == Some(id))
}

fn main() {
    fuse::serve_if_asked();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = spec(&args);
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        fail("pipe failed");
    }
    // SAFETY: both descriptors were just made and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The server must outlive this process (mount(8) waits for it): fork
    // while single-threaded, serve from the child.
    // SAFETY: no thread has been started yet.
    match unsafe { libc::fork() } {
        -1 => fail("fork failed"),
        0 => {
            drop(r);
            // SAFETY: plain setsid; the child leaves mount(8)'s session.
            unsafe { libc::setsid() };
            let mut w = std::fs::File::from(w);
            // no stdio of mount(8)'s caller is kept, here or in the server
            // process the mount starts: whoever reads it would wait for
            // the server to end
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null");
            if let Ok(null) = null {
                use std::os::fd::AsRawFd;
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors, which we
                    // replace on purpose.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            let view = match fuse::mount(&spec) {
                Ok(v) => v,
                Err(e) => {
                    let _ = write!(w, "{e}");
                    std::process::exit(1);
                }
            };
            // the next mount at the same place (the suite mounts a view per
            // test) is another helper's: watch this one's id
            let id = mount_id(&spec.target);
            let _ = w.write_all(b"ok");
            drop(w);
            // the server process ends by itself as soon as the kernel drops
            // the connection (umount); this one waits for the mount to go
            while id.as_deref().is_some_and(still_mounted) {
                std::thread::sleep(Duration::from_millis(5));
            }
            // the kernel ended the connection. Exit without dropping the
            // view: its drop unmounts by path, and by now the path may
            // hold the next test's mount, another helper's
            std::mem::forget(view);
            std::process::exit(0);
        }
        _ => {
            drop(w);
            let mut msg = String::new();
            let _ = std::fs::File::from(r).read_to_string(&mut msg);
            if msg != "ok" {
                fail(&format!("cannot mount {}: {msg}", spec.target.display()));
            }
        }
    }
}
