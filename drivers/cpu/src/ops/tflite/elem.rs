//! Elementwise ops: arithmetic with broadcasting, activations, QUANTIZE / DEQUANTIZE / CAST.

use edgehal_core::{DType, Error, Quant, Result, Tensor};
use edgehal_kernels::qconv;

use super::nn::Rounding;
use super::qmath::{act_range_q, type_range, Multiplier};
use super::{
    act, act_f32, float_in, is_quant, out_dtype, q_from_i32, q_to_i32, qparams, quant_of, DOMAIN,
};
use crate::ops::{broadcast_binary, input, OpCtx, Registry};

pub fn register(r: &mut Registry) {
    r.add_domain(DOMAIN, "Add", add);
    r.add_domain(DOMAIN, "Sub", sub);
    r.add_domain(DOMAIN, "Mul", mul);
    r.add_domain(DOMAIN, "Div", div);
    r.add_domain(DOMAIN, "Maximum", maximum);
    r.add_domain(DOMAIN, "Minimum", minimum);
    r.add_domain(DOMAIN, "SquaredDifference", squared_difference);
    r.add_domain(DOMAIN, "Prelu", prelu);
    r.add_domain(DOMAIN, "Logistic", logistic);
    r.add_domain(DOMAIN, "Tanh", tanh);
    r.add_domain(DOMAIN, "Relu", relu);
    r.add_domain(DOMAIN, "Relu6", relu6);
    r.add_domain(DOMAIN, "ReluN1To1", relu_n1_to_1);
    r.add_domain(DOMAIN, "LeakyRelu", leaky_relu);
    r.add_domain(DOMAIN, "HardSwish", hard_swish);
    r.add_domain(DOMAIN, "Rsqrt", rsqrt);
    r.add_domain(DOMAIN, "Sqrt", sqrt);
    r.add_domain(DOMAIN, "Exp", exp);
    r.add_domain(DOMAIN, "Neg", neg);
    r.add_domain(DOMAIN, "Abs", abs);
    r.add_domain(DOMAIN, "Square", square);
    r.add_domain(DOMAIN, "Floor", floor);
    r.add_domain(DOMAIN, "Quantize", quantize);
    r.add_domain(DOMAIN, "Dequantize", dequantize);
    r.add_domain(DOMAIN, "Cast", cast);
}

fn i32_tensor(t: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(t.shape().to_vec(), q_to_i32(t)?)
}

/// Quantize one float to `(scale, zp)` in `[lo, hi]` (round half away from zero).
#[inline]
fn quant1(v: f32, scale: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    qconv::quantize1(v, scale, zp, lo, hi)
}

/// Float binary op with broadcasting and the fused activation.
fn float_binary(
    ctx: &OpCtx<'_>,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32,
) -> Result<Tensor> {
    // Same-shape f32 (the unrolled recurrent cells' gate arithmetic): one pass, no broadcast
    // index walk.
    if a.dtype() == DType::F32 && b.dtype() == DType::F32 && a.shape() == b.shape() {
        let (av, bv) = (float_in(a)?, float_in(b)?);
        let mut v: Vec<f32> = av.iter().zip(bv.iter()).map(|(&x, &y)| f(x, y)).collect();
        act_f32(&act(ctx), &mut v)?;
        return Tensor::from_vec(a.shape().to_vec(), v);
    }
    let (a, b) = (a.cast(DType::F32)?, b.cast(DType::F32)?);
    let t = broadcast_binary::<f32, f32>(&a, &b, f)?;
    let mut v = t.to_vec::<f32>()?;
    act_f32(&act(ctx), &mut v)?;
    Tensor::from_vec(t.shape().to_vec(), v)
}

/// Quantized binary op computed in float: dequantize, apply, requantize (used where TFLite's
/// kernels have no integer-only form or for ops not on the hot path).
fn q_float_binary(
    ctx: &OpCtx<'_>,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32,
) -> Result<Tensor> {
    let (s1, z1) = qparams(ctx, "in0", Some(a))?;
    let (s2, z2) = qparams(ctx, "in1", Some(b))?;
    let (so, zo) = qparams(ctx, "out0", None)?;
    let dt = out_dtype(ctx, 0, a.dtype());
    let (lo, hi) = act_range_q(&act(ctx), so, zo, dt);
    let t = broadcast_binary::<i32, i32>(&i32_tensor(a)?, &i32_tensor(b)?, |x, y| {
        let fx = s1 * (x - z1) as f32;
        let fy = s2 * (y - z2) as f32;
        quant1(f(fx, fy), so, zo, lo, hi)
    })?;
    q_from_i32(
        dt,
        t.shape().to_vec(),
        t.to_vec::<i32>()?,
        Some(Quant::per_tensor(so, zo)),
    )
}

/// TFLite's quantized ADD/SUB: both inputs rescaled to a common 2^-20 grid, summed, requantized.
fn q_add_sub(ctx: &OpCtx<'_>, a: &Tensor, b: &Tensor, negate: bool) -> Result<Tensor> {
    let (s1, z1) = qparams(ctx, "in0", Some(a))?;
    let (s2, z2) = qparams(ctx, "in1", Some(b))?;
    let (so, zo) = qparams(ctx, "out0", None)?;
    let dt = out_dtype(ctx, 0, a.dtype());
    let (lo, hi) = act_range_q(&act(ctx), so, zo, dt);
    let left_shift = if dt == DType::I16 { 15 } else { 20 };
    let twice_max = 2.0 * (s1 as f64).max(s2 as f64);
    let m1 = Multiplier::new(s1 as f64 / twice_max);
    let m2 = Multiplier::new(s2 as f64 / twice_max);
    let mo = Multiplier::new(twice_max / ((1i64 << left_shift) as f64 * so as f64));
    // Same-shape 8-bit operands: the vectorized kernel (same integers as the loop below).
    let same8 = a.shape() == b.shape()
        && a.dtype() == b.dtype()
        && dt == a.dtype()
        && matches!(dt, DType::I8 | DType::U8);
    if same8 && !negate && Rounding::of(ctx.node)? == Rounding::Float {
        // LiteRT's default kernels (XNNPACK): 21-bit multipliers and one shift.
        if let Some(p) = qconv::AddShift::new(z1, z2, s1 / so, s2 / so, zo, lo, hi) {
            let signed = dt == DType::I8;
            return q8_elementwise(dt, a.len(), a.shape(), so, zo, |off, o| {
                let r = off..off + o.len();
                qconv::add_shift(&p, signed, &a.bytes()[r.clone()], &b.bytes()[r], o)
            });
        }
    }
    if same8 {
        let p = qconv::AddParams {
            z1,
            z2,
            m1: (m1.m, m1.shift),
            m2: (m2.m, m2.shift),
            left_shift: left_shift as u32,
            negate,
            out: qconv::Requant::new(&[(mo.m, mo.shift)], zo, lo, hi)
                .ok_or_else(|| Error::arg("quantized ADD: bad output multiplier"))?,
        };
        let signed = dt == DType::I8;
        return q8_elementwise(dt, a.len(), a.shape(), so, zo, |off, o| {
            let r = off..off + o.len();
            qconv::add(&p, signed, &a.bytes()[r.clone()], &b.bytes()[r], o)
        });
    }
    let t = broadcast_binary::<i32, i32>(&i32_tensor(a)?, &i32_tensor(b)?, |x, y| {
        let x = m1.apply((x - z1).wrapping_mul(1 << left_shift));
        let y = m2.apply((y - z2).wrapping_mul(1 << left_shift));
        let raw = if negate {
            x.wrapping_sub(y)
        } else {
            x.wrapping_add(y)
        };
        (mo.apply(raw) + zo).clamp(lo, hi)
    })?;
    q_from_i32(
        dt,
        t.shape().to_vec(),
        t.to_vec::<i32>()?,
        Some(Quant::per_tensor(so, zo)),
    )
}

/// An 8-bit output of `n` values computed by `part(offset, out)` over parts of the output
/// split across the running executor's threads (one below [`crate::par::MIN_PARALLEL_ELEMS`]);
/// `part` returns `false` when its operands do not match.
fn q8_elementwise(
    dt: DType,
    n: usize,
    shape: &[usize],
    scale: f32,
    zp: i32,
    part: impl Fn(usize, &mut [u8]) -> bool + Sync,
) -> Result<Tensor> {
    // From the buffer pool, not zeroed: every part writes all of its slice (the zeroed
    // vector of a 224x224x3 QUANTIZE was a calloc of fresh pages on every run).
    let mut out = crate::arena::take_bytes(n);
    crate::par::for_slices(crate::arena::threads(), &mut out, |off, o| {
        if part(off, o) {
            Ok(())
        } else {
            Err(Error::arg(
                "quantized elementwise op: operand sizes do not match",
            ))
        }
    })?;
    let mut t = crate::arena::bytes_tensor(dt, shape.to_vec(), out)?;
    t.quant = Some(Quant::per_tensor(scale, zp));
    Ok(t)
}

fn add(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    if is_quant(a.dtype()) {
        return Ok(vec![q_add_sub(ctx, a, b, false)?]);
    }
    if a.dtype() == DType::I32 || a.dtype() == DType::I64 {
        return Ok(vec![int_binary(a, b, |x, y| x.wrapping_add(y))?]);
    }
    Ok(vec![float_binary(ctx, a, b, |x, y| x + y)?])
}

fn sub(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    if is_quant(a.dtype()) {
        return Ok(vec![q_add_sub(ctx, a, b, true)?]);
    }
    if a.dtype() == DType::I32 || a.dtype() == DType::I64 {
        return Ok(vec![int_binary(a, b, |x, y| x.wrapping_sub(y))?]);
    }
    Ok(vec![float_binary(ctx, a, b, |x, y| x - y)?])
}

fn mul(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    if is_quant(a.dtype()) {
        let (s1, z1) = qparams(ctx, "in0", Some(a))?;
        let (s2, z2) = qparams(ctx, "in1", Some(b))?;
        let (so, zo) = qparams(ctx, "out0", None)?;
        let dt = out_dtype(ctx, 0, a.dtype());
        let (lo, hi) = act_range_q(&act(ctx), so, zo, dt);
        let m = Multiplier::new(s1 as f64 * s2 as f64 / so as f64);
        let t = broadcast_binary::<i32, i32>(&i32_tensor(a)?, &i32_tensor(b)?, |x, y| {
            (m.apply((x - z1).wrapping_mul(y - z2)) + zo).clamp(lo, hi)
        })?;
        let out = q_from_i32(
            dt,
            t.shape().to_vec(),
            t.to_vec::<i32>()?,
            Some(Quant::per_tensor(so, zo)),
        )?;
        return Ok(vec![out]);
    }
    if a.dtype() == DType::I32 || a.dtype() == DType::I64 {
        return Ok(vec![int_binary(a, b, |x, y| x.wrapping_mul(y))?]);
    }
    Ok(vec![float_binary(ctx, a, b, |x, y| x * y)?])
}

fn int_binary(a: &Tensor, b: &Tensor, f: impl Fn(i64, i64) -> i64) -> Result<Tensor> {
    let dt = a.dtype();
    let t = broadcast_binary::<i64, i64>(&a.cast(DType::I64)?, &b.cast(DType::I64)?, f)?;
    t.cast(dt)
}

fn div(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    if is_quant(a.dtype()) {
        return Ok(vec![q_float_binary(ctx, a, b, |x, y| x / y)?]);
    }
    if a.dtype() == DType::I32 {
        if b.to_i64_vec().contains(&0) {
            return Err(Error::arg("Div: integer division by zero"));
        }
        // TFLite integer DIV floors.
        return Ok(vec![int_binary(a, b, |x, y| {
            x.div_euclid(y) - i64::from(y < 0 && x.rem_euclid(y) != 0)
        })?]);
    }
    Ok(vec![float_binary(ctx, a, b, |x, y| x / y)?])
}

fn minmax(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], max: bool) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    let pick = move |x: f64, y: f64| if (x > y) == max { x } else { y };
    if a.dtype().is_float() {
        return Ok(vec![float_binary(ctx, a, b, move |x, y| {
            pick(x as f64, y as f64) as f32
        })?]);
    }
    // Integers (quantized inputs share one scale): compare raw values.
    let dt = a.dtype();
    let t = broadcast_binary::<i64, i64>(&a.cast(DType::I64)?, &b.cast(DType::I64)?, |x, y| {
        pick(x as f64, y as f64) as i64
    })?;
    let mut out = t.cast(dt)?;
    out.quant = quant_of(ctx, "out0", Some(a));
    Ok(vec![out])
}
fn maximum(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    minmax(ctx, ins, true)
}
fn minimum(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    minmax(ctx, ins, false)
}

fn squared_difference(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    if is_quant(a.dtype()) {
        return Ok(vec![q_float_binary(ctx, a, b, |x, y| (x - y) * (x - y))?]);
    }
    Ok(vec![float_binary(ctx, a, b, |x, y| (x - y) * (x - y))?])
}

fn prelu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (a, b) = (input(ins, 0)?, input(ins, 1)?);
    let f = |x: f32, al: f32| if x >= 0.0 { x } else { x * al };
    if is_quant(a.dtype()) {
        return Ok(vec![q_float_binary(ctx, a, b, f)?]);
    }
    Ok(vec![float_binary(ctx, a, b, f)?])
}

/// Unary op: f32 directly; quantized through a float table of every input value.
fn unary(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], f: impl Fn(f32) -> f32) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if is_quant(x.dtype()) {
        let (si, zi) = qparams(ctx, "in0", Some(x))?;
        let (so, zo) = qparams(ctx, "out0", Some(x))?;
        let dt = out_dtype(ctx, 0, x.dtype());
        let (lo, hi) = type_range(dt);
        let (tlo, thi) = type_range(x.dtype());
        let map = |q: i32| quant1(f(si * (q - zi) as f32), so, zo, lo, hi);
        let xv = q_to_i32(x)?;
        let out: Vec<i32> = if x.dtype() == DType::I16 {
            xv.into_iter().map(map).collect()
        } else {
            let table: Vec<i32> = (tlo..=thi).map(map).collect();
            xv.into_iter().map(|q| table[(q - tlo) as usize]).collect()
        };
        return Ok(vec![q_from_i32(
            dt,
            x.shape().to_vec(),
            out,
            Some(Quant::per_tensor(so, zo)),
        )?]);
    }
    let v: Vec<f32> = float_in(x)?.iter().map(|&v| f(v)).collect();
    Ok(vec![Tensor::from_vec(x.shape().to_vec(), v)?])
}

/// A float unary op on a whole slice (the vectorized `vmath` forms); other types go to `other`.
fn unary_slice(
    ins: &[Option<&Tensor>],
    f: fn(&mut [f32]),
    other: impl FnOnce() -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if x.dtype() != DType::F32 {
        return other();
    }
    let mut v = float_in(x)?.into_owned();
    f(&mut v);
    Ok(vec![Tensor::from_vec(x.shape().to_vec(), v)?])
}

fn logistic(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary_slice(ins, crate::vmath::sigmoid_inplace, || {
        unary(ctx, ins, |x| 1.0 / (1.0 + (-x).exp()))
    })
}
fn tanh(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary_slice(ins, crate::vmath::tanh_inplace, || {
        unary(ctx, ins, f32::tanh)
    })
}
fn relu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, |x| x.max(0.0))
}
fn relu6(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, |x| x.clamp(0.0, 6.0))
}
fn relu_n1_to_1(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, |x| x.clamp(-1.0, 1.0))
}
fn leaky_relu(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let alpha = ctx.f("alpha", 0.2);
    unary(ctx, ins, move |x| if x >= 0.0 { x } else { alpha * x })
}
fn hard_swish(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, |x| x * (x + 3.0).clamp(0.0, 6.0) / 6.0)
}
fn rsqrt(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, |x| 1.0 / x.sqrt())
}
fn sqrt(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, f32::sqrt)
}
fn exp(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, f32::exp)
}
fn neg(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if x.dtype() == DType::I32 || x.dtype() == DType::I64 {
        return Ok(vec![x
            .cast(DType::I64)?
            .to_vec::<i64>()
            .map(|v| v.into_iter().map(|e| e.wrapping_neg()).collect::<Vec<_>>())
            .and_then(|v| Tensor::from_vec(x.shape().to_vec(), v))?
            .cast(x.dtype())?]);
    }
    unary(ctx, ins, |x| -x)
}
fn abs(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, f32::abs)
}
fn square(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, |x| x * x)
}
fn floor(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    unary(ctx, ins, f32::floor)
}

/// QUANTIZE: float to integer (round half away from zero), or integer requantization with a
/// fixed-point multiplier as TFLite's `Requantize`.
fn quantize(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let dt = out_dtype(ctx, 0, DType::I8);
    if !is_quant(dt) {
        return Err(Error::unsupported(format!("Quantize to {dt}")));
    }
    let q =
        quant_of(ctx, "out0", None).ok_or_else(|| Error::arg("Quantize: output has no scale"))?;
    let (lo, hi) = type_range(dt);
    let per_tensor = q.axis.is_none() || q.scale.len() <= 1;
    if x.dtype() == DType::F32 && matches!(dt, DType::I8 | DType::U8) && per_tensor {
        // The vectorized kernel: the same rounding as `quant1`.
        let (s, z) = qparams(ctx, "out0", None)?;
        let xv = x.as_slice::<f32>()?;
        let t = q8_elementwise(dt, xv.len(), x.shape(), s, z, |off, o| {
            qconv::quantize_f32(&xv[off..off + o.len()], s, z, lo, hi, o)
        })?;
        return Ok(vec![t]);
    }
    let out: Vec<i32> = if x.dtype().is_float() {
        let xv = float_in(x)?;
        match q.axis {
            Some(ax) if q.scale.len() > 1 => {
                let dims = x.shape();
                let (d, inner) = (
                    *dims
                        .get(ax)
                        .ok_or_else(|| Error::arg("Quantize: axis out of range"))?,
                    dims.get(ax + 1..)
                        .map(|s| s.iter().product::<usize>())
                        .unwrap_or(1),
                );
                if q.scale.len() != d || q.zero_point.len() != d {
                    return Err(Error::arg(
                        "Quantize: per-channel parameters do not match the axis",
                    ));
                }
                xv.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let c = (i / inner.max(1)) % d;
                        quant1(v, q.scale[c], q.zero_point[c], lo, hi)
                    })
                    .collect()
            }
            _ => {
                let (s, z) = qparams(ctx, "out0", None)?;
                xv.iter().map(|&v| quant1(v, s, z, lo, hi)).collect()
            }
        }
    } else if is_quant(x.dtype()) {
        let (si, zi) = qparams(ctx, "in0", Some(x))?;
        let (so, zo) = qparams(ctx, "out0", None)?;
        let m = Multiplier::new(si as f64 / so as f64);
        q_to_i32(x)?
            .into_iter()
            .map(|v| (m.apply(v - zi) + zo).clamp(lo, hi))
            .collect()
    } else {
        return Err(Error::unsupported(format!("Quantize from {}", x.dtype())));
    };
    Ok(vec![q_from_i32(dt, x.shape().to_vec(), out, Some(q))?])
}

/// DEQUANTIZE: integer to float (`scale * (q - zp)`, per-tensor or per-channel), or f16 to f32.
fn dequantize(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if x.dtype().is_float() {
        return Ok(vec![x.cast(DType::F32)?]);
    }
    let q = quant_of(ctx, "in0", Some(x))
        .ok_or_else(|| Error::arg("Dequantize: input has no scale"))?;
    let xv = q_to_i32(x)?;
    let (n_ch, inner) = match q.axis {
        Some(ax) if q.scale.len() > 1 => {
            let dims = x.shape();
            let d = *dims
                .get(ax)
                .ok_or_else(|| Error::arg("Dequantize: axis out of range"))?;
            if q.scale.len() != d || q.zero_point.len() != d {
                return Err(Error::arg(
                    "Dequantize: per-channel parameters do not match the axis",
                ));
            }
            (d, dims[ax + 1..].iter().product::<usize>().max(1))
        }
        _ => (1, 1),
    };
    let (Some(_), Some(_)) = (q.scale.first(), q.zero_point.first()) else {
        return Err(Error::arg("Dequantize: empty quantization parameters"));
    };
    let out: Vec<f32> = xv
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = if n_ch > 1 { (i / inner) % n_ch } else { 0 };
            (q.scale[c] as f64 * (v - q.zero_point[c]) as f64) as f32
        })
        .collect();
    Ok(vec![Tensor::from_vec(x.shape().to_vec(), out)?])
}

fn cast(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    Ok(vec![x.cast(out_dtype(ctx, 0, x.dtype()))?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::{Attr, Node};

    /// QUANTIZE into a pooled byte buffer (NaN-patterned in this crate's tests, so a byte the
    /// kernel leaves unwritten shows): every element equals `quantize1`, int8 and uint8.
    #[test]
    fn quantize_writes_every_byte_of_a_pooled_output() {
        for (dt, zp) in [(DType::I8, -3i32), (DType::U8, 128)] {
            let mut node = Node {
                op: "Quantize".into(),
                domain: DOMAIN.into(),
                ..Default::default()
            };
            node.attrs
                .insert("out0_scale".into(), Attr::Floats(vec![0.021]));
            node.attrs
                .insert("out0_zp".into(), Attr::Ints(vec![i64::from(zp)]));
            node.attrs.insert(
                "out0_dtype".into(),
                Attr::String(dt.name().as_bytes().to_vec()),
            );
            let ctx = OpCtx {
                node: &node,
                opset: 1,
                subgraph: None,
                dest: None,
            };
            let n = 3 * 225;
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 * 0.006 - 3.0)
                .collect();
            let x = Tensor::from_vec(vec![3, 225, 1], xs.clone()).unwrap();
            let y = quantize(&ctx, &[Some(&x)]).unwrap().remove(0);
            assert_eq!(y.dtype(), dt);
            let got = q_to_i32(&y).unwrap();
            let (lo, hi) = type_range(dt);
            for (i, (&g, &v)) in got.iter().zip(&xs).enumerate() {
                assert_eq!(
                    g,
                    qconv::quantize1(v, 0.021, zp, lo, hi),
                    "{dt:?} element {i}"
                );
            }
        }
    }
}
