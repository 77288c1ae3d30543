//! kiln's rootless executor: runs one process in a sandbox described by an
//! OCI runtime spec, started by a non-root user. It never sees an image, a
//! layer or a Dockerfile: its input is a [`Spec`] (whose root is a prepared
//! directory) and its output is an [`ExitStatus`].
//!
//! A newcomer reads it in this order: [`spec`] (what a default sandbox is),
//! [`plan`] (what a sandbox will be, decided without touching the system),
//! [`sandbox`] (the parent: realise the plan, clone, map ids, wait),
//! [`child`] (the numbered setup sequence up to exec), [`idmap`], [`net`],
//! [`seccomp`], [`user`].

// Functions stay a screenful or two long (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

#[cfg(test)]
mod bpf;
pub mod cgroup;
pub mod child;
pub mod emulation;
pub mod error;
pub mod idmap;
pub mod net;
pub mod plan;
pub mod sandbox;
pub mod seccomp;
pub mod spec;
mod sys;
pub mod user;
pub mod userns;

pub use emulation::Emulator;
pub use error::{Error, Result};
pub use oci_spec::runtime::Spec;
pub use sandbox::{run, ExitStatus, PrivateContent, PrivateFile, RunOptions, Stdio};
pub use spec::{Network, Rlimit, SandboxConfig};
/// Path resolution confined to a root directory (openat2 RESOLVE_IN_ROOT),
/// shared with the build engine's file operations.
pub use sys::{open_beneath_no_symlinks, open_in_root_at};
