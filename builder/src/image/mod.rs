//! The image side of kiln: the local image store and everything that moves
//! images in and out of it.
//!
//! - [`state_dir`]: the state directory (`~/.local/share/kiln`, `--root`)
//! - [`mod@reference`]: image names, normalised as docker does
//! - [`store`]: names to manifests in the content store's `index.json`, the
//!   typed [`store::Image`], unpacking an image's layers
//! - [`archive`]: `kiln load` of docker-archive and oci-archive tars
//! - [`import`]: `kiln import` of a root filesystem directory or tar
//! - [`output`]: BuildKit's `--output` CSV syntax
//! - [`mod@export`]: the exporters for every `--output` type
//! - [`gc`]: what images and the build cache need, `kiln du` accounting,
//!   collecting the rest
//! - [`cache_mounts`]: the directories behind `RUN --mount=type=cache`,
//!   kept across builds and leased to steps under flocks
//!
//! How `kiln build` uses it: open the [`StateDir`] and a `Snapshotter` at
//! its `snapshotter_root()`; resolve `FROM` names with
//! [`ImageStore::resolve`] and get their chain with [`ImageStore::unpack`]
//! (`--build-context NAME=oci-layout://...` goes through
//! [`archive::load_layout_dir`]); store the result with
//! [`ImageStore::write_image`] (config + committed layer descriptors); then
//! call [`export()`] once per output: [`OutputSpec::image_store`] for `-t`,
//! [`OutputSpec::parse`] for each `--output`.
//!
//! Bytes on disk belong to the snapshotter; this module decides what they
//! mean as images. It never runs a process and never reads a Dockerfile.

pub mod archive;
pub mod cache_mounts;
pub mod export;
pub mod gc;
pub mod import;
pub mod output;
pub mod reference;
pub mod state_dir;
pub mod store;
pub mod time;

pub use export::{export, ExportOptions, Exported};
pub use output::OutputSpec;
pub use state_dir::StateDir;
pub use store::{Image, ImageStore, Platform};
