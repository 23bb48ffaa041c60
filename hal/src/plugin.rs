//! Vendor plugins: shared objects implementing the C ABI in
//! `drivers/plugin-example/include/edgehal_plugin.h`, found through `EDGEHAL_DRIVER_PATH`
//! (colon-separated directories or `.so` files) and wrapped as a [`Driver`].
//!
//! The raw FFI (dlopen, the function table, every `unsafe` call) lives in
//! [`edgehal_core::sys::dl`]; this module is safe code that translates between the graph IR
//! and the ABI's program/tensor descriptors. Nodes with attributes or from another domain are
//! not offered to plugins (ABI v1 passes none). Submission waits for the plugin's fence before
//! returning (so the leases on the bound memory outlive the plugin's access), then hands back
//! an already-signalled [`Fence`]. Inputs and outputs are passed as pointers into the bound
//! buffers: no copies.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgehal_core::buffer::{Buffer, MemoryDomain};
use edgehal_core::driver::{
    Bindings, Device, DeviceInfo, DeviceKind, Driver, Executable, Fence, Subgraph, Support,
    SysRoot, TensorBuffer,
};
use edgehal_core::graph::{Dim, Graph, Node, ValueInfo};
use edgehal_core::infer::infer_shapes;
use edgehal_core::sys::dl::{
    mem_bits, Plugin, PluginDevice, PluginExecutable, Program, ProgramOp, TensorDesc, NO_VALUE,
};
use edgehal_core::{Error, Result};

/// The environment variable listing plugin directories and files.
pub const DRIVER_PATH_ENV: &str = "EDGEHAL_DRIVER_PATH";

fn is_shared_object(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.ends_with(".so") || name.contains(".so.")
}

/// The plugin files named by a colon-separated list of directories and files, in order
/// (each directory's `.so` files sorted by name). Entries that do not exist are skipped.
pub fn plugin_paths(spec: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in spec.split(':').filter(|e| !e.is_empty()) {
        let p = Path::new(entry);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|f| f.is_file() && is_shared_object(f))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            out.extend(files);
        } else if p.is_file() {
            out.push(p.to_path_buf());
        }
    }
    out
}

/// Load every plugin named by `spec` (see [`plugin_paths`]); one result per file, so a bad
/// plugin is reported without hiding the good ones.
pub fn load_all(spec: &str) -> Vec<Result<PluginDriver>> {
    plugin_paths(spec)
        .iter()
        .map(|p| PluginDriver::load(p))
        .collect()
}

/// What `edgehal probe` lists: the probe report of `root` plus the devices of every plugin in
/// `$EDGEHAL_DRIVER_PATH`; a plugin that cannot be loaded (wrong ABI version, missing symbol)
/// is listed as an unavailable device named by its path, with the reason.
pub fn probe_with_plugins(root: &SysRoot) -> edgehal_core::probe::ProbeReport {
    use edgehal_core::probe::{probe, Backend, ProbedDevice};
    let mut report = probe(root);
    let spec = std::env::var(DRIVER_PATH_ENV).unwrap_or_default();
    for path in plugin_paths(&spec) {
        match PluginDriver::load(&path) {
            Ok(driver) => {
                for info in driver.probe(root) {
                    report
                        .devices
                        .push(ProbedDevice::from_driver_info(&info, Backend::Plugin));
                }
            }
            Err(e) => report
                .devices
                .push(ProbedDevice::failed_plugin(path.display().to_string(), e)),
        }
    }
    report
}

/// [`load_all`] on `$EDGEHAL_DRIVER_PATH` (nothing when unset).
pub fn load_from_env() -> Vec<Result<PluginDriver>> {
    match std::env::var(DRIVER_PATH_ENV) {
        Ok(spec) => load_all(&spec),
        Err(_) => Vec::new(),
    }
}

fn domains(bits: u32) -> Vec<MemoryDomain> {
    let mut v = Vec::new();
    for (b, d) in [
        (mem_bits::HOST, MemoryDomain::Host),
        (mem_bits::HOST_IMPORTED, MemoryDomain::HostImported),
        (mem_bits::DMABUF, MemoryDomain::DmaBuf),
        (mem_bits::DEVICE_LOCAL, MemoryDomain::DeviceLocal),
    ] {
        if bits & b != 0 {
            v.push(d);
        }
    }
    v
}

/// A plugin wrapped as a [`Driver`].
pub struct PluginDriver {
    plugin: Arc<Plugin>,
}

impl PluginDriver {
    /// Load and validate one plugin file.
    pub fn load(path: &Path) -> Result<PluginDriver> {
        Ok(PluginDriver {
            plugin: Plugin::load(path)?,
        })
    }

    /// Where it came from.
    pub fn path(&self) -> &Path {
        self.plugin.path()
    }

    /// The plugin's version string.
    pub fn version(&self) -> &str {
        self.plugin.version()
    }
}

impl Driver for PluginDriver {
    fn name(&self) -> &str {
        self.plugin.name()
    }

    /// Plugin devices are enumerated by the plugin itself (it does not read the `SysRoot`).
    fn probe(&self, _root: &SysRoot) -> Vec<DeviceInfo> {
        self.plugin
            .device_names()
            .into_iter()
            .enumerate()
            .map(|(i, n)| {
                let mut d = DeviceInfo::new(
                    n,
                    DeviceKind::Other,
                    self.plugin.name(),
                    domains(self.plugin.memory_domains()),
                );
                d.description = format!("plugin {} {}", self.plugin.name(), self.plugin.version());
                d.properties.insert("index".into(), i.to_string());
                d.properties
                    .insert("path".into(), self.plugin.path().display().to_string());
                d
            })
            .collect()
    }

    fn open(&self, info: &DeviceInfo) -> Result<Arc<dyn Device>> {
        if info.driver != self.plugin.name() {
            return Err(Error::arg(format!(
                "plugin '{}' cannot open '{}' of driver '{}'",
                self.plugin.name(),
                info.name,
                info.driver
            )));
        }
        let index: u32 = info
            .properties
            .get("index")
            .and_then(|i| i.parse().ok())
            .or_else(|| {
                self.plugin
                    .device_names()
                    .iter()
                    .position(|n| *n == info.name)
                    .map(|i| i as u32)
            })
            .ok_or_else(|| Error::arg(format!("plugin has no device '{}'", info.name)))?;
        let dev = self.plugin.open(index)?;
        Ok(Arc::new(PluginDeviceAdapter {
            info: info.clone(),
            dev,
        }))
    }
}

struct PluginDeviceAdapter {
    info: DeviceInfo,
    dev: Arc<PluginDevice>,
}

struct PluginExe {
    sub: Subgraph,
    exe: PluginExecutable,
    device: String,
}

impl Executable for PluginExe {
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

fn desc_of(v: &ValueInfo) -> Result<TensorDesc> {
    let code = v.dtype.map(|d| d.onnx_code()).unwrap_or(0);
    match v.fixed_shape() {
        Some(s) => TensorDesc::new(code, &s),
        None => Ok(TensorDesc::unknown(code)),
    }
}

impl Device for PluginDeviceAdapter {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn supports(&self, node: &Node, graph: &Graph) -> Support {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return Support::no(format!(
                "plugin ABI v1 takes default-domain ops only, not {}",
                node.domain
            ));
        }
        if !node.attrs.is_empty() {
            return Support::no("node has attributes, which plugin ABI v1 cannot pass");
        }
        let mut descs = Vec::new();
        for i in &node.inputs {
            let d = match i.and_then(|i| graph.values.get(i)) {
                Some(v) => desc_of(v),
                None => Ok(TensorDesc::unknown(0)),
            };
            match d {
                Ok(d) => descs.push(d),
                Err(e) => return Support::no(e.to_string()),
            }
        }
        match self.dev.supports(&node.op, &descs) {
            Ok(()) => Support::Yes,
            Err(reason) => Support::No { reason },
        }
    }

    fn memory(&self) -> &[MemoryDomain] {
        &self.info.memory_domains
    }

    fn compile(&self, sub: &Subgraph) -> Result<Box<dyn Executable>> {
        let g = &sub.graph;
        for (i, n) in g.nodes.iter().enumerate() {
            if let Support::No { reason } = self.supports(n, g) {
                return Err(Error::unsupported(format!(
                    "{} on {}: {reason}",
                    g.describe_node(i),
                    self.info.name
                )));
            }
        }
        let idx = |v: usize| -> Result<u32> {
            u32::try_from(v).map_err(|_| Error::arg("value id does not fit the plugin ABI"))
        };
        let mut p = Program {
            values: g.values.iter().map(desc_of).collect::<Result<_>>()?,
            ..Program::default()
        };
        for n in g.topo_order()? {
            let node = &g.nodes[n];
            p.ops.push(ProgramOp {
                op_type: node.op.clone(),
                inputs: node
                    .inputs
                    .iter()
                    .map(|i| i.map(idx).unwrap_or(Ok(NO_VALUE)))
                    .collect::<Result<_>>()?,
                outputs: node
                    .outputs
                    .iter()
                    .flatten()
                    .map(|&o| idx(o))
                    .collect::<Result<_>>()?,
            });
        }
        p.inputs = g.inputs.iter().map(|&v| idx(v)).collect::<Result<_>>()?;
        p.outputs = g.outputs.iter().map(|&v| idx(v)).collect::<Result<_>>()?;
        let mut consts: Vec<_> = g.initializers.iter().collect();
        consts.sort_by_key(|(id, _)| **id);
        for (&id, t) in consts {
            let d = TensorDesc::new(t.dtype().onnx_code(), t.shape())?;
            p.constants.push((idx(id)?, d, t.bytes().clone()));
        }
        let exe = self.dev.compile(&p)?;
        Ok(Box::new(PluginExe {
            sub: sub.clone(),
            exe,
            device: self.info.name.clone(),
        }))
    }

    fn submit(&self, exe: &dyn Executable, bindings: &Bindings) -> Result<Fence> {
        let exe = exe.as_any().downcast_ref::<PluginExe>().ok_or_else(|| {
            Error::arg(format!(
                "executable was compiled by device '{}', not by {}",
                exe.device(),
                self.info.name
            ))
        })?;
        bindings.check(&exe.sub)?;
        // Output shapes from the bound input shapes.
        let mut g = exe.sub.graph.clone();
        for (&id, tb) in g.inputs.clone().iter().zip(bindings.inputs()) {
            g.values[id].dtype = Some(tb.dtype);
            g.values[id].shape = Some(tb.shape.iter().map(|&d| Dim::Fixed(d)).collect());
        }
        infer_shapes(&mut g);
        let mut in_views = Vec::new();
        for tb in bindings.inputs() {
            let n = tb.buffer.tensor_bytes(tb.dtype, &tb.shape)?;
            in_views.push((
                TensorDesc::new(tb.dtype.onnx_code(), &tb.shape)?,
                tb.buffer.view(0..n)?,
            ));
        }
        let mut out_views: Vec<(TensorDesc, Buffer, Option<TensorBuffer>)> = Vec::new();
        for (i, &o) in g.outputs.iter().enumerate() {
            let v = &g.values[o];
            let (Some(dt), Some(shape)) = (v.dtype, v.fixed_shape()) else {
                return Err(Error::arg(format!(
                    "{}: cannot tell the shape of output '{}' for the plugin",
                    self.info.name, v.name
                )));
            };
            let desc = TensorDesc::new(dt.onnx_code(), &shape)?;
            match bindings.output(i) {
                Some(tb) => {
                    if tb.dtype != dt || tb.shape != shape {
                        return Err(Error::arg(format!(
                            "output '{}': bound as {} {:?}, the subgraph makes {dt} {shape:?}",
                            v.name, tb.dtype, tb.shape
                        )));
                    }
                    let n = tb.buffer.tensor_bytes(dt, &shape)?;
                    out_views.push((desc, tb.buffer.view(0..n)?, None));
                }
                None => {
                    let n = edgehal_core::tensor::checked_numel(&shape, dt)? * dt.size();
                    let buf = Buffer::alloc(n, bindings.counter())?;
                    let tb = TensorBuffer::new(buf.clone(), dt, shape)?;
                    out_views.push((desc, buf, Some(tb)));
                }
            }
        }
        let r = (|| {
            let in_leases = in_views
                .iter()
                .map(|(_, b)| b.read_lease())
                .collect::<Result<Vec<_>>>()?;
            let out_leases = out_views
                .iter()
                .map(|(_, b, _)| b.write_lease())
                .collect::<Result<Vec<_>>>()?;
            let ins: Vec<_> = in_views.iter().map(|v| v.0).zip(in_leases.iter()).collect();
            let outs: Vec<_> = out_views
                .iter()
                .map(|v| v.0)
                .zip(out_leases.iter())
                .collect();
            self.dev.run(&exe.exe, &ins, &outs)
        })();
        if r.is_ok() {
            for (i, (_, _, alloc)) in out_views.into_iter().enumerate() {
                if let Some(tb) = alloc {
                    bindings.set_output(i, tb)?;
                }
            }
        }
        Fence::done(&self.info.name, r)
    }
}
