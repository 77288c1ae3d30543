//! Whether this host lets the calling user limit a sandbox's memory, CPU
//! and tasks through cgroup v2: the unified hierarchy only (no cgroup v1
//! controllers mounted), the process's own cgroup writable by it (systemd's
//! `user@.service` with `Delegate=yes`), and the controllers enabled there.
//!
//! [`detect`] reads `/proc/self/cgroup` and the cgroup file system (paths
//! injected, for tests). Where limits are asked for and the host delegates,
//! [`Delegated::prepare`] moves kiln's own processes into a leaf `kiln/`
//! (cgroup v2 lets only leaves hold processes once controllers are
//! enabled below), and [`StepCgroups::make`] gives each step a cgroup
//! `step-PID-N/` with its limits, into which the sandbox is moved before
//! its command runs, and which is removed after it. Without delegation a
//! limit is refused with [`NotDelegated`]'s reason, never ignored.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Why the delegated cgroup cannot take step limits.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cgroup {path} holds processes other than kiln ({pids}): run kiln in a cgroup of its own, e.g. `systemd-run --user --scope -p Delegate=yes kiln build ...`")]
    Shared { path: PathBuf, pids: String },
    #[error("cgroup {path} does not offer the {controller} controller (it has: {have}); the host must delegate it (systemd: Delegate=yes)")]
    Missing {
        path: PathBuf,
        controller: &'static str,
        have: String,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot make the cgroup {path}")]
    Make { path: PathBuf, source: io::Error },
}

/// Limits of every step's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// `memory.max` in bytes (and `memory.swap.max` 0: the limit is not
    /// widened by swap)
    pub memory: Option<u64>,
    /// `pids.max`
    pub pids: Option<u64>,
    /// CPUs, as `cpu.max` quota over a 100 ms period
    pub cpus: Option<f64>,
}

impl Limits {
    /// The controllers these limits need.
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut c = Vec::new();
        if self.memory.is_some() {
            c.push("memory");
        }
        if self.pids.is_some() {
            c.push("pids");
        }
        if self.cpus.is_some() {
            c.push("cpu");
        }
        c
    }

    /// What to write, file by file.
    fn files(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(m) = self.memory {
            out.push(("memory.max", m.to_string()));
            out.push(("memory.swap.max", "0".into()));
        }
        if let Some(p) = self.pids {
            out.push(("pids.max", p.to_string()));
        }
        if let Some(c) = self.cpus {
            // at least 1 ms of every 100 ms
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let quota = ((c * 100_000.0) as u64).max(1000);
            out.push(("cpu.max", format!("{quota} 100000")));
        }
        out
    }
}

fn write(path: PathBuf, value: &str) -> Result<(), SetupError> {
    std::fs::write(&path, value).map_err(|source| SetupError::Write {
        path,
        value: value.into(),
        source,
    })
}

impl Delegated {
    /// Make this cgroup ready for steps with `limits`: the controllers
    /// checked, kiln's own processes (this one, and its pause and helper
    /// processes, named `kiln*` or `memfd:kiln*`) moved into the leaf `kiln/`, the
    /// controllers enabled for the children. A cgroup that also holds
    /// other processes is refused: enabling controllers needs it empty.
    pub fn prepare(&self, limits: Limits) -> Result<StepCgroups, SetupError> {
        for c in limits.controllers() {
            if !self.controllers.iter().any(|have| have == c) {
                return Err(SetupError::Missing {
                    path: self.path.clone(),
                    controller: c,
                    have: self.controllers.join(" "),
                });
            }
        }
        let procs_path = self.path.join("cgroup.procs");
        let procs = std::fs::read_to_string(&procs_path).map_err(|source| SetupError::Read {
            path: procs_path.clone(),
            source,
        })?;
        let me = std::process::id();
        let (ours, others): (Vec<u32>, Vec<u32>) = procs
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .partition(|&pid| {
                pid == me
                    || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.starts_with("kiln") || c.starts_with("memfd:kiln"))
            });
        if !others.is_empty() {
            let pids: Vec<String> = others.iter().map(u32::to_string).collect();
            return Err(SetupError::Shared {
                path: self.path.clone(),
                pids: pids.join(", "),
            });
        }
        let leaf = self.path.join("kiln");
        match std::fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(SetupError::Make { path: leaf, source }),
        }
        for pid in ours {
            match write(leaf.join("cgroup.procs"), &pid.to_string()) {
                // gone meanwhile
                Err(SetupError::Write { source, .. })
                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                r => r?,
            }
        }
        remove_stale_steps(&self.path);
        let enable: Vec<String> = limits
            .controllers()
            .iter()
            .map(|c| format!("+{c}"))
            .collect();
        write(self.path.join("cgroup.subtree_control"), &enable.join(" "))?;
        Ok(StepCgroups {
            parent: self.path.clone(),
            limits,
            next: AtomicU64::new(0),
        })
    }
}

/// Remove the `step-PID-N` cgroups of kiln processes that are gone (a
/// kiln killed mid-step leaves its step's cgroup; an empty one can be
/// removed, a busy one stays).
fn remove_stale_steps(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("step-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// Where steps' cgroups are made, and their limits.
#[derive(Debug)]
pub struct StepCgroups {
    parent: PathBuf,
    pub limits: Limits,
    next: AtomicU64,
}

impl StepCgroups {
    /// A new cgroup with the limits, for one step; removed when dropped.
    pub fn make(&self) -> Result<StepCgroup, SetupError> {
        let path = loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let path = self.parent.join(format!("step-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => break path,
                // left by an earlier kiln of the same pid that still had
                // a process in it: take the next name
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(SetupError::Make { path, source }),
            }
        };
        let cg = StepCgroup {
            path,
            limits: self.limits,
        };
        for (file, value) in self.limits.files() {
            let p = cg.path.join(file);
            // no swap accounting on this host: nothing to widen
            if file == "memory.swap.max" && !p.exists() {
                continue;
            }
            write(p, &value)?;
        }
        Ok(cg)
    }
}

/// One step's cgroup.
#[derive(Debug)]
pub struct StepCgroup {
    pub path: PathBuf,
    pub limits: Limits,
}

impl StepCgroup {
    /// Whether the kernel killed a process of the step for the memory
    /// limit (`oom_kill` in memory.events).
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.path.join("memory.events")).is_ok_and(|t| {
            t.lines()
                .filter_map(|l| l.strip_prefix("oom_kill "))
                .any(|n| n.trim() != "0")
        })
    }
}

impl Drop for StepCgroup {
    // the step's processes are gone (its PID namespace died with it), but
    // the kernel may take a moment to let go of the cgroup
    fn drop(&mut self) {
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => return,
            }
        }
    }
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
