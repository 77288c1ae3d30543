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
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;

use kiln_sys::check;

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
    // PID 1, in the order of `run`'s steps
    DisableCoreDumps => "disabling core dumps",
    StartNetHelper => "starting the helper that makes the network namespace",
    WaitForParent => "waiting for the id maps",
    BecomeRoot => "becoming root in the user namespace",
    DieWithParent => "arranging to die with kiln (the parent-death signal)",
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
    DropBoundingSet => "dropping the capability bounding set",
    ClearAmbient => "clearing ambient capabilities",
    NoNewPrivs => "setting no_new_privs",
    NetNamespace => "making the network namespace",
    MountSys => "mounting /sys",
    SpecMount => "mounting a spec mount",
    PrivateNode => "mounting a secret or agent socket in its private tmpfs",
    ReadonlyRootfs => "making the rootfs read-only",
    Rlimit => "setting resource limits",
    PivotRoot => "pivot_root into the rootfs",
    DetachOldRoot => "detaching the old root",
    MaskPath => "masking a /proc or /sys path",
    ReadonlyPath => "making a /proc path read-only",
    Loopback => "bringing up loopback",
    BlockRoutes => "blocking link-local and host addresses in the network namespace",
    LandlockScope => "scoping abstract unix sockets and signals with Landlock",
    Seccomp => "installing the seccomp filter",
    ForkCommand => "forking the command",
    ExecInit => "executing kiln-init",
    // the command, in the order of `command`'s steps
    SetGroups => "setting supplementary groups",
    SetGid => "setting the gid",
    SetUid => "setting the uid",
    Capabilities => "setting capabilities",
    Stdio => "setting up standard streams",
    Chdir => "changing to the working directory",
    CwdOutsideRoot => "checking that the working directory is inside the rootfs",
    CoreLimit => "restoring the core dump limit",
    Exec => "executing the command",
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
                 masked or read-only submounts, as inside a container. Run kiln's container with /proc \
                 unmasked: podman --security-opt unmask=/proc/*, docker --security-opt \
                 systempaths=unconfined, or Kubernetes securityContext.procMount: Unmasked with \
                 hostUsers: false)"
            }
            (Stage::Hostname, Errno::EPERM) => {
                " (the seccomp profile kiln runs under refuses sethostname in the step's own UTS \
                 namespace, as the default profiles of Docker, Podman and Kubernetes do. Run kiln's \
                 container with kiln's profile, Moby's default plus what kiln's sandbox setup calls: \
                 podman/docker --security-opt seccomp=deploy/seccomp.json (in kiln's repository), \
                 Kubernetes securityContext.seccompProfile type Localhost with that file; every step \
                 still gets kiln's own profile)"
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
    /// /dev/shm's tmpfs options (mode and size)
    pub shm: CString,
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
    // the report is all we can do: a failure to send it leaves the exit
    // status alone to tell
    let _ = kiln_sys::write_all(p.err_write, &Msg { stage, errno }.encode());
    // SAFETY: _exit takes no pointers, touches no memory of ours and never
    // returns.
    unsafe { libc::_exit(crate::error::EXIT_SANDBOX_FAILURE) }
}

/// Fail fast: the value of a step, or a report of `stage` and exit.
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

impl<T> OrFail<T> for io::Result<T> {
    fn or_fail(self, p: &Plan, stage: Stage) -> T {
        // an io::Error made from an errno holds just the number: no
        // allocation on the way to the report
        self.map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .or_fail(p, stage)
    }
}

/// openat relative to `dir` without following a final symlink; a missing
/// mount point directory is created (as runc does). No allocation.
fn open_mountpoint_dir(dir: RawFd, name: &CStr) -> Result<RawFd, Errno> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is a &CStr, NUL-terminated and borrowed for the whole
    // block; openat and mkdirat only read it, and a closed `dir` fails with
    // EBADF.
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
    // SAFETY: close takes no pointer; callers pass a descriptor they opened
    // (or inherited) and close it once, and no OwnedFd in this process holds
    // it.
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
        Some(p.shm.as_c_str()),
    )
    .or_fail(p, Stage::MountDevShm);
    for (target, name) in DEV_LINKS {
        // SAFETY: both strings are NUL-terminated; a failure only means a
        // missing convenience link.
        unsafe { libc::symlinkat(target.as_ptr(), dev, name.as_ptr()) };
    }
    close(dev);
}

/// Step 17a: the spec's bind and tmpfs mounts, each target resolved inside
/// the rootfs as a descriptor so no symlink in the image can redirect it.
fn setup_spec_mounts(p: &Plan, root: RawFd) -> Result<(), Errno> {
    for m in &p.mounts {
        let dir = match &m.kind {
            MountKind::Bind { tree } => is_dir_fd(*tree),
            MountKind::Tmpfs { .. } => true,
        };
        let fd = open_or_make_dest(root, &m.dest, dir)?;
        match &m.kind {
            MountKind::Bind { tree } => sys::move_mount_fd(*tree, fd)?,
            MountKind::Tmpfs { data } => sys::mount(
                Some(c"tmpfs"),
                FdPath::new(fd).as_cstr(),
                Some(c"tmpfs"),
                m.flags,
                Some(data),
            )?,
        }
        close(fd);
    }
    Ok(())
}

fn is_dir_fd(fd: RawFd) -> bool {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open (the caller holds it) and `st` is ours.
    let rc = unsafe { libc::fstat(fd, &raw mut st) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Open mount destination `dest` inside `root`; when it is missing (the
/// caller made every mount point in the rootfs, so it is inside an
/// earlier mount of this step, as a cache mount inside another), create
/// it there as runc does: missing directories, then the last component
/// as a directory (`dir`) or an empty file. Each component is looked up
/// with RESOLVE_IN_ROOT and created with mkdirat/openat on its parent,
/// which never follow a symlink at the new name. No allocation: paths
/// are copied into stack buffers.
fn open_or_make_dest(root: RawFd, dest: &CStr, dir: bool) -> Result<RawFd, Errno> {
    match sys::open_path_in_root(root, dest) {
        Err(Errno::ENOENT) => {}
        r => return r,
    }
    let bytes = dest.to_bytes();
    let mut prefix = [0u8; 4096];
    let mut name = [0u8; 256];
    if bytes.len() >= prefix.len() {
        return Err(Errno::ENAMETOOLONG);
    }
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i] == b'/' {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'/' {
            i += 1;
        }
        let comp = &bytes[start..i];
        if comp.is_empty() || comp == b"." || comp == b".." {
            continue;
        }
        let last = bytes[i..].iter().all(|&b| b == b'/');
        // the parent: "/" followed by the components before this one
        prefix[0] = b'/';
        prefix[1..=start].copy_from_slice(&bytes[..start]);
        prefix[start + 1] = 0;
        let parent_path = CStr::from_bytes_until_nul(&prefix).map_err(|_| Errno::EINVAL)?;
        let parent = sys::openat2(
            root,
            parent_path,
            libc::O_PATH | libc::O_DIRECTORY,
            sys::RESOLVE_IN_ROOT | sys::RESOLVE_NO_MAGICLINKS,
        )?;
        if comp.len() >= name.len() {
            close(parent);
            return Err(Errno::ENAMETOOLONG);
        }
        name[..comp.len()].copy_from_slice(comp);
        name[comp.len()] = 0;
        let n = CStr::from_bytes_until_nul(&name).map_err(|_| Errno::EINVAL)?;
        let made = kiln_sys::create_at(parent, n, dir || !last);
        close(parent);
        match made {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            _ => {}
        }
    }
    sys::open_path_in_root(root, dest)
}

/// Where a private node is staged, in the /dev kiln just made.
const STAGING: &CStr = c".kiln-private";
/// The node's name in its staging tmpfs.
const NODE: &CStr = c"node";

/// Step 17b: each private node: a tmpfs mounted on a staging directory in
/// the /dev kiln just made (a tmpfs of this sandbox, never written to
/// disk), the node created in it, bound read-only onto its target, and the
/// staging mount detached again. The bind keeps the tmpfs alive for the
/// step's lifetime; nothing else anywhere names it, so the node's bytes
/// exist only in memory and only in this mount namespace.
fn setup_private_nodes(p: &Plan, root: RawFd) -> io::Result<()> {
    if p.private.is_empty() {
        return Ok(());
    }
    let dev = open_mountpoint_dir(root, c"dev")?;
    for n in &p.private {
        let top = mount_staging_tmpfs(dev, n)?;
        match &n.content {
            NodeContent::File(bytes) => create_file_node(top, n, bytes)?,
            NodeContent::Socket { sink } => create_socket_node(top, n, *sink)?,
        }
        bind_node(root, top, n)?;
        unmount_staging(dev, top)?;
    }
    close(dev);
    Ok(())
}

/// A fresh tmpfs for node `n` on the staging directory in `dev`; returns a
/// directory descriptor of its root.
fn mount_staging_tmpfs(dev: RawFd, n: &PrivateNode) -> io::Result<RawFd> {
    // SAFETY: STAGING is a NUL-terminated literal; `dev` is the /dev
    // directory fd the caller keeps open.
    Errno::result(unsafe { libc::mkdirat(dev, STAGING.as_ptr(), 0o700) })?;
    let covered = open_mountpoint_dir(dev, STAGING)?;
    sys::mount(
        Some(c"tmpfs"),
        FdPath::new(covered).as_cstr(),
        Some(c"tmpfs"),
        n.flags,
        Some(&n.data),
    )?;
    close(covered);
    // SAFETY: STAGING is a NUL-terminated literal; `dev` is open (above),
    // and the name now resolves to the new tmpfs's root.
    let top = unsafe {
        libc::openat(
            dev,
            STAGING.as_ptr(),
            libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    check(top)?;
    Ok(top)
}

/// A secret: a new file in the staging tmpfs `top` holding `bytes`, with
/// the node's owner and mode.
fn create_file_node(top: RawFd, n: &PrivateNode, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: NODE is a NUL-terminated literal; `top` is the staging tmpfs
    // directory the caller keeps open.
    let f = Errno::result(unsafe {
        libc::openat(
            top,
            NODE.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o000,
        )
    })?;
    kiln_sys::write_all(f, bytes)?;
    // SAFETY: fchown and fchmod take the descriptor just opened and
    // integers, no pointer.
    Errno::result(unsafe { libc::fchown(f, n.uid, n.gid) })?;
    // SAFETY: fchmod takes the descriptor `f` opened above and an integer, no
    // pointer.
    Errno::result(unsafe { libc::fchmod(f, n.mode) })?;
    close(f);
    Ok(())
}

/// An agent socket: a listening unix socket in the staging tmpfs `top`
/// with the node's owner and mode, its descriptor sent over `sink`.
fn create_socket_node(top: RawFd, n: &PrivateNode, sink: RawFd) -> io::Result<()> {
    let s = sys::listen_unix_at(top, NODE)?;
    // SAFETY: NODE is a NUL-terminated literal; `top` is the staging tmpfs
    // directory the caller keeps open.
    Errno::result(unsafe {
        libc::fchownat(top, NODE.as_ptr(), n.uid, n.gid, libc::AT_SYMLINK_NOFOLLOW)
    })?;
    // SAFETY: NODE is a NUL-terminated literal and `top` the staging directory
    // the caller keeps open; fchmodat only reads the name.
    Errno::result(unsafe { libc::fchmodat(top, NODE.as_ptr(), n.mode, 0) })?;
    sys::send_fd(sink, s)?;
    close(s);
    Ok(())
}

/// The node in `top` bound onto its destination in the rootfs, then the
/// bind remounted read-only with the node's flags.
fn bind_node(root: RawFd, top: RawFd, n: &PrivateNode) -> io::Result<()> {
    // SAFETY: NODE is a NUL-terminated literal; `top` is the staging tmpfs
    // directory the caller keeps open.
    let node = Errno::result(unsafe {
        libc::openat(
            top,
            NODE.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    let target = sys::open_path_in_root(root, &n.dest)?;
    sys::mount(
        Some(FdPath::new(node).as_cstr()),
        FdPath::new(target).as_cstr(),
        None,
        libc::MS_BIND,
        None,
    )?;
    close(target);
    let bound = sys::open_path_in_root(root, &n.dest)?;
    sys::mount(
        None,
        FdPath::new(bound).as_cstr(),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | n.flags,
        None,
    )?;
    close(bound);
    close(node);
    Ok(())
}

/// The staging mount `top` detached and its directory in `dev` removed;
/// the node's bind keeps the tmpfs alive.
fn unmount_staging(dev: RawFd, top: RawFd) -> io::Result<()> {
    // SAFETY: FdPath yields a NUL-terminated /proc/self/fd path on our
    // stack, alive for the call.
    Errno::result(unsafe { libc::umount2(FdPath::new(top).as_cstr().as_ptr(), libc::MNT_DETACH) })?;
    close(top);
    // SAFETY: STAGING is a NUL-terminated literal; `dev` is the /dev
    // directory fd the caller keeps open.
    Errno::result(unsafe { libc::unlinkat(dev, STAGING.as_ptr(), libc::AT_REMOVEDIR) })?;
    Ok(())
}

/// Step 11: binfmt_misc of this user namespace over the fresh
/// /proc/sys/fs/binfmt_misc, one registration per emulator, then remounted
/// read-only so the command cannot add, remove or disable an entry. The
/// registrations live as long as this mount (a detached staging mount
/// loses them), and the kernel resolves each interpreter now, while the
/// host's root is still ours (flag `F`).
fn setup_binfmt(p: &Plan, root: RawFd) -> io::Result<()> {
    if p.binfmt.is_empty() {
        return Ok(());
    }
    const DIR: &CStr = c"proc/sys/fs/binfmt_misc";
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let covered = sys::open_path_in_root(root, DIR)?;
    sys::mount(
        Some(c"binfmt_misc"),
        FdPath::new(covered).as_cstr(),
        Some(c"binfmt_misc"),
        flags,
        None,
    )?;
    close(covered);
    let top = sys::open_path_in_root(root, DIR)?;
    // SAFETY: a NUL-terminated literal relative to `top`, the new
    // instance's root, open until the end of this function.
    let register = Errno::result(unsafe {
        libc::openat(
            top,
            c"register".as_ptr(),
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    for line in &p.binfmt {
        // one write per registration: the kernel parses each write whole
        kiln_sys::write_all(register, line.as_bytes())?;
    }
    close(register);
    sys::mount(
        None,
        FdPath::new(top).as_cstr(),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | flags,
        None,
    )?;
    close(top);
    Ok(())
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
/// become kiln-init. One numbered step per call, as a checklist; each step
/// that can fail names its own [`Stage`], and the first failure ends the
/// sandbox (see `fail`).
///
/// # Safety
/// Must only be called in the child of `sys::clone_vm` or
/// `sys::clone3_fork` (see there).
pub unsafe fn run(p: &Plan) -> ! {
    // Where the network helper leaves its namespace: on this frame, which
    // outlives the helper (reaped in step 15).
    let netns = NetNs {
        fd: AtomicI32::new(-1),
    };
    // 1. No core dumps until the command's exec (kiln's memory holds
    //    secrets, and a core would land in the step's layer).
    let core = disable_core_dumps().or_fail(p, Stage::DisableCoreDumps);
    // 2. Start making the network namespace beside steps 3 to 14.
    let net_helper = start_net_helper(p, &netns).or_fail(p, Stage::StartNetHelper);
    // 3. Wait until the parent has written our uid and gid maps.
    wait_for_parent(p).or_fail(p, Stage::WaitForParent);
    // 4. Become uid/gid 0 of the new namespace, without host groups.
    become_root(p).or_fail(p, Stage::BecomeRoot);
    // 5. Die with kiln (after the id change, which clears the signal).
    die_with_parent(p).or_fail(p, Stage::DieWithParent);
    // 6. Hostname of the new UTS namespace.
    set_hostname(p).or_fail(p, Stage::Hostname);
    // 7. Nothing we mount may propagate back to the host.
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .or_fail(p, Stage::MakeMountsPrivate);
    // 8. The rootfs becomes a mount point of its own (pivot_root needs one).
    bind_rootfs(p).or_fail(p, Stage::BindRootfs);
    // 9. A descriptor of it, which every later mount resolves against.
    let root = open_rootfs(p).or_fail(p, Stage::OpenRootfs);
    // 10. A fresh /proc for the new PID namespace.
    mount_proc(root).or_fail(p, Stage::MountProc);
    // 11. Emulators of foreign architectures in our own binfmt_misc.
    setup_binfmt(p, root).or_fail(p, Stage::Binfmt);
    // 12. /dev with only safe devices (a stage per mount and device node).
    setup_dev(p, root);
    // 13. Signal dispositions as a fresh process has them, for kiln-init
    //     and the command alike (the command unblocks the mask itself).
    reset_dispositions();
    // 14. Bounding and ambient capability sets and no_new_privs, shared by
    //     init and the command.
    drop_bounding_set(p).or_fail(p, Stage::DropBoundingSet);
    clear_ambient().or_fail(p, Stage::ClearAmbient);
    set_no_new_privs().or_fail(p, Stage::NoNewPrivs);
    // 15. Join the network namespace the helper made.
    if let Some(pid) = net_helper {
        join_netns(pid, &netns).or_fail(p, Stage::NetNamespace);
    }
    // 16. /sys, read-only, while the host's is still in our namespace.
    mount_sys(p, root).or_fail(p, Stage::MountSys);
    // 17. The spec's bind and tmpfs mounts, then secrets and agent sockets
    //     each in a tmpfs of its own: after /sys, which would hide any of
    //     them aimed under it.
    setup_spec_mounts(p, root).or_fail(p, Stage::SpecMount);
    setup_private_nodes(p, root).or_fail(p, Stage::PrivateNode);
    // 18. The rootfs read-only when asked, now that mount points are made.
    remount_rootfs_readonly(p).or_fail(p, Stage::ReadonlyRootfs);
    // 19. Resource limits, after every descriptor the mounts needed; the
    //     core limit is the command's alone (step 1).
    let core = set_rlimits(p, core).or_fail(p, Stage::Rlimit);
    // 20. pivot_root into the rootfs.
    pivot_root(root).or_fail(p, Stage::PivotRoot);
    // 21. Detach the old root entirely.
    detach_old_root().or_fail(p, Stage::DetachOldRoot);
    close(root);
    // 22. Masked and read-only paths in the fresh /proc and /sys (a stage
    //     for each kind).
    mask_paths(p);
    // 23. Loopback up in a network namespace the clone made.
    loopback_up(p).or_fail(p, Stage::Loopback);
    // 24. Under `sandbox`, no route to link-local and host addresses.
    block_routes(p).or_fail(p, Stage::BlockRoutes);
    // 25. Landlock scopes for abstract unix sockets and signals.
    landlock_scope(p).or_fail(p, Stage::LandlockScope);
    // 26. seccomp, once for both init and the command.
    install_seccomp(p).or_fail(p, Stage::Seccomp);
    // 27. Fork the command; it waits until init is non-dumpable.
    let mut ready = [0 as RawFd; 2];
    // SAFETY: `ready` is a writable array of two descriptors, as pipe2
    // fills.
    check(unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) })
        .or_fail(p, Stage::ForkCommand);
    // Read by a command that shares our memory, possibly after we exec'd:
    // it lives in this function's frame, which is never left, not in a
    // callee's (whose slot the rest of this function could reuse).
    let args = CommandArgs {
        plan: p,
        ready: ready[0],
        ready_write: ready[1],
        core,
    };
    // SAFETY: we are PID 1 of the sandbox, single-threaded, and `args`
    // stays on this frame, which is never left.
    let pid = unsafe { fork_command(&args) }.or_fail(p, Stage::ForkCommand);
    close(ready[0]);
    // 28. Become kiln-init.
    // SAFETY: exec_init's contract holds: this is PID 1 of the sandbox,
    // single-threaded (the clone copied one thread), on the allocation-free
    // child path.
    unsafe { exec_init(p, pid, ready[1]) }
}

/// Step 8: the rootfs bound onto itself.
fn bind_rootfs(p: &Plan) -> Result<(), Errno> {
    sys::mount(
        Some(&p.rootfs),
        &p.rootfs,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )
}

/// Step 10: proc on the rootfs's /proc. The mount point is opened without
/// following symlinks, so an image whose /proc is a symlink cannot
/// redirect the mount (runc CVE-2019-19921 class).
fn mount_proc(root: RawFd) -> Result<(), Errno> {
    mount_fs_at(
        root,
        c"proc",
        c"proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}

/// Step 23: loopback up in a network namespace the clone made (the helper
/// brought up its own).
fn loopback_up(p: &Plan) -> Result<(), Errno> {
    if p.new_net && p.net_helper_stack.is_none() {
        sys::loopback_up()?;
    }
    Ok(())
}

/// Step 24: under `sandbox`, prohibit rules for link-local addresses (the
/// cloud metadata service) and the host's own addresses, before
/// capabilities drop: the step cannot remove them without CAP_NET_ADMIN,
/// and no route (the stack's, or one it copies from the host) gets past
/// them.
fn block_routes(p: &Plan) -> Result<(), Errno> {
    if p.blocked.prefixes.is_empty() {
        return Ok(());
    }
    sys::block(&p.blocked)
}

/// Step 25: Landlock scopes: no connecting to abstract unix sockets and no
/// signals outside the step, even with network=host, where the host's
/// abstract sockets share the network namespace (containerd CVE-2020-15257
/// class). Kernels before 6.12 lack scopes; the step's own network
/// namespace covers the default case there.
fn landlock_scope(p: &Plan) -> Result<(), Errno> {
    if !p.landlock_scope {
        return Ok(());
    }
    sys::landlock_scope()
}

/// Step 26: the seccomp programs, once for both processes: the filter is
/// inherited by the fork of step 27, and what the command still does
/// before exec (ids, capabilities, cwd, streams) is all in the allowlist.
/// Installing it once instead of twice saves a BPF compile per step.
fn install_seccomp(p: &Plan) -> Result<(), Errno> {
    p.seccomp
        .iter()
        .try_for_each(|prog| sys::seccomp_install(prog))
}

/// Step 1: the core limit set to zero (keeping its hard limit); returns
/// the limit as it was, for the command. A crash of the setup code would
/// otherwise write kiln's memory (secrets included) into the step's
/// working directory, and so into its layer; the command gets the limit
/// back (or the spec's) just before its exec.
fn disable_core_dumps() -> io::Result<libc::rlimit> {
    let mut core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `core` is a writable rlimit on our stack.
    check(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut core) })?;
    let off = libc::rlimit {
        rlim_cur: 0,
        rlim_max: core.rlim_max,
    };
    // SAFETY: `off` is a readable rlimit on our stack.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &off) })?;
    Ok(core)
}

/// Step 2: clone the network helper when the plan has a stack for it. A
/// network namespace takes longer to make than anything else in the
/// sandbox, so the helper makes it while PID 1 sets up the mounts.
fn start_net_helper(p: &Plan, netns: &NetNs) -> Result<Option<libc::pid_t>, Errno> {
    let Some(stack) = &p.net_helper_stack else {
        return Ok(None);
    };
    // SAFETY: `netns_helper` keeps the clone_vm contract: a few
    // async-signal-safe calls, no id change, no memory written but its
    // stack and `netns`, which stays on `run`'s frame until it is reaped
    // (step 15).
    unsafe {
        sys::clone_vm(
            libc::CLONE_FILES,
            stack,
            netns_helper,
            std::ptr::from_ref(netns).cast_mut().cast(),
            None,
        )
    }
    .map(Some)
}

/// Step 3: wait for the parent's go. The clone copied the parent's write
/// end of the pipe: close it, so a parent killed before releasing us reads
/// as EOF instead of a wait forever (and watch its pidfd too, for any
/// other copy). A parent that died first leaves nobody to tell: exit.
fn wait_for_parent(p: &Plan) -> Result<(), Errno> {
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
    // SAFETY: `pfd` is a writable array of two pollfds on our stack.
    while unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) } < 0 {
        if Errno::last() != Errno::EINTR {
            return Err(Errno::last());
        }
    }
    if pfd[0].revents & libc::POLLIN == 0 {
        exit_silently();
    }
    let mut byte = [0u8; 1];
    match sys::read_full(p.sync_read, &mut byte)? {
        1 => {}
        _ => return Err(Errno::EPIPE),
    }
    close(p.sync_read);
    Ok(())
}

/// Exit with the sandbox-failure status without a report: the parent is
/// gone.
fn exit_silently() -> ! {
    // SAFETY: _exit takes no pointers, touches no memory of ours and never
    // returns.
    unsafe { libc::_exit(crate::error::EXIT_SANDBOX_FAILURE) }
}

/// Step 4: uid and gid 0 of the new namespace, no supplementary groups.
/// Raw syscalls: glibc's wrappers broadcast id changes to every thread it
/// believes exists, and threads of the parent that were not copied by the
/// clone would never answer.
fn become_root(p: &Plan) -> io::Result<()> {
    if p.can_setgroups {
        // SAFETY: a zero-length list, so the kernel reads no memory through
        // the null pointer.
        check(unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) })?;
    }
    // SAFETY: setresgid takes integers only, no pointer.
    check(unsafe { libc::syscall(libc::SYS_setresgid, 0, 0, 0) })?;
    // SAFETY: setresuid takes integers only, no pointer.
    check(unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) })
}

/// Step 5: SIGKILL when the process that started us dies (even by
/// SIGKILL): the kernel kills us, PID 1, and with us every process of the
/// namespace. Set after the id change, which clears it; a parent that died
/// before this point is caught by polling its pidfd: then exit.
fn die_with_parent(p: &Plan) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number, no pointer.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })?;
    let mut pfd = [libc::pollfd {
        fd: p.parent_pidfd,
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: `pfd` is a writable array of one pollfd on our stack.
    if unsafe { libc::poll(pfd.as_mut_ptr(), 1, 0) } != 0 {
        exit_silently();
    }
    Ok(())
}

/// Step 6: the spec's hostname, if it names one.
fn set_hostname(p: &Plan) -> io::Result<()> {
    let Some(h) = &p.hostname else {
        return Ok(());
    };
    // SAFETY: `h` is a CString of the plan, readable for its length.
    check(unsafe { libc::sethostname(h.as_ptr(), h.as_bytes().len()) })
}

/// Step 9: the rootfs as a directory descriptor.
fn open_rootfs(p: &Plan) -> io::Result<RawFd> {
    // SAFETY: `rootfs` is a NUL-terminated CString owned by the plan.
    let root = unsafe {
        libc::open(
            p.rootfs.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    check(root)?;
    Ok(root)
}

/// Step 14a: drop every capability the spec's bounding set leaves out.
fn drop_bounding_set(p: &Plan) -> io::Result<()> {
    for cap in 0..=p.last_cap {
        if p.bounding & (1u64 << cap) == 0 {
            // SAFETY: PR_CAPBSET_DROP takes a capability number, no pointer.
            check(unsafe {
                libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0)
            })?;
        }
    }
    Ok(())
}

/// Step 14b: no ambient capabilities.
fn clear_ambient() -> io::Result<()> {
    // SAFETY: PR_CAP_AMBIENT takes integers only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })
}

/// Step 14c: no_new_privs, so no exec can gain privileges.
fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// Step 16: sysfs on /sys, read-only: the kernel allows sysfs only with a
/// network namespace of our own, and only while the host's /sys is still
/// in our mount namespace (before pivot_root). Without one, or when the
/// kernel refuses (EPERM), /sys stays empty rather than exposing the
/// host's.
fn mount_sys(p: &Plan, root: RawFd) -> Result<(), Errno> {
    if !p.new_net {
        return Ok(());
    }
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    match mount_fs_at(root, c"sys", c"sysfs", flags, None) {
        Ok(()) | Err(Errno::EPERM) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Step 18: the rootfs read-only when the spec asks for it.
fn remount_rootfs_readonly(p: &Plan) -> Result<(), Errno> {
    if !p.rootfs_readonly {
        return Ok(());
    }
    sys::mount(
        None,
        &p.rootfs,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        None,
    )
}

/// Step 19: the spec's resource limits but the core limit, which is
/// returned (the spec's, or `core` as it was) for the command to set.
fn set_rlimits(p: &Plan, mut core: libc::rlimit) -> io::Result<libc::rlimit> {
    for (res, lim) in &p.rlimits {
        if *res == libc::RLIMIT_CORE {
            core = *lim;
            continue;
        }
        // SAFETY: `lim` is a readable rlimit owned by the plan.
        check(unsafe { libc::setrlimit(*res, lim) })?;
    }
    Ok(core)
}

/// Step 20: the rootfs `root` becomes `/`, the old root stacked on it.
fn pivot_root(root: RawFd) -> io::Result<()> {
    // SAFETY: fchdir takes a descriptor (`root`, open since step 9).
    check(unsafe { libc::fchdir(root) })?;
    // SAFETY: both arguments are NUL-terminated string literals.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) })
}

/// Step 21: the old root, stacked on `/` by pivot_root, detached.
fn detach_old_root() -> io::Result<()> {
    // SAFETY: a NUL-terminated string literal.
    check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })?;
    // SAFETY: a NUL-terminated string literal.
    check(unsafe { libc::chdir(c"/".as_ptr()) })
}

/// Step 27: start the command process (see [`start_command`]), cloned
/// into our memory when the plan has a stack for it, else forked.
///
/// # Safety
/// Only in PID 1 of the sandbox, single-threaded, with `args` on a frame
/// that is never left (a command sharing our memory reads it later).
unsafe fn fork_command(args: &CommandArgs) -> Result<libc::pid_t, Errno> {
    // Sharing memory with us (and kiln) like this process does: the
    // command keeps our ids, so it cannot make that memory non-dumpable.
    if let Some(stack) = &args.plan.command_stack {
        // SAFETY: `command_entry` keeps the clone_vm contract (see
        // `command`); the plan and both stacks outlive this sandbox's PID
        // namespace, which dies with us, and `args` outlives the child (the
        // caller's contract).
        return unsafe {
            sys::clone_vm(
                0,
                stack,
                command_entry,
                std::ptr::from_ref(args).cast_mut().cast(),
                None,
            )
        };
    }
    // A raw clone, not glibc's fork: fork runs atfork handlers that take
    // malloc's locks, which another thread of the parent may have held at
    // the moment of our own clone.
    // SAFETY: this process is single-threaded (the caller's contract); the
    // child only makes async-signal-safe calls and leaves by exec or _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
    let pid = libc::pid_t::try_from(pid).unwrap_or(-1);
    if pid < 0 {
        return Err(Errno::last());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked command process.
        unsafe { start_command(args) }
    }
    Ok(pid)
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
    // SAFETY: unshare takes a flag only; open reads a NUL-terminated literal.
    // The descriptor it returns lands in the file table shared with PID 1
    // (CLONE_FILES), which reads it after reaping us.
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

/// Step 15: reap the network helper and move into the namespace it made;
/// nothing of the step has run yet, and without it the step fails.
fn join_netns(pid: libc::pid_t, netns: &NetNs) -> Result<(), Errno> {
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` is a writable int on our
    // stack.
    while unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } < 0 {
        if Errno::last() != Errno::EINTR {
            return Err(Errno::last());
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        libc::EIO
    };
    if code != 0 {
        return Err(Errno::from_raw(code));
    }
    let fd = netns.fd.load(Ordering::Acquire);
    // SAFETY: setns takes a descriptor (the namespace the helper opened in
    // our shared file table) and a flag, no pointer.
    Errno::result(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })?;
    close(fd);
    Ok(())
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
    // SAFETY: `args.plan` and `args.core` live in PID 1's plan and frame for
    // the sandbox's lifetime (see `CommandArgs`), and we are the command
    // process just made, as `command` requires.
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
    // SAFETY: setgroups reads `p.groups.len()` gids from the plan's Vec, alive
    // for the sandbox's lifetime; setresgid, setresuid and prctl take integers
    // only.
    unsafe {
        if p.can_setgroups {
            check(libc::syscall(
                libc::SYS_setgroups,
                p.groups.len(),
                p.groups.as_ptr(),
            ))
            .or_fail(p, Stage::SetGroups);
        }
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)).or_fail(p, Stage::SetUid);
        check(libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid)).or_fail(p, Stage::SetGid);
        check(libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid)).or_fail(p, Stage::SetUid);
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0)).or_fail(p, Stage::SetUid);
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
            // SAFETY: dup2 takes two descriptors, no pointer: `fd` is a stream
            // the parent keeps open until the clone, inherited here, and 0..2
            // are ours to replace.
            check(unsafe { libc::dup2(*fd, target) }).or_fail(p, Stage::Stdio);
        }
    }
    close_all_but(p.err_write).or_fail(p, Stage::Stdio);

    // e. umask and working directory (inside the new root), and proof that
    //    it is: a directory outside the root has no path from it, and the
    //    raw getcwd says "(unreachable)" instead of a path.
    // SAFETY: umask takes an integer; chdir reads the plan's NUL-terminated
    // `cwd`; getcwd writes at most `buf.len()` bytes into `buf` on our stack.
    unsafe {
        if let Some(m) = p.umask {
            libc::umask(m);
        }
        check(libc::chdir(p.cwd.as_ptr())).or_fail(p, Stage::Chdir);
        let mut buf = [0u8; 4096];
        let n = libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len());
        if n <= 0 || buf[0] != b'/' {
            fail(p, Stage::CwdOutsideRoot, Errno::EXDEV);
        }
    }

    // f. Signals as a fresh process has them: PID 1 reset the dispositions
    //    before it cloned us (step 13); the mask, which kiln set to block
    //    the signals it forwards and which would survive exec, is cleared
    //    here.
    // SAFETY: an empty, initialised set unblocks every signal.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }

    // g. The core limit back (see step 1), then exec, searching PATH as
    //    execvp does.
    // SAFETY: `core` is a valid rlimit.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, core) }).or_fail(p, Stage::CoreLimit);
    exec_command(p)
}

/// Close every descriptor from 3 up except `keep`.
fn close_all_but(keep: RawFd) -> io::Result<()> {
    let close_range = |first: u32, last: u32| {
        // SAFETY: close_range takes integers only; no object of this process
        // uses the descriptors it closes (the command execs next).
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
            // SAFETY: `dfl` is a readable sigaction on our stack for the call,
            // the old-action pointer is null, and 8 is the size of the
            // kernel's sigset; a number that is no signal fails with EINVAL.
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
    let _ = kiln_sys::write_all(
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
    // SAFETY: _exit takes no pointers, touches no memory of ours and never
    // returns.
    unsafe { libc::_exit(code) }
}

/// Drop everything init does not need and exec it from its sealed memfd.
unsafe fn exec_init(p: &Plan, command: libc::pid_t, ready_write: RawFd) -> ! {
    // Move the descriptors init keeps to high numbers first, so placing
    // them at 3 and 4 cannot clobber one another.
    let high = |fd: RawFd| {
        // SAFETY: F_DUPFD_CLOEXEC takes a descriptor and an integer, no
        // pointer; a closed `fd` fails with EBADF.
        let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
        if r < 0 {
            fail(p, Stage::ExecInit, Errno::last())
        }
        r
    };
    let init = high(p.init_fd);
    let status = high(p.status_write);
    let ready = high(ready_write);
    // SAFETY: open reads a NUL-terminated literal; dup2 and close_range take
    // integers only, and no object of this process uses the descriptors from 5
    // up, which exec closes.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 {
            fail(p, Stage::ExecInit, Errno::last());
        }
        let null = high(null);
        for (src, dst) in [(status, 3), (ready, 4), (null, 0), (null, 1), (null, 2)] {
            check(libc::dup2(src, dst)).or_fail(p, Stage::ExecInit);
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

    /// Two stages with the same words would make a report ambiguous.
    #[test]
    fn every_stage_reads_differently() {
        let mut texts: Vec<&str> = Stage::ALL.iter().map(|s| s.text()).collect();
        texts.sort_unstable();
        let n = texts.len();
        texts.dedup();
        assert_eq!(texts.len(), n, "two stages share a message");
    }

    /// Setting the parent-death signal (and checking that the parent is
    /// still alive) was reported as "becoming root in the user namespace",
    /// the step before it: a user chasing an id-map problem for a failure
    /// of prctl. It has its own stage now, and the report says what failed.
    #[test]
    fn the_parent_death_signal_has_its_own_stage() {
        let m = Msg {
            stage: Stage::DieWithParent,
            errno: Errno::EINVAL,
        };
        let back = Msg::decode(&m.encode()).expect("decodes");
        assert_ne!(back.stage, Stage::BecomeRoot);
        let text = back.stage.to_string();
        assert!(text.contains("parent-death signal"), "{text}");
        assert!(!text.contains("root"), "{text}");
    }
}
