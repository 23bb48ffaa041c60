//! Float convolutions on NHWC activations (channels innermost), the layout MobileNet-style
//! networks run fastest in: a 1x1 convolution is a GEMM whose left operand is the image itself
//! (`[pixels, c]`, read in place, no packing per run) and whose output rows are whole pixels,
//! so every pixel count is computed without padding the columns to the vector width (the NCHW
//! GEMM pads 7x7 = 49 columns to 64); a depthwise 3x3 vectorizes across channels, so borders
//! cost no lane shuffles; and a small-channel first layer (RGB in NCHW) writes NHWC directly.
//!
//! Every kernel has a portable body (safe, `#[inline(always)]`, compiled again with AVX2 and
//! AVX-512 by `simd.rs`); the 1x1 GEMM also has an AVX-512 register tile (12 pixels x 32
//! channels). Kernels return `false`, touching nothing, when a slice is too short for the
//! sizes given.

use std::ops::Range;

use crate::aligned::AlignedVec;
use crate::dispatch::Variant;
use crate::packed::Activation;

/// Output channels per packed weight panel (two AVX-512 vectors).
pub const PANEL: usize = 32;

/// 1x1 convolution weights `[m, k]` (OIHW with 1x1 kernels) packed once as `m / 32` panels
/// of `[k][32]` (the last panel zero-padded), the column order a pixel-row tile reads.
#[derive(Clone, Debug)]
pub struct PackedCols {
    m: usize,
    k: usize,
    data: AlignedVec,
}

impl PackedCols {
    /// Packs `w` (`[m, k]`, row-major); `None` when it is shorter than `m * k`.
    pub fn new(w: &[f32], m: usize, k: usize) -> Option<PackedCols> {
        let len = m.checked_mul(k)?;
        if w.len() < len {
            return None;
        }
        let panels = m.div_ceil(PANEL);
        let mut data = AlignedVec::zeroed(panels.checked_mul(k)?.checked_mul(PANEL)?);
        for (jp, panel) in data.chunks_exact_mut(k * PANEL.max(1)).enumerate() {
            for (kk, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    let oc = jp * PANEL + j;
                    if oc < m {
                        *v = w[oc * k + kk];
                    }
                }
            }
        }
        Some(PackedCols { m, k, data })
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Input channels.
    pub fn depth(&self) -> usize {
        self.k
    }

    /// Panel `jp`: `k` rows of 32 output channels.
    pub(crate) fn panel(&self, jp: usize) -> &[f32] {
        &self.data[jp * self.k * PANEL..(jp + 1) * self.k * PANEL]
    }

    pub(crate) fn panels(&self) -> usize {
        self.m.div_ceil(PANEL)
    }
}

/// `y[p][j] = act(sum_k x[p * k + kk] * w[j][kk] + bias[j] + residual[p * m + j])` for the
/// `pixels` rows of an NHWC image (`y` and the residual are `[pixels, m]`).
pub struct Pointwise<'a> {
    pub x: &'a [f32],
    pub pixels: usize,
    pub w: &'a PackedCols,
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

/// Runs a [`Pointwise`] convolution into `y`; `false` when a slice is too short.
pub fn pointwise(variant: Variant, p: &Pointwise<'_>, y: &mut [f32]) -> bool {
    let (m, k) = (p.w.m, p.w.k);
    let Some(out_len) = p.pixels.checked_mul(m) else {
        return false;
    };
    let Some(in_len) = p.pixels.checked_mul(k) else {
        return false;
    };
    if p.x.len() < in_len
        || y.len() < out_len
        || p.bias.is_some_and(|b| b.len() < m)
        || p.residual.is_some_and(|r| r.len() < out_len)
    {
        return false;
    }
    if p.pixels == 0 || m == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::pointwise_nhwc(variant, p, y) {
        return true;
    }
    let _ = variant;
    pointwise_portable(p, y);
    true
}

/// One part of a [`Pointwise`] split by output channels ([`pointwise_by_channels`]); `Send`,
/// so parts run on different threads.
pub struct PointwisePart<'a> {
    #[cfg(target_arch = "x86_64")]
    inner: crate::simd::PwPart<'a>,
    #[cfg(not(target_arch = "x86_64"))]
    never: std::convert::Infallible,
    #[cfg(not(target_arch = "x86_64"))]
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl PointwisePart<'_> {
    /// Computes this part's channels of every pixel.
    pub fn run(self) {
        #[cfg(target_arch = "x86_64")]
        self.inner.run();
        #[cfg(not(target_arch = "x86_64"))]
        match self.never {}
    }
}

/// A [`Pointwise`] as `parts` parts that each compute a contiguous range of the 32-channel
/// weight panels for every pixel, to run on `parts` threads: for few pixels and large weights
/// (a 7x7 map, 160 -> 960 channels), a split by pixels has every thread stream all the
/// weights and end on partial tiles (49 pixels as 24 + 25). `None` (nothing done) when the
/// sizes do not fit (as [`pointwise`] checks them), there are fewer panels than parts, or
/// `variant` has no such kernel (the AVX-512 tile with a clamp activation); the caller then
/// splits by pixels.
pub fn pointwise_by_channels<'a>(
    variant: Variant,
    p: &Pointwise<'a>,
    y: &'a mut [f32],
    parts: usize,
) -> Option<Vec<PointwisePart<'a>>> {
    let (m, k) = (p.w.m, p.w.k);
    let out_len = p.pixels.checked_mul(m)?;
    let in_len = p.pixels.checked_mul(k)?;
    if p.x.len() < in_len
        || y.len() < out_len
        || p.bias.is_some_and(|b| b.len() < m)
        || p.residual.is_some_and(|r| r.len() < out_len)
    {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let parts = crate::simd::pointwise_nhwc_split(variant, p, y, parts)?;
        Some(
            parts
                .into_iter()
                .map(|inner| PointwisePart { inner })
                .collect(),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (variant, parts);
        None
    }
}

/// The reference: one output row (pixel) at a time, panel by panel.
fn pointwise_portable(p: &Pointwise<'_>, y: &mut [f32]) {
    let (m, k) = (p.w.m, p.w.k);
    for px in 0..p.pixels {
        let xr = &p.x[px * k..(px + 1) * k];
        for jp in 0..p.w.panels() {
            let panel = p.w.panel(jp);
            let mut acc = [0f32; PANEL];
            for (kk, &xv) in xr.iter().enumerate() {
                for (a, &wv) in acc.iter_mut().zip(&panel[kk * PANEL..(kk + 1) * PANEL]) {
                    *a += xv * wv;
                }
            }
            let j0 = jp * PANEL;
            let cols = PANEL.min(m - j0);
            let at = px * m + j0;
            let out = &mut y[at..at + cols];
            for (j, (o, &a)) in out.iter_mut().zip(&acc).enumerate() {
                let mut v = a + p.bias.map_or(0.0, |b| b[j0 + j]);
                if let Some(r) = p.residual {
                    v += r[at + j];
                }
                *o = v;
            }
            p.act.apply_slice(out);
        }
    }
}

/// A depthwise 3x3 convolution (one filter per channel, stride 1 or 2, zero padding) on an
/// NHWC image `x` (`[h, w, c]`) into `[out_h, out_w, c]`.
pub struct DwNhwc<'a> {
    pub x: &'a [f32],
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Blocked `[c / 16][9][16]` ([`dw_weights_blocked`]).
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// Added before the activation, laid out like the output.
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

/// Floats of the blocked depthwise weights of `c` channels ([`dw_weights_blocked`]).
pub fn dw_weights_len(c: usize) -> usize {
    c.div_ceil(L) * 9 * L
}

/// Where channel `j`'s tap `t` lies in the blocked depthwise weights.
#[inline(always)]
fn dw_at(j: usize, t: usize) -> usize {
    ((j / L) * 9 + t) * L + j % L
}

/// `[c, 3, 3]` depthwise weights into the blocked `[c / 16][9][16]` form [`DwNhwc`] reads
/// (the last block zero-padded): a tap's weights for 16 channels are one vector, and a block's
/// nine taps are contiguous.
pub fn dw_weights_blocked(w: &[f32], c: usize) -> Option<AlignedVec> {
    if w.len() < c.checked_mul(9)? {
        return None;
    }
    let mut t = AlignedVec::zeroed(dw_weights_len(c));
    for ch in 0..c {
        for tap in 0..9 {
            t[dw_at(ch, tap)] = w[ch * 9 + tap];
        }
    }
    Some(t)
}

/// Output rows `rows` of a [`DwNhwc`] convolution into `y` (those rows only: `y` starts at
/// row `rows.start`); `false` when a slice is too short or the stride is not 1 or 2.
pub fn depthwise3x3_nhwc(
    variant: Variant,
    p: &DwNhwc<'_>,
    rows: Range<usize>,
    y: &mut [f32],
) -> bool {
    let (Some(in_len), Some(row_len)) = (
        p.h.checked_mul(p.w).and_then(|v| v.checked_mul(p.c)),
        p.out_w.checked_mul(p.c),
    ) else {
        return false;
    };
    let Some(out_len) = row_len.checked_mul(p.out_h) else {
        return false;
    };
    if !(p.stride == 1 || p.stride == 2)
        || rows.start > rows.end
        || rows.end > p.out_h
        || p.x.len() < in_len
        || y.len() < (rows.end - rows.start) * row_len
        || p.weight.len() < dw_weights_len(p.c)
        || p.bias.is_some_and(|b| b.len() < p.c)
        || p.residual.is_some_and(|r| r.len() < out_len)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::depthwise3x3_nhwc(variant, p, rows.clone(), y) {
        return true;
    }
    let _ = variant;
    dw_nhwc_body::<false>(p, rows, y);
    true
}

/// One output row of a [`DwNhwc`] convolution from its three input rows (`None`: a row
/// outside the image, read as zeros), for callers that produce the input a few rows at a time
/// (a fused 1x1 -> depthwise pair). `p.x`, `p.h`, `p.pad_top`, `p.out_h` and `p.residual` are
/// not read; `y` is the `out_w * c` output row. `false` when a slice is too short or the
/// stride is not 1 or 2.
pub fn depthwise3x3_nhwc_row(
    variant: Variant,
    p: &DwNhwc<'_>,
    rows: [Option<&[f32]>; 3],
    y: &mut [f32],
) -> bool {
    let (Some(row_in), Some(row_out)) = (p.w.checked_mul(p.c), p.out_w.checked_mul(p.c)) else {
        return false;
    };
    if !(p.stride == 1 || p.stride == 2)
        || rows.iter().flatten().any(|r| r.len() < row_in)
        || y.len() < row_out
        || p.weight.len() < dw_weights_len(p.c)
        || p.bias.is_some_and(|b| b.len() < p.c)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::depthwise3x3_nhwc_row(variant, p, rows, y) {
        return true;
    }
    // The three rows as a small image whose one output row is the wanted one.
    let mut img = vec![0f32; 3 * row_in];
    for (dst, r) in img.chunks_exact_mut(row_in.max(1)).zip(rows) {
        if let Some(r) = r {
            dst.copy_from_slice(&r[..row_in]);
        }
    }
    let q = DwNhwc {
        x: &img,
        h: 3,
        pad_top: 0,
        out_h: 1,
        residual: None,
        ..*p
    };
    depthwise3x3_nhwc(variant, &q, 0..1, y)
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lanes of the depthwise body (one AVX-512 vector).
const L: usize = 16;

/// The depthwise body (sizes checked by the caller): per output pixel, the taps inside the
/// image, 16 channels at a time; bias, residual and a clamp applied in registers.
#[inline(always)]
pub(crate) fn dw_nhwc_body<const FMA: bool>(p: &DwNhwc<'_>, rows: Range<usize>, y: &mut [f32]) {
    let c = p.c;
    let (lo, hi, other) = match p.act.clamp_bounds() {
        Some((lo, hi)) => (lo, hi, false),
        None => (f32::NEG_INFINITY, f32::INFINITY, true),
    };
    let full = c / L * L;
    let r0 = rows.start;
    for oy in rows {
        let iy0 = (oy * p.stride) as isize - p.pad_top as isize;
        let ky = (0.max(-iy0) as usize)..(3.min(p.h as isize - iy0).max(0) as usize);
        for ox in 0..p.out_w {
            let ix0 = (ox * p.stride) as isize - p.pad_left as isize;
            let kx = (0.max(-ix0) as usize)..(3.min(p.w as isize - ix0).max(0) as usize);
            let o = ((oy - r0) * p.out_w + ox) * c;
            let ro = (oy * p.out_w + ox) * c;
            let out = &mut y[o..o + c];
            let mut ch = 0;
            while ch < full {
                let mut acc = [0f32; L];
                if let Some(b) = p.bias {
                    acc.copy_from_slice(&b[ch..ch + L]);
                }
                for ty in ky.clone() {
                    let iy = (iy0 + ty as isize) as usize;
                    for tx in kx.clone() {
                        let ix = (ix0 + tx as isize) as usize;
                        let xi = (iy * p.w + ix) * c + ch;
                        let wi = dw_at(ch, ty * 3 + tx);
                        let xs: &[f32; L] = p.x[xi..xi + L].try_into().expect("16 lanes");
                        let ws: &[f32; L] = p.weight[wi..wi + L].try_into().expect("16 lanes");
                        for l in 0..L {
                            acc[l] = madd::<FMA>(xs[l], ws[l], acc[l]);
                        }
                    }
                }
                if let Some(r) = p.residual {
                    for (a, &z) in acc.iter_mut().zip(&r[ro + ch..ro + ch + L]) {
                        *a += z;
                    }
                }
                for (d, &a) in out[ch..ch + L].iter_mut().zip(&acc) {
                    *d = a.max(lo).min(hi);
                }
                ch += L;
            }
            for (j, d) in out.iter_mut().enumerate().skip(full) {
                let mut a = p.bias.map_or(0.0, |b| b[j]);
                for ty in ky.clone() {
                    let iy = (iy0 + ty as isize) as usize;
                    for tx in kx.clone() {
                        let ix = (ix0 + tx as isize) as usize;
                        a = madd::<FMA>(
                            p.x[(iy * p.w + ix) * c + j],
                            p.weight[dw_at(j, ty * 3 + tx)],
                            a,
                        );
                    }
                }
                if let Some(r) = p.residual {
                    a += r[ro + j];
                }
                *d = a.max(lo).min(hi);
            }
            if other {
                p.act.apply_slice(out);
            }
        }
    }
}

/// A dense KxK convolution (one group) over an image with few channels (a network's RGB
/// input, NCHW or NHWC) writing NHWC: `y[oy][ox][j]` over `[out_h, out_w, m]`.
pub struct DenseSmallC<'a> {
    /// `[c, h, w]`, or `[h, w, c]` with `input_nhwc`.
    pub x: &'a [f32],
    pub input_nhwc: bool,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub out_h: usize,
    pub out_w: usize,
    pub m: usize,
    /// `[c][kh][kw][m]`: tap-major, a tap's weights for all output channels contiguous.
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub act: Activation,
}

/// OIHW weights `[m, c, kh, kw]` into the tap-major `[c][kh][kw][m]` form [`DenseSmallC`] reads.
pub fn dense_weights_tap_major(w: &[f32], m: usize, taps: usize) -> Option<Vec<f32>> {
    if w.len() < m.checked_mul(taps)? {
        return None;
    }
    let mut t = vec![0f32; m * taps];
    for j in 0..m {
        for tap in 0..taps {
            t[tap * m + j] = w[j * taps + tap];
        }
    }
    Some(t)
}

/// Output rows `rows` of a [`DenseSmallC`] convolution into `y` (starting at row
/// `rows.start`); `false` when a slice is too short or a size is zero where it must not be.
pub fn dense_small_c(
    variant: Variant,
    p: &DenseSmallC<'_>,
    rows: Range<usize>,
    y: &mut [f32],
) -> bool {
    let taps = p.c.checked_mul(p.kh).and_then(|v| v.checked_mul(p.kw));
    let in_len = p.c.checked_mul(p.h).and_then(|v| v.checked_mul(p.w));
    let row_len = p.out_w.checked_mul(p.m);
    let (Some(taps), Some(in_len), Some(row_len)) = (taps, in_len, row_len) else {
        return false;
    };
    if p.stride.contains(&0)
        || rows.start > rows.end
        || rows.end > p.out_h
        || p.x.len() < in_len
        || y.len() < (rows.end - rows.start) * row_len
        || taps.checked_mul(p.m).is_none_or(|n| p.weight.len() < n)
        || p.bias.is_some_and(|b| b.len() < p.m)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::dense_small_c(variant, p, rows.clone(), y) {
        return true;
    }
    let _ = variant;
    dense_small_c_body::<false>(p, rows, y);
    true
}

/// Output pixels computed together by [`dense_small_c_body`] (a tap's weight vectors are
/// loaded once for all of them).
const DENSE_PX: usize = 4;

/// The dense body (sizes checked by the caller): `DENSE_PX` output pixels of a row at a time,
/// 16 output channels at a time, every input tap broadcast against the tap's weight vector.
#[inline(always)]
pub(crate) fn dense_small_c_body<const FMA: bool>(
    p: &DenseSmallC<'_>,
    rows: Range<usize>,
    y: &mut [f32],
) {
    let m = p.m;
    let (lo, hi, other) = match p.act.clamp_bounds() {
        Some((lo, hi)) => (lo, hi, false),
        None => (f32::NEG_INFINITY, f32::INFINITY, true),
    };
    let plane = p.h * p.w;
    let r0 = rows.start;
    // Input value of channel ci at (iy, ix), zero outside the image.
    // Strides of a channel and of a pixel in x.
    let (cs, ps) = if p.input_nhwc { (1, p.c) } else { (plane, 1) };
    let at = |ci: usize, iy: isize, ix: isize| -> f32 {
        if iy < 0 || ix < 0 || iy >= p.h as isize || ix >= p.w as isize {
            0.0
        } else {
            p.x[ci * cs + (iy as usize * p.w + ix as usize) * ps]
        }
    };
    for oy in rows {
        let iy0 = (oy * p.stride[0]) as isize - p.pad[0] as isize;
        let mut ox = 0;
        while ox < p.out_w {
            let n = DENSE_PX.min(p.out_w - ox);
            let mut j = 0;
            while j < m {
                let lanes = L.min(m - j);
                let mut acc = [[0f32; L]; DENSE_PX];
                if let Some(b) = p.bias {
                    for a in acc.iter_mut() {
                        a[..lanes].copy_from_slice(&b[j..j + lanes]);
                    }
                }
                for ci in 0..p.c {
                    for ty in 0..p.kh {
                        let iy = iy0 + ty as isize;
                        for tx in 0..p.kw {
                            let wi = ((ci * p.kh + ty) * p.kw + tx) * m + j;
                            let mut ws = [0f32; L];
                            ws[..lanes].copy_from_slice(&p.weight[wi..wi + lanes]);
                            for (q, a) in acc.iter_mut().enumerate().take(n) {
                                let ix = ((ox + q) * p.stride[1]) as isize - p.pad[1] as isize
                                    + tx as isize;
                                let xv = at(ci, iy, ix);
                                for l in 0..L {
                                    a[l] = madd::<FMA>(xv, ws[l], a[l]);
                                }
                            }
                        }
                    }
                }
                for (q, a) in acc.iter().enumerate().take(n) {
                    let o = ((oy - r0) * p.out_w + ox + q) * m + j;
                    for (d, &v) in y[o..o + lanes].iter_mut().zip(a) {
                        *d = v.max(lo).min(hi);
                    }
                }
                j += L;
            }
            if other {
                let o = ((oy - r0) * p.out_w + ox) * m;
                p.act.apply_slice(&mut y[o..o + n * m]);
            }
            ox += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch;

    fn rnd(seed: &mut u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    const ACTS: [Activation; 4] = [
        Activation::Identity,
        Activation::Relu,
        Activation::Clip { lo: -0.05, hi: 0.1 },
        Activation::HardSwish,
    ];

    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "{what}: element {i}: {g} vs {w}");
        }
    }

    /// Every variant against a direct sum: pixel counts that are not multiples of the
    /// 7-pixel tile (each smaller last tile: 1 to 6 rows), channel counts below, at and past a
    /// 32-channel panel, without bias, with bias, with bias and residual, every activation
    /// kind; nothing past the output is written.
    #[test]
    fn pointwise_matches_direct_sum() {
        let mut s = 7u32;
        for &(pixels, k, m) in &[
            (1, 1, 1),
            (49, 160, 96),
            (13, 24, 144),
            (25, 16, 16),
            (196, 64, 40),
            (12, 300, 33),
            // Last tiles of 8 (clamped from 7), 2 and 8 rows; at most 16 channels with an odd
            // depth (the one-vector tile's tail step).
            (30, 9, 7),
            (7, 33, 40),
            (14, 20, 64),
            (20, 8, 32),
            // 7-row tiles with last tiles of 1, 3 and 5 rows, and of 1 to 6 rows at m <= 16.
            (8, 40, 64),
            (10, 24, 48),
            (12, 17, 96),
            (8, 4, 16),
            (9, 5, 16),
            (10, 7, 16),
            (11, 6, 12),
            (12, 5, 16),
            (13, 3, 8),
            // More pixels than one small-weight block (56): a block and a merged tail.
            (200, 16, 96),
            // Weights past the small-weight block: blocks of 7 k-independent multiples
            // (49: one block of 49; 150 = 35 + 35 + 35 + a merged tail of 45).
            (49, 960, 72),
            (150, 1200, 64),
        ] {
            let x = rnd(&mut s, pixels * k);
            let w = rnd(&mut s, m * k);
            let bias = rnd(&mut s, m);
            let res = rnd(&mut s, pixels * m);
            let pw = PackedCols::new(&w, m, k).unwrap();
            // Bias without a residual: the whole-panel clamp epilogue of the AVX-512 tile.
            let combos = [(false, false), (true, false), (true, true)];
            for (&act, &(with_bias, with)) in
                ACTS.iter().flat_map(|a| combos.iter().map(move |c| (a, c)))
            {
                let mut want = vec![0f32; pixels * m];
                for px in 0..pixels {
                    for j in 0..m {
                        let mut a = 0f64;
                        for kk in 0..k {
                            a += x[px * k + kk] as f64 * w[j * k + kk] as f64;
                        }
                        let mut v = a as f32;
                        if with_bias {
                            v += bias[j];
                        }
                        if with {
                            v += res[px * m + j];
                        }
                        want[px * m + j] = act.apply(v);
                    }
                }
                for v in dispatch::detected() {
                    let p = Pointwise {
                        x: &x,
                        pixels,
                        w: &pw,
                        bias: with_bias.then_some(&bias[..]),
                        residual: with.then_some(&res[..]),
                        act,
                    };
                    let mut y = vec![f32::NAN; pixels * m + 5];
                    assert!(pointwise(v, &p, &mut y));
                    close(
                        &y[..pixels * m],
                        &want,
                        1e-5 * (k as f32 + 1.0),
                        &format!("{v:?} {pixels}x{k}x{m} {act:?}"),
                    );
                    assert!(y[pixels * m..].iter().all(|v| v.is_nan()), "wrote past y");
                }
            }
        }
    }

    /// The channel split gives what the whole call gives, for 2 to 4 parts over uneven panel
    /// counts (a partial last panel, a residual, a bias), run on separate threads; it declines
    /// a non-clamp activation, fewer panels than parts and short slices.
    #[test]
    fn pointwise_by_channels_matches_pointwise() {
        let mut s = 17u32;
        for &(pixels, k, m, parts) in &[
            (49, 160, 960, 2),
            (49, 40, 100, 3),
            (9, 7, 72, 2),
            (20, 33, 200, 4),
        ] {
            let x = rnd(&mut s, pixels * k);
            let w = rnd(&mut s, m * k);
            let bias = rnd(&mut s, m);
            let res = rnd(&mut s, pixels * m);
            let pw = PackedCols::new(&w, m, k).unwrap();
            for act in [
                Activation::Identity,
                Activation::Clip { lo: -0.05, hi: 0.1 },
            ] {
                for with in [false, true] {
                    let p = Pointwise {
                        x: &x,
                        pixels,
                        w: &pw,
                        bias: Some(&bias),
                        residual: with.then_some(&res[..]),
                        act,
                    };
                    for v in dispatch::detected() {
                        let mut want = vec![f32::NAN; pixels * m];
                        assert!(pointwise(v, &p, &mut want));
                        let mut got = vec![f32::NAN; pixels * m + 3];
                        let Some(split) = pointwise_by_channels(v, &p, &mut got, parts) else {
                            continue;
                        };
                        assert_eq!(split.len(), parts);
                        std::thread::scope(|sc| {
                            for part in split {
                                sc.spawn(move || part.run());
                            }
                        });
                        assert_eq!(
                            &got[..pixels * m],
                            &want[..],
                            "{v:?} {pixels}x{k}x{m}/{parts}"
                        );
                        assert!(got[pixels * m..].iter().all(|v| v.is_nan()), "wrote past y");
                    }
                }
            }
        }
        let w = PackedCols::new(&[0.5; 64 * 3], 64, 3).unwrap();
        let x = [1f32; 6];
        let p = |act| Pointwise {
            x: &x,
            pixels: 2,
            w: &w,
            bias: None,
            residual: None,
            act,
        };
        let mut y = vec![0f32; 128];
        for v in dispatch::detected() {
            assert!(pointwise_by_channels(v, &p(Activation::HardSwish), &mut y, 2).is_none());
            assert!(pointwise_by_channels(v, &p(Activation::Relu), &mut y, 3).is_none());
            assert!(pointwise_by_channels(v, &p(Activation::Relu), &mut y[..127], 2).is_none());
        }
        // The AVX-512 tile splits when the CPU has it.
        #[cfg(target_arch = "x86_64")]
        if dispatch::detected().contains(&Variant::Avx512) {
            assert!(
                pointwise_by_channels(Variant::Avx512, &p(Activation::Relu), &mut y, 2).is_some()
            );
        }
    }

    #[test]
    fn pointwise_refuses_short_slices() {
        let w = [1f32; 6];
        let pw = PackedCols::new(&w, 3, 2).unwrap();
        let x = [1f32; 8];
        let p = Pointwise {
            x: &x[..7],
            pixels: 4,
            w: &pw,
            bias: None,
            residual: None,
            act: Activation::Identity,
        };
        let mut y = [0f32; 12];
        assert!(!pointwise(Variant::Portable, &p, &mut y));
        let p = Pointwise { x: &x, ..p };
        assert!(!pointwise(Variant::Portable, &p, &mut y[..11]));
        assert!(pointwise(Variant::Portable, &p, &mut y));
        assert_eq!(y, [2f32; 12]);
        assert!(PackedCols::new(&w[..5], 3, 2).is_none());
    }

    /// NCHW reference of a depthwise 3x3 on `[c, h, w]`, output `[c, oh, ow]`.
    #[allow(clippy::too_many_arguments)]
    fn dw_ref(
        x: &[f32],
        c: usize,
        h: usize,
        w: usize,
        s: usize,
        pt: usize,
        pl: usize,
        oh: usize,
        ow: usize,
        wt: &[f32],
    ) -> Vec<f32> {
        let mut y = vec![0f32; c * oh * ow];
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut a = 0f64;
                    for ty in 0..3 {
                        for tx in 0..3 {
                            let iy = (oy * s + ty) as isize - pt as isize;
                            let ix = (ox * s + tx) as isize - pl as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                a += x[(ch * h + iy as usize) * w + ix as usize] as f64
                                    * wt[ch * 9 + ty * 3 + tx] as f64;
                            }
                        }
                    }
                    y[(ch * oh + oy) * ow + ox] = a as f32;
                }
            }
        }
        y
    }

    fn to_nhwc(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        for ch in 0..c {
            for p in 0..hw {
                y[p * c + ch] = x[ch * hw + p];
            }
        }
        y
    }

    /// Strides 1 and 2, padded and unpadded edges, channel counts with a scalar remainder,
    /// bias + residual + each activation, a row range, on every variant.
    #[test]
    fn depthwise_nhwc_matches_nchw_reference() {
        let mut s = 11u32;
        for &(c, h, w, st, pt, pl, oh, ow) in &[
            (32, 7, 9, 1, 1, 1, 7, 9),
            (20, 8, 8, 2, 0, 0, 3, 3),
            (48, 9, 6, 2, 1, 1, 5, 3),
            (5, 3, 3, 1, 1, 1, 3, 3),
            (16, 2, 2, 1, 1, 1, 2, 2),
            // Rows wide enough for strips of 8 pixels (stride 1 and 2, padded or not) with
            // border pixels and leftovers on both sides.
            (32, 6, 21, 1, 1, 1, 6, 21),
            (48, 7, 40, 2, 1, 1, 4, 20),
            (16, 9, 19, 2, 0, 0, 4, 9),
        ] {
            let x = rnd(&mut s, c * h * w);
            let wt = rnd(&mut s, c * 9);
            let bias = rnd(&mut s, c);
            let res = rnd(&mut s, c * oh * ow);
            let base = dw_ref(&x, c, h, w, st, pt, pl, oh, ow, &wt);
            let xn = to_nhwc(&x, c, h * w);
            let tw = dw_weights_blocked(&wt, c).unwrap();
            let resn = to_nhwc(&res, c, oh * ow);
            for (ai, &act) in ACTS.iter().enumerate() {
                let with = ai % 2 == 0;
                let mut want = base.clone();
                for (i, v) in want.iter_mut().enumerate() {
                    if with {
                        *v += bias[i / (oh * ow)] + res[i];
                    }
                    *v = act.apply(*v);
                }
                let want = to_nhwc(&want, c, oh * ow);
                for v in dispatch::detected() {
                    let p = DwNhwc {
                        x: &xn,
                        h,
                        w,
                        c,
                        stride: st,
                        pad_top: pt,
                        pad_left: pl,
                        out_h: oh,
                        out_w: ow,
                        weight: &tw,
                        bias: with.then_some(&bias[..]),
                        residual: with.then_some(&resn[..]),
                        act,
                    };
                    let mut y = vec![f32::NAN; c * oh * ow + 3];
                    assert!(depthwise3x3_nhwc(v, &p, 0..oh, &mut y));
                    let what = format!("{v:?} c{c} {h}x{w} s{st} {act:?}");
                    close(&y[..c * oh * ow], &want, 1e-5, &what);
                    assert!(y[c * oh * ow..].iter().all(|v| v.is_nan()), "wrote past y");
                    // Row by row from three input rows (no residual in that form).
                    if !with {
                        for oy in 0..oh {
                            let rows = [0, 1, 2].map(|ty| {
                                let iy = (oy * st + ty) as isize - pt as isize;
                                (iy >= 0 && (iy as usize) < h).then(|| {
                                    let iy = iy as usize;
                                    &xn[iy * w * c..(iy + 1) * w * c]
                                })
                            });
                            let mut yr = vec![f32::NAN; ow * c];
                            assert!(depthwise3x3_nhwc_row(v, &p, rows, &mut yr));
                            close(&yr, &want[oy * ow * c..(oy + 1) * ow * c], 1e-5, &what);
                        }
                    }
                    // Rows 1.. only, into a buffer that starts at row 1.
                    if oh > 1 {
                        let mut y1 = vec![f32::NAN; (oh - 1) * ow * c];
                        assert!(depthwise3x3_nhwc(v, &p, 1..oh, &mut y1));
                        close(&y1, &want[ow * c..], 1e-5, &what);
                    }
                }
            }
        }
        let x = [0f32; 8];
        let p = DwNhwc {
            x: &x,
            h: 2,
            w: 2,
            c: 2,
            stride: 3,
            pad_top: 0,
            pad_left: 0,
            out_h: 1,
            out_w: 1,
            weight: &[0.0; 144],
            bias: None,
            residual: None,
            act: Activation::Identity,
        };
        let mut y = [0f32; 2];
        assert!(!depthwise3x3_nhwc(Variant::Portable, &p, 0..1, &mut y));
        let p = DwNhwc { stride: 1, ..p };
        assert!(!depthwise3x3_nhwc(Variant::Portable, &p, 0..2, &mut y));
        assert!(depthwise3x3_nhwc(Variant::Portable, &p, 0..1, &mut y));
    }

    /// A 3x3 stride-2 RGB stem and a 5x3 stride-(1,2) odd one against a direct sum, reading
    /// NCHW and NHWC input.
    #[test]
    fn dense_small_c_matches_direct_sum() {
        let mut s = 5u32;
        for &(c, h, w, kh, kw, st, pad, m) in &[
            (3, 11, 13, 3, 3, [2, 2], [1, 1], 32),
            (2, 7, 6, 5, 3, [1, 2], [2, 0], 19),
            (1, 4, 4, 1, 1, [1, 1], [0, 0], 3),
        ] {
            let oh = (h + 2 * pad[0] - kh) / st[0] + 1;
            let ow = (w + 2 * pad[1] - kw) / st[1] + 1;
            let x = rnd(&mut s, c * h * w);
            let wt = rnd(&mut s, m * c * kh * kw);
            let bias = rnd(&mut s, m);
            let tw = dense_weights_tap_major(&wt, m, c * kh * kw).unwrap();
            for &act in &ACTS {
                let mut want = vec![0f32; oh * ow * m];
                for oy in 0..oh {
                    for ox in 0..ow {
                        for j in 0..m {
                            let mut a = bias[j] as f64;
                            for ci in 0..c {
                                for ty in 0..kh {
                                    for tx in 0..kw {
                                        let iy = (oy * st[0] + ty) as isize - pad[0] as isize;
                                        let ix = (ox * st[1] + tx) as isize - pad[1] as isize;
                                        if iy >= 0
                                            && ix >= 0
                                            && (iy as usize) < h
                                            && (ix as usize) < w
                                        {
                                            a += x[(ci * h + iy as usize) * w + ix as usize] as f64
                                                * wt[((j * c + ci) * kh + ty) * kw + tx] as f64;
                                        }
                                    }
                                }
                            }
                            want[(oy * ow + ox) * m + j] = act.apply(a as f32);
                        }
                    }
                }
                let xn = to_nhwc(&x, c, h * w);
                for (v, nhwc_in) in dispatch::detected()
                    .into_iter()
                    .flat_map(|v| [(v, false), (v, true)])
                {
                    let p = DenseSmallC {
                        x: if nhwc_in { &xn } else { &x },
                        input_nhwc: nhwc_in,
                        c,
                        h,
                        w,
                        kh,
                        kw,
                        stride: st,
                        pad,
                        out_h: oh,
                        out_w: ow,
                        m,
                        weight: &tw,
                        bias: Some(&bias),
                        act,
                    };
                    let mut y = vec![f32::NAN; oh * ow * m + 2];
                    assert!(dense_small_c(v, &p, 0..oh, &mut y));
                    let what = format!("{v:?} c{c} {kh}x{kw} {act:?} nhwc {nhwc_in}");
                    close(&y[..oh * ow * m], &want, 1e-5, &what);
                    assert!(y[oh * ow * m..].iter().all(|v| v.is_nan()), "wrote past y");
                    let mut y1 = vec![f32::NAN; (oh - 1) * ow * m];
                    assert!(dense_small_c(v, &p, 1..oh, &mut y1));
                    close(&y1, &want[ow * m..], 1e-5, &what);
                }
            }
        }
    }
}
