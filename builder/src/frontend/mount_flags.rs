//! `RUN --mount=...` values parsed into typed mounts, with BuildKit's
//! defaults filled in. The value is split into fields by
//! [`crate::options`] with [`Quotes::FieldStart`], as BuildKit reads it.
//!
//! Only the flag's text is interpreted here; nothing is mounted, and whether
//! a secret or SSH socket exists is checked by the build engine.

use serde::Serialize;

use super::clean_path;
use super::shell::ShellError;
use crate::options::{self, Quotes};

/// The mount types, and every key of any type (for "did you mean").
const TYPES: [&str; 5] = ["bind", "cache", "tmpfs", "secret", "ssh"];
const KEYS: [&str; 18] = [
    "type",
    "target",
    "dst",
    "destination",
    "source",
    "src",
    "from",
    "readonly",
    "ro",
    "readwrite",
    "rw",
    "required",
    "id",
    "sharing",
    "mode",
    "uid",
    "gid",
    "size",
];

/// BuildKit's ` (did you mean X?)` for a misspelled name, or nothing.
fn did_you_mean(name: &str, options: &[&str]) -> String {
    match crate::frontend::lint::suggest(name, options) {
        Some(m) => format!(" (did you mean {m}?)"),
        None => String::new(),
    }
}

/// Why a `--mount` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// `type=` with an unknown type.
    #[error("unsupported mount type {0:?}{hint}; use bind, cache, tmpfs, secret or ssh", hint = did_you_mean(.0, &TYPES))]
    UnknownType(String),
    /// A key no mount type knows.
    #[error(
        "unexpected key {0:?} in --mount{hint}; see the RUN --mount reference for the keys of each type",
        hint = did_you_mean(.0, &KEYS)
    )]
    UnknownKey(String),
    /// A key that does not apply to this type.
    #[error("option {key:?} is not allowed for mount type {kind}")]
    KeyNotForType { key: String, kind: &'static str },
    /// A key that needs a value was given bare.
    #[error("mount option {0:?} needs a value, as {0}=VALUE")]
    MissingValue(String),
    /// A boolean option with a non-boolean value.
    #[error("invalid boolean {value:?} for mount option {key:?}; use true or false")]
    NotBool { key: String, value: String },
    /// Bind, cache and tmpfs mounts need somewhere to go.
    #[error("mount type {0} requires a target, as target=/path")]
    MissingTarget(&'static str),
    /// Mounting over `/`.
    #[error("mount target cannot be /; choose a directory")]
    RootTarget,
    /// `sharing=` with an unknown mode.
    #[error("unsupported sharing value {0:?}; use shared, private or locked")]
    Sharing(String),
    /// `mode=` not octal, `uid=` / `gid=` not a number.
    #[error("invalid {key} {value:?} in --mount; expected {expected}")]
    Number {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    /// `size=` not a size.
    #[error("invalid tmpfs size {0:?}; use a number with an optional unit, e.g. 64m")]
    Size(String),
    /// `from=$X`.
    #[error("'from' doesn't support variable expansion, define alias stage instead (from={0:?})")]
    FromExpansion(String),
    /// An unbalanced quote in the CSV value.
    #[error("unterminated quote in --mount value {0:?}")]
    Csv(String),
    /// A variable in a value could not be expanded.
    #[error(transparent)]
    Expansion(#[from] ShellError),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, MountError>;

/// How a cache mount is shared between concurrent builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// Concurrent writers share it (the default).
    Shared,
    /// Each writer gets its own instance.
    Private,
    /// Writers wait for one another.
    Locked,
}

/// One `--mount` of a RUN, typed by mount kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Mount {
    /// A read-only (unless `rw`) view of a stage, image or context.
    Bind {
        /// Where it appears in the container.
        target: String,
        /// Path inside `from`; its root when absent.
        source: Option<String>,
        /// Stage name or index, named context or image; the build context when absent.
        from: Option<String>,
        /// Writes are allowed (and discarded afterwards).
        readwrite: bool,
    },
    /// A persistent cache directory.
    Cache {
        /// Where it appears.
        target: String,
        /// Cache identity; defaults to the target.
        id: String,
        /// Concurrency mode.
        sharing: Sharing,
        /// Stage/image whose `source` seeds the cache.
        from: Option<String>,
        /// Path in `from` that seeds the cache.
        source: Option<String>,
        /// Mounted read-only.
        readonly: bool,
        /// Directory mode, default 0755.
        mode: u32,
        /// Owner uid, default 0.
        uid: u32,
        /// Owner gid, default 0.
        gid: u32,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Where it appears.
        target: String,
        /// Size limit in bytes.
        size: Option<u64>,
    },
    /// A build secret as a file and/or environment variable.
    Secret {
        /// Secret id; defaults to the target's base name.
        id: String,
        /// File path; `/run/secrets/<id>` unless only `env` was given.
        target: Option<String>,
        /// Environment variable to expose it as.
        env: Option<String>,
        /// Fail when the secret is missing (otherwise skip the mount).
        required: bool,
        /// File mode, default 0400.
        mode: u32,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
    },
    /// An SSH agent socket.
    Ssh {
        /// Agent id, default `default`.
        id: String,
        /// Socket path; `/run/buildkit/ssh_agent.<N>` by default.
        target: String,
        /// Fail when the agent is missing.
        required: bool,
        /// Socket mode, default 0600.
        mode: u32,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
    },
}

impl Mount {
    /// The mount point, when the mount has one.
    pub fn target_mut(&mut self) -> Option<&mut String> {
        match self {
            Mount::Bind { target, .. }
            | Mount::Cache { target, .. }
            | Mount::Tmpfs { target, .. }
            | Mount::Ssh { target, .. } => Some(target),
            Mount::Secret { target, .. } => target.as_mut(),
        }
    }

    /// The stage, context or image this mount reads from, if any.
    pub fn from(&self) -> Option<&str> {
        match self {
            Mount::Bind { from, .. } | Mount::Cache { from, .. } => from.as_deref(),
            _ => None,
        }
    }
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool> {
    match v.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true" | "1" | "t") => Ok(true),
        Some("false" | "0" | "f") => Ok(false),
        Some(_) => Err(MountError::NotBool {
            key: key.to_string(),
            value: v.unwrap_or_default().to_string(),
        }),
    }
}

fn parse_u32(key: &'static str, v: &str, radix: u32, expected: &'static str) -> Result<u32> {
    u32::from_str_radix(v, radix).map_err(|_| MountError::Number {
        key,
        value: v.to_string(),
        expected,
    })
}

/// Parse a size such as `64m`, `1.5g`, `4096` (docker/go-units `RAMInBytes`).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1u64 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        't' => (&t[..t.len() - 1], 1 << 40),
        'p' => (&t[..t.len() - 1], 1 << 50),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let bytes = n * mult as f64;
    // Checked just above and here: finite, non-negative and below u64::MAX,
    // so the conversion neither wraps nor loses a sign (it drops fractions
    // of a byte, as go-units does).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// The `type=` of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountType {
    fn parse(s: String) -> Result<Self> {
        Ok(match s.as_str() {
            "bind" => MountType::Bind,
            "cache" => MountType::Cache,
            "tmpfs" => MountType::Tmpfs,
            "secret" => MountType::Secret,
            "ssh" => MountType::Ssh,
            _ => return Err(MountError::UnknownType(s)),
        })
    }

    fn name(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

/// Parse one `--mount` value. `expand` expands a value (every key but
/// `from`); `ssh_index` is this mount's position among the RUN's SSH mounts.
pub fn parse_mount(
    value: &str,
    expand: &mut dyn FnMut(&str) -> std::result::Result<String, ShellError>,
    ssh_index: usize,
) -> Result<Mount> {
    let (kind, fields) = read_fields(value, expand)?;
    let kind = MountType::parse(kind)?;
    let mut opts = MountOptions::default();
    for (key, val) in fields {
        opts.set(kind, key, val)?;
    }
    if opts.target.as_deref() == Some("/") {
        return Err(MountError::RootTarget);
    }
    match kind {
        MountType::Bind => opts.bind(),
        MountType::Cache => opts.cache(),
        MountType::Tmpfs => opts.tmpfs(),
        MountType::Secret => Ok(opts.secret()),
        MountType::Ssh => Ok(opts.ssh(ssh_index)),
    }
}

/// One `key[=value]` of a `--mount`: lower-case key, expanded value.
type Field = (String, Option<String>);

/// Split a `--mount` value into its `type` (`bind` when absent) and its
/// other `key[=value]` fields, keys lower-cased and values expanded.
fn read_fields(
    value: &str,
    expand: &mut dyn FnMut(&str) -> std::result::Result<String, ShellError>,
) -> Result<(String, Vec<Field>)> {
    let fields = options::split(value, Quotes::FieldStart)
        .map_err(|_| MountError::Csv(value.to_string()))?;
    let mut kind = "bind".to_string();
    let mut opts = Vec::new();
    for field in fields {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
            None => (field.trim().to_ascii_lowercase(), None),
        };
        if key.is_empty() && val.is_none() {
            continue;
        }
        let val = match (key.as_str(), val) {
            ("from", Some(v)) if super::instructions::has_variable(&v) => {
                return Err(MountError::FromExpansion(v))
            }
            ("from", v) => v,
            (_, Some(v)) => Some(expand(&v)?),
            (_, None) => None,
        };
        if key == "type" {
            kind = val
                .ok_or_else(|| MountError::MissingValue("type".into()))?
                .to_ascii_lowercase();
        } else {
            opts.push((key, val));
        }
    }
    Ok((kind, opts))
}

/// The options of one `--mount`, as given; each type's constructor fills
/// in BuildKit's defaults for the ones left out.
#[derive(Default)]
struct MountOptions {
    target: Option<String>,
    source: Option<String>,
    from: Option<String>,
    readonly: Option<bool>,
    id: Option<String>,
    sharing: Option<Sharing>,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    required: bool,
    size: Option<u64>,
    env: Option<String>,
}

impl MountOptions {
    /// Record `key[=val]` for a mount of type `kind`: the table of which
    /// keys exist, their aliases, the types that take them and how their
    /// values read.
    fn set(&mut self, kind: MountType, key: String, val: Option<String>) -> Result<()> {
        use MountType::{Bind, Cache, Secret, Ssh, Tmpfs};
        let need = |v: Option<String>| v.ok_or_else(|| MountError::MissingValue(key.clone()));
        let only = |kinds: &[MountType]| {
            if kinds.contains(&kind) {
                Ok(())
            } else {
                Err(MountError::KeyNotForType {
                    key: key.clone(),
                    kind: kind.name(),
                })
            }
        };
        match key.as_str() {
            "target" | "dst" | "destination" => self.target = Some(need(val)?),
            "source" | "src" => {
                only(&[Bind, Cache, Secret])?;
                self.source = Some(need(val)?);
            }
            "from" => {
                only(&[Bind, Cache])?;
                self.from = Some(need(val)?);
            }
            "readonly" | "ro" => self.readonly = Some(parse_bool(&key, val.as_deref())?),
            "readwrite" | "rw" => self.readonly = Some(!parse_bool(&key, val.as_deref())?),
            "required" => {
                only(&[Secret, Ssh])?;
                self.required = parse_bool(&key, val.as_deref())?;
            }
            "id" => {
                only(&[Cache, Secret, Ssh])?;
                self.id = Some(need(val)?);
            }
            "sharing" => {
                only(&[Cache])?;
                self.sharing = Some(parse_sharing(&need(val)?)?);
            }
            "mode" => {
                only(&[Cache, Secret, Ssh])?;
                let v = need(val)?;
                self.mode = Some(parse_u32("mode", &v, 8, "an octal mode such as 0755")?);
            }
            "uid" => {
                only(&[Cache, Secret, Ssh])?;
                self.uid = Some(parse_u32("uid", &need(val)?, 10, "a numeric user id")?);
            }
            "gid" => {
                only(&[Cache, Secret, Ssh])?;
                self.gid = Some(parse_u32("gid", &need(val)?, 10, "a numeric group id")?);
            }
            "size" => {
                only(&[Tmpfs])?;
                let v = need(val)?;
                self.size = Some(parse_size(&v).ok_or(MountError::Size(v))?);
            }
            "env" => {
                only(&[Secret])?;
                self.env = Some(need(val)?);
            }
            _ => return Err(MountError::UnknownKey(key)),
        }
        Ok(())
    }

    fn target(&self, kind: MountType) -> Result<String> {
        self.target
            .clone()
            .ok_or(MountError::MissingTarget(kind.name()))
    }

    fn bind(self) -> Result<Mount> {
        Ok(Mount::Bind {
            target: self.target(MountType::Bind)?,
            source: self.source,
            from: self.from,
            readwrite: self.readonly == Some(false),
        })
    }

    fn cache(self) -> Result<Mount> {
        let target = self.target(MountType::Cache)?;
        Ok(Mount::Cache {
            id: self.id.unwrap_or_else(|| clean_path(&target)),
            target,
            sharing: self.sharing.unwrap_or(Sharing::Shared),
            from: self.from,
            source: self.source,
            readonly: self.readonly.unwrap_or(false),
            mode: self.mode.unwrap_or(0o755),
            uid: self.uid.unwrap_or(0),
            gid: self.gid.unwrap_or(0),
        })
    }

    fn tmpfs(self) -> Result<Mount> {
        Ok(Mount::Tmpfs {
            target: self.target(MountType::Tmpfs)?,
            size: self.size,
        })
    }

    fn secret(self) -> Mount {
        // BuildKit names a secret by `source`, else `id`, else the
        // target's base name.
        let id = self.source.or(self.id).unwrap_or_else(|| {
            self.target
                .as_deref()
                .map(|t| t.rsplit('/').next().unwrap_or(t).to_string())
                .unwrap_or_default()
        });
        let target = match (&self.target, &self.env) {
            (None, None) => Some(format!("/run/secrets/{id}")),
            _ => self.target,
        };
        Mount::Secret {
            id,
            target,
            env: self.env,
            required: self.required,
            mode: self.mode.unwrap_or(0o400),
            uid: self.uid.unwrap_or(0),
            gid: self.gid.unwrap_or(0),
        }
    }

    fn ssh(self, ssh_index: usize) -> Mount {
        Mount::Ssh {
            id: self.id.unwrap_or_else(|| "default".into()),
            target: self
                .target
                .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{ssh_index}")),
            required: self.required,
            mode: self.mode.unwrap_or(0o600),
            uid: self.uid.unwrap_or(0),
            gid: self.gid.unwrap_or(0),
        }
    }
}

fn parse_sharing(v: &str) -> Result<Sharing> {
    match v.to_ascii_lowercase().as_str() {
        "shared" => Ok(Sharing::Shared),
        "private" => Ok(Sharing::Private),
        "locked" => Ok(Sharing::Locked),
        other => Err(MountError::Sharing(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Result<Mount> {
        parse_mount(s, &mut |v| Ok(v.replace("$D", "/data")), 0)
    }

    #[test]
    fn defaults_per_type() {
        assert_eq!(
            m("target=/src").unwrap(),
            Mount::Bind {
                target: "/src".into(),
                source: None,
                from: None,
                readwrite: false
            }
        );
        assert_eq!(
            m("type=cache,target=/root/.cache//go/,sharing=locked").unwrap(),
            Mount::Cache {
                target: "/root/.cache//go/".into(),
                id: "/root/.cache/go".into(),
                sharing: Sharing::Locked,
                from: None,
                source: None,
                readonly: false,
                mode: 0o755,
                uid: 0,
                gid: 0
            }
        );
        assert_eq!(
            m("type=secret,id=tok").unwrap(),
            Mount::Secret {
                id: "tok".into(),
                target: Some("/run/secrets/tok".into()),
                env: None,
                required: false,
                mode: 0o400,
                uid: 0,
                gid: 0
            }
        );
        assert!(matches!(
            m("type=secret,id=tok,env=TOKEN").unwrap(),
            Mount::Secret { target: None, .. }
        ));
        assert!(
            matches!(m("type=secret,target=/etc/npmrc").unwrap(), Mount::Secret { ref id, .. } if id == "npmrc")
        );
        assert!(
            matches!(m("type=ssh").unwrap(), Mount::Ssh { ref target, ref id, mode: 0o600, .. } if target == "/run/buildkit/ssh_agent.0" && id == "default")
        );
        assert_eq!(
            m("type=tmpfs,dst=/t,size=64m").unwrap(),
            Mount::Tmpfs {
                target: "/t".into(),
                size: Some(64 << 20)
            }
        );
    }

    #[test]
    fn options_and_errors() {
        assert!(matches!(
            m("type=bind,src=x,target=/x,rw").unwrap(),
            Mount::Bind {
                readwrite: true,
                ..
            }
        ));
        assert!(
            matches!(m("TYPE=cache,Target=$D,ro").unwrap(), Mount::Cache { readonly: true, ref target, .. } if target == "/data")
        );
        assert!(matches!(
            m("type=cache,target=/c,mode=0700,uid=1000,gid=1000").unwrap(),
            Mount::Cache {
                mode: 0o700,
                uid: 1000,
                gid: 1000,
                ..
            }
        ));
        assert_eq!(
            m("type=nfs,target=/x"),
            Err(MountError::UnknownType("nfs".into()))
        );
        assert_eq!(
            m("target=/x,bogus=1"),
            Err(MountError::UnknownKey("bogus".into()))
        );
        assert!(MountError::UnknownType("tmp".into())
            .to_string()
            .contains("unsupported mount type \"tmp\" (did you mean tmpfs?)"));
        assert!(MountError::UnknownKey("typ".into())
            .to_string()
            .contains("(did you mean type?)"));
        assert!(matches!(
            m("target=/x,mode=0755"),
            Err(MountError::KeyNotForType { .. })
        ));
        assert_eq!(m("type=cache"), Err(MountError::MissingTarget("cache")));
        assert_eq!(m("target=/"), Err(MountError::RootTarget));
        assert_eq!(
            m("from=$X,target=/x"),
            Err(MountError::FromExpansion("$X".into()))
        );
        assert!(matches!(
            m("type=cache,target=/c,sharing=weird"),
            Err(MountError::Sharing(_))
        ));
        assert!(matches!(
            m("type=cache,target=/c,mode=999"),
            Err(MountError::Number { .. })
        ));
        assert!(matches!(
            m("type=tmpfs,target=/c,size=lots"),
            Err(MountError::Size(_))
        ));
        assert!(
            matches!(m("\"target=/a,b\""), Ok(Mount::Bind { ref target, .. }) if target == "/a,b")
        );
    }

    #[test]
    fn clean() {
        assert_eq!(clean_path("/a/./b/../c//"), "/a/c");
        assert_eq!(clean_path("a/../../b"), "../b");
        assert_eq!(clean_path(""), ".");
        assert_eq!(clean_path("/.."), "/");
    }
}
