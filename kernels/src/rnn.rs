//! Recurrent cell math: one fused pass over the hidden vector per step.
//!
//! [`lstm_cell`] takes an LSTM step's gate pre-activations as two addends (the input
//! projection with the biases and the recurrent product, or a joined product and the
//! biases), adds the peepholes, clips, applies sigmoid / tanh and updates `c` and `h`, all in
//! one loop over the hidden units: no gate slice is written back and read again. The loop is
//! safe Rust built from [`crate::vmath`]'s inline scalar forms; [`lstm_cell`] runs it compiled
//! for the process-wide variant (AVX-512F / AVX2+FMA wrappers in `simd.rs`; on aarch64 NEON
//! is the baseline, so the portable build is already vectorized).

use crate::dispatch::{self, Variant};
use crate::vmath::{sigmoid1, tanh1};

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
    let hid = c.len();
    if h.len() != hid || a.len() != 4 * hid || b.len() != 4 * hid || p.len() != 3 * hid {
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
}

/// The fused step (see [`lstm_cell`]); inlined into each variant's entry point.
#[inline(always)]
pub(crate) fn lstm_cell_loop(args: &CellArgs<'_>, c: &mut [f32], h: &mut [f32]) {
    let hid = c.len();
    let (lo, hi) = (args.lo, args.hi);
    let gate = |g: usize| {
        (
            &args.a[g * hid..(g + 1) * hid],
            &args.b[g * hid..(g + 1) * hid],
        )
    };
    let ((ai, bi), (ao, bo), (af, bf), (ac, bc)) = (gate(0), gate(1), gate(2), gate(3));
    let (pi, po, pf) = (
        &args.p[..hid],
        &args.p[hid..2 * hid],
        &args.p[2 * hid..3 * hid],
    );
    let h = &mut h[..hid];
    for j in 0..hid {
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
