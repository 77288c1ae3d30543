//! The SSH agent a `RUN --mount=type=ssh` step talks to.
//!
//! Owns: parsing one `--ssh` flag as BuildKit does ([`parse_flag`]), loading
//! what it names at build start ([`Agent::load`]: private key files, or the
//! user's own agent socket), and serving the agent protocol
//! (draft-miller-ssh-agent) on a listening socket the sandbox hands over
//! ([`Agent::serve`]).
//!
//! The agent answers only "list identities" and "sign". Everything else (add,
//! remove, lock, extensions) gets `SSH_AGENT_FAILURE`, in both modes: in
//! forward mode such a request never reaches the user's agent. A step can use
//! the keys but must never be able to read, add, remove or lock them; that is
//! the point of this module and nothing here may widen it.
//!
//! It never picks which step gets which agent and never creates the socket:
//! the engine and the sandbox do.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15;
use rsa::signature::{SignatureEncoding, Signer};
use sha2::{Sha256, Sha512};
use ssh_encoding::{Decode, Encode};
use ssh_key::private::{KeypairData, RsaKeypair};
use ssh_key::{Algorithm, EcdsaCurve, HashAlg, PrivateKey, PublicKey, Signature};
use zeroize::Zeroizing;

/// The variable `--ssh default` (and `--ssh ID` alone) reads, as in BuildKit.
pub const AUTH_SOCK_VAR: &str = "SSH_AUTH_SOCK";

/// The largest request or upstream answer accepted, length prefix excluded.
/// OpenSSH's own agent allows 256 KiB; a client sending more is broken or
/// hostile, and its connection is closed.
const MAX_MESSAGE: usize = 256 * 1024;

/// Connections served at once per agent. A step that opens more gets the
/// extra ones closed at once rather than queued, so it cannot tie up threads.
const MAX_CONNECTIONS: usize = 16;

/// Message numbers from draft-miller-ssh-agent, section 6.1.
mod msg {
    pub const FAILURE: u8 = 5;
    pub const REQUEST_IDENTITIES: u8 = 11;
    pub const IDENTITIES_ANSWER: u8 = 12;
    pub const SIGN_REQUEST: u8 = 13;
    pub const SIGN_RESPONSE: u8 = 14;
    /// Sign-request flags (section 6.7.1).
    pub const RSA_SHA2_256: u32 = 2;
    pub const RSA_SHA2_512: u32 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("--ssh {value}: {var} is not set; start an ssh-agent, or name a socket or key files with --ssh ID=PATH", var = AUTH_SOCK_VAR)]
    NoAuthSock { value: String },
    #[error("--ssh {value}: the id before '=' is empty")]
    EmptyId { value: String },
    #[error("--ssh {value}: empty path in the list after '='")]
    EmptyPath { value: String },
    #[error("--ssh {value}: {path}")]
    Path {
        value: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("--ssh {value}: more than one agent socket; an id forwards a single socket")]
    TwoSockets { value: String },
    #[error("--ssh {value}: {socket} is a socket and the other paths are key files; give them separate ids")]
    SocketAndKeys { value: String, socket: PathBuf },
    #[error("ssh agent socket {path}")]
    Upstream { path: PathBuf, source: io::Error },
    #[error("ssh agent socket {path}: not a unix socket")]
    NotASocket { path: PathBuf },
    #[error("ssh key {path}")]
    ReadKey { path: PathBuf, source: io::Error },
    #[error("ssh key {path}: passphrase-protected keys are not supported; load it into an ssh-agent (ssh-add {path}) and use --ssh default")]
    Encrypted { path: PathBuf },
    #[error("ssh key {path}: not an OpenSSH or PEM RSA private key: {reason}")]
    ParseKey { path: PathBuf, reason: String },
    #[error("ssh key {path}: {algorithm} keys are not supported; use ed25519, ecdsa (nistp256, nistp384) or rsa")]
    Unsupported { path: PathBuf, algorithm: String },
    #[error(
        "ssh key {path}: the private key does not match its public key or cannot sign: {reason}"
    )]
    BrokenKey { path: PathBuf, reason: String },
    #[error(
        "ssh agent {id}: the socket handed over is not a listening unix stream socket: {reason}"
    )]
    BadListener { id: String, reason: String },
    #[error("ssh agent {id}: {what}")]
    Serve {
        id: String,
        what: &'static str,
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, SshError>;

/// One `--ssh` flag of `kiln build`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    pub id: String,
    pub source: SshSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshSource {
    /// forward an agent socket (`--ssh default` = $SSH_AUTH_SOCK, `--ssh ID=/path/to/socket`)
    Forward(PathBuf),
    /// serve these private key files from an agent inside kiln (`--ssh ID=key[,key2]`)
    Keys(Vec<PathBuf>),
}

/// Parse one `--ssh` value as BuildKit does: `default` or `ID` alone forward
/// `$SSH_AUTH_SOCK`; `ID=PATH[,PATH...]` forwards the path if it is a unix
/// socket, and otherwise serves the paths as private key files.
///
/// `env` looks up environment variables, so callers (and tests) choose the
/// environment instead of this reading the process's own.
pub fn parse_flag(value: &str, env: impl Fn(&str) -> Option<OsString>) -> Result<SshConfig> {
    let (id, paths) = match value.split_once('=') {
        Some((id, paths)) => (id, Some(paths)),
        None => (value, None),
    };
    if id.is_empty() {
        return Err(SshError::EmptyId {
            value: value.to_owned(),
        });
    }
    let Some(paths) = paths else {
        let sock = env(AUTH_SOCK_VAR)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| SshError::NoAuthSock {
                value: value.to_owned(),
            })?;
        return Ok(SshConfig {
            id: id.to_owned(),
            source: SshSource::Forward(PathBuf::from(sock)),
        });
    };

    let mut sockets = Vec::new();
    let mut keys = Vec::new();
    for path in paths.split(',') {
        if path.is_empty() {
            return Err(SshError::EmptyPath {
                value: value.to_owned(),
            });
        }
        let path = PathBuf::from(path);
        // Follows symlinks: `~/.ssh/agent.sock -> /run/user/...` is a socket.
        let meta = fs::metadata(&path).map_err(|source| SshError::Path {
            value: value.to_owned(),
            path: path.clone(),
            source,
        })?;
        if meta.file_type().is_socket() {
            sockets.push(path);
        } else {
            keys.push(path);
        }
    }
    let source = match (sockets.len(), keys.is_empty()) {
        (0, _) => SshSource::Keys(keys),
        (1, true) => SshSource::Forward(sockets.remove(0)),
        (1, false) => {
            return Err(SshError::SocketAndKeys {
                value: value.to_owned(),
                socket: sockets.remove(0),
            })
        }
        _ => {
            return Err(SshError::TwoSockets {
                value: value.to_owned(),
            })
        }
    };
    Ok(SshConfig {
        id: id.to_owned(),
        source,
    })
}

/// Signatures one step may ask for. kiln's RSA signer (the `rsa` crate)
/// is not constant-time (RUSTSEC-2023-0071): a step that could ask for
/// unlimited signatures and time them could learn the key. A build's
/// `git clone` or `ssh` needs a handful; past this, sign requests get
/// `SSH_AGENT_FAILURE` and the build's output says so.
pub const MAX_SIGNATURES: usize = 64;

/// A loaded agent: keys parsed and checked (or the upstream socket checked to
/// accept connections) at build start, so a bad key fails the build before
/// any step, naming the file.
pub struct Agent {
    id: String,
    backend: Backend,
}

enum Backend {
    Keys(Vec<Identity>),
    Forward(PathBuf),
}

/// One key the agent holds. The private halves zeroize themselves on drop
/// (ssh-key's keypairs and rsa's `RsaPrivateKey` both do).
struct Identity {
    /// The public key in wire form: what clients list and name in a sign
    /// request.
    blob: Vec<u8>,
    comment: String,
    key: KeySigner,
}

enum KeySigner {
    /// ed25519 and ecdsa: one signature algorithm per key, flags ignored.
    Plain(Box<PrivateKey>),
    /// rsa: the client picks the hash through the request flags. ssh-key's
    /// own RSA signer only does SHA-512 (and in 0.6.7 fails outright, see
    /// [`rsa_private_key`]), so rsa's signers are kept for both hashes.
    Rsa(Box<RsaSigners>),
}

struct RsaSigners {
    sha256: pkcs1v15::SigningKey<Sha256>,
    sha512: pkcs1v15::SigningKey<Sha512>,
}

impl Agent {
    pub fn load(cfg: &SshConfig) -> Result<Agent> {
        let backend = match &cfg.source {
            SshSource::Forward(path) => {
                check_upstream(path)?;
                Backend::Forward(path.clone())
            }
            SshSource::Keys(paths) => {
                Backend::Keys(paths.iter().map(|p| load_key(p)).collect::<Result<_>>()?)
            }
        };
        Ok(Agent {
            id: cfg.id.clone(),
            backend,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serve the agent protocol on an already-listening AF_UNIX stream
    /// socket. The returned [`Serving`] stops everything when dropped.
    pub fn serve(self: &Arc<Self>, listener: OwnedFd) -> Result<Serving> {
        self.check_listener(&listener)?;
        let listener = UnixListener::from(listener);
        // Non-blocking so the accept loop only ever waits in poll(), where
        // the stop pipe can wake it.
        listener
            .set_nonblocking(true)
            .map_err(|source| self.serve_error("making the socket non-blocking", source))?;
        let (stop_rx, stop_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| self.serve_error("creating the stop pipe", e.into()))?;
        let agent = Arc::clone(self);
        let budget = Arc::new(Budget::default());
        let for_loop = Arc::clone(&budget);
        let accept = thread::Builder::new()
            .name(format!("ssh-agent-{}", self.id))
            .spawn(move || agent.accept_loop(listener, Arc::new(stop_rx), for_loop))
            .map_err(|source| self.serve_error("starting the accept thread", source))?;
        Ok(Serving {
            stop_tx: Some(stop_tx),
            accept: Some(accept),
            budget,
        })
    }

    fn serve_error(&self, what: &'static str, source: io::Error) -> SshError {
        SshError::Serve {
            id: self.id.clone(),
            what,
            source,
        }
    }

    fn check_listener(&self, fd: &OwnedFd) -> Result<()> {
        let bad = |reason: String| SshError::BadListener {
            id: self.id.clone(),
            reason,
        };
        match getsockopt(fd, sockopt::SockType) {
            Ok(SockType::Stream) => {}
            Ok(other) => return Err(bad(format!("socket type {other:?}"))),
            Err(e) => return Err(bad(crate::error_chain(&e))),
        }
        match getsockopt(fd, sockopt::AcceptConn) {
            Ok(true) => Ok(()),
            Ok(false) => Err(bad("listen() was not called on it".into())),
            Err(e) => Err(bad(crate::error_chain(&e))),
        }
    }

    fn accept_loop(
        self: Arc<Self>,
        listener: UnixListener,
        stop: Arc<OwnedFd>,
        budget: Arc<Budget>,
    ) {
        let active = Arc::new(AtomicUsize::new(0));
        let mut connections: Vec<JoinHandle<()>> = Vec::new();
        // Ends on stop, or if poll itself fails, which leaves no way to hear
        // a stop later.
        while let Ok(true) = wait_for(listener.as_fd(), PollFlags::POLLIN, stop.as_fd()) {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(_) => {
                    // EMFILE and friends: the socket stays readable, so back
                    // off instead of spinning until a descriptor frees up.
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            connections.retain(|c| !c.is_finished());
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                drop(stream);
                continue;
            }
            let slot = Slot::take(&active);
            let agent = Arc::clone(&self);
            let stop = Arc::clone(&stop);
            let budget = Arc::clone(&budget);
            let spawned = thread::Builder::new()
                .name(format!("ssh-agent-{}-conn", self.id))
                .spawn(move || {
                    let _slot = slot;
                    // Any error ends this one connection and nothing else:
                    // the client sees its socket close, as with a broken
                    // agent.
                    let _ = agent.serve_connection(stream, stop.as_fd(), &budget);
                });
            if let Ok(handle) = spawned {
                connections.push(handle);
            }
        }
        // Dropping the listener here, before the joins, makes new connects
        // fail at once while the open connections wind down.
        drop(listener);
        for c in connections {
            let _ = c.join();
        }
    }

    fn serve_connection(
        &self,
        client: UnixStream,
        stop: BorrowedFd<'_>,
        budget: &Budget,
    ) -> io::Result<()> {
        client.set_nonblocking(true)?;
        let mut client = Peer {
            stream: client,
            stop,
        };
        let mut upstream: Option<Peer<'_>> = None;
        while let Some(request) = client.read_message()? {
            if request.first() == Some(&msg::SIGN_REQUEST) && !budget.take() {
                client.write_message(&[msg::FAILURE])?;
                continue;
            }
            let answer = match &self.backend {
                Backend::Keys(identities) => answer(identities, &request),
                Backend::Forward(path) if is_allowed(&request) => {
                    let peer = match &mut upstream {
                        Some(peer) => peer,
                        None => {
                            // One upstream connection per client
                            // connection, opened on first use: the protocol
                            // pairs answers with requests by order alone, so
                            // a shared one could hand one client another's
                            // answer.
                            let stream = UnixStream::connect(path)?;
                            stream.set_nonblocking(true)?;
                            upstream.insert(Peer { stream, stop })
                        }
                    };
                    peer.write_message(&request)?;
                    match peer.read_message()? {
                        Some(answer) => answer,
                        None => return Ok(()),
                    }
                }
                Backend::Forward(_) => vec![msg::FAILURE],
            };
            client.write_message(&answer)?;
        }
        Ok(())
    }
}

/// The only requests either mode lets through: list and sign.
fn is_allowed(request: &[u8]) -> bool {
    matches!(
        request.first(),
        Some(&msg::REQUEST_IDENTITIES | &msg::SIGN_REQUEST)
    )
}

/// The answer of a keys-mode agent to one request (type byte and body).
fn answer(identities: &[Identity], request: &[u8]) -> Vec<u8> {
    let answer = match request.split_first() {
        Some((&msg::REQUEST_IDENTITIES, [])) => identities_answer(identities),
        Some((&msg::SIGN_REQUEST, body)) => sign_response(identities, body),
        _ => None,
    };
    answer.unwrap_or_else(|| vec![msg::FAILURE])
}

fn identities_answer(identities: &[Identity]) -> Option<Vec<u8>> {
    let mut out = vec![msg::IDENTITIES_ANSWER];
    u32::try_from(identities.len())
        .ok()?
        .encode(&mut out)
        .ok()?;
    for identity in identities {
        identity.blob.encode(&mut out).ok()?;
        identity.comment.encode(&mut out).ok()?;
    }
    Some(out)
}

/// `None` for anything the agent refuses: a malformed request, a key it does
/// not hold, or an RSA request without a SHA-2 flag.
fn sign_response(identities: &[Identity], mut body: &[u8]) -> Option<Vec<u8>> {
    let blob = Vec::<u8>::decode(&mut body).ok()?;
    let data = Vec::<u8>::decode(&mut body).ok()?;
    let flags = u32::decode(&mut body).ok()?;
    if !body.is_empty() {
        return None;
    }
    let identity = identities.iter().find(|i| i.blob == blob)?;
    let signature = identity.key.sign(&data, flags)?;
    let mut out = vec![msg::SIGN_RESPONSE];
    let signature = Vec::<u8>::try_from(signature).ok()?;
    signature.encode(&mut out).ok()?;
    Some(out)
}

impl KeySigner {
    fn sign(&self, data: &[u8], flags: u32) -> Option<Signature> {
        match self {
            KeySigner::Plain(key) => key.try_sign(data).ok(),
            // OpenSSH's agent checks SHA-256 first when both flags are set;
            // do the same so kiln answers as the user's agent would.
            KeySigner::Rsa(rsa) if flags & msg::RSA_SHA2_256 != 0 => {
                rsa_signature(HashAlg::Sha256, rsa.sha256.try_sign(data).ok()?)
            }
            KeySigner::Rsa(rsa) if flags & msg::RSA_SHA2_512 != 0 => {
                rsa_signature(HashAlg::Sha512, rsa.sha512.try_sign(data).ok()?)
            }
            // No flag means an `ssh-rsa` (SHA-1) signature, which OpenSSH
            // itself has refused by default since 8.8.
            KeySigner::Rsa(_) => None,
        }
    }
}

fn rsa_signature(hash: HashAlg, signature: pkcs1v15::Signature) -> Option<Signature> {
    Signature::new(Algorithm::Rsa { hash: Some(hash) }, signature.to_vec()).ok()
}

/// Check at build start that the user's agent is there and accepts
/// connections: a stale `SSH_AUTH_SOCK` should fail the build, not the step
/// that first runs `git clone`.
fn check_upstream(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|source| SshError::Upstream {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_socket() {
        return Err(SshError::NotASocket {
            path: path.to_owned(),
        });
    }
    UnixStream::connect(path).map_err(|source| SshError::Upstream {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

fn load_key(path: &Path) -> Result<Identity> {
    let parse_error = |reason: String| SshError::ParseKey {
        path: path.to_owned(),
        reason,
    };
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|source| SshError::ReadKey {
            path: path.to_owned(),
            source,
        })?,
    );
    let key = if text.contains("-----BEGIN RSA PRIVATE KEY-----") {
        // Old `ssh-keygen -m PEM` RSA keys. An encrypted one carries a
        // `Proc-Type: 4,ENCRYPTED` header that the PKCS#1 parser rejects
        // with a message that would not tell the user what to do.
        if text.contains("ENCRYPTED") {
            return Err(SshError::Encrypted {
                path: path.to_owned(),
            });
        }
        let rsa = rsa::RsaPrivateKey::from_pkcs1_pem(&text)
            .map_err(|e| parse_error(crate::error_chain(&e)))?;
        let keypair =
            RsaKeypair::try_from(&rsa).map_err(|e| parse_error(crate::error_chain(&e)))?;
        PrivateKey::new(KeypairData::Rsa(keypair), "")
            .map_err(|e| parse_error(crate::error_chain(&e)))?
    } else {
        PrivateKey::from_openssh(text.as_bytes())
            .map_err(|e| parse_error(crate::error_chain(&e)))?
    };
    if key.is_encrypted() {
        return Err(SshError::Encrypted {
            path: path.to_owned(),
        });
    }
    let broken = |reason: String| SshError::BrokenKey {
        path: path.to_owned(),
        reason,
    };
    let public = key.public_key().clone();
    // ssh-add shows the file when a key has no comment; do the same so
    // `ssh-add -L` in a step says which key is which.
    let comment = match key.comment() {
        "" => path.display().to_string(),
        c => c.to_owned(),
    };
    let signer = match key.algorithm() {
        Algorithm::Ed25519
        | Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256 | EcdsaCurve::NistP384,
        } => KeySigner::Plain(Box::new(key)),
        Algorithm::Rsa { .. } => {
            let KeypairData::Rsa(keypair) = key.key_data() else {
                return Err(broken("rsa key without rsa key data".into()));
            };
            let rsa = rsa_private_key(keypair).map_err(broken)?;
            KeySigner::Rsa(Box::new(RsaSigners {
                sha256: pkcs1v15::SigningKey::new(rsa.clone()),
                sha512: pkcs1v15::SigningKey::new(rsa),
            }))
        }
        other => {
            return Err(SshError::Unsupported {
                path: path.to_owned(),
                algorithm: other.to_string(),
            })
        }
    };
    self_check(&signer, &public).map_err(broken)?;
    let blob = public
        .to_bytes()
        .map_err(|e| parse_error(crate::error_chain(&e)))?;
    Ok(Identity {
        blob,
        comment,
        key: signer,
    })
}

/// Build rsa's private key from the OpenSSH fields, validated (n = p*q, d
/// inverts e). Done here rather than through ssh-key's conversion, which in
/// 0.6.7 passes `p` twice as the primes, so rsa's validation rejects every
/// key and ssh-key's RSA `try_sign` always fails.
fn rsa_private_key(keypair: &RsaKeypair) -> std::result::Result<rsa::RsaPrivateKey, String> {
    let int = |m: &ssh_key::Mpint| rsa::BigUint::try_from(m).map_err(|e| crate::error_chain(&e));
    rsa::RsaPrivateKey::from_components(
        int(&keypair.public.n)?,
        int(&keypair.public.e)?,
        int(&keypair.private.d)?,
        vec![int(&keypair.private.p)?, int(&keypair.private.q)?],
    )
    .map_err(|e| crate::error_chain(&e))
}

/// Sign and verify a fixed message, so a key file whose private half does not
/// match its public half fails `load` rather than every signature later.
fn self_check(signer: &KeySigner, public: &PublicKey) -> std::result::Result<(), String> {
    use rsa::signature::Verifier;
    const PROBE: &[u8] = b"kiln ssh agent key check";
    let signature = signer
        .sign(PROBE, msg::RSA_SHA2_512)
        .ok_or_else(|| "signing failed".to_owned())?;
    public
        .key_data()
        .verify(PROBE, &signature)
        .map_err(|e| crate::error_chain(&e))
}

/// A running agent. Dropping it (or [`Serving::stop`]) stops accepting,
/// closes every connection and joins every thread.
pub struct Serving {
    /// Closing this write end is the stop signal: every thread polls the read
    /// end, which then reports hang-up.
    stop_tx: Option<OwnedFd>,
    accept: Option<JoinHandle<()>>,
    budget: Arc<Budget>,
}

impl Serving {
    pub fn stop(self) {
        drop(self);
    }

    /// Sign requests refused so far for being past [`MAX_SIGNATURES`].
    pub fn refused(&self) -> usize {
        self.budget.refused.load(Ordering::SeqCst)
    }
}

/// The signatures one served agent (one step) has given and refused.
#[derive(Default)]
struct Budget {
    signed: AtomicUsize,
    refused: AtomicUsize,
}

impl Budget {
    /// Count one sign request; false once the step is past the limit.
    fn take(&self) -> bool {
        let before = self.signed.fetch_add(1, Ordering::SeqCst);
        if before < MAX_SIGNATURES {
            true
        } else {
            self.refused.fetch_add(1, Ordering::SeqCst);
            false
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        drop(self.stop_tx.take());
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// One counted connection; gives its place back when the thread ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Slot {
        active.fetch_add(1, Ordering::SeqCst);
        Slot(Arc::clone(active))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A non-blocking stream read and written in whole agent messages, waiting
/// only in poll() beside the stop pipe so a stop never waits on a client.
struct Peer<'a> {
    stream: UnixStream,
    stop: BorrowedFd<'a>,
}

impl Peer<'_> {
    /// The next message (type byte and body), or `None` when the peer closed
    /// between messages or the agent is stopping.
    fn read_message(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        if !self.read_exact(&mut len, true)? {
            return Ok(None);
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("agent message of {len} bytes"),
            ));
        }
        let mut message = vec![0u8; len];
        if !self.read_exact(&mut message, false)? {
            return Ok(None);
        }
        Ok(Some(message))
    }

    /// Fill `buf`. `Ok(false)` on stop, or on end of stream before the first
    /// byte when `eof_ok`; end of stream anywhere else is an error.
    fn read_exact(&mut self, buf: &mut [u8], eof_ok: bool) -> io::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 && eof_ok => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_for(self.stream.as_fd(), PollFlags::POLLIN, self.stop)? {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn write_message(&mut self, message: &[u8]) -> io::Result<()> {
        let len = u32::try_from(message.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "agent message too long"))?;
        let mut framed = Vec::with_capacity(4 + message.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(message);
        let mut written = 0;
        while written < framed.len() {
            match self.stream.write(&framed[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_for(self.stream.as_fd(), PollFlags::POLLOUT, self.stop)? {
                        return Err(io::ErrorKind::Interrupted.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Wait until `fd` is ready for `events` (`true`) or the stop pipe hangs up
/// (`false`). Errors and hang-ups on `fd` count as ready: the read or write
/// that follows reports them.
fn wait_for(fd: BorrowedFd<'_>, events: PollFlags, stop: BorrowedFd<'_>) -> io::Result<bool> {
    loop {
        let mut fds = [
            PollFd::new(fd, events),
            PollFd::new(stop, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(false);
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::process::{Child, Command, Output, Stdio};
    use std::time::Instant;

    /// `ssh-keygen` a key without passphrase (unless `extra` sets one) as
    /// `dir/name`, commented `name@kiln`.
    fn keygen(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
        let path = dir.join(name);
        let mut args = vec!["-q", "-C"];
        let comment = format!("{name}@kiln");
        args.push(&comment);
        let file = path.to_str().unwrap().to_owned();
        args.extend(["-f", &file]);
        if !extra.contains(&"-N") {
            args.extend(["-N", ""]);
        }
        args.extend(extra);
        run_ok(Command::new("ssh-keygen").args(&args).stdin(Stdio::null()));
        path
    }

    fn run(cmd: &mut Command) -> Output {
        // Never let ssh-add ask anyone for anything (stdin is null unless
        // the caller gave one).
        cmd.env_remove("DISPLAY")
            .env_remove("SSH_ASKPASS")
            .output()
            .expect("spawn")
    }

    fn run_ok(cmd: &mut Command) -> Output {
        let out = run(cmd);
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn with_sock(program: &str, sock: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env(AUTH_SOCK_VAR, sock).stdin(Stdio::null());
        cmd
    }

    /// "type base64" of an OpenSSH public key line, without the comment.
    fn key_line(line: &str) -> String {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn pub_line(key: &Path) -> String {
        key_line(&fs::read_to_string(key.with_extension("pub")).unwrap())
    }

    fn listed(sock: &Path) -> BTreeSet<String> {
        let out = run_ok(with_sock("ssh-add", sock).arg("-L"));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(key_line)
            .collect()
    }

    fn serve(dir: &Path, source: SshSource) -> (Serving, PathBuf) {
        let sock = dir.join("kiln-agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let agent = Agent::load(&SshConfig {
            id: "default".into(),
            source,
        })
        .unwrap();
        let serving = Arc::new(agent).serve(OwnedFd::from(listener)).unwrap();
        (serving, sock)
    }

    /// `ssh-keygen -Y sign` through the agent at `sock` (given only the
    /// public key, ssh-keygen must ask the agent), then `-Y verify`.
    fn sign_and_verify(dir: &Path, sock: &Path, key: &Path) -> Output {
        let message = dir.join("message");
        fs::write(&message, b"what a step signs\n").unwrap();
        let sig = dir.join("message.sig");
        let _ = fs::remove_file(&sig);
        let out = run(with_sock("ssh-keygen", sock)
            .args(["-Y", "sign", "-n", "test", "-f"])
            .arg(key.with_extension("pub"))
            .arg(&message));
        if !out.status.success() {
            return out;
        }
        let allowed = dir.join("allowed_signers");
        fs::write(&allowed, format!("test@kiln {}\n", pub_line(key))).unwrap();
        run(Command::new("ssh-keygen")
            .args(["-Y", "verify", "-n", "test", "-I", "test@kiln", "-f"])
            .arg(&allowed)
            .arg("-s")
            .arg(&sig)
            .stdin(fs::File::open(&message).unwrap()))
    }

    /// One raw agent request; `None` when the agent closed the connection.
    fn request(sock: &Path, message: &[u8]) -> Option<Vec<u8>> {
        let mut stream = UnixStream::connect(sock).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(&u32::try_from(message.len()).unwrap().to_be_bytes())
            .unwrap();
        stream.write_all(message).unwrap();
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).ok()?;
        let mut answer = vec![0u8; u32::from_be_bytes(len) as usize];
        stream.read_exact(&mut answer).unwrap();
        Some(answer)
    }

    fn sign_request(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
        let mut out = vec![msg::SIGN_REQUEST];
        blob.encode(&mut out).unwrap();
        data.encode(&mut out).unwrap();
        flags.encode(&mut out).unwrap();
        out
    }

    fn blob(key: &Path) -> Vec<u8> {
        PublicKey::read_openssh_file(&key.with_extension("pub"))
            .unwrap()
            .to_bytes()
            .unwrap()
    }

    /// A real `ssh-agent`, killed when dropped.
    struct Upstream {
        child: Child,
        sock: PathBuf,
    }

    impl Upstream {
        fn start(dir: &Path) -> Upstream {
            let sock = dir.join("upstream.sock");
            let child = Command::new("ssh-agent")
                .arg("-D")
                .arg("-a")
                .arg(&sock)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while UnixStream::connect(&sock).is_err() {
                assert!(Instant::now() < deadline, "ssh-agent did not start");
                thread::sleep(Duration::from_millis(20));
            }
            Upstream { child, sock }
        }
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    #[test]
    fn parse_default_and_bare_id_forward_ssh_auth_sock() {
        let env = |name: &str| (name == "SSH_AUTH_SOCK").then(|| OsString::from("/run/agent.sock"));
        for (value, id) in [("default", "default"), ("gitlab", "gitlab")] {
            assert_eq!(
                parse_flag(value, env).unwrap(),
                SshConfig {
                    id: id.into(),
                    source: SshSource::Forward("/run/agent.sock".into()),
                }
            );
        }
    }

    #[test]
    fn parse_default_without_ssh_auth_sock_names_the_variable() {
        for env in [no_env as fn(&str) -> Option<OsString>, |_| {
            Some(OsString::new())
        }] {
            let err = parse_flag("default", env).unwrap_err().to_string();
            assert!(err.contains("SSH_AUTH_SOCK is not set"), "{err}");
        }
    }

    #[test]
    fn parse_paths_socket_forwards_files_are_keys() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let _l1 = UnixListener::bind(&sock).unwrap();
        let sock2 = dir.path().join("b.sock");
        let _l2 = UnixListener::bind(&sock2).unwrap();
        let k1 = dir.path().join("id_one");
        let k2 = dir.path().join("id_two");
        fs::write(&k1, "x").unwrap();
        fs::write(&k2, "x").unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_owned();

        let cfg = parse_flag(&format!("default={}", s(&sock)), no_env).unwrap();
        assert_eq!(cfg.source, SshSource::Forward(sock.clone()));
        let cfg = parse_flag(&format!("gh={},{}", s(&k1), s(&k2)), no_env).unwrap();
        assert_eq!(cfg.id, "gh");
        assert_eq!(cfg.source, SshSource::Keys(vec![k1.clone(), k2.clone()]));

        let two = parse_flag(&format!("x={},{}", s(&sock), s(&sock2)), no_env).unwrap_err();
        assert!(matches!(two, SshError::TwoSockets { .. }), "{two}");
        let mixed = parse_flag(&format!("x={},{}", s(&k1), s(&sock)), no_env).unwrap_err();
        assert!(matches!(mixed, SshError::SocketAndKeys { .. }), "{mixed}");
        let missing = parse_flag("x=/nonexistent/id_rsa", no_env).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/id_rsa"),
            "{missing}"
        );
        assert!(matches!(
            parse_flag(&format!("={}", s(&k1)), no_env),
            Err(SshError::EmptyId { .. })
        ));
        assert!(matches!(
            parse_flag(&format!("x={},", s(&k1)), no_env),
            Err(SshError::EmptyPath { .. })
        ));
    }

    #[test]
    fn signatures_past_the_limit_are_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = keygen(d, "ed25519", &["-t", "ed25519"]);
        let (serving, sock) = serve(d, SshSource::Keys(vec![key.clone()]));
        let sign = sign_request(&blob(&key), b"data", 0);
        // over several connections: the budget is the step's, not a
        // connection's
        for i in 0..MAX_SIGNATURES {
            let answer = request(&sock, &sign).unwrap();
            assert_eq!(answer[0], msg::SIGN_RESPONSE, "signature {i}");
        }
        assert_eq!(request(&sock, &sign).unwrap(), [msg::FAILURE]);
        assert_eq!(request(&sock, &sign).unwrap(), [msg::FAILURE]);
        assert_eq!(serving.refused(), 2);
        // listing still works
        assert_eq!(listed(&sock).len(), 1);
    }

    #[test]
    fn keys_mode_lists_exactly_the_keys_and_signs_with_each() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let keys = [
            keygen(d, "ed25519", &["-t", "ed25519"]),
            keygen(d, "p256", &["-t", "ecdsa", "-b", "256"]),
            keygen(d, "p384", &["-t", "ecdsa", "-b", "384"]),
            keygen(d, "rsa", &["-t", "rsa", "-b", "2048"]),
            keygen(d, "rsa_pem", &["-t", "rsa", "-b", "2048", "-m", "PEM"]),
        ];
        let (_serving, sock) = serve(d, SshSource::Keys(keys.to_vec()));
        // The agent holds the keys now; without the files, a signature that
        // verifies can only have come from it.
        for key in &keys {
            fs::remove_file(key).unwrap();
        }

        let expected: BTreeSet<String> = keys.iter().map(|k| pub_line(k)).collect();
        assert_eq!(listed(&sock), expected);
        for key in &keys {
            let out = sign_and_verify(d, &sock, key);
            assert!(
                out.status.success(),
                "{}: {}",
                key.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn keys_mode_refuses_add_remove_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = keygen(d, "ed25519", &["-t", "ed25519"]);
        let other = keygen(d, "other", &["-t", "ed25519"]);
        let (_serving, sock) = serve(d, SshSource::Keys(vec![key.clone()]));

        assert!(!run(with_sock("ssh-add", &sock).arg("-D")).status.success());
        assert!(!run(with_sock("ssh-add", &sock).arg(&key)).status.success());
        assert!(!run(with_sock("ssh-add", &sock).arg(&other))
            .status
            .success());
        // SSH_AGENTC_LOCK with a passphrase, SSH_AGENTC_REMOVE_IDENTITY and
        // an extension: all refused without closing the connection.
        let mut lock = vec![22];
        b"pw".encode(&mut lock).unwrap();
        let mut remove = vec![18];
        blob(&key).encode(&mut remove).unwrap();
        let mut extension = vec![27];
        "session-bind@openssh.com".encode(&mut extension).unwrap();
        for req in [lock, remove, extension] {
            assert_eq!(request(&sock, &req), Some(vec![msg::FAILURE]));
        }
        assert_eq!(listed(&sock), BTreeSet::from([pub_line(&key)]));
    }

    #[test]
    fn rsa_signs_only_with_sha2_and_only_held_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let rsa = keygen(d, "rsa", &["-t", "rsa", "-b", "2048"]);
        let stranger = keygen(d, "stranger", &["-t", "ed25519"]);
        let (_serving, sock) = serve(d, SshSource::Keys(vec![rsa.clone()]));
        let public = PublicKey::read_openssh_file(&rsa.with_extension("pub")).unwrap();

        for (flags, hash) in [
            (msg::RSA_SHA2_256, HashAlg::Sha256),
            (msg::RSA_SHA2_512, HashAlg::Sha512),
        ] {
            let answer = request(&sock, &sign_request(&blob(&rsa), b"data", flags)).unwrap();
            assert_eq!(answer[0], msg::SIGN_RESPONSE);
            let mut body = &answer[1..];
            let sig = Vec::<u8>::decode(&mut body).unwrap();
            let sig = Signature::try_from(sig.as_slice()).unwrap();
            assert_eq!(sig.algorithm(), Algorithm::Rsa { hash: Some(hash) });
            rsa::signature::Verifier::verify(public.key_data(), b"data", &sig).unwrap();
        }
        // No flag asks for an SHA-1 `ssh-rsa` signature.
        assert_eq!(
            request(&sock, &sign_request(&blob(&rsa), b"data", 0)),
            Some(vec![msg::FAILURE])
        );
        assert_eq!(
            request(
                &sock,
                &sign_request(&blob(&stranger), b"data", msg::RSA_SHA2_512)
            ),
            Some(vec![msg::FAILURE])
        );
    }

    #[test]
    fn forward_mode_relays_list_and_sign_and_filters_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = keygen(d, "ed25519", &["-t", "ed25519"]);
        let other = keygen(d, "other", &["-t", "ecdsa"]);
        let upstream = Upstream::start(d);
        run_ok(with_sock("ssh-add", &upstream.sock).arg(&key));
        let (_serving, sock) = serve(d, SshSource::Forward(upstream.sock.clone()));

        assert_eq!(listed(&sock), BTreeSet::from([pub_line(&key)]));
        let out = sign_and_verify(d, &sock, &key);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        assert!(!run(with_sock("ssh-add", &sock).arg("-D")).status.success());
        assert!(!run(with_sock("ssh-add", &sock).arg(&other))
            .status
            .success());
        let mut lock = vec![22];
        b"pw".encode(&mut lock).unwrap();
        assert_eq!(request(&sock, &lock), Some(vec![msg::FAILURE]));
        // The user's agent still holds exactly its key and is not locked.
        assert_eq!(listed(&upstream.sock), BTreeSet::from([pub_line(&key)]));
    }

    #[test]
    fn passphrase_protected_keys_fail_load_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in [
            keygen(d, "openssh", &["-t", "ed25519", "-N", "secret"]),
            keygen(
                d,
                "pem",
                &["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "secret"],
            ),
        ] {
            let err = Agent::load(&SshConfig {
                id: "default".into(),
                source: SshSource::Keys(vec![key.clone()]),
            })
            .err()
            .expect("an encrypted key must not load")
            .to_string();
            assert!(err.contains(&key.display().to_string()), "{err}");
            assert!(
                err.contains("passphrase-protected keys are not supported"),
                "{err}"
            );
            assert!(err.contains("--ssh default"), "{err}");
        }
    }

    #[test]
    fn load_names_the_bad_key_file_and_the_dead_socket() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = keygen(d, "good", &["-t", "ed25519"]);
        let bad = d.join("not-a-key");
        fs::write(&bad, "hello\n").unwrap();
        let err = Agent::load(&SshConfig {
            id: "x".into(),
            source: SshSource::Keys(vec![good, bad.clone()]),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.starts_with(&format!("ssh key {}:", bad.display())),
            "{err}"
        );

        // A socket file nobody listens on any more (a stale SSH_AUTH_SOCK).
        let stale = d.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let err = Agent::load(&SshConfig {
            id: "x".into(),
            source: SshSource::Forward(stale.clone()),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains(&stale.display().to_string()), "{err}");
    }

    #[test]
    fn oversized_message_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "k", &["-t", "ed25519"]);
        let (_serving, sock) = serve(dir.path(), SshSource::Keys(vec![key]));
        let mut stream = UnixStream::connect(&sock).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let len = u32::try_from(MAX_MESSAGE + 1).unwrap();
        stream.write_all(&len.to_be_bytes()).unwrap();
        stream.write_all(&[msg::REQUEST_IDENTITIES]).unwrap();
        // Closed with the body unread, so the kernel may report a reset
        // rather than end of stream; either way, closed.
        let mut buf = [0u8; 1];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("connection still open: {other:?}"),
        }
    }

    #[test]
    fn connections_past_the_limit_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "k", &["-t", "ed25519"]);
        let (_serving, sock) = serve(dir.path(), SshSource::Keys(vec![key]));
        let mut idle: Vec<UnixStream> = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(UnixStream::connect(&sock).unwrap());
        }
        // Wait until the agent has taken all of them in.
        thread::sleep(Duration::from_millis(200));
        assert_eq!(request(&sock, &[msg::REQUEST_IDENTITIES]), None);
        idle.pop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(answer) = request(&sock, &[msg::REQUEST_IDENTITIES]) {
                assert_eq!(answer[0], msg::IDENTITIES_ANSWER);
                break;
            }
            assert!(Instant::now() < deadline, "a freed slot was never reused");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn dropping_serving_stops_promptly_and_closes_connections() {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "k", &["-t", "ed25519"]);
        let (serving, sock) = serve(dir.path(), SshSource::Keys(vec![key]));
        let mut idle = UnixStream::connect(&sock).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Half a message: the connection thread is waiting mid-read.
        idle.write_all(&[0, 0]).unwrap();
        thread::sleep(Duration::from_millis(100));

        let started = Instant::now();
        drop(serving);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            started.elapsed()
        );
        assert!(UnixStream::connect(&sock).is_err());
        let mut buf = [0u8; 1];
        assert_eq!(idle.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn serve_refuses_a_socket_that_is_not_listening() {
        let (a, _b) = UnixStream::pair().unwrap();
        let agent = Arc::new(Agent {
            id: "x".into(),
            backend: Backend::Keys(Vec::new()),
        });
        let err = agent.serve(OwnedFd::from(a)).err().unwrap();
        assert!(matches!(err, SshError::BadListener { .. }), "{err}");
    }
}
