//! Git sources: `ADD <git url> DEST` and a git URL as the build context,
//! as BuildKit reads them (`https://host/repo.git#ref:subdir`, the query
//! form `?ref=&tag=&branch=&commit=&subdir=&keep-git-dir=&submodules=`,
//! `git://`, `git@host:repo`), fetched by kiln host-side with the host's
//! `git`, under the build's network policy: under `sandbox` every git
//! process runs in the same fresh network namespace an `ADD <url>`
//! download gets (names resolved outside it and handed to git), under
//! `host` in kiln's, under `none` not at all.
//!
//! Git runs with no system or user configuration, no prompts, no hooks
//! and only the network protocols (http, https, git, ssh; never `file`
//! or `ext`, also for submodules a repository names). The checkout is a
//! directory kiln made; what is copied from it into the image goes
//! through the copy's own path-safe walk (symlinks copied as links, never
//! followed), and a subdirectory must resolve inside the checkout.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_runtime::Network;

/// How a ref of the URL is to be looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// `#ref` or `?ref=`: a full ref name, a tag, a branch or a commit
    Any,
    /// `?tag=`
    Tag,
    /// `?branch=`
    Branch,
}

/// A git source, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRef {
    /// the repository's URL, without fragment and query
    pub remote: String,
    pub reference: Option<String>,
    pub kind: RefKind,
    /// `?commit=` (or ADD `--checksum`): the commit the ref must resolve
    /// to, full or a prefix
    pub commit: Option<String>,
    pub subdir: Option<String>,
    pub keep_git_dir: bool,
    pub submodules: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: repository does not contain ref {reference}")]
    NoRef { url: String, reference: String },
    #[error("{url}: expected checksum to match {expected}, the ref resolves to commit {actual}")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: git {what} failed: {stderr}")]
    Git {
        url: String,
        what: String,
        stderr: String,
    },
    #[error("{url}: cannot run git (is it installed?)")]
    Spawn { url: String, source: std::io::Error },
    #[error("{url}: the build runs with --network=none: no git repository can be fetched")]
    Offline { url: String },
    #[error("{url}: subdirectory {subdir:?} is not a directory inside the repository")]
    Subdir { url: String, subdir: String },
    #[error("{url}: git over SSH needs an agent: give --ssh default (your agent, $SSH_AUTH_SOCK) or --ssh default=KEYFILE")]
    Ssh { url: String },
    #[error("{url}: cannot serve the --ssh agent to git")]
    Agent {
        url: String,
        source: Box<crate::session::ssh::SshError>,
    },
    #[error("{url}: cannot set up the fetch")]
    Setup { url: String, source: std::io::Error },
    #[error("{url}: cannot reach the network to fetch it")]
    Network {
        url: String,
        source: kiln_runtime::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_full_commit(s: &str) -> bool {
    is_hex(s) && (s.len() == 40 || s.len() == 64)
}

impl GitRef {
    /// Parse a git URL with its fragment (`#ref:subdir`) and query.
    pub fn parse(url: &str) -> Result<GitRef> {
        let bad = |reason: String| Error::Url {
            url: url.to_string(),
            reason,
        };
        let (base, fragment) = match url.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (url, None),
        };
        let (remote, query) = match base.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (base, None),
        };
        let mut g = GitRef {
            remote: remote.to_string(),
            reference: None,
            kind: RefKind::Any,
            commit: None,
            subdir: None,
            keep_git_dir: false,
            submodules: true,
        };
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            let set_ref = |g: &mut GitRef, kind| -> Result<()> {
                if g.reference.is_some() {
                    return Err(bad(
                        "ref conflicts: more than one of ref, tag and branch".into()
                    ));
                }
                g.reference = Some(v.clone());
                g.kind = kind;
                Ok(())
            };
            match k {
                "ref" => set_ref(&mut g, RefKind::Any)?,
                "tag" => set_ref(&mut g, RefKind::Tag)?,
                "branch" => set_ref(&mut g, RefKind::Branch)?,
                "commit" => g.commit = Some(v.clone()),
                "subdir" => g.subdir = Some(v.clone()),
                "keep-git-dir" => g.keep_git_dir = parse_bool(&v).ok_or_else(|| bad(format!("keep-git-dir={v}: expected true or false")))?,
                "submodules" => g.submodules = parse_bool(&v).ok_or_else(|| bad(format!("submodules={v}: expected true or false")))?,
                other => return Err(bad(format!("unknown query key {other:?} (ref, tag, branch, commit, subdir, keep-git-dir, submodules)"))),
            }
        }
        if let Some(f) = fragment {
            let (r, sub) = match f.split_once(':') {
                Some((r, s)) => (r, Some(s)),
                None => (f, None),
            };
            if !r.is_empty() {
                g.merge_fragment_ref(r).map_err(bad)?;
            }
            if let Some(s) = sub.filter(|s| !s.is_empty()) {
                match &g.subdir {
                    Some(q) if q.trim_matches('/') != s.trim_matches('/') => {
                        return Err(bad(format!("subdir conflicts: {q:?} and {s:?}")));
                    }
                    _ => g.subdir = Some(s.to_string()),
                }
            }
        }
        if let Some(c) = &g.commit {
            if !is_hex(c) {
                return Err(bad(format!("commit={c}: not a commit hash")));
            }
        }
        Ok(g)
    }

    /// The fragment's ref, with the query's: the same ref may be named
    /// both ways (`?tag=v1#refs/tags/v1`), different ones conflict.
    fn merge_fragment_ref(&mut self, r: &str) -> std::result::Result<(), String> {
        let Some(q) = &self.reference else {
            self.reference = Some(r.to_string());
            return Ok(());
        };
        let same = match self.kind {
            RefKind::Tag => r == q || r == format!("refs/tags/{q}"),
            RefKind::Branch => r == q || r == format!("refs/heads/{q}"),
            RefKind::Any => r == q,
        };
        if same {
            Ok(())
        } else {
            Err(format!(
                "ref conflicts: {q:?} in the query and {r:?} in the fragment"
            ))
        }
    }

    fn is_ssh(&self) -> bool {
        self.remote.starts_with("git@") || self.remote.starts_with("ssh://")
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "" | "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A fetched checkout: the tree to copy (the subdirectory when one was
/// asked for) and the commit it is.
pub struct Checkout {
    pub tree: PathBuf,
    pub commit: String,
    /// the commit's committer time, seconds since the epoch
    pub committed: i64,
}

/// Fetch `g` into `dir` (an empty directory kiln made) under `network`;
/// `checksum` is ADD's `--checksum` (a commit hash or prefix).
pub fn fetch(
    g: &GitRef,
    checksum: Option<&str>,
    network: Network,
    ssh: Option<&std::sync::Arc<crate::session::ssh::Agent>>,
    dir: &Path,
) -> Result<Checkout> {
    let url = g.remote.clone();
    // over SSH: the build's `default` agent, served to git on a socket of
    // its own for the fetch
    let (_serving, ssh_env) = if g.is_ssh() {
        let agent = ssh.ok_or_else(|| Error::Ssh { url: url.clone() })?;
        let (serving, env) = serve_agent(agent, g, dir).map_err(|source| Error::Agent {
            url: url.clone(),
            source: Box::new(source),
        })?;
        (Some(serving), env)
    } else {
        (None, Vec::new())
    };
    let expected = match (checksum, &g.commit) {
        (Some(c), _) if !is_hex(c) => {
            return Err(Error::Url {
                url,
                reason: format!("--checksum={c}: not a commit hash"),
            })
        }
        (Some(c), Some(q)) if !c.starts_with(q.as_str()) && !q.starts_with(c) => {
            return Err(Error::Checksum {
                url,
                expected: c.to_string(),
                actual: q.clone(),
            })
        }
        (Some(c), _) => Some(c.to_string()),
        (None, q) => q.clone(),
    };
    let resolve = resolve_args(g);
    let run = || -> Result<Checkout> {
        let git = Git {
            url: url.clone(),
            dir: dir.to_path_buf(),
            resolve: resolve.clone(),
            env: ssh_env.clone(),
        };
        git.checkout(g, expected.as_deref())
    };
    match network {
        Network::None => Err(Error::Offline { url }),
        Network::Host => run(),
        Network::Sandbox {
            allow_host_loopback,
        } => {
            let stack = kiln_runtime::net::Stack::detect().map_err(|source| Error::Network {
                url: url.clone(),
                source,
            })?;
            kiln_runtime::net::in_sandbox_network(&stack, allow_host_loopback, run).map_err(
                |source| Error::Network {
                    url: url.clone(),
                    source,
                },
            )?
        }
    }
}

/// The agent served on `dir/ssh/agent.sock` (a directory only kiln can
/// enter), and git's environment for it: ssh with no configuration file,
/// no password prompts, and the host key checked against the user's
/// `~/.ssh/known_hosts` (an unknown host is an error, never accepted on
/// first use); the host's address resolved here, so ssh in the sandbox's
/// namespace needs no resolver.
fn serve_agent(
    agent: &std::sync::Arc<crate::session::ssh::Agent>,
    g: &GitRef,
    dir: &Path,
) -> std::result::Result<
    (crate::session::ssh::Serving, Vec<(String, String)>),
    crate::session::ssh::SshError,
> {
    use std::os::unix::fs::DirBuilderExt;
    let serve_err = |what, source| crate::session::ssh::SshError::Serve {
        id: agent.id().to_string(),
        what,
        source,
    };
    let sock_dir = dir.join("ssh");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sock_dir)
        .map_err(|e| serve_err("making its directory", e))?;
    let sock = sock_dir.join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock)
        .map_err(|e| serve_err("binding its socket", e))?;
    let serving = agent.serve(std::os::fd::OwnedFd::from(listener))?;
    let known = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".ssh/known_hosts"))
        .unwrap_or_else(|| PathBuf::from("/dev/null"));
    let mut ssh = format!(
        "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/etc/ssh/ssh_known_hosts",
        known.display()
    );
    if let Some((host, addr)) = ssh_host(&g.remote).and_then(|h| {
        use std::net::ToSocketAddrs;
        let addr = (h.as_str(), 22).to_socket_addrs().ok()?.next()?;
        Some((h, addr.ip()))
    }) {
        if host.parse::<std::net::IpAddr>().is_err() {
            ssh.push_str(&format!(" -o HostKeyAlias={host} -o HostName={addr}"));
        }
    }
    Ok((
        serving,
        vec![
            ("SSH_AUTH_SOCK".into(), sock.display().to_string()),
            ("GIT_SSH_COMMAND".into(), ssh),
        ],
    ))
}

/// The host of an SSH git URL (`git@host:path`, `ssh://user@host:port/path`).
fn ssh_host(remote: &str) -> Option<String> {
    let rest = remote.strip_prefix("ssh://").unwrap_or(remote);
    let authority = if remote.starts_with("ssh://") {
        rest.split('/').next()?
    } else {
        rest.split(':').next()?
    };
    let hostport = authority.rsplit('@').next()?;
    let host = match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => hostport.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// `http.curloptResolve` entries for the URL's host, resolved here (in
/// kiln's namespace, through the host's resolver), so git in the
/// sandbox's namespace needs no resolver.
fn resolve_args(g: &GitRef) -> Vec<String> {
    use std::net::ToSocketAddrs;
    let Some((scheme, rest)) = g.remote.split_once("://") else {
        return Vec::new();
    };
    let default_port = match scheme {
        "https" => 443,
        "http" => 80,
        _ => return Vec::new(),
    };
    let authority = rest.split('/').next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (h.ends_with(']') || !h.contains(':')) => {
            match p.parse::<u16>() {
                Ok(p) => (h, p),
                Err(_) => (hostport, default_port),
            }
        }
        _ => (hostport, default_port),
    };
    let Ok(addrs) = (host.trim_matches(['[', ']']), port).to_socket_addrs() else {
        return Vec::new();
    };
    let list: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
    if list.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        return Vec::new();
    }
    vec![format!(
        "http.curloptResolve={host}:{port}:{}",
        list.join(",")
    )]
}

/// The git commands of one fetch.
struct Git {
    url: String,
    dir: PathBuf,
    resolve: Vec<String>,
    /// more environment (SSH_AUTH_SOCK, GIT_SSH_COMMAND for SSH)
    env: Vec<(String, String)>,
}

impl Git {
    fn command(&self, cwd: &Path) -> Command {
        let mut c = Command::new("git");
        c.current_dir(cwd)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &self.dir)
            .env("LC_ALL", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ALLOW_PROTOCOL", "http:https:git:ssh")
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.fsmonitor=false",
            ])
            .args([
                "-c",
                "protocol.file.allow=never",
                "-c",
                "advice.detachedHead=false",
            ]);
        for r in &self.resolve {
            c.args(["-c", r]);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
            "http_proxy",
            "https_proxy",
            "no_proxy",
        ] {
            if let Some(v) = std::env::var_os(var) {
                c.env(var, v);
            }
        }
        c
    }

    /// Run git with `args` in `cwd`; its standard output.
    fn run(&self, cwd: &Path, args: &[&str]) -> Result<String> {
        let out = self
            .command(cwd)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                url: self.url.clone(),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr: String = stderr.trim().chars().take(2000).collect();
            return Err(Error::Git {
                url: self.url.clone(),
                what: args.first().copied().unwrap_or("").to_string(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The commit `g`'s ref names, from `git ls-remote`, and the ref name
    /// to fetch (None: fetch the commit itself).
    fn resolve(&self, g: &GitRef) -> Result<(String, Option<String>)> {
        if let Some(r) = g.reference.as_deref().filter(|r| is_full_commit(r)) {
            return Ok((r.to_string(), None));
        }
        let listing = self.run(&self.dir, &["ls-remote", "--", &self.url])?;
        let refs: Vec<(&str, &str)> = listing
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(sha, name)| (sha.trim(), name.trim()))
            .collect();
        // an annotated tag's commit is its peeled line
        let find = |name: &str| {
            refs.iter()
                .find(|(_, n)| *n == format!("{name}^{{}}"))
                .or_else(|| refs.iter().find(|(_, n)| *n == name))
                .map(|(sha, _)| (sha.to_string(), Some(name.to_string())))
        };
        let found = match (&g.reference, g.kind) {
            (None, _) => find("HEAD"),
            (Some(r), RefKind::Tag) => find(&format!("refs/tags/{r}")),
            (Some(r), RefKind::Branch) => find(&format!("refs/heads/{r}")),
            (Some(r), RefKind::Any) => {
                let mut c = Vec::new();
                if r.starts_with("refs/") {
                    c.push(r.clone());
                }
                c.push(format!("refs/tags/{r}"));
                c.push(format!("refs/heads/{r}"));
                c.iter().find_map(|n| find(n))
            }
        };
        match found {
            Some(f) => Ok(f),
            // with no ref and only a commit asked for, fetch the commit
            None if g.reference.is_none() => match &g.commit {
                Some(c) if is_full_commit(c) => Ok((c.clone(), None)),
                _ => Err(self.no_ref("HEAD")),
            },
            None => Err(self.no_ref(g.reference.as_deref().unwrap_or("HEAD"))),
        }
    }

    fn no_ref(&self, r: &str) -> Error {
        Error::NoRef {
            url: self.url.clone(),
            reference: r.to_string(),
        }
    }

    fn checkout(&self, g: &GitRef, expected: Option<&str>) -> Result<Checkout> {
        let setup = |source| Error::Setup {
            url: self.url.clone(),
            source,
        };
        let (commit, name) = match (&g.reference, &g.commit) {
            // `?commit=` alone: that commit
            (None, Some(c)) if is_full_commit(c) => (c.clone(), None),
            _ => self.resolve(g)?,
        };
        if let Some(e) = expected {
            if !commit.starts_with(e) {
                return Err(Error::Checksum {
                    url: self.url.clone(),
                    expected: e.to_string(),
                    actual: commit,
                });
            }
        }
        let tree = self.dir.join("tree");
        std::fs::create_dir(&tree).map_err(setup)?;
        let format = if commit.len() == 64 { "sha256" } else { "sha1" };
        self.run(&tree, &["init", "-q", &format!("--object-format={format}")])?;
        self.run(&tree, &["remote", "add", "origin", "--", &self.url])?;
        let want = name.clone().unwrap_or_else(|| commit.clone());
        let shallow = self.run(
            &tree,
            &["fetch", "-q", "--depth=1", "--no-tags", "origin", &want],
        );
        if shallow.is_err() {
            // a server that refuses a commit by hash, or a shallow fetch
            self.run(
                &tree,
                &[
                    "fetch",
                    "-q",
                    "--tags",
                    "origin",
                    "+refs/heads/*:refs/remotes/origin/*",
                ],
            )?;
        }
        self.run(&tree, &["checkout", "-q", "--detach", &commit])?;
        let head = self.run(&tree, &["rev-parse", "HEAD"])?;
        if head.trim() != commit {
            return Err(Error::Checksum {
                url: self.url.clone(),
                expected: commit,
                actual: head.trim().to_string(),
            });
        }
        let committed = self
            .run(&tree, &["show", "-s", "--format=%ct", "HEAD"])?
            .trim()
            .parse::<i64>()
            .unwrap_or(0);
        if g.submodules && tree.join(".gitmodules").exists() {
            self.run(
                &tree,
                &[
                    "submodule",
                    "update",
                    "-q",
                    "--init",
                    "--recursive",
                    "--depth=1",
                ],
            )?;
        }
        if !g.keep_git_dir {
            remove_git_dirs(&tree).map_err(setup)?;
        }
        let tree = match &g.subdir {
            None => tree,
            Some(s) => self.subdir(&tree, s)?,
        };
        Ok(Checkout {
            tree,
            commit,
            committed,
        })
    }

    /// `sub` of the checkout at `tree`, which must resolve inside it.
    fn subdir(&self, tree: &Path, sub: &str) -> Result<PathBuf> {
        let err = || Error::Subdir {
            url: self.url.clone(),
            subdir: sub.to_string(),
        };
        let top = tree.canonicalize().map_err(|_| err())?;
        let at = tree
            .join(sub.trim_start_matches('/'))
            .canonicalize()
            .map_err(|_| err())?;
        if !at.starts_with(&top) || !at.is_dir() {
            return Err(err());
        }
        Ok(at)
    }
}

/// Remove `.git` (a directory at the top, files in submodules).
fn remove_git_dirs(tree: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(tree.join(".git"))?;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ty = e.file_type()?;
            if e.file_name() == ".git" {
                if ty.is_dir() {
                    std::fs::remove_dir_all(e.path())?;
                } else {
                    std::fs::remove_file(e.path())?;
                }
            } else if ty.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_as_buildkit_reads_them() {
        let g = GitRef::parse("https://h/r.git#v1:sub/dir").unwrap();
        assert_eq!(g.remote, "https://h/r.git");
        assert_eq!(g.reference.as_deref(), Some("v1"));
        assert_eq!(g.subdir.as_deref(), Some("sub/dir"));
        let g = GitRef::parse("https://h/r.git?tag=v1&subdir=s&keep-git-dir=true").unwrap();
        assert_eq!((g.kind, g.keep_git_dir), (RefKind::Tag, true));
        assert!(GitRef::parse("https://h/r.git?tag=v1#refs/tags/v1").is_ok());
        let e = GitRef::parse("https://h/r.git?tag=v1#refs/heads/master").unwrap_err();
        assert!(e.to_string().contains("ref conflicts"), "{e}");
        assert!(GitRef::parse("https://h/r.git?bogus=1").is_err());
        assert!(GitRef::parse("https://h/r.git?commit=xyz").is_err());
        let g = GitRef::parse("https://h/r.git#:only-sub").unwrap();
        assert_eq!((g.reference, g.subdir.as_deref()), (None, Some("only-sub")));
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(
            ssh_host("git@example.com:org/r.git").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            ssh_host("ssh://git@h.example:2222/r.git").as_deref(),
            Some("h.example")
        );
        assert_eq!(ssh_host("ssh://[::1]:22/r.git").as_deref(), Some("::1"));
    }
}
