//! The pieces of the `kiln` CLI: one module per subcommand, each exposing
//! a clap `Args` struct and a `run` function returning the process exit
//! code. Errors are `anyhow` here and nowhere below.

pub mod autogc;
pub mod build;
pub mod check;
pub mod context_input;
pub mod du;
pub mod epoch;
pub mod images;
pub mod imagetools;
pub mod info;
pub mod plan;
pub mod prune;
pub mod registry;
pub mod run;
pub mod sandbox;

/// The error and its causes, joined the way a user reads them: "what:
/// why: why". Every error kiln defines says what failed and leaves the why
/// to its `source()`, so nothing is printed twice.
pub fn chain(err: &anyhow::Error) -> String {
    let parts: Vec<String> = err.chain().map(ToString::to_string).collect();
    parts.join(": ")
}

/// The exit code for an error: the runtime's own code when the failure came
/// from the sandbox (125, or 126/127 when the command cannot run), else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain()
        .find_map(|c| c.downcast_ref::<kiln_runtime::Error>())
        .map_or(1, kiln_runtime::Error::exit_code)
}
