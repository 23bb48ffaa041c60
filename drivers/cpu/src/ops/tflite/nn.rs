//! NHWC convolution, depthwise convolution, transposed convolution, fully connected, pooling
//! and batch matmul, float and quantized.

use edgehal_core::{DType, Error, Quant, Result, Tensor};
use edgehal_kernels::gemm::{sgemm, MatRef};
use edgehal_kernels::qconv::requant_float_ref;
use edgehal_kernels::qgemm::{self as qk, PackedB, QMat};
use std::borrow::Cow;

use super::qmath::{act_range_q, Multiplier};
use super::{
    act, act_f32, f32_out, float_in, is_quant, out_dtype, q_from_i32, q_to_i32, qparams, quant_of,
    DOMAIN,
};
use crate::ops::quant::{int8_simd, zp_in, Q8Elem, Q8};
use crate::ops::{input, opt_input, OpCtx, Registry};

pub fn register(r: &mut Registry) {
    r.add_domain(DOMAIN, "Conv2D", conv2d);
    r.add_domain(DOMAIN, "DepthwiseConv2D", depthwise);
    r.add_domain(DOMAIN, "TransposeConv", transpose_conv);
    r.add_domain(DOMAIN, "FullyConnected", fully_connected);
    r.add_domain(DOMAIN, "MaxPool2D", max_pool);
    r.add_domain(DOMAIN, "AveragePool2D", avg_pool);
    r.add_domain(DOMAIN, "BatchMatMul", batch_matmul);
    r.add_domain(DOMAIN, "UnidirectionalSequenceLstm", lstm);
}

/// Output size and leading padding of one spatial axis (TFLite's `ComputePaddingHeightWidth`).
fn out_and_pad(
    padding: &str,
    inp: usize,
    k: usize,
    stride: usize,
    dil: usize,
) -> Result<(usize, usize)> {
    if stride == 0 || dil == 0 || k == 0 {
        return Err(Error::arg(format!(
            "bad stride {stride}, dilation {dil} or kernel {k}"
        )));
    }
    let eff = (k - 1) * dil + 1;
    let out = match padding {
        "SAME" => inp.div_ceil(stride),
        "VALID" => {
            if inp < eff {
                0
            } else {
                (inp - eff) / stride + 1
            }
        }
        p => return Err(Error::arg(format!("unknown padding {p}"))),
    };
    let total = ((out.saturating_sub(1)) * stride + eff).saturating_sub(inp);
    Ok((out, total / 2))
}

pub(crate) fn dims4(t: &Tensor, what: &str) -> Result<[usize; 4]> {
    match t.shape() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        s => Err(Error::arg(format!(
            "{what} has shape {s:?}, expected 4 dims"
        ))),
    }
}

/// Spatial geometry shared by convolutions and pools.
pub(crate) struct Geo {
    pub n: usize,
    pub ih: usize,
    pub iw: usize,
    pub ic: usize,
    pub oh: usize,
    pub ow: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub pt: usize,
    pub pl: usize,
}

impl Geo {
    pub(crate) fn new(ctx: &OpCtx<'_>, x: [usize; 4], kh: usize, kw: usize) -> Result<Geo> {
        let pad = ctx.s("padding", "VALID");
        let sh = ctx.i("stride_h", 1).max(0) as usize;
        let sw = ctx.i("stride_w", 1).max(0) as usize;
        let dh = ctx.i("dilation_h_factor", 1).max(0) as usize;
        let dw = ctx.i("dilation_w_factor", 1).max(0) as usize;
        let (oh, pt) = out_and_pad(&pad, x[1], kh, sh, dh)?;
        let (ow, pl) = out_and_pad(&pad, x[2], kw, sw, dw)?;
        Ok(Geo {
            n: x[0],
            ih: x[1],
            iw: x[2],
            ic: x[3],
            oh,
            ow,
            kh,
            kw,
            sh,
            sw,
            dh,
            dw,
            pt,
            pl,
        })
    }
    /// Input row/column of a tap, None when it falls in the padding.
    #[inline]
    fn iy(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.sh + ky * self.dh)
            .checked_sub(self.pt)
            .filter(|&v| v < self.ih)
    }
    #[inline]
    fn ix(&self, ox: usize, kx: usize) -> Option<usize> {
        (ox * self.sw + kx * self.dw)
            .checked_sub(self.pl)
            .filter(|&v| v < self.iw)
    }
    /// im2col of image `b`: rows are output pixels, columns `(ky, kx, c)`; `fill` in padding.
    pub(crate) fn im2col<T: Copy>(&self, x: &[T], b: usize, fill: T) -> Vec<T> {
        let cols = self.kh * self.kw * self.ic;
        // Spare capacity for a caller's few bytes of slack after the last row (see
        // qconv_plan: the VNNI tile reads depths rounded up to 4).
        let len = self.oh * self.ow * cols;
        let mut p = Vec::with_capacity(len + 4);
        p.resize(len, fill);
        let img = &x[b * self.ih * self.iw * self.ic..(b + 1) * self.ih * self.iw * self.ic];
        let ic = self.ic;
        for oy in 0..self.oh {
            for ky in 0..self.kh {
                let Some(iy) = self.iy(oy, ky) else { continue };
                for kx in 0..self.kw {
                    // Output columns whose tap kx falls inside the row:
                    // pl <= ox * sw + off < iw + pl.
                    let off = kx * self.dw;
                    let lo = self.pl.saturating_sub(off).div_ceil(self.sw);
                    let hi = if self.iw + self.pl > off {
                        ((self.iw + self.pl - off - 1) / self.sw + 1).min(self.ow)
                    } else {
                        0
                    };
                    if lo >= hi {
                        continue;
                    }
                    let dst = (ky * self.kw + kx) * ic;
                    let ix0 = lo * self.sw + off - self.pl;
                    if ic == 1 {
                        // A gray input: one element per tap, strided on both sides.
                        let n = hi - lo;
                        let d0 = (oy * self.ow + lo) * cols + dst;
                        let s0 = iy * self.iw + ix0;
                        let d = p[d0..d0 + (n - 1) * cols + 1].iter_mut().step_by(cols);
                        let s = img[s0..s0 + (n - 1) * self.sw + 1].iter().step_by(self.sw);
                        d.zip(s).for_each(|(d, s)| *d = *s);
                        continue;
                    }
                    // Destination rows `cols` apart, source pixels `sw * ic` apart.
                    let dsts = p[(oy * self.ow + lo) * cols + dst..].chunks_mut(cols);
                    let srcs = img[(iy * self.iw + ix0) * ic..].chunks(self.sw * ic);
                    if ic < 8 {
                        // A few channels (RGB): no memcpy call per tap.
                        for (d, s) in dsts.zip(srcs).take(hi - lo) {
                            d.iter_mut().zip(&s[..ic]).for_each(|(d, s)| *d = *s);
                        }
                    } else {
                        for (d, s) in dsts.zip(srcs).take(hi - lo) {
                            copy_short(&mut d[..ic], &s[..ic]);
                        }
                    }
                }
            }
        }
        p
    }
    /// im2col of output pixels `pixels` of one image `img` (`ih x iw x ic`) into `buf`, row `p`
    /// at `buf[(p - pixels.start) * rs..]`: only the taps inside the image are written, so
    /// `buf` must hold `fill` (the zero point) wherever padding or the row's slack past
    /// `kh * kw * ic` is to be read.
    pub(crate) fn im2col_rows<T: Copy>(
        &self,
        img: &[T],
        pixels: std::ops::Range<usize>,
        rs: usize,
        buf: &mut [T],
    ) {
        let ic = self.ic;
        if self.ow == 0 || ic == 0 || rs == 0 {
            return;
        }
        let (mut oy, mut ox) = (pixels.start / self.ow, pixels.start % self.ow);
        // Taps of one kernel row are adjacent pixels (kw * ic bytes in a row) when the
        // dilation is 1 and they all fall inside the image.
        let run = self.kw * ic;
        for row in buf.chunks_mut(rs).take(pixels.len()) {
            let ix0 = (ox * self.sw).checked_sub(self.pl);
            let whole = self.dw == 1 && ix0.is_some_and(|x| x + self.kw <= self.iw);
            for ky in 0..self.kh {
                let Some(iy) = self.iy(oy, ky) else { continue };
                if let (true, Some(ix0)) = (whole, ix0) {
                    let src = &img[(iy * self.iw + ix0) * ic..][..run];
                    copy_short(&mut row[ky * run..][..run], src);
                    continue;
                }
                for kx in 0..self.kw {
                    let Some(ix) = self.ix(ox, kx) else { continue };
                    let src = &img[(iy * self.iw + ix) * ic..][..ic];
                    copy_short(&mut row[(ky * self.kw + kx) * ic..][..ic], src);
                }
            }
            ox += 1;
            if ox == self.ow {
                ox = 0;
                oy += 1;
            }
        }
    }
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.pt == 0 && self.pl == 0
    }
}

/// `d.copy_from_slice(s)` for the few dozen elements of one im2col tap, as fixed-size moves
/// of 16, 8, 4 and 1 elements: `copy_from_slice` of a run-time length is a `memmove` call,
/// which was 9% of person_detect (8 and 16 channels per tap) on top of the im2col loop.
#[inline(always)]
fn copy_short<T: Copy>(d: &mut [T], s: &[T]) {
    let mut d = d.chunks_exact_mut(16);
    let mut s = s.chunks_exact(16);
    for (d, s) in d.by_ref().zip(s.by_ref()) {
        let s: &[T; 16] = s.try_into().expect("16");
        let d: &mut [T; 16] = d.try_into().expect("16");
        *d = *s;
    }
    let (d, s) = (d.into_remainder(), s.remainder());
    let mut i = 0;
    if d.len() - i >= 8 {
        let sv: &[T; 8] = s[i..i + 8].try_into().expect("8");
        let dv: &mut [T; 8] = (&mut d[i..i + 8]).try_into().expect("8");
        *dv = *sv;
        i += 8;
    }
    if d.len() - i >= 4 {
        let sv: &[T; 4] = s[i..i + 4].try_into().expect("4");
        let dv: &mut [T; 4] = (&mut d[i..i + 4]).try_into().expect("4");
        *dv = *sv;
        i += 4;
    }
    for (d, s) in d[i..].iter_mut().zip(&s[i..]) {
        *d = *s;
    }
}

/// Per-output-channel requantization of an integer convolution / fully connected layer.
pub(crate) struct Requant {
    pub mult: Vec<Multiplier>,
    /// `input scale * weight scale / output scale` in f32, in that order (XNNPACK's
    /// requantization scale), used when `rounding` is [`Rounding::Float`].
    pub fscale: Vec<f32>,
    pub rounding: Rounding,
    pub out_zp: i32,
    pub lo: i32,
    pub hi: i32,
    pub dtype: DType,
    pub quant: Quant,
}

impl Requant {
    fn new(ctx: &OpCtx<'_>, x: &Tensor, w: &Tensor, channels: usize) -> Result<Requant> {
        Self::with_input(ctx, Some(x), x.dtype(), w, channels)
    }
    /// From the node's attributes (`x` is the fallback for the input's parameters).
    pub(crate) fn with_input(
        ctx: &OpCtx<'_>,
        x: Option<&Tensor>,
        x_dtype: DType,
        w: &Tensor,
        channels: usize,
    ) -> Result<Requant> {
        let (xs, _) = qparams(ctx, "in0", x)?;
        let wq = quant_of(ctx, "in1", Some(w))
            .ok_or_else(|| Error::arg("quantized weights without scale"))?;
        let out_t = out_dtype(ctx, 0, x_dtype);
        let (os, oz) = qparams(ctx, "out0", None)?;
        if wq.scale.len() != 1 && wq.scale.len() != channels {
            return Err(Error::arg(format!(
                "weights have {} scales for {channels} output channels",
                wq.scale.len()
            )));
        }
        let wscale = |c: usize| {
            if wq.scale.len() == 1 {
                wq.scale[0]
            } else {
                wq.scale[c]
            }
        };
        let mult = (0..channels)
            .map(|c| Multiplier::new(xs as f64 * wscale(c) as f64 / os as f64))
            .collect();
        let fscale = (0..channels).map(|c| xs * wscale(c) / os).collect();
        let (lo, hi) = act_range_q(&act(ctx), os, oz, out_t);
        Ok(Requant {
            mult,
            fscale,
            rounding: Rounding::of(ctx.node)?,
            out_zp: oz,
            lo,
            hi,
            dtype: out_t,
            quant: Quant::per_tensor(os, oz),
        })
    }
    #[inline]
    fn apply(&self, acc: i32, c: usize) -> i32 {
        match self.rounding {
            Rounding::Reference => (self.mult[c].apply(acc) + self.out_zp).clamp(self.lo, self.hi),
            Rounding::Float => {
                requant_float_ref(acc, self.fscale[c], self.out_zp, self.lo, self.hi)
            }
        }
    }
}

/// How quantized Conv2D / DepthwiseConv2D / FullyConnected / TransposeConv outputs are
/// requantized from their i32 accumulators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// `round_half_even(f32(acc) * f32(input scale * weight scale / output scale)) + zero
    /// point`: what LiteRT runs by default (its XNNPACK delegate), within one step of the
    /// reference kernels, and about a quarter faster on int8 MobileNet-v2 than the fixed point.
    Float,
    /// TFLite's reference kernels: the gemmlowp fixed-point multiplier with a rounding shift
    /// (`MultiplyByQuantizedMultiplier`), bit-exact with LiteRT's `BUILTIN_REF` resolver.
    Reference,
}

/// Node attribute naming a node's [`Rounding`] (`"float"` or `"reference"`); without it,
/// `EDGEHAL_INT8_ROUNDING` decides, else [`Rounding::Float`].
pub const ROUNDING_ATTR: &str = "edgehal_rounding";

impl Rounding {
    fn parse(s: &str) -> Option<Rounding> {
        match s {
            "float" => Some(Rounding::Float),
            "reference" => Some(Rounding::Reference),
            _ => None,
        }
    }

    /// The rounding of `node`: its [`ROUNDING_ATTR`], else the environment's default.
    pub fn of(node: &edgehal_core::Node) -> Result<Rounding> {
        match node.attr_s(ROUNDING_ATTR) {
            Some(v) => Rounding::parse(&v).ok_or_else(|| {
                Error::arg(format!(
                    "{ROUNDING_ATTR} = '{v}': expected 'float' or 'reference'"
                ))
            }),
            None => Ok(Rounding::default_from_env()),
        }
    }

    /// `EDGEHAL_INT8_ROUNDING` (`float` or `reference`), read once; [`Rounding::Float`] when
    /// unset. An unknown value is reported once on stderr and ignored.
    pub fn default_from_env() -> Rounding {
        static MODE: std::sync::OnceLock<Rounding> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("EDGEHAL_INT8_ROUNDING") {
            Ok(v) => Rounding::parse(&v).unwrap_or_else(|| {
                eprintln!(
                    "edgehal: EDGEHAL_INT8_ROUNDING='{v}' is neither 'float' nor 'reference'; \
                     using float"
                );
                Rounding::Float
            }),
            Err(_) => Rounding::Float,
        })
    }
}

/// Weight zero points per output channel (0 for symmetric int8 weights).
pub(crate) fn weight_zps(ctx: &OpCtx<'_>, w: &Tensor, channels: usize) -> Vec<i32> {
    let zp = quant_of(ctx, "in1", Some(w))
        .map(|q| q.zero_point)
        .unwrap_or_default();
    (0..channels)
        .map(|c| zp.get(c).or(zp.first()).copied().unwrap_or(0))
        .collect()
}

pub(crate) fn bias_i32(b: Option<&Tensor>, channels: usize) -> Result<Vec<i32>> {
    match b {
        None => Ok(vec![0; channels]),
        Some(b) => {
            let v = b.to_i64_vec();
            if v.len() != channels {
                return Err(Error::arg(format!(
                    "bias has {} values, expected {channels}",
                    v.len()
                )));
            }
            Ok(v.into_iter()
                .map(|x| x.clamp(i32::MIN as i64, i32::MAX as i64) as i32)
                .collect())
        }
    }
}

fn bias_f32(b: Option<&Tensor>, channels: usize) -> Result<Vec<f32>> {
    match b {
        None => Ok(vec![0.0; channels]),
        Some(b) => {
            let v = float_in(b)?.into_owned();
            if v.len() != channels {
                return Err(Error::arg(format!(
                    "bias has {} values, expected {channels}",
                    v.len()
                )));
            }
            Ok(v)
        }
    }
}

/// Integer dot-product GEMM: `out[r][o] = bias[o] + sum_k a[r][k] * w[o][k]`, requantized.
fn qgemm(
    a: &[i32],
    rows: usize,
    k: usize,
    w: &[i32],
    bias: &[i32],
    rq: &Requant,
    out: &mut Vec<i32>,
) {
    let o_n = bias.len();
    for r in 0..rows {
        let ar = &a[r * k..(r + 1) * k];
        for o in 0..o_n {
            let wr = &w[o * k..(o + 1) * k];
            let mut acc = 0i32;
            for (x, y) in ar.iter().zip(wr) {
                acc = acc.wrapping_add(x * y);
            }
            out.push(rq.apply(acc.wrapping_add(bias[o]), o));
        }
    }
}

/// 8-bit `out[r][o] = requant(bias[o] + sum_k (a[r][k] - xz) * (w[o][k] - wz[o]))` through
/// the int8 GEMM, the weights `[o][k]` packed once per call. `a(b)` gives the `rows x k` rows
/// of image `b` (the image itself for pointwise convolutions and fully connected layers, its
/// im2col otherwise). The same integers as [`qgemm`] (wrapping i32 accumulation).
#[allow(clippy::too_many_arguments)]
fn qgemm_q8<'a, T: Q8Elem + 'a>(
    images: usize,
    rows: usize,
    k: usize,
    xz: i32,
    a: impl Fn(usize) -> Option<Cow<'a, [T]>>,
    w: &Q8<'_>,
    wz: &[i32],
    bias: &[i32],
    rq: &Requant,
) -> Result<Vec<i32>> {
    let o_n = bias.len();
    let bad = || Error::arg("quantized GEMM: operand sizes do not match");
    let pb = w
        .mat(0, o_n, k)
        .and_then(|wm| PackedB::new(wm.t(), wz))
        .ok_or_else(bad)?;
    let mut acc = vec![0i32; rows * o_n];
    let mut out = Vec::with_capacity(images * rows * o_n);
    for b in 0..images {
        let av = a(b).ok_or_else(bad)?;
        let am = QMat {
            data: T::qdata(&av),
            rows,
            cols: k,
            rs: k,
            cs: 1,
        };
        if !qk::qgemm(am, &[xz], &pb, &mut acc, o_n, 1) {
            return Err(bad());
        }
        for r in acc.chunks_exact(o_n.max(1)) {
            for (o, &v) in r.iter().enumerate() {
                out.push(rq.apply(v.wrapping_add(bias[o]), o));
            }
        }
    }
    Ok(out)
}

pub(crate) fn conv2d(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    let b = opt_input(ins, 2);
    let xd = dims4(x, "input")?;
    let [oc, kh, kw, wc] = dims4(w, "filter")?;
    if wc != xd[3] {
        return Err(Error::unsupported(format!(
            "Conv2D: filter has {wc} input channels, input has {} (grouped convolution)",
            xd[3]
        )));
    }
    let g = Geo::new(ctx, xd, kh, kw)?;
    let rows = g.oh * g.ow;
    let k = kh * kw * wc;
    let shape = vec![g.n, g.oh, g.ow, oc];
    if is_quant(x.dtype()) {
        let (_, xz) = qparams(ctx, "in0", Some(x))?;
        let rq = Requant::new(ctx, x, w, oc)?;
        let zp_ok = zp_in(x.dtype(), xz as i64).is_some();
        // Narrow or shallow layers (a few output channels, k < 32) waste most of the SIMD
        // tile; the i32 loop below is faster there (person_detect's first conv: 8 x 9).
        let wide = oc >= 16 && k >= 32;
        if let (Some(xq), Some(wq), true) = (Q8::of(x), Q8::of(w), zp_ok && wide && int8_simd()) {
            let wz = weight_zps(ctx, w, oc);
            let bias = bias_i32(b, oc)?;
            let img = rows * k;
            let pw = g.is_pointwise();
            macro_rules! run {
                ($xv:expr, $fill:expr) => {{
                    let xv = &$xv[..];
                    let a = |n: usize| {
                        if pw {
                            xv.get(n * img..(n + 1) * img).map(Cow::Borrowed)
                        } else {
                            Some(Cow::Owned(g.im2col(xv, n, $fill)))
                        }
                    };
                    qgemm_q8(g.n, rows, k, xz, a, &wq, &wz, &bias, &rq)?
                }};
            }
            let out = match &xq {
                Q8::U8(xv) => run!(xv, xz as u8),
                Q8::I8(xv) => run!(xv, xz as i8),
            };
            return Ok(vec![q_from_i32(rq.dtype, shape, out, Some(rq.quant))?]);
        }
        let xv: Vec<i32> = q_to_i32(x)?.into_iter().map(|v| v - xz).collect();
        let wz = weight_zps(ctx, w, oc);
        let wv: Vec<i32> = q_to_i32(w)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| v - wz[i / k.max(1)])
            .collect();
        let bias = bias_i32(b, oc)?;
        let mut out = Vec::with_capacity(g.n * rows * oc);
        for n in 0..g.n {
            if g.is_pointwise() {
                let img = &xv[n * rows * k..(n + 1) * rows * k];
                qgemm(img, rows, k, &wv, &bias, &rq, &mut out);
            } else {
                let p = g.im2col(&xv, n, 0);
                qgemm(&p, rows, k, &wv, &bias, &rq, &mut out);
            }
        }
        return Ok(vec![q_from_i32(rq.dtype, shape, out, Some(rq.quant))?]);
    }
    let xv = float_in(x)?;
    let wv = float_in(w)?;
    let bias = bias_f32(b, oc)?;
    let mut out = vec![0f32; g.n * rows * oc];
    for n in 0..g.n {
        let o = &mut out[n * rows * oc..(n + 1) * rows * oc];
        let ok = if g.is_pointwise() {
            let img = &xv[n * rows * k..(n + 1) * rows * k];
            sgemm(
                1.0,
                MatRef::row_major(img, rows, k),
                MatRef::row_major(&wv, oc, k).t(),
                0.0,
                o,
                oc,
            )
        } else {
            let p = g.im2col(&xv, n, 0.0);
            sgemm(
                1.0,
                MatRef::row_major(&p, rows, k),
                MatRef::row_major(&wv, oc, k).t(),
                0.0,
                o,
                oc,
            )
        };
        if !ok {
            return Err(Error::arg("Conv2D: gemm shapes disagree"));
        }
        for r in o.chunks_exact_mut(oc) {
            r.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
        }
    }
    act_f32(&act(ctx), &mut out)?;
    Ok(vec![f32_out(shape, out)?])
}

pub(crate) fn depthwise(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    let b = opt_input(ins, 2);
    let xd = dims4(x, "input")?;
    let [one, kh, kw, oc] = dims4(w, "filter")?;
    let ic = xd[3];
    if one != 1 || ic == 0 || oc % ic != 0 {
        return Err(Error::arg(format!(
            "DepthwiseConv2D: filter {:?} does not fit {ic} input channels",
            w.shape()
        )));
    }
    let m = oc / ic;
    let g = Geo::new(ctx, xd, kh, kw)?;
    let shape = vec![g.n, g.oh, g.ow, oc];
    let total = g.n * g.oh * g.ow * oc;
    macro_rules! run {
        ($xv:expr, $wv:expr, $bias:expr, $zero:expr, $emit:expr) => {{
            let (xv, wv, bias) = ($xv, $wv, $bias);
            let mut acc = vec![$zero; oc];
            for n in 0..g.n {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        acc.copy_from_slice(&bias);
                        for ky in 0..kh {
                            let Some(iy) = g.iy(oy, ky) else { continue };
                            for kx in 0..kw {
                                let Some(ix) = g.ix(ox, kx) else { continue };
                                let src = &xv[((n * g.ih + iy) * g.iw + ix) * ic..][..ic];
                                let wr = &wv[(ky * kw + kx) * oc..][..oc];
                                if m == 1 {
                                    for ((a, &xx), &ww) in acc.iter_mut().zip(src).zip(wr) {
                                        *a += xx * ww;
                                    }
                                } else {
                                    for c in 0..ic {
                                        for j in 0..m {
                                            acc[c * m + j] += src[c] * wr[c * m + j];
                                        }
                                    }
                                }
                            }
                        }
                        $emit(&acc);
                    }
                }
            }
        }};
    }
    if is_quant(x.dtype()) {
        let (_, xz) = qparams(ctx, "in0", Some(x))?;
        let rq = Requant::new(ctx, x, w, oc)?;
        let xv: Vec<i32> = q_to_i32(x)?.into_iter().map(|v| v - xz).collect();
        let wz = weight_zps(ctx, w, oc);
        let wv: Vec<i32> = q_to_i32(w)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| v - wz[i % oc])
            .collect();
        let bias = bias_i32(b, oc)?;
        let mut out = Vec::with_capacity(total);
        run!(&xv, &wv, &bias, 0i32, |acc: &[i32]| {
            for (c, &a) in acc.iter().enumerate() {
                out.push(rq.apply(a, c));
            }
        });
        return Ok(vec![q_from_i32(rq.dtype, shape, out, Some(rq.quant))?]);
    }
    let xv = float_in(x)?;
    let wv = float_in(w)?;
    let bias = bias_f32(b, oc)?;
    let mut out = Vec::with_capacity(total);
    run!(&xv[..], &wv[..], &bias, 0f32, |acc: &[f32]| out
        .extend_from_slice(acc));
    act_f32(&act(ctx), &mut out)?;
    Ok(vec![f32_out(shape, out)?])
}

fn transpose_conv(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let os = input(ins, 0)?.to_i64_vec();
    let w = input(ins, 1)?;
    let x = input(ins, 2)?;
    let b = opt_input(ins, 3);
    let xd = dims4(x, "input")?;
    let [oc, kh, kw, wc] = dims4(w, "filter")?;
    if os.len() != 4
        || os.iter().any(|&d| d < 0)
        || os[0] as usize != xd[0]
        || os[3] as usize != oc
        || wc != xd[3]
    {
        return Err(Error::arg(format!(
            "TransposeConv: output shape {os:?} does not fit input {:?} and filter {:?}",
            x.shape(),
            w.shape()
        )));
    }
    let (oh, ow) = (os[1] as usize, os[2] as usize);
    let pad = ctx.s("padding", "VALID");
    let sh = ctx.i("stride_h", 1).max(0) as usize;
    let sw = ctx.i("stride_w", 1).max(0) as usize;
    let (_, pt) = out_and_pad(&pad, oh, kh, sh, 1)?;
    let (_, pl) = out_and_pad(&pad, ow, kw, sw, 1)?;
    let n = xd[0];
    let ic = xd[3];
    let shape = vec![n, oh, ow, oc];
    let total = edgehal_core::tensor::checked_numel(&shape, DType::F32)?;
    macro_rules! scatter {
        ($xv:expr, $wv:expr, $zero:expr) => {{
            let (xv, wv) = ($xv, $wv);
            let mut acc = vec![$zero; total];
            for b_ in 0..n {
                for iy in 0..xd[1] {
                    for ix in 0..xd[2] {
                        let src = &xv[((b_ * xd[1] + iy) * xd[2] + ix) * ic..][..ic];
                        for ky in 0..kh {
                            let Some(oy) = (iy * sh + ky).checked_sub(pt).filter(|&v| v < oh)
                            else {
                                continue;
                            };
                            for kx in 0..kw {
                                let Some(ox) = (ix * sw + kx).checked_sub(pl).filter(|&v| v < ow)
                                else {
                                    continue;
                                };
                                let dst = ((b_ * oh + oy) * ow + ox) * oc;
                                for o in 0..oc {
                                    let wr = &wv[((o * kh + ky) * kw + kx) * ic..][..ic];
                                    let mut s = $zero;
                                    for (a, c) in src.iter().zip(wr) {
                                        s += *a * *c;
                                    }
                                    acc[dst + o] += s;
                                }
                            }
                        }
                    }
                }
            }
            acc
        }};
    }
    if is_quant(x.dtype()) {
        let (_, xz) = qparams(ctx, "in2", Some(x))?;
        // Requant reads input 0's parameters: build it from the data input's.
        let (xs, _) = qparams(ctx, "in2", Some(x))?;
        let wq = quant_of(ctx, "in1", Some(w))
            .ok_or_else(|| Error::arg("quantized weights without scale"))?;
        let (osc, oz) = qparams(ctx, "out0", None)?;
        let out_t = out_dtype(ctx, 0, x.dtype());
        let (lo, hi) = act_range_q(&act(ctx), osc, oz, out_t);
        let xv: Vec<i32> = q_to_i32(x)?.into_iter().map(|v| v - xz).collect();
        let wz = weight_zps(ctx, w, oc);
        let per = kh * kw * ic;
        let wv: Vec<i32> = q_to_i32(w)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| v - wz[i / per.max(1)])
            .collect();
        let bias = bias_i32(b, oc)?;
        let acc = scatter!(&xv, &wv, 0i32);
        let wscale = |c: usize| wq.scale.get(c).or(wq.scale.first()).copied().unwrap_or(0.0);
        let rq = Requant {
            mult: (0..oc)
                .map(|c| Multiplier::new(xs as f64 * wscale(c) as f64 / osc as f64))
                .collect(),
            fscale: (0..oc).map(|c| xs * wscale(c) / osc).collect(),
            rounding: Rounding::of(ctx.node)?,
            out_zp: oz,
            lo,
            hi,
            dtype: out_t,
            quant: Quant::per_tensor(osc, oz),
        };
        let out: Vec<i32> = acc
            .iter()
            .enumerate()
            .map(|(i, &a)| rq.apply(a.wrapping_add(bias[i % oc]), i % oc))
            .collect();
        return Ok(vec![q_from_i32(
            out_t,
            shape,
            out,
            Some(Quant::per_tensor(osc, oz)),
        )?]);
    }
    let xv = float_in(x)?;
    let wv = float_in(w)?;
    let bias = bias_f32(b, oc)?;
    let mut out = scatter!(&xv[..], &wv[..], 0f32);
    for (i, v) in out.iter_mut().enumerate() {
        *v += bias[i % oc];
    }
    act_f32(&act(ctx), &mut out)?;
    Ok(vec![f32_out(shape, out)?])
}

pub(crate) fn fully_connected(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let w = input(ins, 1)?;
    let b = opt_input(ins, 2);
    let (o, k) = match w.shape() {
        &[o, k] => (o, k),
        s => {
            return Err(Error::arg(format!(
                "FullyConnected: weights have shape {s:?}, expected 2 dims"
            )))
        }
    };
    if k == 0 || x.len() % k != 0 {
        return Err(Error::arg(format!(
            "FullyConnected: input {:?} is not a multiple of {k} features",
            x.shape()
        )));
    }
    let rows = x.len() / k;
    let shape = if ctx.i("keep_num_dims", 0) != 0 {
        let mut s = x.shape().to_vec();
        if let Some(l) = s.last_mut() {
            *l = o;
        }
        s
    } else {
        vec![rows, o]
    };
    if is_quant(x.dtype()) {
        if !is_quant(w.dtype()) {
            return Err(Error::unsupported(
                "FullyConnected: quantized input with float weights",
            ));
        }
        let (_, xz) = qparams(ctx, "in0", Some(x))?;
        let rq = Requant::new(ctx, x, w, o)?;
        let wide = o >= 16 && k >= 32;
        if let (Some(xq), Some(wq), true) = (Q8::of(x), Q8::of(w), wide && int8_simd()) {
            let wz = weight_zps(ctx, w, o);
            let bias = bias_i32(b, o)?;
            let out = match &xq {
                Q8::U8(xv) => {
                    let xv = &xv[..];
                    qgemm_q8(
                        1,
                        rows,
                        k,
                        xz,
                        |_| Some(Cow::Borrowed(xv)),
                        &wq,
                        &wz,
                        &bias,
                        &rq,
                    )?
                }
                Q8::I8(xv) => {
                    let xv = &xv[..];
                    qgemm_q8(
                        1,
                        rows,
                        k,
                        xz,
                        |_| Some(Cow::Borrowed(xv)),
                        &wq,
                        &wz,
                        &bias,
                        &rq,
                    )?
                }
            };
            return Ok(vec![q_from_i32(rq.dtype, shape, out, Some(rq.quant))?]);
        }
        let xv: Vec<i32> = q_to_i32(x)?.into_iter().map(|v| v - xz).collect();
        let wz = weight_zps(ctx, w, o);
        let wv: Vec<i32> = q_to_i32(w)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| v - wz[i / k])
            .collect();
        let bias = bias_i32(b, o)?;
        let mut out = Vec::with_capacity(rows * o);
        qgemm(&xv, rows, k, &wv, &bias, &rq, &mut out);
        return Ok(vec![q_from_i32(rq.dtype, shape, out, Some(rq.quant))?]);
    }
    if is_quant(w.dtype()) {
        return Err(Error::unsupported(
            "FullyConnected: float input with quantized weights (hybrid) is not implemented",
        ));
    }
    let xv = float_in(x)?;
    let wv = float_in(w)?;
    let bias = bias_f32(b, o)?;
    let mut out = vec![0f32; rows * o];
    if !sgemm(
        1.0,
        MatRef::row_major(&xv, rows, k),
        MatRef::row_major(&wv, o, k).t(),
        0.0,
        &mut out,
        o,
    ) {
        return Err(Error::arg("FullyConnected: gemm shapes disagree"));
    }
    for r in out.chunks_exact_mut(o.max(1)) {
        r.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
    }
    act_f32(&act(ctx), &mut out)?;
    Ok(vec![f32_out(shape, out)?])
}

fn pool(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>], max: bool) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let xd = dims4(x, "input")?;
    let kh = ctx.i("filter_height", 1).max(0) as usize;
    let kw = ctx.i("filter_width", 1).max(0) as usize;
    let g = Geo::new(ctx, xd, kh, kw)?;
    let c = g.ic;
    let shape = vec![g.n, g.oh, g.ow, c];
    if max && matches!(x.dtype(), DType::I8 | DType::U8) {
        // 8-bit max pooling straight on the stored values (max commutes with the monotone
        // dequantization), channels innermost.
        let (s, z) = qparams(ctx, "out0", Some(x))?;
        let (lo, hi) = act_range_q(&act(ctx), s, z, x.dtype());
        let q = quant_of(ctx, "out0", Some(x));
        let threads = crate::arena::threads();
        let mut t = if x.dtype() == DType::I8 {
            let xv = x.as_slice::<i8>()?;
            Tensor::from_vec(shape, max_pool_8(&g, &xv, lo as i8, hi as i8, threads))?
        } else {
            let xv = x.as_slice::<u8>()?;
            Tensor::from_vec(shape, max_pool_8(&g, &xv, lo as u8, hi as u8, threads))?
        };
        t.quant = q;
        return Ok(vec![t]);
    }
    // Visit each output pixel's in-bounds window.
    let mut windows = Vec::with_capacity(g.n * g.oh * g.ow);
    for n in 0..g.n {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut taps = Vec::with_capacity(kh * kw);
                for ky in 0..kh {
                    let Some(iy) = g.iy(oy, ky) else { continue };
                    for kx in 0..kw {
                        let Some(ix) = g.ix(ox, kx) else { continue };
                        taps.push(((n * g.ih + iy) * g.iw + ix) * c);
                    }
                }
                windows.push(taps);
            }
        }
    }
    if is_quant(x.dtype()) {
        let xv = q_to_i32(x)?;
        let (s, z) = qparams(ctx, "out0", Some(x))?;
        let (lo, hi) = act_range_q(&act(ctx), s, z, x.dtype());
        let mut out = Vec::with_capacity(windows.len() * c);
        for taps in &windows {
            for ch in 0..c {
                let v = if max {
                    taps.iter().map(|&t| xv[t + ch]).max().unwrap_or(lo)
                } else {
                    let cnt = taps.len() as i32;
                    let acc: i32 = taps.iter().map(|&t| xv[t + ch]).sum();
                    if cnt == 0 {
                        0
                    } else if acc > 0 {
                        (acc + cnt / 2) / cnt
                    } else {
                        (acc - cnt / 2) / cnt
                    }
                };
                out.push(v.clamp(lo, hi));
            }
        }
        let q = quant_of(ctx, "out0", Some(x));
        return Ok(vec![q_from_i32(x.dtype(), shape, out, q)?]);
    }
    let xv = float_in(x)?;
    let mut out = Vec::with_capacity(windows.len() * c);
    for taps in &windows {
        for ch in 0..c {
            let v = if max {
                taps.iter()
                    .map(|&t| xv[t + ch])
                    .fold(f32::NEG_INFINITY, f32::max)
            } else {
                taps.iter().map(|&t| xv[t + ch]).sum::<f32>() / taps.len().max(1) as f32
            };
            out.push(v);
        }
    }
    act_f32(&act(ctx), &mut out)?;
    Ok(vec![f32_out(shape, out)?])
}

/// Max over each in-bounds window (`lo` for an empty one), clamped to `lo..=hi`.
fn max_pool_8<T: Copy + Ord + Default + Send + Sync>(
    g: &Geo,
    xv: &[T],
    lo: T,
    hi: T,
    threads: usize,
) -> Vec<T> {
    let c = g.ic;
    let mut out = vec![lo; g.n * g.oh * g.ow * c];
    let row_len = g.ow * c;
    if row_len == 0 || out.is_empty() {
        return out;
    }
    // max(lo, window...) then min(hi) is the window's max clamped to lo..=hi, and lo for an
    // empty window. Per output row: the max of the window's input rows over the whole row
    // (one vectorized pass per row), then per pixel the max across the window's columns, in
    // channel runs of 8. Output rows are split across threads when the pool is large enough
    // to pay for the hand-off (person_detect's first pool was a serial 23% of a 2-thread run).
    let threads = if out.len() * g.kh * g.kw >= 1 << 16 {
        threads
    } else {
        1
    };
    let run = |rows: std::ops::Range<usize>, part: &mut [T]| -> std::result::Result<(), ()> {
        let mut vm = vec![lo; g.iw * c];
        let mut hm = vec![lo; g.iw * c];
        for (r, orow) in rows.zip(part.chunks_exact_mut(row_len)) {
            let (n, oy) = (r / g.oh, r % g.oh);
            vm.fill(lo);
            let mut any = false;
            for ky in 0..g.kh {
                let Some(iy) = g.iy(oy, ky) else { continue };
                any = true;
                let irow = &xv[(n * g.ih + iy) * g.iw * c..][..g.iw * c];
                for (a, &b) in vm.iter_mut().zip(irow) {
                    *a = (*a).max(b);
                }
            }
            if any {
                // Interior columns (every tap inside the row): the window max at every input
                // column first, over whole shifted rows (vectorized), then one pick per output.
                let (lo_x, hi_x) = interior_cols(g);
                if hi_x > lo_x {
                    let span = (g.iw + 1 - ((g.kw - 1) * g.dw + 1)) * c;
                    hm[..span].copy_from_slice(&vm[..span]);
                    for kx in 1..g.kw {
                        let sh = &vm[kx * g.dw * c..][..span];
                        hm[..span]
                            .iter_mut()
                            .zip(sh)
                            .for_each(|(a, &b)| *a = (*a).max(b));
                    }
                    let first = (lo_x * g.sw - g.pl) * c;
                    pick_cols(&mut orow[lo_x * c..hi_x * c], &hm[first..span], c, g.sw * c);
                }
                for (ox, o) in orow.chunks_exact_mut(c).enumerate() {
                    if (lo_x..hi_x).contains(&ox) {
                        continue;
                    }
                    for kx in 0..g.kw {
                        let Some(ix) = g.ix(ox, kx) else { continue };
                        max_into(o, &vm[ix * c..][..c]);
                    }
                }
            }
            orow.iter_mut().for_each(|d| *d = (*d).min(hi));
        }
        Ok(())
    };
    let _ = crate::par::for_parts(threads, g.n * g.oh, row_len, &mut out, run);
    out
}

/// Output columns `lo..hi` whose windows lie inside the input row (no padding tap).
fn interior_cols(g: &Geo) -> (usize, usize) {
    let reach = (g.kw.max(1) - 1) * g.dw + 1;
    let lo = g.pl.div_ceil(g.sw.max(1)).min(g.ow);
    if g.iw + g.pl < reach {
        return (lo, lo);
    }
    // ox s - pl + reach <= iw.
    let hi = ((g.iw + g.pl - reach) / g.sw.max(1) + 1).clamp(lo, g.ow);
    (lo, hi)
}

/// `out` pixel `i` (`c` values) = `src[i * step..][..c]` (`max` with what `out` holds is not
/// needed: the interior window max was computed whole). Fixed-size copies for the usual
/// channel counts so no pixel goes through a `memcpy` call.
fn pick_cols<T: Copy>(out: &mut [T], src: &[T], c: usize, step: usize) {
    fn fixed<T: Copy, const C: usize>(out: &mut [T], src: &[T], step: usize) {
        for (i, o) in out.chunks_exact_mut(C).enumerate() {
            let o: &mut [T; C] = o.try_into().expect("C values");
            *o = src[i * step..i * step + C].try_into().expect("C values");
        }
    }
    match c {
        4 => fixed::<T, 4>(out, src, step),
        8 => fixed::<T, 8>(out, src, step),
        16 => fixed::<T, 16>(out, src, step),
        32 => fixed::<T, 32>(out, src, step),
        _ => {
            for (i, o) in out.chunks_exact_mut(c.max(1)).enumerate() {
                o.copy_from_slice(&src[i * step..i * step + c]);
            }
        }
    }
}

/// `d[i] = max(d[i], s[i])`, eight lanes at a time.
#[inline(always)]
fn max_into<T: Copy + Ord>(d: &mut [T], s: &[T]) {
    let mut dc = d.chunks_exact_mut(8);
    let mut sc = s.chunks_exact(8);
    for (d8, s8) in (&mut dc).zip(&mut sc) {
        for (a, &b) in d8.iter_mut().zip(s8) {
            *a = (*a).max(b);
        }
    }
    for (a, &b) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        *a = (*a).max(b);
    }
}

fn max_pool(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    pool(ctx, ins, true)
}
fn avg_pool(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    pool(ctx, ins, false)
}

fn batch_matmul(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let a = input(ins, 0)?;
    let b = input(ins, 1)?;
    if is_quant(a.dtype()) {
        return Err(Error::unsupported("BatchMatMul on quantized tensors"));
    }
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::arg(format!(
            "BatchMatMul: inputs {:?} and {:?} need 2+ dims",
            a.shape(),
            b.shape()
        )));
    }
    let (adj_x, adj_y) = (ctx.i("adj_x", 0) != 0, ctx.i("adj_y", 0) != 0);
    let (ar, br) = (a.rank(), b.rank());
    let (m, ka) = if adj_x {
        (a.shape()[ar - 1], a.shape()[ar - 2])
    } else {
        (a.shape()[ar - 2], a.shape()[ar - 1])
    };
    let (kb, n) = if adj_y {
        (b.shape()[br - 1], b.shape()[br - 2])
    } else {
        (b.shape()[br - 2], b.shape()[br - 1])
    };
    if ka != kb {
        return Err(Error::arg(format!(
            "BatchMatMul: inner sizes {ka} and {kb} differ"
        )));
    }
    let batch = edgehal_core::tensor::broadcast_shapes(&a.shape()[..ar - 2], &b.shape()[..br - 2])?;
    let nb: usize = batch.iter().product();
    let av = float_in(a)?;
    let bv = float_in(b)?;
    let idx = |shape: &[usize], bi: usize| -> usize {
        // Map a broadcast batch index to the operand's batch offset.
        let mut rem = bi;
        let mut off = 0;
        let mut stride = 1;
        let pad = batch.len() - shape.len();
        for ax in (0..batch.len()).rev() {
            let i = rem % batch[ax];
            rem /= batch[ax];
            if ax >= pad {
                let d = shape[ax - pad];
                if d != 1 {
                    off += i * stride;
                }
                stride *= d;
            }
        }
        off
    };
    let mut out = vec![0f32; nb * m * n];
    for bi in 0..nb {
        let ao = idx(&a.shape()[..ar - 2], bi) * m * ka;
        let bo = idx(&b.shape()[..br - 2], bi) * ka * n;
        let am = if adj_x {
            MatRef::row_major(&av[ao..ao + m * ka], ka, m).t()
        } else {
            MatRef::row_major(&av[ao..ao + m * ka], m, ka)
        };
        let bm = if adj_y {
            MatRef::row_major(&bv[bo..bo + ka * n], n, ka).t()
        } else {
            MatRef::row_major(&bv[bo..bo + ka * n], ka, n)
        };
        if !sgemm(1.0, am, bm, 0.0, &mut out[bi * m * n..(bi + 1) * m * n], n) {
            return Err(Error::arg("BatchMatMul: gemm shapes disagree"));
        }
    }
    let mut shape = batch;
    shape.extend([m, n]);
    Ok(vec![f32_out(shape, out)?])
}

/// UNIDIRECTIONAL_SEQUENCE_LSTM, float: gates (input, forget, cell, output) with optional CIFG,
/// peepholes, projection and clipping; state inputs 18/19 give the initial state.
pub fn lstm(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    if !x.dtype().is_float() {
        return Err(Error::unsupported(
            "UnidirectionalSequenceLstm on quantized tensors",
        ));
    }
    if (20..24).any(|k| opt_input(ins, k).is_some()) {
        return Err(Error::unsupported(
            "UnidirectionalSequenceLstm with layer normalization",
        ));
    }
    let time_major = ctx.i("time_major", 0) != 0;
    let (b, t, ni) = match x.shape() {
        &[a, bb, c] if time_major => (bb, a, c),
        &[a, bb, c] => (a, bb, c),
        s => return Err(Error::arg(format!("LSTM input {s:?} is not 3-d"))),
    };
    let w = |k: usize| -> Result<Option<Vec<f32>>> {
        opt_input(ins, k)
            .map(|t| float_in(t).map(|c| c.into_owned()))
            .transpose()
    };
    let wf = w(2)?.ok_or_else(|| Error::arg("LSTM: missing input_to_forget_weights"))?;
    let nc = wf.len() / ni.max(1);
    let rf = w(6)?.ok_or_else(|| Error::arg("LSTM: missing recurrent_to_forget_weights"))?;
    let no = rf.len() / nc.max(1);
    let need = |v: Option<Vec<f32>>, len: usize, what: &str| -> Result<Option<Vec<f32>>> {
        match v {
            Some(v) if v.len() != len => Err(Error::arg(format!(
                "LSTM: {what} has {} values, expected {len}",
                v.len()
            ))),
            v => Ok(v),
        }
    };
    let wi = need(w(1)?, nc * ni, "input_to_input_weights")?;
    let wc = need(w(3)?, nc * ni, "input_to_cell_weights")?
        .ok_or_else(|| Error::arg("LSTM: missing input_to_cell_weights"))?;
    let wo = need(w(4)?, nc * ni, "input_to_output_weights")?
        .ok_or_else(|| Error::arg("LSTM: missing input_to_output_weights"))?;
    let wf = need(Some(wf), nc * ni, "input_to_forget_weights")?.unwrap_or_default();
    let ri = need(w(5)?, nc * no, "recurrent_to_input_weights")?;
    let rf = need(Some(rf), nc * no, "recurrent_to_forget_weights")?.unwrap_or_default();
    let rc = need(w(7)?, nc * no, "recurrent_to_cell_weights")?
        .ok_or_else(|| Error::arg("LSTM: missing recurrent_to_cell_weights"))?;
    let ro = need(w(8)?, nc * no, "recurrent_to_output_weights")?
        .ok_or_else(|| Error::arg("LSTM: missing recurrent_to_output_weights"))?;
    let (pi, pf, po) = (
        need(w(9)?, nc, "cell_to_input")?,
        need(w(10)?, nc, "cell_to_forget")?,
        need(w(11)?, nc, "cell_to_output")?,
    );
    let zero = vec![0f32; nc];
    let bi = need(w(12)?, nc, "input_gate_bias")?.unwrap_or_else(|| zero.clone());
    let bf = need(w(13)?, nc, "forget_gate_bias")?.unwrap_or_else(|| zero.clone());
    let bc = need(w(14)?, nc, "cell_bias")?.unwrap_or_else(|| zero.clone());
    let bo = need(w(15)?, nc, "output_gate_bias")?.unwrap_or_else(|| zero.clone());
    let proj = w(16)?;
    let n_out = match &proj {
        Some(p) => p.len() / nc.max(1),
        None => nc,
    };
    if n_out != no {
        return Err(Error::arg(format!(
            "LSTM: output size {n_out} does not match recurrent weights ({no})"
        )));
    }
    let pb = need(w(17)?, no, "projection_bias")?;
    let mut h = need(w(18)?, b * no, "output_state")?.unwrap_or_else(|| vec![0.0; b * no]);
    let mut c = need(w(19)?, b * nc, "cell_state")?.unwrap_or_else(|| vec![0.0; b * nc]);
    let (cell_clip, proj_clip) = (ctx.f("cell_clip", 0.0), ctx.f("proj_clip", 0.0));
    let actf = act(ctx);
    let xv = float_in(x)?;
    let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
    let mut out = vec![0f32; b * t * no];
    let matvec = |m: &[f32], v: &[f32], row: usize, n: usize| -> f32 {
        m[row * n..(row + 1) * n]
            .iter()
            .zip(v)
            .map(|(a, b)| a * b)
            .sum()
    };
    for step in 0..t {
        for bb in 0..b {
            let xo = if time_major {
                (step * b + bb) * ni
            } else {
                (bb * t + step) * ni
            };
            let xs = &xv[xo..xo + ni];
            let hs = h[bb * no..(bb + 1) * no].to_vec();
            let cs = &mut c[bb * nc..(bb + 1) * nc];
            let mut hc = vec![0f32; nc];
            for j in 0..nc {
                let cj = cs[j];
                let fg = sig(matvec(&wf, xs, j, ni)
                    + matvec(&rf, &hs, j, no)
                    + pf.as_ref().map_or(0.0, |p| p[j] * cj)
                    + bf[j]);
                let ig = match (&wi, &ri) {
                    (Some(wi), Some(ri)) => sig(matvec(wi, xs, j, ni)
                        + matvec(ri, &hs, j, no)
                        + pi.as_ref().map_or(0.0, |p| p[j] * cj)
                        + bi[j]),
                    _ => 1.0 - fg,
                };
                let mut g = [matvec(&wc, xs, j, ni) + matvec(&rc, &hs, j, no) + bc[j]];
                act_f32(&actf, &mut g)?;
                let mut cn = fg * cj + ig * g[0];
                if cell_clip > 0.0 {
                    cn = cn.clamp(-cell_clip, cell_clip);
                }
                cs[j] = cn;
                let og = sig(matvec(&wo, xs, j, ni)
                    + matvec(&ro, &hs, j, no)
                    + po.as_ref().map_or(0.0, |p| p[j] * cn)
                    + bo[j]);
                let mut a = [cn];
                act_f32(&actf, &mut a)?;
                hc[j] = og * a[0];
            }
            let hn: Vec<f32> = match &proj {
                Some(p) => (0..no)
                    .map(|k| {
                        let v = matvec(p, &hc, k, nc) + pb.as_ref().map_or(0.0, |b| b[k]);
                        if proj_clip > 0.0 {
                            v.clamp(-proj_clip, proj_clip)
                        } else {
                            v
                        }
                    })
                    .collect(),
                None => hc,
            };
            h[bb * no..(bb + 1) * no].copy_from_slice(&hn);
            let oo = if time_major {
                (step * b + bb) * no
            } else {
                (bb * t + step) * no
            };
            out[oo..oo + no].copy_from_slice(&hn);
        }
    }
    let shape = if time_major {
        vec![t, b, no]
    } else {
        vec![b, t, no]
    };
    Ok(vec![f32_out(shape, out)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two images of `ih x iw x ic` under a `k x k` window, stride `st`, dilation `d`, TFLite
    /// padding `pad`.
    fn square_geo(
        ih: usize,
        iw: usize,
        ic: usize,
        k: usize,
        st: usize,
        d: usize,
        pad: &str,
    ) -> Geo {
        let (oh, pt) = out_and_pad(pad, ih, k, st, d).unwrap();
        let (ow, pl) = out_and_pad(pad, iw, k, st, d).unwrap();
        Geo {
            n: 2,
            ih,
            iw,
            ic,
            oh,
            ow,
            kh: k,
            kw: k,
            sh: st,
            sw: st,
            dh: d,
            dw: d,
            pt,
            pl,
        }
    }

    /// The 8-bit max pool against the window definition: SAME and VALID, strides 1-3,
    /// 2x2 and 3x3 windows (one dilated), 1, 4, 8, 13, 16 and 32 channels (the fixed-size
    /// and general interior picks), rows too narrow for any interior column, a clamp below
    /// and above, at 1 and 2 threads (the larger maps split their rows).
    #[test]
    fn max_pool_8_matches_the_window_max() {
        for &(ih, iw, ic, k, st, d, pad) in &[
            (96usize, 96usize, 8usize, 2usize, 2usize, 1usize, "VALID"),
            (7, 9, 13, 3, 2, 1, "SAME"),
            (48, 50, 1, 3, 1, 1, "SAME"),
            (5, 4, 8, 2, 1, 1, "VALID"),
            (9, 11, 16, 3, 2, 1, "SAME"),
            (6, 7, 32, 2, 2, 1, "VALID"),
            (8, 10, 4, 3, 3, 1, "SAME"),
            (9, 12, 8, 3, 1, 2, "SAME"),
            (3, 2, 4, 3, 1, 1, "SAME"),
        ] {
            let g = square_geo(ih, iw, ic, k, st, d, pad);
            let (oh, ow) = (g.oh, g.ow);
            let x: Vec<i8> = (0..2 * ih * iw * ic)
                .map(|i| ((i * 7919) % 251) as i32 - 125)
                .map(|v| v as i8)
                .collect();
            let (lo, hi) = (-100i8, 90i8);
            let mut want = vec![lo; 2 * oh * ow * ic];
            for n in 0..2 {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ch in 0..ic {
                            let o = &mut want[((n * oh + oy) * ow + ox) * ic + ch];
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (Some(iy), Some(ix)) = (g.iy(oy, ky), g.ix(ox, kx)) else {
                                        continue;
                                    };
                                    *o = (*o).max(x[((n * ih + iy) * iw + ix) * ic + ch]);
                                }
                            }
                            *o = (*o).min(hi);
                        }
                    }
                }
            }
            for threads in [1, 2] {
                let got = max_pool_8(&g, &x, lo, hi, threads);
                assert_eq!(
                    got, want,
                    "{ih}x{iw}x{ic} k{k} s{st} {pad}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn im2col_matches_the_tap_definition() {
        for &(ih, iw, ic, k, st, d, pad) in &[
            (7, 9, 1, 3, 2, 1, "SAME"),
            (8, 8, 3, 3, 1, 1, "SAME"),
            (9, 6, 10, 3, 2, 2, "SAME"),
            (6, 7, 2, 2, 1, 1, "VALID"),
            (5, 5, 4, 5, 3, 1, "SAME"),
        ] {
            let g = square_geo(ih, iw, ic, k, st, d, pad);
            let (oh, ow) = (g.oh, g.ow);
            let x: Vec<i32> = (0..2 * ih * iw * ic).map(|v| v as i32 + 1).collect();
            for b in 0..2 {
                let got = g.im2col(&x, b, -7);
                // Any run of pixels, rows padded to a multiple of 4, equals the same rows.
                let cols = k * k * ic;
                let rs = cols.next_multiple_of(4);
                let img = &x[b * ih * iw * ic..(b + 1) * ih * iw * ic];
                let rows = oh * ow;
                for (p0, p1) in [(0, rows), (1, rows.min(5)), (rows / 2, rows)] {
                    let mut buf = vec![-7; (p1 - p0) * rs];
                    g.im2col_rows(img, p0..p1, rs, &mut buf);
                    for p in p0..p1 {
                        assert_eq!(
                            buf[(p - p0) * rs..][..cols],
                            got[p * cols..][..cols],
                            "rows {p0}..{p1}, pixel {p}: {ih}x{iw}x{ic} k{k} s{st} d{d} {pad}"
                        );
                        assert!(buf[(p - p0) * rs + cols..][..rs - cols]
                            .iter()
                            .all(|&v| v == -7));
                    }
                }
                let cols = k * k * ic;
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ky in 0..k {
                            for kx in 0..k {
                                for c in 0..ic {
                                    let want = match (g.iy(oy, ky), g.ix(ox, kx)) {
                                        (Some(iy), Some(ix)) => {
                                            x[((b * ih + iy) * iw + ix) * ic + c]
                                        }
                                        _ => -7,
                                    };
                                    let at = (oy * ow + ox) * cols + (ky * k + kx) * ic + c;
                                    assert_eq!(
                                        got[at], want,
                                        "{ih}x{iw}x{ic} k{k} s{st} d{d} {pad}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn same_padding_matches_tflite() {
        // 224 -> 112 with k=3, s=2: total pad 1, top 0.
        assert_eq!(out_and_pad("SAME", 224, 3, 2, 1).unwrap(), (112, 0));
        assert_eq!(out_and_pad("SAME", 7, 3, 1, 1).unwrap(), (7, 1));
        assert_eq!(out_and_pad("VALID", 7, 3, 2, 1).unwrap(), (3, 0));
        assert_eq!(out_and_pad("VALID", 2, 3, 1, 1).unwrap(), (0, 0));
        assert!(out_and_pad("SAME", 7, 3, 0, 1).is_err());
    }
}
