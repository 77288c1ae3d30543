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
    #[error("{path} is {what} (mode {mode:04o}, owner uid {uid}): another user could change {of}; {fix}")]
    Shared {
        of: PathBuf,
        path: PathBuf,
        what: &'static str,
        mode: u32,
        uid: u32,
        fix: String,
    },
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
        // [`check_private`] ran before this directory existed, or before
        // another user could have made it in a shared (sticky) parent:
        // what is used now must be the caller's and closed to others
        check_own(&root)?;
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

/// Refuse `path` (kiln's state directory or a config file) when a user
/// other than the caller (and root) could write into it, or replace it or
/// one of its parents: each existing directory on the way must be owned by
/// the caller or root and writable by no one else, unless it is sticky
/// (`/tmp`: others cannot rename what they do not own); `path` itself must
/// be the caller's (or root's, for a file) and writable by no one else. A
/// group-writable entry passes when its group is the caller's own private
/// group (the user-private-group convention: same name, no other members).
///
/// Run outside kiln's user namespace, where owners read as on the host.
pub fn check_private(path: &Path) -> Result<()> {
    let abs = std::path::absolute(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    let mut at = PathBuf::from("/");
    let parts: Vec<_> = abs.components().skip(1).collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let meta = match fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(Error::Io { path: at, source }),
        };
        let leaf = i + 1 == parts.len();
        if meta.file_type().is_symlink() {
            // its directory was checked, but in a sticky one (/tmp) the
            // link's owner can replace it: it must be ours (or root's);
            // the target is checked from `/`
            use std::os::unix::fs::MetadataExt;
            if meta.uid() != me && meta.uid() != 0 {
                return Err(Error::Shared {
                    of: abs.clone(),
                    path: at,
                    what: "a symbolic link owned by another user",
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    fix: "use a directory of your own (--root DIR, or $KILN_CONFIG)".into(),
                });
            }
            let target = fs::canonicalize(&at).map_err(|source| Error::Io {
                path: at.clone(),
                source,
            })?;
            let rest: PathBuf = parts[i + 1..].iter().collect();
            return check_private(&target.join(rest));
        }
        check_entry(&abs, &at, &meta, me, leaf)?;
    }
    Ok(())
}

/// The state directory as opened: owned by this process's user (in the
/// namespace it runs in) and writable by no one else.
fn check_own(root: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(root).map_err(|source| Error::Io {
        path: root.into(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    let (what, fix) = if meta.uid() != me {
        (
            "owned by another user",
            "use a directory of your own (--root DIR)".to_string(),
        )
    } else if meta.mode() & 0o002 != 0 {
        (
            "writable by other users",
            format!("chmod go-w {}", root.display()),
        )
    } else {
        return Ok(());
    };
    Err(Error::Shared {
        of: root.into(),
        path: root.into(),
        what,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        fix,
    })
}

fn check_entry(of: &Path, at: &Path, meta: &fs::Metadata, me: u32, leaf: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o7777;
    let shared = |what, fix: String| Error::Shared {
        of: of.into(),
        path: at.into(),
        what,
        mode,
        uid: meta.uid(),
        fix,
    };
    let owner_ok = meta.uid() == me || (meta.uid() == 0 && !(leaf && meta.is_dir()));
    if !owner_ok {
        return Err(shared(
            "owned by another user",
            "use a directory of your own (--root DIR, or $KILN_CONFIG)".into(),
        ));
    }
    let sticky = meta.is_dir() && mode & 0o1000 != 0 && !leaf;
    let group_private = mode & 0o002 == 0 && private_group(meta.gid(), me);
    let others_write = mode & 0o002 != 0 || (mode & 0o020 != 0 && !group_private);
    if others_write && !sticky {
        return Err(shared(
            "writable by other users",
            format!("chmod go-w {}", at.display()),
        ));
    }
    Ok(())
}

/// Whether `gid` is the private group of the user `uid`: named as the
/// user, with no members listed besides the user.
fn private_group(gid: u32, uid: u32) -> bool {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid));
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid));
    match (user, group) {
        (Ok(Some(u)), Ok(Some(g))) => {
            u.gid.as_raw() == gid && g.name == u.name && g.mem.iter().all(|m| *m == u.name)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_directory_others_can_change_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("kiln");
        // missing: its existing parents decide
        check_private(&root).unwrap();
        StateDir::open(Some(&root)).unwrap();
        check_private(&root).unwrap();
        // world-writable: refused, naming it and the mode
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_private(&root).unwrap_err().to_string();
        assert!(
            err.contains(&root.display().to_string())
                && err.contains("0777")
                && err.contains("chmod go-w"),
            "{err}"
        );
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        // a parent others can write into (and so replace the state dir): refused
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_private(&root).unwrap_err().to_string();
        assert!(err.contains(&tmp.path().display().to_string()), "{err}");
        // unless it is sticky, as /tmp is
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        check_private(&root).unwrap();
        // a link to a shared place is judged where it leads
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&open, tmp.path().join("link")).unwrap();
        assert!(check_private(&tmp.path().join("link/kiln")).is_err());
    }

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
    fn a_state_directory_or_link_of_another_user_is_refused() {
        // changing owners needs root: CI runs the unit tests as root, and
        // there a missing root is a failure, not a pass
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").is_err(),
                "this test needs root (it gives files to another user)"
            );
            eprintln!("skipped: not root");
            return;
        }
        let other = nix::unistd::Uid::from_raw(54321);
        let tmp = tempfile::tempdir().unwrap();
        // made by someone else before kiln came to use it (the window
        // between the check of a missing path and opening it)
        let theirs = tmp.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&theirs, Some(other), None).unwrap();
        let err = StateDir::open(Some(&theirs)).unwrap_err().to_string();
        assert!(err.contains("owned by another user"), "{err}");
        // a link another user owns, in a sticky directory they may share
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let mine = tmp.path().join("mine");
        fs::create_dir(&mine).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        check_private(&link).unwrap();
        nix::unistd::fchownat(
            None,
            &link,
            Some(other),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let err = check_private(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link owned by another user"), "{err}");
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
