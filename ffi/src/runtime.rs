//! `edgehal_runtime` and `edgehal_device`: the process's view of the compute it may use.
//!
//! Devices come from [`enumerate_devices`]: the HAL's probe report (what `edgehal probe` shows,
//! plugins included), the CPU first under the name "cpu".

use std::ffi::{c_char, CString};
use std::sync::Arc;

use crate::handle::{lookup, register, unregister, unregister_addr};
use crate::status::*;

/// Opaque handle to a runtime: the entry point that enumerates devices and loads models.
/// Create with `edgehal_runtime_create`, release with `edgehal_runtime_release`.
pub struct edgehal_runtime {
    _private: [u8; 0],
}

/// Opaque handle to a device. Borrowed from its runtime (`edgehal_runtime_device`): valid until
/// that runtime is released; never released on its own.
pub struct edgehal_device {
    _private: [u8; 0],
}

/// What kind of compute a device is.
pub type edgehal_device_kind = i32;
/// General-purpose CPU cores.
pub const EDGEHAL_DEVICE_CPU: edgehal_device_kind = 1;
/// A GPU (DRM render node, platform GPU, PCI display device, NVIDIA).
pub const EDGEHAL_DEVICE_GPU: edgehal_device_kind = 2;
/// An NPU (DRM accel devices, Rockchip rknpu, Hailo).
pub const EDGEHAL_DEVICE_NPU: edgehal_device_kind = 3;
/// A Coral Edge TPU (USB or PCIe/M.2).
pub const EDGEHAL_DEVICE_EDGETPU: edgehal_device_kind = 4;
/// Anything else: vendor plugin devices of unknown kind, plugins that failed to load.
pub const EDGEHAL_DEVICE_OTHER: edgehal_device_kind = 5;

/// Description of a device, filled by `edgehal_device_get_info`. Strings are owned by the
/// runtime and valid until it is released; none is NULL.
#[repr(C)]
pub struct edgehal_device_info {
    /// Name: "cpu" for the CPU (the name `edgehal_session_options.device` takes); for other
    /// devices the name `edgehal probe` shows (render node, accel node, plugin device name, or
    /// the path of a plugin that failed to load).
    pub name: *const c_char,
    /// One of the `EDGEHAL_DEVICE_*` kinds.
    pub kind: edgehal_device_kind,
    /// Parallel compute units (CPU: hardware threads available to this process; 0 when
    /// unknown).
    pub compute_units: u32,
    /// One human-readable line ("x86_64 CPU, 16 threads", the GPU's model...).
    pub description: *const c_char,
    /// The edgehal backend that runs it: "cpu", "vulkan", "npu", "edgetpu", the plugin's
    /// driver name (e.g. "example"), "plugin" for a plugin that failed to load, or "none" when
    /// no backend can use it.
    pub driver: *const c_char,
    /// The Linux kernel driver bound to it ("v3d", "intel_vpu", "apex"...), "" when none.
    pub kernel_driver: *const c_char,
    /// 1 when the device can be used now, 0 when not (see `reason`).
    pub available: i32,
    /// Why it is unavailable ("unavailable: libedgetpu.so.1 not found"); "" when available.
    pub reason: *const c_char,
}

pub(crate) struct Device {
    pub name: CString,
    pub kind: edgehal_device_kind,
    pub compute_units: u32,
    pub description: CString,
    pub driver: CString,
    pub kernel_driver: CString,
    pub available: bool,
    pub reason: CString,
}

pub(crate) struct Runtime {
    pub devices: Vec<Arc<Device>>,
    /// Handles of the devices (registered with the runtime, unregistered on its release).
    device_handles: Vec<usize>,
}

/// A device as found on this machine.
pub(crate) struct FoundDevice {
    pub name: String,
    pub kind: edgehal_device_kind,
    pub compute_units: u32,
    pub description: String,
    pub driver: String,
    pub kernel_driver: String,
    pub available: bool,
    pub reason: String,
}

/// The devices of this machine, as `edgehal probe` lists them: the HAL's probe report of the
/// live system (CPU, GPUs, NPUs, Edge TPUs) plus vendor plugin devices from
/// `EDGEHAL_DRIVER_PATH`. The CPU comes first, named "cpu" and sized by
/// `available_parallelism` (which honours affinity masks and cgroup quotas).
pub(crate) fn enumerate_devices() -> Vec<FoundDevice> {
    use edgehal_core::probe::{Backend, DeviceKind, SysRoot};
    let report = edgehal::plugin::probe_with_plugins(&SysRoot::live());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::with_capacity(report.devices.len().max(1));
    for d in &report.devices {
        let kind = match d.kind {
            DeviceKind::Cpu => EDGEHAL_DEVICE_CPU,
            DeviceKind::Gpu => EDGEHAL_DEVICE_GPU,
            DeviceKind::Npu => EDGEHAL_DEVICE_NPU,
            DeviceKind::EdgeTpu => EDGEHAL_DEVICE_EDGETPU,
            DeviceKind::Other => EDGEHAL_DEVICE_OTHER,
        };
        let driver = match d.backend {
            Backend::Plugin => d
                .details
                .get("driver")
                .cloned()
                .unwrap_or_else(|| "plugin".into()),
            b => b.as_str().to_string(),
        };
        let (name, compute_units, description) = if d.kind == DeviceKind::Cpu {
            (
                "cpu".to_string(),
                u32::try_from(threads).unwrap_or(u32::MAX),
                format!(
                    "{} ({} CPU, {threads} threads)",
                    d.name,
                    std::env::consts::ARCH
                ),
            )
        } else {
            let desc = d.details.get("description").cloned().unwrap_or_else(|| {
                let mut s = format!("{} {} device", d.bus, d.kind.as_str());
                if let Some(k) = &d.kernel_driver {
                    s.push_str(&format!(", kernel driver {k}"));
                }
                if let Some(id) = d.details.get("pci_id").or_else(|| d.details.get("usb_id")) {
                    s.push_str(&format!(", id {id}"));
                }
                s
            });
            (d.name.clone(), 0, desc)
        };
        out.push(FoundDevice {
            name,
            kind,
            compute_units,
            description,
            driver,
            kernel_driver: d.kernel_driver.clone().unwrap_or_default(),
            available: d.available,
            reason: d.reason.clone().unwrap_or_default(),
        });
    }
    // The probe always lists the CPU first; keep "cpu" first even if a fixture-like system
    // reported none.
    if !out.iter().any(|d| d.kind == EDGEHAL_DEVICE_CPU) {
        out.insert(
            0,
            FoundDevice {
                name: "cpu".into(),
                kind: EDGEHAL_DEVICE_CPU,
                compute_units: u32::try_from(threads).unwrap_or(u32::MAX),
                description: format!("{} CPU, {threads} threads", std::env::consts::ARCH),
                driver: "cpu".into(),
                kernel_driver: String::new(),
                available: true,
                reason: String::new(),
            },
        );
    }
    out
}

fn cstring(s: String) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// Create a runtime: enumerates the devices of this machine. On success `*out` receives a new
/// handle to release with `edgehal_runtime_release`. Models and sessions made through a
/// runtime stay usable after it is released; its device handles do not.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`.
///
/// Threading: any thread; a process may hold several runtimes.
///
/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_runtime_create(out: *mut *mut edgehal_runtime) -> edgehal_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let devices: Vec<Arc<Device>> = enumerate_devices()
            .into_iter()
            .map(|d| {
                Arc::new(Device {
                    name: cstring(d.name),
                    kind: d.kind,
                    compute_units: d.compute_units,
                    description: cstring(d.description),
                    driver: cstring(d.driver),
                    kernel_driver: cstring(d.kernel_driver),
                    available: d.available,
                    reason: cstring(d.reason),
                })
            })
            .collect();
        let device_handles = devices
            .iter()
            .map(|d| register::<Device, edgehal_device>(Arc::clone(d)) as usize)
            .collect();
        let rt = Arc::new(Runtime {
            devices,
            device_handles,
        });
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { out.write(register(rt)) };
        Ok(())
    })
}

/// Release a runtime and its device handles. NULL is a no-op.
///
/// Errors: `EDGEHAL_ERR_INVALID_HANDLE` when `runtime` is not live (double release is detected).
///
/// Threading: any thread, but no other thread may be using its device handles.
///
/// # Safety
/// `runtime` must be NULL or a handle from libedgehal.
#[no_mangle]
pub unsafe extern "C" fn edgehal_runtime_release(runtime: *mut edgehal_runtime) -> edgehal_status {
    guard(|| {
        if let Some(rt) = unregister::<Runtime, _>(runtime, "runtime")? {
            for &h in &rt.device_handles {
                unregister_addr(h);
            }
        }
        Ok(())
    })
}

/// Number of devices the runtime found (at least 1: the CPU, always index 0), available or
/// not.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread.
///
/// # Safety
/// `count` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_runtime_device_count(
    runtime: *const edgehal_runtime,
    count: *mut usize,
) -> edgehal_status {
    guard(|| {
        let rt = lookup::<Runtime, _>(runtime, "runtime")?;
        if count.is_null() {
            return Err(Fail::null("count"));
        }
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { count.write(rt.devices.len()) };
        Ok(())
    })
}

/// Get device number `index` (0-based, below `edgehal_runtime_device_count`). `*out` receives a
/// handle borrowed from the runtime: do not release it; it is valid until the runtime is.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`, `EDGEHAL_ERR_NOT_FOUND`
/// (index out of range).
///
/// Threading: any thread.
///
/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_runtime_device(
    runtime: *const edgehal_runtime,
    index: usize,
    out: *mut *const edgehal_device,
) -> edgehal_status {
    guard(|| {
        let rt = lookup::<Runtime, _>(runtime, "runtime")?;
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let h = rt.device_handles.get(index).ok_or_else(|| {
            Fail::new(
                EDGEHAL_ERR_NOT_FOUND,
                format!(
                    "device index {index} out of range ({} devices)",
                    rt.devices.len()
                ),
            )
        })?;
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { out.write(*h as *const edgehal_device) };
        Ok(())
    })
}

/// Describe a device. The strings in `*info` belong to the runtime.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE` (also after the runtime
/// was released).
///
/// Threading: any thread.
///
/// # Safety
/// `info` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_device_get_info(
    device: *const edgehal_device,
    info: *mut edgehal_device_info,
) -> edgehal_status {
    guard(|| {
        let d = lookup::<Device, _>(device, "device")?;
        if info.is_null() {
            return Err(Fail::null("info"));
        }
        // SAFETY: checked non-NULL; writable by the caller's contract. The strings live in the
        // `Device`, which the runtime keeps alive until it is released.
        unsafe {
            info.write(edgehal_device_info {
                name: d.name.as_ptr(),
                kind: d.kind,
                compute_units: d.compute_units,
                description: d.description.as_ptr(),
                driver: d.driver.as_ptr(),
                kernel_driver: d.kernel_driver.as_ptr(),
                available: i32::from(d.available),
                reason: d.reason.as_ptr(),
            })
        };
        Ok(())
    })
}
