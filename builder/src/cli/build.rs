//! `kiln build`: build an image from a Dockerfile and a context directory,
//! into kiln's local image store.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use kiln_snapshotter::backend::BackendKind;

use crate::engine::{self, progress};

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Build context directory
    #[arg(value_name = "CONTEXT")]
    context: PathBuf,
    /// Dockerfile (default: CONTEXT/Dockerfile)
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// Name the image (several allowed)
    #[arg(long, short = 't', value_name = "NAME[:TAG]")]
    tag: Vec<String>,
    /// Set a build argument
    #[arg(long, value_name = "K=V")]
    build_arg: Vec<String>,
    /// Build this stage and what it needs
    #[arg(long)]
    target: Option<String>,
    /// Do not use the cache
    #[arg(long)]
    no_cache: bool,
    /// Do not use the cache for this stage (several allowed)
    #[arg(long, value_name = "STAGE")]
    no_cache_filter: Vec<String>,
    /// How many steps run at once (default: the number of CPUs)
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Progress output: auto, plain, rawjson or quiet
    #[arg(long, default_value = "auto", env = "BUILDKIT_PROGRESS")]
    progress: String,
    /// State directory (default: $XDG_DATA_HOME/kiln or ~/.local/share/kiln)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Snapshotter backend: auto, fuse, overlay or copy
    #[arg(long, default_value = "auto")]
    snapshotter: String,
    /// Network of RUN steps: none or host
    #[arg(long, default_value = "none", value_parser = ["none", "host"])]
    network: String,
    /// Grant an entitlement: network.host
    #[arg(long, value_name = "ENTITLEMENT")]
    allow: Vec<String>,
}

/// `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`, created 0700.
pub fn state_root(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let root = match explicit {
        Some(r) => r,
        None => match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d).join("kiln"),
            None => {
                let home = std::env::var_os("HOME")
                    .context("neither XDG_DATA_HOME nor HOME is set: pass --root DIR")?;
                PathBuf::from(home).join(".local/share/kiln")
            }
        },
    };
    std::fs::create_dir_all(&root)
        .with_context(|| format!("cannot create state directory {}", root.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", root.display()))?;
    Ok(root)
}

pub fn run(args: BuildArgs) -> anyhow::Result<i32> {
    let mode = progress::Mode::parse(&args.progress).map_err(anyhow::Error::msg)?;
    let backend = match args.snapshotter.as_str() {
        "auto" => None,
        "fuse" => Some(BackendKind::Fuse),
        "overlay" => Some(BackendKind::Overlay),
        "copy" => Some(BackendKind::Copy),
        other => bail!("unknown --snapshotter {other:?}: use auto, fuse, overlay or copy"),
    };
    let mut allow_network_host = false;
    for a in &args.allow {
        match a.as_str() {
            "network.host" => allow_network_host = true,
            "security.insecure" => {
                bail!("--allow security.insecure: kiln never runs a step privileged")
            }
            other => bail!("unknown entitlement {other:?}: kiln knows network.host"),
        }
    }
    let mut build_args = BTreeMap::new();
    for a in &args.build_arg {
        match a.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), v.to_string()),
            // `--build-arg K` takes K from the environment, as docker does.
            None => std::env::var(a)
                .ok()
                .map(|v| build_args.insert(a.clone(), v))
                .unwrap_or(None),
        };
    }
    let epoch = build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok())
        .map(|s| {
            s.parse::<i64>()
                .with_context(|| format!("SOURCE_DATE_EPOCH {s:?} is not a number of seconds"))
        })
        .transpose()?;
    let context = std::path::absolute(&args.context)?;
    let dockerfile = match &args.file {
        Some(f) => std::path::absolute(f)?,
        None => context.join("Dockerfile"),
    };
    let opts = engine::BuildOptions {
        context,
        dockerfile,
        build_args,
        target: args.target.clone(),
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        jobs: args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }),
        state_root: state_root(args.root.clone())?,
        backend,
        network: if args.network == "host" {
            kiln_runtime::Network::Host
        } else {
            kiln_runtime::Network::None
        },
        allow_network_host,
        source_date_epoch: epoch,
        rewrite_timestamp: false,
    };
    let progress = Arc::new(progress::Progress::new(
        mode,
        Box::new(std::io::stderr()),
        Vec::new(),
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let root = opts.state_root.clone();
    let built = runtime.block_on(engine::build(opts, progress))?;
    engine::tag(&root, &built, &args.tag)?;
    println!("{}", built.manifest.digest());
    Ok(0)
}
