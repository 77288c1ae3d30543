//! `kiln import`: a single-layer image from a root filesystem, given as a
//! directory or a tar (plain, gzip or zstd), as `docker import` makes one.
//!
//! A directory is written as a deterministic layer tar (gzip) by the
//! snapshotter's diff; a tar is stored as it is, with the media type of its
//! compression. The config records the platform (default the host's), the
//! layer's diffID and one history entry; `created` is SOURCE_DATE_EPOCH when
//! set, else now. The layer is unpacked before the name is set, so a tar the
//! snapshotter refuses (absolute paths, `..`, links out of the layer) leaves
//! no image behind.
//!
//! This module never modifies the source directory or file.

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use kiln_snapshotter::compression::{self, Compression, Detected};
use kiln_snapshotter::content;
use kiln_snapshotter::diff::{self, DiffOptions, HashingWriter};
use oci_spec::image::{
    Arch, Descriptor, Digest, HistoryBuilder, ImageConfigurationBuilder, MediaType, Os,
    RootFsBuilder,
};

use super::store::{self, Image, ImageStore, Platform};
use super::time;

/// Errors of `kiln import`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what}")]
    Read { what: String, source: io::Error },
    #[error("{0} is {1} compressed; kiln imports plain, gzip or zstd tars: decompress it first")]
    Compression(String, &'static str),
    #[error("cannot write the layer for {what}")]
    Diff {
        what: String,
        source: Box<diff::Error>,
    },
    #[error("{context}")]
    Store {
        context: String,
        source: Box<store::Error>,
    },
    #[error(transparent)]
    Content(#[from] content::Error),
}

/// Result type of `kiln import`.
pub type Result<T> = std::result::Result<T, Error>;

/// Where the root filesystem comes from.
pub enum Source<'a> {
    /// a directory, read as it is (owners as kiln's namespace sees them)
    Dir(&'a Path),
    /// a tar stream, plain or compressed
    Tar(Box<dyn Read + 'a>),
}

/// How to describe the imported image.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub platform: Platform,
    /// shown in the history entry (`Imported from FILE`)
    pub source_label: String,
    /// config and history `created`, seconds since the epoch; `None` reads
    /// SOURCE_DATE_EPOCH, else the clock
    pub created: Option<i64>,
}

/// Import a root filesystem as a one-layer image (not yet named: pass
/// `image.target` to [`ImageStore::tag`]).
pub fn import(store: &ImageStore<'_>, source: Source<'_>, opts: &ImportOptions) -> Result<Image> {
    let snap = store.snapshotter();
    let store_err = |context: &str| {
        let context = context.to_string();
        move |source| Error::Store {
            context,
            source: Box::new(source),
        }
    };
    let _no_gc = snap
        .layers()
        .gc_guard(false)
        .map_err(|e| store_err("cannot take the store's GC lock")(e.into()))?;
    let (layer, diff_id) = match source {
        Source::Dir(dir) => {
            let blob = diff::write_layer(
                dir,
                snap.content(),
                DiffOptions {
                    compression: Compression::default(),
                    source_date_epoch: None,
                },
            )
            .map_err(|source| Error::Diff {
                what: dir.display().to_string(),
                source: Box::new(source),
            })?;
            (
                Descriptor::new(blob.media_type, blob.size, blob.digest),
                blob.diff_id,
            )
        }
        Source::Tar(reader) => store_tar(store, reader, &opts.source_label)?,
    };
    let created = time::format_rfc3339(
        opts.created
            .or_else(time::source_date_epoch)
            .unwrap_or_else(time::now),
    );
    let history = HistoryBuilder::default()
        .created(created.clone())
        .created_by(format!("kiln import {}", opts.source_label))
        .comment(format!("Imported from {}", opts.source_label))
        .build()
        .expect("history has no required fields");
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(vec![diff_id.to_string()])
        .build()
        .expect("rootfs has its fields");
    let mut builder = ImageConfigurationBuilder::default()
        .created(created)
        .architecture(Arch::from(opts.platform.architecture.as_str()))
        .os(Os::from(opts.platform.os.as_str()))
        .rootfs(rootfs)
        .history(vec![history]);
    if let Some(v) = &opts.platform.variant {
        builder = builder.variant(v.clone());
    }
    let config = builder.build().expect("config has every required field");
    let image = store
        .write_image(&config, vec![layer])
        .map_err(store_err("cannot store the imported image"))?;
    store
        .unpack(&image)
        .map_err(store_err(&format!("cannot unpack {}", opts.source_label)))?;
    Ok(image)
}

/// Store a tar stream as a layer blob; returns its descriptor and diffID.
fn store_tar(
    store: &ImageStore<'_>,
    reader: Box<dyn Read + '_>,
    label: &str,
) -> Result<(Descriptor, Digest)> {
    let read_err = |source| Error::Read {
        what: label.to_string(),
        source,
    };
    let mut buf = BufReader::with_capacity(1 << 20, reader);
    let head = buf.fill_buf().map_err(read_err)?;
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(Error::Compression(label.into(), "xz"));
    }
    if head.starts_with(b"BZh") {
        return Err(Error::Compression(label.into(), "bzip2"));
    }
    let kind = compression::detect(&mut buf).map_err(|e| read_err(io::Error::other(e)))?;
    let content = store.snapshotter().content();
    let mut w = content.writer(None)?;
    io::copy(&mut buf, &mut w).map_err(read_err)?;
    let (digest, size) = w.commit()?;
    store
        .snapshotter()
        .lease()
        .add_blob(&digest)
        .map_err(|e| Error::Store {
            context: "cannot lease the imported layer".into(),
            source: Box::new(e.into()),
        })?;
    let (media, diff_id) = match kind {
        Detected::Plain => (MediaType::ImageLayer, digest.clone()),
        Detected::Gzip | Detected::Zstd => {
            let r = BufReader::new(content.open_blob(&digest)?);
            let mut dec = compression::decoder(r, kind).map_err(read_err)?;
            let mut h = HashingWriter::new(io::sink());
            io::copy(&mut dec, &mut h).map_err(read_err)?;
            let media = if kind == Detected::Gzip {
                MediaType::ImageLayerGzip
            } else {
                MediaType::ImageLayerZstd
            };
            (media, h.finish().0)
        }
    };
    Ok((Descriptor::new(media, size, digest), diff_id))
}
