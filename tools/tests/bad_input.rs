//! Bad input never crashes: each case gives one clear line on stderr and a non-zero exit from
//! the CLI, and an `Err` from the library.

use std::path::{Path, PathBuf};
use std::process::Command;

use edgehal::onnx::proto::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto};
use edgehal::onnx::proto::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
};
use prost::Message;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vi(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, ins: &[&str], outs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// y = x + w, x: float[1,3].
fn model(nodes: Vec<NodeProto>, init_dims: &[i64]) -> ModelProto {
    let n: i64 = init_dims.iter().product();
    let raw: Vec<u8> = if n <= 16 {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    } else {
        vec![]
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            name: "bad".into(),
            node: nodes,
            initializer: vec![TensorProto {
                name: "w".into(),
                data_type: 1,
                dims: init_dims.to_vec(),
                raw_data: raw.into(),
                ..Default::default()
            }],
            input: vec![vi("x", 1, &[1, 3])],
            output: vec![vi("y", 1, &[1, 3])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn good() -> ModelProto {
    model(vec![node("Add", &["x", "w"], &["y"])], &[3])
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs the CLI; asserts failure with exactly one stderr line; returns that line.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail");
    assert_ne!(
        out.status.code(),
        Some(101),
        "{args:?} hit an internal error: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: expected one line, got:\n{err}"
    );
    assert!(err.starts_with("edgehal: "), "{err}");
    err
}

fn npy_f32(shape: &[usize], dtype_i64: bool) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let t = if dtype_i64 {
        edgehal_core::Tensor::from_vec(shape.to_vec(), vec![1i64; n]).unwrap()
    } else {
        edgehal_core::Tensor::from_vec(shape.to_vec(), vec![1f32; n]).unwrap()
    };
    edgehal::npy::to_npy(&t)
}

#[test]
fn bad_models_and_inputs_fail_cleanly() {
    let d = scratch("bad_input");
    let good_bytes = good().encode_to_vec();
    let ok = write(&d, "good.onnx", &good_bytes);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.onnx",
            good_bytes[..good_bytes.len() - 7].to_vec(),
            "not a valid ONNX model",
        ),
        (
            "random.onnx",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
            "not a valid ONNX model",
        ),
        ("empty.onnx", vec![], "empty"),
        (
            "huge.onnx",
            model(vec![node("Add", &["x", "w"], &["y"])], &[1 << 20, 1 << 20]).encode_to_vec(),
            "budget",
        ),
        (
            "cycle.onnx",
            model(
                vec![
                    node("Add", &["x", "b"], &["a"]),
                    node("Add", &["a", "w"], &["b"]),
                    node("Identity", &["b"], &["y"]),
                ],
                &[3],
            )
            .encode_to_vec(),
            "cycle",
        ),
        (
            "missing.onnx",
            model(vec![node("Add", &["x", "nowhere"], &["y"])], &[3]).encode_to_vec(),
            "'nowhere'",
        ),
    ];
    for (name, bytes, want) in &cases {
        let p = write(&d, name, bytes);
        let line = fails(&["run", p.to_str().unwrap()]);
        assert!(
            line.contains(want),
            "{name}: '{line}' should mention '{want}'"
        );
        assert!(
            edgehal::Model::load(&p).is_err(),
            "{name}: library should refuse it"
        );
    }
    // A truncated real model too.
    let real = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/mobilenet_v2.onnx"),
    );
    if let Ok(real) = real {
        let p = write(&d, "mnv2_cut.onnx", &real[..real.len() / 3]);
        fails(&["run", p.to_str().unwrap()]);
    }
    // Wrong input shape and dtype at run time.
    let shape = write(&d, "x_shape.npy", &npy_f32(&[2, 2], false));
    let line = fails(&[
        "run",
        ok.to_str().unwrap(),
        "--input",
        &format!("x={}", shape.display()),
    ]);
    assert!(line.contains("expected shape"), "{line}");
    let dt = write(&d, "x_dtype.npy", &npy_f32(&[1, 3], true));
    let line = fails(&[
        "run",
        ok.to_str().unwrap(),
        "--input",
        &format!("x={}", dt.display()),
    ]);
    assert!(line.contains("expected float32"), "{line}");
    let line = fails(&["run", ok.to_str().unwrap(), "--input", "nosuch=foo.npy"]);
    assert!(line.contains("no input 'nosuch'"), "{line}");
    let line = fails(&["run", d.join("does-not-exist.onnx").to_str().unwrap()]);
    assert!(line.contains("No such file"), "{line}");
}

#[test]
fn good_model_runs_and_writes_outputs() {
    let d = scratch("good_run");
    let p = write(&d, "good.onnx", &good().encode_to_vec());
    let x = write(&d, "x.npy", &npy_f32(&[1, 3], false));
    let outdir = d.join("out");
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args([
            "run",
            p.to_str().unwrap(),
            "--input",
            &format!("x={}", x.display()),
            "--output-dir",
            outdir.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["outputs"][0]["name"], "y");
    assert_eq!(doc["outputs"][0]["shape"], serde_json::json!([1, 3]));
    let y = edgehal::npy::from_npy(std::fs::read(outdir.join("y.npy")).unwrap().into()).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
}
