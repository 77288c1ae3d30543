//! `kiln prune`: free the build cache (cache records, and the layers and
//! blobs only they need) without touching what a named image needs; with
//! `--all` unnamed images go too, and so do records of steps whose layers a
//! named image holds (otherwise kept: dropping them frees nothing).
//! `--keep-storage` and `--keep-duration` mean what they mean to
//! `docker builder prune` (BuildKit's prune policy, see
//! `engine::step_cache::select_for_prune`).
//!
//! Cache mounts (`RUN --mount=type=cache` directories) go too, as BuildKit's
//! prune removes its `exec.cachemount` records: each instance no running
//! build holds is a candidate in the same pool as the cache records, so
//! `--keep-duration` keeps recently used ones and `--keep-storage` counts
//! their bytes. An instance a build holds is never touched (try-lock).
//!
//! Also home of what `kiln du` and `kiln rmi` share with prune: reading the
//! cache records as GC roots.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Args;
use kiln_snapshotter::content::REF_NAME;
use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::Digest;

use super::images::{human_size, open_state};
use crate::config::Settings;
use crate::engine::image_state::ImageState;
use crate::engine::step_cache::{self, Cache, KeepPolicy, PruneCandidate, Record};
use crate::image::cache_mounts::CacheMounts;
use crate::image::gc::{self, CacheRoot, Roots};
use crate::image::StateDir;

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Also remove unnamed images (and what only they need)
    #[arg(long, short = 'a')]
    all: bool,
    /// Keep the build cache at most this big, freeing the least recently
    /// used first (e.g. 10GB, 512MB; units are powers of 1024, as docker's)
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size)]
    keep_storage: Option<u64>,
    /// Keep cache used within this long (e.g. 48h, 30m, 1h30m)
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    keep_duration: Option<Duration>,
    /// Apply kiln.toml's GC policy (what runs after every build): free the
    /// build cache only when the state directory is over gc-keep-storage
    #[arg(long)]
    auto: bool,
    /// Set by the build that starts the collector: it runs inside kiln's
    /// user namespace, where owners cannot be checked, and the build
    /// checked the state directory and config already
    #[arg(long, hide = true, requires = "auto")]
    after_build: bool,
    /// Accepted for docker compatibility: kiln never asks
    #[arg(long, short = 'f', hide = true)]
    force: bool,
}

/// Prefix of a cache mount instance among the prune candidates (record
/// keys are hex, so it never collides with one).
const MOUNT_KEY: &str = "mount:";

/// A record with what it keeps alive, for GC and accounting.
pub struct CacheEntry {
    pub record: Record,
    pub root: CacheRoot,
}

/// The build cache's records as GC roots.
pub fn cache_entries(cache: &Cache, snap: &Snapshotter) -> anyhow::Result<Vec<CacheEntry>> {
    let records = cache.records().context("cannot read the build cache")?;
    Ok(records
        .into_iter()
        .map(|record| {
            let root = match &record.state {
                Some(s) => CacheRoot {
                    usable: usable(s, snap),
                    ..root_of(s, record.bytes)
                },
                None => CacheRoot {
                    bytes: record.bytes,
                    ..CacheRoot::default()
                },
            };
            CacheEntry { record, root }
        })
        .collect())
}

fn root_of(state: &ImageState, bytes: u64) -> CacheRoot {
    let mut roots = Roots::default();
    roots.chains.extend(state.chain.clone());
    roots
        .blobs
        .extend(state.layers.iter().map(|l| l.digest.clone()));
    CacheRoot {
        roots,
        top_chain: state.chain.clone(),
        top_blob: state.layers.last().map(|l| l.digest.clone()),
        bytes,
        usable: false,
    }
}

/// Whether a hit on this record would be used (the engine's rule, without
/// leasing anything: prune must not keep what it looks at).
fn usable(state: &ImageState, snap: &Snapshotter) -> bool {
    let chain_ok = state.chain.as_ref().is_none_or(|c| {
        c.parse::<Digest>()
            .is_ok_and(|d| snap.layers().contains(&d))
    });
    chain_ok
        && state.layers.iter().all(|l| {
            l.digest
                .parse::<Digest>()
                .is_ok_and(|d| snap.content().contains(&d))
        })
}

/// Collect what no image, no cache record and no running build needs
/// (what `kiln rmi` does after untagging).
pub fn collect_keeping_cache(
    state: &StateDir,
    snap: &Snapshotter,
) -> anyhow::Result<gc::Collected> {
    let cache = Cache::open(&state.cache_dir()).context("cannot open the build cache")?;
    let mut keep = Roots::default();
    for e in cache_entries(&cache, snap)? {
        keep.extend(&e.root.roots);
    }
    Ok(gc::collect(snap, &keep)?)
}

/// Bytes kiln holds on disk: blobs, unpacked layers and cache records.
fn disk_bytes(snap: &Snapshotter, cache: &Cache) -> anyhow::Result<u64> {
    Ok(snap.content().usage()? + snap.layers().usage()?.total + cache.usage())
}

impl PruneArgs {
    /// Started by a build, which checked the state directory's owners.
    pub fn after_build(&self) -> bool {
        self.after_build
    }
}

/// `kiln prune`.
pub fn run(root: Option<&Path>, settings: &Settings, args: PruneArgs) -> anyhow::Result<i32> {
    let _ = args.force;
    if args.auto {
        if args.all || args.keep_storage.is_some() || args.keep_duration.is_some() {
            bail!("--auto applies kiln.toml's GC policy: it takes no --all, --keep-storage or --keep-duration");
        }
        return super::autogc::run(root, settings);
    }
    let (state, snap) = open_state(root)?;
    let policy = KeepPolicy {
        storage: args.keep_storage,
        duration: args.keep_duration,
    };
    let report = prune(&state, &snap, args.all, true, |candidates, _| {
        step_cache::select_for_prune(candidates, policy, SystemTime::now())
    })?;
    println!("Total reclaimed space: {}", human_size(report.freed));
    Ok(0)
}

/// What a prune did: the state's bytes before and after (blobs, layers,
/// cache records and cache mounts) and what it freed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    pub before: u64,
    pub after: u64,
    pub freed: u64,
    /// records and cache mounts removed
    pub removed: usize,
}

/// Bytes the state directory holds: blobs, layers, cache records and
/// cache mounts (what [`Report`] counts).
pub fn state_bytes(state: &StateDir, snap: &Snapshotter) -> anyhow::Result<u64> {
    let cache = Cache::open(&state.cache_dir()).context("cannot open the build cache")?;
    let mounts = match CacheMounts::open_existing(&state.cache_mounts_dir())
        .context("cannot open the cache mount store")?
    {
        Some(m) => m.usage().context("cannot measure the cache mounts")?,
        None => Vec::new(),
    };
    Ok(disk_bytes(snap, &cache)? + mounts.iter().map(|m| m.bytes).sum::<u64>())
}

/// Free the build cache records and cache mounts `select` picks from the
/// candidates (given with the state's total bytes), then everything only
/// they held; with `all`, unnamed images first. Named images, and records
/// whose layers one holds (unless `all`), are never candidates. `print`:
/// list what goes, as `docker builder prune` does.
pub fn prune(
    state: &StateDir,
    snap: &Snapshotter,
    all: bool,
    print: bool,
    select: impl FnOnce(&[PruneCandidate], u64) -> Vec<step_cache::Key>,
) -> anyhow::Result<Report> {
    let cache = Cache::open(&state.cache_dir()).context("cannot open the build cache")?;
    let mounts = CacheMounts::open(&state.cache_mounts_dir())
        .context("cannot open the cache mount store")?;
    let mount_usage = mounts.usage().context("cannot measure the cache mounts")?;
    let mount_bytes: u64 = mount_usage.iter().map(|m| m.bytes).sum();
    let before = disk_bytes(snap, &cache)? + mount_bytes;

    if all {
        drop_unnamed_images(snap, print)?;
    }

    cache
        .remove_orphans()
        .context("cannot clean the build cache")?;
    let entries = cache_entries(&cache, snap)?;
    // records whose step made a layer a named image stands on free nothing
    // and save a rebuild: they stay unless --all (see gc::held_by_images)
    let named = gc::image_roots(snap.content())?.named;
    let named_layers = gc::layer_closure(&snap.layers().list()?, &named.chains);
    let in_use = |e: &CacheEntry| !all && gc::held_by_images(&e.root, &named, &named_layers);
    let (held, entries): (Vec<CacheEntry>, Vec<CacheEntry>) = entries.into_iter().partition(in_use);
    let mut keep = Roots::default();
    for e in &held {
        keep.extend(&e.root.roots);
    }
    let roots: Vec<CacheRoot> = entries.iter().map(|e| e.root.clone()).collect();
    let sizes = gc::record_sizes(snap, &roots)?;
    // records that can never hit again hold nothing worth keeping
    let mut doomed: Vec<step_cache::Key> = entries
        .iter()
        .filter(|e| !e.root.usable)
        .map(|e| e.record.key.clone())
        .collect();
    let mut candidates: Vec<PruneCandidate> = entries
        .iter()
        .zip(&sizes)
        .filter(|(e, _)| e.root.usable)
        .map(|(e, bytes)| PruneCandidate {
            key: e.record.key.clone(),
            last_used: e.record.last_used,
            bytes: *bytes,
        })
        .collect();
    candidates.extend(
        mount_usage
            .iter()
            .filter(|m| !m.in_use)
            .map(|m| PruneCandidate {
                key: step_cache::Key(format!("{MOUNT_KEY}{}", m.instance)),
                last_used: m.last_used,
                bytes: m.bytes,
            }),
    );
    let (doomed_mounts, selected): (Vec<step_cache::Key>, Vec<step_cache::Key>) =
        select(&candidates, before)
            .into_iter()
            .partition(|k| k.0.starts_with(MOUNT_KEY));
    doomed.extend(selected);
    for e in &entries {
        if !doomed.contains(&e.record.key) {
            keep.extend(&e.root.roots);
        }
    }
    if print && (!doomed.is_empty() || !doomed_mounts.is_empty()) {
        println!("Deleted build cache objects:");
    }
    for key in &doomed {
        cache
            .remove(key)
            .with_context(|| format!("cannot remove cache record {}", key.0))?;
        if print {
            println!("{}", &key.0[..key.0.len().min(25)]);
        }
    }
    let mounts_freed = remove_mounts(&mounts, &doomed_mounts, &mount_usage, print)?;
    gc::collect(snap, &keep).context("garbage collection")?;
    snap.cleanup()?;
    let after = disk_bytes(snap, &cache)? + mount_bytes - mounts_freed;
    Ok(Report {
        before,
        after,
        freed: before.saturating_sub(after),
        removed: doomed.len() + doomed_mounts.len(),
    })
}

/// `--all`: drop every image that has no name from the store's index.
fn drop_unnamed_images(snap: &Snapshotter, print: bool) -> anyhow::Result<()> {
    let mut dropped = Vec::new();
    snap.content().update_index(|m| {
        m.retain(|d| {
            let named = d
                .annotations()
                .as_ref()
                .is_some_and(|a| a.contains_key(REF_NAME));
            if !named {
                dropped.push(d.digest().to_string());
            }
            named
        });
    })?;
    if print && !dropped.is_empty() {
        println!("Deleted Images:");
        for d in &dropped {
            println!("deleted: {d}");
        }
    }
    Ok(())
}

/// Remove the cache mount instances `doomed` names (unless a build took
/// one since they were listed); the bytes freed.
fn remove_mounts(
    mounts: &CacheMounts,
    doomed: &[step_cache::Key],
    usage: &[crate::image::cache_mounts::CacheUsage],
    print: bool,
) -> anyhow::Result<u64> {
    let mut mounts_freed = 0;
    for key in doomed {
        let instance = &key.0[MOUNT_KEY.len()..];
        let removed = mounts
            .remove(instance)
            .with_context(|| format!("cannot remove cache mount {instance}"))?;
        // None: a build took it since we looked; it stays
        if let Some(bytes) = removed {
            mounts_freed += bytes;
            let id = usage
                .iter()
                .find(|m| m.instance == instance)
                .map_or("?", |m| m.id.as_str());
            if print {
                println!("cache mount {id} ({instance})");
            }
        }
    }
    Ok(mounts_freed)
}
