//! The Vulkan [`hal::Driver`] and [`hal::Device`].
//!
//! `compile` keeps the subgraph; the first `submit` for a set of input shapes lowers it
//! ([`crate::plan`]), uploads weights and parameters once, and builds the pipelines. Each
//! distinct set of bound buffers (imported caller memory or staging) gets one command buffer,
//! recorded once and replayed on every later submit with the same buffers. `submit` returns
//! as soon as the work is queued, with a pending [`Fence`] that the one process-wide waiter
//! ([`crate::waiter`]) signals: it polls exported sync_file fds where the device offers them
//! and time-slices `vkWaitForFences` otherwise.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ash::vk;
use edgehal_core::buffer::{Buffer, MemoryDomain};
use edgehal_core::driver::{self as hal, Bindings, DeviceInfo, Fence, Subgraph, Support, SysRoot};
use edgehal_core::graph::{Graph, Node};
use edgehal_core::{DType, Error, Result, Tensor};

use crate::plan::{self, Kernel, Place, Plan, Tune};
use crate::probe::{Listing, PhysInfo};
use crate::raw::{self, Ctx, Dispatch, GpuBuffer, Loader, Pipeline, Placement, Recording};
use crate::waiter;

/// How long one submission may run before it is reported as hung.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Imported host buffers kept per executable (with their recordings) before the cache resets.
const MAX_IMPORTS: usize = 16;

fn loader() -> std::result::Result<Arc<Loader>, String> {
    static L: OnceLock<std::result::Result<Arc<Loader>, String>> = OnceLock::new();
    L.get_or_init(Loader::open).clone()
}

/// Enumerate Vulkan devices (opens the loader; not a pure file probe).
pub fn list() -> Listing {
    match loader().and_then(|l| l.devices()) {
        Ok(d) => Listing::Devices(d.into_iter().map(|(_, i)| i).collect()),
        Err(why) => Listing::Unavailable(why),
    }
}

/// Open a device chosen by index (`"0"`), name substring (`"llvmpipe"`, case-insensitive), or
/// the first GPU when `selector` is empty (a CPU implementation such as lavapipe only when
/// there is nothing else).
pub fn open(selector: &str) -> Result<Arc<Device>> {
    open_with(selector, &OpenOptions::default())
}

/// How [`open_with`] sets up a device.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Use packed 4x8-bit integer dot products where the device has them (default true);
    /// false selects the portable integer kernels.
    pub integer_dot_product: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            integer_dot_product: true,
        }
    }
}

/// [`open`] with options.
pub fn open_with(selector: &str, opts: &OpenOptions) -> Result<Arc<Device>> {
    let l = loader().map_err(|why| Error::Device {
        device: "vulkan".into(),
        msg: why,
    })?;
    let devs = l.devices().map_err(|why| Error::Device {
        device: "vulkan".into(),
        msg: why,
    })?;
    let sel = selector.trim();
    let pick = if sel.is_empty() {
        devs.iter()
            .find(|(_, i)| i.device_type != "cpu")
            .or_else(|| devs.first())
    } else if let Ok(ix) = sel.parse::<usize>() {
        devs.iter().find(|(_, i)| i.index == ix)
    } else {
        let s = sel.to_lowercase();
        devs.iter()
            .find(|(_, i)| i.name.to_lowercase().contains(&s) || i.device_name() == s)
    };
    let (pd, info) = pick.cloned().ok_or_else(|| Error::Device {
        device: "vulkan".into(),
        msg: format!(
            "no Vulkan device matches '{sel}' (have: {})",
            devs.iter()
                .map(|(_, i)| format!("[{}] {}", i.index, i.name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })?;
    let ctx = Ctx::open(l, pd, info, opts.integer_dot_product)?;
    Ok(Arc::new(Device::new(ctx)))
}

/// The Vulkan driver.
#[derive(Default)]
pub struct Driver;

impl hal::Driver for Driver {
    fn name(&self) -> &str {
        "vulkan"
    }

    /// On the live root the loader is opened and physical devices are enumerated (as the CPU
    /// probe reads CPUID there); a fixture root has no Vulkan devices to report.
    fn probe(&self, root: &SysRoot) -> Vec<DeviceInfo> {
        if !root.is_live() {
            return Vec::new();
        }
        match list() {
            Listing::Devices(d) => d.iter().map(PhysInfo::device_info).collect(),
            Listing::Unavailable(why) => {
                let mut d = DeviceInfo::new(
                    "vulkan",
                    hal::DeviceKind::Gpu,
                    "vulkan",
                    vec![MemoryDomain::Host],
                );
                d.description = "Vulkan".into();
                d.unavailable = Some(why);
                vec![d]
            }
        }
    }

    fn open(&self, info: &DeviceInfo) -> Result<Arc<dyn hal::Device>> {
        if info.driver != "vulkan" {
            return Err(Error::arg(format!(
                "vulkan driver cannot open '{}' of driver '{}'",
                info.name, info.driver
            )));
        }
        if let Some(why) = &info.unavailable {
            return Err(Error::Device {
                device: info.name.clone(),
                msg: why.clone(),
            });
        }
        let ix = info
            .properties
            .get("vulkan_index")
            .cloned()
            .unwrap_or_else(|| info.name.trim_start_matches("vulkan").to_string());
        let d: Arc<dyn hal::Device> = open(&ix)?;
        Ok(d)
    }
}

/// An opened Vulkan device.
pub struct Device {
    info: DeviceInfo,
    ctx: Arc<Ctx>,
    tune: Tune,
    pipes: Mutex<HashMap<Kernel, Arc<Pipeline>>>,
}

impl Device {
    fn new(ctx: Arc<Ctx>) -> Device {
        let i = &ctx.info;
        let mut tune = Tune::for_device(
            i.max_workgroup_invocations,
            i.max_shared_memory,
            i.subgroup_size,
        );
        tune.int_dot = ctx.int_dot;
        Device {
            info: i.device_info(),
            tune,
            ctx,
            pipes: Mutex::new(HashMap::new()),
        }
    }

    /// What the physical device offers.
    pub fn phys(&self) -> &PhysInfo {
        &self.ctx.info
    }

    /// Which kernel runs integer GEMMs (MatMulInteger, QLinearMatMul): `dot4x8` (packed
    /// integer dot products) or `int32` (portable).
    pub fn int8_kernel(&self) -> &'static str {
        if self.tune.int_dot {
            "dot4x8"
        } else {
            "int32"
        }
    }

    /// Workgroup sizes chosen for this device.
    pub fn tune(&self) -> Tune {
        self.tune
    }

    /// True when host buffers can be imported without copying.
    pub fn can_import_host(&self) -> bool {
        self.ctx.info.external_memory_host
    }

    /// Byte alignment (address and length) an imported host buffer needs.
    pub fn import_alignment(&self) -> usize {
        (self.ctx.info.min_imported_host_pointer_alignment as usize)
            .max(edgehal_core::buffer::page_size())
    }

    fn pipeline(&self, k: Kernel) -> Result<Arc<Pipeline>> {
        let mut p = self.pipes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = p.get(&k) {
            return Ok(Arc::clone(x));
        }
        let pipe = Arc::new(Pipeline::new(&self.ctx, k.spirv(), &self.tune.spec(k))?);
        p.insert(k, Arc::clone(&pipe));
        Ok(pipe)
    }

    fn prepare(&self, sub: &Subgraph, shapes: &[Vec<usize>]) -> Result<Compiled> {
        let plan = plan::lower(&sub.graph, shapes, self.tune)?;
        let ctx = &self.ctx;
        let max = ctx.info.max_storage_buffer_range as usize;
        for (what, n) in [
            ("arena", plan.arena),
            ("weights", plan.weights.len()),
            ("parameters", plan.params.len()),
        ] {
            if n * 4 > max {
                return Err(Error::unsupported(format!(
                    "{}: {what} needs {} bytes, over maxStorageBufferRange {max}",
                    self.info.name,
                    n * 4
                )));
            }
        }
        let params = GpuBuffer::new(ctx, (plan.params.len() * 4) as u64, Placement::Device)?;
        raw::upload(ctx, &params, &u32_bytes(&plan.params))?;
        let weights = GpuBuffer::new(ctx, (plan.weights.len() * 4) as u64, Placement::Device)?;
        raw::upload(ctx, &weights, &f32_bytes(&plan.weights))?;
        let arena = GpuBuffer::new(ctx, (plan.arena * 4) as u64, Placement::Device)?;
        let (params, weights, arena) = (Arc::new(params), Arc::new(weights), Arc::new(arena));
        let pipes = plan
            .steps
            .iter()
            .map(|s| self.pipeline(s.kernel))
            .collect::<Result<Vec<_>>>()?;
        Ok(Compiled {
            stage_in: (0..plan.input_shapes.len()).map(|_| None).collect(),
            stage_out: (0..plan.output_shapes.len()).map(|_| None).collect(),
            plan,
            params,
            weights,
            arena,
            pipes,
            imports: Vec::new(),
            recs: Vec::new(),
            stage_busy: None,
        })
    }
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// A lowered subgraph with its device buffers and recordings.
///
/// Every device object is behind an `Arc`: a submission in flight holds clones until its
/// completion, so re-planning or evicting the import cache never frees memory the GPU uses.
struct Compiled {
    plan: Plan,
    params: Arc<GpuBuffer>,
    weights: Arc<GpuBuffer>,
    arena: Arc<GpuBuffer>,
    pipes: Vec<Arc<Pipeline>>,
    stage_in: Vec<Option<Arc<GpuBuffer>>>,
    stage_out: Vec<Option<Arc<GpuBuffer>>>,
    /// The last submission that used the staging buffers (the next one waits for it).
    stage_busy: Option<Fence>,
    /// Imported caller buffers.
    imports: Vec<Arc<GpuBuffer>>,
    /// Recordings keyed by the buffers bound to the inputs and outputs, with the fence of
    /// their last submission (a recording is not resubmitted while pending).
    recs: Vec<(Vec<vk::Buffer>, Arc<Recording>, Option<Fence>)>,
}

/// A subgraph compiled for a Vulkan device.
pub struct Executable {
    sub: Subgraph,
    device: String,
    state: Mutex<Option<Compiled>>,
}

impl hal::Executable for Executable {
    fn device(&self) -> &str {
        &self.device
    }
    fn subgraph(&self) -> &Subgraph {
        &self.sub
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Executable {
    /// Number of command buffers recorded so far (one per distinct set of bound buffers).
    pub fn recordings(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().map_or(0, |c| c.recs.len())
    }

    /// Arena size in bytes of the current plan.
    pub fn arena_bytes(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().map_or(0, |c| c.plan.arena * 4)
    }

    /// Number of dispatches of kernel `k` in the current plan.
    pub fn dispatches_of(&self, k: Kernel) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().map_or(0, |c| {
            c.plan.steps.iter().filter(|st| st.kernel == k).count()
        })
    }

    /// Number of dispatches in the current plan.
    pub fn dispatches(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().map_or(0, |c| c.plan.steps.len())
    }
}

fn static_inputs_ok(n: &Node, g: &Graph, consts: &[usize]) -> Support {
    for &k in consts {
        if let Some(Some(v)) = n.inputs.get(k) {
            let is_const = g.initializers.contains_key(v)
                || g.nodes
                    .iter()
                    .any(|m| m.op == "Constant" && m.outputs.first() == Some(&Some(*v)));
            if !is_const {
                return Support::no(format!("{}: input {k} must be a constant on vulkan", n.op));
            }
        }
    }
    Support::Yes
}

impl hal::Device for Device {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn supports(&self, node: &Node, graph: &Graph) -> Support {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return Support::no(format!(
                "op {}.{} is not implemented on vulkan",
                node.domain, node.op
            ));
        }
        if !plan::SUPPORTED.contains(&node.op.as_str()) {
            return Support::no(format!("op {} is not implemented on vulkan", node.op));
        }
        for v in node.inputs.iter().chain(&node.outputs).flatten() {
            if let Some(dt) = graph.values.get(*v).and_then(|i| i.dtype) {
                let shape_input = matches!(
                    node.op.as_str(),
                    "Reshape" | "Slice" | "Pad" | "Resize" | "Squeeze" | "Unsqueeze"
                ) && node.inputs.first() != Some(&Some(*v))
                    && !node.outputs.contains(&Some(*v));
                let quant = matches!(
                    node.op.as_str(),
                    "QuantizeLinear"
                        | "DequantizeLinear"
                        | "MatMulInteger"
                        | "QLinearMatMul"
                        | "ConvInteger"
                        | "QLinearConv"
                        | "Cast"
                );
                if dt != DType::F32 && !shape_input && !quant && node.op != "Constant" {
                    return Support::no(format!(
                        "{}: {dt} values are not supported on vulkan (float32 only)",
                        node.op
                    ));
                }
            }
        }
        match node.op.as_str() {
            "Clip" => static_inputs_ok(node, graph, &[1, 2]),
            "Reshape" | "Squeeze" | "Unsqueeze" => static_inputs_ok(node, graph, &[1]),
            "Slice" => static_inputs_ok(node, graph, &[1, 2, 3, 4]),
            "Pad" => static_inputs_ok(node, graph, &[1, 2, 3]),
            "QuantizeLinear" | "DequantizeLinear" => static_inputs_ok(node, graph, &[1, 2]),
            "BatchNormalization" => {
                if node.outputs.iter().skip(1).flatten().next().is_some() {
                    return Support::no("BatchNormalization: training outputs on vulkan");
                }
                Support::Yes
            }
            "Resize" => {
                if node
                    .attr_s("mode")
                    .is_some_and(|m| m != "nearest" && m != "linear")
                {
                    return Support::no("Resize: only nearest and linear modes on vulkan");
                }
                static_inputs_ok(node, graph, &[1, 2, 3])
            }
            "MaxPool" if node.outputs.get(1).copied().flatten().is_some() => {
                Support::no("MaxPool: Indices output is not supported on vulkan")
            }
            _ => Support::Yes,
        }
    }

    fn memory(&self) -> &[MemoryDomain] {
        &self.info.memory_domains
    }

    fn compile(&self, sub: &Subgraph) -> Result<Box<dyn hal::Executable>> {
        sub.graph.topo_order()?;
        for n in &sub.graph.nodes {
            if let Support::No { reason } = self.supports(n, &sub.graph) {
                return Err(Error::unsupported(reason));
            }
        }
        let exe = Executable {
            sub: sub.clone(),
            device: self.info.name.clone(),
            state: Mutex::new(None),
        };
        // Lower now when every input shape is declared (errors surface at compile time).
        let declared: Option<Vec<Vec<usize>>> = sub
            .graph
            .inputs
            .iter()
            .map(|&v| sub.graph.values.get(v).and_then(|i| i.fixed_shape()))
            .collect();
        if let Some(shapes) = declared {
            *exe.state.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(self.prepare(sub, &shapes)?);
        }
        Ok(Box::new(exe))
    }

    fn submit(&self, exe: &dyn hal::Executable, bindings: &Bindings) -> Result<Fence> {
        let exe = exe.as_any().downcast_ref::<Executable>().ok_or_else(|| {
            Error::arg(format!(
                "executable was compiled by device '{}', not by {}",
                exe.device(),
                self.info.name
            ))
        })?;
        bindings.check(&exe.sub)?;
        // Errors before the work is queued are reported through the fence, as completions
        // are (callers handle one path).
        match self.run(exe, bindings) {
            Ok(f) => Ok(f),
            Err(e) => Fence::done(&self.info.name, Err(e)),
        }
    }
}

impl Device {
    fn import(&self, c: &mut Compiled, b: &Buffer) -> Option<Arc<GpuBuffer>> {
        // Cached: the same memory at the same place.
        let hit = c.imports.iter().find(|g| {
            g.host()
                .is_some_and(|h| h.same_memory(b) && h.offset() == b.offset() && h.len() == b.len())
        });
        if let Some(g) = hit {
            return Some(Arc::clone(g));
        }
        let g = Arc::new(self.import_new(b)?);
        if c.imports.len() >= MAX_IMPORTS {
            // Submissions in flight keep their own clones of what they use.
            c.recs.clear();
            c.imports.clear();
        }
        c.imports.push(Arc::clone(&g));
        Some(g)
    }

    /// A new import of `b`: a dma-buf through its fd, else host memory by pointer.
    fn import_new(&self, b: &Buffer) -> Option<GpuBuffer> {
        if b.domain() == MemoryDomain::DmaBuf && self.can_import_dmabuf().is_ok() {
            if let Ok(g) = GpuBuffer::import_dmabuf(&self.ctx, b) {
                return Some(g);
            }
        }
        if !self.can_import_host() {
            return None;
        }
        GpuBuffer::import(&self.ctx, b).ok()
    }

    /// Whether dma-bufs are imported by fd (`VK_KHR_external_memory_fd` +
    /// `VK_EXT_external_memory_dma_buf`), or why not.
    pub fn can_import_dmabuf(&self) -> std::result::Result<(), String> {
        let i = &self.ctx.info;
        if !i.external_memory_fd {
            return Err(format!(
                "unavailable: {} does not offer VK_KHR_external_memory_fd",
                i.name
            ));
        }
        if !i.external_memory_dma_buf {
            return Err(format!(
                "unavailable: {} does not offer VK_EXT_external_memory_dma_buf",
                i.name
            ));
        }
        Ok(())
    }

    /// Submit and return at once; the shared waiter ([`crate::waiter`]) finishes the job and
    /// signals the returned fence.
    fn run(&self, exe: &Executable, bindings: &Bindings) -> Result<Fence> {
        let g = &exe.sub.graph;
        let ins = bindings.inputs().to_vec();
        for (i, tb) in ins.iter().enumerate() {
            if tb.dtype != DType::F32 {
                return Err(Error::arg(format!(
                    "input '{}' is {}; vulkan runs float32 only",
                    g.value_name(g.inputs[i]),
                    tb.dtype
                )));
            }
        }
        let shapes: Vec<Vec<usize>> = ins.iter().map(|t| t.shape.clone()).collect();
        let mut st = exe.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.as_ref().is_none_or(|c| c.plan.input_shapes != shapes) {
            *st = None;
            *st = Some(self.prepare(&exe.sub, &shapes)?);
        }
        let c = st.as_mut().ok_or_else(|| Error::arg("vulkan: no plan"))?;
        let counter = bindings.counter().clone();
        let mut keep: Vec<Box<dyn Any + Send + Sync>> = Vec::new();

        // Which caller buffers are imported (no copy); the rest go through staging.
        let in_imp: Vec<Option<Arc<GpuBuffer>>> =
            ins.iter().map(|tb| self.import(c, &tb.buffer)).collect();
        let outs: Vec<Option<hal::TensorBuffer>> = (0..bindings.num_outputs())
            .map(|j| bindings.output(j))
            .collect();
        let mut out_imp: Vec<Option<Arc<GpuBuffer>>> = Vec::with_capacity(outs.len());
        for (j, o) in outs.iter().enumerate() {
            let shape = c
                .plan
                .output_shapes
                .get(j)
                .ok_or_else(|| Error::arg(format!("output {j} is not in the plan")))?;
            let mut imp = None;
            if let Some(tb) = o {
                if tb.dtype != DType::F32 || &tb.shape != shape {
                    return Err(Error::arg(format!(
                        "output '{}': bound as {} {:?}, computes f32 {shape:?}",
                        g.value_name(g.outputs[j]),
                        tb.dtype,
                        tb.shape
                    )));
                }
                if tb.buffer.is_writable() {
                    imp = self.import(c, &tb.buffer);
                }
            }
            out_imp.push(imp);
        }
        let staged = in_imp.iter().chain(&out_imp).any(Option::is_none);
        if staged {
            // The staging buffers are shared by this executable's submissions.
            if let Some(f) = c.stage_busy.take() {
                f.wait(Some(SUBMIT_TIMEOUT))?;
            }
        }

        // Inputs: staged ones copied in (counted).
        let mut in_bufs = Vec::with_capacity(ins.len());
        for (i, tb) in ins.iter().enumerate() {
            if let Some(imp) = &in_imp[i] {
                in_bufs.push(imp.buf);
                keep.push(Box::new(Arc::clone(imp)));
                continue;
            }
            let n = tb.byte_len();
            if c.stage_in[i].is_none() {
                c.stage_in[i] = Some(Arc::new(GpuBuffer::new(
                    &self.ctx,
                    n as u64,
                    Placement::Host,
                )?));
            }
            let stage = c.stage_in[i]
                .as_ref()
                .ok_or_else(|| Error::arg("staging"))?;
            let mut tmp = vec![0u8; n];
            tb.buffer.read_into(0, &mut tmp)?;
            stage.write(0, &tmp)?;
            counter.record(n);
            in_bufs.push(stage.buf);
            keep.push(Box::new(Arc::clone(stage)));
        }
        // Outputs: the caller's buffer imported, or a staging buffer read back afterwards.
        let mut out_bufs = Vec::with_capacity(outs.len());
        let mut readback: Vec<(usize, Arc<GpuBuffer>, Vec<usize>)> = Vec::new();
        for (j, imp) in out_imp.iter().enumerate() {
            if let Some(imp) = imp {
                out_bufs.push(imp.buf);
                keep.push(Box::new(Arc::clone(imp)));
                continue;
            }
            let shape = c.plan.output_shapes[j].clone();
            let n = shape.iter().product::<usize>() * 4;
            if c.stage_out[j].is_none() {
                c.stage_out[j] = Some(Arc::new(GpuBuffer::new(
                    &self.ctx,
                    n as u64,
                    Placement::Host,
                )?));
            }
            let stage = c.stage_out[j]
                .as_ref()
                .ok_or_else(|| Error::arg("staging"))?;
            out_bufs.push(stage.buf);
            readback.push((j, Arc::clone(stage), shape));
        }

        let key: Vec<vk::Buffer> = in_bufs.iter().chain(&out_bufs).copied().collect();
        let ri = match c.recs.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                let resolve = |p: Option<Place>| match p {
                    None => c.params.buf,
                    Some(Place::Arena) => c.arena.buf,
                    Some(Place::Weights) => c.weights.buf,
                    Some(Place::Input(i)) => in_bufs.get(i).copied().unwrap_or(c.params.buf),
                    Some(Place::Output(j)) => out_bufs.get(j).copied().unwrap_or(c.params.buf),
                };
                let steps: Vec<Dispatch> = c
                    .plan
                    .steps
                    .iter()
                    .zip(&c.pipes)
                    .enumerate()
                    .map(|(i, (s, p))| Dispatch {
                        pipe: p.pipe,
                        bufs: [
                            c.params.buf,
                            resolve(s.bufs[0]),
                            resolve(s.bufs[1]),
                            resolve(s.bufs[2]),
                            resolve(s.bufs[3]),
                        ],
                        base: s.base,
                        groups: s.groups,
                        barrier: i > 0,
                    })
                    .collect();
                let rec = Arc::new(Recording::new(&self.ctx, &steps)?);
                c.recs.push((key, rec, None));
                c.recs.len() - 1
            }
        };
        // A command buffer is not resubmitted while it is pending.
        if let Some(f) = c.recs[ri].2.take() {
            f.wait(Some(SUBMIT_TIMEOUT))?;
        }
        let rec = Arc::clone(&c.recs[ri].1);

        // Hold the leases of every imported buffer until the device is done with it.
        let mut leases = Vec::new();
        for (i, tb) in ins.iter().enumerate() {
            if in_imp[i].is_some() {
                leases.push(raw::HeldLease::take(&tb.buffer, false)?);
            }
        }
        for (j, o) in outs.iter().enumerate() {
            if let (Some(_), Some(tb)) = (&out_imp[j], o) {
                leases.push(raw::HeldLease::take(&tb.buffer, true)?);
            }
        }
        keep.push(Box::new(Arc::clone(&c.params)));
        keep.push(Box::new(Arc::clone(&c.weights)));
        keep.push(Box::new(Arc::clone(&c.arena)));
        keep.push(Box::new(c.pipes.clone()));

        let (fence, signal) = Fence::pending(&self.info.name)?;
        waiter::ensure()?;
        let how = rec.submit()?;
        let b = bindings.clone();
        let finish: waiter::Finish = Box::new(move || {
            for (j, stage, shape) in readback {
                let n = shape.iter().product::<usize>();
                let mut bytes = vec![0u8; n * 4];
                stage.read(0, &mut bytes)?;
                let v: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|ch| f32::from_ne_bytes([ch[0], ch[1], ch[2], ch[3]]))
                    .collect();
                counter.record(n * 4);
                b.deliver(j, &Tensor::from_vec(shape, v)?)?;
            }
            Ok(())
        });
        // Mark the recording (and staging) busy before handing over, so nothing reuses them
        // while the job is queued even if the hand-over reports an error.
        c.recs[ri].2 = Some(fence.clone());
        if staged {
            c.stage_busy = Some(fence.clone());
        }
        waiter::hand_over(waiter::Job {
            rec,
            how,
            keep,
            leases,
            finish,
            signal,
            deadline: std::time::Instant::now() + SUBMIT_TIMEOUT,
        })?;
        Ok(fence)
    }
}
