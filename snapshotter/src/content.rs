//! The content store: blobs addressed by their sha256 digest, kept in the OCI
//! image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), so the
//! store itself is an image layout that `umoci` and `skopeo` can read.
//!
//! It owns every write into the layout. A blob is written to a temp file
//! under `.kiln/ingest/` while its digest is computed, fsynced, checked
//! against the expected digest, renamed into place and the directory fsynced:
//! a blob path never holds a partial or unverified blob. Each temp file is
//! `flock`ed by its writer, so a temp file whose lock can be taken belongs to
//! a dead process and is removed when the store is next opened. `index.json`
//! is replaced atomically under an exclusive lock on `.kiln/index.lock`.
//!
//! It must never hand out a blob without verifying its digest on read, and
//! never interprets blob contents beyond the index.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use oci_spec::image::{
    Descriptor, Digest, ImageIndex, ImageIndexBuilder, MediaType, OciLayoutBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

use crate::owner::{self, Owner};
use crate::sys;

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("content store {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("blob digest mismatch: expected {expected}, the written bytes hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} is corrupt: its bytes hash to {actual}; remove it and pull or build it again")]
    Corrupt { digest: Digest, actual: Digest },
    #[error("cannot read the layer {chain} to make its blob {digest}")]
    Layer {
        digest: Digest,
        chain: String,
        source: io::Error,
    },
    #[error("blob {0} is not in the content store")]
    NotFound(Digest),
    #[error("digest {0} is not sha256: kiln's content store only holds sha256 blobs")]
    UnsupportedDigest(Digest),
    #[error("{path}: invalid OCI json")]
    Json {
        path: PathBuf,
        source: oci_spec::OciSpecError,
    },
    #[error(
        "{path}: not an OCI image layout (oci-layout says version {version}, kiln reads 1.0.0)"
    )]
    LayoutVersion { path: PathBuf, version: String },
}

/// Result type of the content store.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The annotation naming an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A sha256 digest of `bytes`, as an OCI digest.
pub fn sha256_digest(hash: sha2::digest::Output<Sha256>) -> Digest {
    let hex = hex(&hash);
    Sha256Digest::from_str(&hex)
        .expect("64 lower-case hex digits are a valid sha256 digest")
        .into()
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An OCI image layout used as kiln's content store.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
    owner: Arc<Owner>,
}

impl ContentStore {
    /// Open (creating if needed) the layout at `root` and remove temp files
    /// left by dead writers.
    pub fn open(root: &Path) -> Result<Self> {
        fs::create_dir_all(root.join("blobs").join("sha256")).map_err(io_err(root))?;
        fs::create_dir_all(root.join(".kiln").join("ingest")).map_err(io_err(root))?;
        let owners = root.join(".kiln").join("owners");
        let store = ContentStore {
            root: root.to_path_buf(),
            owner: Arc::new(Owner::new(&owners).map_err(io_err(&owners))?),
        };
        let layout = root.join("oci-layout");
        let mut parsed = oci_spec::image::OciLayout::from_file(&layout);
        if parsed.is_err() && !layout.exists() {
            let l = OciLayoutBuilder::default()
                .image_layout_version("1.0.0")
                .build()
                .expect("oci-layout has its only field");
            let bytes = serde_json::to_vec(&l).expect("oci-layout serialises");
            store.write_file_atomic(&layout, &bytes)?;
        }
        if parsed.is_err() {
            // Written just now, by us or by another process opening a new
            // store at the same moment: a read that failed because the file
            // was not there yet must not become a JSON error once it is.
            parsed = oci_spec::image::OciLayout::from_file(&layout);
        }
        match parsed {
            Ok(l) if l.image_layout_version() == "1.0.0" => {}
            Ok(l) => {
                return Err(Error::LayoutVersion {
                    path: layout,
                    version: l.image_layout_version().clone(),
                })
            }
            Err(source) => {
                return Err(Error::Json {
                    path: layout,
                    source,
                })
            }
        }
        if !root.join("index.json").exists() {
            let _lock = store.lock_index()?;
            if !root.join("index.json").exists() {
                store.write_index(&empty_index())?;
            }
        }
        store.clean_ingest()?;
        Ok(store)
    }

    /// The layout's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn ingest_dir(&self) -> PathBuf {
        self.root.join(".kiln").join("ingest")
    }

    /// The path of a blob (which may not exist).
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf> {
        if digest.algorithm().as_ref() != "sha256" {
            return Err(Error::UnsupportedDigest(digest.clone()));
        }
        Ok(self.blob_dir().join(digest.digest()))
    }

    /// The size of a stored blob.
    pub fn size(&self, digest: &Digest) -> Result<u64> {
        let path = self.blob_path(digest)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.lazy(digest) {
                Some(l) => Ok(l.size),
                None => Err(Error::NotFound(digest.clone())),
            },
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// Whether the store holds `digest` (as a file, or as a layer it makes
    /// the blob from: see [`ContentStore::put_lazy`]).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).map(|p| p.exists()).unwrap_or(false) || self.lazy(digest).is_some()
    }

    fn lazy_dir(&self) -> PathBuf {
        self.root.join(".kiln").join("lazy")
    }

    /// The unpacked layer `chain_hex` of the snapshotter this store is the
    /// content of (`<snapshotter root>/content` beside `layers/`).
    fn layer_root(&self, chain_hex: &str) -> Option<PathBuf> {
        let valid = chain_hex.len() == 64 && chain_hex.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| self.root.parent().map(|p| p.join("layers").join(chain_hex)))?
    }

    /// The record of a blob kept as a layer, while that layer exists.
    fn lazy(&self, digest: &Digest) -> Option<Lazy> {
        if digest.algorithm().as_ref() != "sha256" {
            return None;
        }
        self.read_lazy(&self.lazy_dir().join(digest.digest()))
    }

    /// The lazy record in `path`, while its layer exists.
    fn read_lazy(&self, path: &Path) -> Option<Lazy> {
        let lazy: Lazy = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
        let root = self.layer_root(&lazy.chain)?;
        root.join("layer.json").exists().then_some(lazy)
    }

    /// Record that the blob `digest` (`size` bytes) is the plain tar that
    /// [`crate::diff::write_tar`] makes of the unpacked layer `chain` (with
    /// `epoch`): a commit keeps a step's layer unpacked only, and the blob
    /// is made the same way, and verified against `digest`, each time it is
    /// read (BuildKit keeps snapshots and makes blobs when an export needs
    /// them). The record is durable before this returns.
    pub fn put_lazy(
        &self,
        digest: &Digest,
        chain: &Digest,
        size: u64,
        epoch: Option<i64>,
    ) -> Result<()> {
        let dir = self.lazy_dir();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let record = Lazy {
            chain: chain.digest().to_string(),
            size,
            epoch,
        };
        if digest.algorithm().as_ref() != "sha256" {
            return Err(Error::UnsupportedDigest(digest.clone()));
        }
        let bytes = serde_json::to_vec(&record).expect("a lazy record serialises");
        self.write_file_atomic(&dir.join(digest.digest()), &bytes)
    }

    /// The chain ID of the layer a blob is kept as, if it is one.
    pub fn lazy_layer(&self, digest: &Digest) -> Option<Digest> {
        let lazy = self.lazy(digest)?;
        Sha256Digest::from_str(&lazy.chain).ok().map(Into::into)
    }

    /// Remove the records of blobs whose layer is gone (after a GC).
    pub fn prune_lazy(&self) -> Result<()> {
        let dir = self.lazy_dir();
        let Ok(list) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in list.flatten() {
            if self.read_lazy(&e.path()).is_none() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// The plain tar of a lazy blob's layer, made on a thread confined to
    /// that layer as it is read (a bounded queue of 1 MiB chunks between).
    fn stream_lazy(&self, digest: &Digest, lazy: &Lazy) -> Result<Box<dyn Read + Send>> {
        let root = self
            .layer_root(&lazy.chain)
            .ok_or_else(|| Error::NotFound(digest.clone()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let errors = tx.clone();
        let epoch = lazy.epoch;
        let layer = lazy.chain.clone();
        std::thread::Builder::new()
            .name("kiln-layer-tar".into())
            .spawn(move || {
                let dir = root.join("fs");
                let rules = crate::confine::Rules::new().read(&root);
                let out = ChunkWriter {
                    tx,
                    buf: Vec::with_capacity(CHUNK),
                };
                let made = crate::confine::run_confined(
                    crate::confine::Component::LayerDiff,
                    &rules,
                    || crate::diff::write_tar(&dir, out, epoch),
                );
                let failed = match made {
                    Ok(Ok(mut out)) => out.send().err(),
                    Ok(Err(e)) => Some(io::Error::other(e)),
                    Err(e) => Some(io::Error::other(e)),
                };
                if let Some(e) = failed {
                    let _ = errors.send(Err(io::Error::new(
                        e.kind(),
                        format!("the tar of layer {layer}: {}", kiln_sys::error_chain(&e)),
                    )));
                }
            })
            .map_err(|source| Error::Layer {
                digest: digest.clone(),
                chain: lazy.chain.clone(),
                source,
            })?;
        Ok(Box::new(ChunkReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        }))
    }

    fn owners_dir(&self) -> PathBuf {
        self.root.join(".kiln").join("owners")
    }

    /// Remove temp files whose writer is gone (its owner lock is free).
    fn clean_ingest(&self) -> Result<()> {
        let dir = self.ingest_dir();
        let owners = self.owners_dir();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !owner::is_alive(&owners, owner::owner_of(&name)) {
                let _ = fs::remove_file(entry.path());
            }
        }
        owner::clean(&owners).map_err(io_err(&owners))
    }

    fn temp_name(&self, what: &str) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        self.ingest_dir().join(format!(
            "{}-{what}-{}",
            self.owner.name(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Start writing a blob. With `expected`, commit fails unless the bytes
    /// hash to it.
    pub fn writer(&self, expected: Option<Digest>) -> Result<BlobWriter> {
        let path = self.temp_name("blob");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(BlobWriter {
            store: self.clone(),
            file: Some(io::BufWriter::with_capacity(1 << 20, file)),
            path,
            hasher: Some(Sha256::new()),
            size: 0,
            expected,
        })
    }

    /// A writer for bytes whose sha256 the caller computes as they are
    /// written (a plain layer's diffID is its digest): committed with
    /// [`BlobWriter::commit_hashed`], so the bytes are hashed once.
    pub(crate) fn writer_hashed_by_caller(&self) -> Result<BlobWriter> {
        let mut w = self.writer(None)?;
        w.hasher = None;
        Ok(w)
    }

    /// Store `bytes` as a blob and return its descriptor.
    pub fn put_bytes(&self, media_type: MediaType, bytes: &[u8]) -> Result<Descriptor> {
        let mut w = self.writer(None)?;
        w.write_all(bytes).map_err(io_err(&w.path))?;
        let (digest, size) = w.commit()?;
        Ok(Descriptor::new(media_type, size, digest))
    }

    /// Open a blob for reading; the reader fails at end of file if the bytes
    /// do not hash to `digest`.
    pub fn open_blob(&self, digest: &Digest) -> Result<VerifyingReader> {
        let path = self.blob_path(digest)?;
        let inner: Box<dyn Read + Send> = match File::open(&path) {
            Ok(file) => Box::new(io::BufReader::with_capacity(1 << 20, file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.lazy(digest) {
                Some(lazy) => self.stream_lazy(digest, &lazy)?,
                None => return Err(Error::NotFound(digest.clone())),
            },
            Err(e) => {
                return Err(Error::Io {
                    path: path.clone(),
                    source: e,
                })
            }
        };
        Ok(VerifyingReader {
            inner,
            hasher: Sha256::new(),
            digest: digest.clone(),
            done: false,
        })
    }

    /// Read a whole blob, verified.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut r = self.open_blob(digest)?;
        let mut v = Vec::new();
        r.read_to_end(&mut v).map_err(|e| r.map_read_error(e))?;
        Ok(v)
    }

    /// Verify one blob's digest.
    pub fn verify(&self, digest: &Digest) -> Result<()> {
        let mut r = self.open_blob(digest)?;
        io::copy(&mut r, &mut io::sink()).map_err(|e| r.map_read_error(e))?;
        Ok(())
    }

    /// Every blob digest in the store.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let dir = self.blob_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(d) = entry
                .file_name()
                .to_str()
                .and_then(|n| Sha256Digest::from_str(n).ok())
            {
                out.push(d.into());
            }
        }
        out.sort_by(|a: &Digest, b| a.as_ref().cmp(b.as_ref()));
        Ok(out)
    }

    /// Bytes held by blobs (`du` of the store's content).
    pub fn usage(&self) -> Result<u64> {
        let mut total = 0;
        for d in self.list()? {
            let path = self.blob_path(&d)?;
            let meta = fs::metadata(&path).map_err(io_err(&path))?;
            total += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        }
        Ok(total)
    }

    /// Delete a blob (garbage collection); a missing blob is not an error.
    pub fn delete(&self, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io { path, source: e }),
        }
    }

    /// The current `index.json`.
    pub fn index(&self) -> Result<ImageIndex> {
        let path = self.root.join("index.json");
        ImageIndex::from_file(&path).map_err(|source| Error::Json { path, source })
    }

    fn lock_index(&self) -> Result<File> {
        let path = self.root.join(".kiln").join("index.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sys::flock(f.as_fd(), true, true).map_err(io_err(&path))?;
        Ok(f)
    }

    fn write_index(&self, index: &ImageIndex) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(index).expect("image index serialises");
        self.write_file_atomic(&self.root.join("index.json"), &bytes)
    }

    /// Write `path` whole or not at all, durable before this returns.
    fn write_file_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.temp_name("file");
        let written = File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .map_err(io_err(&tmp))
            .and_then(|()| fs::rename(&tmp, path).map_err(io_err(path)));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written?;
        let dir = path.parent().unwrap_or(&self.root);
        sys::fsync_dir(dir).map_err(io_err(dir))
    }

    /// Change `index.json` under the store's index lock, so concurrent
    /// writers never lose each other's updates.
    pub fn update_index(&self, change: impl FnOnce(&mut Vec<Descriptor>)) -> Result<()> {
        let _lock = self.lock_index()?;
        let mut index = self.index()?;
        let mut manifests = index.manifests().clone();
        change(&mut manifests);
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    /// Name `desc` (a manifest or index) `name` in `index.json`, replacing
    /// an earlier descriptor of that name.
    pub fn set_ref(&self, name: &str, desc: &Descriptor) -> Result<()> {
        let mut desc = desc.clone();
        let mut ann = desc.annotations().clone().unwrap_or_default();
        ann.insert(REF_NAME.to_string(), name.to_string());
        desc.set_annotations(Some(ann));
        self.update_index(|m| {
            m.retain(|d| ref_name(d) != Some(name));
            m.push(desc);
        })
    }

    /// The descriptor named `name` in `index.json`.
    pub fn resolve(&self, name: &str) -> Result<Option<Descriptor>> {
        Ok(self
            .index()?
            .manifests()
            .iter()
            .find(|d| ref_name(d) == Some(name))
            .cloned())
    }
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

fn empty_index() -> ImageIndex {
    ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(Vec::new())
        .build()
        .expect("empty index has all required fields")
}

/// A blob kept as an unpacked layer (see [`ContentStore::put_lazy`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct Lazy {
    /// the layer's chain ID, hex
    chain: String,
    size: u64,
    /// the SOURCE_DATE_EPOCH the layer's tar clamps its times to
    epoch: Option<i64>,
}

const CHUNK: usize = 1 << 20;

/// The writing end of a lazy blob's stream.
struct ChunkWriter {
    tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(Ok(chunk))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reading end: the bytes in order, an error the writer sent, or the
/// end once the writer is gone (a writer that stopped early leaves a
/// short stream, which the digest check refuses).
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A blob being written. Dropping it without [`BlobWriter::commit`] removes
/// the temp file.
pub struct BlobWriter {
    store: ContentStore,
    file: Option<io::BufWriter<File>>,
    path: PathBuf,
    /// None when the caller hashes what it writes
    hasher: Option<Sha256>,
    size: u64,
    expected: Option<Digest>,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self.file.as_mut().expect("writer used after commit");
        let n = f.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file
            .as_mut()
            .expect("writer used after commit")
            .flush()
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Verify, fsync and rename the blob into place; returns its digest and
    /// size. A blob already present is left as is (same bytes by digest).
    pub fn commit(mut self) -> Result<(Digest, u64)> {
        let hasher = self
            .hasher
            .take()
            .expect("a writer the caller hashes commits with commit_hashed");
        let actual = sha256_digest(hasher.finalize());
        self.commit_as(actual)
    }

    /// [`BlobWriter::commit`] of a writer from
    /// [`ContentStore::writer_hashed_by_caller`]: `digest` is the sha256 of
    /// exactly the bytes written, which the caller computed.
    pub(crate) fn commit_hashed(self, digest: Digest) -> Result<(Digest, u64)> {
        assert!(
            self.hasher.is_none(),
            "commit_hashed is for writers the caller hashes"
        );
        self.commit_as(digest)
    }

    fn commit_as(mut self, actual: Digest) -> Result<(Digest, u64)> {
        let file = self.file.take().expect("commit called once");
        let file = file.into_inner().map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        if let Some(expected) = &self.expected {
            if expected != &actual {
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        file.sync_all().map_err(io_err(&self.path))?;
        let dest = self.store.blob_path(&actual)?;
        if !dest.exists() {
            fs::rename(&self.path, &dest).map_err(io_err(&dest))?;
            let dir = self.store.blob_dir();
            sys::fsync_dir(&dir).map_err(io_err(&dir))?;
        }
        Ok((actual, self.size))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // after a successful commit the temp path is gone or was never
        // renamed (duplicate blob): remove it either way
        let _ = fs::remove_file(&self.path);
    }
}

/// Reads a blob and fails with `InvalidData` at end of file if its bytes do
/// not hash to the expected digest.
pub struct VerifyingReader {
    inner: Box<dyn Read + Send>,
    hasher: Sha256,
    digest: Digest,
    done: bool,
}

/// The error a [`VerifyingReader`] returns for a corrupt blob.
#[derive(Debug, thiserror::Error)]
#[error("blob {digest} is corrupt: its bytes hash to {actual}")]
pub struct CorruptBlob {
    pub digest: Digest,
    pub actual: Digest,
}

impl VerifyingReader {
    /// Turn a read error into the store's error, keeping digest mismatches
    /// as [`Error::Corrupt`].
    pub fn map_read_error(&self, e: io::Error) -> Error {
        if let Some(c) = e.get_ref().and_then(|i| i.downcast_ref::<CorruptBlob>()) {
            return Error::Corrupt {
                digest: c.digest.clone(),
                actual: c.actual.clone(),
            };
        }
        Error::Io {
            path: PathBuf::from(self.digest.to_string()),
            source: e,
        }
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() && !self.done {
            self.done = true;
            let actual = sha256_digest(std::mem::take(&mut self.hasher).finalize());
            if actual != self.digest {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    CorruptBlob {
                        digest: self.digest.clone(),
                        actual,
                    },
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_roundtrip_and_verification() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = store.put_bytes(MediaType::ImageConfig, b"hello").unwrap();
        assert_eq!(
            d.digest().to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(store.read_blob(d.digest()).unwrap(), b"hello");
        // corrupt it on disk: reads must fail naming the digest
        let path = store.blob_path(d.digest()).unwrap();
        fs::write(&path, b"hellO").unwrap();
        let err = store.read_blob(d.digest()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(d.digest().digest()), "{err}");
    }

    #[test]
    fn expected_digest_is_enforced_and_nothing_visible_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let wrong: Digest = Sha256Digest::from_str(&"0".repeat(64)).unwrap().into();
        let mut w = store.writer(Some(wrong.clone())).unwrap();
        w.write_all(b"data").unwrap();
        let err = w.commit().unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(store.list().unwrap().is_empty());
        assert_eq!(fs::read_dir(store.ingest_dir()).unwrap().count(), 0);
    }

    #[test]
    fn stale_ingest_is_cleaned_and_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        // a temp file nobody holds a lock on: a dead writer's leftover
        fs::write(store.ingest_dir().join("o999999.0.0-blob-0"), b"partial").unwrap();
        let mut live = store.writer(None).unwrap();
        live.write_all(b"in progress").unwrap();
        live.flush().unwrap();
        let _again = ContentStore::open(dir.path()).unwrap();
        let left: Vec<_> = fs::read_dir(store.ingest_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, vec![live.path.clone()]);
        let (d, _) = live.commit().unwrap();
        assert!(store.contains(&d));
    }

    #[test]
    fn concurrent_index_updates_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let root = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    let s = ContentStore::open(&root).unwrap();
                    let d = s
                        .put_bytes(MediaType::ImageManifest, format!("m{i}").as_bytes())
                        .unwrap();
                    s.set_ref(&format!("img{i}"), &d).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.index().unwrap().manifests().len(), 8);
        assert!(store.resolve("img3").unwrap().is_some());
    }
}
