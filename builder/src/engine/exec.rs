//! RUN: one command in kiln's sandbox on a writable view of the step's
//! parent layers. Builds the sandbox's spec from the image state (SHELL,
//! Env, WorkingDir, User) and the step (its ARGs, network), streams the
//! command's output to the progress sink, and keeps the last lines for the
//! error when it fails.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroize;

use kiln_runtime::{ExitStatus, Network, PrivateFile, RunOptions, SandboxConfig, Stdio};
use oci_spec::runtime::Mount;

use super::fsutil::Root;
use super::image_state::ImageState;
use super::progress::Progress;
use crate::frontend::instructions::{Run, RunCommand};
use crate::session::secrets::Redactor;

/// How many output lines a failed step's error shows.
const TAIL_LINES: usize = 10;

/// Errors of a RUN step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the command exited with {status}{}", tail_text(.tail))]
    Failed {
        status: ExitStatus,
        tail: Vec<String>,
    },
    #[error(transparent)]
    Sandbox(#[from] kiln_runtime::Error),
    #[error("cannot create the working directory {dir}")]
    Workdir { dir: String, source: std::io::Error },
    #[error("cannot set up the step's output pipe")]
    Pipe(#[source] std::io::Error),
    #[error("cannot give the step its network files")]
    NetworkFiles(#[from] super::run_mounts::Error),
    #[error("a heredoc script needs an interpreter on its #! line")]
    EmptyShebang,
    #[error("the step ran past {limit} and was killed with every process it started{}", tail_text(.tail))]
    TimedOut { limit: String, tail: Vec<String> },
    #[error("the build ran past {limit} before this step started")]
    BuildTimedOut { limit: String },
    #[error("the step was killed for using more than its memory limit ({limit} bytes: --memory or limits.memory){}", tail_text(.tail))]
    OutOfMemory { limit: u64, tail: Vec<String> },
    #[error("cannot give the step its cgroup")]
    Cgroup(#[from] kiln_runtime::cgroup::SetupError),
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output:\n  {}", tail.join("\n  "))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Everything a RUN needs besides the view.
pub struct RunSpec<'a> {
    pub run: &'a Run,
    pub state: &'a ImageState,
    /// ARGs in scope and proxy args: environment for the command
    pub args: &'a [(String, String)],
    pub workdir: &'a str,
    pub network: Network,
    /// `--add-host NAME:IP`: appended to the step's /etc/hosts
    pub extra_hosts: &'a [(String, std::net::IpAddr)],
    pub vertex: usize,
    /// bind and tmpfs mounts of `RUN --mount`
    pub mounts: Vec<Mount>,
    /// secrets and agent sockets in the sandbox's private tmpfs
    pub private: Vec<PrivateFile>,
    /// secrets as environment variables, SSH_AUTH_SOCK: set last, so they
    /// win over ENV and ARG of the same name
    pub env: Vec<(String, String)>,
    /// qemu interpreters for a step of a foreign platform
    pub emulators: Vec<kiln_runtime::Emulator>,
    /// masks the build's secrets in the step's output
    pub redactor: Arc<Redactor>,
    /// `--shm-size` and `--ulimit`
    pub shm_size: Option<u64>,
    pub ulimits: &'a [kiln_runtime::spec::Rlimit],
    /// kiln's own defaults for the kinds `ulimits` leaves out
    pub default_ulimits: &'a [kiln_runtime::spec::Rlimit],
    /// the step's host name (`BUILDKIT_SANDBOX_HOSTNAME`, else `kiln`)
    pub hostname: &'a str,
    /// when the step's PID namespace is killed
    pub time_limit: Option<TimeLimit>,
    /// the step's own cgroup with its limits (removed when dropped)
    pub cgroup: Option<kiln_runtime::cgroup::StepCgroup>,
}

/// How long a step may run, and which limit that is (for the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeLimit {
    pub after: std::time::Duration,
    pub limit: String,
}

/// `--step-timeout` and `--timeout`: a step gets the shorter of its own
/// limit and what is left of the build's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeLimits {
    pub step: Option<std::time::Duration>,
    /// the build's limit and when it ends
    pub build: Option<(std::time::Duration, std::time::Instant)>,
}

impl TimeLimits {
    /// The limit of a step starting now.
    pub fn for_step(&self) -> Result<Option<TimeLimit>> {
        let step = self.step.map(|d| TimeLimit {
            after: d,
            limit: format!("--step-timeout {}", secs(d)),
        });
        let Some((limit, deadline)) = self.build else {
            return Ok(step);
        };
        let text = format!("--timeout {} (the build's)", secs(limit));
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(Error::BuildTimedOut { limit: text });
        }
        Ok(Some(match step {
            Some(s) if s.after <= left => s,
            _ => TimeLimit {
                after: left,
                limit: text,
            },
        }))
    }
}

/// A duration as a user wrote it, in seconds (`90s`, `1.5s`).
fn secs(d: std::time::Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// argv and the script to feed on stdin (for `#!` heredocs).
fn command(spec: &RunSpec<'_>) -> Result<(Vec<String>, Option<String>)> {
    let shell = spec.state.shell();
    Ok(match &spec.run.command {
        RunCommand::Exec(v) => (v.clone(), None),
        RunCommand::Shell(s) => (shell.into_iter().chain([s.clone()]).collect(), None),
        RunCommand::Heredoc {
            content,
            shebang: false,
            ..
        } => (shell.into_iter().chain([content.clone()]).collect(), None),
        RunCommand::Heredoc {
            content,
            shebang: true,
            ..
        } => {
            // The interpreter named on the #! line reads the script from
            // standard input, as if it were the file.
            let first = content
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("#!")
                .trim();
            let mut argv: Vec<String> = first.split_whitespace().map(String::from).collect();
            if argv.is_empty() {
                return Err(Error::EmptyShebang);
            }
            argv.push("/dev/stdin".into());
            (argv, Some(content.clone()))
        }
    })
}

/// The history `created_by` of this RUN, as BuildKit writes it: the
/// stage's build args as `|N K=V...` (in the order declared), then the
/// command line (the shell's words first for the shell form).
pub fn created_by(run: &Run, state: &ImageState, args: &[(String, String)]) -> String {
    let shell = state.shell().join(" ");
    let body = match &run.command {
        RunCommand::Exec(v) => v.join(" "),
        RunCommand::Shell(s) => format!("{shell} {s}"),
        RunCommand::Heredoc { content, .. } => format!("{shell} {content}"),
    };
    let prefix = if args.is_empty() {
        String::new()
    } else {
        let pairs: Vec<String> = args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("|{} {} ", args.len(), pairs.join(" "))
    };
    format!("RUN {prefix}{body} # buildkit")
}

/// The files a sandbox under `--network=sandbox` gets (`stack` given):
/// /etc/resolv.conf from the host's, and /etc/hosts with localhost and
/// `extra`; under another network, /etc/hosts only, and only when there
/// are `extra` hosts.
pub fn sandbox_files(
    stack: Option<&kiln_runtime::net::Stack>,
    hostname: &str,
    extra: &[(String, std::net::IpAddr)],
) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    if let Some(stack) = stack {
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        files.push((
            "/etc/resolv.conf".into(),
            stack.resolv_conf(&host).into_bytes(),
        ));
    }
    if stack.is_some() || !extra.is_empty() {
        files.push((
            "/etc/hosts".into(),
            kiln_runtime::net::hosts_file(hostname, extra).into_bytes(),
        ));
    }
    files
}

/// What a sandbox on `rootfs` needs for `network`: under `sandbox`, the
/// stack to start (detected here, so a missing one fails before anything
/// runs) and the network files; under any network, an /etc/hosts with the
/// `extra` hosts (`--add-host`). The files are appended to `private`; the
/// returned guard removes their stubs when dropped.
pub fn network_setup(
    rootfs: &Path,
    network: Network,
    hostname: &str,
    extra: &[(String, std::net::IpAddr)],
    private: &mut Vec<PrivateFile>,
) -> Result<(
    Option<kiln_runtime::net::Stack>,
    Option<super::run_mounts::NetworkFiles>,
)> {
    let stack = match network {
        Network::Sandbox { .. } => Some(kiln_runtime::net::Stack::detect()?),
        _ if extra.is_empty() => return Ok((None, None)),
        _ => None,
    };
    let mut files =
        super::run_mounts::network_files(rootfs, sandbox_files(stack.as_ref(), hostname, extra))?;
    private.append(&mut files.private);
    Ok((stack, Some(files)))
}

/// Run the step on the view at `rootfs`.
pub fn run(rootfs: &Path, mut spec: RunSpec<'_>, progress: &Arc<Progress>) -> Result<()> {
    make_workdir(rootfs, spec.workdir)?;
    let (args, script) = command(&spec)?;
    let mut config = sandbox_config(rootfs, &spec, args)?;
    let mut oci = config.to_spec()?;
    // the environment may hold secrets (`RUN --mount=type=secret,env=`):
    // every copy of it kiln makes is wiped when the step ends
    config.env.zeroize();
    for (_, v) in &mut spec.env {
        v.zeroize();
    }

    // --network=sandbox: the helper that carries the traffic, and the
    // step's resolv.conf and hosts naming what it can reach.
    let mut private = std::mem::take(&mut spec.private);
    let (network_stack, network_files) = network_setup(
        rootfs,
        spec.network,
        spec.hostname,
        spec.extra_hosts,
        &mut private,
    )?;

    let (out_r, out_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Pipe(e.into()))?;
    let err_w: OwnedFd = out_w.try_clone().map_err(Error::Pipe)?;
    let stdin = stdin_for(script)?;
    let reader = read_output(out_r, spec.vertex, progress, &spec.redactor);
    let status = kiln_runtime::run(
        &oci,
        RunOptions {
            stdin,
            stdout: Stdio::Fd(out_w),
            stderr: Stdio::Fd(err_w),
            private,
            network_stack,
            emulators: std::mem::take(&mut spec.emulators),
            timeout: spec.time_limit.as_ref().map(|t| t.after),
            cgroup: spec.cgroup.as_ref().map(|c| c.path.clone()),
            ..Default::default()
        },
    );
    if let Some(env) = oci
        .process_mut()
        .as_mut()
        .and_then(|p| p.env_mut().as_mut())
    {
        env.zeroize();
    }
    // the stubs go before the layer is made
    drop(network_files);
    let tail: Vec<String> = reader.join().unwrap_or_default().into();
    let status = status?;
    if status == ExitStatus::TimedOut {
        let limit = spec.time_limit.map(|t| t.limit).unwrap_or_default();
        return Err(Error::TimedOut { limit, tail });
    }
    if !status.success() {
        if let Some(cg) = spec.cgroup.as_ref().filter(|c| c.oom_killed()) {
            let limit = cg.limits.memory.unwrap_or_default();
            return Err(Error::OutOfMemory { limit, tail });
        }
        return Err(Error::Failed { status, tail });
    }
    Ok(())
}

/// The working directory exists before the command starts (BuildKit
/// creates a missing WORKDIR).
fn make_workdir(rootfs: &Path, workdir: &str) -> Result<()> {
    let err = |source| Error::Workdir {
        dir: workdir.into(),
        source,
    };
    let root = Root::open(rootfs).map_err(err)?;
    root.mkdir_all(Path::new(workdir.trim_start_matches('/')), 0, 0)
        .map_err(err)?;
    Ok(())
}

/// The sandbox for the step: its command, working directory, network,
/// mounts, user (from the image's USER, resolved in the rootfs) and
/// environment.
fn sandbox_config(rootfs: &Path, spec: &RunSpec<'_>, args: Vec<String>) -> Result<SandboxConfig> {
    let mut config = SandboxConfig::new(rootfs, args);
    config.cwd = spec.workdir.to_string();
    config.network = spec.network;
    config.hostname = spec.hostname.into();
    config.mounts = spec.mounts.clone();
    config.shm_size = spec.shm_size;
    config.rlimits = spec
        .default_ulimits
        .iter()
        .chain(spec.ulimits)
        .copied()
        .collect();
    let user = if spec.state.config.user.is_empty() {
        "0"
    } else {
        spec.state.config.user.as_str()
    };
    let ids = kiln_runtime::user::resolve(rootfs, user)?;
    config.uid = ids.uid;
    config.gid = ids.gid;
    config.additional_gids = ids.additional_gids;
    // ENV wins over an ARG of the same name; ARGs are visible to RUN as
    // environment variables.
    let env = spec.state.env_pairs();
    for (k, v) in spec.args {
        if !env.iter().any(|(ek, _)| ek == k) {
            config.env.push(format!("{k}={v}"));
        }
    }
    config
        .env
        .extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    // secrets as variables and SSH_AUTH_SOCK win over both
    for (k, v) in &spec.env {
        let prefix = format!("{k}=");
        config.env.retain(|e| !e.starts_with(&prefix));
        config.env.push(format!("{k}={v}"));
    }
    if !config.env.iter().any(|e| e.starts_with("HOME=")) {
        config.env.push(format!(
            "HOME={}",
            ids.home.unwrap_or_else(|| "/root".into())
        ));
    }
    Ok(config)
}

/// The command's stdin: a heredoc script fed through a pipe, else nothing.
fn stdin_for(script: Option<String>) -> Result<Stdio> {
    let Some(text) = script else {
        return Ok(Stdio::Null);
    };
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Pipe(e.into()))?;
    std::thread::spawn(move || {
        let mut w = std::fs::File::from(w);
        let _ = w.write_all(text.as_bytes());
    });
    Ok(Stdio::Fd(r))
}

/// Read the step's output into the progress log, secrets masked, keeping
/// the last lines for the error message if the step fails.
fn read_output(
    out_r: OwnedFd,
    vertex: usize,
    progress: &Arc<Progress>,
    redactor: &Arc<Redactor>,
) -> std::thread::JoinHandle<VecDeque<String>> {
    let sink = Arc::clone(progress);
    let redactor = Arc::clone(redactor);
    std::thread::spawn(move || {
        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        for line in BufReader::new(std::fs::File::from(out_r)).split(b'\n') {
            let Ok(line) = line else { break };
            let text = redactor.redact(&String::from_utf8_lossy(&line));
            sink.log(vertex, 1, &text);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text);
        }
        tail
    })
}
