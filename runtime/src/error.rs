//! The runtime's error type: every way starting a sandbox can fail, each
//! with a message that names what failed and, where there is one, the fix.
//! An underlying error is the variant's `source()`, never repeated in its
//! message: print the chain (`kiln_sys::error_chain`) to show both.
//! A failure of the sandbox itself maps to exit code 125 (as Docker uses),
//! distinct from anything the command returns.

use std::path::PathBuf;

use crate::child::Stage;

pub type Result<T> = std::result::Result<T, Error>;

/// Exit code kiln uses when the sandbox could not be set up.
pub const EXIT_SANDBOX_FAILURE: i32 = 125;
/// Exit code when the command exists but cannot be executed (as Docker).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code when the command does not exist (as Docker and shells).
pub const EXIT_NOT_FOUND: i32 = 127;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rootfs {0} does not exist: pass a directory holding the sandbox's root filesystem")]
    RootfsMissing(PathBuf),
    #[error("rootfs {0} is not a directory")]
    RootfsNotDirectory(PathBuf),
    #[error("the spec has no process to run: set process.args")]
    NoProcess,
    #[error("the spec's process.args is empty: name a command to run")]
    NoArgs,
    #[error("the spec asks for {0}, which kiln's runtime does not support")]
    Unsupported(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("cannot open bind mount source {}", path.display())]
    MountSource {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{what} contains a NUL byte")]
    NulByte { what: String },
    #[error("user {0:?} is not in the rootfs's /etc/passwd: use a numeric uid or add the user to the image")]
    UnknownUser(String),
    #[error("group {0:?} is not in the rootfs's /etc/group: use a numeric gid or add the group to the image")]
    UnknownGroup(String),
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "uid {id} is not mapped in the sandbox: only uid 0 is available because {reason}; \
         add a range for your user to /etc/subuid and /etc/subgid and install newuidmap (package uidmap)"
    )]
    IdNotMapped { id: u32, reason: &'static str },
    #[error(
        "user namespaces are disabled on this host ({0}): enable them with \
         `sysctl -w kernel.unprivileged_userns_clone=1` or `sysctl -w user.max_user_namespaces=15000`"
    )]
    UserNamespacesDisabled(&'static str),
    #[error("cannot create the sandbox: {0}")]
    Clone(std::io::Error),
    #[error("cannot move the sandbox into its cgroup ({path})")]
    Cgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot create the sandbox: the seccomp filter kiln runs under refuses {call} with namespace \
         flags, as the default profiles of Docker and Kubernetes do without CAP_SYS_ADMIN. Run kiln's \
         container with kiln's profile: podman/docker --security-opt seccomp=deploy/seccomp.json (in \
         kiln's repository), Kubernetes securityContext.seccompProfile type Localhost with that file; \
         every step still gets kiln's own profile"
    )]
    SeccompRefused {
        call: &'static str,
        source: std::io::Error,
    },
    #[error("{helper} failed to map ids for the sandbox ({status}): {stderr}; check the ranges for your user in /etc/subuid and /etc/subgid")]
    IdMapHelper {
        helper: &'static str,
        status: String,
        stderr: String,
    },
    #[error("cannot run {helper} (install it with `apt-get install uidmap`)")]
    IdMapHelperMissing {
        helper: &'static str,
        source: std::io::Error,
    },
    #[error("cannot write {path}{}", write_map_hint(source))]
    WriteIdMap {
        path: String,
        source: std::io::Error,
    },
    #[error("sandbox setup failed at {stage}: {errno}{hint}")]
    Setup {
        stage: Stage,
        errno: nix::errno::Errno,
        hint: &'static str,
    },
    #[error("executable {0:?} not found in the sandbox (searched the spec's PATH)")]
    ExecNotFound(String),
    #[error("cannot execute {path:?} in the sandbox: {errno}")]
    ExecFailed {
        path: String,
        errno: nix::errno::Errno,
    },
    #[error("cannot compile seccomp profile {path}: {reason}")]
    SeccompProfile { path: PathBuf, reason: String },
    #[error("cannot prepare the sandbox's init: {0}")]
    Init(std::io::Error),
    #[error("lost contact with the sandbox: {0}")]
    Channel(std::io::Error),
    #[error("cannot use runtime directory {path}")]
    RuntimeDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("runtime directory {0} is not a private directory of the calling user: remove it or set XDG_RUNTIME_DIR")]
    RuntimeDirUnsafe(PathBuf),
    #[error("cannot join kiln's user namespace through {path}")]
    JoinNamespace {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "--network=sandbox needs a user-mode network stack and neither pasta nor slirp4netns is installed: \
         install pasta with `apt-get install passt` (or slirp4netns with `apt-get install slirp4netns`), \
         or use --network=none"
    )]
    NetworkStackMissing,
    #[error("--allow-host-loopback applies to --network sandbox, not to {0:?}")]
    HostLoopbackNeedsSandbox(String),
    #[error("unknown network mode {0:?}: use sandbox, none or host")]
    UnknownNetwork(String),
    #[error("--ulimit {0:?}: expected NAME=SOFT[:HARD] with NAME one of core, cpu, data, fsize, locks, memlock, msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack and numbers (-1: unlimited), soft not above hard")]
    BadUlimit(String),
    #[error("KILN_NETWORK_STACK={0:?} names no network stack: use pasta or slirp4netns")]
    NetworkStackUnknown(String),
    #[error("cannot set up the network policy of --network=sandbox ({what}): {errno}")]
    NetworkPolicy {
        what: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("cannot start {stack} for the sandbox's network")]
    NetworkStackStart {
        stack: &'static str,
        source: std::io::Error,
    },
    #[error("{stack} {what} ({status}): {stderr}; try --network=none, or the other stack with {}=pasta|slirp4netns", crate::net::STACK_ENV)]
    NetworkStack {
        stack: &'static str,
        what: String,
        status: String,
        stderr: String,
    },
    #[error(
        "cannot emulate {name}: its interpreter {} is missing; install it with \
         `apt-get install qemu-user-static` (or point {} at a directory of qemu-*-static)",
        interpreter.display(), crate::emulation::QEMU_DIR_ENV
    )]
    EmulatorMissing { name: String, interpreter: PathBuf },
    #[error(
        "cannot emulate {name}: kernel {kernel} cannot mount binfmt_misc in a user namespace \
         (Linux >= 6.7 can) and the host has no {name} registration; upgrade the kernel, or have \
         an administrator register it (`apt-get install qemu-user-static binfmt-support`)"
    )]
    EmulationUnavailable { name: String, kernel: String },
    #[error("waiting for the sandbox failed: {0}")]
    Wait(nix::errno::Errno),
}

impl Error {
    /// The exit code kiln reports for this error: 126/127 when the command
    /// itself cannot run (as Docker and shells), 125 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::ExecNotFound(_) => EXIT_NOT_FOUND,
            Error::ExecFailed { .. } => EXIT_CANNOT_EXECUTE,
            _ => EXIT_SANDBOX_FAILURE,
        }
    }
}

/// What to do when a uid_map or gid_map cannot be written: writing one
/// that maps more than the writer's own id needs CAP_SETUID/CAP_SETGID
/// over the parent namespace, which a container keeps unless dropped.
fn write_map_hint(source: &std::io::Error) -> &'static str {
    if source.raw_os_error() == Some(libc::EPERM) {
        " (mapping ids into a user namespace needs CAP_SETUID and CAP_SETGID: in a container, \
         do not drop them: podman/docker --cap-drop, Kubernetes securityContext.capabilities.drop)"
    } else {
        ""
    }
}

/// A namespace-creating call that failed, in the user's terms: user
/// namespaces turned off by a sysctl or AppArmor; else, when a seccomp
/// filter is on this process and the answer is one a filter gives
/// (ENOSYS for clone3, EPERM), the filter and its fix; else the plain
/// error.
pub fn namespace_call_failed(call: &'static str, e: nix::errno::Errno) -> Error {
    use nix::errno::Errno;
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
    let filtered = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Seccomp:") && l.trim_end().ends_with('2'))
    });
    if filtered && matches!(e, nix::errno::Errno::ENOSYS | nix::errno::Errno::EPERM) {
        return Error::SeccompRefused {
            call,
            source: e.into(),
        };
    }
    Error::Clone(e.into())
}
