//! The layout pass on the shared TFLite models: float models run on NCHW ONNX ops (and so on
//! the fused convolution kernels) after `optimize`, with no Transpose between their
//! convolutions, and still agree with LiteRT (reference kernels) within 1e-4 of the output's
//! largest magnitude; quantized models are not touched by the pass.

use std::path::{Path, PathBuf};

use edgehal::{Model, Session, SessionOptions};
use edgehal_core::Tensor;
use edgehal_cpu::Registry;

fn litert(model: &Path, name: &str, tensors: &[String]) -> Option<PathBuf> {
    let dir = edgehal_tests::scratch(&format!("litert-layout-{name}"));
    let script = edgehal_tests::repo_root().join("tests/py/litert_ref.py");
    let out = std::process::Command::new(edgehal_tests::python())
        .arg(&script)
        .arg(model)
        .arg(&dir)
        .args(["--resolver", "ref", "--tensors", &tensors.join(",")])
        .output();
    match out {
        Ok(o) if o.status.success() => Some(dir),
        other => {
            let why = match other {
                Ok(o) => format!("{}{}", o.status, String::from_utf8_lossy(&o.stderr)),
                Err(e) => e.to_string(),
            };
            assert!(!edgehal_tests::strict(), "LiteRT reference failed: {why}");
            println!("SKIP {name}: LiteRT reference unavailable ({why})");
            None
        }
    }
}

use edgehal_tests::load_npy;

fn load(name: &str) -> Option<(PathBuf, Model)> {
    let path = edgehal_tests::model(name);
    if !path.exists() {
        assert!(!edgehal_tests::strict(), "{} is missing", path.display());
        println!("SKIP {name}: {} not found", path.display());
        return None;
    }
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{name}: load: {e}"));
    Some((path, model))
}

/// The whole session (optimize: layout pass + fusion) against LiteRT's output.
fn session_agrees(name: &str, path: &Path, model: &Model) {
    let Some(dir) = litert(path, name, &[]) else {
        return;
    };
    let session = Session::new(model, &SessionOptions::default())
        .unwrap_or_else(|e| panic!("{name}: session: {e}"));
    let feeds: Vec<(String, Tensor)> = session
        .inputs()
        .enumerate()
        .map(|(k, i)| {
            (
                i.name.clone(),
                load_npy(&dir.join(format!("input_{k}.npy"))),
            )
        })
        .collect();
    let refs: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let outs = session
        .run(&refs)
        .unwrap_or_else(|e| panic!("{name}: run: {e}"));
    let want = load_npy(&dir.join("output_0.npy"));
    let got = &outs[0].1;
    assert_eq!(got.shape(), want.shape(), "{name}: output shape");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let max_ref = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = g
        .iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    println!("{name}: optimized session vs LiteRT: max |diff| {diff:.3e}, max |ref| {max_ref:.3e}");
    assert!(max_ref > 0.0, "{name}: reference output is all zeros");
    assert!(
        diff <= 1e-4 * max_ref,
        "{name}: max diff {diff} exceeds 1e-4 * {max_ref}"
    );
}

fn count(g: &edgehal_core::Graph, op: &str) -> usize {
    g.nodes.iter().filter(|n| n.op == op).count()
}

#[test]
fn mobilenet_v2_keras_runs_on_fused_nchw_convs() {
    let name = "mobilenet_v2_keras.tflite";
    let Some((path, model)) = load(name) else {
        return;
    };
    let mut g = model.graph.clone();
    let log = edgehal::passes::optimize(&mut g, &Registry::new()).unwrap();
    let ops: Vec<String> = g
        .nodes
        .iter()
        .map(|n| format!("{}:{}", n.domain, n.op))
        .collect();
    println!("{name}: {log}; {} nodes", g.nodes.len());
    // 35 Conv2D + 17 DepthwiseConv2D; every one becomes a Conv or FusedConv, or the NHWC
    // FusedConvNhwc when the NHWC pass runs (AVX-512, or EDGEHAL_NHWC=1), two of them a
    // PointwiseDepthwiseNhwc where an expanded tensor outgrows L2.
    let nhwc = count(&g, "FusedConvNhwc") + 2 * count(&g, "PointwiseDepthwiseNhwc");
    assert_eq!(
        count(&g, "Conv") + count(&g, "FusedConv") + nhwc,
        52,
        "{ops:?}"
    );
    assert!(count(&g, "FusedConv") + nhwc >= 40, "{ops:?}");
    assert!(
        nhwc == 0 || nhwc == 52,
        "the NHWC chain covers every convolution: {ops:?}"
    );
    assert!(
        !g.nodes
            .iter()
            .any(|n| n.domain == "tflite" && n.op.contains("Conv")),
        "{ops:?}"
    );
    // NCHW: only the graph input is transposed; Mean over H, W gives [1, C] in both layouts.
    // NHWC: no Transpose at all (the first layer reads the NHWC input, the Mean the last
    // convolution's NHWC output).
    assert_eq!(
        count(&g, "Transpose"),
        if nhwc > 0 { 0 } else { 1 },
        "{ops:?}"
    );
    if nhwc == 0 {
        assert_eq!(g.nodes[0].op, "Transpose");
    } else {
        assert_eq!(count(&g, "GlobalAveragePoolNhwc"), 1, "{ops:?}");
    }
    session_agrees(name, &path, &model);
    // The softmax output of this model is nearly flat: the intermediates (the logits among
    // them) are the real check.
    let n = intermediates_agree(name, &path, &model.graph, g);
    assert!(
        n >= 50 || !edgehal_tests::strict(),
        "{name}: only {n} intermediates compared"
    );
}

/// Every float intermediate of the original graph that the optimized graph still computes,
/// as itself or as its NCHW twin (`<name>_nchw`), against LiteRT's value of it: within 1e-4
/// of the tensor's largest magnitude. Returns how many were compared.
fn intermediates_agree(
    name: &str,
    path: &Path,
    orig: &edgehal_core::Graph,
    mut g: edgehal_core::Graph,
) -> usize {
    let probes: Vec<String> = orig
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().flatten())
        .filter(|&&v| orig.values[v].dtype == Some(edgehal_core::DType::F32))
        .filter(|v| !orig.outputs.contains(v))
        .map(|&v| orig.value_name(v).to_string())
        .collect();
    let Some(dir) = litert(path, name, &probes) else {
        return 0;
    };
    let produced: std::collections::HashSet<usize> = g
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().flatten().copied())
        .collect();
    let mut checks = Vec::new();
    for (k, p) in probes.iter().enumerate() {
        let plain = g.find_value(p).filter(|v| produced.contains(v));
        let twin = g
            .find_value(&format!("{p}_nchw"))
            .filter(|v| produced.contains(v));
        // The NHWC pass's form of the NCHW twin has the TFLite tensor's own layout.
        let back = g
            .find_value(&format!("{p}_nchw_nhwc"))
            .filter(|v| produced.contains(v));
        if let Some(v) = plain.or(back) {
            checks.push((k, v, false));
        } else if let Some(v) = twin {
            checks.push((k, v, true));
        }
    }
    let first = g.outputs.len();
    g.outputs.extend(checks.iter().map(|c| c.1));
    let ex = edgehal_cpu::Executor::new(&g, &Registry::new())
        .unwrap_or_else(|e| panic!("{name}: prepare: {e}"));
    let feeds = edgehal_tests::reference_feeds(&g, &dir);
    let outs = ex
        .run(&feeds)
        .unwrap_or_else(|e| panic!("{name}: run: {e}"));
    let (mut twins, mut worst) = (0, 0f64);
    for (j, (k, _, nchw)) in checks.iter().enumerate() {
        let want = load_npy(&dir.join(format!("tensor_{k}.npy")));
        let want: Vec<f64> = if *nchw {
            twins += 1;
            let v = want.view::<f32>().unwrap().permute(&[0, 3, 1, 2]).unwrap();
            v.to_vec().into_iter().map(f64::from).collect()
        } else {
            want.to_f64_vec()
        };
        let got = outs[first + j].to_f64_vec();
        assert_eq!(got.len(), want.len(), "{name}: '{}' size", probes[*k]);
        let max_ref = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * max_ref.max(1e-30),
            "{name}: '{}' differs by {diff} (max {max_ref})",
            probes[*k]
        );
        worst = worst.max(diff / max_ref.max(1e-30));
    }
    println!(
        "{name}: {} of {} intermediates compared with LiteRT ({twins} in NCHW), worst relative diff {worst:.2e}",
        checks.len(),
        probes.len()
    );
    checks.len()
}

#[test]
fn lstm_kws_keras_still_agrees_after_the_pass() {
    let name = "lstm_kws_keras.tflite";
    let Some((path, model)) = load(name) else {
        return;
    };
    session_agrees(name, &path, &model);
}

#[test]
fn quantized_models_are_not_touched() {
    for name in [
        "mobilenet_v2_keras_int8.tflite",
        "person_detect_cnn_int8.tflite",
    ] {
        let Some((_, model)) = load(name) else {
            continue;
        };
        let mut g = model.graph.clone();
        let before: Vec<(String, String)> = g
            .nodes
            .iter()
            .map(|n| (n.op.clone(), n.name.clone()))
            .collect();
        let n = edgehal::passes_layout::tflite_to_nchw(&mut g).unwrap();
        assert_eq!(n, 0, "{name}");
        let after: Vec<(String, String)> = g
            .nodes
            .iter()
            .map(|n| (n.op.clone(), n.name.clone()))
            .collect();
        assert_eq!(before, after, "{name}");
    }
}
