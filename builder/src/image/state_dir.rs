//! The state directory: where one user's kiln keeps its image store, layers
//! and build cache. `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`, or
//! the directory given with `--root`.
//!
//! This module only names paths and creates the root (mode 0700, so other
//! host users cannot read image content). It never opens a store and never
//! removes anything.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find kiln's state directory: neither XDG_DATA_HOME nor HOME is set; pass --root DIR")]
    NoHome,
    #[error("state directory {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("state directory {0} is not a directory; pass --root DIR to use another one")]
    NotADirectory(PathBuf),
}

/// Result type of the state directory.
pub type Result<T> = std::result::Result<T, Error>;

/// kiln's state directory and the paths inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The default location, from the environment: `$XDG_DATA_HOME/kiln`
    /// when XDG_DATA_HOME is set to an absolute path (the XDG spec says to
    /// ignore a relative one), else `$HOME/.local/share/kiln`.
    pub fn default_path() -> Result<PathBuf> {
        Self::default_path_from(
            std::env::var_os("XDG_DATA_HOME").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
        )
    }

    fn default_path_from(xdg: Option<PathBuf>, home: Option<PathBuf>) -> Result<PathBuf> {
        if let Some(x) = xdg.filter(|x| x.is_absolute()) {
            return Ok(x.join("kiln"));
        }
        match home.filter(|h| !h.as_os_str().is_empty()) {
            Some(h) => Ok(h.join(".local").join("share").join("kiln")),
            None => Err(Error::NoHome),
        }
    }

    /// Open `root` (the `--root` flag) or the default location, creating it
    /// with mode 0700 if missing. An existing directory keeps its mode.
    pub fn open(root: Option<&Path>) -> Result<Self> {
        let root = match root {
            Some(r) => r.to_path_buf(),
            None => Self::default_path()?,
        };
        let io_err = |source| Error::Io {
            path: root.clone(),
            source,
        };
        if let Some(parent) = root.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(io_err)?;
            }
        }
        match fs::DirBuilder::new().mode(0o700).create(&root) {
            Ok(()) => {
                // the umask may have taken bits away; 0700 exactly
                fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !root.is_dir() {
                    return Err(Error::NotADirectory(root));
                }
            }
            Err(e) => return Err(io_err(e)),
        }
        Ok(StateDir { root })
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The snapshotter root (`Snapshotter::open` takes this); it holds the
    /// content store at `content/` and the layers.
    pub fn snapshotter_root(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The content store (an OCI image layout) inside the snapshotter root.
    pub fn content_root(&self) -> PathBuf {
        self.snapshotter_root().join("content")
    }

    /// Where the build cache keeps its database.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// Where the checksums of build contexts' files are kept between
    /// builds (`engine::statcache`).
    pub fn stat_cache_dir(&self) -> PathBuf {
        self.root.join("statcache")
    }

    /// Where `RUN --mount=type=cache` directories are kept
    /// (`CacheMounts::open` takes this).
    pub fn cache_mounts_dir(&self) -> PathBuf {
        self.root.join("cache-mounts")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_prefers_absolute_xdg_then_home() {
        let p = |x: Option<&str>, h: Option<&str>| {
            StateDir::default_path_from(x.map(PathBuf::from), h.map(PathBuf::from))
        };
        assert_eq!(p(Some("/x"), Some("/h")).unwrap(), PathBuf::from("/x/kiln"));
        assert_eq!(
            p(Some("rel"), Some("/h")).unwrap(),
            PathBuf::from("/h/.local/share/kiln")
        );
        assert_eq!(
            p(None, Some("/h")).unwrap(),
            PathBuf::from("/h/.local/share/kiln")
        );
        assert!(matches!(p(None, None), Err(Error::NoHome)));
        assert!(matches!(p(None, Some("")), Err(Error::NoHome)));
    }

    #[test]
    fn open_creates_0700_and_refuses_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/kiln");
        let s = StateDir::open(Some(&root)).unwrap();
        let mode = fs::metadata(s.root()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(s.content_root().starts_with(s.snapshotter_root()));
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            StateDir::open(Some(&file)),
            Err(Error::NotADirectory(_))
        ));
    }
}
