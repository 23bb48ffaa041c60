//! With no `EDGEHAL_CPU_FEATURES`, the best variant the CPU has is chosen (own test binary).

use edgehal_kernels::dispatch;

#[test]
fn no_env_selects_best_detected() {
    std::env::remove_var("EDGEHAL_CPU_FEATURES");
    let best = dispatch::detected().into_iter().max();
    assert_eq!(Some(dispatch::selected()), best);
    assert_eq!(
        Some(dispatch::selected_int8()),
        dispatch::detected_int8().last().copied()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert_eq!(dispatch::selected(), dispatch::Variant::Avx512);
    }
}
