//! DMA mapping of edgehal [`Buffer`]s into a device's IOVA space.
//!
//! A [`DmaSpace`] is one IOMMU domain (a VFIO container) with its IOVA allocator. Mapping a
//! buffer pins it ([`Buffer::dma_pin`]) and returns a [`DmaMapping`] that owns the pin and unmaps
//! on drop, so the memory can never be freed while the device may still reach it. Executables
//! keep their mappings for their whole lifetime; nothing is mapped per inference.

use std::sync::{Arc, Mutex};

use edgehal_core::buffer::{Buffer, DmaPin};
use vfio_ioctls::VfioContainer;

use crate::error::{Error, Result};
use crate::iova::IovaAllocator;
use crate::raw;

/// One IOMMU domain: a VFIO container plus the IOVA window devices in it may use.
pub struct DmaSpace {
    container: Arc<VfioContainer>,
    iova: Mutex<IovaAllocator>,
    bdf: String,
}

impl DmaSpace {
    pub(crate) fn new(container: Arc<VfioContainer>, iova: IovaAllocator, bdf: String) -> Self {
        DmaSpace {
            container,
            iova: Mutex::new(iova),
            bdf,
        }
    }

    /// Map an edgehal [`Buffer`] (its view, widened to whole pages) for device read and write
    /// at a fresh IOVA. The mapping pins the buffer's memory (see [`Buffer::dma_pin`]: from
    /// then on tensors read from it are copies, since the device may write it) and unmaps on
    /// drop; the memory cannot be freed while the device can reach it.
    pub fn map(self: &Arc<Self>, buf: &Buffer) -> Result<DmaMapping> {
        let pin = buf.dma_pin().map_err(|e| {
            Error::arg(format!(
                "DMA map on {}: {buf:?} cannot be pinned: {e}",
                self.bdf
            ))
        })?;
        let len = pin.len();
        let page = raw::page_size();
        let iova = self.lock()?.alloc(len as u64, page as u64)?;
        if let Err(source) = raw::vfio_dma_map(&self.container, iova, &pin) {
            let _ = self.lock()?.free(iova);
            let efault = matches!(&source, vfio_ioctls::VfioError::IommuDmaMap(e) if e.errno() == libc::EFAULT);
            return Err(if efault {
                Error::Unsupported(format!(
                    "VFIO IOMMU_MAP_DMA on {}: the kernel cannot pin this memory (EFAULT): VFIO \
                     type1 refuses PFN-mapped RAM such as a dma-buf's own mmap; DMA-map the \
                     memory the dma-buf was made from (the udmabuf memfd) or plain host memory",
                    self.bdf
                ))
            } else {
                Error::Vfio {
                    op: "IOMMU_MAP_DMA",
                    bdf: self.bdf.clone(),
                    source,
                }
            });
        }
        Ok(DmaMapping {
            space: Arc::clone(self),
            iova,
            pin: Some(pin),
            buf: buf.clone(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, IovaAllocator>> {
        self.iova
            .lock()
            .map_err(|_| Error::arg("IOVA allocator lock poisoned by a panic"))
    }

    /// Free IOVA bytes left.
    pub fn free_iova(&self) -> Result<u64> {
        Ok(self.lock()?.free_bytes())
    }
}

/// A buffer mapped into a device's IOVA space; unmapped when dropped.
pub struct DmaMapping {
    space: Arc<DmaSpace>,
    iova: u64,
    /// Always `Some` until drop (taken there to be leaked if the unmap fails).
    pin: Option<DmaPin>,
    buf: Buffer,
}

impl DmaMapping {
    /// The device address of the buffer's first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Bytes of the buffer view that was mapped (the IOVA range covers whole pages).
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether the mapped view is empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Length of the IOVA range (whole pages).
    pub fn mapped_len(&self) -> usize {
        self.pin.as_ref().map_or(0, DmaPin::len)
    }
    /// The mapped buffer (CPU access through its copies and leases).
    pub fn buffer(&self) -> &Buffer {
        &self.buf
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        let len = self.mapped_len();
        match self.space.container.vfio_dma_unmap(self.iova, len) {
            Ok(()) => {
                if let Ok(mut a) = self.space.iova.lock() {
                    let _ = a.free(self.iova);
                }
            }
            Err(e) => {
                // The device may still reach this memory: never free it or reuse the IOVA.
                eprintln!(
                    "edgehal-vfio: unmapping IOVA {:#x} (+{len:#x}) of {} failed ({e}); \
                     keeping the buffer alive",
                    self.iova, self.space.bdf
                );
                std::mem::forget(self.pin.take());
            }
        }
    }
}
