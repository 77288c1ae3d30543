//! The build cache: content-addressed keys for steps, and the records that
//! map a key to the state the step produced.
//!
//! A key is the SHA-256 of the step's definition, the keys of its inputs
//! and, for COPY/ADD, a checksum of exactly the files it copies (mode,
//! owner, size, link target and bytes; never the name's mtime). A record is
//! written to a temporary file and renamed into place, so a build killed at
//! any moment leaves either the whole record or none. A record whose layers
//! are gone (garbage-collected) is a miss, never an error.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::state::ImageState;

/// A cache key, as lower-case hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(pub String);

/// Builds a key from parts; each part is length-prefixed so that no two
/// different sequences of parts hash alike.
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
    }
}
