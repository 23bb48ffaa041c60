//! The image-classification example end to end (issue 8, item 4): examples/c/classify.c built
//! against libedgehal + libpng and the Rust twin (tools/examples/classify.rs) classify the
//! shipped test image; both must print the same top-5 and a latency.
//!
//! MobileNetV2 (../shared/models/mobilenet_v2.onnx) needs Conv/Clip/Add/Gemm, which land on main
//! separately: until then both programs exit 3 ("unsupported") on it and the test says SKIP for
//! that model; the stand-in classifier (ops already on main, same input interface) always runs.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// Build the C example once (the tests run in parallel and would race on the file).
fn build_c() -> Option<PathBuf> {
    static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();
    EXE.get_or_init(build_c_once).clone()
}

fn build_c_once() -> Option<PathBuf> {
    let has_png = || {
        Command::new("pkg-config")
            .args(["--exists", "libpng"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ensure_tool("pkg-config", "pkg-config") || !ensure(has_png, "libpng headers", "libpng-dev")
    {
        return None;
    }
    let flags = run_ok(
        Command::new("pkg-config").args(["--cflags", "--libs", "libpng"]),
        "pkg-config libpng",
    );
    let exe = work_dir("classify").join("classify");
    let mut extra: Vec<&str> = flags.split_whitespace().collect();
    extra.push("-lm");
    assert_built(
        &cc(&[repo().join("examples/c/classify.c")], &exe, &extra),
        "examples/c/classify.c",
    );
    Some(exe)
}

fn build_rust() -> PathBuf {
    cargo_build(&["-p", "edgehal-cli", "--example", "classify"]);
    examples_dir().join("classify")
}

/// The top-k lines ("  1: class 24  p=0.071540") and the latency in ms.
fn parse(out: &str) -> (Vec<(usize, f64)>, f64) {
    let top: Vec<(usize, f64)> = out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (_, rest) = l.split_once(": class ")?;
            let (class, p) = rest.split_once("  p=")?;
            Some((class.parse().ok()?, p.parse().ok()?))
        })
        .collect();
    let latency = out
        .lines()
        .find_map(|l| l.strip_prefix("latency: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no latency line in:\n{out}"));
    (top, latency)
}

fn check_agree(c_out: &str, rust_out: &str, classes: usize) {
    let (c_top, c_lat) = parse(c_out);
    let (r_top, r_lat) = parse(rust_out);
    assert_eq!(c_top.len(), 5.min(classes), "C top-k:\n{c_out}");
    assert!(c_lat >= 0.0 && r_lat >= 0.0);
    // Scores are probabilities in decreasing order.
    for w in c_top.windows(2) {
        assert!(w[0].1 >= w[1].1, "not sorted:\n{c_out}");
    }
    assert!(c_top
        .iter()
        .all(|&(k, p)| k < classes && p > 0.0 && p <= 1.0));
    // The two implementations agree on classes and (to print precision) on scores.
    assert_eq!(
        c_top.iter().map(|t| t.0).collect::<Vec<_>>(),
        r_top.iter().map(|t| t.0).collect::<Vec<_>>(),
        "C and Rust disagree:\n--- C\n{c_out}\n--- Rust\n{rust_out}"
    );
    for (c, r) in c_top.iter().zip(&r_top) {
        assert!((c.1 - r.1).abs() < 2e-6, "scores differ: {c:?} vs {r:?}");
    }
}

#[test]
fn classify_standin_model_in_c_and_rust() {
    let Some(c_exe) = build_c() else { return };
    let rust_exe = build_rust();
    let model = repo().join("ffi/tests/data/standin_classifier.onnx");
    let image = repo().join("examples/data/gradient.png");
    let c_out = run_ok(Command::new(&c_exe).arg(&model).arg(&image), "classify (C)");
    let r_out = run_ok(
        Command::new(&rust_exe).arg(&model).arg(&image),
        "classify (Rust)",
    );
    assert!(
        c_out.contains("image: ") && c_out.contains("(96x64) -> 224x224"),
        "{c_out}"
    );
    assert!(c_out.contains("NCHW"), "{c_out}");
    check_agree(&c_out, &r_out, 30);
    // The stand-in's scores are the normalised centre pixels, classes 0..10 red, 10..20 green,
    // 20..30 blue; the test image is bluest at its centre, so a layout or channel-order bug
    // (NHWC data, BGR) moves the top-5 out of 20..30.
    let (top, _) = parse(&c_out);
    assert!(
        top.iter().all(|&(k, _)| k >= 20),
        "expected blue/green centre classes: {top:?}"
    );
}

#[test]
fn classify_mobilenet_v2_in_c_and_rust() {
    let model = repo().join("../shared/models/mobilenet_v2.onnx");
    if !model.exists() {
        assert!(!in_ci(), "{} is missing", model.display());
        println!("SKIP: {} is missing", model.display());
        return;
    }
    let Some(c_exe) = build_c() else { return };
    let image = repo().join("examples/data/gradient.png");
    let out = Command::new(&c_exe)
        .arg(&model)
        .arg(&image)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        assert!(stderr.contains("unsupported"), "{stderr}");
        println!("SKIP: mobilenet_v2 needs operators not on this branch yet: {stderr}");
        return;
    }
    let c_out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "classify (C) failed:\n{c_out}\n{stderr}"
    );
    print!("{c_out}");
    let r_out = run_ok(
        Command::new(build_rust()).arg(&model).arg(&image),
        "classify (Rust)",
    );
    check_agree(&c_out, &r_out, 1000);
}
