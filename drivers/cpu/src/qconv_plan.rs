//! Prepared quantized TFLite layers: `Conv2D`, `DepthwiseConv2D` and `FullyConnected` with
//! constant 8-bit weights and 8-bit activations.
//!
//! A [`QConvPlan`] is built once when the executor is created: the weights packed for the int8
//! GEMM ([`PackedB`], with their column sums and zero points) or, for depthwise layers, widened
//! to i32 with the zero point subtracted; the bias; the per-channel requantization multipliers
//! ([`Requant`]) and the fused activation's clamp. A run packs only the activations and writes
//! 8-bit outputs straight from the kernels ([`qconv::qgemm_requant`], [`qconv::depthwise`]),
//! bit for bit what the op functions in [`crate::ops::tflite::nn`] compute (TFLite's reference
//! rounding). Anything the plan was not built for (another input type, a depth multiplier)
//! runs the op function instead.

use edgehal_core::graph::Graph;
use edgehal_core::{DType, Node, Quant, Result, Tensor};
use edgehal_kernels::qconv::{self, Depthwise, DwPack, Requant, Rows};
use edgehal_kernels::qgemm::{PackedB, QMat};

use crate::ops::tflite::nn::{self, bias_i32, dims4, weight_zps, Geo};
use crate::ops::tflite::{is_quant, qparams, DOMAIN};
use crate::ops::{input, opt_input, OpCtx};
use crate::par::for_parts;

/// Multiply-adds below which a layer stays on one thread.
const MIN_PARALLEL_MACS: usize = 1 << 18;

/// Whether plans are built (`EDGEHAL_QPLAN=0` turns them off, for comparisons: the op
/// functions run instead).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGEHAL_QPLAN").map_or(true, |v| v != "0"))
}

enum Kind {
    /// `Conv2D` (`[oc, kh, kw, ic]` weights) or `FullyConnected` (`kh = kw = 0`).
    Gemm {
        kh: usize,
        kw: usize,
        packed: PackedB,
        /// KxK layers (dilation 1 along the width) with float requantization and weights
        /// without zero points, on CPUs with the fused VNNI GEMM: the weights laid out for
        /// reading the image in place ([`qconv::ConvRows`]) instead of an im2col.
        rows: Option<PackedB>,
    },
    /// `DepthwiseConv2D` with depth multiplier 1: `[kh][kw][c]` weights minus their zero
    /// points; 3x3 layers also laid out for the x86 VNNI kernel where it applies.
    Depthwise {
        kh: usize,
        kw: usize,
        w: Vec<i32>,
        pack: Option<DwPack>,
    },
}

/// One prepared quantized layer (see the module doc).
pub struct QConvPlan {
    kind: Kind,
    /// The input type the plan was built for, its zero point.
    x_dtype: DType,
    xz: i32,
    /// Output channels.
    oc: usize,
    bias: Vec<i32>,
    rq: Requant,
    out_dtype: DType,
    out_quant: Quant,
    /// The op function, for inputs the plan was not built for.
    fallback: crate::ops::OpFn,
}

impl QConvPlan {
    /// A plan for `node` when it is a quantized TFLite Conv2D / DepthwiseConv2D /
    /// FullyConnected whose weights (and bias) are initializers and whose input is 8-bit.
    pub fn prepare(graph: &Graph, node: &Node) -> Option<QConvPlan> {
        if node.domain != DOMAIN || !enabled() {
            return None;
        }
        let fallback: crate::ops::OpFn = match node.op.as_str() {
            "Conv2D" => nn::conv2d,
            "DepthwiseConv2D" => nn::depthwise,
            "FullyConnected" => nn::fully_connected,
            _ => return None,
        };
        let w = crate::exec::const_input(graph, node, 1)??;
        let b = crate::exec::const_input(graph, node, 2)?;
        let x = node.inputs.first().copied().flatten()?;
        let x_dtype = graph.values.get(x)?.dtype?;
        if !matches!(x_dtype, DType::I8 | DType::U8) || !matches!(w.dtype(), DType::I8 | DType::U8)
        {
            return None;
        }
        let ctx = OpCtx {
            node,
            opset: 1,
            subgraph: None,
            dest: None,
        };
        let (_, xz) = qparams(&ctx, "in0", None).ok()?;
        let ws = w.shape();
        let (oc, kind) = match (node.op.as_str(), ws) {
            ("Conv2D", &[oc, kh, kw, ic]) => {
                let k = kh * kw * ic;
                (oc, Some((kh, kw, k)))
            }
            ("FullyConnected", &[o, k]) => (o, Some((0, 0, k))),
            ("DepthwiseConv2D", &[1, _, _, c]) => (c, None),
            _ => return None,
        };
        let r = nn::Requant::with_input(&ctx, None, x_dtype, w, oc).ok()?;
        if !matches!(r.dtype, DType::I8 | DType::U8) {
            return None;
        }
        let mults: Vec<(i32, i32)> = r.mult.iter().map(|m| (m.m, m.shift)).collect();
        let rq = match r.rounding {
            nn::Rounding::Float => Requant::new_float(&r.fscale, r.out_zp, r.lo, r.hi)?,
            nn::Rounding::Reference => Requant::new(&mults, r.out_zp, r.lo, r.hi)?,
        };
        let bias = bias_i32(b, oc).ok()?;
        let wz = weight_zps(&ctx, w, oc);
        let kind = match kind {
            Some((kh, kw, k)) => {
                let wm = match w.dtype() {
                    DType::I8 => QMat::i8(bytemuck::cast_slice(&w.bytes()[..]), oc, k),
                    _ => QMat::u8(&w.bytes()[..], oc, k),
                };
                let packed = PackedB::new(wm.t(), &wz)?;
                let in_place = kh * kw > 1
                    && ctx.i("dilation_w_factor", 1) == 1
                    && w.dtype() == DType::I8
                    && rq.is_float()
                    && wz.iter().all(|&z| z == 0)
                    && qconv::conv_rows_supported();
                let rows = in_place
                    .then(|| {
                        let wr = qconv::conv_rows_weights(&w.bytes()[..], oc, kh, k / kh);
                        let kr = wr.len() / oc.max(1);
                        PackedB::new(QMat::i8(bytemuck::cast_slice(&wr), oc, kr).t(), &wz)
                    })
                    .flatten();
                Kind::Gemm {
                    kh,
                    kw,
                    packed,
                    rows,
                }
            }
            None => {
                let wv = crate::ops::tflite::q_to_i32(w).ok()?;
                let w: Vec<i32> = wv
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v - wz[i % oc])
                    .collect();
                let (kh, kw) = (ws[1], ws[2]);
                let signed = x_dtype == DType::I8;
                let pack = ((kh, kw) == (3, 3))
                    .then(|| DwPack::new(&w, &bias, xz, signed, &rq, oc))
                    .flatten();
                Kind::Depthwise { kh, kw, w, pack }
            }
        };
        Some(QConvPlan {
            kind,
            x_dtype,
            xz,
            oc,
            bias,
            rq: rq.widen(oc),
            out_dtype: r.dtype,
            out_quant: r.quant,
            fallback,
        })
    }

    /// Runs the layer on `threads` threads (1: the caller's only).
    pub fn run(
        &self,
        ctx: &OpCtx<'_>,
        ins: &[Option<&Tensor>],
        threads: usize,
    ) -> Result<Vec<Tensor>> {
        let x = input(ins, 0)?;
        // Computed weights or another input type: the op function.
        if x.dtype() != self.x_dtype || !is_quant(x.dtype()) || opt_input(ins, 1).is_none() {
            return (self.fallback)(ctx, ins);
        }
        let xb: &[u8] = &x.bytes()[..];
        let signed = self.x_dtype == DType::I8;
        let oc = self.oc;
        let (shape, out) = match &self.kind {
            Kind::Gemm { kh: 0, packed, .. } => {
                let k = packed.k();
                if k == 0 || x.len() % k != 0 {
                    return (self.fallback)(ctx, ins);
                }
                let rows = x.len() / k;
                let shape = if ctx.i("keep_num_dims", 0) != 0 {
                    let mut s = x.shape().to_vec();
                    if let Some(l) = s.last_mut() {
                        *l = oc;
                    }
                    s
                } else {
                    vec![rows, oc]
                };
                let mut out = crate::arena::take_bytes(rows * oc);
                self.gemm(xb, signed, rows, k, packed, &mut out, threads)?;
                (shape, out)
            }
            Kind::Gemm {
                kh,
                kw,
                packed,
                rows: in_place,
            } => {
                let xd = dims4(x, "input")?;
                let k = packed.k();
                if kh * kw * xd[3] != k {
                    return (self.fallback)(ctx, ins);
                }
                let g = Geo::new(ctx, xd, *kh, *kw)?;
                let rows = g.oh * g.ow;
                let mut out = crate::arena::take_bytes(g.n * rows * oc);
                let img = g.ih * g.iw * g.ic;
                for (n, o) in out.chunks_exact_mut((rows * oc).max(1)).enumerate() {
                    if let (Some(pr), 1) = (in_place, g.dw) {
                        let img = InPlaceImage::Nhwc(&xb[n * img..(n + 1) * img]);
                        self.op(pr).run_in_place(&g, img, signed, o, threads)?;
                    } else if g.is_pointwise() {
                        let a = &xb[n * img..(n + 1) * img];
                        self.gemm(a, signed, rows, k, packed, o, threads)?;
                    } else if g.ic < 3 {
                        // One or two channels (a gray image): the whole-image im2col's
                        // strided copies beat per-pixel runs of 3 bytes.
                        let mut a = g.im2col(xb, n, self.xz as u8);
                        // Slack for the last row's depth rounded up to 4 (see QGemmOp::run).
                        a.resize(a.len() + 3, self.xz as u8);
                        self.gemm(&a, signed, rows, k, packed, o, threads)?;
                    } else {
                        let img = &xb[n * img..(n + 1) * img];
                        self.op(packed).run_im2col(&g, img, signed, o, threads)?;
                    }
                }
                (vec![g.n, g.oh, g.ow, oc], out)
            }
            Kind::Depthwise { kh, kw, w, pack } => {
                let xd = dims4(x, "input")?;
                if xd[3] != oc {
                    return (self.fallback)(ctx, ins);
                }
                let g = Geo::new(ctx, xd, *kh, *kw)?;
                let mut out = crate::arena::take_bytes(g.n * g.oh * g.ow * oc);
                let img = g.ih * g.iw * g.ic;
                for (n, o) in out.chunks_exact_mut((g.oh * g.ow * oc).max(1)).enumerate() {
                    let p = Depthwise {
                        x: &xb[n * img..(n + 1) * img],
                        signed,
                        xz: self.xz,
                        ih: g.ih,
                        iw: g.iw,
                        c: oc,
                        oh: g.oh,
                        ow: g.ow,
                        kh: *kh,
                        kw: *kw,
                        sh: g.sh,
                        sw: g.sw,
                        dh: g.dh,
                        dw: g.dw,
                        pt: g.pt,
                        pl: g.pl,
                        w,
                        bias: &self.bias,
                        rq: &self.rq,
                        pack: pack.as_ref(),
                    };
                    run_depthwise(&p, threads, o)?;
                }
                (vec![g.n, g.oh, g.ow, oc], out)
            }
        };
        let mut t = crate::arena::bytes_tensor(self.out_dtype, shape, out)?;
        t.quant = Some(self.out_quant.clone());
        Ok(vec![t])
    }

    /// `out (rows x oc) = requant(a (rows x k) * W + bias)`, rows split across threads.
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
    fn op<'a>(&'a self, packed: &'a PackedB) -> QGemmOp<'a> {
        QGemmOp {
            xz: self.xz,
            packed,
            bias: &self.bias,
            rq: &self.rq,
            n: self.oc,
        }
    }
}

/// A depthwise layer's output rows split across threads (one below [`MIN_PARALLEL_MACS`]), as
/// the TFLite and the ONNX QDQ plans run it. Small maps with a packed layer (a 7x7's border is
/// half its pixels) run on a bordered copy ([`Depthwise::bordered`]), so every pixel takes the
/// packed kernel.
pub(crate) fn run_depthwise(p: &Depthwise<'_>, threads: usize, out: &mut [u8]) -> Result<()> {
    let row = p.ow * p.c;
    let t = if p.oh * row * p.kh * p.kw >= MIN_PARALLEL_MACS {
        threads
    } else {
        1
    };
    // Each thread copies the bordered rows its output rows read (the whole bordered image
    // was a serial copy before the split: most of a 14x14 or 7x7 layer's time at 2 threads).
    for_parts(t, p.oh, row, out, |r, part| {
        let bordered = p.pack.and_then(|_| p.bordered_rows(r.clone()));
        let ok = match &bordered {
            Some((x, ih, iw)) => {
                let sub = Depthwise {
                    x,
                    ih: *ih,
                    iw: *iw,
                    pt: 0,
                    pl: 0,
                    oh: r.len(),
                    ..*p
                };
                qconv::depthwise(&sub, 0..r.len(), part)
            }
            None => qconv::depthwise(p, r, part),
        };
        if ok {
            Ok(())
        } else {
            Err(edgehal_core::Error::arg(
                "depthwise convolution: operand sizes do not match",
            ))
        }
    })
}

/// One quantized GEMM with fused requantization, as the TFLite and the ONNX QDQ plans run it.
pub(crate) struct QGemmOp<'a> {
    /// The activations' zero point.
    pub xz: i32,
    pub packed: &'a PackedB,
    pub bias: &'a [i32],
    pub rq: &'a Requant,
    /// Output channels.
    pub n: usize,
}

impl QGemmOp<'_> {
    /// `out (rows x n) = requant(a (rows x k) * W + bias)`, rows split across threads in
    /// blocks of the kernel's tile rows (one thread below [`MIN_PARALLEL_MACS`]): blocks of 16
    /// split a 14x14 layer's 196 rows as 112 + 84 at two threads (14 tiles against 11), blocks
    /// of 8 as 104 + 92.
    pub(crate) fn run(
        &self,
        a: &[u8],
        signed: bool,
        rows: usize,
        k: usize,
        out: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        let block = self.packed.tile_rows().max(1);
        let n = self.n;
        let t = if rows * k * n >= MIN_PARALLEL_MACS {
            threads
        } else {
            1
        };
        // Few rows (a classifier head, a 7x7 layer's 49) split by rows leave threads idle or
        // uneven: split the columns instead, where the fused kernel can.
        if t > 1 && rows <= 64 && n >= 64 && self.run_by_columns(a, signed, rows, k, out, t) {
            return Ok(());
        }
        for_parts(t, rows.div_ceil(block), block * n, out, |r, part| {
            let r0 = r.start * block;
            let r1 = (r.end * block).min(rows);
            // Bytes past the last row's k, where `a` has them: the x86 VNNI tile reads each
            // row for k rounded up to 4 in place when that much is readable.
            let end = (r1 * k + (k.next_multiple_of(4) - k)).min(a.len());
            let rows = Rows {
                data: a.get(r0 * k..end.max(r1 * k)).unwrap_or_default(),
                signed,
                rows: r1 - r0,
                k,
                rs: k,
            };
            if qconv::qgemm_requant(rows, self.xz, self.packed, self.bias, self.rq, part, n) {
                Ok(())
            } else {
                Err(edgehal_core::Error::arg(
                    "quantized GEMM: operand sizes do not match",
                ))
            }
        })
    }
}

impl QGemmOp<'_> {
    /// [`QGemmOp::run`] with the output columns split across `threads` threads in whole
    /// 32-column panels, each part computed into its own buffer and copied into place.
    /// `false` (with `out` untouched) when the fused kernel does not take column ranges here
    /// ([`qconv::qgemm_requant_cols`]).
    fn run_by_columns(
        &self,
        a: &[u8],
        signed: bool,
        rows: usize,
        k: usize,
        out: &mut [u8],
        threads: usize,
    ) -> bool {
        let n = self.n;
        let panels = n.div_ceil(32);
        let per = panels.div_ceil(threads.clamp(1, panels));
        let ranges: Vec<std::ops::Range<usize>> = (0..panels)
            .step_by(per)
            .map(|p0| p0 * 32..((p0 + per) * 32).min(n))
            .collect();
        let mut bufs: Vec<Vec<u8>> = ranges.iter().map(|r| vec![0u8; rows * r.len()]).collect();
        let a_rows = Rows {
            data: a,
            signed,
            rows,
            k,
            rs: k,
        };
        let items: Vec<_> = ranges.iter().cloned().zip(bufs.iter_mut()).collect();
        let ran = crate::par::for_items(items, |_, (cols, buf)| {
            let w = cols.len();
            let (pb, bias, rq) = (self.packed, self.bias, self.rq);
            if qconv::qgemm_requant_cols(a_rows, self.xz, pb, bias, rq, cols, buf, w) {
                Ok(())
            } else {
                Err(())
            }
        });
        if ran.is_err() || out.len() < rows * n {
            return false;
        }
        for (cols, buf) in ranges.iter().zip(&bufs) {
            let w = cols.len();
            for (i, src) in buf.chunks_exact(w).enumerate() {
                out[i * n + cols.start..][..w].copy_from_slice(src);
            }
        }
        true
    }
}

/// One image's bytes for [`QGemmOp::run_in_place`].
pub(crate) enum InPlaceImage<'a> {
    Nhwc(&'a [u8]),
    /// Channel planes (ONNX's layout), copied into NHWC with the border.
    Nchw(&'a [u8]),
}

impl QGemmOp<'_> {
    /// A KxK convolution with A read from the image in place ([`qconv::ConvRows`]); `packed`
    /// holds the weights laid out by [`qconv::conv_rows_weights`]. The image is copied into a
    /// zero-point border first when a window leaves it, its last kernel row rounded up to 4
    /// bytes would read past the end, or it is NCHW; output pixels are split across threads
    /// in blocks of 16.
    pub(crate) fn run_in_place(
        &self,
        g: &Geo,
        img: InPlaceImage<'_>,
        signed: bool,
        out: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        const BLOCK: usize = 16;
        let (ic, n) = (g.ic, self.n);
        let seg_bytes = (g.kw * ic).next_multiple_of(4);
        // The image extent every window needs (rows from -pt, columns from -pl).
        let need_h = (g.oh.max(1) - 1) * g.sh + (g.kh.max(1) - 1) * g.dh + 1;
        let need_w = (g.ow.max(1) - 1) * g.sw + g.kw;
        let (ph, pw) = ((g.ih + g.pt).max(need_h), (g.iw + g.pl).max(need_w));
        let padded;
        let x: &[u8] = match img {
            InPlaceImage::Nhwc(x)
                if g.pt == 0
                    && g.pl == 0
                    && ph == g.ih
                    && pw == g.iw
                    && ((need_h - 1) * g.iw + need_w - g.kw) * ic + seg_bytes <= x.len() =>
            {
                x
            }
            img => {
                let mut p = vec![self.xz as u8; ph * pw * ic + 4];
                let at = |y: usize, x: usize| ((y + g.pt) * pw + g.pl + x) * ic;
                match img {
                    InPlaceImage::Nhwc(x) => {
                        let row = g.iw * ic;
                        for (y, src) in x.chunks_exact(row.max(1)).take(g.ih).enumerate() {
                            p[at(y, 0)..at(y, 0) + row].copy_from_slice(src);
                        }
                    }
                    InPlaceImage::Nchw(x) => {
                        let plane = g.ih * g.iw;
                        for (c, src) in x.chunks_exact(plane.max(1)).take(ic).enumerate() {
                            for (y, line) in src.chunks_exact(g.iw.max(1)).enumerate() {
                                let d = &mut p[at(y, 0) + c..];
                                for (xi, &v) in line.iter().enumerate() {
                                    d[xi * ic] = v;
                                }
                            }
                        }
                    }
                }
                padded = p;
                &padded
            }
        };
        let cr = qconv::ConvRows {
            x,
            signed,
            ow: g.ow,
            line_step: g.sh * pw * ic,
            col_step: g.sw * ic,
            kh: g.kh,
            seg_step: g.dh * pw * ic,
            seg_bytes,
        };
        let rows = g.oh * g.ow;
        let t = if rows * g.kh * g.kw * ic * n >= MIN_PARALLEL_MACS {
            threads
        } else {
            1
        };
        let (pb, bias, rq, za) = (self.packed, self.bias, self.rq, self.xz);
        for_parts(t, rows.div_ceil(BLOCK), BLOCK * n, out, |r, part| {
            let (r0, r1) = (r.start * BLOCK, (r.end * BLOCK).min(rows));
            if qconv::qgemm_conv_rows(&cr, r0, r1 - r0, za, pb, bias, rq, part, n) {
                Ok(())
            } else {
                Err(edgehal_core::Error::arg(
                    "quantized convolution: operand sizes do not match",
                ))
            }
        })
    }
}

impl QGemmOp<'_> {
    /// A KxK convolution of one NHWC image as [`QGemmOp::run`] with the im2col done inside
    /// each thread's part (see [`QGemmOp::run_patches`]).
    pub(crate) fn run_im2col(
        &self,
        g: &Geo,
        img: &[u8],
        signed: bool,
        out: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        let rows = g.oh * g.ow;
        self.run_patches(rows, signed, out, threads, |pixels, rs, buf| {
            g.im2col_rows(img, pixels, rs, buf)
        })
    }

    /// `out (rows x n) = requant(A * W + bias)` where `patches(rows, rs, buf)` writes rows
    /// `rows` of A into `buf` (row `r` at `(r - rows.start) * rs`; `buf` holds the zero point's
    /// byte beforehand, for padding and slack). Each thread's part builds [`IM2COL_ROWS`] rows
    /// at a time: the copy runs on every thread instead of before them, and the rows are in
    /// cache when the GEMM reads them. Rows are padded to a multiple of 4 bytes (zero weights
    /// meet the slack), so the x86 VNNI tile reads them in place even when the depth is not
    /// (a 3x3 conv of an RGB image: 27).
    pub(crate) fn run_patches(
        &self,
        rows: usize,
        signed: bool,
        out: &mut [u8],
        threads: usize,
        patches: impl Fn(std::ops::Range<usize>, usize, &mut [u8]) + Sync,
    ) -> Result<()> {
        const BLOCK: usize = 16;
        let (n, k) = (self.n, self.packed.k());
        let rs = k.next_multiple_of(4);
        let t = if rows * k * n >= MIN_PARALLEL_MACS {
            threads
        } else {
            1
        };
        let fill = self.xz as u8;
        for_parts(t, rows.div_ceil(BLOCK), BLOCK * n, out, |r, part| {
            let (r0, r1) = (r.start * BLOCK, (r.end * BLOCK).min(rows));
            let mut buf = vec![fill; IM2COL_ROWS.min(r1 - r0) * rs];
            for (c, o) in (r0..r1)
                .step_by(IM2COL_ROWS)
                .zip(part.chunks_mut(IM2COL_ROWS * n))
            {
                let h = IM2COL_ROWS.min(r1 - c);
                let buf = &mut buf[..h * rs];
                buf.fill(fill);
                patches(c..c + h, rs, buf);
                let a = Rows {
                    data: buf,
                    signed,
                    rows: h,
                    k,
                    rs,
                };
                if !qconv::qgemm_requant(a, self.xz, self.packed, self.bias, self.rq, o, n) {
                    return Err(edgehal_core::Error::arg(
                        "quantized GEMM: operand sizes do not match",
                    ));
                }
            }
            Ok(())
        })
    }
}

/// Output pixels per im2col chunk of [`QGemmOp::run_patches`] (a multiple of the GEMM tile's
/// 8 rows; 256 pixels of a 3x3x16 conv are 37 KiB).
const IM2COL_ROWS: usize = 256;

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

    /// A graph with one quantized layer: x (8-bit, `xs`) and constant w, b.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        op: &str,
        dt: DType,
        xs: &[usize],
        w: Tensor,
        b: Tensor,
        oc: usize,
        attrs: &[(&str, Attr)],
        r: &mut Rng,
    ) -> (Graph, Node) {
        let mut g = Graph::new("q");
        let (x, wv, bv, y) = (
            g.value_id("x"),
            g.value_id("w"),
            g.value_id("b"),
            g.value_id("y"),
        );
        g.values[x] = ValueInfo {
            name: "x".into(),
            dtype: Some(dt),
            shape: None,
        };
        g.initializers.insert(wv, w);
        g.initializers.insert(bv, b);
        g.inputs = vec![x];
        g.outputs = vec![y];
        let _ = xs;
        let mut node = Node {
            op: op.into(),
            domain: DOMAIN.into(),
            inputs: vec![Some(x), Some(wv), Some(bv)],
            outputs: vec![Some(y)],
            ..Default::default()
        };
        let (zlo, zhi) = if dt == DType::I8 {
            (-20, 20)
        } else {
            (100, 150)
        };
        let z = |r: &mut Rng| (zlo + (r.next() % (zhi - zlo) as u32) as i32) as i64;
        let a = &mut node.attrs;
        a.insert("in0_scale".into(), Attr::Floats(vec![0.02]));
        a.insert("in0_zp".into(), Attr::Ints(vec![z(r)]));
        let ws: Vec<f32> = (0..oc)
            .map(|_| 0.001 + (r.next() % 1000) as f32 * 1e-5)
            .collect();
        a.insert("in1_scale".into(), Attr::Floats(ws));
        a.insert("in1_zp".into(), Attr::Ints(vec![0; oc]));
        a.insert("out0_scale".into(), Attr::Floats(vec![0.05]));
        a.insert("out0_zp".into(), Attr::Ints(vec![z(r)]));
        for (k, v) in attrs {
            a.insert((*k).into(), v.clone());
        }
        g.nodes.push(node.clone());
        (g, node)
    }

    fn s(v: &str) -> Attr {
        Attr::String(v.as_bytes().to_vec())
    }

    /// The plan gives the op function's bytes (the reference semantics) at 1 and 3 threads.
    #[test]
    fn plans_match_the_op_functions() {
        let mut r = Rng(21);
        type Case<'a> = (&'a str, Vec<usize>, Vec<usize>, Vec<(&'a str, Attr)>);
        let cases: Vec<Case<'_>> = vec![
            // (op, x shape, w shape, attrs)
            ("Conv2D", vec![1, 9, 11, 24], vec![40, 1, 1, 24], vec![]),
            // A gray image (whole-image im2col, depth 9 read in place as 12).
            (
                "Conv2D",
                vec![1, 40, 37, 1],
                vec![8, 3, 3, 1],
                vec![("padding", s("SAME"))],
            ),
            (
                "Conv2D",
                vec![2, 13, 12, 3],
                vec![32, 3, 3, 3],
                vec![
                    ("padding", s("SAME")),
                    ("stride_h", Attr::Int(2)),
                    ("stride_w", Attr::Int(2)),
                    ("fused_activation_function", s("RELU6")),
                ],
            ),
            (
                "Conv2D",
                vec![1, 40, 40, 8],
                vec![16, 3, 3, 8],
                vec![
                    ("padding", s("SAME")),
                    ("fused_activation_function", s("RELU")),
                ],
            ),
            ("FullyConnected", vec![3, 70], vec![10, 70], vec![]),
            // Few rows, many columns: split by columns across threads (a classifier head,
            // a 7x7 layer).
            ("FullyConnected", vec![2, 1280], vec![200, 1280], vec![]),
            ("Conv2D", vec![1, 7, 7, 64], vec![96, 1, 1, 64], vec![]),
            (
                "DepthwiseConv2D",
                vec![1, 21, 19, 48],
                vec![1, 3, 3, 48],
                vec![
                    ("padding", s("SAME")),
                    ("fused_activation_function", s("RELU6")),
                ],
            ),
            (
                "DepthwiseConv2D",
                vec![2, 60, 60, 72],
                vec![1, 3, 3, 72],
                vec![
                    ("padding", s("SAME")),
                    ("stride_h", Attr::Int(2)),
                    ("stride_w", Attr::Int(2)),
                ],
            ),
        ];
        let mut differing = 0;
        for dt in [DType::I8, DType::U8] {
            for (op, xs, wsh, attrs) in &cases {
                let oc = if *op == "DepthwiseConv2D" {
                    wsh[3]
                } else {
                    wsh[0]
                };
                let wn: usize = wsh.iter().product();
                let w: Vec<i8> = r
                    .bytes(wn)
                    .into_iter()
                    .map(|b| (b as i8).max(-127))
                    .collect();
                let w = Tensor::from_vec(wsh.clone(), w).unwrap();
                let b: Vec<i32> = (0..oc).map(|_| (r.next() % 4000) as i32 - 2000).collect();
                let b = Tensor::from_vec(vec![oc], b).unwrap();
                let (g, node) = layer(op, dt, xs, w.clone(), b.clone(), oc, attrs, &mut r);
                let xn: usize = xs.iter().product();
                let x = Tensor::from_vec_dtype(dt, xs.clone(), r.bytes(xn)).unwrap();
                let ins = [Some(&x), Some(&w), Some(&b)];
                let mut by_rounding = Vec::new();
                for rounding in ["reference", "float"] {
                    let mut node = node.clone();
                    node.attrs.insert(
                        crate::ROUNDING_ATTR.to_string(),
                        Attr::String(rounding.as_bytes().to_vec()),
                    );
                    let plan = QConvPlan::prepare(&g, &node).expect("a plan");
                    let ctx = OpCtx {
                        node: &node,
                        opset: 1,
                        subgraph: None,
                        dest: None,
                    };
                    let want = (plan.fallback)(&ctx, &ins).unwrap();
                    for threads in [1, 3] {
                        let got = plan.run(&ctx, &ins, threads).unwrap();
                        assert_eq!(got[0].shape(), want[0].shape(), "{op}");
                        assert_eq!(got[0].dtype(), want[0].dtype(), "{op}");
                        assert_eq!(
                            &got[0].bytes()[..],
                            &want[0].bytes()[..],
                            "{op} {dt} {xs:?} threads {threads} {rounding}"
                        );
                        assert_eq!(got[0].quant, want[0].quant);
                    }
                    by_rounding.push(want[0].bytes().to_vec());
                }
                // The two roundings are within one step of each other and not identical.
                let (fixed, float) = (&by_rounding[0], &by_rounding[1]);
                let wide = |v: u8| {
                    if dt == DType::I8 {
                        v as i8 as i32
                    } else {
                        v as i32
                    }
                };
                assert!(
                    fixed
                        .iter()
                        .zip(float)
                        .all(|(&a, &b)| (wide(a) - wide(b)).abs() <= 1),
                    "{op} {dt}: roundings more than one step apart"
                );
                differing += fixed.iter().zip(float).filter(|(a, b)| a != b).count();
            }
        }
        assert!(differing > 0, "the rounding attribute changed nothing");
    }
}
