//! kiln's own user namespace: created once per user and boot, kept alive by
//! a tiny pause process, and joined by every kiln process at startup (as
//! rootless Podman does).
//!
//! Why: mapping a subordinate range needs the setuid helpers newuidmap and
//! newgidmap, which cost milliseconds per call. Inside kiln's namespace,
//! kiln is uid 0 with the full range mapped, so each step's own (nested)
//! user namespace gets an identity map written directly, and the
//! snapshotter can mount overlay and FUSE filesystems and chown files to any
//! container id.
//!
//! What this must never do: join a namespace it did not verify is owned by
//! the calling user, or follow a runtime directory it does not own.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::idmap::{IdEnv, IdMapping, Method};
use crate::sys;

/// What [`enter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entered {
    /// joined the running pause process's namespace
    Joined,
    /// started a pause process and joined its new namespace
    Created,
    /// already inside a user namespace: nothing to do
    AlreadyInside,
    /// no subordinate range (or running as real root): steps map their ids
    /// directly, which needs no helper and no shared namespace
    NotNeeded,
}

/// Where the pause process's lock and pid live: `$XDG_RUNTIME_DIR/kiln`, or
/// `/tmp/kiln-run-UID` (created 0700 and checked to be ours).
fn runtime_dir(uid: u32) -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| {
            fs::metadata(d)
                .map(|m| m.uid() == uid && m.is_dir())
                .unwrap_or(false)
        });
    let dir = match base {
        Some(b) => b.join("kiln"),
        None => PathBuf::from(format!("/tmp/kiln-run-{uid}")),
    };
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(Error::RuntimeDir { path: dir, source }),
    }
    // In a shared /tmp someone else may have made the directory first, or
    // planted a symlink: use it only if it is a real directory of ours that
    // nobody else can write.
    let meta = fs::symlink_metadata(&dir).map_err(|source| Error::RuntimeDir {
        path: dir.clone(),
        source,
    })?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
        return Err(Error::RuntimeDirUnsafe(dir));
    }
    Ok(dir)
}

fn open_lock(path: &std::path::Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| Error::RuntimeDir {
            path: path.to_path_buf(),
            source,
        })
}

/// `NS_GET_OWNER_UID`: the uid that owns a user namespace.
const NS_GET_OWNER_UID: libc::c_ulong = 0xb704;

fn join(pid: i32, uid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/ns/user");
    let ns = File::open(&path).map_err(|source| Error::JoinNamespace {
        path: path.clone(),
        source,
    })?;
    let mut owner: libc::uid_t = u32::MAX;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t into `owner`.
    let rc = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_OWNER_UID, &mut owner) };
    if rc != 0 || owner != uid {
        return Err(Error::JoinNamespace {
            path,
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        });
    }
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUSER).map_err(|e| {
        Error::JoinNamespace {
            path,
            source: e.into(),
        }
    })?;
    // Become root of the namespace, the identity every mapping is
    // computed from.
    nix::unistd::setresgid(0.into(), 0.into(), 0.into()).map_err(|e| Error::Clone(e.into()))?;
    nix::unistd::setresuid(0.into(), 0.into(), 0.into()).map_err(|e| Error::Clone(e.into()))?;
    Ok(())
}

/// CAP_SYS_ADMIN's bit.
pub const CAP_SYS_ADMIN: u32 = 21;

/// Whether the process has capability `cap` in its effective set (from
/// /proc/self/status; false when it cannot be read).
pub fn has_effective_cap(cap: u32) -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

/// Whether [`enter`] also gives the process a mount namespace of its own
/// (needed to mount snapshots; `kiln sandbox` does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounts {
    Private,
    Shared,
}

/// Join (creating if needed) the calling user's kiln namespace, then, with
/// [`Mounts::Private`], give this process a private mount namespace inside
/// it. Must be called while the process is single-threaded (setns of a user
/// namespace and unshare of a mount namespace require it): first thing in
/// `main`.
pub fn enter(mounts: Mounts) -> Result<Entered> {
    let env = IdEnv::from_host();
    let mapping = IdMapping::decide(&env);
    // Inside a container's user namespace (Podman, Docker, a pod with
    // hostUsers: false) kiln is uid 0 but without CAP_SYS_ADMIN: it cannot
    // make mount namespaces there. A namespace of its own, nested in the
    // container's with the ids the container has, gives it that; mapping
    // it needs only CAP_SETUID and CAP_SETGID, which those runtimes keep.
    let nested_without_admin = matches!(mapping.method, Method::Direct { .. })
        && mapping.limited.is_none()
        && !env.in_initial_userns()
        && !has_effective_cap(CAP_SYS_ADMIN);
    let entered = if !matches!(mapping.method, Method::Helpers { .. }) && !nested_without_admin {
        if !env.in_initial_userns() {
            Entered::AlreadyInside
        } else {
            Entered::NotNeeded
        }
    } else {
        let dir = runtime_dir(env.euid)?;
        // Serialise creation between concurrent kiln processes.
        let create = open_lock(&dir.join("create.lock"))?;
        sys::flock(create.as_raw_fd(), libc::LOCK_EX).map_err(|e| Error::Clone(e.into()))?;
        let lock_path = dir.join("pause.lock");
        let pid_path = dir.join("pause.pid");
        let probe = open_lock(&lock_path)?;
        let alive = match sys::flock(probe.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) {
            Err(Errno::EWOULDBLOCK) => true,
            Ok(()) => false,
            Err(e) => return Err(Error::Clone(e.into())),
        };
        drop(probe);
        let pid = if alive {
            fs::read_to_string(&pid_path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        } else {
            None
        };
        // A pause process that died between the lock probe and the join
        // (or was killed by the user) is replaced.
        match pid.map(|pid| join(pid, env.euid)) {
            Some(Ok(())) => Entered::Joined,
            Some(Err(_)) | None => {
                let pid = start_pause(&mapping, &lock_path)?;
                let tmp = dir.join(format!("pause.pid.{}", std::process::id()));
                let mut f = File::create(&tmp).map_err(|source| Error::RuntimeDir {
                    path: tmp.clone(),
                    source,
                })?;
                writeln!(f, "{pid}").map_err(|source| Error::RuntimeDir {
                    path: tmp.clone(),
                    source,
                })?;
                fs::rename(&tmp, &pid_path).map_err(|source| Error::RuntimeDir {
                    path: pid_path.clone(),
                    source,
                })?;
                join(pid, env.euid)?;
                Entered::Created
            }
        }
    };
    if entered != Entered::NotNeeded && mounts == Mounts::Private {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| crate::error::namespace_call_failed("unshare", e))?;
        sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
            .map_err(|e| Error::Clone(e.into()))?;
    }
    Ok(entered)
}

/// Start the pause process in a new user namespace with `mapping`, holding
/// an exclusive lock on `lock_path` for as long as it lives. Returns its pid
/// once the lock is held and the maps are written.
fn start_pause(mapping: &IdMapping, lock_path: &std::path::Path) -> Result<i32> {
    let lock = open_lock(lock_path)?;
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Channel(e.into()))?;
    let (go_r, go_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Channel(e.into()))?;
    let init = crate::sandbox::init_memfd()?;
    let lock_fd = lock.as_raw_fd();
    let (ready_w_fd, go_r_fd) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
    let (go_w_fd, ready_r_fd) = (go_w.as_raw_fd(), ready_r.as_raw_fd());
    // SAFETY: the child only makes async-signal-safe, allocation-free calls
    // and leaves by exec or _exit.
    let cloned = unsafe { sys::clone3_fork(libc::CLONE_NEWUSER as u64) };
    match cloned {
        Err(e) => Err(crate::error::namespace_call_failed("clone3", e)),
        Ok(None) => {
            // The pause process: wait for the maps, take the lock, detach
            // from the caller's session and become `kiln-init pause`. Its
            // copies of the parent's ends go first: holding the write end
            // of `go` itself, it would never see the EOF of a parent that
            // could not write the maps, and wait forever.
            // SAFETY: closing descriptors this forked child inherited.
            unsafe {
                libc::close(go_w_fd);
                libc::close(ready_r_fd);
            }
            let mut b = [0u8; 1];
            let ok = matches!(sys::read_full(go_r_fd, &mut b), Ok(1));
            // SAFETY: between clone and exec in the single-threaded child:
            // flock, setsid, dup2 and close_range take integers and
            // descriptors inherited from the parent; open reads a
            // NUL-terminated literal; exec_fd's argv is a null-terminated
            // array of pointers to NUL-terminated static strings; _exit
            // never returns.
            unsafe {
                if !ok || libc::flock(lock_fd, libc::LOCK_EX | libc::LOCK_NB) != 0 {
                    libc::_exit(1);
                }
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
                libc::dup2(lock_fd, 3);
                libc::syscall(
                    libc::SYS_close_range,
                    4u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                let _ = kiln_sys::write_all(ready_w_fd, b"r");
                sys::exec_fd(
                    init,
                    &[c"kiln-pause".as_ptr(), c"pause".as_ptr(), std::ptr::null()],
                );
                libc::_exit(127);
            }
        }
        Ok(Some((pid, _pidfd))) => {
            drop((ready_w, go_r));
            let mapped = mapping.apply(pid);
            if mapped.is_ok() {
                let _ = nix::unistd::write(&go_w, b"g");
            }
            drop(go_w);
            let mut b = [0u8; 1];
            let ready = matches!(sys::read_full(ready_r.as_raw_fd(), &mut b), Ok(1));
            mapped?;
            if !ready {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                return Err(Error::Channel(std::io::Error::other(
                    "the pause process did not start",
                )));
            }
            // The pause process outlives us; its parent becomes init (or a
            // subreaper), which reaps it.
            drop(lock);
            Ok(pid)
        }
    }
}
