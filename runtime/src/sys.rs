//! Raw kernel calls the runtime needs that `nix` does not wrap the way we
//! need them. Everything callable from the sandbox child is allocation-free
//! and async-signal-safe: it takes `&CStr` and fixed buffers, and reports
//! `Errno`. Helpers the snapshotter needs too (C strings, whole writes,
//! the kernel release) live in `kiln-sys`.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;

/// `struct open_how` for openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

pub(crate) const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
pub(crate) const RESOLVE_IN_ROOT: u64 = 0x10;

/// openat2 relative to `dirfd` with `resolve` flags; no allocation.
pub fn openat2(dirfd: RawFd, path: &CStr, flags: i32, resolve: u64) -> Result<RawFd, Errno> {
    let how = OpenHow {
        flags: u64::from(flags.cast_unsigned()) | libc::O_CLOEXEC as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `path` is NUL-terminated, `how` lives across the call and its
    // size is passed exactly; the kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if rc < 0 {
        Err(Errno::last())
    } else {
        RawFd::try_from(rc).map_err(|_| Errno::EBADF)
    }
}

/// Open `path` for reading with every component, symlinks included,
/// resolved inside `root` (RESOLVE_IN_ROOT), as the sandbox would see it.
pub fn open_in_root(root: &Path, path: &str) -> std::io::Result<File> {
    let root = File::open(root)?;
    let rel = std::ffi::CString::new(path.trim_start_matches('/'))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let fd = open_in_root_at(std::os::fd::AsRawFd::as_raw_fd(&root), &rel, libc::O_RDONLY)?;
    Ok(File::from(fd))
}

/// Open `path` with `flags`, every component (symlinks included) resolved
/// inside the directory `rootfd` as if it were `/`: the one way kiln opens
/// a path inside an image, a context or a layer. Returns an owned fd.
pub fn open_in_root_at(rootfd: RawFd, path: &CStr, flags: i32) -> std::io::Result<OwnedFd> {
    let fd = openat2(rootfd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)?;
    // SAFETY: openat2 just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open `path` beneath `rootfd` refusing every symlink, every `..` out
/// of it and every mount crossing (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_XDEV): for touching a path kiln made earlier in a tree a step
/// has since had the run of, where any symlink is the step's doing.
pub fn open_beneath_no_symlinks(
    rootfd: RawFd,
    path: &CStr,
    flags: i32,
) -> std::io::Result<OwnedFd> {
    const RESOLVE_NO_XDEV: u64 = 0x01;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    const RESOLVE_BENEATH: u64 = 0x08;
    let fd = openat2(
        rootfd,
        path,
        flags,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    )?;
    // SAFETY: openat2 just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A detached copy of the mount tree at `path` (open_tree with
/// OPEN_TREE_CLONE, recursive when asked), with `attrs` (MOUNT_ATTR_*)
/// set on it. Made in the caller's mount namespace, it can be attached
/// in a new one by [`move_mount_fd`]: a bind source resolved once, as an
/// object, never re-resolved by name in the sandbox.
pub fn open_tree_clone(path: &CStr, recursive: bool, attrs: u64) -> std::io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC.cast_unsigned();
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: `path` is NUL-terminated; open_tree returns a new fd or -1.
    let rc = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(rc).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: open_tree just returned this fd and nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    if attrs != 0 {
        #[repr(C)]
        struct MountAttr {
            attr_set: u64,
            attr_clr: u64,
            propagation: u64,
            userns_fd: u64,
        }
        let attr = MountAttr {
            attr_set: attrs,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let mut at = libc::AT_EMPTY_PATH.cast_unsigned();
        if recursive {
            at |= AT_RECURSIVE;
        }
        // SAFETY: `attr` lives across the call and its size is passed
        // exactly; the path is the empty string with AT_EMPTY_PATH.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                std::os::fd::AsRawFd::as_raw_fd(&tree),
                c"".as_ptr(),
                at,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(tree)
}

/// Attach the detached tree `tree` onto the object the descriptor
/// `target` holds (move_mount with both paths empty). No allocation.
pub fn move_mount_fd(tree: RawFd, target: RawFd) -> Result<(), Errno> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
    // SAFETY: both paths are the empty string; the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            target,
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    Errno::result(rc).map(drop)
}

/// Resolve `path` inside the directory `rootfd` (RESOLVE_IN_ROOT) as an
/// O_PATH descriptor: a mount target that cannot escape the root however
/// its components are symlinked.
pub fn open_path_in_root(rootfd: RawFd, path: &CStr) -> Result<RawFd, Errno> {
    openat2(
        rootfd,
        path,
        libc::O_PATH,
        RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    )
}

/// A path of the form `/proc/self/fd/N`, built on the stack. Mounting onto
/// it mounts onto exactly the inode the descriptor holds.
pub struct FdPath {
    buf: [u8; 32],
}

impl FdPath {
    pub fn new(fd: RawFd) -> FdPath {
        let mut buf = [0u8; 32];
        let prefix = b"/proc/self/fd/";
        buf[..prefix.len()].copy_from_slice(prefix);
        let mut digits = [0u8; 12];
        let n = itoa(fd.max(0).cast_unsigned(), &mut digits);
        buf[prefix.len()..prefix.len() + n.len()].copy_from_slice(n);
        FdPath { buf }
    }

    pub fn as_cstr(&self) -> &CStr {
        // The buffer is zero-initialised and at most 14 + 10 bytes are
        // written, so a NUL always terminates it.
        CStr::from_bytes_until_nul(&self.buf).unwrap_or(c"")
    }
}

/// Format `n` in decimal into `buf`, returning the digits.
pub fn itoa(mut n: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// mount(2) with optional source, type and data; no allocation.
pub fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), Errno> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is either null or a NUL-terminated string that
    // outlives the call.
    let rc = unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) };
    Errno::result(rc).map(drop)
}

/// flock(2) on a descriptor the caller owns.
pub fn flock(fd: RawFd, op: libc::c_int) -> Result<(), Errno> {
    // SAFETY: flock takes a descriptor and an integer, no pointer; a closed
    // `fd` fails with EBADF.
    Errno::result(unsafe { libc::flock(fd, op) }).map(drop)
}

/// A listening AF_UNIX stream socket bound at `name` inside the directory
/// `dir`. The address is `/proc/self/fd/<dir>/<name>`, so it fits in
/// `sun_path` however deep the directory is. No allocation.
pub fn listen_unix_at(dir: RawFd, name: &CStr) -> Result<RawFd, Errno> {
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    let dir_path = FdPath::new(dir);
    let parts = [dir_path.as_cstr().to_bytes(), b"/", name.to_bytes()];
    let mut at = 0;
    for part in parts {
        for &b in part {
            // keep the last byte for the terminating NUL
            if at + 1 >= addr.sun_path.len() {
                return Err(Errno::ENAMETOOLONG);
            }
            addr.sun_path[at] = b.cast_signed();
            at += 1;
        }
    }
    // SAFETY: socket, listen and close take integers only; bind reads
    // `addr`, a sockaddr_un on our stack that lives across the call, for
    // exactly its size.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(Errno::last());
        }
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
            .unwrap_or(libc::socklen_t::MAX);
        if libc::bind(s, (&raw const addr).cast(), len) != 0 || libc::listen(s, 64) != 0 {
            let e = Errno::last();
            libc::close(s);
            return Err(e);
        }
        Ok(s)
    }
}

/// Send the descriptor `fd` over the unix socket `sock` (SCM_RIGHTS), with
/// one byte of payload. No allocation: the control message is a fixed
/// struct laid out as CMSG_SPACE(sizeof(int)).
pub fn send_fd(sock: RawFd, fd: RawFd) -> Result<(), Errno> {
    #[repr(C)]
    struct Control {
        hdr: libc::cmsghdr,
        fd: libc::c_int,
        pad: libc::c_int,
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: zeroed C structs are valid starting values.
    let mut control: Control = unsafe { std::mem::zeroed() };
    // SAFETY: CMSG_LEN only computes a length.
    control.hdr.cmsg_len = unsafe { libc::CMSG_LEN(4) } as _; // sizeof(int)
    control.hdr.cmsg_level = libc::SOL_SOCKET;
    control.hdr.cmsg_type = libc::SCM_RIGHTS;
    control.fd = fd;
    // SAFETY: msghdr is plain old data; all-zero is a valid value (null
    // buffers of length 0), filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&raw mut control).cast();
    msg.msg_controllen = std::mem::size_of::<Control>() as _;
    loop {
        // SAFETY: `msg` points at `iov` and `control`, which live across
        // the call and are sized as declared.
        let rc = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(());
        }
        if Errno::last() != Errno::EINTR {
            return Err(Errno::last());
        }
    }
}

/// The kernel's Landlock ABI version; 0 without Landlock.
pub fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no attribute (NULL, size 0).
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

/// Restrict the calling process with a Landlock ruleset that handles no
/// file or network access but scopes abstract unix sockets and signals
/// (ABI 6). No allocation.
pub fn landlock_scope() -> Result<(), Errno> {
    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }
    const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
    const SCOPE_SIGNAL: u64 = 2;
    let attr = RulesetAttr {
        handled_access_fs: 0,
        handled_access_net: 0,
        scoped: SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL,
    };
    // SAFETY: `attr` lives across the call and its size is passed exactly.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: landlock_restrict_self takes the ruleset descriptor just made
    // and flags, no pointer; close takes that descriptor, ours, closed once.
    unsafe {
        let rc = libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32);
        let e = Errno::last();
        libc::close(RawFd::try_from(fd).unwrap_or(-1));
        if rc != 0 {
            return Err(e);
        }
    }
    Ok(())
}

/// Read until `buf` is full or EOF; returns the bytes read.
pub fn read_full(fd: RawFd, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the destination range lies inside `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        match n {
            0 => break,
            n if n < 0 => {
                if Errno::last() == Errno::EINTR {
                    continue;
                }
                return Err(Errno::last());
            }
            n => got += usize::try_from(n).unwrap_or(0),
        }
    }
    Ok(got)
}

/// Execute the program behind `fd` (kiln-init's memfd) with `argv` (a
/// NULL-terminated array) and an empty environment. Returns only on failure.
pub fn exec_fd(fd: RawFd, argv: &[*const libc::c_char]) -> Errno {
    let envp = [std::ptr::null::<libc::c_char>()];
    debug_assert!(argv.last().is_some_and(|p| p.is_null()));
    // SAFETY: argv is NULL-terminated (checked by callers' construction)
    // and points at NUL-terminated strings that outlive the call.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    Errno::last()
}

/// `struct __user_cap_header_struct` / `__user_cap_data_struct` (version 3).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// capset(2) for the calling thread with 64-bit masks.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), Errno> {
    let lo = |m: u64| (m & 0xffff_ffff) as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: lo(effective),
            permitted: lo(permitted),
            inheritable: lo(inheritable),
        },
        CapData {
            effective: hi(effective),
            permitted: hi(permitted),
            inheritable: hi(inheritable),
        },
    ];
    // SAFETY: header and a two-element data array as version 3 requires;
    // the kernel only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    Errno::result(rc).map(drop)
}

/// Install one classic-BPF seccomp filter (no_new_privs must be set).
pub fn seccomp_install(prog: &[libc::sock_filter]) -> Result<(), Errno> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| Errno::E2BIG)?,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel
    // copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    Errno::result(rc).map(drop)
}

/// An address prefix, as a route's destination: the address in network
/// order (an IPv4 one in the first four bytes) and its length in bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub v6: bool,
    pub addr: [u8; 16],
    pub len: u8,
}

impl Prefix {
    pub fn new(ip: std::net::IpAddr, len: u8) -> Prefix {
        let mut addr = [0u8; 16];
        match ip {
            std::net::IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                Prefix {
                    v6: false,
                    addr,
                    len,
                }
            }
            std::net::IpAddr::V6(v6) => Prefix {
                v6: true,
                addr: v6.octets(),
                len,
            },
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip: std::net::IpAddr = if self.v6 {
            std::net::Ipv6Addr::from(self.addr).into()
        } else {
            std::net::Ipv4Addr::new(self.addr[0], self.addr[1], self.addr[2], self.addr[3]).into()
        };
        write!(f, "{ip}/{}", self.len)
    }
}

/// What a network namespace under `sandbox` must not reach, and the one
/// way through: DNS (UDP and TCP port 53) to the stack's forwarder, when
/// that lies in a blocked prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocked {
    pub prefixes: Vec<Prefix>,
    pub dns_forwarder: Option<Prefix>,
}

/// Policy-routing rule priorities: after the local table (0), so the
/// namespace's own addresses stay its own, and before the main table
/// (32766), so no route (one pasta copies from the host, or the kernel's
/// own link-local route) can win over a block.
const RULE_DNS: u32 = 100;
const RULE_BLOCK: u32 = 101;

/// Install `blocked` in the current network namespace as policy-routing
/// rules: `to FORWARDER ipproto udp|tcp dport 53 lookup main` first, then
/// `to PREFIX prohibit` for each prefix (connect and send fail with
/// EACCES). Rules apply before any routing table, whatever routes the
/// namespace has or gets. One rtnetlink socket; async-signal-safe (no
/// allocation). An IPv6 rule in a namespace without IPv6 (EAFNOSUPPORT)
/// is skipped: nothing is reachable there.
pub fn block(blocked: &Blocked) -> Result<(), Errno> {
    // SAFETY: socket(2) takes integers only and returns a new descriptor or
    // -1.
    let sock = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if sock < 0 {
        return Err(Errno::last());
    }
    let mut seq = 0u32;
    let mut send = |p: &Prefix, rule: Rule| {
        seq += 1;
        match add_rule(sock, seq, p, rule) {
            Err(Errno::EAFNOSUPPORT) if p.v6 => Ok(()),
            r => r,
        }
    };
    let result = (|| {
        if let Some(f) = &blocked.dns_forwarder {
            for proto in [libc::IPPROTO_UDP, libc::IPPROTO_TCP] {
                send(f, Rule::Dns(u8::try_from(proto).unwrap_or(0)))?;
            }
        }
        for p in &blocked.prefixes {
            send(p, Rule::Prohibit)?;
        }
        Ok(())
    })();
    // SAFETY: `sock` is ours and closed once.
    unsafe { libc::close(sock) };
    result
}

/// One kind of rule [`block`] adds.
#[derive(Clone, Copy)]
enum Rule {
    /// DNS over this IP protocol to the destination: the main table
    Dns(u8),
    /// everything to the destination: refused
    Prohibit,
}

/// Append one rtattr (type, payload) at `at`, padded to 4 bytes; returns
/// the new end.
fn put_attr(msg: &mut [u8], at: usize, kind: u16, payload: &[u8]) -> usize {
    let len = 4 + payload.len();
    msg[at..at + 2].copy_from_slice(&u16::try_from(len).unwrap_or(0).to_ne_bytes());
    msg[at + 2..at + 4].copy_from_slice(&kind.to_ne_bytes());
    msg[at + 4..at + len].copy_from_slice(payload);
    at + ((len + 3) & !3)
}

/// One RTM_NEWRULE request on the rtnetlink socket `sock`, and its ack.
fn add_rule(sock: libc::c_int, seq: u32, p: &Prefix, rule: Rule) -> Result<(), Errno> {
    // linux/fib_rules.h
    const RTM_NEWRULE: u16 = 32;
    const FRA_DST: u16 = 1;
    const FRA_PRIORITY: u16 = 6;
    const FRA_TABLE: u16 = 15;
    const FRA_IP_PROTO: u16 = 22;
    const FRA_DPORT_RANGE: u16 = 24;
    const FR_ACT_TO_TBL: u8 = 1;
    const FR_ACT_PROHIBIT: u8 = 8;
    const NLMSG_HDR: usize = 16;
    let mut msg = [0u8; 128];
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    msg[4..6].copy_from_slice(&RTM_NEWRULE.to_ne_bytes());
    msg[6..8].copy_from_slice(&u16::try_from(flags).unwrap_or(0).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    // fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2,
    // action, flags (u32)
    let family = if p.v6 { libc::AF_INET6 } else { libc::AF_INET };
    msg[16] = u8::try_from(family).unwrap_or(0);
    msg[17] = p.len;
    let addr_len = if p.v6 { 16 } else { 4 };
    let mut at = NLMSG_HDR + 12;
    at = put_attr(&mut msg, at, FRA_DST, &p.addr[..addr_len]);
    match rule {
        Rule::Dns(proto) => {
            msg[20] = libc::RT_TABLE_MAIN;
            msg[23] = FR_ACT_TO_TBL;
            at = put_attr(&mut msg, at, FRA_PRIORITY, &RULE_DNS.to_ne_bytes());
            at = put_attr(
                &mut msg,
                at,
                FRA_TABLE,
                &u32::from(libc::RT_TABLE_MAIN).to_ne_bytes(),
            );
            at = put_attr(&mut msg, at, FRA_IP_PROTO, &[proto]);
            let port = 53u16.to_ne_bytes();
            at = put_attr(
                &mut msg,
                at,
                FRA_DPORT_RANGE,
                &[port[0], port[1], port[0], port[1]],
            );
        }
        Rule::Prohibit => {
            msg[23] = FR_ACT_PROHIBIT;
            at = put_attr(&mut msg, at, FRA_PRIORITY, &RULE_BLOCK.to_ne_bytes());
        }
    }
    msg[0..4].copy_from_slice(&u32::try_from(at).unwrap_or(0).to_ne_bytes());
    // SAFETY: `msg` is valid for `at` bytes; `sock` is an open socket.
    let sent = unsafe { libc::send(sock, msg.as_ptr().cast(), at, 0) };
    if sent < 0 {
        return Err(Errno::last());
    }
    // the ack: an NLMSG_ERROR whose error field is 0 or -errno
    let mut reply = [0u8; 256];
    loop {
        // SAFETY: `reply` is valid for its length; `sock` is open.
        let n = unsafe { libc::recv(sock, reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return Err(Errno::last());
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n < NLMSG_HDR + 4 {
            return Err(Errno::EPROTO);
        }
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        let reply_seq = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
        if reply_seq != seq || kind != u16::try_from(libc::NLMSG_ERROR).unwrap_or(2) {
            continue;
        }
        let err = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        return if err == 0 {
            Ok(())
        } else {
            Err(Errno::from_raw(-err))
        };
    }
}

/// Bring the loopback interface of the current network namespace up.
pub fn loopback_up() -> Result<(), Errno> {
    // SAFETY: socket(2) takes integers only and returns a new descriptor or
    // -1.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(Errno::last());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is open and `req` is a valid ifreq for these requests.
    let rc = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |=
                libc::c_short::try_from(libc::IFF_UP | libc::IFF_RUNNING).unwrap_or(1);
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req)
        }
    };
    let result = Errno::result(rc).map(drop);
    // SAFETY: `sock` is ours and closed once.
    unsafe { libc::close(sock) };
    result
}

/// A stack for a [`clone_vm`] child: anonymous memory, touched only as far
/// as the child uses it, with a guard page below it. Unmapped on drop, which
/// must wait until the child has exec'd or exited.
pub struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    pub fn new(len: usize) -> Result<ChildStack, Errno> {
        let page = 4096;
        let len = len.next_multiple_of(page) + page;
        // SAFETY: a fresh private anonymous mapping; nothing aliases it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of our own mapping becomes the guard.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(Errno::last());
        }
        Ok(stack)
    }

    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our mapping, where a stack starts.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Whether a kernel release string (`6.18.0-1-amd64`) is at least `want`
/// (major, minor); false when it cannot be read as one.
pub fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

/// Whether [`clone_vm`] children are safe on this kernel: before Linux 5.16
/// a process that dumped core killed every process sharing its memory, so
/// a crash of a sandbox child would take kiln down with it.
pub fn clone_vm_safe() -> bool {
    kernel_at_least(kiln_sys::kernel_release(), (5, 16))
}

/// Start `f(arg)` in a child that shares this process's memory until it
/// execs (CLONE_VM, as posix_spawn does, but without CLONE_VFORK: the
/// caller goes on, to write the child's id maps). Nothing is copied, so the
/// clone costs the same however much memory kiln uses, and neither side
/// takes copy-on-write faults afterwards. Returns the child's pid, and
/// stores its pidfd in `pidfd` when given.
///
/// # Safety
/// `f` runs on `stack` in this very address space, beside the caller's
/// other threads: it must only do async-signal-safe, allocation-free work,
/// write no memory but its own stack (errno aside), and leave with `_exit`
/// or `exec`. `arg` and `stack` must outlive the child's exec or exit, and
/// the child must not change its effective ids to others (that would make
/// this shared memory non-dumpable, and the caller's /proc entries root's).
pub unsafe fn clone_vm(
    flags: libc::c_int,
    stack: &ChildStack,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
    pidfd: Option<&mut RawFd>,
) -> Result<i32, Errno> {
    let (flags, slot) = match pidfd {
        // with CLONE_PIDFD the kernel stores the pidfd through the
        // parent_tid argument
        Some(slot) => (flags | libc::CLONE_PIDFD, std::ptr::from_mut(slot)),
        None => (flags, std::ptr::null_mut()),
    };
    // SAFETY: the caller upholds the contract above.
    let pid = unsafe {
        libc::clone(
            f,
            stack.top(),
            flags | libc::CLONE_VM | libc::SIGCHLD,
            arg,
            slot,
        )
    };
    if pid < 0 {
        return Err(Errno::last());
    }
    Ok(pid)
}

/// clone3(2) arguments (the fields kiln uses; the rest stay zero).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Fork-style clone3 (no new stack) with a pidfd. Returns 0 in the child,
/// and `(pid, pidfd)` in the parent.
///
/// # Safety
/// The child runs on a copy of the caller's stack in a copy of its address
/// space with only the calling thread. It must only do async-signal-safe,
/// allocation-free work and leave with `_exit` or `exec`: other threads may
/// have held locks (malloc's included) at the moment of the clone.
pub unsafe fn clone3_fork(flags: u64) -> Result<Option<(i32, OwnedFd)>, Errno> {
    let mut pidfd: RawFd = -1;
    let args = CloneArgs {
        flags: flags | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: `args` and the pidfd slot outlive the call; the caller upholds
    // the contract above for the child.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match rc {
        r if r < 0 => Err(Errno::last()),
        0 => Ok(None),
        // SAFETY: the kernel stored a new pidfd that nothing else owns.
        pid => Ok(Some((
            i32::try_from(pid).map_err(|_| Errno::ERANGE)?,
            unsafe { OwnedFd::from_raw_fd(pidfd) },
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare() {
        assert!(kernel_at_least("6.18.0-1-amd64", (5, 16)));
        assert!(kernel_at_least("5.16.0", (5, 16)));
        assert!(!kernel_at_least("5.15.0-91-generic", (5, 16)));
        assert!(!kernel_at_least("4.19.0", (5, 16)));
        assert!(!kernel_at_least("garbage", (5, 16)));
    }

    #[test]
    fn fd_paths() {
        assert_eq!(FdPath::new(0).as_cstr(), c"/proc/self/fd/0");
        assert_eq!(FdPath::new(1234567).as_cstr(), c"/proc/self/fd/1234567");
        let mut b = [0; 12];
        assert_eq!(itoa(u32::MAX, &mut b), b"4294967295");
    }
}
