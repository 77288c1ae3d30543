//! Registries: pulling images into the local store and pushing them out,
//! over the OCI distribution API (`oci-client`, on rustls).
//!
//! - [`config`]: plain-HTTP registries, mirrors, certs.d authorities
//! - [`auth`]: credentials from auth.json / docker config, `kiln login`
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
mod pull;
mod push;

use std::sync::Arc;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;

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
    #[error("{reference}: {context}: {source}")]
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
    client: Arc<oci_client::Client>,
    config: Arc<config::Config>,
    /// kiln's own requests (manifests, read with a size limit): the same
    /// roots and timeouts as the client's
    http: reqwest::Client,
    /// bearer tokens the client obtained, by registry, repository and
    /// operation (`None`: the registry asked for none)
    tokens: Arc<std::sync::Mutex<std::collections::HashMap<String, Option<String>>>>,
}

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

/// `r` as oci-client's reference on `host` (the origin or a mirror).
pub fn remote_ref(r: &Reference, host: &str) -> oci_client::Reference {
    let h = api_host(host).to_string();
    match (&r.digest, &r.tag) {
        (Some(d), _) => oci_client::Reference::with_digest(h, r.path.clone(), d.clone()),
        (None, t) => oci_client::Reference::with_tag(
            h,
            r.path.clone(),
            t.clone().unwrap_or_else(|| "latest".into()),
        ),
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
        let mut extra = Vec::new();
        let mut roots = Vec::new();
        for p in &config.ca_files {
            let data = std::fs::read(p).map_err(|e| Error::Ca {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            roots.extend(
                reqwest::Certificate::from_pem_bundle(&data).map_err(|e| Error::Ca {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?,
            );
            extra.push(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data,
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .read_timeout(std::time::Duration::from_secs(300))
            .tls_certs_merge(roots)
            .build()
            .map_err(|e| Error::Ca {
                path: "certs.d".into(),
                reason: e.to_string(),
            })?;
        let insecure: Vec<String> = config
            .insecure
            .iter()
            .map(|h| api_host(h).to_string())
            .collect();
        let cc = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            extra_root_certificates: extra,
            max_concurrent_download: PARALLEL_BLOBS,
            max_concurrent_upload: PARALLEL_BLOBS,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(300)),
            // kiln picks platforms itself, with errors that name them
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let client = oci_client::Client::try_from(cc).map_err(|e| Error::Ca {
            path: "certs.d".into(),
            reason: e.to_string(),
        })?;
        Ok(Registry {
            client: Arc::new(client),
            config: Arc::new(config),
            http,
            tokens: Arc::default(),
        })
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

    /// The underlying client, for operations kiln does not wrap.
    pub fn client(&self) -> &oci_client::Client {
        &self.client
    }

    /// Credentials for `host` from the auth files (anonymous if none).
    pub fn credentials(host: &str) -> Result<RegistryAuth> {
        Ok(match auth::lookup(host)? {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        })
    }

    /// Authenticate for `op` on `remote` (the token dance, or basic auth),
    /// with the stored credentials of `host`.
    pub async fn authenticate(
        &self,
        name: &str,
        host: &str,
        remote: &oci_client::Reference,
        op: RegistryOperation,
    ) -> Result<()> {
        let creds = Self::credentials(host)?;
        self.authenticate_with(name, host, remote, &creds, op).await
    }

    async fn authenticate_with(
        &self,
        name: &str,
        host: &str,
        remote: &oci_client::Reference,
        creds: &RegistryAuth,
        op: RegistryOperation,
    ) -> Result<()> {
        let token = self
            .client
            .auth(remote, creds, op)
            .await
            .map_err(|e| classify(name, host, e))?;
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(token_key(remote, op), token);
        Ok(())
    }

    /// The token `authenticate` got for `remote` and `op`, authenticating
    /// first when there is none yet (or `fresh`: the last one was refused).
    async fn token(
        &self,
        name: &str,
        host: &str,
        remote: &oci_client::Reference,
        op: RegistryOperation,
        fresh: bool,
    ) -> Result<Option<String>> {
        let key = token_key(remote, op);
        let known = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        match known {
            Some(token) if !fresh => Ok(token),
            _ => {
                self.authenticate(name, host, remote, op).await?;
                Ok(self
                    .tokens
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&key)
                    .cloned()
                    .flatten())
            }
        }
    }

    /// `http` or `https` for requests to `registry`, as the client decides.
    fn scheme(&self, registry: &str) -> &'static str {
        if self.config.insecure.iter().any(|h| api_host(h) == registry) {
            "http"
        } else {
            "https"
        }
    }

    /// `kiln login`: check `creds` against `host` (a request that needs
    /// them must succeed), then store them.
    pub async fn login(&self, host: &str, creds: auth::Credentials) -> Result<std::path::PathBuf> {
        install_crypto_provider();
        // a fresh client: the shared one may hold another user's token
        let probe = Registry::new((*self.config).clone())?;
        let remote = oci_client::Reference::with_tag(
            api_host(host).to_string(),
            "kiln/login-check".into(),
            "latest".into(),
        );
        let ra = RegistryAuth::Basic(creds.username.clone(), creds.password.clone());
        probe
            .authenticate_with(host, host, &remote, &ra, RegistryOperation::Pull)
            .await?;
        // GET /v2/ with the credentials: 401 means they are wrong
        match probe.client.list_tags(&remote, &ra, Some(1), None).await {
            Ok(_) => {}
            Err(e) => match classify(host, host, e) {
                // the repository need not exist; the credentials were
                // accepted if the registry got as far as looking for it
                Error::NotFound { .. } => {}
                other => return Err(other),
            },
        }
        Ok(auth::store(host, &creds)?)
    }
}

fn token_key(remote: &oci_client::Reference, op: RegistryOperation) -> String {
    let op = match op {
        RegistryOperation::Pull => "pull",
        RegistryOperation::Push => "push",
    };
    format!("{}/{}:{op}", remote.resolve_registry(), remote.repository())
}

/// Turn a client error into kiln's error for `reference` on `host`.
pub(crate) fn classify(reference: &str, host: &str, e: OciDistributionError) -> Error {
    let reference = reference.to_string();
    let host = host.to_string();
    match e {
        OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
            Error::Unreachable {
                reference,
                host,
                reason: source_chain(&re),
            }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => Error::Unauthorized { reference, host },
        OciDistributionError::ImageManifestNotFoundError(_) => Error::NotFound { reference, host },
        // the status code when the client kept it: the message text holds
        // URLs (and digests) that no substring test can see past
        OciDistributionError::ServerError { code: 401, .. } => {
            Error::Unauthorized { reference, host }
        }
        OciDistributionError::ServerError { code: 404, .. } => Error::NotFound { reference, host },
        // the registry's own error codes, when it sent an error envelope
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::NameUnknown
                        | OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) =>
        {
            Error::NotFound { reference, host }
        }
        OciDistributionError::RegistryError { ref envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized)) =>
        {
            Error::Unauthorized { reference, host }
        }
        other => {
            let reason = source_chain(&other);
            let lower = reason.to_ascii_lowercase();
            if lower.contains("unauthorized") || lower.contains(" 401") {
                Error::Unauthorized { reference, host }
            } else if lower.contains("manifest_unknown")
                || lower.contains("manifest unknown")
                || lower.contains("name_unknown")
                || lower.contains("name unknown")
                || lower.contains("code: 404")
                || lower.contains(" 404 ")
            {
                Error::NotFound { reference, host }
            } else if lower.contains("error sending request") || lower.contains("connect") {
                Error::Unreachable {
                    reference,
                    host,
                    reason,
                }
            } else {
                Error::Registry {
                    reference,
                    host,
                    reason,
                }
            }
        }
    }
}

pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
