//! `kiln load`: docker-archive and oci-archive tars into the image store.
//!
//! A docker-archive (`docker save`, `podman save`, `skopeo copy
//! docker-archive:`) holds `manifest.json` (a list of `{Config, RepoTags,
//! Layers}` naming files in the archive), config JSON files and layer tars,
//! plain or compressed. An oci-archive is a tar of an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/...`). The format is decided by
//! content: `manifest.json` makes a docker-archive (docker 25 writes both
//! kinds of metadata; manifest.json has the full names), else `oci-layout` an
//! oci-archive. The archive itself may be gzip or zstd compressed.
//!
//! Docker-archives become OCI images: each layer file is stored as it is,
//! with the OCI layer media type of its compression, and must unpack to the
//! diffID its config lists; the config is kept byte for byte so the image ID
//! stays docker's. The archive is read once as a stream (stdin works):
//! every file is written into the content store while it is read, and only
//! then interpreted.
//!
//! Nothing is named until every image of the archive has been checked and
//! unpacked, so a malformed archive leaves no name behind; the blobs it
//! wrote are unreferenced and the next GC frees them. This module never
//! writes outside the state directory and never trusts a path or digest
//! from the archive without checking it.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use kiln_snapshotter::compression::{self, Detected};
use kiln_snapshotter::content;
use kiln_snapshotter::diff::HashingWriter;
use kiln_snapshotter::targuard::{Limits, TarGuard};
use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, MediaType};

use super::reference::{self, Reference};
use super::store::{self, Image, ImageStore};

/// Errors of `kiln load`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the archive: {0}")]
    Read(io::Error),
    #[error("the archive is {0} compressed; kiln reads plain, gzip or zstd archives: decompress it first")]
    Compression(&'static str),
    #[error("archive entry {entry:?}")]
    Entry { entry: String, source: io::Error },
    #[error("the archive is truncated or corrupt after entry {after:?}")]
    Corrupt { after: String, source: io::Error },
    #[error("the input is not a tar archive (nor a gzip or zstd compressed one): {0}")]
    NotTar(io::Error),
    #[error("archive entry {0:?}: absolute paths and `..` are not allowed in an image archive")]
    BadPath(String),
    #[error(
        "archive entry {entry:?}: {size} bytes is too large for a metadata file (limit {limit})"
    )]
    TooLarge {
        entry: String,
        size: u64,
        limit: u64,
    },
    #[error("the archive is neither a docker-archive (no manifest.json) nor an oci-archive (no oci-layout); is it an image archive?")]
    UnknownFormat,
    #[error("archive entry {entry:?} is not valid JSON of its kind: {reason}")]
    Json { entry: String, reason: String },
    #[error("manifest.json names {path:?} ({what}), but the archive has no such file")]
    Missing { path: String, what: String },
    #[error("manifest.json entry {index} lists {layers} layers but its config {config:?} has {diff_ids} diffIDs")]
    LayerCount {
        index: usize,
        config: String,
        layers: usize,
        diff_ids: usize,
    },
    #[error("layer {entry:?} unpacks to diffID {actual}, but config {config:?} says {expected}; the archive is corrupt")]
    DiffId {
        entry: String,
        config: String,
        expected: String,
        actual: Digest,
    },
    #[error("archive entry {entry:?}: its content hashes to {actual}, not the digest in its name; the archive is corrupt")]
    BlobDigest { entry: String, actual: Digest },
    #[error("archive entry {0:?}: kiln's store holds only sha256 blobs")]
    Algorithm(String),
    #[error("oci-layout says image layout version {0:?}; kiln reads 1.0.0")]
    LayoutVersion(String),
    #[error("index.json refers to blob {digest} ({what}), which is neither in the archive nor in the store")]
    MissingBlob { digest: Digest, what: String },
    #[error("the archive has no images (empty {0})")]
    Empty(&'static str),
    #[error("image name {name:?} in {entry}")]
    Name {
        name: String,
        entry: &'static str,
        source: reference::Error,
    },
    #[error("{context}")]
    Store {
        context: String,
        source: Box<store::Error>,
    },
    #[error("OCI layout {path}")]
    LayoutIo { path: PathBuf, source: io::Error },
    #[error("OCI layout {dir} has no image {selector} (it has: {available})")]
    NoSuchImage {
        dir: PathBuf,
        selector: String,
        available: String,
    },
    #[error("OCI layout {dir} holds {count} images; name one with {dir}:TAG or {dir}@DIGEST")]
    WhichImage { dir: PathBuf, count: usize },
    #[error(transparent)]
    Content(#[from] content::Error),
}

/// Result type of `kiln load`.
pub type Result<T> = std::result::Result<T, Error>;

/// Which kind of archive was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    DockerArchive,
    OciArchive,
}

/// One image loaded.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// full names it was tagged with (empty: stored unnamed)
    pub names: Vec<String>,
    pub id: Digest,
    /// the index.json entry
    pub target: Descriptor,
    /// apply warnings (skipped devices)
    pub warnings: Vec<String>,
}

/// What `kiln load` did.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub format: Format,
    pub images: Vec<LoadedImage>,
}

/// Metadata files read into memory rather than the content store.
const META_FILES: [&str; 4] = ["manifest.json", "index.json", "oci-layout", "repositories"];
const META_LIMIT: u64 = 16 << 20;

/// What one archive entry became.
#[derive(Debug, Clone)]
enum Item {
    Blob { digest: Digest, size: u64 },
    Link(String),
}

struct Contents {
    files: HashMap<String, Item>,
    meta: HashMap<String, Vec<u8>>,
    blobs: Vec<Digest>,
}

/// Load every image in the archive read from `reader`.
pub fn load(store: &ImageStore<'_>, reader: impl Read) -> Result<Loaded> {
    let snap = store.snapshotter();
    // keep GC away from the blobs until they are named
    let _no_gc = snap
        .layers()
        .gc_guard(false)
        .map_err(|e| store_err("cannot take the store's GC lock", e.into()))?;
    let contents = read_archive(store, reader)?;
    for d in &contents.blobs {
        snap.lease()
            .add_blob(d)
            .map_err(|e| store_err("cannot lease a loaded blob", e.into()))?;
    }
    if contents.meta.contains_key("manifest.json") {
        load_docker(store, &contents)
    } else if contents.meta.contains_key("oci-layout") {
        load_oci(store, &contents)
    } else {
        Err(Error::UnknownFormat)
    }
}

fn store_err(context: impl Into<String>, source: store::Error) -> Error {
    Error::Store {
        context: context.into(),
        source: Box::new(source),
    }
}

/// `a/./b/` -> `a/b`; refuses absolute paths and `..`.
fn clean_path(raw: &str) -> Result<String> {
    let mut parts = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::BadPath(raw.into()))
            }
        }
    }
    Ok(parts.join("/"))
}

/// Resolve a link target relative to the link's directory.
fn resolve_link(link: &str, target: &str) -> Option<String> {
    let base: PathBuf = if target.starts_with('/') {
        PathBuf::new()
    } else {
        Path::new(link)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let mut parts: Vec<String> = base
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for c in Path::new(target).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    Some(parts.join("/"))
}

fn read_archive(store: &ImageStore<'_>, reader: impl Read) -> Result<Contents> {
    let mut buf = BufReader::with_capacity(1 << 20, reader);
    let head = buf.fill_buf().map_err(Error::Read)?;
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(Error::Compression("xz"));
    }
    if head.starts_with(b"BZh") {
        return Err(Error::Compression("bzip2"));
    }
    let kind = compression::detect(&mut buf).map_err(|e| Error::Read(io::Error::other(e)))?;
    let stream = compression::decoder(buf, kind).map_err(Error::Read)?;
    // long names and PAX headers bounded before the tar crate reads them;
    // each layer inside gets the layer limits when it is unpacked
    let guarded = TarGuard::new(stream, Limits::UNLIMITED);
    let mut archive = tar::Archive::new(guarded);
    let content = store.snapshotter().content();
    let mut out = Contents {
        files: HashMap::new(),
        meta: HashMap::new(),
        blobs: Vec::new(),
    };
    let mut last: Option<String> = None;
    let entries = archive.entries().map_err(Error::Read)?;
    for entry in entries {
        let mut entry = entry.map_err(|source| match &last {
            None => Error::NotTar(source),
            Some(after) => Error::Corrupt {
                after: after.clone(),
                source,
            },
        })?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = clean_path(&raw)?;
        last = Some(raw.clone());
        let entry_err = |source| Error::Entry {
            entry: raw.clone(),
            source,
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let resolved = if entry.header().entry_type() == tar::EntryType::Link {
                    clean_path(&target).ok()
                } else {
                    resolve_link(&path, &target)
                };
                match resolved {
                    Some(t) => out.files.insert(path, Item::Link(t)),
                    None => return Err(Error::BadPath(format!("{raw} -> {target}"))),
                };
                continue;
            }
            // directories and anything else carry no image data
            _ => continue,
        }
        if META_FILES.contains(&path.as_str()) {
            let size = entry.size();
            if size > META_LIMIT {
                return Err(Error::TooLarge {
                    entry: raw,
                    size,
                    limit: META_LIMIT,
                });
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(entry_err)?;
            out.meta.insert(path, bytes);
            continue;
        }
        // an OCI blob path names its own digest: verify it while storing
        let expected = match path.strip_prefix("blobs/") {
            Some(rest) => match rest.split_once('/') {
                Some(("sha256", hex)) => format!("sha256:{hex}").parse::<Digest>().ok(),
                Some((_, _)) => return Err(Error::Algorithm(raw)),
                None => None,
            },
            None => None,
        };
        let mut w = content.writer(expected.clone())?;
        io::copy(&mut entry, &mut w).map_err(entry_err)?;
        let (digest, size) = match w.commit() {
            Ok(x) => x,
            Err(content::Error::DigestMismatch { actual, .. }) => {
                return Err(Error::BlobDigest { entry: raw, actual })
            }
            Err(e) => return Err(e.into()),
        };
        out.blobs.push(digest.clone());
        out.files.insert(path, Item::Blob { digest, size });
    }
    Ok(out)
}

impl Contents {
    /// The blob a path names, following links (a bounded number of hops).
    fn blob(&self, path: &str, what: &str) -> Result<(Digest, u64)> {
        let mut p = clean_path(path)?;
        for _ in 0..16 {
            match self.files.get(&p) {
                Some(Item::Blob { digest, size }) => return Ok((digest.clone(), *size)),
                Some(Item::Link(t)) => p.clone_from(t),
                None => break,
            }
        }
        Err(Error::Missing {
            path: path.into(),
            what: what.into(),
        })
    }
}

#[derive(serde::Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The uncompressed digest and OCI media type of a stored layer blob.
fn layer_identity(
    store: &ImageStore<'_>,
    digest: &Digest,
    entry: &str,
) -> Result<(Digest, MediaType)> {
    let content = store.snapshotter().content();
    let mut r = BufReader::new(content.open_blob(digest)?);
    let kind = compression::detect(&mut r).map_err(|e| Error::Entry {
        entry: entry.into(),
        source: io::Error::other(e),
    })?;
    let media = match kind {
        Detected::Plain => return Ok((digest.clone(), MediaType::ImageLayer)),
        Detected::Gzip => MediaType::ImageLayerGzip,
        Detected::Zstd => MediaType::ImageLayerZstd,
    };
    let mut dec = compression::decoder(r, kind).map_err(|source| Error::Entry {
        entry: entry.into(),
        source,
    })?;
    let mut h = HashingWriter::new(io::sink());
    io::copy(&mut dec, &mut h).map_err(|source| Error::Entry {
        entry: entry.into(),
        source,
    })?;
    Ok((h.finish().0, media))
}

fn load_docker(store: &ImageStore<'_>, c: &Contents) -> Result<Loaded> {
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&c.meta["manifest.json"]).map_err(|e| Error::Json {
            entry: "manifest.json".into(),
            reason: crate::error_chain(&e),
        })?;
    if entries.is_empty() {
        return Err(Error::Empty("manifest.json"));
    }
    let content = store.snapshotter().content();
    let mut staged: Vec<(Image, Vec<String>, Vec<String>)> = Vec::new();
    for (index, e) in entries.iter().enumerate() {
        let (config_digest, _) = c.blob(&e.config, "image config")?;
        let config_bytes = content.read_blob(&config_digest)?;
        // serde_json directly: its errors say where the JSON is wrong
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|err| Error::Json {
                entry: e.config.clone(),
                reason: crate::error_chain(&err),
            })?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != e.layers.len() {
            return Err(Error::LayerCount {
                index,
                config: e.config.clone(),
                layers: e.layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        let mut layers = Vec::new();
        for (path, expected) in e.layers.iter().zip(diff_ids) {
            let (digest, size) = c.blob(path, "layer")?;
            let (diff_id, media) = layer_identity(store, &digest, path)?;
            if diff_id.to_string() != *expected {
                return Err(Error::DiffId {
                    entry: path.clone(),
                    config: e.config.clone(),
                    expected: expected.clone(),
                    actual: diff_id,
                });
            }
            layers.push(Descriptor::new(media, size, digest));
        }
        let names = e
            .repo_tags
            .iter()
            .flatten()
            .map(|n| {
                reference::normalize(n).map_err(|source| Error::Name {
                    name: n.clone(),
                    entry: "manifest.json",
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let image = store
            .write_image_raw(
                config_bytes,
                MediaType::ImageConfig,
                layers,
                MediaType::ImageManifest,
                None,
            )
            .map_err(|err| store_err(format!("image {}", e.config), err))?;
        let (_, warnings) = store
            .unpack(&image)
            .map_err(|err| store_err(format!("cannot unpack the layers of {}", e.config), err))?;
        staged.push((image, names, warnings));
    }
    name_all(store, Format::DockerArchive, staged)
}

/// The name an OCI index entry carries: containerd's full-name annotation,
/// else `org.opencontainers.image.ref.name` when it is a full reference (a
/// bare tag such as `latest` names no repository and is ignored).
fn oci_name(d: &Descriptor) -> Result<Option<String>> {
    let ann = d.annotations().clone().unwrap_or_default();
    let candidate = match ann.get("io.containerd.image.name") {
        Some(n) => Some(n.clone()),
        None => ann
            .get(content::REF_NAME)
            .filter(|n| n.contains('/') || n.contains(':'))
            .cloned(),
    };
    candidate
        .map(|n| {
            Reference::parse(&n)
                .map(|r| r.to_string())
                .map_err(|source| Error::Name {
                    name: n.clone(),
                    entry: "index.json",
                    source,
                })
        })
        .transpose()
}

fn load_oci(store: &ImageStore<'_>, c: &Contents) -> Result<Loaded> {
    let layout: serde_json::Value =
        serde_json::from_slice(&c.meta["oci-layout"]).map_err(|e| Error::Json {
            entry: "oci-layout".into(),
            reason: crate::error_chain(&e),
        })?;
    match layout.get("imageLayoutVersion").and_then(|v| v.as_str()) {
        Some("1.0.0") => {}
        other => return Err(Error::LayoutVersion(other.unwrap_or("(missing)").into())),
    }
    let index_bytes = c.meta.get("index.json").ok_or_else(|| Error::Missing {
        path: "index.json".into(),
        what: "the OCI layout's index".into(),
    })?;
    let index: ImageIndex = serde_json::from_slice(index_bytes).map_err(|e| Error::Json {
        entry: "index.json".into(),
        reason: crate::error_chain(&e),
    })?;
    if index.manifests().is_empty() {
        return Err(Error::Empty("index.json"));
    }
    let content = store.snapshotter().content();
    let need = |d: &Digest, what: &str| -> Result<()> {
        if content.contains(d) {
            Ok(())
        } else {
            Err(Error::MissingBlob {
                digest: d.clone(),
                what: what.into(),
            })
        }
    };
    let mut staged = Vec::new();
    for d in index.manifests() {
        need(d.digest(), "image manifest or index")?;
        let names: Vec<String> = oci_name(d)?.into_iter().collect();
        let image = store
            .get(d, None)
            .map_err(|e| store_err(format!("index.json entry {}", d.digest()), e))?;
        need(image.id(), "image config")?;
        for l in image.layers() {
            need(l.digest(), "layer")?;
        }
        let (_, warnings) = store.unpack(&image).map_err(|e| {
            store_err(
                format!(
                    "cannot unpack the layers of {}",
                    image.manifest_descriptor.digest()
                ),
                e,
            )
        })?;
        staged.push((image, names, warnings));
    }
    name_all(store, Format::OciArchive, staged)
}

fn name_all(
    store: &ImageStore<'_>,
    format: Format,
    staged: Vec<(Image, Vec<String>, Vec<String>)>,
) -> Result<Loaded> {
    let mut images = Vec::new();
    for (image, names, warnings) in staged {
        let mut tagged = Vec::new();
        for n in &names {
            tagged.push(
                store
                    .tag(n, &image.target)
                    .map_err(|e| store_err(format!("cannot name the image {n}"), e))?,
            );
        }
        if tagged.is_empty() {
            store
                .add_unnamed(&image.target)
                .map_err(|e| store_err("cannot record the unnamed image", e))?;
        }
        images.push(LoadedImage {
            names: tagged,
            id: image.id().clone(),
            target: image.target.clone(),
            warnings,
        });
    }
    Ok(Loaded { format, images })
}

/// Which image of an OCI layout directory to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutSelector {
    /// the only image in `index.json`
    Only,
    /// the entry whose `org.opencontainers.image.ref.name` is this tag
    Tag(String),
    /// the entry (or any manifest or index in the layout) with this digest
    Digest(Digest),
}

/// Split BuildKit's `oci-layout://DIR[:TAG|@DIGEST]` value (without the
/// scheme) into the directory and the selector. A `:` only starts a tag
/// after the last `/`.
pub fn parse_layout_ref(s: &str) -> (PathBuf, LayoutSelector) {
    if let Some((dir, d)) = s.rsplit_once('@') {
        if let Ok(digest) = d.parse::<Digest>() {
            return (PathBuf::from(dir), LayoutSelector::Digest(digest));
        }
    }
    let last = s.rfind('/').map_or(0, |i| i + 1);
    match s[last..].rfind(':') {
        Some(i) if last + i > 0 => (
            PathBuf::from(&s[..last + i]),
            LayoutSelector::Tag(s[last + i + 1..].to_string()),
        ),
        _ => (PathBuf::from(s), LayoutSelector::Only),
    }
}

/// Copy one image of the OCI layout directory `dir` into the content store
/// (every blob verified against its digest) and unpack it, for
/// `--build-context NAME=oci-layout://DIR`. The image is not named: the
/// snapshotter's lease keeps it while this process lives.
pub fn load_layout_dir(
    store: &ImageStore<'_>,
    dir: &Path,
    selector: &LayoutSelector,
) -> Result<Image> {
    let snap = store.snapshotter();
    let lio = |path: PathBuf| move |source| Error::LayoutIo { path, source };
    let _no_gc = snap
        .layers()
        .gc_guard(false)
        .map_err(|e| store_err("cannot take the store's GC lock", e.into()))?;
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(lio(index_path.clone()))?;
    let index: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        entry: index_path.display().to_string(),
        reason: crate::error_chain(&e),
    })?;
    let chosen = choose_in_layout(dir, &index, selector)?;
    copy_layout_closure(store, dir, &chosen)?;
    let image = store
        .get(&chosen, None)
        .map_err(|e| store_err(format!("image {} in {}", chosen.digest(), dir.display()), e))?;
    store.unpack(&image).map_err(|e| {
        store_err(
            format!(
                "cannot unpack the layers of {}",
                image.manifest_descriptor.digest()
            ),
            e,
        )
    })?;
    Ok(image)
}

/// The descriptor `selector` names in the layout `dir` whose index is
/// `index`: its only image, the image tagged so, or a manifest or index by
/// digest (also one inside an index, read from its blob).
fn choose_in_layout(
    dir: &Path,
    index: &ImageIndex,
    selector: &LayoutSelector,
) -> Result<Descriptor> {
    let tag_of = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(content::REF_NAME))
            .cloned()
    };
    Ok(match selector {
        LayoutSelector::Only => match index.manifests().as_slice() {
            [one] => one.clone(),
            many => {
                return Err(Error::WhichImage {
                    dir: dir.to_path_buf(),
                    count: many.len(),
                })
            }
        },
        LayoutSelector::Tag(t) => index
            .manifests()
            .iter()
            .find(|d| tag_of(d).as_deref() == Some(t.as_str()))
            .cloned()
            .ok_or_else(|| Error::NoSuchImage {
                dir: dir.to_path_buf(),
                selector: format!(":{t}"),
                available: {
                    let tags: Vec<String> = index.manifests().iter().filter_map(tag_of).collect();
                    if tags.is_empty() {
                        "no tagged images".into()
                    } else {
                        tags.join(", ")
                    }
                },
            })?,
        LayoutSelector::Digest(d) => match index.manifests().iter().find(|m| m.digest() == d) {
            Some(m) => m.clone(),
            // a manifest inside an index: its media type is read from it
            None => {
                let path = blob_path_in(dir, d)?;
                let bytes = std::fs::read(&path).map_err(|_| Error::NoSuchImage {
                    dir: dir.to_path_buf(),
                    selector: format!("@{d}"),
                    available: index
                        .manifests()
                        .iter()
                        .map(|m| m.digest().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| Error::Json {
                        entry: path.display().to_string(),
                        reason: crate::error_chain(&e),
                    })?;
                let media = if v.get("manifests").is_some() {
                    MediaType::ImageIndex
                } else {
                    MediaType::ImageManifest
                };
                Descriptor::new(media, bytes.len() as u64, d.clone())
            }
        },
    })
}

/// Copy the closure of `chosen` from the layout `dir` into the store, each
/// blob verified against its digest and leased: an index's present
/// children (other platforms may be left out of a layout), a manifest's
/// config and layers.
fn copy_layout_closure(store: &ImageStore<'_>, dir: &Path, chosen: &Descriptor) -> Result<()> {
    let snap = store.snapshotter();
    let content = snap.content();
    let lio = |path: PathBuf| move |source| Error::LayoutIo { path, source };
    let mut todo = vec![(chosen.clone(), true)];
    while let Some((d, required)) = todo.pop() {
        let path = blob_path_in(dir, d.digest())?;
        if !path.exists() {
            if required {
                return Err(Error::MissingBlob {
                    digest: d.digest().clone(),
                    what: format!("in {}", dir.display()),
                });
            }
            continue;
        }
        if !content.contains(d.digest()) {
            let mut r = std::fs::File::open(&path).map_err(lio(path.clone()))?;
            let mut w = content.writer(Some(d.digest().clone()))?;
            io::copy(&mut r, &mut w).map_err(lio(path.clone()))?;
            match w.commit() {
                Ok(_) => {}
                Err(content::Error::DigestMismatch { actual, .. }) => {
                    return Err(Error::BlobDigest {
                        entry: path.display().to_string(),
                        actual,
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        snap.lease()
            .add_blob(d.digest())
            .map_err(|e| store_err("cannot lease a copied blob", e.into()))?;
        // only manifests and indexes point further (docker's types too)
        let t = d.media_type().to_string();
        if !(t.contains("manifest") || t.contains("index")) || d.size() > META_LIMIT {
            continue;
        }
        let bytes = content.read_blob(d.digest())?;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        if let Some(children) = v.get("manifests").and_then(|m| m.as_array()) {
            for c in children {
                if let Ok(c) = serde_json::from_value::<Descriptor>(c.clone()) {
                    // other platforms may be left out of a layout
                    todo.push((c, false));
                }
            }
        } else if let Ok(m) = serde_json::from_slice::<oci_spec::image::ImageManifest>(&bytes) {
            todo.push((m.config().clone(), true));
            todo.extend(m.layers().iter().map(|l| (l.clone(), true)));
        }
    }
    Ok(())
}

fn blob_path_in(dir: &Path, d: &Digest) -> Result<PathBuf> {
    if d.algorithm().as_ref() != "sha256" {
        return Err(Error::Algorithm(d.to_string()));
    }
    Ok(dir.join("blobs").join("sha256").join(d.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_refs_split_like_buildkit() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            parse_layout_ref("/x/layout"),
            (PathBuf::from("/x/layout"), LayoutSelector::Only)
        );
        assert_eq!(
            parse_layout_ref("/x/layout:v1"),
            (PathBuf::from("/x/layout"), LayoutSelector::Tag("v1".into()))
        );
        assert_eq!(
            parse_layout_ref("./host:5000/dir"),
            (PathBuf::from("./host:5000/dir"), LayoutSelector::Only)
        );
        assert_eq!(
            parse_layout_ref(&format!("rel@{d}")),
            (
                PathBuf::from("rel"),
                LayoutSelector::Digest(d.parse().unwrap())
            )
        );
    }

    #[test]
    fn paths_are_cleaned_and_links_resolved() {
        assert_eq!(clean_path("./a/./b").unwrap(), "a/b");
        assert!(clean_path("/etc/passwd").is_err());
        assert!(clean_path("a/../../b").is_err());
        assert_eq!(
            resolve_link("abc/layer.tar", "../def/layer.tar").as_deref(),
            Some("def/layer.tar")
        );
        assert_eq!(resolve_link("x", "../../y"), None);
    }
}
