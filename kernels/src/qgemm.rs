//! Matrix multiply, int8: `C (i32) = (A - za) x (B - zb)` with u8 or i8 operands.
//!
//! - B (the weights) is packed once into a [`PackedB`] for the variant chosen at run time
//!   ([`crate::dispatch::selected_int8`]); A is packed per call.
//! - Every variant multiplies *canonical* bytes: B as i8 (u8 weights are shifted by -128, their
//!   zero point with them), A as u8 for the x86 VNNI and portable tiles (`vpdpbusd` is
//!   u8 x i8) or as i8 for the aarch64 ones (`sdot`, `smmla` are i8 x i8). The zero points are
//!   applied afterwards from row sums of A and column sums of B:
//!   `sum (a - za)(b - zb) = sum ab - zb * sum a - za * sum b + k * za * zb`.
//! - All arithmetic wraps in i32, as the ONNX integer ops define, so every variant gives the
//!   same bits as the portable reference ([`qgemm_reference`]).

use crate::dispatch::{self, Variant};

/// Borrowed 8-bit matrix data.
#[derive(Clone, Copy, Debug)]
pub enum QData<'a> {
    U8(&'a [u8]),
    I8(&'a [i8]),
}

impl QData<'_> {
    fn len(&self) -> usize {
        match self {
            QData::U8(d) => d.len(),
            QData::I8(d) => d.len(),
        }
    }
}

/// A borrowed 8-bit matrix with row and column strides (in elements).
#[derive(Clone, Copy, Debug)]
pub struct QMat<'a> {
    pub data: QData<'a>,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> QMat<'a> {
    /// Row-major `rows x cols` u8 matrix.
    pub fn u8(data: &'a [u8], rows: usize, cols: usize) -> Self {
        QMat {
            data: QData::U8(data),
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// Row-major `rows x cols` i8 matrix.
    pub fn i8(data: &'a [i8], rows: usize, cols: usize) -> Self {
        QMat {
            data: QData::I8(data),
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        QMat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    fn signed(&self) -> bool {
        matches!(self.data, QData::I8(_))
    }
    /// Element (r, c) as stored, widened.
    #[inline]
    fn at(&self, r: usize, c: usize) -> i32 {
        let i = r * self.rs + c * self.cs;
        match self.data {
            QData::U8(d) => d[i] as i32,
            QData::I8(d) => d[i] as i32,
        }
    }
    /// Whether the slice holds every element the sizes and strides reach.
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|r| (self.cols - 1).checked_mul(self.cs).map(|c| (r, c)))
            .and_then(|(r, c)| r.checked_add(c));
        matches!(last, Some(l) if l < self.data.len())
    }
}

/// Register-tile geometry of a variant: `mr x nr` outputs, `ku` k values per packed group,
/// and whether A is multiplied as i8 (aarch64) or u8 (x86 VNNI, portable).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub mr: usize,
    pub nr: usize,
    pub ku: usize,
    pub a_signed: bool,
}

pub(crate) fn tile_of(v: Variant) -> Tile {
    let (mr, nr, ku, a_signed) = match v {
        Variant::Avx512Vnni => (8, 32, 4, false),
        Variant::AvxVnni => (6, 16, 4, false),
        Variant::Dotprod => (8, 12, 4, true),
        Variant::I8mm => (8, 8, 8, true),
        _ => (4, 8, 1, false),
    };
    Tile {
        mr,
        nr,
        ku,
        a_signed,
    }
}

/// The int8 variant that runs when `v` is asked for: itself when it is an int8 variant this
/// CPU has, else the portable one.
fn runnable(v: Variant) -> Variant {
    if v.is_int8() && v.available() {
        v
    } else {
        Variant::Portable
    }
}

/// Packs rows `0..rows` of an operand (`get(r, p)` gives the canonical byte of row r at depth
/// p) into panels of `r_n` rows: per panel, per group of `ku` depths, `r_n x ku` bytes (row
/// major), zero padded past `rows` and `k`.
fn pack_panels(
    rows: usize,
    k: usize,
    r_n: usize,
    ku: usize,
    get: impl Fn(usize, usize) -> u8,
) -> Vec<u8> {
    let kp = k.div_ceil(ku) * ku;
    let panels = rows.div_ceil(r_n);
    let mut out = vec![0u8; panels * kp * r_n];
    if out.is_empty() {
        return out;
    }
    for (pi, panel) in out.chunks_exact_mut(kp * r_n).enumerate() {
        let r0 = pi * r_n;
        let h = r_n.min(rows - r0);
        for (g, grp) in panel.chunks_exact_mut(r_n * ku).enumerate() {
            let p0 = g * ku;
            let d = ku.min(k - p0);
            for r in 0..h {
                for kk in 0..d {
                    grp[r * ku + kk] = get(r0 + r, p0 + kk);
                }
            }
        }
    }
    out
}

/// B (`k x n`) packed once for one int8 variant, with its column sums and zero points.
#[derive(Clone, Debug)]
pub struct PackedB {
    variant: Variant,
    k: usize,
    n: usize,
    data: Vec<u8>,
    /// Sum over k of the canonical (i8) values of each column.
    col_sum: Vec<i32>,
    /// Canonical zero point of each column.
    zb: Vec<i32>,
}

impl PackedB {
    /// Packs `b` (`k x n`, any strides) whose zero point is `zb` (one value, or one per column)
    /// for the process's int8 variant. `None` when the slice is too short for the sizes or
    /// `zb` has the wrong length.
    pub fn new(b: QMat<'_>, zb: &[i32]) -> Option<PackedB> {
        Self::with_variant(dispatch::selected_int8(), b, zb)
    }

    /// [`PackedB::new`] for a named variant; one this CPU lacks packs for the portable one.
    pub fn with_variant(variant: Variant, b: QMat<'_>, zb: &[i32]) -> Option<PackedB> {
        let variant = runnable(variant);
        let (k, n) = (b.rows, b.cols);
        if !b.fits() || !(zb.len() == 1 || zb.len() == n) {
            return None;
        }
        k.checked_mul(n)?.checked_add(64 * k + 64)?;
        let t = tile_of(variant);
        // Canonical i8: u8 weights shift by -128 (the zero point with them).
        let shift = if b.signed() { 0 } else { 128 };
        let data = pack_panels(n, k, t.nr, t.ku, |j, p| (b.at(p, j) - shift) as i8 as u8);
        let col_sum = (0..n)
            .map(|j| (0..k).fold(0i32, |s, p| s.wrapping_add(b.at(p, j) - shift)))
            .collect();
        let zb = (0..n)
            .map(|j| {
                zb.get(j)
                    .or(zb.first())
                    .copied()
                    .unwrap_or(0)
                    .wrapping_sub(shift)
            })
            .collect();
        Some(PackedB {
            variant,
            k,
            n,
            data,
            col_sum,
            zb,
        })
    }

    /// Rows of the register tile the packed layout is for: a caller splitting rows across
    /// threads in multiples of it leaves no partial tile inside a part.
    pub fn tile_rows(&self) -> usize {
        tile_of(self.variant()).mr
    }

    /// The variant the panels are laid out for (the one [`qgemm`] runs).
    pub fn variant(&self) -> Variant {
        self.variant
    }
    /// Depth (rows of B).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Columns of B.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Canonical column sums and zero points (see the module doc).
    pub(crate) fn sums(&self) -> (&[i32], &[i32]) {
        (&self.col_sum, &self.zb)
    }
    /// The packed panels.
    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }
}

/// `C[i*c_rs + j*c_cs] = sum_p (A[i][p] - za[i]) * (B[p][j] - zb[j])` (wrapping i32) for
/// `A` (`m x k`, any strides) with zero point `za` (one value or one per row) and packed `b`.
/// Returns `false` (touching nothing) when the sizes disagree or a slice is too short.
pub fn qgemm(
    a: QMat<'_>,
    za: &[i32],
    b: &PackedB,
    c: &mut [i32],
    c_rs: usize,
    c_cs: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.n);
    if a.cols != b.k || !a.fits() || !(za.len() == 1 || za.len() == m) {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let last = (m - 1)
        .checked_mul(c_rs)
        .zip((n - 1).checked_mul(c_cs))
        .and_then(|(r, c)| r.checked_add(c));
    if !matches!(last, Some(l) if l < c.len()) {
        return false;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                c[i * c_rs + j * c_cs] = 0;
            }
        }
        return true;
    }
    let t = tile_of(b.variant);
    // Canonical A: u8 (x86, portable) or i8 (aarch64); the zero point moves with it.
    let shift: i32 = match (a.signed(), t.a_signed) {
        (true, false) => -128,
        (false, true) => 128,
        _ => 0,
    };
    let ap = pack_panels(m, k, t.mr, t.ku, |i, p| (a.at(i, p) - shift) as u8);
    let row_sum: Vec<i32> = (0..m)
        .map(|i| (0..k).fold(0i32, |s, p| s.wrapping_add(a.at(i, p) - shift)))
        .collect();
    let za: Vec<i32> = (0..m)
        .map(|i| {
            za.get(i)
                .or(za.first())
                .copied()
                .unwrap_or(0)
                .wrapping_sub(shift)
        })
        .collect();
    let kp = k.div_ceil(t.ku) * t.ku;
    let groups = kp / t.ku;
    let mut acc = vec![0i32; t.mr * t.nr];
    let kz = k as i32;
    for (ip, apanel) in ap.chunks_exact(kp * t.mr).enumerate() {
        let i0 = ip * t.mr;
        let h = t.mr.min(m - i0);
        for (jp, bpanel) in b.data.chunks_exact(kp * t.nr).enumerate() {
            let j0 = jp * t.nr;
            let w = t.nr.min(n - j0);
            run_tile(b.variant, t, groups, apanel, bpanel, &mut acc);
            for i in 0..h {
                let (rsum, zai) = (row_sum[i0 + i], za[i0 + i]);
                for j in 0..w {
                    let (csum, zbj) = (b.col_sum[j0 + j], b.zb[j0 + j]);
                    let v = acc[i * t.nr + j]
                        .wrapping_sub(zbj.wrapping_mul(rsum))
                        .wrapping_sub(zai.wrapping_mul(csum))
                        .wrapping_add(kz.wrapping_mul(zai).wrapping_mul(zbj));
                    c[(i0 + i) * c_rs + (j0 + j) * c_cs] = v;
                }
            }
        }
    }
    true
}

/// One register tile: `acc[i*nr + j] = sum_p a'[i][p] * b'[j][p]` over `groups` packed groups.
pub(crate) fn run_tile(v: Variant, t: Tile, groups: usize, a: &[u8], b: &[u8], acc: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::arch::x86_64::qtile(v, groups, a, b, acc) {
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if crate::arch::aarch64::qtile(v, groups, a, b, acc) {
        return;
    }
    let _ = v;
    if (t.mr, t.nr, t.ku, t.a_signed) == (4, 8, 1, false) {
        portable_tile_4x8(groups, a, b, acc);
    } else {
        portable_tile(t, groups, a, b, acc);
    }
}

/// The portable 4x8 tile with fixed sizes and one depth per group (an outer product per
/// step), so the compiler keeps the accumulators in vector registers.
fn portable_tile_4x8(groups: usize, a: &[u8], b: &[u8], acc: &mut [i32]) {
    let mut r = [[0i32; 8]; 4];
    for (ag, bg) in a.chunks_exact(4).zip(b.chunks_exact(8)).take(groups) {
        let mut bw = [0i32; 8];
        for (w, &y) in bw.iter_mut().zip(bg) {
            *w = y as i8 as i32;
        }
        for (ri, &x) in r.iter_mut().zip(ag) {
            let x = x as i32;
            for (o, &w) in ri.iter_mut().zip(&bw) {
                *o = o.wrapping_add(x * w);
            }
        }
    }
    for (dst, ri) in acc.chunks_exact_mut(8).zip(&r) {
        dst.copy_from_slice(ri);
    }
}

/// The portable tile (u8 A, i8 B), any geometry.
fn portable_tile(t: Tile, groups: usize, a: &[u8], b: &[u8], acc: &mut [i32]) {
    acc.fill(0);
    let (sa, sb) = (t.mr * t.ku, t.nr * t.ku);
    for (ag, bg) in a.chunks_exact(sa).zip(b.chunks_exact(sb)).take(groups) {
        for (i, ar) in ag.chunks_exact(t.ku).enumerate() {
            let row = &mut acc[i * t.nr..(i + 1) * t.nr];
            for (o, br) in row.iter_mut().zip(bg.chunks_exact(t.ku)) {
                let s = ar.iter().zip(br).fold(0i32, |s, (&x, &y)| {
                    let x = if t.a_signed { x as i8 as i32 } else { x as i32 };
                    s.wrapping_add(x * (y as i8 as i32))
                });
                *o = o.wrapping_add(s);
            }
        }
    }
}

/// The definition, for tests: plain triple loop over unpacked operands.
pub fn qgemm_reference(
    a: QMat<'_>,
    za: &[i32],
    b: QMat<'_>,
    zb: &[i32],
    c: &mut [i32],
    ldc: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || !a.fits() || !b.fits() || za.is_empty() || zb.is_empty() {
        return false;
    }
    if m > 0 && n > 0 && c.len() < (m - 1) * ldc + n {
        return false;
    }
    for i in 0..m {
        let zai = za.get(i).or(za.first()).copied().unwrap_or(0);
        for j in 0..n {
            let zbj = zb.get(j).or(zb.first()).copied().unwrap_or(0);
            c[i * ldc + j] = (0..k).fold(0i32, |s, p| {
                s.wrapping_add((a.at(i, p) - zai).wrapping_mul(b.at(p, j) - zbj))
            });
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u32);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(1664525).wrapping_add(1013904223);
            self.0 >> 8
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn variants() -> Vec<Variant> {
        let v = dispatch::detected_int8();
        assert_eq!(v[0], Variant::Portable);
        v
    }

    /// Every int8 variant this CPU has against the reference, bit for bit: odd sizes, tails
    /// of every tile, k not a multiple of 4 or 8, u8/i8 on both sides, per-row and
    /// per-column zero points, B given transposed (weights `[n][k]`) and a transposed store.
    #[test]
    fn every_variant_matches_reference() {
        let mut r = Rng(11);
        let mut shapes = vec![
            (1, 1, 1),
            (3, 5, 7),
            (8, 32, 4),
            (9, 33, 5),
            (17, 13, 300),
            (6, 16, 8),
            (2, 100, 9),
            (64, 70, 27),
            (13, 1, 1000),
        ];
        for _ in 0..8 {
            shapes.push((
                r.next() as usize % 40 + 1,
                r.next() as usize % 70 + 1,
                r.next() as usize % 150 + 1,
            ));
        }
        for &(m, n, k) in &shapes {
            let ab = r.bytes(m * k);
            let bb = r.bytes(k * n);
            let ai: Vec<i8> = ab.iter().map(|&x| x as i8).collect();
            let bi: Vec<i8> = bb.iter().map(|&x| x as i8).collect();
            let za_row: Vec<i32> = (0..m).map(|_| r.next() as i32 % 256 - 128).collect();
            let zb_col: Vec<i32> = (0..n).map(|_| r.next() as i32 % 256 - 128).collect();
            for (a_u8, b_u8) in [(true, false), (false, false), (true, true), (false, true)] {
                let a = if a_u8 {
                    QMat::u8(&ab, m, k)
                } else {
                    QMat::i8(&ai, m, k)
                };
                // B stored as [n][k] (weights layout) and viewed as k x n.
                let bt = if b_u8 {
                    QMat::u8(&bb, n, k).t()
                } else {
                    QMat::i8(&bi, n, k).t()
                };
                for (za, zb) in [
                    (vec![0], vec![0]),
                    (
                        vec![if a_u8 { 131 } else { -7 }],
                        vec![if b_u8 { 120 } else { 3 }],
                    ),
                    (za_row.clone(), zb_col.clone()),
                ] {
                    let mut want = vec![0i32; m * n];
                    assert!(qgemm_reference(a, &za, bt, &zb, &mut want, n));
                    for &v in &variants() {
                        let pb = PackedB::with_variant(v, bt, &zb).unwrap();
                        assert_eq!(pb.variant(), v);
                        let mut got = vec![i32::MIN; m * n];
                        assert!(qgemm(a, &za, &pb, &mut got, n, 1));
                        assert_eq!(got, want, "{v:?} m={m} n={n} k={k} u8={a_u8},{b_u8}");
                        // Transposed store: C^T with row stride m.
                        let mut gt = vec![0i32; m * n];
                        assert!(qgemm(a, &za, &pb, &mut gt, 1, m));
                        for i in 0..m {
                            for j in 0..n {
                                assert_eq!(gt[j * m + i], want[i * n + j]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_values_wrap_like_the_reference() {
        // All 255 x -128 with zero points at the far ends: large sums, exact.
        let (m, n, k) = (5, 7, 4099);
        let a = vec![255u8; m * k];
        let b = vec![-128i8; k * n];
        let mut want = vec![0; m * n];
        assert!(qgemm_reference(
            QMat::u8(&a, m, k),
            &[0],
            QMat::i8(&b, k, n),
            &[127],
            &mut want,
            n
        ));
        assert_eq!(want[0], 255 * -255 * k as i32);
        for v in variants() {
            let pb = PackedB::with_variant(v, QMat::i8(&b, k, n), &[127]).unwrap();
            let mut got = vec![0; m * n];
            assert!(qgemm(QMat::u8(&a, m, k), &[0], &pb, &mut got, n, 1));
            assert_eq!(got, want, "{v:?}");
        }
    }

    #[test]
    fn empty_depth_gives_zeros() {
        for v in variants() {
            let pb = PackedB::with_variant(v, QMat::i8(&[], 0, 5), &[3]).unwrap();
            let mut c = [7i32; 10];
            assert!(qgemm(QMat::u8(&[], 2, 0), &[1], &pb, &mut c, 5, 1));
            assert_eq!(c, [0; 10]);
        }
    }

    #[test]
    fn refuses_bad_sizes() {
        let a = [1u8; 12];
        let b = [1i8; 12];
        // B too short for 4 x 4.
        assert!(PackedB::new(QMat::i8(&b, 4, 4), &[0]).is_none());
        // Zero points of the wrong length.
        assert!(PackedB::new(QMat::i8(&b, 3, 4), &[0, 0]).is_none());
        let pb = PackedB::new(QMat::i8(&b, 3, 4), &[0]).unwrap();
        let mut c = [0i32; 16];
        // A has 4 columns, B 3 rows.
        assert!(!qgemm(QMat::u8(&a, 3, 4), &[0], &pb, &mut c, 4, 1));
        // C too short for 4 x 4.
        assert!(!qgemm(QMat::u8(&a, 4, 3), &[0], &pb, &mut c[..15], 4, 1));
        assert_eq!(c, [0; 16]);
        assert!(qgemm(QMat::u8(&a, 4, 3), &[0], &pb, &mut c, 4, 1));
        assert_eq!(c, [3; 16]);
    }
}
