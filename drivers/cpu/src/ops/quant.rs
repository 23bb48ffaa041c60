//! Ops: linear quantization (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear) and the
//! integer matmul/conv family (MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv).
//!
//! - Integer products accumulate in i32, exactly (wrapping): 8-bit operands go through the
//!   int8 GEMM `edgehal_kernels::qgemm` (SIMD variant chosen at run time, zero points applied
//!   by row/column-sum compensation) when a SIMD int8 variant runs; other integer types, n-d convolutions and grouped ones
//!   with fewer than 4 outputs per group use `edgehal_kernels::gemm::igemm_i32`.
//! - Requantization multiplies the i32 accumulator by `scale_a * scale_b / scale_y` (computed
//!   in the scales' own precision, as the ONNX reference does) and rounds half to even before
//!   adding the zero point and saturating.
//! - Scales and zero points may be per tensor, per axis (`axis`) or, for Quantize/Dequantize
//!   from opset 21, blocked (`block_size`).

use edgehal_core::half::f16;
use edgehal_core::{DType, Error, Result, Tensor};
use edgehal_kernels::gemm::igemm_i32;
use edgehal_kernels::qconv;
use edgehal_kernels::qgemm::{qgemm, PackedB, QData, QMat};
use std::borrow::Cow;

use super::nn::{ftensor, geom, im2col, matmul_shapes, numel, Geom};
use super::{input, norm_axis, opt_input, OpCtx, Registry};

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("QuantizeLinear", quantize_linear);
    r.add("DequantizeLinear", dequantize_linear);
    r.add("DynamicQuantizeLinear", dynamic_quantize_linear);
    r.add("MatMulInteger", matmul_integer);
    r.add("QLinearMatMul", qlinear_matmul);
    r.add("ConvInteger", conv_integer);
    r.add("QLinearConv", qlinear_conv);
}

/// The representable range of a quantized integer type.
fn qrange(dt: DType) -> Result<(i64, i64)> {
    Ok(match dt {
        DType::U8 => (0, 255),
        DType::I8 => (-128, 127),
        DType::U16 => (0, 65535),
        DType::I16 => (-32768, 32767),
        DType::I32 => (i32::MIN as i64, i32::MAX as i64),
        d => {
            return Err(Error::unsupported(format!(
                "quantized type {d} (supported: uint8, int8, uint16, int16, int32)"
            )))
        }
    })
}

/// An 8-bit tensor's values as stored (the operand types of the int8 GEMM).
pub(crate) enum Q8<'a> {
    U8(Cow<'a, [u8]>),
    I8(Cow<'a, [i8]>),
}

impl<'a> Q8<'a> {
    /// The values of a u8 / i8 tensor; `None` for other types.
    pub(crate) fn of(t: &'a Tensor) -> Option<Q8<'a>> {
        match t.dtype() {
            DType::U8 => t.as_slice::<u8>().ok().map(Q8::U8),
            DType::I8 => t.as_slice::<i8>().ok().map(Q8::I8),
            _ => None,
        }
    }
    pub(crate) fn len(&self) -> usize {
        match self {
            Q8::U8(v) => v.len(),
            Q8::I8(v) => v.len(),
        }
    }
    /// `rows x cols` row-major matrix starting at element `off`; `None` past the end.
    pub(crate) fn mat(&self, off: usize, rows: usize, cols: usize) -> Option<QMat<'_>> {
        let end = off.checked_add(rows.checked_mul(cols)?)?;
        let data = match self {
            Q8::U8(v) => QData::U8(v.get(off..end)?),
            Q8::I8(v) => QData::I8(v.get(off..end)?),
        };
        Some(QMat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        })
    }
}

/// Whether the int8 GEMM has a SIMD variant in this process. Its portable tile is slower than
/// the i32 loops below (measured on mobilenet_v2_keras_int8: 173 ms vs 100 ms), so without
/// VNNI / dotprod / i8mm the ops keep those.
pub(crate) fn int8_simd() -> bool {
    edgehal_kernels::dispatch::selected_int8() != edgehal_kernels::dispatch::Variant::Portable
}

/// A zero point as i32 when it is representable in `dt` (u8 / i8), the condition for padding
/// an 8-bit image with it.
pub(crate) fn zp_in(dt: DType, z: i64) -> Option<i32> {
    let ok = match dt {
        DType::U8 => (0..=255).contains(&z),
        DType::I8 => (-128..=127).contains(&z),
        _ => false,
    };
    ok.then_some(z as i32)
}

/// Saturate `vals` to `dt` and build the tensor.
fn qtensor(dt: DType, shape: Vec<usize>, vals: Vec<i64>) -> Result<Tensor> {
    let (lo, hi) = qrange(dt)?;
    let v: Vec<i64> = vals.into_iter().map(|x| x.clamp(lo, hi)).collect();
    Tensor::from_vec(shape, v)?.cast(dt)
}

/// Round half to even, then saturate into an i64 (NaN becomes 0).
fn rne(v: f64) -> i64 {
    let r = v.round_ties_even();
    if r.is_nan() {
        0
    } else {
        r.clamp(i64::MIN as f64, i64::MAX as f64) as i64
    }
}

fn int_vec(t: &Tensor, what: &str) -> Result<Vec<i64>> {
    if !t.dtype().is_int() {
        return Err(Error::arg(format!(
            "{what} must be an integer tensor, got {}",
            t.dtype()
        )));
    }
    Ok(t.to_i64_vec())
}

/// How a scale / zero-point tensor maps onto the elements of the data tensor.
enum Layout {
    PerTensor,
    /// `index = (i / inner) % dim`
    PerAxis {
        inner: usize,
        dim: usize,
    },
    /// `i = (o*D + a)*inner + r` maps to `(o*Dp + a/block)*inner + r`
    Blocked {
        inner: usize,
        d: usize,
        dp: usize,
        block: usize,
    },
}

impl Layout {
    fn index(&self, i: usize) -> usize {
        match *self {
            Layout::PerTensor => 0,
            Layout::PerAxis { inner, dim } => (i / inner) % dim,
            Layout::Blocked {
                inner,
                d,
                dp,
                block,
            } => {
                let r = i % inner;
                let a = (i / inner) % d;
                let o = i / (inner * d);
                (o * dp + a / block) * inner + r
            }
        }
    }
}

fn param_layout(ctx: &OpCtx<'_>, x: &[usize], scale: &[usize], op: &str) -> Result<Layout> {
    let n: usize = scale.iter().product();
    let block = if ctx.opset >= 21 {
        ctx.i("block_size", 0)
    } else {
        0
    };
    if block < 0 {
        return Err(Error::arg(format!("{op}: negative block_size {block}")));
    }
    if block == 0 && n == 1 && scale.len() <= 1 {
        return Ok(Layout::PerTensor);
    }
    let axis = norm_axis(ctx.i("axis", 1), x.len())?;
    let inner = numel(&x[axis + 1..])?;
    if block == 0 {
        if scale.len() != 1 || scale[0] != x[axis] {
            return Err(Error::arg(format!(
                "{op}: scale shape {scale:?} must be a scalar or [{}] (axis {axis} of {x:?})",
                x[axis]
            )));
        }
        return Ok(Layout::PerAxis {
            inner,
            dim: x[axis],
        });
    }
    let block = block as usize;
    let ok = scale.len() == x.len()
        && (0..x.len()).all(|d| {
            if d == axis {
                scale[d] == x[d].div_ceil(block)
            } else {
                scale[d] == x[d]
            }
        });
    if !ok {
        return Err(Error::arg(format!(
            "{op}: scale shape {scale:?} does not match input {x:?} blocked by {block} on axis {axis}"
        )));
    }
    Ok(Layout::Blocked {
        inner,
        d: x[axis],
        dp: scale[axis],
        block,
    })
}

fn check_zp(zp: Option<&Tensor>, scale: &Tensor, op: &str) -> Result<()> {
    if let Some(z) = zp {
        if z.shape() != scale.shape() && !(z.len() == 1 && scale.len() == 1) {
            return Err(Error::arg(format!(
                "{op}: zero point shape {:?} differs from scale shape {:?}",
                z.shape(),
                scale.shape()
            )));
        }
    }
    Ok(())
}

fn quantize_linear(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let scale = input(ins, 1)?;
    let zp = opt_input(ins, 2);
    check_zp(zp, scale, "QuantizeLinear")?;
    let out_dt = match zp {
        Some(z) => z.dtype(),
        None => match ctx.i("output_dtype", 0) {
            0 => DType::U8,
            c => DType::from_onnx_code(c as i32)
                .ok_or_else(|| Error::unsupported(format!("QuantizeLinear: output_dtype {c}")))?,
        },
    };
    qrange(out_dt)?;
    let layout = param_layout(ctx, x.shape(), scale.shape(), "QuantizeLinear")?;
    let sv = scale.to_f32();
    let zv = match zp {
        Some(z) => int_vec(z, "QuantizeLinear zero point")?,
        None => vec![0; sv.len()],
    };
    let xv = x.to_f32();
    if let Some(t) = quantize_8bit(&xv, &sv, &zv, &layout, out_dt, x.shape())? {
        return Ok(vec![t]);
    }
    let vals: Vec<i64> = xv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = layout.index(i);
            rne((v / sv[k]) as f64).saturating_add(zv[k])
        })
        .collect();
    Ok(vec![qtensor(out_dt, x.shape().to_vec(), vals)?])
}

/// `(scale, zero point)` runs of a per-tensor or per-axis layout over `len` elements: calls
/// `f(range, k)` for consecutive element ranges sharing parameter `k`; `false` for blocked
/// layouts (the caller takes the general path).
fn param_runs(
    layout: &Layout,
    len: usize,
    mut f: impl FnMut(std::ops::Range<usize>, usize),
) -> bool {
    match *layout {
        Layout::PerTensor => f(0..len, 0),
        Layout::PerAxis { inner, dim } => {
            let inner = inner.max(1);
            for (r, start) in (0..len).step_by(inner).enumerate() {
                f(start..(start + inner).min(len), r % dim.max(1));
            }
        }
        Layout::Blocked { .. } => return false,
    }
    true
}

/// QuantizeLinear to u8 / i8 without the i64 detour (same rounding: f32 division, round half to
/// even, saturate); `None` for other output types and blocked layouts.
fn quantize_8bit(
    xv: &[f32],
    sv: &[f32],
    zv: &[i64],
    layout: &Layout,
    dt: DType,
    shape: &[usize],
) -> Result<Option<Tensor>> {
    let (lo, hi) = match dt {
        DType::U8 | DType::I8 => qrange(dt)?,
        _ => return Ok(None),
    };
    // Zero points outside the type's range stay on the i64 path below.
    if zv.iter().all(|&z| (lo..=hi).contains(&z)) {
        let mut q = vec![0u8; xv.len()];
        let ok = param_runs(layout, xv.len(), |r, k| {
            let (s, z) = (sv[k], zv[k] as i32);
            // Vectorized; `clamp(rne(v / s) + z, lo, hi)` with NaN as 0, as below.
            qconv::quantize_f32_even(&xv[r.clone()], s, z, lo as i32, hi as i32, &mut q[r]);
        });
        if !ok {
            return Ok(None);
        }
        return Ok(Some(Tensor::from_vec_dtype(dt, shape.to_vec(), q)?));
    }
    let mut q = vec![0i16; xv.len()];
    let ok = param_runs(layout, xv.len(), |r, k| {
        let (s, z) = (sv[k], zv[k]);
        for (o, &v) in q[r.clone()].iter_mut().zip(&xv[r]) {
            // `as i64` saturates and maps NaN to 0, as `rne` does.
            *o = ((v / s).round_ties_even() as i64)
                .saturating_add(z)
                .clamp(lo, hi) as i16;
        }
    });
    if !ok {
        return Ok(None);
    }
    let shape = shape.to_vec();
    Ok(Some(match dt {
        DType::U8 => Tensor::from_vec(shape, q.into_iter().map(|v| v as u8).collect::<Vec<_>>())?,
        _ => Tensor::from_vec(shape, q.into_iter().map(|v| v as i8).collect::<Vec<_>>())?,
    }))
}

/// DequantizeLinear of u8 / i8 to f32 without the i64 detour; `None` otherwise.
fn dequantize_8bit(
    x: &Tensor,
    sv: &[f32],
    zv: &[i64],
    layout: &Layout,
    scale_dt: DType,
) -> Result<Option<Tensor>> {
    if scale_dt != DType::F32 {
        return Ok(None);
    }
    let xq = match Q8::of(x) {
        Some(q) => q,
        None => return Ok(None),
    };
    // 8-bit values less a zero point of at most 16 bits are exact in i32 (and in f32), so
    // the loop converts from i32, which vectorizes (i64 to f32 does not before AVX-512DQ).
    if zv.iter().any(|&z| i16::try_from(z).is_err()) {
        return Ok(None);
    }
    let mut out = vec![0f32; x.len()];
    let ok = param_runs(layout, x.len(), |r, k| {
        let (s, z) = (sv[k], zv[k] as i32);
        let o = &mut out[r.clone()];
        match &xq {
            Q8::U8(v) => o
                .iter_mut()
                .zip(&v[r])
                .for_each(|(o, &v)| *o = (v as i32 - z) as f32 * s),
            Q8::I8(v) => o
                .iter_mut()
                .zip(&v[r])
                .for_each(|(o, &v)| *o = (v as i32 - z) as f32 * s),
        }
    });
    if !ok {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(x.shape().to_vec(), out)?))
}

fn dequantize_linear(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let scale = input(ins, 1)?;
    let zp = opt_input(ins, 2);
    check_zp(zp, scale, "DequantizeLinear")?;
    if !x.dtype().is_int() {
        return Err(Error::arg(format!(
            "DequantizeLinear input must be an integer tensor, got {}",
            x.dtype()
        )));
    }
    let layout = param_layout(ctx, x.shape(), scale.shape(), "DequantizeLinear")?;
    let sv = scale.to_f32();
    let zv = match zp {
        Some(z) => int_vec(z, "DequantizeLinear zero point")?,
        None => vec![0; sv.len()],
    };
    if let Some(t) = dequantize_8bit(x, &sv, &zv, &layout, scale.dtype())? {
        return Ok(vec![t]);
    }
    let xv = int_vec(x, "DequantizeLinear input")?;
    let out: Vec<f32> = xv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = layout.index(i);
            (v - zv[k]) as f32 * sv[k]
        })
        .collect();
    let dt = if scale.dtype().is_float() {
        scale.dtype()
    } else {
        DType::F32
    };
    Ok(vec![ftensor(dt, x.shape().to_vec(), out)?])
}

fn dynamic_quantize_linear(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if !x.dtype().is_float() {
        return Err(Error::arg(format!(
            "DynamicQuantizeLinear: input must be float, got {}",
            x.dtype()
        )));
    }
    let xv = x.to_f32();
    let min = xv.iter().copied().fold(0f32, f32::min);
    let max = xv.iter().copied().fold(0f32, f32::max);
    let scale = (max - min) / 255.0;
    let (zp, vals) = if scale == 0.0 || !scale.is_finite() {
        (0i64, vec![0i64; xv.len()])
    } else {
        let zp = rne((0.0 - min / scale).clamp(0.0, 255.0) as f64);
        let vals = xv
            .iter()
            .map(|&v| rne((v / scale) as f64).saturating_add(zp))
            .collect();
        (zp, vals)
    };
    Ok(vec![
        qtensor(DType::U8, x.shape().to_vec(), vals)?,
        Tensor::scalar(scale),
        qtensor(DType::U8, vec![], vec![zp])?,
    ])
}

/// Values minus a zero point that is per tensor or varies along one axis of the data
/// (`index = (i / inner) % dim`).
fn minus_zp(v: &[i64], zp: &[i64], inner: usize, dim: usize) -> Vec<i32> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            let z = if zp.len() == 1 {
                zp[0]
            } else {
                zp[(i / inner.max(1)) % dim.max(1)]
            };
            (x - z) as i32
        })
        .collect()
}

/// `(A - a_zp) x (B - b_zp)` with numpy batching; a_zp may be per row of A, b_zp per column of B.
fn int_matmul(
    a: &Tensor,
    b: &Tensor,
    azp: Option<&Tensor>,
    bzp: Option<&Tensor>,
    op: &str,
) -> Result<(Vec<i32>, Vec<usize>, usize, usize)> {
    let p = matmul_shapes(a.shape(), b.shape())?;
    let (m, k, n) = (p.m, p.k, p.n);
    let zp_of = |z: Option<&Tensor>, len: usize, what: &str| -> Result<Vec<i64>> {
        match z {
            None => Ok(vec![0]),
            Some(z) => {
                let v = int_vec(z, what)?;
                if v.len() == 1 || v.len() == len {
                    Ok(v)
                } else {
                    Err(Error::arg(format!(
                        "{op}: {what} has {} values, expected 1 or {len}",
                        v.len()
                    )))
                }
            }
        }
    };
    let az = zp_of(azp, m, "a_zero_point")?;
    let bz = zp_of(bzp, n, "b_zero_point")?;
    let total = numel(&p.shape)?;
    if let (Some(aq), Some(bq), true) = (Q8::of(a), Q8::of(b), int8_simd()) {
        let az32: Vec<i32> = az.iter().map(|&z| z as i32).collect();
        let bz32: Vec<i32> = bz.iter().map(|&z| z as i32).collect();
        let mut out = vec![0i32; total];
        let mut packed: Option<(usize, PackedB)> = None;
        for (i, (&ao, &bo)) in p.a_offs.iter().zip(&p.b_offs).enumerate() {
            if packed.as_ref().map(|(o, _)| *o) != Some(bo) {
                let bm = bq.mat(bo, k, n);
                let pb = bm.and_then(|bm| PackedB::new(bm, &bz32));
                let pb = pb.ok_or_else(|| Error::arg(format!("{op}: B is too short")))?;
                packed = Some((bo, pb));
            }
            let (Some((_, pb)), Some(am)) = (&packed, aq.mat(ao, m, k)) else {
                return Err(Error::arg(format!("{op}: A is too short")));
            };
            let dst = &mut out[i * m * n..(i + 1) * m * n];
            if !qgemm(am, &az32, pb, dst, n, 1) {
                return Err(Error::arg(format!("{op}: operand sizes do not match")));
            }
        }
        return Ok((out, p.shape, m, n));
    }
    let av = minus_zp(&int_vec(a, "A")?, &az, k, m);
    let bv = minus_zp(&int_vec(b, "B")?, &bz, 1, n);
    let mut out = vec![0i32; total];
    for (i, (&ao, &bo)) in p.a_offs.iter().zip(&p.b_offs).enumerate() {
        if !igemm_i32(
            m,
            n,
            k,
            &av[ao..ao + m * k],
            &bv[bo..bo + k * n],
            &mut out[i * m * n..(i + 1) * m * n],
        ) {
            return Err(Error::arg(format!("{op}: operand sizes do not match")));
        }
    }
    Ok((out, p.shape, m, n))
}

fn matmul_integer(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (out, shape, _, _) = int_matmul(
        input(ins, 0)?,
        input(ins, 1)?,
        opt_input(ins, 2),
        opt_input(ins, 3),
        "MatMulInteger",
    )?;
    Ok(vec![Tensor::from_vec(shape, out)?])
}

/// Scale values, rounded through the scale's own type (f16 scales multiply in f16 precision,
/// as the ONNX reference computes them).
fn scales(t: &Tensor) -> Vec<f32> {
    t.to_f32().into_owned()
}

fn round_to(dt: DType, v: f32) -> f32 {
    match dt {
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => edgehal_core::half::bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The requantization multiplier `sa * sb / sy` in the scale type's precision.
fn multiplier(dt: DType, sa: f32, sb: f32, sy: f32) -> f64 {
    let p = round_to(dt, sa * sb);
    round_to(dt, p / sy) as f64
}

fn pick(v: &[f32], i: usize) -> f32 {
    if v.len() == 1 {
        v[0]
    } else {
        v[i]
    }
}

fn qlinear_matmul(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(ins, 0)?;
    let a_s = input(ins, 1)?;
    let b = input(ins, 3)?;
    let b_s = input(ins, 4)?;
    let y_s = input(ins, 6)?;
    let y_zp = opt_input(ins, 7);
    let (acc, shape, m, n) =
        int_matmul(a, b, opt_input(ins, 2), opt_input(ins, 5), "QLinearMatMul")?;
    let (asv, bsv, ysv) = (scales(a_s), scales(b_s), scales(y_s));
    if (asv.len() != 1 && asv.len() != m) || (bsv.len() != 1 && bsv.len() != n) || ysv.len() != 1 {
        return Err(Error::arg(
            "QLinearMatMul: scales must be scalars, per row of A or per column of B",
        ));
    }
    let yz = match y_zp {
        Some(z) => int_vec(z, "y_zero_point")?.first().copied().unwrap_or(0),
        None => 0,
    };
    let out_dt = y_zp.map(|z| z.dtype()).unwrap_or(a.dtype());
    let dt = a_s.dtype();
    let vals: Vec<i64> = acc
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let col = i % n.max(1);
            let row = (i / n.max(1)) % m.max(1);
            let mul = multiplier(dt, pick(&asv, row), pick(&bsv, col), ysv[0]);
            rne(v as f64 * mul).saturating_add(yz)
        })
        .collect();
    Ok(vec![qtensor(out_dt, shape, vals)?])
}

/// Integer convolution of zero-point-corrected operands; returns i32 `[n, m, out...]`.
fn conv_i32(
    ctx: &OpCtx<'_>,
    x: &Tensor,
    w: &Tensor,
    x_zp: Option<&Tensor>,
    w_zp: Option<&Tensor>,
    op: &str,
) -> Result<(Vec<i32>, Vec<usize>)> {
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(Error::arg(format!(
            "{op}: X {:?} and W {:?} must be [N, C, spatial...] and [M, C/group, kernel...]",
            x.shape(),
            w.shape()
        )));
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let in_sp = &x.shape()[2..];
    let (m, cg) = (w.shape()[0], w.shape()[1]);
    let group = ctx.i("group", 1).max(1) as usize;
    if c != cg * group || m % group != 0 {
        return Err(Error::arg(format!(
            "{op}: X has {c} channels and W is {:?}, which does not fit group={group}",
            w.shape()
        )));
    }
    let kernel = w.shape()[2..].to_vec();
    let g: Geom = geom(ctx, in_sp, &kernel, false)?;
    let xz = match x_zp {
        Some(z) => {
            let v = int_vec(z, "x_zero_point")?;
            if v.len() != 1 {
                return Err(Error::unsupported(format!(
                    "{op}: per-channel x_zero_point"
                )));
            }
            v
        }
        None => vec![0],
    };
    let wz = match w_zp {
        Some(z) => {
            let v = int_vec(z, "w_zero_point")?;
            if v.len() != 1 && v.len() != m {
                return Err(Error::arg(format!(
                    "{op}: w_zero_point has {} values, expected 1 or {m}",
                    v.len()
                )));
            }
            v
        }
        None => vec![0],
    };
    let in_total = numel(in_sp)?;
    let kt = numel(&kernel)?;
    let kk = cg * kt;
    let p = numel(&g.out)?;
    let mg = m / group;
    let mut shape = vec![n, m];
    shape.extend_from_slice(&g.out);
    if let (Some(xq), Some(wq), Some(xz8)) = (Q8::of(x), Q8::of(w), zp_in(x.dtype(), xz[0])) {
        if in_sp.len() == 2 && mg >= 4 && int8_simd() {
            if xq.len() != n * c * in_total || wq.len() != m * kk {
                return Err(Error::arg(format!("{op}: wrong element counts")));
            }
            edgehal_core::tensor::checked_numel(&[kk, p], DType::I32)?;
            edgehal_core::tensor::checked_numel(&[n, m, p], DType::I32)?;
            let wz32: Vec<i32> = wz.iter().map(|&z| z as i32).collect();
            let out = match &xq {
                Q8::U8(xv) => conv_q8(xv, xz8 as u8, &wq, &wz32, n, c, in_sp, &g, m, group),
                Q8::I8(xv) => conv_q8(xv, xz8 as i8, &wq, &wz32, n, c, in_sp, &g, m, group),
            };
            let out = out.ok_or_else(|| Error::arg(format!("{op}: internal size mismatch")))?;
            return Ok((out, shape));
        }
    }
    let xv = minus_zp(&int_vec(x, "X")?, &xz, 1, 1);
    let wv = minus_zp(&int_vec(w, "W")?, &wz, kk, m);
    if xv.len() != n * c * in_total || wv.len() != m * kk {
        return Err(Error::arg(format!("{op}: wrong element counts")));
    }
    edgehal_core::tensor::checked_numel(&[kk, p], DType::I32)?;
    edgehal_core::tensor::checked_numel(&[n, m, p], DType::I32)?;
    let mut col = vec![0i32; kk * p];
    let mut out = vec![0i32; n * m * p];
    for b in 0..n {
        for gi in 0..group {
            let xg = &xv[(b * c + gi * cg) * in_total..(b * c + (gi + 1) * cg) * in_total];
            im2col(xg, cg, in_sp, &g, &mut col);
            let wg = &wv[gi * mg * kk..(gi + 1) * mg * kk];
            let dst = &mut out[(b * m + gi * mg) * p..(b * m + (gi + 1) * mg) * p];
            if !igemm_i32(mg, p, kk, wg, &col, dst) {
                return Err(Error::arg(format!("{op}: internal size mismatch")));
            }
        }
    }
    Ok((out, shape))
}

/// 8-bit values that can be an int8 GEMM operand.
pub(crate) trait Q8Elem: Copy {
    fn qdata(v: &[Self]) -> QData<'_>;
}
impl Q8Elem for u8 {
    fn qdata(v: &[u8]) -> QData<'_> {
        QData::U8(v)
    }
}
impl Q8Elem for i8 {
    fn qdata(v: &[i8]) -> QData<'_> {
        QData::I8(v)
    }
}

/// 2-D im2col of `cg` channels of one NCHW image: `col[(c*kh*kw + ky*kw + kx) * P + p]`,
/// `fill` (the zero point, so it contributes nothing) where a tap falls in the padding.
fn im2col_2d<T: Copy>(x: &[T], cg: usize, in_sp: &[usize], g: &Geom, col: &mut [T], fill: T) {
    let (ih, iw) = (in_sp[0], in_sp[1]);
    let (kh, kw) = (g.k[0], g.k[1]);
    let (oh, ow) = (g.out[0], g.out[1]);
    let p = oh * ow;
    for c in 0..cg {
        let xc = &x[c * ih * iw..(c + 1) * ih * iw];
        for ky in 0..kh {
            for kx in 0..kw {
                let r = (c * kh + ky) * kw + kx;
                let row = &mut col[r * p..(r + 1) * p];
                for oy in 0..oh {
                    let seg = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = (oy * g.s[0] + ky * g.d[0]).checked_sub(g.pb[0]);
                    let Some(iy) = iy.filter(|&v| v < ih) else {
                        seg.fill(fill);
                        continue;
                    };
                    let src = &xc[iy * iw..(iy + 1) * iw];
                    for (ox, o) in seg.iter_mut().enumerate() {
                        let ix = (ox * g.s[1] + kx * g.d[1]).checked_sub(g.pb[1]);
                        *o = match ix.filter(|&v| v < iw) {
                            Some(ix) => src[ix],
                            None => fill,
                        };
                    }
                }
            }
        }
    }
}

/// 2-D integer convolution of 8-bit X (zero point `xz`) and W (zero points `wz`, 1 or m)
/// through the int8 GEMM: per image and group, `Y^T (P x mg) = col^T (P x kk) * W_g^T`, with W_g
/// packed once per call. Returns i32 `[n, m, P]`; `None` on an internal size mismatch.
#[allow(clippy::too_many_arguments)]
fn conv_q8<T: Q8Elem>(
    xv: &[T],
    xz: T,
    w: &Q8<'_>,
    wz: &[i32],
    n: usize,
    c: usize,
    in_sp: &[usize],
    g: &Geom,
    m: usize,
    group: usize,
) -> Option<Vec<i32>> {
    let (cg, mg) = (c / group, m / group);
    let in_total = in_sp[0] * in_sp[1];
    let kk = cg * g.k[0] * g.k[1];
    let p = g.out[0] * g.out[1];
    let xz32 = [match T::qdata(std::slice::from_ref(&xz)) {
        QData::U8(v) => v[0] as i32,
        QData::I8(v) => v[0] as i32,
    }];
    let pointwise = g.k.iter().all(|&k| k == 1)
        && g.s.iter().all(|&s| s == 1)
        && g.pb.iter().chain(&g.pe).all(|&v| v == 0);
    let mut col = vec![xz; if pointwise { 0 } else { kk * p }];
    let mut out = vec![0i32; n * m * p];
    for gi in 0..group {
        let wg = w.mat(gi * mg * kk, mg, kk)?.t();
        let wzg = if wz.len() == 1 {
            wz
        } else {
            wz.get(gi * mg..(gi + 1) * mg)?
        };
        let pb = PackedB::new(wg, wzg)?;
        for b in 0..n {
            let xg = xv.get((b * c + gi * cg) * in_total..(b * c + (gi + 1) * cg) * in_total)?;
            let cols: &[T] = if pointwise {
                xg
            } else {
                im2col_2d(xg, cg, in_sp, g, &mut col, xz);
                &col
            };
            let a = QMat {
                data: T::qdata(cols),
                rows: kk,
                cols: p,
                rs: p,
                cs: 1,
            }
            .t();
            let dst = out.get_mut((b * m + gi * mg) * p..(b * m + (gi + 1) * mg) * p)?;
            if !qgemm(a, &xz32, &pb, dst, 1, p) {
                return None;
            }
        }
    }
    Some(out)
}

fn conv_integer(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (out, shape) = conv_i32(
        ctx,
        input(ins, 0)?,
        input(ins, 1)?,
        opt_input(ins, 2),
        opt_input(ins, 3),
        "ConvInteger",
    )?;
    Ok(vec![Tensor::from_vec(shape, out)?])
}

pub(crate) fn qlinear_conv(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let x_s = input(ins, 1)?;
    let w = input(ins, 3)?;
    let w_s = input(ins, 4)?;
    let y_s = input(ins, 6)?;
    let y_zp = opt_input(ins, 7);
    let (acc, shape) = conv_i32(
        ctx,
        x,
        w,
        opt_input(ins, 2),
        opt_input(ins, 5),
        "QLinearConv",
    )?;
    let (n, m) = (shape[0], shape[1]);
    let p = numel(&shape[2..])?;
    let bias: Vec<i64> = match opt_input(ins, 8) {
        Some(b) => {
            let v = int_vec(b, "B")?;
            if v.len() != m {
                return Err(Error::arg(format!(
                    "QLinearConv: B has {} values, expected {m}",
                    v.len()
                )));
            }
            v
        }
        None => vec![0; m],
    };
    let (xsv, wsv, ysv) = (scales(x_s), scales(w_s), scales(y_s));
    if xsv.len() != 1 || ysv.len() != 1 || (wsv.len() != 1 && wsv.len() != m) {
        return Err(Error::arg(
            "QLinearConv: x_scale and y_scale must be scalars, w_scale scalar or per output channel",
        ));
    }
    let yz = match y_zp {
        Some(z) => int_vec(z, "y_zero_point")?.first().copied().unwrap_or(0),
        None => 0,
    };
    let out_dt = y_zp.map(|z| z.dtype()).unwrap_or(x.dtype());
    let dt = x_s.dtype();
    let muls: Vec<f64> = (0..m)
        .map(|oc| multiplier(dt, xsv[0], pick(&wsv, oc), ysv[0]))
        .collect();
    // f32 scales: the product is rounded to f32 before rounding half to even, as
    // onnxruntime's QLinearConv (MlasRequantizeOutput) computes `float(acc + bias) * scale`.
    let f32_product = dt == DType::F32;
    let mut vals = vec![0i64; n * m * p];
    for b in 0..n {
        for oc in 0..m {
            let base = (b * m + oc) * p;
            for j in 0..p {
                let a = acc[base + j] as i64 + bias[oc];
                let v = if f32_product {
                    (a as f32 * muls[oc] as f32) as f64
                } else {
                    a as f64 * muls[oc]
                };
                vals[base + j] = rne(v).saturating_add(yz);
            }
        }
    }
    Ok(vec![qtensor(out_dt, shape, vals)?])
}

#[cfg(test)]
mod tests {
    use super::super::nn::test_util::*;
    use edgehal_core::graph::Attr;
    use edgehal_core::Tensor;

    #[test]
    fn per_axis_quantize_rounds_half_to_even_and_saturates() {
        let x = t(&[2, 3], &[0.5, 1.5, 2.5, -0.5, 300.0, -7.0]);
        let s = t(&[3], &[1.0, 1.0, 0.5]);
        let z = Tensor::from_vec(vec![3], vec![0i8, 10, -1]).unwrap();
        let y = run_op(
            "QuantizeLinear",
            13,
            vec![("axis", Attr::Int(1))],
            &[Some(&x), Some(&s), Some(&z)],
            1,
        )
        .unwrap();
        // 0.5->0, 1.5->2+10, 2.5/0.5=5-1=4, -0.5->-0, 300+10 saturates, -14-1
        assert_eq!(y[0].to_vec::<i8>().unwrap(), vec![0, 12, 4, 0, 127, -15]);
    }

    #[test]
    fn dequantize_per_axis() {
        let x = Tensor::from_vec(vec![2, 2], vec![10u8, 20, 30, 40]).unwrap();
        let s = t(&[2], &[0.5, 2.0]);
        let z = Tensor::from_vec(vec![2], vec![10u8, 0]).unwrap();
        let y = run_op(
            "DequantizeLinear",
            13,
            vec![("axis", Attr::Int(0))],
            &[Some(&x), Some(&s), Some(&z)],
            1,
        )
        .unwrap();
        close(&y[0].to_vec::<f32>().unwrap(), &[0.0, 5.0, 60.0, 80.0]);
    }

    #[test]
    fn matmul_integer_subtracts_zero_points() {
        let a = Tensor::from_vec(vec![1, 2], vec![3u8, 5]).unwrap();
        let b = Tensor::from_vec(vec![2, 1], vec![7u8, 9]).unwrap();
        let az = Tensor::from_vec(vec![], vec![1u8]).unwrap();
        let bz = Tensor::from_vec(vec![], vec![2u8]).unwrap();
        let y = run_op(
            "MatMulInteger",
            10,
            vec![],
            &[Some(&a), Some(&b), Some(&az), Some(&bz)],
            1,
        )
        .unwrap();
        assert_eq!(y[0].to_vec::<i32>().unwrap(), vec![2 * 5 + 4 * 7]);
    }

    struct Rng(u32);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(1664525).wrapping_add(1013904223);
            self.0 >> 8
        }
    }

    /// A u8 or i8 tensor of random values, and the values widened.
    fn q8(r: &mut Rng, shape: &[usize], unsigned: bool) -> (Tensor, Vec<i64>) {
        let n: usize = shape.iter().product();
        let raw: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
        if unsigned {
            let v = raw.iter().map(|&x| x as i64).collect();
            (Tensor::from_vec(shape.to_vec(), raw).unwrap(), v)
        } else {
            let s: Vec<i8> = raw.iter().map(|&x| x as i8).collect();
            let v = s.iter().map(|&x| x as i64).collect();
            (Tensor::from_vec(shape.to_vec(), s).unwrap(), v)
        }
    }

    fn zp_tensor(v: &[i64], unsigned: bool) -> Tensor {
        if unsigned {
            Tensor::from_vec(
                vec![v.len()],
                v.iter().map(|&x| x as u8).collect::<Vec<_>>(),
            )
            .unwrap()
        } else {
            Tensor::from_vec(
                vec![v.len()],
                v.iter().map(|&x| x as i8).collect::<Vec<_>>(),
            )
            .unwrap()
        }
    }

    /// ConvInteger through the int8 GEMM path (2-D, >= 4 outputs per group) against a direct
    /// loop: padding (filled with the zero point), strides, dilations, groups, u8/i8 on both
    /// sides and per-channel weight zero points, bit for bit.
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn conv_integer_int8_gemm_matches_direct_loop() {
        let mut r = Rng(5);
        // (n, c, h, w, m, kh, kw, stride, dilation, pad, group)
        let cases = [
            (1, 3, 9, 7, 8, 3, 3, 1, 1, 1, 1),
            (2, 6, 8, 8, 8, 3, 3, 2, 1, 1, 2),
            (1, 5, 6, 9, 12, 1, 1, 1, 1, 0, 1),
            (1, 4, 10, 10, 5, 3, 2, 1, 2, 2, 1),
            (1, 8, 5, 5, 16, 1, 1, 2, 1, 0, 4),
        ];
        for &(n, c, h, w, m, kh, kw, st, dl, pad, group) in &cases {
            for (xu, wu) in [(true, false), (false, false), (true, true)] {
                let cg = c / group;
                let (x, xv) = q8(&mut r, &[n, c, h, w], xu);
                let (wt, wv) = q8(&mut r, &[m, cg, kh, kw], wu);
                let xz = if xu { 131 } else { -9 };
                let wz: Vec<i64> = (0..m)
                    .map(|_| (r.next() % 256) as i64 - if wu { 0 } else { 128 })
                    .collect();
                let attrs = vec![
                    ("strides", Attr::Ints(vec![st as i64; 2])),
                    ("dilations", Attr::Ints(vec![dl as i64; 2])),
                    ("pads", Attr::Ints(vec![pad as i64; 4])),
                    ("group", Attr::Int(group as i64)),
                ];
                let (xzt, wzt) = (zp_tensor(&[xz], xu), zp_tensor(&wz, wu));
                let y = run_op(
                    "ConvInteger",
                    10,
                    attrs,
                    &[Some(&x), Some(&wt), Some(&xzt), Some(&wzt)],
                    1,
                )
                .unwrap();
                let oh = (h + 2 * pad - dl * (kh - 1) - 1) / st + 1;
                let ow = (w + 2 * pad - dl * (kw - 1) - 1) / st + 1;
                assert_eq!(y[0].shape(), &[n, m, oh, ow]);
                let got = y[0].to_vec::<i32>().unwrap();
                let mg = m / group;
                for b in 0..n {
                    for oc in 0..m {
                        let gi = oc / mg;
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let mut s = 0i64;
                                for ci in 0..cg {
                                    for ky in 0..kh {
                                        for kx in 0..kw {
                                            let iy = (oy * st + ky * dl) as i64 - pad as i64;
                                            let ix = (ox * st + kx * dl) as i64 - pad as i64;
                                            if iy < 0 || ix < 0 || iy >= h as i64 || ix >= w as i64
                                            {
                                                continue;
                                            }
                                            let ch = gi * cg + ci;
                                            let xi =
                                                ((b * c + ch) * h + iy as usize) * w + ix as usize;
                                            let wi = ((oc * cg + ci) * kh + ky) * kw + kx;
                                            s += (xv[xi] - xz) * (wv[wi] - wz[oc]);
                                        }
                                    }
                                }
                                let o = ((b * m + oc) * oh + oy) * ow + ox;
                                assert_eq!(
                                    got[o] as i64, s,
                                    "case c={c} m={m} g={group} u8={xu},{wu}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// MatMulInteger on 8-bit operands (int8 GEMM) against a direct loop: batched A, per-row
    /// a_zero_point, per-column b_zero_point, u8/i8 combinations.
    #[test]
    fn matmul_integer_int8_gemm_matches_direct_loop() {
        let mut r = Rng(9);
        let (bt, m, k, n) = (3, 7, 29, 19);
        for (au, bu) in [(true, false), (false, false), (true, true), (false, true)] {
            let (a, av) = q8(&mut r, &[bt, m, k], au);
            let (b, bv) = q8(&mut r, &[k, n], bu);
            let az: Vec<i64> = (0..m)
                .map(|i| if au { 100 + i as i64 } else { i as i64 - 3 })
                .collect();
            let bz: Vec<i64> = (0..n)
                .map(|j| if bu { 120 + j as i64 } else { 5 - j as i64 })
                .collect();
            let (azt, bzt) = (zp_tensor(&az, au), zp_tensor(&bz, bu));
            let y = run_op(
                "MatMulInteger",
                10,
                vec![],
                &[Some(&a), Some(&b), Some(&azt), Some(&bzt)],
                1,
            )
            .unwrap();
            assert_eq!(y[0].shape(), &[bt, m, n]);
            let got = y[0].to_vec::<i32>().unwrap();
            for t in 0..bt {
                for i in 0..m {
                    for j in 0..n {
                        let s: i64 = (0..k)
                            .map(|p| (av[(t * m + i) * k + p] - az[i]) * (bv[p * n + j] - bz[j]))
                            .sum();
                        assert_eq!(got[(t * m + i) * n + j] as i64, s, "u8={au},{bu}");
                    }
                }
            }
        }
    }
}
