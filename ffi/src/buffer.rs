//! `edgehal_buffer`: tensor memory the caller binds as a session input or output.
//!
//! A buffer is a dtype, a shape and a byte range. The range is caller memory used in place
//! (`edgehal_buffer_wrap`: no copy, the caller keeps it alive), a range of a memfd or dma-buf
//! the caller hands over by fd (`edgehal_buffer_import_fd`: mapped through the HAL's
//! [`edgehal_core::buffer::Buffer`], no copy), or memory libedgehal allocated
//! (`edgehal_buffer_create`, `edgehal_buffer_copy`, and outputs that a run allocates).
//! Inputs are read straight from the range (the tensor handed to the executor points into it);
//! a bound output is computed straight into its range when the op producing it can (Gemm,
//! MatMul), otherwise copied in once, which the session's copy counter records.

use std::alloc::Layout;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use edgehal_core::tensor::checked_numel;
use edgehal_core::{DType, Tensor};

use crate::handle::{lookup, register, unregister};
use crate::status::*;
use crate::types::*;

/// Alignment of memory that libedgehal allocates for buffers (a cache line; enough for any
/// SIMD load the kernels do).
const ALIGN: usize = 64;

/// Opaque handle to a tensor buffer. Created by `edgehal_buffer_wrap`, `edgehal_buffer_copy`,
/// `edgehal_buffer_create` or by `edgehal_session_run` for outputs it allocates; released with
/// `edgehal_buffer_release`.
pub struct edgehal_buffer {
    _private: [u8; 0],
}

pub(crate) struct Buffer {
    ptr: NonNull<u8>,
    cap: usize,
    /// Set when libedgehal allocated the memory (and frees it on drop).
    owned: Option<Layout>,
    dtype: DType,
    shape: Mutex<Vec<usize>>,
    /// False for read-only memory (an fd imported read-only): never written, never an output.
    writable: bool,
    /// For fd imports: the HAL buffer that owns the mapping and the duplicated fd; `ptr` points
    /// into it. Runs hold a lease on it (dma-bufs are synced around CPU access).
    mapping: Option<edgehal_core::buffer::Buffer>,
}

/// A HAL lease held while a run uses an fd-backed buffer.
pub(crate) enum RunLease<'a> {
    Read(#[allow(dead_code)] edgehal_core::sys::mem::ReadLease<'a>),
    Write(#[allow(dead_code)] edgehal_core::sys::mem::WriteLease<'a>),
}

// SAFETY: `Buffer` is a pointer, a length and plain data. The memory it points to is either owned
// by this value (freed only in `Drop`) or lent by the caller under the contract documented on
// `edgehal_buffer_wrap` (alive and not written by the caller while a run uses it). The shape is
// behind a mutex. Nothing in it is tied to the creating thread.
unsafe impl Send for Buffer {}
// SAFETY: shared access only reads `ptr`/`cap`/`dtype` (immutable after creation) and locks
// `shape`; writes into the memory happen in `write_output`, which the API contract serialises
// (one run at a time may use a buffer as an output).
unsafe impl Sync for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(layout) = self.owned {
            // SAFETY: `ptr` was returned by `std::alloc::alloc_zeroed(layout)` in `allocate` and
            // is freed only here, once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

/// Keeps a buffer alive inside [`Bytes`] while a tensor reads it in place.
struct InPlace {
    buf: Arc<Buffer>,
    len: usize,
}

impl AsRef<[u8]> for InPlace {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len <= buf.cap` (checked in `Buffer::tensor`). The memory is alive: owned
        // memory lives as long as `buf`, which this value holds; caller memory is alive while
        // its buffer is used by a run, which is the contract of `edgehal_buffer_wrap`, and the
        // caller does not write it during the run (same contract), so the shared slice is sound.
        unsafe { std::slice::from_raw_parts(self.buf.ptr.as_ptr(), self.len) }
    }
}

impl Buffer {
    fn allocate(dtype: DType, shape: Vec<usize>) -> FfiResult<Buffer> {
        let n = checked_numel(&shape, dtype)?;
        let bytes = n * dtype.size();
        let (ptr, owned) = if bytes == 0 {
            (NonNull::dangling(), None)
        } else {
            let layout = Layout::from_size_align(bytes, ALIGN)
                .map_err(|e| Fail::new(EDGEHAL_ERR_TOO_LARGE, format!("buffer: {e}")))?;
            // SAFETY: `layout` has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            let p = NonNull::new(p).ok_or_else(|| {
                Fail::new(
                    EDGEHAL_ERR_SYSTEM,
                    format!("buffer: out of memory allocating {bytes} bytes"),
                )
            })?;
            (p, Some(layout))
        };
        Ok(Buffer {
            ptr,
            cap: bytes,
            owned,
            dtype,
            shape: Mutex::new(shape),
            writable: true,
            mapping: None,
        })
    }

    /// Start of the memory (for overlap checks and in-place outputs).
    pub(crate) fn range(&self) -> std::ops::Range<usize> {
        let start = self.ptr.as_ptr() as usize;
        start..start.saturating_add(self.cap)
    }

    /// True when runs may write the buffer.
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// For fd imports, the HAL lease a run holds while it uses the buffer (dma-buf sync START
    /// now, END when dropped); `None` for plain memory.
    pub(crate) fn run_lease(&self, write: bool) -> Option<FfiResult<RunLease<'_>>> {
        let m = self.mapping.as_ref()?;
        Some(if write && self.writable {
            m.write_lease().map(RunLease::Write).map_err(Fail::from)
        } else {
            m.read_lease().map(RunLease::Read).map_err(Fail::from)
        })
    }

    /// The whole memory as a mutable slice, for computing an output in place.
    ///
    /// # Safety
    /// For the slice's life nothing else may read or write this memory: no input of the same
    /// run overlaps it (the caller checks ranges), no other run uses the buffer (API contract
    /// of `edgehal_session_run`), and the application does not touch it (wrap/import contract).
    // The memory is not part of `self` (it is behind a raw pointer); exclusivity is the
    // caller's obligation, stated above.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn as_mut_bytes(&self) -> Option<&mut [u8]> {
        if !self.writable || self.cap == 0 {
            return None;
        }
        // SAFETY: `ptr..ptr+cap` is memory this buffer owns or borrows for its life (owned
        // allocation, wrapped caller memory, or an fd mapping kept by `mapping`); exclusivity
        // is the caller's obligation stated above.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) })
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn shape(&self) -> Vec<usize> {
        self.shape.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A tensor over the buffer's memory (no copy) with the buffer's current shape.
    pub(crate) fn tensor(self: &Arc<Self>) -> FfiResult<Tensor> {
        let shape = self.shape();
        let len = checked_numel(&shape, self.dtype)? * self.dtype.size();
        if len > self.cap {
            return Err(Fail::new(
                EDGEHAL_ERR_BUFFER_TOO_SMALL,
                format!(
                    "buffer holds {} bytes, shape {shape:?} needs {len}",
                    self.cap
                ),
            ));
        }
        let data = Bytes::from_owner(InPlace {
            buf: Arc::clone(self),
            len,
        });
        Ok(Tensor::from_bytes(self.dtype, shape, data)?)
    }

    /// Take `shape` as the buffer's shape (after an output was computed in place).
    pub(crate) fn set_shape(&self, shape: Vec<usize>) {
        *self.shape.lock().unwrap_or_else(|e| e.into_inner()) = shape;
    }

    /// Copy `t` into the buffer and take its shape. `what` names the output for messages.
    pub(crate) fn write_output(&self, t: &Tensor, what: &str) -> FfiResult {
        if !self.writable {
            return Err(Fail::arg(format!(
                "{what}: the buffer bound to it is read-only (imported from a read-only fd)"
            )));
        }
        if t.dtype() != self.dtype {
            return Err(Fail::new(
                EDGEHAL_ERR_DTYPE_MISMATCH,
                format!(
                    "{what} is {}, the buffer bound to it is {}",
                    t.dtype(),
                    self.dtype
                ),
            ));
        }
        let src = t.bytes();
        if src.len() > self.cap {
            return Err(Fail::new(
                EDGEHAL_ERR_BUFFER_TOO_SMALL,
                format!(
                    "{what} ({} {:?}) needs {} bytes, the buffer bound to it holds {}",
                    t.dtype(),
                    t.shape(),
                    src.len(),
                    self.cap
                ),
            ));
        }
        // SAFETY: `src.len() <= cap`, so the destination range is inside the buffer's memory,
        // which is alive (owned, or caller memory under the wrap contract). `ptr::copy` allows
        // the ranges to overlap (an output may alias an input bound to the same buffer).
        unsafe { std::ptr::copy(src.as_ptr(), self.ptr.as_ptr(), src.len()) };
        *self.shape.lock().unwrap_or_else(|e| e.into_inner()) = t.shape().to_vec();
        Ok(())
    }

    /// A new libedgehal-owned buffer holding a copy of `t`.
    pub(crate) fn from_tensor(t: &Tensor) -> FfiResult<Buffer> {
        let b = Buffer::allocate(t.dtype(), t.shape().to_vec())?;
        b.write_output(t, "output")?;
        Ok(b)
    }
}

/// Read a caller's (shape, rank) pair.
///
/// # Safety
/// `shape` must point to `rank` readable `int64_t` values when `rank > 0`.
unsafe fn read_shape(shape: *const i64, rank: usize) -> FfiResult<Vec<usize>> {
    if rank > EDGEHAL_MAX_RANK {
        return Err(Fail::new(
            EDGEHAL_ERR_SIZE_MISMATCH,
            format!("rank {rank} is over EDGEHAL_MAX_RANK ({EDGEHAL_MAX_RANK})"),
        ));
    }
    if rank == 0 {
        return Ok(Vec::new());
    }
    if shape.is_null() {
        return Err(Fail::null("shape"));
    }
    // SAFETY: the caller promises `rank` readable values at `shape` (checked non-NULL above).
    let dims = unsafe { std::slice::from_raw_parts(shape, rank) };
    dims.iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| Fail::arg(format!("shape {dims:?} has a negative dimension")))
        })
        .collect()
}

fn put<T>(out: *mut *mut T, v: *mut T) {
    // SAFETY: every caller checked `out` is non-NULL; the header says it must be writable.
    unsafe { out.write(v) }
}

/// Create a buffer over caller memory WITHOUT copying it (zero-copy input or output).
///
/// `data` points to `size` bytes holding (or receiving) a tensor of element type `dtype` and
/// shape `shape[0..rank]`; `size` must be at least the tensor's byte size (elements x
/// `edgehal_dtype_size(dtype)`). The memory needs no particular alignment, though 64-byte
/// aligned memory avoids internal copies in some kernels.
///
/// Ownership and lifetime contract: the memory stays the caller's. It must stay valid until the
/// buffer is released AND every run or submit that uses the buffer has completed (a submitted
/// job keeps its buffers alive past their release); the caller must not write it while such a
/// run is in flight, nor read it as an output before the run completes (as an input it is read
/// in place; as an output libedgehal writes it during the run, in place when the producing op
/// can, or at its end). libedgehal never frees it. On success `*out` receives a new handle to release
/// with `edgehal_buffer_release`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT` (data, out, or shape with rank > 0),
/// `EDGEHAL_ERR_INVALID_ARGUMENT` (unknown dtype, negative dimension),
/// `EDGEHAL_ERR_SIZE_MISMATCH` (rank > EDGEHAL_MAX_RANK), `EDGEHAL_ERR_BUFFER_TOO_SMALL`
/// (size below the tensor's byte size), `EDGEHAL_ERR_TOO_LARGE`.
///
/// Threading: any thread.
///
/// # Safety
/// `data` must point to `size` bytes that follow the contract above; `shape` must point to
/// `rank` values; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_buffer_wrap(
    data: *mut c_void,
    size: usize,
    dtype: edgehal_dtype,
    shape: *const i64,
    rank: usize,
    out: *mut *mut edgehal_buffer,
) -> edgehal_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let ptr = NonNull::new(data.cast::<u8>()).ok_or_else(|| Fail::null("data"))?;
        let dtype = dtype_from_code(dtype)?;
        // SAFETY: forwarded caller contract on `shape`/`rank`.
        let shape = unsafe { read_shape(shape, rank) }?;
        let need = checked_numel(&shape, dtype)? * dtype.size();
        if size < need {
            return Err(Fail::new(
                EDGEHAL_ERR_BUFFER_TOO_SMALL,
                format!("{size} bytes given, {dtype} {shape:?} needs {need}"),
            ));
        }
        let b = Buffer {
            ptr,
            cap: size,
            owned: None,
            dtype,
            shape: Mutex::new(shape),
            writable: true,
            mapping: None,
        };
        put(out, register(Arc::new(b)));
        Ok(())
    })
}

/// What kind of file descriptor `edgehal_buffer_import_fd` takes.
pub type edgehal_fd_kind = i32;
/// A memfd (`memfd_create`): host memory shareable between processes.
pub const EDGEHAL_FD_MEMFD: edgehal_fd_kind = 1;
/// A dma-buf (from a `/dev/dma_heap` heap, `/dev/udmabuf`, a camera, a GPU or a video decoder).
pub const EDGEHAL_FD_DMABUF: edgehal_fd_kind = 2;

/// Create a buffer over `length` bytes at `offset` of a memfd or dma-buf WITHOUT copying
/// (zero-copy input or output): the memory is mapped shared, so the process that owns the fd
/// sees outputs and supplies inputs in place.
///
/// Ownership: `fd` is borrowed. libedgehal duplicates it (close-on-exec) and keeps the
/// duplicate and the mapping until the buffer is released and no run uses it; the caller may
/// close its own `fd` right after this returns. `kind` must say what the fd is
/// (`EDGEHAL_FD_MEMFD` or `EDGEHAL_FD_DMABUF`); the fd is checked to be one. An fd opened
/// read-only gives a read-only buffer (an input only). Dma-bufs are synced
/// (`DMA_BUF_IOCTL_SYNC`) around each run that uses them.
///
/// Contract, as for `edgehal_buffer_wrap`: no one (this process, another process, a device)
/// writes the range while a run that uses the buffer is in flight, nor reads an output range
/// before the run completes.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT` (out, or shape with rank > 0),
/// `EDGEHAL_ERR_INVALID_ARGUMENT` (negative or closed fd, an fd that is not of `kind`, unknown
/// kind or dtype, negative dimension, `offset + length` past the end of the fd's memory),
/// `EDGEHAL_ERR_SIZE_MISMATCH` (rank > EDGEHAL_MAX_RANK), `EDGEHAL_ERR_BUFFER_TOO_SMALL`
/// (`length` below the tensor's byte size), `EDGEHAL_ERR_IO` (mapping failed),
/// `EDGEHAL_ERR_TOO_LARGE`.
///
/// Threading: any thread.
///
/// # Safety
/// `shape` must point to `rank` values; `out` must be writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn edgehal_buffer_import_fd(
    fd: i32,
    kind: edgehal_fd_kind,
    offset: u64,
    length: usize,
    dtype: edgehal_dtype,
    shape: *const i64,
    rank: usize,
    out: *mut *mut edgehal_buffer,
) -> edgehal_status {
    guard(|| {
        use std::os::fd::{FromRawFd, OwnedFd};
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        if fd < 0 {
            return Err(Fail::arg(format!("fd {fd} is negative")));
        }
        if kind != EDGEHAL_FD_MEMFD && kind != EDGEHAL_FD_DMABUF {
            return Err(Fail::arg(format!(
                "fd kind {kind} is neither EDGEHAL_FD_MEMFD (1) nor EDGEHAL_FD_DMABUF (2)"
            )));
        }
        let dtype = dtype_from_code(dtype)?;
        // SAFETY: forwarded caller contract on `shape`/`rank`.
        let shape = unsafe { read_shape(shape, rank) }?;
        let need = checked_numel(&shape, dtype)? * dtype.size();
        if length < need {
            return Err(Fail::new(
                EDGEHAL_ERR_BUFFER_TOO_SMALL,
                format!("{length} bytes given, {dtype} {shape:?} needs {need}"),
            ));
        }
        let offset = usize::try_from(offset)
            .map_err(|_| Fail::arg(format!("offset {offset} is out of range")))?;
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on any integer is sound: an fd that is not open fails
        // with EBADF and creates nothing.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Fail::arg(format!("fd {fd} cannot be duplicated: {e}")));
        }
        // SAFETY: `dup` is a new descriptor this function owns (nothing else refers to it).
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let counter = edgehal_core::buffer::CopyCounter::new();
        let whole = if kind == EDGEHAL_FD_MEMFD {
            edgehal_core::buffer::Buffer::import_memfd(owned, &counter)
        } else {
            edgehal_core::buffer::Buffer::import_dmabuf(owned, &counter)
        }
        .map_err(|e| Fail::arg(format!("fd {fd}: {e}")))?;
        let end = offset.checked_add(length).filter(|&e| e <= whole.len());
        let Some(end) = end else {
            return Err(Fail::arg(format!(
                "fd {fd}: offset {offset} + length {length} is past the end of its {} bytes",
                whole.len()
            )));
        };
        let view = whole.view(offset..end)?;
        let writable = view.is_writable();
        let p = if writable {
            view.write_lease()?.ptr()
        } else {
            view.read_lease()?.ptr().cast_mut()
        };
        let ptr = NonNull::new(p).unwrap_or(NonNull::dangling());
        let b = Buffer {
            ptr,
            cap: length,
            owned: None,
            dtype,
            shape: Mutex::new(shape),
            writable,
            mapping: Some(view),
        };
        put(out, register(Arc::new(b)));
        Ok(())
    })
}

/// Create a buffer holding a copy of `size` bytes at `data` (the caller may free its memory as
/// soon as this returns). `size` must equal the tensor's byte size exactly.
///
/// Errors: as `edgehal_buffer_wrap`, plus `EDGEHAL_ERR_SIZE_MISMATCH` when `size` differs from
/// the tensor's byte size.
///
/// Threading: any thread.
///
/// # Safety
/// `data` must point to `size` readable bytes; `shape` to `rank` values; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_buffer_copy(
    data: *const c_void,
    size: usize,
    dtype: edgehal_dtype,
    shape: *const i64,
    rank: usize,
    out: *mut *mut edgehal_buffer,
) -> edgehal_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        if data.is_null() {
            return Err(Fail::null("data"));
        }
        let dtype = dtype_from_code(dtype)?;
        // SAFETY: forwarded caller contract on `shape`/`rank`.
        let shape = unsafe { read_shape(shape, rank) }?;
        let b = Buffer::allocate(dtype, shape)?;
        if size != b.cap {
            return Err(Fail::new(
                EDGEHAL_ERR_SIZE_MISMATCH,
                format!(
                    "{size} bytes given, {dtype} {:?} is {} bytes",
                    b.shape(),
                    b.cap
                ),
            ));
        }
        // SAFETY: `data` has `size` readable bytes (caller contract) and `b` owns `size` fresh
        // bytes; the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.cast::<u8>(), b.ptr.as_ptr(), size) };
        put(out, register(Arc::new(b)));
        Ok(())
    })
}

/// Create a zero-filled buffer owned by libedgehal for a tensor of `dtype` and `shape`. Write
/// inputs into it (or read outputs from it) through `edgehal_buffer_data`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_ARGUMENT`,
/// `EDGEHAL_ERR_SIZE_MISMATCH` (rank), `EDGEHAL_ERR_TOO_LARGE`, `EDGEHAL_ERR_SYSTEM` (out of
/// memory).
///
/// Threading: any thread.
///
/// # Safety
/// `shape` must point to `rank` values; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_buffer_create(
    dtype: edgehal_dtype,
    shape: *const i64,
    rank: usize,
    out: *mut *mut edgehal_buffer,
) -> edgehal_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let dtype = dtype_from_code(dtype)?;
        // SAFETY: forwarded caller contract on `shape`/`rank`.
        let shape = unsafe { read_shape(shape, rank) }?;
        put(out, register(Arc::new(Buffer::allocate(dtype, shape)?)));
        Ok(())
    })
}

/// Release a buffer. NULL is a no-op. Memory libedgehal allocated is freed once no submitted
/// job uses it any more; wrapped caller memory is never freed by libedgehal.
///
/// Errors: `EDGEHAL_ERR_INVALID_HANDLE` when `buffer` is not a live buffer (e.g. released
/// twice: detected, nothing happens). Any other use of a released handle is undefined.
///
/// Threading: any thread, also while another thread uses the buffer (that use keeps it alive).
///
/// # Safety
/// `buffer` must be NULL or a handle from libedgehal.
#[no_mangle]
pub unsafe extern "C" fn edgehal_buffer_release(buffer: *mut edgehal_buffer) -> edgehal_status {
    guard(|| unregister::<Buffer, _>(buffer, "buffer").map(drop))
}

/// Get the buffer's memory: `*data` receives its address and `*size` its size in bytes (the
/// capacity; for outputs possibly more than the current tensor). The memory belongs to the
/// buffer: valid until it is released; write it only while no run uses the buffer.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread.
///
/// # Safety
/// `data` and `size` must be writable (either may be NULL to skip it).
#[no_mangle]
pub unsafe extern "C" fn edgehal_buffer_data(
    buffer: *const edgehal_buffer,
    data: *mut *mut c_void,
    size: *mut usize,
) -> edgehal_status {
    guard(|| {
        let b = lookup::<Buffer, _>(buffer, "buffer")?;
        if !data.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { data.write(b.ptr.as_ptr().cast()) };
        }
        if !size.is_null() {
            // SAFETY: as above.
            unsafe { size.write(b.cap) };
        }
        Ok(())
    })
}

/// Get the buffer's element type.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread.
///
/// # Safety
/// `dtype` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_buffer_dtype(
    buffer: *const edgehal_buffer,
    dtype: *mut edgehal_dtype,
) -> edgehal_status {
    guard(|| {
        let b = lookup::<Buffer, _>(buffer, "buffer")?;
        if dtype.is_null() {
            return Err(Fail::null("dtype"));
        }
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { dtype.write(b.dtype.onnx_code()) };
        Ok(())
    })
}

/// Get the buffer's current shape (after a run, an output buffer has the output's shape).
/// `*rank` receives the number of dimensions; up to `capacity` of them are written to `dims`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT` (`rank`, or `dims` with capacity > 0),
/// `EDGEHAL_ERR_INVALID_HANDLE`, `EDGEHAL_ERR_BUFFER_TOO_SMALL` when `capacity` is below the
/// rank (`*rank` is still set, so call again with enough room; EDGEHAL_MAX_RANK always is).
///
/// Threading: any thread.
///
/// # Safety
/// `dims` must have room for `capacity` values; `rank` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_buffer_shape(
    buffer: *const edgehal_buffer,
    dims: *mut i64,
    capacity: usize,
    rank: *mut usize,
) -> edgehal_status {
    guard(|| {
        let b = lookup::<Buffer, _>(buffer, "buffer")?;
        if rank.is_null() {
            return Err(Fail::null("rank"));
        }
        let shape = b.shape();
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { rank.write(shape.len()) };
        if capacity < shape.len() {
            return Err(Fail::new(
                EDGEHAL_ERR_BUFFER_TOO_SMALL,
                format!("shape has {} dims, room for {capacity}", shape.len()),
            ));
        }
        if shape.is_empty() {
            return Ok(());
        }
        if dims.is_null() {
            return Err(Fail::null("dims"));
        }
        for (i, &d) in shape.iter().enumerate() {
            // SAFETY: `i < shape.len() <= capacity`, and `dims` has room for `capacity` values.
            unsafe { dims.add(i).write(d as i64) };
        }
        Ok(())
    })
}
