//! `kiln info`: what this host can do, as sections printed as text or as
//! one JSON object (`--format json`). Each section is a field of [`Info`];
//! a new fact about the host is a new section, not a new command.

use clap::Args;
use serde::Serialize;

use crate::engine::emulation::{self, PlatformSupport};

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Output format: text or json
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

/// Everything `kiln info` reports, one field per section.
#[derive(Debug, Serialize)]
pub struct Info {
    /// platforms RUN steps can run on, natively or emulated, and how
    pub platforms: Vec<PlatformSupport>,
}

impl Info {
    /// The facts of this host.
    pub fn gather() -> Self {
        Info {
            platforms: emulation::host_support(),
        }
    }

    /// The text form: a heading per section, one line per fact.
    pub fn text(&self) -> String {
        let mut out = String::from("Platforms:\n");
        for p in &self.platforms {
            out.push_str(&format!("  {:<16} {}", p.platform, p.how));
            if let Some(i) = &p.interpreter {
                out.push_str(&format!(" ({i})"));
            }
            out.push('\n');
            if let Some(fix) = &p.fix {
                out.push_str(&format!("  {:<16}   {fix}\n", ""));
            }
        }
        out
    }
}

pub fn run(args: InfoArgs) -> anyhow::Result<i32> {
    let info = Info::gather();
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info.text());
    }
    Ok(0)
}
