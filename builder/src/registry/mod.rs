//! Registries: pulling images into the local store and pushing them out,
//! over the OCI distribution API (kiln's own client in [`http`], on reqwest
//! and rustls, reading every body with a bound).
//!
//! - [`config`]: plain-HTTP registries, mirrors, certs.d authorities
//! - [`auth`]: credentials from auth.json / docker config, `kiln login`
//! - [`http`]: the token dance, authenticated requests, error answers
//! - [`Registry`]: one configured client; [`Registry::pull`],
//!   [`Registry::push`], [`Registry::login`], and the blob/manifest
//!   primitives ([`Registry::fetch_manifest`], [`Registry::fetch_blob`],
//!   [`Registry::push_blob`], [`Registry::push_manifest`]) that other
//!   exporters (a registry cache) can build on
//!
//! Everything fetched is written through the content store's verifying
//! writer, so a blob becomes visible only once its bytes hash to the digest
//! the manifest names; an image is named only after all of its blobs are
//! stored and unpacked. This module never runs a build step and never
//! writes outside the state directory and the auth file.

pub mod auth;
pub mod config;
pub mod http;
mod pull;
mod push;

use std::sync::Arc;

use http::{Creds, Op, Remote, Subject};

use crate::image::reference::{self, Reference};
use crate::image::store;

pub use pull::{resolve_document, Document, Pulled};
pub use push::Pushed;

/// Errors of talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Auth(#[from] auth::Error),
    #[error(transparent)]
    Name(#[from] reference::Error),
    #[error("cannot read the certificate authority {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("{reference}: registry {host} is unreachable ({reason}); check that it is running at that address (a plain-HTTP registry needs --insecure-registry {host}, a private CA ~/.config/kiln/certs.d/{host}/ca.crt)")]
    Unreachable {
        reference: String,
        host: String,
        reason: String,
    },
    #[error("{reference}: registry {host} refused the credentials (401 unauthorized); run `kiln login {host}`")]
    Unauthorized { reference: String, host: String },
    #[error("{reference}: not found in registry {host}")]
    NotFound { reference: String, host: String },
    #[error("{reference}: registry {host} answered with an error: {reason}")]
    Registry {
        reference: String,
        host: String,
        reason: String,
    },
    #[error("{reference}: no image for {platform} (the index has: {available}); pick one with --platform")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    #[error("{reference}: {what} {digest} from registry {host} is corrupt or truncated: {reason}; nothing was stored")]
    BadBlob {
        reference: String,
        host: String,
        what: &'static str,
        digest: String,
        reason: String,
    },
    #[error("{reference}: the manifest is not valid: {reason}")]
    BadManifest { reference: String, reason: String },
    #[error("{reference}: {context}")]
    Store {
        reference: String,
        context: &'static str,
        source: Box<store::Error>,
    },
    #[error("{reference}: a layer download task failed: {reason}")]
    Task { reference: String, reason: String },
}

/// Result type of registry operations.
pub type Result<T> = std::result::Result<T, Error>;

/// How many blobs move at once in a pull or push.
pub const PARALLEL_BLOBS: usize = 4;

/// A registry client configured from [`config::Config`] and the auth files.
/// Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct Registry {
    client: Arc<http::Client>,
    config: Arc<config::Config>,
    /// told the bytes of each blob as they arrive (see [`Registry::on_bytes`])
    on_bytes: Option<OnBytes>,
}

/// The sha256 digest of `bytes` (a manifest or index as sent or fetched).
pub fn digest_of(bytes: &[u8]) -> oci_spec::image::Digest {
    kiln_snapshotter::content::sha256_digest(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

/// A blob's progress: its digest, the bytes received so far and its size.
/// `builder` built trusting the system's CA certificates plus `roots`;
/// on a system without any (a minimal container image), `roots` alone,
/// so a build that never speaks TLS still runs and one that does fails
/// at that connection, naming the certificate it could not trust.
pub(crate) fn with_roots(
    builder: impl Fn() -> reqwest::ClientBuilder,
    roots: Vec<reqwest::Certificate>,
) -> reqwest::Result<reqwest::Client> {
    match builder().tls_certs_merge(roots.clone()).build() {
        Ok(c) => Ok(c),
        Err(e) => builder().tls_certs_only(roots).build().map_err(|_| e),
    }
}

pub type OnBytes = Arc<dyn Fn(&oci_spec::image::Digest, u64, u64) + Send + Sync>;

/// The largest manifest, index or image config kiln reads, as containerd
/// limits them: refused before more is read.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The host kiln sends API requests to: Docker Hub's API lives at
/// registry-1.docker.io, not at the docker.io of image names.
pub fn api_host(host: &str) -> &str {
    if host == reference::DEFAULT_DOMAIN {
        "registry-1.docker.io"
    } else {
        host
    }
}

/// What `r` names on `host` (the origin or a mirror), as requests address it.
pub fn remote_ref(r: &Reference, host: &str) -> Remote {
    Remote {
        registry: api_host(host).to_string(),
        repository: r.path.clone(),
        reference: match (&r.digest, &r.tag) {
            (Some(d), _) => d.clone(),
            (None, t) => t.clone().unwrap_or_else(|| "latest".into()),
        },
    }
}

pub(crate) fn install_crypto_provider() {
    // reqwest is built without a provider of its own (ring comes with
    // rustls's `ring` feature; aws-lc would be a second C build): make
    // ring the process default once. An error means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Registry {
    /// A client for `config`.
    pub fn new(config: config::Config) -> Result<Self> {
        install_crypto_provider();
        let mut roots = Vec::new();
        for p in &config.ca_files {
            let data = std::fs::read(p).map_err(|e| Error::Ca {
                path: p.display().to_string(),
                reason: crate::error_chain(&e),
            })?;
            roots.extend(
                reqwest::Certificate::from_pem_bundle(&data).map_err(|e| Error::Ca {
                    path: p.display().to_string(),
                    reason: crate::error_chain(&e),
                })?,
            );
        }
        let http = with_roots(
            || {
                reqwest::Client::builder()
                    .connect_timeout(std::time::Duration::from_secs(30))
                    .read_timeout(std::time::Duration::from_secs(300))
            },
            roots,
        )
        .map_err(|e| Error::Ca {
            path: "certs.d".into(),
            reason: crate::error_chain(&e),
        })?;
        let insecure = config
            .insecure
            .iter()
            .map(|h| api_host(h).to_string())
            .collect();
        Ok(Registry {
            client: Arc::new(http::Client {
                http,
                insecure,
                tokens: http::Tokens::default(),
            }),
            config: Arc::new(config),
            on_bytes: None,
        })
    }

    /// This client, telling `f` how many bytes of each blob it fetches
    /// have arrived (at least once per blob fetched, when it is whole).
    pub fn on_bytes(&self, f: OnBytes) -> Self {
        Registry {
            on_bytes: Some(f),
            ..self.clone()
        }
    }

    /// A client from the default registries config plus `insecure` hosts
    /// (`--insecure-registry`).
    pub fn from_env(insecure: &[String]) -> Result<Self> {
        Self::new(config::Config::load(insecure)?)
    }

    /// The configuration in use.
    pub fn config(&self) -> &config::Config {
        &self.config
    }

    /// Credentials for `host` from the auth files (anonymous if none).
    pub fn credentials(host: &str) -> Result<Creds> {
        Ok(match auth::lookup(host)? {
            Some(c) => Creds::Basic(c.username, c.password),
            None => Creds::Anonymous,
        })
    }

    /// Authenticate for `op` on `remote` (the token dance, or basic auth),
    /// with the stored credentials of `host`.
    pub async fn authenticate(
        &self,
        name: &str,
        host: &str,
        remote: &Remote,
        op: Op,
    ) -> Result<()> {
        let creds = Self::credentials(host)?;
        self.client
            .authenticate(Subject { name, host }, remote, &creds, op)
            .await
    }

    /// `kiln login`: check `creds` against `host` (a request that needs
    /// them must succeed), then store them.
    pub async fn login(&self, host: &str, creds: auth::Credentials) -> Result<std::path::PathBuf> {
        install_crypto_provider();
        // a fresh client: the shared one may hold another user's token
        let probe = Registry::new((*self.config).clone())?;
        let remote = Remote {
            registry: api_host(host).to_string(),
            repository: "kiln/login-check".into(),
            reference: "latest".into(),
        };
        let basic = Creds::Basic(creds.username.clone(), creds.password.clone());
        let who = Subject { name: host, host };
        // a request that needs the credentials: 401 means they are wrong;
        // the repository need not exist (404)
        let url = probe.client.url(&remote, "tags/list?n=1");
        let res = probe
            .client
            .send(who, &remote, &basic, Op::Pull, || {
                probe.client.http.get(&url)
            })
            .await?;
        if !res.status().is_success() && res.status().as_u16() != 404 {
            return Err(who.status_error(&url, res).await);
        }
        Ok(auth::store(host, &creds)?)
    }
}
