//! Build cache export and import (`--cache-to`, `--cache-from`), so an
//! ephemeral CI runner with an empty state directory can start warm.
//!
//! An exported cache is an OCI image layout: one manifest whose config
//! (media type [`CONFIG_MEDIA_TYPE`]) lists cache records, each a step's
//! key and the image state it produced, and whose layers are the layer
//! blobs those states name, exactly as stored (so their digests hold).
//! The same manifest and blobs go to a registry for `type=registry`.
//!
//! Import is lazy: a step whose key misses the local cache looks the key
//! up in the imported records; on a hit, the blobs it needs are copied in
//! (each verified against its digest as it is written), its layers are
//! unpacked (each verified against its diffID), and a local record is
//! written, so the step is a cache hit without running. Nothing of an
//! imported cache is trusted beyond those digests: a record can only name
//! layers, and a layer is only used if its bytes hash to what it claims.
//!
//! This module never runs a step and never decides which key a step has.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_snapshotter::content::ContentStore;
use kiln_snapshotter::layers::chain_id;
use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::{
    Descriptor, DescriptorBuilder, Digest, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType,
};
use serde::{Deserialize, Serialize};

use super::image_state::ImageState;
use super::parallel::write_atomic;
use super::step_cache::{Cache, Key};

/// The config media type of a kiln cache manifest.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.buildcache.config.v1+json";

/// Errors of cache export and import.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--cache-{dir} {spec:?}: {why}")]
    Spec {
        dir: &'static str,
        spec: String,
        why: String,
    },
    #[error("cache {place}")]
    Io {
        place: String,
        source: std::io::Error,
    },
    #[error("cache {place} is not a kiln build cache: {why}")]
    Format { place: String, why: String },
    #[error("cache {place}: blob {digest}")]
    Blob {
        place: String,
        digest: String,
        source: Box<kiln_snapshotter::content::Error>,
    },
    #[error("cache {place}")]
    Registry {
        place: String,
        source: Box<crate::registry::Error>,
    },
    #[error("cache {place}: layer {digest}")]
    Layer {
        place: String,
        digest: String,
        source: Box<kiln_snapshotter::snapshot::Error>,
    },
    #[error("cache {place}: layer {digest}")]
    Variant {
        place: String,
        digest: String,
        source: Box<kiln_snapshotter::variants::Error>,
    },
}

fn is_plain_layer(media_type: &str) -> bool {
    kiln_snapshotter::Compression::of_layer_media_type(media_type)
        == Some(kiln_snapshotter::Compression::None)
}

/// The records as an export sends them: layers the store holds as plain
/// tar named by their variants in `compression` (made once and kept, as
/// for a push; gzip by default) and marked `stored_plain`, so a cache is
/// no larger than the image a push sends and an import can store them
/// plain again. `uncompressed` sends them as they are.
pub fn compressed(
    content: &ContentStore,
    records: &[Record],
    compression: kiln_snapshotter::Compression,
) -> Result<Vec<Record>> {
    let mut out = records.to_vec();
    let media = match compression {
        kiln_snapshotter::Compression::None => return Ok(out),
        kiln_snapshotter::Compression::Gzip { .. } => MediaType::ImageLayerGzip,
        kiln_snapshotter::Compression::Zstd { .. } => MediaType::ImageLayerZstd,
    };
    let mut made: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for layer in out.iter_mut().flat_map(|r| r.state.layers.iter_mut()) {
        if !is_plain_layer(&layer.media_type) {
            continue;
        }
        let (digest, size) = match made.get(&layer.digest) {
            Some(v) => v.clone(),
            None => {
                let err = |source| Error::Variant {
                    place: "the build cache".into(),
                    digest: layer.digest.clone(),
                    source: Box::new(source),
                };
                let src: Digest = layer.digest.parse().map_err(|_| Error::Format {
                    place: "the build cache".into(),
                    why: format!("layer digest {:?} is malformed", layer.digest),
                })?;
                let (d, s) =
                    kiln_snapshotter::variants::get_or_make(content, &src, compression, false)
                        .map_err(err)?;
                let v = (d.to_string(), s);
                made.insert(layer.digest.clone(), v.clone());
                v
            }
        };
        layer.digest = digest;
        layer.size = size;
        layer.media_type = media.to_string();
        layer.stored_plain = true;
    }
    Ok(out)
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// `mode=` of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// only the records on the final image's chain
    Min,
    /// every record the build produced or used
    Max,
}

/// Where `--cache-to` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// `ignore_error`: a failed export is a warning, not a failed build
    Local {
        dest: PathBuf,
        mode: Mode,
        ignore_error: bool,
        /// of the layers the store holds plain
        compression: kiln_snapshotter::Compression,
    },
    Registry {
        reference: String,
        mode: Mode,
        ignore_error: bool,
        compression: kiln_snapshotter::Compression,
    },
    Inline,
}

/// Where `--cache-from` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Import {
    Local { src: PathBuf },
    Registry { reference: String },
}

fn fields(dir: &'static str, spec: &str) -> Result<(String, BTreeMap<String, String>)> {
    // a bare reference is a registry cache, as buildx reads it
    if !spec.is_empty() && !spec.contains('=') {
        return Ok((
            "registry".into(),
            BTreeMap::from([("ref".to_string(), spec.to_string())]),
        ));
    }
    let mut kind = None;
    let mut rest = BTreeMap::new();
    let pairs = crate::options::pairs(spec, crate::options::Quotes::FieldStart).map_err(|e| {
        Error::Spec {
            dir,
            spec: spec.into(),
            why: e.to_string(),
        }
    })?;
    for (k, v) in pairs {
        if k == "type" {
            kind = Some(v);
        } else {
            rest.insert(k, v);
        }
    }
    let kind = kind.ok_or_else(|| Error::Spec {
        dir,
        spec: spec.into(),
        why: "type= is missing (local, registry or inline)".into(),
    })?;
    Ok((kind, rest))
}

fn take(
    dir: &'static str,
    spec: &str,
    rest: &mut BTreeMap<String, String>,
    key: &str,
) -> Result<String> {
    rest.remove(key).ok_or_else(|| Error::Spec {
        dir,
        spec: spec.into(),
        why: format!("{key}= is required"),
    })
}

fn no_more(dir: &'static str, spec: &str, rest: &BTreeMap<String, String>) -> Result<()> {
    match rest.keys().next() {
        None => Ok(()),
        Some(k) => Err(Error::Spec {
            dir,
            spec: spec.into(),
            why: format!("unknown key {k:?}"),
        }),
    }
}

/// buildx's `--cache-to` keys about the exported form: an OCI image
/// manifest (`image-manifest=true`, `oci-mediatypes=true`, the one form
/// kiln writes; other values are an error naming them), and the layers'
/// compression (`compression=gzip|zstd|uncompressed`, `compression-level`;
/// gzip level 6 by default, the variants a push sends, shared with it).
fn format_options(
    dir: &'static str,
    spec: &str,
    rest: &mut BTreeMap<String, String>,
) -> Result<kiln_snapshotter::Compression> {
    let refuse = |why: String| Error::Spec {
        dir,
        spec: spec.into(),
        why,
    };
    for (key, only) in [("image-manifest", "true"), ("oci-mediatypes", "true")] {
        match rest.remove(key) {
            None => {}
            Some(v) if v == only => {}
            Some(v) => {
                return Err(refuse(format!(
                    "{key}={v}: kiln writes the cache as an OCI image manifest ({key}={only})"
                )))
            }
        }
    }
    let name = rest.remove("compression");
    let level = rest.remove("compression-level");
    let place = format!("--cache-{dir} {spec:?}");
    crate::image::output::parse_compression(&place, name.as_deref(), level.as_deref())
        .map(Option::unwrap_or_default)
        .map_err(|e| refuse(e.to_string()))
}

impl Export {
    /// Which records this export keeps (`inline` is always min).
    pub fn mode(&self) -> Mode {
        match self {
            Export::Local { mode, .. } | Export::Registry { mode, .. } => *mode,
            Export::Inline => Mode::Min,
        }
    }

    /// How the layers the store holds plain are compressed for it.
    pub fn compression(&self) -> kiln_snapshotter::Compression {
        match self {
            Export::Local { compression, .. } | Export::Registry { compression, .. } => {
                *compression
            }
            Export::Inline => kiln_snapshotter::Compression::default(),
        }
    }

    /// `ignore-error=true`: a failed export only warns.
    pub fn ignore_error(&self) -> bool {
        match self {
            Export::Local { ignore_error, .. } | Export::Registry { ignore_error, .. } => {
                *ignore_error
            }
            Export::Inline => false,
        }
    }

    /// Parse a `--cache-to` value.
    pub fn parse(spec: &str) -> Result<Export> {
        let d = "to";
        let (kind, mut rest) = fields(d, spec)?;
        let mode = match rest.remove("mode").as_deref() {
            None | Some("min") => Mode::Min,
            Some("max") => Mode::Max,
            Some(m) => {
                return Err(Error::Spec {
                    dir: d,
                    spec: spec.into(),
                    why: format!("mode={m}: use min or max"),
                })
            }
        };
        let compression = format_options(d, spec, &mut rest)?;
        let ignore_error = match rest.remove("ignore-error").as_deref() {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(v) => {
                return Err(Error::Spec {
                    dir: d,
                    spec: spec.into(),
                    why: format!("ignore-error={v}: use true or false"),
                })
            }
        };
        let out = match kind.as_str() {
            "local" => Export::Local {
                dest: PathBuf::from(take(d, spec, &mut rest, "dest")?),
                mode,
                ignore_error: ignore_error.unwrap_or(false),
                compression,
            },
            "registry" => Export::Registry {
                reference: take(d, spec, &mut rest, "ref")?,
                mode,
                ignore_error: ignore_error.unwrap_or(false),
                compression,
            },
            "inline" if ignore_error.is_some() => {
                return Err(Error::Spec {
                    dir: d,
                    spec: spec.into(),
                    why: "ignore-error applies to local and registry caches".into(),
                })
            }
            "inline" if mode == Mode::Min => Export::Inline,
            "inline" => {
                return Err(Error::Spec {
                    dir: d,
                    spec: spec.into(),
                    why: "inline cache supports only mode=min (as BuildKit)".into(),
                })
            }
            other => {
                return Err(Error::Spec {
                    dir: d,
                    spec: spec.into(),
                    why: format!("unknown type {other:?}; use local, registry or inline"),
                })
            }
        };
        no_more(d, spec, &rest)?;
        Ok(out)
    }
}

impl Import {
    /// Parse a `--cache-from` value.
    pub fn parse(spec: &str) -> Result<Import> {
        let d = "from";
        let (kind, mut rest) = fields(d, spec)?;
        let out = match kind.as_str() {
            "local" => Import::Local {
                src: PathBuf::from(take(d, spec, &mut rest, "src")?),
            },
            "registry" => Import::Registry {
                reference: take(d, spec, &mut rest, "ref")?,
            },
            other => {
                return Err(Error::Spec {
                    dir: d,
                    spec: spec.into(),
                    why: format!("unknown type {other:?}; use local or registry"),
                })
            }
        };
        no_more(d, spec, &rest)?;
        Ok(out)
    }
}

/// One exported record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub state: ImageState,
}

/// The config blob of a cache manifest.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CacheConfig {
    pub records: Vec<Record>,
}

/// The records to export: every one (max), or those on the final
/// image's chain: a state whose layers are a prefix of the final image's
/// (min).
pub fn select(trail: &[(Key, ImageState)], last: &ImageState, mode: Mode) -> Vec<Record> {
    let mut seen = BTreeSet::new();
    trail
        .iter()
        .filter(|(_, s)| {
            mode == Mode::Max
                || (s.layers.len() <= last.layers.len()
                    && s.layers
                        .iter()
                        .zip(&last.layers)
                        .all(|(a, b)| a.digest == b.digest))
        })
        .filter(|(k, _)| seen.insert(k.0.clone()))
        .map(|(k, s)| Record {
            key: k.0.clone(),
            state: s.clone(),
        })
        .collect()
}

/// The manifest of a cache: its config and the layer blobs its records
/// name, each once.
pub fn manifest_for(config: &Descriptor, records: &[Record]) -> Result<ImageManifest> {
    let mut layers: Vec<Descriptor> = Vec::new();
    let mut seen = BTreeSet::new();
    for r in records {
        for l in &r.state.layers {
            if !seen.insert(l.digest.clone()) {
                continue;
            }
            let digest: Digest = l.digest.parse().map_err(|_| Error::Format {
                place: "record".into(),
                why: format!("bad digest {:?}", l.digest),
            })?;
            layers.push(
                DescriptorBuilder::default()
                    .media_type(MediaType::from(l.media_type.as_str()))
                    .digest(digest)
                    .size(l.size)
                    .build()
                    .map_err(|e| Error::Format {
                        place: "record".into(),
                        why: crate::error_chain(&e),
                    })?,
            );
        }
    }
    ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.clone())
        .layers(layers)
        .build()
        .map_err(|e| Error::Format {
            place: "manifest".into(),
            why: crate::error_chain(&e),
        })
}

fn sha256(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
        .parse()
        .expect("a sha256 digest parses")
}

fn descriptor(media_type: MediaType, bytes: &[u8]) -> Descriptor {
    DescriptorBuilder::default()
        .media_type(media_type)
        .digest(sha256(bytes))
        .size(bytes.len() as u64)
        .build()
        .expect("a descriptor with type, digest and size builds")
}

/// Write `records` as an OCI layout at `dest`: blobs first (those already
/// there are kept), `index.json` last and atomically, so a reader sees the
/// old cache or the new one, never a half-written one.
pub fn export_local(snap: &Snapshotter, records: &[Record], dest: &Path) -> Result<()> {
    let place = dest.display().to_string();
    let io = |source| Error::Io {
        place: place.clone(),
        source,
    };
    let blobs = dest.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io)?;
    let config_bytes = serde_json::to_vec(&CacheConfig {
        records: records.to_vec(),
    })
    .map_err(|e| io(std::io::Error::other(e)))?;
    let config = descriptor(MediaType::Other(CONFIG_MEDIA_TYPE.into()), &config_bytes);
    let manifest = manifest_for(&config, records)?;
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| io(std::io::Error::other(e)))?;
    let manifest_desc = descriptor(MediaType::ImageManifest, &manifest_bytes);
    for layer in manifest.layers() {
        let path = blobs.join(layer.digest().digest());
        if path.exists() {
            continue;
        }
        let mut reader =
            snap.content()
                .open_blob(layer.digest())
                .map_err(|source| Error::Blob {
                    place: place.clone(),
                    digest: layer.digest().to_string(),
                    source: Box::new(source),
                })?;
        write_atomic(&path, |f| std::io::copy(&mut reader, f).map(drop)).map_err(io)?;
    }
    for (d, bytes) in [(&config, &config_bytes), (&manifest_desc, &manifest_bytes)] {
        write_atomic(&blobs.join(d.digest().digest()), |f| f.write_all(bytes)).map_err(io)?;
    }
    write_atomic(&dest.join("oci-layout"), |f| {
        f.write_all(br#"{"imageLayoutVersion":"1.0.0"}"#)
    })
    .map_err(io)?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()
        .map_err(|e| io(std::io::Error::other(e)))?;
    let index_bytes = serde_json::to_vec(&index).map_err(|e| io(std::io::Error::other(e)))?;
    write_atomic(&dest.join("index.json"), |f| f.write_all(&index_bytes)).map_err(io)
}

/// Where an imported cache's blobs come from.
pub trait BlobSource: Send + Sync {
    /// For messages: the directory or reference.
    fn place(&self) -> String;
    /// Copy blob `desc` into `content`, verified against its digest (a
    /// mismatch keeps nothing), telling `on_bytes` how much arrived.
    fn fetch_into(
        &self,
        content: &ContentStore,
        desc: &Descriptor,
        on_bytes: Option<&crate::registry::OnBytes>,
    ) -> Result<()>;
}

/// An OCI layout directory's blobs.
pub struct LayoutBlobs {
    pub dir: PathBuf,
}

impl LayoutBlobs {
    fn copy(&self, digest: &Digest, out: &mut dyn Write) -> std::io::Result<()> {
        let hex = digest.digest();
        if hex.contains('/') || hex.contains("..") {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut f = std::fs::File::open(self.dir.join("blobs/sha256").join(hex))?;
        std::io::copy(&mut f, out).map(drop)
    }
}

impl BlobSource for LayoutBlobs {
    fn place(&self) -> String {
        self.dir.display().to_string()
    }

    fn fetch_into(
        &self,
        content: &ContentStore,
        desc: &Descriptor,
        on_bytes: Option<&crate::registry::OnBytes>,
    ) -> Result<()> {
        let blob_err = |source| Error::Blob {
            place: self.place(),
            digest: desc.digest().to_string(),
            source: Box::new(source),
        };
        let mut w = content
            .writer(Some(desc.digest().clone()))
            .map_err(blob_err)?;
        self.copy(desc.digest(), &mut w)
            .map_err(|source| Error::Io {
                place: self.place(),
                source,
            })?;
        w.commit().map_err(blob_err)?;
        if let Some(f) = on_bytes {
            f(desc.digest(), desc.size(), desc.size());
        }
        Ok(())
    }
}

/// A registry repository's blobs. The registry client is async; the
/// engine calls this from blocking step threads, so each fetch runs as a
/// task on the build's runtime and the thread waits for it.
pub struct RegistryBlobs {
    pub registry: crate::registry::Registry,
    pub reference: crate::image::reference::Reference,
    pub handle: tokio::runtime::Handle,
}

impl BlobSource for RegistryBlobs {
    fn place(&self) -> String {
        self.reference.to_string()
    }

    fn fetch_into(
        &self,
        content: &ContentStore,
        desc: &Descriptor,
        on_bytes: Option<&crate::registry::OnBytes>,
    ) -> Result<()> {
        let registry = match on_bytes {
            Some(f) => self.registry.on_bytes(std::sync::Arc::clone(f)),
            None => self.registry.clone(),
        };
        let reference = self.reference.clone();
        let desc = desc.clone();
        let content = content.clone();
        let task = self.handle.spawn(async move {
            let host = reference.domain.clone();
            registry
                .fetch_blob(&content, &reference, &host, &desc, "cache layer")
                .await
                .map(drop)
        });
        match self.handle.block_on(task) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Registry {
                place: self.place(),
                source: Box::new(e),
            }),
            Err(e) => Err(Error::Format {
                place: self.place(),
                why: crate::error_chain(&e),
            }),
        }
    }
}

/// The key in an image config holding inline cache records.
pub const INLINE_KEY: &str = "kiln.buildcache.v1";

fn parse_reference(place: &str) -> Result<crate::image::reference::Reference> {
    crate::image::reference::Reference::parse(place).map_err(|e| Error::Format {
        place: place.into(),
        why: crate::error_chain(&e),
    })
}

/// Read the cache at registry reference `reference`: a cache manifest
/// (`type=registry` export), an image whose config holds inline records,
/// or an index of such images (a multi-platform image with inline cache:
/// the records of every image in it).
pub async fn read_registry(
    registry: &crate::registry::Registry,
    content: &ContentStore,
    reference: &str,
) -> Result<CacheConfig> {
    let place = reference.to_string();
    let r = parse_reference(reference)?;
    let reg_err = |e| Error::Registry {
        place: place.clone(),
        source: Box::new(e),
    };
    let host = r.domain.clone();
    let (bytes, _digest, media) = registry.fetch_manifest(&r, &host).await.map_err(reg_err)?;
    let index = media.contains("index") || media.contains("manifest.list");
    if !index {
        return manifest_records(registry, content, &r, &bytes, &place).await;
    }
    let index: oci_spec::image::ImageIndex =
        serde_json::from_slice(&bytes).map_err(|e| Error::Format {
            place: place.clone(),
            why: format!("not an image index: {e}"),
        })?;
    let mut all = CacheConfig::default();
    for d in index.manifests() {
        // attestation manifests (platform unknown/unknown) hold no cache
        if d.platform()
            .as_ref()
            .is_some_and(|p| p.os().to_string() == "unknown")
        {
            continue;
        }
        let child = crate::image::reference::Reference {
            digest: Some(d.digest().to_string()),
            tag: None,
            ..r.clone()
        };
        let (bytes, _, _) = registry
            .fetch_manifest(&child, &host)
            .await
            .map_err(reg_err)?;
        let records = manifest_records(registry, content, &child, &bytes, &place).await?;
        all.records.extend(records.records);
    }
    Ok(all)
}

/// The records of one manifest (`bytes`, fetched from `r`): its config's.
async fn manifest_records(
    registry: &crate::registry::Registry,
    content: &ContentStore,
    r: &crate::image::reference::Reference,
    bytes: &[u8],
    place: &str,
) -> Result<CacheConfig> {
    let place = place.to_string();
    let reg_err = |e| Error::Registry {
        place: place.clone(),
        source: Box::new(e),
    };
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| Error::Format {
        place: place.clone(),
        why: format!("not an image or cache manifest: {e}"),
    })?;
    registry
        .fetch_blob(content, r, &r.domain, manifest.config(), "cache config")
        .await
        .map_err(reg_err)?;
    let config = content
        .read_blob(manifest.config().digest())
        .map_err(|source| Error::Blob {
            place: place.clone(),
            digest: manifest.config().digest().to_string(),
            source: Box::new(source),
        })?;
    let mut records = cache_config_from(&place, manifest.config().media_type().as_ref(), &config)?;
    sent_layers(&mut records, &manifest, &config);
    Ok(records)
}

/// Inline records name the layers as the build stored them; the image was
/// pushed with its layers as they are sent (a plain layer as its gzip
/// variant). Point each record's layer at the pushed blob of the same
/// diffID, the one the registry has.
fn sent_layers(records: &mut CacheConfig, manifest: &ImageManifest, config: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(config) else {
        return;
    };
    let Some(diff_ids) = value["rootfs"]["diff_ids"].as_array() else {
        return;
    };
    let sent: BTreeMap<&str, &Descriptor> = diff_ids
        .iter()
        .filter_map(|d| d.as_str())
        .zip(manifest.layers())
        .collect();
    for layer in records
        .records
        .iter_mut()
        .flat_map(|r| r.state.layers.iter_mut())
    {
        if let Some(d) = sent.get(layer.diff_id.as_str()) {
            if d.digest().as_ref() != layer.digest {
                layer.stored_plain |= is_plain_layer(&layer.media_type);
                layer.digest = d.digest().to_string();
                layer.size = d.size();
                layer.media_type = d.media_type().to_string();
            }
        }
    }
}

/// Push `records` as a cache manifest to `reference`: the layer blobs the
/// registry lacks, the config, then the manifest.
pub async fn export_registry(
    registry: &crate::registry::Registry,
    store: &crate::image::ImageStore<'_>,
    records: &[Record],
    reference: &str,
) -> Result<()> {
    let place = reference.to_string();
    let r = parse_reference(reference)?;
    let reg_err = |e| Error::Registry {
        place: place.clone(),
        source: Box::new(e),
    };
    let config_bytes = serde_json::to_vec(&CacheConfig {
        records: records.to_vec(),
    })
    .map_err(|e| Error::Format {
        place: place.clone(),
        why: crate::error_chain(&e),
    })?;
    let content = store.snapshotter().content();
    let config = content
        .put_bytes(MediaType::Other(CONFIG_MEDIA_TYPE.into()), &config_bytes)
        .map_err(|source| Error::Blob {
            place: place.clone(),
            digest: "(config)".into(),
            source: Box::new(source),
        })?;
    // kept from garbage collection until this build ends
    let _ = store.snapshotter().lease().add_blob(config.digest());
    let manifest = manifest_for(&config, records)?;
    for desc in manifest.layers().iter().chain([manifest.config()]) {
        registry
            .push_blob(store, &r, desc, &[])
            .await
            .map_err(reg_err)?;
    }
    let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Format {
        place: place.clone(),
        why: crate::error_chain(&e),
    })?;
    registry
        .push_manifest(&r, bytes, "application/vnd.oci.image.manifest.v1+json")
        .await
        .map_err(reg_err)
}

/// The records of an OCI layout cache directory.
pub fn read_local(src: &Path) -> Result<CacheConfig> {
    let place = src.display().to_string();
    let blobs = LayoutBlobs {
        dir: src.to_path_buf(),
    };
    let read = |d: &Digest| -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        blobs.copy(d, &mut buf).map_err(|source| Error::Io {
            place: place.clone(),
            source,
        })?;
        if sha256(&buf) != *d {
            return Err(Error::Format {
                place: place.clone(),
                why: format!("blob {d} does not match its digest"),
            });
        }
        Ok(buf)
    };
    let index_bytes = std::fs::read(src.join("index.json")).map_err(|source| Error::Io {
        place: place.clone(),
        source,
    })?;
    let index: oci_spec::image::ImageIndex =
        serde_json::from_slice(&index_bytes).map_err(|e| Error::Format {
            place: place.clone(),
            why: format!("index.json: {e}"),
        })?;
    let mut out = CacheConfig::default();
    for m in index.manifests() {
        let manifest: ImageManifest =
            serde_json::from_slice(&read(m.digest())?).map_err(|e| Error::Format {
                place: place.clone(),
                why: format!("manifest {}: {e}", m.digest()),
            })?;
        out.records
            .extend(parse_config(&place, &manifest, &read)?.records);
    }
    Ok(out)
}

/// The records a cache manifest's config holds; a manifest of another
/// kind is an error.
pub fn parse_config(
    place: &str,
    manifest: &ImageManifest,
    read: &dyn Fn(&Digest) -> Result<Vec<u8>>,
) -> Result<CacheConfig> {
    if manifest.config().media_type().to_string() != CONFIG_MEDIA_TYPE {
        return Err(Error::Format {
            place: place.into(),
            why: format!(
                "its config is {}, not {CONFIG_MEDIA_TYPE}",
                manifest.config().media_type()
            ),
        });
    }
    serde_json::from_slice(&read(manifest.config().digest())?).map_err(|e| Error::Format {
        place: place.into(),
        why: format!("config: {e}"),
    })
}

/// The layers of the imported record `key` (from `place`), checked before
/// anything is fetched: each one's blob descriptor, diffID and chain ID;
/// the record's chain must be the one its layers make.
pub fn checked_layers(
    place: &str,
    key: &str,
    state: &ImageState,
) -> Result<Vec<(Descriptor, Digest, Digest)>> {
    let malformed = |why: String| Error::Format {
        place: place.to_string(),
        why,
    };
    let mut out = Vec::new();
    let mut parent: Option<Digest> = None;
    for l in &state.layers {
        let (Ok(digest), Ok(diff_id)) = (l.digest.parse::<Digest>(), l.diff_id.parse::<Digest>())
        else {
            return Err(malformed(format!("record {key} names a malformed layer")));
        };
        let desc = DescriptorBuilder::default()
            .media_type(MediaType::from(l.media_type.as_str()))
            .digest(digest)
            .size(l.size)
            .build()
            .map_err(|e| malformed(crate::error_chain(&e)))?;
        let chain = chain_id(parent.as_ref(), &diff_id);
        parent = Some(chain.clone());
        out.push((desc, diff_id, chain));
    }
    if state.chain.as_deref() != parent.as_ref().map(|d| d.as_ref()) {
        return Err(malformed(format!(
            "record {key} names a chain its layers do not make"
        )));
    }
    Ok(out)
}

/// The cache records in a config blob from `place`: a cache config (media
/// type [`CONFIG_MEDIA_TYPE`]) or an image config with inline records.
pub fn cache_config_from(place: &str, media_type: &str, config: &[u8]) -> Result<CacheConfig> {
    let format = |why: String| Error::Format {
        place: place.to_string(),
        why,
    };
    if media_type == CONFIG_MEDIA_TYPE {
        return serde_json::from_slice(config).map_err(|e| format(format!("config: {e}")));
    }
    // an image: inline records in its config, if it was built with them
    let value: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format(format!("image config: {e}")))?;
    match value.get(INLINE_KEY) {
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| format(format!("inline cache: {e}")))
        }
        None => Err(format(
            "the image holds no inline cache (build it with --cache-to type=inline)".into(),
        )),
    }
}

/// Store the plain tar of the compressed layer blob `compressed` (which
/// must unpack to `diff_id`, the plain blob's digest), and record the
/// compressed blob as its variant in `kind`.
fn store_plain(
    content: &ContentStore,
    place: &str,
    (compressed, kind): (&Digest, kiln_snapshotter::Compression),
    diff_id: &Digest,
) -> Result<()> {
    use kiln_snapshotter::{variants, Compression};
    // decoded and stored like any blob (verified, renamed into place)
    let (plain, _) = variants::get_or_make(content, compressed, Compression::None, false)
        .map_err(|e| variant_err(place, compressed, e))?;
    if plain != *diff_id {
        return Err(Error::Format {
            place: place.to_string(),
            why: format!("layer {compressed} unpacks to {plain}, its record says {diff_id}"),
        });
    }
    record_variant(content, place, (compressed, kind), diff_id)
}

/// Unpack the compressed layer blob `compressed` on `parent`; its tar must
/// hash to `diff_id`.
fn unpack_compressed(
    snap: &Snapshotter,
    place: &str,
    compressed: &Digest,
    parent: Option<&Digest>,
    diff_id: &Digest,
) -> Result<()> {
    use kiln_snapshotter::compression;
    let blob_err = |source| Error::Blob {
        place: place.to_string(),
        digest: compressed.to_string(),
        source: Box::new(source),
    };
    let mut reader = std::io::BufReader::with_capacity(
        1 << 20,
        snap.content().open_blob(compressed).map_err(blob_err)?,
    );
    let io_err = |source| Error::Io {
        place: place.to_string(),
        source,
    };
    let kind = compression::detect(&mut reader).map_err(|e| Error::Format {
        place: place.to_string(),
        why: format!("layer {compressed}: {e}"),
    })?;
    let tar = compression::decoder_send(reader, kind).map_err(io_err)?;
    snap.import(tar, parent, Some(diff_id))
        .map_err(|source| Error::Layer {
            place: place.to_string(),
            digest: compressed.to_string(),
            source: Box::new(source),
        })?;
    Ok(())
}

/// Record the compressed blob `compressed` as the variant in `kind` of
/// the plain blob `diff_id`.
fn record_variant(
    content: &ContentStore,
    place: &str,
    (compressed, kind): (&Digest, kiln_snapshotter::Compression),
    diff_id: &Digest,
) -> Result<()> {
    use kiln_snapshotter::variants;
    let size = content.size(compressed).map_err(|source| Error::Blob {
        place: place.to_string(),
        digest: compressed.to_string(),
        source: Box::new(source),
    })?;
    variants::record(content, diff_id, kind, compressed, size)
        .map_err(|e| variant_err(place, compressed, e))
}

fn variant_err(
    place: &str,
    compressed: &Digest,
    source: kiln_snapshotter::variants::Error,
) -> Error {
    Error::Variant {
        place: place.to_string(),
        digest: compressed.to_string(),
        source: Box::new(source),
    }
}

/// Imported caches, consulted when a key misses locally.
#[derive(Default)]
pub struct Imported {
    sources: Vec<(BTreeMap<String, ImageState>, Box<dyn BlobSource>)>,
}

impl Imported {
    /// Add the records of one source, with where its blobs come from.
    pub fn add(&mut self, config: CacheConfig, blobs: Box<dyn BlobSource>) {
        let map = config
            .records
            .into_iter()
            .map(|r| (r.key, r.state))
            .collect();
        self.sources.push((map, blobs));
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The state for `key` from an imported cache, with its blobs copied
    /// into the content store and its layers unpacked, recorded locally
    /// and leased for this build. None when no source has the key or its
    /// content cannot be had (a miss: the step runs).
    pub fn materialize(
        &self,
        key: &Key,
        cache: &Cache,
        snap: &Snapshotter,
        on_bytes: Option<&crate::registry::OnBytes>,
    ) -> Result<Option<ImageState>> {
        for (records, blobs) in &self.sources {
            let Some(state) = records.get(&key.0) else {
                continue;
            };
            let place = blobs.place();
            let layers = checked_layers(&place, &key.0, state)?;
            let mut state = state.clone();
            let mut parent: Option<Digest> = None;
            for (i, (desc, diff_id, chain)) in layers.into_iter().enumerate() {
                let mut digest = desc.digest().clone();
                if state.layers[i].stored_plain {
                    // stored as the exporting store held it: plain
                    if !snap.content().contains(&diff_id) {
                        if !snap.content().contains(&digest) {
                            blobs.fetch_into(snap.content(), &desc, on_bytes)?;
                        }
                        if !snap.layers().contains(&chain) {
                            // unpacked straight from the compressed blob;
                            // the plain one is then the layer itself when
                            // kiln's tar of it gives back those bytes
                            unpack_compressed(snap, &place, &digest, parent.as_ref(), &diff_id)?;
                        }
                        let kept = snap.keep_unpacked(&diff_id, &chain).map_err(|source| {
                            Error::Layer {
                                place: place.clone(),
                                digest: digest.to_string(),
                                source: Box::new(source),
                            }
                        })?;
                        // gzip (level 6) or zstd, as the cache's media type says
                        let kind = kiln_snapshotter::Compression::of_layer_media_type(
                            desc.media_type().as_ref(),
                        )
                        .unwrap_or_default();
                        let blob = (&digest, kind);
                        if kept {
                            record_variant(snap.content(), &place, blob, &diff_id)?;
                        } else {
                            store_plain(snap.content(), &place, blob, &diff_id)?;
                        }
                    }
                    let size = snap
                        .content()
                        .size(&diff_id)
                        .map_err(|source| Error::Blob {
                            place: place.clone(),
                            digest: diff_id.to_string(),
                            source: Box::new(source),
                        })?;
                    let l = &mut state.layers[i];
                    l.digest = diff_id.to_string();
                    l.size = size;
                    l.media_type = MediaType::ImageLayer.to_string();
                    l.stored_plain = false;
                    digest = diff_id.clone();
                }
                if !snap.layers().contains(&chain) {
                    if !snap.content().contains(&digest) {
                        // verifies the digest; a mismatch keeps nothing
                        blobs.fetch_into(snap.content(), &desc, on_bytes)?;
                    }
                    let reader =
                        snap.content()
                            .open_blob(&digest)
                            .map_err(|source| Error::Blob {
                                place: place.clone(),
                                digest: digest.to_string(),
                                source: Box::new(source),
                            })?;
                    snap.import(reader, parent.as_ref(), Some(&diff_id))
                        .map_err(|source| Error::Layer {
                            place: place.clone(),
                            digest: digest.to_string(),
                            source: Box::new(source),
                        })?;
                }
                parent = Some(chain);
            }
            cache.put(key, &state).map_err(|source| Error::Io {
                place: "records".into(),
                source,
            })?;
            return Ok(cache.lookup(key, snap));
        }
        Ok(None)
    }
}

/// Read every `--cache-from`. A missing or broken cache is a warning: the
/// build runs its steps instead (BuildKit does the same). A registry cache
/// without a registry client is an error.
pub async fn import_all(
    from: &[Import],
    registry: Option<&crate::registry::Registry>,
    snap: &Snapshotter,
    progress: &super::progress::Progress,
) -> Result<Imported> {
    let mut imported = Imported::default();
    for from in from {
        let read = match from {
            Import::Local { src } => tokio::task::block_in_place(|| read_local(src))
                .map(|config| (config, Box::new(LayoutBlobs { dir: src.clone() }) as _)),
            Import::Registry { reference } => {
                let Some(registry) = registry else {
                    return Err(Error::Spec {
                        dir: "from",
                        spec: format!("type=registry,ref={reference}"),
                        why: "this build has no registry client".into(),
                    });
                };
                read_registry_source(registry, snap, reference).await
            }
        };
        match read {
            Ok((config, blobs)) => imported.add(config, blobs),
            Err(e) => progress.summary(&format!(
                "WARNING: --cache-from: {}",
                crate::error_chain(&e)
            )),
        }
    }
    Ok(imported)
}

/// The records of a registry cache and where its blobs come from.
async fn read_registry_source(
    registry: &crate::registry::Registry,
    snap: &Snapshotter,
    reference: &str,
) -> Result<(CacheConfig, Box<dyn BlobSource>)> {
    let r = crate::image::reference::Reference::parse(reference).map_err(|e| Error::Format {
        place: reference.to_string(),
        why: crate::error_chain(&e),
    })?;
    let config = read_registry(registry, snap.content(), reference).await?;
    let blobs = RegistryBlobs {
        registry: registry.clone(),
        reference: r,
        handle: tokio::runtime::Handle::current(),
    };
    Ok((config, Box::new(blobs)))
}

/// Write one `--cache-to` (not `type=inline`, which lives in the image);
/// with `ignore-error=true` a failure is a warning.
pub async fn export(
    snap: &Snapshotter,
    registry: Option<&crate::registry::Registry>,
    to: &Export,
    records: &[Record],
    progress: &std::sync::Arc<super::progress::Progress>,
) -> Result<()> {
    match export_one(snap, registry, to, records, progress).await {
        Err(e) if to.ignore_error() => {
            progress.summary(&format!(
                "WARNING: --cache-to (ignore-error=true): {}",
                crate::error_chain(&e)
            ));
            Ok(())
        }
        r => r,
    }
}

async fn export_one(
    snap: &Snapshotter,
    registry: Option<&crate::registry::Registry>,
    to: &Export,
    records: &[Record],
    progress: &std::sync::Arc<super::progress::Progress>,
) -> Result<()> {
    if matches!(to, Export::Inline) {
        return Ok(());
    }
    // plain layers go as their variants, gzip as a push sends them
    let records =
        &tokio::task::block_in_place(|| compressed(snap.content(), records, to.compression()))?;
    let place = match to {
        Export::Local { dest, .. } => {
            tokio::task::block_in_place(|| export_local(snap, records, dest))?;
            dest.display().to_string()
        }
        Export::Registry { reference, .. } => {
            let registry = registry.ok_or_else(|| Error::Spec {
                dir: "to",
                spec: format!("type=registry,ref={reference}"),
                why: "this build has no registry client".into(),
            })?;
            // a vertex with the bytes of each blob uploaded
            let vertex = progress.new_vertex();
            progress.started(vertex, &format!("exporting cache to {reference}"));
            let started = std::time::Instant::now();
            let sink = std::sync::Arc::clone(progress);
            let registry = registry.on_bytes(std::sync::Arc::new(move |digest, done, total| {
                sink.transfer(vertex, digest.as_ref(), done, total);
            }));
            let store = crate::image::ImageStore::new(snap);
            match export_registry(&registry, &store, records, reference).await {
                Ok(()) => progress.done(vertex, started.elapsed().as_secs_f64()),
                Err(e) => {
                    progress.error(vertex, &crate::error_chain(&e));
                    return Err(e);
                }
            }
            reference.clone()
        }
        Export::Inline => return Ok(()),
    };
    progress.summary(&format!(
        "exported {} cache records to {place}",
        records.len()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_as_buildkit() {
        assert_eq!(
            Export::parse("type=local,dest=/c").unwrap(),
            Export::Local {
                dest: "/c".into(),
                mode: Mode::Min,
                ignore_error: false,
                compression: kiln_snapshotter::Compression::Gzip { level: 6 },
            }
        );
        // a bare reference is a registry cache; ignore-error as buildx
        assert_eq!(
            Export::parse("r/c:t").unwrap(),
            Export::parse("type=registry,ref=r/c:t").unwrap()
        );
        assert_eq!(
            Import::parse("r/c:t").unwrap(),
            Import::Registry {
                reference: "r/c:t".into()
            }
        );
        assert!(Export::parse("type=local,dest=/c,ignore-error=true")
            .unwrap()
            .ignore_error());
        assert!(Export::parse("type=local,dest=/c,ignore-error=maybe").is_err());
        assert!(Export::parse("type=inline,ignore-error=true").is_err());
        // the form kiln writes, as buildx names it; another is refused
        assert!(Export::parse(
            "type=local,dest=/c,image-manifest=true,oci-mediatypes=true,compression=gzip,compression-level=6"
        )
        .is_ok());
        assert_eq!(
            Export::parse("type=local,dest=/c,compression=zstd,compression-level=9")
                .unwrap()
                .compression(),
            kiln_snapshotter::Compression::Zstd { level: 9 }
        );
        for other in [
            "image-manifest=false",
            "oci-mediatypes=false",
            "compression=brotli",
            "compression-level=12",
        ] {
            let e = Export::parse(&format!("type=local,dest=/c,{other}")).unwrap_err();
            assert!(e.to_string().contains(other), "{e}");
        }
        assert!(Import::parse("type=local,src=/c,ignore-error=true").is_err());
        assert_eq!(
            Export::parse("type=registry,ref=r/c:t,mode=max").unwrap(),
            Export::Registry {
                reference: "r/c:t".into(),
                mode: Mode::Max,
                ignore_error: false,
                compression: kiln_snapshotter::Compression::default(),
            }
        );
        assert_eq!(Export::parse("type=inline").unwrap(), Export::Inline);
        assert!(Export::parse("type=inline,mode=max").is_err());
        assert!(Export::parse("type=local").is_err());
        assert!(Export::parse("type=gha").is_err());
        assert!(Export::parse("type=local,dest=x,foo=1").is_err());
        assert_eq!(
            Import::parse("type=local,src=/c").unwrap(),
            Import::Local { src: "/c".into() }
        );
        assert_eq!(
            Import::parse("type=registry,ref=r/c").unwrap(),
            Import::Registry {
                reference: "r/c".into()
            }
        );
        assert!(Import::parse("src=/c").is_err());
    }
}
