//! Status codes, the thread-local error message, and the guard every export runs inside.
//!
//! Every `extern "C"` function body runs in [`guard`]: a Rust panic is caught there and turned
//! into [`EDGEHAL_ERR_PANIC`], so no unwind ever crosses into C.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use edgehal_core::Error;

/// Result of every fallible libedgehal call: `EDGEHAL_OK` (0) or one of the `EDGEHAL_ERR_*`
/// codes, all in the range 7000..7100 so they are easy to tell apart from errno values or
/// other libraries' codes. `edgehal_last_error_message()` has the details.
pub type edgehal_status = i32;

/// Success.
pub const EDGEHAL_OK: edgehal_status = 0;
/// A required pointer argument was NULL.
pub const EDGEHAL_ERR_NULL_ARGUMENT: edgehal_status = 7001;
/// An argument has a value that is not allowed (unknown dtype, empty path, bad UTF-8...).
pub const EDGEHAL_ERR_INVALID_ARGUMENT: edgehal_status = 7002;
/// A handle is not live: already released, never created by libedgehal, or of another kind.
pub const EDGEHAL_ERR_INVALID_HANDLE: edgehal_status = 7003;
/// A count or size argument does not match (number of buffers, struct_size, byte length).
pub const EDGEHAL_ERR_SIZE_MISMATCH: edgehal_status = 7004;
/// A caller-provided output area is too small; the needed size is reported where possible.
pub const EDGEHAL_ERR_BUFFER_TOO_SMALL: edgehal_status = 7005;
/// A buffer's element type differs from what the model declares.
pub const EDGEHAL_ERR_DTYPE_MISMATCH: edgehal_status = 7006;
/// A buffer's shape differs from what the model declares.
pub const EDGEHAL_ERR_SHAPE_MISMATCH: edgehal_status = 7007;
/// A name or index does not exist (input name, device index).
pub const EDGEHAL_ERR_NOT_FOUND: edgehal_status = 7008;
/// Reading a file failed.
pub const EDGEHAL_ERR_IO: edgehal_status = 7009;
/// A model file could not be decoded.
pub const EDGEHAL_ERR_PARSE: edgehal_status = 7010;
/// A model decoded but is structurally invalid.
pub const EDGEHAL_ERR_INVALID_MODEL: edgehal_status = 7011;
/// The model uses an operator or feature that edgehal does not implement.
pub const EDGEHAL_ERR_UNSUPPORTED: edgehal_status = 7012;
/// Running the model failed.
pub const EDGEHAL_ERR_EXECUTION: edgehal_status = 7013;
/// A size check before allocating failed (tensor too large).
pub const EDGEHAL_ERR_TOO_LARGE: edgehal_status = 7014;
/// A device is missing or failed.
pub const EDGEHAL_ERR_DEVICE: edgehal_status = 7015;
/// The operating system refused a resource (eventfd, thread).
pub const EDGEHAL_ERR_SYSTEM: edgehal_status = 7016;
/// A wait ran out of time before the work completed.
pub const EDGEHAL_ERR_TIMEOUT: edgehal_status = 7017;
/// A bug in libedgehal (a Rust panic was caught at the API boundary). Please report it.
pub const EDGEHAL_ERR_PANIC: edgehal_status = 7099;

/// A failed call: the status to return and the message for `edgehal_last_error_message`.
#[derive(Debug, Clone)]
pub(crate) struct Fail {
    pub status: edgehal_status,
    pub msg: String,
}

impl Fail {
    pub fn new(status: edgehal_status, msg: impl Into<String>) -> Fail {
        Fail {
            status,
            msg: msg.into(),
        }
    }
    pub fn null(arg: &str) -> Fail {
        Fail::new(EDGEHAL_ERR_NULL_ARGUMENT, format!("{arg} is NULL"))
    }
    pub fn arg(msg: impl Into<String>) -> Fail {
        Fail::new(EDGEHAL_ERR_INVALID_ARGUMENT, msg)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let status = match &e {
            Error::Io { .. } => EDGEHAL_ERR_IO,
            Error::Parse(_) => EDGEHAL_ERR_PARSE,
            Error::InvalidGraph(_) => EDGEHAL_ERR_INVALID_MODEL,
            Error::Unsupported(_) => EDGEHAL_ERR_UNSUPPORTED,
            Error::InvalidArgument(_) => EDGEHAL_ERR_INVALID_ARGUMENT,
            Error::Op { .. } => EDGEHAL_ERR_EXECUTION,
            Error::TooLarge(_) => EDGEHAL_ERR_TOO_LARGE,
            Error::Device { .. } => EDGEHAL_ERR_DEVICE,
        };
        Fail::new(status, e.to_string())
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, Fail>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; then there is nowhere to report.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c);
}

/// Run the body of an export: catch panics, record the message of a failure, return a status.
pub(crate) fn guard(f: impl FnOnce() -> FfiResult) -> edgehal_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            EDGEHAL_OK
        }
        Ok(Err(fail)) => {
            set_last_error(&fail.msg);
            fail.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "internal error in libedgehal (please report): {what}"
            ));
            EDGEHAL_ERR_PANIC
        }
    }
}

/// Like [`guard`] for functions that return a value instead of a status: `fallback` on panic.
pub(crate) fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// A static description of a status code.
pub(crate) fn status_text(status: i32) -> &'static CStr {
    match status {
        EDGEHAL_OK => c"ok",
        EDGEHAL_ERR_NULL_ARGUMENT => c"a required pointer argument is NULL",
        EDGEHAL_ERR_INVALID_ARGUMENT => c"invalid argument",
        EDGEHAL_ERR_INVALID_HANDLE => c"invalid handle (released, foreign or of another kind)",
        EDGEHAL_ERR_SIZE_MISMATCH => c"size or count mismatch",
        EDGEHAL_ERR_BUFFER_TOO_SMALL => c"buffer too small",
        EDGEHAL_ERR_DTYPE_MISMATCH => c"element type mismatch",
        EDGEHAL_ERR_SHAPE_MISMATCH => c"shape mismatch",
        EDGEHAL_ERR_NOT_FOUND => c"not found",
        EDGEHAL_ERR_IO => c"I/O error",
        EDGEHAL_ERR_PARSE => c"model could not be decoded",
        EDGEHAL_ERR_INVALID_MODEL => c"invalid model",
        EDGEHAL_ERR_UNSUPPORTED => c"unsupported operator or feature",
        EDGEHAL_ERR_EXECUTION => c"execution failed",
        EDGEHAL_ERR_TOO_LARGE => c"tensor too large",
        EDGEHAL_ERR_DEVICE => c"device error",
        EDGEHAL_ERR_SYSTEM => c"operating system error",
        EDGEHAL_ERR_TIMEOUT => c"timed out",
        EDGEHAL_ERR_PANIC => c"internal error in libedgehal",
        _ => c"unknown status code",
    }
}

/// Pointer to this thread's last error message (valid until the next call on this thread).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_a_status_with_a_message() {
        let st = guard(|| panic!("boom"));
        assert_eq!(st, EDGEHAL_ERR_PANIC);
        // SAFETY: the pointer is this thread's message, valid until the next guard call.
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) };
        assert!(msg.to_string_lossy().contains("boom"), "{msg:?}");
        assert_eq!(guard(|| Ok(())), EDGEHAL_OK);
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) };
        assert!(msg.is_empty());
    }

    #[test]
    fn core_errors_map_to_codes() {
        let f: Fail = Error::unsupported("op Foo").into();
        assert_eq!(f.status, EDGEHAL_ERR_UNSUPPORTED);
        assert!(f.msg.contains("op Foo"));
        assert_eq!(status_text(EDGEHAL_ERR_TIMEOUT), c"timed out");
        assert_eq!(status_text(12345), c"unknown status code");
    }
}
