//! Apply: an OCI layer tar (gzip, zstd or plain, detected by magic bytes)
//! becomes a layer directory in kiln's layer format (whiteouts as char 0:0
//! devices, opaque directories marked `user.overlay.opaque=y`).
//!
//! The tar crate only parses entries; every file-system write is done here
//! through directory fds opened one component at a time with `O_NOFOLLOW`,
//! so no entry can reach outside the target: absolute paths, `..`
//! components, parents that are symlinks (in this layer or, for a parent the
//! layer does not create, in a lower one), hard links to anything outside
//! the layer chain and anything after a corrupt header are refused with an
//! error naming the entry. Extension headers (long names, PAX) over 1 MiB
//! and streams over the layer limits are refused by `targuard` before the
//! tar crate reads them. Device nodes other
//! than whiteouts are skipped and counted (kiln has no CAP_MKNOD on the
//! host); setuid/setgid bits and holes of sparse files are kept.
//!
//! This module must never write outside the target directory, and never
//! reads lower layers except to copy up a hard link's target.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use sha2::{Digest as _, Sha256};

use crate::compression;
use crate::content::sha256_digest;
use crate::diff::{OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX};
use crate::sys::{self, Time};
use crate::targuard::{Limits, TarGuard};
use crate::tree::{self, Meta};

/// Errors of apply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the apply target {path}")]
    Target { path: PathBuf, source: io::Error },
    #[error("cannot open the layer stream")]
    Compression(#[from] compression::Error),
    #[error("layer stream is corrupt or truncated after tar entry {after}")]
    Stream { after: String, source: io::Error },
    #[error("corrupt tar header after entry {after}; nothing after it was applied")]
    Header { after: String, source: io::Error },
    #[error("tar entry {entry}: absolute paths are refused in a layer")]
    Absolute { entry: String },
    #[error("tar entry {entry}: `..` components are refused in a layer")]
    DotDot { entry: String },
    #[error("tar entry {entry}: {component} is a symlink or not a directory; writing through it is refused")]
    ThroughSymlink { entry: String, component: String },
    #[error("tar entry {entry}: hard link target {target} is not in this layer or its parents")]
    LinkOutside { entry: String, target: String },
    #[error("tar stream refused after entry {after}: {reason}; nothing after it was applied")]
    Refused {
        after: String,
        reason: crate::targuard::Refused,
    },
    #[error("tar entry {entry}: name of {len} bytes is longer than PATH_MAX")]
    NameTooLong { entry: String, len: usize },
    #[error("tar entry {entry}: owner {uid}:{gid} is not mapped in kiln's user namespace (ids 0-65535 are); rebuild the image with ids in that range")]
    Unmapped { entry: String, uid: u64, gid: u64 },
    #[error("tar entry {entry}: bad whiteout name")]
    BadWhiteout { entry: String },
    #[error("tar entry {entry}")]
    Write { entry: String, source: io::Error },
}

/// Result type of apply.
pub type Result<T> = std::result::Result<T, Error>;

const PATH_MAX: usize = 4096;

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// sha256 of the uncompressed tar stream
    pub diff_id: Digest,
    /// tar entries applied
    pub entries: u64,
    /// device nodes skipped
    pub skipped_devices: u64,
    /// xattrs in namespaces kiln cannot set in its user namespace
    /// (`trusted.*` and unknown ones)
    pub skipped_xattrs: u64,
}

impl ApplyReport {
    /// The one warning to show for this layer, if any.
    pub fn warning(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.skipped_devices > 0 {
            parts.push(format!(
                "skipped {} device node(s): kiln cannot create devices without root; the runtime provides /dev",
                self.skipped_devices
            ));
        }
        if self.skipped_xattrs > 0 {
            parts.push(format!(
                "skipped {} extended attribute(s) outside user.*, security.capability and system.posix_acl_*",
                self.skipped_xattrs
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Apply the layer read from `layer` into the existing directory `target`.
/// `lowers` are the parent layer directories, topmost first; they are read
/// only to copy up the target of a hard link that is not in this layer.
pub fn apply(layer: impl Read, target: &Path, lowers: &[PathBuf]) -> Result<ApplyReport> {
    apply_limited(layer, target, lowers, Limits::current())
}

/// [`apply`] with the stream limits `limits` instead of the process's.
pub fn apply_limited(
    layer: impl Read,
    target: &Path,
    lowers: &[PathBuf],
    limits: Limits,
) -> Result<ApplyReport> {
    let root = sys::open_dir(target).map_err(|source| Error::Target {
        path: target.to_path_buf(),
        source,
    })?;
    let mut buffered = BufReader::with_capacity(1 << 20, layer);
    let kind = compression::detect(&mut buffered)?;
    let decoder = compression::decoder(buffered, kind).map_err(|source| Error::Stream {
        after: "(start)".into(),
        source,
    })?;
    let hashing = HashingReader {
        inner: decoder,
        hasher: Sha256::new(),
    };
    let mut archive = tar::Archive::new(TarGuard::new(hashing, limits));
    let mut ap = Applier {
        root,
        lowers,
        cached: None,
        dirs: Vec::new(),
        entries: 0,
        skipped_devices: 0,
        skipped_xattrs: 0,
        buf: Vec::new(),
    };
    let mut last = String::from("(start)");
    let entries = archive.entries().map_err(|source| Error::Header {
        after: last.clone(),
        source,
    })?;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            // umoci 0.4 (and other Go writers that forget to close the tar
            // writer) end the stream right after the last entry's data,
            // without padding or the end-of-archive blocks. The last entry
            // was read whole (checked below), and compressed streams still
            // have their trailer checked and the diffID verified by the
            // caller, so this is the end of the archive, not damage.
            Err(e) if e.to_string() == "unexpected EOF during skip" => break,
            Err(source) => return Err(classify(source, &last)),
        };
        last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        ap.entry(&mut entry, &last)?;
    }
    ap.finish_dirs()?;
    // read to the end so a compressed stream's trailer (gzip CRC, zstd
    // frame end) is checked and the diffID covers every byte
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|source| classify(source, &last))?;
    Ok(ApplyReport {
        diff_id: sha256_digest(rest.into_inner().hasher.finalize()),
        entries: ap.entries,
        skipped_devices: ap.skipped_devices,
        skipped_xattrs: ap.skipped_xattrs,
    })
}

/// A read error from the entries iterator is either the decompressor
/// failing (corrupt/truncated stream) or a bad tar header.
fn classify(source: io::Error, after: &str) -> Error {
    if let Some(reason) = crate::targuard::refused(&source) {
        return Error::Refused {
            after: after.to_string(),
            reason: reason.clone(),
        };
    }
    let msg = source.to_string();
    if source.kind() == io::ErrorKind::UnexpectedEof
        || msg.contains("corrupt deflate")
        || msg.contains("invalid gzip")
        || msg.contains("Unknown frame")
    {
        Error::Stream {
            after: after.to_string(),
            source,
        }
    } else {
        Error::Header {
            after: after.to_string(),
            source,
        }
    }
}

struct Applier<'a> {
    root: OwnedFd,
    lowers: &'a [PathBuf],
    /// the last parent directory walked to, reused by consecutive entries
    cached: Option<(Vec<Vec<u8>>, OwnedFd)>,
    /// directories whose times are set after all entries (writing children
    /// changes a directory's mtime)
    dirs: Vec<(Vec<Vec<u8>>, Time)>,
    entries: u64,
    skipped_devices: u64,
    skipped_xattrs: u64,
    /// scratch buffer for file data, reused by every entry
    buf: Vec<u8>,
}

/// What a path is in the lower layers (see `Applier::lower_at`).
enum Lower {
    Dir(Meta),
    Symlink,
    Other,
}

/// Whether kiln can set an xattr of this name inside its user namespace:
/// `user.*`, file capabilities (the kernel stores them relative to the
/// namespace's root) and POSIX ACLs. `trusted.*` needs CAP_SYS_ADMIN in the
/// initial namespace; other `security.*` belong to the host's LSM.
fn settable_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// Split an entry path into components, refusing absolute paths and `..`.
fn components<'p>(path: &'p [u8], entry: &str) -> Result<Vec<&'p [u8]>> {
    // "/" alone names the root (umoci writes it); any other absolute path
    // is refused
    let root_only = path.iter().all(|b| *b == b'/' || *b == b'.');
    if path.first() == Some(&b'/') && !root_only {
        return Err(Error::Absolute {
            entry: entry.to_string(),
        });
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::DotDot {
                    entry: entry.to_string(),
                })
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn cname(c: &[u8]) -> CString {
    CString::new(c).unwrap_or_else(|_| CString::new("\u{fffd}").expect("no NUL"))
}

fn werr(entry: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| match crate::targuard::refused(&source) {
        Some(reason) => Error::Refused {
            after: entry.to_string(),
            reason: reason.clone(),
        },
        None => Error::Write {
            entry: entry.to_string(),
            source,
        },
    }
}

/// An entry's metadata: mode, owner (refused unless it fits in 32 bits),
/// mtime (the PAX one when given) and the xattrs kept.
fn entry_meta(
    header: &tar::Header,
    name: &str,
    xattrs: Vec<(CString, Vec<u8>)>,
    pax_mtime: Option<i64>,
) -> Result<Meta> {
    let uid = header.uid().map_err(werr(name))?;
    let gid = header.gid().map_err(werr(name))?;
    let (Ok(uid32), Ok(gid32)) = (u32::try_from(uid), u32::try_from(gid)) else {
        return Err(Error::Unmapped {
            entry: name.to_string(),
            uid,
            gid,
        });
    };
    let mtime = pax_mtime.unwrap_or_else(|| {
        header
            .mtime()
            .ok()
            .and_then(|m| i64::try_from(m).ok())
            .unwrap_or(0)
    });
    Ok(Meta {
        mode: header.mode().map_err(werr(name))? & 0o7777,
        uid: uid32,
        gid: gid32,
        mtime: Time {
            sec: mtime,
            nsec: 0,
        },
        xattrs,
    })
}

fn has_nul(path: &[u8]) -> bool {
    path.contains(&0)
}

impl Applier<'_> {
    /// Walk to the directory `comps` inside the target, one component at a
    /// time with O_NOFOLLOW, creating missing directories (with the
    /// metadata of the same directory in a lower layer, as overlay copy-up
    /// does). A whiteout in the way becomes an opaque directory.
    fn open_parent(&mut self, comps: &[&[u8]], entry: &str) -> Result<BorrowedFd<'_>> {
        let key: Vec<Vec<u8>> = comps.iter().map(|c| c.to_vec()).collect();
        if self.cached.as_ref().map(|(k, _)| k == &key) != Some(true) {
            let fd = self.walk(comps, entry)?;
            self.cached = Some((key, fd));
        }
        Ok(self.cached.as_ref().expect("just set").1.as_fd())
    }

    fn walk(&self, comps: &[&[u8]], entry: &str) -> Result<OwnedFd> {
        let mut fd = self.root.try_clone().map_err(werr(entry))?;
        for (i, c) in comps.iter().enumerate() {
            let name = cname(c);
            let through = || Error::ThroughSymlink {
                entry: entry.to_string(),
                component: String::from_utf8_lossy(&comps[..=i].join(&b'/')).into_owned(),
            };
            match sys::open_dir_at(fd.as_fd(), &name) {
                Ok(next) => fd = next,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let lower = self.lower_at(&comps[..=i]);
                    // a parent that is a symlink in a lower layer: creating
                    // a directory here would hide what it points to, and
                    // following it is writing through a symlink
                    if matches!(lower, Some(Lower::Symlink)) {
                        return Err(through());
                    }
                    sys::mkdirat(fd.as_fd(), &name, 0o755).map_err(werr(entry))?;
                    let next = sys::open_dir_at(fd.as_fd(), &name).map_err(werr(entry))?;
                    if let Some(Lower::Dir(meta)) = lower {
                        tree::set_meta_fd(next.as_fd(), &meta).map_err(werr(entry))?;
                    }
                    fd = next;
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOTDIR)
                        || e.raw_os_error() == Some(libc::ELOOP) =>
                {
                    let st = sys::lstat_at(fd.as_fd(), &name).map_err(werr(entry))?;
                    if !sys::is_whiteout(&st) {
                        return Err(through());
                    }
                    // an earlier whiteout of this name, then content under
                    // it in the same layer: the directory replaces what the
                    // lower layers had, i.e. it is opaque
                    sys::unlinkat(fd.as_fd(), &name, false).map_err(werr(entry))?;
                    sys::mkdirat(fd.as_fd(), &name, 0o755).map_err(werr(entry))?;
                    let next = sys::open_dir_at(fd.as_fd(), &name).map_err(werr(entry))?;
                    sys::fsetxattr(next.as_fd(), &cname(OPAQUE_XATTR.as_bytes()), b"y")
                        .map_err(werr(entry))?;
                    fd = next;
                }
                Err(e) => return Err(werr(entry)(e)),
            }
        }
        Ok(fd)
    }

    /// Walk to an existing directory without creating anything; `None` if
    /// a component is missing, not a directory or a symlink.
    fn walk_existing(root: BorrowedFd<'_>, comps: &[&[u8]]) -> Option<OwnedFd> {
        let mut fd = root.try_clone_to_owned().ok()?;
        for c in comps {
            fd = sys::open_dir_at(fd.as_fd(), &cname(c)).ok()?;
        }
        Some(fd)
    }

    /// What the lower layers show at `comps`: the topmost lower in which
    /// the parent is a directory and the name exists decides; a whiteout
    /// there means nothing.
    fn lower_at(&self, comps: &[&[u8]]) -> Option<Lower> {
        let (base, parent) = comps.split_last()?;
        let base = cname(base);
        for lower in self.lowers {
            let Ok(root) = sys::open_dir(lower) else {
                continue;
            };
            let Some(dir) = Self::walk_existing(root.as_fd(), parent) else {
                continue;
            };
            match tree::read_meta_at(dir.as_fd(), &base) {
                Ok((st, _)) if sys::is_whiteout(&st) => return None,
                Ok((st, _)) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                    return Some(Lower::Symlink)
                }
                Ok((st, meta)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    return Some(Lower::Dir(meta))
                }
                Ok(_) => return Some(Lower::Other),
                Err(_) => continue,
            }
        }
        None
    }

    /// Apply one tar entry: its name checked, its metadata read, then the
    /// handler for its kind (a whiteout or opaque marker, a directory, a
    /// regular file, a symlink, a hard link, a fifo, a device).
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, name: &str) -> Result<()> {
        let path = entry.path_bytes().into_owned();
        if path.len() > PATH_MAX {
            return Err(Error::NameTooLong {
                entry: name.chars().take(64).collect::<String>() + "...",
                len: path.len(),
            });
        }
        let (xattrs, pax_mtime) = self.pax_extensions(entry, name)?;
        if has_nul(&path) {
            return Err(Error::Write {
                entry: name.to_string(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        let comps = components(&path, name)?;
        let Some((base, parent)) = comps.split_last() else {
            // the root directory itself: its metadata is not the layer's
            return Ok(());
        };
        let header = entry.header();
        let kind = header.entry_type();
        let meta = entry_meta(header, name, xattrs, pax_mtime)?;
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let dev = (
            header.device_major().ok().flatten().unwrap_or(0),
            header.device_minor().ok().flatten().unwrap_or(0),
        );
        self.entries += 1;

        if self.marker(base, parent, name)? {
            return Ok(());
        }
        let cbase = cname(base);
        match kind {
            tar::EntryType::Directory => self.directory(&comps, &cbase, meta, name)?,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.regular(entry, parent, &cbase, &meta, name)?
            }
            tar::EntryType::Symlink => {
                self.symlink(&link.unwrap_or_default(), parent, &cbase, &meta, name)?
            }
            tar::EntryType::Link => {
                let target = link.unwrap_or_default();
                self.hard_link(&target, parent, &cbase, name)?;
            }
            tar::EntryType::Fifo => self.fifo(parent, &cbase, &meta, name)?,
            tar::EntryType::Char if dev == (0, 0) => {
                // a whiteout stored as overlay's own format (some tools
                // export upper directories verbatim)
                self.replace(parent, &cbase, name)?;
                let dir = self.open_parent(parent, name)?;
                sys::mknod_whiteout(dir, &cbase).map_err(werr(name))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                self.skipped_devices += 1;
            }
            // global PAX headers and unknown types carry no file
            _ => {
                self.entries -= 1;
            }
        }
        Ok(())
    }

    /// The entry's PAX extensions kiln keeps: the xattrs it can set
    /// (sorted; others are counted as skipped) and a PAX mtime.
    #[allow(clippy::type_complexity)]
    fn pax_extensions<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(Vec<(CString, Vec<u8>)>, Option<i64>)> {
        let mut xattrs = Vec::new();
        let mut pax_mtime = None;
        // (the guard bounded the PAX header's size before it was read)
        if let Some(pax) = entry.pax_extensions().map_err(werr(name))? {
            for ext in pax {
                let ext = ext.map_err(|source| Error::Header {
                    after: name.to_string(),
                    source,
                })?;
                let key = ext.key_bytes();
                if let Some(x) = key.strip_prefix(b"SCHILY.xattr.") {
                    // overlay bookkeeping must never come from a layer: a
                    // crafted `user.overlay.redirect` would point the view
                    // anywhere in the lower layers
                    if tree::is_overlay_xattr(x) || x == b"security.selinux" || has_nul(x) {
                        continue;
                    }
                    if settable_xattr(x) {
                        xattrs.push((cname(x), ext.value_bytes().to_vec()));
                    } else {
                        self.skipped_xattrs += 1;
                    }
                } else if key == b"mtime" {
                    pax_mtime = ext
                        .value()
                        .ok()
                        .and_then(|v| v.split('.').next().map(str::to_owned))
                        .and_then(|s| s.parse::<i64>().ok());
                }
            }
        }
        xattrs.sort();
        Ok((xattrs, pax_mtime))
    }

    /// Whiteouts and opaque markers (and aufs bookkeeping, which is not
    /// content): applied here, and true when `base` was one.
    fn marker(&mut self, base: &[u8], parent: &[&[u8]], name: &str) -> Result<bool> {
        if base.starts_with(b".wh..wh.") && base != OPAQUE_MARKER.as_bytes() {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
            self.entries -= 1;
            return Ok(true);
        }
        if base == OPAQUE_MARKER.as_bytes() {
            let dir = self.open_parent(parent, name)?;
            sys::fsetxattr(dir, &cname(OPAQUE_XATTR.as_bytes()), b"y").map_err(werr(name))?;
            return Ok(true);
        }
        let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX.as_bytes()) else {
            return Ok(false);
        };
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(Error::BadWhiteout {
                entry: name.to_string(),
            });
        }
        let hidden = cname(hidden);
        let dir = self.open_parent(parent, name)?;
        // a whiteout hides lower layers only; a same-named entry of this
        // layer stays
        match sys::lstat_at(dir, &hidden) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                sys::mknod_whiteout(dir, &hidden).map_err(werr(name))?;
            }
            Err(e) => return Err(werr(name)(e)),
        }
        Ok(true)
    }

    /// A directory entry: made (replacing a non-directory) or kept, its
    /// metadata set now and its mtime again after its children.
    fn directory(&mut self, comps: &[&[u8]], cbase: &CStr, meta: Meta, name: &str) -> Result<()> {
        let parent = &comps[..comps.len() - 1];
        let dir = self.open_parent(parent, name)?;
        let existing = sys::lstat_at(dir, cbase);
        let is_dir = matches!(&existing, Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR);
        if !is_dir {
            if existing.is_ok() {
                sys::unlinkat(dir, cbase, false).map_err(werr(name))?;
            }
            sys::mkdirat(dir, cbase, 0o700).map_err(werr(name))?;
        }
        let fd = sys::open_dir_at(dir, cbase).map_err(werr(name))?;
        tree::set_meta_fd(fd.as_fd(), &meta).map_err(werr(name))?;
        self.dirs
            .push((comps.iter().map(|c| c.to_vec()).collect(), meta.mtime));
        Ok(())
    }

    /// A regular file: a new file holding the entry's data (holes kept);
    /// a stream that ends inside it is corrupt.
    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &[&[u8]],
        cbase: &CStr,
        meta: &Meta,
        name: &str,
    ) -> Result<()> {
        self.replace(parent, cbase, name)?;
        let dir = self.open_parent(parent, name)?;
        let fd = sys::openat(
            dir,
            cbase,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(werr(name))?;
        let mut file = File::from(fd);
        let size = entry.size();
        let written =
            tree::write_sparse(&mut file, &mut *entry, &mut self.buf).map_err(|source| {
                if source.kind() == io::ErrorKind::UnexpectedEof
                    || source.to_string().contains("corrupt deflate")
                {
                    Error::Stream {
                        after: name.to_string(),
                        source,
                    }
                } else {
                    werr(name)(source)
                }
            })?;
        if written != size {
            // the stream ended inside this entry's data
            return Err(Error::Stream {
                after: name.to_string(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("entry holds {written} of its {size} bytes"),
                ),
            });
        }
        self.set_owner_checked(meta, name, |m| tree::set_meta_fd(file.as_fd(), m))
    }

    /// A symlink to `target`, which is data: it is never followed here.
    fn symlink(
        &mut self,
        target: &[u8],
        parent: &[&[u8]],
        cbase: &CStr,
        meta: &Meta,
        name: &str,
    ) -> Result<()> {
        if has_nul(target) {
            return Err(werr(name)(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        self.replace(parent, cbase, name)?;
        let dir = self.open_parent(parent, name)?;
        sys::symlinkat(&cname(target), dir, cbase).map_err(werr(name))?;
        let dir = self
            .open_parent(parent, name)?
            .try_clone_to_owned()
            .map_err(werr(name))?;
        self.set_owner_checked(meta, name, |m| {
            tree::set_meta_at(dir.as_fd(), cbase, m, true)
        })
    }

    /// A fifo with the entry's permission bits.
    fn fifo(&mut self, parent: &[&[u8]], cbase: &CStr, meta: &Meta, name: &str) -> Result<()> {
        self.replace(parent, cbase, name)?;
        let dir = self.open_parent(parent, name)?;
        sys::mknodat(dir, cbase, libc::S_IFIFO | (meta.mode & 0o777), 0).map_err(werr(name))?;
        let dir = dir.try_clone_to_owned().map_err(werr(name))?;
        self.set_owner_checked(meta, name, |m| {
            tree::set_meta_at(dir.as_fd(), cbase, m, false)
        })
    }

    fn set_owner_checked(
        &self,
        meta: &Meta,
        name: &str,
        set: impl FnOnce(&Meta) -> io::Result<()>,
    ) -> Result<()> {
        set(meta).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                Error::Unmapped {
                    entry: name.to_string(),
                    uid: u64::from(meta.uid),
                    gid: u64::from(meta.gid),
                }
            } else {
                werr(name)(e)
            }
        })
    }

    /// Remove whatever is at `base` in `parent` before a non-directory
    /// entry takes its place (a later tar entry wins).
    fn replace(&mut self, parent: &[&[u8]], base: &CStr, name: &str) -> Result<()> {
        let dir = self.open_parent(parent, name)?;
        match sys::lstat_at(dir, base) {
            Ok(st) => {
                let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                sys::remove_all_at(dir, base).map_err(werr(name))?;
                if is_dir {
                    // a cached fd could point into the removed tree
                    self.cached = None;
                    let prefix: Vec<Vec<u8>> = parent
                        .iter()
                        .map(|c| c.to_vec())
                        .chain(std::iter::once(base.to_bytes().to_vec()))
                        .collect();
                    self.dirs.retain(|(d, _)| !d.starts_with(&prefix));
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(werr(name)(e)),
        }
    }

    fn hard_link(
        &mut self,
        target: &[u8],
        parent: &[&[u8]],
        base: &CStr,
        name: &str,
    ) -> Result<()> {
        let outside = || Error::LinkOutside {
            entry: name.to_string(),
            target: String::from_utf8_lossy(target).into_owned(),
        };
        if has_nul(target) {
            return Err(outside());
        }
        let tcomps = components(target, name).map_err(|_| outside())?;
        let Some((tbase, tparent)) = tcomps.split_last() else {
            return Err(outside());
        };
        let tbase = cname(tbase);
        let same = tcomps.len() == parent.len() + 1
            && tcomps[..parent.len()] == *parent
            && tbase.as_c_str() == base;
        if same {
            return Ok(());
        }
        // 1. the target in this layer
        let in_layer = Self::walk_existing(self.root.as_fd(), tparent).filter(|fd| {
            sys::lstat_at(fd.as_fd(), &tbase)
                .map(|st| st.st_mode & libc::S_IFMT != libc::S_IFDIR && !sys::is_whiteout(&st))
                .unwrap_or(false)
        });
        let tdir = match in_layer {
            Some(fd) => fd,
            None => {
                // 2. the target in a lower layer: copy it up first, as
                // overlayfs does when a lower file is linked
                let (lower_dir, st, meta) =
                    self.find_in_lowers(tparent, &tbase).ok_or_else(outside)?;
                let tdir = self.walk(tparent, name)?;
                tree::copy_node_at(lower_dir.as_fd(), &tbase, &st, &meta, tdir.as_fd(), &tbase)
                    .map_err(werr(name))?;
                tdir
            }
        };
        self.replace(parent, base, name)?;
        let dir = self.open_parent(parent, name)?;
        sys::linkat(tdir.as_fd(), &tbase, dir, base).map_err(werr(name))
    }

    /// The topmost lower layer holding a non-directory at `parent/base`,
    /// stopping at a whiteout or opaque directory that hides it.
    fn find_in_lowers(&self, parent: &[&[u8]], base: &CStr) -> Option<(OwnedFd, libc::stat, Meta)> {
        for lower in self.lowers {
            let root = sys::open_dir(lower).ok()?;
            let Some(dir) = Self::walk_existing(root.as_fd(), parent) else {
                continue;
            };
            match tree::read_meta_at(dir.as_fd(), base) {
                Ok((st, _)) if sys::is_whiteout(&st) => return None,
                Ok((st, _)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => return None,
                Ok((st, meta)) => return Some((dir, st, meta)),
                Err(_) => {
                    let opaque = sys::fgetxattr(dir.as_fd(), &cname(OPAQUE_XATTR.as_bytes()))
                        .map(|v| v == b"y")
                        .unwrap_or(false);
                    if opaque {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Set directory times last, deepest first.
    fn finish_dirs(&mut self) -> Result<()> {
        self.cached = None;
        let dirs = std::mem::take(&mut self.dirs);
        let mut seen = HashMap::new();
        for (comps, mtime) in dirs.into_iter().rev() {
            if seen.insert(comps.clone(), ()).is_some() {
                continue;
            }
            let refs: Vec<&[u8]> = comps.iter().map(Vec::as_slice).collect();
            let name = String::from_utf8_lossy(&comps.join(&b'/')).into_owned();
            if let Some(fd) = Self::walk_existing(self.root.as_fd(), &refs) {
                sys::set_times_at(fd.as_fd(), c"", mtime, mtime).map_err(werr(&name))?;
            }
        }
        Ok(())
    }
}

/// Apply a layer file at `path` (convenience for tests and tools).
pub fn apply_file(path: &Path, target: &Path, lowers: &[PathBuf]) -> Result<ApplyReport> {
    let f = File::open(path).map_err(|source| Error::Target {
        path: path.to_path_buf(),
        source,
    })?;
    apply(f, target, lowers)
}

/// Display helper for an entry path given as bytes.
pub fn entry_display(path: &[u8]) -> String {
    Path::new(OsStr::from_bytes(path)).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_refuse_absolute_and_dotdot() {
        assert!(matches!(
            components(b"/etc/passwd", "e"),
            Err(Error::Absolute { .. })
        ));
        assert!(matches!(
            components(b"a/../../x", "e"),
            Err(Error::DotDot { .. })
        ));
        assert_eq!(
            components(b"./a//b/./c/", "e").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(components(b"./", "e").unwrap().is_empty());
        assert!(components(b"/", "e").unwrap().is_empty());
    }
}
