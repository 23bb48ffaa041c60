//! Raw memory syscalls: memfd, sealing, shared mappings, dma-buf heaps, udmabuf,
//! `DMA_BUF_IOCTL_SYNC`, and eventfds for fences.
//!
//! Trust model: the kernel honours its documented uapi (struct layouts and ioctl numbers from
//! `linux/dma-heap.h`, `linux/udmabuf.h`, `linux/dma-buf.h`, checked by tests against the
//! constants the C headers produce). Callers are not trusted: every offset and length is
//! checked before a pointer is formed.
//!
//! The DMA rule (STYLE.md): memory that a device or another process may write is never
//! exposed as `&[u8]`. [`Memory`] hands out only raw copies ([`Memory::read_at`],
//! [`Memory::write_at`]) and *leases* (raw pointers for a device call, dma-buf synced for the
//! lease's life). A zero-copy [`Bytes`] view is given only while nobody else can write: the
//! memory is private to this process (its fd never exported, or it is write-sealed) and
//! writes through [`Memory`] are refused while such a view lives (a run-time reader count).

use std::any::Any;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// ioctl numbers (asm-generic/ioctl.h layout, used by x86_64 and aarch64)
// ---------------------------------------------------------------------------------------------

const IOC_NRBITS: u64 = 8;
const IOC_TYPEBITS: u64 = 8;
const IOC_SIZEBITS: u64 = 14;
const IOC_NRSHIFT: u64 = 0;
const IOC_TYPESHIFT: u64 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u64 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u64 = IOC_SIZESHIFT + IOC_SIZEBITS;
/// `_IOC_WRITE`: userspace writes the argument to the kernel.
pub const IOC_WRITE: u64 = 1;
/// `_IOC_READ`: the kernel writes the argument back.
pub const IOC_READ: u64 = 2;

/// `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << IOC_DIRSHIFT)
        | ((ty as u64) << IOC_TYPESHIFT)
        | ((nr as u64) << IOC_NRSHIFT)
        | ((size as u64) << IOC_SIZESHIFT)
}

/// `struct dma_buf_sync` (linux/dma-buf.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaBufSync {
    pub flags: u64,
}

/// `struct dma_heap_allocation_data` (linux/dma-heap.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaHeapAllocationData {
    pub len: u64,
    pub fd: u32,
    pub fd_flags: u32,
    pub heap_flags: u64,
}

/// `struct udmabuf_create` (linux/udmabuf.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UdmabufCreate {
    pub memfd: u32,
    pub flags: u32,
    pub offset: u64,
    pub size: u64,
}

/// `struct udmabuf_create_list` header (the item array follows it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UdmabufCreateListHeader {
    pub flags: u32,
    pub count: u32,
}

const _: () = assert!(std::mem::size_of::<DmaBufSync>() == 8);
const _: () = assert!(std::mem::size_of::<DmaHeapAllocationData>() == 24);
const _: () = assert!(std::mem::size_of::<UdmabufCreate>() == 24);
const _: () = assert!(std::mem::size_of::<UdmabufCreateListHeader>() == 8);

/// `DMA_BUF_IOCTL_SYNC = _IOW('b', 0, struct dma_buf_sync)`.
pub const DMA_BUF_IOCTL_SYNC: u64 = ioc(IOC_WRITE, b'b', 0, std::mem::size_of::<DmaBufSync>());
/// `DMA_HEAP_IOCTL_ALLOC = _IOWR('H', 0, struct dma_heap_allocation_data)`.
pub const DMA_HEAP_IOCTL_ALLOC: u64 = ioc(
    IOC_READ | IOC_WRITE,
    b'H',
    0,
    std::mem::size_of::<DmaHeapAllocationData>(),
);
/// `UDMABUF_CREATE = _IOW('u', 0x42, struct udmabuf_create)`.
pub const UDMABUF_CREATE: u64 = ioc(IOC_WRITE, b'u', 0x42, std::mem::size_of::<UdmabufCreate>());
/// `UDMABUF_CREATE_LIST = _IOW('u', 0x43, struct udmabuf_create_list)`.
pub const UDMABUF_CREATE_LIST: u64 = ioc(
    IOC_WRITE,
    b'u',
    0x43,
    std::mem::size_of::<UdmabufCreateListHeader>(),
);
/// `UDMABUF_FLAGS_CLOEXEC`.
pub const UDMABUF_FLAGS_CLOEXEC: u32 = 0x01;

/// `DMA_BUF_SYNC_READ`.
pub const DMA_BUF_SYNC_READ: u64 = 1;
/// `DMA_BUF_SYNC_WRITE`.
pub const DMA_BUF_SYNC_WRITE: u64 = 2;
/// `DMA_BUF_SYNC_RW`.
pub const DMA_BUF_SYNC_RW: u64 = 3;
/// `DMA_BUF_SYNC_START`.
pub const DMA_BUF_SYNC_START: u64 = 0;
/// `DMA_BUF_SYNC_END`.
pub const DMA_BUF_SYNC_END: u64 = 4;

// ---------------------------------------------------------------------------------------------
// Plain syscalls
// ---------------------------------------------------------------------------------------------

/// The kernel's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects; it returns -1 on error, handled below.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p <= 0 {
        4096
    } else {
        p as usize
    }
}

/// Size of a default huge page (from `/proc/meminfo`'s `Hugepagesize`), 2 MiB when unknown.
pub fn huge_page_size() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Hugepagesize:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map(|kib| kib * 1024)
        .filter(|&b| b.is_power_of_two())
        .unwrap_or(2 << 20)
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING [| MFD_HUGETLB])`.
pub fn memfd_create(name: &str, hugetlb: bool) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name.replace('\0', "_"))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let fd = cvt(unsafe { libc::memfd_create(cname.as_ptr(), flags) })?;
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ftruncate(fd, len)`.
pub fn set_len(fd: BorrowedFd<'_>, len: u64) -> std::io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: ftruncate on a borrowed, open descriptor; no memory is passed.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    Ok(())
}

/// `F_SEAL_SEAL`.
pub const F_SEAL_SEAL: i32 = libc::F_SEAL_SEAL;
/// `F_SEAL_SHRINK`.
pub const F_SEAL_SHRINK: i32 = libc::F_SEAL_SHRINK;
/// `F_SEAL_GROW`.
pub const F_SEAL_GROW: i32 = libc::F_SEAL_GROW;
/// `F_SEAL_WRITE`.
pub const F_SEAL_WRITE: i32 = libc::F_SEAL_WRITE;
/// `F_SEAL_FUTURE_WRITE` (Linux 5.1).
pub const F_SEAL_FUTURE_WRITE: i32 = 0x0010;

/// `fcntl(fd, F_ADD_SEALS, seals)`.
pub fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> std::io::Result<()> {
    // SAFETY: fcntl with an integer argument on a borrowed, open descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(())
}

/// `fcntl(fd, F_GET_SEALS)`.
pub fn get_seals(fd: BorrowedFd<'_>) -> std::io::Result<i32> {
    // SAFETY: fcntl without a pointer argument on a borrowed, open descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// Size of the object behind `fd` (`lseek(fd, 0, SEEK_END)`, which dma-bufs support; the
/// position is reset to 0 afterwards).
pub fn fd_size(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    // SAFETY: lseek on a borrowed, open descriptor; no memory is passed.
    let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_SET) };
    Ok(end as u64)
}

/// What `/proc/self/fd/N` points at (`/memfd:name (deleted)`, `/dmabuf:`, `anon_inode:dmabuf`).
pub fn fd_target(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `dup(fd)` with close-on-exec.
pub fn dup(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

fn ioctl_retry(fd: BorrowedFd<'_>, req: u64, arg: *mut libc::c_void) -> std::io::Result<()> {
    loop {
        // SAFETY: every caller passes a request number whose argument struct is the one `arg`
        // points to (a live, properly sized `#[repr(C)]` value owned by the caller).
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
        if r >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            _ => return Err(e),
        }
    }
}

/// `DMA_BUF_IOCTL_SYNC` with `flags` (`START|END` combined with `READ|WRITE`).
pub fn dma_buf_sync(fd: BorrowedFd<'_>, flags: u64) -> std::io::Result<()> {
    let mut arg = DmaBufSync { flags };
    ioctl_retry(fd, DMA_BUF_IOCTL_SYNC, (&mut arg as *mut DmaBufSync).cast())
}

/// `DMA_HEAP_IOCTL_ALLOC` on an open `/dev/dma_heap/<name>`: a new dma-buf of `len` bytes.
pub fn dma_heap_alloc(heap: BorrowedFd<'_>, len: u64) -> std::io::Result<OwnedFd> {
    let mut arg = DmaHeapAllocationData {
        len,
        fd: 0,
        fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        heap_flags: 0,
    };
    ioctl_retry(
        heap,
        DMA_HEAP_IOCTL_ALLOC,
        (&mut arg as *mut DmaHeapAllocationData).cast(),
    )?;
    let fd =
        i32::try_from(arg.fd).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel installed a fresh descriptor for the new dma-buf and returned it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UDMABUF_CREATE` on an open `/dev/udmabuf`: a dma-buf over `size` bytes of `memfd` at
/// `offset` (both page aligned; the memfd must carry `F_SEAL_SHRINK` and not `F_SEAL_WRITE`).
pub fn udmabuf_create(
    dev: BorrowedFd<'_>,
    memfd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
) -> std::io::Result<OwnedFd> {
    let mut arg = UdmabufCreate {
        memfd: memfd.as_raw_fd() as u32,
        flags: UDMABUF_FLAGS_CLOEXEC,
        offset,
        size,
    };
    loop {
        // SAFETY: UDMABUF_CREATE takes a `struct udmabuf_create`, which `arg` is; the ioctl
        // returns the new dma-buf descriptor as its result.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                UDMABUF_CREATE as _,
                &mut arg as *mut UdmabufCreate,
            )
        };
        if r >= 0 {
            // SAFETY: a non-negative result is a fresh descriptor owned by us.
            return Ok(unsafe { OwnedFd::from_raw_fd(r) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// eventfd (fences)
// ---------------------------------------------------------------------------------------------

/// A new non-blocking, close-on-exec eventfd with counter 0.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: fresh descriptor from eventfd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add 1 to an eventfd's counter (makes it readable).
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64, as eventfd requires.
    let r = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if r == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Wait until `fd` is readable or `timeout_ms` passes (`-1`: forever). True when readable.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one live pollfd, count 1.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0 && p.revents & libc::POLLIN != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mappings
// ---------------------------------------------------------------------------------------------

/// A `MAP_SHARED` mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all access goes through `Memory`,
// which never forms references that could alias writes (see the module docs).
unsafe impl Send for Mapping {}
// SAFETY: as for Send; shared use only produces raw copies or reader-counted views.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> std::io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping chosen by the kernel (addr NULL); it aliases no Rust
        // object. Its lifetime is tied to the returned value, which unmaps it on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region this value mapped; no view outlives the `Memory`
        // that owns this mapping (views hold an `Arc` of it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Caller memory handed to edgehal without a copy. Building one is the caller's promise.
pub struct HostPtr {
    ptr: NonNull<u8>,
    len: usize,
    keep: Option<Box<dyn Any + Send + Sync>>,
    writable: bool,
}

impl HostPtr {
    /// Describe `len` bytes at `ptr` that edgehal may read and write.
    ///
    /// # Safety
    ///
    /// - `ptr..ptr+len` is valid for reads and writes for as long as any `Buffer`, view,
    ///   tensor or lease made from it lives (keep the owner alive, or pass it as `keep` to
    ///   [`HostPtr::with_owner`]).
    /// - While those live, the caller does not access the memory except through edgehal, and
    ///   holds no Rust reference into it.
    /// - `ptr` is non-null when `len > 0`.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> HostPtr {
        HostPtr {
            ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
            len,
            keep: None,
            writable: true,
        }
    }

    /// Like [`HostPtr::new`] for memory edgehal must only read (refuses writes).
    ///
    /// # Safety
    ///
    /// As [`HostPtr::new`], except that only reads need be valid, and the caller must not
    /// write the memory while edgehal's views of it live.
    pub unsafe fn new_read_only(ptr: *const u8, len: usize) -> HostPtr {
        HostPtr {
            ptr: NonNull::new(ptr.cast_mut()).unwrap_or(NonNull::dangling()),
            len,
            keep: None,
            writable: false,
        }
    }

    /// Keep `owner` alive until the last view of this memory is dropped.
    pub fn with_owner(mut self, owner: impl Any + Send + Sync) -> HostPtr {
        self.keep = Some(Box::new(owner));
        self
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

enum Backing {
    Map(#[allow(dead_code)] Mapping),
    User(#[allow(dead_code)] Option<Box<dyn Any + Send + Sync>>),
    Bytes(#[allow(dead_code)] Bytes),
    Empty,
}

#[derive(Default)]
struct State {
    /// Live zero-copy views and read leases.
    readers: usize,
    /// Live write leases.
    writers: usize,
    /// The fd was handed out (or came from outside): someone else may write.
    exported: bool,
}

/// What a [`Memory`] is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// A memfd mapped shared.
    Memfd,
    /// A dma-buf mapped shared; CPU access is bracketed with `DMA_BUF_IOCTL_SYNC`.
    DmaBuf,
    /// Caller memory ([`HostPtr`]).
    User,
    /// Immutable bytes (a tensor's storage, a mapped model file).
    Bytes,
}

/// A block of host-addressable memory with run-time checked access (see the module docs).
pub struct Memory {
    ptr: NonNull<u8>,
    len: usize,
    fd: Option<OwnedFd>,
    kind: MemoryKind,
    writable: bool,
    /// Write-sealed memfd: nobody can write it, so views are always safe.
    sealed: bool,
    state: Mutex<State>,
    // Dropped last (after everything that points into it).
    _backing: Backing,
}

// SAFETY: `Memory` owns its backing; every access path is a raw copy or a reader/writer
// counted lease (see the module docs), so sharing across threads cannot create aliased `&mut`.
unsafe impl Send for Memory {}
// SAFETY: as for Send.
unsafe impl Sync for Memory {}

fn busy(what: &str) -> Error {
    Error::arg(format!("buffer is busy: {what}"))
}

impl Memory {
    /// A new memfd of at least `len` bytes (rounded up to the page or huge page), sealed
    /// against shrinking and growing (so the mapping can never fault), mapped read-write.
    pub fn memfd(name: &str, len: usize, hugetlb: bool) -> std::io::Result<Memory> {
        let fd = memfd_create(name, hugetlb)?;
        let unit = if hugetlb {
            huge_page_size()
        } else {
            page_size()
        };
        let cap = len
            .max(1)
            .checked_next_multiple_of(unit)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        set_len(fd.as_fd(), cap as u64)?;
        add_seals(fd.as_fd(), F_SEAL_SHRINK | F_SEAL_GROW)?;
        let map = Mapping::map(fd.as_fd(), cap, true)?;
        Ok(Memory {
            ptr: map.ptr,
            len: cap,
            fd: Some(fd),
            kind: MemoryKind::Memfd,
            writable: true,
            sealed: false,
            state: Mutex::new(State::default()),
            _backing: Backing::Map(map),
        })
    }

    /// Map an fd that came from elsewhere (a memfd or a dma-buf). Its size is the object's
    /// size. Imported memory counts as exported (someone else holds the fd) unless it is a
    /// memfd sealed against writes, in which case it is mapped read-only.
    pub fn map_fd(fd: OwnedFd, kind: MemoryKind, exported: bool) -> std::io::Result<Memory> {
        let size = fd_size(fd.as_fd())?;
        let len = usize::try_from(size)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let seals = if kind == MemoryKind::Memfd {
            get_seals(fd.as_fd()).unwrap_or(0)
        } else {
            0
        };
        let sealed = seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) != 0;
        let writable = !sealed;
        let (ptr, backing) = if len == 0 {
            (NonNull::dangling(), Backing::Empty)
        } else {
            let m = Mapping::map(fd.as_fd(), len, writable)?;
            (m.ptr, Backing::Map(m))
        };
        Ok(Memory {
            ptr,
            len,
            fd: Some(fd),
            kind,
            writable,
            sealed,
            state: Mutex::new(State {
                exported,
                ..State::default()
            }),
            _backing: backing,
        })
    }

    /// Wrap caller memory without copying.
    pub fn from_host_ptr(p: HostPtr) -> Memory {
        Memory {
            ptr: p.ptr,
            len: p.len,
            fd: None,
            kind: MemoryKind::User,
            writable: p.writable,
            sealed: false,
            state: Mutex::new(State::default()),
            _backing: Backing::User(p.keep),
        }
    }

    /// Wrap immutable bytes (read-only; views share the storage).
    pub fn from_bytes(b: Bytes) -> Memory {
        let ptr = NonNull::new(b.as_ptr().cast_mut()).unwrap_or(NonNull::dangling());
        Memory {
            ptr,
            len: b.len(),
            fd: None,
            kind: MemoryKind::Bytes,
            writable: false,
            sealed: true,
            state: Mutex::new(State::default()),
            _backing: Backing::Bytes(b),
        }
    }

    /// Bytes addressable.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What backs it.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// Start address (for alignment checks and diagnostics; never dereferenced by callers).
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Writes through edgehal are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The backing fd, if any.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// A duplicate of the backing fd to share with a device or process. From now on nobody
    /// can rule out outside writes, so zero-copy views are refused (unless write-sealed).
    pub fn export_fd(&self) -> Result<OwnedFd> {
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| Error::arg("buffer has no file descriptor (caller memory or bytes)"))?;
        let d = dup(fd.as_fd()).map_err(|e| Error::io("dup", e))?;
        self.lock().exported = true;
        Ok(d)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::arg(format!(
                "range {off}..{} is outside the buffer's {} bytes",
                off as u128 + len as u128,
                self.len
            ))),
        }
    }

    fn sync(&self, flags: u64) -> Result<()> {
        if self.kind != MemoryKind::DmaBuf {
            return Ok(());
        }
        let Some(fd) = self.fd.as_ref() else {
            return Ok(());
        };
        dma_buf_sync(fd.as_fd(), flags).map_err(|e| {
            Error::io(
                format!(
                    "DMA_BUF_IOCTL_SYNC({}) on {}",
                    sync_name(flags),
                    fd_target(fd.as_fd())
                ),
                e,
            )
        })
    }

    /// Copy `dst.len()` bytes at `off` out (dma-bufs bracketed with SYNC START/END READ).
    pub fn read_at(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        let _lease = self.read_lease(off, dst.len())?;
        // SAFETY: the range was checked; `dst` is a distinct Rust slice (it cannot overlap
        // memory we never exposed as a slice); raw copy forms no reference into the source.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// Copy `src` in at `off` (dma-bufs bracketed with SYNC START/END WRITE). Refused while a
    /// zero-copy view or lease of this memory lives.
    pub fn write_at(&self, off: usize, src: &[u8]) -> Result<()> {
        let lease = self.write_lease(off, src.len())?;
        // SAFETY: range checked, exclusive write lease held (no views alive); a caller slice
        // never overlaps this memory because it is never exposed as `&mut [u8]` and views are
        // excluded by the lease. copy_nonoverlapping tolerates len 0 with dangling pointers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), lease.ptr, src.len()) };
        Ok(())
    }

    /// Set `len` bytes at `off` to `byte`.
    pub fn fill(&self, off: usize, len: usize, byte: u8) -> Result<()> {
        let lease = self.write_lease(off, len)?;
        // SAFETY: range checked, exclusive write lease held.
        unsafe { std::ptr::write_bytes(lease.ptr, byte, len) };
        Ok(())
    }

    /// Raw read access to `off..off+len` for a device call: writes are refused and dma-bufs
    /// stay synced for reading until the lease drops.
    pub fn read_lease(&self, off: usize, len: usize) -> Result<ReadLease<'_>> {
        self.check_range(off, len)?;
        {
            let mut s = self.lock();
            if s.writers > 0 {
                return Err(busy("it is being written"));
            }
            s.readers += 1;
        }
        let lease = ReadLease {
            mem: self,
            // SAFETY: off <= len was checked, so the result is within (or one past) the block.
            ptr: unsafe { self.ptr.as_ptr().add(off) },
            len,
        };
        self.sync(DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)?;
        Ok(lease)
    }

    /// Raw write access to `off..off+len` for a device call: exclusive (no other lease or
    /// view), dma-bufs synced for read-write until the lease drops.
    pub fn write_lease(&self, off: usize, len: usize) -> Result<WriteLease<'_>> {
        self.check_range(off, len)?;
        if !self.writable {
            return Err(Error::arg(format!(
                "buffer is read-only ({})",
                match self.kind {
                    MemoryKind::Bytes => "it shares a tensor's immutable storage",
                    MemoryKind::Memfd => "the memfd is sealed against writes",
                    _ => "imported read-only",
                }
            )));
        }
        {
            let mut s = self.lock();
            if s.readers > 0 {
                return Err(busy(
                    "a tensor or device still reads it (drop the tensors made from it first)",
                ));
            }
            if s.writers > 0 {
                return Err(busy("another writer holds it"));
            }
            s.writers += 1;
        }
        let lease = WriteLease {
            mem: self,
            // SAFETY: range checked above.
            ptr: unsafe { self.ptr.as_ptr().add(off) },
            len,
        };
        self.sync(DMA_BUF_SYNC_START | DMA_BUF_SYNC_RW)?;
        Ok(lease)
    }

    /// True when a zero-copy view is sound: nobody outside can write the memory.
    pub fn can_view(&self) -> bool {
        self.sealed || !self.lock().exported
    }

    /// A zero-copy [`Bytes`] view of `off..off+len`. Refused (use a copy instead) when the
    /// memory was exported and is not write-sealed, or while someone writes it. While the
    /// view lives, writes through this `Memory` are refused and a dma-buf stays synced for
    /// reading.
    pub fn view_bytes(self: &Arc<Self>, off: usize, len: usize) -> Result<Bytes> {
        if !self.can_view() {
            return Err(Error::arg(
                "buffer memory is shared outside this process; a zero-copy view is not safe",
            ));
        }
        if let Backing::Bytes(b) = &self._backing {
            self.check_range(off, len)?;
            return Ok(b.slice(off..off + len));
        }
        // Take the reader count (and dma-buf sync) through a lease, then keep it in the owner.
        let lease = self.read_lease(off, len)?;
        let ptr = lease.ptr;
        std::mem::forget(lease);
        Ok(Bytes::from_owner(ViewOwner {
            mem: Arc::clone(self),
            ptr,
            len,
        }))
    }
}

impl Memory {
    /// Pin `off..off+len` for device DMA (e.g. `VFIO_IOMMU_MAP_DMA`): the returned [`DmaPin`]
    /// keeps this memory mapped for as long as it lives and hands out the range's address as a
    /// raw pointer only. The range is widened to whole pages (it must start on a page and its
    /// page-rounded end must lie inside the memory).
    ///
    /// From now on a device may write the memory at any time, so zero-copy views are refused
    /// for good (as after [`Memory::export_fd`]); pinning is refused while a view or a lease is
    /// alive (it could not be kept honest), and for read-only memory (tensor storage, write-
    /// sealed or read-only imports), which a device must not be given for writing.
    pub fn dma_pin(self: &Arc<Self>, off: usize, len: usize) -> Result<DmaPin> {
        let page = page_size();
        if len == 0 {
            return Err(Error::arg("DMA pin: the range is empty"));
        }
        if !self.writable || self.kind == MemoryKind::Bytes {
            return Err(Error::arg(format!(
                "DMA pin: {:?} memory is read-only; a device may write DMA-mapped memory, so \
                 copy it into a writable buffer first",
                self.kind
            )));
        }
        let start = self.addr().checked_add(off);
        if !start.is_some_and(|a| a.is_multiple_of(page)) {
            return Err(Error::arg(format!(
                "DMA pin: range starts at {:#x}, not on a {page}-byte page",
                self.addr() as u128 + off as u128
            )));
        }
        let size = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::arg(format!("DMA pin: length {len} overflows")))?;
        self.check_range(off, size).map_err(|_| {
            Error::arg(format!(
                "DMA pin: {len} bytes at +{off} rounded up to whole pages ({size} bytes) run past \
                 the memory's {} bytes",
                self.len
            ))
        })?;
        {
            let mut s = self.lock();
            if s.readers > 0 || s.writers > 0 {
                return Err(busy(
                    "a tensor view or lease of it is alive; drop it before mapping it for DMA",
                ));
            }
            s.exported = true;
        }
        Ok(DmaPin {
            mem: Arc::clone(self),
            // SAFETY: off + size <= len was checked above, so the pointer stays inside the block.
            ptr: unsafe { self.ptr.as_ptr().add(off) },
            len: size,
        })
    }
}

/// A page-aligned range of [`Memory`] pinned for device DMA (see [`Memory::dma_pin`]).
///
/// It keeps the memory (and so its mapping) alive; its address is only ever given out as a raw
/// pointer, never as a slice, because a device may write the memory at any time. CPU access
/// goes through [`Memory`]'s copies and leases as before.
pub struct DmaPin {
    mem: Arc<Memory>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pin only carries a raw address and an `Arc<Memory>` (itself Send + Sync); it
// never dereferences the pointer.
unsafe impl Send for DmaPin {}
// SAFETY: as for Send.
unsafe impl Sync for DmaPin {}

impl DmaPin {
    /// Start of the pinned range (page-aligned). For the device's IOMMU mapping; never
    /// dereference it while a device may access the memory.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true (pins are at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// What backs the memory.
    pub fn kind(&self) -> MemoryKind {
        self.mem.kind
    }
    /// The backing fd (memfd or dma-buf), if any.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.mem.fd()
    }
}

impl std::fmt::Debug for DmaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DmaPin({:?} {} bytes at {:p})",
            self.mem.kind, self.len, self.ptr
        )
    }
}

fn sync_name(flags: u64) -> &'static str {
    match flags {
        0 => "START|NONE",
        1 => "START|READ",
        2 => "START|WRITE",
        3 => "START|RW",
        5 => "END|READ",
        6 => "END|WRITE",
        7 => "END|RW",
        _ => "?",
    }
}

/// A read lease: a raw pointer valid for reads for the lease's life.
pub struct ReadLease<'a> {
    mem: &'a Memory,
    ptr: *mut u8,
    len: usize,
}

impl ReadLease<'_> {
    /// Start of the leased range.
    pub fn ptr(&self) -> *const u8 {
        self.ptr
    }
    /// Length of the leased range.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn lease_range(len: usize, off: usize, n: usize) -> Result<()> {
    match off.checked_add(n) {
        Some(end) if end <= len => Ok(()),
        _ => Err(Error::arg(format!(
            "range {off}..{} is outside the {len} bytes being accessed",
            off as u128 + n as u128
        ))),
    }
}

impl ReadLease<'_> {
    /// Copy `dst.len()` bytes at `off` (relative to the lease) out.
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        lease_range(self.len, off, dst.len())?;
        // SAFETY: range checked against the lease, which is valid for reads while it lives;
        // `dst` is caller memory distinct from this never-exposed-as-slice mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

impl Drop for ReadLease<'_> {
    fn drop(&mut self) {
        end_read(self.mem);
    }
}

fn end_read(mem: &Memory) {
    let _ = mem.sync(DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ);
    let mut s = mem.lock();
    s.readers = s.readers.saturating_sub(1);
}

/// A write lease: a raw pointer valid for reads and writes, exclusively, for the lease's life.
pub struct WriteLease<'a> {
    mem: &'a Memory,
    ptr: *mut u8,
    len: usize,
}

impl WriteLease<'_> {
    /// Start of the leased range.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length of the leased range.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl WriteLease<'_> {
    /// The leased range as a mutable slice, for memory nobody outside this process can write
    /// (`Memory::can_view`); refused otherwise, so a `&mut [u8]` never aliases memory a
    /// device or another process may write (the DMA rule).
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        if !self.mem.can_view() {
            return Err(Error::arg(
                "buffer memory is shared outside this process; writing it in place is not safe",
            ));
        }
        if self.len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: `ptr..ptr+len` is inside the mapping (checked when the lease was taken) and
        // stays mapped while the lease borrows the `Memory`. The lease is exclusive (no other
        // lease or view of this memory exists while it lives), nobody outside the process can
        // write the memory (checked above), and the slice borrows `self` mutably, so it is the
        // only reference to these bytes for its whole life.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) })
    }

    /// Copy `dst.len()` bytes at `off` (relative to the lease) out.
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        lease_range(self.len, off, dst.len())?;
        // SAFETY: range checked; the exclusive lease is valid for reads.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    /// Copy `src` in at `off` (relative to the lease).
    pub fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        lease_range(self.len, off, src.len())?;
        // SAFETY: range checked; the exclusive lease is valid for writes and no view exists.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        Ok(())
    }
}

/// Copy `len` bytes from `src` at `src_off` to `dst` at `dst_off` (memory to memory, no
/// intermediate). Fails when the ranges are out of bounds or the same memory is busy.
pub fn copy(src: &Memory, src_off: usize, dst: &Memory, dst_off: usize, len: usize) -> Result<()> {
    let r = src.read_lease(src_off, len)?;
    let w = dst.write_lease(dst_off, len)?;
    // SAFETY: both ranges checked by the leases; the write lease is exclusive, so if `src`
    // and `dst` were the same memory the read lease above would have made it fail.
    unsafe { std::ptr::copy_nonoverlapping(r.ptr, w.ptr, len) };
    Ok(())
}

impl Drop for WriteLease<'_> {
    fn drop(&mut self) {
        let _ = self.mem.sync(DMA_BUF_SYNC_END | DMA_BUF_SYNC_RW);
        let mut s = self.mem.lock();
        s.writers = s.writers.saturating_sub(1);
    }
}

/// Owner behind a zero-copy view: keeps the memory alive and its reader count raised.
struct ViewOwner {
    mem: Arc<Memory>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the owner only reads, through a range that the reader count protects from writes.
unsafe impl Send for ViewOwner {}
// SAFETY: as for Send.
unsafe impl Sync for ViewOwner {}

impl AsRef<[u8]> for ViewOwner {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the range lies inside `mem`'s live mapping (checked when the lease was
        // taken; `mem` is kept alive by the Arc). While this owner exists the reader count is
        // raised, so `Memory` refuses every write path, and `view_bytes` only runs when no
        // one outside the process can write (fd never exported, or write-sealed).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for ViewOwner {
    fn drop(&mut self) {
        end_read(&self.mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_headers() {
        // Values printed by a C program including linux/dma-buf.h, dma-heap.h, udmabuf.h.
        assert_eq!(DMA_BUF_IOCTL_SYNC, 0x4008_6200);
        assert_eq!(DMA_HEAP_IOCTL_ALLOC, 0xc018_4800);
        assert_eq!(UDMABUF_CREATE, 0x4018_7542);
        assert_eq!(UDMABUF_CREATE_LIST, 0x4008_7543);
        assert_eq!(std::mem::offset_of!(DmaHeapAllocationData, fd), 8);
        assert_eq!(std::mem::offset_of!(DmaHeapAllocationData, fd_flags), 12);
        assert_eq!(std::mem::offset_of!(DmaHeapAllocationData, heap_flags), 16);
        assert_eq!(std::mem::offset_of!(UdmabufCreate, offset), 8);
        assert_eq!(std::mem::offset_of!(UdmabufCreate, size), 16);
    }

    #[test]
    fn memfd_is_sealed_and_page_rounded() {
        let m = Memory::memfd("t", 10, false).unwrap();
        assert_eq!(m.len() % page_size(), 0);
        assert_eq!(m.addr() % page_size(), 0);
        let seals = get_seals(m.fd().unwrap()).unwrap();
        assert_ne!(seals & F_SEAL_SHRINK, 0);
        assert_ne!(seals & F_SEAL_GROW, 0);
        assert_eq!(seals & F_SEAL_WRITE, 0);
        // Shrinking is refused by the seal.
        assert!(set_len(m.fd().unwrap(), 1).is_err());
    }

    #[test]
    fn view_blocks_writes_until_dropped() {
        let m = Arc::new(Memory::memfd("t", 4096, false).unwrap());
        m.write_at(0, &[1, 2, 3]).unwrap();
        let v = m.view_bytes(0, 3).unwrap();
        assert_eq!(&v[..], &[1, 2, 3]);
        let e = m.write_at(0, &[9]).unwrap_err().to_string();
        assert!(e.contains("busy"), "{e}");
        drop(v);
        m.write_at(0, &[9]).unwrap();
        let mut out = [0u8; 3];
        m.read_at(0, &mut out).unwrap();
        assert_eq!(out, [9, 2, 3]);
    }

    #[test]
    fn exported_memory_refuses_views() {
        let m = Arc::new(Memory::memfd("t", 4096, false).unwrap());
        let _fd = m.export_fd().unwrap();
        assert!(m.view_bytes(0, 4).is_err());
    }

    #[test]
    fn dma_buf_sync_on_a_non_dmabuf_fails_with_enotty() {
        let m = Memory::memfd("t", 4096, false).unwrap();
        let e = dma_buf_sync(m.fd().unwrap(), DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
    }

    #[test]
    fn dma_pin_rules() {
        let page = page_size();
        let m = Arc::new(Memory::memfd("t", 3 * page, false).unwrap());
        // a live view blocks pinning
        let v = m.view_bytes(0, 4).unwrap();
        assert!(m.dma_pin(0, page).unwrap_err().to_string().contains("busy"));
        drop(v);
        let p = m.dma_pin(page, 10).unwrap();
        assert_eq!(p.len(), page, "rounded up to a whole page");
        assert_eq!(p.ptr() as usize, m.addr() + page);
        assert_eq!(p.kind(), MemoryKind::Memfd);
        assert!(p.fd().is_some());
        // the device may write it now: zero-copy views are refused, copies still work
        assert!(!m.can_view());
        assert!(m.view_bytes(0, 4).is_err());
        m.write_at(page, &[7]).unwrap();
        assert!(m.dma_pin(1, 10).unwrap_err().to_string().contains("page"));
        assert!(
            m.dma_pin(2 * page, page + 1).is_err(),
            "past the end once rounded"
        );
        assert!(m.dma_pin(0, 0).is_err());
        assert!(m.dma_pin(usize::MAX - 1, 1).is_err());
        // the pin keeps the memory alive
        drop(m);
        assert_eq!(p.len(), page);
        let ro = Arc::new(Memory::from_bytes(Bytes::from(vec![0u8; 8192])));
        assert!(ro
            .dma_pin(0, 4096)
            .unwrap_err()
            .to_string()
            .contains("read-only"));
    }

    #[test]
    fn eventfd_signals() {
        let e = eventfd().unwrap();
        assert!(!poll_readable(e.as_fd(), 0).unwrap());
        eventfd_signal(e.as_fd()).unwrap();
        assert!(poll_readable(e.as_fd(), 0).unwrap());
    }
}
