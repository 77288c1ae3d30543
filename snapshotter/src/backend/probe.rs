//! The `auto` choice: which writable-view backend is the fastest that works
//! on this host, tried once and remembered.
//!
//! It owns the probe (mount each candidate on a scratch tree under the state
//! dir and check that a write and a delete land in upper in the layer
//! format) and the cache file. It must run inside kiln's user and mount
//! namespace, as the views it predicts do, and must never leave a mount or a
//! scratch tree behind.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::{BackendKind, ViewSpec};

/// Name of the cache file inside the state directory.
pub const CACHE_FILE: &str = "snapshotter-backend";

/// Errors of one probe attempt (reported, never fatal: `probe` falls back).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The scratch tree could not be prepared or checked.
    #[error("probe scratch tree {path}")]
    Scratch { path: PathBuf, source: io::Error },
    /// The kernel overlay backend failed.
    #[error(transparent)]
    Overlay(#[from] super::overlay::Error),
    /// The fuse backend failed.
    #[error(transparent)]
    Fuse(#[from] super::fuse::Error),
    /// The view mounted but did not behave.
    #[error("{backend} view misbehaved: {what}")]
    Misbehaved {
        backend: &'static str,
        what: &'static str,
    },
}

/// Result of one probe attempt.
pub type Result<T> = std::result::Result<T, Error>;

/// The backend `auto` stands for on this host: read from
/// `state_dir/snapshotter-backend` when it was written under the running
/// kernel, else probed (kernel overlay, then fuse, then copy) and written.
pub fn probe(state_dir: &Path) -> BackendKind {
    let kernel = kiln_sys::kernel_release();
    let cache = state_dir.join(CACHE_FILE);
    if let Some(kind) = read_cache(&cache, kernel) {
        return kind;
    }
    let kind = probe_uncached(state_dir)
        .into_iter()
        .find_map(|(kind, r)| r.ok().map(|()| kind))
        .unwrap_or(BackendKind::Copy);
    let _ = write_cache(&cache, kernel, kind);
    kind
}

/// Try every mounting backend, fastest first, and say how each went; stops
/// at the first that works.
pub fn probe_uncached(state_dir: &Path) -> Vec<(BackendKind, Result<()>)> {
    let mut out = Vec::new();
    for kind in [BackendKind::Overlay, BackendKind::Fuse] {
        let r = try_backend(state_dir, kind);
        let ok = r.is_ok();
        out.push((kind, r));
        if ok {
            break;
        }
    }
    out
}

fn name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Fuse => "fuse",
        BackendKind::Overlay => "overlay",
        BackendKind::Copy => "copy",
    }
}

fn read_cache(path: &Path, kernel: &str) -> Option<BackendKind> {
    let text = fs::read_to_string(path).ok()?;
    let mut k = None;
    let mut b = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("kernel ") {
            k = Some(v);
        } else if let Some(v) = line.strip_prefix("backend ") {
            b = Some(v);
        }
    }
    if k? != kernel {
        return None;
    }
    match b? {
        "fuse" => Some(BackendKind::Fuse),
        "overlay" => Some(BackendKind::Overlay),
        "copy" => Some(BackendKind::Copy),
        _ => None,
    }
}

fn write_cache(path: &Path, kernel: &str, kind: BackendKind) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, format!("kernel {kernel}\nbackend {}\n", name(kind)))?;
    fs::rename(&tmp, path)
}

fn try_backend(state_dir: &Path, kind: BackendKind) -> Result<()> {
    let root = state_dir.join(format!("probe-{}-{}", name(kind), std::process::id()));
    let scratch = |source: io::Error| Error::Scratch {
        path: root.clone(),
        source,
    };
    let _ = fs::remove_dir_all(&root);
    let spec = ViewSpec {
        lowers: vec![root.join("lower")],
        upper: root.join("upper"),
        work: root.join("work"),
        target: root.join("view"),
    };
    let result = (|| -> Result<()> {
        for d in [&spec.lowers[0], &spec.upper, &spec.work, &spec.target] {
            fs::create_dir_all(d).map_err(scratch)?;
        }
        fs::write(spec.lowers[0].join("old"), b"old").map_err(scratch)?;
        let view = match kind {
            BackendKind::Overlay => super::overlay::mount(&spec)?,
            BackendKind::Fuse => super::fuse::mount(&spec)?,
            BackendKind::Copy => return Ok(()),
        };
        let checks = (|| -> io::Result<bool> {
            let seen = fs::read(view.path().join("old"))? == b"old";
            fs::write(view.path().join("new"), b"new")?;
            fs::remove_file(view.path().join("old"))?;
            Ok(seen)
        })();
        drop(view);
        let backend = name(kind);
        if !checks.map_err(scratch)? {
            return Err(Error::Misbehaved {
                backend,
                what: "lower file not visible",
            });
        }
        if fs::read(spec.upper.join("new")).map_err(scratch)? != b"new" {
            return Err(Error::Misbehaved {
                backend,
                what: "write did not reach upper",
            });
        }
        let wh = fs::symlink_metadata(spec.upper.join("old")).map_err(scratch)?;
        if !wh.file_type().is_char_device() {
            return Err(Error::Misbehaved {
                backend,
                what: "delete did not leave a whiteout",
            });
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&root);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_used_only_for_the_same_kernel() {
        let dir = std::env::temp_dir().join(format!("kiln-probe-test-{}", std::process::id()));
        let path = dir.join(CACHE_FILE);
        write_cache(&path, "6.1.0-test", BackendKind::Fuse).unwrap();
        assert_eq!(read_cache(&path, "6.1.0-test"), Some(BackendKind::Fuse));
        assert_eq!(read_cache(&path, "6.2.0-other"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cached_answer_short_circuits_the_probe() {
        let dir = std::env::temp_dir().join(format!("kiln-probe-test2-{}", std::process::id()));
        write_cache(
            &dir.join(CACHE_FILE),
            kiln_sys::kernel_release(),
            BackendKind::Copy,
        )
        .unwrap();
        // no namespace here, so a real probe could not pick copy for a
        // root-capable host by itself: the answer must come from the cache
        assert_eq!(probe(&dir), BackendKind::Copy);
        fs::remove_dir_all(&dir).unwrap();
    }
}
