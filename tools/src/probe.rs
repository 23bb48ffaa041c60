//! `edgehal probe`: what hardware is here (or in a fixture tree), which backend runs each
//! device, and why a device is unavailable. `--json` prints the `edgehal.probe/1` document
//! documented in `edgehal_core::probe`, plus a `vulkan_devices` object: what the Vulkan loader
//! enumerates on the live machine (`{"available", "reason", "devices": [...]}`), or why there
//! is no Vulkan (`unavailable: libvulkan.so.1 not found`). Fixture probes skip it.

use edgehal_core::probe::{Backend, ProbedDevice, SysRoot};

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
    // The core probe plus vendor plugins from EDGEHAL_DRIVER_PATH (one that cannot be loaded
    // is listed with the reason), as the C API lists them.
    let mut report = edgehal::plugin::probe_with_plugins(&root);
    // PCI devices that edgehal drives from user space through VFIO (today: QEMU's edu DMA
    // device, the worked example of a PCIe driver). Probing reads sysfs only.
    {
        use edgehal_core::driver::Driver;
        for info in edgehal_vfio::driver::EduDriver::new().probe(&root) {
            report
                .devices
                .push(ProbedDevice::from_driver_info(&info, Backend::Vfio));
        }
    }
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
