//! The build engine: a Dockerfile plan in, an image out.
//!
//! Every step of every needed stage is a vertex with a content-addressed
//! cache key; stages whose inputs are ready run at the same time on tokio,
//! and at most `jobs` steps execute at once. The path of a step:
//!
//! - born in the [`crate::frontend`] (parsed, variables expanded, planned
//!   into stages);
//! - scheduled by the [`solver`], which starts each stage from its base
//!   ([`bases`]), waits for the stages and images a step reads, and takes a
//!   job slot;
//! - keyed by its op ([`ops`]: [`ops::run`], [`ops::copy`],
//!   [`ops::config`]), each with one function saying what goes into its key,
//!   and looked up in the [`step_cache`] (and the `--cache-from` records of
//!   [`remote_cache`]);
//! - on a miss, given a writable view by the snapshotter
//!   (`Snapshotter::prepare`), then for RUN its mounts ([`run_mounts`]) and a
//!   sandboxed process ([`exec`], [`emulation`] for foreign platforms), for
//!   COPY/ADD the files ([`filecopy`], [`download`], [`statcache`]);
//! - diffed into a layer and added to the [`image_state`] ([`commit`]);
//! - at the end, stored as an image config and manifest ([`commit`]), then
//!   exported by [`crate::image`].
//!
//! Also here: the build's network policy ([`network`]), its errors
//! ([`error`]), progress output ([`progress`]), and the host-side file
//! access helpers ([`fsutil`], [`parallel`]).

pub mod bases;
pub mod commit;
pub mod download;
pub mod emulation;
pub mod error;
pub mod exec;
pub mod filecopy;
pub mod fsutil;
pub mod git;
pub mod image_state;
pub mod network;
pub mod ops;
pub mod parallel;
pub mod progress;
pub mod remote_cache;
pub mod run_mounts;
pub mod solver;
pub mod statcache;
pub mod step_cache;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::{Descriptor, Digest};

pub use self::error::{Error, Result, StepError};
use self::image_state::ImageState;
pub use self::network::entitled_network;
use self::progress::Progress;
pub use self::solver::Shared;
use self::step_cache::Key;
use crate::frontend::Platform;

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
    /// `--label K=V`: set on the image's config, as LABEL in the target
    /// stage, without a history entry (the steps' keys do not include them)
    pub labels: BTreeMap<String, String>,
    /// `--pull`: a FROM name with a tag is resolved against its registry
    /// even when the store has it (a digest-pinned one never is)
    pub pull: bool,
    /// `--shm-size`: /dev/shm of RUN steps, in bytes
    pub shm_size: Option<u64>,
    /// `--ulimit` and kiln.toml's `[limits]`: resource limits of RUN
    /// steps, part of their keys
    pub ulimits: Vec<kiln_runtime::spec::Rlimit>,
    /// kiln's own rlimit defaults (no core dumps, nproc) for the kinds the
    /// above leaves out: applied, not keyed
    pub default_ulimits: Vec<kiln_runtime::spec::Rlimit>,
    /// `--check`: lint every stage, not only those built
    pub check: bool,
    /// `--step-timeout` and `--timeout`
    pub time_limits: exec::TimeLimits,
    /// `--memory`, `--pids-limit`, `--cpus`: each RUN step in a cgroup of
    /// its own under the delegated one
    pub step_cgroups: Option<Arc<kiln_runtime::cgroup::StepCgroups>>,
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

/// Where a `COPY --from` reads: a stage or image result, or a local
/// directory given with `--build-context NAME=DIR`.
#[derive(Clone)]
pub enum FromSource {
    Image(Key, Box<ImageState>),
    Dir { name: String, path: PathBuf },
}

/// `kiln build --check`: plan the build (base images loaded, nothing
/// run) and return the build checks' findings for every stage, in
/// [`Progress::take_lint`]; the error is a Dockerfile that does not plan
/// or a `# check=error=true` violation.
pub async fn check(opts: &BuildOptions, progress: &Arc<Progress>) -> Result<()> {
    let shared = Shared::new(opts.jobs, false);
    solver::plan(opts, progress, &shared).map(|_| ())
}

/// `kiln build --call outline`: plan the build (base images loaded,
/// nothing run) and outline its target.
pub async fn outline(
    opts: &BuildOptions,
    progress: &Arc<Progress>,
) -> Result<crate::frontend::outline::Outline> {
    let shared = Shared::new(opts.jobs, false);
    let planned = solver::plan(opts, progress, &shared)?;
    Ok(crate::frontend::outline::outline(
        &planned.ast,
        &planned.plan,
        &opts.build_args,
        &planned.source,
    ))
}

/// Build `opts` with progress reported to `progress`.
pub async fn build(opts: BuildOptions, progress: Arc<Progress>) -> Result<Built> {
    let shared = Shared::new(opts.jobs, false);
    solver::build_shared(opts, progress, shared).await
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
        tasks.push(tokio::spawn(solver::build_shared(opts, progress, shared)));
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
                first_error.get_or_insert(Error::Task(e));
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
            let mut seen = BTreeSet::new();
            let records: Vec<remote_cache::Record> = out
                .iter()
                .flat_map(|(_, b)| remote_cache::select(&b.trail, &b.state, to.mode()))
                // a native stage shared by the platforms is recorded once
                .filter(|r| seen.insert(r.key.clone()))
                .collect();
            let snap = &out[0].1.snap;
            remote_cache::export(snap, opts.registry.as_ref(), to, &records, &progress)
                .await
                .map_err(Error::CacheIo)?;
        }
    }
    Ok(out)
}
