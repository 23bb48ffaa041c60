//! Graph passes run once when a session is prepared: constant folding, dead node removal,
//! static shape/type inference and convolution fusion.
//!
//! Fusion ([`fuse_convolutions`]) folds a following BatchNormalization into a float Conv's
//! constant weights and replaces Conv [+ Add] [+ activation] chains by one
//! `edgehal.FusedConv` node, which the CPU driver runs with the add and activation in its
//! kernel epilogue. It runs last, so the other passes see only ONNX ops.
//!
//! QDQ fusion ([`fuse_qdq`]) runs first, on the graph as imported: quantized ONNX convolutions
//! written as DequantizeLinear -> Conv -> QuantizeLinear become int8 NHWC convolutions
//! (`edgehal.QLinearConvNhwc`, see `edgehal_cpu::qdq_plan`) before constant folding would turn
//! their weights' DequantizeLinear into float initializers.

use edgehal_core::graph::{Dim, Graph, NodeId, ValueId};
use edgehal_core::{Attr, DType, Error, Node, Result, Tensor};
use edgehal_cpu::conv_plan::{FUSED_CONV, FUSED_DOMAIN};
use edgehal_cpu::qdq_plan::{GEMM_2D, INPUT_NCHW, QCONV_NHWC, QDQ_ADD};
use edgehal_cpu::{OpCtx, Registry};

/// Ops never folded: their result is not a function of their inputs alone.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// Largest tensor (bytes) a fold may create: folding must not blow up memory (e.g. a
/// ConstantOfShape of a huge shape stays a node and is computed at run time).
const MAX_FOLD_BYTES: usize = 64 << 20;

/// Replace every node whose inputs are all constants by its outputs as initializers.
/// Returns the number of nodes folded.
pub fn fold_constants(g: &mut Graph, registry: &Registry) -> Result<usize> {
    fold_constants_keeping(g, registry, &[])
}

/// [`fold_constants`] leaving the nodes in `keep` as they are.
fn fold_constants_keeping(g: &mut Graph, registry: &Registry, keep: &[NodeId]) -> Result<usize> {
    let order = g.topo_order()?;
    let mut folded = vec![false; g.nodes.len()];
    let mut count = 0;
    for n in order {
        let node = &g.nodes[n];
        if keep.contains(&n)
            || NONDETERMINISTIC.contains(&node.op.as_str())
            || node.attrs.values().any(|a| {
                matches!(
                    a,
                    edgehal_core::Attr::Graph(_) | edgehal_core::Attr::Graphs(_)
                )
            })
        {
            continue;
        }
        if !node
            .inputs
            .iter()
            .flatten()
            .all(|v| g.initializers.contains_key(v))
        {
            continue;
        }
        if node
            .outputs
            .iter()
            .flatten()
            .any(|o| g.outputs.contains(o) && g.inputs.contains(o))
        {
            continue;
        }
        let Some(f) = registry.get(&node.domain, &node.op) else {
            continue;
        };
        let ins: Vec<Option<&Tensor>> = node
            .inputs
            .iter()
            .map(|v| v.and_then(|v| g.initializers.get(&v)))
            .collect();
        let ctx = OpCtx {
            node,
            opset: g
                .opsets
                .get(&node.domain)
                .copied()
                .unwrap_or_else(|| g.opset()),
            subgraph: None,
            dest: None,
        };
        // A node that fails here (bad attribute...) is left for run time, where the error is
        // reported with the inputs the user gave.
        let Ok(outs) = f(&ctx, &ins) else { continue };
        if outs.iter().any(|t| t.bytes().len() > MAX_FOLD_BYTES)
            || outs.len() < node.outputs.iter().flatten().count()
        {
            continue;
        }
        let outputs = node.outputs.clone();
        for (o, t) in outputs.iter().zip(outs) {
            if let Some(o) = o {
                g.values[*o].dtype = Some(t.dtype());
                g.values[*o].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
                g.initializers.insert(*o, t);
            }
        }
        folded[n] = true;
        count += 1;
    }
    let mut k = 0;
    g.nodes.retain(|_| {
        let keep = !folded[k];
        k += 1;
        keep
    });
    Ok(count)
}

/// Everything a session runs before execution. Returns a short log of what changed.
pub fn optimize(g: &mut Graph, registry: &Registry) -> Result<String> {
    optimize_with(g, registry, true)
}

/// [`optimize`] for graphs that several devices share (planned sessions, `edgehal plan`):
/// batch norms are still folded into convolutions (plain ONNX `Conv` results), but nothing is
/// fused into the CPU-only `edgehal.FusedConv`, so every device keeps seeing standard ops.
pub fn optimize_portable(g: &mut Graph, registry: &Registry) -> Result<String> {
    optimize_with(g, registry, false)
}

/// DequantizeLinear nodes of constant 8-bit/32-bit tensors read only as the weight or bias
/// of a Conv whose input is itself a DequantizeLinear output (a QDQ convolution).
fn qdq_weight_dequantizers(g: &Graph) -> Vec<NodeId> {
    let producers = g.producers();
    let consumers = g.consumers();
    let mut keep = Vec::new();
    for conv in g.nodes.iter().filter(|n| is_onnx(n, "Conv")) {
        let Some(x) = conv.inputs.first().copied().flatten() else {
            continue;
        };
        if dq_producer(g, &producers, x).is_none() {
            continue;
        }
        for &v in conv.inputs.iter().skip(1).flatten() {
            if let Some((q, _, _, dq)) = dq_producer(g, &producers, v) {
                if consumers[v].len() == 1
                    && !g.outputs.contains(&v)
                    && g.initializers.contains_key(&q)
                {
                    keep.push(dq);
                }
            }
        }
    }
    keep
}

/// Whether planned CPU segments get the CPU's own fusion ([`compile_segment`]);
/// `EDGEHAL_SEGMENT_FUSION=0` turns it off (to compare, or to rule it out).
fn segment_fusion() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGEHAL_SEGMENT_FUSION").map_or(true, |v| v != "0"))
}

/// Compiles a planned segment on `dev`. A segment for the CPU driver first gets the CPU-only
/// rewrites [`optimize_portable`] leaves out (QDQ int8 convolutions, `edgehal.FusedConv`), so
/// nodes that run together on the CPU run as fast as in a CPU-only session: without it,
/// adding a second device to mobilenet_v2_int8.onnx left the CPU running its QDQ chains in
/// float, 2.6x slower. The profiler compiles its calibration runs the same way, so their
/// times (and the node times scaled to them) include the fusion. Other devices, one-node
/// segments, and segments whose rewrite would not keep the inputs and outputs (same names,
/// same order) compile as given.
pub fn compile_segment(
    dev: &dyn edgehal_core::driver::Device,
    sub: &edgehal_core::driver::Subgraph,
) -> Result<Box<dyn edgehal_core::driver::Executable>> {
    let info = dev.info();
    let cpu = info.kind == edgehal_core::driver::DeviceKind::Cpu && info.driver == "cpu";
    if cpu && sub.graph.nodes.len() > 1 && segment_fusion() {
        if let Some(fused) = cpu_segment(sub) {
            return dev.compile(&fused);
        }
    }
    dev.compile(sub)
}

/// `sub` with the CPU fusion passes applied, or `None` when they fail or change its interface.
fn cpu_segment(sub: &edgehal_core::driver::Subgraph) -> Option<edgehal_core::driver::Subgraph> {
    let mut g = sub.graph.clone();
    optimize(&mut g, &Registry::new()).ok()?;
    let names = |g: &Graph, vs: &[ValueId]| -> Vec<String> {
        vs.iter().map(|&v| g.value_name(v).to_string()).collect()
    };
    let same = names(&g, &g.inputs) == names(&sub.graph, &sub.graph.inputs)
        && names(&g, &g.outputs) == names(&sub.graph, &sub.graph.outputs);
    same.then(|| edgehal_core::driver::Subgraph {
        graph: g,
        parent_nodes: sub.parent_nodes.clone(),
    })
}

fn optimize_with(g: &mut Graph, registry: &Registry, cpu_fusion: bool) -> Result<String> {
    let mut qdq = 0;
    if cpu_fusion && edgehal_cpu::qdq_plan::enabled() {
        edgehal_core::infer::infer_shapes(g);
        qdq = fuse_qdq(g);
        if qdq > 0 {
            g.remove_dead_nodes();
        }
    }
    // A shared graph keeps the DequantizeLinear of QDQ convolutions' weights and biases: a
    // planned CPU segment then still finds whole DQ -> Conv -> Q chains to run as int8
    // (compile_segment); folded, they would be float weights for good.
    let keep = if !cpu_fusion && edgehal_cpu::qdq_plan::enabled() && segment_fusion() {
        qdq_weight_dequantizers(g)
    } else {
        Vec::new()
    };
    let folded = fold_constants_keeping(g, registry, &keep)?;
    let dead = g.remove_dead_nodes();
    edgehal_core::infer::infer_shapes(g);
    crate::passes_layout::tflite_to_nchw(g)?;
    g.validate()
        .map_err(|e| Error::InvalidGraph(format!("after optimisation: {e}")))?;
    let (bn, fused) = fuse_convolutions_with(g, cpu_fusion);
    let mut nhwc = 0;
    if cpu_fusion && edgehal_cpu::nhwc_plan::enabled() {
        nhwc = crate::passes_nhwc::float_convs_to_nhwc(g);
        if nhwc > 0 {
            g.remove_dead_nodes();
            if edgehal_cpu::nhwc_plan::pw_dw_fusion_enabled() {
                nhwc += crate::passes_nhwc::fuse_pointwise_depthwise(
                    g,
                    crate::passes_nhwc::FUSE_MIN_BYTES,
                );
            }
        }
    }
    let pairs = cancel_transpose_pairs(g);
    if pairs > 0 {
        g.remove_dead_nodes();
    }
    Ok(format!(
        "folded {folded} constant nodes, removed {dead} dead nodes, folded {bn} batch norms, \
         fused {fused} convolutions, rewrote {qdq} QDQ convolutions and adds to int8, \
         {nhwc} float convolutions to NHWC, cancelled {pairs} transpose pairs"
    ))
}

/// Removes Transpose pairs that undo each other (`B(A(x))` with `B`'s perm the inverse of
/// `A`'s). The layout passes leave one where a value they keep in NCHW or NHWC is read back in
/// the other layout only to be turned round again: a TFLite graph whose output is a feature map
/// (NHWC conv -> NCHW -> NHWC output) paid two full transposes for nothing. When `x`'s producer
/// writes nothing else and `x` and `A`'s output have no other reader, the producer writes `B`'s
/// output directly; otherwise `B` becomes an `Identity` of `x`. Returns the pairs removed; the
/// caller drops the dead nodes.
pub fn cancel_transpose_pairs(g: &mut Graph) -> usize {
    let perm_of = |n: &Node| -> Option<Vec<usize>> {
        if !is_onnx(n, "Transpose") || n.inputs.len() != 1 || n.outputs.len() != 1 {
            return None;
        }
        let p: Vec<usize> = n
            .attr_ints("perm")?
            .iter()
            .map(|&v| usize::try_from(v).ok())
            .collect::<Option<_>>()?;
        let mut seen = vec![false; p.len()];
        for &v in &p {
            if v >= p.len() || std::mem::replace(&mut seen[v], true) {
                return None;
            }
        }
        Some(p)
    };
    let mut count = 0;
    let (mut producers, mut consumers) = (g.producers(), g.consumers());
    let mut stale = false;
    for b in 0..g.nodes.len() {
        if std::mem::take(&mut stale) {
            // Rare (a pair or two per graph): recount after a change, not for every node.
            (producers, consumers) = (g.producers(), g.consumers());
        }
        let Some(pb) = perm_of(&g.nodes[b]) else {
            continue;
        };
        let (Some(Some(t)), Some(Some(y))) = (
            g.nodes[b].inputs.first().copied(),
            g.nodes[b].outputs.first().copied(),
        ) else {
            continue;
        };
        let Some(a) = producers[t] else { continue };
        let Some(pa) = perm_of(&g.nodes[a]) else {
            continue;
        };
        let Some(Some(x)) = g.nodes[a].inputs.first().copied() else {
            continue;
        };
        // out[i] = t[pb[i]] = x[pa[pb[i]]]: the identity when pa[pb[i]] == i for every i.
        if pa.len() != pb.len() || (0..pb.len()).any(|i| pa[pb[i]] != i) {
            continue;
        }
        let sole = |v: ValueId, reader: NodeId| {
            consumers[v].as_slice() == [reader] && !g.outputs.contains(&v)
        };
        let rename = producers[x].filter(|&p| {
            sole(x, a) && sole(t, b) && !g.inputs.contains(&x) && g.nodes[p].outputs.len() == 1
        });
        match rename {
            Some(p) => {
                g.nodes[p].outputs[0] = Some(y);
                // B and A are now dead (nothing reads x or t); make sure of it even if the
                // caller looks before removing them.
                g.nodes[b].outputs[0] = None;
                g.nodes[b].inputs[0] = None;
            }
            None => {
                let n = &mut g.nodes[b];
                n.op = "Identity".into();
                n.domain = String::new();
                n.attrs.clear();
                n.inputs[0] = Some(x);
            }
        }
        count += 1;
        stale = true;
    }
    count
}

fn is_onnx(node: &Node, op: &str) -> bool {
    node.op == op && (node.domain.is_empty() || node.domain == "ai.onnx")
}

/// A scalar float initializer.
fn const_scalar(g: &Graph, v: Option<ValueId>) -> Option<f32> {
    let t = g.initializers.get(&v?)?;
    if !t.dtype().is_float() || t.len() != 1 {
        return None;
    }
    t.to_f32().first().copied()
}

/// The `FusedConv` attributes that express `node` as an epilogue activation, when it is one
/// (one input, the value `x`, and one output).
fn activation_attrs(g: &Graph, node: &Node, x: ValueId) -> Option<Vec<(&'static str, Attr)>> {
    if node.inputs.first().copied().flatten() != Some(x) || node.outputs.len() != 1 {
        return None;
    }
    let name = |s: &str| ("activation", Attr::String(s.as_bytes().to_vec()));
    let only_x = node.inputs.iter().skip(1).all(|v| v.is_none());
    if is_onnx(node, "Relu") && only_x {
        return Some(vec![name("Relu")]);
    }
    if is_onnx(node, "Sigmoid") && only_x {
        return Some(vec![name("Sigmoid")]);
    }
    if is_onnx(node, "HardSwish") && only_x {
        return Some(vec![name("HardSwish")]);
    }
    if is_onnx(node, "LeakyRelu") && only_x {
        let a = node.attr_f("alpha").unwrap_or(0.01);
        return Some(vec![name("LeakyRelu"), ("act_alpha", Attr::Float(a))]);
    }
    if is_onnx(node, "HardSigmoid") && only_x {
        let a = node.attr_f("alpha").unwrap_or(0.2);
        let b = node.attr_f("beta").unwrap_or(0.5);
        return Some(vec![
            name("HardSigmoid"),
            ("act_alpha", Attr::Float(a)),
            ("act_beta", Attr::Float(b)),
        ]);
    }
    if is_onnx(node, "Clip") {
        // Opset 11+: min and max are optional inputs (constants here); before: attributes.
        let bound = |k: usize, attr: &str, d: f32| -> Option<f32> {
            match node.inputs.get(k).copied().flatten() {
                Some(v) => const_scalar(g, Some(v)),
                None => Some(node.attr_f(attr).unwrap_or(d)),
            }
        };
        let lo = bound(1, "min", f32::NEG_INFINITY)?;
        let hi = bound(2, "max", f32::INFINITY)?;
        return Some(vec![
            name("Clip"),
            ("act_min", Attr::Float(lo)),
            ("act_max", Attr::Float(hi)),
        ]);
    }
    None
}

/// Adds a float initializer `t` under a fresh name derived from `hint`.
fn add_initializer(g: &mut Graph, hint: &str, t: Tensor) -> ValueId {
    let id = g.new_value(hint);
    g.values[id].dtype = Some(t.dtype());
    g.values[id].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
    g.initializers.insert(id, t);
    id
}

/// Folds BatchNormalization (inference form, constant parameters) into the constant f32 weights
/// of the Conv before it: `W' = W * s`, `B' = (B - mean) * s + beta`, `s = scale / sqrt(var +
/// eps)` per output channel. Returns the new weight and bias values.
fn fold_bn(g: &mut Graph, conv: &Node, bn: &Node) -> Option<(ValueId, ValueId)> {
    if bn.inputs.len() != 5 || bn.outputs.iter().flatten().count() != 1 {
        return None;
    }
    let w_id = conv.inputs.get(1).copied().flatten()?;
    let w = g.initializers.get(&w_id)?;
    if w.dtype() != DType::F32 || w.rank() < 3 {
        return None;
    }
    let m = w.shape()[0];
    let param = |k: usize| -> Option<Vec<f32>> {
        let t = g.initializers.get(&bn.inputs.get(k).copied().flatten()?)?;
        (t.dtype().is_float() && t.len() == m).then(|| t.to_f32().into_owned())
    };
    let (scale, beta, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
    let eps = bn.attr_f("epsilon").unwrap_or(1e-5) as f64;
    let bias = match conv.inputs.get(2).copied().flatten() {
        Some(b) => {
            let t = g.initializers.get(&b)?;
            if !t.dtype().is_float() || t.len() != m {
                return None;
            }
            t.to_f32().into_owned()
        }
        None => vec![0f32; m],
    };
    let per = w.len() / m.max(1);
    let mut wv = w.to_f32().into_owned();
    let mut bv = vec![0f32; m];
    for o in 0..m {
        let s = scale[o] as f64 / (var[o] as f64 + eps).sqrt();
        for x in &mut wv[o * per..(o + 1) * per] {
            *x = (*x as f64 * s) as f32;
        }
        bv[o] = ((bias[o] as f64 - mean[o] as f64) * s + beta[o] as f64) as f32;
    }
    let wshape = w.shape().to_vec();
    let wt = Tensor::from_vec(wshape, wv).ok()?;
    let bt = Tensor::from_vec(vec![m], bv).ok()?;
    let name = g.value_name(w_id).to_string();
    let w_new = add_initializer(g, &format!("{name}_bn"), wt);
    let b_new = add_initializer(g, &format!("{name}_bn_bias"), bt);
    Some((w_new, b_new))
}

/// Fuses float convolutions with what follows them: BatchNormalization is folded into constant
/// weights; then an Add of a same-shaped tensor (the residual) and an activation (Relu, Clip,
/// LeakyRelu, Sigmoid, HardSigmoid, HardSwish) become one `edgehal.FusedConv`. Only values
/// with a single consumer that are not graph outputs are fused away. Graphs with subgraphs
/// are left alone. Returns (batch norms folded, FusedConv nodes made).
pub fn fuse_convolutions(g: &mut Graph) -> (usize, usize) {
    fuse_convolutions_with(g, true)
}

/// [`fuse_convolutions`]; with `cpu_fusion` false only batch norms are folded (the Conv stays
/// a standard ONNX Conv any device can run).
pub fn fuse_convolutions_with(g: &mut Graph, cpu_fusion: bool) -> (usize, usize) {
    let has_subgraphs = g.nodes.iter().any(|n| {
        n.attrs
            .values()
            .any(|a| matches!(a, Attr::Graph(_) | Attr::Graphs(_)))
    });
    if has_subgraphs {
        return (0, 0);
    }
    let mut uses = vec![0usize; g.values.len()];
    let mut consumer: Vec<Option<NodeId>> = vec![None; g.values.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in n.inputs.iter().flatten() {
            uses[v] += 1;
            consumer[v] = Some(i);
        }
    }
    for &o in &g.outputs {
        uses[o] += 1;
    }
    let mut removed = vec![false; g.nodes.len()];
    let (mut bns, mut fused) = (0, 0);
    for ci in 0..g.nodes.len() {
        let conv = &g.nodes[ci];
        if !is_onnx(conv, "Conv") || conv.outputs.len() != 1 || conv.inputs.len() < 2 {
            continue;
        }
        let Some(out) = conv.outputs[0] else { continue };
        if g.values[out].dtype != Some(DType::F32) {
            continue;
        }
        let next = |cur: ValueId, removed: &[bool]| -> Option<NodeId> {
            let n = consumer.get(cur).copied().flatten()?;
            (uses[cur] == 1 && !removed[n]).then_some(n)
        };
        let mut conv = conv.clone();
        let mut cur = out;
        let mut absorbed = Vec::new();
        // BatchNormalization with constant parameters.
        if let Some(n) = next(cur, &removed) {
            let bn = g.nodes[n].clone();
            if is_onnx(&bn, "BatchNormalization")
                && bn.inputs.first().copied().flatten() == Some(cur)
            {
                if let Some((w, b)) = fold_bn(g, &conv, &bn) {
                    conv.inputs[1] = Some(w);
                    conv.inputs.resize(3, None);
                    conv.inputs[2] = Some(b);
                    absorbed.push(n);
                    bns += 1;
                    if let Some(o) = bn.outputs.iter().flatten().next() {
                        cur = *o;
                    }
                }
            }
        }
        let fixed_shape = |v: ValueId| g.values[v].fixed_shape();
        let mut residual = None;
        // Without CPU fusion the Add/activation chain stays standard ops for other devices.
        if let (true, Some(n)) = (cpu_fusion, next(cur, &removed)) {
            let add = &g.nodes[n];
            if is_onnx(add, "Add") && add.inputs.len() == 2 && add.outputs.len() == 1 {
                let (a, b) = (add.inputs[0], add.inputs[1]);
                let other = match (a, b) {
                    (Some(a), Some(b)) if a == cur && b != cur => Some(b),
                    (Some(a), Some(b)) if b == cur && a != cur => Some(a),
                    _ => None,
                };
                if let (Some(z), Some(o)) = (other, add.outputs[0]) {
                    let same = fixed_shape(z).is_some() && fixed_shape(z) == fixed_shape(cur);
                    if same && g.values[z].dtype == Some(DType::F32) {
                        residual = Some(z);
                        absorbed.push(n);
                        cur = o;
                    }
                }
            }
        }
        let mut act = Vec::new();
        if let (true, Some(n)) = (cpu_fusion, next(cur, &removed)) {
            if let Some(attrs) = activation_attrs(g, &g.nodes[n], cur) {
                if let Some(o) = g.nodes[n].outputs[0] {
                    act = attrs;
                    absorbed.push(n);
                    cur = o;
                }
            }
        }
        if absorbed.is_empty() {
            continue;
        }
        if residual.is_none() && act.is_empty() {
            // Only a batch norm was folded: stays a plain Conv.
            conv.outputs = vec![Some(cur)];
        } else {
            conv.op = FUSED_CONV.into();
            conv.domain = FUSED_DOMAIN.into();
            conv.inputs.resize(3, None);
            if let Some(z) = residual {
                conv.inputs.push(Some(z));
            }
            for (k, v) in act {
                conv.attrs.insert(k.to_string(), v);
            }
            conv.outputs = vec![Some(cur)];
            fused += 1;
        }
        g.nodes[ci] = conv;
        for n in absorbed {
            removed[n] = true;
        }
    }
    let mut k = 0;
    g.nodes.retain(|_| {
        let keep = !removed[k];
        k += 1;
        keep
    });
    (bns, fused)
}

/// An initializer that is a float scalar (or a one-element tensor).
fn scalar_init(g: &Graph, v: Option<ValueId>) -> Option<f32> {
    let t = g.initializers.get(&v?)?;
    (t.dtype() == DType::F32 && t.len() == 1).then(|| t.to_f32()[0])
}

/// The DequantizeLinear (ONNX domain, one output) producing `v`: its quantized input, scale and
/// zero point (absent: `None`).
fn dq_producer(
    g: &Graph,
    producer: &[Option<NodeId>],
    v: ValueId,
) -> Option<(ValueId, ValueId, Option<ValueId>, NodeId)> {
    let n = producer.get(v).copied().flatten()?;
    let node = &g.nodes[n];
    if !is_onnx(node, "DequantizeLinear") || node.outputs.len() != 1 {
        return None;
    }
    let q = node.inputs.first().copied().flatten()?;
    let s = node.inputs.get(1).copied().flatten()?;
    Some((q, s, node.inputs.get(2).copied().flatten(), n))
}

fn dims_of(g: &Graph, v: ValueId) -> Option<Vec<usize>> {
    g.values[v].fixed_shape()
}

/// Rewrites quantized convolutions written in QDQ form into int8 NHWC convolutions
/// (`edgehal.QLinearConvNhwc`: `QLinearConv`'s inputs and rounding with NHWC activations):
///
/// `DQ(x: u8/i8, scalar scale/zp)`, `DQ(W: const i8/u8, per-tensor or per-output-channel on
/// axis 0)`, optional `DQ(B: const i32, zero point 0, scale = x_scale * w_scale)` -> `Conv`
/// (2-d, group 1 or depthwise) -> `QuantizeLinear(scalar scale/zp)`.
///
/// Only when every scale, zero point, weight and bias is an initializer and the Conv output's
/// single consumer is that QuantizeLinear (not a graph output); DequantizeLinear nodes whose
/// output has other consumers stay for them (the fused node reads their quantized input).
/// Layout: a fused node reads the NHWC form of its input — the previous fused node's output
/// directly; else a group-1 convolution reads the NCHW value itself (`input_nchw`) and a
/// depthwise one a Transpose inserted once per value — and every fused output also gets a
/// Transpose back to the original NCHW value, which dead-node removal drops when only fused
/// convolutions read it.
///
/// `DQ(a)`, `DQ(b)` (per-tensor constants, one 8-bit type, one fixed shape) -> `Add` -> `Q` whose
/// sum has no other reader becomes `edgehal.QdqAdd` (the composed ops' arithmetic in one
/// pass), in NHWC when both inputs come from fused nodes. Returns the number of nodes
/// rewritten.
pub fn fuse_qdq(g: &mut Graph) -> usize {
    if g.nodes.iter().any(|n| {
        n.attrs
            .values()
            .any(|a| matches!(a, Attr::Graph(_) | Attr::Graphs(_)))
    }) {
        return 0;
    }
    let Ok(order) = g.topo_order() else { return 0 };
    let mut uses = vec![0usize; g.values.len()];
    let mut consumer: Vec<Option<NodeId>> = vec![None; g.values.len()];
    let mut producer: Vec<Option<NodeId>> = vec![None; g.values.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for &v in n.inputs.iter().flatten() {
            uses[v] += 1;
            consumer[v] = Some(i);
        }
        for &o in n.outputs.iter().flatten() {
            producer[o] = Some(i);
        }
    }
    for &o in &g.outputs {
        uses[o] += 1;
    }
    let mut nhwc: std::collections::HashMap<ValueId, ValueId> = Default::default();
    let mut removed = vec![false; g.nodes.len()];
    let mut added: Vec<Node> = Vec::new();
    let mut count = 0;
    for ci in order {
        if let Some((mut node, q_node)) = qdq_add(g, ci, &uses, &consumer, &producer) {
            // NHWC when both inputs have that form (outputs of fused nodes), else as they are.
            let qout = g.nodes[q_node].outputs[0].expect("Q output");
            let (a, b) = (node.inputs[0].expect("a"), node.inputs[3].expect("b"));
            if let (Some(&an), Some(&bn)) = (nhwc.get(&a), nhwc.get(&b)) {
                let yn = transposed(g, qout, [0, 2, 3, 1], "_nhwc");
                node.inputs[0] = Some(an);
                node.inputs[3] = Some(bn);
                node.outputs = vec![Some(yn)];
                added.push(transpose_node(yn, qout, [0, 3, 1, 2]));
                nhwc.insert(qout, yn);
            } else {
                node.outputs = vec![Some(qout)];
            }
            g.nodes[ci] = node;
            removed[q_node] = true;
            count += 1;
            continue;
        }
        if let Some((mut node, q_node, w4)) = qdq_gemm(g, ci, &uses, &consumer, &producer) {
            node.inputs[3] = Some(add_initializer(g, "gemm_w_1x1", w4));
            node.outputs = vec![g.nodes[q_node].outputs[0]];
            g.nodes[ci] = node;
            removed[q_node] = true;
            count += 1;
            continue;
        }
        let Some((node, q_node)) = qdq_conv(g, ci, &uses, &consumer, &producer) else {
            continue;
        };
        let x = node.inputs[0].expect("x");
        let qout = g.nodes[q_node].outputs[0].expect("Q output");
        let mut node = node;
        let xn = match nhwc.get(&x) {
            Some(&v) => v,
            // A group-1 convolution gathers its patches from NCHW as cheaply: no transpose.
            None if node.attr_i("group").unwrap_or(1) == 1 => {
                node.attrs.insert(INPUT_NCHW.into(), Attr::Int(1));
                x
            }
            None => {
                let v = transposed(g, x, [0, 2, 3, 1], "_nhwc");
                added.push(transpose_node(x, v, [0, 2, 3, 1]));
                nhwc.insert(x, v);
                v
            }
        };
        let yn = transposed(g, qout, [0, 2, 3, 1], "_nhwc");
        node.inputs[0] = Some(xn);
        node.outputs = vec![Some(yn)];
        g.nodes[ci] = node;
        added.push(transpose_node(yn, qout, [0, 3, 1, 2]));
        nhwc.insert(qout, yn);
        removed[q_node] = true;
        count += 1;
    }
    let mut k = 0;
    g.nodes.retain(|_| {
        let keep = !removed[k];
        k += 1;
        keep
    });
    for n in added {
        g.add_node(n);
    }
    count
}

/// A new value for `v` permuted by `perm` (shape and dtype carried over when known).
pub(crate) fn transposed(g: &mut Graph, v: ValueId, perm: [usize; 4], suffix: &str) -> ValueId {
    let name = format!("{}{suffix}", g.value_name(v));
    let id = g.new_value(&name);
    g.values[id].dtype = g.values[v].dtype;
    if let Some(s) = g.values[v].shape.clone() {
        if s.len() == 4 {
            g.values[id].shape = Some(perm.iter().map(|&p| s[p].clone()).collect());
        }
    }
    id
}

pub(crate) fn transpose_node(x: ValueId, y: ValueId, perm: [usize; 4]) -> Node {
    let mut n = Node {
        op: "Transpose".into(),
        inputs: vec![Some(x)],
        outputs: vec![Some(y)],
        ..Default::default()
    };
    n.attrs.insert(
        "perm".into(),
        Attr::Ints(perm.iter().map(|&p| p as i64).collect()),
    );
    n
}

/// The QuantizeLinear (scalar constant scale, 8-bit scalar constant zero point) that is the
/// only reader of `y`, a value that is no graph output.
fn private_q(
    g: &Graph,
    y: ValueId,
    uses: &[usize],
    consumer: &[Option<NodeId>],
) -> Option<(NodeId, ValueId, Option<ValueId>)> {
    if uses[y] != 1 {
        return None;
    }
    let qn = consumer[y]?;
    let q = &g.nodes[qn];
    if !is_onnx(q, "QuantizeLinear")
        || q.inputs.first().copied().flatten() != Some(y)
        || q.outputs.len() != 1
        || q.outputs[0].is_none()
    {
        return None;
    }
    let ys = q.inputs.get(1).copied().flatten()?;
    scalar_init(g, Some(ys))?;
    let yz = q.inputs.get(2).copied().flatten();
    if let Some(z) = yz {
        let t = g.initializers.get(&z)?;
        if t.len() != 1 || !matches!(t.dtype(), DType::U8 | DType::I8) {
            return None;
        }
    }
    Some((qn, ys, yz))
}

/// A DequantizeLinear input with per-tensor constant parameters: (quantized value, scale,
/// zero point, 8-bit type).
fn dq_input(
    g: &Graph,
    producer: &[Option<NodeId>],
    v: ValueId,
) -> Option<(ValueId, ValueId, Option<ValueId>, DType)> {
    let (q, s, z, _) = dq_producer(g, producer, v)?;
    scalar_init(g, Some(s))?;
    let dt = match z {
        Some(z) => {
            let t = g.initializers.get(&z)?;
            (t.len() == 1).then_some(t.dtype())?
        }
        None => g.values[q].dtype?,
    };
    if !matches!(dt, DType::U8 | DType::I8) || g.values[q].dtype.is_some_and(|d| d != dt) {
        return None;
    }
    Some((q, s, z, dt))
}

/// `edgehal.QdqAdd` for Add `ai` when both inputs are per-tensor DequantizeLinear outputs of
/// one 8-bit type and one fixed shape, and the sum's only reader is a QuantizeLinear.
fn qdq_add(
    g: &Graph,
    ai: NodeId,
    uses: &[usize],
    consumer: &[Option<NodeId>],
    producer: &[Option<NodeId>],
) -> Option<(Node, NodeId)> {
    let add = &g.nodes[ai];
    if !is_onnx(add, "Add") || add.inputs.len() != 2 || add.outputs.len() != 1 {
        return None;
    }
    let (aq, as_, az, adt) = dq_input(g, producer, add.inputs[0]?)?;
    let (bq, bs, bz, bdt) = dq_input(g, producer, add.inputs[1]?)?;
    let shape = dims_of(g, aq)?;
    if adt != bdt || dims_of(g, bq)? != shape {
        return None;
    }
    let (qn, ys, yz) = private_q(g, add.outputs[0]?, uses, consumer)?;
    let node = Node {
        op: QDQ_ADD.into(),
        domain: FUSED_DOMAIN.into(),
        name: add.name.clone(),
        inputs: vec![
            Some(aq),
            Some(as_),
            az,
            Some(bq),
            Some(bs),
            bz,
            Some(ys),
            yz,
        ],
        outputs: vec![],
        ..Default::default()
    };
    Some((node, qn))
}

/// A quantized layer's bias: none (`Some(None)`), or `DQ(B: const i32 of `m`, zero point
/// 0, scale x_scale * w_scale)` as QLinearConv assumes (`Some(Some(B))`); `None` otherwise.
fn qdq_bias(
    g: &Graph,
    producer: &[Option<NodeId>],
    bv: Option<ValueId>,
    m: usize,
    xsv: f32,
    wsv: &Tensor,
) -> Option<Option<ValueId>> {
    let Some(bv) = bv else {
        return Some(None);
    };
    let init = |v: ValueId| g.initializers.get(&v);
    let (bq, bs, bz, _) = dq_producer(g, producer, bv)?;
    let t = init(bq)?;
    if t.dtype() != DType::I32 || t.len() != m {
        return None;
    }
    if let Some(z) = bz {
        let zt = init(z)?;
        if zt.dtype() != DType::I32 || zt.to_vec::<i32>().ok()?.iter().any(|&z| z != 0) {
            return None;
        }
    }
    let bsv = init(bs)?;
    if bsv.dtype() != DType::F32 || bsv.len() != wsv.len() && bsv.len() != 1 {
        return None;
    }
    let (bsv, wsf) = (bsv.to_f32(), wsv.to_f32());
    for o in 0..m {
        let want = xsv * wsf[if wsf.len() == 1 { 0 } else { o }];
        let got = bsv[if bsv.len() == 1 { 0 } else { o }];
        if (got - want).abs() > want.abs() * 1e-5 {
            return None;
        }
    }
    Some(Some(bq))
}

/// The 8-bit operands of a layer written in QDQ form: `DQ(x: u8/i8, scalar scale / zero
/// point)`, `DQ(W: const 8-bit of rank `w_rank`, per-tensor or per-output on axis 0)`, and
/// the optional bias `DQ(B)` ([`qdq_bias`]).
struct QdqOperands<'g> {
    xq: ValueId,
    xs: ValueId,
    xz: Option<ValueId>,
    w: &'g Tensor,
    wq: ValueId,
    ws: ValueId,
    wz: Option<ValueId>,
    b: Option<ValueId>,
}

fn qdq_operands<'g>(
    g: &'g Graph,
    producer: &[Option<NodeId>],
    x: ValueId,
    wv: ValueId,
    bv: Option<ValueId>,
    w_rank: usize,
) -> Option<QdqOperands<'g>> {
    let init = |v: Option<ValueId>| v.and_then(|v| g.initializers.get(&v));
    let (xq, xs, xz, _) = dq_producer(g, producer, x)?;
    let xsv = scalar_init(g, Some(xs))?;
    let x_dt = match xz {
        Some(z) => {
            let t = init(Some(z))?;
            (t.len() == 1).then_some(t.dtype())?
        }
        None => g.values[xq].dtype?,
    };
    if !matches!(x_dt, DType::U8 | DType::I8) || g.values[xq].dtype.is_some_and(|d| d != x_dt) {
        return None;
    }
    let (wq, ws, wz, wn) = dq_producer(g, producer, wv)?;
    let w = init(Some(wq))?;
    if w.rank() != w_rank || !matches!(w.dtype(), DType::I8 | DType::U8) {
        return None;
    }
    let m = w.shape()[0];
    let wsv = init(Some(ws))?;
    if wsv.dtype() != DType::F32 || !(wsv.len() == 1 || wsv.len() == m) {
        return None;
    }
    let axis = g.nodes[wn].attr_i("axis").unwrap_or(1);
    if wsv.len() > 1 && axis != 0 && axis != -(w_rank as i64) {
        return None;
    }
    if let Some(z) = wz {
        let t = init(Some(z))?;
        if t.dtype() != w.dtype() || t.len() != wsv.len() {
            return None;
        }
    }
    let b = qdq_bias(g, producer, bv, m, xsv, wsv)?;
    Some(QdqOperands {
        xq,
        xs,
        xz,
        w,
        wq,
        ws,
        wz,
        b,
    })
}

/// The [`QCONV_NHWC`] node over `o` with output scale / zero point `ys`, `yz` (attributes
/// are the caller's).
fn qconv_node(name: &str, o: &QdqOperands<'_>, ys: ValueId, yz: Option<ValueId>) -> Node {
    Node {
        op: QCONV_NHWC.into(),
        domain: FUSED_DOMAIN.into(),
        name: name.to_string(),
        inputs: vec![
            Some(o.xq),
            Some(o.xs),
            o.xz,
            Some(o.wq),
            Some(o.ws),
            o.wz,
            Some(ys),
            yz,
            o.b,
        ],
        outputs: vec![],
        ..Default::default()
    }
}

/// The fused node for Gemm `gi` with the pattern `DQ(x: [M, K] u8/i8, scalar)`,
/// `DQ(W: const 8-bit [N, K], per-tensor or per-row)`, optional `DQ(B)` -> `Gemm` (transB = 1,
/// no transA, alpha = beta = 1) -> `Q(scalar)`: a 1x1 [`QCONV_NHWC`] over `M` pixels with
/// [`GEMM_2D`] set (2-d input and output), the QuantizeLinear it absorbs, and `W` with the
/// [N, K, 1, 1] shape of a 1x1 convolution's weights (the same bytes) for the caller to add;
/// the node's weight input is set to it then.
fn qdq_gemm(
    g: &Graph,
    gi: NodeId,
    uses: &[usize],
    consumer: &[Option<NodeId>],
    producer: &[Option<NodeId>],
) -> Option<(Node, NodeId, Tensor)> {
    let gemm = &g.nodes[gi];
    if !is_onnx(gemm, "Gemm") || gemm.outputs.len() != 1 || gemm.inputs.len() < 2 {
        return None;
    }
    let attr_f = |k: &str| gemm.attr_f(k).unwrap_or(1.0);
    if gemm.attr_i("transA").unwrap_or(0) != 0
        || gemm.attr_i("transB").unwrap_or(0) != 1
        || attr_f("alpha") != 1.0
        || attr_f("beta") != 1.0
    {
        return None;
    }
    let bv = gemm.inputs.get(2).copied().flatten();
    let o = qdq_operands(g, producer, gemm.inputs[0]?, gemm.inputs[1]?, bv, 2)?;
    let &[n, k] = o.w.shape() else {
        return None;
    };
    if !matches!(dims_of(g, o.xq)?[..], [_, xk] if xk == k) {
        return None;
    }
    let w4 = o.w.reshape(vec![n, k, 1, 1]).ok()?;
    let (qn, ys, yz) = private_q(g, gemm.outputs[0]?, uses, consumer)?;
    let mut node = qconv_node(&gemm.name, &o, ys, yz);
    node.attrs.insert(GEMM_2D.into(), Attr::Int(1));
    node.attrs
        .insert("kernel_shape".into(), Attr::Ints(vec![1, 1]));
    Some((node, qn, w4))
}

/// The fused node for Conv `ci` when it has the QDQ pattern of [`fuse_qdq`], and the index of
/// the QuantizeLinear it absorbs.
fn qdq_conv(
    g: &Graph,
    ci: NodeId,
    uses: &[usize],
    consumer: &[Option<NodeId>],
    producer: &[Option<NodeId>],
) -> Option<(Node, NodeId)> {
    let conv = &g.nodes[ci];
    if !is_onnx(conv, "Conv") || conv.outputs.len() != 1 || conv.inputs.len() < 2 {
        return None;
    }
    let auto = conv.attr_s("auto_pad").unwrap_or_default();
    if !(auto.is_empty() || auto == "NOTSET") {
        return None;
    }
    // B: constant i32, zero point 0, scale x_scale * w_scale (what QLinearConv assumes).
    let bv = conv.inputs.get(2).copied().flatten();
    let o = qdq_operands(g, producer, conv.inputs[0]?, conv.inputs[1]?, bv, 4)?;
    let &[m, cg, _, _] = o.w.shape() else {
        return None;
    };
    let group = conv.attr_i("group").unwrap_or(1);
    let depthwise = cg == 1 && group as usize == m && m > 1;
    if group != 1 && !depthwise {
        return None;
    }
    // y: the Conv output's only reader is a QuantizeLinear with scalar scale / zero point.
    let (qn, ys, yz) = private_q(g, conv.outputs[0]?, uses, consumer)?;
    if dims_of(g, o.xq).is_some_and(|s| s.len() != 4) {
        return None;
    }
    let mut node = qconv_node(&conv.name, &o, ys, yz);
    for k in ["strides", "pads", "dilations", "group", "kernel_shape"] {
        if let Some(a) = conv.attrs.get(k) {
            node.attrs.insert(k.to_string(), a.clone());
        }
    }
    Some((node, qn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_cpu::Executor;

    fn rnd(seed: &mut u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn node(g: &mut Graph, op: &str, ins: &[&str], outs: &[&str], attrs: Vec<(&str, Attr)>) {
        let inputs = ins
            .iter()
            .map(|n| (!n.is_empty()).then(|| g.value_id(n)))
            .collect();
        let outputs = outs.iter().map(|n| Some(g.value_id(n))).collect();
        g.add_node(Node {
            op: op.into(),
            inputs,
            outputs,
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..Default::default()
        });
    }

    fn init(g: &mut Graph, name: &str, shape: Vec<usize>, v: Vec<f32>) {
        let id = g.value_id(name);
        g.values[id].dtype = Some(DType::F32);
        g.values[id].shape = Some(shape.iter().map(|&d| Dim::Fixed(d)).collect());
        g.initializers
            .insert(id, Tensor::from_vec(shape, v).unwrap());
    }

    /// Conv -> BatchNormalization -> Add(residual) -> Clip; depthwise Conv -> Relu; a 1x1
    /// Conv whose output is also a graph output (must not be fused away) -> Sigmoid.
    fn graph() -> Graph {
        let mut s = 11u32;
        let mut g = Graph::new("fuse");
        g.opsets.insert(String::new(), 13);
        let pads = || ("pads", Attr::Ints(vec![1, 1, 1, 1]));
        init(&mut g, "w1", vec![6, 4, 3, 3], rnd(&mut s, 6 * 4 * 9));
        init(&mut g, "b1", vec![6], rnd(&mut s, 6));
        init(&mut g, "scale", vec![6], rnd(&mut s, 6));
        init(&mut g, "beta", vec![6], rnd(&mut s, 6));
        init(&mut g, "mean", vec![6], rnd(&mut s, 6));
        let var: Vec<f32> = rnd(&mut s, 6).iter().map(|v| v + 1.0).collect();
        init(&mut g, "var", vec![6], var);
        init(&mut g, "lo", vec![], vec![-0.2]);
        init(&mut g, "hi", vec![], vec![0.3]);
        init(&mut g, "wd", vec![6, 1, 3, 3], rnd(&mut s, 6 * 9));
        init(&mut g, "w3", vec![5, 6, 1, 1], rnd(&mut s, 30));
        node(&mut g, "Conv", &["x", "w1", "b1"], &["c1"], vec![pads()]);
        node(
            &mut g,
            "BatchNormalization",
            &["c1", "scale", "beta", "mean", "var"],
            &["n1"],
            vec![("epsilon", Attr::Float(1e-3))],
        );
        node(&mut g, "Add", &["z", "n1"], &["a1"], vec![]);
        node(&mut g, "Clip", &["a1", "lo", "hi"], &["r1"], vec![]);
        node(
            &mut g,
            "Conv",
            &["r1", "wd"],
            &["c2"],
            vec![
                pads(),
                ("group", Attr::Int(6)),
                ("strides", Attr::Ints(vec![2, 2])),
            ],
        );
        node(&mut g, "Relu", &["c2"], &["r2"], vec![]);
        node(&mut g, "Conv", &["r2", "w3"], &["c3"], vec![]);
        node(&mut g, "Sigmoid", &["c3"], &["y"], vec![]);
        let (x, z) = (g.value_id("x"), g.value_id("z"));
        g.values[x].dtype = Some(DType::F32);
        g.values[x].shape = Some([1, 4, 9, 9].map(Dim::Fixed).to_vec());
        g.values[z].dtype = Some(DType::F32);
        g.values[z].shape = Some([1, 6, 9, 9].map(Dim::Fixed).to_vec());
        g.inputs = vec![x, z];
        g.outputs = vec![g.value_id("y"), g.value_id("c3")];
        edgehal_core::infer::infer_shapes(&mut g);
        g
    }

    #[test]
    fn fused_graph_matches_unfused() {
        let plain = graph();
        let mut fused = graph();
        let counts = fuse_convolutions(&mut fused);
        let ops: Vec<String> = fused.nodes.iter().map(|n| n.op.clone()).collect();
        assert_eq!(counts, (1, 2), "{ops:?}");
        let ops: Vec<String> = fused.nodes.iter().map(|n| n.op.clone()).collect();
        assert_eq!(ops, ["FusedConv", "FusedConv", "Conv", "Sigmoid"]);
        assert_eq!(fused.nodes[0].attr_s("activation").as_deref(), Some("Clip"));
        assert_eq!(fused.nodes[0].inputs.len(), 4, "residual input");
        assert_eq!(fused.nodes[1].attr_s("activation").as_deref(), Some("Relu"));
        fused.validate().unwrap();
        let mut s = 5u32;
        let x = Tensor::from_vec(vec![1, 4, 9, 9], rnd(&mut s, 4 * 81)).unwrap();
        let z = Tensor::from_vec(vec![1, 6, 9, 9], rnd(&mut s, 6 * 81)).unwrap();
        let reg = Registry::new();
        let feed = |g: &Graph| vec![(g.inputs[0], x.clone()), (g.inputs[1], z.clone())];
        let want = Executor::new(&plain, &reg)
            .unwrap()
            .run(&feed(&plain))
            .unwrap();
        let got = Executor::new(&fused, &reg)
            .unwrap()
            .run(&feed(&fused))
            .unwrap();
        assert_eq!(want.len(), got.len());
        for (w, o) in want.iter().zip(&got) {
            assert_eq!(w.shape(), o.shape());
            for (a, b) in w.to_f32().iter().zip(o.to_f32().iter()) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    fn qinit<T: edgehal_core::dtype::Elem>(
        g: &mut Graph,
        name: &str,
        shape: Vec<usize>,
        v: Vec<T>,
    ) {
        let t = Tensor::from_vec(shape.clone(), v).unwrap();
        let id = g.value_id(name);
        g.values[id].dtype = Some(t.dtype());
        g.values[id].shape = Some(shape.iter().map(|&d| Dim::Fixed(d)).collect());
        g.initializers.insert(id, t);
    }

    /// x (f32) -> Q(u8) -> DQ -> Conv 3x3 (DQ'd per-channel i8 W, i32 B) -> Q -> DQ ->
    /// depthwise Conv 3x3 stride 2 -> Q -> DQ -> y, as onnxruntime's quantizer writes it.
    fn qdq_graph() -> Graph {
        let mut s = 3u32;
        let mut g = Graph::new("qdq");
        g.opsets.insert(String::new(), 13);
        let mut bytes =
            |n: usize| -> Vec<i8> { rnd(&mut s, n).iter().map(|v| (v * 250.0) as i8).collect() };
        let axis0 = || vec![("axis", Attr::Int(0))];
        init(&mut g, "xs", vec![], vec![0.02]);
        qinit(&mut g, "xz", vec![], vec![128u8]);
        qinit(&mut g, "w1", vec![6, 4, 3, 3], bytes(6 * 36));
        init(
            &mut g,
            "w1s",
            vec![6],
            (0..6).map(|i| 0.004 + i as f32 * 1e-3).collect(),
        );
        qinit(&mut g, "w1z", vec![6], vec![0i8; 6]);
        qinit(&mut g, "b1", vec![6], vec![-300i32, 20, 0, 7, 900, -5]);
        let b1s: Vec<f32> = (0..6)
            .map(|i| 0.02f32 * (0.004 + i as f32 * 1e-3))
            .collect();
        init(&mut g, "b1s", vec![6], b1s);
        qinit(&mut g, "b1z", vec![6], vec![0i32; 6]);
        init(&mut g, "ys", vec![], vec![0.03]);
        qinit(&mut g, "yz", vec![], vec![10u8]);
        qinit(&mut g, "w2", vec![6, 1, 3, 3], bytes(6 * 9));
        init(&mut g, "w2s", vec![6], vec![0.01; 6]);
        qinit(&mut g, "w2z", vec![6], vec![0i8; 6]);
        init(&mut g, "zs", vec![], vec![0.05]);
        qinit(&mut g, "zz", vec![], vec![0u8]);
        node(
            &mut g,
            "QuantizeLinear",
            &["x", "xs", "xz"],
            &["xq"],
            vec![],
        );
        node(
            &mut g,
            "DequantizeLinear",
            &["xq", "xs", "xz"],
            &["xd"],
            vec![],
        );
        node(
            &mut g,
            "DequantizeLinear",
            &["w1", "w1s", "w1z"],
            &["w1d"],
            axis0(),
        );
        node(
            &mut g,
            "DequantizeLinear",
            &["b1", "b1s", "b1z"],
            &["b1d"],
            axis0(),
        );
        let pads = || ("pads", Attr::Ints(vec![1, 1, 1, 1]));
        node(&mut g, "Conv", &["xd", "w1d", "b1d"], &["c1"], vec![pads()]);
        node(
            &mut g,
            "QuantizeLinear",
            &["c1", "ys", "yz"],
            &["c1q"],
            vec![],
        );
        node(
            &mut g,
            "DequantizeLinear",
            &["c1q", "ys", "yz"],
            &["c1d"],
            vec![],
        );
        node(
            &mut g,
            "DequantizeLinear",
            &["w2", "w2s", "w2z"],
            &["w2d"],
            axis0(),
        );
        node(
            &mut g,
            "Conv",
            &["c1d", "w2d"],
            &["c2"],
            vec![
                pads(),
                ("group", Attr::Int(6)),
                ("strides", Attr::Ints(vec![2, 2])),
            ],
        );
        node(
            &mut g,
            "QuantizeLinear",
            &["c2", "zs", "zz"],
            &["c2q"],
            vec![],
        );
        node(
            &mut g,
            "DequantizeLinear",
            &["c2q", "zs", "zz"],
            &["y"],
            vec![],
        );
        let x = g.value_id("x");
        g.values[x].dtype = Some(DType::F32);
        g.values[x].shape = Some([1, 4, 9, 9].map(Dim::Fixed).to_vec());
        g.inputs = vec![x];
        g.outputs = vec![g.value_id("y")];
        edgehal_core::infer::infer_shapes(&mut g);
        g
    }

    fn run_y(g: &Graph) -> Vec<f32> {
        let mut s = 5u32;
        let x = Tensor::from_vec(vec![1, 4, 9, 9], rnd(&mut s, 4 * 81)).unwrap();
        let reg = Registry::new();
        let out = Executor::new(g, &reg)
            .unwrap()
            .run(&[(g.inputs[0], x)])
            .unwrap();
        out[0].to_f32().into_owned()
    }

    #[test]
    fn qdq_convolutions_become_int8_nhwc() {
        let plain = qdq_graph();
        let mut g = qdq_graph();
        assert_eq!(fuse_qdq(&mut g), 2);
        g.remove_dead_nodes();
        g.validate().unwrap();
        let mut ops: Vec<&str> = g.nodes.iter().map(|n| n.op.as_str()).collect();
        ops.sort();
        // The first conv reads the input's Q (NCHW) directly, one transpose back before the
        // last DQ; the weights' DQs and the middle Q/DQ/transposes are gone.
        assert_eq!(
            ops,
            [
                "DequantizeLinear",
                QCONV_NHWC,
                QCONV_NHWC,
                "QuantizeLinear",
                "Transpose"
            ]
        );
        assert_eq!(
            g.nodes
                .iter()
                .filter(|n| n.attr_i(INPUT_NCHW) == Some(1))
                .count(),
            1
        );
        let (want, got) = (run_y(&plain), run_y(&g));
        assert_eq!(want.len(), got.len());
        // Float conv + Q against integer accumulation + float requantization: the same
        // quantized value up to a rounding tie, at most one step (0.05) apart.
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= 0.05 * 1.001, "{a} vs {b}");
        }
        assert!(want.iter().zip(&got).filter(|(a, b)| a == b).count() * 10 >= want.len() * 9);
    }

    /// x (f32 [3, 40]) -> Q(i8) -> DQ -> Gemm (DQ'd per-row i8 W [24, 40] with transB, i32 B)
    /// -> Q -> DQ -> y, as a classifier head is quantized: one QLinearConvNhwc over 2-d data,
    /// the unfused graph's values within one step; a Gemm without transB stays float.
    #[test]
    fn qdq_gemm_becomes_a_one_by_one_int8_convolution() {
        let build = |trans_b: i64| {
            let mut s = 11u32;
            let mut g = Graph::new("qgemm");
            g.opsets.insert(String::new(), 13);
            let (n, k) = (24, 40);
            let w: Vec<i8> = rnd(&mut s, n * k)
                .iter()
                .map(|v| (v * 250.0) as i8)
                .collect();
            let wshape = if trans_b == 1 { vec![n, k] } else { vec![k, n] };
            init(&mut g, "xs", vec![], vec![0.02]);
            qinit(&mut g, "xz", vec![], vec![-3i8]);
            qinit(&mut g, "w", wshape, w);
            let wsv: Vec<f32> = (0..n).map(|i| 0.003 + i as f32 * 2e-4).collect();
            init(&mut g, "ws", vec![n], wsv.clone());
            qinit(&mut g, "wz", vec![n], vec![0i8; n]);
            let bv: Vec<i32> = (0..n as i32).map(|i| i * 37 - 400).collect();
            qinit(&mut g, "b", vec![n], bv);
            init(
                &mut g,
                "bs",
                vec![n],
                wsv.iter().map(|w| 0.02 * w).collect(),
            );
            init(&mut g, "ys", vec![], vec![0.04]);
            qinit(&mut g, "yz", vec![], vec![5i8]);
            node(
                &mut g,
                "QuantizeLinear",
                &["x", "xs", "xz"],
                &["xq"],
                vec![],
            );
            node(
                &mut g,
                "DequantizeLinear",
                &["xq", "xs", "xz"],
                &["xd"],
                vec![],
            );
            let axis0 = vec![("axis", Attr::Int(0))];
            node(
                &mut g,
                "DequantizeLinear",
                &["w", "ws", "wz"],
                &["wd"],
                axis0.clone(),
            );
            node(&mut g, "DequantizeLinear", &["b", "bs"], &["bd"], axis0);
            let gemm_attrs = vec![("transB", Attr::Int(trans_b))];
            node(&mut g, "Gemm", &["xd", "wd", "bd"], &["g"], gemm_attrs);
            node(
                &mut g,
                "QuantizeLinear",
                &["g", "ys", "yz"],
                &["gq"],
                vec![],
            );
            node(
                &mut g,
                "DequantizeLinear",
                &["gq", "ys", "yz"],
                &["y"],
                vec![],
            );
            let x = g.value_id("x");
            g.values[x].dtype = Some(DType::F32);
            g.values[x].shape = Some([3, 40].map(Dim::Fixed).to_vec());
            g.inputs = vec![x];
            g.outputs = vec![g.value_id("y")];
            edgehal_core::infer::infer_shapes(&mut g);
            g
        };
        let run = |g: &Graph| {
            let mut s = 5u32;
            let x = Tensor::from_vec(vec![3, 40], rnd(&mut s, 120)).unwrap();
            let reg = Registry::new();
            let out = Executor::new(g, &reg)
                .unwrap()
                .run(&[(g.inputs[0], x)])
                .unwrap();
            assert_eq!(out[0].shape(), [3, 24]);
            out[0].to_f32().into_owned()
        };
        let plain = build(1);
        let mut g = build(1);
        assert_eq!(fuse_qdq(&mut g), 1);
        g.remove_dead_nodes();
        g.validate().unwrap();
        let fused: Vec<&Node> = g.nodes.iter().filter(|n| n.op == QCONV_NHWC).collect();
        assert_eq!(fused.len(), 1);
        assert_eq!(fused[0].attr_i(GEMM_2D), Some(1));
        assert!(!g.nodes.iter().any(|n| n.op == "Gemm"));
        let (want, got) = (run(&plain), run(&g));
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= 0.04 * 1.001, "{a} vs {b}");
        }
        assert!(want.iter().zip(&got).filter(|(a, b)| a == b).count() * 10 >= want.len() * 9);
        // W as [K, N] (transB = 0): not this pattern.
        let mut g = build(0);
        assert_eq!(fuse_qdq(&mut g), 0);
    }

    /// DQ(a) + DQ(b) -> Q of two u8 inputs becomes one QdqAdd with the unfused ops' bytes; a
    /// sum that is also a graph output is left alone.
    #[test]
    fn qdq_add_is_bit_exact() {
        let build = || {
            let mut g = Graph::new("qadd");
            g.opsets.insert(String::new(), 13);
            init(&mut g, "as", vec![], vec![0.031]);
            qinit(&mut g, "az", vec![], vec![120u8]);
            init(&mut g, "bs", vec![], vec![0.017]);
            qinit(&mut g, "bz", vec![], vec![131u8]);
            init(&mut g, "ys", vec![], vec![0.043]);
            qinit(&mut g, "yz", vec![], vec![128u8]);
            node(
                &mut g,
                "DequantizeLinear",
                &["a", "as", "az"],
                &["ad"],
                vec![],
            );
            node(
                &mut g,
                "DequantizeLinear",
                &["b", "bs", "bz"],
                &["bd"],
                vec![],
            );
            node(&mut g, "Add", &["ad", "bd"], &["s"], vec![]);
            node(&mut g, "QuantizeLinear", &["s", "ys", "yz"], &["y"], vec![]);
            for name in ["a", "b"] {
                let v = g.value_id(name);
                g.values[v].dtype = Some(DType::U8);
                g.values[v].shape = Some([1, 6, 5, 7].map(Dim::Fixed).to_vec());
                g.inputs.push(v);
            }
            g.outputs = vec![g.value_id("y")];
            edgehal_core::infer::infer_shapes(&mut g);
            g
        };
        let plain = build();
        let mut g = build();
        assert_eq!(fuse_qdq(&mut g), 1);
        g.remove_dead_nodes();
        let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.as_str()).collect();
        assert_eq!(ops, [QDQ_ADD]);
        let mut s = 9u32;
        let mut bytes = || -> Tensor {
            let v: Vec<u8> = rnd(&mut s, 210)
                .iter()
                .map(|x| ((x + 0.5) * 255.0) as u8)
                .collect();
            Tensor::from_vec(vec![1, 6, 5, 7], v).unwrap()
        };
        let (a, b) = (bytes(), bytes());
        let reg = Registry::new();
        let run = |g: &Graph| {
            let feed = vec![(g.inputs[0], a.clone()), (g.inputs[1], b.clone())];
            Executor::new(g, &reg).unwrap().run(&feed).unwrap()[0].clone()
        };
        let (want, got) = (run(&plain), run(&g));
        assert_eq!(want.dtype(), got.dtype());
        assert_eq!(&want.bytes()[..], &got.bytes()[..]);
        let mut g = build();
        let sum = g.value_id("s");
        g.outputs.push(sum);
        assert_eq!(fuse_qdq(&mut g), 0);
    }

    #[test]
    fn qdq_fusion_needs_a_private_conv_output_and_constant_weights() {
        // The first Conv's float output is also a graph output: only the second is fused.
        let mut g = qdq_graph();
        let c1 = g.value_id("c1");
        g.outputs.push(c1);
        assert_eq!(fuse_qdq(&mut g), 1);
        assert!(g.nodes.iter().any(|n| n.op == "Conv"));
        // The second Conv's weights come from a graph input: only the first is fused.
        let mut g = qdq_graph();
        let w2 = g.value_id("w2");
        let t = g.initializers.remove(&w2).unwrap();
        g.inputs.push(w2);
        assert_eq!(fuse_qdq(&mut g), 1);
        drop(t);
        let conv = g.nodes.iter().find(|n| n.op == "Conv").unwrap();
        assert_eq!(conv.attr_i("group"), Some(6));
        // A bias whose scale is not x_scale * w_scale: not QLinearConv's bias, left alone.
        let mut g = qdq_graph();
        let b1s = g.value_id("b1s");
        g.initializers
            .insert(b1s, Tensor::from_vec(vec![6], vec![1e-4f32; 6]).unwrap());
        assert_eq!(fuse_qdq(&mut g), 1);
    }

    #[test]
    fn leaves_shared_values_alone() {
        let mut g = graph();
        // The first conv's output gets a second reader: no BN fold, no fusion of that chain.
        let c1 = g.value_id("c1");
        g.outputs.push(c1);
        let (bn, fused) = fuse_convolutions(&mut g);
        assert_eq!((bn, fused), (0, 1));
        assert!(g.nodes.iter().any(|n| n.op == "BatchNormalization"));
    }

    /// x -> Relu -> T(to NCHW) -> T(back to NHWC) -> y, plus the cases that must not
    /// rename: a second reader of the middle value (Identity instead), a pair that does not
    /// undo itself (kept). Every variant computes what the unrewritten graph computes.
    #[test]
    fn transpose_pairs_cancel() {
        let to_nchw = || ("perm", Attr::Ints(vec![0, 3, 1, 2]));
        let to_nhwc = || ("perm", Attr::Ints(vec![0, 2, 3, 1]));
        let build = |second_reader: bool, inverse: bool| {
            let mut g = Graph::new("pairs");
            g.opsets.insert(String::new(), 13);
            let x = g.value_id("x");
            g.values[x].dtype = Some(DType::F32);
            g.values[x].shape = Some([1, 2, 3, 4].map(Dim::Fixed).to_vec());
            g.inputs.push(x);
            node(&mut g, "Relu", &["x"], &["r"], vec![]);
            node(&mut g, "Transpose", &["r"], &["t"], vec![to_nchw()]);
            let back = if inverse {
                to_nhwc()
            } else {
                ("perm", Attr::Ints(vec![0, 1, 3, 2]))
            };
            node(&mut g, "Transpose", &["t"], &["y"], vec![back]);
            let y = g.value_id("y");
            g.outputs.push(y);
            if second_reader {
                node(&mut g, "Sigmoid", &["t"], &["z"], vec![]);
                let z = g.value_id("z");
                g.outputs.push(z);
            }
            g
        };
        let run = |g: &Graph| {
            let ex = Executor::new(g, &Registry::new()).unwrap();
            let mut s = 5u32;
            let x = Tensor::from_vec(vec![1, 2, 3, 4], rnd(&mut s, 24)).unwrap();
            let out = ex.run(&[(g.inputs[0], x)]).unwrap();
            out.iter()
                .map(|t| t.to_vec::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        let ops = |g: &Graph| g.nodes.iter().map(|n| n.op.clone()).collect::<Vec<_>>();
        for (second, inverse, pairs, want) in [
            (false, true, 1, vec!["Relu"]),
            (
                true,
                true,
                1,
                vec!["Relu", "Transpose", "Identity", "Sigmoid"],
            ),
            (false, false, 0, vec!["Relu", "Transpose", "Transpose"]),
        ] {
            let g0 = build(second, inverse);
            let mut g = g0.clone();
            assert_eq!(cancel_transpose_pairs(&mut g), pairs, "{second} {inverse}");
            g.remove_dead_nodes();
            g.validate().unwrap();
            assert_eq!(ops(&g), want, "{second} {inverse}");
            assert_eq!(run(&g), run(&g0), "{second} {inverse}");
        }
    }
}
