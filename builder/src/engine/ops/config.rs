//! Steps that only change the image config (ENV, LABEL, WORKDIR, USER,
//! CMD, ...): no layer and no sandbox, a new key and a history entry.

use crate::engine::commit::{now_or_epoch, HISTORY_COMMENT};
use crate::engine::image_state::{History, ImageState};
use crate::engine::step_cache::{Key, KeyBuilder};
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
    if !state.apply_config(&step.instruction) {
        return None;
    }
    if !matches!(step.instruction, Instruction::Arg(_)) {
        // Config-only steps take the time of the step before them, so a
        // rebuild from cache gives the same image.
        let created = state
            .history
            .last()
            .and_then(|h| h.created.clone())
            .or_else(|| Some(now_or_epoch(epoch)));
        state.history.push(History {
            created_by: step.original.clone(),
            empty_layer: true,
            comment: Some(HISTORY_COMMENT.into()),
            created,
        });
    }
    Some(key(parent, step))
}
