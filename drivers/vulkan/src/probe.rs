//! What a Vulkan physical device offers, as edgehal reports it (`edgehal probe`).

use std::collections::BTreeMap;

use edgehal_core::buffer::MemoryDomain;
use edgehal_core::driver::{DeviceInfo, DeviceKind};
use serde_json::{json, Value};

/// Properties of one physical device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhysInfo {
    /// Position in `vkEnumeratePhysicalDevices`.
    pub index: usize,
    pub name: String,
    /// `integrated-gpu`, `discrete-gpu`, `virtual-gpu`, `cpu`, `other`.
    pub device_type: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub api_version: String,
    pub driver_version: u32,
    pub driver_name: String,
    pub driver_info: String,
    /// (size in bytes, device-local) per heap.
    pub heaps: Vec<(u64, bool)>,
    pub subgroup_size: u32,
    pub max_shared_memory: u32,
    pub max_workgroup_invocations: u32,
    pub max_storage_buffer_range: u32,
    pub storage_16bit: bool,
    pub storage_8bit: bool,
    pub shader_int8: bool,
    pub shader_float16: bool,
    pub integer_dot_product: bool,
    pub external_memory_host: bool,
    pub min_imported_host_pointer_alignment: u64,
    pub external_memory_fd: bool,
    pub external_memory_dma_buf: bool,
    pub cooperative_matrix: bool,
    /// `VK_KHR_external_fence_fd` with an exportable SYNC_FD handle: completions are polled
    /// as sync_file fds by the shared waiter instead of `vkWaitForFences` time slices.
    pub external_fence_sync_fd: bool,
}

/// PCI vendor name of a Vulkan vendor id.
pub fn vendor_name(id: u32) -> String {
    match id {
        0x10de => "NVIDIA".into(),
        0x1002 => "AMD".into(),
        0x8086 => "Intel".into(),
        0x13b5 => "Arm".into(),
        0x5143 => "Qualcomm".into(),
        0x14e4 => "Broadcom".into(),
        0x1010 => "Imagination".into(),
        0x10005 => "Mesa".into(),
        other => format!("{other:#x}"),
    }
}

impl PhysInfo {
    /// How int8 runs here: integer GEMMs (MatMulInteger, QLinearMatMul) with packed 4x8-bit
    /// dot products when the device has `shaderIntegerDotProduct`, else the portable int32
    /// kernel; QDQ models (Quantize/DequantizeLinear around float ops) run
    /// dequantize-compute-quantize in the float kernels either way.
    pub fn int8_path(&self) -> &'static str {
        if self.integer_dot_product {
            "integer GEMM: dot4x8 (shaderIntegerDotProduct); QDQ: float kernels"
        } else {
            "integer GEMM: int32 fallback (no shaderIntegerDotProduct); QDQ: float kernels"
        }
    }

    /// The edgehal device name (`vulkan0`, ...).
    pub fn device_name(&self) -> String {
        format!("vulkan{}", self.index)
    }

    /// Memory domains: host memory is imported when `VK_EXT_external_memory_host` exists.
    pub fn memory_domains(&self) -> Vec<MemoryDomain> {
        let mut d = vec![MemoryDomain::Host];
        if self.external_memory_host {
            d.push(MemoryDomain::HostImported);
        }
        d.push(MemoryDomain::DeviceLocal);
        d
    }

    /// Flat `key -> value` properties for [`DeviceInfo::properties`].
    pub fn properties(&self) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        let yn = |b: bool| if b { "yes" } else { "no" }.to_string();
        p.insert("vulkan_index".into(), self.index.to_string());
        p.insert("type".into(), self.device_type.clone());
        p.insert(
            "vendor".into(),
            format!("{} ({:#06x})", vendor_name(self.vendor_id), self.vendor_id),
        );
        p.insert("device_id".into(), format!("{:#06x}", self.device_id));
        p.insert("api_version".into(), self.api_version.clone());
        p.insert(
            "driver".into(),
            format!("{} {}", self.driver_name, self.driver_info)
                .trim()
                .to_string(),
        );
        p.insert(
            "driver_version".into(),
            format!("{:#x}", self.driver_version),
        );
        p.insert(
            "memory_heaps".into(),
            self.heaps
                .iter()
                .map(|(s, local)| {
                    format!(
                        "{} MiB{}",
                        s >> 20,
                        if *local { " device-local" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        );
        p.insert("subgroup_size".into(), self.subgroup_size.to_string());
        p.insert(
            "max_shared_memory".into(),
            self.max_shared_memory.to_string(),
        );
        p.insert("storage_16bit".into(), yn(self.storage_16bit));
        p.insert("storage_8bit".into(), yn(self.storage_8bit));
        p.insert("shader_int8".into(), yn(self.shader_int8));
        p.insert("shader_float16".into(), yn(self.shader_float16));
        p.insert("integer_dot_product".into(), yn(self.integer_dot_product));
        p.insert(
            "VK_EXT_external_memory_host".into(),
            if self.external_memory_host {
                format!(
                    "yes (alignment {})",
                    self.min_imported_host_pointer_alignment
                )
            } else {
                "no".into()
            },
        );
        p.insert(
            "VK_KHR_external_memory_fd".into(),
            yn(self.external_memory_fd),
        );
        p.insert(
            "VK_EXT_external_memory_dma_buf".into(),
            yn(self.external_memory_dma_buf),
        );
        p.insert(
            "VK_KHR_cooperative_matrix".into(),
            yn(self.cooperative_matrix),
        );
        p.insert(
            "VK_KHR_external_fence_fd".into(),
            if self.external_fence_sync_fd {
                "yes (sync_fd export: completions polled)".into()
            } else {
                "no (completions by vkWaitForFences slices)".into()
            },
        );
        p.insert("int8_path".into(), self.int8_path().into());
        p
    }

    /// The probe's JSON object for this device.
    pub fn to_json(&self) -> Value {
        json!({
            "index": self.index,
            "name": self.name,
            "edgehal_name": self.device_name(),
            "type": self.device_type,
            "vendor": vendor_name(self.vendor_id),
            "vendor_id": self.vendor_id,
            "device_id": self.device_id,
            "api_version": self.api_version,
            "driver_name": self.driver_name,
            "driver_info": self.driver_info,
            "driver_version": self.driver_version,
            "memory_heaps": self.heaps.iter().map(|(s, l)| json!({"size": s, "device_local": l})).collect::<Vec<_>>(),
            "subgroup_size": self.subgroup_size,
            "max_shared_memory": self.max_shared_memory,
            "storage_16bit": self.storage_16bit,
            "storage_8bit": self.storage_8bit,
            "shader_int8": self.shader_int8,
            "shader_float16": self.shader_float16,
            "integer_dot_product": self.integer_dot_product,
            "external_memory_host": self.external_memory_host,
            "min_imported_host_pointer_alignment": self.min_imported_host_pointer_alignment,
            "external_memory_fd": self.external_memory_fd,
            "external_memory_dma_buf": self.external_memory_dma_buf,
            "cooperative_matrix": self.cooperative_matrix,
            "external_fence_sync_fd": self.external_fence_sync_fd,
            "int8_path": self.int8_path(),
        })
    }

    /// The trait-level description.
    pub fn device_info(&self) -> DeviceInfo {
        let mut d = DeviceInfo::new(
            self.device_name(),
            DeviceKind::Gpu,
            "vulkan",
            self.memory_domains(),
        );
        d.description = format!(
            "{} ({}, Vulkan {})",
            self.name, self.device_type, self.api_version
        );
        d.properties = self.properties();
        d
    }
}

/// The outcome of enumerating Vulkan: devices, or why there are none.
#[derive(Clone, Debug)]
pub enum Listing {
    Devices(Vec<PhysInfo>),
    Unavailable(String),
}

impl Listing {
    /// Readable lines for `edgehal probe`.
    pub fn to_text(&self) -> String {
        let mut s = String::from("Vulkan devices:\n");
        match self {
            Listing::Unavailable(why) => s.push_str(&format!("  {why}\n")),
            Listing::Devices(d) if d.is_empty() => {
                s.push_str("  unavailable: the Vulkan loader found no physical device\n")
            }
            Listing::Devices(devs) => {
                for d in devs {
                    s.push_str(&format!(
                        "  [{}] {} — {}\n",
                        d.index,
                        d.name,
                        d.device_name()
                    ));
                    for (k, v) in d.properties() {
                        if k == "vulkan_index" {
                            continue;
                        }
                        s.push_str(&format!("      {k:<32} {v}\n"));
                    }
                }
            }
        }
        s
    }

    /// `{"available": bool, "reason": str|null, "devices": [...]}`.
    pub fn to_json(&self) -> Value {
        match self {
            Listing::Unavailable(why) => {
                json!({"available": false, "reason": why, "devices": []})
            }
            Listing::Devices(d) => json!({
                "available": !d.is_empty(),
                "reason": if d.is_empty() { Value::from("unavailable: the Vulkan loader found no physical device") } else { Value::Null },
                "devices": d.iter().map(PhysInfo::to_json).collect::<Vec<_>>(),
            }),
        }
    }
}
