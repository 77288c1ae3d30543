//! RUN --mount: what each typed mount of a step becomes for the sandbox,
//! and the undoing of it afterwards.
//!
//! - `bind` from the build context (or a named context directory): the
//!   source, filtered by `.dockerignore`, copied into a scratch directory
//!   on the state's file system and bound there (read-only unless `rw`;
//!   with `rw`, writes land in the scratch copy and go with it).
//! - `bind` from a stage or image: a view of its layers, the source
//!   resolved inside it as a descriptor (a symlink in the stage cannot
//!   point the bind at a host path) and bound by `/proc/self/fd/N`.
//! - `cache`: a directory of [`CacheMounts`] under the state directory.
//! - `tmpfs`: a tmpfs of the sandbox.
//! - `secret` and `ssh`: a file or agent socket in a tmpfs private to the
//!   sandbox ([`kiln_runtime::PrivateFile`]); never a host path.
//!
//! Mount points missing from the rootfs are created as stubs, recorded by
//! their real path, and removed after the step if they are still exactly
//! the empty directory or file kiln made, reached without following any
//! symlink: a step that swaps a stub's parent for a symlink cannot make
//! kiln delete anything else (the BuildKit CVE-2024-23652 class).
//!
//! This module never runs the step and never decides a cache hit.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use kiln_runtime::{PrivateContent, PrivateFile};
use kiln_snapshotter::snapshot::{Snapshotter, View};
use oci_spec::image::Digest;
use oci_spec::runtime::{Mount as OciMount, MountBuilder};

use super::filecopy;
use super::fsutil::{self, Root};
use super::statcache::StatCache;
use super::step_cache::{self, KeyBuilder};
use super::FromSource;
use crate::frontend::dockerignore::Matcher;
use crate::frontend::instructions;
use crate::frontend::mount_flags::{Mount, Sharing};
use crate::image::cache_mounts::{CacheLease, CacheMounts, Init};
use crate::session::secrets::Secrets;
use crate::session::ssh::{Agent, Serving};

/// Errors of a step's mounts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Confine(#[from] kiln_snapshotter::confine::NotConfined),
    #[error("cannot use the named build context's ignore file")]
    Ignore(#[source] crate::frontend::dockerignore::DockerignoreError),
    #[error("secret {id:?} is required (--mount=type=secret,id={id},required) but the build was not given it: pass --secret id={id},src=FILE")]
    MissingSecret { id: String },
    #[error("ssh agent {id:?} is required (--mount=type=ssh,id={id},required) but the build was not given it: pass --ssh {id}")]
    MissingSsh { id: String },
    #[error("cannot create the mount point {target}")]
    Stub {
        target: String,
        source: std::io::Error,
    },
    #[error("mount point {target} is a symlink that points nowhere")]
    DanglingTarget { target: String },
    #[error("mount source {path:?} in the {what}")]
    Source {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("mount target {inner} lies inside the {kind} mount at {outer}; secret and ssh targets must be outside other mounts")]
    Nested {
        inner: String,
        kind: &'static str,
        outer: String,
    },
    #[error("cache mount {id:?}")]
    Cache {
        id: String,
        source: crate::image::cache_mounts::Error,
    },
    #[error("cannot set up the ssh agent socket")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Copy(#[from] filecopy::Error),
    #[error(transparent)]
    Snapshot(#[from] kiln_snapshotter::snapshot::Error),
    #[error("cannot describe the mount at {target} for the runtime")]
    Spec {
        target: String,
        source: oci_spec::OciSpecError,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// What the build holds that mounts draw on.
pub struct Resources<'a> {
    pub snap: &'a Snapshotter,
    pub context: &'a Root,
    pub ignore: &'a Matcher,
    pub stat_cache: &'a StatCache,
    pub secrets: &'a Secrets,
    pub agents: &'a BTreeMap<String, Arc<Agent>>,
    pub cache_mounts: &'a CacheMounts,
    /// Landlock rules for copying sources (see `kiln_snapshotter::confine`)
    pub confinement: kiln_snapshotter::confine::Rules,
    /// `--no-cache` for this step: its cache mounts are this build's own
    /// (the id with this token; empty at first, shared by the build's
    /// steps, removed after the build), the stored ones left as they are
    /// (as BuildKit)
    pub no_cache_token: Option<&'a str>,
}

/// Where a mount with `from=` reads, paired with the mount.
fn froms<'m>(mounts: &'m [Mount], sources: &'m [FromSource]) -> Vec<Option<&'m FromSource>> {
    let mut it = sources.iter();
    mounts
        .iter()
        .map(|m| m.from().and_then(|_| it.next()))
        .collect()
}

fn rel(path: &str) -> PathBuf {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// The store id of cache mount `id` in a `--no-cache` build `token`.
pub fn no_cache_id(id: &str, token: &str) -> String {
    format!("{id} (--no-cache build {token})")
}

/// A directory source of a bind or cache mount: the context or a named
/// context directory, with its `.dockerignore`.
struct DirSource<'a> {
    root: RootRef<'a>,
    ignore: Option<Matcher>,
    what: &'static str,
    stat_cache: Option<&'a StatCache>,
}

enum RootRef<'a> {
    Borrowed(&'a Root),
    Owned(Root),
}

impl DirSource<'_> {
    fn source(&self) -> filecopy::Source<'_> {
        filecopy::Source {
            root: match &self.root {
                RootRef::Borrowed(r) => r,
                RootRef::Owned(r) => r,
            },
            what: self.what,
            ignore: self.ignore.as_ref(),
            stat_cache: self.stat_cache,
        }
    }
}

fn dir_source<'a>(res: &Resources<'a>, from: Option<&FromSource>) -> Result<Option<DirSource<'a>>> {
    Ok(match from {
        None => Some(DirSource {
            root: RootRef::Borrowed(res.context),
            ignore: Some(res.ignore.clone()),
            what: "build context",
            stat_cache: Some(res.stat_cache),
        }),
        Some(FromSource::Dir { path, .. }) => Some(DirSource {
            root: RootRef::Owned(Root::open(path).map_err(|source| Error::Source {
                what: "named build context",
                path: path.display().to_string(),
                source,
            })?),
            ignore: Some(
                crate::frontend::dockerignore::load(path, &path.join("Dockerfile"))
                    .map_err(Error::Ignore)?,
            ),
            what: "named build context",
            stat_cache: None,
        }),
        Some(FromSource::Image(..)) => None,
    })
}

/// The entries a directory source brings in at `source` (its root when
/// absent), as COPY would collect them into `/`.
fn dir_entries(src: &DirSource<'_>, source: Option<&str>) -> Result<Vec<filecopy::Entry>> {
    let excludes = Matcher::default();
    let copy_src = src.source();
    let path = source.map(rel).unwrap_or_default();
    let name = if path.as_os_str().is_empty() {
        ".".to_string()
    } else {
        path.to_string_lossy().into_owned()
    };
    Ok(copy_src.collect(
        &[instructions::Source::Path(name)],
        "/",
        true,
        &filecopy::Rules {
            excludes: &excludes,
            parents: false,
            unpack: false,
        },
    )?)
}

/// Add what the mounts bring into the step to its cache key: the content
/// of bind sources from a directory, the key of a stage or image they read
/// from; `by_content`, the checksum of what a bind mount of a stage or
/// image shows (its `source` path in a read-only view of that result)
/// instead of the result's key, as BuildKit's content-based key of an
/// exec's mounts (a source stage made again into the same files gives
/// the same key). Secrets, ssh agents, tmpfs and the contents of cache
/// mounts are never part of the key (as BuildKit).
pub fn key_inputs(
    mounts: &[Mount],
    sources: &[FromSource],
    res: &Resources<'_>,
    key: &mut KeyBuilder,
    by_content: bool,
) -> Result<()> {
    for (m, from) in mounts.iter().zip(froms(mounts, sources)) {
        match (m, from) {
            (Mount::Bind { source, .. }, Some(FromSource::Image(k, st))) if by_content => {
                with_result_view(res, "mount-key", k, st, |src| {
                    let entries = dir_entries(src, source.as_deref())?;
                    key.str("mount-content");
                    Ok(src.source().checksum(&entries, key)?)
                })?;
            }
            (_, Some(FromSource::Image(k, _))) => {
                key.str("mount-from").str(&k.0);
            }
            (Mount::Bind { source, .. }, from) => {
                let Some(src) = dir_source(res, from)? else {
                    continue;
                };
                let entries = dir_entries(&src, source.as_deref())?;
                key.str("mount-bind");
                src.source().checksum(&entries, key)?;
            }
            (Mount::Cache { .. }, Some(FromSource::Dir { name, .. })) => {
                key.str("mount-from-context").str(name);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a bind mount of the step reads a stage or image: the step then
/// has a content key too ([`key_inputs`] by content).
pub fn binds_an_image(mounts: &[Mount], sources: &[FromSource]) -> bool {
    mounts
        .iter()
        .zip(froms(mounts, sources))
        .any(|(m, f)| matches!((m, f), (Mount::Bind { .. }, Some(FromSource::Image(..)))))
}

/// Run `f` on a read-only view of the result `st` (keyed `k`) as a
/// directory source; the view is removed afterwards.
fn with_result_view<T>(
    res: &Resources<'_>,
    what: &str,
    k: &step_cache::Key,
    st: &crate::engine::image_state::ImageState,
    f: impl FnOnce(&DirSource<'_>) -> Result<T>,
) -> Result<T> {
    let chain: Option<Digest> = st.chain.as_ref().and_then(|c| c.parse().ok());
    let view = res
        .snap
        .view(&step_cache::view_key(what, k), chain.as_ref())?;
    let done = Root::open(view.path())
        .map_err(|e| Error::Source {
            what: "source stage",
            path: "/".into(),
            source: e,
        })
        .and_then(|root| {
            f(&DirSource {
                root: RootRef::Owned(root),
                ignore: None,
                what: "source stage",
                stat_cache: None,
            })
        });
    let _ = res.snap.remove(view);
    done
}

/// A mount point kiln created: its real path inside the rootfs.
struct Stub {
    rel: PathBuf,
    dir: bool,
}

/// Something kept alive for the step's run and released after it.
enum Hold {
    Fd(OwnedFd),
    View(Box<View>),
    Scratch(PathBuf),
    Lease(CacheLease),
    Agent(std::thread::JoinHandle<Option<Serving>>),
}

/// The mounts of one step, set up.
pub struct Mounted<'a> {
    snap: &'a Snapshotter,
    rootfs: PathBuf,
    pub spec_mounts: Vec<OciMount>,
    pub private: Vec<PrivateFile>,
    /// secrets given as environment variables, and SSH_AUTH_SOCK
    pub env: Vec<(String, String)>,
    stubs: Vec<Stub>,
    holds: Vec<Hold>,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Mounted<'_> {
    /// Undo everything: stop the agents, release cache leases, drop views
    /// and scratch copies, and remove the stubs still as kiln made them.
    /// Stop the step's SSH agents; a line for the build's output for each
    /// that refused sign requests past its limit.
    pub fn stop_agents(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for h in std::mem::take(&mut self.holds) {
            let Hold::Agent(t) = h else {
                self.holds.push(h);
                continue;
            };
            // joined: the thread only starts serving; dropping the
            // Serving stops the agent
            if let Ok(Some(serving)) = t.join() {
                if serving.refused() > 0 {
                    out.push(format!(
                        "WARNING: the step asked its SSH agent for more than {} signatures; {} refused",
                        crate::session::ssh::MAX_SIGNATURES,
                        serving.refused()
                    ));
                }
            }
        }
        out
    }

    fn release(&mut self) {
        for h in self.holds.drain(..).rev() {
            match h {
                Hold::Agent(t) => drop(t.join()),
                Hold::View(v) => drop(self.snap.remove(*v)),
                // a leftover is swept with the snapshotter's tmp directory
                Hold::Scratch(p) => drop(std::fs::remove_dir_all(&p)),
                Hold::Fd(fd) => drop(fd),
                // unlocks; the next build waiting on it may go
                Hold::Lease(lease) => drop(lease),
            }
        }
        remove_stubs(&self.rootfs, &self.stubs);
        self.stubs.clear();
    }
}

fn bind(target: &str, source: &Path, readonly: bool) -> Result<OciMount> {
    let mut options = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
    options.push(if readonly { "ro" } else { "rw" }.into());
    MountBuilder::default()
        .destination(target)
        .typ("bind")
        .source(source)
        .options(options)
        .build()
        .map_err(|source| Error::Spec {
            target: target.to_string(),
            source,
        })
}

/// `/proc/self/fd/N` of a descriptor the sandbox child inherits (the clone
/// copies the descriptor table), so the bind mounts exactly that inode.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Set up `mounts` for a step on the view at `rootfs`.
pub fn mount<'a>(
    rootfs: &Path,
    mounts: &[Mount],
    sources: &[FromSource],
    res: &Resources<'a>,
) -> Result<Mounted<'a>> {
    let rootfs_real = std::fs::canonicalize(rootfs).unwrap_or_else(|_| rootfs.to_path_buf());
    let root = Root::open(rootfs).map_err(|source| Error::Stub {
        target: "/".into(),
        source,
    })?;
    let mut setup = Setup {
        res,
        root,
        mounts,
        ssh_first: true,
        out: Mounted {
            snap: res.snap,
            rootfs: rootfs_real,
            spec_mounts: Vec::new(),
            private: Vec::new(),
            env: Vec::new(),
            stubs: Vec::new(),
            holds: Vec::new(),
        },
    };
    // The runtime mounts /proc, /dev and /sys; a rootfs without them gets
    // stubs that do not end up in the layer.
    for dir in ["/proc", "/dev", "/sys"] {
        setup.ensure(dir, true)?;
    }
    // Parents before children, so a mount inside another lands on top.
    let mut order: Vec<(&Mount, Option<&FromSource>)> =
        mounts.iter().zip(froms(mounts, sources)).collect();
    order.sort_by_key(|(m, _)| target_of(m).map(|t| rel(&t).components().count()));
    for (m, from) in order {
        match m {
            Mount::Bind {
                target,
                source,
                readwrite,
                ..
            } => setup.bind(target, source.as_deref(), !readwrite, from)?,
            Mount::Cache { .. } => setup.cache(m, from)?,
            Mount::Tmpfs { target, size } => setup.tmpfs(target, *size)?,
            Mount::Secret { .. } => setup.secret(m)?,
            Mount::Ssh { .. } => setup.ssh(m)?,
        }
    }
    Ok(setup.out)
}

/// One step's mounts being set up: what they draw on, the view's root, and
/// what is made so far (released if a later mount fails).
struct Setup<'a, 'm> {
    res: &'m Resources<'a>,
    root: Root,
    /// every mount of the step, to check secret and ssh targets against
    mounts: &'m [Mount],
    /// the first ssh mount sets SSH_AUTH_SOCK
    ssh_first: bool,
    out: Mounted<'a>,
}

impl Setup<'_, '_> {
    /// Make `target` exist in the view (a stub the layer will not keep).
    fn ensure(&mut self, target: &str, is_dir: bool) -> Result<()> {
        ensure(
            &self.root,
            &self.out.rootfs,
            target,
            is_dir,
            &mut self.out.stubs,
        )
    }

    /// `type=bind`: a copy of a context or named-context path, or a path
    /// of a stage or image result, bound at `target`.
    fn bind(
        &mut self,
        target: &str,
        source: Option<&str>,
        readonly: bool,
        from: Option<&FromSource>,
    ) -> Result<()> {
        if let Some(src) = dir_source(self.res, from)? {
            return self.bind_dir_copy(target, source, readonly, from, &src);
        }
        let Some(FromSource::Image(k, st)) = from else {
            return Ok(());
        };
        let snap = self.res.snap;
        let chain: Option<Digest> = st.chain.as_ref().and_then(|c| c.parse().ok());
        let view_key = step_cache::view_key("mount", k);
        let view = if readonly {
            snap.view(&view_key, chain.as_ref())?
        } else {
            snap.prepare(&view_key, chain.as_ref())?
        };
        let resolved = (|| {
            let r = Root::open(view.path())?;
            let p = source.map(rel).unwrap_or_default();
            let fd = r.open_at(&p, libc::O_PATH)?;
            let dir = r.stat(&p)?.is_dir();
            Ok::<_, std::io::Error>((fd, dir))
        })();
        self.out.holds.push(Hold::View(Box::new(view)));
        let (fd, is_dir) = resolved.map_err(|e| Error::Source {
            what: "source stage",
            path: source.unwrap_or("/").to_string(),
            source: e,
        })?;
        self.ensure(target, is_dir)?;
        self.out
            .spec_mounts
            .push(bind(target, &fd_path(&fd), readonly)?);
        self.out.holds.push(Hold::Fd(fd));
        Ok(())
    }

    /// A bind of the build context or a named context: its files are
    /// copied (filtered by its .dockerignore, Landlock-confined) into a
    /// scratch directory, which is bound; never the host path itself.
    fn bind_dir_copy(
        &mut self,
        target: &str,
        source: Option<&str>,
        readonly: bool,
        from: Option<&FromSource>,
        src: &DirSource<'_>,
    ) -> Result<()> {
        let entries = dir_entries(src, source)?;
        let layers = self.res.snap.layers();
        let scratch = layers.tmp_dir().join(layers.unique("bind"));
        let stub_err = |source| Error::Stub {
            target: target.to_string(),
            source,
        };
        std::fs::create_dir_all(&scratch).map_err(stub_err)?;
        self.out.holds.push(Hold::Scratch(scratch.clone()));
        let dest = Root::open(&scratch).map_err(stub_err)?;
        let mut rules = self.res.confinement.clone();
        if let Some(FromSource::Dir { path, .. }) = from {
            rules = rules.read(path);
        }
        kiln_snapshotter::confine::run_confined(
            kiln_snapshotter::confine::Component::ContextCopy,
            &rules,
            || {
                let unique = || layers.unique("bind");
                filecopy::copy(
                    &src.source(),
                    &entries,
                    &dest,
                    &filecopy::CopyAttrs {
                        owner: None,
                        chmod: None,
                        tmp: &layers.tmp_dir(),
                        unique: &unique,
                        keep_owner: false,
                    },
                )
            },
        )??;
        // A file source is collected as /<name>; bind the file.
        let src_path = source.map(rel).unwrap_or_default();
        let is_file = !src_path.as_os_str().is_empty()
            && src.source().root.stat(&src_path).is_ok_and(|m| !m.is_dir());
        let (path, is_dir) = match entries.as_slice() {
            [e] if is_file => (scratch.join(&e.dest), false),
            _ => (scratch, true),
        };
        self.ensure(target, is_dir)?;
        self.out.spec_mounts.push(bind(target, &path, readonly)?);
        Ok(())
    }

    /// `type=cache`: a leased directory of the cache-mount store, seeded
    /// from `from` when fresh, bound at the target.
    fn cache(&mut self, m: &Mount, from: Option<&FromSource>) -> Result<()> {
        let Mount::Cache {
            target,
            id,
            sharing,
            source,
            readonly,
            mode,
            uid,
            gid,
            ..
        } = m
        else {
            unreachable!("mount() hands only Mount::Cache here")
        };
        let cache_err = |source| Error::Cache {
            id: id.clone(),
            source,
        };
        let init = Init {
            mode: *mode,
            uid: *uid,
            gid: *gid,
        };
        let open_err = |e| Error::Source {
            what: "cache mount",
            path: id.clone(),
            source: e,
        };
        let store_id = match self.res.no_cache_token {
            Some(token) => no_cache_id(id, token),
            None => id.clone(),
        };
        let lease = self
            .res
            .cache_mounts
            .acquire(&store_id, *sharing, init)
            .map_err(cache_err)?;
        let cache_root = Root::open(lease.path()).map_err(open_err)?;
        let lease = Some(lease);
        if lease.as_ref().is_none_or(CacheLease::fresh) && from.is_some() {
            seed_cache(self.res, from, source.as_deref(), &cache_root)?;
        }
        if let Some(lease) = lease.as_ref().filter(|_| *sharing == Sharing::Shared) {
            lease.share().map_err(cache_err)?;
        }
        // Without from=, source= is a directory inside the cache, made and
        // resolved inside it (never outside: Buildah CVE-2024-9675).
        let fd = match (from, source) {
            (None, Some(s)) => cache_root.mkdir_all(&rel(s), *uid, *gid),
            _ => cache_root.open_at(Path::new(""), libc::O_PATH | libc::O_DIRECTORY),
        }
        .map_err(|e| Error::Source {
            what: "cache mount",
            path: source.clone().unwrap_or_else(|| "/".into()),
            source: e,
        })?;
        self.ensure(target, true)?;
        self.out
            .spec_mounts
            .push(bind(target, &fd_path(&fd), *readonly)?);
        self.out.holds.push(Hold::Fd(fd));
        if let Some(lease) = lease {
            self.out.holds.push(Hold::Lease(lease));
        }
        Ok(())
    }

    /// `type=tmpfs`: a fresh tmpfs at the target.
    fn tmpfs(&mut self, target: &str, size: Option<u64>) -> Result<()> {
        self.ensure(target, true)?;
        let mut options = vec!["nosuid".to_string(), "nodev".into()];
        if let Some(s) = size {
            options.push(format!("size={s}"));
        }
        let mount = MountBuilder::default()
            .destination(target)
            .typ("tmpfs")
            .source("tmpfs")
            .options(options)
            .build()
            .map_err(|source| Error::Spec {
                target: target.to_string(),
                source,
            })?;
        self.out.spec_mounts.push(mount);
        Ok(())
    }

    /// A file of the sandbox's private tmpfs at `dest`, with its mode and
    /// owner (`mode`, `uid`, `gid`).
    fn private(&mut self, dest: &str, (mode, uid, gid): (u32, u32, u32), content: PrivateContent) {
        self.out.private.push(PrivateFile {
            dest: dest.to_string(),
            mode,
            uid,
            gid,
            content,
        });
    }

    /// `type=secret`: the secret's bytes as a file in the sandbox's
    /// private tmpfs, and/or as an environment variable.
    fn secret(&mut self, m: &Mount) -> Result<()> {
        let Mount::Secret {
            id,
            target,
            env,
            required,
            mode,
            uid,
            gid,
        } = m
        else {
            unreachable!("mount() hands only Mount::Secret here")
        };
        let Some(value) = self.res.secrets.get(id) else {
            if *required {
                return Err(Error::MissingSecret { id: id.clone() });
            }
            return Ok(());
        };
        if let Some(var) = env {
            self.out
                .env
                .push((var.clone(), String::from_utf8_lossy(value).into_owned()));
        }
        if let Some(target) = target {
            check_not_nested(target, self.mounts)?;
            self.ensure(target, false)?;
            let content = PrivateContent::Bytes(value.clone());
            self.private(target, (*mode, *uid, *gid), content);
        }
        Ok(())
    }

    /// `type=ssh`: a socket in the sandbox's private tmpfs whose listener
    /// an agent thread of this process serves.
    fn ssh(&mut self, m: &Mount) -> Result<()> {
        let Mount::Ssh {
            id,
            target,
            required,
            mode,
            uid,
            gid,
        } = m
        else {
            unreachable!("mount() hands only Mount::Ssh here")
        };
        let Some(agent) = self.res.agents.get(id) else {
            if *required {
                return Err(Error::MissingSsh { id: id.clone() });
            }
            return Ok(());
        };
        check_not_nested(target, self.mounts)?;
        self.ensure(target, false)?;
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| Error::Socket(e.into()))?;
        let agent = Arc::clone(agent);
        self.out.holds.push(Hold::Agent(std::thread::spawn(move || {
            let listener = receive_fd(&ours)?;
            agent.serve(listener).ok()
        })));
        self.private(target, (*mode, *uid, *gid), PrivateContent::Socket(theirs));
        if self.ssh_first {
            self.out.env.push(("SSH_AUTH_SOCK".into(), target.clone()));
            self.ssh_first = false;
        }
        Ok(())
    }
}

/// Seed a fresh cache directory from `from`'s `source` (its root when
/// absent), as BuildKit bases a cache mount on `from`.
fn seed_cache(
    res: &Resources<'_>,
    from: Option<&FromSource>,
    source: Option<&str>,
    cache_root: &Root,
) -> Result<()> {
    let layers = res.snap.layers();
    let unique = || layers.unique("cache-seed");
    let attrs = filecopy::CopyAttrs {
        owner: None,
        chmod: None,
        tmp: &layers.tmp_dir(),
        unique: &unique,
        keep_owner: false,
    };
    if let Some(src) = dir_source(res, from)? {
        let entries = dir_entries(&src, source)?;
        filecopy::copy(&src.source(), &entries, cache_root, &attrs)?;
    } else if let Some(FromSource::Image(k, st)) = from {
        with_result_view(res, "cache-seed", k, st, |src| {
            let entries = dir_entries(src, source)?;
            Ok(filecopy::copy(&src.source(), &entries, cache_root, &attrs)?)
        })?;
    }
    Ok(())
}

/// The listening socket the sandbox sends back, or None when it failed
/// before making one (EOF).
fn receive_fd(sock: &OwnedFd) -> Option<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(std::os::fd::RawFd);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just installed these descriptors in our
            // table for us; nothing else owns them.
            return fds.first().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    None
}

fn target_of(m: &Mount) -> Option<String> {
    match m {
        Mount::Bind { target, .. }
        | Mount::Cache { target, .. }
        | Mount::Tmpfs { target, .. }
        | Mount::Ssh { target, .. } => Some(target.clone()),
        Mount::Secret { target, .. } => target.clone(),
    }
}

/// Secret and ssh nodes need a stub in the rootfs itself, so their target
/// cannot be inside another mount of the same step.
fn check_not_nested(target: &str, mounts: &[Mount]) -> Result<()> {
    let inner = rel(target);
    for m in mounts {
        let (kind, outer) = match m {
            Mount::Bind { target, .. } => ("bind", target),
            Mount::Cache { target, .. } => ("cache", target),
            Mount::Tmpfs { target, .. } => ("tmpfs", target),
            _ => continue,
        };
        let o = rel(outer);
        if inner.starts_with(&o) && inner != o {
            return Err(Error::Nested {
                inner: target.to_string(),
                kind,
                outer: outer.clone(),
            });
        }
    }
    Ok(())
}

/// Make `target` exist in the rootfs (a directory, or an empty file when
/// `dir` is false), creating missing components inside the root and
/// recording each one created by its real path.
fn ensure(
    root: &Root,
    rootfs_real: &Path,
    target: &str,
    dir: bool,
    stubs: &mut Vec<Stub>,
) -> Result<()> {
    let err = |source| Error::Stub {
        target: target.to_string(),
        source,
    };
    let comps: Vec<PathBuf> = rel(target).iter().map(PathBuf::from).collect();
    let mut done = PathBuf::new();
    let mut parent = root
        .open_at(Path::new(""), libc::O_PATH | libc::O_DIRECTORY)
        .map_err(err)?;
    for (i, name) in comps.iter().enumerate() {
        done.push(name);
        match root.open_at(&done, libc::O_PATH) {
            Ok(fd) => {
                parent = fd;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(err(e)),
        }
        let last = i + 1 == comps.len();
        let make_dir = !last || dir;
        let n = kiln_sys::cstr(name).map_err(err)?;
        if let Err(e) = kiln_sys::create_at(parent.as_raw_fd(), &n, make_dir) {
            if e.raw_os_error() == Some(libc::EEXIST) {
                // ENOENT on open but EEXIST on create: a dangling symlink
                return Err(Error::DanglingTarget {
                    target: target.to_string(),
                });
            }
            return Err(err(e));
        }
        let real_parent = std::fs::read_link(fd_path(&parent)).map_err(err)?;
        let real = real_parent
            .strip_prefix(rootfs_real)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| done.clone());
        stubs.push(Stub {
            rel: real,
            dir: make_dir,
        });
        parent = root.open_at(&done, libc::O_PATH).map_err(err)?;
    }
    Ok(())
}

/// The /etc/resolv.conf and /etc/hosts of a step under
/// `--network=sandbox`: private files bound read-only over the image's own
/// (or over stubs made for them), so nothing of the host's DNS setup is
/// written into the step's layer. The stubs go when this is dropped.
pub struct NetworkFiles {
    rootfs: PathBuf,
    stubs: Vec<Stub>,
    /// for [`kiln_runtime::RunOptions::private`]
    pub private: Vec<PrivateFile>,
}

impl Drop for NetworkFiles {
    fn drop(&mut self) {
        remove_stubs(&self.rootfs, &self.stubs);
    }
}

/// Make `files` (absolute path, content) exist as stub files in the rootfs
/// and describe them as read-only private files of the sandbox. A path
/// that is a dangling symlink in the image (e.g. /etc/resolv.conf pointing
/// at a systemd-resolved runtime file) is skipped: the step then sees the
/// image's own, as it would on a host without that file.
pub fn network_files(rootfs: &Path, files: Vec<(String, Vec<u8>)>) -> Result<NetworkFiles> {
    let rootfs_real = std::fs::canonicalize(rootfs).unwrap_or_else(|_| rootfs.to_path_buf());
    let mut out = NetworkFiles {
        rootfs: rootfs_real.clone(),
        stubs: Vec::new(),
        private: Vec::new(),
    };
    let root = Root::open(rootfs).map_err(|source| Error::Stub {
        target: "/".into(),
        source,
    })?;
    for (target, content) in files {
        match ensure(&root, &rootfs_real, &target, false, &mut out.stubs) {
            Ok(()) => {}
            Err(Error::DanglingTarget { .. }) => continue,
            Err(e) => return Err(e),
        }
        out.private.push(PrivateFile {
            dest: target,
            mode: 0o644,
            uid: 0,
            gid: 0,
            content: PrivateContent::Bytes(content.into()),
        });
    }
    Ok(out)
}

/// Remove the stubs (children first) that are still the empty directory or
/// empty file kiln created, reached without following any symlink.
fn remove_stubs(rootfs: &Path, stubs: &[Stub]) {
    let Ok(root) = std::fs::File::open(rootfs) else {
        return;
    };
    for s in stubs.iter().rev() {
        let (parent, name) = fsutil::split(&s.rel);
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let (Ok(p), Ok(n)) = (kiln_sys::cstr(parent), kiln_sys::cstr(name)) else {
            continue;
        };
        let Ok(dir) = kiln_runtime::open_beneath_no_symlinks(
            root.as_raw_fd(),
            &p,
            libc::O_PATH | libc::O_DIRECTORY,
        ) else {
            continue; // moved or replaced by the step: not ours any more
        };
        // SAFETY: libc::stat is plain integers, for which all-zero bytes
        // are a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `n` is a NUL-terminated CString alive across the call and
        // `st` a live, writable stat buffer that fstatat only writes into;
        // `dir` is an open descriptor owned by this function.
        if unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                n.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } != 0
        {
            continue;
        }
        let kind = st.st_mode & libc::S_IFMT;
        let flags = if s.dir && kind == libc::S_IFDIR {
            libc::AT_REMOVEDIR
        } else if !s.dir && kind == libc::S_IFREG && st.st_size == 0 {
            0
        } else {
            continue;
        };
        // A directory the step filled fails with ENOTEMPTY and stays.
        // SAFETY: unlinkat of a single name in a directory we hold.
        unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) };
    }
}
