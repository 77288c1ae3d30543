//! The sandbox child: from the clone to the exec of the user's command.
//!
//! This code runs beside a possibly multi-threaded process, in its memory
//! (a `CLONE_VM` child, until the exec of kiln-init) or in a copy of it, so
//! it never allocates, writes no memory but its own stack, and calls only
//! async-signal-safe functions; every string and table it needs is
//! prepared in a [`Plan`] before the clone.
//! The path is one numbered sequence; any failure reports the step that
//! failed to the parent as a [`Msg`] and exits with status 125.
//!
//! Two processes come out of it: the first (PID 1 of the new PID namespace)
//! does the namespace-wide setup and then becomes kiln-init; it forks the
//! second, which becomes the user's command.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;

use crate::sys::{self, FdPath};

/// Defines [`Stage`] from one table: each step of the sandbox setup and how
/// an error message names it. On the child-to-parent channel a stage is its
/// position in the table plus one (0 never names a stage).
macro_rules! stages {
    ($($name:ident => $text:literal,)*) => {
        /// The setup step a failure happened in, reported to the parent.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Stage {
            $($name,)*
        }

        impl Stage {
            const ALL: &'static [Stage] = &[$(Stage::$name,)*];

            fn text(self) -> &'static str {
                match self {
                    $(Stage::$name => $text,)*
                }
            }
        }
    };
}

stages! {
    WaitForParent => "waiting for the id maps",
    BecomeRoot => "becoming root in the user namespace",
    Hostname => "setting the hostname",
    MakeMountsPrivate => "making mounts private",
    BindRootfs => "bind-mounting the rootfs",
    OpenRootfs => "opening the rootfs",
    MountProc => "mounting /proc",
    Binfmt => "registering an emulator in the sandbox's binfmt_misc",
    MountDev => "mounting /dev",
    DevNode => "binding a device node into /dev",
    MountDevPts => "mounting /dev/pts",
    MountDevShm => "mounting /dev/shm",
    MountSys => "mounting /sys",
    SpecMount => "mounting a spec mount",
    PrivateNode => "mounting a secret or agent socket in its private tmpfs",
    ReadonlyRootfs => "making the rootfs read-only",
    PivotRoot => "pivot_root into the rootfs",
    DetachOldRoot => "detaching the old root",
    MaskPath => "masking a /proc or /sys path",
    ReadonlyPath => "making a /proc path read-only",
    Loopback => "bringing up loopback",
    BlockRoutes => "blocking link-local and host addresses in the network namespace",
    NetNamespace => "making the network namespace",
    Rlimit => "setting resource limits",
    DropBoundingSet => "dropping the capability bounding set",
    ClearAmbient => "clearing ambient capabilities",
    NoNewPrivs => "setting no_new_privs",
    LandlockScope => "scoping abstract unix sockets and signals with Landlock",
    ForkCommand => "forking the command",
    WaitForInit => "waiting for init",
    SetGroups => "setting supplementary groups",
    SetGid => "setting the gid",
    SetUid => "setting the uid",
    Capabilities => "setting capabilities",
    Chdir => "changing to the working directory",
    CwdOutsideRoot => "checking that the working directory is inside the rootfs",
    Stdio => "setting up standard streams",
    Seccomp => "installing the seccomp filter",
    Exec => "executing the command",
    ExecInit => "executing kiln-init",
}

impl Stage {
    fn from_u32(v: u32) -> Option<Stage> {
        let index = usize::try_from(v.checked_sub(1)?).ok()?;
        Stage::ALL.get(index).copied()
    }

    /// A hint that names the likely cause and fix, for the error message.
    pub fn hint(self, errno: Errno) -> &'static str {
        match (self, errno) {
            (Stage::BindRootfs | Stage::OpenRootfs, _) => {
                " (is the rootfs a directory the calling user can read?)"
            }
            (Stage::MountProc, Errno::EPERM) => {
                " (the kernel refused a fresh /proc: it does this when the host's /proc has \
                 masked or read-only submounts, e.g. inside another container; run kiln where /proc is fully visible)"
            }
            (Stage::SetUid | Stage::SetGid, Errno::EINVAL) => {
                " (the id is not mapped in the sandbox: give your user a range in /etc/subuid and /etc/subgid)"
            }
            (Stage::Binfmt, Errno::EPERM | Errno::ENODEV) => {
                " (binfmt_misc in a user namespace needs Linux >= 6.7 built with CONFIG_BINFMT_MISC)"
            }
            (Stage::Binfmt, Errno::ENOENT) => " (the qemu interpreter was removed from the host: reinstall qemu-user-static)",
            (Stage::Chdir, Errno::ENOENT) => " (the working directory does not exist in the rootfs)",
            (Stage::NetNamespace, Errno::ENOSPC) => {
                " (the user's network namespace limit is reached: see the sysctl user.max_net_namespaces)"
            }
            (Stage::CwdOutsideRoot, _) => {
                " (the WORKDIR resolves outside the root filesystem, e.g. through /proc/self/fd/N: \
                 use a path inside the image)"
            }
            (
                Stage::MountDev | Stage::MountDevPts | Stage::MountDevShm | Stage::MakeMountsPrivate | Stage::SpecMount,
                Errno::EPERM,
            ) => " (the kernel denied a mount in the sandbox's user namespace; an LSM policy such as AppArmor's \
                   restrict_unprivileged_userns may be in force)",
            _ => "",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

/// A child-to-parent report: the stage that failed and its errno. Fixed
/// size, so it is written and read in one piece without allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub stage: Stage,
    pub errno: Errno,
}

impl Msg {
    pub const SIZE: usize = 8;

    fn encode(self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..4].copy_from_slice(&(self.stage as u32 + 1).to_ne_bytes());
        b[4..].copy_from_slice(&(self.errno as i32).to_ne_bytes());
        b
    }

    pub fn decode(b: &[u8; Self::SIZE]) -> Option<Msg> {
        let stage = Stage::from_u32(u32::from_ne_bytes(b[..4].try_into().ok()?))?;
        let errno = Errno::from_raw(i32::from_ne_bytes(b[4..].try_into().ok()?));
        Some(Msg { stage, errno })
    }
}

/// A mount from the spec, resolved for the child.
pub enum MountKind {
    /// a detached tree made in the parent (source resolved and flags set
    /// there), attached with move_mount
    Bind {
        tree: RawFd,
    },
    Tmpfs {
        data: CString,
    },
}

/// What a [`PrivateNode`] holds.
pub enum NodeContent {
    /// a regular file with these bytes (a build secret)
    File(zeroize::Zeroizing<Vec<u8>>),
    /// a listening unix socket; its descriptor is sent over `sink`
    /// (SCM_RIGHTS) to whoever serves it
    Socket { sink: RawFd },
}

/// A file or socket that exists only in a tmpfs made for this one sandbox,
/// bind-mounted read-only onto `dest` (which must exist in the rootfs).
pub struct PrivateNode {
    /// destination relative to the rootfs, resolved with RESOLVE_IN_ROOT
    pub dest: CString,
    /// tmpfs mount options (size, inodes)
    pub data: CString,
    /// MS_NOSUID, MS_NODEV and MS_NOEXEC as fit
    pub flags: libc::c_ulong,
    pub mode: libc::mode_t,
    pub uid: u32,
    pub gid: u32,
    pub content: NodeContent,
}

pub struct SpecMount {
    /// destination relative to the rootfs, resolved with RESOLVE_IN_ROOT
    pub dest: CString,
    pub kind: MountKind,
    /// MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC as requested
    pub flags: libc::c_ulong,
}

/// Where a standard stream of the command comes from.
#[derive(Clone, Copy)]
pub enum StdioFd {
    /// keep the caller's descriptor
    Inherit,
    /// dup this descriptor onto the stream
    Fd(RawFd),
}

/// Everything the child needs, prepared before the clone.
pub struct Plan {
    pub rootfs: CString,
    pub rootfs_readonly: bool,
    pub hostname: Option<CString>,
    pub new_net: bool,
    /// what the sandbox's network namespace gets `prohibit` rules for
    /// (link-local and the host's own addresses under `sandbox`)
    pub blocked: sys::Blocked,
    /// whether setgroups(2) is allowed (not denied for a single-id map)
    pub can_setgroups: bool,
    pub mounts: Vec<SpecMount>,
    pub private: Vec<PrivateNode>,
    /// binfmt_misc `register` lines for emulated architectures
    pub binfmt: Vec<CString>,
    /// absolute paths inside the new root
    pub masked: Vec<CString>,
    pub readonly: Vec<CString>,
    pub rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    pub last_cap: u32,
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    /// seccomp programs in install order; empty for `unconfined`
    pub seccomp: Vec<Vec<libc::sock_filter>>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub umask: Option<u32>,
    /// Landlock scoping (ABI 6 and later) is available
    pub landlock_scope: bool,
    pub cwd: CString,
    pub argv0: CString,
    pub argv: Vec<*const libc::c_char>,
    pub envp: Vec<*const libc::c_char>,
    /// directories to search for `argv0` when it has no slash
    pub path_dirs: Vec<CString>,
    pub stdio: [StdioFd; 3],
    pub init_fd: RawFd,
    /// a stack for the command process when it may share kiln's memory too
    /// (its ids are those of PID 1, see `sandbox::run`); None forks it
    pub command_stack: Option<sys::ChildStack>,
    /// a stack for the helper that makes the new network namespace (with
    /// loopback up) while PID 1 sets up mounts; None when the clone made it
    /// (or there is none)
    pub net_helper_stack: Option<sys::ChildStack>,
    /// pidfd of the process that starts the sandbox
    pub parent_pidfd: RawFd,
    pub sync_read: RawFd,
    /// the parent's end of the same pipe: the clone copied it, and the
    /// child closes its copy so the parent's death reads as EOF
    pub sync_write: RawFd,
    pub err_write: RawFd,
    pub status_write: RawFd,
}

/// Report a failure to the parent and exit. Never returns.
fn fail(p: &Plan, stage: Stage, errno: Errno) -> ! {
    sys::write_all(p.err_write, &Msg { stage, errno }.encode());
    // SAFETY: _exit is async-signal-safe and ends the process.
    unsafe { libc::_exit(crate::error::EXIT_SANDBOX_FAILURE) }
}

trait OrFail<T> {
    fn or_fail(self, p: &Plan, stage: Stage) -> T;
}

impl<T> OrFail<T> for Result<T, Errno> {
    fn or_fail(self, p: &Plan, stage: Stage) -> T {
        match self {
            Ok(v) => v,
            Err(e) => fail(p, stage, e),
        }
    }
}

fn check(rc: libc::c_long) -> Result<(), Errno> {
    Errno::result(rc).map(drop)
}

/// openat relative to `dir` without following a final symlink; a missing
/// mount point directory is created (as runc does). No allocation.
fn open_mountpoint_dir(dir: RawFd, name: &CStr) -> Result<RawFd, Errno> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; plain openat/mkdirat calls.
    unsafe {
        let fd = libc::openat(dir, name.as_ptr(), flags);
        if fd >= 0 {
            return Ok(fd);
        }
        if Errno::last() != Errno::ENOENT {
            return Err(Errno::last());
        }
        if libc::mkdirat(dir, name.as_ptr(), 0o755) != 0 && Errno::last() != Errno::EEXIST {
            return Err(Errno::last());
        }
        let fd = libc::openat(dir, name.as_ptr(), flags);
        if fd < 0 {
            Err(Errno::last())
        } else {
            Ok(fd)
        }
    }
}

fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this process owns.
    unsafe { libc::close(fd) };
}

/// Mount `fstype` (no source) over the directory `name` inside `dir`.
fn mount_fs_at(
    dir: RawFd,
    name: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), Errno> {
    let fd = open_mountpoint_dir(dir, name)?;
    let r = sys::mount(
        Some(fstype),
        FdPath::new(fd).as_cstr(),
        Some(fstype),
        flags,
        data,
    );
    close(fd);
    r
}

const HOST_DEVICES: [(&CStr, &CStr); 6] = [
    (c"/dev/null", c"null"),
    (c"/dev/zero", c"zero"),
    (c"/dev/full", c"full"),
    (c"/dev/random", c"random"),
    (c"/dev/urandom", c"urandom"),
    (c"/dev/tty", c"tty"),
];

const DEV_LINKS: [(&CStr, &CStr); 5] = [
    (c"/proc/self/fd", c"fd"),
    (c"/proc/self/fd/0", c"stdin"),
    (c"/proc/self/fd/1", c"stdout"),
    (c"/proc/self/fd/2", c"stderr"),
    (c"pts/ptmx", c"ptmx"),
];

/// /dev: a fresh tmpfs holding only the safe host devices (bind-mounted:
/// a user namespace cannot mknod), a private devpts and /dev/shm.
fn setup_dev(p: &Plan, root: RawFd) {
    let nosuid = libc::MS_NOSUID;
    mount_fs_at(
        root,
        c"dev",
        c"tmpfs",
        nosuid | libc::MS_NOEXEC,
        Some(c"mode=755,size=65536k"),
    )
    .or_fail(p, Stage::MountDev);
    let dev = open_mountpoint_dir(root, c"dev").or_fail(p, Stage::MountDev);
    for (host, name) in HOST_DEVICES {
        // SAFETY: creating an empty regular file as a bind target in our
        // fresh tmpfs; `name` is NUL-terminated.
        let fd = unsafe {
            libc::openat(
                dev,
                name.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o666,
            )
        };
        if fd < 0 {
            fail(p, Stage::DevNode, Errno::last());
        }
        let r = sys::mount(
            Some(host),
            FdPath::new(fd).as_cstr(),
            None,
            libc::MS_BIND,
            None,
        );
        close(fd);
        // /dev/tty may not exist for a process without a terminal; the
        // rest must.
        if let Err(e) = r {
            if name != c"tty" {
                fail(p, Stage::DevNode, e);
            }
        }
    }
    mount_fs_at(
        dev,
        c"pts",
        c"devpts",
        nosuid | libc::MS_NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620"),
    )
    .or_fail(p, Stage::MountDevPts);
    mount_fs_at(
        dev,
        c"shm",
        c"tmpfs",
        nosuid | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"mode=1777,size=65536k"),
    )
    .or_fail(p, Stage::MountDevShm);
    for (target, name) in DEV_LINKS {
        // SAFETY: both strings are NUL-terminated; a failure only means a
        // missing convenience link.
        unsafe { libc::symlinkat(target.as_ptr(), dev, name.as_ptr()) };
    }
    close(dev);
}

/// The spec's bind and tmpfs mounts, each target resolved inside the
/// rootfs as a descriptor so no symlink in the image can redirect it.
fn setup_spec_mounts(p: &Plan, root: RawFd) {
    for m in &p.mounts {
        let fd = sys::open_path_in_root(root, &m.dest).or_fail(p, Stage::SpecMount);
        let target = FdPath::new(fd);
        match &m.kind {
            MountKind::Bind { tree } => {
                sys::move_mount_fd(*tree, fd).or_fail(p, Stage::SpecMount);
            }
            MountKind::Tmpfs { data } => {
                sys::mount(
                    Some(c"tmpfs"),
                    target.as_cstr(),
                    Some(c"tmpfs"),
                    m.flags,
                    Some(data),
                )
                .or_fail(p, Stage::SpecMount);
            }
        }
        close(fd);
    }
}

/// Each private node: a tmpfs mounted on a staging directory in the /dev
/// kiln just made (a tmpfs of this sandbox, never written to disk), the
/// node created in it, bound read-only onto its target, and the staging
/// mount detached again. The bind keeps the tmpfs alive for the step's
/// lifetime; nothing else anywhere names it, so the node's bytes exist only
/// in memory and only in this mount namespace.
fn setup_private_nodes(p: &Plan, root: RawFd) {
    if p.private.is_empty() {
        return;
    }
    const STAGING: &CStr = c".kiln-private";
    const NODE: &CStr = c"node";
    let fail_at = |e: Errno| -> ! { fail(p, Stage::PrivateNode, e) };
    let dev = open_mountpoint_dir(root, c"dev").unwrap_or_else(|e| fail_at(e));
    for n in &p.private {
        // SAFETY: NUL-terminated name; `dev` is our own directory fd.
        if unsafe { libc::mkdirat(dev, STAGING.as_ptr(), 0o700) } != 0 {
            fail_at(Errno::last());
        }
        let covered = open_mountpoint_dir(dev, STAGING).unwrap_or_else(|e| fail_at(e));
        sys::mount(
            Some(c"tmpfs"),
            FdPath::new(covered).as_cstr(),
            Some(c"tmpfs"),
            n.flags,
            Some(&n.data),
        )
        .unwrap_or_else(|e| fail_at(e));
        close(covered);
        // SAFETY: NUL-terminated name; the fd now names the new tmpfs root.
        let top = unsafe {
            libc::openat(
                dev,
                STAGING.as_ptr(),
                libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if top < 0 {
            fail_at(Errno::last());
        }
        match &n.content {
            NodeContent::File(bytes) => {
                // SAFETY: NUL-terminated name; plain file calls on our fds.
                unsafe {
                    let f = libc::openat(
                        top,
                        NODE.as_ptr(),
                        libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_WRONLY
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o000,
                    );
                    if f < 0 {
                        fail_at(Errno::last());
                    }
                    sys::write_exact(f, bytes).unwrap_or_else(|e| fail_at(e));
                    if libc::fchown(f, n.uid, n.gid) != 0 || libc::fchmod(f, n.mode) != 0 {
                        fail_at(Errno::last());
                    }
                    close(f);
                }
            }
            NodeContent::Socket { sink } => {
                let s = sys::listen_unix_at(top, NODE).unwrap_or_else(|e| fail_at(e));
                // SAFETY: NUL-terminated name inside our own tmpfs.
                unsafe {
                    if libc::fchownat(top, NODE.as_ptr(), n.uid, n.gid, libc::AT_SYMLINK_NOFOLLOW)
                        != 0
                        || libc::fchmodat(top, NODE.as_ptr(), n.mode, 0) != 0
                    {
                        fail_at(Errno::last());
                    }
                }
                sys::send_fd(*sink, s).unwrap_or_else(|e| fail_at(e));
                close(s);
            }
        }
        // SAFETY: NUL-terminated name; O_PATH open of the node just made.
        let node = unsafe {
            libc::openat(
                top,
                NODE.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if node < 0 {
            fail_at(Errno::last());
        }
        let target = sys::open_path_in_root(root, &n.dest).unwrap_or_else(|e| fail_at(e));
        sys::mount(
            Some(FdPath::new(node).as_cstr()),
            FdPath::new(target).as_cstr(),
            None,
            libc::MS_BIND,
            None,
        )
        .unwrap_or_else(|e| fail_at(e));
        close(target);
        let bound = sys::open_path_in_root(root, &n.dest).unwrap_or_else(|e| fail_at(e));
        sys::mount(
            None,
            FdPath::new(bound).as_cstr(),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | n.flags,
            None,
        )
        .unwrap_or_else(|e| fail_at(e));
        close(bound);
        close(node);
        // The staging mount goes; the bind above keeps the tmpfs alive.
        // SAFETY: plain umount2/unlinkat on paths we built.
        unsafe {
            if libc::umount2(FdPath::new(top).as_cstr().as_ptr(), libc::MNT_DETACH) != 0 {
                fail_at(Errno::last());
            }
            close(top);
            if libc::unlinkat(dev, STAGING.as_ptr(), libc::AT_REMOVEDIR) != 0 {
                fail_at(Errno::last());
            }
        }
    }
    close(dev);
}

/// binfmt_misc of this user namespace over the fresh
/// /proc/sys/fs/binfmt_misc, one registration per emulator, then remounted
/// read-only so the command cannot add, remove or disable an entry. The
/// registrations live as long as this mount (a detached staging mount
/// loses them), and the kernel resolves each interpreter now, while the
/// host's root is still ours (flag `F`).
fn setup_binfmt(p: &Plan, root: RawFd) {
    if p.binfmt.is_empty() {
        return;
    }
    const DIR: &CStr = c"proc/sys/fs/binfmt_misc";
    let fail_at = |e: Errno| -> ! { fail(p, Stage::Binfmt, e) };
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let covered = sys::open_path_in_root(root, DIR).unwrap_or_else(|e| fail_at(e));
    sys::mount(
        Some(c"binfmt_misc"),
        FdPath::new(covered).as_cstr(),
        Some(c"binfmt_misc"),
        flags,
        None,
    )
    .unwrap_or_else(|e| fail_at(e));
    close(covered);
    let top = sys::open_path_in_root(root, DIR).unwrap_or_else(|e| fail_at(e));
    // SAFETY: NUL-terminated name relative to `top`, the new instance's root.
    let register = unsafe {
        libc::openat(
            top,
            c"register".as_ptr(),
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if register < 0 {
        fail_at(Errno::last());
    }
    for line in &p.binfmt {
        // one write per registration: the kernel parses each write whole
        sys::write_exact(register, line.as_bytes()).unwrap_or_else(|e| fail_at(e));
    }
    close(register);
    sys::mount(
        None,
        FdPath::new(top).as_cstr(),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | flags,
        None,
    )
    .unwrap_or_else(|e| fail_at(e));
    close(top);
}

/// Mask the paths the OCI defaults hide: files get /dev/null, directories
/// an empty read-only tmpfs. Runs after pivot_root, so every path resolves
/// inside mounts kiln made itself (/proc and /sys are fresh instances).
fn mask_paths(p: &Plan) {
    for path in &p.masked {
        let mut st: libc::stat = zeroed_stat();
        // SAFETY: `path` is NUL-terminated and `st` is a valid out buffer.
        if unsafe { libc::lstat(path.as_ptr(), &mut st) } != 0 {
            continue; // nothing to hide
        }
        let r = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            sys::mount(
                Some(c"tmpfs"),
                path,
                Some(c"tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"size=0"),
            )
        } else {
            sys::mount(Some(c"/dev/null"), path, None, libc::MS_BIND, None)
        };
        r.or_fail(p, Stage::MaskPath);
    }
    for path in &p.readonly {
        match sys::mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None) {
            Err(Errno::ENOENT) => continue,
            r => r.or_fail(p, Stage::ReadonlyPath),
        }
        // The flags of the procfs mount are locked in a user namespace and
        // must be repeated on remount.
        let flags = libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC;
        sys::mount(None, path, None, flags | libc::MS_REC, None).or_fail(p, Stage::ReadonlyPath);
    }
}

fn zeroed_stat() -> libc::stat {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// PID 1 of the sandbox: namespace-wide setup, then fork the command and
/// become kiln-init.
///
/// # Safety
/// Must only be called in the child of [`sys::clone_vm`] or
/// [`sys::clone3_fork`] (see there).
pub unsafe fn run(p: &Plan) -> ! {
    // 0a. No core dumps until the command's exec: a crash of this code
    //     would write kiln's memory (secrets included) into the step's
    //     working directory, and so into its layer. The command gets the
    //     limit back (or the spec's) just before its exec.
    let mut core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a stack value.
    unsafe {
        check(libc::getrlimit(libc::RLIMIT_CORE, &mut core).into()).or_fail(p, Stage::Rlimit);
        let off = libc::rlimit {
            rlim_cur: 0,
            rlim_max: core.rlim_max,
        };
        check(libc::setrlimit(libc::RLIMIT_CORE, &off).into()).or_fail(p, Stage::Rlimit);
    }

    // 0. Start making the network namespace, beside everything up to
    //    /sys (joined in step 9).
    let netns = NetNs {
        fd: AtomicI32::new(-1),
    };
    let net_helper = p.net_helper_stack.as_ref().map(|stack| {
        // SAFETY: `netns_helper` keeps the clone_vm contract: a few
        // async-signal-safe calls, no id change, no memory written but its
        // stack and `netns`, which stays on our stack until it is reaped.
        unsafe {
            sys::clone_vm(
                libc::CLONE_FILES,
                stack,
                netns_helper,
                std::ptr::from_ref(&netns).cast_mut().cast(),
                None,
            )
        }
        .unwrap_or_else(|e| fail(p, Stage::NetNamespace, e))
    });

    // 1. Wait until the parent has written our uid and gid maps. The clone
    //    copied the parent's write end of the pipe: close it, so a parent
    //    killed before releasing us reads as EOF instead of a wait forever
    //    (and watch its pidfd too, for any other copy).
    close(p.sync_write);
    let mut pfd = [
        libc::pollfd {
            fd: p.sync_read,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: p.parent_pidfd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: poll on a pollfd array on the stack.
    while unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) } < 0 {
        if Errno::last() != Errno::EINTR {
            fail(p, Stage::WaitForParent, Errno::last());
        }
    }
    if pfd[0].revents & libc::POLLIN == 0 {
        // the parent died first: nobody is left to tell
        // SAFETY: plain _exit.
        unsafe { libc::_exit(crate::error::EXIT_SANDBOX_FAILURE) };
    }
    let mut byte = [0u8; 1];
    match sys::read_full(p.sync_read, &mut byte) {
        Ok(1) => {}
        Ok(_) => fail(p, Stage::WaitForParent, Errno::EPIPE),
        Err(e) => fail(p, Stage::WaitForParent, e),
    }
    close(p.sync_read);

    // 2. Become uid/gid 0 of the new namespace, without host groups.
    //    Raw syscalls: glibc's wrappers broadcast id changes to every
    //    thread it believes exists, and threads of the parent that were
    //    not copied by the clone would never answer.
    // SAFETY: plain id syscalls.
    unsafe {
        if p.can_setgroups {
            check(libc::syscall(
                libc::SYS_setgroups,
                0,
                std::ptr::null::<libc::gid_t>(),
            ))
            .or_fail(p, Stage::BecomeRoot);
        }
        check(libc::syscall(libc::SYS_setresgid, 0, 0, 0)).or_fail(p, Stage::BecomeRoot);
        check(libc::syscall(libc::SYS_setresuid, 0, 0, 0)).or_fail(p, Stage::BecomeRoot);
    }

    // 2b. Die with kiln: if the process that started us is killed (even
    //     with SIGKILL) the kernel kills us, PID 1, and with us every
    //     process of the namespace. Set after the id change, which clears
    //     it; a parent that died before this point is caught by polling
    //     its pidfd.
    // SAFETY: plain prctl and poll on a pollfd array on the stack.
    unsafe {
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0).into())
            .or_fail(p, Stage::BecomeRoot);
        let mut pfd = [libc::pollfd {
            fd: p.parent_pidfd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if libc::poll(pfd.as_mut_ptr(), 1, 0) != 0 {
            libc::_exit(crate::error::EXIT_SANDBOX_FAILURE);
        }
    }

    // 3. Hostname of the new UTS namespace.
    if let Some(h) = &p.hostname {
        // SAFETY: `h` is a valid buffer of the given length.
        check(unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) }.into())
            .or_fail(p, Stage::Hostname);
    }

    // 4. Nothing we mount may propagate back to the host.
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .or_fail(p, Stage::MakeMountsPrivate);

    // 5. The rootfs becomes a mount point of its own (pivot_root needs one).
    sys::mount(
        Some(&p.rootfs),
        &p.rootfs,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
    .or_fail(p, Stage::BindRootfs);
    // SAFETY: `rootfs` is NUL-terminated.
    let root = unsafe {
        libc::open(
            p.rootfs.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if root < 0 {
        fail(p, Stage::OpenRootfs, Errno::last());
    }

    // 6. A fresh /proc for the new PID namespace. The mount point is opened
    //    without following symlinks, so an image whose /proc is a symlink
    //    cannot redirect the mount (runc CVE-2019-19921 class).
    mount_fs_at(
        root,
        c"proc",
        c"proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .or_fail(p, Stage::MountProc);

    // 6b. Emulators of foreign architectures, in a binfmt_misc instance of
    //     this user namespace; read-only before the command can see it.
    setup_binfmt(p, root);

    // 7. /dev with only safe devices.
    setup_dev(p, root);

    // 8. While the helper may still be making the network namespace (step
    //    0), what does not depend on it: signal dispositions, and the
    //    capability bounding and ambient sets and no_new_privs (shared by
    //    init and the command).
    // Signal dispositions as a fresh process has them, for kiln-init and
    // the command alike (the command unblocks the mask itself).
    reset_dispositions();
    for cap in 0..=p.last_cap {
        if p.bounding & (1u64 << cap) == 0 {
            // SAFETY: plain prctl.
            check(
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) }
                    .into(),
            )
            .or_fail(p, Stage::DropBoundingSet);
        }
    }
    // SAFETY: plain prctl calls.
    unsafe {
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
            .into(),
        )
        .or_fail(p, Stage::ClearAmbient);
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())
            .or_fail(p, Stage::NoNewPrivs);
    }

    // 9. Join the network namespace the helper made; nothing of the step
    //    has run yet, and without it the step fails. Then /sys, read-only:
    //    the kernel allows sysfs only with a network namespace of our own,
    //    and only while the host's /sys is still in our mount namespace
    //    (before pivot_root). Without one, /sys stays empty rather than
    //    exposing the host's.
    if let Some(pid) = net_helper {
        join_netns(p, pid, &netns);
    }
    if p.new_net {
        let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        match mount_fs_at(root, c"sys", c"sysfs", flags, None) {
            Ok(()) | Err(Errno::EPERM) => {}
            Err(e) => fail(p, Stage::MountSys, e),
        }
    }

    // 10. The spec's own bind and tmpfs mounts, then secrets and agent
    //     sockets, each in a tmpfs of its own: after /sys, which would hide
    //     any of them aimed under it; then the rootfs read-only when asked
    //     (their mount points may have had to be made).
    setup_spec_mounts(p, root);
    setup_private_nodes(p, root);
    if p.rootfs_readonly {
        sys::mount(
            None,
            &p.rootfs,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )
        .or_fail(p, Stage::ReadonlyRootfs);
    }

    // 10b. Resource limits, inherited by init and the command: after every
    //      descriptor the mounts needed. The core limit is the command's
    //      alone (step 0a).
    for (res, lim) in &p.rlimits {
        if *res == libc::RLIMIT_CORE {
            core = *lim;
            continue;
        }
        // SAFETY: `lim` is a valid rlimit.
        check(unsafe { libc::setrlimit(*res, lim) }.into()).or_fail(p, Stage::Rlimit);
    }

    // 11. pivot_root into the rootfs and detach the old root entirely.
    // SAFETY: fchdir/pivot_root/umount2/chdir on valid arguments.
    unsafe {
        check(libc::fchdir(root).into()).or_fail(p, Stage::PivotRoot);
        check(libc::syscall(
            libc::SYS_pivot_root,
            c".".as_ptr(),
            c".".as_ptr(),
        ))
        .or_fail(p, Stage::PivotRoot);
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH).into())
            .or_fail(p, Stage::DetachOldRoot);
        check(libc::chdir(c"/".as_ptr()).into()).or_fail(p, Stage::DetachOldRoot);
    }
    close(root);

    // 12. Masked and read-only paths in the fresh /proc and /sys.
    mask_paths(p);

    // 13. Loopback up in a network namespace the clone made (the helper
    //     brought up its own).
    if p.new_net && p.net_helper_stack.is_none() {
        sys::loopback_up().or_fail(p, Stage::Loopback);
    }

    // 13b. Under `sandbox`, prohibit rules for link-local addresses (the
    //      cloud metadata service) and the host's own addresses, before
    //      capabilities drop: the step cannot remove them without
    //      CAP_NET_ADMIN, and no route (the stack's, or one it copies
    //      from the host) gets past them.
    if !p.blocked.prefixes.is_empty() {
        sys::block(&p.blocked).or_fail(p, Stage::BlockRoutes);
    }

    // 15b. Landlock scopes: no connecting to abstract unix sockets and no
    //      signals outside the step, even with network=host, where the
    //      host's abstract sockets share the network namespace (containerd
    //      CVE-2020-15257 class). Kernels before 6.12 lack scopes; the
    //      step's own network namespace covers the default case there.
    if p.landlock_scope {
        sys::landlock_scope().or_fail(p, Stage::LandlockScope);
    }

    // 16. seccomp, once for both processes: the filter is inherited by
    //     the fork below, and what the command still does before exec (ids,
    //     capabilities, cwd, streams) is all in the allowlist. Installing it
    //     once instead of twice saves a BPF compile per step.
    for prog in &p.seccomp {
        sys::seccomp_install(prog).or_fail(p, Stage::Seccomp);
    }

    // 17. Fork the command; it waits until init is non-dumpable.
    let mut ready = [0 as RawFd; 2];
    // SAFETY: `ready` has room for two descriptors.
    check(unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) }.into())
        .or_fail(p, Stage::ForkCommand);
    // Read by a command that shares our memory, possibly after we exec'd:
    // it lives in this function's frame, which is never left, not in the
    // match arm below (whose slot the rest of this function could reuse).
    let args = CommandArgs {
        plan: p,
        ready: ready[0],
        ready_write: ready[1],
        core,
    };
    let pid = match &p.command_stack {
        // Sharing memory with us (and kiln) like this process does: the
        // command keeps our ids, so it cannot make that memory
        // non-dumpable.
        Some(stack) => {
            // SAFETY: `command_entry` keeps the clone_vm contract (see
            // `command`); the plan and both stacks outlive this sandbox's
            // PID namespace, which dies with us.
            unsafe {
                sys::clone_vm(
                    0,
                    stack,
                    command_entry,
                    std::ptr::from_ref(&args).cast_mut().cast(),
                    None,
                )
            }
            .unwrap_or_else(|e| fail(p, Stage::ForkCommand, e))
        }
        None => {
            // A raw clone, not glibc's fork: fork runs atfork handlers that
            // take malloc's locks, which another thread of the parent may
            // have held at the moment of our own clone.
            // SAFETY: this process is single-threaded; the child only makes
            // async-signal-safe calls and leaves by exec or _exit.
            let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            let pid = libc::pid_t::try_from(pid).unwrap_or(-1);
            if pid < 0 {
                fail(p, Stage::ForkCommand, Errno::last());
            }
            if pid == 0 {
                // SAFETY: we are the freshly forked command process.
                unsafe { start_command(&args) }
            }
            pid
        }
    };
    close(ready[0]);

    // 18. Become kiln-init.
    // SAFETY: still the single-threaded sandbox child.
    unsafe { exec_init(p, pid, ready[1]) }
}

/// Where the network helper leaves the namespace it made.
struct NetNs {
    fd: AtomicI32,
}

/// The network helper: a new network namespace with loopback up, left as a
/// descriptor in the file table it shares with PID 1. Exits with 0, or with
/// the errno that stopped it. Its errno is PID 1's (shared memory), so a
/// failure that coincides with one of PID 1's may report the other's
/// error; the step fails either way.
extern "C" fn netns_helper(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the NetNs on PID 1's stack, alive until we are reaped.
    let netns = unsafe { &*arg.cast::<NetNs>() };
    // SAFETY: plain unshare and open calls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Errno::last() as libc::c_int;
        }
        if let Err(e) = sys::loopback_up() {
            return e as libc::c_int;
        }
        let fd = libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Errno::last() as libc::c_int;
        }
        netns.fd.store(fd, Ordering::Release);
    }
    0
}

/// Reap the network helper and move into the namespace it made.
fn join_netns(p: &Plan, pid: libc::pid_t, netns: &NetNs) {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } < 0 {
        if Errno::last() != Errno::EINTR {
            fail(p, Stage::NetNamespace, Errno::last());
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        libc::EIO
    };
    if code != 0 {
        fail(p, Stage::NetNamespace, Errno::from_raw(code));
    }
    let fd = netns.fd.load(Ordering::Acquire);
    // SAFETY: `fd` is the namespace descriptor the helper opened in our
    // shared file table.
    check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }.into()).or_fail(p, Stage::NetNamespace);
    close(fd);
}

/// What a command process cloned with `clone_vm` starts from.
struct CommandArgs<'a> {
    plan: &'a Plan,
    ready: RawFd,
    ready_write: RawFd,
    core: libc::rlimit,
}

extern "C" fn command_entry(args: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `args` points to the CommandArgs PID 1 left on its stack,
    // which stays mapped and untouched until this sandbox is gone; we are
    // the freshly cloned command process.
    unsafe { start_command(&*args.cast::<CommandArgs>()) }
}

/// The command process, cloned or forked from PID 1.
///
/// # Safety
/// Only in the command process, right after it was made.
unsafe fn start_command(args: &CommandArgs) -> ! {
    close(args.ready_write);
    // SAFETY: see above.
    unsafe { command(args.plan, args.ready, &args.core) }
}

/// The command process (already under seccomp): ids, capabilities, cwd,
/// streams, signals, exec.
unsafe fn command(p: &Plan, ready: RawFd, core: &libc::rlimit) -> ! {
    // a. Wait for init to be ready (EOF once it closed its end).
    let mut b = [0u8; 1];
    let _ = sys::read_full(ready, &mut b);
    close(ready);

    // b. Ids. Keep capabilities across the uid change so the spec's sets
    //    apply to any user, as runc does.
    // SAFETY: plain id and prctl calls on valid buffers.
    unsafe {
        if p.can_setgroups {
            check(libc::syscall(
                libc::SYS_setgroups,
                p.groups.len(),
                p.groups.as_ptr(),
            ))
            .or_fail(p, Stage::SetGroups);
        }
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into()).or_fail(p, Stage::SetUid);
        check(libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid)).or_fail(p, Stage::SetGid);
        check(libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid)).or_fail(p, Stage::SetUid);
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0).into()).or_fail(p, Stage::SetUid);
    }

    // c. Capabilities.
    sys::capset(p.effective, p.permitted, p.inheritable).or_fail(p, Stage::Capabilities);

    // d. Standard streams, then every other descriptor is closed, now,
    //    before anything resolves a path for the command: a descriptor of
    //    kiln's (a context or state directory, a mount tree) must never be
    //    reachable through /proc/self/fd, or a WORKDIR of /proc/self/fd/N
    //    would start the command outside its root (runc CVE-2024-21626).
    //    Only the error pipe stays, close-on-exec, to report a failed exec.
    for (target, src) in p.stdio.iter().enumerate() {
        if let StdioFd::Fd(fd) = src {
            let target = RawFd::try_from(target).unwrap_or(0);
            // SAFETY: plain dup2 on descriptors we own.
            check(unsafe { libc::dup2(*fd, target) }.into()).or_fail(p, Stage::Stdio);
        }
    }
    close_all_but(p.err_write).or_fail(p, Stage::Stdio);

    // e. umask and working directory (inside the new root), and proof that
    //    it is: a directory outside the root has no path from it, and the
    //    raw getcwd says "(unreachable)" instead of a path.
    // SAFETY: plain calls with NUL-terminated strings and a stack buffer.
    unsafe {
        if let Some(m) = p.umask {
            libc::umask(m);
        }
        check(libc::chdir(p.cwd.as_ptr()).into()).or_fail(p, Stage::Chdir);
        let mut buf = [0u8; 4096];
        let n = libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len());
        if n <= 0 || buf[0] != b'/' {
            fail(p, Stage::CwdOutsideRoot, Errno::EXDEV);
        }
    }

    // f. Signals as a fresh process has them: PID 1 reset the dispositions
    //    before it cloned us (step 8); the mask, which kiln set to block
    //    the signals it forwards and which would survive exec, is cleared
    //    here.
    // SAFETY: an empty, initialised set unblocks every signal.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }

    // g. The core limit back (see step 0a), then exec, searching PATH as
    //    execvp does.
    // SAFETY: `core` is a valid rlimit.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, core) }.into()).or_fail(p, Stage::Rlimit);
    exec_command(p)
}

/// Close every descriptor from 3 up except `keep`.
fn close_all_but(keep: RawFd) -> Result<(), Errno> {
    let close_range = |first: u32, last: u32| {
        // SAFETY: plain close_range call over descriptors this process owns.
        check(unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) })
    };
    let keep = u32::try_from(keep).unwrap_or(0);
    if keep > 3 {
        close_range(3, keep - 1)?;
    }
    close_range(keep.saturating_add(1).max(3), u32::MAX)
}

/// Every signal's disposition back to the default (kiln ignores SIGPIPE,
/// as Rust does, and whoever started kiln may have ignored others: ignored
/// signals survive exec). The mask is left alone.
fn reset_dispositions() {
    // The raw syscall, because glibc refuses to touch the two real-time
    // signals it reserves, and those too must reach the command clean.
    // SAFETY: an all-zero sigaction is SIG_DFL with no flags and an empty
    // mask; the kernel reads 8 bytes of mask.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: see above; invalid numbers just fail with EINVAL.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const libc::sigaction,
                    std::ptr::null_mut::<libc::sigaction>(),
                    8,
                )
            };
        }
    }
}

fn exec_command(p: &Plan) -> ! {
    let exec = |path: *const libc::c_char| {
        // SAFETY: argv and envp are NUL-terminated arrays of pointers into
        // CStrings owned by the plan.
        unsafe { libc::execve(path, p.argv.as_ptr(), p.envp.as_ptr()) };
        Errno::last()
    };
    let name = p.argv0.as_bytes();
    if name.contains(&b'/') || p.path_dirs.is_empty() {
        let e = exec(p.argv0.as_ptr());
        fail_exec(p, e);
    }
    let mut seen_eacces = false;
    let mut buf = [0u8; 4096];
    for dir in &p.path_dirs {
        let d = dir.as_bytes();
        if d.len() + 1 + name.len() + 1 > buf.len() {
            continue;
        }
        buf[..d.len()].copy_from_slice(d);
        buf[d.len()] = b'/';
        buf[d.len() + 1..d.len() + 1 + name.len()].copy_from_slice(name);
        buf[d.len() + 1 + name.len()] = 0;
        match exec(buf.as_ptr().cast()) {
            Errno::EACCES => seen_eacces = true,
            Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::ENAMETOOLONG => {}
            e => fail_exec(p, e),
        }
    }
    fail_exec(
        p,
        if seen_eacces {
            Errno::EACCES
        } else {
            Errno::ENOENT
        },
    )
}

fn fail_exec(p: &Plan, errno: Errno) -> ! {
    sys::write_all(
        p.err_write,
        &Msg {
            stage: Stage::Exec,
            errno,
        }
        .encode(),
    );
    let code = if errno == Errno::ENOENT {
        crate::error::EXIT_NOT_FOUND
    } else {
        crate::error::EXIT_CANNOT_EXECUTE
    };
    // SAFETY: _exit ends the process.
    unsafe { libc::_exit(code) }
}

/// Drop everything init does not need and exec it from its sealed memfd.
unsafe fn exec_init(p: &Plan, command: libc::pid_t, ready_write: RawFd) -> ! {
    // Move the descriptors init keeps to high numbers first, so placing
    // them at 3 and 4 cannot clobber one another.
    let high = |fd: RawFd| {
        // SAFETY: plain fcntl on a descriptor we own.
        let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
        if r < 0 {
            fail(p, Stage::ExecInit, Errno::last())
        }
        r
    };
    let init = high(p.init_fd);
    let status = high(p.status_write);
    let ready = high(ready_write);
    // SAFETY: dup2/open/close_range on descriptors we own.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 {
            fail(p, Stage::ExecInit, Errno::last());
        }
        let null = high(null);
        for (src, dst) in [(status, 3), (ready, 4), (null, 0), (null, 1), (null, 2)] {
            check(libc::dup2(src, dst).into()).or_fail(p, Stage::ExecInit);
        }
        check(libc::syscall(
            libc::SYS_close_range,
            5u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ))
        .or_fail(p, Stage::ExecInit);
    }
    // Init needs no capability at all.
    sys::capset(0, 0, 0).or_fail(p, Stage::ExecInit);
    let mut digits = [0u8; 12];
    let n = sys::itoa(command.cast_unsigned(), &mut digits);
    let mut arg1 = [0u8; 13];
    arg1[..n.len()].copy_from_slice(n);
    let argv = [
        c"kiln-init".as_ptr(),
        arg1.as_ptr().cast(),
        std::ptr::null(),
    ];
    let errno = sys::exec_fd(init, &argv);
    // The error pipe is still open here (close-on-exec), so report.
    fail(p, Stage::ExecInit, errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = Msg {
            stage: Stage::MountProc,
            errno: Errno::EPERM,
        };
        assert_eq!(Msg::decode(&m.encode()), Some(m));
        let n = u32::try_from(Stage::ALL.len()).unwrap();
        for v in 1..=n {
            let s = Stage::from_u32(v).expect("every stage decodes");
            assert_eq!(s as u32 + 1, v);
            assert!(!s.to_string().is_empty());
        }
        assert_eq!(Stage::from_u32(n + 1), None);
        assert_eq!(Stage::from_u32(0), None);
    }
}
