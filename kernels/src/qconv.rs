//! int8 layers with TFLite's integer semantics, 8-bit in and 8-bit out:
//!
//! - [`Requant`]: per-channel requantization of i32 accumulators (a Q31 multiplier and a
//!   power-of-two shift, gemmlowp's `SaturatingRoundingDoublingHighMul` then
//!   `RoundingDivideByPOT`, exactly as TFLite's reference `MultiplyByQuantizedMultiplier`),
//!   plus the output zero point and the fused activation's clamp, written so one channel is
//!   one vector lane ([`requant_row`]).
//! - [`qgemm_requant`]: the int8 GEMM of [`crate::qgemm`] with packed weights, the zero-point
//!   compensation, bias and requantization applied to each register tile before the 8-bit
//!   store (no i32 matrix in memory).
//! - [`depthwise`]: direct NHWC depthwise convolution (any kernel size, stride, dilation;
//!   depth multiplier 1), channels vectorized.
//! - [`add`]: TFLite's quantized ADD / SUB of two same-shape tensors.
//!
//! Bytes in and out are the tensors' raw 8-bit values; `signed` says whether they are i8 or
//! u8. Every function has a scalar reference ([`requant_ref`], [`depthwise_reference`],
//! [`add_reference`]) and the x86 builds run the same safe loops compiled for AVX-512 / AVX2
//! (`simd.rs`); the tests compare them bit for bit.

use std::ops::Range;

use crate::dispatch::{self, Variant};
use crate::qgemm::{self, PackedB};

/// Per-channel requantization: `clamp(mbqm(acc, mult[c], shift[c]) + zp, lo, hi)`.
#[derive(Clone, Debug)]
pub struct Requant {
    /// Q31 significands (`[2^30, 2^31)` or 0).
    /// Channels; the vectors below hold `LANES` more (unused) entries.
    n: usize,
    mult: Vec<i32>,
    /// Left shift before the high multiply (TFLite's positive exponent, at most 30).
    lshift: Vec<u32>,
    /// Right shift after it (the negative exponent, at most 31) and its rounding mask.
    rshift: Vec<u32>,
    rmask: Vec<i32>,
    /// Float mode (onnxruntime's `QLinearConv` requantization): per-channel f32 scales, empty
    /// in the fixed-point mode. `clamp(rne(f32(acc) * scale[c]) + zp, lo, hi)`.
    fscale: Vec<f32>,
    /// Output zero point and the clamp (type range narrowed by the fused activation).
    pub zp: i32,
    pub lo: i32,
    pub hi: i32,
}

impl Requant {
    /// From `(significand, exponent)` pairs as TFLite's `QuantizeMultiplier` gives them (one
    /// per channel), the output zero point and the clamp. `None` for a significand of
    /// `i32::MIN` (never produced by `QuantizeMultiplier`) or an empty list.
    pub fn new(mults: &[(i32, i32)], zp: i32, lo: i32, hi: i32) -> Option<Requant> {
        if mults.is_empty() || mults.iter().any(|&(m, _)| m == i32::MIN) || lo > hi {
            return None;
        }
        // LANES unused channels past the end, so a block of LANES lanes can always be read.
        let all: Vec<(i32, i32)> = mults
            .iter()
            .copied()
            .chain(std::iter::repeat_n((0, 0), LANES))
            .collect();
        let rshift: Vec<u32> = all.iter().map(|&(_, s)| (-s).clamp(0, 31) as u32).collect();
        Some(Requant {
            n: mults.len(),
            mult: all.iter().map(|&(m, _)| m).collect(),
            lshift: all.iter().map(|&(_, s)| s.clamp(0, 30) as u32).collect(),
            rmask: rshift.iter().map(|&r| ((1i64 << r) - 1) as i32).collect(),
            rshift,
            fscale: Vec::new(),
            zp,
            lo,
            hi,
        })
    }

    /// The float mode: `clamp(rne(f32(acc) * scales[c]) + zp, lo, hi)` with the product
    /// rounded to f32 first and ties to even (what onnxruntime's `MlasRequantizeOutput` does
    /// for `QLinearConv`). `None` for an empty list, a non-finite scale, `lo > hi` or bounds
    /// more than 2^22 from the zero point (8-bit outputs are far inside).
    pub fn new_float(scales: &[f32], zp: i32, lo: i32, hi: i32) -> Option<Requant> {
        let small = |b: i32| (b as i64 - zp as i64).abs() <= RNE_SMALL_MAX;
        if scales.is_empty()
            || scales.iter().any(|s| !s.is_finite())
            || lo > hi
            || !small(lo)
            || !small(hi)
        {
            return None;
        }
        let mut r = Requant::new(&vec![(0, 0); scales.len()], zp, lo, hi)?;
        r.fscale = scales
            .iter()
            .copied()
            .chain(std::iter::repeat_n(0.0, LANES))
            .collect();
        Some(r)
    }

    /// The parameters of channels `0..n` repeated across [`LANES`] channels (lane `l` gets
    /// channel `l % n`), for requantizing rows of `n` outputs (`n` divides `LANES`) as one
    /// stream, `LANES` at a time.
    fn tiled(&self, n: usize) -> Requant {
        // LANES channels and LANES spare ones, as every Requant holds.
        fn rep<T: Copy>(v: &[T], n: usize) -> Vec<T> {
            (0..2 * LANES).map(|l| v[l % LANES % n]).collect()
        }
        Requant {
            n: LANES,
            mult: rep(&self.mult, n),
            lshift: rep(&self.lshift, n),
            rshift: rep(&self.rshift, n),
            rmask: rep(&self.rmask, n),
            fscale: if self.is_float() {
                rep(&self.fscale, n)
            } else {
                Vec::new()
            },
            zp: self.zp,
            lo: self.lo,
            hi: self.hi,
        }
    }

    /// Whether this is the float mode ([`Requant::new_float`]).
    pub fn is_float(&self) -> bool {
        !self.fscale.is_empty()
    }

    /// Channels (1 means one multiplier for every channel).
    pub fn channels(&self) -> usize {
        self.n
    }

    /// The multiplier list widened to `n` channels (a per-tensor multiplier repeated).
    pub fn widen(&self, n: usize) -> Requant {
        if self.n == n {
            return self.clone();
        }
        if self.is_float() {
            return Requant::new_float(&vec![self.fscale[0]; n.max(1)], self.zp, self.lo, self.hi)
                .unwrap_or_else(|| self.clone());
        }
        let one = (self.mult[0], self.lshift[0] as i32 - self.rshift[0] as i32);
        Requant::new(&vec![one; n.max(1)], self.zp, self.lo, self.hi)
            .unwrap_or_else(|| self.clone())
    }

    /// One value, channel `c`: the lane function of [`requant_row`].
    #[inline(always)]
    pub fn apply(&self, acc: i32, c: usize) -> i32 {
        if self.is_float() {
            return float_lane(acc, self.fscale[c], self.zp, self.lo, self.hi);
        }
        lane(
            acc,
            self.mult[c],
            self.lshift[c],
            self.rshift[c],
            self.rmask[c],
        )
        .wrapping_add(self.zp)
        .clamp(self.lo, self.hi)
    }
}

/// `MultiplyByQuantizedMultiplier` for one lane (`m != i32::MIN`, so the high multiply never
/// saturates): `x << l`, the rounding doubling high multiply, then a rounding shift right by
/// `r` (half away from zero). Only shifts, adds and one 32x32->64 multiply: vectorizes.
#[inline(always)]
fn lane(x: i32, m: i32, l: u32, r: u32, mask: i32) -> i32 {
    let x = x.wrapping_shl(l);
    // gemmlowp adds 2^30 (ab >= 0) or 1 - 2^30 (ab < 0) and divides by 2^31 truncating;
    // for ab < 0 that is ceil((ab + 1 - 2^30) / 2^31) = floor((ab + 2^30) / 2^31), so both
    // cases are one add and an arithmetic shift.
    let hi = ((x as i64 * m as i64 + (1i64 << 30)) >> 31) as i32;
    let rem = hi & mask;
    let threshold = (mask >> 1) + i32::from(hi < 0);
    (hi >> r) + i32::from(rem > threshold)
}

/// The float mode's lane: the product clamped to the output range less the zero point (the
/// bounds are integers, so clamping before rounding equals clamping after), rounded half to
/// even, plus the zero point.
#[inline(always)]
fn float_lane(acc: i32, s: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    let lo = lo.wrapping_sub(zp) as f32;
    let hi = hi.wrapping_sub(zp) as f32;
    rne_small(clamp_f(acc as f32 * s, lo, hi)).wrapping_add(zp)
}

/// `v` clamped to `[lo, hi]` as two compares-and-selects (`vmaxps` / `vminps`; a NaN `v`
/// gives `hi`), not `f32::max`/`min`'s NaN-aware sequences.
#[inline(always)]
fn clamp_f(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v > lo { v } else { lo };
    if v < hi {
        v
    } else {
        hi
    }
}

/// `v` rounded half to even, for `|v| <= 2^22`: adding `1.5 * 2^23` leaves no fraction bits,
/// so the add itself rounds (to nearest even in the default mode) and the low mantissa bits
/// are the integer. Unlike `round_ties_even() as i32` (a saturating conversion, which LLVM
/// leaves scalar), this is two vector instructions.
#[inline(always)]
fn rne_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((v + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32)
}

/// The largest clamp bound (less the zero point) [`rne_small`] rounds exactly.
const RNE_SMALL_MAX: i64 = 1 << 22;

/// The float mode's definition, one value at a time (the tests' reference and the TFLite op
/// functions' scalar path): f64 arithmetic on the f32-rounded product.
pub fn requant_float_ref(acc: i32, s: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    let p = (acc as f32 * s) as f64;
    let r = p.round_ties_even();
    let r = if r.is_nan() { 0.0 } else { r };
    ((r as i64).saturating_add(zp as i64)).clamp(lo as i64, hi as i64) as i32
}

/// The definition, for tests: gemmlowp's functions as written (saturating high multiply with
/// an i64 division, `RoundingDivideByPOT` with its mask and threshold).
pub fn requant_ref(acc: i32, m: i32, shift: i32, zp: i32, lo: i32, hi: i32) -> i32 {
    let left = shift.clamp(0, 30);
    let right = (-shift).clamp(0, 31);
    let a = acc.wrapping_mul(1i32 << left);
    let h = if a == i32::MIN && m == i32::MIN {
        i32::MAX
    } else {
        let ab = a as i64 * m as i64;
        let nudge = if ab >= 0 {
            1i64 << 30
        } else {
            1 - (1i64 << 30)
        };
        ((ab + nudge) / (1i64 << 31)) as i32
    };
    let mask = ((1i64 << right) - 1) as i32;
    let remainder = h & mask;
    let threshold = (mask >> 1) + i32::from(h < 0);
    let r = (h >> right) + i32::from(remainder > threshold);
    r.wrapping_add(zp).clamp(lo, hi)
}

/// Lanes per requantization block (one zmm of i32).
const LANES: usize = 16;

/// `out[j] = requant(acc[j] + add[j], channel c0 + j)` as 8-bit bytes, in blocks of
/// [`LANES`] (a short tail goes through a padded block: no scalar remainder loop).
#[inline(always)]
pub(crate) fn requant_row_body(rq: &Requant, c0: usize, acc: &[i32], add: &[i32], out: &mut [u8]) {
    let n = out.len().min(acc.len()).min(add.len());
    let mut j = 0;
    while j + LANES <= n {
        let o: &mut [u8; LANES] = (&mut out[j..j + LANES]).try_into().expect("16 bytes");
        requant_block(rq, c0 + j, &acc[j..j + LANES], &add[j..j + LANES], o);
        j += LANES;
    }
    if j < n {
        let r = n - j;
        let (mut a, mut b, mut o) = ([0i32; LANES], [0i32; LANES], [0u8; LANES]);
        a[..r].copy_from_slice(&acc[j..n]);
        b[..r].copy_from_slice(&add[j..n]);
        requant_block(rq, c0 + j, &a, &b, &mut o);
        out[j..n].copy_from_slice(&o[..r]);
    }
}

/// [`requant_row_body`] for callers whose `acc` and `add` can be read [`LANES`] at a time past
/// `out.len()` (the lanes past it are computed and dropped): no input copies for a tail.
#[inline(always)]
fn requant_row_padded(rq: &Requant, c0: usize, acc: &[i32], add: &[i32], out: &mut [u8]) {
    let n = out.len();
    let mut j = 0;
    while j + LANES <= n {
        let o: &mut [u8; LANES] = (&mut out[j..j + LANES]).try_into().expect("16 bytes");
        requant_block(rq, c0 + j, &acc[j..j + LANES], &add[j..j + LANES], o);
        j += LANES;
    }
    if j < n {
        let mut o = [0u8; LANES];
        requant_block(rq, c0 + j, &acc[j..j + LANES], &add[j..j + LANES], &mut o);
        out[j..n].copy_from_slice(&o[..n - j]);
    }
}

/// `out[e] = requant(acc[e] + add[e], channel e % LANES)` for a [`Requant::tiled`] `rq`;
/// `acc` and `add` can be read [`LANES`] at a time past `out.len()`.
#[inline(always)]
fn requant_stream(rq: &Requant, acc: &[i32], add: &[i32], out: &mut [u8]) {
    let n = out.len();
    let mut j = 0;
    while j + LANES <= n {
        let o: &mut [u8; LANES] = (&mut out[j..j + LANES]).try_into().expect("16 bytes");
        requant_block(rq, 0, &acc[j..j + LANES], &add[j..j + LANES], o);
        j += LANES;
    }
    if j < n {
        let mut o = [0u8; LANES];
        requant_block(rq, 0, &acc[j..j + LANES], &add[j..j + LANES], &mut o);
        out[j..n].copy_from_slice(&o[..n - j]);
    }
}

#[inline(always)]
fn requant_block(rq: &Requant, c0: usize, acc: &[i32], add: &[i32], out: &mut [u8; LANES]) {
    let m: &[i32; LANES] = rq.mult[c0..c0 + LANES].try_into().expect("lanes");
    let l: &[u32; LANES] = rq.lshift[c0..c0 + LANES].try_into().expect("lanes");
    let r: &[u32; LANES] = rq.rshift[c0..c0 + LANES].try_into().expect("lanes");
    let k: &[i32; LANES] = rq.rmask[c0..c0 + LANES].try_into().expect("lanes");
    let acc: &[i32; LANES] = acc.try_into().expect("lanes");
    let add: &[i32; LANES] = add.try_into().expect("lanes");
    let (zp, lo, hi) = (rq.zp, rq.lo, rq.hi);
    let mut b = [0u8; LANES];
    if rq.is_float() {
        let s: &[f32; LANES] = rq.fscale[c0..c0 + LANES].try_into().expect("lanes");
        for j in 0..LANES {
            b[j] = float_lane(acc[j].wrapping_add(add[j]), s[j], zp, lo, hi) as u8;
        }
    } else {
        for j in 0..LANES {
            let v = lane(acc[j].wrapping_add(add[j]), m[j], l[j], r[j], k[j]);
            b[j] = v.wrapping_add(zp).clamp(lo, hi) as u8;
        }
    }
    store_bytes(out, b);
}

/// `*out = b`, with `b` narrowed in a register first. Left to itself LLVM stores 16 i32
/// lanes narrowed to bytes as one `vpmovdb xmmword [mem], zmm`, which AMD Zen 4 runs slowly
/// (`perf`: the instruction after each one took 10% of the int8 depthwise kernel); the
/// register form and a plain 16-byte store are cheap everywhere.
#[inline(always)]
fn store_bytes(out: &mut [u8; LANES], b: [u8; LANES]) {
    #[cfg(target_arch = "x86_64")]
    let b = crate::arch::x86_64::in_register(b);
    *out = b;
}

/// Requantizes `acc[j] + add[j]` for channels `c0..c0 + out.len()` into 8-bit `out` (the
/// bytes of i8 or u8 values: `lo..=hi` lies in the output type's range).
pub fn requant_row(rq: &Requant, c0: usize, acc: &[i32], add: &[i32], out: &mut [u8]) {
    requant_row_with(dispatch::selected(), rq, c0, acc, add, out)
}

/// [`requant_row`] compiled for the float-family `variant` (Portable: the plain loop).
pub fn requant_row_with(
    variant: Variant,
    rq: &Requant,
    c0: usize,
    acc: &[i32],
    add: &[i32],
    out: &mut [u8],
) {
    assert!(
        c0 + out.len() <= rq.channels() && acc.len() >= out.len() && add.len() >= out.len(),
        "requant_row: sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::simd::requant_row(variant, rq, c0, acc, add, out) {
        return;
    }
    let _ = variant;
    requant_row_body(rq, c0, acc, add, out)
}

/// 8-bit matrix rows for [`qgemm_requant`]: `rows x k`, row `i` at `data[i * rs..][..k]`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub data: &'a [u8],
    pub signed: bool,
    pub rows: usize,
    pub k: usize,
    pub rs: usize,
}

/// Shared per-call state of the fused GEMM: per-column constant (bias and the zero-point
/// terms that do not depend on the row) and the geometry.
pub(crate) struct QgemmRq<'a> {
    pub a: Rows<'a>,
    /// Canonical bytes of A are `x ^ flip`.
    pub flip: u8,
    pub pb: &'a PackedB,
    pub colc: Vec<i32>,
    pub rq: &'a Requant,
    pub zb_any: bool,
}

/// `out[i * ldc + j] = requant_j(bias[j] + sum_p (a[i][p] - za) * (b[p][j] - zb[j]))` for the
/// 8-bit rows `a` and packed weights `pb` (`k x n`), as 8-bit bytes; `rq` has one multiplier
/// per column (or one for all). Returns `false` (touching nothing) on a size mismatch.
pub fn qgemm_requant(
    a: Rows<'_>,
    za: i32,
    pb: &PackedB,
    bias: &[i32],
    rq: &Requant,
    out: &mut [u8],
    ldc: usize,
) -> bool {
    qgemm_requant_with(dispatch::selected(), a, za, pb, bias, rq, out, ldc)
}

/// [`qgemm_requant`] with the epilogue compiled for the float-family `variant` (the register
/// tile is the one `pb` was packed for).
#[allow(clippy::too_many_arguments)]
pub fn qgemm_requant_with(
    variant: Variant,
    a: Rows<'_>,
    za: i32,
    pb: &PackedB,
    bias: &[i32],
    rq: &Requant,
    out: &mut [u8],
    ldc: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.k, pb.n());
    if k != pb.k() || bias.len() != n || rq.channels() != n || ldc < n {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let fits = (m - 1)
        .checked_mul(a.rs)
        .and_then(|v| v.checked_add(k))
        .is_some_and(|l| l <= a.data.len());
    let ofits = (m - 1)
        .checked_mul(ldc)
        .and_then(|v| v.checked_add(n))
        .is_some_and(|l| l <= out.len());
    if !fits || !ofits {
        return false;
    }
    let t = qgemm::tile_of(pb.variant());
    // Canonical A: u8 for x86 VNNI / portable tiles, i8 for aarch64's; x ^ 0x80 converts.
    let (flip, za_c) = canonical_za(a.signed, t.a_signed, za);
    let (csum, zb) = pb.sums();
    let kz = k as i32;
    let colc = (0..n)
        .map(|j| {
            bias[j]
                .wrapping_sub(za_c.wrapping_mul(csum[j]))
                .wrapping_add(kz.wrapping_mul(za_c).wrapping_mul(zb[j]))
        })
        .chain(std::iter::repeat_n(0, LANES))
        .collect();
    let p = QgemmRq {
        a,
        flip,
        pb,
        colc,
        rq,
        zb_any: zb.iter().any(|&z| z != 0),
    };
    #[cfg(target_arch = "x86_64")]
    if crate::simd::qgemm_requant(variant, &p, out, ldc) {
        return true;
    }
    let _ = variant;
    qgemm_requant_body(&p, out, ldc);
    true
}

/// The byte flip that turns `signed` activations into the tile's canonical signedness and
/// the zero point `za` in those canonical bytes.
fn canonical_za(signed: bool, a_signed: bool, za: i32) -> (u8, i32) {
    match (signed == a_signed, signed) {
        (true, _) => (0, za),
        (false, true) => (0x80, za.wrapping_add(128)),
        (false, false) => (0x80, za.wrapping_sub(128)),
    }
}

/// [`qgemm_requant`] for output columns `cols` only (`cols.start` a multiple of 32), into
/// `out` holding just those columns (row `i` at `out[i * ldc..][..cols.len()]`): a GEMM with
/// few rows and many columns (a classifier head, a 7x7 layer) split across threads by
/// columns. Runs only on the fused float path of the x86 VNNI tile (weights without zero
/// points, rows readable in place); returns `false` (touching nothing) otherwise or on a
/// size mismatch, and the caller splits rows instead.
#[allow(clippy::too_many_arguments)]
pub fn qgemm_requant_cols(
    a: Rows<'_>,
    za: i32,
    pb: &PackedB,
    bias: &[i32],
    rq: &Requant,
    cols: Range<usize>,
    out: &mut [u8],
    ldc: usize,
) -> bool {
    let (m, k, n) = (a.rows, a.k, pb.n());
    let t = qgemm::tile_of(pb.variant());
    let kp = k.next_multiple_of(4);
    let (csum, zb) = pb.sums();
    let ok = m > 0
        && k == pb.k()
        && t.ku == 4
        && t.mr == 8
        && t.nr == 32
        && rq.is_float()
        && rq.channels() == n
        && bias.len() == n
        && cols.start.is_multiple_of(32)
        && cols.start < cols.end
        && cols.end <= n
        && ldc >= cols.len()
        && !zb.iter().any(|&z| z != 0)
        && (m - 1)
            .checked_mul(a.rs)
            .and_then(|v| v.checked_add(kp))
            .is_some_and(|e| e <= a.data.len());
    if !ok {
        return false;
    }
    let (flip, za_c) = canonical_za(a.signed, t.a_signed, za);
    let colc: Vec<i32> = cols
        .clone()
        .map(|j| bias[j].wrapping_sub(za_c.wrapping_mul(csum[j])))
        .collect();
    let geo = RowGeo {
        per_line: usize::MAX,
        line_step: 0,
        col_step: a.rs,
        segs: 1,
        seg_step: 0,
        seg_groups: kp / 4,
    };
    fused_float(pb, a.data, 0..m, &geo, flip, cols, &colc, rq, out, ldc)
}

/// Where the rows of A lie for the fused GEMM (`arch::x86_64::qgemm_float`): row `i` starts at
/// `(i / per_line) * line_step + (i % per_line) * col_step`; its depth is `segs` segments of
/// `seg_groups` groups of 4 bytes, segment `s` starting `s * seg_step` past the row's start.
/// A plain row-major A is one line with `col_step` its row stride and one segment; an NHWC
/// image read as its own im2col ("implicit GEMM") has one line per output row and one
/// segment per kernel row.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct RowGeo {
    pub per_line: usize,
    pub line_step: usize,
    pub col_step: usize,
    pub segs: usize,
    pub seg_step: usize,
    pub seg_groups: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl RowGeo {
    /// Groups of 4 depths per row.
    pub fn groups(&self) -> usize {
        self.segs.saturating_mul(self.seg_groups)
    }

    /// Bytes past a row's start that its groups read, `None` on overflow.
    pub(crate) fn reach(&self) -> Option<usize> {
        if self.groups() == 0 {
            return Some(0);
        }
        (self.segs - 1)
            .checked_mul(self.seg_step)?
            .checked_add(self.seg_groups.checked_mul(4)?)
    }

    /// The largest start of rows `first..first + m` (starts grow along a line and from line
    /// to line), `None` on overflow.
    pub(crate) fn max_start(&self, first: usize, m: usize) -> Option<usize> {
        let start = |i: usize| {
            (i / self.per_line)
                .checked_mul(self.line_step)?
                .checked_add((i % self.per_line).checked_mul(self.col_step)?)
        };
        let last = first.checked_add(m.checked_sub(1)?)?;
        let mut top = start(last)?;
        let line_begin = last / self.per_line * self.per_line;
        if line_begin > first {
            top = top.max(start(line_begin - 1)?);
        }
        Some(top)
    }
}

/// The fused float-epilogue GEMM (x86 AVX-512 VNNI, `crate::arch::x86_64::qgemm_float`) over
/// A's rows `rows` placed by `geo`, B's columns `cols` (starting on a 32-column panel) with
/// their constants `colc`, the float requantization `rq`, into `out`. `false` (touching
/// nothing) where it does not run: another CPU or architecture, or sizes that do not fit.
#[allow(clippy::too_many_arguments)]
fn fused_float(
    pb: &PackedB,
    a: &[u8],
    rows: Range<usize>,
    geo: &RowGeo,
    flip: u8,
    cols: Range<usize>,
    colc: &[i32],
    rq: &Requant,
    out: &mut [u8],
    ldc: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let Some(scale) = rq.fscale.get(cols.clone()) else {
            return false;
        };
        let ep = crate::arch::x86_64::FloatEpilogue {
            colc,
            scale,
            zp: rq.zp,
            lo: rq.lo.wrapping_sub(rq.zp) as f32,
            hi: rq.hi.wrapping_sub(rq.zp) as f32,
        };
        let panel = geo.groups().saturating_mul(4 * 32);
        let b = pb
            .data()
            .get((cols.start / 32).saturating_mul(panel)..)
            .unwrap_or_default();
        crate::arch::x86_64::qgemm_float(
            pb.variant(),
            a,
            rows.start,
            rows.len(),
            geo,
            flip,
            b,
            cols.len(),
            &ep,
            out,
            ldc,
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pb, a, rows, geo, flip, cols, colc, rq, out, ldc);
        false
    }
}

/// A KxK convolution's A read straight from an NHWC image (an "implicit GEMM", no im2col):
/// output pixel `i` (`i / ow` its row, `i % ow` its column) has its kernel row `ky` at
/// `x[(i / ow) * line_step + (i % ow) * col_step + ky * seg_step..][..seg_bytes]`: the `kw`
/// taps of a kernel row are adjacent pixels (dilation 1 along the width), `kw * ic` bytes,
/// read as `seg_bytes` (that rounded up to 4; the extra bytes meet zero weights). `x` is the
/// image padded with the zero point wherever a window leaves it. The weights are packed
/// with depth `kh * seg_bytes` in that order ([`conv_rows_weights`]).
#[derive(Clone, Copy, Debug)]
pub struct ConvRows<'a> {
    pub x: &'a [u8],
    pub signed: bool,
    pub ow: usize,
    pub line_step: usize,
    pub col_step: usize,
    pub kh: usize,
    pub seg_step: usize,
    pub seg_bytes: usize,
}

/// Whether [`qgemm_conv_rows`] can run with the selected int8 variant on this CPU (the
/// AVX-512 VNNI tile with the float epilogue).
pub fn conv_rows_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::arch::x86_64::qgemm_float_supported(dispatch::selected_int8())
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Weights `oc x (kh * kw * ic)` (rows in `[kh][kw][ic]` order) laid out for [`ConvRows`]:
/// each kernel row's `kw * ic` bytes padded with zeros to `seg_bytes`.
pub fn conv_rows_weights(w: &[u8], oc: usize, kh: usize, kw_ic: usize) -> Vec<u8> {
    let seg = kw_ic.next_multiple_of(4);
    let mut out = vec![0u8; oc * kh * seg];
    for (o, dst) in out.chunks_exact_mut(kh * seg).enumerate() {
        for (ky, d) in dst.chunks_exact_mut(seg).enumerate() {
            if let Some(src) = w.get((o * kh + ky) * kw_ic..(o * kh + ky + 1) * kw_ic) {
                d[..kw_ic].copy_from_slice(src);
            }
        }
    }
    out
}

/// Output pixels `first..first + m` of the convolution `rows` with weights `pb` (packed from
/// [`conv_rows_weights`], no zero points), bias and float requantization `rq`, into `out`
/// (row `i` at `out[i * ldc..][..n]`). Returns `false` (touching nothing) when it does not
/// apply (see [`conv_rows_supported`]; weight zero points, fixed-point requantization) or
/// sizes do not match; the caller then takes the im2col path.
#[allow(clippy::too_many_arguments)]
pub fn qgemm_conv_rows(
    rows: &ConvRows<'_>,
    first: usize,
    m: usize,
    za: i32,
    pb: &PackedB,
    bias: &[i32],
    rq: &Requant,
    out: &mut [u8],
    ldc: usize,
) -> bool {
    let n = pb.n();
    let t = qgemm::tile_of(pb.variant());
    let (csum, zb) = pb.sums();
    if !rq.is_float()
        || rq.channels() != n
        || bias.len() != n
        || t.ku != 4
        || t.mr != 8
        || rows.ow == 0
        || !rows.seg_bytes.is_multiple_of(4)
        || rows.kh.checked_mul(rows.seg_bytes) != Some(pb.k())
        || zb.iter().any(|&z| z != 0)
    {
        return false;
    }
    let (flip, za_c) = canonical_za(rows.signed, t.a_signed, za);
    let colc: Vec<i32> = (0..n)
        .map(|j| bias[j].wrapping_sub(za_c.wrapping_mul(csum[j])))
        .collect();
    let geo = RowGeo {
        per_line: rows.ow,
        line_step: rows.line_step,
        col_step: rows.col_step,
        segs: rows.kh,
        seg_step: rows.seg_step,
        seg_groups: rows.seg_bytes / 4,
    };
    fused_float(
        pb,
        rows.x,
        first..first + m,
        &geo,
        flip,
        0..n,
        &colc,
        rq,
        out,
        ldc,
    )
}

/// The loop of [`qgemm_requant`]: per panel of `mr` rows, pack it (canonical bytes and row
/// sums), then per panel of `nr` columns run the register tile and requantize it.
#[inline(always)]
pub(crate) fn qgemm_requant_body(p: &QgemmRq<'_>, out: &mut [u8], ldc: usize) {
    let pb = p.pb;
    let t = qgemm::tile_of(pb.variant());
    let (m, k, n) = (p.a.rows, p.a.k, pb.n());
    let kp = k.div_ceil(t.ku) * t.ku;
    let groups = kp / t.ku;
    // x86 VNNI tiles read A's rows in place when no packing is needed for row sums: packing
    // a panel of rows cost about as much as the tile itself on narrow layers. Each row is
    // read for `kp` bytes; past `k` they meet B's zero padding, so they only need to be
    // readable (a caller's row stride padded to a multiple of 4, or the next row).
    #[cfg(target_arch = "x86_64")]
    let direct = !p.zb_any
        && t.ku == 4
        && (m.saturating_sub(1) * p.a.rs)
            .checked_add(kp)
            .is_some_and(|e| e <= p.a.data.len())
        && crate::arch::x86_64::qtile_rows_supported(pb.variant());
    #[cfg(not(target_arch = "x86_64"))]
    let direct = false;
    let mut starts = vec![0usize; t.mr];
    let mut apanel = vec![0u8; if direct { 0 } else { kp * t.mr }];
    let mut rsum = vec![0i32; t.mr];
    // LANES spare accumulators and column constants: the epilogue reads whole blocks.
    let mut acc = vec![0i32; t.mr * t.nr + LANES];
    let mut add = vec![0i32; t.nr + LANES];
    let zb = pb.sums().1;
    let bdata = pb.data();
    // The float mode on the in-place AVX-512 VNNI tile: tile and epilogue in one kernel.
    #[cfg(target_arch = "x86_64")]
    if direct
        && p.rq.is_float()
        && t.mr == 8
        && crate::arch::x86_64::qgemm_float_supported(pb.variant())
    {
        let geo = RowGeo {
            per_line: usize::MAX,
            line_step: 0,
            col_step: p.a.rs,
            segs: 1,
            seg_step: 0,
            seg_groups: groups,
        };
        let ran = fused_float(
            pb,
            p.a.data,
            0..m,
            &geo,
            p.flip,
            0..n,
            &p.colc,
            p.rq,
            out,
            ldc,
        );
        assert!(ran, "qgemm_requant: fused rows fit (checked on entry)");
        return;
    }
    // Narrow outputs (one column panel, `n` divides LANES, rows back to back in `out`, as
    // in a first convolution with 8 output channels): the tile's rows are requantized as
    // one stream, LANES lanes at a time with the channel parameters repeated every `n`
    // lanes, instead of one padded LANES block per row (8 of 16 lanes wasted, and a copy).
    let narrow = n <= t.nr && LANES.is_multiple_of(n) && ldc == n;
    let tiled = narrow.then(|| p.rq.tiled(n));
    let (mut flat, mut flat_add) = if narrow {
        let add: Vec<i32> = (0..t.mr * n + LANES).map(|e| p.colc[e % n]).collect();
        (vec![0i32; t.mr * n + LANES], add)
    } else {
        (Vec::new(), Vec::new())
    };
    for i0 in (0..m).step_by(t.mr) {
        let h = t.mr.min(m - i0);
        if direct {
            // Rows past the last one repeat it; their outputs are never stored.
            for (i, st) in starts.iter_mut().enumerate() {
                *st = (i0 + i.min(h - 1)) * p.a.rs;
            }
        }
        // Pack rows i0..i0+h: per group of ku depths, mr x ku bytes. Padding (depths past
        // k, rows past h) meets zero weights or is never stored, so it is left as is.
        for (i, rs) in rsum.iter_mut().enumerate().take(if direct { 0 } else { h }) {
            let row = &p.a.data[(i0 + i) * p.a.rs..][..k];
            match t.ku {
                4 => pack_row::<4>(row, i, t.mr, &mut apanel),
                8 => pack_row::<8>(row, i, t.mr, &mut apanel),
                _ => pack_row::<1>(row, i, t.mr, &mut apanel),
            }
            // Row sums only meet weights with a zero point.
            *rs = if !p.zb_any {
                0
            } else if t.a_signed {
                row.iter()
                    .fold(0i32, |s, &x| s.wrapping_add((x ^ p.flip) as i8 as i32))
            } else {
                row.iter()
                    .fold(0i32, |s, &x| s.wrapping_add((x ^ p.flip) as i32))
            };
        }
        if p.flip != 0 && !direct {
            apanel.iter_mut().for_each(|x| *x ^= p.flip);
        }
        for (jp, bpanel) in bdata.chunks_exact(kp * t.nr).enumerate() {
            let j0 = jp * t.nr;
            let w = t.nr.min(n - j0);
            if !direct {
                qgemm::run_tile(pb.variant(), t, groups, &apanel, bpanel, &mut acc);
            } else {
                #[cfg(target_arch = "x86_64")]
                {
                    let ran = crate::arch::x86_64::qtile_rows(
                        pb.variant(),
                        groups,
                        p.a.data,
                        &starts,
                        p.flip,
                        bpanel,
                        &mut acc,
                    );
                    assert!(ran, "qgemm_requant: direct rows fit (checked on entry)");
                }
            }
            if let Some(rq) = &tiled {
                for i in 0..h {
                    flat[i * n..(i + 1) * n].copy_from_slice(&acc[i * t.nr..][..n]);
                    if p.zb_any {
                        for j in 0..n {
                            flat_add[i * n + j] =
                                p.colc[j].wrapping_sub(zb[j].wrapping_mul(rsum[i]));
                        }
                    }
                }
                requant_stream(rq, &flat, &flat_add, &mut out[i0 * n..(i0 + h) * n]);
                continue;
            }
            for i in 0..h {
                let o = &mut out[(i0 + i) * ldc + j0..][..w];
                let a = &acc[i * t.nr..];
                if p.zb_any {
                    for ((d, &c), &z) in add.iter_mut().zip(&p.colc[j0..j0 + w]).zip(&zb[j0..]) {
                        *d = c.wrapping_sub(z.wrapping_mul(rsum[i]));
                    }
                    requant_row_padded(p.rq, j0, a, &add, o);
                } else {
                    requant_row_padded(p.rq, j0, a, &p.colc[j0..], o);
                }
            }
        }
    }
}

/// Copies row `i` of a panel into its place in every group of `KU` depths.
#[inline(always)]
fn pack_row<const KU: usize>(row: &[u8], i: usize, mr: usize, panel: &mut [u8]) {
    let mut groups = row.chunks_exact(KU);
    let stride = mr * KU;
    // One panel group per KU depths: the slot's bounds are the same in every group, so the
    // check leaves the loop.
    for (dst, c) in panel.chunks_exact_mut(stride).zip(groups.by_ref()) {
        let c: &[u8; KU] = c.try_into().expect("KU bytes");
        let d: &mut [u8; KU] = (&mut dst[i * KU..(i + 1) * KU])
            .try_into()
            .expect("KU bytes");
        *d = *c;
    }
    let rest = groups.remainder();
    if !rest.is_empty() {
        let g = row.len() / KU;
        // Byte by byte: a variable-length copy_from_slice is a memmove call per row, which
        // was 16% of a first conv with k = 9 (3x3, one channel).
        for (d, &v) in panel[g * stride + i * KU..][..rest.len()]
            .iter_mut()
            .zip(rest)
        {
            *d = v;
        }
    }
}

/// Geometry and operands of a depthwise convolution (NHWC, one image, depth multiplier 1).
#[derive(Clone, Copy, Debug)]
pub struct Depthwise<'a> {
    /// Input bytes `ih x iw x c`.
    pub x: &'a [u8],
    pub signed: bool,
    pub xz: i32,
    pub ih: usize,
    pub iw: usize,
    pub c: usize,
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
    /// Weights `[kh][kw][c]` with their zero points already subtracted.
    pub w: &'a [i32],
    pub bias: &'a [i32],
    pub rq: &'a Requant,
    /// The same layer prepared for the x86 VNNI 3x3 kernel ([`DwPack::new`]), when it
    /// applies; interior pixels then go through it.
    pub pack: Option<&'a DwPack>,
}

impl<'a> Depthwise<'a> {
    /// The input copied into a zero-point border wide enough that every window lies inside
    /// it, with the layer's height and width: run with `x` set to it, the top and left
    /// padding to 0 and `ih`, `iw` to those, every output pixel takes the interior kernels.
    /// `None` when the border pixels are under a tenth of the output (the copy would cost
    /// more than they do) or the input is short.
    pub fn bordered(&self) -> Option<(Vec<u8>, usize, usize)> {
        self.bordered_rows(0..self.oh)
    }

    /// [`Depthwise::bordered`] for the output rows `rows` only: the padded rows they read,
    /// from padded row `rows.start * sh` on, so threads each build their own share. Run with
    /// `x` set to it, `ih`, `iw` to the returned sizes, the top and left padding to 0, `oh`
    /// to `rows.len()` and output rows `0..rows.len()`. `None` where [`Depthwise::bordered`]
    /// gives none or `rows` is empty or past `oh`.
    pub fn bordered_rows(&self, rows: Range<usize>) -> Option<(Vec<u8>, usize, usize)> {
        if rows.is_empty() || rows.end > self.oh {
            return None;
        }
        // The full-image decision and width (cheap: no copy when it says no).
        let (oh, ow, c) = (self.oh, self.ow, self.c);
        if ow == 0 || self.x.len() < self.ih * self.iw * c {
            return None;
        }
        let need_w = (ow - 1) * self.sw + (self.kw - 1) * self.dw + 1;
        let pw = (self.iw + self.pl).max(need_w);
        let inside = |o: usize, s: usize, d: usize, k: usize, p: usize, i: usize| {
            (0..o)
                .filter(|&v| v * s >= p && v * s - p + (k - 1) * d < i)
                .count()
        };
        let rows_in = inside(oh, self.sh, self.dh, self.kh, self.pt, self.ih);
        let cols_in = inside(ow, self.sw, self.dw, self.kw, self.pl, self.iw);
        if 10 * rows_in * cols_in >= 9 * oh * ow {
            return None;
        }
        let first = rows.start * self.sh;
        let ph = (rows.end - 1 - rows.start) * self.sh + (self.kh - 1) * self.dh + 1;
        // Row by row: the image rows copied, only the padding filled with the zero point (a
        // fill of the whole buffer first was 0.7% of a quantized MobileNet).
        let row = self.iw * c;
        let z = self.xz as u8;
        let right = (pw - self.pl - self.iw) * c;
        let mut buf = Vec::with_capacity(ph * pw * c);
        for py in first..first + ph {
            match py.checked_sub(self.pt).filter(|&y| y < self.ih) {
                Some(y) => {
                    buf.resize(buf.len() + self.pl * c, z);
                    buf.extend_from_slice(&self.x[y * row..(y + 1) * row]);
                    buf.resize(buf.len() + right, z);
                }
                None => buf.resize(buf.len() + pw * c, z),
            }
        }
        debug_assert_eq!(buf.len(), ph * pw * c);
        Some((buf, ph, pw))
    }
}

/// A 3x3 depthwise layer's weights and epilogue laid out for the AVX-512 VNNI kernel
/// (`vpdpbusd` over the three taps of a kernel row and a zero fourth): per block of 64
/// channels and kernel row, four vectors whose dword `4 * lane + i` holds the row's three
/// weights of channel `16 * lane + 4 * q + i` of the block (`q` the vector); the column
/// constants (bias less the zero-point terms) and float scales in the same order.
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct DwPack {
    pub(crate) c: usize,
    pub(crate) w: Vec<u8>,
    pub(crate) colc: Vec<i32>,
    pub(crate) scale: Vec<f32>,
    pub(crate) flip: u8,
}

impl DwPack {
    /// For a 3x3 layer of `c` channels (`w` as in [`Depthwise::w`]) with the float-mode
    /// requantization `rq` (one scale per channel or one for all); `None` when the kernel
    /// does not apply: another requantization, `c` not a multiple of 16, weights beyond i8,
    /// or a CPU without AVX-512 VNNI (BW) under the selected int8 variant.
    pub fn new(
        w: &[i32],
        bias: &[i32],
        xz: i32,
        signed: bool,
        rq: &Requant,
        c: usize,
    ) -> Option<DwPack> {
        #[cfg(target_arch = "x86_64")]
        let ok = crate::arch::x86_64::dw3x3_float_supported(dispatch::selected_int8());
        #[cfg(not(target_arch = "x86_64"))]
        let ok = false;
        let fits = |v: i32| (-128..=127).contains(&v);
        if !ok
            || !rq.is_float()
            || c == 0
            || !c.is_multiple_of(16)
            || w.len() < 9 * c
            || bias.len() < c
            || !w[..9 * c].iter().all(|&v| fits(v))
        {
            return None;
        }
        let blocks = c.div_ceil(64);
        let scale_of = |ch: usize| rq.fscale[if rq.channels() == 1 { 0 } else { ch }];
        // vpdpbusd multiplies unsigned activations: i8 ones are read as x ^ 0x80 = x + 128,
        // whose extra 128 * sum(w) the column constant takes back.
        let extra = if signed { 128 } else { 0 };
        let mut pk = DwPack {
            c,
            w: vec![0u8; blocks * 3 * 4 * 64],
            colc: vec![0i32; blocks * 64],
            scale: vec![0f32; blocks * 64],
            flip: if signed { 0x80 } else { 0 },
        };
        for blk in 0..blocks {
            for q in 0..4 {
                for lane in 0..4 {
                    for i in 0..4 {
                        let ch = blk * 64 + 16 * lane + 4 * q + i;
                        if ch >= c {
                            continue;
                        }
                        let slot = blk * 64 + q * 16 + lane * 4 + i;
                        let sw = (0..9).fold(0i32, |a, t| a.wrapping_add(w[t * c + ch]));
                        pk.colc[slot] =
                            bias[ch].wrapping_sub(xz.wrapping_add(extra).wrapping_mul(sw));
                        pk.scale[slot] = scale_of(ch);
                        for ky in 0..3 {
                            let at = ((blk * 3 + ky) * 4 + q) * 64 + (lane * 4 + i) * 4;
                            for kx in 0..3 {
                                pk.w[at + kx] = w[(ky * 3 + kx) * c + ch] as i8 as u8;
                            }
                        }
                    }
                }
            }
        }
        Some(pk)
    }
}

impl Depthwise<'_> {
    fn valid(&self) -> bool {
        let taps = self.kh * self.kw;
        self.x.len() >= self.ih * self.iw * self.c
            && self.w.len() >= taps * self.c
            && self.bias.len() >= self.c
            && self.rq.channels() >= self.c
            && self.sh > 0
            && self.sw > 0
            && self.dh > 0
            && self.dw > 0
    }
}

/// Output rows `rows` of the depthwise convolution into `out` (`rows.len() x ow x c` bytes).
/// Padding taps contribute nothing (TFLite pads with the input zero point). Returns `false`
/// (touching nothing) on a size mismatch.
pub fn depthwise(p: &Depthwise<'_>, rows: Range<usize>, out: &mut [u8]) -> bool {
    depthwise_with(dispatch::selected(), p, rows, out)
}

/// [`depthwise`] compiled for the float-family `variant`.
pub fn depthwise_with(
    variant: Variant,
    p: &Depthwise<'_>,
    rows: Range<usize>,
    out: &mut [u8],
) -> bool {
    if !p.valid() || rows.end > p.oh || out.len() < rows.len() * p.ow * p.c {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::depthwise_q8(variant, p, rows.clone(), out) {
        return true;
    }
    let _ = variant;
    depthwise_body(p, rows, out);
    true
}

#[inline(always)]
pub(crate) fn depthwise_body(p: &Depthwise<'_>, rows: Range<usize>, out: &mut [u8]) {
    if p.signed {
        depthwise_t::<true>(p, rows, out)
    } else {
        depthwise_t::<false>(p, rows, out)
    }
}

#[inline(always)]
fn widen<const S: bool>(b: u8) -> i32 {
    if S {
        b as i8 as i32
    } else {
        b as i32
    }
}

#[inline(always)]
fn depthwise_t<const S: bool>(p: &Depthwise<'_>, rows: Range<usize>, out: &mut [u8]) {
    let c = p.c;
    let mut taps: Vec<(usize, usize)> = Vec::with_capacity(p.kh * p.kw);
    let zero = [0i32; 16];
    // Offsets of every tap from the pixel's top-left input, for pixels whose window lies
    // inside the image.
    let all: Vec<(usize, usize)> = (0..p.kh)
        .flat_map(|ky| {
            (0..p.kw).map(move |kx| ((ky * p.dh * p.iw + kx * p.dw) * c, (ky * p.kw + kx) * c))
        })
        .collect();
    let (ey, ex) = ((p.kh - 1) * p.dh, (p.kw - 1) * p.dw);
    // 3x3 windows over a multiple of 16 channels: pixels whose window lies inside the image
    // go through dw3x3_interior (weights held across the row, zero point folded into the
    // bias); the rest, and every other shape, one pixel at a time below.
    let fast = p.kh == 3 && p.kw == 3 && c.is_multiple_of(16) && c > 0;
    // Output columns whose window is inside horizontally: ox*sw >= pl, ox*sw - pl + ex < iw.
    let ox_lo = p.pl.div_ceil(p.sw).min(p.ow);
    let ox_hi = if p.iw + p.pl > ex {
        ((p.iw + p.pl - ex - 1) / p.sw + 1).min(p.ow).max(ox_lo)
    } else {
        ox_lo
    };
    let offs: [usize; 9] = std::array::from_fn(|t| all.get(t).map_or(0, |&(xo, _)| xo));
    // Made only when a row needs the portable interior: with the packed weights (the float
    // kernel) it went unused, and it was 2% of a quantized MobileNet at 9 x c weights per call.
    let mut badj: Option<Vec<i32>> = None;
    let make_badj = || -> Vec<i32> {
        (0..c)
            .map(|j| {
                let sw: i32 = (0..9).fold(0i32, |a, t| a.wrapping_add(p.w[t * c + j]));
                p.bias[j].wrapping_sub(p.xz.wrapping_mul(sw))
            })
            .collect()
    };
    for (r, oy) in rows.enumerate() {
        let y0 = oy * p.sh;
        let row_inside = y0 >= p.pt && y0 - p.pt + ey < p.ih;
        let interior = if fast && row_inside && ox_lo < ox_hi {
            let o = &mut out[(r * p.ow + ox_lo) * c..(r * p.ow + ox_hi) * c];
            let base = ((y0 - p.pt) * p.iw + (ox_lo * p.sw - p.pl)) * c;
            #[cfg(target_arch = "x86_64")]
            let done = p.pack.is_some_and(|pk| {
                let rq = (p.rq.zp, p.rq.lo, p.rq.hi);
                crate::arch::x86_64::dw3x3_float(pk, p.x, &offs, base, p.sw * c, rq, o)
            });
            #[cfg(not(target_arch = "x86_64"))]
            let done = false;
            if !done {
                let badj = badj.get_or_insert_with(make_badj);
                dw3x3_interior::<S>(p, &offs, badj, base, ox_hi - ox_lo, o);
            }
            ox_lo..ox_hi
        } else {
            0..0
        };
        for ox in (0..p.ow).filter(|ox| !interior.contains(ox)) {
            let (y0, x0) = (oy * p.sh, ox * p.sw);
            if y0 >= p.pt && x0 >= p.pl && y0 - p.pt + ey < p.ih && x0 - p.pl + ex < p.iw {
                let base = ((y0 - p.pt) * p.iw + (x0 - p.pl)) * c;
                taps.clear();
                taps.extend(all.iter().map(|&(xo, wo)| (base + xo, wo)));
            } else {
                taps.clear();
                for ky in 0..p.kh {
                    let Some(iy) = (oy * p.sh + ky * p.dh)
                        .checked_sub(p.pt)
                        .filter(|&v| v < p.ih)
                    else {
                        continue;
                    };
                    for kx in 0..p.kw {
                        let Some(ix) = (ox * p.sw + kx * p.dw)
                            .checked_sub(p.pl)
                            .filter(|&v| v < p.iw)
                        else {
                            continue;
                        };
                        taps.push(((iy * p.iw + ix) * c, (ky * p.kw + kx) * c));
                    }
                }
            }
            let o = &mut out[(r * p.ow + ox) * c..][..c];
            let mut c0 = 0;
            while c0 + 64 <= c {
                dw_block::<S, 64>(p, &taps, c0, o);
                c0 += 64;
            }
            while c0 + 16 <= c {
                dw_block::<S, 16>(p, &taps, c0, o);
                c0 += 16;
            }
            if c0 < c {
                let nb = c - c0;
                let mut acc = [0i32; 16];
                acc[..nb].copy_from_slice(&p.bias[c0..c]);
                for &(xo, wo) in taps.iter() {
                    let xs = &p.x[xo + c0..][..nb];
                    let ws = &p.w[wo + c0..][..nb];
                    for j in 0..nb {
                        acc[j] =
                            acc[j].wrapping_add((widen::<S>(xs[j]) - p.xz).wrapping_mul(ws[j]));
                    }
                }
                requant_row_body(p.rq, c0, &acc[..nb], &zero[..nb], &mut o[c0..]);
            }
        }
    }
}

/// `n` consecutive output pixels of a 3x3 depthwise convolution whose windows lie inside the
/// image, the first window's top-left input at `base`, `offs` the taps' offsets from it:
/// per block of 16 channels, the nine weight vectors stay in registers across the pixels and
/// `badj` (bias less the input zero point times the weight sum) starts each sum, so a tap
/// is one widening load, one multiply and one add. Equal to the per-pixel sum modulo 2^32.
#[inline(always)]
fn dw3x3_interior<const S: bool>(
    p: &Depthwise<'_>,
    offs: &[usize; 9],
    badj: &[i32],
    base: usize,
    n: usize,
    out: &mut [u8],
) {
    let c = p.c;
    let zero = [0i32; 16];
    let step = p.sw * c;
    for c0 in (0..c).step_by(16) {
        let w: [[i32; 16]; 9] =
            std::array::from_fn(|t| p.w[t * c + c0..][..16].try_into().expect("16 weights"));
        let b: &[i32; 16] = badj[c0..c0 + 16].try_into().expect("16 lanes");
        for i in 0..n {
            let at = base + i * step + c0;
            let mut acc = *b;
            for t in 0..9 {
                let xs: &[u8; 16] = p.x[at + offs[t]..][..16].try_into().expect("16 bytes");
                for j in 0..16 {
                    acc[j] = acc[j].wrapping_add(widen::<S>(xs[j]).wrapping_mul(w[t][j]));
                }
            }
            requant_row_body(p.rq, c0, &acc, &zero, &mut out[i * c + c0..][..16]);
        }
    }
}

/// `N` channels from `c0` of one output pixel: the accumulators stay in registers while the
/// taps are summed.
#[inline(always)]
fn dw_block<const S: bool, const N: usize>(
    p: &Depthwise<'_>,
    taps: &[(usize, usize)],
    c0: usize,
    o: &mut [u8],
) {
    let mut acc = [0i32; N];
    acc.copy_from_slice(&p.bias[c0..c0 + N]);
    for &(xo, wo) in taps {
        let xs: &[u8; N] = p.x[xo + c0..][..N].try_into().expect("N bytes");
        let ws: &[i32; N] = p.w[wo + c0..][..N].try_into().expect("N weights");
        for j in 0..N {
            acc[j] = acc[j].wrapping_add((widen::<S>(xs[j]) - p.xz).wrapping_mul(ws[j]));
        }
    }
    requant_row_body(p.rq, c0, &acc, &[0; N], &mut o[c0..c0 + N]);
}

/// The definition, for tests: every output as a plain sum over in-bounds taps, requantized
/// with [`requant_ref`] (`mults` as given to [`Requant::new`]).
pub fn depthwise_reference(p: &Depthwise<'_>, mults: &[(i32, i32)]) -> Vec<u8> {
    let c = p.c;
    let mut out = Vec::with_capacity(p.oh * p.ow * c);
    for oy in 0..p.oh {
        for ox in 0..p.ow {
            for ch in 0..c {
                let mut s = p.bias[ch];
                for ky in 0..p.kh {
                    for kx in 0..p.kw {
                        let iy = (oy * p.sh + ky * p.dh) as isize - p.pt as isize;
                        let ix = (ox * p.sw + kx * p.dw) as isize - p.pl as isize;
                        if iy < 0 || ix < 0 || iy >= p.ih as isize || ix >= p.iw as isize {
                            continue;
                        }
                        let b = p.x[(iy as usize * p.iw + ix as usize) * c + ch];
                        let xv = if p.signed { b as i8 as i32 } else { b as i32 };
                        s = s
                            .wrapping_add((xv - p.xz).wrapping_mul(p.w[(ky * p.kw + kx) * c + ch]));
                    }
                }
                let (m, sh) = mults[ch.min(mults.len() - 1)];
                out.push(requant_ref(s, m, sh, p.rq.zp, p.rq.lo, p.rq.hi) as u8);
            }
        }
    }
    out
}

/// TFLite's quantized ADD (or SUB) of two same-shape 8-bit tensors: both inputs shifted left by
/// `left_shift` (20 for 8-bit), rescaled by their multipliers to a common grid, summed, and
/// requantized by `out`'s multiplier (`out` holds one channel).
#[derive(Clone, Debug)]
pub struct AddParams {
    pub z1: i32,
    pub z2: i32,
    pub m1: (i32, i32),
    pub m2: (i32, i32),
    pub left_shift: u32,
    pub negate: bool,
    pub out: Requant,
}

/// `out = add(a, b)` elementwise (same length); `false` on a size mismatch.
pub fn add(p: &AddParams, signed: bool, a: &[u8], b: &[u8], out: &mut [u8]) -> bool {
    add_with(dispatch::selected(), p, signed, a, b, out)
}

/// [`add`] compiled for the float-family `variant`.
pub fn add_with(
    variant: Variant,
    p: &AddParams,
    signed: bool,
    a: &[u8],
    b: &[u8],
    out: &mut [u8],
) -> bool {
    if a.len() != b.len() || out.len() != a.len() || p.out.channels() != 1 || p.left_shift > 30 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::add_q8(variant, p, signed, a, b, out) {
        return true;
    }
    let _ = variant;
    add_body(p, signed, a, b, out);
    true
}

#[inline(always)]
pub(crate) fn add_body(p: &AddParams, signed: bool, a: &[u8], b: &[u8], out: &mut [u8]) {
    if signed {
        add_t::<true>(p, a, b, out)
    } else {
        add_t::<false>(p, a, b, out)
    }
}

/// A multiplier as lane parameters.
fn lane_params((m, s): (i32, i32)) -> (i32, u32, u32, i32) {
    let r = (-s).clamp(0, 31) as u32;
    (m, s.clamp(0, 30) as u32, r, ((1i64 << r) - 1) as i32)
}

#[inline(always)]
fn add_t<const S: bool>(p: &AddParams, a: &[u8], b: &[u8], out: &mut [u8]) {
    let (m1, l1, r1, k1) = lane_params(p.m1);
    let (m2, l2, r2, k2) = lane_params(p.m2);
    let o = &p.out;
    let (mo, lo_, ro, ko) = (o.mult[0], o.lshift[0], o.rshift[0], o.rmask[0]);
    let (z1, z2, ls) = (p.z1, p.z2, p.left_shift);
    let sign = if p.negate { -1 } else { 1 };
    for ((d, &x), &y) in out.iter_mut().zip(a).zip(b) {
        let x = lane((widen::<S>(x) - z1) << ls, m1, l1, r1, k1);
        let y = lane((widen::<S>(y) - z2) << ls, m2, l2, r2, k2);
        let v = lane(x.wrapping_add(y.wrapping_mul(sign)), mo, lo_, ro, ko);
        *d = v.wrapping_add(o.zp).clamp(o.lo, o.hi) as u8;
    }
}

/// The definition, for tests.
pub fn add_reference(p: &AddParams, signed: bool, a: &[u8], b: &[u8]) -> Vec<u8> {
    let w = |v: u8| if signed { v as i8 as i32 } else { v as i32 };
    let one = |x: i32, (m, s): (i32, i32)| requant_ref(x, m, s, 0, i32::MIN, i32::MAX);
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let x = one((w(x) - p.z1).wrapping_mul(1 << p.left_shift), p.m1);
            let y = one((w(y) - p.z2).wrapping_mul(1 << p.left_shift), p.m2);
            let raw = if p.negate {
                x.wrapping_sub(y)
            } else {
                x.wrapping_add(y)
            };
            let o = &p.out;
            requant_ref(
                raw,
                o.mult[0],
                o.lshift[0] as i32 - o.rshift[0] as i32,
                o.zp,
                o.lo,
                o.hi,
            ) as u8
        })
        .collect()
}

/// Quantized ADD of two same-shape 8-bit tensors as LiteRT's default (XNNPACK) kernels run
/// it: each input's scale over the output's, `sa / so` and `sb / so` in f32, becomes an
/// integer multiplier of at most 21 bits, `round_even(s * 2^shift)` with `shift` chosen so the
/// larger one is at least 2^20; then `out = clamp(((bias + a * ma + b * mb) >> shift) + zo)`
/// with `bias = 2^(shift - 1) - za * ma - zb * mb`, all in 32-bit integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddShift {
    pub bias: i32,
    pub ma: i32,
    pub mb: i32,
    pub shift: u32,
    pub zp: i32,
    pub lo: i32,
    pub hi: i32,
}

impl AddShift {
    /// The parameters for zero points `za`, `zb`, scale ratios `sa / so`, `sb / so` and output
    /// zero point and bounds. `None` where the kernel's integers could overflow: a ratio that
    /// is not finite, not positive or outside `[2^-10, 2^8)` (XNNPACK's own limits), input
    /// zero points beyond ±255 or output zero point and bounds beyond 16 bits. Within them,
    /// `|(x - za) * ma| + |(y - zb) * mb| + 2^(shift - 1) <= 2 * 383 * 2^21 + 2^29 < 2^31`.
    pub fn new(za: i32, zb: i32, ra: f32, rb: f32, zp: i32, lo: i32, hi: i32) -> Option<AddShift> {
        let ok = |r: f32| r.is_finite() && (1.0 / 1024.0..256.0).contains(&r);
        let byte = |v: i32| (-255..=255).contains(&v);
        let small = |v: i32| (-(1 << 15)..1 << 15).contains(&v);
        if !ok(ra) || !ok(rb) || !byte(za) || !byte(zb) || lo > hi {
            return None;
        }
        if ![zp, lo, hi].into_iter().all(small) {
            return None;
        }
        // The larger ratio's binary exponent e (in [-10, 7]) gives shift = 20 - e, so its
        // multiplier lands in [2^20, 2^21].
        let e = ((ra.max(rb).to_bits() >> 23) as i32) - 127;
        let shift = (20 - e) as u32;
        let mult = |r: f32| (r * (shift as f32).exp2()).round_ties_even() as i32;
        let (ma, mb) = (mult(ra), mult(rb));
        let bias = (1i32 << (shift - 1)) - za * ma - zb * mb;
        Some(AddShift {
            bias,
            ma,
            mb,
            shift,
            zp,
            lo,
            hi,
        })
    }

    /// One output of the definition (`x`, `y` the input values, not their bytes), in i64 so
    /// no step can wrap.
    pub fn apply1(&self, x: i32, y: i32) -> i32 {
        let acc = self.bias as i64 + x as i64 * self.ma as i64 + y as i64 * self.mb as i64;
        ((acc >> self.shift) + self.zp as i64).clamp(self.lo as i64, self.hi as i64) as i32
    }
}

/// `out = add(a, b)` by [`AddShift`] (same lengths); `false` on a size mismatch.
pub fn add_shift(p: &AddShift, signed: bool, a: &[u8], b: &[u8], out: &mut [u8]) -> bool {
    add_shift_with(dispatch::selected(), p, signed, a, b, out)
}

/// [`add_shift`] compiled for the float-family `variant`.
pub fn add_shift_with(
    variant: Variant,
    p: &AddShift,
    signed: bool,
    a: &[u8],
    b: &[u8],
    out: &mut [u8],
) -> bool {
    if a.len() != b.len() || out.len() != a.len() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::add_shift_q8(variant, p, signed, a, b, out) {
        return true;
    }
    let _ = variant;
    add_shift_body(p, signed, a, b, out);
    true
}

#[inline(always)]
pub(crate) fn add_shift_body(p: &AddShift, signed: bool, a: &[u8], b: &[u8], out: &mut [u8]) {
    if signed {
        add_shift_t::<true>(p, a, b, out)
    } else {
        add_shift_t::<false>(p, a, b, out)
    }
}

#[inline(always)]
fn add_shift_t<const S: bool>(p: &AddShift, a: &[u8], b: &[u8], out: &mut [u8]) {
    // The sum fits in 32 bits for the parameters `new` gives (see there); wrapping steps keep
    // the loop free of overflow checks.
    let (lo, hi) = (p.lo.wrapping_sub(p.zp), p.hi.wrapping_sub(p.zp));
    for ((d, &x), &y) in out.iter_mut().zip(a).zip(b) {
        let acc = p
            .bias
            .wrapping_add(widen::<S>(x).wrapping_mul(p.ma))
            .wrapping_add(widen::<S>(y).wrapping_mul(p.mb));
        *d = (acc >> p.shift).clamp(lo, hi).wrapping_add(p.zp) as u8;
    }
}

/// TFLite QUANTIZE of f32 values to 8 bits: `clamp(round(v / scale) + zp, lo, hi)` with
/// rounding half away from zero and NaN as 0 (the driver's `quant1`), as bytes.
pub fn quantize_f32(x: &[f32], scale: f32, zp: i32, lo: i32, hi: i32, out: &mut [u8]) -> bool {
    quantize_f32_with(dispatch::selected(), x, scale, zp, lo, hi, out)
}

/// [`quantize_f32`] compiled for the float-family `variant`.
pub fn quantize_f32_with(
    variant: Variant,
    x: &[f32],
    scale: f32,
    zp: i32,
    lo: i32,
    hi: i32,
    out: &mut [u8],
) -> bool {
    if x.len() != out.len() || lo > hi {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::quantize_f32(variant, x, scale, zp, lo, hi, out) {
        return true;
    }
    let _ = variant;
    quantize_f32_body(x, scale, zp, lo, hi, out);
    true
}

/// One value of [`quantize_f32`], the definition.
#[inline(always)]
pub fn quantize1(v: f32, scale: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    let q = (v / scale).round();
    let q = if q.is_nan() {
        0
    } else {
        q.clamp(-2e9, 2e9) as i32
    };
    q.saturating_add(zp).clamp(lo, hi)
}

/// [`quantize_f32`]'s loop. With bounds within 2^22 of the zero point the quotient is
/// clamped to them first (integer bounds: the same as clamping the rounded value) and the
/// integral result converted by [`rne_small`], so the loop has no saturating conversion,
/// which LLVM leaves scalar.
#[inline(always)]
pub(crate) fn quantize_f32_body(x: &[f32], scale: f32, zp: i32, lo: i32, hi: i32, out: &mut [u8]) {
    let small = |b: i32| (b as i64 - zp as i64).abs() <= RNE_SMALL_MAX;
    if !small(lo) || !small(hi) {
        for (d, &v) in out.iter_mut().zip(x) {
            *d = quantize1(v, scale, zp, lo, hi) as u8;
        }
        return;
    }
    let (flo, fhi) = (lo.wrapping_sub(zp) as f32, hi.wrapping_sub(zp) as f32);
    for (d, &v) in out.iter_mut().zip(x) {
        let q = v / scale;
        let q = if q.is_nan() { 0.0 } else { q };
        *d = rne_small(clamp_f(q, flo, fhi).round()).wrapping_add(zp) as u8;
    }
}

/// ONNX `QuantizeLinear` of f32 to 8 bits: `clamp(rne(v / scale) + zp, lo, hi)` (ties to
/// even, unlike [`quantize_f32`]'s TFLite rounding), as the bytes of the values.
pub fn quantize_f32_even(x: &[f32], scale: f32, zp: i32, lo: i32, hi: i32, out: &mut [u8]) -> bool {
    quantize_f32_even_with(dispatch::selected(), x, scale, zp, lo, hi, out)
}

/// [`quantize_f32_even`] compiled for the float-family `variant`.
pub fn quantize_f32_even_with(
    variant: Variant,
    x: &[f32],
    scale: f32,
    zp: i32,
    lo: i32,
    hi: i32,
    out: &mut [u8],
) -> bool {
    if x.len() != out.len() || lo > hi {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::quantize_f32_even(variant, x, scale, zp, lo, hi, out) {
        return true;
    }
    let _ = variant;
    quantize_f32_even_body(x, scale, zp, lo, hi, out);
    true
}

/// One value of [`quantize_f32_even`], the definition (NaN gives the zero point).
#[inline(always)]
pub fn quantize_even1(v: f32, scale: f32, zp: i32, lo: i32, hi: i32) -> i32 {
    // Clamped to the integer bounds less the zero point before rounding (the same result as
    // after, for integer bounds), so the conversion never saturates; NaN counts as 0, as the
    // saturating casts of the unfused ops make it.
    let q = v / scale;
    let q = if q.is_nan() { 0.0 } else { q };
    let lo = lo.saturating_sub(zp) as f32;
    let hi = hi.saturating_sub(zp) as f32;
    (q.max(lo).min(hi).round_ties_even() as i32).wrapping_add(zp)
}

/// [`quantize_even1`] for bounds within 2^22 of the zero point, without the saturating
/// conversion (see [`rne_small`]).
#[inline(always)]
fn quantize_even_lane(v: f32, scale: f32, zp: i32, lo: f32, hi: f32) -> i32 {
    let q = v / scale;
    let q = if q.is_nan() { 0.0 } else { q };
    rne_small(clamp_f(q, lo, hi)).wrapping_add(zp)
}

#[inline(always)]
pub(crate) fn quantize_f32_even_body(
    x: &[f32],
    scale: f32,
    zp: i32,
    lo: i32,
    hi: i32,
    out: &mut [u8],
) {
    let small = |b: i32| (b as i64 - zp as i64).abs() <= RNE_SMALL_MAX;
    if !small(lo) || !small(hi) {
        for (d, &v) in out.iter_mut().zip(x) {
            *d = quantize_even1(v, scale, zp, lo, hi) as u8;
        }
        return;
    }
    let (flo, fhi) = (lo.wrapping_sub(zp) as f32, hi.wrapping_sub(zp) as f32);
    for (d, &v) in out.iter_mut().zip(x) {
        *d = quantize_even_lane(v, scale, zp, flo, fhi) as u8;
    }
}

/// ONNX `DequantizeLinear(a)`, `DequantizeLinear(b)` -> `Add` -> `QuantizeLinear` of two
/// same-shape 8-bit tensors with per-tensor parameters, in one pass and with the composed ops'
/// exact f32 arithmetic: `clamp(rne(((a - za) * sa + (b - zb) * sb) / sy) + zy, lo, hi)`.
#[derive(Clone, Copy, Debug)]
pub struct QdqAdd {
    /// Whether the inputs are i8 (else u8); both have one type.
    pub signed: bool,
    pub sa: f32,
    pub za: i32,
    pub sb: f32,
    pub zb: i32,
    pub sy: f32,
    pub zy: i32,
    /// The output type's range.
    pub lo: i32,
    pub hi: i32,
}

/// [`QdqAdd`] over `a`, `b` into `out` (all the same length). `false` on a size mismatch.
pub fn qdq_add(p: &QdqAdd, a: &[u8], b: &[u8], out: &mut [u8]) -> bool {
    qdq_add_with(dispatch::selected(), p, a, b, out)
}

/// [`qdq_add`] compiled for the float-family `variant`.
pub fn qdq_add_with(variant: Variant, p: &QdqAdd, a: &[u8], b: &[u8], out: &mut [u8]) -> bool {
    if a.len() != b.len() || out.len() != a.len() || p.lo > p.hi {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::qdq_add(variant, p, a, b, out) {
        return true;
    }
    let _ = variant;
    qdq_add_body(p, a, b, out);
    true
}

/// One value of [`QdqAdd`], the definition.
#[inline(always)]
pub fn qdq_add1(p: &QdqAdd, a: i32, b: i32) -> i32 {
    let v = (a - p.za) as f32 * p.sa + (b - p.zb) as f32 * p.sb;
    quantize_even1(v, p.sy, p.zy, p.lo, p.hi)
}

#[inline(always)]
pub(crate) fn qdq_add_body(p: &QdqAdd, a: &[u8], b: &[u8], out: &mut [u8]) {
    if p.signed {
        qdq_add_t::<true>(p, a, b, out)
    } else {
        qdq_add_t::<false>(p, a, b, out)
    }
}

#[inline(always)]
fn qdq_add_t<const S: bool>(p: &QdqAdd, a: &[u8], b: &[u8], out: &mut [u8]) {
    // 8-bit output bounds: always within 2^22 of an 8-bit zero point.
    let small = |b: i32| (b as i64 - p.zy as i64).abs() <= RNE_SMALL_MAX;
    if !small(p.lo) || !small(p.hi) {
        for ((d, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *d = qdq_add1(p, widen::<S>(x), widen::<S>(y)) as u8;
        }
        return;
    }
    let (lo, hi) = (
        p.lo.wrapping_sub(p.zy) as f32,
        p.hi.wrapping_sub(p.zy) as f32,
    );
    for ((d, &x), &y) in out.iter_mut().zip(a).zip(b) {
        let v = (widen::<S>(x) - p.za) as f32 * p.sa + (widen::<S>(y) - p.zb) as f32 * p.sb;
        *d = quantize_even_lane(v, p.sy, p.zy, lo, hi) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qgemm::{qgemm_reference, QMat};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        fn i(&mut self, lo: i32, hi: i32) -> i32 {
            lo + (self.next() % (hi - lo + 1) as u32) as i32
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        /// A multiplier as QuantizeMultiplier gives: Q31 significand, exponent -20..=3.
        fn mult(&mut self) -> (i32, i32) {
            (self.i(1 << 30, i32::MAX), self.i(-20, 3))
        }
    }

    fn float_variants() -> Vec<Variant> {
        dispatch::detected()
    }

    #[test]
    fn lane_matches_the_reference_definition() {
        let mut r = Rng(3);
        let mut xs: Vec<i32> = vec![0, 1, -1, i32::MIN, i32::MAX, 1 << 20, -(1 << 20)];
        for _ in 0..2000 {
            xs.push(r.next() as i32);
            xs.push(r.i(-100_000, 100_000));
        }
        let mut ms = vec![
            (1 << 30, 0),
            (i32::MAX, -31),
            (1 << 30, 30),
            (0, 0),
            (1 << 30, -1),
        ];
        for _ in 0..40 {
            ms.push(r.mult());
        }
        for &(m, s) in &ms {
            let rq = Requant::new(&[(m, s)], 0, i32::MIN, i32::MAX).unwrap();
            for &x in &xs {
                assert_eq!(
                    rq.apply(x, 0),
                    requant_ref(x, m, s, 0, i32::MIN, i32::MAX),
                    "x={x} m={m} s={s}"
                );
            }
        }
        // Negative halves: -2.5 -> -3 after the shift, -7 * 0.5 -> -3 in the high multiply.
        assert_eq!(requant_ref(-5, 1 << 30, 0, 0, -99, 99), -2);
        assert_eq!(requant_ref(10, 1 << 30, -1, 0, -99, 99), 3);
        assert_eq!(requant_ref(-10, 1 << 30, -1, 0, -99, 99), -3);
    }

    #[test]
    fn requant_row_variants_match_the_reference() {
        let mut r = Rng(5);
        let n = 77;
        let mults: Vec<(i32, i32)> = (0..n).map(|_| r.mult()).collect();
        let rq = Requant::new(&mults, -3, -128, 100).unwrap();
        let acc: Vec<i32> = (0..n).map(|_| r.i(-3_000_000, 3_000_000)).collect();
        let add: Vec<i32> = (0..n).map(|_| r.i(-50_000, 50_000)).collect();
        let want: Vec<u8> = (0..n)
            .map(|j| {
                let (m, s) = mults[j];
                requant_ref(acc[j].wrapping_add(add[j]), m, s, -3, -128, 100) as u8
            })
            .collect();
        for v in float_variants() {
            for c0 in [0, 5] {
                let mut out = vec![0u8; n - c0];
                requant_row_with(v, &rq, c0, &acc[c0..], &add[c0..], &mut out);
                assert_eq!(out, want[c0..], "{v:?}");
            }
        }
    }

    #[test]
    fn quantize_even_and_qdq_add_variants_match_the_definitions() {
        let mut r = Rng(17);
        let n = 1000;
        let mut x: Vec<f32> = (0..n).map(|_| r.i(-40_000, 40_000) as f32 * 0.01).collect();
        // Exact ties at scale 0.5: 1.25 / 0.5 = 2.5 -> 2, 1.75 / 0.5 = 3.5 -> 4; NaN; huge.
        x[..5].copy_from_slice(&[1.25, 1.75, -1.25, f32::NAN, 1e30]);
        for (zp, lo, hi) in [(128, 0, 255), (-5, -128, 127), (0, 0, 255)] {
            let want: Vec<u8> = x
                .iter()
                .map(|&v| quantize_even1(v, 0.5, zp, lo, hi) as u8)
                .collect();
            assert_eq!(
                want[..5],
                [2 + zp, 4 + zp, (-2 + zp).max(lo), zp, hi].map(|v| v as u8)
            );
            for v in float_variants() {
                let mut out = vec![0u8; n];
                assert!(quantize_f32_even_with(v, &x, 0.5, zp, lo, hi, &mut out));
                assert_eq!(out, want, "{v:?}");
            }
        }
        let a = r.bytes(n);
        let b = r.bytes(n);
        for signed in [false, true] {
            let (za, zb, zy, lo, hi) = if signed {
                (-3, 7, 1, -128, 127)
            } else {
                (120, 131, 128, 0, 255)
            };
            let p = QdqAdd {
                signed,
                sa: 0.031,
                za,
                sb: 0.017,
                zb,
                sy: 0.043,
                zy,
                lo,
                hi,
            };
            let w = |x: u8| if signed { x as i8 as i32 } else { x as i32 };
            let want: Vec<u8> = (0..n)
                .map(|i| qdq_add1(&p, w(a[i]), w(b[i])) as u8)
                .collect();
            // The definition is the composed DequantizeLinear / Add / QuantizeLinear.
            for i in 0..n {
                let v = (w(a[i]) - za) as f32 * 0.031 + (w(b[i]) - zb) as f32 * 0.017;
                let q = ((v / 0.043).round_ties_even() as i32 + zy).clamp(lo, hi);
                assert_eq!(want[i], q as u8);
            }
            for v in float_variants() {
                let mut out = vec![0u8; n];
                assert!(qdq_add_with(v, &p, &a, &b, &mut out));
                assert_eq!(out, want, "{v:?} signed={signed}");
            }
        }
    }

    #[test]
    fn float_requant_variants_match_the_reference() {
        let mut r = Rng(8);
        let n = 83;
        let scales: Vec<f32> = (0..n).map(|_| r.i(1, 100_000) as f32 * 1e-6).collect();
        let mut acc: Vec<i32> = (0..n).map(|_| r.i(-3_000_000, 3_000_000)).collect();
        // Exact halves (tie to even) and huge values (clamped).
        acc[0] = 5;
        acc[1] = 7;
        acc[2] = i32::MAX;
        acc[3] = i32::MIN;
        let mut scales = scales;
        scales[0] = 0.5;
        scales[1] = 0.5;
        let add: Vec<i32> = (0..n).map(|_| r.i(-50_000, 50_000)).collect();
        let mut add = add;
        add[..4].fill(0);
        for (zp, lo, hi) in [(-3, -128, 127), (131, 0, 255), (0, 10, 200)] {
            let rq = Requant::new_float(&scales, zp, lo, hi).unwrap();
            let want: Vec<u8> = (0..n)
                .map(|j| {
                    requant_float_ref(acc[j].wrapping_add(add[j]), scales[j], zp, lo, hi) as u8
                })
                .collect();
            assert_eq!(
                [want[0], want[1]],
                [(2 + zp).clamp(lo, hi) as u8, (4 + zp).clamp(lo, hi) as u8]
            );
            for j in 0..n {
                assert_eq!(rq.apply(acc[j].wrapping_add(add[j]), j) as u8, want[j]);
            }
            for v in float_variants() {
                for c0 in [0, 5] {
                    let mut out = vec![0u8; n - c0];
                    requant_row_with(v, &rq, c0, &acc[c0..], &add[c0..], &mut out);
                    assert_eq!(out, want[c0..], "{v:?}");
                }
            }
        }
    }

    /// Every int8 tile x every epilogue build against qgemm_reference + requant_ref: odd
    /// sizes, u8/i8 activations, u8/i8 weights with zero points, row strides.
    #[test]
    fn qgemm_requant_matches_the_reference() {
        let mut r = Rng(9);
        for &(m, n, k) in &[
            (1, 1, 1),
            (9, 33, 27),
            (17, 16, 96),
            (8, 32, 4),
            (30, 70, 13),
            (3, 5, 200),
            // Narrow outputs (n divides 16): requantized as one stream when ldc == n.
            (21, 8, 9),
            (13, 4, 5),
            (40, 2, 18),
            // Depths a multiple of 4 without weight zero points: x86 VNNI reads A in place.
            (21, 8, 12),
            (19, 48, 32),
        ] {
            // Rows 3 random bytes apart past k: the depth rounded up to 4 is readable in
            // place, so k = 27, 13, 9, 5 also take x86's in-place path, their slack bytes
            // meeting B's zero padding.
            let rs = k + 3;
            let ab = r.bytes(m * rs);
            let wb = r.bytes(n * k);
            let mults: Vec<(i32, i32)> = (0..n)
                .map(|_| (r.i(1 << 30, i32::MAX), r.i(-14, -6)))
                .collect();
            let bias: Vec<i32> = (0..n).map(|_| r.i(-20_000, 20_000)).collect();
            for (a_signed, w_signed) in [(true, true), (false, true), (false, false), (true, false)]
            {
                let za = if a_signed { -5 } else { 131 };
                let zb: Vec<i32> = if w_signed {
                    vec![0]
                } else {
                    (0..n).map(|_| r.i(100, 150)).collect()
                };
                let ai: Vec<i8> = ab.iter().map(|&x| x as i8).collect();
                let wi: Vec<i8> = wb.iter().map(|&x| x as i8).collect();
                let am = if a_signed {
                    QMat {
                        data: crate::qgemm::QData::I8(&ai),
                        rows: m,
                        cols: k,
                        rs,
                        cs: 1,
                    }
                } else {
                    QMat {
                        data: crate::qgemm::QData::U8(&ab),
                        rows: m,
                        cols: k,
                        rs,
                        cs: 1,
                    }
                };
                let wm = if w_signed {
                    QMat::i8(&wi, n, k).t()
                } else {
                    QMat::u8(&wb, n, k).t()
                };
                let mut c = vec![0i32; m * n];
                assert!(qgemm_reference(am, &[za], wm, &zb, &mut c, n));
                let (zp, lo, hi) = if a_signed {
                    (-7, -128, 127)
                } else {
                    (9, 9, 200)
                };
                let want: Vec<u8> = (0..m * n)
                    .map(|i| {
                        let j = i % n;
                        let (mm, s) = mults[j];
                        requant_ref(c[i].wrapping_add(bias[j]), mm, s, zp, lo, hi) as u8
                    })
                    .collect();
                // The float mode (onnxruntime's QLinearConv rounding) on the same products.
                let scales: Vec<f32> = (0..n).map(|_| r.i(1, 4000) as f32 * 1.7e-5).collect();
                let wantf: Vec<u8> = (0..m * n)
                    .map(|i| {
                        let j = i % n;
                        requant_float_ref(c[i].wrapping_add(bias[j]), scales[j], zp, lo, hi) as u8
                    })
                    .collect();
                let rq = Requant::new(&mults, zp, lo, hi).unwrap();
                let rqf = Requant::new_float(&scales, zp, lo, hi).unwrap();
                let rows = Rows {
                    data: &ab,
                    signed: a_signed,
                    rows: m,
                    k,
                    rs,
                };
                for iv in dispatch::detected_int8() {
                    let pb = PackedB::with_variant(iv, wm, &zb).unwrap();
                    for fv in float_variants() {
                        let mut out = vec![0u8; m * n];
                        assert!(qgemm_requant_with(
                            fv, rows, za, &pb, &bias, &rqf, &mut out, n
                        ));
                        assert_eq!(out, wantf, "float mode {iv:?} {fv:?} m={m} n={n} k={k}");
                        // Rows apart in the output: the bytes between them stay untouched.
                        let ldc = n + 2;
                        let mut out = vec![0xAAu8; m * ldc];
                        assert!(qgemm_requant_with(
                            fv, rows, za, &pb, &bias, &rqf, &mut out, ldc
                        ));
                        for i in 0..m {
                            assert_eq!(out[i * ldc..i * ldc + n], wantf[i * n..(i + 1) * n]);
                            assert_eq!(out[i * ldc + n..i * ldc + ldc], [0xAA, 0xAA]);
                        }
                        let mut out = vec![0xAAu8; m * ldc];
                        assert!(qgemm_requant_with(
                            fv, rows, za, &pb, &bias, &rq, &mut out, ldc
                        ));
                        for i in 0..m {
                            assert_eq!(
                                out[i * ldc..i * ldc + n],
                                want[i * n..(i + 1) * n],
                                "{iv:?} {fv:?} m={m} n={n} k={k} signed={a_signed},{w_signed}"
                            );
                            assert_eq!(out[i * ldc + n..i * ldc + ldc], [0xAA, 0xAA]);
                        }
                        let mut out = vec![0u8; m * n];
                        assert!(qgemm_requant_with(
                            fv, rows, za, &pb, &bias, &rq, &mut out, n
                        ));
                        assert_eq!(out, want, "ldc = n: {iv:?} {fv:?} m={m} n={n} k={k}");
                    }
                }
            }
        }
    }

    #[test]
    fn depthwise_matches_the_reference() {
        let mut r = Rng(13);
        // (ih, iw, c, k, stride, dilation, pad)
        let cases = [
            (7, 9, 16, 3, 1, 1, 1),
            (8, 8, 70, 3, 2, 1, 0),
            (9, 6, 133, 3, 2, 1, 1),
            (5, 5, 3, 5, 1, 1, 2),
            (10, 7, 64, 3, 1, 2, 2),
            (4, 4, 1, 1, 1, 1, 0),
            // 3x3 over multiples of 16 channels: the interior rows' fast path.
            (12, 11, 32, 3, 2, 1, 1),
            (6, 13, 48, 3, 1, 1, 0),
            (9, 10, 16, 3, 2, 1, 0),
        ];
        for &(ih, iw, c, kk, s, d, pad) in &cases {
            let eff = (kk - 1) * d + 1;
            let oh = (ih + 2 * pad - eff) / s + 1;
            let ow = (iw + 2 * pad - eff) / s + 1;
            let x = r.bytes(ih * iw * c);
            let w: Vec<i32> = (0..kk * kk * c).map(|_| r.i(-127, 127)).collect();
            let bias: Vec<i32> = (0..c).map(|_| r.i(-30_000, 30_000)).collect();
            let mults: Vec<(i32, i32)> = (0..c)
                .map(|_| (r.i(1 << 30, i32::MAX), r.i(-12, -5)))
                .collect();
            for signed in [true, false] {
                let (xz, zp, lo, hi) = if signed {
                    (-3, 4, -128, 127)
                } else {
                    (128, 0, 0, 255)
                };
                let rq = Requant::new(&mults, zp, lo, hi).unwrap();
                let p = Depthwise {
                    x: &x,
                    signed,
                    xz,
                    ih,
                    iw,
                    c,
                    oh,
                    ow,
                    kh: kk,
                    kw: kk,
                    sh: s,
                    sw: s,
                    dh: d,
                    dw: d,
                    pt: pad,
                    pl: pad,
                    w: &w,
                    bias: &bias,
                    rq: &rq,
                    pack: None,
                };
                let want = depthwise_reference(&p, &mults);
                for v in float_variants() {
                    let mut out = vec![0u8; oh * ow * c];
                    assert!(depthwise_with(v, &p, 0..oh, &mut out));
                    assert_eq!(
                        out, want,
                        "{v:?} {ih}x{iw}x{c} k{kk} s{s} d{d} signed={signed}"
                    );
                    // A band of rows lands where the whole run put it.
                    if oh > 2 {
                        let mut band = vec![0u8; (oh - 2) * ow * c];
                        assert!(depthwise_with(v, &p, 1..oh - 1, &mut band));
                        assert_eq!(band, want[ow * c..(oh - 1) * ow * c]);
                    }
                }
            }
        }
    }

    #[test]
    fn add_matches_the_reference() {
        let mut r = Rng(17);
        let n = 1000;
        let a = r.bytes(n);
        let b = r.bytes(n);
        for (signed, negate) in [(true, false), (false, false), (true, true)] {
            let p = AddParams {
                z1: if signed { -3 } else { 120 },
                z2: if signed { 7 } else { 133 },
                m1: (r.i(1 << 30, i32::MAX), -1),
                m2: (r.i(1 << 30, i32::MAX), -2),
                left_shift: 20,
                negate,
                out: Requant::new(
                    &[(r.i(1 << 30, i32::MAX), -18)],
                    5,
                    if signed { -128 } else { 0 },
                    if signed { 127 } else { 255 },
                )
                .unwrap(),
            };
            let want = add_reference(&p, signed, &a, &b);
            for v in float_variants() {
                let mut out = vec![0u8; n];
                assert!(add_with(v, &p, signed, &a, &b, &mut out));
                assert_eq!(out, want, "{v:?} signed={signed} negate={negate}");
            }
        }
    }

    #[test]
    fn add_shift_matches_its_definition() {
        // The parameters by hand: ratios 0.75 and 0.3 (exponent -1): shift 21, multipliers
        // 0.75 * 2^21 and round_even(0.3 * 2^21) = 629146.
        let p = AddShift::new(3, -5, 0.75, 0.3, 10, -128, 127).unwrap();
        assert_eq!((p.shift, p.ma, p.mb), (21, 1_572_864, 629_146));
        assert_eq!(p.bias, (1 << 20) - 3 * 1_572_864 + 5 * 629_146);
        // 0.75 * (13 - 3) + 0.3 * (-5 + 5) = 7.5: the half rounds up, then + 10.
        assert_eq!(p.apply1(13, -5), 18);
        // Out of range parameters are refused, not wrapped.
        assert!(AddShift::new(300, 0, 0.5, 0.5, 0, 0, 255).is_none());
        assert!(AddShift::new(0, 0, 256.0, 0.5, 0, 0, 255).is_none());
        assert!(AddShift::new(0, 0, 0.5, f32::NAN, 0, 0, 255).is_none());
        let mut r = Rng(29);
        let n = 1003;
        let a = r.bytes(n);
        let b = r.bytes(n);
        // Extreme cases included: the largest ratio, the largest zero-point distance.
        for (signed, za, zb, ra, rb, zp, lo, hi) in [
            (true, -3, 7, 0.61, 0.47, 5, -128, 127),
            (false, 120, 133, 1.9, 0.004, 128, 0, 255),
            (true, 255, -255, 255.9, 255.9, 0, -128, 127),
            (false, 0, 255, 0.001, 0.0011, 3, 10, 200),
        ] {
            let p = AddShift::new(za, zb, ra, rb, zp, lo, hi).unwrap();
            let w = |v: u8| if signed { v as i8 as i32 } else { v as i32 };
            let want: Vec<u8> = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| p.apply1(w(x), w(y)) as u8)
                .collect();
            for v in float_variants() {
                let mut out = vec![0u8; n];
                assert!(add_shift_with(v, &p, signed, &a, &b, &mut out));
                assert_eq!(out, want, "{v:?} {p:?}");
            }
            // Against the real-number sum: within one step (rounding) unless clamped.
            for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
                let exact = ra as f64 * (w(x) - za) as f64 + rb as f64 * (w(y) - zb) as f64;
                let e = (exact + zp as f64).clamp(lo as f64, hi as f64);
                assert!(
                    (p.apply1(w(x), w(y)) as f64 - e).abs() <= 0.5 + 1e-3,
                    "{i} {p:?}"
                );
            }
        }
    }

    #[test]
    fn quantize_matches_the_definition() {
        let mut r = Rng(23);
        let mut x: Vec<f32> = (0..999)
            .map(|_| (r.i(-3_000_000, 3_000_000) as f32) * 1e-4)
            .collect();
        // Exact halves (round away from zero), huge values, NaN, infinities.
        x.extend([
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            1e30,
            -1e30,
            f32::NAN,
            f32::INFINITY,
        ]);
        x.extend([f32::NEG_INFINITY, 0.49999997, -0.49999997, 8388609.0, -0.0]);
        for (scale, zp, lo, hi) in [
            (1.0, 0, -128, 127),
            (0.0078125, -3, -128, 127),
            (0.37, 128, 0, 255),
            // Bounds far from the zero point: the loop without the clamp-first form.
            (0.5, 0, -(1 << 24), 1 << 24),
        ] {
            let want: Vec<u8> = x
                .iter()
                .map(|&v| quantize1(v, scale, zp, lo, hi) as u8)
                .collect();
            // The definition by hand on a few values.
            if scale == 1.0 {
                assert_eq!(want[999..1005], [1, 255, 2, 254, 3, 253]);
            }
            for v in float_variants() {
                let mut out = vec![0u8; x.len()];
                assert!(quantize_f32_with(v, &x, scale, zp, lo, hi, &mut out));
                assert_eq!(out, want, "{v:?}");
            }
        }
    }
    /// The float-mode 3x3 layers through [`DwPack`] (x86 VNNI where the CPU has it) against
    /// plain sums requantized by [`requant_float_ref`]: channel counts below, at and above a
    /// block of 64, strides 1 and 2, dilation, u8 and i8, extreme weights.
    #[test]
    fn depthwise_pack_matches_the_float_reference() {
        let mut r = Rng(31);
        // (ih, iw, c, stride, dilation, pad)
        let cases = [
            (7, 9, 16, 1, 1, 1),
            (12, 11, 96, 2, 1, 1),
            (6, 13, 144, 1, 1, 0),
            (10, 7, 64, 1, 2, 2),
            (9, 10, 32, 2, 1, 0),
        ];
        let (mut packed_runs, mut bordered_runs) = (0, 0);
        for &(ih, iw, c, s, d, pad) in &cases {
            let eff = 2 * d + 1;
            let oh = (ih + 2 * pad - eff) / s + 1;
            let ow = (iw + 2 * pad - eff) / s + 1;
            let x = r.bytes(ih * iw * c);
            let mut w: Vec<i32> = (0..9 * c).map(|_| r.i(-127, 127)).collect();
            w[0] = -128;
            w[1] = 127;
            let bias: Vec<i32> = (0..c).map(|_| r.i(-30_000, 30_000)).collect();
            let scales: Vec<f32> = (0..c).map(|_| r.i(1, 4000) as f32 * 2.1e-5).collect();
            for signed in [true, false] {
                // Outputs of the other type on the second pass of a case (ONNX allows it).
                let (xz, zp, lo, hi) = match (signed, c % 32 == 0) {
                    (true, false) => (-3, 4, -128, 127),
                    (true, true) => (-3, 131, 0, 255),
                    (false, false) => (131, 7, 0, 255),
                    (false, true) => (131, -9, -128, 127),
                };
                let rq = Requant::new_float(&scales, zp, lo, hi).unwrap();
                let pack = DwPack::new(&w, &bias, xz, signed, &rq, c);
                let p = Depthwise {
                    x: &x,
                    signed,
                    xz,
                    ih,
                    iw,
                    c,
                    oh,
                    ow,
                    kh: 3,
                    kw: 3,
                    sh: s,
                    sw: s,
                    dh: d,
                    dw: d,
                    pt: pad,
                    pl: pad,
                    w: &w,
                    bias: &bias,
                    rq: &rq,
                    pack: pack.as_ref(),
                };
                let mut want = Vec::new();
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ch in 0..c {
                            let mut acc = bias[ch];
                            for t in 0..9 {
                                let iy = (oy * s + (t / 3) * d) as isize - pad as isize;
                                let ix = (ox * s + (t % 3) * d) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= ih as isize || ix >= iw as isize {
                                    continue;
                                }
                                let b = x[(iy as usize * iw + ix as usize) * c + ch];
                                let v = if signed { b as i8 as i32 } else { b as i32 };
                                acc = acc.wrapping_add((v - xz) * w[t * c + ch]);
                            }
                            want.push(requant_float_ref(acc, scales[ch], zp, lo, hi) as u8);
                        }
                    }
                }
                for v in float_variants() {
                    let mut out = vec![0xAAu8; oh * ow * c];
                    assert!(depthwise_with(v, &p, 0..oh, &mut out));
                    assert_eq!(out, want, "{v:?} c={c} s={s} d={d} signed={signed}");
                }
                // The same layer on a bordered copy (every pixel interior) where one is made.
                if let Some((bx, bh, bw)) = p.bordered() {
                    let q = Depthwise {
                        x: &bx,
                        ih: bh,
                        iw: bw,
                        pt: 0,
                        pl: 0,
                        ..p
                    };
                    let mut out = vec![0xAAu8; oh * ow * c];
                    assert!(depthwise_with(dispatch::selected(), &q, 0..oh, &mut out));
                    assert_eq!(out, want, "bordered c={c} s={s} d={d} signed={signed}");
                    bordered_runs += 1;
                    // Row ranges on their own bordered rows (as threads run them): every
                    // split point, the same bytes.
                    for cut in 1..oh {
                        let mut out = vec![0xAAu8; oh * ow * c];
                        let (top, bottom) = out.split_at_mut(cut * ow * c);
                        for (rows, part) in [(0..cut, top), (cut..oh, bottom)] {
                            let (rx, rh, rw) = p.bordered_rows(rows.clone()).unwrap();
                            let q = Depthwise {
                                x: &rx,
                                ih: rh,
                                iw: rw,
                                pt: 0,
                                pl: 0,
                                oh: rows.len(),
                                ..p
                            };
                            assert!(depthwise_with(
                                dispatch::selected(),
                                &q,
                                0..rows.len(),
                                part
                            ));
                        }
                        assert_eq!(out, want, "rows cut at {cut}, c={c} s={s} d={d}");
                    }
                    assert!(
                        p.bordered_rows(0..0).is_none() && p.bordered_rows(0..oh + 1).is_none()
                    );
                }
                packed_runs += usize::from(pack.is_some());
            }
        }
        #[cfg(target_arch = "x86_64")]
        if crate::arch::x86_64::dw3x3_float_supported(dispatch::selected_int8()) {
            assert_eq!(
                packed_runs,
                2 * cases.len(),
                "every case ran the packed kernel"
            );
        }
        let _ = packed_runs;
        // The small padded maps (7x9 with pad 1, 10x7 with pad 2 and dilation 2) get a border.
        assert!(bordered_runs >= 4, "{bordered_runs} bordered runs");
    }
    /// Convolutions read in place ([`ConvRows`]) against plain sums with the float
    /// definition: 1, 3 and 8 channels, strides 1 and 2, padding, output widths that split
    /// 8-row blocks across image rows, and rows computed in two calls (`first`).
    #[test]
    fn conv_rows_match_the_float_reference() {
        let mut r = Rng(37);
        // (ih, iw, ic, oc, k, stride, pad)
        let cases = [
            (9, 11, 1, 8, 3, 1, 1),
            (13, 10, 3, 32, 3, 2, 1),
            (7, 7, 8, 16, 3, 1, 0),
            (10, 9, 16, 40, 3, 2, 1),
            (6, 8, 3, 5, 5, 1, 2),
        ];
        for &(ih, iw, ic, oc, k, s, pad) in &cases {
            let oh = (ih + 2 * pad - k) / s + 1;
            let ow = (iw + 2 * pad - k) / s + 1;
            let x = r.bytes(ih * iw * ic);
            let kd = k * k * ic;
            let w: Vec<u8> = (0..oc * kd).map(|_| r.i(-127, 127) as i8 as u8).collect();
            let bias: Vec<i32> = (0..oc).map(|_| r.i(-20_000, 20_000)).collect();
            let scales: Vec<f32> = (0..oc).map(|_| r.i(1, 4000) as f32 * 1.3e-5).collect();
            for signed in [true, false] {
                let (xz, zp, lo, hi) = if signed {
                    (-5, 3, -128, 127)
                } else {
                    (120, 9, 0, 255)
                };
                let rq = Requant::new_float(&scales, zp, lo, hi).unwrap();
                let val = |b: u8| if signed { b as i8 as i32 } else { b as i32 };
                let mut want = vec![0u8; oh * ow * oc];
                for oy in 0..oh {
                    for ox in 0..ow {
                        for o in 0..oc {
                            let mut acc = bias[o];
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * s + ky) as isize - pad as isize;
                                    let ix = (ox * s + kx) as isize - pad as isize;
                                    if iy < 0 || ix < 0 || iy >= ih as isize || ix >= iw as isize {
                                        continue;
                                    }
                                    for c in 0..ic {
                                        let xv = val(x[(iy as usize * iw + ix as usize) * ic + c]);
                                        let wv = w[o * kd + (ky * k + kx) * ic + c] as i8 as i32;
                                        acc = acc.wrapping_add((xv - xz) * wv);
                                    }
                                }
                            }
                            want[(oy * ow + ox) * oc + o] =
                                requant_float_ref(acc, scales[o], zp, lo, hi) as u8;
                        }
                    }
                }
                // The padded image (zero-point bytes around it, 4 bytes of slack).
                let (ph, pw) = (ih + 2 * pad, iw + 2 * pad);
                let mut px = vec![xz as u8; ph * pw * ic + 4];
                for y in 0..ih {
                    let d = ((y + pad) * pw + pad) * ic;
                    px[d..d + iw * ic].copy_from_slice(&x[y * iw * ic..(y + 1) * iw * ic]);
                }
                let wr = conv_rows_weights(&w, oc, k, k * ic);
                let wi: Vec<i8> = wr.iter().map(|&b| b as i8).collect();
                let pb = PackedB::new(QMat::i8(&wi, oc, wr.len() / oc).t(), &[0]).unwrap();
                let rows = ConvRows {
                    x: &px,
                    signed,
                    ow,
                    line_step: s * pw * ic,
                    col_step: s * ic,
                    kh: k,
                    seg_step: pw * ic,
                    seg_bytes: (k * ic).next_multiple_of(4),
                };
                let m = oh * ow;
                let split = (m / 2).max(1).min(m);
                let mut out = vec![0xAAu8; m * oc];
                let (a, b) = out.split_at_mut(split * oc);
                let ran = qgemm_conv_rows(&rows, 0, split, xz, &pb, &bias, &rq, a, oc)
                    && qgemm_conv_rows(&rows, split, m - split, xz, &pb, &bias, &rq, b, oc);
                assert_eq!(ran, conv_rows_supported(), "runs where supported");
                if ran {
                    assert_eq!(out, want, "ic={ic} oc={oc} k={k} s={s} pad={pad} {signed}");
                }
            }
        }
    }
    /// Column ranges of the fused GEMM equal the same columns of the whole product; ranges
    /// it cannot take (weight zero points, a start off a panel) are refused untouched.
    #[test]
    fn qgemm_column_ranges_match_the_whole_product() {
        let mut r = Rng(41);
        let (m, n, k) = (11, 100, 64);
        let ab = r.bytes(m * k);
        let wi: Vec<i8> = r.bytes(n * k).iter().map(|&b| b as i8).collect();
        let bias: Vec<i32> = (0..n).map(|_| r.i(-20_000, 20_000)).collect();
        let scales: Vec<f32> = (0..n).map(|_| r.i(1, 4000) as f32 * 1.7e-5).collect();
        let rq = Requant::new_float(&scales, -7, -128, 127).unwrap();
        let rows = Rows {
            data: &ab,
            signed: true,
            rows: m,
            k,
            rs: k,
        };
        for iv in dispatch::detected_int8() {
            let pb = PackedB::with_variant(iv, QMat::i8(&wi, n, k).t(), &[0]).unwrap();
            let mut whole = vec![0u8; m * n];
            assert!(qgemm_requant(rows, -5, &pb, &bias, &rq, &mut whole, n));
            for cols in [0..32, 32..100, 64..100, 0..100, 96..100] {
                let w = cols.len();
                let mut part = vec![0xAAu8; m * (w + 3)];
                if !qgemm_requant_cols(rows, -5, &pb, &bias, &rq, cols.clone(), &mut part, w + 3) {
                    assert!(part.iter().all(|&b| b == 0xAA), "refused untouched");
                    continue;
                }
                for i in 0..m {
                    assert_eq!(part[i * (w + 3)..][..w], whole[i * n + cols.start..][..w]);
                    assert_eq!(part[i * (w + 3) + w..][..3], [0xAA; 3]);
                }
            }
            let mut part = vec![0xAAu8; m * 50];
            assert!(!qgemm_requant_cols(
                rows,
                -5,
                &pb,
                &bias,
                &rq,
                10..60,
                &mut part,
                50
            ));
        }
        #[cfg(target_arch = "x86_64")]
        if crate::arch::x86_64::qgemm_float_supported(dispatch::selected_int8()) {
            let pb = PackedB::new(QMat::i8(&wi, n, k).t(), &[0]).unwrap();
            let mut part = vec![0u8; m * 36];
            assert!(qgemm_requant_cols(
                rows,
                -5,
                &pb,
                &bias,
                &rq,
                64..100,
                &mut part,
                36
            ));
        }
    }
}
