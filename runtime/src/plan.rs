//! What a sandbox will be, decided from the spec, the id maps and a few
//! facts about the host, without touching the system: which namespaces the
//! clone makes, which processes share kiln's memory, the ids, the command
//! line, capabilities, limits and the mounts to make. [`SandboxPlan::new`]
//! is a pure function, so every decision is unit-tested here;
//! [`crate::sandbox`] realises a plan (opens mount sources, files and
//! stacks) into the child's [`crate::child::Plan`]. This module never
//! makes a syscall.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::PathBuf;

use oci_spec::runtime::{Capability, LinuxNamespaceType, Mount, PosixRlimitType, Spec};

use crate::error::{Error, Result};
use crate::idmap::{IdMapping, Method, Range};
use crate::seccomp::Profile;
use crate::spec::{DEFAULT_PATH, SECCOMP_ANNOTATION, SHM_SIZE_ANNOTATION};

/// What the host contributes to a plan: read by [`crate::sandbox`], built
/// by tests.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// kiln's effective ids
    pub euid: u32,
    pub egid: u32,
    /// whether children may share kiln's memory (`sys::clone_vm_safe`)
    pub clone_vm_safe: bool,
    /// the highest capability number the kernel knows
    pub last_cap: u32,
}

/// The capability sets of the command, as bit masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// A spec mount, checked but not yet opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    /// destination relative to the rootfs
    pub dest: CString,
    pub kind: MountPlanKind,
    /// MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC as requested
    pub flags: libc::c_ulong,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountPlanKind {
    /// a bind mount of this absolute host path, opened as a detached tree
    /// with these MOUNT_ATTR_* attributes (recursively for `rbind`)
    Bind {
        source: PathBuf,
        recursive: bool,
        attrs: u64,
    },
    /// a tmpfs with these mount options
    Tmpfs { data: CString },
}

/// How the parent makes the sandbox's processes and namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Processes {
    /// CLONE_NEW* flags of the clone
    pub clone_flags: u64,
    /// PID 1 shares kiln's memory until it execs kiln-init (it keeps
    /// kiln's effective ids); otherwise it gets a copy, as fork gives
    pub pid1_shares_memory: bool,
    /// the command shares it too (it runs as that same root)
    pub command_shares_memory: bool,
    /// a helper makes the network namespace while PID 1 sets up mounts
    pub helper_makes_net: bool,
}

/// Everything about one sandbox that follows from its spec.
pub struct SandboxPlan {
    pub rootfs: CString,
    pub rootfs_readonly: bool,
    pub hostname: Option<CString>,
    /// the sandbox gets a network namespace of its own
    pub new_net: bool,
    /// a user-mode network stack starts on it (`sandbox`), and whether it
    /// may map the gateway to the host's loopback
    pub user_mode_network: Option<bool>,
    pub processes: Processes,
    pub mapping: IdMapping,
    pub can_setgroups: bool,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub umask: Option<u32>,
    pub args: Vec<CString>,
    /// may hold secrets (`RUN --mount=type=secret,env=`): wiped on drop
    pub env: zeroize::Zeroizing<Vec<CString>>,
    /// directories searched for `args[0]` when it has no slash
    pub path_dirs: Vec<CString>,
    pub cwd: CString,
    pub caps: CapSets,
    pub last_cap: u32,
    pub rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    /// the mount options of /dev/shm (its size)
    pub shm: CString,
    pub seccomp: Profile,
    pub mounts: Vec<MountPlan>,
    /// absolute paths inside the new root
    pub masked: Vec<CString>,
    pub readonly: Vec<CString>,
}

impl SandboxPlan {
    /// Check `spec` against what kiln supports and decide the sandbox.
    /// `rootfs` is the spec's root, made absolute and checked by the
    /// caller; `mapping` the id maps it will write.
    pub fn new(
        spec: &Spec,
        rootfs: PathBuf,
        mapping: IdMapping,
        host: &HostFacts,
    ) -> Result<SandboxPlan> {
        let process = supported_process(spec)?;
        let linux = spec
            .linux()
            .as_ref()
            .ok_or_else(|| Error::InvalidSpec("the spec has no linux section".into()))?;
        if linux.seccomp().is_some() {
            return Err(Error::Unsupported(format!(
                "linux.seccomp in OCI format; name a seccompiler profile with the {SECCOMP_ANNOTATION} annotation"
            )));
        }
        if linux.uid_mappings().is_some() || linux.gid_mappings().is_some() {
            return Err(Error::Unsupported(
                "linux.uidMappings/gidMappings: kiln decides the id maps itself".into(),
            ));
        }
        let new_net = namespaces(linux.namespaces().as_deref().unwrap_or_default())?;
        let user_mode_network = user_mode_network(spec, new_net)?;

        let user = process.user();
        let groups: Vec<u32> = user.additional_gids().clone().unwrap_or_default();
        let can_setgroups = check_ids(&mapping, user.uid(), user.gid(), &groups)?;

        let (args, env, path_dirs) = command_line(process)?;

        let caps = capabilities(process)?;
        let rlimits = process
            .rlimits()
            .iter()
            .flatten()
            .map(|r| {
                let lim = libc::rlimit {
                    rlim_cur: r.soft(),
                    rlim_max: r.hard(),
                };
                (rlimit_resource(r.typ()), lim)
            })
            .collect();
        let seccomp = Profile::parse(
            spec.annotations()
                .as_ref()
                .and_then(|a| a.get(SECCOMP_ANNOTATION))
                .map_or("default", String::as_str),
        );

        let mounts = spec
            .mounts()
            .iter()
            .flatten()
            .map(mount_plan)
            .collect::<Result<Vec<_>>>()?;
        let abs = |v: &Option<Vec<String>>| -> Result<Vec<CString>> {
            v.iter()
                .flatten()
                .map(|p| cstring("a masked path", p))
                .collect()
        };
        let processes = processes(
            &mapping,
            host,
            new_net,
            user_mode_network.is_some(),
            (user.uid(), user.gid()),
        );
        let root = spec.root().as_ref();
        Ok(SandboxPlan {
            rootfs: cstring("the rootfs path", &rootfs)?,
            rootfs_readonly: root.and_then(|r| r.readonly()) == Some(true),
            hostname: spec
                .hostname()
                .as_ref()
                .map(|h| cstring("the hostname", h))
                .transpose()?,
            new_net,
            user_mode_network,
            processes,
            can_setgroups,
            uid: user.uid(),
            gid: user.gid(),
            groups,
            umask: user.umask(),
            args,
            env,
            path_dirs,
            cwd: cstring("the working directory", process.cwd())?,
            caps,
            last_cap: host.last_cap,
            rlimits,
            shm: shm_options(spec)?,
            seccomp,
            mounts,
            masked: abs(linux.masked_paths())?,
            readonly: abs(linux.readonly_paths())?,
            mapping,
        })
    }
}

/// A C string of `s`; a NUL byte inside is an error naming `what`.
pub fn cstring(what: &str, s: impl AsRef<std::ffi::OsStr>) -> Result<CString> {
    kiln_sys::cstr(s).map_err(|_| Error::NulByte { what: what.into() })
}

/// The spec's process, refused when it asks for what kiln does not do
/// (an error, never silently ignored).
fn supported_process(spec: &Spec) -> Result<&oci_spec::runtime::Process> {
    let process = spec.process().as_ref().ok_or(Error::NoProcess)?;
    if process.terminal() == Some(true) {
        return Err(Error::Unsupported(
            "process.terminal (a pseudo-terminal for the command)".into(),
        ));
    }
    if process.no_new_privileges() == Some(false) {
        return Err(Error::Unsupported(
            "no_new_privileges=false: kiln always sets no_new_privs".into(),
        ));
    }
    if process.apparmor_profile().is_some() || process.selinux_label().is_some() {
        return Err(Error::Unsupported(
            "an AppArmor profile or SELinux label".into(),
        ));
    }
    Ok(process)
}

/// Check the spec's namespaces: every one kiln needs is new, none is
/// joined by path. Returns whether a network namespace is asked for.
fn namespaces(list: &[oci_spec::runtime::LinuxNamespace]) -> Result<bool> {
    let mut new_net = false;
    let mut seen = Vec::new();
    for ns in list {
        if ns.path().is_some() {
            return Err(Error::Unsupported(
                "joining an existing namespace by path".into(),
            ));
        }
        if ns.typ() == LinuxNamespaceType::Network {
            new_net = true;
        }
        seen.push(ns.typ());
    }
    for required in crate::spec::REQUIRED_NAMESPACES {
        if !seen.contains(&required) {
            return Err(Error::Unsupported(format!(
                "running without a new {required:?} namespace"
            )));
        }
    }
    Ok(new_net)
}

/// The network annotation: `Some(allow_host_loopback)` when a user-mode
/// stack must start on the sandbox's own network namespace.
fn user_mode_network(spec: &Spec, new_net: bool) -> Result<Option<bool>> {
    let annotation = crate::net::NETWORK_ANNOTATION;
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(annotation))
        .map(String::as_str)
    {
        None => Ok(None),
        Some(v @ ("sandbox" | "sandbox+host-loopback")) => {
            if !new_net {
                return Err(Error::InvalidSpec(format!(
                    "{annotation}={v} needs a new network namespace"
                )));
            }
            Ok(Some(v == "sandbox+host-loopback"))
        }
        Some(other) => Err(Error::Unsupported(format!(
            "network mode {other:?} in the {annotation} annotation (known: sandbox, sandbox+host-loopback)"
        ))),
    }
}

/// Check that the process's ids fit in the maps; returns whether
/// setgroups(2) is allowed (not denied for a single-id map).
fn check_ids(mapping: &IdMapping, uid: u32, gid: u32, groups: &[u32]) -> Result<bool> {
    let reason = mapping
        .limited
        .unwrap_or("it lies outside the mapped range");
    if !mapping.maps_uid(uid) {
        return Err(Error::IdNotMapped { id: uid, reason });
    }
    for gid in std::iter::once(gid).chain(groups.iter().copied()) {
        if !mapping.maps_gid(gid) {
            return Err(Error::IdNotMapped { id: gid, reason });
        }
    }
    let can_setgroups = !matches!(
        mapping.method,
        Method::Direct {
            deny_setgroups: true
        }
    );
    if !can_setgroups && !groups.is_empty() {
        return Err(Error::IdNotMapped {
            id: groups[0],
            reason: mapping.limited.unwrap_or("setgroups is denied"),
        });
    }
    Ok(can_setgroups)
}

/// The command's argv, environment and PATH search list.
#[allow(clippy::type_complexity)]
fn command_line(
    process: &oci_spec::runtime::Process,
) -> Result<(Vec<CString>, zeroize::Zeroizing<Vec<CString>>, Vec<CString>)> {
    let args = process.args().as_ref().ok_or(Error::NoArgs)?;
    if args.is_empty() {
        return Err(Error::NoArgs);
    }
    let args: Vec<CString> = args
        .iter()
        .map(|a| cstring("an argument", a))
        .collect::<Result<_>>()?;
    let env_strings = zeroize::Zeroizing::new(process.env().clone().unwrap_or_default());
    let path_dirs = path_dirs(&env_strings)?;
    let env = zeroize::Zeroizing::new(
        env_strings
            .iter()
            .map(|e| cstring("an environment entry", e))
            .collect::<Result<Vec<_>>>()?,
    );
    Ok((args, env, path_dirs))
}

/// The process's capability sets as masks; ambient capabilities are
/// refused.
fn capabilities(process: &oci_spec::runtime::Process) -> Result<CapSets> {
    let caps = process.capabilities().as_ref();
    if caps
        .and_then(|c| c.ambient().as_ref())
        .is_some_and(|a| !a.is_empty())
    {
        return Err(Error::Unsupported("ambient capabilities".into()));
    }
    Ok(CapSets {
        bounding: capability_mask(caps.and_then(|c| c.bounding().as_ref()))?,
        effective: capability_mask(caps.and_then(|c| c.effective().as_ref()))?,
        permitted: capability_mask(caps.and_then(|c| c.permitted().as_ref()))?,
        inheritable: capability_mask(caps.and_then(|c| c.inheritable().as_ref()))?,
    })
}

/// The PATH search list: the environment's PATH, else kiln's default.
fn path_dirs(env: &[String]) -> Result<Vec<CString>> {
    env.iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| cstring("PATH", d))
        .collect()
}

/// How the processes are made (see [`crate::sys::clone_vm`]). PID 1
/// shares our memory until it execs kiln-init when it keeps our effective
/// ids (uid and gid 0 of its namespace are ours); otherwise, as when kiln
/// runs as real root and maps the sandbox's root to a subordinate id, it
/// gets a copy, as fork gives. The command shares it too when it runs as
/// that root; a USER of another id is forked. A network namespace of the
/// step's own takes longer to make than anything else in the sandbox
/// (loopback, sysctl tables, sysfs entries): unless a network stack must
/// start on it right after the clone, a helper makes it while PID 1 sets
/// up the mounts, and PID 1 joins it before it mounts /sys.
fn processes(
    mapping: &IdMapping,
    host: &HostFacts,
    new_net: bool,
    user_mode_network: bool,
    (uid, gid): (u32, u32),
) -> Processes {
    let ours = |ranges: &[Range], id: u32| ranges.iter().any(|r| r.inside == 0 && r.outside == id);
    let pid1_shares_memory =
        host.clone_vm_safe && ours(&mapping.uids, host.euid) && ours(&mapping.gids, host.egid);
    let helper_makes_net = host.clone_vm_safe && new_net && !user_mode_network;
    let mut clone_flags = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u64;
    if new_net && !helper_makes_net {
        clone_flags |= libc::CLONE_NEWNET as u64;
    }
    Processes {
        clone_flags,
        pid1_shares_memory,
        command_shares_memory: pid1_shares_memory && uid == 0 && gid == 0,
        helper_makes_net,
    }
}

fn capability_mask(set: Option<&HashSet<Capability>>) -> Result<u64> {
    let mut mask = 0u64;
    for cap in set.into_iter().flatten() {
        let name = format!("CAP_{cap}");
        let c: caps::Capability = name
            .parse()
            .map_err(|_| Error::InvalidSpec(format!("unknown capability {name}")))?;
        mask |= c.bitmask();
    }
    Ok(mask)
}

/// /dev/shm's tmpfs options: the size from [`SHM_SIZE_ANNOTATION`] in
/// bytes (at least 4 KiB), else Docker's 64 MiB.
fn shm_options(spec: &Spec) -> Result<CString> {
    let size = match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(SHM_SIZE_ANNOTATION))
    {
        None => 64 << 20,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n >= 4096 => n,
            _ => {
                return Err(Error::InvalidSpec(format!(
                    "{SHM_SIZE_ANNOTATION}={v:?}: a size in bytes, at least 4096"
                )))
            }
        },
    };
    cstring("the /dev/shm options", format!("mode=1777,size={size}"))
}

fn rlimit_resource(kind: PosixRlimitType) -> libc::__rlimit_resource_t {
    match kind {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

/// A spec mount checked: an absolute destination below /, supported
/// options, and a bind or tmpfs type.
fn mount_plan(m: &Mount) -> Result<MountPlan> {
    let dest = m.destination().to_string_lossy().into_owned();
    if !dest.starts_with('/') || dest == "/" {
        return Err(Error::InvalidSpec(format!(
            "mount destination {dest:?} must be an absolute path below /"
        )));
    }
    let mut flags: libc::c_ulong = 0;
    let mut recursive = true;
    let mut data = Vec::new();
    let typ = m.typ().as_deref().unwrap_or("bind");
    for opt in m.options().iter().flatten() {
        match opt.as_str() {
            "ro" | "readonly" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "bind" => recursive = false,
            "rbind" => recursive = true,
            o if typ == "tmpfs" && (o.starts_with("size=") || o.starts_with("mode=") || o.starts_with("nr_inodes=")) => {
                data.push(o.to_string())
            }
            o => {
                return Err(Error::Unsupported(format!("mount option {o:?} on {dest} (supported: ro, rw, nosuid, nodev, noexec, bind, rbind, and size/mode for tmpfs)")))
            }
        }
    }
    let kind = match typ {
        "bind" | "none" => {
            let src = m.source().as_ref().ok_or_else(|| {
                Error::InvalidSpec(format!("bind mount on {dest} has no source"))
            })?;
            if !src.is_absolute() {
                return Err(Error::InvalidSpec(format!(
                    "bind mount source {} must be absolute",
                    src.display()
                )));
            }
            // the source must be passable to the kernel
            cstring("mount source", src)?;
            let mut attrs = 0;
            for (ms, attr) in [
                (libc::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
                (libc::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
                (libc::MS_NODEV, libc::MOUNT_ATTR_NODEV),
                (libc::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
            ] {
                if flags & ms != 0 {
                    attrs |= attr;
                }
            }
            MountPlanKind::Bind {
                source: src.clone(),
                recursive,
                attrs,
            }
        }
        "tmpfs" => MountPlanKind::Tmpfs {
            data: cstring("tmpfs options", data.join(","))?,
        },
        other => {
            return Err(Error::Unsupported(format!(
                "mount type {other:?} at {dest}: spec mounts may be bind or tmpfs; kiln mounts /proc, /dev and /sys itself"
            )))
        }
    };
    Ok(MountPlan {
        dest: cstring("mount destination", dest.trim_start_matches('/'))?,
        kind,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::MountBuilder;

    use super::*;
    use crate::spec::{Network, SandboxConfig};

    const USER: u32 = 1000;

    /// kiln run by user 1000 with a subordinate range, through the helpers.
    fn full_map() -> IdMapping {
        let ranges = vec![
            Range {
                inside: 0,
                outside: USER,
                count: 1,
            },
            Range {
                inside: 1,
                outside: 100_000,
                count: 65536,
            },
        ];
        IdMapping {
            uids: ranges.clone(),
            gids: ranges,
            method: Method::Helpers {
                newuidmap: "/usr/bin/newuidmap".into(),
                newgidmap: "/usr/bin/newgidmap".into(),
            },
            limited: None,
        }
    }

    /// Only the user's own id, written directly: setgroups denied.
    fn single_id_map() -> IdMapping {
        let only = vec![Range {
            inside: 0,
            outside: USER,
            count: 1,
        }];
        IdMapping {
            uids: only.clone(),
            gids: only,
            method: Method::Direct {
                deny_setgroups: true,
            },
            limited: Some("no range in /etc/subuid"),
        }
    }

    fn host() -> HostFacts {
        HostFacts {
            euid: USER,
            egid: USER,
            clone_vm_safe: true,
            last_cap: 40,
        }
    }

    fn config() -> SandboxConfig {
        SandboxConfig::new("/rootfs", vec!["sh".into(), "-c".into(), "true".into()])
    }

    fn plan_of(c: &SandboxConfig, mapping: IdMapping, host: &HostFacts) -> Result<SandboxPlan> {
        SandboxPlan::new(&c.to_spec()?, "/rootfs".into(), mapping, host)
    }

    const BASE_FLAGS: u64 = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u64;

    #[test]
    fn shm_is_docker_s_64_mib_unless_sized() {
        let p = plan_of(&config(), full_map(), &host()).unwrap();
        assert_eq!(p.shm.to_str(), Ok("mode=1777,size=67108864"));
        let mut c = config();
        c.shm_size = Some(128 << 20);
        let p = plan_of(&c, full_map(), &host()).unwrap();
        assert_eq!(p.shm.to_str(), Ok("mode=1777,size=134217728"));
        c.shm_size = Some(10);
        let e = plan_of(&c, full_map(), &host()).err().expect("too small");
        assert!(e.to_string().contains("at least 4096"), "{e}");
    }

    #[test]
    fn default_sandbox_shares_memory_and_a_helper_makes_the_network() {
        let p = plan_of(&config(), full_map(), &host()).unwrap();
        assert!(p.new_net);
        assert_eq!(p.user_mode_network, None);
        assert_eq!(
            p.processes,
            Processes {
                clone_flags: BASE_FLAGS,
                pid1_shares_memory: true,
                command_shares_memory: true,
                helper_makes_net: true,
            }
        );
        assert!(p.can_setgroups);
        assert_eq!((p.uid, p.gid), (0, 0));
        assert_eq!(p.rootfs.as_bytes(), b"/rootfs");
        assert_eq!(p.hostname.as_deref(), Some(c"kiln"));
        assert_eq!(p.args[0].as_bytes(), b"sh");
        assert_eq!(p.seccomp, Profile::Default);
        assert_eq!(p.caps.effective, p.caps.bounding);
        assert_ne!(p.caps.bounding, 0);
        assert!(!p.masked.is_empty() && !p.readonly.is_empty());
    }

    #[test]
    fn without_clone_vm_the_clone_makes_the_network_namespace() {
        let old_kernel = HostFacts {
            clone_vm_safe: false,
            ..host()
        };
        let p = plan_of(&config(), full_map(), &old_kernel).unwrap();
        assert_eq!(
            p.processes,
            Processes {
                clone_flags: BASE_FLAGS | libc::CLONE_NEWNET as u64,
                pid1_shares_memory: false,
                command_shares_memory: false,
                helper_makes_net: false,
            }
        );
    }

    #[test]
    fn host_network_makes_no_network_namespace() {
        let mut c = config();
        c.network = Network::Host;
        let p = plan_of(&c, full_map(), &host()).unwrap();
        assert!(!p.new_net);
        assert!(!p.processes.helper_makes_net);
        assert_eq!(p.processes.clone_flags, BASE_FLAGS);
    }

    #[test]
    fn a_user_mode_stack_needs_the_namespace_from_the_clone() {
        let mut c = config();
        c.network = Network::Sandbox {
            allow_host_loopback: true,
        };
        let p = plan_of(&c, full_map(), &host()).unwrap();
        assert_eq!(p.user_mode_network, Some(true));
        assert!(!p.processes.helper_makes_net);
        assert_eq!(
            p.processes.clone_flags,
            BASE_FLAGS | libc::CLONE_NEWNET as u64
        );
    }

    #[test]
    fn root_kiln_mapping_the_sandbox_elsewhere_gets_copies() {
        // real root maps the sandbox's root to a subordinate id: PID 1
        // changes ids, so it cannot share kiln's memory
        let real_root = HostFacts {
            euid: 0,
            egid: 0,
            ..host()
        };
        let p = plan_of(&config(), full_map(), &real_root).unwrap();
        assert!(!p.processes.pid1_shares_memory);
        assert!(!p.processes.command_shares_memory);
    }

    #[test]
    fn a_non_root_user_is_forked_not_cloned_into_our_memory() {
        let mut c = config();
        c.uid = 1;
        c.gid = 1;
        let p = plan_of(&c, full_map(), &host()).unwrap();
        assert!(p.processes.pid1_shares_memory);
        assert!(!p.processes.command_shares_memory);
        // a non-root user starts without effective capabilities
        assert_eq!(p.caps.effective, 0);
    }

    #[test]
    fn ids_outside_the_maps_are_refused_with_the_reason() {
        let mut c = config();
        c.uid = 70_000;
        match plan_of(&c, full_map(), &host()) {
            Err(Error::IdNotMapped { id: 70_000, reason }) => {
                assert_eq!(reason, "it lies outside the mapped range")
            }
            other => panic!("{:?}", other.err()),
        }
        let mut c = config();
        c.gid = 5;
        match plan_of(&c, single_id_map(), &host()) {
            Err(Error::IdNotMapped { id: 5, reason }) => {
                assert_eq!(reason, "no range in /etc/subuid")
            }
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn a_single_id_map_denies_setgroups_and_refuses_extra_groups() {
        let p = plan_of(&config(), single_id_map(), &host()).unwrap();
        assert!(!p.can_setgroups);
        let mut c = config();
        c.additional_gids = vec![0];
        let mut m = single_id_map();
        m.limited = None;
        match plan_of(&c, m, &host()) {
            Err(Error::IdNotMapped { id: 0, reason }) => assert_eq!(reason, "setgroups is denied"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn path_search_follows_the_environment() {
        let mut c = config();
        c.env = vec!["PATH=/opt/bin::/bin".into(), "A=b".into()];
        let p = plan_of(&c, full_map(), &host()).unwrap();
        let dirs: Vec<&[u8]> = p.path_dirs.iter().map(|d| d.as_bytes()).collect();
        assert_eq!(dirs, [&b"/opt/bin"[..], b"/bin"]);
        assert_eq!(p.env.len(), 2);
        let mut c = config();
        c.env = vec!["A=\0b".into()];
        assert!(matches!(
            plan_of(&c, full_map(), &host()),
            Err(Error::NulByte { .. })
        ));
    }

    #[test]
    fn unsupported_spec_fields_are_errors_not_ignored() {
        let mut spec = config().to_spec().unwrap();
        let mut process = spec.process().clone().unwrap();
        process.set_terminal(Some(true));
        spec.set_process(Some(process));
        let e = SandboxPlan::new(&spec, "/rootfs".into(), full_map(), &host());
        assert!(matches!(e, Err(Error::Unsupported(s)) if s.contains("terminal")));

        let mut spec = config().to_spec().unwrap();
        let mut linux = spec.linux().clone().unwrap();
        let ns = linux.namespaces().clone().unwrap();
        linux.set_namespaces(Some(
            ns.into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Pid)
                .collect(),
        ));
        spec.set_linux(Some(linux));
        let e = SandboxPlan::new(&spec, "/rootfs".into(), full_map(), &host());
        assert!(matches!(e, Err(Error::Unsupported(s)) if s.contains("Pid")));
    }

    fn mount(typ: &str, src: Option<&str>, dest: &str, options: &[&str]) -> Mount {
        let mut b = MountBuilder::default()
            .typ(typ)
            .destination(dest)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>());
        if let Some(s) = src {
            b = b.source(s);
        }
        b.build().unwrap()
    }

    #[test]
    fn mounts_are_checked_and_their_flags_decided() {
        let mut c = config();
        c.mounts = vec![
            mount("bind", Some("/src"), "/work", &["ro", "nosuid", "bind"]),
            mount("tmpfs", None, "/tmp", &["size=1m", "mode=1777", "noexec"]),
        ];
        let p = plan_of(&c, full_map(), &host()).unwrap();
        assert_eq!(
            p.mounts,
            vec![
                MountPlan {
                    dest: c"work".into(),
                    kind: MountPlanKind::Bind {
                        source: "/src".into(),
                        recursive: false,
                        attrs: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID,
                    },
                    flags: libc::MS_RDONLY | libc::MS_NOSUID,
                },
                MountPlan {
                    dest: c"tmp".into(),
                    kind: MountPlanKind::Tmpfs {
                        data: c"size=1m,mode=1777".into()
                    },
                    flags: libc::MS_NOEXEC,
                },
            ]
        );
        for (bad, want) in [
            (mount("bind", Some("src"), "/work", &[]), "must be absolute"),
            (mount("bind", Some("/src"), "/", &[]), "below /"),
            (mount("bind", Some("/src"), "/w", &["size=1m"]), "size=1m"),
            (mount("proc", None, "/p", &[]), "\"proc\""),
        ] {
            let mut c = config();
            c.mounts = vec![bad];
            let e = plan_of(&c, full_map(), &host()).err().expect("refused");
            assert!(e.to_string().contains(want), "{e}");
        }
    }
}
