//! Writable views of a layer chain: the mechanisms that turn read-only layer
//! directories plus one upper directory into a merged tree a step can use.
//!
//! Every backend reads and writes the same on-disk layer format, so layers are
//! interchangeable between backends (it is the format [`crate::apply`]
//! writes, [`crate::diff`] reads and [`crate::layers`] stores):
//! - a layer directory holds the layer's files with their real owners, modes,
//!   mtimes and xattrs (kiln runs inside its own user namespace, so owners are
//!   container ids);
//! - a deletion is an overlayfs whiteout: a character device 0:0 with the
//!   deleted name;
//! - an opaque directory carries the xattr `user.overlay.opaque` = `y`
//!   (overlayfs `userxattr` convention, usable without privilege).
//!
//! A backend never decides what a layer contains: committing the upper
//! directory into a layer is the snapshotter's job.

pub mod fuse;
pub mod overlay;
pub mod probe;

use std::path::{Path, PathBuf};

/// Which mechanism serves a writable view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// overlay filesystem served from user space by kiln over /dev/fuse
    Fuse,
    /// kernel overlayfs mounted inside kiln's user namespace (`userxattr`)
    Overlay,
    /// a full copy of the merged tree; works everywhere, slow
    Copy,
}

/// What a backend needs to build one writable view.
#[derive(Debug, Clone)]
pub struct ViewSpec {
    /// read-only layer directories, topmost first
    pub lowers: Vec<PathBuf>,
    /// empty directory that receives every change made through the view,
    /// in the layer format above
    pub upper: PathBuf,
    /// empty scratch directory on the same filesystem as `upper`
    pub work: PathBuf,
    /// existing empty directory where the merged tree appears
    pub target: PathBuf,
}

/// A mounted (or materialised) view; dropping it unmounts the view and stops
/// serving it. After drop, `upper` holds the view's changes.
pub trait MountedView: Send {
    /// where the merged tree is visible
    fn path(&self) -> &Path;

    /// The process serving the view, for backends served by one (fuse).
    fn server_pid(&self) -> Option<u32> {
        None
    }
}

pub mod copy;

/// Errors of choosing and mounting a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Copy(#[from] copy::Error),
    #[error(transparent)]
    Fuse(#[from] fuse::Error),
    #[error(transparent)]
    Overlay(#[from] overlay::Error),
}

/// Result type of backend dispatch.
pub type Result<T> = std::result::Result<T, Error>;

/// Mount a view of `spec` with the backend `kind`.
pub fn mount(kind: BackendKind, spec: &ViewSpec) -> Result<Box<dyn MountedView>> {
    match kind {
        BackendKind::Copy => Ok(Box::new(copy::mount(spec)?)),
        BackendKind::Fuse => Ok(fuse::mount(spec)?),
        BackendKind::Overlay => Ok(overlay::mount(spec)?),
    }
}

/// Stop serving a view whose changes are to be kept; afterwards
/// `spec.upper` holds every change in the layer format. The copy backend
/// has no upper while mounted, so it computes the changes here (a view
/// that is thrown away is simply dropped instead).
pub fn unmount(kind: BackendKind, view: Box<dyn MountedView>, spec: &ViewSpec) -> Result<()> {
    if kind == BackendKind::Copy {
        copy::write_changes(spec)?;
    }
    drop(view);
    Ok(())
}
