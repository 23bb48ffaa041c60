//! Every `unsafe` operation of the crate lives here: ioctl numbers and calls, BAR mappings,
//! volatile MMIO access, the IOMMU mapping of pinned edgehal buffers, and io_uring submissions.
//! dma-buf, memfd and udmabuf live in edgehal-core (`buffer`, `sys::mem`), not here.
//!
//! Trust model: the kernel honours its documented contracts (an ioctl writes only the struct it
//! is given, an mmap of N bytes yields N accessible bytes until munmap). Callers and devices are
//! not trusted: every offset and length is checked against the mapping before a pointer is
//! formed, and memory that a device may write through DMA is only touched with volatile
//! accesses, never through a `&[u8]` (a shared reference to memory that changes under it is
//! undefined behaviour).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// ioctl numbers (asm-generic layout, used by x86_64 and aarch64)
// ---------------------------------------------------------------------------------------------

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u32 = 0;

/// `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}
/// `_IO(type, nr)`.
pub const fn io(ty: u8, nr: u8) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}
/// `VFIO_TYPE` (';') and `VFIO_BASE`.
pub const VFIO_TYPE: u8 = b';';
/// First VFIO ioctl number.
pub const VFIO_BASE: u8 = 100;
/// `VFIO_DEVICE_SET_IRQS` = `_IO(VFIO_TYPE, VFIO_BASE + 10)`.
pub const VFIO_DEVICE_SET_IRQS: u32 = io(VFIO_TYPE, VFIO_BASE + 10);
/// `VFIO_IOMMU_MAP_DMA` = `_IO(VFIO_TYPE, VFIO_BASE + 13)`.
pub const VFIO_IOMMU_MAP_DMA: u32 = io(VFIO_TYPE, VFIO_BASE + 13);

// ---------------------------------------------------------------------------------------------
// memory mappings
// ---------------------------------------------------------------------------------------------

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 {
        4096
    } else {
        v as usize
    }
}

/// An owned `mmap` (anonymous, memfd, dma-buf or a VFIO region), unmapped on drop. All access
/// is volatile and bounds-checked, so it is sound while a device reads or writes it.
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
    /// The file behind the mapping, if any (memfd, dma-buf); kept open for `fd()`.
    fd: Option<OwnedFd>,
}

// SAFETY: the region is plain memory (or MMIO) with no thread affinity; every access is volatile
// through a raw pointer, so sharing it across threads creates no references that could alias.
unsafe impl Send for MmapRegion {}
// SAFETY: as above: `&MmapRegion` only permits volatile reads/writes through raw pointers.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// Anonymous, private, zero-filled, page-aligned memory of `len` bytes.
    pub fn anonymous(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::arg("anonymous mapping: length is 0"));
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing cannot alias
        // any existing Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::from_mmap(p, len, None, "mmap anonymous")
    }

    /// A shared mapping of `len` bytes of `fd` at `offset` (memfd, dma-buf, VFIO device region).
    /// The file is kept open (owned) when `keep` is given.
    pub fn shared(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: u64,
        writable: bool,
        keep: Option<OwnedFd>,
    ) -> Result<Self> {
        if len == 0 {
            return Err(Error::arg("shared mapping: length is 0"));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| Error::arg(format!("mapping offset {offset:#x} too large")))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new MAP_SHARED mapping at a kernel-chosen address aliases no Rust object;
        // the kernel checks the fd, offset and length and fails with an errno otherwise.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        Self::from_mmap(p, len, keep, "mmap shared")
    }

    fn from_mmap(p: *mut libc::c_void, len: usize, fd: Option<OwnedFd>, op: &str) -> Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(format!("{op} ({len} bytes)")));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::arg("mmap returned NULL"))?;
        Ok(MmapRegion { ptr, len, fd })
    }

    /// Start of the mapping (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: constructors refuse 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file behind the mapping (memfd or dma-buf), if any.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    fn check(&self, off: usize, n: usize, align: usize) -> Result<*mut u8> {
        let end = off
            .checked_add(n)
            .ok_or_else(|| Error::arg("offset overflows"))?;
        if end > self.len {
            return Err(Error::arg(format!(
                "access [{off:#x}, {end:#x}) is outside the {:#x}-byte mapping",
                self.len
            )));
        }
        if !off.is_multiple_of(align) {
            return Err(Error::arg(format!(
                "access at {off:#x} is not {align}-byte aligned"
            )));
        }
        // SAFETY: off + n <= len, so the result stays inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(off) })
    }

    /// Volatile 32-bit read at `off` (must be 4-aligned and in range).
    pub fn read_u32(&self, off: usize) -> Result<u32> {
        let p = self.check(off, 4, 4)?.cast::<u32>();
        // SAFETY: `check` proved p is in the mapping and 4-byte aligned.
        Ok(unsafe { p.read_volatile() })
    }

    /// Volatile 32-bit write at `off`.
    pub fn write_u32(&self, off: usize, v: u32) -> Result<()> {
        let p = self.check(off, 4, 4)?.cast::<u32>();
        // SAFETY: `check` proved p is in the mapping and aligned; volatile writes to MMIO or
        // DMA memory do not create references.
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    /// Volatile 64-bit read at `off` (8-aligned).
    pub fn read_u64(&self, off: usize) -> Result<u64> {
        let p = self.check(off, 8, 8)?.cast::<u64>();
        // SAFETY: in range and aligned (checked).
        Ok(unsafe { p.read_volatile() })
    }

    /// Volatile 64-bit write at `off` (8-aligned).
    pub fn write_u64(&self, off: usize, v: u64) -> Result<()> {
        let p = self.check(off, 8, 8)?.cast::<u64>();
        // SAFETY: in range and aligned (checked).
        unsafe { p.write_volatile(v) };
        Ok(())
    }

    /// Copy `src` into the mapping at `off`, byte by byte with volatile writes.
    pub fn write_bytes(&self, off: usize, src: &[u8]) -> Result<()> {
        let p = self.check(off, src.len(), 1)?;
        for (i, b) in src.iter().enumerate() {
            // SAFETY: i < src.len() and [off, off+len) is inside the mapping (checked).
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Copy from the mapping at `off` into `dst` with volatile reads.
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        let p = self.check(off, dst.len(), 1)?;
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: i < dst.len() and the range is inside the mapping (checked).
            *b = unsafe { p.add(i).read_volatile() };
        }
        Ok(())
    }

    /// Fill `[off, off+n)` with `v` (volatile).
    pub fn fill(&self, off: usize, n: usize, v: u8) -> Result<()> {
        let p = self.check(off, n, 1)?;
        for i in 0..n {
            // SAFETY: i < n and the range is inside the mapping (checked).
            unsafe { p.add(i).write_volatile(v) };
        }
        Ok(())
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap owned by this value; nothing else
        // refers to it (all access went through volatile raw pointers borrowed from &self).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------------------------
// file descriptors and ioctls
// ---------------------------------------------------------------------------------------------

/// Borrow the fd that `owner` holds open for as long as `owner` is borrowed.
pub fn borrow_fd<T: AsRawFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: used only with types that own their fd for their whole life (File, VfioDevice,
    // EventFd); the returned borrow cannot outlive `owner`, so the fd stays open.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// `pread` exactly `buf.len()` bytes at `off` (VFIO region access through the device fd).
pub fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<()> {
    let o = libc::off_t::try_from(off).map_err(|_| Error::arg("pread offset too large"))?;
    // SAFETY: buf is a valid writable slice of buf.len() bytes owned by the caller.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), o) };
    if n < 0 {
        return Err(Error::last_os(format!(
            "pread {} bytes at {off:#x}",
            buf.len()
        )));
    }
    if n as usize != buf.len() {
        return Err(Error::arg(format!(
            "short pread at {off:#x}: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// `pwrite` all of `buf` at `off`.
pub fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<()> {
    let o = libc::off_t::try_from(off).map_err(|_| Error::arg("pwrite offset too large"))?;
    // SAFETY: buf is a valid readable slice of buf.len() bytes.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), o) };
    if n < 0 {
        return Err(Error::last_os(format!(
            "pwrite {} bytes at {off:#x}",
            buf.len()
        )));
    }
    if n as usize != buf.len() {
        return Err(Error::arg(format!(
            "short pwrite at {off:#x}: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// Map the pinned range at `iova` in the container's IOMMU domain (`VFIO_IOMMU_MAP_DMA`,
/// read+write). The caller keeps `pin` alive until the matching unmap (see `dma::DmaMapping`).
pub fn vfio_dma_map(
    container: &vfio_ioctls::VfioContainer,
    iova: u64,
    pin: &edgehal_core::buffer::DmaPin,
) -> std::result::Result<(), vfio_ioctls::VfioError> {
    // SAFETY: a DmaPin is a page-aligned range of whole pages inside one live mapping that
    // it keeps alive, whose address edgehal-core never hands out as a Rust reference (CPU
    // access is by raw copies and leases; zero-copy views are refused once pinned), which is
    // what vfio_dma_map requires; the caller (DmaMapping) owns the pin until it has unmapped
    // the IOVA range, and leaks it if the unmap fails.
    unsafe { container.vfio_dma_map(iova, pin.len(), pin.ptr()) }
}

/// A small io_uring instance: the reactor side of edgehal's completion model (reads, and
/// waiting for interrupt eventfds with a deadline). Every submission is reaped before the call
/// that made it returns, so no buffer or timespec outlives its operation.
pub struct Uring {
    ring: io_uring::IoUring,
}

impl Uring {
    /// A ring with 8 entries.
    pub fn new() -> Result<Self> {
        let ring = io_uring::IoUring::new(8).map_err(|e| Error::os("io_uring_setup", e))?;
        Ok(Uring { ring })
    }

    /// Push `entries`, submit, and reap exactly `entries.len()` completions (by user_data order).
    ///
    /// # Safety
    ///
    /// Every pointer inside `entries` (buffers, timespecs) must stay valid until this returns.
    unsafe fn run(&mut self, entries: &[io_uring::squeue::Entry]) -> Result<Vec<i32>> {
        // drain anything stale (none expected: every call reaps its own completions)
        while self.ring.completion().next().is_some() {}
        // SAFETY: the caller guarantees the entries' pointers outlive this call, and we wait for
        // all their completions below before returning.
        unsafe { self.ring.submission().push_multiple(entries) }
            .map_err(|_| Error::arg("io_uring submission queue full"))?;
        let mut res = vec![None; entries.len()];
        let mut got = 0;
        while got < entries.len() {
            match self.ring.submit_and_wait(entries.len() - got) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::os("io_uring_enter", e)),
            }
            for cqe in self.ring.completion() {
                let i = cqe.user_data() as usize;
                if let Some(slot) = res.get_mut(i) {
                    if slot.is_none() {
                        got += 1;
                    }
                    *slot = Some(cqe.result());
                }
            }
        }
        Ok(res.into_iter().map(|r| r.unwrap_or(-libc::EIO)).collect())
    }

    /// Read into `buf` from `fd` at `off`; returns the byte count.
    pub fn read(&mut self, fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize> {
        use io_uring::{opcode, types};
        let len = u32::try_from(buf.len()).map_err(|_| Error::arg("io_uring read too large"))?;
        let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(off)
            .build()
            .user_data(0);
        // SAFETY: buf and fd are borrowed for the whole call, which reaps the completion.
        let r = unsafe { self.run(&[sqe]) }?;
        let n = r.first().copied().unwrap_or(-libc::EIO);
        if n < 0 {
            return Err(Error::os(
                "io_uring read",
                std::io::Error::from_raw_os_error(-n),
            ));
        }
        Ok(n as usize)
    }

    /// Wait until `fd` is readable (POLLIN) or `timeout` passes (a linked timeout): true if it
    /// became readable.
    pub fn poll_in(&mut self, fd: BorrowedFd<'_>, timeout: std::time::Duration) -> Result<bool> {
        use io_uring::{opcode, squeue::Flags, types};
        let ts = types::Timespec::from(timeout);
        let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .flags(Flags::IO_LINK)
            .user_data(0);
        let to = opcode::LinkTimeout::new(&ts).build().user_data(1);
        // SAFETY: `ts` lives on this stack frame and fd is borrowed until both completions are
        // reaped inside `run`.
        let r = unsafe { self.run(&[poll, to]) }?;
        match r.first().copied() {
            Some(m) if m > 0 => Ok(true),
            Some(m) if m == -libc::ECANCELED || m == -libc::ETIME || m == 0 => Ok(false),
            Some(m) => Err(Error::os(
                "io_uring poll",
                std::io::Error::from_raw_os_error(-m),
            )),
            None => Err(Error::arg("io_uring: missing poll completion")),
        }
    }
}

/// Read `buf.len()` bytes from `fd` at `off` through a one-off io_uring.
pub fn uring_read(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize> {
    Uring::new()?.read(fd, buf, off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_kernel_headers() {
        // Values from the kernel uapi headers as compiled on x86_64 (e.g. strace's tables).
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(io(VFIO_TYPE, VFIO_BASE), 0x3b64); // VFIO_GET_API_VERSION
    }

    #[test]
    fn mmap_region_bounds_and_alignment() {
        let r = MmapRegion::anonymous(page_size()).unwrap();
        assert_eq!(r.as_ptr() as usize % page_size(), 0);
        r.write_u32(8, 0xdead_beef).unwrap();
        assert_eq!(r.read_u32(8).unwrap(), 0xdead_beef);
        r.write_u64(16, 0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(r.read_u64(16).unwrap(), 0x0123_4567_89ab_cdef);
        assert!(r.read_u32(2).is_err(), "unaligned read must fail");
        assert!(
            r.read_u32(page_size() - 2).is_err(),
            "read past end must fail"
        );
        assert!(r.write_bytes(page_size() - 1, &[1, 2]).is_err());
        r.write_bytes(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        r.read_bytes(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(r.read_bytes(usize::MAX, &mut out).is_err());
    }

    #[test]
    fn uring_read_file_or_unsupported() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let mut buf = [0u8; 64];
        match uring_read(f.as_fd(), &mut buf, 0) {
            Ok(n) => assert!(n > 0 && buf[..n].contains(&b'(')),
            // containers often forbid io_uring; the VM test covers it for real
            Err(e) => {
                eprintln!("io_uring unavailable here: {e}");
                return;
            }
        }
        let mut ring = Uring::new().unwrap();
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = std::time::Instant::now();
        let timeout = std::time::Duration::from_millis(30);
        assert!(!ring.poll_in(borrow_fd(&efd), timeout).unwrap());
        assert!(t.elapsed() >= timeout);
        efd.write(1).unwrap();
        assert!(ring
            .poll_in(borrow_fd(&efd), std::time::Duration::from_secs(5))
            .unwrap());
        // the ring is reusable after both outcomes
        assert!(ring.read(f.as_fd(), &mut buf, 0).unwrap() > 0);
    }
}
