//! Layout pass: float TFLite graphs onto the NCHW ONNX ops (and so onto the fast convolution
//! kernels and the `edgehal.FusedConv` fusion that runs after this pass).
//!
//! - Only float nodes change: every value a rewritten node reads or writes is `f32` with a fixed
//!   shape and every weight is a constant `f32` initializer without quantization parameters.
//!   Quantized (int8/uint8) and hybrid TFLite ops stay exactly as imported.
//! - `Conv2D` (weights OHWI), `DepthwiseConv2D` (weights `1,H,W,C*mult`), `MaxPool2D` and
//!   `AveragePool2D` become ONNX `Conv` (OIHW weights, transposed once here; depthwise as a
//!   grouped conv), `MaxPool` and `AveragePool` with TFLite's SAME/VALID padding as explicit
//!   pads; a fused activation becomes a following `Relu`/`Clip`/`Tanh` node, which the conv
//!   fusion folds into the kernel epilogue. `FullyConnected` on a matrix becomes `Gemm`.
//! - Layout is decided per value, not by inserting and cancelling transposes: a 4-D value a
//!   rewritten op produces exists only in NCHW. Elementwise ops, activations, `Mean`, `Pad` and
//!   `Concatenation` whose activation input is already NCHW are rewritten to the ONNX op on the
//!   NCHW value (constant operands permuted, axes and pads remapped), so chains of them stay
//!   NCHW. A Transpose back to NHWC is emitted only where a node that stays NHWC (`Reshape`,
//!   `Softmax`, any quantized op...) or a graph output reads such a value, once per value; a
//!   Transpose to NCHW only where a rewritten op reads an NHWC value, once per value. Graph
//!   inputs and outputs keep the model's NHWC shapes and values.

use std::collections::{HashMap, HashSet};

use edgehal_core::graph::Dim;
use edgehal_core::{Attr, DType, Graph, Node, Result, Tensor, ValueId};

use crate::tflite::DOMAIN;

/// Opset the emitted ONNX ops follow (Clip bounds as inputs, ReduceMean axes as attribute).
const ONNX_OPSET: i64 = 13;
const TO_NCHW: [usize; 4] = [0, 3, 1, 2];
const TO_NHWC: [usize; 4] = [0, 2, 3, 1];

/// Where each NHWC axis goes in NCHW (`N H W C` -> `N C H W`).
const NHWC_AXIS_TO_NCHW: [usize; 4] = [0, 2, 3, 1];

/// Rewrites the float TFLite ops of `g` into NCHW ONNX ops (see the module docs). Returns how
/// many TFLite nodes were rewritten. Graphs with subgraphs (If/While) are left alone.
pub fn tflite_to_nchw(g: &mut Graph) -> Result<usize> {
    let has_subgraphs = g.nodes.iter().any(|n| {
        n.attrs
            .values()
            .any(|a| matches!(a, Attr::Graph(_) | Attr::Graphs(_)))
    });
    if has_subgraphs || !g.nodes.iter().any(|n| n.domain == DOMAIN) {
        return Ok(0);
    }
    if g.opsets.get("").is_some_and(|&v| v != ONNX_OPSET) {
        // ONNX ops of another opset are already there: the emitted ones would be read with
        // that opset's rules.
        return Ok(0);
    }
    // Producers before consumers, so every NHWC reader of a rewritten value is seen after it.
    let order = g.topo_order()?;
    let mut old: Vec<Option<Node>> = std::mem::take(&mut g.nodes).into_iter().map(Some).collect();
    let mut st = State::default();
    for node in order
        .into_iter()
        .filter_map(|i| old.get_mut(i).and_then(Option::take))
    {
        let converted = node.domain == DOMAIN && rewrite(g, &mut st, &node);
        if converted {
            st.rewritten += 1;
        } else {
            // Stays as it is: every NCHW-only value it reads gets its NHWC form back.
            for v in node.inputs.iter().flatten() {
                materialize_nhwc(g, &mut st, *v);
            }
            st.out.push(node);
        }
    }
    for v in g.outputs.clone() {
        materialize_nhwc(g, &mut st, v);
    }
    g.nodes = st.out;
    if st.rewritten > 0 {
        g.opsets.insert(String::new(), ONNX_OPSET);
        // The original OHWI weights are no longer read by anything.
        g.remove_dead_nodes();
    }
    Ok(st.rewritten)
}

#[derive(Default)]
struct State {
    /// The new node list.
    out: Vec<Node>,
    /// NHWC value -> its NCHW twin.
    nchw: HashMap<ValueId, ValueId>,
    /// NHWC values whose producer was rewritten: they exist only as their NCHW twin until a
    /// Transpose back is emitted (then they leave this set).
    detached: HashSet<ValueId>,
    rewritten: usize,
}

fn fixed_f32(g: &Graph, v: ValueId) -> Option<Vec<usize>> {
    let vi = g.values.get(v)?;
    if vi.dtype != Some(DType::F32) {
        return None;
    }
    vi.fixed_shape()
}

/// A constant f32 initializer without quantization parameters.
fn const_f32(g: &Graph, v: ValueId) -> Option<&Tensor> {
    let t = g.initializers.get(&v)?;
    (t.dtype() == DType::F32 && t.quant.is_none()).then_some(t)
}

fn new_value(g: &mut Graph, hint: &str, shape: &[usize]) -> ValueId {
    let id = g.new_value(hint);
    g.values[id].dtype = Some(DType::F32);
    g.values[id].shape = Some(shape.iter().map(|&d| Dim::Fixed(d)).collect());
    id
}

fn add_init(g: &mut Graph, hint: &str, t: Tensor) -> ValueId {
    let id = g.new_value(hint);
    g.values[id].dtype = Some(t.dtype());
    g.values[id].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
    g.initializers.insert(id, t);
    id
}

fn onnx(op: &str, name: &str, ins: Vec<Option<ValueId>>, out: ValueId) -> Node {
    Node {
        name: name.to_string(),
        op: op.to_string(),
        domain: String::new(),
        inputs: ins,
        outputs: vec![Some(out)],
        ..Default::default()
    }
}

fn with(mut n: Node, attrs: Vec<(&str, Attr)>) -> Node {
    for (k, v) in attrs {
        n.attrs.insert(k.to_string(), v);
    }
    n
}

fn ints(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&x| x as i64).collect())
}

fn permute_shape(s: &[usize], perm: &[usize; 4]) -> Vec<usize> {
    perm.iter().map(|&p| s[p]).collect()
}

/// `data` of 4-D `shape` with its axes permuted (`out axis i = in axis perm[i]`).
fn permute4(data: &[f32], shape: &[usize], perm: &[usize; 4]) -> Vec<f32> {
    let strides = [
        shape[1] * shape[2] * shape[3],
        shape[2] * shape[3],
        shape[3],
        1,
    ];
    let os = permute_shape(shape, perm);
    let st: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let mut out = Vec::with_capacity(data.len());
    for a in 0..os[0] {
        for b in 0..os[1] {
            for c in 0..os[2] {
                for d in 0..os[3] {
                    out.push(data[a * st[0] + b * st[1] + c * st[2] + d * st[3]]);
                }
            }
        }
    }
    out
}

/// The NCHW twin of NHWC value `v`, emitting a Transpose when there is none yet. `v` must
/// be f32 with a fixed 4-D shape (callers check).
fn to_nchw(g: &mut Graph, st: &mut State, v: ValueId) -> ValueId {
    if let Some(&t) = st.nchw.get(&v) {
        return t;
    }
    let shape = g.values[v].fixed_shape().unwrap_or_default();
    let name = format!("{}_nchw", g.value_name(v));
    let t = new_value(g, &name, &permute_shape(&shape, &TO_NCHW));
    st.out.push(with(
        onnx("Transpose", &name, vec![Some(v)], t),
        vec![("perm", ints(&TO_NCHW))],
    ));
    st.nchw.insert(v, t);
    t
}

/// Emits the Transpose that gives a detached value its NHWC form back (once).
fn materialize_nhwc(g: &mut Graph, st: &mut State, v: ValueId) {
    if !st.detached.remove(&v) {
        return;
    }
    let Some(&t) = st.nchw.get(&v) else { return };
    let name = format!("{}_nhwc", g.value_name(v));
    st.out.push(with(
        onnx("Transpose", &name, vec![Some(t)], v),
        vec![("perm", ints(&TO_NHWC))],
    ));
}

/// Whether `v` can be read in NCHW: it has a twin, or is an f32 4-D value (a Transpose is
/// then emitted).
fn nchw_readable(g: &Graph, st: &State, v: ValueId) -> bool {
    st.nchw.contains_key(&v) || fixed_f32(g, v).is_some_and(|s| s.len() == 4)
}

/// An ONNX activation op and, for Clip, its bounds.
type Act = Option<(&'static str, Option<(f32, f32)>)>;

/// The ONNX activation a TFLite `fused_activation_function` names (`Some(None)`: none).
/// `None` for ones with no ONNX counterpart here (SIGN_BIT).
fn fused_act(n: &Node) -> Option<Act> {
    match n
        .attr_s("fused_activation_function")
        .unwrap_or_default()
        .as_str()
    {
        "" | "NONE" => Some(None),
        "RELU" => Some(Some(("Relu", None))),
        "RELU6" => Some(Some(("Clip", Some((0.0, 6.0))))),
        "RELU_N1_TO_1" => Some(Some(("Clip", Some((-1.0, 1.0))))),
        "TANH" => Some(Some(("Tanh", None))),
        _ => None,
    }
}

/// Emits `op` writing `out` directly (no activation) or through a fresh value followed by the
/// activation node.
fn emit_with_act(g: &mut Graph, st: &mut State, main: Node, act: Act, out: ValueId) {
    let Some((aop, bounds)) = act else {
        let mut main = main;
        main.outputs = vec![Some(out)];
        st.out.push(main);
        return;
    };
    let shape = g.values[out].fixed_shape().unwrap_or_default();
    let name = main.name.clone();
    let pre = new_value(g, &format!("{}_pre_act", g.value_name(out)), &shape);
    let mut main = main;
    main.outputs = vec![Some(pre)];
    st.out.push(main);
    let mut ins = vec![Some(pre)];
    if let Some((lo, hi)) = bounds {
        let lo = add_init(g, &format!("{name}_min"), Tensor::scalar(lo));
        let hi = add_init(g, &format!("{name}_max"), Tensor::scalar(hi));
        ins.push(Some(lo));
        ins.push(Some(hi));
    }
    st.out.push(onnx(aop, &format!("{name}_act"), ins, out));
}

/// Declares `y` (NHWC, shape `ys`) as produced in NCHW by the rewrite: returns its twin.
fn nchw_output(g: &mut Graph, st: &mut State, y: ValueId, ys: &[usize]) -> ValueId {
    let name = format!("{}_nchw", g.value_name(y));
    let t = new_value(g, &name, &permute_shape(ys, &TO_NCHW));
    st.nchw.insert(y, t);
    st.detached.insert(y);
    t
}

/// Output size and (before, after) padding of one spatial axis, TFLite's rules.
fn out_and_pads(
    padding: &str,
    inp: usize,
    k: usize,
    stride: usize,
    dil: usize,
) -> Option<(usize, usize, usize)> {
    if stride == 0 || dil == 0 || k == 0 {
        return None;
    }
    let eff = (k - 1) * dil + 1;
    let out = match padding {
        "SAME" => inp.div_ceil(stride),
        "VALID" if inp >= eff => (inp - eff) / stride + 1,
        _ => return None,
    };
    let total = ((out.checked_sub(1)?) * stride + eff).saturating_sub(inp);
    Some((out, total / 2, total - total / 2))
}

fn pos(n: &Node, name: &str, d: i64) -> Option<usize> {
    usize::try_from(n.attr_i(name).unwrap_or(d))
        .ok()
        .filter(|&v| v > 0)
}

/// Spatial geometry of a TFLite window op: (strides, dilations, pads [t, l, b, r]) for an
/// NHWC input `xs`, kernel `kh x kw`, checked against the NHWC output `ys`.
fn window(
    n: &Node,
    xs: &[usize],
    ys: &[usize],
    kh: usize,
    kw: usize,
    dilated: bool,
) -> Option<([usize; 2], [usize; 2], [usize; 4])> {
    let sh = pos(n, "stride_h", 1)?;
    let sw = pos(n, "stride_w", 1)?;
    let (dh, dw) = if dilated {
        (
            pos(n, "dilation_h_factor", 1)?,
            pos(n, "dilation_w_factor", 1)?,
        )
    } else {
        (1, 1)
    };
    let padding = n.attr_s("padding").unwrap_or_else(|| "VALID".into());
    let (oh, pt, pb) = out_and_pads(&padding, xs[1], kh, sh, dh)?;
    let (ow, pl, pr) = out_and_pads(&padding, xs[2], kw, sw, dw)?;
    (oh == ys[1] && ow == ys[2] && oh > 0 && ow > 0).then_some((
        [sh, sw],
        [dh, dw],
        [pt, pl, pb, pr],
    ))
}

fn io(n: &Node, k: usize) -> Option<ValueId> {
    n.inputs.get(k).copied().flatten()
}

fn out0(n: &Node) -> Option<ValueId> {
    match n.outputs.as_slice() {
        [Some(y)] => Some(*y),
        _ => None,
    }
}

/// Rewrites one TFLite node when it is a float op this pass knows; false leaves it as it is.
fn rewrite(g: &mut Graph, st: &mut State, n: &Node) -> bool {
    match n.op.as_str() {
        "Conv2D" | "DepthwiseConv2D" => conv(g, st, n).is_some(),
        "MaxPool2D" | "AveragePool2D" => pool(g, st, n).is_some(),
        "FullyConnected" => fully_connected(g, st, n).is_some(),
        "Add" => binary(g, st, n, "Add").is_some(),
        "Sub" => binary(g, st, n, "Sub").is_some(),
        "Mul" => binary(g, st, n, "Mul").is_some(),
        "Div" => binary(g, st, n, "Div").is_some(),
        "Maximum" => binary(g, st, n, "Max").is_some(),
        "Minimum" => binary(g, st, n, "Min").is_some(),
        "Relu" => unary(g, st, n, "Relu", None).is_some(),
        "Relu6" => unary(g, st, n, "Clip", Some((0.0, 6.0))).is_some(),
        "ReluN1To1" => unary(g, st, n, "Clip", Some((-1.0, 1.0))).is_some(),
        "Logistic" => unary(g, st, n, "Sigmoid", None).is_some(),
        "Tanh" => unary(g, st, n, "Tanh", None).is_some(),
        "HardSwish" => unary(g, st, n, "HardSwish", None).is_some(),
        "Mean" => reduce(g, st, n, "ReduceMean").is_some(),
        "Sum" => reduce(g, st, n, "ReduceSum").is_some(),
        "ReduceMax" => reduce(g, st, n, "ReduceMax").is_some(),
        "ReduceMin" => reduce(g, st, n, "ReduceMin").is_some(),
        "Pad" | "PadV2" => pad(g, st, n).is_some(),
        "Concatenation" => concat(g, st, n).is_some(),
        _ => false,
    }
}

/// Conv2D and DepthwiseConv2D -> Conv (grouped for depthwise).
fn conv(g: &mut Graph, st: &mut State, n: &Node) -> Option<()> {
    let (x, w, y) = (io(n, 0)?, io(n, 1)?, out0(n)?);
    let b = io(n, 2);
    let xs = fixed_f32(g, x).filter(|s| s.len() == 4)?;
    let ys = fixed_f32(g, y).filter(|s| s.len() == 4)?;
    let wt = const_f32(g, w).filter(|t| t.rank() == 4)?;
    let ws = wt.shape().to_vec();
    let act = fused_act(n)?;
    let depthwise = n.op == "DepthwiseConv2D";
    let (m, kh, kw) = (ws[if depthwise { 3 } else { 0 }], ws[1], ws[2]);
    let c = xs[3];
    if ys[3] != m || ys[0] != xs[0] || m == 0 || c == 0 {
        return None;
    }
    let (group, cg) = if depthwise {
        // [1, KH, KW, C * mult]
        (ws[0] == 1 && m % c == 0).then_some((c, 1))?
    } else {
        // [M, KH, KW, C / group]
        let cg = ws[3];
        (cg > 0 && c % cg == 0 && m % (c / cg) == 0).then_some((c / cg, cg))?
    };
    if let Some(b) = b {
        const_f32(g, b).filter(|t| t.len() == m)?;
    }
    let (strides, dil, pads) = window(n, &xs, &ys, kh, kw, true)?;
    let wshape = vec![m, cg, kh, kw];
    let wn = if !depthwise && kh == 1 && kw == 1 {
        // [M,1,1,C] and [M,C,1,1] hold the same bytes: no copy, weights stay in the file.
        wt.reshape(wshape).ok()?
    } else {
        // OIHW: depthwise [1,KH,KW,M] -> [M,1,KH,KW] (= permute [3,0,1,2]); OHWI -> OIHW.
        let perm = if depthwise { [3, 0, 1, 2] } else { TO_NCHW };
        Tensor::from_vec(wshape, permute4(&wt.to_f32(), &ws, &perm)).ok()?
    };
    let wname = format!("{}_oihw", g.value_name(w));
    let wid = add_init(g, &wname, wn);
    let xn = to_nchw(g, st, x);
    let yn = nchw_output(g, st, y, &ys);
    let node = with(
        onnx("Conv", &n.name, vec![Some(xn), Some(wid), b], yn),
        vec![
            ("kernel_shape", ints(&[kh, kw])),
            ("strides", ints(&strides)),
            ("dilations", ints(&dil)),
            ("pads", ints(&pads)),
            ("group", Attr::Int(group as i64)),
        ],
    );
    emit_with_act(g, st, node, act, yn);
    Some(())
}

/// MaxPool2D -> MaxPool, AveragePool2D -> AveragePool (padding not counted, as TFLite does).
fn pool(g: &mut Graph, st: &mut State, n: &Node) -> Option<()> {
    let (x, y) = (io(n, 0)?, out0(n)?);
    let xs = fixed_f32(g, x).filter(|s| s.len() == 4)?;
    let ys = fixed_f32(g, y).filter(|s| s.len() == 4)?;
    if xs[0] != ys[0] || xs[3] != ys[3] {
        return None;
    }
    let act = fused_act(n)?;
    let kh = pos(n, "filter_height", 0)?;
    let kw = pos(n, "filter_width", 0)?;
    let (strides, _, pads) = window(n, &xs, &ys, kh, kw, false)?;
    let xn = to_nchw(g, st, x);
    let yn = nchw_output(g, st, y, &ys);
    let mut attrs = vec![
        ("kernel_shape", ints(&[kh, kw])),
        ("strides", ints(&strides)),
        ("pads", ints(&pads)),
    ];
    let op = if n.op == "MaxPool2D" {
        "MaxPool"
    } else {
        attrs.push(("count_include_pad", Attr::Int(0)));
        "AveragePool"
    };
    let node = with(onnx(op, &n.name, vec![Some(xn)], yn), attrs);
    emit_with_act(g, st, node, act, yn);
    Some(())
}

/// FullyConnected on a matrix with constant `[O, K]` weights -> Gemm (transB).
fn fully_connected(g: &mut Graph, st: &mut State, n: &Node) -> Option<()> {
    let (x, w, y) = (io(n, 0)?, io(n, 1)?, out0(n)?);
    let b = io(n, 2);
    let xs = fixed_f32(g, x).filter(|s| s.len() == 2)?;
    let ys = fixed_f32(g, y).filter(|s| s.len() == 2)?;
    if n.attr_i("weights_format").unwrap_or(0) != 0 {
        return None;
    }
    let ws = const_f32(g, w).filter(|t| t.rank() == 2)?.shape().to_vec();
    if ws[1] != xs[1] || ys != [xs[0], ws[0]] {
        return None;
    }
    if let Some(b) = b {
        const_f32(g, b).filter(|t| t.len() == ws[0])?;
    }
    let act = fused_act(n)?;
    let node = with(
        onnx("Gemm", &n.name, vec![Some(x), Some(w), b], y),
        vec![("transB", Attr::Int(1))],
    );
    emit_with_act(g, st, node, act, y);
    Some(())
}

/// The NCHW operand for input `v` of an elementwise op whose NHWC output has shape `ys`:
/// its twin, a permuted constant, or a Transpose of a same-shaped 4-D value.
fn nchw_operand(g: &mut Graph, st: &mut State, v: ValueId, ys: &[usize]) -> Option<ValueId> {
    if let Some(&t) = st.nchw.get(&v) {
        return Some(t);
    }
    if let Some(t) = const_f32(g, v) {
        if t.rank() > 4 {
            return None;
        }
        let mut s = vec![1usize; 4 - t.rank()];
        s.extend_from_slice(t.shape());
        let data = permute4(&t.to_f32(), &s, &TO_NCHW);
        let pt = Tensor::from_vec(permute_shape(&s, &TO_NCHW), data).ok()?;
        let name = format!("{}_nchw", g.value_name(v));
        return Some(add_init(g, &name, pt));
    }
    if fixed_f32(g, v).as_deref() == Some(ys) {
        return Some(to_nchw(g, st, v));
    }
    None
}

/// Whether any input of `n` already has an NCHW twin (rewriting then saves a Transpose).
fn reads_nchw(st: &State, n: &Node) -> bool {
    n.inputs.iter().flatten().any(|v| st.nchw.contains_key(v))
}

/// Add, Sub, Mul, Div, Maximum, Minimum on an NCHW operand.
fn binary(g: &mut Graph, st: &mut State, n: &Node, op: &str) -> Option<()> {
    let y = out0(n)?;
    let ys = fixed_f32(g, y).filter(|s| s.len() == 4)?;
    if n.inputs.len() != 2 || !reads_nchw(st, n) {
        return None;
    }
    let act = fused_act(n)?;
    // Check every operand before emitting anything.
    for v in n.inputs.iter() {
        let v = (*v)?;
        let ok = st.nchw.contains_key(&v)
            || const_f32(g, v).is_some_and(|t| t.rank() <= 4)
            || fixed_f32(g, v).as_deref() == Some(&ys[..]);
        if !ok {
            return None;
        }
    }
    let mut ins = Vec::new();
    for v in n.inputs.iter().flatten() {
        ins.push(Some(nchw_operand(g, st, *v, &ys)?));
    }
    let yn = nchw_output(g, st, y, &ys);
    emit_with_act(g, st, onnx(op, &n.name, ins, yn), act, yn);
    Some(())
}

/// Activations on an NCHW value.
fn unary(
    g: &mut Graph,
    st: &mut State,
    n: &Node,
    op: &str,
    clip: Option<(f32, f32)>,
) -> Option<()> {
    let (x, y) = (io(n, 0)?, out0(n)?);
    let ys = fixed_f32(g, y).filter(|s| s.len() == 4)?;
    let xn = *st.nchw.get(&x)?;
    let yn = nchw_output(g, st, y, &ys);
    let mut ins = vec![Some(xn)];
    if let Some((lo, hi)) = clip {
        ins.push(Some(add_init(
            g,
            &format!("{}_min", n.name),
            Tensor::scalar(lo),
        )));
        ins.push(Some(add_init(
            g,
            &format!("{}_max", n.name),
            Tensor::scalar(hi),
        )));
    }
    st.out.push(onnx(op, &n.name, ins, yn));
    Some(())
}

/// Mean / Sum / ReduceMax / ReduceMin over constant axes of an NCHW value -> the ONNX reduce
/// `op` with the axes remapped (an attribute in opset 13, an input for ReduceSum).
fn reduce(g: &mut Graph, st: &mut State, n: &Node, op: &str) -> Option<()> {
    let (x, a, y) = (io(n, 0)?, io(n, 1)?, out0(n)?);
    let xn = *st.nchw.get(&x)?;
    let ys = fixed_f32(g, y)?;
    let at = g.initializers.get(&a)?;
    if at.dtype().is_float() {
        return None;
    }
    let mut axes = Vec::new();
    for v in at.to_i64_vec() {
        let v = if v < 0 { v + 4 } else { v };
        let v = usize::try_from(v).ok().filter(|&v| v < 4)?;
        if !axes.contains(&v) {
            axes.push(v);
        }
    }
    if axes.is_empty() {
        return None;
    }
    let keep = n.attr_i("keep_dims").unwrap_or(0) != 0;
    let naxes: Vec<usize> = axes.iter().map(|&v| NHWC_AXIS_TO_NCHW[v]).collect();
    let mut ins = vec![Some(xn)];
    let mut attrs = vec![("keepdims", Attr::Int(keep as i64))];
    if op == "ReduceSum" {
        let t = Tensor::from_vec(
            vec![naxes.len()],
            naxes.iter().map(|&a| a as i64).collect::<Vec<_>>(),
        )
        .ok()?;
        ins.push(Some(add_init(g, &format!("{}_axes", n.name), t)));
    } else {
        attrs.push(("axes", ints(&naxes)));
    }
    let node = |out| with(onnx(op, &n.name, ins, out), attrs);
    if keep {
        if ys.len() != 4 {
            return None;
        }
        let yn = nchw_output(g, st, y, &ys);
        st.out.push(node(yn));
    } else {
        // The axes that remain must come out in the same order in both layouts.
        let nhwc: Vec<usize> = (0..4).filter(|v| !axes.contains(v)).collect();
        let nchw: Vec<usize> = TO_NCHW
            .iter()
            .copied()
            .filter(|v| !axes.contains(v))
            .collect();
        if nhwc != nchw || ys.len() != nhwc.len() {
            return None;
        }
        st.out.push(node(y));
    }
    Some(())
}

/// Pad / PadV2 of an NCHW value with constant paddings -> Pad with the pads remapped.
fn pad(g: &mut Graph, st: &mut State, n: &Node) -> Option<()> {
    let (x, p, y) = (io(n, 0)?, io(n, 1)?, out0(n)?);
    let xn = *st.nchw.get(&x)?;
    let ys = fixed_f32(g, y).filter(|s| s.len() == 4)?;
    let pt = g.initializers.get(&p)?;
    if pt.dtype().is_float() || pt.shape() != [4, 2] {
        return None;
    }
    let pv = pt.to_i64_vec();
    if pv.iter().any(|&v| v < 0) {
        return None;
    }
    let value = match io(n, 2) {
        Some(c) => {
            let t = const_f32(g, c).filter(|t| t.len() == 1)?;
            Some(t.to_f32().first().copied()?)
        }
        None => None,
    };
    // ONNX pads: all begins (NCHW order), then all ends.
    let mut pads = vec![0i64; 8];
    for (k, &src) in TO_NCHW.iter().enumerate() {
        pads[k] = pv[src * 2];
        pads[k + 4] = pv[src * 2 + 1];
    }
    let pads = add_init(
        g,
        &format!("{}_pads", n.name),
        Tensor::from_vec(vec![8], pads).ok()?,
    );
    let mut ins = vec![Some(xn), Some(pads)];
    if let Some(v) = value {
        ins.push(Some(add_init(
            g,
            &format!("{}_value", n.name),
            Tensor::scalar(v),
        )));
    }
    let yn = nchw_output(g, st, y, &ys);
    st.out.push(with(
        onnx("Pad", &n.name, ins, yn),
        vec![("mode", Attr::String(b"constant".to_vec()))],
    ));
    Some(())
}

/// Concatenation of 4-D values, one of them NCHW -> Concat on the remapped axis.
fn concat(g: &mut Graph, st: &mut State, n: &Node) -> Option<()> {
    let y = out0(n)?;
    let ys = fixed_f32(g, y).filter(|s| s.len() == 4)?;
    if n.inputs.is_empty() || !reads_nchw(st, n) {
        return None;
    }
    let act = fused_act(n)?;
    let axis = n.attr_i("axis").unwrap_or(0);
    let axis = usize::try_from(if axis < 0 { axis + 4 } else { axis })
        .ok()
        .filter(|&a| a < 4)?;
    for v in &n.inputs {
        let v = (*v)?;
        let ok = nchw_readable(g, st, v) || const_f32(g, v).is_some_and(|t| t.rank() == 4);
        if !ok {
            return None;
        }
    }
    let mut ins = Vec::new();
    for v in n.inputs.iter().flatten() {
        let vs = match st.nchw.get(v) {
            Some(_) => None,
            None => Some(g.values[*v].fixed_shape()?),
        };
        let t = match vs {
            None => st.nchw.get(v).copied()?,
            Some(s) => nchw_operand(g, st, *v, &s)?,
        };
        ins.push(Some(t));
    }
    let yn = nchw_output(g, st, y, &ys);
    let node = with(
        onnx("Concat", &n.name, ins, yn),
        vec![("axis", Attr::Int(NHWC_AXIS_TO_NCHW[axis] as i64))],
    );
    emit_with_act(g, st, node, act, yn);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_cpu::{Executor, Registry};

    fn rnd(seed: &mut u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn s(v: &str) -> Attr {
        Attr::String(v.as_bytes().to_vec())
    }

    /// A TFLite-domain node the way the importer writes it.
    fn tfl(g: &mut Graph, op: &str, ins: &[&str], out: &str, attrs: Vec<(&str, Attr)>) {
        let inputs = ins
            .iter()
            .map(|n| (!n.is_empty()).then(|| g.value_id(n)))
            .collect();
        let y = g.value_id(out);
        g.add_node(Node {
            name: out.into(),
            op: op.into(),
            domain: DOMAIN.into(),
            inputs,
            outputs: vec![Some(y)],
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
    }

    fn init<T: edgehal_core::dtype::Elem>(g: &mut Graph, name: &str, shape: Vec<usize>, v: Vec<T>) {
        let id = g.value_id(name);
        let t = Tensor::from_vec(shape, v).unwrap();
        g.values[id].dtype = Some(t.dtype());
        g.values[id].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
        g.initializers.insert(id, t);
    }

    fn input(g: &mut Graph, name: &str, shape: &[usize]) {
        let id = g.value_id(name);
        g.values[id].dtype = Some(DType::F32);
        g.values[id].shape = Some(shape.iter().map(|&d| Dim::Fixed(d)).collect());
        g.inputs.push(id);
    }

    fn conv_attrs(pad: &str, stride: i64, act: &str) -> Vec<(&'static str, Attr)> {
        vec![
            ("padding", s(pad)),
            ("stride_h", Attr::Int(stride)),
            ("stride_w", Attr::Int(stride)),
            ("fused_activation_function", s(act)),
        ]
    }

    fn pool_attrs(pad: &str, k: i64, stride: i64) -> Vec<(&'static str, Attr)> {
        vec![
            ("padding", s(pad)),
            ("stride_h", Attr::Int(stride)),
            ("stride_w", Attr::Int(stride)),
            ("filter_height", Attr::Int(k)),
            ("filter_width", Attr::Int(k)),
            ("fused_activation_function", s("NONE")),
        ]
    }

    /// Sets every value's shape and dtype from a run of the graph (the importer takes them
    /// from the file; these graphs are built by hand).
    fn annotate(g: &mut Graph, feeds: &[Tensor]) {
        let mut all = g.clone();
        let outs: Vec<ValueId> = g
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().flatten().copied())
            .collect();
        all.outputs = outs.clone();
        let feed: Vec<(ValueId, Tensor)> = g
            .inputs
            .iter()
            .copied()
            .zip(feeds.iter().cloned())
            .collect();
        let res = Executor::new(&all, &Registry::new())
            .unwrap()
            .run(&feed)
            .unwrap();
        for (v, t) in outs.into_iter().zip(res) {
            g.values[v].dtype = Some(t.dtype());
            g.values[v].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
        }
    }

    fn run(g: &Graph, feeds: &[Tensor]) -> Vec<Tensor> {
        let feed: Vec<(ValueId, Tensor)> = g
            .inputs
            .iter()
            .copied()
            .zip(feeds.iter().cloned())
            .collect();
        Executor::new(g, &Registry::new())
            .unwrap()
            .run(&feed)
            .unwrap()
    }

    fn assert_close(want: &[Tensor], got: &[Tensor]) {
        assert_eq!(want.len(), got.len());
        for (k, (w, o)) in want.iter().zip(got).enumerate() {
            assert_eq!(w.shape(), o.shape(), "output {k}");
            let max = w.to_f32().iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                max > 0.0,
                "output {k} is all zeros: the test would prove nothing"
            );
            for (a, b) in w.to_f32().iter().zip(o.to_f32().iter()) {
                assert!(
                    (a - b).abs() <= 1e-4 * max.max(1.0),
                    "output {k}: {a} vs {b}"
                );
            }
        }
    }

    fn ops(g: &Graph) -> Vec<String> {
        g.nodes
            .iter()
            .map(|n| format!("{}:{}", n.domain, n.op))
            .collect()
    }

    fn count(g: &Graph, op: &str) -> usize {
        g.nodes.iter().filter(|n| n.op == op).count()
    }

    /// x [1,8,7,3] -> Conv2D 3x3 s2 SAME RELU6 -> DepthwiseConv2D 3x3 s1 SAME x2 RELU ->
    /// Conv2D 1x1 VALID -> Add(+ bias const [C], + residual from a second 1x1 conv) ->
    /// MaxPool 3x3 s2 SAME (odd sizes) -> AveragePool 2x2 s1 VALID -> Mean[1,2] ->
    /// FullyConnected RELU; the pooled 4-D value is a second output.
    fn cnn() -> (Graph, Vec<Tensor>) {
        let mut sd = 3u32;
        let mut g = Graph::new("cnn");
        g.opsets.insert(DOMAIN.into(), 3);
        input(&mut g, "x", &[1, 8, 7, 3]);
        init(&mut g, "w1", vec![8, 3, 3, 3], rnd(&mut sd, 8 * 27));
        init(&mut g, "b1", vec![8], rnd(&mut sd, 8));
        init(&mut g, "wd", vec![1, 3, 3, 16], rnd(&mut sd, 9 * 16));
        init(&mut g, "bd", vec![16], rnd(&mut sd, 16));
        init(&mut g, "w2", vec![6, 1, 1, 16], rnd(&mut sd, 96));
        init(&mut g, "w3", vec![6, 1, 1, 16], rnd(&mut sd, 96));
        init(&mut g, "cb", vec![6], rnd(&mut sd, 6));
        init(&mut g, "axes", vec![2], vec![1i32, 2]);
        init(&mut g, "fw", vec![4, 6], rnd(&mut sd, 24));
        init(&mut g, "fb", vec![4], rnd(&mut sd, 4));
        tfl(
            &mut g,
            "Conv2D",
            &["x", "w1", "b1"],
            "c1",
            conv_attrs("SAME", 2, "RELU6"),
        );
        let mut dw = conv_attrs("SAME", 1, "RELU");
        dw.push(("depth_multiplier", Attr::Int(2)));
        tfl(&mut g, "DepthwiseConv2D", &["c1", "wd", "bd"], "d1", dw);
        tfl(
            &mut g,
            "Conv2D",
            &["d1", "w2", ""],
            "p1",
            conv_attrs("VALID", 1, "NONE"),
        );
        tfl(
            &mut g,
            "Conv2D",
            &["d1", "w3", ""],
            "p2",
            conv_attrs("VALID", 1, "NONE"),
        );
        tfl(
            &mut g,
            "Add",
            &["p1", "cb"],
            "a1",
            vec![("fused_activation_function", s("NONE"))],
        );
        tfl(
            &mut g,
            "Add",
            &["a1", "p2"],
            "a2",
            vec![("fused_activation_function", s("RELU"))],
        );
        tfl(&mut g, "MaxPool2D", &["a2"], "m1", pool_attrs("SAME", 3, 2));
        tfl(
            &mut g,
            "AveragePool2D",
            &["m1"],
            "m2",
            pool_attrs("VALID", 2, 1),
        );
        tfl(
            &mut g,
            "Mean",
            &["m2", "axes"],
            "r",
            vec![("keep_dims", Attr::Int(0))],
        );
        tfl(
            &mut g,
            "FullyConnected",
            &["r", "fw", "fb"],
            "y",
            vec![("fused_activation_function", s("RELU"))],
        );
        g.outputs = vec![g.value_id("y"), g.value_id("m1")];
        let x = Tensor::from_vec(
            vec![1, 8, 7, 3],
            rnd(&mut sd, 168).iter().map(|v| v * 8.0).collect(),
        )
        .unwrap();
        annotate(&mut g, std::slice::from_ref(&x));
        (g, vec![x])
    }

    #[test]
    fn float_cnn_runs_in_nchw_and_matches() {
        let (plain, feeds) = cnn();
        let mut g = plain.clone();
        let n = tflite_to_nchw(&mut g).unwrap();
        g.validate().unwrap();
        assert_eq!(n, 10, "{:?}", ops(&g));
        assert!(g.nodes.iter().all(|n| n.domain.is_empty()), "{:?}", ops(&g));
        // One Transpose in (graph input), one out (the 4-D graph output), none in between.
        assert_eq!(count(&g, "Transpose"), 2, "{:?}", ops(&g));
        assert_eq!(count(&g, "Conv"), 4);
        let dw = g.nodes.iter().find(|n| n.name == "d1").unwrap();
        assert_eq!(dw.attr_i("group"), Some(8));
        let c1 = g.nodes.iter().find(|n| n.name == "c1").unwrap();
        // 8 -> 4 with k3 s2: total pad 1 -> (0, 1); 7 -> 4: total 2 -> (1, 1).
        assert_eq!(c1.attr_ints("pads"), Some(&[0i64, 1, 1, 1][..]));
        assert_eq!(g.nodes.last().map(|n| n.op.as_str()), Some("Transpose"));
        // Graph outputs keep the NHWC shapes.
        assert_eq!(g.values[g.outputs[1]].fixed_shape(), Some(vec![1, 2, 2, 6]));
        assert_close(&run(&plain, &feeds), &run(&g, &feeds));
    }

    #[test]
    fn optimize_fuses_the_rewritten_convs() {
        let (plain, feeds) = cnn();
        let mut g = plain.clone();
        crate::passes::optimize(&mut g, &Registry::new()).unwrap();
        let fused: Vec<Option<String>> = g
            .nodes
            .iter()
            .filter(|n| n.op == "FusedConv" || n.op == "FusedConvNhwc")
            .map(|n| n.attr_s("activation"))
            .collect();
        // (FusedConvNhwc where the NHWC pass took the chain over.) c1 + Clip, d1 + Relu, p2 + Add(residual) + Relu (p1 + const Add stays a Conv + Add
        // or the other way round: at least three fused).
        assert!(fused.len() >= 3, "{:?}", ops(&g));
        assert!(fused.contains(&Some("Clip".into())), "{fused:?}");
        // The only activation left is the FullyConnected one after the Gemm.
        assert_eq!(count(&g, "Clip"), 0, "{:?}", ops(&g));
        assert_eq!(count(&g, "Relu"), 1, "{:?}", ops(&g));
        assert_close(&run(&plain, &feeds), &run(&g, &feeds));
    }

    #[test]
    fn pad_concat_and_reductions_stay_nchw() {
        let mut sd = 9u32;
        let mut g = Graph::new("pc");
        input(&mut g, "x", &[1, 5, 6, 2]);
        input(&mut g, "z", &[1, 6, 9, 3]);
        init(&mut g, "w", vec![4, 2, 2, 2], rnd(&mut sd, 32));
        init(&mut g, "pads", vec![4, 2], vec![0i32, 0, 1, 0, 2, 1, 0, 0]);
        init(&mut g, "axes", vec![2], vec![2i32, 1]);
        init(&mut g, "k", vec![1, 1, 1, 7], rnd(&mut sd, 7));
        init(&mut g, "cax", vec![1], vec![-1i32]);
        tfl(
            &mut g,
            "Conv2D",
            &["x", "w", ""],
            "c",
            conv_attrs("SAME", 1, "TANH"),
        );
        tfl(&mut g, "Pad", &["c", "pads"], "p", vec![]);
        tfl(
            &mut g,
            "Concatenation",
            &["p", "z"],
            "cc",
            vec![
                ("axis", Attr::Int(-1)),
                ("fused_activation_function", s("NONE")),
            ],
        );
        tfl(
            &mut g,
            "Mean",
            &["cc", "axes"],
            "m",
            vec![("keep_dims", Attr::Int(1))],
        );
        tfl(
            &mut g,
            "Mul",
            &["cc", "m"],
            "s1",
            vec![("fused_activation_function", s("NONE"))],
        );
        tfl(
            &mut g,
            "Mul",
            &["s1", "k"],
            "s2",
            vec![("fused_activation_function", s("RELU_N1_TO_1"))],
        );
        tfl(&mut g, "Logistic", &["s2"], "y", vec![]);
        tfl(
            &mut g,
            "Sum",
            &["s2", "axes"],
            "sum",
            vec![("keep_dims", Attr::Int(0))],
        );
        tfl(
            &mut g,
            "ReduceMax",
            &["s1", "cax"],
            "mx",
            vec![("keep_dims", Attr::Int(1))],
        );
        g.outputs = vec![g.value_id("y"), g.value_id("sum"), g.value_id("mx")];
        let x = Tensor::from_vec(vec![1, 5, 6, 2], rnd(&mut sd, 60)).unwrap();
        let z = Tensor::from_vec(
            vec![1, 6, 9, 3],
            rnd(&mut sd, 162).iter().map(|v| v * 4.0).collect(),
        )
        .unwrap();
        let feeds = vec![x, z];
        annotate(&mut g, &feeds);
        let plain = g.clone();
        assert_eq!(tflite_to_nchw(&mut g).unwrap(), 9, "{:?}", ops(&g));
        // x and z in, y and mx out (sum is [1, C] in both layouts).
        assert_eq!(count(&g, "Transpose"), 4, "{:?}", ops(&g));
        assert_eq!(count(&g, "ReduceSum") + count(&g, "ReduceMax"), 2);
        let cc = g.nodes.iter().find(|n| n.op == "Concat").unwrap();
        assert_eq!(cc.attr_i("axis"), Some(1));
        assert_close(&run(&plain, &feeds), &run(&g, &feeds));
    }

    /// A node that stays NHWC (Reshape) between two convs gets the value back in NHWC, and
    /// the second conv reads NCHW again through one Transpose.
    #[test]
    fn nhwc_consumers_get_transposes_back() {
        let mut sd = 5u32;
        let mut g = Graph::new("rs");
        input(&mut g, "x", &[1, 4, 4, 2]);
        init(&mut g, "w", vec![3, 1, 1, 2], rnd(&mut sd, 6));
        init(&mut g, "w2", vec![2, 3, 3, 3], rnd(&mut sd, 54));
        init(&mut g, "shape", vec![4], vec![1i32, 4, 4, 3]);
        tfl(
            &mut g,
            "Conv2D",
            &["x", "w", ""],
            "c",
            conv_attrs("VALID", 1, "NONE"),
        );
        tfl(&mut g, "Reshape", &["c", "shape"], "r", vec![]);
        tfl(
            &mut g,
            "Conv2D",
            &["r", "w2", ""],
            "y",
            conv_attrs("SAME", 2, "RELU"),
        );
        g.outputs = vec![g.value_id("y")];
        let x = Tensor::from_vec(vec![1, 4, 4, 2], rnd(&mut sd, 32)).unwrap();
        annotate(&mut g, std::slice::from_ref(&x));
        let plain = g.clone();
        assert_eq!(tflite_to_nchw(&mut g).unwrap(), 2);
        assert_eq!(count(&g, "Transpose"), 4, "{:?}", ops(&g));
        assert_close(&run(&plain, std::slice::from_ref(&x)), &run(&g, &[x]));
    }

    #[test]
    fn quantized_ops_are_left_alone() {
        let mut g = Graph::new("q");
        let id = g.value_id("x");
        g.values[id].dtype = Some(DType::I8);
        g.values[id].shape = Some([1, 4, 4, 2].map(Dim::Fixed).to_vec());
        g.inputs.push(id);
        init(&mut g, "w", vec![3, 1, 1, 2], vec![1i8, 2, 3, 4, 5, 6]);
        tfl(
            &mut g,
            "Conv2D",
            &["x", "w", ""],
            "y",
            conv_attrs("VALID", 1, "NONE"),
        );
        let y = g.value_id("y");
        g.values[y].dtype = Some(DType::I8);
        g.values[y].shape = Some([1, 4, 4, 3].map(Dim::Fixed).to_vec());
        g.outputs = vec![y];
        let before = ops(&g);
        assert_eq!(tflite_to_nchw(&mut g).unwrap(), 0);
        assert_eq!(ops(&g), before);
        assert!(!g.opsets.contains_key(""));
    }

    #[test]
    fn same_padding_odd_sizes() {
        // (in, k, stride) -> (out, before, after), as TensorFlow computes them.
        assert_eq!(out_and_pads("SAME", 224, 3, 2, 1), Some((112, 0, 1)));
        assert_eq!(out_and_pads("SAME", 7, 3, 1, 1), Some((7, 1, 1)));
        assert_eq!(out_and_pads("SAME", 8, 4, 1, 1), Some((8, 1, 2)));
        assert_eq!(out_and_pads("SAME", 5, 3, 1, 2), Some((5, 2, 2)));
        assert_eq!(out_and_pads("VALID", 7, 3, 2, 1), Some((3, 0, 0)));
        assert_eq!(out_and_pads("VALID", 2, 3, 1, 1), None);
        assert_eq!(out_and_pads("SAME", 7, 3, 0, 1), None);
    }

    #[test]
    fn permute4_moves_axes() {
        // [1,2,2,3] NHWC -> NCHW: element (0,h,w,c) goes to (0,c,h,w).
        let d: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let p = permute4(&d, &[1, 2, 2, 3], &TO_NCHW);
        assert_eq!(p[0..4], [0.0, 3.0, 6.0, 9.0]);
        assert_eq!(p[4..8], [1.0, 4.0, 7.0, 10.0]);
        let back = permute4(&p, &[1, 3, 2, 2], &TO_NHWC);
        assert_eq!(back, d);
    }
}
