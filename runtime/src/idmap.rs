//! Which ids a sandbox's user namespace maps, and how the maps get written.
//!
//! The decision is pure (it reads an [`IdEnv`] snapshot of the host), so it is
//! unit-tested without privileges; [`IdMapping::apply`] performs it for one
//! child process. This module must never map a sandbox's uid 0 to real root.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// How many ids a full sandbox mapping covers, as rootless Podman: 0 plus
/// 1..65535 from the subordinate range.
pub const FULL_RANGE: u32 = 65_536;

/// Subordinate range used when real root starts kiln and /etc/subuid has no
/// entry for root: steps must never be real root, and this range lies above
/// what `useradd` hands out (SUB_UID_MAX defaults to 600100000).
pub const ROOT_FALLBACK_START: u32 = 3_000_000_000;

/// One line of a uid_map or gid_map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

/// How the maps are written into the child's /proc/PID files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// the setuid helpers from shadow's uidmap package
    Helpers {
        newuidmap: PathBuf,
        newgidmap: PathBuf,
    },
    /// written by us: we hold CAP_SETUID/CAP_SETGID over the parent
    /// namespace (real root, or kiln already inside its own namespace), or we
    /// map only our own id (then setgroups must be denied first)
    Direct { deny_setgroups: bool },
}

/// The maps for one sandbox and how to install them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMapping {
    pub uids: Vec<Range>,
    pub gids: Vec<Range>,
    pub method: Method,
    /// set when only uid 0 could be mapped; says why
    pub limited: Option<&'static str>,
}

/// What the mapping decision looks at, read from the host by
/// [`IdEnv::from_host`] or built by tests.
#[derive(Debug, Clone, Default)]
pub struct IdEnv {
    pub euid: u32,
    pub egid: u32,
    pub user_name: Option<String>,
    pub subuid: String,
    pub subgid: String,
    /// contents of /proc/self/uid_map
    pub own_uid_map: String,
    pub own_gid_map: String,
    pub newuidmap: Option<PathBuf>,
    pub newgidmap: Option<PathBuf>,
}

impl IdEnv {
    /// Whether the process lives in the initial user namespace (not in a
    /// container's or kiln's own).
    pub fn in_initial_userns(&self) -> bool {
        in_initial_userns(&self.own_uid_map)
    }

    /// Snapshot the calling process and the host's id configuration.
    pub fn from_host() -> Self {
        let euid = nix::unistd::geteuid().as_raw();
        let egid = nix::unistd::getegid().as_raw();
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let own_uid_map = read("/proc/self/uid_map");
        // The name only matters for finding a subordinate range, which only
        // an unprivileged user in the initial namespace needs; skipping the
        // lookup elsewhere keeps every step start free of NSS.
        let needs_range = euid != 0 && in_initial_userns(&own_uid_map);
        let (subuid, subgid, user_name) = if needs_range {
            (read("/etc/subuid"), read("/etc/subgid"), user_name(euid))
        } else if euid == 0 && in_initial_userns(&own_uid_map) {
            (
                read("/etc/subuid"),
                read("/etc/subgid"),
                Some("root".to_string()),
            )
        } else {
            Default::default()
        };
        IdEnv {
            euid,
            egid,
            user_name,
            subuid,
            subgid,
            own_gid_map: read("/proc/self/gid_map"),
            own_uid_map,
            newuidmap: needs_range.then(|| find_helper("newuidmap")).flatten(),
            newgidmap: needs_range.then(|| find_helper("newgidmap")).flatten(),
        }
    }
}

/// The name of `uid`: from /etc/passwd (as shadow's tools read
/// /etc/subuid by name), falling back to NSS for directory users.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let id = uid.to_string();
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)? == id).then(|| name.to_string())
        })
        .or_else(|| {
            nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
}

fn find_helper(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Parse a uid_map/gid_map file.
fn parse_map(text: &str) -> Vec<Range> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|w| w.parse::<u32>());
            match (f.next(), f.next(), f.next()) {
                (Some(Ok(inside)), Some(Ok(outside)), Some(Ok(count))) => Some(Range {
                    inside,
                    outside,
                    count,
                }),
                _ => None,
            }
        })
        .collect()
}

/// The first subordinate range granted to `name` or `id` in /etc/subuid
/// (or /etc/subgid) text.
pub fn subordinate_range(text: &str, name: Option<&str>, id: u32) -> Option<(u32, u32)> {
    let id = id.to_string();
    text.lines().find_map(|line| {
        let line = line.trim();
        if line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let who = f.next()?;
        let start = f.next()?.trim().parse().ok()?;
        let count: u32 = f.next()?.trim().parse().ok()?;
        (count > 0 && (Some(who) == name || who == id)).then_some((start, count))
    })
}

/// Whether the process lives in the initial user namespace (its map is the
/// identity over the whole id space).
fn in_initial_userns(own_map: &str) -> bool {
    parse_map(own_map)
        == [Range {
            inside: 0,
            outside: 0,
            count: u32::MAX,
        }]
}

/// An identity map over the ids of our own namespace that lie in
/// `0..FULL_RANGE`, one line per extent of our own map: the kernel requires
/// each line of a child's map to fall inside a single extent of the
/// parent's, so a line may not straddle two of them.
fn identity_over(own_map: &str) -> Vec<Range> {
    let mut ranges = parse_map(own_map);
    ranges.sort_by_key(|r| r.inside);
    ranges
        .into_iter()
        .filter(|r| r.inside < FULL_RANGE)
        .map(|r| Range {
            inside: r.inside,
            outside: r.inside,
            count: r.count.min(FULL_RANGE - r.inside),
        })
        .collect()
}

impl IdMapping {
    /// Decide the sandbox's maps for the process described by `env`.
    pub fn decide(env: &IdEnv) -> IdMapping {
        if !in_initial_userns(&env.own_uid_map) {
            Self::nested(env)
        } else if env.euid == 0 {
            Self::for_real_root(env)
        } else {
            Self::for_user(env)
        }
    }

    /// Only the caller's own ids, mapped to 0: what a sandbox gets when
    /// nothing more is available, and why.
    fn single(env: &IdEnv, reason: &'static str) -> IdMapping {
        IdMapping {
            uids: vec![Range {
                inside: 0,
                outside: env.euid,
                count: 1,
            }],
            gids: vec![Range {
                inside: 0,
                outside: env.egid,
                count: 1,
            }],
            method: Method::Direct {
                deny_setgroups: true,
            },
            limited: Some(reason),
        }
    }

    /// kiln already runs inside its own user namespace: nest an identity
    /// map over what that namespace has.
    fn nested(env: &IdEnv) -> IdMapping {
        if env.euid != 0 {
            return Self::single(env, "kiln runs as a non-root user inside a user namespace");
        }
        let uids = identity_over(&env.own_uid_map);
        let gids = identity_over(&env.own_gid_map);
        if !uids.iter().any(|r| r.inside == 0) || !gids.iter().any(|r| r.inside == 0) {
            return Self::single(env, "uid 0 is not mapped in kiln's own user namespace");
        }
        IdMapping {
            uids,
            gids,
            method: Method::Direct {
                deny_setgroups: false,
            },
            limited: None,
        }
    }

    /// Real root: a step is never real root. Use root's own subordinate
    /// range, or a fixed high range.
    fn for_real_root(env: &IdEnv) -> IdMapping {
        let name = env.user_name.as_deref().or(Some("root"));
        let (us, uc) =
            subordinate_range(&env.subuid, name, 0).unwrap_or((ROOT_FALLBACK_START, FULL_RANGE));
        let (gs, gc) =
            subordinate_range(&env.subgid, name, 0).unwrap_or((ROOT_FALLBACK_START, FULL_RANGE));
        IdMapping {
            uids: vec![Range {
                inside: 0,
                outside: us,
                count: uc.min(FULL_RANGE),
            }],
            gids: vec![Range {
                inside: 0,
                outside: gs,
                count: gc.min(FULL_RANGE),
            }],
            method: Method::Direct {
                deny_setgroups: false,
            },
            limited: None,
        }
    }

    /// An unprivileged user: 0 is the user, 1.. their subordinate range,
    /// written by the setuid helpers; only 0 without a range or helpers.
    fn for_user(env: &IdEnv) -> IdMapping {
        let name = env.user_name.as_deref();
        let sub_u = subordinate_range(&env.subuid, name, env.euid);
        let sub_g = subordinate_range(&env.subgid, name, env.euid);
        let ((us, uc), (gs, gc), nu, ng) = match (sub_u, sub_g, &env.newuidmap, &env.newgidmap) {
            (Some(u), Some(g), Some(nu), Some(ng)) => (u, g, nu, ng),
            (None, _, _, _) | (_, None, _, _) => {
                return Self::single(env, "your user has no range in /etc/subuid and /etc/subgid")
            }
            _ => {
                return Self::single(
                    env,
                    "newuidmap/newgidmap are not installed (package uidmap)",
                )
            }
        };
        let pair = |own: u32, start: u32, count: u32| {
            vec![
                Range {
                    inside: 0,
                    outside: own,
                    count: 1,
                },
                Range {
                    inside: 1,
                    outside: start,
                    count: count.min(FULL_RANGE - 1),
                },
            ]
        };
        IdMapping {
            uids: pair(env.euid, us, uc),
            gids: pair(env.egid, gs, gc),
            method: Method::Helpers {
                newuidmap: nu.clone(),
                newgidmap: ng.clone(),
            },
            limited: None,
        }
    }

    /// The mapping for sandboxes of this process, decided once: after
    /// [`crate::userns::enter`] a process never changes namespace, and a
    /// build starts many steps (each would otherwise re-read the maps).
    pub fn current() -> &'static IdMapping {
        static CURRENT: std::sync::OnceLock<IdMapping> = std::sync::OnceLock::new();
        CURRENT.get_or_init(|| IdMapping::decide(&IdEnv::from_host()))
    }

    /// Whether container id `id` exists in this mapping.
    pub fn maps_uid(&self, id: u32) -> bool {
        self.uids
            .iter()
            .any(|r| id >= r.inside && id - r.inside < r.count)
    }

    pub fn maps_gid(&self, id: u32) -> bool {
        self.gids
            .iter()
            .any(|r| id >= r.inside && id - r.inside < r.count)
    }

    /// Print the "only uid 0 is mapped" notice on stderr, once per process.
    pub fn warn_once(&self) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if let Some(reason) = self.limited {
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "kiln: only uid/gid 0 is mapped in sandboxes because {reason}; \
                     steps that need other users will fail"
                );
            }
        }
    }

    /// Install the maps for the child `pid`, which must be blocked waiting
    /// for us.
    pub fn apply(&self, pid: i32) -> Result<()> {
        match &self.method {
            Method::Helpers {
                newuidmap,
                newgidmap,
            } => {
                // The two helpers are independent: run them side by side.
                let u = spawn_helper(newuidmap, "newuidmap", pid, &self.uids)?;
                let g = spawn_helper(newgidmap, "newgidmap", pid, &self.gids)?;
                let ru = finish_helper(u, "newuidmap");
                let rg = finish_helper(g, "newgidmap");
                ru.and(rg)
            }
            Method::Direct { deny_setgroups } => {
                if *deny_setgroups {
                    write_proc(pid, "setgroups", "deny")?;
                }
                write_proc(pid, "gid_map", &format_map(&self.gids))?;
                write_proc(pid, "uid_map", &format_map(&self.uids))
            }
        }
    }
}

fn format_map(ranges: &[Range]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
        .collect()
}

fn write_proc(pid: i32, file: &str, text: &str) -> Result<()> {
    let path = format!("/proc/{pid}/{file}");
    std::fs::write(&path, text).map_err(|source| Error::WriteIdMap { path, source })
}

fn spawn_helper(
    path: &Path,
    helper: &'static str,
    pid: i32,
    ranges: &[Range],
) -> Result<std::process::Child> {
    let mut cmd = Command::new(path);
    cmd.arg(pid.to_string());
    for r in ranges {
        cmd.args([
            r.inside.to_string(),
            r.outside.to_string(),
            r.count.to_string(),
        ]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn()
        .map_err(|source| Error::IdMapHelperMissing { helper, source })
}

fn finish_helper(mut child: std::process::Child, helper: &'static str) -> Result<()> {
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child
        .wait()
        .map_err(|source| Error::IdMapHelperMissing { helper, source })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::IdMapHelper {
            helper,
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(euid: u32) -> IdEnv {
        IdEnv {
            euid,
            egid: euid,
            user_name: Some("alice".into()),
            subuid: "bob:100000:65536\nalice:165536:65536\n".into(),
            subgid: "alice:165536:65536\n".into(),
            own_uid_map: "         0          0 4294967295\n".into(),
            own_gid_map: "         0          0 4294967295\n".into(),
            newuidmap: Some("/usr/bin/newuidmap".into()),
            newgidmap: Some("/usr/bin/newgidmap".into()),
        }
    }

    #[test]
    fn unprivileged_user_with_range_gets_full_map_through_helpers() {
        let m = IdMapping::decide(&host(1000));
        assert_eq!(
            m.uids,
            vec![
                Range {
                    inside: 0,
                    outside: 1000,
                    count: 1
                },
                Range {
                    inside: 1,
                    outside: 165536,
                    count: 65535
                }
            ]
        );
        assert!(matches!(m.method, Method::Helpers { .. }));
        assert!(m.limited.is_none());
        assert!(m.maps_uid(65535) && !m.maps_uid(65536));
    }

    #[test]
    fn missing_range_or_helper_maps_only_root_and_denies_setgroups() {
        let mut env = host(1000);
        env.subgid.clear();
        let m = IdMapping::decide(&env);
        assert_eq!(
            m.uids,
            vec![Range {
                inside: 0,
                outside: 1000,
                count: 1
            }]
        );
        assert_eq!(
            m.method,
            Method::Direct {
                deny_setgroups: true
            }
        );
        assert!(m.limited.unwrap().contains("/etc/subuid"));

        let mut env = host(1000);
        env.newgidmap = None;
        let m = IdMapping::decide(&env);
        assert!(m.limited.unwrap().contains("uidmap"));
    }

    #[test]
    fn numeric_subuid_entries_match() {
        let mut env = host(1000);
        env.user_name = None;
        env.subuid = "1000:200000:1000\n".into();
        env.subgid = "1000:200000:1000\n".into();
        let m = IdMapping::decide(&env);
        assert_eq!(
            m.uids[1],
            Range {
                inside: 1,
                outside: 200000,
                count: 1000
            }
        );
    }

    #[test]
    fn real_root_never_maps_to_root() {
        let mut env = host(0);
        env.user_name = Some("root".into());
        let m = IdMapping::decide(&env);
        assert_eq!(
            m.uids,
            vec![Range {
                inside: 0,
                outside: ROOT_FALLBACK_START,
                count: FULL_RANGE
            }]
        );
        assert!(m.uids.iter().chain(&m.gids).all(|r| r.outside != 0));
        env.subuid.push_str("root:500000:65536\n");
        env.subgid.push_str("root:500000:65536\n");
        let m = IdMapping::decide(&env);
        assert_eq!(
            m.uids,
            vec![Range {
                inside: 0,
                outside: 500000,
                count: FULL_RANGE
            }]
        );
    }

    #[test]
    fn inside_a_kiln_namespace_nests_an_identity_map() {
        let mut env = host(0);
        env.own_uid_map = "0 1000 1\n1 165536 65535\n".into();
        env.own_gid_map = "0 1000 1\n1 165536 65535\n".into();
        let m = IdMapping::decide(&env);
        // One line per extent of the parent's map: a line may not straddle
        // two of them.
        assert_eq!(
            m.uids,
            vec![
                Range {
                    inside: 0,
                    outside: 0,
                    count: 1
                },
                Range {
                    inside: 1,
                    outside: 1,
                    count: 65535
                }
            ]
        );
        assert!(m.maps_uid(65535) && !m.maps_uid(65536));
        assert_eq!(
            m.method,
            Method::Direct {
                deny_setgroups: false
            }
        );
    }
}
