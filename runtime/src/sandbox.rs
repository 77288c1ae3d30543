//! The parent side of a sandbox: decide it ([`crate::plan`]), realise the
//! plan into everything the child needs (so the child never allocates),
//! clone it into its namespaces, write its id maps, and wait for the
//! command's status.
//!
//! The parent may be multi-threaded (the build engine runs on tokio): the
//! only thing done between clone and exec in the child is the
//! allocation-free sequence in [`crate::child`].

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;

use crate::child::{
    self, MountKind, Msg, NodeContent, Plan, PrivateNode, SpecMount, Stage, StdioFd,
};
use crate::error::{Error, Result};
use crate::idmap::IdMapping;
use crate::plan::{cstring, HostFacts, MountPlan, MountPlanKind, SandboxPlan};
use crate::sys;

/// Where a standard stream of the command goes.
#[derive(Debug, Default)]
pub enum Stdio {
    /// the caller's own stream
    #[default]
    Inherit,
    /// the host's /dev/null, opened by kiln
    Null,
    /// this descriptor (e.g. one end of a pipe the caller reads)
    Fd(OwnedFd),
}

/// How a sandbox run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// the command exited with this code
    Exited(i32),
    /// the command was killed by this signal
    Signaled(i32),
    /// the timeout expired and the whole PID namespace was killed
    TimedOut,
}

/// Exit code kiln reports when a timeout killed the sandbox (as timeout(1)).
pub const EXIT_TIMED_OUT: i32 = 124;

impl ExitStatus {
    /// A shell-style exit code: the code, or 128+signal, or 124 on timeout.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
            ExitStatus::TimedOut => EXIT_TIMED_OUT,
        }
    }

    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => {
                let name = Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "killed by signal {s} ({name})")
            }
            ExitStatus::TimedOut => f.write_str("timed out"),
        }
    }
}

/// Everything about a run that is not in the spec.
#[derive(Debug, Default)]
pub struct RunOptions {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// kill the whole sandbox after this long
    pub timeout: Option<Duration>,
    /// forward SIGINT, SIGTERM, SIGHUP and SIGQUIT received by this process
    /// to the command (for the CLI; blocks them while the sandbox runs)
    pub forward_signals: bool,
    /// the id maps; decided from the host when not given
    pub id_mapping: Option<IdMapping>,
    /// secrets and agent sockets, each in a tmpfs of the sandbox's own
    pub private: Vec<PrivateFile>,
    /// the user-mode network stack for a spec that asks for one (see
    /// [`crate::net::NETWORK_ANNOTATION`]); detected when not given
    pub network_stack: Option<crate::net::Stack>,
    /// foreign architectures the command may execute, registered in the
    /// sandbox's own binfmt_misc (see [`crate::emulation`])
    pub emulators: Vec<crate::emulation::Emulator>,
    /// a cgroup (v2 directory) the sandbox is moved into before its
    /// command runs; everything it starts stays there
    pub cgroup: Option<std::path::PathBuf>,
}

/// A file or unix socket that exists only inside one sandbox: kiln mounts
/// a tmpfs in the sandbox's mount namespace, creates the node there and
/// bind-mounts it read-only onto `dest`. Nothing is written to disk and no
/// host path is bind-mounted, so the node is gone with the sandbox.
pub struct PrivateFile {
    /// absolute path in the container; it must already exist in the rootfs
    /// as a file (the caller creates the stub and removes it afterwards)
    pub dest: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: PrivateContent,
}

impl std::fmt::Debug for PrivateFile {
    // never prints the bytes: they are usually a secret
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.content {
            PrivateContent::Bytes(b) => format!("{} bytes", b.len()),
            PrivateContent::Socket(_) => "socket".into(),
        };
        f.debug_struct("PrivateFile")
            .field("dest", &self.dest)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("content", &what)
            .finish()
    }
}

/// What a [`PrivateFile`] holds.
pub enum PrivateContent {
    /// a regular file with these bytes; the buffer is wiped when dropped
    Bytes(zeroize::Zeroizing<Vec<u8>>),
    /// a listening AF_UNIX stream socket, created inside the sandbox; its
    /// descriptor is sent over this socket (SCM_RIGHTS, one byte of
    /// payload) to whoever serves it. EOF on the other end without a
    /// descriptor means the sandbox failed before making it.
    Socket(OwnedFd),
}

/// The sandbox's init program, compiled from `init/init.c` by build.rs.
const INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-init"));

/// A sealed, executable memfd holding kiln-init, made once per process.
pub(crate) fn init_memfd() -> Result<RawFd> {
    static INIT: OnceLock<std::result::Result<OwnedFd, Errno>> = OnceLock::new();
    let fd = INIT.get_or_init(|| {
        let fd = nix::sys::memfd::memfd_create(
            c"kiln-init",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
                | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )?;
        let mut f = std::fs::File::from(fd);
        std::io::Write::write_all(&mut f, INIT_BINARY)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: F_ADD_SEALS takes the memfd, open for the call because `f`
        // owns it, and an integer, no pointer.
        Errno::result(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
        Ok(OwnedFd::from(f))
    });
    match fd {
        Ok(fd) => Ok(fd.as_raw_fd()),
        Err(e) => Err(Error::Init(std::io::Error::from_raw_os_error(*e as i32))),
    }
}

/// A [`PrivateFile`] resolved for the child.
fn private_node(f: PrivateFile, sinks: &mut Vec<OwnedFd>) -> Result<PrivateNode> {
    let dest = f.dest.trim_start_matches('/');
    if !f.dest.starts_with('/') || dest.is_empty() {
        return Err(Error::InvalidSpec(format!(
            "private file destination {:?} must be an absolute path below /",
            f.dest
        )));
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    let content = match f.content {
        PrivateContent::Bytes(bytes) => {
            // executable only when the mode asks for it, as BuildKit does
            if f.mode & 0o111 == 0 {
                flags |= libc::MS_NOEXEC;
            }
            NodeContent::File(bytes)
        }
        PrivateContent::Socket(sink) => {
            flags |= libc::MS_NOEXEC;
            let raw = sink.as_raw_fd();
            sinks.push(sink);
            NodeContent::Socket { sink: raw }
        }
    };
    // Room for the content and nothing much else: the tmpfs holds exactly
    // one node.
    let size = match &content {
        NodeContent::File(b) => b.len().div_ceil(4096) * 4096 + 4096,
        NodeContent::Socket { .. } => 4096,
    };
    Ok(PrivateNode {
        dest: cstring("private file destination", dest)?,
        data: cstring(
            "tmpfs options",
            format!("size={size},nr_inodes=4,mode=0700"),
        )?,
        flags,
        mode: f.mode & 0o7777,
        uid: f.uid,
        gid: f.gid,
        content,
    })
}

/// Holds the fds and C strings a plan points into, so they outlive the
/// child's use of them.
struct Prepared {
    plan: Plan,
    _args: Vec<CString>,
    /// the environment may hold secrets (`RUN --mount=type=secret,env=`):
    /// wiped when the plan is dropped
    _env: zeroize::Zeroizing<Vec<CString>>,
    stdio: [Option<OwnedFd>; 3],
    /// our copies of the private sockets' sinks, closed after the clone
    sinks: Vec<OwnedFd>,
    /// detached bind mount trees, attached by the child
    _trees: Vec<OwnedFd>,
    clone_flags: u64,
    /// PID 1's stack when it shares our memory (see [`sys::clone_vm`])
    stack: Option<sys::ChildStack>,
    mapping: IdMapping,
    /// the network stack to start on the new network namespace, and
    /// whether it may map the gateway to the host's loopback
    network: Option<(crate::net::Stack, bool)>,
}

/// Decide the sandbox ([`SandboxPlan`]), then realise it: everything that
/// opens, reads or allocates for the child.
fn prepare(spec: &Spec, opts: &mut RunOptions) -> Result<Prepared> {
    let rootfs = checked_rootfs(spec)?;
    let mapping = opts
        .id_mapping
        .take()
        .unwrap_or_else(|| IdMapping::current().clone());
    let plan = SandboxPlan::new(spec, rootfs, mapping, &host_facts())?;
    realise(plan, opts)
}

/// The facts of the running host a plan depends on.
fn host_facts() -> HostFacts {
    HostFacts {
        euid: nix::unistd::geteuid().as_raw(),
        egid: nix::unistd::getegid().as_raw(),
        clone_vm_safe: sys::clone_vm_safe(),
        last_cap: std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40),
    }
}

/// The spec's root, made absolute: an existing directory.
fn checked_rootfs(spec: &Spec) -> Result<PathBuf> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("the spec has no root".into()))?;
    let rootfs =
        std::path::absolute(root.path()).map_err(|_| Error::RootfsMissing(root.path().clone()))?;
    match std::fs::metadata(&rootfs) {
        Err(_) => Err(Error::RootfsMissing(rootfs)),
        Ok(m) if !m.is_dir() => Err(Error::RootfsNotDirectory(rootfs)),
        Ok(_) => Ok(rootfs),
    }
}

/// The side-effecting half of [`prepare`]: the network stack found, bind
/// sources opened, private nodes and emulators resolved, standard streams
/// opened, stacks mapped, seccomp compiled, and the child's [`Plan`]
/// filled in.
fn realise(plan: SandboxPlan, opts: &mut RunOptions) -> Result<Prepared> {
    let network = match plan.user_mode_network {
        None => None,
        Some(allow_host_loopback) => {
            let stack = match opts.network_stack.take() {
                Some(s) => s,
                None => crate::net::Stack::detect()?,
            };
            Some((stack, allow_host_loopback))
        }
    };
    let mut trees = Vec::new();
    let mounts = plan
        .mounts
        .iter()
        .map(|m| open_mount(m, &mut trees))
        .collect::<Result<Vec<_>>>()?;
    let mut sinks = Vec::new();
    let private = std::mem::take(&mut opts.private)
        .into_iter()
        .map(|f| private_node(f, &mut sinks))
        .collect::<Result<Vec<_>>>()?;
    let binfmt = if opts.emulators.is_empty() {
        Vec::new()
    } else {
        crate::emulation::Host::current().register_lines(&opts.emulators)?
    };
    let (stdio, stdio_owned) = open_stdio(opts)?;
    let stack_if = |want: bool, len: usize| {
        want.then(|| sys::ChildStack::new(len))
            .transpose()
            .map_err(|e| Error::Clone(e.into()))
    };
    let procs = plan.processes;
    let stack = stack_if(procs.pid1_shares_memory, CHILD_STACK)?;
    let command_stack = stack_if(procs.command_shares_memory, CHILD_STACK)?;
    let net_helper_stack = stack_if(procs.helper_makes_net, NET_HELPER_STACK)?;
    let blocked = match &network {
        Some((stack, false)) => crate::net::blocked(stack)?,
        _ => sys::Blocked::default(),
    };
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let child = Plan {
        rootfs: plan.rootfs,
        rootfs_readonly: plan.rootfs_readonly,
        hostname: plan.hostname,
        new_net: plan.new_net,
        blocked,
        can_setgroups: plan.can_setgroups,
        mounts,
        private,
        binfmt,
        masked: plan.masked,
        readonly: plan.readonly,
        rlimits: plan.rlimits,
        shm: plan.shm,
        last_cap: plan.last_cap,
        bounding: plan.caps.bounding,
        effective: plan.caps.effective,
        permitted: plan.caps.permitted,
        inheritable: plan.caps.inheritable,
        seccomp: plan.seccomp.programs()?,
        uid: plan.uid,
        gid: plan.gid,
        groups: plan.groups,
        umask: plan.umask,
        landlock_scope: landlock_scope_available(),
        cwd: plan.cwd,
        argv0: plan.args[0].clone(),
        argv: ptrs(&plan.args),
        envp: ptrs(&plan.env),
        path_dirs: plan.path_dirs,
        stdio,
        init_fd: init_memfd()?,
        command_stack,
        net_helper_stack,
        parent_pidfd: -1,
        sync_read: -1,
        sync_write: -1,
        err_write: -1,
        status_write: -1,
    };
    Ok(Prepared {
        plan: child,
        _args: plan.args,
        _env: plan.env,
        stdio: stdio_owned,
        sinks,
        _trees: trees,
        clone_flags: procs.clone_flags,
        stack,
        mapping: plan.mapping,
        network,
    })
}

/// A planned spec mount made ready for the child: a bind source is opened
/// here, once, in kiln's own mount namespace, as a detached tree the child
/// attaches, so nothing can swap a path component for a symlink between
/// here and the mount.
fn open_mount(m: &MountPlan, trees: &mut Vec<OwnedFd>) -> Result<SpecMount> {
    let kind = match &m.kind {
        MountPlanKind::Bind {
            source,
            recursive,
            attrs,
        } => {
            let path = cstring("mount source", source)?;
            let tree = sys::open_tree_clone(&path, *recursive, *attrs).map_err(|e| {
                Error::MountSource {
                    source: e,
                    path: source.clone(),
                }
            })?;
            let raw = tree.as_raw_fd();
            trees.push(tree);
            MountKind::Bind { tree: raw }
        }
        MountPlanKind::Tmpfs { data } => MountKind::Tmpfs { data: data.clone() },
    };
    Ok(SpecMount {
        dest: m.dest.clone(),
        kind,
        flags: m.flags,
    })
}

/// The command's standard streams: what the child dups onto 0, 1 and 2,
/// and the descriptors that keep them open until the clone.
fn open_stdio(opts: &mut RunOptions) -> Result<([StdioFd; 3], [Option<OwnedFd>; 3])> {
    let mut owned: [Option<OwnedFd>; 3] = [None, None, None];
    let mut stdio = [StdioFd::Inherit; 3];
    for (i, s) in [&mut opts.stdin, &mut opts.stdout, &mut opts.stderr]
        .into_iter()
        .enumerate()
    {
        let fd = match std::mem::take(s) {
            Stdio::Inherit => continue,
            Stdio::Null => OwnedFd::from(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(Error::Channel)?,
            ),
            Stdio::Fd(fd) => fd,
        };
        stdio[i] = StdioFd::Fd(fd.as_raw_fd());
        owned[i] = Some(fd);
    }
    Ok((stdio, owned))
}

/// Whether this kernel scopes abstract unix sockets and signals (Landlock
/// ABI 6, Linux 6.12); asked once.
fn landlock_scope_available() -> bool {
    static ABI: OnceLock<i64> = OnceLock::new();
    *ABI.get_or_init(sys::landlock_abi) >= 6
}

/// A pidfd of this process, for the child to notice our death.
fn pidfd_self() -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointer; it returns a new
    // descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return Err(Error::Channel(std::io::Error::last_os_error()));
    }
    let fd = RawFd::try_from(fd)
        .map_err(|_| Error::Channel(std::io::Error::from_raw_os_error(libc::EBADF)))?;
    // SAFETY: a new descriptor nothing else owns; pidfds are close-on-exec.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Channel(e.into()))
}

/// Why clone failed, in the user's terms.
fn clone_error(e: Errno) -> Error {
    crate::error::namespace_call_failed("clone", e)
}

/// Stack of a sandbox child that shares kiln's memory (touched only as far
/// as it is used).
const CHILD_STACK: usize = 1 << 20;

/// Stack of the helper that makes a step's network namespace: a few calls.
const NET_HELPER_STACK: usize = 64 << 10;

/// Entry of a [`sys::clone_vm`] child.
extern "C" fn sandbox_child(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` is the plan `run` keeps alive until this child has
    // exec'd or exited.
    unsafe { child::run(&*plan.cast::<child::Plan>()) }
}

/// Run the process described by `spec` in a new sandbox and wait for it.
pub fn run(spec: &Spec, mut opts: RunOptions) -> Result<ExitStatus> {
    let mut prepared = prepare(spec, &mut opts)?;
    prepared.mapping.warn_once();

    // Channels: parent -> child "maps written"; child -> parent failure
    // reports (closed on exec); init -> parent the command's wait status.
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    prepared.plan.sync_read = sync_r.as_raw_fd();
    prepared.plan.sync_write = sync_w.as_raw_fd();
    prepared.plan.err_write = err_w.as_raw_fd();
    prepared.plan.status_write = status_w.as_raw_fd();
    let parent_pidfd = pidfd_self()?;
    prepared.plan.parent_pidfd = parent_pidfd.as_raw_fd();

    // Signals to forward are blocked before the clone so none is lost.
    let forwarding = if opts.forward_signals {
        Some(Forwarding::start()?)
    } else {
        None
    };
    // Every way out from here restores the signal mask.
    let finish = |r: Result<ExitStatus>| {
        if let Some(f) = &forwarding {
            f.restore();
        }
        r
    };

    let (pid, pidfd) = match clone_child(&prepared) {
        Ok(c) => c,
        Err(e) => return finish(Err(clone_error(e))),
    };
    // Declared after the plan and the stacks, so dropped before them.
    let mut reap = ReapGuard {
        pidfd: &pidfd,
        armed: true,
    };
    drop((sync_r, err_w, status_w));
    drop(std::mem::take(&mut prepared.stdio));
    drop(std::mem::take(&mut prepared.sinks));

    // Write the id maps, start the network stack on the child's network
    // namespace and wait until it is configured, then release the child:
    // the user's command never runs before its network is up.
    // (the reap guard kills and reaps the child on the way out)
    if let Some(cg) = &opts.cgroup {
        let procs = cg.join("cgroup.procs");
        if let Err(source) = std::fs::write(&procs, pid.to_string()) {
            return finish(Err(Error::Cgroup {
                path: procs,
                source,
            }));
        }
    }
    if let Err(e) = prepared.mapping.apply(pid) {
        return finish(Err(e));
    }
    // Killed and reaped when dropped, after the sandbox has exited.
    let _network = match &prepared.network {
        None => None,
        Some((stack, allow_host_loopback)) => {
            match crate::net::Helper::start(stack, pid, *allow_host_loopback) {
                Ok(h) => Some(h),
                Err(e) => return finish(Err(e)),
            }
        }
    };
    let _ = nix::unistd::write(&sync_w, b"g");
    drop(sync_w);

    let command = spec
        .process()
        .as_ref()
        .and_then(|p| p.args().as_ref())
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_default();
    let channels = Channels {
        pidfd: &pidfd,
        err_r: &err_r,
        status_r: &status_r,
        sigfd: forwarding.as_ref().map(|f| &f.sigfd),
    };
    let result = supervise(pid, &channels, opts.timeout, &command);
    // supervise returns Ok only once it has reaped the child
    reap.armed = result.is_err();
    finish(result)
}

/// SIGINT, SIGTERM, SIGHUP and SIGQUIT blocked and read from a signalfd,
/// to be forwarded to the command. The child unblocks nothing it does not
/// need: exec resets handlers, and kiln-init sets its own mask.
struct Forwarding {
    sigfd: SignalFd,
    old_mask: SigSet,
}

impl Forwarding {
    fn start() -> Result<Forwarding> {
        let forward = SigSet::from_iter([
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ]);
        let mut old_mask = SigSet::empty();
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&forward),
            Some(&mut old_mask),
        )
        .map_err(|e| Error::Channel(e.into()))?;
        let sigfd = SignalFd::with_flags(&forward, SfdFlags::SFD_CLOEXEC)
            .map_err(|e| Error::Channel(e.into()))?;
        Ok(Forwarding { sigfd, old_mask })
    }

    /// The signal mask back as it was before [`Forwarding::start`].
    fn restore(&self) {
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&self.old_mask),
            None,
        );
    }
}

/// Clone the sandbox's PID 1 into its namespaces: sharing our memory when
/// the plan has a stack for it, else in a copy. Returns its pid and pidfd.
fn clone_child(prepared: &Prepared) -> std::result::Result<(i32, OwnedFd), Errno> {
    match (&prepared.stack, libc::c_int::try_from(prepared.clone_flags)) {
        (Some(stack), Ok(flags)) => {
            let mut pidfd: RawFd = -1;
            // SAFETY: the child runs only `child::run`, which is
            // allocation-free and async-signal-safe, writes nothing but its
            // stack, keeps our ids, and leaves by exec or _exit; the plan and
            // the stacks live in `prepared`, which `run` keeps until the
            // child is reaped (supervise, or the reap guard).
            let cloned = unsafe {
                sys::clone_vm(
                    flags,
                    stack,
                    sandbox_child,
                    std::ptr::from_ref(&prepared.plan).cast_mut().cast(),
                    Some(&mut pidfd),
                )
            };
            // SAFETY: on success the kernel stored a new pidfd in `pidfd`
            // that nothing else owns.
            cloned.map(|pid| (pid, unsafe { std::os::fd::FromRawFd::from_raw_fd(pidfd) }))
        }
        // SAFETY: the child runs only `child::run` (the contract above),
        // in a copy of our memory, so it cannot disturb ours.
        _ => unsafe { sys::clone3_fork(prepared.clone_flags) }.map(|c| match c {
            // SAFETY: we are the child of clone3_fork, as child::run
            // requires.
            None => unsafe { child::run(&prepared.plan) },
            Some(c) => c,
        }),
    }
}

/// Kills and reaps the sandbox's PID 1 on every way out of [`run`] that
/// did not reap it (an error while waiting, a panic): a child that shares
/// kiln's memory reads the plan and runs on a stack that are freed right
/// after. By pidfd, so a recycled pid is never hit.
struct ReapGuard<'a> {
    pidfd: &'a OwnedFd,
    armed: bool,
}

impl Drop for ReapGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Both fail harmlessly once the child is reaped.
        send_signal(self.pidfd, libc::SIGKILL);
        // SAFETY: `info` is a writable siginfo_t on our stack for the call,
        // and the pidfd is open: the guard borrows its owner.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            while libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd().cast_unsigned(),
                &mut info,
                libc::WEXITED,
            ) < 0
                && Errno::last() == Errno::EINTR
            {}
        }
    }
}

fn send_signal(pidfd: &OwnedFd, sig: i32) {
    // SAFETY: the siginfo pointer is null, so the kernel reads no memory of
    // ours; `pidfd` is borrowed, so open.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// The parent's ends of the channels to a running sandbox.
struct Channels<'a> {
    pidfd: &'a OwnedFd,
    /// failure reports ([`Msg`]); EOF once the command has exec'd
    err_r: &'a OwnedFd,
    /// the command's wait status, from kiln-init
    status_r: &'a OwnedFd,
    /// signals to forward to the command
    sigfd: Option<&'a SignalFd>,
}

/// Wait for the sandbox: failure reports, forwarded signals, the timeout,
/// and finally the command's status from kiln-init.
fn supervise(
    pid: i32,
    ch: &Channels,
    timeout: Option<Duration>,
    command: &str,
) -> Result<ExitStatus> {
    let (report, timed_out) = watch(ch, timeout)?;
    let init_status = waitpid(Pid::from_raw(pid), None).map_err(Error::Wait)?;

    if let Some(msg) = report
        .get(..Msg::SIZE)
        .and_then(|b| Msg::decode(b.try_into().ok()?))
    {
        return Err(setup_error(msg, command));
    }
    if timed_out {
        return Ok(ExitStatus::TimedOut);
    }
    let mut raw = [0u8; 4];
    if matches!(nix::unistd::read(ch.status_r.as_raw_fd(), &mut raw), Ok(4)) {
        let status = i32::from_ne_bytes(raw);
        if libc::WIFEXITED(status) {
            return Ok(ExitStatus::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(ExitStatus::Signaled(libc::WTERMSIG(status)));
        }
    }
    // kiln-init ended without reporting: it was killed from outside.
    Ok(match init_status {
        WaitStatus::Exited(_, c) => ExitStatus::Exited(c),
        WaitStatus::Signaled(_, s, _) => ExitStatus::Signaled(s as i32),
        _ => ExitStatus::Exited(crate::error::EXIT_SANDBOX_FAILURE),
    })
}

/// The error a child's failure report stands for.
fn setup_error(msg: Msg, command: &str) -> Error {
    match msg.stage {
        Stage::Exec if msg.errno == Errno::ENOENT => Error::ExecNotFound(command.to_string()),
        Stage::Exec => Error::ExecFailed {
            path: command.to_string(),
            errno: msg.errno,
        },
        stage => Error::Setup {
            stage,
            errno: msg.errno,
            hint: stage.hint(msg.errno),
        },
    }
}

/// Poll until PID 1 has exited and the error channel is closed: collect
/// the failure report, forward signals, and kill the sandbox when the
/// timeout expires. Returns the report's bytes and whether it timed out.
fn watch(ch: &Channels, timeout: Option<Duration>) -> Result<(Vec<u8>, bool)> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut err_open = true;
    let mut report = Vec::new();
    let mut exited = false;
    let mut timed_out = false;
    while !exited || err_open {
        let wait = match deadline {
            Some(d) if !timed_out => {
                let left = d.saturating_duration_since(Instant::now());
                PollTimeout::try_from(i32::try_from(left.as_millis()).unwrap_or(i32::MAX))
                    .unwrap_or(PollTimeout::MAX)
            }
            _ => PollTimeout::NONE,
        };
        let mut fds = vec![PollFd::new(ch.pidfd.as_fd(), PollFlags::POLLIN)];
        if err_open {
            fds.push(PollFd::new(ch.err_r.as_fd(), PollFlags::POLLIN));
        }
        if let Some(s) = ch.sigfd {
            fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        }
        let n = match nix::poll::poll(&mut fds, wait) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::Wait(e)),
            Ok(n) => n,
        };
        if n == 0 {
            // Killing PID 1 of the namespace kills every process in it.
            send_signal(ch.pidfd, libc::SIGKILL);
            timed_out = true;
            continue;
        }
        let mut ready = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()));
        if ready.next() == Some(true) {
            exited = true;
        }
        if err_open && ready.next() == Some(true) {
            let mut buf = [0u8; 64];
            match nix::unistd::read(ch.err_r.as_raw_fd(), &mut buf) {
                Ok(0) => err_open = false,
                Ok(k) => report.extend_from_slice(&buf[..k]),
                Err(Errno::EINTR) => {}
                Err(_) => err_open = false,
            }
        }
        if let (Some(s), Some(true)) = (ch.sigfd, ready.next()) {
            if let Ok(Some(info)) = s.read_signal() {
                send_signal(
                    ch.pidfd,
                    i32::try_from(info.ssi_signo).unwrap_or(libc::SIGTERM),
                );
            }
        }
    }
    Ok((report, timed_out))
}

/// The path of the rootfs a spec names, made absolute.
pub fn spec_rootfs(spec: &Spec) -> Option<PathBuf> {
    spec.root()
        .as_ref()
        .and_then(|r| std::path::absolute(r.path()).ok())
}
