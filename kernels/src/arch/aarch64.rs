//! aarch64 kernels: a NEON sgemm micro-kernel (8x12 tile, 24 q accumulators, `fmla` by
//! lane) and int8 register tiles for [`crate::qgemm`] with `sdot` (dotprod, 8x12) and `smmla`
//! (i8mm, 8x8); the [`crate::gemv`] panel kernel (64 rows a call, 16 q accumulators).
//! Packing and the C update are the safe code in `gemm::packed_with` and `qgemm`; only the
//! register tiles are unsafe.
//!
//! The `sdot` / `smmla` intrinsics are not stable Rust yet, so those two instructions are
//! written as one-instruction `asm!` blocks on register operands (the compiler still
//! allocates registers and does the loads).
//!
//! Soundness: the `#[target_feature]` functions are reached only through [`sgemm`] and
//! [`qtile`], which run a variant only after `is_aarch64_feature_detected!` said the CPU has
//! it, and which check the panel lengths before the raw-pointer loops.

#![allow(unsafe_code)]

use std::arch::aarch64::*;
use std::arch::asm;

use crate::dispatch::Variant;
use crate::gemm::{axpy_rows, packed_with, Blocking, MatRef, MR as PORTABLE_MR};
use crate::gemv::{drive_ordered as gemv_drive, GemvAdd, PackedGemv, GROUP, GROUP_ROWS, PANEL};

const NEON_MR: usize = 8;
const NEON_NR: usize = 12;

/// Runs `alpha * A * B` into C with `variant` when it is the NEON variant and the CPU has
/// it; returns `false` (touching nothing) otherwise. Sizes are already checked, m, n, k > 0.
pub(crate) fn sgemm(
    variant: Variant,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
) -> bool {
    match variant {
        Variant::Neon if std::arch::is_aarch64_feature_detected!("neon") => {
            // SAFETY: NEON was detected on this CPU just above.
            unsafe { sgemm_neon(alpha, a, b, c, ldc) };
            true
        }
        _ => false,
    }
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn sgemm_neon(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize) {
    let (k, n) = (a.cols, b.cols);
    if a.rows < PORTABLE_MR {
        axpy_rows(alpha, a, b, k, n, c, ldc);
        return;
    }
    let blk = Blocking {
        kc: 256,
        mc: 96,
        nc: 2400,
    };
    packed_with::<NEON_MR, NEON_NR, _>(blk, alpha, a, b, c, ldc, |ap, bp, acc| {
        let kc = ap.len() / NEON_MR;
        assert!(bp.len() >= kc * NEON_NR);
        // SAFETY: this closure runs inside a function compiled for NEON, called only when the
        // CPU has it; the panels hold kc*MR and kc*NR floats (checked above).
        unsafe { tile_neon(kc, ap.as_ptr(), bp.as_ptr(), acc) }
    });
}

/// `acc[i][j] = sum_p a[p*8 + i] * b[p*12 + j]` over `kc` steps.
///
/// # Safety
/// The CPU must support NEON; `a` must be valid for `kc * 8` reads and `b` for `kc * 12`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn tile_neon(kc: usize, a: *const f32, b: *const f32, acc: &mut [[f32; NEON_NR]; NEON_MR]) {
    let z = vdupq_n_f32(0.0);
    let mut r = [[z; 3]; NEON_MR];
    macro_rules! row {
        ($r:expr, $av:expr, $lane:literal, $b:expr) => {
            $r[0] = vfmaq_laneq_f32::<$lane>($r[0], $b[0], $av);
            $r[1] = vfmaq_laneq_f32::<$lane>($r[1], $b[1], $av);
            $r[2] = vfmaq_laneq_f32::<$lane>($r[2], $b[2], $av);
        };
    }
    for p in 0..kc {
        // SAFETY: p < kc, so p*12 + 11 < kc*12 and p*8 + 7 < kc*8 (the caller's bounds).
        unsafe {
            let bb = b.add(p * NEON_NR);
            let bv = [vld1q_f32(bb), vld1q_f32(bb.add(4)), vld1q_f32(bb.add(8))];
            let a0 = vld1q_f32(a.add(p * NEON_MR));
            let a1 = vld1q_f32(a.add(p * NEON_MR + 4));
            row!(r[0], a0, 0, bv);
            row!(r[1], a0, 1, bv);
            row!(r[2], a0, 2, bv);
            row!(r[3], a0, 3, bv);
            row!(r[4], a1, 0, bv);
            row!(r[5], a1, 1, bv);
            row!(r[6], a1, 2, bv);
            row!(r[7], a1, 3, bv);
        }
    }
    for (ri, out) in r.iter().zip(acc.iter_mut()) {
        // SAFETY: each output row holds 12 floats, three 4-float stores.
        unsafe {
            vst1q_f32(out.as_mut_ptr(), ri[0]);
            vst1q_f32(out.as_mut_ptr().add(4), ri[1]);
            vst1q_f32(out.as_mut_ptr().add(8), ri[2]);
        }
    }
}

/// Peak-FMA loop for NEON: `iters` rounds of 24 independent 4-lane FMAs.
pub(crate) fn fma_peak(variant: Variant, iters: usize, x: f32) -> Option<(f64, f32)> {
    match variant {
        Variant::Neon if std::arch::is_aarch64_feature_detected!("neon") => {
            // SAFETY: NEON was detected on this CPU just above.
            let s = unsafe { fma_peak_neon(iters, x) };
            Some(((iters * 24 * 4 * 2) as f64, s))
        }
        _ => None,
    }
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn fma_peak_neon(iters: usize, x: f32) -> f32 {
    let m = vdupq_n_f32(x);
    let add = vdupq_n_f32(1e-7);
    let mut r = [vdupq_n_f32(0.5); 24];
    for _ in 0..iters {
        for v in r.iter_mut() {
            *v = vfmaq_f32(add, *v, m);
        }
    }
    let mut s = vdupq_n_f32(0.0);
    for v in r {
        s = vaddq_f32(s, v);
    }
    vaddvq_f32(s)
}

/// Runs one int8 register tile of [`crate::qgemm`] with `variant` when it is an aarch64 int8
/// variant this CPU has (A and B as i8). Returns `false` (touching nothing) otherwise or for
/// short panels.
pub(crate) fn qtile(variant: Variant, groups: usize, a: &[u8], b: &[u8], acc: &mut [i32]) -> bool {
    let t = crate::qgemm::tile_of(variant);
    if a.len() < groups * t.mr * t.ku || b.len() < groups * t.nr * t.ku || acc.len() < t.mr * t.nr {
        return false;
    }
    use std::arch::is_aarch64_feature_detected as has;
    match variant {
        Variant::Dotprod if has!("neon") && has!("dotprod") => {
            // SAFETY: NEON and dotprod were detected just above; the panel and accumulator
            // lengths were checked against the 8x12 tile (4 bytes per group) just above.
            unsafe { qtile_dotprod(groups, a.as_ptr(), b.as_ptr(), acc.as_mut_ptr()) };
            true
        }
        Variant::I8mm if has!("neon") && has!("i8mm") => {
            // SAFETY: NEON and i8mm were detected just above; the panel and accumulator
            // lengths were checked against the 8x8 tile (8 bytes per group) just above.
            unsafe { qtile_i8mm(groups, a.as_ptr(), b.as_ptr(), acc.as_mut_ptr()) };
            true
        }
        _ => false,
    }
}

/// `acc += sdot(b, a[lane])`: each i32 lane j of `acc` gains the dot product of the 4 bytes
/// j of `b` with the 4 bytes `lane` of `a`.
macro_rules! sdot {
    ($acc:expr, $b:expr, $a:expr, $lane:literal) => {
        // SAFETY: a register-only instruction of the dotprod extension, which the enclosing
        // function requires (its caller detected it).
        unsafe {
            asm!(
                ".arch_extension dotprod",
                concat!("sdot {0:v}.4s, {1:v}.16b, {2:v}.4b[", $lane, "]"),
                inout(vreg) $acc,
                in(vreg) $b,
                in(vreg) $a,
                options(pure, nomem, nostack, preserves_flags)
            )
        }
    };
}

/// 8x12 int8 tile with `sdot` by lane: per group of 4 depths, A is 8 rows x 4 bytes (two q
/// registers, row i in lane i % 4) and B 12 columns x 4 bytes (three q registers).
///
/// # Safety
/// The CPU must support NEON and dotprod; `a` must be valid for `groups * 32` reads, `b` for
/// `groups * 48` reads and `acc` for 96 i32 writes.
#[target_feature(enable = "neon,dotprod")]
unsafe fn qtile_dotprod(groups: usize, a: *const u8, b: *const u8, acc: *mut i32) {
    let z = vdupq_n_s32(0);
    let mut r = [[z; 3]; 8];
    macro_rules! row {
        ($r:expr, $av:expr, $lane:literal, $b:expr) => {
            sdot!($r[0], $b[0], $av, $lane);
            sdot!($r[1], $b[1], $av, $lane);
            sdot!($r[2], $b[2], $av, $lane);
        };
    }
    for g in 0..groups {
        // SAFETY: g < groups, so the 48 bytes at b + g*48 and the 32 at a + g*32 are in
        // bounds (the caller's lengths).
        let (a0, a1, bv) = unsafe {
            let bb = b.add(g * 48) as *const i8;
            let aa = a.add(g * 32) as *const i8;
            (
                vld1q_s8(aa),
                vld1q_s8(aa.add(16)),
                [vld1q_s8(bb), vld1q_s8(bb.add(16)), vld1q_s8(bb.add(32))],
            )
        };
        row!(r[0], a0, "0", bv);
        row!(r[1], a0, "1", bv);
        row!(r[2], a0, "2", bv);
        row!(r[3], a0, "3", bv);
        row!(r[4], a1, "0", bv);
        row!(r[5], a1, "1", bv);
        row!(r[6], a1, "2", bv);
        row!(r[7], a1, "3", bv);
    }
    for (i, ri) in r.iter().enumerate() {
        // SAFETY: row i of the 8x12 accumulator is acc[i*12 .. i*12+12] (caller's length).
        unsafe {
            vst1q_s32(acc.add(i * 12), ri[0]);
            vst1q_s32(acc.add(i * 12 + 4), ri[1]);
            vst1q_s32(acc.add(i * 12 + 8), ri[2]);
        }
    }
}

/// 8x8 int8 tile with `smmla`: per group of 8 depths, A is 8 rows x 8 bytes (four q
/// registers, a pair of rows each) and B 8 columns x 8 bytes (four q registers, a pair of
/// columns each); accumulator (ip, jp) holds the 2x2 block `[r0c0, r0c1, r1c0, r1c1]`.
///
/// # Safety
/// The CPU must support NEON and i8mm; `a` and `b` must be valid for `groups * 64` reads and
/// `acc` for 64 i32 writes.
#[target_feature(enable = "neon,i8mm")]
unsafe fn qtile_i8mm(groups: usize, a: *const u8, b: *const u8, acc: *mut i32) {
    let z = vdupq_n_s32(0);
    let mut r = [[z; 4]; 4];
    for g in 0..groups {
        // SAFETY: g < groups, so the 64 bytes at a + g*64 and at b + g*64 are in bounds (the
        // caller's lengths).
        let (av, bv) = unsafe {
            let aa = a.add(g * 64) as *const i8;
            let bb = b.add(g * 64) as *const i8;
            (
                [
                    vld1q_s8(aa),
                    vld1q_s8(aa.add(16)),
                    vld1q_s8(aa.add(32)),
                    vld1q_s8(aa.add(48)),
                ],
                [
                    vld1q_s8(bb),
                    vld1q_s8(bb.add(16)),
                    vld1q_s8(bb.add(32)),
                    vld1q_s8(bb.add(48)),
                ],
            )
        };
        for (ri, &x) in r.iter_mut().zip(&av) {
            for (rij, &y) in ri.iter_mut().zip(&bv) {
                // SAFETY: a register-only instruction of the i8mm extension, which this
                // function requires (its caller detected it).
                unsafe {
                    asm!(
                        ".arch_extension i8mm",
                        "smmla {0:v}.4s, {1:v}.16b, {2:v}.16b",
                        inout(vreg) *rij,
                        in(vreg) x,
                        in(vreg) y,
                        options(pure, nomem, nostack, preserves_flags)
                    )
                };
            }
        }
    }
    for (ip, ri) in r.iter().enumerate() {
        for (jp, rij) in ri.iter().enumerate() {
            let mut v = [0i32; 4];
            // SAFETY: `v` holds 4 i32.
            unsafe { vst1q_s32(v.as_mut_ptr(), *rij) };
            // SAFETY: rows 2ip, 2ip+1 and columns 2jp, 2jp+1 of the 8x8 accumulator are
            // below 64 (caller's length).
            unsafe {
                *acc.add(2 * ip * 8 + 2 * jp) = v[0];
                *acc.add(2 * ip * 8 + 2 * jp + 1) = v[1];
                *acc.add((2 * ip + 1) * 8 + 2 * jp) = v[2];
                *acc.add((2 * ip + 1) * 8 + 2 * jp + 1) = v[3];
            }
        }
    }
}

/// Runs [`crate::gemv`] with `variant` when it is the NEON variant and the CPU has it;
/// returns `false` (touching nothing) otherwise. Sizes were checked by the caller.
pub(crate) fn gemv(
    variant: Variant,
    w: &PackedGemv,
    x: &[f32],
    y: &mut [f32],
    add: GemvAdd<'_>,
    reverse: bool,
) -> bool {
    match variant {
        Variant::Neon if std::arch::is_aarch64_feature_detected!("neon") => {
            // SAFETY: NEON was detected on this CPU just above.
            unsafe { gemv_neon(w, x, y, add, reverse) };
            true
        }
        _ => false,
    }
}

/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn gemv_neon(w: &PackedGemv, x: &[f32], y: &mut [f32], add: GemvAdd<'_>, reverse: bool) {
    gemv_drive(w, x, y, add, reverse, |panels, n, x, acc| {
        let k = x.len();
        assert!((1..=GROUP).contains(&n) && panels.len() >= n * k * PANEL);
        // SAFETY: compiled for NEON and reached only when the CPU has it; `panels` holds n
        // panels of k * 16 floats and `x` k floats (checked above).
        unsafe { gemv_group_neon(panels.as_ptr(), n, k, x.as_ptr(), acc) }
    });
}

/// Row sums of `n` (1..=4) interleaved panels (`[k][n][16]` floats at `p`) times `x`: four q registers per
/// panel (16 accumulators for four panels); fewer panels also split even and odd columns.
///
/// # Safety
/// The CPU must support NEON; `p` must be valid for `n * k * 16` reads, `x` for `k`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn gemv_group_neon(
    p: *const f32,
    n: usize,
    k: usize,
    x: *const f32,
    acc: &mut [f32; GROUP_ROWS],
) {
    // Column stride: the n panels of a group are interleaved column by column.
    let cs = n * PANEL;
    let z = vdupq_n_f32(0.0);
    // SAFETY (all blocks below): every column read is c < k of a panel q < n, so within the
    // caller's n * k * 16 floats; x reads are below k; acc holds 4 * 16 floats.
    if n == GROUP {
        let mut a = [[z; 4]; GROUP];
        for c in 0..k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                let xv = *x.add(c);
                for (q, aq) in a.iter_mut().enumerate() {
                    let pq = p.add(c * GROUP_ROWS + q * PANEL);
                    for (l, al) in aq.iter_mut().enumerate() {
                        *al = vfmaq_n_f32(*al, vld1q_f32(pq.add(4 * l)), xv);
                    }
                }
            }
        }
        for (q, aq) in a.iter().enumerate() {
            for (l, al) in aq.iter().enumerate() {
                // SAFETY: within the bounds noted at the top of this function.
                unsafe { vst1q_f32(acc.as_mut_ptr().add(q * PANEL + 4 * l), *al) };
            }
        }
        return;
    }
    for q in 0..n {
        // SAFETY: within the bounds noted at the top of this function.
        let pq = unsafe { p.add(q * PANEL) };
        let mut a = [[z; 4]; 2];
        let mut c = 0;
        while c + 2 <= k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                for (u, au) in a.iter_mut().enumerate() {
                    let xv = *x.add(c + u);
                    let pc = pq.add((c + u) * cs);
                    for (l, al) in au.iter_mut().enumerate() {
                        *al = vfmaq_n_f32(*al, vld1q_f32(pc.add(4 * l)), xv);
                    }
                }
            }
            c += 2;
        }
        if c < k {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                let xv = *x.add(c);
                let pc = pq.add(c * cs);
                for (l, al) in a[0].iter_mut().enumerate() {
                    *al = vfmaq_n_f32(*al, vld1q_f32(pc.add(4 * l)), xv);
                }
            }
        }
        for (l, (a0l, a1l)) in a[0].iter().zip(&a[1]).enumerate() {
            // SAFETY: within the bounds noted at the top of this function.
            unsafe {
                vst1q_f32(
                    acc.as_mut_ptr().add(q * PANEL + 4 * l),
                    vaddq_f32(*a0l, *a1l),
                )
            };
        }
    }
}
