//! Matrix multiply, float: `C = alpha * A * B + beta * C`.
//!
//! The portable kernel is safe Rust: A and B are packed into MR-row / NR-column panels
//! (cache-blocked KC x NC, Goto/BLIS order) and a fixed-size MR x NR accumulator tile, which
//! LLVM keeps in vector registers, does the multiply-adds. Fewer than MR rows take an axpy
//! path (C rows accumulate rows of B), which suits depthwise convolutions (m = 1).
//!
//! [`sgemm`] runs the variant chosen once per process ([`crate::dispatch`]): on x86_64 an
//! AVX-512F 12x32 or AVX2+FMA 6x16 register tile (intrinsics in `arch/x86_64.rs`) over the same
//! safe packing code ([`packed_with`]); [`sgemm_with`] runs a named variant (tests, benches).

use crate::dispatch::{self, Variant};

/// A borrowed matrix with row and column strides (in elements), so transposes are free.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major `rows x cols`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
    /// The largest index touched, to check slices are long enough.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `C (m x n, row stride ldc) = alpha * A (m x k) * B (k x n) + beta * C`.
/// When `beta == 0`, C's previous contents are ignored (NaNs included).
///
/// Returns `false` (and does nothing) when the shapes disagree or a slice is too short.
pub fn sgemm(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) -> bool {
    sgemm_with(dispatch::selected(), alpha, a, b, beta, c, ldc)
}

/// [`sgemm`] with a chosen kernel variant; a variant this CPU lacks runs the portable one.
pub fn sgemm_with(
    variant: Variant,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || a.data.len() < a.extent() || b.data.len() < b.extent() {
        return false;
    }
    if m > 0 && n > 0 && (ldc < n || c.len() < (m - 1) * ldc + n) {
        return false;
    }
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if beta == 0.0 {
            row.fill(0.0);
        } else if beta != 1.0 {
            row.iter_mut().for_each(|v| *v *= beta);
        }
    }
    if m == 0 || n == 0 || k == 0 || alpha == 0.0 {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::arch::x86_64::sgemm(variant, alpha, a, b, c, ldc) {
        return true;
    }
    #[cfg(target_arch = "aarch64")]
    if crate::arch::aarch64::sgemm(variant, alpha, a, b, c, ldc) {
        return true;
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = variant;
    if m < MR {
        axpy_rows(alpha, a, b, k, n, c, ldc);
    } else {
        packed(alpha, a, b, c, ldc);
    }
    true
}

/// A zeroed buffer of `len` floats starting on a 64-byte boundary (a cache line), so vector
/// loads of packed panels never straddle lines.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) struct AlignedBuf {
    buf: Vec<f32>,
    off: usize,
}

#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let buf = vec![0f32; len + 16];
        let off = buf.as_ptr().align_offset(64).min(16);
        AlignedBuf { buf, off }
    }
    pub(crate) fn get(&mut self) -> &mut [f32] {
        let off = self.off;
        let len = self.buf.len() - 16;
        &mut self.buf[off..off + len]
    }
}

/// Cache blocking for [`packed_with`]: depth of a packed panel, rows of A and columns of B
/// packed at once.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Blocking {
    pub kc: usize,
    pub mc: usize,
    pub nc: usize,
}

/// Packs rows `pc..` of `b` (as many as `dst` holds rows of `nr`), columns `j0..j0 + nr`, into
/// `dst` (`[kc][nr]`), zero past `b`'s last column: one B panel of a blocked GEMM.
pub(crate) fn pack_b_panel(b: MatRef<'_>, pc: usize, j0: usize, dst: &mut [f32], nr: usize) {
    let w = nr.min(b.cols - j0);
    for (p, d) in dst.chunks_exact_mut(nr).enumerate() {
        if b.cs == 1 {
            let off = (pc + p) * b.rs + j0;
            d[..w].copy_from_slice(&b.data[off..off + w]);
        } else {
            for (j, v) in d[..w].iter_mut().enumerate() {
                *v = b.at(pc + p, j0 + j);
            }
        }
        d[w..].fill(0.0);
    }
}

/// Packed, cache-blocked GEMM (BLIS loop order: B block KC x NC in L3/L2, A block MC x KC in
/// L2, B micro-panel KC x NR in L1) around an MR x NR register tile `tile(a_panel, b_panel,
/// acc)`, which must set `acc[i][j] = sum_p a_panel[p*MR + i] * b_panel[p*NR + j]` for
/// panels of equal depth (`a_panel.len() / MR == b_panel.len() / NR`). Adds `alpha * A * B`
/// to C (sizes already checked by [`sgemm_with`]).
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) fn packed_with<const MR: usize, const NR: usize, T>(
    blk: Blocking,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    mut tile: T,
) where
    T: FnMut(&[f32], &[f32], &mut [[f32; NR]; MR]),
{
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let nc_max = blk.nc.min(n.div_ceil(NR) * NR);
    let mc_max = blk.mc.min(m.div_ceil(MR) * MR);
    let kc_max = blk.kc.min(k);
    let mut bbuf = AlignedBuf::new(kc_max * nc_max.div_ceil(NR) * NR);
    let mut abuf = AlignedBuf::new(kc_max * mc_max.div_ceil(MR) * MR);
    let bp = bbuf.get();
    let ap = abuf.get();
    let mut acc = [[0f32; NR]; MR];
    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        let npanels = nc.div_ceil(NR);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            for jp in 0..npanels {
                let j0 = jc + jp * NR;
                pack_b_panel(b, pc, j0, &mut bp[jp * kc * NR..(jp + 1) * kc * NR], NR);
            }
            for ic in (0..m).step_by(mc_max) {
                let mc = mc_max.min(m - ic);
                let mpanels = mc.div_ceil(MR);
                for ip in 0..mpanels {
                    let dst = &mut ap[ip * kc * MR..(ip + 1) * kc * MR];
                    let i0 = ic + ip * MR;
                    let h = MR.min(m - i0);
                    if a.rs == 1 {
                        // Column-major A (a transposed view): rows of a panel are contiguous.
                        for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
                            let off = (pc + p) * a.cs + i0;
                            d[..h].copy_from_slice(&a.data[off..off + h]);
                            d[h..].fill(0.0);
                        }
                    } else {
                        for i in 0..MR {
                            if i < h {
                                let row = (i0 + i) * a.rs;
                                for p in 0..kc {
                                    dst[p * MR + i] = a.data[row + (pc + p) * a.cs];
                                }
                            } else {
                                for p in 0..kc {
                                    dst[p * MR + i] = 0.0;
                                }
                            }
                        }
                    }
                }
                for jp in 0..npanels {
                    let j0 = jc + jp * NR;
                    let w = NR.min(n - j0);
                    let bpanel = &bp[jp * kc * NR..(jp + 1) * kc * NR];
                    for ip in 0..mpanels {
                        let i0 = ic + ip * MR;
                        let h = MR.min(m - i0);
                        tile(&ap[ip * kc * MR..(ip + 1) * kc * MR], bpanel, &mut acc);
                        for (i, arow) in acc.iter().enumerate().take(h) {
                            let crow = &mut c[(i0 + i) * ldc + j0..(i0 + i) * ldc + j0 + w];
                            for (o, &v) in crow.iter_mut().zip(arow) {
                                *o += alpha * v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Rows of the register tile. 4x8 measured best on this machine without AVX (baseline x86_64
/// target): ResNet-18 convs 202 ms / 17.9 GFLOP/s vs 321 ms for 6x8, under shared load.
pub(crate) const MR: usize = 4;
/// Columns of the register tile (two SSE vectors; LLVM keeps the 4x8 tile in registers).
const NR: usize = 8;
/// Depth of a packed panel (A panel MR x KC and B panel KC x NR stay in L1).
const KC: usize = 256;
/// Rows of A packed at once (MC x KC stays in L2).
const MC: usize = 64;
/// Columns of B packed at once (KC x NC stays in L2/L3).
const NC: usize = 2048;

/// Few rows: each row of C accumulates rows of B (axpy), which vectorizes over n.
#[inline(always)]
pub(crate) fn axpy_rows(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    k: usize,
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    if b.cs != 1 && b.rs == 1 {
        // B is a transposed view (columns contiguous, e.g. Gemm with transB): each output is
        // a dot product of a row of A with a contiguous column of B.
        let mut arow = vec![0f32; k];
        for i in 0..a.rows {
            for (p, v) in arow.iter_mut().enumerate() {
                *v = a.at(i, p);
            }
            for (j, o) in c[i * ldc..i * ldc + n].iter_mut().enumerate() {
                let col = &b.data[j * b.cs..j * b.cs + k];
                // Eight partial sums so the loop vectorizes without reassociation.
                let mut acc = [0f32; 8];
                let (ca, cb) = (arow.chunks_exact(8), col.chunks_exact(8));
                let (ra, rb) = (ca.remainder(), cb.remainder());
                for (x, y) in ca.zip(cb) {
                    for l in 0..8 {
                        acc[l] += x[l] * y[l];
                    }
                }
                let mut s: f32 = acc.iter().sum();
                for (x, y) in ra.iter().zip(rb) {
                    s += x * y;
                }
                *o += alpha * s;
            }
        }
        return;
    }
    let contiguous = b.cs == 1;
    let mut acc = vec![0f32; n];
    let mut brow = vec![0f32; if contiguous { 0 } else { n }];
    for i in 0..a.rows {
        acc.fill(0.0);
        for p in 0..k {
            let av = a.at(i, p);
            if av == 0.0 {
                continue;
            }
            let row: &[f32] = if contiguous {
                &b.data[p * b.rs..p * b.rs + n]
            } else {
                for (j, v) in brow.iter_mut().enumerate() {
                    *v = b.at(p, j);
                }
                &brow
            };
            for (o, &bv) in acc.iter_mut().zip(row) {
                *o += av * bv;
            }
        }
        for (o, &v) in c[i * ldc..i * ldc + n].iter_mut().zip(&acc) {
            *o += alpha * v;
        }
    }
}

/// Packed, cache-blocked GEMM with an MR x NR register tile (the Goto/BLIS loop order).
fn packed(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut bp = vec![0f32; KC * NC.div_ceil(NR).min(n.div_ceil(NR)) * NR];
    let mut ap = vec![0f32; KC * MC.div_ceil(MR) * MR];
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let npanels = nc.div_ceil(NR);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // Pack B[pc..pc+kc, jc..jc+nc] into NR-wide column panels, zero padded.
            for jp in 0..npanels {
                let j0 = jc + jp * NR;
                pack_b_panel(b, pc, j0, &mut bp[jp * kc * NR..(jp + 1) * kc * NR], NR);
            }
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                let mpanels = mc.div_ceil(MR);
                // Pack A[ic..ic+mc, pc..pc+kc] into MR-tall row panels, zero padded.
                for ip in 0..mpanels {
                    let dst = &mut ap[ip * kc * MR..(ip + 1) * kc * MR];
                    let i0 = ic + ip * MR;
                    let h = MR.min(m - i0);
                    for p in 0..kc {
                        for i in 0..MR {
                            dst[p * MR + i] = if i < h { a.at(i0 + i, pc + p) } else { 0.0 };
                        }
                    }
                }
                for ip in 0..mpanels {
                    let i0 = ic + ip * MR;
                    let h = MR.min(m - i0);
                    let apanel = &ap[ip * kc * MR..(ip + 1) * kc * MR];
                    for jp in 0..npanels {
                        let j0 = jc + jp * NR;
                        let w = NR.min(n - j0);
                        let acc = tile(apanel, &bp[jp * kc * NR..(jp + 1) * kc * NR]);
                        for (i, arow) in acc.iter().enumerate().take(h) {
                            let crow = &mut c[(i0 + i) * ldc + j0..(i0 + i) * ldc + j0 + w];
                            for (o, &v) in crow.iter_mut().zip(arow) {
                                *o += alpha * v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The register tile: `acc[i][j] = sum_p a[p][i] * b[p][j]` over packed panels.
#[inline(always)]
fn tile(a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for i in 0..MR {
            let x = av[i];
            for j in 0..NR {
                acc[i][j] += x * bv[j];
            }
        }
    }
    acc
}

/// Integer matrix multiply with i32 accumulation (wrapping, as the ONNX integer ops define):
/// `C (m x n) = A (m x k) * B (k x n)`, all row-major and contiguous.
///
/// Returns `false` (and does nothing) when a slice is too short for the sizes.
pub fn igemm_i32(m: usize, n: usize, k: usize, a: &[i32], b: &[i32], c: &mut [i32]) -> bool {
    let (Some(mk), Some(kn), Some(mn)) = (m.checked_mul(k), k.checked_mul(n), m.checked_mul(n))
    else {
        return false;
    };
    if a.len() < mk || b.len() < kn || c.len() < mn {
        return false;
    }
    c[..mn].fill(0);
    for i in 0..m {
        let row = &mut c[i * n..(i + 1) * n];
        for p in 0..k {
            let av = a[i * k + p];
            if av == 0 {
                continue;
            }
            for (o, &bv) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *o = o.wrapping_add(av.wrapping_mul(bv));
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_on_odd_sizes_and_transposes() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 9, 300),
            (8, 33, 2),
            (37, 45, 300),
            (70, 2100, 5),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let want = naive(m, n, k, &a, &b);
            let mut c = vec![f32::NAN; m * n];
            assert!(sgemm(
                1.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&b, k, n),
                0.0,
                &mut c,
                n
            ));
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
            // B given transposed: store B^T row-major and view it transposed.
            let mut bt = vec![0f32; n * k];
            for r in 0..k {
                for col in 0..n {
                    bt[col * k + r] = b[r * n + col];
                }
            }
            let mut c2 = vec![1f32; m * n];
            assert!(sgemm(
                2.0,
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&bt, n, k).t(),
                0.5,
                &mut c2,
                n
            ));
            for (x, y) in c2.iter().zip(&want) {
                assert!((x - (2.0 * y + 0.5)).abs() < 1e-3);
            }
        }
    }

    /// Every variant this CPU has against the f64 reference: odd sizes and tails of every
    /// tile (4x8, 6x16, 12x32), k = 0 / 1 / past a KC block, A and B transposed, beta != 0,
    /// alpha != 1 and ldc > n (columns past n must stay untouched).
    #[test]
    fn every_variant_matches_reference() {
        let mut seed = 7u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let mut shapes = vec![
            (1, 1, 1),
            (4, 8, 0),
            (13, 37, 1),
            (12, 32, 256),
            (25, 65, 257),
            (6, 16, 3),
            (5, 3, 600),
            (130, 70, 40),
            (2, 100, 9),
            (64, 300, 17),
        ];
        for _ in 0..12 {
            let r = |x: f32, hi: f32| ((x + 0.5) * hi) as usize + 1;
            shapes.push((r(rnd(), 90.0), r(rnd(), 140.0), r(rnd(), 300.0)));
        }
        let variants = dispatch::detected();
        assert!(variants.contains(&Variant::Portable));
        for &(m, n, k) in &shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let at = transpose(&a, m, k);
            let bt = transpose(&b, k, n);
            let want = naive(m, n, k, &a, &b);
            let ldc = n + 3;
            let c0: Vec<f32> = (0..m * ldc).map(|_| rnd()).collect();
            for &v in &variants {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let am = if ta {
                        MatRef::row_major(&at, k, m).t()
                    } else {
                        MatRef::row_major(&a, m, k)
                    };
                    let bm = if tb {
                        MatRef::row_major(&bt, n, k).t()
                    } else {
                        MatRef::row_major(&b, k, n)
                    };
                    let (alpha, beta) = (1.5, -0.75);
                    let mut c = c0.clone();
                    assert!(sgemm_with(v, alpha, am, bm, beta, &mut c, ldc));
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            let exp = if j < n {
                                alpha * want[i * n + j] + beta * c0[i * ldc + j]
                            } else {
                                c0[i * ldc + j]
                            };
                            let tol = 1e-5 * (k as f32 + 1.0);
                            assert!(
                                (got - exp).abs() <= tol,
                                "{v:?} m={m} n={n} k={k} ta={ta} tb={tb} ({i},{j}): {got} vs {exp}"
                            );
                        }
                    }
                    // beta = 0 ignores NaNs already in C.
                    let mut c = vec![f32::NAN; m * ldc];
                    assert!(sgemm_with(v, 1.0, am, bm, 0.0, &mut c, ldc));
                    for i in 0..m {
                        for j in 0..n {
                            let got = c[i * ldc + j];
                            assert!((got - want[i * n + j]).abs() <= 1e-5 * (k as f32 + 1.0));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_variant_refuses_short_slices() {
        let a = [1f32; 12];
        let mut c = [0f32; 16];
        for v in dispatch::detected() {
            // B too short for 3 x 6.
            assert!(!sgemm_with(
                v,
                1.0,
                MatRef::row_major(&a, 4, 3),
                MatRef::row_major(&a, 3, 6),
                0.0,
                &mut c,
                6
            ));
            // C too short for 4 x 4 with ldc 5.
            assert!(!sgemm_with(
                v,
                1.0,
                MatRef::row_major(&a, 4, 3),
                MatRef::row_major(&a, 3, 4),
                0.0,
                &mut c,
                5
            ));
            assert_eq!(c, [0f32; 16]);
        }
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0f32; x.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = x[r * cols + c];
            }
        }
        t
    }

    #[test]
    fn igemm_matches_hand_product() {
        let a = [1, -2, 3, 4, 5, -6];
        let b = [7, 8, 9, 10, -11, 12];
        let mut c = [99i32; 4];
        assert!(igemm_i32(2, 2, 3, &a, &b, &mut c));
        // [[1,-2,3],[4,5,-6]] x [[7,8],[9,10],[-11,12]]
        assert_eq!(c, [-44, 24, 139, 10]);
        assert!(!igemm_i32(2, 2, 4, &a, &b, &mut c));
    }

    #[test]
    fn refuses_bad_shapes() {
        let a = [1f32; 6];
        let mut c = [0f32; 4];
        assert!(!sgemm(
            1.0,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&a, 2, 3),
            0.0,
            &mut c,
            2
        ));
    }
}
