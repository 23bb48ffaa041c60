//! Op implementations, one function per op, keyed by `(domain, op_type)`.
//!
//! Every op has the signature [`OpFn`]: it reads its node's attributes through [`OpCtx`], takes
//! its inputs (`None` where an optional input was omitted) and returns its outputs in order.
//! Errors say what is wrong without naming the node; the executor adds the node.

use std::collections::HashMap;

use edgehal_core::dtype::Elem;
use edgehal_core::tensor::broadcast_shapes;
use edgehal_core::{DType, Error, Graph, Node, Result, Tensor};

pub mod control;
pub mod elementwise;
pub mod extra;
pub mod nn;
pub mod quant;
pub mod reduce;
pub mod resize;
pub mod rnn;
pub mod shape;
pub mod tflite;
pub mod training;

/// Runs a subgraph with the given inputs in the scope of the calling node.
pub type SubgraphFn<'a> = dyn Fn(&Graph, &[Tensor]) -> Result<Vec<Tensor>> + 'a;

/// What an op sees besides its inputs.
pub struct OpCtx<'a> {
    /// The node being executed (attributes, op type).
    pub node: &'a Node,
    /// Opset version of the node's domain.
    pub opset: i64,
    /// Runs a subgraph attribute (If/Loop/Scan bodies) with the given inputs; names the body
    /// does not define are looked up in the scope of the calling node.
    pub subgraph: Option<&'a SubgraphFn<'a>>,
    /// Where output 0 goes when it is a graph output bound to caller memory: ops that can
    /// compute in place write there through [`OpCtx::f32_output`]; others ignore it and the
    /// caller copies their result (one counted copy).
    pub dest: Option<&'a dyn OutputDest>,
}

/// Memory a graph output can be computed into in place (a caller's bound output buffer).
pub trait OutputDest {
    /// Run `fill` on the first bytes of the destination, zeroed, for an output of `dtype` and
    /// `shape`. `None` (and `fill` not called) when the destination cannot take it: already
    /// used, too small, or not aligned to `align` bytes; the op then computes a tensor as usual.
    fn write(
        &self,
        dtype: DType,
        shape: &[usize],
        align: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Option<Result<()>>;
}

impl OpCtx<'_> {
    /// Integer attribute or a default.
    pub fn i(&self, name: &str, default: i64) -> i64 {
        self.node.attr_i(name).unwrap_or(default)
    }
    /// Float attribute or a default.
    pub fn f(&self, name: &str, default: f32) -> f32 {
        self.node.attr_f(name).unwrap_or(default)
    }
    /// String attribute or a default.
    pub fn s(&self, name: &str, default: &str) -> String {
        self.node
            .attr_s(name)
            .unwrap_or_else(|| default.to_string())
    }
    /// Integer list attribute (None when absent).
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.node.attr_ints(name).map(|v| v.to_vec())
    }
    /// Float list attribute (None when absent).
    pub fn floats(&self, name: &str) -> Option<Vec<f32>> {
        self.node.attr_floats(name).map(|v| v.to_vec())
    }

    /// A float output of `dtype` and `shape` computed by `fill` into zeroed f32 memory: the
    /// bound output destination when the executor handed one that fits (output 0 of a node
    /// producing a graph output, f32, aligned, large enough), otherwise a new tensor. In the
    /// first case the returned tensor is an empty placeholder the executor discards.
    pub fn f32_output(
        &self,
        dtype: DType,
        shape: Vec<usize>,
        fill: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<Tensor> {
        let n = edgehal_core::tensor::checked_numel(&shape, DType::F32)?;
        let mut fill = Some(fill);
        if dtype == DType::F32 {
            if let Some(d) = self.dest {
                let mut run = |bytes: &mut [u8]| -> Result<()> {
                    let out: &mut [f32] = bytemuck::try_cast_slice_mut(bytes)
                        .map_err(|e| Error::arg(format!("output destination: {e}")))?;
                    match fill.take() {
                        Some(f) => f(out),
                        None => Err(Error::arg("output destination written twice")),
                    }
                };
                if let Some(r) = d.write(DType::F32, &shape, std::mem::align_of::<f32>(), &mut run)
                {
                    r?;
                    return Tensor::from_vec(vec![0], Vec::<f32>::new());
                }
            }
        }
        let mut out = crate::arena::take_zeroed(n);
        match fill.take() {
            Some(f) => f(&mut out)?,
            None => return Err(Error::arg("output computed twice")),
        }
        let t = crate::arena::f32_tensor(shape, out)?;
        if dtype == DType::F32 {
            Ok(t)
        } else {
            t.cast(dtype)
        }
    }
}

/// The signature of every op.
pub type OpFn = fn(&OpCtx<'_>, &[Option<&Tensor>]) -> Result<Vec<Tensor>>;

/// Ops by `(domain, op_type)`. The default ONNX domain is `""` (`ai.onnx` is mapped to it).
#[derive(Clone)]
pub struct Registry {
    ops: HashMap<(String, String), OpFn>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry with every op this crate implements.
    pub fn new() -> Self {
        let mut r = Registry {
            ops: HashMap::new(),
        };
        control::register(&mut r);
        elementwise::register(&mut r);
        extra::register(&mut r);
        nn::register(&mut r);
        quant::register(&mut r);
        reduce::register(&mut r);
        resize::register(&mut r);
        rnn::register(&mut r);
        shape::register(&mut r);
        tflite::register(&mut r);
        training::register(&mut r);
        crate::qdq_plan::register(&mut r);
        crate::nhwc_plan::register(&mut r);
        r
    }
    /// Register an op of the default domain.
    pub fn add(&mut self, op: &str, f: OpFn) {
        self.ops.insert((String::new(), op.to_string()), f);
    }
    /// Register an op of another domain (e.g. `com.microsoft`).
    pub fn add_domain(&mut self, domain: &str, op: &str, f: OpFn) {
        self.ops.insert((domain.to_string(), op.to_string()), f);
    }
    /// Look an op up.
    pub fn get(&self, domain: &str, op: &str) -> Option<OpFn> {
        let domain = if domain == "ai.onnx" { "" } else { domain };
        self.ops.get(&(domain.to_string(), op.to_string())).copied()
    }
    /// Every registered `(domain, op)`, sorted.
    pub fn names(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.ops.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Input `i`, which must be present.
pub fn input<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    ins.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| Error::arg(format!("missing required input {i}")))
}

/// Input `i` if given (and not an empty optional).
pub fn opt_input<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Option<&'a Tensor> {
    ins.get(i).copied().flatten()
}

/// Normalise a possibly negative axis against a rank.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(Error::arg(format!(
            "axis {axis} out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

/// Elementwise binary op with numpy broadcasting on typed elements.
pub fn broadcast_binary<T: Elem, U: Elem>(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(T, T) -> U,
) -> Result<Tensor> {
    let shape = broadcast_shapes(a.shape(), b.shape())?;
    let av = a.as_slice::<T>()?;
    let bv = b.as_slice::<T>()?;
    let n: usize = shape.iter().product();
    let out: Vec<U> = if a.shape() == b.shape() {
        av.iter().zip(bv.iter()).map(|(&x, &y)| f(x, y)).collect()
    } else if b.len() == 1 {
        let y = bv[0];
        let va =
            edgehal_core::tensor::View::contiguous(av, a.shape().to_vec()).broadcast_to(&shape)?;
        va.iter().map(|x| f(x, y)).collect()
    } else if a.len() == 1 {
        let x = av[0];
        let vb =
            edgehal_core::tensor::View::contiguous(bv, b.shape().to_vec()).broadcast_to(&shape)?;
        vb.iter().map(|y| f(x, y)).collect()
    } else {
        let va =
            edgehal_core::tensor::View::contiguous(av, a.shape().to_vec()).broadcast_to(&shape)?;
        let vb =
            edgehal_core::tensor::View::contiguous(bv, b.shape().to_vec()).broadcast_to(&shape)?;
        va.iter().zip(vb.iter()).map(|(x, y)| f(x, y)).collect()
    };
    debug_assert_eq!(out.len(), n);
    Tensor::from_vec(shape, out)
}

/// Apply `f` to every element of a float tensor (f32, f16, bf16, f64), computing in f64 for the
/// narrow types and in f32 for f32.
///
/// f32 results go to a pooled buffer, computed on the running executor's threads when large.
pub fn map_float(
    t: &Tensor,
    f32f: impl Fn(f32) -> f32 + Sync,
    f64f: impl Fn(f64) -> f64,
) -> Result<Tensor> {
    use edgehal_core::DType;
    match t.dtype() {
        DType::F32 => {
            let x = t.as_slice::<f32>()?;
            map_f32(t.shape().to_vec(), &x, |xs, out| {
                for (o, &v) in out.iter_mut().zip(xs) {
                    *o = f32f(v);
                }
            })
        }
        DType::F64 => Tensor::from_vec(
            t.shape().to_vec(),
            t.as_slice::<f64>()?.iter().map(|&x| f64f(x)).collect(),
        ),
        DType::F16 => Tensor::from_vec(
            t.shape().to_vec(),
            t.as_slice::<half::f16>()?
                .iter()
                .map(|&x| half::f16::from_f32(f32f(x.to_f32())))
                .collect(),
        ),
        DType::BF16 => Tensor::from_vec(
            t.shape().to_vec(),
            t.as_slice::<half::bf16>()?
                .iter()
                .map(|&x| half::bf16::from_f32(f32f(x.to_f32())))
                .collect(),
        ),
        d => Err(Error::unsupported(format!(
            "expected a float tensor, got {d}"
        ))),
    }
}

/// An f32 tensor of `shape` from `x` by `f(x_part, out_part)` over matching parts, split across
/// the running executor's threads when large; the output buffer is pooled.
pub fn map_f32(
    shape: Vec<usize>,
    x: &[f32],
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Result<Tensor> {
    let mut out = crate::arena::take_any(x.len());
    crate::par::for_slices::<f32, Error>(crate::arena::threads(), &mut out, |off, o| {
        let xs = x
            .get(off..off + o.len())
            .ok_or_else(|| Error::arg("map: input is too short"))?;
        f(xs, o);
        Ok(())
    })?;
    crate::arena::f32_tensor(shape, out)
}

/// A 1-d i64 tensor.
pub fn i64_tensor(v: Vec<i64>) -> Tensor {
    let n = v.len();
    Tensor::from_vec(vec![n], v).unwrap_or_else(|_| Tensor::scalar(0i64))
}
