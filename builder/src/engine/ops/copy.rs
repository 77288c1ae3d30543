//! COPY and ADD: the tree they read (the build context, a named context
//! directory, or a stage or image result), the exact entries they copy,
//! the step's key ([`Engine::copy_key`]), and on a miss the copy into a
//! writable view, on a Landlock-confined thread, and its diff as a layer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln_snapshotter::confine::{run_confined, Component};
use kiln_snapshotter::snapshot::View;

use super::{Done, StepCtx};
use crate::engine::download::Download;
use crate::engine::error::StepError;
use crate::engine::filecopy::{self, Entry};
use crate::engine::fsutil::Root;
use crate::engine::solver::Engine;
use crate::engine::statcache::StatCache;
use crate::engine::step_cache::{self, Key, KeyBuilder};
use crate::engine::{download, git, network, progress, FromSource};
use crate::frontend::dockerignore::{self, Matcher};
use crate::frontend::instructions::{Add, Chmod, Copy, Source};

/// What a COPY or ADD asks for, whichever of the two it is.
pub struct CopyOp<'a> {
    sources: &'a [Source],
    dest: &'a str,
    chown: Option<&'a str>,
    chmod: Option<&'a Chmod>,
    parents: bool,
    excludes: &'a [String],
    /// ADD: extract local tar archives
    unpack: bool,
    /// ADD --checksum of a URL source (`sha256:<hex>`)
    checksum: Option<&'a str>,
    /// ADD --unpack=true: extract a downloaded archive
    unpack_urls: bool,
    /// COPY --from: reads the step's first source, not the context
    from_source: bool,
}

impl<'a> CopyOp<'a> {
    pub fn copy(c: &'a Copy) -> Self {
        CopyOp {
            sources: &c.sources,
            dest: &c.dest,
            chown: c.chown.as_deref(),
            chmod: c.chmod.as_ref(),
            parents: c.parents,
            excludes: &c.excludes,
            unpack: false,
            checksum: None,
            unpack_urls: false,
            from_source: true,
        }
    }

    pub fn add(a: &'a Add) -> Self {
        CopyOp {
            sources: &a.sources,
            dest: &a.dest,
            chown: a.chown.as_deref(),
            chmod: a.chmod.as_ref(),
            parents: false,
            excludes: &a.excludes,
            // Local archives are extracted unless --unpack=false.
            unpack: a.unpack != Some(false),
            checksum: a.checksum.as_deref(),
            unpack_urls: a.unpack == Some(true),
            from_source: false,
        }
    }
}

/// COPY's and ADD's history `created_by`, as BuildKit writes it: the
/// instruction with `--parents`, `--chown` and `--chmod` (not `--from`,
/// `--link` or `--exclude`), its sources and destination.
fn copy_history(step: &crate::frontend::Step) -> String {
    let (name, sources, dest, parents, chown, chmod) = match &step.instruction {
        crate::frontend::instructions::Instruction::Copy(c) => {
            ("COPY", &c.sources, &c.dest, c.parents, &c.chown, &c.chmod)
        }
        crate::frontend::instructions::Instruction::Add(a) => {
            ("ADD", &a.sources, &a.dest, false, &a.chown, &a.chmod)
        }
        _ => return step.original.clone(),
    };
    let mut out = String::from(name);
    if parents {
        out.push_str(" --parents");
    }
    if let Some(c) = chown {
        out.push_str(&format!(" --chown={c}"));
    }
    match chmod {
        Some(Chmod::Octal(m)) => out.push_str(&format!(" --chmod={m:o}")),
        Some(Chmod::Symbolic(m)) => out.push_str(&format!(" --chmod={m}")),
        None => {}
    }
    for s in sources {
        match s {
            Source::Path(p) => out.push_str(&format!(" {p}")),
            Source::Heredoc { name, .. } => out.push_str(&format!(" <<{name}")),
        }
    }
    out.push_str(&format!(" {dest}"));
    out
}

/// The tree a COPY reads, held open for the step.
enum Tree {
    /// the build context (the engine holds it open)
    Context(Arc<StatCache>),
    /// `--build-context NAME=DIR`
    Dir {
        name: String,
        path: PathBuf,
        root: Root,
        ignore: Matcher,
        cache: Arc<StatCache>,
    },
    /// a git checkout (`ADD <git url>`), named by its URL and commit
    Git { name: String, root: Root },
    /// a stage's or an image's result, in a read-only view
    Image {
        key: Key,
        root: Root,
        _view: Box<View>,
    },
}

/// Where the entries go: the destination as an absolute path, and whether
/// it names a directory.
struct Dest {
    path: String,
    is_dir: bool,
}

/// An `ADD <url>`: the URL, where it lands, and the download when the key
/// needed it already.
struct Remote {
    url: String,
    /// `--checksum`, or the one the source policy set
    checksum: Option<String>,
    to: PathBuf,
    /// `--unpack=true`: the directory an archive is extracted into
    unpack_to: Option<PathBuf>,
    download: Option<Download>,
}

impl Engine {
    /// COPY and ADD: resolve the sources, key the step by exactly the
    /// content they copy, and copy it into a new layer.
    pub(super) fn copy_op(&self, ctx: &StepCtx, op: &CopyOp<'_>) -> Result<Done, StepError> {
        let from = ctx.from.first().filter(|_| op.from_source);
        let tree = self.copy_tree(from)?;
        self.copy_from_tree(ctx, op, &tree)
    }

    /// `ADD <git url> DEST`: the repository fetched host-side under the
    /// build's network policy ([`git::fetch`]) into a scratch directory of
    /// the state, then its tree copied as a COPY of a directory is, keyed
    /// by the content copied.
    pub(super) fn git_add_op(&self, ctx: &StepCtx, a: &Add) -> Result<Done, StepError> {
        let [Source::Path(url)] = a.sources.as_slice() else {
            return Err(StepError::GitSources);
        };
        let mut g = git::GitRef::parse(url)?;
        g.keep_git_dir |= a.keep_git_dir;
        self.opts.session.git(url, &g.remote)?;
        let network = self.fetcher()?.network;
        let scratch = download::download_dir(self.opts.state.root())
            .map_err(StepError::Source)?
            .join(self.snap.layers().unique("git"));
        std::fs::create_dir(&scratch).map_err(StepError::Source)?;
        let result = (|| {
            let t = Instant::now();
            let agent = self.opts.session.agents.get("default");
            let checkout = git::fetch(&g, a.checksum.as_deref(), network, agent, &scratch)?;
            self.progress
                .phase(ctx.vertex, &format!("git fetch {}", &checkout.commit), t);
            let tree = Tree::Git {
                name: format!(
                    "{}#{}:{} keep-git-dir={} submodules={}",
                    g.remote,
                    checkout.commit,
                    g.subdir.as_deref().unwrap_or(""),
                    g.keep_git_dir,
                    g.submodules
                ),
                root: Root::open(&checkout.tree).map_err(StepError::Source)?,
            };
            let sources = [Source::Path(".".into())];
            let op = CopyOp {
                sources: &sources,
                dest: &a.dest,
                chown: a.chown.as_deref(),
                chmod: a.chmod.as_ref(),
                parents: false,
                excludes: &a.excludes,
                unpack: false,
                checksum: None,
                unpack_urls: false,
                from_source: false,
            };
            self.copy_from_tree(ctx, &op, &tree)
        })();
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// COPY and ADD of `tree`'s files.
    fn copy_from_tree(
        &self,
        ctx: &StepCtx,
        op: &CopyOp<'_>,
        tree: &Tree,
    ) -> Result<Done, StepError> {
        let source = self.tree_source(tree);
        let dest = self.destination(ctx, op);
        // ADD of URLs: downloaded by this process, never in the sandbox.
        let (urls, locals): (Vec<_>, Vec<_>) =
            op.sources.iter().cloned().partition(filecopy::is_url);
        if op.sources.len() > 1 && !dest.is_dir && !urls.is_empty() {
            return Err(filecopy::Error::DestNotDir(op.dest.to_string()).into());
        }
        let excludes = Matcher::new(op.excludes.iter())
            .map_err(|_| StepError::Copy(filecopy::Error::Pattern(op.excludes.join(","))))?;
        let chmod = op.chmod.map(filecopy::Mode::parse).transpose()?;
        let rules = filecopy::Rules {
            excludes: &excludes,
            parents: op.parents,
            unpack: op.unpack,
        };
        let t = Instant::now();
        let mut entries = source.collect(&locals, &dest.path, dest.is_dir, &rules)?;
        self.progress
            .phase(ctx.vertex, &format!("list {} sources", entries.len()), t);
        let (keys, remote) = self.copy_key(ctx, op, tree, &source, &entries, &dest, &urls)?;
        let key = keys.key.clone();
        let lock = self.shared.key_lock(&key);
        let _same_step = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = self.hit_either(ctx, &keys) {
            return Ok(hit);
        }
        self.progress.started(ctx.vertex, &ctx.name);
        for r in remote {
            let d = match r.download {
                Some(d) => d,
                None => self.fetcher()?.fetch(&r.url)?,
            };
            if let Some(sum) = &r.checksum {
                d.verify(&r.url, sum)?;
            }
            let mut entry = d.into_entry(r.to);
            // --unpack=true: an archive is extracted into the destination
            // directory; anything else is copied as a file
            if let Some(dir) = r.unpack_to {
                if filecopy::downloaded_archive(&entry)? {
                    entry.archive = true;
                    entry.dest = dir;
                }
            }
            entries.push(entry);
        }
        let view = self
            .snap
            .prepare(&step_cache::view_key("copy", &key), ctx.chain().as_ref())?;
        let t = Instant::now();
        if let Err(e) = self.copy_into(&view, op, chmod, tree, &source, &entries, &dest) {
            let _ = self.snap.remove(view);
            return Err(e);
        }
        self.progress.phase(ctx.vertex, "copy", t);
        let mut state = ctx.state.clone();
        let created_by = format!("{} # buildkit", copy_history(&ctx.step));
        self.commit(view, &mut state, created_by, ctx.vertex)?;
        self.record_keys(&keys, &state);
        Ok(Done {
            key,
            content_key: keys.content,
            state,
            cached: false,
        })
    }

    /// What goes into a COPY or ADD key: the parent's key and the
    /// instruction as planned; the source tree (a named context's name;
    /// nothing for the build context, whose files are checksummed); a
    /// checksum of exactly the entries copied (mode, owner, size, link
    /// target and bytes, [`filecopy::Source::checksum`]); each URL's
    /// content digest, or its `--checksum` when given (then a hit
    /// downloads nothing), and where it lands; `--chown`, `--chmod` and
    /// the destination. A COPY --from a stage or image has two keys
    /// ([`super::Keys`]): by the source's key instead of the checksum,
    /// and by the checksum alone. Downloads made for the key are returned
    /// for the copy.
    #[allow(clippy::too_many_arguments)]
    fn copy_key(
        &self,
        ctx: &StepCtx,
        op: &CopyOp<'_>,
        tree: &Tree,
        source: &filecopy::Source<'_>,
        entries: &[Entry],
        dest: &Dest,
        urls: &[Source],
    ) -> Result<(super::Keys, Vec<Remote>), StepError> {
        let mut k = KeyBuilder::new("step");
        k.str(&ctx.parent.0);
        if let Some(e) = self.layer_epoch() {
            k.str(&format!("epoch {e}"));
        }
        match tree {
            // the commit, not how the URL named it (nor --checksum)
            Tree::Git { .. } => k.str(&op.excludes.join("\n")),
            _ => k.str(&serde_json::to_string(&ctx.step.instruction).unwrap_or_default()),
        };
        match tree {
            Tree::Context(_) | Tree::Image { .. } => {}
            Tree::Dir { name, .. } => {
                k.str("context").str(name);
            }
            Tree::Git { name, .. } => {
                k.str("git").str(name);
            }
        }
        // the definition key of a copy from a stage or image: the same
        // inputs with the source's key where the checksum goes
        let mut by_source = match tree {
            Tree::Image { key, .. } => {
                let mut d = k.clone();
                d.str("from-key").str(&key.0);
                Some(d)
            }
            _ => None,
        };
        let t = Instant::now();
        // a git tree is keyed by its commit (in its name), as BuildKit
        // keys it: a kept .git directory is never the same twice
        let hashed = match tree {
            Tree::Git { .. } => 0,
            _ => source.checksum(entries, &mut k)?,
        };
        self.progress.phase(
            ctx.vertex,
            &format!("checksum {}", progress::bytes(hashed)),
            t,
        );
        let dest_rel = PathBuf::from(dest.path.trim_start_matches('/'));
        let mut remote = Vec::new();
        for u in urls {
            let Source::Path(written) = u else { continue };
            // where it lands is named by the URL as written; what is read
            // is what the source policy says
            let to = if dest.is_dir {
                dest_rel.join(filecopy::url_file_name(written))
            } else {
                dest_rel.clone()
            };
            let (url, checksum) = self.url_under_policy(written, op.checksum)?;
            let url = &url;
            // With --checksum the checksum is the key: a hit needs no
            // download. Without it the content digest is, as BuildKit does.
            let download = match &checksum {
                Some(sum) => {
                    k.str(sum);
                    None
                }
                None => {
                    let d = self.fetcher()?.fetch(url)?;
                    k.str(&d.digest);
                    Some(d)
                }
            };
            if url != written {
                k.str("url-from-policy").str(url);
            }
            k.str("url").str(&to.to_string_lossy());
            let unpack_to = op.unpack_urls.then(|| dest_rel.clone());
            if unpack_to.is_some() {
                k.str("unpack");
            }
            remote.push(Remote {
                url: url.clone(),
                checksum,
                to,
                unpack_to,
                download,
            });
        }
        for b in [Some(&mut k), by_source.as_mut()].into_iter().flatten() {
            b.str(op.chown.unwrap_or(""))
                .str(&format!("{:?}", op.chmod))
                .str(&dest.path);
        }
        let keys = match by_source {
            Some(d) => super::Keys {
                key: d.finish(),
                content: Some(k.finish()),
            },
            None => super::Keys {
                key: k.finish(),
                content: None,
            },
        };
        Ok((keys, remote))
    }

    /// The URL `ADD` reads for `written` (with its `--checksum`) under the
    /// source policy, and the checksum to hold it to.
    fn url_under_policy(
        &self,
        written: &str,
        checksum: Option<&str>,
    ) -> Result<(String, Option<String>), StepError> {
        use crate::session::source_policy::{PolicyError, Source};
        let mut src = Source::new(written);
        if let Some(sum) = checksum {
            src.attrs.insert("http.checksum".into(), sum.to_string());
        }
        let mut src = self.opts.session.source(src)?;
        if !src.identifier.starts_with("http://") && !src.identifier.starts_with("https://") {
            return Err(PolicyError::Unsupported {
                ident: written.to_string(),
                to: src.identifier,
                why: "is not an HTTP(S) URL, and kiln converts a URL only to another URL".into(),
            }
            .into());
        }
        let sum = src.attrs.remove("http.checksum");
        Ok((src.identifier, sum))
    }

    /// Open the tree a COPY reads: `from`, else the build context.
    fn copy_tree(&self, from: Option<&FromSource>) -> Result<Tree, StepError> {
        Ok(match from {
            Some(FromSource::Dir { name, path }) => Tree::Dir {
                name: name.clone(),
                path: path.clone(),
                root: Root::open(path).map_err(StepError::Source)?,
                ignore: dockerignore::load(path, &path.join("Dockerfile"))
                    .map_err(StepError::Ignore)?,
                cache: self.stat_cache(path),
            },
            Some(FromSource::Image(key, state)) => {
                let chain = state.chain.as_ref().and_then(|c| c.parse().ok());
                let view = self
                    .snap
                    .view(&step_cache::view_key("from", key), chain.as_ref())?;
                Tree::Image {
                    key: key.clone(),
                    root: Root::open(view.path()).map_err(StepError::Source)?,
                    _view: Box::new(view),
                }
            }
            None => Tree::Context(self.stat_cache(&self.opts.context)),
        })
    }

    /// The copy's view of `tree`.
    fn tree_source<'t>(&'t self, tree: &'t Tree) -> filecopy::Source<'t> {
        match tree {
            Tree::Context(cache) => filecopy::Source {
                root: &self.context,
                what: "build context",
                ignore: Some(&self.ignore),
                stat_cache: Some(cache),
            },
            Tree::Dir {
                root,
                ignore,
                cache,
                ..
            } => filecopy::Source {
                root,
                what: "named build context",
                ignore: Some(ignore),
                stat_cache: Some(cache),
            },
            Tree::Git { root, .. } => filecopy::Source {
                root,
                what: "git repository",
                ignore: None,
                stat_cache: None,
            },
            Tree::Image { root, .. } => filecopy::Source {
                root,
                what: "source stage",
                ignore: None,
                stat_cache: None,
            },
        }
    }

    /// The destination, absolute (relative to the working directory), and
    /// whether it is a directory: a trailing `/`, `.` or `/.`, else what
    /// the parent layers hold there.
    fn destination(&self, ctx: &StepCtx, op: &CopyOp<'_>) -> Dest {
        let path = if op.dest.starts_with('/') {
            op.dest.to_string()
        } else {
            format!("{}/{}", ctx.workdir().trim_end_matches('/'), op.dest)
        };
        let is_dir = op.dest.ends_with('/')
            || op.dest == "."
            || op.dest.ends_with("/.")
            || self.is_dir_in_chain(ctx.chain().as_ref(), &path);
        Dest { path, is_dir }
    }

    /// Whether `path` is a directory in the layer chain `chain`, looked up
    /// in the unpacked layers (topmost first) without mounting a view.
    fn is_dir_in_chain(&self, chain: Option<&oci_spec::image::Digest>, path: &str) -> bool {
        let Some(chain) = chain else { return false };
        let Ok(dirs) = self.snap.layers().chain_dirs(chain) else {
            return false;
        };
        let rel = std::path::Path::new(path.trim_start_matches('/'));
        for dir in dirs {
            if let Ok(root) = Root::open(&dir) {
                if let Ok(meta) = root.lstat(rel) {
                    return meta.is_dir();
                }
            }
        }
        false
    }

    /// Copy `entries` into `view`. The copy reads the context
    /// (attacker-shaped trees) and writes the view: on a thread Landlock
    /// keeps to the context, the named context read, and the state
    /// directory.
    #[allow(clippy::too_many_arguments)]
    fn copy_into(
        &self,
        view: &View,
        op: &CopyOp<'_>,
        chmod: Option<filecopy::Mode>,
        tree: &Tree,
        source: &filecopy::Source<'_>,
        entries: &[Entry],
        dest: &Dest,
    ) -> Result<(), StepError> {
        let mut rules = self.confinement();
        if let Tree::Dir { path, .. } = tree {
            rules = rules.read(path);
        }
        let view_path = view.path().to_path_buf();
        let keep_owner = matches!(tree, Tree::Image { .. });
        // nothing to copy into a directory, or from wildcards (whose
        // matches make the destination one): it is still made
        let wildcard = op
            .sources
            .iter()
            .any(|s| matches!(s, Source::Path(p) if filecopy::has_glob(p)));
        let empty_dir = (entries.is_empty() && (dest.is_dir || wildcard))
            .then(|| std::path::PathBuf::from(dest.path.trim_start_matches('/')));
        run_confined(Component::ContextCopy, &rules, || {
            let target = Root::open(&view_path).map_err(StepError::Source)?;
            let owner = match op.chown {
                Some(spec) => Some(filecopy::chown_ids(&view_path, spec).map_err(|source| {
                    StepError::Chown {
                        spec: spec.to_string(),
                        source,
                    }
                })?),
                None => None,
            };
            let layers = self.snap.layers();
            let unique = || layers.unique("add");
            let attrs = filecopy::CopyAttrs {
                owner,
                chmod,
                tmp: &layers.tmp_dir(),
                unique: &unique,
                keep_owner,
            };
            filecopy::copy(source, entries, &target, &attrs)?;
            // nothing to copy (a wildcard that matched nothing, everything
            // excluded): the destination directory is still made
            if let Some(dir) = &empty_dir {
                let (uid, gid) = owner.unwrap_or((0, 0));
                target.mkdir_all(dir, uid, gid).map_err(StepError::Source)?;
            }
            Ok::<(), StepError>(())
        })
        .map_err(|e| StepError::Snapshot(e.into()))
        .and_then(|r| r)
    }

    /// How `ADD <url>` downloads: under the network a RUN step of the
    /// build gets by default (the same policy, the same entitlement
    /// check), with the registries' trust roots.
    fn fetcher(&self) -> Result<download::Fetcher, StepError> {
        let network =
            network::entitled_network(None, self.opts.network, self.opts.allow_network_host)?;
        let ca_files = match &self.opts.registry {
            Some(r) => r.config().ca_files.clone(),
            None => crate::registry::config::Config::load(&[])?.ca_files,
        };
        let dir = download::download_dir(self.opts.state.root()).map_err(StepError::Source)?;
        Ok(download::Fetcher {
            network,
            ca_files,
            limit: self.opts.add_max_size,
            dir,
        })
    }
}
