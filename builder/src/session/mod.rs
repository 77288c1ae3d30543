//! What a build gives a step on request: build secrets and SSH agents.
//!
//! Everything here is prepared once at build start, so a bad key, a missing
//! secret file or a dead agent fails the build before any step runs; a step
//! then reaches what its mounts ask for only through the private tmpfs the
//! sandbox makes for it. This module never decides which step gets what
//! (the engine does, from the step's mounts) and never runs a process.

pub mod secrets;
pub mod ssh;

use std::collections::BTreeMap;
use std::sync::Arc;

/// The secrets and agents of one build, loaded before any step runs.
#[derive(Default)]
pub struct Session {
    pub secrets: secrets::Secrets,
    /// agents by `--ssh` id
    pub agents: BTreeMap<String, Arc<ssh::Agent>>,
}

impl std::fmt::Debug for Session {
    // ids only: never a secret's value or a key
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("secrets", &self.secrets)
            .field("ssh", &self.agents.keys().collect::<Vec<_>>())
            .finish()
    }
}
