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
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    keep_storage: Option<u64>,
    /// Keep cache used within this long (e.g. 48h, 30m, 1h30m)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    keep_duration: Option<Duration>,
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

/// `kiln prune`.
pub fn run(root: Option<&Path>, args: PruneArgs) -> anyhow::Result<i32> {
    let _ = args.force;
    let (state, snap) = open_state(root)?;
    let cache = Cache::open(&state.cache_dir()).context("cannot open the build cache")?;
    let before = disk_bytes(&snap, &cache)?;

    if args.all {
        drop_unnamed_images(&snap)?;
    }

    cache
        .remove_orphans()
        .context("cannot clean the build cache")?;
    let entries = cache_entries(&cache, &snap)?;
    // records whose step made a layer a named image stands on free nothing
    // and save a rebuild: they stay unless --all (see gc::held_by_images)
    let named = gc::image_roots(snap.content())?.named;
    let named_layers = gc::layer_closure(&snap.layers().list()?, &named.chains);
    let in_use = |e: &CacheEntry| !args.all && gc::held_by_images(&e.root, &named, &named_layers);
    let (held, entries): (Vec<CacheEntry>, Vec<CacheEntry>) = entries.into_iter().partition(in_use);
    let mut keep = Roots::default();
    for e in &held {
        keep.extend(&e.root.roots);
    }
    let roots: Vec<CacheRoot> = entries.iter().map(|e| e.root.clone()).collect();
    let sizes = gc::record_sizes(&snap, &roots)?;
    // records that can never hit again hold nothing worth keeping
    let mut doomed: Vec<step_cache::Key> = entries
        .iter()
        .filter(|e| !e.root.usable)
        .map(|e| e.record.key.clone())
        .collect();
    let mounts = CacheMounts::open(&state.cache_mounts_dir())
        .context("cannot open the cache mount store")?;
    let mount_usage = mounts.usage().context("cannot measure the cache mounts")?;
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
    let policy = KeepPolicy {
        storage: args.keep_storage,
        duration: args.keep_duration,
    };
    let (doomed_mounts, selected): (Vec<step_cache::Key>, Vec<step_cache::Key>) =
        step_cache::select_for_prune(&candidates, policy, SystemTime::now())
            .into_iter()
            .partition(|k| k.0.starts_with(MOUNT_KEY));
    doomed.extend(selected);
    for e in &entries {
        if !doomed.contains(&e.record.key) {
            keep.extend(&e.root.roots);
        }
    }
    if !doomed.is_empty() || !doomed_mounts.is_empty() {
        println!("Deleted build cache objects:");
    }
    for key in &doomed {
        cache
            .remove(key)
            .with_context(|| format!("cannot remove cache record {}", key.0))?;
        println!("{}", &key.0[..key.0.len().min(25)]);
    }
    let mounts_freed = remove_mounts(&mounts, &doomed_mounts, &mount_usage)?;
    gc::collect(&snap, &keep).context("garbage collection")?;
    snap.cleanup()?;
    let after = disk_bytes(&snap, &cache)?;
    println!(
        "Total reclaimed space: {}",
        human_size(before.saturating_sub(after) + mounts_freed)
    );
    Ok(0)
}

/// `--all`: drop every image that has no name from the store's index.
fn drop_unnamed_images(snap: &Snapshotter) -> anyhow::Result<()> {
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
    if !dropped.is_empty() {
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
            println!("cache mount {id} ({instance})");
        }
    }
    Ok(mounts_freed)
}

/// A size as docker's `--keep-storage` takes it: a number with an optional
/// unit b, k, m, g, t (optionally followed by `b` or `ib`, any case), each a
/// power of 1024 (docker's RAMInBytes).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("size {s:?}: expected a number and a unit, such as 10GB"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => bail!("size {s:?}: unknown unit; use B, KB, MB, GB, TB or PB"),
    };
    // a fractional size (1.5GB) is rounded down to whole bytes
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let bytes = (value * (1u64 << shift) as f64) as u64;
    Ok(bytes)
}

/// A duration as Go's `time.ParseDuration` reads it (what docker's
/// `--keep-duration` uses): a sequence of numbers with units h, m, s, ms,
/// us, ns, such as `48h`, `30m`, `1h30m`, `1.5h`. `d` (days) is accepted
/// too.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = 0f64;
    if rest.is_empty() {
        bail!("duration {s:?} is empty: use e.g. 48h or 30m");
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n]
            .parse()
            .with_context(|| format!("duration {s:?}: expected a number before each unit"))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..u] {
            "d" => 86_400.0,
            "h" => 3_600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            "" => bail!("duration {s:?}: missing unit; use h, m or s (e.g. 48h)"),
            other => bail!("duration {s:?}: unknown unit {other:?}; use h, m, s or ms"),
        };
        total += value * secs;
        rest = &rest[u..];
    }
    Duration::try_from_secs_f64(total).with_context(|| format!("duration {s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_docker_units() {
        assert_eq!(parse_size("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn durations_read_like_go() {
        assert_eq!(
            parse_duration("48h").unwrap(),
            Duration::from_secs(48 * 3600)
        );
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("48").is_err());
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("").is_err());
    }
}
