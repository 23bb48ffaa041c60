//! dlopen and the vendor plugin ABI (`edgehal_plugin.h`, version 1).
//!
//! Trust model: a plugin is native code in our process, so it is trusted to follow the ABI
//! contract written in the header (valid table, calls that do what they say, no unwinding).
//! What we check is everything that can be checked before trusting it: the entry symbol
//! exists, the table speaks our ABI version and is large enough, every function pointer is
//! non-null, strings are NUL-terminated. Every `unsafe` call into the plugin passes memory we
//! own and keep alive for as long as the header says the plugin may use it. edgehal passes no
//! Rust callbacks to plugins in v1, so no Rust panic can unwind through C frames.

use std::ffi::{c_char, c_void, CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::sys::mem::{ReadLease, WriteLease};
use crate::{Error, Result};

/// The ABI version this edgehal speaks.
pub const ABI_VERSION: u32 = 1;
/// The symbol every plugin exports.
pub const ENTRY_SYMBOL: &str = "edgehal_plugin_entry";
/// `EDGEHAL_MAX_RANK`.
pub const MAX_RANK: usize = 8;
/// `EDGEHAL_RANK_UNKNOWN`.
pub const RANK_UNKNOWN: u32 = u32::MAX;
/// `EDGEHAL_NO_VALUE`.
pub const NO_VALUE: u32 = u32::MAX;

/// `EDGEHAL_OK` and the error codes.
pub mod status {
    pub const OK: i32 = 0;
    pub const UNSUPPORTED: i32 = 1;
    pub const INVALID: i32 = 2;
    pub const DEVICE: i32 = 3;
    pub const TIMEOUT: i32 = 4;
    pub const NOMEM: i32 = 5;
}

/// `EDGEHAL_MEM_*` bits.
pub mod mem_bits {
    pub const HOST: u32 = 1;
    pub const HOST_IMPORTED: u32 = 2;
    pub const DMABUF: u32 = 4;
    pub const DEVICE_LOCAL: u32 = 8;
}

/// `EDGEHAL_BUFFER_*` kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum BufferKind {
    DmaBufFd = 2,
    Memfd = 3,
}

/// `edgehal_tensor_desc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub dtype: i32,
    pub rank: u32,
    pub dims: [i64; MAX_RANK],
}

impl TensorDesc {
    /// A descriptor with a known shape (fails above [`MAX_RANK`] dims).
    pub fn new(dtype: i32, shape: &[usize]) -> Result<Self> {
        if shape.len() > MAX_RANK {
            return Err(Error::unsupported(format!(
                "plugin ABI v1 carries at most {MAX_RANK} dims, tensor has {}",
                shape.len()
            )));
        }
        let mut dims = [0i64; MAX_RANK];
        for (d, &s) in dims.iter_mut().zip(shape) {
            *d = i64::try_from(s).map_err(|_| Error::arg("dimension too large"))?;
        }
        Ok(TensorDesc {
            dtype,
            rank: shape.len() as u32,
            dims,
        })
    }
    /// A descriptor whose shape is not known yet.
    pub fn unknown(dtype: i32) -> Self {
        TensorDesc {
            dtype,
            rank: RANK_UNKNOWN,
            dims: [0; MAX_RANK],
        }
    }
}

#[repr(C)]
struct RawTensor {
    desc: TensorDesc,
    data: *mut c_void,
    bytes: u64,
}

#[repr(C)]
struct RawOp {
    op_type: *const c_char,
    n_inputs: u32,
    inputs: *const u32,
    n_outputs: u32,
    outputs: *const u32,
}

#[repr(C)]
struct RawProgram {
    n_values: u32,
    values: *const TensorDesc,
    n_ops: u32,
    ops: *const RawOp,
    n_inputs: u32,
    inputs: *const u32,
    n_outputs: u32,
    outputs: *const u32,
    n_constants: u32,
    constant_values: *const u32,
    constants: *const RawTensor,
}

#[repr(C)]
struct RawBufferDesc {
    kind: i32,
    fd: i32,
    ptr: *mut c_void,
    offset: u64,
    bytes: u64,
}

/// `edgehal_plugin_v1`.
#[repr(C)]
struct PluginV1 {
    abi_version: u32,
    struct_size: u32,
    name: *const c_char,
    version: *const c_char,
    memory_domains: u32,
    device_count: Option<unsafe extern "C" fn() -> u32>,
    device_name: Option<unsafe extern "C" fn(u32) -> *const c_char>,
    open: Option<unsafe extern "C" fn(u32, *mut *mut c_void, *mut c_char, usize) -> i32>,
    close: Option<unsafe extern "C" fn(*mut c_void)>,
    supports: Option<
        unsafe extern "C" fn(
            *mut c_void,
            *const c_char,
            u32,
            *const TensorDesc,
            *mut c_char,
            usize,
        ) -> i32,
    >,
    compile: Option<
        unsafe extern "C" fn(
            *mut c_void,
            *const RawProgram,
            *mut *mut c_void,
            *mut c_char,
            usize,
        ) -> i32,
    >,
    release_executable: Option<unsafe extern "C" fn(*mut c_void)>,
    submit: Option<
        unsafe extern "C" fn(
            *mut c_void,
            *mut c_void,
            *const RawTensor,
            u32,
            *const RawTensor,
            u32,
            *mut *mut c_void,
            *mut c_char,
            usize,
        ) -> i32,
    >,
    fence_wait: Option<unsafe extern "C" fn(*mut c_void, i64, *mut c_char, usize) -> i32>,
    release_fence: Option<unsafe extern "C" fn(*mut c_void)>,
    import_buffer: Option<
        unsafe extern "C" fn(
            *mut c_void,
            *const RawBufferDesc,
            *mut *mut c_void,
            *mut c_char,
            usize,
        ) -> i32,
    >,
    release_buffer: Option<unsafe extern "C" fn(*mut c_void)>,
}

/// The function table after validation: every pointer present.
#[derive(Clone, Copy)]
struct Fns {
    device_count: unsafe extern "C" fn() -> u32,
    device_name: unsafe extern "C" fn(u32) -> *const c_char,
    open: unsafe extern "C" fn(u32, *mut *mut c_void, *mut c_char, usize) -> i32,
    close: unsafe extern "C" fn(*mut c_void),
    supports: unsafe extern "C" fn(
        *mut c_void,
        *const c_char,
        u32,
        *const TensorDesc,
        *mut c_char,
        usize,
    ) -> i32,
    compile: unsafe extern "C" fn(
        *mut c_void,
        *const RawProgram,
        *mut *mut c_void,
        *mut c_char,
        usize,
    ) -> i32,
    release_executable: unsafe extern "C" fn(*mut c_void),
    submit: unsafe extern "C" fn(
        *mut c_void,
        *mut c_void,
        *const RawTensor,
        u32,
        *const RawTensor,
        u32,
        *mut *mut c_void,
        *mut c_char,
        usize,
    ) -> i32,
    fence_wait: unsafe extern "C" fn(*mut c_void, i64, *mut c_char, usize) -> i32,
    release_fence: unsafe extern "C" fn(*mut c_void),
    import_buffer: unsafe extern "C" fn(
        *mut c_void,
        *const RawBufferDesc,
        *mut *mut c_void,
        *mut c_char,
        usize,
    ) -> i32,
    release_buffer: unsafe extern "C" fn(*mut c_void),
}

/// A `dlopen`ed library, closed on drop.
struct Library {
    handle: *mut c_void,
}

// SAFETY: a dlopen handle may be used from any thread (dlsym/dlclose are thread-safe).
unsafe impl Send for Library {}
// SAFETY: as for Send.
unsafe impl Sync for Library {}

fn dlerror_string() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl call on
    // this thread; we copy it at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated per dlerror's contract.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl Library {
    fn open(path: &Path) -> std::result::Result<Library, String> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| "path contains a NUL byte".to_string())?;
        // SAFETY: `c` is a valid C string. Loading runs the library's constructors, which is
        // the trust we extend to a plugin the operator put in EDGEHAL_DRIVER_PATH.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            return Err(dlerror_string());
        }
        Ok(Library { handle: h })
    }

    fn sym(&self, name: &str) -> Option<*mut c_void> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid handle from dlopen and a valid C string.
        let p = unsafe { libc::dlsym(self.handle, c.as_ptr()) };
        (!p.is_null()).then_some(p)
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: every object made from this library (device, executable, buffer handles)
        // holds an `Arc<Plugin>`, so nothing calls into it after this point.
        unsafe { libc::dlclose(self.handle) };
    }
}

const ERR_LEN: usize = 512;

fn err_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn status_name(s: i32) -> &'static str {
    match s {
        status::UNSUPPORTED => "unsupported",
        status::INVALID => "invalid argument",
        status::DEVICE => "device error",
        status::TIMEOUT => "timed out",
        status::NOMEM => "out of memory",
        _ => "error",
    }
}

/// A loaded, validated plugin.
pub struct Plugin {
    fns: Fns,
    name: String,
    version: String,
    memory_domains: u32,
    path: PathBuf,
    // Last: unloaded after everything else in here.
    _lib: Library,
}

fn cstr_opt(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the ABI requires static NUL-terminated strings from the plugin.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

impl Plugin {
    /// dlopen `path`, call its entry point with [`ABI_VERSION`] and validate the table.
    pub fn load(path: &Path) -> Result<Arc<Plugin>> {
        let shown = path.display();
        let lib = Library::open(path)
            .map_err(|e| Error::arg(format!("plugin {shown}: cannot load: {e}")))?;
        let entry = lib.sym(ENTRY_SYMBOL).ok_or_else(|| {
            Error::arg(format!(
                "plugin {shown}: missing symbol {ENTRY_SYMBOL} (not an edgehal plugin?)"
            ))
        })?;
        // SAFETY: the symbol is the ABI's entry point, whose C type is
        // `const edgehal_plugin_v1 *(*)(uint32_t)`.
        let entry: unsafe extern "C" fn(u32) -> *const PluginV1 =
            unsafe { std::mem::transmute::<*mut c_void, _>(entry) };
        // SAFETY: calling the entry point per the ABI; it takes a plain integer.
        let table = unsafe { entry(ABI_VERSION) };
        if table.is_null() {
            return Err(Error::arg(format!(
                "plugin {shown}: does not support plugin ABI version {ABI_VERSION}"
            )));
        }
        // Read the two leading u32 fields first: every ABI version starts with them.
        // SAFETY: a non-null table is valid for at least its two header words in every version.
        let (ver, size) = unsafe {
            (
                std::ptr::read_unaligned(table.cast::<u32>()),
                std::ptr::read_unaligned(table.cast::<u32>().add(1)),
            )
        };
        if ver != ABI_VERSION {
            return Err(Error::arg(format!(
                "plugin {shown}: speaks plugin ABI version {ver}, this edgehal speaks version \
                 {ABI_VERSION}"
            )));
        }
        let need = std::mem::size_of::<PluginV1>();
        if (size as usize) < need {
            return Err(Error::arg(format!(
                "plugin {shown}: function table is {size} bytes, ABI version {ABI_VERSION} needs \
                 {need}"
            )));
        }
        // SAFETY: version and size checked, so the pointer refers to a complete v1 table,
        // which the ABI says is static for the library's lifetime (we keep the library).
        let t: &PluginV1 = unsafe { &*table };
        macro_rules! need {
            ($f:ident) => {
                t.$f.ok_or_else(|| {
                    Error::arg(format!(
                        "plugin {shown}: table entry `{}` is NULL",
                        stringify!($f)
                    ))
                })?
            };
        }
        let fns = Fns {
            device_count: need!(device_count),
            device_name: need!(device_name),
            open: need!(open),
            close: need!(close),
            supports: need!(supports),
            compile: need!(compile),
            release_executable: need!(release_executable),
            submit: need!(submit),
            fence_wait: need!(fence_wait),
            release_fence: need!(release_fence),
            import_buffer: need!(import_buffer),
            release_buffer: need!(release_buffer),
        };
        let name = cstr_opt(t.name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::arg(format!("plugin {shown}: table has no name")))?;
        let version = cstr_opt(t.version).unwrap_or_default();
        Ok(Arc::new(Plugin {
            fns,
            name,
            version,
            memory_domains: t.memory_domains,
            path: path.to_path_buf(),
            _lib: lib,
        }))
    }

    /// The driver name the plugin reports.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The plugin's version string.
    pub fn version(&self) -> &str {
        &self.version
    }
    /// `EDGEHAL_MEM_*` bits.
    pub fn memory_domains(&self) -> u32 {
        self.memory_domains
    }
    /// Where it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the plugin's devices.
    pub fn device_names(&self) -> Vec<String> {
        // SAFETY: ABI call without arguments.
        let n = unsafe { (self.fns.device_count)() };
        (0..n.min(1024))
            .map(|i| {
                // SAFETY: index below device_count; the result is a static string or NULL.
                let p = unsafe { (self.fns.device_name)(i) };
                cstr_opt(p).unwrap_or_else(|| format!("device{i}"))
            })
            .collect()
    }

    /// Open device `index`.
    pub fn open(self: &Arc<Self>, index: u32) -> Result<Arc<PluginDevice>> {
        let mut h: *mut c_void = std::ptr::null_mut();
        let mut err = [0u8; ERR_LEN];
        // SAFETY: out-pointer and error buffer are live locals of the stated sizes.
        let s = unsafe { (self.fns.open)(index, &mut h, err.as_mut_ptr().cast(), ERR_LEN) };
        if s != status::OK || h.is_null() {
            return Err(Error::Device {
                device: format!("{}:{index}", self.name),
                msg: format!("open failed ({}): {}", status_name(s), err_text(&err)),
            });
        }
        Ok(Arc::new(PluginDevice {
            plugin: Arc::clone(self),
            handle: Mutex::new(DevHandle(h)),
            label: format!("{}:{index}", self.name),
        }))
    }
}

struct DevHandle(*mut c_void);

/// An open plugin device. Calls on it are serialised (the ABI promises plugins that).
pub struct PluginDevice {
    plugin: Arc<Plugin>,
    handle: Mutex<DevHandle>,
    label: String,
}

// SAFETY: the raw handle is only used under the mutex, one call at a time, as the ABI allows.
unsafe impl Send for PluginDevice {}
// SAFETY: as for Send.
unsafe impl Sync for PluginDevice {}

impl Drop for PluginDevice {
    fn drop(&mut self) {
        let h = self.handle.get_mut().unwrap_or_else(|p| p.into_inner()).0;
        // SAFETY: the handle came from `open` and every executable holds an Arc of this
        // device, so nothing uses it after close.
        unsafe { (self.plugin.fns.close)(h) };
    }
}

/// One op of a [`Program`].
#[derive(Clone, Debug)]
pub struct ProgramOp {
    pub op_type: String,
    pub inputs: Vec<u32>,
    pub outputs: Vec<u32>,
}

/// A subgraph in the ABI's terms (see `edgehal_program`).
#[derive(Clone, Debug, Default)]
pub struct Program {
    pub values: Vec<TensorDesc>,
    pub ops: Vec<ProgramOp>,
    pub inputs: Vec<u32>,
    pub outputs: Vec<u32>,
    /// `(value, descriptor, data)`.
    pub constants: Vec<(u32, TensorDesc, Bytes)>,
}

impl Program {
    fn check(&self) -> Result<()> {
        let n = self.values.len() as u32;
        let ok = |v: &u32| *v < n;
        let ok_opt = |v: &u32| *v < n || *v == NO_VALUE;
        if !self.inputs.iter().all(ok)
            || !self.outputs.iter().all(ok)
            || !self.constants.iter().all(|c| ok(&c.0))
            || !self
                .ops
                .iter()
                .all(|o| o.inputs.iter().all(ok_opt) && o.outputs.iter().all(ok))
        {
            return Err(Error::arg("plugin program: value index out of range"));
        }
        Ok(())
    }
}

fn len_u32(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::arg(format!("plugin program: too many {what}")))
}

impl PluginDevice {
    fn lock(&self) -> std::sync::MutexGuard<'_, DevHandle> {
        self.handle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The label used in messages (`example:0`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Ask whether an op with these inputs is supported: `Ok(())` or `Err(reason)`.
    pub fn supports(
        &self,
        op_type: &str,
        inputs: &[TensorDesc],
    ) -> std::result::Result<(), String> {
        let op = CString::new(op_type).map_err(|_| "op type contains NUL".to_string())?;
        let n = u32::try_from(inputs.len()).map_err(|_| "too many inputs".to_string())?;
        let mut reason = [0u8; ERR_LEN];
        let h = self.lock();
        // SAFETY: the handle is live (held under the lock); `op`, `inputs` and `reason` are
        // live for the call with the lengths passed.
        let r = unsafe {
            (self.plugin.fns.supports)(
                h.0,
                op.as_ptr(),
                n,
                inputs.as_ptr(),
                reason.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        if r == 1 {
            Ok(())
        } else {
            let t = err_text(&reason);
            Err(if t.is_empty() {
                format!("{} does not support {op_type}", self.label)
            } else {
                t
            })
        }
    }

    /// Compile a program.
    pub fn compile(self: &Arc<Self>, p: &Program) -> Result<PluginExecutable> {
        p.check()?;
        let names: Vec<CString> = p
            .ops
            .iter()
            .map(|o| CString::new(o.op_type.as_str()).map_err(|_| Error::arg("op type has NUL")))
            .collect::<Result<_>>()?;
        let ops: Vec<RawOp> = p
            .ops
            .iter()
            .zip(&names)
            .map(|(o, n)| {
                Ok(RawOp {
                    op_type: n.as_ptr(),
                    n_inputs: len_u32(o.inputs.len(), "op inputs")?,
                    inputs: o.inputs.as_ptr(),
                    n_outputs: len_u32(o.outputs.len(), "op outputs")?,
                    outputs: o.outputs.as_ptr(),
                })
            })
            .collect::<Result<_>>()?;
        let const_ids: Vec<u32> = p.constants.iter().map(|c| c.0).collect();
        let consts: Vec<RawTensor> = p
            .constants
            .iter()
            .map(|(_, d, b)| RawTensor {
                desc: *d,
                // The plugin only reads constants (const in the header).
                data: b.as_ptr().cast_mut().cast(),
                bytes: b.len() as u64,
            })
            .collect();
        let raw = RawProgram {
            n_values: len_u32(p.values.len(), "values")?,
            values: p.values.as_ptr(),
            n_ops: len_u32(ops.len(), "ops")?,
            ops: ops.as_ptr(),
            n_inputs: len_u32(p.inputs.len(), "inputs")?,
            inputs: p.inputs.as_ptr(),
            n_outputs: len_u32(p.outputs.len(), "outputs")?,
            outputs: p.outputs.as_ptr(),
            n_constants: len_u32(consts.len(), "constants")?,
            constant_values: const_ids.as_ptr(),
            constants: consts.as_ptr(),
        };
        let mut exe: *mut c_void = std::ptr::null_mut();
        let mut err = [0u8; ERR_LEN];
        let h = self.lock();
        // SAFETY: every array `raw` points to (ops, names, ids, descriptors, constant bytes)
        // is owned by this frame or by `p` and outlives the call; the header says the plugin
        // copies what it keeps.
        let s = unsafe {
            (self.plugin.fns.compile)(h.0, &raw, &mut exe, err.as_mut_ptr().cast(), ERR_LEN)
        };
        drop(h);
        if s != status::OK || exe.is_null() {
            return Err(Error::Device {
                device: self.label.clone(),
                msg: format!("compile failed ({}): {}", status_name(s), err_text(&err)),
            });
        }
        Ok(PluginExecutable {
            device: Arc::clone(self),
            handle: exe,
        })
    }

    /// Submit `exe` with raw access to the inputs and outputs, then wait for its fence. The
    /// leases keep the memory valid (and, for dma-bufs, synced) until the fence signalled,
    /// which is as long as the ABI lets the plugin touch it.
    pub fn run(
        &self,
        exe: &PluginExecutable,
        inputs: &[(TensorDesc, &ReadLease<'_>)],
        outputs: &[(TensorDesc, &WriteLease<'_>)],
    ) -> Result<()> {
        if !std::ptr::eq(exe.device.as_ref(), self) {
            return Err(Error::arg("executable belongs to another plugin device"));
        }
        let ins: Vec<RawTensor> = inputs
            .iter()
            .map(|(d, l)| RawTensor {
                desc: *d,
                data: l.ptr().cast_mut().cast(),
                bytes: l.len() as u64,
            })
            .collect();
        let outs: Vec<RawTensor> = outputs
            .iter()
            .map(|(d, l)| RawTensor {
                desc: *d,
                data: l.ptr().cast(),
                bytes: l.len() as u64,
            })
            .collect();
        let mut fence: *mut c_void = std::ptr::null_mut();
        let mut err = [0u8; ERR_LEN];
        let h = self.lock();
        // SAFETY: handles are live; tensor arrays are live locals; their data pointers come
        // from leases borrowed for this whole function, so they stay valid (inputs readable,
        // outputs exclusively writable) until after the fence wait below.
        let s = unsafe {
            (self.plugin.fns.submit)(
                h.0,
                exe.handle,
                ins.as_ptr(),
                len_u32(ins.len(), "inputs")?,
                outs.as_ptr(),
                len_u32(outs.len(), "outputs")?,
                &mut fence,
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        drop(h);
        if s != status::OK || fence.is_null() {
            return Err(Error::Device {
                device: self.label.clone(),
                msg: format!("submit failed ({}): {}", status_name(s), err_text(&err)),
            });
        }
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `fence` came from submit; wait forever (-1) so the leases outlive the work.
        let s =
            unsafe { (self.plugin.fns.fence_wait)(fence, -1, err.as_mut_ptr().cast(), ERR_LEN) };
        // SAFETY: the fence is released exactly once, after its last use.
        unsafe { (self.plugin.fns.release_fence)(fence) };
        if s != status::OK {
            return Err(Error::Device {
                device: self.label.clone(),
                msg: format!("execution failed ({}): {}", status_name(s), err_text(&err)),
            });
        }
        Ok(())
    }

    /// Import host memory under a write lease (the plugin may read and write it while the
    /// returned handle lives, which the borrow ties to the lease).
    pub fn import_host<'l>(&self, lease: &'l WriteLease<'_>) -> Result<PluginBuffer<'l>> {
        let desc = RawBufferDesc {
            kind: 1,
            fd: -1,
            ptr: lease.ptr().cast(),
            offset: 0,
            bytes: lease.len() as u64,
        };
        self.import(&desc)
    }

    /// Import an fd (dma-buf or memfd). The plugin dups what it keeps.
    pub fn import_fd(
        &self,
        kind: BufferKind,
        fd: BorrowedFd<'_>,
        bytes: u64,
    ) -> Result<PluginBuffer<'static>> {
        let desc = RawBufferDesc {
            kind: kind as i32,
            fd: fd.as_raw_fd(),
            ptr: std::ptr::null_mut(),
            offset: 0,
            bytes,
        };
        self.import(&desc)
    }

    fn import<'l>(&self, desc: &RawBufferDesc) -> Result<PluginBuffer<'l>> {
        let mut b: *mut c_void = std::ptr::null_mut();
        let mut err = [0u8; ERR_LEN];
        let h = self.lock();
        // SAFETY: live handle, descriptor and buffers; memory named by the descriptor stays
        // valid for the returned handle's lifetime (its borrow ties it to the lease or fd).
        let s = unsafe {
            (self.plugin.fns.import_buffer)(h.0, desc, &mut b, err.as_mut_ptr().cast(), ERR_LEN)
        };
        drop(h);
        if s != status::OK || b.is_null() {
            return Err(Error::Device {
                device: self.label.clone(),
                msg: format!(
                    "buffer import failed ({}): {}",
                    status_name(s),
                    err_text(&err)
                ),
            });
        }
        Ok(PluginBuffer {
            plugin: Arc::clone(&self.plugin),
            handle: b,
            _borrow: std::marker::PhantomData,
        })
    }
}

/// A compiled program, released on drop.
pub struct PluginExecutable {
    device: Arc<PluginDevice>,
    handle: *mut c_void,
}

// SAFETY: the handle is only passed back to its device, whose calls are serialised.
unsafe impl Send for PluginExecutable {}
// SAFETY: as for Send.
unsafe impl Sync for PluginExecutable {}

impl Drop for PluginExecutable {
    fn drop(&mut self) {
        let _h = self.device.lock();
        // SAFETY: released exactly once; the device (and library) are kept alive by the Arc.
        unsafe { (self.device.plugin.fns.release_executable)(self.handle) };
    }
}

/// An imported buffer handle, released on drop.
pub struct PluginBuffer<'l> {
    plugin: Arc<Plugin>,
    handle: *mut c_void,
    _borrow: std::marker::PhantomData<&'l ()>,
}

impl Drop for PluginBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: released exactly once, library kept alive by the Arc.
        unsafe { (self.plugin.fns.release_buffer)(self.handle) };
    }
}
