//! Convolution and pooling: Conv, ConvTranspose, MaxPool, AveragePool, LpPool and the global
//! pools, for any number of spatial dimensions.
//!
//! Conv runs through [`crate::conv_plan`] (packed weights, depthwise and Winograd paths, fused
//! epilogue), im2col + packed GEMM where no special path applies;
//! ConvTranspose is sgemm + col2im. im2col works a row segment at a time: the range of output
//! columns whose input column is inside the image is computed once per segment, so the inner
//! loops carry no bounds logic.

use edgehal_core::{Error, Result, Tensor};
use edgehal_kernels::gemm::{sgemm, MatRef};

use super::{ftensor, fvec, numel, zeros_f32};
use crate::conv_plan::{ConvPlan, FUSED_CONV, FUSED_DOMAIN};
use crate::ops::{input, opt_input, OpCtx, Registry};

pub(super) fn register(r: &mut Registry) {
    r.add("Conv", conv);
    r.add_domain(FUSED_DOMAIN, FUSED_CONV, conv);
    r.add("ConvTranspose", conv_transpose);
    r.add("MaxPool", max_pool);
    r.add("AveragePool", average_pool);
    r.add("LpPool", lp_pool);
    r.add("GlobalAveragePool", global_average_pool);
    r.add("GlobalMaxPool", global_max_pool);
    r.add("GlobalLpPool", global_lp_pool);
}

/// Window geometry along each spatial axis.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Geom {
    pub k: Vec<usize>,
    pub s: Vec<usize>,
    pub d: Vec<usize>,
    /// Padding before each axis.
    pub pb: Vec<usize>,
    /// Padding after each axis.
    pub pe: Vec<usize>,
    pub out: Vec<usize>,
}

fn attr_vec(ctx: &OpCtx<'_>, name: &str, n: usize, default: usize) -> Result<Vec<usize>> {
    match ctx.ints(name) {
        None => Ok(vec![default; n]),
        Some(v) if v.is_empty() => Ok(vec![default; n]),
        Some(v) => {
            if v.len() != n {
                return Err(Error::arg(format!(
                    "{name} has {} values, expected {n}",
                    v.len()
                )));
            }
            v.iter()
                .map(|&x| {
                    usize::try_from(x)
                        .map_err(|_| Error::arg(format!("{name} has a negative value {x}")))
                })
                .collect()
        }
    }
}

/// Geometry of a convolution or pooling window over `in_sp` for `kernel`, from the node's
/// strides/dilations/pads/auto_pad (and ceil_mode for pools).
pub(crate) fn geom(
    ctx: &OpCtx<'_>,
    in_sp: &[usize],
    kernel: &[usize],
    ceil_mode: bool,
) -> Result<Geom> {
    let nd = in_sp.len();
    let s = attr_vec(ctx, "strides", nd, 1)?;
    let d = attr_vec(ctx, "dilations", nd, 1)?;
    if s.contains(&0) || d.contains(&0) {
        return Err(Error::arg("strides and dilations must be positive"));
    }
    if kernel.len() != nd {
        return Err(Error::arg(format!(
            "kernel has {} spatial dims, input has {nd}",
            kernel.len()
        )));
    }
    let mut pb = vec![0; nd];
    let mut pe = vec![0; nd];
    let mut out = vec![0; nd];
    let auto_pad = ctx.s("auto_pad", "NOTSET");
    for i in 0..nd {
        let dk = (kernel[i].max(1) - 1) * d[i] + 1;
        match auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => {
                let o = in_sp[i].div_ceil(s[i]);
                let total = ((o.max(1) - 1) * s[i] + dk).saturating_sub(in_sp[i]);
                if auto_pad == "SAME_UPPER" {
                    pb[i] = total / 2;
                } else {
                    pb[i] = total - total / 2;
                }
                pe[i] = total - pb[i];
                out[i] = o;
            }
            "VALID" | "NOTSET" | "" => {
                if auto_pad == "NOTSET" || auto_pad.is_empty() {
                    let p = attr_vec(ctx, "pads", 2 * nd, 0)?;
                    pb[i] = p[i];
                    pe[i] = p[i + nd];
                }
                let span = in_sp[i] + pb[i] + pe[i];
                if span < dk {
                    return Err(Error::arg(format!(
                        "window {dk} (kernel {}, dilation {}) is larger than padded input {span} on spatial axis {i}",
                        kernel[i], d[i]
                    )));
                }
                let o = if ceil_mode {
                    let mut o = (span - dk).div_ceil(s[i]) + 1;
                    // The last window must start inside the input or the leading padding.
                    if (o - 1) * s[i] >= in_sp[i] + pb[i] {
                        o -= 1;
                    }
                    o
                } else {
                    (span - dk) / s[i] + 1
                };
                out[i] = o;
            }
            o => return Err(Error::arg(format!("unknown auto_pad {o}"))),
        }
    }
    Ok(Geom {
        k: kernel.to_vec(),
        s,
        d,
        pb,
        pe,
        out,
    })
}

/// Output columns `lo..hi` along one axis whose input coordinate `o*s + off` lies in `0..len`.
fn valid_range(off: isize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let s = s as isize;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = if (len as isize) <= off {
        0
    } else {
        (len as isize - off + s - 1) / s
    };
    let lo = (lo as usize).min(out);
    let hi = (hi.max(0) as usize).clamp(lo, out);
    (lo, hi)
}

/// Unpack `cg` channels of one image into columns: `col[(c*kt + kk) * P + p]` is the input under
/// kernel tap `kk` of channel `c` for output position `p` (zero where it falls in the padding).
pub(crate) fn im2col<T: Copy + Default>(
    x: &[T],
    cg: usize,
    in_sp: &[usize],
    g: &Geom,
    col: &mut [T],
) {
    if in_sp.len() == 2 && g.s[1] == 2 && g.d[1] == 1 {
        im2col_2d_s2(x, cg, in_sp, g, col);
    } else {
        im2col_nd(x, cg, in_sp, g, col);
    }
}

/// [`im2col`] for any rank, stride and dilation.
fn im2col_nd<T: Copy + Default>(x: &[T], cg: usize, in_sp: &[usize], g: &Geom, col: &mut [T]) {
    let zero = T::default();
    let nd = in_sp.len();
    let in_total: usize = in_sp.iter().product();
    let p_total: usize = g.out.iter().product();
    let kt: usize = g.k.iter().product();
    let last = nd - 1;
    let (out_last, in_last) = (g.out[last], in_sp[last]);
    let outer_out = p_total / out_last.max(1);
    let mut kidx = vec![0usize; nd];
    let mut oidx = vec![0usize; nd];
    for c in 0..cg {
        let xc = &x[c * in_total..(c + 1) * in_total];
        for kk in 0..kt {
            // kernel multi-index of tap kk
            let mut r = kk;
            for dd in (0..nd).rev() {
                kidx[dd] = r % g.k[dd];
                r /= g.k[dd];
            }
            let row = &mut col[(c * kt + kk) * p_total..(c * kt + kk + 1) * p_total];
            let off = (kidx[last] * g.d[last]) as isize - g.pb[last] as isize;
            let (lo, hi) = valid_range(off, g.s[last], in_last, out_last);
            let sl = g.s[last];
            oidx.iter_mut().for_each(|v| *v = 0);
            for oo in 0..outer_out {
                let mut r = oo;
                for dd in (0..last).rev() {
                    oidx[dd] = r % g.out[dd];
                    r /= g.out[dd];
                }
                let seg = &mut row[oo * out_last..(oo + 1) * out_last];
                let mut base = 0usize;
                let mut inside = true;
                for dd in 0..last {
                    let i = (oidx[dd] * g.s[dd] + kidx[dd] * g.d[dd]) as isize - g.pb[dd] as isize;
                    if i < 0 || i as usize >= in_sp[dd] {
                        inside = false;
                        break;
                    }
                    base = base * in_sp[dd] + i as usize;
                }
                if !inside || lo >= hi {
                    seg.fill(zero);
                    continue;
                }
                seg[..lo].fill(zero);
                seg[hi..].fill(zero);
                let start = (base * in_last) as isize + off + (lo * sl) as isize;
                let src = &xc[start as usize..];
                if sl == 1 {
                    seg[lo..hi].copy_from_slice(&src[..hi - lo]);
                } else {
                    for (dst, v) in seg[lo..hi].iter_mut().zip(src.iter().step_by(sl)) {
                        *dst = *v;
                    }
                }
            }
        }
    }
}

/// [`im2col`] for 2-D maps with a horizontal stride of 2 (ResNet's 7x7 stem and its 3x3
/// stride-2 convolutions): each input row is split once into its even and odd columns, so the
/// columns one tap reads are a contiguous run of one phase instead of a strided gather.
fn im2col_2d_s2<T: Copy + Default>(x: &[T], cg: usize, in_sp: &[usize], g: &Geom, col: &mut [T]) {
    let zero = T::default();
    let (h, w) = (in_sp[0], in_sp[1]);
    let (oh, ow) = (g.out[0], g.out[1]);
    let (kh, kw) = (g.k[0], g.k[1]);
    let p_total = oh * ow;
    // Row iy of the channel: even columns at [iy * w ..], odd ones right after them.
    let half = w.div_ceil(2);
    let mut phases = vec![zero; h * w];
    for c in 0..cg {
        let xc = &x[c * h * w..(c + 1) * h * w];
        for (src, dst) in xc.chunks_exact(w).zip(phases.chunks_exact_mut(w)) {
            let (even, odd) = dst.split_at_mut(half);
            for (d, v) in even.iter_mut().zip(src.iter().step_by(2)) {
                *d = *v;
            }
            for (d, v) in odd.iter_mut().zip(src.iter().skip(1).step_by(2)) {
                *d = *v;
            }
        }
        for ky in 0..kh {
            for kx in 0..kw {
                let row = &mut col[((c * kh + ky) * kw + kx) * p_total..][..p_total];
                let off = kx as isize - g.pb[1] as isize;
                let (lo, hi) = valid_range(off, 2, w, ow);
                // Input column 2 * ox + off is phase (off & 1), index ox + (off >> 1).
                let phase = if off & 1 == 0 { 0 } else { half };
                for (oy, seg) in row.chunks_exact_mut(ow.max(1)).enumerate().take(oh) {
                    let iy = (oy * g.s[0] + ky * g.d[0]) as isize - g.pb[0] as isize;
                    if iy < 0 || iy as usize >= h || lo >= hi {
                        seg.fill(zero);
                        continue;
                    }
                    seg[..lo].fill(zero);
                    seg[hi..].fill(zero);
                    let start = (lo as isize + (off >> 1)) as usize;
                    let src = &phases[iy as usize * w + phase..][start..start + (hi - lo)];
                    seg[lo..hi].copy_from_slice(src);
                }
            }
        }
    }
}

/// The inverse scatter of [`im2col`]: add `col[(c*kt + kk) * P_in + p]` into the output image at
/// the position kernel tap `kk` of input position `p` lands on. Here `g.out` is the *input*
/// spatial shape and `out_sp` the (larger) output image.
fn col2im(col: &[f32], c_out: usize, out_sp: &[usize], g: &Geom, y: &mut [f32]) {
    let nd = out_sp.len();
    let out_total: usize = out_sp.iter().product();
    let p_total: usize = g.out.iter().product();
    let kt: usize = g.k.iter().product();
    let last = nd - 1;
    let (in_last, o_last) = (g.out[last], out_sp[last]);
    let outer_in = p_total / in_last.max(1);
    let mut kidx = vec![0usize; nd];
    let mut iidx = vec![0usize; nd];
    for c in 0..c_out {
        let yc = &mut y[c * out_total..(c + 1) * out_total];
        for kk in 0..kt {
            let mut r = kk;
            for dd in (0..nd).rev() {
                kidx[dd] = r % g.k[dd];
                r /= g.k[dd];
            }
            let row = &col[(c * kt + kk) * p_total..(c * kt + kk + 1) * p_total];
            let off = (kidx[last] * g.d[last]) as isize - g.pb[last] as isize;
            let (lo, hi) = valid_range(off, g.s[last], o_last, in_last);
            let sl = g.s[last];
            for oi in 0..outer_in {
                let mut r = oi;
                for dd in (0..last).rev() {
                    iidx[dd] = r % g.out[dd];
                    r /= g.out[dd];
                }
                let mut base = 0usize;
                let mut inside = true;
                for dd in 0..last {
                    let o = (iidx[dd] * g.s[dd] + kidx[dd] * g.d[dd]) as isize - g.pb[dd] as isize;
                    if o < 0 || o as usize >= out_sp[dd] {
                        inside = false;
                        break;
                    }
                    base = base * out_sp[dd] + o as usize;
                }
                if !inside || lo >= hi {
                    continue;
                }
                let seg = &row[oi * in_last..(oi + 1) * in_last];
                let start = ((base * o_last) as isize + off + (lo * sl) as isize) as usize;
                for (j, &v) in seg[lo..hi].iter().enumerate() {
                    yc[start + j * sl] += v;
                }
            }
        }
    }
}

fn spatial(x: &Tensor, op: &str) -> Result<(usize, usize, Vec<usize>)> {
    if x.rank() < 3 {
        return Err(Error::arg(format!(
            "{op}: input has shape {:?}, expected [N, C, spatial...] with at least one spatial axis",
            x.shape()
        )));
    }
    let s = x.shape();
    Ok((s[0], s[1], s[2..].to_vec()))
}

fn kernel_from(ctx: &OpCtx<'_>, w_sp: &[usize], op: &str) -> Result<Vec<usize>> {
    if let Some(ks) = ctx.ints("kernel_shape") {
        let ks: Vec<usize> = ks.iter().map(|&k| k.max(0) as usize).collect();
        if ks != w_sp {
            return Err(Error::arg(format!(
                "{op}: kernel_shape {ks:?} does not match weight {w_sp:?}"
            )));
        }
    }
    Ok(w_sp.to_vec())
}

/// Conv (and `edgehal.FusedConv`) with weights prepared for this call; the executor keeps a
/// prepared [`ConvPlan`] per node instead when the weights are constants.
fn conv(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    ConvPlan::from_inputs(ctx.node, ins)?.run(ctx, ins)
}

fn conv_transpose(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    let (n, c, in_sp) = spatial(x, "ConvTranspose")?;
    let nd = in_sp.len();
    if w.rank() != x.rank() || w.shape()[0] != c {
        return Err(Error::arg(format!(
            "ConvTranspose: W has shape {:?}, expected [{c}, M/group, kernel...]",
            w.shape()
        )));
    }
    let group = ctx.i("group", 1).max(1) as usize;
    if c % group != 0 {
        return Err(Error::arg(format!(
            "ConvTranspose: {c} input channels not divisible by group {group}"
        )));
    }
    let cg = c / group;
    let mg = w.shape()[1];
    let m = mg * group;
    let kernel = kernel_from(ctx, &w.shape()[2..], "ConvTranspose")?;
    let s = attr_vec(ctx, "strides", nd, 1)?;
    let d = attr_vec(ctx, "dilations", nd, 1)?;
    if s.contains(&0) || d.contains(&0) {
        return Err(Error::arg("strides and dilations must be positive"));
    }
    let op = attr_vec(ctx, "output_padding", nd, 0)?;
    let auto_pad = ctx.s("auto_pad", "NOTSET");
    let mut pb = vec![0usize; nd];
    let mut pe = vec![0usize; nd];
    let mut out_sp = vec![0usize; nd];
    let out_shape_attr = ctx.ints("output_shape");
    for i in 0..nd {
        let dk = (kernel[i].max(1) - 1) * d[i] + 1;
        let full = s[i] * (in_sp[i].max(1) - 1) + op[i] + dk;
        let target = match &out_shape_attr {
            Some(os) if !os.is_empty() => {
                // output_shape may list spatial dims only or the full shape
                let v = if os.len() == nd {
                    os[i]
                } else if os.len() == nd + 2 {
                    os[i + 2]
                } else {
                    return Err(Error::arg(format!(
                        "ConvTranspose: output_shape {os:?} has the wrong length"
                    )));
                };
                Some(v.max(0) as usize)
            }
            _ if auto_pad == "SAME_UPPER" || auto_pad == "SAME_LOWER" => Some(in_sp[i] * s[i]),
            _ => None,
        };
        match target {
            Some(t) => {
                // Per the spec only SAME_UPPER puts the smaller half first; a negative total
                // (output_shape beyond the full output) leaves zeros at the end.
                let total = full as i64 - t as i64;
                let start = if auto_pad == "SAME_UPPER" {
                    total.div_euclid(2)
                } else {
                    total - total.div_euclid(2)
                };
                if start < 0 {
                    return Err(Error::unsupported(format!(
                        "ConvTranspose: output size {t} needs negative leading padding (full output {full})"
                    )));
                }
                pb[i] = start as usize;
                pe[i] = (total - start).max(0) as usize;
                out_sp[i] = t;
            }
            None => {
                if auto_pad == "NOTSET" {
                    let p = attr_vec(ctx, "pads", 2 * nd, 0)?;
                    pb[i] = p[i];
                    pe[i] = p[i + nd];
                }
                out_sp[i] = full.checked_sub(pb[i] + pe[i]).ok_or_else(|| {
                    Error::arg("ConvTranspose: pads are larger than the output".to_string())
                })?;
            }
        }
    }
    // In col2im's terms, Geom.out is the input spatial shape.
    let g = Geom {
        k: kernel.clone(),
        s,
        d,
        pb,
        pe,
        out: in_sp.clone(),
    };
    let xv = fvec(x, "ConvTranspose X")?;
    let wv = fvec(w, "ConvTranspose W")?;
    let kt = numel(&kernel)?;
    let p_in = numel(&in_sp)?;
    let out_total = numel(&out_sp)?;
    let rows = mg * kt;
    let mut col = zeros_f32(
        rows.checked_mul(p_in)
            .ok_or_else(|| Error::TooLarge("ConvTranspose buffer overflows".into()))?,
    )?;
    let mut y = zeros_f32(n * m * out_total)?;
    if wv.len() != c * rows || xv.len() != n * c * p_in {
        return Err(Error::arg(
            "ConvTranspose: input or weight has the wrong number of elements",
        ));
    }
    for b in 0..n {
        for gi in 0..group {
            let wg = &wv[gi * cg * rows..(gi + 1) * cg * rows];
            let xg = &xv[(b * c + gi * cg) * p_in..(b * c + (gi + 1) * cg) * p_in];
            if !sgemm(
                1.0,
                MatRef::row_major(wg, cg, rows).t(),
                MatRef::row_major(xg, cg, p_in),
                0.0,
                &mut col,
                p_in.max(1),
            ) {
                return Err(Error::arg("ConvTranspose: internal size mismatch"));
            }
            let yg = &mut y[(b * m + gi * mg) * out_total..(b * m + (gi + 1) * mg) * out_total];
            col2im(&col, mg, &out_sp, &g, yg);
        }
    }
    if let Some(bias) = opt_input(ins, 2) {
        let bv = fvec(bias, "ConvTranspose B")?;
        if bv.len() != m {
            return Err(Error::arg(format!(
                "ConvTranspose: B has {} elements, expected {m}",
                bv.len()
            )));
        }
        for b in 0..n {
            for (oc, &v) in bv.iter().enumerate() {
                y[(b * m + oc) * out_total..(b * m + oc + 1) * out_total]
                    .iter_mut()
                    .for_each(|e| *e += v);
            }
        }
    }
    let mut shape = vec![n, m];
    shape.extend_from_slice(&out_sp);
    Ok(vec![ftensor(x.dtype(), shape, y)?])
}

// ---------------------------------------------------------------------------------------------
// Pooling.

#[derive(Clone, Copy, PartialEq)]
enum Pool {
    Max,
    Avg { include_pad: bool },
    Lp(f64),
}

/// For one spatial axis: per output index, the valid input coordinates of its window and the
/// number of window taps inside the padded extent.
fn windows(g: &Geom, i: usize, in_len: usize) -> Vec<(Vec<usize>, usize)> {
    (0..g.out[i])
        .map(|o| {
            let mut v = Vec::with_capacity(g.k[i]);
            let mut padded = 0;
            for k in 0..g.k[i] {
                let p = (o * g.s[i] + k * g.d[i]) as isize - g.pb[i] as isize;
                if p >= -(g.pb[i] as isize) && p < (in_len + g.pe[i]) as isize {
                    padded += 1;
                }
                if p >= 0 && (p as usize) < in_len {
                    v.push(p as usize);
                }
            }
            (v, padded)
        })
        .collect()
}

fn pool_impl(
    ctx: &OpCtx<'_>,
    ins: &[Option<&Tensor>],
    kind: Pool,
    op: &str,
) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (n, c, in_sp) = spatial(x, op)?;
    let nd = in_sp.len();
    let kernel: Vec<usize> = match ctx.ints("kernel_shape") {
        Some(k) if k.len() == nd && k.iter().all(|&v| v > 0) => {
            k.iter().map(|&v| v as usize).collect()
        }
        _ => {
            return Err(Error::arg(format!(
                "{op}: kernel_shape must list {nd} positive sizes"
            )))
        }
    };
    let ceil_mode = ctx.i("ceil_mode", 0) != 0;
    let g = geom(ctx, &in_sp, &kernel, ceil_mode)?;
    let in_total = numel(&in_sp)?;
    let out_total = numel(&g.out)?;
    let wins: Vec<Vec<(Vec<usize>, usize)>> = (0..nd).map(|i| windows(&g, i, in_sp[i])).collect();
    let in_strides = edgehal_core::tensor::contiguous_strides(&in_sp);
    let xv = x.to_f32();
    if !x.dtype().is_float() && !matches!(kind, Pool::Max) {
        return Err(Error::unsupported(format!("{op} on {}", x.dtype())));
    }
    let want_idx =
        matches!(kind, Pool::Max) && ctx.node.outputs.get(1).is_some_and(|o| o.is_some());
    let col_major = ctx.i("storage_order", 0) != 0;
    let mut out = zeros_f32(n * c * out_total)?;
    let mut idx_out = if want_idx {
        vec![0i64; n * c * out_total]
    } else {
        Vec::new()
    };
    let mut oidx = vec![0usize; nd];
    let mut tap = vec![0usize; nd];
    for o in 0..out_total {
        let mut r = o;
        for dd in (0..nd).rev() {
            oidx[dd] = r % g.out[dd];
            r /= g.out[dd];
        }
        let lists: Vec<&(Vec<usize>, usize)> = (0..nd).map(|dd| &wins[dd][oidx[dd]]).collect();
        let valid: usize = lists.iter().map(|l| l.0.len()).product();
        let padded: usize = lists.iter().map(|l| l.1).product();
        // Flat offsets (row-major) and flat indices (for storage_order) of the window's taps.
        let mut offs = Vec::with_capacity(valid);
        let mut cidx = Vec::new();
        if valid > 0 {
            tap.iter_mut().for_each(|t| *t = 0);
            'outer: loop {
                let mut off = 0usize;
                let mut cm = 0usize;
                let mut mul = 1usize;
                for dd in 0..nd {
                    let p = lists[dd].0[tap[dd]];
                    off += p * in_strides[dd] as usize;
                    cm += p * mul;
                    mul *= in_sp[dd];
                }
                offs.push(off);
                if want_idx && col_major {
                    cidx.push(cm);
                }
                for dd in (0..nd).rev() {
                    tap[dd] += 1;
                    if tap[dd] < lists[dd].0.len() {
                        continue 'outer;
                    }
                    tap[dd] = 0;
                }
                break;
            }
        }
        for nc in 0..n * c {
            let xs = &xv[nc * in_total..(nc + 1) * in_total];
            let dst = nc * out_total + o;
            match kind {
                Pool::Max => {
                    let mut best = f32::NEG_INFINITY;
                    let mut bi = 0usize;
                    for (j, &off) in offs.iter().enumerate() {
                        let v = xs[off];
                        if v > best || (j == 0 && v.is_nan()) {
                            best = v;
                            bi = j;
                        }
                    }
                    out[dst] = best;
                    if want_idx && !offs.is_empty() {
                        let flat = if col_major { cidx[bi] } else { offs[bi] };
                        idx_out[dst] = (nc * in_total + flat) as i64;
                    }
                }
                Pool::Avg { include_pad } => {
                    let s: f64 = offs.iter().map(|&off| xs[off] as f64).sum();
                    let cnt = if include_pad { padded } else { valid };
                    out[dst] = (s / cnt.max(1) as f64) as f32;
                }
                Pool::Lp(p) => {
                    let s: f64 = offs.iter().map(|&off| (xs[off] as f64).abs().powf(p)).sum();
                    out[dst] = s.powf(1.0 / p) as f32;
                }
            }
        }
    }
    let mut shape = vec![n, c];
    shape.extend_from_slice(&g.out);
    let y = if x.dtype().is_float() {
        ftensor(x.dtype(), shape.clone(), out)?
    } else {
        Tensor::from_vec(shape.clone(), out)?.cast(x.dtype())?
    };
    let mut res = vec![y];
    if want_idx {
        res.push(Tensor::from_vec(shape, idx_out)?);
    }
    Ok(res)
}

fn max_pool(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    if let Some(out) = max_pool_2d_f32(ctx, ins)? {
        return Ok(vec![out]);
    }
    pool_impl(ctx, ins, Pool::Max, "MaxPool")
}

/// MaxPool fast path for 2-D f32 without indices or dilation: per output row, the max of the
/// window's input rows (contiguous, vectorized), then the max across each window's columns.
/// NaNs are skipped, as `f32::max` does. `None` where the general path must run.
fn max_pool_2d_f32(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Option<Tensor>> {
    let x = input(ins, 0)?;
    if x.dtype() != edgehal_core::DType::F32
        || x.rank() != 4
        || ctx.node.outputs.get(1).is_some_and(|o| o.is_some())
    {
        return Ok(None);
    }
    let kernel = match ctx.ints("kernel_shape") {
        Some(k) if k.len() == 2 && k.iter().all(|&v| v > 0) => [k[0] as usize, k[1] as usize],
        _ => return Ok(None),
    };
    let (n, c, in_sp) = spatial(x, "MaxPool")?;
    let g = geom(ctx, &in_sp, &kernel, ctx.i("ceil_mode", 0) != 0)?;
    if g.d != [1, 1] || g.pb[0] >= kernel[0] || g.pb[1] >= kernel[1] {
        return Ok(None);
    }
    let (h, w) = (in_sp[0], in_sp[1]);
    let (oh, ow) = (g.out[0], g.out[1]);
    let xv = x.to_f32();
    let mut out = zeros_f32(numel(&[n, c, oh, ow])?)?;
    let plane = oh * ow.max(1);
    // Channels split across threads for large maps (resnet18's 112x112x64 pool was a serial
    // 4% of a 2-thread run).
    let threads = if out.len() >= crate::par::MIN_PARALLEL_ELEMS {
        crate::arena::threads()
    } else {
        1
    };
    crate::par::for_parts::<f32, Error>(threads, n * c, plane, &mut out, |imgs, part| {
        max_pool_planes(&xv[imgs.start * h * w..], part, [h, w], ow, kernel, &g);
        Ok(())
    })?;
    let shape = vec![n, c, oh, ow];
    Ok(Some(Tensor::from_vec(shape, out)?))
}

/// The output planes in `out` (each `oh x ow`, rows of `ow`) from the planes of `xv` (`h x w`).
fn max_pool_planes(
    xv: &[f32],
    out: &mut [f32],
    [h, w]: [usize; 2],
    ow: usize,
    kernel: [usize; 2],
    g: &Geom,
) {
    let mut rowmax = vec![f32::NEG_INFINITY; w];
    for (img, yc) in out.chunks_exact_mut((g.out[0] * ow).max(1)).enumerate() {
        let xc = &xv[img * h * w..(img + 1) * h * w];
        for (oy, yrow) in yc.chunks_exact_mut(ow.max(1)).enumerate() {
            let y0 = (oy * g.s[0]).saturating_sub(g.pb[0]);
            let y1 = (oy * g.s[0] + kernel[0]).saturating_sub(g.pb[0]).min(h);
            rowmax.fill(f32::NEG_INFINITY);
            for iy in y0..y1 {
                for (m, &v) in rowmax.iter_mut().zip(&xc[iy * w..(iy + 1) * w]) {
                    *m = if v > *m { v } else { *m };
                }
            }
            // Windows wholly inside the row (`lo..hi`) read a fixed-size window (3 wide
            // unrolled); the border ones clip theirs.
            let (s, k, pb) = (g.s[1], kernel[1], g.pb[1]);
            let lo = pb.div_ceil(s).min(ow);
            let hi = if w + pb >= k {
                ((w + pb - k) / s + 1).clamp(lo, ow)
            } else {
                lo
            };
            let edge = |ox: usize| {
                let x0 = (ox * s).saturating_sub(pb);
                let x1 = (ox * s + k).saturating_sub(pb).min(w);
                rowmax[x0..x1.max(x0)]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
            };
            for ox in (0..lo).chain(hi..ow) {
                yrow[ox] = edge(ox);
            }
            if hi > lo {
                let wins = rowmax[lo * s - pb..].windows(k).step_by(s);
                let inner = &mut yrow[lo..hi];
                if k == 3 {
                    for (o, win) in inner.iter_mut().zip(wins) {
                        let m = if win[1] > win[0] { win[1] } else { win[0] };
                        *o = if win[2] > m { win[2] } else { m };
                    }
                } else {
                    for (o, win) in inner.iter_mut().zip(wins) {
                        *o = win
                            .iter()
                            .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
                    }
                }
            }
        }
    }
}

fn average_pool(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let include_pad = ctx.i("count_include_pad", 0) != 0;
    pool_impl(ctx, ins, Pool::Avg { include_pad }, "AveragePool")
}

fn lp_pool(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let p = ctx.i("p", 2);
    if p <= 0 {
        return Err(Error::arg(format!("LpPool: p must be positive, got {p}")));
    }
    pool_impl(ctx, ins, Pool::Lp(p as f64), "LpPool")
}

fn global_pool(ins: &[Option<&Tensor>], kind: Pool, op: &str) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let (n, c, in_sp) = spatial(x, op)?;
    let sp = numel(&in_sp)?;
    let xv = fvec(x, op)?;
    let out: Vec<f32> = (0..n * c)
        .map(|i| {
            let row = &xv[i * sp..(i + 1) * sp];
            match kind {
                Pool::Max => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                Pool::Avg { .. } => (sum_f64(row) / sp.max(1) as f64) as f32,
                Pool::Lp(p) => row
                    .iter()
                    .map(|&v| (v as f64).abs().powf(p))
                    .sum::<f64>()
                    .powf(1.0 / p) as f32,
            }
        })
        .collect();
    let mut shape = vec![n, c];
    shape.extend(std::iter::repeat_n(1, in_sp.len()));
    Ok(vec![ftensor(x.dtype(), shape, out)?])
}

/// The sum of `v` in f64 over eight interleaved partial sums (one chain of dependent adds
/// was most of a MobileNet's pooling time); each partial sum of f32 values is as exact as
/// the single chain's.
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in chunks.by_ref() {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    acc.iter().sum::<f64>() + tail
}

fn global_average_pool(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    global_pool(ins, Pool::Avg { include_pad: false }, "GlobalAveragePool")
}
fn global_max_pool(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    global_pool(ins, Pool::Max, "GlobalMaxPool")
}
fn global_lp_pool(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    global_pool(ins, Pool::Lp(ctx.i("p", 2).max(1) as f64), "GlobalLpPool")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stride-2 im2col (even/odd column phases) equals the general one on every small 2-D
    /// geometry: kernels 1-7 wide, odd and even widths, pads on either side, vertical stride
    /// and dilation 1-2.
    #[test]
    fn im2col_stride2_phases_match_the_general_walk() {
        let mut cases = 0;
        for kw in 1..=7usize {
            for kh in [1usize, 3] {
                for w in [1usize, 2, 5, 8, 9] {
                    for (pl, pr) in [(0usize, 0usize), (kw / 2, kw / 2), (kw - 1, 0), (0, 1)] {
                        for (sy, dy) in [(1usize, 1usize), (2, 1), (1, 2)] {
                            let h = 6usize;
                            if w + pl + pr < kw || h + 2 < (kh - 1) * dy + 1 {
                                continue;
                            }
                            let g = Geom {
                                k: vec![kh, kw],
                                s: vec![sy, 2],
                                d: vec![dy, 1],
                                pb: vec![1, pl],
                                pe: vec![1, pr],
                                out: vec![
                                    (h + 2 - ((kh - 1) * dy + 1)) / sy + 1,
                                    (w + pl + pr - kw) / 2 + 1,
                                ],
                            };
                            let cg = 2;
                            let x: Vec<f32> = (0..cg * h * w).map(|v| v as f32 + 1.0).collect();
                            let n = cg * kh * kw * g.out[0] * g.out[1];
                            let (mut a, mut b) = (vec![-1f32; n], vec![-2f32; n]);
                            im2col(&x, cg, &[h, w], &g, &mut a);
                            im2col_nd(&x, cg, &[h, w], &g, &mut b);
                            assert_eq!(a, b, "k {kh}x{kw} w {w} pads {pl},{pr} sy {sy} dy {dy}");
                            cases += 1;
                        }
                    }
                }
            }
        }
        assert!(cases > 300, "{cases}");
    }

    use super::super::test_util::*;
    use edgehal_core::graph::Attr;

    /// Direct-definition convolution, for checking im2col on odd geometries.
    #[allow(clippy::too_many_arguments)]
    fn naive_conv2d(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        wt: &[f32],
        (m, kh, kw): (usize, usize, usize),
        group: usize,
        (sh, sw): (usize, usize),
        (dh, dw): (usize, usize),
        (pt, pl, oh, ow): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let cg = c / group;
        let mg = m / group;
        let mut y = vec![0f32; n * m * oh * ow];
        for b in 0..n {
            for oc in 0..m {
                let gi = oc / mg;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = 0f32;
                        for ci in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * sh + ky * dh) as isize - pt as isize;
                                    let ix = (ox * sw + kx * dw) as isize - pl as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xi = ((b * c + gi * cg + ci) * h + iy as usize) * w
                                        + ix as usize;
                                    let wi = ((oc * cg + ci) * kh + ky) * kw + kx;
                                    s += x[xi] * wt[wi];
                                }
                            }
                        }
                        y[((b * m + oc) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn conv_matches_direct_definition_with_groups_strides_dilations_pads() {
        let (n, c, h, w) = (2, 4, 7, 6);
        let (m, kh, kw) = (6, 3, 2);
        let group = 2;
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 7) % 11) as f32 - 5.0)
            .collect();
        let wt: Vec<f32> = (0..m * (c / group) * kh * kw)
            .map(|i| ((i * 5) % 7) as f32 * 0.25 - 0.7)
            .collect();
        let (sh, sw, dh, dw) = (2, 1, 1, 2);
        let pads = [1usize, 2, 0, 1]; // top, left, bottom, right
        let oh = (h + pads[0] + pads[2] - ((kh - 1) * dh + 1)) / sh + 1;
        let ow = (w + pads[1] + pads[3] - ((kw - 1) * dw + 1)) / sw + 1;
        let want = naive_conv2d(
            &x,
            (n, c, h, w),
            &wt,
            (m, kh, kw),
            group,
            (sh, sw),
            (dh, dw),
            (pads[0], pads[1], oh, ow),
        );
        let xt = t(&[n, c, h, w], &x);
        let wtt = t(&[m, c / group, kh, kw], &wt);
        let y = run_op(
            "Conv",
            11,
            vec![
                ("group", Attr::Int(group as i64)),
                ("strides", Attr::Ints(vec![sh as i64, sw as i64])),
                ("dilations", Attr::Ints(vec![dh as i64, dw as i64])),
                ("pads", Attr::Ints(pads.iter().map(|&p| p as i64).collect())),
            ],
            &[Some(&xt), Some(&wtt)],
            1,
        )
        .unwrap();
        assert_eq!(y[0].shape(), &[n, m, oh, ow]);
        close(&y[0].to_vec::<f32>().unwrap(), &want);
    }

    /// Stride-1 3x3 convolutions that take the Winograd paths: F(2x2, 3x3) on 7x7 and 6x7
    /// outputs (asymmetric pads, odd tile edges), F(4x4, 3x3) on 14x14 (its GEMMs have 16
    /// columns, the 12x16 AVX-512 tile), with a bias, two images.
    #[test]
    fn winograd_paths_match_direct_definition() {
        for &(c, m, h, w, pads) in &[
            (5usize, 13usize, 7usize, 7usize, [1usize, 1, 1, 1]),
            (3, 7, 7, 7, [1, 1, 0, 1]),
            (8, 12, 14, 14, [1, 1, 1, 1]),
        ] {
            let n = 2;
            let x: Vec<f32> = (0..n * c * h * w)
                .map(|i| ((i * 7) % 11) as f32 * 0.2 - 1.0)
                .collect();
            let wt: Vec<f32> = (0..m * c * 9)
                .map(|i| ((i * 5) % 13) as f32 * 0.05 - 0.3)
                .collect();
            let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.1 - 0.5).collect();
            let oh = h + pads[0] + pads[2] - 2;
            let ow = w + pads[1] + pads[3] - 2;
            let mut want = naive_conv2d(
                &x,
                (n, c, h, w),
                &wt,
                (m, 3, 3),
                1,
                (1, 1),
                (1, 1),
                (pads[0], pads[1], oh, ow),
            );
            for (i, v) in want.iter_mut().enumerate() {
                *v += bias[(i / (oh * ow)) % m];
            }
            let y = run_op(
                "Conv",
                11,
                vec![("pads", Attr::Ints(pads.iter().map(|&p| p as i64).collect()))],
                &[
                    Some(&t(&[n, c, h, w], &x)),
                    Some(&t(&[m, c, 3, 3], &wt)),
                    Some(&t(&[m], &bias)),
                ],
                1,
            )
            .unwrap();
            assert_eq!(y[0].shape(), &[n, m, oh, ow]);
            close(&y[0].to_vec::<f32>().unwrap(), &want);
        }
    }

    #[test]
    fn depthwise_same_upper_keeps_size_and_adds_bias() {
        // 2 channels, 3x3 ones kernel, each channel its own group.
        let x = t(&[1, 2, 2, 2], &[1., 2., 3., 4., 10., 20., 30., 40.]);
        let w = t(&[2, 1, 3, 3], &[1.0; 18]);
        let b = t(&[2], &[0.5, -1.0]);
        let y = run_op(
            "Conv",
            11,
            vec![
                ("group", Attr::Int(2)),
                ("auto_pad", Attr::String(b"SAME_UPPER".to_vec())),
            ],
            &[Some(&x), Some(&w), Some(&b)],
            1,
        )
        .unwrap();
        assert_eq!(y[0].shape(), &[1, 2, 2, 2]);
        close(
            &y[0].to_vec::<f32>().unwrap(),
            &[10.5, 10.5, 10.5, 10.5, 99., 99., 99., 99.],
        );
    }

    #[test]
    fn conv_transpose_stride_2_scatters_and_overlaps() {
        // 1-d: x = [1, 2], w = [1, 1, 1], stride 2 -> [1, 1, 3, 2, 2]
        let x = t(&[1, 1, 2], &[1., 2.]);
        let w = t(&[1, 1, 3], &[1., 1., 1.]);
        let y = run_op(
            "ConvTranspose",
            11,
            vec![("strides", Attr::Ints(vec![2]))],
            &[Some(&x), Some(&w)],
            1,
        )
        .unwrap();
        close(&y[0].to_vec::<f32>().unwrap(), &[1., 1., 3., 2., 2.]);
    }

    #[test]
    fn maxpool_indices_and_ceil_mode() {
        let x = t(&[1, 1, 3, 3], &[1., 5., 2., 7., 3., 9., 4., 8., 6.]);
        let y = run_op(
            "MaxPool",
            12,
            vec![
                ("kernel_shape", Attr::Ints(vec![2, 2])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("ceil_mode", Attr::Int(1)),
            ],
            &[Some(&x)],
            2,
        )
        .unwrap();
        assert_eq!(y[0].shape(), &[1, 1, 2, 2]);
        close(&y[0].to_vec::<f32>().unwrap(), &[7., 9., 8., 6.]);
        assert_eq!(y[1].to_vec::<i64>().unwrap(), vec![3, 5, 7, 8]);
    }

    #[test]
    fn averagepool_count_include_pad() {
        let x = t(&[1, 1, 2, 2], &[4., 4., 4., 4.]);
        let attrs = |inc: i64| {
            vec![
                ("kernel_shape", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 0, 0])),
                ("count_include_pad", Attr::Int(inc)),
            ]
        };
        let a = run_op("AveragePool", 19, attrs(0), &[Some(&x)], 1).unwrap();
        close(&a[0].to_vec::<f32>().unwrap(), &[4., 4., 4., 4.]);
        let b = run_op("AveragePool", 19, attrs(1), &[Some(&x)], 1).unwrap();
        close(&b[0].to_vec::<f32>().unwrap(), &[1., 2., 2., 4.]);
    }
}
