//! Ops: `Resize` (opsets 10..19+) and the deprecated `Upsample`.
//!
//! Every supported mode is separable: for each axis we compute, per output index, a short list
//! of `(input index, weight)` taps (1 effective tap for nearest, 2 for linear, 4 for cubic, more
//! when antialiasing a downscale), then apply the axes one after another. Taps follow the ONNX
//! reference: the source coordinate comes from `coordinate_transformation_mode`, neighbours
//! outside the input repeat the edge (or are dropped and the rest renormalised with
//! `exclude_outside`), and `tf_crop_and_resize` writes `extrapolation_value` wherever any
//! axis's coordinate falls outside the input.

use edgehal_core::dtype::Elem;
use edgehal_core::{bail, ensure, with_dtype, Error, Result, Tensor};

use super::{input, norm_axis, opt_input, OpCtx, Registry};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

struct Params {
    mode: Mode,
    coord: String,
    nearest: String,
    cubic_a: f64,
    exclude_outside: bool,
    extrapolation: f64,
    antialias: bool,
}

/// One axis's taps: for each output index, `(input index, weight)` pairs, or None where the
/// output is the extrapolation value.
type Taps = Vec<Option<Vec<(usize, f64)>>>;

/// Source coordinate of output index `x` along an axis.
fn source_coord(
    p: &Params,
    x: f64,
    scale: f64,
    in_len: usize,
    out_len: usize,
    roi: (f64, f64),
) -> Result<f64> {
    let n = in_len as f64;
    let out_f = scale * n;
    Ok(match p.coord.as_str() {
        "half_pixel" => (x + 0.5) / scale - 0.5,
        "pytorch_half_pixel" => {
            if out_f == 1.0 {
                -0.5
            } else {
                (x + 0.5) / scale - 0.5
            }
        }
        "align_corners" => {
            if out_f == 1.0 {
                0.0
            } else {
                x * (n - 1.0) / (out_f - 1.0)
            }
        }
        "asymmetric" => x / scale,
        "tf_half_pixel_for_nn" => (x + 0.5) / scale,
        "half_pixel_symmetric" => {
            let adjustment = out_len as f64 / out_f;
            let offset = n / 2.0 * (1.0 - adjustment);
            offset + (x + 0.5) / scale - 0.5
        }
        "tf_crop_and_resize" => {
            let (s, e) = roi;
            let v = if out_f == 1.0 {
                (e - s) * (n - 1.0) / 2.0
            } else {
                x * (e - s) * (n - 1.0) / (out_f - 1.0)
            };
            v + s * (n - 1.0)
        }
        m => return Err(Error::unsupported(format!("Resize coordinate mode {m:?}"))),
    })
}

fn cubic_kernel(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x <= 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

fn axis_taps(
    p: &Params,
    in_len: usize,
    out_len: usize,
    scale: f64,
    roi: (f64, f64),
) -> Result<Taps> {
    ensure!(
        in_len > 0,
        "Resize: cannot resize an empty axis to {out_len}"
    );
    let last = in_len as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last) as usize;
    let mut taps = Vec::with_capacity(out_len);
    for xo in 0..out_len {
        let x = source_coord(p, xo as f64, scale, in_len, out_len, roi)?;
        if p.coord == "tf_crop_and_resize" && (x < 0.0 || x > last as f64) {
            taps.push(None);
            continue;
        }
        // Left neighbour and a ratio in (0, 1], as the reference defines them.
        let x0 = (x.ceil() as i64).saturating_sub(1);
        let ratio = x - x0 as f64;
        let t: Vec<(i64, f64)> = match p.mode {
            Mode::Nearest => {
                let up = if ratio == 1.0 {
                    true
                } else {
                    match p.nearest.as_str() {
                        "round_prefer_floor" => ratio > 0.5,
                        "round_prefer_ceil" => ratio >= 0.5,
                        "floor" => false,
                        "ceil" => true,
                        m => return Err(Error::unsupported(format!("Resize nearest_mode {m:?}"))),
                    }
                };
                vec![(if up { x0.saturating_add(1) } else { x0 }, 1.0)]
            }
            Mode::Linear | Mode::Cubic => {
                let s = if p.antialias { scale.min(1.0) } else { 1.0 };
                let support = if p.mode == Mode::Linear { 1.0 } else { 2.0 };
                ensure!(
                    support / s < 1e6,
                    "Resize: antialias footprint for scale {scale} is too large"
                );
                let start = (-support / s).floor() as i64 + 1;
                let end = 2 - start;
                let mut v: Vec<(i64, f64)> = (start..end)
                    .map(|k| {
                        let arg = (k as f64 - ratio) * s;
                        let w = if p.mode == Mode::Linear {
                            (1.0 - arg.abs()).clamp(0.0, 1.0)
                        } else {
                            cubic_kernel(arg, p.cubic_a)
                        };
                        (x0.saturating_add(k), w)
                    })
                    .collect();
                if p.exclude_outside {
                    for (i, w) in v.iter_mut() {
                        if *i < 0 || *i > last {
                            *w = 0.0;
                        }
                    }
                }
                let sum: f64 = v.iter().map(|t| t.1).sum();
                if sum != 0.0 && (p.antialias || p.exclude_outside) {
                    v.iter_mut().for_each(|t| t.1 /= sum);
                }
                v
            }
        };
        let mut merged: Vec<(usize, f64)> = Vec::with_capacity(t.len());
        for (i, w) in t {
            if w == 0.0 {
                continue;
            }
            let i = clamp(i);
            match merged.iter_mut().find(|m| m.0 == i) {
                Some(m) => m.1 += w,
                None => merged.push((i, w)),
            }
        }
        taps.push(Some(merged));
    }
    Ok(taps)
}

/// Apply one axis's taps to `data` of `shape` (updated in place). `mask` marks outputs that
/// are extrapolated; it is carried through like the data.
fn apply_axis(
    data: &[f64],
    mask: &[bool],
    shape: &mut [usize],
    axis: usize,
    taps: &Taps,
) -> (Vec<f64>, Vec<bool>) {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let (n, m) = (shape[axis], taps.len());
    let mut out = vec![0f64; outer * m * inner];
    let mut new_mask = vec![false; outer * m * inner];
    for o in 0..outer {
        for (j, t) in taps.iter().enumerate() {
            let dst = (o * m + j) * inner;
            match t {
                None => new_mask[dst..dst + inner]
                    .iter_mut()
                    .for_each(|x| *x = true),
                Some(t) => {
                    for &(i, w) in t {
                        let src = (o * n + i) * inner;
                        for k in 0..inner {
                            out[dst + k] += w * data[src + k];
                            new_mask[dst + k] |= mask[src + k];
                        }
                    }
                }
            }
        }
    }
    shape[axis] = m;
    (out, new_mask)
}

#[allow(clippy::too_many_arguments)]
fn resize_impl(
    t: &Tensor,
    p: &Params,
    scales: Option<Vec<f64>>,
    sizes: Option<Vec<i64>>,
    roi: Option<Vec<f64>>,
    axes: Option<Vec<i64>>,
    policy: &str,
) -> Result<Tensor> {
    let r = t.rank();
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| norm_axis(a, r)).collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    let na = axes.len();
    let mut scale = vec![1f64; r];
    let mut out_shape = t.shape().to_vec();
    if let Some(sz) = sizes {
        ensure!(sz.len() == na, "Resize: {} sizes for {na} axes", sz.len());
        for (k, &a) in axes.iter().enumerate() {
            ensure!(sz[k] >= 0, "Resize: negative size {}", sz[k]);
            scale[a] = sz[k] as f64 / t.shape()[a] as f64;
            out_shape[a] = sz[k] as usize;
        }
        if policy != "stretch" {
            let vals = axes.iter().map(|&a| scale[a]);
            let s = match policy {
                "not_larger" => vals.fold(f64::INFINITY, f64::min),
                "not_smaller" => vals.fold(0.0, f64::max),
                p => bail!("Resize: unknown keep_aspect_ratio_policy {p:?}"),
            };
            for &a in &axes {
                scale[a] = s;
                out_shape[a] = (s * t.shape()[a] as f64 + 0.5) as usize;
            }
        }
    } else if let Some(sc) = scales {
        ensure!(sc.len() == na, "Resize: {} scales for {na} axes", sc.len());
        for (k, &a) in axes.iter().enumerate() {
            ensure!(
                sc[k] > 0.0 && sc[k].is_finite(),
                "Resize: bad scale {}",
                sc[k]
            );
            scale[a] = sc[k];
            let o = sc[k] * t.shape()[a] as f64;
            ensure!(o < 1e12, "Resize: output too large");
            out_shape[a] = o as usize;
        }
    } else {
        bail!("Resize: neither scales nor sizes given");
    }
    edgehal_core::tensor::checked_numel(&out_shape, t.dtype())?;
    let mut rois = vec![(0f64, 1f64); r];
    if let Some(roi) = roi.filter(|v| !v.is_empty()) {
        ensure!(
            roi.len() == 2 * na,
            "Resize: roi has {} values for {na} axes",
            roi.len()
        );
        for (k, &a) in axes.iter().enumerate() {
            rois[a] = (roi[k], roi[k + na]);
        }
    }
    let mut shape = t.shape().to_vec();
    let mut data = t.to_f64_vec();
    let mut mask = vec![false; data.len()];
    for a in 0..r {
        let identity =
            scale[a] == 1.0 && out_shape[a] == shape[a] && p.coord != "tf_crop_and_resize";
        if identity {
            continue;
        }
        let taps = axis_taps(p, shape[a], out_shape[a], scale[a], rois[a])?;
        (data, mask) = apply_axis(&data, &mask, &mut shape, a, &taps);
    }
    for (d, &m) in data.iter_mut().zip(&mask) {
        if m {
            *d = p.extrapolation;
        }
    }
    let dt = t.dtype();
    with_dtype!(dt, T => {
        let v: Vec<T> = if dt.is_int() {
            data.iter().map(|&x| T::from_f64(x.round_ties_even())).collect()
        } else {
            data.iter().map(|&x| T::from_f64(x)).collect()
        };
        Tensor::from_vec_dtype(dt, out_shape, v)
    })
}

fn params(ctx: &OpCtx<'_>, legacy: bool) -> Result<Params> {
    let mode = match ctx.s("mode", "nearest").as_str() {
        "nearest" => Mode::Nearest,
        "linear" | "bilinear" | "trilinear" => Mode::Linear,
        "cubic" | "bicubic" => Mode::Cubic,
        m => bail!("Resize: unknown mode {m:?}"),
    };
    let p = Params {
        mode,
        coord: if legacy {
            "asymmetric".into()
        } else {
            ctx.s("coordinate_transformation_mode", "half_pixel")
        },
        nearest: if legacy {
            "floor".into()
        } else {
            ctx.s("nearest_mode", "round_prefer_floor")
        },
        cubic_a: ctx.f("cubic_coeff_a", -0.75) as f64,
        exclude_outside: ctx.i("exclude_outside", 0) != 0,
        extrapolation: ctx.f("extrapolation_value", 0.0) as f64,
        antialias: ctx.i("antialias", 0) != 0,
    };
    if p.antialias && p.mode == Mode::Nearest {
        bail!("Resize: antialias is not defined for nearest mode");
    }
    Ok(p)
}

fn resize(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let legacy = ctx.opset < 11;
    let p = params(ctx, legacy)?;
    let nonempty = |i: usize| opt_input(ins, i).filter(|x| !x.is_empty());
    let (roi, scales, sizes) = if legacy {
        (None, nonempty(1).map(|s| s.to_f64_vec()), None)
    } else {
        (
            nonempty(1).map(|s| s.to_f64_vec()),
            nonempty(2).map(|s| s.to_f64_vec()),
            nonempty(3).map(|s| s.to_i64_vec()),
        )
    };
    let policy = ctx.s("keep_aspect_ratio_policy", "stretch");
    Ok(vec![resize_impl(
        t,
        &p,
        scales,
        sizes,
        roi,
        ctx.ints("axes"),
        &policy,
    )?])
}

fn upsample(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let t = input(ins, 0)?;
    let p = params(ctx, true)?;
    let scales = match opt_input(ins, 1) {
        Some(s) => s.to_f64_vec(),
        None => ctx
            .floats("scales")
            .ok_or_else(|| Error::arg("Upsample: no scales"))?
            .iter()
            .map(|&x| x as f64)
            .collect(),
    };
    Ok(vec![resize_impl(
        t,
        &p,
        Some(scales),
        None,
        None,
        None,
        "stretch",
    )?])
}

/// Register this module's ops.
pub fn register(r: &mut Registry) {
    r.add("Resize", resize);
    r.add("Upsample", upsample);
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::{Attr, Node};

    fn run(attrs: Vec<(&str, Attr)>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        let mut node = Node {
            op: "Resize".into(),
            ..Default::default()
        };
        for (k, v) in attrs {
            node.attrs.insert(k.into(), v);
        }
        let ctx = OpCtx {
            node: &node,
            opset: 19,
            subgraph: None,
            dest: None,
        };
        resize(&ctx, ins)
    }

    fn s(v: &str) -> Attr {
        Attr::String(v.as_bytes().to_vec())
    }

    #[test]
    fn nearest_upsample_and_linear_half_pixel() {
        let x = Tensor::from_vec(vec![1, 1, 2, 2], vec![1f32, 2., 3., 4.]).unwrap();
        let sc = Tensor::from_vec(vec![4], vec![1f32, 1., 2., 2.]).unwrap();
        let o = run(
            vec![("coordinate_transformation_mode", s("asymmetric"))],
            &[Some(&x), None, Some(&sc)],
        )
        .unwrap();
        assert_eq!(o[0].shape(), &[1, 1, 4, 4]);
        assert_eq!(
            o[0].to_vec::<f32>().unwrap(),
            vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
        );
        // numpy/onnx reference: linear half_pixel 2x upsample of [[1,2],[3,4]]
        let o = run(vec![("mode", s("linear"))], &[Some(&x), None, Some(&sc)]).unwrap();
        let want = [
            1.0f32, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75,
            4.0,
        ];
        let got = o[0].to_vec::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn sizes_and_crop_extrapolation() {
        let x = Tensor::from_vec(vec![1, 1, 1, 4], vec![1f32, 2., 3., 4.]).unwrap();
        let sizes = Tensor::from_vec(vec![4], vec![1i64, 1, 1, 2]).unwrap();
        let o = run(vec![], &[Some(&x), None, None, Some(&sizes)]).unwrap();
        // half_pixel, nearest round_prefer_floor: x = 0.5 -> 0, x = 2.5 -> 2
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![1., 3.]);
        let roi = Tensor::from_vec(vec![8], vec![0f32, 0., 0., 0.5, 1., 1., 1., 1.5]).unwrap();
        let sizes = Tensor::from_vec(vec![4], vec![1i64, 1, 1, 3]).unwrap();
        let o = run(
            vec![
                ("coordinate_transformation_mode", s("tf_crop_and_resize")),
                ("mode", s("linear")),
                ("extrapolation_value", Attr::Float(-1.0)),
            ],
            &[Some(&x), Some(&roi), None, Some(&sizes)],
        )
        .unwrap();
        // x = 1.5, 3.0, 4.5 -> 2.5, 4, outside
        assert_eq!(o[0].to_vec::<f32>().unwrap(), vec![2.5, 4., -1.]);
    }
}
