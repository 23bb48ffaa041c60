//! Model-level agreement with onnxruntime on the dev models (../shared/models): same seeded
//! inputs, float models within 1e-4 of the output's largest magnitude, the int8 model within one
//! quantization step of its output.

use std::path::Path;

use edgehal::{Model, Session, SessionOptions};
use edgehal_core::Tensor;

fn reference(model: &Path, name: &str) -> Option<std::path::PathBuf> {
    let dir = edgehal_tests::scratch(&format!("ort-{name}"));
    let script = edgehal_tests::repo_root().join("tests/py/ort_ref.py");
    let out = std::process::Command::new(edgehal_tests::python())
        .arg(script)
        .arg(model)
        .arg(&dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(dir),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                !edgehal_tests::strict(),
                "onnxruntime reference failed: {why}"
            );
            println!("SKIP {name}: onnxruntime reference unavailable ({why})");
            None
        }
    }
}

use edgehal_tests::load_npy;

/// Runs `name` through edgehal and onnxruntime; returns (max abs diff, max |reference|,
/// fraction of elements within 1e-6, output scale if quantized).
fn agree(name: &str) -> Option<(f64, f64, f64, Option<f32>)> {
    let path = edgehal_tests::model(name);
    let dir = reference(&path, name)?;
    let model = Model::load(&path).expect("load");
    let session = Session::new(&model, &SessionOptions::default()).expect("session");
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
    let outs = session.run(&refs).expect("run");
    let want = load_npy(&dir.join("output_0.npy"));
    let got = &outs[0].1;
    assert_eq!(got.shape(), want.shape(), "{name}: output shape");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let max_ref = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    let max_diff = g
        .iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    let exact = g
        .iter()
        .zip(&w)
        .filter(|(a, b)| (*a - *b).abs() <= 1e-6)
        .count() as f64
        / w.len().max(1) as f64;
    // The int8 model's output comes from a DequantizeLinear: its scale is one step.
    let g = &model.graph;
    let out_id = g.outputs[0];
    let scale = g
        .nodes
        .iter()
        .find(|n| {
            n.op == "DequantizeLinear" && n.outputs.first().copied().flatten() == Some(out_id)
        })
        .and_then(|n| n.inputs.get(1).copied().flatten())
        .and_then(|s| g.initializers.get(&s))
        .and_then(|t| t.to_f32().first().copied());
    println!(
        "{name}: max |diff| {max_diff:.3e}, max |ref| {max_ref:.3e}, {:.1}% elements equal",
        exact * 100.0
    );
    Some((max_diff, max_ref, exact, scale))
}

fn float_model(name: &str) {
    if let Some((diff, max_ref, _, _)) = agree(name) {
        assert!(
            diff <= 1e-4 * max_ref,
            "{name}: max diff {diff} exceeds 1e-4 * {max_ref}"
        );
    }
}

#[test]
fn mobilenet_v2_matches_onnxruntime() {
    float_model("mobilenet_v2.onnx");
}

#[test]
fn resnet18_matches_onnxruntime() {
    float_model("resnet18.onnx");
}

#[test]
fn lstm_kws_matches_onnxruntime() {
    float_model("lstm_kws.onnx");
}

#[test]
fn mobilenet_v2_int8_matches_onnxruntime_within_one_step() {
    if let Some((diff, _, exact, scale)) = agree("mobilenet_v2_int8.onnx") {
        let step = scale.expect("int8 model output comes from DequantizeLinear") as f64;
        assert!(
            diff <= step * 1.0001,
            "max diff {diff} exceeds one quantization step {step}"
        );
        println!(
            "mobilenet_v2_int8: {:.1}% of outputs exactly equal",
            exact * 100.0
        );
    }
}
