//! The `edgehal` command.

#![forbid(unsafe_code)]

mod probe;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "edgehal",
    version,
    about = "edge AI hardware abstraction layer and inference runtime"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the CPUs, GPUs, NPUs and Edge TPUs of this machine (or of a fixture tree).
    Probe {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Probe this directory as if it were `/` (fixture trees).
        #[arg(long)]
        sysroot: Option<std::path::PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Probe { json, sysroot } => probe::run(json, sysroot),
    };
    if let Err(e) = res {
        eprintln!("edgehal: {e:#}");
        std::process::exit(1);
    }
}
