//! The layer store: unpacked layers kept by chain ID
//! (`layers/<hex>/fs` with `layers/<hex>/layer.json`), the leases that keep
//! them alive, garbage collection and disk-usage accounting.
//!
//! A layer is built in a temp directory under `tmp/` (named after its
//! builder's owner lock) and renamed into `layers/` in one step, so a layer
//! directory is either complete or absent; a temp directory whose owner's
//! lock can be taken belongs to a dead process and is removed on open. A lease is a
//! file under `leases/` held with an exclusive flock by a running build and
//! listing the layers and blobs it uses; GC keeps every layer reachable from
//! a live lease, a pin (a stored image) or a root the caller passes, and
//! never runs while a lease is being extended (`gc.lock`).
//!
//! It must never change a committed layer's contents, and never removes a
//! layer that a live lease or pin reaches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use oci_spec::image::{Digest, Sha256Digest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::content::sha256_digest;
use crate::owner::{self, Owner};
use crate::sys;

/// Errors of the layer store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("layer store {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("layer {0} is not in the layer store; pull or build it first")]
    NotFound(Digest),
    #[error("layer {chain_id}: metadata {path} is unreadable; remove the layer directory and rebuild it")]
    BadMeta {
        chain_id: String,
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("lease {0:?} is held by a running process; pick another name")]
    LeaseBusy(String),
    #[error("lease name {0:?} must be non-empty and use only letters, digits, '-', '_' and '.'")]
    LeaseName(String),
}

/// Result type of the layer store.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The OCI chain ID of a layer with diffID `diff_id` on top of `parent`:
/// the diffID itself for a base layer, else
/// `sha256(parent_chain_id + " " + diff_id)`.
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => diff_id.clone(),
        Some(p) => {
            let mut h = Sha256::new();
            h.update(p.to_string().as_bytes());
            h.update(b" ");
            h.update(diff_id.to_string().as_bytes());
            sha256_digest(h.finalize())
        }
    }
}

/// The chain ID of a whole list of diffIDs, bottom layer first.
pub fn chain_id_of(diff_ids: &[Digest]) -> Option<Digest> {
    let mut chain: Option<Digest> = None;
    for d in diff_ids {
        chain = Some(chain_id(chain.as_ref(), d));
    }
    chain
}

/// What `layer.json` records about a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub chain_id: Digest,
    pub diff_id: Digest,
    pub parent: Option<Digest>,
}

/// Disk usage of the layer store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// bytes allocated by each layer; an inode shared by hard links between
    /// layers is counted once, for the first layer (by chain ID) holding it
    pub layers: BTreeMap<String, u64>,
    pub total: u64,
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed: Vec<Digest>,
    pub stale_leases: usize,
}

/// Unpacked layers by chain ID.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
    owner: Arc<Owner>,
    durable: bool,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn hex_of(d: &Digest) -> &str {
    d.digest()
}

impl LayerStore {
    /// Open (creating if needed) the layer store at `root` and remove what
    /// dead processes left in `tmp/`.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["layers", "tmp", "leases", "pins", "owners"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let owners = root.join("owners");
        let store = LayerStore {
            root: root.to_path_buf(),
            owner: Arc::new(Owner::new(&owners).map_err(io_err(&owners))?),
            durable: false,
        };
        store.clean_tmp()?;
        Ok(store)
    }

    /// Make every committed layer durable (one `syncfs` before it becomes
    /// visible). Off by default: a layer is a cache of its blob, which is
    /// always fsynced, and atomic renames already make layers safe against
    /// a killed process; `syncfs` also flushes everything else dirty on the
    /// file system (a copy view's whole tree), which costs seconds per
    /// commit. Turn it on where power loss must never leave a torn layer.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A directory for scratch work on the store's file system (views).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A name for scratch files of this store's owner: `<owner>-<what>-<n>`.
    pub fn unique(&self, what: &str) -> String {
        format!(
            "{}-{what}-{}",
            self.owner.name(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// This store's owner name (the prefix of its scratch names).
    pub fn owner_name(&self) -> &str {
        self.owner.name()
    }

    /// Whether the owner of a scratch name made by [`LayerStore::unique`]
    /// is alive.
    pub fn owner_alive(&self, scratch_name: &str) -> bool {
        owner::is_alive(&self.root.join("owners"), owner::owner_of(scratch_name))
    }

    fn clean_tmp(&self) -> Result<()> {
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.owner_alive(&name) {
                let path = e.path();
                if fs::remove_dir_all(&path).is_err() {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let owners = self.root.join("owners");
        owner::clean(&owners).map_err(io_err(&owners))
    }

    fn layer_root(&self, chain: &Digest) -> PathBuf {
        self.root.join("layers").join(hex_of(chain))
    }

    /// The layer directory (in the shared layer format) of `chain`.
    pub fn layer_dir(&self, chain: &Digest) -> PathBuf {
        self.layer_root(chain).join("fs")
    }

    /// Whether the layer exists.
    pub fn contains(&self, chain: &Digest) -> bool {
        self.layer_root(chain).join("layer.json").exists()
    }

    /// The layer's metadata.
    pub fn info(&self, chain: &Digest) -> Result<LayerInfo> {
        let path = self.layer_root(chain).join("layer.json");
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(chain.clone()),
            _ => Error::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|source| Error::BadMeta {
            chain_id: chain.to_string(),
            path,
            source,
        })
    }

    /// Layer directories of the chain ending at `chain`, topmost first.
    pub fn chain_dirs(&self, chain: &Digest) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut cur = Some(chain.clone());
        while let Some(c) = cur {
            let info = self.info(&c)?;
            out.push(self.layer_dir(&c));
            cur = info.parent;
        }
        Ok(out)
    }

    /// Every committed layer.
    pub fn list(&self) -> Result<Vec<LayerInfo>> {
        let dir = self.root.join("layers");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let Some(d) = e
                .file_name()
                .to_str()
                .and_then(|n| Sha256Digest::from_str(n).ok())
            else {
                continue;
            };
            out.push(self.info(&d.into())?);
        }
        out.sort_by(|a, b| a.chain_id.as_ref().cmp(b.chain_id.as_ref()));
        Ok(out)
    }

    /// Start building a layer: an empty, locked directory whose `fs` is the
    /// layer directory to fill.
    pub fn begin(&self) -> Result<TempLayer> {
        let path = self.tmp_dir().join(self.unique("layer"));
        fs::create_dir(&path).map_err(io_err(&path))?;
        let fs_dir = path.join("fs");
        fs::create_dir(&fs_dir).map_err(io_err(&fs_dir))?;
        Ok(TempLayer { path, done: false })
    }

    /// Commit a filled temp layer as the layer `diff_id` on top of
    /// `parent`. If the same chain was committed meanwhile (by another
    /// process), that one is kept and this one discarded.
    pub fn commit(
        &self,
        mut temp: TempLayer,
        diff_id: &Digest,
        parent: Option<&Digest>,
    ) -> Result<LayerInfo> {
        if let Some(p) = parent {
            if !self.contains(p) {
                return Err(Error::NotFound(p.clone()));
            }
        }
        let info = LayerInfo {
            chain_id: chain_id(parent, diff_id),
            diff_id: diff_id.clone(),
            parent: parent.cloned(),
        };
        let meta_path = temp.path.join("layer.json");
        let mut f = File::create(&meta_path).map_err(io_err(&meta_path))?;
        f.write_all(&serde_json::to_vec_pretty(&info).expect("layer info serialises"))
            .map_err(io_err(&meta_path))?;
        // one syncfs makes the whole unpacked tree durable before it
        // becomes visible under its chain ID
        // SAFETY: `f` is an open fd for the whole call; syncfs only reads it.
        if self.durable && unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io_err(&meta_path)(io::Error::last_os_error()));
        }
        let dest = self.layer_root(&info.chain_id);
        if dest.exists() {
            return Ok(info); // temp dropped: removed
        }
        match fs::rename(&temp.path, &dest) {
            Ok(()) => {
                temp.done = true;
                let layers = self.root.join("layers");
                sys::fsync_dir(&layers).map_err(io_err(&layers))?;
                Ok(info)
            }
            // another process won the race with the same content
            Err(_) if dest.exists() => Ok(info),
            Err(e) => Err(io_err(&dest)(e)),
        }
    }

    /// Take a lease named `name`, held until the returned value is dropped
    /// or the process dies.
    pub fn lease(&self, name: &str) -> Result<Lease> {
        check_name(name)?;
        let path = self.root.join("leases").join(name);
        if let Ok(f) = File::open(&path) {
            if !sys::flock(f.as_fd(), true, false).map_err(io_err(&path))? {
                return Err(Error::LeaseBusy(name.to_string()));
            }
        }
        // created under another name and locked before it appears, so GC
        // never mistakes a new lease for a dead one
        let new = self.tmp_dir().join(self.unique("lease"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .read(true)
            .open(&new)
            .map_err(io_err(&new))?;
        sys::flock(file.as_fd(), true, true).map_err(io_err(&new))?;
        fs::rename(&new, &path).map_err(io_err(&path))?;
        Ok(Lease {
            store: self.clone(),
            path,
            file,
        })
    }

    /// Pin a layer under `name` (a stored image): kept by GC until unpinned.
    pub fn pin(&self, name: &str, chain: &Digest) -> Result<()> {
        check_name(name)?;
        let _gc = self.gc_lock(false)?;
        if !self.contains(chain) {
            return Err(Error::NotFound(chain.clone()));
        }
        let path = self.root.join("pins").join(name);
        let tmp = self.tmp_dir().join(self.unique("pin"));
        fs::write(&tmp, chain.to_string()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Remove a pin.
    pub fn unpin(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let path = self.root.join("pins").join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    fn gc_lock(&self, exclusive: bool) -> Result<File> {
        let path = self.root.join("gc.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sys::flock(f.as_fd(), exclusive, true).map_err(io_err(&path))?;
        Ok(f)
    }

    /// Everything live leases and pins reference: (layers, blobs).
    fn roots(&self, report: &mut GcReport) -> Result<(HashSet<String>, HashSet<String>)> {
        let mut layers = HashSet::new();
        let mut blobs = HashSet::new();
        let dir = self.root.join("leases");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = e.map_err(io_err(&dir))?.path();
            let Ok(f) = File::open(&path) else { continue };
            if sys::flock(f.as_fd(), true, false).unwrap_or(false) {
                // nobody holds it: the build that took it is gone
                let _ = fs::remove_file(&path);
                report.stale_leases += 1;
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                match line.split_once(' ') {
                    Some(("layer", d)) => layers.insert(d.to_string()),
                    Some(("blob", d)) => blobs.insert(d.to_string()),
                    _ => false,
                };
            }
        }
        let dir = self.root.join("pins");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = e.map_err(io_err(&dir))?.path();
            if let Ok(t) = fs::read_to_string(&path) {
                layers.insert(t.trim().to_string());
            }
        }
        Ok((layers, blobs))
    }

    /// Remove every layer that no live lease, pin or `extra_roots` entry
    /// reaches (through parents). Returns the blobs live leases hold so the
    /// caller can collect the content store under the same lock.
    pub fn gc(&self, extra_roots: &[Digest]) -> Result<(GcReport, HashSet<String>)> {
        let guard = self.gc_guard(true)?;
        self.gc_with(&guard, extra_roots)
    }

    /// Hold off garbage collection (shared) or hold it (exclusive) until the
    /// guard is dropped: a shared guard makes "write a blob, then lease it"
    /// atomic with respect to GC.
    pub fn gc_guard(&self, exclusive: bool) -> Result<GcGuard> {
        self.gc_lock(exclusive).map(GcGuard)
    }

    /// [`LayerStore::gc`] under an exclusive guard the caller holds (to
    /// collect the content store under the same lock).
    pub fn gc_with(
        &self,
        _guard: &GcGuard,
        extra_roots: &[Digest],
    ) -> Result<(GcReport, HashSet<String>)> {
        let mut report = GcReport::default();
        let (mut roots, blobs) = self.roots(&mut report)?;
        roots.extend(extra_roots.iter().map(ToString::to_string));
        let all = self.list()?;
        let by_id: HashMap<String, &LayerInfo> =
            all.iter().map(|l| (l.chain_id.to_string(), l)).collect();
        let mut keep = HashSet::new();
        for r in roots {
            let mut cur = Some(r);
            while let Some(c) = cur {
                if !keep.insert(c.clone()) {
                    break;
                }
                cur = by_id
                    .get(&c)
                    .and_then(|l| l.parent.as_ref().map(ToString::to_string));
            }
        }
        for l in &all {
            if keep.contains(&l.chain_id.to_string()) {
                continue;
            }
            let from = self.layer_root(&l.chain_id);
            let to = self.tmp_dir().join(self.unique("del"));
            // rename first: the layer disappears atomically, then the slow
            // removal cannot leave a half-deleted layer visible
            fs::rename(&from, &to).map_err(io_err(&from))?;
            fs::remove_dir_all(&to).map_err(io_err(&to))?;
            report.removed.push(l.chain_id.clone());
        }
        Ok((report, blobs))
    }

    /// `du` of the layer store.
    pub fn usage(&self) -> Result<Usage> {
        let mut usage = Usage::default();
        for l in self.list()? {
            let bytes = self.layer_bytes(&l.chain_id)?;
            usage.total += bytes;
            usage.layers.insert(l.chain_id.to_string(), bytes);
        }
        Ok(usage)
    }

    /// The bytes a layer's tree takes on disk (hard links counted once;
    /// they never cross layers). A committed layer never changes, so the
    /// walk is done once and its answer kept beside `layer.json` (a
    /// collector after every build measures the store).
    fn layer_bytes(&self, chain: &Digest) -> Result<u64> {
        let kept = self.layer_root(chain).join("du");
        if let Some(n) = fs::read_to_string(&kept)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Ok(n);
        }
        let dir = self.layer_dir(chain);
        let mut bytes = 0u64;
        du(&dir, &mut HashSet::new(), &mut bytes).map_err(io_err(&dir))?;
        // best effort: without it the next count walks again
        let tmp = kept.with_extension(format!("tmp-{}", std::process::id()));
        if fs::write(&tmp, bytes.to_string()).is_ok() && fs::rename(&tmp, &kept).is_err() {
            let _ = fs::remove_file(&tmp);
        }
        Ok(bytes)
    }
}

fn du(dir: &Path, seen: &mut HashSet<(u64, u64)>, bytes: &mut u64) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if seen.insert((meta.dev(), meta.ino())) {
        *bytes += meta.blocks() * 512;
    }
    if meta.is_dir() {
        for e in fs::read_dir(dir)? {
            du(&e?.path(), seen, bytes)?;
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::LeaseName(name.to_string()))
    }
}

/// Holds `gc.lock` until dropped; see [`LayerStore::gc_guard`].
#[derive(Debug)]
pub struct GcGuard(#[allow(dead_code)] File);

/// A layer being built; removed on drop unless committed.
#[derive(Debug)]
pub struct TempLayer {
    path: PathBuf,
    done: bool,
}

impl TempLayer {
    /// The layer directory to fill.
    pub fn fs_dir(&self) -> PathBuf {
        self.path.join("fs")
    }
}

impl Drop for TempLayer {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A lease: layers and blobs a running build uses. Released on drop (and by
/// the kernel when the process dies, since it is an flock).
#[derive(Debug)]
pub struct Lease {
    store: LayerStore,
    path: PathBuf,
    file: File,
}

impl Lease {
    fn add(&self, kind: &str, d: &Digest) -> Result<()> {
        let _gc = self.store.gc_lock(false)?;
        if kind == "layer" && !self.store.contains(d) {
            return Err(Error::NotFound(d.clone()));
        }
        (&self.file)
            .write_all(format!("{kind} {d}\n").as_bytes())
            .map_err(io_err(&self.path))
    }

    /// Keep layer `chain` (and its parents) alive while the lease is held.
    /// Fails if the layer is gone (collected before the lease reached it).
    pub fn add_layer(&self, chain: &Digest) -> Result<()> {
        self.add("layer", chain)
    }

    /// Keep a content-store blob alive while the lease is held.
    pub fn add_blob(&self, digest: &Digest) -> Result<()> {
        self.add("blob", digest)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        let mut h = Sha256::new();
        h.update(s.as_bytes());
        sha256_digest(h.finalize())
    }

    #[test]
    fn chain_id_follows_the_oci_definition() {
        let a = d("a");
        let b = d("b");
        assert_eq!(chain_id(None, &a), a);
        let mut h = Sha256::new();
        h.update(format!("{a} {b}").as_bytes());
        assert_eq!(chain_id(Some(&a), &b), sha256_digest(h.finalize()));
        assert_eq!(
            chain_id_of(&[a.clone(), b.clone()]),
            Some(chain_id(Some(&a), &b))
        );
    }

    #[test]
    fn gc_keeps_leased_and_pinned_chains_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path()).unwrap();
        let mk = |parent: Option<&Digest>, name: &str| {
            let t = store.begin().unwrap();
            fs::write(t.fs_dir().join(name), name).unwrap();
            store.commit(t, &d(name), parent).unwrap().chain_id
        };
        let base = mk(None, "base");
        let leased = mk(Some(&base), "leased");
        let pinned = mk(None, "pinned");
        let loose = mk(Some(&base), "loose");
        let lease = store.lease("build-1").unwrap();
        lease.add_layer(&leased).unwrap();
        store.pin("image", &pinned).unwrap();
        // a lease whose holder died: the file exists but nobody locks it
        fs::write(dir.path().join("leases/dead"), format!("layer {loose}\n")).unwrap();
        let (report, _) = store.gc(&[]).unwrap();
        assert_eq!(report.removed, vec![loose.clone()]);
        assert_eq!(report.stale_leases, 1);
        assert!(store.contains(&base) && store.contains(&leased) && store.contains(&pinned));
        assert_eq!(store.chain_dirs(&leased).unwrap().len(), 2);
        let usage = store.usage().unwrap();
        assert_eq!(usage.layers.len(), 3);
        assert!(usage.total > 0);
        drop(lease);
        store.unpin("image").unwrap();
        let (report, _) = store.gc(&[]).unwrap();
        assert_eq!(report.removed.len(), 3);
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(store.lease("../x"), Err(Error::LeaseName(_))));
    }

    #[test]
    fn dead_builder_temp_dirs_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path()).unwrap();
        let live = store.begin().unwrap();
        fs::create_dir_all(dir.path().join("tmp/layer-dead/fs")).unwrap();
        LayerStore::open(dir.path()).unwrap();
        let left: Vec<_> = fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert_eq!(left.len(), 1);
        assert!(live.fs_dir().exists());
    }
}
