//! kiln's default sandbox, expressed as an OCI runtime spec: the namespaces,
//! capability set, masked and read-only paths every step gets unless the
//! caller says otherwise. Callers build a [`SandboxConfig`] and turn it into
//! a [`Spec`] that [`crate::run`] executes.

use std::collections::HashSet;
use std::path::PathBuf;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    Mount, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::error::{Error, Result};

/// Annotation naming the seccomp profile: `default`, `unconfined`, or the
/// path of a profile in seccompiler's JSON format.
pub const SECCOMP_ANNOTATION: &str = "run.kiln.seccomp";
/// The namespaces every sandbox gets (a network namespace too, unless the
/// network is the host's).
pub const REQUIRED_NAMESPACES: [LinuxNamespaceType; 6] = [
    LinuxNamespaceType::User,
    LinuxNamespaceType::Mount,
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Cgroup,
];
/// The size of the sandbox's /dev/shm in bytes (64 MiB when absent, as
/// Docker's default).
pub const SHM_SIZE_ANNOTATION: &str = "run.kiln.shm-size";

/// PATH when the caller gives none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set (without NET_RAW, as the issue and
/// Podman do).
pub const DEFAULT_CAPS: [Capability; 13] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Mknod,
    Capability::AuditWrite,
    Capability::Setfcap,
];

/// The masked paths of Docker's default profile (the OCI defaults plus
/// `/proc/asound`, `/proc/interrupts` and powercap), without the per-CPU
/// `thermal_throttle` directories [`masked_paths`] adds.
pub const MASKED_PATHS: [&str; 12] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// [`MASKED_PATHS`] and each CPU's `thermal_throttle` directory the host's
/// sysfs at `sys` (normally `/sys`) has, as Docker masks them.
pub fn masked_paths(sys: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = MASKED_PATHS.map(String::from).to_vec();
    let mut cpus: Vec<String> = std::fs::read_dir(sys.join("devices/system/cpu"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let is_cpu = name
                .strip_prefix("cpu")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            (is_cpu && e.path().join("thermal_throttle").is_dir())
                .then(|| format!("/sys/devices/system/cpu/{name}/thermal_throttle"))
        })
        .collect();
    cpus.sort();
    out.extend(cpus);
    out
}

/// The OCI default read-only paths.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// How a sandbox reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// a new network namespace with only loopback up
    #[default]
    None,
    /// the host's network namespace
    Host,
    /// a new network namespace with outbound TCP and UDP through a
    /// user-mode network stack ([`crate::net`]); the host's loopback is
    /// reachable through the gateway address only when allowed
    Sandbox { allow_host_loopback: bool },
}

impl Network {
    /// Parse a user's `--network` value: `none`, `host` or `sandbox`;
    /// anything else is an error, never a silent default.
    pub fn parse(s: &str, allow_host_loopback: bool) -> Result<Network> {
        if allow_host_loopback && s != "sandbox" {
            return Err(Error::HostLoopbackNeedsSandbox(s.to_string()));
        }
        match s {
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            "sandbox" => Ok(Network::Sandbox {
                allow_host_loopback,
            }),
            other => Err(Error::UnknownNetwork(other.to_string())),
        }
    }
}

/// A resource limit: soft and hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub kind: PosixRlimitType,
    pub soft: u64,
    pub hard: u64,
}

impl Rlimit {
    /// Docker's `--ulimit NAME=SOFT[:HARD]` (HARD defaults to SOFT; -1 is
    /// unlimited), e.g. `nofile=1024:4096`.
    pub fn parse_docker(s: &str) -> Result<Rlimit> {
        let bad = || Error::BadUlimit(s.to_string());
        let (name, values) = s.split_once('=').ok_or_else(bad)?;
        let kind = match name {
            "core" => PosixRlimitType::RlimitCore,
            "cpu" => PosixRlimitType::RlimitCpu,
            "data" => PosixRlimitType::RlimitData,
            "fsize" => PosixRlimitType::RlimitFsize,
            "locks" => PosixRlimitType::RlimitLocks,
            "memlock" => PosixRlimitType::RlimitMemlock,
            "msgqueue" => PosixRlimitType::RlimitMsgqueue,
            "nice" => PosixRlimitType::RlimitNice,
            "nofile" => PosixRlimitType::RlimitNofile,
            "nproc" => PosixRlimitType::RlimitNproc,
            "rss" => PosixRlimitType::RlimitRss,
            "rtprio" => PosixRlimitType::RlimitRtprio,
            "rttime" => PosixRlimitType::RlimitRttime,
            "sigpending" => PosixRlimitType::RlimitSigpending,
            "stack" => PosixRlimitType::RlimitStack,
            _ => return Err(bad()),
        };
        let value = |v: &str| match v {
            "-1" => Ok(u64::MAX),
            v => v.parse::<u64>().map_err(|_| bad()),
        };
        let (soft, hard) = match values.split_once(':') {
            Some((s, h)) => (value(s)?, value(h)?),
            None => (value(values)?, value(values)?),
        };
        if soft > hard {
            return Err(bad());
        }
        Ok(Rlimit { kind, soft, hard })
    }
}

/// What a caller decides about one sandbox; everything else is kiln's
/// default.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub rootfs: PathBuf,
    pub args: Vec<String>,
    /// `K=V` entries; PATH is added when missing
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub hostname: String,
    pub network: Network,
    pub rlimits: Vec<Rlimit>,
    /// /dev/shm's size in bytes; 64 MiB when None
    pub shm_size: Option<u64>,
    /// `default`, `unconfined` or a profile path
    pub seccomp: String,
    pub readonly_rootfs: bool,
    pub mounts: Vec<Mount>,
}

impl SandboxConfig {
    pub fn new(rootfs: impl Into<PathBuf>, args: Vec<String>) -> Self {
        SandboxConfig {
            rootfs: rootfs.into(),
            args,
            env: Vec::new(),
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            umask: Some(0o022),
            hostname: "kiln".into(),
            network: Network::None,
            rlimits: Vec::new(),
            shm_size: None,
            seccomp: "default".into(),
            readonly_rootfs: false,
            mounts: Vec::new(),
        }
    }

    /// The OCI runtime spec for this sandbox.
    pub fn to_spec(&self) -> Result<Spec> {
        let invalid = |e: oci_spec::OciSpecError| Error::InvalidSpec(e.to_string());
        let process = self.process()?;
        let (linux, annotations) = self.linux()?;
        let root = RootBuilder::default()
            .path(self.rootfs.clone())
            .readonly(self.readonly_rootfs)
            .build()
            .map_err(invalid)?;
        SpecBuilder::default()
            .root(root)
            .hostname(self.hostname.clone())
            .process(process)
            .linux(linux)
            .mounts(self.mounts.clone())
            .annotations(annotations)
            .build()
            .map_err(invalid)
    }

    /// The process: command, environment (PATH defaulted), user,
    /// capabilities (none effective for a non-root user), limits, and
    /// no_new_privs.
    fn process(&self) -> Result<oci_spec::runtime::Process> {
        let invalid = |e: oci_spec::OciSpecError| Error::InvalidSpec(e.to_string());
        let caps: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
        // Non-root users start without effective or permitted capabilities,
        // as Docker does; the bounding set stays the default.
        let (eff, perm) = if self.uid == 0 {
            (caps.clone(), caps.clone())
        } else {
            (HashSet::new(), HashSet::new())
        };
        let capabilities = LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(eff)
            .permitted(perm)
            .inheritable(HashSet::new())
            .ambient(HashSet::new())
            .build()
            .map_err(invalid)?;
        let mut env = self.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, format!("PATH={DEFAULT_PATH}"));
        }
        let rlimits = self
            .rlimits
            .iter()
            .map(|r| {
                PosixRlimitBuilder::default()
                    .typ(r.kind)
                    .soft(r.soft)
                    .hard(r.hard)
                    .build()
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let mut user = UserBuilder::default()
            .uid(self.uid)
            .gid(self.gid)
            .additional_gids(self.additional_gids.clone());
        if let Some(m) = self.umask {
            user = user.umask(m);
        }
        ProcessBuilder::default()
            .args(self.args.clone())
            .env(env)
            .cwd(self.cwd.clone())
            .user(user.build().map_err(invalid)?)
            .capabilities(capabilities)
            .rlimits(rlimits)
            .no_new_privileges(true)
            .build()
            .map_err(invalid)
    }

    /// The namespaces (a network one unless host), masked and read-only
    /// paths, and the annotations naming the seccomp profile and network.
    fn linux(
        &self,
    ) -> Result<(
        oci_spec::runtime::Linux,
        std::collections::HashMap<String, String>,
    )> {
        let invalid = |e: oci_spec::OciSpecError| Error::InvalidSpec(e.to_string());
        let mut namespaces = REQUIRED_NAMESPACES.to_vec();
        let mut annotations: std::collections::HashMap<String, String> =
            [(SECCOMP_ANNOTATION.to_string(), self.seccomp.clone())]
                .into_iter()
                .collect();
        if let Some(bytes) = self.shm_size {
            annotations.insert(SHM_SIZE_ANNOTATION.into(), bytes.to_string());
        }
        match self.network {
            Network::None => namespaces.push(LinuxNamespaceType::Network),
            Network::Host => {}
            Network::Sandbox {
                allow_host_loopback,
            } => {
                namespaces.push(LinuxNamespaceType::Network);
                let value = if allow_host_loopback {
                    "sandbox+host-loopback"
                } else {
                    "sandbox"
                };
                annotations.insert(crate::net::NETWORK_ANNOTATION.into(), value.into());
            }
        }
        let namespaces = namespaces
            .into_iter()
            .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .masked_paths(masked_paths(std::path::Path::new("/sys")))
            .readonly_paths(READONLY_PATHS.map(String::from).to_vec())
            .build()
            .map_err(invalid)?;
        Ok((linux, annotations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulimits_parse_as_docker() {
        assert_eq!(
            Rlimit::parse_docker("nofile=1024:4096").unwrap(),
            Rlimit {
                kind: PosixRlimitType::RlimitNofile,
                soft: 1024,
                hard: 4096
            }
        );
        let core = Rlimit::parse_docker("core=-1").unwrap();
        assert_eq!((core.soft, core.hard), (u64::MAX, u64::MAX));
        for bad in [
            "nofile",
            "files=1",
            "nofile=a",
            "nofile=10:5",
            "nproc=1:2:3",
        ] {
            assert!(Rlimit::parse_docker(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_cpus_thermal_throttle_is_masked() {
        let sys = tempfile::tempdir().unwrap();
        for d in [
            "cpu0/thermal_throttle",
            "cpu12/thermal_throttle",
            "cpu1",
            "cpufreq",
        ] {
            std::fs::create_dir_all(sys.path().join("devices/system/cpu").join(d)).unwrap();
        }
        let paths = masked_paths(sys.path());
        assert_eq!(
            paths[MASKED_PATHS.len()..],
            [
                "/sys/devices/system/cpu/cpu0/thermal_throttle",
                "/sys/devices/system/cpu/cpu12/thermal_throttle"
            ]
        );
        for p in [
            "/proc/asound",
            "/proc/interrupts",
            "/sys/devices/virtual/powercap",
        ] {
            assert!(paths.iter().any(|m| m == p), "{p}");
        }
    }

    #[test]
    fn network_modes_parse_strictly() {
        assert_eq!(Network::parse("none", false).unwrap(), Network::None);
        assert_eq!(Network::parse("host", false).unwrap(), Network::Host);
        assert_eq!(
            Network::parse("sandbox", true).unwrap(),
            Network::Sandbox {
                allow_host_loopback: true
            }
        );
        assert!(matches!(
            Network::parse("bridge", false),
            Err(Error::UnknownNetwork(_))
        ));
        assert!(matches!(
            Network::parse("", false),
            Err(Error::UnknownNetwork(_))
        ));
        assert!(matches!(
            Network::parse("none", true),
            Err(Error::HostLoopbackNeedsSandbox(_))
        ));
    }

    #[test]
    fn sandbox_network_asks_the_runtime_for_a_stack_on_a_new_namespace() {
        let spec_of = |network| {
            let mut c = SandboxConfig::new("/tmp", vec!["true".into()]);
            c.network = network;
            c.to_spec().unwrap()
        };
        let has_netns = |s: &Spec| {
            s.linux()
                .as_ref()
                .and_then(|l| l.namespaces().as_ref())
                .is_some_and(|n| n.iter().any(|n| n.typ() == LinuxNamespaceType::Network))
        };
        let annotation = |s: &Spec| {
            s.annotations()
                .as_ref()
                .and_then(|a| a.get(crate::net::NETWORK_ANNOTATION).cloned())
        };
        let sandbox = spec_of(Network::Sandbox {
            allow_host_loopback: false,
        });
        assert!(has_netns(&sandbox));
        assert_eq!(annotation(&sandbox).as_deref(), Some("sandbox"));
        let loopback = spec_of(Network::Sandbox {
            allow_host_loopback: true,
        });
        assert_eq!(
            annotation(&loopback).as_deref(),
            Some("sandbox+host-loopback")
        );
        let none = spec_of(Network::None);
        assert!(has_netns(&none));
        assert_eq!(annotation(&none), None);
        let host = spec_of(Network::Host);
        assert!(!has_netns(&host));
        assert_eq!(annotation(&host), None);
    }
}
