//! Buffers: memory with a domain, shareable by fd, viewable by range, never exposed as `&[u8]`
//! while a device may write it.
//!
//! - Allocation is a sealed memfd (page-aligned, shareable by fd, huge pages on request), a
//!   dma-buf from `/dev/dma_heap/<heap>`, or the same memfd pages re-exported as a dma-buf
//!   through `/dev/udmabuf`.
//! - Import takes caller memory without copying when it is page-aligned and the caller makes
//!   the lifetime promise of [`HostPtr`] (an `unsafe` constructor); otherwise one copy, which
//!   the [`CopyCounter`] records. Memfds and dma-buf fds import without copying.
//! - Access is by explicit copies ([`Buffer::read_into`], [`Buffer::write_from`]) or a scoped
//!   [`CpuAccess`] guard; dma-bufs are bracketed with `DMA_BUF_IOCTL_SYNC` START/END. A
//!   zero-copy [`Tensor`] over a buffer ([`Buffer::to_tensor`]) is given only for memory no
//!   one outside can write, and blocks writes through edgehal while it lives.
//!
//! The copy counter counts the copies edgehal makes on its own (unaligned import, a tensor
//! read out of shared memory, device results written back into caller buffers), not the
//! explicit `read_into`/`write_from` a caller asks for.

use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::sys::mem::{self, Memory, ReadLease, WriteLease};
pub use crate::sys::mem::{page_size, DmaPin, HostPtr, MemoryKind};
use crate::tensor::checked_numel;
use crate::{DType, Error, Result, Tensor};

/// Where memory lives, from a device's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryDomain {
    /// Host memory edgehal allocated (memfd).
    Host,
    /// Host memory owned by the caller (pointer or memfd import).
    HostImported,
    /// A dma-buf (dma-heap, udmabuf, or imported fd).
    DmaBuf,
    /// Memory only the device addresses (VRAM, NPU SRAM).
    DeviceLocal,
}

impl MemoryDomain {
    /// Lower-case name (`host`, `host-imported`, `dma-buf`, `device-local`).
    pub fn name(self) -> &'static str {
        match self {
            MemoryDomain::Host => "host",
            MemoryDomain::HostImported => "host-imported",
            MemoryDomain::DmaBuf => "dma-buf",
            MemoryDomain::DeviceLocal => "device-local",
        }
    }
}

impl std::fmt::Display for MemoryDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Default, Debug)]
struct CopyStats {
    bytes: AtomicU64,
    copies: AtomicU64,
}

/// Counts the copies edgehal makes (one per session or context; clones share the count).
#[derive(Clone, Default, Debug)]
pub struct CopyCounter(Arc<CopyStats>);

impl CopyCounter {
    /// A fresh counter at zero.
    pub fn new() -> Self {
        Self::default()
    }
    /// Record one copy of `bytes` bytes.
    pub fn record(&self, bytes: usize) {
        self.0.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.0.copies.fetch_add(1, Ordering::Relaxed);
    }
    /// Bytes copied so far.
    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }
    /// Copies made so far.
    pub fn copies(&self) -> u64 {
        self.0.copies.load(Ordering::Relaxed)
    }
}

/// Huge page policy for [`Buffer::alloc_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// Normal pages.
    #[default]
    Off,
    /// Huge pages when the kernel has some reserved, normal pages otherwise.
    Try,
    /// Huge pages or an error.
    Require,
}

/// CPU access mode for [`Buffer::cpu_access`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A range of memory with a domain. Clones and views share the memory.
#[derive(Clone)]
pub struct Buffer {
    mem: Arc<Memory>,
    off: usize,
    len: usize,
    domain: MemoryDomain,
    huge: bool,
    counter: CopyCounter,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Buffer({} {} bytes at +{}{})",
            self.domain,
            self.len,
            self.off,
            if self.huge { ", huge pages" } else { "" }
        )
    }
}

fn unavailable(what: &str, path: &Path, e: &std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Device {
            device: what.to_string(),
            msg: format!("unavailable: {} not present", path.display()),
        }
    } else {
        Error::Device {
            device: what.to_string(),
            msg: format!("unavailable: {}: {e}", path.display()),
        }
    }
}

impl Buffer {
    fn whole(mem: Memory, len: usize, domain: MemoryDomain, counter: &CopyCounter) -> Buffer {
        Buffer {
            mem: Arc::new(mem),
            off: 0,
            len,
            domain,
            huge: false,
            counter: counter.clone(),
        }
    }

    /// `len` bytes of zeroed, page-aligned host memory (a sealed memfd).
    pub fn alloc(len: usize, counter: &CopyCounter) -> Result<Buffer> {
        Self::alloc_with(len, HugePages::Off, counter)
    }

    /// Like [`Buffer::alloc`] with a huge page policy.
    pub fn alloc_with(len: usize, huge: HugePages, counter: &CopyCounter) -> Result<Buffer> {
        if len as u64 > crate::MAX_TENSOR_BYTES {
            return Err(Error::TooLarge(format!(
                "buffer of {len} bytes is over the {} byte budget",
                crate::MAX_TENSOR_BYTES
            )));
        }
        if huge != HugePages::Off {
            match Memory::memfd("edgehal-huge", len, true) {
                Ok(m) => {
                    let mut b = Self::whole(m, len, MemoryDomain::Host, counter);
                    b.huge = true;
                    return Ok(b);
                }
                Err(e) if huge == HugePages::Require => {
                    return Err(Error::io(
                        format!(
                            "memfd_create(MFD_HUGETLB) of {len} bytes (are huge pages reserved in \
                             /proc/sys/vm/nr_hugepages?)"
                        ),
                        e,
                    ))
                }
                Err(_) => {}
            }
        }
        let m = Memory::memfd("edgehal", len, false)
            .map_err(|e| Error::io(format!("memfd of {len} bytes"), e))?;
        Ok(Self::whole(m, len, MemoryDomain::Host, counter))
    }

    /// A dma-buf of `len` bytes from `/dev/dma_heap/<heap>` (`system`, `linux,cma`, ...).
    pub fn alloc_dma_heap(heap: &str, len: usize, counter: &CopyCounter) -> Result<Buffer> {
        if heap.is_empty() || heap.contains('/') || heap == ".." || heap == "." {
            return Err(Error::arg(format!("'{heap}' is not a dma-heap name")));
        }
        Self::alloc_dma_heap_at(&Path::new("/dev/dma_heap").join(heap), len, counter)
    }

    /// [`Buffer::alloc_dma_heap`] with the heap device's path given.
    pub fn alloc_dma_heap_at(path: &Path, len: usize, counter: &CopyCounter) -> Result<Buffer> {
        if len == 0 {
            return Err(Error::arg("a dma-heap buffer needs a non-zero length"));
        }
        let heap = std::fs::File::open(path).map_err(|e| unavailable("dma-heap", path, &e))?;
        let fd = mem::dma_heap_alloc(heap.as_fd(), len as u64).map_err(|e| {
            Error::io(
                format!("{}: DMA_HEAP_IOCTL_ALLOC of {len} bytes", path.display()),
                e,
            )
        })?;
        let m = Memory::map_fd(fd, MemoryKind::DmaBuf, false)
            .map_err(|e| Error::io(format!("{}: mapping the dma-buf", path.display()), e))?;
        Ok(Self::whole(m, len, MemoryDomain::DmaBuf, counter))
    }

    /// The same pages as this memfd buffer, as a dma-buf from `/dev/udmabuf` (no copy).
    pub fn to_udmabuf(&self) -> Result<Buffer> {
        self.to_udmabuf_at(Path::new("/dev/udmabuf"))
    }

    /// [`Buffer::to_udmabuf`] with the misc device's path given.
    pub fn to_udmabuf_at(&self, dev: &Path) -> Result<Buffer> {
        if self.mem.kind() != MemoryKind::Memfd {
            return Err(Error::arg(format!(
                "udmabuf needs a memfd buffer, this one is {:?}",
                self.mem.kind()
            )));
        }
        let page = page_size();
        if !self.off.is_multiple_of(page) {
            return Err(Error::arg(format!(
                "udmabuf needs a page-aligned offset, the view starts at {}",
                self.off
            )));
        }
        // udmabuf maps whole pages; the dma-buf covers the pages of the view.
        let size = self.len.max(1).next_multiple_of(page);
        if self.off + size > self.mem.len() {
            return Err(Error::arg("udmabuf: view does not cover whole pages"));
        }
        let memfd = self
            .mem
            .fd()
            .ok_or_else(|| Error::arg("udmabuf: buffer has no memfd"))?;
        let devf = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map_err(|e| unavailable("udmabuf", dev, &e))?;
        let fd = mem::udmabuf_create(devf.as_fd(), memfd, self.off as u64, size as u64)
            .map_err(|e| Error::io(format!("{}: UDMABUF_CREATE", dev.display()), e))?;
        let m = Memory::map_fd(fd, MemoryKind::DmaBuf, false)
            .map_err(|e| Error::io(format!("{}: mapping the dma-buf", dev.display()), e))?;
        // The memfd's pages are now reachable through another fd.
        let _ = self.mem.export_fd();
        Ok(Self::whole(
            m,
            self.len,
            MemoryDomain::DmaBuf,
            &self.counter,
        ))
    }

    /// Import caller memory. Zero-copy when it is page-aligned; otherwise one copy into a new
    /// host buffer, recorded by `counter`.
    pub fn import_host_ptr(p: HostPtr, counter: &CopyCounter) -> Result<Buffer> {
        let len = p.len();
        let aligned = p.addr().is_multiple_of(page_size());
        let user = Memory::from_host_ptr(p);
        if aligned {
            return Ok(Self::whole(user, len, MemoryDomain::HostImported, counter));
        }
        let b = Self::alloc(len, counter)?;
        mem::copy(&user, 0, &b.mem, 0, len)?;
        counter.record(len);
        Ok(b)
    }

    /// Copy `data` into a new host buffer (one counted copy).
    pub fn import_slice(data: &[u8], counter: &CopyCounter) -> Result<Buffer> {
        let b = Self::alloc(data.len(), counter)?;
        b.mem.write_at(0, data)?;
        counter.record(data.len());
        Ok(b)
    }

    /// Import a memfd without copying (mapped shared; its whole size).
    pub fn import_memfd(fd: OwnedFd, counter: &CopyCounter) -> Result<Buffer> {
        let target = mem::fd_target(fd.as_fd());
        if !target.starts_with("/memfd:") {
            return Err(Error::arg(format!(
                "import_memfd: fd is not a memfd (it is '{target}')"
            )));
        }
        let m = Memory::map_fd(fd, MemoryKind::Memfd, true)
            .map_err(|e| Error::io(format!("mapping {target}"), e))?;
        let len = m.len();
        Ok(Self::whole(m, len, MemoryDomain::HostImported, counter))
    }

    /// Import a dma-buf fd without copying (mapped shared; CPU access synced).
    pub fn import_dmabuf(fd: OwnedFd, counter: &CopyCounter) -> Result<Buffer> {
        let target = mem::fd_target(fd.as_fd());
        if !target.contains("dmabuf") {
            return Err(Error::arg(format!(
                "import_dmabuf: fd is not a dma-buf (it is '{target}')"
            )));
        }
        let m = Memory::map_fd(fd, MemoryKind::DmaBuf, true)
            .map_err(|e| Error::io(format!("mapping {target}"), e))?;
        let len = m.len();
        Ok(Self::whole(m, len, MemoryDomain::DmaBuf, counter))
    }

    /// A read-only host buffer sharing a tensor's storage (no copy).
    pub fn from_tensor(t: &Tensor, counter: &CopyCounter) -> Buffer {
        let b: Bytes = t.bytes().clone();
        let len = b.len();
        Self::whole(Memory::from_bytes(b), len, MemoryDomain::Host, counter)
    }

    /// A view of `range` (relative to this buffer), sharing memory.
    pub fn view(&self, range: Range<usize>) -> Result<Buffer> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::arg(format!(
                "view {}..{} is outside the buffer's {} bytes",
                range.start, range.end, self.len
            )));
        }
        let mut b = self.clone();
        b.off = self.off + range.start;
        b.len = range.end - range.start;
        Ok(b)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The memory domain.
    pub fn domain(&self) -> MemoryDomain {
        self.domain
    }
    /// True when backed by huge pages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }
    /// True when writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.mem.is_writable()
    }
    /// The counter this buffer's copies are recorded in.
    pub fn counter(&self) -> &CopyCounter {
        &self.counter
    }
    /// Offset of this view inside its memory.
    pub fn offset(&self) -> usize {
        self.off
    }
    /// Address of the first byte (for alignment checks; never to dereference).
    pub fn addr(&self) -> usize {
        self.mem.addr() + self.off
    }
    /// True when `other` is a view of the same memory.
    pub fn same_memory(&self, other: &Buffer) -> bool {
        Arc::ptr_eq(&self.mem, &other.mem)
    }
    /// The backing fd (memfd or dma-buf), borrowed. Prefer [`Buffer::export_fd`] to share it.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.mem.fd()
    }
    /// A duplicate of the backing fd to hand to a device or process. Afterwards zero-copy
    /// tensor views of this memory are refused (someone else may write it).
    pub fn export_fd(&self) -> Result<OwnedFd> {
        self.mem.export_fd()
    }

    /// Pin this view for device DMA (an IOMMU mapping such as VFIO's): the [`DmaPin`] keeps
    /// the memory alive and gives its page-aligned address as a raw pointer only. The view
    /// must start on a page; it is widened to whole pages. Afterwards zero-copy tensor views
    /// of this memory are refused (the device may write it); copies and leases still work.
    /// Read-only buffers (tensor storage, sealed or read-only imports) are refused.
    pub fn dma_pin(&self) -> Result<DmaPin> {
        self.mem.dma_pin(self.off, self.len)
    }
    /// What backs the memory (memfd, dma-buf, caller memory, tensor bytes).
    pub fn memory_kind(&self) -> MemoryKind {
        self.mem.kind()
    }

    /// Copy `dst.len()` bytes at `off` (relative to the view) into `dst`.
    pub fn read_into(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.check(off, dst.len())?;
        self.mem.read_at(self.off + off, dst)
    }

    /// Copy `src` into the buffer at `off`.
    pub fn write_from(&self, off: usize, src: &[u8]) -> Result<()> {
        self.check(off, src.len())?;
        self.mem.write_at(self.off + off, src)
    }

    /// The whole view copied into a vector.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        self.read_into(0, &mut v)?;
        Ok(v)
    }

    /// Scoped CPU access to the whole view: dma-bufs are synced (START) now and again (END)
    /// when the guard drops; writes are exclusive.
    pub fn cpu_access(&self, access: Access) -> Result<CpuAccess<'_>> {
        Ok(match access {
            Access::Read => CpuAccess::Read(self.mem.read_lease(self.off, self.len)?),
            Access::Write => CpuAccess::Write(self.mem.write_lease(self.off, self.len)?),
        })
    }

    /// Raw read lease for a device call (see [`mem::ReadLease`]).
    pub fn read_lease(&self) -> Result<ReadLease<'_>> {
        self.mem.read_lease(self.off, self.len)
    }

    /// Exclusive CPU write access to the whole view as a `&mut [u8]` (through
    /// [`WriteLease::as_mut_slice`]), so the CPU can compute straight into the buffer. Refused
    /// when the memory is shared outside the process (exported fd, imported dma-buf or memfd),
    /// read-only, or while a tensor or lease of it lives; callers then fall back to a counted
    /// copy ([`Buffer::store_tensor`]).
    pub fn write_in_place(&self) -> Result<WriteLease<'_>> {
        let mut lease = self.mem.write_lease(self.off, self.len)?;
        lease.as_mut_slice()?;
        Ok(lease)
    }

    /// Raw write lease for a device call (see [`mem::WriteLease`]).
    pub fn write_lease(&self) -> Result<WriteLease<'_>> {
        self.mem.write_lease(self.off, self.len)
    }

    fn check(&self, off: usize, n: usize) -> Result<()> {
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::arg(format!(
                "access {off}..{} is outside the buffer's {} bytes",
                off as u128 + n as u128,
                self.len
            ))),
        }
    }

    /// Bytes a tensor of `dtype` and `shape` occupies, checked against this view.
    pub fn tensor_bytes(&self, dtype: DType, shape: &[usize]) -> Result<usize> {
        let n = checked_numel(shape, dtype)? * dtype.size();
        if n > self.len {
            return Err(Error::arg(format!(
                "tensor {dtype} {shape:?} needs {n} bytes, the buffer has {}",
                self.len
            )));
        }
        Ok(n)
    }

    /// The first bytes of this view as a tensor. Zero-copy when nobody outside can write the
    /// memory (the view then blocks writes through edgehal until the tensor is dropped);
    /// otherwise one copy, recorded by the counter.
    pub fn to_tensor(&self, dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
        let n = self.tensor_bytes(dtype, &shape)?;
        if self.mem.can_view() {
            let bytes = self.mem.view_bytes(self.off, n)?;
            return Tensor::from_bytes(dtype, shape, bytes);
        }
        let words = n.div_ceil(8);
        let mut v = vec![0u64; words];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut v);
        self.read_into(0, &mut dst[..n])?;
        self.counter.record(n);
        Tensor::from_bytes(dtype, shape, Bytes::from_owner(Aligned(v, n)))
    }

    /// Write a tensor's bytes into the start of this view (one counted copy, unless the
    /// tensor already lives in exactly this memory).
    pub fn store_tensor(&self, t: &Tensor) -> Result<()> {
        let src = t.bytes();
        if src.len() > self.len {
            return Err(Error::arg(format!(
                "tensor {} {:?} needs {} bytes, the buffer has {}",
                t.dtype(),
                t.shape(),
                src.len(),
                self.len
            )));
        }
        if src.as_ptr() as usize == self.addr() && !src.is_empty() {
            return Ok(());
        }
        self.write_from(0, src)?;
        self.counter.record(src.len());
        Ok(())
    }
}

/// 8-byte aligned bytes (a copied tensor keeps element alignment).
struct Aligned(Vec<u64>, usize);
impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        let b: &[u8] = bytemuck::cast_slice(&self.0);
        &b[..self.1.min(b.len())]
    }
}

/// Scoped CPU access (see [`Buffer::cpu_access`]).
pub enum CpuAccess<'a> {
    Read(ReadLease<'a>),
    Write(WriteLease<'a>),
}

impl CpuAccess<'_> {
    /// Copy out `dst.len()` bytes at `off`.
    pub fn read_into(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        match self {
            CpuAccess::Read(l) => l.read(off, dst),
            CpuAccess::Write(l) => l.read(off, dst),
        }
    }
    /// Copy `src` in at `off` (write access only).
    pub fn write_from(&self, off: usize, src: &[u8]) -> Result<()> {
        match self {
            CpuAccess::Read(_) => Err(Error::arg("buffer was opened for reading only")),
            CpuAccess::Write(l) => l.write(off, src),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_and_ranges() {
        let c = CopyCounter::new();
        let b = Buffer::alloc(100, &c).unwrap();
        assert_eq!(b.len(), 100);
        assert_eq!(b.addr() % page_size(), 0);
        b.write_from(0, &(0..100u8).collect::<Vec<_>>()).unwrap();
        let v = b.view(10..20).unwrap();
        assert_eq!(v.to_vec().unwrap(), (10..20u8).collect::<Vec<_>>());
        assert!(b.view(90..101).is_err());
        assert!(v.read_into(5, &mut [0u8; 6]).is_err());
        v.write_from(0, &[200]).unwrap();
        let mut one = [0u8];
        b.read_into(10, &mut one).unwrap();
        assert_eq!(one[0], 200);
        assert_eq!(c.copies(), 0);
    }

    #[test]
    fn dma_pin_turns_zero_copy_tensors_into_copies() {
        let c = CopyCounter::new();
        let page = page_size();
        let b = Buffer::alloc(2 * page, &c).unwrap();
        b.write_from(0, &1.5f32.to_le_bytes()).unwrap();
        let t = b.to_tensor(DType::F32, vec![1]).unwrap();
        assert_eq!(c.copies(), 0, "private memory: zero-copy view");
        assert!(b.dma_pin().is_err(), "a live view blocks pinning");
        drop(t);
        let pin = b.view(page..2 * page).unwrap().dma_pin().unwrap();
        assert_eq!(pin.ptr() as usize, b.addr() + page);
        assert_eq!(pin.len(), page);
        assert_eq!(b.memory_kind(), MemoryKind::Memfd);
        let t = b.to_tensor(DType::F32, vec![1]).unwrap();
        assert_eq!(t.to_f32()[0], 1.5);
        assert_eq!(
            c.copies(),
            1,
            "a device may write pinned memory: the tensor is a copy"
        );
        assert!(
            b.view(1..page).unwrap().dma_pin().is_err(),
            "unaligned start"
        );
        let ro = Buffer::from_tensor(&t, &c);
        assert!(ro.dma_pin().is_err(), "tensor storage is read-only");
    }
}
