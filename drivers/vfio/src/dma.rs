//! DMA mapping of host buffers into a device's IOVA space.
//!
//! A [`DmaSpace`] is one IOMMU domain (a VFIO container) with its IOVA allocator. Mapping a
//! buffer returns a [`DmaMapping`] that owns a reference to the buffer and unmaps on drop, so the
//! memory can never be freed while the device may still reach it. Plans keep their mappings for
//! their whole lifetime; nothing is mapped per inference.

use std::sync::{Arc, Mutex};

use vfio_ioctls::VfioContainer;

use crate::error::{Error, Result};
use crate::iova::IovaAllocator;
use crate::raw::{self, DmaBuffer, MmapRegion};

/// Page-aligned anonymous host memory for DMA (the local stand-in for edgehal's `Buffer`).
pub struct HostBuffer;

impl HostBuffer {
    /// Zeroed anonymous memory of at least `len` bytes, rounded up to whole pages.
    pub fn anonymous(len: usize) -> Result<Arc<MmapRegion>> {
        let len = round_pages(len)?;
        Ok(Arc::new(MmapRegion::anonymous(len)?))
    }

    /// Memory backed by a shmem memfd (so it can also be exported, e.g. as a udmabuf).
    pub fn memfd(len: usize, seal_shrink: bool) -> Result<Arc<MmapRegion>> {
        let len = round_pages(len)?;
        let fd = raw::memfd("edgehal-dma", len, seal_shrink)?;
        // the mapping keeps a duplicate of the fd so that `fd()` can export it later
        let keep = fd.try_clone().map_err(|e| Error::os("dup memfd", e))?;
        Ok(Arc::new(MmapRegion::shared(
            raw::borrow_fd(&fd),
            len,
            0,
            true,
            Some(keep),
        )?))
    }
}

/// Round `len` up to a whole number of pages (at least one).
pub fn round_pages(len: usize) -> Result<usize> {
    let page = raw::page_size();
    let len = len.max(1);
    len.checked_add(page - 1)
        .map(|x| x / page * page)
        .ok_or_else(|| Error::arg(format!("buffer length {len} too large")))
}

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

    /// Map `buf` for device read and write at a fresh IOVA. The mapping keeps `buf` alive and
    /// unmaps on drop.
    pub fn map(self: &Arc<Self>, buf: Arc<dyn DmaBuffer>) -> Result<DmaMapping> {
        let len = buf.len();
        let page = raw::page_size();
        if len == 0 || !len.is_multiple_of(page) || !(buf.as_ptr() as usize).is_multiple_of(page) {
            return Err(Error::arg(format!(
                "DMA map: buffer at {:p} of {len} bytes is not page-aligned",
                buf.as_ptr()
            )));
        }
        let iova = self.lock()?.alloc(len as u64, page as u64)?;
        if let Err(source) = raw::vfio_dma_map(&self.container, iova, buf.as_ref()) {
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
            buf,
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
    buf: Arc<dyn DmaBuffer>,
}

impl DmaMapping {
    /// The device address of the buffer's first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether the mapping is empty (never).
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// The mapped buffer.
    pub fn buffer(&self) -> &Arc<dyn DmaBuffer> {
        &self.buf
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        let len = self.buf.len();
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
                std::mem::forget(Arc::clone(&self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_buffers_are_page_aligned() {
        let page = raw::page_size();
        let b = HostBuffer::anonymous(10).unwrap();
        assert_eq!(b.len(), page);
        assert_eq!(b.as_ptr() as usize % page, 0);
        assert!(DmaBuffer::fd(b.as_ref()).is_none());
        let m = HostBuffer::memfd(page + 1, true).unwrap();
        assert_eq!(m.len(), 2 * page);
        assert!(DmaBuffer::fd(m.as_ref()).is_some());
        m.write_u32(page, 0xabcd).unwrap();
        assert_eq!(m.read_u32(page).unwrap(), 0xabcd);
        assert_eq!(round_pages(0).unwrap(), page);
        assert!(round_pages(usize::MAX).is_err());
    }
}
