//! kiln.toml: the settings a build takes when its command line does not
//! say, and where each came from.
//!
//! Layers, each later one winning: kiln's defaults; the host file
//! `/etc/kiln/kiln.toml` (an admin's); the user's file (`$KILN_CONFIG`,
//! else `$XDG_CONFIG_HOME/kiln/kiln.toml`, else `~/.config/kiln/kiln.toml`);
//! the command line. The host file's `enforce = ["KEY", ...]` makes its
//! value of each listed key a ceiling: a later layer may tighten it (a
//! shorter timeout, a smaller limit, a more closed network) and is refused,
//! naming both files, when it would loosen it. That is a policy kiln keeps
//! for the admin, not a security boundary: a user can run another binary
//! (SECURITY.md, "Shared hosts").
//!
//! Unknown keys are errors naming the key and the file, never ignored. The
//! `[[registry]]` tables are read by [`crate::registry::config`], as in
//! registries.toml.
//!
//! This module reads files and compares values; it starts nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_runtime::spec::Rlimit;
use serde::Deserialize;

/// The admin's file.
pub const HOST_PATH: &str = "/etc/kiln/kiln.toml";

/// kiln's cap on the default GC keep-storage: 20GB in kiln's (docker's)
/// units, powers of 1024. The default is the smaller of this and a tenth
/// of the state directory's file system, as BuildKit's.
pub const GC_DEFAULT_CAP: u64 = 20 << 30;

/// Records used within this long survive a GC before older ones (the
/// default `gc-keep-duration`, BuildKit's 48 hours).
pub const GC_DEFAULT_KEEP_DURATION: Duration = Duration::from_secs(48 * 3600);

/// Tasks (processes and threads) of one user id in one step, by default.
/// Each step has a user namespace of its own, so this counts that step's
/// tasks only; without it a fork bomb in a step takes tasks up to the
/// host's `kernel.threads-max` (seen: every other build on the host then
/// failed to start a thread). Far above what compilers and test runners
/// start; `limits.nproc` or `--ulimit nproc=` raises it.
pub const DEFAULT_NPROC: u64 = 8192;

/// The keys a host file may enforce.
pub const ENFORCEABLE: &[&str] = &[
    "gc",
    "gc-keep-storage",
    "gc-keep-duration",
    "network",
    "jobs",
    "limits.step-timeout",
    "limits.timeout",
    "limits.nofile",
    "limits.nproc",
    "limits.fsize",
    "limits.core",
    "limits.memory",
    "limits.pids",
    "limits.cpus",
];

/// Errors of reading and layering the settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config {path} is not valid; see README.md, \"Configuration\"")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{from}: {key} = {value:?} is not {expected}")]
    Value {
        from: Origin,
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("{from}: `enforce` is for the host file {HOST_PATH} only")]
    EnforceOutsideHost { from: Origin },
    #[error("{from}: enforce names {key:?}, which is not one of: {}", ENFORCEABLE.join(", "))]
    NotEnforceable { from: Origin, key: String },
    #[error("{from}: enforce names {key:?}, which the file does not set")]
    EnforcedUnset { from: Origin, key: String },
    #[error("{}: {} = {} is looser than {}, which {} enforces; ask the host's admin, or choose a value within it", .0.from, .0.key, .0.value, .0.ceiling, .0.host)]
    Loosens(Box<Loosened>),
}

/// A value past an enforced ceiling (boxed: errors stay small).
#[derive(Debug)]
pub struct Loosened {
    pub from: Origin,
    pub key: String,
    pub value: String,
    pub ceiling: String,
    pub host: Origin,
}

/// Result type of the settings.
pub type Result<T> = std::result::Result<T, Error>;

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub enum Origin {
    Default,
    File(PathBuf),
    Flag(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Flag(flag) => f.write_str(flag),
        }
    }
}

impl From<Origin> for String {
    fn from(o: Origin) -> String {
        o.to_string()
    }
}

/// One setting and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Set<T> {
    pub value: T,
    pub from: Origin,
}

impl<T> Set<T> {
    fn default(value: T) -> Self {
        Set {
            value,
            from: Origin::Default,
        }
    }
}

/// How a value compares with an enforced ceiling.
pub trait Ceiling {
    /// whether `self` is as tight as `ceiling` or tighter
    fn within(&self, ceiling: &Self) -> bool;
    /// the value as a user writes it
    fn show(&self) -> String;
}

impl Ceiling for bool {
    // gc: an enforced `true` cannot be turned off
    fn within(&self, ceiling: &bool) -> bool {
        *self || !*ceiling
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Ceiling for Duration {
    fn within(&self, ceiling: &Duration) -> bool {
        self <= ceiling
    }
    fn show(&self) -> String {
        format!("{}s", self.as_secs_f64())
    }
}

/// Numbers: the smaller is the tighter.
macro_rules! ceiling_by_size {
    ($($t:ty),+) => {$(
        impl Ceiling for $t {
            fn within(&self, ceiling: &$t) -> bool {
                self <= ceiling
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )+};
}

ceiling_by_size!(u64, usize, f64);

/// `None` is "no limit": the loosest value.
impl<T: Ceiling> Ceiling for Option<T> {
    fn within(&self, ceiling: &Option<T>) -> bool {
        match (self, ceiling) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(v), Some(c)) => v.within(c),
        }
    }
    fn show(&self) -> String {
        self.as_ref()
            .map_or_else(|| "unlimited".into(), Ceiling::show)
    }
}

impl Ceiling for Rlimit {
    fn within(&self, ceiling: &Rlimit) -> bool {
        self.soft <= ceiling.soft && self.hard <= ceiling.hard
    }
    fn show(&self) -> String {
        let n = |v: u64| {
            if v == u64::MAX {
                "-1".to_string()
            } else {
                v.to_string()
            }
        };
        format!("{}:{}", n(self.soft), n(self.hard))
    }
}

/// The default network of RUN steps, from the most closed to the most open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkName(pub String);

impl NetworkName {
    fn rank(&self) -> u8 {
        match self.0.as_str() {
            "none" => 0,
            "sandbox" | "default" => 1,
            _ => 2,
        }
    }
}

impl Ceiling for NetworkName {
    fn within(&self, ceiling: &NetworkName) -> bool {
        self.rank() <= ceiling.rank()
    }
    fn show(&self) -> String {
        self.0.clone()
    }
}

/// The effective settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// automatic garbage collection after builds
    pub gc: Set<bool>,
    /// the most the state directory may hold before GC frees build cache;
    /// `None`: [`default_keep_storage`]
    pub gc_keep_storage: Set<Option<u64>>,
    /// records used within this long go after older ones
    pub gc_keep_duration: Set<Duration>,
    pub network: Set<NetworkName>,
    pub snapshotter: Set<String>,
    /// steps at once; `None`: the number of CPUs
    pub jobs: Set<Option<usize>>,
    pub step_timeout: Set<Option<Duration>>,
    pub timeout: Set<Option<Duration>>,
    /// rlimits of every RUN step, by docker's name (`nofile`)
    pub ulimits: BTreeMap<String, Set<Rlimit>>,
    /// bytes of memory a step may use (cgroup v2 `memory.max`)
    pub memory: Set<Option<u64>>,
    /// tasks a step may have (cgroup v2 `pids.max`)
    pub pids: Set<Option<u64>>,
    /// CPUs a step may use (cgroup v2 `cpu.max`)
    pub cpus: Set<Option<f64>>,
    /// `[[registry]]` tables, with the file each came from
    pub registries: Vec<(PathBuf, toml::Value)>,
    /// enforced keys, with the host file's values as ceilings
    enforced: BTreeSet<String>,
    ceilings: Option<Box<Settings>>,
}

impl Default for Settings {
    fn default() -> Self {
        let core = Rlimit {
            kind: oci_spec::runtime::PosixRlimitType::RlimitCore,
            soft: 0,
            hard: 0,
        };
        // never more than this process may give (a small VM's nproc hard
        // limit is below 8192, and a step asking more fails to start)
        let nproc_hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC)
            .map_or(DEFAULT_NPROC, |(_, hard)| hard);
        let nproc = Rlimit {
            kind: oci_spec::runtime::PosixRlimitType::RlimitNproc,
            soft: DEFAULT_NPROC.min(nproc_hard),
            hard: DEFAULT_NPROC.min(nproc_hard),
        };
        Settings {
            gc: Set::default(true),
            gc_keep_storage: Set::default(None),
            gc_keep_duration: Set::default(GC_DEFAULT_KEEP_DURATION),
            network: Set::default(NetworkName("sandbox".into())),
            snapshotter: Set::default("auto".into()),
            jobs: Set::default(None),
            step_timeout: Set::default(None),
            timeout: Set::default(None),
            // no core dumps unless asked: a dump is a file in the layer
            ulimits: BTreeMap::from([
                ("core".to_string(), Set::default(core)),
                ("nproc".to_string(), Set::default(nproc)),
            ]),
            memory: Set::default(None),
            pids: Set::default(None),
            cpus: Set::default(None),
            registries: Vec::new(),
            enforced: BTreeSet::new(),
            ceilings: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    gc: Option<bool>,
    gc_keep_storage: Option<String>,
    gc_keep_duration: Option<String>,
    network: Option<String>,
    snapshotter: Option<String>,
    jobs: Option<usize>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    registry: Vec<toml::Value>,
    #[serde(default)]
    enforce: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    step_timeout: Option<String>,
    timeout: Option<String>,
    nofile: Option<RawUlimit>,
    nproc: Option<RawUlimit>,
    fsize: Option<RawUlimit>,
    core: Option<RawUlimit>,
    memory: Option<String>,
    pids: Option<u64>,
    cpus: Option<f64>,
}

/// `nofile = 1024` or `nofile = "1024:4096"`, as `--ulimit` takes it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawUlimit {
    Number(i64),
    Text(String),
}

/// The user's file: `$KILN_CONFIG`, else under the XDG config home.
pub fn user_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(home.join("kiln").join("kiln.toml"))
}

/// A tenth of the file system holding `dir`, at most [`GC_DEFAULT_CAP`].
pub fn default_keep_storage(dir: &Path) -> u64 {
    let tenth = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks().saturating_mul(s.fragment_size()) / 10)
        .unwrap_or(GC_DEFAULT_CAP);
    tenth.min(GC_DEFAULT_CAP)
}

impl Settings {
    /// The host file and the user's file, over kiln's defaults. A missing
    /// file is no layer; `$KILN_CONFIG` naming a missing file is an error.
    pub fn load() -> Result<Settings> {
        let user = user_path();
        let explicit = std::env::var_os("KILN_CONFIG").is_some_and(|p| !p.is_empty());
        Self::load_from(Path::new(HOST_PATH), user.as_deref(), explicit)
    }

    /// [`Settings::load`] with the paths given (tests use their own).
    pub fn load_from(host: &Path, user: Option<&Path>, user_required: bool) -> Result<Settings> {
        let mut s = Settings::default();
        if let Some(raw) = read(host, false)? {
            s.layer(raw, &Origin::File(host.into()), true)?;
        }
        if let Some(user) = user {
            if let Some(raw) = read(user, user_required)? {
                s.layer(raw, &Origin::File(user.into()), false)?;
            }
        }
        Ok(s)
    }

    /// Parse `text` as the file `path` (for tests and `kiln info`).
    pub fn layer_text(&mut self, text: &str, path: &Path, host: bool) -> Result<()> {
        let raw: Raw = toml::from_str(text).map_err(|source| Error::Parse {
            path: path.into(),
            source,
        })?;
        self.layer(raw, &Origin::File(path.into()), host)
    }

    fn layer(&mut self, raw: Raw, from: &Origin, host: bool) -> Result<()> {
        let bad = |key: &str, value: &str, expected| Error::Value {
            from: from.clone(),
            key: key.into(),
            value: value.into(),
            expected,
        };
        let size = |key: &str, v: &str| {
            crate::units::parse_size(v).map_err(|_| bad(key, v, "a size such as 20GB or 512MB"))
        };
        let duration = |key: &str, v: &str| {
            crate::units::parse_duration(v)
                .map_err(|_| bad(key, v, "a duration such as 48h or 30m"))
        };
        if let Some(v) = raw.gc {
            self.put("gc", v, from)?;
        }
        if let Some(v) = &raw.gc_keep_storage {
            self.put("gc-keep-storage", Some(size("gc-keep-storage", v)?), from)?;
        }
        if let Some(v) = &raw.gc_keep_duration {
            self.put("gc-keep-duration", duration("gc-keep-duration", v)?, from)?;
        }
        if let Some(v) = raw.network {
            self.put(
                "network",
                network_name(&v)
                    .map_err(|()| bad("network", &v, "none, sandbox (or default) or host"))?,
                from,
            )?;
        }
        if let Some(v) = raw.snapshotter {
            if !["auto", "fuse", "overlay", "copy"].contains(&v.as_str()) {
                return Err(bad("snapshotter", &v, "auto, fuse, overlay or copy"));
            }
            self.put("snapshotter", v, from)?;
        }
        if let Some(v) = raw.jobs {
            if v == 0 {
                return Err(bad("jobs", "0", "a number of steps, 1 or more"));
            }
            self.put("jobs", Some(v), from)?;
        }
        let l = raw.limits;
        // "0" or "unlimited" clears a limit an earlier layer set (unless
        // the host enforces it)
        let unset = |v: &str| v == "unlimited" || v == "0";
        if let Some(v) = &l.step_timeout {
            let d = (!unset(v))
                .then(|| duration("limits.step-timeout", v))
                .transpose()?;
            self.put("limits.step-timeout", d, from)?;
        }
        if let Some(v) = &l.timeout {
            let d = (!unset(v))
                .then(|| duration("limits.timeout", v))
                .transpose()?;
            self.put("limits.timeout", d, from)?;
        }
        for (name, v) in [
            ("nofile", l.nofile),
            ("nproc", l.nproc),
            ("fsize", l.fsize),
            ("core", l.core),
        ] {
            if let Some(v) = v {
                let text = match v {
                    RawUlimit::Number(n) => n.to_string(),
                    RawUlimit::Text(t) => t,
                };
                let key = format!("limits.{name}");
                let r = Rlimit::parse_docker(&format!("{name}={text}"))
                    .map_err(|_| bad(&key, &text, "SOFT[:HARD], numbers or -1 (unlimited)"))?;
                self.put_ulimit(name, r, from)?;
            }
        }
        if let Some(v) = &l.memory {
            let m = (!unset(v)).then(|| size("limits.memory", v)).transpose()?;
            self.put("limits.memory", m, from)?;
        }
        if let Some(v) = l.pids {
            // 0: unlimited, as docker's --pids-limit
            self.put("limits.pids", (v > 0).then_some(v), from)?;
        }
        if let Some(v) = l.cpus {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(bad(
                    "limits.cpus",
                    &v.to_string(),
                    "a number of CPUs (0: unlimited)",
                ));
            }
            self.put("limits.cpus", (v > 0.0).then_some(v), from)?;
        }
        if let Origin::File(path) = from {
            self.registries
                .extend(raw.registry.into_iter().map(|v| (path.clone(), v)));
        }
        self.enforce(&raw.enforce, from, host)
    }

    /// The host file's `enforce` list: its values become ceilings.
    fn enforce(&mut self, keys: &[String], from: &Origin, host: bool) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        if !host {
            return Err(Error::EnforceOutsideHost { from: from.clone() });
        }
        for key in keys {
            if !ENFORCEABLE.contains(&key.as_str()) {
                return Err(Error::NotEnforceable {
                    from: from.clone(),
                    key: key.clone(),
                });
            }
            if self.origin_of(key) != Some(from) {
                return Err(Error::EnforcedUnset {
                    from: from.clone(),
                    key: key.clone(),
                });
            }
            self.enforced.insert(key.clone());
        }
        let mut ceilings = self.clone();
        ceilings.ceilings = None;
        self.ceilings = Some(Box::new(ceilings));
        Ok(())
    }

    /// Where `key`'s value came from.
    fn origin_of(&self, key: &str) -> Option<&Origin> {
        Some(match key {
            "gc" => &self.gc.from,
            "gc-keep-storage" => &self.gc_keep_storage.from,
            "gc-keep-duration" => &self.gc_keep_duration.from,
            "network" => &self.network.from,
            "jobs" => &self.jobs.from,
            "snapshotter" => &self.snapshotter.from,
            "limits.step-timeout" => &self.step_timeout.from,
            "limits.timeout" => &self.timeout.from,
            "limits.memory" => &self.memory.from,
            "limits.pids" => &self.pids.from,
            "limits.cpus" => &self.cpus.from,
            other => &self.ulimits.get(other.strip_prefix("limits.")?)?.from,
        })
    }

    /// Set `key` (a field of [`Settings`], by its file name) from `from`,
    /// unless an enforced ceiling forbids the value.
    fn put<T: Ceiling + Clone + Slot>(&mut self, key: &str, value: T, from: &Origin) -> Result<()> {
        if self.enforced.contains(key) {
            let ceilings = self
                .ceilings
                .as_deref()
                .expect("enforced keys have ceilings");
            let ceiling = &T::slot(ceilings, key).value;
            if !value.within(ceiling) {
                return Err(Error::Loosens(Box::new(Loosened {
                    from: from.clone(),
                    key: key.into(),
                    value: value.show(),
                    ceiling: ceiling.show(),
                    host: T::slot(ceilings, key).from.clone(),
                })));
            }
        }
        *T::slot_mut(self, key) = Set {
            value,
            from: from.clone(),
        };
        Ok(())
    }

    fn put_ulimit(&mut self, name: &str, value: Rlimit, from: &Origin) -> Result<()> {
        let key = format!("limits.{name}");
        if self.enforced.contains(&key) {
            let ceilings = self
                .ceilings
                .as_deref()
                .expect("enforced keys have ceilings");
            let c = &ceilings.ulimits[name];
            if !value.within(&c.value) {
                return Err(Error::Loosens(Box::new(Loosened {
                    from: from.clone(),
                    key,
                    value: value.show(),
                    ceiling: c.value.show(),
                    host: c.from.clone(),
                })));
            }
        }
        self.ulimits.insert(
            name.into(),
            Set {
                value,
                from: from.clone(),
            },
        );
        Ok(())
    }

    /// A command-line flag's value for `key`, as a last layer.
    pub fn flag<T: Ceiling + Clone + Slot>(
        &mut self,
        key: &str,
        value: T,
        flag: &str,
    ) -> Result<()> {
        self.put(key, value, &Origin::Flag(flag.into()))
    }

    /// `--ulimit NAME=...` as a last layer (any rlimit docker names; the
    /// four kiln.toml knows are checked against their ceilings).
    pub fn flag_ulimit(&mut self, name: &str, value: Rlimit) -> Result<()> {
        self.put_ulimit(name, value, &Origin::Flag("--ulimit".into()))
    }

    /// Whether opening the network past the build's default (`--allow
    /// network.host`, `--allow-host-loopback`) is within an enforced
    /// network ceiling.
    pub fn check_network_grant(&self, what: &str, opens_to: &str) -> Result<()> {
        if !self.enforced.contains("network") {
            return Ok(());
        }
        let ceilings = self
            .ceilings
            .as_deref()
            .expect("enforced keys have ceilings");
        let c = &ceilings.network;
        let wanted = NetworkName(opens_to.into());
        if wanted.within(&c.value) {
            return Ok(());
        }
        Err(Error::Loosens(Box::new(Loosened {
            from: Origin::Flag(what.into()),
            key: "network".into(),
            value: opens_to.into(),
            ceiling: c.value.show(),
            host: c.from.clone(),
        })))
    }

    /// Every setting, for `kiln info`.
    pub fn rows(&self) -> Vec<Row> {
        let mut out = vec![
            row("gc", &self.gc),
            Row::new(
                "gc-keep-storage",
                self.gc_keep_storage.value.map_or_else(
                    || "10% of the file system, at most 20GB".into(),
                    crate::cli::images::human_size,
                ),
                &self.gc_keep_storage.from,
            ),
            row("gc-keep-duration", &self.gc_keep_duration),
            row("network", &self.network),
            row("snapshotter", &self.snapshotter),
            Row::new(
                "jobs",
                self.jobs
                    .value
                    .map_or_else(|| "the number of CPUs".into(), |j| j.to_string()),
                &self.jobs.from,
            ),
            row("limits.step-timeout", &self.step_timeout),
            row("limits.timeout", &self.timeout),
        ];
        for (name, set) in &self.ulimits {
            out.push(row(&format!("limits.{name}"), set));
        }
        out.push(row("limits.memory", &self.memory));
        out.push(row("limits.pids", &self.pids));
        out.push(row("limits.cpus", &self.cpus));
        for r in &mut out {
            r.enforced = self.enforced.contains(r.key.as_str());
        }
        out
    }
}

/// One setting as `kiln info` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub key: String,
    pub value: String,
    pub from: Origin,
    /// the host file enforces it as a ceiling
    pub enforced: bool,
}

impl Row {
    fn new(key: &str, value: String, from: &Origin) -> Row {
        Row {
            key: key.into(),
            value,
            from: from.clone(),
            enforced: false,
        }
    }
}

fn row<T: Ceiling>(key: &str, set: &Set<T>) -> Row {
    Row::new(key, set.value.show(), &set.from)
}

/// `none`, `sandbox`, `default` (buildx's name for sandbox) or `host`.
fn network_name(v: &str) -> std::result::Result<NetworkName, ()> {
    match v {
        "none" | "sandbox" | "host" => Ok(NetworkName(v.into())),
        "default" => Ok(NetworkName("sandbox".into())),
        _ => Err(()),
    }
}

/// A field of [`Settings`] by its key, for each value type.
pub trait Slot: Sized {
    fn slot<'a>(s: &'a Settings, key: &str) -> &'a Set<Self>;
    fn slot_mut<'a>(s: &'a mut Settings, key: &str) -> &'a mut Set<Self>;
}

macro_rules! slots {
    ($t:ty => $($key:literal => $field:ident),+) => {
        impl Slot for $t {
            fn slot<'a>(s: &'a Settings, key: &str) -> &'a Set<Self> {
                match key {
                    $($key => &s.$field,)+
                    other => unreachable!("no {} setting {other}", stringify!($t)),
                }
            }
            fn slot_mut<'a>(s: &'a mut Settings, key: &str) -> &'a mut Set<Self> {
                match key {
                    $($key => &mut s.$field,)+
                    other => unreachable!("no {} setting {other}", stringify!($t)),
                }
            }
        }
    };
}

slots!(bool => "gc" => gc);
slots!(Option<u64> => "gc-keep-storage" => gc_keep_storage, "limits.memory" => memory, "limits.pids" => pids);
slots!(Duration => "gc-keep-duration" => gc_keep_duration);
slots!(NetworkName => "network" => network);
slots!(String => "snapshotter" => snapshotter);
slots!(Option<usize> => "jobs" => jobs);
slots!(Option<Duration> => "limits.step-timeout" => step_timeout, "limits.timeout" => timeout);
slots!(Option<f64> => "limits.cpus" => cpus);

impl Ceiling for String {
    // the snapshotter: a choice, never enforced
    fn within(&self, _: &String) -> bool {
        true
    }
    fn show(&self) -> String {
        self.clone()
    }
}

/// Read one file; a missing one is `None` unless `required`.
fn read(path: &Path, required: bool) -> Result<Option<Raw>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(source) => {
            return Err(Error::Read {
                path: path.into(),
                source,
            })
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Parse {
            path: path.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(host: &str, user: &str) -> Result<Settings> {
        let dir = tempfile::tempdir().unwrap();
        let (h, u) = (dir.path().join("host.toml"), dir.path().join("user.toml"));
        std::fs::write(&h, host).unwrap();
        std::fs::write(&u, user).unwrap();
        Settings::load_from(&h, Some(&u), true).map(|mut s| {
            // paths of a deleted temp dir: compare by file name
            strip(&mut s);
            s
        })
    }

    fn strip(s: &mut Settings) {
        let name = |o: &mut Origin| {
            if let Origin::File(p) = o {
                *p = PathBuf::from(p.file_name().unwrap());
            }
        };
        name(&mut s.gc.from);
        name(&mut s.network.from);
        name(&mut s.step_timeout.from);
        name(&mut s.jobs.from);
        for u in s.ulimits.values_mut() {
            name(&mut u.from);
        }
    }

    fn file(name: &str) -> Origin {
        Origin::File(name.into())
    }

    #[test]
    fn defaults_without_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings::load_from(
            &dir.path().join("none"),
            Some(&dir.path().join("no")),
            false,
        )
        .unwrap();
        assert!(s.gc.value);
        assert_eq!(s.gc_keep_duration.value, GC_DEFAULT_KEEP_DURATION);
        assert_eq!(s.network.value.0, "sandbox");
        assert_eq!(s.ulimits["core"].value.hard, 0);
        assert_eq!(s.ulimits["core"].from, Origin::Default);
        assert_eq!(s.ulimits["nproc"].value.soft, DEFAULT_NPROC);
        // KILN_CONFIG naming a missing file is an error
        let err = Settings::load_from(&dir.path().join("none"), Some(&dir.path().join("no")), true)
            .unwrap_err();
        assert!(err.to_string().contains("cannot read the config"), "{err}");
    }

    #[test]
    fn the_user_file_wins_over_the_host_file_and_flags_over_both() {
        let mut s = load(
            "network = \"none\"\njobs = 4\n[limits]\nstep-timeout = \"1h\"\n",
            "network = \"sandbox\"\n[limits]\nstep-timeout = \"10m\"\nnproc = 512\n",
        )
        .unwrap();
        assert_eq!(s.network.value.0, "sandbox");
        assert_eq!(s.network.from, file("user.toml"));
        assert_eq!(s.jobs.value, Some(4));
        assert_eq!(s.jobs.from, file("host.toml"));
        assert_eq!(s.step_timeout.value, Some(Duration::from_secs(600)));
        assert_eq!(s.ulimits["nproc"].value.soft, 512);
        s.flag(
            "limits.step-timeout",
            Some(Duration::from_secs(5)),
            "--step-timeout",
        )
        .unwrap();
        assert_eq!(s.step_timeout.from, Origin::Flag("--step-timeout".into()));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
        let err = load("", "gc = true\nnetwrok = \"none\"\n").unwrap_err();
        let text = crate::error_chain(&err);
        assert!(
            text.contains("user.toml") && text.contains("netwrok"),
            "{text}"
        );
        let err = load("[limits]\nmemroy = \"1GB\"\n", "").unwrap_err();
        let text = crate::error_chain(&err);
        assert!(
            text.contains("host.toml") && text.contains("memroy"),
            "{text}"
        );
        let err = load("", "[limits]\nstep-timeout = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("user.toml")
                && text.contains("limits.step-timeout")
                && text.contains("soon"),
            "{text}"
        );
        let err = load("", "network = \"bridge\"\n").unwrap_err();
        assert!(err.to_string().contains("network = \"bridge\""), "{err}");
        let err = load("", "[limits]\nnofile = \"10:5\"\n").unwrap_err();
        assert!(err.to_string().contains("limits.nofile"), "{err}");
    }

    #[test]
    fn an_enforced_value_can_be_tightened_but_not_loosened() {
        let host = "enforce = [\"limits.step-timeout\", \"network\", \"limits.nproc\", \"gc\"]\n\
                    network = \"sandbox\"\ngc = true\n[limits]\nstep-timeout = \"1h\"\nnproc = 1000\n";
        // tighter in the user file: taken
        let mut s = load(
            host,
            "network = \"none\"\n[limits]\nstep-timeout = \"5m\"\nnproc = 10\n",
        )
        .unwrap();
        assert_eq!(s.step_timeout.value, Some(Duration::from_secs(300)));
        assert_eq!(s.network.value.0, "none");
        // a flag may loosen the user's choice back up to the host's ceiling
        s.flag(
            "limits.step-timeout",
            Some(Duration::from_secs(3600)),
            "--step-timeout",
        )
        .unwrap();
        s.flag("network", NetworkName("sandbox".into()), "--network")
            .unwrap();
        // but not past it
        let err = s
            .flag(
                "limits.step-timeout",
                Some(Duration::from_secs(3601)),
                "--step-timeout",
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--step-timeout") && err.contains("host.toml"),
            "{err}"
        );
        assert!(s
            .flag("limits.step-timeout", None::<Duration>, "--step-timeout")
            .is_err());
        assert!(s
            .flag("network", NetworkName("host".into()), "--network")
            .is_err());
        assert!(s
            .check_network_grant("--allow network.host", "host")
            .is_err());
        assert!(s
            .flag_ulimit("nproc", Rlimit::parse_docker("nproc=2000").unwrap())
            .is_err());
        s.flag_ulimit("nproc", Rlimit::parse_docker("nproc=100").unwrap())
            .unwrap();
        // loosening in the user file names both files
        for user in [
            "[limits]\nstep-timeout = \"2h\"\n",
            "network = \"host\"\n",
            "gc = false\n",
            "[limits]\nnproc = \"1000:2000\"\n",
        ] {
            let err = load(host, user).unwrap_err().to_string();
            assert!(
                err.contains("user.toml") && err.contains("host.toml"),
                "{user}: {err}"
            );
        }
        // a key the host does not enforce is the user's to loosen
        let s = load("[limits]\nnofile = 10\n", "[limits]\nnofile = 100\n").unwrap();
        assert_eq!(s.ulimits["nofile"].value.soft, 100);
    }

    #[test]
    fn a_later_layer_clears_a_limit_an_earlier_one_set_unless_enforced() {
        let s = load(
            "[limits]\nmemory = \"2GB\"\nstep-timeout = \"1h\"\npids = 100\ncpus = 2.0\n",
            "[limits]\nmemory = \"unlimited\"\nstep-timeout = \"0\"\npids = 0\ncpus = 0.0\n",
        )
        .unwrap();
        assert_eq!(s.memory.value, None);
        assert_eq!(s.step_timeout.value, None);
        assert_eq!(s.pids.value, None);
        assert_eq!(s.cpus.value, None);
        let err = load(
            "enforce = [\"limits.memory\"]\n[limits]\nmemory = \"2GB\"\n",
            "[limits]\nmemory = \"unlimited\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("looser"), "{err}");
    }

    #[test]
    fn enforce_is_checked() {
        let err = load("", "enforce = [\"network\"]\nnetwork = \"none\"\n").unwrap_err();
        assert!(matches!(err, Error::EnforceOutsideHost { .. }), "{err}");
        let err = load("enforce = [\"snapshotter\"]\nsnapshotter = \"copy\"\n", "").unwrap_err();
        assert!(matches!(err, Error::NotEnforceable { .. }), "{err}");
        let err = load("enforce = [\"network\"]\n", "").unwrap_err();
        assert!(matches!(err, Error::EnforcedUnset { .. }), "{err}");
    }

    #[test]
    fn registry_tables_are_kept_for_the_registry_config() {
        let s = load(
            "",
            "[[registry]]\nlocation = \"r.example\"\ninsecure = true\n",
        )
        .unwrap();
        assert_eq!(s.registries.len(), 1);
    }
}
