//! The build cache: content-addressed keys for steps, and the records that
//! map a key to the state the step produced.
//!
//! A key is the SHA-256 of the step's definition, the keys of its inputs
//! and, for COPY/ADD, a checksum of exactly the files it copies (mode,
//! owner, size, link target and bytes; never the name's mtime). A record is
//! written to a temporary file and renamed into place, so a build killed at
//! any moment leaves either the whole record or none. A record whose layers
//! are gone (garbage-collected) is a miss, never an error.
//!
//! A record's mtime is its last use: set when written and again on every
//! hit, so `kiln prune --keep-duration` and `--keep-storage` can free the
//! least recently used records first, as BuildKit does. This module decides
//! which records to drop ([`select_for_prune`]); it never deletes a layer or
//! blob itself (`image::gc` does, for what no record or image needs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::Digest;
use sha2::{Digest as _, Sha256};

use super::image_state::ImageState;

/// A cache key, as lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(pub String);

/// Builds a key from parts; each part is length-prefixed so that no two
/// different sequences of parts hash alike.
#[derive(Clone)]
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    pub fn new(kind: &str) -> Self {
        let mut b = KeyBuilder(Sha256::new());
        b.part(b"kiln-cache-v1");
        b.part(kind.as_bytes());
        b
    }

    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.part(s.as_bytes())
    }

    pub fn finish(self) -> Key {
        Key(format!("{:x}", self.0.finalize()))
    }
}

/// A snapshotter view key for work on `key`: the step's key for whoever
/// reads the views directory, then this process and a counter, because two
/// builds (or two stages of one build) may work on the same key at once and
/// a view key is exclusive.
pub fn view_key(what: &str, key: &Key) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{what}-{}-{}-{}",
        &key.0[..key.0.len().min(16)],
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The directory of cache records.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn open(dir: &Path) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir)?;
        Ok(Cache {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{}.json", key.0))
    }

    /// The state recorded for `key`, if any and readable.
    pub fn get(&self, key: &Key) -> Option<ImageState> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Record `state` for `key`, atomically.
    pub fn put(&self, key: &Key, state: &ImageState) -> std::io::Result<()> {
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", key.0, std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
        f.sync_data()?;
        drop(f);
        std::fs::rename(&tmp, self.path(key))
    }

    /// The state recorded for `key` if every layer and blob it names is
    /// still stored, and then kept for this build: the layers and blobs go
    /// into `snap`'s lease (so a concurrent `kiln prune` cannot take them
    /// between this check and their use) and the record's last use is set
    /// to now. A record something was collected from is a miss.
    pub fn lookup(&self, key: &Key, snap: &Snapshotter) -> Option<ImageState> {
        let state = self.get(key)?;
        if !keep_for_build(&state, snap) {
            return None;
        }
        self.touch(key);
        Some(state)
    }

    /// Mark the record as used now. A record that cannot be touched only
    /// looks older to prune.
    pub fn touch(&self, key: &Key) {
        if let Ok(f) = std::fs::File::options().write(true).open(self.path(key)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Every record, unreadable ones included (with `state` None, so prune
    /// can remove them), newest use first.
    pub fn records(&self) -> std::io::Result<Vec<Record>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            let Some(hex) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            else {
                continue;
            };
            let key = Key(hex.to_string());
            out.push(Record {
                state: self.get(&key),
                key,
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                bytes: meta.len(),
            });
        }
        out.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.key.0.cmp(&b.key.0)));
        Ok(out)
    }

    /// Remove the temporary files of record writers that died (killed
    /// between create and rename).
    pub fn remove_orphans(&self) -> std::io::Result<()> {
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix('.') {
                remove_if_orphaned(&e.path(), rest);
            }
        }
        Ok(())
    }

    /// Delete a record: its key is a miss from now on.
    pub fn remove(&self, key: &Key) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(key)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Bytes used by the records.
    pub fn usage(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Lease what `state` needs into `snap`, or say that something is gone.
/// Each item is leased before it is checked: once in the lease, no GC can
/// take it, so a present item stays present.
pub(crate) fn keep_for_build(state: &ImageState, snap: &Snapshotter) -> bool {
    if let Some(chain) = &state.chain {
        let Ok(chain) = chain.parse::<Digest>() else {
            return false;
        };
        // fails when the layer is not in the store
        if snap.lease().add_layer(&chain).is_err() {
            return false;
        }
    }
    state.layers.iter().all(|l| {
        l.digest
            .parse::<Digest>()
            .is_ok_and(|d| snap.lease().add_blob(&d).is_ok() && snap.content().contains(&d))
    })
}

/// Remove `.KEY.PID.tmp` (a record being written) when process PID is gone:
/// it was killed between create and rename.
fn remove_if_orphaned(path: &Path, name: &str) {
    let pid = name
        .strip_suffix(".tmp")
        .and_then(|n| n.rsplit('.').next())
        .and_then(|p| p.parse::<u32>().ok());
    if let Some(pid) = pid {
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One record on disk.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Key,
    /// None when the record cannot be read (it is a miss)
    pub state: Option<ImageState>,
    /// the record's mtime: when it was written or last hit
    pub last_used: SystemTime,
    /// size of the record file
    pub bytes: u64,
}

/// A record as prune weighs it: its last use and the bytes freeing it
/// would give back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneCandidate {
    pub key: Key,
    pub last_used: SystemTime,
    pub bytes: u64,
}

/// What `kiln prune` keeps, as BuildKit's `--keep-storage` and
/// `--keep-duration` define it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// keep the build cache at most this big, freeing least recently used
    /// records first; nothing is freed while the cache is within it
    pub storage: Option<u64>,
    /// never free a record used within this long
    pub duration: Option<Duration>,
}

/// The records to delete, following BuildKit's cache manager (`prune` in
/// `cache/manager.go`): with a storage limit and a cache already within it,
/// none; records used within `duration` are never candidates; with a
/// storage limit the candidates go least recently used first until the
/// total is within the limit, else all of them go.
pub fn select_for_prune(
    candidates: &[PruneCandidate],
    policy: KeepPolicy,
    now: SystemTime,
) -> Vec<Key> {
    let mut total: u64 = candidates.iter().map(|c| c.bytes).sum();
    if policy.storage.is_some_and(|keep| total <= keep) {
        return Vec::new();
    }
    let mut doomed: Vec<&PruneCandidate> = candidates
        .iter()
        .filter(|c| match policy.duration {
            None => true,
            // a record used in the future (clock skew) counts as recent
            Some(d) => now.duration_since(c.last_used).is_ok_and(|age| age >= d),
        })
        .collect();
    let Some(keep) = policy.storage else {
        return doomed.into_iter().map(|c| c.key.clone()).collect();
    };
    doomed.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.key.0.cmp(&b.key.0)));
    let mut out = Vec::new();
    for c in doomed {
        if total <= keep {
            break;
        }
        total = total.saturating_sub(c.bytes);
        out.push(c.key.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_unambiguous() {
        let mut a = KeyBuilder::new("x");
        a.str("ab").str("c");
        let mut b = KeyBuilder::new("x");
        b.str("a").str("bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let key = KeyBuilder::new("t").finish();
        assert!(cache.get(&key).is_none());
        let state = ImageState::scratch(crate::frontend::Platform::host());
        cache.put(&key, &state).unwrap();
        assert_eq!(cache.get(&key), Some(state));
        let records = cache.records().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].key, key);
        cache.remove(&key).unwrap();
        assert!(cache.get(&key).is_none());
        cache.remove(&key).unwrap();
    }

    #[test]
    fn view_keys_never_repeat() {
        let key = KeyBuilder::new("t").finish();
        let (a, b) = (view_key("run", &key), view_key("run", &key));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("run-{}-", &key.0[..16])));
    }

    #[test]
    fn touch_moves_the_last_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let key = KeyBuilder::new("t").finish();
        let state = ImageState::scratch(crate::frontend::Platform::host());
        cache.put(&key, &state).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(cache.path(&key))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(cache.records().unwrap()[0].last_used <= old);
        cache.touch(&key);
        let used = cache.records().unwrap()[0].last_used;
        assert!(used > old + Duration::from_secs(3000), "{used:?}");
    }

    #[test]
    fn orphaned_temp_records_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        // pid 0 is never a process with a /proc entry
        let dead = dir.path().join(".abc.0.tmp");
        let live = dir.path().join(format!(".abc.{}.tmp", std::process::id()));
        std::fs::write(&dead, b"{").unwrap();
        std::fs::write(&live, b"{").unwrap();
        assert!(cache.records().unwrap().is_empty());
        assert!(dead.exists(), "records() only reads");
        cache.remove_orphans().unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }

    fn cand(name: &str, age_secs: u64, bytes: u64, now: SystemTime) -> PruneCandidate {
        PruneCandidate {
            key: Key(name.into()),
            last_used: now - Duration::from_secs(age_secs),
            bytes,
        }
    }

    fn keys(k: Vec<Key>) -> Vec<String> {
        k.into_iter().map(|k| k.0).collect()
    }

    #[test]
    fn prune_follows_buildkit_keep_rules() {
        let now = SystemTime::now();
        let c = vec![
            cand("new", 60, 100, now),
            cand("old", 3 * 3600, 100, now),
            cand("older", 5 * 3600, 100, now),
        ];
        // no limits: everything
        let all = select_for_prune(&c, KeepPolicy::default(), now);
        assert_eq!(keys(all).len(), 3);
        // keep-duration: only what was not used within it
        let p = KeepPolicy {
            duration: Some(Duration::from_secs(3600)),
            storage: None,
        };
        assert_eq!(keys(select_for_prune(&c, p, now)), ["old", "older"]);
        // keep-storage within the total: nothing
        let p = KeepPolicy {
            storage: Some(300),
            duration: None,
        };
        assert!(select_for_prune(&c, p, now).is_empty());
        // keep-storage: least recently used first, until within it
        let p = KeepPolicy {
            storage: Some(150),
            duration: None,
        };
        assert_eq!(keys(select_for_prune(&c, p, now)), ["older", "old"]);
        let p = KeepPolicy {
            storage: Some(250),
            duration: None,
        };
        assert_eq!(keys(select_for_prune(&c, p, now)), ["older"]);
        // both: recent records stay even above the limit
        let p = KeepPolicy {
            storage: Some(0),
            duration: Some(Duration::from_secs(4 * 3600)),
        };
        assert_eq!(keys(select_for_prune(&c, p, now)), ["older"]);
    }
}
