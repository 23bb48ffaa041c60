//! libedgehal: the C ABI over the `edgehal` crate (the C API lands with its own issue).

#![forbid(unsafe_code)]

/// The library version string, for Rust callers linking the rlib.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
