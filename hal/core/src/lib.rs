//! edgehal-core: the vocabulary every other edgehal crate speaks.
//!
//! - [`Tensor`]s are a dtype, a shape and a [`bytes::Bytes`] storage: cloning, reshaping and
//!   slicing along the outer axis never copy, and initializers decoded from a memory-mapped model
//!   file point straight into the mapping (no second copy of the weights).
//! - The [`graph::Graph`] IR is format-neutral: importers (ONNX, TFLite) live in the `edgehal`
//!   crate and lower into it; op semantics follow ONNX naming.
//! - Raw syscalls live only in `sys`; everything else forbids `unsafe`.

pub use half;

pub mod dtype;
pub mod error;
pub mod graph;
pub mod infer;
pub mod sys;
pub mod tensor;

pub use dtype::DType;
pub use error::{Error, Result};
pub use graph::{Attr, Graph, Node, NodeId, ValueId, ValueInfo};
pub use tensor::{Quant, Tensor};

/// Upper bound on the bytes a single tensor may claim before we allocate it (16 GiB).
/// Checked against declared sizes from files and callers so a hostile header cannot make us
/// attempt a huge allocation.
pub const MAX_TENSOR_BYTES: u64 = 16 << 30;
