//! `kiln info`: what this host can do, as sections printed as text or as
//! one JSON object (`--format json`). Each section is a field of [`Info`];
//! a new fact about the host is a new section, not a new command.
//!
//! Facts about the calling user (its id maps) are read before kiln joins
//! its user namespace ([`HostFacts`]); the snapshotter probe runs inside
//! it, where views are made.

use std::path::Path;

use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::engine::emulation::{self, PlatformSupport};

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Output format: text or json
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

/// The kernel and the features kiln looked for.
#[derive(Debug, Serialize)]
pub struct Kernel {
    pub release: String,
    /// unprivileged user namespaces can be created
    pub user_namespaces: bool,
    /// `/dev/fuse` is usable by unprivileged users (mode 0666)
    pub fuse: bool,
    /// binfmt_misc can be mounted in a user namespace (Linux 6.7+)
    pub binfmt_misc_in_userns: bool,
    /// seccomp filters are available
    pub seccomp: bool,
}

/// The calling user and the id maps its steps get.
#[derive(Debug, Serialize)]
pub struct User {
    pub uid: u32,
    /// `inside:outside:count` per line of the uid map
    pub uid_map: Vec<String>,
    pub gid_map: Vec<String>,
    /// how the maps are written
    pub method: String,
    /// why only id 0 is mapped, when it is
    pub limited: Option<String>,
    /// where the ids come from, and why those
    pub source: String,
}

/// Landlock: host-side confinement and step scoping.
#[derive(Debug, Serialize)]
pub struct Landlock {
    /// the kernel's ABI version; 0 without Landlock
    pub abi: i64,
    /// what a thread of each host-side component got, checked (a
    /// confined thread must be refused a listing of `/`), by component
    pub components: std::collections::BTreeMap<String, String>,
    /// abstract unix sockets and signals scoped in every step (ABI 6+)
    pub step_scoping: bool,
}

/// The default seccomp profile compiled into this kiln.
#[derive(Debug, Serialize)]
pub struct Seccomp {
    /// sha256 of the compiled BPF program
    pub default_profile_sha256: String,
    pub instructions: usize,
}

/// Facts read outside kiln's user namespace.
#[derive(Debug)]
pub struct HostFacts {
    kernel: Kernel,
    user: User,
}

impl HostFacts {
    /// Read them; call before `userns::enter`.
    pub fn gather() -> HostFacts {
        use kiln_runtime::idmap::{IdEnv, IdMapping, Method};
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let user_namespaces = read("/proc/sys/user/max_user_namespaces").trim() != "0"
            && read("/proc/sys/kernel/unprivileged_userns_clone").trim() != "0";
        let fuse = std::fs::metadata("/dev/fuse")
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
            .unwrap_or(false);
        let version: Vec<u32> = release
            .split(|c: char| !c.is_ascii_digit())
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        let binfmt_misc_in_userns = version.as_slice() >= [6, 7].as_slice();
        let seccomp = read("/proc/self/status")
            .lines()
            .any(|l| l.starts_with("Seccomp:"));
        let env = IdEnv::from_host();
        let mapping = IdMapping::decide(&env);
        let lines = |v: &[kiln_runtime::idmap::Range]| {
            v.iter()
                .map(|r| format!("{}:{}:{}", r.inside, r.outside, r.count))
                .collect()
        };
        HostFacts {
            kernel: Kernel {
                release,
                user_namespaces,
                fuse,
                binfmt_misc_in_userns,
                seccomp,
            },
            user: User {
                uid: env.euid,
                uid_map: lines(&mapping.uids),
                gid_map: lines(&mapping.gids),
                method: match &mapping.method {
                    Method::Helpers { newuidmap, .. } => {
                        format!("newuidmap/newgidmap ({})", newuidmap.display())
                    }
                    Method::Direct { .. } => "written directly".into(),
                },
                limited: mapping.limited.map(String::from),
                source: id_source(&env, &mapping),
            },
        }
    }
}

/// Where a sandbox's ids come from, in words, for `kiln info`.
fn id_source(env: &kiln_runtime::idmap::IdEnv, mapping: &kiln_runtime::idmap::IdMapping) -> String {
    use kiln_runtime::idmap::{Method, ROOT_FALLBACK_START};
    if !env.in_initial_userns() {
        // each line of our own map: ids here and what they are outside
        let outer = env
            .own_uid_map
            .lines()
            .filter_map(|l| {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                (f.len() == 3 && f[2] > 0).then(|| {
                    format!(
                        "{}-{} are {}-{}",
                        f[0],
                        f[0] + f[2] - 1,
                        f[1],
                        f[1] + f[2] - 1
                    )
                })
            })
            .collect::<Vec<_>>()
            .join(", ");
        let own_ns = if env.euid == 0
            && mapping.limited.is_none()
            && !kiln_runtime::userns::has_effective_cap(kiln_runtime::userns::CAP_SYS_ADMIN)
        {
            "; kiln has no CAP_SYS_ADMIN there, so it makes a user namespace of its own inside it (CAP_SETUID and CAP_SETGID suffice)"
        } else {
            ""
        };
        return format!(
            "the ids of the user namespace kiln runs in (a container's, or another tool's), never more: its uids {outer} outside it{own_ns}"
        );
    }
    match (&mapping.method, env.euid) {
        (Method::Helpers { .. }, _) => {
            "your ranges in /etc/subuid and /etc/subgid, written by the setuid helpers".into()
        }
        (Method::Direct { .. }, 0)
            if mapping.uids.first().map(|r| r.outside) == Some(ROOT_FALLBACK_START) =>
        {
            format!(
                "kiln's fixed range at {ROOT_FALLBACK_START} (root has no /etc/subuid entry); a step is never real root"
            )
        }
        (Method::Direct { .. }, 0) => {
            "root's ranges in /etc/subuid and /etc/subgid; a step is never real root".into()
        }
        (Method::Direct { .. }, _) => "your own id only".into(),
    }
}

/// Everything `kiln info` reports, one field per section.
#[derive(Debug, Serialize)]
pub struct Info {
    pub kernel: Kernel,
    pub user: User,
    /// the writable-view backend `--snapshotter auto` picks here
    pub snapshotter: String,
    pub landlock: Landlock,
    pub seccomp: Seccomp,
    /// the user-mode network stack of `--network sandbox`
    pub network_stack: String,
    /// platforms RUN steps can run on, natively or emulated, and how
    pub platforms: Vec<PlatformSupport>,
    /// the effective kiln.toml settings and where each came from
    pub settings: Vec<crate::config::Row>,
    /// how step limits are enforced here
    pub limits: String,
}

impl Info {
    /// The facts of this host; `state` is where the snapshotter probe
    /// (and its cached answer) lives.
    pub fn gather(host: HostFacts, state: &Path, settings: &crate::config::Settings) -> Self {
        let abi = kiln_snapshotter::confine::abi();
        let bpf = kiln_runtime::seccomp::default_profile_bytes();
        Info {
            kernel: host.kernel,
            user: host.user,
            snapshotter: format!("{:?}", kiln_snapshotter::backend::probe::probe(state))
                .to_lowercase(),
            landlock: Landlock {
                abi,
                components: {
                    use kiln_snapshotter::confine::{check, Component, Rules};
                    // each component is confined to directories of the
                    // state directory (plus the context or destination
                    // it reads or writes): checked here with the state
                    // directory alone
                    let rules = Rules::new().write(state);
                    Component::ALL
                        .iter()
                        .map(|c| (c.to_string(), check(*c, &rules).to_string()))
                        .collect()
                },
                step_scoping: abi >= 6,
            },
            seccomp: Seccomp {
                default_profile_sha256: format!("{:x}", Sha256::digest(bpf)),
                instructions: bpf.len() / 8,
            },
            network_stack: match kiln_runtime::net::Stack::detect() {
                Ok(s) => s.name().to_string(),
                Err(e) => format!("none: {}", crate::error_chain(&e)),
            },
            platforms: emulation::host_support(),
            settings: settings.rows(),
            limits: match kiln_runtime::cgroup::detect() {
                Ok(d) => format!(
                    "rlimits, and cgroup v2 under {} (delegated; controllers: {}): --memory, --pids-limit and --cpus give each RUN step a cgroup of its own",
                    d.path.display(),
                    d.controllers.join(" ")
                ),
                Err(why) => format!(
                    "rlimits only ({why}); --memory, --pids-limit and --cpus are refused"
                ),
            },
        }
    }

    /// The text form: a heading per section, one line per fact.
    pub fn text(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let k = &self.kernel;
        let mut out = format!(
            "Kernel: {}\n  user namespaces: {}\n  /dev/fuse usable: {}\n  binfmt_misc in a user namespace: {}\n  seccomp: {}\n",
            k.release,
            yes(k.user_namespaces),
            yes(k.fuse),
            yes(k.binfmt_misc_in_userns),
            yes(k.seccomp)
        );
        let u = &self.user;
        out.push_str(&format!(
            "User: uid {}\n  uid map: {}\n  gid map: {}\n  written by: {}\n",
            u.uid,
            u.uid_map.join(", "),
            u.gid_map.join(", "),
            u.method
        ));
        out.push_str(&format!("  ids from: {}\n", u.source));
        if let Some(why) = &u.limited {
            out.push_str(&format!("  only id 0 is mapped: {why}\n"));
        }
        out.push_str(&format!("Snapshotter: {}\n", self.snapshotter));
        out.push_str(&format!("Landlock: ABI {}\n", self.landlock.abi));
        for (component, status) in &self.landlock.components {
            out.push_str(&format!("  {component}: {status}\n"));
        }
        out.push_str(&format!(
            "  steps scoped (abstract sockets, signals): {}\n",
            yes(self.landlock.step_scoping)
        ));
        out.push_str(&format!(
            "Seccomp: default profile sha256:{} ({} instructions)\n",
            self.seccomp.default_profile_sha256, self.seccomp.instructions
        ));
        out.push_str(&format!("Network stack: {}\n", self.network_stack));
        out.push_str("Platforms:\n");
        for p in &self.platforms {
            out.push_str(&format!("  {:<16} {}", p.platform, p.how));
            if let Some(i) = &p.interpreter {
                out.push_str(&format!(" ({i})"));
            }
            out.push('\n');
            if let Some(fix) = &p.fix {
                out.push_str(&format!("  {:<16}   {fix}\n", ""));
            }
        }
        out.push_str("Settings (kiln.toml):\n");
        let width = self.settings.iter().map(|r| r.key.len()).max().unwrap_or(0);
        for r in &self.settings {
            let enforced = if r.enforced { ", enforced" } else { "" };
            out.push_str(&format!(
                "  {:<width$} {} (from {}{enforced})\n",
                r.key, r.value, r.from
            ));
        }
        out.push_str(&format!("Step limits: {}\n", self.limits));
        out
    }
}

pub fn run(
    root: Option<&Path>,
    host: HostFacts,
    settings: &crate::config::Settings,
    args: InfoArgs,
) -> anyhow::Result<i32> {
    let state = crate::image::StateDir::open(root)?;
    let info = Info::gather(host, state.root(), settings);
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info.text());
    }
    Ok(0)
}
