//! The `ztseg` command: the daemon and its client commands, one binary.
//!
//! Exit codes (stable): 0 success, 1 runtime error, 2 usage error, 3 refused (verification
//! failed, policy invalid, access denied). Errors are one sentence on stderr.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use ztseg::{cgroup::CgroupFs, config::Config, dataplane};

#[derive(Parser)]
#[command(name = "ztseg", version, about = "Zero-trust network segmentation for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detach the programs and remove the pins and empty agent cgroups (explicit; never implicit).
    Uninstall {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztseg: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Uninstall { config } => {
            let config = Config::load(config.as_deref())?;
            let root = CgroupFs::discover()?.resolve(&config.cgroup_root)?;
            let report = dataplane::uninstall(&config.pin_dir, &root)?;
            println!(
                "detached {} programs, removed {} map pins from {}",
                report.links_detached,
                report.maps_unpinned,
                config.pin_dir.display()
            );
            for busy in &report.busy_cgroups {
                eprintln!("warning: {} still holds processes, which are no longer confined", busy.display());
            }
            Ok(())
        }
    }
}
