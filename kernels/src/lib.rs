//! edgehal-kernels: CPU compute kernels on plain slices.
//!
//! - Kernels know nothing of graphs or tensors: slices, sizes and strides in, slices out. The
//!   CPU driver maps ops onto them.
//! - Every kernel has a portable reference; SIMD variants are picked at run time and tested
//!   against the reference.

#![forbid(unsafe_code)]

pub mod gemm;
