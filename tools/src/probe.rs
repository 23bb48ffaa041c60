//! `edgehal probe`: what hardware is here (or in a fixture tree), which backend runs each
//! device, and why a device is unavailable. `--json` prints the `edgehal.probe/1` document
//! documented in `edgehal_core::probe`.

use edgehal_core::probe::{probe, Backend, ProbedDevice, SysRoot};

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
    let mut report = probe(&root);
    // Vendor plugins found through EDGEHAL_DRIVER_PATH list their devices too; one that cannot
    // be loaded (wrong ABI version, missing symbols) is listed with the reason.
    let spec = std::env::var("EDGEHAL_DRIVER_PATH").unwrap_or_default();
    for path in edgehal::plugin::plugin_paths(&spec) {
        match edgehal::plugin::PluginDriver::load(&path) {
            Ok(driver) => {
                use edgehal_core::driver::Driver;
                for info in driver.probe(&root) {
                    report
                        .devices
                        .push(ProbedDevice::from_driver_info(&info, Backend::Plugin));
                }
            }
            Err(e) => report
                .devices
                .push(ProbedDevice::failed_plugin(path.display().to_string(), e)),
        }
    }
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
