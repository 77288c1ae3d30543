//! Steps that only change the image config (ENV, LABEL, USER, CMD, ...):
//! no layer and no sandbox, a new key and a history entry. WORKDIR also
//! makes its directory, as a layer ([`Engine::workdir_op`]).

use std::path::Path;

use super::{Done, StepCtx};
use crate::engine::commit::{now_or_epoch, HISTORY_COMMENT};
use crate::engine::error::StepError;
use crate::engine::fsutil::Root;
use crate::engine::image_state::{join_workdir, History, ImageState};
use crate::engine::solver::Engine;
use crate::engine::step_cache::{self, Key, KeyBuilder};
use crate::frontend::instructions::Instruction;
use crate::frontend::Step;

/// What goes into a config step's key: the parent's key and the
/// instruction as planned (variables expanded).
pub fn key(parent: &Key, step: &Step) -> Key {
    let mut k = KeyBuilder::new("config");
    k.str(&parent.0)
        .str(&serde_json::to_string(&step.instruction).unwrap_or_default());
    k.finish()
}

/// Apply `step` to `state` if it only changes the config: its new key, or
/// None when the step is not a config step (the state is then unchanged).
/// `epoch` is SOURCE_DATE_EPOCH.
pub fn apply(step: &Step, parent: &Key, state: &mut ImageState, epoch: Option<i64>) -> Option<Key> {
    if let Instruction::Workdir(w) = &step.instruction {
        if join_workdir(&state.config.workdir, w) != "/" {
            // a step of its own: it makes the directory
            return None;
        }
    }
    if !state.apply_config(&step.instruction) {
        return None;
    }
    // Config-only steps take the time of the step before them, so a
    // rebuild from cache gives the same image.
    let created = state
        .history
        .last()
        .and_then(|h| h.created.clone())
        .or_else(|| Some(now_or_epoch(epoch)));
    state.history.push(History {
        created_by: history_text(step),
        empty_layer: true,
        comment: Some(HISTORY_COMMENT.into()),
        created,
    });
    Some(key(parent, step))
}

/// A config step's history `created_by`, as BuildKit writes the ones
/// it rewrites (ARG with the values in force, EXPOSE as its sorted port
/// list); the instruction as written for the others.
fn history_text(step: &Step) -> String {
    match &step.instruction {
        Instruction::Arg(decls) => {
            let parts: Vec<String> = decls
                .iter()
                .map(|d| match &d.value {
                    Some(v) => format!("{}={v}", d.key),
                    None => d.key.clone(),
                })
                .collect();
            format!("ARG {}", parts.join(" "))
        }
        Instruction::Expose(ports) => {
            let mut all: Vec<String> = Vec::new();
            for p in ports {
                // a range is its ports, as BuildKit lists them (bounded:
                // the history names at most the first 1024)
                for port in (p.start..=p.end).take(1024) {
                    all.push(format!("{port}/{}", p.protocol));
                }
            }
            all.sort();
            all.dedup();
            format!("EXPOSE [{}]", all.join(" "))
        }
        _ => step.original.clone(),
    }
}

/// What goes into a WORKDIR key: the parent's key, the instruction as
/// planned, the USER that will own the directories it makes and the
/// epoch its layer's times are clamped to.
fn workdir_key(parent: &Key, step: &Step, user: &str, epoch: Option<i64>) -> Key {
    let mut k = KeyBuilder::new("workdir");
    k.str(&parent.0)
        .str(&serde_json::to_string(&step.instruction).unwrap_or_default())
        .str(user);
    if let Some(e) = epoch {
        k.str(&format!("epoch {e}"));
    }
    k.finish()
}

impl Engine {
    /// WORKDIR, as BuildKit: the directory and its missing parents are
    /// made, mode 0755 and owned by the image's USER (resolved in the
    /// image), in a layer of its own, and the config's working directory
    /// is set.
    pub(super) fn workdir_op(&self, ctx: &StepCtx) -> Result<Done, StepError> {
        let mut state = ctx.state.clone();
        state.apply_config(&ctx.step.instruction);
        let dir = state.config.workdir.clone();
        let user = state.config.user.clone();
        let key = workdir_key(&ctx.parent, &ctx.step, &user, self.layer_epoch());
        let lock = self.shared.key_lock(&key);
        let _same_step = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = self.hit(ctx, &key) {
            return Ok(hit);
        }
        self.progress.started(ctx.vertex, &ctx.name);
        let view = self
            .snap
            .prepare(&step_cache::view_key("workdir", &key), ctx.chain().as_ref())?;
        if let Err(e) = make_dir(view.path(), &dir, &user) {
            let _ = self.snap.remove(view);
            return Err(e);
        }
        self.commit(view, &mut state, format!("WORKDIR {dir}"), ctx.vertex)?;
        self.record(&key, &state);
        Ok(Done {
            key,
            content_key: None,
            state,
            cached: false,
        })
    }
}

/// `dir` and its missing parents in `rootfs`, owned by `user` (root when
/// the image sets no USER).
fn make_dir(rootfs: &Path, dir: &str, user: &str) -> Result<(), StepError> {
    let (uid, gid) = if user.is_empty() {
        (0, 0)
    } else {
        let ids =
            kiln_runtime::user::resolve(rootfs, user).map_err(|source| StepError::WorkdirUser {
                dir: dir.into(),
                user: user.into(),
                source: Box::new(source),
            })?;
        (ids.uid, ids.gid)
    };
    let err = |source| StepError::Workdir {
        dir: dir.into(),
        source,
    };
    let root = Root::open(rootfs).map_err(err)?;
    root.mkdir_all(Path::new(dir.trim_start_matches('/')), uid, gid)
        .map_err(err)?;
    Ok(())
}
