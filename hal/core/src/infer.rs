//! Static shape and type inference over the graph IR.
//!
//! Rules exist for the ops edge models are made of; a value whose op has no rule (or whose
//! inputs are not known) keeps whatever the model file declared. Inference never fails: it
//! only adds knowledge, and the executor checks real shapes at run time anyway.

use crate::dtype::DType;
use crate::graph::{Dim, Graph, Node};
use crate::tensor::broadcast_shapes;

type Shape = Vec<usize>;

fn fixed(g: &Graph, v: Option<usize>) -> Option<Shape> {
    g.values.get(v?)?.fixed_shape()
}

fn dtype(g: &Graph, v: Option<usize>) -> Option<DType> {
    g.values.get(v?)?.dtype
}

fn const_ints(g: &Graph, v: Option<usize>) -> Option<Vec<i64>> {
    Some(g.initializers.get(&v?)?.to_i64_vec())
}

fn norm(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (a >= 0 && (a as usize) < rank.max(1)).then_some(a as usize)
}

const SAME_SHAPE: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Softmax",
    "LogSoftmax",
    "Hardmax",
    "Erf",
    "Gelu",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Log",
    "Abs",
    "Neg",
    "Floor",
    "Ceil",
    "Round",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Identity",
    "Dropout",
    "Not",
    "Sign",
    "Softplus",
    "Softsign",
    "Mish",
    "Sin",
    "Cos",
    "LRN",
    "Cast",
    "CastLike",
    "QuantizeLinear",
    "DequantizeLinear",
    "CumSum",
    "Shrink",
    "ThresholdedRelu",
    "IsNaN",
    "IsInf",
];
const BROADCAST: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Min",
    "Max",
    "Sum",
    "Mean",
    "Mod",
    "PRelu",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Where",
    "BitShift",
];
const BOOL_OUT: &[&str] = &[
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "Not",
    "IsNaN",
    "IsInf",
];

fn conv_like(n: &Node, x: &Shape, kernel: &[usize], out_c: usize) -> Option<Shape> {
    let sp = x.len().checked_sub(2)?;
    if kernel.len() != sp {
        return None;
    }
    let strides = n
        .attr_ints("strides")
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![1; sp]);
    let dil = n
        .attr_ints("dilations")
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![1; sp]);
    let pads = n
        .attr_ints("pads")
        .map(|v| v.to_vec())
        .unwrap_or_else(|| vec![0; 2 * sp]);
    let auto = n.attr_s("auto_pad").unwrap_or_default();
    let ceil = n.attr_i("ceil_mode").unwrap_or(0) != 0;
    if strides.len() != sp || dil.len() != sp || pads.len() != 2 * sp {
        return None;
    }
    let mut out = vec![x[0], out_c];
    for i in 0..sp {
        let (inp, k, s, d) = (
            x[i + 2] as i64,
            kernel[i] as i64,
            strides[i].max(1),
            dil[i].max(1),
        );
        let ek = (k - 1) * d + 1;
        let o = match auto.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => (inp + s - 1) / s,
            "VALID" => (inp - ek) / s + 1,
            _ => {
                let span = inp + pads[i] + pads[i + sp] - ek;
                if ceil {
                    (span + s - 1) / s + 1
                } else {
                    span / s + 1
                }
            }
        };
        if o < 0 {
            return None;
        }
        out.push(o as usize);
    }
    Some(out)
}

fn infer_node(g: &Graph, n: &Node) -> Vec<(Option<Shape>, Option<DType>)> {
    let i0 = n.inputs.first().copied().flatten();
    let s0 = fixed(g, i0);
    let d0 = dtype(g, i0);
    let op = n.op.as_str();
    let one = |s: Option<Shape>, d: Option<DType>| vec![(s, d)];
    if SAME_SHAPE.contains(&op) {
        let d = match op {
            "Cast" => n.attr_i("to").and_then(|c| DType::from_onnx_code(c as i32)),
            "CastLike" => dtype(g, n.inputs.get(1).copied().flatten()),
            "QuantizeLinear" => dtype(g, n.inputs.get(2).copied().flatten()).or(Some(DType::U8)),
            "DequantizeLinear" => dtype(g, n.inputs.get(1).copied().flatten()).or(Some(DType::F32)),
            _ if BOOL_OUT.contains(&op) => Some(DType::Bool),
            _ => d0,
        };
        return one(s0, d);
    }
    if BROADCAST.contains(&op) {
        let mut shape = Some(Vec::new());
        for v in n.inputs.iter() {
            shape = match (shape, fixed(g, *v)) {
                (Some(a), Some(b)) => broadcast_shapes(&a, &b).ok(),
                _ => None,
            };
        }
        let d = if BOOL_OUT.contains(&op) {
            Some(DType::Bool)
        } else if op == "Where" {
            dtype(g, n.inputs.get(1).copied().flatten())
        } else {
            d0
        };
        return one(shape, d);
    }
    let w = n.inputs.get(1).copied().flatten();
    match op {
        "Conv" | "ConvInteger" => {
            let ws = fixed(g, w);
            let s = s0
                .zip(ws)
                .and_then(|(x, ws)| conv_like(n, &x, ws.get(2..)?, *ws.first()?));
            one(
                s,
                if op == "ConvInteger" {
                    Some(DType::I32)
                } else {
                    d0
                },
            )
        }
        "QLinearConv" => {
            let ws = fixed(g, n.inputs.get(3).copied().flatten());
            let s = s0
                .zip(ws)
                .and_then(|(x, ws)| conv_like(n, &x, ws.get(2..)?, *ws.first()?));
            one(s, dtype(g, n.inputs.get(7).copied().flatten()))
        }
        "MaxPool" | "AveragePool" | "LpPool" => {
            let k: Option<Vec<usize>> = n
                .attr_ints("kernel_shape")
                .map(|k| k.iter().map(|&v| v.max(0) as usize).collect());
            let s = s0
                .zip(k)
                .and_then(|(x, k)| conv_like(n, &x, &k, *x.get(1)?));
            vec![(s.clone(), d0), (s, Some(DType::I64))]
        }
        "GlobalAveragePool" | "GlobalMaxPool" => one(
            s0.map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, &d)| if i < 2 { d } else { 1 })
                    .collect()
            }),
            d0,
        ),
        "Gemm" => {
            let s = s0.zip(fixed(g, w)).and_then(|(a, b)| {
                if a.len() != 2 || b.len() != 2 {
                    return None;
                }
                let m = if n.attr_i("transA").unwrap_or(0) != 0 {
                    a[1]
                } else {
                    a[0]
                };
                let nn = if n.attr_i("transB").unwrap_or(0) != 0 {
                    b[0]
                } else {
                    b[1]
                };
                Some(vec![m, nn])
            });
            one(s, d0)
        }
        "MatMul" | "MatMulInteger" | "QLinearMatMul" => {
            let (a, b) = if op == "QLinearMatMul" {
                (s0, fixed(g, n.inputs.get(3).copied().flatten()))
            } else {
                (s0, fixed(g, w))
            };
            let s = a.zip(b).and_then(|(a, b)| {
                let (a2, b2) = (
                    if a.len() == 1 {
                        vec![1, a[0]]
                    } else {
                        a.clone()
                    },
                    if b.len() == 1 {
                        vec![b[0], 1]
                    } else {
                        b.clone()
                    },
                );
                if a2.len() < 2 || b2.len() < 2 {
                    return None;
                }
                let batch = broadcast_shapes(&a2[..a2.len() - 2], &b2[..b2.len() - 2]).ok()?;
                let mut out = batch;
                if a.len() > 1 {
                    out.push(a2[a2.len() - 2]);
                }
                if b.len() > 1 {
                    out.push(b2[b2.len() - 1]);
                }
                Some(out)
            });
            let d = match op {
                "MatMulInteger" => Some(DType::I32),
                "QLinearMatMul" => dtype(g, n.inputs.get(7).copied().flatten()),
                _ => d0,
            };
            one(s, d)
        }
        "Flatten" => one(
            s0.and_then(|x| {
                let a = norm(n.attr_i("axis").unwrap_or(1), x.len() + 1)?;
                Some(vec![x[..a].iter().product(), x[a..].iter().product()])
            }),
            d0,
        ),
        "Reshape" => one(
            s0.zip(const_ints(g, w)).and_then(|(x, spec)| {
                let total: usize = x.iter().product();
                let allowzero = n.attr_i("allowzero").unwrap_or(0) != 0;
                let mut out = Vec::new();
                let mut infer = None;
                for (i, &d) in spec.iter().enumerate() {
                    match d {
                        -1 => {
                            infer = Some(i);
                            out.push(1);
                        }
                        0 if !allowzero => out.push(*x.get(i)?),
                        d if d >= 0 => out.push(d as usize),
                        _ => return None,
                    }
                }
                if let Some(i) = infer {
                    let rest: usize = out.iter().product();
                    if rest == 0 {
                        return None;
                    }
                    out[i] = total / rest;
                }
                (out.iter().product::<usize>() == total).then_some(out)
            }),
            d0,
        ),
        "Transpose" => one(
            s0.and_then(|x| {
                let perm: Vec<usize> = match n.attr_ints("perm") {
                    Some(p) => p.iter().map(|&v| v as usize).collect(),
                    None => (0..x.len()).rev().collect(),
                };
                perm.iter().map(|&p| x.get(p).copied()).collect()
            }),
            d0,
        ),
        "Concat" => {
            let shapes: Option<Vec<Shape>> = n.inputs.iter().map(|v| fixed(g, *v)).collect();
            let s = shapes.and_then(|ss| {
                let first = ss.first()?.clone();
                let a = norm(n.attr_i("axis")?, first.len())?;
                let mut out = first;
                out[a] = ss.iter().map(|s| s.get(a).copied().unwrap_or(0)).sum();
                Some(out)
            });
            one(s, d0)
        }
        "Unsqueeze" | "Squeeze" => {
            let axes = n
                .attr_ints("axes")
                .map(|a| a.to_vec())
                .or_else(|| const_ints(g, w));
            let s = s0.and_then(|x| {
                if op == "Squeeze" {
                    match axes {
                        None => Some(x.into_iter().filter(|&d| d != 1).collect()),
                        Some(ax) => {
                            let ax: Option<Vec<usize>> =
                                ax.iter().map(|&a| norm(a, x.len())).collect();
                            let ax = ax?;
                            Some(
                                x.iter()
                                    .enumerate()
                                    .filter(|(i, _)| !ax.contains(i))
                                    .map(|(_, &d)| d)
                                    .collect(),
                            )
                        }
                    }
                } else {
                    let ax = axes?;
                    let r = x.len() + ax.len();
                    let ax: Option<Vec<usize>> = ax.iter().map(|&a| norm(a, r)).collect();
                    let ax = ax?;
                    let mut it = x.into_iter();
                    (0..r)
                        .map(|i| if ax.contains(&i) { Some(1) } else { it.next() })
                        .collect()
                }
            });
            one(s, d0)
        }
        "Shape" => one(s0.map(|x| vec![x.len()]), Some(DType::I64)),
        "Size" => one(Some(vec![]), Some(DType::I64)),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL2"
        | "ReduceL1" | "ReduceSumSquare" | "ReduceLogSumExp" | "ArgMax" | "ArgMin" => {
            let keep = n.attr_i("keepdims").unwrap_or(1) != 0;
            let axes: Option<Vec<i64>> = match op {
                "ArgMax" | "ArgMin" => Some(vec![n.attr_i("axis").unwrap_or(0)]),
                _ => n.attr_ints("axes").map(|a| a.to_vec()).or_else(|| {
                    if w.is_some() {
                        const_ints(g, w)
                    } else {
                        Some(vec![])
                    }
                }),
            };
            let s = s0.zip(axes).and_then(|(x, axes)| {
                let all = axes.is_empty();
                if all && n.attr_i("noop_with_empty_axes").unwrap_or(0) != 0 {
                    return Some(x);
                }
                let ax: Option<Vec<usize>> = axes.iter().map(|&a| norm(a, x.len())).collect();
                let ax = ax?;
                Some(
                    x.iter()
                        .enumerate()
                        .filter_map(|(i, &d)| {
                            let r = all || ax.contains(&i);
                            if !r {
                                Some(d)
                            } else if keep {
                                Some(1)
                            } else {
                                None
                            }
                        })
                        .collect(),
                )
            });
            one(
                s,
                if op.starts_with("Arg") {
                    Some(DType::I64)
                } else {
                    d0
                },
            )
        }
        "Gather" => {
            let idx = fixed(g, w).or_else(|| {
                g.initializers
                    .get(&w.unwrap_or(usize::MAX))
                    .map(|t| t.shape().to_vec())
            });
            let s = s0.zip(idx).and_then(|(x, i)| {
                let a = norm(n.attr_i("axis").unwrap_or(0), x.len())?;
                let mut out = x[..a].to_vec();
                out.extend(i);
                out.extend_from_slice(&x[a + 1..]);
                Some(out)
            });
            one(s, d0)
        }
        "LSTM" | "GRU" | "RNN" => {
            let hidden = n.attr_i("hidden_size").map(|h| h as usize);
            let dirs = if n.attr_s("direction").as_deref() == Some("bidirectional") {
                2
            } else {
                1
            };
            let layout = n.attr_i("layout").unwrap_or(0);
            let s = s0.zip(hidden).and_then(|(x, h)| {
                if x.len() != 3 {
                    return None;
                }
                let (seq, batch) = if layout == 0 {
                    (x[0], x[1])
                } else {
                    (x[1], x[0])
                };
                let y = if layout == 0 {
                    vec![seq, dirs, batch, h]
                } else {
                    vec![batch, seq, dirs, h]
                };
                let yh = if layout == 0 {
                    vec![dirs, batch, h]
                } else {
                    vec![batch, dirs, h]
                };
                Some((y, yh))
            });
            match s {
                Some((y, yh)) => vec![(Some(y), d0), (Some(yh.clone()), d0), (Some(yh), d0)],
                None => vec![(None, d0); 3],
            }
        }
        _ => vec![],
    }
}

/// Fill in value shapes and dtypes from the ops' rules, in topological order.
pub fn infer_shapes(g: &mut Graph) {
    let Ok(order) = g.topo_order() else { return };
    for n in order {
        let res = infer_node(g, &g.nodes[n]);
        let outs = g.nodes[n].outputs.clone();
        for (o, (s, d)) in outs.iter().zip(res) {
            let Some(o) = o else { continue };
            let v = &mut g.values[*o];
            if let Some(s) = s {
                v.shape = Some(s.into_iter().map(Dim::Fixed).collect());
            }
            if let Some(d) = d {
                v.dtype = Some(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Attr, ValueInfo};
    use crate::Tensor;

    #[test]
    fn conv_pool_gemm_chain() {
        let mut g = Graph::new("t");
        let x = g.value_id("x");
        g.values[x] = ValueInfo {
            name: "x".into(),
            dtype: Some(DType::F32),
            shape: Some(vec![
                Dim::Fixed(1),
                Dim::Fixed(3),
                Dim::Fixed(224),
                Dim::Fixed(224),
            ]),
        };
        g.inputs.push(x);
        let w = g.value_id("w");
        g.initializers
            .insert(w, Tensor::zeros(DType::F32, vec![32, 3, 3, 3]).unwrap());
        g.values[w].shape = Some([32, 3, 3, 3].iter().map(|&d| Dim::Fixed(d)).collect());
        let y = g.value_id("y");
        let mut conv = Node {
            op: "Conv".into(),
            inputs: vec![Some(x), Some(w)],
            outputs: vec![Some(y)],
            ..Default::default()
        };
        conv.attrs.insert("strides".into(), Attr::Ints(vec![2, 2]));
        conv.attrs
            .insert("pads".into(), Attr::Ints(vec![1, 1, 1, 1]));
        g.add_node(conv);
        let p = g.value_id("p");
        g.add_node(Node {
            op: "GlobalAveragePool".into(),
            inputs: vec![Some(y)],
            outputs: vec![Some(p)],
            ..Default::default()
        });
        let f = g.value_id("f");
        g.add_node(Node {
            op: "Flatten".into(),
            inputs: vec![Some(p)],
            outputs: vec![Some(f)],
            ..Default::default()
        });
        g.outputs.push(f);
        infer_shapes(&mut g);
        assert_eq!(g.values[y].fixed_shape(), Some(vec![1, 32, 112, 112]));
        assert_eq!(g.values[f].fixed_shape(), Some(vec![1, 32]));
        assert_eq!(g.values[f].dtype, Some(DType::F32));
    }
}
