//! dma-buf: allocation from a dma-heap, export of host memory through udmabuf (a sealed shmem
//! memfd), import of dma-buf fds, and CPU access bracketed by `DMA_BUF_IOCTL_SYNC`.
//!
//! Kept in one file so it can be merged with edgehal-core's `Buffer` later. A [`DmaBufMap`] is a
//! CPU mapping of a dma-buf; it is also a [`DmaBuffer`] (via its [`MmapRegion`]), so the same
//! memory can be DMA-mapped through VFIO and CPU-mapped at once without a copy.

use std::io::Seek;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use crate::dma::round_pages;
use crate::error::{Error, Result};
use crate::raw::{self, MmapRegion};

/// `DMA_BUF_SYNC_READ`.
pub const SYNC_READ: u64 = 1;
/// `DMA_BUF_SYNC_WRITE`.
pub const SYNC_WRITE: u64 = 2;
/// `DMA_BUF_SYNC_RW`.
pub const SYNC_RW: u64 = 3;
/// `DMA_BUF_SYNC_START`.
pub const SYNC_START: u64 = 0;
/// `DMA_BUF_SYNC_END`.
pub const SYNC_END: u64 = 4;

/// A CPU mapping of a dma-buf (shared, read-write). Owns the dma-buf fd.
pub struct DmaBufMap {
    map: Arc<MmapRegion>,
}

impl DmaBufMap {
    /// Map a dma-buf fd from a caller (import). Its size is taken from the fd (`lseek(END)`).
    pub fn import(fd: OwnedFd) -> Result<Self> {
        let mut f = std::fs::File::from(fd);
        let size = f
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::os("lseek dma-buf (is this fd a dma-buf?)", e))?;
        let len = usize::try_from(size).map_err(|_| Error::arg("dma-buf too large"))?;
        if len == 0 {
            return Err(Error::arg("dma-buf has size 0"));
        }
        let fd = OwnedFd::from(f);
        // the region owns a duplicate of the fd, so `fd()` stays valid as long as the mapping
        let keep = fd.try_clone().map_err(|e| Error::os("dup dma-buf fd", e))?;
        let map = MmapRegion::shared(fd.as_fd(), len, 0, true, Some(keep))?;
        Ok(DmaBufMap { map: Arc::new(map) })
    }

    /// The mapping (also usable as a [`crate::DmaBuffer`] for VFIO DMA mapping).
    pub fn region(&self) -> &Arc<MmapRegion> {
        &self.map
    }

    /// The dma-buf fd (for export to another device or process).
    pub fn fd(&self) -> Result<BorrowedFd<'_>> {
        self.map
            .fd()
            .ok_or_else(|| Error::arg("dma-buf mapping lost its fd"))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the buffer is empty (never).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Begin CPU access (`DMA_BUF_SYNC_START | flags`); the returned guard ends it on drop.
    pub fn begin_cpu_access(&self, flags: u64) -> Result<CpuAccess<'_>> {
        let flags = flags & SYNC_RW;
        if flags == 0 {
            return Err(Error::arg(
                "CPU access flags must include SYNC_READ or SYNC_WRITE",
            ));
        }
        raw::dma_buf_sync(self.fd()?, SYNC_START | flags)?;
        Ok(CpuAccess { buf: self, flags })
    }
}

/// CPU access window on a dma-buf; `DMA_BUF_SYNC_END` with the same flags on drop (or `end`).
pub struct CpuAccess<'a> {
    buf: &'a DmaBufMap,
    flags: u64,
}

impl CpuAccess<'_> {
    /// Copy out `dst.len()` bytes from `off`.
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        if self.flags & SYNC_READ == 0 {
            return Err(Error::arg("CPU access was begun without SYNC_READ"));
        }
        self.buf.map.read_bytes(off, dst)
    }

    /// Copy `src` in at `off`.
    pub fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        if self.flags & SYNC_WRITE == 0 {
            return Err(Error::arg("CPU access was begun without SYNC_WRITE"));
        }
        self.buf.map.write_bytes(off, src)
    }

    /// End access now and report a failing SYNC_END.
    pub fn end(self) -> Result<()> {
        let r = raw::dma_buf_sync(self.buf.fd()?, SYNC_END | self.flags);
        std::mem::forget(self);
        r
    }
}

impl Drop for CpuAccess<'_> {
    fn drop(&mut self) {
        if let Ok(fd) = self.buf.fd() {
            let _ = raw::dma_buf_sync(fd, SYNC_END | self.flags);
        }
    }
}

/// Allocate `len` bytes (rounded to pages) from a dma-heap, e.g. `/dev/dma_heap/system`.
pub fn heap_alloc(heap: &Path, len: usize) -> Result<DmaBufMap> {
    let len = round_pages(len)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(heap)
        .map_err(|e| {
            Error::os(
                format!(
                    "open {} (needs CONFIG_DMABUF_HEAPS_SYSTEM, kernel 5.6+)",
                    heap.display()
                ),
                e,
            )
        })?;
    let fd = raw::dma_heap_alloc(f.as_fd(), len as u64)?;
    DmaBufMap::import(fd)
}

/// Host memory exported as a dma-buf through udmabuf: a sealed shmem memfd plus the dma-buf
/// made from it. Both mappings see the same pages.
pub struct Udmabuf {
    host: Arc<MmapRegion>,
    dmabuf: DmaBufMap,
}

impl Udmabuf {
    /// Create `len` bytes (rounded to pages) via `/dev/udmabuf`.
    pub fn new(len: usize) -> Result<Self> {
        Self::with_device(Path::new("/dev/udmabuf"), len)
    }

    /// Same, with an explicit udmabuf device node.
    pub fn with_device(dev: &Path, len: usize) -> Result<Self> {
        let host = crate::dma::HostBuffer::memfd(len, true)?;
        let len = host.len();
        let udev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(|e| {
                Error::os(
                    format!(
                        "open {} (needs CONFIG_UDMABUF, kernel 4.20+)",
                        dev.display()
                    ),
                    e,
                )
            })?;
        let memfd = host
            .fd()
            .ok_or_else(|| Error::arg("memfd mapping without fd"))?;
        let dmabuf_fd = raw::udmabuf_create(udev.as_fd(), memfd, 0, len as u64)?;
        let dmabuf = DmaBufMap::import(dmabuf_fd)?;
        Ok(Udmabuf { host, dmabuf })
    }

    /// The memfd mapping (a [`crate::DmaBuffer`] for VFIO).
    pub fn host(&self) -> &Arc<MmapRegion> {
        &self.host
    }

    /// The dma-buf and its CPU mapping.
    pub fn dmabuf(&self) -> &DmaBufMap {
        &self.dmabuf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_rejects_non_dmabuf_of_size_zero() {
        let fd = raw::memfd("empty", 0, false).unwrap();
        let e = DmaBufMap::import(fd).err().unwrap();
        assert!(e.to_string().contains("size 0"), "{e}");
    }

    #[test]
    fn missing_heap_and_udmabuf_are_clear_errors() {
        let e = heap_alloc(Path::new("/nonexistent/dma_heap/system"), 4096)
            .err()
            .unwrap();
        assert!(e.to_string().contains("CONFIG_DMABUF_HEAPS_SYSTEM"), "{e}");
        let e = Udmabuf::with_device(Path::new("/nonexistent/udmabuf"), 4096)
            .err()
            .unwrap();
        assert!(e.to_string().contains("CONFIG_UDMABUF"), "{e}");
    }

    #[test]
    fn cpu_access_flags_enforced() {
        // A memfd stands in for a dma-buf for the flag logic; SYNC on it fails (ENOTTY), which
        // must surface as an error, not be ignored.
        let fd = raw::memfd("fake", 4096, false).unwrap();
        let b = DmaBufMap::import(fd).unwrap();
        assert!(b.begin_cpu_access(0).is_err());
        let e = b.begin_cpu_access(SYNC_READ).err().unwrap();
        assert!(e.to_string().contains("DMA_BUF_IOCTL_SYNC"), "{e}");
    }
}
