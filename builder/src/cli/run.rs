//! `kiln run IMAGE [-- CMD...]`: run a stored image's command (or the one
//! given) in the same sandbox a RUN step gets, on a throw-away writable
//! view of the image's layers.

use std::path::Path;

use anyhow::Context;
use clap::Args;
use kiln_runtime::{Network, RunOptions, SandboxConfig};
use kiln_snapshotter::snapshot::Snapshotter;

use crate::image::{ImageStore, StateDir};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Image name, digest or id prefix
    image: String,
    /// Network: `none` (only loopback), `sandbox` (a private namespace with
    /// outbound access through pasta or slirp4netns) or `host`
    #[arg(long, default_value = "none", value_name = "MODE")]
    network: String,
    /// Under --network=sandbox, let the command reach the host's loopback
    /// services (through the gateway address), link-local addresses
    /// (169.254.0.0/16: cloud metadata) and the host's own addresses,
    /// all blocked by default
    #[arg(long)]
    allow_host_loopback: bool,
    /// Set an environment variable (`K=V`)
    #[arg(long, short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Run as this user instead of the image's
    #[arg(long, short = 'u', value_name = "U[:G]")]
    user: Option<String>,
    /// Command and arguments instead of the image's CMD
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(root: Option<&Path>, args: RunArgs) -> anyhow::Result<i32> {
    let state = StateDir::open(root)?;
    let backend = kiln_snapshotter::backend::probe::probe(state.root());
    let snap = Snapshotter::open(&state.snapshotter_root(), backend)?;
    let store = ImageStore::new(&snap);
    let image = store.resolve(&args.image)?;
    let (chain, _) = store.unpack(&image)?;
    let config: serde_json::Value =
        serde_json::from_slice(&image.config_bytes).context("the image config is not JSON")?;
    let c = &config["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Docker's rule: ENTRYPOINT followed by the command (given, or CMD).
    let cmd = if args.command.is_empty() {
        strings(&c["Cmd"])
    } else {
        args.command.clone()
    };
    let argv: Vec<String> = strings(&c["Entrypoint"]).into_iter().chain(cmd).collect();
    anyhow::ensure!(
        !argv.is_empty(),
        "image {} has no ENTRYPOINT or CMD: give a command after --",
        args.image
    );

    let view = snap.prepare(&format!("run-{}", std::process::id()), chain.as_ref())?;
    let rootfs = view.path().to_path_buf();
    let mut config_s = SandboxConfig::new(&rootfs, argv);
    config_s.network = Network::parse(&args.network, args.allow_host_loopback)?;
    config_s.cwd = c["WorkingDir"]
        .as_str()
        .filter(|w| !w.is_empty())
        .unwrap_or("/")
        .to_string();
    let user = args.user.clone().or_else(|| {
        c["User"]
            .as_str()
            .filter(|u| !u.is_empty())
            .map(String::from)
    });
    let ids = kiln_runtime::user::resolve(&rootfs, user.as_deref().unwrap_or("0"))?;
    config_s.uid = ids.uid;
    config_s.gid = ids.gid;
    config_s.additional_gids = ids.additional_gids;
    config_s.env = strings(&c["Env"]);
    config_s.env.extend(args.env.iter().cloned());
    let spec = config_s.to_spec()?;
    let mut private = Vec::new();
    let network =
        crate::engine::exec::network_setup(&rootfs, config_s.network, "kiln", &[], &mut private);
    let status = match network {
        Ok((network_stack, network_files)) => {
            let status = kiln_runtime::run(
                &spec,
                RunOptions {
                    forward_signals: true,
                    private,
                    network_stack,
                    ..Default::default()
                },
            )
            .map_err(anyhow::Error::from);
            drop(network_files);
            status
        }
        Err(e) => Err(e.into()),
    };
    // The view is thrown away whatever happened.
    let _ = snap.remove(view);
    Ok(status?.code())
}
