//! Layout pass: chains of float convolutions onto NHWC (`edgehal.FusedConvNhwc`, see
//! `edgehal_cpu::nhwc_plan`).
//!
//! A MobileNet is a chain of 1x1 and depthwise 3x3 convolutions after a 3x3 first layer on
//! the RGB input. In NCHW every 1x1 layer is a GEMM whose columns are pixels (padded to the
//! vector width: 49 -> 64 on a 7x7 map) and every depthwise row meets the image border in its
//! vector lanes; in NHWC the 1x1 layer's pixels are rows (no padding) and depthwise vectors run
//! across channels. This pass runs after `fuse_convolutions` (bias, activation and residual
//! already in the nodes) and rewrites, in topological order:
//! - a float 3x3 one-group convolution over at most `NCHW_IN_MAX_C` input channels (the first
//!   layer): it reads the NHWC form of its input when there is one (a TFLite graph's input,
//!   which the NCHW layout pass transposed), else the NCHW value as it is (`input_nchw`);
//! - a float 1x1 (stride 1, no padding, one group) or depthwise 3x3 (stride 1 or 2)
//!   convolution whose input already has an NHWC form: the output of a rewritten node or the
//!   input of a Transpose to NCHW;
//!   a residual without one gets a Transpose.
//!
//! Every rewritten output also gets a Transpose back to the original NCHW value, which
//! dead-node removal drops when only rewritten nodes read it. Global average pooling of such a
//! value (`GlobalAveragePool`, `ReduceMean` over H and W: a classifier head) reads
//! the NHWC form (`edgehal.GlobalAveragePoolNhwc`, same result shape), so a MobileNet runs
//! without any layout change; a graph without a first layer of that shape is left as it is.

use std::collections::HashMap;

use edgehal_core::{Attr, DType, Graph, Node, ValueId};
use edgehal_cpu::conv_plan::{FUSED_CONV, FUSED_DOMAIN};
use edgehal_cpu::nhwc_plan::{
    FUSED_CONV_NHWC, GAP_NHWC, INPUT_NCHW, NCHW_IN_MAX_C, PW_DW_NHWC, PW_PREFIX,
};

use crate::passes::{transpose_node, transposed};

const TO_NHWC: [usize; 4] = [0, 2, 3, 1];
const TO_NCHW: [usize; 4] = [0, 3, 1, 2];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    FirstLayer,
    Pointwise,
    Depthwise,
}

/// Integer attribute list `name` (absent or empty: `None`).
fn ints(n: &Node, name: &str) -> Option<Vec<i64>> {
    n.attr_ints(name)
        .filter(|v| !v.is_empty())
        .map(<[i64]>::to_vec)
}

/// Which NHWC kernel `node` (a float Conv or FusedConv) fits, from its weight and input shapes.
fn kind_of(g: &Graph, node: &Node) -> Option<Kind> {
    let conv = (node.op == "Conv" && (node.domain.is_empty() || node.domain == "ai.onnx"))
        || (node.op == FUSED_CONV && node.domain == FUSED_DOMAIN);
    if !conv {
        return None;
    }
    let f32_4d = |v: ValueId| -> Option<Vec<usize>> {
        let s = g.values[v].fixed_shape()?;
        (s.len() == 4 && g.values[v].dtype == Some(DType::F32)).then_some(s)
    };
    let x = f32_4d(node.inputs.first().copied().flatten()?)?;
    f32_4d(node.outputs.first().copied().flatten()?)?;
    let w = g
        .initializers
        .get(&node.inputs.get(1).copied().flatten()?)?;
    if let Some(b) = node.inputs.get(2).copied().flatten() {
        if g.initializers.get(&b)?.dtype() != DType::F32 {
            return None;
        }
    }
    let &[m, cg, kh, kw] = w.shape() else {
        return None;
    };
    if w.dtype() != DType::F32 {
        return None;
    }
    let auto = node.attr_s("auto_pad").unwrap_or_default();
    let dil = ints(node, "dilations").unwrap_or_else(|| vec![1, 1]);
    if !(auto.is_empty() || auto == "NOTSET") || dil != [1, 1] {
        return None;
    }
    let strides = ints(node, "strides").unwrap_or_else(|| vec![1, 1]);
    let pads = ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
    let group = node.attr_i("group").unwrap_or(1);
    let c = x[1];
    if group == 1 && [kh, kw] == [3, 3] && c == cg && c <= NCHW_IN_MAX_C {
        return Some(Kind::FirstLayer);
    }
    if group == 1 && [kh, kw] == [1, 1] && c == cg && strides == [1, 1] && pads == [0; 4] {
        return Some(Kind::Pointwise);
    }
    let s = strides.first().copied().unwrap_or(1);
    if [kh, kw] == [3, 3]
        && cg == 1
        && group == c as i64
        && m == c
        && strides == [s, s]
        && (s == 1 || s == 2)
    {
        return Some(Kind::Depthwise);
    }
    None
}

/// Rewrites float convolution chains (and their global pooling) to NHWC (see the module docs).
/// Returns the number of nodes rewritten; the caller removes the dead nodes left behind.
pub fn float_convs_to_nhwc(g: &mut Graph) -> usize {
    if g.nodes.iter().any(|n| {
        n.attrs
            .values()
            .any(|a| matches!(a, Attr::Graph(_) | Attr::Graphs(_)))
    }) {
        return 0;
    }
    let Ok(order) = g.topo_order() else { return 0 };
    // Every NCHW value with an NHWC form: to start with, the outputs of Transposes from NHWC
    // (a TFLite graph's input after the NCHW layout pass).
    let mut nhwc: HashMap<ValueId, ValueId> = HashMap::new();
    for n in &g.nodes {
        let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
        if onnx && n.op == "Transpose" && n.attr_ints("perm") == Some(&[0, 3, 1, 2][..]) {
            if let (Some(Some(i)), Some(Some(o))) = (n.inputs.first(), n.outputs.first()) {
                nhwc.insert(*o, *i);
            }
        }
    }
    let mut added: Vec<Node> = Vec::new();
    let mut count = 0;
    for ci in order {
        let Some(kind) = kind_of(g, &g.nodes[ci]) else {
            continue;
        };
        let mut node = g.nodes[ci].clone();
        let Some(x) = node.inputs[0] else { continue };
        match nhwc.get(&x) {
            Some(&xn) => node.inputs[0] = Some(xn),
            // The first layer reads NCHW as cheaply.
            None if kind == Kind::FirstLayer => {
                node.attrs.insert(INPUT_NCHW.into(), Attr::Int(1));
            }
            None => continue,
        }
        if let Some(z) = node.inputs.get(3).copied().flatten() {
            let zn = match nhwc.get(&z) {
                Some(&v) => v,
                None => {
                    let v = transposed(g, z, TO_NHWC, "_nhwc");
                    added.push(transpose_node(z, v, TO_NHWC));
                    nhwc.insert(z, v);
                    v
                }
            };
            node.inputs[3] = Some(zn);
        }
        let Some(y) = node.outputs[0] else { continue };
        let yn = transposed(g, y, TO_NHWC, "_nhwc");
        node.op = FUSED_CONV_NHWC.into();
        node.domain = FUSED_DOMAIN.into();
        node.outputs = vec![Some(yn)];
        g.nodes[ci] = node;
        added.push(transpose_node(yn, y, TO_NCHW));
        nhwc.insert(y, yn);
        count += 1;
    }
    // Global average pooling of a value with an NHWC form reads that form: GlobalAveragePool,
    // or ReduceMean over exactly H and W (the axes attribute; keepdims carried over).
    for n in g.nodes.iter_mut() {
        let onnx = n.domain.is_empty() || n.domain == "ai.onnx";
        let Some(Some(x)) = n.inputs.first().copied() else {
            continue;
        };
        let Some(&xn) = nhwc.get(&x) else { continue };
        let pool = match n.op.as_str() {
            "GlobalAveragePool" => n.inputs.len() == 1,
            "ReduceMean" => {
                let axes = n.attr_ints("axes").map(|a| {
                    let mut a: Vec<i64> = a.iter().map(|&v| v.rem_euclid(4)).collect();
                    a.sort_unstable();
                    a
                });
                n.inputs.len() == 1 && axes.as_deref() == Some(&[2, 3][..])
            }
            _ => false,
        };
        if onnx && pool {
            n.op = GAP_NHWC.into();
            n.domain = FUSED_DOMAIN.into();
            n.inputs[0] = Some(xn);
            n.attrs.retain(|k, _| k == "keepdims");
            count += 1;
        }
    }
    for n in added {
        g.add_node(n);
    }
    count
}

/// The output channels of `n` when it is a [`FUSED_CONV_NHWC`] on NHWC input without a
/// residual whose weight has `shape` in the positions given (`None`: any) and whose `group`
/// is `group`.
fn nhwc_conv_of(g: &Graph, n: &Node, shape: [Option<usize>; 4], group: i64) -> Option<usize> {
    if n.op != FUSED_CONV_NHWC || n.domain != FUSED_DOMAIN {
        return None;
    }
    if n.inputs.get(3).copied().flatten().is_some() || n.attr_i(INPUT_NCHW).unwrap_or(0) != 0 {
        return None;
    }
    let w = g.initializers.get(&n.inputs.get(1).copied().flatten()?)?;
    let ws = w.shape();
    let fits = ws.len() == 4
        && shape
            .iter()
            .zip(ws)
            .all(|(want, &d)| want.is_none_or(|v| v == d));
    (fits && n.attr_i("group").unwrap_or(1) == group).then_some(ws[0])
}

/// Bytes from which a 1x1 output is worth not storing whole (L2 of the machines measured):
/// the `min_bytes` the optimizer passes to [`fuse_pointwise_depthwise`].
pub const FUSE_MIN_BYTES: usize = 1 << 20;

/// Fuses each 1x1 [`FUSED_CONV_NHWC`] whose only reader is a depthwise 3x3 one (neither with a
/// residual, the 1x1 output no graph output, larger than `min_bytes`) into one `edgehal.PointwiseDepthwiseNhwc` node
/// (`edgehal_cpu::nhwc_plan::PW_DW_NHWC`): the expanded tensor between them is then produced
/// a few rows at a time and never stored whole. Returns the number of pairs fused; the 1x1
/// nodes are removed.
pub fn fuse_pointwise_depthwise(g: &mut Graph, min_bytes: usize) -> usize {
    let producers = g.producers();
    let consumers = g.consumers();
    let mut removed = vec![false; g.nodes.len()];
    let mut count = 0;
    for di in 0..g.nodes.len() {
        let d = &g.nodes[di];
        let w = d.inputs.get(1).copied().flatten();
        let Some(&m) = w.and_then(|w| g.initializers.get(&w)?.shape().first()) else {
            continue;
        };
        if nhwc_conv_of(g, d, [Some(m), Some(1), Some(3), Some(3)], m as i64).is_none() {
            continue;
        }
        let Some(e) = d.inputs.first().copied().flatten() else {
            continue;
        };
        // Only where the expanded tensor outgrows L2: smaller ones stay in cache between the
        // two layers anyway, and row by row the 1x1 layer would stream its weights once per
        // row (measured slower on MobileNet's 28x28 and smaller maps).
        let big = g.values[e]
            .fixed_shape()
            .is_some_and(|s| s.iter().product::<usize>().saturating_mul(4) > min_bytes);
        let Some(pi) = producers[e] else { continue };
        if !big
            || removed[pi]
            || consumers[e].len() != 1
            || g.outputs.contains(&e)
            || nhwc_conv_of(g, &g.nodes[pi], [Some(m), None, Some(1), Some(1)], 1).is_none()
        {
            continue;
        }
        let p = &g.nodes[pi];
        let mut fused = Node {
            op: PW_DW_NHWC.into(),
            domain: FUSED_DOMAIN.into(),
            name: d.name.clone(),
            inputs: vec![
                p.inputs.first().copied().flatten(),
                p.inputs.get(1).copied().flatten(),
                p.inputs.get(2).copied().flatten(),
                d.inputs.get(1).copied().flatten(),
                d.inputs.get(2).copied().flatten(),
            ],
            outputs: d.outputs.clone(),
            attrs: d.attrs.clone(),
        };
        for (k, v) in &p.attrs {
            fused.attrs.insert(format!("{PW_PREFIX}{k}"), v.clone());
        }
        g.nodes[di] = fused;
        removed[pi] = true;
        count += 1;
    }
    let mut k = 0;
    g.nodes.retain(|_| {
        let keep = !removed[k];
        k += 1;
        keep
    });
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::graph::Dim;
    use edgehal_core::Tensor;
    use edgehal_cpu::ops::Registry;
    use edgehal_cpu::Executor;

    fn rnd(seed: &mut u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn node(g: &mut Graph, op: &str, ins: &[&str], out: &str, attrs: Vec<(&str, Attr)>) {
        let inputs = ins.iter().map(|n| Some(g.value_id(n))).collect();
        let outputs = vec![Some(g.value_id(out))];
        g.add_node(Node {
            op: op.into(),
            inputs,
            outputs,
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..Default::default()
        });
    }

    fn init(g: &mut Graph, s: &mut u32, name: &str, shape: Vec<usize>) {
        let id = g.value_id(name);
        let n = shape.iter().product();
        g.values[id].dtype = Some(DType::F32);
        g.values[id].shape = Some(shape.iter().map(|&d| Dim::Fixed(d)).collect());
        g.initializers
            .insert(id, Tensor::from_vec(shape, rnd(s, n)).unwrap());
    }

    fn input(g: &mut Graph, name: &str, shape: [usize; 4]) {
        let id = g.value_id(name);
        g.values[id].dtype = Some(DType::F32);
        g.values[id].shape = Some(shape.map(Dim::Fixed).to_vec());
        g.inputs.push(id);
    }

    /// A MobileNet block: first layer 3x3 s2 + Clip, depthwise + Relu, 1x1 expand (also a
    /// graph output), 1x1 project + residual, global pooling; and a 1x1 on a graph input.
    fn graph() -> Graph {
        let mut s = 13u32;
        let mut g = Graph::new("nhwc");
        g.opsets.insert(String::new(), 13);
        input(&mut g, "x", [1, 3, 12, 10]);
        input(&mut g, "u", [1, 16, 6, 5]);
        init(&mut g, &mut s, "w0", vec![16, 3, 3, 3]);
        init(&mut g, &mut s, "b0", vec![16]);
        init(&mut g, &mut s, "wd", vec![16, 1, 3, 3]);
        init(&mut g, &mut s, "w1", vec![24, 16, 1, 1]);
        init(&mut g, &mut s, "w2", vec![16, 24, 1, 1]);
        init(&mut g, &mut s, "wu", vec![8, 16, 1, 1]);
        let lo = g.value_id("lo");
        g.initializers
            .insert(lo, Tensor::from_vec(vec![], vec![0.0f32]).unwrap());
        let hi = g.value_id("hi");
        g.initializers
            .insert(hi, Tensor::from_vec(vec![], vec![0.25f32]).unwrap());
        let pads = || ("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let s2 = ("strides", Attr::Ints(vec![2, 2]));
        node(&mut g, "Conv", &["x", "w0", "b0"], "c0", vec![pads(), s2]);
        node(&mut g, "Clip", &["c0", "lo", "hi"], "a0", vec![]);
        let dw = vec![pads(), ("group", Attr::Int(16))];
        node(&mut g, "Conv", &["a0", "wd"], "c1", dw);
        node(&mut g, "Relu", &["c1"], "a1", vec![]);
        node(&mut g, "Conv", &["a1", "w1"], "p", vec![]);
        node(&mut g, "Conv", &["p", "w2"], "c2", vec![]);
        node(&mut g, "Add", &["c2", "a0"], "q", vec![]);
        node(&mut g, "GlobalAveragePool", &["q"], "y", vec![]);
        node(&mut g, "Conv", &["u", "wu"], "v", vec![]);
        g.outputs = vec![g.value_id("y"), g.value_id("p"), g.value_id("v")];
        edgehal_core::infer::infer_shapes(&mut g);
        g
    }

    /// An expand 1x1 -> depthwise 3x3 (stride 2, asymmetric padding) -> project 1x1 chain:
    /// the first pair becomes one node that gives the same values at 1 and 2 threads; a
    /// threshold above the expanded tensor's size leaves it alone.
    #[test]
    fn pointwise_depthwise_pairs_fuse() {
        let mut s = 21u32;
        let build = |s: &mut u32| {
            let mut g = Graph::new("pwdw");
            g.opsets.insert(String::new(), 13);
            input(&mut g, "x", [1, 3, 12, 10]);
            init(&mut g, s, "w0", vec![16, 3, 3, 3]);
            init(&mut g, s, "we", vec![48, 16, 1, 1]);
            init(&mut g, s, "be", vec![48]);
            init(&mut g, s, "wd", vec![48, 1, 3, 3]);
            init(&mut g, s, "bd", vec![48]);
            init(&mut g, s, "wp", vec![8, 48, 1, 1]);
            let pads = ("pads", Attr::Ints(vec![1, 1, 1, 1]));
            node(&mut g, "Conv", &["x", "w0"], "c0", vec![pads]);
            node(&mut g, "Conv", &["c0", "we", "be"], "e", vec![]);
            node(&mut g, "Relu", &["e"], "er", vec![]);
            let dw = vec![
                ("pads", Attr::Ints(vec![0, 1, 1, 0])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("group", Attr::Int(48)),
            ];
            node(&mut g, "Conv", &["er", "wd", "bd"], "d", dw);
            node(&mut g, "Relu", &["d"], "dr", vec![]);
            node(&mut g, "Conv", &["dr", "wp"], "y", vec![]);
            g.outputs = vec![g.value_id("y")];
            edgehal_core::infer::infer_shapes(&mut g);
            g
        };
        let plain = build(&mut s);
        let rewrite = |min_bytes: usize| {
            let mut g = plain.clone();
            crate::passes::fuse_convolutions(&mut g);
            float_convs_to_nhwc(&mut g);
            g.remove_dead_nodes();
            let n = fuse_pointwise_depthwise(&mut g, min_bytes);
            g.validate().unwrap();
            (g, n)
        };
        let (kept, n) = rewrite(48 * 12 * 10 * 4);
        assert_eq!(n, 0, "the expanded tensor is not above the threshold");
        assert!(kept.nodes.iter().all(|n| n.op != PW_DW_NHWC));
        let (g, n) = rewrite(0);
        assert_eq!(n, 1);
        let fused = g.nodes.iter().find(|n| n.op == PW_DW_NHWC).expect("fused");
        assert_eq!(fused.attr_s("pw_activation").as_deref(), Some("Relu"));
        assert_eq!(fused.attr_i("group"), Some(48));
        assert_eq!(
            g.nodes.len(),
            4,
            "first layer, fused pair, project, transpose"
        );
        let x = Tensor::from_vec(vec![1, 3, 12, 10], rnd(&mut s, 360)).unwrap();
        let reg = Registry::new();
        let want = Executor::new(&plain, &reg)
            .unwrap()
            .run(&[(plain.inputs[0], x.clone())])
            .unwrap();
        for threads in [1, 2] {
            let mut ex = Executor::new(&g, &reg).unwrap();
            ex.set_threads(threads);
            let got = ex.run(&[(g.inputs[0], x.clone())]).unwrap();
            assert_eq!(want[0].shape(), got[0].shape());
            for (a, b) in want[0].to_f64_vec().iter().zip(got[0].to_f64_vec()) {
                assert!((a - b).abs() <= 1e-5, "{threads} threads: {a} vs {b}");
            }
        }
    }

    #[test]
    fn chains_run_in_nhwc_with_transposes_only_where_nchw_is_read() {
        let plain = graph();
        let mut g = graph();
        crate::passes::fuse_convolutions(&mut g);
        let n = float_convs_to_nhwc(&mut g);
        g.remove_dead_nodes();
        g.validate().unwrap();
        let ops: Vec<String> = g.nodes.iter().map(|n| n.op.clone()).collect();
        assert_eq!(n, 5, "{ops:?}");
        let count = |op: &str| g.nodes.iter().filter(|n| n.op == op).count();
        assert_eq!(count(FUSED_CONV_NHWC), 4, "{ops:?}");
        assert_eq!(count(GAP_NHWC), 1, "{ops:?}");
        // The 1x1 on a graph input stays NCHW; only p (a graph output) is transposed back.
        assert_eq!(count("Conv"), 1, "{ops:?}");
        assert_eq!(count("Transpose"), 1, "{ops:?}");
        let first = g
            .nodes
            .iter()
            .find(|n| n.attr_i(INPUT_NCHW) == Some(1))
            .expect("the first layer reads NCHW");
        assert_eq!(first.attr_s("activation").as_deref(), Some("Clip"));
        let mut s = 3u32;
        let x = Tensor::from_vec(vec![1, 3, 12, 10], rnd(&mut s, 360)).unwrap();
        let u = Tensor::from_vec(vec![1, 16, 6, 5], rnd(&mut s, 480)).unwrap();
        let reg = Registry::new();
        let run = |g: &Graph| {
            Executor::new(g, &reg)
                .unwrap()
                .run(&[(g.inputs[0], x.clone()), (g.inputs[1], u.clone())])
                .unwrap()
        };
        let (want, got) = (run(&plain), run(&g));
        for (w, o) in want.iter().zip(&got) {
            assert_eq!(w.shape(), o.shape());
            for (a, b) in w.to_f64_vec().iter().zip(o.to_f64_vec()) {
                assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
            }
        }
    }
}
