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
    pub state: ImageState,
    pub cached: bool,
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
        let state = self.lookup(key, ctx.no_cache)?;
        self.progress.cached(ctx.vertex, &ctx.name);
        Some(Done {
            key: key.clone(),
            state,
            cached: true,
        })
    }
}
