//! Landlock for the host-side code that handles attacker-controlled bytes:
//! layer apply and diff, the FUSE overlay server, and the copying of build
//! contexts. Such code runs on a thread restricted to the state directory
//! (read-write) and the directories it must read (read-only), so a bug in
//! it that an image, a layer or a context could steer still cannot open a
//! file anywhere else on the host.
//!
//! Landlock is best effort: on a kernel without it (or with it disabled)
//! the work runs unconfined and [`status`] says so; `kiln info` shows it.
//! Restrictions apply to one thread and the threads it starts afterwards,
//! for good: [`run_confined`] runs the work on a fresh scoped thread, and
//! the FUSE server restricts each of its own threads when it starts.
//!
//! This module decides nothing about what is allowed; callers give the
//! paths.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

/// The newest Landlock ABI kiln asks for; older kernels get what they
/// support (the crate's best-effort mode).
const WANTED: ABI = ABI::V5;

/// What Landlock could do on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// every access kiln asked to restrict is restricted; the kernel's ABI
    Enforced { abi: i32 },
    /// some access rights are not restricted on this kernel
    Partial { abi: i32 },
    /// Landlock is missing or disabled: work runs unconfined
    Unsupported(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Enforced { abi } => write!(f, "enforced (ABI {abi})"),
            Status::Partial { abi } => write!(f, "partially enforced (ABI {abi})"),
            Status::Unsupported(why) => write!(f, "not available: {why}"),
        }
    }
}

/// The kernel's Landlock ABI version, or why there is none.
fn kernel_abi() -> Result<i32, String> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no attribute buffer (NULL, size 0)
    // and returns a number or -1.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no Landlock (Linux 5.13 or later)".into(),
            Some(libc::EOPNOTSUPP) => "Landlock is disabled (boot with lsm=...,landlock)".into(),
            _ => e.to_string(),
        });
    }
    i32::try_from(v).map_err(|_| "unexpected Landlock version".into())
}

/// The kernel's Landlock ABI version; 0 without Landlock.
pub fn abi() -> i64 {
    kernel_abi().map(i64::from).unwrap_or(0)
}

/// What confined work gets on this host, probed once.
pub fn status() -> Status {
    static STATUS: OnceLock<Status> = OnceLock::new();
    STATUS
        .get_or_init(|| match kernel_abi() {
            Err(why) => Status::Unsupported(why),
            // ABI 5 (Linux 6.10) covers every filesystem right kiln asks
            // for; older kernels leave some (truncate, ioctl) unrestricted.
            Ok(abi) if abi >= 5 => Status::Enforced { abi },
            Ok(abi) => Status::Partial { abi },
        })
        .clone()
}

/// The directories confined work may use.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Rules {
    read: Vec<PathBuf>,
    write: Vec<PathBuf>,
}

impl Rules {
    pub fn new() -> Rules {
        Rules::default()
    }

    /// Allow reading (and listing, executing nothing) beneath `dir`.
    pub fn read(mut self, dir: impl AsRef<Path>) -> Rules {
        self.read.push(dir.as_ref().to_path_buf());
        self
    }

    /// Allow every file operation beneath `dir`.
    pub fn write(mut self, dir: impl AsRef<Path>) -> Rules {
        self.write.push(dir.as_ref().to_path_buf());
        self
    }

    /// Restrict the calling thread (and threads it starts from now on)
    /// to these rules, for the rest of its life. Paths that do not exist
    /// are skipped. Returns what the kernel enforced. Callers go through
    /// [`confine_current_thread`], which refuses a failure on a kernel
    /// that has Landlock.
    fn restrict_current_thread(&self) -> Status {
        if let s @ Status::Unsupported(_) = status() {
            return s;
        }
        let existing =
            |v: &[PathBuf]| -> Vec<PathBuf> { v.iter().filter(|p| p.exists()).cloned().collect() };
        let result = (|| {
            let all = AccessFs::from_all(WANTED);
            let read = AccessFs::from_read(WANTED);
            Ruleset::default()
                .handle_access(all)?
                .create()?
                .add_rules(path_beneath_rules(existing(&self.write), all))?
                .add_rules(path_beneath_rules(existing(&self.read), read))?
                .restrict_self()
        })();
        match result {
            Ok(r) => match (r.ruleset, status()) {
                (RulesetStatus::FullyEnforced, s) => s,
                (
                    RulesetStatus::PartiallyEnforced,
                    Status::Enforced { abi } | Status::Partial { abi },
                ) => Status::Partial { abi },
                (RulesetStatus::NotEnforced, _) | (_, _) => {
                    Status::Unsupported("the ruleset was not enforced".into())
                }
            },
            Err(e) => Status::Unsupported(e.to_string()),
        }
    }
}

/// The host-side code kiln confines, as `kiln info` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// unpacking a layer (load, pull, FROM, ADD of an archive, cache import)
    LayerApply,
    /// turning a step's changes into a layer
    LayerDiff,
    /// the FUSE overlay server's threads
    FuseServer,
    /// COPY, ADD and bind mounts from build contexts
    ContextCopy,
    /// `type=local` exports
    Export,
}

impl Component {
    /// Every component, in the order `kiln info` lists them.
    pub const ALL: [Component; 5] = [
        Component::LayerApply,
        Component::LayerDiff,
        Component::FuseServer,
        Component::ContextCopy,
        Component::Export,
    ];
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Component::LayerApply => "layer apply",
            Component::LayerDiff => "layer diff",
            Component::FuseServer => "FUSE server",
            Component::ContextCopy => "context copy",
            Component::Export => "local export",
        })
    }
}

/// Confinement failed on a kernel that has Landlock: the work does not
/// run unconfined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot confine the {component} with Landlock on a kernel that has it: {why}")]
pub struct NotConfined {
    pub component: Component,
    pub why: String,
}

/// Restrict the calling thread to `rules` for `component`: what the
/// kernel enforced, or an error when a kernel with Landlock refused the
/// ruleset (then nothing may run on this thread). Without Landlock the
/// work runs unconfined, as [`status`] reports.
pub fn confine_current_thread(
    component: Component,
    rules: &Rules,
) -> std::result::Result<Status, NotConfined> {
    let got = rules.restrict_current_thread();
    match (&got, status()) {
        (Status::Unsupported(why), Status::Enforced { .. } | Status::Partial { .. }) => {
            Err(NotConfined {
                component,
                why: why.clone(),
            })
        }
        _ => Ok(got),
    }
}

/// Run `work` on a fresh thread confined to `rules` as `component`, and
/// return its result. The calling thread is not restricted.
pub fn run_confined<T: Send>(
    component: Component,
    rules: &Rules,
    work: impl FnOnce() -> T + Send,
) -> std::result::Result<T, NotConfined> {
    std::thread::scope(|s| {
        s.spawn(|| {
            confine_current_thread(component, rules)?;
            Ok(work())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// What confining `component` to `rules` gives on this host, checked
/// rather than assumed: a thread is confined, then must be refused a
/// listing of `/` (outside any rules kiln makes). For `kiln info`.
pub fn check(component: Component, rules: &Rules) -> Status {
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            let got = confine_current_thread(component, rules);
            let refused = std::fs::read_dir("/").map_err(|e| e.raw_os_error()).err()
                == Some(Some(libc::EACCES));
            (got, refused)
        })
        .join()
    });
    match outcome {
        Err(_) => Status::Unsupported("the check thread panicked".into()),
        Ok((Err(e), _)) => Status::Unsupported(e.why),
        Ok((Ok(s @ Status::Unsupported(_)), _)) => s,
        Ok((Ok(_), false)) => {
            Status::Unsupported("confined, yet a listing of / was allowed".into())
        }
        Ok((Ok(s), true)) => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confined_work_reaches_only_its_directories() {
        if !matches!(status(), Status::Enforced { .. } | Status::Partial { .. }) {
            kiln_vm_tests::missing_prerequisite(&format!("Landlock: {}", status()));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let rw = dir.path().join("rw");
        let ro = dir.path().join("ro");
        std::fs::create_dir_all(&rw).unwrap();
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::write(ro.join("f"), "ro").unwrap();
        std::fs::write(dir.path().join("outside"), "secret").unwrap();
        let rules = Rules::new().write(&rw).read(&ro);
        let (inside, read_ok, ro_write, outside, etc) =
            run_confined(Component::LayerDiff, &rules, || {
                (
                    std::fs::write(rw.join("new"), "x").is_ok(),
                    std::fs::read_to_string(ro.join("f")).is_ok(),
                    std::fs::write(ro.join("g"), "x").map_err(|e| e.raw_os_error()),
                    std::fs::read(dir.path().join("outside")).map_err(|e| e.raw_os_error()),
                    std::fs::read("/etc/passwd").map_err(|e| e.raw_os_error()),
                )
            })
            .expect("Landlock confines here");
        assert!(inside && read_ok);
        assert_eq!(ro_write, Err(Some(libc::EACCES)));
        assert_eq!(outside, Err(Some(libc::EACCES)));
        assert_eq!(etc, Err(Some(libc::EACCES)));
        // the caller's thread is untouched
        assert!(std::fs::read(dir.path().join("outside")).is_ok());
    }

    /// A store and a directory beside it, outside its rules; `None` (and
    /// why) without Landlock.
    fn store_and_outside() -> Option<(tempfile::TempDir, crate::Snapshotter, PathBuf)> {
        if !matches!(status(), Status::Enforced { .. } | Status::Partial { .. }) {
            kiln_vm_tests::missing_prerequisite(&format!("Landlock: {}", status()));
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let snap =
            crate::Snapshotter::open(&dir.path().join("store"), crate::BackendKind::Copy).unwrap();
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir_all(&outside).unwrap();
        Some((dir, snap, outside))
    }

    #[test]
    fn layer_apply_under_the_store_rules_cannot_write_outside_the_store() {
        let Some((_dir, snap, outside)) = store_and_outside() else {
            return;
        };
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "planted", &b"data"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        // the apply code path, pointed at a directory outside the store,
        // fails under the store's rules...
        let confined = run_confined(Component::LayerApply, &snap.confinement(), || {
            crate::apply::apply(&tar[..], &outside, &[])
                .map(drop)
                .map_err(|e| kiln_sys::error_chain(&e))
        })
        .expect("Landlock confines here");
        let err = confined.expect_err("write outside the store");
        assert!(err.contains("Permission denied"), "{err}");
        assert!(!outside.join("planted").exists());
        // ...and works unconfined, so the rules are what stopped it
        crate::apply::apply(&tar[..], &outside, &[]).unwrap();
        assert!(outside.join("planted").exists());
    }

    #[test]
    fn check_reports_what_a_confined_thread_got() {
        let dir = tempfile::tempdir().unwrap();
        let got = check(Component::Export, &Rules::new().write(dir.path()));
        match status() {
            Status::Unsupported(_) => assert!(matches!(got, Status::Unsupported(_))),
            s => assert_eq!(got, s),
        }
        // rules that allow `/` itself: the check sees it was not confined
        if !matches!(status(), Status::Unsupported(_)) {
            let got = check(Component::Export, &Rules::new().read("/"));
            assert!(
                matches!(got, Status::Unsupported(ref why) if why.contains("allowed")),
                "{got}"
            );
        }
    }

    #[test]
    fn layer_diff_under_the_store_rules_cannot_read_outside_the_store() {
        let Some((_dir, snap, outside)) = store_and_outside() else {
            return;
        };
        std::fs::write(outside.join("host-file"), "host data").unwrap();
        // The diff code path, pointed at a directory outside the store
        // (as a bug or a hostile tree might steer it), fails under the
        // store's rules...
        let confined = run_confined(Component::LayerDiff, &snap.confinement(), || {
            crate::diff::write_layer(&outside, snap.content(), crate::DiffOptions::default())
                .map(drop)
                .map_err(|e| kiln_sys::error_chain(&e))
        })
        .expect("Landlock confines here");
        let err = confined.expect_err("read outside the store");
        assert!(err.contains("Permission denied"), "{err}");
        // ...and works unconfined, so the rules are what stopped it.
        assert!(
            crate::diff::write_layer(&outside, snap.content(), crate::DiffOptions::default())
                .is_ok()
        );
    }
}
