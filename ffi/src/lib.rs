//! libedgehal: the C ABI over the `edgehal` crate (`libedgehal.so`, `libedgehal.a`,
//! `include/edgehal.h`).
//!
//! - Handles are opaque pointers to `Arc`'d Rust objects recorded in one table of live handles
//!   ([`handle`]): every call checks the handle there first, so NULL, released (double
//!   release included), foreign and wrong-kind handles are answered with a status, never
//!   dereferenced.
//! - Every export runs inside [`status::guard`], which catches panics: no unwind crosses into C.
//!   Errors are `edgehal_status` codes in 7000..7100 plus a thread-local message.
//! - `include/edgehal.h` is generated from this crate by cbindgen and checked in; the test
//!   `tests/header.rs` fails when it drifts (`EDGEHAL_BLESS=1 cargo test -p edgehal-ffi --test
//!   header` rewrites it).

#![allow(non_camel_case_types)]

pub mod buffer;
pub mod fence;
mod handle;
pub mod runtime;
pub mod session;
pub mod status;
pub mod types;

use std::ffi::c_char;

/// Large blocks (activations) on a 64-byte line, as in the `edgehal` command: NHWC channel
/// vectors then never straddle two cache lines (see `edgehal_kernels::alloc`).
#[global_allocator]
static ALLOC: edgehal_kernels::alloc::LineAligned = edgehal_kernels::alloc::LineAligned;

use status::*;

/// Major version of the library this header belongs to (matches Cargo.toml).
pub const EDGEHAL_VERSION_MAJOR: u32 = 0;
/// Minor version (matches Cargo.toml).
pub const EDGEHAL_VERSION_MINOR: u32 = 1;
/// Patch version (matches Cargo.toml).
pub const EDGEHAL_VERSION_PATCH: u32 = 0;

/// The library version string ("0.1.0"), for Rust callers linking the rlib.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The version of the loaded library as a static NUL-terminated string ("0.1.0"). Compare with
/// the EDGEHAL_VERSION_* macros to detect a header/library mismatch.
///
/// Threading: any thread. Never fails.
#[no_mangle]
pub extern "C" fn edgehal_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static, NUL-terminated description of a status code ("shape mismatch"); "unknown status
/// code" for values that are not `edgehal_status` codes.
///
/// Threading: any thread. Never fails.
#[no_mangle]
pub extern "C" fn edgehal_status_message(status: edgehal_status) -> *const c_char {
    status::guard_value(c"unknown status code".as_ptr(), || {
        status::status_text(status).as_ptr()
    })
}

/// The message of the most recent libedgehal call on the calling thread: a sentence naming
/// what was wrong when that call failed, "" when it succeeded. The string belongs to
/// libedgehal and is valid until the next libedgehal call on this thread; copy it to keep it.
///
/// Threading: per thread (each thread has its own message). Never fails.
#[no_mangle]
pub extern "C" fn edgehal_last_error_message() -> *const c_char {
    status::guard_value(c"".as_ptr(), status::last_error_ptr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_macros_match_cargo_toml() {
        let parse = |s: &str| s.parse::<u32>().ok();
        assert_eq!(
            parse(env!("CARGO_PKG_VERSION_MAJOR")),
            Some(EDGEHAL_VERSION_MAJOR)
        );
        assert_eq!(
            parse(env!("CARGO_PKG_VERSION_MINOR")),
            Some(EDGEHAL_VERSION_MINOR)
        );
        assert_eq!(
            parse(env!("CARGO_PKG_VERSION_PATCH")),
            Some(EDGEHAL_VERSION_PATCH)
        );
        // SAFETY: edgehal_version returns a static NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(edgehal_version()) };
        assert_eq!(v.to_str().ok(), Some(version()));
        assert_eq!(EDGEHAL_OK, 0);
    }
}
