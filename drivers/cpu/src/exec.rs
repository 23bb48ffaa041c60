//! Graph execution on the CPU.
//!
//! An [`Executor`] is built once per session: it resolves every node's op function, fixes the
//! topological order and computes each value's last use. A run fills value slots in order and
//! releases each intermediate right after its last consumer, so peak memory is the live set,
//! not the whole graph.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use edgehal_core::graph::{Graph, NodeId, ValueId};
use edgehal_core::tensor::checked_numel;
use edgehal_core::{DType, Error, Result, Tensor};

use crate::arena::{Pool, RunScope};
use crate::conv_plan::{ConvPlan, FUSED_CONV, FUSED_DOMAIN};
use crate::nhwc_plan::{NhwcConvPlan, PwDwPlan};
use crate::ops::nn::GemvPlan;
use crate::ops::rnn::RnnPlan;
use crate::ops::{OpCtx, OpFn, OutputDest, Registry};
use crate::qconv_plan::QConvPlan;
use crate::qdq_plan::QdqConvPlan;

/// A graph output of [`Executor::run_into`].
#[derive(Clone, Debug)]
pub enum Produced {
    /// Computed straight into the destination the caller gave (no copy).
    InPlace { dtype: DType, shape: Vec<usize> },
    /// Computed as a tensor (no destination, or the producing op cannot write in place).
    Tensor(Tensor),
}

/// One caller destination, handed to the op that produces its graph output.
struct DestCell<'d> {
    buf: RefCell<Option<&'d mut [u8]>>,
    done: RefCell<Option<(DType, Vec<usize>)>>,
}

impl OutputDest for DestCell<'_> {
    fn write(
        &self,
        dtype: DType,
        shape: &[usize],
        align: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Option<Result<()>> {
        let n = checked_numel(shape, dtype)
            .ok()?
            .checked_mul(dtype.size())?;
        let mut slot = self.buf.borrow_mut();
        let buf = slot.as_mut()?;
        if buf.len() < n || !(buf.as_ptr() as usize).is_multiple_of(align.max(1)) {
            return None;
        }
        let region = &mut buf[..n];
        region.fill(0);
        let r = fill(region);
        if r.is_ok() {
            *self.done.borrow_mut() = Some((dtype, shape.to_vec()));
            *slot = None;
        }
        Some(r)
    }
}

/// A graph prepared for repeated execution.
pub struct Executor {
    graph: Graph,
    order: Vec<NodeId>,
    ops: Vec<OpFn>,
    /// For each position in `order`, the values to release after it runs.
    release: Vec<Vec<ValueId>>,
    /// For each node, the graph output (index into `graph.outputs`) its output 0 may be
    /// computed into in place: a value no node reads and that is listed once as an output.
    dest_of: Vec<Option<usize>>,
    registry: Registry,
    /// Per node: its prepared state when it has constant weights (see [`Plan`]).
    plans: Vec<Option<Plan>>,
    /// Initializers by value id, looked up in place rather than copied into each run's slots.
    inits: Vec<Option<Tensor>>,
    /// Threads the prepared kernels may use (1: everything on the caller's thread).
    threads: usize,
    /// Buffers reused across runs (see [`crate::arena`]), when `pooling`.
    pool: Arc<Pool>,
    pooling: bool,
    /// Per-node time totals when `EDGEHAL_OP_PROFILE=1` (printed to stderr on drop).
    profile: Option<crate::profile::OpProfile>,
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
        let mut dest_of = vec![None; graph.nodes.len()];
        for &n in &order {
            let Some(Some(v)) = graph.nodes[n].outputs.first().copied() else {
                continue;
            };
            let listed: Vec<usize> = graph
                .outputs
                .iter()
                .enumerate()
                .filter(|(_, &o)| o == v)
                .map(|(i, _)| i)
                .collect();
            let internal = last[v].is_some()
                || graph.inputs.contains(&v)
                || graph.initializers.contains_key(&v);
            if let ([i], false) = (listed.as_slice(), internal) {
                dest_of[n] = Some(*i);
            }
        }
        let mut shared = HashMap::new();
        let plans = graph
            .nodes
            .iter()
            .map(|node| Plan::new(graph, node, &mut shared))
            .collect();
        let mut inits = vec![None; graph.values.len()];
        for (id, t) in &graph.initializers {
            if let Some(slot) = inits.get_mut(*id) {
                *slot = Some(t.clone());
            }
        }
        Ok(Executor {
            inits,
            graph: graph.clone(),
            order,
            ops,
            release,
            dest_of,
            registry: registry.clone(),
            plans,
            threads: 1,
            pool: Arc::new(Pool::default()),
            pooling: crate::arena::pooling_enabled(),
            profile: crate::profile::OpProfile::from_env(graph),
        })
    }

    /// Lets the prepared kernels use `threads` threads (0: one per core).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = crate::par::resolve_threads(threads);
    }

    /// Reuse f32 buffers across runs through a pool (default on; `EDGEHAL_POOL=0` turns it off).
    pub fn set_buffer_reuse(&mut self, on: bool) {
        self.pooling = on;
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
        self.run_impl(inputs, outer, &[])?
            .into_iter()
            .map(|p| match p {
                Produced::Tensor(t) => Ok(t),
                Produced::InPlace { .. } => Err(Error::arg("output written in place unasked")),
            })
            .collect()
    }

    /// Run with caller memory for the outputs: `dests[i]` (when given) receives graph output
    /// `i` in place if the op producing it can write there (output 0 of its node, f32 Gemm,
    /// MatMul...); such outputs come back as [`Produced::InPlace`] with their dtype and shape.
    /// Every other output comes back as a tensor for the caller to copy or keep. A destination
    /// must be at least the output's byte size and aligned to its element size to be used.
    pub fn run_into(
        &self,
        inputs: &[(ValueId, Tensor)],
        dests: Vec<Option<&mut [u8]>>,
    ) -> Result<Vec<Produced>> {
        if dests.len() > self.graph.outputs.len() {
            return Err(Error::arg(format!(
                "{} output destinations for {} outputs",
                dests.len(),
                self.graph.outputs.len()
            )));
        }
        let cells: Vec<DestCell<'_>> = dests
            .into_iter()
            .map(|d| DestCell {
                buf: RefCell::new(d),
                done: RefCell::new(None),
            })
            .collect();
        self.run_impl(inputs, &|_| None, &cells)
    }

    fn run_impl(
        &self,
        inputs: &[(ValueId, Tensor)],
        outer: &dyn Fn(&str) -> Option<Tensor>,
        dests: &[DestCell<'_>],
    ) -> Result<Vec<Produced>> {
        let g = &self.graph;
        let pool = self.pooling.then_some(&self.pool);
        let _scope = RunScope::enter(pool, self.threads);
        let mut slots: Vec<Option<Tensor>> = vec![None; g.values.len()];
        // A value: this run's slot (inputs override initializer defaults), else an initializer.
        let value = |slots: &[Option<Tensor>], v: ValueId| -> Option<Tensor> {
            slots
                .get(v)
                .and_then(|s| s.as_ref())
                .or_else(|| self.inits.get(v).and_then(|s| s.as_ref()))
                .cloned()
        };
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
                if slots[*v].is_none() && self.inits[*v].is_none() {
                    if let Some(t) = outer(&g.values[*v].name) {
                        fetched.insert(*v, t);
                    }
                }
            }
            let ins: Vec<Option<&Tensor>> = node
                .inputs
                .iter()
                .map(|v| {
                    v.and_then(|v| {
                        slots[v]
                            .as_ref()
                            .or_else(|| self.inits[v].as_ref())
                            .or_else(|| fetched.get(&v))
                    })
                })
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
                        Some(id) => value(&slots, id)
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
                dest: self.dest_of[n]
                    .and_then(|i| dests.get(i))
                    .map(|d| d as &dyn OutputDest),
            };
            let t0 = self.profile.as_ref().map(|_| std::time::Instant::now());
            let outs = match &self.plans[n] {
                Some(Plan::Conv(plan)) => plan.run_threads(&ctx, &ins, self.threads),
                Some(Plan::QConv(plan)) => plan.run(&ctx, &ins, self.threads),
                Some(Plan::QdqConv(plan)) => plan.run(&ctx, &ins, self.threads),
                Some(Plan::Nhwc(plan)) => plan.run(&ctx, &ins, self.threads),
                Some(Plan::PwDw(plan)) => plan.run(&ctx, &ins, self.threads),
                Some(Plan::Rnn(plan)) => plan.run(&ctx, &ins),
                Some(Plan::Gemv(plan)) => plan
                    .run(&ctx, &ins)
                    .unwrap_or_else(|| (self.ops[n])(&ctx, &ins)),
                None => (self.ops[n])(&ctx, &ins),
            }
            .map_err(|e| match e {
                Error::Op { .. } => e,
                other => Error::Op {
                    node: g.describe_node(n),
                    msg: other.to_string(),
                },
            })?;
            if let (Some(p), Some(t0)) = (&self.profile, t0) {
                p.add(n, t0.elapsed());
            }
            drop(ins);
            let in_place = self.dest_of[n]
                .and_then(|i| dests.get(i))
                .is_some_and(|d| d.done.borrow().is_some());
            let n_outs = outs.len();
            let mut outs = outs.into_iter();
            for (k, o) in node.outputs.iter().enumerate() {
                let t = outs.next();
                if let Some(o) = o {
                    if k == 0 && in_place {
                        continue;
                    }
                    match t {
                        Some(t) => slots[*o] = Some(t),
                        None => {
                            return Err(Error::Op {
                                node: g.describe_node(n),
                                msg: format!("produced {n_outs} outputs, output {k} is missing"),
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
            .enumerate()
            .map(|(i, &o)| {
                if let Some((dtype, shape)) = dests.get(i).and_then(|d| d.done.borrow().clone()) {
                    return Ok(Produced::InPlace { dtype, shape });
                }
                value(&slots, o)
                    .or_else(|| outer(&g.values[o].name))
                    .map(Produced::Tensor)
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

/// A node's state prepared once per session from its constant inputs.
enum Plan {
    /// A float convolution with packed weights ([`crate::conv_plan`]).
    Conv(ConvPlan),
    /// A quantized TFLite convolution / fully connected layer ([`crate::qconv_plan`]).
    QConv(QConvPlan),
    /// A QDQ-fused int8 ONNX convolution in NHWC ([`crate::qdq_plan`]).
    QdqConv(QdqConvPlan),
    /// A float convolution on NHWC activations ([`crate::nhwc_plan`]).
    Nhwc(NhwcConvPlan),
    /// A 1x1 -> depthwise pair on NHWC activations ([`crate::nhwc_plan::PwDwPlan`]).
    PwDw(PwDwPlan),
    /// A recurrent layer with constant `R` packed once for `gemv`, and `[W | R]` when `W` is
    /// constant too ([`crate::ops::rnn::RnnPlan`]).
    Rnn(RnnPlan),
    /// A `Gemm` with constant `B`, packed once for single-row products
    /// ([`crate::ops::nn::GemvPlan`]); nodes sharing `B`, `C` and attributes (an unrolled
    /// recurrent layer's steps) share one plan.
    Gemv(Arc<GemvPlan>),
}

/// Key of a shared [`GemvPlan`]: `B`, `C`, domain, `transA`/`transB`, `alpha`/`beta` bits.
type GemvKey = (
    usize,
    Option<usize>,
    String,
    [Option<i64>; 2],
    [Option<u32>; 2],
);

impl Plan {
    fn new(
        graph: &Graph,
        node: &edgehal_core::Node,
        shared: &mut HashMap<GemvKey, Option<Arc<GemvPlan>>>,
    ) -> Option<Plan> {
        if let Some(p) = prepare(graph, node) {
            return Some(Plan::Conv(p));
        }
        if let Some(p) = QConvPlan::prepare(graph, node) {
            return Some(Plan::QConv(p));
        }
        if let Some(p) = QdqConvPlan::prepare(graph, node) {
            return Some(Plan::QdqConv(p));
        }
        if let Some(p) = NhwcConvPlan::prepare(graph, node) {
            return Some(Plan::Nhwc(p));
        }
        if let Some(p) = PwDwPlan::prepare(graph, node) {
            return Some(Plan::PwDw(p));
        }
        if node.op == "Gemm" {
            return Self::gemv(graph, node, shared).map(Plan::Gemv);
        }
        let r = node.inputs.get(2).copied().flatten()?;
        let w = node.inputs.get(1).copied().flatten();
        let w = w.and_then(|w| graph.initializers.get(&w));
        RnnPlan::new(node, graph.initializers.get(&r)?, w).map(Plan::Rnn)
    }

    fn gemv(
        graph: &Graph,
        node: &edgehal_core::Node,
        shared: &mut HashMap<GemvKey, Option<Arc<GemvPlan>>>,
    ) -> Option<Arc<GemvPlan>> {
        let init = |k: usize| node.inputs.get(k).copied().flatten();
        let (bid, cid) = (init(1)?, init(2));
        let b = graph.initializers.get(&bid)?;
        let c = match cid {
            Some(c) => Some(graph.initializers.get(&c)?),
            None => None,
        };
        let key = (
            bid,
            cid,
            node.domain.clone(),
            ["transA", "transB"].map(|a| node.attr_i(a)),
            ["alpha", "beta"].map(|a| node.attr_f(a).map(f32::to_bits)),
        );
        shared
            .entry(key)
            .or_insert_with(|| GemvPlan::new(node, b, c).map(Arc::new))
            .clone()
    }
}

/// Input `k` of `node` when it is absent (`Some(None)`) or an initializer (`Some(Some(_))`);
/// `None` when it is computed at run time (no plan can be prepared for the node).
pub(crate) fn const_input<'g>(
    graph: &'g Graph,
    node: &edgehal_core::Node,
    k: usize,
) -> Option<Option<&'g Tensor>> {
    match node.inputs.get(k).copied().flatten() {
        None => Some(None),
        Some(v) => graph.initializers.get(&v).map(Some),
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
    let w = const_input(graph, node, 1)??;
    let b = const_input(graph, node, 2)?;
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
            dest: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::graph::{Dim, Node, ValueInfo};
    use edgehal_core::Attr;

    /// y = Gemm(x, w) with x [1,2], w [2,2]; z = Relu(y) also an output when `relu_out`.
    fn gemm_graph(relu_out: bool) -> Graph {
        let mut g = Graph::new("g");
        let mut v = |name: &str, shape: &[usize]| {
            let id = g.value_id(name);
            g.values[id] = ValueInfo {
                name: name.into(),
                dtype: Some(DType::F32),
                shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
            };
            id
        };
        let (x, w, y, z) = (
            v("x", &[1, 2]),
            v("w", &[2, 2]),
            v("y", &[1, 2]),
            v("z", &[1, 2]),
        );
        g.inputs = vec![x];
        g.opsets.insert(String::new(), 17);
        g.initializers.insert(
            w,
            Tensor::from_vec(vec![2, 2], vec![1f32, 2., 3., 4.]).expect("w"),
        );
        g.nodes.push(Node {
            op: "Gemm".into(),
            inputs: vec![Some(x), Some(w)],
            outputs: vec![Some(y)],
            ..Default::default()
        });
        g.outputs = vec![y];
        if relu_out {
            g.nodes.push(Node {
                op: "Relu".into(),
                inputs: vec![Some(y)],
                outputs: vec![Some(z)],
                ..Default::default()
            });
            g.outputs.push(z);
        }
        g
    }

    fn x() -> Vec<(ValueId, Tensor)> {
        vec![(0, Tensor::from_vec(vec![1, 2], vec![1f32, -1.]).expect("x"))]
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn gemm_output_is_computed_in_place() {
        let ex = Executor::new(&gemm_graph(false), &Registry::new()).expect("executor");
        let mut dst = vec![0xffu32; 2];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut dst);
        let out = ex.run_into(&x(), vec![Some(bytes)]).expect("run");
        assert!(
            matches!(&out[0], Produced::InPlace { dtype: DType::F32, shape } if shape == &[1, 2])
        );
        // [1, -1] x [[1,2],[3,4]] = [-2, -2]
        assert_eq!(f32s(bytemuck::cast_slice(&dst)), vec![-2.0, -2.0]);
    }

    #[test]
    fn unusable_destinations_fall_back_to_a_tensor() {
        let ex = Executor::new(&gemm_graph(false), &Registry::new()).expect("executor");
        // Too small.
        let mut small = vec![0u32; 1];
        let out = ex
            .run_into(&x(), vec![Some(bytemuck::cast_slice_mut(&mut small))])
            .expect("run");
        assert!(matches!(&out[0], Produced::Tensor(t) if t.to_f32().as_ref() == [-2.0, -2.0]));
        assert_eq!(
            small,
            vec![0],
            "a destination that does not fit is not touched"
        );
        // Misaligned for f32.
        let mut raw = vec![0u32; 3];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut raw);
        let out = ex
            .run_into(&x(), vec![Some(&mut bytes[1..9])])
            .expect("run");
        assert!(matches!(&out[0], Produced::Tensor(_)));
        // No destination at all.
        let out = ex.run_into(&x(), vec![None]).expect("run");
        assert!(matches!(&out[0], Produced::Tensor(_)));
        assert!(
            ex.run_into(&x(), vec![None, None]).is_err(),
            "more destinations than outputs"
        );
    }

    #[test]
    fn an_output_other_nodes_read_gets_no_destination() {
        // y is an output AND Relu's input: computing it into caller memory would hide it from
        // Relu, so it is produced as a tensor; z (Relu) cannot write in place either.
        let ex = Executor::new(&gemm_graph(true), &Registry::new()).expect("executor");
        let mut a = vec![0u32; 2];
        let mut b = vec![0u32; 2];
        let out = ex
            .run_into(
                &x(),
                vec![
                    Some(bytemuck::cast_slice_mut(&mut a)),
                    Some(bytemuck::cast_slice_mut(&mut b)),
                ],
            )
            .expect("run");
        assert!(matches!(&out[0], Produced::Tensor(t) if t.to_f32().as_ref() == [-2.0, -2.0]));
        assert!(matches!(&out[1], Produced::Tensor(t) if t.to_f32().as_ref() == [0.0, 0.0]));
        assert_eq!((a, b), (vec![0, 0], vec![0, 0]));
    }

    #[test]
    fn a_large_single_row_gemm_is_split_in_row_blocks_exactly() {
        // k x n large enough for the blocked GemvPlan (several row blocks, the last short),
        // with transB, alpha and a bias: every thread count gives the reference product.
        let (k, n) = (300, 1003);
        let mut g = Graph::new("head");
        let (x, w, c, y) = (
            g.value_id("x"),
            g.value_id("w"),
            g.value_id("c"),
            g.value_id("y"),
        );
        g.inputs = vec![x];
        g.opsets.insert(String::new(), 17);
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7) % 13) as f32 * 0.125 - 0.75)
            .collect();
        let cv: Vec<f32> = (0..n).map(|j| (j % 5) as f32 - 2.0).collect();
        g.initializers
            .insert(w, Tensor::from_vec(vec![n, k], wv.clone()).expect("w"));
        g.initializers
            .insert(c, Tensor::from_vec(vec![n], cv.clone()).expect("c"));
        let mut attrs = std::collections::BTreeMap::new();
        attrs.insert("transB".to_string(), Attr::Int(1));
        attrs.insert("alpha".to_string(), Attr::Float(0.5));
        g.nodes.push(Node {
            op: "Gemm".into(),
            inputs: vec![Some(x), Some(w), Some(c)],
            outputs: vec![Some(y)],
            attrs,
            ..Default::default()
        });
        g.outputs = vec![y];
        let xv: Vec<f32> = (0..k).map(|i| ((i * 3) % 7) as f32 * 0.25 - 0.5).collect();
        // Products of multiples of 1/32 stay exact in f32 whatever the summation order.
        let want: Vec<f32> = (0..n)
            .map(|j| 0.5 * (0..k).map(|i| xv[i] * wv[j * k + i]).sum::<f32>() + cv[j])
            .collect();
        for threads in [1, 2, 3] {
            let mut ex = Executor::new(&g, &Registry::new()).expect("executor");
            ex.set_threads(threads);
            let input = vec![(x, Tensor::from_vec(vec![1, k], xv.clone()).expect("x"))];
            let out = ex.run(&input).expect("run");
            assert_eq!(out[0].shape(), &[1, n]);
            assert_eq!(
                out[0].to_f32().as_ref(),
                want.as_slice(),
                "{threads} threads"
            );
        }
    }

    /// x [1, n] -> Sigmoid -> Add(x) -> Gemm(w [n, 3]) -> y, with Mul(x, 2) also an output.
    fn chain_graph(n: usize) -> Graph {
        let mut g = Graph::new("chain");
        let mut v = |name: &str| g.value_id(name);
        let (x, s, a, w, y, two, m) = (v("x"), v("s"), v("a"), v("w"), v("y"), v("two"), v("m"));
        g.inputs = vec![x];
        g.opsets.insert(String::new(), 17);
        let wv: Vec<f32> = (0..n * 3)
            .map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5)
            .collect();
        g.initializers
            .insert(w, Tensor::from_vec(vec![n, 3], wv).expect("w"));
        g.initializers.insert(two, Tensor::scalar(2f32));
        let node = |op: &str, ins: Vec<usize>, out: usize| Node {
            op: op.into(),
            inputs: ins.into_iter().map(Some).collect(),
            outputs: vec![Some(out)],
            ..Default::default()
        };
        g.nodes.push(node("Sigmoid", vec![x], s));
        g.nodes.push(node("Add", vec![s, x], a));
        g.nodes.push(node("Gemm", vec![a, w], y));
        g.nodes.push(node("Mul", vec![x, two], m));
        g.outputs = vec![y, m];
        g
    }

    #[test]
    fn reused_buffers_give_the_same_outputs_and_returned_outputs_stay_valid() {
        let n = 40_000; // above the threshold where elementwise ops split across threads
        let g = chain_graph(n);
        let plain = Executor::new(&g, &Registry::new()).expect("executor");
        let mut pooled = Executor::new(&g, &Registry::new()).expect("executor");
        pooled.set_buffer_reuse(true);
        pooled.set_threads(2);
        let mut kept = Vec::new();
        for r in 0..6 {
            let xv: Vec<f32> = (0..n)
                .map(|i| ((i * 13 + r * 5) % 17) as f32 * 0.25 - 2.0)
                .collect();
            let feed = vec![(0, Tensor::from_vec(vec![1, n], xv).expect("x"))];
            let want = plain.run(&feed).expect("plain run");
            let got = pooled.run(&feed).expect("pooled run");
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(a.shape(), b.shape());
                assert_eq!(a.to_f32(), b.to_f32(), "run {r}");
            }
            kept.push((want, got));
        }
        assert!(
            pooled.pool.pooled_bytes() > 0,
            "intermediates went back to the pool"
        );
        // Outputs held by the caller were never handed out again by later runs.
        for (want, got) in &kept {
            for (a, b) in want.iter().zip(got) {
                assert_eq!(a.to_f32(), b.to_f32());
            }
        }
    }

    /// A 3x3 stride-1 Conv large enough for the Winograd input transform to split its
    /// channels across threads: F(4x4) at 32x32 with 16 channels, F(2x2) at 7x7 with 128.
    /// Every thread count gives the same bits (the split changes which thread transforms a
    /// channel, not the arithmetic), and they match the direct sum.
    #[test]
    fn winograd_input_transform_split_across_threads_is_exact() {
        for &(c, hw, m) in &[(16usize, 32usize, 8usize), (128, 7, 8)] {
            let mut g = Graph::new("wino");
            let (x, w, b, y) = (
                g.value_id("x"),
                g.value_id("w"),
                g.value_id("b"),
                g.value_id("y"),
            );
            g.inputs = vec![x];
            g.opsets.insert(String::new(), 17);
            let wv: Vec<f32> = (0..m * c * 9)
                .map(|i| ((i * 5) % 9) as f32 * 0.125 - 0.5)
                .collect();
            let bv: Vec<f32> = (0..m).map(|j| j as f32 * 0.25).collect();
            g.initializers.insert(
                w,
                Tensor::from_vec(vec![m, c, 3, 3], wv.clone()).expect("w"),
            );
            g.initializers
                .insert(b, Tensor::from_vec(vec![m], bv.clone()).expect("b"));
            let mut attrs = std::collections::BTreeMap::new();
            attrs.insert("pads".to_string(), Attr::Ints(vec![1, 1, 1, 1]));
            attrs.insert("kernel_shape".to_string(), Attr::Ints(vec![3, 3]));
            g.nodes.push(Node {
                op: "Conv".into(),
                inputs: vec![Some(x), Some(w), Some(b)],
                outputs: vec![Some(y)],
                attrs,
                ..Default::default()
            });
            g.outputs = vec![y];
            let xv: Vec<f32> = (0..c * hw * hw)
                .map(|i| ((i * 3) % 11) as f32 * 0.0625 - 0.3)
                .collect();
            let at = |ci: usize, yy: isize, xx: isize| -> f32 {
                if yy < 0 || xx < 0 || yy >= hw as isize || xx >= hw as isize {
                    0.0
                } else {
                    xv[(ci * hw + yy as usize) * hw + xx as usize]
                }
            };
            let mut want = vec![0f32; m * hw * hw];
            for o in 0..m {
                for yy in 0..hw {
                    for xx in 0..hw {
                        let mut acc = bv[o] as f64;
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    acc += wv[((o * c + ci) * 3 + ky) * 3 + kx] as f64
                                        * at(
                                            ci,
                                            yy as isize + ky as isize - 1,
                                            xx as isize + kx as isize - 1,
                                        ) as f64;
                                }
                            }
                        }
                        want[(o * hw + yy) * hw + xx] = acc as f32;
                    }
                }
            }
            let mut first: Option<Vec<f32>> = None;
            for threads in [1, 2, 3] {
                let mut ex = Executor::new(&g, &Registry::new()).expect("executor");
                ex.set_threads(threads);
                let input = vec![(
                    x,
                    Tensor::from_vec(vec![1, c, hw, hw], xv.clone()).expect("x"),
                )];
                let out = ex.run(&input).expect("run");
                let got = out[0].to_f32().to_vec();
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                for (gv, wv) in got.iter().zip(&want) {
                    assert!(
                        (gv - wv).abs() <= 1e-4 * scale,
                        "c={c} {threads} threads: {gv} vs {wv}"
                    );
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => assert_eq!(f, &got, "c={c}: {threads} threads differ from 1"),
                }
            }
        }
    }

    /// The 2-D MaxPool fast path (one output) against the general pooling loop (forced by
    /// asking for the Indices output too) on every small geometry: kernels 1-4, strides 1-3,
    /// asymmetric pads below the kernel, ceil mode on and off, maps of 1 to 9 columns.
    #[test]
    fn max_pool_fast_path_matches_general_loop() {
        let run = |k: i64, s: i64, pads: [i64; 4], ceil: i64, hw: [usize; 2], indices: bool| {
            let mut g = Graph::new("pool");
            let (x, y, i) = (g.value_id("x"), g.value_id("y"), g.value_id("i"));
            g.inputs = vec![x];
            g.opsets.insert(String::new(), 17);
            let mut attrs = std::collections::BTreeMap::new();
            attrs.insert("pads".to_string(), Attr::Ints(pads.to_vec()));
            attrs.insert("kernel_shape".to_string(), Attr::Ints(vec![k, k]));
            attrs.insert("strides".to_string(), Attr::Ints(vec![s, s]));
            attrs.insert("ceil_mode".to_string(), Attr::Int(ceil));
            g.nodes.push(Node {
                op: "MaxPool".into(),
                inputs: vec![Some(x)],
                outputs: if indices {
                    vec![Some(y), Some(i)]
                } else {
                    vec![Some(y)]
                },
                attrs,
                ..Default::default()
            });
            g.outputs = if indices { vec![y, i] } else { vec![y] };
            let n = 2 * hw[0] * hw[1];
            let xv: Vec<f32> = (0..n).map(|v| ((v * 37) % 23) as f32 - 11.0).collect();
            let ex = Executor::new(&g, &Registry::new()).expect("executor");
            let input = vec![(x, Tensor::from_vec(vec![1, 2, hw[0], hw[1]], xv).unwrap())];
            ex.run(&input)
                .map(|o| (o[0].shape().to_vec(), o[0].to_f32().into_owned()))
        };
        let mut cases = 0;
        for k in 1..=4i64 {
            for s in 1..=3i64 {
                for (pl, pr) in [(0, 0), (0, k - 1), (k - 1, 0), (k / 2, k / 2)] {
                    for ceil in [0, 1] {
                        for wdt in 1..=9usize {
                            let hw = [4, wdt];
                            let pads = [pl, pl, pr, pr];
                            let fast = run(k, s, pads, ceil, hw, false);
                            let general = run(k, s, pads, ceil, hw, true);
                            match (fast, general) {
                                (Ok(a), Ok(b)) => {
                                    assert_eq!(
                                        a, b,
                                        "k {k} s {s} pads {pads:?} ceil {ceil} {hw:?}"
                                    );
                                    cases += 1;
                                }
                                (Err(_), Err(_)) => {}
                                (a, b) => panic!(
                                    "k {k} s {s} pads {pads:?} ceil {ceil} {hw:?}: {a:?} vs {b:?}"
                                ),
                            }
                        }
                    }
                }
            }
        }
        assert!(cases > 500, "only {cases} geometries ran");
    }

    /// MaxPool 3x3 stride 2 pad 1 on 8 channels of 128x128 (an output large enough to split
    /// across threads): every thread count gives the window maxima.
    #[test]
    fn max_pool_split_across_threads_is_exact() {
        let (c, hw) = (8usize, 128usize);
        let mut g = Graph::new("pool");
        let (x, y) = (g.value_id("x"), g.value_id("y"));
        g.inputs = vec![x];
        g.opsets.insert(String::new(), 17);
        let mut attrs = std::collections::BTreeMap::new();
        attrs.insert("pads".to_string(), Attr::Ints(vec![1, 1, 1, 1]));
        attrs.insert("kernel_shape".to_string(), Attr::Ints(vec![3, 3]));
        attrs.insert("strides".to_string(), Attr::Ints(vec![2, 2]));
        g.nodes.push(Node {
            op: "MaxPool".into(),
            inputs: vec![Some(x)],
            outputs: vec![Some(y)],
            attrs,
            ..Default::default()
        });
        g.outputs = vec![y];
        let xv: Vec<f32> = (0..c * hw * hw)
            .map(|i| ((i * 7919) % 1009) as f32 - 500.0)
            .collect();
        let oh = hw / 2;
        let mut want = vec![f32::NEG_INFINITY; c * oh * oh];
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..oh {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                            if iy >= 0 && ix >= 0 && (iy as usize) < hw && (ix as usize) < hw {
                                let v = xv[(ch * hw + iy as usize) * hw + ix as usize];
                                let o = &mut want[(ch * oh + oy) * oh + ox];
                                *o = o.max(v);
                            }
                        }
                    }
                }
            }
        }
        for threads in [1, 2, 3] {
            let mut ex = Executor::new(&g, &Registry::new()).expect("executor");
            ex.set_threads(threads);
            let input = vec![(
                x,
                Tensor::from_vec(vec![1, c, hw, hw], xv.clone()).expect("x"),
            )];
            let out = ex.run(&input).expect("run");
            assert_eq!(out[0].shape(), &[1, c, oh, oh]);
            assert_eq!(
                out[0].to_f32().as_ref(),
                want.as_slice(),
                "{threads} threads"
            );
        }
    }
}
