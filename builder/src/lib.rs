//! kiln's builder: the Dockerfile frontend, the build graph and solver, the
//! cache, the exporters and the pieces of the `kiln` CLI.

pub mod cli;
pub mod cli_plan;
pub mod engine;
pub mod frontend;
pub mod image;
pub mod options;
pub mod registry;
pub mod session;
