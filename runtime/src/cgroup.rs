//! Whether this host lets the calling user limit a sandbox's memory, CPU
//! and tasks through cgroup v2: the unified hierarchy only (no cgroup v1
//! controllers mounted), the process's own cgroup writable by it (systemd's
//! `user@.service` with `Delegate=yes`), and the controllers enabled there.
//!
//! Only detection: it reads `/proc/self/cgroup` and the cgroup file system
//! (paths injected, for tests) and never writes. kiln does not place steps
//! in cgroups; a limit that needs one is refused with [`NotDelegated`]'s
//! reason, so it is never silently ignored.

use std::path::{Path, PathBuf};

/// `CGROUP2_SUPER_MAGIC` of statfs(2).
const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// What the host delegates to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegated {
    /// the process's cgroup directory
    pub path: PathBuf,
    /// controllers available there (`cgroup.controllers`)
    pub controllers: Vec<String>,
}

/// Why cgroup limits are not available.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotDelegated {
    #[error("this host mounts cgroup v1 hierarchies ({0}): its controllers are not in cgroup v2 (hybrid or legacy cgroups; boot with systemd.unified_cgroup_hierarchy=1)")]
    V1Hierarchies(String),
    #[error("{0} is not a cgroup v2 file system")]
    NotUnified(PathBuf),
    #[error("cannot read {path}: {why}")]
    Unreadable { path: PathBuf, why: String },
    #[error("this process's cgroup {0} is not writable by the user (no delegation: systemd's user@.service with Delegate=yes, or run kiln with systemd-run --user --scope)")]
    NotWritable(PathBuf),
}

/// Detect delegation for this process.
pub fn detect() -> Result<Delegated, NotDelegated> {
    detect_at(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup"))
}

/// [`detect`] with the paths given.
pub fn detect_at(proc_cgroup: &Path, mount: &Path) -> Result<Delegated, NotDelegated> {
    let unreadable = |path: &Path, e: std::io::Error| NotDelegated::Unreadable {
        path: path.into(),
        why: e.to_string(),
    };
    let text = std::fs::read_to_string(proc_cgroup).map_err(|e| unreadable(proc_cgroup, e))?;
    let v1: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("0::"))
        .filter_map(|l| l.split(':').nth(1))
        .filter(|c| !c.is_empty())
        .collect();
    if !v1.is_empty() {
        return Err(NotDelegated::V1Hierarchies(v1.join(", ")));
    }
    let own = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| NotDelegated::NotUnified(mount.into()))?;
    let fs = nix::sys::statfs::statfs(mount).map_err(|e| unreadable(mount, e.into()))?;
    if fs.filesystem_type().0 != CGROUP2_MAGIC {
        return Err(NotDelegated::NotUnified(mount.into()));
    }
    let path = mount.join(own.trim_start_matches('/'));
    let controllers_file = path.join("cgroup.controllers");
    let controllers = std::fs::read_to_string(&controllers_file)
        .map_err(|e| unreadable(&controllers_file, e))?
        .split_whitespace()
        .map(String::from)
        .collect();
    let writable = nix::unistd::access(
        &path.join("cgroup.subtree_control"),
        nix::unistd::AccessFlags::W_OK,
    )
    .is_ok();
    if !writable {
        return Err(NotDelegated::NotWritable(path));
    }
    Ok(Delegated { path, controllers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_hosts_name_their_v1_controllers() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cgroup");
        std::fs::write(&f, "9:name=systemd:/\n8:pids:/\n4:memory:/x\n0::/\n").unwrap();
        let err = detect_at(&f, dir.path()).unwrap_err();
        assert_eq!(
            err,
            NotDelegated::V1Hierarchies("name=systemd, pids, memory".into())
        );
        // unified-only, but not a cgroup2 mount
        std::fs::write(&f, "0::/user.slice\n").unwrap();
        assert_eq!(
            detect_at(&f, dir.path()).unwrap_err(),
            NotDelegated::NotUnified(dir.path().into())
        );
    }
}
