//! An open VFIO PCI device: regions, BAR mappings, config space, bus mastering, interrupts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dma::DmaSpace;
use crate::error::{Error, Result};
use crate::iova::IovaAllocator;
use crate::raw::{self, MmapRegion};
use crate::sysfs;

/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const CONFIG_REGION: u32 = 7;
/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_READ: u32 = 1;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_WRITE: u32 = 2;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const REGION_MMAP: u32 = 4;
/// PCI_COMMAND offset in config space.
pub const PCI_COMMAND: u64 = 0x04;
/// PCI_COMMAND_MEMORY.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// PCI_COMMAND_MASTER (bus mastering: the device may start DMA).
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// One region of a VFIO device (`VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index (BAR0..5 = 0..5, ROM 6, config 7).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0 = absent).
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

/// Interrupt kinds of a PCI device under VFIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqKind {
    /// Legacy INTx (masked by VFIO on each interrupt; unmasked after handling).
    Intx = 0,
    /// MSI.
    Msi = 1,
    /// MSI-X.
    Msix = 2,
}

/// An opened VFIO PCI device with its own container (IOMMU domain).
///
/// Drop DMA mappings before the device: when the device's group leaves the container the kernel
/// tears the whole IOMMU domain down (unpinning everything), after which a late unmap fails and
/// the mapping conservatively leaks its buffer rather than free memory a device might reach.
pub struct VfioPci {
    bdf: String,
    // `dev` must drop before `space`'s container: VfioDevice returns its group on drop.
    dev: VfioDevice,
    space: Arc<DmaSpace>,
}

impl VfioPci {
    /// Open `bdf` (e.g. `0000:00:03.0`). `root` is the filesystem root for the pre-flight checks
    /// (`/` on a real system); `iova_window` is the IOVA range the device can address.
    pub fn open(root: &Path, bdf: &str, iova_window: (u64, u64)) -> Result<Self> {
        let target = sysfs::locate(root, bdf)?;
        let vfio_err = |op: &'static str| {
            let bdf = bdf.to_string();
            move |source: VfioError| Error::Vfio { op, bdf, source }
        };
        let container = Arc::new(VfioContainer::new(None).map_err(|e| match e {
            VfioError::OpenContainer(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
                Error::NoPermission {
                    bdf: bdf.into(),
                    group: target.group,
                    path: "/dev/vfio/vfio".into(),
                }
            }
            VfioError::OpenContainer(io) if io.kind() == std::io::ErrorKind::NotFound => {
                Error::Unsupported(format!(
                    "/dev/vfio/vfio does not exist: load VFIO (modprobe vfio-pci \
                     vfio_iommu_type1) before opening {bdf}"
                ))
            }
            other => vfio_err("open container /dev/vfio/vfio")(other),
        })?);
        let dev =
            VfioDevice::new(&target.sysfs, container.clone(), false).map_err(|e| match e {
                VfioError::GroupViable => Error::GroupNotViable {
                    bdf: bdf.into(),
                    group: target.group,
                    other: "another device of the group".into(),
                    driver: "a host driver".into(),
                },
                VfioError::OpenGroup(io, _) => {
                    sysfs::open_error(bdf, target.group, &target.group_node, io)
                }
                other => vfio_err("open device")(other),
            })?;
        let page = raw::page_size() as u64;
        let iova = IovaAllocator::new(iova_window.0, iova_window.1, page)?;
        Ok(VfioPci {
            bdf: bdf.into(),
            dev,
            space: Arc::new(DmaSpace::new(container, iova, bdf.into())),
        })
    }

    /// PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The IOMMU domain for DMA mappings.
    pub fn dma(&self) -> &Arc<DmaSpace> {
        &self.space
    }

    /// Region info (`VFIO_DEVICE_GET_REGION_INFO`, cached at open).
    pub fn region(&self, index: u32) -> RegionInfo {
        RegionInfo {
            index,
            flags: self.dev.get_region_flags(index),
            size: self.dev.get_region_size(index),
            offset: self.dev.get_region_offset(index),
        }
    }

    /// IRQ count for a kind (`VFIO_DEVICE_GET_IRQ_INFO`), 0 if none.
    pub fn irq_count(&self, kind: IrqKind) -> u32 {
        self.dev.get_irq_info(kind as u32).map_or(0, |i| i.count)
    }

    /// Map BAR `index` for volatile register access.
    pub fn map_bar(&self, index: u32) -> Result<MmapRegion> {
        if index > 5 {
            return Err(Error::arg(format!("BAR index {index} out of range 0..=5")));
        }
        let r = self.region(index);
        if r.size == 0 {
            return Err(Error::Unsupported(format!(
                "{}: BAR{index} is absent",
                self.bdf
            )));
        }
        if r.flags & REGION_MMAP == 0 {
            return Err(Error::Unsupported(format!(
                "{}: BAR{index} cannot be mmapped (flags {:#x}); it is an I/O port BAR or \
                 VFIO refuses to map it",
                self.bdf, r.flags
            )));
        }
        let len = usize::try_from(r.size)
            .map_err(|_| Error::arg(format!("BAR{index} size {:#x} too large", r.size)))?;
        MmapRegion::shared(
            raw::borrow_fd(&self.dev),
            len,
            r.offset,
            r.flags & REGION_WRITE != 0,
            None,
        )
    }

    /// Read `buf.len()` bytes of config space at `off`.
    pub fn config_read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.region(CONFIG_REGION);
        let end = off.checked_add(buf.len() as u64);
        if !matches!(end, Some(e) if e <= r.size) {
            return Err(Error::arg(format!(
                "config read [{off:#x}+{}] outside the {:#x}-byte config space",
                buf.len(),
                r.size
            )));
        }
        raw::pread_exact(raw::borrow_fd(&self.dev), buf, r.offset + off)
    }

    /// Write `buf` to config space at `off`.
    pub fn config_write(&self, off: u64, buf: &[u8]) -> Result<()> {
        let r = self.region(CONFIG_REGION);
        let end = off.checked_add(buf.len() as u64);
        if !matches!(end, Some(e) if e <= r.size) {
            return Err(Error::arg(format!(
                "config write [{off:#x}+{}] outside the {:#x}-byte config space",
                buf.len(),
                r.size
            )));
        }
        raw::pwrite_all(raw::borrow_fd(&self.dev), buf, r.offset + off)
    }

    /// The PCI command register.
    pub fn command(&self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(PCI_COMMAND, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Turn bus mastering (and memory decoding) on or off, and check by reading it back:
    /// vfio-pci leaves it off, and without it DMA silently does nothing.
    pub fn set_bus_master(&self, on: bool) -> Result<()> {
        let cmd = self.command()?;
        let want = if on {
            cmd | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY
        } else {
            cmd & !PCI_COMMAND_MASTER
        };
        self.config_write(PCI_COMMAND, &want.to_le_bytes())?;
        let got = self.command()?;
        if (got & PCI_COMMAND_MASTER != 0) != on {
            return Err(Error::Unsupported(format!(
                "{}: wrote PCI_COMMAND {want:#06x} but read back {got:#06x}; bus mastering \
                 could not be {}",
                self.bdf,
                if on { "enabled" } else { "disabled" }
            )));
        }
        Ok(())
    }

    /// Route the first vector of `kind` to a new eventfd (`VFIO_DEVICE_SET_IRQS`).
    pub fn enable_irq(&self, kind: IrqKind) -> Result<Irq> {
        if self.irq_count(kind) == 0 {
            return Err(Error::Unsupported(format!(
                "{}: device has no {kind:?} interrupt",
                self.bdf
            )));
        }
        let efd = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("eventfd", e))?;
        self.dev
            .enable_irq(kind as u32, vec![&efd])
            .map_err(|source| Error::Vfio {
                op: "SET_IRQS (eventfd trigger)",
                bdf: self.bdf.clone(),
                source,
            })?;
        let epoll = Epoll::new().map_err(|e| Error::os("epoll_create", e))?;
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&efd),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(|e| Error::os("epoll_ctl", e))?;
        Ok(Irq { kind, efd, epoll })
    }

    /// Re-arm a level-triggered INTx after the device's interrupt was acknowledged.
    pub fn unmask_intx(&self) -> Result<()> {
        self.dev
            .unmask_irq(IrqKind::Intx as u32)
            .map_err(|source| Error::Vfio {
                op: "SET_IRQS (unmask INTx)",
                bdf: self.bdf.clone(),
                source,
            })
    }

    /// Stop routing interrupts of `kind`.
    pub fn disable_irq(&self, kind: IrqKind) -> Result<()> {
        self.dev
            .disable_irq(kind as u32)
            .map_err(|source| Error::Vfio {
                op: "SET_IRQS (disable)",
                bdf: self.bdf.clone(),
                source,
            })
    }

    /// Reset the device (if it supports reset).
    pub fn reset(&self) {
        self.dev.reset();
    }
}

/// An interrupt routed to an eventfd.
pub struct Irq {
    kind: IrqKind,
    efd: EventFd,
    epoll: Epoll,
}

impl Irq {
    /// The interrupt kind.
    pub fn kind(&self) -> IrqKind {
        self.kind
    }

    /// The eventfd (for an io_uring reactor or any poller).
    pub fn eventfd(&self) -> &EventFd {
        &self.efd
    }

    /// Sleep until the interrupt fires or `deadline` passes. Returns how many interrupts were
    /// counted, or `None` on timeout. No busy polling: the thread sleeps in epoll_wait.
    pub fn wait_until(&self, deadline: Instant) -> Result<Option<u64>> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(self.try_take());
            }
            let left = deadline - now;
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            let mut evs = [EpollEvent::default()];
            match self.epoll.wait(ms, &mut evs) {
                Ok(0) => continue,
                Ok(_) => {
                    if let Some(n) = self.try_take() {
                        return Ok(Some(n));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::os("epoll_wait", e)),
            }
        }
    }

    /// Wait with a timeout.
    pub fn wait(&self, timeout: Duration) -> Result<Option<u64>> {
        self.wait_until(Instant::now() + timeout)
    }

    /// Consume pending interrupts without blocking.
    pub fn try_take(&self) -> Option<u64> {
        self.efd.read().ok().filter(|n| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_wait_times_out_and_sees_signal() {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&efd),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let irq = Irq {
            kind: IrqKind::Msi,
            efd,
            epoll,
        };
        let t = Instant::now();
        assert_eq!(irq.wait(Duration::from_millis(30)).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(30));
        let writer = irq.eventfd().try_clone().unwrap();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.write(1).unwrap();
        });
        assert_eq!(irq.wait(Duration::from_secs(5)).unwrap(), Some(1));
        h.join().unwrap();
    }

    #[test]
    fn open_without_vfio_gives_actionable_error() {
        // This machine has no /dev/vfio; a fake root with an unbound device must say how to bind.
        let root = std::env::temp_dir().join(format!("edgehal-vfio-open-{}", std::process::id()));
        let dev = root.join("sys/bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&dev).unwrap();
        let group = root.join("sys/kernel/iommu_groups/3");
        std::fs::create_dir_all(&group).unwrap();
        std::os::unix::fs::symlink(&group, dev.join("iommu_group")).unwrap();
        let e = VfioPci::open(&root, "0000:00:03.0", (0x10_0000, 0x1000_0000))
            .err()
            .unwrap();
        let _ = std::fs::remove_dir_all(&root);
        assert!(
            e.to_string().contains("bind 0000:00:03.0 to vfio-pci"),
            "{e}"
        );
    }
}
