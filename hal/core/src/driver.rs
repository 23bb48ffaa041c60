//! The contract every backend implements.
//!
//! - A [`Driver`] only enumerates ([`Driver::probe`], pure: reads files under a [`SysRoot`])
//!   and opens devices ([`Driver::open`], where slow work such as dlopen happens).
//! - A [`Device`] answers [`Device::supports`] per node (yes, or no with a reason), compiles a
//!   [`Subgraph`] into an [`Executable`] and submits it with [`Bindings`] (buffers for the
//!   subgraph's boundary inputs and outputs), returning a [`Fence`].
//! - A [`Fence`] can be waited on with a timeout, polled, and exported as an eventfd, so one
//!   reactor can wait on many devices at once.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::buffer::{Buffer, CopyCounter, MemoryDomain};
use crate::graph::{Graph, Node, NodeId, ValueId};
use crate::sys::mem;
use crate::{DType, Error, Result, Tensor};

pub use crate::probe::{DeviceKind, SysRoot};

/// What a probe found.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Unique name (`cpu`, `null0`, `example:0`).
    pub name: String,
    pub kind: DeviceKind,
    /// Name of the driver that opens it.
    pub driver: String,
    /// Memory the device reads and writes directly.
    pub memory_domains: Vec<MemoryDomain>,
    /// Human-readable model/description.
    pub description: String,
    /// Why it cannot be used right now (`unavailable: libedgetpu.so.1 not found`), if so.
    pub unavailable: Option<String>,
    /// Free-form details for `edgehal probe`.
    pub properties: BTreeMap<String, String>,
}

impl DeviceInfo {
    /// A usable device with no properties.
    pub fn new(
        name: impl Into<String>,
        kind: DeviceKind,
        driver: impl Into<String>,
        memory_domains: Vec<MemoryDomain>,
    ) -> Self {
        DeviceInfo {
            name: name.into(),
            kind,
            driver: driver.into(),
            memory_domains,
            description: String::new(),
            unavailable: None,
            properties: BTreeMap::new(),
        }
    }
}

/// A device's answer to "can you run this node?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    Yes,
    No { reason: String },
}

impl Support {
    /// A "no" with a reason.
    pub fn no(reason: impl Into<String>) -> Self {
        Support::No {
            reason: reason.into(),
        }
    }
    /// True for [`Support::Yes`].
    pub fn is_yes(&self) -> bool {
        matches!(self, Support::Yes)
    }
}

/// Enumerates and opens devices of one kind.
pub trait Driver: Send + Sync {
    /// Short name (`cpu`, `null`, `example`).
    fn name(&self) -> &str;
    /// The devices under `root`. Pure: reads files only, never opens devices.
    fn probe(&self, root: &SysRoot) -> Vec<DeviceInfo>;
    /// Open a probed device.
    fn open(&self, info: &DeviceInfo) -> Result<Arc<dyn Device>>;
}

/// An opened device.
pub trait Device: Send + Sync {
    /// What was probed.
    fn info(&self) -> &DeviceInfo;
    /// Whether this device can run `node` of `graph` (yes, or no with a reason).
    fn supports(&self, node: &Node, graph: &Graph) -> Support;
    /// Memory domains the device reads and writes without a copy.
    fn memory(&self) -> &[MemoryDomain];
    /// Prepare a subgraph for repeated submission.
    fn compile(&self, sub: &Subgraph) -> Result<Box<dyn Executable>>;
    /// Run `exe` (made by this device's `compile`) on `bindings`. The fence signals when
    /// every output has been written; errors during execution are reported by the fence.
    fn submit(&self, exe: &dyn Executable, bindings: &Bindings) -> Result<Fence>;
}

/// A compiled subgraph.
pub trait Executable: Send + Sync {
    /// Name of the device that compiled it.
    fn device(&self) -> &str;
    /// The subgraph it was compiled from.
    fn subgraph(&self) -> &Subgraph;
    /// For the owning device to downcast to its own type.
    fn as_any(&self) -> &dyn Any;
}

/// A fragment of a graph with its boundary: `graph.inputs` are the values it reads from
/// outside (graph inputs or other fragments' outputs), `graph.outputs` the values used outside
/// (or graph outputs). Initializers it reads are copied in (sharing storage).
#[derive(Clone, Debug)]
pub struct Subgraph {
    pub graph: Graph,
    /// The nodes of the parent graph it holds, in the parent's numbering.
    pub parent_nodes: Vec<NodeId>,
}

impl Subgraph {
    /// The whole graph as one fragment.
    pub fn whole(graph: &Graph) -> Subgraph {
        Subgraph {
            graph: graph.clone(),
            parent_nodes: (0..graph.nodes.len()).collect(),
        }
    }

    /// Cut `nodes` out of `g`. Boundary inputs are the values they read that are neither
    /// produced among them nor initializers; boundary outputs are values they produce that
    /// other nodes read or that are outputs of `g`. Value names and infos are kept.
    pub fn extract(g: &Graph, nodes: &[NodeId]) -> Result<Subgraph> {
        let set: HashSet<NodeId> = nodes.iter().copied().collect();
        if set.len() != nodes.len() {
            return Err(Error::arg("Subgraph::extract: a node is listed twice"));
        }
        for &n in nodes {
            if n >= g.nodes.len() {
                return Err(Error::arg(format!(
                    "Subgraph::extract: node {n} out of range ({} nodes)",
                    g.nodes.len()
                )));
            }
        }
        let order: Vec<NodeId> = g
            .topo_order()?
            .into_iter()
            .filter(|n| set.contains(n))
            .collect();
        let mut sub = Graph::new(format!("{}[{} nodes]", g.name, nodes.len()));
        sub.opsets = g.opsets.clone();
        let mut map: HashMap<ValueId, ValueId> = HashMap::new();
        let mut get = |sub: &mut Graph, v: ValueId| -> ValueId {
            *map.entry(v).or_insert_with(|| {
                let id = sub.value_id(g.value_name(v));
                if let Some(info) = g.values.get(v) {
                    sub.values[id] = info.clone();
                }
                id
            })
        };
        let mut produced: HashSet<ValueId> = HashSet::new();
        for &n in &order {
            produced.extend(g.nodes[n].outputs.iter().flatten().copied());
        }
        let mut inputs: Vec<ValueId> = Vec::new();
        for &n in &order {
            let node = &g.nodes[n];
            let mut new = node.clone();
            for (slot, v) in new.inputs.iter_mut().zip(&node.inputs) {
                let Some(v) = *v else { continue };
                let id = get(&mut sub, v);
                *slot = Some(id);
                if let Some(t) = g.initializers.get(&v) {
                    sub.initializers.insert(id, t.clone());
                } else if !produced.contains(&v) && !inputs.contains(&v) {
                    inputs.push(v);
                }
            }
            for (slot, v) in new.outputs.iter_mut().zip(&node.outputs) {
                *slot = v.map(|v| get(&mut sub, v));
            }
            sub.nodes.push(new);
        }
        let consumers = g.consumers();
        let mut outputs: Vec<ValueId> = Vec::new();
        for &n in &order {
            for &v in g.nodes[n].outputs.iter().flatten() {
                let outside = consumers
                    .get(v)
                    .is_some_and(|c| c.iter().any(|u| !set.contains(u)));
                if (outside || g.outputs.contains(&v)) && !outputs.contains(&v) {
                    outputs.push(v);
                }
            }
        }
        sub.inputs = inputs.iter().map(|v| map[v]).collect();
        sub.outputs = outputs.iter().map(|v| map[v]).collect();
        Ok(Subgraph {
            graph: sub,
            parent_nodes: order,
        })
    }

    /// Names of the boundary inputs, in binding order.
    pub fn input_names(&self) -> Vec<String> {
        let g = &self.graph;
        g.inputs
            .iter()
            .map(|&v| g.value_name(v).to_string())
            .collect()
    }

    /// Names of the boundary outputs, in binding order.
    pub fn output_names(&self) -> Vec<String> {
        let g = &self.graph;
        g.outputs
            .iter()
            .map(|&v| g.value_name(v).to_string())
            .collect()
    }
}

/// A buffer holding a tensor of known dtype and shape (at the start of the buffer).
#[derive(Clone, Debug)]
pub struct TensorBuffer {
    pub buffer: Buffer,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorBuffer {
    /// Checks that the buffer is large enough.
    pub fn new(buffer: Buffer, dtype: DType, shape: Vec<usize>) -> Result<Self> {
        buffer.tensor_bytes(dtype, &shape)?;
        Ok(TensorBuffer {
            buffer,
            dtype,
            shape,
        })
    }
    /// Share a tensor's storage (read-only host buffer, no copy).
    pub fn from_tensor(t: &Tensor, counter: &CopyCounter) -> Self {
        TensorBuffer {
            buffer: Buffer::from_tensor(t, counter),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
        }
    }
    /// Bytes the tensor occupies.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
    /// The tensor (zero-copy where [`Buffer::to_tensor`] allows).
    pub fn to_tensor(&self) -> Result<Tensor> {
        self.buffer.to_tensor(self.dtype, self.shape.clone())
    }
}

struct BindingsInner {
    inputs: Vec<TensorBuffer>,
    outputs: Vec<Mutex<Option<TensorBuffer>>>,
    counter: CopyCounter,
}

/// Buffers for a subgraph's boundary: one per input, and per output either a caller buffer
/// (the device writes into it) or nothing (the device allocates and stores the result here).
/// Clones share the same slots, so an asynchronous device can fill them later.
#[derive(Clone)]
pub struct Bindings(Arc<BindingsInner>);

impl Bindings {
    /// Bind `inputs`; `outputs[i] == None` lets the device allocate output `i`.
    pub fn new(
        inputs: Vec<TensorBuffer>,
        outputs: Vec<Option<TensorBuffer>>,
        counter: &CopyCounter,
    ) -> Self {
        Bindings(Arc::new(BindingsInner {
            inputs,
            outputs: outputs.into_iter().map(Mutex::new).collect(),
            counter: counter.clone(),
        }))
    }
    /// Inputs, in the subgraph's input order.
    pub fn inputs(&self) -> &[TensorBuffer] {
        &self.0.inputs
    }
    /// Number of output slots.
    pub fn num_outputs(&self) -> usize {
        self.0.outputs.len()
    }
    /// The copy counter of the session these bindings belong to.
    pub fn counter(&self) -> &CopyCounter {
        &self.0.counter
    }
    /// Output `i` (after the fence signalled): the caller's buffer or the device's.
    pub fn output(&self, i: usize) -> Option<TensorBuffer> {
        let slot = self.0.outputs.get(i)?;
        slot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Store output `i` (devices call this for outputs they allocate).
    pub fn set_output(&self, i: usize, t: TensorBuffer) -> Result<()> {
        let slot = self
            .0
            .outputs
            .get(i)
            .ok_or_else(|| Error::arg(format!("output {i} is not bound")))?;
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(())
    }

    /// Check the counts against a subgraph.
    pub fn check(&self, sub: &Subgraph) -> Result<()> {
        if self.0.inputs.len() != sub.graph.inputs.len() {
            return Err(Error::arg(format!(
                "{} input buffers bound, the subgraph has {} inputs ({})",
                self.0.inputs.len(),
                sub.graph.inputs.len(),
                sub.input_names().join(", ")
            )));
        }
        if self.0.outputs.len() != sub.graph.outputs.len() {
            return Err(Error::arg(format!(
                "{} output slots bound, the subgraph has {} outputs ({})",
                self.0.outputs.len(),
                sub.graph.outputs.len(),
                sub.output_names().join(", ")
            )));
        }
        Ok(())
    }

    /// Deliver output `i` computed as a host tensor: written into the caller's buffer (one
    /// counted copy) or, when unbound, wrapped as a buffer without copying.
    pub fn deliver(&self, i: usize, t: &Tensor) -> Result<()> {
        let slot = self
            .0
            .outputs
            .get(i)
            .ok_or_else(|| Error::arg(format!("output {i} is not bound")))?;
        let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
        match &*s {
            Some(tb) => {
                if tb.dtype != t.dtype() || tb.shape != t.shape() {
                    return Err(Error::arg(format!(
                        "output {i}: bound as {} {:?}, computed {} {:?}",
                        tb.dtype,
                        tb.shape,
                        t.dtype(),
                        t.shape()
                    )));
                }
                tb.buffer.store_tensor(t)
            }
            None => {
                *s = Some(TensorBuffer::from_tensor(t, &self.0.counter));
                Ok(())
            }
        }
    }
}

struct FenceInner {
    efd: OwnedFd,
    status: Mutex<Option<std::result::Result<(), String>>>,
    device: String,
}

/// Completion of a submission. Signalled exactly once, with success or an error message.
#[derive(Clone)]
pub struct Fence(Arc<FenceInner>);

/// The signalling side of a [`Fence`] (held by the device).
pub struct FenceSignal(Arc<FenceInner>);

impl Fence {
    /// An unsignalled fence and its signaller.
    pub fn pending(device: &str) -> Result<(Fence, FenceSignal)> {
        let efd = mem::eventfd().map_err(|e| Error::io("eventfd", e))?;
        let inner = Arc::new(FenceInner {
            efd,
            status: Mutex::new(None),
            device: device.to_string(),
        });
        Ok((Fence(Arc::clone(&inner)), FenceSignal(inner)))
    }

    /// A fence already signalled with `r`.
    pub fn done(device: &str, r: Result<()>) -> Result<Fence> {
        let (f, s) = Fence::pending(device)?;
        s.signal(r);
        Ok(f)
    }

    fn status(&self) -> Option<Result<()>> {
        let s = self.0.status.lock().unwrap_or_else(|p| p.into_inner());
        s.as_ref().map(|r| {
            r.clone().map_err(|msg| Error::Device {
                device: self.0.device.clone(),
                msg,
            })
        })
    }

    /// `None` while pending, else the outcome.
    pub fn poll(&self) -> Option<Result<()>> {
        self.status()
    }

    /// Wait until signalled, or fail after `timeout` (`None`: forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.status() {
                return r;
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Device {
                            device: self.0.device.clone(),
                            msg: format!(
                                "timed out after {:?} waiting for a fence",
                                timeout.unwrap_or_default()
                            ),
                        });
                    }
                    // Round up so we never spin on a sub-millisecond remainder.
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            mem::poll_readable(self.0.efd.as_fd(), ms)
                .map_err(|e| Error::io("poll(eventfd)", e))?;
        }
    }

    /// An eventfd that becomes readable when the fence signals (a duplicate: close it when
    /// done). Reading it does not reset the fence.
    pub fn export_eventfd(&self) -> Result<OwnedFd> {
        mem::dup(self.0.efd.as_fd()).map_err(|e| Error::io("dup(eventfd)", e))
    }
}

impl FenceSignal {
    /// Signal with the outcome (only the first signal counts).
    pub fn signal(self, r: Result<()>) {
        {
            let mut s = self.0.status.lock().unwrap_or_else(|p| p.into_inner());
            if s.is_none() {
                *s = Some(r.map_err(|e| e.to_string()));
            }
        }
        let _ = mem::eventfd_signal(self.0.efd.as_fd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Node;

    fn chain() -> Graph {
        // x -> Relu -> a -> Neg -> b -> Exp -> y ; plus w initializer used by Neg? (Add)
        let mut g = Graph::new("c");
        let x = g.value_id("x");
        let a = g.value_id("a");
        let w = g.value_id("w");
        let b = g.value_id("b");
        let y = g.value_id("y");
        g.inputs = vec![x];
        g.outputs = vec![y];
        g.initializers
            .insert(w, Tensor::from_vec(vec![1], vec![1.0f32]).unwrap());
        let mk = |op: &str, i: Vec<ValueId>, o: ValueId| Node {
            op: op.into(),
            inputs: i.into_iter().map(Some).collect(),
            outputs: vec![Some(o)],
            ..Default::default()
        };
        g.nodes.push(mk("Relu", vec![x], a));
        g.nodes.push(mk("Add", vec![a, w], b));
        g.nodes.push(mk("Exp", vec![b], y));
        g
    }

    #[test]
    fn extract_finds_the_boundary() {
        let g = chain();
        let s = Subgraph::extract(&g, &[1]).unwrap();
        assert_eq!(s.input_names(), vec!["a"]);
        assert_eq!(s.output_names(), vec!["b"]);
        assert_eq!(s.graph.initializers.len(), 1);
        s.graph.validate().unwrap();
        let s = Subgraph::extract(&g, &[1, 2]).unwrap();
        assert_eq!(s.input_names(), vec!["a"]);
        assert_eq!(s.output_names(), vec!["y"]);
        assert!(Subgraph::extract(&g, &[7]).is_err());
    }

    #[test]
    fn fence_wait_poll_and_eventfd() {
        let (f, s) = Fence::pending("t").unwrap();
        assert!(f.poll().is_none());
        let e = f.wait(Some(Duration::from_millis(20))).unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        let efd = f.export_eventfd().unwrap();
        assert!(!mem::poll_readable(efd.as_fd(), 0).unwrap());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            s.signal(Err(Error::arg("boom")));
        });
        let e = f.wait(Some(Duration::from_secs(5))).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        assert!(mem::poll_readable(efd.as_fd(), 0).unwrap());
        t.join().unwrap();
        assert!(Fence::done("t", Ok(())).unwrap().wait(None).is_ok());
    }
}
