//! The overlay filesystem served over FUSE: read-only lower layer
//! directories plus one upper directory, merged the way kernel overlayfs
//! merges them, implemented on fuse-backend-rs' `FileSystem` trait.
//!
//! It owns the view's inode table (stable inode numbers for the life of the
//! view, one per real file identity so hard links share one), copy-up, and
//! the translation of every change into the shared layer format in `upper`
//! (whiteouts as char 0:0, opaque dirs as `user.overlay.opaque=y`).
//!
//! It must never write to a lower layer, never leave a half-copied file
//! visible in `upper` (copy-up goes through the work dir and is renamed into
//! place with its owner, mode, xattrs and times already set), and never show
//! the step the `user.overlay.*` xattrs it uses for bookkeeping.
//!
//! Where it differs from kernel overlayfs (as mounted by the `overlay`
//! backend, without index, redirect_dir or xino), on purpose:
//! - renaming a directory that merges lower content copies it up whole and
//!   renames it (overlayfs answers EXDEV and `mv` copies it instead; the
//!   resulting layer is the same);
//! - a hard-linked lower file stays linked to its other names after copy-up,
//!   and all names of one inode report one inode number;
//! - RENAME_EXCHANGE of directories answers EXDEV;
//! - a file is copied up at its first write, truncation or attribute change,
//!   not when it is opened for writing (see `open`): a file opened for
//!   writing and never written stays out of the layer.
//!
//! Concurrency: `tree` is a read-write lock over the shape of the view. Calls
//! that only look (lookup, getattr, readdir, xattr reads, and reads that
//! open the node's file by its path) take it shared; calls that change names
//! or copy up take it exclusively. Data I/O on recent descriptors of a
//! node and on kept files takes no lock at all.
//!
//! Descriptors: files have no handles (OPEN is answered ENOSYS, CREATE
//! returns none), so the server holds a bounded set however many files the
//! kernel remembers: the layer directories, a few recent data descriptors
//! (`DATA_FDS`) and the kept data of removed files the kernel still holds.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, WRITE_KILL_PRIV};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};

use super::sys::{self, rel_cstr, Stat};

/// xattr prefix the layer format reserves (overlayfs `userxattr` names).
const OVERLAY_XATTR_PREFIX: &[u8] = b"user.overlay.";
/// xattr marking an opaque directory in the layer format.
pub(crate) const OPAQUE_XATTR: &CStr = c"user.overlay.opaque";

/// How many descriptors `data_file` keeps open between requests. A large
/// file is read in many requests (128 KiB each, the kernel's readahead) and
/// written in many more; opening it by path for each costs more than a
/// small read itself. The bound keeps kiln's descriptor count fixed however
/// many files the kernel holds.
const DATA_FDS: usize = 8;

/// How long the kernel may trust what we tell it. The view changes only
/// through this server, and every change the kernel makes through us also
/// updates its caches, so the answer stays right for the view's life.
const TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
        p.extend_from_slice(parent);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

/// One layer directory: an `O_PATH` fd for the `*at` calls and its absolute
/// path for the xattr calls that have no `*at` form.
pub(crate) struct LayerDir {
    fd: OwnedFd,
    path: Vec<u8>,
}

impl LayerDir {
    pub(crate) fn open(path: &std::path::Path) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let fd = sys::open_dir(path)?;
        let mut p = path.as_os_str().as_bytes().to_vec();
        while p.len() > 1 && p.ends_with(b"/") {
            p.pop();
        }
        Ok(LayerDir { fd, path: p })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The layer root's own absolute path (kiln's, trusted).
    fn root_path(&self) -> &[u8] {
        &self.path
    }

    /// A path to `rel` for the xattr calls that have no `*at` form: its
    /// parent resolved beneath the layer root ([`sys::beneath`]), then
    /// `/proc/self/fd/N/NAME`; the root itself by its own path.
    fn xpath(&self, rel: &[u8]) -> io::Result<XPath> {
        if rel.is_empty() {
            return Ok(XPath {
                _at: None,
                path: self.path.clone(),
            });
        }
        let at = sys::beneath(self.raw(), &rel_cstr(rel))?;
        Ok(XPath {
            path: at.proc_path(),
            _at: Some(at),
        })
    }
}

/// A path from [`LayerDir::xpath`], holding the descriptor it names.
struct XPath {
    _at: Option<sys::At>,
    path: Vec<u8>,
}

impl std::ops::Deref for XPath {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.path
    }
}

/// Where a node's real file lives and what lies beneath it.
#[derive(Clone, Debug)]
struct NodeState {
    /// Names the view knows for this inode, as (parent id, name); the first
    /// one is used to reach it. Empty once every name was removed.
    names: Vec<(u64, Vec<u8>)>,
    /// The real file is in the upper layer.
    upper: bool,
    /// Lower layers holding this path, topmost first: for a non-directory the
    /// one it is read from; for a directory every layer merged into it.
    lowers: Vec<usize>,
    /// `S_IFMT` bits.
    kind: u32,
    /// Real identities (dev, ino) registered for this node.
    keys: Vec<(u64, u64)>,
    /// How many times the kernel was given this node (FUSE's lookup count);
    /// FORGET takes them back.
    lookups: u64,
    /// The data of a regular file whose last name went away while the
    /// kernel still knew it, for any open file of it.
    kept: Option<Kept>,
}

/// A regular file kept open after its last name was removed. The kernel
/// does not tell which files are open (OPEN is answered ENOSYS, see
/// [`OverlayFs::open`]), so the data of every node it still holds is kept
/// until it forgets the node, as an open handle would have kept it.
#[derive(Clone, Debug)]
struct Kept {
    file: Arc<File>,
    /// false while this is the lower file (never written)
    writable: bool,
    /// Times set on the lower file since it lost its names (atime, mtime,
    /// ctime): answered from here, as they cannot be written to it.
    times: [Option<libc::timespec>; 3],
}

/// The SETATTR bits that only set times.
const TIMES_ONLY: SetattrValid = SetattrValid::ATIME
    .union(SetattrValid::MTIME)
    .union(SetattrValid::ATIME_NOW)
    .union(SetattrValid::MTIME_NOW)
    .union(SetattrValid::CTIME);

/// `st` with the given (atime, mtime, ctime) in place of its own.
fn with_times(mut st: Stat, times: [Option<libc::timespec>; 3]) -> Stat {
    let [a, m, c] = times;
    if let Some(t) = a {
        (st.st_atime, st.st_atime_nsec) = (t.tv_sec, t.tv_nsec);
    }
    if let Some(t) = m {
        (st.st_mtime, st.st_mtime_nsec) = (t.tv_sec, t.tv_nsec);
    }
    if let Some(t) = c {
        (st.st_ctime, st.st_ctime_nsec) = (t.tv_sec, t.tv_nsec);
    }
    st
}

struct Node {
    state: Mutex<NodeState>,
}

/// What resolving one name in a merged directory found.
struct Found {
    st: Stat,
    upper: bool,
    lowers: Vec<usize>,
}

impl Found {
    fn key(&self) -> (u64, u64) {
        (self.st.st_dev, self.st.st_ino)
    }
    fn is_dir(&self) -> bool {
        self.st.st_mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// A directory listing captured at opendir.
struct DirList {
    entries: Vec<(Vec<u8>, u32, u64, Option<Stat>)>,
}

/// A directory handle (the only handles there are: files are served by
/// their node, see `open` and `create`), listed at the first readdir: with
/// FOPEN_CACHE_DIR the kernel often answers from its own cache and never
/// asks.
struct Handle(Mutex<Option<Arc<DirList>>>);

/// The overlay filesystem; see the module docs.
pub(crate) struct OverlayFs {
    upper: LayerDir,
    work: LayerDir,
    lowers: Vec<LayerDir>,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    ids: Mutex<HashMap<(u64, u64), u64>>,
    next_id: AtomicU64,
    tree: RwLock<()>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    next_tmp: AtomicU64,
    writeback: AtomicBool,
    /// The /dev/fuse fd for notifications to the kernel (-1 until mounted).
    notify_fd: AtomicI32,
    /// Recently used files of nodes, newest first: (node, writable, file).
    /// A node's entries go when it is copied up or forgotten.
    data_fds: Mutex<std::collections::VecDeque<(u64, bool, Arc<File>)>>,
    /// Per lower layer, the paths of its hard-linked files by inode number:
    /// made by one walk of the layer at the first copy-up that needs it.
    link_index: Mutex<HashMap<usize, Arc<LinkIndex>>>,
}

/// Paths (relative to the layer) of each hard-linked regular file.
type LinkIndex = HashMap<u64, Vec<Vec<u8>>>;

/// Add every regular file with more than one link under `dir` (the layer
/// path `rel`) to `out`.
fn index_links(dir: &std::path::Path, rel: &[u8], out: &mut LinkIndex) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        // DirEntry::metadata does not follow a symlink
        let m = e.metadata()?;
        let r = join(rel, e.file_name().as_bytes());
        if m.is_dir() {
            index_links(&e.path(), &r, out)?;
        } else if m.is_file() && m.nlink() > 1 {
            out.entry(m.ino()).or_default().push(r);
        }
    }
    Ok(())
}

impl OverlayFs {
    /// An overlay of `lowers` (topmost first) under `upper`, using `work`
    /// (same filesystem as `upper`) for atomic copy-up.
    pub(crate) fn new(lowers: Vec<LayerDir>, upper: LayerDir, work: LayerDir) -> io::Result<Self> {
        let st = sys::lstat_at(upper.raw(), c".")?;
        let root = Node {
            state: Mutex::new(NodeState {
                names: Vec::new(),
                upper: true,
                lowers: (0..lowers.len()).collect(),
                kind: libc::S_IFDIR,
                keys: vec![(st.st_dev, st.st_ino)],
                lookups: 0,
                kept: None,
            }),
        };
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_ID, Arc::new(root));
        let mut ids = HashMap::new();
        ids.insert((st.st_dev, st.st_ino), ROOT_ID);
        let fs = OverlayFs {
            upper,
            work,
            lowers,
            nodes: RwLock::new(nodes),
            ids: Mutex::new(ids),
            next_id: AtomicU64::new(ROOT_ID + 1),
            tree: RwLock::new(()),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            next_tmp: AtomicU64::new(0),
            writeback: AtomicBool::new(false),
            notify_fd: AtomicI32::new(-1),
            data_fds: Mutex::new(std::collections::VecDeque::new()),
            link_index: Mutex::new(HashMap::new()),
        };
        // The root merges every lower layer unless the upper root is opaque.
        if fs.is_opaque(&fs.upper, b"")? {
            fs.node(ROOT_ID)?
                .state
                .lock()
                .map_err(poisoned)?
                .lowers
                .clear();
        }
        // A lower root may itself be opaque: nothing beneath it shows.
        let mut keep = Vec::new();
        for i in 0..fs.lowers.len() {
            keep.push(i);
            if fs.is_opaque(&fs.lowers[i], b"")? {
                break;
            }
        }
        let root = fs.node(ROOT_ID)?;
        let mut s = root.state.lock().map_err(poisoned)?;
        if !s.lowers.is_empty() {
            s.lowers = keep;
        }
        drop(s);
        Ok(fs)
    }

    /// Where to send notifications: the mounted session's /dev/fuse fd,
    /// which outlives every request handler.
    pub(crate) fn set_notify_fd(&self, fd: RawFd) {
        self.notify_fd.store(fd, Ordering::Relaxed);
    }

    /// Clear setuid/setgid on an open upper file for a write or truncation
    /// the kernel flagged, and make the kernel drop the mode it cached: it
    /// left the clearing to us (or the upper filesystem already did it), so
    /// its copy is stale either way.
    fn kill_suidgid(&self, inode: u64, fd: RawFd) -> io::Result<()> {
        let st = sys::fstat(fd)?;
        let m = killed_mode(st.st_mode);
        if m != st.st_mode & 0o7777 {
            sys::fchmod(fd, m)?;
        }
        let nfd = self.notify_fd.load(Ordering::Relaxed);
        if nfd >= 0 {
            // attributes only (offset -1): takes no page lock, so it is
            // safe while the kernel waits for this very request
            sys::fuse_notify_inval_attr(nfd, inode)?;
        }
        Ok(())
    }

    fn node(&self, id: u64) -> io::Result<Arc<Node>> {
        self.nodes
            .read()
            .map_err(poisoned)?
            .get(&id)
            .cloned()
            .ok_or_else(|| err(libc::ENOENT))
    }

    fn state(&self, id: u64) -> io::Result<NodeState> {
        Ok(self.node(id)?.state.lock().map_err(poisoned)?.clone())
    }

    fn update<T>(&self, id: u64, f: impl FnOnce(&mut NodeState) -> T) -> io::Result<T> {
        let node = self.node(id)?;
        let mut s = node.state.lock().map_err(poisoned)?;
        Ok(f(&mut s))
    }

    /// The node's path relative to the layer roots (empty for the root).
    fn path_of(&self, mut id: u64) -> io::Result<Vec<u8>> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        while id != ROOT_ID {
            let node = self.node(id)?;
            let s = node.state.lock().map_err(poisoned)?;
            let (parent, name) = s.names.first().ok_or_else(|| err(libc::ENOENT))?;
            parts.push(name.clone());
            id = *parent;
            if parts.len() > 4096 {
                return Err(err(libc::ELOOP));
            }
        }
        let mut p = Vec::new();
        for part in parts.iter().rev() {
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(part);
        }
        Ok(p)
    }

    fn layer(&self, s: &NodeState) -> &LayerDir {
        if s.upper || s.lowers.is_empty() {
            &self.upper
        } else {
            &self.lowers[s.lowers[0]]
        }
    }

    fn is_opaque(&self, layer: &LayerDir, rel: &[u8]) -> io::Result<bool> {
        match sys::lgetxattr(&layer.xpath(rel)?, OPAQUE_XATTR) {
            Ok(v) => Ok(v.as_deref() == Some(b"y")),
            // a filesystem without user xattrs cannot hold an opaque marker
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn tmp_name(&self) -> CString {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        rel_cstr(format!("#kiln-{n:x}").as_bytes())
    }

    /// Resolve `name` in the merged directory `parent` (state `ps` at path
    /// `ppath`); `None` when it does not exist or is whited out.
    fn resolve(&self, ps: &NodeState, ppath: &[u8], name: &[u8]) -> io::Result<Option<Found>> {
        let path = join(ppath, name);
        let c = rel_cstr(&path);
        let mut below = ps.lowers.iter().copied();
        if ps.upper {
            match sys::lstat_at(self.upper.raw(), &c) {
                Ok(st) if sys::is_whiteout(&st) => return Ok(None),
                Ok(st) => {
                    let mut found = Found {
                        st,
                        upper: true,
                        lowers: Vec::new(),
                    };
                    if found.is_dir() && !self.is_opaque(&self.upper, &path)? {
                        found.lowers = self.lower_dirs(below, &path, &c)?;
                    }
                    return Ok(Some(found));
                }
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(e),
            }
        }
        while let Some(i) = below.next() {
            match sys::lstat_at(self.lowers[i].raw(), &c) {
                Ok(st) if sys::is_whiteout(&st) => return Ok(None),
                Ok(st) => {
                    let mut found = Found {
                        st,
                        upper: false,
                        lowers: vec![i],
                    };
                    if found.is_dir() && !self.is_opaque(&self.lowers[i], &path)? {
                        let rest = self.lower_dirs(below, &path, &c)?;
                        found.lowers.extend(rest);
                    }
                    return Ok(Some(found));
                }
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The lower layers (from `below`) merged into a directory at `path`:
    /// each one holding a directory there, until a whiteout, a
    /// non-directory or an opaque directory stops the descent.
    fn lower_dirs(
        &self,
        below: impl Iterator<Item = usize>,
        path: &[u8],
        c: &CStr,
    ) -> io::Result<Vec<usize>> {
        let mut out = Vec::new();
        for i in below {
            match sys::lstat_at(self.lowers[i].raw(), c) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    out.push(i);
                    if self.is_opaque(&self.lowers[i], path)? {
                        break;
                    }
                }
                Ok(_) => break,
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Whether `name` exists (not whited out) in the lower layers merged
    /// into `parent`: then removing it from the view needs a whiteout.
    fn lower_visible(&self, ps: &NodeState, ppath: &[u8], name: &[u8]) -> io::Result<bool> {
        let c = rel_cstr(&join(ppath, name));
        for &i in &ps.lowers {
            match sys::lstat_at(self.lowers[i].raw(), &c) {
                Ok(st) => return Ok(!sys::is_whiteout(&st)),
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// The node for a resolved entry, creating it on first sight; records
    /// (parent, name) as one of its names.
    fn node_for(&self, found: &Found, parent: u64, name: &[u8]) -> io::Result<u64> {
        let key = found.key();
        let mut ids = self.ids.lock().map_err(poisoned)?;
        if let Some(&id) = ids.get(&key) {
            drop(ids);
            self.update(id, |s| {
                if !s.names.iter().any(|(p, n)| *p == parent && n == name) {
                    s.names.push((parent, name.to_vec()));
                }
            })?;
            return Ok(id);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        ids.insert(key, id);
        let node = Node {
            state: Mutex::new(NodeState {
                names: vec![(parent, name.to_vec())],
                upper: found.upper,
                lowers: found.lowers.clone(),
                kind: found.st.st_mode & libc::S_IFMT,
                keys: vec![key],
                lookups: 0,
                kept: None,
            }),
        };
        self.nodes
            .write()
            .map_err(poisoned)?
            .insert(id, Arc::new(node));
        Ok(id)
    }

    fn register(&self, id: u64, st: &Stat) -> io::Result<()> {
        let key = (st.st_dev, st.st_ino);
        self.ids.lock().map_err(poisoned)?.insert(key, id);
        self.update(id, |s| {
            if !s.keys.contains(&key) {
                s.keys.push(key)
            }
        })
    }

    /// Forget an upper identity whose last link is gone, so that a new file
    /// that reuses the inode number is not mistaken for this one.
    fn unregister(&self, st: &Stat) -> io::Result<()> {
        let key = (st.st_dev, st.st_ino);
        let id = self.ids.lock().map_err(poisoned)?.remove(&key);
        if let Some(id) = id {
            self.update(id, |s| s.keys.retain(|k| *k != key))?;
        }
        Ok(())
    }

    fn drop_name(&self, id: u64, parent: u64, name: &[u8]) -> io::Result<()> {
        self.update(id, |s| {
            s.names.retain(|(p, n)| !(*p == parent && n == name))
        })
    }

    /// What the view shows for a node: the real stat with the view's inode
    /// number, and link count 1 for merged directories as overlayfs reports.
    fn view_stat(&self, id: u64, s: &NodeState, mut st: Stat) -> Stat {
        let real_ino = st.st_ino;
        st.st_ino = id;
        if s.kind == libc::S_IFDIR && usize::from(s.upper) + s.lowers.len() > 1 {
            st.st_nlink = 1;
        }
        // A lower file's link count is the lower layer's: count the names
        // the view still shows (others may be removed, in this step or by a
        // higher layer), as a plain directory would.
        if !s.upper && s.kind == libc::S_IFREG && st.st_nlink > 1 {
            if let Some(&layer) = s.lowers.first() {
                if let Ok(n) = self.visible_links(layer, real_ino) {
                    st.st_nlink = n.max(1);
                }
            }
        }
        st
    }

    /// The layer's link index (see [`index_links`]), made on first use.
    fn link_index(&self, layer: usize) -> io::Result<Arc<LinkIndex>> {
        let mut cache = self.link_index.lock().map_err(poisoned)?;
        if let Some(i) = cache.get(&layer) {
            return Ok(Arc::clone(i));
        }
        use std::os::unix::ffi::OsStrExt;
        let mut index = LinkIndex::new();
        let root = self.lowers[layer].root_path().to_vec();
        index_links(
            std::path::Path::new(std::ffi::OsStr::from_bytes(&root)),
            b"",
            &mut index,
        )?;
        let index = Arc::new(index);
        cache.insert(layer, Arc::clone(&index));
        Ok(index)
    }

    /// How many names of the file `ino` of lower layer `layer` the view
    /// shows: its paths in the layer that resolve, from the root, to that
    /// very file. Walks without making nodes.
    fn visible_links(&self, layer: usize, ino: u64) -> io::Result<u64> {
        let index = self.link_index(layer)?;
        let root = self.state(ROOT_ID)?;
        let mut n = 0;
        'paths: for path in index.get(&ino).into_iter().flatten() {
            let mut ps = root.clone();
            let mut ppath: Vec<u8> = Vec::new();
            let comps: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
            for (k, comp) in comps.iter().enumerate() {
                let Some(found) = self.resolve(&ps, &ppath, comp)? else {
                    continue 'paths;
                };
                if k + 1 == comps.len() {
                    if !found.upper
                        && found.lowers.first() == Some(&layer)
                        && found.st.st_ino == ino
                    {
                        n += 1;
                    }
                } else if !found.is_dir() {
                    continue 'paths;
                } else {
                    ps.upper = found.upper;
                    ps.lowers = found.lowers;
                    ppath = join(&ppath, comp);
                }
            }
        }
        Ok(n)
    }

    fn entry(&self, id: u64, s: &NodeState, st: Stat) -> Entry {
        Entry {
            inode: id,
            generation: 0,
            attr: self.view_stat(id, s, st),
            attr_flags: 0,
            attr_timeout: TIMEOUT,
            entry_timeout: TIMEOUT,
        }
    }

    /// `e` as it is replied: the kernel counts one more lookup of its node
    /// for every entry it is given (lookup, create, mknod, mkdir, symlink,
    /// link and each readdirplus entry) and gives them back with FORGET.
    fn counted(&self, e: Entry) -> io::Result<Entry> {
        if e.inode != 0 {
            self.update(e.inode, |s| s.lookups += 1)?;
        }
        Ok(e)
    }

    /// Called, with `tree` held exclusively, before a name of `id` is
    /// removed: when it is the last name of a regular file the kernel still
    /// holds, keep the file's data open (see [`Kept`]).
    fn keep_data(&self, id: u64) -> io::Result<()> {
        let s = self.state(id)?;
        // Kept data that was written to is the file now; a kept lower
        // file is taken again (a removal that failed, or a copy-up since,
        // may have left it stale).
        let written = s.kept.as_ref().is_some_and(|k| k.writable && !s.upper);
        if s.kind != libc::S_IFREG || s.names.len() != 1 || s.lookups == 0 || written {
            return Ok(());
        }
        // writable only in the upper layer
        let file = self.open_data_fd(id, &s, s.upper)?;
        let writable = s.upper;
        self.update(id, |s| {
            s.kept = Some(Kept {
                file,
                writable,
                times: [None; 3],
            });
        })
    }

    /// The kept data of a node that lost every name; for a write, first
    /// replaced by a private, nameless copy in the work dir when it is
    /// still the lower file.
    fn kept_file(&self, id: u64, write: bool) -> io::Result<Arc<File>> {
        let node = self.node(id)?;
        let mut s = node.state.lock().map_err(poisoned)?;
        // a node the kernel still names from an old listing, removed since
        let kept = s.kept.as_ref().ok_or_else(|| err(libc::ENOENT))?;
        if !write || kept.writable {
            return Ok(kept.file.clone());
        }
        let st = with_times(sys::fstat(kept.file.as_raw_fd())?, kept.times);
        let copy = File::from(sys::open_at(
            self.work.raw(),
            c".",
            libc::O_TMPFILE | libc::O_RDWR,
            0o600,
        )?);
        sys::copy_data(&kept.file, &copy, st.st_size.unsigned_abs())?;
        sys::fchown(copy.as_raw_fd(), st.st_uid, st.st_gid)?;
        sys::fchmod(copy.as_raw_fd(), st.st_mode & 0o7777)?;
        sys::futimens(copy.as_raw_fd(), &sys::stat_times(&st))?;
        let copy = Arc::new(copy);
        s.kept = Some(Kept {
            file: copy.clone(),
            writable: true,
            times: [None; 3],
        });
        drop(s);
        // a recent descriptor of the lower file must not serve it any more
        self.drop_data_fds(id)?;
        Ok(copy)
    }

    /// The file to read or write for a request on `inode`: the handle's when
    /// the kernel sent one (files opened by CREATE), otherwise the node's
    /// real file (a recent descriptor, or opened by path; its kept data once
    /// it has no name), copied up first for a write.
    fn data_file(&self, inode: u64, handle: u64, write: bool) -> io::Result<Arc<File>> {
        if handle != 0 {
            // the only handles are directories'
            return Err(err(libc::EISDIR));
        }
        // A recent descriptor of the node serves without the tree lock: it
        // is dropped under that lock when the node's data moves (copy-up,
        // a private copy of kept data), and a request that raced such a
        // move is one ordered before it.
        if let Some(f) = self.recent_data_fd(inode, write)? {
            return Ok(f);
        }
        {
            let _t = self.tree.read().map_err(poisoned)?;
            let s = self.state(inode)?;
            if s.kind == libc::S_IFDIR {
                return Err(err(libc::EISDIR));
            }
            if s.names.is_empty() {
                return self.kept_file(inode, write);
            }
            if s.upper || !write {
                return self.open_data_fd(inode, &s, write);
            }
        }
        // The first write to a lower file copies it up.
        let _w = self.tree.write().map_err(poisoned)?;
        if self.state(inode)?.names.is_empty() {
            return self.kept_file(inode, true);
        }
        self.copy_up(inode, true)?;
        let s = self.state(inode)?;
        self.open_data_fd(inode, &s, true)
    }

    /// The node's real file for reading (its layer's, opened read-only:
    /// lower layers are never opened for writing) or writing (the upper
    /// one), from the recent descriptors or opened by path. Called with
    /// `tree` held.
    fn open_data_fd(&self, id: u64, s: &NodeState, write: bool) -> io::Result<Arc<File>> {
        if let Some(f) = self.recent_data_fd(id, write)? {
            return Ok(f);
        }
        let path = self.path_of(id)?;
        let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let f = Arc::new(File::from(sys::open_at(
            self.layer(s).raw(),
            &rel_cstr(&path),
            flags,
            0,
        )?));
        let mut fds = self.data_fds.lock().map_err(poisoned)?;
        fds.push_front((id, write, f.clone()));
        fds.truncate(DATA_FDS);
        Ok(f)
    }

    /// A recent descriptor of `id` fit for the request, moved to the front.
    fn recent_data_fd(&self, id: u64, write: bool) -> io::Result<Option<Arc<File>>> {
        let mut fds = self.data_fds.lock().map_err(poisoned)?;
        let Some(i) = fds.iter().position(|(n, w, _)| *n == id && (*w || !write)) else {
            return Ok(None);
        };
        let e = fds.remove(i).ok_or_else(|| err(libc::EIO))?;
        let f = e.2.clone();
        fds.push_front(e);
        Ok(Some(f))
    }

    fn drop_data_fds(&self, id: u64) -> io::Result<()> {
        self.data_fds
            .lock()
            .map_err(poisoned)?
            .retain(|(n, _, _)| *n != id);
        Ok(())
    }

    /// SETATTR on a file that lost every name (ftruncate or fchmod of an
    /// unlinked open file): applied to its handle or kept data.
    fn setattr_kept(
        &self,
        inode: u64,
        handle: Option<u64>,
        attr: &stat64,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        // `tree` is held: no data_file here
        if handle.is_some_and(|h| h != 0) {
            // the only handles are directories'
            return Err(err(libc::EISDIR));
        }
        let f = self.kept_file(inode, true)?;
        let fd = f.as_raw_fd();
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            let id = |set: SetattrValid, v: u32| if valid.contains(set) { v } else { u32::MAX };
            sys::fchown(
                fd,
                id(SetattrValid::UID, attr.st_uid),
                id(SetattrValid::GID, attr.st_gid),
            )?;
        }
        if valid.contains(SetattrValid::MODE) {
            sys::fchmod(fd, attr.st_mode & 0o7777)?;
        }
        if valid.contains(SetattrValid::SIZE) {
            sys::ftruncate(fd, attr.st_size.unsigned_abs())?;
        }
        if let Some(times) = setattr_times(attr, valid) {
            sys::futimens(fd, &times)?;
        }
        if valid.contains(SetattrValid::KILL_SUIDGID) {
            self.kill_suidgid(inode, fd)?;
        }
        let s = self.state(inode)?;
        Ok((self.view_stat(inode, &s, sys::fstat(fd)?), TIMEOUT))
    }

    /// A SETATTR of times alone on a file whose data is still a lower
    /// layer's, answered without copying the file. The kernel sends one
    /// whenever it flushes the mtime it holds with the ctime it set, as it
    /// does after every unlink or rename over of a name of a file it holds.
    /// A nameless file keeps any times with its kept data (nothing can name
    /// it again); a named one only an unchanged atime and mtime, as
    /// overlayfs then leaves it in its layer too. None: the SETATTR is
    /// applied as any other.
    fn lower_times(
        &self,
        inode: u64,
        attr: &stat64,
        valid: SetattrValid,
    ) -> io::Result<Option<Stat>> {
        if !TIMES_ONLY.contains(valid) {
            return Ok(None);
        }
        let set = requested_times(attr, valid);
        let node = self.node(inode)?;
        let mut s = node.state.lock().map_err(poisoned)?;
        if s.names.is_empty() {
            let Some(kept) = s.kept.as_mut().filter(|k| !k.writable) else {
                return Ok(None);
            };
            for (slot, t) in kept.times.iter_mut().zip(set) {
                *slot = t.or(*slot);
            }
            let st = with_times(sys::fstat(kept.file.as_raw_fd())?, kept.times);
            return Ok(Some(self.view_stat(inode, &s, st)));
        }
        if s.upper {
            return Ok(None);
        }
        drop(s);
        let (s, st) = self.stat_node(inode)?;
        let unchanged =
            |t: Option<libc::timespec>, have| t.is_none_or(|t| (t.tv_sec, t.tv_nsec) == have);
        if !unchanged(set[0], (st.st_atime, st.st_atime_nsec))
            || !unchanged(set[1], (st.st_mtime, st.st_mtime_nsec))
        {
            return Ok(None);
        }
        Ok(Some(self.view_stat(inode, &s, with_times(st, set))))
    }

    fn stat_node(&self, id: u64) -> io::Result<(NodeState, Stat)> {
        let s = self.state(id)?;
        let path = self.path_of(id)?;
        let st = sys::lstat_at(self.layer(&s).raw(), &rel_cstr(&path))?;
        Ok((s, st))
    }

    fn lookup_locked(&self, parent: u64, name: &[u8]) -> io::Result<Option<(u64, Found)>> {
        let ps = self.state(parent)?;
        if ps.kind != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        let ppath = self.path_of(parent)?;
        match self.resolve(&ps, &ppath, name)? {
            None => Ok(None),
            Some(found) => {
                let id = self.node_for(&found, parent, name)?;
                Ok(Some((id, found)))
            }
        }
    }

    // ---- copy-up -------------------------------------------------------

    /// Give the node a copy in the upper layer (no-op when it has one):
    /// parents first, then the node through the work dir. `with_data` false
    /// copies a regular file's metadata only (for O_TRUNC opens).
    fn copy_up(&self, id: u64, with_data: bool) -> io::Result<()> {
        let s = self.state(id)?;
        if s.upper {
            return Ok(());
        }
        let (parent, _) = s.names.first().cloned().ok_or_else(|| err(libc::ENOENT))?;
        self.copy_up(parent, true)?;
        let path = self.path_of(id)?;
        let lower = &self.lowers[s.lowers[0]];
        let c = rel_cstr(&path);
        let st = sys::lstat_at(lower.raw(), &c)?;
        let tmp = self.tmp_name();
        let w = self.work.raw();
        let kind = st.st_mode & libc::S_IFMT;
        let res = (|| -> io::Result<Stat> {
            match kind {
                libc::S_IFDIR => sys::mkdir_at(w, &tmp, 0o700)?,
                libc::S_IFREG => {
                    let dst = File::from(sys::open_at(
                        w,
                        &tmp,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                        0o600,
                    )?);
                    if with_data && st.st_size > 0 {
                        let src = File::from(sys::open_at(lower.raw(), &c, libc::O_RDONLY, 0)?);
                        sys::copy_data(&src, &dst, st.st_size.unsigned_abs())?;
                    }
                }
                libc::S_IFLNK => {
                    let target = sys::readlink_at(lower.raw(), &c)?;
                    let target = CString::new(target).map_err(|_| err(libc::EINVAL))?;
                    sys::symlink_at(&target, w, &tmp)?;
                }
                _ => sys::mknod_at(w, &tmp, st.st_mode, st.st_rdev)?,
            }
            self.copy_meta(&st, &lower.xpath(&path)?, &tmp)?;
            sys::lstat_at(w, &tmp)
        })();
        let new_st = match res {
            Ok(st) => st,
            Err(e) => {
                let _ = self.remove_work_tree(&tmp);
                return Err(e);
            }
        };
        // Copy-up must not show as a change of the parent directory: keep
        // its times as overlayfs does.
        let ppath = parent_path(&path);
        let pst = sys::lstat_at(self.upper.raw(), &rel_cstr(ppath))?;
        if let Err(e) = sys::rename_at(w, &tmp, self.upper.raw(), &c, libc::RENAME_NOREPLACE) {
            let _ = self.remove_work_tree(&tmp);
            return Err(e);
        }
        sys::lutimens_at(self.upper.raw(), &rel_cstr(ppath), &sys::stat_times(&pst))?;
        self.update(id, |s| {
            s.upper = true;
            if s.kind != libc::S_IFDIR {
                s.lowers.clear();
            }
        })?;
        // a descriptor of the lower file must not serve it any more
        self.drop_data_fds(id)?;
        self.register(id, &new_st)?;
        // Other names of a hard-linked lower file stay linked to the copy:
        // those the view shows, whether or not the kernel asked for them
        // yet (else a name it asks for later would show the copy while the
        // layer keeps the lower file under it).
        if kind == libc::S_IFREG && st.st_nlink > 1 {
            self.link_lower_names(id, s.lowers[0], &st, &path)?;
        }
        if kind != libc::S_IFDIR {
            for (p, n) in s.names.iter().skip(1) {
                self.copy_up(*p, true)?;
                let other = join(&self.path_of(*p)?, n);
                match sys::link_at(self.upper.raw(), &c, self.upper.raw(), &rel_cstr(&other)) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// After the copy-up of the lower file `st` (of layer `layer`, at
    /// `path`, node `id`): link into upper every other name of it that the
    /// view shows, found through the layer's link index and checked by
    /// resolving it from the root (a name whited out, shadowed by a higher
    /// layer or under an opaque directory is not the view's).
    fn link_lower_names(&self, id: u64, layer: usize, st: &Stat, path: &[u8]) -> io::Result<()> {
        let index = self.link_index(layer)?;
        for other in index.get(&st.st_ino).into_iter().flatten() {
            if other.as_slice() == path {
                continue;
            }
            let comps: Vec<&[u8]> = other.split(|b| *b == b'/').collect();
            let mut parent = ROOT_ID;
            let mut same = false;
            for (k, comp) in comps.iter().enumerate() {
                let Some((cid, found)) = self.lookup_locked(parent, comp)? else {
                    break;
                };
                if k + 1 == comps.len() {
                    same = cid == id
                        && !found.upper
                        && found.lowers.first() == Some(&layer)
                        && found.st.st_ino == st.st_ino;
                } else if !found.is_dir() {
                    break;
                }
                if k + 1 < comps.len() {
                    parent = cid;
                }
            }
            if !same {
                continue;
            }
            self.copy_up(parent, true)?;
            // like copy-up, this is no change of the directory: keep its
            // times
            let ppath = rel_cstr(parent_path(other));
            let pst = sys::lstat_at(self.upper.raw(), &ppath)?;
            match sys::link_at(
                self.upper.raw(),
                &rel_cstr(path),
                self.upper.raw(),
                &rel_cstr(other),
            ) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            sys::lutimens_at(self.upper.raw(), &ppath, &sys::stat_times(&pst))?;
        }
        Ok(())
    }

    /// Owner, mode, xattrs and times of `st` (read from `src_abs`) onto the
    /// work entry `tmp`, in the order that keeps setuid bits and
    /// security.capability (chown clears both).
    fn copy_meta(&self, st: &Stat, src_abs: &[u8], tmp: &CStr) -> io::Result<()> {
        let w = self.work.raw();
        let kind = st.st_mode & libc::S_IFMT;
        sys::lchown_at(w, tmp, st.st_uid, st.st_gid)?;
        if kind != libc::S_IFLNK {
            sys::chmod_at(w, tmp, st.st_mode & 0o7777)?;
        }
        let names = match sys::llistxattr(src_abs) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
            Err(e) => return Err(e),
        };
        if !names.is_empty() {
            let dst_abs = self.work.xpath(tmp.to_bytes())?;
            for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
                if name.starts_with(OVERLAY_XATTR_PREFIX) {
                    continue;
                }
                let cname = CString::new(name).map_err(|_| err(libc::EINVAL))?;
                if let Some(v) = sys::lgetxattr(src_abs, &cname)? {
                    match sys::lsetxattr(&dst_abs, &cname, &v, 0) {
                        Ok(()) => {}
                        // trusted.* and some security.* names cannot be set
                        // from a user namespace; overlayfs skips them too
                        Err(e)
                            if !name.starts_with(b"user.")
                                && matches!(
                                    e.raw_os_error(),
                                    Some(libc::EPERM | libc::EOPNOTSUPP)
                                ) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        sys::lutimens_at(w, tmp, &sys::stat_times(st))
    }

    /// Remove a work-dir entry and everything under it.
    fn remove_work_tree(&self, tmp: &CStr) -> io::Result<()> {
        match sys::lstat_at(self.work.raw(), tmp) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                use std::os::unix::ffi::OsStrExt;
                let abs = self.work.xpath(tmp.to_bytes())?;
                std::fs::remove_dir_all(std::ffi::OsStr::from_bytes(&abs))
            }
            Ok(_) => sys::unlink_at(self.work.raw(), tmp, 0),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Copy up a directory with everything it shows and cut it off from the
    /// lower layers (needed before it can be renamed: the layer format has
    /// no redirects).
    fn materialize(&self, id: u64) -> io::Result<()> {
        self.copy_up(id, true)?;
        let s = self.state(id)?;
        if s.kind != libc::S_IFDIR {
            return Ok(());
        }
        if !s.lowers.is_empty() {
            let path = self.path_of(id)?;
            for (name, _t) in self.merged_names(&s, &path)? {
                if let Some(found) = self.resolve(&s, &path, &name)? {
                    let child = self.node_for(&found, id, &name)?;
                    self.materialize(child)?;
                }
            }
            self.update(id, |s| s.lowers.clear())?;
        }
        Ok(())
    }

    /// Visible names of a merged directory with their d_type (whiteouts
    /// applied, upper first).
    fn merged_names(&self, s: &NodeState, path: &[u8]) -> io::Result<Vec<(Vec<u8>, u8)>> {
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut out = Vec::new();
        let mut layers: Vec<&LayerDir> = Vec::new();
        if s.upper {
            layers.push(&self.upper);
        }
        layers.extend(s.lowers.iter().map(|&i| &self.lowers[i]));
        let single = layers.len() == 1;
        for layer in layers {
            let entries = match sys::read_dir(layer.raw(), &rel_cstr(path)) {
                Ok(e) => e,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(e),
            };
            for (name, t) in entries {
                if !single && !seen.insert(name.clone()) {
                    continue;
                }
                if t == libc::DT_CHR || t == libc::DT_UNKNOWN {
                    let st = sys::lstat_at(layer.raw(), &rel_cstr(&join(path, &name)))?;
                    if sys::is_whiteout(&st) {
                        continue;
                    }
                }
                out.push((name, t));
            }
        }
        Ok(out)
    }

    /// Empty an upper directory that the view shows as empty (it can only
    /// hold whiteouts) so that it can be replaced or removed.
    fn clear_upper_dir(&self, path: &[u8]) -> io::Result<()> {
        for (name, _) in sys::read_dir(self.upper.raw(), &rel_cstr(path))? {
            let c = rel_cstr(&join(path, &name));
            match sys::unlink_at(self.upper.raw(), &c, 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                    self.clear_upper_dir(&join(path, &name))?;
                    sys::unlink_at(self.upper.raw(), &c, libc::AT_REMOVEDIR)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Put a whiteout at upper `path`, replacing whatever is there.
    /// rename(2) with RENAME_EXCHANGE of two non-directories `src` and
    /// `dst`, each given with its node id; `old` and `new` are (parent id,
    /// parent path, name).
    fn rename_exchange(
        &self,
        (src, src_id): (&Found, u64),
        (dst, dst_id): (&Found, u64),
        (olddir, oldp, oldname): (u64, &[u8], &[u8]),
        (newdir, newp, newname): (u64, &[u8], &[u8]),
    ) -> io::Result<()> {
        if src.is_dir() || dst.is_dir() {
            // exchanging directories would need redirects the layer
            // format does not have; callers fall back to copying
            return Err(err(libc::EXDEV));
        }
        self.copy_up(src_id, true)?;
        self.copy_up(dst_id, true)?;
        sys::rename_at(
            self.upper.raw(),
            &rel_cstr(&join(oldp, oldname)),
            self.upper.raw(),
            &rel_cstr(&join(newp, newname)),
            libc::RENAME_EXCHANGE,
        )?;
        self.drop_name(src_id, olddir, oldname)?;
        self.drop_name(dst_id, newdir, newname)?;
        self.update(src_id, |s| s.names.insert(0, (newdir, newname.to_vec())))?;
        self.update(dst_id, |s| s.names.insert(0, (olddir, oldname.to_vec())))?;
        Ok(())
    }

    /// Whether `src` may replace `dst` (node `dst_id`, at `newpath`), as
    /// rename(2) decides: same kind, and an empty directory.
    fn check_replace(
        &self,
        src: &Found,
        dst: &Found,
        dst_id: u64,
        newpath: &[u8],
    ) -> io::Result<()> {
        match (src.is_dir(), dst.is_dir()) {
            (true, false) => return Err(err(libc::ENOTDIR)),
            (false, true) => return Err(err(libc::EISDIR)),
            _ => {}
        }
        if dst.is_dir() {
            let ds = self.state(dst_id)?;
            if !self.merged_names(&ds, newpath)?.is_empty() {
                return Err(err(libc::ENOTEMPTY));
            }
        }
        Ok(())
    }

    /// Move `oldpath` to `newpath` in upper. `dir_to_free_name` says a
    /// directory moves to a name nothing in the view holds; `old_whiteout`
    /// that the lowers show something at the old name, which must stay
    /// hidden.
    fn move_in_upper(
        &self,
        oldpath: &[u8],
        newpath: &[u8],
        dir_to_free_name: bool,
        old_whiteout: bool,
    ) -> io::Result<()> {
        let u = self.upper.raw();
        let (oc, nc) = (rel_cstr(oldpath), rel_cstr(newpath));
        // A name removed in this view is a whiteout in upper: a file
        // replaces it, but rename(2) refuses to put a directory over a
        // non-directory. Swap the two instead: the directory lands, the
        // whiteout moves to the old name (kept if the lowers have it there).
        let whiteout_at_new =
            dir_to_free_name && sys::lstat_at(u, &nc).is_ok_and(|st| sys::is_whiteout(&st));
        if whiteout_at_new {
            sys::rename_at(u, &oc, u, &nc, libc::RENAME_EXCHANGE)?;
            if !old_whiteout {
                sys::unlink_at(u, &oc, 0)?;
            }
        } else if old_whiteout {
            match sys::rename_at(u, &oc, u, &nc, libc::RENAME_WHITEOUT) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM)) => {
                    sys::rename_at(u, &oc, u, &nc, 0)?;
                    self.whiteout(oldpath, false)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            sys::rename_at(u, &oc, u, &nc, 0)?;
        }
        Ok(())
    }

    fn whiteout(&self, path: &[u8], replace: bool) -> io::Result<()> {
        let c = rel_cstr(path);
        if !replace {
            return sys::mknod_at(self.upper.raw(), &c, libc::S_IFCHR, 0);
        }
        let tmp = self.tmp_name();
        sys::mknod_at(self.work.raw(), &tmp, libc::S_IFCHR, 0)?;
        sys::rename_at(self.work.raw(), &tmp, self.upper.raw(), &c, 0).inspect_err(|_| {
            let _ = sys::unlink_at(self.work.raw(), &tmp, 0);
        })
    }

    // ---- creation --------------------------------------------------------

    /// Create a new entry `name` in `parent` with `make(dirfd, name)`, owned
    /// by the caller, replacing a whiteout atomically when there is one.
    fn create_entry(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        kind: u32,
        mode: u32,
        make: impl FnOnce(RawFd, &CStr) -> io::Result<Option<File>>,
    ) -> io::Result<(u64, Stat, Option<File>)> {
        self.copy_up(parent, true)?;
        let ppath = self.path_of(parent)?;
        let path = join(&ppath, name);
        let c = rel_cstr(&path);
        let pst = sys::lstat_at(self.upper.raw(), &rel_cstr(&ppath))?;
        let over_whiteout = match sys::lstat_at(self.upper.raw(), &c) {
            Ok(st) if sys::is_whiteout(&st) => true,
            Ok(_) => return Err(err(libc::EEXIST)),
            Err(e) if is_missing(&e) => false,
            Err(e) => return Err(e),
        };
        // A new directory over a whiteout must hide what the lower layers
        // still hold under that name.
        let ps = self.state(parent)?;
        let opaque =
            kind == libc::S_IFDIR && (over_whiteout || self.lower_visible(&ps, &ppath, name)?);
        let setgid = pst.st_mode & libc::S_ISGID != 0;
        let gid = if setgid { pst.st_gid } else { ctx.gid };
        let mut want_mode = mode & 0o7777;
        if setgid && kind == libc::S_IFDIR {
            want_mode |= libc::S_ISGID;
        }
        let (dirfd, at): (RawFd, CString) = if over_whiteout || opaque {
            (self.work.raw(), self.tmp_name())
        } else {
            (self.upper.raw(), c.clone())
        };
        let file = make(dirfd, &at)?;
        let fix = (|| -> io::Result<Stat> {
            let mut st = sys::lstat_at(dirfd, &at)?;
            if st.st_uid != ctx.uid || st.st_gid != gid {
                sys::lchown_at(dirfd, &at, ctx.uid, gid)?;
                st.st_uid = ctx.uid;
                st.st_gid = gid;
            }
            if kind != libc::S_IFLNK && st.st_mode & 0o7777 != want_mode {
                sys::chmod_at(dirfd, &at, want_mode)?;
                st.st_mode = (st.st_mode & libc::S_IFMT) | want_mode;
            }
            if opaque {
                sys::lsetxattr(&self.work.xpath(at.to_bytes())?, OPAQUE_XATTR, b"y", 0)?;
            }
            if dirfd != self.upper.raw() {
                let flags = if kind == libc::S_IFDIR && over_whiteout {
                    libc::RENAME_EXCHANGE
                } else if over_whiteout {
                    0
                } else {
                    libc::RENAME_NOREPLACE
                };
                sys::rename_at(dirfd, &at, self.upper.raw(), &c, flags)?;
                if flags == libc::RENAME_EXCHANGE {
                    // the whiteout now sits in the work dir
                    sys::unlink_at(self.work.raw(), &at, 0)?;
                }
            }
            Ok(st)
        })();
        let st = match fix {
            Ok(st) => st,
            Err(e) => {
                if dirfd == self.upper.raw() {
                    let flag = if kind == libc::S_IFDIR {
                        libc::AT_REMOVEDIR
                    } else {
                        0
                    };
                    let _ = sys::unlink_at(dirfd, &at, flag);
                } else {
                    let _ = self.remove_work_tree(&at);
                }
                return Err(e);
            }
        };
        let found = Found {
            st,
            upper: true,
            lowers: Vec::new(),
        };
        // The file is brand new: a node still mapped to its (dev, ino) is a
        // deleted file whose inode number the filesystem recycled, and the
        // kernel may still hold that node; never hand its id out again.
        self.ids
            .lock()
            .map_err(poisoned)?
            .remove(&(st.st_dev, st.st_ino));
        let id = self.node_for(&found, parent, name)?;
        Ok((id, st, file))
    }

    fn handle(&self, h: u64) -> io::Result<Arc<Handle>> {
        self.handles
            .read()
            .map_err(poisoned)?
            .get(&h)
            .cloned()
            .ok_or_else(|| err(libc::EBADF))
    }

    fn new_handle(&self, h: Handle) -> io::Result<u64> {
        let id = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .map_err(poisoned)?
            .insert(id, Arc::new(h));
        Ok(id)
    }

    fn open_flags(&self, flags: u32) -> i32 {
        let mut f = i32::from_ne_bytes(flags.to_ne_bytes())
            & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
        if self.writeback.load(Ordering::Relaxed) {
            // With writeback caching the kernel reads pages of files opened
            // write-only and applies O_APPEND itself.
            if f & libc::O_ACCMODE == libc::O_WRONLY {
                f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            f &= !libc::O_APPEND;
        }
        f
    }

    /// The merged listing of directory `inode`, with a node for every entry.
    fn list_dir(&self, inode: u64) -> io::Result<DirList> {
        let _t = self.tree.read().map_err(poisoned)?;
        let s = self.state(inode)?;
        let path = self.path_of(inode)?;
        let parent = s.names.first().map(|(p, _)| *p).unwrap_or(ROOT_ID);
        let mut entries = vec![
            (b".".to_vec(), libc::DT_DIR as u32, inode, None),
            (b"..".to_vec(), libc::DT_DIR as u32, parent, None),
        ];
        for (name, _t) in self.merged_names(&s, &path)? {
            if let Some(found) = self.resolve(&s, &path, &name)? {
                let id = self.node_for(&found, inode, &name)?;
                let t = (found.st.st_mode & libc::S_IFMT) >> 12;
                entries.push((name, t, id, Some(found.st)));
            }
        }
        Ok(DirList { entries })
    }

    /// The listing behind a directory handle, made on first use.
    fn dir_list(&self, inode: u64, handle: u64) -> io::Result<Arc<DirList>> {
        let h = self.handle(handle)?;
        let mut slot = h.0.lock().map_err(poisoned)?;
        if let Some(list) = &*slot {
            return Ok(list.clone());
        }
        let list = Arc::new(self.list_dir(inode)?);
        *slot = Some(list.clone());
        Ok(list)
    }

    /// The file a READ of `inode` through `handle` reads (for the splice
    /// read path).
    pub(crate) fn read_file(&self, inode: u64, handle: u64) -> Option<impl AsRawFd> {
        self.data_file(inode, handle, false).ok()
    }

    fn xattr_path(&self, id: u64) -> io::Result<XPath> {
        let s = self.state(id)?;
        let path = self.path_of(id)?;
        self.layer(&s).xpath(&path)
    }
}

/// What a write by an unprivileged caller does to a file's mode: drop
/// setuid, and setgid when group-executable (setgid without group exec is a
/// mandatory-locking marker and stays).
/// The times a SETATTR asks for (atime, mtime, ctime), "now" read from the
/// clock the kernel stamps inodes from.
fn requested_times(attr: &stat64, valid: SetattrValid) -> [Option<libc::timespec>; 3] {
    let [a, m] = setattr_times(attr, valid).map_or([None; 2], |ts| {
        ts.map(|t| match t.tv_nsec {
            libc::UTIME_OMIT => None,
            libc::UTIME_NOW => {
                let now = crate::sys::coarse_now();
                Some(libc::timespec {
                    tv_sec: now.sec,
                    tv_nsec: now.nsec,
                })
            }
            _ => Some(t),
        })
    });
    let c = valid
        .contains(SetattrValid::CTIME)
        .then_some(libc::timespec {
            tv_sec: attr.st_ctime,
            tv_nsec: attr.st_ctime_nsec,
        });
    [a, m, c]
}

/// The times a SETATTR asks for, as `utimensat` takes them; None when it
/// sets none.
fn setattr_times(attr: &stat64, valid: SetattrValid) -> Option<[libc::timespec; 2]> {
    if !valid.intersects(
        SetattrValid::ATIME
            | SetattrValid::MTIME
            | SetattrValid::ATIME_NOW
            | SetattrValid::MTIME_NOW,
    ) {
        return None;
    }
    let at = |now: SetattrValid, set: SetattrValid, sec: i64, nsec: i64| {
        if valid.contains(now) {
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            }
        } else if valid.contains(set) {
            libc::timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
        } else {
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            }
        }
    };
    Some([
        at(
            SetattrValid::ATIME_NOW,
            SetattrValid::ATIME,
            attr.st_atime,
            attr.st_atime_nsec,
        ),
        at(
            SetattrValid::MTIME_NOW,
            SetattrValid::MTIME,
            attr.st_mtime,
            attr.st_mtime_nsec,
        ),
    ])
}

fn killed_mode(mode: u32) -> u32 {
    let mut m = mode & 0o7777 & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        m &= !libc::S_ISGID;
    }
    m
}

fn kill_suidgid_path(dir: RawFd, rel: &CStr, fd: RawFd) -> io::Result<()> {
    let st = sys::fstat(fd)?;
    let m = killed_mode(st.st_mode);
    if m != st.st_mode & 0o7777 {
        sys::chmod_at(dir, rel, m)?;
    }
    Ok(())
}

/// The parent part of a relative path ("" for a top-level name).
fn parent_path(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

fn poisoned<T>(_: T) -> io::Error {
    err(libc::EIO)
}

fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// A `File` view of a handle's fd for the crate's zero-copy traits, which
/// want `&mut`; reads and writes are positional so sharing is fine.
fn borrow_fd(f: &impl AsRawFd) -> ManuallyDrop<File> {
    // SAFETY: the fd stays owned by `f`, which outlives the returned value;
    // ManuallyDrop ensures the borrowed File never closes it.
    ManuallyDrop::new(unsafe { File::from_raw_fd(f.as_raw_fd()) })
}

impl FileSystem for OverlayFs {
    type Inode = u64;
    type Handle = u64;

    // Not used, on purpose: FUSE passthrough (Linux 6.9+) would let the
    // kernel read and write the upper/lower files directly, but registering a
    // backing file (FUSE_DEV_IOC_BACKING_OPEN) needs CAP_SYS_ADMIN in the
    // initial user namespace, which rootless kiln never has. Splice is not
    // offered by fuse-backend-rs' server either, so data is copied once
    // through our buffers each way.
    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let want = FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::WRITEBACK_CACHE
            // We clear setuid/setgid ourselves when the kernel says so; in
            // exchange the kernel stops asking for security.capability
            // before every write (SB_NOSEC).
            | FsOptions::HANDLE_KILLPRIV_V2;
        if capable.contains(FsOptions::WRITEBACK_CACHE) {
            self.writeback.store(true, Ordering::Relaxed);
        }
        Ok(want & capable)
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        let Ok(node) = self.node(inode) else {
            return;
        };
        let Ok(mut s) = node.state.lock() else {
            return;
        };
        s.lookups = s.lookups.saturating_sub(count);
        if s.lookups == 0 {
            // no open file of it is left: let its kept data go
            s.kept = None;
            drop(s);
            let _ = self.drop_data_fds(inode);
        }
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let name = name.to_bytes();
        let _t = self.tree.read().map_err(poisoned)?;
        match self.lookup_locked(parent, name)? {
            None => Ok(Entry {
                inode: 0,
                entry_timeout: TIMEOUT,
                ..Default::default()
            }),
            Some((id, found)) => {
                let s = self.state(id)?;
                if s.upper && !found.upper && s.kind != libc::S_IFDIR {
                    // another name of a lower hard link that was copied up:
                    // link this name to the copy too
                    drop(_t);
                    let _w = self.tree.write().map_err(poisoned)?;
                    let (id, _) = self
                        .lookup_locked(parent, name)?
                        .ok_or_else(|| err(libc::ENOENT))?;
                    self.copy_up(parent, true)?;
                    let ppath = self.path_of(parent)?;
                    let src = self.path_of(id)?;
                    let dst = join(&ppath, name);
                    if src != dst {
                        match sys::link_at(
                            self.upper.raw(),
                            &rel_cstr(&src),
                            self.upper.raw(),
                            &rel_cstr(&dst),
                        ) {
                            Ok(()) => {}
                            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    let (s, st) = self.stat_node(id)?;
                    return self.counted(self.entry(id, &s, st));
                }
                let st = if s.upper == found.upper {
                    found.st
                } else {
                    self.stat_node(id)?.1
                };
                self.counted(self.entry(id, &s, st))
            }
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        // By name first: a handle opened before a copy-up still points at
        // the lower file. A file that lost every name is answered from its
        // handle or its kept data.
        let by_name = {
            let _t = self.tree.read().map_err(poisoned)?;
            self.stat_node(inode)
        };
        match by_name {
            Ok((s, st)) => Ok((self.view_stat(inode, &s, st), TIMEOUT)),
            Err(e) => {
                let s = self.state(inode)?;
                if !s.names.is_empty() {
                    return Err(e);
                }
                let mut st = match self.data_file(inode, handle.unwrap_or(0), false) {
                    Ok(f) => sys::fstat(f.as_raw_fd())?,
                    Err(_) => return Err(e),
                };
                if let Some(k) = &s.kept {
                    st = with_times(st, k.times);
                }
                Ok((self.view_stat(inode, &s, st), TIMEOUT))
            }
        }
    }

    fn setattr(
        &self,
        _ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let _w = self.tree.write().map_err(poisoned)?;
        if let Some(st) = self.lower_times(inode, &attr, valid)? {
            return Ok((st, TIMEOUT));
        }
        if self.state(inode)?.names.is_empty() {
            return self.setattr_kept(inode, handle, &attr, valid);
        }
        // A truncate to the size the file has: with the writeback cache
        // the kernel keeps the file's times whatever the server does (ext4
        // would move mtime; POSIX does not ask it), so leave the file as
        // it is: the step sees what is committed.
        let changes = SetattrValid::MODE
            | SetattrValid::UID
            | SetattrValid::GID
            | SetattrValid::ATIME
            | SetattrValid::MTIME
            | SetattrValid::ATIME_NOW
            | SetattrValid::MTIME_NOW;
        if valid.contains(SetattrValid::SIZE) && !valid.intersects(changes) {
            let (s, st) = self.stat_node(inode)?;
            let kills = valid.contains(SetattrValid::KILL_SUIDGID)
                && st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0;
            if s.kind == libc::S_IFREG && st.st_size == attr.st_size && !kills {
                return Ok((self.view_stat(inode, &s, st), TIMEOUT));
            }
        }
        // Truncating to zero needs no data copy.
        let truncating = valid.contains(SetattrValid::SIZE) && attr.st_size == 0;
        self.copy_up(inode, !truncating)?;
        let path = self.path_of(inode)?;
        let c = rel_cstr(&path);
        let u = self.upper.raw();
        let s = self.state(inode)?;
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            let uid = if valid.contains(SetattrValid::UID) {
                attr.st_uid
            } else {
                u32::MAX
            };
            let gid = if valid.contains(SetattrValid::GID) {
                attr.st_gid
            } else {
                u32::MAX
            };
            sys::lchown_at(u, &c, uid, gid)?;
        }
        if valid.contains(SetattrValid::MODE) && s.kind != libc::S_IFLNK {
            sys::chmod_at(u, &c, attr.st_mode & 0o7777)?;
        }
        if valid.contains(SetattrValid::SIZE) {
            let len = attr.st_size.unsigned_abs();
            let f = sys::open_at(u, &c, libc::O_WRONLY, 0)?;
            sys::ftruncate(f.as_raw_fd(), len)?;
        }
        if let Some(times) = setattr_times(&attr, valid) {
            sys::lutimens_at(u, &c, &times)?;
        }
        if valid.contains(SetattrValid::KILL_SUIDGID) && s.kind == libc::S_IFREG {
            let f = sys::open_at(u, &c, libc::O_PATH, 0)?;
            kill_suidgid_path(u, &c, f.as_raw_fd())?;
        }
        let st = sys::lstat_at(u, &c)?;
        Ok((self.view_stat(inode, &s, st), TIMEOUT))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let _t = self.tree.read().map_err(poisoned)?;
        let s = self.state(inode)?;
        let path = self.path_of(inode)?;
        sys::readlink_at(self.layer(&s).raw(), &rel_cstr(&path))
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let _w = self.tree.write().map_err(poisoned)?;
        let (id, st, _) = self.create_entry(
            ctx,
            parent,
            name.to_bytes(),
            libc::S_IFLNK,
            0o777,
            |d, n| sys::symlink_at(linkname, d, n).map(|_| None),
        )?;
        let s = self.state(id)?;
        self.counted(self.entry(id, &s, st))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR && rdev == 0 {
            // a whiteout would read as a deletion in the layer
            return Err(err(libc::EPERM));
        }
        let _w = self.tree.write().map_err(poisoned)?;
        let (id, st, _) = self.create_entry(ctx, parent, name.to_bytes(), kind, mode, |d, n| {
            sys::mknod_at(d, n, mode, u64::from(rdev)).map(|_| None)
        })?;
        let s = self.state(id)?;
        self.counted(self.entry(id, &s, st))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        let _w = self.tree.write().map_err(poisoned)?;
        let (id, st, _) =
            self.create_entry(ctx, parent, name.to_bytes(), libc::S_IFDIR, mode, |d, n| {
                sys::mkdir_at(d, n, mode & 0o7777).map(|_| None)
            })?;
        let s = self.state(id)?;
        self.counted(self.entry(id, &s, st))
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let name = name.to_bytes();
        let _w = self.tree.write().map_err(poisoned)?;
        let ps = self.state(parent)?;
        let ppath = self.path_of(parent)?;
        let found = self
            .resolve(&ps, &ppath, name)?
            .ok_or_else(|| err(libc::ENOENT))?;
        if found.is_dir() {
            return Err(err(libc::EISDIR));
        }
        let id = self.node_for(&found, parent, name)?;
        self.keep_data(id)?;
        let path = join(&ppath, name);
        let needs_whiteout = self.lower_visible(&ps, &ppath, name)?;
        if found.upper {
            if needs_whiteout {
                self.whiteout(&path, true)?;
            } else {
                sys::unlink_at(self.upper.raw(), &rel_cstr(&path), 0)?;
            }
            if found.st.st_nlink <= 1 {
                self.unregister(&found.st)?;
            }
        } else {
            self.copy_up(parent, true)?;
            self.whiteout(&path, false)?;
        }
        self.drop_name(id, parent, name)
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let name = name.to_bytes();
        let _w = self.tree.write().map_err(poisoned)?;
        let ps = self.state(parent)?;
        let ppath = self.path_of(parent)?;
        let found = self
            .resolve(&ps, &ppath, name)?
            .ok_or_else(|| err(libc::ENOENT))?;
        if !found.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        let id = self.node_for(&found, parent, name)?;
        let path = join(&ppath, name);
        let cs = self.state(id)?;
        if !self.merged_names(&cs, &path)?.is_empty() {
            return Err(err(libc::ENOTEMPTY));
        }
        let needs_whiteout = self.lower_visible(&ps, &ppath, name)?;
        let c = rel_cstr(&path);
        if found.upper {
            let tmp = self.tmp_name();
            if needs_whiteout {
                sys::mknod_at(self.work.raw(), &tmp, libc::S_IFCHR, 0)?;
                sys::rename_at(
                    self.work.raw(),
                    &tmp,
                    self.upper.raw(),
                    &c,
                    libc::RENAME_EXCHANGE,
                )?;
            } else {
                sys::rename_at(self.upper.raw(), &c, self.work.raw(), &tmp, 0)?;
            }
            self.remove_work_tree(&tmp)?;
            self.unregister(&found.st)?;
        } else {
            self.copy_up(parent, true)?;
            self.whiteout(&path, false)?;
        }
        self.drop_name(id, parent, name)
    }

    fn rename(
        &self,
        _ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let (oldname, newname) = (oldname.to_bytes(), newname.to_bytes());
        let _w = self.tree.write().map_err(poisoned)?;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(err(libc::EINVAL));
        }
        let ops = self.state(olddir)?;
        let oldp = self.path_of(olddir)?;
        let src = self
            .resolve(&ops, &oldp, oldname)?
            .ok_or_else(|| err(libc::ENOENT))?;
        let nps = self.state(newdir)?;
        let newp = self.path_of(newdir)?;
        let dst = self.resolve(&nps, &newp, newname)?;
        let src_id = self.node_for(&src, olddir, oldname)?;
        let dst = match dst {
            Some(d) => {
                let id = self.node_for(&d, newdir, newname)?;
                Some((d, id))
            }
            None => None,
        };
        let old = (olddir, oldp.as_slice(), oldname);
        let new = (newdir, newp.as_slice(), newname);
        if flags & libc::RENAME_EXCHANGE != 0 {
            let Some((d, did)) = &dst else {
                return Err(err(libc::ENOENT));
            };
            return self.rename_exchange((&src, src_id), (d, *did), old, new);
        }
        if let Some((d, did)) = &dst {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(err(libc::EEXIST));
            }
            if *did == src_id {
                // two names of one inode: rename(2) does nothing
                return Ok(());
            }
            self.check_replace(&src, d, *did, &join(&newp, newname))?;
        }
        // Whether the directory merged lower content before we cut it off.
        let was_merged = src.is_dir() && !self.state(src_id)?.lowers.is_empty();
        if src.is_dir() {
            self.materialize(src_id)?;
        } else {
            self.copy_up(src_id, true)?;
        }
        self.copy_up(newdir, true)?;
        let oldpath = join(&self.path_of(olddir)?, oldname);
        let newpath = join(&self.path_of(newdir)?, newname);
        let old_whiteout = self.lower_visible(&ops, &oldp, oldname)?;
        let new_lower = self.lower_visible(&nps, &newp, newname)?;
        if let Some((d, did)) = &dst {
            if d.is_dir() && d.upper {
                self.clear_upper_dir(&newpath)?;
            }
            self.keep_data(*did)?;
        }
        self.move_in_upper(
            &oldpath,
            &newpath,
            src.is_dir() && dst.is_none(),
            old_whiteout,
        )?;
        // The moved directory must hide whatever the lower layers hold under
        // its new name. Like overlayfs, a directory that only ever lived in
        // upper is also made opaque when it lands in a merged directory; a
        // formerly merged one is marked only when needed, which is what
        // overlayfs' EXDEV fallback (mkdir, copy, delete) leaves behind.
        let into_merged = !self.state(newdir)?.lowers.is_empty();
        if src.is_dir() && (new_lower || (!was_merged && into_merged)) {
            sys::lsetxattr(&self.upper.xpath(&newpath)?, OPAQUE_XATTR, b"y", 0)?;
        }
        if let Some((d, did)) = &dst {
            self.drop_name(*did, newdir, newname)?;
            if d.upper && (d.is_dir() || d.st.st_nlink <= 1) {
                self.unregister(&d.st)?;
            }
        }
        self.update(src_id, |s| {
            s.names.retain(|(p, n)| !(*p == olddir && n == oldname));
            s.names.insert(0, (newdir, newname.to_vec()));
        })?;
        Ok(())
    }

    fn link(
        &self,
        _ctx: &Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        let newname = newname.to_bytes();
        let _w = self.tree.write().map_err(poisoned)?;
        self.copy_up(inode, true)?;
        self.copy_up(newparent, true)?;
        let src = self.path_of(inode)?;
        let dst = join(&self.path_of(newparent)?, newname);
        let (u, w) = (self.upper.raw(), self.work.raw());
        let dc = rel_cstr(&dst);
        match sys::lstat_at(u, &dc) {
            Ok(st) if sys::is_whiteout(&st) => {
                let tmp = self.tmp_name();
                sys::link_at(u, &rel_cstr(&src), w, &tmp)?;
                sys::rename_at(w, &tmp, u, &dc, 0).inspect_err(|_| {
                    let _ = sys::unlink_at(w, &tmp, 0);
                })?;
            }
            Ok(_) => return Err(err(libc::EEXIST)),
            Err(e) if is_missing(&e) => sys::link_at(u, &rel_cstr(&src), u, &dc)?,
            Err(e) => return Err(e),
        }
        self.update(inode, |s| s.names.push((newparent, newname.to_vec())))?;
        let (s, st) = self.stat_node(inode)?;
        self.counted(self.entry(inode, &s, st))
    }

    /// Files are not opened: ENOSYS makes the kernel stop sending OPEN and
    /// RELEASE (two of the three round trips of reading a small file) and
    /// send handle 0 instead; each READ or WRITE then opens the node's real
    /// file (`data_file`). The kernel keeps its page cache across opens, as
    /// KEEP_CACHE did. What OPEN did moves:
    /// - copy-up happens at the first WRITE, SETATTR or FALLOCATE instead of
    ///   at an open for writing (an open that never writes leaves the file in
    ///   its lower layer, so the layer stays smaller than overlayfs makes it);
    /// - O_TRUNC arrives as a SETATTR of size 0 (ATOMIC_O_TRUNC is not
    ///   negotiated), which copies up without data;
    /// - the data of a file unlinked or renamed over while open is kept by
    ///   `keep_data` until the kernel forgets the node.
    fn open(
        &self,
        _ctx: &Context,
        _inode: u64,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        Err(err(libc::ENOSYS))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let oflags = self.open_flags(args.flags);
        let mode = args.mode;
        let _w = self.tree.write().map_err(poisoned)?;
        let (id, st, file) =
            self.create_entry(ctx, parent, name.to_bytes(), libc::S_IFREG, mode, |d, n| {
                let f = sys::open_at(
                    d,
                    n,
                    (oflags & !libc::O_TRUNC) | libc::O_CREAT | libc::O_EXCL,
                    mode & 0o7777,
                )?;
                Ok(Some(File::from(f)))
            })?;
        // No handle: the file is served by its node, like a file the
        // kernel opened without OPEN (see `open`). With the writeback
        // cache the kernel sends RELEASE only once a file's dirty pages are
        // written back, up to half a minute after close: a descriptor per
        // handle grew with every file a step wrote in that time (EMFILE at
        // about 1,000 files under the default limit). The node's data
        // descriptors are a bounded cache instead.
        drop(file.ok_or_else(|| err(libc::EIO))?);
        let s = self.state(id)?;
        Ok((
            self.counted(self.entry(id, &s, st))?,
            None,
            OpenOptions::KEEP_CACHE,
            None,
        ))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let f = self.data_file(inode, handle, false)?;
        let mut f = borrow_fd(&f);
        w.write_from(&mut *f, size as usize, offset)
    }

    fn write(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let f = self.data_file(inode, handle, true)?;
        if fuse_flags & WRITE_KILL_PRIV != 0 {
            self.kill_suidgid(inode, f.as_raw_fd())?;
        }
        let mut f = borrow_fd(&f);
        r.read_to(&mut *f, size as usize, offset)
    }

    fn flush(&self, _ctx: &Context, _inode: u64, _handle: u64, _lock_owner: u64) -> io::Result<()> {
        // Nothing to do at close: data goes straight to the upper file. ENOSYS
        // makes the kernel stop sending FLUSH (one round trip less per
        // close); it still writes back cached pages on close before that.
        Err(err(libc::ENOSYS))
    }

    fn fsync(&self, _ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        if handle == 0 && !self.state(inode)?.upper {
            // nothing of it is in the upper layer
            return Ok(());
        }
        match self.data_file(inode, handle, false) {
            Ok(f) => sys::fsync(f.as_raw_fd(), datasync),
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let f = self.data_file(inode, handle, true)?;
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(err(libc::EFBIG));
        };
        // SAFETY: fallocate takes the handle's descriptor and integers, no
        // pointer; `f` keeps the descriptor open for the call.
        let rc = unsafe {
            libc::fallocate64(
                f.as_raw_fd(),
                i32::from_ne_bytes(mode.to_ne_bytes()),
                off,
                len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn release(
        &self,
        _ctx: &Context,
        _inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.handles.write().map_err(poisoned)?.remove(&handle);
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        sys::fstatvfs(self.upper.raw())
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if name.to_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
            return Err(err(libc::EPERM));
        }
        let _w = self.tree.write().map_err(poisoned)?;
        self.copy_up(inode, true)?;
        let path = self.upper.xpath(&self.path_of(inode)?)?;
        sys::lsetxattr(&path, name, value, i32::from_ne_bytes(flags.to_ne_bytes()))
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        if name.to_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
            return Err(err(libc::ENODATA));
        }
        let _t = self.tree.read().map_err(poisoned)?;
        let value =
            sys::lgetxattr(&self.xattr_path(inode)?, name)?.ok_or_else(|| err(libc::ENODATA))?;
        if size == 0 {
            Ok(GetxattrReply::Count(
                u32::try_from(value.len()).map_err(|_| err(libc::E2BIG))?,
            ))
        } else if value.len() > size as usize {
            Err(err(libc::ERANGE))
        } else {
            Ok(GetxattrReply::Value(value))
        }
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let _t = self.tree.read().map_err(poisoned)?;
        let raw = sys::llistxattr(&self.xattr_path(inode)?)?;
        let mut names = Vec::with_capacity(raw.len());
        for n in raw.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if !n.starts_with(OVERLAY_XATTR_PREFIX) {
                names.extend_from_slice(n);
                names.push(0);
            }
        }
        if size == 0 {
            Ok(ListxattrReply::Count(
                u32::try_from(names.len()).map_err(|_| err(libc::E2BIG))?,
            ))
        } else if names.len() > size as usize {
            Err(err(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(names))
        }
    }

    fn removexattr(&self, _ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        if name.to_bytes().starts_with(OVERLAY_XATTR_PREFIX) {
            return Err(err(libc::EPERM));
        }
        let _w = self.tree.write().map_err(poisoned)?;
        // Removing an attribute that does not exist must not copy up.
        if sys::lgetxattr(&self.xattr_path(inode)?, name)?.is_none() {
            return Err(err(libc::ENODATA));
        }
        self.copy_up(inode, true)?;
        sys::lremovexattr(&self.upper.xpath(&self.path_of(inode)?)?, name)
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.state(inode)?;
        let h = self.new_handle(Handle(Mutex::new(None)))?;
        Ok((Some(h), OpenOptions::CACHE_DIR))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let list = self.dir_list(inode, handle)?;
        for (i, (name, t, id, _)) in list
            .entries
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            let n = add_entry(DirEntry {
                ino: *id,
                offset: i as u64 + 1,
                type_: *t,
                name,
            })?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let list = self.dir_list(inode, handle)?;
        // Counted once the whole reply is made: an error discards it.
        let mut given = Vec::new();
        for (i, (name, t, id, st)) in list
            .entries
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            let entry = match st {
                Some(st) => {
                    let s = self.state(*id)?;
                    self.entry(*id, &s, *st)
                }
                // "." and "..": the kernel links nothing for inode 0
                None => Entry::default(),
            };
            let n = add_entry(
                DirEntry {
                    ino: *id,
                    offset: i as u64 + 1,
                    type_: *t,
                    name,
                },
                entry,
            )?;
            if n == 0 {
                break;
            }
            if st.is_some() {
                given.push(*id);
            }
        }
        for id in given {
            self.update(id, |s| s.lookups += 1)?;
        }
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Context, inode: u64, datasync: bool, _handle: u64) -> io::Result<()> {
        let _t = self.tree.read().map_err(poisoned)?;
        let s = self.state(inode)?;
        if !s.upper {
            return Ok(());
        }
        let path = self.path_of(inode)?;
        let f = sys::open_at(
            self.upper.raw(),
            &rel_cstr(&path),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        sys::fsync(f.as_raw_fd(), datasync)
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.handles.write().map_err(poisoned)?.remove(&handle);
        Ok(())
    }

    fn lseek(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let f = self.data_file(inode, handle, false)?;
        let off = i64::try_from(offset).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: lseek takes the handle's descriptor and integers, no
        // pointer; `f` keeps the descriptor open for the call.
        let r =
            unsafe { libc::lseek64(f.as_raw_fd(), off, i32::from_ne_bytes(whence.to_ne_bytes())) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_by_the_unprivileged_drop_setuid_and_group_exec_setgid() {
        assert_eq!(killed_mode(libc::S_IFREG | 0o4755), 0o755);
        assert_eq!(killed_mode(libc::S_IFREG | 0o6755), 0o755);
        // setgid without group exec marks mandatory locking and stays
        assert_eq!(killed_mode(libc::S_IFREG | 0o2644), 0o2644);
        assert_eq!(killed_mode(libc::S_IFREG | 0o1777), 0o1777);
    }

    #[test]
    fn relative_paths_join_and_split() {
        assert_eq!(join(b"", b"a"), b"a");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
        assert_eq!(parent_path(b"a/b/c"), b"a/b");
        assert_eq!(parent_path(b"a"), b"");
        assert_eq!(rel_cstr(b"").as_bytes(), b".");
    }

    #[test]
    fn only_overlay_xattrs_are_hidden() {
        assert!(b"user.overlay.opaque".starts_with(OVERLAY_XATTR_PREFIX));
        assert!(!b"user.overlayx".starts_with(OVERLAY_XATTR_PREFIX));
        assert!(!b"security.capability".starts_with(OVERLAY_XATTR_PREFIX));
    }
}
