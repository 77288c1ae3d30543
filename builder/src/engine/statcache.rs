//! The stat cache: content checksums of a build context's files, kept
//! between builds so that a rebuild hashes only the files that changed (as
//! BuildKit's fsutil and git's index do).
//!
//! An entry maps a path in the context to the sha256 of its bytes and is
//! used only while the file's stat still matches on every field a change
//! moves: size, mtime, ctime, inode, device and mode. ctime is set by the
//! kernel on every write, chmod, rename or link and no unprivileged process
//! can set it back, so a file whose stat matches still has the bytes that
//! were hashed. Two rules close the races:
//! - a file changed within [`RACY_SECS`] of the build's first use of the
//!   cache (before any of its hashing) is hashed but not remembered: a
//!   write in the same clock tick as an earlier one could leave its ctime
//!   unchanged (git's "racily clean" problem);
//! - an entry is remembered only when the open file still has the stat the
//!   walk saw, so bytes read after a change are never filed under the stat
//!   from before it.
//!
//! One file per context directory, `<state>/statcache/<id>`, named by the
//! sha256 of the context's path, device and inode. It is a cache: a file
//! that is unreadable, too large or malformed is ignored and rewritten.
//! Files unused for [`KEEP_DAYS`] days are removed when another is saved.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::fsutil::Meta;

/// Changes this close to the cache's opening are not remembered.
pub const RACY_SECS: i64 = 2;
/// A context's cache file is removed after this many days unused.
pub const KEEP_DAYS: u64 = 7;
/// At most this many contexts' cache files are kept.
pub const KEEP_FILES: usize = 32;
/// Larger cache files are ignored.
const MAX_FILE: u64 = 128 << 20;
/// Beyond this many entries a save keeps only those the build used (a
/// context whose files come and go would otherwise grow its cache without
/// end): about 70 MB of cache file for paths of 40 bytes.
const MAX_ENTRIES: usize = 500_000;
const MAGIC: &[u8] = b"kiln-statcache-1\n";
/// path length, then 7 numbers, the mode and the digest
const FIXED: usize = 4 + 7 * 8 + 4 + 32;

/// The stat fields an entry is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
    ino: u64,
    dev: u64,
    mode: u32,
}

impl Stamp {
    fn of(m: &Meta) -> Stamp {
        Stamp {
            size: m.size,
            mtime: m.mtime,
            mtime_nsec: m.mtime_nsec,
            ctime: m.ctime,
            ctime_nsec: m.ctime_nsec,
            ino: m.ino,
            dev: m.dev,
            mode: m.mode,
        }
    }

    fn of_file(f: &std::fs::Metadata) -> Stamp {
        Stamp {
            size: f.size(),
            mtime: f.mtime(),
            mtime_nsec: f.mtime_nsec(),
            ctime: f.ctime(),
            ctime_nsec: f.ctime_nsec(),
            ino: f.ino(),
            dev: f.dev(),
            mode: f.mode(),
        }
    }
}

/// A path in the context, the stat it was hashed with, and the digest.
type Entries = HashMap<Vec<u8>, Entry>;

/// A checksum, the stat it holds for, and whether this build used it.
struct Entry {
    stamp: Stamp,
    digest: [u8; 32],
    used: bool,
}

/// The checksums of one context directory's files.
pub struct StatCache {
    file: PathBuf,
    entries: Mutex<Entries>,
    changed: AtomicBool,
    /// changes at or after this second are racy
    racy_from: i64,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl StatCache {
    /// The cache of the context directory `context`, kept under `dir`;
    /// empty when there is none yet or it cannot be read.
    pub fn open(dir: &Path, context: &Path) -> StatCache {
        let mut id = Sha256::new();
        let canonical = std::fs::canonicalize(context).unwrap_or_else(|_| context.to_path_buf());
        id.update(canonical.as_os_str().as_bytes());
        if let Ok(m) = std::fs::metadata(context) {
            id.update(m.dev().to_le_bytes());
            id.update(m.ino().to_le_bytes());
        }
        let file = dir.join(kiln_snapshotter::content::hex(&id.finalize()));
        let entries = std::fs::File::open(&file)
            .ok()
            .and_then(|f| {
                let len = f.metadata().ok()?.len();
                if len > MAX_FILE {
                    return None;
                }
                let mut buf = Vec::with_capacity(usize::try_from(len).ok()?);
                io::Read::read_to_end(&mut io::Read::take(f, MAX_FILE), &mut buf).ok()?;
                parse(&buf)
            })
            .unwrap_or_default();
        StatCache {
            file,
            entries: Mutex::new(entries),
            changed: AtomicBool::new(false),
            racy_from: now_secs() - RACY_SECS,
        }
    }

    /// The checksum of `rel` if it was hashed with this stat.
    pub fn get(&self, rel: &Path, meta: &Meta) -> Option<[u8; 32]> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get_mut(rel.as_os_str().as_bytes()) {
            Some(e) if e.stamp == Stamp::of(meta) => {
                e.used = true;
                Some(e.digest)
            }
            _ => None,
        }
    }

    /// Remember `digest` for `rel`, whose walk saw `meta` and whose open
    /// file, after it was read, has `now`; refused when they differ or the
    /// file changed too recently (see the module's rules).
    pub fn put(&self, rel: &Path, meta: &Meta, now: &std::fs::Metadata, digest: [u8; 32]) {
        let stamp = Stamp::of(meta);
        if stamp != Stamp::of_file(now) || stamp.ctime >= self.racy_from {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = Entry {
            stamp,
            digest,
            used: true,
        };
        entries.insert(rel.as_os_str().as_bytes().to_vec(), entry);
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Write the cache back if it learned anything (atomically: a file
    /// beside it, then a rename), and remove other contexts' caches left
    /// unused for [`KEEP_DAYS`] days.
    pub fn save(&self) -> io::Result<()> {
        if !self.changed.load(Ordering::Relaxed) {
            // still in use: keep it from the sweep
            let _ = std::fs::File::options()
                .append(true)
                .open(&self.file)
                .and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(());
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let out = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            encode(&entries, MAX_ENTRIES)
        };
        super::parallel::write_atomic(&self.file, |f| f.write_all(&out))?;
        sweep(dir, &self.file);
        Ok(())
    }
}

/// Remove cache files other than `keep` unused for [`KEEP_DAYS`] days,
/// and all but the [`KEEP_FILES`] most recently used: a runner that builds
/// a fresh checkout every time makes a new one each build.
fn sweep(dir: &Path, keep: &Path) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    let limit = Duration::from_secs(KEEP_DAYS * 86_400);
    let mut others: Vec<(SystemTime, PathBuf)> = list
        .flatten()
        .map(|e| {
            let used = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            (used, e.path())
        })
        .filter(|(_, p)| p != keep)
        .collect();
    // newest first: the oldest beyond the limit go
    others.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
    for (i, (used, path)) in others.iter().enumerate() {
        let old = used.elapsed().is_ok_and(|age| age > limit);
        if old || i + 1 >= KEEP_FILES {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The bytes of a cache file of `entries`: all of them, or only those this
/// build used when there are more than `limit`.
fn encode(entries: &Entries, limit: usize) -> Vec<u8> {
    let only_used = entries.len() > limit;
    let mut out = MAGIC.to_vec();
    for (path, e) in entries {
        let Ok(len) = u32::try_from(path.len()) else {
            continue;
        };
        if only_used && !e.used {
            continue;
        }
        let s = &e.stamp;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(path);
        for n in [s.size, s.ino, s.dev] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for n in [s.mtime, s.mtime_nsec, s.ctime, s.ctime_nsec] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&s.mode.to_le_bytes());
        out.extend_from_slice(&e.digest);
    }
    out
}

/// Entries of a cache file; None when it is not one.
fn parse(buf: &[u8]) -> Option<Entries> {
    let mut rest = buf.strip_prefix(MAGIC)?;
    let mut out = HashMap::new();
    let u64_at = |b: &[u8], i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
    };
    let i64_at = |b: &[u8], i: usize| -> Option<i64> {
        Some(i64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
    };
    while !rest.is_empty() {
        let len = usize::try_from(u32::from_le_bytes(rest.get(..4)?.try_into().ok()?)).ok()?;
        if len > 4096 || rest.len() < FIXED + len {
            return None;
        }
        let path = rest[4..4 + len].to_vec();
        let n = &rest[4 + len..FIXED + len];
        let stamp = Stamp {
            size: u64_at(n, 0)?,
            ino: u64_at(n, 8)?,
            dev: u64_at(n, 16)?,
            mtime: i64_at(n, 24)?,
            mtime_nsec: i64_at(n, 32)?,
            ctime: i64_at(n, 40)?,
            ctime_nsec: i64_at(n, 48)?,
            mode: u32::from_le_bytes(n.get(56..60)?.try_into().ok()?),
        };
        let digest: [u8; 32] = n.get(60..92)?.try_into().ok()?;
        out.insert(
            path,
            Entry {
                stamp,
                digest,
                used: false,
            },
        );
        rest = &rest[FIXED + len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of(path: &Path) -> (Meta, std::fs::Metadata) {
        let m = std::fs::metadata(path).unwrap();
        let meta = Meta {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ino: m.ino(),
            dev: m.dev(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        };
        (meta, m)
    }

    #[test]
    fn entries_survive_a_save_and_hold_only_for_the_same_stat() {
        let ctx = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let f = ctx.path().join("a");
        std::fs::write(&f, b"one").unwrap();
        let (meta, now) = meta_of(&f);
        let mut cache = StatCache::open(state.path(), ctx.path());
        // a file changed just now is racy: hashed, not remembered
        cache.put(Path::new("a"), &meta, &now, [1; 32]);
        assert_eq!(cache.get(Path::new("a"), &meta), None);
        cache.racy_from = meta.ctime + 1;
        cache.put(Path::new("a"), &meta, &now, [1; 32]);
        cache.save().unwrap();

        let cache = StatCache::open(state.path(), ctx.path());
        assert_eq!(cache.get(Path::new("a"), &meta), Some([1; 32]));
        assert_eq!(cache.get(Path::new("b"), &meta), None);
        for change in [
            Meta { size: 4, ..meta },
            Meta { mtime: 1, ..meta },
            Meta {
                ctime_nsec: meta.ctime_nsec ^ 1,
                ..meta
            },
            Meta {
                ino: meta.ino + 1,
                ..meta
            },
            Meta {
                mode: meta.mode ^ 0o111,
                ..meta
            },
        ] {
            assert_eq!(cache.get(Path::new("a"), &change), None, "{change:?}");
        }
        // another context directory has its own cache
        let other = tempfile::tempdir().unwrap();
        assert_eq!(
            StatCache::open(state.path(), other.path()).get(Path::new("a"), &meta),
            None
        );
    }

    #[test]
    fn a_stat_that_moved_while_the_file_was_read_is_not_remembered() {
        let ctx = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let f = ctx.path().join("a");
        std::fs::write(&f, b"one").unwrap();
        let (walked, _) = meta_of(&f);
        std::fs::write(&f, b"three").unwrap();
        let (_, now) = meta_of(&f);
        let mut cache = StatCache::open(state.path(), ctx.path());
        cache.racy_from = i64::MAX;
        cache.put(Path::new("a"), &walked, &now, [3; 32]);
        assert_eq!(cache.get(Path::new("a"), &walked), None);
    }

    /// A cache file last used `ago`.
    fn write_used(path: &Path, ago: Duration) {
        std::fs::write(path, MAGIC).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - ago).unwrap();
    }

    #[test]
    fn only_the_most_recently_used_cache_files_are_kept() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("statcache");
        std::fs::create_dir_all(&dir).unwrap();
        // 40 other contexts' files, used one second apart, and a stale one
        for i in 0..40u64 {
            let f = dir.join(format!("ctx{i:02}"));
            write_used(&f, Duration::from_secs(1000 - i));
        }
        let stale = dir.join("stale");
        write_used(&stale, Duration::from_secs((KEEP_DAYS + 1) * 86_400));
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("a"), b"a").unwrap();
        let (meta, now) = meta_of(&ctx.path().join("a"));
        let mut cache = StatCache::open(&dir, ctx.path());
        cache.racy_from = i64::MAX;
        cache.put(Path::new("a"), &meta, &now, [1; 32]);
        cache.save().unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.len(), KEEP_FILES, "{left:?}");
        assert!(left.contains(&"ctx39".to_string()) && !left.contains(&"ctx08".to_string()));
        assert!(!left.contains(&"stale".to_string()));
        assert!(cache.file.exists());
    }

    #[test]
    fn an_overfull_cache_keeps_what_the_build_used() {
        let stamp = Stamp::of(&Meta::default());
        let entry = |used| Entry {
            stamp,
            digest: [7; 32],
            used,
        };
        let mut entries = Entries::new();
        entries.insert(b"used".to_vec(), entry(true));
        entries.insert(b"gone".to_vec(), entry(false));
        let kept = |limit| {
            let mut names: Vec<Vec<u8>> = parse(&encode(&entries, limit))
                .unwrap()
                .into_keys()
                .collect();
            names.sort();
            names
        };
        assert_eq!(kept(2), vec![b"gone".to_vec(), b"used".to_vec()]);
        assert_eq!(kept(1), vec![b"used".to_vec()]);
    }

    #[test]
    fn a_malformed_cache_file_is_ignored() {
        let ctx = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let cache = StatCache::open(state.path(), ctx.path());
        for junk in [
            b"not a cache".to_vec(),
            [MAGIC, &[0xff, 0xff, 0, 0]].concat(),
            [MAGIC, &[3, 0, 0, 0], b"abc"].concat(),
        ] {
            std::fs::write(&cache.file, &junk).unwrap();
            assert!(StatCache::open(state.path(), ctx.path())
                .entries
                .lock()
                .unwrap()
                .is_empty());
        }
    }
}
