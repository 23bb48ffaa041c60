//! Buffer reuse across runs and the per-run settings ops read (thread count).
//!
//! Each [`crate::Executor`] owns a [`Pool`] of freed f32 buffers. While it runs, the
//! pool and the thread count are installed on the running thread ([`RunScope`]); ops then take
//! their output and scratch buffers with [`take_zeroed`] / [`take_any`] and wrap results with
//! [`f32_tensor`]. Such a tensor's storage is owned by a [`Pooled`] buffer: when the last
//! reference to it goes away (the executor releases the value after its last consumer, or the
//! caller drops a returned output) the buffer goes back to the pool, and the next request it
//! can hold takes it again instead of asking the allocator for zeroed memory.
//!
//! The pool hands out the most recently freed buffer that fits (capacity at least the request
//! and at most twice it), as the allocator itself would, so a layer's output usually lands in
//! the memory its input was just read from, still in cache. What it saves is `calloc`'s
//! zeroing: one serial pass over every output, which a second thread cannot share (measured
//! about 11% of the calling thread's time at two threads on MobileNetV2); by exact length, the
//! reused buffers were cold (last used a whole run earlier) and one thread lost 3-4%.
//!
//! Safety of reuse follows from ownership: a buffer is only back in the pool once no `Bytes`
//! refers to it, so an output handed to the caller is never reused while the caller holds it,
//! and values whose lifetimes overlap never share memory. Runs of a graph with fixed shapes ask
//! for the same lengths every time, so after the first run little is allocated.
//! Off a running executor (no scope installed), the functions fall back to plain vectors.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use edgehal_core::{DType, Result, Tensor};

/// Most bytes a pool keeps in its free lists; buffers beyond it are freed.
const MAX_POOLED_BYTES: usize = 1 << 30;

/// Free f32 buffers, most recently freed last.
#[derive(Default)]
pub struct Pool {
    inner: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    free: Vec<Vec<f32>>,
    /// Bytes of the free buffers' capacities.
    bytes: usize,
}

/// Most buffers a pool keeps; the oldest goes first.
const MAX_POOLED: usize = 256;

impl Pool {
    /// The most recently freed buffer whose capacity holds `n` elements without wasting more
    /// than as many again, at length `n`: elements past its previous length are zeroed, the
    /// rest keep unspecified (initialized) values.
    fn take(&self, n: usize) -> Option<Vec<f32>> {
        if n == 0 {
            return None;
        }
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let i = p
            .free
            .iter()
            .rposition(|v| v.capacity() >= n && v.capacity() / 2 <= n)?;
        let mut v = p.free.remove(i);
        p.bytes -= v.capacity() * 4;
        drop(p);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        Some(v)
    }

    /// Keep `v` for a later [`Pool::take`] (dropped when the pool is full).
    fn give(&self, v: Vec<f32>) {
        let bytes = v.capacity() * 4;
        if v.is_empty() {
            return;
        }
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if p.bytes + bytes > MAX_POOLED_BYTES {
            return;
        }
        if p.free.len() == MAX_POOLED {
            let old = p.free.remove(0);
            p.bytes -= old.capacity() * 4;
        }
        p.bytes += bytes;
        p.free.push(v);
    }

    /// Bytes currently held in the free lists.
    pub fn pooled_bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

/// The storage of a pooled tensor: returns its buffer to the pool when dropped. `bytes` of
/// the buffer are the tensor's (all of it for f32; an 8-bit tensor's count otherwise).
struct Pooled {
    v: Vec<f32>,
    bytes: usize,
    pool: Weak<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.v)[..self.bytes]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(p) = self.pool.upgrade() {
            p.give(std::mem::take(&mut self.v));
        }
    }
}

#[derive(Clone)]
struct Current {
    pool: Option<Arc<Pool>>,
    threads: usize,
}

thread_local! {
    static CURRENT: RefCell<Current> = const {
        RefCell::new(Current { pool: None, threads: 1 })
    };
}

/// Installs a pool and a thread count on this thread until dropped (then restores what was
/// there, so nested executors, e.g. Loop bodies, work).
pub struct RunScope {
    prev: Option<Current>,
}

impl RunScope {
    /// Install `pool` and `threads` for the ops run on this thread.
    pub fn enter(pool: Option<&Arc<Pool>>, threads: usize) -> RunScope {
        let prev = CURRENT.with(|c| {
            c.replace(Current {
                pool: pool.cloned(),
                threads: threads.max(1),
            })
        });
        RunScope { prev: Some(prev) }
    }
}

impl Drop for RunScope {
    fn drop(&mut self) {
        if let Some(p) = self.prev.take() {
            CURRENT.with(|c| *c.borrow_mut() = p);
        }
    }
}

/// Threads the running executor lets ops use (1 off an executor).
pub fn threads() -> usize {
    CURRENT.with(|c| c.borrow().threads)
}

/// Whether executors pool their buffers: on by default, `EDGEHAL_POOL=0` turns it off.
pub fn pooling_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGEHAL_POOL").map_or(true, |v| v != "0"))
}

fn current_pool() -> Option<Arc<Pool>> {
    CURRENT.with(|c| c.borrow().pool.clone())
}

/// `n` f32 values, all zero: a pooled buffer cleared, or a fresh one.
pub fn take_zeroed(n: usize) -> Vec<f32> {
    match current_pool().and_then(|p| p.take(n)) {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => vec![0f32; n],
    }
}

/// `n` f32 values with unspecified (but initialized) contents, for callers that overwrite
/// every element. In this crate's unit tests every buffer comes filled with a NaN whose bytes
/// (`a5 a5 c0 7f`) are no plausible 8-bit result either, so an element a kernel leaves
/// unwritten shows up in the comparison with the reference.
pub fn take_any(n: usize) -> Vec<f32> {
    #[allow(unused_mut)]
    let mut v = current_pool()
        .and_then(|p| p.take(n))
        .unwrap_or_else(|| vec![0f32; n]);
    #[cfg(test)]
    v.fill(f32::from_bits(0x7fc0_a5a5));
    v
}

/// `n` bytes with unspecified (but initialized) contents, from the same pool as the f32
/// buffers, for an 8-bit op that overwrites every element: its output then costs neither an
/// allocation nor a memset per run (the zeroed `vec![0u8; n]` of every int8 layer was 4% of a
/// quantized MobileNet).
pub struct ByteBuf {
    v: Vec<f32>,
    n: usize,
}

impl std::ops::Deref for ByteBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.v)[..self.n]
    }
}

impl std::ops::DerefMut for ByteBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.v)[..self.n]
    }
}

/// A [`ByteBuf`] of `n` bytes.
pub fn take_bytes(n: usize) -> ByteBuf {
    ByteBuf {
        v: take_any(n.div_ceil(4)),
        n,
    }
}

/// A tensor of a one-byte `dtype` over `b` (its buffer returns to the pool like
/// [`f32_tensor`]'s).
pub fn bytes_tensor(dtype: DType, shape: Vec<usize>, b: ByteBuf) -> Result<Tensor> {
    if dtype.size() != 1 {
        return Err(edgehal_core::Error::arg(format!(
            "a byte buffer cannot hold {dtype} elements"
        )));
    }
    let owner = Pooled {
        bytes: b.n,
        v: b.v,
        pool: current_pool().map_or_else(Weak::new, |p| Arc::downgrade(&p)),
    };
    Tensor::from_bytes(dtype, shape, Bytes::from_owner(owner))
}

/// Gives a scratch buffer back to the running executor's pool (freed when there is none).
pub fn recycle(v: Vec<f32>) {
    if let Some(p) = current_pool() {
        p.give(v);
    }
}

/// An f32 tensor over `v`; its buffer returns to the running executor's pool when the last
/// reference to the tensor's storage is dropped.
pub fn f32_tensor(shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor> {
    match current_pool() {
        Some(p) => {
            let n = v.len();
            edgehal_core::tensor::checked_numel(&shape, DType::F32).and_then(|want| {
                if want != n {
                    return Err(edgehal_core::Error::arg(format!(
                        "shape {shape:?} needs {want} elements, got {n}"
                    )));
                }
                Ok(())
            })?;
            let owner = Pooled {
                bytes: 4 * v.len(),
                v,
                pool: Arc::downgrade(&p),
            };
            Tensor::from_bytes(DType::F32, shape, Bytes::from_owner(owner))
        }
        None => Tensor::from_vec(shape, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_only_when_unreferenced() {
        let pool = Arc::new(Pool::default());
        let _s = RunScope::enter(Some(&pool), 2);
        assert_eq!(threads(), 2);
        let a = f32_tensor(vec![2, 3], take_zeroed(6)).unwrap();
        let a2 = a.clone();
        let ptr = a.bytes().as_ptr();
        drop(a);
        assert_eq!(pool.pooled_bytes(), 0, "a clone still holds the buffer");
        // A new buffer of the same size must not alias the live one.
        let mut b = take_any(6);
        assert_ne!(b.as_ptr() as *const u8, ptr);
        b.fill(7.0);
        assert_eq!(a2.to_f32().as_ref(), &[0.0; 6]);
        drop(a2);
        assert_eq!(pool.pooled_bytes(), 24);
        let c = take_zeroed(6);
        assert_eq!(c.as_ptr() as *const u8, ptr, "the freed buffer is reused");
        assert_eq!(c, vec![0.0; 6], "and cleared");
        assert_eq!(pool.pooled_bytes(), 0);
        assert!(f32_tensor(vec![5], take_any(6)).is_err());
    }

    /// The most recently freed buffer that fits is reused, one more than twice the request is
    /// not; growing within the capacity zeroes only the new elements.
    #[test]
    fn the_most_recent_fitting_buffer_is_reused() {
        let pool = Pool::default();
        let a = vec![1.0f32; 100];
        let b = vec![2.0f32; 60];
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        pool.give(a);
        pool.give(b);
        assert_eq!(pool.pooled_bytes(), 640);
        assert!(pool.take(29).is_none(), "60 is more than twice 29, 100 too");
        let c = pool.take(50).unwrap();
        assert_eq!((c.as_ptr(), c.len()), (pb, 50), "the later one");
        let d = pool.take(50).unwrap();
        assert_eq!((d.as_ptr(), d.len()), (pa, 50));
        assert!(pool.take(50).is_none());
        assert_eq!(pool.pooled_bytes(), 0);
        pool.give(d);
        let e = pool.take(70).unwrap();
        assert_eq!(e.as_ptr(), pa);
        assert_eq!(&e[..50], &[1.0; 50][..], "kept values");
        assert_eq!(&e[50..], &[0.0; 20][..], "the grown part is zeroed");
    }

    #[test]
    fn no_scope_means_plain_vectors_and_one_thread() {
        assert_eq!(threads(), 1);
        let t = f32_tensor(vec![2], take_zeroed(2)).unwrap();
        assert_eq!(t.to_f32().as_ref(), &[0.0, 0.0]);
        {
            let pool = Arc::new(Pool::default());
            let _s = RunScope::enter(Some(&pool), 3);
            {
                let _t = RunScope::enter(None, 1);
                assert_eq!(threads(), 1);
            }
            assert_eq!(threads(), 3, "the outer scope is restored");
        }
        assert_eq!(threads(), 1);
    }
}
