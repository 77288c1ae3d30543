//! `kiln debug plan`: parse a Dockerfile, resolve its stages with the given
//! build options, and print the plan as JSON, so the frontend can be checked
//! without running a build.

use std::path::PathBuf;

use anyhow::Context;

use crate::frontend::{self, dockerignore, PlanOptions, Platform};

/// Arguments of `kiln debug plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// The Dockerfile (default: CONTEXT/Dockerfile; `-` reads standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Stage to build (default: the last one).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Build argument; `K` alone takes the value of environment variable K.
    #[arg(long = "build-arg", value_name = "K=V")]
    pub build_args: Vec<String>,
    /// Target platform, e.g. linux/arm64 (default: the host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// Named build context.
    #[arg(long = "build-context", value_name = "NAME=SOURCE")]
    pub build_contexts: Vec<String>,
    /// Print the raw syntax tree in BuildKit's dump format instead of the plan.
    #[arg(long)]
    pub syntax_tree: bool,
    /// The build context directory.
    #[arg(value_name = "CONTEXT")]
    pub context: PathBuf,
}

/// Run `kiln debug plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let (bytes, name) = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .context("cannot read the Dockerfile from standard input")?;
        (buf, "Dockerfile".to_string())
    } else {
        let bytes = std::fs::read(&file)
            .with_context(|| format!("cannot read Dockerfile {}", file.display()))?;
        (bytes, file.display().to_string())
    };
    let ast = frontend::parse(&bytes, &name)
        .map_err(|e| anyhow::anyhow!("{}", crate::error_chain(&e)))?;
    if args.syntax_tree {
        print!("{}", ast.dump());
        return Ok(());
    }

    let build_args = super::build::build_args(&args.build_args);
    let named_contexts = super::build::named_contexts(&args.build_contexts)?;
    let target_platform = args
        .platform
        .as_deref()
        .map(Platform::parse)
        .transpose()
        .context("invalid --platform")?;
    let opts = PlanOptions {
        build_args,
        target: args.target.clone(),
        target_platform,
        named_contexts,
        ..PlanOptions::default()
    };
    let plan =
        frontend::plan(&ast, &opts).map_err(|e| anyhow::anyhow!("{}", crate::error_chain(&e)))?;
    if let Some(e) = plan.lint_error(&ast) {
        anyhow::bail!("{}", crate::error_chain(&e));
    }
    for w in &plan.warnings {
        match w.line {
            Some(l) => eprintln!("warning: {name}:{l}: {}", w.message),
            None => eprintln!("warning: {}", w.message),
        }
    }
    // A Dockerfile from standard input has no NAME.dockerignore beside it.
    let ignore = if file.as_os_str() == "-" {
        let root = args.context.join(".dockerignore");
        match std::fs::read(&root) {
            Ok(text) => dockerignore::Matcher::from_dockerignore(&text)
                .with_context(|| root.display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => dockerignore::Matcher::default(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", root.display())),
        }
    } else {
        dockerignore::load(&args.context, &file)?
    };
    let out = serde_json::json!({
        "dockerfile": name,
        "context": args.context,
        "dockerignore": ignore.patterns(),
        "plan": plan,
    });
    print_out(&serde_json::to_string_pretty(&out)?)
}

/// Print to stdout; a reader that went away (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// `kiln debug ...`: tools for looking inside kiln without building.
#[derive(Debug, Clone, clap::Args)]
pub struct DebugCmd {
    /// What to inspect.
    #[command(subcommand)]
    pub command: DebugCommand,
}

/// Subcommands of `kiln debug`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DebugCommand {
    /// Print the resolved stages and dependencies of a Dockerfile as JSON.
    Plan(PlanArgs),
}

/// Run `kiln debug ...`.
pub fn run_debug(cmd: DebugCmd) -> anyhow::Result<()> {
    match cmd.command {
        DebugCommand::Plan(args) => run(args),
    }
}
