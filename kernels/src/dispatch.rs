//! Run-time choice of SIMD kernels, once per process.
//!
//! Two families are chosen independently: float kernels ([`selected`]) and int8 kernels
//! ([`selected_int8`], used by [`crate::qgemm`]). The best variant the CPU supports is chosen
//! on first use; the environment variable `EDGEHAL_CPU_FEATURES` can narrow the choice, a
//! comma-separated list of:
//! - `none` (or `portable`): the portable, safe-Rust kernels only;
//! - `-avx512`: no AVX-512 kernels (AVX2+FMA and AVX-VNNI ones still used);
//! - `-avx2` (or `-fma`): no AVX2/FMA kernels, and so none above them (AVX-512, VNNI) either;
//! - `-vnni`: no AVX-512 VNNI / AVX-VNNI int8 kernels;
//! - `-neon`: no aarch64 NEON kernels, and so no dotprod / i8mm ones either;
//! - `-dotprod`: no `sdot` int8 kernels; `-i8mm`: no `smmla` int8 kernels.
//!
//! Unknown words are ignored and reported by [`dispatch_summary`].

use std::sync::OnceLock;

/// A family of kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// Safe Rust, any CPU (the reference).
    Portable,
    /// x86_64 AVX2 + FMA intrinsics (6x16 sgemm tile).
    Avx2,
    /// x86_64 AVX-512F intrinsics (12x32 sgemm tile).
    Avx512,
    /// x86_64 AVX-VNNI (`vpdpbusd` on ymm, 6x16 int8 tile).
    AvxVnni,
    /// x86_64 AVX-512 VNNI (`vpdpbusd` on zmm, 8x32 int8 tile).
    Avx512Vnni,
    /// aarch64 NEON (8x12 sgemm tile with `fmla` by lane).
    Neon,
    /// aarch64 dot product (`sdot` by lane, 8x12 int8 tile).
    Dotprod,
    /// aarch64 int8 matrix multiply (`smmla`, 8x8 int8 tile).
    I8mm,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Portable => "portable",
            Variant::Avx2 => "avx2+fma",
            Variant::Avx512 => "avx512f",
            Variant::AvxVnni => "avxvnni",
            Variant::Avx512Vnni => "avx512vnni",
            Variant::Neon => "neon",
            Variant::Dotprod => "dotprod",
            Variant::I8mm => "i8mm",
        }
    }

    /// Whether this CPU can run the variant.
    pub fn available(self) -> bool {
        self == Variant::Portable || cpu_has(self)
    }

    /// True for the int8 variants ([`crate::qgemm`]); the rest are float variants.
    pub fn is_int8(self) -> bool {
        matches!(
            self,
            Variant::AvxVnni | Variant::Avx512Vnni | Variant::Dotprod | Variant::I8mm
        )
    }
}

/// Whether the CPU has what `v` needs (std's feature detection, cached by std).
fn cpu_has(v: Variant) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match v {
            Variant::Avx2 => has!("avx2") && has!("fma"),
            Variant::Avx512 => has!("avx512f"),
            Variant::AvxVnni => has!("avx2") && has!("avxvnni"),
            Variant::Avx512Vnni => has!("avx512f") && has!("avx512vnni"),
            _ => false,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        match v {
            Variant::Neon => has!("neon"),
            Variant::Dotprod => has!("neon") && has!("dotprod"),
            Variant::I8mm => has!("neon") && has!("i8mm"),
            _ => false,
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = v;
        false
    }
}

const FLOAT: [Variant; 4] = [
    Variant::Portable,
    Variant::Avx2,
    Variant::Avx512,
    Variant::Neon,
];
const INT8: [Variant; 5] = [
    Variant::Portable,
    Variant::AvxVnni,
    Variant::Avx512Vnni,
    Variant::Dotprod,
    Variant::I8mm,
];

/// The float variants this CPU supports, best last.
pub fn detected() -> Vec<Variant> {
    FLOAT.into_iter().filter(|v| v.available()).collect()
}

/// The int8 variants this CPU supports, best last.
pub fn detected_int8() -> Vec<Variant> {
    INT8.into_iter().filter(|v| v.available()).collect()
}

/// The outcome of reading `EDGEHAL_CPU_FEATURES`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Float kernels.
    pub float: Variant,
    /// Int8 kernels.
    pub int8: Variant,
    /// Words that were not understood.
    pub unknown: Vec<String>,
}

/// The best float and int8 variants of `available` that `spec` (the `EDGEHAL_CPU_FEATURES`
/// value) allows, and the words of `spec` that were not understood.
pub fn choose_all(available: &[Variant], spec: Option<&str>) -> Choice {
    use Variant::*;
    let mut off: Vec<Variant> = Vec::new();
    let mut unknown = Vec::new();
    for word in spec.unwrap_or("").split(',').map(str::trim) {
        let w = word.to_ascii_lowercase();
        let drop: &[Variant] = match w.as_str() {
            "" => &[],
            "none" | "portable" => &[Avx2, Avx512, AvxVnni, Avx512Vnni, Neon, Dotprod, I8mm],
            "-avx512" | "-avx512f" => &[Avx512, Avx512Vnni],
            "-avx2" | "-fma" => &[Avx2, Avx512, AvxVnni, Avx512Vnni],
            "-vnni" | "-avx512vnni" | "-avxvnni" => &[AvxVnni, Avx512Vnni],
            "-neon" | "-asimd" => &[Neon, Dotprod, I8mm],
            "-dotprod" => &[Dotprod],
            "-i8mm" => &[I8mm],
            _ => {
                unknown.push(word.to_string());
                &[]
            }
        };
        off.extend_from_slice(drop);
    }
    // Preference order: the last allowed one that is available wins.
    let best = |family: &[Variant]| {
        family
            .iter()
            .copied()
            .rfind(|v| available.contains(v) && !off.contains(v))
            .unwrap_or(Portable)
    };
    Choice {
        float: best(&FLOAT),
        int8: best(&INT8),
        unknown,
    }
}

/// The best float variant of `available` that `spec` allows, and the words of `spec` that
/// were not understood.
pub fn choose(available: &[Variant], spec: Option<&str>) -> (Variant, Vec<String>) {
    let c = choose_all(available, spec);
    (c.float, c.unknown)
}

struct Chosen {
    choice: Choice,
    summary: String,
}

fn chosen() -> &'static Chosen {
    static CHOICE: OnceLock<Chosen> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let mut avail = detected();
        avail.extend(detected_int8().into_iter().filter(|v| v.is_int8()));
        let spec = std::env::var("EDGEHAL_CPU_FEATURES").ok();
        let choice = choose_all(&avail, spec.as_deref());
        let names: Vec<&str> = avail.iter().map(|v| v.name()).collect();
        let mut summary = format!(
            "kernels: {}, int8: {} (cpu supports: {})",
            choice.float.name(),
            choice.int8.name(),
            names.join(", ")
        );
        if let Some(s) = &spec {
            summary.push_str(&format!("; EDGEHAL_CPU_FEATURES={s:?}"));
        }
        if !choice.unknown.is_empty() {
            summary.push_str(&format!(
                "; ignored unknown words: {}",
                choice.unknown.join(", ")
            ));
        }
        Chosen { choice, summary }
    })
}

/// The float variant every dispatched kernel uses in this process.
pub fn selected() -> Variant {
    chosen().choice.float
}

/// The int8 variant every dispatched int8 kernel uses in this process.
pub fn selected_int8() -> Variant {
    chosen().choice.int8
}

/// Peak-FMA microbenchmark for `variant`: `iters` rounds of independent vector FMAs (24 zmm
/// chains for AVX-512, 16 ymm chains for AVX2). Returns the floating-point operations done
/// and a checksum to keep the loop alive; `None` when the CPU lacks the variant (or it has no
/// peak loop: the portable one, with no fixed vector width, and the int8 ones).
pub fn fma_peak(variant: Variant, iters: usize, x: f32) -> Option<(f64, f32)> {
    #[cfg(target_arch = "x86_64")]
    {
        crate::arch::x86_64::fma_peak(variant, iters, x)
    }
    #[cfg(target_arch = "aarch64")]
    {
        crate::arch::aarch64::fma_peak(variant, iters, x)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (variant, iters, x);
        None
    }
}

/// One line saying which kernels run and why, for the CLI to log.
pub fn dispatch_summary() -> String {
    chosen().summary.clone()
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
    fn int8_words_narrow_the_int8_choice() {
        let x86 = [Portable, Avx2, Avx512, AvxVnni, Avx512Vnni];
        let c = choose_all(&x86, None);
        assert_eq!((c.float, c.int8), (Avx512, Avx512Vnni));
        let c = choose_all(&x86, Some("-avx512"));
        assert_eq!((c.float, c.int8), (Avx2, AvxVnni));
        let c = choose_all(&x86, Some("-vnni"));
        assert_eq!((c.float, c.int8), (Avx512, Portable));
        let c = choose_all(&x86, Some("-avx2"));
        assert_eq!((c.float, c.int8), (Portable, Portable));
        let arm = [Portable, Neon, Dotprod, I8mm];
        let c = choose_all(&arm, None);
        assert_eq!((c.float, c.int8), (Neon, I8mm));
        let c = choose_all(&arm, Some("-i8mm"));
        assert_eq!((c.float, c.int8), (Neon, Dotprod));
        let c = choose_all(&arm, Some("-i8mm,-dotprod"));
        assert_eq!((c.float, c.int8), (Neon, Portable));
        let c = choose_all(&arm, Some("-neon"));
        assert_eq!((c.float, c.int8), (Portable, Portable));
        // A Cortex-A76 has dotprod but no i8mm.
        let c = choose_all(&[Portable, Neon, Dotprod], None);
        assert_eq!((c.float, c.int8), (Neon, Dotprod));
        assert!(choose_all(&arm, Some("none,-i8mm")).int8 == Portable);
    }

    #[test]
    fn fma_peak_counts_flops_for_available_variants() {
        for v in detected() {
            match fma_peak(v, 10, 0.999) {
                Some((flops, sum)) => {
                    assert!(flops > 0.0 && sum.is_finite(), "{v:?}");
                }
                None => assert!(matches!(v, Portable | Neon), "{v:?} has no peak loop"),
            }
        }
    }

    #[test]
    fn portable_is_always_available() {
        assert!(Portable.available());
        assert_eq!(detected()[0], Portable);
        assert_eq!(detected_int8()[0], Portable);
        assert!(detected().iter().all(|v| !v.is_int8()));
        assert!(detected_int8().iter().skip(1).all(|v| v.is_int8()));
    }

    /// Checks the variants this process chose against `EDGEHAL_EXPECT_KERNELS` when set
    /// ("float,int8" names, e.g. `neon,dotprod`): the aarch64 emulation CI uses it to prove
    /// which dispatch path ran under each emulated CPU.
    #[test]
    fn expected_variants_were_selected() {
        println!("{}", dispatch_summary());
        if let Ok(want) = std::env::var("EDGEHAL_EXPECT_KERNELS") {
            let got = format!("{},{}", selected().name(), selected_int8().name());
            assert_eq!(got, want, "{}", dispatch_summary());
        }
        assert!(selected().available() && selected_int8().available());
    }
}
