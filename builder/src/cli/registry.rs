//! `kiln pull`, `kiln push`, `kiln login` and `kiln logout`: the CLI side of
//! [`crate::registry`].

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use kiln_snapshotter::snapshot::Snapshotter;
use oci_spec::image::{Descriptor, MediaType};

use crate::image::{ImageStore, Platform, StateDir};
use crate::registry::{auth, config, Registry};

#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image: NAME[:TAG] or NAME@sha256:DIGEST (`debian` is
    /// docker.io/library/debian:latest)
    name: String,
    /// The platform to pick from a multi-platform image (default: the host's)
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// A stored image (name, ID or digest)
    source: String,
    /// Where to push it (default: its own name)
    dest: Option<String>,
}

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The registry host, HOST[:PORT] (`docker.io` for Docker Hub)
    host: String,
    /// User name
    #[arg(long, short = 'u')]
    username: String,
    /// Read the password from standard input (required: kiln never takes
    /// a password as an argument or from a prompt)
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Args, Debug)]
pub struct LogoutArgs {
    /// The registry host
    host: String,
}

/// A client from the registries config and `--insecure-registry` hosts.
pub fn client(insecure: &[String]) -> anyhow::Result<Registry> {
    Ok(Registry::from_env(insecure)?)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn parse_platform(p: Option<&str>) -> anyhow::Result<Platform> {
    match p {
        None => Ok(Platform::host()),
        Some(s) => Platform::parse(s).with_context(|| {
            format!("--platform {s:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        }),
    }
}

pub fn pull(root: Option<&Path>, insecure: &[String], args: PullArgs) -> anyhow::Result<i32> {
    let platform = parse_platform(args.platform.as_deref())?;
    let snap = open_store(root)?;
    let reg = client(insecure)?;
    let rt = runtime()?;
    // on a worker thread: unpacking blocks in place
    let pulled = rt.block_on(rt.spawn(async move {
        let store = ImageStore::new(&snap).with_platform(platform.clone());
        reg.pull(&store, &args.name, &platform).await
    }))??;
    if let Some(n) = &pulled.name {
        eprintln!("pulled {n}");
    }
    println!("{}", pulled.target.digest());
    Ok(0)
}

pub fn push(root: Option<&Path>, insecure: &[String], args: PushArgs) -> anyhow::Result<i32> {
    let snap = open_store(root)?;
    let reg = client(insecure)?;
    let rt = runtime()?;
    let pushed = rt.block_on(rt.spawn(async move {
        let store = ImageStore::new(&snap).any_platform();
        reg.push(&store, &args.source, args.dest.as_deref(), false)
            .await
    }))??;
    eprintln!(
        "pushed {} ({} blobs uploaded, {} mounted, {} already there)",
        pushed.reference, pushed.uploaded, pushed.mounted, pushed.present
    );
    println!("{}", pushed.digest);
    Ok(0)
}

/// Push every name of `names` (used by `--push` and `push=true`); the
/// manifest (or index) the registry now has, as pushed (layers the store
/// keeps plain go compressed, so its digest is not the stored one).
pub fn push_names(
    snap: &Arc<Snapshotter>,
    insecure: &[String],
    source: &str,
    names: &[String],
    by_digest: bool,
    progress: &Arc<crate::engine::progress::Progress>,
) -> anyhow::Result<Descriptor> {
    if names.is_empty() {
        bail!("push=true needs a name: add -t NAME or name=NAME");
    }
    let rt = runtime()?;
    let mut last = None;
    for n in names {
        // each push is a vertex with its blobs' bytes
        let vertex = progress.new_vertex();
        progress.started(vertex, &format!("pushing {n}"));
        let started = std::time::Instant::now();
        let sink = Arc::clone(progress);
        let reg = client(insecure)?.on_bytes(Arc::new(move |digest, done, total| {
            sink.transfer(vertex, digest.as_ref(), done, total);
        }));
        let (snap, source, n) = (snap.clone(), source.to_string(), n.clone());
        let pushed = rt
            .block_on(rt.spawn(async move {
                // an index of other platforms than the host's is pushed too
                let store = ImageStore::new(&snap).any_platform();
                reg.push(&store, &source, Some(&n), by_digest).await
            }))
            .map_err(anyhow::Error::from)
            .and_then(|r| r.map_err(anyhow::Error::from));
        let pushed = match pushed {
            Ok(p) => {
                progress.done(vertex, started.elapsed().as_secs_f64());
                p
            }
            Err(e) => {
                progress.error(vertex, &format!("{e:#}"));
                return Err(e);
            }
        };
        eprintln!("pushed {} {}", pushed.reference, pushed.digest);
        last = Some(pushed);
    }
    let pushed = last.expect("at least one name");
    Ok(Descriptor::new(
        MediaType::from(pushed.media_type.as_str()),
        pushed.size,
        pushed.digest,
    ))
}

pub(crate) fn open_store(root: Option<&Path>) -> anyhow::Result<Arc<Snapshotter>> {
    let state = StateDir::open(root)?;
    Ok(Arc::new(Snapshotter::open(
        &state.snapshotter_root(),
        kiln_snapshotter::backend::BackendKind::Copy,
    )?))
}

pub fn login(insecure: &[String], args: LoginArgs) -> anyhow::Result<i32> {
    let host = config::host_of(&args.host);
    if !args.password_stdin {
        bail!("kiln login {host}: pass the password on standard input with --password-stdin (kiln never takes it as an argument)");
    }
    let username = args.username;
    let mut password = String::new();
    std::io::stdin().lock().read_line(&mut password)?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        bail!("kiln login {host}: the password is empty");
    }
    let reg = client(insecure)?;
    let path = runtime()?.block_on(reg.login(&host, auth::Credentials { username, password }))?;
    eprintln!("Login Succeeded (credentials in {})", path.display());
    Ok(0)
}

pub fn logout(args: LogoutArgs) -> anyhow::Result<i32> {
    let host = config::host_of(&args.host);
    if auth::remove(&host)? {
        eprintln!("Removed login credentials for {host}");
        Ok(0)
    } else {
        bail!("not logged in to {host}")
    }
}
