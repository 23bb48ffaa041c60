//! Run-time choice of SIMD kernels, once per process.
//!
//! The best variant the CPU supports is chosen on first use; the environment variable
//! `EDGEHAL_CPU_FEATURES` can narrow the choice, a comma-separated list of:
//! - `none` (or `portable`): the portable, safe-Rust kernels only;
//! - `-avx512`: no AVX-512 kernels (AVX2+FMA ones still used);
//! - `-avx2` (or `-fma`): no AVX2/FMA kernels, and so none above them (AVX-512) either.
//!
//! Unknown words are ignored and reported by [`dispatch_summary`].

use std::sync::OnceLock;

/// A family of kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// Safe Rust, any CPU (the reference).
    Portable,
    /// x86_64 AVX2 + FMA intrinsics (6x16 sgemm tile).
    Avx2,
    /// x86_64 AVX-512F intrinsics (12x32 sgemm tile).
    Avx512,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Portable => "portable",
            Variant::Avx2 => "avx2+fma",
            Variant::Avx512 => "avx512f",
        }
    }

    /// Whether this CPU can run the variant.
    pub fn available(self) -> bool {
        detected().contains(&self)
    }
}

/// The variants this CPU supports, best last.
pub fn detected() -> Vec<Variant> {
    #[allow(unused_mut)]
    let mut v = vec![Variant::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            v.push(Variant::Avx2);
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push(Variant::Avx512);
        }
    }
    v
}

/// The best of `available` that `spec` (the `EDGEHAL_CPU_FEATURES` value) allows, and the
/// words of `spec` that were not understood.
pub fn choose(available: &[Variant], spec: Option<&str>) -> (Variant, Vec<String>) {
    let mut cap = Variant::Avx512;
    let mut unknown = Vec::new();
    for word in spec.unwrap_or("").split(',').map(str::trim) {
        match word.to_ascii_lowercase().as_str() {
            "" => {}
            "none" | "portable" => cap = Variant::Portable,
            "-avx512" | "-avx512f" => cap = cap.min(Variant::Avx2),
            "-avx2" | "-fma" => cap = Variant::Portable,
            _ => unknown.push(word.to_string()),
        }
    }
    let best = available
        .iter()
        .copied()
        .filter(|&v| v <= cap)
        .max()
        .unwrap_or(Variant::Portable);
    (best, unknown)
}

struct Choice {
    variant: Variant,
    summary: String,
}

fn choice() -> &'static Choice {
    static CHOICE: OnceLock<Choice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let avail = detected();
        let spec = std::env::var("EDGEHAL_CPU_FEATURES").ok();
        let (variant, unknown) = choose(&avail, spec.as_deref());
        let names: Vec<&str> = avail.iter().map(|v| v.name()).collect();
        let mut summary = format!(
            "kernels: {} (cpu supports: {})",
            variant.name(),
            names.join(", ")
        );
        if let Some(s) = &spec {
            summary.push_str(&format!("; EDGEHAL_CPU_FEATURES={s:?}"));
        }
        if !unknown.is_empty() {
            summary.push_str(&format!("; ignored unknown words: {}", unknown.join(", ")));
        }
        Choice { variant, summary }
    })
}

/// The variant every dispatched kernel uses in this process.
pub fn selected() -> Variant {
    choice().variant
}

/// Peak-FMA microbenchmark for `variant`: `iters` rounds of independent vector FMAs (24 zmm
/// chains for AVX-512, 16 ymm chains for AVX2). Returns the floating-point operations done
/// and a checksum to keep the loop alive; `None` when the CPU lacks the variant (or it is
/// the portable one, which has no fixed vector width).
pub fn fma_peak(variant: Variant, iters: usize, x: f32) -> Option<(f64, f32)> {
    #[cfg(target_arch = "x86_64")]
    {
        crate::arch::x86_64::fma_peak(variant, iters, x)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (variant, iters, x);
        None
    }
}

/// One line saying which kernels run and why, for the CLI to log.
pub fn dispatch_summary() -> String {
    choice().summary.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Variant::*;

    #[test]
    fn env_words_narrow_the_choice() {
        let all = [Portable, Avx2, Avx512];
        assert_eq!(choose(&all, None).0, Avx512);
        assert_eq!(choose(&all, Some("")).0, Avx512);
        assert_eq!(choose(&all, Some("-avx512")).0, Avx2);
        assert_eq!(choose(&all, Some("-avx2")).0, Portable);
        assert_eq!(choose(&all, Some("-fma")).0, Portable);
        assert_eq!(choose(&all, Some("none")).0, Portable);
        assert_eq!(choose(&all, Some(" -AVX512 , bogus")).0, Avx2);
        assert_eq!(choose(&all, Some("bogus")).1, vec!["bogus".to_string()]);
        // Never picks what the CPU lacks.
        assert_eq!(choose(&[Portable, Avx2], None).0, Avx2);
        assert_eq!(choose(&[Portable], Some("-avx512")).0, Portable);
    }

    #[test]
    fn fma_peak_counts_flops_for_available_variants() {
        for v in detected() {
            match fma_peak(v, 10, 0.999) {
                Some((flops, sum)) => {
                    assert!(flops > 0.0 && sum.is_finite(), "{v:?}");
                }
                None => assert_eq!(v, Portable),
            }
        }
    }

    #[test]
    fn portable_is_always_available() {
        assert!(Portable.available());
        assert_eq!(detected()[0], Portable);
    }
}
