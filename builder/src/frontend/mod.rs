//! The Dockerfile frontend: Dockerfile bytes and build options in, a checked
//! plan of stages out.
//!
//! Layers, each usable on its own:
//! - [`parser`]: raw syntax tree (directives, instructions, flags, heredocs,
//!   line numbers), comparable byte for byte with BuildKit's dump;
//! - [`shell`]: BuildKit's word expansion rules;
//! - [`instructions`]: typed, checked instructions with every flag parsed;
//! - [`plan`]: ARG/ENV scoping, expansion, the stage graph and `--target`;
//! - [`dockerignore`]: the `.dockerignore` matcher used by context transfer.
//!
//! The frontend never touches the network, an image store or the build
//! context's files (other than reading `.dockerignore` when asked); base image
//! configuration is the build engine's business.

pub mod location;
pub mod parser;
pub mod shell;

pub use parser::{parse, Ast, Node};
