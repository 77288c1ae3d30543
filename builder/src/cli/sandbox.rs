//! `kiln sandbox`: run one command in the sandbox every RUN step gets, on a
//! root filesystem directory. A debugging aid and the runtime's test surface.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kiln_runtime::{Network, Rlimit, RunOptions, SandboxConfig};
use oci_spec::runtime::PosixRlimitType;

#[derive(Args, Debug)]
pub struct SandboxArgs {
    /// Root filesystem directory of the sandbox
    #[arg(long, value_name = "DIR")]
    rootfs: PathBuf,
    /// Network: `none` (a private namespace with only loopback), `sandbox`
    /// (a private namespace with outbound access through pasta or
    /// slirp4netns) or `host`
    #[arg(long, default_value = "none", value_name = "MODE")]
    network: String,
    /// Under --network=sandbox, let the command reach the host's loopback
    /// services (through the gateway address), link-local addresses
    /// (169.254.0.0/16: cloud metadata) and the host's own addresses,
    /// all blocked by default
    #[arg(long)]
    allow_host_loopback: bool,
    /// User to run as: name or uid, optionally `:group` or `:gid`, resolved
    /// from the rootfs's /etc/passwd and /etc/group
    #[arg(long, short = 'u', value_name = "U[:G]")]
    user: Option<String>,
    /// Set an environment variable (`K=V`), or pass `K` from kiln's own
    /// environment
    #[arg(long, short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the sandbox
    #[arg(long, short = 'w', value_name = "DIR", default_value = "/")]
    cwd: String,
    /// Kill the whole sandbox after this many seconds (exit code 124)
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Hostname inside the sandbox
    #[arg(long, default_value = "kiln")]
    hostname: String,
    /// Resource limit `NAME=SOFT[:HARD]`, NAME one of nofile, nproc, core,
    /// cpu, fsize, data, stack, as, memlock, locks, sigpending, msgqueue,
    /// nice, rtprio, rttime, rss
    #[arg(long, value_name = "NAME=SOFT[:HARD]")]
    rlimit: Vec<String>,
    /// Seccomp profile: `default`, `unconfined`, or a seccompiler JSON file
    #[arg(long, default_value = "default", value_name = "PROFILE")]
    seccomp: String,
    /// Platform of the rootfs's binaries; a foreign one runs under
    /// qemu-user registered in the sandbox's own binfmt_misc
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Mount the rootfs read-only
    #[arg(long)]
    read_only: bool,
    /// Command and arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_rlimit(s: &str) -> anyhow::Result<Rlimit> {
    let (name, value) = s
        .split_once('=')
        .with_context(|| format!("--rlimit {s:?}: expected NAME=SOFT[:HARD]"))?;
    let kind = match name.to_ascii_lowercase().as_str() {
        "nofile" => PosixRlimitType::RlimitNofile,
        "nproc" => PosixRlimitType::RlimitNproc,
        "core" => PosixRlimitType::RlimitCore,
        "cpu" => PosixRlimitType::RlimitCpu,
        "fsize" => PosixRlimitType::RlimitFsize,
        "data" => PosixRlimitType::RlimitData,
        "stack" => PosixRlimitType::RlimitStack,
        "as" => PosixRlimitType::RlimitAs,
        "memlock" => PosixRlimitType::RlimitMemlock,
        "locks" => PosixRlimitType::RlimitLocks,
        "sigpending" => PosixRlimitType::RlimitSigpending,
        "msgqueue" => PosixRlimitType::RlimitMsgqueue,
        "nice" => PosixRlimitType::RlimitNice,
        "rtprio" => PosixRlimitType::RlimitRtprio,
        "rttime" => PosixRlimitType::RlimitRttime,
        "rss" => PosixRlimitType::RlimitRss,
        other => bail!("--rlimit {s:?}: unknown limit {other:?}"),
    };
    let num = |v: &str| -> anyhow::Result<u64> {
        if v == "unlimited" {
            return Ok(u64::MAX);
        }
        v.parse()
            .with_context(|| format!("--rlimit {s:?}: {v:?} is not a number"))
    };
    let (soft, hard) = match value.split_once(':') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(value)?, num(value)?),
    };
    if soft > hard {
        bail!("--rlimit {s:?}: the soft limit exceeds the hard limit");
    }
    Ok(Rlimit { kind, soft, hard })
}

pub fn run(args: SandboxArgs) -> anyhow::Result<i32> {
    let mut config = SandboxConfig::new(&args.rootfs, args.command.clone());
    config.network = Network::parse(&args.network, args.allow_host_loopback)?;
    config.cwd = args.cwd.clone();
    config.hostname = args.hostname.clone();
    config.seccomp = args.seccomp.clone();
    config.readonly_rootfs = args.read_only;
    config.rlimits = args
        .rlimit
        .iter()
        .map(|r| parse_rlimit(r))
        .collect::<anyhow::Result<_>>()?;
    let mut home = None;
    if let Some(user) = &args.user {
        let ids = kiln_runtime::user::resolve(&args.rootfs, user)?;
        config.uid = ids.uid;
        config.gid = ids.gid;
        config.additional_gids = ids.additional_gids;
        home = ids.home;
    }
    config.env.push(format!("HOSTNAME={}", args.hostname));
    config.env.push(format!(
        "HOME={}",
        home.unwrap_or_else(|| if config.uid == 0 {
            "/root".into()
        } else {
            "/".into()
        })
    ));
    for e in &args.env {
        match e.split_once('=') {
            Some(_) => config.env.push(e.clone()),
            None => {
                if let Ok(v) = std::env::var(e) {
                    config.env.push(format!("{e}={v}"));
                }
            }
        }
    }
    let spec = config.to_spec()?;
    let timeout = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            bail!("--timeout must be a positive number of seconds")
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let mut private = Vec::new();
    let (network_stack, network_files) = crate::engine::exec::network_setup(
        &args.rootfs,
        config.network,
        &args.hostname,
        &[],
        &mut private,
    )?;
    let emulators = match &args.platform {
        Some(p) => crate::engine::emulation::emulators_for(&crate::frontend::Platform::parse(p)?)?,
        None => Vec::new(),
    };
    let status = kiln_runtime::run(
        &spec,
        RunOptions {
            timeout,
            forward_signals: true,
            private,
            network_stack,
            emulators,
            ..Default::default()
        },
    );
    drop(network_files);
    let status = status?;
    if let kiln_runtime::ExitStatus::TimedOut = status {
        eprintln!(
            "kiln: the command timed out after {}s; the sandbox was killed",
            args.timeout.unwrap_or_default()
        );
    }
    Ok(status.code())
}
