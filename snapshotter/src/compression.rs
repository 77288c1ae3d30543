//! Layer compression: which algorithms a layer may use, their OCI media
//! types, detection by magic bytes, and streaming encoders/decoders.
//!
//! gzip uses `flate2` on its `zlib-rs` backend: streaming and
//! single-threaded where a layer is written as it is made, and in
//! independent 4 MiB members on every core ([`gzip_parallel`], as pigz
//! does) where a stored layer is compressed for an output; zstd uses
//! libzstd's own worker threads (one per core). Neither output depends on
//! the number of threads.
//!
//! This module never touches the file system.

use std::io::{self, BufRead, Read, Write};

use oci_spec::image::MediaType;

/// Errors of compression handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the {algorithm} encoder")]
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

    /// The compression a layer media type (OCI or docker) says, with the
    /// default level; None for what is not a layer, or a nondistributable
    /// (foreign) layer, which is passed on as it is, never re-typed.
    pub fn of_layer_media_type(t: &str) -> Option<Compression> {
        if !(t.contains(".layer.") || t.contains(".rootfs.diff."))
            || t.contains("nondistributable")
            || t.contains("foreign")
        {
            return None;
        }
        if t.ends_with("gzip") {
            Some(Compression::default())
        } else if t.ends_with("zstd") {
            Some(Compression::Zstd { level: 3 })
        } else if t.ends_with(".tar") {
            Some(Compression::None)
        } else {
            None
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

/// Bytes of input per gzip member in [`gzip_parallel`]: large enough that
/// the members' headers and lost back-references cost well under 0.1% of
/// the output, small enough that every core gets work on a 20 MB layer.
pub const GZIP_BLOCK: usize = 4 << 20;

/// gzip `r` into `w` as pigz does: the input cut into [`GZIP_BLOCK`]s,
/// each compressed as an independent gzip member on one of `threads`
/// threads, the members written in order (a valid multi-member gzip
/// stream, which every gzip reader decodes as one). The output depends
/// only on the input and `level`, never on `threads`. Returns `w`.
pub fn gzip_parallel<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    level: u32,
    threads: usize,
) -> io::Result<W> {
    let threads = threads.max(1);
    let level = flate2::Compression::new(level.min(9));
    let mut empty = true;
    loop {
        // a batch: one block per thread
        let mut blocks = Vec::with_capacity(threads);
        for _ in 0..threads {
            let mut block = Vec::with_capacity(GZIP_BLOCK);
            (&mut r).take(GZIP_BLOCK as u64).read_to_end(&mut block)?;
            if block.is_empty() {
                break;
            }
            blocks.push(block);
        }
        if blocks.is_empty() {
            break;
        }
        let last = blocks.last().is_some_and(|b| b.len() < GZIP_BLOCK);
        let members: Vec<io::Result<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = blocks
                .iter()
                .map(|block| {
                    s.spawn(move || {
                        let mut enc = flate2::write::GzEncoder::new(
                            Vec::with_capacity(block.len() / 2),
                            level,
                        );
                        enc.write_all(block)?;
                        enc.finish()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        for m in members {
            w.write_all(&m?)?;
            empty = false;
        }
        if last {
            break;
        }
    }
    if empty {
        // an empty input is one empty member, as gzip writes it
        w = flate2::write::GzEncoder::new(w, level).finish()?;
    }
    Ok(w)
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
        Detected::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Detected::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
    })
}

/// [`decoder`] of a stream another thread may read.
pub fn decoder_send<'a, R: BufRead + Send + 'a>(
    r: R,
    kind: Detected,
) -> io::Result<Box<dyn Read + Send + 'a>> {
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
    fn parallel_gzip_decodes_as_one_stream_and_ignores_the_thread_count() {
        for len in [0, 10, GZIP_BLOCK, GZIP_BLOCK * 2 + 12345] {
            let data: Vec<u8> = (0..len)
                .map(|i| u8::try_from(i * 7 % 251).unwrap())
                .collect();
            let one = gzip_parallel(&data[..], Vec::new(), 6, 1).unwrap();
            let three = gzip_parallel(&data[..], Vec::new(), 6, 3).unwrap();
            assert_eq!(one, three, "{len}");
            let mut r = io::BufReader::new(&three[..]);
            assert_eq!(detect(&mut r).unwrap(), Detected::Gzip);
            let mut back = Vec::new();
            decoder(r, Detected::Gzip)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "{len}");
        }
    }

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
