//! The solver: plans a build, starts every stage at once on tokio (a stage
//! waits only for the stages and images it reads), walks each stage's
//! steps, and for each step takes a job slot, holds the step key's lock,
//! and asks the op ([`super::ops`]) for its key, a cache hit, or a run.
//!
//! It owns scheduling and cache lookups; what a step does, and what goes
//! into its key, is the op's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_snapshotter::snapshot::Snapshotter;
use tokio::sync::{watch, Semaphore};

use super::bases::{self, Bases};
use super::error::{Error, Result, StepError};
use super::image_state::ImageState;
use super::ops::{self, StepCtx};
use super::progress::Progress;
use super::step_cache::{Cache, Key};
use super::{emulation, network, remote_cache, statcache, BuildOptions, Built, FromSource};
use crate::engine::fsutil;
use crate::frontend::dockerignore::Matcher;
use crate::frontend::instructions::Instruction;
use crate::frontend::plan::SourceRef;
use crate::frontend::{self, Plan, PlanOptions, Stage, Step};

/// What the builds of one `kiln build --platform A,B` share: job slots,
/// vertex numbers, and one lock per step key, so a step that two platforms
/// need identically (a `FROM --platform=$BUILDPLATFORM` stage) runs once
/// and the other build takes it from the cache.
pub struct Shared {
    slots: Semaphore,
    vertex: AtomicUsize,
    keys: Mutex<BTreeMap<String, Arc<Mutex<()>>>>,
    /// label steps with their platform (several platforms are built)
    pub(super) label_platform: bool,
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

    /// A new progress vertex number.
    pub(super) fn next_vertex(&self) -> usize {
        self.vertex.fetch_add(1, Ordering::Relaxed)
    }

    /// The lock of one step key; hold it from the cache lookup until the
    /// result is recorded.
    pub(super) fn key_lock(&self, key: &Key) -> Arc<Mutex<()>> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(keys.entry(key.0.clone()).or_default())
    }
}

/// A finished stage: its last key and state.
type StageResult = Option<std::result::Result<(Key, ImageState), String>>;

/// One platform's build in progress: its inputs, the plan, and the
/// results of its stages as they finish.
pub(super) struct Engine {
    pub(super) snap: Arc<Snapshotter>,
    pub(super) cache: Cache,
    pub(super) progress: Arc<Progress>,
    pub(super) opts: BuildOptions,
    pub(super) plan: Plan,
    pub(super) context: fsutil::Root,
    pub(super) ignore: Matcher,
    /// checksums of the context's and named contexts' files, by directory
    stat_caches: Mutex<BTreeMap<std::path::PathBuf, Arc<statcache::StatCache>>>,
    pub(super) cache_mounts: crate::image::cache_mounts::CacheMounts,
    pub(super) redactor: Arc<crate::session::secrets::Redactor>,
    /// `--cache-from` records, looked up when a key misses locally
    imported: remote_cache::Imported,
    /// every step's key and resulting state, for `--cache-to`
    trail: Mutex<Vec<(Key, ImageState)>>,
    /// the trail's content keys (ops::Keys): not in an inline cache, which
    /// is part of the image and so must not depend on whether a step hit
    /// by definition or ran
    content_keys: Mutex<std::collections::HashSet<Key>>,
    pub(super) file: String,
    pub(super) shared: Arc<Shared>,
    pub(super) executed: AtomicUsize,
    cached: AtomicUsize,
    results: BTreeMap<usize, watch::Receiver<StageResult>>,
    /// names this build's own cache mounts under --no-cache
    pub(super) build_token: String,
}

/// A running stage: its index and its task.
type StageTask = (usize, tokio::task::JoinHandle<Result<(Key, ImageState)>>);

/// The parsed and planned build, before anything runs.
pub(super) struct Planned {
    /// the Dockerfile as read, and parsed
    pub(super) source: Vec<u8>,
    pub(super) ast: frontend::Ast,
    pub(super) plan: Plan,
    bases: Bases,
}

/// The Dockerfile read, parsed and planned without its base images.
pub(super) struct FirstPlan {
    file: String,
    source: Vec<u8>,
    ast: frontend::Ast,
    snap: Arc<Snapshotter>,
    plan: Plan,
    plan_opts: PlanOptions,
}

/// Read and plan the Dockerfile: plan once to learn the base images, load
/// them, then plan again with their environment and working directory
/// (variables may come from them). The network policy is checked before
/// any base is pulled.
pub(super) fn plan(
    opts: &BuildOptions,
    progress: &Arc<Progress>,
    shared: &Shared,
) -> Result<Planned> {
    plan_rest(plan_first(opts, progress)?, opts, progress, shared)
}

/// Read, parse and plan the Dockerfile without its base images; the
/// network policy, devices and build checks are checked on that plan.
fn plan_first(opts: &BuildOptions, progress: &Arc<Progress>) -> Result<FirstPlan> {
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
    let plan_opts = PlanOptions {
        build_args: opts.build_args.clone(),
        named_contexts: opts.named_contexts.clone(),
        target: opts.target.clone(),
        target_platform: opts.platform.clone(),
        lint_all: opts.check,
        // a broken .dockerignore fails the build later, with its error
        ignore: frontend::dockerignore::load(&opts.context, &opts.dockerfile).ok(),
        ..PlanOptions::default()
    };
    let first = frontend::plan(&ast, &plan_opts).inspect_err(|_| {
        progress.add_lint(frontend::plan::findings_before_error(&ast, &plan_opts));
    })?;
    network::check_plan(&first, &file, opts.network, opts.allow_network_host)?;
    check_devices(&first, &file, progress)?;
    if opts.network == kiln_runtime::Network::None {
        if let Some(remote_cache::Import::Registry { reference }) = opts
            .cache_from
            .iter()
            .find(|c| matches!(c, remote_cache::Import::Registry { .. }))
        {
            return Err(Error::CacheFromOffline(reference.to_string()));
        }
    }
    Ok(FirstPlan {
        file,
        source: text,
        ast,
        snap,
        plan: first,
        plan_opts,
    })
}

/// Load the bases of the first plan (pulling what the store lacks) and
/// plan again with them.
fn plan_rest(
    first: FirstPlan,
    opts: &BuildOptions,
    progress: &Arc<Progress>,
    shared: &Shared,
) -> Result<Planned> {
    let FirstPlan {
        file,
        source,
        ast,
        snap,
        plan: first,
        mut plan_opts,
    } = first;
    let report = bases::Report { progress, shared };
    let mut bases = bases::load_bases(&snap, opts, &first, &mut plan_opts, report)?;
    let mut plan = frontend::plan(&ast, &plan_opts).inspect_err(|_| {
        progress.add_lint(frontend::plan::findings_before_error(&ast, &plan_opts));
    })?;
    // A base image's ONBUILD trigger may need another stage, which may
    // need images the first plan did not: load them and plan again.
    for _ in 0..4 {
        let missing = plan.stages.iter().any(|s| match &s.base {
            frontend::Base::Image { reference } => {
                !bases.contains_key(&(reference.clone(), s.platform.clone()))
            }
            _ => false,
        });
        if !missing {
            break;
        }
        let report = bases::Report { progress, shared };
        let more = bases::load_bases(&snap, opts, &plan, &mut plan_opts, report)?;
        bases.extend(more);
        plan = frontend::plan(&ast, &plan_opts)?;
    }
    // kiln's own notices now; the build checks' findings after the build,
    // as buildx shows them (once, for the first platform)
    for w in plan.warnings.iter().filter(|w| w.rule.is_none()) {
        let at = w.line.map(|l| format!("{file}:{l}: ")).unwrap_or_default();
        progress.summary(&format!("WARNING: {at}{}", w.message));
    }
    progress.add_lint(
        plan.warnings
            .iter()
            .filter(|w| w.rule.is_some())
            .cloned()
            .collect(),
    );
    if let Some(e) = plan.lint_error(&ast) {
        return Err(e.into());
    }
    Ok(Planned {
        source,
        ast,
        plan,
        bases,
    })
}

/// The stages of `plan` that need no base image, directly or through the
/// stage they are built on: they can start while the images are pulled
/// (a base image's environment cannot change how they are planned).
fn imageless_stages(plan: &Plan) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    // stages come dependencies first
    for s in &plan.stages {
        let free = match &s.base {
            frontend::Base::Scratch => true,
            frontend::Base::Context { source, .. } => !source.contains("://"),
            frontend::Base::Stage { index } => out.contains(index),
            frontend::Base::Image { .. } => false,
        };
        if free {
            out.insert(s.index);
        }
    }
    out
}

/// `RUN --device`: kiln gives a step no host device (a Dockerfile is not
/// trusted with the host's hardware, and there are no CDI specs), so a
/// required device fails the build before anything runs, and an optional
/// one is left out with a warning, as BuildKit leaves out an optional
/// device it does not have.
fn check_devices(plan: &Plan, file: &str, progress: &Progress) -> Result<()> {
    for step in plan.stages.iter().flat_map(|s| &s.steps) {
        let Instruction::Run(run) = &step.instruction else {
            continue;
        };
        for d in &run.devices {
            if d.required {
                return Err(Error::Step {
                    file: file.to_string(),
                    line: step.line,
                    end_line: step.end_line,
                    instruction: step.original.clone(),
                    source: Box::new(StepError::Device(d.name.clone())),
                });
            }
            progress.summary(&format!(
                "WARNING: {file}:{}: RUN --device={}: kiln gives steps no host devices; the step runs without it",
                step.line, d.name
            ));
        }
    }
    Ok(())
}

/// Build one platform's image; `shared` is what it shares with the builds
/// of other platforms started by the same `kiln build`.
pub(super) async fn build_shared(
    opts: BuildOptions,
    progress: Arc<Progress>,
    shared: Arc<Shared>,
) -> Result<Built> {
    let started = Instant::now();
    let first = plan_first(&opts, &progress)?;
    // a `# check=error=true` violation fails the build before anything
    // runs (the base images only add InvalidBaseImagePlatform)
    if let Some(e) = first.plan.lint_error(&first.ast) {
        progress.add_lint(
            first
                .plan
                .warnings
                .iter()
                .filter(|w| w.rule.is_some())
                .cloned()
                .collect(),
        );
        return Err(e.into());
    }
    let early = imageless_stages(&first.plan);
    let imported = remote_cache::import_all(
        &opts.cache_from,
        opts.registry.as_ref(),
        &first.snap,
        &progress,
    )
    .await
    .map_err(Error::CacheIo)?;
    // Every stage of the Dockerfile has a channel: the stages that need no
    // image start now, the others once the images are in and the plan
    // is made again with them.
    let count = first
        .ast
        .nodes
        .iter()
        .filter(|n| n.instruction == "from")
        .count();
    let (engine, mut senders) = Engine::new(
        opts.clone(),
        Arc::clone(&progress),
        Arc::clone(&shared),
        Arc::clone(&first.snap),
        first.plan.clone(),
        first.file.clone(),
        imported,
        (0..count).collect(),
    )?;
    let engine = Arc::new(engine);
    let target = first.plan.target;
    let early_stages: Vec<Stage> = first
        .plan
        .stages
        .iter()
        .filter(|s| early.contains(&s.index))
        .cloned()
        .collect();
    let mut tasks = engine.spawn_stages(early_stages, &Arc::new(Bases::new()), &mut senders);
    // the pulls and the second plan, off the build's async threads
    let rest = {
        let (opts, progress, shared) = (opts.clone(), Arc::clone(&progress), Arc::clone(&shared));
        tokio::task::spawn_blocking(move || plan_rest(first, &opts, &progress, &shared))
            .await
            .map_err(Error::Task)
            .and_then(|r| r)
    };
    let state = match rest {
        Ok(planned) => {
            let later: Vec<Stage> = planned
                .plan
                .stages
                .iter()
                .filter(|s| !early.contains(&s.index))
                .cloned()
                .collect();
            tasks.extend(engine.spawn_stages(later, &Arc::new(planned.bases), &mut senders));
            // a stage no plan needs has nothing to wait for
            drop(senders);
            Engine::collect(tasks, target).await
        }
        Err(e) => {
            // the stages already running end (one waiting for a stage that
            // will not run fails), then the plan's error is the build's
            drop(senders);
            let _ = Engine::collect(tasks, target).await;
            Err(e)
        }
    };
    engine.save_stat_caches();
    engine.remove_no_cache_mounts();
    engine.finish(state?, started).await
}

impl Engine {
    /// Remove the cache mounts this build made for its --no-cache steps
    /// (a failure only leaves them for `kiln prune`).
    fn remove_no_cache_mounts(&self) {
        let marker = super::run_mounts::no_cache_id("", &self.build_token);
        let Ok(usage) = self.cache_mounts.usage() else {
            return;
        };
        for u in usage.iter().filter(|u| u.id.ends_with(&marker)) {
            let _ = self.cache_mounts.remove(&u.instance);
        }
    }

    /// The build's state for `plan`, and one channel per stage (of
    /// `stage_indices`) that carries its result to the stages that need it.
    #[allow(clippy::too_many_arguments)]
    fn new(
        opts: BuildOptions,
        progress: Arc<Progress>,
        shared: Arc<Shared>,
        snap: Arc<Snapshotter>,
        plan: Plan,
        file: String,
        imported: remote_cache::Imported,
        stage_indices: Vec<usize>,
    ) -> Result<(Engine, BTreeMap<usize, watch::Sender<StageResult>>)> {
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
        let mut senders = BTreeMap::new();
        let mut results = BTreeMap::new();
        for index in stage_indices {
            let (tx, rx) = watch::channel(None);
            senders.insert(index, tx);
            results.insert(index, rx);
        }
        let engine = Engine {
            snap,
            cache,
            progress,
            shared,
            opts,
            plan,
            context,
            ignore,
            stat_caches: Mutex::new(BTreeMap::new()),
            build_token: format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ),
            cache_mounts,
            redactor,
            imported,
            trail: Mutex::new(Vec::new()),
            content_keys: Mutex::new(std::collections::HashSet::new()),
            file,
            executed: AtomicUsize::new(0),
            cached: AtomicUsize::new(0),
            results,
        };
        Ok((engine, senders))
    }

    /// Start `stages` at once, each sending its result on its channel
    /// (taken from `senders`).
    fn spawn_stages(
        self: &Arc<Self>,
        stages: Vec<Stage>,
        bases: &Arc<Bases>,
        senders: &mut BTreeMap<usize, watch::Sender<StageResult>>,
    ) -> Vec<StageTask> {
        let mut tasks = Vec::new();
        for stage in stages {
            let Some(tx) = senders.remove(&stage.index) else {
                continue;
            };
            let engine = Arc::clone(self);
            let bases = Arc::clone(bases);
            let index = stage.index;
            tasks.push((
                index,
                tokio::spawn(async move {
                    let r = engine.build_stage(&stage, &bases).await;
                    let _ = tx.send(Some(
                        r.as_ref()
                            .map(|v| v.clone())
                            .map_err(|e| crate::error_chain(&e)),
                    ));
                    r
                }),
            ));
        }
        tasks
    }

    /// Wait for every stage task; the state of stage `target`, or the
    /// first error.
    async fn collect(tasks: Vec<StageTask>, target: usize) -> Result<ImageState> {
        let mut out = None;
        let mut first_error = None;
        for (index, task) in tasks {
            match task.await {
                Ok(Ok((_, state))) if index == target => out = Some(state),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(Error::Task(e));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => out.ok_or(Error::NoTarget),
        }
    }

    /// Export the caches, store the image and say what was built.
    async fn finish(&self, mut state: ImageState, started: Instant) -> Result<Built> {
        state.config.labels.extend(self.opts.labels.clone());
        let trail = self.trail.lock().map(|t| t.clone()).unwrap_or_default();
        // `type=inline` goes into this image's config; the other exports are
        // made here for one platform, and once, merged, by build_platforms for
        // several (they would overwrite one another)
        let mut inline = None;
        for to in &self.opts.cache_to {
            if *to == remote_cache::Export::Inline {
                let content = self
                    .content_keys
                    .lock()
                    .map(|c| c.clone())
                    .unwrap_or_default();
                let by_definition: Vec<(Key, ImageState)> = trail
                    .iter()
                    .filter(|(k, _)| !content.contains(k))
                    .cloned()
                    .collect();
                inline = Some(remote_cache::select(
                    &by_definition,
                    &state,
                    remote_cache::Mode::Min,
                ));
            } else if !self.shared.label_platform {
                let records = remote_cache::select(&trail, &state, to.mode());
                remote_cache::export(
                    &self.snap,
                    self.opts.registry.as_ref(),
                    to,
                    &records,
                    &self.progress,
                )
                .await
                .map_err(Error::CacheIo)?;
            }
        }
        let built = tokio::task::block_in_place(|| self.store_image(state, inline))?;
        let label = match &self.opts.platform {
            Some(p) if self.shared.label_platform => format!("[{p}] "),
            _ => String::new(),
        };
        let (executed, cached) = (
            self.executed.load(Ordering::Relaxed),
            self.cached.load(Ordering::Relaxed),
        );
        self.progress.summary(&format!(
            "{label}built {} in {:.1}s: {executed} steps run, {cached} cached",
            built.manifest.digest(),
            started.elapsed().as_secs_f64(),
        ));
        Ok(Built {
            executed,
            cached,
            trail,
            ..built
        })
    }

    /// The stat cache of a context directory (the build's or a named one).
    pub(super) fn stat_cache(&self, dir: &Path) -> Arc<statcache::StatCache> {
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
                self.progress.summary(&format!(
                    "WARNING: cannot save the stat cache: {}",
                    crate::error_chain(&e)
                ));
            }
        }
    }

    fn step_error(&self, step: &Step, e: StepError) -> Error {
        Error::Step {
            file: self.file.clone(),
            line: step.line,
            end_line: step.end_line,
            instruction: step.original.clone(),
            source: Box::new(e),
        }
    }

    /// The result of stage `index`, once it has one.
    pub(super) async fn stage_result(&self, index: usize) -> Result<(Key, ImageState)> {
        let mut rx = self
            .results
            .get(&index)
            .cloned()
            .ok_or(Error::StageMissing(index))?;
        let value = rx
            .wait_for(|v| v.is_some())
            .await
            .map_err(|_| Error::StageLost(index))?;
        match value.as_ref() {
            Some(Ok(r)) => Ok(r.clone()),
            Some(Err(message)) => Err(Error::StageFailed {
                index,
                message: message.clone(),
            }),
            None => Err(Error::StageLost(index)),
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

    /// Walk a stage's steps: config-only steps change the state in place;
    /// every other step is scheduled with [`Engine::run_step`].
    async fn build_stage(
        self: &Arc<Self>,
        stage: &Stage,
        bases: &Bases,
    ) -> Result<(Key, ImageState)> {
        let (mut key, mut state, dir_root) = self.stage_base(stage, bases).await?;
        // ONBUILD triggers of a base image run first, in this stage, with
        // this build's context; the resulting image does not inherit them.
        // (Triggers of an earlier stage are inserted by the frontend.)
        // (A registry image's triggers are planned as the stage's first
        // steps, so they can name this Dockerfile's stages; an image named
        // by --build-context is loaded only now, its triggers planned here.)
        let from_image = matches!(
            stage.base,
            frontend::Base::Image { .. } | frontend::Base::Context { .. }
        ) && dir_root.is_none();
        // (planned with the Dockerfile when the plan knew the image)
        let planned = stage.steps.iter().any(|s| s.trigger);
        let triggers = match stage.base {
            frontend::Base::Context { .. }
                if from_image && !planned && !state.config.onbuild.is_empty() =>
            {
                bases::onbuild_steps(&state, &self.file)?
            }
            _ => Vec::new(),
        };
        if from_image {
            state.config.onbuild.clear();
        }
        let steps: Vec<&Step> = dir_root
            .iter()
            .chain(triggers.iter())
            .chain(stage.steps.iter())
            .collect();
        // as BuildKit numbers them: an image's FROM is step 1 (its pull),
        // scratch and a stage are none; an unnamed stage is `stage-N`
        let from_step = usize::from(from_image);
        let total = steps.len() + from_step;
        let stage_name = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", stage.index));
        for (i, step) in steps.into_iter().enumerate() {
            if let Some(k) = ops::config::apply(step, &key, &mut state, self.opts.source_date_epoch)
            {
                key = k;
                continue;
            }
            let vertex = self.shared.next_vertex();
            let name = format!(
                "{}[{stage_name} {}/{total}] {}",
                self.step_label(step, &state),
                i + 1 + from_step,
                self.display_command(step, &state)
            );
            (key, state) = self
                .run_step(stage, step, &key, &state, vertex, &name)
                .await?;
        }
        Ok((key, state))
    }

    /// How progress names a step: a RUN as BuildKit names it, with the
    /// variables set at that point expanded and those a secret mount sets
    /// shown as `****` (the name says where the value comes from, never
    /// the value); other instructions as written.
    fn display_command(&self, step: &Step, state: &ImageState) -> String {
        let Instruction::Run(run) = &step.instruction else {
            return step.original.clone();
        };
        let mut env: BTreeMap<String, String> = step.args.iter().cloned().collect();
        env.extend(state.env_pairs());
        for m in &run.mounts {
            if let frontend::mount_flags::Mount::Secret {
                env: Some(name), ..
            } = m
            {
                env.insert(name.clone(), "****".into());
            }
        }
        frontend::shell::Lexer::display_command(self.plan.escape, &step.original, &env)
    }

    /// BuildKit shows a step's platform when several are built; an
    /// emulated RUN says so, since it runs several times slower.
    fn step_label(&self, step: &Step, state: &ImageState) -> String {
        let emulated = matches!(step.instruction, Instruction::Run(_))
            && !emulation::is_native(&state.platform);
        if emulated {
            format!("[{}, emulated] ", state.platform)
        } else if self.shared.label_platform {
            format!("[{}] ", state.platform)
        } else {
            String::new()
        }
    }

    /// What a step reads besides its own stage: the results of
    /// `COPY --from` and `RUN --mount from=` (a stage, an image or a named
    /// context), waited for before the step takes a job slot.
    async fn step_sources(&self, stage: &Stage, step: &Step) -> Result<Vec<FromSource>> {
        let wants_sources = match &step.instruction {
            Instruction::Copy(c) => c.from.is_some(),
            Instruction::Run(_) => true,
            _ => false,
        };
        let mut from = Vec::new();
        if !wants_sources {
            return Ok(from);
        }
        for source in &step.sources {
            from.push(match source {
                SourceRef::Stage { index } => {
                    let (k, st) = self.stage_result(*index).await?;
                    FromSource::Image(k, Box::new(st))
                }
                SourceRef::Image { reference } => {
                    let (k, st) =
                        tokio::task::block_in_place(|| self.load_image(reference, &stage.platform))
                            .map_err(|e| {
                                // named by the step that reads it, as BuildKit does
                                let e = StepError::SourceImage {
                                    reference: reference.clone(),
                                    source: Box::new(e),
                                };
                                self.step_error(step, e)
                            })?;
                    FromSource::Image(k, Box::new(st))
                }
                SourceRef::Context { name, source } => self
                    .context_source(name, source, &stage.platform)
                    .map_err(|e| self.step_error(step, e))?,
            });
        }
        Ok(from)
    }

    /// Run one step: wait for its sources, take a job slot, and hand it to
    /// its op on a blocking thread.
    async fn run_step(
        self: &Arc<Self>,
        stage: &Stage,
        step: &Step,
        key: &Key,
        state: &ImageState,
        vertex: usize,
        name: &str,
    ) -> Result<(Key, ImageState)> {
        // a waiting step never holds a slot
        let from = self.step_sources(stage, step).await?;
        let _slot = self
            .shared
            .slots
            .acquire()
            .await
            .map_err(|_| Error::SlotsClosed)?;
        let started = Instant::now();
        let this = Arc::clone(self);
        let ctx = StepCtx {
            step: step.clone(),
            parent: key.clone(),
            state: state.clone(),
            from,
            vertex,
            name: name.to_string(),
            no_cache: self.no_cache_for(stage),
        };
        let result = tokio::task::spawn_blocking(move || this.execute(&ctx))
            .await
            .map_err(Error::Task)?;
        match result {
            Ok(done) => {
                if let Ok(mut t) = self.trail.lock() {
                    t.push((done.key.clone(), done.state.clone()));
                    if let Some(k) = &done.content_key {
                        t.push((k.clone(), done.state.clone()));
                        if let Ok(mut c) = self.content_keys.lock() {
                            c.insert(k.clone());
                        }
                    }
                }
                if done.cached {
                    self.cached.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.progress.done(vertex, started.elapsed().as_secs_f64());
                }
                Ok((done.key, done.state))
            }
            Err(e) => {
                self.progress.error(vertex, &crate::error_chain(&e));
                Err(self.step_error(step, e))
            }
        }
    }

    /// The recorded result of `key`, locally or from `--cache-from`.
    /// A record for `key` in the local cache, else in the `--cache-from`
    /// imports (its blobs fetched then, their bytes on `vertex`'s line).
    pub(super) fn lookup(
        &self,
        key: &Key,
        no_cache: bool,
        vertex: Option<usize>,
    ) -> Option<ImageState> {
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
        let on_bytes: Option<crate::registry::OnBytes> = vertex.map(|v| {
            let progress = Arc::clone(&self.progress);
            Arc::new(move |d: &oci_spec::image::Digest, done: u64, total: u64| {
                progress.transfer(v, d.as_ref(), done, total);
            }) as crate::registry::OnBytes
        });
        match self
            .imported
            .materialize(key, &self.cache, &self.snap, on_bytes.as_ref())
        {
            Ok(hit) => hit,
            Err(e) => {
                // a broken imported cache costs a rebuild of the step
                self.progress.summary(&format!(
                    "WARNING: --cache-from: {}",
                    crate::error_chain(&e)
                ));
                None
            }
        }
    }

    /// Remember that `key` produced `state`.
    pub(super) fn record(&self, key: &Key, state: &ImageState) {
        // A cache record that cannot be written only costs a rebuild.
        let _ = self.cache.put(key, state);
    }

    /// Landlock rules for host-side work on build inputs: the state
    /// directory read-write, the build context read-only.
    pub(super) fn confinement(&self) -> kiln_snapshotter::confine::Rules {
        self.snap
            .confinement()
            .write(self.opts.state.root())
            .read(&self.opts.context)
    }
}
