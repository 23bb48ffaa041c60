//! `edgehal plan` with a cached profile that no longer matches the machine: the measured
//! plans all miss their prediction the same way, so the device is profiled again and the
//! prediction made from the new timings.

use std::path::{Path, PathBuf};
use std::process::Command;

use edgehal::profile::fnv64;

fn plan(cache: &Path) -> serde_json::Value {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/lstm_kws.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["plan", "--devices", "cpu", "--json", "--runs", "10"])
        .arg(&model)
        .env("EDGEHAL_CACHE_DIR", cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every cached time multiplied by `f`, with checksums that match (a cache written while the
/// machine ran `f` times slower, not a damaged one).
fn scale_cache(cache: &Path, f: f64) -> PathBuf {
    let file = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "txt"))
        .expect("a cache file");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    for l in lines {
        let v: Vec<&str> = l.split_whitespace().collect();
        let key = u64::from_str_radix(v[0], 16).unwrap();
        let ms = f64::from_bits(u64::from_str_radix(v[1], 16).unwrap()) * f;
        let sum = fnv64(format!("{key:016x} {:016x}", ms.to_bits()).as_bytes());
        out.push_str(&format!("{key:016x} {:016x} {sum:016x}\n", ms.to_bits()));
    }
    std::fs::write(&file, out).unwrap();
    file
}

#[test]
fn a_profile_off_by_the_same_factor_everywhere_is_measured_again() {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plan-stale-profile");
    let _ = std::fs::remove_dir_all(&cache);
    let first = plan(&cache);
    assert!(first["reprofiled"].is_null(), "{first}");
    let file = scale_cache(&cache, 4.0);
    let stale = std::fs::read_to_string(&file).unwrap();
    let second = plan(&cache);
    // Trusted, the cache would have predicted about four times the measured total.
    let why = second["reprofiled"].as_str().expect("profiled again");
    assert!(why.contains("cpu"), "{why}");
    let err = second["prediction_error_pct"].as_f64().unwrap();
    assert!(
        err.abs() < 100.0,
        "prediction error {err}% after profiling again"
    );
    assert_ne!(
        std::fs::read_to_string(&file).unwrap(),
        stale,
        "cache rewritten"
    );
    let _ = std::fs::remove_dir_all(&cache);
}
