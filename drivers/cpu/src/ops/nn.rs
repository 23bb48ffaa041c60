//! Ops: neural-network layers (convolution, pooling, dense layers, normalisations,
//! activations, softmax family).
//!
//! - Float ops compute in f32 (f16/bf16/f64 inputs are converted in and out), except cheap
//!   elementwise activations, which compute in f64 so every float type gets full precision.
//! - Conv, ConvTranspose, Gemm and MatMul go through `edgehal_kernels::gemm::sgemm`
//!   (im2col/col2im for the convolutions), never through per-element index arithmetic.

use std::borrow::Cow;

use edgehal_core::dtype::Elem;
use edgehal_core::half::{bf16, f16};
use edgehal_core::tensor::View;
use edgehal_core::{DType, Error, Result, Tensor};
use edgehal_kernels::gemm::{sgemm, MatRef};
use edgehal_kernels::gemv::{gemv, GemvAdd, PackedGemv};

use super::{input, map_float, norm_axis, opt_input, OpCtx, Registry};

#[path = "nn_conv.rs"]
mod conv;
pub(crate) use conv::{geom, im2col, Geom};
#[path = "nn_attention.rs"]
mod attention;

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    conv::register(r);
    attention::register(r);
    r.add("Relu", relu);
    r.add("LeakyRelu", leaky_relu);
    r.add("PRelu", prelu);
    r.add("Elu", elu);
    r.add("Selu", selu);
    r.add("Celu", celu);
    r.add("ThresholdedRelu", thresholded_relu);
    r.add("Clip", clip);
    r.add("Sigmoid", sigmoid);
    r.add("HardSigmoid", hard_sigmoid);
    r.add("HardSwish", hard_swish);
    r.add("Softplus", softplus);
    r.add("Softsign", softsign);
    r.add("Mish", mish);
    r.add("Tanh", tanh);
    r.add("Erf", erf_op);
    r.add("Gelu", gelu);
    r.add("Softmax", softmax);
    r.add("LogSoftmax", log_softmax);
    r.add("Hardmax", hardmax);
    r.add("Gemm", gemm);
    r.add("MatMul", matmul);
    r.add("BatchNormalization", batch_norm);
    r.add("InstanceNormalization", instance_norm);
    r.add("LayerNormalization", layer_norm);
    r.add("GroupNormalization", group_norm);
    r.add("MeanVarianceNormalization", mvn);
    r.add("LRN", lrn);
    r.add("Dropout", dropout);
}

// ---------------------------------------------------------------------------------------------
// Float helpers shared by the nn submodules.

/// The elements of a float tensor as f32 (borrowed for aligned f32 tensors).
pub(crate) fn fvec<'a>(t: &'a Tensor, what: &str) -> Result<Cow<'a, [f32]>> {
    if !t.dtype().is_float() {
        return Err(Error::unsupported(format!(
            "{what} must be a float tensor, got {}",
            t.dtype()
        )));
    }
    Ok(t.to_f32())
}

/// A tensor of dtype `dtype` (a float type) from f32 values.
pub(crate) fn ftensor(dtype: DType, shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor> {
    match dtype {
        DType::F32 => crate::arena::f32_tensor(shape, v),
        DType::F64 => Tensor::from_vec(shape, v.into_iter().map(f64::from).collect()),
        DType::F16 => Tensor::from_vec(shape, v.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => Tensor::from_vec(shape, v.into_iter().map(bf16::from_f32).collect()),
        d => Err(Error::unsupported(format!(
            "expected a float dtype, got {d}"
        ))),
    }
}

/// Product of dims, checked.
pub(crate) fn numel(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |a, &d| {
        a.checked_mul(d)
            .ok_or_else(|| Error::TooLarge(format!("shape {shape:?} overflows")))
    })
}

/// A zero-filled f32 buffer of `n` elements, after checking the size against the budget.
pub(crate) fn zeros_f32(n: usize) -> Result<Vec<f32>> {
    edgehal_core::tensor::checked_numel(&[n], DType::F32)?;
    Ok(crate::arena::take_zeroed(n))
}

/// `n` floats with unspecified contents (a reused buffer) for a caller that writes them all.
pub(crate) fn take_f32(n: usize) -> Result<Vec<f32>> {
    edgehal_core::tensor::checked_numel(&[n], DType::F32)?;
    Ok(crate::arena::take_any(n))
}

/// Apply `f` (computed in f64) to every element of a float tensor.
fn unary(ins: &[Option<&Tensor>], f: impl Fn(f64) -> f64 + Sync) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    Ok(vec![map_float(x, |v| f(v as f64) as f32, &f)?])
}

/// Elementwise binary float op with numpy broadcasting, computed in f64.
fn binary_float(a: &Tensor, b: &Tensor, f: impl Fn(f64, f64) -> f64) -> Result<Tensor> {
    if a.dtype() != b.dtype() {
        return Err(Error::arg(format!(
            "inputs have different dtypes {} and {}",
            a.dtype(),
            b.dtype()
        )));
    }
    match a.dtype() {
        DType::F32 => {
            super::broadcast_binary::<f32, f32>(a, b, |x, y| f(x as f64, y as f64) as f32)
        }
        DType::F64 => super::broadcast_binary::<f64, f64>(a, b, f),
        DType::F16 => super::broadcast_binary::<f16, f16>(a, b, |x, y| {
            f16::from_f64(f(x.to_f64(), y.to_f64()))
        }),
        DType::BF16 => super::broadcast_binary::<bf16, bf16>(a, b, |x, y| {
            bf16::from_f64(f(x.to_f64(), y.to_f64()))
        }),
        d => Err(Error::unsupported(format!(
            "expected float inputs, got {d}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Activations.

fn relu(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if x.dtype().is_float() {
        return unary(ins, |v| if v < 0.0 { 0.0 } else { v });
    }
    if !x.dtype().is_int() {
        return Err(Error::unsupported(format!("Relu on {}", x.dtype())));
    }
    edgehal_core::with_dtype!(x.dtype(), T => {
        let zero = T::from_i64(0);
        let v: Vec<T> = x.as_slice::<T>()?.iter().map(|&e| if e < zero { zero } else { e }).collect();
        Ok(vec![Tensor::from_vec_dtype(x.dtype(), x.shape().to_vec(), v)?])
    })
}

fn leaky_relu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.f("alpha", 0.01) as f64;
    unary(ins, |v| if v < 0.0 { a * v } else { v })
}

fn prelu(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let slope = input(ins, 1)?;
    let y = binary_float(x, slope, |v, s| if v < 0.0 { s * v } else { v })?;
    if y.shape() != x.shape() {
        return Err(Error::arg(format!(
            "PRelu: slope {:?} does not broadcast to X {:?}",
            slope.shape(),
            x.shape()
        )));
    }
    Ok(vec![y])
}

fn elu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.f("alpha", 1.0) as f64;
    unary(ins, |v| if v < 0.0 { a * (v.exp() - 1.0) } else { v })
}

fn selu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.f("alpha", 1.673_263_2) as f64;
    let g = ctx.f("gamma", 1.050_701) as f64;
    unary(ins, |v| {
        if v > 0.0 {
            g * v
        } else {
            g * (a * v.exp() - a)
        }
    })
}

fn celu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.f("alpha", 1.0) as f64;
    unary(ins, |v| v.max(0.0) + (a * ((v / a).exp() - 1.0)).min(0.0))
}

fn thresholded_relu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.f("alpha", 1.0) as f64;
    unary(ins, |v| if v > a { v } else { 0.0 })
}

fn clip_t<T: Elem>(x: &Tensor, lo: Option<T>, hi: Option<T>) -> Result<Tensor> {
    let v: Vec<T> = x
        .as_slice::<T>()?
        .iter()
        .map(|&e| {
            let mut e = e;
            if let Some(l) = lo {
                if e < l {
                    e = l;
                }
            }
            if let Some(h) = hi {
                if e > h {
                    e = h;
                }
            }
            e
        })
        .collect();
    Tensor::from_vec_dtype(x.dtype(), x.shape().to_vec(), v)
}

fn clip(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let bound = |i: usize| -> Result<Option<&Tensor>> {
        match opt_input(ins, i) {
            Some(t) if t.len() != 1 => Err(Error::arg(format!(
                "Clip: bound {i} must be a scalar, got shape {:?}",
                t.shape()
            ))),
            Some(t) if t.dtype() != x.dtype() => Err(Error::arg(format!(
                "Clip: bound {i} is {}, input is {}",
                t.dtype(),
                x.dtype()
            ))),
            o => Ok(o),
        }
    };
    if ctx.opset < 11 {
        let lo = ctx.node.attr_f("min").map(f64::from);
        let hi = ctx.node.attr_f("max").map(f64::from);
        return unary(ins, |v| {
            let mut v = v;
            if let Some(l) = lo {
                if v < l {
                    v = l;
                }
            }
            if let Some(h) = hi {
                if v > h {
                    v = h;
                }
            }
            v
        });
    }
    let (lo, hi) = (bound(1)?, bound(2)?);
    edgehal_core::with_dtype!(x.dtype(), T => {
        let get = |t: Option<&Tensor>| -> Result<Option<T>> {
            match t {
                Some(t) => Ok(t.as_slice::<T>()?.first().copied()),
                None => Ok(None),
            }
        };
        Ok(vec![clip_t::<T>(x, get(lo)?, get(hi)?)?])
    })
}

fn sigmoid_f(v: f64) -> f64 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

fn sigmoid(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if x.dtype() == DType::F32 {
        let xv = x.as_slice::<f32>()?;
        return Ok(vec![super::map_f32(x.shape().to_vec(), &xv, |xs, o| {
            o.copy_from_slice(xs);
            crate::vmath::sigmoid_inplace(o);
        })?]);
    }
    unary(ins, sigmoid_f)
}

fn hard_sigmoid(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = ctx.f("alpha", 0.2) as f64;
    let b = ctx.f("beta", 0.5) as f64;
    unary(ins, |v| (a * v + b).clamp(0.0, 1.0))
}

fn hard_swish(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ins, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0))
}

fn softplus_f(v: f64) -> f64 {
    if v > 30.0 {
        v
    } else {
        v.exp().ln_1p()
    }
}

fn softplus(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ins, softplus_f)
}

fn softsign(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ins, |v| v / (1.0 + v.abs()))
}

fn mish(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ins, |v| v * softplus_f(v).tanh())
}

fn tanh(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ins, f64::tanh)
}

/// The error function: Maclaurin series below 4 (cancellation costs at most ~7 of f64's 16
/// digits there), the asymptotic expansion of erfc above.
pub(crate) fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 4.0 {
        let x2 = a * a;
        let mut term = a;
        let mut sum = a;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() || n > 200.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 6.0 {
        let x2 = a * a;
        let inv = 1.0 / (2.0 * x2);
        // erfc(x) ~ e^{-x^2}/(x sqrt(pi)) * sum_k (-1)^k (2k-1)!! / (2x^2)^k
        let mut term = 1.0;
        let mut sum = 1.0;
        for k in 1..8 {
            term *= -((2 * k - 1) as f64) * inv;
            sum += term;
        }
        1.0 - (-x2).exp() / (a * std::f64::consts::PI.sqrt()) * sum
    } else {
        1.0
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

fn erf_op(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ins, erf)
}

fn gelu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    match ctx.s("approximate", "none").as_str() {
        "none" => unary(ins, |v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))),
        "tanh" => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            unary(ins, move |v| {
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            })
        }
        o => Err(Error::arg(format!(
            "Gelu: approximate must be none or tanh, got {o}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax family.

/// Splits a shape around `axis` into (outer, len, inner) the way the opset asks: before 13 the
/// input is coerced to 2-D at `axis` (so `inner` is 1 and `len` covers every trailing axis).
fn softmax_layout(ctx: &OpCtx<'_>, shape: &[usize]) -> Result<(usize, usize, usize)> {
    let rank = shape.len();
    if ctx.opset < 13 {
        let axis = ctx.i("axis", 1);
        let a = if axis < 0 { axis + rank as i64 } else { axis };
        if a < 0 || a as usize > rank {
            return Err(Error::arg(format!(
                "axis {axis} out of range for rank {rank}"
            )));
        }
        let a = a as usize;
        Ok((numel(&shape[..a])?, numel(&shape[a..])?, 1))
    } else {
        let a = norm_axis(ctx.i("axis", -1), rank)?;
        if rank == 0 {
            return Ok((1, 1, 1));
        }
        Ok((numel(&shape[..a])?, shape[a], numel(&shape[a + 1..])?))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum SoftKind {
    Soft,
    Log,
    Hard,
}

fn softmax_impl(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], kind: SoftKind) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if !x.dtype().is_float() {
        return Err(Error::unsupported(format!(
            "expected float input, got {}",
            x.dtype()
        )));
    }
    let (outer, len, inner) = softmax_layout(ctx, x.shape())?;
    let v = x.to_f64_vec();
    let mut out = vec![0f64; v.len()];
    let mut buf = vec![0f64; len];
    for o in 0..outer {
        for i in 0..inner {
            let base = o * len * inner + i;
            for (k, b) in buf.iter_mut().enumerate() {
                *b = v[base + k * inner];
            }
            match kind {
                SoftKind::Hard => {
                    let mut best = 0;
                    for k in 1..len {
                        if buf[k] > buf[best] {
                            best = k;
                        }
                    }
                    for k in 0..len {
                        out[base + k * inner] = if k == best { 1.0 } else { 0.0 };
                    }
                }
                _ => {
                    let m = buf.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = buf.iter().map(|&b| (b - m).exp()).sum();
                    for k in 0..len {
                        out[base + k * inner] = if kind == SoftKind::Log {
                            buf[k] - m - s.ln()
                        } else {
                            (buf[k] - m).exp() / s
                        };
                    }
                }
            }
        }
    }
    let t = Tensor::from_vec(x.shape().to_vec(), out)?;
    Ok(vec![t.cast(x.dtype())?])
}

fn softmax(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    softmax_impl(ctx, ins, SoftKind::Soft)
}
fn log_softmax(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    softmax_impl(ctx, ins, SoftKind::Log)
}
fn hardmax(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    softmax_impl(ctx, ins, SoftKind::Hard)
}

// ---------------------------------------------------------------------------------------------
// Dense layers.

fn gemm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(ins, 0)?;
    let b = input(ins, 1)?;
    let c = opt_input(ins, 2);
    if a.rank() != 2 || b.rank() != 2 {
        return Err(Error::arg(format!(
            "Gemm: A {:?} and B {:?} must be 2-D",
            a.shape(),
            b.shape()
        )));
    }
    let ta = ctx.i("transA", 0) != 0;
    let tb = ctx.i("transB", 0) != 0;
    let alpha = ctx.f("alpha", 1.0);
    let beta = ctx.f("beta", 1.0);
    let av = fvec(a, "Gemm A")?;
    let bv = fvec(b, "Gemm B")?;
    let mut am = MatRef::row_major(&av, a.shape()[0], a.shape()[1]);
    if ta {
        am = am.t();
    }
    let mut bm = MatRef::row_major(&bv, b.shape()[0], b.shape()[1]);
    if tb {
        bm = bm.t();
    }
    let (m, k, n) = (am.rows, am.cols, bm.cols);
    if bm.rows != k {
        return Err(Error::arg(format!(
            "Gemm: A is {m}x{k} but B is {}x{n} (after transA={ta}, transB={tb})",
            bm.rows
        )));
    }
    // Computed straight into a bound graph output when there is one (see `f32_output`).
    let fill = |out: &mut [f32]| -> Result<()> {
        let mut use_beta = 0.0;
        if let Some(c) = c {
            let cv = fvec(c, "Gemm C")?;
            let view = View::contiguous(cv, c.shape().to_vec())
                .broadcast_to(&[m, n])
                .map_err(|_| {
                    Error::arg(format!(
                        "Gemm: C {:?} does not broadcast to [{m}, {n}]",
                        c.shape()
                    ))
                })?;
            for (o, v) in out.iter_mut().zip(view.iter()) {
                *o = v;
            }
            use_beta = beta;
        }
        sgemm_par(alpha, am, bm, use_beta, out, n)
    };
    Ok(vec![ctx.f32_output(a.dtype(), vec![m, n], fill)?])
}

/// A `Gemm` whose `B` (and `C`, when given) are constants, packed once per session for
/// [`gemv`]: a single-row `A` (a fully connected layer at batch 1, e.g. the unrolled LSTM of a
/// TFLite model) is then one matrix-vector product with `alpha` folded into the packed matrix
/// and `beta * C` as its bias. Any other `A` runs the op.
pub struct GemvPlan {
    k: usize,
    n: usize,
    /// `W` in row blocks of `block` rows (the last may be shorter), packed separately so
    /// threads can take whole blocks: a classifier head streams megabytes of weights per
    /// run, and each core's share of the memory bandwidth then works on its own rows.
    w: Vec<PackedGemv>,
    block: usize,
    bias: Option<Vec<f32>>,
}

/// Most row blocks a [`GemvPlan`] splits `W` into (threads take whole blocks).
const GEMV_BLOCKS: usize = 8;

impl GemvPlan {
    /// A plan for a `Gemm` node (`transA = 0`) with float `B` and `C`; `None` otherwise.
    pub fn new(node: &edgehal_core::Node, b: &Tensor, c: Option<&Tensor>) -> Option<GemvPlan> {
        let onnx = node.domain.is_empty() || node.domain == "ai.onnx";
        if node.op != "Gemm" || !onnx || node.attr_i("transA").unwrap_or(0) != 0 {
            return None;
        }
        if !b.dtype().is_float() || b.rank() != 2 {
            return None;
        }
        let alpha = node.attr_f("alpha").unwrap_or(1.0);
        let beta = node.attr_f("beta").unwrap_or(1.0);
        let mut bv = b.to_f32().into_owned();
        if alpha != 1.0 {
            bv.iter_mut().for_each(|v| *v *= alpha);
        }
        let bm = MatRef::row_major(&bv, b.shape()[0], b.shape()[1]);
        // W = B^T (n x k), or B itself when transB.
        let w = if node.attr_i("transB").unwrap_or(0) != 0 {
            bm
        } else {
            bm.t()
        };
        let (n, k) = (w.rows, w.cols);
        let bias = match c {
            None => None,
            Some(c) if c.dtype().is_float() => {
                let view = View::contiguous(c.to_f32(), c.shape().to_vec())
                    .broadcast_to(&[1, n])
                    .ok()?;
                Some(view.iter().map(|v| beta * v).collect())
            }
            Some(_) => return None,
        };
        // One block when the product is too small to be worth a second thread.
        let blocks = if n.saturating_mul(k) >= MIN_PARALLEL_MACS {
            GEMV_BLOCKS
        } else {
            1
        };
        let block = n.div_ceil(blocks).div_ceil(16).max(1) * 16;
        let mut packs = Vec::new();
        for r0 in (0..n.max(1)).step_by(block) {
            let rows = block.min(n - r0.min(n));
            let part = MatRef {
                data: w.data.get(r0 * w.rs..).unwrap_or_default(),
                rows,
                ..w
            };
            packs.push(PackedGemv::new(part)?);
        }
        Some(GemvPlan {
            k,
            n,
            w: packs,
            block,
            bias,
        })
    }

    /// Runs the node when `A` is one f32 row of the prepared width; `None` (nothing done)
    /// otherwise, for the caller to run the op.
    pub fn run(&self, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Option<Result<Vec<Tensor>>> {
        let a = ins.first().copied().flatten()?;
        if a.dtype() != DType::F32 || a.shape() != [1, self.k] {
            return None;
        }
        let av = match fvec(a, "Gemm A") {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let threads = crate::arena::threads();
        Some(
            ctx.f32_output(DType::F32, vec![1, self.n], |out| {
                crate::par::for_parts(threads, self.w.len(), self.block, out, |bs, o| {
                    for (i, b) in bs.enumerate() {
                        let r0 = b * self.block;
                        let rows = self.block.min(self.n - r0);
                        let add = GemvAdd {
                            bias: self.bias.as_deref().map(|bv| &bv[r0..r0 + rows]),
                            accumulate: false,
                        };
                        let y = &mut o[i * self.block..i * self.block + rows];
                        if !gemv(&self.w[b], &av, y, add) {
                            return Err(Error::arg("Gemm: A does not fit the prepared B"));
                        }
                    }
                    Ok(())
                })
            })
            .map(|t| vec![t]),
        )
    }
}

/// Multiply-adds below which a product runs on one thread.
const MIN_PARALLEL_MACS: usize = 1 << 18;

/// `out = alpha * A * B + beta * out` (`out` is `m x n`, row-major), split across the running
/// executor's threads when large: by rows of A when there are enough, else by columns of B
/// (a single row, e.g. a classifier head at batch 1).
pub(crate) fn sgemm_par(
    alpha: f32,
    am: MatRef<'_>,
    bm: MatRef<'_>,
    beta: f32,
    out: &mut [f32],
    n: usize,
) -> Result<()> {
    let (m, k) = (am.rows, am.cols);
    let threads = crate::arena::threads();
    let macs = m.saturating_mul(k).saturating_mul(n);
    let err = || Error::arg("Gemm: operand sizes do not match");
    if threads <= 1 || macs < MIN_PARALLEL_MACS || n == 0 || m == 0 {
        return if sgemm(alpha, am, bm, beta, out, n.max(1)) {
            Ok(())
        } else {
            Err(err())
        };
    }
    if m >= 2 * threads {
        crate::par::for_parts(threads, m, n, out, |rows, o| {
            let a = MatRef {
                data: am.data.get(rows.start * am.rs..).ok_or_else(err)?,
                rows: rows.len(),
                ..am
            };
            if sgemm(alpha, a, bm, beta, o, n) {
                Ok(())
            } else {
                Err(err())
            }
        })
    } else if m == 1 {
        crate::par::for_parts(threads, n.div_ceil(16), 16, out, |blocks, o| {
            let j0 = blocks.start * 16;
            let b = MatRef {
                data: bm.data.get(j0 * bm.cs..).ok_or_else(err)?,
                cols: o.len(),
                ..bm
            };
            if sgemm(alpha, am, b, beta, o, o.len()) {
                Ok(())
            } else {
                Err(err())
            }
        })
    } else if sgemm(alpha, am, bm, beta, out, n) {
        Ok(())
    } else {
        Err(err())
    }
}

/// Batched matrix multiply with numpy broadcasting: `[..., m, k] x [..., k, n]`, computing
/// each batch with `mm(a_off, b_off, out_off)`. Returns the output shape.
fn matmul_plan(a: &[usize], b: &[usize]) -> Result<MatmulPlan> {
    if a.is_empty() || b.is_empty() {
        return Err(Error::arg("MatMul: operands must have rank >= 1"));
    }
    let (a2, a1d) = if a.len() == 1 {
        (vec![1, a[0]], true)
    } else {
        (a.to_vec(), false)
    };
    let (b2, b1d) = if b.len() == 1 {
        (vec![b[0], 1], true)
    } else {
        (b.to_vec(), false)
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(Error::arg(format!(
            "MatMul: inner dimensions differ: {a:?} x {b:?}"
        )));
    }
    let ab = &a2[..a2.len() - 2];
    let bb = &b2[..b2.len() - 2];
    let batch = edgehal_core::tensor::broadcast_shapes(ab, bb)?;
    let nb = numel(&batch)?;
    // offsets of each batch into a and b via broadcast index arithmetic
    let offs = |src: &[usize], stride: usize| -> Vec<usize> {
        let pad = batch.len() - src.len();
        let mut res = Vec::with_capacity(nb);
        let mut idx = vec![0usize; batch.len()];
        for _ in 0..nb {
            let mut off = 0;
            let mut mul = 1;
            for d in (0..src.len()).rev() {
                let i = if src[d] == 1 { 0 } else { idx[d + pad] };
                off += i * mul;
                mul *= src[d];
            }
            res.push(off * stride);
            for d in (0..batch.len()).rev() {
                idx[d] += 1;
                if idx[d] < batch[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        res
    };
    let a_offs = offs(ab, m * k);
    let b_offs = offs(bb, k * n);
    let mut shape = batch.clone();
    if !a1d {
        shape.push(m);
    }
    if !b1d {
        shape.push(n);
    }
    Ok(MatmulPlan {
        m,
        k,
        n,
        a_offs,
        b_offs,
        shape,
    })
}

pub(crate) struct MatmulPlan {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a_offs: Vec<usize>,
    pub b_offs: Vec<usize>,
    pub shape: Vec<usize>,
}

/// The batch plan of a numpy-style matrix multiply (shared with MatMulInteger and friends).
pub(crate) fn matmul_shapes(a: &[usize], b: &[usize]) -> Result<MatmulPlan> {
    matmul_plan(a, b)
}

fn matmul(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(ins, 0)?;
    let b = input(ins, 1)?;
    if a.dtype() != b.dtype() {
        return Err(Error::arg(format!(
            "MatMul: A is {} but B is {}",
            a.dtype(),
            b.dtype()
        )));
    }
    let p = matmul_plan(a.shape(), b.shape())?;
    let (m, k, n) = (p.m, p.k, p.n);
    let total = numel(&p.shape)?;
    if a.dtype().is_float() {
        let av = a.to_f32();
        let bv = b.to_f32();
        let fill = |out: &mut [f32]| -> Result<()> {
            for (i, (&ao, &bo)) in p.a_offs.iter().zip(&p.b_offs).enumerate() {
                let err = || Error::arg("MatMul: operand sizes do not match");
                sgemm_par(
                    1.0,
                    MatRef::row_major(av.get(ao..ao + m * k).ok_or_else(err)?, m, k),
                    MatRef::row_major(bv.get(bo..bo + k * n).ok_or_else(err)?, k, n),
                    0.0,
                    out.get_mut(i * m * n..(i + 1) * m * n).ok_or_else(err)?,
                    n,
                )
                .map_err(|_| err())?;
            }
            Ok(())
        };
        return Ok(vec![ctx.f32_output(a.dtype(), p.shape.clone(), fill)?]);
    }
    if !a.dtype().is_int() {
        return Err(Error::unsupported(format!("MatMul on {}", a.dtype())));
    }
    let av = a.to_i64_vec();
    let bv = b.to_i64_vec();
    let mut out = vec![0i64; total];
    for (bi, (&ao, &bo)) in p.a_offs.iter().zip(&p.b_offs).enumerate() {
        let o = &mut out[bi * m * n..(bi + 1) * m * n];
        for i in 0..m {
            for kk in 0..k {
                let x = av[ao + i * k + kk];
                let brow = &bv[bo + kk * n..bo + kk * n + n];
                for (dst, &y) in o[i * n..i * n + n].iter_mut().zip(brow) {
                    *dst = dst.wrapping_add(x.wrapping_mul(y));
                }
            }
        }
    }
    let t = Tensor::from_vec(p.shape, out)?;
    Ok(vec![t.cast(a.dtype())?])
}

// ---------------------------------------------------------------------------------------------
// Normalisations.

/// Per-channel parameter vector of length `c`.
fn param(t: &Tensor, c: usize, what: &str) -> Result<Vec<f32>> {
    let v = fvec(t, what)?;
    if v.len() != c {
        return Err(Error::arg(format!(
            "{what} has {} elements, expected {c}",
            v.len()
        )));
    }
    Ok(v.into_owned())
}

fn nc_layout(x: &Tensor, op: &str) -> Result<(usize, usize, usize)> {
    if x.rank() < 2 {
        return Err(Error::arg(format!(
            "{op}: input has rank {}, expected at least 2",
            x.rank()
        )));
    }
    let s = x.shape();
    Ok((s[0], s[1], numel(&s[2..])?))
}

fn batch_norm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (n, c, sp) = nc_layout(x, "BatchNormalization")?;
    let scale = param(input(ins, 1)?, c, "BatchNormalization scale")?;
    let bias = param(input(ins, 2)?, c, "BatchNormalization B")?;
    let mean_in = param(input(ins, 3)?, c, "BatchNormalization mean")?;
    let var_in = param(input(ins, 4)?, c, "BatchNormalization var")?;
    let eps = ctx.f("epsilon", 1e-5);
    let training = ctx.opset >= 14 && ctx.i("training_mode", 0) != 0;
    let xv = fvec(x, "BatchNormalization X")?;
    let (mean, var) = if training {
        let mut mean = vec![0f64; c];
        let mut var = vec![0f64; c];
        let cnt = (n * sp).max(1) as f64;
        for b in 0..n {
            for ch in 0..c {
                let row = &xv[(b * c + ch) * sp..(b * c + ch + 1) * sp];
                mean[ch] += row.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        mean.iter_mut().for_each(|m| *m /= cnt);
        for b in 0..n {
            for ch in 0..c {
                let row = &xv[(b * c + ch) * sp..(b * c + ch + 1) * sp];
                var[ch] += row
                    .iter()
                    .map(|&v| (v as f64 - mean[ch]).powi(2))
                    .sum::<f64>();
            }
        }
        var.iter_mut().for_each(|v| *v /= cnt);
        (mean, var)
    } else {
        (
            mean_in.iter().map(|&v| v as f64).collect(),
            var_in.iter().map(|&v| v as f64).collect(),
        )
    };
    let mut out = zeros_f32(xv.len())?;
    for b in 0..n {
        for ch in 0..c {
            let k = scale[ch] as f64 / (var[ch] + eps as f64).sqrt();
            let off = bias[ch] as f64 - mean[ch] * k;
            let (k, off) = (k as f32, off as f32);
            let base = (b * c + ch) * sp;
            for (o, &v) in out[base..base + sp].iter_mut().zip(&xv[base..base + sp]) {
                *o = v * k + off;
            }
        }
    }
    let mut res = vec![ftensor(x.dtype(), x.shape().to_vec(), out)?];
    if training {
        let mom = ctx.f("momentum", 0.9) as f64;
        let rm: Vec<f32> = mean_in
            .iter()
            .zip(&mean)
            .map(|(&r, &m)| (r as f64 * mom + m * (1.0 - mom)) as f32)
            .collect();
        let rv: Vec<f32> = var_in
            .iter()
            .zip(&var)
            .map(|(&r, &v)| (r as f64 * mom + v * (1.0 - mom)) as f32)
            .collect();
        let md = input(ins, 3)?.dtype();
        res.push(ftensor(md, vec![c], rm)?);
        res.push(ftensor(md, vec![c], rv)?);
    } else if ctx.node.outputs.len() > 1 && ctx.node.outputs[1..].iter().any(|o| o.is_some()) {
        return Err(Error::unsupported(
            "BatchNormalization: extra outputs are only defined in training mode",
        ));
    }
    Ok(res)
}

/// Mean and variance (population) of a slice, in f64.
fn mean_var(v: &[f32]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n;
    (m, var)
}

fn instance_norm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (n, c, sp) = nc_layout(x, "InstanceNormalization")?;
    let scale = param(input(ins, 1)?, c, "InstanceNormalization scale")?;
    let bias = param(input(ins, 2)?, c, "InstanceNormalization B")?;
    let eps = ctx.f("epsilon", 1e-5) as f64;
    let xv = fvec(x, "InstanceNormalization input")?;
    let mut out = zeros_f32(xv.len())?;
    for b in 0..n {
        for ch in 0..c {
            let base = (b * c + ch) * sp;
            let row = &xv[base..base + sp];
            let (m, var) = mean_var(row);
            let k = scale[ch] as f64 / (var + eps).sqrt();
            for (o, &v) in out[base..base + sp].iter_mut().zip(row) {
                *o = ((v as f64 - m) * k + bias[ch] as f64) as f32;
            }
        }
    }
    Ok(vec![ftensor(x.dtype(), x.shape().to_vec(), out)?])
}

fn layer_norm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let rank = x.rank();
    let axis = norm_axis(ctx.i("axis", -1), rank)?;
    let eps = ctx.f("epsilon", 1e-5) as f64;
    let shape = x.shape();
    let outer = numel(&shape[..axis])?;
    let inner_shape = &shape[axis..];
    let inner = numel(inner_shape)?;
    let bcast = |t: &Tensor, what: &str| -> Result<Vec<f32>> {
        let v = fvec(t, what)?;
        Ok(View::contiguous(v, t.shape().to_vec())
            .broadcast_to(inner_shape)
            .map_err(|_| {
                Error::arg(format!(
                    "{what} {:?} does not broadcast to {inner_shape:?}",
                    t.shape()
                ))
            })?
            .to_vec())
    };
    let scale = bcast(input(ins, 1)?, "LayerNormalization Scale")?;
    let bias = match opt_input(ins, 2) {
        Some(b) => Some(bcast(b, "LayerNormalization B")?),
        None => None,
    };
    let xv = fvec(x, "LayerNormalization X")?;
    let mut out = zeros_f32(xv.len())?;
    let mut means = Vec::with_capacity(outer);
    let mut inv = Vec::with_capacity(outer);
    for o in 0..outer {
        let row = &xv[o * inner..(o + 1) * inner];
        let (m, var) = mean_var(row);
        let is = 1.0 / (var + eps).sqrt();
        means.push(m as f32);
        inv.push(is as f32);
        for (j, (dst, &v)) in out[o * inner..(o + 1) * inner]
            .iter_mut()
            .zip(row)
            .enumerate()
        {
            let mut y = (v as f64 - m) * is * scale[j] as f64;
            if let Some(b) = &bias {
                y += b[j] as f64;
            }
            *dst = y as f32;
        }
    }
    let mut stat_shape = shape[..axis].to_vec();
    stat_shape.extend(std::iter::repeat_n(1, rank - axis));
    // Mean/InvStdDev use stash_type (float by default).
    let stat_dtype = if ctx.i("stash_type", 1) == 1 {
        DType::F32
    } else {
        x.dtype()
    };
    Ok(vec![
        ftensor(x.dtype(), shape.to_vec(), out)?,
        ftensor(stat_dtype, stat_shape.clone(), means)?,
        ftensor(stat_dtype, stat_shape, inv)?,
    ])
}

fn group_norm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (n, c, sp) = nc_layout(x, "GroupNormalization")?;
    let g = ctx.i("num_groups", 0);
    if g <= 0 || c % g as usize != 0 {
        return Err(Error::arg(format!(
            "GroupNormalization: num_groups {g} does not divide {c} channels"
        )));
    }
    let g = g as usize;
    let eps = ctx.f("epsilon", 1e-5) as f64;
    let sv = fvec(input(ins, 1)?, "GroupNormalization scale")?;
    let bv = fvec(input(ins, 2)?, "GroupNormalization bias")?;
    let cg = c / g;
    // Opset 18 has per-group parameters, opset 21 per-channel ones.
    let per_channel = |v: &[f32], what: &str| -> Result<Vec<f32>> {
        if v.len() == c {
            Ok(v.to_vec())
        } else if v.len() == g {
            Ok((0..c).map(|ch| v[ch / cg]).collect())
        } else {
            Err(Error::arg(format!(
                "GroupNormalization: {what} has {} elements, expected {c} or {g}",
                v.len()
            )))
        }
    };
    let scale = per_channel(&sv, "scale")?;
    let bias = per_channel(&bv, "bias")?;
    let xv = fvec(x, "GroupNormalization X")?;
    let mut out = zeros_f32(xv.len())?;
    let gl = cg * sp;
    for b in 0..n {
        for gi in 0..g {
            let base = (b * c + gi * cg) * sp;
            let (m, var) = mean_var(&xv[base..base + gl]);
            let is = 1.0 / (var + eps).sqrt();
            for j in 0..gl {
                let ch = gi * cg + j / sp.max(1);
                out[base + j] =
                    ((xv[base + j] as f64 - m) * is * scale[ch] as f64 + bias[ch] as f64) as f32;
            }
        }
    }
    Ok(vec![ftensor(x.dtype(), x.shape().to_vec(), out)?])
}

fn mvn(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let rank = x.rank();
    let axes = ctx.ints("axes").unwrap_or_else(|| vec![0, 2, 3]);
    let mut red = vec![false; rank];
    for &a in &axes {
        red[norm_axis(a, rank)?] = true;
    }
    let xv = fvec(x, "MeanVarianceNormalization input")?;
    let shape = x.shape().to_vec();
    // Group elements by their index over the kept axes.
    let strides = edgehal_core::tensor::contiguous_strides(&shape);
    let kept: Vec<usize> = (0..rank).filter(|&d| !red[d]).collect();
    let key_of = |flat: usize| -> usize {
        let mut key = 0;
        for &d in &kept {
            let i = (flat / strides[d] as usize) % shape[d];
            key = key * shape[d] + i;
        }
        key
    };
    let groups = kept.iter().map(|&d| shape[d]).product::<usize>();
    let mut sum = vec![0f64; groups];
    let mut sq = vec![0f64; groups];
    let mut cnt = vec![0f64; groups];
    let keys: Vec<usize> = (0..xv.len()).map(key_of).collect();
    for (i, &v) in xv.iter().enumerate() {
        sum[keys[i]] += v as f64;
        sq[keys[i]] += (v as f64) * (v as f64);
        cnt[keys[i]] += 1.0;
    }
    let out: Vec<f32> = xv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = keys[i];
            let m = sum[k] / cnt[k];
            let var = sq[k] / cnt[k] - m * m;
            ((v as f64 - m) / (var.max(0.0).sqrt() + 1e-9)) as f32
        })
        .collect();
    Ok(vec![ftensor(x.dtype(), shape, out)?])
}

fn lrn(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (n, c, sp) = nc_layout(x, "LRN")?;
    let size = ctx.i("size", 0);
    if size <= 0 {
        return Err(Error::arg(format!(
            "LRN: size must be positive, got {size}"
        )));
    }
    let size = size as usize;
    let alpha = ctx.f("alpha", 1e-4) as f64;
    let beta = ctx.f("beta", 0.75) as f64;
    let bias = ctx.f("bias", 1.0) as f64;
    let before = (size - 1) / 2;
    let after = size - 1 - before;
    let xv = fvec(x, "LRN input")?;
    let mut out = zeros_f32(xv.len())?;
    for b in 0..n {
        for ch in 0..c {
            let lo = ch.saturating_sub(before);
            let hi = (ch + after).min(c - 1);
            for s in 0..sp {
                let mut acc = 0f64;
                for cc in lo..=hi {
                    let v = xv[(b * c + cc) * sp + s] as f64;
                    acc += v * v;
                }
                let i = (b * c + ch) * sp + s;
                out[i] = (xv[i] as f64 / (bias + alpha / size as f64 * acc).powf(beta)) as f32;
            }
        }
    }
    Ok(vec![ftensor(x.dtype(), x.shape().to_vec(), out)?])
}

fn dropout(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if ctx.opset >= 12 {
        let training = opt_input(ins, 2)
            .map(|t| t.to_i64_vec().first().copied().unwrap_or(0) != 0)
            .unwrap_or(false);
        let ratio = opt_input(ins, 1)
            .map(|t| t.to_f64_vec().first().copied().unwrap_or(0.5))
            .unwrap_or(0.5);
        if training && ratio != 0.0 {
            return Err(Error::unsupported(
                "Dropout: training_mode with a non-zero ratio (random masks) is not supported",
            ));
        }
    }
    let mask = Tensor::from_bools(x.shape().to_vec(), vec![true; x.len()])?;
    Ok(vec![x.clone(), mask])
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::collections::BTreeMap;

    use edgehal_core::graph::{Attr, Node};
    use edgehal_core::{Result, Tensor};

    use crate::ops::{OpCtx, Registry};

    /// Run one op by name with the given attributes and opset.
    pub fn run_op(
        op: &str,
        opset: i64,
        attrs: Vec<(&str, Attr)>,
        ins: &[Option<&Tensor>],
        n_out: usize,
    ) -> Result<Vec<Tensor>> {
        let node = Node {
            op: op.to_string(),
            attrs: attrs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
            outputs: (0..n_out).map(Some).collect(),
            ..Default::default()
        };
        let ctx = OpCtx {
            node: &node,
            opset,
            subgraph: None,
            dest: None,
        };
        let f = Registry::new()
            .get("", op)
            .ok_or_else(|| edgehal_core::Error::unsupported(op.to_string()))?;
        f(&ctx, ins)
    }

    pub fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    pub fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 + 1e-4 * y.abs(), "{a:?} vs {b:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use edgehal_core::graph::Attr;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.5, 0.999_593_047_982_555),
            (3.5, 0.999_999_256_901_627_7),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((super::erf(x) - want).abs() < 1e-10, "erf({x})");
        }
    }

    #[test]
    fn softmax_opset_11_coerces_to_2d_and_13_is_per_axis() {
        let x = t(&[2, 2], &[0.0, 0.0, 0.0, 0.0]);
        let a = run_op("Softmax", 11, vec![("axis", Attr::Int(0))], &[Some(&x)], 1).unwrap();
        close(&a[0].to_vec::<f32>().unwrap(), &[0.25; 4]);
        let b = run_op("Softmax", 13, vec![("axis", Attr::Int(0))], &[Some(&x)], 1).unwrap();
        close(&b[0].to_vec::<f32>().unwrap(), &[0.5; 4]);
    }

    #[test]
    fn gemm_transposes_and_broadcasts_c() {
        let a = t(&[2, 2], &[1., 2., 3., 4.]); // used transposed: [[1,3],[2,4]]
        let b = t(&[2, 2], &[1., 0., 0., 1.]);
        let c = t(&[2], &[10., 20.]);
        let y = run_op(
            "Gemm",
            13,
            vec![("transA", Attr::Int(1)), ("beta", Attr::Float(0.5))],
            &[Some(&a), Some(&b), Some(&c)],
            1,
        )
        .unwrap();
        close(&y[0].to_vec::<f32>().unwrap(), &[6., 13., 7., 14.]);
    }

    #[test]
    fn matmul_broadcasts_batches_and_1d() {
        let a = t(&[2, 1, 2], &[1., 2., 3., 4.]);
        let b = t(&[2], &[1., 1.]);
        let y = run_op("MatMul", 13, vec![], &[Some(&a), Some(&b)], 1).unwrap();
        assert_eq!(y[0].shape(), &[2, 1]);
        close(&y[0].to_vec::<f32>().unwrap(), &[3., 7.]);
    }

    #[test]
    fn clip_takes_bounds_from_inputs_after_opset_11() {
        let x = t(&[3], &[-2., 0.5, 3.]);
        let lo = t(&[], &[-1.]);
        let y = run_op("Clip", 13, vec![], &[Some(&x), Some(&lo), None], 1).unwrap();
        close(&y[0].to_vec::<f32>().unwrap(), &[-1., 0.5, 3.]);
        let y = run_op("Clip", 6, vec![("max", Attr::Float(1.0))], &[Some(&x)], 1).unwrap();
        close(&y[0].to_vec::<f32>().unwrap(), &[-2., 0.5, 1.]);
    }
}
