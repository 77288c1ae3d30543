//! `kiln du`: the space kiln's state directory uses, split like
//! `docker system df`: image blobs, unpacked layers, the build cache, and
//! cache mounts (the `RUN --mount=type=cache` directories, one object per
//! instance). Read-only: it never removes anything, and never creates the
//! cache mount store.

use std::path::Path;

use anyhow::Context;
use clap::Args;

use super::autogc;
use super::images::{human_size, open_state};
use super::prune::cache_entries;
use crate::config::Settings;
use crate::engine::step_cache::Cache;
use crate::image::cache_mounts::{CacheMounts, CacheUsage};
use crate::image::gc::{self, CacheRoot, Row};
use crate::image::time;

#[derive(Args, Debug)]
pub struct DuArgs {
    /// Also list every build-cache record
    #[arg(long, short = 'v')]
    verbose: bool,
    /// Output format: table, or json (bytes as numbers)
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0%".into();
    }
    // u128: no overflow for any file-system size
    format!("{}%", u128::from(part) * 100 / u128::from(whole))
}

/// Seconds since `then`; 0 for a time in the future (clock skew).
fn age_secs(now: std::time::SystemTime, then: std::time::SystemTime) -> i64 {
    now.duration_since(then)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Print rows as a left-aligned table, three spaces between columns.
fn print_table(table: &[Vec<String>]) {
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

/// The automatic GC's policy and its last run.
#[derive(serde::Serialize)]
struct GcStatus {
    enabled: bool,
    keep_storage: u64,
    keep_duration_seconds: u64,
    last_run: Option<autogc::LastRun>,
}

impl GcStatus {
    fn text(&self) -> String {
        if !self.enabled {
            return "Automatic GC: off (kiln.toml gc = false)".into();
        }
        let last = match &self.last_run {
            None => "never ran".into(),
            Some(r) => match &r.error {
                Some(e) => format!("last ran {} and failed: {e}", r.started),
                None => format!(
                    "last ran {} ({:.2}s): {} -> {}, {} removed",
                    r.started,
                    r.seconds,
                    human_size(r.before),
                    human_size(r.after),
                    r.removed
                ),
            },
        };
        format!(
            "Automatic GC: after each build, when over {}; records used within {}h go last; {last}",
            human_size(self.keep_storage),
            self.keep_duration_seconds / 3600
        )
    }
}

/// `kiln du`.
pub fn run(root: Option<&Path>, settings: &Settings, args: DuArgs) -> anyhow::Result<i32> {
    let (state, snap) = open_state(root)?;
    let cache = Cache::open(&state.cache_dir()).context("cannot open the build cache")?;
    let entries = cache_entries(&cache, &snap)?;
    let roots: Vec<CacheRoot> = entries.iter().map(|e| e.root.clone()).collect();
    let mut usage = gc::usage(&snap, &roots)?;
    let mounts: Vec<CacheUsage> = match CacheMounts::open_existing(&state.cache_mounts_dir())
        .context("cannot open the cache mount store")?
    {
        Some(store) => store.usage().context("cannot measure the cache mounts")?,
        None => Vec::new(),
    };
    usage.add_cache_mounts(&mounts);
    let gc = GcStatus {
        enabled: settings.gc.value,
        keep_storage: autogc::limit(settings, &state),
        keep_duration_seconds: settings.gc_keep_duration.value.as_secs(),
        last_run: autogc::last_run(&state),
    };
    if args.format == "json" {
        let mut v = serde_json::to_value(usage)?;
        v["gc"] = serde_json::to_value(&gc)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let row = |name: &str, r: &Row| {
        vec![
            name.to_string(),
            r.total.to_string(),
            r.active.to_string(),
            human_size(r.size),
            format!(
                "{} ({})",
                human_size(r.reclaimable),
                percent(r.reclaimable, r.size)
            ),
        ]
    };
    print_table(&[
        ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
            .map(String::from)
            .to_vec(),
        row("Images", &usage.images),
        row("Layers", &usage.layers),
        row("Build Cache", &usage.build_cache),
        row("Cache Mounts", &usage.cache_mounts),
    ]);
    println!("\nTotal on disk: {}", human_size(usage.on_disk));
    println!("{}", gc.text());
    if args.verbose {
        let sizes = gc::record_sizes(&snap, &roots)?;
        let now = std::time::SystemTime::now();
        let mut rows = vec![["CACHE ID", "SIZE", "LAST USED", "USABLE"]
            .map(String::from)
            .to_vec()];
        for (e, size) in entries.iter().zip(sizes) {
            let age = age_secs(now, e.record.last_used);
            rows.push(vec![
                e.record.key.0.chars().take(12).collect(),
                human_size(size),
                time::human_age(age),
                if e.root.usable { "yes" } else { "no" }.into(),
            ]);
        }
        println!();
        print_table(&rows);
        if !mounts.is_empty() {
            let mut rows = vec![["CACHE MOUNT", "INSTANCE", "SIZE", "LAST USED", "IN USE"]
                .map(String::from)
                .to_vec()];
            for m in &mounts {
                rows.push(vec![
                    m.id.clone(),
                    m.instance.clone(),
                    human_size(m.bytes),
                    time::human_age(age_secs(now, m.last_used)),
                    if m.in_use { "yes" } else { "no" }.into(),
                ]);
            }
            println!();
            print_table(&rows);
        }
    }
    Ok(0)
}
