//! Sessions: a model prepared once (passes, op resolution, memory plan) and run many times.

use edgehal_core::graph::{Dim, Graph, ValueId};
use edgehal_core::{DType, Error, Result, Tensor};
use edgehal_cpu::{Executor, Registry};

use crate::Model;

/// Options for a session.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Device name: `auto` or `cpu` (more with the HAL drivers).
    pub device: String,
    /// Run graph passes (constant folding, dead node removal, inference). On by default.
    pub optimize: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            threads: 0,
            device: "auto".into(),
            optimize: true,
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
    exec: Executor,
    inputs: Vec<(ValueId, IoInfo)>,
    outputs: Vec<IoInfo>,
    device: String,
    log: String,
}

impl Session {
    /// Prepare `model`.
    pub fn new(model: &Model, opts: &SessionOptions) -> Result<Session> {
        match opts.device.as_str() {
            "auto" | "cpu" => {}
            other => {
                return Err(Error::arg(format!(
                    "unknown device '{other}' (available: auto, cpu)"
                )))
            }
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
        let exec = Executor::new(&graph, &registry).map_err(|e| match e {
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", model.name)),
            other => other,
        })?;
        Ok(Session {
            exec,
            inputs,
            outputs,
            device: "cpu".into(),
            log,
        })
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
        self.exec.graph()
    }

    /// Run with inputs by name. Every input must be given, with the declared dtype and a shape
    /// that matches every fixed dimension. Returns outputs in graph order.
    pub fn run(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<(String, Tensor)>> {
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
            check_input(info, t)?;
            bound.push((*id, t.clone()));
        }
        let outs = self.exec.run(&bound)?;
        Ok(self
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .zip(outs)
            .collect())
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
