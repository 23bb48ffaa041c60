//! Recurrent cell math: one fused pass over the hidden vector per step.
//!
//! [`lstm_cell`] takes an LSTM step's gate pre-activations as two addends (the input
//! projection with the biases and the recurrent product, or a joined product and the
//! biases), adds the peepholes, clips, applies sigmoid / tanh and updates `c` and `h`, all in
//! one loop over the hidden units: no gate slice is written back and read again. The loop is
//! safe Rust built from inline scalar gate functions (a cheaper exp than [`crate::vmath`]'s,
//! still within 5e-7 of sigmoid and tanh); [`lstm_cell`] runs it compiled
//! for the process-wide variant (AVX-512F / AVX2+FMA wrappers in `simd.rs`; on aarch64 NEON
//! is the baseline, so the portable build is already vectorized).

use crate::dispatch::{self, Variant};

/// `e^x` for the cell's gates: `2^n * p(r)` as in [`crate::vmath::exp1`], but with a degree-5
/// polynomial fitted for relative error on |r| <= ln2/2 (below 2.2e-7 in f32, against 5e-9
/// for exp1's degree 7) and one scale: inputs are clamped to [-87, 87], so `n` stays in
/// [-126, 126] and `2^n` is one normal float. A gate needs no more: sigmoid and tanh built
/// on it are within 5e-7 absolute of the f64 functions (tested), well inside the 1e-5 the
/// cell's tests and the model agreement allow.
#[inline(always)]
fn exp_gate(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    const C: [f32; 6] = [
        1.000_000_1,
        0.999_999_7,
        0.499_988_94,
        0.166_675_75,
        0.041_915_383,
        0.008_297_651,
    ];
    let x = x.clamp(-87.0, 87.0);
    let t = x * LOG2E + ROUND;
    let nf = t - ROUND;
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let p = C[0] + r * (C[1] + r * (C[2] + r * (C[3] + r * (C[4] + r * C[5]))));
    // n = nf, read from t's low mantissa bits (see vmath::exp1).
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits(((n + 127) as u32) << 23)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid1(x: f32) -> f32 {
    1.0 / (1.0 + exp_gate(-x))
}

/// `tanh x = 2 sigmoid(2x) - 1`: one exponential and one division, no branch; near 0 the
/// subtraction leaves an absolute error of a few ulp of 1, which is what `h` and `c` need.
#[inline(always)]
fn tanh1(x: f32) -> f32 {
    2.0 / (1.0 + exp_gate(-2.0 * x)) - 1.0
}

/// One LSTM step with ONNX's default activations (sigmoid, tanh, tanh) and gate order i, o,
/// f, c: `a + b` (each `4 * hid`) are the pre-activations, `p` the peepholes (`3 * hid`: i, o,
/// f), `clip` bounds every pre-activation, `input_forget` couples `f = 1 - i`. `c` and `h`
/// (`hid` each) are the state, updated in place. Returns `false` (touching nothing) when the
/// lengths disagree.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell(
    a: &[f32],
    b: &[f32],
    p: &[f32],
    clip: Option<f32>,
    input_forget: bool,
    c: &mut [f32],
    h: &mut [f32],
) -> bool {
    lstm_cell_with(dispatch::selected(), a, b, p, clip, input_forget, c, h)
}

/// [`lstm_cell`] with a chosen variant; one this CPU lacks runs the portable build.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_with(
    variant: Variant,
    a: &[f32],
    b: &[f32],
    p: &[f32],
    clip: Option<f32>,
    input_forget: bool,
    c: &mut [f32],
    h: &mut [f32],
) -> bool {
    let block = c.len();
    lstm_cell_blocked_with(variant, a, b, p, clip, input_forget, block, c, h)
}

/// [`lstm_cell`] on gates laid out in blocks of `block` units: units `u0..u0 + n` (`u0` a
/// multiple of `block`, `n = min(block, hid - u0)`) take their gates from `a` and `b` at
/// `4 * u0 + g * n` (g = i, o, f, c) and their peepholes from `p` at `3 * u0 + g * n`; `c`
/// and `h` stay plain. `block = hid` is [`lstm_cell`]'s layout. So the products of several
/// row chunks (each chunk's gate rows stacked) feed one call. Returns `false` (touching
/// nothing) when the lengths disagree or `block` is 0 with units to update.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_blocked(
    a: &[f32],
    b: &[f32],
    p: &[f32],
    clip: Option<f32>,
    input_forget: bool,
    block: usize,
    c: &mut [f32],
    h: &mut [f32],
) -> bool {
    lstm_cell_blocked_with(
        dispatch::selected(),
        a,
        b,
        p,
        clip,
        input_forget,
        block,
        c,
        h,
    )
}

/// [`lstm_cell_blocked`] with a chosen variant; one this CPU lacks runs the portable build.
#[allow(clippy::too_many_arguments)]
pub fn lstm_cell_blocked_with(
    variant: Variant,
    a: &[f32],
    b: &[f32],
    p: &[f32],
    clip: Option<f32>,
    input_forget: bool,
    block: usize,
    c: &mut [f32],
    h: &mut [f32],
) -> bool {
    let hid = c.len();
    if h.len() != hid || a.len() != 4 * hid || b.len() != 4 * hid || p.len() != 3 * hid {
        return false;
    }
    if hid == 0 {
        return true;
    }
    if block == 0 {
        return false;
    }
    // NaN or negative clips would make `clamp` panic; ONNX clips are positive.
    let cl = clip.filter(|v| *v >= 0.0).unwrap_or(f32::INFINITY);
    let args = CellArgs {
        a,
        b,
        p,
        lo: -cl,
        hi: cl,
        input_forget,
        block,
    };
    #[cfg(target_arch = "x86_64")]
    if crate::simd::lstm_cell(variant, &args, c, h) {
        return true;
    }
    let _ = variant;
    lstm_cell_loop(&args, c, h);
    true
}

/// The inputs of [`lstm_cell_loop`], lengths already checked.
pub(crate) struct CellArgs<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub p: &'a [f32],
    pub lo: f32,
    pub hi: f32,
    pub input_forget: bool,
    /// Units per gate block (see [`lstm_cell_blocked`]), at least 1.
    pub block: usize,
}

/// The fused step (see [`lstm_cell_blocked`]); inlined into each variant's entry point.
#[inline(always)]
pub(crate) fn lstm_cell_loop(args: &CellArgs<'_>, c: &mut [f32], h: &mut [f32]) {
    let hid = c.len();
    let blk = args.block.max(1);
    for u0 in (0..hid).step_by(blk) {
        let n = blk.min(hid - u0);
        let (a, b) = (&args.a[4 * u0..4 * (u0 + n)], &args.b[4 * u0..4 * (u0 + n)]);
        let p = &args.p[3 * u0..3 * (u0 + n)];
        cell_block(args, a, b, p, &mut c[u0..u0 + n], &mut h[u0..u0 + n]);
    }
}

/// One block of [`lstm_cell_loop`]: `n` units with gate slices `[4][n]` and peepholes `[3][n]`.
#[inline(always)]
fn cell_block(args: &CellArgs<'_>, a: &[f32], b: &[f32], p: &[f32], c: &mut [f32], h: &mut [f32]) {
    let n = c.len();
    let (lo, hi) = (args.lo, args.hi);
    let gate = |g: usize| (&a[g * n..(g + 1) * n], &b[g * n..(g + 1) * n]);
    let ((ai, bi), (ao, bo), (af, bf), (ac, bc)) = (gate(0), gate(1), gate(2), gate(3));
    let (pi, po, pf) = (&p[..n], &p[n..2 * n], &p[2 * n..3 * n]);
    let h = &mut h[..n];
    for j in 0..n {
        let cp = c[j];
        let i = sigmoid1((ai[j] + bi[j] + pi[j] * cp).clamp(lo, hi));
        let f = if args.input_forget {
            1.0 - i
        } else {
            sigmoid1((af[j] + bf[j] + pf[j] * cp).clamp(lo, hi))
        };
        let g = tanh1((ac[j] + bc[j]).clamp(lo, hi));
        let cn = f * cp + i * g;
        let o = sigmoid1((ao[j] + bo[j] + po[j] * cn).clamp(lo, hi));
        c[j] = cn;
        h[j] = o * tanh1(cn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(seed: &mut u32) -> f32 {
        *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (*seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    }

    /// The gate functions against f64 over [-100, 100]: absolute error below 5e-7.
    #[test]
    fn gate_functions_are_accurate() {
        let (mut es, mut et) = (0f64, 0f64);
        for i in -2_000_000..=2_000_000 {
            let x = i as f32 * 5e-5;
            let xd = x as f64;
            es = es.max((sigmoid1(x) as f64 - 1.0 / (1.0 + (-xd).exp())).abs());
            et = et.max((tanh1(x) as f64 - xd.tanh()).abs());
        }
        assert!(es < 5e-7 && et < 5e-7, "sigmoid {es:e} tanh {et:e}");
        assert!(sigmoid1(-1e4) < 1e-37 && sigmoid1(1e4) == 1.0);
        assert_eq!((tanh1(-1e4), tanh1(1e4)), (-1.0, 1.0));
        assert!(tanh1(0.0).abs() < 1e-7);
    }

    /// The blocked layout against the plain one: blocks of 16 and 5 units (a short last
    /// block) over 37 units give the plain call's bits once the gates are regrouped.
    #[test]
    fn blocked_layout_matches_plain() {
        let mut s = 5u32;
        let hid = 37;
        let a: Vec<f32> = (0..4 * hid).map(|_| 8.0 * rnd(&mut s)).collect();
        let b: Vec<f32> = (0..4 * hid).map(|_| 2.0 * rnd(&mut s)).collect();
        let p: Vec<f32> = (0..3 * hid).map(|_| rnd(&mut s)).collect();
        let c0: Vec<f32> = (0..hid).map(|_| 4.0 * rnd(&mut s)).collect();
        // [g][hid] -> blocks of `blk` units, each [g][n].
        let regroup = |v: &[f32], gates: usize, blk: usize| -> Vec<f32> {
            (0..hid)
                .step_by(blk)
                .flat_map(|u0| {
                    let n = blk.min(hid - u0);
                    (0..gates).flat_map(move |g| (u0..u0 + n).map(move |u| g * hid + u))
                })
                .map(|i| v[i])
                .collect()
        };
        for v in dispatch::detected().into_iter().filter(|v| !v.is_int8()) {
            let (mut c, mut h) = (c0.clone(), vec![0f32; hid]);
            assert!(lstm_cell_with(
                v,
                &a,
                &b,
                &p,
                Some(3.0),
                false,
                &mut c,
                &mut h
            ));
            for blk in [16, 5, 1, 64] {
                let (ab, bb, pb) = (
                    regroup(&a, 4, blk),
                    regroup(&b, 4, blk),
                    regroup(&p, 3, blk),
                );
                let (mut cb, mut hb) = (c0.clone(), vec![0f32; hid]);
                assert!(lstm_cell_blocked_with(
                    v,
                    &ab,
                    &bb,
                    &pb,
                    Some(3.0),
                    false,
                    blk,
                    &mut cb,
                    &mut hb
                ));
                assert_eq!((&c, &h), (&cb, &hb), "{v:?} block {blk}");
            }
            let (mut cb, mut hb) = (c0.clone(), vec![0f32; hid]);
            assert!(!lstm_cell_blocked_with(
                v, &a, &b, &p, None, false, 0, &mut cb, &mut hb
            ));
        }
    }

    /// Every variant against the ONNX formulas written out in f64: odd hidden sizes (vector
    /// tails), with and without peepholes, clip and coupled input-forget gates.
    #[test]
    fn every_variant_matches_the_formulas() {
        let mut s = 11u32;
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        for hid in [1usize, 3, 16, 37, 128] {
            let a: Vec<f32> = (0..4 * hid).map(|_| 8.0 * rnd(&mut s)).collect();
            let b: Vec<f32> = (0..4 * hid).map(|_| 2.0 * rnd(&mut s)).collect();
            let peep: Vec<f32> = (0..3 * hid).map(|_| rnd(&mut s)).collect();
            let c0: Vec<f32> = (0..hid).map(|_| 4.0 * rnd(&mut s)).collect();
            for (with_p, clip, cifg) in [
                (false, None, false),
                (true, None, false),
                (true, Some(1.5f32), false),
                (false, Some(0.7), true),
            ] {
                let p = if with_p {
                    peep.clone()
                } else {
                    vec![0.0; 3 * hid]
                };
                let cl = |v: f64| match clip {
                    Some(c) => v.clamp(-c as f64, c as f64),
                    None => v,
                };
                for v in dispatch::detected().into_iter().filter(|v| !v.is_int8()) {
                    let (mut c, mut h) = (c0.clone(), vec![f32::NAN; hid]);
                    assert!(lstm_cell_with(v, &a, &b, &p, clip, cifg, &mut c, &mut h));
                    for j in 0..hid {
                        let pre = |g: usize| a[g * hid + j] as f64 + b[g * hid + j] as f64;
                        let cp = c0[j] as f64;
                        let i = sig(cl(pre(0) + p[j] as f64 * cp));
                        let f = if cifg {
                            1.0 - i
                        } else {
                            sig(cl(pre(2) + p[2 * hid + j] as f64 * cp))
                        };
                        let cn = f * cp + i * cl(pre(3)).tanh();
                        let o = sig(cl(pre(1) + p[hid + j] as f64 * cn));
                        let what = format!("{v:?} hid {hid} p {with_p} clip {clip:?} j {j}");
                        assert!((c[j] as f64 - cn).abs() < 1e-5, "c: {what}");
                        assert!((h[j] as f64 - o * cn.tanh()).abs() < 1e-5, "h: {what}");
                    }
                }
            }
        }
        let (mut c, mut h) = (vec![0f32; 3], vec![0f32; 2]);
        assert!(!lstm_cell(
            &[0.0; 12], &[0.0; 12], &[0.0; 9], None, false, &mut c, &mut h
        ));
    }
}
