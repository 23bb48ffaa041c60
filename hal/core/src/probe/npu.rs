//! NPU probing: the DRM accel subsystem (`sys/class/accel/accelN`, `/dev/accel/accelN`:
//! Intel `intel_vpu`, AMD `amdxdna`, Qualcomm `qaic`, Rockchip `rocket`...), Rockchip's vendor
//! `rknpu` DRM driver (`/dev/dri/cardN`), Hailo PCIe modules (`/dev/hailoN`), and known NPU PCI
//! functions whose kernel driver is not loaded.

use std::collections::BTreeSet;

use super::gpu::NPU_DRM_DRIVERS;
use super::libs::LibDirs;
use super::sysroot::SysRoot;
use super::{
    kernel_driver, of_compatible, pci_ids, slash, Backend, DeviceKind, MemoryDomain, ProbedDevice,
};

/// Accel drivers: kernel driver name, display name, user-space runtime libraries (any one
/// suffices; empty = none known, not checked).
const ACCEL_DRIVERS: &[(&str, &str, &[&str])] = &[
    // Level Zero NPU driver; renamed from libze_intel_vpu to libze_intel_npu with L0 1.16.
    (
        "intel_vpu",
        "Intel NPU",
        &["libze_intel_npu.so.1", "libze_intel_vpu.so.1"],
    ),
    ("amdxdna", "AMD XDNA NPU", &[]),
    ("qaic", "Qualcomm Cloud AI 100", &[]),
    // Mesa's Teflon TFLite delegate drives the mainline Rockchip NPU.
    ("rocket", "Rockchip NPU (rocket)", &["libteflon.so"]),
    ("habanalabs", "Habana Gaudi", &[]),
];

/// Known NPU PCI functions: vendor, device, name, expected kernel driver.
const NPU_PCI: &[(u32, u32, &str, &str)] = &[
    (0x8086, 0x7d1d, "Intel NPU (Meteor Lake, 37xx)", "intel_vpu"),
    (0x8086, 0xad1d, "Intel NPU (Arrow Lake, 37xx)", "intel_vpu"),
    (0x8086, 0x643e, "Intel NPU (Lunar Lake, 40xx)", "intel_vpu"),
    (
        0x8086,
        0xb03e,
        "Intel NPU (Panther Lake, 50xx)",
        "intel_vpu",
    ),
    (
        0x8086,
        0xfd3e,
        "Intel NPU (Wildcat Lake, 50xx)",
        "intel_vpu",
    ),
    (0x1022, 0x1502, "AMD XDNA NPU (npu1)", "amdxdna"),
    (0x1022, 0x17f0, "AMD XDNA NPU", "amdxdna"),
    (0x17cb, 0xa100, "Qualcomm Cloud AI 100", "qaic"),
    (0x1e60, 0x2864, "Hailo-8", "hailo"),
    (0x1e60, 0x45c4, "Hailo-10H", "hailo1x"),
    (0x1e60, 0x43a2, "Hailo-15L", "hailo1x"),
];

fn pci_name(root: &SysRoot, dev: &str) -> Option<(String, &'static str, (u32, u32))> {
    let (v, d, _) = pci_ids(root, dev)?;
    NPU_PCI
        .iter()
        .find(|(pv, pd, _, _)| *pv == v && *pd == d)
        .map(|(_, _, n, k)| (n.to_string(), *k, (v, d)))
}

fn check_runtime(d: &mut ProbedDevice, root: &SysRoot, libs: &LibDirs, candidates: &[&str]) {
    if candidates.is_empty() {
        d.detail("runtime", "not checked (no known user-space library)");
        return;
    }
    let found = candidates.iter().find_map(|n| {
        if n.ends_with(".so") && !n.contains(".so.") {
            libs.find(root, n)
                .or_else(|| libs.find_prefix(root, &format!("{n}.")))
        } else {
            libs.find(root, n)
        }
    });
    match found {
        Some(p) => d.detail("runtime", p),
        None => d.unavailable(format!("{} not found", candidates.join(" or "))),
    }
}

pub(super) fn probe_npus(root: &SysRoot, libs: &LibDirs) -> Vec<ProbedDevice> {
    let mut out = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();

    // DRM accel devices.
    for name in root.read_dir("sys/class/accel") {
        if !name.starts_with("accel") {
            continue;
        }
        let dev = root.resolve(format!("sys/class/accel/{name}/device"));
        let dev_s = dev.as_ref().map(|p| p.display().to_string());
        let drv = dev_s.as_deref().and_then(|d| kernel_driver(root, d));
        let known = drv
            .as_deref()
            .and_then(|k| ACCEL_DRIVERS.iter().find(|(n, _, _)| *n == k));
        let pci = dev_s.as_deref().and_then(|d| pci_name(root, d));
        let title = match (&pci, known) {
            (Some((n, _, _)), _) => n.clone(),
            (None, Some((_, n, _))) => n.to_string(),
            (None, None) => format!("accel device ({})", drv.as_deref().unwrap_or("no driver")),
        };
        let bus = if dev_s.as_deref().and_then(|d| pci_ids(root, d)).is_some() {
            "pci"
        } else {
            "platform"
        };
        let mut d = ProbedDevice::new(DeviceKind::Npu, title, Backend::Npu, bus);
        d.kernel_driver = drv.clone();
        d.sysfs = dev.as_deref().map(slash);
        d.memory = vec![MemoryDomain::Host, MemoryDomain::DmaBuf];
        d.detail("accel", name.clone());
        if let Some(mm) = root.read_trim(format!("sys/class/accel/{name}/dev")) {
            d.detail("dev", mm);
        }
        if let Some((_, _, (v, id))) = pci {
            d.detail("pci_id", format!("{v:04x}:{id:04x}"));
        }
        if let Some(ds) = dev_s.as_deref() {
            let compat = of_compatible(root, ds);
            if !compat.is_empty() {
                d.detail("compatible", compat.join(","));
            }
            for attr in ["npu_max_frequency_mhz", "sched_mode"] {
                if let Some(v) = root.read_trim(format!("{ds}/{attr}")) {
                    d.detail(attr, v);
                }
            }
            seen.insert(ds.to_string());
        }
        let node = format!("dev/accel/{name}");
        if root.exists(&node) {
            d.nodes.push(format!("/{node}"));
        } else {
            d.unavailable(format!("/{node} not found"));
        }
        match known {
            Some((_, _, libsn)) => check_runtime(&mut d, root, libs, libsn),
            None => d.unavailable(format!(
                "no edgehal NPU support for accel driver {}",
                drv.as_deref().unwrap_or("(none bound)")
            )),
        }
        out.push(d);
    }

    // Rockchip vendor RKNPU: a DRM card node.
    for name in root.read_dir("sys/class/drm") {
        if !name.starts_with("card") || name.contains('-') {
            continue;
        }
        let Some(dev) = root.resolve(format!("sys/class/drm/{name}/device")) else {
            continue;
        };
        let ds = dev.display().to_string();
        let Some(drv) = kernel_driver(root, &ds) else {
            continue;
        };
        if !NPU_DRM_DRIVERS.contains(&drv.to_ascii_lowercase().as_str()) || !seen.insert(ds.clone())
        {
            continue;
        }
        let mut d = ProbedDevice::new(
            DeviceKind::Npu,
            "Rockchip RKNPU (vendor driver)",
            Backend::Npu,
            "platform",
        );
        d.kernel_driver = Some(drv);
        d.sysfs = Some(slash(&dev));
        d.memory = vec![MemoryDomain::Host, MemoryDomain::DmaBuf];
        let compat = of_compatible(root, &ds);
        if !compat.is_empty() {
            d.detail("compatible", compat.join(","));
        }
        if let Some(v) = root.read_trim("sys/kernel/debug/rknpu/version") {
            d.detail(
                "driver_version",
                v.trim_start_matches("RKNPU driver:").trim().to_string(),
            );
        }
        let node = format!("dev/dri/{name}");
        if root.exists(&node) {
            d.nodes.push(format!("/{node}"));
        } else {
            d.unavailable(format!("/{node} not found"));
        }
        check_runtime(&mut d, root, libs, &["librknnrt.so"]);
        out.push(d);
    }

    // Hailo character devices.
    for class in ["hailo_chardev", "hailo1x"] {
        for name in root.read_dir(format!("sys/class/{class}")) {
            let dev = root.resolve(format!("sys/class/{class}/{name}/device"));
            let ds = dev.as_ref().map(|p| p.display().to_string());
            if let Some(s) = &ds {
                if !seen.insert(s.clone()) {
                    continue;
                }
            }
            let title = ds
                .as_deref()
                .and_then(|s| pci_name(root, s))
                .map(|(n, _, _)| n)
                .unwrap_or_else(|| "Hailo".into());
            let mut d = ProbedDevice::new(DeviceKind::Npu, title, Backend::Npu, "pci");
            d.kernel_driver = ds.as_deref().and_then(|s| kernel_driver(root, s));
            d.sysfs = dev.as_deref().map(slash);
            d.memory = vec![MemoryDomain::Host, MemoryDomain::DmaBuf];
            let node = format!("dev/{name}");
            if root.exists(&node) {
                d.nodes.push(format!("/{node}"));
            } else {
                d.unavailable(format!("/{node} not found"));
            }
            check_runtime(&mut d, root, libs, &["libhailort.so"]);
            out.push(d);
        }
    }

    // Known NPU PCI functions not claimed above: usually the kernel driver is not loaded.
    for bdf in root.read_dir("sys/bus/pci/devices") {
        let rel = format!("sys/bus/pci/devices/{bdf}");
        let Some((title, want_drv, (v, id))) = pci_name(root, &rel) else {
            continue;
        };
        let Some(dev) = root.resolve(&rel) else {
            continue;
        };
        let ds = dev.display().to_string();
        if seen.contains(&ds) {
            continue;
        }
        let mut d = ProbedDevice::new(DeviceKind::Npu, title, Backend::Npu, "pci");
        d.kernel_driver = kernel_driver(root, &ds);
        d.sysfs = Some(slash(&dev));
        d.memory = vec![MemoryDomain::Host, MemoryDomain::DmaBuf];
        d.detail("pci_id", format!("{v:04x}:{id:04x}"));
        match &d.kernel_driver {
            None => d.unavailable(format!("kernel driver {want_drv} not bound")),
            Some(k) => d.unavailable(format!("bound to {k} but no device node found")),
        }
        out.push(d);
    }
    out
}
