//! COPY and ADD: which files a step copies (resolved inside the context or
//! the source stage, never following a symlink out of it), their content
//! checksum for the cache key, and the copy itself into a step's view.

use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::cache::KeyBuilder;
use super::fsutil::{self, Meta, Node, Root};
use super::state::clean_path;
use crate::frontend::dockerignore::Matcher;

/// Errors of resolving and copying sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {path:?} not found{hint}")]
    NotFound {
        what: &'static str,
        path: String,
        hint: &'static str,
    },
    #[error("cannot read {path:?} from the {what}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path} in the image: {source}")]
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
    #[error("symbolic --chmod ({0}) is not supported yet: use an octal mode such as 0755")]
    SymbolicChmod(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One thing to copy.
#[derive(Debug, Clone)]
pub struct Entry {
    /// path inside the source root
    pub src: PathBuf,
    /// path inside the destination root
    pub dest: PathBuf,
    pub meta: Meta,
    pub link: Option<Vec<u8>>,
}

/// Where sources come from.
pub struct Source<'a> {
    pub root: &'a Root,
    /// `context` or `stage NAME`: for messages
    pub what: &'static str,
    /// .dockerignore of the build context
    pub ignore: Option<&'a Matcher>,
}

fn has_glob(s: &str) -> bool {
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

impl Source<'_> {
    fn ignored(&self, rel: &Path) -> bool {
        self.ignore.is_some_and(|m| m.matches(&rel_str(rel)))
    }

    fn read_err(&self, path: &Path, source: std::io::Error) -> Error {
        Error::Read {
            what: self.what,
            path: rel_str(path),
            source,
        }
    }

    /// Every path of the root at the depth of `pattern` that matches it.
    fn glob(&self, pattern: &Path) -> Result<Vec<PathBuf>> {
        let comps: Vec<String> = pattern
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let mut level = vec![PathBuf::new()];
        for comp in &comps {
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

    /// Resolve `patterns` into the entries to copy to `dest` (absolute
    /// path in the image). `dest_is_dir` when the destination names a
    /// directory (trailing `/`, or an existing directory).
    pub fn collect(
        &self,
        patterns: &[String],
        dest: &str,
        dest_is_dir: bool,
        excludes: &Matcher,
    ) -> Result<Vec<Entry>> {
        let dest_rel = clean_rel(dest);
        let mut matches = Vec::new();
        for pattern in patterns {
            let rel = clean_rel(pattern);
            let found = if has_glob(pattern) {
                self.glob(&rel)?
            } else if self.root.stat(&rel).is_ok() && !self.ignored(&rel) {
                vec![rel.clone()]
            } else {
                Vec::new()
            };
            if found.is_empty() {
                return Err(Error::NotFound {
                    what: self.what,
                    path: pattern.clone(),
                    hint: if self.ignore.is_some() {
                        " (or excluded by .dockerignore)"
                    } else {
                        ""
                    },
                });
            }
            matches.extend(found);
        }
        let many = matches.len() > 1 || patterns.len() > 1;
        if many && !dest_is_dir {
            return Err(Error::DestNotDir(dest.to_string()));
        }
        let mut out = Vec::new();
        for m in matches {
            // The named source itself is followed (inside the root); what
            // is below it is copied as it is, symlinks as symlinks.
            let meta = self.root.stat(&m).map_err(|e| self.read_err(&m, e))?;
            if meta.is_dir() {
                self.walk(&m, &dest_rel, excludes, &mut out)?;
            } else {
                let name = m.file_name().map(PathBuf::from).unwrap_or_default();
                let target = if dest_is_dir || many {
                    dest_rel.join(name)
                } else {
                    dest_rel.clone()
                };
                out.push(Entry {
                    src: m,
                    dest: target,
                    meta,
                    link: None,
                });
            }
        }
        Ok(out)
    }

    fn walk(
        &self,
        dir: &Path,
        dest: &Path,
        excludes: &Matcher,
        out: &mut Vec<Entry>,
    ) -> Result<()> {
        let names = self.root.list(dir).map_err(|e| self.read_err(dir, e))?;
        for name in names {
            let name = std::ffi::OsString::from_vec(name);
            let src = dir.join(&name);
            let rel_under = dest.join(&name);
            if self.ignored(&src) || excludes.matches(&rel_str(&src)) {
                continue;
            }
            let meta = self.root.lstat(&src).map_err(|e| self.read_err(&src, e))?;
            let link = if meta.is_symlink() {
                Some(
                    self.root
                        .read_link(&src)
                        .map_err(|e| self.read_err(&src, e))?,
                )
            } else {
                None
            };
            out.push(Entry {
                src: src.clone(),
                dest: rel_under.clone(),
                meta,
                link,
            });
            if meta.is_dir() {
                self.walk(&src, &rel_under, excludes, out)?;
            }
        }
        Ok(())
    }

    /// Add the content checksum of `entries` to a cache key: destination
    /// path, type, permission bits, size, link target and bytes. Owners
    /// and times are not in it (COPY sets the owner, as BuildKit does).
    pub fn checksum(&self, entries: &[Entry], key: &mut KeyBuilder) -> Result<()> {
        for e in entries {
            key.str(&rel_str(&e.dest));
            key.part(&(e.meta.mode & (libc::S_IFMT | 0o7777)).to_le_bytes());
            if let Some(l) = &e.link {
                key.part(l);
            } else if e.meta.is_file() {
                let mut f = self
                    .root
                    .open_file(&e.src)
                    .map_err(|err| self.read_err(&e.src, err))?;
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf).map_err(|err| self.read_err(&e.src, err))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                key.part(&h.finalize());
            }
        }
        Ok(())
    }
}

/// Owner and mode rules of one COPY.
pub struct CopyAttrs {
    pub uid: u32,
    pub gid: u32,
    /// octal `--chmod` for files and directories
    pub chmod: Option<u32>,
}

/// Copy `entries` from `source` into `target`.
pub fn copy(
    source: &Source<'_>,
    entries: &[Entry],
    target: &Root,
    attrs: &CopyAttrs,
) -> Result<()> {
    for e in entries {
        let (parent, name) = fsutil::split(&e.dest);
        let werr = |source| Error::Write {
            path: format!("/{}", rel_str(&e.dest)),
            source,
        };
        let dir = target
            .mkdir_all(parent, attrs.uid, attrs.gid)
            .map_err(werr)?;
        let mode = attrs.chmod.unwrap_or(e.meta.mode & 0o7777);
        let dirfd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        if name.is_empty() || e.dest.as_os_str().is_empty() {
            continue;
        }
        if let Some(link) = &e.link {
            fsutil::create(
                dirfd,
                name,
                Node::Symlink(link),
                0o777,
                attrs.uid,
                attrs.gid,
                &e.meta,
            )
            .map_err(werr)?;
        } else if e.meta.is_dir() {
            fsutil::create(dirfd, name, Node::Dir, mode, attrs.uid, attrs.gid, &e.meta)
                .map_err(werr)?;
        } else if e.meta.is_file() {
            let mut f = source
                .root
                .open_file(&e.src)
                .map_err(|err| source.read_err(&e.src, err))?;
            fsutil::create(
                dirfd,
                name,
                Node::File(&mut f),
                mode,
                attrs.uid,
                attrs.gid,
                &e.meta,
            )
            .map_err(werr)?;
        }
        // Devices, fifos and sockets in a context are skipped, as BuildKit
        // does for special files it cannot recreate.
    }
    Ok(())
}

/// Parse an octal `--chmod`.
pub fn chmod_bits(c: &crate::frontend::instructions::Chmod) -> Result<u32> {
    match c {
        crate::frontend::instructions::Chmod::Octal(m) => Ok(*m),
        crate::frontend::instructions::Chmod::Symbolic(s) => Err(Error::SymbolicChmod(s.clone())),
    }
}
