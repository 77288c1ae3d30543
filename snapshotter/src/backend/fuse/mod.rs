//! The `fuse` backend: a writable view served from user space by kiln itself
//! over /dev/fuse, with the overlay logic in [`fs`] and the FUSE session and
//! server threads here.
//!
//! It owns mounting the view with mount(2) inside kiln's user and mount
//! namespace, the server threads, and unmounting. It must never use a setuid
//! helper (fusermount) or need host configuration (/etc/fuse.conf), and it
//! must never return from unmounting before every change the step made has
//! reached `upper`.

mod fs;
mod sys;

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, FuseSession, Reader};
use nix::errno::Errno;

use fs::OverlayFs;

use super::{MountedView, ViewSpec};

/// Errors of the fuse backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory of the view spec cannot be opened.
    #[error("cannot open {role} directory {path}: {source}")]
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
    #[error("cannot mount the fuse view at {target}: {source} (kiln must run inside its own user and mount namespace)")]
    Mount { target: PathBuf, source: nix::Error },
    /// The FUSE session could not be set up.
    #[error("fuse session at {target}: {message}")]
    Session { target: PathBuf, message: String },
    /// A server thread could not be started.
    #[error("cannot start a fuse server thread: {0}")]
    Thread(std::io::Error),
    /// A server thread could not be confined on a kernel with Landlock.
    #[error(transparent)]
    Confine(#[from] crate::confine::NotConfined),
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
    let open = |role: &'static str, path: &Path| {
        fs::LayerDir::open(path).map_err(|source| Error::Dir {
            role,
            path: path.to_path_buf(),
            source,
        })
    };
    let upper = open("upper", &spec.upper)?;
    let work = open("work", &spec.work)?;
    let lowers = spec
        .lowers
        .iter()
        .map(|l| open("lower", l))
        .collect::<Result<Vec<_>>>()?;
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
    let overlay = OverlayFs::new(lowers, upper, work).map_err(|source| Error::Dir {
        role: "upper",
        path: spec.upper.clone(),
        source,
    })?;
    serve(overlay, &spec.target, rules)
}

/// Mount `fs` at `target` and start the server threads, each confined to
/// `rules`.
fn serve(
    fs: OverlayFs,
    target: &Path,
    rules: &crate::confine::Rules,
) -> Result<Box<dyn MountedView>> {
    let session_err = |e: fuse_backend_rs::transport::Error| Error::Session {
        target: target.to_path_buf(),
        message: e.to_string(),
    };
    let mut session = FuseSession::new(target, "kiln", "kiln", false).map_err(session_err)?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(Error::DevFuse)?;
    // The channel buffer holds one request of up to max_read bytes; the
    // kernel must not send larger reads than the buffer.
    let max_read = session.bufsize() - 4096;
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
        target,
        Some("fuse.kiln"),
        nix::mount::MsFlags::MS_NOATIME,
        Some(opts.as_str()),
    )
    .map_err(|source| Error::Mount {
        target: target.to_path_buf(),
        source,
    })?;
    fs.set_notify_fd(dev.as_raw_fd());
    session.set_fuse_file(dev);
    let bufsize = session.bufsize();
    let mut view = FuseView {
        target: session.mountpoint().to_path_buf(),
        session: Some(session),
        threads: Vec::new(),
    };
    let fs = Arc::new(fs);
    let server = Arc::new(Server::new(fs.clone()));
    // each thread confines itself before it serves anything, and says how
    // that went: a view whose server could not be confined is not used
    let (confined_tx, confined_rx) = std::sync::mpsc::channel();
    let threads = server_threads();
    for i in 0..threads {
        let session = view.session.as_ref().ok_or_else(|| Error::Session {
            target: target.to_path_buf(),
            message: "session gone".into(),
        })?;
        // Each thread reads its own clone of the device fd, blocking: the
        // kernel wakes exactly one reader per request, where polling one
        // shared fd would wake every thread for each request.
        let dev = session.clone_fuse_file().map_err(session_err)?;
        let server = server.clone();
        let fs = fs.clone();
        let rules = rules.clone();
        let confined_tx = confined_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("kiln-fuse-{i}"))
            .spawn(move || {
                let confined = crate::confine::confine_current_thread(
                    crate::confine::Component::FuseServer,
                    &rules,
                );
                let ok = confined.is_ok();
                let _ = confined_tx.send(confined);
                if ok {
                    serve_requests(&dev, &server, &fs, bufsize);
                }
            })
            .map_err(Error::Thread)?;
        view.threads.push(t);
    }
    drop(confined_tx);
    for _ in 0..threads {
        match confined_rx.recv() {
            Ok(Ok(_)) => {}
            // the view's drop unmounts it, which ends the other threads
            Ok(Err(e)) => return Err(Error::Confine(e)),
            Err(_) => {
                return Err(Error::Session {
                    target: target.to_path_buf(),
                    message: "a server thread ended before it was confined".into(),
                })
            }
        }
    }
    Ok(Box::new(view))
}

/// One server thread: read a request, answer it, until the connection ends
/// (ENODEV once the view is unmounted).
fn serve_requests(
    dev: &std::fs::File,
    server: &Server<Arc<OverlayFs>>,
    fs: &OverlayFs,
    bufsize: usize,
) {
    let mut request = vec![0u8; bufsize];
    let mut reply = vec![0u8; bufsize];
    let pipe = sys::sized_pipe(SPLICE_PIPE_SIZE);
    loop {
        let len = match nix::unistd::read(dev.as_raw_fd(), &mut request) {
            Ok(len) => len,
            // ENOENT: the request was interrupted before we read it
            Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => continue,
            Err(_) => return,
        };
        if let Some((r, w)) = &pipe {
            if splice_read(dev, fs, &request[..len], r.as_raw_fd(), w.as_raw_fd()) {
                continue;
            }
        }
        let Ok(reader) = Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut request[..len])) else {
            continue;
        };
        let Ok(writer) = FuseDevWriter::<()>::new(dev.as_raw_fd(), &mut reply) else {
            continue;
        };
        // A request we cannot decode or answer leaves its caller with an
        // error; only a gone connection ends the thread.
        if let Err(fuse_backend_rs::Error::EncodeMessage(e)) =
            server.handle_message(reader, writer.into(), None, None)
        {
            if e.raw_os_error() == Some(libc::ENODEV) {
                return;
            }
        }
    }
}

/// Pipe size for spliced reads: one readahead request (128 KiB by default)
/// and its header fit with room to spare.
const SPLICE_PIPE_SIZE: usize = 1 << 20;
/// Reads smaller than this take the copying path: for a few pages, its two
/// syscalls (pread into our buffer, write to /dev/fuse) cost less than
/// splice's fstat, header write and two splices. A tree of 4 KiB files
/// (bench/snapshotter/run.sh, read2k) reads about 6% faster this way.
const SPLICE_MIN: usize = 64 << 10;
const FUSE_READ: u32 = 15;
const IN_HEADER_LEN: usize = 40;
const READ_IN_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Answer a READ by splicing file pages through a pipe into /dev/fuse
/// instead of copying them through our buffer (what libfuse does). Returns
/// false, having sent nothing, when the request is not a plain read of a
/// regular file, is too small to gain from splicing, or does not fit the
/// pipe; the normal path then answers it.
fn splice_read(dev: &std::fs::File, fs: &OverlayFs, req: &[u8], pr: RawFd, pw: RawFd) -> bool {
    if req.len() < IN_HEADER_LEN + READ_IN_LEN || u32_at(req, 4) != Some(FUSE_READ) {
        return false;
    }
    let (Some(unique), Some(nodeid), Some(fh), Some(offset), Some(size)) = (
        u64_at(req, 8),
        u64_at(req, 16),
        u64_at(req, IN_HEADER_LEN),
        u64_at(req, IN_HEADER_LEN + 8),
        u32_at(req, IN_HEADER_LEN + 16),
    ) else {
        return false;
    };
    let size = size as usize;
    if !(SPLICE_MIN..=SPLICE_PIPE_SIZE - OUT_HEADER_LEN).contains(&size) {
        return false;
    }
    let Some(file) = fs.read_file(nodeid, fh) else {
        return false;
    };
    let fd = file.as_raw_fd();
    let Ok(st) = sys::fstat(fd) else {
        return false;
    };
    let (Ok(mut off), Ok(file_size)) = (i64::try_from(offset), u64::try_from(st.st_size)) else {
        return false;
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return false;
    }
    let expected = usize::try_from(file_size.saturating_sub(offset))
        .unwrap_or(usize::MAX)
        .min(size);
    // A large request near the end of a file carries few bytes: the size
    // check above spared small requests the lookup and fstat, this one
    // judges by what would actually be sent (and skips empty reads).
    if expected < SPLICE_MIN {
        return false;
    }
    let total = OUT_HEADER_LEN + expected;
    let mut header = [0u8; OUT_HEADER_LEN];
    header[0..4].copy_from_slice(&u32::try_from(total).unwrap_or(0).to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    if sys::write_all(pw, &header).is_err() {
        sys::drain(pr, OUT_HEADER_LEN);
        return false;
    }
    let mut got = 0;
    while got < expected {
        match sys::splice(fd, Some(&mut off), pw, expected - got) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    if got != expected {
        // the file changed size under us: take the copying path
        sys::drain(pr, OUT_HEADER_LEN + got);
        return false;
    }
    // One splice must carry the whole reply: /dev/fuse takes a message per
    // write. On failure (the request was interrupted) the reply is dropped,
    // as a failed write of the copying path would be.
    match sys::splice(pr, None, dev.as_raw_fd(), total) {
        Ok(n) if n == total => {}
        Ok(n) => sys::drain(pr, total - n),
        Err(_) => sys::drain(pr, total),
    }
    true
}

/// A mounted FUSE view; dropping it unmounts and waits for the server.
struct FuseView {
    target: PathBuf,
    session: Option<FuseSession>,
    threads: Vec<JoinHandle<()>>,
}

impl MountedView for FuseView {
    fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for FuseView {
    fn drop(&mut self) {
        // A synchronous unmount writes back every dirty page through the
        // still-running server before the connection ends; only when the
        // view is still busy fall back to a lazy unmount, after which the
        // connection ends when the last user goes and the threads see it.
        if nix::mount::umount2(&self.target, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The session's own drop sees the ended connection and does nothing.
        self.session.take();
    }
}
