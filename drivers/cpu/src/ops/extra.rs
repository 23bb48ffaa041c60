//! Ops beyond the classic edge-model set that ONNX's function expansions and newer models use:
//! losses, RMS/Lp normalisation, window functions, NonMaxSuppression, CumProd, EyeLike, ...
//! Floats are computed in f64 and stored back in the input's dtype.

use edgehal_core::{DType, Error, Result, Tensor};

use super::{input, norm_axis, opt_input, OpCtx, Registry};

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("RMSNormalization", rms_norm);
    r.add("LpNormalization", lp_norm);
    r.add("NegativeLogLikelihoodLoss", nll_loss);
    r.add("SoftmaxCrossEntropyLoss", softmax_ce_loss);
    r.add("Swish", swish);
    r.add("Shrink", shrink);
    r.add("EyeLike", eye_like);
    r.add("HannWindow", hann);
    r.add("HammingWindow", hamming);
    r.add("BlackmanWindow", blackman);
    r.add("CumProd", cumprod);
    r.add("NonMaxSuppression", nms);
    r.add("CenterCropPad", center_crop_pad);
    r.add("Det", det);
    r.add("BitCast", bitcast);
    r.add("GridSample", grid_sample);
    r.add("DFT", dft);
    r.add("STFT", stft);
    r.add("RotaryEmbedding", rotary_embedding);
}

fn f64_tensor(dtype: DType, shape: Vec<usize>, v: Vec<f64>) -> Result<Tensor> {
    Tensor::from_vec(shape, v)?.cast(dtype)
}

fn float_in<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    let t = input(ins, i)?;
    if !t.dtype().is_float() {
        return Err(Error::arg(format!(
            "input {i} must be a float tensor, got {}",
            t.dtype()
        )));
    }
    Ok(t)
}

/// Split a shape at `axis` into (outer, inner) element counts.
fn split_at(shape: &[usize], axis: usize) -> (usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis..].iter().product(),
    )
}

fn rms_norm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let scale = input(ins, 1)?;
    let axis = norm_axis(ctx.i("axis", -1), x.rank())?;
    let eps = ctx.f("epsilon", 1e-5) as f64;
    let (outer, inner) = split_at(x.shape(), axis);
    let xv = x.to_f64_vec();
    // Scale broadcasts against the normalised (trailing) shape.
    let sv = {
        let s = scale.to_f64_vec();
        let tail = &x.shape()[axis..];
        let st = edgehal_core::tensor::View::contiguous(
            std::borrow::Cow::Owned(s),
            scale.shape().to_vec(),
        )
        .broadcast_to(tail)?;
        st.to_vec()
    };
    let mut out = vec![0f64; xv.len()];
    for o in 0..outer {
        let row = &xv[o * inner..(o + 1) * inner];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / inner.max(1) as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for (k, v) in row.iter().enumerate() {
            out[o * inner + k] = v * inv * sv[k];
        }
    }
    Ok(vec![f64_tensor(x.dtype(), x.shape().to_vec(), out)?])
}

fn lp_norm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let axis = norm_axis(ctx.i("axis", -1), x.rank())?;
    let p = ctx.i("p", 2);
    if p != 1 && p != 2 {
        return Err(Error::arg(format!(
            "LpNormalization: p must be 1 or 2, got {p}"
        )));
    }
    let shape = x.shape();
    let outer: usize = shape[..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let xv = x.to_f64_vec();
    let mut out = xv.clone();
    for o in 0..outer {
        for i in 0..inner {
            let idx = |k: usize| (o * n + k) * inner + i;
            let norm = if p == 1 {
                (0..n).map(|k| xv[idx(k)].abs()).sum::<f64>()
            } else {
                (0..n).map(|k| xv[idx(k)] * xv[idx(k)]).sum::<f64>().sqrt()
            };
            for k in 0..n {
                out[idx(k)] = xv[idx(k)] / norm;
            }
        }
    }
    Ok(vec![f64_tensor(x.dtype(), shape.to_vec(), out)?])
}

/// Shared NLL: `logp` is [N, C, d...] in f64; returns the loss tensor in `dtype`.
fn nll(
    ctx: &OpCtx<'_>,
    logp: &[f64],
    shape: &[usize],
    target: &Tensor,
    weight: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    if shape.len() < 2 {
        return Err(Error::arg("input must have shape [N, C, ...]"));
    }
    let (n, c) = (shape[0], shape[1]);
    let d: usize = shape[2..].iter().product();
    let t = target.to_i64_vec();
    if t.len() != n * d {
        return Err(Error::arg(format!(
            "target has {} elements, expected {}",
            t.len(),
            n * d
        )));
    }
    let w = weight.map(|w| w.to_f64_vec());
    if let Some(w) = &w {
        if w.len() != c {
            return Err(Error::arg(format!(
                "weight has {} elements, expected {c}",
                w.len()
            )));
        }
    }
    let ignore = ctx.node.attr_i("ignore_index");
    let mut loss = vec![0f64; n * d];
    let mut wsum = 0f64;
    for i in 0..n {
        for j in 0..d {
            let cls = t[i * d + j];
            if Some(cls) == ignore {
                continue;
            }
            if cls < 0 || cls as usize >= c {
                return Err(Error::arg(format!(
                    "target class {cls} out of range [0, {c})"
                )));
            }
            let cls = cls as usize;
            let wt = w.as_ref().map(|w| w[cls]).unwrap_or(1.0);
            loss[i * d + j] = -logp[(i * c + cls) * d + j] * wt;
            wsum += wt;
        }
    }
    let reduction = ctx.s("reduction", "mean");
    match reduction.as_str() {
        "none" => {
            let mut s = vec![n];
            s.extend_from_slice(&shape[2..]);
            f64_tensor(dtype, s, loss)
        }
        "sum" => f64_tensor(dtype, vec![], vec![loss.iter().sum()]),
        "mean" => {
            let total: f64 = loss.iter().sum();
            f64_tensor(
                dtype,
                vec![],
                vec![if wsum == 0.0 { 0.0 } else { total / wsum }],
            )
        }
        other => Err(Error::arg(format!("unknown reduction '{other}'"))),
    }
}

fn nll_loss(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let l = nll(
        ctx,
        &x.to_f64_vec(),
        x.shape(),
        input(ins, 1)?,
        opt_input(ins, 2),
        x.dtype(),
    )?;
    Ok(vec![l])
}

fn softmax_ce_loss(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let shape = x.shape();
    if shape.len() < 2 {
        return Err(Error::arg("scores must have shape [N, C, ...]"));
    }
    let (n, c) = (shape[0], shape[1]);
    let d: usize = shape[2..].iter().product();
    let xv = x.to_f64_vec();
    let mut logp = vec![0f64; xv.len()];
    for i in 0..n {
        for j in 0..d {
            let at = |k: usize| (i * c + k) * d + j;
            let m = (0..c).map(|k| xv[at(k)]).fold(f64::NEG_INFINITY, f64::max);
            let lse = (0..c).map(|k| (xv[at(k)] - m).exp()).sum::<f64>().ln() + m;
            for k in 0..c {
                logp[at(k)] = xv[at(k)] - lse;
            }
        }
    }
    let loss = nll(
        ctx,
        &logp,
        shape,
        input(ins, 1)?,
        opt_input(ins, 2),
        x.dtype(),
    )?;
    Ok(vec![loss, f64_tensor(x.dtype(), shape.to_vec(), logp)?])
}

fn swish(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let alpha = ctx.f("alpha", 1.0) as f64;
    let x = float_in(ins, 0)?;
    let v = x
        .to_f64_vec()
        .into_iter()
        .map(|v| v / (1.0 + (-alpha * v).exp()))
        .collect();
    Ok(vec![f64_tensor(x.dtype(), x.shape().to_vec(), v)?])
}

fn shrink(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (bias, lambd) = (ctx.f("bias", 0.0) as f64, ctx.f("lambd", 0.5) as f64);
    let x = input(ins, 0)?;
    let v = x
        .to_f64_vec()
        .into_iter()
        .map(|v| {
            if v < -lambd {
                v + bias
            } else if v > lambd {
                v - bias
            } else {
                0.0
            }
        })
        .collect();
    Ok(vec![f64_tensor(x.dtype(), x.shape().to_vec(), v)?])
}

fn eye_like(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if x.rank() != 2 {
        return Err(Error::arg(format!(
            "EyeLike needs a 2-D input, got shape {:?}",
            x.shape()
        )));
    }
    let dtype = match ctx.node.attr_i("dtype") {
        Some(c) => DType::from_onnx_code(c as i32)
            .ok_or_else(|| Error::unsupported(format!("dtype {c}")))?,
        None => x.dtype(),
    };
    let (r, c) = (x.shape()[0], x.shape()[1]);
    let k = ctx.i("k", 0);
    let mut v = vec![0f64; r * c];
    for i in 0..r {
        let j = i as i64 + k;
        if j >= 0 && (j as usize) < c {
            v[i * c + j as usize] = 1.0;
        }
    }
    Ok(vec![f64_tensor(dtype, vec![r, c], v)?])
}

fn window(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], f: impl Fn(f64) -> f64) -> Result<Vec<Tensor>> {
    let n = input(ins, 0)?.to_i64_vec().first().copied().unwrap_or(0);
    if !(0..=1 << 28).contains(&n) {
        return Err(Error::arg(format!("window size {n} out of range")));
    }
    let n = n as usize;
    let dtype = DType::from_onnx_code(ctx.i("output_datatype", 1) as i32)
        .ok_or_else(|| Error::unsupported("output_datatype"))?;
    let denom = if ctx.i("periodic", 1) != 0 {
        n as f64
    } else {
        (n as f64 - 1.0).max(1.0)
    };
    let v = (0..n)
        .map(|i| f(2.0 * std::f64::consts::PI * i as f64 / denom))
        .collect();
    Ok(vec![f64_tensor(dtype, vec![n], v)?])
}

fn hann(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    window(ctx, ins, |t| 0.5 - 0.5 * t.cos())
}

fn hamming(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = 25.0 / 46.0;
    window(ctx, ins, |t| a - (1.0 - a) * t.cos())
}

fn blackman(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    window(ctx, ins, |t| 0.42 - 0.5 * t.cos() + 0.08 * (2.0 * t).cos())
}

fn cumprod(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let axis = norm_axis(
        input(ins, 1)?.to_i64_vec().first().copied().unwrap_or(0),
        x.rank(),
    )?;
    let (exclusive, reverse) = (ctx.i("exclusive", 0) != 0, ctx.i("reverse", 0) != 0);
    let shape = x.shape();
    let outer: usize = shape[..axis].iter().product();
    let n = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let xv = x.to_f64_vec();
    let mut out = vec![0f64; xv.len()];
    for o in 0..outer {
        for i in 0..inner {
            let mut acc = 1f64;
            for s in 0..n {
                let k = if reverse { n - 1 - s } else { s };
                let idx = (o * n + k) * inner + i;
                if exclusive {
                    out[idx] = acc;
                    acc *= xv[idx];
                } else {
                    acc *= xv[idx];
                    out[idx] = acc;
                }
            }
        }
    }
    Ok(vec![f64_tensor(x.dtype(), shape.to_vec(), out)?])
}

fn nms(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let boxes = input(ins, 0)?;
    let scores = input(ins, 1)?;
    let max_out = opt_input(ins, 2)
        .and_then(|t| t.to_i64_vec().first().copied())
        .unwrap_or(0)
        .max(0) as usize;
    let iou_th = opt_input(ins, 3)
        .and_then(|t| t.to_f64_vec().first().copied())
        .unwrap_or(0.0);
    let score_th = opt_input(ins, 4).and_then(|t| t.to_f64_vec().first().copied());
    let center = ctx.i("center_point_box", 0) != 0;
    let (bs, ss) = (boxes.shape(), scores.shape());
    if bs.len() != 3 || bs[2] != 4 || ss.len() != 3 || ss[0] != bs[0] || ss[2] != bs[1] {
        return Err(Error::arg(format!(
            "boxes {bs:?} and scores {ss:?} do not fit [B,N,4] / [B,C,N]"
        )));
    }
    let (nb, nc, n) = (bs[0], ss[1], bs[1]);
    let bv = boxes.to_f64_vec();
    let sv = scores.to_f64_vec();
    let corners = |b: usize, i: usize| -> [f64; 4] {
        let p = &bv[(b * n + i) * 4..(b * n + i) * 4 + 4];
        if center {
            let (xc, yc, w, h) = (p[0], p[1], p[2], p[3]);
            [yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0]
        } else {
            [
                p[0].min(p[2]),
                p[1].min(p[3]),
                p[0].max(p[2]),
                p[1].max(p[3]),
            ]
        }
    };
    let iou = |a: [f64; 4], b: [f64; 4]| -> f64 {
        let ih = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let iw = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = ih * iw;
        let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
        if union <= 0.0 {
            0.0
        } else {
            inter / union
        }
    };
    let mut sel: Vec<i64> = Vec::new();
    for b in 0..nb {
        for c in 0..nc {
            let sc = &sv[(b * nc + c) * n..(b * nc + c + 1) * n];
            let mut cand: Vec<usize> = (0..n)
                .filter(|&i| score_th.is_none_or(|t| sc[i] > t))
                .collect();
            cand.sort_by(|&i, &j| sc[j].total_cmp(&sc[i]).then(i.cmp(&j)));
            let mut kept: Vec<usize> = Vec::new();
            for i in cand {
                if kept.len() >= max_out {
                    break;
                }
                if kept
                    .iter()
                    .all(|&k| iou(corners(b, k), corners(b, i)) <= iou_th)
                {
                    kept.push(i);
                }
            }
            for k in kept {
                sel.extend_from_slice(&[b as i64, c as i64, k as i64]);
            }
        }
    }
    let rows = sel.len() / 3;
    Ok(vec![Tensor::from_vec(vec![rows, 3], sel)?])
}

fn center_crop_pad(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let target = input(ins, 1)?.to_i64_vec();
    let r = x.rank();
    let axes: Vec<usize> = match ctx.ints("axes") {
        Some(a) => a.iter().map(|&a| norm_axis(a, r)).collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    if axes.len() != target.len() {
        return Err(Error::arg("shape input must have one entry per axis"));
    }
    let mut out_shape = x.shape().to_vec();
    for (&a, &t) in axes.iter().zip(&target) {
        if t < 0 {
            return Err(Error::arg(format!("negative target size {t}")));
        }
        out_shape[a] = t as usize;
    }
    edgehal_core::tensor::checked_numel(&out_shape, x.dtype())?;
    let xs = x.shape().to_vec();
    // For each axis: source offset (crop) or destination offset (pad).
    let offs: Vec<(usize, usize)> = (0..r)
        .map(|a| {
            let (i, o) = (xs[a], out_shape[a]);
            if i >= o {
                ((i - o) / 2, 0)
            } else {
                (0, (o - i) / 2)
            }
        })
        .collect();
    let esz = x.dtype().size();
    let src = x.bytes();
    let n_out: usize = out_shape.iter().product();
    let mut dst = vec![0u8; n_out * esz];
    let mut idx = vec![0usize; r];
    'outer: for k in 0..n_out {
        let mut s = 0usize;
        let mut ok = true;
        for a in 0..r {
            let (so, dof) = offs[a];
            let d = idx[a];
            if d < dof || d - dof + so >= xs[a] {
                ok = false;
                break;
            }
            s = s * xs[a] + (d - dof + so);
        }
        if ok {
            dst[k * esz..(k + 1) * esz].copy_from_slice(&src[s * esz..(s + 1) * esz]);
        }
        for a in (0..r).rev() {
            idx[a] += 1;
            if idx[a] < out_shape[a] {
                continue 'outer;
            }
            idx[a] = 0;
        }
    }
    Ok(vec![Tensor::from_bytes(x.dtype(), out_shape, dst.into())?])
}

fn det(_ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let s = x.shape();
    if s.len() < 2 || s[s.len() - 1] != s[s.len() - 2] {
        return Err(Error::arg(format!("Det needs [..., M, M], got {s:?}")));
    }
    let m = s[s.len() - 1];
    let batch: usize = s[..s.len() - 2].iter().product();
    let v = x.to_f64_vec();
    let mut out = Vec::with_capacity(batch);
    for b in 0..batch {
        let mut a = v[b * m * m..(b + 1) * m * m].to_vec();
        let mut d = 1f64;
        for col in 0..m {
            let piv = (col..m)
                .max_by(|&i, &j| a[i * m + col].abs().total_cmp(&a[j * m + col].abs()))
                .unwrap_or(col);
            if a[piv * m + col] == 0.0 {
                d = 0.0;
                break;
            }
            if piv != col {
                for k in 0..m {
                    a.swap(piv * m + k, col * m + k);
                }
                d = -d;
            }
            d *= a[col * m + col];
            for r in col + 1..m {
                let f = a[r * m + col] / a[col * m + col];
                for k in col..m {
                    a[r * m + k] -= f * a[col * m + k];
                }
            }
        }
        out.push(d);
    }
    Ok(vec![f64_tensor(x.dtype(), s[..s.len() - 2].to_vec(), out)?])
}

fn bitcast(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let to = ctx.i("to", 0) as i32;
    let dt = DType::from_onnx_code(to)
        .ok_or_else(|| Error::unsupported(format!("BitCast to type {to}")))?;
    if dt.size() != x.dtype().size() {
        return Err(Error::arg(format!(
            "BitCast from {} to {dt} changes the element size",
            x.dtype()
        )));
    }
    if dt == DType::Bool && x.bytes().iter().any(|&b| b > 1) {
        return Err(Error::arg("BitCast to bool of bytes other than 0 and 1"));
    }
    // Same bytes, new element type: no copy.
    Ok(vec![Tensor::from_bytes(
        dt,
        x.shape().to_vec(),
        x.bytes().clone(),
    )?])
}

/// Keys cubic convolution weights (alpha = -0.75) for the 4 taps around a fraction `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    let a = -0.75;
    let w = |x: f64| {
        let x = x.abs();
        if x <= 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    [w(t + 1.0), w(t), w(1.0 - t), w(2.0 - t)]
}

/// Reflect `x` into [lo, hi] by folding at the borders.
fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let rng = hi - lo;
    if rng <= 0.0 {
        return lo;
    }
    if x < lo {
        let dx = lo - x;
        let n = (dx / rng) as i64;
        let r = dx - n as f64 * rng;
        if n % 2 == 0 {
            lo + r
        } else {
            hi - r
        }
    } else if x > hi {
        let dx = x - hi;
        let n = (dx / rng) as i64;
        let r = dx - n as f64 * rng;
        if n % 2 == 0 {
            hi - r
        } else {
            lo + r
        }
    } else {
        x
    }
}

fn grid_sample(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let grid = float_in(ins, 1)?;
    let mode = match ctx.s("mode", "linear").as_str() {
        "bilinear" | "linear" => 1,
        "nearest" => 0,
        "bicubic" | "cubic" => 3,
        m => return Err(Error::arg(format!("unknown GridSample mode '{m}'"))),
    };
    let pad = ctx.s("padding_mode", "zeros");
    let align = ctx.i("align_corners", 0) != 0;
    let xs = x.shape().to_vec();
    let gs = grid.shape().to_vec();
    let nd = xs
        .len()
        .checked_sub(2)
        .ok_or_else(|| Error::arg("X must be [N, C, ...]"))?;
    if gs.len() != nd + 2 || gs[0] != xs[0] || gs[nd + 1] != nd {
        return Err(Error::arg(format!(
            "grid shape {gs:?} does not fit X {xs:?}"
        )));
    }
    let dims = &xs[2..];
    let out_sp: Vec<usize> = gs[1..nd + 1].to_vec();
    let n_out: usize = out_sp.iter().product();
    let (n, c) = (xs[0], xs[1]);
    let plane: usize = dims.iter().product();
    let xv = x.to_f64_vec();
    let gv = grid.to_f64_vec();
    let (lo, hi): (Vec<f64>, Vec<f64>) = dims
        .iter()
        .map(|&d| {
            if align {
                (0.0, d as f64 - 1.0)
            } else {
                (-0.5, d as f64 - 0.5)
            }
        })
        .unzip();
    // Index fix-up per padding mode; None = zero padding outside.
    let fix = |i: i64, d: usize, k: usize| -> Option<usize> {
        match pad.as_str() {
            "border" => Some(i.clamp(0, d as i64 - 1) as usize),
            "reflection" => {
                Some((reflect(i as f64, lo[k], hi[k]) as i64).clamp(0, d as i64 - 1) as usize)
            }
            _ => (i >= 0 && (i as usize) < d).then_some(i as usize),
        }
    };
    let mut out = vec![0f64; n * c * n_out];
    for b in 0..n {
        for o in 0..n_out {
            let g = &gv[(b * n_out + o) * nd..(b * n_out + o + 1) * nd];
            // Taps per spatial dim (dims in X order; grid lists them reversed).
            let mut taps: Vec<Vec<(Option<usize>, f64)>> = Vec::with_capacity(nd);
            for k in 0..nd {
                let gn = g[nd - 1 - k];
                let d = dims[k];
                let mut v = if align {
                    (gn + 1.0) / 2.0 * (d as f64 - 1.0)
                } else {
                    ((gn + 1.0) * d as f64 - 1.0) / 2.0
                };
                if mode == 0 {
                    v = v.round_ties_even();
                }
                if v < lo[k] || v > hi[k] {
                    if pad == "border" {
                        v = v.clamp(0.0, d as f64 - 1.0);
                    } else if pad == "reflection" {
                        v = reflect(v, lo[k], hi[k]);
                    }
                }
                let t = match mode {
                    0 => vec![(fix(v as i64, d, k), 1.0)],
                    1 => {
                        let f = v.floor();
                        let fr = v - f;
                        vec![
                            (fix(f as i64, d, k), 1.0 - fr),
                            (fix(f as i64 + 1, d, k), fr),
                        ]
                    }
                    _ => {
                        let f = v.floor();
                        let w = cubic_weights(v - f);
                        (0..4)
                            .map(|j| (fix(f as i64 - 1 + j as i64, d, k), w[j]))
                            .collect()
                    }
                };
                taps.push(t);
            }
            for ch in 0..c {
                let base = (b * c + ch) * plane;
                let mut acc = 0f64;
                let mut idx = vec![0usize; nd];
                'combo: loop {
                    let mut w = 1f64;
                    let mut off = 0usize;
                    let mut zero = false;
                    for k in 0..nd {
                        let (i, wk) = taps[k][idx[k]];
                        w *= wk;
                        match i {
                            Some(i) => off = off * dims[k] + i,
                            None => zero = true,
                        }
                    }
                    if !zero {
                        acc += w * xv[base + off];
                    }
                    for k in (0..nd).rev() {
                        idx[k] += 1;
                        if idx[k] < taps[k].len() {
                            continue 'combo;
                        }
                        idx[k] = 0;
                    }
                    break;
                }
                out[(b * c + ch) * n_out + o] = acc;
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend(out_sp);
    Ok(vec![f64_tensor(x.dtype(), shape, out)?])
}

/// Naive DFT of one line (complex in, complex out, `n` bins; input truncated or zero-padded).
fn dft_line(x: &[(f64, f64)], n: usize, inverse: bool) -> Vec<(f64, f64)> {
    let sign = if inverse { 1.0 } else { -1.0 };
    let m = x.len().min(n);
    (0..n)
        .map(|k| {
            let (mut re, mut im) = (0f64, 0f64);
            for (j, &(a, b)) in x[..m].iter().enumerate() {
                let ang =
                    sign * 2.0 * std::f64::consts::PI * ((k * j) % n.max(1)) as f64 / n as f64;
                let (s, c) = ang.sin_cos();
                re += a * c - b * s;
                im += a * s + b * c;
            }
            if inverse {
                (re / n as f64, im / n as f64)
            } else {
                (re, im)
            }
        })
        .collect()
}

fn scalar_i64(t: Option<&Tensor>) -> Option<i64> {
    t.and_then(|t| t.to_i64_vec().first().copied())
}

fn dft(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let shape = x.shape().to_vec();
    let r = shape.len();
    let last = *shape
        .last()
        .ok_or_else(|| Error::arg("DFT input must have a trailing [1|2] axis"))?;
    if r < 2 || !(last == 1 || last == 2) {
        return Err(Error::arg(format!(
            "DFT input shape {shape:?} must end in 1 (real) or 2 (complex)"
        )));
    }
    let axis_raw = if ctx.opset >= 20 {
        scalar_i64(opt_input(ins, 2)).unwrap_or(-2)
    } else {
        ctx.i("axis", 1)
    };
    let axis = norm_axis(axis_raw, r)?;
    if axis == r - 1 {
        return Err(Error::arg(
            "DFT axis cannot be the trailing real/imaginary axis",
        ));
    }
    let inverse = ctx.i("inverse", 0) != 0;
    let onesided = ctx.i("onesided", 0) != 0;
    let len = shape[axis];
    let n = match scalar_i64(opt_input(ins, 1)) {
        Some(v) if v > 0 && v < 1 << 24 => v as usize,
        Some(v) => return Err(Error::arg(format!("dft_length {v} out of range"))),
        None if inverse && onesided => 2 * len.saturating_sub(1),
        None => len,
    };
    let xv = x.to_f64_vec();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..r - 1].iter().product();
    let out_len = if inverse && onesided {
        n
    } else if onesided {
        n / 2 + 1
    } else {
        n
    };
    let out_last = if inverse && onesided { 1 } else { 2 };
    let mut out = vec![0f64; outer * out_len * inner * out_last];
    for o in 0..outer {
        for i in 0..inner {
            let line: Vec<(f64, f64)> = (0..len)
                .map(|k| {
                    let base = ((o * len + k) * inner + i) * last;
                    (xv[base], if last == 2 { xv[base + 1] } else { 0.0 })
                })
                .collect();
            let res: Vec<(f64, f64)> = if inverse && onesided {
                // Complete the Hermitian spectrum, then take the real part.
                let full: Vec<(f64, f64)> = (0..n)
                    .map(|m| {
                        if m <= n / 2 {
                            line.get(m).copied().unwrap_or((0.0, 0.0))
                        } else {
                            let (a, b) = line.get(n - m).copied().unwrap_or((0.0, 0.0));
                            (a, -b)
                        }
                    })
                    .collect();
                dft_line(&full, n, true)
            } else {
                dft_line(&line, n, inverse)
            };
            for (k, &(re, im)) in res.iter().take(out_len).enumerate() {
                let base = ((o * out_len + k) * inner + i) * out_last;
                out[base] = re;
                if out_last == 2 {
                    out[base + 1] = im;
                }
            }
        }
    }
    let mut oshape = shape.clone();
    oshape[axis] = out_len;
    oshape[r - 1] = out_last;
    Ok(vec![f64_tensor(x.dtype(), oshape, out)?])
}

fn stft(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let s = x.shape().to_vec();
    if s.len() != 3 || !(s[2] == 1 || s[2] == 2) {
        return Err(Error::arg(format!(
            "STFT signal must be [batch, length, 1|2], got {s:?}"
        )));
    }
    let hop = scalar_i64(opt_input(ins, 1))
        .filter(|&h| h > 0)
        .ok_or_else(|| Error::arg("frame_step must be positive"))? as usize;
    let window = opt_input(ins, 2).map(|w| w.to_f64_vec());
    let flen = match (scalar_i64(opt_input(ins, 3)), &window) {
        (Some(f), _) if f > 0 => f as usize,
        (_, Some(w)) => w.len(),
        _ => return Err(Error::arg("STFT needs a window or a frame_length")),
    };
    let window = window.unwrap_or_else(|| vec![1.0; flen]);
    if window.len() != flen || flen > s[1] {
        return Err(Error::arg(
            "window length must equal frame_length and fit the signal",
        ));
    }
    let onesided = ctx.i("onesided", 1) != 0;
    let frames = 1 + (s[1] - flen) / hop;
    let bins = if onesided { flen / 2 + 1 } else { flen };
    let xv = x.to_f64_vec();
    let mut out = Vec::with_capacity(s[0] * frames * bins * 2);
    for b in 0..s[0] {
        for f in 0..frames {
            let line: Vec<(f64, f64)> = (0..flen)
                .map(|k| {
                    let base = (b * s[1] + f * hop + k) * s[2];
                    let w = window[k];
                    (xv[base] * w, if s[2] == 2 { xv[base + 1] * w } else { 0.0 })
                })
                .collect();
            for (re, im) in dft_line(&line, flen, false).into_iter().take(bins) {
                out.push(re);
                out.push(im);
            }
        }
    }
    Ok(vec![f64_tensor(
        x.dtype(),
        vec![s[0], frames, bins, 2],
        out,
    )?])
}

fn rotary_embedding(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = float_in(ins, 0)?;
    let cos = input(ins, 1)?;
    let sin = input(ins, 2)?;
    let pos = opt_input(ins, 3);
    let interleaved = ctx.i("interleaved", 0) != 0;
    let shape = x.shape().to_vec();
    // Work in [batch, seq, heads, head] order.
    let (b, seq, heads, hs, four_d) = match shape.len() {
        4 => (shape[0], shape[2], shape[1], shape[3], true),
        3 => {
            let nh = ctx.i("num_heads", 0);
            if nh <= 0 || shape[2] % nh as usize != 0 {
                return Err(Error::arg(
                    "3-D RotaryEmbedding input needs num_heads dividing the hidden size",
                ));
            }
            (
                shape[0],
                shape[1],
                nh as usize,
                shape[2] / nh as usize,
                false,
            )
        }
        _ => {
            return Err(Error::arg(format!(
                "RotaryEmbedding input must be 3-D or 4-D, got {shape:?}"
            )))
        }
    };
    let rd = match ctx.i("rotary_embedding_dim", 0) {
        0 => hs,
        d if d > 0 && (d as usize) <= hs && d % 2 == 0 => d as usize,
        d => {
            return Err(Error::arg(format!(
                "rotary_embedding_dim {d} invalid for head size {hs}"
            )))
        }
    };
    let half = rd / 2;
    let (cv, sv) = (cos.to_f64_vec(), sin.to_f64_vec());
    if cos.shape().last() != Some(&half) || sin.shape().last() != Some(&half) {
        return Err(Error::arg(format!(
            "cos/sin caches must end in rotary_dim/2 = {half}"
        )));
    }
    let pv = pos.map(|p| p.to_i64_vec());
    let cache_row = |bi: usize, si: usize| -> Result<usize> {
        match &pv {
            Some(p) => {
                let id = *p
                    .get(bi * seq + si)
                    .ok_or_else(|| Error::arg("position_ids shape mismatch"))?;
                if id < 0 || (id as usize + 1) * half > cv.len() {
                    return Err(Error::arg(format!("position id {id} outside the cache")));
                }
                Ok(id as usize)
            }
            None => {
                let row = bi * seq + si;
                if cos.rank() == 2 {
                    Ok(si)
                } else if (row + 1) * half <= cv.len() {
                    Ok(row)
                } else {
                    Err(Error::arg("cos/sin cache too small"))
                }
            }
        }
    };
    let xv = x.to_f64_vec();
    let mut out = xv.clone();
    for bi in 0..b {
        for si in 0..seq {
            let row = cache_row(bi, si)?;
            for h in 0..heads {
                let base = if four_d {
                    ((bi * heads + h) * seq + si) * hs
                } else {
                    ((bi * seq + si) * heads + h) * hs
                };
                for k in 0..half {
                    let (c, s_) = (cv[row * half + k], sv[row * half + k]);
                    let (i1, i2) = if interleaved {
                        (base + 2 * k, base + 2 * k + 1)
                    } else {
                        (base + k, base + half + k)
                    };
                    let (x1, x2) = (xv[i1], xv[i2]);
                    out[i1] = c * x1 - s_ * x2;
                    out[i2] = s_ * x1 + c * x2;
                }
            }
        }
    }
    Ok(vec![f64_tensor(x.dtype(), shape, out)?])
}
