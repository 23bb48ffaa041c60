//! Driver for QEMU's `edu` PCI device (vendor 0x1234, device 0x11e8; QEMU `docs/specs/edu.rst`):
//! the worked example of a PCIe accelerator driver on edgehal's VFIO layer.
//!
//! The device has a 4 KiB internal buffer at device address 0x40000 and a DMA engine that copies
//! between it and host memory (through the IOMMU), raising an interrupt when done. This module
//! is the register-level engine ([`Edu`]); [`crate::driver`] puts it behind edgehal's own
//! `Driver`/`Device`/`Executable` traits and `Buffer`s. A transfer that misses its deadline
//! marks the device lost; every later call fails fast with [`Error::DeviceLost`] so a
//! scheduler can re-plan.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::device::{Irq, IrqKind, VfioPci};
use crate::dma::DmaMapping;
use crate::error::{Error, Result};
use crate::raw::{self, MmapRegion, Uring};

/// PCI vendor id of edu.
pub const VENDOR: u16 = 0x1234;
/// PCI device id of edu.
pub const DEVICE: u16 = 0x11e8;
/// Value of the identification register (version 1.0).
pub const ID: u32 = 0x0100_00ed;

/// Register offsets in BAR0.
pub mod reg {
    /// Identification (RO).
    pub const ID: usize = 0x00;
    /// Liveness check: reads back the bitwise inverse of what was written.
    pub const LIVENESS: usize = 0x04;
    /// Interrupt status (RO).
    pub const IRQ_STATUS: usize = 0x24;
    /// Interrupt acknowledge (WO): clears the written bits.
    pub const IRQ_ACK: usize = 0x64;
    /// DMA source address.
    pub const DMA_SRC: usize = 0x80;
    /// DMA destination address.
    pub const DMA_DST: usize = 0x88;
    /// DMA byte count.
    pub const DMA_COUNT: usize = 0x90;
    /// DMA command.
    pub const DMA_CMD: usize = 0x98;
}

/// DMA command bit: start (cleared by the device when done).
pub const CMD_START: u64 = 1;
/// DMA command bit: direction device -> RAM.
pub const CMD_TO_RAM: u64 = 2;
/// DMA command bit: raise interrupt 0x100 when done.
pub const CMD_IRQ: u64 = 4;
/// The interrupt status bit of a finished DMA.
pub const IRQ_DMA: u32 = 0x100;
/// Device address of the internal buffer.
pub const DEV_BUF: u64 = 0x40000;
/// Size of the internal buffer.
pub const DEV_BUF_LEN: usize = 4096;
/// Largest transfer: QEMU 7.2 aborts the whole VM on a full 4096-byte transfer (off-by-one in its
/// range check, fixed in 8.0), so one byte less.
pub const MAX_DMA: usize = 4095;
/// The device masks DMA addresses to 28 bits: IOVAs must stay below 256 MiB.
pub const IOVA_LIMIT: u64 = 1 << 28;
/// IOVA window used for edu mappings (1 MiB .. 256 MiB).
pub const IOVA_WINDOW: (u64, u64) = (0x10_0000, IOVA_LIMIT);

/// Direction of one DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Host memory -> device buffer.
    ToDevice,
    /// Device buffer -> host memory.
    ToRam,
}

/// Options for [`Edu::open`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Enable bus mastering (leave on; off only for the negative test).
    pub bus_master: bool,
    /// Deadline for one DMA (QEMU completes one after about 100 ms of virtual time).
    pub dma_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bus_master: true,
            dma_timeout: Duration::from_secs(5),
        }
    }
}

/// An opened edu device.
pub struct Edu {
    irq: Irq,
    bar: MmapRegion,
    lost: Mutex<Option<String>>,
    timeout: Mutex<Duration>,
    irqs: AtomicU64,
    uring_irqs: AtomicU64,
    ring: Mutex<Option<Uring>>,
    pci: VfioPci,
}

impl Edu {
    /// Open the edu device at `bdf` (bound to vfio-pci), map BAR0, check the id register,
    /// enable bus mastering and route its interrupt (MSI if offered, else INTx) to an eventfd.
    pub fn open(root: &Path, bdf: &str, opts: Options) -> Result<Self> {
        let pci = VfioPci::open(root, bdf, IOVA_WINDOW)?;
        let bar = pci.map_bar(0)?;
        let id = bar.read_u32(reg::ID)?;
        if id != ID {
            return Err(Error::Unsupported(format!(
                "{bdf}: identification register reads {id:#010x}, expected {ID:#010x}: not an \
                 edu device"
            )));
        }
        pci.set_bus_master(opts.bus_master)?;
        let kind = if pci.irq_count(IrqKind::Msi) > 0 {
            IrqKind::Msi
        } else {
            IrqKind::Intx
        };
        let irq = pci.enable_irq(kind)?;
        Ok(Edu {
            irq,
            bar,
            lost: Mutex::new(None),
            timeout: Mutex::new(opts.dma_timeout),
            irqs: AtomicU64::new(0),
            uring_irqs: AtomicU64::new(0),
            ring: Mutex::new(None),
            pci,
        })
    }

    /// The VFIO device underneath.
    pub fn pci(&self) -> &VfioPci {
        &self.pci
    }

    /// BAR0, for direct register access.
    pub fn bar(&self) -> &MmapRegion {
        &self.bar
    }

    /// How the device interrupts.
    pub fn irq_kind(&self) -> IrqKind {
        self.irq.kind()
    }

    /// The identification register.
    pub fn id(&self) -> Result<u32> {
        self.bar.read_u32(reg::ID)
    }

    /// Write `v` to the liveness register and return what it reads back (should be `!v`).
    pub fn liveness(&self, v: u32) -> Result<u32> {
        self.bar.write_u32(reg::LIVENESS, v)?;
        self.bar.read_u32(reg::LIVENESS)
    }

    /// How many DMA-completion interrupts the driver has received.
    pub fn interrupts(&self) -> u64 {
        self.irqs.load(Ordering::Relaxed)
    }

    /// How many of those were waited for through io_uring.
    pub fn io_uring_interrupts(&self) -> u64 {
        self.uring_irqs.load(Ordering::Relaxed)
    }

    /// Wait for completions through an io_uring (poll on the interrupt eventfd with a linked
    /// timeout), as edgehal's scheduler reactor does, instead of epoll.
    pub fn use_io_uring(&self, on: bool) -> Result<()> {
        let ring = if on { Some(Uring::new()?) } else { None };
        let mut g = self
            .ring
            .lock()
            .map_err(|_| Error::arg("edu ring lock poisoned"))?;
        *g = ring;
        Ok(())
    }

    fn wait_irq(&self, deadline: Instant) -> Result<Option<u64>> {
        let mut g = self
            .ring
            .lock()
            .map_err(|_| Error::arg("edu ring lock poisoned"))?;
        let Some(ring) = g.as_mut() else {
            return self.irq.wait_until(deadline);
        };
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(self.irq.try_take());
            }
            if ring.poll_in(raw::borrow_fd(self.irq.eventfd()), deadline - now)? {
                if let Some(n) = self.irq.try_take() {
                    self.uring_irqs.fetch_add(n, Ordering::Relaxed);
                    return Ok(Some(n));
                }
            }
        }
    }

    /// Change the per-DMA deadline.
    pub fn set_timeout(&self, t: Duration) {
        if let Ok(mut g) = self.timeout.lock() {
            *g = t;
        }
    }

    /// Why the device is lost, if it is.
    pub fn lost_reason(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|g| g.clone())
    }

    fn check_alive(&self) -> Result<()> {
        match self.lost_reason() {
            Some(why) => Err(Error::DeviceLost {
                bdf: self.pci.bdf().into(),
                why,
            }),
            None => Ok(()),
        }
    }

    fn mark_lost(&self, why: String) {
        if let Ok(mut g) = self.lost.lock() {
            g.get_or_insert(why);
        }
    }

    /// One DMA of `len` bytes between `map[off..]` and the device buffer at `dev_off`.
    /// Validated against the device's limits before anything is written to the device.
    pub fn dma(
        &self,
        dir: Dir,
        map: &DmaMapping,
        off: usize,
        dev_off: usize,
        len: usize,
    ) -> Result<()> {
        self.check_alive()?;
        if len == 0 || len > MAX_DMA {
            return Err(Error::arg(format!(
                "edu DMA of {len} bytes: must be 1..={MAX_DMA}"
            )));
        }
        if dev_off.checked_add(len).exceeds(MAX_DMA) {
            return Err(Error::arg(format!(
                "edu DMA [{dev_off:#x}+{len}] exceeds the device buffer ({MAX_DMA} usable bytes)"
            )));
        }
        if off.checked_add(len).exceeds(map.len()) {
            return Err(Error::arg(format!(
                "edu DMA [{off:#x}+{len}] exceeds the {}-byte host mapping",
                map.len()
            )));
        }
        self.dma_iova(dir, map.iova() + off as u64, dev_off, len)
    }

    /// One DMA at a raw IOVA (which need not be mapped: behind an IOMMU an unmapped IOVA faults
    /// and host memory stays untouched, which is what the VM test checks).
    pub fn dma_iova(&self, dir: Dir, host: u64, dev_off: usize, len: usize) -> Result<()> {
        self.check_alive()?;
        check_dma(host, dev_off, len)?;
        let dev = DEV_BUF + dev_off as u64;
        let (src, dst, cmd) = match dir {
            Dir::ToDevice => (host, dev, CMD_START | CMD_IRQ),
            Dir::ToRam => (dev, host, CMD_START | CMD_IRQ | CMD_TO_RAM),
        };
        // drop a stale interrupt count before starting
        let _ = self.irq.try_take();
        self.bar.write_u64(reg::DMA_SRC, src)?;
        self.bar.write_u64(reg::DMA_DST, dst)?;
        self.bar.write_u64(reg::DMA_COUNT, len as u64)?;
        self.bar.write_u64(reg::DMA_CMD, cmd)?;
        let timeout = self
            .timeout
            .lock()
            .map(|g| *g)
            .unwrap_or(Duration::from_secs(5));
        let fired = self.wait_irq(Instant::now() + timeout)?;
        let busy = self.bar.read_u64(reg::DMA_CMD)? & CMD_START != 0;
        if fired.is_none() || busy {
            let what = format!("DMA {dir:?} of {len} bytes at IOVA {host:#x}");
            self.mark_lost(format!("{what} timed out"));
            return Err(Error::DeviceHang {
                bdf: self.pci.bdf().into(),
                what,
                ms: timeout.as_millis(),
            });
        }
        if let Some(n) = fired {
            self.irqs.fetch_add(n, Ordering::Relaxed);
        }
        let status = self.bar.read_u32(reg::IRQ_STATUS)?;
        self.bar.write_u32(reg::IRQ_ACK, status)?;
        if self.irq.kind() == IrqKind::Intx {
            self.pci.unmask_intx()?;
        }
        if status & IRQ_DMA == 0 {
            return Err(Error::Unsupported(format!(
                "{}: interrupt without the DMA status bit (status {status:#x})",
                self.pci.bdf()
            )));
        }
        Ok(())
    }
}

/// Validate one transfer against edu's limits before anything reaches the device (QEMU 7.2 aborts
/// the whole VM on an out-of-range DMA).
pub fn check_dma(host: u64, dev_off: usize, len: usize) -> Result<()> {
    if len == 0 || len > MAX_DMA || dev_off.checked_add(len).exceeds(MAX_DMA) {
        return Err(Error::arg(format!(
            "edu DMA [{dev_off:#x}+{len}] exceeds the device buffer ({MAX_DMA} usable bytes)"
        )));
    }
    if host.checked_add(len as u64).exceeds(IOVA_LIMIT) {
        return Err(Error::arg(format!(
            "IOVA {host:#x}+{len} is above edu's 28-bit DMA limit"
        )));
    }
    Ok(())
}

/// `None` (overflow) or a value above the limit.
trait Exceeds<T> {
    fn exceeds(self, limit: T) -> bool;
}
impl<T: PartialOrd> Exceeds<T> for Option<T> {
    fn exceeds(self, limit: T) -> bool {
        !matches!(self, Some(v) if v <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_limits() {
        check_dma(0x10_0000, 0, MAX_DMA).unwrap();
        check_dma(0x10_0000, 4000, 95).unwrap();
        assert!(
            check_dma(0x10_0000, 0, 4096).is_err(),
            "4096 bytes aborts QEMU 7.2"
        );
        assert!(check_dma(0x10_0000, 4000, 96).is_err());
        assert!(check_dma(0x10_0000, 0, 0).is_err());
        assert!(check_dma(0x10_0000, usize::MAX, 1).is_err());
        check_dma(IOVA_LIMIT - 16, 0, 16).unwrap();
        let e = check_dma(IOVA_LIMIT - 16, 0, 17).unwrap_err();
        assert!(e.to_string().contains("28-bit"), "{e}");
        assert!(check_dma(u64::MAX, 0, 1).is_err());
    }
}
