//! Sessions: a model prepared once (passes, op resolution, memory plan) and run many times.
//!
//! With one device (the default) a session runs on the CPU executor directly. With more than
//! one device allowed ([`SessionOptions::devices`]), it profiles the graph on each, plans the
//! split and runs through the [`Scheduler`] (asynchronously with [`Session::submit`]).

use edgehal_core::buffer::CopyCounter;
use edgehal_core::driver::TensorBuffer;
use edgehal_core::graph::{Dim, Graph, ValueId};
use edgehal_core::sys::mem::WriteLease;
use edgehal_core::{DType, Error, Result, Tensor};
pub use edgehal_cpu::Produced;
use edgehal_cpu::{Executor, Registry};

use crate::scheduler::{open_devices, Outputs, RunHandle, Scheduler, SchedulerOptions};
use crate::Model;

/// Options for a session.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Device name: `auto` or `cpu` run on the CPU executor; another device name (`vulkan`,
    /// `vulkan0` once the Vulkan driver is registered, a plugin device, `null0`) gets every
    /// node it supports, the CPU the rest.
    pub device: String,
    /// Run graph passes (constant folding, dead node removal, inference). On by default.
    pub optimize: bool,
    /// Devices a multi-device plan may use (`cpu`, `null0`, plugin device names). With more
    /// than one, the session profiles, partitions and schedules; otherwise `device` applies.
    pub devices: Vec<String>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            threads: 0,
            device: "auto".into(),
            optimize: true,
            devices: Vec::new(),
        }
    }
}

/// Name, element type and shape of a session input or output.
#[derive(Clone, Debug)]
pub struct IoInfo {
    pub name: String,
    pub dtype: Option<DType>,
    pub shape: Option<Vec<Dim>>,
}

impl IoInfo {
    /// Shape with symbolic/unknown dimensions replaced by `fill`.
    pub fn concrete_shape(&self, fill: usize) -> Vec<usize> {
        self.shape
            .as_ref()
            .map(|s| s.iter().map(|d| d.fixed().unwrap_or(fill)).collect())
            .unwrap_or_default()
    }
    /// `float32[1,3,224,224]`.
    pub fn describe(&self) -> String {
        let d = self.dtype.map(|d| d.name()).unwrap_or("?");
        match &self.shape {
            Some(s) => format!(
                "{d}[{}]",
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => format!("{d}[?]"),
        }
    }
}

/// A model prepared for execution on a device.
pub struct Session {
    exec: Option<Executor>,
    sched: Option<Scheduler>,
    inputs: Vec<(ValueId, IoInfo)>,
    outputs: Vec<IoInfo>,
    device: String,
    log: String,
    counter: CopyCounter,
}

impl Session {
    /// Prepare `model`.
    pub fn new(model: &Model, opts: &SessionOptions) -> Result<Session> {
        if opts.devices.len() > 1 {
            return Self::new_planned(model, opts);
        }
        match opts.device.as_str() {
            "auto" | "cpu" => {}
            other => return Self::new_on_device(model, opts, other),
        }
        let registry = Registry::new();
        let mut graph: Graph = model.graph.clone();
        let log = if opts.optimize {
            crate::passes::optimize(&mut graph, &registry)?
        } else {
            String::new()
        };
        let info = |g: &Graph, id: ValueId| IoInfo {
            name: g.values[id].name.clone(),
            dtype: g.values[id].dtype,
            shape: g.values[id].shape.clone(),
        };
        let inputs = graph
            .inputs
            .iter()
            .map(|&id| (id, info(&graph, id)))
            .collect();
        let outputs = graph.outputs.iter().map(|&id| info(&graph, id)).collect();
        let mut exec = Executor::new(&graph, &registry).map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", model.name)),
            other => other,
        })?;
        exec.set_threads(opts.threads);
        Ok(Session {
            exec: Some(exec),
            sched: None,
            inputs,
            outputs,
            device: "cpu".into(),
            log,
            counter: CopyCounter::new(),
        })
    }

    /// `device` other than the CPU (`vulkan`, `vulkan0`, a plugin device, `null0`): every node
    /// it supports is pinned to it, the CPU runs the rest, through the scheduler.
    fn new_on_device(model: &Model, opts: &SessionOptions, device: &str) -> Result<Session> {
        let names = vec![device.to_string(), "cpu".to_string()];
        let devices = open_devices(&names).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("device {device}: {m}")),
            other => other,
        })?;
        Self::planned_on(model, opts, devices, true)
    }

    fn new_planned(model: &Model, opts: &SessionOptions) -> Result<Session> {
        let devices = open_devices(&opts.devices)?;
        Self::planned_on(model, opts, devices, false)
    }

    fn planned_on(
        model: &Model,
        opts: &SessionOptions,
        devices: Vec<std::sync::Arc<dyn edgehal_core::driver::Device>>,
        pin_first: bool,
    ) -> Result<Session> {
        let mut graph: Graph = model.graph.clone();
        let log = if opts.optimize {
            crate::passes::optimize_portable(&mut graph, &Registry::new())?
        } else {
            String::new()
        };
        let info = |g: &Graph, id: ValueId| IoInfo {
            name: g.values[id].name.clone(),
            dtype: g.values[id].dtype,
            shape: g.values[id].shape.clone(),
        };
        let inputs = graph
            .inputs
            .iter()
            .map(|&id| (id, info(&graph, id)))
            .collect();
        let outputs = graph.outputs.iter().map(|&id| info(&graph, id)).collect();
        let mut sopts = SchedulerOptions::default();
        if pin_first {
            if let Some(first) = devices.first() {
                let name = first.info().name.clone();
                sopts.constraints.pins = graph
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| {
                        matches!(
                            first.supports(n, &graph),
                            edgehal_core::driver::Support::Yes
                        )
                    })
                    .map(|(i, _)| (i.to_string(), name.clone()))
                    .collect();
            }
        }
        let sched = Scheduler::new(&graph, devices, &sopts).map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", model.name)),
            other => other,
        })?;
        let device = format!("plan({})", sched.plan().used_devices().join("+"));
        Ok(Session {
            exec: None,
            sched: Some(sched),
            inputs,
            outputs,
            device,
            log,
            counter: CopyCounter::new(),
        })
    }

    /// The scheduler, when the session runs a multi-device plan.
    pub fn scheduler(&self) -> Option<&Scheduler> {
        self.sched.as_ref()
    }

    /// Inputs the caller feeds.
    pub fn inputs(&self) -> impl Iterator<Item = &IoInfo> {
        self.inputs.iter().map(|(_, i)| i)
    }
    /// Outputs in graph order.
    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }
    /// The device that runs the session.
    pub fn device(&self) -> &str {
        &self.device
    }
    /// What preparation did (passes).
    pub fn log(&self) -> &str {
        &self.log
    }
    /// The prepared graph.
    pub fn graph(&self) -> &Graph {
        match (&self.exec, &self.sched) {
            (Some(e), _) => e.graph(),
            (None, Some(s)) => s.graph(),
            (None, None) => unreachable!("a session has an executor or a scheduler"),
        }
    }

    /// Run with inputs by name. Every input must be given, with the declared dtype and a shape
    /// that matches every fixed dimension. Returns outputs in graph order.
    pub fn run(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        if let Some(s) = &self.sched {
            let feeds = self.bind(feeds)?;
            return s.run(feeds.into_iter().map(|(_, n, t)| (n, t)).collect(), None);
        }
        let bound: Vec<(ValueId, Tensor)> = self
            .bind(feeds)?
            .into_iter()
            .map(|(id, _, t)| (id, t))
            .collect();
        let Some(exec) = &self.exec else {
            return Err(Error::arg("session has no executor"));
        };
        let outs = exec.run(&bound)?;
        Ok(self
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(outs)
            .collect())
    }

    /// The session's copy counter. Buffers made with it (`Buffer::alloc(n, session.copies())`,
    /// imports) record the copies edgehal makes for them, and [`Session::run_bound`] records
    /// the outputs it has to copy, so a test can assert that bound inputs and outputs cost
    /// nothing.
    pub fn copies(&self) -> &CopyCounter {
        &self.counter
    }

    /// [`Session::run`] with caller memory for the outputs: `dests[i]` (when given) receives
    /// output `i` in place if the op producing it can write there (see
    /// [`edgehal_cpu::Executor::run_into`]; single-device sessions only), reported as
    /// [`Produced::InPlace`]. Every other output comes back as a tensor.
    pub fn run_into(
        &self,
        feeds: &[(&str, Tensor)],
        dests: Vec<Option<&mut [u8]>>,
    ) -> Result<Vec<(String, Produced)>> {
        if dests.len() > self.outputs.len() {
            return Err(Error::arg(format!(
                "{} output destinations given, the session has {} outputs",
                dests.len(),
                self.outputs.len()
            )));
        }
        let produced: Vec<Produced> = match &self.exec {
            Some(exec) => {
                let bound: Vec<(ValueId, Tensor)> = self
                    .bind(feeds)?
                    .into_iter()
                    .map(|(id, _, t)| (id, t))
                    .collect();
                exec.run_into(&bound, dests)?
            }
            None => self
                .run(feeds)?
                .into_iter()
                .map(|(_, t)| Produced::Tensor(t))
                .collect(),
        };
        Ok(self
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(produced)
            .collect())
    }

    /// Run with caller buffers: `inputs` by name, `outputs` one slot per session output in
    /// order. Inputs are read in place where [`edgehal_core::buffer::Buffer::to_tensor`]
    /// allows. A bound output (`Some`) is computed straight into its buffer when the buffer
    /// is writable in place (not shared outside the process, not aliasing an input) and the
    /// op producing it can write there (single-device sessions; Gemm and MatMul in f32, the
    /// final op of most classifiers); otherwise the result is copied in once, recorded in
    /// [`Session::copies`]. An unbound output (`None`) comes back as a buffer over the
    /// computed tensor, without a copy. Returns the output buffers in order.
    pub fn run_bound(
        &self,
        inputs: &[(&str, TensorBuffer)],
        outputs: &[Option<TensorBuffer>],
    ) -> Result<Vec<TensorBuffer>> {
        if outputs.len() != self.outputs.len() {
            return Err(Error::arg(format!(
                "{} output slots given, the session has {} outputs",
                outputs.len(),
                self.outputs.len()
            )));
        }
        let tensors: Vec<(&str, Tensor)> = inputs
            .iter()
            .map(|(n, tb)| {
                tb.to_tensor()
                    .map(|t| (*n, t))
                    .map_err(|e| Error::arg(format!("input '{n}': {e}")))
            })
            .collect::<Result<_>>()?;
        // Write leases on the bound outputs; one that cannot be had (shared memory, aliasing an
        // input being read) leaves that output to the copy below.
        let mut leases: Vec<Option<WriteLease<'_>>> = outputs
            .iter()
            .map(|o| o.as_ref().and_then(|tb| tb.buffer.write_in_place().ok()))
            .collect();
        let dests: Vec<Option<&mut [u8]>> = leases
            .iter_mut()
            .map(|l| l.as_mut().and_then(|l| l.as_mut_slice().ok()))
            .collect();
        let r = self.run_into(&tensors, dests);
        drop(leases);
        let produced: Vec<Produced> = r?.into_iter().map(|(_, p)| p).collect();
        // Input views go before outputs are written (an output may share an input's memory).
        drop(tensors);
        let mut out = Vec::with_capacity(produced.len());
        for ((p, slot), info) in produced.into_iter().zip(outputs).zip(&self.outputs) {
            let name = &info.name;
            let (dtype, shape) = match &p {
                Produced::InPlace { dtype, shape } => (*dtype, shape.clone()),
                Produced::Tensor(t) => (t.dtype(), t.shape().to_vec()),
            };
            match (p, slot) {
                (p, Some(tb)) => {
                    if tb.dtype != dtype || tb.shape != shape {
                        return Err(Error::arg(format!(
                            "output '{name}': bound as {} {:?}, computed {dtype} {shape:?}",
                            tb.dtype, tb.shape
                        )));
                    }
                    if let Produced::Tensor(t) = p {
                        // One copy, recorded in the session's counter.
                        tb.buffer
                            .write_from(0, t.bytes())
                            .map_err(|e| Error::arg(format!("output '{name}': {e}")))?;
                        self.counter.record(t.bytes().len());
                    }
                    out.push(tb.clone());
                }
                (Produced::Tensor(t), None) => {
                    out.push(TensorBuffer::from_tensor(&t, &self.counter))
                }
                (Produced::InPlace { .. }, None) => {
                    return Err(Error::arg(format!(
                        "output '{name}' was written in place without a destination"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Start a run and return at once; poll or wait on the handle. Single-device sessions
    /// compute before returning (the handle is then already complete).
    pub fn submit(&self, feeds: &[(&str, Tensor)]) -> Result<RunHandle> {
        if let Some(s) = &self.sched {
            let feeds = self.bind(feeds)?;
            return s.submit(feeds.into_iter().map(|(_, n, t)| (n, t)).collect());
        }
        Ok(RunHandle::ready(self.run(feeds)))
    }

    /// [`Session::submit`] with a callback called once when the run ends.
    pub fn submit_with(
        &self,
        feeds: &[(&str, Tensor)],
        cb: impl FnOnce(&Result<Outputs>) + Send + 'static,
    ) -> Result<RunHandle> {
        if let Some(s) = &self.sched {
            let feeds = self.bind(feeds)?;
            return s.submit_with(
                feeds.into_iter().map(|(_, n, t)| (n, t)).collect(),
                Some(Box::new(cb)),
            );
        }
        let r = self.run(feeds);
        cb(&r);
        Ok(RunHandle::ready(r))
    }

    /// Check feeds against the declared inputs; (id, name, tensor) in input order.
    fn bind(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<(ValueId, String, Tensor)>> {
        for (name, _) in feeds {
            if !self.inputs.iter().any(|(_, i)| i.name == *name) {
                let names: Vec<&str> = self.inputs.iter().map(|(_, i)| i.name.as_str()).collect();
                return Err(Error::arg(format!(
                    "no input named '{name}' (inputs: {})",
                    names.join(", ")
                )));
            }
        }
        let mut bound = Vec::with_capacity(self.inputs.len());
        for (id, info) in &self.inputs {
            let t = feeds
                .iter()
                .find(|(n, _)| *n == info.name)
                .map(|(_, t)| t)
                .ok_or_else(|| {
                    Error::arg(format!(
                        "input '{}' ({}) was not given",
                        info.name,
                        info.describe()
                    ))
                })?;
            check_input(info, t).map_err(|e| match e {
                Error::InvalidArgument(m) => {
                    let key = format!("tflite.shape_signature.{}", info.name);
                    match self.graph().metadata.get(&key) {
                        Some(sig) => Error::InvalidArgument(format!(
                            "{m} (the model marks dims dynamic, signature [{sig}]; like the \
                             TFLite interpreter, edgehal prepares it at the stored shape)"
                        )),
                        None => Error::InvalidArgument(m),
                    }
                }
                other => other,
            })?;
            bound.push((*id, info.name.clone(), t.clone()));
        }
        Ok(bound)
    }
}

fn check_input(info: &IoInfo, t: &Tensor) -> Result<()> {
    if let Some(d) = info.dtype {
        if d != t.dtype() {
            return Err(Error::arg(format!(
                "input '{}': expected {}, got {}",
                info.name,
                info.describe(),
                t.dtype()
            )));
        }
    }
    if let Some(shape) = &info.shape {
        let ok = shape.len() == t.rank()
            && shape
                .iter()
                .zip(t.shape())
                .all(|(d, &got)| d.fixed().map(|want| want == got).unwrap_or(true));
        if !ok {
            return Err(Error::arg(format!(
                "input '{}': expected shape {}, got {:?}",
                info.name,
                info.describe(),
                t.shape()
            )));
        }
    }
    Ok(())
}
