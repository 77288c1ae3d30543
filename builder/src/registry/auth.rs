//! Registry credentials: read from the files docker and Podman write, and
//! written by `kiln login`.
//!
//! Lookup order, first hit wins: `$REGISTRY_AUTH_FILE`,
//! `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.docker/config.json`. In
//! each, `credHelpers[HOST]` (or `credsStore`) names a
//! `docker-credential-NAME` helper asked with `get`; otherwise
//! `auths[HOST].auth` is base64 `user:password`. `kiln login` writes
//! `$REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`,
//! mode 0600, through a temp file and a rename.
//!
//! This module never talks to a registry and never prints a secret.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::{Map, Value};

/// Errors of reading and writing credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the auth file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the auth file {path} is not valid JSON; fix or remove it")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the auth file {path} has an entry for {host} whose `auth` is not base64 of user:password; run `kiln login {host}` again")]
    BadEntry { path: PathBuf, host: String },
    #[error("credential helper docker-credential-{helper} failed for {host}: {reason}")]
    Helper {
        helper: String,
        host: String,
        reason: String,
    },
    #[error("cannot write the auth file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nowhere to store credentials: set $REGISTRY_AUTH_FILE or $XDG_RUNTIME_DIR")]
    NoAuthFile,
}

/// Result type of credentials.
pub type Result<T> = std::result::Result<T, Error>;

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ****)", self.username)
    }
}

/// The files credentials are read from, in order.
pub fn read_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(r) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        out.push(PathBuf::from(r).join("containers").join("auth.json"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        out.push(PathBuf::from(h).join(".docker").join("config.json"));
    }
    out
}

/// The file `kiln login` writes.
pub fn write_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|r| PathBuf::from(r).join("containers").join("auth.json"))
        .ok_or(Error::NoAuthFile)
}

/// The keys a host may be stored under: docker writes Docker Hub as
/// `https://index.docker.io/v1/`, others write `docker.io`; some tools keep
/// a scheme.
fn keys_for(host: &str) -> Vec<String> {
    let mut keys = vec![host.to_string()];
    if host == "docker.io" {
        keys.extend(
            [
                "https://index.docker.io/v1/",
                "index.docker.io",
                "registry-1.docker.io",
            ]
            .map(String::from),
        );
    }
    keys
}

fn key_matches(key: &str, host: &str) -> bool {
    keys_for(host)
        .iter()
        .any(|k| k == key || super::config::host_of(key) == *k)
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| Error::Json {
                path: path.into(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.into(),
            source,
        }),
    }
}

/// The credentials for `host` (`docker.io`, `localhost:5000`), if any file
/// or helper has some.
pub fn lookup(host: &str) -> Result<Option<Credentials>> {
    for path in read_paths() {
        let Some(doc) = read_json(&path)? else {
            continue;
        };
        if let Some(helper) = doc
            .get("credHelpers")
            .and_then(Value::as_object)
            .and_then(|m| m.iter().find(|(k, _)| key_matches(k, host)))
            .and_then(|(_, v)| v.as_str())
        {
            return helper_get(helper, host);
        }
        let entry = doc
            .get("auths")
            .and_then(Value::as_object)
            .and_then(|m| m.iter().find(|(k, _)| key_matches(k, host)));
        if let Some((_, entry)) = entry {
            if let Some(auth) = entry.get("auth").and_then(Value::as_str) {
                return decode(auth).map(Some).ok_or_else(|| Error::BadEntry {
                    path: path.clone(),
                    host: host.into(),
                });
            }
        }
        if let Some(store) = doc.get("credsStore").and_then(Value::as_str) {
            if let Some(c) = helper_get(store, host)? {
                return Ok(Some(c));
            }
        }
    }
    Ok(None)
}

fn decode(auth: &str) -> Option<Credentials> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()?;
    let s = String::from_utf8(bytes).ok()?;
    let (u, p) = s.split_once(':')?;
    Some(Credentials {
        username: u.into(),
        password: p.into(),
    })
}

/// `docker-credential-NAME get` with the server on stdin; "credentials
/// not found" is no credentials, not an error.
fn helper_get(helper: &str, host: &str) -> Result<Option<Credentials>> {
    let err = |reason: String| Error::Helper {
        helper: helper.into(),
        host: host.into(),
        reason,
    };
    let server = if host == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        host
    };
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            err(format!(
                "cannot run it ({e}); install it or remove it from the auth file"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(crate::error_chain(&e)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        return Err(err(format!(
            "it exited with {}: {}",
            out.status,
            stdout.trim()
        )));
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let r: Reply = serde_json::from_slice(&out.stdout).map_err(|e| {
        err(format!(
            "its answer is not JSON with Username and Secret: {e}"
        ))
    })?;
    Ok(Some(Credentials {
        username: r.username,
        password: r.secret,
    }))
}

/// Change the `auths` object of the login file and write it back
/// atomically with mode 0600.
fn update(change: impl FnOnce(&mut Map<String, Value>)) -> Result<PathBuf> {
    let path = write_path()?;
    let mut doc = read_json(&path)?.unwrap_or_else(|| Value::Object(Map::new()));
    if !doc.is_object() {
        doc = Value::Object(Map::new());
    }
    let obj = doc.as_object_mut().expect("made an object above");
    let auths = obj
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    if !auths.is_object() {
        *auths = Value::Object(Map::new());
    }
    change(auths.as_object_mut().expect("made an object above"));
    let werr = |source| Error::Write {
        path: path.clone(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(werr)?;
    let tmp = dir.join(format!(
        ".{}.kiln-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    // 0600 from creation: the password is never readable by others, not
    // even for the moment between write and chmod
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(werr)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(werr)?;
    let bytes = serde_json::to_vec_pretty(&doc).expect("JSON value serialises");
    f.write_all(&bytes).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, &path).map_err(werr)?;
    Ok(path)
}

/// Store `creds` for `host`; returns the file written.
pub fn store(host: &str, creds: &Credentials) -> Result<PathBuf> {
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", creds.username, creds.password));
    update(|auths| {
        auths.retain(|k, _| !key_matches(k, host));
        auths.insert(host.into(), serde_json::json!({ "auth": auth }));
    })
}

/// Remove `host`'s credentials; returns whether there were any.
pub fn remove(host: &str) -> Result<bool> {
    let mut had = false;
    update(|auths| {
        let before = auths.len();
        auths.retain(|k, _| !key_matches(k, host));
        had = auths.len() != before;
    })?;
    Ok(had)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_auth_decodes_docker_entries() {
        let c = decode("dXNlcjpwYTpzcw==").unwrap();
        assert_eq!(c.username, "user");
        assert_eq!(c.password, "pa:ss");
        assert!(decode("!!").is_none());
        assert!(key_matches("https://index.docker.io/v1/", "docker.io"));
        assert!(key_matches("localhost:5000", "localhost:5000"));
        assert!(!key_matches("localhost:5001", "localhost:5000"));
        assert!(format!("{c:?}").contains("****"));
    }
}
