//! Push: send a stored image's blobs (skipping those the registry has,
//! mounting those another repository of the same registry has), then its
//! manifest, and an index's manifests before the index itself.

use oci_spec::image::{Descriptor, Digest, ImageIndex, MediaType};

const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

use super::http::{Op, Subject};
use super::{remote_ref, Error, Registry, Result, PARALLEL_BLOBS};
use crate::image::reference::Reference;
use crate::image::store::{self, Image, ImageStore};

/// What [`Registry::push`] sent.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// the full destination name
    pub reference: String,
    /// the digest of the manifest (or index) pushed last
    pub digest: Digest,
    /// its size and media type (with `digest`, what buildx reports as
    /// `containerimage.descriptor`)
    pub size: u64,
    pub media_type: String,
    /// blobs uploaded, mounted, and already present
    pub uploaded: usize,
    pub mounted: usize,
    pub present: usize,
}

#[derive(Default)]
struct Counts {
    uploaded: usize,
    mounted: usize,
    present: usize,
}

impl Registry {
    /// Push blob `desc` from the content store to repository `r` unless the
    /// registry has it; `mount_from` are repositories of the same registry
    /// that may hold it (a cross-repository mount saves the upload).
    /// Returns "uploaded", "mounted" or "present".
    pub async fn push_blob(
        &self,
        store: &ImageStore<'_>,
        r: &Reference,
        desc: &Descriptor,
        mount_from: &[Reference],
    ) -> Result<&'static str> {
        let name = r.to_string();
        let host = r.domain.as_str();
        let remote = remote_ref(r, host);
        let digest = desc.digest().to_string();
        let who = Subject { name: &name, host };
        let creds = Self::credentials(host)?;
        let c = &self.client;
        let blob_url = c.url(&remote, &format!("blobs/{digest}"));
        let res = c
            .send(who, &remote, &creds, Op::Push, || c.http.head(&blob_url))
            .await?;
        match res.status().as_u16() {
            200..=299 => return Ok("present"),
            404 => {}
            _ => return Err(who.status_error(&blob_url, res).await),
        }
        let uploads = c.url(&remote, "blobs/uploads/");
        for src in mount_from {
            let from = remote_ref(src, host);
            let mut mount =
                reqwest::Url::parse(&uploads).map_err(|e| who.failed(format!("{uploads}: {e}")))?;
            mount
                .query_pairs_mut()
                .append_pair("mount", &digest)
                .append_pair("from", &from.repository);
            let res = c
                .send(who, &remote, &creds, Op::Push, || {
                    c.http
                        .post(mount.clone())
                        .header(reqwest::header::CONTENT_LENGTH, 0)
                })
                .await?;
            // 202: the registry could not mount it and opened an upload
            // instead, which is left to expire
            if res.status().as_u16() == 201 {
                return Ok("mounted");
            }
        }
        // an upload session, then the whole blob in one PUT
        let res = c
            .send(who, &remote, &creds, Op::Push, || {
                c.http
                    .post(&uploads)
                    .header(reqwest::header::CONTENT_LENGTH, 0)
            })
            .await?;
        if res.status().as_u16() != 202 {
            return Err(who.status_error(&uploads, res).await);
        }
        let location = res
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| res.url().join(l).ok())
            .ok_or_else(|| who.failed(format!("{uploads} opened an upload without a Location")))?;
        let mut put = location;
        put.query_pairs_mut().append_pair("digest", &digest);
        // streamed from the store in 1 MiB chunks, re-verified on the way
        // (a blob corrupted on disk fails the push instead of uploading
        // bytes that do not match their digest)
        let reader = store
            .snapshotter()
            .content()
            .open_blob(desc.digest())
            .map_err(|e| Error::Store {
                reference: name.clone(),
                context: "cannot read a blob to push",
                source: Box::new(e.into()),
            })?;
        let chunks = upload_chunks(reader, self.on_bytes.clone(), desc);
        // the body can be sent once: the session's token is fresh from
        // the POST above
        let token = c.tokens.get(&remote, Op::Push).flatten();
        let req = c
            .http
            .put(put.clone())
            .header(reqwest::header::CONTENT_LENGTH, desc.size())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(chunks));
        let req = super::http::authorized(req, token.as_deref(), &creds);
        let res = req.send().await.map_err(|e| who.unreachable(&e))?;
        if !res.status().is_success() {
            return Err(who.status_error(put.as_str(), res).await);
        }
        Ok("uploaded")
    }

    /// Put `bytes` as the manifest (or index) `r` names, with `media_type`.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<()> {
        let name = r.to_string();
        let host = r.domain.as_str();
        let remote = remote_ref(r, host);
        let who = Subject { name: &name, host };
        let creds = Self::credentials(host)?;
        let c = &self.client;
        let url = c.url(&remote, &format!("manifests/{}", remote.reference));
        let res = c
            .send(who, &remote, &creds, Op::Push, || {
                c.http
                    .put(&url)
                    .header(reqwest::header::CONTENT_TYPE, media_type)
                    .body(bytes.clone())
            })
            .await?;
        if !res.status().is_success() {
            return Err(who.status_error(&url, res).await);
        }
        Ok(())
    }

    async fn push_limited(
        &self,
        slots: &tokio::sync::Semaphore,
        store: &ImageStore<'_>,
        r: &Reference,
        d: &Descriptor,
        mount_from: &[Reference],
    ) -> Result<&'static str> {
        let _slot = slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        self.push_blob(store, r, d, mount_from).await
    }

    /// Push the blobs of `image` as it is sent, and return the manifest
    /// bytes that name them: layers a build stored as plain tar go as
    /// their gzip variants (made once, kept in the store), as BuildKit
    /// sends them; other layers as they are.
    async fn push_manifest_tree(
        &self,
        store: &ImageStore<'_>,
        r: &Reference,
        image: &Image,
        mount_from: &[Reference],
        counts: &mut Counts,
    ) -> Result<Vec<u8>> {
        let (layers, bytes) = self.distributable(store, r, image)?;
        let blobs: Vec<&Descriptor> = layers.iter().chain([image.manifest.config()]).collect();
        let slots = tokio::sync::Semaphore::new(PARALLEL_BLOBS);
        let mut futs = Vec::new();
        for d in blobs {
            futs.push(self.push_limited(&slots, store, r, d, mount_from));
        }
        let results = futures_util::future::join_all(futs).await;
        for res in results {
            match res? {
                "uploaded" => counts.uploaded += 1,
                "mounted" => counts.mounted += 1,
                _ => counts.present += 1,
            }
        }
        Ok(bytes)
    }

    /// `image`'s layers as they are sent and the manifest bytes naming
    /// them (the stored manifest when nothing changes).
    fn distributable(
        &self,
        store: &ImageStore<'_>,
        r: &Reference,
        image: &Image,
    ) -> Result<(Vec<Descriptor>, Vec<u8>)> {
        let snap = store.snapshotter();
        let content = snap.content();
        let name = r.to_string();
        let store_err = |context: &'static str, e: store::Error| Error::Store {
            reference: name.clone(),
            context,
            source: Box::new(e),
        };
        let stored = content
            .read_blob(image.manifest_descriptor.digest())
            .map_err(|e| store_err("cannot read the manifest", e.into()))?;
        let docker = image
            .manifest_descriptor
            .media_type()
            .to_string()
            .contains("docker");
        let gzip_type = if docker {
            MediaType::Other(DOCKER_LAYER_GZIP.into())
        } else {
            MediaType::ImageLayerGzip
        };
        // no collection between making a variant and leasing it
        let _no_gc = snap
            .layers()
            .gc_guard(false)
            .map_err(|e| store_err("cannot take the store's GC lock", e.into()))?;
        let mut layers = Vec::new();
        let mut changes = Vec::new();
        for (i, l) in image.layers().iter().enumerate() {
            let t = l.media_type().to_string();
            let plain = kiln_snapshotter::Compression::of_layer_media_type(&t)
                == Some(kiln_snapshotter::Compression::None);
            if !plain {
                layers.push(l.clone());
                continue;
            }
            let (digest, size) = tokio::task::block_in_place(|| {
                kiln_snapshotter::variants::get_or_make(
                    content,
                    l.digest(),
                    kiln_snapshotter::Compression::default(),
                    false,
                )
            })
            .map_err(|e| store_err("cannot compress a layer to push", e.into()))?;
            // kept from garbage collection until the push ends
            let _ = snap.lease().add_blob(&digest);
            let mut d = Descriptor::new(gzip_type.clone(), size, digest);
            d.set_annotations(l.annotations().clone());
            changes.push((i, d.clone()));
            layers.push(d);
        }
        if changes.is_empty() {
            return Ok((layers, stored));
        }
        let mut v: serde_json::Value =
            serde_json::from_slice(&stored).map_err(|e| Error::BadManifest {
                reference: name.clone(),
                reason: crate::error_chain(&e),
            })?;
        for (i, d) in changes {
            let entry = &mut v["layers"][i];
            entry["mediaType"] = d.media_type().to_string().into();
            entry["digest"] = d.digest().to_string().into();
            entry["size"] = d.size().into();
        }
        let bytes = serde_json::to_vec(&v).expect("json serialises");
        Ok((layers, bytes))
    }

    /// Push stored image `source` (a name, ID or digest) to `dest` (default:
    /// the source's own name); `by_digest`: under its digest only, the
    /// tag left as it is (buildx's push-by-digest). The manifest goes last,
    /// so a reader never sees a manifest whose blobs are missing.
    pub async fn push(
        &self,
        store: &ImageStore<'_>,
        source: &str,
        dest: Option<&str>,
        by_digest: bool,
    ) -> Result<Pushed> {
        let image =
            tokio::task::block_in_place(|| store.resolve(source)).map_err(|e| Error::Store {
                reference: source.to_string(),
                context: "cannot find the image to push",
                source: Box::new(e),
            })?;
        let dest = match dest {
            Some(d) => d.to_string(),
            None => image.name.clone().unwrap_or_else(|| source.to_string()),
        };
        let r = Reference::parse(&dest)?;
        let name = r.to_string();
        let host = r.domain.clone();
        let remote = remote_ref(&r, &host);
        self.authenticate(&name, &host, &remote, Op::Push).await?;
        let mount_from = mount_sources(store, &image, &r);
        let mut counts = Counts::default();
        let top = image.target.clone();
        let bytes = if top.digest() != image.manifest_descriptor.digest() {
            self.push_index_children(store, &r, &image, &mount_from, &mut counts)
                .await?
        } else {
            self.push_manifest_tree(store, &r, &image, &mount_from, &mut counts)
                .await?
        };
        let top_digest = super::digest_of(&bytes);
        let top_size = bytes.len() as u64;
        let at = if by_digest {
            Reference {
                tag: None,
                digest: Some(top_digest.to_string()),
                ..r.clone()
            }
        } else {
            r.clone()
        };
        self.push_manifest(&at, bytes, top.media_type().as_ref())
            .await?;
        Ok(Pushed {
            reference: at.to_string(),
            digest: top_digest,
            size: top_size,
            media_type: top.media_type().to_string(),
            uploaded: counts.uploaded,
            mounted: counts.mounted,
            present: counts.present,
        })
    }

    /// An index: push every child manifest the store holds (by digest),
    /// and return the index's bytes naming them as they were sent (for
    /// the caller to push under the tag).
    async fn push_index_children(
        &self,
        store: &ImageStore<'_>,
        r: &Reference,
        image: &Image,
        mount_from: &[Reference],
        counts: &mut Counts,
    ) -> Result<Vec<u8>> {
        let name = r.to_string();
        let content = store.snapshotter().content();
        let store_err = |context: &'static str, e: store::Error| Error::Store {
            reference: name.clone(),
            context,
            source: Box::new(e),
        };
        let top = &image.target;
        // an index: every child manifest the store holds, by digest,
        // then the index under the tag
        let bytes = content
            .read_blob(top.digest())
            .map_err(|e| store_err("cannot read the image index", e.into()))?;
        let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| Error::BadManifest {
            reference: name.clone(),
            reason: crate::error_chain(&e),
        })?;
        let mut sent = Vec::new();
        for child in index.manifests() {
            if !content.contains(child.digest()) {
                return Err(Error::BadManifest {
                    reference: name.clone(),
                    reason: format!(
                        "the stored index lists manifest {} that is not in the local store (only one platform was pulled); push that platform's manifest by digest instead",
                        child.digest()
                    ),
                });
            }
            let child_img = store
                .get(child, None)
                .map_err(|e| store_err("cannot read a manifest of the index", e))?;
            let mbytes = self
                .push_manifest_tree(store, r, &child_img, mount_from, counts)
                .await?;
            let digest = super::digest_of(&mbytes);
            let by_digest = Reference {
                tag: None,
                digest: Some(digest.to_string()),
                ..r.clone()
            };
            sent.push((digest, mbytes.len()));
            self.push_manifest(&by_digest, mbytes, child.media_type().as_ref())
                .await?;
        }
        // the index names the manifests as they were sent
        let same = sent
            .iter()
            .zip(index.manifests())
            .all(|((d, _), child)| d == child.digest());
        let bytes = if same {
            bytes
        } else {
            let mut v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| Error::BadManifest {
                    reference: name.clone(),
                    reason: crate::error_chain(&e),
                })?;
            for (i, (digest, size)) in sent.into_iter().enumerate() {
                v["manifests"][i]["digest"] = digest.to_string().into();
                v["manifests"][i]["size"] = size.into();
            }
            serde_json::to_vec(&v).expect("json serialises")
        };
        Ok(bytes)
    }
}

/// Other repositories on `dest`'s registry that the store says hold this
/// image (it was pulled from or pushed there under another name).
fn mount_sources(store: &ImageStore<'_>, image: &Image, dest: &Reference) -> Vec<Reference> {
    let Ok(list) = store.list() else {
        return Vec::new();
    };
    let mut out: Vec<Reference> = Vec::new();
    for row in list {
        if row.id != *image.id() {
            continue;
        }
        let Some(r) = row.name.as_deref().and_then(|n| Reference::parse(n).ok()) else {
            continue;
        };
        if r.domain == dest.domain && r.path != dest.path && !out.iter().any(|o| o.path == r.path) {
            out.push(r);
        }
    }
    out
}

/// A blob read from the store in 1 MiB chunks for an upload body, each
/// chunk's running total told to `on_bytes`.
fn upload_chunks(
    reader: kiln_snapshotter::content::VerifyingReader,
    on_bytes: Option<super::OnBytes>,
    desc: &Descriptor,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> {
    let (blob, total) = (desc.digest().clone(), desc.size());
    futures_util::stream::unfold((Some(reader), 0u64), move |(state, sent)| {
        let (on_bytes, blob) = (on_bytes.clone(), blob.clone());
        async move {
            let mut reader = state?;
            let mut buf = vec![0u8; 1 << 20];
            // a local file read: short enough to do in place on a worker
            match tokio::task::block_in_place(|| std::io::Read::read(&mut reader, &mut buf)) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    let sent = sent + n as u64;
                    if let Some(f) = &on_bytes {
                        f(&blob, sent, total);
                    }
                    Some((Ok(bytes::Bytes::from(buf)), (Some(reader), sent)))
                }
                Err(e) => {
                    let e = reader.map_read_error(e);
                    Some((Err(std::io::Error::other(e)), (None, sent)))
                }
            }
        }
    })
}
