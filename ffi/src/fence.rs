//! Asynchronous runs: `edgehal_session_submit` and `edgehal_fence`.
//!
//! For now each submitted job runs on its own thread. When the scheduler lands, jobs move onto
//! its per-device queues and the fence's eventfd becomes the one the io_uring reactor signals;
//! the C API stays the same.

use std::ffi::{c_char, c_int, c_void, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::buffer::{edgehal_buffer, Buffer};
use crate::handle::{lookup, register, unregister};
use crate::session::{edgehal_session, read_buffers, run_bound, session_of};
use crate::status::*;

/// Opaque handle to the completion of a submitted job. Created by `edgehal_session_submit`,
/// released with `edgehal_fence_release`.
pub struct edgehal_fence {
    _private: [u8; 0],
}

/// Completion callback of `edgehal_session_submit`: called once, on a libedgehal worker thread,
/// with the caller's `user_data`, the job's status and a message (empty on success; valid only
/// during the call). It must return promptly and must not wait on the job's own fence.
pub type edgehal_completion_fn = Option<
    unsafe extern "C" fn(user_data: *mut c_void, status: edgehal_status, message: *const c_char),
>;

pub(crate) struct Fence {
    efd: OwnedFd,
    /// `Some((status, message))` once the job finished.
    done: Mutex<Option<(edgehal_status, String)>>,
    cv: Condvar,
}

impl Fence {
    fn new() -> FfiResult<Fence> {
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Fail::new(
                EDGEHAL_ERR_SYSTEM,
                format!("eventfd: {}", std::io::Error::last_os_error()),
            ));
        }
        Ok(Fence {
            // SAFETY: `fd` is a fresh descriptor this value now owns alone.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            done: Mutex::new(None),
            cv: Condvar::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<(edgehal_status, String)>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, status: edgehal_status, msg: String) {
        *self.state() = Some((status, msg));
        self.cv.notify_all();
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this fence owns. The result is
        // ignored on purpose: the only failure (EAGAIN on counter overflow) cannot happen for
        // one write, and the condvar already woke waiters.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// The caller's callback and its pointer, carried to the worker thread.
struct Callback {
    f: edgehal_completion_fn,
    user_data: *mut c_void,
}
// SAFETY: `user_data` is opaque to libedgehal and only handed back to the caller's callback;
// the header tells the caller that the callback runs on another thread.
unsafe impl Send for Callback {}

impl Callback {
    fn call(&self, status: edgehal_status, msg: &str) {
        if let Some(f) = self.f {
            let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
            // SAFETY: calling the caller's function with the arguments its documented type
            // takes; `c` outlives the call.
            unsafe { f(self.user_data, status, c.as_ptr()) }
        }
    }
}

/// Submit a run and return at once. Arguments are as `edgehal_session_run` except that every
/// output slot must hold a buffer (no NULL slots): results are written there. They are checked
/// now (counts, NULLs, handles); dtype, shape and execution errors arrive as the job's status.
///
/// When the job finishes, in this order: outputs are written; `callback` (if not NULL) is
/// called on a worker thread with `user_data` and the status; then the fence completes (its fd
/// becomes readable and `edgehal_fence_wait` returns). If `fence` is not NULL it receives a new
/// handle to release with `edgehal_fence_release`; pass NULL to rely on the callback alone.
/// The job holds its own references to the session and buffers, so releasing them early is
/// safe, but wrapped caller memory must stay valid until the job completes.
///
/// Today each job runs on its own thread; it moves onto the scheduler's device queues later.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`,
/// `EDGEHAL_ERR_SIZE_MISMATCH`, `EDGEHAL_ERR_SYSTEM` (no eventfd or thread).
///
/// Threading: any thread; jobs on one session may overlap if their output buffers differ.
///
/// # Safety
/// `inputs` must point to `input_count` handles, `outputs` to `output_count` handles; `fence`
/// must be NULL or writable; `callback` must be safe to call from another thread with
/// `user_data`.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_submit(
    session: *const edgehal_session,
    inputs: *const *const edgehal_buffer,
    input_count: usize,
    outputs: *const *mut edgehal_buffer,
    output_count: usize,
    callback: edgehal_completion_fn,
    user_data: *mut c_void,
    fence: *mut *mut edgehal_fence,
) -> edgehal_status {
    guard(|| {
        let s = session_of(session)?;
        let (n_in, n_out) = s.counts();
        // SAFETY: forwarded caller contract on `inputs`.
        let ins = unsafe { read_buffers(inputs, input_count, n_in, "inputs", false) }?;
        let ins: Vec<Arc<Buffer>> = ins.into_iter().flatten().collect();
        // SAFETY: forwarded caller contract on `outputs`.
        let outs = unsafe { read_buffers(outputs.cast(), output_count, n_out, "outputs", false) }?;
        let f = Arc::new(Fence::new()?);
        let cb = Callback {
            f: callback,
            user_data,
        };
        let job_fence = Arc::clone(&f);
        std::thread::Builder::new()
            .name("edgehal-job".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_bound(&s, &ins, &outs).map(drop)
                }));
                let (status, msg) = match r {
                    Ok(Ok(())) => (EDGEHAL_OK, String::new()),
                    Ok(Err(e)) => (e.status, e.msg),
                    Err(_) => (
                        EDGEHAL_ERR_PANIC,
                        "internal error in libedgehal (job panicked)".into(),
                    ),
                };
                // The job's references go before anyone is told it is done: after completion
                // the caller may free wrapped memory.
                drop((s, ins, outs));
                cb.call(status, &msg);
                job_fence.complete(status, msg);
            })
            .map_err(|e| {
                Fail::new(
                    EDGEHAL_ERR_SYSTEM,
                    format!("cannot start a job thread: {e}"),
                )
            })?;
        if !fence.is_null() {
            let h: *mut edgehal_fence = register(f);
            // SAFETY: checked non-NULL; writable by the caller's contract.
            unsafe { fence.write(h) };
        }
        Ok(())
    })
}

/// Get the fence's file descriptor: an eventfd that becomes readable (POLLIN) when the job
/// completes and stays readable. Use it with poll/epoll/io_uring next to other descriptors.
/// The descriptor belongs to the fence: do not close it; it is closed on release. Reading it is
/// allowed but not needed.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread.
///
/// # Safety
/// `fd` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_fence_fd(
    fence: *const edgehal_fence,
    fd: *mut c_int,
) -> edgehal_status {
    guard(|| {
        let f = lookup::<Fence, _>(fence, "fence")?;
        if fd.is_null() {
            return Err(Fail::null("fd"));
        }
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { fd.write(f.efd.as_raw_fd()) };
        Ok(())
    })
}

/// Tell whether the job completed, without blocking: `*done` is set to true or false.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread.
///
/// # Safety
/// `done` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_fence_is_done(
    fence: *const edgehal_fence,
    done: *mut bool,
) -> edgehal_status {
    guard(|| {
        let f = lookup::<Fence, _>(fence, "fence")?;
        if done.is_null() {
            return Err(Fail::null("done"));
        }
        let d = f.state().is_some();
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { done.write(d) };
        Ok(())
    })
}

/// Wait up to `timeout_ms` milliseconds (negative: forever) for the job. Returns the job's own
/// status once it completed (`EDGEHAL_OK`, or its error with the message available from
/// `edgehal_last_error_message` on this thread), `EDGEHAL_ERR_TIMEOUT` if it is still running.
/// May be called any number of times.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`, `EDGEHAL_ERR_TIMEOUT`, or
/// the job's error.
///
/// Threading: any thread except inside the job's own completion callback (that deadlocks).
///
/// # Safety
/// `fence` must be NULL or a handle from libedgehal.
#[no_mangle]
pub unsafe extern "C" fn edgehal_fence_wait(
    fence: *const edgehal_fence,
    timeout_ms: i64,
) -> edgehal_status {
    guard(|| {
        let f = lookup::<Fence, _>(fence, "fence")?;
        let deadline = u64::try_from(timeout_ms)
            .ok()
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let mut st = f.state();
        loop {
            if let Some((status, msg)) = st.as_ref() {
                return if *status == EDGEHAL_OK {
                    Ok(())
                } else {
                    Err(Fail::new(*status, msg.clone()))
                };
            }
            st = match deadline {
                None => f.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Fail::new(
                            EDGEHAL_ERR_TIMEOUT,
                            format!("job still running after {timeout_ms} ms"),
                        ));
                    }
                    f.cv.wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    })
}

/// Release a fence. NULL is a no-op. A job still running is not cancelled: it completes, calls
/// its callback, and frees its resources itself.
///
/// Errors: `EDGEHAL_ERR_INVALID_HANDLE` when `fence` is not live (double release is detected).
///
/// Threading: any thread.
///
/// # Safety
/// `fence` must be NULL or a handle from libedgehal.
#[no_mangle]
pub unsafe extern "C" fn edgehal_fence_release(fence: *mut edgehal_fence) -> edgehal_status {
    guard(|| unregister::<Fence, _>(fence, "fence").map(drop))
}
