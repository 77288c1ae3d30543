//! The `fuse` backend: a writable view served from user space over
//! /dev/fuse, with the overlay logic in `fs` and the server process in
//! `server`.
//!
//! It owns mounting the view with mount(2) inside kiln's user and mount
//! namespace, starting the view's server process and handing it the
//! connection, and unmounting. The server is a process of its own (see
//! `server` for how it is confined), never threads of kiln: what a step
//! makes the server do cannot reach kiln's memory, where secrets and
//! registry credentials live.
//!
//! It must never use a setuid helper (fusermount) or need host
//! configuration (/etc/fuse.conf), and it must never return from
//! unmounting before every change the step made has reached `upper`.

mod fs;
mod server;
mod sys;

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::RwLock;
use std::time::Duration;

pub use server::{serve_if_asked, Stage, SERVER_ARG};

use super::{MountedView, ViewSpec};

/// Errors of the fuse backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory of the view spec cannot be opened.
    #[error("cannot open {role} directory {path}")]
    Dir {
        role: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// `work` is not on the same filesystem as `upper`.
    #[error("work directory {work} is not on the filesystem of upper directory {upper}: pass a work directory beside upper")]
    WorkNotBesideUpper { work: PathBuf, upper: PathBuf },
    /// /dev/fuse cannot be opened.
    #[error("cannot open /dev/fuse: {0} (load the fuse module and make /dev/fuse mode 0666, or use --snapshotter overlay|copy)")]
    DevFuse(std::io::Error),
    /// mount(2) of the FUSE filesystem failed.
    #[error("cannot mount the fuse view at {target} (kiln must run inside its own user and mount namespace)")]
    Mount { target: PathBuf, source: nix::Error },
    /// The mount point cannot be resolved.
    #[error("cannot use {target} as a mount point")]
    Target {
        target: PathBuf,
        source: std::io::Error,
    },
    /// The server process could not be started.
    #[error("cannot start the fuse server {program}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    /// The server process ended or went silent before it was serving.
    #[error("the fuse server {program} did not start serving: {why} (a program that mounts fuse views must call kiln_snapshotter::backend::fuse::serve_if_asked first in main)")]
    Handshake { program: PathBuf, why: String },
    /// The server process failed to set itself up; nothing was served.
    #[error("the fuse server failed at {stage}: {message}")]
    Server { stage: Stage, message: String },
}

/// Result of the fuse backend.
pub type Result<T> = std::result::Result<T, Error>;

/// How many threads serve one view. Requests are short and mostly wait on
/// the disk, so a few more threads than cores keep the kernel queue moving.
fn server_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .clamp(2, 8)
}

/// Size of one request buffer: fuse's largest message (256 pages of data)
/// and its header.
fn bufsize() -> usize {
    // SAFETY: sysconf has no memory effects.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    256 * page + 0x1000
}

/// The program started as a view's server (with [`SERVER_ARG`]); set by
/// programs whose own executable does not call [`serve_if_asked`], such as
/// test harnesses.
static SERVER_PROGRAM: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Serve views from `program` instead of this process's own executable.
pub fn set_server_program(program: impl Into<PathBuf>) {
    if let Ok(mut p) = SERVER_PROGRAM.write() {
        *p = Some(program.into());
    }
}

fn server_program() -> PathBuf {
    SERVER_PROGRAM
        .read()
        .ok()
        .and_then(|p| p.clone())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// How long a server may take from its exec to serving.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Mount a FUSE overlay view of `spec` at `spec.target` and serve it from
/// threads of this process until the returned view is dropped.
pub fn mount(spec: &ViewSpec) -> Result<Box<dyn MountedView>> {
    // Requests come from the step: each server thread may touch only the
    // view's own directories (Landlock).
    let rules = spec
        .lowers
        .iter()
        .fold(crate::confine::Rules::new(), |r, l| r.read(l))
        .write(&spec.upper)
        .write(&spec.work);
    mount_confined(spec, &rules)
}

/// [`mount`] with the server threads confined to `rules` instead of the
/// view's directories: for tests that show the confinement holds.
#[doc(hidden)]
pub fn mount_confined(
    spec: &ViewSpec,
    rules: &crate::confine::Rules,
) -> Result<Box<dyn MountedView>> {
    // The server opens the directories itself; look at them here too, so
    // that a wrong spec is reported as such rather than as a server failure.
    let check = |role: &'static str, path: &Path| match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Dir {
            role,
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        }),
        Err(source) => Err(Error::Dir {
            role,
            path: path.to_path_buf(),
            source,
        }),
    };
    check("upper", &spec.upper)?;
    check("work", &spec.work)?;
    for l in &spec.lowers {
        check("lower", l)?;
    }
    let same_fs = |a: &Path, b: &Path| -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => false,
        }
    };
    if !same_fs(&spec.work, &spec.upper) {
        return Err(Error::WorkNotBesideUpper {
            work: spec.work.clone(),
            upper: spec.upper.clone(),
        });
    }
    serve(spec, rules)
}

/// Mount the view at `spec.target`, start its server process, hand it the
/// connection, and wait until it is confined and serving.
fn serve(spec: &ViewSpec, rules: &crate::confine::Rules) -> Result<Box<dyn MountedView>> {
    let target = std::fs::canonicalize(&spec.target).map_err(|source| Error::Target {
        target: spec.target.clone(),
        source,
    })?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(Error::DevFuse)?;
    let bufsize = bufsize();
    // The kernel must not send larger reads than the server's buffer.
    let max_read = bufsize - 4096;
    // allow_other: the mount is made inside kiln's user namespace, so the
    // kernel only lets processes of that namespace and its descendants use
    // allow_other; without it only our uid 0 could enter the view and a
    // `USER 1000` step would get EACCES on its own rootfs.
    // default_permissions: the kernel checks modes and owners against the
    // attributes we report, exactly as for a local filesystem, so the server
    // (uid 0 here) never has to impersonate the caller.
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
        dev.as_raw_fd(),
        max_read
    );
    nix::mount::mount(
        Some("kiln"),
        &target,
        Some("fuse.kiln"),
        nix::mount::MsFlags::MS_NOATIME,
        Some(opts.as_str()),
    )
    .map_err(|source| Error::Mount {
        target: target.clone(),
        source,
    })?;
    // From here on the view's drop unmounts it, whatever fails.
    let mut view = FuseView {
        target,
        server: None,
        _control: None,
    };
    let program = server_program();
    let (ours, theirs) = UnixStream::pair().map_err(|source| Error::Spawn {
        program: program.clone(),
        source,
    })?;
    let child = Command::new(&program)
        .arg0("kiln-fuse")
        .arg(SERVER_ARG)
        .env_clear()
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    view.server = Some(child);
    let config = server::Config {
        lowers: spec.lowers.clone(),
        upper: spec.upper.clone(),
        work: spec.work.clone(),
        rules: rules.clone(),
        threads: server_threads(),
        bufsize,
    };
    let handshake = |why: String| Error::Handshake {
        program: program.clone(),
        why,
    };
    send_config(&ours, &config, &dev)
        .map_err(|e| handshake(format!("sending it the view: {e}")))?;
    // kiln keeps no descriptor of the connection: if the server dies, the
    // kernel ends the connection and the step sees errors, not a hang
    drop(dev);
    let reply = match read_reply(&ours) {
        Ok(r) => r,
        Err(e) => {
            // say how it ended, if it did
            let status = view.server.as_mut().and_then(|c| {
                std::thread::sleep(Duration::from_millis(20));
                c.try_wait().ok().flatten()
            });
            return Err(handshake(match status {
                Some(st) => format!("{e} ({st})"),
                None => e.to_string(),
            }));
        }
    };
    view._control = Some(ours);
    match reply {
        server::Reply::Ready => Ok(Box::new(view)),
        server::Reply::Failed { stage, message } => Err(Error::Server { stage, message }),
    }
}

/// One JSON line with the /dev/fuse descriptor attached to its first byte.
fn send_config(
    to: &UnixStream,
    config: &server::Config,
    dev: &std::fs::File,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut line = serde_json::to_vec(config)?;
    line.push(b'\n');
    let fds = [dev.as_fd().as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(
        to.as_raw_fd(),
        &[std::io::IoSlice::new(&line)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )?;
    let mut rest = to;
    rest.write_all(&line[n..])
}

/// The server's one reply line, waited for at most [`HANDSHAKE_TIMEOUT`].
fn read_reply(from: &UnixStream) -> std::io::Result<server::Reply> {
    from.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut line = Vec::new();
    std::io::BufReader::new(from.take(1 << 20)).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("it exited without a word"));
    }
    serde_json::from_slice(&line).map_err(std::io::Error::other)
}

/// A mounted FUSE view; dropping it unmounts and waits for the server.
struct FuseView {
    target: PathBuf,
    server: Option<Child>,
    /// kiln's end of the control socket: the server ends when it closes
    _control: Option<UnixStream>,
}

impl MountedView for FuseView {
    fn path(&self) -> &Path {
        &self.target
    }

    fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }
}

impl Drop for FuseView {
    fn drop(&mut self) {
        // A synchronous unmount writes back every dirty page through the
        // still-running server before the connection ends; only when the
        // view is still busy fall back to a lazy unmount, after which the
        // connection ends when the last user goes and the server sees it.
        if nix::mount::umount2(&self.target, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
        // The server exits once the connection has ended; only then is the
        // control socket closed (closing it earlier would end a server that
        // still serves a lazily unmounted view).
        if let Some(mut child) = self.server.take() {
            if self._control.is_none() {
                // it never became ready: nothing of it is worth waiting for
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self._control.take();
    }
}
