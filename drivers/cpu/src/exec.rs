//! Graph execution on the CPU.
//!
//! An [`Executor`] is built once per session: it resolves every node's op function, fixes the
//! topological order and computes each value's last use. A run fills value slots in order and
//! releases each intermediate right after its last consumer, so peak memory is the live set,
//! not the whole graph.

use std::collections::HashMap;

use edgehal_core::graph::{Graph, NodeId, ValueId};
use edgehal_core::{Error, Result, Tensor};

use crate::conv_plan::{ConvPlan, FUSED_CONV, FUSED_DOMAIN};
use crate::ops::{OpCtx, OpFn, Registry};

/// A graph prepared for repeated execution.
pub struct Executor {
    graph: Graph,
    order: Vec<NodeId>,
    ops: Vec<OpFn>,
    /// For each position in `order`, the values to release after it runs.
    release: Vec<Vec<ValueId>>,
    registry: Registry,
    /// Per node: a convolution with constant weights, packed once (see [`crate::conv_plan`]).
    prepared: Vec<Option<ConvPlan>>,
    /// Threads the prepared kernels may use (1: everything on the caller's thread).
    threads: usize,
}

impl Executor {
    /// Prepare `graph`. Fails, naming the node, when an op is not implemented.
    pub fn new(graph: &Graph, registry: &Registry) -> Result<Self> {
        let order = graph.topo_order()?;
        let mut ops = vec![None; graph.nodes.len()];
        for &n in &order {
            let node = &graph.nodes[n];
            let f = registry.get(&node.domain, &node.op).ok_or_else(|| {
                let dom = if node.domain.is_empty() {
                    String::new()
                } else {
                    format!("{}.", node.domain)
                };
                Error::unsupported(format!(
                    "{}: op {dom}{} is not implemented on cpu",
                    graph.describe_node(n),
                    node.op
                ))
            })?;
            ops[n] = Some(f);
        }
        let ops: Vec<OpFn> = ops.into_iter().map(|o| o.unwrap_or(missing_op)).collect();
        // Last use of every value, in execution position.
        let mut last = vec![None::<usize>; graph.values.len()];
        for (pos, &n) in order.iter().enumerate() {
            for v in graph.nodes[n].inputs.iter().flatten() {
                last[*v] = Some(pos);
            }
            // Values a subgraph reads from this scope must stay alive through this node.
            for a in graph.nodes[n].attrs.values() {
                if let edgehal_core::Attr::Graph(g) = a {
                    for name in g.captured_names() {
                        if let Some(id) = graph.find_value(&name) {
                            last[id] = Some(pos);
                        }
                    }
                }
            }
        }
        let mut release = vec![Vec::new(); order.len()];
        for (v, l) in last.iter().enumerate() {
            if let Some(pos) = l {
                if !graph.outputs.contains(&v) && !graph.initializers.contains_key(&v) {
                    release[*pos].push(v);
                }
            }
        }
        let prepared = graph
            .nodes
            .iter()
            .map(|node| prepare(graph, node))
            .collect();
        Ok(Executor {
            graph: graph.clone(),
            order,
            ops,
            release,
            registry: registry.clone(),
            prepared,
            threads: 1,
        })
    }

    /// Lets the prepared kernels use `threads` threads (0: one per core).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = crate::par::resolve_threads(threads);
    }

    /// The graph being executed.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Run with inputs given by value id. Returns the graph outputs in order.
    pub fn run(&self, inputs: &[(ValueId, Tensor)]) -> Result<Vec<Tensor>> {
        self.run_scoped(inputs, &|_| None)
    }

    /// Run as a subgraph: names not defined here are looked up with `outer`.
    pub fn run_scoped(
        &self,
        inputs: &[(ValueId, Tensor)],
        outer: &dyn Fn(&str) -> Option<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let g = &self.graph;
        let mut slots: Vec<Option<Tensor>> = vec![None; g.values.len()];
        for (id, t) in &g.initializers {
            slots[*id] = Some(t.clone());
        }
        for (id, t) in inputs {
            let slot = slots
                .get_mut(*id)
                .ok_or_else(|| Error::arg(format!("input id {id} out of range")))?;
            *slot = Some(t.clone());
        }
        for (pos, &n) in self.order.iter().enumerate() {
            let node = &g.nodes[n];
            // Outer-scope values a node reads are fetched lazily.
            let mut fetched: HashMap<ValueId, Tensor> = HashMap::new();
            for v in node.inputs.iter().flatten() {
                if slots[*v].is_none() {
                    if let Some(t) = outer(&g.values[*v].name) {
                        fetched.insert(*v, t);
                    }
                }
            }
            let ins: Vec<Option<&Tensor>> = node
                .inputs
                .iter()
                .map(|v| v.and_then(|v| slots[v].as_ref().or_else(|| fetched.get(&v))))
                .collect();
            for (k, (want, got)) in node.inputs.iter().zip(&ins).enumerate() {
                if want.is_some() && got.is_none() {
                    return Err(Error::Op {
                        node: g.describe_node(n),
                        msg: format!(
                            "input {k} '{}' has no value",
                            g.value_name(want.unwrap_or(0))
                        ),
                    });
                }
            }
            let sub = |body: &Graph, args: &[Tensor]| -> Result<Vec<Tensor>> {
                let ex = Executor::new(body, &self.registry)?;
                let feed: Vec<(ValueId, Tensor)> = body
                    .inputs
                    .iter()
                    .copied()
                    .zip(args.iter().cloned())
                    .collect();
                let lookup = |name: &str| -> Option<Tensor> {
                    match g.find_value(name) {
                        Some(id) => slots[id]
                            .clone()
                            .or_else(|| fetched.get(&id).cloned())
                            .or_else(|| outer(name)),
                        None => outer(name),
                    }
                };
                ex.run_scoped(&feed, &lookup)
            };
            let ctx = OpCtx {
                node,
                opset: g
                    .opsets
                    .get(&node.domain)
                    .copied()
                    .unwrap_or_else(|| g.opset()),
                subgraph: Some(&sub),
            };
            let outs = match &self.prepared[n] {
                Some(plan) => plan.run_threads(&ctx, &ins, self.threads),
                None => (self.ops[n])(&ctx, &ins),
            }
            .map_err(|e| match e {
                Error::Op { .. } => e,
                other => Error::Op {
                    node: g.describe_node(n),
                    msg: other.to_string(),
                },
            })?;
            drop(ins);
            for (k, o) in node.outputs.iter().enumerate() {
                if let Some(o) = o {
                    match outs.get(k) {
                        Some(t) => slots[*o] = Some(t.clone()),
                        None => {
                            return Err(Error::Op {
                                node: g.describe_node(n),
                                msg: format!(
                                    "produced {} outputs, output {k} is missing",
                                    outs.len()
                                ),
                            })
                        }
                    }
                }
            }
            for v in &self.release[pos] {
                slots[*v] = None;
            }
        }
        g.outputs
            .iter()
            .map(|&o| {
                slots[o]
                    .clone()
                    .or_else(|| outer(&g.values[o].name))
                    .ok_or_else(|| {
                        Error::arg(format!(
                            "graph output '{}' was not computed",
                            g.value_name(o)
                        ))
                    })
            })
            .collect()
    }
}

/// A prepared plan for a float convolution whose weight (and bias) are initializers, with the
/// weights packed for the input shape shape inference found. `None` for anything else, and
/// where preparing fails (the op then reports the problem at run time).
fn prepare(graph: &Graph, node: &edgehal_core::Node) -> Option<ConvPlan> {
    let is_conv = (node.op == "Conv" && (node.domain.is_empty() || node.domain == "ai.onnx"))
        || (node.op == FUSED_CONV && node.domain == FUSED_DOMAIN);
    if !is_conv {
        return None;
    }
    let init = |k: usize| -> Option<Option<&Tensor>> {
        match node.inputs.get(k).copied().flatten() {
            None => Some(None),
            Some(v) => graph.initializers.get(&v).map(Some),
        }
    };
    let w = init(1)??;
    let b = init(2)?;
    if !w.dtype().is_float() {
        return None;
    }
    let plan = ConvPlan::new(node, w, b).ok()?;
    let x_shape: Option<Vec<usize>> = node
        .inputs
        .first()
        .copied()
        .flatten()
        .and_then(|x| graph.values[x].shape.as_ref())
        .and_then(|s| {
            s.iter()
                .map(|d| match d {
                    edgehal_core::graph::Dim::Fixed(v) => Some(*v),
                    _ => None,
                })
                .collect()
        });
    if let Some(xs) = x_shape {
        let ctx = OpCtx {
            node,
            opset: graph
                .opsets
                .get(&node.domain)
                .copied()
                .unwrap_or_else(|| graph.opset()),
            subgraph: None,
        };
        plan.warm(&ctx, &xs).ok()?;
    }
    Some(plan)
}

fn missing_op(ctx: &OpCtx<'_>, _: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    Err(Error::unsupported(format!(
        "op {} is not implemented",
        ctx.node.op
    )))
}
