//! Lowering a subgraph to a list of dispatches (pure: no Vulkan calls).
//!
//! Every float value lives in one of four places: the arena (intermediates), the weights
//! buffer (constants, uploaded once), input `i` or output `j` (the caller's imported buffer
//! or a staging buffer, decided per submit). A graph output is written by its producer
//! straight into its output place. Reshape-like ops are aliases (no work). Activations that
//! directly follow a Conv/Gemm/MatMul/elementwise node are fused into its epilogue. Arena
//! space is reused once the last reader of a value (or of any alias of it) has been lowered;
//! the global barrier between dispatches orders the reuse.

use std::collections::{HashMap, HashSet};

use edgehal_core::graph::{Graph, Node, ValueId};
use edgehal_core::tensor::broadcast_shapes;
use edgehal_core::{DType, Error, Result, Tensor};

/// The kernels (one SPIR-V module each; GEMM twice for its two modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Gemm,
    GemmConv,
    DwConv,
    Pool,
    Binary,
    Unary,
    Softmax,
    Copy,
    Fill,
    Resize,
    /// Integer GEMM, portable (bitfieldExtract + 32-bit multiply-add).
    QGemm,
    /// Integer GEMM with packed 4x8-bit dot products (`shaderIntegerDotProduct`).
    QGemmDot,
}

/// Workgroup sizes chosen per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tune {
    /// GEMM workgroup (x, y); a workgroup computes a (4y) x (4x) tile.
    pub gemm: (u32, u32),
    /// Workgroup size of the one-dimensional kernels.
    pub wg: u32,
    /// Integer GEMMs use packed 4x8-bit dot products (the device enabled
    /// `shaderIntegerDotProduct`); otherwise the portable integer kernel.
    pub int_dot: bool,
}

impl Tune {
    /// Pick from the device limits: 16x16 GEMM workgroups (8 KiB of shared memory) where 256
    /// invocations are allowed, 8x8 otherwise; 1-D kernels use 64 or the subgroup size when
    /// larger.
    pub fn for_device(max_invocations: u32, shared: u32, subgroup: u32) -> Tune {
        let gemm = if max_invocations >= 256 && shared >= 8192 {
            (16, 16)
        } else {
            (8, 8)
        };
        let wg = subgroup.clamp(64, 256).min(max_invocations.max(1));
        Tune {
            gemm,
            wg,
            int_dot: false,
        }
    }

    /// Specialization constants of `k`.
    pub fn spec(&self, k: Kernel) -> Vec<u32> {
        match k {
            Kernel::Gemm => vec![self.gemm.0, self.gemm.1, 0],
            Kernel::GemmConv => vec![self.gemm.0, self.gemm.1, 1],
            _ => vec![self.wg],
        }
    }
}

impl Kernel {
    /// SPIR-V of the kernel.
    pub fn spirv(self) -> &'static [u8] {
        use crate::shaders::*;
        match self {
            Kernel::Gemm | Kernel::GemmConv => GEMM,
            Kernel::DwConv => DWCONV,
            Kernel::Pool => POOL,
            Kernel::Binary => BINARY,
            Kernel::Unary => UNARY,
            Kernel::Softmax => SOFTMAX,
            Kernel::Copy => COPY,
            Kernel::Fill => FILL,
            Kernel::Resize => RESIZE,
            Kernel::QGemm => QGEMM,
            Kernel::QGemmDot => QGEMM_DOT,
        }
    }
}

/// Which buffer a binding refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    Arena,
    Weights,
    Input(usize),
    Output(usize),
}

/// A float tensor on the device: a place, an element offset and a shape.
#[derive(Clone, Debug)]
struct GVal {
    place: Place,
    off: u32,
    shape: Vec<usize>,
}

/// One dispatch.
#[derive(Clone, Debug)]
pub struct Step {
    pub kernel: Kernel,
    /// Bindings 1..=4 (unused ones `None`).
    pub bufs: [Option<Place>; 4],
    /// Offset of this step's parameters in [`Plan::params`].
    pub base: u32,
    pub groups: [u32; 3],
}

/// A lowered subgraph.
#[derive(Clone, Debug)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub params: Vec<u32>,
    /// Arena size in elements.
    pub arena: usize,
    pub weights: Vec<f32>,
    pub input_shapes: Vec<Vec<usize>>,
    pub output_shapes: Vec<Vec<usize>>,
}

const ACT_NONE: u32 = 0;

/// Ops the planner lowers.
pub const SUPPORTED: &[&str] = &[
    "Conv",
    "Gemm",
    "MatMul",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Pow",
    "PRelu",
    "Relu",
    "Clip",
    "HardSwish",
    "Sigmoid",
    "LeakyRelu",
    "Tanh",
    "HardSigmoid",
    "Exp",
    "Neg",
    "Abs",
    "Sqrt",
    "Log",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Elu",
    "Identity",
    "Dropout",
    "Softmax",
    "LogSoftmax",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Concat",
    "Pad",
    "Slice",
    "Resize",
    "Constant",
    "QuantizeLinear",
    "DequantizeLinear",
    "BatchNormalization",
    "MatMulInteger",
    "QLinearMatMul",
    "ConvInteger",
    "QLinearConv",
    "Cast",
];

/// The activation code and its two parameters, when `n` is an activation node.
fn activation(n: &Node, consts: &HashMap<ValueId, Tensor>) -> Option<(u32, f32, f32)> {
    Some(match n.op.as_str() {
        "Relu" => (1, 0.0, 0.0),
        "Clip" => {
            let (lo, hi) = clip_bounds(n, consts).ok()?;
            (2, lo, hi)
        }
        "HardSwish" => (3, 0.0, 0.0),
        "Sigmoid" => (4, 0.0, 0.0),
        "LeakyRelu" => (5, n.attr_f("alpha").unwrap_or(0.01), 0.0),
        "Tanh" => (6, 0.0, 0.0),
        "HardSigmoid" => (
            7,
            n.attr_f("alpha").unwrap_or(0.2),
            n.attr_f("beta").unwrap_or(0.5),
        ),
        _ => return None,
    })
}

fn scalar_f32(t: &Tensor, what: &str) -> Result<f32> {
    let s = t.to_f32();
    match s.len() {
        1 => Ok(s[0]),
        n => Err(Error::arg(format!("{what}: expected one value, got {n}"))),
    }
}

fn clip_bounds(n: &Node, consts: &HashMap<ValueId, Tensor>) -> Result<(f32, f32)> {
    let mut lo = n.attr_f("min").unwrap_or(f32::NEG_INFINITY);
    let mut hi = n.attr_f("max").unwrap_or(f32::INFINITY);
    for (k, slot) in [(1usize, &mut lo), (2, &mut hi)] {
        if let Some(Some(v)) = n.inputs.get(k) {
            let t = consts
                .get(v)
                .ok_or_else(|| Error::unsupported("Clip: min/max must be constants on vulkan"))?;
            *slot = scalar_f32(t, "Clip bound")?;
        }
    }
    Ok((lo, hi))
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&x| x < i32::MAX as u32)
        .ok_or_else(|| Error::TooLarge(format!("{what} = {v} is over the 2^31 element limit")))
}

/// Element count, saturating (sizes from a model are checked against the 2^31 limit after).
fn numel(s: &[usize]) -> usize {
    s.iter().fold(1usize, |a, &d| a.saturating_mul(d))
}

fn strides(s: &[usize]) -> Vec<usize> {
    let mut st = vec![1usize; s.len()];
    for d in (0..s.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * s[d + 1];
    }
    st
}

fn f(v: f32) -> u32 {
    v.to_bits()
}

/// Compile-time evaluation of the constants a node needs as integers.
fn const_ints(
    consts: &HashMap<ValueId, Tensor>,
    v: Option<ValueId>,
    what: &str,
) -> Result<Vec<i64>> {
    let v = v.ok_or_else(|| Error::arg(format!("{what} is missing")))?;
    let t = consts
        .get(&v)
        .ok_or_else(|| Error::unsupported(format!("{what} must be a constant on vulkan")))?;
    Ok(t.to_i64_vec())
}

fn norm_axis(a: i64, rank: usize, what: &str) -> Result<usize> {
    let r = rank as i64;
    let x = if a < 0 { a + r } else { a };
    if x < 0 || x >= r {
        return Err(Error::arg(format!(
            "{what}: axis {a} out of range for rank {rank}"
        )));
    }
    Ok(x as usize)
}

struct Lower<'g> {
    g: &'g Graph,
    consts: HashMap<ValueId, Tensor>,
    vals: HashMap<ValueId, GVal>,
    steps: Vec<Step>,
    params: Vec<u32>,
    arena: usize,
    weights: Vec<f32>,
    outputs: HashMap<ValueId, usize>,
    tune: Tune,
    /// Position (in topological order) of the node being lowered.
    pos: usize,
    /// Last position at which each value is read.
    last_use: HashMap<ValueId, usize>,
    /// Live arena blocks: offset -> (size, last position any alias of it is read).
    live: HashMap<u32, (usize, usize)>,
    /// Free arena ranges (offset, size) in elements, sorted by offset.
    free: Vec<(usize, usize)>,
    /// QDQ convolutions lowered to the integer kernel, by Conv node id.
    int_convs: HashMap<usize, IntConv>,
    /// DequantizeLinear nodes whose output feeds an integer convolution (the Quantize before
    /// them must materialise the integers), and those with no other consumer (skipped).
    dq_int: HashSet<usize>,
    dq_skip: HashSet<usize>,
}

/// A `DequantizeLinear -> Conv -> QuantizeLinear` group (weights and bias dequantized from
/// constants) rewritten as one QLinearConv on the integer kernel.
#[derive(Clone, Debug)]
struct IntConv {
    /// The equivalent QLinearConv node (the Conv's attributes; output = the Quantize's).
    node: Node,
    /// The QuantizeLinear node folded in.
    q_node: usize,
    /// The quantized input value (a QuantizeLinear output held as integers).
    xq: ValueId,
}

/// The value of a Constant node.
fn constant_value(node: &Node) -> Result<Tensor> {
    if let Some(t) = node.attr_t("value") {
        Ok(t.clone())
    } else if let Some(v) = node.attr_f("value_float") {
        Tensor::from_vec(vec![], vec![v])
    } else if let Some(v) = node.attr_floats("value_floats") {
        Tensor::from_vec(vec![v.len()], v.to_vec())
    } else if let Some(v) = node.attr_i("value_int") {
        Tensor::from_vec(vec![], vec![v])
    } else if let Some(v) = node.attr_ints("value_ints") {
        Tensor::from_vec(vec![v.len()], v.to_vec())
    } else {
        Err(Error::unsupported("Constant without a tensor value"))
    }
}

/// Find the QDQ convolutions that can run on the integer kernel: input from
/// `QuantizeLinear -> DequantizeLinear` (per-tensor, zero point given), weight and optional
/// bias dequantized from 8-bit / int32 constants (bias scale = input scale x weight scale),
/// and the Conv's only consumer a per-tensor QuantizeLinear with a zero point.
fn find_int_convs(g: &Graph, consts: &HashMap<ValueId, Tensor>) -> HashMap<usize, IntConv> {
    let mut producer: HashMap<ValueId, usize> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for o in n.outputs.iter().flatten() {
            producer.insert(*o, i);
        }
    }
    let consumers = g.consumers();
    let is_out = |v: ValueId| g.outputs.contains(&v);
    let scalar = |v: Option<ValueId>| v.and_then(|v| consts.get(&v)).filter(|t| t.len() == 1);
    let dq_of = |v: Option<ValueId>| {
        v.and_then(|v| producer.get(&v))
            .map(|&i| &g.nodes[i])
            .filter(|n| n.op == "DequantizeLinear" && n.attr_i("block_size").unwrap_or(0) == 0)
    };
    let mut out = HashMap::new();
    for (id, n) in g.nodes.iter().enumerate() {
        if n.op != "Conv" {
            continue;
        }
        let inp = |k: usize| n.inputs.get(k).copied().flatten();
        let arg = |m: &Node, k: usize| m.inputs.get(k).copied().flatten();
        let (Some(dx), Some(dw)) = (dq_of(inp(0)), dq_of(inp(1))) else {
            continue;
        };
        let Some(xq) = arg(dx, 0) else { continue };
        let x_from_q = producer
            .get(&xq)
            .is_some_and(|&i| g.nodes[i].op == "QuantizeLinear");
        let (Some(sx), Some(_)) = (scalar(arg(dx, 1)), scalar(arg(dx, 2))) else {
            continue;
        };
        if !x_from_q || consts.contains_key(&xq) {
            continue;
        }
        let Some(wq) = arg(dw, 0).and_then(|v| consts.get(&v)) else {
            continue;
        };
        let Some(ws) = arg(dw, 1).and_then(|v| consts.get(&v)) else {
            continue;
        };
        let w_axis_ok = dw.attr_i("axis").unwrap_or(1) == 0 || ws.len() == 1;
        if !matches!(wq.dtype(), DType::I8 | DType::U8) || !w_axis_ok {
            continue;
        }
        if arg(dw, 2).is_some_and(|v| !consts.contains_key(&v)) {
            continue;
        }
        // Bias: int32 with scale = sx * ws (per channel), as QLinearConv needs.
        let bias = match inp(2) {
            None => None,
            Some(_) => {
                let Some(db) = dq_of(inp(2)) else { continue };
                let (Some(bq), Some(bs)) = (
                    arg(db, 0).and_then(|v| consts.get(&v)),
                    arg(db, 1).and_then(|v| consts.get(&v)),
                ) else {
                    continue;
                };
                if bq.dtype() != DType::I32
                    || arg(db, 2).is_some_and(|v| {
                        consts
                            .get(&v)
                            .is_none_or(|z| z.to_i64_vec().iter().any(|&x| x != 0))
                    })
                {
                    continue;
                }
                let (sxv, wsv, bsv) = (sx.to_f32()[0], ws.to_f32(), bs.to_f32());
                let ok = bsv.len() == bq.len()
                    && bsv.iter().enumerate().all(|(c, &b)| {
                        let w = if wsv.len() == 1 {
                            wsv[0]
                        } else {
                            wsv.get(c).copied().unwrap_or(0.0)
                        };
                        (b - sxv * w).abs() <= 1e-6 * b.abs().max(1e-30)
                    });
                if !ok {
                    continue;
                }
                arg(db, 0)
            }
        };
        let Some(co) = n.outputs.first().copied().flatten() else {
            continue;
        };
        let c = consumers.get(co).map(Vec::as_slice).unwrap_or(&[]);
        if c.len() != 1 || is_out(co) {
            continue;
        }
        let qn = &g.nodes[c[0]];
        let Some(qo) = qn.outputs.first().copied().flatten() else {
            continue;
        };
        if qn.op != "QuantizeLinear"
            || arg(qn, 0) != Some(co)
            || scalar(arg(qn, 1)).is_none()
            || scalar(arg(qn, 2)).is_none()
            || is_out(qo)
        {
            continue;
        }
        let node = Node {
            op: "QLinearConv".into(),
            inputs: vec![
                Some(xq),
                arg(dx, 1),
                arg(dx, 2),
                arg(dw, 0),
                arg(dw, 1),
                arg(dw, 2),
                arg(qn, 1),
                arg(qn, 2),
                bias,
            ],
            outputs: vec![Some(qo)],
            attrs: n.attrs.clone(),
            ..Default::default()
        };
        out.insert(
            id,
            IntConv {
                node,
                q_node: c[0],
                xq,
            },
        );
    }
    out
}

impl Lower<'_> {
    /// First-fit allocation in the arena, reusing ranges of values no longer read.
    fn alloc(&mut self, n: usize) -> Result<u32> {
        let n = n.max(1).next_multiple_of(16);
        if let Some(i) = self.free.iter().position(|&(_, s)| s >= n) {
            let (off, s) = self.free[i];
            if s == n {
                self.free.remove(i);
            } else {
                self.free[i] = (off + n, s - n);
            }
            return u32_of(off, "arena offset");
        }
        let off = u32_of(self.arena, "arena offset")?;
        self.arena += n;
        u32_of(self.arena, "arena size")?;
        Ok(off)
    }

    /// Record that value `v` lives in the arena block at `off` (its own or an alias's).
    fn track(&mut self, v: ValueId, off: u32, size: usize) {
        let last = self.last_use.get(&v).copied().unwrap_or(self.pos);
        let e = self
            .live
            .entry(off)
            .or_insert((size.max(1).next_multiple_of(16), last));
        e.1 = e.1.max(last);
    }

    /// Return the blocks whose last reader has been lowered to the free list.
    fn release(&mut self) {
        let pos = self.pos;
        let dead: Vec<u32> = self
            .live
            .iter()
            .filter(|(_, &(_, last))| last <= pos)
            .map(|(&o, _)| o)
            .collect();
        for o in dead {
            if let Some((size, _)) = self.live.remove(&o) {
                self.free.push((o as usize, size));
            }
        }
        self.free.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.free.len());
        for &(o, s) in &self.free {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += s,
                _ => merged.push((o, s)),
            }
        }
        self.free = merged;
    }

    /// Where output value `v` of `numel` elements goes: its output place, or new arena space.
    fn place_for(&mut self, v: ValueId, shape: Vec<usize>) -> Result<GVal> {
        if let Some(&j) = self.outputs.get(&v) {
            return Ok(GVal {
                place: Place::Output(j),
                off: 0,
                shape,
            });
        }
        let off = self.alloc(numel(&shape))?;
        self.track(v, off, numel(&shape));
        Ok(GVal {
            place: Place::Arena,
            off,
            shape,
        })
    }

    fn gpu(&mut self, v: Option<ValueId>, what: &str) -> Result<GVal> {
        let v = v.ok_or_else(|| Error::arg(format!("{what} is missing")))?;
        if let Some(g) = self.vals.get(&v) {
            return Ok(g.clone());
        }
        let Some(t) = self.consts.get(&v) else {
            return Err(Error::arg(format!(
                "{what} ('{}') has no value",
                self.g.value_name(v)
            )));
        };
        if t.dtype() != DType::F32 {
            return Err(Error::unsupported(format!(
                "{what}: {} tensors are not supported on vulkan (float32 only)",
                t.dtype()
            )));
        }
        let data = t.as_slice::<f32>()?;
        let off = u32_of(self.weights.len(), "weights offset")?;
        self.weights.extend_from_slice(&data);
        let pad = self.weights.len().next_multiple_of(16);
        self.weights.resize(pad, 0.0);
        let g = GVal {
            place: Place::Weights,
            off,
            shape: t.shape().to_vec(),
        };
        self.vals.insert(v, g.clone());
        Ok(g)
    }

    fn push(&mut self, kernel: Kernel, bufs: [Option<Place>; 4], p: Vec<u32>, groups: [u32; 3]) {
        let base = self.params.len() as u32;
        self.params.extend(p);
        self.steps.push(Step {
            kernel,
            bufs,
            base,
            groups,
        });
    }

    fn groups_1d(&self, n: usize) -> [u32; 3] {
        let g = n.div_ceil(self.tune.wg as usize).max(1);
        let gx = g.min(65535);
        [gx as u32, g.div_ceil(gx) as u32, 1]
    }

    fn copy(
        &mut self,
        src: &GVal,
        src_strides: &[i64],
        dst: &GVal,
        dst_off: u32,
        dst_strides: &[i64],
        shape: &[usize],
    ) -> Result<()> {
        let n = numel(shape);
        if n == 0 {
            return Ok(());
        }
        if shape.len() > 6 {
            return Err(Error::unsupported("copy of rank > 6 tensors on vulkan"));
        }
        let r = shape.len();
        let mut p = vec![u32_of(n, "elements")?, r as u32, src.off, dst_off];
        let mut sh = [1u32; 6];
        let mut ss = [0i32; 6];
        let mut ds = [0i32; 6];
        for d in 0..r {
            sh[d] = u32_of(shape[d], "dim")?;
            ss[d] = src_strides[d] as i32;
            ds[d] = dst_strides[d] as i32;
        }
        p.extend(sh);
        p.extend(ss.iter().map(|&x| x as u32));
        p.extend(ds.iter().map(|&x| x as u32));
        let groups = self.groups_1d(n);
        self.push(
            Kernel::Copy,
            [Some(src.place), Some(dst.place), None, None],
            p,
            groups,
        );
        Ok(())
    }

    fn contiguous_copy(&mut self, src: &GVal, dst: &GVal) -> Result<()> {
        let n = numel(&src.shape);
        let s = [1i64];
        self.copy(src, &s, dst, dst.off, &s, &[n])
    }

    /// Upload host floats as a constant of `shape` (weights buffer).
    fn constant(&mut self, data: &[f32], shape: Vec<usize>) -> Result<GVal> {
        let off = u32_of(self.weights.len(), "weights offset")?;
        self.weights.extend_from_slice(data);
        let pad = self.weights.len().next_multiple_of(16);
        self.weights.resize(pad, 0.0);
        Ok(GVal {
            place: Place::Weights,
            off,
            shape,
        })
    }

    /// Quantize (17), dequantize (18) or quantize-then-dequantize (19) with a per-tensor
    /// scale and zero point; quantized values are integers held in float32 (exact).
    fn quant(&mut self, x: &GVal, y: &GVal, op: u32, q: &QParams) -> Result<()> {
        let n = numel(&x.shape);
        if n == 0 {
            return Ok(());
        }
        let p = vec![
            u32_of(n, "elements")?,
            op,
            f(q.scale),
            f(q.zp as f32),
            x.off,
            y.off,
            f(q.lo as f32),
            f(q.hi as f32),
        ];
        let groups = self.groups_1d(n);
        self.push(
            Kernel::Unary,
            [Some(x.place), Some(y.place), None, None],
            p,
            groups,
        );
        Ok(())
    }

    /// y = a <op> b with broadcasting (binary kernel codes: 0 add, 1 sub, 2 mul, 3 div,
    /// 4 max, 5 min, 6 pow, 7 prelu) and a fused activation.
    fn binary(
        &mut self,
        a: &GVal,
        b: &GVal,
        y: &GVal,
        op: u32,
        act: (u32, f32, f32),
    ) -> Result<()> {
        let out = y.shape.clone();
        let total = numel(&out);
        if total == 0 {
            return Ok(());
        }
        if out.len() > 6 || a.shape.len() > out.len() || b.shape.len() > out.len() {
            return Err(Error::unsupported(
                "broadcasting over more than 6 dims on vulkan",
            ));
        }
        let r = out.len();
        let bstr = |s: &[usize]| -> Vec<u32> {
            let st = strides(s);
            let mut v = vec![0u32; 6];
            let lead = r - s.len();
            for d in 0..s.len() {
                v[lead + d] = if s[d] == 1 { 0 } else { st[d] as u32 };
            }
            v
        };
        let contiguous = (a.shape == out && b.shape == out) as u32;
        let mut p = vec![
            u32_of(total, "elements")?,
            op,
            act.0,
            f(act.1),
            f(act.2),
            a.off,
            b.off,
            y.off,
            r as u32,
            contiguous,
        ];
        let mut sh = vec![1u32; 6];
        for d in 0..r {
            sh[d] = out[d] as u32;
        }
        p.extend(sh);
        p.extend(bstr(&a.shape));
        p.extend(bstr(&b.shape));
        let gr = self.groups_1d(total);
        self.push(
            Kernel::Binary,
            [Some(a.place), Some(b.place), Some(y.place), None],
            p,
            gr,
        );
        Ok(())
    }

    fn unary(&mut self, x: &GVal, y: &GVal, op: u32, a: f32, b: f32) -> Result<()> {
        let n = numel(&x.shape);
        if n == 0 {
            return Ok(());
        }
        let p = vec![u32_of(n, "elements")?, op, f(a), f(b), x.off, y.off];
        let groups = self.groups_1d(n);
        self.push(
            Kernel::Unary,
            [Some(x.place), Some(y.place), None, None],
            p,
            groups,
        );
        Ok(())
    }
}

/// Lower `g` for inputs of `input_shapes`.
pub fn lower(g: &Graph, input_shapes: &[Vec<usize>], tune: Tune) -> Result<Plan> {
    if input_shapes.len() != g.inputs.len() {
        return Err(Error::arg(format!(
            "{} input shapes for {} inputs",
            input_shapes.len(),
            g.inputs.len()
        )));
    }
    let mut lw = Lower {
        g,
        consts: g.initializers.clone().into_iter().collect(),
        vals: HashMap::new(),
        steps: Vec::new(),
        params: Vec::new(),
        arena: 0,
        weights: Vec::new(),
        outputs: HashMap::new(),
        tune,
        pos: 0,
        last_use: HashMap::new(),
        live: HashMap::new(),
        free: Vec::new(),
        int_convs: HashMap::new(),
        dq_int: HashSet::new(),
        dq_skip: HashSet::new(),
    };
    // Constants known before lowering (the integer-convolution rewrite needs scales that
    // Constant nodes later in the order provide).
    for n in &g.nodes {
        if n.op == "Constant" {
            if let (Some(Some(o)), Ok(t)) = (n.outputs.first(), constant_value(n)) {
                lw.consts.insert(*o, t);
            }
        }
    }
    for (j, &o) in g.outputs.iter().enumerate() {
        lw.outputs.entry(o).or_insert(j);
    }
    for (i, (&v, s)) in g.inputs.iter().zip(input_shapes).enumerate() {
        if let Some(dt) = g.values.get(v).and_then(|x| x.dtype) {
            if dt != DType::F32 {
                return Err(Error::unsupported(format!(
                    "input '{}' is {dt}; vulkan runs float32 only",
                    g.value_name(v)
                )));
            }
        }
        lw.vals.insert(
            v,
            GVal {
                place: Place::Input(i),
                off: 0,
                shape: s.clone(),
            },
        );
    }
    let order = g.topo_order()?;
    for (p, &n) in order.iter().enumerate() {
        for v in g.nodes[n].inputs.iter().flatten() {
            lw.last_use.insert(*v, p);
        }
    }
    let consumers = g.consumers();
    if tune.int_dot {
        lw.int_convs = find_int_convs(g, &lw.consts);
        let pos: HashMap<usize, usize> = order.iter().enumerate().map(|(p, &n)| (n, p)).collect();
        let int_inputs: HashSet<ValueId> = lw
            .int_convs
            .keys()
            .filter_map(|&c| g.nodes[c].inputs.first().copied().flatten())
            .collect();
        for (i, n) in g.nodes.iter().enumerate() {
            if n.op != "DequantizeLinear" {
                continue;
            }
            let Some(o) = n.outputs.first().copied().flatten() else {
                continue;
            };
            if !int_inputs.contains(&o) {
                continue;
            }
            lw.dq_int.insert(i);
            let only_int = consumers
                .get(o)
                .is_some_and(|c| c.iter().all(|k| lw.int_convs.contains_key(k)));
            if only_int && !lw.outputs.contains_key(&o) {
                lw.dq_skip.insert(i);
            }
        }
        // The convolution reads the quantized input itself: keep it alive until then.
        for (&c, ic) in &lw.int_convs {
            let p = pos.get(&c).copied().unwrap_or(0);
            let e = lw.last_use.entry(ic.xq).or_insert(p);
            *e = (*e).max(p);
        }
    }
    let mut fused: HashSet<usize> = HashSet::new();
    for (p, &n) in order.iter().enumerate() {
        lw.pos = p;
        if fused.contains(&n) {
            lw.release();
            continue;
        }
        let node = &g.nodes[n];
        lower_node(&mut lw, node, n, &consumers, &mut fused).map_err(|e| Error::Op {
            node: g.describe_node(n),
            msg: e.to_string(),
        })?;
        lw.release();
    }
    // Outputs not written in place (aliases, inputs, constants, duplicates): copy.
    let mut output_shapes = Vec::new();
    for (j, &o) in g.outputs.iter().enumerate() {
        let src = lw.gpu(Some(o), "graph output")?;
        if src.place != Place::Output(j) {
            let dst = GVal {
                place: Place::Output(j),
                off: 0,
                shape: src.shape.clone(),
            };
            lw.contiguous_copy(&src, &dst)?;
        }
        output_shapes.push(src.shape.clone());
    }
    Ok(Plan {
        steps: lw.steps,
        params: lw.params,
        arena: lw.arena,
        weights: lw.weights,
        input_shapes: input_shapes.to_vec(),
        output_shapes,
    })
}

fn conv_out(
    i: usize,
    k: usize,
    s: usize,
    d: usize,
    pb: usize,
    pe: usize,
    ceil: bool,
) -> Result<usize> {
    let eff = (k - 1) * d + 1;
    let span = i + pb + pe;
    if span < eff || s == 0 {
        return Err(Error::arg(format!(
            "window {eff} larger than padded input {span} (or stride 0)"
        )));
    }
    Ok(if ceil {
        (span - eff).div_ceil(s) + 1
    } else {
        (span - eff) / s + 1
    })
}

/// Spatial geometry of Conv/Pool: per axis (kernel, stride, dilation, pad begin, pad end, out).
fn geometry(node: &Node, in_hw: &[usize], kernel: &[usize], ceil: bool) -> Result<Vec<[usize; 6]>> {
    let r = in_hw.len();
    let ints = |name: &str, def: usize| -> Result<Vec<usize>> {
        match node.attr_ints(name) {
            Some(v) => v
                .iter()
                .map(|&x| {
                    usize::try_from(x)
                        .map_err(|_| Error::arg(format!("{name}: negative value {x}")))
                })
                .collect(),
            None => Ok(vec![def; if name == "pads" { 2 * r } else { r }]),
        }
    };
    let strides = ints("strides", 1)?;
    let dil = ints("dilations", 1)?;
    let mut pads = ints("pads", 0)?;
    if strides.len() != r || dil.len() != r || pads.len() != 2 * r || kernel.len() != r {
        return Err(Error::arg(
            "kernel_shape/strides/dilations/pads lengths disagree with the input rank",
        ));
    }
    let auto = node.attr_s("auto_pad").unwrap_or_else(|| "NOTSET".into());
    if auto == "SAME_UPPER" || auto == "SAME_LOWER" {
        for a in 0..r {
            let out = in_hw[a].div_ceil(strides[a].max(1));
            let eff = (kernel[a].max(1) - 1) * dil[a] + 1;
            let total = (out.saturating_sub(1) * strides[a] + eff).saturating_sub(in_hw[a]);
            let (b, e) = if auto == "SAME_UPPER" {
                (total / 2, total - total / 2)
            } else {
                (total - total / 2, total / 2)
            };
            pads[a] = b;
            pads[a + r] = e;
        }
    } else if auto == "VALID" {
        pads.iter_mut().for_each(|p| *p = 0);
    }
    (0..r)
        .map(|a| {
            if kernel[a] == 0 {
                return Err(Error::arg("kernel size 0"));
            }
            let o = conv_out(
                in_hw[a],
                kernel[a],
                strides[a],
                dil[a],
                pads[a],
                pads[a + r],
                ceil,
            )?;
            Ok([kernel[a], strides[a], dil[a], pads[a], pads[a + r], o])
        })
        .collect()
}

fn lower_node(
    lw: &mut Lower<'_>,
    node: &Node,
    id: usize,
    consumers: &[Vec<usize>],
    fused: &mut HashSet<usize>,
) -> Result<()> {
    let g = lw.g;
    let inp = |k: usize| node.inputs.get(k).copied().flatten();
    let out0 = node
        .outputs
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| Error::arg("node has no output"))?;
    // Fusable activation right after this node: its only consumer, not itself an output.
    let fuse = |lw: &Lower<'_>| -> Option<(usize, ValueId, (u32, f32, f32))> {
        if lw.outputs.contains_key(&out0) {
            return None;
        }
        let c = consumers.get(out0)?;
        if c.len() != 1 {
            return None;
        }
        let next = &g.nodes[c[0]];
        if next.inputs.first().copied().flatten() != Some(out0) {
            return None;
        }
        let a = activation(next, &lw.consts)?;
        let o = next.outputs.first().copied().flatten()?;
        Some((c[0], o, a))
    };
    match node.op.as_str() {
        "Constant" => {
            let t = constant_value(node)?;
            lw.consts.insert(out0, t);
        }
        "Conv" if lw.int_convs.contains_key(&id) => {
            let ic = lw.int_convs[&id].clone();
            fused.insert(ic.q_node);
            let o = ic
                .node
                .outputs
                .first()
                .copied()
                .flatten()
                .ok_or_else(|| Error::arg("no output"))?;
            lower_qmatmul(lw, &ic.node, o)?;
        }
        "DequantizeLinear" if lw.dq_skip.contains(&id) => {}
        "Conv" => {
            let x = lw.gpu(inp(0), "Conv input")?;
            let w = lw.gpu(inp(1), "Conv weight")?;
            let b = match inp(2) {
                Some(_) => Some(lw.gpu(inp(2), "Conv bias")?),
                None => None,
            };
            if x.shape.len() != 4 || w.shape.len() != 4 {
                return Err(Error::unsupported(format!(
                    "Conv: only 2-D convolution on vulkan (input {:?}, weight {:?})",
                    x.shape, w.shape
                )));
            }
            let (nb, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
            let (m, cg, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
            let groups = node.attr_i("group").unwrap_or(1);
            let groups = usize::try_from(groups)
                .ok()
                .filter(|&g| g > 0)
                .ok_or_else(|| Error::arg("group must be positive"))?;
            if c != cg * groups || m % groups != 0 {
                return Err(Error::arg(format!(
                    "input has {c} channels, weight {:?} with {groups} groups",
                    w.shape
                )));
            }
            if let Some(b) = &b {
                if numel(&b.shape) != m {
                    return Err(Error::arg(format!(
                        "bias {:?} for {m} output channels",
                        b.shape
                    )));
                }
            }
            if let Some(k) = node.attr_ints("kernel_shape") {
                if k != [kh as i64, kw as i64] {
                    return Err(Error::arg(format!(
                        "kernel_shape {k:?} does not match weight {:?}",
                        w.shape
                    )));
                }
            }
            let geo = geometry(node, &[h, wd], &[kh, kw], false)?;
            let (oh, ow) = (geo[0][5], geo[1][5]);
            let (act, target) = match fuse(lw) {
                Some((idx, o, a)) => {
                    fused.insert(idx);
                    (a, o)
                }
                None => ((ACT_NONE, 0.0, 0.0), out0),
            };
            let y = lw.place_for(target, vec![nb, m, oh, ow])?;
            let bias_place = b.as_ref().map(|b| b.place).unwrap_or(w.place);
            let bias_off = b.as_ref().map(|b| b.off).unwrap_or(0);
            let has_bias = b.is_some() as u32;
            let mg = m / groups;
            let total = nb * m * oh * ow;
            if total == 0 {
                // nothing to compute
            } else if cg == 1 {
                let p = vec![
                    u32_of(total, "elements")?,
                    x.off,
                    w.off,
                    bias_off,
                    y.off,
                    has_bias,
                    m as u32,
                    mg as u32,
                    h as u32,
                    wd as u32,
                    kh as u32,
                    kw as u32,
                    geo[0][1] as u32,
                    geo[1][1] as u32,
                    geo[0][3] as u32,
                    geo[1][3] as u32,
                    geo[0][2] as u32,
                    geo[1][2] as u32,
                    oh as u32,
                    ow as u32,
                    act.0,
                    f(act.1),
                    f(act.2),
                    c as u32,
                ];
                let gr = lw.groups_1d(total);
                lw.push(
                    Kernel::DwConv,
                    [
                        Some(x.place),
                        Some(w.place),
                        Some(bias_place),
                        Some(y.place),
                    ],
                    p,
                    gr,
                );
            } else {
                let k = cg * kh * kw;
                let (gx, gy) = lw.tune.gemm;
                let pointwise = groups == 1
                    && kh == 1
                    && kw == 1
                    && geo.iter().all(|a| a[1] == 1 && a[3] == 0 && a[4] == 0);
                let hw = oh * ow;
                let mut p = vec![0u32; 40];
                p[0] = u32_of(mg, "M")?;
                p[2] = u32_of(k, "K")?;
                p[3] = w.off;
                p[4] = k as u32; // a_sm
                p[5] = 1; // a_sk
                p[7] = x.off;
                p[11] = y.off;
                p[15] = bias_off;
                p[16] = 1; // bias per output channel
                p[19] = has_bias;
                p[20] = f(1.0);
                p[21] = f(1.0);
                p[22] = act.0;
                p[23] = f(act.1);
                p[24] = f(act.2);
                let (kernel, n, z);
                if pointwise {
                    // B = x[b] as [C, HW]; z runs over the batch.
                    kernel = Kernel::Gemm;
                    n = hw;
                    z = nb;
                    p[6] = 0;
                    p[8] = u32_of(hw, "HW")?;
                    p[9] = 1;
                    p[10] = u32_of(c * h * wd, "batch stride")?;
                    p[12] = hw as u32;
                    p[13] = 1;
                    p[14] = u32_of(m * hw, "batch stride")?;
                    p[18] = 0;
                } else {
                    kernel = Kernel::GemmConv;
                    n = nb * hw;
                    z = groups;
                    p[6] = u32_of(mg * k, "group stride")?;
                    p[18] = u32_of(mg, "bias group stride")?;
                    let conv = [
                        cg, h, wd, kh, kw, geo[0][1], geo[1][1], geo[0][3], geo[1][3], geo[0][2],
                        geo[1][2], oh, ow, c, m,
                    ];
                    for (i, v) in conv.iter().enumerate() {
                        p[25 + i] = u32_of(*v, "conv parameter")?;
                    }
                }
                p[1] = u32_of(n, "N")?;
                let groups_xyz = [
                    u32_of(n.div_ceil(4 * gx as usize), "groups")?,
                    u32_of(mg.div_ceil(4 * gy as usize), "groups")?,
                    u32_of(z, "groups")?,
                ];
                lw.push(
                    kernel,
                    [
                        Some(w.place),
                        Some(x.place),
                        Some(bias_place),
                        Some(y.place),
                    ],
                    p,
                    groups_xyz,
                );
            }
            lw.vals.insert(target, y);
        }
        "Gemm" | "MatMul" => {
            let a = lw.gpu(inp(0), "A")?;
            let b = lw.gpu(inp(1), "B")?;
            let gemm = node.op == "Gemm";
            let (mut ash, mut bsh) = (a.shape.clone(), b.shape.clone());
            let (ta, tb) = if gemm {
                if ash.len() != 2 || bsh.len() != 2 {
                    return Err(Error::arg(format!(
                        "Gemm needs 2-D inputs, got {ash:?} and {bsh:?}"
                    )));
                }
                (
                    node.attr_i("transA").unwrap_or(0) != 0,
                    node.attr_i("transB").unwrap_or(0) != 0,
                )
            } else {
                (false, false)
            };
            let a1 = ash.len() == 1;
            let b1 = bsh.len() == 1;
            if a1 {
                ash.insert(0, 1);
            }
            if b1 {
                bsh.push(1);
            }
            if ash.is_empty() || bsh.is_empty() {
                return Err(Error::arg("MatMul of scalars"));
            }
            let ra = ash.len();
            let rb = bsh.len();
            let (m, ka) = if ta {
                (ash[ra - 1], ash[ra - 2])
            } else {
                (ash[ra - 2], ash[ra - 1])
            };
            let (kb, n) = if tb {
                (bsh[rb - 1], bsh[rb - 2])
            } else {
                (bsh[rb - 2], bsh[rb - 1])
            };
            if ka != kb {
                return Err(Error::arg(format!(
                    "inner dimensions differ: {:?} x {:?}",
                    a.shape, b.shape
                )));
            }
            let batch_a = &ash[..ra - 2];
            let batch_b = &bsh[..rb - 2];
            let za = numel(batch_a);
            let zb = numel(batch_b);
            let batch: Vec<usize> = if za == 1 && zb == 1 {
                if batch_a.len() >= batch_b.len() {
                    batch_a.to_vec()
                } else {
                    batch_b.to_vec()
                }
            } else if za == 1 {
                batch_b.to_vec()
            } else if zb == 1 || batch_a == batch_b {
                batch_a.to_vec()
            } else {
                return Err(Error::unsupported(format!(
                    "MatMul batch broadcasting {batch_a:?} x {batch_b:?} on vulkan"
                )));
            };
            let z = numel(&batch).max(1);
            let mut out_shape = batch.clone();
            if !a1 {
                out_shape.push(m);
            }
            if !b1 {
                out_shape.push(n);
            }
            let (act, target) = match fuse(lw) {
                Some((idx, o, a)) => {
                    fused.insert(idx);
                    (a, o)
                }
                None => ((ACT_NONE, 0.0, 0.0), out0),
            };
            let y = lw.place_for(target, out_shape)?;
            let mut p = vec![0u32; 40];
            p[0] = u32_of(m, "M")?;
            p[1] = u32_of(n, "N")?;
            p[2] = u32_of(ka, "K")?;
            p[3] = a.off;
            // A stored [.., rows, cols] row-major.
            let acols = ash[ra - 1];
            let (a_sm, a_sk) = if ta { (1, acols) } else { (acols, 1) };
            p[4] = u32_of(a_sm, "stride")?;
            p[5] = u32_of(a_sk, "stride")?;
            p[6] = if za == 1 {
                0
            } else {
                u32_of(m * ka, "stride")?
            };
            p[7] = b.off;
            let bcols = bsh[rb - 1];
            let (b_sk, b_sn) = if tb { (1, bcols) } else { (bcols, 1) };
            p[8] = u32_of(b_sk, "stride")?;
            p[9] = u32_of(b_sn, "stride")?;
            p[10] = if zb == 1 {
                0
            } else {
                u32_of(ka * n, "stride")?
            };
            p[11] = y.off;
            p[12] = u32_of(n, "stride")?;
            p[13] = 1;
            p[14] = u32_of(m * n, "stride")?;
            let alpha = if gemm {
                node.attr_f("alpha").unwrap_or(1.0)
            } else {
                1.0
            };
            let beta = if gemm {
                node.attr_f("beta").unwrap_or(1.0)
            } else {
                1.0
            };
            p[20] = f(alpha);
            p[21] = f(beta);
            p[22] = act.0;
            p[23] = f(act.1);
            p[24] = f(act.2);
            let mut bias_place = a.place;
            if gemm {
                if let Some(cv) = inp(2) {
                    let cb = lw.gpu(Some(cv), "Gemm C")?;
                    let cs = &cb.shape;
                    if broadcast_shapes(cs, &[m, n]).ok().as_deref() != Some(&[m, n][..]) {
                        return Err(Error::arg(format!(
                            "C {cs:?} does not broadcast to [{m}, {n}]"
                        )));
                    }
                    let (sm, sn) = match cs.len() {
                        0 => (0, 0),
                        1 => (0, if cs[0] == 1 { 0 } else { 1 }),
                        _ => (
                            if cs[0] == 1 { 0 } else { cs[1] },
                            if cs[1] == 1 { 0 } else { 1 },
                        ),
                    };
                    p[15] = cb.off;
                    p[16] = u32_of(sm, "stride")?;
                    p[17] = u32_of(sn, "stride")?;
                    p[19] = 1;
                    bias_place = cb.place;
                }
            }
            if m * n * z > 0 {
                let (gx, gy) = lw.tune.gemm;
                let gr = [
                    u32_of(n.div_ceil(4 * gx as usize), "groups")?,
                    u32_of(m.div_ceil(4 * gy as usize), "groups")?,
                    u32_of(z, "groups")?,
                ];
                lw.push(
                    Kernel::Gemm,
                    [
                        Some(a.place),
                        Some(b.place),
                        Some(bias_place),
                        Some(y.place),
                    ],
                    p,
                    gr,
                );
            }
            lw.vals.insert(target, y);
        }
        "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" => {
            if node.outputs.get(1).copied().flatten().is_some() {
                return Err(Error::unsupported("MaxPool Indices output on vulkan"));
            }
            let x = lw.gpu(inp(0), "input")?;
            if x.shape.len() != 4 {
                return Err(Error::unsupported(format!(
                    "{}: only 2-D pooling on vulkan (input {:?})",
                    node.op, x.shape
                )));
            }
            let (h, wd) = (x.shape[2], x.shape[3]);
            let global = node.op.starts_with("Global");
            let geo = if global {
                vec![[h, 1, 1, 0, 0, 1], [wd, 1, 1, 0, 0, 1]]
            } else {
                let k: Vec<usize> = node
                    .attr_ints("kernel_shape")
                    .ok_or_else(|| Error::arg("kernel_shape is required"))?
                    .iter()
                    .map(|&v| usize::try_from(v).map_err(|_| Error::arg("negative kernel size")))
                    .collect::<Result<_>>()?;
                geometry(
                    node,
                    &[h, wd],
                    &k,
                    node.attr_i("ceil_mode").unwrap_or(0) != 0,
                )?
            };
            let mode = if node.op.contains("Max") {
                0
            } else if node.attr_i("count_include_pad").unwrap_or(0) != 0 {
                2
            } else {
                1
            };
            let shape = vec![x.shape[0], x.shape[1], geo[0][5], geo[1][5]];
            let y = lw.place_for(out0, shape.clone())?;
            let total = numel(&shape);
            if total > 0 {
                let mut p = vec![
                    u32_of(total, "elements")?,
                    x.off,
                    y.off,
                    h as u32,
                    wd as u32,
                    geo[0][5] as u32,
                    geo[1][5] as u32,
                ];
                p.extend(
                    [
                        geo[0][0], geo[1][0], geo[0][1], geo[1][1], geo[0][3], geo[1][3],
                        geo[0][2], geo[1][2],
                    ]
                    .iter()
                    .map(|&v| v as u32),
                );
                p.push(mode);
                let gr = lw.groups_1d(total);
                lw.push(
                    Kernel::Pool,
                    [Some(x.place), Some(y.place), None, None],
                    p,
                    gr,
                );
            }
            lw.vals.insert(out0, y);
        }
        "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" | "Pow" | "PRelu" => {
            if node.inputs.len() != 2 {
                return Err(Error::unsupported(format!(
                    "{} with {} inputs on vulkan",
                    node.op,
                    node.inputs.len()
                )));
            }
            let a = lw.gpu(inp(0), "A")?;
            let b = lw.gpu(inp(1), "B")?;
            let mut bsh = b.shape.clone();
            if node.op == "PRelu"
                && bsh.len() == 1
                && a.shape.len() >= 2
                && bsh[0] == a.shape[1]
                && a.shape.len() > 2
            {
                // Per-channel slope given as [C] (older exporters): broadcast over channels.
                bsh.extend(std::iter::repeat_n(1, a.shape.len() - 2));
            }
            let out = broadcast_shapes(&a.shape, &bsh)?;
            if out.len() > 6 {
                return Err(Error::unsupported(
                    "broadcasting over more than 6 dims on vulkan",
                ));
            }
            let op = match node.op.as_str() {
                "Add" => 0,
                "Sub" => 1,
                "Mul" => 2,
                "Div" => 3,
                "Max" => 4,
                "Min" => 5,
                "Pow" => 6,
                _ => 7,
            };
            let (act, target) = match fuse(lw) {
                Some((idx, o, a)) => {
                    fused.insert(idx);
                    (a, o)
                }
                None => ((ACT_NONE, 0.0, 0.0), out0),
            };
            let y = lw.place_for(target, out.clone())?;
            let b = GVal { shape: bsh, ..b };
            lw.binary(&a, &b, &y, op, act)?;
            lw.vals.insert(target, y);
        }
        "BatchNormalization" => lower_batchnorm(lw, node, out0, &fuse, fused)?,
        "MatMulInteger" | "QLinearMatMul" | "ConvInteger" | "QLinearConv" => {
            lower_qmatmul(lw, node, out0)?
        }
        "Cast" => {
            let to = node.attr_i("to").unwrap_or(0);
            let xv = inp(0).ok_or_else(|| Error::arg("Cast: input is missing"))?;
            if let Some(t) = lw.consts.get(&xv) {
                let dt = i32::try_from(to)
                    .ok()
                    .and_then(DType::from_onnx_code)
                    .ok_or_else(|| Error::unsupported(format!("Cast to type {to}")))?;
                let t = t.cast(dt)?;
                lw.consts.insert(out0, t);
                return Ok(());
            }
            if to != 1 {
                return Err(Error::unsupported(
                    "Cast of a runtime tensor to a non-float type on vulkan",
                ));
            }
            // Integers are held exactly in float32 on the device: a cast to float is an alias.
            let x = lw.gpu(Some(xv), "input")?;
            if lw.outputs.contains_key(&out0) {
                let y = lw.place_for(out0, x.shape.clone())?;
                lw.contiguous_copy(&x, &y)?;
                lw.vals.insert(out0, y);
            } else {
                if x.place == Place::Arena {
                    lw.track(out0, x.off, 0);
                }
                lw.vals.insert(out0, x);
            }
        }
        "QuantizeLinear" | "DequantizeLinear" => lower_quant(lw, node, out0, consumers, fused)?,
        "Relu" | "Clip" | "HardSwish" | "Sigmoid" | "LeakyRelu" | "Tanh" | "HardSigmoid"
        | "Exp" | "Neg" | "Abs" | "Sqrt" | "Log" | "Reciprocal" | "Floor" | "Ceil" | "Elu" => {
            let x = lw.gpu(inp(0), "input")?;
            let (op, a, b) = match activation(node, &lw.consts) {
                Some(v) => v,
                None => match node.op.as_str() {
                    "Clip" => {
                        let (lo, hi) = clip_bounds(node, &lw.consts)?;
                        (2, lo, hi)
                    }
                    "Exp" => (8, 0.0, 0.0),
                    "Neg" => (9, 0.0, 0.0),
                    "Abs" => (10, 0.0, 0.0),
                    "Sqrt" => (11, 0.0, 0.0),
                    "Log" => (12, 0.0, 0.0),
                    "Reciprocal" => (13, 0.0, 0.0),
                    "Floor" => (14, 0.0, 0.0),
                    "Ceil" => (15, 0.0, 0.0),
                    _ => (16, node.attr_f("alpha").unwrap_or(1.0), 0.0),
                },
            };
            let y = lw.place_for(out0, x.shape.clone())?;
            lw.unary(&x, &y, op, a, b)?;
            lw.vals.insert(out0, y);
        }
        "Identity" | "Dropout" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
            if node.op == "Dropout" && node.outputs.get(1).copied().flatten().is_some() {
                return Err(Error::unsupported("Dropout mask output on vulkan"));
            }
            if let Some(t) = inp(0).and_then(|v| lw.consts.get(&v)) {
                if t.dtype() != DType::F32 || !lw.outputs.contains_key(&out0) {
                    // Shape-only constant arithmetic stays on the host.
                    let s = alias_shape(node, t.shape(), &lw.consts)?;
                    let t = t.reshape(s)?;
                    lw.consts.insert(out0, t);
                    return Ok(());
                }
            }
            let x = lw.gpu(inp(0), "input")?;
            let shape = alias_shape(node, &x.shape, &lw.consts)?;
            if numel(&shape) != numel(&x.shape) {
                return Err(Error::arg(format!(
                    "cannot reshape {:?} to {shape:?}",
                    x.shape
                )));
            }
            if lw.outputs.contains_key(&out0) {
                let y = lw.place_for(out0, shape)?;
                lw.contiguous_copy(&x, &y)?;
                lw.vals.insert(out0, y);
            } else {
                if x.place == Place::Arena {
                    // The alias keeps the block alive until its own last reader.
                    lw.track(out0, x.off, 0);
                }
                lw.vals.insert(out0, GVal { shape, ..x });
            }
        }
        "Softmax" | "LogSoftmax" => {
            let x = lw.gpu(inp(0), "input")?;
            let r = x.shape.len();
            let opset = if g.opset() == 0 { 21 } else { g.opset() };
            let axis = norm_axis(
                node.attr_i("axis")
                    .unwrap_or(if opset >= 13 { -1 } else { 1 }),
                r,
                "axis",
            )?;
            let outer = numel(&x.shape[..axis]);
            let (len, inner) = if opset >= 13 {
                (x.shape[axis], numel(&x.shape[axis + 1..]))
            } else {
                (numel(&x.shape[axis..]), 1)
            };
            let y = lw.place_for(out0, x.shape.clone())?;
            let rows = outer * inner;
            if rows * len > 0 {
                let p = vec![
                    u32_of(rows, "rows")?,
                    u32_of(len, "len")?,
                    u32_of(inner, "inner")?,
                    x.off,
                    y.off,
                    (node.op == "LogSoftmax") as u32,
                ];
                let gr = lw.groups_1d(rows);
                lw.push(
                    Kernel::Softmax,
                    [Some(x.place), Some(y.place), None, None],
                    p,
                    gr,
                );
            }
            lw.vals.insert(out0, y);
        }
        "Transpose" => {
            let x = lw.gpu(inp(0), "input")?;
            let r = x.shape.len();
            let perm: Vec<usize> = match node.attr_ints("perm") {
                Some(p) => p
                    .iter()
                    .map(|&a| norm_axis(a, r, "perm"))
                    .collect::<Result<_>>()?,
                None => (0..r).rev().collect(),
            };
            let mut seen = vec![false; r];
            for &p in &perm {
                if p >= r || std::mem::replace(&mut seen[p], true) {
                    return Err(Error::arg(format!(
                        "perm {perm:?} is not a permutation of {r} axes"
                    )));
                }
            }
            if perm.len() != r {
                return Err(Error::arg(format!("perm {perm:?} for rank {r}")));
            }
            let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
            let xs = strides(&x.shape);
            let ss: Vec<i64> = perm.iter().map(|&p| xs[p] as i64).collect();
            let ds: Vec<i64> = strides(&shape).iter().map(|&v| v as i64).collect();
            let y = lw.place_for(out0, shape.clone())?;
            lw.copy(&x, &ss, &y, y.off, &ds, &shape)?;
            lw.vals.insert(out0, y);
        }
        "Concat" => {
            let ins: Vec<GVal> = (0..node.inputs.len())
                .map(|k| lw.gpu(inp(k), "input"))
                .collect::<Result<_>>()?;
            let first = ins.first().ok_or_else(|| Error::arg("Concat of nothing"))?;
            let r = first.shape.len();
            let axis = norm_axis(
                node.attr_i("axis")
                    .ok_or_else(|| Error::arg("axis is required"))?,
                r,
                "axis",
            )?;
            let mut shape = first.shape.clone();
            shape[axis] = 0;
            for x in &ins {
                if x.shape.len() != r || (0..r).any(|d| d != axis && x.shape[d] != first.shape[d]) {
                    return Err(Error::arg(format!(
                        "inputs {:?} and {:?} do not concatenate on axis {axis}",
                        first.shape, x.shape
                    )));
                }
                shape[axis] += x.shape[axis];
            }
            let y = lw.place_for(out0, shape.clone())?;
            let ds: Vec<i64> = strides(&shape).iter().map(|&v| v as i64).collect();
            let mut at = 0usize;
            for x in &ins {
                let ss: Vec<i64> = strides(&x.shape).iter().map(|&v| v as i64).collect();
                let off = y.off as usize + at * ds[axis] as usize;
                lw.copy(x, &ss, &y, u32_of(off, "offset")?, &ds, &x.shape)?;
                at += x.shape[axis];
            }
            lw.vals.insert(out0, y);
        }
        "Pad" => {
            let x = lw.gpu(inp(0), "input")?;
            let r = x.shape.len();
            let mode = node.attr_s("mode").unwrap_or_else(|| "constant".into());
            if mode != "constant" {
                return Err(Error::unsupported(format!("Pad mode '{mode}' on vulkan")));
            }
            let pads = match node.attr_ints("pads") {
                Some(p) => p.to_vec(),
                None => const_ints(&lw.consts, inp(1), "pads")?,
            };
            let value = match inp(2) {
                Some(v) => scalar_f32(
                    lw.consts
                        .get(&v)
                        .ok_or_else(|| Error::unsupported("Pad value must be a constant"))?,
                    "Pad value",
                )?,
                None => node.attr_f("value").unwrap_or(0.0),
            };
            let axes: Vec<usize> = match inp(3) {
                Some(_) => const_ints(&lw.consts, inp(3), "axes")?
                    .iter()
                    .map(|&a| norm_axis(a, r, "axes"))
                    .collect::<Result<_>>()?,
                None => (0..r).collect(),
            };
            if pads.len() != 2 * axes.len() {
                return Err(Error::arg(format!(
                    "{} pads for {} axes",
                    pads.len(),
                    axes.len()
                )));
            }
            let mut begin = vec![0i64; r];
            let mut end = vec![0i64; r];
            for (i, &a) in axes.iter().enumerate() {
                begin[a] = pads[i];
                end[a] = pads[i + axes.len()];
            }
            let mut shape = Vec::with_capacity(r);
            for d in 0..r {
                let s = (x.shape[d] as i64)
                    .saturating_add(begin[d])
                    .saturating_add(end[d]);
                if s < 0 {
                    return Err(Error::arg(format!("pads {pads:?} make axis {d} negative")));
                }
                shape.push(s as usize);
            }
            let y = lw.place_for(out0, shape.clone())?;
            let n = numel(&shape);
            if n > 0 {
                let p = vec![u32_of(n, "elements")?, y.off, f(value)];
                let gr = lw.groups_1d(n);
                lw.push(Kernel::Fill, [Some(y.place), None, None, None], p, gr);
                // Copy the kept box (negative pads crop).
                let xs = strides(&x.shape);
                let ys = strides(&shape);
                let mut src_off = x.off as i64;
                let mut dst_off = y.off as i64;
                let mut box_ = Vec::with_capacity(r);
                for d in 0..r {
                    let lo = begin[d].saturating_neg().max(0);
                    let hi = (x.shape[d] as i64 - end[d].saturating_neg().max(0)).max(lo);
                    box_.push((hi - lo) as usize);
                    src_off += lo * xs[d] as i64;
                    dst_off += begin[d].max(0) * ys[d] as i64;
                }
                let src = GVal {
                    off: u32_of(src_off as usize, "offset")?,
                    ..x.clone()
                };
                let ss: Vec<i64> = xs.iter().map(|&v| v as i64).collect();
                let ds: Vec<i64> = ys.iter().map(|&v| v as i64).collect();
                lw.copy(
                    &src,
                    &ss,
                    &y,
                    u32_of(dst_off as usize, "offset")?,
                    &ds,
                    &box_,
                )?;
            }
            lw.vals.insert(out0, y);
        }
        "Slice" => {
            let x = lw.gpu(inp(0), "input")?;
            let r = x.shape.len();
            let starts = const_ints(&lw.consts, inp(1), "starts")?;
            let ends = const_ints(&lw.consts, inp(2), "ends")?;
            let axes: Vec<usize> = match inp(3) {
                Some(_) => const_ints(&lw.consts, inp(3), "axes")?
                    .iter()
                    .map(|&a| norm_axis(a, r, "axes"))
                    .collect::<Result<_>>()?,
                None => (0..starts.len()).collect(),
            };
            let steps = match inp(4) {
                Some(_) => const_ints(&lw.consts, inp(4), "steps")?,
                None => vec![1; starts.len()],
            };
            if starts.len() != ends.len()
                || axes.len() != starts.len()
                || steps.len() != starts.len()
            {
                return Err(Error::arg("starts/ends/axes/steps lengths differ"));
            }
            let xs = strides(&x.shape);
            let mut shape = x.shape.clone();
            let mut ss: Vec<i64> = xs.iter().map(|&v| v as i64).collect();
            let mut off = x.off as i64;
            for i in 0..axes.len() {
                let a = axes[i];
                let dim = x.shape[a] as i64;
                let step = steps[i];
                if step == 0 || step == i64::MIN {
                    return Err(Error::arg(format!("Slice step {step}")));
                }
                let clampi = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
                let norm = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
                let (s, e) = if step > 0 {
                    (
                        clampi(norm(starts[i]), 0, dim),
                        clampi(norm(ends[i]), 0, dim),
                    )
                } else {
                    (
                        clampi(norm(starts[i]), -1, dim - 1),
                        clampi(norm(ends[i]), -1, dim - 1),
                    )
                };
                let len = if step > 0 {
                    if e > s {
                        (e - s + step - 1) / step
                    } else {
                        0
                    }
                } else if s > e {
                    (s - e + (-step) - 1) / (-step)
                } else {
                    0
                };
                shape[a] = len as usize;
                if len > 0 {
                    off += s * xs[a] as i64;
                }
                ss[a] = xs[a] as i64 * step;
            }
            let y = lw.place_for(out0, shape.clone())?;
            let src = GVal {
                off: u32_of(off.max(0) as usize, "offset")?,
                ..x.clone()
            };
            let ds: Vec<i64> = strides(&shape).iter().map(|&v| v as i64).collect();
            lw.copy(&src, &ss, &y, y.off, &ds, &shape)?;
            lw.vals.insert(out0, y);
        }
        "Resize" => {
            let x = lw.gpu(inp(0), "input")?;
            let r = x.shape.len();
            let mode = node.attr_s("mode").unwrap_or_else(|| "nearest".into());
            let linear = match mode.as_str() {
                "nearest" => 0u32,
                "linear" => 1,
                _ => {
                    return Err(Error::unsupported(format!(
                        "Resize mode '{mode}' on vulkan (nearest and linear only)"
                    )))
                }
            };
            if node.attr_i("antialias").unwrap_or(0) != 0 {
                return Err(Error::unsupported("Resize with antialias on vulkan"));
            }
            if r > 6 {
                return Err(Error::unsupported("Resize of rank > 6"));
            }
            // Opset 11+: (X, roi, scales, sizes); opset 10: (X, scales).
            let (scales_in, sizes_in) = if node.inputs.len() == 2 {
                (inp(1), None)
            } else {
                (inp(2), inp(3))
            };
            let scales: Option<Vec<f32>> = match scales_in.and_then(|v| lw.consts.get(&v)) {
                Some(t) if !t.is_empty() => Some(t.to_f32().to_vec()),
                _ => None,
            };
            let sizes = match sizes_in {
                Some(_) => Some(const_ints(&lw.consts, sizes_in, "sizes")?),
                None => None,
            };
            if scales_in.is_some() && !scales_in.is_some_and(|v| lw.consts.contains_key(&v)) {
                return Err(Error::unsupported(
                    "Resize scales must be constants on vulkan",
                ));
            }
            if node.attr_ints("axes").is_some() {
                return Err(Error::unsupported("Resize with axes on vulkan"));
            }
            let (shape, sc): (Vec<usize>, Vec<f32>) =
                if let Some(s) = sizes.filter(|s| !s.is_empty()) {
                    if s.len() != r {
                        return Err(Error::arg(format!("sizes {s:?} for rank {r}")));
                    }
                    let sh: Vec<usize> = s
                        .iter()
                        .map(|&v| usize::try_from(v).map_err(|_| Error::arg("negative size")))
                        .collect::<Result<_>>()?;
                    let sc = sh
                        .iter()
                        .zip(&x.shape)
                        .map(|(&o, &i)| if i == 0 { 1.0 } else { o as f32 / i as f32 })
                        .collect();
                    (sh, sc)
                } else if let Some(s) = scales {
                    if s.len() != r || s.iter().any(|&v| v.is_nan() || v <= 0.0 || !v.is_finite()) {
                        return Err(Error::arg(format!("scales {s:?} for rank {r}")));
                    }
                    let sh = x
                        .shape
                        .iter()
                        .zip(&s)
                        .map(|(&i, &k)| (i as f32 * k).floor() as usize)
                        .collect();
                    (sh, s)
                } else {
                    return Err(Error::arg("Resize needs scales or sizes"));
                };
            let ctm = match node
                .attr_s("coordinate_transformation_mode")
                .as_deref()
                .unwrap_or("half_pixel")
            {
                "half_pixel" => 0,
                "asymmetric" => 1,
                "align_corners" => 2,
                "pytorch_half_pixel" => 3,
                "tf_half_pixel_for_nn" => 4,
                "half_pixel_symmetric" => 5,
                other => {
                    return Err(Error::unsupported(format!(
                        "coordinate_transformation_mode '{other}' on vulkan"
                    )))
                }
            };
            let nm = match node
                .attr_s("nearest_mode")
                .as_deref()
                .unwrap_or("round_prefer_floor")
            {
                "round_prefer_floor" => 0,
                "round_prefer_ceil" => 1,
                "floor" => 2,
                "ceil" => 3,
                other => return Err(Error::unsupported(format!("nearest_mode '{other}'"))),
            };
            let y = lw.place_for(out0, shape.clone())?;
            let n = numel(&shape);
            if n > 0 && numel(&x.shape) > 0 {
                let mut p = vec![u32_of(n, "elements")?, r as u32, x.off, y.off, ctm, nm];
                let mut ish = vec![1u32; 6];
                let mut osh = vec![1u32; 6];
                let mut scs = vec![f(1.0); 6];
                for d in 0..r {
                    ish[d] = x.shape[d] as u32;
                    osh[d] = shape[d] as u32;
                    scs[d] = f(sc[d]);
                }
                p.extend(ish);
                p.extend(osh);
                p.extend(scs);
                p.push(linear);
                let gr = lw.groups_1d(n);
                lw.push(
                    Kernel::Resize,
                    [Some(x.place), Some(y.place), None, None],
                    p,
                    gr,
                );
            }
            lw.vals.insert(out0, y);
        }
        other => {
            return Err(Error::unsupported(format!(
                "op {other} is not implemented on vulkan"
            )));
        }
    }
    Ok(())
}

/// Per-tensor quantization parameters of a device-side Quantize/DequantizeLinear.
struct QParams {
    scale: f32,
    zp: i64,
    /// Saturation range of the quantized type.
    lo: i64,
    hi: i64,
}

fn qrange(dt: DType) -> Result<(i64, i64)> {
    Ok(match dt {
        DType::I8 => (-128, 127),
        DType::U8 => (0, 255),
        DType::I16 => (-32768, 32767),
        DType::U16 => (0, 65535),
        other => {
            return Err(Error::unsupported(format!(
                "quantized type {other} on vulkan (int8/uint8/int16/uint16)"
            )))
        }
    })
}

/// The quantized type of a QuantizeLinear: its zero point's, else `output_dtype`, else uint8.
fn q_dtype(node: &Node, zp: Option<&Tensor>) -> Result<DType> {
    if let Some(z) = zp {
        return Ok(z.dtype());
    }
    match node.attr_i("output_dtype").unwrap_or(0) {
        0 => Ok(DType::U8),
        c => i32::try_from(c)
            .ok()
            .and_then(DType::from_onnx_code)
            .ok_or_else(|| Error::unsupported(format!("QuantizeLinear: output_dtype {c}"))),
    }
}

/// Quantize/DequantizeLinear of a constant, on the host (the CPU driver's arithmetic:
/// `round_half_even(x / scale) + zp` saturated; `(q - zp) * scale`), per tensor or per axis.
fn fold_quant(node: &Node, x: &Tensor, scale: &Tensor, zp: Option<&Tensor>) -> Result<Tensor> {
    let is_q = node.op == "QuantizeLinear";
    if node.attr_i("block_size").is_some_and(|b| b != 0) {
        return Err(Error::unsupported(format!(
            "{}: blocked quantization on vulkan",
            node.op
        )));
    }
    let shape = x.shape().to_vec();
    let sv = scale.to_f32();
    let zv = match zp {
        Some(z) => z.to_i64_vec(),
        None => vec![0; sv.len()],
    };
    if zv.len() != sv.len() || sv.is_empty() {
        return Err(Error::arg(format!(
            "{}: {} scales and {} zero points",
            node.op,
            sv.len(),
            zv.len()
        )));
    }
    let layout = if sv.len() == 1 && scale.shape().len() <= 1 {
        None
    } else {
        if scale.shape().len() != 1 {
            return Err(Error::unsupported(format!(
                "{}: scale of shape {:?} (blocked) on vulkan",
                node.op,
                scale.shape()
            )));
        }
        let r = shape.len() as i64;
        let mut ax = node.attr_i("axis").unwrap_or(1);
        if ax < 0 {
            ax += r;
        }
        if ax < 0 || ax >= r {
            return Err(Error::arg(format!("{}: axis out of range", node.op)));
        }
        let ax = ax as usize;
        if shape[ax] != sv.len() {
            return Err(Error::arg(format!(
                "{}: {} scales for axis {ax} of {:?}",
                node.op,
                sv.len(),
                shape
            )));
        }
        Some((shape[ax], numel(&shape[ax + 1..])))
    };
    let k = |i: usize| layout.map_or(0, |(n, inner)| (i / inner.max(1)) % n);
    if !is_q {
        let xv = x.to_i64_vec();
        let out: Vec<f32> = xv
            .iter()
            .enumerate()
            .map(|(i, &v)| (v - zv[k(i)]) as f32 * sv[k(i)])
            .collect();
        return Tensor::from_vec(shape, out);
    }
    let dt = q_dtype(node, zp)?;
    let (lo, hi) = qrange(dt)?;
    let xv = x.to_f32();
    let q: Vec<i64> = xv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let r = (v / sv[k(i)]).round_ties_even() as i64;
            r.saturating_add(zv[k(i)]).clamp(lo, hi)
        })
        .collect();
    match dt {
        DType::I8 => Tensor::from_vec(shape, q.iter().map(|&v| v as i8).collect::<Vec<_>>()),
        DType::U8 => Tensor::from_vec(shape, q.iter().map(|&v| v as u8).collect::<Vec<_>>()),
        DType::I16 => Tensor::from_vec(shape, q.iter().map(|&v| v as i16).collect::<Vec<_>>()),
        _ => Tensor::from_vec(shape, q.iter().map(|&v| v as u16).collect::<Vec<_>>()),
    }
}

/// QuantizeLinear / DequantizeLinear. Constants are folded on the host (weights and biases
/// of QDQ models); runtime tensors run on the device with per-tensor parameters, the
/// quantized integers held exactly in float32, and a Quantize followed only by a matching
/// Dequantize fused into one dispatch (the dequantize-compute-quantize path: the float
/// kernels compute between them).
fn lower_quant(
    lw: &mut Lower<'_>,
    node: &Node,
    out0: ValueId,
    consumers: &[Vec<usize>],
    fused: &mut HashSet<usize>,
) -> Result<()> {
    let g = lw.g;
    let inp = |k: usize| node.inputs.get(k).copied().flatten();
    let konst = |lw: &Lower<'_>, k: usize, what: &str| -> Result<Option<Tensor>> {
        match inp(k) {
            None => Ok(None),
            Some(v) => lw.consts.get(&v).cloned().map(Some).ok_or_else(|| {
                Error::unsupported(format!("{}: {what} must be a constant on vulkan", node.op))
            }),
        }
    };
    let scale = konst(lw, 1, "scale")?
        .ok_or_else(|| Error::arg(format!("{}: scale is missing", node.op)))?;
    let zp = konst(lw, 2, "zero point")?;
    let xv = inp(0).ok_or_else(|| Error::arg(format!("{}: input is missing", node.op)))?;
    if let Some(x) = lw.consts.get(&xv).cloned() {
        let t = fold_quant(node, &x, &scale, zp.as_ref())?;
        lw.consts.insert(out0, t);
        return Ok(());
    }
    if scale.len() != 1 || zp.as_ref().is_some_and(|z| z.len() != 1) {
        return Err(Error::unsupported(format!(
            "{}: per-axis parameters on a runtime tensor on vulkan",
            node.op
        )));
    }
    let s = scale.to_f32()[0];
    if !(s.is_finite() && s > 0.0) {
        return Err(Error::arg(format!(
            "{}: scale {s} is not positive",
            node.op
        )));
    }
    let z = zp.as_ref().map_or(0, |t| t.to_i64_vec()[0]);
    let x = lw.gpu(Some(xv), "input")?;
    if node.op == "DequantizeLinear" {
        let y = lw.place_for(out0, x.shape.clone())?;
        let q = QParams {
            scale: s,
            zp: z,
            lo: 0,
            hi: 0,
        };
        lw.quant(&x, &y, 18, &q)?;
        lw.vals.insert(out0, y);
        return Ok(());
    }
    if lw.outputs.contains_key(&out0) {
        return Err(Error::unsupported(
            "QuantizeLinear output as a graph output (vulkan holds quantized values as float32)",
        ));
    }
    let (lo, hi) = qrange(q_dtype(node, zp.as_ref())?)?;
    let q = QParams {
        scale: s,
        zp: z,
        lo,
        hi,
    };
    // Q followed only by a DQ with the same parameters: one fake-quant dispatch.
    if let Some(c) = consumers.get(out0).filter(|c| c.len() == 1) {
        let next = &g.nodes[c[0]];
        let same = |k: usize, want: f64| {
            next.inputs
                .get(k)
                .copied()
                .flatten()
                .and_then(|v| lw.consts.get(&v))
                .map(|t| t.len() == 1 && t.to_f32()[0] as f64 == want)
        };
        let zp_same = match next.inputs.get(2).copied().flatten() {
            None => Some(z == 0),
            Some(_) => same(2, z as f64),
        };
        if next.op == "DequantizeLinear"
            && !lw.dq_int.contains(&c[0])
            && next.inputs.first().copied().flatten() == Some(out0)
            && same(1, s as f64) == Some(true)
            && zp_same == Some(true)
        {
            if let Some(o) = next.outputs.first().copied().flatten() {
                fused.insert(c[0]);
                let y = lw.place_for(o, x.shape.clone())?;
                lw.quant(&x, &y, 19, &q)?;
                lw.vals.insert(o, y);
                return Ok(());
            }
        }
    }
    let y = lw.place_for(out0, x.shape.clone())?;
    lw.quant(&x, &y, 17, &q)?;
    lw.vals.insert(out0, y);
    Ok(())
}

/// MatMulInteger / QLinearMatMul (constant 8-bit B `[K, N]`, A `[..., M, K]` from the
/// device) and ConvInteger / QLinearConv (2-D, constant weight `[Cout, Cin/G, kh, kw]`, groups,
/// strides, pads, dilations; im2col on the fly) on the integer GEMM kernel. B is packed on the
/// host four lanes a word, column by column (a column = an output channel), followed by
/// per-column zero points, requantization multipliers (the CPU driver's `f32(sa * sb) / sy`)
/// and int32 biases. A's zero point and the output's parameters are per tensor.
fn lower_qmatmul(lw: &mut Lower<'_>, node: &Node, out0: ValueId) -> Result<()> {
    let g = lw.g;
    let op = node.op.as_str();
    let ql = op == "QLinearMatMul" || op == "QLinearConv";
    let conv = op == "ConvInteger" || op == "QLinearConv";
    let inp = |k: usize| node.inputs.get(k).copied().flatten();
    // Operand indices: (A, a_zp, B, b_zp) and for the QLinear ops the scales.
    let (ia, iaz, ib, ibz) = if ql { (0, 2, 3, 5) } else { (0, 2, 1, 3) };
    let konst = |lw: &Lower<'_>, k: usize| -> Result<Option<Tensor>> {
        match inp(k) {
            None => Ok(None),
            Some(v) => lw.consts.get(&v).cloned().map(Some).ok_or_else(|| {
                Error::unsupported(format!("{op}: input {k} must be a constant on vulkan"))
            }),
        }
    };
    let b =
        konst(lw, ib)?.ok_or_else(|| Error::unsupported(format!("{op}: B must be a constant")))?;
    let azp = konst(lw, iaz)?;
    let bzp = konst(lw, ibz)?;
    let za = match &azp {
        None => 0,
        Some(t) if t.len() == 1 => t.to_i64_vec()[0],
        Some(_) => {
            return Err(Error::unsupported(format!(
                "{op}: per-axis input zero point on vulkan"
            )))
        }
    };
    let signed = |dt: DType, what: &str| match dt {
        DType::I8 => Ok(true),
        DType::U8 => Ok(false),
        other => Err(Error::unsupported(format!(
            "{op}: {what} of type {other} (int8/uint8 only)"
        ))),
    };
    let bs = signed(b.dtype(), "B")?;
    let a_dt = match &azp {
        Some(z) => z.dtype(),
        None => inp(ia)
            .and_then(|v| g.values.get(v))
            .and_then(|i| i.dtype)
            .ok_or_else(|| {
                Error::unsupported(format!("{op}: A's type is unknown (give its zero point)"))
            })?,
    };
    let as_ = signed(a_dt, "A")?;
    let a = lw.gpu(inp(ia), "A")?;
    if lw.outputs.contains_key(&out0) {
        return Err(Error::unsupported(format!(
            "{op} output as a graph output (vulkan holds integer values as float32)"
        )));
    }
    let bv = b.to_i64_vec();
    // (columns, K, output shape, element kk of column c in bv, conv geometry params)
    let (ncol, k, shape, geo): (usize, usize, Vec<usize>, Vec<u32>) = if conv {
        if a.shape.len() != 4 || b.shape().len() != 4 {
            return Err(Error::unsupported(format!(
                "{op}: only 2-D convolution on vulkan (input {:?}, weight {:?})",
                a.shape,
                b.shape()
            )));
        }
        let (nb, cin, h, w) = (a.shape[0], a.shape[1], a.shape[2], a.shape[3]);
        let (cout, cg, kh, kw) = (b.shape()[0], b.shape()[1], b.shape()[2], b.shape()[3]);
        let groups = usize::try_from(node.attr_i("group").unwrap_or(1))
            .map_err(|_| Error::arg("group must be positive"))?;
        if groups == 0 || cin != cg * groups || cout % groups != 0 {
            return Err(Error::arg(format!(
                "{op}: input channels {cin}, weight {:?}, group {groups} disagree",
                b.shape()
            )));
        }
        let ks = match node.attr_ints("kernel_shape") {
            Some(v) => v.iter().map(|&x| x.max(0) as usize).collect(),
            None => vec![kh, kw],
        };
        if ks != [kh, kw] {
            return Err(Error::arg("kernel_shape does not match the weight"));
        }
        let geom = geometry(node, &[h, w], &[kh, kw], false)?;
        let (gy, gx) = (geom[0], geom[1]);
        let geo = [
            cin, h, w, cout, gy[5], gx[5], groups, kh, kw, gy[1], gx[1], gy[3], gx[3], gy[2], gx[2],
        ]
        .iter()
        .map(|&v| u32_of(v, "conv geometry"))
        .collect::<Result<Vec<u32>>>()?;
        (cout, cg * kh * kw, vec![nb, cout, gy[5], gx[5]], geo)
    } else {
        if b.shape().len() != 2 {
            return Err(Error::unsupported(format!(
                "{op}: B of shape {:?} (2-D only on vulkan)",
                b.shape()
            )));
        }
        let (k, n) = (b.shape()[0], b.shape()[1]);
        if a.shape.len() < 2 || a.shape[a.shape.len() - 1] != k {
            return Err(Error::arg(format!(
                "{op}: A {:?} does not match B {:?}",
                a.shape,
                b.shape()
            )));
        }
        let mut shape = a.shape.clone();
        let last = shape.len() - 1;
        shape[last] = n;
        (n, k, shape, vec![0; 15])
    };
    let elem = |c: usize, kk: usize| {
        if conv {
            bv[c * k + kk]
        } else {
            bv[kk * ncol + c]
        }
    };
    let per_col = |t: &Option<Tensor>, what: &str| -> Result<Vec<i64>> {
        match t {
            None => Ok(vec![0; ncol]),
            Some(t) if t.len() == 1 => Ok(vec![t.to_i64_vec()[0]; ncol]),
            Some(t) if t.len() == ncol => Ok(t.to_i64_vec()),
            Some(t) => Err(Error::arg(format!(
                "{op}: {what} has {} values for {ncol} columns",
                t.len()
            ))),
        }
    };
    // int32 accumulation: |sum| <= K * 255 * 255 must stay below 2^31.
    if k > 33_000 {
        return Err(Error::unsupported(format!(
            "{op}: K = {k} could overflow the int32 accumulator (at most 33000 on vulkan)"
        )));
    }
    let zbv = per_col(&bzp, "B zero point")?;
    let kwd = k.div_ceil(4);
    // Packed B, then zero points, multipliers and biases per column (all as 32-bit words).
    let mut words = vec![0f32; ncol * kwd];
    for c in 0..ncol {
        for w in 0..kwd {
            let mut word = 0u32;
            for l in 0..4 {
                let kk = w * 4 + l;
                if kk < k {
                    word |= ((elem(c, kk) as u32) & 0xff) << (8 * l);
                }
            }
            words[c * kwd + w] = f32::from_bits(word);
        }
    }
    let zb_off = words.len();
    words.extend(zbv.iter().map(|&z| f32::from_bits(z as i32 as u32)));
    let (mode, zy, lo, hi, mul_off) = if ql {
        let sc = |lw: &Lower<'_>, i: usize, what: &str| -> Result<Vec<f32>> {
            let t = konst(lw, i)?.ok_or_else(|| Error::arg(format!("{op}: {what} is missing")))?;
            Ok(t.to_f32().into_owned())
        };
        let (sa, sb, sy) = (
            sc(lw, 1, "a scale")?,
            sc(lw, 4, "b scale")?,
            sc(lw, 6, "y scale")?,
        );
        if sa.len() != 1 || sy.len() != 1 || (sb.len() != 1 && sb.len() != ncol) {
            return Err(Error::unsupported(format!(
                "{op}: scales must be per tensor (B's may be per column) on vulkan"
            )));
        }
        let yzp = konst(lw, 7)?;
        let zy = match &yzp {
            None => 0,
            Some(t) if t.len() == 1 => t.to_i64_vec()[0],
            Some(_) => return Err(Error::unsupported(format!("{op}: per-axis y zero point"))),
        };
        let (lo, hi) = qrange(yzp.as_ref().map_or(a_dt, |t| t.dtype()))?;
        let mul_off = words.len();
        words.extend((0..ncol).map(|c| {
            let s = if sb.len() == 1 { sb[0] } else { sb[c] };
            sa[0] * s / sy[0]
        }));
        (1u32, zy, lo, hi, mul_off)
    } else {
        (0, 0, 0, 0, 0)
    };
    let bias_off = if op == "QLinearConv" && inp(8).is_some() {
        let t = konst(lw, 8)?.ok_or_else(|| Error::arg("QLinearConv: bias is missing"))?;
        if t.len() != ncol {
            return Err(Error::arg(format!(
                "QLinearConv: bias has {} values, expected {ncol}",
                t.len()
            )));
        }
        let off = words.len();
        words.extend(
            t.to_i64_vec()
                .iter()
                .map(|&v| f32::from_bits(v as i32 as u32)),
        );
        Some(off)
    } else {
        None
    };
    let bg = lw.constant(&words, vec![words.len()])?;
    let y = lw.place_for(out0, shape.clone())?;
    let total = numel(&shape);
    if total == 0 {
        lw.vals.insert(out0, y);
        return Ok(());
    }
    let int = |v: i64| v as i32 as u32;
    let woff = |o: usize| -> Result<u32> { u32_of(bg.off as usize + o, "weights offset") };
    let mut p = vec![
        u32_of(total, "elements")?,
        u32_of(ncol, "N")?,
        u32_of(k, "K")?,
        u32_of(kwd, "K words")?,
        a.off,
        bg.off,
        y.off,
        int(za),
        woff(zb_off)?,
        as_ as u32,
        bs as u32,
        mode,
        woff(mul_off)?,
        int(zy),
        int(lo),
        int(hi),
        match bias_off {
            Some(o) => woff(o)?,
            None => u32::MAX,
        },
        conv as u32,
    ];
    p.extend(geo);
    let kernel = if lw.tune.int_dot {
        Kernel::QGemmDot
    } else {
        Kernel::QGemm
    };
    let gr = lw.groups_1d(total);
    lw.push(
        kernel,
        [Some(a.place), Some(bg.place), Some(y.place), None],
        p,
        gr,
    );
    lw.vals.insert(out0, y);
    Ok(())
}

type FuseFn<'f> = dyn Fn(&Lower<'_>) -> Option<(usize, ValueId, (u32, f32, f32))> + 'f;

/// Inference BatchNormalization as y = x * k + c per channel (axis 1), k = scale /
/// sqrt(var + eps), c = B - mean * k computed on the host; a following activation is fused.
fn lower_batchnorm(
    lw: &mut Lower<'_>,
    node: &Node,
    out0: ValueId,
    fuse: &FuseFn<'_>,
    fused: &mut HashSet<usize>,
) -> Result<()> {
    let inp = |k: usize| node.inputs.get(k).copied().flatten();
    if node.attr_i("training_mode").unwrap_or(0) != 0 {
        return Err(Error::unsupported(
            "BatchNormalization training_mode on vulkan",
        ));
    }
    let x = lw.gpu(inp(0), "input")?;
    if x.shape.len() < 2 {
        return Err(Error::arg(format!(
            "BatchNormalization: input {:?} has no channel axis",
            x.shape
        )));
    }
    let c = x.shape[1];
    let eps = node.attr_f("epsilon").unwrap_or(1e-5);
    let mut cshape = vec![c];
    cshape.extend(std::iter::repeat_n(1, x.shape.len() - 2));
    let all_const = (1..=4).all(|k| inp(k).is_some_and(|v| lw.consts.contains_key(&v)));
    if !all_const {
        return batchnorm_runtime(lw, node, &x, eps, cshape, out0, fuse, fused);
    }
    let mut p: Vec<Vec<f32>> = Vec::with_capacity(4);
    for (k, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
        let t = inp(k).and_then(|v| lw.consts.get(&v)).ok_or_else(|| {
            Error::unsupported(format!("BatchNormalization: {what} must be a constant"))
        })?;
        let v = t.to_f32().into_owned();
        if v.len() != c {
            return Err(Error::arg(format!(
                "BatchNormalization: {what} has {} values for {c} channels",
                v.len()
            )));
        }
        p.push(v);
    }
    let k: Vec<f32> = (0..c).map(|i| p[0][i] / (p[3][i] + eps).sqrt()).collect();
    let sh: Vec<f32> = (0..c).map(|i| p[1][i] - p[2][i] * k[i]).collect();
    let kg = lw.constant(&k, cshape.clone())?;
    let cg = lw.constant(&sh, cshape)?;
    let (act, target) = match fuse(lw) {
        Some((idx, o, a)) => {
            fused.insert(idx);
            (a, o)
        }
        None => ((ACT_NONE, 0.0, 0.0), out0),
    };
    let n = numel(&x.shape);
    let toff = lw.alloc(n)?;
    let tmp = GVal {
        place: Place::Arena,
        off: toff,
        shape: x.shape.clone(),
    };
    lw.binary(&x, &kg, &tmp, 2, (ACT_NONE, 0.0, 0.0))?;
    let y = lw.place_for(target, x.shape.clone())?;
    lw.binary(&tmp, &cg, &y, 0, act)?;
    // The temporary is free again once the add (after the next barrier) has read it.
    lw.free.push((toff as usize, n.max(1).next_multiple_of(16)));
    lw.vals.insert(target, y);
    Ok(())
}

/// BatchNormalization whose statistics are runtime tensors: k = scale / sqrt(var + eps) on
/// the `[C]` vectors, then y = (x - mean) * k + B with broadcasting (six dispatches).
#[allow(clippy::too_many_arguments)]
fn batchnorm_runtime(
    lw: &mut Lower<'_>,
    node: &Node,
    x: &GVal,
    eps: f32,
    cshape: Vec<usize>,
    out0: ValueId,
    fuse: &FuseFn<'_>,
    fused: &mut HashSet<usize>,
) -> Result<()> {
    let inp = |k: usize| node.inputs.get(k).copied().flatten();
    let c = cshape[0];
    let mut prm = Vec::with_capacity(4);
    for (k, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
        let g = lw.gpu(inp(k), what)?;
        if numel(&g.shape) != c {
            return Err(Error::arg(format!(
                "BatchNormalization: {what} has shape {:?} for {c} channels",
                g.shape
            )));
        }
        prm.push(GVal {
            shape: vec![c],
            ..g
        });
    }
    let none = (ACT_NONE, 0.0, 0.0);
    let epsg = lw.constant(&[eps], vec![1])?;
    let mut temps = Vec::new();
    let mut tmp = |lw: &mut Lower<'_>, shape: Vec<usize>| -> Result<GVal> {
        let n = numel(&shape);
        let off = lw.alloc(n)?;
        temps.push((off as usize, n.max(1).next_multiple_of(16)));
        Ok(GVal {
            place: Place::Arena,
            off,
            shape,
        })
    };
    let ve = tmp(lw, vec![c])?;
    lw.binary(&prm[3], &epsg, &ve, 0, none)?;
    let sd = tmp(lw, vec![c])?;
    lw.unary(&ve, &sd, 11, 0.0, 0.0)?;
    let k = tmp(lw, vec![c])?;
    lw.binary(&prm[0], &sd, &k, 3, none)?;
    let centred = tmp(lw, x.shape.clone())?;
    let bc = |g: &GVal| GVal {
        shape: cshape.clone(),
        ..g.clone()
    };
    lw.binary(x, &bc(&prm[2]), &centred, 1, none)?;
    let scaled = tmp(lw, x.shape.clone())?;
    lw.binary(&centred, &bc(&k), &scaled, 2, none)?;
    let (act, target) = match fuse(lw) {
        Some((idx, o, a)) => {
            fused.insert(idx);
            (a, o)
        }
        None => (none, out0),
    };
    let y = lw.place_for(target, x.shape.clone())?;
    lw.binary(&scaled, &bc(&prm[1]), &y, 0, act)?;
    lw.free.extend(temps);
    lw.vals.insert(target, y);
    Ok(())
}

/// Output shape of the reshape-like ops.
fn alias_shape(node: &Node, s: &[usize], consts: &HashMap<ValueId, Tensor>) -> Result<Vec<usize>> {
    let inp = |k: usize| node.inputs.get(k).copied().flatten();
    let r = s.len();
    Ok(match node.op.as_str() {
        "Identity" | "Dropout" => s.to_vec(),
        "Flatten" => {
            let a = node.attr_i("axis").unwrap_or(1);
            let a = if a < 0 { a + r as i64 } else { a };
            if a < 0 || a > r as i64 {
                return Err(Error::arg(format!("Flatten axis {a} for rank {r}")));
            }
            let a = a as usize;
            vec![numel(&s[..a]), numel(&s[a..])]
        }
        "Reshape" => {
            let spec = const_ints(consts, inp(1), "shape")?;
            let allowzero = node.attr_i("allowzero").unwrap_or(0) != 0;
            let mut out = Vec::with_capacity(spec.len());
            let mut infer = None;
            for (i, &d) in spec.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    0 if !allowzero => out.push(
                        *s.get(i)
                            .ok_or_else(|| Error::arg("shape 0 copies a missing dim"))?,
                    ),
                    d if d >= 0 => out.push(d as usize),
                    d => return Err(Error::arg(format!("bad shape entry {d}"))),
                }
            }
            if let Some(i) = infer {
                let known = numel(&out);
                if known == 0 || !numel(s).is_multiple_of(known) {
                    return Err(Error::arg(format!("cannot reshape {s:?} to {spec:?}")));
                }
                out[i] = numel(s) / known;
            }
            out
        }
        "Squeeze" | "Unsqueeze" => {
            let axes = match node.attr_ints("axes") {
                Some(a) => Some(a.to_vec()),
                None => match inp(1) {
                    Some(_) => Some(const_ints(consts, inp(1), "axes")?),
                    None => None,
                },
            };
            if node.op == "Squeeze" {
                match axes {
                    None => s.iter().copied().filter(|&d| d != 1).collect(),
                    Some(a) => {
                        let ax: Vec<usize> = a
                            .iter()
                            .map(|&x| norm_axis(x, r, "axes"))
                            .collect::<Result<_>>()?;
                        if ax.iter().any(|&x| s[x] != 1) {
                            return Err(Error::arg(format!("Squeeze of a non-1 axis in {s:?}")));
                        }
                        s.iter()
                            .enumerate()
                            .filter(|(i, _)| !ax.contains(i))
                            .map(|(_, &d)| d)
                            .collect()
                    }
                }
            } else {
                let a = axes.ok_or_else(|| Error::arg("Unsqueeze needs axes"))?;
                let nr = r + a.len();
                let mut ax: Vec<usize> = a
                    .iter()
                    .map(|&x| norm_axis(x, nr, "axes"))
                    .collect::<Result<_>>()?;
                ax.sort_unstable();
                let mut out = Vec::with_capacity(nr);
                let mut it = s.iter();
                for i in 0..nr {
                    if ax.contains(&i) {
                        out.push(1);
                    } else {
                        out.push(
                            *it.next()
                                .ok_or_else(|| Error::arg("Unsqueeze axes repeat"))?,
                        );
                    }
                }
                out
            }
        }
        other => return Err(Error::unsupported(format!("{other} is not a reshape"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::graph::Node;

    /// x -> Exp -> a -> Neg -> b -> Reshape -> c -> Abs -> d -> Exp -> y: `a` is dead once
    /// `b` is computed, so `d` reuses `a`'s block; `c` aliases `b`, which stays live until
    /// `c`'s reader; `y` is written into the output place.
    #[test]
    fn arena_reuses_dead_blocks_and_respects_aliases() {
        let mut g = Graph::new("chain");
        let ids: Vec<ValueId> = ["x", "a", "b", "c", "d", "y", "s"]
            .iter()
            .map(|n| g.value_id(n))
            .collect();
        let (x, a, b, c, d, y, s) = (ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], ids[6]);
        g.inputs = vec![x];
        g.outputs = vec![y];
        g.initializers
            .insert(s, Tensor::from_vec(vec![2], vec![4i64, 25]).unwrap());
        let mk = |op: &str, i: Vec<ValueId>, o: ValueId| Node {
            op: op.into(),
            inputs: i.into_iter().map(Some).collect(),
            outputs: vec![Some(o)],
            ..Default::default()
        };
        g.nodes.push(mk("Exp", vec![x], a));
        g.nodes.push(mk("Neg", vec![a], b));
        g.nodes.push(mk("Reshape", vec![b, s], c));
        g.nodes.push(mk("Abs", vec![c], d));
        g.nodes.push(mk("Exp", vec![d], y));
        let tune = Tune {
            gemm: (16, 16),
            wg: 64,
            int_dot: false,
        };
        let p = lower(&g, &[vec![100]], tune).unwrap();
        // a (112 elems padded) and b: two blocks live at once; d reuses a's block.
        assert_eq!(p.arena, 2 * 112);
        let offs: Vec<u32> = p
            .steps
            .iter()
            .map(|st| p.params[st.base as usize + 5])
            .collect();
        // y_off of Exp(x)->a, Neg->b, Abs->d
        assert_eq!(offs[0], 0);
        assert_eq!(offs[1], 112);
        assert_eq!(offs[2], 0, "d reuses a's block");
        assert_eq!(p.output_shapes, vec![vec![4, 25]]);
    }
}
