//! kiln's client of the OCI distribution API: the token dance, requests
//! with the right credentials, and turning answers into [`Error`]s.
//!
//! Every body a registry (or its token service) sends is read with a
//! bound: token responses up to [`MAX_TOKEN_BYTES`], error bodies up to
//! [`MAX_ERROR_BYTES`] (what is past it is not read), manifests up to
//! `MAX_MANIFEST_BYTES` (`pull`), blobs up to their descriptor's size
//! (`pull`). A hostile registry cannot make kiln hold more than that.
//!
//! Credentials go only where they belong: basic credentials to the registry
//! asked (or its token realm, as every Docker client does), bearer tokens
//! only to the registry they were issued for; redirects to another host
//! (blob storage) carry no `Authorization` header (reqwest drops it).

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Error, Result};

/// The most bytes of a token response kiln reads.
pub const MAX_TOKEN_BYTES: usize = 1 << 20;
/// The most bytes of an error body kiln reads (for its message).
pub const MAX_ERROR_BYTES: usize = 4096;

/// What a request is for: the token scope it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Pull,
    Push,
}

/// Credentials for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub enum Creds {
    Anonymous,
    Basic(String, String),
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Creds::Anonymous => f.write_str("Anonymous"),
            Creds::Basic(u, _) => write!(f, "Basic({u}, ***)"),
        }
    }
}

/// A repository on a registry's API host, and what in it a request names
/// (a tag or a digest).
#[derive(Debug, Clone)]
pub struct Remote {
    /// `host[:port]` requests go to (Docker Hub's API host, not docker.io)
    pub registry: String,
    pub repository: String,
    pub reference: String,
}

/// Who a request's errors are about: the image name the user gave and the
/// host (origin or mirror) asked.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub name: &'a str,
    pub host: &'a str,
}

impl Subject<'_> {
    pub fn unreachable(&self, e: &reqwest::Error) -> Error {
        Error::Unreachable {
            reference: self.name.to_string(),
            host: self.host.to_string(),
            reason: crate::error_chain(e),
        }
    }

    pub fn unauthorized(&self) -> Error {
        Error::Unauthorized {
            reference: self.name.to_string(),
            host: self.host.to_string(),
        }
    }

    pub fn not_found(&self) -> Error {
        Error::NotFound {
            reference: self.name.to_string(),
            host: self.host.to_string(),
        }
    }

    pub fn failed(&self, reason: String) -> Error {
        Error::Registry {
            reference: self.name.to_string(),
            host: self.host.to_string(),
            reason,
        }
    }

    /// The error an unexpected answer means: 401/403 unauthorized, 404 or
    /// a registry "unknown" code not found, else the status and the start
    /// of the body. Reads at most [`MAX_ERROR_BYTES`] of it.
    pub async fn status_error(&self, what: &str, res: reqwest::Response) -> Error {
        let status = res.status().as_u16();
        match status {
            401 | 403 => return self.unauthorized(),
            404 => return self.not_found(),
            _ => {}
        }
        let text = read_bounded(res, MAX_ERROR_BYTES).await;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) {
            let codes: Vec<&str> = v["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["code"].as_str()).collect())
                .unwrap_or_default();
            let unknown = [
                "NAME_UNKNOWN",
                "MANIFEST_UNKNOWN",
                "BLOB_UNKNOWN",
                "NOT_FOUND",
            ];
            if codes.iter().any(|c| unknown.contains(c)) {
                return self.not_found();
            }
            if codes.contains(&"UNAUTHORIZED") || codes.contains(&"DENIED") {
                return self.unauthorized();
            }
        }
        let body = String::from_utf8_lossy(&text);
        let body = body.trim();
        self.failed(if body.is_empty() {
            format!("HTTP {status} for {what}")
        } else {
            format!("HTTP {status} for {what}: {body}")
        })
    }
}

/// Up to `limit` bytes of `res`'s body; what is past the limit is not read.
pub async fn read_bounded(mut res: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = res.chunk().await {
        let room = limit - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    out
}

/// Bearer tokens by registry, repository and operation (`None`: the
/// registry asked for none).
#[derive(Debug, Default)]
pub struct Tokens(Mutex<HashMap<(String, String, Op), Option<String>>>);

impl Tokens {
    pub fn get(&self, remote: &Remote, op: Op) -> Option<Option<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(remote.registry.clone(), remote.repository.clone(), op))
            .cloned()
    }

    fn put(&self, remote: &Remote, op: Op, token: Option<String>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                (remote.registry.clone(), remote.repository.clone(), op),
                token,
            );
    }
}

/// A `WWW-Authenticate: Bearer k="v",...` challenge's parameters.
fn bearer_challenge(header: &str) -> Option<HashMap<String, String>> {
    let rest = header.trim().strip_prefix("Bearer")?.trim_start();
    let mut params = HashMap::new();
    let mut s = rest;
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        params.insert(key, value.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(params)
}

/// `req` with the bearer token, else the basic credentials, if any.
pub fn authorized(
    req: reqwest::RequestBuilder,
    token: Option<&str>,
    creds: &Creds,
) -> reqwest::RequestBuilder {
    match (token, creds) {
        (Some(t), _) => req.bearer_auth(t),
        (None, Creds::Basic(u, p)) => req.basic_auth(u, Some(p)),
        (None, Creds::Anonymous) => req,
    }
}

/// The registry client proper: one HTTP client, the plain-HTTP hosts, and
/// the tokens obtained so far.
#[derive(Debug)]
pub struct Client {
    pub http: reqwest::Client,
    /// API hosts spoken to over plain HTTP
    pub insecure: Vec<String>,
    pub tokens: Tokens,
}

impl Client {
    /// `http` or `https` for `registry`.
    pub fn scheme(&self, registry: &str) -> &'static str {
        if self.insecure.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        }
    }

    /// `scheme://registry/v2/repository/` + `rest`.
    pub fn url(&self, remote: &Remote, rest: &str) -> String {
        format!(
            "{}://{}/v2/{}/{rest}",
            self.scheme(&remote.registry),
            remote.registry,
            remote.repository
        )
    }

    /// Ask the registry what it wants (`GET /v2/`), and fetch a token for
    /// `op` on `remote` when it wants one; remembered for later requests.
    pub async fn authenticate(
        &self,
        who: Subject<'_>,
        remote: &Remote,
        creds: &Creds,
        op: Op,
    ) -> Result<()> {
        let ping = format!(
            "{}://{}/v2/",
            self.scheme(&remote.registry),
            remote.registry
        );
        let res = self
            .http
            .get(&ping)
            .send()
            .await
            .map_err(|e| who.unreachable(&e))?;
        if res.status().is_success() {
            self.tokens.put(remote, op, None);
            return Ok(());
        }
        if res.status().as_u16() != 401 {
            return Err(who.status_error(&ping, res).await);
        }
        let challenge = res
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(bearer_challenge);
        drop(res);
        let Some(params) = challenge else {
            // Basic (or no scheme named): the credentials go with each
            // request, as they are
            self.tokens.put(remote, op, None);
            return Ok(());
        };
        let realm = params
            .get("realm")
            .ok_or_else(|| who.failed(format!("{ping} asks for a token but names no realm")))?;
        let scope = match op {
            Op::Pull => format!("repository:{}:pull", remote.repository),
            Op::Push => format!("repository:{}:pull,push", remote.repository),
        };
        let mut query = vec![("scope", scope)];
        if let Some(service) = params.get("service") {
            query.push(("service", service.clone()));
        }
        let mut url = reqwest::Url::parse(realm).map_err(|e| {
            who.failed(format!(
                "{ping} names a token realm {realm:?} that is not a URL: {e}"
            ))
        })?;
        url.query_pairs_mut().extend_pairs(&query);
        let mut req = self.http.get(url);
        if let Creds::Basic(u, p) = creds {
            req = req.basic_auth(u, Some(p));
        }
        let res = req.send().await.map_err(|e| who.unreachable(&e))?;
        if !res.status().is_success() {
            return Err(who.status_error(realm, res).await);
        }
        if res
            .content_length()
            .is_some_and(|l| l > MAX_TOKEN_BYTES as u64)
        {
            return Err(who.failed(format!(
                "the token service {realm} sent more than the {MAX_TOKEN_BYTES} bytes kiln reads"
            )));
        }
        let body = read_bounded(res, MAX_TOKEN_BYTES + 1).await;
        if body.len() > MAX_TOKEN_BYTES {
            return Err(who.failed(format!(
                "the token service {realm} sent more than the {MAX_TOKEN_BYTES} bytes kiln reads"
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| who.failed(format!("the token service {realm} sent no JSON: {e}")))?;
        let token = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| who.failed(format!("the token service {realm} sent no token")))?;
        self.tokens.put(remote, op, Some(token.to_string()));
        Ok(())
    }

    /// Send the request `build` makes, with a bearer token for `op` (got
    /// first when there is none) or the basic credentials; a 401 gets one
    /// more try with a new token. Any other status is the caller's to
    /// judge.
    pub async fn send(
        &self,
        who: Subject<'_>,
        remote: &Remote,
        creds: &Creds,
        op: Op,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        for retry in [false, true] {
            let token = match self.tokens.get(remote, op) {
                Some(t) if !retry => t,
                _ => {
                    self.authenticate(who, remote, creds, op).await?;
                    self.tokens.get(remote, op).flatten()
                }
            };
            let res = authorized(build(), token.as_deref(), creds)
                .send()
                .await
                .map_err(|e| who.unreachable(&e))?;
            if res.status().as_u16() == 401 && !retry {
                continue;
            }
            return Ok(res);
        }
        unreachable!("the second attempt returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse_as_registries_send_them() {
        let p = bearer_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/busybox:pull");
        let p = bearer_challenge("Bearer realm=http://127.0.0.1:5000/t, service=local").unwrap();
        assert_eq!(p["realm"], "http://127.0.0.1:5000/t");
        assert_eq!(p["service"], "local");
        assert!(bearer_challenge(r#"Basic realm="registry""#).is_none());
        assert!(bearer_challenge(r#"Bearer realm="unterminated"#).is_none());
    }
}
