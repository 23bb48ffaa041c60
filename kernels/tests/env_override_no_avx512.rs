//! `EDGEHAL_CPU_FEATURES=-avx512` drops AVX-512 but keeps AVX2 where the CPU has it (own test
//! binary: the choice is made once per process, so this is the only test here). On aarch64
//! the word changes nothing (NEON stays).

use edgehal_kernels::dispatch::{self, Variant};

#[test]
fn env_minus_avx512_selects_avx2_or_less() {
    std::env::set_var("EDGEHAL_CPU_FEATURES", "-avx512");
    let want = if Variant::Avx2.available() {
        Variant::Avx2
    } else if Variant::Neon.available() {
        Variant::Neon
    } else {
        Variant::Portable
    };
    assert_eq!(dispatch::selected(), want);
    assert_ne!(dispatch::selected_int8(), Variant::Avx512Vnni);
    let s = edgehal_kernels::dispatch_summary();
    assert!(s.starts_with(&format!("kernels: {}", want.name())), "{s}");
}
