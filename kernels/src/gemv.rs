//! Matrix-vector product with a constant matrix: `y = W * x (+ bias) (+ y)`.
//!
//! A GEMM kernel does poorly on one column (a batch-1 recurrent step, a batch-1 fully
//! connected layer): its register tile is mostly empty and it packs the vector each call. Here
//! `W` (M x K) is packed once ([`PackedGemv::new`]) into panels of [`PANEL`] rows (the last
//! zero-padded), and the panels into groups of [`GROUP`] (64 rows; the last group may have
//! fewer panels) stored column by column with the group's panels side by side:
//! `[M / 64][K][GROUP][16]`. One 16-row slice of a column is one zmm / two ymm / four q
//! registers of row accumulators; a kernel call handles one group (4 x 16 accumulators, enough
//! independent FMA chains) and reads it as a single sequential stream, which the hardware
//! prefetchers follow better than four. The portable reference uses the same layout.
//!
//! [`gemv`] runs the variant chosen once per process ([`crate::dispatch`]): AVX-512F or
//! AVX2+FMA (`arch/x86_64.rs`), NEON (`arch/aarch64.rs`), else the portable loop; the packed
//! layout is the same for all of them, so [`gemv_with`] can run any variant on any packing.

use crate::aligned::AlignedVec;
use crate::dispatch::{self, Variant};
use crate::gemm::MatRef;

/// Rows per packed panel.
pub const PANEL: usize = 16;
/// Panels one kernel call handles (its accumulators cover `GROUP * PANEL` rows).
pub const GROUP: usize = 4;
/// Rows covered by one kernel call.
pub(crate) const GROUP_ROWS: usize = GROUP * PANEL;

/// `W` (M x K) packed for [`gemv`]: row `i`, column `c` lives in group `g = i / 64` (which
/// holds `n` panels, 4 except maybe in the last group) at `g * 64 * K + (c * n + (i % 64) / 16)
/// * 16 + i % 16`; rows past M are zero.
#[derive(Clone, Debug)]
pub struct PackedGemv {
    m: usize,
    k: usize,
    data: AlignedVec,
}

impl PackedGemv {
    /// Packs `w` (any strides). `None` when its slice is too short for its shape.
    pub fn new(w: MatRef<'_>) -> Option<Self> {
        Self::hcat(&[w])
    }

    /// Packs the matrices of `parts` side by side (`[A | B | ...]`, all with the same row
    /// count), so one product takes the concatenated vector (`[W | R] * [x; h]`). `None` when
    /// the row counts differ or a slice is too short for its shape.
    pub fn hcat(parts: &[MatRef<'_>]) -> Option<Self> {
        let m = parts.first()?.rows;
        let mut k = 0usize;
        for p in parts {
            if p.rows != m {
                return None;
            }
            if p.rows > 0 && p.cols > 0 {
                let extent = (p.rows - 1)
                    .checked_mul(p.rs)?
                    .checked_add((p.cols - 1).checked_mul(p.cs)?)?
                    .checked_add(1)?;
                if p.data.len() < extent {
                    return None;
                }
            }
            k = k.checked_add(p.cols)?;
        }
        let np = m.div_ceil(PANEL);
        let mut data = AlignedVec::zeroed(np.checked_mul(PANEL)?.checked_mul(k)?);
        let mut k0 = 0;
        for p in parts {
            for i in 0..m {
                let (gi, q, l) = (i / GROUP_ROWS, (i % GROUP_ROWS) / PANEL, i % PANEL);
                let n = (np - gi * GROUP).min(GROUP);
                let base = gi * GROUP_ROWS * k + q * PANEL + l;
                for c in 0..p.cols {
                    data[base + (k0 + c) * n * PANEL] = p.data[i * p.rs + c * p.cs];
                }
            }
            k0 += p.cols;
        }
        Some(PackedGemv { m, k, data })
    }

    /// Rows of `W` (the length of `y`).
    pub fn rows(&self) -> usize {
        self.m
    }
    /// Columns of `W` (the length of `x`).
    pub fn cols(&self) -> usize {
        self.k
    }
    /// Number of row panels.
    pub fn panels(&self) -> usize {
        self.m.div_ceil(PANEL)
    }
    /// The packed floats (see [`PackedGemv`] for the layout).
    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

/// What is added to the product.
#[derive(Clone, Copy, Debug, Default)]
pub struct GemvAdd<'a> {
    /// One value per row (`y[i] += bias[i]`).
    pub bias: Option<&'a [f32]>,
    /// Add to `y`'s previous contents instead of overwriting them.
    pub accumulate: bool,
}

/// `y = W * x + bias (+ y when accumulating)` with the process-wide variant. Returns `false`
/// (touching nothing) when `x`, `y` or the bias do not have `W`'s sizes.
pub fn gemv(w: &PackedGemv, x: &[f32], y: &mut [f32], add: GemvAdd<'_>) -> bool {
    gemv_with(dispatch::selected(), w, x, y, add)
}

/// [`gemv`] with a chosen variant; one this CPU lacks runs the portable loop.
pub fn gemv_with(
    variant: Variant,
    w: &PackedGemv,
    x: &[f32],
    y: &mut [f32],
    add: GemvAdd<'_>,
) -> bool {
    gemv_ordered_with(variant, w, x, y, add, false)
}

/// [`gemv`] reading the 64-row groups last to first when `reverse`: a caller that runs the
/// same matrix again and again (a recurrent step) alternates the order, so each product
/// starts on the group the previous one read last, while it is still in L1.
pub fn gemv_ordered(
    w: &PackedGemv,
    x: &[f32],
    y: &mut [f32],
    add: GemvAdd<'_>,
    reverse: bool,
) -> bool {
    gemv_ordered_with(dispatch::selected(), w, x, y, add, reverse)
}

/// [`gemv_ordered`] with a chosen variant; one this CPU lacks runs the portable loop.
pub fn gemv_ordered_with(
    variant: Variant,
    w: &PackedGemv,
    x: &[f32],
    y: &mut [f32],
    add: GemvAdd<'_>,
    reverse: bool,
) -> bool {
    if x.len() != w.k || y.len() != w.m || add.bias.is_some_and(|b| b.len() != w.m) {
        return false;
    }
    if w.m == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::arch::x86_64::gemv(variant, w, x, y, add, reverse) {
        return true;
    }
    #[cfg(target_arch = "aarch64")]
    if crate::arch::aarch64::gemv(variant, w, x, y, add, reverse) {
        return true;
    }
    let _ = variant;
    drive_ordered(w, x, y, add, reverse, group_portable);
    true
}

/// `ys[t * ldy..][..M] = W * xs[t] + bias` for `n` vectors at once (`xs`: `n x K` row-major;
/// rows of `ys` `ldy >= M` apart, what lies between them untouched): the input projection
/// of a whole sequence with the packing a step's product uses. The AVX-512 kernel reads each
/// column of a 64-row group once for up to six vectors (24 accumulators), so `W` streams from
/// cache once per six vectors instead of once per vector; other variants run one
/// [`gemv_with`] per vector. Returns `false` (touching nothing) when a size disagrees.
pub fn gemv_many(
    w: &PackedGemv,
    n: usize,
    xs: &[f32],
    ys: &mut [f32],
    ldy: usize,
    bias: Option<&[f32]>,
) -> bool {
    gemv_many_with(dispatch::selected(), w, n, xs, ys, ldy, bias)
}

/// [`gemv_many`] with a chosen variant; one this CPU lacks runs the portable loop.
pub fn gemv_many_with(
    variant: Variant,
    w: &PackedGemv,
    n: usize,
    xs: &[f32],
    ys: &mut [f32],
    ldy: usize,
    bias: Option<&[f32]>,
) -> bool {
    let (m, k) = (w.m, w.k);
    let y_end = match n {
        0 => Some(0),
        _ => (n - 1).checked_mul(ldy).and_then(|v| v.checked_add(m)),
    };
    if Some(xs.len()) != n.checked_mul(k)
        || y_end.is_none_or(|e| ys.len() < e)
        || ldy < m
        || bias.is_some_and(|b| b.len() != m)
    {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::arch::x86_64::gemv_many(variant, w, n, xs, ys, ldy, bias) {
        return true;
    }
    let add = GemvAdd {
        bias,
        accumulate: false,
    };
    for t in 0..n {
        gemv_with(
            variant,
            w,
            &xs[t * k..(t + 1) * k],
            &mut ys[t * ldy..t * ldy + m],
            add,
        );
    }
    true
}

/// Runs `group` over the panels [`GROUP`] at a time (the groups last to first when `reverse`)
/// and applies the bias / accumulation to its sums: `group(panels, n, x, acc)` gets one group
/// of `n` (1..=GROUP) interleaved panels (`[k][n][16]`) and writes the `n * PANEL` row sums to
/// `acc`. Sizes were checked by the caller.
#[inline(always)]
pub(crate) fn drive_ordered(
    w: &PackedGemv,
    x: &[f32],
    y: &mut [f32],
    add: GemvAdd<'_>,
    reverse: bool,
    mut group: impl FnMut(&[f32], usize, &[f32], &mut [f32; GROUP_ROWS]),
) {
    let (m, k) = (w.m, w.k);
    let mut acc = [0f32; GROUP_ROWS];
    let ng = y.len().div_ceil(GROUP_ROWS);
    for i in 0..ng {
        let gi = if reverse { ng - 1 - i } else { i };
        let yg = &mut y[gi * GROUP_ROWS..((gi + 1) * GROUP_ROWS).min(m)];
        let p0 = gi * GROUP;
        let n = (w.panels() - p0).min(GROUP);
        let panels = &w.data[p0 * k * PANEL..(p0 + n) * k * PANEL];
        if add.bias.is_none() && !add.accumulate {
            // A plain product of a whole group: the kernel stores its sums straight into y
            // (no round trip through `acc` and a copy call per group).
            if let Ok(ya) = <&mut [f32; GROUP_ROWS]>::try_from(&mut *yg) {
                group(panels, n, x, ya);
                continue;
            }
        }
        group(panels, n, x, &mut acc);
        let r0 = gi * GROUP_ROWS;
        let acc = &acc[..yg.len()];
        match (add.bias, add.accumulate) {
            (None, false) => yg.copy_from_slice(acc),
            (None, true) => yg.iter_mut().zip(acc).for_each(|(v, &a)| *v += a),
            (Some(b), false) => {
                let b = &b[r0..r0 + yg.len()];
                yg.iter_mut()
                    .zip(acc)
                    .zip(b)
                    .for_each(|((v, &a), &b)| *v = a + b)
            }
            (Some(b), true) => {
                let b = &b[r0..r0 + yg.len()];
                yg.iter_mut()
                    .zip(acc)
                    .zip(b)
                    .for_each(|((v, &a), &b)| *v += a + b)
            }
        }
        debug_assert!(r0 + yg.len() <= m);
    }
}

/// The portable group kernel: 16-lane accumulators per panel, which LLVM vectorizes.
#[inline(always)]
pub(crate) fn group_portable(panels: &[f32], n: usize, x: &[f32], acc: &mut [f32; GROUP_ROWS]) {
    for (q, out) in acc.chunks_exact_mut(PANEL).take(n).enumerate() {
        let mut a = [0f32; PANEL];
        for (col, &xv) in panels.chunks_exact(n * PANEL).zip(x) {
            let col = &col[q * PANEL..(q + 1) * PANEL];
            for l in 0..PANEL {
                a[l] += xv * col[l];
            }
        }
        out.copy_from_slice(&a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(seed: &mut u32) -> f32 {
        *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    }

    /// `y[i] = sum_k W[i][k] x[k]` in f64 straight from the unpacked matrix.
    fn naive(w: &[f32], m: usize, k: usize, x: &[f32]) -> Vec<f64> {
        (0..m)
            .map(|i| (0..k).map(|c| w[i * k + c] as f64 * x[c] as f64).sum())
            .collect()
    }

    fn close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (k as f64).sqrt().max(1.0) + 1e-5 * w.abs();
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: y[{i}] = {g}, want {w}"
            );
        }
    }

    /// Every variant this CPU has against the f64 product of the unpacked matrix: odd sizes,
    /// partial panels and partial groups, k = 0 and 1, each bias / accumulate combination.
    #[test]
    fn every_variant_matches_naive() {
        let mut s = 7u32;
        let shapes = [
            (1, 1),
            (1, 0),
            (5, 3),
            (16, 16),
            (17, 1),
            (37, 9),
            (63, 40),
            (64, 64),
            (65, 128),
            (200, 33),
            (512, 168),
            (1000, 7),
        ];
        let mut variants = dispatch::detected();
        variants.retain(|v| !v.is_int8());
        for &(m, k) in &shapes {
            let w: Vec<f32> = (0..m * k).map(|_| rnd(&mut s)).collect();
            let x: Vec<f32> = (0..k).map(|_| rnd(&mut s)).collect();
            let bias: Vec<f32> = (0..m).map(|_| rnd(&mut s)).collect();
            let y0: Vec<f32> = (0..m).map(|_| rnd(&mut s)).collect();
            let pw = PackedGemv::new(MatRef::row_major(&w, m, k)).unwrap();
            assert_eq!((pw.rows(), pw.cols()), (m, k));
            let base = naive(&w, m, k, &x);
            for &v in &variants {
                for (use_bias, accumulate) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let add = GemvAdd {
                        bias: use_bias.then_some(&bias[..]),
                        accumulate,
                    };
                    let mut y = y0.clone();
                    assert!(gemv_with(v, &pw, &x, &mut y, add));
                    // The reversed group order gives the same bits.
                    let mut yr = y0.clone();
                    assert!(gemv_ordered_with(v, &pw, &x, &mut yr, add, true));
                    assert_eq!(y, yr, "{v:?} {m}x{k} reversed");
                    let want: Vec<f64> = (0..m)
                        .map(|i| {
                            base[i]
                                + if use_bias { bias[i] as f64 } else { 0.0 }
                                + if accumulate { y0[i] as f64 } else { 0.0 }
                        })
                        .collect();
                    close(
                        &y,
                        &want,
                        k,
                        &format!("{v:?} {m}x{k} bias {use_bias} acc {accumulate}"),
                    );
                }
            }
        }
    }

    /// The packed layout itself: 85 rows are a full group of 4 panels and a group of 2 (the
    /// second partly padding); row i, column c sits in group i/64 with n panels at offset
    /// (c * n + (i % 64) / 16) * 16 + i % 16; padding rows are zero. A transposed (strided)
    /// source and `hcat` pack the same way.
    #[test]
    fn packing_layout_is_column_panels() {
        let (m, k) = (85, 5);
        let w: Vec<f32> = (0..m * k).map(|v| v as f32 + 1.0).collect();
        let pw = PackedGemv::new(MatRef::row_major(&w, m, k)).unwrap();
        assert_eq!(pw.panels(), 6);
        assert_eq!(pw.data().len(), 6 * k * PANEL);
        for i in 0..96 {
            let n = if i < 64 { 4 } else { 2 };
            for c in 0..k {
                let at = (i / 64) * 64 * k + (c * n + (i % 64) / 16) * 16 + i % 16;
                let got = pw.data()[at];
                let want = if i < m { w[i * k + c] } else { 0.0 };
                assert_eq!(got, want, "row {i} col {c}");
            }
        }
        // W^T stored row-major (k x m), viewed transposed, packs to the same floats.
        let wt: Vec<f32> = (0..k * m).map(|j| w[(j % m) * k + j / m]).collect();
        let pt = PackedGemv::new(MatRef::row_major(&wt, k, m).t()).unwrap();
        assert_eq!(pt.data(), pw.data());
        // [A | B] equals packing the joined matrix.
        let (ka, kb) = (2, 3);
        let a: Vec<f32> = (0..m).flat_map(|i| w[i * k..i * k + ka].to_vec()).collect();
        let b: Vec<f32> = (0..m)
            .flat_map(|i| w[i * k + ka..(i + 1) * k].to_vec())
            .collect();
        let ph = PackedGemv::hcat(&[MatRef::row_major(&a, m, ka), MatRef::row_major(&b, m, kb)])
            .unwrap();
        assert_eq!(ph.data(), pw.data());
        // Mismatched rows, short slices and wrong vector sizes are refused.
        assert!(
            PackedGemv::hcat(&[MatRef::row_major(&a, m, ka), MatRef::row_major(&b, 3, 1)])
                .is_none()
        );
        assert!(PackedGemv::new(MatRef::row_major(&w[1..], m, k)).is_none());
        let mut y = vec![0f32; m];
        assert!(!gemv(&pw, &w[..k - 1], &mut y, GemvAdd::default()));
        assert!(!gemv(&pw, &w[..k], &mut y[1..], GemvAdd::default()));
        let short = vec![0f32; m - 1];
        let add = GemvAdd {
            bias: Some(&short),
            accumulate: false,
        };
        assert!(!gemv(&pw, &w[..k], &mut y, add));
    }

    /// `gemv_many` against the f64 products, every variant, for vector counts around the
    /// six-vector block (tails of 1..5), partial groups, k = 0 and with / without bias.
    #[test]
    fn many_vectors_match_naive() {
        let mut s = 3u32;
        let mut variants = dispatch::detected();
        variants.retain(|v| !v.is_int8());
        for &(m, k) in &[(64, 40), (128, 128), (85, 7), (16, 1), (5, 0), (200, 33)] {
            let w: Vec<f32> = (0..m * k).map(|_| rnd(&mut s)).collect();
            let bias: Vec<f32> = (0..m).map(|_| rnd(&mut s)).collect();
            let pw = PackedGemv::new(MatRef::row_major(&w, m, k)).unwrap();
            for n in [0usize, 1, 5, 6, 7, 13, 49] {
                let xs: Vec<f32> = (0..n * k).map(|_| rnd(&mut s)).collect();
                for &v in &variants {
                    for use_bias in [false, true] {
                        let b = use_bias.then_some(&bias[..]);
                        // Rows 3 floats apart beyond M: the gaps stay untouched.
                        let ldy = m + 3;
                        let mut ys = vec![f32::NAN; n * ldy];
                        assert!(gemv_many_with(v, &pw, n, &xs, &mut ys, ldy, b));
                        for t in 0..n {
                            let mut want = naive(&w, m, k, &xs[t * k..(t + 1) * k]);
                            if use_bias {
                                want.iter_mut()
                                    .zip(&bias)
                                    .for_each(|(a, &b)| *a += b as f64);
                            }
                            let what = format!("{v:?} {m}x{k} n {n} t {t} bias {use_bias}");
                            close(&ys[t * ldy..t * ldy + m], &want, k, &what);
                            assert!(ys[t * ldy + m..(t + 1) * ldy].iter().all(|v| v.is_nan()));
                        }
                    }
                }
            }
            let mut ys = vec![0f32; 2 * m];
            let x2 = vec![0f32; 2 * k];
            assert!(!gemv_many(&pw, 2, &vec![0.0; 2 * k + 1], &mut ys, m, None));
            assert!(!gemv_many(&pw, 2, &x2, &mut ys[1..], m, None));
            assert!(!gemv_many(&pw, 2, &x2, &mut ys, m + 1, None));
            assert!(!gemv_many(&pw, 2, &x2, &mut ys, m - 1, None));
            assert!(!gemv_many(&pw, 2, &x2, &mut ys, m, Some(&bias[1..])));
        }
    }

    /// One-hot vectors read single columns back: a packing that mixed up rows, columns or
    /// panels would put a value in the wrong place here.
    #[test]
    fn unit_vectors_read_back_columns() {
        let (m, k) = (70, 19);
        let w: Vec<f32> = (0..m * k).map(|v| (v % 251) as f32 - 100.0).collect();
        let pw = PackedGemv::new(MatRef::row_major(&w, m, k)).unwrap();
        for v in dispatch::detected().into_iter().filter(|v| !v.is_int8()) {
            for c in 0..k {
                let mut x = vec![0f32; k];
                x[c] = 1.0;
                let mut y = vec![f32::NAN; m];
                assert!(gemv_with(v, &pw, &x, &mut y, GemvAdd::default()));
                let col: Vec<f32> = (0..m).map(|i| w[i * k + c]).collect();
                assert_eq!(y, col, "{v:?} column {c}");
            }
        }
    }
}
