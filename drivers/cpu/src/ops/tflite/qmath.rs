//! TFLite's fixed-point requantization arithmetic, written from the semantics of its reference
//! kernels: a real multiplier becomes a Q31 significand plus a power-of-two shift, applied with
//! a saturating rounding doubling high multiply and a rounding right shift.

/// `m = significand * 2^shift` with the significand in Q31 (`[2^30, 2^31)`), as TFLite's
/// `QuantizeMultiplier` computes it (round half away from zero; 0 for tiny multipliers).
pub fn quantize_multiplier(m: f64) -> (i32, i32) {
    if m == 0.0 || !m.is_finite() {
        return (0, 0);
    }
    let (q, mut shift) = frexp(m);
    let mut qf = (q * (1i64 << 31) as f64).round() as i64;
    if qf == 1i64 << 31 {
        qf /= 2;
        shift += 1;
    }
    if shift < -31 {
        return (0, 0);
    }
    if shift > 30 {
        return (i32::MAX, 30);
    }
    (qf as i32, shift)
}

/// `m = q * 2^e` with `|q|` in `[0.5, 1)`.
fn frexp(m: f64) -> (f64, i32) {
    let bits = m.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    if exp == 0 {
        // Subnormal: scale up first.
        let (q, e) = frexp(m * (1u64 << 54) as f64);
        return (q, e - 54);
    }
    let q = f64::from_bits((bits & !(0x7ffu64 << 52)) | (1022u64 << 52));
    (q, exp - 1022)
}

/// gemmlowp's `SaturatingRoundingDoublingHighMul`.
#[inline]
pub fn srdhm(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge = if ab >= 0 {
        1i64 << 30
    } else {
        1 - (1i64 << 30)
    };
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp's `RoundingDivideByPOT` (round half away from zero).
#[inline]
pub fn rdbpot(x: i32, exponent: i32) -> i32 {
    let e = exponent.clamp(0, 31);
    let mask = ((1i64 << e) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> e) + i32::from(remainder > threshold)
}

/// TFLite's `MultiplyByQuantizedMultiplier`.
#[inline]
pub fn mul_by_qm(x: i32, qm: i32, shift: i32) -> i32 {
    let left = shift.max(0);
    let right = (-shift).max(0);
    rdbpot(srdhm(x.wrapping_mul(1i32 << left.min(30)), qm), right)
}

/// A real multiplier prepared for [`mul_by_qm`].
#[derive(Clone, Copy, Debug)]
pub struct Multiplier {
    pub m: i32,
    pub shift: i32,
}

impl Multiplier {
    pub fn new(real: f64) -> Self {
        let (m, shift) = quantize_multiplier(real);
        Multiplier { m, shift }
    }
    #[inline]
    pub fn apply(&self, x: i32) -> i32 {
        mul_by_qm(x, self.m, self.shift)
    }
}

/// Value range of an integer dtype code.
pub fn type_range(dtype: edgehal_core::DType) -> (i32, i32) {
    use edgehal_core::DType;
    match dtype {
        DType::I8 => (-128, 127),
        DType::U8 => (0, 255),
        DType::I16 => (-32768, 32767),
        _ => (i32::MIN, i32::MAX),
    }
}

/// TFLite's `CalculateActivationRangeQuantized`: the fused activation as a clamp in the
/// output's quantized domain.
pub fn act_range_q(act: &str, scale: f32, zp: i32, dtype: edgehal_core::DType) -> (i32, i32) {
    let (qmin, qmax) = type_range(dtype);
    let q = |f: f32| zp.saturating_add((f / scale).round() as i32);
    match act {
        "RELU" => (qmin.max(q(0.0)), qmax),
        "RELU6" => (qmin.max(q(0.0)), qmax.min(q(6.0))),
        "RELU_N1_TO_1" => (qmin.max(q(-1.0)), qmax.min(q(1.0))),
        _ => (qmin, qmax),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplier_round_trips() {
        for &m in &[0.5, 0.75, 1.0, 1.5, 0.0123, 3.7e-5, 200.0] {
            let (q, s) = quantize_multiplier(m);
            let back = q as f64 / (1i64 << 31) as f64 * 2f64.powi(s);
            assert!((back - m).abs() / m < 1e-9, "{m} -> {q} {s}");
        }
        assert_eq!(quantize_multiplier(0.5), (1 << 30, 0));
    }

    #[test]
    fn rounding_matches_reference_semantics() {
        // 5 / 2 = 2.5 -> 3; -5 / 2 = -2.5 -> -3 (half away from zero).
        assert_eq!(rdbpot(5, 1), 3);
        assert_eq!(rdbpot(-5, 1), -3);
        assert_eq!(rdbpot(-6, 2), -2); // -1.5 -> -2
        assert_eq!(rdbpot(6, 2), 2);
        assert_eq!(srdhm(i32::MIN, i32::MIN), i32::MAX);
        assert_eq!(srdhm(1 << 30, 1 << 30), 1 << 29);
        // x * 0.5 with 0.5 = (2^30, 0)
        assert_eq!(mul_by_qm(7, 1 << 30, 0), 4);
        // The high multiply's nudge rounds negative halves toward zero (gemmlowp semantics).
        assert_eq!(mul_by_qm(-7, 1 << 30, 0), -3);
        assert_eq!(mul_by_qm(-9, 1 << 30, 0), -4);
        // x * 0.25
        assert_eq!(mul_by_qm(10, 1 << 30, -1), 3); // 2.5 -> 3
                                                   // x * 3 = 0.75 * 2^2
        let m = Multiplier::new(3.0);
        assert_eq!(m.apply(5), 15);
    }

    #[test]
    fn activation_ranges() {
        use edgehal_core::DType;
        assert_eq!(act_range_q("NONE", 0.1, 0, DType::I8), (-128, 127));
        assert_eq!(act_range_q("RELU6", 0.1, -10, DType::I8), (-10, 50));
        assert_eq!(act_range_q("RELU", 0.1, -128, DType::I8), (-128, 127));
    }
}
