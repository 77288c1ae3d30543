//! The errors of a build ([`Error`]) and of one step ([`StepError`], which
//! [`Error::Step`] wraps with the step's file, line and instruction).

use std::path::PathBuf;

use super::{emulation, exec, network, run_mounts};
use super::{filecopy, remote_cache};
use crate::frontend;

/// Errors of a build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Frontend(#[from] frontend::Error),
    #[error(transparent)]
    Policy(#[from] crate::session::source_policy::PolicyError),
    #[error("cannot pull the base image")]
    Pull(#[source] Box<crate::registry::Error>),
    #[error("cannot read the Dockerfile {path}")]
    Dockerfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("build context {path} is not a readable directory")]
    Context {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use the build context's ignore file; nothing was sent")]
    Ignore(#[source] frontend::dockerignore::DockerignoreError),
    #[error("{file}:{line}: {instruction}")]
    Step {
        file: String,
        line: usize,
        /// the instruction's last line (continuation lines, heredocs)
        end_line: usize,
        instruction: String,
        source: Box<StepError>,
    },
    #[error("base image {0:?} is not in kiln's image store: pull it with `kiln pull NAME`, or add it with `kiln load -i FILE` or `kiln import DIR -t NAME`")]
    BaseNotFound(String),
    #[error("image {0:?} is not in kiln's image store, and the build runs with --network=none, which pulls nothing: pull it first with `kiln pull NAME`")]
    BaseNotFoundOffline(String),
    #[error("--cache-from type=registry,ref={0}: the build runs with --network=none, which fetches nothing (drop one of the two)")]
    CacheFromOffline(String),
    #[error("base image {name:?}")]
    Image {
        name: String,
        source: Box<crate::image::store::Error>,
    },
    #[error("FROM --build-context {name}")]
    Layout {
        name: String,
        source: Box<crate::image::archive::Error>,
    },
    #[error("base image {name:?} has a malformed {what}")]
    BadBase { name: String, what: &'static str },
    #[error("cannot open kiln's state directory")]
    State(#[source] Box<kiln_snapshotter::snapshot::Error>),
    #[error("cannot open the build cache directory")]
    Cache(#[source] std::io::Error),
    #[error(transparent)]
    CacheIo(remote_cache::Error),
    #[error("cannot open the cache mount store")]
    CacheMounts(#[source] Box<crate::image::cache_mounts::Error>),
    #[error("cannot store the image")]
    Store(#[source] Box<kiln_snapshotter::content::Error>),
    #[error("cannot keep the image's blobs from garbage collection")]
    Lease(#[source] Box<kiln_snapshotter::layers::Error>),
    #[error("a layer of the image was removed by a concurrent `kiln prune` or `kiln rmi` before the image was stored; build again")]
    Collected,
    #[error("a build task panicked or was cancelled")]
    Task(#[source] tokio::task::JoinError),
    #[error("the build's job slots were closed")]
    SlotsClosed,
    #[error("stage {0} is not in the plan")]
    StageMissing(usize),
    #[error("stage {0} ended without a result")]
    StageLost(usize),
    #[error("stage {index}, which this stage needs, failed: {message}")]
    StageFailed { index: usize, message: String },
    #[error("the target stage produced no result")]
    NoTarget,
    #[error("cannot serialise the image's {what}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("FROM --build-context {name}={spec}: a base must be a directory, docker-image://REF or oci-layout://DIR[:TAG|@DIGEST]")]
    ContextBase { name: String, spec: String },
}

/// Errors of one step; wrapped with its location by [`Error::Step`].
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Run(#[from] exec::Error),
    #[error(transparent)]
    Copy(#[from] filecopy::Error),
    #[error(transparent)]
    Snapshot(#[from] kiln_snapshotter::snapshot::Error),
    #[error(transparent)]
    Network(#[from] network::Denied),
    #[error("RUN --security=insecure is not allowed: kiln never runs a step privileged")]
    Insecure,
    #[error(transparent)]
    Policy(#[from] crate::session::source_policy::PolicyError),
    #[error("RUN --device={0},required: kiln gives steps no host devices (no CDI devices); drop the device or make it optional")]
    Device(String),
    #[error("{0} is not supported by the build engine yet")]
    Instruction(String),
    #[error("--build-context {name}={spec}: {why}")]
    NamedContext {
        name: String,
        spec: String,
        why: &'static str,
    },
    #[error("--build-context {name}: cannot load its image")]
    ContextImage { name: String, source: Box<Error> },
    #[error("cannot load the image {reference:?} it reads from")]
    SourceImage {
        reference: String,
        source: Box<Error>,
    },
    #[error("cannot resolve --chown {spec:?}")]
    Chown {
        spec: String,
        source: kiln_runtime::Error,
    },
    #[error("cannot open the source files")]
    Source(#[source] std::io::Error),
    #[error("ADD of a git repository takes that one source")]
    GitSources,
    #[error("ADD of a git repository")]
    Git(#[from] crate::engine::git::Error),
    #[error("WORKDIR {dir}: cannot resolve USER {user:?}")]
    WorkdirUser {
        dir: String,
        user: String,
        source: Box<kiln_runtime::Error>,
    },
    #[error("WORKDIR {dir}: cannot make the directory")]
    Workdir { dir: String, source: std::io::Error },
    #[error("cannot use the named build context's ignore file")]
    Ignore(#[source] frontend::dockerignore::DockerignoreError),
    #[error(transparent)]
    Mounts(#[from] run_mounts::Error),
    #[error(transparent)]
    Emulation(#[from] emulation::Error),
    #[error(transparent)]
    Registries(#[from] crate::registry::config::Error),
}
pub type Result<T> = std::result::Result<T, Error>;
