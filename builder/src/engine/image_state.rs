//! The state a build carries from step to step: the layer chain, the image
//! configuration being built, and its history. It is what a cache record
//! stores, and what becomes the image config and manifest at the end.
//!
//! This module only transforms data; it never touches the filesystem or a
//! sandbox.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::frontend::instructions::{CommandLine, Healthcheck, Instruction};
use crate::frontend::Platform;

/// One layer of the image being built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// sha256 of the uncompressed tar
    pub diff_id: String,
    /// the blob as stored
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// In an exported cache record: the exporting store held this layer
    /// as a plain tar and the record names its gzip copy; an import
    /// stores it plain again, so a build warmed by the cache stores the
    /// image a cold build stores. Never set in a local record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stored_plain: bool,
    /// The layer's file times were clamped to this SOURCE_DATE_EPOCH
    /// when it was made: its descriptor says so with BuildKit's
    /// `buildkit/rewritten-timestamp` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewritten_timestamp: Option<i64>,
}

/// A history entry, as BuildKit writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub created_by: String,
    pub empty_layer: bool,
    pub comment: Option<String>,
    /// from the base image: kept verbatim
    pub created: Option<String>,
}

/// The runtime configuration of the image (Docker's `config` object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RunConfig {
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub workdir: String,
    pub user: String,
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: BTreeSet<String>,
    pub volumes: BTreeSet<String>,
    pub stop_signal: Option<String>,
    pub shell: Option<Vec<String>>,
    pub healthcheck: Option<Value>,
    pub onbuild: Vec<String>,
    /// MAINTAINER: the image's `author` (a top-level field, not `config`)
    #[serde(default)]
    pub author: Option<String>,
}

/// Everything a step's result is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageState {
    /// chain ID of the top layer; None for an empty filesystem
    pub chain: Option<String>,
    pub layers: Vec<LayerRef>,
    pub config: RunConfig,
    pub history: Vec<History>,
    #[serde(with = "platform_serde")]
    pub platform: Platform,
}

/// (De)serialise a frontend platform as `os/arch[/variant]`.
mod platform_serde {
    use super::Platform;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Platform, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&p.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Platform, D::Error> {
        let text = String::deserialize(d)?;
        Platform::parse(&text).map_err(serde::de::Error::custom)
    }
}

pub const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

impl ImageState {
    pub fn scratch(platform: Platform) -> Self {
        // as BuildKit's empty image: the default PATH (not on Windows)
        // and `/` as the working directory
        let env = if platform.os == "windows" {
            Vec::new()
        } else {
            vec![format!("PATH={}", crate::frontend::plan::DEFAULT_PATH)]
        };
        ImageState {
            chain: None,
            layers: Vec::new(),
            config: RunConfig {
                env,
                workdir: "/".into(),
                ..RunConfig::default()
            },
            history: Vec::new(),
            platform,
        }
    }

    /// The image's environment as (key, value) pairs.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.config
            .env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }

    /// Set (or replace) one environment variable.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self
            .config
            .env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(e) => *e = entry,
            None => self.config.env.push(entry),
        }
    }

    pub fn shell(&self) -> Vec<String> {
        self.config.shell.clone().unwrap_or_else(|| {
            // as BuildKit: Windows images run `cmd /S /C`
            if self.platform.os == "windows" {
                ["cmd", "/S", "/C"].map(String::from).to_vec()
            } else {
                DEFAULT_SHELL.map(String::from).to_vec()
            }
        })
    }

    /// Apply an instruction that only changes the configuration; returns
    /// false for instructions that are not of that kind.
    pub fn apply_config(&mut self, ins: &Instruction) -> bool {
        let shell = self.shell();
        if let Instruction::Env(pairs) = ins {
            for kv in pairs {
                self.set_env(&kv.key, &kv.value);
            }
            return true;
        }
        let cfg = &mut self.config;
        match ins {
            Instruction::Cmd(c) => cfg.cmd = Some(command_line(c, &shell)),
            Instruction::Entrypoint(c) => {
                cfg.entrypoint = Some(command_line(c, &shell));
                // ENTRYPOINT resets a CMD inherited from the base image.
                cfg.cmd = None;
            }
            Instruction::Shell(s) => cfg.shell = Some(s.clone()),
            Instruction::Label(pairs) => {
                for kv in pairs {
                    cfg.labels.insert(kv.key.clone(), kv.value.clone());
                }
            }
            Instruction::Expose(ports) => {
                for p in ports {
                    for port in p.start..=p.end {
                        cfg.exposed_ports.insert(format!("{port}/{}", p.protocol));
                    }
                }
            }
            Instruction::Workdir(w) => cfg.workdir = join_workdir(&cfg.workdir, w),
            Instruction::User(u) => cfg.user = u.clone(),
            Instruction::Volume(v) => cfg.volumes.extend(v.iter().cloned()),
            Instruction::StopSignal(s) => cfg.stop_signal = Some(s.clone()),
            Instruction::Onbuild(o) => cfg.onbuild.push(o.expression.clone()),
            Instruction::Maintainer(m) => cfg.author = Some(m.clone()),
            Instruction::Healthcheck(h) => cfg.healthcheck = Some(healthcheck_json(h, &shell)),
            Instruction::Arg(_) => {}
            _ => return false,
        }
        true
    }

    /// The image config JSON (OCI image config with Docker's extensions),
    /// with `created` set when given (SOURCE_DATE_EPOCH) or now.
    pub fn config_json(&self, created: &str) -> Value {
        let c = &self.config;
        let mut config = serde_json::Map::new();
        if !c.env.is_empty() {
            config.insert("Env".into(), json!(c.env));
        }
        if let Some(cmd) = &c.cmd {
            config.insert("Cmd".into(), json!(cmd));
        }
        if let Some(ep) = &c.entrypoint {
            config.insert("Entrypoint".into(), json!(ep));
        }
        if !c.workdir.is_empty() {
            config.insert("WorkingDir".into(), json!(c.workdir));
        }
        if !c.user.is_empty() {
            config.insert("User".into(), json!(c.user));
        }
        if !c.labels.is_empty() {
            config.insert("Labels".into(), json!(c.labels));
        }
        if !c.exposed_ports.is_empty() {
            let ports: serde_json::Map<_, _> = c
                .exposed_ports
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            config.insert("ExposedPorts".into(), Value::Object(ports));
        }
        if !c.volumes.is_empty() {
            let vols: serde_json::Map<_, _> =
                c.volumes.iter().map(|p| (p.clone(), json!({}))).collect();
            config.insert("Volumes".into(), Value::Object(vols));
        }
        if let Some(s) = &c.stop_signal {
            config.insert("StopSignal".into(), json!(s));
        }
        if let Some(s) = &c.shell {
            config.insert("Shell".into(), json!(s));
        }
        if let Some(h) = &c.healthcheck {
            config.insert("Healthcheck".into(), h.clone());
        }
        if !c.onbuild.is_empty() {
            config.insert("OnBuild".into(), json!(c.onbuild));
        }
        let history: Vec<Value> = self
            .history
            .iter()
            .map(|h| {
                let mut e = serde_json::Map::new();
                e.insert(
                    "created".into(),
                    json!(h.created.clone().unwrap_or_else(|| created.to_string())),
                );
                e.insert("created_by".into(), json!(h.created_by));
                if let Some(c) = &h.comment {
                    e.insert("comment".into(), json!(c));
                }
                if h.empty_layer {
                    e.insert("empty_layer".into(), json!(true));
                }
                Value::Object(e)
            })
            .collect();
        let mut root = json!({
            "created": created,
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "config": Value::Object(config),
            "rootfs": {"type": "layers", "diff_ids": self.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
            "history": history,
        });
        if let Some(v) = &self.platform.variant {
            root["variant"] = json!(v);
        }
        if let Some(v) = &self.platform.os_version {
            root["os.version"] = json!(v);
        }
        if let Some(a) = &c.author {
            root["author"] = json!(a);
        }
        root
    }

    /// The state a base image's config describes (layers filled in by the
    /// caller).
    pub fn from_image_config(root: &Value, platform: Platform) -> Self {
        let c = &root["config"];
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
        };
        let keys = |v: &Value| -> BTreeSet<String> {
            v.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let config = RunConfig {
            env: strings(&c["Env"]).unwrap_or_default(),
            cmd: strings(&c["Cmd"]),
            entrypoint: strings(&c["Entrypoint"]),
            workdir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
            user: c["User"].as_str().unwrap_or_default().to_string(),
            labels: c["Labels"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            exposed_ports: keys(&c["ExposedPorts"]),
            volumes: keys(&c["Volumes"]),
            stop_signal: c["StopSignal"].as_str().map(String::from),
            shell: strings(&c["Shell"]),
            healthcheck: c.get("Healthcheck").filter(|v| !v.is_null()).cloned(),
            onbuild: strings(&c["OnBuild"]).unwrap_or_default(),
            author: root["author"].as_str().map(String::from),
        };
        ImageState {
            chain: None,
            layers: Vec::new(),
            config,
            history: base_history(root),
            platform,
        }
    }
}

/// The history entries of a base image config, kept verbatim.
pub fn base_history(config: &Value) -> Vec<History> {
    config["history"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| History {
                    created_by: h["created_by"].as_str().unwrap_or_default().to_string(),
                    empty_layer: h["empty_layer"].as_bool().unwrap_or(false),
                    comment: h["comment"].as_str().map(String::from),
                    created: h["created"].as_str().map(String::from),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// CMD/ENTRYPOINT as stored: exec form as is, shell form through SHELL.
pub fn command_line(c: &CommandLine, shell: &[String]) -> Vec<String> {
    match c {
        CommandLine::Exec(v) => v.clone(),
        CommandLine::Shell(s) => shell
            .iter()
            .cloned()
            .chain(std::iter::once(s.clone()))
            .collect(),
    }
}

fn healthcheck_json(h: &Healthcheck, shell: &[String]) -> Value {
    match h {
        Healthcheck::None => json!({"Test": ["NONE"]}),
        Healthcheck::Cmd {
            command,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        } => {
            let test: Vec<String> = match command {
                CommandLine::Exec(v) => std::iter::once("CMD".to_string())
                    .chain(v.iter().cloned())
                    .collect(),
                CommandLine::Shell(s) => vec!["CMD-SHELL".to_string(), s.clone()],
            };
            let _ = shell;
            let mut m = serde_json::Map::new();
            m.insert("Test".into(), json!(test));
            let ns = |d: &Option<std::time::Duration>| {
                d.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            };
            if let Some(v) = ns(interval) {
                m.insert("Interval".into(), json!(v));
            }
            if let Some(v) = ns(timeout) {
                m.insert("Timeout".into(), json!(v));
            }
            if let Some(v) = ns(start_period) {
                m.insert("StartPeriod".into(), json!(v));
            }
            if let Some(v) = ns(start_interval) {
                m.insert("StartInterval".into(), json!(v));
            }
            if let Some(r) = retries {
                m.insert("Retries".into(), json!(r));
            }
            Value::Object(m)
        }
    }
}

/// WORKDIR semantics: absolute replaces, relative joins, cleaned.
pub fn join_workdir(current: &str, w: &str) -> String {
    let joined = if w.starts_with('/') {
        w.to_string()
    } else {
        format!("{}/{w}", if current.is_empty() { "/" } else { current })
    };
    crate::frontend::clean_path(&format!("/{joined}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workdirs_chain_and_clean() {
        assert_eq!(join_workdir("", "app"), "/app");
        assert_eq!(join_workdir("/app", "src/../lib"), "/app/lib");
        assert_eq!(join_workdir("/app", "/x/"), "/x");
        assert_eq!(join_workdir("/", "../../etc"), "/etc");
    }

    #[test]
    fn env_is_replaced_in_place() {
        let mut s = ImageState::scratch(Platform::host());
        s.set_env("A", "1");
        s.set_env("B", "2");
        s.set_env("A", "3");
        let path = format!("PATH={}", crate::frontend::plan::DEFAULT_PATH);
        assert_eq!(s.config.env, vec![path.as_str(), "A=3", "B=2"]);
    }
}
