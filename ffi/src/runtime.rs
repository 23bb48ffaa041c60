//! `edgehal_runtime` and `edgehal_device`: the process's view of the compute it may use.
//!
//! Devices come from [`enumerate_devices`], the one function to swap for the HAL's probe report
//! when it lands; today it reports the CPU.

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
/// A GPU (Vulkan and others, with the HAL drivers).
pub const EDGEHAL_DEVICE_GPU: edgehal_device_kind = 2;
/// An NPU or other accelerator (Edge TPU, DRM accel devices).
pub const EDGEHAL_DEVICE_NPU: edgehal_device_kind = 3;

/// Description of a device, filled by `edgehal_device_get_info`. Strings are owned by the
/// runtime and valid until it is released.
#[repr(C)]
pub struct edgehal_device_info {
    /// Name to put in `edgehal_session_options.device` ("cpu").
    pub name: *const c_char,
    /// `EDGEHAL_DEVICE_CPU`, `EDGEHAL_DEVICE_GPU` or `EDGEHAL_DEVICE_NPU`.
    pub kind: edgehal_device_kind,
    /// Parallel compute units (CPU: hardware threads available to this process).
    pub compute_units: u32,
    /// One human-readable line ("x86_64 CPU, 16 threads").
    pub description: *const c_char,
}

pub(crate) struct Device {
    pub name: CString,
    pub kind: edgehal_device_kind,
    pub compute_units: u32,
    pub description: CString,
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
}

/// The devices this process can use. Today: the CPU, sized by `available_parallelism` (which
/// honours affinity masks and cgroup quotas). The HAL's probe report replaces this function.
pub(crate) fn enumerate_devices() -> Vec<FoundDevice> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    vec![FoundDevice {
        name: "cpu".into(),
        kind: EDGEHAL_DEVICE_CPU,
        compute_units: u32::try_from(threads).unwrap_or(u32::MAX),
        description: format!("{} CPU, {threads} threads", std::env::consts::ARCH),
    }]
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

/// Number of devices the runtime found (at least 1: the CPU).
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
            })
        };
        Ok(())
    })
}
