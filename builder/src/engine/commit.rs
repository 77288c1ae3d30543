//! Turning a step's view into a layer of the image state ([`Engine::commit`],
//! the snapshotter's diff), and the finished state into a stored image
//! config and manifest ([`Engine::store_image`]).

use std::sync::Arc;
use std::time::Instant;

use kiln_snapshotter::diff::DiffOptions;
use oci_spec::image::{Digest, MediaType};
use serde_json::json;

use super::error::{Error, Result, StepError};
use super::image_state::{History, ImageState, LayerRef};
use super::solver::Engine;
use super::{progress, remote_cache, step_cache, Built};

/// Comment BuildKit puts on every history entry it writes.
pub const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

/// `epoch` (SOURCE_DATE_EPOCH) or now, as an RFC 3339 history time.
pub fn now_or_epoch(epoch: Option<i64>) -> String {
    let secs = epoch.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
            .unwrap_or(0)
    });
    crate::image::time::format_rfc3339(secs)
}

/// A layer's descriptor in the image manifest.
fn layer_descriptor(l: &LayerRef) -> serde_json::Value {
    let mut d = json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size});
    if let Some(e) = l.rewritten_timestamp {
        d["annotations"] = json!({ REWRITTEN_TIMESTAMP: e.to_string() });
    }
    d
}

/// BuildKit's annotation on a layer whose file times were clamped to
/// SOURCE_DATE_EPOCH.
pub const REWRITTEN_TIMESTAMP: &str = "buildkit/rewritten-timestamp";

impl Engine {
    /// The time a committed layer's files are clamped to, if any. It is
    /// part of every layer-making step's key: a layer clamped to another
    /// epoch (or not at all) is another layer.
    pub(super) fn layer_epoch(&self) -> Option<i64> {
        self.opts
            .source_date_epoch
            .filter(|_| self.opts.rewrite_timestamp)
    }

    /// Make the layer of a finished step's `view` and add it, with its
    /// history entry, to `state`.
    pub(super) fn commit(
        &self,
        view: kiln_snapshotter::snapshot::View,
        state: &mut ImageState,
        created_by: String,
        vertex: usize,
    ) -> std::result::Result<(), StepError> {
        let t = Instant::now();
        let epoch = self.layer_epoch();
        // plain tar: no step waits for a compressor; outputs that leave
        // the store compress what they send (kiln_snapshotter::variants)
        let committed = self.snap.commit(
            view,
            DiffOptions {
                source_date_epoch: epoch,
                compression: kiln_snapshotter::Compression::None,
            },
        )?;
        self.progress.phase(
            vertex,
            &format!("layer diff {}", progress::bytes(committed.blob.size())),
            t,
        );
        state.chain = Some(committed.chain_id.to_string());
        state.layers.push(LayerRef {
            diff_id: committed.diff_id.to_string(),
            digest: committed.blob.digest().to_string(),
            size: committed.blob.size(),
            media_type: committed.blob.media_type().to_string(),
            stored_plain: false,
            rewritten_timestamp: epoch,
        });
        let created = Some(now_or_epoch(self.opts.source_date_epoch));
        state.history.push(History {
            created_by,
            empty_layer: false,
            comment: Some(HISTORY_COMMENT.into()),
            created,
        });
        Ok(())
    }

    /// Store the image `state` describes; with `inline`, its config also
    /// carries those cache records (`--cache-to type=inline`).
    pub(super) fn store_image(
        &self,
        state: ImageState,
        inline: Option<Vec<remote_cache::Record>>,
    ) -> Result<Built> {
        // The image is as old as its newest step (or SOURCE_DATE_EPOCH), so
        // a rebuild from cache is byte-identical.
        let created = match self.opts.source_date_epoch {
            Some(e) => crate::image::time::format_rfc3339(e),
            None => state
                .history
                .last()
                .and_then(|h| h.created.clone())
                .unwrap_or_else(|| now_or_epoch(None)),
        };
        let mut config = state.config_json(&created);
        if let Some(records) = inline {
            config[remote_cache::INLINE_KEY] = serde_json::to_value(remote_cache::CacheConfig {
                records,
            })
            .map_err(|source| Error::Json {
                what: "inline cache",
                source,
            })?;
        }
        let content = self.snap.content();
        // Blobs written here are leased before GC may run again, and the
        // layers' blobs are leased and checked: a concurrent `kiln prune`
        // must not leave a stored image pointing at collected blobs.
        let _no_gc = self
            .snap
            .layers()
            .gc_guard(false)
            .map_err(|e| Error::Lease(Box::new(e)))?;
        if !step_cache::keep_for_build(&state, &self.snap) {
            return Err(Error::Collected);
        }
        let lease = |d: &Digest| {
            self.snap
                .lease()
                .add_blob(d)
                .map_err(|e| Error::Lease(Box::new(e)))
        };
        let config_bytes = serde_json::to_vec(&config).map_err(|source| Error::Json {
            what: "config",
            source,
        })?;
        let config_desc = content
            .put_bytes(MediaType::ImageConfig, &config_bytes)
            .map_err(|e| Error::Store(Box::new(e)))?;
        lease(config_desc.digest())?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_desc.digest().to_string(), "size": config_desc.size()},
            "layers": state.layers.iter().map(layer_descriptor).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|source| Error::Json {
            what: "manifest",
            source,
        })?;
        let manifest_desc = content
            .put_bytes(MediaType::ImageManifest, &manifest_bytes)
            .map_err(|e| Error::Store(Box::new(e)))?;
        lease(manifest_desc.digest())?;
        Ok(Built {
            snap: Arc::clone(&self.snap),
            manifest: manifest_desc,
            config_digest: config_desc.digest().clone(),
            state,
            executed: 0,
            cached: 0,
            trail: Vec::new(),
        })
    }
}
