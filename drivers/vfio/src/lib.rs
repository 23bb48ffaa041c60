//! edgehal's user-space PCIe device path: VFIO (container/group/device), BAR mapping, IOVA and DMA
//! mapping of edgehal-core `Buffer`s, interrupts as eventfds, and a driver for QEMU's `edu`
//! device behind edgehal's `Driver`/`Device` traits ([`driver`]) as the worked example of a
//! PCIe accelerator driver. dma-buf (heaps, udmabuf, sync) is edgehal-core's, not duplicated here.
//!
//! Design choices a reader must know:
//! - All `unsafe` is in [`raw`]; memory a device can touch is only accessed with volatile reads
//!   and writes (a `&[u8]` into DMA memory would be undefined behaviour).
//! - DMA mappings are RAII ([`dma::DmaMapping`]): they pin the `Buffer`'s memory
//!   (`Buffer::dma_pin`) and unmap the IOVA range on drop, so an executable keeps its mappings
//!   pinned for its lifetime.
//! - Interrupts arrive on an eventfd (VFIO_DEVICE_SET_IRQS) that is waited on with a deadline
//!   (epoll here; the eventfd can equally be handed to an io_uring reactor); a missed deadline
//!   marks the device lost.

#![deny(unsafe_code)]

pub mod device;
pub mod dma;
pub mod driver;
pub mod edu;
pub mod error;
pub mod iova;
#[allow(unsafe_code)]
pub mod raw;
pub mod sysfs;

pub use device::{Irq, IrqKind, RegionInfo, VfioPci};
pub use dma::{DmaMapping, DmaSpace};
pub use driver::{EduDevice, EduDriver, EduExecutable};
pub use error::{Error, Result};
pub use iova::IovaAllocator;
pub use raw::MmapRegion;
