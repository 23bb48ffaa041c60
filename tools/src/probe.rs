//! `edgehal probe`: what hardware is here (or in a fixture tree), which backend runs each
//! device, and why a device is unavailable. `--json` prints the `edgehal.probe/1` document
//! documented in `edgehal_core::probe`, plus a `vulkan_devices` object: what the Vulkan loader
//! enumerates on the live machine (`{"available", "reason", "devices": [...]}`), or why there
//! is no Vulkan (`unavailable: libvulkan.so.1 not found`). Fixture probes skip it.

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
    // Enumerating Vulkan devices opens the loader: only for the live machine.
    let vk = root.is_live().then(edgehal_vulkan::list);
    if json {
        let mut v = report.to_json_value();
        if let (Some(vk), Some(obj)) = (&vk, v.as_object_mut()) {
            obj.insert("vulkan_devices".into(), vk.to_json());
        }
        println!("{v}");
    } else {
        print!("{}", report.to_table());
        if let Some(vk) = &vk {
            print!("\n{}", vk.to_text());
        }
    }
    Ok(())
}
