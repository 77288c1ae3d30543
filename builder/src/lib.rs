//! kiln's builder: the Dockerfile frontend, the build graph and solver, the
//! cache, the exporters and the pieces of the `kiln` CLI.

// Functions stay a screenful or two long (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

pub mod cli;
pub mod config;
pub mod engine;
pub mod frontend;
pub mod image;
pub mod options;
pub mod registry;
pub mod session;
pub mod units;

/// An error and its causes as one line, "what: why: why" (see
/// [`kiln_sys::error_chain`]): every error kiln defines says what failed
/// and leaves the why to its `source()`, so where an error becomes text (a
/// log line, a field of another error) this, not `to_string()`, keeps it.
pub use kiln_sys::error_chain;
