//! Slice-wise exp, sigmoid and tanh that vectorize; they live in `edgehal_kernels::vmath`
//! (the fused LSTM cell there uses the same scalar forms under wider SIMD).

pub use edgehal_kernels::vmath::{exp_inplace, sigmoid_inplace, tanh_inplace};
