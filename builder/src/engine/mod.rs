//! The build engine: a Dockerfile plan in, an image out.
//!
//! Every step of every needed stage is a vertex with a content-addressed
//! cache key (see [`cache`]); stages whose inputs are ready run at the same
//! time on tokio, and at most `jobs` steps execute at once. A step is born
//! in the frontend, keyed here, given a filesystem by the snapshotter
//! (`Snapshotter::prepare`), run by the runtime ([`exec`]) or filled by
//! [`copy`], and turned into a layer by the snapshotter's diff
//! (`Snapshotter::commit`).

pub mod download;
pub mod emulation;
pub mod exec;
pub mod filecopy;
pub mod fsutil;
pub mod image_state;
pub mod parallel;
pub mod progress;
pub mod remote_cache;
pub mod run_mounts;
pub mod statcache;
pub mod step_cache;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::diff::DiffOptions;
use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::{Descriptor, Digest, MediaType};
use serde_json::json;
use tokio::sync::{watch, Semaphore};

use self::image_state::{History, ImageState, LayerRef};
use self::progress::Progress;
use self::step_cache::{Cache, Key, KeyBuilder};
use crate::frontend::dockerignore::Matcher;
use crate::frontend::instructions::{Instruction, NetworkMode};
use crate::frontend::plan::SourceRef;
use crate::frontend::{self, Base, Plan, PlanOptions, Platform, Stage, Step};

/// Comment BuildKit puts on every history entry it writes.
const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// Errors of a build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Frontend(#[from] frontend::Error),
    #[error("cannot pull the base image: {0}")]
    Pull(Box<crate::registry::Error>),
    #[error("cannot read the Dockerfile {path}: {source}")]
    Dockerfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("build context {path} is not a readable directory: {source}")]
    Context {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the build context's ignore file: {0}; nothing was sent")]
    Ignore(#[source] frontend::dockerignore::DockerignoreError),
    #[error("{file}:{line}: {instruction}: {source}")]
    Step {
        file: String,
        line: usize,
        instruction: String,
        source: Box<StepError>,
    },
    #[error("base image {0:?} is not in kiln's image store: pull it with `kiln pull NAME`, or add it with `kiln load -i FILE` or `kiln import DIR -t NAME`")]
    BaseNotFound(String),
    #[error("image {0:?} is not in kiln's image store, and the build runs with --network=none, which pulls nothing: pull it first with `kiln pull NAME`")]
    BaseNotFoundOffline(String),
    #[error("--cache-from type=registry,ref={0}: the build runs with --network=none, which fetches nothing (drop one of the two)")]
    CacheFromOffline(String),
    #[error("base image {name:?}: {source}")]
    Image {
        name: String,
        source: Box<crate::image::store::Error>,
    },
    #[error("FROM --build-context {name}: {source}")]
    Layout {
        name: String,
        source: Box<crate::image::archive::Error>,
    },
    #[error("base image {name:?} has a malformed {what}")]
    BadBase { name: String, what: &'static str },
    #[error("cannot open kiln's state directory: {0}")]
    State(Box<kiln_snapshotter::snapshot::Error>),
    #[error("cache directory: {0}")]
    Cache(std::io::Error),
    #[error(transparent)]
    CacheIo(remote_cache::Error),
    #[error("cache mounts: {0}")]
    CacheMounts(Box<crate::image::cache_mounts::Error>),
    #[error("cannot store the image: {0}")]
    Store(Box<kiln_snapshotter::content::Error>),
    #[error("cannot keep the image's blobs from garbage collection: {0}")]
    Lease(Box<kiln_snapshotter::layers::Error>),
    #[error("a layer of the image was removed by a concurrent `kiln prune` or `kiln rmi` before the image was stored; build again")]
    Collected,
    #[error("a build task failed: {0}")]
    Join(String),
    #[error("FROM --build-context {name}={spec}: a base must be a directory, docker-image://REF or oci-layout://DIR[:TAG|@DIGEST]")]
    ContextBase { name: String, spec: String },
}

/// Errors of one step; wrapped with its location by [`Error::Step`].
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Run(#[from] exec::Error),
    #[error(transparent)]
    Copy(#[from] filecopy::Error),
    #[error(transparent)]
    Snapshot(#[from] kiln_snapshotter::snapshot::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot resolve --chown {spec:?}: {source}")]
    Chown {
        spec: String,
        source: kiln_runtime::Error,
    },
    #[error("cannot open the source files: {0}")]
    Source(std::io::Error),
    #[error("the named build context's ignore file: {0}")]
    Ignore(#[source] frontend::dockerignore::DockerignoreError),
    #[error(transparent)]
    Mounts(#[from] run_mounts::Error),
    #[error(transparent)]
    Emulation(#[from] emulation::Error),
    #[error(transparent)]
    Registries(#[from] crate::registry::config::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The network a process of the build gets: `requested` (a step's
/// `RUN --network`), else the build's `--network`. The one network policy
/// check of the build: every path that starts a process for a build asks
/// here, and the whole plan is checked before any step runs.
///
/// The build's network is a ceiling, in the order none < sandbox < host: a
/// step may lower it, never raise it, so `kiln build --network none` means
/// no step touches a network whatever the Dockerfile says. `host` needs the
/// network.host entitlement (`--allow network.host`), for the build's
/// network as for a step's; under a `sandbox` build the entitlement is
/// what lets a `RUN --network=host` through, as in BuildKit, where it is
/// the only way to the host's network.
pub fn entitled_network(
    requested: Option<NetworkMode>,
    build_default: kiln_runtime::Network,
    allow_network_host: bool,
) -> std::result::Result<kiln_runtime::Network, StepError> {
    use kiln_runtime::Network;
    let allow_host_loopback = match build_default {
        Network::Sandbox {
            allow_host_loopback,
        } => allow_host_loopback,
        _ => false,
    };
    let raised = |what: &str| {
        StepError::Unsupported(format!(
            "RUN --network={what} cannot raise the build's network: the build runs with --network=none, so no step may use a network (drop --network=none, or the step's --network)"
        ))
    };
    Ok(match requested {
        None | Some(NetworkMode::Default) => {
            if build_default == Network::Host && !allow_network_host {
                return Err(StepError::Unsupported(
                    "--network=host needs the network.host entitlement: start the build with --allow network.host".into(),
                ));
            }
            build_default
        }
        Some(NetworkMode::Host) => {
            if build_default == Network::None {
                return Err(raised("host"));
            }
            if !allow_network_host {
                return Err(StepError::Unsupported(
                    "RUN --network=host needs the network.host entitlement: start the build with --allow network.host".into(),
                ));
            }
            Network::Host
        }
        Some(NetworkMode::None) => Network::None,
        Some(NetworkMode::Sandbox) => {
            if build_default == Network::None {
                return Err(raised("sandbox"));
            }
            Network::Sandbox {
                allow_host_loopback,
            }
        }
    })
}

/// The network policy of the whole plan, checked before any step runs
/// (and before any base image is pulled): every RUN's network against the
/// build's ([`entitled_network`]), and no `ADD <url>` under a build without
/// a network.
fn check_network_policy(
    plan: &frontend::Plan,
    file: &str,
    network: kiln_runtime::Network,
    allow_network_host: bool,
) -> Result<()> {
    for stage in &plan.stages {
        for step in &stage.steps {
            let err = match &step.instruction {
                Instruction::Run(run) => {
                    entitled_network(run.network, network, allow_network_host).err()
                }
                Instruction::Add(add)
                    if network == kiln_runtime::Network::None
                        && add.sources.iter().any(filecopy::is_url) =>
                {
                    Some(StepError::Unsupported(
                        "ADD of a URL downloads, and the build runs with --network=none: no network is allowed (drop --network=none, or download the file into the context)".into(),
                    ))
                }
                _ => None,
            };
            if let Some(e) = err {
                return Err(Error::Step {
                    file: file.to_string(),
                    line: step.line,
                    instruction: step.original.clone(),
                    source: Box::new(e),
                });
            }
        }
    }
    Ok(())
}

/// What `kiln build` was asked to do.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    pub build_args: BTreeMap<String, String>,
    /// `--build-context NAME=SOURCE`
    pub named_contexts: BTreeMap<String, String>,
    pub target: Option<String>,
    pub no_cache: bool,
    pub no_cache_filter: Vec<String>,
    pub jobs: usize,
    pub state: crate::image::StateDir,
    pub backend: Option<BackendKind>,
    pub network: kiln_runtime::Network,
    pub allow_network_host: bool,
    /// `--add-host NAME:IP`, in order
    pub extra_hosts: Vec<(String, std::net::IpAddr)>,
    /// `--add-max-size`: the largest file `ADD <url>` downloads
    pub add_max_size: u64,
    /// SOURCE_DATE_EPOCH: config and history times
    pub source_date_epoch: Option<i64>,
    /// clamp layer file times to SOURCE_DATE_EPOCH
    pub rewrite_timestamp: bool,
    /// `--secret` and `--ssh`
    pub session: Arc<crate::session::Session>,
    /// `--cache-to`
    pub cache_to: Vec<remote_cache::Export>,
    /// `--cache-from`
    pub cache_from: Vec<remote_cache::Import>,
    /// pulls `FROM` images missing from the store; `None`: never pull
    pub registry: Option<crate::registry::Registry>,
    /// `--platform` (TARGETPLATFORM); the host's when None
    pub platform: Option<Platform>,
}

/// What the builds of one `kiln build --platform A,B` share: job slots,
/// vertex numbers, and one lock per step key, so a step that two platforms
/// need identically (a `FROM --platform=$BUILDPLATFORM` stage) runs once
/// and the other build takes it from the cache.
pub struct Shared {
    slots: Semaphore,
    vertex: AtomicUsize,
    keys: Mutex<BTreeMap<String, Arc<Mutex<()>>>>,
    /// label steps with their platform (several platforms are built)
    label_platform: bool,
}

impl Shared {
    /// Slots for `jobs` steps at once across every platform's build.
    pub fn new(jobs: usize, label_platform: bool) -> Arc<Self> {
        Arc::new(Shared {
            slots: Semaphore::new(jobs.max(1)),
            vertex: AtomicUsize::new(1),
            keys: Mutex::new(BTreeMap::new()),
            label_platform,
        })
    }

    /// The lock of one step key; hold it from the cache lookup until the
    /// result is recorded.
    fn key_lock(&self, key: &Key) -> Arc<Mutex<()>> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(keys.entry(key.0.clone()).or_default())
    }
}

/// A built image, stored in the content store.
#[derive(Clone)]
pub struct Built {
    /// the snapshotter holding the image (and the build's lease)
    pub snap: Arc<Snapshotter>,
    pub manifest: Descriptor,
    pub config_digest: Digest,
    pub state: ImageState,
    /// RUN steps that executed (not cached)
    pub executed: usize,
    pub cached: usize,
    /// every step's key and resulting state, for `--cache-to`
    pub trail: Vec<(Key, ImageState)>,
}

/// What a COPY or ADD asks for, whichever of the two it is.
struct CopyOp<'a> {
    sources: &'a [crate::frontend::instructions::Source],
    dest: &'a str,
    chown: Option<&'a str>,
    chmod: Option<&'a crate::frontend::instructions::Chmod>,
    parents: bool,
    excludes: &'a [String],
    /// ADD: extract local tar archives
    unpack: bool,
    /// ADD --checksum of a URL source (`sha256:<hex>`)
    checksum: Option<&'a str>,
    /// ADD --unpack=true, which would extract a downloaded archive
    unpack_urls: bool,
}

/// Where a `COPY --from` reads: a stage or image result, or a local
/// directory given with `--build-context NAME=DIR`.
#[derive(Clone)]
pub enum FromSource {
    Image(Key, Box<ImageState>),
    Dir { name: String, path: PathBuf },
}

/// A finished stage: its last key and state.
type StageResult = Option<std::result::Result<(Key, ImageState), String>>;

struct Engine {
    snap: Arc<Snapshotter>,
    cache: Cache,
    progress: Arc<Progress>,
    opts: BuildOptions,
    plan: Plan,
    context: fsutil::Root,
    ignore: Matcher,
    /// checksums of the context's and named contexts' files, by directory
    stat_caches: Mutex<BTreeMap<PathBuf, Arc<statcache::StatCache>>>,
    cache_mounts: crate::image::cache_mounts::CacheMounts,
    redactor: Arc<crate::session::secrets::Redactor>,
    /// `--cache-from` records, looked up when a key misses locally
    imported: remote_cache::Imported,
    /// every step's key and resulting state, for `--cache-to`
    trail: std::sync::Mutex<Vec<(Key, ImageState)>>,
    file: String,
    shared: Arc<Shared>,
    executed: AtomicUsize,
    cached: AtomicUsize,
    results: BTreeMap<usize, watch::Receiver<StageResult>>,
}

fn now_or_epoch(epoch: Option<i64>) -> String {
    let secs = epoch.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
            .unwrap_or(0)
    });
    progress::format_rfc3339(secs, 0)
}

/// Load a base image from the local image store: its key, state (config,
/// history, layers) and unpacked chain.
fn load_base(
    snap: &Arc<Snapshotter>,
    registry: Option<&crate::registry::Registry>,
    name: &str,
    platform: &Platform,
) -> Result<(Key, ImageState)> {
    let want = crate::image::Platform {
        os: platform.os.clone(),
        architecture: platform.architecture.clone(),
        variant: platform.variant.clone(),
    };
    let store = crate::image::ImageStore::new(snap).with_platform(want.clone());
    let image = match (store.resolve(name), registry) {
        // not stored: pull it (on a runtime worker, where unpacking may
        // block in place), then resolve again
        (Err(crate::image::store::Error::NotFound(_)), Some(reg)) => {
            let (snap2, reg, n, p) = (snap.clone(), reg.clone(), name.to_string(), want.clone());
            let handle = tokio::runtime::Handle::current();
            handle
                .block_on(handle.spawn(async move {
                    let store = crate::image::ImageStore::new(&snap2).with_platform(p.clone());
                    reg.pull(&store, &n, &p).await.map(|_| ())
                }))
                .map_err(|e| {
                    Error::Pull(Box::new(crate::registry::Error::Task {
                        reference: name.to_string(),
                        reason: e.to_string(),
                    }))
                })?
                .map_err(|e| Error::Pull(Box::new(e)))?;
            store.resolve(name)
        }
        (r, _) => r,
    };
    let image = image.map_err(|e| match e {
        crate::image::store::Error::NotFound(_) => Error::BaseNotFound(name.to_string()),
        other => Error::Image {
            name: name.to_string(),
            source: Box::new(other),
        },
    })?;
    image_base(&store, &image, name, platform)
}

/// The image store choosing `platform`'s manifest from an index.
fn store_for<'s>(snap: &'s Snapshotter, platform: &Platform) -> crate::image::ImageStore<'s> {
    crate::image::ImageStore::new(snap).with_platform(crate::image::store::Platform {
        os: platform.os.clone(),
        architecture: platform.architecture.clone(),
        variant: platform.variant.clone(),
    })
}

/// A base from `--build-context NAME=oci-layout://DIR[:TAG|@DIGEST]`: the
/// layout's image is loaded into the store (its blobs are content-addressed,
/// so loading twice is cheap), then used like any stored image.
fn load_layout_base(
    snap: &Snapshotter,
    name: &str,
    layout: &str,
    platform: &Platform,
) -> Result<(Key, ImageState)> {
    let store = store_for(snap, platform);
    let (dir, selector) = crate::image::archive::parse_layout_ref(layout);
    let image = crate::image::archive::load_layout_dir(&store, &dir, &selector).map_err(|e| {
        Error::Layout {
            name: format!("{name}=oci-layout://{layout}"),
            source: Box::new(e),
        }
    })?;
    image_base(&store, &image, name, platform)
}

/// The key and starting state of a stage whose base is `image`.
fn image_base(
    store: &crate::image::ImageStore<'_>,
    image: &crate::image::store::Image,
    name: &str,
    platform: &Platform,
) -> Result<(Key, ImageState)> {
    let config: serde_json::Value =
        serde_json::from_slice(&image.config_bytes).map_err(|_| Error::BadBase {
            name: name.into(),
            what: "config",
        })?;
    let (chain, _warnings) = store.unpack(image).map_err(|e| Error::Image {
        name: name.to_string(),
        source: Box::new(e),
    })?;
    let mut state = ImageState::from_image_config(
        &config,
        Platform {
            os: config["os"].as_str().unwrap_or(&platform.os).to_string(),
            architecture: config["architecture"]
                .as_str()
                .unwrap_or(&platform.architecture)
                .to_string(),
            variant: config["variant"].as_str().map(String::from),
        },
    );
    state.chain = chain.map(|c| c.to_string());
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    state.layers = image
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| LayerRef {
            diff_id: d.as_str().unwrap_or_default().to_string(),
            digest: l.digest().to_string(),
            size: l.size(),
            media_type: l.media_type().to_string(),
            stored_plain: false,
        })
        .collect();
    let mut key = KeyBuilder::new("image");
    key.str(image.manifest_descriptor.digest().as_ref());
    Ok((key.finish(), state))
}

/// The ONBUILD triggers of a base image as planned steps, expanded against
/// the image's environment and working directory.
fn onbuild_steps(state: &ImageState, file: &str) -> Result<Vec<Step>> {
    const BASE: &str = "kiln-onbuild-base";
    let mut text = format!("FROM {BASE}\n");
    for t in &state.config.onbuild {
        text.push_str(t);
        text.push('\n');
    }
    let ast = frontend::parse(
        text.as_bytes(),
        &format!("{file} (ONBUILD triggers of the base image)"),
    )?;
    let mut opts = PlanOptions::default();
    opts.image_env.insert(BASE.into(), state.env_pairs());
    opts.image_workdir
        .insert(BASE.into(), state.config.workdir.clone());
    let plan = frontend::plan(&ast, &opts)?;
    Ok(plan
        .stages
        .into_iter()
        .next()
        .map(|s| s.steps)
        .unwrap_or_default())
}

/// The step that makes a directory `--build-context NAME=DIR` the root
/// filesystem of a stage based on it: `COPY --from=NAME / /`.
fn context_root_step(name: &str, source: &str, file: &str) -> Result<Step> {
    const BASE: &str = "kiln-context-base";
    let text = format!("FROM {BASE}\nCOPY --from={name} / /\n");
    let ast = frontend::parse(
        text.as_bytes(),
        &format!("{file} (FROM --build-context {name})"),
    )?;
    let mut opts = PlanOptions::default();
    opts.named_contexts.insert(name.into(), source.into());
    let plan = frontend::plan(&ast, &opts)?;
    plan.stages
        .into_iter()
        .next()
        .and_then(|s| s.steps.into_iter().next())
        .ok_or_else(|| Error::ContextBase {
            name: name.into(),
            spec: source.into(),
        })
}

/// Build `opts` with progress reported to `progress`.
pub async fn build(opts: BuildOptions, progress: Arc<Progress>) -> Result<Built> {
    let shared = Shared::new(opts.jobs, false);
    build_shared(opts, progress, shared).await
}

/// Build `opts` once per platform, at the same time; steps identical
/// across platforms run once (see [`Shared`]). Results in `platforms`
/// order.
pub async fn build_platforms(
    opts: BuildOptions,
    platforms: &[Platform],
    progress: Arc<Progress>,
) -> Result<Vec<(Platform, Built)>> {
    let shared = Shared::new(opts.jobs, platforms.len() > 1);
    let mut tasks = Vec::new();
    for p in platforms {
        let opts = BuildOptions {
            platform: Some(p.clone()),
            ..opts.clone()
        };
        let (progress, shared) = (Arc::clone(&progress), Arc::clone(&shared));
        tasks.push(tokio::spawn(build_shared(opts, progress, shared)));
    }
    let mut out = Vec::new();
    let mut first_error = None;
    for (task, p) in tasks.into_iter().zip(platforms) {
        match task.await {
            Ok(Ok(b)) => out.push((p.clone(), b)),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::Join(e.to_string()));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if platforms.len() > 1 {
        // one cache for every platform: the records of each build (keys
        // differ by platform, so nothing collides)
        for to in opts
            .cache_to
            .iter()
            .filter(|t| **t != remote_cache::Export::Inline)
        {
            let mut seen = std::collections::BTreeSet::new();
            let records: Vec<remote_cache::Record> = out
                .iter()
                .flat_map(|(_, b)| remote_cache::select(&b.trail, &b.state, to.mode()))
                // a native stage shared by the platforms is recorded once
                .filter(|r| seen.insert(r.key.clone()))
                .collect();
            let snap = &out[0].1.snap;
            export_cache(snap, opts.registry.as_ref(), to, &records, &progress).await?;
        }
    }
    Ok(out)
}

async fn build_shared(
    opts: BuildOptions,
    progress: Arc<Progress>,
    shared: Arc<Shared>,
) -> Result<Built> {
    let started = Instant::now();
    let text = std::fs::read(&opts.dockerfile).map_err(|source| Error::Dockerfile {
        path: opts.dockerfile.clone(),
        source,
    })?;
    let file = opts
        .dockerfile
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "Dockerfile".into());
    let ast = frontend::parse(&text, &file)?;
    let backend = match opts.backend {
        Some(b) => b,
        None => kiln_snapshotter::backend::probe::probe(opts.state.root()),
    };
    let snap = Arc::new(
        Snapshotter::open(&opts.state.snapshotter_root(), backend)
            .map_err(|e| Error::State(Box::new(e)))?,
    );

    // Plan once to learn the base images, then again with their
    // environment and working directory (variables may come from them).
    let mut plan_opts = PlanOptions {
        build_args: opts.build_args.clone(),
        named_contexts: opts.named_contexts.clone(),
        target: opts.target.clone(),
        target_platform: opts.platform.clone(),
        ..PlanOptions::default()
    };
    let first = frontend::plan(&ast, &plan_opts)?;
    check_network_policy(&first, &file, opts.network, opts.allow_network_host)?;
    if opts.network == kiln_runtime::Network::None {
        if let Some(remote_cache::Import::Registry { reference }) = opts
            .cache_from
            .iter()
            .find(|c| matches!(c, remote_cache::Import::Registry { .. }))
        {
            return Err(Error::CacheFromOffline(reference.to_string()));
        }
    }
    let mut bases = BTreeMap::new();
    for stage in &first.stages {
        if let Base::Image { reference } = &stage.base {
            // one base name may be loaded for two platforms (a
            // `FROM --platform=$BUILDPLATFORM` stage beside the target's)
            let base_key = (reference.clone(), stage.platform.clone());
            if let std::collections::btree_map::Entry::Vacant(slot) = bases.entry(base_key) {
                // --network=none: nothing is fetched on the build's behalf
                let offline = opts.network == kiln_runtime::Network::None;
                let registry = opts.registry.as_ref().filter(|_| !offline);
                let loaded = tokio::task::block_in_place(|| {
                    load_base(&snap, registry, reference, &stage.platform)
                })
                .map_err(|e| match e {
                    Error::BaseNotFound(name) if offline => Error::BaseNotFoundOffline(name),
                    e => e,
                })?;
                plan_opts
                    .image_env
                    .insert(reference.clone(), loaded.1.env_pairs());
                plan_opts
                    .image_workdir
                    .insert(reference.clone(), loaded.1.config.workdir.clone());
                slot.insert(loaded);
            }
        }
    }
    let plan = frontend::plan(&ast, &plan_opts)?;
    for w in &plan.warnings {
        let at = w.line.map(|l| format!("{file}:{l}: ")).unwrap_or_default();
        progress.summary(&format!("WARNING: {at}{}", w.message));
    }

    let context = fsutil::Root::open(&opts.context).map_err(|source| Error::Context {
        path: opts.context.clone(),
        source,
    })?;
    let ignore =
        frontend::dockerignore::load(&opts.context, &opts.dockerfile).map_err(Error::Ignore)?;
    let cache = Cache::open(&opts.state.cache_dir()).map_err(Error::Cache)?;
    let cache_mounts =
        crate::image::cache_mounts::CacheMounts::open(&opts.state.cache_mounts_dir())
            .map_err(|e| Error::CacheMounts(Box::new(e)))?;
    let redactor = Arc::new(opts.session.secrets.redactor());
    let mut imported = remote_cache::Imported::default();
    for from in &opts.cache_from {
        match from {
            remote_cache::Import::Local { src } => {
                // A missing or broken cache is a warning: the build runs
                // its steps instead (BuildKit does the same).
                match tokio::task::block_in_place(|| remote_cache::read_local(src)) {
                    Ok(config) => imported.add(
                        config,
                        Box::new(remote_cache::LayoutBlobs { dir: src.clone() }),
                    ),
                    Err(e) => progress.summary(&format!("WARNING: --cache-from: {e}")),
                }
            }
            remote_cache::Import::Registry { reference } => {
                let Some(registry) = opts.registry.as_ref() else {
                    return Err(Error::CacheIo(remote_cache::Error::Spec {
                        dir: "from",
                        spec: format!("type=registry,ref={reference}"),
                        why: "this build has no registry client".into(),
                    }));
                };
                let read = match crate::image::reference::Reference::parse(reference) {
                    Ok(r) => remote_cache::read_registry(registry, snap.content(), reference)
                        .await
                        .map(|config| (config, r)),
                    Err(e) => Err(remote_cache::Error::Format {
                        place: reference.clone(),
                        why: e.to_string(),
                    }),
                };
                match read {
                    Ok((config, r)) => imported.add(
                        config,
                        Box::new(remote_cache::RegistryBlobs {
                            registry: registry.clone(),
                            reference: r,
                            handle: tokio::runtime::Handle::current(),
                        }),
                    ),
                    Err(e) => progress.summary(&format!("WARNING: --cache-from: {e}")),
                }
            }
        }
    }

    // One watch channel per stage carries its result to the stages that
    // need it.
    let mut senders = BTreeMap::new();
    let mut results = BTreeMap::new();
    for stage in &plan.stages {
        let (tx, rx) = watch::channel(None);
        senders.insert(stage.index, tx);
        results.insert(stage.index, rx);
    }
    let engine = Arc::new(Engine {
        snap,
        cache,
        progress: Arc::clone(&progress),
        shared,
        opts,
        plan,
        context,
        ignore,
        stat_caches: Mutex::new(BTreeMap::new()),
        cache_mounts,
        redactor,
        imported,
        trail: std::sync::Mutex::new(Vec::new()),
        file,
        executed: AtomicUsize::new(0),
        cached: AtomicUsize::new(0),
        results,
    });
    let bases = Arc::new(bases);
    let mut tasks = Vec::new();
    for stage in engine.plan.stages.clone() {
        let engine = Arc::clone(&engine);
        let bases = Arc::clone(&bases);
        let tx = senders.remove(&stage.index).expect("a sender per stage");
        tasks.push(tokio::spawn(async move {
            let r = engine.build_stage(&stage, &bases).await;
            let _ = tx.send(Some(
                r.as_ref().map(|v| v.clone()).map_err(|e| e.to_string()),
            ));
            r
        }));
    }
    let mut target = None;
    let mut first_error = None;
    for (task, stage) in tasks.into_iter().zip(engine.plan.stages.iter()) {
        match task.await {
            Ok(Ok(result)) if stage.index == engine.plan.target => target = Some(result),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::Join(e.to_string()));
            }
        }
    }
    engine.save_stat_caches();
    if let Some(e) = first_error {
        return Err(e);
    }
    let (_, state) =
        target.ok_or_else(|| Error::Join("the target stage produced no result".into()))?;
    let trail = engine.trail.lock().map(|t| t.clone()).unwrap_or_default();
    // `type=inline` goes into this image's config; the other exports are
    // made here for one platform, and once, merged, by build_platforms for
    // several (they would overwrite one another)
    let mut inline = None;
    for to in &engine.opts.cache_to {
        if *to == remote_cache::Export::Inline {
            inline = Some(remote_cache::select(
                &trail,
                &state,
                remote_cache::Mode::Min,
            ));
        } else if !engine.shared.label_platform {
            let records = remote_cache::select(&trail, &state, to.mode());
            export_cache(
                &engine.snap,
                engine.opts.registry.as_ref(),
                to,
                &records,
                &progress,
            )
            .await?;
        }
    }
    let built = tokio::task::block_in_place(|| engine.store_image(state, inline))?;
    let label = match &engine.opts.platform {
        Some(p) if engine.shared.label_platform => format!("[{p}] "),
        _ => String::new(),
    };
    progress.summary(&format!(
        "{label}built {} in {:.1}s: {} steps run, {} cached",
        built.manifest.digest(),
        started.elapsed().as_secs_f64(),
        engine.executed.load(Ordering::Relaxed),
        engine.cached.load(Ordering::Relaxed)
    ));
    Ok(Built {
        executed: engine.executed.load(Ordering::Relaxed),
        cached: engine.cached.load(Ordering::Relaxed),
        trail,
        ..built
    })
}

/// Write one `--cache-to` (not `type=inline`, which lives in the image).
async fn export_cache(
    snap: &Arc<Snapshotter>,
    registry: Option<&crate::registry::Registry>,
    to: &remote_cache::Export,
    records: &[remote_cache::Record],
    progress: &Progress,
) -> Result<()> {
    if matches!(to, remote_cache::Export::Inline) {
        return Ok(());
    }
    // plain layers go as their gzip variants, as a push sends them
    let records =
        &tokio::task::block_in_place(|| remote_cache::compressed(snap.content(), records))
            .map_err(Error::CacheIo)?;
    let place = match to {
        remote_cache::Export::Local { dest, .. } => {
            tokio::task::block_in_place(|| remote_cache::export_local(snap, records, dest))
                .map_err(Error::CacheIo)?;
            dest.display().to_string()
        }
        remote_cache::Export::Registry { reference, .. } => {
            let registry = registry.ok_or_else(|| {
                Error::CacheIo(remote_cache::Error::Spec {
                    dir: "to",
                    spec: format!("type=registry,ref={reference}"),
                    why: "this build has no registry client".into(),
                })
            })?;
            let store = crate::image::ImageStore::new(snap);
            remote_cache::export_registry(registry, &store, records, reference)
                .await
                .map_err(Error::CacheIo)?;
            reference.clone()
        }
        remote_cache::Export::Inline => return Ok(()),
    };
    progress.summary(&format!(
        "exported {} cache records to {place}",
        records.len()
    ));
    Ok(())
}

impl Engine {
    /// The stat cache of a context directory (the build's or a named one).
    fn stat_cache(&self, dir: &Path) -> Arc<statcache::StatCache> {
        let mut caches = self.stat_caches.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(caches.entry(dir.to_path_buf()).or_insert_with(|| {
            Arc::new(statcache::StatCache::open(
                &self.opts.state.stat_cache_dir(),
                dir,
            ))
        }))
    }

    /// Keep what the stat caches learned for the next build; a cache that
    /// cannot be written only costs that build the hashing again.
    fn save_stat_caches(&self) {
        let caches = self.stat_caches.lock().unwrap_or_else(|e| e.into_inner());
        for cache in caches.values() {
            if let Err(e) = cache.save() {
                self.progress
                    .summary(&format!("WARNING: cannot save the stat cache: {e}"));
            }
        }
    }
    /// An image by name, from the store, else pulled; never pulled under
    /// `--network none`, where nothing is fetched on the build's behalf.
    fn load_image(&self, reference: &str, platform: &Platform) -> Result<(Key, ImageState)> {
        let offline = self.opts.network == kiln_runtime::Network::None;
        let registry = self.opts.registry.as_ref().filter(|_| !offline);
        load_base(&self.snap, registry, reference, platform).map_err(|e| match e {
            Error::BaseNotFound(name) if offline => Error::BaseNotFoundOffline(name),
            e => e,
        })
    }

    /// How `ADD <url>` downloads: under the network a RUN step of the
    /// build gets by default (the same policy, the same entitlement
    /// check), with the registries' trust roots.
    fn fetcher(&self) -> std::result::Result<download::Fetcher, StepError> {
        let network = entitled_network(None, self.opts.network, self.opts.allow_network_host)?;
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

    fn step_error(&self, step: &Step, e: StepError) -> Error {
        Error::Step {
            file: self.file.clone(),
            line: step.line,
            instruction: step.original.clone(),
            source: Box::new(e),
        }
    }

    /// What `--build-context NAME=SOURCE` gives a `COPY --from=NAME`: a
    /// local directory, or `docker-image://REF` from the local store.
    fn context_source(
        &self,
        name: &str,
        source: &str,
        platform: &Platform,
    ) -> std::result::Result<FromSource, StepError> {
        if let Some(reference) = source.strip_prefix("docker-image://") {
            let (k, st) = self
                .load_image(reference, platform)
                .map_err(|e| StepError::Unsupported(e.to_string()))?;
            return Ok(FromSource::Image(k, Box::new(st)));
        }
        if source.contains("://") {
            return Err(StepError::Unsupported(format!(
                "--build-context {name}={source}: only local directories and docker-image:// are supported yet"
            )));
        }
        let path = std::path::absolute(source).map_err(StepError::Source)?;
        if !path.is_dir() {
            return Err(StepError::Unsupported(format!(
                "--build-context {name}={source}: not a directory"
            )));
        }
        Ok(FromSource::Dir {
            name: name.to_string(),
            path,
        })
    }

    async fn stage_result(&self, index: usize) -> Result<(Key, ImageState)> {
        let mut rx = self
            .results
            .get(&index)
            .cloned()
            .ok_or_else(|| Error::Join(format!("stage {index} is not in the plan")))?;
        let value = rx
            .wait_for(|v| v.is_some())
            .await
            .map_err(|e| Error::Join(e.to_string()))?;
        match value.as_ref() {
            Some(Ok(r)) => Ok(r.clone()),
            Some(Err(e)) => Err(Error::Join(format!("stage {index} failed: {e}"))),
            None => Err(Error::Join("no result".into())),
        }
    }

    fn no_cache_for(&self, stage: &Stage) -> bool {
        self.opts.no_cache
            || self
                .opts
                .no_cache_filter
                .iter()
                .any(|f| stage.name.as_deref() == Some(f.as_str()) || f == &stage.index.to_string())
    }

    async fn build_stage(
        self: &Arc<Self>,
        stage: &Stage,
        bases: &BTreeMap<(String, Platform), (Key, ImageState)>,
    ) -> Result<(Key, ImageState)> {
        let mut dir_root: Option<Step> = None;
        let (mut key, mut state) = match &stage.base {
            Base::Scratch => {
                let mut k = KeyBuilder::new("scratch");
                k.str(&stage.platform.to_string());
                (k.finish(), ImageState::scratch(stage.platform.clone()))
            }
            Base::Image { reference } => bases
                .get(&(reference.clone(), stage.platform.clone()))
                .cloned()
                .ok_or_else(|| Error::BaseNotFound(reference.clone()))?,
            Base::Stage { index } => self.stage_result(*index).await?,
            Base::Context { name, source } => {
                let platform = stage.platform.clone();
                if let Some(reference) = source.strip_prefix("docker-image://") {
                    tokio::task::block_in_place(|| self.load_image(reference, &platform))?
                } else if let Some(layout) = source.strip_prefix("oci-layout://") {
                    tokio::task::block_in_place(|| {
                        load_layout_base(&self.snap, name, layout, &platform)
                    })?
                } else if source.contains("://") {
                    return Err(Error::ContextBase {
                        name: name.clone(),
                        spec: source.clone(),
                    });
                } else {
                    // A directory is the stage's root filesystem, as one
                    // layer (as BuildKit does): scratch plus a COPY of the
                    // whole context, so it is keyed, cached and filtered by
                    // the context's .dockerignore like COPY --from=NAME.
                    dir_root = Some(context_root_step(name, source, &self.file)?);
                    let mut k = KeyBuilder::new("scratch");
                    k.str(&stage.platform.to_string());
                    (k.finish(), ImageState::scratch(stage.platform.clone()))
                }
            }
        };
        // ONBUILD triggers of a base image run first, in this stage, with
        // this build's context; the resulting image does not inherit them.
        // (Triggers of an earlier stage are inserted by the frontend.)
        let from_image =
            matches!(stage.base, Base::Image { .. } | Base::Context { .. }) && dir_root.is_none();
        let triggers = if from_image && !state.config.onbuild.is_empty() {
            let t = onbuild_steps(&state, &self.file)?;
            state.config.onbuild.clear();
            t
        } else {
            Vec::new()
        };
        let steps: Vec<&Step> = dir_root
            .iter()
            .chain(triggers.iter())
            .chain(stage.steps.iter())
            .collect();
        let total = steps.len();
        let stage_name = stage
            .name
            .clone()
            .unwrap_or_else(|| stage.index.to_string());
        for (i, step) in steps.into_iter().enumerate() {
            if state.apply_config(&step.instruction) {
                let mut k = KeyBuilder::new("config");
                k.str(&key.0)
                    .str(&serde_json::to_string(&step.instruction).unwrap_or_default());
                key = k.finish();
                if !matches!(step.instruction, Instruction::Arg(_)) {
                    // Config-only steps take the time of the step before
                    // them, so a rebuild from cache gives the same image.
                    let created = state
                        .history
                        .last()
                        .and_then(|h| h.created.clone())
                        .or_else(|| Some(now_or_epoch(self.opts.source_date_epoch)));
                    state.history.push(History {
                        created_by: step.original.clone(),
                        empty_layer: true,
                        comment: Some(HISTORY_COMMENT.into()),
                        created,
                    });
                }
                continue;
            }
            let vertex = self.shared.vertex.fetch_add(1, Ordering::Relaxed);
            // BuildKit shows a step's platform when several are built; an
            // emulated RUN says so, since it runs several times slower.
            let emulated = matches!(step.instruction, Instruction::Run(_))
                && !emulation::is_native(&state.platform);
            let label = if emulated {
                format!("[{}, emulated] ", state.platform)
            } else if self.shared.label_platform {
                format!("[{}] ", state.platform)
            } else {
                String::new()
            };
            let name = format!("{label}[{stage_name} {}/{total}] {}", i + 1, step.original);
            let (k, s) = self
                .run_step(stage, step, &key, &state, vertex, &name)
                .await?;
            key = k;
            state = s;
        }
        Ok((key, state))
    }

    async fn run_step(
        self: &Arc<Self>,
        stage: &Stage,
        step: &Step,
        key: &Key,
        state: &ImageState,
        vertex: usize,
        name: &str,
    ) -> Result<(Key, ImageState)> {
        // Sources of COPY --from and RUN --mount from=: a stage's result,
        // an image or a named context. Waited for before taking a job
        // slot, so a waiting step never holds one.
        let wants_sources = match &step.instruction {
            Instruction::Copy(c) => c.from.is_some(),
            Instruction::Run(_) => true,
            _ => false,
        };
        let mut from = Vec::new();
        if wants_sources {
            for source in &step.sources {
                let step_err = |e| self.step_error(step, e);
                from.push(match source {
                    SourceRef::Stage { index } => {
                        let (k, st) = self.stage_result(*index).await?;
                        FromSource::Image(k, Box::new(st))
                    }
                    SourceRef::Image { reference } => {
                        let (k, st) = tokio::task::block_in_place(|| {
                            self.load_image(reference, &stage.platform)
                        })?;
                        FromSource::Image(k, Box::new(st))
                    }
                    SourceRef::Context { name, source } => self
                        .context_source(name, source, &stage.platform)
                        .map_err(step_err)?,
                });
            }
        }
        let _slot = self
            .shared
            .slots
            .acquire()
            .await
            .map_err(|e| Error::Join(e.to_string()))?;
        let no_cache = self.no_cache_for(stage);
        let started = Instant::now();
        let this = Arc::clone(self);
        let (step_c, key_c, state_c, name_c) =
            (step.clone(), key.clone(), state.clone(), name.to_string());
        let result = tokio::task::spawn_blocking(move || {
            this.step_blocking(&step_c, &key_c, &state_c, &from, vertex, &name_c, no_cache)
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?;
        match result {
            Ok((k, s, was_cached)) => {
                if let Ok(mut t) = self.trail.lock() {
                    t.push((k.clone(), s.clone()));
                }
                if was_cached {
                    self.cached.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.progress.done(vertex, started.elapsed().as_secs_f64());
                }
                Ok((k, s))
            }
            Err(e) => {
                self.progress.error(vertex, &e.to_string());
                Err(self.step_error(step, e))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step_blocking(
        &self,
        step: &Step,
        key: &Key,
        state: &ImageState,
        from: &[FromSource],
        vertex: usize,
        name: &str,
        no_cache: bool,
    ) -> std::result::Result<(Key, ImageState, bool), StepError> {
        let mut k = KeyBuilder::new("step");
        k.str(&key.0)
            .str(&serde_json::to_string(&step.instruction).unwrap_or_default());
        let chain: Option<Digest> = state.chain.as_ref().and_then(|c| c.parse().ok());
        let mut new_state = state.clone();
        match &step.instruction {
            Instruction::Run(run) => {
                if run.security == Some(crate::frontend::instructions::SecurityMode::Insecure) {
                    return Err(StepError::Unsupported(
                        "RUN --security=insecure is not allowed: kiln never runs a step privileged"
                            .into(),
                    ));
                }
                let network =
                    entitled_network(run.network, self.opts.network, self.opts.allow_network_host)?;
                let workdir = step.workdir.clone().unwrap_or_else(|| {
                    if state.config.workdir.is_empty() {
                        "/".into()
                    } else {
                        state.config.workdir.clone()
                    }
                });
                let mut args: Vec<(String, String)> = step.args.clone();
                args.extend(
                    self.plan
                        .proxy_args
                        .iter()
                        .map(|(a, b)| (a.clone(), b.clone())),
                );
                for (a, b) in &step.args {
                    k.str(a).str(b);
                }
                k.str(&workdir).str(&format!("{network:?}"));
                // what a step's /etc/hosts says can change what it builds
                for (name, ip) in &self.opts.extra_hosts {
                    k.str(&format!("add-host {name} {ip}"));
                }
                let context_cache = self.stat_cache(&self.opts.context);
                let resources = run_mounts::Resources {
                    snap: &self.snap,
                    context: &self.context,
                    ignore: &self.ignore,
                    stat_cache: &context_cache,
                    secrets: &self.opts.session.secrets,
                    agents: &self.opts.session.agents,
                    cache_mounts: &self.cache_mounts,
                    confinement: self.confinement(),
                };
                run_mounts::key_inputs(&run.mounts, from, &resources, &mut k)?;
                let key = k.finish();
                let lock = self.shared.key_lock(&key);
                let _same_step = lock.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(hit) = self.lookup(&key, no_cache) {
                    self.progress.cached(vertex, name);
                    return Ok((key, hit, true));
                }
                // checked before the step starts: a missing qemu or an old
                // kernel fails here with what to install
                let emulators = emulation::emulators_for(&state.platform)?;
                self.progress.started(vertex, name);
                let view = self
                    .snap
                    .prepare(&step_cache::view_key("run", &key), chain.as_ref())?;
                let ran = (|| {
                    let mut mounted =
                        run_mounts::mount(view.path(), &run.mounts, from, &resources)?;
                    let spec = exec::RunSpec {
                        run,
                        state,
                        args: &args,
                        workdir: &workdir,
                        network,
                        extra_hosts: &self.opts.extra_hosts,
                        vertex,
                        mounts: std::mem::take(&mut mounted.spec_mounts),
                        private: std::mem::take(&mut mounted.private),
                        env: std::mem::take(&mut mounted.env),
                        redactor: Arc::clone(&self.redactor),
                        emulators,
                    };
                    let r = exec::run(view.path(), spec, &self.progress);
                    for warning in mounted.stop_agents() {
                        self.progress.log(vertex, 2, &warning);
                    }
                    // mount stubs go before the layer is made
                    drop(mounted);
                    r.map_err(StepError::from)
                })();
                if let Err(e) = ran {
                    let _ = self.snap.remove(view);
                    return Err(e);
                }
                self.executed.fetch_add(1, Ordering::Relaxed);
                self.commit(view, &mut new_state, exec::created_by(run, state), vertex)?;
                self.record(&key, &new_state);
                Ok((key, new_state, false))
            }
            Instruction::Copy(c) => self.copy_step(
                step,
                &CopyOp {
                    sources: &c.sources,
                    dest: &c.dest,
                    chown: c.chown.as_deref(),
                    chmod: c.chmod.as_ref(),
                    parents: c.parents,
                    excludes: &c.excludes,
                    unpack: false,
                    checksum: None,
                    unpack_urls: false,
                },
                k,
                state,
                from.first(),
                vertex,
                name,
                no_cache,
            ),
            Instruction::Add(a) => {
                filecopy::check_local(&a.sources)?;
                self.copy_step(
                    step,
                    &CopyOp {
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
                    },
                    k,
                    state,
                    None,
                    vertex,
                    name,
                    no_cache,
                )
            }
            other => Err(StepError::Unsupported(format!(
                "{} is not supported by the build engine yet",
                serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v["instruction"].as_str().map(String::from))
                    .unwrap_or_default()
            ))),
        }
    }

    /// COPY and ADD: resolve the sources, key the step by exactly the
    /// content they copy, and copy it into a new layer.
    #[allow(clippy::too_many_arguments)]
    fn copy_step(
        &self,
        step: &Step,
        op: &CopyOp<'_>,
        mut k: KeyBuilder,
        state: &ImageState,
        from: Option<&FromSource>,
        vertex: usize,
        name: &str,
        no_cache: bool,
    ) -> std::result::Result<(Key, ImageState, bool), StepError> {
        let chain: Option<Digest> = state.chain.as_ref().and_then(|c| c.parse().ok());
        let mut new_state = state.clone();
        let source_view;
        let source_root;
        let dir_ignore;
        let dir_cache;
        let (root, what, ignore, stat_cache) = match from {
            Some(FromSource::Dir { name, path }) => {
                k.str("context").str(name);
                source_root = fsutil::Root::open(path).map_err(StepError::Source)?;
                dir_ignore = frontend::dockerignore::load(path, &path.join("Dockerfile"))
                    .map_err(StepError::Ignore)?;
                dir_cache = self.stat_cache(path);
                (
                    &source_root,
                    "named build context",
                    Some(&dir_ignore),
                    Some(&*dir_cache),
                )
            }
            Some(FromSource::Image(from_key, from_state)) => {
                k.str(&from_key.0);
                let from_chain: Option<Digest> =
                    from_state.chain.as_ref().and_then(|c| c.parse().ok());
                source_view = self
                    .snap
                    .view(&step_cache::view_key("from", from_key), from_chain.as_ref())?;
                source_root = fsutil::Root::open(source_view.path()).map_err(StepError::Source)?;
                (&source_root, "source stage", None, None)
            }
            None => {
                dir_cache = self.stat_cache(&self.opts.context);
                (
                    &self.context,
                    "build context",
                    Some(&self.ignore),
                    Some(&*dir_cache),
                )
            }
        };
        let excludes = Matcher::new(op.excludes.iter())
            .map_err(|_| StepError::Copy(filecopy::Error::Pattern(op.excludes.join(","))))?;
        let chmod = op.chmod.map(filecopy::Mode::parse).transpose()?;
        let source = filecopy::Source {
            root,
            what,
            ignore,
            stat_cache,
        };
        let workdir = step.workdir.clone().unwrap_or_else(|| {
            if state.config.workdir.is_empty() {
                "/".to_string()
            } else {
                state.config.workdir.clone()
            }
        });
        let dest = if op.dest.starts_with('/') {
            op.dest.to_string()
        } else {
            format!("{}/{}", workdir.trim_end_matches('/'), op.dest)
        };
        // Whether the destination is a directory depends on the image;
        // decided on the unpacked layers. `.` and `x/.` name directories.
        let dest_is_dir = op.dest.ends_with('/')
            || op.dest == "."
            || op.dest.ends_with("/.")
            || self.is_dir_in_chain(chain.as_ref(), &dest);
        let rules = filecopy::Rules {
            excludes: &excludes,
            parents: op.parents,
            unpack: op.unpack,
        };
        // ADD of URLs: downloaded by this process, never in the sandbox.
        let (urls, locals): (Vec<_>, Vec<_>) =
            op.sources.iter().cloned().partition(filecopy::is_url);
        if op.sources.len() > 1 && !dest_is_dir && !urls.is_empty() {
            return Err(filecopy::Error::DestNotDir(op.dest.to_string()).into());
        }
        let t = Instant::now();
        let mut entries = source.collect(&locals, &dest, dest_is_dir, &rules)?;
        self.progress
            .phase(vertex, &format!("list {} sources", entries.len()), t);
        let t = Instant::now();
        let hashed = source.checksum(&entries, &mut k)?;
        self.progress
            .phase(vertex, &format!("checksum {}", progress::bytes(hashed)), t);
        let dest_rel = PathBuf::from(dest.trim_start_matches('/'));
        // (url, destination, download when already fetched)
        let mut remote = Vec::new();
        for u in &urls {
            let crate::frontend::instructions::Source::Path(url) = u else {
                continue;
            };
            if op.unpack_urls {
                return Err(filecopy::Error::Remote {
                    url: url.clone(),
                    kind: "an archive from a URL with --unpack",
                }
                .into());
            }
            let to = if dest_is_dir {
                dest_rel.join(filecopy::url_file_name(url))
            } else {
                dest_rel.clone()
            };
            // With --checksum the checksum is the key: a hit needs no
            // download. Without it the content digest is, as BuildKit does.
            let download = match op.checksum {
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
            k.str("url").str(&to.to_string_lossy());
            remote.push((url.clone(), to, download));
        }
        k.str(op.chown.unwrap_or(""))
            .str(&format!("{:?}", op.chmod))
            .str(&dest);
        let key = k.finish();
        let lock = self.shared.key_lock(&key);
        let _same_step = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = self.lookup(&key, no_cache) {
            self.progress.cached(vertex, name);
            return Ok((key, hit, true));
        }
        self.progress.started(vertex, name);
        for (url, to, download) in remote {
            let d = match download {
                Some(d) => d,
                None => self.fetcher()?.fetch(&url)?,
            };
            if let Some(sum) = op.checksum {
                d.verify(&url, sum)?;
            }
            entries.push(d.into_entry(to));
        }
        let view = self
            .snap
            .prepare(&step_cache::view_key("copy", &key), chain.as_ref())?;
        // The copy reads the context (attacker-shaped trees) and writes the
        // view: on a thread Landlock keeps to the context, the named
        // context read, and the state directory.
        let mut rules = self.confinement();
        if let Some(FromSource::Dir { path, .. }) = from {
            rules = rules.read(path);
        }
        let view_path = view.path().to_path_buf();
        let t = Instant::now();
        let copied = kiln_snapshotter::confine::run_confined(
            kiln_snapshotter::confine::Component::ContextCopy,
            &rules,
            || {
                let target = fsutil::Root::open(&view_path).map_err(StepError::Source)?;
                let owner = match op.chown {
                    Some(spec) => {
                        Some(filecopy::chown_ids(&view_path, spec).map_err(|source| {
                            StepError::Chown {
                                spec: spec.to_string(),
                                source,
                            }
                        })?)
                    }
                    None => None,
                };
                let layers = self.snap.layers();
                let unique = || layers.unique("add");
                let attrs = filecopy::CopyAttrs {
                    owner,
                    chmod,
                    tmp: &layers.tmp_dir(),
                    unique: &unique,
                };
                filecopy::copy(&source, &entries, &target, &attrs)?;
                Ok::<(), StepError>(())
            },
        )
        .map_err(|e| StepError::Snapshot(e.into()))
        .and_then(|r| r);
        if let Err(e) = copied {
            let _ = self.snap.remove(view);
            return Err(e);
        }
        self.progress.phase(vertex, "copy", t);
        self.commit(
            view,
            &mut new_state,
            format!("{} # buildkit", step.original),
            vertex,
        )?;
        self.record(&key, &new_state);
        Ok((key, new_state, false))
    }

    /// Whether `path` is a directory in the layer chain `chain`, looked up
    /// in the unpacked layers (topmost first) without mounting a view.
    fn is_dir_in_chain(&self, chain: Option<&Digest>, path: &str) -> bool {
        let Some(chain) = chain else { return false };
        let Ok(dirs) = self.snap.layers().chain_dirs(chain) else {
            return false;
        };
        let rel = Path::new(path.trim_start_matches('/'));
        for dir in dirs {
            if let Ok(root) = fsutil::Root::open(&dir) {
                if let Ok(meta) = root.lstat(rel) {
                    return meta.is_dir();
                }
            }
        }
        false
    }

    fn lookup(&self, key: &Key, no_cache: bool) -> Option<ImageState> {
        if no_cache {
            return None;
        }
        // a record whose layers or blobs were collected is a miss
        if let Some(hit) = self.cache.lookup(key, &self.snap) {
            return Some(hit);
        }
        if self.imported.is_empty() {
            return None;
        }
        match self.imported.materialize(key, &self.cache, &self.snap) {
            Ok(hit) => hit,
            Err(e) => {
                // a broken imported cache costs a rebuild of the step
                self.progress
                    .summary(&format!("WARNING: --cache-from: {e}"));
                None
            }
        }
    }

    /// Landlock rules for host-side work on build inputs: the state
    /// directory read-write, the build context read-only.
    fn confinement(&self) -> kiln_snapshotter::confine::Rules {
        self.snap
            .confinement()
            .write(self.opts.state.root())
            .read(&self.opts.context)
    }

    fn record(&self, key: &Key, state: &ImageState) {
        // A cache record that cannot be written only costs a rebuild.
        let _ = self.cache.put(key, state);
    }

    fn commit(
        &self,
        view: kiln_snapshotter::snapshot::View,
        state: &mut ImageState,
        created_by: String,
        vertex: usize,
    ) -> std::result::Result<(), StepError> {
        let t = Instant::now();
        let epoch = if self.opts.rewrite_timestamp {
            self.opts.source_date_epoch
        } else {
            None
        };
        // plain tar: no step waits for a compressor; outputs that leave
        // the store compress what they send (kiln_snapshotter::variants)
        let committed = self.snap.commit(
            view,
            DiffOptions {
                source_date_epoch: epoch,
                compression: kiln_snapshotter::Compression::None,
            },
        )?;
        self.progress.phase(
            vertex,
            &format!("layer diff {}", progress::bytes(committed.blob.size())),
            t,
        );
        state.chain = Some(committed.chain_id.to_string());
        state.layers.push(LayerRef {
            diff_id: committed.diff_id.to_string(),
            digest: committed.blob.digest().to_string(),
            size: committed.blob.size(),
            media_type: committed.blob.media_type().to_string(),
            stored_plain: false,
        });
        let created = Some(now_or_epoch(self.opts.source_date_epoch));
        state.history.push(History {
            created_by,
            empty_layer: false,
            comment: Some(HISTORY_COMMENT.into()),
            created,
        });
        Ok(())
    }

    /// Write config and manifest blobs for `state`.
    /// Store the image `state` describes; with `inline`, its config also
    /// carries those cache records (`--cache-to type=inline`).
    fn store_image(
        &self,
        state: ImageState,
        inline: Option<Vec<remote_cache::Record>>,
    ) -> Result<Built> {
        // The image is as old as its newest step (or SOURCE_DATE_EPOCH), so
        // a rebuild from cache is byte-identical.
        let created = match self.opts.source_date_epoch {
            Some(e) => progress::format_rfc3339(e, 0),
            None => state
                .history
                .last()
                .and_then(|h| h.created.clone())
                .unwrap_or_else(|| now_or_epoch(None)),
        };
        let mut config = state.config_json(&created);
        if let Some(records) = inline {
            config[remote_cache::INLINE_KEY] =
                serde_json::to_value(remote_cache::CacheConfig { records })
                    .map_err(|e| Error::Join(e.to_string()))?;
        }
        let content = self.snap.content();
        // Blobs written here are leased before GC may run again, and the
        // layers' blobs are leased and checked: a concurrent `kiln prune`
        // must not leave a stored image pointing at collected blobs.
        let _no_gc = self
            .snap
            .layers()
            .gc_guard(false)
            .map_err(|e| Error::Lease(Box::new(e)))?;
        if !step_cache::keep_for_build(&state, &self.snap) {
            return Err(Error::Collected);
        }
        let lease = |d: &Digest| {
            self.snap
                .lease()
                .add_blob(d)
                .map_err(|e| Error::Lease(Box::new(e)))
        };
        let config_bytes = serde_json::to_vec(&config).map_err(|e| Error::Join(e.to_string()))?;
        let config_desc = content
            .put_bytes(MediaType::ImageConfig, &config_bytes)
            .map_err(|e| Error::Store(Box::new(e)))?;
        lease(config_desc.digest())?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_desc.digest().to_string(), "size": config_desc.size()},
            "layers": state.layers.iter().map(|l| json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
        });
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| Error::Join(e.to_string()))?;
        let manifest_desc = content
            .put_bytes(MediaType::ImageManifest, &manifest_bytes)
            .map_err(|e| Error::Store(Box::new(e)))?;
        lease(manifest_desc.digest())?;
        Ok(Built {
            snap: Arc::clone(&self.snap),
            manifest: manifest_desc,
            config_digest: config_desc.digest().clone(),
            state,
            executed: 0,
            cached: 0,
            trail: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_runtime::Network;

    const SANDBOX: Network = Network::Sandbox {
        allow_host_loopback: false,
    };

    #[test]
    fn a_step_cannot_raise_itself_to_host_without_the_entitlement() {
        assert!(entitled_network(Some(NetworkMode::Host), SANDBOX, false).is_err());
        assert_eq!(
            entitled_network(Some(NetworkMode::Host), SANDBOX, true).unwrap(),
            Network::Host
        );
        // the build-level --network=host goes through the same check
        assert!(entitled_network(None, Network::Host, false).is_err());
        assert!(entitled_network(Some(NetworkMode::Default), Network::Host, false).is_err());
        assert_eq!(
            entitled_network(None, Network::Host, true).unwrap(),
            Network::Host
        );
    }

    #[test]
    fn default_means_the_build_network_and_lower_modes_need_nothing() {
        assert_eq!(entitled_network(None, SANDBOX, false).unwrap(), SANDBOX);
        assert_eq!(
            entitled_network(Some(NetworkMode::Default), Network::None, false).unwrap(),
            Network::None
        );
        assert_eq!(
            entitled_network(Some(NetworkMode::None), Network::Host, true).unwrap(),
            Network::None
        );
        let allowed = Network::Sandbox {
            allow_host_loopback: true,
        };
        assert_eq!(
            entitled_network(Some(NetworkMode::Sandbox), allowed, false).unwrap(),
            allowed
        );
    }

    #[test]
    fn the_build_network_is_a_ceiling_no_step_raises() {
        // under --network=none nothing may use a network, entitled or not
        for allow in [false, true] {
            for mode in [NetworkMode::Sandbox, NetworkMode::Host] {
                let e = entitled_network(Some(mode), Network::None, allow).unwrap_err();
                assert!(e.to_string().contains("--network=none"), "{e}");
            }
        }
        // a sandbox build lowers to none; host only with the entitlement
        assert_eq!(
            entitled_network(Some(NetworkMode::None), SANDBOX, false).unwrap(),
            Network::None
        );
        assert!(entitled_network(Some(NetworkMode::Host), SANDBOX, false).is_err());
        // a host build lowers to sandbox
        assert_eq!(
            entitled_network(Some(NetworkMode::Sandbox), Network::Host, true).unwrap(),
            SANDBOX
        );
    }
}
