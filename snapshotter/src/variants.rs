//! Compressed variants of stored layer blobs, made when an output needs
//! them and kept for the next one (BuildKit's model).
//!
//! A build commits its layers as plain tar blobs (the blob digest is the
//! diffID), so no step waits for a compressor. An export, push or other
//! output that wants gzip or zstd asks [`get_or_make`] for the blob in that
//! compression and level: the first ask decodes the source, encodes it and
//! stores the result like any blob (verified, renamed into place); a record
//! `.kiln/variants/<compression>/<source hex>` then names it, so later asks
//! cost nothing. Encoders are deterministic for a given compression and
//! level, so two processes making the same variant store the same blob.
//!
//! Records are hints, never trusted: one whose blob is gone is ignored and
//! made again, and garbage collection keeps a variant exactly as long as
//! its source is kept ([`all`]) and drops records of gone blobs
//! ([`prune`]). This module never changes a source blob.

use std::fs;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use crate::compression::{self, Compression, Detected};
use crate::content::{self, ContentStore};

/// Errors of making a variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Content(#[from] content::Error),
    #[error(transparent)]
    Compression(#[from] compression::Error),
    #[error("cannot recompress layer blob {digest}")]
    Recompress { digest: Digest, source: io::Error },
    #[error("variant record {path}")]
    Record { path: PathBuf, source: io::Error },
}

/// Result type of variants.
pub type Result<T> = std::result::Result<T, Error>;

/// The record directory's name for `c`: the compression and its level.
fn tag(c: Compression) -> String {
    match c {
        Compression::None => "none".into(),
        Compression::Gzip { level } => format!("gzip-{level}"),
        Compression::Zstd { level } => format!("zstd-{level}"),
    }
}

fn variants_dir(content: &ContentStore) -> PathBuf {
    content.root().join(".kiln").join("variants")
}

fn record_path(content: &ContentStore, src: &Digest, to: Compression) -> PathBuf {
    variants_dir(content).join(tag(to)).join(src.digest())
}

/// A record's variant, if its blob is still stored.
fn lookup(content: &ContentStore, path: &Path) -> Option<(Digest, u64)> {
    let text = fs::read_to_string(path).ok()?;
    let (digest, size) = text.trim().split_once(' ')?;
    let digest: Digest = digest.parse().ok()?;
    let size = size.parse().ok()?;
    content.contains(&digest).then_some((digest, size))
}

/// The blob `src` in compression `to`: the stored variant, or one made now
/// and recorded. A source already in `to`'s algorithm is returned as it is
/// unless `force`.
pub fn get_or_make(
    content: &ContentStore,
    src: &Digest,
    to: Compression,
    force: bool,
) -> Result<(Digest, u64)> {
    let path = record_path(content, src, to);
    if let Some(found) = lookup(content, &path) {
        return Ok(found);
    }
    let layer_err = |source| Error::Recompress {
        digest: src.clone(),
        source,
    };
    let mut r = BufReader::with_capacity(1 << 20, content.open_blob(src)?);
    let kind = compression::detect(&mut r)?;
    let same = matches!(
        (kind, to),
        (Detected::Plain, Compression::None)
            | (Detected::Gzip, Compression::Gzip { .. })
            | (Detected::Zstd, Compression::Zstd { .. })
    );
    if same && !force {
        return Ok((src.clone(), content.size(src)?));
    }
    let mut dec = compression::decoder(r, kind).map_err(layer_err)?;
    let w = content.writer(None)?;
    let w = match to {
        // gzip on every core, in independent members
        Compression::Gzip { level } => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            compression::gzip_parallel(dec, w, level, threads).map_err(layer_err)?
        }
        _ => {
            let mut enc = to.encoder(w)?;
            io::copy(&mut dec, &mut enc).map_err(layer_err)?;
            enc.finish().map_err(layer_err)?
        }
    };
    let (digest, size) = w.commit()?;
    write_record(&path, &digest, size)?;
    Ok((digest, size))
}

/// Record the stored blob `variant` (`size` bytes) as `src` in compression
/// `to`: a copy that arrived compressed (a cache import) saves making it.
pub fn record(
    content: &ContentStore,
    src: &Digest,
    to: Compression,
    variant: &Digest,
    size: u64,
) -> Result<()> {
    write_record(&record_path(content, src, to), variant, size)
}

fn write_record(path: &Path, digest: &Digest, size: u64) -> Result<()> {
    let err = |source| Error::Record {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().expect("a record has a directory");
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(err)?;
    writeln!(f, "{digest} {size}").map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)
}

/// Every record as (source, variant): what garbage collection keeps
/// together.
pub fn all(content: &ContentStore) -> Result<Vec<(Digest, Digest)>> {
    let mut out = Vec::new();
    let root = variants_dir(content);
    let Ok(tags) = fs::read_dir(&root) else {
        return Ok(out);
    };
    for t in tags.flatten() {
        let Ok(records) = fs::read_dir(t.path()) else {
            continue;
        };
        for r in records.flatten() {
            let name = r.file_name().to_string_lossy().into_owned();
            let Ok(src) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            let variant = fs::read_to_string(r.path())
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<Digest>().ok());
            if let Some(v) = variant {
                out.push((src, v));
            }
        }
    }
    Ok(out)
}

/// Remove records whose source or variant blob is gone (after a garbage
/// collection), and temp files of dead writers.
pub fn prune(content: &ContentStore) -> Result<()> {
    let root = variants_dir(content);
    let Ok(tags) = fs::read_dir(&root) else {
        return Ok(());
    };
    for t in tags.flatten() {
        let Ok(records) = fs::read_dir(t.path()) else {
            continue;
        };
        for r in records.flatten() {
            let name = r.file_name().to_string_lossy().into_owned();
            let src = format!("sha256:{name}").parse::<Digest>().ok();
            let keep =
                src.is_some_and(|s| content.contains(&s)) && lookup(content, &r.path()).is_some();
            if !keep {
                let path = r.path();
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(Error::Record { path, source }),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_blob(content: &ContentStore, bytes: &[u8]) -> Digest {
        let mut w = content.writer(None).unwrap();
        w.write_all(bytes).unwrap();
        w.commit().unwrap().0
    }

    #[test]
    fn a_variant_is_made_once_kept_with_its_source_and_pruned_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 97).to_le_bytes())
            .collect();
        let src = plain_blob(&content, &data);
        let gz = Compression::Gzip { level: 6 };
        let (v, size) = get_or_make(&content, &src, gz, false).unwrap();
        assert_ne!(v, src);
        // it decodes to the source
        let mut r = BufReader::new(content.open_blob(&v).unwrap());
        assert_eq!(compression::detect(&mut r).unwrap(), Detected::Gzip);
        let mut back = Vec::new();
        io::Read::read_to_end(
            &mut compression::decoder(r, Detected::Gzip).unwrap(),
            &mut back,
        )
        .unwrap();
        assert_eq!(back, data);
        // the second ask reads the record: the blob is not written again
        let mtime = |d: &Digest| {
            fs::metadata(content.blob_path(d).unwrap())
                .unwrap()
                .modified()
                .unwrap()
        };
        let before = mtime(&v);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            get_or_make(&content, &src, gz, false).unwrap(),
            (v.clone(), size)
        );
        assert_eq!(mtime(&v), before);
        // another level is another variant; the source's own algorithm is
        // the source unless forced
        let (v1, _) = get_or_make(&content, &src, Compression::Gzip { level: 1 }, false).unwrap();
        assert_ne!(v1, v);
        assert_eq!(get_or_make(&content, &v, gz, false).unwrap().0, v);
        assert_eq!(
            get_or_make(&content, &src, Compression::None, false)
                .unwrap()
                .0,
            src
        );
        // garbage collection sees the pairs; a record of a gone blob goes
        let pairs = all(&content).unwrap();
        assert!(
            pairs.contains(&(src.clone(), v.clone())) && pairs.contains(&(src.clone(), v1.clone()))
        );
        content.delete(&v1).unwrap();
        prune(&content).unwrap();
        assert_eq!(all(&content).unwrap(), vec![(src.clone(), v.clone())]);
        // a record whose blob is gone is made again, to the same digest
        content.delete(&v).unwrap();
        assert_eq!(get_or_make(&content, &src, gz, false).unwrap().0, v);
        content.delete(&src).unwrap();
        prune(&content).unwrap();
        assert!(all(&content).unwrap().is_empty());
    }
}
