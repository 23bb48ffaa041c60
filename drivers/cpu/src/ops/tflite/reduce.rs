//! Reductions (MEAN, SUM, REDUCE_MAX/MIN), ARG_MAX/ARG_MIN and SOFTMAX / LOG_SOFTMAX.

use edgehal_core::{DType, Error, Quant, Result, Tensor};

use super::qmath::type_range;
use super::{float_in, is_quant, out_dtype, q_from_i32, q_to_i32, qparams, quant_of, DOMAIN};
use crate::ops::{input, norm_axis, OpCtx, Registry};

pub fn register(r: &mut Registry) {
    r.add_domain(DOMAIN, "Mean", mean);
    r.add_domain(DOMAIN, "Sum", sum);
    r.add_domain(DOMAIN, "ReduceMax", reduce_max);
    r.add_domain(DOMAIN, "ReduceMin", reduce_min);
    r.add_domain(DOMAIN, "ArgMax", arg_max);
    r.add_domain(DOMAIN, "ArgMin", arg_min);
    r.add_domain(DOMAIN, "Softmax", softmax);
    r.add_domain(DOMAIN, "LogSoftmax", log_softmax);
}

/// For each input element, the index of the output element it reduces into; plus the output
/// shape (with or without kept dims) and the number of elements per output.
fn plan(shape: &[usize], axes_t: &Tensor, keep: bool) -> Result<(Vec<usize>, Vec<usize>, usize)> {
    let rank = shape.len();
    let (red, out_shape, count) = plan_shape(shape, axes_t, keep)?;
    let out_keep = kept(shape, &red);
    let n: usize = shape.iter().product();
    let mut map = Vec::with_capacity(n);
    let mut idx = vec![0usize; rank];
    for _ in 0..n {
        let mut o = 0;
        for ax in 0..rank {
            o = o * out_keep[ax] + if red[ax] { 0 } else { idx[ax] };
        }
        map.push(o);
        for ax in (0..rank).rev() {
            idx[ax] += 1;
            if idx[ax] < shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Ok((map, out_shape, count))
}

/// Which axes `axes_t` reduces, the output shape (with or without kept dims) and the number of
/// elements per output.
fn plan_shape(
    shape: &[usize],
    axes_t: &Tensor,
    keep: bool,
) -> Result<(Vec<bool>, Vec<usize>, usize)> {
    let red = reduced(shape.len(), axes_t)?;
    let out_keep = kept(shape, &red);
    let n: usize = shape.iter().product();
    let out_n: usize = out_keep.iter().product();
    let count = n.checked_div(out_n).unwrap_or(0);
    let out_shape = if keep {
        out_keep
    } else {
        shape
            .iter()
            .zip(&red)
            .filter(|(_, r)| !**r)
            .map(|(d, _)| *d)
            .collect()
    };
    Ok((red, out_shape, count))
}

/// Which of `rank` axes `axes_t` names (negative counting from the end).
fn reduced(rank: usize, axes_t: &Tensor) -> Result<Vec<bool>> {
    let mut red = vec![false; rank];
    for a in axes_t.to_i64_vec() {
        red[norm_axis(a, rank)?] = true;
    }
    Ok(red)
}

/// `shape` with the reduced axes kept as 1.
fn kept(shape: &[usize], red: &[bool]) -> Vec<usize> {
    shape
        .iter()
        .zip(red)
        .map(|(&d, &r)| if r { 1 } else { d })
        .collect()
}

/// The reduced axes `red` of `shape` when they are one run of adjacent dims: the element
/// counts before, inside and after that run.
fn block(shape: &[usize], red: &[bool]) -> Option<(usize, usize, usize)> {
    let first = red.iter().position(|&r| r)?;
    let last = red.iter().rposition(|&r| r)?;
    red[first..=last].iter().all(|&r| r).then(|| {
        (
            shape[..first].iter().product(),
            shape[first..=last].iter().product(),
            shape[last + 1..].iter().product(),
        )
    })
}

/// TFLite's integer MEAN from the sums of `q - zp_in`: rescaled by the fixed-point `m`, divided
/// by `count` rounding half away from zero, plus the output zero point, clamped.
fn mean_out(
    acc: Vec<i32>,
    m: super::qmath::Multiplier,
    count: usize,
    zo: i32,
    lo: i32,
    hi: i32,
) -> Vec<i32> {
    let n = count.max(1) as i32;
    acc.into_iter()
        .map(|a| {
            let a = m.apply(a);
            let a = if a > 0 {
                (a + n / 2) / n
            } else {
                (a - n / 2) / n
            };
            a.saturating_add(zo).clamp(lo, hi)
        })
        .collect()
}

/// The 8-bit MEAN when its axes are adjacent dims (a global average pool over H and W): rows
/// of the input summed straight from its bytes, without the per-element index map and i32
/// copy of the general path. `None` for other axes.
fn mean_q8_block(ctx: &OpCtx<'_>, x: &Tensor, axes: &Tensor, keep: bool) -> Result<Option<Tensor>> {
    let (red, out_shape, _) = plan_shape(x.shape(), axes, keep)?;
    let Some((outer, mid, inner)) = block(x.shape(), &red).filter(|b| b.1 > 0 && b.2 > 0) else {
        return Ok(None);
    };
    if !matches!(x.dtype(), DType::I8 | DType::U8) {
        return Ok(None);
    }
    let (si, zi) = qparams(ctx, "in0", Some(x))?;
    let (so, zo) = qparams(ctx, "out0", None)?;
    let z = zi.wrapping_mul(mid as i32);
    let dt = out_dtype(ctx, 0, x.dtype());
    let (lo, hi) = type_range(dt);
    let m = super::qmath::Multiplier::new(si as f64 / so as f64);
    // The means of columns `cols` of every outer block.
    let means = |cols: std::ops::Range<usize>| -> Result<Vec<i32>> {
        let mut acc = match x.dtype() {
            DType::I8 => sum_block(&x.as_slice::<i8>()?, outer, mid, inner, cols),
            DType::U8 => sum_block(&x.as_slice::<u8>()?, outer, mid, inner, cols),
            _ => return Err(Error::arg("8-bit MEAN of another type")),
        };
        acc.iter_mut().for_each(|a| *a = a.wrapping_sub(z));
        Ok(mean_out(acc, m, mid, zo, lo, hi))
    };
    let threads = crate::arena::threads();
    let out = if outer == 1 && threads > 1 && mid * inner >= 1 << 15 {
        // One image's global pool on the threads by channel ranges (the per-channel rescale
        // is scalar fixed-point arithmetic; it ran on one thread after the last convolution).
        let mut out = vec![0i32; inner];
        crate::par::for_parts(threads, inner.div_ceil(64), 64, &mut out, |u, o| {
            let part = means(u.start * 64..(u.end * 64).min(inner))?;
            o.copy_from_slice(&part);
            Ok::<(), Error>(())
        })?;
        out
    } else {
        means(0..inner)?
    };
    Ok(Some(q_from_i32(
        dt,
        out_shape,
        out,
        Some(Quant::per_tensor(so, zo)),
    )?))
}

/// `acc[o * w + j] = sum over m of x[(o * mid + m) * inner + cols.start + j]` (wrapping), `w`
/// the width of `cols`. Runs of up to 128 rows are summed in i16 lanes first (|8-bit value| *
/// 128 <= 32640 cannot overflow), which vectorize twice as wide as i32 and need one widening
/// per run instead of one per element.
fn sum_block<T: Copy + Into<i16>>(
    x: &[T],
    outer: usize,
    mid: usize,
    inner: usize,
    cols: std::ops::Range<usize>,
) -> Vec<i32> {
    const RUN: usize = 128;
    let w = cols.len();
    let mut acc = vec![0i32; outer * w];
    if inner == 0 || mid == 0 || w == 0 {
        return acc;
    }
    let mut part = vec![0i16; w];
    for (a, xo) in acc.chunks_exact_mut(w).zip(x.chunks_exact(mid * inner)) {
        for rows in xo.chunks(RUN * inner) {
            part.fill(0);
            for row in rows.chunks_exact(inner) {
                for (d, &v) in part.iter_mut().zip(&row[cols.clone()]) {
                    *d += v.into();
                }
            }
            for (d, &p) in a.iter_mut().zip(&part) {
                *d = d.wrapping_add(p as i32);
            }
        }
    }
    acc
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Mean,
    Sum,
    Max,
    Min,
}

fn reduce(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], kind: Kind) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let axes = input(ins, 1)?;
    let keep = ctx.i("keep_dims", 0) != 0;
    if kind == Kind::Mean && matches!(x.dtype(), DType::I8 | DType::U8) {
        if let Some(out) = mean_q8_block(ctx, x, axes, keep)? {
            return Ok(vec![out]);
        }
    }
    let (map, out_shape, count) = plan(x.shape(), axes, keep)?;
    let out_n: usize = out_shape.iter().product();
    if is_quant(x.dtype()) {
        let xv = q_to_i32(x)?;
        let dt = out_dtype(ctx, 0, x.dtype());
        let (lo, hi) = type_range(dt);
        if kind == Kind::Max || kind == Kind::Min {
            let init = if kind == Kind::Max {
                i32::MIN
            } else {
                i32::MAX
            };
            let mut acc = vec![init; out_n];
            for (v, &o) in xv.iter().zip(&map) {
                acc[o] = if kind == Kind::Max {
                    acc[o].max(*v)
                } else {
                    acc[o].min(*v)
                };
            }
            let q = quant_of(ctx, "out0", Some(x));
            return Ok(vec![q_from_i32(dt, out_shape, acc, q)?]);
        }
        let (si, zi) = qparams(ctx, "in0", Some(x))?;
        let (so, zo) = qparams(ctx, "out0", None)?;
        if kind == Kind::Mean {
            // TFLite's integer MEAN: sum of (q - zp_in), rescaled by in/out scale with the
            // fixed-point multiplier, then divided by the count rounding half away from zero.
            let m = super::qmath::Multiplier::new(si as f64 / so as f64);
            let mut acc = vec![0i32; out_n];
            for (v, &o) in xv.iter().zip(&map) {
                acc[o] = acc[o].wrapping_add(*v - zi);
            }
            let out = mean_out(acc, m, count, zo, lo, hi);
            return Ok(vec![q_from_i32(
                dt,
                out_shape,
                out,
                Some(Quant::per_tensor(so, zo)),
            )?]);
        }
        // TFLite's QuantizedMeanOrSum for SUM: integer sum of raw values, one float rescale.
        let mut acc = vec![0i64; out_n];
        for (v, &o) in xv.iter().zip(&map) {
            acc[o] += *v as i64;
        }
        let scale = si / so;
        let out: Vec<i32> = acc
            .into_iter()
            .map(|s| {
                let r = if kind == Kind::Sum {
                    let bias = -(zi as f32) * scale * count as f32;
                    (s as f32 * scale + bias).round()
                } else {
                    let bias = -(zi as f32) * scale;
                    let m = s as f32 / count.max(1) as f32;
                    (m * scale + bias).round()
                };
                (r.clamp(-2e9, 2e9) as i32).saturating_add(zo).clamp(lo, hi)
            })
            .collect();
        return Ok(vec![q_from_i32(
            dt,
            out_shape,
            out,
            Some(Quant::per_tensor(so, zo)),
        )?]);
    }
    if x.dtype() == DType::I32 || x.dtype() == DType::I64 {
        let xv = x.to_i64_vec();
        let init = match kind {
            Kind::Max => i64::MIN,
            Kind::Min => i64::MAX,
            _ => 0,
        };
        let mut acc = vec![init; out_n];
        for (v, &o) in xv.iter().zip(&map) {
            acc[o] = match kind {
                Kind::Max => acc[o].max(*v),
                Kind::Min => acc[o].min(*v),
                _ => acc[o].wrapping_add(*v),
            };
        }
        if kind == Kind::Mean {
            acc.iter_mut().for_each(|a| *a /= count.max(1) as i64);
        }
        return Tensor::from_vec(out_shape, acc)?
            .cast(x.dtype())
            .map(|t| vec![t]);
    }
    let xv = float_in(x)?;
    let init = match kind {
        Kind::Max => f64::NEG_INFINITY,
        Kind::Min => f64::INFINITY,
        _ => 0.0,
    };
    let mut acc = vec![init; out_n];
    for (v, &o) in xv.iter().zip(&map) {
        let v = *v as f64;
        acc[o] = match kind {
            Kind::Max => acc[o].max(v),
            Kind::Min => acc[o].min(v),
            _ => acc[o] + v,
        };
    }
    if kind == Kind::Mean {
        acc.iter_mut().for_each(|a| *a /= count.max(1) as f64);
    }
    Ok(vec![Tensor::from_vec(
        out_shape,
        acc.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
    )?])
}

fn mean(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(ctx, ins, Kind::Mean)
}
fn sum(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(ctx, ins, Kind::Sum)
}
fn reduce_max(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(ctx, ins, Kind::Max)
}
fn reduce_min(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    reduce(ctx, ins, Kind::Min)
}

fn arg(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], max: bool) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let axis_v = input(ins, 1)?.to_i64_vec();
    let axis = norm_axis(
        *axis_v
            .first()
            .ok_or_else(|| Error::arg("ArgMax: empty axis"))?,
        x.rank(),
    )?;
    let shape = x.shape();
    let d = shape[axis];
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let xv = x.to_f64_vec();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0usize;
            for k in 1..d {
                let v = xv[(o * d + k) * inner + i];
                let b = xv[(o * d + best) * inner + i];
                if (max && v > b) || (!max && v < b) {
                    best = k;
                }
            }
            out.push(best as i64);
        }
    }
    let mut oshape = shape.to_vec();
    oshape.remove(axis);
    let t = Tensor::from_vec(oshape, out)?;
    let dt = match ctx.i("output_type", 4) {
        2 => DType::I32,
        _ => DType::I64,
    };
    Ok(vec![t.cast(dt)?])
}
fn arg_max(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    arg(ctx, ins, true)
}
fn arg_min(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    arg(ctx, ins, false)
}

fn softmax_impl(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], log: bool) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let beta = if log { 1.0 } else { ctx.f("beta", 1.0) };
    let c = *x
        .shape()
        .last()
        .ok_or_else(|| Error::arg("Softmax of a scalar"))?;
    if c == 0 {
        return Ok(vec![x.clone()]);
    }
    let (xf, q): (Vec<f32>, Option<(f32, i32)>) = if is_quant(x.dtype()) {
        let (s, z) = qparams(ctx, "in0", Some(x))?;
        (
            q_to_i32(x)?
                .into_iter()
                .map(|v| (v - z) as f32 * s)
                .collect(),
            Some((s, z)),
        )
    } else {
        (float_in(x)?.into_owned(), None)
    };
    let mut out = Vec::with_capacity(xf.len());
    let mut e = vec![0f32; c];
    for row in xf.chunks_exact(c) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if log {
            let s: f64 = row.iter().map(|&v| (((v - m) * beta) as f64).exp()).sum();
            out.extend(
                row.iter()
                    .map(|&v| (((v - m) * beta) as f64 - s.ln()) as f32),
            );
            continue;
        }
        // exp in f32 without libm (vmath: within 1e-6 of f64, vectorized; the f64 libm call
        // per element was most of an 8 us softmax over 1001 classes), summed in f64.
        for (d, &v) in e.iter_mut().zip(row) {
            *d = (v - m) * beta;
        }
        edgehal_kernels::vmath::exp_inplace(&mut e);
        let inv = (1.0 / e.iter().map(|&v| v as f64).sum::<f64>()) as f32;
        out.extend(e.iter().map(|&v| v * inv));
    }
    if q.is_some() {
        let (so, zo) = qparams(ctx, "out0", None)?;
        let dt = out_dtype(ctx, 0, x.dtype());
        let (lo, hi) = type_range(dt);
        if matches!(dt, DType::I8 | DType::U8) {
            // The vectorized QUANTIZE (round half away from zero, as below): the scalar loop
            // called libm's roundf per class.
            let mut qb = crate::arena::take_bytes(out.len());
            if edgehal_kernels::qconv::quantize_f32(&out, so, zo, lo, hi, &mut qb) {
                let mut t = crate::arena::bytes_tensor(dt, x.shape().to_vec(), qb)?;
                t.quant = Some(Quant::per_tensor(so, zo));
                return Ok(vec![t]);
            }
        }
        let qv = out
            .iter()
            .map(|&v| (((v / so).round() as i32).saturating_add(zo)).clamp(lo, hi))
            .collect();
        return Ok(vec![q_from_i32(
            dt,
            x.shape().to_vec(),
            qv,
            Some(Quant::per_tensor(so, zo)),
        )?]);
    }
    Ok(vec![Tensor::from_vec(x.shape().to_vec(), out)?])
}
fn softmax(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    softmax_impl(ctx, ins, false)
}
fn log_softmax(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    softmax_impl(ctx, ins, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8-bit SOFTMAX (int8 and uint8 outputs, rows of 1000 and of 10 classes, ties in the
    /// input) against the scalar definition: probabilities divided by the output scale,
    /// rounded half away from zero, plus the zero point, clamped; within one step of an f64
    /// reference and equal to the scalar rounding of the op's own f32 probabilities.
    #[test]
    fn quantized_softmax_matches_the_scalar_definition() {
        use edgehal_core::{Attr, Node};
        for (dt, zo) in [(DType::I8, -128i32), (DType::U8, 0)] {
            for classes in [1000usize, 10] {
                let mut node = Node {
                    op: "Softmax".into(),
                    domain: DOMAIN.into(),
                    ..Default::default()
                };
                node.attrs.insert("beta".into(), Attr::Float(1.0));
                node.attrs
                    .insert("out0_scale".into(), Attr::Floats(vec![1.0 / 256.0]));
                node.attrs
                    .insert("out0_zp".into(), Attr::Ints(vec![i64::from(zo)]));
                let ctx = OpCtx {
                    node: &node,
                    opset: 1,
                    subgraph: None,
                    dest: None,
                };
                let (si, zi) = (0.05f32, 3);
                let n = 3 * classes;
                let q: Vec<u8> = (0..n).map(|i| ((i * 37 + i / 7) % 200) as u8).collect();
                let mut x = Tensor::from_vec_dtype(dt, vec![3, classes], q).unwrap();
                x.quant = Some(Quant::per_tensor(si, zi));
                let y = softmax(&ctx, &[Some(&x)]).unwrap().remove(0);
                assert_eq!(y.dtype(), dt);
                let got = q_to_i32(&y).unwrap();
                let xv = q_to_i32(&x).unwrap();
                let (lo, hi) = type_range(dt);
                for (r, row) in xv.chunks(classes).enumerate() {
                    let f: Vec<f32> = row.iter().map(|&v| (v - zi) as f32 * si).collect();
                    let m = f.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e64: Vec<f64> = f.iter().map(|&v| ((v - m) as f64).exp()).collect();
                    let s64: f64 = e64.iter().sum();
                    let mut e: Vec<f32> = f.iter().map(|&v| v - m).collect();
                    edgehal_kernels::vmath::exp_inplace(&mut e);
                    let inv = (1.0 / e.iter().map(|&v| v as f64).sum::<f64>()) as f32;
                    for j in 0..classes {
                        let g = got[r * classes + j];
                        let p = (e64[j] / s64) as f32;
                        let near = (((p * 256.0).round() as i32) + zo).clamp(lo, hi);
                        assert!((g - near).abs() <= 1, "{dt:?} {r},{j}: {g} vs {near}");
                        let v = e[j] * inv;
                        let want = ((v / (1.0 / 256.0)).round() as i32)
                            .saturating_add(zo)
                            .clamp(lo, hi);
                        assert_eq!(g, want, "{dt:?} {classes} classes, row {r}, class {j}");
                    }
                }
            }
        }
    }

    /// The adjacent-axes fast path sums what the general index map sends to each output.
    #[test]
    fn block_sums_match_the_index_map() {
        for (shape, axes) in [
            (vec![1usize, 12, 12, 32], vec![1i64, 2]),
            (vec![2, 3, 4, 5], vec![1]),
            (vec![2, 3, 4, 5], vec![-1]),
            (vec![2, 3, 4, 5], vec![0, 1]),
            (vec![3, 7], vec![0, 1]),
            (vec![2, 3, 4, 5], vec![2, 1, 3]),
        ] {
            let n: usize = shape.iter().product();
            let x: Vec<i8> = (0..n).map(|i| (i * 37 % 251) as u8 as i8).collect();
            let axes_t = Tensor::from_vec(vec![axes.len()], axes.clone()).unwrap();
            let red = reduced(shape.len(), &axes_t).unwrap();
            let (outer, mid, inner) = block(&shape, &red).expect("adjacent axes");
            let got = sum_block(&x, outer, mid, inner, 0..inner);
            let (map, _, count) = plan(&shape, &axes_t, false).unwrap();
            let mut want = vec![0i32; got.len()];
            for (v, &o) in x.iter().zip(&map) {
                want[o] += *v as i32;
            }
            assert_eq!(got, want, "{shape:?} {axes:?}");
            assert_eq!(count, mid, "{shape:?} {axes:?}");
            // Column ranges (the parallel split of one image) give those columns' sums.
            if inner > 1 {
                let cut = inner / 2;
                let (a, b) = (
                    sum_block(&x, outer, mid, inner, 0..cut),
                    sum_block(&x, outer, mid, inner, cut..inner),
                );
                for o in 0..outer {
                    let row = &got[o * inner..(o + 1) * inner];
                    assert_eq!(
                        &a[o * cut..(o + 1) * cut],
                        &row[..cut],
                        "{shape:?} {axes:?}"
                    );
                    let w = inner - cut;
                    assert_eq!(&b[o * w..(o + 1) * w], &row[cut..], "{shape:?} {axes:?}");
                }
            }
        }
        // The i16 runs at the extremes of both 8-bit types, across run boundaries.
        for mid in [1usize, 127, 128, 129, 300] {
            let u = vec![255u8; 2 * mid * 3];
            assert_eq!(
                sum_block(&u, 2, mid, 3, 0..3),
                vec![255 * mid as i32; 6],
                "u8 {mid}"
            );
            let i = vec![-128i8; mid * 5];
            assert_eq!(
                sum_block(&i, 1, mid, 5, 0..5),
                vec![-128 * mid as i32; 5],
                "i8 {mid}"
            );
        }
        let t = Tensor::from_vec(vec![2], vec![0i64, 2]).unwrap();
        assert!(
            block(&[2, 3, 4], &reduced(3, &t).unwrap()).is_none(),
            "axes 0 and 2 are not adjacent"
        );
    }
}
