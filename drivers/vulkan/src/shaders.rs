//! The kernels' SPIR-V, compiled from `kernels/vulkan/*.comp` by `kernels/vulkan/build.sh`
//! (Debian's `glslc`) and committed, so building edgehal needs no shader compiler. The test
//! `tests/shaders.rs` recompiles them and fails on any byte difference.

pub const GEMM: &[u8] = include_bytes!("../../../kernels/vulkan/gemm.spv");
pub const DWCONV: &[u8] = include_bytes!("../../../kernels/vulkan/dwconv.spv");
pub const POOL: &[u8] = include_bytes!("../../../kernels/vulkan/pool.spv");
pub const BINARY: &[u8] = include_bytes!("../../../kernels/vulkan/binary.spv");
pub const UNARY: &[u8] = include_bytes!("../../../kernels/vulkan/unary.spv");
pub const SOFTMAX: &[u8] = include_bytes!("../../../kernels/vulkan/softmax.spv");
pub const COPY: &[u8] = include_bytes!("../../../kernels/vulkan/copy.spv");
pub const FILL: &[u8] = include_bytes!("../../../kernels/vulkan/fill.spv");
pub const RESIZE: &[u8] = include_bytes!("../../../kernels/vulkan/resize.spv");
pub const QGEMM: &[u8] = include_bytes!("../../../kernels/vulkan/qgemm.spv");
pub const QGEMM_DOT: &[u8] = include_bytes!("../../../kernels/vulkan/qgemm_dot.spv");

/// Every kernel: (source file stem, SPIR-V).
pub const ALL: &[(&str, &[u8])] = &[
    ("gemm", GEMM),
    ("dwconv", DWCONV),
    ("pool", POOL),
    ("binary", BINARY),
    ("unary", UNARY),
    ("softmax", SOFTMAX),
    ("copy", COPY),
    ("fill", FILL),
    ("resize", RESIZE),
    ("qgemm", QGEMM),
    ("qgemm_dot", QGEMM_DOT),
];
