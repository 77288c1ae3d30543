//! kiln's builder: the Dockerfile frontend, the build graph and solver, the
//! cache, the exporters and the pieces of the `kiln` CLI.

pub mod cli;
pub mod engine;
pub mod frontend;
pub mod image;
pub mod registry;
pub mod session;

/// An error and its causes as one line, "what: why: why", for where an
/// error becomes text (a log line, a field of another error). Errors here
/// follow one convention: the message says what failed, `source()` says
/// why; so `to_string()` alone would drop the why.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
