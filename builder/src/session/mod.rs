//! What a build gives a step on request: build secrets and SSH agents;
//! and the source policy the caller sets on what the build may read.
//!
//! Everything here is prepared once at build start, so a bad key, a missing
//! secret file or a dead agent fails the build before any step runs; a step
//! then reaches what its mounts ask for only through the private tmpfs the
//! sandbox makes for it. This module never decides which step gets what
//! (the engine does, from the step's mounts) and never runs a process.

pub mod secrets;
pub mod source_policy;
pub mod ssh;

use std::collections::BTreeMap;
use std::sync::Arc;

/// The secrets and agents of one build, loaded before any step runs.
#[derive(Default)]
pub struct Session {
    pub secrets: secrets::Secrets,
    /// agents by `--ssh` id
    pub agents: BTreeMap<String, Arc<ssh::Agent>>,
    /// `EXPERIMENTAL_BUILDKIT_SOURCE_POLICY`, as buildx reads it
    pub policy: Option<Arc<source_policy::SourcePolicy>>,
}

impl Session {
    /// `src` after the source policy (as it is without one).
    pub fn source(
        &self,
        src: source_policy::Source,
    ) -> Result<source_policy::Source, source_policy::PolicyError> {
        match &self.policy {
            Some(p) => p.evaluate(&src),
            None => Ok(src),
        }
    }

    /// A git source (`url`, its repository `remote`) under the source
    /// policy, as BuildKit names it (`git://HOST/PATH[#REF]`): allowed,
    /// or an error when denied or converted (kiln does not convert git
    /// sources).
    pub fn git(&self, url: &str, remote: &str) -> Result<(), source_policy::PolicyError> {
        let src = source_policy::Source::git(url, remote);
        let got = self.source(src.clone())?;
        if got != src {
            return Err(source_policy::PolicyError::Unsupported {
                ident: src.identifier,
                to: got.identifier,
                why: "kiln cannot follow: it does not convert git sources (a rule may allow or deny them)".into(),
            });
        }
        Ok(())
    }

    /// The image to read for `reference` under the source policy: the
    /// same or the one a rule converts it to; an error when denied or
    /// converted to something that is not an image.
    pub fn image(&self, reference: &str) -> Result<String, source_policy::PolicyError> {
        let src = source_policy::Source::image(reference);
        let got = self.source(src.clone())?;
        if got == src {
            return Ok(reference.to_string());
        }
        got.identifier
            .strip_prefix("docker-image://")
            .map(str::to_string)
            .ok_or_else(|| source_policy::PolicyError::Unsupported {
                ident: src.identifier,
                to: got.identifier.clone(),
                why: "is not an image (docker-image://), and kiln converts an image only to another image here".into(),
            })
    }
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
