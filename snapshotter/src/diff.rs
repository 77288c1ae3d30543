//! Diff: a directory of changes in the shared layer format (an overlay upper
//! directory: whiteouts as char 0:0, opaque directories marked with
//! `user.overlay.opaque=y`) becomes an OCI layer tar.
//!
//! The tar is deterministic: entries in depth-first order with children
//! sorted by name bytes, ustar headers with empty user/group names, PAX
//! records only where ustar cannot hold a value (long names, large sizes,
//! xattrs), xattrs sorted. Hard links inside the layer stay links;
//! whiteouts become `.wh.NAME` and opaque directories `.wh..wh..opq`.
//! The stream is compressed while the uncompressed digest (diffID) and the
//! compressed digest are computed in one pass, straight into the content
//! store.
//!
//! This module only reads the directory it is given; it never writes to it
//! and never follows a symlink found in it.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use oci_spec::image::{Digest, MediaType};
use sha2::{Digest as _, Sha256};

use crate::compression::{self, Compression};
use crate::content::{self, sha256_digest, ContentStore};
use crate::sys;

/// Errors of diff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("diff: cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("diff: cannot write the layer tar at {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("diff: cannot compress the layer")]
    Compression(#[from] compression::Error),
    #[error("diff: cannot store the layer blob")]
    Content(#[from] content::Error),
}

/// Result type of diff.
pub type Result<T> = std::result::Result<T, Error>;

/// The xattr prefixes that describe overlay bookkeeping, not content.
const OVERLAY_XATTRS: [&[u8]; 2] = [b"user.overlay.", b"trusted.overlay."];
/// The xattr marking an opaque directory in kiln's layer format.
pub const OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Whiteout prefix in OCI layer tars.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque-directory marker in OCI layer tars.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How to write a layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiffOptions {
    pub compression: Compression,
    /// clamp every entry's mtime to at most this (BuildKit's
    /// `rewrite-timestamp` with SOURCE_DATE_EPOCH)
    pub source_date_epoch: Option<i64>,
}

/// A layer blob written to the content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// sha256 of the uncompressed tar
    pub diff_id: Digest,
    /// sha256 of the blob as stored
    pub digest: Digest,
    /// size of the blob as stored
    pub size: u64,
    pub media_type: MediaType,
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// The digest and byte count so far, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (
            sha256_digest(self.hasher.finalize()),
            self.count,
            self.inner,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Write the layer for `dir` into `store`, compressed as asked.
pub fn write_layer(dir: &Path, store: &ContentStore, opts: DiffOptions) -> Result<LayerBlob> {
    if opts.compression == Compression::None {
        // the blob is the tar: its digest is the diffID, hashed once
        let blob = store.writer_hashed_by_caller()?;
        let (diff_id, _, blob) =
            write_tar(dir, HashingWriter::new(blob), opts.source_date_epoch)?.finish();
        let (digest, size) = blob.commit_hashed(diff_id.clone())?;
        return Ok(LayerBlob {
            diff_id,
            digest,
            size,
            media_type: opts.compression.media_type(),
        });
    }
    let blob = store.writer(None)?;
    let encoder = opts.compression.encoder(blob)?;
    let tar_out = HashingWriter::new(encoder);
    let tar_out = write_tar(dir, tar_out, opts.source_date_epoch)?;
    let (diff_id, _, encoder) = tar_out.finish();
    let blob = encoder.finish().map_err(|source| Error::Write {
        path: store.root().to_path_buf(),
        source,
    })?;
    let (digest, size) = blob.commit()?;
    Ok(LayerBlob {
        diff_id,
        digest,
        size,
        media_type: opts.compression.media_type(),
    })
}

/// The diffID and size of the plain layer tar of `dir`, written nowhere.
pub fn hash_layer(dir: &Path, source_date_epoch: Option<i64>) -> Result<(Digest, u64)> {
    let (diff_id, size, _) =
        write_tar(dir, HashingWriter::new(io::sink()), source_date_epoch)?.finish();
    Ok((diff_id, size))
}

/// Write the uncompressed layer tar for `dir` to `out` and return `out`.
pub fn write_tar<W: Write>(dir: &Path, out: W, source_date_epoch: Option<i64>) -> Result<W> {
    let mut w = TarWriter {
        builder: tar::Builder::new(out),
        root: dir.to_path_buf(),
        links: HashMap::new(),
        epoch: source_date_epoch,
        buf: Vec::new(),
    };
    w.walk(dir, &PathBuf::new())?;
    let wr = |source| Error::Write {
        path: dir.to_path_buf(),
        source,
    };
    w.builder.finish().map_err(wr)?;
    w.builder.into_inner().map_err(wr)
}

struct TarWriter<W: Write> {
    builder: tar::Builder<W>,
    root: PathBuf,
    /// (dev, ino) of hard-linked files already written -> their tar name
    links: HashMap<(u64, u64), Vec<u8>>,
    epoch: Option<i64>,
    /// file data passes through here
    buf: Vec<u8>,
}

/// A PAX extended header and its records.
type PaxHeader = (tar::Header, Vec<u8>);

/// Extended attributes as (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// One tar entry to write.
struct Entry<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    size: u64,
    link: Option<&'a [u8]>,
    dev: Option<(u32, u32)>,
    xattrs: &'a [(Vec<u8>, Vec<u8>)],
}

impl<W: Write> TarWriter<W> {
    fn read_err(&self, rel: &Path) -> impl FnOnce(io::Error) -> Error {
        let path = self.root.join(rel);
        move |source| Error::Read { path, source }
    }

    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(self.read_err(rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(self.read_err(rel))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            let rel = rel.join(&name);
            let meta = fs::symlink_metadata(&path).map_err(self.read_err(&rel))?;
            self.entry(&path, &rel, &meta)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: &Path, meta: &fs::Metadata) -> Result<()> {
        let name = rel.as_os_str().as_bytes();
        let mode = meta.mode();
        let ft = mode & libc::S_IFMT;
        let mtime = self.clamp(meta.mtime());
        if ft == libc::S_IFCHR && meta.rdev() == 0 {
            // overlay whiteout -> .wh.NAME
            let wh = whiteout_name(rel, None);
            return self.write(&Entry {
                name: &wh,
                kind: tar::EntryType::Regular,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime,
                size: 0,
                link: None,
                dev: None,
                xattrs: &[],
            });
        }
        let (xattrs, opaque) = self.xattrs(path, rel)?;
        let mut e = Entry {
            name,
            kind: tar::EntryType::Regular,
            mode: mode & 0o7777,
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
            mtime,
            size: 0,
            link: None,
            dev: None,
            xattrs: &xattrs,
        };
        match ft {
            libc::S_IFDIR => {
                e.kind = tar::EntryType::Directory;
                self.write(&e)?;
                if opaque {
                    let opq = whiteout_name(rel, Some(OPAQUE_MARKER));
                    self.write(&Entry {
                        name: &opq,
                        kind: tar::EntryType::Regular,
                        mode: 0,
                        uid: 0,
                        gid: 0,
                        mtime,
                        size: 0,
                        link: None,
                        dev: None,
                        xattrs: &[],
                    })?;
                }
                self.walk(path, rel)
            }
            libc::S_IFREG => {
                if meta.nlink() > 1 {
                    let key = (meta.dev(), meta.ino());
                    if let Some(first) = self.links.get(&key).cloned() {
                        e.kind = tar::EntryType::Link;
                        e.link = Some(&first);
                        return self.write(&e);
                    }
                    self.links.insert(key, name.to_vec());
                }
                e.size = meta.len();
                let file = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(self.read_err(rel))?;
                self.write_data(&e, file)
            }
            libc::S_IFLNK => {
                let target = fs::read_link(path).map_err(self.read_err(rel))?;
                e.kind = tar::EntryType::Symlink;
                e.link = Some(target.as_os_str().as_bytes());
                self.write(&e)
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                e.kind = match ft {
                    libc::S_IFCHR => tar::EntryType::Char,
                    libc::S_IFBLK => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                };
                if ft != libc::S_IFIFO {
                    e.dev = Some(sys::dev_major_minor(meta.rdev()));
                }
                self.write(&e)
            }
            // sockets are not file content: no layer format carries them
            _ => Ok(()),
        }
    }

    fn clamp(&self, mtime: i64) -> i64 {
        let t = match self.epoch {
            Some(e) => mtime.min(e),
            None => mtime,
        };
        t.max(0)
    }

    /// Content xattrs (sorted) and whether the directory is opaque.
    fn xattrs(&self, path: &Path, rel: &Path) -> Result<(Xattrs, bool)> {
        let cpath = kiln_sys::cstr(path).map_err(self.read_err(rel))?;
        let mut out = Vec::new();
        let mut opaque = false;
        for name in sys::llistxattr(&cpath).map_err(self.read_err(rel))? {
            let cname = CString::new(name.clone()).expect("xattr names have no NUL");
            if name == OPAQUE_XATTR.as_bytes() || name == b"trusted.overlay.opaque" {
                let v = sys::lgetxattr(&cpath, &cname).map_err(self.read_err(rel))?;
                opaque |= v == b"y";
                continue;
            }
            // overlay bookkeeping and the host's SELinux label are not content
            if OVERLAY_XATTRS.iter().any(|p| name.starts_with(p)) || name == b"security.selinux" {
                continue;
            }
            let v = sys::lgetxattr(&cpath, &cname).map_err(self.read_err(rel))?;
            out.push((name, v));
        }
        Ok((out, opaque))
    }

    fn write(&mut self, e: &Entry<'_>) -> Result<()> {
        self.write_data(e, io::empty())
    }

    fn write_data(&mut self, e: &Entry<'_>, data: impl io::Read) -> Result<()> {
        let werr = |source| Error::Write {
            path: PathBuf::from(OsStr::from_bytes(e.name)),
            source,
        };
        let (pax, header) = build_headers(e).map_err(werr)?;
        if let Some((ph, records)) = pax {
            self.builder.append(&ph, &records[..]).map_err(werr)?;
        }
        // header, data and padding as tar::Builder::append writes them, but
        // the data in large reads (its io::copy reads 8 KiB at a time)
        let mut data = data.take(e.size);
        let out = self.builder.get_mut();
        out.write_all(header.as_bytes()).map_err(werr)?;
        if self.buf.is_empty() {
            self.buf = vec![0u8; 1 << 20];
        }
        let mut copied = 0u64;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(werr(e)),
            };
            out.write_all(&self.buf[..n]).map_err(werr)?;
            copied += n as u64;
        }
        let pad = (512 - copied % 512) % 512;
        out.write_all(&[0u8; 512][..usize::try_from(pad).unwrap_or(0)])
            .map_err(werr)?;
        if data.limit() != 0 {
            // the file shrank while being read: the tar would be corrupt
            return Err(Error::Read {
                path: self.root.join(OsStr::from_bytes(e.name)),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while read"),
            });
        }
        Ok(())
    }
}

/// The ustar header of an entry, preceded by a PAX extended header (and its
/// records) when ustar cannot hold a value: names over its limits, ids over
/// 7 octal digits, sizes or times over 11, and every xattr.
fn build_headers(e: &Entry<'_>) -> io::Result<(Option<PaxHeader>, tar::Header)> {
    // ustar numeric fields are octal: 7 digits for ids, 11 for size and
    // mtime; beyond that PAX carries the value
    const MAX_ID: u64 = 0o7_777_777;
    const MAX_BIG: u64 = 0o77_777_777_777;
    let mut header = tar::Header::new_ustar();
    let mut pax: Vec<(&str, Vec<u8>)> = Vec::new();
    {
        let ustar = header.as_ustar_mut().expect("new_ustar is ustar");
        if !split_ustar_name(e.name, &mut ustar.prefix, &mut ustar.name) {
            pax.push(("path", e.name.to_vec()));
            let n = e.name.len().min(ustar.name.len());
            ustar.name[..n].copy_from_slice(&e.name[..n]);
        }
        if let Some(link) = e.link {
            if link.len() <= ustar.linkname.len() {
                ustar.linkname[..link.len()].copy_from_slice(link);
            } else {
                pax.push(("linkpath", link.to_vec()));
                let n = ustar.linkname.len();
                ustar.linkname.copy_from_slice(&link[..n]);
            }
        }
    }
    header.set_entry_type(e.kind);
    header.set_mode(e.mode);
    header.set_uid(e.uid.min(MAX_ID));
    header.set_gid(e.gid.min(MAX_ID));
    if e.uid > MAX_ID {
        pax.push(("uid", e.uid.to_string().into_bytes()));
    }
    if e.gid > MAX_ID {
        pax.push(("gid", e.gid.to_string().into_bytes()));
    }
    let mtime = e.mtime.unsigned_abs();
    header.set_mtime(mtime.min(MAX_BIG));
    if mtime > MAX_BIG {
        pax.push(("mtime", mtime.to_string().into_bytes()));
    }
    header.set_size(e.size.min(MAX_BIG));
    if e.size > MAX_BIG {
        pax.push(("size", e.size.to_string().into_bytes()));
    }
    if let Some((major, minor)) = e.dev {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }
    header.set_cksum();
    let mut records = Vec::new();
    for (key, value) in &pax {
        pax_record(&mut records, key.as_bytes(), value);
    }
    for (key, value) in e.xattrs {
        let mut k = b"SCHILY.xattr.".to_vec();
        k.extend_from_slice(key);
        pax_record(&mut records, &k, value);
    }
    if records.is_empty() {
        return Ok((None, header));
    }
    let mut ph = tar::Header::new_ustar();
    let mut pname = b"PaxHeaders/".to_vec();
    let base = e.name.rsplit(|b| *b == b'/').next().unwrap_or(e.name);
    pname.extend_from_slice(&base[..base.len().min(88)]);
    let ustar = ph.as_ustar_mut().expect("ustar");
    ustar.name[..pname.len()].copy_from_slice(&pname);
    ph.set_entry_type(tar::EntryType::XHeader);
    ph.set_mode(0o644);
    ph.set_mtime(0);
    ph.set_size(records.len() as u64);
    ph.set_cksum();
    Ok((Some((ph, records)), header))
}

/// Put `name` into ustar's name (100 bytes) and prefix (155 bytes) fields,
/// splitting at a `/`. Returns false when it does not fit.
fn split_ustar_name(name: &[u8], prefix: &mut [u8; 155], field: &mut [u8; 100]) -> bool {
    if name.len() <= field.len() {
        field[..name.len()].copy_from_slice(name);
        return true;
    }
    for (i, b) in name.iter().enumerate() {
        if *b == b'/'
            && i <= prefix.len()
            && name.len() - i - 1 <= field.len()
            && i + 1 < name.len()
        {
            prefix[..i].copy_from_slice(&name[..i]);
            field[..name.len() - i - 1].copy_from_slice(&name[i + 1..]);
            return true;
        }
    }
    false
}

/// Append one PAX record `"<len> key=value\n"`; `len` counts itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// `dir/.wh.NAME` for `rel` = `dir/NAME`, or `rel/MARKER` with a marker.
fn whiteout_name(rel: &Path, marker: Option<&str>) -> Vec<u8> {
    match marker {
        Some(m) => rel.join(m).as_os_str().as_bytes().to_vec(),
        None => {
            let parent = rel.parent().unwrap_or(Path::new(""));
            let mut base = WHITEOUT_PREFIX.as_bytes().to_vec();
            base.extend_from_slice(rel.file_name().unwrap_or_default().as_bytes());
            parent
                .join(OsStr::from_bytes(&base))
                .as_os_str()
                .as_bytes()
                .to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"a");
        assert_eq!(v, b"9 path=a\n");
        let mut v = Vec::new();
        pax_record(&mut v, b"path", &[b'x'; 93]);
        // 93 + 4 + 3 = 100 body bytes, plus three length digits
        assert_eq!(&v[..4], b"103 ");
        assert_eq!(v.len(), 103);
    }

    #[test]
    fn big_values_go_to_pax_records() {
        let e = Entry {
            name: b"huge",
            kind: tar::EntryType::Regular,
            mode: 0o644,
            uid: 3_000_000,
            gid: 7,
            mtime: 1,
            size: 9 << 30,
            link: None,
            dev: None,
            xattrs: &[(b"user.a".to_vec(), b"1".to_vec())],
        };
        let (pax, header) = build_headers(&e).unwrap();
        let (ph, records) = pax.expect("PAX header needed");
        assert_eq!(ph.entry_type(), tar::EntryType::XHeader);
        let text = String::from_utf8(records).unwrap();
        assert!(text.contains(" uid=3000000\n"), "{text}");
        assert!(text.contains(&format!(" size={}\n", 9u64 << 30)), "{text}");
        assert!(text.contains(" SCHILY.xattr.user.a=1\n"), "{text}");
        assert!(!text.contains("gid="), "{text}");
        // readers that ignore PAX still see a well-formed (clamped) header
        assert_eq!(header.size().unwrap(), 0o77_777_777_777);
        assert_eq!(header.gid().unwrap(), 7);
    }

    #[test]
    fn ustar_split_and_overflow() {
        let mut p = [0u8; 155];
        let mut n = [0u8; 100];
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        assert!(split_ustar_name(long.as_bytes(), &mut p, &mut n));
        assert_eq!(&p[..120], "d".repeat(120).as_bytes());
        let mut p = [0u8; 155];
        let mut n = [0u8; 100];
        assert!(!split_ustar_name(
            "x".repeat(300).as_bytes(),
            &mut p,
            &mut n
        ));
    }

    #[test]
    fn long_names_big_ids_and_xattrs_roundtrip_through_tar_crate() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a".repeat(120)).join("b".repeat(150));
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("file"), b"content").unwrap();
        std::os::unix::fs::symlink("t".repeat(200), dir.path().join("ln")).unwrap();
        let tar = write_tar(dir.path(), Vec::new(), Some(0)).unwrap();
        let again = write_tar(dir.path(), Vec::new(), Some(0)).unwrap();
        assert_eq!(tar, again, "same tree gives the same bytes");
        let mut ar = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let p = e.path().unwrap().into_owned();
            if p.ends_with("ln") {
                assert_eq!(e.link_name().unwrap().unwrap().as_os_str().len(), 200);
            }
            seen.push(p);
        }
        let want_file = PathBuf::from("a".repeat(120))
            .join("b".repeat(150))
            .join("file");
        assert!(seen.contains(&want_file), "{seen:?}");
        // sorted, depth first: the long directory before its child
        assert_eq!(seen[0], PathBuf::from("a".repeat(120)));
    }
}
