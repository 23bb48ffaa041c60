//! edgehal-vulkan: the Vulkan compute backend (edge GPUs and desktop GPUs alike).
//!
//! - `libvulkan.so.1` is opened at run time (`ash`'s `loaded` feature): a machine without
//!   Vulkan still loads edgehal, and [`list`] says why there is no device.
//! - Kernels are GLSL compute shaders under `kernels/vulkan/`, compiled with `glslc` and
//!   committed as SPIR-V ([`shaders`]); workgroup sizes are specialization constants picked
//!   per device ([`plan::Tune`]).
//! - A subgraph is lowered once to a list of dispatches over four kinds of buffers (arena,
//!   weights, inputs, outputs; [`plan`]); caller buffers are imported with
//!   `VK_EXT_external_memory_host` when aligned (no copy), staged otherwise (counted), and
//!   each set of bound buffers gets a command buffer recorded once and replayed.
//! - `submit` returns at once; one completion thread for all Vulkan devices (`waiter`)
//!   signals the core eventfd `Fence`, polling exported sync_file fds where the device has
//!   `VK_KHR_external_fence_fd` and `vkWaitForFences` slices otherwise.
//!
//! All Vulkan calls, and all `unsafe`, are in `raw`.

#![deny(unsafe_code)]

mod device;
pub mod plan;
pub mod probe;
#[allow(unsafe_code)]
mod raw;
pub mod shaders;
mod waiter;

use std::sync::Arc;

use edgehal_core::buffer::{Buffer, CopyCounter};
use edgehal_core::driver::{Bindings, Device as _, Subgraph, TensorBuffer};
use edgehal_core::{Error, Graph, Result, Tensor};

pub use device::{list, open, open_with, Device, Driver, Executable, OpenOptions};
pub use probe::{Listing, PhysInfo};

/// A host buffer holding `t`, sized and aligned so the device can import it without copying
/// (its length is rounded up to the import alignment).
pub fn importable_buffer(dev: &Device, t: &Tensor, counter: &CopyCounter) -> Result<TensorBuffer> {
    let align = dev.import_alignment();
    let n = t.bytes().len();
    let b = Buffer::alloc(n.max(1).next_multiple_of(align), counter)?;
    b.write_from(0, t.bytes())?;
    TensorBuffer::new(b, t.dtype(), t.shape().to_vec())
}

/// A whole graph compiled for one Vulkan device, with its inputs in importable host buffers.
pub struct Runner {
    dev: Arc<Device>,
    exe: Box<dyn edgehal_core::driver::Executable>,
    inputs: Vec<TensorBuffer>,
    outputs: Vec<Option<TensorBuffer>>,
    counter: CopyCounter,
}

impl Runner {
    /// Compile `g` as one subgraph on `dev` and bind `inputs` (in `g.inputs` order).
    pub fn new(dev: Arc<Device>, g: &Graph, inputs: &[Tensor]) -> Result<Runner> {
        let counter = CopyCounter::new();
        let sub = Subgraph::whole(g);
        let exe = dev.compile(&sub)?;
        let mut r = Runner {
            dev,
            exe,
            inputs: Vec::new(),
            outputs: vec![None; g.outputs.len()],
            counter,
        };
        r.set_inputs(inputs)?;
        Ok(r)
    }

    /// Replace the inputs (new buffers: the next run records a new command buffer).
    pub fn set_inputs(&mut self, inputs: &[Tensor]) -> Result<()> {
        let g = &self.exe.subgraph().graph;
        if inputs.len() != g.inputs.len() {
            return Err(Error::arg(format!(
                "{} inputs given, the graph has {}",
                inputs.len(),
                g.inputs.len()
            )));
        }
        self.inputs = inputs
            .iter()
            .map(|t| {
                importable_buffer(&self.dev, &t.cast(edgehal_core::DType::F32)?, &self.counter)
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// Bind output `j` to a caller buffer (imported when aligned) instead of a fresh tensor.
    pub fn bind_output(&mut self, j: usize, tb: TensorBuffer) -> Result<()> {
        let slot = self
            .outputs
            .get_mut(j)
            .ok_or_else(|| Error::arg(format!("output {j} does not exist")))?;
        *slot = Some(tb);
        Ok(())
    }

    /// Run once and return the outputs.
    pub fn run(&self) -> Result<Vec<Tensor>> {
        let b = Bindings::new(self.inputs.clone(), self.outputs.clone(), &self.counter);
        self.dev.submit(self.exe.as_ref(), &b)?.wait(None)?;
        (0..b.num_outputs())
            .map(|j| {
                b.output(j)
                    .ok_or_else(|| Error::arg(format!("output {j} was not produced")))?
                    .to_tensor()
            })
            .collect()
    }

    /// Copies edgehal made so far (staging, readback).
    pub fn counter(&self) -> &CopyCounter {
        &self.counter
    }

    /// The compiled executable (`None` only if it was made by another device, which
    /// `Runner::new` never does).
    pub fn executable(&self) -> Option<&Executable> {
        self.exe.as_any().downcast_ref::<Executable>()
    }
}

/// Run a whole graph on the Vulkan device chosen by `selector` (see [`open`]) and return its
/// outputs: compile as one subgraph, submit, read back. For `edgehal run/bench --device vulkan`.
pub fn run_graph(selector: &str, g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let dev = open(selector)?;
    Runner::new(dev, g, inputs)?.run()
}
