//! GEMM with a pre-packed left operand and a fused epilogue:
//! `C = act(A * B + bias[row] + residual)`.
//!
//! Convolution weights are constants, so the CPU driver packs them once per session
//! ([`PackedA::new`]) into the MR-row panels the selected register tile reads; each run then
//! packs only B (the im2col matrix, a 1x1 conv's input or a Winograd slice). The epilogue (bias,
//! an optional residual of C's shape, then an [`Activation`]) runs while a tile's results are
//! still in L1, so Conv+Add+Relu costs one pass over the output.
//!
//! Loop order (BLIS): columns in blocks of NC, depth in blocks of KC; each NR-wide B panel is
//! packed right before use and, still in L1, meets every A panel of the KC block (the whole
//! M x KC block stays in L2). Rows
//! can be split by panel ([`gemm_packed_panels`]) so threads work on disjoint rows of C.

use std::cell::RefCell;
use std::ops::Range;

use crate::dispatch::{self, Variant};
use crate::gemm::{pack_b_panel, MatRef};

/// Depth of a packed panel: an A panel (MR x KC) and a B panel (KC x NR) share L1.
const KC: usize = 256;
/// Columns of C per block (the C partial sums a later KC block adds to stay in L2).
const NC: usize = 1024;
/// Portable register tile.
const P_MR: usize = 4;
const P_NR: usize = 8;

/// An elementwise activation applied in an epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Identity,
    Relu,
    /// `min(max(x, lo), hi)` (Clip, Relu6).
    Clip {
        lo: f32,
        hi: f32,
    },
    /// `x < 0 ? alpha * x : x`.
    LeakyRelu(f32),
    Sigmoid,
    /// `max(0, min(1, alpha * x + beta))`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * max(0, min(1, x / 6 + 1/2))`.
    HardSwish,
}

impl Activation {
    /// `(lo, hi)` when the activation is a clamp (Identity: infinite bounds, Relu, Clip), which
    /// register epilogues apply as a max and a min; `None` for the others.
    #[inline]
    pub fn clamp_bounds(self) -> Option<(f32, f32)> {
        match self {
            Activation::Identity => Some((f32::NEG_INFINITY, f32::INFINITY)),
            Activation::Relu => Some((0.0, f32::INFINITY)),
            Activation::Clip { lo, hi } => Some((lo, hi)),
            _ => None,
        }
    }

    /// The activation of one value (NaN stays NaN, as the ONNX ops define).
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Identity => v,
            Activation::Relu => {
                if v < 0.0 {
                    0.0
                } else {
                    v
                }
            }
            Activation::Clip { lo, hi } => {
                let v = if v < lo { lo } else { v };
                if v > hi {
                    hi
                } else {
                    v
                }
            }
            Activation::LeakyRelu(a) => {
                if v < 0.0 {
                    a * v
                } else {
                    v
                }
            }
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Activation::HardSigmoid { alpha, beta } => (alpha * v + beta).clamp(0.0, 1.0),
            Activation::HardSwish => v * (v * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
        }
    }

    /// Applies the activation to every element (the match hoisted out of the loop).
    #[inline(always)]
    pub fn apply_slice(self, xs: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Relu => xs.iter_mut().for_each(|v| *v = Activation::Relu.apply(*v)),
            Activation::Clip { lo, hi } => xs
                .iter_mut()
                .for_each(|v| *v = Activation::Clip { lo, hi }.apply(*v)),
            a => xs.iter_mut().for_each(|v| *v = a.apply(*v)),
        }
    }
}

/// What is added to `A * B` before the activation.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// One value per row of C (all M rows, also when only some panels are computed).
    pub bias: Option<&'a [f32]>,
    /// A matrix laid out like C (same row stride, same first row).
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

impl Epilogue<'_> {
    /// No bias, no residual, identity activation: a plain product.
    pub const PLAIN: Epilogue<'static> = Epilogue {
        bias: None,
        residual: None,
        act: Activation::Identity,
    };
}

/// The left operand (M x K) packed once into MR-row panels per KC block, for one kernel variant.
#[derive(Clone, Debug)]
pub struct PackedA {
    variant: Variant,
    mr: usize,
    m: usize,
    k: usize,
    data: Vec<f32>,
}

/// Register tile rows of a variant.
fn mr_of(v: Variant) -> usize {
    match v {
        Variant::Avx512 => 12,
        Variant::Avx2 => 6,
        // Variants without a packed float tile here (int8-only ones, NEON) use the portable one.
        _ => P_MR,
    }
}

impl PackedA {
    /// Packs `a` for the process-wide kernel variant.
    pub fn new(a: MatRef<'_>) -> Option<Self> {
        Self::with_variant(dispatch::selected(), a)
    }

    /// Packs `a` for `variant` (the portable one when this CPU lacks it). `None` when `a`'s
    /// slice is too short for its shape and strides.
    pub fn with_variant(variant: Variant, a: MatRef<'_>) -> Option<Self> {
        // Only AVX2/AVX-512 have packed float tiles in this module; NEON and others pack for
        // the portable tile.
        let variant = match variant {
            Variant::Avx512 | Variant::Avx2 if variant.available() => variant,
            _ => Variant::Portable,
        };
        let (m, k) = (a.rows, a.cols);
        if m > 0 && k > 0 {
            let extent = (m - 1)
                .checked_mul(a.rs)?
                .checked_add((k - 1).checked_mul(a.cs)?)?
                .checked_add(1)?;
            if a.data.len() < extent {
                return None;
            }
        }
        let mr = mr_of(variant);
        let mp = m.div_ceil(mr);
        let mut data = vec![0f32; (mp * mr).checked_mul(k)?];
        for pc in (0..k).step_by(KC) {
            let kcb = KC.min(k - pc);
            let base = pc * mp * mr;
            for ip in 0..mp {
                let dst = &mut data[base + ip * kcb * mr..base + (ip + 1) * kcb * mr];
                for i in 0..mr.min(m - ip * mr) {
                    let row = (ip * mr + i) * a.rs;
                    for p in 0..kcb {
                        dst[p * mr + i] = a.data[row + (pc + p) * a.cs];
                    }
                }
            }
        }
        Some(PackedA {
            variant,
            mr,
            m,
            k,
            data,
        })
    }

    /// Rows of A.
    pub fn rows(&self) -> usize {
        self.m
    }
    /// Columns of A (the inner dimension).
    pub fn cols(&self) -> usize {
        self.k
    }
    /// Rows per panel (the register tile's MR).
    pub fn panel_rows(&self) -> usize {
        self.mr
    }
    /// Number of row panels.
    pub fn panels(&self) -> usize {
        self.m.div_ceil(self.mr)
    }
    /// The variant the panels were packed for.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    #[inline(always)]
    pub(crate) fn panel(&self, pc: usize, kcb: usize, ip: usize) -> &[f32] {
        let base = pc * self.panels() * self.mr + ip * kcb * self.mr;
        &self.data[base..base + kcb * self.mr]
    }
}

/// `C = act(A * B + bias + residual)` for all rows of the packed A. Returns `false` (touching
/// nothing) when a size disagrees or a slice is too short.
pub fn gemm_packed(pa: &PackedA, b: MatRef<'_>, c: &mut [f32], ldc: usize, epi: &Epilogue) -> bool {
    gemm_packed_panels(pa, 0..pa.panels(), b, c, ldc, epi)
}

/// [`gemm_packed`] for the row panels `panels` only: C and the residual start at row
/// `panels.start * pa.panel_rows()`; the bias is indexed by absolute row.
pub fn gemm_packed_panels(
    pa: &PackedA,
    panels: Range<usize>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue,
) -> bool {
    let (m, k, n) = (pa.m, pa.k, b.cols);
    if b.rows != k || panels.start > panels.end || panels.end > pa.panels() {
        return false;
    }
    if k > 0 && n > 0 {
        let extent = (k - 1) * b.rs + (n - 1) * b.cs + 1;
        if b.data.len() < extent {
            return false;
        }
    }
    let r0 = panels.start * pa.mr;
    let r1 = (panels.end * pa.mr).min(m);
    if r1 > r0 && n > 0 {
        let need = (r1 - r0 - 1) * ldc + n;
        if ldc < n || c.len() < need || epi.residual.is_some_and(|r| r.len() < need) {
            return false;
        }
    }
    if epi.bias.is_some_and(|bv| bv.len() < m) {
        return false;
    }
    if r1 <= r0 || n == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::gemm_packed(pa, panels.clone(), b, c, ldc, epi) {
        return true;
    }
    drive::<P_MR, P_NR, false, _, _>(
        pa,
        panels,
        b,
        c,
        ldc,
        epi,
        |a, b, _, acc| tile_portable(a, b, acc),
        |_, _, _, _| false,
    );
    true
}

/// `acc[i][j] = sum_p a[p*MR + i] * b[p*NR + j]`.
#[inline(always)]
fn tile_portable(a: &[f32], b: &[f32], acc: &mut [[f32; P_NR]; P_MR]) {
    *acc = [[0f32; P_NR]; P_MR];
    for (av, bv) in a.chunks_exact(P_MR).zip(b.chunks_exact(P_NR)) {
        for i in 0..P_MR {
            let x = av[i];
            for j in 0..P_NR {
                acc[i][j] += x * bv[j];
            }
        }
    }
}

thread_local! {
    /// Packed-B scratch, reused across calls on one thread.
    static BBUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The blocked loops around an MR x NR register tile `tile(a_panel, b_panel, ldb, acc)` that
/// sets `acc[i][j] = sum_p a_panel[p*MR + i] * b_panel[p*ldb + j]`. Sizes were checked by
/// [`gemm_packed_panels`]; `MR` must equal `pa.panel_rows()`.
///
/// B panels are packed (`ldb = NR`) right before use, except with `DIRECT` where a whole
/// panel of a row-major B is read in place (`ldb` = B's row stride): the copy was 3% of
/// ResNet-18 at one thread, and at two threads, with the row panels split between them, each
/// thread packed every B panel again.
///
/// `full(a_panel, b_panel, tile)` may instead do the tile in registers and store it straight
/// into C: its `rows x cols` corner (edge tiles), added to C's partial sums for a later KC
/// block, with the epilogue on the last block; it returns `false` when it cannot (that
/// epilogue), and the generic path runs. Both paths leave the same partial sums in C between
/// blocks, so they may alternate.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn drive<const MR: usize, const NR: usize, const DIRECT: bool, T, F>(
    pa: &PackedA,
    panels: Range<usize>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue,
    mut tile: T,
    mut full: F,
) where
    T: FnMut(&[f32], &[f32], usize, &mut [[f32; NR]; MR]),
    F: FnMut(&[f32], &[f32], usize, FullTile<'_>) -> bool,
{
    assert_eq!(MR, pa.mr, "packed for another register tile");
    let (m, k, n) = (pa.m, pa.k, b.cols);
    let r0 = panels.start * MR;
    if k == 0 {
        for ip in panels {
            for row in ip * MR..((ip + 1) * MR).min(m) {
                let off = (row - r0) * ldc;
                c[off..off + n].fill(0.0);
                finish(&mut c[off..off + n], row, off, epi);
            }
        }
        return;
    }
    BBUF.with(|cell| {
        let mut guard = cell.borrow_mut();
        let need = KC.min(k) * NR;
        if guard.len() < need {
            guard.resize(need, 0.0);
        }
        let bp = &mut guard[..need];
        let mut acc = [[0f32; NR]; MR];
        let nc_max = NC.min(n.div_ceil(NR) * NR);
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kcb = KC.min(k - pc);
                let (first, last) = (pc == 0, pc + kcb == k);
                for jp in 0..nc.div_ceil(NR) {
                    // Each B panel is packed right before the row panels use it, so it is still
                    // in L1 (a whole packed block of columns ahead of time came back from L2/L3).
                    let j0 = jc + jp * NR;
                    let w = NR.min(n - j0);
                    // Read in place: a whole panel of row-major B whose rows are not a
                    // multiple of 1 KiB apart (those would share L1 sets).
                    let direct = DIRECT && b.cs == 1 && w == NR && !b.rs.is_multiple_of(256);
                    let (bpanel, ldb) = if direct {
                        let off = pc * b.rs + j0;
                        (&b.data[off..off + (kcb - 1) * b.rs + NR], b.rs)
                    } else {
                        pack_b_panel(b, pc, j0, &mut bp[..kcb * NR], NR);
                        (&bp[..kcb * NR], NR)
                    };
                    for ip in panels.clone() {
                        let i0 = ip * MR;
                        let h = MR.min(m - i0);
                        let off = (i0 - r0) * ldc + j0;
                        let ft = FullTile {
                            c: &mut c[off..],
                            ldc,
                            rows: h,
                            cols: w,
                            accumulate: !first,
                            finish: last,
                            bias: epi.bias.map(|bv| &bv[i0..i0 + h]),
                            residual: epi.residual.map(|r| &r[off..]),
                            act: epi.act,
                        };
                        if full(pa.panel(pc, kcb, ip), bpanel, ldb, ft) {
                            continue;
                        }
                        tile(pa.panel(pc, kcb, ip), bpanel, ldb, &mut acc);
                        for (i, arow) in acc.iter().enumerate().take(h) {
                            let off = (i0 + i - r0) * ldc + j0;
                            let dst = &mut c[off..off + w];
                            if first {
                                dst.copy_from_slice(&arow[..w]);
                            } else {
                                for (o, &v) in dst.iter_mut().zip(arow) {
                                    *o += v;
                                }
                            }
                            if last {
                                finish(dst, i0 + i, off, epi);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Where a register tile with its epilogue stores: C from the tile's first element (row
/// stride `ldc`), the tile rows' biases, the residual laid out like `c`.
// Only the x86 tiles store through it (NEON uses the portable tile here).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct FullTile<'a> {
    pub c: &'a mut [f32],
    pub ldc: usize,
    /// The rows and columns of the tile that exist in C (`<= MR`, `<= NR`).
    pub rows: usize,
    pub cols: usize,
    /// Add the product to C (a later KC block) instead of overwriting it.
    pub accumulate: bool,
    /// The last KC block: apply bias, residual and activation.
    pub finish: bool,
    /// The biases of the tile's `rows` rows.
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
}

/// Adds the bias of `row` and the residual at `off`, then applies the activation.
#[inline(always)]
fn finish(dst: &mut [f32], row: usize, off: usize, epi: &Epilogue) {
    let bias = epi.bias.map_or(0.0, |b| b[row]);
    match epi.residual {
        Some(r) => {
            let len = dst.len();
            for (o, &z) in dst.iter_mut().zip(&r[off..off + len]) {
                *o += bias + z;
            }
        }
        None if bias != 0.0 => dst.iter_mut().for_each(|o| *o += bias),
        None => {}
    }
    epi.act.apply_slice(dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(seed: &mut u32) -> f32 {
        *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    }

    /// Every variant, odd sizes and tails, k past one KC block, transposed A and strided B,
    /// bias + residual + each activation, and a panel range (rows outside stay untouched).
    #[test]
    fn every_variant_matches_naive_with_epilogue() {
        let mut s = 3u32;
        let shapes = [
            (1, 1, 1),
            (13, 37, 5),
            (12, 32, 256),
            (25, 65, 300),
            (7, 3, 600),
            (40, 100, 0),
            (64, 49, 64),
            // 16 and 20 columns: the 12x16 AVX-512 tile (full tiles with the store epilogue,
            // an odd depth, more than one KC block).
            (24, 16, 129),
            (25, 20, 513),
        ];
        let acts = [
            Activation::Identity,
            Activation::Relu,
            Activation::Clip { lo: -0.1, hi: 0.2 },
            Activation::LeakyRelu(0.1),
            Activation::Sigmoid,
            Activation::HardSwish,
            Activation::HardSigmoid {
                alpha: 0.3,
                beta: 0.4,
            },
        ];
        for &(m, n, k) in &shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rnd(&mut s)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd(&mut s)).collect();
            let bias: Vec<f32> = (0..m).map(|_| rnd(&mut s)).collect();
            let ldc = n + 2;
            let res: Vec<f32> = (0..m * ldc).map(|_| rnd(&mut s)).collect();
            // A stored transposed (K x M) and viewed as M x K.
            let mut at = vec![0f32; m * k];
            for i in 0..m {
                for p in 0..k {
                    at[p * m + i] = a[i * k + p];
                }
            }
            for v in dispatch::detected() {
                let pa = PackedA::with_variant(v, MatRef::row_major(&at, k, m).t()).unwrap();
                // Variants without a packed float tile here (VNNI, NEON...) pack for the
                // portable one.
                let want = match v {
                    Variant::Avx512 | Variant::Avx2 => v,
                    _ => Variant::Portable,
                };
                assert_eq!(pa.variant(), want);
                for (ai, &act) in acts.iter().enumerate() {
                    let with_res = ai % 2 == 0;
                    let epi = Epilogue {
                        bias: Some(&bias),
                        residual: with_res.then_some(&res[..]),
                        act,
                    };
                    let mut c = vec![f32::NAN; m * ldc];
                    assert!(gemm_packed(
                        &pa,
                        MatRef::row_major(&b, k, n),
                        &mut c,
                        ldc,
                        &epi
                    ));
                    for i in 0..m {
                        for j in 0..n {
                            let mut x = 0f64;
                            for p in 0..k {
                                x += a[i * k + p] as f64 * b[p * n + j] as f64;
                            }
                            let mut x = x as f32 + bias[i];
                            if with_res {
                                x += res[i * ldc + j];
                            }
                            let want = act.apply(x);
                            let got = c[i * ldc + j];
                            assert!(
                                (got - want).abs() <= 1e-5 * (k as f32 + 1.0),
                                "{v:?} {m}x{n}x{k} {act:?} ({i},{j}): {got} vs {want}"
                            );
                        }
                        for j in n..ldc {
                            assert!(c[i * ldc + j].is_nan(), "column past n written");
                        }
                    }
                }
                // Panels 1.. only, B viewed with a column stride of 2.
                if pa.panels() > 1 {
                    let b2: Vec<f32> = b.iter().flat_map(|&x| [x, 9.0]).collect();
                    let bm = MatRef {
                        data: &b2,
                        rows: k,
                        cols: n,
                        rs: 2 * n,
                        cs: 2,
                    };
                    let r0 = pa.panel_rows();
                    let mut c = vec![0f32; (m - r0) * n];
                    let epi = Epilogue {
                        bias: Some(&bias),
                        residual: None,
                        act: Activation::Identity,
                    };
                    assert!(gemm_packed_panels(&pa, 1..pa.panels(), bm, &mut c, n, &epi));
                    for i in r0..m {
                        for j in 0..n {
                            let mut x = 0f64;
                            for p in 0..k {
                                x += a[i * k + p] as f64 * b[p * n + j] as f64;
                            }
                            let want = x as f32 + bias[i];
                            let got = c[(i - r0) * n + j];
                            assert!((got - want).abs() <= 1e-5 * (k as f32 + 1.0));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_bad_sizes() {
        let a = [1f32; 12];
        let pa = PackedA::new(MatRef::row_major(&a, 4, 3)).unwrap();
        let mut c = [0f32; 16];
        // B has 2 rows, A has 3 columns.
        assert!(!gemm_packed(
            &pa,
            MatRef::row_major(&a, 2, 4),
            &mut c,
            4,
            &Epilogue::PLAIN
        ));
        // C too short.
        assert!(!gemm_packed(
            &pa,
            MatRef::row_major(&a, 3, 4),
            &mut c[..10],
            4,
            &Epilogue::PLAIN
        ));
        // Bias too short.
        let bias = [1f32; 3];
        let epi = Epilogue {
            bias: Some(&bias),
            ..Epilogue::PLAIN
        };
        assert!(!gemm_packed(
            &pa,
            MatRef::row_major(&a, 3, 4),
            &mut c,
            4,
            &epi
        ));
        assert_eq!(c, [0f32; 16]);
        // A slice too short for its shape.
        assert!(PackedA::new(MatRef::row_major(&a, 5, 3)).is_none());
    }
}
