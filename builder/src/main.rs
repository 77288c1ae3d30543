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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sandbox(args) => cli::sandbox::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("kiln: error: {}", cli::chain(&err));
            std::process::exit(cli::exit_code(&err));
        }
    }
}
