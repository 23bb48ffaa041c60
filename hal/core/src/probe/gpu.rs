//! GPU probing. Sources, merged per device directory: DRM nodes (`sys/class/drm/{card,renderD}N`),
//! PCI display-class functions (class `0x03xxxx`; headless NVIDIA hosts have no DRM at all),
//! platform GPUs that have no DRM node (Jetson `nvgpu`, vendor Mali `mali_kbase`), and the
//! NVIDIA proprietary driver's `proc/driver/nvidia/gpus/*/information`. A GPU is usable by the
//! Vulkan backend when its device node exists, `libvulkan.so.1` is installed and an ICD
//! manifest for its kernel driver names a library that is installed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::libs::VulkanInfo;
use super::sysroot::SysRoot;
use super::{
    kernel_driver, of_compatible, pci_ids, slash, uevent, Backend, DeviceKind, MemoryDomain,
    ProbedDevice,
};

/// Compute-capable GPU kernel drivers: a display name and the ICD manifest name prefixes Mesa
/// or the vendor install for them.
const GPU_DRIVERS: &[(&str, &str, &[&str])] = &[
    ("v3d", "Broadcom VideoCore V3D", &["broadcom"]),
    ("panfrost", "Arm Mali (panfrost)", &["panfrost"]),
    ("panthor", "Arm Mali (panthor)", &["panfrost"]),
    ("mali", "Arm Mali (kbase)", &["mali"]),
    ("mali_kbase", "Arm Mali (kbase)", &["mali"]),
    ("msm", "Qualcomm Adreno", &["freedreno"]),
    ("msm_drm", "Qualcomm Adreno", &["freedreno"]),
    ("nvgpu", "NVIDIA Tegra GPU", &["nvidia"]),
    ("i915", "Intel GPU", &["intel"]),
    ("xe", "Intel GPU", &["intel"]),
    ("amdgpu", "AMD GPU", &["radeon", "amd"]),
    ("radeon", "AMD GPU", &["radeon"]),
    ("nouveau", "NVIDIA GPU (nouveau)", &["nouveau"]),
    ("nvidia", "NVIDIA GPU", &["nvidia"]),
    ("virtio_gpu", "virtio GPU", &["virtio"]),
    ("powervr", "Imagination PowerVR", &["powervr"]),
];

/// DRM drivers that only drive displays (or, on Jetson, host1x media engines): never compute.
const DISPLAY_ONLY: &[&str] = &[
    "vc4",
    "vc4-drm",
    "vc4_drm",
    "drm-rp1-dsi",
    "nvidia-drm",
    "tegra-dc",
    "drm",
    "simpledrm",
    "simple-framebuffer",
    "rockchip-drm",
    "ast",
    "bochs-drm",
    "bochs",
    "mgag200",
    "cirrus",
    "cirrus-qemu",
    "hdlcd",
    "vkms",
];

/// Drivers of DRM nodes that are NPUs, handled by the NPU probe.
pub(super) const NPU_DRM_DRIVERS: &[&str] = &["rknpu"];

/// OF compatible strings of platform GPUs that may lack a DRM node.
const PLATFORM_GPU_COMPAT: &[&str] = &[
    "nvidia,ga10b",
    "nvidia,gv11b",
    "nvidia,gp10b",
    "nvidia,tegra234-gpu",
];

fn pci_vendor_name(v: u32) -> Option<&'static str> {
    Some(match v {
        0x10de => "NVIDIA",
        0x1002 => "AMD",
        0x8086 => "Intel",
        0x1af4 => "virtio",
        0x1234 => "QEMU",
        0x1a03 => "ASPEED",
        0x102b => "Matrox",
        0x15ad => "VMware",
        _ => return None,
    })
}

#[derive(Default)]
struct Cand {
    /// Root-relative device directory (resolved), if there is one.
    dev: Option<PathBuf>,
    nodes: Vec<String>,
    has_render: bool,
    nvidia_model: Option<String>,
    nvidia_minor: Option<u64>,
}

pub(super) fn probe_gpus(root: &SysRoot, vk: &VulkanInfo) -> Vec<ProbedDevice> {
    let mut cands: BTreeMap<String, Cand> = BTreeMap::new();

    // 1. DRM nodes.
    for name in root.read_dir("sys/class/drm") {
        let is_render = name.starts_with("renderD");
        let is_card = name
            .strip_prefix("card")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !(is_render || is_card) {
            continue;
        }
        let Some(dev) = root.resolve(format!("sys/class/drm/{name}/device")) else {
            continue;
        };
        let c = cands.entry(dev.display().to_string()).or_default();
        c.dev = Some(dev);
        let node = format!("dev/dri/{name}");
        if root.exists(&node) {
            c.nodes.push(format!("/{node}"));
        }
        c.has_render |= is_render;
    }

    // 2. PCI display-class functions.
    for bdf in root.read_dir("sys/bus/pci/devices") {
        let rel = format!("sys/bus/pci/devices/{bdf}");
        let Some((_, _, class)) = pci_ids(root, &rel) else {
            continue;
        };
        if class >> 16 != 0x03 {
            continue;
        }
        if let Some(dev) = root.resolve(&rel) {
            let key = dev.display().to_string();
            cands.entry(key).or_default().dev = Some(dev);
        }
    }

    // 3. Platform GPUs that may have no DRM node (one or two levels below platform/).
    let mut plat_dirs = Vec::new();
    for a in root.read_dir("sys/devices/platform") {
        let pa = format!("sys/devices/platform/{a}");
        plat_dirs.push(pa.clone());
        if a.contains("bus@") || a == "soc" || a == "axi" || a.starts_with("soc@") {
            for b in root.read_dir(&pa) {
                plat_dirs.push(format!("{pa}/{b}"));
            }
        }
    }
    for d in plat_dirs {
        if !root.exists(format!("{d}/uevent")) {
            continue;
        }
        let drv = kernel_driver(root, &d);
        let compat = of_compatible(root, &d);
        let known_drv = drv
            .as_deref()
            .is_some_and(|k| matches!(k, "nvgpu" | "mali" | "mali_kbase"));
        let known_compat = compat
            .iter()
            .any(|c| PLATFORM_GPU_COMPAT.contains(&c.as_str()));
        if known_drv || known_compat {
            if let Some(dev) = root.resolve(&d) {
                let key = dev.display().to_string();
                cands.entry(key).or_default().dev = Some(dev);
            }
        }
    }

    // 4. NVIDIA proprietary driver.
    for bus in root.read_dir("proc/driver/nvidia/gpus") {
        let info = root
            .read_to_string(format!("proc/driver/nvidia/gpus/{bus}/information"))
            .unwrap_or_default();
        let field = |k: &str| {
            info.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(a, _)| a.trim() == k)
                .map(|(_, v)| v.trim().to_string())
        };
        let loc = field("Bus Location").unwrap_or_else(|| bus.clone());
        let dev = root.resolve(format!("sys/bus/pci/devices/{}", loc.to_lowercase()));
        let key = dev
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| format!("nvidia:{loc}"));
        let c = cands.entry(key).or_default();
        c.dev = c.dev.take().or(dev);
        c.nvidia_model = field("Model");
        c.nvidia_minor = field("Device Minor").and_then(|m| m.parse().ok());
    }

    cands
        .into_values()
        .filter_map(|c| describe(root, vk, c))
        .collect()
}

fn describe(root: &SysRoot, vk: &VulkanInfo, c: Cand) -> Option<ProbedDevice> {
    let dev_s = c.dev.as_ref().map(|d| d.display().to_string());
    let pci = dev_s.as_deref().and_then(|d| pci_ids(root, d));
    let mut drv = dev_s.as_deref().and_then(|d| kernel_driver(root, d));
    if drv.is_none() && c.nvidia_model.is_some() {
        drv = Some("nvidia".into());
    }
    let drv_l = drv.as_deref().map(str::to_ascii_lowercase);
    if drv_l
        .as_deref()
        .is_some_and(|d| NPU_DRM_DRIVERS.contains(&d))
    {
        return None;
    }
    let pci_display = pci.is_some_and(|(_, _, class)| class >> 16 == 0x03);
    let display_only = drv.as_deref().is_some_and(|d| DISPLAY_ONLY.contains(&d));
    if display_only && !pci_display {
        return None;
    }
    let known = drv
        .as_deref()
        .and_then(|d| GPU_DRIVERS.iter().find(|(k, _, _)| *k == d));
    if known.is_none() && !pci_display && !c.has_render {
        // A card node of some non-GPU driver we do not know: not reported as a GPU.
        return None;
    }

    let compat = dev_s
        .as_deref()
        .map(|d| of_compatible(root, d))
        .unwrap_or_default();
    let name = if let Some(m) = &c.nvidia_model {
        m.clone()
    } else if let Some((v, d, _)) = pci {
        let vendor = pci_vendor_name(v)
            .map(str::to_string)
            .unwrap_or_else(|| format!("{v:04x}"));
        format!("{vendor} GPU [{v:04x}:{d:04x}]")
    } else if let Some((_, n, _)) = known {
        match compat.first() {
            Some(cp) => format!("{n} ({cp})"),
            None => n.to_string(),
        }
    } else {
        format!("GPU ({})", drv.as_deref().unwrap_or("no driver"))
    };

    let bus = if pci.is_some() { "pci" } else { "platform" };
    let backend = if display_only || drv.is_none() {
        Backend::None
    } else {
        Backend::Vulkan
    };
    let mut d = ProbedDevice::new(DeviceKind::Gpu, name, backend, bus);
    d.kernel_driver = drv.clone();
    d.sysfs = c.dev.as_deref().map(slash);
    if let Some((v, dv, class)) = pci {
        d.detail("pci_id", format!("{v:04x}:{dv:04x}"));
        d.detail("pci_class", format!("{class:#08x}"));
    }
    if !compat.is_empty() {
        d.detail("compatible", compat.join(","));
    }
    if let Some(dev) = dev_s.as_deref() {
        if let Some(of) = uevent(root, dev).remove("OF_NAME") {
            d.detail("of_name", of);
        }
    }

    // Device nodes beyond DRM.
    let mut nodes = c.nodes.clone();
    let extra: Vec<String> = match drv.as_deref() {
        Some("nvidia") => {
            let minor = c.nvidia_minor.unwrap_or(0);
            vec![format!("dev/nvidia{minor}"), "dev/nvidiactl".into()]
        }
        Some("nvgpu") => vec!["dev/nvgpu/igpu0/ctrl".into(), "dev/nvmap".into()],
        Some("mali") | Some("mali_kbase") => vec!["dev/mali0".into()],
        _ => Vec::new(),
    };
    let mut missing_extra = Vec::new();
    for n in &extra {
        if root.exists(n) {
            nodes.push(format!("/{n}"));
        } else {
            missing_extra.push(format!("/{n}"));
        }
    }
    d.nodes = nodes;

    // Memory domains by device class.
    let integrated = bus == "platform" || pci.is_some_and(|(v, _, _)| v == 0x8086);
    d.memory = if backend == Backend::None {
        Vec::new()
    } else if integrated {
        vec![MemoryDomain::Host, MemoryDomain::DmaBuf]
    } else if drv.as_deref() == Some("nvidia") {
        vec![MemoryDomain::HostImported, MemoryDomain::DeviceLocal]
    } else {
        vec![
            MemoryDomain::HostImported,
            MemoryDomain::DmaBuf,
            MemoryDomain::DeviceLocal,
        ]
    };
    d.detail("integrated", integrated.to_string());

    // Availability, most fundamental reason first.
    match drv.as_deref() {
        None => d.unavailable("no kernel driver bound"),
        Some(k) if display_only => {
            d.unavailable(format!("display controller only ({k}), no compute"))
        }
        Some(k) => {
            if !c.has_render && extra.is_empty() {
                d.unavailable(format!("no DRM render node for {k}"));
            }
            if !c.has_render && !missing_extra.is_empty() {
                d.unavailable(format!(
                    "device node {} not found",
                    missing_extra.join(", ")
                ));
            }
            if c.has_render && !d.nodes.iter().any(|n| n.starts_with("/dev/dri/renderD")) {
                d.unavailable("render node missing in /dev/dri");
            }
            if vk.loader.is_none() {
                d.unavailable("libvulkan.so.1 not found (Vulkan loader)");
            }
            let prefixes: &[&str] = known.map(|(_, _, p)| *p).unwrap_or(&[]);
            let icd = vk
                .icds
                .iter()
                .find(|i| prefixes.iter().any(|p| i.file.starts_with(p)));
            match icd {
                None if prefixes.is_empty() => {
                    d.unavailable(format!("no known Vulkan ICD for kernel driver {k}"))
                }
                None => d.unavailable(format!(
                    "no Vulkan ICD for {k} (looked for {}*.json in vulkan/icd.d)",
                    prefixes[0]
                )),
                Some(i) => {
                    d.detail("vulkan_icd", i.manifest.clone());
                    if i.library_found.is_none() {
                        d.unavailable(format!(
                            "Vulkan ICD {} names {}, which is not installed",
                            i.file,
                            i.library_path.as_deref().unwrap_or("no library_path")
                        ));
                    }
                }
            }
        }
    }
    Some(d)
}
