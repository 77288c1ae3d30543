//! `ADD <url>`: kiln's own downloads for a build, made under the network
//! policy of the stage's RUN steps, streamed to an unnamed file in the
//! state directory with a size limit.
//!
//! Under `sandbox` every connection (redirects included) is made from a
//! thread inside a fresh network namespace served by the same user-mode
//! stack and the same prohibit rules a step gets
//! ([`kiln_runtime::net::in_sandbox_network`]), so what a step cannot
//! reach (the host's loopback, link-local metadata services, the host's
//! own addresses) a download cannot either. Names are resolved by a thread
//! left in kiln's own namespace, through the host's resolver (as the step's
//! DNS forwarder does): a resolver inside the namespace would ask the
//! host's resolver directly, which pasta's answer rewriting defeats. Under
//! `host` the download runs in kiln's namespace; under `none` there is
//! none.
//!
//! The HTTP stack is the registry client's (reqwest over rustls), with the
//! same trust roots (the system's plus the registries' `certs.d`) and the
//! proxy variables it reads (`HTTPS_PROXY`, `NO_PROXY`...); a proxy on the
//! host's loopback is out of a `sandbox` download's reach, as it is of a
//! step's.
//!
//! This module never writes into a layer: it hands the copy an open file.

use std::io::{Seek, Write};
use std::net::ToSocketAddrs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_runtime::Network;
use sha2::{Digest, Sha256};

use super::filecopy::{Entry, Error, Result};
use super::fsutil::Meta;

/// The default of `--add-max-size`: the largest file ADD downloads.
pub const DEFAULT_MAX_SIZE: u64 = 4 << 30;
/// Connecting may take this long.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A download that stalls this long between reads fails.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 10;

/// How a build downloads: the network of the stage's RUN steps, the trust
/// roots, the size limit and where the bytes go.
#[derive(Debug, Clone)]
pub struct Fetcher {
    pub network: Network,
    /// PEM files added to the system's trust roots (the registries'
    /// `certs.d`)
    pub ca_files: Vec<PathBuf>,
    /// `--add-max-size`
    pub limit: u64,
    /// a directory on the state's filesystem for the unnamed files
    pub dir: PathBuf,
}

/// A file downloaded for ADD.
#[derive(Debug)]
pub struct Download {
    /// the bytes, in an unnamed file (gone when the last handle closes)
    pub file: std::fs::File,
    pub size: u64,
    /// `sha256:<hex>` of the bytes
    pub digest: String,
    /// Last-Modified, seconds since the epoch (0 without one)
    pub mtime: i64,
}

impl Fetcher {
    /// Download `url`, following redirects, at most [`Fetcher::limit`]
    /// bytes.
    pub fn fetch(&self, url: &str) -> Result<Download> {
        let fetch_err = |reason: String| Error::Fetch {
            url: url.to_string(),
            reason,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .open(&self.dir)
            .map_err(|e| {
                fetch_err(format!(
                    "cannot make a file for it in {}: {e}",
                    self.dir.display()
                ))
            })?;
        let client = self.client(url)?;
        // The download runs on a thread of its own, with a runtime of its
        // own: under `sandbox` that thread is the one in the namespace, and
        // the build's own runtime is never blocked on.
        let run = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| fetch_err(format!("cannot start the download: {e}")))?
                .block_on(self.stream(&client, url, file))
        };
        match self.network {
            Network::None => Err(fetch_err(
                "the build runs with --network=none: no download is allowed".into(),
            )),
            Network::Host => std::thread::scope(|s| {
                s.spawn(run)
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
            Network::Sandbox {
                allow_host_loopback,
            } => {
                let stack = kiln_runtime::net::Stack::detect()
                    .map_err(|e| fetch_err(crate::error_chain(&e)))?;
                kiln_runtime::net::in_sandbox_network(&stack, allow_host_loopback, run)
                    .map_err(|e| fetch_err(crate::error_chain(&e)))?
            }
        }
    }

    /// The HTTP client: the system's roots plus `ca_files`, the proxy
    /// variables, names resolved outside the namespace.
    fn client(&self, url: &str) -> Result<reqwest::Client> {
        crate::registry::install_crypto_provider();
        let mut certs = Vec::new();
        for p in &self.ca_files {
            let pem = std::fs::read(p).map_err(|e| Error::Fetch {
                url: url.to_string(),
                reason: format!("cannot read the CA file {}: {e}", p.display()),
            })?;
            certs.extend(reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::Fetch {
                    url: url.to_string(),
                    reason: format!("CA file {}: {e}", p.display()),
                }
            })?);
        }
        let resolver = Arc::new(HostResolver::start());
        crate::registry::with_roots(
            || {
                reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
                    .dns_resolver(Arc::clone(&resolver))
            },
            certs,
        )
        .map_err(|e| Error::Fetch {
            url: url.to_string(),
            reason: format!("cannot make the HTTP client: {e}"),
        })
    }

    /// GET `url` into `file`, hashing as it goes, refusing more than the
    /// limit before it is written.
    async fn stream(
        &self,
        client: &reqwest::Client,
        url: &str,
        mut file: std::fs::File,
    ) -> Result<Download> {
        let fetch_err = |reason: String| Error::Fetch {
            url: url.to_string(),
            reason,
        };
        let mut resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| fetch_err(crate::error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(Error::HttpStatus {
                url: url.to_string(),
                status: resp.status().as_u16(),
            });
        }
        if resp.content_length().is_some_and(|n| n > self.limit) {
            return Err(self.too_large(url));
        }
        let mtime = resp
            .headers()
            .get(reqwest::header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .unwrap_or(0);
        let mut hash = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| fetch_err(format!("reading the body: {}", crate::error_chain(&e))))?
        {
            size += chunk.len() as u64;
            if size > self.limit {
                return Err(self.too_large(url));
            }
            hash.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| fetch_err(format!("writing it to {}: {e}", self.dir.display())))?;
        }
        file.rewind()
            .map_err(|e| fetch_err(format!("rewinding it: {e}")))?;
        Ok(Download {
            file,
            size,
            digest: format!("sha256:{:x}", hash.finalize()),
            mtime,
        })
    }

    fn too_large(&self, url: &str) -> Error {
        Error::TooLarge {
            url: url.to_string(),
            limit: self.limit,
        }
    }
}

/// A name lookup for the download, answered by a thread started in kiln's
/// own network namespace (before the download's thread leaves it): the
/// host's resolver configuration, reached as the host reaches it.
struct HostResolver {
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Lookup>>,
}

type Lookup = (
    String,
    tokio::sync::oneshot::Sender<std::io::Result<Vec<std::net::SocketAddr>>>,
);

impl HostResolver {
    fn start() -> HostResolver {
        let (tx, rx) = std::sync::mpsc::channel::<Lookup>();
        // ends when the client, and with it the sender, is dropped
        std::thread::spawn(move || {
            for (name, reply) in rx {
                let _ = reply.send((name.as_str(), 0).to_socket_addrs().map(Iterator::collect));
            }
        });
        HostResolver {
            jobs: std::sync::Mutex::new(tx),
        }
    }
}

impl reqwest::dns::Resolve for HostResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self
            .jobs
            .lock()
            .map(|jobs| jobs.send((name.as_str().to_string(), tx)).is_ok())
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err("the resolver thread is gone".into());
            }
            let addrs = rx.await.map_err(|_| "the resolver thread is gone")??;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Download {
    /// Check the digest against `--checksum` (`sha256:<hex>`).
    pub fn verify(&self, url: &str, expected: &str) -> Result<()> {
        if self.digest.eq_ignore_ascii_case(expected) {
            return Ok(());
        }
        Err(Error::ChecksumMismatch {
            url: url.to_string(),
            expected: expected.to_string(),
            actual: self.digest.clone(),
        })
    }

    /// The entry writing this file at `dest` (relative to the root): a
    /// regular file, 0600, with the Last-Modified time, as BuildKit does.
    pub fn into_entry(self, dest: PathBuf) -> Entry {
        Entry {
            src: PathBuf::new(),
            dest,
            meta: Meta {
                mode: libc::S_IFREG | 0o600,
                uid: 0,
                gid: 0,
                size: self.size,
                mtime: self.mtime,
                ..Meta::default()
            },
            link: None,
            inline: None,
            downloaded: Some(Arc::new(self.file)),
            archive: false,
        }
    }
}

/// Where a build's downloads go: `tmp` in the state directory (created
/// 0700), so they share its filesystem and its permissions.
pub fn download_dir(state_root: &Path) -> std::io::Result<PathBuf> {
    let dir = state_root.join("tmp");
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
        Err(e) => Err(e),
    }
}
