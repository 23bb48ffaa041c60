//! Data movement: reshape, squeeze, concat, split, pack, slice, gather, pad, transpose, resize.
//! These work on any dtype and keep quantization parameters (CONCATENATION rescales inputs
//! whose parameters differ from the output's).

use edgehal_core::tensor::checked_numel;
use edgehal_core::{DType, Error, Result, Tensor};

use super::{act, act_f32, is_quant, q_from_i32, q_to_i32, qparams, quant_of, DOMAIN};
use crate::ops::{input, norm_axis, opt_input, OpCtx, Registry};

pub fn register(r: &mut Registry) {
    r.add_domain(DOMAIN, "Reshape", reshape);
    r.add_domain(DOMAIN, "Squeeze", squeeze);
    r.add_domain(DOMAIN, "ExpandDims", expand_dims);
    r.add_domain(DOMAIN, "Concatenation", concatenation);
    r.add_domain(DOMAIN, "Split", split);
    r.add_domain(DOMAIN, "SplitV", split_v);
    r.add_domain(DOMAIN, "Pack", pack);
    r.add_domain(DOMAIN, "Unpack", unpack);
    r.add_domain(DOMAIN, "Slice", slice);
    r.add_domain(DOMAIN, "StridedSlice", strided_slice);
    r.add_domain(DOMAIN, "Gather", gather);
    r.add_domain(DOMAIN, "Pad", pad);
    r.add_domain(DOMAIN, "PadV2", pad);
    r.add_domain(DOMAIN, "Transpose", transpose);
    r.add_domain(DOMAIN, "ResizeBilinear", resize_bilinear);
    r.add_domain(DOMAIN, "ResizeNearestNeighbor", resize_nearest);
}

/// Output with the node's output quantization (or the input's).
fn with_q(ctx: &OpCtx<'_>, mut t: Tensor, src: &Tensor) -> Tensor {
    if is_quant(t.dtype()) {
        t.quant = quant_of(ctx, "out0", Some(src));
    }
    t
}

/// Gather elements of `t` by flat index (`None` = `fill`) into a new tensor of `shape`.
fn take(t: &Tensor, shape: Vec<usize>, idx: &[Option<usize>], fill: f64) -> Result<Tensor> {
    let dt = t.dtype();
    let n = checked_numel(&shape, dt)?;
    if n != idx.len() {
        return Err(Error::arg("internal: index count does not match shape"));
    }
    edgehal_core::with_dtype!(dt, T => {
        let src = t.as_slice::<T>()?;
        let f = <T as edgehal_core::dtype::Elem>::from_f64(fill);
        let mut out: Vec<T> = Vec::with_capacity(n);
        for i in idx {
            out.push(match i {
                Some(i) => *src.get(*i).ok_or_else(|| Error::arg("index out of range"))?,
                None => f,
            });
        }
        Tensor::from_vec_dtype(dt, shape, out)
    })
}

/// Row-major strides.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Visit every multi-index of `shape` in row-major order.
fn for_each_index(shape: &[usize], mut f: impl FnMut(&[usize])) {
    let n: usize = shape.iter().product();
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        f(&idx);
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
}

/// Elements of `t` at `start[ax] + i * step[ax]` for every index `i` of `out_shape`.
fn strided(t: &Tensor, start: &[i64], step: &[i64], out_shape: Vec<usize>) -> Result<Tensor> {
    let st = strides(t.shape());
    let dims = t.shape();
    checked_numel(&out_shape, t.dtype())?;
    let mut idx = Vec::with_capacity(out_shape.iter().product());
    let mut bad = false;
    for_each_index(&out_shape, |i| {
        let mut off = 0usize;
        for ax in 0..i.len() {
            let p = start[ax] + i[ax] as i64 * step[ax];
            if p < 0 || p as usize >= dims[ax] {
                bad = true;
                return;
            }
            off += p as usize * st[ax];
        }
        idx.push(Some(off));
    });
    if bad {
        return Err(Error::arg("slice reaches outside the input"));
    }
    take(t, out_shape, &idx, 0.0)
}

fn reshape(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let spec: Vec<i64> = match opt_input(ins, 1) {
        Some(s) if s.rank() == 1 => s.to_i64_vec(),
        _ => ctx.ints("new_shape").unwrap_or_default(),
    };
    let known: i64 = spec.iter().filter(|&&d| d >= 0).product();
    let mut shape = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        if d == -1 && infer.is_none() {
            infer = Some(i);
            shape.push(0);
        } else if d < 0 {
            return Err(Error::arg(format!("Reshape: bad shape {spec:?}")));
        } else {
            shape.push(d as usize);
        }
    }
    if let Some(i) = infer {
        if known == 0 || x.len() % known as usize != 0 {
            return Err(Error::arg(format!(
                "Reshape: cannot infer -1 in {spec:?} for {:?}",
                x.shape()
            )));
        }
        shape[i] = x.len() / known as usize;
    }
    Ok(vec![with_q(ctx, x.reshape(shape)?, x)])
}

fn squeeze(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let dims = ctx.ints("squeeze_dims").unwrap_or_default();
    let mut drop = vec![false; x.rank()];
    if dims.is_empty() {
        for (i, &d) in x.shape().iter().enumerate() {
            drop[i] = d == 1;
        }
    } else {
        for d in dims {
            let a = norm_axis(d, x.rank())?;
            if x.shape()[a] != 1 {
                return Err(Error::arg(format!(
                    "Squeeze: dim {a} of {:?} is not 1",
                    x.shape()
                )));
            }
            drop[a] = true;
        }
    }
    let shape = x
        .shape()
        .iter()
        .zip(&drop)
        .filter(|(_, d)| !**d)
        .map(|(s, _)| *s)
        .collect();
    Ok(vec![with_q(ctx, x.reshape(shape)?, x)])
}

fn expand_dims(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let a = *input(ins, 1)?
        .to_i64_vec()
        .first()
        .ok_or_else(|| Error::arg("ExpandDims: empty axis"))?;
    let a = norm_axis(a, x.rank() + 1)?;
    let mut shape = x.shape().to_vec();
    shape.insert(a, 1);
    Ok(vec![with_q(ctx, x.reshape(shape)?, x)])
}

/// Concatenate along `axis` (quantized inputs rescaled to `out` when their params differ).
fn concat(ctx: &OpCtx<'_>, parts: &[Tensor], axis: usize) -> Result<Tensor> {
    let first = parts
        .first()
        .ok_or_else(|| Error::arg("nothing to concatenate"))?;
    let rank = first.rank();
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for p in parts {
        if p.rank() != rank || p.dtype() != first.dtype() {
            return Err(Error::arg("Concatenation: inputs differ in rank or dtype"));
        }
        for ax in 0..rank {
            if ax != axis && p.shape()[ax] != first.shape()[ax] {
                return Err(Error::arg(format!(
                    "Concatenation: shapes {:?} and {:?} differ off the axis",
                    first.shape(),
                    p.shape()
                )));
            }
        }
        shape[axis] += p.shape()[axis];
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    // Flat layout: for each outer index, each part's block in turn.
    let mut idx = Vec::with_capacity(outer * shape[axis] * inner);
    let mut owners = Vec::with_capacity(idx.capacity());
    for o in 0..outer {
        for (k, p) in parts.iter().enumerate() {
            let blk = p.shape()[axis] * inner;
            for j in 0..blk {
                idx.push(o * blk + j);
                owners.push(k);
            }
        }
    }
    if is_quant(first.dtype()) {
        let (so, zo) = qparams(ctx, "out0", Some(first))?;
        let (lo, hi) = super::qmath::type_range(first.dtype());
        let vals: Vec<Vec<i32>> = parts.iter().map(q_to_i32).collect::<Result<_>>()?;
        let params: Vec<(f32, i32)> = (0..parts.len())
            .map(|k| qparams(ctx, &format!("in{k}"), Some(&parts[k])))
            .collect::<Result<_>>()?;
        let out: Vec<i32> = idx
            .iter()
            .zip(&owners)
            .map(|(&i, &k)| {
                let v = vals[k][i];
                let (s, z) = params[k];
                if s == so && z == zo {
                    v
                } else {
                    let scale = s / so;
                    let bias = -(z as f32) * scale;
                    ((v as f32 * scale + bias).round() as i32 + zo).clamp(lo, hi)
                }
            })
            .collect();
        return q_from_i32(
            first.dtype(),
            shape,
            out,
            quant_of(ctx, "out0", Some(first)),
        );
    }
    let dt = first.dtype();
    edgehal_core::with_dtype!(dt, T => {
        let srcs: Vec<std::borrow::Cow<'_, [T]>> = parts.iter().map(|p| p.as_slice::<T>()).collect::<Result<_>>()?;
        let out: Vec<T> = idx.iter().zip(&owners).map(|(&i, &k)| srcs[k][i]).collect();
        Tensor::from_vec_dtype(dt, shape, out)
    })
}

fn concatenation(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let parts: Vec<Tensor> = ins
        .iter()
        .map(|t| {
            t.cloned()
                .ok_or_else(|| Error::arg("Concatenation: missing input"))
        })
        .collect::<Result<_>>()?;
    let first = parts
        .first()
        .ok_or_else(|| Error::arg("Concatenation: no inputs"))?;
    let axis = norm_axis(ctx.i("axis", 0), first.rank())?;
    let mut t = concat(ctx, &parts, axis)?;
    if t.dtype() == DType::F32 && act(ctx) != "NONE" {
        let mut v = t.to_vec::<f32>()?;
        act_f32(&act(ctx), &mut v)?;
        t = Tensor::from_vec(t.shape().to_vec(), v)?;
    }
    Ok(vec![t])
}

/// Split `x` along `axis` into pieces of the given sizes.
fn split_sizes(ctx: &OpCtx<'_>, x: &Tensor, axis: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut start = 0i64;
    let rank = x.rank();
    for &s in sizes {
        let mut st = vec![0i64; rank];
        st[axis] = start;
        let mut shape = x.shape().to_vec();
        shape[axis] = s;
        out.push(with_q(ctx, strided(x, &st, &vec![1; rank], shape)?, x));
        start += s as i64;
    }
    Ok(out)
}

fn split(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = *input(ins, 0)?
        .to_i64_vec()
        .first()
        .ok_or_else(|| Error::arg("Split: empty axis"))?;
    let x = input(ins, 1)?;
    let axis = norm_axis(a, x.rank())?;
    let n = ctx.i("num_splits", 0);
    let d = x.shape()[axis];
    if n <= 0 || d % n as usize != 0 {
        return Err(Error::arg(format!("Split: {d} does not split into {n}")));
    }
    split_sizes(ctx, x, axis, &vec![d / n as usize; n as usize])
}

fn split_v(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let sizes = input(ins, 1)?.to_i64_vec();
    let a = *input(ins, 2)?
        .to_i64_vec()
        .first()
        .ok_or_else(|| Error::arg("SplitV: empty axis"))?;
    let axis = norm_axis(a, x.rank())?;
    let d = x.shape()[axis] as i64;
    let known: i64 = sizes.iter().filter(|&&s| s >= 0).sum();
    let mut out = Vec::with_capacity(sizes.len());
    for &s in &sizes {
        let v = if s == -1 { d - known } else { s };
        if v < 0 {
            return Err(Error::arg(format!("SplitV: bad sizes {sizes:?} for {d}")));
        }
        out.push(v as usize);
    }
    if out.iter().sum::<usize>() as i64 != d {
        return Err(Error::arg(format!(
            "SplitV: sizes {sizes:?} do not add up to {d}"
        )));
    }
    split_sizes(ctx, x, axis, &out)
}

fn pack(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let parts: Vec<Tensor> = ins
        .iter()
        .map(|t| t.cloned().ok_or_else(|| Error::arg("Pack: missing input")))
        .collect::<Result<_>>()?;
    let first = parts.first().ok_or_else(|| Error::arg("Pack: no inputs"))?;
    let axis = norm_axis(ctx.i("axis", 0), first.rank() + 1)?;
    let mut shape = first.shape().to_vec();
    shape.insert(axis, 1);
    let parts: Vec<Tensor> = parts
        .iter()
        .map(|p| p.reshape(shape.clone()))
        .collect::<Result<_>>()?;
    Ok(vec![concat(ctx, &parts, axis)?])
}

fn unpack(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let axis = norm_axis(ctx.i("axis", 0), x.rank())?;
    let d = x.shape()[axis];
    let mut shape = x.shape().to_vec();
    shape.remove(axis);
    split_sizes(ctx, x, axis, &vec![1; d])?
        .into_iter()
        .map(|t| t.reshape(shape.clone()))
        .collect()
}

fn slice(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let begin = input(ins, 1)?.to_i64_vec();
    let size = input(ins, 2)?.to_i64_vec();
    if begin.len() != x.rank() || size.len() != x.rank() {
        return Err(Error::arg(
            "Slice: begin/size rank does not match the input",
        ));
    }
    let mut shape = Vec::with_capacity(x.rank());
    for ax in 0..x.rank() {
        let d = x.shape()[ax] as i64;
        let s = if size[ax] == -1 {
            d - begin[ax]
        } else {
            size[ax]
        };
        if begin[ax] < 0 || s < 0 || begin[ax] + s > d {
            return Err(Error::arg(format!(
                "Slice: begin {begin:?} size {size:?} outside {:?}",
                x.shape()
            )));
        }
        shape.push(s as usize);
    }
    Ok(vec![with_q(
        ctx,
        strided(x, &begin, &vec![1; x.rank()], shape)?,
        x,
    )])
}

fn strided_slice(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let begin = input(ins, 1)?.to_i64_vec();
    let end = input(ins, 2)?.to_i64_vec();
    let step = match opt_input(ins, 3) {
        Some(s) => s.to_i64_vec(),
        None => vec![1; begin.len()],
    };
    if ctx.i("ellipsis_mask", 0) != 0 || ctx.i("new_axis_mask", 0) != 0 {
        return Err(Error::unsupported(
            "StridedSlice with ellipsis_mask or new_axis_mask",
        ));
    }
    let (bm, em, sm) = (
        ctx.i("begin_mask", 0),
        ctx.i("end_mask", 0),
        ctx.i("shrink_axis_mask", 0),
    );
    let offset = ctx.i("offset", 0) != 0;
    let r = x.rank();
    if begin.len() > r || end.len() != begin.len() || step.len() != begin.len() {
        return Err(Error::arg(
            "StridedSlice: begin/end/strides lengths disagree",
        ));
    }
    let (mut starts, mut steps, mut shape, mut out_shape) = (vec![], vec![], vec![], vec![]);
    for ax in 0..r {
        let d = x.shape()[ax] as i64;
        if ax >= begin.len() {
            starts.push(0);
            steps.push(1);
            shape.push(d as usize);
            out_shape.push(d as usize);
            continue;
        }
        let s = step[ax];
        if s == 0 {
            return Err(Error::arg("StridedSlice: stride 0"));
        }
        let norm = |v: i64| if v < 0 { v + d } else { v };
        let shrink = sm & (1 << ax) != 0;
        let mut b = if bm & (1 << ax) != 0 && !shrink {
            if s > 0 {
                0
            } else {
                d - 1
            }
        } else {
            norm(begin[ax])
        };
        let mut e = if shrink {
            b + 1
        } else if em & (1 << ax) != 0 {
            if s > 0 {
                d
            } else {
                -1
            }
        } else if offset {
            b + end[ax]
        } else {
            norm(end[ax])
        };
        if s > 0 {
            b = b.clamp(0, d);
            e = e.clamp(0, d);
        } else {
            b = b.clamp(-1, d - 1);
            e = e.clamp(-1, d - 1);
        }
        let n = if s > 0 {
            (e - b + s - 1) / s
        } else {
            (b - e + (-s) - 1) / (-s)
        }
        .max(0);
        if shrink && n != 1 {
            return Err(Error::arg(format!(
                "StridedSlice: shrink axis {ax} is out of range"
            )));
        }
        starts.push(b);
        steps.push(s);
        shape.push(n as usize);
        if !shrink {
            out_shape.push(n as usize);
        }
    }
    let t = strided(x, &starts, &steps, shape)?.reshape(out_shape)?;
    Ok(vec![with_q(ctx, t, x)])
}

fn gather(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let ind = input(ins, 1)?;
    if ctx.i("batch_dims", 0) != 0 {
        return Err(Error::unsupported("Gather with batch_dims"));
    }
    let axis = norm_axis(ctx.i("axis", 0), x.rank())?;
    let d = x.shape()[axis];
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let iv = ind.to_i64_vec();
    let mut idx = Vec::with_capacity(outer * iv.len() * inner);
    for o in 0..outer {
        for &i in &iv {
            if i < 0 || i as usize >= d {
                return Err(Error::arg(format!(
                    "Gather: index {i} out of range for {d}"
                )));
            }
            for j in 0..inner {
                idx.push(Some((o * d + i as usize) * inner + j));
            }
        }
    }
    let mut shape = x.shape()[..axis].to_vec();
    shape.extend_from_slice(ind.shape());
    shape.extend_from_slice(&x.shape()[axis + 1..]);
    Ok(vec![with_q(ctx, take(x, shape, &idx, 0.0)?, x)])
}

fn pad(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let p = input(ins, 1)?.to_i64_vec();
    let r = x.rank();
    if p.len() != 2 * r || p.iter().any(|&v| v < 0) {
        return Err(Error::arg(format!(
            "Pad: paddings {p:?} do not fit rank {r}"
        )));
    }
    let fill = match opt_input(ins, 2) {
        Some(c) => *c
            .to_f64_vec()
            .first()
            .ok_or_else(|| Error::arg("PadV2: empty constant"))?,
        None if is_quant(x.dtype()) => qparams(ctx, "out0", Some(x))
            .map(|(_, z)| z as f64)
            .unwrap_or(0.0),
        None => 0.0,
    };
    let shape: Vec<usize> = (0..r)
        .map(|a| x.shape()[a] + (p[2 * a] + p[2 * a + 1]) as usize)
        .collect();
    checked_numel(&shape, x.dtype())?;
    let st = strides(x.shape());
    let mut idx = Vec::with_capacity(shape.iter().product());
    for_each_index(&shape, |i| {
        let mut off = 0usize;
        for a in 0..r {
            let v = i[a] as i64 - p[2 * a];
            if v < 0 || v as usize >= x.shape()[a] {
                idx.push(None);
                return;
            }
            off += v as usize * st[a];
        }
        idx.push(Some(off));
    });
    Ok(vec![with_q(ctx, take(x, shape, &idx, fill)?, x)])
}

fn transpose(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let perm = input(ins, 1)?.to_i64_vec();
    let r = x.rank();
    let mut seen = vec![false; r];
    let perm: Vec<usize> = perm
        .iter()
        .map(|&p| {
            let a = norm_axis(p, r)?;
            if std::mem::replace(&mut seen[a], true) {
                return Err(Error::arg(format!("Transpose: repeated axis {p}")));
            }
            Ok(a)
        })
        .collect::<Result<_>>()?;
    if perm.len() != r {
        return Err(Error::arg("Transpose: permutation rank does not match"));
    }
    let st = strides(x.shape());
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let mut idx = Vec::with_capacity(x.len());
    for_each_index(&shape, |i| {
        idx.push(Some(i.iter().zip(&perm).map(|(&v, &p)| v * st[p]).sum()));
    });
    Ok(vec![with_q(ctx, take(x, shape, &idx, 0.0)?, x)])
}

fn resize_size(ins: &[Option<&Tensor>], x: &Tensor) -> Result<(usize, usize, [usize; 4])> {
    let s = input(ins, 1)?.to_i64_vec();
    let xd: [usize; 4] = match x.shape() {
        &[a, b, c, d] => [a, b, c, d],
        s => return Err(Error::arg(format!("Resize: input {s:?} is not 4-d"))),
    };
    match s.as_slice() {
        &[h, w] if h > 0 && w > 0 => Ok((h as usize, w as usize, xd)),
        _ => Err(Error::arg(format!("Resize: bad size {s:?}"))),
    }
}

fn resize_bilinear(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (oh, ow, [n, ih, iw, c]) = resize_size(ins, x)?;
    let ac = ctx.i("align_corners", 0) != 0;
    let hp = ctx.i("half_pixel_centers", 0) != 0;
    let scale = |i: usize, o: usize| {
        if ac && o > 1 {
            (i - 1) as f32 / (o - 1) as f32
        } else {
            i as f32 / o as f32
        }
    };
    let (sy, sx) = (scale(ih, oh), scale(iw, ow));
    let interp = |v: usize, s: f32, size: usize| {
        let f = if hp {
            (v as f32 + 0.5) * s - 0.5
        } else {
            v as f32 * s
        };
        let lo = (f.floor() as i64).max(0) as usize;
        let hi = (f.ceil() as i64).min(size as i64 - 1).max(0) as usize;
        (f, lo.min(size - 1), hi)
    };
    let xv = x.to_f64_vec();
    let quant = is_quant(x.dtype());
    let shape = vec![n, oh, ow, c];
    checked_numel(&shape, DType::F32)?;
    let mut out = Vec::with_capacity(n * oh * ow * c);
    for b in 0..n {
        for y in 0..oh {
            let (fy, y0, y1) = interp(y, sy, ih);
            let dy = fy - y0 as f32;
            for xo in 0..ow {
                let (fx, x0, x1) = interp(xo, sx, iw);
                let dx = fx - x0 as f32;
                for ch in 0..c {
                    let at = |yy: usize, xx: usize| xv[((b * ih + yy) * iw + xx) * c + ch] as f32;
                    let v = at(y0, x0) * (1.0 - dy) * (1.0 - dx)
                        + at(y1, x0) * dy * (1.0 - dx)
                        + at(y0, x1) * (1.0 - dy) * dx
                        + at(y1, x1) * dy * dx;
                    out.push(if quant { v.round() } else { v } as f64);
                }
            }
        }
    }
    let t = Tensor::from_vec(shape, out)?.cast(x.dtype())?;
    Ok(vec![with_q(ctx, t, x)])
}

fn resize_nearest(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (oh, ow, [n, ih, iw, c]) = resize_size(ins, x)?;
    let ac = ctx.i("align_corners", 0) != 0;
    let hp = ctx.i("half_pixel_centers", 0) != 0;
    let near = |v: usize, i: usize, o: usize| -> usize {
        let s = if ac && o > 1 {
            (i - 1) as f32 / (o - 1) as f32
        } else {
            i as f32 / o as f32
        };
        let off = if hp { 0.5 } else { 0.0 };
        let f = (v as f32 + off) * s;
        let r = if ac { f.round() } else { f.floor() } as i64;
        r.clamp(0, i as i64 - 1) as usize
    };
    let shape = vec![n, oh, ow, c];
    checked_numel(&shape, x.dtype())?;
    let mut idx = Vec::with_capacity(n * oh * ow * c);
    for b in 0..n {
        for y in 0..oh {
            let yy = near(y, ih, oh);
            for xo in 0..ow {
                let xx = near(xo, iw, ow);
                for ch in 0..c {
                    idx.push(Some(((b * ih + yy) * iw + xx) * c + ch));
                }
            }
        }
    }
    Ok(vec![with_q(ctx, take(x, shape, &idx, 0.0)?, x)])
}
