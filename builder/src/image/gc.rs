//! Who needs what in the state directory, and collecting the rest: the
//! accounting behind `kiln du`, and the collection behind `kiln prune` and
//! `kiln rmi`.
//!
//! Three kinds of roots keep layers and blobs: stored images (named or
//! not, found through `index.json`), build-cache records (passed in as
//! [`Roots`] by the caller, which owns the cache) and the leases and pins of
//! the snapshotter (running builds). [`collect`] removes everything none of
//! them reaches, under the snapshotter's exclusive GC lock.
//!
//! It never decides which images or cache records go: callers remove those
//! first and then collect.

use std::collections::{HashMap, HashSet};

use kiln_snapshotter::content::{ContentStore, REF_NAME};
use kiln_snapshotter::layers::{self, LayerInfo};
use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest};

use super::store::Result;

/// Layers (top chain IDs; their parents come with them) and blobs that
/// something needs, as digest strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roots {
    pub chains: HashSet<String>,
    pub blobs: HashSet<String>,
}

impl Roots {
    /// Everything `other` needs, too.
    pub fn extend(&mut self, other: &Roots) {
        self.chains.extend(other.chains.iter().cloned());
        self.blobs.extend(other.blobs.iter().cloned());
    }
}

/// What the stored images need: named ones and unnamed ones apart, since
/// `kiln prune --all` frees the unnamed.
#[derive(Debug, Clone, Default)]
pub struct ImageRoots {
    pub named: Roots,
    pub unnamed: Roots,
    pub named_count: usize,
    pub unnamed_count: usize,
}

impl ImageRoots {
    /// Everything any stored image needs.
    pub fn all(&self) -> Roots {
        let mut r = self.named.clone();
        r.extend(&self.unnamed);
        r
    }
}

/// Walk `index.json`: every entry's manifests, configs and layer blobs and
/// its top chain IDs (every platform of an index is kept).
pub fn image_roots(content: &ContentStore) -> Result<ImageRoots> {
    let mut out = ImageRoots::default();
    for entry in content.index()?.manifests() {
        let named = entry
            .annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(REF_NAME));
        let (roots, count) = if named {
            (&mut out.named, &mut out.named_count)
        } else {
            (&mut out.unnamed, &mut out.unnamed_count)
        };
        *count += 1;
        walk(content, entry, roots)?;
    }
    Ok(out)
}

fn walk(content: &ContentStore, entry: &Descriptor, roots: &mut Roots) -> Result<()> {
    let mut todo = vec![entry.clone()];
    while let Some(d) = todo.pop() {
        if !roots.blobs.insert(d.digest().to_string()) {
            continue;
        }
        let bytes = match content.read_blob(d.digest()) {
            Ok(b) => b,
            // a dangling reference keeps nothing
            Err(kiln_snapshotter::content::Error::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        // by content, not media type: docker schema 2 has the OCI shape
        if let Ok(m) = ImageManifest::from_reader(&bytes[..]) {
            roots.blobs.insert(m.config().digest().to_string());
            roots
                .blobs
                .extend(m.layers().iter().map(|l| l.digest().to_string()));
            let Ok(config) = content.read_blob(m.config().digest()) else {
                continue;
            };
            if let Ok(c) = ImageConfiguration::from_reader(&config[..]) {
                let ids: Vec<Digest> = c
                    .rootfs()
                    .diff_ids()
                    .iter()
                    .filter_map(|s| s.parse().ok())
                    .collect();
                roots
                    .chains
                    .extend(layers::chain_id_of(&ids).map(|c| c.to_string()));
            }
        } else if let Ok(idx) = ImageIndex::from_reader(&bytes[..]) {
            todo.extend(idx.manifests().iter().cloned());
        }
    }
    Ok(())
}

/// Every layer the chains in `roots` stand on (the chains included).
pub fn layer_closure(all: &[LayerInfo], roots: &HashSet<String>) -> HashSet<String> {
    let parent: HashMap<String, Option<String>> = all
        .iter()
        .map(|l| {
            (
                l.chain_id.to_string(),
                l.parent.as_ref().map(ToString::to_string),
            )
        })
        .collect();
    let mut keep = HashSet::new();
    for r in roots {
        let mut cur = Some(r.clone());
        while let Some(c) = cur {
            if !keep.insert(c.clone()) {
                break;
            }
            cur = parent.get(&c).cloned().flatten();
        }
    }
    keep
}

/// What [`collect`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    pub layers: usize,
    pub blobs: usize,
}

/// Remove every layer and blob that no stored image, no root in `keep`,
/// and no live lease or pin reaches. Image roots are read under the same
/// exclusive lock, so an image named meanwhile is never collected.
pub fn collect(snap: &Snapshotter, keep: &Roots) -> Result<Collected> {
    let guard = snap.layers().gc_guard(true)?;
    let mut roots = image_roots(snap.content())?.all();
    roots.extend(keep);
    // a compressed variant lives as long as its source
    let variants = kiln_snapshotter::variants::all(snap.content())?;
    for (src, v) in variants {
        if roots.blobs.contains(src.as_ref()) {
            roots.blobs.insert(v.to_string());
        }
    }
    let mut chains: Vec<Digest> = roots.chains.iter().filter_map(|c| c.parse().ok()).collect();
    // a blob kept as an unpacked layer keeps that layer
    chains.extend(
        roots
            .blobs
            .iter()
            .filter_map(|b| b.parse().ok())
            .filter_map(|b| snap.content().lazy_layer(&b)),
    );
    let (report, lease_blobs) = snap.layers().gc_with(&guard, &chains)?;
    let mut blobs = 0;
    for d in snap.content().list()? {
        let s = d.to_string();
        if !roots.blobs.contains(&s) && !lease_blobs.contains(&s) {
            snap.content().delete(&d)?;
            blobs += 1;
        }
    }
    kiln_snapshotter::variants::prune(snap.content())?;
    snap.content().prune_lazy()?;
    Ok(Collected {
        layers: report.removed.len(),
        blobs,
    })
}

/// One row of `kiln du`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    /// how many objects
    pub total: usize,
    /// how many are in use (images: named; layers: needed by a named
    /// image; cache: records of steps whose layers named images hold)
    pub active: usize,
    /// bytes on disk
    pub size: u64,
    /// bytes `kiln prune` would free (images: `kiln prune --all`)
    pub reclaimable: u64,
}

/// Space used in the state directory, split the way `docker system df`
/// splits it. The build cache's unpacked layers are also part of the
/// layers row (as its reclaimable part); `on_disk` counts every byte once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// blobs of stored images (manifests, configs, layers)
    pub images: Row,
    /// unpacked layers (what views are made of)
    pub layers: Row,
    /// cache records and the layers (blobs and unpacked) only they need
    pub build_cache: Row,
    /// `RUN --mount=type=cache` directories, one object per instance;
    /// active: held by a running build (see [`Usage::add_cache_mounts`])
    pub cache_mounts: Row,
    /// blobs, unpacked layers, cache records and cache mounts together
    pub on_disk: u64,
}

impl Usage {
    /// Count the cache mount instances of
    /// [`CacheMounts::usage`](super::cache_mounts::CacheMounts::usage):
    /// `kiln prune` frees every one no build holds.
    pub fn add_cache_mounts(&mut self, mounts: &[super::cache_mounts::CacheUsage]) {
        let size: u64 = mounts.iter().map(|m| m.bytes).sum();
        self.cache_mounts = Row {
            total: mounts.len(),
            active: mounts.iter().filter(|m| m.in_use).count(),
            size,
            reclaimable: mounts.iter().filter(|m| !m.in_use).map(|m| m.bytes).sum(),
        };
        self.on_disk += size;
    }
}

/// One cache record as the accounting sees it.
#[derive(Debug, Clone, Default)]
pub struct CacheRoot {
    /// the chain the record's step produced and the blobs of its layers
    pub roots: Roots,
    /// the record's own top layer and blob (what its step made)
    pub top_chain: Option<String>,
    pub top_blob: Option<String>,
    /// the record file's size
    pub bytes: u64,
    /// every layer and blob it names is still stored (a hit would be used)
    pub usable: bool,
}

/// Whether a cache record only names what named images keep anyway (its
/// step's layer is part of a named image): dropping it frees nothing but
/// its file and costs a rebuild, so plain `kiln prune` keeps it, as
/// BuildKit keeps records in use.
pub fn held_by_images(root: &CacheRoot, named: &Roots, named_layers: &HashSet<String>) -> bool {
    root.usable
        && root
            .top_chain
            .as_ref()
            .is_some_and(|c| named_layers.contains(c))
        && root.roots.blobs.is_subset(&named.blobs)
}

/// Bytes of each blob in the content store.
fn blob_sizes(content: &ContentStore) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for d in content.list()? {
        let len = content
            .blob_path(&d)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        out.insert(d.to_string(), len);
    }
    Ok(out)
}

/// The bytes freeing each record would give back: its file, plus its own
/// top layer and blob when no image needs them (each counted for one
/// record only, the first to name it). Prune's `--keep-storage` weighs
/// records by this.
pub fn record_sizes(snap: &Snapshotter, records: &[CacheRoot]) -> Result<Vec<u64>> {
    let images = image_roots(snap.content())?.all();
    let all_layers = snap.layers().list()?;
    let image_layers = layer_closure(&all_layers, &images.chains);
    let layer_bytes = snap.layers().usage()?.layers;
    let blob_bytes = blob_sizes(snap.content())?;
    // apart: a plain first layer's blob digest is its chain ID too
    let mut counted_chains = HashSet::new();
    let mut counted_blobs = HashSet::new();
    Ok(records
        .iter()
        .map(|r| {
            let mut n = r.bytes;
            if let Some(c) = &r.top_chain {
                if !image_layers.contains(c) && counted_chains.insert(c.clone()) {
                    n += layer_bytes.get(c).copied().unwrap_or(0);
                }
            }
            if let Some(b) = &r.top_blob {
                if !images.blobs.contains(b) && counted_blobs.insert(b.clone()) {
                    n += blob_bytes.get(b).copied().unwrap_or(0);
                }
            }
            n
        })
        .collect())
}

/// Measure the state directory; `records` are the build cache's records.
pub fn usage(snap: &Snapshotter, records: &[CacheRoot]) -> Result<Usage> {
    let images = image_roots(snap.content())?;
    let all_images = images.all();
    let blob_bytes = blob_sizes(snap.content())?;
    let size_of = |set: &HashSet<String>| -> u64 {
        set.iter()
            .filter_map(|b| blob_bytes.get(b))
            .copied()
            .sum::<u64>()
    };
    let image_blobs: HashSet<String> = all_images
        .blobs
        .iter()
        .filter(|b| blob_bytes.contains_key(*b))
        .cloned()
        .collect();
    let unnamed_only: HashSet<String> = images
        .unnamed
        .blobs
        .difference(&images.named.blobs)
        .cloned()
        .collect();
    let image_row = Row {
        total: images.named_count + images.unnamed_count,
        active: images.named_count,
        size: size_of(&image_blobs),
        reclaimable: size_of(&unnamed_only),
    };

    let all_layers = snap.layers().list()?;
    let layer_usage = snap.layers().usage()?;
    let named_layers = layer_closure(&all_layers, &images.named.chains);
    let layers_row = Row {
        total: all_layers.len(),
        active: named_layers.len(),
        size: layer_usage.total,
        reclaimable: layer_usage
            .layers
            .iter()
            .filter(|(c, _)| !named_layers.contains(*c))
            .map(|(_, b)| *b)
            .sum(),
    };

    let mut cache_blobs = HashSet::new();
    for r in records {
        cache_blobs.extend(
            r.roots
                .blobs
                .iter()
                .filter(|b| !image_blobs.contains(*b))
                .cloned(),
        );
    }
    let mut cache_chains = HashSet::new();
    for r in records {
        cache_chains.extend(r.roots.chains.iter().cloned());
    }
    let image_layers = layer_closure(&all_layers, &all_images.chains);
    let cache_layer_bytes: u64 = layer_closure(&all_layers, &cache_chains)
        .difference(&image_layers)
        .filter_map(|c| layer_usage.layers.get(c))
        .sum();
    let record_bytes: u64 = records.iter().map(|r| r.bytes).sum();
    let cache_size = record_bytes + size_of(&cache_blobs) + cache_layer_bytes;
    let held: Vec<&CacheRoot> = records
        .iter()
        .filter(|r| held_by_images(r, &images.named, &named_layers))
        .collect();
    let cache_row = Row {
        total: records.len(),
        active: held.len(),
        size: cache_size,
        reclaimable: cache_size - held.iter().map(|r| r.bytes).sum::<u64>(),
    };
    Ok(Usage {
        images: image_row,
        layers: layers_row,
        build_cache: cache_row,
        cache_mounts: Row::default(),
        on_disk: snap.content().usage()? + layer_usage.total + record_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_snapshotter::content::sha256_digest;
    use sha2::{Digest as _, Sha256};

    fn d(s: &str) -> Digest {
        sha256_digest(Sha256::digest(s.as_bytes()))
    }

    #[test]
    fn closure_follows_parents_and_stops_at_unknown_chains() {
        let (a, b, c, x) = (d("a"), d("b"), d("c"), d("x"));
        let all = vec![
            LayerInfo {
                chain_id: a.clone(),
                diff_id: a.clone(),
                parent: None,
            },
            LayerInfo {
                chain_id: b.clone(),
                diff_id: b.clone(),
                parent: Some(a.clone()),
            },
            LayerInfo {
                chain_id: c.clone(),
                diff_id: c.clone(),
                parent: Some(a.clone()),
            },
        ];
        let roots: HashSet<String> = [b.to_string(), x.to_string()].into();
        let keep = layer_closure(&all, &roots);
        assert!(keep.contains(&a.to_string()) && keep.contains(&b.to_string()));
        assert!(!keep.contains(&c.to_string()));
        assert!(keep.contains(&x.to_string()));
    }
}
