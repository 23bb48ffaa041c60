//! edgehal-kernels: CPU compute kernels on plain slices.
//!
//! - Kernels know nothing of graphs or tensors: slices, sizes and strides in, slices out. The
//!   CPU driver maps ops onto them.
//! - Every kernel has a portable reference; SIMD variants are picked at run time (once per
//!   process, see [`dispatch`]) and tested against the reference.
//! - `unsafe` is allowed only in `arch/` and `simd.rs` (intrinsics and `#[target_feature]`
//!   entry points), `pool.rs` (the worker pool hands a lifetime-erased job to its threads) and
//!   `alloc.rs` (a global allocator that puts large blocks on a cache line); everything else is
//!   safe Rust.

#![deny(unsafe_code)]

pub mod aligned;
pub mod alloc;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod arch;
pub mod conv;
pub mod dispatch;
pub mod gemm;
pub mod gemv;
pub mod nhwc;
pub mod packed;
#[allow(unsafe_code)]
pub mod pool;
pub mod qconv;
pub mod qgemm;
pub mod rnn;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod vmath;

pub use dispatch::dispatch_summary;
