//! edgehal-cpu: the CPU device.
//!
//! - [`ops`] holds one function per ONNX op (the reference semantics every other device is
//!   checked against), registered by op type in a [`ops::Registry`].
//! - [`exec`] runs a whole graph: values live in slots planned once per session; a value's slot
//!   is released after its last use.

#![forbid(unsafe_code)]

pub mod arena;
pub mod conv_plan;
pub mod device;
pub mod exec;
pub mod nhwc_plan;
pub mod ops;
pub mod par;
pub mod profile;
pub mod qconv_plan;
pub mod qdq_plan;
pub mod vmath;

pub use exec::{Executor, Produced};
pub use ops::tflite::nn::{Rounding, ROUNDING_ATTR};
pub use ops::{OpCtx, OpFn, Registry};
