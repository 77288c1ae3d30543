//! The FUSE server process: serves one mounted view and nothing else.
//!
//! kiln mounts the view, then starts this process by executing a program
//! that calls [`serve_if_asked`] first thing (kiln itself, or a test's
//! helper) with an empty environment and a socket as its standard input.
//! Over that socket it receives the view's directories and the mounted
//! connection's /dev/fuse descriptor, confines itself, and answers with one
//! [`Reply`]. The exec gives it memory of its own: no secret, credential or
//! build state of kiln's is in it, whatever a step asks of the view.
//!
//! Setup is one numbered checklist ([`setup`]); any step that fails is
//! reported with its [`Stage`] and the view is not used. The server then
//! serves until the kernel ends the connection (unmount) or kiln goes away
//! (its end of the socket closes), whichever comes first.
//!
//! What this must never do: serve a request before every confinement step
//! has succeeded, or keep anything of kiln's environment.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use super::fs::{LayerDir, OverlayFs};
use super::sys;
use crate::confine::{Component, Rules};

/// The argument that makes a program serve instead of doing its own work.
pub const SERVER_ARG: &str = "__kiln-fuse-server";

/// The most bytes of configuration the server reads: a chain of hundreds
/// of layers is a few dozen KiB.
const MAX_CONFIG: usize = 16 << 20;

/// What kiln tells the server about the view it serves.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Config {
    /// read-only layer directories, topmost first
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// the directories the server may touch (Landlock)
    pub rules: Rules,
    /// how many threads read requests
    pub threads: usize,
    /// size of one request buffer, as the mount's max_read was derived from
    pub bufsize: usize,
}

/// The server's one answer to kiln.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Reply {
    /// confined and serving
    Ready,
    /// setup failed at `stage`: nothing was served
    Failed { stage: Stage, message: String },
}

/// The steps of `setup`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    ReceiveConfig,
    OpenLayers,
    CloneDevice,
    NetworkNamespace,
    Capabilities,
    NoNewPrivs,
    Landlock,
    StartThreads,
    Seccomp,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::ReceiveConfig => "receiving the view's configuration",
            Stage::OpenLayers => "opening the layer directories",
            Stage::CloneDevice => "cloning the /dev/fuse connection",
            Stage::NetworkNamespace => "entering a network namespace of its own",
            Stage::Capabilities => "dropping capabilities",
            Stage::NoNewPrivs => "setting no_new_privs",
            Stage::Landlock => "confining itself with Landlock",
            Stage::StartThreads => "starting its threads",
            Stage::Seccomp => "installing its seccomp filter",
        })
    }
}

/// The seccomp allowlist, compiled by build.rs from
/// `seccomp-profiles/fuse-server.json`.
const SECCOMP: &[libc::sock_filter] =
    &include!(concat!(env!("OUT_DIR"), "/fuse-server-seccomp.rs"));

/// The capabilities the server keeps: what a filesystem server running as
/// uid 0 of kiln's user namespace needs to store files of any owner and
/// mode in the upper layer and to read the lower ones (the kernel already
/// checked the step's own permissions: `default_permissions`). Everything
/// else, CAP_SYS_ADMIN first, goes.
const KEPT: [caps::Capability; 7] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    // whiteouts (character devices 0:0) and a step's own mknod
    caps::Capability::CAP_MKNOD,
    // a step's `setcap`: security.capability xattrs
    caps::Capability::CAP_SETFCAP,
];

/// If this process was started as a FUSE server, serve and exit; otherwise
/// return at once. A program that mounts fuse views calls this first in
/// `main`, before it starts threads or reads its arguments.
pub fn serve_if_asked() {
    if std::env::args_os().nth(1).is_some_and(|a| a == SERVER_ARG) {
        std::process::exit(main());
    }
}

fn main() -> i32 {
    // Nothing kiln left open without O_CLOEXEC stays: the server holds only
    // what it is given below.
    sys::close_from(3);
    // `ps` and `top` name it (its executable is /proc/self/exe: "exe")
    sys::set_thread_name(c"kiln-fuse");
    // SAFETY: kiln started this process with the control socket as fd 0,
    // which nothing else in this process owns.
    let control = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    let mut reply_to = match control.try_clone() {
        Ok(c) => c,
        Err(_) => return 2,
    };
    match setup(&control) {
        Ok(serving) => {
            if send(&mut reply_to, &Reply::Ready).is_err() {
                return 1;
            }
            // the threads end when the kernel ends the connection (unmount)
            for t in serving.threads {
                let _ = t.join();
            }
            0
        }
        Err((stage, err)) => {
            let _ = send(
                &mut reply_to,
                &Reply::Failed {
                    stage,
                    message: kiln_sys::error_chain(&*err),
                },
            );
            // threads waiting to serve never start: leave at once
            std::process::exit(1);
        }
    }
}

fn send(to: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    to.write_all(&line)
}

type Failed = (Stage, Box<dyn std::error::Error + Send + Sync>);

trait At<T> {
    fn at(self, stage: Stage) -> std::result::Result<T, Failed>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> At<T> for std::result::Result<T, E> {
    fn at(self, stage: Stage) -> std::result::Result<T, Failed> {
        self.map_err(|e| (stage, e.into()))
    }
}

/// Everything between the exec and the first request, in order.
fn setup(control: &UnixStream) -> std::result::Result<Serving, Failed> {
    // 1. The view's directories and the mounted connection.
    let (config, dev) = receive(control).at(Stage::ReceiveConfig)?;

    // 2. The layer directories, opened while the filesystem is still ours
    //    to walk.
    let open = |p: &PathBuf| {
        LayerDir::open(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
    };
    let lowers = config.lowers.iter().map(open).collect::<io::Result<_>>();
    let fs = lowers
        .and_then(|lowers| OverlayFs::new(lowers, open(&config.upper)?, open(&config.work)?))
        .at(Stage::OpenLayers)?;
    fs.set_notify_fd(dev.as_raw_fd());

    // 3. One descriptor of the connection per thread (opening /dev/fuse is
    //    not allowed once confined), and a splice pipe each.
    let threads = config.threads.clamp(1, 64);
    let devs = (0..threads)
        .map(|_| sys::clone_fuse_dev(dev.as_raw_fd()))
        .collect::<io::Result<Vec<_>>>()
        .at(Stage::CloneDevice)?;
    let pipes: Vec<_> = (0..threads)
        .map(|_| sys::sized_pipe(SPLICE_PIPE_SIZE))
        .collect();

    // 4. No network: a namespace of its own with only a down loopback.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).at(Stage::NetworkNamespace)?;

    // 5. Only the file capabilities, in every set.
    drop_capabilities().at(Stage::Capabilities)?;

    // 6. No privilege from any exec (there is none; seccomp needs it).
    sys::no_new_privs().at(Stage::NoNewPrivs)?;

    // 7. Only the view's directories (refused only on a kernel that has
    //    Landlock: `kiln info` reports which).
    crate::confine::confine_current_thread(Component::FuseServer, &config.rules)
        .at(Stage::Landlock)?;

    // 8. The threads, started now so that no clone needs to be allowed
    //    later; each inherits the above and waits until step 9 is done.
    //    One more thread ends the process when kiln's end of the control
    //    socket closes (kiln went away).
    let go = Arc::new(std::sync::Barrier::new(threads + 1));
    let fs = Arc::new(fs);
    let server = Arc::new(Server::new(fs.clone()));
    let mut handles = Vec::with_capacity(threads);
    for (i, (dev, pipe)) in devs.into_iter().zip(pipes).enumerate() {
        let (server, fs, go) = (server.clone(), fs.clone(), go.clone());
        let bufsize = config.bufsize;
        let t = std::thread::Builder::new()
            .name(format!("kiln-fuse-{i}"))
            .spawn(move || {
                go.wait();
                serve_requests(&dev, &server, &fs, bufsize, pipe)
            })
            .at(Stage::StartThreads)?;
        handles.push(t);
    }
    let control = control.try_clone().at(Stage::StartThreads)?;
    std::thread::Builder::new()
        .name("kiln-fuse-ctl".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            while matches!((&control).read(&mut b), Ok(n) if n > 0) {}
            std::process::exit(0);
        })
        .at(Stage::StartThreads)?;

    // 9. Only the syscalls a filesystem server makes, on every thread at
    //    once. A failure here ends the process with the threads unreleased.
    sys::install_seccomp_all_threads(SECCOMP).at(Stage::Seccomp)?;
    go.wait();
    // the first descriptor stays open while the threads serve: the
    // overlay sends its notifications (attribute invalidations) through it
    Ok(Serving {
        _dev: dev,
        threads: handles,
    })
}

/// A server whose threads are serving.
struct Serving {
    _dev: OwnedFd,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Read the configuration line and the /dev/fuse descriptor sent with it.
fn receive(control: &UnixStream) -> io::Result<(Config, OwnedFd)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    // SAFETY: the kernel just installed `f` in this process
                    // for us; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (msg.bytes, fd)
    };
    let dev =
        fd.ok_or_else(|| io::Error::other("no /dev/fuse descriptor came with the configuration"))?;
    buf.truncate(n);
    let mut rest = control;
    while !buf.ends_with(b"\n") {
        if buf.len() > MAX_CONFIG {
            return Err(io::Error::other("configuration too large"));
        }
        let mut more = [0u8; 64 << 10];
        let n = rest.read(&mut more)?;
        if n == 0 {
            return Err(io::Error::other("the configuration ended early"));
        }
        buf.extend_from_slice(&more[..n]);
    }
    let config = serde_json::from_slice(&buf).map_err(io::Error::other)?;
    Ok((config, dev))
}

fn drop_capabilities() -> std::result::Result<(), caps::errors::CapsError> {
    use caps::CapSet;
    let kept: caps::CapsHashSet = KEPT.into_iter().collect();
    // the bounding set first: dropping from it needs CAP_SETPCAP
    for cap in caps::all() {
        if !kept.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap)? {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    Ok(())
}

/// One server thread: read a request, answer it, until the connection ends
/// (ENODEV once the view is unmounted).
fn serve_requests(
    dev: &OwnedFd,
    server: &Server<Arc<OverlayFs>>,
    fs: &OverlayFs,
    bufsize: usize,
    pipe: Option<(OwnedFd, OwnedFd)>,
) {
    let mut request = vec![0u8; bufsize];
    let mut reply = vec![0u8; bufsize];
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
fn splice_read(dev: &OwnedFd, fs: &OverlayFs, req: &[u8], pr: RawFd, pw: RawFd) -> bool {
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
    if kiln_sys::write_all(pw, &header).is_err() {
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
