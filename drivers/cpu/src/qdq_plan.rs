//! Quantized ONNX convolutions from QDQ graphs, run as int8 in NHWC.
//!
//! The graph pass `fuse_qdq` (hal's `passes.rs`) rewrites `DequantizeLinear` -> `Conv` ->
//! `QuantizeLinear` chains into one [`QCONV_NHWC`] node (domain `edgehal`): `QLinearConv`'s
//! inputs and semantics (`x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale,
//! y_zero_point, B`, int32 bias, requantization `rne(f32(acc + B) * (x_scale * w_scale /
//! y_scale)) + y_zero_point`, what onnxruntime computes) with `x` and `y` in NHWC, so chains of
//! these nodes run without layout changes; the pass puts transposes at the boundaries.
//!
//! A [`QdqConvPlan`] is built once per node: the weights packed for the int8 GEMM
//! ([`PackedB`], `[kh][kw][c]` depth order) or, depthwise, widened to i32 with the zero point
//! subtracted; the bias and the per-channel float requantization ([`Requant::new_float`]). A run
//! feeds the NHWC bytes straight to [`qconv::qgemm_requant`] for 1x1 stride-1 convolutions
//! (im2col for the others) or to the direct [`qconv::depthwise`], rows split across threads.
//! The op function [`qconv_nhwc`] (transpose, the reference `QLinearConv`, transpose back) is the
//! definition the plan is tested against; `EDGEHAL_QDQ=0` turns the plans (and the pass) off.

use edgehal_core::graph::Graph;
use edgehal_core::{DType, Error, Node, Result, Tensor};
use edgehal_kernels::qconv::{self, Depthwise, DwPack, Requant};
use edgehal_kernels::qgemm::{PackedB, QMat};

use crate::conv_plan::FUSED_DOMAIN;
use crate::ops::tflite::nn::Geo;
use crate::ops::{input, OpCtx, Registry};
use crate::qconv_plan::{run_depthwise, InPlaceImage};
use std::ops::Range;

/// The op type of the NHWC quantized convolution (domain `edgehal`).
pub const QCONV_NHWC: &str = "QLinearConvNhwc";

/// Attribute of [`QCONV_NHWC`]: 1 when `x` is NCHW (a graph's first convolution reads the
/// quantized input as it is instead of after a transpose; group 1 only).
pub const INPUT_NCHW: &str = "input_nchw";

/// Attribute of [`QCONV_NHWC`]: 1 when the node is a quantized `Gemm` (`x` is `[M, K]`, the
/// result `[M, N]`), run as a 1x1 convolution over `M` pixels.
pub const GEMM_2D: &str = "gemm_2d";

/// The op type of the fused `DequantizeLinear` x2 -> `Add` -> `QuantizeLinear` (domain
/// `edgehal`; inputs `a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
/// y_zero_point`, per-tensor, same shapes, any layout): [`qconv::QdqAdd`].
pub const QDQ_ADD: &str = "QdqAdd";

/// Whether QDQ convolutions are fused and planned (`EDGEHAL_QDQ=0` turns both off, for
/// comparisons).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGEHAL_QDQ").map_or(true, |v| v != "0"))
}

pub(crate) fn register(r: &mut Registry) {
    r.add_domain(FUSED_DOMAIN, QCONV_NHWC, qconv_nhwc);
    r.add_domain(FUSED_DOMAIN, QDQ_ADD, qdq_add);
}

/// A per-tensor f32 scale and its 8-bit zero point (absent: 0 of `dt`).
fn qparam(ins: &[Option<&Tensor>], k: usize, dt: DType) -> Result<(f32, i32, DType)> {
    let s = input(ins, k)?;
    let sv = f32s(s).filter(|v| v.len() == 1);
    let z = crate::ops::opt_input(ins, k + 1);
    let zv = match z {
        Some(z) => ints(z).filter(|v| v.len() == 1),
        None => Some(vec![0]),
    };
    match (sv, zv) {
        (Some(s), Some(zv)) => Ok((s[0], zv[0], z.map_or(dt, |t| t.dtype()))),
        _ => Err(Error::arg(format!(
            "{QDQ_ADD}: scales must be f32 scalars and zero points 8-bit scalars"
        ))),
    }
}

/// `DequantizeLinear(a) + DequantizeLinear(b)` quantized again, per-tensor parameters, `a`
/// and `b` of one shape and 8-bit type ([`qconv::qdq_add`]).
pub fn qdq_add(_: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(ins, 0)?;
    let b = input(ins, 3)?;
    let signed = match a.dtype() {
        DType::U8 => false,
        DType::I8 => true,
        d => return Err(Error::arg(format!("{QDQ_ADD}: 8-bit inputs, got {d}"))),
    };
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        return Err(Error::arg(format!(
            "{QDQ_ADD}: inputs {:?} {} and {:?} {} differ",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        )));
    }
    let (sa, za, _) = qparam(ins, 1, a.dtype())?;
    let (sb, zb, _) = qparam(ins, 4, b.dtype())?;
    // QuantizeLinear without a zero point gives u8.
    let (sy, zy, dt) = qparam(ins, 6, DType::U8)?;
    let (lo, hi) = match dt {
        DType::U8 => (0, 255),
        DType::I8 => (-128, 127),
        d => return Err(Error::arg(format!("{QDQ_ADD}: 8-bit output, got {d}"))),
    };
    let p = qconv::QdqAdd {
        signed,
        sa,
        za,
        sb,
        zb,
        sy,
        zy,
        lo,
        hi,
    };
    let mut out = crate::arena::take_bytes(a.len());
    let (ab, bb) = (a.bytes(), b.bytes());
    if ab.len() != out.len() || bb.len() != out.len() {
        return Err(Error::arg(format!("{QDQ_ADD}: operand sizes")));
    }
    // Large maps (MobileNet's 56x56x24 residual) split across threads.
    crate::par::for_slices(crate::arena::threads(), &mut out, |off, part| {
        let n = part.len();
        if qconv::qdq_add(&p, &ab[off..off + n], &bb[off..off + n], part) {
            Ok(())
        } else {
            Err(Error::arg(format!("{QDQ_ADD}: operand sizes")))
        }
    })?;
    Ok(vec![crate::arena::bytes_tensor(
        dt,
        a.shape().to_vec(),
        out,
    )?])
}

/// 8-bit `[a, b, c, d]` bytes permuted by `perm` (a 4-d transpose of one-byte elements).
fn permute4(t: &Tensor, perm: [usize; 4]) -> Result<Tensor> {
    let s = t.shape();
    if s.len() != 4 || t.dtype().size() != 1 {
        return Err(Error::arg(format!(
            "{QCONV_NHWC}: expected a 4-d 8-bit tensor, got {:?} {}",
            s,
            t.dtype()
        )));
    }
    let src = &t.bytes()[..];
    let os: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let st = [s[1] * s[2] * s[3], s[2] * s[3], s[3], 1];
    let ps: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let mut out = Vec::with_capacity(src.len());
    for a in 0..os[0] {
        for b in 0..os[1] {
            for c in 0..os[2] {
                let base = a * ps[0] + b * ps[1] + c * ps[2];
                out.extend((0..os[3]).map(|d| src[base + d * ps[3]]));
            }
        }
    }
    Tensor::from_vec_dtype(t.dtype(), os, out)
}

/// The reference semantics: `QLinearConv` on the NCHW view of `x` (`x` itself with
/// [`INPUT_NCHW`]), the result in NHWC.
pub fn qconv_nhwc(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    if ctx.i(GEMM_2D, 0) != 0 {
        // [M, K] as M images of one pixel, and the result back to [M, N].
        let x = input(ins, 0)?;
        let &[m, k] = x.shape() else {
            return Err(Error::arg(format!(
                "{QCONV_NHWC} ({GEMM_2D}): input has shape {:?}, expected [M, K]",
                x.shape()
            )));
        };
        let x4 = x.reshape(vec![m, 1, 1, k])?;
        let mut v: Vec<Option<&Tensor>> = ins.to_vec();
        v[0] = Some(&x4);
        let ctx4 = OpCtx {
            node: &without_gemm_2d(ctx.node),
            ..*ctx
        };
        let y = qconv_nhwc(&ctx4, &v)?;
        let n = y[0].len() / m.max(1);
        return Ok(vec![y[0].reshape(vec![m, n])?]);
    }
    let y = if ctx.i(INPUT_NCHW, 0) != 0 {
        crate::ops::quant::qlinear_conv(ctx, ins)?
    } else {
        let x = permute4(input(ins, 0)?, [0, 3, 1, 2])?;
        let mut v: Vec<Option<&Tensor>> = ins.to_vec();
        v[0] = Some(&x);
        crate::ops::quant::qlinear_conv(ctx, &v)?
    };
    Ok(vec![permute4(&y[0], [0, 2, 3, 1])?])
}

/// `node` without its [`GEMM_2D`] attribute.
fn without_gemm_2d(node: &edgehal_core::Node) -> edgehal_core::Node {
    let mut n = node.clone();
    n.attrs.remove(GEMM_2D);
    n
}

fn ints(t: &Tensor) -> Option<Vec<i32>> {
    Some(match t.dtype() {
        DType::I8 => t.to_vec::<i8>().ok()?.into_iter().map(i32::from).collect(),
        DType::U8 => t.to_vec::<u8>().ok()?.into_iter().map(i32::from).collect(),
        DType::I32 => t.to_vec::<i32>().ok()?,
        _ => return None,
    })
}

fn f32s(t: &Tensor) -> Option<Vec<f32>> {
    (t.dtype() == DType::F32).then(|| t.to_f32().into_owned())
}

enum Kind {
    /// Group 1: weights `k x m` with depth order `[kh][kw][c]`; for KxK layers that can read
    /// the image in place ([`qconv::ConvRows`]), the weights laid out for it too.
    Gemm(PackedB, Option<PackedB>),
    /// Depthwise (group = channels = outputs): `[kh][kw][c]` weights minus their zero points,
    /// and for 3x3 layers the x86 VNNI kernel's layout where it applies.
    Depthwise(Vec<i32>, Option<DwPack>),
}

/// One prepared NHWC quantized convolution (see the module doc).
pub struct QdqConvPlan {
    kind: Kind,
    x_dtype: DType,
    xz: i32,
    /// Input channels, output channels.
    c: usize,
    m: usize,
    kh: usize,
    kw: usize,
    /// Strides, dilations, pads (top, left, bottom, right).
    s: [usize; 2],
    d: [usize; 2],
    p: [usize; 4],
    bias: Vec<i32>,
    rq: Requant,
    out_dtype: DType,
    /// `x` is NCHW ([`INPUT_NCHW`]).
    nchw_in: bool,
    /// `x` is `[M, K]`, the result `[M, N]` ([`GEMM_2D`]).
    gemm_2d: bool,
}

impl QdqConvPlan {
    /// A plan for a [`QCONV_NHWC`] node with constant weights, scales, zero points and bias,
    /// 2-d, group 1 or depthwise. `None` for anything else (the op function runs).
    pub fn prepare(graph: &Graph, node: &Node) -> Option<QdqConvPlan> {
        if node.domain != FUSED_DOMAIN || node.op != QCONV_NHWC || !enabled() {
            return None;
        }
        let k = |i: usize| crate::exec::const_input(graph, node, i);
        let x = node.inputs.first().copied().flatten()?;
        let x_dtype = graph.values.get(x)?.dtype?;
        let xs = f32s(k(1)??)?;
        let xz = match k(2)? {
            Some(t) => ints(t)?,
            None => vec![0],
        };
        let w = k(3)??;
        let ws = f32s(k(4)??)?;
        let wz = match k(5)? {
            Some(t) => ints(t)?,
            None => vec![0],
        };
        let ys = f32s(k(6)??)?;
        let y_zp = k(7)?;
        let yz = match y_zp {
            Some(t) => ints(t)?,
            None => vec![0],
        };
        let b = k(8)?;
        if !matches!(x_dtype, DType::U8 | DType::I8)
            || !matches!(w.dtype(), DType::U8 | DType::I8)
            || xs.len() != 1
            || ys.len() != 1
            || xz.len() != 1
            || yz.len() != 1
        {
            return None;
        }
        let &[m, cg, kh, kw] = w.shape() else {
            return None;
        };
        let group = node.attr_i("group").unwrap_or(1).max(1) as usize;
        if ws.len() != 1 && ws.len() != m || wz.len() != 1 && wz.len() != m {
            return None;
        }
        if let Some(ks) = node.attr_ints("kernel_shape") {
            if ks != [kh as i64, kw as i64] {
                return None;
            }
        }
        let auto = node.attr_s("auto_pad");
        if auto.as_deref().is_some_and(|a| a != "NOTSET") {
            return None;
        }
        let two = |name: &str| -> Option<[usize; 2]> {
            match node.attr_ints(name) {
                None => Some([1, 1]),
                Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 1) => {
                    Some([v[0] as usize, v[1] as usize])
                }
                _ => None,
            }
        };
        let (s, d) = (two("strides")?, two("dilations")?);
        let p = match node.attr_ints("pads") {
            None => [0; 4],
            Some(v) if v.len() == 4 && v.iter().all(|&x| x >= 0) => {
                [v[0] as usize, v[1] as usize, v[2] as usize, v[3] as usize]
            }
            _ => return None,
        };
        let out_dtype = y_zp.map_or(x_dtype, |t| t.dtype());
        let (lo, hi) = match out_dtype {
            DType::U8 => (0, 255),
            DType::I8 => (-128, 127),
            _ => return None,
        };
        // The multiplier in f32 as the reference computes it: (x_scale * w_scale) / y_scale.
        let scales: Vec<f32> = (0..m)
            .map(|o| xs[0] * ws[if ws.len() == 1 { 0 } else { o }] / ys[0])
            .collect();
        let rq = Requant::new_float(&scales, yz[0], lo, hi)?;
        let bias = match b {
            Some(t) if t.dtype() == DType::I32 && t.len() == m => t.to_vec::<i32>().ok()?,
            Some(_) => return None,
            None => vec![0; m],
        };
        let wv = ints(w)?;
        let taps = kh * kw;
        let (c, kind) = if group == 1 {
            let c = cg;
            let kd = taps * c;
            // [m][c][ky][kx] -> [m][ky][kx][c], as the canonical signedness of w.
            let mut wt = vec![0u8; m * kd];
            for o in 0..m {
                for ci in 0..c {
                    for t in 0..taps {
                        wt[o * kd + t * c + ci] = wv[(o * c + ci) * taps + t] as u8;
                    }
                }
            }
            let wm = match w.dtype() {
                DType::I8 => QMat::i8(bytemuck::cast_slice(&wt), m, kd),
                _ => QMat::u8(&wt, m, kd),
            };
            let in_place = taps > 1
                && d[1] == 1
                && w.dtype() == DType::I8
                && wz.iter().all(|&z| z == 0)
                && qconv::conv_rows_supported();
            let rows = in_place
                .then(|| {
                    let wr = qconv::conv_rows_weights(&wt, m, kh, kw * c);
                    let kr = wr.len() / m.max(1);
                    PackedB::new(QMat::i8(bytemuck::cast_slice(&wr), m, kr).t(), &wz)
                })
                .flatten();
            (c, Kind::Gemm(PackedB::new(wm.t(), &wz)?, rows))
        } else if group == m && cg == 1 {
            let mut wd = vec![0i32; taps * m];
            for o in 0..m {
                let z = wz[if wz.len() == 1 { 0 } else { o }];
                for t in 0..taps {
                    wd[t * m + o] = wv[o * taps + t] - z;
                }
            }
            let rq = rq.widen(m);
            let pack = ((kh, kw) == (3, 3))
                .then(|| DwPack::new(&wd, &bias, xz[0], x_dtype == DType::I8, &rq, m))
                .flatten();
            (m, Kind::Depthwise(wd, pack))
        } else {
            return None;
        };
        Some(QdqConvPlan {
            kind,
            x_dtype,
            xz: xz[0],
            c,
            m,
            kh,
            kw,
            s,
            d,
            p,
            bias,
            rq: rq.widen(m),
            out_dtype,
            nchw_in: node.attr_i(INPUT_NCHW).unwrap_or(0) != 0,
            gemm_2d: node.attr_i(GEMM_2D).unwrap_or(0) != 0,
        })
    }

    /// Runs the layer on `threads` threads; inputs the plan was not built for go to the op
    /// function.
    pub fn run(
        &self,
        ctx: &OpCtx<'_>,
        ins: &[Option<&Tensor>],
        threads: usize,
    ) -> Result<Vec<Tensor>> {
        let x = input(ins, 0)?;
        let (n, ih, iw, c) = match (x.shape(), self.nchw_in, self.gemm_2d) {
            (&[n, h, w, c], false, false) => (n, h, w, c),
            (&[n, c, h, w], true, false) => (n, h, w, c),
            // A Gemm's rows as the pixels of one M x 1 image.
            (&[m, k], false, true) => (1, m, 1, k),
            _ => return qconv_nhwc(ctx, ins),
        };
        if x.dtype() != self.x_dtype || c != self.c {
            return qconv_nhwc(ctx, ins);
        }
        if self.nchw_in && !matches!(self.kind, Kind::Gemm(..)) {
            return qconv_nhwc(ctx, ins);
        }
        let (kh, kw, m) = (self.kh, self.kw, self.m);
        let span = |k: usize, d: usize| (k - 1) * d + 1;
        let (eh, ew) = (ih + self.p[0] + self.p[2], iw + self.p[1] + self.p[3]);
        if eh < span(kh, self.d[0]) || ew < span(kw, self.d[1]) {
            return qconv_nhwc(ctx, ins);
        }
        let oh = (eh - span(kh, self.d[0])) / self.s[0] + 1;
        let ow = (ew - span(kw, self.d[1])) / self.s[1] + 1;
        let xb: &[u8] = &x.bytes()[..];
        let signed = self.x_dtype == DType::I8;
        let img = ih * iw * c;
        let orow = oh * ow * m;
        let mut out = crate::arena::take_bytes(n * orow);
        for (b, o) in out.chunks_exact_mut(orow.max(1)).enumerate() {
            let xi = &xb[b * img..(b + 1) * img];
            match &self.kind {
                Kind::Gemm(pb, rows) => {
                    let pointwise =
                        kh == 1 && kw == 1 && self.s == [1, 1] && self.p == [0; 4] && !self.nchw_in;
                    if pointwise {
                        self.gemm(xi, signed, oh * ow, c, pb, o, threads)?;
                    } else if let Some(pr) = rows {
                        let geo = Geo {
                            n: 1,
                            ih,
                            iw,
                            ic: c,
                            oh,
                            ow,
                            kh,
                            kw,
                            sh: self.s[0],
                            sw: self.s[1],
                            dh: self.d[0],
                            dw: self.d[1],
                            pt: self.p[0],
                            pl: self.p[1],
                        };
                        let img = if self.nchw_in {
                            InPlaceImage::Nchw(xi)
                        } else {
                            InPlaceImage::Nhwc(xi)
                        };
                        self.op(pr).run_in_place(&geo, img, signed, o, threads)?;
                    } else {
                        self.gemm_im2col(xi, signed, [ih, iw, ow], oh * ow, pb, o, threads)?;
                    }
                }
                Kind::Depthwise(w, pack) => {
                    let p = Depthwise {
                        x: xi,
                        signed,
                        xz: self.xz,
                        ih,
                        iw,
                        c,
                        oh,
                        ow,
                        kh,
                        kw,
                        sh: self.s[0],
                        sw: self.s[1],
                        dh: self.d[0],
                        dw: self.d[1],
                        pt: self.p[0],
                        pl: self.p[1],
                        w,
                        bias: &self.bias,
                        rq: &self.rq,
                        pack: pack.as_ref(),
                    };
                    run_depthwise(&p, threads, o)?;
                }
            }
        }
        let shape = if self.gemm_2d {
            vec![oh * ow, m]
        } else {
            vec![n, oh, ow, m]
        };
        Ok(vec![crate::arena::bytes_tensor(
            self.out_dtype,
            shape,
            out,
        )?])
    }

    /// Patches (`kh*kw*c` bytes each, `[ky][kx][c]` order, rows `rs` apart) of output pixels
    /// `rows` of one image into `dst`; taps in the padding are not written (`dst` holds the
    /// zero point's byte already). NHWC: one copy per tap, one per kernel row when its taps
    /// are in bounds and adjacent; NCHW: gathered per channel.
    fn im2col(
        &self,
        x: &[u8],
        [ih, iw, ow]: [usize; 3],
        rows: Range<usize>,
        rs: usize,
        dst: &mut [u8],
    ) {
        let (kh, kw, c) = (self.kh, self.kw, self.c);
        if rs == 0 {
            return;
        }
        let plane = ih * iw;
        for (r, d) in rows.zip(dst.chunks_exact_mut(rs)) {
            let (oy, ox) = (r / ow, r % ow);
            for ky in 0..kh {
                let Some(iy) = (oy * self.s[0] + ky * self.d[0])
                    .checked_sub(self.p[0])
                    .filter(|&v| v < ih)
                else {
                    continue;
                };
                let x0 = ox * self.s[1];
                let whole = self.d[1] == 1 && x0 >= self.p[1] && x0 - self.p[1] + kw <= iw;
                if whole && !self.nchw_in {
                    let src = (iy * iw + x0 - self.p[1]) * c;
                    d[ky * kw * c..][..kw * c].copy_from_slice(&x[src..][..kw * c]);
                    continue;
                }
                for kx in 0..kw {
                    let Some(ix) = (x0 + kx * self.d[1])
                        .checked_sub(self.p[1])
                        .filter(|&v| v < iw)
                    else {
                        continue;
                    };
                    let o = &mut d[(ky * kw + kx) * c..][..c];
                    if self.nchw_in {
                        let src = iy * iw + ix;
                        for (ci, v) in o.iter_mut().enumerate() {
                            *v = x[ci * plane + src];
                        }
                    } else {
                        o.copy_from_slice(&x[(iy * iw + ix) * c..][..c]);
                    }
                }
            }
        }
    }

    /// The GEMM on im2col patches, built inside each thread's part
    /// ([`crate::qconv_plan::QGemmOp::run_patches`]).
    #[allow(clippy::too_many_arguments)]
    fn gemm_im2col(
        &self,
        x: &[u8],
        signed: bool,
        geo: [usize; 3],
        rows: usize,
        packed: &PackedB,
        out: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        self.op(packed)
            .run_patches(rows, signed, out, threads, |r, rs, buf| {
                self.im2col(x, geo, r, rs, buf)
            })
    }

    /// `out (rows x m) = requant(a (rows x k) * W + bias)`, rows split across threads.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: &[u8],
        signed: bool,
        rows: usize,
        k: usize,
        packed: &PackedB,
        out: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        self.op(packed).run(a, signed, rows, k, out, threads)
    }

    /// The fused GEMM with this plan's bias and requantization over `packed`.
    fn op<'a>(&'a self, packed: &'a PackedB) -> crate::qconv_plan::QGemmOp<'a> {
        crate::qconv_plan::QGemmOp {
            xz: self.xz,
            packed,
            bias: &self.bias,
            rq: &self.rq,
            n: self.m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgehal_core::graph::ValueInfo;
    use edgehal_core::Attr;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    struct Case {
        /// NHWC input, weight shape, group, strides, pads, dilations.
        x: [usize; 4],
        w: [usize; 4],
        group: i64,
        s: [i64; 2],
        p: [i64; 4],
        d: [i64; 2],
    }

    /// A graph with one fused node: x (NHWC, `x_dt`), constant scales, zero points, w, b.
    fn layer(c: &Case, x_dt: DType, w_dt: DType, y_dt: DType, r: &mut Rng) -> (Graph, Node) {
        let m = c.w[0];
        let mut g = Graph::new("qdq");
        let x = g.value_id("x");
        g.values[x] = ValueInfo {
            name: "x".into(),
            dtype: Some(x_dt),
            shape: None,
        };
        g.inputs = vec![x];
        let init = |g: &mut Graph, name: &str, t: Tensor| {
            let id = g.value_id(name);
            g.initializers.insert(id, t);
            Some(id)
        };
        let zp = |dt: DType, r: &mut Rng| -> Tensor {
            match dt {
                DType::U8 => Tensor::from_vec(vec![], vec![100 + (r.next() % 60) as u8]),
                _ => Tensor::from_vec(vec![], vec![(r.next() % 40) as i8 - 20]),
            }
            .unwrap()
        };
        let xs = init(
            &mut g,
            "xs",
            Tensor::from_vec(vec![], vec![0.02f32]).unwrap(),
        );
        let xz = init(&mut g, "xz", zp(x_dt, r));
        let wn: usize = c.w.iter().product();
        let w = Tensor::from_vec_dtype(w_dt, c.w.to_vec(), r.bytes(wn)).unwrap();
        let w = init(&mut g, "w", w);
        let ws: Vec<f32> = (0..m)
            .map(|_| 0.001 + (r.next() % 1000) as f32 * 1e-5)
            .collect();
        let ws = init(&mut g, "ws", Tensor::from_vec(vec![m], ws).unwrap());
        let wz = match w_dt {
            DType::U8 => {
                let z: Vec<u8> = (0..m).map(|_| 110 + (r.next() % 30) as u8).collect();
                Tensor::from_vec(vec![m], z).unwrap()
            }
            _ => Tensor::from_vec(vec![m], vec![0i8; m]).unwrap(),
        };
        let wz = init(&mut g, "wz", wz);
        let ys = init(
            &mut g,
            "ys",
            Tensor::from_vec(vec![], vec![0.05f32]).unwrap(),
        );
        let yz = init(&mut g, "yz", zp(y_dt, r));
        let b: Vec<i32> = (0..m).map(|_| (r.next() % 4000) as i32 - 2000).collect();
        let b = init(&mut g, "b", Tensor::from_vec(vec![m], b).unwrap());
        let y = g.value_id("y");
        g.outputs = vec![y];
        let mut node = Node {
            op: QCONV_NHWC.into(),
            domain: FUSED_DOMAIN.into(),
            inputs: vec![Some(x), xs, xz, w, ws, wz, ys, yz, b],
            outputs: vec![Some(y)],
            ..Default::default()
        };
        let a = &mut node.attrs;
        a.insert("group".into(), Attr::Int(c.group));
        a.insert("strides".into(), Attr::Ints(c.s.to_vec()));
        a.insert("pads".into(), Attr::Ints(c.p.to_vec()));
        a.insert("dilations".into(), Attr::Ints(c.d.to_vec()));
        a.insert(
            "kernel_shape".into(),
            Attr::Ints(vec![c.w[2] as i64, c.w[3] as i64]),
        );
        g.nodes.push(node.clone());
        (g, node)
    }

    /// The plan gives the reference QLinearConv's bytes (op function) at 1 and 3 threads, on
    /// whatever kernel variants this process dispatches to (run the tests under
    /// `EDGEHAL_CPU_FEATURES=-avx512`, `none`, ... for the others).
    #[test]
    fn plans_match_the_reference_qlinear_conv() {
        let mut r = Rng(7);
        let case = |x, w, group, s, p, d| Case {
            x,
            w,
            group,
            s,
            p,
            d,
        };
        let cases = [
            // 1x1, the expand / project layers.
            case([1, 9, 11, 24], [40, 24, 1, 1], 1, [1, 1], [0; 4], [1, 1]),
            case([2, 20, 20, 16], [96, 16, 1, 1], 1, [1, 1], [0; 4], [1, 1]),
            // 1x1 stride 2 (im2col path).
            case([1, 9, 8, 8], [12, 8, 1, 1], 1, [2, 2], [0; 4], [1, 1]),
            // 3x3 stride 2 pad 1 on 3 channels (the stem), stride 1, asymmetric pads.
            case(
                [1, 17, 15, 3],
                [32, 3, 3, 3],
                1,
                [2, 2],
                [1, 1, 1, 1],
                [1, 1],
            ),
            case(
                [1, 10, 12, 8],
                [16, 8, 3, 3],
                1,
                [1, 1],
                [1, 1, 1, 1],
                [1, 1],
            ),
            case([2, 9, 9, 5], [7, 5, 3, 2], 1, [1, 2], [0, 1, 2, 0], [2, 1]),
            // depthwise 3x3 stride 1 / 2, odd channel counts, dilation.
            case(
                [1, 21, 19, 48],
                [48, 1, 3, 3],
                48,
                [1, 1],
                [1, 1, 1, 1],
                [1, 1],
            ),
            case(
                [1, 30, 28, 72],
                [72, 1, 3, 3],
                72,
                [2, 2],
                [1, 1, 1, 1],
                [1, 1],
            ),
            case(
                [2, 11, 13, 37],
                [37, 1, 3, 3],
                37,
                [2, 1],
                [0, 1, 1, 0],
                [1, 2],
            ),
        ];
        for c in &cases {
            for (x_dt, w_dt, y_dt) in [
                (DType::U8, DType::I8, DType::U8),
                (DType::I8, DType::I8, DType::I8),
                (DType::U8, DType::U8, DType::I8),
            ] {
                for nchw in [false, true] {
                    if nchw && c.group != 1 {
                        continue;
                    }
                    let (mut g, mut node) = layer(c, x_dt, w_dt, y_dt, &mut r);
                    let xs = if nchw {
                        node.attrs.insert(INPUT_NCHW.into(), Attr::Int(1));
                        g.nodes[0] = node.clone();
                        vec![c.x[0], c.x[3], c.x[1], c.x[2]]
                    } else {
                        c.x.to_vec()
                    };
                    let plan = QdqConvPlan::prepare(&g, &node).expect("a plan");
                    let xn: usize = c.x.iter().product();
                    let x = Tensor::from_vec_dtype(x_dt, xs, r.bytes(xn)).unwrap();
                    let ctx = OpCtx {
                        node: &node,
                        opset: 1,
                        subgraph: None,
                        dest: None,
                    };
                    let init = |k: usize| node.inputs[k].and_then(|v| g.initializers.get(&v));
                    let mut ins: Vec<Option<&Tensor>> = vec![Some(&x)];
                    ins.extend((1..9).map(init));
                    let want = qconv_nhwc(&ctx, &ins).unwrap();
                    for threads in [1, 3] {
                        let got = plan.run(&ctx, &ins, threads).unwrap();
                        assert_eq!(got[0].shape(), want[0].shape());
                        assert_eq!(got[0].dtype(), want[0].dtype());
                        assert_eq!(
                            &got[0].bytes()[..],
                            &want[0].bytes()[..],
                            "{:?} {:?} {x_dt} {w_dt} {y_dt} nchw {nchw} threads {threads}",
                            c.x,
                            c.w
                        );
                    }
                }
            }
        }
    }
}
