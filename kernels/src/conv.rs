//! Convolution kernels on NCHW slices that are not a plain GEMM: depthwise 3x3 (stride 1 or 2)
//! and the transforms of Winograd F(4x4, 3x3) for stride-1 3x3 convolutions.
//!
//! Winograd: the weights are transformed once (`U = G g G^T`, 36 matrices M x C, see
//! [`wino_weights`]); per run the input tiles are transformed (`V = B^T d B`, 36 matrices C x T
//! for T tiles of 4x4 outputs), the 36 products `U V` are packed GEMMs, and the output transform
//! (`Y = A^T M A`) applies bias, residual and activation. This does 4x fewer multiplies than a
//! direct 3x3 convolution; the transforms are vectorized across tiles (lanes = tiles).
//!
//! Each kernel's body is a safe `#[inline(always)]` function; [`crate::simd`] compiles it with
//! AVX-512 or AVX2, the portable build runs it as is.

use crate::dispatch::{self, Variant};
use crate::packed::Activation;

/// A depthwise 3x3 convolution of one image (one filter per channel).
#[derive(Clone, Copy, Debug)]
pub struct Dw3x3<'a> {
    /// Input `[c, h, w]`.
    pub x: &'a [f32],
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// 1 or 2 (both axes).
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// `[c, 3, 3]`.
    pub weight: &'a [f32],
    /// `[c]`.
    pub bias: Option<&'a [f32]>,
    pub act: Activation,
}

/// Depthwise 3x3 into `y` (`[c, out_h, out_w]`). Returns `false` (touching nothing) when a
/// slice is too short or the stride is not 1 or 2.
pub fn depthwise3x3(p: &Dw3x3<'_>, y: &mut [f32]) -> bool {
    depthwise3x3_with(dispatch::selected(), p, y)
}

/// [`depthwise3x3`] with a chosen variant (tests, benches).
pub fn depthwise3x3_with(variant: Variant, p: &Dw3x3<'_>, y: &mut [f32]) -> bool {
    let Some(in_len) = p.c.checked_mul(p.h).and_then(|v| v.checked_mul(p.w)) else {
        return false;
    };
    let Some(out_len) =
        p.c.checked_mul(p.out_h)
            .and_then(|v| v.checked_mul(p.out_w))
    else {
        return false;
    };
    if !(p.stride == 1 || p.stride == 2)
        || p.x.len() < in_len
        || y.len() < out_len
        || p.weight.len() < p.c * 9
        || p.bias.is_some_and(|b| b.len() < p.c)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::depthwise3x3_rows(variant, p, y) {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::depthwise3x3(variant, p, y) {
        return true;
    }
    let _ = variant;
    depthwise3x3_body::<false>(p, y);
    true
}

/// Depthwise 3x3 over whole planes: the input is copied into zero-padded planes, one per
/// row parity for stride 2, so each of the nine taps is one long contiguous multiply-add over
/// a "wide" output plane (rows as wide as the padded input, every column computed); the valid
/// (every `stride`-th) columns are then copied out with the activation. Stride 2 thus does
/// twice the multiply-adds it needs, all vectorized, instead of gathering columns.
#[inline(always)]
pub(crate) fn depthwise3x3_body<const FMA: bool>(p: &Dw3x3<'_>, y: &mut [f32]) {
    let (h, w, s) = (p.h, p.w, p.stride);
    let (oh, ow) = (p.out_h, p.out_w);
    if oh == 0 || ow == 0 {
        return;
    }
    // Padded extent that the outputs read: rows 0..(oh-1)*s+3, columns 0..(ow-1)*s+3.
    let ph = (oh - 1) * s + 3;
    let wc = (ow - 1) * s + 3;
    // Plane `r % s` holds padded rows r = plane + s * k at row k.
    let hr = ph.div_ceil(s);
    let plane_len = hr * wc + 2;
    let mut pad = vec![0f32; s * plane_len];
    let wide_len = (oh - 1) * wc + (ow - 1) * s + 1;
    let mut wide = vec![0f32; wide_len];
    let q0 = p.pad_left.min(wc);
    let q1 = (p.pad_left + w).min(wc);
    for ch in 0..p.c {
        let xc = &p.x[ch * h * w..(ch + 1) * h * w];
        // Fill the padded planes: padded (r, q) is input (r - pad_top, q - pad_left).
        pad.fill(0.0);
        for r in p.pad_top.min(ph)..(p.pad_top + h).min(ph) {
            let src = &xc[(r - p.pad_top) * w..(r - p.pad_top + 1) * w];
            let base = (r % s) * plane_len + (r / s) * wc;
            pad[base + q0..base + q1].copy_from_slice(&src[q0 - p.pad_left..q1 - p.pad_left]);
        }
        let k = &p.weight[ch * 9..ch * 9 + 9];
        wide.fill(p.bias.map_or(0.0, |b| b[ch]));
        for ky in 0..3 {
            let base = (ky % s) * plane_len + (ky / s) * wc;
            // The three taps of a kernel row in one pass over `wide`.
            let (s0, s1, s2) = (
                &pad[base..base + wide_len],
                &pad[base + 1..base + 1 + wide_len],
                &pad[base + 2..base + 2 + wide_len],
            );
            let (k0, k1, k2) = (k[ky * 3], k[ky * 3 + 1], k[ky * 3 + 2]);
            for (((o, &a), &b), &c) in wide.iter_mut().zip(s0).zip(s1).zip(s2) {
                *o = if FMA {
                    c.mul_add(k2, b.mul_add(k1, a.mul_add(k0, *o)))
                } else {
                    *o + k0 * a + k1 * b + k2 * c
                };
            }
        }
        // The activation over the whole wide plane (contiguous; re-reading rows just written
        // with scalar stores would stall on store forwarding).
        p.act.apply_slice(&mut wide);
        let yc = &mut y[ch * oh * ow..(ch + 1) * oh * ow];
        for (oy, row) in yc.chunks_exact_mut(ow).enumerate() {
            let src = &wide[oy * wc..];
            if s == 1 {
                row.copy_from_slice(&src[..ow]);
            } else {
                for (o, &v) in row.iter_mut().zip(src.iter().step_by(s)) {
                    *o = v;
                }
            }
        }
    }
}

/// Transformed weights of a 3x3 convolution for F(4x4, 3x3): `[36][m][c]` (row-major M x C
/// per position), computed in f64. `None` when `w` (`[m, c, 3, 3]`) is too short.
pub fn wino_weights(w: &[f32], m: usize, c: usize) -> Option<Vec<f32>> {
    const G: [[f64; 3]; 6] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mc = m.checked_mul(c)?;
    if w.len() < mc.checked_mul(9)? {
        return None;
    }
    let mut u = vec![0f32; mc.checked_mul(36)?];
    for o in 0..m {
        for i in 0..c {
            let g = &w[(o * c + i) * 9..(o * c + i) * 9 + 9];
            // t = G g (6x3), then U = t G^T (6x6).
            let mut t = [[0f64; 3]; 6];
            for (r, tr) in t.iter_mut().enumerate() {
                for (col, tv) in tr.iter_mut().enumerate() {
                    *tv = (0..3).map(|q| G[r][q] * g[q * 3 + col] as f64).sum();
                }
            }
            for r in 0..6 {
                for col in 0..6 {
                    let v: f64 = (0..3).map(|q| t[r][q] * G[col][q]).sum();
                    u[(r * 6 + col) * mc + o * c + i] = v as f32;
                }
            }
        }
    }
    Some(u)
}

/// Number of 4x4 output tiles along an axis of `out` outputs.
pub fn wino_tiles(out: usize) -> usize {
    out.div_ceil(4)
}

/// The input transform of one image: `[c, h, w]` with padding (`pad_top`, `pad_left`, zeros
/// elsewhere) into `v`, `[36][c][T]` with `T = tiles_y * tiles_x`.
#[derive(Clone, Copy, Debug)]
pub struct WinoInput<'a> {
    pub x: &'a [f32],
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub tiles_y: usize,
    pub tiles_x: usize,
}

/// Runs the input transform. Returns `false` when a slice is too short.
pub fn wino_input(variant: Variant, p: &WinoInput<'_>, v: &mut [f32]) -> bool {
    let plane = p.c * p.tiles_y * p.tiles_x;
    if v.len() < 36 * plane {
        return false;
    }
    let mut planes: Vec<&mut [f32]> = v.chunks_mut(plane.max(1)).take(36).collect();
    planes.resize_with(36, Default::default);
    wino_input_planes(variant, p, &mut planes)
}

/// [`wino_input`] into 36 separate planes (`planes[k]`: `[c][T]` of transform position `k`),
/// so threads can each transform a range of channels into their own parts of `[36][C][T]`
/// (each plane split at the same channel). Returns `false` when a slice is too short.
pub fn wino_input_planes(variant: Variant, p: &WinoInput<'_>, planes: &mut [&mut [f32]]) -> bool {
    let t = p.tiles_y * p.tiles_x;
    if p.x.len() < p.c * p.h * p.w || planes.len() < 36 || planes.iter().any(|q| q.len() < p.c * t)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::wino_input(variant, p, planes) {
        return true;
    }
    let _ = variant;
    wino_input_body(p, planes);
    true
}

/// `B^T` of F(4x4, 3x3) applied to six lanes-long rows.
#[inline(always)]
fn bt6(d: [&[f32]; 6], out: &mut [f32], stride: usize, n: usize) {
    let (o, rest) = out.split_at_mut(stride);
    let (o1, rest) = rest.split_at_mut(stride);
    let (o2, rest) = rest.split_at_mut(stride);
    let (o3, rest) = rest.split_at_mut(stride);
    let (o4, o5) = rest.split_at_mut(stride);
    bt6_into(d, [o, o1, o2, o3, o4, o5], n);
}

/// [`bt6`] into six separate output slices (each at least `n` long, as the inputs).
#[inline(always)]
fn bt6_into(d: [&[f32]; 6], o: [&mut [f32]; 6], n: usize) {
    // Slicing everything to n first lets the loop run without bounds checks, vectorized.
    let [o0, o1, o2, o3, o4, o5] = o;
    let (o, o1, o2, o3, o4, o5) = (
        &mut o0[..n],
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    let d: [&[f32]; 6] = std::array::from_fn(|i| &d[i][..n]);
    for t in 0..n {
        let (d0, d1, d2, d3, d4, d5) = (d[0][t], d[1][t], d[2][t], d[3][t], d[4][t], d[5][t]);
        o[t] = 4.0 * d0 - 5.0 * d2 + d4;
        o1[t] = -4.0 * (d1 + d2) + d3 + d4;
        o2[t] = 4.0 * (d1 - d2) - d3 + d4;
        o3[t] = 2.0 * (d3 - d1) - d2 + d4;
        o4[t] = 2.0 * (d1 - d3) - d2 + d4;
        o5[t] = 4.0 * d1 - 5.0 * d3 + d5;
    }
}

#[inline(always)]
pub(crate) fn wino_input_body(p: &WinoInput<'_>, v: &mut [&mut [f32]]) {
    let (h, w) = (p.h, p.w);
    let txn = p.tiles_x;
    let t = p.tiles_y * txn;
    // The channel's zero-padded rows split by column mod 4: padded row `py`, phase `q`,
    // index `k` holds padded column 4k + q at `(py * 4 + q) * pw + k`. Patch column `col` of
    // tile `tx` is then phase col % 4 at index tx + col / 4: one contiguous run per tile row
    // instead of a gather with bounds checks per element.
    let pw = txn + 1;
    let rows_p = 4 * p.tiles_y + 2;
    let mut pp = vec![0f32; rows_p * 4 * pw];
    // u[r*6 + j][tile]: patch row r after the transform along its columns, lanes = tiles.
    let mut u = vec![0f32; 36 * t];
    for ch in 0..p.c {
        let xc = &p.x[ch * h * w..(ch + 1) * h * w];
        pp.fill(0.0);
        for (iy, xrow) in xc.chunks_exact(w.max(1)).enumerate().take(h) {
            let py = iy + p.pad_top;
            if py >= rows_p {
                break;
            }
            let prow = &mut pp[py * 4 * pw..(py + 1) * 4 * pw];
            let (p0, rest) = prow.split_at_mut(pw);
            let (p1, rest) = rest.split_at_mut(pw);
            let (p2, p3) = rest.split_at_mut(pw);
            // Padded column j = ix + pad_left goes to phase j % 4, index j / 4.
            let lead = (4 - p.pad_left % 4) % 4;
            for (ix, &val) in xrow.iter().enumerate().take(lead.min(w)) {
                let j = ix + p.pad_left;
                if j < 4 * pw {
                    [&mut *p0, &mut *p1, &mut *p2, &mut *p3][j % 4][j / 4] = val;
                }
            }
            if lead < w {
                let k0 = (lead + p.pad_left) / 4;
                let quads = xrow[lead..].chunks_exact(4);
                let tail = quads.remainder();
                let n = (pw - k0.min(pw)).min((w - lead) / 4);
                for (k, q) in quads.take(n).enumerate() {
                    p0[k0 + k] = q[0];
                    p1[k0 + k] = q[1];
                    p2[k0 + k] = q[2];
                    p3[k0 + k] = q[3];
                }
                let kt = k0 + n;
                if n == (w - lead) / 4 && kt < pw {
                    let phases = [&mut *p0, &mut *p1, &mut *p2, &mut *p3];
                    for (q, &val) in tail.iter().enumerate() {
                        phases[q][kt] = val;
                    }
                }
            }
        }
        // Along columns of each patch row, straight from the phases: u[r*6 + j] = (d_r B)_j
        // for one tile row at a time (lanes = its tiles).
        for ty in 0..p.tiles_y {
            for r in 0..6 {
                let prow = &pp[(ty * 4 + r) * 4 * pw..][..4 * pw];
                let cols: [&[f32]; 6] =
                    std::array::from_fn(|col| &prow[(col % 4) * pw + col / 4..][..txn]);
                let at = r * 6 * t + ty * txn;
                bt6(cols, &mut u[at..at + 5 * t + txn], t, txn);
            }
        }
        // Along rows: V[i*6 + j] = sum_r BT[i][r] u[r*6 + j], written to v[(i*6+j)][ch][..].
        for j in 0..6 {
            let rows: [&[f32]; 6] = std::array::from_fn(|r| &u[(r * 6 + j) * t..][..t]);
            let (a, rest) = v.split_at_mut(6 + j);
            let (b, rest) = rest.split_at_mut(6);
            let (c, rest) = rest.split_at_mut(6);
            let (d, rest) = rest.split_at_mut(6);
            let (e, f) = rest.split_at_mut(6);
            let outs = [
                &mut a[j][ch * t..(ch + 1) * t],
                &mut b[0][ch * t..(ch + 1) * t],
                &mut c[0][ch * t..(ch + 1) * t],
                &mut d[0][ch * t..(ch + 1) * t],
                &mut e[0][ch * t..(ch + 1) * t],
                &mut f[0][ch * t..(ch + 1) * t],
            ];
            bt6_into(rows, outs, t);
        }
    }
}

/// The output transform: `mm` (`[36][m_total][T]`, the 36 GEMM results) for output channels
/// `first..first + m` into `y` (`[m, out_h, out_w]`), adding the bias (indexed by absolute
/// channel) and residual (laid out like `y`) and applying the activation.
#[derive(Clone, Copy, Debug)]
pub struct WinoOutput<'a> {
    pub mm: &'a [f32],
    pub m_total: usize,
    pub first: usize,
    pub m: usize,
    pub tiles_y: usize,
    pub tiles_x: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

/// Runs the output transform. Returns `false` when a slice is too short or the tile counts are
/// not [`wino_tiles`] of the output size.
pub fn wino_output(variant: Variant, p: &WinoOutput<'_>, y: &mut [f32]) -> bool {
    let t = p.tiles_y * p.tiles_x;
    let n = p.m * p.out_h * p.out_w;
    if p.first + p.m > p.m_total
        || p.mm.len() < 36 * p.m_total * t
        || y.len() < n
        || p.residual.is_some_and(|r| r.len() < n)
        || p.bias.is_some_and(|b| b.len() < p.m_total)
        || p.tiles_y != wino_tiles(p.out_h)
        || p.tiles_x != wino_tiles(p.out_w)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::wino_output(variant, p, y) {
        return true;
    }
    let _ = variant;
    wino_output_body(p, y);
    true
}

/// `A^T` of F(4x4, 3x3) applied to six lanes-long rows, four outputs.
#[inline(always)]
fn at6(d: [&[f32]; 6], out: &mut [f32], stride: usize, n: usize) {
    let (o, rest) = out.split_at_mut(stride);
    let (o1, rest) = rest.split_at_mut(stride);
    let (o2, o3) = rest.split_at_mut(stride);
    // Sliced to n first: the loop runs without bounds checks, vectorized.
    let (o, o1, o2, o3) = (&mut o[..n], &mut o1[..n], &mut o2[..n], &mut o3[..n]);
    let d: [&[f32]; 6] = std::array::from_fn(|i| &d[i][..n]);
    for t in 0..n {
        let (d0, d1, d2, d3, d4, d5) = (d[0][t], d[1][t], d[2][t], d[3][t], d[4][t], d[5][t]);
        let (a, b) = (d1 + d2, d1 - d2);
        let (c2, e) = (d3 + d4, d3 - d4);
        o[t] = d0 + a + c2;
        o1[t] = b + 2.0 * e;
        o2[t] = a + 4.0 * c2;
        o3[t] = b + 8.0 * e + d5;
    }
}

#[inline(always)]
pub(crate) fn wino_output_body(p: &WinoOutput<'_>, y: &mut [f32]) {
    let t = p.tiles_y * p.tiles_x;
    let (oh, ow) = (p.out_h, p.out_w);
    let mut u = vec![0f32; 24 * t];
    let mut yt = vec![0f32; 16 * t];
    for o in 0..p.m {
        let oc = p.first + o;
        let at = |xi: usize| &p.mm[(xi * p.m_total + oc) * t..(xi * p.m_total + oc + 1) * t];
        // Along rows: u[i*6 + c] = sum_r AT[i][r] M[r*6 + c].
        for c in 0..6 {
            let rows: [&[f32]; 6] = std::array::from_fn(|r| at(r * 6 + c));
            // Outputs i land at u[(i*6 + c)]: stride 6 planes from plane c.
            at6(rows, &mut u[c * t..(c + 18) * t + t], 6 * t, t);
        }
        // Along columns: Y[i*4 + j].
        for i in 0..4 {
            let rows: [&[f32]; 6] = std::array::from_fn(|c| &u[(i * 6 + c) * t..][..t]);
            at6(rows, &mut yt[i * 4 * t..(i + 1) * 4 * t], t, t);
        }
        let yo = &mut y[o * oh * ow..(o + 1) * oh * ow];
        let txn = p.tiles_x;
        // Tiles wholly inside a row take four values each; the last may be cut by the edge.
        let full = (ow / 4).min(txn);
        for ty in 0..p.tiles_y {
            for i in 0..4.min(oh - ty * 4) {
                let row = &mut yo[(ty * 4 + i) * ow..(ty * 4 + i + 1) * ow];
                let ph: [&[f32]; 4] =
                    std::array::from_fn(|j| &yt[(i * 4 + j) * t + ty * txn..][..txn]);
                for (tx, quad) in row.chunks_exact_mut(4).take(full).enumerate() {
                    quad[0] = ph[0][tx];
                    quad[1] = ph[1][tx];
                    quad[2] = ph[2][tx];
                    quad[3] = ph[3][tx];
                }
                for (j, v) in row[4 * full..].iter_mut().enumerate() {
                    *v = ph[j][full];
                }
            }
        }
        let bias = p.bias.map_or(0.0, |b| b[oc]);
        match p.residual {
            Some(r) => {
                let ro = &r[o * oh * ow..(o + 1) * oh * ow];
                for (v, &z) in yo.iter_mut().zip(ro) {
                    *v += bias + z;
                }
            }
            None => yo.iter_mut().for_each(|v| *v += bias),
        }
        p.act.apply_slice(yo);
    }
}

/// Transformed weights of a 3x3 convolution for F(2x2, 3x3): `[16][m][c]` (row-major M x C
/// per position, `U = G g G^T` with `G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]]`).
/// Used where F(4x4, 3x3) has too few tiles to fill a GEMM (7x7 maps: 16 tiles of 2x2
/// against 4 of 4x4), at 2.25x fewer multiplies than the direct convolution; its transforms
/// only add, subtract and halve, so it is more accurate than F(4x4, 3x3). `None` when `w`
/// (`[m, c, 3, 3]`) is too short.
pub fn wino2_weights(w: &[f32], m: usize, c: usize) -> Option<Vec<f32>> {
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let mc = m.checked_mul(c)?;
    if w.len() < mc.checked_mul(9)? {
        return None;
    }
    let mut u = vec![0f32; mc.checked_mul(16)?];
    for o in 0..m {
        for i in 0..c {
            let g = &w[(o * c + i) * 9..(o * c + i) * 9 + 9];
            let mut t = [[0f64; 3]; 4];
            for (r, tr) in t.iter_mut().enumerate() {
                for (col, tv) in tr.iter_mut().enumerate() {
                    *tv = (0..3).map(|q| G[r][q] * g[q * 3 + col] as f64).sum();
                }
            }
            for r in 0..4 {
                for col in 0..4 {
                    let v: f64 = (0..3).map(|q| t[r][q] * G[col][q]).sum();
                    u[(r * 4 + col) * mc + o * c + i] = v as f32;
                }
            }
        }
    }
    Some(u)
}

/// Number of 2x2 output tiles along an axis of `out` outputs (F(2x2, 3x3)).
pub fn wino2_tiles(out: usize) -> usize {
    out.div_ceil(2)
}

/// The F(2x2, 3x3) input transform `V = B^T d B` of one image (tiles of 2x2 outputs read 4x4
/// input patches) into `v`, `[16][c][T]`. Returns `false` when a slice is too short.
pub fn wino2_input(p: &WinoInput<'_>, v: &mut [f32]) -> bool {
    let plane = p
        .tiles_y
        .checked_mul(p.tiles_x)
        .and_then(|t| t.checked_mul(p.c));
    let Some(plane) = plane.filter(|&l| l.checked_mul(16).is_some_and(|n| v.len() >= n)) else {
        return false;
    };
    let mut planes: Vec<&mut [f32]> = v.chunks_mut(plane.max(1)).take(16).collect();
    planes.resize_with(16, Default::default);
    wino2_input_planes(p, &mut planes)
}

/// [`wino2_input`] into 16 separate planes (`planes[k]`: `[c][T]`), as [`wino_input_planes`].
pub fn wino2_input_planes(p: &WinoInput<'_>, v: &mut [&mut [f32]]) -> bool {
    let Some(t) = p.tiles_y.checked_mul(p.tiles_x) else {
        return false;
    };
    let in_len = p.c.checked_mul(p.h).and_then(|x| x.checked_mul(p.w));
    let plane_len = t.checked_mul(p.c);
    let (Some(in_len), Some(plane_len)) = (in_len, plane_len) else {
        return false;
    };
    if p.x.len() < in_len || v.len() < 16 || v.iter().any(|q| q.len() < plane_len) {
        return false;
    }
    let (h, w) = (p.h, p.w);
    let (tyn, txn) = (p.tiles_y, p.tiles_x);
    // One channel zero-padded (rows 2 * tiles_y + 2, columns 2 * tiles_x + 2), so every
    // tile's 4x4 patch is four in-bounds row slices; its 16 transformed values go to `e16`
    // ([16][T]) and from there to the planes as 16 contiguous runs.
    let (ph, pw) = (2 * tyn + 2, 2 * txn + 2);
    let mut pad = vec![0f32; ph * pw];
    let mut e16 = vec![0f32; 16 * t];
    for ch in 0..p.c {
        let xc = &p.x[ch * h * w..(ch + 1) * h * w];
        pad.fill(0.0);
        for (iy, xrow) in xc.chunks_exact(w.max(1)).enumerate().take(h) {
            let py = iy + p.pad_top;
            if py >= ph || p.pad_left >= pw {
                continue;
            }
            let n = w.min(pw - p.pad_left);
            pad[py * pw + p.pad_left..][..n].copy_from_slice(&xrow[..n]);
        }
        for ty in 0..tyn {
            for tx in 0..txn {
                let d: [[f32; 4]; 4] = std::array::from_fn(|r| {
                    let row = &pad[(2 * ty + r) * pw + 2 * tx..][..4];
                    [row[0], row[1], row[2], row[3]]
                });
                // Rows: e = B^T d (B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]).
                let mut e = [[0f32; 4]; 4];
                for col in 0..4 {
                    e[0][col] = d[0][col] - d[2][col];
                    e[1][col] = d[1][col] + d[2][col];
                    e[2][col] = d[2][col] - d[1][col];
                    e[3][col] = d[1][col] - d[3][col];
                }
                let tile = ty * txn + tx;
                for (i, er) in e.iter().enumerate() {
                    let out = [er[0] - er[2], er[1] + er[2], er[2] - er[1], er[1] - er[3]];
                    for (j, &val) in out.iter().enumerate() {
                        e16[(i * 4 + j) * t + tile] = val;
                    }
                }
            }
        }
        for (k, plane) in v.iter_mut().take(16).enumerate() {
            plane[ch * t..(ch + 1) * t].copy_from_slice(&e16[k * t..(k + 1) * t]);
        }
    }
    true
}

/// The F(2x2, 3x3) output transform `Y = A^T M A` (`A^T = [[1,1,1,0],[0,1,-1,-1]]`): `mm` is
/// `[16][m_total][T]` with `T` [`wino2_tiles`] tiles per axis; bias, residual and activation
/// as in [`wino_output`]. Returns `false` when a slice is too short or the tile counts do not
/// match the output size.
pub fn wino2_output(p: &WinoOutput<'_>, y: &mut [f32]) -> bool {
    let (oh, ow) = (p.out_h, p.out_w);
    let Some(t) = p.tiles_y.checked_mul(p.tiles_x) else {
        return false;
    };
    let n = p.m.checked_mul(oh).and_then(|x| x.checked_mul(ow));
    let mm_len = p.m_total.checked_mul(t).and_then(|x| x.checked_mul(16));
    let (Some(n), Some(mm_len)) = (n, mm_len) else {
        return false;
    };
    if p.first.checked_add(p.m).is_none_or(|e| e > p.m_total)
        || p.mm.len() < mm_len
        || y.len() < n
        || p.residual.is_some_and(|r| r.len() < n)
        || p.bias.is_some_and(|b| b.len() < p.m_total)
        || p.tiles_y != wino2_tiles(oh)
        || p.tiles_x != wino2_tiles(ow)
    {
        return false;
    }
    let (tyn, txn) = (p.tiles_y, p.tiles_x);
    // The channel's 2x2 tiles land in a tile-aligned buffer (2 tiles_y x 2 tiles_x), whose
    // rows are then copied, with the bias, into the (possibly odd-sized) output.
    let pw = 2 * txn;
    let mut full = vec![0f32; 2 * tyn * pw];
    for o in 0..p.m {
        let oc = p.first + o;
        let bias = p.bias.map_or(0.0, |b| b[oc]);
        let yo = &mut y[o * oh * ow..(o + 1) * oh * ow];
        let ms: [&[f32]; 16] = std::array::from_fn(|k| &p.mm[(k * p.m_total + oc) * t..][..t]);
        for ty in 0..tyn {
            let (r0, r1) = full[2 * ty * pw..(2 * ty + 2) * pw].split_at_mut(pw);
            for tx in 0..txn {
                let tile = ty * txn + tx;
                let m: [f32; 16] = std::array::from_fn(|k| ms[k][tile]);
                // Rows: q = A^T M (2x4), then Y = q A (2x2).
                let q0: [f32; 4] = std::array::from_fn(|col| m[col] + m[4 + col] + m[8 + col]);
                let q1: [f32; 4] = std::array::from_fn(|col| m[4 + col] - m[8 + col] - m[12 + col]);
                r0[2 * tx] = q0[0] + q0[1] + q0[2];
                r0[2 * tx + 1] = q0[1] - q0[2] - q0[3];
                r1[2 * tx] = q1[0] + q1[1] + q1[2];
                r1[2 * tx + 1] = q1[1] - q1[2] - q1[3];
            }
        }
        for (yrow, frow) in yo
            .chunks_exact_mut(ow.max(1))
            .zip(full.chunks_exact(pw.max(1)))
        {
            for (v, &f) in yrow.iter_mut().zip(frow) {
                *v = f + bias;
            }
        }
        if let Some(r) = p.residual {
            for (v, &z) in yo.iter_mut().zip(&r[o * oh * ow..(o + 1) * oh * ow]) {
                *v += z;
            }
        }
        p.act.apply_slice(yo);
    }
    true
}

/// Lanes of one output block of [`conv_s2_body`] and output channels per block.
const S2_LANES: usize = 16;
const S2_OCB: usize = 8;

/// The zero-padded input of a dense stride-2 convolution with a `kh x kw` kernel split into
/// its even and odd columns ([`s2_planes`]): for channel `ci` and padded row `r`, the even
/// columns `0, 2, 4, ..` then the odd ones, so each tap of a kernel row for 16 neighbouring
/// outputs is one contiguous load (tap `kx` reads phase `kx % 2` from column `kx / 2` on).
pub struct S2Planes {
    pub(crate) data: Vec<f32>,
    pub(crate) c: usize,
    pub(crate) rows: usize,
    pub(crate) row: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
}

/// [`S2Planes`] of `x` (`[c, h, w]`) for a `kernel` (`[kh, kw]`) and outputs `out_h x out_w`
/// with the given top/left padding (the bottom/right padding is what the output extent reads
/// past the input). `None` when `x` is too short or the kernel or output is empty.
#[allow(clippy::too_many_arguments)]
pub fn s2_planes(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    kernel: [usize; 2],
    pad_top: usize,
    pad_left: usize,
    out_h: usize,
    out_w: usize,
) -> Option<S2Planes> {
    let [kh, kw] = kernel;
    if x.len() < c.checked_mul(h)?.checked_mul(w)? || kh == 0 || kw == 0 || out_h == 0 {
        return None;
    }
    let rows = 2 * (out_h - 1) + kh;
    // Columns are read up to index out_w (rounded up to whole blocks) + (kw - 1) / 2.
    let row = out_w.div_ceil(S2_LANES) * S2_LANES + (kw - 1) / 2;
    let mut data = vec![0f32; c.checked_mul(rows)?.checked_mul(2 * row)?];
    for ci in 0..c {
        for r in pad_top..(pad_top + h).min(rows) {
            let src = &x[(ci * h + r - pad_top) * w..][..w];
            let base = (ci * rows + r) * 2 * row;
            // Padded column q + pad_left: the source columns of each phase are every other
            // one from the first of that parity, and land contiguously from column / 2.
            for phase in 0..2 {
                let q0 = (phase + 2 - pad_left % 2) % 2;
                let j0 = (q0 + pad_left) / 2;
                if j0 >= row {
                    continue;
                }
                let dst = &mut data[base + phase * row + j0..base + (phase + 1) * row];
                for (d, &v) in dst.iter_mut().zip(src.iter().skip(q0).step_by(2)) {
                    *d = v;
                }
            }
        }
    }
    Some(S2Planes {
        data,
        c,
        rows,
        row,
        kh,
        kw,
    })
}

/// A dense stride-2 convolution read from [`S2Planes`] (its kernel size): output channels
/// `weight.len() / (kh kw c)` (the weights `[m, c, kh, kw]`), bias and activation applied.
pub struct ConvS2<'a> {
    pub planes: &'a S2Planes,
    pub out_h: usize,
    pub out_w: usize,
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub act: Activation,
}

/// [`ConvS2`] into `y` (`[m, out_h, out_w]`), compiled for `variant`. Returns `false`
/// (touching nothing) when a size disagrees. Meant for layers with few input channels (a
/// CNN's first layer: MobileNet's 3x3, ResNet's 7x7): the output is computed directly, 8
/// channels x 16 pixels at a time, with no im2col matrix and no packing.
pub fn conv_s2_with(variant: Variant, p: &ConvS2<'_>, y: &mut [f32]) -> bool {
    let pl = p.planes;
    let k = pl.kh * pl.kw * pl.c;
    if k == 0 || !p.weight.len().is_multiple_of(k) {
        return false;
    }
    let m = p.weight.len() / k;
    let Some(out_len) = m.checked_mul(p.out_h).and_then(|v| v.checked_mul(p.out_w)) else {
        return false;
    };
    if y.len() < out_len
        || p.out_h == 0
        || pl.rows < 2 * (p.out_h - 1) + pl.kh
        || pl.row < p.out_w.div_ceil(S2_LANES) * S2_LANES + (pl.kw - 1) / 2
        || p.bias.is_some_and(|b| b.len() < m)
    {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::conv_s2(variant, p, y) {
        return true;
    }
    let _ = variant;
    conv_s2_body::<false>(p, y);
    true
}

/// [`conv_s2_with`] for the selected variant.
pub fn conv_s2(p: &ConvS2<'_>, y: &mut [f32]) -> bool {
    conv_s2_with(dispatch::selected(), p, y)
}

/// `a + w * v` lane by lane, by value (kept in registers).
#[inline(always)]
fn fma_lanes<const FMA: bool>(a: [f32; S2_LANES], w: f32, v: &[f32; S2_LANES]) -> [f32; S2_LANES] {
    std::array::from_fn(|j| {
        if FMA {
            w.mul_add(v[j], a[j])
        } else {
            a[j] + w * v[j]
        }
    })
}

#[inline(always)]
pub(crate) fn conv_s2_body<const FMA: bool>(p: &ConvS2<'_>, y: &mut [f32]) {
    let pl = p.planes;
    let (c, rows, row, kh, kw) = (pl.c, pl.rows, pl.row, pl.kh, pl.kw);
    let taps = kh * kw;
    let m = p.weight.len() / (taps * c);
    let (oh, ow) = (p.out_h, p.out_w);
    let plane = oh * ow;
    let mut o0 = 0;
    while o0 < m {
        let ob = (m - o0).min(S2_OCB);
        // wb[ci * taps + tap][k]: the block's weights, zero past its last channel.
        let mut wb = vec![[0f32; S2_OCB]; taps * c];
        for (k, oc) in (o0..o0 + ob).enumerate() {
            for (t, &wv) in wb
                .iter_mut()
                .zip(&p.weight[oc * taps * c..(oc + 1) * taps * c])
            {
                t[k] = wv;
            }
        }
        let mut b0 = [0f32; S2_OCB];
        if let Some(b) = p.bias {
            b0[..ob].copy_from_slice(&b[o0..o0 + ob]);
        }
        for oy in 0..oh {
            let mut x0 = 0;
            while x0 < ow {
                let mut acc = [[0f32; S2_LANES]; S2_OCB];
                for (a, &b) in acc.iter_mut().zip(&b0) {
                    *a = [b; S2_LANES];
                }
                for ci in 0..c {
                    for ky in 0..kh {
                        let base = ((ci * rows + 2 * oy + ky) * 2) * row + x0;
                        let wrow = &wb[(ci * kh + ky) * kw..][..kw];
                        for (kx, wv) in wrow.iter().enumerate() {
                            let at = base + (kx & 1) * row + (kx >> 1);
                            let v: &[f32; S2_LANES] =
                                pl.data[at..at + S2_LANES].try_into().expect("lanes");
                            for k in 0..S2_OCB {
                                acc[k] = fma_lanes::<FMA>(acc[k], wv[k], v);
                            }
                        }
                    }
                }
                let n = (ow - x0).min(S2_LANES);
                for (k, a) in acc.iter().enumerate().take(ob) {
                    let dst = &mut y[(o0 + k) * plane + oy * ow + x0..][..n];
                    dst.copy_from_slice(&a[..n]);
                    p.act.apply_slice(dst);
                }
                x0 += S2_LANES;
            }
        }
        o0 += S2_OCB;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(seed: &mut u32) -> f32 {
        *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    }

    /// Direct convolution, f64 accumulation: `[m, c, 3, 3]` weights, `group` groups.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        c: usize,
        h: usize,
        w: usize,
        wt: &[f32],
        m: usize,
        group: usize,
        s: usize,
        pad: usize,
        oh: usize,
        ow: usize,
    ) -> Vec<f32> {
        let (cg, mg) = (c / group, m / group);
        let mut y = vec![0f32; m * oh * ow];
        for o in 0..m {
            let gi = o / mg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0f64;
                    for ci in 0..cg {
                        let ch = gi * cg + ci;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy * s + ky) as isize - pad as isize;
                                let ix = (ox * s + kx) as isize - pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    acc += x[(ch * h + iy as usize) * w + ix as usize] as f64
                                        * wt[((o * cg + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                    }
                    y[(o * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
        y
    }

    /// `p` on every detected variant (into a NaN-filled output) against `want`, within 1e-4.
    fn check_s2(p: &ConvS2<'_>, want: &[f32], what: &str) {
        for v in dispatch::detected() {
            let mut y = vec![f32::NAN; want.len()];
            assert!(conv_s2_with(v, p, &mut y), "{v:?} {what}");
            for (k, (a, b)) in y.iter().zip(want).enumerate() {
                assert!((a - b).abs() < 1e-4, "{v:?} {what} [{k}] {a} vs {b}");
            }
        }
    }

    #[test]
    fn dense_3x3_stride_2_matches_naive_for_every_variant() {
        let mut sd = 11u32;
        // (c, h, w, m, pad): symmetric pad 1 (ONNX), and pad 0 with outputs reaching one
        // past the input (TensorFlow SAME on even sizes: padding only at the bottom/right);
        // output widths below, at and past 16 lanes, channel counts past one 8-block.
        for &(c, h, w, m, pad, same) in &[
            (3usize, 224usize, 224usize, 32usize, 1usize, false),
            (3, 16, 16, 32, 0, true),
            (1, 9, 9, 5, 1, false),
            (4, 7, 35, 17, 1, false),
            (2, 10, 66, 8, 0, true),
            (3, 5, 3, 3, 0, false),
        ] {
            let (oh, ow) = if same {
                (h.div_ceil(2), w.div_ceil(2))
            } else {
                ((h + 2 * pad - 3) / 2 + 1, (w + 2 * pad - 3) / 2 + 1)
            };
            let x: Vec<f32> = (0..c * h * w).map(|_| rnd(&mut sd)).collect();
            let wt: Vec<f32> = (0..m * c * 9).map(|_| rnd(&mut sd)).collect();
            let bias: Vec<f32> = (0..m).map(|_| rnd(&mut sd)).collect();
            let mut want = naive(&x, c, h, w, &wt, m, 1, 2, pad, oh, ow);
            for (i, v) in want.iter_mut().enumerate() {
                *v = (*v + bias[i / (oh * ow)]).clamp(0.0, 0.6);
            }
            let planes = s2_planes(&x, c, h, w, [3, 3], pad, pad, oh, ow).unwrap();
            let p = ConvS2 {
                planes: &planes,
                out_h: oh,
                out_w: ow,
                weight: &wt,
                bias: Some(&bias),
                act: Activation::Clip { lo: 0.0, hi: 0.6 },
            };
            check_s2(&p, &want, &format!("c{c} {h}x{w} m{m}"));
            for v in dispatch::detected() {
                let mut y = vec![f32::NAN; m * oh * ow];
                assert!(!conv_s2_with(v, &p, &mut y[1..]), "short output");
                let bad = ConvS2 {
                    weight: &wt[1..],
                    ..p
                };
                assert!(!conv_s2_with(v, &bad, &mut y), "ragged weights");
            }
        }
        assert!(s2_planes(&[0.0; 5], 1, 2, 3, [3, 3], 0, 0, 1, 1).is_none());
        assert!(s2_planes(&[0.0; 6], 1, 2, 3, [0, 3], 0, 0, 1, 1).is_none());
    }

    /// Other kernel sizes at stride 2 (ResNet's 7x7 stem with pad 3, 5x5, 1x1, 2x2, 3x5)
    /// against a direct f64 sum, on every variant; rows of 1 to 3 vectors with partial last
    /// vectors, Relu and (every other case) HardSwish, which is not a clamp.
    #[test]
    fn dense_stride_2_any_kernel_matches_naive() {
        let mut sd = 17u32;
        // (c, h, w, m, kh, kw, pad_top, pad_left)
        for (case, &(c, h, w, m, kh, kw, pt, pl)) in [
            (
                3usize, 12usize, 100usize, 13usize, 3usize, 3usize, 1usize, 1usize,
            ),
            (
                3usize, 40usize, 38usize, 16usize, 7usize, 7usize, 3usize, 3usize,
            ),
            (3, 224, 224, 64, 7, 7, 3, 3),
            (2, 11, 19, 9, 5, 5, 2, 1),
            (1, 6, 7, 3, 1, 1, 0, 0),
            (4, 8, 9, 10, 2, 2, 0, 1),
            (3, 9, 33, 8, 3, 5, 1, 2),
        ]
        .iter()
        .enumerate()
        {
            let act = if case % 2 == 1 {
                Activation::HardSwish
            } else {
                Activation::Relu
            };
            let oh = (h + 2 * pt - kh) / 2 + 1;
            let ow = (w + 2 * pl - kw) / 2 + 1;
            let x: Vec<f32> = (0..c * h * w).map(|_| rnd(&mut sd)).collect();
            let wt: Vec<f32> = (0..m * c * kh * kw).map(|_| rnd(&mut sd)).collect();
            let bias: Vec<f32> = (0..m).map(|_| rnd(&mut sd)).collect();
            let mut want = vec![0f32; m * oh * ow];
            for o in 0..m {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[o] as f64;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * 2 + ky) as isize - pt as isize;
                                    let ix = (ox * 2 + kx) as isize - pl as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w
                                    {
                                        acc += x[(ci * h + iy as usize) * w + ix as usize] as f64
                                            * wt[((o * c + ci) * kh + ky) * kw + kx] as f64;
                                    }
                                }
                            }
                        }
                        want[(o * oh + oy) * ow + ox] = act.apply(acc as f32);
                    }
                }
            }
            let planes = s2_planes(&x, c, h, w, [kh, kw], pt, pl, oh, ow).unwrap();
            let p = ConvS2 {
                planes: &planes,
                out_h: oh,
                out_w: ow,
                weight: &wt,
                bias: Some(&bias),
                act,
            };
            check_s2(&p, &want, &format!("c{c} {h}x{w} k{kh}x{kw} m{m} {act:?}"));
        }
    }

    #[test]
    fn depthwise_matches_naive_for_every_variant() {
        let mut sd = 5u32;
        for &(c, h, w, s, pad) in &[
            (3, 7, 9, 1, 1),
            (5, 8, 8, 2, 1),
            (2, 9, 11, 2, 1),
            (4, 1, 1, 1, 1),
            (3, 6, 5, 1, 0),
            (17, 13, 12, 2, 0),
            // Stride 1, pad 2: two edge outputs per side, and a 1x1 input whose three
            // outputs are all edges (no interior).
            (2, 5, 4, 1, 2),
            (1, 1, 1, 1, 2),
            (3, 14, 14, 1, 1),
            // Rows wider than one and two 16-lane vectors, with partial last vectors.
            (2, 5, 37, 1, 1),
            (2, 6, 37, 2, 1),
            (2, 4, 16, 1, 1),
            (2, 4, 32, 2, 1),
            (2, 7, 33, 2, 0),
        ] {
            let oh = (h + 2 * pad - 3) / s + 1;
            let ow = (w + 2 * pad - 3) / s + 1;
            let x: Vec<f32> = (0..c * h * w).map(|_| rnd(&mut sd)).collect();
            let wt: Vec<f32> = (0..c * 9).map(|_| rnd(&mut sd)).collect();
            let bias: Vec<f32> = (0..c).map(|_| rnd(&mut sd)).collect();
            let mut want = naive(&x, c, h, w, &wt, c, c, s, pad, oh, ow);
            for (i, v) in want.iter_mut().enumerate() {
                *v = (*v + bias[i / (oh * ow)]).clamp(0.0, 0.3);
            }
            for v in dispatch::detected() {
                let p = Dw3x3 {
                    x: &x,
                    c,
                    h,
                    w,
                    stride: s,
                    pad_top: pad,
                    pad_left: pad,
                    out_h: oh,
                    out_w: ow,
                    weight: &wt,
                    bias: Some(&bias),
                    act: Activation::Clip { lo: 0.0, hi: 0.3 },
                };
                let mut y = vec![f32::NAN; c * oh * ow];
                assert!(depthwise3x3_with(v, &p, &mut y));
                for (k, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{v:?} c{c} {h}x{w} s{s} [{k}] {a} vs {b}"
                    );
                }
                let bad = Dw3x3 { stride: 3, ..p };
                assert!(!depthwise3x3_with(v, &bad, &mut y));
                assert!(!depthwise3x3_with(v, &p, &mut y[1..]));
            }
        }
    }

    /// TFLite SAME padding with stride 2 on even sizes: no padding before, one row and column
    /// after (outputs read past the input's end), every variant, no bias, Relu and a
    /// non-fused activation.
    #[test]
    fn depthwise_same_stride2_pads_after() {
        let mut sd = 9u32;
        for &(c, h, w) in &[(3usize, 8usize, 8usize), (2, 14, 34), (2, 2, 2)] {
            let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
            let x: Vec<f32> = (0..c * h * w).map(|_| rnd(&mut sd)).collect();
            let wt: Vec<f32> = (0..c * 9).map(|_| rnd(&mut sd)).collect();
            let want = naive(&x, c, h, w, &wt, c, c, 2, 0, oh, ow);
            for act in [Activation::Relu, Activation::HardSwish] {
                for v in dispatch::detected() {
                    let p = Dw3x3 {
                        x: &x,
                        c,
                        h,
                        w,
                        stride: 2,
                        pad_top: 0,
                        pad_left: 0,
                        out_h: oh,
                        out_w: ow,
                        weight: &wt,
                        bias: None,
                        act,
                    };
                    let mut y = vec![f32::NAN; c * oh * ow];
                    assert!(depthwise3x3_with(v, &p, &mut y));
                    for (k, (a, b)) in y.iter().zip(&want).enumerate() {
                        let b = act.apply(*b);
                        assert!(
                            (a - b).abs() < 1e-5,
                            "{v:?} {act:?} c{c} {h}x{w} [{k}] {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// F(2x2, 3x3): transforms with a plain product in the middle against direct convolution,
    /// odd sizes (a half-filled last tile row and column), both paddings, a channel range.
    #[test]
    fn winograd2_matches_naive() {
        let mut sd = 13u32;
        for &(c, m, h, w, pad) in &[
            (3, 5, 7, 7, 1),
            (4, 2, 8, 5, 1),
            (2, 3, 6, 9, 0),
            (1, 1, 1, 1, 1),
            (5, 7, 3, 3, 0),
        ] {
            let oh = h + 2 * pad - 2;
            let ow = w + 2 * pad - 2;
            let x: Vec<f32> = (0..c * h * w).map(|_| rnd(&mut sd)).collect();
            let wt: Vec<f32> = (0..m * c * 9).map(|_| rnd(&mut sd)).collect();
            let bias: Vec<f32> = (0..m).map(|_| rnd(&mut sd)).collect();
            let res: Vec<f32> = (0..m * oh * ow).map(|_| rnd(&mut sd)).collect();
            let want = naive(&x, c, h, w, &wt, m, 1, 1, pad, oh, ow);
            let u = wino2_weights(&wt, m, c).unwrap();
            assert!(wino2_weights(&wt[1..], m, c).is_none());
            let (ty, tx) = (wino2_tiles(oh), wino2_tiles(ow));
            let t = ty * tx;
            let mut vv = vec![f32::NAN; 16 * c * t];
            let pin = WinoInput {
                x: &x,
                c,
                h,
                w,
                pad_top: pad,
                pad_left: pad,
                tiles_y: ty,
                tiles_x: tx,
            };
            assert!(wino2_input(&pin, &mut vv));
            assert!(!wino2_input(&pin, &mut vv[1..]));
            let mut mm = vec![0f32; 16 * m * t];
            for xi in 0..16 {
                for o in 0..m {
                    for tile in 0..t {
                        mm[(xi * m + o) * t + tile] = (0..c)
                            .map(|i| u[xi * m * c + o * c + i] * vv[(xi * c + i) * t + tile])
                            .sum();
                    }
                }
            }
            for first in [0, m - 1] {
                let part = WinoOutput {
                    mm: &mm,
                    m_total: m,
                    first,
                    m: m - first,
                    tiles_y: ty,
                    tiles_x: tx,
                    out_h: oh,
                    out_w: ow,
                    bias: Some(&bias),
                    residual: Some(&res[first * oh * ow..]),
                    act: Activation::Clip { lo: -0.2, hi: 0.7 },
                };
                let mut y = vec![f32::NAN; (m - first) * oh * ow];
                assert!(wino2_output(&part, &mut y));
                for (k, &got) in y.iter().enumerate() {
                    let k = k + first * oh * ow;
                    let exp = (want[k] + bias[k / (oh * ow)] + res[k]).clamp(-0.2, 0.7);
                    assert!(
                        (got - exp).abs() < 1e-5,
                        "c{c} m{m} {h}x{w} pad{pad} [{k}] {got} vs {exp}"
                    );
                }
                assert!(!wino2_output(&part, &mut y[1..]));
                let wrong = WinoOutput {
                    tiles_x: tx + 1,
                    ..part
                };
                assert!(!wino2_output(&wrong, &mut y));
            }
        }
    }

    /// The full Winograd pipeline with a plain GEMM in the middle against direct convolution.
    #[test]
    fn winograd_matches_naive_for_every_variant() {
        let mut sd = 9u32;
        for &(c, m, h, w, pad) in &[
            (3, 5, 7, 9, 1),
            (8, 4, 8, 8, 1),
            (2, 3, 5, 6, 0),
            (16, 16, 14, 14, 1),
            (1, 1, 1, 1, 1),
            // Pad 2: tiles whose first two patch columns both read padding; width 13 leaves
            // a last tile reading past the row.
            (3, 2, 6, 13, 2),
        ] {
            let oh = h + 2 * pad - 2;
            let ow = w + 2 * pad - 2;
            let x: Vec<f32> = (0..c * h * w).map(|_| rnd(&mut sd)).collect();
            let wt: Vec<f32> = (0..m * c * 9).map(|_| rnd(&mut sd)).collect();
            let bias: Vec<f32> = (0..m).map(|_| rnd(&mut sd)).collect();
            let res: Vec<f32> = (0..m * oh * ow).map(|_| rnd(&mut sd)).collect();
            let want = naive(&x, c, h, w, &wt, m, 1, 1, pad, oh, ow);
            let u = wino_weights(&wt, m, c).unwrap();
            let (ty, tx) = (wino_tiles(oh), wino_tiles(ow));
            let t = ty * tx;
            for v in dispatch::detected() {
                let mut vv = vec![f32::NAN; 36 * c * t];
                let pin = WinoInput {
                    x: &x,
                    c,
                    h,
                    w,
                    pad_top: pad,
                    pad_left: pad,
                    tiles_y: ty,
                    tiles_x: tx,
                };
                assert!(wino_input(v, &pin, &mut vv));
                let mut mm = vec![0f32; 36 * m * t];
                for xi in 0..36 {
                    for o in 0..m {
                        for tile in 0..t {
                            mm[(xi * m + o) * t + tile] = (0..c)
                                .map(|i| u[xi * m * c + o * c + i] * vv[(xi * c + i) * t + tile])
                                .sum();
                        }
                    }
                }
                // Channels 1.. only.
                let part = WinoOutput {
                    mm: &mm,
                    m_total: m,
                    first: 1,
                    m: m - 1,
                    tiles_y: ty,
                    tiles_x: tx,
                    out_h: oh,
                    out_w: ow,
                    bias: Some(&bias),
                    residual: Some(&res[oh * ow..]),
                    act: Activation::Relu,
                };
                let mut y1 = vec![f32::NAN; (m - 1) * oh * ow];
                assert!(wino_output(v, &part, &mut y1));
                for (k, &got) in y1.iter().enumerate() {
                    let k = k + oh * ow;
                    let exp = (want[k] + bias[k / (oh * ow)] + res[k]).max(0.0);
                    assert!((got - exp).abs() < 1e-4, "{v:?} part [{k}] {got} vs {exp}");
                }
                let pout = WinoOutput {
                    mm: &mm,
                    m_total: m,
                    first: 0,
                    m,
                    tiles_y: ty,
                    tiles_x: tx,
                    out_h: oh,
                    out_w: ow,
                    bias: Some(&bias),
                    residual: Some(&res),
                    act: Activation::Relu,
                };
                let mut y = vec![f32::NAN; m * oh * ow];
                assert!(wino_output(v, &pout, &mut y));
                for (k, &got) in y.iter().enumerate() {
                    let exp = (want[k] + bias[k / (oh * ow)] + res[k]).max(0.0);
                    assert!(
                        (got - exp).abs() < 1e-4,
                        "{v:?} c{c} m{m} {h}x{w} [{k}] {got} vs {exp}"
                    );
                }
                assert!(!wino_output(v, &pout, &mut y[1..]));
                assert!(!wino_input(v, &pin, &mut vv[1..]));
            }
        }
    }
}
