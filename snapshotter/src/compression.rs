//! Layer compression: which algorithms a layer may use, their OCI media
//! types, detection by magic bytes, and streaming encoders/decoders.
//!
//! gzip uses `flate2` on its `zlib-rs` backend, single-threaded (a parallel
//! gzip such as `gzp` pulls in a thread pool and a second thiserror for at
//! most 2x on kiln's 2-core machines; gzip is the compatibility format, zstd
//! the fast one); zstd uses libzstd's own worker threads (one per core),
//! whose output does not depend on the number of workers.
//!
//! This module never touches the file system.

use std::io::{self, BufRead, Read, Write};

use oci_spec::image::MediaType;

/// Errors of compression handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the {algorithm} encoder: {source}")]
    Encoder {
        algorithm: &'static str,
        source: io::Error,
    },
    #[error("cannot read the layer's first bytes to detect its compression: {0}")]
    Detect(io::Error),
}

/// Result type of compression handling.
pub type Result<T> = std::result::Result<T, Error>;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// plain tar
    None,
    /// gzip at `level` 0..=9 (the default, 6, is what most registries hold)
    Gzip { level: u32 },
    /// zstd at `level` 1..=22
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> MediaType {
        match self {
            Compression::None => MediaType::ImageLayer,
            Compression::Gzip { .. } => MediaType::ImageLayerGzip,
            Compression::Zstd { .. } => MediaType::ImageLayerZstd,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip { .. } => "gzip",
            Compression::Zstd { .. } => "zstd",
        }
    }

    /// Wrap `w` in this compression's encoder.
    pub fn encoder<'a, W: Write + 'a>(self, w: W) -> Result<Encoder<'a, W>> {
        Ok(match self {
            Compression::None => Encoder::None(w),
            Compression::Gzip { level } => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(level.min(9)),
            )),
            Compression::Zstd { level } => {
                let mut enc = zstd::stream::write::Encoder::new(w, level).map_err(|source| {
                    Error::Encoder {
                        algorithm: self.name(),
                        source,
                    }
                })?;
                let workers = std::thread::available_parallelism()
                    .map(|n| u32::try_from(n.get()).unwrap_or(1))
                    .unwrap_or(1);
                if workers > 1 {
                    enc.multithread(workers).map_err(|source| Error::Encoder {
                        algorithm: self.name(),
                        source,
                    })?;
                }
                Encoder::Zstd(enc)
            }
        })
    }
}

/// A streaming layer encoder; call [`Encoder::finish`] to write the trailer.
pub enum Encoder<'a, W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'a, W>),
}

impl<W: Write> Write for Encoder<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(w) => w.write(buf),
            Encoder::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(w) => w.flush(),
            Encoder::Zstd(w) => w.flush(),
        }
    }
}

impl<W: Write> Encoder<'_, W> {
    /// Write the compression trailer and return the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(w) => w.finish(),
            Encoder::Zstd(w) => w.finish(),
        }
    }
}

/// What the magic bytes of a layer say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Plain,
    Gzip,
    Zstd,
}

/// Detect the compression of a buffered stream without consuming it.
pub fn detect<R: BufRead>(r: &mut R) -> Result<Detected> {
    let buf = r.fill_buf().map_err(Error::Detect)?;
    Ok(if buf.starts_with(&[0x1f, 0x8b]) {
        Detected::Gzip
    } else if buf.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Detected::Zstd
    } else {
        Detected::Plain
    })
}

/// A decoder for a detected stream.
pub fn decoder<'a, R: BufRead + 'a>(r: R, kind: Detected) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match kind {
        Detected::Plain => Box::new(r),
        // MultiGzDecoder: a gzip layer may be several concatenated members
        Detected::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Detected::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_each_compression_and_detect_it() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for (c, want) in [
            (Compression::None, Detected::Plain),
            (Compression::Gzip { level: 6 }, Detected::Gzip),
            (Compression::Zstd { level: 3 }, Detected::Zstd),
        ] {
            let mut enc = c.encoder(Vec::new()).unwrap();
            enc.write_all(&data).unwrap();
            let out = enc.finish().unwrap();
            let mut r = io::BufReader::new(&out[..]);
            let kind = detect(&mut r).unwrap();
            assert_eq!(kind, want);
            let mut back = Vec::new();
            decoder(r, kind).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "{c:?}");
        }
    }
}
