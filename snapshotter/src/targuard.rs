//! A pass-through reader that checks a tar stream as it goes by, before
//! the tar crate sees it: the tar crate reads the whole body of a GNU long
//! name or long link (`L`, `K`) and of a PAX header (`x`, `g`) into memory,
//! and a few KiB of gzip can declare gigabytes there. The guard follows the
//! stream block by block exactly as the tar crate walks it (header, body
//! rounded up to 512 bytes, a PAX `size` record overriding the next
//! entry's size, GNU sparse extension blocks) and refuses, before any of
//! its body is read:
//! - an extension header whose body is over [`MAX_EXTENSION_BYTES`];
//! - GNU sparse extension blocks over the same size for one entry;
//! - a stream over the byte or entry limit of [`Limits`].
//!
//! The refusal is an `io::Error` holding a [`Refused`]; [`refused`] finds
//! it in what the tar crate passes on.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest body of a GNU long name or link, or of a PAX header, read (as
/// Go's archive/tar caps PAX headers).
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// Limits on one tar stream, uncompressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// bytes of the tar stream
    pub max_bytes: u64,
    /// tar headers (entries, extension headers included)
    pub max_entries: u64,
}

/// Default limits of a layer: generous for any real image.
pub const DEFAULT_LIMITS: Limits = Limits {
    max_bytes: 64 << 30,
    max_entries: 10_000_000,
};

static MAX_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_LIMITS.max_bytes);
static MAX_ENTRIES: AtomicU64 = AtomicU64::new(DEFAULT_LIMITS.max_entries);

impl Limits {
    /// The limits every layer applied in this process gets.
    pub fn current() -> Limits {
        Limits {
            max_bytes: MAX_BYTES.load(Ordering::Relaxed),
            max_entries: MAX_ENTRIES.load(Ordering::Relaxed),
        }
    }

    /// Set the limits for every layer applied from now on in this process
    /// (the CLI's `--max-layer-size` and `--max-layer-entries`).
    pub fn set_current(limits: Limits) {
        MAX_BYTES.store(limits.max_bytes, Ordering::Relaxed);
        MAX_ENTRIES.store(limits.max_entries, Ordering::Relaxed);
    }

    /// No byte or entry limit (the header limit stays): for a stream whose
    /// parts are checked on their own, like an image archive's layers.
    pub const UNLIMITED: Limits = Limits {
        max_bytes: u64::MAX,
        max_entries: u64::MAX,
    };
}

/// Why the guard stopped a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("its {kind} header declares {size} bytes, more than the {limit} allowed")]
    Extension {
        kind: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("its GNU sparse map takes more than {limit} bytes of extension headers")]
    SparseMap { limit: u64 },
    #[error("the tar stream is over {limit} bytes uncompressed, the limit (--max-layer-size)")]
    TooManyBytes { limit: u64 },
    #[error("the tar stream holds over {limit} entries, the limit (--max-layer-entries)")]
    TooManyEntries { limit: u64 },
}

/// The guard's refusal inside an error the tar crate passed on.
pub fn refused(err: &io::Error) -> Option<&Refused> {
    err.get_ref().and_then(|e| e.downcast_ref::<Refused>())
}

const BLOCK: u64 = 512;
const BLOCK_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// the next block is a header
    Header,
    /// `left` bytes of body and padding before the next header
    Body { left: u64 },
    /// a PAX header's body: `left` bytes of it still to read, then `pad`
    Pax { left: u64, pad: u64 },
    /// the next block is a GNU sparse extension header; `body` follows
    SparseExt { body: u64 },
    /// after the end-of-archive block (or a header the tar crate will
    /// refuse): nothing more is parsed
    Done,
}

/// See the module documentation.
pub struct TarGuard<R> {
    inner: R,
    limits: Limits,
    state: State,
    block: [u8; BLOCK_LEN],
    filled: usize,
    pax: Vec<u8>,
    /// a PAX `size` for the next entry
    next_size: Option<u64>,
    total: u64,
    entries: u64,
    sparse_bytes: u64,
}

impl<R: Read> TarGuard<R> {
    /// Guard the tar stream `inner` with `limits`.
    pub fn new(inner: R, limits: Limits) -> Self {
        TarGuard {
            inner,
            limits,
            state: State::Header,
            block: [0; BLOCK_LEN],
            filled: 0,
            pax: Vec::new(),
            next_size: None,
            total: 0,
            entries: 0,
            sparse_bytes: 0,
        }
    }

    /// The stream guarded.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn scan(&mut self, mut data: &[u8]) -> Result<(), Refused> {
        while !data.is_empty() {
            match self.state {
                State::Done => return Ok(()),
                State::Header | State::SparseExt { .. } => {
                    let take = (BLOCK_LEN - self.filled).min(data.len());
                    self.block[self.filled..self.filled + take].copy_from_slice(&data[..take]);
                    self.filled += take;
                    data = &data[take..];
                    if self.filled == BLOCK_LEN {
                        self.filled = 0;
                        self.block_done()?;
                    }
                }
                State::Body { left } => {
                    let take = upto(left, data.len());
                    data = &data[take..];
                    self.state = body(left - take as u64);
                }
                State::Pax { left, pad } => {
                    let take = upto(left, data.len());
                    self.pax.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    let take = take as u64;
                    if left == take {
                        self.next_size = pax_size(&self.pax);
                        self.pax = Vec::new();
                        self.state = body(pad);
                    } else {
                        self.state = State::Pax {
                            left: left - take,
                            pad,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn block_done(&mut self) -> Result<(), Refused> {
        if let State::SparseExt { body: after } = self.state {
            self.sparse_bytes += BLOCK;
            if self.sparse_bytes > MAX_EXTENSION_BYTES {
                return Err(Refused::SparseMap {
                    limit: MAX_EXTENSION_BYTES,
                });
            }
            // `isextended` of a GNU sparse extension header
            if self.block[504] != 1 {
                self.state = body(after);
            }
            return Ok(());
        }
        if self.block.iter().all(|b| *b == 0) {
            // the tar crate stops at the first zero block
            self.state = State::Done;
            return Ok(());
        }
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(Refused::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let kind = header.entry_type();
        let Ok(mut size) = header.entry_size() else {
            // the tar crate refuses this header: the stream ends here
            self.state = State::Done;
            return Ok(());
        };
        let extension = match kind {
            tar::EntryType::GNULongName => Some("GNU long name"),
            tar::EntryType::GNULongLink => Some("GNU long link"),
            tar::EntryType::XHeader => Some("PAX"),
            tar::EntryType::XGlobalHeader => Some("PAX global"),
            _ => None,
        };
        if let Some(kind) = extension {
            if size > MAX_EXTENSION_BYTES {
                return Err(Refused::Extension {
                    kind,
                    size,
                    limit: MAX_EXTENSION_BYTES,
                });
            }
        } else if let Some(pax) = self.next_size.take() {
            // as the tar crate: a PAX size overrides the header's
            size = pax;
        }
        let Some(padded) = size.checked_add(BLOCK - 1).map(|s| s & !(BLOCK - 1)) else {
            self.state = State::Done;
            return Ok(());
        };
        self.sparse_bytes = 0;
        self.state = if kind == tar::EntryType::XHeader {
            State::Pax {
                left: size,
                pad: padded - size,
            }
        } else if kind.is_gnu_sparse() && header.as_gnu().is_some_and(|g| g.is_extended()) {
            State::SparseExt { body: padded }
        } else {
            body(padded)
        };
        Ok(())
    }
}

/// `left` bytes, or all `len` there are if fewer.
fn upto(left: u64, len: usize) -> usize {
    usize::try_from(left).map_or(len, |l| l.min(len))
}

fn body(left: u64) -> State {
    if left == 0 {
        State::Header
    } else {
        State::Body { left }
    }
}

/// The `size` record of a PAX header body, read as the tar crate reads it.
fn pax_size(body: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(body) {
        let ext = ext.ok()?;
        if ext.key() == Ok("size") {
            return ext.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        if self.total > self.limits.max_bytes {
            return Err(io::Error::other(Refused::TooManyBytes {
                limit: self.limits.max_bytes,
            }));
        }
        self.scan(&buf[..n]).map_err(io::Error::other)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, name: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn drain(bytes: &[u8], limits: Limits, chunk: usize) -> Result<u64, Refused> {
        let mut g = TarGuard::new(bytes, limits);
        let mut buf = vec![0; chunk];
        let mut total = 0;
        loop {
            match g.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n as u64,
                Err(e) => return Err(refused(&e).expect("a refusal").clone()),
            }
        }
    }

    /// A tar of `files` (name, size) written by the tar crate, with a long
    /// name and PAX records on the way.
    fn archive(files: &[(&str, usize)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, size) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(*size as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &vec![b'x'; *size][..]).unwrap();
        }
        b.append_pax_extensions([("size", &b"3"[..]), ("path", &b"p"[..])])
            .unwrap();
        // a header whose own size is wrong: the PAX size (3) wins
        let mut h = tar::Header::new_ustar();
        h.set_size(999_999);
        h.set_path("q").unwrap();
        h.set_cksum();
        let raw = b.get_mut();
        raw.extend_from_slice(h.as_bytes());
        raw.extend_from_slice(b"abc");
        raw.resize(raw.len().next_multiple_of(512), 0);
        b.into_inner().unwrap()
    }

    #[test]
    fn an_honest_archive_passes_whole_in_any_chunking() {
        let long = "d/".repeat(80) + "file";
        let bytes = archive(&[("a", 0), ("b", 700), (&long, 513)]);
        for chunk in [1, 7, 511, 512, 4096, 1 << 20] {
            assert_eq!(drain(&bytes, DEFAULT_LIMITS, chunk), Ok(bytes.len() as u64));
        }
        // and the tar crate reads it back through the guard
        let mut ar = tar::Archive::new(TarGuard::new(&bytes[..], DEFAULT_LIMITS));
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a", "b", &long, "p"]);
    }

    #[test]
    fn huge_extension_headers_are_refused_before_their_body() {
        for (kind, what) in [
            (tar::EntryType::GNULongName, "GNU long name"),
            (tar::EntryType::GNULongLink, "GNU long link"),
            (tar::EntryType::XHeader, "PAX"),
            (tar::EntryType::XGlobalHeader, "PAX global"),
        ] {
            // the header alone: no body follows, the guard must not wait
            let bytes = header(kind, "././@LongLink", 4 << 30);
            assert_eq!(
                drain(&bytes, DEFAULT_LIMITS, 512),
                Err(Refused::Extension {
                    kind: what,
                    size: 4 << 30,
                    limit: MAX_EXTENSION_BYTES
                })
            );
        }
        // at the limit it is read
        let mut bytes = header(tar::EntryType::GNULongName, "x", MAX_EXTENSION_BYTES);
        bytes.resize(bytes.len() + (1 << 20), b'a');
        assert!(drain(&bytes, DEFAULT_LIMITS, 4096).is_ok());
    }

    #[test]
    fn a_pax_size_moves_the_next_header_as_in_the_tar_crate() {
        // PAX says the next entry is 0 bytes: the header after it is at
        // the next block, and a huge long name there is caught
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"0"[..])]).unwrap();
        let mut out = std::mem::take(b.get_mut());
        out.extend_from_slice(&header(tar::EntryType::Regular, "f", 1 << 40));
        out.extend_from_slice(&header(tar::EntryType::GNULongName, "x", 1 << 30));
        assert!(matches!(
            drain(&out, DEFAULT_LIMITS, 100),
            Err(Refused::Extension { .. })
        ));
    }

    #[test]
    fn byte_and_entry_limits() {
        let bytes = archive(&[("a", 100), ("b", 100), ("c", 100)]);
        let few = Limits {
            max_bytes: u64::MAX,
            max_entries: 2,
        };
        assert_eq!(
            drain(&bytes, few, 512),
            Err(Refused::TooManyEntries { limit: 2 })
        );
        let small = Limits {
            max_bytes: 1000,
            max_entries: u64::MAX,
        };
        assert_eq!(
            drain(&bytes, small, 512),
            Err(Refused::TooManyBytes { limit: 1000 })
        );
    }

    #[test]
    fn endless_sparse_maps_are_refused() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_path("s").unwrap();
        h.set_size(0);
        h.as_gnu_mut().unwrap().isextended[0] = 1;
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        let mut ext = [0u8; 512];
        ext[504] = 1;
        for _ in 0..3000 {
            bytes.extend_from_slice(&ext);
        }
        assert_eq!(
            drain(&bytes, DEFAULT_LIMITS, 4096),
            Err(Refused::SparseMap {
                limit: MAX_EXTENSION_BYTES
            })
        );
    }
}
