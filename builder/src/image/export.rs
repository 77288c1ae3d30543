//! Exporters: a stored [`Image`] written out as an `--output` asks
//! ([`OutputSpec`]): into the local store (`image`), as an OCI layout tar or
//! directory (`oci`), as a docker-archive tar (`docker`), or as its final
//! root filesystem, a directory (`local`) or a tar stream (`tar`).
//!
//! Builds store their layers as plain tar (no step waits for a
//! compressor); outputs that leave the store (`oci`, `docker`) send such
//! layers gzip-compressed, BuildKit's default, and `type=image` keeps them
//! as they are. Otherwise layers are re-written only when asked:
//! `compression=` different from a layer's (or `force-compression=true`)
//! recompresses it, keeping its diffID. Recompressed blobs are stored
//! variants (`kiln_snapshotter::variants`), made once per compression and
//! level, a layer per core at a time;
//! `rewrite-timestamp=true` re-tars each unpacked layer with every mtime
//! clamped to SOURCE_DATE_EPOCH, which changes diffIDs, so the config is
//! re-written with the new `rootfs.diff_ids` (other fields kept as they
//! are). Re-written blobs go to the content store first (their digests and
//! sizes must be known before a tar entry or manifest can name them), leased
//! like any build output.
//!
//! `type=oci` destination rule: `dest=-` is a tar on standard output; a
//! `dest` ending in `/` or naming an existing directory gets a directory
//! layout (merged into an existing layout: entries with the same name are
//! replaced); anything else is a tar file. `tar=true|false` overrides the
//! guess. Files are written beside the destination and renamed into place,
//! so a failed export never leaves a half-written archive.
//!
//! `type=local` writes the merged root filesystem into `dest` (created if
//! missing, merged over what is there) with every file owned by uid/gid 0,
//! which is the calling user on the host side of kiln's user namespace,
//! and without setuid/setgid bits on files (`keep-setid=true` keeps them);
//! `type=tar` keeps the image's owners. With SOURCE_DATE_EPOCH both clamp
//! file mtimes to it. This module never changes a stored image or name
//! except for `type=image`, and never writes outside the destination and
//! the snapshotter's scratch space.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_snapshotter::backend::{copy, ViewSpec};
use kiln_snapshotter::compression::{self, Compression};
use kiln_snapshotter::content::{self, REF_NAME};
use kiln_snapshotter::diff::{self, DiffOptions};
use kiln_snapshotter::layers;
use oci_spec::image::{Descriptor, Digest, MediaType};

use super::output::{AnnotationLevel, Dest, OutputSpec, OutputType};
use super::reference::Reference;
use super::store::{self, Image, ImageStore};

/// Errors of the exporters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Confine(Box<kiln_snapshotter::confine::NotConfined>),
    #[error("rewrite-timestamp=true needs SOURCE_DATE_EPOCH (set it in the environment or as a build arg)")]
    NoEpoch,
    #[error("export to {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("export: cannot read layer {digest}")]
    Layer { digest: Digest, source: io::Error },
    #[error("export: dest {0} is a directory; type={1} writes a tar file, give a file name")]
    DestIsDir(PathBuf, &'static str),
    #[error("export: type=docker cannot hold several platforms ({0}); use type=oci, or build one --platform at a time")]
    DockerMultiPlatform(String),
    #[error("export: dest {0} exists and is not a directory")]
    DestNotDir(PathBuf),
    #[error("export: the image's layer {index} uses media type {media_type}, which kiln cannot recompress")]
    UnknownLayerType { index: usize, media_type: String },
    #[error("export: {context}")]
    Store {
        context: String,
        source: Box<store::Error>,
    },
    #[error("export: rewriting layer {index}")]
    Diff {
        index: usize,
        source: Box<diff::Error>,
    },
    #[error("export: materialising the root filesystem")]
    Copy(#[from] copy::Error),
    #[error(transparent)]
    Content(#[from] content::Error),
    #[error(transparent)]
    Layers(#[from] layers::Error),
    #[error(transparent)]
    Compression(#[from] compression::Error),
    #[error(transparent)]
    Variant(#[from] kiln_snapshotter::variants::Error),
}

/// Result type of the exporters.
pub type Result<T> = std::result::Result<T, Error>;

/// Inputs to an export that are not part of `--output`.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// SOURCE_DATE_EPOCH: the limit for `rewrite-timestamp` and for file
    /// times in `local`/`tar` output
    pub source_date_epoch: Option<i64>,
}

/// What was exported (for `--metadata-file`).
#[derive(Debug, Clone)]
pub struct Exported {
    /// the manifest written (`containerimage.descriptor`); for local/tar
    /// the image's own
    pub manifest: Descriptor,
    /// `containerimage.config.digest`
    pub config: Digest,
    /// full names given to the image (type=image, oci, docker)
    pub names: Vec<String>,
}

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Export `image` as `spec` says; `dest=-` writes to standard output.
pub fn export(
    store: &ImageStore<'_>,
    image: &Image,
    spec: &OutputSpec,
    opts: &ExportOptions,
) -> Result<Exported> {
    let stdout = io::stdout();
    let mut lock = stdout.lock();
    export_to(store, image, spec, opts, &mut lock)
}

/// [`export`] with standard output replaced by `stdout`.
pub fn export_to(
    store: &ImageStore<'_>,
    image: &Image,
    spec: &OutputSpec,
    opts: &ExportOptions,
    stdout: &mut dyn Write,
) -> Result<Exported> {
    prepare(store, [image], spec, opts)?;
    match spec.kind {
        OutputType::Image | OutputType::Oci | OutputType::Docker => {
            let img = rewrite(store, image, spec, opts, platform_of(image).as_deref())?;
            let mut names = Vec::new();
            match spec.kind {
                OutputType::Image => {
                    names = store_names(store, spec, &img.target)?;
                }
                _ => {
                    names.clone_from(&spec.names);
                    write_archive(store, &img, None, spec, opts, stdout)?;
                }
            }
            Ok(Exported {
                manifest: img.manifest_descriptor.clone(),
                config: img.id().clone(),
                names,
            })
        }
        OutputType::Local | OutputType::Tar => {
            write_rootfs(store, image, spec, opts, stdout)?;
            Ok(Exported {
                manifest: image.manifest_descriptor.clone(),
                config: image.id().clone(),
                names: Vec::new(),
            })
        }
    }
}

/// What every export checks and holds first: `rewrite-timestamp` needs an
/// epoch, and the images' blobs are leased, so a concurrent `kiln rmi` and
/// GC cannot take them away halfway through the export.
fn prepare<'i>(
    store: &ImageStore<'_>,
    images: impl IntoIterator<Item = &'i Image>,
    spec: &OutputSpec,
    opts: &ExportOptions,
) -> Result<()> {
    if spec.rewrite_timestamp && opts.source_date_epoch.is_none() {
        return Err(Error::NoEpoch);
    }
    let snap = store.snapshotter();
    let _no_gc = snap.layers().gc_guard(false)?;
    for image in images {
        for d in image
            .layers()
            .iter()
            .map(Descriptor::digest)
            .chain([image.id(), image.manifest_descriptor.digest()])
        {
            snap.lease().add_blob(d)?;
        }
    }
    Ok(())
}

/// Export the images of a multi-platform build, one per platform: an OCI
/// image index in `type=image` (stored under the names) and `type=oci`,
/// one top-level directory per platform (`linux_arm64/`) in `type=local`
/// and `type=tar`; `type=docker` cannot hold several and is refused.
pub fn export_platforms(
    store: &ImageStore<'_>,
    images: &[(store::Platform, Image)],
    spec: &OutputSpec,
    opts: &ExportOptions,
) -> Result<Exported> {
    let stdout = io::stdout();
    let mut lock = stdout.lock();
    let (_, first) = images.first().expect("at least one platform");
    prepare(store, images.iter().map(|(_, i)| i), spec, opts)?;
    match spec.kind {
        OutputType::Docker => Err(Error::DockerMultiPlatform(
            images
                .iter()
                .map(|(p, _)| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
        OutputType::Local | OutputType::Tar => {
            let dirs: Vec<(Option<String>, &Image)> = images
                .iter()
                .map(|(p, i)| (Some(p.to_string().replace('/', "_")), i))
                .collect();
            write_rootfs_dirs(store, &dirs, spec, opts, &mut lock)?;
            Ok(Exported {
                manifest: first.manifest_descriptor.clone(),
                config: first.id().clone(),
                names: Vec::new(),
            })
        }
        OutputType::Image | OutputType::Oci => {
            let (index_desc, blobs) = write_index(store, images, spec, opts)?;
            let mut names = Vec::new();
            if spec.kind == OutputType::Image {
                names = store_names(store, spec, &index_desc)?;
            } else {
                names.clone_from(&spec.names);
                write_archive(
                    store,
                    first,
                    Some((&index_desc, &blobs)),
                    spec,
                    opts,
                    &mut lock,
                )?;
            }
            Ok(Exported {
                manifest: index_desc,
                config: first.id().clone(),
                names,
            })
        }
    }
}

/// A layer's compression, from its media type.
fn layer_compression(media: &MediaType) -> Option<Compression> {
    Compression::of_layer_media_type(media.as_ref())
}

fn same_algorithm(a: Compression, b: Compression) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
}

fn layer_media_type(c: Compression, oci: bool) -> MediaType {
    match (c, oci) {
        (Compression::None, false) => MediaType::Other(DOCKER_LAYER.into()),
        (Compression::Gzip { .. }, false) => MediaType::Other(DOCKER_LAYER_GZIP.into()),
        // docker's media types have no zstd; BuildKit uses the OCI one
        (c, _) => c.media_type(),
    }
}

/// The index of a multi-platform image output: each platform's image
/// re-written as `spec` asks, named in an index with its platform and
/// Name `target` in the store by each of `spec`'s names (and with
/// `name-canonical=true` also by `repo@digest`); the names to push.
fn store_names(
    store: &ImageStore<'_>,
    spec: &OutputSpec,
    target: &Descriptor,
) -> Result<Vec<String>> {
    let err = |n: &str| {
        let context = format!("cannot name the image {n}");
        move |source| Error::Store {
            context,
            source: Box::new(source),
        }
    };
    let mut names = Vec::new();
    for n in &spec.names {
        names.push(store.tag(n, target).map_err(err(n))?);
        if spec.name_canonical {
            store.tag_canonical(n, target).map_err(err(n))?;
        }
    }
    Ok(names)
}

/// annotations; the index's descriptor, and every blob it reaches.
fn write_index(
    store: &ImageStore<'_>,
    images: &[(store::Platform, Image)],
    spec: &OutputSpec,
    opts: &ExportOptions,
) -> Result<(Descriptor, Vec<Descriptor>)> {
    let snap = store.snapshotter();
    let mut manifests = Vec::new();
    let mut blobs = Vec::new();
    for (p, image) in images {
        let p_text = p.to_string();
        let img = rewrite(store, image, spec, opts, Some(&p_text))?;
        let mut d = img.manifest_descriptor.clone();
        d.set_annotations(spec.annotations_at(AnnotationLevel::ManifestDescriptor, Some(&p_text)));
        let mut platform = oci_spec::image::PlatformBuilder::default()
            .os(oci_spec::image::Os::from(p.os.as_str()))
            .architecture(oci_spec::image::Arch::from(p.architecture.as_str()))
            .build()
            .expect("os and architecture set");
        platform.set_variant(p.variant.clone());
        platform.set_os_version(p.os_version.clone());
        d.set_platform(Some(platform));
        blobs.extend(img.layers().iter().cloned());
        blobs.push(img.manifest.config().clone());
        blobs.push(d.clone());
        manifests.push(d);
    }
    let mut index = oci_spec::image::ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()
        .expect("index has its fields");
    index.set_annotations(spec.annotations_at(AnnotationLevel::Index, None));
    let bytes = store::canonical_json(&index);
    let index_desc = {
        let _no_gc = snap.layers().gc_guard(false)?;
        let d = snap.content().put_bytes(MediaType::ImageIndex, &bytes)?;
        snap.lease().add_blob(d.digest())?;
        d
    };
    blobs.push(index_desc.clone());
    Ok((index_desc, blobs))
}

/// The image with layers, config and media types as `spec` asks; the
/// stored image itself when nothing changes.
fn rewrite(
    store: &ImageStore<'_>,
    image: &Image,
    spec: &OutputSpec,
    opts: &ExportOptions,
    platform: Option<&str>,
) -> Result<Image> {
    let snap = store.snapshotter();
    let content = snap.content();
    let store_err = |context: &str| {
        let context = context.to_string();
        move |source| Error::Store {
            context,
            source: Box::new(source),
        }
    };
    let diff_ids = image.diff_ids().map_err(store_err("reading the image"))?;
    let chains: Vec<Digest> = if spec.rewrite_timestamp {
        store
            .unpack(image)
            .map_err(store_err("unpacking the image"))?;
        (1..=diff_ids.len())
            .map(|n| layers::chain_id_of(&diff_ids[..n]).expect("non-empty chain"))
            .collect()
    } else {
        Vec::new()
    };
    let _no_gc = snap.layers().gc_guard(false)?;
    // An output that leaves the store sends the layers a build committed
    // plain as gzip, BuildKit's default; the store keeps them as they are.
    let leaves_store = !matches!(spec.kind, OutputType::Image);
    let target_of = |current: Compression| match spec.compression {
        Some(c) => c,
        None if leaves_store && current == Compression::None => Compression::default(),
        None => current,
    };
    let force = spec.compression.is_some() && spec.force_compression;
    // every recompression at once, a layer per core (each reuses a stored
    // variant when there is one)
    let jobs: Vec<(usize, Digest, Compression)> = if spec.rewrite_timestamp {
        Vec::new()
    } else {
        image
            .layers()
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let current = layer_compression(l.media_type())?;
                let target = target_of(current);
                (force || !same_algorithm(current, target)).then(|| (i, l.digest().clone(), target))
            })
            .collect()
    };
    let mut recompressed = recompress_all(content, &jobs, force)?;
    let mut changed = false;
    let mut new_layers = Vec::new();
    let mut new_diff_ids = Vec::new();
    for (index, layer) in image.layers().iter().enumerate() {
        let Some(current) = layer_compression(layer.media_type()) else {
            // a layer type kiln does not know is passed through untouched,
            // unless it would have to be re-written
            if spec.compression.is_some() || spec.rewrite_timestamp {
                return Err(Error::UnknownLayerType {
                    index,
                    media_type: layer.media_type().to_string(),
                });
            }
            new_layers.push(layer.clone());
            new_diff_ids.push(diff_ids[index].clone());
            continue;
        };
        let target = target_of(current);
        let (digest, size, diff_id) = if spec.rewrite_timestamp {
            let epoch = opts.source_date_epoch;
            retimed_layer(store, &chains[index], target, epoch, index)?
        } else if let Some((d, s)) = recompressed.remove(&index) {
            (d, s, diff_ids[index].clone())
        } else {
            (
                layer.digest().clone(),
                layer.size(),
                diff_ids[index].clone(),
            )
        };
        snap.lease().add_blob(&digest)?;
        let media = layer_media_type(target, spec.oci_mediatypes);
        changed |= digest != *layer.digest() || media != *layer.media_type();
        let mut d = Descriptor::new(media, size, digest);
        let mut notes = layer.annotations().clone();
        if let (true, Some(e)) = (spec.rewrite_timestamp, opts.source_date_epoch) {
            notes
                .get_or_insert_with(Default::default)
                .insert("buildkit/rewritten-timestamp".into(), e.to_string());
        }
        d.set_annotations(notes);
        new_layers.push(d);
        new_diff_ids.push(diff_id);
    }
    let annotations = spec.annotations_at(AnnotationLevel::Manifest, platform);
    let layers = RewrittenLayers {
        layers: new_layers,
        diff_ids: new_diff_ids,
        changed: changed || annotations.is_some(),
        annotations,
    };
    store_rewritten(store, image, spec, layers, &diff_ids)
}

/// Layer `index` written again from its unpacked `chain` with file times
/// clamped to `epoch`, in `target` compression: its digest, size and
/// diffID.
fn retimed_layer(
    store: &ImageStore<'_>,
    chain: &Digest,
    target: Compression,
    epoch: Option<i64>,
    index: usize,
) -> Result<(Digest, u64, Digest)> {
    let snap = store.snapshotter();
    let blob = diff::write_layer(
        &snap.layers().layer_dir(chain),
        snap.content(),
        DiffOptions {
            compression: target,
            source_date_epoch: epoch,
        },
    )
    .map_err(|source| Error::Diff {
        index,
        source: Box::new(source),
    })?;
    Ok((blob.digest, blob.size, blob.diff_id))
}

/// The layers of a re-written image, and whether any differs from the
/// stored image's.
struct RewrittenLayers {
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
    changed: bool,
    /// the manifest's `--annotation`s
    annotations: Option<std::collections::HashMap<String, String>>,
}

/// Store the image with `new` layers and the media types `spec` asks for;
/// the stored image itself when nothing changes. `diff_ids` are the stored
/// image's.
fn store_rewritten(
    store: &ImageStore<'_>,
    image: &Image,
    spec: &OutputSpec,
    new: RewrittenLayers,
    diff_ids: &[Digest],
) -> Result<Image> {
    let RewrittenLayers {
        layers: new_layers,
        diff_ids: new_diff_ids,
        mut changed,
        annotations,
    } = new;
    let (manifest_type, config_type) = if spec.oci_mediatypes {
        (MediaType::ImageManifest, MediaType::ImageConfig)
    } else {
        (
            MediaType::Other(DOCKER_MANIFEST.into()),
            MediaType::Other(DOCKER_CONFIG.into()),
        )
    };
    changed |= *image.manifest_descriptor.media_type() != manifest_type
        || *image.manifest.config().media_type() != config_type;
    if !changed {
        return Ok(image.clone());
    }
    let config_bytes = if new_diff_ids == diff_ids {
        image.config_bytes.clone()
    } else {
        // edit the JSON, not the typed config: docker-only fields survive
        let mut v: serde_json::Value = serde_json::from_slice(&image.config_bytes)
            .expect("a stored config parsed once already");
        v["rootfs"]["diff_ids"] = new_diff_ids.iter().map(|d| d.to_string()).collect();
        serde_json::to_vec(&v).expect("json serialises")
    };
    let mut img = store
        .write_image_raw(
            config_bytes,
            config_type,
            new_layers,
            manifest_type,
            annotations,
        )
        .map_err(|source| Error::Store {
            context: "storing the re-written image".into(),
            source: Box::new(source),
        })?;
    img.name.clone_from(&image.name);
    Ok(img)
}

/// The layers of `jobs` (index, blob, compression) in their compression,
/// as stored variants; up to one per core at a time.
fn recompress_all(
    content: &content::ContentStore,
    jobs: &[(usize, Digest, Compression)],
    force: bool,
) -> Result<BTreeMap<usize, (Digest, u64)>> {
    let made = crate::engine::parallel::parallel_map(jobs, 1, |(_, digest, to)| {
        kiln_snapshotter::variants::get_or_make(content, digest, *to, force)
    });
    let mut out = BTreeMap::new();
    for ((index, _, _), variant) in jobs.iter().zip(made) {
        out.insert(*index, variant?);
    }
    Ok(out)
}

/// A file written beside its destination and renamed into place on
/// [`Staged::finish`]; removed if dropped before.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<io::BufWriter<fs::File>>,
}

impl Staged {
    fn create(dest: &Path) -> Result<Self> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(write_err(dir))?;
        let tmp = dir.join(format!(".{name}.kiln-{}.tmp", std::process::id()));
        let file = fs::File::create(&tmp).map_err(write_err(&tmp))?;
        Ok(Staged {
            tmp,
            dest: dest.to_path_buf(),
            file: Some(io::BufWriter::with_capacity(1 << 20, file)),
        })
    }

    fn writer(&mut self) -> &mut io::BufWriter<fs::File> {
        self.file.as_mut().expect("writer before finish")
    }

    fn finish(mut self) -> Result<()> {
        let f = self.file.take().expect("finish once");
        let f = f.into_inner().map_err(|e| Error::Write {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(write_err(&self.tmp))?;
        fs::rename(&self.tmp, &self.dest).map_err(write_err(&self.dest))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The platform of a single image, `os/arch[/variant]`, from its config.
fn platform_of(image: &Image) -> Option<String> {
    let c: serde_json::Value = serde_json::from_slice(&image.config_bytes).ok()?;
    let mut p = format!("{}/{}", c["os"].as_str()?, c["architecture"].as_str()?);
    if let Some(v) = c["variant"].as_str() {
        p.push('/');
        p.push_str(v);
    }
    Some(p)
}

/// The `--annotation`s of the descriptor an OCI layout's index.json holds:
/// the index's for a multi-platform export, else the manifest's.
fn descriptor_annotations(
    img: &Image,
    multi: bool,
    spec: &OutputSpec,
) -> Option<std::collections::HashMap<String, String>> {
    if multi {
        spec.annotations_at(AnnotationLevel::IndexDescriptor, None)
    } else {
        spec.annotations_at(
            AnnotationLevel::ManifestDescriptor,
            platform_of(img).as_deref(),
        )
    }
}

/// The index.json entries for `img` under its names.
fn index_entries(
    target: &Descriptor,
    names: &[String],
    extra: Option<std::collections::HashMap<String, String>>,
) -> Vec<Descriptor> {
    let plain = {
        let mut d = target.clone();
        d.set_annotations(extra.clone());
        d
    };
    if names.is_empty() {
        return vec![plain];
    }
    names
        .iter()
        .map(|n| {
            let mut d = plain.clone();
            let tag = Reference::parse(n)
                .ok()
                .and_then(|r| r.tag)
                .unwrap_or_else(|| "latest".into());
            let mut ann = extra.clone().unwrap_or_default();
            ann.insert("io.containerd.image.name".to_string(), n.clone());
            ann.insert(REF_NAME.to_string(), tag);
            d.set_annotations(Some(ann));
            d
        })
        .collect()
}

fn index_json(entries: Vec<Descriptor>) -> Vec<u8> {
    let index = oci_spec::image::ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(entries)
        .build()
        .expect("index has its fields");
    store::canonical_json(&index)
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

fn write_archive(
    store: &ImageStore<'_>,
    img: &Image,
    multi: Option<(&Descriptor, &[Descriptor])>,
    spec: &OutputSpec,
    opts: &ExportOptions,
    stdout: &mut dyn Write,
) -> Result<()> {
    let kind = spec.kind.as_str();
    // a multi-platform export names its index and carries every blob
    let target = multi.map_or(&img.manifest_descriptor, |(t, _)| t);
    let mut meta: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".into(), OCI_LAYOUT.to_vec()),
        (
            "index.json".into(),
            index_json(index_entries(
                target,
                &spec.names,
                descriptor_annotations(img, multi.is_some(), spec),
            )),
        ),
    ];
    if spec.kind == OutputType::Docker {
        let blob = |d: &Digest| format!("blobs/sha256/{}", d.digest());
        let tags: Vec<String> = spec
            .names
            .iter()
            .filter_map(|n| Reference::parse(n).ok())
            .map(|r| r.familiar())
            .collect();
        let entry = serde_json::json!([{
            "Config": blob(img.id()),
            "RepoTags": if tags.is_empty() { serde_json::Value::Null } else { tags.into() },
            "Layers": img.layers().iter().map(|l| blob(l.digest())).collect::<Vec<_>>(),
        }]);
        meta.push((
            "manifest.json".into(),
            serde_json::to_vec(&entry).expect("json serialises"),
        ));
    }
    let blobs: Vec<Descriptor> = match multi {
        Some((_, all)) => all.to_vec(),
        None => {
            let mut b = img.layers().to_vec();
            b.push(img.manifest.config().clone());
            b.push(img.manifest_descriptor.clone());
            b
        }
    };
    let mtime = opts.source_date_epoch.unwrap_or(0).max(0);
    match spec
        .dest
        .as_ref()
        .expect("parser requires dest for oci and docker")
    {
        Dest::Stdout => {
            write_layout_tar(store, stdout, &blobs, &meta, mtime, Path::new("-"))?;
            stdout.flush().map_err(write_err(Path::new("-")))
        }
        Dest::Path(p) => {
            let as_dir = spec.kind == OutputType::Oci
                && spec.tar.map_or_else(
                    || p.as_os_str().to_string_lossy().ends_with('/') || p.is_dir(),
                    |t| !t,
                );
            if as_dir {
                let extra = descriptor_annotations(img, multi.is_some(), spec);
                return write_layout_dir(store, p, &blobs, target, &spec.names, extra);
            }
            if p.is_dir() || p.as_os_str().to_string_lossy().ends_with('/') {
                return Err(Error::DestIsDir(p.clone(), kind));
            }
            let mut staged = Staged::create(p)?;
            write_layout_tar(store, staged.writer(), &blobs, &meta, mtime, p)?;
            staged.finish()
        }
    }
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(u64::try_from(mtime).unwrap_or(0));
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn write_layout_tar(
    store: &ImageStore<'_>,
    out: &mut dyn Write,
    blobs: &[Descriptor],
    meta: &[(String, Vec<u8>)],
    mtime: i64,
    path: &Path,
) -> Result<()> {
    let content = store.snapshotter().content();
    let mut b = tar::Builder::new(out);
    let werr = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let (first, rest) = meta.split_at(1);
    for (name, bytes) in first {
        let mut h = tar_header(tar::EntryType::Regular, 0o644, bytes.len() as u64, mtime);
        b.append_data(&mut h, name, &bytes[..]).map_err(werr)?;
    }
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar_header(tar::EntryType::Directory, 0o755, 0, mtime);
        b.append_data(&mut h, dir, io::empty()).map_err(werr)?;
    }
    let mut seen = std::collections::HashSet::new();
    for d in blobs {
        if !seen.insert(d.digest().to_string()) {
            continue;
        }
        let mut h = tar_header(tar::EntryType::Regular, 0o644, d.size(), mtime);
        let mut r = content.open_blob(d.digest())?;
        let name = format!("blobs/sha256/{}", d.digest().digest());
        if let Err(e) = b.append_data(&mut h, &name, &mut r) {
            return Err(match r.map_read_error(e) {
                content::Error::Io { source, .. } => werr(source),
                other => other.into(),
            });
        }
    }
    for (name, bytes) in rest {
        let mut h = tar_header(tar::EntryType::Regular, 0o644, bytes.len() as u64, mtime);
        b.append_data(&mut h, name, &bytes[..]).map_err(werr)?;
    }
    b.finish().map_err(werr)?;
    Ok(())
}

fn write_layout_dir(
    store: &ImageStore<'_>,
    dir: &Path,
    blobs: &[Descriptor],
    target: &Descriptor,
    names: &[String],
    extra: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let content = store.snapshotter().content();
    if dir.exists() && !dir.is_dir() {
        return Err(Error::DestNotDir(dir.to_path_buf()));
    }
    let blob_dir = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir).map_err(write_err(&blob_dir))?;
    for d in blobs {
        let path = blob_dir.join(d.digest().digest());
        if fs::metadata(&path).is_ok_and(|m| m.len() == d.size()) {
            continue;
        }
        let mut staged = Staged::create(&path)?;
        let mut r = content.open_blob(d.digest())?;
        io::copy(&mut r, staged.writer()).map_err(|e| match r.map_read_error(e) {
            content::Error::Io { source, .. } => Error::Write {
                path: path.clone(),
                source,
            },
            other => other.into(),
        })?;
        staged.finish()?;
    }
    let layout = dir.join("oci-layout");
    if !layout.exists() {
        let mut s = Staged::create(&layout)?;
        s.writer()
            .write_all(OCI_LAYOUT)
            .map_err(write_err(&layout))?;
        s.finish()?;
    }
    // merge: keep other images of an existing layout, replace ours by name
    let index_path = dir.join("index.json");
    let ours = index_entries(target, names, extra);
    let mut entries: Vec<Descriptor> = match fs::read(&index_path) {
        Ok(bytes) => oci_spec::image::ImageIndex::from_reader(&bytes[..])
            .map(|i| i.manifests().clone())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let key = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| {
                a.get("io.containerd.image.name")
                    .or_else(|| a.get(REF_NAME))
            })
            .cloned()
    };
    entries.retain(|e| {
        !ours.iter().any(|o| match (key(o), key(e)) {
            (Some(a), Some(b)) => a == b,
            (None, None) => o.digest() == e.digest(),
            _ => false,
        })
    });
    entries.extend(ours);
    let mut s = Staged::create(&index_path)?;
    s.writer()
        .write_all(&index_json(entries))
        .map_err(write_err(&index_path))?;
    s.finish()
}

/// Materialise the image's merged root filesystem into `target` (which
/// must exist).
fn materialise(store: &ImageStore<'_>, image: &Image, target: &Path) -> Result<()> {
    let snap = store.snapshotter();
    let (chain, _) = store.unpack(image).map_err(|source| Error::Store {
        context: "unpacking the image".into(),
        source: Box::new(source),
    })?;
    let Some(chain) = chain else { return Ok(()) };
    let lowers: Vec<PathBuf> = snap.layers().chain_dirs(&chain)?;
    let work = snap.layers().tmp_dir().join(snap.layers().unique("export"));
    fs::create_dir_all(&work).map_err(write_err(&work))?;
    let spec = ViewSpec {
        lowers,
        upper: work.clone(),
        work: work.clone(),
        target: target.to_path_buf(),
    };
    let result = copy::mount(&spec).map(drop);
    let _ = fs::remove_dir_all(&work);
    Ok(result?)
}

fn write_rootfs(
    store: &ImageStore<'_>,
    image: &Image,
    spec: &OutputSpec,
    opts: &ExportOptions,
    stdout: &mut dyn Write,
) -> Result<()> {
    write_rootfs_dirs(store, &[(None, image)], spec, opts, stdout)
}

/// [`write_rootfs`] of one image, or of several each in a top-level
/// directory of its own (`linux_arm64/`), as BuildKit does.
fn write_rootfs_dirs(
    store: &ImageStore<'_>,
    images: &[(Option<String>, &Image)],
    spec: &OutputSpec,
    opts: &ExportOptions,
    stdout: &mut dyn Write,
) -> Result<()> {
    let into = |top: &Path| -> Result<()> {
        for (sub, image) in images {
            let dir = match sub {
                Some(s) => top.join(s),
                None => top.to_path_buf(),
            };
            fs::create_dir_all(&dir).map_err(write_err(&dir))?;
            materialise(store, image, &dir)?;
        }
        Ok(())
    };
    let dest = spec
        .dest
        .as_ref()
        .expect("parser requires dest for local and tar");
    if spec.kind == OutputType::Local {
        let Dest::Path(dir) = dest else {
            unreachable!("the parser refuses dest=- for type=local")
        };
        if dir.exists() && !dir.is_dir() {
            return Err(Error::DestNotDir(dir.clone()));
        }
        fs::create_dir_all(dir).map_err(write_err(dir))?;
        // The layers' bytes become files here: on a thread Landlock keeps
        // to the state directory and this destination.
        let rules = store.snapshotter().confinement().write(dir);
        kiln_snapshotter::confine::run_confined(
            kiln_snapshotter::confine::Component::Export,
            &rules,
            || into(dir),
        )
        .map_err(|e| Error::Confine(Box::new(e)))??;
        own_and_clamp(dir, opts.source_date_epoch, spec.keep_setid)?;
        return Ok(());
    }
    let snap = store.snapshotter();
    let tmp = snap.layers().tmp_dir().join(snap.layers().unique("rootfs"));
    fs::create_dir_all(&tmp).map_err(write_err(&tmp))?;
    let result = (|| {
        into(&tmp)?;
        let derr = |source| Error::Diff {
            index: 0,
            source: Box::new(source),
        };
        match dest {
            Dest::Stdout => {
                diff::write_tar(&tmp, &mut *stdout, opts.source_date_epoch).map_err(derr)?;
                stdout.flush().map_err(write_err(Path::new("-")))
            }
            Dest::Path(p) => {
                if p.is_dir() || p.as_os_str().to_string_lossy().ends_with('/') {
                    return Err(Error::DestIsDir(p.clone(), "tar"));
                }
                let mut staged = Staged::create(p)?;
                diff::write_tar(&tmp, staged.writer(), opts.source_date_epoch).map_err(derr)?;
                staged.finish()
            }
        }
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// Give everything under `dir` to uid/gid 0 (the caller on the host) and
/// clamp mtimes to `epoch`. Setuid and setgid bits of non-directories are
/// cleared unless `keep_setid`: a hostile Dockerfile must not leave a
/// setuid program of the caller's in the caller's workspace (chown clears
/// them too, so with `keep_setid` modes are put back afterwards).
fn own_and_clamp(dir: &Path, epoch: Option<i64>, keep_setid: bool) -> Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let mut dirs: BTreeMap<PathBuf, ()> = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(write_err(&d))? {
            let e = e.map_err(write_err(&d))?;
            let path = e.path();
            let meta = fs::symlink_metadata(&path).map_err(write_err(&path))?;
            if meta.uid() != 0 || meta.gid() != 0 {
                std::os::unix::fs::lchown(&path, Some(0), Some(0)).map_err(write_err(&path))?;
            }
            let setid = !meta.file_type().is_symlink() && meta.mode() & 0o6000 != 0;
            if setid {
                let mode = if keep_setid || meta.is_dir() {
                    meta.mode() & 0o7777
                } else {
                    meta.mode() & 0o1777
                };
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(write_err(&path))?;
            }
            if meta.is_dir() {
                stack.push(path.clone());
                dirs.insert(path.clone(), ());
            }
            if let Some(epoch) = epoch {
                if meta.mtime() > epoch && !meta.is_dir() {
                    let t = TimeSpec::new(epoch, 0);
                    utimensat(None, &path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(
                        |e| Error::Write {
                            path: path.clone(),
                            source: e.into(),
                        },
                    )?;
                }
            }
        }
    }
    // directories last, deepest first: writing inside a directory moves
    // its mtime
    if let Some(epoch) = epoch {
        for d in dirs.keys().rev() {
            let meta = fs::symlink_metadata(d).map_err(write_err(d))?;
            if meta.mtime() > epoch {
                let t = TimeSpec::new(epoch, 0);
                utimensat(None, d, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| {
                    Error::Write {
                        path: d.clone(),
                        source: e.into(),
                    }
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod confinement_tests {
    use super::*;
    use kiln_snapshotter::confine::{run_confined, status, Component, Status};

    /// The local export's code path, confined to the rules of one
    /// destination, cannot write another (as a bug or a hostile layer
    /// might steer it), and writes its own.
    #[test]
    fn a_local_export_under_one_destinations_rules_cannot_write_another() {
        if !matches!(status(), Status::Enforced { .. } | Status::Partial { .. }) {
            kiln_vm_tests::missing_prerequisite(&format!("Landlock: {}", status()));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("etc")).unwrap();
        fs::write(src.join("etc/hello"), "hi\n").unwrap();
        let snap = kiln_snapshotter::Snapshotter::open(
            &dir.path().join("state"),
            kiln_snapshotter::BackendKind::Copy,
        )
        .unwrap();
        let store = ImageStore::new(&snap);
        let opts = super::super::import::ImportOptions {
            platform: store::Platform::host(),
            source_label: "src".into(),
            created: Some(0),
        };
        let image =
            super::super::import::import(&store, super::super::import::Source::Dir(&src), &opts)
                .unwrap();
        let (allowed, other) = (dir.path().join("allowed"), dir.path().join("other"));
        fs::create_dir_all(&allowed).unwrap();
        fs::create_dir_all(&other).unwrap();
        let rules = snap.confinement().write(&allowed);
        let stray = run_confined(Component::Export, &rules, || {
            materialise(&store, &image, &other).map_err(|e| crate::error_chain(&e))
        })
        .expect("Landlock confines here");
        let err = stray.expect_err("written outside the destination");
        assert!(err.contains("Permission denied"), "{err}");
        assert!(!other.join("etc/hello").exists());
        run_confined(Component::Export, &rules, || {
            materialise(&store, &image, &allowed)
        })
        .expect("Landlock confines here")
        .unwrap();
        assert_eq!(
            fs::read_to_string(allowed.join("etc/hello")).unwrap(),
            "hi\n"
        );
    }
}

#[cfg(test)]
mod media_type_tests {
    use super::*;

    #[test]
    fn layer_compressions_come_from_media_types_and_foreign_layers_have_none() {
        let c = |t: &str| layer_compression(&MediaType::from(t));
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            c("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip { level: 6 })
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd { level: 3 })
        );
        // passed on as they are, never re-typed as distributable gzip
        assert_eq!(
            c("application/vnd.oci.image.layer.nondistributable.v1.tar"),
            None
        );
        assert_eq!(
            c("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
            None
        );
        assert_eq!(c("application/vnd.oci.image.config.v1+json"), None);
    }
}
