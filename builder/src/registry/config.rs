//! Which registries are plain HTTP, which have mirrors, and which private
//! certificate authorities kiln trusts.
//!
//! Sources, merged: `--insecure-registry HOST[:PORT]` flags; the registries
//! config (`$KILN_REGISTRIES_CONF`, else `~/.config/kiln/registries.toml`,
//! the subset of containers' `registries.conf` v2 that matters for pulling
//! and pushing: `[[registry]]` tables with `location`, `insecure` and
//! `mirror = [{ location = "..." }]`); and Podman's certs.d layout
//! (`~/.config/kiln/certs.d/HOST[:PORT]/ca.crt`, or
//! `$KILN_CERTS_DIR/HOST[:PORT]/*.crt`).
//!
//! This module only reads files; it never opens a connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Errors of reading the registries config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the registries config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the registries config {path} is not valid; see README.md, \"Registries\"")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("cannot read kiln's settings")]
    Settings(#[source] Box<crate::config::Error>),
    #[error("{path}: [[registry]] has no key {key:?}; kiln reads location, insecure and mirror (with location and insecure)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("a [[registry]] table of {path} is not valid; see README.md, \"Registries\"")]
    Table {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

/// Result type of the registries config.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Default, serde::Deserialize)]
struct File {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
struct RegistryEntry {
    location: String,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    mirror: Vec<MirrorEntry>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct MirrorEntry {
    location: String,
    #[serde(default)]
    insecure: bool,
}

/// Registry settings, by host (`HOST[:PORT]`).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// hosts spoken to over plain HTTP
    pub insecure: Vec<String>,
    /// origin host -> mirror hosts, tried in order before the origin
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// PEM files of certificate authorities to trust (certs.d)
    pub ca_files: Vec<PathBuf>,
    /// where the config was read from, if anywhere
    pub path: Option<PathBuf>,
}

fn config_home() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
}

/// The registries config path: `$KILN_REGISTRIES_CONF`, else
/// `$XDG_CONFIG_HOME/kiln/registries.toml` (`~/.config/kiln/...`).
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("KILN_REGISTRIES_CONF")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| config_home().map(|c| c.join("kiln").join("registries.toml")))
}

/// The certs.d directory: `$KILN_CERTS_DIR`, else
/// `$XDG_CONFIG_HOME/kiln/certs.d`.
pub fn certs_dir() -> Option<PathBuf> {
    std::env::var_os("KILN_CERTS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| config_home().map(|c| c.join("kiln").join("certs.d")))
}

/// `https://host:port/path` -> `host:port`.
pub fn host_of(location: &str) -> String {
    let s = location
        .strip_prefix("https://")
        .or_else(|| location.strip_prefix("http://"))
        .unwrap_or(location);
    s.split('/').next().unwrap_or(s).to_string()
}

impl Config {
    /// Read the default config (if it exists) and add the flags' insecure
    /// hosts and the certs.d authorities.
    pub fn load(insecure_flags: &[String]) -> Result<Self> {
        let mut cfg = match default_path() {
            Some(p) if p.exists() => Self::read(&p)?,
            _ => Config::default(),
        };
        // kiln.toml's [[registry]] tables, after registries.toml's
        let tables = crate::config::Settings::load()
            .map_err(|e| Error::Settings(Box::new(e)))?
            .registries;
        let mut entries = Vec::new();
        for (path, value) in tables {
            if let Some(key) = unknown_key(&value) {
                return Err(Error::UnknownKey { path, key });
            }
            let entry: RegistryEntry = value.try_into().map_err(|source| Error::Table {
                path,
                source: Box::new(source),
            })?;
            entries.push(entry);
        }
        cfg.add(File { registry: entries });
        cfg.insecure
            .extend(insecure_flags.iter().map(|h| host_of(h)));
        if let Some(dir) = certs_dir() {
            cfg.ca_files = ca_files_in(&dir);
        }
        Ok(cfg)
    }

    /// Parse one registries config file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|source| Error::Parse {
            path: path.into(),
            source,
        })?;
        cfg.path = Some(path.into());
        Ok(cfg)
    }

    fn parse(text: &str) -> std::result::Result<Self, toml::de::Error> {
        let file: File = toml::from_str(text)?;
        let mut cfg = Config::default();
        cfg.add(file);
        Ok(cfg)
    }

    fn add(&mut self, file: File) {
        let cfg = self;
        for r in file.registry {
            let host = host_of(&r.location);
            if r.insecure {
                cfg.insecure.push(host.clone());
            }
            for m in &r.mirror {
                let mh = host_of(&m.location);
                if m.insecure {
                    cfg.insecure.push(mh.clone());
                }
                cfg.mirrors.entry(host.clone()).or_default().push(mh);
            }
        }
    }

    /// Whether `host` is spoken to over plain HTTP.
    pub fn is_insecure(&self, host: &str) -> bool {
        self.insecure.iter().any(|h| h == host)
    }

    /// The hosts to try for `host`, mirrors first.
    pub fn candidates(&self, host: &str) -> Vec<String> {
        let mut out = self.mirrors.get(host).cloned().unwrap_or_default();
        out.push(host.to_string());
        out
    }
}

/// A key of a kiln.toml `[[registry]]` table (or of one of its mirrors)
/// that kiln does not read. registries.toml, shared with containers'
/// tools, may hold keys kiln leaves to them; kiln.toml is kiln's alone.
fn unknown_key(table: &toml::Value) -> Option<String> {
    let known = |t: &toml::Value, keys: &[&str]| {
        t.as_table()
            .and_then(|t| t.keys().find(|k| !keys.contains(&k.as_str())).cloned())
    };
    if let Some(k) = known(table, &["location", "insecure", "mirror"]) {
        return Some(k);
    }
    table
        .get("mirror")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|m| known(m, &["location", "insecure"]).map(|k| format!("mirror.{k}")))
}

/// Every `*.crt` one level below `dir` (`dir/HOST:PORT/ca.crt`). A CA is
/// trusted for every host, as rustls has no per-host roots; certs.d is the
/// user's own directory, so this adds no authority the user did not choose.
fn ca_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(hosts) = std::fs::read_dir(dir) else {
        return out;
    };
    for h in hosts.flatten() {
        let Ok(files) = std::fs::read_dir(h.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.path().extension().is_some_and(|e| e == "crt") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_config_parses_insecure_and_mirrors() {
        let cfg = Config::parse(
            r#"
[[registry]]
location = "docker.io"
mirror = [{ location = "http://127.0.0.1:5000", insecure = true }]

[[registry]]
location = "localhost:5001"
insecure = true
"#,
        )
        .unwrap();
        assert!(cfg.is_insecure("127.0.0.1:5000"));
        assert!(cfg.is_insecure("localhost:5001"));
        assert!(!cfg.is_insecure("docker.io"));
        assert_eq!(
            cfg.candidates("docker.io"),
            vec!["127.0.0.1:5000".to_string(), "docker.io".to_string()]
        );
        assert_eq!(cfg.candidates("quay.io"), vec!["quay.io".to_string()]);
    }

    #[test]
    fn registry_config_rejects_unknown_shape() {
        assert!(Config::parse("[[registry]]\ninsecure = true\n").is_err());
    }
}
