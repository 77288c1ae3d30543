//! The `kiln` command line. Each subcommand lives in `kiln_builder::cli`;
//! this file only parses arguments, runs the command, and turns errors into
//! one message with its cause chain and an exit code.

// Functions stay a screenful or two long (clippy.toml sets the limit).
#![warn(clippy::too_many_lines)]

use clap::{Parser, Subcommand};

use kiln_builder::cli;

/// kiln: a rootless, sandboxed container-image builder.
#[derive(Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    /// kiln's state directory (images, layers, cache); default
    /// $XDG_DATA_HOME/kiln or ~/.local/share/kiln
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<std::path::PathBuf>,
    /// A registry spoken to over plain HTTP, HOST[:PORT] (several allowed;
    /// also in the registries config)
    #[arg(long, global = true, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// The most bytes one layer may hold uncompressed, checked while it is
    /// unpacked (pull, load, import, FROM, ADD of an archive, cache import)
    #[arg(long, global = true, value_name = "SIZE", default_value = "64GiB")]
    max_layer_size: String,
    /// The most tar entries one layer may hold
    #[arg(long, global = true, value_name = "N", default_value_t = 10_000_000)]
    max_layer_entries: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one command in a kiln sandbox on a root filesystem directory
    /// (a debugging aid: this is how every RUN step is executed).
    Sandbox(cli::sandbox::SandboxArgs),
    /// Build an image from a Dockerfile.
    Build(Box<cli::build::BuildArgs>),
    /// Run a stored image's command in a kiln sandbox.
    Run(cli::run::RunArgs),
    /// Inspect kiln's view of a build without running it.
    Debug(kiln_builder::cli::plan::DebugCmd),
    /// Load images from a docker-archive or oci-archive tar
    Load(cli::images::LoadArgs),
    /// Make a single-layer image from a root filesystem directory or tar
    Import(cli::images::ImportArgs),
    /// List stored images
    Images(cli::images::ImagesArgs),
    /// Remove stored images
    Rmi(cli::images::RmiArgs),
    /// Give a stored image another name
    Tag(cli::images::TagArgs),
    /// Write a stored image out (docker-archive, OCI layout, root filesystem)
    Save(cli::images::SaveArgs),
    /// Show the space used by images, layers and the build cache
    Du(cli::du::DuArgs),
    /// Pull an image from a registry into the store
    Pull(cli::registry::PullArgs),
    /// Push a stored image to a registry
    Push(cli::registry::PushArgs),
    /// Combine images in registries into an index, or inspect one
    Imagetools(cli::imagetools::ImagetoolsCmd),
    /// Store credentials for a registry (checked against it first)
    Login(cli::registry::LoginArgs),
    /// Remove stored credentials for a registry
    Logout(cli::registry::LogoutArgs),
    /// Show what this host can build: native and emulated platforms
    Info(cli::info::InfoArgs),
    /// Free the build cache (and with --all unnamed images)
    Prune(cli::prune::PruneArgs),
}

fn main() {
    // a view's FUSE server is this binary started again: it serves and
    // exits here, before anything of kiln's own is set up
    kiln_snapshotter::backend::fuse::serve_if_asked();
    let cli = Cli::parse();
    match kiln_builder::units::parse_size(&cli.max_layer_size) {
        Ok(max_bytes) => {
            kiln_snapshotter::targuard::Limits::set_current(kiln_snapshotter::targuard::Limits {
                max_bytes,
                max_entries: cli.max_layer_entries,
            })
        }
        Err(err) => finish(Err(err.context("--max-layer-size"))),
    }
    if let Command::Debug(cmd) = cli.command {
        // Parsing and planning never start a sandbox: no namespace needed.
        finish(kiln_builder::cli::plan::run_debug(cmd).map(|()| 0));
    }
    // Owners read as on the host only out here: a state directory or a
    // config file another user could change is refused before use.
    let checked = match &cli.command {
        Command::Sandbox(_) | Command::Login(_) | Command::Logout(_) => false,
        Command::Prune(args) => !args.after_build(),
        _ => true,
    };
    if checked {
        finish_on_error(check_state_dir(cli.root.as_deref()));
    }
    let settings = match load_settings(checked) {
        Ok(s) => s,
        Err(err) => finish(Err(err)),
    };
    // `kiln info` reads the caller's id facts here, outside kiln's user
    // namespace, and probes the snapshotter inside it, below.
    let host_facts = matches!(cli.command, Command::Info(_)).then(cli::info::HostFacts::gather);
    // Join kiln's own user namespace while the process is still
    // single-threaded: steps then map their ids without setuid helpers.
    // Store commands unpack and copy layers: they get a mount namespace of
    // their own; the sandbox shares kiln's.
    let mounts = match cli.command {
        Command::Sandbox(_) => kiln_runtime::userns::Mounts::Shared,
        _ => kiln_runtime::userns::Mounts::Private,
    };
    if let Err(err) = kiln_runtime::userns::enter(mounts) {
        eprintln!("kiln: error: {}", kiln_builder::error_chain(&err));
        std::process::exit(kiln_runtime::error::EXIT_SANDBOX_FAILURE);
    }
    let root = cli.root.as_deref();
    let insecure = &cli.insecure_registry;
    let built = matches!(cli.command, Command::Build(_));
    let gc_settings = settings.clone();
    let result = match cli.command {
        Command::Sandbox(args) => cli::sandbox::run(args),
        Command::Build(args) => cli::build::run(root, insecure, settings, *args),
        Command::Pull(args) => cli::registry::pull(root, insecure, args),
        Command::Push(args) => cli::registry::push(root, insecure, args),
        Command::Imagetools(cmd) => cli::imagetools::run(root, insecure, cmd),
        Command::Login(args) => cli::registry::login(insecure, args),
        Command::Logout(args) => cli::registry::logout(args),
        Command::Run(args) => cli::run::run(root, args),
        Command::Load(args) => cli::images::load(root, args),
        Command::Import(args) => cli::images::import_cmd(root, args),
        Command::Images(args) => cli::images::images(root, args),
        Command::Rmi(args) => cli::images::rmi(root, args),
        Command::Tag(args) => cli::images::tag(root, args),
        Command::Save(args) => cli::images::save(root, args),
        Command::Du(args) => cli::du::run(root, &settings, args),
        Command::Prune(args) => cli::prune::run(root, &settings, args),
        Command::Info(args) => cli::info::run(
            root,
            host_facts.expect("gathered before entering the namespace"),
            &settings,
            args,
        ),
        Command::Debug(_) => unreachable!("handled above"),
    };
    // the build's result (or its error) is out first; then the state is
    // measured, and a collector started only when it is over its limit
    if built {
        let code = report(result);
        cli::autogc::after_build(root, &gc_settings);
        std::process::exit(code);
    }
    finish(result)
}

/// Print an error with its cause chain; the exit code.
fn report(result: anyhow::Result<i32>) -> i32 {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: error: {}", cli::chain(&err));
            cli::exit_code(&err)
        }
    }
}

/// The state directory (`--root`, else the default), checked as
/// [`kiln_builder::image::state_dir::check_private`] does.
fn check_state_dir(root: Option<&std::path::Path>) -> anyhow::Result<()> {
    let path = match root {
        Some(r) => r.to_path_buf(),
        None => kiln_builder::image::StateDir::default_path()?,
    };
    kiln_builder::image::state_dir::check_private(&path)?;
    Ok(())
}

/// kiln.toml's layers; the user's file checked as the state directory is.
fn load_settings(check: bool) -> anyhow::Result<kiln_builder::config::Settings> {
    if let Some(user) = kiln_builder::config::user_path().filter(|_| check) {
        kiln_builder::image::state_dir::check_private(&user)?;
    }
    Ok(kiln_builder::config::Settings::load()?)
}

fn finish_on_error(result: anyhow::Result<()>) {
    if let Err(err) = result {
        finish(Err(err));
    }
}

fn finish(result: anyhow::Result<i32>) -> ! {
    std::process::exit(report(result))
}
