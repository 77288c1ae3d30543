//! The Dockerfile frontend: Dockerfile bytes and build options in, a checked
//! plan of stages out.
//!
//! Its modules, each usable and testable on its own, layered as BuildKit's:
//! - [`parser`]: the raw syntax tree (directives, instructions, flags,
//!   heredocs, line numbers), comparable byte for byte with BuildKit's dump;
//! - [`shell`]: BuildKit's word expansion and splitting rules;
//! - [`instructions`]: one typed, checked instruction per node, every flag
//!   parsed, through a table of one checker per instruction;
//! - [`mount_flags`]: RUN's `--mount` flags parsed into typed mounts, with
//!   BuildKit's defaults;
//! - [`platform`]: `os/arch[/variant]` values, normalised, and the host's;
//! - [`mod@plan`]: ARG/ENV scoping, expansion, the stage graph and `--target`;
//! - [`location`]: the `file:line:column` and caret snippet of diagnostics;
//! - [`dockerignore`]: the `.dockerignore` matcher used by context transfer;
//! - [`outline`]: `--call outline`, `targets` and `subrequests.describe`.
//!
//! From the rest of the builder it uses only pure string handling: image
//! names are checked with [`crate::image::reference`] and `--mount` values
//! are split by [`crate::options`].
//!
//! Typical use by the build engine:
//!
//! ```
//! use kiln_builder::frontend::{parse, plan, PlanOptions};
//! let ast = parse(b"FROM alpine AS base\nRUN echo hi\n", "Dockerfile").unwrap();
//! let plan = plan(&ast, &PlanOptions::default()).unwrap();
//! assert_eq!(plan.stages.len(), 1);
//! ```
//!
//! The frontend never touches the network, an image store or the build
//! context (apart from reading `.dockerignore` when asked); base image
//! configuration is the build engine's business, passed in through
//! [`PlanOptions::image_env`].

use std::fmt;

pub mod dockerignore;
pub mod instructions;
pub mod lint;
pub mod location;
pub mod mount_flags;
pub mod outline;
pub mod parser;
pub mod plan;
pub mod platform;
pub mod shell;

pub use instructions::Instruction;
pub use location::Location;
pub use parser::{Ast, Node};
pub use plan::{Base, Plan, PlanOptions, Stage, Step};
pub use platform::Platform;

/// Any frontend failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// The text is not a Dockerfile.
    #[error(transparent)]
    Parse(#[from] parser::ParseError),
    /// An instruction is malformed.
    #[error(transparent)]
    Instruction(#[from] instructions::InstructionError),
    /// The stages do not fit together.
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
}

/// A frontend error, with the place in the Dockerfile when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Where (None for problems with the options, such as `--target`).
    /// Boxed to keep `Result<_, Error>` small on the happy path.
    pub location: Option<Box<Location>>,
    /// What.
    pub kind: ErrorKind,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(l) => write!(f, "{l}: {}\n{}", self.kind, l.snippet()),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl std::error::Error for Error {}

impl From<parser::LocatedParseError> for Error {
    fn from(e: parser::LocatedParseError) -> Self {
        Error {
            location: Some(Box::new(e.location)),
            kind: e.kind.into(),
        }
    }
}

/// Result alias for the frontend.
pub type Result<T> = std::result::Result<T, Error>;

/// Parse a Dockerfile; `file` names it in errors.
pub fn parse(src: &[u8], file: &str) -> Result<Ast> {
    Ok(parser::parse(src, file)?)
}

/// Resolve a parsed Dockerfile into the stages to build.
pub fn plan(ast: &Ast, opts: &PlanOptions) -> Result<Plan> {
    plan::plan(ast, opts)
}

/// Lexically clean an absolute or relative path (Go's `path.Clean`): the
/// one path cleaner of the builder (the planner, `.dockerignore`, mount
/// ids, WORKDIR and COPY destinations).
pub fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            x => out.push(x),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}
