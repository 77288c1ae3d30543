//! The Snapshotter API: writable and read-only views of layer chains, commit
//! of a view into a new layer (tar blob in the content store plus unpacked
//! layer by chain ID), removal, import of layer blobs, garbage collection.
//!
//! Layout under the snapshotter root: `content/` (the OCI layout),
//! `layers/`, `tmp/`, `leases/`, `pins/` (the layer store) and
//! `views/<key>/{work,merged}`. A view's upper directory is the `fs`
//! directory of a temp layer, so committing it is one rename; everything a
//! view owns is tied to its process's owner lock and removed on the next open if that
//! process died.
//!
//! Every layer and blob this process creates or uses is recorded in the
//! snapshotter's lease, so a concurrent GC never takes them away. The
//! snapshotter never runs a process in a view and never interprets image
//! configuration beyond the layer list.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest};

use crate::apply::{self, ApplyReport};
use crate::backend::{self, BackendKind, MountedView, ViewSpec};
use crate::confine::Component;
use crate::content::{self, ContentStore};
use crate::diff::{self, DiffOptions};
use crate::layers::{self, GcReport, LayerInfo, LayerStore, Lease, TempLayer};

/// What a commit's layer diff gave: a blob written to the store, or the
/// diffID and size of a plain layer kept unpacked.
enum Diffed {
    Written(diff::LayerBlob),
    Plain { diff_id: Digest, size: u64 },
}

/// Errors of the snapshotter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshotter {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("view key {0:?} must be non-empty and use only letters, digits, '-', '_' and '.'")]
    BadKey(String),
    #[error("view {0:?} is in use by a running process; pick another key or wait for it")]
    Busy(String),
    #[error("view {0:?} is read-only and cannot be committed; use prepare for a writable view")]
    ReadOnly(String),
    #[error("layer blob {digest} unpacks to diffID {actual}, but the image says {expected}; the image is corrupt")]
    DiffIdMismatch {
        digest: String,
        expected: Digest,
        actual: Digest,
    },
    #[error(transparent)]
    Content(#[from] content::Error),
    #[error(transparent)]
    Layers(#[from] layers::Error),
    #[error(transparent)]
    Backend(#[from] backend::Error),
    #[error(transparent)]
    Diff(#[from] diff::Error),
    #[error(transparent)]
    Apply(#[from] apply::Error),
    #[error(transparent)]
    Confine(#[from] crate::confine::NotConfined),
    #[error("layer {index} of {count} ({digest})")]
    Layer {
        index: usize,
        count: usize,
        digest: String,
        source: apply::Error,
    },
    #[error("image {digest}")]
    Image {
        digest: Digest,
        source: oci_spec::OciSpecError,
    },
}

/// Result type of the snapshotter.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A layer made by [`Snapshotter::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub chain_id: Digest,
    pub diff_id: Digest,
    pub parent: Option<Digest>,
    /// the layer blob in the content store (digest, size, media type)
    pub blob: Descriptor,
}

/// What [`Snapshotter::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub blobs: usize,
    pub layers: usize,
    /// one line per problem, naming the blob or layer at fault
    pub problems: Vec<String>,
}

/// A view of a layer chain. Dropping it without commit or remove unmounts
/// it and removes its files.
pub struct View {
    key: String,
    readonly: bool,
    parent: Option<Digest>,
    spec: ViewSpec,
    kind: BackendKind,
    mounted: Option<Box<dyn MountedView>>,
    upper: Option<TempLayer>,
    dir: PathBuf,
    /// where the view's files go when it is dropped: renaming is instant,
    /// deleting a copy view's whole tree is not, so the commit does not wait
    /// for it ([`Snapshotter::cleanup`] deletes it later)
    trash: PathBuf,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("key", &self.key)
            .field("readonly", &self.readonly)
            .field("parent", &self.parent)
            .field("kind", &self.kind)
            .field("path", &self.spec.target)
            .finish()
    }
}

impl View {
    /// Where the merged tree is.
    pub fn path(&self) -> &Path {
        self.mounted
            .as_ref()
            .map(|m| m.path())
            .unwrap_or(&self.spec.target)
    }
    /// The view's key.
    pub fn key(&self) -> &str {
        &self.key
    }
    /// The chain the view starts from.
    pub fn parent(&self) -> Option<&Digest> {
        self.parent.as_ref()
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.mounted.take();
        self.upper.take();
        if fs::rename(&self.dir, &self.trash).is_err() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Scratch-name tag of dropped views' files.
const TRASH: &str = "trash";

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.cleanup();
        // A killed process's views are cleaned at the next open; one whose
        // sandbox was still dying then (holding its owner lock) is cleaned
        // here, at the end of that next process.
        let _ = self.clean_views();
    }
}

/// Content store, layer store and views under one root.
pub struct Snapshotter {
    root: PathBuf,
    content: ContentStore,
    layers: LayerStore,
    backend: BackendKind,
    lease: Lease,
}

fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadKey(key.to_string()))
    }
}

impl Snapshotter {
    /// Open the snapshotter at `root` with views served by `backend`,
    /// cleaning up after processes that died.
    pub fn open(root: &Path, backend: BackendKind) -> Result<Self> {
        fs::create_dir_all(root.join("views")).map_err(io_err(root))?;
        let content = ContentStore::open(&root.join("content"))?;
        let layers = LayerStore::open(root)?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let lease = layers.lease(&format!(
            "kiln-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ))?;
        let s = Snapshotter {
            root: root.to_path_buf(),
            content,
            layers,
            backend,
            lease,
        };
        s.clean_views()?;
        Ok(s)
    }

    fn clean_views(&self) -> Result<()> {
        let dir = self.root.join("views");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let path = e.path();
            let stale = match fs::read_to_string(path.join("owner")) {
                Ok(owner) if !owner.is_empty() => !self.layers.owner_alive(owner.trim()),
                // no owner: left by a kiln that made the directory before
                // claiming it (views are now renamed in with their owner);
                // stale only when old
                _ => e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 600),
            };
            if stale {
                let _ = fs::remove_dir_all(&path);
            }
        }
        Ok(())
    }

    /// The content store.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// See [`LayerStore::set_durable`].
    pub fn set_durable_layers(&mut self, durable: bool) {
        self.layers.set_durable(durable);
    }

    /// The layer store.
    pub fn layers(&self) -> &LayerStore {
        &self.layers
    }

    /// The lease holding everything this snapshotter made or used.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// A writable view of the chain ending at `parent` (empty if `None`).
    pub fn prepare(&self, key: &str, parent: Option<&Digest>) -> Result<View> {
        self.make_view(key, parent, false)
    }

    /// A read-only view of `parent`. With the copy backend, writes to it are
    /// possible but never committed.
    pub fn view(&self, key: &str, parent: Option<&Digest>) -> Result<View> {
        self.make_view(key, parent, true)
    }

    fn make_view(&self, key: &str, parent: Option<&Digest>, readonly: bool) -> Result<View> {
        check_key(key)?;
        if let Some(p) = parent {
            self.lease.add_layer(p)?;
        }
        let lowers = match parent {
            Some(p) => self.layers.chain_dirs(p)?,
            None => Vec::new(),
        };
        // Made under tmp/ with its owner file, then renamed into place: a
        // view directory never exists without an owner, so a process killed
        // at any moment leaves either a tmp/ entry or a claimed view, and
        // both are swept once their owner is dead. The rename is exclusive:
        // an existing view of the same key is busy.
        let name = self.layers.unique("view");
        let scratch = self.layers.tmp_dir().join(&name);
        fs::create_dir(&scratch).map_err(io_err(&scratch))?;
        let owner_file = scratch.join("owner");
        fs::write(&owner_file, &name).map_err(io_err(&owner_file))?;
        let dir = self.root.join("views").join(key);
        match nix::fcntl::renameat2(
            None,
            &scratch,
            None,
            &dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {}
            Err(e) => {
                let _ = fs::remove_dir_all(&scratch);
                return Err(match e {
                    nix::errno::Errno::EEXIST => Error::Busy(key.into()),
                    e => io_err(&dir)(e.into()),
                });
            }
        }
        let upper = self.layers.begin()?;
        let spec = ViewSpec {
            lowers,
            upper: upper.fs_dir(),
            work: dir.join("work"),
            target: dir.join("merged"),
        };
        for d in [&spec.work, &spec.target] {
            fs::create_dir(d).map_err(io_err(d))?;
        }
        let mut view = View {
            key: key.to_string(),
            readonly,
            parent: parent.cloned(),
            spec,
            kind: self.backend,
            mounted: None,
            upper: Some(upper),
            dir,
            trash: self.layers.tmp_dir().join(self.layers.unique(TRASH)),
        };
        view.mounted = Some(backend::mount(self.backend, &view.spec)?);
        Ok(view)
    }

    /// Turn a writable view into a layer: its changes become a layer tar in
    /// the content store and an unpacked layer under the new chain ID.
    pub fn commit(&self, mut view: View, opts: DiffOptions) -> Result<Committed> {
        if view.readonly {
            return Err(Error::ReadOnly(view.key.clone()));
        }
        // unmount: after this `upper` holds every change of the view
        if let Some(mounted) = view.mounted.take() {
            backend::unmount(view.kind, mounted, &view.spec)?;
        }
        if let Some(epoch) = opts.source_date_epoch {
            let upper = &view.spec.upper;
            let fd = crate::sys::open_dir(upper).map_err(io_err(upper))?;
            crate::tree::clamp_mtimes(std::os::fd::AsFd::as_fd(&fd), epoch)
                .map_err(io_err(upper))?;
        }
        let _no_gc = self.layers.gc_guard(false)?;
        // The upper directory is what a step wrote: read on a thread that
        // can only touch the state directory.
        let upper_dir = &view.spec.upper;
        let diffed = crate::confine::run_confined(
            Component::LayerDiff,
            &self.confinement(),
            || -> Result<_> {
                // the same tree gives the same layer whichever backend made it
                crate::markers::drop_needless(upper_dir, &view.spec.lowers)
                    .map_err(io_err(upper_dir))?;
                Ok(match opts.compression {
                    crate::Compression::None => {
                        let (diff_id, size) = diff::hash_layer(upper_dir, opts.source_date_epoch)?;
                        Diffed::Plain { diff_id, size }
                    }
                    _ => Diffed::Written(diff::write_layer(upper_dir, &self.content, opts)?),
                })
            },
        )??;
        let blob = match diffed {
            Diffed::Written(blob) => blob,
            Diffed::Plain { diff_id, size } => self.plain_blob(&view, diff_id, size, opts)?,
        };
        self.lease.add_blob(&blob.digest)?;
        let upper = view
            .upper
            .take()
            .expect("a view has its upper until commit");
        let info = self
            .layers
            .commit(upper, &blob.diff_id, view.parent.as_ref())?;
        if !self.content.contains(&blob.digest) {
            self.content.put_lazy(
                &blob.digest,
                &info.chain_id,
                blob.size,
                opts.source_date_epoch,
            )?;
        }
        self.lease.add_layer(&info.chain_id)?;
        Ok(Committed {
            chain_id: info.chain_id,
            diff_id: info.diff_id,
            parent: info.parent,
            blob: Descriptor::new(blob.media_type, blob.size, blob.digest),
        })
    }

    /// The Landlock rules of work on untrusted bytes in this store: its
    /// root, read-write, and nothing else.
    pub fn confinement(&self) -> crate::confine::Rules {
        crate::confine::Rules::new().write(&self.root)
    }

    /// Throw a view away.
    pub fn remove(&self, view: View) -> Result<()> {
        drop(view);
        self.cleanup()
    }

    /// Delete the files of views this snapshotter dropped (done on drop of
    /// the snapshotter too; a dead process's are deleted by the next open).
    pub fn cleanup(&self) -> Result<()> {
        let tmp = self.layers.tmp_dir();
        let prefix = format!("{}-{TRASH}-", self.layers.owner_name());
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let path = e.path();
                fs::remove_dir_all(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }

    /// Unpack a layer tar read from `layer` on top of `parent`. With
    /// `expected_diff_id`, a stream that unpacks to another diffID is refused
    /// and nothing is kept.
    pub fn import(
        &self,
        layer: impl io::Read + Send,
        parent: Option<&Digest>,
        expected_diff_id: Option<&Digest>,
    ) -> Result<(LayerInfo, ApplyReport)> {
        let lowers = match parent {
            Some(p) => {
                self.lease.add_layer(p)?;
                self.layers.chain_dirs(p)?
            }
            None => Vec::new(),
        };
        let _no_gc = self.layers.gc_guard(false)?;
        let temp = self.layers.begin()?;
        // The tar is the image's bytes: applied on a thread that can only
        // touch the state directory.
        let fs_dir = temp.fs_dir();
        let report =
            crate::confine::run_confined(Component::LayerApply, &self.confinement(), || {
                apply::apply(layer, &fs_dir, &lowers)
            })??;
        if let Some(expected) = expected_diff_id {
            if expected != &report.diff_id {
                return Err(Error::DiffIdMismatch {
                    digest: "(stream)".into(),
                    expected: expected.clone(),
                    actual: report.diff_id,
                });
            }
        }
        let info = self.layers.commit(temp, &report.diff_id, parent)?;
        self.lease.add_layer(&info.chain_id)?;
        Ok((info, report))
    }

    /// The blob of a plain layer `view` makes: left unpacked only (its blob
    /// made when something reads it, see [`ContentStore::put_lazy`]), unless
    /// its chain exists already and the store lacks the blob; then this
    /// upper is dropped by the commit, so the blob is written now from it
    /// rather than made later from a tree an import left.
    fn plain_blob(
        &self,
        view: &View,
        diff_id: Digest,
        size: u64,
        opts: DiffOptions,
    ) -> Result<diff::LayerBlob> {
        let chain = crate::layers::chain_id(view.parent.as_ref(), &diff_id);
        if self.layers.contains(&chain) && !self.content.contains(&diff_id) {
            let upper = &view.spec.upper;
            return Ok(crate::confine::run_confined(
                Component::LayerDiff,
                &self.confinement(),
                || diff::write_layer(upper, &self.content, opts),
            )??);
        }
        Ok(diff::LayerBlob {
            digest: diff_id.clone(),
            diff_id,
            size,
            media_type: crate::Compression::None.media_type(),
        })
    }

    /// Keep the plain blob `diff_id` as the unpacked layer `chain` (see
    /// [`ContentStore::put_lazy`]) when kiln's tar of that layer is those
    /// very bytes, as it is for a layer kiln committed and exported; an
    /// imported layer often is not (another tar writer's order or headers).
    /// Returns whether it did; if not, the caller stores the blob.
    pub fn keep_unpacked(&self, diff_id: &Digest, chain: &Digest) -> Result<bool> {
        let _no_gc = self.layers.gc_guard(false)?;
        let dir = self.layers.layer_dir(chain);
        let rules = crate::confine::Rules::new().read(&dir);
        let (hashed, size) = crate::confine::run_confined(Component::LayerDiff, &rules, || {
            diff::hash_layer(&dir, None)
        })??;
        if hashed != *diff_id {
            return Ok(false);
        }
        self.lease.add_blob(diff_id)?;
        self.content.put_lazy(diff_id, chain, size, None)?;
        Ok(true)
    }

    /// Unpack every layer of the image `manifest` (in the content store),
    /// verifying blob digests and diffIDs; returns the top chain ID and the
    /// apply reports. Layers already unpacked are reused.
    pub fn unpack_image(&self, manifest: &Digest) -> Result<(Option<Digest>, Vec<ApplyReport>)> {
        let m = self.manifest(manifest)?;
        let config = self.config(m.config().digest())?;
        let diff_ids = config.rootfs().diff_ids();
        let mut parent: Option<Digest> = None;
        let mut reports = Vec::new();
        let count = m.layers().len();
        for (i, (layer, diff_id)) in m.layers().iter().zip(diff_ids).enumerate() {
            let diff_id: Digest = diff_id.parse().map_err(|source| Error::Image {
                digest: m.config().digest().clone(),
                source,
            })?;
            let chain = layers::chain_id(parent.as_ref(), &diff_id);
            if self.layers.contains(&chain) {
                self.lease.add_layer(&chain)?;
            } else {
                let reader = self.content.open_blob(layer.digest())?;
                let (info, report) = self
                    .import(reader, parent.as_ref(), Some(&diff_id))
                    .map_err(|e| match e {
                        Error::DiffIdMismatch {
                            expected, actual, ..
                        } => Error::DiffIdMismatch {
                            digest: layer.digest().to_string(),
                            expected,
                            actual,
                        },
                        Error::Apply(source) => Error::Layer {
                            index: i + 1,
                            count,
                            digest: layer.digest().to_string(),
                            source,
                        },
                        e => e,
                    })?;
                debug_assert_eq!(info.chain_id, chain);
                reports.push(report);
            }
            parent = Some(chain);
        }
        Ok((parent, reports))
    }

    fn manifest(&self, digest: &Digest) -> Result<ImageManifest> {
        let bytes = self.content.read_blob(digest)?;
        ImageManifest::from_reader(&bytes[..]).map_err(|source| Error::Image {
            digest: digest.clone(),
            source,
        })
    }

    fn config(&self, digest: &Digest) -> Result<ImageConfiguration> {
        let bytes = self.content.read_blob(digest)?;
        ImageConfiguration::from_reader(&bytes[..]).map_err(|source| Error::Image {
            digest: digest.clone(),
            source,
        })
    }

    /// Blobs and top chain IDs reachable from `index.json`.
    fn image_roots(&self) -> Result<(Vec<Digest>, Vec<Digest>)> {
        let mut blobs = Vec::new();
        let mut chains = Vec::new();
        let mut todo: Vec<Descriptor> = self.content.index()?.manifests().clone();
        while let Some(d) = todo.pop() {
            blobs.push(d.digest().clone());
            let bytes = match self.content.read_blob(d.digest()) {
                Ok(b) => b,
                // a dangling reference keeps nothing
                Err(content::Error::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            // decide by content, not media type: Docker schema 2 manifests
            // and manifest lists (copied in by skopeo) have the OCI shape
            if let Ok(m) = ImageManifest::from_reader(&bytes[..]) {
                blobs.push(m.config().digest().clone());
                blobs.extend(m.layers().iter().map(|l| l.digest().clone()));
                if let Ok(c) = self.config(m.config().digest()) {
                    let ids: Vec<Digest> = c
                        .rootfs()
                        .diff_ids()
                        .iter()
                        .filter_map(|s| s.parse().ok())
                        .collect();
                    chains.extend(layers::chain_id_of(&ids));
                }
            } else if let Ok(idx) = ImageIndex::from_reader(&bytes[..]) {
                todo.extend(idx.manifests().iter().cloned());
            }
        }
        Ok((blobs, chains))
    }

    /// Verify the whole store: every blob against its digest, every layer's
    /// metadata and parent. Read-only.
    pub fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        for d in self.content.list()? {
            report.blobs += 1;
            if let Err(e) = self.content.verify(&d) {
                report.problems.push(kiln_sys::error_chain(&e));
            }
        }
        let dir = self.layers.root().join("layers");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            report.layers += 1;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(chain) = format!("sha256:{name}").parse::<Digest>() else {
                report
                    .problems
                    .push(format!("layer directory {name} is not a chain id"));
                continue;
            };
            match self.layers.info(&chain) {
                Ok(info) => {
                    if info.chain_id != chain {
                        report
                            .problems
                            .push(format!("layer {chain}: layer.json names {}", info.chain_id));
                    }
                    if let Some(p) = &info.parent {
                        if !self.layers.contains(p) {
                            report
                                .problems
                                .push(format!("layer {chain}: parent {p} is missing"));
                        }
                    }
                    if !self.layers.layer_dir(&chain).is_dir() {
                        report
                            .problems
                            .push(format!("layer {chain}: no fs directory"));
                    }
                }
                Err(e) => report.problems.push(kiln_sys::error_chain(&e)),
            }
        }
        Ok(report)
    }

    /// Remove layers and blobs that no image in `index.json`, pin or live
    /// lease (this one included) reaches.
    pub fn gc(&self) -> Result<(GcReport, Vec<Digest>)> {
        let guard = self.layers.gc_guard(true)?;
        let (image_blobs, image_chains) = self.image_roots()?;
        let (report, lease_blobs) = self.layers.gc_with(&guard, &image_chains)?;
        let keep: std::collections::HashSet<String> = image_blobs
            .iter()
            .map(ToString::to_string)
            .chain(lease_blobs)
            .collect();
        let mut removed = Vec::new();
        for d in self.content.list()? {
            if !keep.contains(&d.to_string()) {
                self.content.delete(&d)?;
                removed.push(d);
            }
        }
        self.content.prune_lazy()?;
        Ok((report, removed))
    }
}
