//! x86_64 sgemm micro-kernels with `std::arch` intrinsics: AVX2+FMA (6x16 tile, 12 ymm
//! accumulators) and AVX-512F (12x32 tile, 24 zmm accumulators; a Zen 4 core needs about 16
//! independent FMA chains to stay busy); the [`crate::gemv`] panel kernels (64 rows a call,
//! 8 accumulators). Packing and the C update are the safe code in
//! `gemm::packed_with`; only the register tile is unsafe.
//!
//! Soundness: the `#[target_feature]` functions are reached only through [`sgemm`], which
//! runs a variant only after `is_x86_feature_detected!` said the CPU has it, and through safe
//! wrappers that check the panel lengths before the raw-pointer loop.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::dispatch::Variant;
use crate::gemm::{axpy_rows, packed_with, Blocking, MatRef, MR as PORTABLE_MR};
use crate::gemv::{drive_ordered as gemv_drive, GemvAdd, PackedGemv, GROUP, GROUP_ROWS, PANEL};
use crate::qconv::RowGeo;

const AVX2_MR: usize = 6;
const AVX2_NR: usize = 16;
const AVX512_MR: usize = 12;
const AVX512_NR: usize = 32;

/// Runs `alpha * A * B` into C with `variant` when it is an x86 SIMD variant this CPU has;
/// returns `false` (touching nothing) otherwise. Sizes are already checked, m, n, k > 0.
pub(crate) fn sgemm(
    variant: Variant,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
) -> bool {
    match variant {
        Variant::Avx512 if is_x86_feature_detected!("avx512f") => {
            // SAFETY: AVX-512F was detected on this CPU just above.
            unsafe { sgemm_avx512(alpha, a, b, c, ldc) };
            true
        }
        Variant::Avx2 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            unsafe { sgemm_avx2(alpha, a, b, c, ldc) };
            true
        }
        _ => false,
    }
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn sgemm_avx512(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize) {
    let (k, n) = (a.cols, b.cols);
    if a.rows < PORTABLE_MR {
        // The safe axpy loop, compiled here with 512-bit vectors.
        axpy_rows(alpha, a, b, k, n, c, ldc);
        return;
    }
    let blk = Blocking {
        kc: 256,
        mc: 120,
        nc: 4096,
    };
    packed_with::<AVX512_MR, AVX512_NR, _>(blk, alpha, a, b, c, ldc, |ap, bp, acc| {
        let kc = ap.len() / AVX512_MR;
        assert!(bp.len() >= kc * AVX512_NR);
        // SAFETY: this closure runs inside a function compiled for AVX-512F, called only when
        // the CPU has it; the panels hold kc*MR and kc*NR floats (checked above).
        unsafe { tile_avx512(kc, ap.as_ptr(), bp.as_ptr(), acc) }
    });
}

/// `acc[i][j] = sum_p a[p*12 + i] * b[p*32 + j]` over `kc` steps.
///
/// # Safety
/// The CPU must support AVX-512F; `a` must be valid for `kc * 12` reads and `b` for
/// `kc * 32` reads.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    acc: &mut [[f32; AVX512_NR]; AVX512_MR],
) {
    let mut r = [[_mm512_setzero_ps(); 2]; AVX512_MR];
    for p in 0..kc {
        // SAFETY: p < kc, so p*32 + 31 < kc*32 and p*12 + 11 < kc*12 (the caller's bounds).
        unsafe {
            let b0 = _mm512_loadu_ps(b.add(p * AVX512_NR));
            let b1 = _mm512_loadu_ps(b.add(p * AVX512_NR + 16));
            let ar = a.add(p * AVX512_MR);
            for (i, ri) in r.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ar.add(i));
                ri[0] = _mm512_fmadd_ps(x, b0, ri[0]);
                ri[1] = _mm512_fmadd_ps(x, b1, ri[1]);
            }
        }
    }
    for (ri, out) in r.iter().zip(acc.iter_mut()) {
        // SAFETY: each output row holds 32 floats, two 16-float stores.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr(), ri[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), ri[1]);
        }
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn sgemm_avx2(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize) {
    let (k, n) = (a.cols, b.cols);
    if a.rows < PORTABLE_MR {
        // The safe axpy loop, compiled here with 256-bit vectors.
        axpy_rows(alpha, a, b, k, n, c, ldc);
        return;
    }
    let blk = Blocking {
        kc: 256,
        mc: 72,
        nc: 4096,
    };
    packed_with::<AVX2_MR, AVX2_NR, _>(blk, alpha, a, b, c, ldc, |ap, bp, acc| {
        let kc = ap.len() / AVX2_MR;
        assert!(bp.len() >= kc * AVX2_NR);
        // SAFETY: this closure runs inside a function compiled for AVX2+FMA, called only when
        // the CPU has them; the panels hold kc*MR and kc*NR floats (checked above).
        unsafe { tile_avx2(kc, ap.as_ptr(), bp.as_ptr(), acc) }
    });
}

/// `acc[i][j] = sum_p a[p*6 + i] * b[p*16 + j]` over `kc` steps.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `a` must be valid for `kc * 6` reads and `b` for
/// `kc * 16` reads.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_avx2(kc: usize, a: *const f32, b: *const f32, acc: &mut [[f32; AVX2_NR]; AVX2_MR]) {
    let mut r = [[_mm256_setzero_ps(); 2]; AVX2_MR];
    for p in 0..kc {
        // SAFETY: p < kc, so p*16 + 15 < kc*16 and p*6 + 5 < kc*6 (the caller's bounds).
        unsafe {
            let b0 = _mm256_loadu_ps(b.add(p * AVX2_NR));
            let b1 = _mm256_loadu_ps(b.add(p * AVX2_NR + 8));
            let ar = a.add(p * AVX2_MR);
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

/// Peak-FMA microbenchmark: `iters` rounds of `CHAINS` independent FMAs on full vectors of
/// `variant`. Returns the floating-point operations done and a checksum (so the loop is not
/// optimized away), or `None` when the CPU lacks the variant.
pub(crate) fn fma_peak(variant: Variant, iters: usize, x: f32) -> Option<(f64, f32)> {
    match variant {
        Variant::Avx512 if is_x86_feature_detected!("avx512f") => {
            // SAFETY: AVX-512F was detected on this CPU just above.
            let s = unsafe { fma_peak_avx512(iters, x) };
            Some(((iters * 24 * 16 * 2) as f64, s))
        }
        Variant::Avx2 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            let s = unsafe { fma_peak_avx2(iters, x) };
            Some(((iters * 16 * 8 * 2) as f64, s))
        }
        _ => None,
    }
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn fma_peak_avx512(iters: usize, x: f32) -> f32 {
    let m = _mm512_set1_ps(x);
    let add = _mm512_set1_ps(1e-7);
    let mut r = [_mm512_set1_ps(0.5); 24];
    for _ in 0..iters {
        for v in r.iter_mut() {
            *v = _mm512_fmadd_ps(*v, m, add);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in r {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_peak_avx2(iters: usize, x: f32) -> f32 {
    let m = _mm256_set1_ps(x);
    let add = _mm256_set1_ps(1e-7);
    let mut r = [_mm256_set1_ps(0.5); 16];
    for _ in 0..iters {
        for v in r.iter_mut() {
            *v = _mm256_fmadd_ps(*v, m, add);
        }
    }
    let mut s = [0f32; 8];
    for v in r {
        let mut t = [0f32; 8];
        // SAFETY: `t` holds 8 floats.
        unsafe { _mm256_storeu_ps(t.as_mut_ptr(), v) };
        for (a, b) in s.iter_mut().zip(t) {
            *a += b;
        }
    }
    s.iter().sum()
}

/// Runs one int8 register tile of [`crate::qgemm`] with `variant` when it is an x86 VNNI
/// variant this CPU has: `acc[i*NR + j] = sum over groups g, kk < 4 of a[g][i][kk] (u8) *
/// b[g][j][kk] (i8)`. Returns `false` (touching nothing) for other variants or short panels.
pub(crate) fn qtile(variant: Variant, groups: usize, a: &[u8], b: &[u8], acc: &mut [i32]) -> bool {
    let t = crate::qgemm::tile_of(variant);
    if a.len() < groups * t.mr * 4 || b.len() < groups * t.nr * 4 || acc.len() < t.mr * t.nr {
        return false;
    }
    match variant {
        Variant::Avx512Vnni
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") =>
        {
            // SAFETY: AVX-512F and AVX-512 VNNI were detected just above; the panel and
            // accumulator lengths were checked against the 8x32 tile just above.
            unsafe { qtile_avx512vnni(groups, a.as_ptr(), b.as_ptr(), acc.as_mut_ptr()) };
            true
        }
        Variant::AvxVnni
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni") =>
        {
            // SAFETY: AVX2 and AVX-VNNI were detected just above; the panel and accumulator
            // lengths were checked against the 6x16 tile just above.
            unsafe { qtile_avxvnni(groups, a.as_ptr(), b.as_ptr(), acc.as_mut_ptr()) };
            true
        }
        _ => false,
    }
}

/// 8x32 int8 tile: per group, 8 rows x 4 u8 of A (each broadcast as one i32) and 32 columns
/// x 4 i8 of B (two zmm), 16 zmm accumulators of `vpdpbusd`.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512 VNNI; `a` must be valid for `groups * 32` reads,
/// `b` for `groups * 128` reads and `acc` for 256 i32 writes.
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn qtile_avx512vnni(groups: usize, a: *const u8, b: *const u8, acc: *mut i32) {
    const MR: usize = 8;
    let mut r = [[_mm512_setzero_si512(); 2]; MR];
    for g in 0..groups {
        // SAFETY: g < groups, so the 128 bytes at b + g*128 and the 32 at a + g*32 are in
        // bounds (the caller's lengths).
        unsafe {
            let b0 = _mm512_loadu_si512(b.add(g * 128) as *const _);
            let b1 = _mm512_loadu_si512(b.add(g * 128 + 64) as *const _);
            let ar = a.add(g * 32) as *const i32;
            for (i, ri) in r.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(ar.add(i).read_unaligned());
                ri[0] = _mm512_dpbusd_epi32(ri[0], x, b0);
                ri[1] = _mm512_dpbusd_epi32(ri[1], x, b1);
            }
        }
    }
    for (i, ri) in r.iter().enumerate() {
        // SAFETY: row i of the 8x32 accumulator is acc[i*32 .. i*32+32] (caller's length).
        unsafe {
            _mm512_storeu_si512(acc.add(i * 32) as *mut _, ri[0]);
            _mm512_storeu_si512(acc.add(i * 32 + 16) as *mut _, ri[1]);
        }
    }
}

/// `b` unchanged, after the compiler had to hold it in an xmm register (see
/// `qconv::store_bytes`: keeps a narrowing from being folded into its store).
#[inline(always)]
pub(crate) fn in_register(b: [u8; 16]) -> [u8; 16] {
    // SAFETY: [u8; 16] and __m128i have the same size, and every bit pattern is valid for
    // both.
    let mut x = unsafe { std::mem::transmute::<[u8; 16], __m128i>(b) };
    // SAFETY: an empty template: the asm reads and writes nothing but `x`'s register (SSE2
    // registers exist on every x86_64 CPU).
    unsafe {
        std::arch::asm!("/* {0} */", inout(xmm_reg) x, options(pure, nomem, nostack, preserves_flags));
    }
    // SAFETY: as for the first transmute.
    unsafe { std::mem::transmute::<__m128i, [u8; 16]>(x) }
}

/// Whether [`qtile_rows`] runs `variant` on this CPU.
pub(crate) fn qtile_rows_supported(variant: Variant) -> bool {
    match variant {
        Variant::Avx512Vnni => {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")
        }
        // The AVX-VNNI tile keeps its packed panel: no machine here has AVX-VNNI to test
        // an in-place variant on.
        _ => false,
    }
}

/// [`qtile`] reading A in place instead of from a packed panel: row `i` of the tile is the
/// `groups * 4` bytes at `a[starts[i]..]`, each byte XORed with `flip` (0x80 turns i8 into
/// the u8 `vpdpbusd` multiplies; the caller corrects the constant terms). Each row's 4 bytes
/// are broadcast straight from the activations, as the packed panel's would be, so packing A
/// (a pass over every row per output panel of `mr` rows) is skipped. Returns `false`
/// (touching nothing) for other variants or bad lengths.
pub(crate) fn qtile_rows(
    variant: Variant,
    groups: usize,
    a: &[u8],
    starts: &[usize],
    flip: u8,
    b: &[u8],
    acc: &mut [i32],
) -> bool {
    let t = crate::qgemm::tile_of(variant);
    let rows_fit = starts.len() >= t.mr
        && starts[..t.mr]
            .iter()
            .all(|&s| s.checked_add(groups * 4).is_some_and(|e| e <= a.len()));
    if !rows_fit || b.len() < groups * t.nr * 4 || acc.len() < t.mr * t.nr {
        return false;
    }
    if !qtile_rows_supported(variant) {
        return false;
    }
    let x = i32::from_ne_bytes([flip; 4]);
    let r: [*const u8; 8] = std::array::from_fn(|i| a[starts[i]..].as_ptr());
    // SAFETY: the variant is Avx512Vnni and the CPU has AVX-512F and AVX-512 VNNI
    // (qtile_rows_supported); each row holds groups * 4 bytes, B and the accumulator were
    // checked against the 8x32 tile just above.
    unsafe { qtile_rows_avx512vnni(groups, &r, x, b.as_ptr(), acc.as_mut_ptr()) };
    true
}

/// [`qtile_avx512vnni`] with A's rows read in place (see [`qtile_rows`]).
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512 VNNI; each `rows[i]` must be valid for
/// `groups * 4` reads, `b` for `groups * 128` reads and `acc` for 256 i32 writes.
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn qtile_rows_avx512vnni(
    groups: usize,
    rows: &[*const u8; 8],
    flip: i32,
    b: *const u8,
    acc: *mut i32,
) {
    let mut r = [[_mm512_setzero_si512(); 2]; 8];
    let f = _mm512_set1_epi32(flip);
    for g in 0..groups {
        // SAFETY: g < groups: the 128 bytes at b + g*128 and the 4 at rows[i] + g*4 are in
        // bounds (the caller's lengths).
        unsafe {
            let b0 = _mm512_loadu_si512(b.add(g * 128) as *const _);
            let b1 = _mm512_loadu_si512(b.add(g * 128 + 64) as *const _);
            for (ri, &row) in r.iter_mut().zip(rows) {
                let v = (row.add(g * 4) as *const i32).read_unaligned();
                let x = _mm512_xor_si512(_mm512_set1_epi32(v), f);
                ri[0] = _mm512_dpbusd_epi32(ri[0], x, b0);
                ri[1] = _mm512_dpbusd_epi32(ri[1], x, b1);
            }
        }
    }
    for (i, ri) in r.iter().enumerate() {
        // SAFETY: row i of the 8x32 accumulator is acc[i*32 .. i*32+32] (caller's length).
        unsafe {
            _mm512_storeu_si512(acc.add(i * 32) as *mut _, ri[0]);
            _mm512_storeu_si512(acc.add(i * 32 + 16) as *mut _, ri[1]);
        }
    }
}

/// The float-mode epilogue of [`qgemm_float`]: column `j`'s output is
/// `clamp(rne(f32(acc + colc[j]) * scale[j]), lo, hi) + zp`, `lo` and `hi` being the output
/// bounds less the zero point (`qconv::float_lane`).
pub(crate) struct FloatEpilogue<'a> {
    pub colc: &'a [i32],
    pub scale: &'a [f32],
    pub zp: i32,
    pub lo: f32,
    pub hi: f32,
}

/// Whether [`qgemm_float`] runs `variant` on this CPU.
pub(crate) fn qgemm_float_supported(variant: Variant) -> bool {
    variant == Variant::Avx512Vnni
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Rows `first..first + m` of a quantized GEMM (A's rows where `geo` puts them, each byte
/// XORed with `flip`; `b` packed for the AVX-512 VNNI 8x32 tile with `geo.groups()` groups
/// of 4 depths) against every column panel, requantized in registers with the float
/// epilogue: accumulators never go through memory and the epilogue's constants are loaded
/// once per panel. Row `first + i` of the result goes to `out[i * ldc..][..n]`. Returns
/// `false` (touching nothing) for another variant or bad lengths.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qgemm_float(
    variant: Variant,
    a: &[u8],
    first: usize,
    m: usize,
    geo: &RowGeo,
    flip: u8,
    b: &[u8],
    n: usize,
    ep: &FloatEpilogue<'_>,
    out: &mut [u8],
    ldc: usize,
) -> bool {
    let Some(groups) = geo.segs.checked_mul(geo.seg_groups) else {
        return false;
    };
    let panels = n.div_ceil(32);
    let rows_fit = geo.per_line > 0
        && geo
            .max_start(first, m)
            .and_then(|s| s.checked_add(geo.reach()?))
            .is_some_and(|e| e <= a.len());
    let out_fits = m > 0
        && n <= ldc
        && (m - 1)
            .checked_mul(ldc)
            .and_then(|v| v.checked_add(n))
            .is_some_and(|e| e <= out.len());
    if !rows_fit
        || !out_fits
        || panels
            .checked_mul(groups)
            .and_then(|v| v.checked_mul(128))
            .is_none_or(|l| b.len() < l)
        || ep.colc.len() < n
        || ep.scale.len() < n
        || !qgemm_float_supported(variant)
    {
        return false;
    }
    let x = i32::from_ne_bytes([flip; 4]);
    // SAFETY: the CPU has AVX-512F/BW/VL and VNNI (checked above); every row's groups lie
    // inside `a` (its largest start plus the farthest group, checked above), B holds `panels`
    // panels of groups * 128 bytes, the epilogue's columns and the m stored rows of n bytes
    // at stride ldc are in bounds (checked above).
    unsafe {
        qgemm_float_avx512vnni(
            a.as_ptr(),
            first,
            m,
            geo,
            x,
            b.as_ptr(),
            n,
            ep,
            out.as_mut_ptr(),
            ldc,
        )
    };
    true
}

/// `$body` for `$k` = 0..8 as literal indices: the accumulator array is then indexed by
/// constants from the start and stays in registers (a loop, even one LLVM unrolls later,
/// left it on the stack with a store after every `vpdpbusd`).
macro_rules! each_row {
    ($k:ident => $body:block) => {{
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 0;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 1;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 2;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 3;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 4;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 5;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 6;
            $body
        }
        {
            #[allow(non_upper_case_globals)]
            const $k: usize = 7;
            $body
        }
    }};
}

/// # Safety
/// The CPU must support AVX-512F, BW, VL and VNNI; see [`qgemm_float`] for the lengths each
/// pointer must be valid for.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn qgemm_float_avx512vnni(
    a: *const u8,
    first: usize,
    m: usize,
    geo: &RowGeo,
    flip: i32,
    b: *const u8,
    n: usize,
    ep: &FloatEpilogue<'_>,
    out: *mut u8,
    ldc: usize,
) {
    let groups = geo.groups();
    let f = _mm512_set1_epi32(flip);
    let (lo, hi) = (_mm512_set1_ps(ep.lo), _mm512_set1_ps(ep.hi));
    const MAGIC: f32 = 12_582_912.0;
    let magic = _mm512_set1_ps(MAGIC);
    // rne_small's bias less the zero point: one subtraction gives the rounded value plus zp.
    let unbias = _mm512_set1_epi32((MAGIC.to_bits() as i32).wrapping_sub(ep.zp));
    let requant = |acc: __m512i, s: __m512| -> __m128i {
        let v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), s);
        let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        let q = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(v, magic)), unbias);
        in_register_m128(_mm512_cvtepi32_epi8(q))
    };
    for i0 in (0..m).step_by(8) {
        let h = (m - i0).min(8);
        // Row pointers of this block (rows past h repeat the last; they are not stored),
        // walking the line and column from one division.
        let mut rows = [a; 8];
        let (mut line, mut col) = ((first + i0) / geo.per_line, (first + i0) % geo.per_line);
        for (k, r) in rows.iter_mut().enumerate() {
            // SAFETY: the start of a row < first + m, at most the largest start (checked by
            // the caller).
            *r = unsafe { a.add(line * geo.line_step + col * geo.col_step) };
            if k + 1 < h {
                col += 1;
                if col == geo.per_line {
                    col = 0;
                    line += 1;
                }
            }
        }
        for (jp, j0) in (0..n).step_by(32).enumerate() {
            let w = (n - j0).min(32);
            // Lanes of each half that hold real columns.
            let m0: __mmask16 = if w >= 16 { 0xffff } else { (1u16 << w) - 1 };
            let m1: __mmask16 = if w >= 32 {
                0xffff
            } else if w > 16 {
                (1u16 << (w - 16)) - 1
            } else {
                0
            };
            // SAFETY: panel jp of B is in bounds.
            let bp = unsafe { b.add(jp * groups * 128) };
            // The accumulators start from the column constants (no add per output vector).
            // SAFETY: the masked loads read only columns j0..j0 + w, all < n.
            let (c0, c1) = unsafe {
                (
                    _mm512_maskz_loadu_epi32(m0, ep.colc.as_ptr().add(j0)),
                    _mm512_maskz_loadu_epi32(m1, ep.colc.as_ptr().add(j0 + 16)),
                )
            };
            let mut r = [[c0, c1]; 8];
            // One pass over the groups: `off` walks a segment 4 bytes at a time and jumps to
            // the next segment's start.
            let (mut off, mut seg_start, mut left) = (0usize, 0usize, geo.seg_groups);
            let mut next = |off: &mut usize| {
                left -= 1;
                if left == 0 {
                    seg_start += geo.seg_step;
                    *off = seg_start;
                    left = geo.seg_groups;
                } else {
                    *off += 4;
                }
            };
            if m1 != 0 {
                for g in 0..groups {
                    // SAFETY: the 128 bytes at bp + g*128 and the 4 at rows[i] + off are in
                    // bounds (off is within the row's reach).
                    unsafe {
                        let b0 = _mm512_loadu_si512(bp.add(g * 128) as *const _);
                        let b1 = _mm512_loadu_si512(bp.add(g * 128 + 64) as *const _);
                        each_row!(k => {
                            let v = (rows[k].add(off) as *const i32).read_unaligned();
                            let x = _mm512_xor_si512(_mm512_set1_epi32(v), f);
                            r[k][0] = _mm512_dpbusd_epi32(r[k][0], x, b0);
                            r[k][1] = _mm512_dpbusd_epi32(r[k][1], x, b1);
                        });
                    }
                    next(&mut off);
                }
            } else {
                // At most 16 columns: the panel's second half is zero padding.
                for g in 0..groups {
                    // SAFETY: as above.
                    unsafe {
                        let b0 = _mm512_loadu_si512(bp.add(g * 128) as *const _);
                        each_row!(k => {
                            let v = (rows[k].add(off) as *const i32).read_unaligned();
                            let x = _mm512_xor_si512(_mm512_set1_epi32(v), f);
                            r[k][0] = _mm512_dpbusd_epi32(r[k][0], x, b0);
                        });
                    }
                    next(&mut off);
                }
            }
            // Loaded after the sums: 16 accumulators and the tile's operands fill most of the
            // 32 registers, and these would push accumulators to the stack.
            // SAFETY: the masked loads read only columns j0..j0 + w, all < n.
            let (s0, s1) = unsafe {
                (
                    _mm512_maskz_loadu_ps(m0, ep.scale.as_ptr().add(j0)),
                    _mm512_maskz_loadu_ps(m1, ep.scale.as_ptr().add(j0 + 16)),
                )
            };
            each_row!(i => {
                if i < h {
                    // SAFETY: row i0 + i < m of the output holds columns j0..j0 + w (checked
                    // by the caller); the masked stores write only those.
                    unsafe {
                        let o = out.add((i0 + i) * ldc + j0);
                        let q0 = requant(r[i][0], s0);
                        if m0 == 0xffff {
                            _mm_storeu_si128(o as *mut __m128i, q0);
                        } else {
                            _mm_mask_storeu_epi8(o as *mut i8, m0, q0);
                        }
                        if m1 != 0 {
                            let q1 = requant(r[i][1], s1);
                            if m1 == 0xffff {
                                _mm_storeu_si128(o.add(16) as *mut __m128i, q1);
                            } else {
                                _mm_mask_storeu_epi8(o.add(16) as *mut i8, m1, q1);
                            }
                        }
                    }
                }
            });
        }
    }
}

/// Whether [`dw3x3_float`] runs under int8 `variant` on this CPU.
pub(crate) fn dw3x3_float_supported(variant: Variant) -> bool {
    variant == Variant::Avx512Vnni
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// `out.len() / c` consecutive output pixels of a 3x3 depthwise layer prepared as `pk`, all
/// windows inside the image: pixel `i`'s tap `t` reads `x[base + i * step + offs[t]..]`,
/// `c` channels. Per kernel row, the three taps' bytes are interleaved into dwords
/// (`vpunpck*`) and meet the packed weights in one `vpdpbusd` per 16 channels; the float
/// epilogue runs in registers and `vpack*` puts the channels back in order. `rq` is the
/// output `(zp, lo, hi)`; `lo..=hi` inside `0..=255` makes u8 outputs, inside `-128..=127`
/// i8 ones. Returns `false` (touching nothing) for a pack of another width, other bounds,
/// bad lengths or an unsupported CPU.
pub(crate) fn dw3x3_float(
    pk: &crate::qconv::DwPack,
    x: &[u8],
    offs: &[usize; 9],
    base: usize,
    step: usize,
    rq: (i32, i32, i32),
    out: &mut [u8],
) -> bool {
    let c = pk.c;
    let (_, lo, hi) = rq;
    let signed = match (lo, hi) {
        (0..=255, 0..=255) => false,
        (-128..=127, -128..=127) => true,
        _ => return false,
    };
    if c == 0 || !out.len().is_multiple_of(c) || !dw3x3_float_supported(Variant::Avx512Vnni) {
        return false;
    }
    let n = out.len() / c;
    let blocks = c.div_ceil(64);
    let reach = offs.iter().max().copied().unwrap_or(0);
    let fits = n == 0
        || (n - 1)
            .checked_mul(step)
            .and_then(|v| v.checked_add(base))
            .and_then(|v| v.checked_add(reach))
            .and_then(|v| v.checked_add(c))
            .is_some_and(|e| e <= x.len());
    if !fits
        || pk.w.len() < blocks * 768
        || pk.colc.len() < blocks * 64
        || pk.scale.len() < blocks * 64
    {
        return false;
    }
    let (zp, lo, hi) = rq;
    let ep = (zp, lo.wrapping_sub(zp) as f32, hi.wrapping_sub(zp) as f32);
    // SAFETY: the CPU has AVX-512F/BW and VNNI (checked above); every pixel's taps read c
    // bytes inside x, the pack holds `blocks` blocks and out holds n pixels of c bytes
    // (checked above).
    unsafe {
        dw3x3_float_avx512vnni(
            pk,
            x.as_ptr().add(base),
            offs,
            step,
            n,
            ep,
            signed,
            out.as_mut_ptr(),
        )
    };
    true
}

/// # Safety
/// The CPU must support AVX-512F, BW and VNNI; see [`dw3x3_float`] for the lengths.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn dw3x3_float_avx512vnni(
    pk: &crate::qconv::DwPack,
    x: *const u8,
    offs: &[usize; 9],
    step: usize,
    n: usize,
    (zp, lo, hi): (i32, f32, f32),
    signed: bool,
    out: *mut u8,
) {
    let c = pk.c;
    let flip = _mm512_set1_epi8(pk.flip as i8);
    let (lo, hi) = (_mm512_set1_ps(lo), _mm512_set1_ps(hi));
    const MAGIC: f32 = 12_582_912.0;
    let magic = _mm512_set1_ps(MAGIC);
    let unbias = _mm512_set1_epi32((MAGIC.to_bits() as i32).wrapping_sub(zp));
    for blk in 0..c.div_ceil(64) {
        let cb = blk * 64;
        let cw = (c - cb).min(64);
        let mask: __mmask64 = if cw == 64 { !0 } else { (1u64 << cw) - 1 };
        // SAFETY: the pack holds block blk (checked by the caller).
        let (wv, cc, sc) = unsafe {
            let wp = pk.w.as_ptr().add(blk * 768);
            let wv: [[__m512i; 4]; 3] = std::array::from_fn(|ky| {
                std::array::from_fn(|q| _mm512_loadu_si512(wp.add((ky * 4 + q) * 64) as *const _))
            });
            let cc: [__m512i; 4] = std::array::from_fn(|q| {
                _mm512_loadu_si512(pk.colc.as_ptr().add(cb + q * 16) as *const _)
            });
            let sc: [__m512; 4] =
                std::array::from_fn(|q| _mm512_loadu_ps(pk.scale.as_ptr().add(cb + q * 16)));
            (wv, cc, sc)
        };
        for i in 0..n {
            // SAFETY: pixel i < n: its taps' bytes cb..cb + cw are inside x, its output
            // bytes inside out (checked by the caller); the masked loads and store touch
            // only those.
            unsafe {
                let px = x.add(i * step + cb);
                let load = |t: usize| {
                    let v = if cw == 64 {
                        _mm512_loadu_si512(px.add(offs[t]) as *const _)
                    } else {
                        _mm512_maskz_loadu_epi8(mask, px.add(offs[t]) as *const i8)
                    };
                    _mm512_xor_si512(v, flip)
                };
                let mut acc = cc;
                for (ky, w) in wv.iter().enumerate() {
                    let (a, b, t2) = (load(ky * 3), load(ky * 3 + 1), load(ky * 3 + 2));
                    let ab_lo = _mm512_unpacklo_epi8(a, b);
                    let ab_hi = _mm512_unpackhi_epi8(a, b);
                    // The fourth byte of each dword meets a zero weight: any value will do.
                    let c_lo = _mm512_unpacklo_epi8(t2, t2);
                    let c_hi = _mm512_unpackhi_epi8(t2, t2);
                    acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_unpacklo_epi16(ab_lo, c_lo), w[0]);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_unpackhi_epi16(ab_lo, c_lo), w[1]);
                    acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_unpacklo_epi16(ab_hi, c_hi), w[2]);
                    acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_unpackhi_epi16(ab_hi, c_hi), w[3]);
                }
                let q: [__m512i; 4] = std::array::from_fn(|k| {
                    let v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[k]), sc[k]);
                    let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                    _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(v, magic)), unbias)
                });
                // Within each 128-bit lane the packs undo the unpacks' interleaving.
                let w01 = _mm512_packs_epi32(q[0], q[1]);
                let w23 = _mm512_packs_epi32(q[2], q[3]);
                let b = if signed {
                    _mm512_packs_epi16(w01, w23)
                } else {
                    _mm512_packus_epi16(w01, w23)
                };
                let o = out.add(i * c + cb);
                if cw == 64 {
                    _mm512_storeu_si512(o as *mut _, b);
                } else {
                    _mm512_mask_storeu_epi8(o as *mut i8, mask, b);
                }
            }
        }
    }
}

/// `x` unchanged, after the compiler had to hold it in a register (see [`in_register`]).
#[inline(always)]
fn in_register_m128(mut x: __m128i) -> __m128i {
    // SAFETY: an empty asm block that neither reads memory nor changes the value.
    unsafe {
        std::arch::asm!("/* {0} */", inout(xmm_reg) x, options(pure, nomem, nostack, preserves_flags));
    }
    x
}

/// 6x16 int8 tile with AVX-VNNI (`vpdpbusd` on ymm): 12 ymm accumulators.
///
/// # Safety
/// The CPU must support AVX2 and AVX-VNNI; `a` must be valid for `groups * 24` reads, `b`
/// for `groups * 64` reads and `acc` for 96 i32 writes.
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn qtile_avxvnni(groups: usize, a: *const u8, b: *const u8, acc: *mut i32) {
    const MR: usize = 6;
    let mut r = [[_mm256_setzero_si256(); 2]; MR];
    for g in 0..groups {
        // SAFETY: g < groups, so the 64 bytes at b + g*64 and the 24 at a + g*24 are in
        // bounds (the caller's lengths).
        unsafe {
            let b0 = _mm256_loadu_si256(b.add(g * 64) as *const __m256i);
            let b1 = _mm256_loadu_si256(b.add(g * 64 + 32) as *const __m256i);
            let ar = a.add(g * 24) as *const i32;
            for (i, ri) in r.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(ar.add(i).read_unaligned());
                ri[0] = _mm256_dpbusd_avx_epi32(ri[0], x, b0);
                ri[1] = _mm256_dpbusd_avx_epi32(ri[1], x, b1);
            }
        }
    }
    for (i, ri) in r.iter().enumerate() {
        // SAFETY: row i of the 6x16 accumulator is acc[i*16 .. i*16+16] (caller's length).
        unsafe {
            _mm256_storeu_si256(acc.add(i * 16) as *mut __m256i, ri[0]);
            _mm256_storeu_si256(acc.add(i * 16 + 8) as *mut __m256i, ri[1]);
        }
    }
}

/// Runs [`crate::gemv`] with `variant` (groups last to first when `reverse`) when it is an
/// x86 SIMD variant this CPU has; returns `false` (touching nothing) otherwise. Sizes were
/// checked by the caller.
pub(crate) fn gemv(
    variant: Variant,
    w: &PackedGemv,
    x: &[f32],
    y: &mut [f32],
    add: GemvAdd<'_>,
    reverse: bool,
) -> bool {
    match variant {
        Variant::Avx512 if is_x86_feature_detected!("avx512f") => {
            // SAFETY: AVX-512F was detected on this CPU just above.
            unsafe { gemv_avx512(w, x, y, add, reverse) };
            true
        }
        Variant::Avx2 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            unsafe { gemv_avx2(w, x, y, add, reverse) };
            true
        }
        _ => false,
    }
}

/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn gemv_avx512(w: &PackedGemv, x: &[f32], y: &mut [f32], add: GemvAdd<'_>, reverse: bool) {
    gemv_drive(w, x, y, add, reverse, |panels, n, x, acc| {
        let k = x.len();
        assert!((1..=GROUP).contains(&n) && panels.len() >= n * k * PANEL);
        // SAFETY: compiled for AVX-512F and reached only when the CPU has it; `panels` holds
        // n panels of k * 16 floats and `x` k floats (checked above).
        unsafe { gemv_group_avx512(panels.as_ptr(), n, k, x.as_ptr(), acc) }
    });
}

/// Row sums of `n` (1..=4) interleaved panels (`[k][n][16]` floats at `p`) times `x`: with four panels, 8 zmm
/// accumulators (even and odd columns apart); fewer, 4 per panel (columns mod 4).
///
/// # Safety
/// The CPU must support AVX-512F; `p` must be valid for `n * k * 16` reads, `x` for `k`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gemv_group_avx512(
    p: *const f32,
    n: usize,
    k: usize,
    x: *const f32,
    acc: &mut [f32; GROUP_ROWS],
) {
    // Column stride: the n panels of a group are interleaved column by column.
    let cs = n * PANEL;
    let z = _mm512_setzero_ps();
    // SAFETY (all blocks below): every column read is c < k of a panel q < n, so within the
    // caller's n * k * 16 floats; x reads are below k; acc holds 4 * 16 floats.
    if n == GROUP {
        let mut a = [[z; GROUP]; 2];
        let mut c = 0;
        while c + 2 <= k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                let x0 = _mm512_set1_ps(*x.add(c));
                let x1 = _mm512_set1_ps(*x.add(c + 1));
                let [a0, a1] = &mut a;
                for (q, (a0q, a1q)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                    let pq = p.add(c * GROUP_ROWS + q * PANEL);
                    *a0q = _mm512_fmadd_ps(x0, _mm512_loadu_ps(pq), *a0q);
                    *a1q = _mm512_fmadd_ps(x1, _mm512_loadu_ps(pq.add(GROUP_ROWS)), *a1q);
                }
            }
            c += 2;
        }
        if c < k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                let x0 = _mm512_set1_ps(*x.add(c));
                for (q, a0q) in a[0].iter_mut().enumerate() {
                    let pq = p.add(c * GROUP_ROWS + q * PANEL);
                    *a0q = _mm512_fmadd_ps(x0, _mm512_loadu_ps(pq), *a0q);
                }
            }
        }
        for (q, (a0q, a1q)) in a[0].iter().zip(&a[1]).enumerate() {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(q * PANEL), _mm512_add_ps(*a0q, *a1q)) };
        }
        return;
    }
    for q in 0..n {
        // SAFETY: within the bounds noted at the top of this function.
        let pq = unsafe { p.add(q * PANEL) };
        let mut a = [z; 4];
        let mut c = 0;
        while c + 4 <= k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                for (u, au) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(c + u));
                    *au = _mm512_fmadd_ps(xv, _mm512_loadu_ps(pq.add((c + u) * cs)), *au);
                }
            }
            c += 4;
        }
        while c < k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                let xv = _mm512_set1_ps(*x.add(c));
                a[0] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(pq.add(c * cs)), a[0]);
            }
            c += 1;
        }
        let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        // SAFETY: within the bounds noted at the top of this function.
        unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(q * PANEL), s) };
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_avx2(w: &PackedGemv, x: &[f32], y: &mut [f32], add: GemvAdd<'_>, reverse: bool) {
    gemv_drive(w, x, y, add, reverse, |panels, n, x, acc| {
        let k = x.len();
        assert!((1..=GROUP).contains(&n) && panels.len() >= n * k * PANEL);
        // SAFETY: compiled for AVX2+FMA and reached only when the CPU has them; `panels`
        // holds n panels of k * 16 floats and `x` k floats (checked above).
        unsafe { gemv_group_avx2(panels.as_ptr(), n, k, x.as_ptr(), acc) }
    });
}

/// Row sums of `n` (1..=4) interleaved panels (`[k][n][16]` floats at `p`) times `x`: two ymm per panel;
/// with four panels 8 accumulators, fewer panels also split even and odd columns.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `p` must be valid for `n * k * 16` reads, `x` for `k`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn gemv_group_avx2(
    p: *const f32,
    n: usize,
    k: usize,
    x: *const f32,
    acc: &mut [f32; GROUP_ROWS],
) {
    // Column stride: the n panels of a group are interleaved column by column.
    let cs = n * PANEL;
    let z = _mm256_setzero_ps();
    // SAFETY (all blocks below): every column read is c < k of a panel q < n, so within the
    // caller's n * k * 16 floats; x reads are below k; acc holds 4 * 16 floats.
    if n == GROUP {
        let mut a = [[z; 2]; GROUP];
        for c in 0..k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                let xv = _mm256_broadcast_ss(&*x.add(c));
                for (q, aq) in a.iter_mut().enumerate() {
                    let pq = p.add(c * GROUP_ROWS + q * PANEL);
                    aq[0] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pq), aq[0]);
                    aq[1] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pq.add(8)), aq[1]);
                }
            }
        }
        for (q, aq) in a.iter().enumerate() {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                _mm256_storeu_ps(acc.as_mut_ptr().add(q * PANEL), aq[0]);
                _mm256_storeu_ps(acc.as_mut_ptr().add(q * PANEL + 8), aq[1]);
            }
        }
        return;
    }
    for q in 0..n {
        // SAFETY: within the bounds noted at the top of this function.
        let pq = unsafe { p.add(q * PANEL) };
        let mut a = [[z; 2]; 2];
        let mut c = 0;
        while c + 2 <= k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                for (u, au) in a.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*x.add(c + u));
                    let pc = pq.add((c + u) * cs);
                    au[0] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pc), au[0]);
                    au[1] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pc.add(8)), au[1]);
                }
            }
            c += 2;
        }
        if c < k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                let xv = _mm256_broadcast_ss(&*x.add(c));
                let pc = pq.add(c * cs);
                a[0][0] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pc), a[0][0]);
                a[0][1] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pc.add(8)), a[0][1]);
            }
        }
        // SAFETY: within the bounds noted at the top of this function.
        unsafe {
            _mm256_storeu_ps(
                acc.as_mut_ptr().add(q * PANEL),
                _mm256_add_ps(a[0][0], a[1][0]),
            );
            _mm256_storeu_ps(
                acc.as_mut_ptr().add(q * PANEL + 8),
                _mm256_add_ps(a[0][1], a[1][1]),
            );
        }
    }
}

/// Runs [`crate::gemv::gemv_many`] with `variant` when it is AVX-512F and this CPU has it;
/// returns `false` (touching nothing) otherwise. Sizes were checked by the caller.
pub(crate) fn gemv_many(
    variant: Variant,
    w: &PackedGemv,
    n: usize,
    xs: &[f32],
    ys: &mut [f32],
    ldy: usize,
    bias: Option<&[f32]>,
) -> bool {
    match variant {
        Variant::Avx512 if is_x86_feature_detected!("avx512f") => {
            // SAFETY: AVX-512F was detected on this CPU just above.
            unsafe { gemv_many_avx512(w, n, xs, ys, ldy, bias) };
            true
        }
        _ => false,
    }
}

/// `ys[t * ldy..][..m] = W xs[t] + bias` group by group: full groups take vectors six, then
/// two, then one at a time through [`gemv_many_group_avx512`]; a partial last group runs
/// [`gemv_group_avx512`] per vector.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn gemv_many_avx512(
    w: &PackedGemv,
    n: usize,
    xs: &[f32],
    ys: &mut [f32],
    ldy: usize,
    bias: Option<&[f32]>,
) {
    let (m, k, np) = (w.rows(), w.cols(), w.panels());
    assert!(xs.len() >= n * k && ldy >= m && bias.is_none_or(|b| b.len() >= m));
    let data = w.data();
    let mut store = |t: usize, r0: usize, acc: &[f32; GROUP_ROWS]| {
        let rows = (m - r0).min(GROUP_ROWS);
        let y = &mut ys[t * ldy + r0..t * ldy + r0 + rows];
        match bias {
            Some(b) => y
                .iter_mut()
                .zip(&acc[..rows])
                .zip(&b[r0..r0 + rows])
                .for_each(|((v, &a), &b)| *v = a + b),
            None => y.copy_from_slice(&acc[..rows]),
        }
    };
    for g in 0..np.div_ceil(GROUP) {
        let (p0, r0) = (g * GROUP, g * GROUP_ROWS);
        let npan = (np - p0).min(GROUP);
        let panels = &data[p0 * k * PANEL..(p0 + npan) * k * PANEL];
        let mut t = 0;
        if npan == GROUP {
            let mut put = |t: usize, acc: &[f32; GROUP_ROWS]| store(t, r0, acc);
            // SAFETY: AVX-512F (this function's feature); `panels` holds the full group's
            // 4 * k * 16 floats and `xs` n * k floats (asserted above).
            unsafe {
                t = gemv_many_batches::<6>(panels, k, xs, n, t, &mut put);
                t = gemv_many_batches::<2>(panels, k, xs, n, t, &mut put);
            }
        }
        let mut acc = [0f32; GROUP_ROWS];
        while t < n {
            // SAFETY: AVX-512F; `panels` holds npan (1..=4) panels of k * 16 floats and
            // vector t lies within `xs`.
            unsafe { gemv_group_avx512(panels.as_ptr(), npan, k, xs[t * k..].as_ptr(), &mut acc) };
            store(t, r0, &acc);
            t += 1;
        }
    }
}

/// Vectors `t..` of `xs` against one full group (`panels`, `4 * k * 16` floats) `T` at a time
/// while `T` are left, each vector's 64 row sums handed to `put`; returns the first vector
/// not done.
///
/// # Safety
/// The CPU must support AVX-512F; `panels` holds `4 * k * 16` floats, `xs` `n * k`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gemv_many_batches<const T: usize>(
    panels: &[f32],
    k: usize,
    xs: &[f32],
    n: usize,
    mut t: usize,
    put: &mut impl FnMut(usize, &[f32; GROUP_ROWS]),
) -> usize {
    assert!(panels.len() >= GROUP * k * PANEL && xs.len() >= n * k);
    let mut acc = [[0f32; GROUP_ROWS]; T];
    while t + T <= n {
        // SAFETY: AVX-512F (this function's feature); the group's floats and the T vectors
        // t..t + T lie within the slices (asserted above).
        unsafe { gemv_many_group_avx512::<T>(panels.as_ptr(), k, xs[t * k..].as_ptr(), &mut acc) };
        for (j, a) in acc.iter().enumerate() {
            put(t + j, a);
        }
        t += T;
    }
    t
}

/// Row sums of one full group (four interleaved panels, `[k][4][16]` floats at `p`) times
/// `T` vectors (`T x k` floats at `x`, row-major): `4 * T` zmm accumulators, each column of
/// the group loaded once for all `T` vectors.
///
/// # Safety
/// The CPU must support AVX-512F; `p` must be valid for `4 * k * 16` reads, `x` for `T * k`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gemv_many_group_avx512<const T: usize>(
    p: *const f32,
    k: usize,
    x: *const f32,
    out: &mut [[f32; GROUP_ROWS]; T],
) {
    let z = _mm512_setzero_ps();
    let mut a = [[z; GROUP]; T];
    for c in 0..k {
        // SAFETY: column c < k of the four panels and element c of each of the T vectors lie
        // within the caller's bounds.
        unsafe {
            let pc = p.add(c * GROUP_ROWS);
            let wq = [
                _mm512_loadu_ps(pc),
                _mm512_loadu_ps(pc.add(PANEL)),
                _mm512_loadu_ps(pc.add(2 * PANEL)),
                _mm512_loadu_ps(pc.add(3 * PANEL)),
            ];
            for (j, aj) in a.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(j * k + c));
                for (q, ajq) in aj.iter_mut().enumerate() {
                    *ajq = _mm512_fmadd_ps(xv, wq[q], *ajq);
                }
            }
        }
    }
    for (aj, oj) in a.iter().zip(out.iter_mut()) {
        for (q, ajq) in aj.iter().enumerate() {
            // SAFETY: oj holds 4 * 16 floats.
            unsafe { _mm512_storeu_ps(oj.as_mut_ptr().add(q * PANEL), *ajq) };
        }
    }
}
