//! Pull: resolve a name on its registry (mirrors first), pick the
//! platform from an index, fetch the layers (at most [`PARALLEL_BLOBS`] at
//! once, each verified while it streams into the content store), then the
//! config and manifests, unpack, and name the image.

use kiln_snapshotter::content::{self, ContentStore};
use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest, MediaType};
use std::io::Write;

use super::http::{Op, Remote, Subject};
use super::{remote_ref, Error, Registry, Result, MAX_MANIFEST_BYTES, PARALLEL_BLOBS};
use crate::image::reference::Reference;
use crate::image::store::{self, Image, ImageStore, Platform};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    DOCKER_LIST,
    DOCKER_MANIFEST,
];

/// What [`Registry::pull`] stored.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// the name it is stored under (`None` for `name@digest`)
    pub name: Option<String>,
    /// the stored entry (an index or a manifest)
    pub target: Descriptor,
    pub image: Image,
}

fn is_index(media: Option<&str>, bytes: &[u8]) -> bool {
    match media {
        Some("application/vnd.oci.image.index.v1+json") | Some(DOCKER_LIST) => true,
        Some(_) => false,
        None => serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .is_some_and(|v| v.get("manifests").is_some()),
    }
}

fn media_of(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()?
        .get("mediaType")?
        .as_str()
        .map(str::to_string)
}

/// The body of a manifest response, refused past [`MAX_MANIFEST_BYTES`]:
/// by its Content-Length before anything is read, else while it streams.
async fn read_manifest_body(name: &str, host: &str, mut res: reqwest::Response) -> Result<Vec<u8>> {
    let too_large = |size: String| Error::BadManifest {
        reference: name.to_string(),
        reason: format!("it is {size} the {MAX_MANIFEST_BYTES} bytes kiln reads"),
    };
    if let Some(len) = res.content_length().filter(|l| *l > MAX_MANIFEST_BYTES) {
        return Err(too_large(format!("{len} bytes, more than")));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| Error::Registry {
        reference: name.to_string(),
        host: host.to_string(),
        reason: crate::error_chain(&e),
    })? {
        if (bytes.len() + chunk.len()) as u64 > MAX_MANIFEST_BYTES {
            return Err(too_large("longer than".into()));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// What a manifest or index document a registry sent means for a pull
/// for `platform`.
#[derive(Debug)]
pub enum Document {
    /// an image manifest
    Manifest(Box<ImageManifest>),
    /// an index: the entry for the platform, to fetch next
    Index(Box<Descriptor>),
}

/// Parse `bytes` (media type `media`, as sent for `name`): an image
/// manifest, or an index and its entry for `platform`. Never reads more
/// than `bytes`; every malformed document is an error naming `name`.
pub fn resolve_document(
    name: &str,
    media: &str,
    bytes: &[u8],
    platform: &Platform,
) -> Result<Document> {
    let bad_manifest = |reason: String| Error::BadManifest {
        reference: name.to_string(),
        reason,
    };
    if !is_index(Some(media), bytes) {
        return ImageManifest::from_reader(bytes)
            .map(|m| Document::Manifest(Box::new(m)))
            .map_err(|e| bad_manifest(crate::error_chain(&e)));
    }
    let index = ImageIndex::from_reader(bytes).map_err(|e| bad_manifest(crate::error_chain(&e)))?;
    let pick = index.manifests().iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| platform_matches(platform, p))
    });
    if let Some(pick) = pick {
        return Ok(Document::Index(Box::new(pick.clone())));
    }
    let mut available: Vec<String> = index
        .manifests()
        .iter()
        .filter_map(|d| d.platform().as_ref())
        .map(|p| {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s.push('/');
                s.push_str(v);
            }
            s
        })
        .collect();
    available.sort();
    available.dedup();
    Err(Error::NoPlatform {
        reference: name.to_string(),
        platform: platform.to_string(),
        available: if available.is_empty() {
            "no platforms".into()
        } else {
            available.join(", ")
        },
    })
}

fn platform_matches(want: &Platform, p: &oci_spec::image::Platform) -> bool {
    want.matches(p)
}

impl Registry {
    /// Fetch the manifest (or index) `r` names from `host`: its bytes, its
    /// digest (checked against `r`'s digest when it has one) and media type.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        host: &str,
    ) -> Result<(Vec<u8>, Digest, String)> {
        let name = r.to_string();
        let remote = remote_ref(r, host);
        // the credentials of the host asked, which may be a mirror: the
        // origin's login is never sent to another registry
        let bytes = self.get_manifest(&name, host, &remote).await?;
        let digest = super::digest_of(&bytes);
        if let Some(want) = &r.digest {
            if digest.to_string() != *want {
                return Err(Error::BadBlob {
                    reference: name,
                    host: host.into(),
                    what: "manifest",
                    digest: want.clone(),
                    reason: format!("its bytes hash to {digest}"),
                });
            }
        }
        let media = media_of(&bytes).unwrap_or_else(|| {
            if is_index(None, &bytes) {
                "application/vnd.oci.image.index.v1+json".into()
            } else {
                "application/vnd.oci.image.manifest.v1+json".into()
            }
        });
        Ok((bytes.to_vec(), digest, media))
    }

    /// GET the manifest `remote` names, reading at most
    /// [`MAX_MANIFEST_BYTES`].
    async fn get_manifest(&self, name: &str, host: &str, remote: &Remote) -> Result<Vec<u8>> {
        let url = self
            .client
            .url(remote, &format!("manifests/{}", remote.reference));
        // the credentials of the host asked, which may be a mirror: the
        // origin's login is never sent to another registry
        let creds = Self::credentials(host)?;
        let who = Subject { name, host };
        let accept = ACCEPT.join(", ");
        let res = self
            .client
            .send(who, remote, &creds, Op::Pull, || {
                self.client.http.get(&url).header("Accept", &accept)
            })
            .await?;
        if !res.status().is_success() {
            return Err(who.status_error(&url, res).await);
        }
        read_manifest_body(name, host, res).await
    }

    /// Stream blob `desc` of repository `r` on `host` into `content`,
    /// verified against its digest and size; a blob already stored is not
    /// fetched. Returns whether it was written now.
    pub async fn fetch_blob(
        &self,
        content: &ContentStore,
        r: &Reference,
        host: &str,
        desc: &Descriptor,
        what: &'static str,
    ) -> Result<bool> {
        if content.contains(desc.digest()) {
            return Ok(false);
        }
        let name = r.to_string();
        // configs are read whole later: bounded like manifests
        if what.ends_with("config") && desc.size() > MAX_MANIFEST_BYTES {
            return Err(Error::BadManifest {
                reference: name,
                reason: format!(
                    "its {what} is {} bytes, more than the {MAX_MANIFEST_BYTES} bytes kiln reads",
                    desc.size()
                ),
            });
        }
        let remote = remote_ref(r, host);
        let digest = desc.digest().to_string();
        let bad = |reason: String| Error::BadBlob {
            reference: name.clone(),
            host: host.into(),
            what,
            digest: digest.clone(),
            reason,
        };
        let who = Subject { name: &name, host };
        let creds = Self::credentials(host)?;
        let url = self.client.url(&remote, &format!("blobs/{digest}"));
        let mut res = self
            .client
            .send(who, &remote, &creds, Op::Pull, || {
                self.client.http.get(&url)
            })
            .await?;
        if !res.status().is_success() {
            return Err(who.status_error(&url, res).await);
        }
        let mut w = content
            .writer(Some(desc.digest().clone()))
            .map_err(|e| bad(crate::error_chain(&e)))?;
        while let Some(chunk) = res.chunk().await.map_err(|e| bad(crate::error_chain(&e)))? {
            // stop at the size the manifest declares: a registry that
            // sends more is not read to its end
            if w.size() + chunk.len() as u64 > desc.size() {
                return Err(bad(format!(
                    "more than the {} bytes the manifest says",
                    desc.size()
                )));
            }
            w.write_all(&chunk)
                .map_err(|e| bad(crate::error_chain(&e)))?;
            if let Some(f) = &self.on_bytes {
                f(desc.digest(), w.size(), desc.size());
            }
        }
        if w.size() != desc.size() {
            return Err(bad(format!(
                "{} bytes received, the manifest says {}",
                w.size(),
                desc.size()
            )));
        }
        match w.commit() {
            Ok(_) => Ok(true),
            Err(content::Error::DigestMismatch { actual, .. }) => {
                Err(bad(format!("its bytes hash to {actual}")))
            }
            Err(e) => Err(bad(crate::error_chain(&e))),
        }
    }

    /// Pull `name` for `platform` into `store` and name it there. A
    /// `name@digest` already stored is returned without any request.
    /// Must run on a multi-thread tokio runtime (unpacking blocks).
    pub async fn pull(
        &self,
        store: &ImageStore<'_>,
        name: &str,
        platform: &Platform,
    ) -> Result<Pulled> {
        let r = Reference::parse(name)?;
        if r.digest.is_some() {
            if let Ok(image) = store.resolve(name) {
                return Ok(Pulled {
                    name: None,
                    target: image.target.clone(),
                    image,
                });
            }
        }
        let hosts = self.config.candidates(&r.domain);
        let mut last = None;
        for host in &hosts {
            match self.pull_from(store, &r, host, platform).await {
                Ok(p) => return Ok(p),
                // a platform the image lacks is the image's answer, not
                // the mirror's: the origin would say the same
                Err(e @ Error::NoPlatform { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("candidates always include the origin"))
    }

    async fn pull_from(
        &self,
        store: &ImageStore<'_>,
        r: &Reference,
        host: &str,
        platform: &Platform,
    ) -> Result<Pulled> {
        let name = r.to_string();
        let remote = remote_ref(r, host);
        self.authenticate(&name, host, &remote, Op::Pull).await?;
        let (docs, manifest) = self.resolve_manifest(&name, r, host, platform).await?;

        let snap = store.snapshotter();
        let content = snap.content();
        let store_err = |context: &'static str, e: store::Error| Error::Store {
            reference: name.clone(),
            context,
            source: Box::new(e),
        };
        // GC waits until the image is named: nothing fetched is collected
        // halfway through
        let _no_gc = snap
            .layers()
            .gc_guard(false)
            .map_err(|e| store_err("cannot take the store's GC lock", e.into()))?;
        let mut written: Vec<Digest> = Vec::new();
        let result = self
            .fetch_all(content, r, host, &manifest, &docs, &mut written)
            .await;
        if let Err(e) = result {
            drop(_no_gc);
            forget(store, &written);
            return Err(e);
        }
        for d in manifest
            .layers()
            .iter()
            .map(Descriptor::digest)
            .chain([manifest.config().digest()])
            .chain(docs.iter().map(|(_, d, _)| d))
        {
            snap.lease()
                .add_blob(d)
                .map_err(|e| store_err("cannot lease a pulled blob", e.into()))?;
        }
        let (_, top_digest2, top_media2) = &docs[0];
        let target = Descriptor::new(
            MediaType::from(top_media2.as_str()),
            docs[0].0.len() as u64,
            top_digest2.clone(),
        );
        let platform_store = ImageStore::new(snap).with_platform(platform.clone());
        let unpacked = tokio::task::block_in_place(|| -> Result<(Image, Option<String>)> {
            let image = platform_store
                .get(&target, None)
                .map_err(|e| store_err("cannot read the pulled image", e))?;
            platform_store
                .unpack(&image)
                .map_err(|e| store_err("cannot unpack the pulled layers", e))?;
            let stored_name = if r.tag.is_some() {
                let n = Reference {
                    digest: None,
                    ..r.clone()
                };
                Some(
                    platform_store
                        .tag(&n.to_string(), &target)
                        .map_err(|e| store_err("cannot name the pulled image", e))?,
                )
            } else {
                platform_store
                    .add_unnamed(&target)
                    .map_err(|e| store_err("cannot record the pulled image", e))?;
                None
            };
            Ok((image, stored_name))
        });
        let (image, stored_name) = match unpacked {
            Ok(x) => x,
            Err(e) => {
                drop(_no_gc);
                forget(store, &written);
                return Err(e);
            }
        };
        Ok(Pulled {
            name: stored_name,
            target,
            image,
        })
    }

    /// The manifest for `platform` that `r` names on `host`, and the
    /// documents fetched on the way (the index first, when there is one),
    /// each as (bytes, digest, media type).
    async fn resolve_manifest(
        &self,
        name: &str,
        r: &Reference,
        host: &str,
        platform: &Platform,
    ) -> Result<(Vec<(Vec<u8>, Digest, String)>, ImageManifest)> {
        let (top_bytes, top_digest, top_media) = self.fetch_manifest(r, host).await?;
        let mut docs: Vec<(Vec<u8>, Digest, String)> = Vec::new();
        let (man_bytes, man_digest, man_media, manifest) =
            match resolve_document(name, &top_media, &top_bytes, platform)? {
                Document::Manifest(m) => (top_bytes, top_digest.clone(), top_media, *m),
                Document::Index(pick) => {
                    let child = Reference {
                        digest: Some(pick.digest().to_string()),
                        tag: None,
                        ..r.clone()
                    };
                    docs.push((top_bytes, top_digest.clone(), top_media));
                    let (bytes, digest, media) = self.fetch_manifest(&child, host).await?;
                    match resolve_document(name, &media, &bytes, platform)? {
                        Document::Manifest(m) => (bytes, digest, media, *m),
                        Document::Index(_) => {
                            return Err(Error::BadManifest {
                                reference: name.to_string(),
                                reason: format!("the index's entry {digest} is another index"),
                            })
                        }
                    }
                }
            };
        docs.push((man_bytes, man_digest, man_media));
        Ok((docs, manifest))
    }

    async fn fetch_limited(
        &self,
        slots: &tokio::sync::Semaphore,
        content: &ContentStore,
        r: &Reference,
        host: &str,
        d: &Descriptor,
    ) -> (Digest, Result<bool>) {
        let _slot = slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        (
            d.digest().clone(),
            self.fetch_blob(content, r, host, d, "layer").await,
        )
    }

    /// Layers in parallel, then the config, then the manifests: the blobs
    /// an image's name leads to are stored last.
    async fn fetch_all(
        &self,
        content: &ContentStore,
        r: &Reference,
        host: &str,
        manifest: &ImageManifest,
        docs: &[(Vec<u8>, Digest, String)],
        written: &mut Vec<Digest>,
    ) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        let layers: Vec<&Descriptor> = manifest
            .layers()
            .iter()
            .filter(|d| seen.insert(d.digest().clone()))
            .collect();
        // plain async fn calls, no closures: a closure returning a future
        // that borrows its argument is not provably Send for every lifetime
        let slots = tokio::sync::Semaphore::new(PARALLEL_BLOBS);
        let mut futs = Vec::new();
        for d in layers {
            futs.push(self.fetch_limited(&slots, content, r, host, d));
        }
        let results = futures_util::future::join_all(futs).await;
        let mut first_err = None;
        for (d, res) in results {
            match res {
                Ok(true) => written.push(d),
                Ok(false) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if self
            .fetch_blob(content, r, host, manifest.config(), "config")
            .await?
        {
            written.push(manifest.config().digest().clone());
        }
        for (bytes, digest, _) in docs {
            if content.contains(digest) {
                continue;
            }
            // fetched and digest-checked above; stored through the same
            // verifying writer as every blob
            let bad = |reason: String| Error::BadBlob {
                reference: r.to_string(),
                host: host.into(),
                what: "manifest",
                digest: digest.to_string(),
                reason,
            };
            let mut w = content
                .writer(Some(digest.clone()))
                .map_err(|e| bad(crate::error_chain(&e)))?;
            w.write_all(bytes)
                .map_err(|e| bad(crate::error_chain(&e)))?;
            w.commit().map_err(|e| bad(crate::error_chain(&e)))?;
            written.push(digest.clone());
        }
        Ok(())
    }
}

/// Remove the blobs a failed pull wrote, so a failure leaves the store as
/// it was. Only blobs this pull created are removed, under GC's exclusive
/// lock; a blob another kiln fetched at the same moment is re-fetched by
/// that kiln's next pull at worst.
fn forget(store: &ImageStore<'_>, written: &[Digest]) {
    let snap = store.snapshotter();
    let Ok(_gc) = snap.layers().gc_guard(true) else {
        return;
    };
    for d in written {
        let _ = snap.content().delete(d);
    }
}
