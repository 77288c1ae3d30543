//! The `kiln` command line. Each subcommand lives in `kiln_builder::cli`;
//! this file only parses arguments, runs the command, and turns errors into
//! one message with its cause chain and an exit code.

use clap::{Parser, Subcommand};

use kiln_builder::cli;

/// kiln: a rootless, sandboxed container-image builder.
#[derive(Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one command in a kiln sandbox on a root filesystem directory
    /// (a debugging aid: this is how every RUN step is executed).
    Sandbox(cli::sandbox::SandboxArgs),
    /// Inspect kiln's view of a build without running it.
    Debug(kiln_builder::cli_plan::DebugCmd),
}

fn main() {
    let cli = Cli::parse();
    if let Command::Debug(cmd) = cli.command {
        // Parsing and planning never start a sandbox: no namespace needed.
        finish(kiln_builder::cli_plan::run_debug(cmd).map(|()| 0));
    }
    // Join kiln's own user namespace while the process is still
    // single-threaded: steps then map their ids without setuid helpers.
    if let Err(err) = kiln_runtime::userns::enter(kiln_runtime::userns::Mounts::Shared) {
        eprintln!("kiln: error: {err}");
        std::process::exit(kiln_runtime::error::EXIT_SANDBOX_FAILURE);
    }
    let result = match cli.command {
        Command::Sandbox(args) => cli::sandbox::run(args),
        Command::Debug(_) => unreachable!("handled above"),
    };
    finish(result)
}

fn finish(result: anyhow::Result<i32>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("kiln: error: {}", cli::chain(&err));
            std::process::exit(cli::exit_code(&err));
        }
    }
}
