//! The `kiln` command line: parses arguments, runs the command, and prints
//! an error with its whole cause chain.

use clap::{Parser, Subcommand};

use kiln_builder::cli_plan;

/// kiln: a rootless, sandboxed container-image builder.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect kiln's view of a build without running it.
    Debug(cli_plan::DebugCmd),
}

fn main() {
    let result = match Cli::parse().command {
        Command::Debug(cmd) => cli_plan::run_debug(cmd),
    };
    if let Err(err) = result {
        let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
        eprintln!("kiln: error: {}", chain.join(": "));
        std::process::exit(1);
    }
}
