//! `kiln imagetools create` and `kiln imagetools inspect`, as `docker
//! buildx imagetools`: the second half of the split multi-platform CI
//! pattern (one runner per platform pushes its image by digest, then one
//! job merges the digests into an index under a tag), and a look at what a
//! registry holds under a name. Both talk to registries only; the local
//! store is used as a scratch place for blobs copied between repositories.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use oci_spec::image::{Descriptor, ImageManifest};
use serde_json::{json, Value};

use super::registry::{client, open_store, runtime};
use crate::image::reference::Reference;
use crate::image::ImageStore;
use crate::registry::http::Op;
use crate::registry::{remote_ref, Registry};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The most sources one index takes: an index is read whole by every
/// client, and no real image has more platforms than this.
const MAX_SOURCES: usize = 256;

/// `kiln imagetools`.
#[derive(Args, Debug)]
pub struct ImagetoolsCmd {
    #[command(subcommand)]
    cmd: Imagetools,
}

#[derive(Subcommand, Debug)]
enum Imagetools {
    /// Make an index of images already in registries and push it under
    /// each -t name (as `docker buildx imagetools create`)
    Create(CreateArgs),
    /// Show what a registry holds under a name (as `docker buildx
    /// imagetools inspect`)
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// A name for the index (several allowed; at least one)
    #[arg(long, short = 't', value_name = "REF", required = true)]
    tag: Vec<String>,
    /// Print the index instead of pushing it
    #[arg(long)]
    dry_run: bool,
    /// The images (or indexes, whose entries are taken) to combine:
    /// NAME@sha256:DIGEST or NAME[:TAG]
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<String>,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// NAME[:TAG] or NAME@sha256:DIGEST
    name: String,
    /// Print the manifest or index exactly as the registry sends it
    #[arg(long)]
    raw: bool,
}

/// Run `kiln imagetools`.
pub fn run(root: Option<&Path>, insecure: &[String], cmd: ImagetoolsCmd) -> anyhow::Result<i32> {
    let reg = client(insecure)?;
    let rt = runtime()?;
    match cmd.cmd {
        Imagetools::Inspect(args) => rt.block_on(inspect(&reg, &args)),
        Imagetools::Create(args) => {
            if args.sources.len() > MAX_SOURCES {
                bail!("imagetools create: at most {MAX_SOURCES} sources");
            }
            let snap = open_store(root)?;
            rt.block_on(async {
                let store = ImageStore::new(&snap);
                create(&reg, &store, &args).await
            })
        }
    }
}

fn parse(name: &str) -> anyhow::Result<Reference> {
    Reference::parse(name).with_context(|| format!("image name {name:?}"))
}

async fn fetch(reg: &Registry, r: &Reference) -> anyhow::Result<(Vec<u8>, String, String)> {
    let host = r.domain.clone();
    reg.authenticate(&r.to_string(), &host, &remote_ref(r, &host), Op::Pull)
        .await?;
    let (bytes, digest, media) = reg.fetch_manifest(r, &host).await?;
    Ok((bytes, digest.to_string(), media))
}

fn is_index(media: &str) -> bool {
    media.contains("index") || media.contains("manifest.list")
}

async fn inspect(reg: &Registry, args: &InspectArgs) -> anyhow::Result<i32> {
    let r = parse(&args.name)?;
    let (bytes, digest, media) = fetch(reg, &r).await?;
    if args.raw {
        std::io::stdout().write_all(&bytes)?;
        return Ok(0);
    }
    println!("Name:      {r}");
    println!("MediaType: {media}");
    println!("Digest:    {digest}");
    if is_index(&media) {
        let index: Value = serde_json::from_slice(&bytes).context("the index is not JSON")?;
        println!();
        println!("Manifests:");
        for m in index["manifests"].as_array().into_iter().flatten() {
            let d = m["digest"].as_str().unwrap_or_default();
            println!("  Name:      {r}@{d}");
            println!(
                "  MediaType: {}",
                m["mediaType"].as_str().unwrap_or_default()
            );
            println!("  Platform:  {}", platform_text(&m["platform"]));
            println!();
        }
    }
    Ok(0)
}

/// `os/arch[/variant]` of an index entry's platform.
fn platform_text(p: &Value) -> String {
    let mut t = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or("unknown"),
        p["architecture"].as_str().unwrap_or("unknown")
    );
    if let Some(v) = p["variant"].as_str() {
        t.push('/');
        t.push_str(v);
    }
    t
}

async fn create(reg: &Registry, store: &ImageStore<'_>, args: &CreateArgs) -> anyhow::Result<i32> {
    let targets = args
        .tag
        .iter()
        .map(|t| parse(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut entries: Vec<Value> = Vec::new();
    for s in &args.sources {
        let src = parse(s)?;
        for entry in source_entries(reg, store, &src, &targets).await? {
            if !entries.iter().any(|e| e["digest"] == entry["digest"]) {
                entries.push(entry);
            }
        }
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    });
    let bytes = serde_json::to_vec(&index)?;
    let digest = crate::registry::digest_of(&bytes);
    if args.dry_run {
        println!("{}", serde_json::to_string_pretty(&index)?);
        return Ok(0);
    }
    for t in &targets {
        let host = t.domain.clone();
        reg.authenticate(&t.to_string(), &host, &remote_ref(t, &host), Op::Push)
            .await?;
        reg.push_manifest(t, bytes.clone(), OCI_INDEX)
            .await
            .with_context(|| format!("pushing the index to {t}"))?;
        eprintln!("pushed {t} {digest}");
    }
    println!("{digest}");
    Ok(0)
}

/// The index entries one source gives (an image: itself, with its
/// platform read from its config; an index: its entries), each copied into
/// every target's repository that does not have it.
async fn source_entries(
    reg: &Registry,
    store: &ImageStore<'_>,
    src: &Reference,
    targets: &[Reference],
) -> anyhow::Result<Vec<Value>> {
    let (bytes, digest, media) = fetch(reg, src).await?;
    if !is_index(&media) {
        let platform = copy_manifest(reg, store, src, &bytes, &media, targets).await?;
        return Ok(vec![json!({
            "mediaType": media,
            "digest": digest,
            "size": bytes.len(),
            "platform": platform,
        })]);
    }
    let index: Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{src}: the index is not JSON"))?;
    let mut out = Vec::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        let d = m["digest"].as_str().unwrap_or_default().to_string();
        let child = Reference {
            tag: None,
            digest: Some(d),
            ..src.clone()
        };
        let (cbytes, _, cmedia) = fetch(reg, &child).await?;
        if is_index(&cmedia) {
            bail!("{child}: an index inside the index {src} (kiln combines images and indexes of images)");
        }
        copy_manifest(reg, store, &child, &cbytes, &cmedia, targets).await?;
        out.push(m.clone());
    }
    Ok(out)
}

/// Make the manifest `bytes` of `src` available in every target's
/// repository (its blobs mounted from `src`'s repository, or copied
/// through the local store when the registry cannot mount them, then the
/// manifest by digest), and return its platform from its config.
async fn copy_manifest(
    reg: &Registry,
    store: &ImageStore<'_>,
    src: &Reference,
    bytes: &[u8],
    media: &str,
    targets: &[Reference],
) -> anyhow::Result<Value> {
    let manifest = ImageManifest::from_reader(bytes)
        .with_context(|| format!("{src}: the manifest is not an image manifest"))?;
    let content = store.snapshotter().content();
    let host = src.domain.clone();
    reg.fetch_blob(content, src, &host, manifest.config(), "config")
        .await?;
    let config: Value = serde_json::from_slice(&content.read_blob(manifest.config().digest())?)
        .with_context(|| format!("{src}: the image config is not JSON"))?;
    let mut platform = json!({
        "architecture": config["architecture"],
        "os": config["os"],
    });
    if let Some(v) = config["variant"].as_str() {
        platform["variant"] = v.into();
    }
    // what the bytes hash to (fetch_manifest checked it against a pinned
    // source's digest)
    let digest = crate::registry::digest_of(bytes).to_string();
    for t in targets {
        if t.domain == src.domain && t.path == src.path {
            continue;
        }
        let at = Reference {
            tag: None,
            digest: Some(digest.clone()),
            ..t.clone()
        };
        let thost = t.domain.clone();
        reg.authenticate(&at.to_string(), &thost, &remote_ref(&at, &thost), Op::Push)
            .await?;
        let blobs: Vec<&Descriptor> = std::iter::once(manifest.config())
            .chain(manifest.layers())
            .collect();
        for b in blobs {
            reg.fetch_blob(content, src, &host, b, "layer").await?;
            reg.push_blob(store, &at, b, std::slice::from_ref(src))
                .await?;
        }
        reg.push_manifest(&at, bytes.to_vec(), media).await?;
    }
    Ok(platform)
}
