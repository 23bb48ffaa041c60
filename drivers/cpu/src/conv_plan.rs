//! Prepared float convolutions: Conv and the fused `edgehal.FusedConv` (Conv + residual add +
//! activation) with their weights packed once.
//!
//! A [`ConvPlan`] is built when the executor is created, for every convolution whose weights
//! are constant initializers, and reused by every run; convolutions with computed weights build
//! one per call. The plan picks a kernel per call from the input shape:
//! - depthwise 3x3, stride 1 or 2 (`group == C == M`): a direct kernel, no im2col;
//! - 3x3 stride 1, one group, when the output has enough 4x4 tiles: Winograd F(4x4, 3x3),
//!   36 packed GEMMs on transformed weights (4x fewer multiplies);
//! - 3x3 stride 1, one group, small maps where F(4x4, 3x3) has too few tiles (ResNet's 7x7):
//!   Winograd F(2x2, 3x3), 16 packed GEMMs (2.25x fewer multiplies);
//! - otherwise a packed GEMM per group on the input itself (1x1, stride 1, no padding) or its
//!   im2col matrix.
//!
//! Bias, the residual and the activation are applied in the GEMM (or transform) epilogue.
//! The packed forms are built lazily (`OnceLock`) so only the paths a model uses cost memory;
//! [`ConvPlan::warm`] builds the one a known input shape needs at session creation.

use std::sync::OnceLock;

use edgehal_core::{Error, Node, Result, Tensor};
use edgehal_kernels::conv::{self as kconv, Dw3x3, WinoInput, WinoOutput};
use edgehal_kernels::dispatch;
use edgehal_kernels::gemm::MatRef;
use edgehal_kernels::packed::{gemm_packed, gemm_packed_panels, Activation, Epilogue, PackedA};

use crate::ops::nn::{ftensor, fvec, geom, im2col, numel, take_f32, Geom};
use crate::ops::{input, opt_input, OpCtx};
use crate::par::for_parts;

/// The op type of fused convolutions (domain [`FUSED_DOMAIN`]).
pub const FUSED_CONV: &str = "FusedConv";
/// The domain of edgehal-internal ops.
pub const FUSED_DOMAIN: &str = "edgehal";

/// Whether `node` is a fused convolution (with an activation and a residual input): `FusedConv`
/// or its NHWC form ([`crate::nhwc_plan::FUSED_CONV_NHWC`]).
fn is_fused(node: &Node) -> bool {
    node.op == FUSED_CONV || node.op == crate::nhwc_plan::FUSED_CONV_NHWC
}

/// The activation a `FusedConv` node names in its `activation` attribute ("" or absent: none;
/// Relu, Clip with `act_min`/`act_max`, LeakyRelu/HardSigmoid with `act_alpha`/`act_beta`,
/// Sigmoid, HardSwish).
pub fn activation_of(node: &Node) -> Result<Activation> {
    let f = |name: &str, d: f32| node.attr_f(name).unwrap_or(d);
    Ok(
        match node.attr_s("activation").unwrap_or_default().as_str() {
            "" => Activation::Identity,
            "Relu" => Activation::Relu,
            "Clip" => Activation::Clip {
                lo: f("act_min", f32::NEG_INFINITY),
                hi: f("act_max", f32::INFINITY),
            },
            "LeakyRelu" => Activation::LeakyRelu(f("act_alpha", 0.01)),
            "Sigmoid" => Activation::Sigmoid,
            "HardSigmoid" => Activation::HardSigmoid {
                alpha: f("act_alpha", 0.2),
                beta: f("act_beta", 0.5),
            },
            "HardSwish" => Activation::HardSwish,
            other => {
                return Err(Error::unsupported(format!(
                    "FusedConv: unknown activation '{other}'"
                )))
            }
        },
    )
}

/// Most input channels of [`Path::DenseS2`].
const DENSE_S2_MAX_C: usize = 4;
/// Largest kernel side of [`Path::DenseS2`] (ResNet's stem is 7x7).
const DENSE_S2_MAX_K: usize = 11;

/// The Winograd input transform of `pin` into `v` (`planes` planes of `[c][T]`), its channels
/// split across `threads` (it was a serial 9-12% of resnet18 at one thread, so most of what
/// two threads could not halve).
fn wino_input_threads(
    threads: usize,
    pin: &WinoInput<'_>,
    v: &mut [f32],
    planes: usize,
    run: impl Fn(&WinoInput<'_>, &mut [&mut [f32]]) -> bool + Sync,
) -> Result<()> {
    let t = pin.tiles_y * pin.tiles_x;
    let plane = pin.h * pin.w;
    if v.len() < planes * pin.c * t || pin.x.len() < pin.c * plane {
        return Err(Error::arg("Conv: internal Winograd size mismatch"));
    }
    if pin.c * t == 0 {
        return Ok(());
    }
    // Few channels or tiles: one thread (a hand-off costs a few microseconds).
    let threads = if pin.c * t * planes < crate::par::MIN_PARALLEL_ELEMS {
        1
    } else {
        threads
    };
    let parts = crate::par::plane_parts(threads, pin.c, t, planes, v);
    crate::par::for_items(parts, |_, (chs, mut ps)| {
        let p = WinoInput {
            x: &pin.x[chs.start * plane..chs.end * plane],
            c: chs.len(),
            ..*pin
        };
        if run(&p, &mut ps) {
            Ok(())
        } else {
            Err(Error::arg("Conv: internal Winograd size mismatch"))
        }
    })
}

/// Whether Winograd may be used (`EDGEHAL_WINOGRAD=0` turns it off, for comparisons).
fn winograd_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("EDGEHAL_WINOGRAD").map_or(true, |v| v != "0"))
}

/// A convolution with its weights prepared.
pub struct ConvPlan {
    /// Output channels, input channels per group, groups.
    m: usize,
    cg: usize,
    group: usize,
    /// Kernel spatial shape.
    kernel: Vec<usize>,
    /// `[m, cg, kernel...]`, shared with the model (no copy for f32 weights).
    weight: Tensor,
    bias: Option<Vec<f32>>,
    act: Activation,
    /// One packed `mg x (cg * kt)` matrix per group.
    gemm: OnceLock<Vec<PackedA>>,
    /// 36 packed `m x c` matrices (Winograd F(4x4, 3x3)).
    wino: OnceLock<Vec<PackedA>>,
    /// 16 packed `m x c` matrices (Winograd F(2x2, 3x3)).
    wino2: OnceLock<Vec<PackedA>>,
}

enum Path {
    Depthwise,
    /// Dense stride 2 (kernel sides up to [`DENSE_S2_MAX_K`]) over at most [`DENSE_S2_MAX_C`]
    /// input channels (a CNN's first layer), computed directly: the im2col matrix and its
    /// packing cost several times the multiplies.
    DenseS2,
    Winograd,
    Winograd2,
    Gemm,
}

impl ConvPlan {
    /// A plan for `node` (Conv or FusedConv) with weight `w` and optional bias `b`.
    pub fn new(node: &Node, w: &Tensor, b: Option<&Tensor>) -> Result<ConvPlan> {
        if w.rank() < 3 {
            return Err(Error::arg(format!(
                "Conv: W has shape {:?}, expected [M, C/group, kernel...]",
                w.shape()
            )));
        }
        let ws = w.shape();
        let (m, cg) = (ws[0], ws[1]);
        let kernel = ws[2..].to_vec();
        if let Some(ks) = node.attr_ints("kernel_shape") {
            let ks: Vec<usize> = ks.iter().map(|&k| k.max(0) as usize).collect();
            if ks != kernel {
                return Err(Error::arg(format!(
                    "Conv: kernel_shape {ks:?} does not match weight {kernel:?}"
                )));
            }
        }
        let group = node.attr_i("group").unwrap_or(1);
        if group <= 0 || m % group as usize != 0 {
            return Err(Error::arg(format!(
                "Conv: group={group} does not divide the {m} output channels"
            )));
        }
        fvec(w, "Conv W")?;
        let weight = w.clone();
        let bias = match b {
            Some(b) => {
                let bv = fvec(b, "Conv B")?;
                if bv.len() != m {
                    return Err(Error::arg(format!(
                        "Conv: B has {} elements, W has {m} output channels",
                        bv.len()
                    )));
                }
                Some(bv.into_owned())
            }
            None => None,
        };
        let act = if is_fused(node) {
            activation_of(node)?
        } else {
            Activation::Identity
        };
        Ok(ConvPlan {
            m,
            cg,
            group: group as usize,
            kernel,
            weight,
            bias,
            act,
            gemm: OnceLock::new(),
            wino: OnceLock::new(),
            wino2: OnceLock::new(),
        })
    }

    /// A plan from a node's inputs (weights computed at run time).
    pub fn from_inputs(node: &Node, ins: &[Option<&Tensor>]) -> Result<ConvPlan> {
        Self::new(node, input(ins, 1)?, opt_input(ins, 2))
    }

    /// Packs the weights for the path an input of shape `x_shape` takes, so the first run
    /// does not pay for it.
    pub fn warm(&self, ctx: &OpCtx<'_>, x_shape: &[usize]) -> Result<()> {
        if x_shape.len() != self.kernel.len() + 2 {
            return Ok(());
        }
        let g = geom(ctx, &x_shape[2..], &self.kernel, false)?;
        match self.path(x_shape[1], &g) {
            Path::Depthwise | Path::DenseS2 => {}
            Path::Winograd => {
                self.wino_packed()?;
            }
            Path::Winograd2 => {
                self.wino2_packed()?;
            }
            Path::Gemm => {
                self.gemm_packed()?;
            }
        }
        Ok(())
    }

    fn path(&self, c: usize, g: &Geom) -> Path {
        let two_d_3x3 = self.kernel == [3, 3] && g.d.iter().all(|&d| d == 1);
        if two_d_3x3
            && self.group == c
            && self.m == c
            && self.cg == 1
            && g.s[0] == g.s[1]
            && (g.s[0] == 1 || g.s[0] == 2)
        {
            return Path::Depthwise;
        }
        if self.kernel.len() == 2
            && self
                .kernel
                .iter()
                .all(|&k| (1..=DENSE_S2_MAX_K).contains(&k))
            && g.d.iter().all(|&d| d == 1)
            && self.group == 1
            && g.s == [2, 2]
            && c <= DENSE_S2_MAX_C
        {
            return Path::DenseS2;
        }
        if two_d_3x3 && self.group == 1 && g.s == [1, 1] && winograd_enabled() {
            // GEMM columns are padded to the tile width (32 with AVX-512): Winograd does 36
            // products over T tiles, the direct GEMM 9 over P outputs; ask for a clear win.
            let pad32 = |n: usize| n.div_ceil(32) * 32;
            let t = kconv::wino_tiles(g.out[0]) * kconv::wino_tiles(g.out[1]);
            let p = g.out[0] * g.out[1];
            if 5 * pad32(t) < pad32(p) {
                return Path::Winograd;
            }
            // F(2x2, 3x3): 16 products over T2 tiles (columns padded to 16: the AVX-512 GEMM
            // switches to a 16-wide tile for such B). Ask for 1.5x fewer padded multiplies
            // than the direct GEMM to pay for the transforms: ResNet-18's 7x7 layers have 16
            // tiles, 256 against 9 x 64 = 576.
            let pad16 = |n: usize| n.div_ceil(16) * 16;
            let t2 = kconv::wino2_tiles(g.out[0]) * kconv::wino2_tiles(g.out[1]);
            if 3 * 16 * pad16(t2) < 2 * 9 * pad32(p) {
                return Path::Winograd2;
            }
        }
        Path::Gemm
    }

    fn gemm_packed(&self) -> Result<&Vec<PackedA>> {
        if let Some(p) = self.gemm.get() {
            return Ok(p);
        }
        let weight = fvec(&self.weight, "Conv W")?;
        let kk = weight.len() / self.m.max(1);
        let mg = self.m / self.group;
        let mut v = Vec::with_capacity(self.group);
        for gi in 0..self.group {
            let wg = &weight[gi * mg * kk..(gi + 1) * mg * kk];
            v.push(
                PackedA::new(MatRef::row_major(wg, mg, kk))
                    .ok_or_else(|| Error::arg("Conv: weight is too short for its shape"))?,
            );
        }
        Ok(self.gemm.get_or_init(|| v))
    }

    fn wino_packed(&self) -> Result<&Vec<PackedA>> {
        if let Some(p) = self.wino.get() {
            return Ok(p);
        }
        let (m, c) = (self.m, self.cg);
        let u = kconv::wino_weights(&fvec(&self.weight, "Conv W")?, m, c)
            .ok_or_else(|| Error::arg("Conv: weight is too short for its shape"))?;
        let mut v = Vec::with_capacity(36);
        for xi in 0..36 {
            v.push(
                PackedA::new(MatRef::row_major(&u[xi * m * c..(xi + 1) * m * c], m, c))
                    .ok_or_else(|| Error::arg("Conv: internal Winograd size mismatch"))?,
            );
        }
        Ok(self.wino.get_or_init(|| v))
    }

    fn wino2_packed(&self) -> Result<&Vec<PackedA>> {
        if let Some(p) = self.wino2.get() {
            return Ok(p);
        }
        let (m, c) = (self.m, self.cg);
        let u = kconv::wino2_weights(&fvec(&self.weight, "Conv W")?, m, c)
            .ok_or_else(|| Error::arg("Conv: weight is too short for its shape"))?;
        let mut v = Vec::with_capacity(16);
        for xi in 0..16 {
            v.push(
                PackedA::new(MatRef::row_major(&u[xi * m * c..(xi + 1) * m * c], m, c))
                    .ok_or_else(|| Error::arg("Conv: internal Winograd size mismatch"))?,
            );
        }
        Ok(self.wino2.get_or_init(|| v))
    }

    /// Runs the convolution on one thread: input 0 is X, input 3 (FusedConv only) the residual
    /// added before the activation.
    pub fn run(&self, ctx: &OpCtx<'_>, ins: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
        self.run_threads(ctx, ins, 1)
    }

    /// [`ConvPlan::run`] on `threads` threads (split by output channels, row panels or
    /// Winograd positions).
    pub fn run_threads(
        &self,
        ctx: &OpCtx<'_>,
        ins: &[Option<&Tensor>],
        threads: usize,
    ) -> Result<Vec<Tensor>> {
        let x = input(ins, 0)?;
        if x.rank() != self.kernel.len() + 2 {
            return Err(Error::arg(format!(
                "Conv: X has shape {:?}, W has {} spatial dims",
                x.shape(),
                self.kernel.len()
            )));
        }
        let xs = x.shape();
        let (n, c) = (xs[0], xs[1]);
        if c != self.cg * self.group {
            return Err(Error::arg(format!(
                "Conv: X has {c} channels, W expects {} x group {}",
                self.cg, self.group
            )));
        }
        let in_sp = &xs[2..];
        let g = geom(ctx, in_sp, &self.kernel, false)?;
        let mut shape = vec![n, self.m];
        shape.extend_from_slice(&g.out);
        let p = numel(&g.out)?;
        let in_total = numel(in_sp)?;
        let total = numel(&shape)?;
        let residual = match opt_input(ins, 3) {
            Some(z) if is_fused(ctx.node) => {
                if z.shape() != shape.as_slice() {
                    return Err(Error::arg(format!(
                        "FusedConv: residual has shape {:?}, output is {shape:?}",
                        z.shape()
                    )));
                }
                Some(fvec(z, "FusedConv Z")?)
            }
            _ => None,
        };
        let xv = fvec(x, "Conv X")?;
        if xv.len() != n * c * in_total {
            return Err(Error::arg("Conv: X has the wrong number of elements"));
        }
        // Every path below writes each output element (the kernels' tests check it on
        // NaN-filled outputs), so the buffer is not zeroed first: on the early layers of a
        // MobileNet that memset was as much memory traffic as the convolution's own stores.
        let mut out = take_f32(total)?;
        let per_img = self.m * p;
        let variant = dispatch::selected();
        let path = match self.path(c, &g) {
            // The direct kernel has no residual epilogue.
            Path::DenseS2 if residual.is_some() => Path::Gemm,
            p => p,
        };
        match path {
            Path::DenseS2 => {
                let weight = fvec(&self.weight, "Conv W")?;
                let kernel2 = [self.kernel[0], self.kernel[1]];
                let taps = kernel2[0] * kernel2[1];
                let (oh, ow) = (g.out[0], g.out[1]);
                for b in 0..n {
                    let xb = &xv[b * c * in_total..(b + 1) * c * in_total];
                    let planes = kconv::s2_planes(
                        xb, c, in_sp[0], in_sp[1], kernel2, g.pb[0], g.pb[1], oh, ow,
                    )
                    .ok_or_else(|| Error::arg("Conv: input is too short"))?;
                    let y = &mut out[b * per_img..(b + 1) * per_img];
                    for_parts(threads, self.m, oh * ow, y, |ocs, y| {
                        let p = kconv::ConvS2 {
                            planes: &planes,
                            out_h: oh,
                            out_w: ow,
                            weight: &weight[ocs.start * c * taps..ocs.end * c * taps],
                            bias: self.bias.as_deref().map(|bv| &bv[ocs.clone()]),
                            act: self.act,
                        };
                        if !kconv::conv_s2_with(variant, &p, y) {
                            return Err(Error::arg("Conv: internal size mismatch"));
                        }
                        Ok(())
                    })?;
                }
            }
            Path::Depthwise => {
                let weight = fvec(&self.weight, "Conv W")?;
                if weight.len() < c * 9 {
                    return Err(Error::arg("Conv: depthwise weight is too short"));
                }
                let (oh, ow) = (g.out[0], g.out[1]);
                // With a residual the activation comes after the add.
                let act = if residual.is_some() {
                    Activation::Identity
                } else {
                    self.act
                };
                for b in 0..n {
                    let xb = &xv[b * c * in_total..(b + 1) * c * in_total];
                    let res = residual
                        .as_ref()
                        .map(|r| &r[b * per_img..(b + 1) * per_img]);
                    let y = &mut out[b * per_img..(b + 1) * per_img];
                    for_parts(threads, c, oh * ow, y, |chs, y| {
                        let prm = Dw3x3 {
                            x: &xb[chs.start * in_total..chs.end * in_total],
                            c: chs.len(),
                            h: in_sp[0],
                            w: in_sp[1],
                            stride: g.s[0],
                            pad_top: g.pb[0],
                            pad_left: g.pb[1],
                            out_h: oh,
                            out_w: ow,
                            weight: &weight[chs.start * 9..chs.end * 9],
                            bias: self.bias.as_deref().map(|bv| &bv[chs.clone()]),
                            act,
                        };
                        if !kconv::depthwise3x3_with(variant, &prm, y) {
                            return Err(Error::arg("Conv: internal depthwise size mismatch"));
                        }
                        if let Some(r) = res {
                            self.add_residual_act(y, &r[chs.start * oh * ow..chs.end * oh * ow]);
                        }
                        Ok(())
                    })?;
                }
            }
            Path::Winograd => {
                let packs = self.wino_packed()?;
                let (ty, tx) = (kconv::wino_tiles(g.out[0]), kconv::wino_tiles(g.out[1]));
                let t = ty * tx;
                let mut v = take_f32(36 * c * t)?;
                let mut mm = take_f32(36 * self.m * t)?;
                for b in 0..n {
                    let pin = WinoInput {
                        x: &xv[b * c * in_total..(b + 1) * c * in_total],
                        c,
                        h: in_sp[0],
                        w: in_sp[1],
                        pad_top: g.pb[0],
                        pad_left: g.pb[1],
                        tiles_y: ty,
                        tiles_x: tx,
                    };
                    wino_input_threads(threads, &pin, &mut v, 36, |p, planes| {
                        kconv::wino_input_planes(variant, p, planes)
                    })?;
                    for_parts(threads, 36, self.m * t, &mut mm, |xis, mm| {
                        for (k, xi) in xis.enumerate() {
                            let bm = MatRef::row_major(&v[xi * c * t..(xi + 1) * c * t], c, t);
                            let dst = &mut mm[k * self.m * t..(k + 1) * self.m * t];
                            if !gemm_packed(&packs[xi], bm, dst, t, &Epilogue::PLAIN) {
                                return Err(Error::arg("Conv: internal Winograd size mismatch"));
                            }
                        }
                        Ok(())
                    })?;
                    let res = residual
                        .as_ref()
                        .map(|r| &r[b * per_img..(b + 1) * per_img]);
                    let y = &mut out[b * per_img..(b + 1) * per_img];
                    for_parts(threads, self.m, p, y, |ms, y| {
                        let pout = WinoOutput {
                            mm: &mm,
                            m_total: self.m,
                            first: ms.start,
                            m: ms.len(),
                            tiles_y: ty,
                            tiles_x: tx,
                            out_h: g.out[0],
                            out_w: g.out[1],
                            bias: self.bias.as_deref(),
                            residual: res.map(|r| &r[ms.start * p..ms.end * p]),
                            act: self.act,
                        };
                        if !kconv::wino_output(variant, &pout, y) {
                            return Err(Error::arg("Conv: internal Winograd size mismatch"));
                        }
                        Ok(())
                    })?;
                }
                crate::arena::recycle(v);
                crate::arena::recycle(mm);
            }
            Path::Winograd2 => {
                let packs = self.wino2_packed()?;
                let (ty, tx) = (kconv::wino2_tiles(g.out[0]), kconv::wino2_tiles(g.out[1]));
                let t = ty * tx;
                let mut v = take_f32(16 * c * t)?;
                let mut mm = take_f32(16 * self.m * t)?;
                for b in 0..n {
                    let pin = WinoInput {
                        x: &xv[b * c * in_total..(b + 1) * c * in_total],
                        c,
                        h: in_sp[0],
                        w: in_sp[1],
                        pad_top: g.pb[0],
                        pad_left: g.pb[1],
                        tiles_y: ty,
                        tiles_x: tx,
                    };
                    wino_input_threads(threads, &pin, &mut v, 16, kconv::wino2_input_planes)?;
                    for_parts(threads, 16, self.m * t, &mut mm, |xis, mm| {
                        for (k, xi) in xis.enumerate() {
                            let bm = MatRef::row_major(&v[xi * c * t..(xi + 1) * c * t], c, t);
                            let dst = &mut mm[k * self.m * t..(k + 1) * self.m * t];
                            if !gemm_packed(&packs[xi], bm, dst, t, &Epilogue::PLAIN) {
                                return Err(Error::arg("Conv: internal Winograd size mismatch"));
                            }
                        }
                        Ok(())
                    })?;
                    let res = residual
                        .as_ref()
                        .map(|r| &r[b * per_img..(b + 1) * per_img]);
                    let y = &mut out[b * per_img..(b + 1) * per_img];
                    for_parts(threads, self.m, p, y, |ms, y| {
                        let pout = WinoOutput {
                            mm: &mm,
                            m_total: self.m,
                            first: ms.start,
                            m: ms.len(),
                            tiles_y: ty,
                            tiles_x: tx,
                            out_h: g.out[0],
                            out_w: g.out[1],
                            bias: self.bias.as_deref(),
                            residual: res.map(|r| &r[ms.start * p..ms.end * p]),
                            act: self.act,
                        };
                        if !kconv::wino2_output(&pout, y) {
                            return Err(Error::arg("Conv: internal Winograd size mismatch"));
                        }
                        Ok(())
                    })?;
                }
                crate::arena::recycle(v);
                crate::arena::recycle(mm);
            }
            Path::Gemm => {
                let packs = self.gemm_packed()?;
                let kt = numel(&self.kernel)?;
                let kk = self.cg * kt;
                let mg = self.m / self.group;
                let direct = g.k.iter().all(|&k| k == 1)
                    && g.s.iter().all(|&s| s == 1)
                    && g.pb.iter().chain(&g.pe).all(|&p| p == 0);
                let mut col =
                    if direct {
                        Vec::new()
                    } else {
                        take_f32(kk.checked_mul(p).ok_or_else(|| {
                            Error::TooLarge("Conv im2col buffer overflows".into())
                        })?)?
                    };
                for b in 0..n {
                    for (gi, pa) in packs.iter().enumerate() {
                        let x0 = (b * c + gi * self.cg) * in_total;
                        let xg = &xv[x0..x0 + self.cg * in_total];
                        let bsrc: &[f32] = if direct {
                            xg
                        } else {
                            // Channel by channel, the im2col rows are independent.
                            let (cg, kp) = (self.cg, kt * p);
                            for_parts::<f32, Error>(threads, cg, kp, &mut col, |chs, part| {
                                let xs = &xg[chs.start * in_total..chs.end * in_total];
                                im2col(xs, chs.len(), in_sp, &g, part);
                                Ok(())
                            })?;
                            &col
                        };
                        let o0 = (b * self.m + gi * mg) * p;
                        let mr = pa.panel_rows();
                        let bias = self.bias.as_deref().map(|bv| &bv[gi * mg..(gi + 1) * mg]);
                        let res = residual.as_ref().map(|r| &r[o0..o0 + mg * p]);
                        let dst = &mut out[o0..o0 + mg * p];
                        for_parts(threads, pa.panels(), mr * p, dst, |panels, dst| {
                            let epi = Epilogue {
                                bias,
                                residual: res.map(|r| &r[panels.start * mr * p..]),
                                act: self.act,
                            };
                            let bm = MatRef::row_major(bsrc, kk, p);
                            if !gemm_packed_panels(pa, panels, bm, dst, p.max(1), &epi) {
                                return Err(Error::arg("Conv: internal size mismatch"));
                            }
                            Ok(())
                        })?;
                    }
                }
                crate::arena::recycle(col);
            }
        }
        Ok(vec![ftensor(x.dtype(), shape, out)?])
    }

    /// Adds the residual to a depthwise result (computed with bias, without activation) and
    /// applies the activation.
    fn add_residual_act(&self, y: &mut [f32], r: &[f32]) {
        for (o, &z) in y.iter_mut().zip(r) {
            *o += z;
        }
        self.act.apply_slice(y);
    }
}
