//! `EDGEHAL_CPU_FEATURES=none` forces the portable kernels (own test binary: the choice is
//! made once per process, so this is the only test here).

use edgehal_kernels::dispatch::{self, Variant};

#[test]
fn env_none_selects_portable() {
    std::env::set_var("EDGEHAL_CPU_FEATURES", "none");
    assert_eq!(dispatch::selected(), Variant::Portable);
    let s = edgehal_kernels::dispatch_summary();
    assert!(s.starts_with("kernels: portable"), "{s}");
    assert!(s.contains("EDGEHAL_CPU_FEATURES=\"none\""), "{s}");
}
