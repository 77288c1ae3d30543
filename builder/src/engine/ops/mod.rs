//! The ops: what each kind of step does, and what goes into its cache key.
//! As in BuildKit, each op has one function that says what keys it
//! ([`run`]'s `Engine::run_key`, [`copy`]'s `Engine::copy_key`,
//! [`config::key`]); the solver ([`super::solver`]) only schedules, looks
//! keys up and records results.
//!
//! - [`config`]: ENV, LABEL and the other steps that only change the
//!   image config (no layer, no sandbox); WORKDIR, which also makes its
//!   directory in a layer.
//! - [`run`]: RUN, in a sandbox on a writable view of the parent layers.
//! - [`copy`]: COPY and ADD, copied host-side (Landlock-confined) into a
//!   writable view.

pub mod config;
pub mod copy;
pub mod run;

use oci_spec::image::Digest;

use super::error::StepError;
use super::image_state::ImageState;
use super::solver::Engine;
use super::step_cache::Key;
use super::FromSource;
use crate::frontend::instructions::Instruction;
use crate::frontend::Step;

/// One step as the solver hands it to its op.
pub struct StepCtx {
    pub step: Step,
    /// the key of the state the step starts from
    pub parent: Key,
    /// the state the step starts from
    pub state: ImageState,
    /// what `COPY --from` and `RUN --mount from=` read, in order
    pub from: Vec<FromSource>,
    /// the step's progress vertex and name
    pub vertex: usize,
    pub name: String,
    /// `--no-cache` or `--no-cache-filter` for this stage
    pub no_cache: bool,
}

impl StepCtx {
    /// The layer chain the step starts from.
    fn chain(&self) -> Option<Digest> {
        self.state.chain.as_ref().and_then(|c| c.parse().ok())
    }

    /// The step's working directory (`/` when the image sets none).
    fn workdir(&self) -> String {
        self.step.workdir.clone().unwrap_or_else(|| {
            if self.state.config.workdir.is_empty() {
                "/".into()
            } else {
                self.state.config.workdir.clone()
            }
        })
    }
}

/// A step's outcome: its key and resulting state, and whether it came from
/// the cache.
pub struct Done {
    pub key: Key,
    /// the step's content key, when it has one ([`Keys`]): recorded too
    pub content_key: Option<Key>,
    pub state: ImageState,
    pub cached: bool,
}

/// A step's keys. As BuildKit keys a step that reads another stage (COPY
/// --from, RUN --mount=from=) twice: by definition (the source stage's
/// key, known before that stage's files are, so a cache that holds only
/// the final stage still hits) and by content (what it reads from the
/// source, so a source stage that was rebuilt into the same files still
/// hits). The first is the step's key; a hit on either is a hit, and a
/// result is recorded under both.
pub struct Keys {
    pub key: Key,
    pub content: Option<Key>,
}

impl Engine {
    /// Key, look up, and if it misses run, one step (on a blocking thread).
    pub(super) fn execute(&self, ctx: &StepCtx) -> Result<Done, StepError> {
        match &ctx.step.instruction {
            Instruction::Run(run) => self.run_op(ctx, run),
            Instruction::Workdir(_) => self.workdir_op(ctx),
            Instruction::Copy(c) => self.copy_op(ctx, &copy::CopyOp::copy(c)),
            Instruction::Add(a) if a.sources.iter().any(super::filecopy::is_git) => {
                self.git_add_op(ctx, a)
            }
            Instruction::Add(a) => self.copy_op(ctx, &copy::CopyOp::add(a)),
            other => Err(StepError::Instruction(
                serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v["instruction"].as_str().map(String::from))
                    .unwrap_or_default(),
            )),
        }
    }

    /// A cache hit for `key`, reported as such, or None.
    fn hit(&self, ctx: &StepCtx, key: &Key) -> Option<Done> {
        let state = self.lookup(key, ctx.no_cache, Some(ctx.vertex))?;
        Some(self.cached_done(ctx, key, None, state))
    }

    /// A cache hit for either of `keys` (the definition key first).
    fn hit_either(&self, ctx: &StepCtx, keys: &Keys) -> Option<Done> {
        self.hit(ctx, &keys.key)
            .or_else(|| self.hit_by_content(ctx, keys))
    }

    /// A cache hit for the content key of `keys`, recorded under the
    /// definition key too. (A hit by definition is never recorded under
    /// the content key: its layer may have been made from other files
    /// than the source has now.)
    fn hit_by_content(&self, ctx: &StepCtx, keys: &Keys) -> Option<Done> {
        let k = keys.content.as_ref()?;
        let state = self.lookup(k, ctx.no_cache, Some(ctx.vertex))?;
        self.record(&keys.key, &state);
        Some(self.cached_done(ctx, &keys.key, Some(k.clone()), state))
    }

    fn cached_done(
        &self,
        ctx: &StepCtx,
        key: &Key,
        content_key: Option<Key>,
        state: ImageState,
    ) -> Done {
        self.progress.cached(ctx.vertex, &ctx.name);
        Done {
            key: key.clone(),
            content_key,
            state,
            cached: true,
        }
    }

    /// Record a step's new `state` under both `keys`.
    fn record_keys(&self, keys: &Keys, state: &ImageState) {
        self.record(&keys.key, state);
        if let Some(k) = &keys.content {
            self.record(k, state);
        }
    }
}
