//! The CPU behind the [`Driver`]/[`Device`] traits.
//!
//! `supports` is "the op is registered"; `compile` builds an [`Executor`]; `submit` runs
//! synchronously on the calling thread and returns a fence that is already signalled. Input
//! buffers become tensors without copying when nobody outside the process can write them
//! ([`edgehal_core::buffer::Buffer::to_tensor`]); outputs the caller leaves unbound are handed
//! back as buffers over the computed tensors (no copy); outputs bound to caller buffers cost
//! one counted copy each (the ops allocate their results; computing straight into bound
//! memory needs the arena planner).

use std::any::Any;
use std::sync::Arc;

use edgehal_core::buffer::MemoryDomain;
use edgehal_core::driver::{
    Bindings, Device, DeviceInfo, DeviceKind, Driver, Executable, Fence, Subgraph, Support, SysRoot,
};
use edgehal_core::graph::{Graph, Node, ValueId};
use edgehal_core::{Error, Result, Tensor};

use crate::{Executor, Registry};

/// Memory the CPU reads and writes directly (dma-bufs through a synced mapping).
const DOMAINS: [MemoryDomain; 3] = [
    MemoryDomain::Host,
    MemoryDomain::HostImported,
    MemoryDomain::DmaBuf,
];

/// The CPU driver: always exactly one device, `cpu`.
#[derive(Default)]
pub struct CpuDriver;

impl Driver for CpuDriver {
    fn name(&self) -> &str {
        "cpu"
    }

    fn probe(&self, root: &SysRoot) -> Vec<DeviceInfo> {
        let mut info = DeviceInfo::new("cpu", DeviceKind::Cpu, "cpu", DOMAINS.to_vec());
        let cpuinfo = std::fs::read_to_string(root.path().join("proc/cpuinfo")).unwrap_or_default();
        info.description = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        vec![info]
    }

    fn open(&self, info: &DeviceInfo) -> Result<Arc<dyn Device>> {
        if info.driver != "cpu" {
            return Err(Error::arg(format!(
                "cpu driver cannot open device '{}' of driver '{}'",
                info.name, info.driver
            )));
        }
        Ok(Arc::new(CpuDevice::with_info(
            info.clone(),
            Registry::new(),
        )))
    }
}

/// The CPU device.
pub struct CpuDevice {
    info: DeviceInfo,
    registry: Registry,
}

impl Default for CpuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuDevice {
    /// The CPU with every op this crate implements.
    pub fn new() -> Self {
        Self::with_info(
            DeviceInfo::new("cpu", DeviceKind::Cpu, "cpu", DOMAINS.to_vec()),
            Registry::new(),
        )
    }

    /// A CPU device with a given registry (tests restrict it to model partial support).
    pub fn with_info(info: DeviceInfo, registry: Registry) -> Self {
        CpuDevice { info, registry }
    }
}

/// A subgraph compiled for the CPU.
pub struct CpuExecutable {
    sub: Subgraph,
    exec: Executor,
    device: String,
}

impl Executable for CpuExecutable {
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

impl Device for CpuDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn supports(&self, node: &Node, _graph: &Graph) -> Support {
        if self.registry.get(&node.domain, &node.op).is_some() {
            Support::Yes
        } else if node.domain.is_empty() {
            Support::no(format!("op {} is not implemented on cpu", node.op))
        } else {
            Support::no(format!(
                "op {}.{} is not implemented on cpu",
                node.domain, node.op
            ))
        }
    }

    fn memory(&self) -> &[MemoryDomain] {
        &self.info.memory_domains
    }

    fn compile(&self, sub: &Subgraph) -> Result<Box<dyn Executable>> {
        let exec = Executor::new(&sub.graph, &self.registry)?;
        Ok(Box::new(CpuExecutable {
            sub: sub.clone(),
            exec,
            device: self.info.name.clone(),
        }))
    }

    fn submit(&self, exe: &dyn Executable, bindings: &Bindings) -> Result<Fence> {
        let exe = exe
            .as_any()
            .downcast_ref::<CpuExecutable>()
            .ok_or_else(|| {
                Error::arg(format!(
                    "executable was compiled by device '{}', not by {}",
                    exe.device(),
                    self.info.name
                ))
            })?;
        bindings.check(&exe.sub)?;
        let r = run(exe, bindings);
        Fence::done(&self.info.name, r)
    }
}

fn run(exe: &CpuExecutable, bindings: &Bindings) -> Result<()> {
    let g = &exe.sub.graph;
    let feed: Vec<(ValueId, Tensor)> = g
        .inputs
        .iter()
        .zip(bindings.inputs())
        .map(|(&id, tb)| {
            tb.to_tensor()
                .map(|t| (id, t))
                .map_err(|e| Error::arg(format!("input '{}': {e}", g.value_name(id))))
        })
        .collect::<Result<_>>()?;
    let outs = exe.exec.run(&feed)?;
    // Release the input views before writing outputs (an output buffer may share memory
    // with an input).
    drop(feed);
    for (i, t) in outs.iter().enumerate() {
        bindings
            .deliver(i, t)
            .map_err(|e| Error::arg(format!("output '{}': {e}", g.value_name(g.outputs[i]))))?;
    }
    Ok(())
}
