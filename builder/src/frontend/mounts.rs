//! `RUN --mount=...` values parsed into typed mounts, with BuildKit's
//! defaults filled in. The value is split into fields by
//! [`crate::options`] with [`Quotes::FieldStart`], as BuildKit reads it.
//!
//! Only the flag's text is interpreted here; nothing is mounted, and whether
//! a secret or SSH socket exists is checked by the build engine.

use serde::Serialize;

use super::shell::ShellError;
use crate::options::{self, Quotes};

/// Why a `--mount` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// `type=` with an unknown type.
    #[error("unsupported mount type {0:?}; use bind, cache, tmpfs, secret or ssh")]
    UnknownType(String),
    /// A key no mount type knows.
    #[error(
        "unexpected key {0:?} in --mount; see the RUN --mount reference for the keys of each type"
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

/// Parse one `--mount` value. `expand` expands a value (every key but
/// `from`); `ssh_index` is this mount's position among the RUN's SSH mounts.
pub fn parse_mount(
    value: &str,
    expand: &mut dyn FnMut(&str) -> std::result::Result<String, ShellError>,
    ssh_index: usize,
) -> Result<Mount> {
    let mut kind = "bind".to_string();
    let mut opts: Vec<(String, Option<String>)> = Vec::new();
    let fields = options::split(value, Quotes::FieldStart)
        .map_err(|_| MountError::Csv(value.to_string()))?;
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
    let kind: &'static str = match kind.as_str() {
        "bind" => "bind",
        "cache" => "cache",
        "tmpfs" => "tmpfs",
        "secret" => "secret",
        "ssh" => "ssh",
        _ => return Err(MountError::UnknownType(kind)),
    };

    let mut target = None;
    let mut source = None;
    let mut from = None;
    let mut readonly = None;
    let mut id = None;
    let mut sharing = Sharing::Shared;
    let (mut mode, mut uid, mut gid) = (None, None, None);
    let mut required = false;
    let mut size = None;
    let mut env = None;
    for (key, val) in opts {
        let need = |v: Option<String>| v.ok_or_else(|| MountError::MissingValue(key.clone()));
        let only = |kinds: &[&str]| {
            if kinds.contains(&kind) {
                Ok(())
            } else {
                Err(MountError::KeyNotForType {
                    key: key.clone(),
                    kind,
                })
            }
        };
        match key.as_str() {
            "target" | "dst" | "destination" => target = Some(need(val)?),
            "source" | "src" => {
                only(&["bind", "cache", "secret"])?;
                source = Some(need(val)?);
            }
            "from" => {
                only(&["bind", "cache"])?;
                from = Some(need(val)?);
            }
            "readonly" | "ro" => readonly = Some(parse_bool(&key, val.as_deref())?),
            "readwrite" | "rw" => readonly = Some(!parse_bool(&key, val.as_deref())?),
            "required" => {
                only(&["secret", "ssh"])?;
                required = parse_bool(&key, val.as_deref())?;
            }
            "id" => {
                only(&["cache", "secret", "ssh"])?;
                id = Some(need(val)?);
            }
            "sharing" => {
                only(&["cache"])?;
                sharing = match need(val)?.to_ascii_lowercase().as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    other => return Err(MountError::Sharing(other.to_string())),
                };
            }
            "mode" => {
                only(&["cache", "secret", "ssh"])?;
                mode = Some(parse_u32(
                    "mode",
                    &need(val)?,
                    8,
                    "an octal mode such as 0755",
                )?);
            }
            "uid" => {
                only(&["cache", "secret", "ssh"])?;
                uid = Some(parse_u32("uid", &need(val)?, 10, "a numeric user id")?);
            }
            "gid" => {
                only(&["cache", "secret", "ssh"])?;
                gid = Some(parse_u32("gid", &need(val)?, 10, "a numeric group id")?);
            }
            "size" => {
                only(&["tmpfs"])?;
                let v = need(val)?;
                size = Some(parse_size(&v).ok_or(MountError::Size(v))?);
            }
            "env" => {
                only(&["secret"])?;
                env = Some(need(val)?);
            }
            _ => return Err(MountError::UnknownKey(key)),
        }
    }
    if target.as_deref() == Some("/") {
        return Err(MountError::RootTarget);
    }
    let need_target = || target.clone().ok_or(MountError::MissingTarget(kind));
    Ok(match kind {
        "bind" => Mount::Bind {
            target: need_target()?,
            source,
            from,
            readwrite: readonly == Some(false),
        },
        "cache" => {
            let target = need_target()?;
            Mount::Cache {
                id: id.unwrap_or_else(|| clean_path(&target)),
                target,
                sharing,
                from,
                source,
                readonly: readonly.unwrap_or(false),
                mode: mode.unwrap_or(0o755),
                uid: uid.unwrap_or(0),
                gid: gid.unwrap_or(0),
            }
        }
        "tmpfs" => Mount::Tmpfs {
            target: need_target()?,
            size,
        },
        "secret" => {
            // BuildKit names a secret by `source`, else `id`, else the
            // target's base name.
            let id = source.or(id).unwrap_or_else(|| {
                target
                    .as_deref()
                    .map(|t| t.rsplit('/').next().unwrap_or(t).to_string())
                    .unwrap_or_default()
            });
            let target = match (&target, &env) {
                (None, None) => Some(format!("/run/secrets/{id}")),
                _ => target,
            };
            Mount::Secret {
                id,
                target,
                env,
                required,
                mode: mode.unwrap_or(0o400),
                uid: uid.unwrap_or(0),
                gid: gid.unwrap_or(0),
            }
        }
        _ => Mount::Ssh {
            id: id.unwrap_or_else(|| "default".into()),
            target: target.unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{ssh_index}")),
            required,
            mode: mode.unwrap_or(0o600),
            uid: uid.unwrap_or(0),
            gid: gid.unwrap_or(0),
        },
    })
}

/// Lexically clean an absolute or relative path (Go's `path.Clean`).
pub fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            x => out.push(x),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
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
