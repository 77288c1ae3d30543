//! The local image store: names mapped to manifests (or indexes) in the
//! content store's `index.json`, with the `org.opencontainers.image.ref.name`
//! annotation holding the full normalised name
//! (`docker.io/library/busybox:latest`), so the store stays an OCI layout
//! that skopeo and umoci read. An image loaded without a name is kept as an
//! entry without that annotation (`<none>` in `kiln images`).
//!
//! It owns naming (tag, resolve, list, untag) and the typed view of a stored
//! image ([`Image`]). It never deletes blobs or layers itself: removing a
//! name only drops the reference, and the snapshotter's GC frees whatever
//! no name, pin or live lease reaches. Retagging a name moves it; the image
//! it named before becomes unreferenced unless another name keeps it.

use kiln_snapshotter::content::{self, ContentStore, REF_NAME};
use kiln_snapshotter::layers;
use kiln_snapshotter::snapshot::{self, Snapshotter};
use oci_spec::image::{
    Arch, Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, ImageManifestBuilder,
    MediaType, Os,
};

use super::reference::{self, Reference};

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no image named {0:?} in the local store; `kiln images` lists them, `kiln load` or `kiln import` adds one")]
    NotFound(String),
    #[error(
        "image id prefix {prefix:?} is ambiguous: it matches {count} images; give more digits"
    )]
    Ambiguous { prefix: String, count: usize },
    #[error("image {id} is referenced by several names ({names}); remove them by name, or use --force to remove them all")]
    ManyNames { id: String, names: String },
    #[error("{what} {digest} in the image store is not valid JSON of its kind")]
    BadJson {
        what: &'static str,
        digest: Digest,
        source: oci_spec::OciSpecError,
    },
    #[error("image index {digest} has no manifest for {platform} in the store (stored: {available}); pick one with --platform")]
    NoPlatform {
        digest: Digest,
        platform: String,
        available: String,
    },
    #[error("image config {config}: diffID {value:?} is not a digest")]
    BadDiffId { config: Digest, value: String },
    #[error("image {manifest}: the manifest lists {layers} layers but its config has {diff_ids} diffIDs")]
    LayerCount {
        manifest: Digest,
        layers: usize,
        diff_ids: usize,
    },
    #[error(transparent)]
    Name(#[from] reference::Error),
    #[error(transparent)]
    Content(#[from] content::Error),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error(transparent)]
    Layers(#[from] layers::Error),
    #[error(transparent)]
    Variant(#[from] kiln_snapshotter::variants::Error),
}

/// Result type of the image store.
pub type Result<T> = std::result::Result<T, Error>;

/// An OS/architecture pair (`linux/amd64`, `linux/arm64/v8`), with the
/// OS version when one is asked for (`windows(10.0.20348)/amd64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub os_version: Option<String>,
}

impl From<&crate::frontend::Platform> for Platform {
    fn from(p: &crate::frontend::Platform) -> Self {
        Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
            os_version: p.os_version.clone(),
        }
    }
}

impl Platform {
    /// The platform kiln runs on, in Go's GOOS/GOARCH names.
    pub fn host() -> Self {
        Platform {
            os: Os::default().to_string(),
            architecture: Arch::default().to_string(),
            variant: None,
            os_version: None,
        }
    }

    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('/');
        let os = it.next().filter(|x| !x.is_empty())?;
        let architecture = it.next().filter(|x| !x.is_empty())?;
        let variant = it.next().map(str::to_string);
        if it.next().is_some() || variant.as_deref() == Some("") {
            return None;
        }
        Some(Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant,
            os_version: None,
        })
    }

    /// Whether an index entry's `p` is this platform: the variant and OS
    /// version are compared only when this one names them.
    pub fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        p.os().to_string() == self.os
            && p.architecture().to_string() == self.architecture
            && (self.variant.is_none() || p.variant().as_deref() == self.variant.as_deref())
            && (self.os_version.is_none()
                || p.os_version().as_deref() == self.os_version.as_deref())
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.os)?;
        if let Some(v) = &self.os_version {
            write!(f, "({v})")?;
        }
        write!(f, "/{}", self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One stored image, read and parsed.
#[derive(Debug, Clone)]
pub struct Image {
    /// the full name it was found by, if any
    pub name: Option<String>,
    /// the `index.json` entry (a manifest or an index), without the name
    /// annotation
    pub target: Descriptor,
    /// the platform manifest's descriptor (equals `target` unless the
    /// target is an index)
    pub manifest_descriptor: Descriptor,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    /// the config blob exactly as stored (docker-only fields included)
    pub config_bytes: Vec<u8>,
}

impl Image {
    /// The image ID, as docker shows it: the config digest.
    pub fn id(&self) -> &Digest {
        self.manifest.config().digest()
    }

    /// Layer descriptors, bottom first.
    pub fn layers(&self) -> &[Descriptor] {
        self.manifest.layers()
    }

    /// The diffIDs from the config, bottom first, checked against the
    /// manifest's layer count.
    pub fn diff_ids(&self) -> Result<Vec<Digest>> {
        let ids = self
            .config
            .rootfs()
            .diff_ids()
            .iter()
            .map(|s| {
                s.parse::<Digest>().map_err(|_| Error::BadDiffId {
                    config: self.id().clone(),
                    value: s.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if ids.len() != self.layers().len() {
            return Err(Error::LayerCount {
                manifest: self.manifest_descriptor.digest().clone(),
                layers: self.layers().len(),
                diff_ids: ids.len(),
            });
        }
        Ok(ids)
    }

    /// The chain ID of the whole layer stack (`None` for an image without
    /// layers). Computed from the config; see [`ImageStore::unpack`] to make
    /// sure the layers are on disk.
    pub fn chain_id(&self) -> Result<Option<Digest>> {
        Ok(layers::chain_id_of(&self.diff_ids()?))
    }

    /// Total size of the image's blobs as stored (manifest, config, layers).
    pub fn size(&self) -> u64 {
        self.manifest_descriptor.size()
            + self.manifest.config().size()
            + self.layers().iter().map(Descriptor::size).sum::<u64>()
    }
}

/// One row of `kiln images`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// the full name; `None` for an unnamed image
    pub name: Option<String>,
    pub id: Digest,
    /// the `index.json` entry's digest (what `name@digest` matches)
    pub digest: Digest,
    /// the config's `created`, RFC 3339
    pub created: Option<String>,
    pub size: u64,
}

/// What [`ImageStore::remove`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// full names dropped
    pub untagged: Vec<String>,
    /// image IDs no entry refers to any more (their blobs are garbage now)
    pub deleted: Vec<Digest>,
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

fn without_name(d: &Descriptor) -> Descriptor {
    let mut d = d.clone();
    if let Some(mut a) = d.annotations().clone() {
        a.remove(REF_NAME);
        d.set_annotations(if a.is_empty() { None } else { Some(a) });
    }
    d
}

fn is_index(d: &Descriptor, bytes: &[u8]) -> bool {
    match d.media_type() {
        MediaType::ImageIndex => true,
        MediaType::ImageManifest => false,
        MediaType::Other(t) if t == "application/vnd.docker.distribution.manifest.list.v2+json" => {
            true
        }
        _ => serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .is_some_and(|v| v.get("manifests").is_some() && v.get("config").is_none()),
    }
}

/// Named images over a snapshotter's content store.
pub struct ImageStore<'s> {
    snap: &'s Snapshotter,
    platform: Platform,
    /// an index without that platform gives its first image instead
    any_platform: bool,
}

impl<'s> ImageStore<'s> {
    /// The store inside `snap`, choosing the host platform from indexes.
    pub fn new(snap: &'s Snapshotter) -> Self {
        ImageStore {
            snap,
            platform: Platform::host(),
            any_platform: false,
        }
    }

    /// The store for a caller that wants an index whatever its platforms
    /// (a push of every image in it): an index without the host's
    /// platform resolves to its first image instead of failing.
    pub fn any_platform(mut self) -> Self {
        self.any_platform = true;
        self
    }

    /// Choose `platform` instead of the host's when a name points at an
    /// index.
    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// The snapshotter this store lives in.
    pub fn snapshotter(&self) -> &'s Snapshotter {
        self.snap
    }

    fn content(&self) -> &'s ContentStore {
        self.snap.content()
    }

    /// Read the image an `index.json` entry points to.
    pub fn get(&self, target: &Descriptor, name: Option<String>) -> Result<Image> {
        let target = without_name(target);
        let bytes = self.content().read_blob(target.digest())?;
        let (manifest_descriptor, bytes) = if is_index(&target, &bytes) {
            let index = ImageIndex::from_reader(&bytes[..]).map_err(|source| Error::BadJson {
                what: "image index",
                digest: target.digest().clone(),
                source,
            })?;
            let pick = self.pick(&index, target.digest())?;
            let b = self.content().read_blob(pick.digest())?;
            (pick, b)
        } else {
            (target.clone(), bytes)
        };
        let manifest = ImageManifest::from_reader(&bytes[..]).map_err(|source| Error::BadJson {
            what: "image manifest",
            digest: manifest_descriptor.digest().clone(),
            source,
        })?;
        let config_bytes = self.content().read_blob(manifest.config().digest())?;
        let config = ImageConfiguration::from_reader(&config_bytes[..]).map_err(|source| {
            Error::BadJson {
                what: "image config",
                digest: manifest.config().digest().clone(),
                source,
            }
        })?;
        Ok(Image {
            name,
            target,
            manifest_descriptor,
            manifest,
            config,
            config_bytes,
        })
    }

    fn pick(&self, index: &ImageIndex, digest: &Digest) -> Result<Descriptor> {
        let present: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| self.content().contains(d.digest()))
            .collect();
        if let Some(d) = present.iter().find(|d| {
            d.platform()
                .as_ref()
                .is_some_and(|p| self.platform.matches(p))
        }) {
            return Ok((*d).clone());
        }
        // a single manifest without a platform is the image itself
        if let [only] = present.as_slice() {
            if only.platform().is_none() {
                return Ok((*only).clone());
            }
        }
        if let Some(first) = present.first().filter(|_| self.any_platform) {
            return Ok((*first).clone());
        }
        let available: Vec<String> = present
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .map(|p| format!("{}/{}", p.os(), p.architecture()))
            .collect();
        Err(Error::NoPlatform {
            digest: digest.clone(),
            platform: self.platform.to_string(),
            available: if available.is_empty() {
                "none".into()
            } else {
                available.join(", ")
            },
        })
    }

    /// Every `index.json` entry.
    fn entries(&self) -> Result<Vec<Descriptor>> {
        Ok(self.content().index()?.manifests().clone())
    }

    /// Resolve a name (`busybox`, `localhost/x:1`), `name@sha256:...`, a
    /// full `sha256:...` digest, or a hex prefix of an image ID or manifest
    /// digest (as `docker images` shows them). Names are tried before ID
    /// prefixes.
    pub fn resolve(&self, what: &str) -> Result<Image> {
        let entries = self.entries()?;
        let hex_prefix = what.strip_prefix("sha256:").unwrap_or(what);
        let looks_like_id = !hex_prefix.is_empty()
            && hex_prefix.len() <= 64
            && hex_prefix
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !what.starts_with("sha256:") {
            match Reference::parse(what) {
                Ok(r) => {
                    if let Some(d) = &r.digest {
                        // name@digest: the digest decides, the name must match
                        let repo = r.repository();
                        let hit = entries.iter().find(|e| {
                            e.digest().to_string() == *d
                                && match ref_name(e).and_then(|n| Reference::parse(n).ok()) {
                                    Some(n) => n.repository() == repo,
                                    None => true,
                                }
                        });
                        return match hit {
                            Some(e) => self.get(e, ref_name(e).map(str::to_string)),
                            None => Err(Error::NotFound(what.into())),
                        };
                    }
                    let full = r.to_string();
                    if let Some(e) = entries.iter().find(|e| ref_name(e) == Some(full.as_str())) {
                        return self.get(e, Some(full));
                    }
                }
                Err(e) if !looks_like_id => return Err(e.into()),
                Err(_) => {}
            }
        }
        if !looks_like_id {
            return Err(Error::NotFound(what.into()));
        }
        let mut hits: Vec<(Descriptor, Image)> = Vec::new();
        for e in &entries {
            let img = match self.get(e, ref_name(e).map(str::to_string)) {
                Ok(i) => i,
                Err(_) => continue,
            };
            let matches = img.id().digest().starts_with(hex_prefix)
                || e.digest().digest().starts_with(hex_prefix);
            if matches && !hits.iter().any(|(_, h)| h.id() == img.id()) {
                hits.push((e.clone(), img));
            }
        }
        match hits.len() {
            0 => Err(Error::NotFound(what.into())),
            1 => Ok(hits.pop().expect("one hit").1),
            count => Err(Error::Ambiguous {
                prefix: what.into(),
                count,
            }),
        }
    }

    /// Name `target` (a manifest or index already in the content store)
    /// `name`, normalised; returns the full name. A name already in use
    /// moves to the new target.
    pub fn tag(&self, name: &str, target: &Descriptor) -> Result<String> {
        let r = Reference::parse(name)?;
        let full = Reference {
            digest: None,
            tag: r.tag.or_else(|| Some("latest".into())),
            ..r
        }
        .to_string();
        let target = without_name(target);
        self.content().set_ref(&full, &target)?;
        // the same image kept unnamed is no longer needed
        self.content().update_index(|m| {
            m.retain(|d| !(ref_name(d).is_none() && d.digest() == target.digest()));
        })?;
        Ok(full)
    }

    /// Also name `target` by `name`'s repository and its digest
    /// (`repo@sha256:...`, the `name-canonical=true` of an image output);
    /// returns that name.
    pub fn tag_canonical(&self, name: &str, target: &Descriptor) -> Result<String> {
        let r = Reference::parse(name)?;
        let full = Reference {
            tag: None,
            digest: Some(target.digest().to_string()),
            ..r
        }
        .to_string();
        self.content().set_ref(&full, &without_name(target))?;
        Ok(full)
    }

    /// Keep `target` in the store without a name (an untagged load), unless
    /// some entry already refers to it.
    pub fn add_unnamed(&self, target: &Descriptor) -> Result<()> {
        let target = without_name(target);
        self.content().update_index(|m| {
            if !m.iter().any(|d| d.digest() == target.digest()) {
                m.push(target);
            }
        })?;
        Ok(())
    }

    /// Every image, one row per name (unnamed images once), sorted by name.
    pub fn list(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for e in self.entries()? {
            let name = ref_name(&e).map(str::to_string);
            // an entry this platform cannot read still gets a row
            let (id, created, size) = match self.get(&e, name.clone()) {
                Ok(img) => (img.id().clone(), img.config.created().clone(), img.size()),
                Err(_) => (e.digest().clone(), None, e.size()),
            };
            out.push(ImageSummary {
                name,
                id,
                digest: e.digest().clone(),
                created,
                size,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.as_ref().cmp(b.id.as_ref())));
        Ok(out)
    }

    /// Remove a name, or with an ID or digest every entry of that image
    /// (refused when several names refer to it, unless `force`). The blobs
    /// stay until the next GC ([`Snapshotter::gc`]).
    pub fn remove(&self, what: &str, force: bool) -> Result<Removed> {
        let image = self.resolve(what)?;
        let by_name = image.name.is_some()
            && Reference::parse(what)
                .ok()
                .filter(|r| r.digest.is_none())
                .is_some_and(|r| Some(r.to_string()) == image.name);
        let entries = self.entries()?;
        let same_image = |d: &Descriptor| d.digest() == image.target.digest();
        let doomed: Vec<Descriptor> = if by_name {
            entries
                .iter()
                .filter(|d| ref_name(d) == image.name.as_deref())
                .cloned()
                .collect()
        } else {
            let all: Vec<Descriptor> = entries.iter().filter(|d| same_image(d)).cloned().collect();
            let names: Vec<&str> = all.iter().filter_map(ref_name).collect();
            if names.len() > 1 && !force {
                return Err(Error::ManyNames {
                    id: short_id(image.id()),
                    names: names.join(", "),
                });
            }
            all
        };
        let mut removed = Removed::default();
        self.content().update_index(|m| {
            m.retain(|d| {
                let gone = doomed
                    .iter()
                    .any(|x| x.digest() == d.digest() && ref_name(x) == ref_name(d));
                if gone {
                    if let Some(n) = ref_name(d) {
                        removed.untagged.push(n.to_string());
                    }
                }
                !gone
            });
        })?;
        if !self.entries()?.iter().any(same_image) {
            removed.deleted.push(image.id().clone());
        }
        Ok(removed)
    }

    /// Store an image made of `layers` (already in the content store) with
    /// `config` (its `rootfs.diff_ids` must list them): writes the config
    /// and an OCI manifest, leased by the snapshotter until named.
    pub fn write_image(
        &self,
        config: &ImageConfiguration,
        layers: Vec<Descriptor>,
    ) -> Result<Image> {
        let config_bytes = canonical_json(config);
        self.write_image_raw(
            config_bytes,
            MediaType::ImageConfig,
            layers,
            MediaType::ImageManifest,
            None,
        )
    }

    /// [`ImageStore::write_image`] with the config as bytes (kept exactly)
    /// and explicit media types.
    pub fn write_image_raw(
        &self,
        config_bytes: Vec<u8>,
        config_type: MediaType,
        layers: Vec<Descriptor>,
        manifest_type: MediaType,
        annotations: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Image> {
        let _no_gc = self.snap.layers().gc_guard(false)?;
        let config_desc = self.content().put_bytes(config_type, &config_bytes)?;
        self.snap.lease().add_blob(config_desc.digest())?;
        for l in &layers {
            self.snap.lease().add_blob(l.digest())?;
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(manifest_type.clone())
            .config(config_desc)
            .layers(layers)
            .build()
            .expect("manifest has every required field");
        let mut manifest = manifest;
        manifest.set_annotations(annotations);
        let bytes = canonical_json(&manifest);
        let desc = self.content().put_bytes(manifest_type, &bytes)?;
        self.snap.lease().add_blob(desc.digest())?;
        self.get(&desc, None)
    }

    /// Unpack the image's layers (reusing those already on disk) and return
    /// the top chain ID and any warnings from applying them.
    pub fn unpack(&self, image: &Image) -> Result<(Option<Digest>, Vec<String>)> {
        let (chain, reports) = self.snap.unpack_image(image.manifest_descriptor.digest())?;
        Ok((chain, reports.iter().filter_map(|r| r.warning()).collect()))
    }

    /// Collect blobs and layers nothing refers to.
    pub fn gc(&self) -> Result<(layers::GcReport, Vec<Digest>)> {
        Ok(self.snap.gc()?)
    }
}

/// JSON with every object's keys sorted. oci-spec keeps labels, volumes,
/// ports and annotations in `HashMap`s, whose order changes from process to
/// process; serialising them directly would give the same image a new
/// digest on every build.
pub fn canonical_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // serde_json's Value keeps objects in a BTreeMap (no preserve_order)
    let v = serde_json::to_value(value).expect("OCI types serialise to JSON");
    serde_json::to_vec(&v).expect("a JSON value serialises")
}

/// The 12-digit ID docker shows.
pub fn short_id(d: &Digest) -> String {
    d.digest().chars().take(12).collect()
}
