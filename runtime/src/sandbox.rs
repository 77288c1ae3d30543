//! The parent side of a sandbox: check the spec, prepare everything the
//! child needs (so the child never allocates), clone it into its
//! namespaces, write its id maps, and wait for the command's status.
//!
//! The parent may be multi-threaded (the build engine runs on tokio): the
//! only thing done between clone and exec in the child is the
//! allocation-free sequence in [`crate::child`].

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Mount, PosixRlimitType, Spec};

use crate::child::{
    self, MountKind, Msg, NodeContent, Plan, PrivateNode, SpecMount, Stage, StdioFd,
};
use crate::error::{Error, Result};
use crate::idmap::IdMapping;
use crate::seccomp::Profile;
use crate::spec::{DEFAULT_PATH, SECCOMP_ANNOTATION};
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
        // SAFETY: plain fcntl on the memfd we own.
        Errno::result(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
        Ok(OwnedFd::from(f))
    });
    match fd {
        Ok(fd) => Ok(fd.as_raw_fd()),
        Err(e) => Err(Error::Init(std::io::Error::from_raw_os_error(*e as i32))),
    }
}

fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(s).map_err(|_| Error::NulByte { what: what.into() })
}

fn capability_mask(
    set: Option<&std::collections::HashSet<oci_spec::runtime::Capability>>,
) -> Result<u64> {
    let mut mask = 0u64;
    for cap in set.into_iter().flatten() {
        let name = format!("CAP_{cap}");
        let c: caps::Capability = name
            .parse()
            .map_err(|_| Error::InvalidSpec(format!("unknown capability {name}")))?;
        mask |= c.bitmask();
    }
    Ok(mask)
}

fn rlimit_resource(kind: PosixRlimitType) -> libc::__rlimit_resource_t {
    match kind {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
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

fn spec_mount(m: &Mount, trees: &mut Vec<OwnedFd>) -> Result<SpecMount> {
    let dest = m.destination().to_string_lossy().into_owned();
    if !dest.starts_with('/') || dest == "/" {
        return Err(Error::InvalidSpec(format!(
            "mount destination {dest:?} must be an absolute path below /"
        )));
    }
    let mut flags: libc::c_ulong = 0;
    let mut recursive = true;
    let mut data = Vec::new();
    let typ = m.typ().as_deref().unwrap_or("bind");
    for opt in m.options().iter().flatten() {
        match opt.as_str() {
            "ro" | "readonly" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "bind" => recursive = false,
            "rbind" => recursive = true,
            o if typ == "tmpfs" && (o.starts_with("size=") || o.starts_with("mode=") || o.starts_with("nr_inodes=")) => {
                data.push(o.to_string())
            }
            o => {
                return Err(Error::Unsupported(format!("mount option {o:?} on {dest} (supported: ro, rw, nosuid, nodev, noexec, bind, rbind, and size/mode for tmpfs)")))
            }
        }
    }
    let kind = match typ {
        "bind" | "none" => {
            let src = m.source().as_ref().ok_or_else(|| Error::InvalidSpec(format!("bind mount on {dest} has no source")))?;
            if !src.is_absolute() {
                return Err(Error::InvalidSpec(format!("bind mount source {} must be absolute", src.display())));
            }
            // Resolved here, once, in kiln's own mount namespace: the
            // child attaches exactly this tree, so nothing can swap a
            // path component for a symlink between here and the mount.
            let mut attrs = 0;
            for (ms, attr) in [
                (libc::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
                (libc::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
                (libc::MS_NODEV, libc::MOUNT_ATTR_NODEV),
                (libc::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
            ] {
                if flags & ms != 0 {
                    attrs |= attr;
                }
            }
            let tree = sys::open_tree_clone(&cstring("mount source", src.as_os_str().as_encoded_bytes())?, recursive, attrs)
                .map_err(|source| Error::MountSource { source, path: src.clone() })?;
            let raw = tree.as_raw_fd();
            trees.push(tree);
            MountKind::Bind { tree: raw }
        }
        "tmpfs" => MountKind::Tmpfs { data: cstring("tmpfs options", data.join(","))? },
        other => {
            return Err(Error::Unsupported(format!(
                "mount type {other:?} at {dest}: spec mounts may be bind or tmpfs; kiln mounts /proc, /dev and /sys itself"
            )))
        }
    };
    Ok(SpecMount {
        dest: cstring("mount destination", dest.trim_start_matches('/'))?,
        kind,
        flags,
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

fn prepare(spec: &Spec, opts: &mut RunOptions) -> Result<Prepared> {
    // 1. The root filesystem.
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("the spec has no root".into()))?;
    let rootfs =
        std::path::absolute(root.path()).map_err(|_| Error::RootfsMissing(root.path().clone()))?;
    match std::fs::metadata(&rootfs) {
        Err(_) => return Err(Error::RootfsMissing(rootfs)),
        Ok(m) if !m.is_dir() => return Err(Error::RootfsNotDirectory(rootfs)),
        Ok(_) => {}
    }

    // 2. What the spec asks for that kiln does not do is an error, never
    //    silently ignored.
    let process = spec.process().as_ref().ok_or(Error::NoProcess)?;
    if process.terminal() == Some(true) {
        return Err(Error::Unsupported(
            "process.terminal (a pseudo-terminal for the command)".into(),
        ));
    }
    if process.no_new_privileges() == Some(false) {
        return Err(Error::Unsupported(
            "no_new_privileges=false: kiln always sets no_new_privs".into(),
        ));
    }
    if process.apparmor_profile().is_some() || process.selinux_label().is_some() {
        return Err(Error::Unsupported(
            "an AppArmor profile or SELinux label".into(),
        ));
    }
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec("the spec has no linux section".into()))?;
    if linux.seccomp().is_some() {
        return Err(Error::Unsupported(format!(
            "linux.seccomp in OCI format; name a seccompiler profile with the {SECCOMP_ANNOTATION} annotation"
        )));
    }
    if linux.uid_mappings().is_some() || linux.gid_mappings().is_some() {
        return Err(Error::Unsupported(
            "linux.uidMappings/gidMappings: kiln decides the id maps itself".into(),
        ));
    }
    let mut new_net = false;
    let mut seen = Vec::new();
    for ns in linux.namespaces().iter().flatten() {
        if ns.path().is_some() {
            return Err(Error::Unsupported(
                "joining an existing namespace by path".into(),
            ));
        }
        if ns.typ() == LinuxNamespaceType::Network {
            new_net = true;
        }
        seen.push(ns.typ());
    }
    let annotations = spec.annotations().as_ref();
    let network = match annotations
        .and_then(|a| a.get(crate::net::NETWORK_ANNOTATION))
        .map(String::as_str)
    {
        None => None,
        Some(v @ ("sandbox" | "sandbox+host-loopback")) => {
            if !new_net {
                return Err(Error::InvalidSpec(format!(
                    "{}={v} needs a new network namespace",
                    crate::net::NETWORK_ANNOTATION
                )));
            }
            let stack = match opts.network_stack.take() {
                Some(s) => s,
                None => crate::net::Stack::detect()?,
            };
            Some((stack, v == "sandbox+host-loopback"))
        }
        Some(other) => {
            return Err(Error::Unsupported(format!(
            "network mode {other:?} in the {} annotation (known: sandbox, sandbox+host-loopback)",
            crate::net::NETWORK_ANNOTATION
        )))
        }
    };
    for required in [
        LinuxNamespaceType::User,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Cgroup,
    ] {
        if !seen.contains(&required) {
            return Err(Error::Unsupported(format!(
                "running without a new {required:?} namespace"
            )));
        }
    }

    // 3. Ids: decide the maps, then check the process's ids fit in them.
    let mapping = opts
        .id_mapping
        .take()
        .unwrap_or_else(|| IdMapping::current().clone());
    let user = process.user();
    let groups: Vec<u32> = user.additional_gids().clone().unwrap_or_default();
    for uid in [user.uid()] {
        if !mapping.maps_uid(uid) {
            return Err(Error::IdNotMapped {
                id: uid,
                reason: mapping
                    .limited
                    .unwrap_or("it lies outside the mapped range"),
            });
        }
    }
    for gid in std::iter::once(user.gid()).chain(groups.iter().copied()) {
        if !mapping.maps_gid(gid) {
            return Err(Error::IdNotMapped {
                id: gid,
                reason: mapping
                    .limited
                    .unwrap_or("it lies outside the mapped range"),
            });
        }
    }
    let can_setgroups = !matches!(
        mapping.method,
        crate::idmap::Method::Direct {
            deny_setgroups: true
        }
    );
    if !can_setgroups && !groups.is_empty() {
        return Err(Error::IdNotMapped {
            id: groups[0],
            reason: mapping.limited.unwrap_or("setgroups is denied"),
        });
    }

    // 4. Command, environment and PATH search list.
    let args = process.args().as_ref().ok_or(Error::NoArgs)?;
    if args.is_empty() {
        return Err(Error::NoArgs);
    }
    let args: Vec<CString> = args
        .iter()
        .map(|a| cstring("an argument", a.as_bytes()))
        .collect::<Result<_>>()?;
    let env_strings = zeroize::Zeroizing::new(process.env().clone().unwrap_or_default());
    let path_var = env_strings
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let path_dirs = path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| cstring("PATH", d))
        .collect::<Result<Vec<_>>>()?;
    let env: zeroize::Zeroizing<Vec<CString>> = zeroize::Zeroizing::new(
        env_strings
            .iter()
            .map(|e| cstring("an environment entry", e.as_bytes()))
            .collect::<Result<_>>()?,
    );
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };

    // 5. Capabilities, limits, seccomp.
    let caps = process.capabilities().as_ref();
    if caps
        .and_then(|c| c.ambient().as_ref())
        .is_some_and(|a| !a.is_empty())
    {
        return Err(Error::Unsupported("ambient capabilities".into()));
    }
    let rlimits = process
        .rlimits()
        .iter()
        .flatten()
        .map(|r| {
            (
                rlimit_resource(r.typ()),
                libc::rlimit {
                    rlim_cur: r.soft(),
                    rlim_max: r.hard(),
                },
            )
        })
        .collect();
    let profile = Profile::parse(
        spec.annotations()
            .as_ref()
            .and_then(|a| a.get(SECCOMP_ANNOTATION))
            .map_or("default", String::as_str),
    );
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);

    // 6. Mounts, masked and read-only paths.
    let mut trees = Vec::new();
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| spec_mount(m, &mut trees))
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
    let abs = |v: &Option<Vec<String>>| -> Result<Vec<CString>> {
        v.iter()
            .flatten()
            .map(|p| cstring("a masked path", p.as_bytes()))
            .collect()
    };

    // 7. Standard streams.
    let mut stdio_owned: [Option<OwnedFd>; 3] = [None, None, None];
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
        stdio_owned[i] = Some(fd);
    }

    let mut clone_flags = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u64;
    // How the children are made (see sys::clone_vm). PID 1 shares our
    // memory until it execs kiln-init when it keeps our effective ids (uid
    // and gid 0 of its namespace are ours); otherwise, as when kiln runs as
    // real root and maps the sandbox's root to a subordinate id, it gets a
    // copy, as fork gives. The command shares it too when it runs as that
    // root; a USER of another id is forked. A network namespace of the
    // step's own takes longer to make than anything else in the sandbox
    // (loopback, sysctl tables, sysfs entries): unless a network stack must
    // start on it right after the clone, a helper makes it while PID 1 sets
    // up the mounts, and PID 1 joins it before it mounts /sys.
    let vm_ok = sys::clone_vm_safe();
    let ours = |ranges: &[crate::idmap::Range], id: u32| {
        ranges.iter().any(|r| r.inside == 0 && r.outside == id)
    };
    let share_memory = vm_ok
        && ours(&mapping.uids, nix::unistd::geteuid().as_raw())
        && ours(&mapping.gids, nix::unistd::getegid().as_raw());
    let helper_makes_net = vm_ok && new_net && network.is_none();
    if new_net && !helper_makes_net {
        clone_flags |= libc::CLONE_NEWNET as u64;
    }
    let stack_if = |want: bool, len: usize| {
        want.then(|| sys::ChildStack::new(len))
            .transpose()
            .map_err(|e| Error::Clone(e.into()))
    };
    let stack = stack_if(share_memory, CHILD_STACK)?;
    let command_stack = stack_if(
        share_memory && user.uid() == 0 && user.gid() == 0,
        CHILD_STACK,
    )?;
    let net_helper_stack = stack_if(helper_makes_net, NET_HELPER_STACK)?;

    let blocked = match &network {
        Some((stack, false)) => crate::net::blocked(stack)?,
        _ => sys::Blocked::default(),
    };
    let plan = Plan {
        rootfs: cstring("the rootfs path", rootfs.as_os_str().as_encoded_bytes())?,
        rootfs_readonly: root.readonly() == Some(true),
        hostname: spec
            .hostname()
            .as_ref()
            .map(|h| cstring("the hostname", h.as_bytes()))
            .transpose()?,
        new_net,
        blocked,
        can_setgroups,
        mounts,
        private,
        binfmt,
        masked: abs(linux.masked_paths())?,
        readonly: abs(linux.readonly_paths())?,
        rlimits,
        last_cap,
        bounding: capability_mask(caps.and_then(|c| c.bounding().as_ref()))?,
        effective: capability_mask(caps.and_then(|c| c.effective().as_ref()))?,
        permitted: capability_mask(caps.and_then(|c| c.permitted().as_ref()))?,
        inheritable: capability_mask(caps.and_then(|c| c.inheritable().as_ref()))?,
        seccomp: profile.programs()?,
        uid: user.uid(),
        gid: user.gid(),
        groups,
        umask: user.umask(),
        landlock_scope: landlock_scope_available(),
        cwd: cstring(
            "the working directory",
            process.cwd().as_os_str().as_encoded_bytes(),
        )?,
        argv0: args[0].clone(),
        argv: ptrs(&args),
        envp: ptrs(&env),
        path_dirs,
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
        plan,
        _args: args,
        _env: env,
        stdio: stdio_owned,
        sinks,
        _trees: trees,
        clone_flags,
        stack,
        mapping,
        network,
    })
}

/// Whether this kernel scopes abstract unix sockets and signals (Landlock
/// ABI 6, Linux 6.12); asked once.
fn landlock_scope_available() -> bool {
    static ABI: OnceLock<i64> = OnceLock::new();
    *ABI.get_or_init(sys::landlock_abi) >= 6
}

/// A pidfd of this process, for the child to notice our death.
fn pidfd_self() -> Result<OwnedFd> {
    // SAFETY: pidfd_open of our own pid; returns a new fd or -1.
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
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    if matches!(e, Errno::EPERM | Errno::ENOSPC | Errno::EUSERS) {
        if read("/proc/sys/user/max_user_namespaces") == "0" {
            return Error::UserNamespacesDisabled("user.max_user_namespaces is 0");
        }
        if read("/proc/sys/kernel/unprivileged_userns_clone") == "0" {
            return Error::UserNamespacesDisabled("kernel.unprivileged_userns_clone is 0");
        }
        if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1" {
            return Error::UserNamespacesDisabled(
                "AppArmor's kernel.apparmor_restrict_unprivileged_userns is 1",
            );
        }
    }
    Error::Clone(e.into())
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

    // Signals to forward are blocked before the clone so none is lost; the
    // child unblocks nothing it does not need: exec resets handlers, and
    // kiln-init sets its own mask.
    let forward = SigSet::from_iter([
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ]);
    let mut old_mask = SigSet::empty();
    let sigfd = if opts.forward_signals {
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&forward),
            Some(&mut old_mask),
        )
        .map_err(|e| Error::Channel(e.into()))?;
        Some(
            SignalFd::with_flags(&forward, SfdFlags::SFD_CLOEXEC)
                .map_err(|e| Error::Channel(e.into()))?,
        )
    } else {
        None
    };
    let restore_mask = || {
        if opts.forward_signals {
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&old_mask),
                None,
            );
        }
    };

    let cloned = match (&prepared.stack, libc::c_int::try_from(prepared.clone_flags)) {
        (Some(stack), Ok(flags)) => {
            let mut pidfd: RawFd = -1;
            // SAFETY: the child runs only `child::run`, which is
            // allocation-free and async-signal-safe, writes nothing but its
            // stack, keeps our ids, and leaves by exec or _exit; the plan and
            // the stacks live until the child is reaped (supervise, abort
            // below, or the reap guard).
            let cloned = unsafe {
                sys::clone_vm(
                    flags,
                    stack,
                    sandbox_child,
                    std::ptr::from_ref(&prepared.plan).cast_mut().cast(),
                    Some(&mut pidfd),
                )
            };
            // SAFETY: the kernel stored a new pidfd that nothing else owns.
            cloned.map(|pid| (pid, unsafe { std::os::fd::FromRawFd::from_raw_fd(pidfd) }))
        }
        // SAFETY: as above, in a copy of our memory.
        _ => unsafe { sys::clone3_fork(prepared.clone_flags) }.map(|c| match c {
            // SAFETY: we are the child of clone3_fork.
            None => unsafe { child::run(&prepared.plan) },
            Some(c) => c,
        }),
    };
    let (pid, pidfd) = match cloned {
        Ok(c) => c,
        Err(e) => {
            restore_mask();
            return Err(clone_error(e));
        }
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
    let abort = |e: Error| {
        restore_mask();
        Err(e)
    };
    if let Err(e) = prepared.mapping.apply(pid) {
        return abort(e);
    }
    // Killed and reaped when dropped, after the sandbox has exited.
    let _network = match &prepared.network {
        None => None,
        Some((stack, allow_host_loopback)) => {
            match crate::net::Helper::start(stack, pid, *allow_host_loopback) {
                Ok(h) => Some(h),
                Err(e) => return abort(e),
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
    let result = supervise(
        pid,
        &pidfd,
        &err_r,
        &status_r,
        sigfd.as_ref(),
        opts.timeout,
        &command,
    );
    // supervise returns Ok only once it has reaped the child
    reap.armed = result.is_err();
    restore_mask();
    result
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
        // SAFETY: waitid through a pidfd that outlives this guard.
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
    // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo.
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

/// Wait for the sandbox: failure reports, forwarded signals, the timeout,
/// and finally the command's status from kiln-init.
fn supervise(
    pid: i32,
    pidfd: &OwnedFd,
    err_r: &OwnedFd,
    status_r: &OwnedFd,
    sigfd: Option<&SignalFd>,
    timeout: Option<Duration>,
    command: &str,
) -> Result<ExitStatus> {
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
        let mut fds = vec![PollFd::new(
            std::os::fd::AsFd::as_fd(pidfd),
            PollFlags::POLLIN,
        )];
        if err_open {
            fds.push(PollFd::new(
                std::os::fd::AsFd::as_fd(err_r),
                PollFlags::POLLIN,
            ));
        }
        if let Some(s) = sigfd {
            fds.push(PollFd::new(std::os::fd::AsFd::as_fd(s), PollFlags::POLLIN));
        }
        let n = match nix::poll::poll(&mut fds, wait) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::Wait(e)),
            Ok(n) => n,
        };
        if n == 0 {
            // Killing PID 1 of the namespace kills every process in it.
            send_signal(pidfd, libc::SIGKILL);
            timed_out = true;
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        let mut i = 1;
        if ready[0] {
            exited = true;
        }
        if err_open {
            if ready[i] {
                let mut buf = [0u8; 64];
                match nix::unistd::read(err_r.as_raw_fd(), &mut buf) {
                    Ok(0) => err_open = false,
                    Ok(k) => report.extend_from_slice(&buf[..k]),
                    Err(Errno::EINTR) => {}
                    Err(_) => err_open = false,
                }
            }
            i += 1;
        }
        if let Some(s) = sigfd {
            if ready[i] {
                if let Ok(Some(info)) = s.read_signal() {
                    send_signal(
                        pidfd,
                        i32::try_from(info.ssi_signo).unwrap_or(libc::SIGTERM),
                    );
                }
            }
        }
    }
    let init_status = waitpid(Pid::from_raw(pid), None).map_err(Error::Wait)?;

    if let Some(msg) = report
        .get(..Msg::SIZE)
        .and_then(|b| Msg::decode(b.try_into().ok()?))
    {
        return Err(match msg.stage {
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
        });
    }
    if timed_out {
        return Ok(ExitStatus::TimedOut);
    }
    let mut raw = [0u8; 4];
    if matches!(nix::unistd::read(status_r.as_raw_fd(), &mut raw), Ok(4)) {
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

/// The path of the rootfs a spec names, made absolute.
pub fn spec_rootfs(spec: &Spec) -> Option<PathBuf> {
    spec.root()
        .as_ref()
        .and_then(|r| std::path::absolute(r.path()).ok())
}
