//! Hardware probing: what CPUs, GPUs, NPUs and Edge TPUs a machine has, which edgehal backend
//! would run each, which memory domains it can reach, and whether it is usable right now.
//!
//! Probing is *pure*: it only reads files below a [`SysRoot`] (sysfs, procfs, `/dev` entries,
//! library directories, Vulkan ICD manifests). Nothing is opened as a device and nothing is
//! `dlopen`ed — that is the driver's `open()`. The one exception is the live root `/`, where
//! the CPU's own CPUID/XGETBV (x86_64) or auxiliary vector (aarch64) are read, and AMX tile
//! permission is requested with `arch_prctl` because that is the only way to learn whether this
//! process may use AMX. A fixture tree substitutes those: `proc/cpuinfo` flags / `Features`
//! lines, and for ARM optionally a file `edgehal-fixture/auxv` holding
//!
//! ```text
//! AT_HWCAP  0x119fff
//! AT_HWCAP2 0x0
//! ```
//!
//! (`#` comments allowed), which then takes precedence over the `Features` line just as the
//! real auxiliary vector does on a live machine. What a fixture lacks is reported absent.
//!
//! # JSON schema `edgehal.probe/1`
//!
//! [`ProbeReport::to_json`] emits one object; keys are stable, new keys may be added, existing
//! keys keep their meaning within `edgehal.probe/1`. Absent values are `null`.
//!
//! ```text
//! {
//!   "schema": "edgehal.probe/1",
//!   "sysroot": "/",                      // the directory probed
//!   "live": true,                        // CPUID/auxv/arch_prctl were used
//!   "board": { "model": str|null, "compatible": [str], "l4t_release": str|null },
//!   "cpu": {
//!     "arch": "x86_64"|"aarch64"|"unknown",
//!     "vendor": str|null, "model": str|null,
//!     "logical_cores": int, "packages": int|null, "freq_domains": int,
//!     "clusters": [ { "cpus": "0-3", "count": int, "core": str|null,
//!                     "midr": { "implementer": "0x41", "part": "0xd0b" }|null,
//!                     "capacity": int|null, "max_freq_khz": int|null,
//!                     "caches": [ { "level": int, "type": str, "size_kib": int,
//!                                   "shared_cpu_list": str } ] } ],
//!     "features": [str],                 // sorted canonical names, see below
//!     "feature_source": "cpuid+xgetbv"|"auxv"|"fixture-auxv"|"proc/cpuinfo"|"none",
//!     "hwcap": { "AT_HWCAP": "0x..", "AT_HWCAP2": "0x.." }|null,
//!     "amx_permission": "not-present"|"granted"|"denied: <why>"|"not-requested (fixture probe)"
//!   },
//!   "vulkan": { "loader": str|null,
//!               "icds": [ { "manifest": str, "library_path": str|null,
//!                           "library_found": str|null, "api_version": str|null } ] },
//!   "devices": [ {
//!     "kind": "cpu"|"gpu"|"npu"|"edgetpu",
//!     "name": str,
//!     "driver": "cpu"|"vulkan"|"npu"|"edgetpu"|"none",   // edgehal backend that runs it
//!     "kernel_driver": str|null,
//!     "bus": "cpu"|"pci"|"platform"|"usb",
//!     "sysfs": str|null,                 // device directory, root-relative with leading '/'
//!     "nodes": [str],                    // device nodes that exist, e.g. "/dev/dri/renderD128"
//!     "memory": ["host"|"host-imported"|"dma-buf"|"device-local"],
//!     "available": bool,
//!     "reason": str|null,                // "unavailable: libedgetpu.so.1 not found" when false
//!     "details": { str: str }            // device-specific facts (pci_id, link speed, temp...)
//!   } ]
//! }
//! ```
//!
//! Canonical feature names follow Rust's `is_x86_feature_detected!` /
//! `is_aarch64_feature_detected!` spelling: x86 `sse4.1 sse4.2 avx avx2 fma f16c avx512f
//! avx512cd avx512dq avx512bw avx512vl avx512ifma avx512vbmi avx512vbmi2 avx512vnni
//! avx512bitalg avx512vpopcntdq avx512bf16 avx512fp16 avxvnni amx-tile amx-int8 amx-bf16`;
//! ARM `neon fp16 rdm dotprod fhm i8mm bf16 sve sve2 sme`.
//!
//! Memory domains are what the device class can address directly (integrated GPUs and NPUs
//! share host RAM and take dma-bufs; discrete GPUs have device-local memory and import host
//! pages); the driver's `open()` confirms them against the actual driver's capabilities.

#![forbid(unsafe_code)]

mod board;
mod cpu;
mod edgetpu;
mod gpu;
mod libs;
mod npu;
mod report;
mod sysroot;

use std::collections::BTreeMap;

pub use board::Board;
#[cfg(target_arch = "x86_64")]
pub use cpu::x86_features_from_cpuid;
pub use cpu::{
    arm_features_from_cpuinfo, arm_features_from_hwcap, core_name, parse_fixture_auxv,
    x86_features_from_flags, AmxState, Arch, Cache, Cluster, CpuInfo, FeatureSource,
};
pub use libs::{Icd, LibDirs, VulkanInfo};
pub use sysroot::{format_cpu_list, parse_cpu_list, SysRoot};

/// What a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    Npu,
    EdgeTpu,
    /// Test and template devices (`null`), plugins of unknown kind.
    Other,
}

impl DeviceKind {
    /// Lower-case name (`cpu`, `gpu`, `npu`, `edgetpu`, `other`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::Npu => "npu",
            DeviceKind::EdgeTpu => "edgetpu",
            DeviceKind::Other => "other",
        }
    }
}

/// The edgehal backend that would run a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Vulkan,
    Npu,
    EdgeTpu,
    /// A vendor plugin `.so` loaded through `EDGEHAL_DRIVER_PATH`.
    Plugin,
    /// A user-space PCI driver over VFIO (`edgehal-vfio`, e.g. QEMU's `edu` DMA device).
    Vfio,
    /// No edgehal backend can use it (display-only controller, unbound device...).
    None,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Vulkan => "vulkan",
            Backend::Npu => "npu",
            Backend::EdgeTpu => "edgetpu",
            Backend::Plugin => "plugin",
            Backend::Vfio => "vfio",
            Backend::None => "none",
        }
    }
}

pub use crate::buffer::MemoryDomain;

/// One device found by the probe.
#[derive(Clone, Debug)]
pub struct ProbedDevice {
    pub kind: DeviceKind,
    pub name: String,
    pub backend: Backend,
    /// The Linux driver bound to it (`v3d`, `intel_vpu`, `apex`...), if any.
    pub kernel_driver: Option<String>,
    /// `cpu`, `pci`, `platform` or `usb`.
    pub bus: &'static str,
    /// Root-relative sysfs device directory with a leading `/`.
    pub sysfs: Option<String>,
    /// Device nodes that exist.
    pub nodes: Vec<String>,
    pub memory: Vec<MemoryDomain>,
    pub available: bool,
    /// Why it is unavailable (`unavailable: ...`); `None` when available.
    pub reason: Option<String>,
    pub details: BTreeMap<String, String>,
}

impl ProbedDevice {
    fn new(kind: DeviceKind, name: impl Into<String>, backend: Backend, bus: &'static str) -> Self {
        ProbedDevice {
            kind,
            name: name.into(),
            backend,
            kernel_driver: None,
            bus,
            sysfs: None,
            nodes: Vec::new(),
            memory: Vec::new(),
            available: true,
            reason: None,
            details: BTreeMap::new(),
        }
    }

    /// A device enumerated by a [`crate::driver::Driver`] (plugins), for the report.
    pub fn from_driver_info(info: &crate::driver::DeviceInfo, backend: Backend) -> Self {
        let bus = match backend {
            Backend::Vfio => "pci",
            _ => "plugin",
        };
        let mut d = ProbedDevice::new(info.kind, info.name.clone(), backend, bus);
        d.memory = info.memory_domains.clone();
        if let Some(why) = &info.unavailable {
            d.available = false;
            d.reason = Some(if why.starts_with("unavailable") {
                why.clone()
            } else {
                format!("unavailable: {why}")
            });
        }
        if !info.description.is_empty() {
            d.detail("description", info.description.clone());
        }
        d.detail("driver", info.driver.clone());
        // A kernel driver the device is bound to (VFIO devices: vfio-pci).
        if let Some(k) = info.properties.get("pci_driver") {
            d.kernel_driver = Some(k.clone());
        }
        for (k, v) in &info.properties {
            d.detail(k, v.clone());
        }
        d
    }

    /// A plugin that could not be loaded: listed so the operator sees why.
    pub fn failed_plugin(name: impl Into<String>, why: impl std::fmt::Display) -> Self {
        let mut d = ProbedDevice::new(DeviceKind::Other, name, Backend::Plugin, "plugin");
        d.unavailable(why);
        d
    }

    /// Mark unavailable; the first reason recorded is the one reported.
    fn unavailable(&mut self, why: impl std::fmt::Display) {
        if self.available {
            self.available = false;
            self.reason = Some(format!("unavailable: {why}"));
        }
    }

    fn detail(&mut self, k: &str, v: impl Into<String>) {
        self.details.insert(k.to_string(), v.into());
    }
}

/// Everything one probe found.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub sysroot: std::path::PathBuf,
    pub live: bool,
    pub board: Board,
    pub cpu: CpuInfo,
    pub vulkan: VulkanInfo,
    /// All devices, CPU first, then GPUs, NPUs, Edge TPUs.
    pub devices: Vec<ProbedDevice>,
}

impl ProbeReport {
    /// Devices of one kind.
    pub fn devices_of(&self, kind: DeviceKind) -> impl Iterator<Item = &ProbedDevice> {
        self.devices.iter().filter(move |d| d.kind == kind)
    }
}

/// Probe the machine (or fixture tree) below `root`.
pub fn probe(root: &SysRoot) -> ProbeReport {
    let libs = LibDirs::new(root);
    let cpu = cpu::probe_cpu(root);
    let vulkan = libs::probe_vulkan(root, &libs);
    let mut devices = vec![cpu_device(&cpu)];
    devices.extend(gpu::probe_gpus(root, &vulkan));
    devices.extend(npu::probe_npus(root, &libs));
    devices.extend(edgetpu::probe_edgetpus(root, &libs));
    devices.sort_by_key(|d| d.kind);
    ProbeReport {
        sysroot: root.path().to_path_buf(),
        live: root.is_live(),
        board: board::probe_board(root),
        cpu,
        vulkan,
        devices,
    }
}

fn cpu_device(cpu: &CpuInfo) -> ProbedDevice {
    let name = cpu
        .model
        .clone()
        .unwrap_or_else(|| format!("{} CPU", cpu.arch.as_str()));
    let mut d = ProbedDevice::new(DeviceKind::Cpu, name, Backend::Cpu, "cpu");
    d.memory = vec![
        MemoryDomain::Host,
        MemoryDomain::HostImported,
        MemoryDomain::DmaBuf,
    ];
    d.detail("logical_cores", cpu.logical_cores.to_string());
    if cpu.logical_cores == 0 {
        d.unavailable("no CPUs listed in sys/devices/system/cpu or proc/cpuinfo");
    }
    d
}

/// The kernel driver bound to a root-relative device directory: the `driver` link's name,
/// else `DRIVER=` from `uevent`.
fn kernel_driver(root: &SysRoot, dev: &str) -> Option<String> {
    root.link_name(format!("{dev}/driver"))
        .or_else(|| uevent(root, dev).remove("DRIVER"))
}

/// `KEY=value` lines of a device's `uevent`.
fn uevent(root: &SysRoot, dev: &str) -> BTreeMap<String, String> {
    root.read_to_string(format!("{dev}/uevent"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `OF_COMPATIBLE_n` values of a device, in order.
fn of_compatible(root: &SysRoot, dev: &str) -> Vec<String> {
    let ue = uevent(root, dev);
    let mut v: Vec<(usize, String)> = ue
        .iter()
        .filter_map(|(k, val)| Some((k.strip_prefix("OF_COMPATIBLE_")?.parse().ok()?, val.clone())))
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).collect()
}

/// A PCI function's `(vendor, device, class)` read from its directory.
fn pci_ids(root: &SysRoot, dev: &str) -> Option<(u32, u32, u32)> {
    Some((
        root.read_u64(format!("{dev}/vendor"))? as u32,
        root.read_u64(format!("{dev}/device"))? as u32,
        root.read_u64(format!("{dev}/class"))? as u32,
    ))
}

/// Root-relative directory with a leading `/` for display.
fn slash(p: &std::path::Path) -> String {
    format!("/{}", p.display())
}
