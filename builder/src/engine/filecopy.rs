//! COPY and ADD: which files a step copies (resolved inside the context or
//! the source stage, never following a symlink out of it), their content
//! checksum for the cache key, and the copy itself into a step's view.
//!
//! ADD's local archives are unpacked by the snapshotter's layer applier
//! into a scratch directory (it refuses `..`, absolute names and writes
//! through symlinks) and that tree is then copied like any other source, so
//! no archive entry is ever written into the image by a path of its own.
//! ADD of an HTTP(S) URL is fetched here, by the host-side kiln process
//! (never inside the sandbox), into memory with a time and size limit; the
//! bytes are then written like a heredoc source. This module never writes
//! outside the destination root and that scratch directory.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::fsutil::{self, Meta, Node, Root};
use super::parallel::parallel_map;
use super::statcache::StatCache;
use super::step_cache::KeyBuilder;
use crate::frontend::clean_path;
use crate::frontend::dockerignore::{DirHits, Matcher};
use crate::frontend::instructions::{self, Chmod};

/// Errors of resolving and copying sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {path:?} not found{hint}")]
    NotFound {
        what: &'static str,
        path: String,
        hint: &'static str,
    },
    #[error("cannot read {path:?} from the {what}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path} in the image")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid exclude pattern {0:?}")]
    Pattern(String),
    #[error(
        "when copying several sources the destination must be a directory and end with a /: {0:?}"
    )]
    DestNotDir(String),
    #[error("invalid --chmod {0:?}: use an octal mode such as 0755 or a symbolic one such as u=rwX,go=rX")]
    BadChmod(String),
    #[error("ADD {url}: adding {kind} is not supported yet; download it in a RUN step or into the build context")]
    Remote { url: String, kind: &'static str },
    #[error("ADD {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("ADD {url}: the server answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("ADD {url}: the file is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("ADD {url}: checksum mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("cannot extract the archive {path:?}")]
    Archive {
        path: String,
        source: Box<kiln_snapshotter::apply::Error>,
    },
    #[error("cannot prepare a scratch directory {path} to extract {archive:?}")]
    Scratch {
        path: PathBuf,
        archive: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One thing to copy.
#[derive(Debug, Clone)]
pub struct Entry {
    /// path inside the source root (empty for inline content)
    pub src: PathBuf,
    /// path inside the destination root; for an archive, the directory it
    /// is extracted into
    pub dest: PathBuf,
    pub meta: Meta,
    pub link: Option<Vec<u8>>,
    /// content of a heredoc source
    pub inline: Option<Vec<u8>>,
    /// a file ADD downloaded, read from its start
    pub downloaded: Option<std::sync::Arc<std::fs::File>>,
    /// a tar archive (ADD) to extract at `dest`
    pub archive: bool,
}

/// Where sources come from.
pub struct Source<'a> {
    pub root: &'a Root,
    /// `context` or `stage NAME`: for messages
    pub what: &'static str,
    /// .dockerignore of the build context
    pub ignore: Option<&'a Matcher>,
    /// checksums of a host directory's files from earlier builds
    pub stat_cache: Option<&'a StatCache>,
}

/// Where a walk of a copied directory is: the open directory, its path
/// in the source root, relative to the copied directory, and in the image.
struct Walk<'a> {
    dir: &'a fsutil::Dir,
    /// which .dockerignore and --exclude patterns match the directory
    ignored: DirHits,
    excluded: DirHits,
    path: &'a Path,
    under: &'a Path,
    dest: &'a Path,
    depth: usize,
}

/// A directory a walk has yet to enter: its name in its parent, the
/// patterns that match it, and its paths (as in [`Walk`]).
struct Subtree {
    name: Vec<u8>,
    ignored: DirHits,
    excluded: DirHits,
    src: PathBuf,
    rel: PathBuf,
    dest: PathBuf,
}

/// How many directory levels a walk keeps open at once.
const WALK_FD_DEPTH: usize = 64;

/// How sources map to the destination.
pub struct Rules<'a> {
    /// `--exclude`
    pub excludes: &'a Matcher,
    /// `--parents`: keep the source's parent directories (from a `./` on)
    pub parents: bool,
    /// ADD: extract local tar archives named as sources
    pub unpack: bool,
}

pub fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Lexically clean a source path relative to its root: `..` cannot climb
/// above the root (as BuildKit does).
fn clean_rel(p: &str) -> PathBuf {
    PathBuf::from(clean_path(&format!("/{p}")).trim_start_matches('/'))
}

fn rel_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// For `--parents`: how many leading components of a match are dropped. A
/// `./` in the pattern marks where the kept parents start (BuildKit's
/// pivot); without one the whole path is kept.
fn parents_pivot(pattern: &str) -> usize {
    match pattern.find("/./") {
        Some(i) => clean_rel(&pattern[..i]).components().count(),
        None => 0,
    }
}
/// Whether an ADD source is a git repository.
pub fn is_git(src: &instructions::Source) -> bool {
    matches!(src, instructions::Source::Path(p) if instructions::is_git(p))
}

/// Whether an ADD source is an HTTP(S) file to download.
pub fn is_url(src: &instructions::Source) -> bool {
    matches!(src, instructions::Source::Path(p)
        if instructions::is_remote(p) && !instructions::is_git(p))
}

/// The name a URL's file gets in a destination directory: the last
/// segment of its path, or `__unnamed__` as BuildKit names it.
pub fn url_file_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    match path.rsplit('/').next() {
        Some(n) if !n.is_empty() && n != "." && n != ".." => n.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

/// A handle on a downloaded file, at its start (the entry's own handle
/// may have been read before).
fn from_start(file: &std::fs::File) -> std::io::Result<std::fs::File> {
    use std::io::Seek;
    let mut f = file.try_clone()?;
    f.rewind()?;
    Ok(f)
}

/// Metadata of a heredoc file: a regular file, 0644, time 0 (a heredoc has
/// no time of its own; a fixed one keeps the layer reproducible).
fn inline_meta(len: usize) -> Meta {
    Meta {
        mode: libc::S_IFREG | 0o644,
        uid: 0,
        gid: 0,
        size: len as u64,
        ..Meta::default()
    }
}

impl Source<'_> {
    fn ignored(&self, rel: &Path) -> bool {
        self.ignore.is_some_and(|m| m.matches(&rel_str(rel)))
    }

    /// Open a file to copy or hash. A source named in the Dockerfile may be
    /// a symlink, which is followed as BuildKit does; RESOLVE_IN_ROOT keeps
    /// that inside the root, and O_NONBLOCK keeps a fifo swapped in since
    /// the walk from blocking the build.
    fn open(&self, rel: &Path) -> std::io::Result<std::fs::File> {
        let fd = self.root.open_at(rel, libc::O_RDONLY | libc::O_NONBLOCK)?;
        let f = std::fs::File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(f)
    }

    fn read_err(&self, path: &Path, source: std::io::Error) -> Error {
        Error::Read {
            what: self.what,
            path: rel_str(path),
            source,
        }
    }

    /// `dirs` and every directory below them (symlinks not followed),
    /// each once.
    fn with_subdirs(&self, dirs: Vec<PathBuf>) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut stack = dirs;
        stack.reverse();
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if let Ok(names) = self.root.list(&d) {
                let mut subs: Vec<PathBuf> = names
                    .into_iter()
                    .map(|n| d.join(String::from_utf8_lossy(&n).into_owned()))
                    .filter(|p| self.root.lstat(p).is_ok_and(|m| m.is_dir()))
                    .collect();
                subs.sort();
                subs.reverse();
                stack.extend(subs);
            }
            out.push(d);
        }
        out
    }

    /// Every path of the root at the depth of `pattern` that matches it.
    fn glob(&self, pattern: &Path) -> Result<Vec<PathBuf>> {
        let comps: Vec<String> = pattern
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let mut level = vec![PathBuf::new()];
        for comp in &comps {
            if comp == "**" {
                // any number of directories, none included
                level = self.with_subdirs(level);
                continue;
            }
            let matcher =
                Matcher::new([comp.as_str()]).map_err(|_| Error::Pattern(comp.clone()))?;
            let mut next = Vec::new();
            for dir in &level {
                if !has_glob(comp) {
                    let p = dir.join(comp);
                    if self.root.lstat(&p).is_ok() {
                        next.push(p);
                    }
                    continue;
                }
                let Ok(names) = self.root.list(dir) else {
                    continue;
                };
                for name in names {
                    let name = String::from_utf8_lossy(&name).into_owned();
                    if matcher.matches(&name) {
                        next.push(dir.join(name));
                    }
                }
            }
            level = next;
        }
        level.retain(|p| !self.ignored(p));
        Ok(level)
    }

    /// Resolve `sources` into the entries to copy to `dest` (absolute path
    /// in the image). `dest_is_dir` when the destination names a directory
    /// (trailing `/`, or an existing directory).
    pub fn collect(
        &self,
        sources: &[instructions::Source],
        dest: &str,
        dest_is_dir: bool,
        rules: &Rules<'_>,
    ) -> Result<Vec<Entry>> {
        let dest_rel = clean_rel(dest);
        // (match, components dropped by --parents)
        let mut matches = Vec::new();
        let mut inline = Vec::new();
        for source in sources {
            match source {
                instructions::Source::Path(pattern) => {
                    let pivot = if rules.parents {
                        parents_pivot(pattern)
                    } else {
                        0
                    };
                    let found = self.matches_of(pattern, rules)?;
                    matches.extend(found.into_iter().map(|p| (p, pivot)));
                }
                instructions::Source::Heredoc { name, content } => inline.push((name, content)),
            }
        }
        // As BuildKit: several source arguments need a destination that
        // is a directory; one wildcard matching several paths makes it one.
        if sources.len() > 1 && !(dest_is_dir || rules.parents) {
            return Err(Error::DestNotDir(dest.to_string()));
        }
        let dest_is_dir = dest_is_dir || rules.parents || matches.len() + inline.len() > 1;
        let mut out = Vec::new();
        for (m, pivot) in matches {
            self.entries_of(m, pivot, &dest_rel, dest_is_dir, rules, &mut out)?;
        }
        for (name, content) in inline {
            let target = if dest_is_dir {
                dest_rel.join(name)
            } else {
                dest_rel.clone()
            };
            out.push(Entry {
                src: PathBuf::new(),
                dest: target,
                meta: inline_meta(content.len()),
                link: None,
                inline: Some(content.clone().into_bytes()),
                downloaded: None,
                archive: false,
            });
        }
        Ok(out)
    }

    /// The paths one source pattern names: a glob's matches less the
    /// `--exclude`d ones (none is an empty list), else the path itself; a
    /// path that does not exist or is ignored is an error.
    fn matches_of(&self, pattern: &str, rules: &Rules<'_>) -> Result<Vec<PathBuf>> {
        let rel = clean_rel(pattern);
        if has_glob(pattern) {
            // a wildcard that matches nothing copies nothing, as BuildKit
            return Ok(self
                .glob(&rel)?
                .into_iter()
                .filter(|p| !rules.excludes.matches(&rel_str(p)))
                .collect());
        } else if self.root.stat(&rel).is_ok() && !self.ignored(&rel) {
            return Ok(vec![rel]);
        }
        Err(Error::NotFound {
            what: self.what,
            path: pattern.to_string(),
            hint: if self.ignore.is_some() {
                " (or excluded by .dockerignore)"
            } else {
                ""
            },
        })
    }

    /// Append the entries of one matched path `m` to `out`: a directory's
    /// contents (and with `--parents` the directory itself), or the file,
    /// with `pivot` leading components dropped by `--parents`.
    fn entries_of(
        &self,
        m: PathBuf,
        pivot: usize,
        dest_rel: &Path,
        dest_is_dir: bool,
        rules: &Rules<'_>,
        out: &mut Vec<Entry>,
    ) -> Result<()> {
        // The named source itself is followed (inside the root); what is
        // below it is copied as it is, symlinks as symlinks.
        let meta = self.root.stat(&m).map_err(|e| self.read_err(&m, e))?;
        let kept: PathBuf = m.components().skip(pivot).collect();
        if meta.is_dir() {
            let into = if rules.parents {
                dest_rel.join(&kept)
            } else {
                dest_rel.to_path_buf()
            };
            if rules.parents && !kept.as_os_str().is_empty() {
                // The kept directory itself, with its own mode.
                out.push(Entry {
                    src: m.clone(),
                    dest: into.clone(),
                    meta,
                    link: None,
                    inline: None,
                    downloaded: None,
                    archive: false,
                });
            }
            return self.walk_from(&m, &into, rules.excludes, out);
        }
        let name = m.file_name().map(PathBuf::from).unwrap_or_default();
        let archive = rules.unpack && meta.is_file() && self.is_archive(&m)?;
        let target = if archive {
            // An archive is extracted into the destination directory.
            dest_rel.to_path_buf()
        } else if rules.parents {
            dest_rel.join(&kept)
        } else if dest_is_dir {
            dest_rel.join(name)
        } else {
            dest_rel.to_path_buf()
        };
        out.push(Entry {
            src: m,
            dest: target,
            meta,
            link: None,
            inline: None,
            downloaded: None,
            archive,
        });
        Ok(())
    }

    /// Append every entry under the directory `path` to `out`, at `dest`.
    fn walk_from(
        &self,
        path: &Path,
        dest: &Path,
        excludes: &Matcher,
        out: &mut Vec<Entry>,
    ) -> Result<()> {
        let dir = self.root.dir(path).map_err(|e| self.read_err(path, e))?;
        let at = Walk {
            dir: &dir,
            ignored: self
                .ignore
                .map(|m| m.dir_hits(&rel_str(path)))
                .unwrap_or_default(),
            excluded: excludes.no_hits(),
            path,
            under: Path::new(""),
            dest,
            depth: 0,
        };
        self.walk(&at, excludes, out)
    }

    /// Append every entry under `at.dir` to `out`, at `at.dest`. `at.under`
    /// is the path relative to the copied directory, which `--exclude`
    /// patterns match (as BuildKit's fsutil does). Names are looked up in
    /// their open directory (see [`fsutil::Dir`]); below
    /// [`WALK_FD_DEPTH`] levels a directory is opened from the root
    /// instead, so a deep tree cannot use up the descriptors.
    fn walk(&self, at: &Walk<'_>, excludes: &Matcher, out: &mut Vec<Entry>) -> Result<()> {
        let names = at.dir.list().map_err(|e| self.read_err(at.path, e))?;
        // this directory's entries, each with its subtree when it has one
        let mut pending = Vec::with_capacity(names.len());
        for name in names {
            let os_name = OsString::from_vec(name);
            let src = at.path.join(&os_name);
            let rel = at.under.join(&os_name);
            let rel_under = at.dest.join(&os_name);
            let (src_str, rel_str) = (rel_str(&src), rel_str(&rel));
            if self
                .ignore
                .is_some_and(|m| m.matches_in(&at.ignored, &src_str))
                || excludes.matches_in(&at.excluded, &rel_str)
            {
                continue;
            }
            let name = os_name.as_bytes();
            let meta = at.dir.lstat(name).map_err(|e| self.read_err(&src, e))?;
            let link = if meta.is_symlink() {
                Some(at.dir.read_link(name).map_err(|e| self.read_err(&src, e))?)
            } else {
                None
            };
            let subtree = meta.is_dir().then(|| Subtree {
                name: name.to_vec(),
                ignored: self
                    .ignore
                    .map(|m| m.child_hits(&at.ignored, &src_str))
                    .unwrap_or_default(),
                excluded: excludes.child_hits(&at.excluded, &rel_str),
                src: src.clone(),
                rel,
                dest: rel_under.clone(),
            });
            let entry = Entry {
                src,
                dest: rel_under,
                meta,
                link,
                inline: None,
                downloaded: None,
                archive: false,
            };
            pending.push((entry, subtree));
        }
        // The top level's subtrees are walked on every core, then put in
        // their places: the entries come out in the same order either way.
        let subtrees: Vec<&Subtree> = pending.iter().filter_map(|(_, s)| s.as_ref()).collect();
        if at.depth == 0 && subtrees.len() > 1 {
            let walked = parallel_map(&subtrees, 1, |s| {
                let mut v = Vec::new();
                self.descend(at, s, excludes, &mut v).map(|()| v)
            });
            let mut walked = walked.into_iter();
            for (entry, subtree) in pending {
                out.push(entry);
                if subtree.is_some() {
                    out.extend(walked.next().expect("a walk per subtree")?);
                }
            }
            return Ok(());
        }
        for (entry, subtree) in pending {
            out.push(entry);
            if let Some(s) = subtree {
                self.descend(at, &s, excludes, out)?;
            }
        }
        Ok(())
    }

    /// Walk the subdirectory `s` of the directory `at` is in.
    fn descend(
        &self,
        at: &Walk<'_>,
        s: &Subtree,
        excludes: &Matcher,
        out: &mut Vec<Entry>,
    ) -> Result<()> {
        let sub = if at.depth < WALK_FD_DEPTH {
            at.dir.subdir(&s.name)
        } else {
            self.root.dir(&s.src)
        }
        .map_err(|e| self.read_err(&s.src, e))?;
        let next = Walk {
            dir: &sub,
            ignored: s.ignored.clone(),
            excluded: s.excluded.clone(),
            path: &s.src,
            under: &s.rel,
            dest: &s.dest,
            depth: at.depth + 1,
        };
        self.walk(&next, excludes, out)
    }

    /// Whether the file `rel` is a tar archive, plain or compressed: the
    /// compression is told by magic bytes and the first decompressed block
    /// must be a tar header with a valid checksum (BuildKit also decides
    /// by content, never by the file name).
    fn is_archive(&self, rel: &Path) -> Result<bool> {
        let f = self.open(rel).map_err(|e| self.read_err(rel, e))?;
        Ok(starts_a_tar(f))
    }

    /// Add the content checksum of `entries` to a cache key: destination
    /// path, type, permission bits, size, link target and bytes. Owners
    /// and times are not in it (COPY sets the owner, as BuildKit does; an
    /// archive's owners are in its bytes). Files the stat cache does not
    /// know are hashed on every core. Returns how many bytes were read.
    pub fn checksum(&self, entries: &[Entry], key: &mut KeyBuilder) -> Result<u64> {
        // (entry, its digest when the stat cache has it)
        let mut known = vec![None; entries.len()];
        let mut todo = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.link.is_some() || e.inline.is_some() || !e.meta.is_file() {
                continue;
            }
            let cache = self.stat_cache.filter(|_| e.downloaded.is_none());
            match cache.and_then(|c| c.get(&e.src, &e.meta)) {
                Some(d) => known[i] = Some(d),
                None => todo.push(i),
            }
        }
        let hashed = parallel_map(&todo, 16, |&i| self.hash_file(&entries[i]));
        let mut read = 0u64;
        for (i, r) in todo.iter().zip(hashed) {
            let (digest, n) = r?;
            known[*i] = Some(digest);
            read += n;
        }
        for (e, digest) in entries.iter().zip(&known) {
            key.str(&rel_str(&e.dest));
            key.part(&(e.meta.mode & (libc::S_IFMT | 0o7777)).to_le_bytes());
            key.part(&[u8::from(e.archive)]);
            if let Some(l) = &e.link {
                key.part(l);
            } else if let Some(bytes) = &e.inline {
                key.part(&Sha256::digest(bytes));
            } else if let Some(d) = digest {
                key.part(d);
            }
        }
        Ok(read)
    }

    /// The bytes of a file entry: a downloaded file from its start, else
    /// the source's file.
    fn open_entry(&self, e: &Entry) -> Result<std::fs::File> {
        match &e.downloaded {
            Some(file) => from_start(file),
            None => self.open(&e.src),
        }
        .map_err(|err| self.read_err(&e.src, err))
    }

    /// The sha256 of a file entry's bytes and their length; remembered in
    /// the stat cache when it may be.
    fn hash_file(&self, e: &Entry) -> Result<([u8; 32], u64)> {
        let mut f = self.open_entry(e)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut read = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|err| self.read_err(&e.src, err))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            read += n as u64;
        }
        let digest: [u8; 32] = h.finalize().into();
        let cache = self.stat_cache.filter(|_| e.downloaded.is_none());
        if let (Some(c), Ok(now)) = (cache, f.metadata()) {
            c.put(&e.src, &e.meta, &now, digest);
        }
        Ok((digest, read))
    }
}

/// A reader of the decompressed stream of `f`: gzip, bzip2, xz or zstd by
/// magic bytes, else the plain bytes.
fn archive_reader(f: std::fs::File) -> std::io::Result<Box<dyn Read>> {
    use kiln_snapshotter::compression::{decoder, Detected};
    let mut r = BufReader::new(f);
    let head = r.fill_buf()?.to_vec();
    Ok(if head.starts_with(b"BZh") {
        Box::new(bzip2::bufread::MultiBzDecoder::new(r))
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(r))
    } else if head.starts_with(&[0x1f, 0x8b]) {
        decoder(r, Detected::Gzip)?
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        decoder(r, Detected::Zstd)?
    } else {
        Box::new(r)
    })
}

/// A tar header block: not all zero, and its checksum field (octal, at
/// 148..156) equals the sum of its bytes with that field read as spaces.
fn tar_header_ok(block: &[u8; 512]) -> bool {
    if block.iter().all(|&b| b == 0) {
        return false;
    }
    let field = &block[148..156];
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let Ok(want) = u32::from_str_radix(text.trim(), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    sum == want
}

/// The `--chmod` of a COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Octal(u32),
    Symbolic(Vec<Clause>),
}

/// One comma-separated clause of a symbolic mode: `who op perms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    /// bits of the classes named (`u`, `g`, `o`; none means all)
    who: u32,
    ops: Vec<(char, Perms)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Perms {
    /// `rwxXst` letters
    Letters(String),
    /// copy another class's bits: `g=u`
    Copy(char),
}

/// Read, write, execute bits of each class, and the special bit it owns.
const CLASSES: [(char, u32, u32); 3] = [
    ('u', 0o700, 0o4000),
    ('g', 0o070, 0o2000),
    ('o', 0o007, 0o1000),
];

impl Mode {
    /// Parse `--chmod`: octal, or symbolic as chmod(1) takes it.
    pub fn parse(c: &Chmod) -> Result<Mode> {
        let s = match c {
            Chmod::Octal(m) => return Ok(Mode::Octal(*m)),
            Chmod::Symbolic(s) => s,
        };
        let bad = || Error::BadChmod(s.clone());
        let mut clauses = Vec::new();
        for clause in s.split(',') {
            let rest = clause.trim_start_matches(['u', 'g', 'o', 'a']);
            let who_text = &clause[..clause.len() - rest.len()];
            let mut who = 0;
            for ch in who_text.chars() {
                who |= match ch {
                    'u' => 0o4700,
                    'g' => 0o2070,
                    'o' => 0o1007,
                    _ => 0o7777,
                };
            }
            if who == 0 {
                who = 0o7777;
            }
            let mut ops = Vec::new();
            let mut rest = rest;
            while let Some(op) = rest.chars().next() {
                if !matches!(op, '+' | '-' | '=') {
                    return Err(bad());
                }
                let r = &rest[1..];
                let end = r.find(['+', '-', '=']).unwrap_or(r.len());
                let perms = &r[..end];
                let p = if perms.len() == 1 && "ugo".contains(perms) {
                    Perms::Copy(perms.chars().next().unwrap_or('u'))
                } else if perms.chars().all(|c| "rwxXst".contains(c)) {
                    Perms::Letters(perms.to_string())
                } else {
                    return Err(bad());
                };
                ops.push((op, p));
                rest = &r[end..];
            }
            if ops.is_empty() {
                return Err(bad());
            }
            clauses.push(Clause { who, ops });
        }
        Ok(Mode::Symbolic(clauses))
    }

    /// The permission bits a file of mode `mode` gets (`X`: execute only
    /// for a directory or a file some class may already execute).
    pub fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let clauses = match self {
            Mode::Octal(m) => return *m & 0o7777,
            Mode::Symbolic(c) => c,
        };
        let mut m = mode & 0o7777;
        for clause in clauses {
            for (op, perms) in &clause.ops {
                let bits = match perms {
                    Perms::Letters(l) => {
                        let mut b = 0;
                        for ch in l.chars() {
                            b |= match ch {
                                'r' => 0o444,
                                'w' => 0o222,
                                'x' => 0o111,
                                'X' if is_dir || m & 0o111 != 0 => 0o111,
                                's' => 0o6000,
                                't' => 0o1000,
                                _ => 0,
                            };
                        }
                        b
                    }
                    Perms::Copy(from) => {
                        let (_, rwx, _) = CLASSES
                            .iter()
                            .find(|(c, _, _)| c == from)
                            .copied()
                            .unwrap_or(CLASSES[0]);
                        let shift = rwx.trailing_zeros();
                        let v = (m & rwx) >> shift;
                        v * 0o111
                    }
                } & clause.who;
                match op {
                    '+' => m |= bits,
                    '-' => m &= !bits,
                    _ => {
                        // `=`: the classes named get exactly these bits; a
                        // directory keeps its set-id bits, as chmod(1) does.
                        let mut clear = clause.who;
                        if is_dir {
                            clear &= !0o6000;
                        }
                        m = (m & !clear) | bits;
                    }
                }
            }
        }
        m
    }
}

/// Owner and mode rules of one COPY.
pub struct CopyAttrs<'a> {
    /// `--chown` resolved; None: 0:0 for sources, the archive's owners for
    /// the contents of an extracted archive
    pub owner: Option<(u32, u32)>,
    pub chmod: Option<Mode>,
    /// scratch directory (on the state's file system) archives are
    /// extracted in
    pub tmp: &'a Path,
    /// a unique name for each scratch directory
    pub unique: &'a dyn Fn() -> String,
    /// without `--chown`, keep the sources' owners (COPY --from a stage
    /// or an image, as BuildKit) instead of 0:0
    pub keep_owner: bool,
}

/// Copy `entries` from `source` into `target`.
pub fn copy(
    source: &Source<'_>,
    entries: &[Entry],
    target: &Root,
    attrs: &CopyAttrs<'_>,
) -> Result<()> {
    copy_entries(source, entries, target, attrs, attrs.keep_owner, false)
}

/// With `through_links` (an archive's contents), a directory whose
/// destination is a symlink to a directory in the image (`var/run ->
/// /run`) is written through the link, as docker's untar resolves the
/// paths it writes, instead of replacing it.
fn copy_entries(
    source: &Source<'_>,
    entries: &[Entry],
    target: &Root,
    attrs: &CopyAttrs<'_>,
    keep_owner: bool,
    through_links: bool,
) -> Result<()> {
    // Regular files are written last, on every core, once their
    // directories exist; only when no two entries share a destination and
    // no archive is unpacked, so the order of writes cannot matter.
    let parallel = entries.len() >= 64 && !entries.iter().any(|e| e.archive) && {
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        entries.iter().all(|e| seen.insert(e.dest.as_path()))
    };
    let mut files = Vec::new();
    // the parents a numeric --chmod's copy makes get its mode
    let parent_mode = match &attrs.chmod {
        Some(Mode::Octal(m)) => Some(*m),
        _ => None,
    };
    for e in entries {
        let werr = write_err(e);
        let (uid, gid) = match attrs.owner {
            Some(ids) => ids,
            None if keep_owner => (e.meta.uid, e.meta.gid),
            None => (0, 0),
        };
        let (puid, pgid) = attrs.owner.unwrap_or((0, 0));
        if e.archive {
            target.mkdir_all(&e.dest, puid, pgid).map_err(werr)?;
            extract(source, e, target, attrs)?;
            continue;
        }
        let (parent, name) = fsutil::split(&e.dest);
        let dir = target
            .mkdir_dest(parent, puid, pgid, parent_mode)
            .map_err(werr)?;
        let mode = match &attrs.chmod {
            Some(m) => m.apply(e.meta.mode, e.meta.is_dir()),
            None => e.meta.mode & 0o7777,
        };
        let dirfd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        if name.is_empty() || e.dest.as_os_str().is_empty() {
            continue;
        }
        if let Some(link) = &e.link {
            fsutil::create(dirfd, name, Node::Symlink(link), 0o777, uid, gid, &e.meta)
                .map_err(werr)?;
        } else if let Some(bytes) = &e.inline {
            fsutil::create(dirfd, name, Node::Bytes(bytes), mode, uid, gid, &e.meta)
                .map_err(werr)?;
        } else if e.meta.is_dir() {
            if through_links && target.is_link_to_dir(&e.dest) {
                continue;
            }
            fsutil::create(dirfd, name, Node::Dir, mode, uid, gid, &e.meta).map_err(werr)?;
        } else if e.meta.is_file() && parallel {
            files.push((e, mode, uid, gid));
        } else if e.meta.is_file() {
            copy_file(source, e, dirfd, name, (mode, uid, gid))?;
        } else if e.meta.mode & libc::S_IFMT == libc::S_IFSOCK {
            // a socket becomes an empty regular file, as BuildKit copies it
            fsutil::create(dirfd, name, Node::Bytes(&[]), mode, uid, gid, &e.meta).map_err(werr)?;
        }
        // Devices and fifos in a context are skipped: an unprivileged
        // copy cannot make a device, and BuildKit's rootless one neither.
    }
    let written = parallel_map(&files, 16, |&(e, mode, uid, gid)| {
        let (parent, name) = fsutil::split(&e.dest);
        let dir = target
            .open_at(parent, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(write_err(e))?;
        let dirfd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        copy_file(source, e, dirfd, name, (mode, uid, gid))
    });
    written.into_iter().collect()
}

/// Write the regular file `e` as `name` in the directory `dirfd`.
fn copy_file(
    source: &Source<'_>,
    e: &Entry,
    dirfd: std::os::fd::RawFd,
    name: &std::ffi::OsStr,
    (mode, uid, gid): (u32, u32, u32),
) -> Result<()> {
    let mut f = source.open_entry(e)?;
    fsutil::create(dirfd, name, Node::File(&mut f), mode, uid, gid, &e.meta).map_err(write_err(e))
}

/// The error of writing entry `e` into the image.
fn write_err(e: &Entry) -> impl Fn(std::io::Error) -> Error + Copy + '_ {
    move |source| Error::Write {
        path: format!("/{}", rel_str(&e.dest)),
        source,
    }
}

/// Extract the archive `e` into `target` at `e.dest`: the snapshotter's
/// applier writes it into a fresh scratch directory (refusing any entry
/// that would leave it), then the tree is copied as a source.
fn extract(source: &Source<'_>, e: &Entry, target: &Root, attrs: &CopyAttrs<'_>) -> Result<()> {
    let name = rel_str(&e.src);
    let scratch = attrs.tmp.join((attrs.unique)());
    let scratch_err = |source| Error::Scratch {
        path: scratch.clone(),
        archive: name.clone(),
        source,
    };
    std::fs::create_dir_all(attrs.tmp).map_err(scratch_err)?;
    std::fs::create_dir(&scratch).map_err(scratch_err)?;
    let result = (|| {
        let f = source.open_entry(e)?;
        let stream = archive_reader(f).map_err(|err| source.read_err(&e.src, err))?;
        kiln_snapshotter::apply::apply(stream, &scratch, &[]).map_err(|err| Error::Archive {
            path: name.clone(),
            source: Box::new(err),
        })?;
        let root = Root::open(&scratch).map_err(scratch_err)?;
        let tree = Source {
            root: &root,
            what: "archive",
            ignore: None,
            stat_cache: None,
        };
        let mut entries = Vec::new();
        tree.walk_from(Path::new(""), &e.dest, &Matcher::default(), &mut entries)?;
        copy_entries(&tree, &entries, target, attrs, true, true)
    })();
    // The scratch tree only ever held the archive's contents; a leftover is
    // cleaned by the snapshotter's tmp sweep.
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Whether the downloaded entry `e` (`ADD --unpack=true <url>`) is a tar
/// archive, plain or compressed, told by its content as for local ones.
pub fn downloaded_archive(e: &Entry) -> Result<bool> {
    let Some(file) = &e.downloaded else {
        return Ok(false);
    };
    let path = || rel_str(&e.dest);
    let f = from_start(file).map_err(|source| Error::Write {
        path: path(),
        source,
    })?;
    Ok(starts_a_tar(f))
}

/// Whether `f`, decompressed if it is, starts with a valid tar header.
fn starts_a_tar(f: std::fs::File) -> bool {
    let Ok(mut reader) = archive_reader(f) else {
        return false;
    };
    let mut block = [0u8; 512];
    let mut n = 0;
    while n < block.len() {
        match reader.read(&mut block[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n == block.len() && tar_header_ok(&block)
}

/// Resolve `--chown` against the destination's /etc/passwd and
/// /etc/group. Numeric ids need no lookup; a user alone sets gid = uid, as
/// BuildKit does.
pub fn chown_ids(
    rootfs: &Path,
    spec: &str,
) -> std::result::Result<(u32, u32), kiln_runtime::Error> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let numeric = |s: &str| s.parse::<u32>().ok();
    let uid = match numeric(user) {
        Some(u) => u,
        None => kiln_runtime::user::resolve(rootfs, user)?.uid,
    };
    let gid = match group {
        None => uid,
        Some(g) => match numeric(g) {
            Some(g) => g,
            None => kiln_runtime::user::resolve(rootfs, &format!("{uid}:{g}"))?.gid,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str) -> Mode {
        Mode::parse(&Chmod::Symbolic(s.into())).unwrap()
    }

    #[test]
    fn symbolic_chmod_follows_chmod_1() {
        let m = sym("u=rwX,go=rX");
        assert_eq!(m.apply(0o600, false), 0o644);
        assert_eq!(m.apply(0o700, false), 0o755);
        assert_eq!(m.apply(0o700, true), 0o755);
        assert_eq!(m.apply(0o000, true), 0o755);
        assert_eq!(sym("a+x").apply(0o644, false), 0o755);
        assert_eq!(sym("+x").apply(0o644, false), 0o755);
        assert_eq!(sym("go-w").apply(0o666, false), 0o644);
        assert_eq!(sym("u+s").apply(0o755, false), 0o4755);
        assert_eq!(sym("g=u").apply(0o640, false), 0o660);
        assert_eq!(sym("o=").apply(0o777, false), 0o770);
        assert_eq!(sym("u=rw,g=r,o=").apply(0o777, false), 0o640);
        assert!(Mode::parse(&Chmod::Symbolic("u=q".into())).is_err());
        assert_eq!(
            Mode::parse(&Chmod::Octal(0o751))
                .unwrap()
                .apply(0o644, true),
            0o751
        );
    }

    #[test]
    fn tar_headers_are_told_from_other_bytes() {
        let mut h = tar::Header::new_ustar();
        h.set_path("a.txt").unwrap();
        h.set_size(0);
        h.set_cksum();
        let block: &[u8; 512] = h.as_bytes();
        assert!(tar_header_ok(block));
        let mut text = [b'x'; 512];
        text[..5].copy_from_slice(b"hello");
        assert!(!tar_header_ok(&text));
        assert!(!tar_header_ok(&[0; 512]));
    }

    #[test]
    fn url_file_names_come_from_the_path() {
        assert_eq!(url_file_name("https://h/a/b.tgz"), "b.tgz");
        assert_eq!(url_file_name("http://h:80/x.txt?q=1#f"), "x.txt");
        assert_eq!(url_file_name("https://h/"), "__unnamed__");
        assert_eq!(url_file_name("https://h"), "__unnamed__");
    }

    #[test]
    fn parents_pivot_is_the_dot_slash() {
        assert_eq!(parents_pivot("a/b/c.txt"), 0);
        assert_eq!(parents_pivot("a/./b/c.txt"), 1);
        assert_eq!(parents_pivot("x/y/./z"), 2);
        assert_eq!(parents_pivot("./a"), 0);
    }

    fn dests(entries: &[Entry]) -> Vec<String> {
        entries.iter().map(|e| rel_str(&e.dest)).collect()
    }

    /// Pre-order, names sorted: the order a walk must give.
    fn sorted_tree(dir: &Path, rel: &Path, out: &mut Vec<String>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            out.push(rel_str(&Path::new("c").join(&r)));
            if dir.join(&n).is_dir() {
                sorted_tree(&dir.join(&n), &r, out);
            }
        }
    }

    #[test]
    fn a_walk_on_every_core_gives_the_entries_in_tree_order() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path();
        for i in 0..40 {
            for j in 0..3 {
                let d = ctx.join(format!("top{i:02}/mid{j}/deep"));
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("f"), "x").unwrap();
                std::fs::write(ctx.join(format!("top{i:02}/mid{j}/g")), "y").unwrap();
            }
            std::fs::write(ctx.join(format!("file{i:02}")), "z").unwrap();
        }
        std::fs::write(ctx.join(".dockerignore"), "top03/mid1\n*/mid2/deep/f\n").unwrap();
        let root = Root::open(ctx).unwrap();
        let ignore = Matcher::new(["top03/mid1", "*/mid2/deep/f"]).unwrap();
        let source = Source {
            root: &root,
            what: "build context",
            ignore: Some(&ignore),
            stat_cache: None,
        };
        let none = Matcher::default();
        let rules = Rules {
            excludes: &none,
            parents: false,
            unpack: false,
        };
        let got = source
            .collect(
                &[instructions::Source::Path(".".into())],
                "/c",
                true,
                &rules,
            )
            .unwrap();
        let mut want = Vec::new();
        sorted_tree(ctx, Path::new(""), &mut want);
        want.retain(|p| !p.starts_with("c/top03/mid1") && !(p.contains("/mid2/deep/f")));
        assert_eq!(dests(&got), want);
    }

    #[test]
    fn collect_maps_sources_to_destinations() {
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path();
        std::fs::create_dir_all(ctx.join("dir/sub")).unwrap();
        std::fs::write(ctx.join("dir/a.txt"), "a").unwrap();
        std::fs::write(ctx.join("dir/x.log"), "x").unwrap();
        std::fs::write(ctx.join("dir/sub/b.md"), "b").unwrap();
        let root = Root::open(ctx).unwrap();
        let source = Source {
            root: &root,
            what: "build context",
            ignore: None,
            stat_cache: None,
        };
        let path = |p: &str| instructions::Source::Path(p.into());
        let none = Matcher::default();
        let plain = Rules {
            excludes: &none,
            parents: false,
            unpack: false,
        };
        // A directory's contents, not the directory.
        let e = source.collect(&[path("dir")], "/d", false, &plain).unwrap();
        assert_eq!(dests(&e), ["d/a.txt", "d/sub", "d/sub/b.md", "d/x.log"]);
        // A file to a file, or into a directory.
        let e = source
            .collect(&[path("dir/a.txt")], "/f", false, &plain)
            .unwrap();
        assert_eq!(dests(&e), ["f"]);
        let e = source
            .collect(&[path("dir/a.txt")], "/f", true, &plain)
            .unwrap();
        assert_eq!(dests(&e), ["f/a.txt"]);
        // Excludes match below the copied directory.
        let ex = Matcher::new(["*.log", "sub/*.md"]).unwrap();
        let rules = Rules {
            excludes: &ex,
            parents: false,
            unpack: false,
        };
        let e = source
            .collect(&[path("dir/")], "/d/", true, &rules)
            .unwrap();
        assert_eq!(dests(&e), ["d/a.txt", "d/sub"]);
        // --parents keeps parents from the `./` on.
        let parents = Rules {
            excludes: &none,
            parents: true,
            unpack: false,
        };
        let e = source
            .collect(
                &[path("dir/./sub/b.md"), path("dir/a.txt")],
                "/p",
                false,
                &parents,
            )
            .unwrap();
        assert_eq!(dests(&e), ["p/sub/b.md", "p/dir/a.txt"]);
        // Several sources need a directory; a missing one is named.
        let err = source
            .collect(&[path("dir/a.txt"), path("dir/x.log")], "/f", false, &plain)
            .unwrap_err();
        assert!(matches!(err, Error::DestNotDir(_)), "{err}");
        let err = source
            .collect(&[path("nope.txt")], "/f", false, &plain)
            .unwrap_err();
        assert!(err.to_string().contains("nope.txt"), "{err}");
        // Heredocs are named by the destination or their delimiter.
        let doc = instructions::Source::Heredoc {
            name: "EOF".into(),
            content: "hi\n".into(),
        };
        let e = source
            .collect(std::slice::from_ref(&doc), "/h", false, &plain)
            .unwrap();
        assert_eq!(dests(&e), ["h"]);
        assert_eq!(e[0].inline.as_deref(), Some(b"hi\n".as_slice()));
        let e = source.collect(&[doc], "/h/", true, &plain).unwrap();
        assert_eq!(dests(&e), ["h/EOF"]);
    }
}
