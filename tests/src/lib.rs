//! Shared helpers for edgehal's integration tests: where `../shared` is, which Python to use
//! for reference runtimes, scratch directories.

#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// `../shared` beside the checkout (or `$EDGEHAL_SHARED`).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("EDGEHAL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"))
}

/// A dev model from `../shared/models`.
pub fn model(name: &str) -> PathBuf {
    shared_dir().join("models").join(name)
}

/// The Python with the reference runtimes (onnx, onnxruntime, ai-edge-litert, numpy):
/// `$EDGEHAL_PYTHON`, else `<repo>/.venv/bin/python` as `.ci/run` creates it.
pub fn python() -> PathBuf {
    std::env::var_os("EDGEHAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// True when tests must not skip for a missing tool (CI sets `CI=true`).
pub fn strict() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// A tensor from a `.npy` file; panics naming the file on any error.
pub fn load_npy(p: &std::path::Path) -> edgehal_core::Tensor {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    edgehal::npy::from_npy(bytes.into()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A reference script's inputs (`dir/input_K.npy`, in `g`'s input order) as feeds by value id.
pub fn reference_feeds(
    g: &edgehal_core::Graph,
    dir: &std::path::Path,
) -> Vec<(usize, edgehal_core::Tensor)> {
    g.inputs
        .iter()
        .enumerate()
        .map(|(k, &id)| (id, load_npy(&dir.join(format!("input_{k}.npy")))))
        .collect()
}

/// A fresh scratch directory under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = repo_root().join("target").join("test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    d
}

/// A made-up profile for planner and scheduler tests: `times[node][device]` in ms, nodes in
/// index order, `values` values of 128 bytes each, host memory only, no transfer costs and
/// no scheduler overheads.
pub fn made_up_profile(
    times: Vec<Vec<Option<f64>>>,
    devices: &[&str],
    values: usize,
) -> edgehal::profile::Profile {
    use edgehal::partition::TransferCost;
    use edgehal_core::buffer::MemoryDomain;
    let nd = devices.len();
    edgehal::profile::Profile {
        devices: devices.iter().map(|s| s.to_string()).collect(),
        domains: vec![vec![MemoryDomain::Host]; nd],
        order: (0..times.len()).collect(),
        reasons: vec![vec![None; nd]; times.len()],
        times,
        value_bytes: vec![128; values],
        transfer: vec![vec![TransferCost::ZERO; nd + 1]; nd + 1],
        segment_ms: vec![0.0; nd],
        dispatch_ms: vec![0.0; nd],
        request_ms: 0.0,
        passes: vec![None; nd],
        calibration: vec![None; nd],
        measured: 0,
        cached: 0,
        rebuilt: 0,
    }
}
