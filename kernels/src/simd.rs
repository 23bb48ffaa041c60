//! x86_64 entry points of the packed-GEMM and convolution kernels: register tiles written with
//! `std::arch` intrinsics (AVX-512F 12x32, 24 zmm accumulators; AVX2+FMA 6x16, 12 ymm) and
//! `#[target_feature]` wrappers that compile the safe, `#[inline(always)]` loops of
//! [`crate::packed`] and [`crate::conv`] with wide vectors.
//!
//! Soundness: every `#[target_feature]` function here is called only after
//! `is_x86_feature_detected!` confirmed the features, and the raw-pointer tiles only after the
//! panel lengths were checked.

#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::ops::Range;

use crate::conv;
use crate::dispatch::Variant;
use crate::gemm::MatRef;
use crate::nhwc;
use crate::packed::{drive, Epilogue, FullTile, PackedA};
use crate::qconv;

fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
}

fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Runs the packed GEMM with the variant `pa` was packed for; `false` (touching nothing) when
/// that is not an x86 SIMD variant this CPU has. Sizes were checked by the caller.
pub(crate) fn gemm_packed(
    pa: &PackedA,
    panels: Range<usize>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue,
) -> bool {
    match pa.variant() {
        Variant::Avx512 if has_avx512() => {
            // SAFETY: AVX-512F was detected just above.
            unsafe { gemm_avx512(pa, panels, b, c, ldc, epi) };
            true
        }
        Variant::Avx2 if has_avx2() => {
            // SAFETY: AVX2 and FMA were detected just above.
            unsafe { gemm_avx2(pa, panels, b, c, ldc, epi) };
            true
        }
        _ => false,
    }
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn gemm_avx512(
    pa: &PackedA,
    panels: Range<usize>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue,
) {
    if use_nr16(b.cols) {
        // SAFETY: this function is compiled for AVX-512F and only called when the CPU has it.
        unsafe { gemm_avx512_nr16(pa, panels, b, c, ldc, epi) };
        return;
    }
    drive::<12, 32, true, _, _>(
        pa,
        panels,
        b,
        c,
        ldc,
        epi,
        |ap, bp, ldb, acc| {
            let kc = ap.len() / 12;
            assert!(kc == 0 || bp.len() >= (kc - 1) * ldb + 32);
            // SAFETY: compiled for AVX-512F and reached only when the CPU has it; the panels
            // hold kc*12 floats and kc rows of 32 floats ldb apart (checked above).
            let r = unsafe { product_12x32(kc, ap.as_ptr(), bp.as_ptr(), ldb) };
            spill(&r, acc);
        },
        |ap, bp, ldb, mut ft| {
            let Some((kc, out)) = tile_out(ap, bp, ldb, &mut ft, 32) else {
                return false;
            };
            // SAFETY: compiled for AVX-512F and reached only when the CPU has it; `tile_out`
            // checked the panels, C, the residual and the bias against the tile's extent.
            unsafe { store_tile(&product_12x32(kc, ap.as_ptr(), bp.as_ptr(), ldb), &out) };
            true
        },
    );
}

/// Whether the 12x16 AVX-512 tile should run instead of the 12x32 one: when padding the `n`
/// columns to 16 instead of 32 saves at least an eighth of the work (a Winograd F(4x4, 3x3)
/// product on a 14x14 map has 16 columns: half of a 32-wide tile would be zeros; F(2x2, 3x3)
/// on a 7x7 map also has 16). For wide B the 12x32 tile stays (fewer loads per FMA).
pub(crate) fn use_nr16(n: usize) -> bool {
    n.div_ceil(16) * 16 * 8 <= n.div_ceil(32) * 32 * 7
}

/// The packed GEMM with a 12x16 register tile (same A panels as the 12x32 one).
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn gemm_avx512_nr16(
    pa: &PackedA,
    panels: Range<usize>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue,
) {
    drive::<12, 16, true, _, _>(
        pa,
        panels,
        b,
        c,
        ldc,
        epi,
        |ap, bp, ldb, acc| {
            let kc = ap.len() / 12;
            assert!(kc == 0 || bp.len() >= (kc - 1) * ldb + 16);
            // SAFETY: compiled for AVX-512F and reached only when the CPU has it; the panels
            // hold kc*12 floats and kc rows of 16 floats ldb apart (checked above).
            let r = unsafe { product_12x16(kc, ap.as_ptr(), bp.as_ptr(), ldb) };
            spill(&r, acc);
        },
        |ap, bp, ldb, mut ft| {
            let Some((kc, out)) = tile_out(ap, bp, ldb, &mut ft, 16) else {
                return false;
            };
            // SAFETY: compiled for AVX-512F and reached only when the CPU has it; `tile_out`
            // checked the panels, C, the residual and the bias against the tile's extent.
            unsafe { store_tile(&product_12x16(kc, ap.as_ptr(), bp.as_ptr(), ldb), &out) };
            true
        },
    );
}

/// Where [`store_tile`] puts a 12 x (16 V) register tile, from a checked [`FullTile`].
struct TileOut {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
    /// Null when there is none, or when this is not the last KC block.
    bias: *const f32,
    res: *const f32,
    /// The clamp of the last block's activation (infinite when none).
    lo: f32,
    hi: f32,
}

/// The depth of a 12 x `nr` tile's panels and where it stores, after checking that the panels,
/// C, the residual and the bias cover the tile's `rows x cols` corner; `None` when the last
/// block's activation is not a clamp (the generic epilogue runs instead).
fn tile_out(
    ap: &[f32],
    bp: &[f32],
    ldb: usize,
    ft: &mut FullTile<'_>,
    nr: usize,
) -> Option<(usize, TileOut)> {
    let (lo, hi) = if ft.finish {
        ft.act.clamp_bounds()?
    } else {
        (f32::NEG_INFINITY, f32::INFINITY)
    };
    let kc = ap.len() / 12;
    assert!(kc == 0 || bp.len() >= (kc - 1) * ldb + nr);
    assert!((1..=12).contains(&ft.rows) && (1..=nr).contains(&ft.cols));
    let need = (ft.rows - 1) * ft.ldc + ft.cols;
    assert!(ft.c.len() >= need);
    let (bias, res) = if ft.finish {
        assert!(ft.residual.is_none_or(|r| r.len() >= need));
        assert!(ft.bias.is_none_or(|bv| bv.len() >= ft.rows));
        (
            ft.bias.map_or(std::ptr::null(), |bv| bv.as_ptr()),
            ft.residual.map_or(std::ptr::null(), |r| r.as_ptr()),
        )
    } else {
        (std::ptr::null(), std::ptr::null())
    };
    let out = TileOut {
        c: ft.c.as_mut_ptr(),
        ldc: ft.ldc,
        rows: ft.rows,
        cols: ft.cols,
        accumulate: ft.accumulate,
        bias,
        res,
        lo,
        hi,
    };
    Some((kc, out))
}

/// Stores the first `o.rows` rows and `o.cols` columns of a register tile into C: added to
/// C's partial sums when `o.accumulate`, then bias, residual and clamp; partial vectors with
/// masked loads and stores, so nothing past the corner is read or written.
///
/// # Safety
/// The CPU must support AVX-512F; `o.c` (and `o.res` unless null) valid for
/// `(rows - 1) * ldc + cols` elements, `o.bias` for `rows` unless null; `cols <= 16 V`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile<const V: usize>(r: &[[__m512; V]; 12], o: &TileOut) {
    let (vlo, vhi) = (_mm512_set1_ps(o.lo), _mm512_set1_ps(o.hi));
    let clamp = o.lo != f32::NEG_INFINITY || o.hi != f32::INFINITY;
    for (i, ri) in r.iter().enumerate() {
        if i >= o.rows {
            break;
        }
        for (v, &x) in ri.iter().enumerate() {
            let left = o.cols.saturating_sub(v * 16);
            if left == 0 {
                break;
            }
            let at = i * o.ldc + v * 16;
            let mut x = x;
            // SAFETY: row i < rows; the vector's `left.min(16)` columns lie within the
            // `(rows - 1) * ldc + cols` elements of C, the residual and rows of bias (the
            // caller's bounds); partial vectors are masked.
            unsafe {
                if left >= 16 {
                    if o.accumulate {
                        x = _mm512_add_ps(x, _mm512_loadu_ps(o.c.add(at)));
                    }
                    if !o.bias.is_null() {
                        x = _mm512_add_ps(x, _mm512_set1_ps(*o.bias.add(i)));
                    }
                    if !o.res.is_null() {
                        x = _mm512_add_ps(x, _mm512_loadu_ps(o.res.add(at)));
                    }
                    if clamp {
                        x = _mm512_min_ps(_mm512_max_ps(x, vlo), vhi);
                    }
                    _mm512_storeu_ps(o.c.add(at), x);
                } else {
                    let m: __mmask16 = (1u16 << left) - 1;
                    if o.accumulate {
                        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, o.c.add(at)));
                    }
                    if !o.bias.is_null() {
                        x = _mm512_add_ps(x, _mm512_set1_ps(*o.bias.add(i)));
                    }
                    if !o.res.is_null() {
                        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, o.res.add(at)));
                    }
                    if clamp {
                        x = _mm512_min_ps(_mm512_max_ps(x, vlo), vhi);
                    }
                    _mm512_mask_storeu_ps(o.c.add(at), m, x);
                }
            }
        }
    }
}

/// Writes a register tile into the generic path's accumulator array.
#[inline(always)]
fn spill<const V: usize, const NR: usize>(r: &[[__m512; V]; 12], acc: &mut [[f32; NR]; 12]) {
    assert_eq!(V * 16, NR);
    for (ri, out) in r.iter().zip(acc.iter_mut()) {
        for (v, x) in ri.iter().enumerate() {
            // SAFETY: `x` is plain data of 16 floats and `out[v*16..][..16]` is in bounds
            // (V * 16 == NR); an unaligned store needs no target feature beyond SSE.
            let lanes: [f32; 16] = unsafe { std::mem::transmute(*x) };
            out[v * 16..(v + 1) * 16].copy_from_slice(&lanes);
        }
    }
}

/// `r[i] = sum_p a[p*12 + i] * b[p*ldb ..][..16]` over `kc` steps, with even and odd steps in
/// separate accumulators (24 chains in flight: 12 alone leave the FMA pipes half idle).
///
/// # Safety
/// The CPU must support AVX-512F; `a` must be valid for `kc * 12` reads, `b` for `kc` rows of
/// 16 floats `ldb` apart.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn product_12x16(kc: usize, a: *const f32, b: *const f32, ldb: usize) -> [[__m512; 1]; 12] {
    let mut e = [_mm512_setzero_ps(); 12];
    let mut o = [_mm512_setzero_ps(); 12];
    let mut p = 0;
    while p + 2 <= kc {
        // SAFETY: p + 1 < kc, so rows p and p + 1 of b and the reads of a below kc*12 are
        // within the caller's bounds.
        unsafe {
            let b0 = _mm512_loadu_ps(b.add(p * ldb));
            let b1 = _mm512_loadu_ps(b.add((p + 1) * ldb));
            let a0 = a.add(p * 12);
            for i in 0..12 {
                e[i] = _mm512_fmadd_ps(_mm512_set1_ps(*a0.add(i)), b0, e[i]);
                o[i] = _mm512_fmadd_ps(_mm512_set1_ps(*a0.add(12 + i)), b1, o[i]);
            }
        }
        p += 2;
    }
    if p < kc {
        // SAFETY: p < kc (the caller's bounds as above).
        unsafe {
            let b0 = _mm512_loadu_ps(b.add(p * ldb));
            let a0 = a.add(p * 12);
            for (i, ei) in e.iter_mut().enumerate() {
                *ei = _mm512_fmadd_ps(_mm512_set1_ps(*a0.add(i)), b0, *ei);
            }
        }
    }
    let mut r = [[_mm512_setzero_ps(); 1]; 12];
    for i in 0..12 {
        r[i][0] = _mm512_add_ps(e[i], o[i]);
    }
    r
}

/// `r[i][v] = sum_p a[p*12 + i] * b[p*ldb + 16 v ..][..16]` over `kc` steps.
///
/// # Safety
/// The CPU must support AVX-512F; `a` must be valid for `kc * 12` reads, `b` for `kc` rows of
/// 32 floats `ldb` apart.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn product_12x32(kc: usize, a: *const f32, b: *const f32, ldb: usize) -> [[__m512; 2]; 12] {
    let mut r = [[_mm512_setzero_ps(); 2]; 12];
    for p in 0..kc {
        // SAFETY: p < kc, so row p of b (32 floats) and p*12 + 11 < kc*12 are within the
        // caller's bounds.
        unsafe {
            let b0 = _mm512_loadu_ps(b.add(p * ldb));
            let b1 = _mm512_loadu_ps(b.add(p * ldb + 16));
            let ar = a.add(p * 12);
            for (i, ri) in r.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ar.add(i));
                ri[0] = _mm512_fmadd_ps(x, b0, ri[0]);
                ri[1] = _mm512_fmadd_ps(x, b1, ri[1]);
            }
        }
    }
    r
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_avx2(
    pa: &PackedA,
    panels: Range<usize>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    epi: &Epilogue,
) {
    drive::<6, 16, false, _, _>(
        pa,
        panels,
        b,
        c,
        ldc,
        epi,
        |ap, bp, _, acc| {
            let kc = ap.len() / 6;
            assert!(bp.len() >= kc * 16);
            // SAFETY: compiled for AVX2+FMA and reached only when the CPU has them; the
            // panels hold kc*6 and kc*16 floats (checked above).
            unsafe { tile_avx2(kc, ap.as_ptr(), bp.as_ptr(), acc) }
        },
        |_, _, _, _| false,
    );
}

/// `acc[i][j] = sum_p a[p*6 + i] * b[p*16 + j]` over `kc` steps.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `a` must be valid for `kc * 6` reads, `b` for `kc * 16`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_avx2(kc: usize, a: *const f32, b: *const f32, acc: &mut [[f32; 16]; 6]) {
    let mut r = [[_mm256_setzero_ps(); 2]; 6];
    for p in 0..kc {
        // SAFETY: p < kc, so p*16 + 15 < kc*16 and p*6 + 5 < kc*6 (the caller's bounds).
        unsafe {
            let b0 = _mm256_loadu_ps(b.add(p * 16));
            let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
            let ar = a.add(p * 6);
            for (i, ri) in r.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*ar.add(i));
                ri[0] = _mm256_fmadd_ps(x, b0, ri[0]);
                ri[1] = _mm256_fmadd_ps(x, b1, ri[1]);
            }
        }
    }
    for (ri, out) in r.iter().zip(acc.iter_mut()) {
        // SAFETY: each output row holds 16 floats, two 8-float stores.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), ri[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), ri[1]);
        }
    }
}

/// Runs `f` compiled with the widest vectors `variant` allows: `f` is one of the safe
/// `#[inline(always)]` kernels of [`crate::conv`], instantiated per feature set below.
macro_rules! wide {
    ($name:ident, $avx512:ident, $avx2:ident, ($($arg:ident : $ty:ty),*), $body:expr) => {
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn $avx512($($arg: $ty),*) { $body }
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) { $body }
        /// Returns `false` (doing nothing) when `variant` is not an x86 SIMD variant this CPU has.
        pub(crate) fn $name(variant: Variant, $($arg: $ty),*) -> bool {
            match variant {
                Variant::Avx512 if has_avx512() => {
                    // SAFETY: AVX-512F was detected just above.
                    unsafe { $avx512($($arg),*) };
                    true
                }
                Variant::Avx2 if has_avx2() => {
                    // SAFETY: AVX2 and FMA were detected just above.
                    unsafe { $avx2($($arg),*) };
                    true
                }
                _ => false,
            }
        }
    };
}

wide!(
    depthwise3x3,
    depthwise3x3_avx512,
    depthwise3x3_avx2,
    (p: &conv::Dw3x3<'_>, y: &mut [f32]),
    conv::depthwise3x3_body::<true>(p, y)
);

wide!(
    conv_s2_wide,
    conv_s2_avx512,
    conv_s2_avx2,
    (p: &conv::ConvS2<'_>, y: &mut [f32]),
    conv::conv_s2_body::<true>(p, y)
);

/// [`conv::conv_s2_with`] on x86: the AVX-512 register tile ([`conv_s2_tiles_avx512`]), else
/// the vectorized loops of the portable body; `false` when `variant` is not one this CPU has.
/// Sizes were checked by the caller.
pub(crate) fn conv_s2(variant: Variant, p: &conv::ConvS2<'_>, y: &mut [f32]) -> bool {
    if variant == Variant::Avx512 && has_avx512() {
        // SAFETY: AVX-512F was detected just above; `conv::conv_s2_with` checked the planes
        // against the output extent and y, the weights and the bias against the channels.
        unsafe { conv_s2_tiles_avx512(p, y) };
        return true;
    }
    conv_s2_wide(variant, p, y)
}

/// The dense stride-2 convolution with 8 output channels x up to 48 pixels of an output row
/// in registers (24 accumulators): per tap, three input vectors (one per 16 pixels, read from
/// the tap's column phase) and eight broadcast weights feed 24 FMAs, where the portable body's
/// 8 x 16 tile loaded nine values for eight FMAs and ran at half the FMA rate (ResNet-18's 7x7
/// stem: 1.9 ms against onnxruntime's 1.0). Row tails take two or one vector; the last
/// vector's pixels past the row are computed from the planes' padding and not stored.
///
/// # Safety
/// The CPU must support AVX-512F; sizes as checked by `conv::conv_s2_with`.
#[target_feature(enable = "avx512f")]
unsafe fn conv_s2_tiles_avx512(p: &conv::ConvS2<'_>, y: &mut [f32]) {
    let pl = p.planes;
    let (c, kh, kw) = (pl.c, pl.kh, pl.kw);
    let k = kh * kw * c;
    let m = p.weight.len() / k;
    let (oh, ow) = (p.out_h, p.out_w);
    let clamp = p.act.clamp_bounds();
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let geo = S2Geo {
        data: pl.data.as_ptr(),
        c,
        rows: pl.rows,
        row: pl.row,
        kh,
        kw,
        ow,
        plane: oh * ow,
        vlo: _mm512_set1_ps(lo),
        vhi: _mm512_set1_ps(hi),
    };
    // The block's weights tap-major, 8 per tap: wb[t * 8 + j] (zero past the last channel).
    let mut wb = vec![0f32; k * 8];
    let mut o0 = 0;
    while o0 < m {
        let ob = (m - o0).min(8);
        wb.fill(0.0);
        for j in 0..ob {
            for (t, &wv) in p.weight[(o0 + j) * k..(o0 + j + 1) * k].iter().enumerate() {
                wb[t * 8 + j] = wv;
            }
        }
        let mut bias = [0f32; 8];
        if let Some(b) = p.bias {
            bias[..ob].copy_from_slice(&b[o0..o0 + ob]);
        }
        // SAFETY: channel o0 + j < m of y holds oh * ow floats (y.len() >= m * oh * ow).
        let yb = unsafe { y.as_mut_ptr().add(o0 * geo.plane) };
        for oy in 0..oh {
            let mut x0 = 0;
            while x0 < ow {
                let nv = (ow - x0).div_ceil(16).min(3);
                // SAFETY: every vector of the tile starts at a multiple of 16 below ow, which
                // the planes' rows cover with (kw - 1) / 2 floats to spare; rows 2 oy + ky <
                // rows; wb holds k * 8 floats; channels o0 .. o0 + ob of y exist.
                unsafe {
                    match nv {
                        3 => s2_tile::<3>(&geo, oy, x0, wb.as_ptr(), &bias, ob, yb),
                        2 => s2_tile::<2>(&geo, oy, x0, wb.as_ptr(), &bias, ob, yb),
                        _ => s2_tile::<1>(&geo, oy, x0, wb.as_ptr(), &bias, ob, yb),
                    }
                }
                x0 += 16 * nv;
            }
        }
        o0 += 8;
    }
    if clamp.is_none() {
        p.act.apply_slice(&mut y[..m * geo.plane]);
    }
}

/// What [`s2_tile`] reads: the planes' layout and the output geometry.
struct S2Geo {
    data: *const f32,
    c: usize,
    rows: usize,
    row: usize,
    kh: usize,
    kw: usize,
    ow: usize,
    plane: usize,
    vlo: __m512,
    vhi: __m512,
}

/// Output row `oy`, pixels `x0 .. x0 + 16 NV` (those below `ow` stored) of 8 channels (the
/// first `ob` stored) into `y` (channel j at `y + j * plane`).
///
/// # Safety
/// The CPU must support AVX-512F; see [`conv_s2_tiles_avx512`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn s2_tile<const NV: usize>(
    g: &S2Geo,
    oy: usize,
    x0: usize,
    wb: *const f32,
    bias: &[f32; 8],
    ob: usize,
    y: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; 8];
    for (a, &b) in acc.iter_mut().zip(bias) {
        *a = [_mm512_set1_ps(b); NV];
    }
    let mut wp = wb;
    for ci in 0..g.c {
        for ky in 0..g.kh {
            // SAFETY: row 2 oy + ky < rows of channel ci; column reads below x0 + 16 NV +
            // (kw - 1) / 2 <= row (the caller's bound); wp stays within k * 8.
            unsafe {
                let base = g.data.add(((ci * g.rows + 2 * oy + ky) * 2) * g.row + x0);
                for kx in 0..g.kw {
                    let src = base.add((kx & 1) * g.row + (kx >> 1));
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for (v, xr) in xv.iter_mut().enumerate() {
                        *xr = _mm512_loadu_ps(src.add(16 * v));
                    }
                    for (j, aj) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*wp.add(j));
                        for (a, &xr) in aj.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(xr, b, *a);
                        }
                    }
                    wp = wp.add(8);
                }
            }
        }
    }
    for (j, aj) in acc.iter().enumerate().take(ob) {
        for (v, &a) in aj.iter().enumerate() {
            let px = x0 + 16 * v;
            let t = _mm512_min_ps(_mm512_max_ps(a, g.vlo), g.vhi);
            // SAFETY: pixel px < ow of row oy of channel j (px is below ow for every vector
            // of the tile); the mask keeps the store within the row.
            unsafe {
                let dst = y.add(j * g.plane + oy * g.ow + px);
                let n = g.ow - px;
                if n >= 16 {
                    _mm512_storeu_ps(dst, t);
                } else {
                    _mm512_mask_storeu_ps(dst, lanes(n), t);
                }
            }
        }
    }
}

wide!(
    wino_input,
    wino_input_avx512,
    wino_input_avx2,
    (p: &conv::WinoInput<'_>, v: &mut [&mut [f32]]),
    conv::wino_input_body(p, v)
);

wide!(
    wino_output,
    wino_output_avx512,
    wino_output_avx2,
    (p: &conv::WinoOutput<'_>, y: &mut [f32]),
    conv::wino_output_body(p, y)
);

/// Runs the fused LSTM step of [`crate::rnn`] compiled for `variant` when it is an x86 SIMD
/// variant this CPU has; `false` (touching nothing) otherwise. Lengths were checked.
pub(crate) fn lstm_cell(
    variant: Variant,
    args: &crate::rnn::CellArgs<'_>,
    c: &mut [f32],
    h: &mut [f32],
) -> bool {
    match variant {
        Variant::Avx512 if has_avx512() => {
            // SAFETY: AVX-512F was detected just above.
            unsafe { lstm_cell_avx512(args, c, h) };
            true
        }
        Variant::Avx2 if has_avx2() => {
            // SAFETY: AVX2 and FMA were detected just above.
            unsafe { lstm_cell_avx2(args, c, h) };
            true
        }
        _ => false,
    }
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn lstm_cell_avx512(args: &crate::rnn::CellArgs<'_>, c: &mut [f32], h: &mut [f32]) {
    crate::rnn::lstm_cell_loop(args, c, h);
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn lstm_cell_avx2(args: &crate::rnn::CellArgs<'_>, c: &mut [f32], h: &mut [f32]) {
    crate::rnn::lstm_cell_loop(args, c, h);
}

/// Like `wide!`, for the int8 loops of [`crate::qconv`] (byte and 32-bit integer lanes).
macro_rules! wide_int {
    ($name:ident, $avx512:ident, $avx2:ident, ($($arg:ident : $ty:ty),*), $body:expr) => {
        /// # Safety
        /// The CPU must support AVX-512F and AVX-512BW.
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn $avx512($($arg: $ty),*) { $body }
        /// # Safety
        /// The CPU must support AVX2.
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) { $body }
        /// Returns `false` (doing nothing) when `variant` is not an x86 SIMD variant this CPU has.
        pub(crate) fn $name(variant: Variant, $($arg: $ty),*) -> bool {
            match variant {
                Variant::Avx512 if has_avx512() && is_x86_feature_detected!("avx512bw") => {
                    // SAFETY: AVX-512F and AVX-512BW were detected just above.
                    unsafe { $avx512($($arg),*) };
                    true
                }
                Variant::Avx2 | Variant::Avx512 if is_x86_feature_detected!("avx2") => {
                    // SAFETY: AVX2 was detected just above.
                    unsafe { $avx2($($arg),*) };
                    true
                }
                _ => false,
            }
        }
    };
}

wide_int!(
    requant_row,
    requant_row_avx512,
    requant_row_avx2,
    (rq: &qconv::Requant, c0: usize, acc: &[i32], add: &[i32], out: &mut [u8]),
    qconv::requant_row_body(rq, c0, acc, add, out)
);

wide_int!(
    qgemm_requant,
    qgemm_requant_avx512,
    qgemm_requant_avx2,
    (p: &qconv::QgemmRq<'_>, out: &mut [u8], ldc: usize),
    qconv::qgemm_requant_body(p, out, ldc)
);

wide_int!(
    depthwise_q8,
    depthwise_q8_avx512,
    depthwise_q8_avx2,
    (p: &qconv::Depthwise<'_>, rows: Range<usize>, out: &mut [u8]),
    qconv::depthwise_body(p, rows, out)
);

wide_int!(
    add_q8,
    add_q8_avx512,
    add_q8_avx2,
    (p: &qconv::AddParams, signed: bool, a: &[u8], b: &[u8], out: &mut [u8]),
    qconv::add_body(p, signed, a, b, out)
);

wide_int!(
    add_shift_q8,
    add_shift_q8_avx512,
    add_shift_q8_avx2,
    (p: &qconv::AddShift, signed: bool, a: &[u8], b: &[u8], out: &mut [u8]),
    qconv::add_shift_body(p, signed, a, b, out)
);

wide_int!(
    quantize_f32,
    quantize_f32_avx512,
    quantize_f32_avx2,
    (x: &[f32], scale: f32, zp: i32, lo: i32, hi: i32, out: &mut [u8]),
    qconv::quantize_f32_body(x, scale, zp, lo, hi, out)
);

wide_int!(
    quantize_f32_even,
    quantize_f32_even_avx512,
    quantize_f32_even_avx2,
    (x: &[f32], scale: f32, zp: i32, lo: i32, hi: i32, out: &mut [u8]),
    qconv::quantize_f32_even_body(x, scale, zp, lo, hi, out)
);

wide_int!(
    qdq_add,
    qdq_add_avx512,
    qdq_add_avx2,
    (p: &qconv::QdqAdd, a: &[u8], b: &[u8], out: &mut [u8]),
    qconv::qdq_add_body(p, a, b, out)
);

/// Depthwise 3x3 straight from the NCHW input, AVX-512: each output row is computed 16
/// outputs at a time in one register (bias, the nine taps, Relu/Clip, one masked store), the
/// padding handled by the masks of the loads (lanes outside the input read nothing and count
/// as zero). Stride 2 loads 32 consecutive inputs per tap and keeps the even ones
/// (`vpermt2ps`). No padded copies and no per-row copies: on MobileNet's 7x7 and 14x14 maps the
/// plane kernel's copies cost more than its multiply-adds.
///
/// Returns `false` (doing nothing) unless `variant` is AVX-512 and this CPU has it. Sizes were
/// checked by the caller ([`crate::conv::depthwise3x3_with`]).
pub(crate) fn depthwise3x3_rows(variant: Variant, p: &conv::Dw3x3<'_>, y: &mut [f32]) -> bool {
    if variant != Variant::Avx512 || !has_avx512() {
        return false;
    }
    // SAFETY: AVX-512F was detected just above.
    unsafe { dw3x3_rows_avx512(p, y) };
    true
}

/// The lanes `j < len` of a load starting at input column `base` that fall inside `0..w`, as
/// a bit mask (`len <= 32`).
#[inline(always)]
fn dw_mask(base: isize, len: usize, w: usize) -> u32 {
    let lo = (-base).clamp(0, len as isize) as u32;
    let hi = (w as isize - base).clamp(0, len as isize) as u32;
    if hi <= lo {
        return 0;
    }
    let upto = |n: u32| if n >= 32 { u32::MAX } else { (1u32 << n) - 1 };
    upto(hi) & !upto(lo)
}

/// Output rows computed together by [`dw3x3_rows_avx512`]: each input row's taps are loaded
/// once for all of them, and their accumulators are independent FMA chains (one chain of nine
/// dependent FMAs per vector leaves the FMA pipes mostly idle).
const DW_ROWS: usize = 8;

/// # Safety
/// The CPU must support AVX-512F; `p` and `y` must have passed the size checks of
/// [`crate::conv::depthwise3x3_with`].
#[target_feature(enable = "avx512f")]
unsafe fn dw3x3_rows_avx512(p: &conv::Dw3x3<'_>, y: &mut [f32]) {
    let (h, w, s) = (p.h, p.w, p.stride);
    let (oh, ow) = (p.out_h, p.out_w);
    let (pt, pl) = (p.pad_top as isize, p.pad_left as isize);
    let ((lo, hi), post) = match p.act.clamp_bounds() {
        Some(b) => (b, false),
        None => ((f32::NEG_INFINITY, f32::INFINITY), true),
    };
    let clamp = lo != f32::NEG_INFINITY || hi != f32::INFINITY;
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for ch in 0..p.c {
        let xc = &p.x[ch * h * w..(ch + 1) * h * w];
        let kw = &p.weight[ch * 9..ch * 9 + 9];
        let mut kv = [_mm512_setzero_ps(); 9];
        for (v, &k) in kv.iter_mut().zip(kw) {
            *v = _mm512_set1_ps(k);
        }
        let bv = _mm512_set1_ps(p.bias.map_or(0.0, |b| b[ch]));
        let yc = &mut y[ch * oh * ow..(ch + 1) * oh * ow];
        for oy0 in (0..oh).step_by(DW_ROWS) {
            let rows = DW_ROWS.min(oh - oy0);
            // Input rows the block reads, clipped to the input (padding rows add nothing).
            let first = ((oy0 * s) as isize - pt).max(0);
            let last = (((oy0 + rows - 1) * s + 3) as isize - pt).min(h as isize);
            let mut x0 = 0;
            while x0 < ow {
                let n = (ow - x0).min(16);
                let base = (x0 * s) as isize - pl;
                let mut acc = [bv; DW_ROWS];
                for iy in first..last {
                    let row = &xc[iy as usize * w..(iy as usize + 1) * w];
                    let rp = row.as_ptr();
                    let t = if s == 1 {
                        let ld = |b: isize| {
                            let m = dw_mask(b, n, w) as u16;
                            // SAFETY: the mask keeps only lanes whose columns b + j lie in
                            // 0..w, i.e. inside `row`; masked-off lanes are not accessed.
                            unsafe { _mm512_maskz_loadu_ps(m, rp.wrapping_offset(b)) }
                        };
                        [ld(base), ld(base + 1), ld(base + 2)]
                    } else {
                        // Columns base + 2j (kx 0), + 1 (kx 1), + 2 (kx 2), j < n.
                        let ld2 = |b: isize| {
                            let m = dw_mask(b, 2 * n, w);
                            // SAFETY: as above, the mask keeps only lanes inside `row` (bits
                            // 0..16 for the first load, 16..32 for the second).
                            unsafe {
                                (
                                    _mm512_maskz_loadu_ps(m as u16, rp.wrapping_offset(b)),
                                    _mm512_maskz_loadu_ps(
                                        (m >> 16) as u16,
                                        rp.wrapping_offset(b + 16),
                                    ),
                                )
                            }
                        };
                        let (a0, a1) = ld2(base);
                        let (c0, c1) = ld2(base + 2);
                        [
                            _mm512_permutex2var_ps(a0, evens, a1),
                            _mm512_permutex2var_ps(a0, odds, a1),
                            _mm512_permutex2var_ps(c0, evens, c1),
                        ]
                    };
                    for (r, a) in acc.iter_mut().enumerate() {
                        let ky = iy + pt - ((oy0 + r) * s) as isize;
                        if r < rows && (0..3).contains(&ky) {
                            let k = &kv[ky as usize * 3..ky as usize * 3 + 3];
                            *a = _mm512_fmadd_ps(t[0], k[0], *a);
                            *a = _mm512_fmadd_ps(t[1], k[1], *a);
                            *a = _mm512_fmadd_ps(t[2], k[2], *a);
                        }
                    }
                }
                for (r, mut a) in acc.into_iter().enumerate().take(rows) {
                    if clamp {
                        a = _mm512_min_ps(_mm512_max_ps(a, vlo), vhi);
                    }
                    let dst = &mut yc[(oy0 + r) * ow + x0..(oy0 + r) * ow + x0 + n];
                    // SAFETY: the mask keeps the first n lanes, which `dst` holds.
                    unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), ((1u32 << n) - 1) as u16, a) };
                }
                x0 += 16;
            }
        }
        if post {
            p.act.apply_slice(yc);
        }
    }
}

/// The 12-pixel x 32-channel AVX-512 tile of [`crate::nhwc::pointwise`] when `variant` is
/// AVX-512 and the CPU has it; `false` (touching nothing) otherwise. Sizes were checked.
pub(crate) fn pointwise_nhwc(variant: Variant, p: &nhwc::Pointwise<'_>, y: &mut [f32]) -> bool {
    match variant {
        Variant::Avx512 if has_avx512() => {
            // SAFETY: AVX-512F was detected just above; `nhwc::pointwise` checked that x holds
            // pixels * k floats, y and the residual pixels * m, the bias m; all panels.
            unsafe { pointwise_nhwc_avx512(p, 0..p.w.panels(), y.as_mut_ptr()) };
            true
        }
        _ => false,
    }
}

/// Pixel rows of the pointwise register tile (x 32 channels: 14 accumulators). Seven, as
/// XNNPACK's 7x32 AVX-512 tile: with small `k` (an expanding layer, k = 16..32) the tile's
/// epilogue weighs, and the 24 stores of a 12-row tile stalled where 14 overlap the next
/// tile's products (a probe at 12096 x 16 x 96: 224 GFLOP/s with 12 rows, 242 with 7; equal
/// from k = 96). MobileNet maps (7 x 2^i on a side) split into whole 7-row tiles.
const PW_ROWS: usize = 7;

/// Whether the pointwise weights (`k * m` floats) are too large to stay in L2 next to the
/// block's rows: they then stream past once per block, and each panel prefetches the next.
fn pw_streamed(k: usize, m: usize) -> bool {
    k.saturating_mul(m) > 64 * 1024
}

/// Pixels per block of the pointwise kernel, which runs every weight panel over a block
/// before the next. Weights that stay in L2: eight 7-row tiles, whose output rows stay in L1
/// until every panel has written them (with panels outermost over a whole 112x112x96 map, the
/// output was fetched into cache once per 32-channel panel) and which share one set-up per
/// panel (one tile per block: 206 GFLOP/s at 12544 x 16 x 96, eight: 228). Streamed weights:
/// as many pixels as keep the block's input rows (`k` floats each) in L2 while the panels
/// stream past once.
fn pw_block(k: usize, m: usize) -> usize {
    if !pw_streamed(k, m) {
        return 8 * PW_ROWS;
    }
    ((192 * 1024) / (k.max(1) * 4)).max(PW_ROWS) / PW_ROWS * PW_ROWS
}

/// The mask of the first `n` (at most 16) lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// One thread's share of a [`nhwc::Pointwise`] split by output channels: the 32-channel
/// panels `panels` of every pixel, written through `y` (the whole `[pixels, m]` output, which
/// the other parts write in other columns). Made only by [`pointwise_nhwc_split`], which
/// borrows the output mutably for `'a` and hands out disjoint panel ranges.
pub(crate) struct PwPart<'a> {
    p: nhwc::Pointwise<'a>,
    panels: Range<usize>,
    y: *mut f32,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a part writes only the columns of its own panels (disjoint from every other part's)
// and reads shared data; the output borrow outlives the parts.
unsafe impl Send for PwPart<'_> {}

impl PwPart<'_> {
    pub(crate) fn run(self) {
        // SAFETY: `pointwise_nhwc_split` checked AVX-512F and the sizes (as for
        // `pointwise_nhwc`), and the panel range is within the weights' panels.
        unsafe { pointwise_nhwc_avx512(&self.p, self.panels, self.y) }
    }
}

/// [`nhwc::Pointwise`] as `parts` parts over contiguous panel ranges, when `variant` is
/// AVX-512, the CPU has it, the activation is a clamp (applied in the tile) and there are at
/// least `parts` panels; `None` otherwise. Sizes were checked by the caller.
pub(crate) fn pointwise_nhwc_split<'a>(
    variant: Variant,
    p: &nhwc::Pointwise<'a>,
    y: &'a mut [f32],
    parts: usize,
) -> Option<Vec<PwPart<'a>>> {
    let panels = p.w.panels();
    if variant != Variant::Avx512
        || !has_avx512()
        || p.act.clamp_bounds().is_none()
        || parts == 0
        || panels < parts
    {
        return None;
    }
    let y = y.as_mut_ptr();
    Some(
        (0..parts)
            .map(|i| PwPart {
                p: nhwc::Pointwise { ..*p },
                panels: i * panels / parts..(i + 1) * panels / parts,
                y,
                _out: std::marker::PhantomData,
            })
            .collect(),
    )
}

/// The panels `panels` of every pixel.
///
/// # Safety
/// The CPU must support AVX-512F; `p.x` holds `pixels * k` floats, `y` and `p.residual`
/// `pixels * m`, `p.bias` `m` (checked by `nhwc::pointwise`); `panels.end <= p.w.panels()`;
/// no one else accesses the columns of these panels in `y` meanwhile. A non-clamp
/// activation is applied to whole rows, so it needs every panel.
#[target_feature(enable = "avx512f")]
unsafe fn pointwise_nhwc_avx512(p: &nhwc::Pointwise<'_>, panels: Range<usize>, yp: *mut f32) {
    let (m, k) = (p.w.rows(), p.w.depth());
    let ((lo, hi), other) = match p.act.clamp_bounds() {
        Some(b) => (b, false),
        None => ((f32::NEG_INFINITY, f32::INFINITY), true),
    };
    let clamp = lo != f32::NEG_INFINITY || hi != f32::INFINITY;
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let x = p.x.as_ptr();
    let res = p.residual.map(|r| r.as_ptr());
    let blk = pw_block(k, m);
    let mut b0 = 0;
    while b0 < p.pixels {
        // A short last block would stream every panel again for a few pixels (49 pixels in
        // blocks of 48 ran a 1-pixel block over all of a 1.2 MB weight matrix): merge it.
        let b1 = if p.pixels - b0 < blk + blk / 2 {
            p.pixels
        } else {
            b0 + blk
        };
        for jp in panels.clone() {
            let wp = p.w.panel(jp);
            assert!(wp.len() >= k * 32);
            let j0 = jp * 32;
            let cols = 32.min(m - j0);
            let mk = [lanes(cols), lanes(cols.saturating_sub(16))];
            // The accumulators start from the bias.
            let bias = match p.bias {
                // SAFETY: the bias has m >= j0 + cols entries; the masks cover only those.
                Some(b) => unsafe {
                    [
                        _mm512_maskz_loadu_ps(mk[0], b.as_ptr().add(j0)),
                        _mm512_maskz_loadu_ps(mk[1], b.as_ptr().add(j0 + 16)),
                    ]
                },
                None => [_mm512_setzero_ps(); 2],
            };
            let mut i = b0;
            while i < b1 {
                let rows = PW_ROWS.min(b1 - i);
                let t = PwTile {
                    k,
                    x: x.wrapping_add(i * k),
                    rows,
                    w: wp.as_ptr(),
                    init: bias,
                    y: yp.wrapping_add(i * m + j0),
                    res: res.map(|r| r.wrapping_add(i * m + j0)),
                    m,
                    mk,
                    clamp: clamp.then_some((vlo, vhi)),
                };
                // SAFETY: rows i .. i + rows are within the pixels x holds (and y and the
                // residual hold them times m); the panel holds k * 32 floats (asserted above);
                // channels j0 + 16 v .. under the masks are < m.
                unsafe {
                    if m <= 16 {
                        // One vector of channels: 7 rows with even and odd steps in separate
                        // chains (a 32-wide tile would be half zeros).
                        match rows {
                            5.. => t.run16::<7>(),
                            _ => t.run16::<4>(),
                        }
                        i += rows;
                        continue;
                    }
                    // The block's first tile of a panel also prefetches the next panel into
                    // L1, two lines per step (the same 128 bytes per k as this panel), so the
                    // other tiles and the next panel find their weights near (a large layer's
                    // weights come from L3 cold on every run).
                    let next = if i == b0 && jp + 1 < panels.end && pw_streamed(k, m) {
                        Some(p.w.panel(jp + 1).as_ptr())
                    } else {
                        None
                    };
                    // The last tile of a block takes the smallest register tile that covers
                    // its rows.
                    match (rows, next) {
                        (7.., Some(pf)) => t.run::<7, true>(pf),
                        (7.., None) => t.run::<7, false>(std::ptr::null()),
                        (5..=6, _) => t.run::<6, false>(std::ptr::null()),
                        (3..=4, _) => t.run::<4, false>(std::ptr::null()),
                        (2, _) => t.run::<2, false>(std::ptr::null()),
                        _ => t.run::<1, false>(std::ptr::null()),
                    }
                }
                i += rows;
            }
        }
        if other {
            // SAFETY: rows b0 .. b1 of y, all panels (the caller's promise).
            let rows = unsafe { std::slice::from_raw_parts_mut(yp.add(b0 * m), (b1 - b0) * m) };
            p.act.apply_slice(rows);
        }
        b0 = b1;
    }
}

/// Residual, clamp and stores of the first `rows` rows of `acc`. The common case (a
/// whole panel, a clamp, no residual: every expanding layer) is its own loop, with no
/// per-vector tests: with small `k` the epilogue's branches were a third of the kernel.
/// A macro, not a method: as a function it was not inlined and the accumulators went through
/// the stack. Expands inside an `unsafe` AVX-512 function with the tile's pointers valid.
macro_rules! pw_store {
    ($tile:expr, $acc:expr, $R:expr) => {{
        let tile: &PwTile = $tile;
        let acc: [[__m512; 2]; $R] = $acc;
        let (y, m, mk, rows) = (tile.y, tile.m, tile.mk, tile.rows);
        // Loops of constant length with the row test inside unroll and keep the accumulators
        // in registers (a loop that may stop early spilled them to the stack).
        if let (Some((lo, hi)), None, [0xffff, 0xffff]) = (tile.clamp, tile.res, mk) {
            for (r, a) in acc.iter().enumerate() {
                if r < rows {
                    // SAFETY: row r < rows, both vectors whole.
                    unsafe {
                        let at = y.add(r * m);
                        _mm512_storeu_ps(at, _mm512_min_ps(_mm512_max_ps(a[0], lo), hi));
                        _mm512_storeu_ps(at.add(16), _mm512_min_ps(_mm512_max_ps(a[1], lo), hi));
                    }
                }
            }
        } else {
            for (r, a) in acc.iter().enumerate() {
                if r >= rows {
                    continue;
                }
                for v in 0..2 {
                    if mk[v] == 0 {
                        continue;
                    }
                    let off = r * m + v * 16;
                    let mut t = a[v];
                    let whole = mk[v] == 0xffff;
                    // SAFETY: row r < rows and the channels under the mask are < m.
                    unsafe {
                        if let Some(rp) = tile.res {
                            let z = if whole {
                                _mm512_loadu_ps(rp.add(off))
                            } else {
                                _mm512_maskz_loadu_ps(mk[v], rp.add(off))
                            };
                            t = _mm512_add_ps(t, z);
                        }
                        if let Some((lo, hi)) = tile.clamp {
                            t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
                        }
                        // Whole vectors without a mask: masked stores are slower.
                        if whole {
                            _mm512_storeu_ps(y.add(off), t);
                        } else {
                            _mm512_mask_storeu_ps(y.add(off), mk[v], t);
                        }
                    }
                }
            }
        }
    }};
}

/// One register tile of the pointwise kernel: `rows` pixels x one 32-channel weight panel,
/// from the product to the stores.
struct PwTile {
    k: usize,
    /// The tile's first input pixel (`k` floats per pixel).
    x: *const f32,
    rows: usize,
    /// The weight panel (`k * 32` floats).
    w: *const f32,
    /// The accumulators' start: the bias of the panel's channels (or zero).
    init: [__m512; 2],
    /// Output (and residual) of the tile's first pixel and channel; pixels `m` floats apart.
    y: *mut f32,
    res: Option<*const f32>,
    m: usize,
    /// The panel's channels in each of the two vectors.
    mk: [__mmask16; 2],
    clamp: Option<(__m512, __m512)>,
}

impl PwTile {
    /// Product of `R >= rows` rows, then the epilogue.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; the pointers hold what the fields say.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run<const R: usize, const PF: bool>(&self, pf: *const f32) {
        // SAFETY: as the caller promised.
        let acc = unsafe { pw_product::<R, PF>(self.k, self.x, self.rows, self.w, pf, self.init) };
        pw_store!(self, acc, R);
    }

    /// [`Self::run`] with one vector of channels (`m <= 16`).
    ///
    /// # Safety
    /// As [`Self::run`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn run16<const R: usize>(&self) {
        // SAFETY: as the caller promised.
        let acc = unsafe { pw_product16::<R>(self.k, self.x, self.rows, self.w, self.init[0]) };
        pw_store!(self, acc, R);
    }
}

/// `r[i][v] = sum_kk x[i * k + kk] * w[kk * 32 + 16 v ..][..16]` for pixel rows `i < R`
/// (rows past `rows` repeat the last one and are not meant to be stored). With `PF` each step
/// also prefetches the same two lines of the panel at `pf` (the next weight panel).
///
/// # Safety
/// The CPU must support AVX-512F; `x` valid for `rows * k` reads (`rows >= 1`), `w` for
/// `k * 32`. `pf` is only used for prefetch addresses (which do not fault).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pw_product<const R: usize, const PF: bool>(
    k: usize,
    x: *const f32,
    rows: usize,
    w: *const f32,
    pf: *const f32,
    init: [__m512; 2],
) -> [[__m512; 2]; R] {
    let mut r = [init; R];
    let mut xr = [x; R];
    for (i, p) in xr.iter_mut().enumerate() {
        // SAFETY: row i.min(rows - 1) < rows starts within x.
        *p = unsafe { x.add(i.min(rows - 1) * k) };
    }
    for kk in 0..k {
        if PF {
            // Addresses only (wrapping: no claim that pf points into an allocation).
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(kk * 32) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(kk * 32 + 16) as *const i8);
        }
        // SAFETY: kk < k, so the weight reads end at k * 32 and the row reads at row + k.
        unsafe {
            let w0 = _mm512_loadu_ps(w.add(kk * 32));
            let w1 = _mm512_loadu_ps(w.add(kk * 32 + 16));
            for (ri, p) in r.iter_mut().zip(&xr) {
                let a = _mm512_set1_ps(*p.add(kk));
                ri[0] = _mm512_fmadd_ps(a, w0, ri[0]);
                ri[1] = _mm512_fmadd_ps(a, w1, ri[1]);
            }
        }
    }
    r
}

/// [`pw_product`] for at most 16 output channels: the first vector of each weight row only,
/// even and odd steps in separate accumulators (`2 R` chains); the second vector is zero.
///
/// # Safety
/// As [`pw_product`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pw_product16<const R: usize>(
    k: usize,
    x: *const f32,
    rows: usize,
    w: *const f32,
    init: __m512,
) -> [[__m512; 2]; R] {
    let mut e = [init; R];
    let mut o = [_mm512_setzero_ps(); R];
    let mut xr = [x; R];
    for (i, p) in xr.iter_mut().enumerate() {
        // SAFETY: row i.min(rows - 1) < rows starts within x.
        *p = unsafe { x.add(i.min(rows - 1) * k) };
    }
    let mut kk = 0;
    while kk + 2 <= k {
        // SAFETY: kk + 1 < k: the weight reads end at k * 32, the row reads at row + k.
        unsafe {
            let w0 = _mm512_loadu_ps(w.add(kk * 32));
            let w1 = _mm512_loadu_ps(w.add(kk * 32 + 32));
            for ((ei, oi), p) in e.iter_mut().zip(o.iter_mut()).zip(&xr) {
                *ei = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(kk)), w0, *ei);
                *oi = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(kk + 1)), w1, *oi);
            }
        }
        kk += 2;
    }
    if kk < k {
        // SAFETY: kk < k (bounds as above).
        unsafe {
            let w0 = _mm512_loadu_ps(w.add(kk * 32));
            for (ei, p) in e.iter_mut().zip(&xr) {
                *ei = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(kk)), w0, *ei);
            }
        }
    }
    let mut r = [[_mm512_setzero_ps(); 2]; R];
    for ((ri, ei), oi) in r.iter_mut().zip(e).zip(o) {
        ri[0] = _mm512_add_ps(ei, oi);
    }
    r
}

wide!(
    depthwise3x3_nhwc_wide,
    depthwise3x3_nhwc_avx512_loops,
    depthwise3x3_nhwc_avx2,
    (p: &nhwc::DwNhwc<'_>, rows: Range<usize>, y: &mut [f32]),
    nhwc::dw_nhwc_body::<true>(p, rows, y)
);

wide!(
    dense_small_c_wide,
    dense_small_c_avx512_loops,
    dense_small_c_avx2,
    (p: &nhwc::DenseSmallC<'_>, rows: Range<usize>, y: &mut [f32]),
    nhwc::dense_small_c_body::<true>(p, rows, y)
);

/// [`nhwc::depthwise3x3_nhwc`] on x86: the AVX-512 register kernel when the channels come in
/// whole vectors and the activation is a clamp, else the vectorized loops. Sizes were checked.
pub(crate) fn depthwise3x3_nhwc(
    variant: Variant,
    p: &nhwc::DwNhwc<'_>,
    rows: Range<usize>,
    y: &mut [f32],
) -> bool {
    if variant == Variant::Avx512
        && has_avx512()
        && p.c.is_multiple_of(16)
        && p.act.clamp_bounds().is_some()
    {
        // SAFETY: AVX-512F was detected just above; `nhwc::depthwise3x3_nhwc` checked x, y,
        // the weights, the bias and the residual against the geometry and the row range.
        unsafe { dw_nhwc_avx512(p, rows, y) };
        return true;
    }
    depthwise3x3_nhwc_wide(variant, p, rows, y)
}

/// Depthwise 3x3 on NHWC, row by row ([`dw_row_avx512`]); kernel rows above or below the
/// image read a zero row.
///
/// # Safety
/// The CPU must support AVX-512F; sizes as checked by `nhwc::depthwise3x3_nhwc`; `c % 16 == 0`.
#[target_feature(enable = "avx512f")]
unsafe fn dw_nhwc_avx512(p: &nhwc::DwNhwc<'_>, rows: Range<usize>, y: &mut [f32]) {
    let c = p.c;
    let h = p.h as isize;
    let x = p.x.as_ptr();
    let yp = y.as_mut_ptr();
    let r0 = rows.start;
    // A zero input row for kernel rows outside the image.
    let zeros = vec![0f32; p.w * c];
    let segs = dw_segments(p);
    for oy in rows {
        let iy0 = (oy * p.stride) as isize - p.pad_top as isize;
        let row_ptr = |ty: isize| {
            let iy = iy0 + ty;
            if iy < 0 || iy >= h {
                zeros.as_ptr()
            } else {
                // SAFETY: row iy of the image.
                unsafe { x.add(iy as usize * p.w * c) }
            }
        };
        let row = p.out_w * c;
        // SAFETY: rows of w * c floats (image or zeros); output row oy - r0 of y and row oy
        // of the residual exist (sizes checked by `nhwc::depthwise3x3_nhwc`).
        unsafe {
            dw_row_avx512(
                p,
                &segs,
                [row_ptr(0), row_ptr(1), row_ptr(2)],
                yp.add((oy - r0) * row),
                p.residual.map(|r| r.as_ptr().add(oy * row)),
            )
        };
    }
}

/// A depthwise output row cut into segments `(first pixel, pixels, strip?)`: border pixels
/// (one at a time) and strips of `DW_STRIP` over the columns whose windows are inside the
/// image horizontally (ox s - pad_left >= 0 and ox s - pad_left + 3 <= w).
fn dw_segments(p: &nhwc::DwNhwc<'_>) -> Vec<(usize, usize, bool)> {
    let s = p.stride;
    let ox_lo = p.pad_left.div_ceil(s).min(p.out_w);
    let ox_hi = if p.w + p.pad_left >= 3 {
        ((p.w + p.pad_left - 3) / s + 1).clamp(ox_lo, p.out_w)
    } else {
        ox_lo
    };
    let mut segs = Vec::new();
    if ox_lo > 0 {
        segs.push((0, ox_lo, false));
    }
    let mut ox = ox_lo;
    while ox + DW_STRIP <= ox_hi {
        segs.push((ox, DW_STRIP, true));
        ox += DW_STRIP;
    }
    if ox < p.out_w {
        segs.push((ox, p.out_w - ox, false));
    }
    segs
}

/// [`nhwc::depthwise3x3_nhwc_row`] on x86: the AVX-512 kernel when the channels come in whole
/// vectors and the activation is a clamp; `false` otherwise. Sizes were checked.
pub(crate) fn depthwise3x3_nhwc_row(
    variant: Variant,
    p: &nhwc::DwNhwc<'_>,
    rows: [Option<&[f32]>; 3],
    y: &mut [f32],
) -> bool {
    if !(variant == Variant::Avx512
        && has_avx512()
        && p.c.is_multiple_of(16)
        && p.act.clamp_bounds().is_some())
    {
        return false;
    }
    // A zero row only for rows outside the image (the first and last output rows): this runs
    // once per output row of a fused pair.
    let zeros = if rows.iter().any(Option::is_none) {
        vec![0f32; p.w * p.c]
    } else {
        Vec::new()
    };
    let in_rows = rows.map(|r| r.map_or(zeros.as_ptr(), <[f32]>::as_ptr));
    // SAFETY: AVX-512F was detected just above; the rows hold w * c floats and y out_w * c
    // (checked by `nhwc::depthwise3x3_nhwc_row`).
    unsafe { dw_row_avx512(p, &dw_segments(p), in_rows, y.as_mut_ptr(), None) };
    true
}

/// One depthwise output row from its three input rows, 16 channels at a time with the block's
/// nine weight vectors in registers: the segments' strips as independent FMA chains, each input
/// vector loaded once for the outputs sharing it; border pixels one at a time with the outside
/// taps skipped. Segments go outermost, so the input lines a segment reads stay in L1 while
/// every channel block passes over them.
///
/// # Safety
/// The CPU must support AVX-512F; each of `in_rows` valid for `w * c` reads, `out` for
/// `out_w * c` writes and `res` (unless `None`) for as many reads; `c % 16 == 0`; the weights
/// and bias as checked by `nhwc::depthwise3x3_nhwc`.
#[target_feature(enable = "avx512f")]
unsafe fn dw_row_avx512(
    p: &nhwc::DwNhwc<'_>,
    segs: &[(usize, usize, bool)],
    in_rows: [*const f32; 3],
    out: *mut f32,
    res: Option<*const f32>,
) {
    let (lo, hi) = p
        .act
        .clamp_bounds()
        .unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let (c, s) = (p.c, p.stride);
    let w = p.w as isize;
    for &(first, len, strip) in segs {
        for cb in (0..c).step_by(16) {
            let mut wv = [_mm512_setzero_ps(); 9];
            for (t, v) in wv.iter_mut().enumerate() {
                // SAFETY: the blocked weights hold 9 * 16 floats per block and cb + 16 <= c.
                *v = unsafe { _mm512_loadu_ps(p.weight.as_ptr().add(cb * 9 + t * 16)) };
            }
            let bv = match p.bias {
                // SAFETY: the bias holds c floats.
                Some(b) => unsafe { _mm512_loadu_ps(b.as_ptr().add(cb)) },
                None => _mm512_setzero_ps(),
            };
            let finish = |ox: usize, mut acc: __m512| {
                let o = ox * c + cb;
                // SAFETY: pixel ox < out_w of the output (and residual) row, cb + 16 <= c.
                unsafe {
                    if let Some(r) = res {
                        acc = _mm512_add_ps(acc, _mm512_loadu_ps(r.add(o)));
                    }
                    acc = _mm512_min_ps(_mm512_max_ps(acc, vlo), vhi);
                    _mm512_storeu_ps(out.add(o), acc);
                }
            };
            if strip {
                let ix = (first * s - p.pad_left) * c + cb;
                // SAFETY: the strip's windows are inside the image horizontally (its pixels
                // lie in ox_lo..ox_hi), so columns ix .. ix + (DW_STRIP - 1) s + 3 of each
                // row (image or zero row, both w * c long) exist; cb + 16 <= c.
                let acc = unsafe {
                    let r = in_rows.map(|rp| rp.add(ix));
                    if s == 1 {
                        dw_strip::<1>(r, c, &wv, bv)
                    } else {
                        dw_strip::<2>(r, c, &wv, bv)
                    }
                };
                for (q, a) in acc.into_iter().enumerate() {
                    finish(first + q, a);
                }
                continue;
            }
            for ox in first..first + len {
                let ix0 = (ox * s) as isize - p.pad_left as isize;
                // One chain per kernel row, summed at the end.
                let mut acc = [bv, _mm512_setzero_ps(), _mm512_setzero_ps()];
                for (ty, &rp) in in_rows.iter().enumerate() {
                    for tx in 0..3isize {
                        let ix = ix0 + tx;
                        if ix < 0 || ix >= w {
                            continue;
                        }
                        // SAFETY: column ix < w of a w * c row (image or zeros), cb + 16 <= c.
                        let xv = unsafe { _mm512_loadu_ps(rp.add(ix as usize * c + cb)) };
                        let a = &mut acc[ty];
                        *a = _mm512_fmadd_ps(xv, wv[ty * 3 + tx as usize], *a);
                    }
                }
                finish(ox, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), acc[2]));
            }
        }
    }
}

/// `DW_STRIP` adjacent output pixels of one 16-channel block at stride `S`: each input vector
/// of the three kernel rows is loaded once and used by every output whose window covers it
/// (three at stride 1), so the strip costs `(DW_STRIP - 1) S + 3` loads per kernel row instead
/// of `3 DW_STRIP`.
///
/// # Safety
/// The CPU must support AVX-512F; `rows[ty]` points at the first input pixel of kernel row
/// `ty` (channel block included), valid for `(DW_STRIP - 1) S + 3` pixels of `c` floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dw_strip<const S: usize>(
    rows: [*const f32; 3],
    c: usize,
    wv: &[__m512; 9],
    bv: __m512,
) -> [__m512; DW_STRIP] {
    let mut acc = [bv; DW_STRIP];
    for (ty, &rp) in rows.iter().enumerate() {
        // SAFETY: column j of the row is within the caller's bound: j <= (DW_STRIP - 1) S + 2.
        let col = |j: usize| unsafe { _mm512_loadu_ps(rp.add(j * c)) };
        let mut prev = col(0);
        let mut mid = col(1);
        for (q, a) in acc.iter_mut().enumerate() {
            // Output q reads columns q S, q S + 1, q S + 2.
            if S == 1 {
                let next = col(q + 2);
                *a = _mm512_fmadd_ps(prev, wv[ty * 3], *a);
                *a = _mm512_fmadd_ps(mid, wv[ty * 3 + 1], *a);
                *a = _mm512_fmadd_ps(next, wv[ty * 3 + 2], *a);
                prev = mid;
                mid = next;
            } else {
                let last = col(q * S + 2);
                *a = _mm512_fmadd_ps(prev, wv[ty * 3], *a);
                *a = _mm512_fmadd_ps(mid, wv[ty * 3 + 1], *a);
                *a = _mm512_fmadd_ps(last, wv[ty * 3 + 2], *a);
                prev = last;
                if q + 1 < DW_STRIP {
                    mid = col(q * S + 3);
                }
            }
        }
    }
    acc
}

/// Output pixels per strip of [`dw_nhwc_avx512`].
const DW_STRIP: usize = 8;

/// [`nhwc::dense_small_c`] on x86: the AVX-512 register kernel for at most 32 output channels
/// and a clamp activation, else the vectorized loops. Sizes were checked.
pub(crate) fn dense_small_c(
    variant: Variant,
    p: &nhwc::DenseSmallC<'_>,
    rows: Range<usize>,
    y: &mut [f32],
) -> bool {
    if variant == Variant::Avx512 && has_avx512() && p.m <= 32 && p.act.clamp_bounds().is_some() {
        // SAFETY: AVX-512F was detected just above; `nhwc::dense_small_c` checked x, y, the
        // weights and the bias against the geometry and the row range.
        unsafe { dense_small_c_avx512(p, rows, y) };
        return true;
    }
    dense_small_c_wide(variant, p, rows, y)
}

/// Output pixels of a row computed together by [`dense_small_c_avx512`].
const DENSE_PX: usize = 12;

/// The small-channel dense convolution: `DENSE_PX` output pixels x 32 channels in registers,
/// each tap's two weight vectors loaded once for all of them; pixels whose window leaves the
/// image take the same loop one at a time with the taps outside skipped.
///
/// # Safety
/// The CPU must support AVX-512F; sizes as checked by `nhwc::dense_small_c`; `m <= 32`.
#[target_feature(enable = "avx512f")]
unsafe fn dense_small_c_avx512(p: &nhwc::DenseSmallC<'_>, rows: Range<usize>, y: &mut [f32]) {
    let (lo, hi) = p
        .act
        .clamp_bounds()
        .unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    let (vlo, vhi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    let m = p.m;
    let mk = [lanes(m), lanes(m.saturating_sub(16))];
    let (h, w) = (p.h as isize, p.w as isize);
    let (sy, sx) = (p.stride[0] as isize, p.stride[1] as isize);
    let yp = y.as_mut_ptr();
    let bv = match p.bias {
        // SAFETY: the bias holds m floats; the masks cover only those.
        Some(b) => unsafe {
            [
                _mm512_maskz_loadu_ps(mk[0], b.as_ptr()),
                _mm512_maskz_loadu_ps(mk[1], b.as_ptr().add(16)),
            ]
        },
        None => [_mm512_setzero_ps(); 2],
    };
    let r0 = rows.start;
    let g = DenseGeo {
        p,
        mk,
        bv,
        h,
        w,
        sx,
    };
    for oy in rows {
        let iy0 = oy as isize * sy - p.pad[0] as isize;
        let row_in = iy0 >= 0 && iy0 + p.kh as isize <= h;
        let mut ox = 0;
        while ox < p.out_w {
            let ix0 = ox as isize * sx - p.pad[1] as isize;
            let full = row_in
                && ox + DENSE_PX <= p.out_w
                && ix0 >= 0
                && ix0 + (DENSE_PX as isize - 1) * sx + p.kw as isize <= w;
            let o = ((oy - r0) * p.out_w + ox) * m;
            // SAFETY: `full` means the windows of DENSE_PX pixels are inside the image; else
            // one pixel with its taps checked; either way the pixels are within the rows y
            // holds (sizes checked by `nhwc::dense_small_c`).
            unsafe {
                if full {
                    let acc = dense_pixels::<DENSE_PX, false>(&g, iy0, ix0);
                    dense_store(&acc, yp.add(o), m, mk, vlo, vhi);
                    ox += DENSE_PX;
                } else {
                    let acc = dense_pixels::<1, true>(&g, iy0, ix0);
                    dense_store(&acc, yp.add(o), m, mk, vlo, vhi);
                    ox += 1;
                }
            }
        }
    }
}

/// What [`dense_pixels`] reads: the convolution, the lane masks of its `m <= 32` channels,
/// the bias vectors and the image geometry.
struct DenseGeo<'p, 'a> {
    p: &'p nhwc::DenseSmallC<'a>,
    mk: [__mmask16; 2],
    bv: [__m512; 2],
    h: isize,
    w: isize,
    sx: isize,
}

/// `N` output pixels of a row from input position `(iy0, ix0)`: bias plus every tap, each
/// tap's two weight vectors loaded once for the `N` pixels; with `CHECK` the taps outside the
/// image are skipped.
///
/// # Safety
/// The CPU must support AVX-512F; without `CHECK` every window of the `N` pixels must be inside
/// the image; the weights hold `c * kh * kw * m` floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dense_pixels<const N: usize, const CHECK: bool>(
    g: &DenseGeo<'_, '_>,
    iy0: isize,
    ix0: isize,
) -> [[__m512; 2]; N] {
    let p = g.p;
    let plane = p.h * p.w;
    // Strides of a channel and of a pixel in x.
    let (cs, ps) = if p.input_nhwc { (1, p.c) } else { (plane, 1) };
    let mut acc = [g.bv; N];
    for ci in 0..p.c {
        for ty in 0..p.kh {
            let iy = iy0 + ty as isize;
            if CHECK && (iy < 0 || iy >= g.h) {
                continue;
            }
            for tx in 0..p.kw {
                let ix = ix0 + tx as isize;
                if CHECK && (ix < 0 || ix >= g.w) {
                    continue;
                }
                let wi = ((ci * p.kh + ty) * p.kw + tx) * p.m;
                // SAFETY: the weights hold c * kh * kw * m floats and the masks cover this
                // tap's m; (iy, ix + q sx) is inside the image (the caller's bound or checked).
                unsafe {
                    let w0 = _mm512_maskz_loadu_ps(g.mk[0], p.weight.as_ptr().add(wi));
                    let w1 = _mm512_maskz_loadu_ps(g.mk[1], p.weight.as_ptr().add(wi + 16));
                    let xr = p.x.as_ptr().add(ci * cs + (iy * g.w + ix) as usize * ps);
                    for (q, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_set1_ps(*xr.add(q * g.sx as usize * ps));
                        a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                    }
                }
            }
        }
    }
    acc
}

/// Clamps `N` pixels of `m` channels and stores them from `y` (pixel stride `m`).
///
/// # Safety
/// The CPU must support AVX-512F; `y` valid for `N * m` floats; `mk` the lanes of `m <= 32`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dense_store<const N: usize>(
    acc: &[[__m512; 2]; N],
    y: *mut f32,
    m: usize,
    mk: [__mmask16; 2],
    vlo: __m512,
    vhi: __m512,
) {
    for (q, a) in acc.iter().enumerate() {
        for v in 0..2 {
            if mk[v] != 0 {
                let t = _mm512_min_ps(_mm512_max_ps(a[v], vlo), vhi);
                // SAFETY: pixel q < N of y, channels under the mask are < m.
                unsafe { _mm512_mask_storeu_ps(y.add(q * m + v * 16), mk[v], t) };
            }
        }
    }
}
