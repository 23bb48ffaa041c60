//! edgehal's user-space PCIe device path: VFIO (container/group/device), BAR mapping, IOVA and DMA
//! mapping, interrupts as eventfds, dma-buf helpers, and a small driver for QEMU's `edu` device
//! as the worked example of a PCIe accelerator driver.
//!
//! Design choices a reader must know:
//! - All `unsafe` is in [`raw`]; memory a device can touch is only accessed with volatile reads
//!   and writes (a `&[u8]` into DMA memory would be undefined behaviour).
//! - DMA mappings are RAII ([`dma::DmaMapping`]): they hold the buffer alive and unmap the IOVA
//!   range on drop, so a plan keeps its mappings pinned for its lifetime.
//! - Interrupts arrive on an eventfd (VFIO_DEVICE_SET_IRQS) that is waited on with a deadline
//!   (epoll here; the eventfd can equally be handed to an io_uring reactor); a missed deadline
//!   marks the device lost.

#![deny(unsafe_code)]

pub mod device;
pub mod dma;
pub mod dmabuf;
pub mod edu;
pub mod error;
pub mod iova;
#[allow(unsafe_code)]
pub mod raw;
pub mod sysfs;

pub use device::{Irq, IrqKind, RegionInfo, VfioPci};
pub use dma::{DmaMapping, DmaSpace, HostBuffer};
pub use error::{Error, Result};
pub use iova::IovaAllocator;
pub use raw::{DmaBuffer, MmapRegion};
