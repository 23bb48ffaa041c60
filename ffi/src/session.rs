//! `edgehal_model` and `edgehal_session`: load, prepare, introspect, run.

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;

use bytes::Bytes;
use edgehal::session::{IoInfo, Produced};
use edgehal::{Model, Session, SessionOptions};
use edgehal_core::Tensor;

use crate::buffer::{edgehal_buffer, Buffer};
use crate::handle::{lookup, register, unregister};
use crate::runtime::{edgehal_runtime, Runtime};
use crate::status::*;
use crate::types::*;

/// Opaque handle to a loaded model (graph and weights). Create with `edgehal_model_load` or
/// `edgehal_model_load_memory`; release with `edgehal_model_release`. Sessions keep what they
/// need, so a model may be released as soon as its sessions are created.
pub struct edgehal_model {
    _private: [u8; 0],
}

/// Opaque handle to a session: a model prepared for a device, run many times. Create with
/// `edgehal_session_create`, release with `edgehal_session_release`.
pub struct edgehal_session {
    _private: [u8; 0],
}

/// Options for `edgehal_session_create`. Fill with `edgehal_session_options_init` first, then
/// change fields; `struct_size` lets later versions add fields without breaking old callers.
#[repr(C)]
pub struct edgehal_session_options {
    /// `sizeof(edgehal_session_options)`; set by `edgehal_session_options_init`.
    pub struct_size: u32,
    /// Worker threads; 0 = one per core.
    pub threads: u32,
    /// NUL-terminated device name from `edgehal_device_info.name` ("cpu"), or "auto" / NULL to
    /// let edgehal choose. The string is read during `edgehal_session_create` only.
    pub device: *const c_char,
    /// Run graph optimisations (constant folding, dead node removal). Default true.
    pub optimize: bool,
}

pub(crate) struct ModelObj {
    model: Model,
    runtime: Arc<Runtime>,
}

struct IoMeta {
    name: CString,
    info: IoInfo,
    shape: Option<Vec<i64>>,
}

impl IoMeta {
    fn new(info: &IoInfo) -> IoMeta {
        IoMeta {
            name: CString::new(info.name.replace('\0', " ")).unwrap_or_default(),
            info: info.clone(),
            shape: info.shape.as_ref().map(|s| {
                s.iter()
                    .map(|d| d.fixed().and_then(|v| i64::try_from(v).ok()).unwrap_or(-1))
                    .collect()
            }),
        }
    }
}

pub(crate) struct SessionObj {
    session: Session,
    inputs: Vec<IoMeta>,
    outputs: Vec<IoMeta>,
    device: CString,
}

fn put<T>(out: *mut *mut T, v: *mut T) {
    // SAFETY: every caller checked `out` is non-NULL; the header says it must be writable.
    unsafe { out.write(v) }
}

fn new_model(
    rt: Arc<Runtime>,
    r: edgehal::Result<Model>,
    out: *mut *mut edgehal_model,
) -> FfiResult {
    let model = r?;
    put(out, register(Arc::new(ModelObj { model, runtime: rt })));
    Ok(())
}

/// Load a model file (ONNX or TFLite, told apart by content). The file is memory-mapped, not
/// read; it must not change while the model or a session made from it is alive. On success
/// `*out` receives a new handle to release with `edgehal_model_release`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE` (runtime),
/// `EDGEHAL_ERR_INVALID_ARGUMENT` (path not UTF-8), `EDGEHAL_ERR_IO`, `EDGEHAL_ERR_PARSE`,
/// `EDGEHAL_ERR_INVALID_MODEL`, `EDGEHAL_ERR_UNSUPPORTED`, `EDGEHAL_ERR_TOO_LARGE`.
///
/// Threading: any thread; loads may run concurrently.
///
/// # Safety
/// `path` must be a NUL-terminated string; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_model_load(
    runtime: *const edgehal_runtime,
    path: *const c_char,
    out: *mut *mut edgehal_model,
) -> edgehal_status {
    guard(|| {
        let rt = lookup::<Runtime, _>(runtime, "runtime")?;
        if path.is_null() {
            return Err(Fail::null("path"));
        }
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        // SAFETY: non-NULL and NUL-terminated by the caller's contract.
        let path = unsafe { CStr::from_ptr(path) }
            .to_str()
            .map_err(|_| Fail::arg("path is not valid UTF-8"))?;
        if path.is_empty() {
            return Err(Fail::arg("path is empty"));
        }
        new_model(rt, Model::load(path), out)
    })
}

/// Load a model from `size` bytes at `data` (ONNX or TFLite). The bytes are copied: the caller
/// may free them when this returns. ONNX external data files cannot be used this way.
///
/// Errors: as `edgehal_model_load`; `EDGEHAL_ERR_SIZE_MISMATCH` when `size` is 0.
///
/// Threading: any thread.
///
/// # Safety
/// `data` must point to `size` readable bytes; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_model_load_memory(
    runtime: *const edgehal_runtime,
    data: *const c_void,
    size: usize,
    out: *mut *mut edgehal_model,
) -> edgehal_status {
    guard(|| {
        let rt = lookup::<Runtime, _>(runtime, "runtime")?;
        if data.is_null() {
            return Err(Fail::null("data"));
        }
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        if size == 0 {
            return Err(Fail::new(EDGEHAL_ERR_SIZE_MISMATCH, "size is 0"));
        }
        // SAFETY: `data` has `size` readable bytes by the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) };
        new_model(rt, Model::from_bytes(Bytes::copy_from_slice(bytes)), out)
    })
}

/// Release a model. NULL is a no-op. Sessions made from it stay valid.
///
/// Errors: `EDGEHAL_ERR_INVALID_HANDLE` when `model` is not live (double release is detected).
///
/// Threading: any thread.
///
/// # Safety
/// `model` must be NULL or a handle from libedgehal.
#[no_mangle]
pub unsafe extern "C" fn edgehal_model_release(model: *mut edgehal_model) -> edgehal_status {
    guard(|| unregister::<ModelObj, _>(model, "model").map(drop))
}

/// Fill `*options` with the defaults: `struct_size = sizeof(edgehal_session_options)`,
/// `threads = 0`, `device = NULL` (auto), `optimize = true`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`.
///
/// Threading: any thread.
///
/// # Safety
/// `options` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_options_init(
    options: *mut edgehal_session_options,
) -> edgehal_status {
    guard(|| {
        if options.is_null() {
            return Err(Fail::null("options"));
        }
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe {
            options.write(edgehal_session_options {
                struct_size: std::mem::size_of::<edgehal_session_options>() as u32,
                threads: 0,
                device: std::ptr::null(),
                optimize: true,
            })
        };
        Ok(())
    })
}

/// Prepare `model` for running: picks the device, runs graph passes and resolves every
/// operator. `options` may be NULL for the defaults. On success `*out` receives a new handle
/// to release with `edgehal_session_release`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`,
/// `EDGEHAL_ERR_SIZE_MISMATCH` (options->struct_size is not this library's
/// sizeof(edgehal_session_options)), `EDGEHAL_ERR_NOT_FOUND` (no such device),
/// `EDGEHAL_ERR_INVALID_ARGUMENT` (threads over 4096, device not UTF-8),
/// `EDGEHAL_ERR_UNSUPPORTED` (an operator edgehal does not implement), `EDGEHAL_ERR_INVALID_MODEL`.
///
/// Threading: any thread; several sessions may be created from one model at once.
///
/// # Safety
/// `options` must be NULL or point to an initialised `edgehal_session_options` whose `device`
/// is NULL or a NUL-terminated string; `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_create(
    model: *const edgehal_model,
    options: *const edgehal_session_options,
    out: *mut *mut edgehal_session,
) -> edgehal_status {
    guard(|| {
        let m = lookup::<ModelObj, _>(model, "model")?;
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let mut opts = SessionOptions::default();
        if !options.is_null() {
            let want = std::mem::size_of::<edgehal_session_options>();
            // SAFETY: non-NULL; the caller promises an initialised struct. `struct_size` is the
            // first field, so it is read before trusting the rest of the layout.
            let size = unsafe { std::ptr::addr_of!((*options).struct_size).read() } as usize;
            if size != want {
                return Err(Fail::new(
                    EDGEHAL_ERR_SIZE_MISMATCH,
                    format!(
                        "options->struct_size is {size}, expected {want}; \
                         call edgehal_session_options_init first"
                    ),
                ));
            }
            // SAFETY: the size matches this library's layout, so the whole struct is readable.
            let o = unsafe { &*options };
            if o.threads > 4096 {
                return Err(Fail::arg(format!("threads = {} is over 4096", o.threads)));
            }
            opts.threads = o.threads as usize;
            opts.optimize = o.optimize;
            if !o.device.is_null() {
                // SAFETY: non-NULL and NUL-terminated by the caller's contract.
                let dev = unsafe { CStr::from_ptr(o.device) }
                    .to_str()
                    .map_err(|_| Fail::arg("options->device is not valid UTF-8"))?;
                if dev != "auto"
                    && !m
                        .runtime
                        .devices
                        .iter()
                        .any(|d| d.name.to_bytes() == dev.as_bytes())
                {
                    let names: Vec<String> = m
                        .runtime
                        .devices
                        .iter()
                        .map(|d| d.name.to_string_lossy().into_owned())
                        .collect();
                    return Err(Fail::new(
                        EDGEHAL_ERR_NOT_FOUND,
                        format!("no device '{dev}' (devices: auto, {})", names.join(", ")),
                    ));
                }
                opts.device = dev.to_string();
            }
        }
        let session = Session::new(&m.model, &opts)?;
        let inputs = session.inputs().map(IoMeta::new).collect();
        let outputs = session.outputs().iter().map(IoMeta::new).collect();
        let device = CString::new(session.device().replace('\0', " ")).unwrap_or_default();
        put(
            out,
            register(Arc::new(SessionObj {
                session,
                inputs,
                outputs,
                device,
            })),
        );
        Ok(())
    })
}

/// Release a session. NULL is a no-op. Jobs already submitted on it still complete.
///
/// Errors: `EDGEHAL_ERR_INVALID_HANDLE` when `session` is not live (double release is detected).
///
/// Threading: any thread, also while another thread runs the session (that run completes).
///
/// # Safety
/// `session` must be NULL or a handle from libedgehal.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_release(session: *mut edgehal_session) -> edgehal_status {
    guard(|| unregister::<SessionObj, _>(session, "session").map(drop))
}

/// Get the number of inputs (`input_count`) and outputs (`output_count`) of a session. Either
/// pointer may be NULL to skip it.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT` (session), `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread.
///
/// # Safety
/// Non-NULL pointers must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_io_count(
    session: *const edgehal_session,
    input_count: *mut usize,
    output_count: *mut usize,
) -> edgehal_status {
    guard(|| {
        let s = lookup::<SessionObj, _>(session, "session")?;
        if !input_count.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { input_count.write(s.inputs.len()) };
        }
        if !output_count.is_null() {
            // SAFETY: as above.
            unsafe { output_count.write(s.outputs.len()) };
        }
        Ok(())
    })
}

fn fill_info(
    list: &[IoMeta],
    index: usize,
    info: *mut edgehal_tensor_info,
    what: &str,
) -> FfiResult {
    if info.is_null() {
        return Err(Fail::null("info"));
    }
    let m = list.get(index).ok_or_else(|| {
        Fail::new(
            EDGEHAL_ERR_NOT_FOUND,
            format!("{what} index {index} out of range ({} {what}s)", list.len()),
        )
    })?;
    let (rank, shape) = match &m.shape {
        None => (-1, std::ptr::null()),
        Some(s) if s.is_empty() => (0, std::ptr::null()),
        Some(s) => (i32::try_from(s.len()).unwrap_or(i32::MAX), s.as_ptr()),
    };
    // SAFETY: checked non-NULL; writable by the caller's contract. The pointers stored point
    // into the session, which outlives them by the header's contract.
    unsafe {
        info.write(edgehal_tensor_info {
            name: m.name.as_ptr(),
            dtype: dtype_code(m.info.dtype),
            rank,
            shape,
            quantization: EDGEHAL_QUANT_NONE,
            scale: 0.0,
            zero_point: 0,
        })
    };
    Ok(())
}

/// Describe input number `index`. The pointers in `*info` belong to the session and stay
/// valid until it is released.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`, `EDGEHAL_ERR_NOT_FOUND`.
///
/// Threading: any thread.
///
/// # Safety
/// `info` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_input_info(
    session: *const edgehal_session,
    index: usize,
    info: *mut edgehal_tensor_info,
) -> edgehal_status {
    guard(|| {
        let s = lookup::<SessionObj, _>(session, "session")?;
        fill_info(&s.inputs, index, info, "input")
    })
}

/// Describe output number `index`; as `edgehal_session_input_info`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`, `EDGEHAL_ERR_NOT_FOUND`.
///
/// Threading: any thread.
///
/// # Safety
/// `info` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_output_info(
    session: *const edgehal_session,
    index: usize,
    info: *mut edgehal_tensor_info,
) -> edgehal_status {
    guard(|| {
        let s = lookup::<SessionObj, _>(session, "session")?;
        fill_info(&s.outputs, index, info, "output")
    })
}

/// Find the index of the input (`is_output` false) or output (`is_output` true) called `name`.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`, `EDGEHAL_ERR_NOT_FOUND`.
///
/// Threading: any thread.
///
/// # Safety
/// `name` must be NUL-terminated; `index` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_find(
    session: *const edgehal_session,
    name: *const c_char,
    is_output: bool,
    index: *mut usize,
) -> edgehal_status {
    guard(|| {
        let s = lookup::<SessionObj, _>(session, "session")?;
        if name.is_null() {
            return Err(Fail::null("name"));
        }
        if index.is_null() {
            return Err(Fail::null("index"));
        }
        // SAFETY: non-NULL and NUL-terminated by the caller's contract.
        let name = unsafe { CStr::from_ptr(name) };
        let list = if is_output { &s.outputs } else { &s.inputs };
        let i = list
            .iter()
            .position(|m| m.name.as_c_str() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = list.iter().map(|m| m.info.name.as_str()).collect();
                Fail::new(
                    EDGEHAL_ERR_NOT_FOUND,
                    format!(
                        "no {} named '{}' ({})",
                        if is_output { "output" } else { "input" },
                        name.to_string_lossy(),
                        names.join(", ")
                    ),
                )
            })?;
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { index.write(i) };
        Ok(())
    })
}

/// Name of the device the session runs on ("cpu"). The string belongs to the session.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread.
///
/// # Safety
/// `name` must be writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_device(
    session: *const edgehal_session,
    name: *mut *const c_char,
) -> edgehal_status {
    guard(|| {
        let s = lookup::<SessionObj, _>(session, "session")?;
        if name.is_null() {
            return Err(Fail::null("name"));
        }
        // SAFETY: checked non-NULL; writable by the caller's contract.
        unsafe { name.write(s.device.as_ptr()) };
        Ok(())
    })
}

/// Read a C array of `n` buffer handles; NULL entries become `None` when `allow_null`.
///
/// # Safety
/// `arr` must point to `n` readable handle pointers when `n > 0`.
pub(crate) unsafe fn read_buffers(
    arr: *const *const edgehal_buffer,
    n: usize,
    expected: usize,
    what: &str,
    allow_null: bool,
) -> FfiResult<Vec<Option<Arc<Buffer>>>> {
    if n != expected {
        return Err(Fail::new(
            EDGEHAL_ERR_SIZE_MISMATCH,
            format!("{n} {what} given, the session has {expected}"),
        ));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    if arr.is_null() {
        return Err(Fail::null(what));
    }
    // SAFETY: `arr` has `n` readable entries by the caller's contract (checked non-NULL).
    let hs = unsafe { std::slice::from_raw_parts(arr, n) };
    hs.iter()
        .enumerate()
        .map(|(i, &h)| {
            if h.is_null() && allow_null {
                Ok(None)
            } else {
                lookup::<Buffer, _>(h, &format!("{what}[{i}]")).map(Some)
            }
        })
        .collect()
}

fn same_shape(declared: &Option<Vec<i64>>, got: &[usize]) -> bool {
    match declared {
        None => true,
        Some(d) => {
            d.len() == got.len() && d.iter().zip(got).all(|(&w, &g)| w < 0 || w as usize == g)
        }
    }
}

fn shape_text(s: &Option<Vec<i64>>) -> String {
    match s {
        None => "[?]".into(),
        Some(s) => format!(
            "[{}]",
            s.iter()
                .map(|&d| if d < 0 {
                    "?".to_string()
                } else {
                    d.to_string()
                })
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// Check the bindings, run, and deliver the outputs: into the bound buffers, or into new ones
/// for unbound (`None`) outputs. Returns the output buffers in order. Every tensor that points
/// into caller memory is dropped before this returns.
pub(crate) fn run_bound(
    s: &SessionObj,
    inputs: &[Arc<Buffer>],
    outputs: &[Option<Arc<Buffer>>],
) -> FfiResult<Vec<Arc<Buffer>>> {
    let mut feeds: Vec<(&str, Tensor)> = Vec::with_capacity(inputs.len());
    for (m, b) in s.inputs.iter().zip(inputs) {
        let name = &m.info.name;
        if let Some(d) = m.info.dtype {
            if d != b.dtype() {
                return Err(Fail::new(
                    EDGEHAL_ERR_DTYPE_MISMATCH,
                    format!(
                        "input '{name}' is {d}, the buffer bound to it is {}",
                        b.dtype()
                    ),
                ));
            }
        }
        let shape = b.shape();
        if !same_shape(&m.shape, &shape) {
            return Err(Fail::new(
                EDGEHAL_ERR_SHAPE_MISMATCH,
                format!(
                    "input '{name}' has shape {}, the buffer bound to it is {shape:?}",
                    shape_text(&m.shape)
                ),
            ));
        }
        feeds.push((name.as_str(), b.tensor()?));
    }
    for (m, b) in s.outputs.iter().zip(outputs) {
        if let (Some(d), Some(b)) = (m.info.dtype, b) {
            if d != b.dtype() {
                return Err(Fail::new(
                    EDGEHAL_ERR_DTYPE_MISMATCH,
                    format!(
                        "output '{}' is {d}, the buffer bound to it is {}",
                        m.info.name,
                        b.dtype()
                    ),
                ));
            }
        }
    }
    // Fd-backed buffers are leased for the run (dma-bufs synced for CPU access), once each.
    let mut leased: Vec<*const Buffer> = Vec::new();
    let mut leases = Vec::new();
    let bound_outputs = outputs.iter().flatten();
    for (b, write) in bound_outputs
        .map(|b| (b, true))
        .chain(inputs.iter().map(|b| (b, false)))
    {
        let key = Arc::as_ptr(b);
        if leased.contains(&key) {
            continue;
        }
        leased.push(key);
        if let Some(l) = b.run_lease(write) {
            leases.push(l?);
        }
    }
    // Outputs computed in place: a writable bound buffer of the declared dtype whose memory
    // overlaps no input and no other output.
    let overlaps =
        |a: &std::ops::Range<usize>, b: &std::ops::Range<usize>| a.start < b.end && b.start < a.end;
    let mut dests: Vec<Option<&mut [u8]>> = Vec::with_capacity(outputs.len());
    for (i, (m, slot)) in s.outputs.iter().zip(outputs).enumerate() {
        let dest = slot.as_ref().and_then(|b| {
            let r = b.range();
            let clash = inputs.iter().any(|x| overlaps(&x.range(), &r))
                || outputs
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.as_ref().is_some_and(|o| overlaps(&o.range(), &r)));
            if clash || !b.writable() || m.info.dtype != Some(b.dtype()) {
                return None;
            }
            // SAFETY: no input or other output of this run overlaps the memory (checked just
            // above), the API contract keeps other runs and the application off a bound output
            // while the run is in flight, and the slice is dropped before this function returns.
            unsafe { b.as_mut_bytes() }
        });
        dests.push(dest);
    }
    let results = s.session.run_into(&feeds, dests);
    drop(feeds);
    let results = results?;
    let counter = s.session.copies();
    let mut out = Vec::with_capacity(results.len());
    for ((name, p), bound) in results.into_iter().zip(outputs) {
        let what = format!("output '{name}'");
        match (p, bound) {
            (Produced::InPlace { shape, .. }, Some(b)) => {
                b.set_shape(shape);
                out.push(Arc::clone(b));
            }
            (Produced::Tensor(t), Some(b)) => {
                b.write_output(&t, &what)?;
                counter.record(t.bytes().len());
                out.push(Arc::clone(b));
            }
            (Produced::Tensor(t), None) => {
                let b = Buffer::from_tensor(&t)?;
                counter.record(t.bytes().len());
                out.push(Arc::new(b));
            }
            (Produced::InPlace { .. }, None) => {
                return Err(Fail::new(
                    EDGEHAL_ERR_EXECUTION,
                    format!("{what} was written in place without a buffer"),
                ))
            }
        }
    }
    drop(leases);
    Ok(out)
}

/// Copies libedgehal made for this session's runs so far: `*copies` receives their number and
/// `*bytes` their total size (either pointer may be NULL to skip it). Bound inputs (wrapped,
/// fd-imported) are read in place and cost nothing; a bound output costs nothing when the op
/// producing it computes straight into the buffer (Gemm, MatMul) and one copy otherwise; an
/// output libedgehal allocates (NULL slot) costs one copy. Tests and integrators use it to check
/// a pipeline is zero-copy.
///
/// Errors: `EDGEHAL_ERR_INVALID_HANDLE`.
///
/// Threading: any thread (the counts are atomic; concurrent runs add to them).
///
/// # Safety
/// `copies` and `bytes` must each be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_copy_stats(
    session: *const edgehal_session,
    copies: *mut u64,
    bytes: *mut u64,
) -> edgehal_status {
    guard(|| {
        let s = lookup::<SessionObj, _>(session, "session")?;
        let c = s.session.copies();
        if !copies.is_null() {
            // SAFETY: non-NULL and writable by the caller's contract.
            unsafe { copies.write(c.copies()) };
        }
        if !bytes.is_null() {
            // SAFETY: as above.
            unsafe { bytes.write(c.bytes()) };
        }
        Ok(())
    })
}

/// Run the session synchronously.
///
/// `inputs` holds one buffer per session input, in input order (`input_count` must equal the
/// session's input count); each buffer's dtype and shape must match the input (symbolic
/// dimensions accept any size). `outputs` holds one slot per output (`output_count` must equal
/// the output count): a non-NULL slot is a buffer the output is written into (its dtype must
/// match and its size must suffice; its shape becomes the output's shape); a NULL slot receives
/// a new buffer owned by the caller (release it with `edgehal_buffer_release`). On failure no
/// slot is changed; bound output buffers may have been partly written.
///
/// Errors: `EDGEHAL_ERR_NULL_ARGUMENT`, `EDGEHAL_ERR_INVALID_HANDLE` (session or any buffer),
/// `EDGEHAL_ERR_SIZE_MISMATCH` (counts), `EDGEHAL_ERR_DTYPE_MISMATCH`,
/// `EDGEHAL_ERR_SHAPE_MISMATCH`, `EDGEHAL_ERR_BUFFER_TOO_SMALL`, `EDGEHAL_ERR_EXECUTION`.
///
/// Threading: any thread; several threads may run one session at once, each with its own
/// buffers (a buffer may be an output of only one run at a time).
///
/// # Safety
/// `inputs` must point to `input_count` handles and `outputs` to `output_count` writable slots.
#[no_mangle]
pub unsafe extern "C" fn edgehal_session_run(
    session: *const edgehal_session,
    inputs: *const *const edgehal_buffer,
    input_count: usize,
    outputs: *mut *mut edgehal_buffer,
    output_count: usize,
) -> edgehal_status {
    guard(|| {
        let s = lookup::<SessionObj, _>(session, "session")?;
        // SAFETY: forwarded caller contract on `inputs`.
        let ins = unsafe { read_buffers(inputs, input_count, s.inputs.len(), "inputs", false) }?;
        let ins: Vec<Arc<Buffer>> = ins.into_iter().flatten().collect();
        // SAFETY: forwarded caller contract on `outputs` (read as handles first).
        let outs = unsafe {
            read_buffers(
                outputs as *const *const edgehal_buffer,
                output_count,
                s.outputs.len(),
                "outputs",
                true,
            )
        }?;
        let done = run_bound(&s, &ins, &outs)?;
        for (i, (b, slot)) in done.into_iter().zip(&outs).enumerate() {
            if slot.is_none() {
                let h: *mut edgehal_buffer = register(b);
                // SAFETY: `i < output_count`, and the caller promised `output_count` writable
                // slots (non-NULL: checked in `read_buffers` since output_count > 0).
                unsafe { outputs.add(i).write(h) };
            }
        }
        Ok(())
    })
}

/// The session behind a handle, for the submit path.
pub(crate) fn session_of(h: *const edgehal_session) -> FfiResult<Arc<SessionObj>> {
    lookup::<SessionObj, _>(h, "session")
}

impl SessionObj {
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.inputs.len(), self.outputs.len())
    }
}
