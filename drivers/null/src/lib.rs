//! edgehal-null: a device that supports every node and does no math.
//!
//! It is two things:
//! - **the template for a new driver.** Copy this crate, rename `null` to your backend
//!   (module names stay `Driver`/`Device`-shaped, see wgpu-hal's per-backend layout), then
//!   replace the three marked places: `probe` (read files under the `SysRoot` only: sysfs
//!   nodes, `/dev` entries, whether your vendor library exists; never open the device there),
//!   `open` (dlopen the vendor runtime, create the device context) and `run_node` (your
//!   kernels, or one vendor call for the whole compiled subgraph in `compile`).
//! - **a test device for schedulers and partitioners.** Per-op latency (the worker sleeps),
//!   failure injection (fail the Nth submit; lose the device on the Nth submit, after which
//!   every submit fails) and outputs of the right shapes: zeros, or input 0 passed through for
//!   ops configured so. Submissions complete on a worker thread, so fences really are pending
//!   for a while.

#![forbid(unsafe_code)]

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgehal_core::buffer::MemoryDomain;
use edgehal_core::driver::{
    Bindings, Device, DeviceInfo, DeviceKind, Driver, Executable, Fence, Subgraph, Support, SysRoot,
};
use edgehal_core::graph::{Dim, Graph, Node, ValueId};
use edgehal_core::infer::infer_shapes;
use edgehal_core::{Error, Result, Tensor};

/// Behaviour of a null device.
#[derive(Clone, Debug, Default)]
pub struct NullConfig {
    /// Sleep per node of this op type.
    pub op_latency: HashMap<String, Duration>,
    /// Sleep per node of other op types.
    pub default_latency: Duration,
    /// Ops whose first output is their first input, unchanged (`Relu` on a test pipeline).
    pub passthrough: HashSet<String>,
    /// Fail the Nth submit (1-based) through its fence; later submits work again.
    pub fail_on_submit: Option<u64>,
    /// On the Nth submit (1-based) the device is lost: that and every later submit fails.
    pub lose_device_on_submit: Option<u64>,
}

/// The null driver: `devices` identical devices named `null0`, `null1`, ...
pub struct NullDriver {
    devices: usize,
    config: NullConfig,
}

impl NullDriver {
    /// A driver that reports `devices` devices with `config`.
    pub fn new(devices: usize, config: NullConfig) -> Self {
        NullDriver { devices, config }
    }
}

const DOMAINS: [MemoryDomain; 2] = [MemoryDomain::Host, MemoryDomain::HostImported];

impl Driver for NullDriver {
    fn name(&self) -> &str {
        "null"
    }

    // TEMPLATE: a real driver reads sysfs/devfs under `root` here (pure, no device access).
    fn probe(&self, _root: &SysRoot) -> Vec<DeviceInfo> {
        (0..self.devices)
            .map(|i| {
                let mut d = DeviceInfo::new(
                    format!("null{i}"),
                    DeviceKind::Other,
                    "null",
                    DOMAINS.to_vec(),
                );
                d.description = "null device (no math; latency and failures injected)".into();
                d
            })
            .collect()
    }

    // TEMPLATE: the slow work (dlopen, context creation) goes here.
    fn open(&self, info: &DeviceInfo) -> Result<Arc<dyn Device>> {
        if info.driver != "null" {
            return Err(Error::arg(format!(
                "null driver cannot open '{}' of driver '{}'",
                info.name, info.driver
            )));
        }
        Ok(Arc::new(NullDevice::new(info.clone(), self.config.clone())))
    }
}

/// A null device.
pub struct NullDevice {
    info: DeviceInfo,
    config: Arc<NullConfig>,
    submits: AtomicU64,
    lost: Arc<AtomicBool>,
}

impl NullDevice {
    /// A device with the given identity and behaviour.
    pub fn new(info: DeviceInfo, config: NullConfig) -> Self {
        NullDevice {
            info,
            config: Arc::new(config),
            submits: AtomicU64::new(0),
            lost: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Submissions seen so far.
    pub fn submit_count(&self) -> u64 {
        self.submits.load(Ordering::SeqCst)
    }

    /// True once the injected device loss happened.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

/// A subgraph "compiled" for the null device.
pub struct NullExecutable {
    sub: Arc<Subgraph>,
    device: String,
}

impl Executable for NullExecutable {
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

impl Device for NullDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn supports(&self, _node: &Node, _graph: &Graph) -> Support {
        Support::Yes
    }

    fn memory(&self) -> &[MemoryDomain] {
        &self.info.memory_domains
    }

    fn compile(&self, sub: &Subgraph) -> Result<Box<dyn Executable>> {
        sub.graph.topo_order()?;
        Ok(Box::new(NullExecutable {
            sub: Arc::new(sub.clone()),
            device: self.info.name.clone(),
        }))
    }

    fn submit(&self, exe: &dyn Executable, bindings: &Bindings) -> Result<Fence> {
        let exe = exe
            .as_any()
            .downcast_ref::<NullExecutable>()
            .ok_or_else(|| {
                Error::arg(format!(
                    "executable was compiled by device '{}', not by {}",
                    exe.device(),
                    self.info.name
                ))
            })?;
        bindings.check(&exe.sub)?;
        let n = self.submits.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.lose_device_on_submit == Some(n) {
            self.lost.store(true, Ordering::SeqCst);
        }
        if self.is_lost() {
            return Fence::done(
                &self.info.name,
                Err(Error::Device {
                    device: self.info.name.clone(),
                    msg: format!("device lost (injected, submit {n})"),
                }),
            );
        }
        let (fence, signal) = Fence::pending(&self.info.name)?;
        let sub = Arc::clone(&exe.sub);
        let config = Arc::clone(&self.config);
        let bindings = bindings.clone();
        let name = self.info.name.clone();
        std::thread::Builder::new()
            .name(format!("{name}-submit{n}"))
            .spawn(move || {
                let r = if config.fail_on_submit == Some(n) {
                    Err(Error::Device {
                        device: name,
                        msg: format!("injected failure on submit {n}"),
                    })
                } else {
                    run(&sub, &config, &bindings)
                };
                signal.signal(r);
            })
            .map_err(|e| Error::io("spawning the null device worker", e))?;
        Ok(fence)
    }
}

// TEMPLATE: a real device runs its kernels (or one vendor call) here.
fn run(sub: &Subgraph, config: &NullConfig, bindings: &Bindings) -> Result<()> {
    // Shapes: the bound inputs' shapes, then the shared shape inference.
    let mut g = sub.graph.clone();
    let mut values: HashMap<ValueId, Tensor> = HashMap::new();
    for (&id, tb) in g.inputs.clone().iter().zip(bindings.inputs()) {
        g.values[id].dtype = Some(tb.dtype);
        g.values[id].shape = Some(tb.shape.iter().map(|&d| Dim::Fixed(d)).collect());
        // Inputs are only needed as values by pass-through ops and where a graph output
        // is an input (an empty subgraph: the schedulers time one to learn the fixed cost
        // of a submission).
        if config.passthrough.is_empty() && !g.outputs.contains(&id) {
            continue;
        }
        values.insert(id, tb.to_tensor()?);
    }
    infer_shapes(&mut g);
    for (id, t) in &g.initializers {
        values.insert(*id, t.clone());
    }
    for n in g.topo_order()? {
        let node = &g.nodes[n];
        let lat = config
            .op_latency
            .get(&node.op)
            .copied()
            .unwrap_or(config.default_latency);
        if !lat.is_zero() {
            std::thread::sleep(lat);
        }
        for (k, o) in node.outputs.iter().enumerate() {
            let Some(o) = *o else { continue };
            let through = if k == 0 && config.passthrough.contains(&node.op) {
                node.inputs
                    .first()
                    .copied()
                    .flatten()
                    .and_then(|i| values.get(&i).cloned())
            } else {
                None
            };
            let t = match through {
                Some(t) => t,
                None => {
                    let v = &g.values[o];
                    let (Some(dt), Some(shape)) = (v.dtype, v.fixed_shape()) else {
                        return Err(Error::Op {
                            node: g.describe_node(n),
                            msg: format!(
                                "null device cannot tell the shape of output '{}'; give the \
                                 value a static shape or make the op pass-through",
                                v.name
                            ),
                        });
                    };
                    Tensor::zeros(dt, shape)?
                }
            };
            values.insert(o, t);
        }
    }
    for (i, &o) in g.outputs.iter().enumerate() {
        let t = values
            .get(&o)
            .ok_or_else(|| Error::arg(format!("output '{}' was not produced", g.value_name(o))))?;
        bindings.deliver(i, t)?;
    }
    Ok(())
}
