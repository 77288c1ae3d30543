//! Where a stage starts and what `COPY --from` / `RUN --mount from=` read:
//! base images from the store (pulled when missing), `oci-layout://` and
//! directory build contexts, and a base image's ONBUILD triggers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_snapshotter::snapshot::Snapshotter;

use super::error::{Error, Result, StepError};
use super::image_state::{ImageState, LayerRef};
use super::progress::Progress;
use super::solver::{Engine, Shared};
use super::step_cache::{Key, KeyBuilder};
use super::{BuildOptions, FromSource};
use crate::frontend::{self, Base, Plan, PlanOptions, Platform, Stage, Step};

/// Where a pull reports: a vertex of the build's progress, with the bytes
/// of each blob as they arrive.
#[derive(Clone, Copy)]
pub struct Report<'a> {
    pub progress: &'a Arc<Progress>,
    pub shared: &'a Shared,
}

/// The bases of a stage, by name and platform, loaded before the plan is
/// made again with their environment and working directory.
pub type Bases = BTreeMap<(String, Platform), (Key, ImageState)>;

/// Load every `FROM` image of `first` (the plan made without the images'
/// environment), and note each image's environment and working directory
/// in `plan_opts` for the plan that follows.
pub fn load_bases(
    snap: &Arc<Snapshotter>,
    opts: &BuildOptions,
    first: &Plan,
    plan_opts: &mut PlanOptions,
    report: Report<'_>,
) -> Result<Bases> {
    // --network=none: nothing is fetched on the build's behalf
    let offline = opts.network == kiln_runtime::Network::None;
    let registry = opts.registry.as_ref().filter(|_| !offline);
    // one base name may be loaded for two platforms (a
    // `FROM --platform=$BUILDPLATFORM` stage beside the target's)
    let mut wanted: Vec<(String, Platform)> = Vec::new();
    for stage in &first.stages {
        if let Base::Image { reference } = &stage.base {
            let key = (reference.clone(), stage.platform.clone());
            if !wanted.contains(&key) {
                wanted.push(key);
            }
        }
    }
    // every base at once: a pull waits on the network, not on the others
    let handle = tokio::runtime::Handle::current();
    let loaded: Vec<Result<(Key, ImageState)>> = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let pulls: Vec<_> = wanted
                .iter()
                .map(|(reference, platform)| {
                    let handle = handle.clone();
                    s.spawn(move || {
                        let _runtime = handle.enter();
                        let from = (registry, &*opts.session);
                        load_base(snap, from, opts.pull, reference, platform, report)
                    })
                })
                .collect();
            pulls
                .into_iter()
                .map(|p| {
                    p.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    });
    let mut bases = BTreeMap::new();
    for (key, loaded) in wanted.into_iter().zip(loaded) {
        let loaded = loaded.map_err(|e| offline_error(e, offline))?;
        let got = &loaded.1.platform;
        if got.os != key.1.os || got.architecture != key.1.architecture {
            plan_opts
                .base_platforms
                .insert((key.0.clone(), key.1.to_string()), got.to_string());
        }
        plan_opts
            .image_env
            .insert(key.0.clone(), loaded.1.env_pairs());
        plan_opts
            .image_workdir
            .insert(key.0.clone(), loaded.1.config.workdir.clone());
        if !loaded.1.config.onbuild.is_empty() {
            plan_opts
                .image_onbuild
                .insert(key.0.clone(), loaded.1.config.onbuild.clone());
        }
        bases.insert(key, loaded);
    }
    // an image named by --build-context: its ONBUILD triggers are planned
    // with the Dockerfile, so that one naming a stage finds it (the image
    // itself is loaded again when the stage starts)
    for stage in &first.stages {
        let Base::Context { name, source } = &stage.base else {
            continue;
        };
        let loaded = if let Some(layout) = source.strip_prefix("oci-layout://") {
            load_layout_base(snap, name, layout, &stage.platform)?
        } else if let Some(reference) = source
            .strip_prefix("docker-image://")
            .filter(|r| *r != "scratch")
        {
            load_base(
                snap,
                (registry, &opts.session),
                opts.pull,
                reference,
                &stage.platform,
                report,
            )
            .map_err(|e| offline_error(e, offline))?
        } else {
            continue;
        };
        if !loaded.1.config.onbuild.is_empty() {
            plan_opts
                .image_onbuild
                .insert(source.clone(), loaded.1.config.onbuild.clone());
        }
    }
    Ok(bases)
}

/// A missing image under `--network none` says that nothing is pulled.
fn offline_error(e: Error, offline: bool) -> Error {
    match e {
        Error::BaseNotFound(name) if offline => Error::BaseNotFoundOffline(name),
        e => e,
    }
}

/// Load a base image from the local image store: its key, state (config,
/// history, layers) and unpacked chain.
/// The source policy decides first which image is read (or refuses it).
fn load_base(
    snap: &Arc<Snapshotter>,
    (registry, session): (Option<&crate::registry::Registry>, &crate::session::Session),
    pull: bool,
    name: &str,
    platform: &Platform,
    report: Report<'_>,
) -> Result<(Key, ImageState)> {
    let converted = session.image(name)?;
    let name = converted.as_str();
    let want = crate::image::Platform::from(platform);
    let store = crate::image::ImageStore::new(snap).with_platform(want.clone());
    let stored = store.resolve(name);
    // a name pinned by digest means one image: a stored one needs no request
    let pinned = crate::image::reference::Reference::parse(name).is_ok_and(|r| r.digest.is_some());
    let image = match (stored, registry) {
        (Err(crate::image::store::Error::NotFound(_)), Some(reg)) => {
            pull_into(snap, reg, name, &want, report)?;
            store.resolve(name)
        }
        // --pull: the registry says what a tag means today
        (Ok(_), Some(reg)) if pull && !pinned => {
            pull_into(snap, reg, name, &want, report)?;
            store.resolve(name)
        }
        (r, _) => r,
    };
    let image = image.map_err(|e| match e {
        crate::image::store::Error::NotFound(_) => Error::BaseNotFound(name.to_string()),
        other => Error::Image {
            name: name.to_string(),
            source: Box::new(other),
        },
    })?;
    image_base(&store, &image, name, platform)
}

/// Pull `name` for `want` into the store (on a runtime worker, where
/// unpacking may block in place), as a progress vertex `FROM name` with
/// each blob's bytes.
fn pull_into(
    snap: &Arc<Snapshotter>,
    reg: &crate::registry::Registry,
    name: &str,
    want: &crate::image::Platform,
    report: Report<'_>,
) -> Result<()> {
    let vertex = report.shared.next_vertex();
    let progress = Arc::clone(report.progress);
    progress.started(vertex, &format!("FROM {name} (pull, {want})"));
    let started = std::time::Instant::now();
    let sink = Arc::clone(&progress);
    let reg = reg.on_bytes(Arc::new(move |digest, done, total| {
        sink.transfer(vertex, digest.as_ref(), done, total);
    }));
    let (snap2, n, p) = (snap.clone(), name.to_string(), want.clone());
    let handle = tokio::runtime::Handle::current();
    let pulled = handle
        .block_on(handle.spawn(async move {
            let store = crate::image::ImageStore::new(&snap2).with_platform(p.clone());
            reg.pull(&store, &n, &p).await.map(|_| ())
        }))
        .map_err(|e| {
            Error::Pull(Box::new(crate::registry::Error::Task {
                reference: name.to_string(),
                reason: crate::error_chain(&e),
            }))
        })?
        .map_err(|e| Error::Pull(Box::new(e)));
    match &pulled {
        Ok(()) => progress.done(vertex, started.elapsed().as_secs_f64()),
        Err(e) => progress.error(vertex, &crate::error_chain(e)),
    }
    pulled
}

/// The image store choosing `platform`'s manifest from an index.
fn store_for<'s>(snap: &'s Snapshotter, platform: &Platform) -> crate::image::ImageStore<'s> {
    crate::image::ImageStore::new(snap).with_platform(crate::image::store::Platform::from(platform))
}

/// A base from `--build-context NAME=oci-layout://DIR[:TAG|@DIGEST]`: the
/// layout's image is loaded into the store (its blobs are content-addressed,
/// so loading twice is cheap), then used like any stored image.
fn load_layout_base(
    snap: &Snapshotter,
    name: &str,
    layout: &str,
    platform: &Platform,
) -> Result<(Key, ImageState)> {
    let store = store_for(snap, platform);
    let (dir, selector) = crate::image::archive::parse_layout_ref(layout);
    let image = crate::image::archive::load_layout_dir(&store, &dir, &selector).map_err(|e| {
        Error::Layout {
            name: format!("{name}=oci-layout://{layout}"),
            source: Box::new(e),
        }
    })?;
    image_base(&store, &image, name, platform)
}

/// The key and starting state of a stage whose base is `image`.
fn image_base(
    store: &crate::image::ImageStore<'_>,
    image: &crate::image::store::Image,
    name: &str,
    platform: &Platform,
) -> Result<(Key, ImageState)> {
    let config: serde_json::Value =
        serde_json::from_slice(&image.config_bytes).map_err(|_| Error::BadBase {
            name: name.into(),
            what: "config",
        })?;
    let (chain, _warnings) = store.unpack(image).map_err(|e| Error::Image {
        name: name.to_string(),
        source: Box::new(e),
    })?;
    let mut state = ImageState::from_image_config(
        &config,
        Platform {
            os: config["os"].as_str().unwrap_or(&platform.os).to_string(),
            architecture: config["architecture"]
                .as_str()
                .unwrap_or(&platform.architecture)
                .to_string(),
            variant: config["variant"].as_str().map(String::from),
            // the base's, when the build asked for none (BuildKit keeps it)
            os_version: config["os.version"]
                .as_str()
                .map(String::from)
                .or_else(|| platform.os_version.clone()),
        },
    );
    state.chain = chain.map(|c| c.to_string());
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    state.layers = image
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| LayerRef {
            diff_id: d.as_str().unwrap_or_default().to_string(),
            digest: l.digest().to_string(),
            size: l.size(),
            media_type: l.media_type().to_string(),
            stored_plain: false,
            // the base's own record of clamped times is kept
            rewritten_timestamp: l
                .annotations()
                .as_ref()
                .and_then(|a| a.get(super::commit::REWRITTEN_TIMESTAMP))
                .and_then(|v| v.parse().ok()),
        })
        .collect();
    let mut key = KeyBuilder::new("image");
    key.str(image.manifest_descriptor.digest().as_ref());
    Ok((key.finish(), state))
}

/// The ONBUILD triggers of a base image as planned steps, expanded against
/// the image's environment and working directory.
pub(super) fn onbuild_steps(state: &ImageState, file: &str) -> Result<Vec<Step>> {
    const BASE: &str = "kiln-onbuild-base";
    let mut text = format!("FROM {BASE}\n");
    for t in &state.config.onbuild {
        text.push_str(t);
        text.push('\n');
    }
    let ast = frontend::parse(
        text.as_bytes(),
        &format!("{file} (ONBUILD triggers of the base image)"),
    )?;
    let mut opts = PlanOptions::default();
    opts.image_env.insert(BASE.into(), state.env_pairs());
    opts.image_workdir
        .insert(BASE.into(), state.config.workdir.clone());
    let plan = frontend::plan(&ast, &opts)?;
    Ok(plan
        .stages
        .into_iter()
        .next()
        .map(|s| s.steps)
        .unwrap_or_default())
}

/// The step that makes a directory `--build-context NAME=DIR` the root
/// filesystem of a stage based on it: `COPY --from=NAME / /`.
fn context_root_step(name: &str, source: &str, file: &str) -> Result<Step> {
    const BASE: &str = "kiln-context-base";
    let text = format!("FROM {BASE}\nCOPY --from={name} / /\n");
    let ast = frontend::parse(
        text.as_bytes(),
        &format!("{file} (FROM --build-context {name})"),
    )?;
    let mut opts = PlanOptions::default();
    opts.named_contexts.insert(name.into(), source.into());
    let plan = frontend::plan(&ast, &opts)?;
    plan.stages
        .into_iter()
        .next()
        .and_then(|s| s.steps.into_iter().next())
        .ok_or_else(|| Error::ContextBase {
            name: name.into(),
            spec: source.into(),
        })
}

/// The key and state of an empty stage of `platform`.
fn scratch(platform: &Platform) -> (Key, ImageState) {
    let mut k = KeyBuilder::new("scratch");
    k.str(&platform.to_string());
    (k.finish(), ImageState::scratch(platform.clone()))
}

impl Engine {
    /// Where `stage` starts: its key and state, and, for a directory build
    /// context, the step that copies the directory in as the first layer.
    pub(super) async fn stage_base(
        &self,
        stage: &Stage,
        bases: &Bases,
    ) -> Result<(Key, ImageState, Option<Step>)> {
        let (key, state) = match &stage.base {
            Base::Scratch => scratch(&stage.platform),
            Base::Image { reference } => bases
                .get(&(reference.clone(), stage.platform.clone()))
                .cloned()
                .ok_or_else(|| Error::BaseNotFound(reference.clone()))?,
            Base::Stage { index } => self.stage_result(*index).await?,
            Base::Context { name, source } => {
                let platform = &stage.platform;
                if source == "docker-image://scratch" {
                    // the empty image, as BuildKit takes it
                    scratch(platform)
                } else if let Some(reference) = source.strip_prefix("docker-image://") {
                    tokio::task::block_in_place(|| self.load_image(reference, platform))?
                } else if let Some(layout) = source.strip_prefix("oci-layout://") {
                    tokio::task::block_in_place(|| {
                        load_layout_base(&self.snap, name, layout, platform)
                    })?
                } else if source.contains("://") {
                    return Err(Error::ContextBase {
                        name: name.clone(),
                        spec: source.clone(),
                    });
                } else {
                    // A directory is the stage's root filesystem, as one
                    // layer (as BuildKit does): scratch plus a COPY of the
                    // whole context, so it is keyed, cached and filtered by
                    // the context's .dockerignore like COPY --from=NAME.
                    let root = context_root_step(name, source, &self.file)?;
                    let (k, s) = scratch(platform);
                    return Ok((k, s, Some(root)));
                }
            }
        };
        Ok((key, state, None))
    }

    /// An image by name, from the store, else pulled; never pulled under
    /// `--network none`, where nothing is fetched on the build's behalf.
    pub(super) fn load_image(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<(Key, ImageState)> {
        let offline = self.opts.network == kiln_runtime::Network::None;
        let registry = self.opts.registry.as_ref().filter(|_| !offline);
        let report = Report {
            progress: &self.progress,
            shared: &self.shared,
        };
        load_base(
            &self.snap,
            (registry, &self.opts.session),
            self.opts.pull,
            reference,
            platform,
            report,
        )
        .map_err(|e| offline_error(e, offline))
    }

    /// What `--build-context NAME=SOURCE` gives a `COPY --from=NAME`: a
    /// local directory, `docker-image://REF` from the local store (or
    /// pulled; `scratch` is the empty image) or `oci-layout://DIR`.
    pub(super) fn context_source(
        &self,
        name: &str,
        source: &str,
        platform: &Platform,
    ) -> std::result::Result<FromSource, StepError> {
        let image_err = |e| StepError::ContextImage {
            name: name.to_string(),
            source: Box::new(e),
        };
        if source == "docker-image://scratch" {
            let (k, st) = scratch(platform);
            return Ok(FromSource::Image(k, Box::new(st)));
        }
        if let Some(reference) = source.strip_prefix("docker-image://") {
            let (k, st) = self.load_image(reference, platform).map_err(image_err)?;
            return Ok(FromSource::Image(k, Box::new(st)));
        }
        if let Some(layout) = source.strip_prefix("oci-layout://") {
            let (k, st) =
                load_layout_base(&self.snap, name, layout, platform).map_err(image_err)?;
            return Ok(FromSource::Image(k, Box::new(st)));
        }
        let refuse = |why| StepError::NamedContext {
            name: name.to_string(),
            spec: source.to_string(),
            why,
        };
        if source.contains("://") {
            return Err(refuse(
                "only local directories, docker-image:// and oci-layout:// are supported",
            ));
        }
        let path: PathBuf = std::path::absolute(source).map_err(StepError::Source)?;
        if !path.is_dir() {
            return Err(refuse("not a directory"));
        }
        Ok(FromSource::Dir {
            name: name.to_string(),
            path,
        })
    }
}
