//! The store behind `RUN --mount=type=cache`: directories kept across
//! builds, keyed by the mount's `id`, never part of a layer or an image.
//!
//! Layout under `<state>/cache-mounts/` (mode 0700):
//!
//! ```text
//! lock                      root lock (see below)
//! <sha256(id) hex>/id       the id text, for `kiln du`
//! <sha256(id) hex>/0/lock   flock'ed by every lease on instance 0
//! <sha256(id) hex>/0/data/  what a step sees at its mount target
//! <sha256(id) hex>/1/...    more instances, made by `sharing=private`
//! tmp-*  trash-*            being created / being removed
//! ```
//!
//! Two kiln processes may build at once against one state directory, so
//! every coordination is an `flock` (which the kernel drops when a process
//! dies, even by SIGKILL), never an in-process mutex:
//! - an instance's `lock`: `LOCK_SH` for `sharing=shared`, `LOCK_EX` for
//!   `locked` (blocking) and `private` (non-blocking, trying instance 0, 1,
//!   2, ... and creating a new one when all are busy), and `LOCK_EX|LOCK_NB`
//!   for prune, which therefore never takes a directory a step is using.
//! - the root `lock`: held shared by whoever has a `tmp-*` or `trash-*`
//!   entry, exclusively (non-blocking) by the cleaner of leftovers, so a
//!   cleaner that gets it knows every such entry belongs to a dead process,
//!   and by prune while it removes empty id directories, so no acquire is
//!   halfway through creating an instance in one.
//!
//! Ids are hashed, so an `id` of `../../x` or one with slashes can never
//! name a path outside this directory (Buildah CVE-2024-9675 class).
//! Instances appear by an atomic rename of a complete `tmp-*` directory
//! (lock file, `data/` with its owner and mode) and disappear by a rename
//! into `trash-*` before removal, so a build never sees a half-made or
//! half-deleted cache. Nothing here follows a symlink a step could have
//! planted: every directory kiln reads or chowns is opened `O_NOFOLLOW`.
//!
//! This module never mounts anything, never reads a Dockerfile and never
//! seeds a cache from `from`/`source`: the build engine does that with the
//! lease's [`CacheLease::path`] when [`CacheLease::fresh`] is true.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{renameat2, Flock, FlockArg, RenameFlags};
use sha2::{Digest, Sha256};

pub use crate::frontend::mount_flags::Sharing;

/// Errors of the cache mount store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cache mount store {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "cannot give cache mount {id:?} to uid {uid} gid {gid}: the id is not mapped in \
         kiln's user namespace; add a subordinate range for your user to /etc/subuid and \
         /etc/subgid, or use uid=0,gid=0"
    )]
    Unmapped { id: String, uid: u32, gid: u32 },
    #[error("cache mount {path} is not a directory (a symlink or file is in its place); refusing to use it, remove it with kiln prune")]
    NotADirectory { path: PathBuf },
    #[error("no cache mount instance is named {0:?}; use a name `kiln du` lists")]
    NoInstance(String),
}

/// Result type of the cache mount store.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn errno_err(path: &Path) -> impl FnOnce(Errno) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Owner and mode of a cache directory when it is created (`mode`, `uid`,
/// `gid` of the mount; defaults 0755, 0, 0). An existing directory keeps
/// what it has, as in BuildKit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Default for Init {
    fn default() -> Self {
        Init {
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }
}

/// One cache mount instance as `kiln du` and `kiln prune` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUsage {
    /// the mount's `id` (the target path when the Dockerfile gave none)
    pub id: String,
    /// names the instance for [`CacheMounts::remove`]
    pub instance: String,
    /// bytes on disk under its `data/`
    pub bytes: u64,
    /// when a lease on it was last taken or dropped
    pub last_used: SystemTime,
    /// a build holds it now
    pub in_use: bool,
}

/// The cache mount store of one state directory.
#[derive(Debug)]
pub struct CacheMounts {
    root: PathBuf,
}

/// A cache directory held for one step. The flock is released, and the
/// last-used time recorded, when it is dropped (or when the process dies).
#[derive(Debug)]
pub struct CacheLease {
    lock: Flock<File>,
    data: PathBuf,
    fresh: bool,
}

impl CacheLease {
    /// The host directory to bind-mount at the step's target.
    pub fn path(&self) -> &Path {
        &self.data
    }

    /// Whether this acquire created the directory: the engine seeds it from
    /// the mount's `from`/`source` then. A fresh lease holds the lock
    /// exclusively whatever the sharing, so no concurrent step sees the
    /// directory before it is seeded.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Once a fresh instance is seeded, a `Shared` lease gives up its
    /// exclusivity (flock converts the lock in place) so concurrent steps
    /// can use the directory together.
    pub fn share(&self) -> Result<()> {
        if self.fresh {
            self.lock
                .relock(FlockArg::LockShared)
                .map_err(|e| io_err(&self.data)(e.into()))?;
        }
        Ok(())
    }
}

impl Drop for CacheLease {
    fn drop(&mut self) {
        // best effort: a failed timestamp only makes prune's age guess older
        let _ = self.lock.set_modified(SystemTime::now());
    }
}

/// Open flags for every directory and lock file here: a symlink in its
/// place is an error (ELOOP / ENOTDIR), never followed.
const NOFOLLOW: i32 = libc::O_NOFOLLOW | libc::O_CLOEXEC;

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A name no other thread or process uses at the same time.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
}

fn open_lock(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .mode(0o600)
        .custom_flags(NOFOLLOW)
        .open(path)
}

/// flock, retrying when a signal interrupts a blocking wait; `Ok(None)`
/// when non-blocking and someone else holds a conflicting lock.
fn lock(file: File, arg: FlockArg, path: &Path) -> Result<Option<Flock<File>>> {
    let mut file = file;
    loop {
        match Flock::lock(file, arg) {
            Ok(l) => return Ok(Some(l)),
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, e)) => return Err(errno_err(path)(e)),
        }
    }
}

/// Whether `path` still names the file `file` has open: prune may have
/// moved an instance to the trash between our open and our lock.
fn still_at(file: &File, path: &Path) -> Result<bool> {
    let held = file.metadata().map_err(io_err(path))?;
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(m.dev() == held.dev() && m.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Rename `from` to `to` unless `to` exists; `Ok(false)` when it does
/// (a racing creator won, and its directory is used instead).
fn rename_noreplace(from: &Path, to: &Path) -> Result<bool> {
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST | Errno::ENOTEMPTY) => Ok(false),
        Err(e) => Err(errno_err(to)(e)),
    }
}

/// Bytes on disk under `path`, hard links counted once, symlinks not
/// followed. Entries removed while walking are skipped.
fn disk_usage(path: &Path, seen: &mut HashSet<(u64, u64)>) -> io::Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut bytes = 0;
    if seen.insert((meta.dev(), meta.ino())) {
        bytes += meta.blocks() * 512;
    }
    if meta.is_dir() {
        let entries = match fs::read_dir(path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(bytes),
            Err(e) => return Err(e),
        };
        for e in entries {
            bytes += disk_usage(&e?.path(), seen)?;
        }
    }
    Ok(bytes)
}

/// Remove `path` and everything under it without following symlinks.
/// A step may have left directories with mode 000 owned by other mapped
/// uids: each directory is made 0700 (on its own descriptor) before it is
/// read, which kiln may do as uid 0 of its user namespace.
fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let dir = open_dir(path)?;
    if meta.mode() & 0o700 != 0o700 {
        dir.set_permissions(fs::Permissions::from_mode(0o700))?;
    }
    for e in fs::read_dir(path)? {
        remove_tree(&e?.path())?;
    }
    drop(dir);
    match fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn is_id_dir(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn instance_number(name: &str) -> Option<u32> {
    if name.is_empty() || (name.len() > 1 && name.starts_with('0')) {
        return None;
    }
    name.parse().ok()
}

impl CacheMounts {
    /// Open (creating with mode 0700) the store at `dir`, the state
    /// directory's [`StateDir::cache_mounts_dir`], and remove what killed
    /// processes left behind.
    ///
    /// [`StateDir::cache_mounts_dir`]: super::StateDir::cache_mounts_dir
    pub fn open(dir: &Path) -> Result<Self> {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {
                // the umask may have taken bits away; 0700 exactly
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                open_dir(dir).map_err(|_| Error::NotADirectory {
                    path: dir.to_path_buf(),
                })?;
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
        let store = CacheMounts {
            root: dir.to_path_buf(),
        };
        store.clean_leftovers()?;
        Ok(store)
    }

    /// Open the store at `dir` for reading ([`CacheMounts::usage`], as
    /// `kiln du` does): never creates it and never removes leftovers.
    /// `None` when no cache mount was ever made.
    pub fn open_existing(dir: &Path) -> Result<Option<Self>> {
        match open_dir(dir) {
            Ok(_) => Ok(Some(CacheMounts {
                root: dir.to_path_buf(),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(_) => Err(Error::NotADirectory {
                path: dir.to_path_buf(),
            }),
        }
    }

    /// The root lock, shared: held while this process has a `tmp-*` or
    /// `trash-*` entry.
    fn root_shared(&self) -> Result<Flock<File>> {
        let path = self.root.join("lock");
        self.root_lock(FlockArg::LockShared)?
            .ok_or_else(|| io_err(&path)(io::ErrorKind::WouldBlock.into()))
    }

    fn root_lock(&self, arg: FlockArg) -> Result<Option<Flock<File>>> {
        let path = self.root.join("lock");
        let file = match open_lock(&path, true) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open_lock(&path, false),
            r => r,
        }
        .map_err(io_err(&path))?;
        lock(file, arg, &path)
    }

    /// Remove `tmp-*` and `trash-*` entries when no live process can own
    /// one: the owners hold the root lock shared, so getting it exclusively
    /// proves they are gone. When it is busy the leftovers wait for the
    /// next open.
    fn clean_leftovers(&self) -> Result<()> {
        let Some(_guard) = self.root_lock(FlockArg::LockExclusiveNonblock)? else {
            return Ok(());
        };
        for e in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let e = e.map_err(io_err(&self.root))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("tmp-") || name.starts_with("trash-") {
                remove_tree(&e.path()).map_err(io_err(&e.path()))?;
            }
        }
        Ok(())
    }

    /// The directory of `id`: the hex SHA-256 of the id, so no id can
    /// name a path outside the store.
    fn id_dir(&self, id: &str) -> PathBuf {
        self.root
            .join(format!("{:x}", Sha256::digest(id.as_bytes())))
    }

    /// Make sure the id directory exists (created whole: a `tmp-*` with the
    /// `id` file renamed into place). Called with the root lock held shared.
    fn ensure_id_dir(&self, id: &str) -> Result<PathBuf> {
        let dir = self.id_dir(id);
        match open_dir(&dir) {
            Ok(_) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => return Err(Error::NotADirectory { path: dir }),
        }
        let tmp = self.root.join(unique("tmp"));
        let made = (|| -> Result<bool> {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(io_err(&tmp))?;
            let id_file = tmp.join("id");
            let mut f = open_lock(&id_file, true).map_err(io_err(&id_file))?;
            f.write_all(id.as_bytes()).map_err(io_err(&id_file))?;
            rename_noreplace(&tmp, &dir)
        })();
        if !matches!(made, Ok(true)) {
            let _ = remove_tree(&tmp);
        }
        made?;
        Ok(dir)
    }

    /// Create instance `dir` whole, its lock taken exclusively before it is
    /// visible; `Ok(None)` when a racing creator made it first. Called with
    /// the root lock held shared.
    fn create_instance(&self, dir: &Path, id: &str, init: Init) -> Result<Option<CacheLease>> {
        let tmp = self.root.join(unique("tmp"));
        let made = (|| -> Result<Option<CacheLease>> {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(io_err(&tmp))?;
            let lock_path = tmp.join("lock");
            let file = open_lock(&lock_path, true).map_err(io_err(&lock_path))?;
            let held = lock(file, FlockArg::LockExclusiveNonblock, &lock_path)?
                .ok_or_else(|| io_err(&lock_path)(io::ErrorKind::WouldBlock.into()))?;
            let data = tmp.join("data");
            // created 0700 and opened without following a symlink; owner
            // and mode are set on that descriptor, chown first because
            // chown clears set-id bits
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&data)
                .map_err(io_err(&data))?;
            let fd = open_dir(&data).map_err(io_err(&data))?;
            match std::os::unix::fs::fchown(&fd, Some(init.uid), Some(init.gid)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return Err(Error::Unmapped {
                        id: id.to_string(),
                        uid: init.uid,
                        gid: init.gid,
                    })
                }
                Err(e) => return Err(io_err(&data)(e)),
            }
            fd.set_permissions(fs::Permissions::from_mode(init.mode & 0o7777))
                .map_err(io_err(&data))?;
            if !rename_noreplace(&tmp, dir)? {
                return Ok(None);
            }
            Ok(Some(CacheLease {
                lock: held,
                data: dir.join("data"),
                fresh: true,
            }))
        })();
        if !matches!(made, Ok(Some(_))) {
            let _ = remove_tree(&tmp);
        }
        made
    }

    /// Lock the existing instance `dir`. `Ok(None)` when it is gone (never
    /// made, or pruned while we waited) or, non-blocking, busy.
    fn lock_instance(&self, dir: &Path, arg: FlockArg) -> Result<Option<CacheLease>> {
        let lock_path = dir.join("lock");
        let file = match open_lock(&lock_path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&lock_path)(e)),
        };
        let Some(held) = lock(file, arg, &lock_path)? else {
            return Ok(None);
        };
        if !still_at(&held, &lock_path)? {
            return Ok(None);
        }
        // A symlink planted at `data` is refused, never followed or
        // replaced: replacing would silently drop the cache, and only
        // something with write access to kiln's own state could plant it.
        let data = dir.join("data");
        match fs::symlink_metadata(&data) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::NotADirectory { path: data }),
            Err(e) => return Err(io_err(&data)(e)),
        }
        // record the use now too, so a long build's cache looks recent
        let _ = held.set_modified(SystemTime::now());
        Ok(Some(CacheLease {
            lock: held,
            data,
            fresh: false,
        }))
    }

    /// Acquire the directory for `id` with `sharing`:
    /// - `Shared`: instance 0, held shared with other `Shared` leases;
    ///   blocks while a `Locked` lease holds it.
    /// - `Locked`: instance 0, exclusively; blocks while any other lease
    ///   (shared or locked) holds it.
    /// - `Private`: the first free instance, never waiting: a new, fresh
    ///   one when all are busy.
    ///
    /// `init` gives mode/uid/gid applied when the directory is created
    /// ([`CacheLease::fresh`] is then true).
    pub fn acquire(&self, id: &str, sharing: Sharing, init: Init) -> Result<CacheLease> {
        loop {
            let guard = self.root_shared()?;
            let id_dir = self.ensure_id_dir(id)?;
            let arg = match sharing {
                Sharing::Shared => FlockArg::LockShared,
                Sharing::Locked => FlockArg::LockExclusive,
                Sharing::Private => {
                    if let Some(lease) = self.acquire_private(&id_dir, id, init)? {
                        return Ok(lease);
                    }
                    continue;
                }
            };
            let dir = id_dir.join("0");
            if !dir.exists() {
                if let Some(lease) = self.create_instance(&dir, id, init)? {
                    return Ok(lease);
                }
                continue;
            }
            // waiting for another build's step can take minutes: do it
            // without the root lock, so cleaners and prune are not held up
            drop(guard);
            if let Some(lease) = self.lock_instance(&dir, arg)? {
                return Ok(lease);
            }
        }
    }

    /// One pass over the instances of a private acquire; `Ok(None)` when a
    /// racing creator took the instance number we picked (try again).
    fn acquire_private(&self, id_dir: &Path, id: &str, init: Init) -> Result<Option<CacheLease>> {
        for n in 0u32.. {
            let dir = id_dir.join(n.to_string());
            if dir.exists() {
                if let Some(lease) = self.lock_instance(&dir, FlockArg::LockExclusiveNonblock)? {
                    return Ok(Some(lease));
                }
                // busy, or pruned just now: the next number, or a rescan
                if dir.exists() {
                    continue;
                }
            }
            return self.create_instance(&dir, id, init);
        }
        unreachable!("more than 2^32 cache mount instances")
    }

    /// Every id directory with its id text.
    fn ids(&self) -> Result<Vec<(PathBuf, String)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let e = e.map_err(io_err(&self.root))?;
            if !is_id_dir(&e.file_name().to_string_lossy()) {
                continue;
            }
            let path = e.path();
            let id = fs::read_to_string(path.join("id")).unwrap_or_else(|_| "?".into());
            out.push((path, id));
        }
        out.sort();
        Ok(out)
    }

    fn instances(id_dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(id_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(id_dir)(e)),
        };
        for e in entries {
            let e = e.map_err(io_err(id_dir))?;
            if let Some(n) = instance_number(&e.file_name().to_string_lossy()) {
                out.push((n, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// (id, bytes, last used, in use) of each cache mount instance, for
    /// `kiln du`. "In use" is probed with a non-blocking exclusive lock
    /// held for an instant; a private acquire racing the probe may make
    /// a new instance instead of reusing that one, which is harmless.
    pub fn usage(&self) -> Result<Vec<CacheUsage>> {
        let mut out = Vec::new();
        for (id_dir, id) in self.ids()? {
            let hex = id_dir.file_name().unwrap_or_default().to_string_lossy();
            for (n, dir) in Self::instances(&id_dir)? {
                let lock_path = dir.join("lock");
                let file = match open_lock(&lock_path, false) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&lock_path)(e)),
                };
                let last_used = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .map_err(io_err(&lock_path))?;
                let in_use = lock(file, FlockArg::LockExclusiveNonblock, &lock_path)?.is_none();
                let data = dir.join("data");
                let bytes = disk_usage(&data, &mut HashSet::new()).map_err(io_err(&data))?;
                out.push(CacheUsage {
                    id: id.clone(),
                    instance: format!("{hex}/{n}"),
                    bytes,
                    last_used,
                    in_use,
                });
            }
        }
        Ok(out)
    }

    /// Remove one instance (an [`CacheUsage::instance`]) unless a build
    /// holds it; never blocks. Returns the bytes freed, `None` when in use.
    pub fn remove(&self, instance: &str) -> Result<Option<u64>> {
        let valid = instance
            .split_once('/')
            .is_some_and(|(hex, n)| is_id_dir(hex) && instance_number(n).is_some());
        if !valid {
            return Err(Error::NoInstance(instance.to_string()));
        }
        let dir = self.root.join(instance);
        let lock_path = dir.join("lock");
        let file = match open_lock(&lock_path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(0)),
            Err(e) => return Err(io_err(&lock_path)(e)),
        };
        let Some(held) = lock(file, FlockArg::LockExclusiveNonblock, &lock_path)? else {
            return Ok(None);
        };
        if !still_at(&held, &lock_path)? {
            return Ok(Some(0));
        }
        // the trash entry exists only while this root lock is held shared,
        // so a cleaner never removes it under us
        let guard = self.root_shared()?;
        let data = dir.join("data");
        let bytes = disk_usage(&data, &mut HashSet::new()).map_err(io_err(&data))?;
        // out of sight first: an acquire never finds a half-removed cache
        let trash = self.root.join(unique("trash"));
        fs::rename(&dir, &trash).map_err(io_err(&dir))?;
        remove_tree(&trash).map_err(io_err(&trash))?;
        drop(held);
        drop(guard);
        if let Some(id_dir) = dir.parent() {
            self.remove_ids_if_empty(&[id_dir.to_path_buf()])?;
        }
        Ok(Some(bytes))
    }

    /// Remove every instance no build holds (try-lock, never block), except
    /// those used within `keep_duration` (`kiln prune --keep-duration`).
    /// Returns the bytes freed.
    pub fn prune(&self, keep_duration: Option<Duration>) -> Result<u64> {
        let now = SystemTime::now();
        let mut freed = 0;
        for u in self.usage()? {
            // a use in the future (clock skew) counts as recent
            let recent = keep_duration
                .is_some_and(|keep| now.duration_since(u.last_used).map_or(true, |a| a < keep));
            if u.in_use || recent {
                continue;
            }
            freed += self.remove(&u.instance)?.unwrap_or(0);
        }
        // also ids whose last instance an earlier, busy prune left
        let ids: Vec<PathBuf> = self.ids()?.into_iter().map(|(d, _)| d).collect();
        self.remove_ids_if_empty(&ids)?;
        Ok(freed)
    }

    /// Remove those of `id_dirs` with no instance left. Only with the root
    /// lock held exclusively: then no acquire is between making an id
    /// directory and renaming an instance into it. Skipped when it is busy
    /// (a later prune does it).
    fn remove_ids_if_empty(&self, id_dirs: &[PathBuf]) -> Result<()> {
        let Some(_guard) = self.root_lock(FlockArg::LockExclusiveNonblock)? else {
            return Ok(());
        };
        for id_dir in id_dirs {
            if id_dir.exists() && Self::instances(id_dir)?.is_empty() {
                let trash = self.root.join(unique("trash"));
                fs::rename(id_dir, &trash).map_err(io_err(id_dir))?;
                remove_tree(&trash).map_err(io_err(&trash))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::thread;

    fn store() -> (tempfile::TempDir, CacheMounts) {
        let tmp = tempfile::tempdir().unwrap();
        let s = CacheMounts::open(&tmp.path().join("cache-mounts")).unwrap();
        (tmp, s)
    }

    fn get(s: &CacheMounts, id: &str, sharing: Sharing) -> CacheLease {
        s.acquire(id, sharing, Init::default()).unwrap()
    }

    #[test]
    fn open_creates_0700() {
        let (_t, s) = store();
        let mode = fs::metadata(&s.root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn fresh_once_then_kept_with_owner_and_mode() {
        let (_t, s) = store();
        let init = Init {
            mode: 0o1777,
            uid: 1000,
            gid: 1001,
        };
        let a = s.acquire("/root/.cache", Sharing::Shared, init).unwrap();
        assert!(a.fresh());
        let lock_file = a.path().parent().unwrap().join("lock");
        // flock(1) -s -n: can another process share it right now?
        let shareable = || {
            Command::new("flock")
                .args(["-s", "-n"])
                .arg(&lock_file)
                .arg("true")
                .status()
                .expect("flock(1) from util-linux")
                .success()
        };
        // fresh: held exclusively until seeded and dropped
        assert!(!shareable());
        let m = fs::metadata(a.path()).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o1777, 1000, 1001));
        fs::write(a.path().join("f"), b"kept").unwrap();
        drop(a);
        let b = get(&s, "/root/.cache", Sharing::Shared);
        assert!(!b.fresh());
        assert!(shareable());
        assert_eq!(fs::read(b.path().join("f")).unwrap(), b"kept");
        // another id is another directory
        let c = get(&s, "/other", Sharing::Shared);
        assert!(c.fresh());
        assert_ne!(b.path(), c.path());
    }

    #[test]
    fn shared_holders_coexist() {
        let (_t, s) = store();
        drop(get(&s, "x", Sharing::Shared));
        let a = get(&s, "x", Sharing::Shared);
        // would block forever if `a` excluded it
        let b = get(&s, "x", Sharing::Shared);
        assert_eq!(a.path(), b.path());
        // a shared holder keeps a private acquire off instance 0
        let p = get(&s, "x", Sharing::Private);
        assert_ne!(p.path(), a.path());
    }

    #[test]
    fn locked_waits_until_the_other_lease_drops() {
        let (_t, s) = store();
        drop(get(&s, "x", Sharing::Locked));
        for first in [Sharing::Shared, Sharing::Locked] {
            let held = get(&s, "x", first);
            let (tx, rx) = mpsc::channel();
            thread::scope(|sc| {
                let s = &s;
                let tx2 = tx.clone();
                sc.spawn(move || {
                    tx2.send("waiting").unwrap();
                    let l = get(s, "x", Sharing::Locked);
                    tx2.send("acquired").unwrap();
                    drop(l);
                });
                assert_eq!(rx.recv().unwrap(), "waiting");
                // the waiter cannot get it while `held` lives: it has had
                // time to try; the assertion is on the order of events
                assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
                tx.send("dropped").unwrap();
                drop(held);
                assert_eq!(rx.recv().unwrap(), "dropped");
                assert_eq!(rx.recv().unwrap(), "acquired");
            });
        }
    }

    #[test]
    fn private_gets_a_fresh_instance_when_zero_is_busy_then_reuses_zero() {
        let (_t, s) = store();
        let a = get(&s, "p", Sharing::Private);
        assert!(a.fresh());
        assert!(a.path().ends_with("0/data"));
        let b = get(&s, "p", Sharing::Private);
        assert!(b.fresh());
        assert!(b.path().ends_with("1/data"));
        let zero = a.path().to_path_buf();
        drop(a);
        drop(b);
        let c = get(&s, "p", Sharing::Private);
        assert!(!c.fresh());
        assert_eq!(c.path(), zero);
    }

    #[test]
    fn a_lock_held_by_another_process_is_respected() {
        let (_t, s) = store();
        let zero = get(&s, "proc", Sharing::Private).path().to_path_buf();
        let lock_file = zero.parent().unwrap().join("lock");
        // flock(1) holds the lock until its stdin closes
        let mut child = Command::new("flock")
            .arg(&lock_file)
            .args(["-c", "echo locked; read x"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock(1) from util-linux");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "locked\n");
        let p = get(&s, "proc", Sharing::Private);
        assert!(p.fresh());
        assert_ne!(p.path(), zero);
        let u = s.usage().unwrap();
        assert!(u.iter().any(|u| u.instance.ends_with("/0") && u.in_use));
        assert_eq!(s.prune(None).unwrap(), 0);
        drop(p);
        drop(child.stdin.take());
        child.wait().unwrap();
        assert!(!get(&s, "proc", Sharing::Private).fresh());
    }

    #[test]
    fn ids_never_leave_the_store() {
        let (t, s) = store();
        for id in [
            "../../x",
            "/etc",
            "a/../../..",
            "..",
            "",
            "x/../../../../tmp/y",
        ] {
            let l = get(&s, id, Sharing::Shared);
            let p = l.path().canonicalize().unwrap();
            assert!(
                p.starts_with(s.root.canonicalize().unwrap()),
                "{id:?}: {p:?}"
            );
            assert_eq!(
                p.parent().unwrap().parent().unwrap().parent().unwrap(),
                s.root.canonicalize().unwrap()
            );
        }
        assert!(!t.path().join("x").exists());
        let ids: Vec<String> = s.usage().unwrap().into_iter().map(|u| u.id).collect();
        assert!(ids.contains(&"../../x".to_string()), "{ids:?}");
    }

    #[test]
    fn prune_skips_an_in_use_instance_and_removes_a_free_one() {
        let (_t, s) = store();
        let busy = get(&s, "busy", Sharing::Shared);
        let free = get(&s, "free", Sharing::Shared);
        fs::write(free.path().join("big"), vec![7u8; 100_000]).unwrap();
        // a tree a step left: another owner, a mode 000 directory
        let deep = free.path().join("d/e");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), b"x").unwrap();
        std::os::unix::fs::lchown(&deep, Some(1234), Some(1234)).unwrap();
        fs::set_permissions(free.path().join("d"), fs::Permissions::from_mode(0o000)).unwrap();
        let free_instance = free.path().parent().unwrap().to_path_buf();
        drop(free);
        let u = s.usage().unwrap();
        assert_eq!(u.len(), 2);
        let f = u.iter().find(|u| u.id == "free").unwrap();
        assert!(!f.in_use && f.bytes >= 100_000, "{f:?}");
        assert!(u.iter().find(|u| u.id == "busy").unwrap().in_use);

        // used just now: kept by a keep-duration
        assert_eq!(s.prune(Some(Duration::from_secs(3600))).unwrap(), 0);
        assert!(free_instance.exists());
        let freed = s.prune(None).unwrap();
        assert_eq!(freed, f.bytes);
        assert!(!free_instance.exists());
        // the empty id directory went too
        assert!(!free_instance.parent().unwrap().exists());
        assert!(busy.path().is_dir());
        let u = s.usage().unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].id, "busy");
        // nothing left behind in the store's root
        let names: Vec<_> = fs::read_dir(&s.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("tmp-") || n.starts_with("trash-"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        // after a prune, the id starts over fresh
        drop(busy);
        s.prune(None).unwrap();
        assert!(get(&s, "free", Sharing::Shared).fresh());
    }

    #[test]
    fn remove_one_instance_by_its_du_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cm");
        assert!(CacheMounts::open_existing(&root).unwrap().is_none());
        assert!(!root.exists(), "reading must not create the store");
        let s = CacheMounts::open(&root).unwrap();
        let held = get(&s, "a", Sharing::Shared);
        let r = CacheMounts::open_existing(&root).unwrap().unwrap();
        let u = r.usage().unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(r.remove(&u[0].instance).unwrap(), None);
        let id_dir = held
            .path()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        drop(held);
        assert_eq!(r.remove(&u[0].instance).unwrap(), Some(u[0].bytes));
        assert!(!id_dir.exists());
        for bad in [
            "../../etc/0",
            "x/0",
            &format!("{}/../0", "a".repeat(64)),
            "lock",
        ] {
            assert!(matches!(r.remove(bad), Err(Error::NoInstance(_))), "{bad}");
        }
    }

    #[test]
    fn open_cleans_leftovers_of_dead_processes_but_not_of_live_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cm");
        let s = CacheMounts::open(&root).unwrap();
        let kept = get(&s, "kept", Sharing::Shared).path().to_path_buf();
        for name in ["tmp-1-2-3", "trash-4-5-6"] {
            let d = root.join(name).join("data/sub");
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("f"), b"x").unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(0o000)).unwrap();
        }
        // a live creator holds the root lock shared: its entries stay
        let live = s.root_lock(FlockArg::LockShared).unwrap().unwrap();
        CacheMounts::open(&root).unwrap();
        assert!(root.join("tmp-1-2-3").exists());
        drop(live);
        CacheMounts::open(&root).unwrap();
        assert!(!root.join("tmp-1-2-3").exists());
        assert!(!root.join("trash-4-5-6").exists());
        assert!(kept.is_dir());
    }

    #[test]
    fn a_symlink_at_data_is_refused_not_followed() {
        let (t, s) = store();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let data = get(&s, "sym", Sharing::Shared).path().to_path_buf();
        fs::remove_dir(&data).unwrap();
        std::os::unix::fs::symlink(&outside, &data).unwrap();
        // refused (not replaced): see lock_instance
        for sharing in [Sharing::Shared, Sharing::Locked, Sharing::Private] {
            let e = s.acquire("sym", sharing, Init::default()).unwrap_err();
            assert!(matches!(e, Error::NotADirectory { .. }), "{e}");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // prune removes the link, not what it points to
        s.prune(None).unwrap();
        assert!(outside.is_dir());
        assert!(get(&s, "sym", Sharing::Shared).fresh());
    }

    #[test]
    fn a_symlinked_id_dir_is_refused() {
        let (t, s) = store();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, s.id_dir("evil")).unwrap();
        let e = s
            .acquire("evil", Sharing::Shared, Init::default())
            .unwrap_err();
        assert!(matches!(e, Error::NotADirectory { .. }), "{e}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}
