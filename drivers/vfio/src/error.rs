//! One error type for the crate. Every variant says what went wrong and, where the user can fix
//! it, how.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong on the VFIO / DMA path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No PCI device with this address under the sysfs root.
    #[error("PCI device {bdf} not found (no {path}); check the address with `lspci -D`")]
    NoDevice { bdf: String, path: PathBuf },

    /// The device exists but another driver (or none) owns it.
    #[error(
        "PCI device {bdf} is bound to {current}, not vfio-pci; bind {bdf} to vfio-pci: \
         echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override && \
         echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; \
         echo {bdf} > /sys/bus/pci/drivers_probe (modprobe vfio-pci first)"
    )]
    NotBoundToVfio { bdf: String, current: String },

    /// No IOMMU group: the IOMMU is off or absent.
    #[error(
        "PCI device {bdf} has no IOMMU group ({path} missing): the IOMMU is off or absent; \
         boot with intel_iommu=on (Intel) or amd_iommu=on (AMD) and enable VT-d/AMD-Vi in firmware"
    )]
    NoIommuGroup { bdf: String, path: PathBuf },

    /// The group node in /dev/vfio does not exist although the device is bound.
    #[error(
        "{path} does not exist although {bdf} is in IOMMU group {group}; is vfio-pci loaded and \
         bound (modprobe vfio-pci vfio_iommu_type1)?"
    )]
    NoGroupNode {
        bdf: String,
        group: u32,
        path: PathBuf,
    },

    /// The group node exists but this user may not open it.
    #[error(
        "no permission to open {path} (IOMMU group {group} of {bdf}); run as root or give this \
         user the group node: chown $USER {path}, and raise the memlock limit (ulimit -l)"
    )]
    NoPermission {
        bdf: String,
        group: u32,
        path: PathBuf,
    },

    /// Another device in the group is bound to a host driver.
    #[error(
        "IOMMU group {group} of {bdf} is not viable: {other} is bound to {driver}; bind every \
         device of /sys/kernel/iommu_groups/{group}/devices to vfio-pci or unbind it"
    )]
    GroupNotViable {
        bdf: String,
        group: u32,
        other: String,
        driver: String,
    },

    /// The kernel refused a VFIO operation.
    #[error("VFIO {op} on {bdf}: {source}")]
    Vfio {
        op: &'static str,
        bdf: String,
        #[source]
        source: vfio_ioctls::VfioError,
    },

    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        op: String,
        #[source]
        source: std::io::Error,
    },

    /// The IOVA window has no free range of the requested size.
    #[error(
        "IOVA space exhausted: no free {size:#x}-byte range in [{base:#x}, {end:#x}) \
         ({free:#x} bytes free in total); unmap buffers or plan fewer resident tensors"
    )]
    IovaExhausted {
        size: u64,
        base: u64,
        end: u64,
        free: u64,
    },

    /// The device did not finish within its deadline; it is now marked lost.
    #[error(
        "device {bdf} hung: {what} did not complete within {ms} ms; the device is marked lost \
         (reset it or re-plan onto another device)"
    )]
    DeviceHang { bdf: String, what: String, ms: u128 },

    /// The device was marked lost by an earlier failure.
    #[error("device {bdf} is lost after an earlier failure ({why}); re-open it after a reset")]
    DeviceLost { bdf: String, why: String },

    /// A caller-supplied argument is out of range.
    #[error("{0}")]
    Arg(String),

    /// The device does not look like what the driver expects.
    #[error("{0}")]
    Unsupported(String),

    /// An error from edgehal-core (buffers, graphs).
    #[error(transparent)]
    Core(#[from] edgehal_core::Error),
}

impl From<Error> for edgehal_core::Error {
    /// Errors cross into edgehal's own API as `Device` errors named by the PCI address (the
    /// address is not repeated in the message), or unchanged when they came from edgehal-core.
    fn from(e: Error) -> Self {
        let bdf = match &e {
            Error::Core(_) => None,
            Error::NoDevice { bdf, .. }
            | Error::NotBoundToVfio { bdf, .. }
            | Error::NoIommuGroup { bdf, .. }
            | Error::NoGroupNode { bdf, .. }
            | Error::NoPermission { bdf, .. }
            | Error::GroupNotViable { bdf, .. }
            | Error::Vfio { bdf, .. }
            | Error::DeviceHang { bdf, .. }
            | Error::DeviceLost { bdf, .. } => Some(bdf.clone()),
            _ => None,
        };
        match (e, bdf) {
            (Error::Core(c), _) => c,
            (e, Some(bdf)) => {
                let msg = e.to_string();
                let short = [format!("PCI device {bdf} "), format!("device {bdf} ")]
                    .iter()
                    .find_map(|p| msg.strip_prefix(p.as_str()))
                    .map(str::to_string);
                edgehal_core::Error::Device {
                    device: bdf,
                    msg: short.unwrap_or(msg),
                }
            }
            (e, None) => edgehal_core::Error::Device {
                device: "vfio".into(),
                msg: e.to_string(),
            },
        }
    }
}

impl Error {
    /// A caller argument error.
    pub fn arg(msg: impl Into<String>) -> Self {
        Error::Arg(msg.into())
    }

    /// An OS error from the last errno.
    pub fn last_os(op: impl Into<String>) -> Self {
        Error::Os {
            op: op.into(),
            source: std::io::Error::last_os_error(),
        }
    }

    /// An OS error from an io::Error.
    pub fn os(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Os {
            op: op.into(),
            source,
        }
    }
}
