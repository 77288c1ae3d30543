//! Automatic garbage collection: after every build, once its result is
//! reported, kiln measures its state directory against kiln.toml's GC
//! policy (a stat per blob and each layer's size, kept beside it: a few
//! milliseconds), and only when the state is over the limit starts a
//! detached `kiln prune --auto` to collect, so a long-lived runner's disk
//! does not fill up and the build never waits for a collection. Within
//! the limit (the usual case) nothing runs after kiln exits: a script may
//! remove the state directory right away.
//!
//! The policy, BuildKit's default in kiln's terms: when the state
//! directory holds more than `gc-keep-storage` (default: a tenth of its
//! file system, at most 20GB), build cache records and cache mounts go,
//! least recently used first, until it is within the limit; those used
//! within `gc-keep-duration` (48h) go only when the older ones were not
//! enough. Named images, and the records whose layers they hold, are never
//! touched: images a user named are the user's to remove.
//!
//! One collection at a time per state directory (a lock, not waited on: a
//! second one has nothing to add). A build running meanwhile is safe: what
//! it uses is leased, and a record that goes under it is a miss (the step
//! runs again). Each run leaves `gc.json` in the state directory, which
//! `kiln du` shows.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::images::open_state;
use super::prune::{prune, Report};
use crate::config::Settings;
use crate::engine::step_cache::{self, KeepPolicy, PruneCandidate};
use crate::image::StateDir;

/// The record of the last collection, `STATE/gc.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRun {
    /// when it started, RFC 3339
    pub started: String,
    pub seconds: f64,
    /// the limit it applied, in bytes
    pub limit: u64,
    pub before: u64,
    pub after: u64,
    /// records and cache mounts removed
    pub removed: usize,
    /// why it failed, when it did
    pub error: Option<String>,
}

/// Where the last run is recorded.
pub fn last_run_path(state: &StateDir) -> PathBuf {
    state.root().join("gc.json")
}

/// The last run, if any (an unreadable record is none).
pub fn last_run(state: &StateDir) -> Option<LastRun> {
    let text = std::fs::read(last_run_path(state)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The limit the policy applies to `state`.
pub fn limit(settings: &Settings, state: &StateDir) -> u64 {
    settings
        .gc_keep_storage
        .value
        .unwrap_or_else(|| crate::config::default_keep_storage(state.root()))
}

/// After a build, its result reported: when the state directory is over
/// the policy's limit, start `kiln prune --auto` detached (its own process
/// group, no terminal, output discarded). Never fails the build: a check
/// or a collector that cannot run is a warning.
pub fn after_build(root: Option<&Path>, settings: &Settings) {
    if !settings.gc.value {
        return;
    }
    let over = open_state(root).and_then(|(state, snap)| {
        Ok(super::prune::state_bytes(&state, &snap)? > limit(settings, &state))
    });
    match over {
        Ok(true) => spawn(root),
        Ok(false) => {}
        Err(e) => eprintln!(
            "kiln: warning: cannot measure the state directory for garbage collection: {}",
            super::chain(&e)
        ),
    }
}

fn spawn(root: Option<&Path>) {
    let mut cmd = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe),
        Err(e) => {
            eprintln!("kiln: warning: cannot start the garbage collector: {e}");
            return;
        }
    };
    if let Some(r) = root {
        cmd.arg("--root").arg(r);
    }
    cmd.args(["prune", "--auto", "--after-build"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    if let Err(e) = cmd.spawn() {
        eprintln!("kiln: warning: cannot start the garbage collector: {e}");
    }
}

/// `kiln prune --auto`: apply the policy once, unless another collection
/// of this state directory is running.
pub fn run(root: Option<&Path>, settings: &Settings) -> anyhow::Result<i32> {
    let (state, snap) = open_state(root)?;
    let lock_path = state.root().join("gc.lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("cannot open {}", lock_path.display()))?;
    let Ok(_lock) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
    else {
        println!("another garbage collection of this state directory is running");
        return Ok(0);
    };
    let limit = limit(settings, &state);
    let keep = settings.gc_keep_duration.value;
    let started = crate::image::time::now();
    let t = Instant::now();
    // within the limit (the usual case): measured, nothing collected
    let result = super::prune::state_bytes(&state, &snap).and_then(|total| {
        if total <= limit {
            return Ok(Report {
                before: total,
                after: total,
                ..Report::default()
            });
        }
        prune(&state, &snap, false, false, |candidates, total| {
            select(candidates, total, limit, keep, SystemTime::now())
        })
    });
    let record = LastRun {
        started: crate::image::time::format_rfc3339(started),
        seconds: t.elapsed().as_secs_f64(),
        limit,
        before: result.as_ref().map_or(0, |r| r.before),
        after: result.as_ref().map_or(0, |r| r.after),
        removed: result.as_ref().map_or(0, |r| r.removed),
        error: result.as_ref().err().map(super::chain),
    };
    let bytes = serde_json::to_vec_pretty(&record)?;
    crate::engine::parallel::write_atomic(&last_run_path(&state), |f| {
        std::io::Write::write_all(f, &bytes)
    })
    .context("cannot record the garbage collection")?;
    let Report { before, after, .. } = result?;
    println!(
        "state directory {} -> {} (limit {})",
        super::images::human_size(before),
        super::images::human_size(after),
        super::images::human_size(limit)
    );
    Ok(0)
}

/// What goes: nothing while the state (`total` bytes) is within `limit`;
/// else the candidates least recently used first, those used within
/// `keep` only after all older ones, until the state is within it.
/// Whatever is not a candidate (images, records they hold) counts
/// against the limit but never goes; when it alone fills the limit, only
/// records older than `keep` go.
pub fn select(
    candidates: &[PruneCandidate],
    total: u64,
    limit: u64,
    keep: Duration,
    now: SystemTime,
) -> Vec<step_cache::Key> {
    if total <= limit {
        return Vec::new();
    }
    let pool: u64 = candidates.iter().map(|c| c.bytes).sum();
    let fixed = total.saturating_sub(pool);
    // the most the candidates may keep
    let storage = limit.saturating_sub(fixed);
    let mut out = step_cache::select_for_prune(
        candidates,
        KeepPolicy {
            storage: Some(storage),
            duration: Some(keep),
        },
        now,
    );
    // what no collection may free (images) fills the limit by itself:
    // records used lately stay, or every build would find its cache gone
    if fixed >= limit {
        return out;
    }
    let rest: Vec<PruneCandidate> = candidates
        .iter()
        .filter(|c| !out.contains(&c.key))
        .cloned()
        .collect();
    out.extend(step_cache::select_for_prune(
        &rest,
        KeepPolicy {
            storage: Some(storage),
            duration: None,
        },
        now,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: &str, hours_ago: u64, bytes: u64, now: SystemTime) -> PruneCandidate {
        PruneCandidate {
            key: step_cache::Key(key.into()),
            last_used: now - Duration::from_secs(hours_ago * 3600),
            bytes,
        }
    }

    #[test]
    fn old_records_go_first_then_recent_ones_until_within_the_limit() {
        let now = SystemTime::now();
        let keep = Duration::from_secs(48 * 3600);
        let cands = [
            c("recent-old", 10, 100, now),
            c("recent-new", 1, 100, now),
            c("old-a", 100, 100, now),
            c("old-b", 50, 100, now),
        ];
        let keys = |v: Vec<step_cache::Key>| v.into_iter().map(|k| k.0).collect::<Vec<_>>();
        // 400 of records plus 100 of images, limit 1000: nothing goes
        assert!(select(&cands, 500, 1000, keep, now).is_empty());
        // limit 350: the old ones are enough (500 -> 300)
        assert_eq!(
            keys(select(&cands, 500, 350, keep, now)),
            ["old-a", "old-b"]
        );
        // limit 250: then the least recently used of the recent ones
        assert_eq!(
            keys(select(&cands, 500, 250, keep, now)),
            ["old-a", "old-b", "recent-old"]
        );
        // images alone over the limit: the old records go, the ones used
        // within keep-duration stay (else every build would start cold)
        assert_eq!(keys(select(&cands, 500, 50, keep, now)), ["old-a", "old-b"]);
    }
}
