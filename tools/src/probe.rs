//! `edgehal probe`: what hardware is here (or in a fixture tree), which backend runs each
//! device, and why a device is unavailable. `--json` prints the `edgehal.probe/1` document
//! documented in `edgehal_core::probe`.

use edgehal_core::probe::{probe, SysRoot};

/// Run `edgehal probe`.
pub fn run(json: bool, sysroot: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let root = match sysroot {
        Some(dir) => {
            if !dir.is_dir() {
                anyhow::bail!("--sysroot {}: not a directory", dir.display());
            }
            SysRoot::new(dir)
        }
        None => SysRoot::live(),
    };
    let report = probe(&root);
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
