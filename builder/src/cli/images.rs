//! The image commands: `kiln load`, `kiln import`, `kiln images`, `kiln rmi`,
//! `kiln tag` and `kiln save` (export a stored image with any `--output`
//! type). Each
//! opens the state directory, does one thing through `kiln_builder::image`
//! and prints what docker would print. Must run after kiln has entered its
//! user namespace with a private mount namespace.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::snapshot::Snapshotter;

use crate::image::archive::{self, Format};
use crate::image::export::{self, ExportOptions};
use crate::image::import::{self, ImportOptions, Source};
use crate::image::output::{Dest, OutputSpec};
use crate::image::reference::Reference;
use crate::image::store::{short_id, ImageStore, Platform};
use crate::image::{time, StateDir};

/// Open the state directory and the snapshotter in it. Store commands make
/// no views, so the copy backend (nothing to probe or mount) is enough.
pub fn open_state(root: Option<&Path>) -> anyhow::Result<(StateDir, Snapshotter)> {
    let state = StateDir::open(root)?;
    let snap = Snapshotter::open(&state.snapshotter_root(), BackendKind::Copy)
        .with_context(|| format!("cannot open the image store in {}", state.root().display()))?;
    Ok((state, snap))
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Read from this docker-archive or oci-archive tar instead of standard
    /// input
    #[arg(long, short = 'i', value_name = "FILE")]
    input: Option<PathBuf>,
    /// Print nothing but errors
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// `kiln load`.
pub fn load(root: Option<&Path>, args: LoadArgs) -> anyhow::Result<i32> {
    let reader: Box<dyn Read> = match &args.input {
        Some(p) => Box::new(File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        None => {
            if io::stdin().is_terminal() {
                bail!("no archive given: pass -i FILE or pipe an archive into standard input");
            }
            Box::new(io::stdin().lock())
        }
    };
    let (_state, snap) = open_state(root)?;
    let store = ImageStore::new(&snap);
    let what = args
        .input
        .as_ref()
        .map_or_else(|| "standard input".to_string(), |p| p.display().to_string());
    let loaded = archive::load(&store, reader).with_context(|| format!("cannot load {what}"))?;
    for img in &loaded.images {
        for w in &img.warnings {
            eprintln!("kiln: warning: {w}");
        }
        if args.quiet {
            continue;
        }
        if img.names.is_empty() {
            println!("Loaded image ID: {}", img.id);
        }
        for n in &img.names {
            let shown = Reference::parse(n).map_or_else(|_| n.clone(), |r| r.familiar());
            println!("Loaded image: {shown}");
        }
    }
    if !args.quiet && loaded.format == Format::OciArchive && loaded.images.is_empty() {
        println!("No images in the archive");
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Root filesystem: a directory, a tar file (plain, gzip or zstd), or
    /// `-` for a tar on standard input
    #[arg(value_name = "FILE|DIR")]
    source: String,
    /// Name the image (repeatable); `busybox` means
    /// docker.io/library/busybox:latest
    #[arg(long, short = 't', value_name = "NAME[:TAG]", required = true)]
    tag: Vec<String>,
    /// Platform recorded in the config, `os/arch[/variant]`; default the
    /// host's
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// Commit message for the history entry
    #[arg(long, short = 'm')]
    message: Option<String>,
}

/// `kiln import`.
pub fn import_cmd(root: Option<&Path>, args: ImportArgs) -> anyhow::Result<i32> {
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).with_context(|| {
            format!("--platform {p:?}: expected os/arch[/variant], e.g. linux/amd64")
        })?,
        None => Platform::host(),
    };
    // check every name before storing anything
    for t in &args.tag {
        Reference::parse(t).with_context(|| format!("-t {t:?}"))?;
    }
    let (_state, snap) = open_state(root)?;
    let store = ImageStore::new(&snap);
    let path = Path::new(&args.source);
    let source = if args.source == "-" {
        Source::Tar(Box::new(io::stdin().lock()))
    } else if path.is_dir() {
        Source::Dir(path)
    } else {
        Source::Tar(Box::new(
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ))
    };
    let opts = ImportOptions {
        platform,
        source_label: args.message.clone().unwrap_or_else(|| args.source.clone()),
        created: None,
    };
    let image = import::import(&store, source, &opts)
        .with_context(|| format!("cannot import {}", args.source))?;
    for t in &args.tag {
        store.tag(t, &image.target)?;
    }
    println!("{}", image.id());
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Only images of this repository (`busybox`), or this name with a tag
    #[arg(value_name = "REPOSITORY[:TAG]")]
    reference: Option<String>,
    /// Only show image IDs
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Show full IDs
    #[arg(long)]
    no_trunc: bool,
    /// Show manifest digests
    #[arg(long)]
    digests: bool,
}

/// Sizes as docker prints them: SI units, three significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    // precision loss is irrelevant for a three-digit display
    #[allow(clippy::cast_precision_loss)]
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let s = if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[unit])
}

/// `kiln images`.
pub fn images(root: Option<&Path>, args: ImagesArgs) -> anyhow::Result<i32> {
    let (_state, snap) = open_state(root)?;
    let store = ImageStore::new(&snap);
    let mut rows = store.list()?;
    if let Some(want) = &args.reference {
        let r = Reference::parse(want).with_context(|| format!("{want:?}"))?;
        // a tag given explicitly must match; the default `latest` does not
        let tagged = want
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'));
        rows.retain(|row| {
            row.name
                .as_deref()
                .and_then(|n| Reference::parse(n).ok())
                .is_some_and(|n| n.repository() == r.repository() && (!tagged || n.tag == r.tag))
        });
    }
    // newest first, as docker lists them; by name within one time
    let created =
        |r: &crate::image::store::ImageSummary| r.created.as_deref().and_then(time::parse_rfc3339);
    rows.sort_by(|a, b| {
        created(b)
            .cmp(&created(a))
            .then_with(|| a.name.cmp(&b.name))
    });
    let id = |d: &oci_spec::image::Digest| {
        if args.no_trunc {
            d.to_string()
        } else {
            short_id(d)
        }
    };
    if args.quiet {
        let mut seen = Vec::new();
        for r in &rows {
            let s = id(&r.id);
            if !seen.contains(&s) {
                println!("{s}");
                seen.push(s);
            }
        }
        return Ok(0);
    }
    let now = time::now();
    let mut table: Vec<Vec<String>> = vec![{
        let mut h = vec!["REPOSITORY".to_string(), "TAG".to_string()];
        if args.digests {
            h.push("DIGEST".into());
        }
        h.extend(["IMAGE ID", "CREATED", "SIZE"].map(String::from));
        h
    }];
    for r in &rows {
        let (repo, tag) = match r.name.as_deref().map(Reference::parse) {
            Some(Ok(n)) => (
                n.familiar_repository(),
                n.tag.unwrap_or_else(|| "<none>".into()),
            ),
            _ => ("<none>".to_string(), "<none>".to_string()),
        };
        let created = r
            .created
            .as_deref()
            .and_then(time::parse_rfc3339)
            .map_or_else(|| "N/A".to_string(), |t| time::human_age(now - t));
        let mut row = vec![repo, tag];
        if args.digests {
            row.push(r.digest.to_string());
        }
        row.extend([id(&r.id), created, human_size(r.size)]);
        table.push(row);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Images to remove: names, IDs or digests
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    /// Remove an image by ID even when several names refer to it
    #[arg(long, short = 'f')]
    force: bool,
}

/// `kiln rmi`: untag, then collect what no image and no cache record needs
/// any more.
pub fn rmi(root: Option<&Path>, args: RmiArgs) -> anyhow::Result<i32> {
    let (state, snap) = open_state(root)?;
    let store = ImageStore::new(&snap);
    let mut failed = 0;
    for what in &args.images {
        match store.remove(what, args.force) {
            Ok(removed) => {
                for n in &removed.untagged {
                    let shown = Reference::parse(n).map_or_else(|_| n.clone(), |r| r.familiar());
                    println!("Untagged: {shown}");
                }
                for d in &removed.deleted {
                    println!("Deleted: {d}");
                }
            }
            Err(e) => {
                eprintln!("kiln: error: {}", super::chain(&anyhow::Error::new(e)));
                failed += 1;
            }
        }
    }
    // the build cache keeps its layers: `kiln prune` frees those
    super::prune::collect_keeping_cache(&state, &snap).context("garbage collection after rmi")?;
    Ok(if failed > 0 { 1 } else { 0 })
}

#[derive(Args, Debug)]
pub struct TagArgs {
    /// The image: a name, ID or digest
    #[arg(value_name = "SOURCE")]
    source: String,
    /// The new name
    #[arg(value_name = "TARGET")]
    target: String,
}

/// `kiln tag`.
pub fn tag(root: Option<&Path>, args: TagArgs) -> anyhow::Result<i32> {
    Reference::parse(&args.target).with_context(|| format!("{:?}", args.target))?;
    let (_state, snap) = open_state(root)?;
    let store = ImageStore::new(&snap);
    let image = store.resolve(&args.source)?;
    store.tag(&args.target, &image.target)?;
    Ok(0)
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    /// The image: a name, ID or digest
    #[arg(value_name = "IMAGE")]
    image: String,
    /// Where and how to write it, BuildKit's --output syntax
    /// (type=oci|docker|local|tar|image,dest=...,compression=...)
    #[arg(long, value_name = "SPEC", conflicts_with = "file")]
    output: Option<String>,
    /// Write a docker-archive to FILE (`docker save -o`)
    #[arg(long = "file", short = 'o', value_name = "FILE")]
    file: Option<PathBuf>,
    /// Platform to pick when the image is a multi-platform index
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
}

/// `kiln save`.
pub fn save(root: Option<&Path>, args: SaveArgs) -> anyhow::Result<i32> {
    let mut spec = match (&args.output, &args.file) {
        (Some(s), _) => OutputSpec::parse(s)?,
        (None, Some(f)) => OutputSpec::parse(&format!("type=docker,\"dest={}\"", f.display()))?,
        (None, None) => OutputSpec::parse("type=docker,dest=-")?,
    };
    if spec.dest == Some(Dest::Stdout) && io::stdout().is_terminal() {
        bail!(
            "refusing to write an archive to a terminal: pass -o FILE or redirect standard output"
        );
    }
    let (_state, snap) = open_state(root)?;
    let mut store = ImageStore::new(&snap);
    if let Some(p) = &args.platform {
        store = store.with_platform(
            Platform::parse(p).with_context(|| format!("--platform {p:?}: expected os/arch"))?,
        );
    }
    let image = store.resolve(&args.image)?;
    if spec.names.is_empty() {
        spec.names.extend(image.name.clone());
    }
    let opts = ExportOptions {
        source_date_epoch: time::source_date_epoch(),
    };
    export::export(&store, &image, &spec, &opts)
        .with_context(|| format!("cannot export {}", args.image))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1000), "1kB");
        assert_eq!(human_size(1_234_567), "1.23MB");
        assert_eq!(human_size(45_600_000), "45.6MB");
        assert_eq!(human_size(123_400_000_000), "123GB");
    }
}
