//! Float convolutions on NHWC activations: the op [`FUSED_CONV_NHWC`] (domain `edgehal`) and
//! its prepared plan.
//!
//! The graph pass `float_convs_to_nhwc` (hal's `passes_nhwc.rs`) rewrites chains of float
//! `Conv` / `FusedConv` nodes of a MobileNet shape — a small-channel 3x3 first layer reading
//! the NCHW input, then depthwise 3x3 and 1x1 convolutions — into this op, so the chain runs
//! on NHWC values with transposes only at its ends. The node keeps `FusedConv`'s inputs
//! (`x, W (OIHW), B, residual`) and attributes (`strides`, `pads`, `group`, `activation`...);
//! `x`, the residual and the result are NHWC, except that with [`INPUT_NCHW`] `x` is NCHW.
//!
//! The op function [`fused_conv_nhwc`] (transpose to NCHW, the reference `FusedConv`, transpose
//! back) defines the semantics; a [`NhwcConvPlan`] built once per node runs the NHWC kernels
//! of `edgehal_kernels::nhwc` — a 1x1 GEMM over the image in place, a depthwise 3x3 across
//! channels, a direct small-channel first layer — split across threads by pixels or rows.

use edgehal_core::graph::Graph;
use edgehal_core::{DType, Error, Node, Result, Tensor};
use edgehal_kernels::dispatch;
use edgehal_kernels::nhwc::{self, DenseSmallC, DwNhwc, PackedCols, Pointwise};
use edgehal_kernels::packed::Activation;

use crate::conv_plan::{activation_of, ConvPlan, FUSED_DOMAIN};
use crate::exec::const_input;
use crate::ops::nn::{ftensor, fvec, geom, take_f32};
use crate::ops::{input, opt_input, OpCtx, Registry};
use crate::par::{for_items, for_parts};
pub use crate::qdq_plan::INPUT_NCHW;

/// Whether a 1x1 layer on several threads splits its output channels rather than its pixels:
/// when its weights (`k * m` floats) outweigh its input (`pixels * k`), i.e. `m > pixels`,
/// and the 32-channel panels divide evenly enough (a 7x7 map's 160 -> 960 layer: each thread
/// streams half the weights over whole 7-row tiles instead of all of them over 24 or 25
/// pixels). Projections to 160 channels (5 panels) stay split by pixels.
fn by_channels(pixels: usize, m: usize, threads: usize) -> bool {
    let panels = m.div_ceil(32);
    m > pixels && (panels.is_multiple_of(threads) || panels >= 4 * threads)
}

/// The op type of the NHWC float convolution (domain `edgehal`).
pub const FUSED_CONV_NHWC: &str = "FusedConvNhwc";

/// Most input channels of the first-layer kernel ([`NhwcConvPlan`]'s small-channel path).
pub const NCHW_IN_MAX_C: usize = 4;

/// Whether the graph pass may rewrite float convolutions to NHWC: `EDGEHAL_NHWC=0` never,
/// `1` always, otherwise (the default) when the float kernels run on AVX-512, where the NHWC
/// 1x1 tile is measured faster than the NCHW packed GEMM (elsewhere the NHWC kernels are the
/// portable loops).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("EDGEHAL_NHWC").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => dispatch::selected() == dispatch::Variant::Avx512,
    })
}

/// The op type of global average pooling over an NHWC value (domain `edgehal`): the mean of
/// each channel of `x` (`[n, h, w, c]`), as `[n, c, 1, 1]` (`keepdims`, the default, as
/// `GlobalAveragePool` or `ReduceMean` over H, W of the NCHW value give) or `[n, c]`.
pub const GAP_NHWC: &str = "GlobalAveragePoolNhwc";

/// The op type of a 1x1 [`FUSED_CONV_NHWC`] feeding a depthwise one (domain `edgehal`): inputs
/// `x, W_1x1, B_1x1, W_dw, B_dw`; the depthwise node's attributes as they are and the 1x1
/// node's with the prefix [`PW_PREFIX`]. It computes the two nodes in turn ([`pw_dw_nhwc`]);
/// its plan ([`PwDwPlan`]) produces the 1x1 output a few rows at a time, just before the
/// depthwise rows that read them, so the expanded tensor (a MobileNet block's largest) never
/// leaves the cache.
pub const PW_DW_NHWC: &str = "PointwiseDepthwiseNhwc";

/// Prefix of the 1x1 node's attributes in a [`PW_DW_NHWC`] node.
pub const PW_PREFIX: &str = "pw_";

/// Whether the NHWC pass fuses 1x1 -> depthwise pairs into [`PW_DW_NHWC`]
/// (`EDGEHAL_NHWC_FUSE=0` turns it off, for comparisons).
pub fn pw_dw_fusion_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGEHAL_NHWC_FUSE").map_or(true, |v| v != "0"))
}

pub(crate) fn register(r: &mut Registry) {
    r.add_domain(FUSED_DOMAIN, FUSED_CONV_NHWC, fused_conv_nhwc);
    r.add_domain(FUSED_DOMAIN, GAP_NHWC, global_average_pool_nhwc);
    r.add_domain(FUSED_DOMAIN, PW_DW_NHWC, pw_dw_nhwc);
}

/// The 1x1 and the depthwise [`FUSED_CONV_NHWC`] nodes a [`PW_DW_NHWC`] node stands for (the
/// depthwise node's input 0 is left absent: it is the 1x1 node's output).
fn split_pw_dw(node: &Node) -> (Node, Node) {
    let part = |inputs: Vec<Option<usize>>| Node {
        op: FUSED_CONV_NHWC.into(),
        domain: FUSED_DOMAIN.into(),
        name: node.name.clone(),
        inputs,
        outputs: node.outputs.clone(),
        ..Default::default()
    };
    let at = |k: usize| node.inputs.get(k).copied().flatten();
    let mut pw = part(vec![at(0), at(1), at(2)]);
    let mut dw = part(vec![None, at(3), at(4)]);
    for (k, v) in &node.attrs {
        match k.strip_prefix(PW_PREFIX) {
            Some(rest) => pw.attrs.insert(rest.to_string(), v.clone()),
            None => dw.attrs.insert(k.clone(), v.clone()),
        };
    }
    (pw, dw)
}

/// The reference semantics of [`PW_DW_NHWC`]: the 1x1 node, then the depthwise node on its
/// result.
pub fn pw_dw_nhwc(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let (pw, dw) = split_pw_dw(ctx.node);
    let at = |k: usize| ins.get(k).copied().flatten();
    let c1 = OpCtx {
        node: &pw,
        dest: None,
        ..*ctx
    };
    let e = fused_conv_nhwc(&c1, &[at(0), at(1), at(2)])?;
    let c2 = OpCtx {
        node: &dw,
        dest: None,
        ..*ctx
    };
    fused_conv_nhwc(&c2, &[e.first(), at(3), at(4)])
}

/// [`GAP_NHWC`]: per image, the pixels' channel vectors summed in f64 and divided by h * w.
pub fn global_average_pool_nhwc(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let &[n, h, w, c] = x.shape() else {
        return Err(Error::arg(format!(
            "{GAP_NHWC}: expected a 4-d input, got shape {:?}",
            x.shape()
        )));
    };
    let xv = fvec(x, GAP_NHWC)?;
    let threads = crate::arena::threads();
    let out = if n == 1 && threads > 1 && h * w * c >= GAP_PARALLEL_MIN && xv.len() >= h * w * c {
        // One image on several threads, by channel ranges (what else runs between the last
        // convolution and the classifier is serial).
        let mut out = take_f32(c)?;
        for_parts(threads, c.div_ceil(16), 16, &mut out, |u, o| {
            gap_channels(&xv, h * w, c, u.start * 16..(u.end * 16).min(c), o);
            Ok::<(), Error>(())
        })?;
        out
    } else {
        gap_nhwc(&xv, n, h * w, c)
    };
    let shape = if ctx.i("keepdims", 1) != 0 {
        vec![n, c, 1, 1]
    } else {
        vec![n, c]
    };
    Ok(vec![ftensor(x.dtype(), shape, out)?])
}

/// Elements of an image below which [`global_average_pool_nhwc`] stays on one thread.
const GAP_PARALLEL_MIN: usize = 1 << 15;

/// The per-channel means of `n` NHWC images of `hw` pixels and `c` channels (zeros for images
/// `xv` is too short for).
fn gap_nhwc(xv: &[f32], n: usize, hw: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * c];
    for (img, o) in xv
        .chunks_exact((hw * c).max(1))
        .zip(out.chunks_exact_mut(c.max(1)))
    {
        gap_channels(img, hw, c, 0..c, o);
    }
    out
}

/// The means of channels `chs` of one NHWC image into `out` (`chs.len()` values). Runs of 8
/// pixels summed in f32 (vectorized four or more lanes wide), the runs in f64: summing every
/// pixel in f64 (two lanes) took 11.6 us on MobileNetV2's 7x7x1280 map; a run's f32 sum is
/// within 8 roundings of its exact value. Each channel's sum is the same at any split.
fn gap_channels(img: &[f32], hw: usize, c: usize, chs: std::ops::Range<usize>, out: &mut [f32]) {
    let w = chs.len();
    let mut acc = vec![0f64; w];
    let mut run = vec![0f32; w];
    for p0 in (0..hw).step_by(8) {
        run.fill(0.0);
        for px in p0..(p0 + 8).min(hw) {
            let row = &img[px * c + chs.start..px * c + chs.end];
            for (r, &v) in run.iter_mut().zip(row) {
                *r += v;
            }
        }
        for (a, &r) in acc.iter_mut().zip(&run) {
            *a += f64::from(r);
        }
    }
    for (o, &a) in out.iter_mut().zip(&acc) {
        *o = (a / hw.max(1) as f64) as f32;
    }
}

/// `t` (4-d f32) with its axes permuted NHWC -> NCHW (`to_nchw`) or NCHW -> NHWC.
fn permuted(t: &Tensor, to_nchw: bool) -> Result<Tensor> {
    let &[n, a, b, c] = t.shape() else {
        return Err(Error::arg(format!(
            "{FUSED_CONV_NHWC}: expected a 4-d tensor, got shape {:?}",
            t.shape()
        )));
    };
    let v = fvec(t, FUSED_CONV_NHWC)?;
    // NHWC [n, a=h, b=w, c] is per image a [h*w, c] matrix; NCHW [n, a=c, b=h, c=w] a [c, h*w].
    let (rows, cols, shape) = if to_nchw {
        (a * b, c, vec![n, c, a, b])
    } else {
        (a, b * c, vec![n, b, c, a])
    };
    let per = rows * cols;
    let mut out = Vec::with_capacity(v.len());
    for img in v.chunks_exact(per.max(1)).take(n) {
        out.extend(crate::ops::shape::transpose_2d(img, rows, cols));
    }
    ftensor(t.dtype(), shape, out)
}

/// The reference semantics: `FusedConv` on the NCHW views of `x` (unless [`INPUT_NCHW`]) and
/// the residual, the result in NHWC.
pub fn fused_conv_nhwc(ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ins, 0)?;
    let mut owned: Vec<Option<Tensor>> = ins.iter().map(|t| t.cloned()).collect();
    if ctx.i(INPUT_NCHW, 0) == 0 {
        owned[0] = Some(permuted(x, true)?);
    }
    if let Some(z) = opt_input(ins, 3) {
        owned[3] = Some(permuted(z, true)?);
    }
    let refs: Vec<Option<&Tensor>> = owned.iter().map(Option::as_ref).collect();
    let y = ConvPlan::from_inputs(ctx.node, &refs)?.run(ctx, &refs)?;
    let y = y
        .first()
        .ok_or_else(|| Error::arg("FusedConvNhwc: no output"))?;
    Ok(vec![permuted(y, false)?])
}

enum Kind {
    /// 1x1, stride 1, no padding, one group.
    Pointwise(PackedCols),
    /// Depthwise 3x3 (stride 1 or 2), weights blocked `[c / 16][9][16]`.
    Depthwise(edgehal_kernels::aligned::AlignedVec),
    /// One group, at most [`NCHW_IN_MAX_C`] input channels (NCHW with [`INPUT_NCHW`], else
    /// NHWC), weights `[c][kh][kw][m]`.
    DenseSmallC(Vec<f32>),
}

/// A [`FUSED_CONV_NHWC`] node with its weights laid out once for its kernel.
pub struct NhwcConvPlan {
    kind: Kind,
    /// Output channels, input channels, kernel.
    m: usize,
    c: usize,
    kernel: [usize; 2],
    bias: Option<Vec<f32>>,
    act: Activation,
}

impl NhwcConvPlan {
    /// The plan of `node` when it is a [`FUSED_CONV_NHWC`] with constant f32 weights (and bias)
    /// of a shape a kernel here covers; `None` otherwise (the op function runs).
    pub fn prepare(graph: &Graph, node: &Node) -> Option<NhwcConvPlan> {
        if node.op != FUSED_CONV_NHWC || node.domain != FUSED_DOMAIN {
            return None;
        }
        let w = const_input(graph, node, 1)??;
        let b = const_input(graph, node, 2)?;
        if w.dtype() != DType::F32 || b.is_some_and(|b| b.dtype() != DType::F32) {
            return None;
        }
        let &[m, cg, kh, kw] = w.shape() else {
            return None;
        };
        let wv = fvec(w, "W").ok()?;
        let bias = match b {
            Some(b) => {
                let v = fvec(b, "B").ok()?.into_owned();
                Some((v.len() == m).then_some(v)?)
            }
            None => None,
        };
        let ints = |name: &str, d: i64| -> Vec<i64> {
            node.attr_ints(name)
                .filter(|v| !v.is_empty())
                .map_or_else(|| vec![d; 2], <[i64]>::to_vec)
        };
        let (strides, dil) = (ints("strides", 1), ints("dilations", 1));
        let pads = node
            .attr_ints("pads")
            .filter(|v| !v.is_empty())
            .map_or_else(|| vec![0; 4], <[i64]>::to_vec);
        let auto = node.attr_s("auto_pad").unwrap_or_default();
        if dil != [1, 1] || !(auto.is_empty() || auto == "NOTSET") || pads.len() != 4 {
            return None;
        }
        let group = node.attr_i("group").unwrap_or(1);
        let nchw_in = node.attr_i(INPUT_NCHW).unwrap_or(0) != 0;
        let kind = if nchw_in || (group == 1 && cg <= NCHW_IN_MAX_C && [kh, kw] != [1, 1]) {
            if group != 1 || cg > NCHW_IN_MAX_C {
                return None;
            }
            Kind::DenseSmallC(nhwc::dense_weights_tap_major(&wv, m, cg * kh * kw)?)
        } else if [kh, kw] == [1, 1] && group == 1 && strides == [1, 1] && pads == [0; 4] {
            Kind::Pointwise(PackedCols::new(&wv, m, cg)?)
        } else if [kh, kw] == [3, 3]
            && cg == 1
            && group == m as i64
            && strides.len() == 2
            && strides[0] == strides[1]
            && (strides[0] == 1 || strides[0] == 2)
        {
            Kind::Depthwise(nhwc::dw_weights_blocked(&wv, m)?)
        } else {
            return None;
        };
        let c = if group == 1 { cg } else { m };
        Some(NhwcConvPlan {
            kind,
            m,
            c,
            kernel: [kh, kw],
            bias,
            act: activation_of(node).ok()?,
        })
    }

    /// Runs the node on `threads` threads (pixels or output rows split between them).
    pub fn run(
        &self,
        ctx: &OpCtx<'_>,
        ins: &[Option<&Tensor>],
        threads: usize,
    ) -> Result<Vec<Tensor>> {
        let x = input(ins, 0)?;
        if x.dtype() != DType::F32 {
            return fused_conv_nhwc(ctx, ins);
        }
        let nchw_in = matches!(self.kind, Kind::DenseSmallC(_)) && ctx.i(INPUT_NCHW, 0) != 0;
        let &[n, a, b, cc] = x.shape() else {
            return Err(Error::arg(format!(
                "{FUSED_CONV_NHWC}: X has shape {:?}, expected 4-d",
                x.shape()
            )));
        };
        let (c, h, w) = if nchw_in { (a, b, cc) } else { (cc, a, b) };
        if c != self.c {
            return Err(Error::arg(format!(
                "{FUSED_CONV_NHWC}: X has {c} channels, W expects {}",
                self.c
            )));
        }
        let g = geom(ctx, &[h, w], &self.kernel, false)?;
        let (oh, ow) = (g.out[0], g.out[1]);
        let m = self.m;
        let shape = vec![n, oh, ow, m];
        let img_out = oh * ow * m;
        let total = n * img_out;
        let residual = match opt_input(ins, 3) {
            Some(z) => {
                if z.shape() != shape.as_slice() {
                    return Err(Error::arg(format!(
                        "{FUSED_CONV_NHWC}: residual has shape {:?}, output is {shape:?}",
                        z.shape()
                    )));
                }
                Some(fvec(z, "FusedConvNhwc residual")?)
            }
            None => None,
        };
        let xv = fvec(x, "FusedConvNhwc X")?;
        let img_in = c * h * w;
        if xv.len() != n * img_in {
            return Err(Error::arg(
                "FusedConvNhwc: X has the wrong number of elements",
            ));
        }
        let mut out = take_f32(total)?;
        let variant = dispatch::selected();
        let bias = self.bias.as_deref();
        let bad = || Error::arg("FusedConvNhwc: internal size mismatch");
        match &self.kind {
            Kind::Pointwise(pw) => {
                let pixels = n * h * w;
                let res = residual.as_deref();
                let whole = Pointwise {
                    x: &xv,
                    pixels,
                    w: pw,
                    bias,
                    residual: res,
                    act: self.act,
                };
                let split = threads > 1 && by_channels(pixels, m, threads);
                let parts = split
                    .then(|| nhwc::pointwise_by_channels(variant, &whole, &mut out, threads))
                    .flatten();
                if let Some(parts) = parts {
                    for_items(parts, |_, part| {
                        part.run();
                        Ok::<(), Error>(())
                    })?;
                } else {
                    for_parts(threads, pixels, m, &mut out, |px, y| {
                        let p = Pointwise {
                            x: &xv[px.start * c..px.end * c],
                            pixels: px.len(),
                            w: pw,
                            bias,
                            residual: res.map(|r| &r[px.start * m..px.end * m]),
                            act: self.act,
                        };
                        nhwc::pointwise(variant, &p, y)
                            .then_some(())
                            .ok_or_else(bad)
                    })?;
                }
            }
            Kind::Depthwise(tw) => {
                for bi in 0..n {
                    let p = DwNhwc {
                        x: &xv[bi * img_in..(bi + 1) * img_in],
                        h,
                        w,
                        c,
                        stride: g.s[0],
                        pad_top: g.pb[0],
                        pad_left: g.pb[1],
                        out_h: oh,
                        out_w: ow,
                        weight: tw,
                        bias,
                        residual: residual
                            .as_deref()
                            .map(|r| &r[bi * img_out..(bi + 1) * img_out]),
                        act: self.act,
                    };
                    let y = &mut out[bi * img_out..(bi + 1) * img_out];
                    for_parts(threads, oh, ow * m, y, |rows, y| {
                        nhwc::depthwise3x3_nhwc(variant, &p, rows, y)
                            .then_some(())
                            .ok_or_else(bad)
                    })?;
                }
            }
            Kind::DenseSmallC(tw) => {
                if residual.is_some() {
                    return fused_conv_nhwc(ctx, ins);
                }
                for bi in 0..n {
                    let p = DenseSmallC {
                        x: &xv[bi * img_in..(bi + 1) * img_in],
                        input_nhwc: !nchw_in,
                        c,
                        h,
                        w,
                        kh: self.kernel[0],
                        kw: self.kernel[1],
                        stride: [g.s[0], g.s[1]],
                        pad: [g.pb[0], g.pb[1]],
                        out_h: oh,
                        out_w: ow,
                        m,
                        weight: tw,
                        bias,
                        act: self.act,
                    };
                    let y = &mut out[bi * img_out..(bi + 1) * img_out];
                    for_parts(threads, oh, ow * m, y, |rows, y| {
                        nhwc::dense_small_c(variant, &p, rows, y)
                            .then_some(())
                            .ok_or_else(bad)
                    })?;
                }
            }
        }
        Ok(vec![ftensor(DType::F32, shape, out)?])
    }
}

/// A [`PW_DW_NHWC`] node with both layers' weights prepared.
pub struct PwDwPlan {
    pw: NhwcConvPlan,
    dw: NhwcConvPlan,
    dw_node: Node,
}

thread_local! {
    /// [`PwDwPlan::run`]'s three-row ring of 1x1 outputs, reused across calls on one thread.
    static RING: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl PwDwPlan {
    /// The plan of `node` when it is a [`PW_DW_NHWC`] whose halves get a 1x1 and a depthwise
    /// [`NhwcConvPlan`] of matching channels; `None` otherwise (the op function runs).
    pub fn prepare(graph: &Graph, node: &Node) -> Option<PwDwPlan> {
        if node.op != PW_DW_NHWC || node.domain != FUSED_DOMAIN {
            return None;
        }
        let (pw_node, dw_node) = split_pw_dw(node);
        let pw = NhwcConvPlan::prepare(graph, &pw_node)?;
        let dw = NhwcConvPlan::prepare(graph, &dw_node)?;
        let ok = matches!(pw.kind, Kind::Pointwise(_))
            && matches!(dw.kind, Kind::Depthwise(_))
            && dw.c == pw.m;
        ok.then_some(PwDwPlan { pw, dw, dw_node })
    }

    /// Runs the pair: output rows split across threads; each thread keeps the three 1x1 output
    /// rows its current depthwise row reads (rows shared by two threads are computed by both).
    pub fn run(
        &self,
        ctx: &OpCtx<'_>,
        ins: &[Option<&Tensor>],
        threads: usize,
    ) -> Result<Vec<Tensor>> {
        let x = input(ins, 0)?;
        let (Kind::Pointwise(pw), Kind::Depthwise(tw)) = (&self.pw.kind, &self.dw.kind) else {
            return pw_dw_nhwc(ctx, ins);
        };
        let &[n, h, w, k] = x.shape() else {
            return Err(Error::arg(format!(
                "{PW_DW_NHWC}: X has shape {:?}, expected 4-d NHWC",
                x.shape()
            )));
        };
        if x.dtype() != DType::F32 {
            return pw_dw_nhwc(ctx, ins);
        }
        if k != self.pw.c {
            return Err(Error::arg(format!(
                "{PW_DW_NHWC}: X has {k} channels, W expects {}",
                self.pw.c
            )));
        }
        let m = self.pw.m;
        let dctx = OpCtx {
            node: &self.dw_node,
            dest: None,
            ..*ctx
        };
        let g = geom(&dctx, &[h, w], &[3, 3], false)?;
        let (oh, ow, s) = (g.out[0], g.out[1], g.s[0]);
        let xv = fvec(x, "PointwiseDepthwiseNhwc X")?;
        if xv.len() != n * h * w * k {
            return Err(Error::arg(format!(
                "{PW_DW_NHWC}: X has the wrong number of elements"
            )));
        }
        let img_out = oh * ow * m;
        let mut out = take_f32(n * img_out)?;
        let variant = dispatch::selected();
        let bad = || Error::arg("PointwiseDepthwiseNhwc: internal size mismatch");
        let dw = DwNhwc {
            x: &[],
            h: 0,
            w,
            c: m,
            stride: s,
            pad_top: 0,
            pad_left: g.pb[1],
            out_h: 0,
            out_w: ow,
            weight: tw,
            bias: self.dw.bias.as_deref(),
            residual: None,
            act: self.dw.act,
        };
        let (row_in, row_e) = (w * k, w * m);
        for (bi, y) in out.chunks_exact_mut(img_out.max(1)).enumerate().take(n) {
            let ximg = &xv[bi * h * row_in..(bi + 1) * h * row_in];
            for_parts(threads, oh, ow * m, y, |rows, y| {
                // Each thread's ring is kept between calls (a fresh zeroed 3-row buffer per
                // call and thread was a memset plus page faults on every layer); a slot is
                // read only after its row was computed into it (`held`).
                RING.with(|cell| {
                    let mut ring = cell.borrow_mut();
                    if ring.len() < 3 * row_e {
                        ring.resize(3 * row_e, 0.0);
                    }
                    let mut held = [usize::MAX; 3];
                    for oy in rows.clone() {
                        let mut need = [None; 3];
                        for (ty, slot_of) in need.iter_mut().enumerate() {
                            let iy = (oy * s + ty) as isize - g.pb[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let iy = iy as usize;
                            let slot = iy % 3;
                            if held[slot] != iy {
                                let p = Pointwise {
                                    x: &ximg[iy * row_in..(iy + 1) * row_in],
                                    pixels: w,
                                    w: pw,
                                    bias: self.pw.bias.as_deref(),
                                    residual: None,
                                    act: self.pw.act,
                                };
                                let dst = &mut ring[slot * row_e..(slot + 1) * row_e];
                                if !nhwc::pointwise(variant, &p, dst) {
                                    return Err(bad());
                                }
                                held[slot] = iy;
                            }
                            *slot_of = Some(slot);
                        }
                        let in_rows = need.map(|s| s.map(|s| &ring[s * row_e..(s + 1) * row_e]));
                        let o = (oy - rows.start) * ow * m;
                        let yr = &mut y[o..o + ow * m];
                        if !nhwc::depthwise3x3_nhwc_row(variant, &dw, in_rows, yr) {
                            return Err(bad());
                        }
                    }
                    Ok(())
                })
            })?;
        }
        Ok(vec![ftensor(DType::F32, vec![n, oh, ow, m], out)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NHWC global average pool against f64 means: pixel counts below, at and past the
    /// 8-pixel runs, two images, values of mixed sign and magnitude.
    #[test]
    fn gap_nhwc_matches_f64_means() {
        let mut seed = 5u32;
        for &(n, hw, c) in &[
            (1usize, 49usize, 1280usize),
            (2, 15, 19),
            (1, 8, 3),
            (2, 1, 5),
        ] {
            let x: Vec<f32> = rnd(&mut seed, n * hw * c)
                .iter()
                .enumerate()
                .map(|(i, v)| v * if i % 7 == 0 { 100.0 } else { 1.0 })
                .collect();
            let got = gap_nhwc(&x, n, hw, c);
            // Channel ranges (the parallel split) give the same bits.
            if n == 1 {
                let mut split = vec![f32::NAN; c];
                let cut = (c / 2).next_multiple_of(16).min(c);
                let (a, b) = split.split_at_mut(cut);
                gap_channels(&x, hw, c, 0..cut, a);
                gap_channels(&x, hw, c, cut..c, b);
                assert_eq!(split, got, "{n}x{hw}x{c} split at {cut}");
            }
            for img in 0..n {
                for ch in 0..c {
                    let want: f64 = (0..hw)
                        .map(|p| x[(img * hw + p) * c + ch] as f64)
                        .sum::<f64>()
                        / hw as f64;
                    let g = got[img * c + ch] as f64;
                    assert!(
                        (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{n}x{hw}x{c} image {img} channel {ch}: {g} vs {want}"
                    );
                }
            }
        }
    }
    use edgehal_core::graph::ValueInfo;
    use edgehal_core::Attr;

    fn rnd(seed: &mut u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// A graph with one [`FUSED_CONV_NHWC`] node over `x` (and the residual `z` when `res`).
    fn layer(
        w: &[usize; 4],
        group: i64,
        s: i64,
        pads: [i64; 4],
        act: &str,
        res: bool,
        nchw_in: bool,
    ) -> Graph {
        let mut seed = 3u32;
        let mut g = Graph::new("nhwc");
        let x = g.value_id("x");
        g.values[x] = ValueInfo {
            name: "x".into(),
            dtype: Some(DType::F32),
            shape: None,
        };
        g.inputs = vec![x];
        let wid = g.value_id("w");
        let n: usize = w.iter().product();
        g.initializers.insert(
            wid,
            Tensor::from_vec(w.to_vec(), rnd(&mut seed, n)).unwrap(),
        );
        let bid = g.value_id("b");
        g.initializers.insert(
            bid,
            Tensor::from_vec(vec![w[0]], rnd(&mut seed, w[0])).unwrap(),
        );
        let mut inputs = vec![Some(x), Some(wid), Some(bid)];
        if res {
            let z = g.value_id("z");
            g.inputs.push(z);
            inputs.push(Some(z));
        }
        let y = g.value_id("y");
        g.outputs = vec![y];
        let mut node = Node {
            op: FUSED_CONV_NHWC.into(),
            domain: FUSED_DOMAIN.into(),
            inputs,
            outputs: vec![Some(y)],
            ..Default::default()
        };
        let a = &mut node.attrs;
        a.insert("group".into(), Attr::Int(group));
        a.insert("strides".into(), Attr::Ints(vec![s, s]));
        a.insert("pads".into(), Attr::Ints(pads.to_vec()));
        a.insert(
            "kernel_shape".into(),
            Attr::Ints(vec![w[2] as i64, w[3] as i64]),
        );
        if !act.is_empty() {
            a.insert("activation".into(), Attr::String(act.as_bytes().to_vec()));
            a.insert("act_min".into(), Attr::Float(0.0));
            a.insert("act_max".into(), Attr::Float(0.3));
        }
        if nchw_in {
            a.insert(INPUT_NCHW.into(), Attr::Int(1));
        }
        g.nodes.push(node);
        g
    }

    /// Each kernel the plan picks (1x1, depthwise 3x3 stride 1 and 2, the first layer on NCHW
    /// or NHWC input) gives the reference op's values (transposes around `FusedConv`) at 1 and 2
    /// threads, with clamp and non-clamp activations and a residual.
    #[test]
    fn plans_match_the_reference_fused_conv() {
        // (weight, group, stride, pads, x shape as the node reads it, residual, NCHW input)
        type Case = ([usize; 4], i64, i64, [i64; 4], [usize; 4], bool, bool);
        let cases: [Case; 8] = [
            ([40, 24, 1, 1], 1, 1, [0; 4], [2, 7, 7, 24], true, false),
            ([33, 16, 1, 1], 1, 1, [0; 4], [1, 9, 11, 16], false, false),
            ([48, 1, 3, 3], 48, 1, [1; 4], [1, 10, 9, 48], true, false),
            (
                [37, 1, 3, 3],
                37,
                2,
                [0, 1, 1, 0],
                [2, 11, 13, 37],
                false,
                false,
            ),
            ([32, 3, 3, 3], 1, 2, [1; 4], [1, 3, 17, 15], false, true),
            ([32, 3, 3, 3], 1, 2, [1; 4], [1, 17, 15, 3], false, false),
            ([20, 2, 3, 3], 1, 1, [1, 0, 0, 1], [1, 2, 8, 6], false, true),
            (
                [20, 2, 3, 3],
                1,
                1,
                [1, 0, 0, 1],
                [2, 8, 6, 2],
                false,
                false,
            ),
        ];
        let mut seed = 9u32;
        for (w, group, s, pads, xs, res, nchw_in) in cases {
            for act in ["", "Clip", "HardSwish"] {
                let g = layer(&w, group, s, pads, act, res, nchw_in);
                let node = &g.nodes[0];
                let plan = NhwcConvPlan::prepare(&g, node).expect("a plan");
                let x = Tensor::from_vec(xs.to_vec(), rnd(&mut seed, xs.iter().product())).unwrap();
                let ctx = OpCtx {
                    node,
                    opset: 13,
                    subgraph: None,
                    dest: None,
                };
                // The output shape from the reference without a residual, then the residual.
                let wt = &g.initializers[&g.find_value("w").unwrap()];
                let bt = &g.initializers[&g.find_value("b").unwrap()];
                let shape = {
                    let mut ng = g.clone();
                    ng.nodes[0].inputs.truncate(3);
                    let n0 = &ng.nodes[0];
                    let c0 = OpCtx { node: n0, ..ctx };
                    fused_conv_nhwc(&c0, &[Some(&x), Some(wt), Some(bt)]).unwrap()[0]
                        .shape()
                        .to_vec()
                };
                let z = Tensor::from_vec(shape.clone(), rnd(&mut seed, shape.iter().product()))
                    .unwrap();
                let ins = [Some(&x), Some(wt), Some(bt), res.then_some(&z)];
                let want = fused_conv_nhwc(&ctx, &ins).unwrap();
                let want = want[0].as_slice::<f32>().unwrap();
                for threads in [1, 2] {
                    let got = plan.run(&ctx, &ins, threads).unwrap();
                    assert_eq!(got[0].shape(), shape.as_slice());
                    let got = got[0].as_slice::<f32>().unwrap();
                    for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{w:?} s{s} {act} t{threads}: element {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Shapes no NHWC kernel covers get no plan (the op function runs them).
    #[test]
    fn other_shapes_get_no_plan() {
        // 1x1 with stride 2, 3x3 dense over many channels, depthwise 5x5.
        for (w, group, s) in [
            ([8, 8, 1, 1], 1, 2),
            ([8, 8, 3, 3], 1, 1),
            ([8, 1, 5, 5], 8, 1),
        ] {
            let g = layer(&w, group, s, [0; 4], "", false, false);
            assert!(NhwcConvPlan::prepare(&g, &g.nodes[0]).is_none(), "{w:?}");
        }
        // A depthwise node whose strides attribute has one value is refused, not indexed.
        let mut g = layer(&[8, 1, 3, 3], 8, 1, [1; 4], "", false, false);
        g.nodes[0]
            .attrs
            .insert("strides".into(), Attr::Ints(vec![1]));
        assert!(NhwcConvPlan::prepare(&g, &g.nodes[0]).is_none());
    }
}
