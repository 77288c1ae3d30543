//! kiln's snapshotter: content-addressed blobs, unpacked layers, and writable
//! views of layer chains. It owns bytes on disk and never sees a Dockerfile.
//!
//! - [`content`]: the OCI image layout holding blobs and `index.json`
//! - [`layers`]: unpacked layers by chain ID, leases and garbage collection
//! - [`snapshot`]: the Snapshotter API (prepare, view, commit, remove)
//! - [`diff`] and [`apply`]: layer directory to OCI layer tar and back
//! - [`backend`]: the mechanisms serving a writable view
//! - [`compression`]: gzip, zstd and plain layer streams
//! - [`variants`]: compressed copies of plain layer blobs, made on demand
//! - [`confine`]: Landlock for the code above that handles untrusted bytes

// Functions stay a screenful or two long (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

pub mod apply;
pub mod backend;
pub mod compression;
pub mod confine;
pub mod content;
pub mod diff;
pub mod layers;
mod markers;
mod owner;
pub mod snapshot;
mod sys;
pub mod targuard;
mod tree;
pub mod variants;

pub use backend::BackendKind;
pub use compression::Compression;
pub use diff::DiffOptions;
pub use snapshot::{Committed, Snapshotter, View};
