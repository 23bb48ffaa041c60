//! CPU + Vulkan (Mesa lavapipe in CI) through the profiler, the partitioner and the
//! scheduler: a graph mixing ops the Vulkan driver runs with one it does not (Erf) is planned
//! across both devices, run, and compared with the CPU alone; `edgehal plan --devices
//! cpu,vulkan` works end to end. Without a Vulkan device the tests say
//! "skipped: no Vulkan device (reason)"; with `CI=true` they fail instead.

use std::process::Command;
use std::sync::Arc;

use edgehal::plan::PlanConstraints;
use edgehal::profile::ProfileOptions;
use edgehal::scheduler::{open_devices_with, Scheduler, SchedulerOptions};
use edgehal_core::driver::Device;
use edgehal_core::graph::{Attr, Dim, Graph, Node, ValueInfo};
use edgehal_core::{DType, Tensor};

/// The Vulkan device, or `None` after saying why (a failure under `CI=true`).
fn vulkan() -> Option<Arc<dyn Device>> {
    match open_devices_with(&["vulkan".to_string()], &[&edgehal_vulkan::Driver]) {
        Ok(mut v) => v.pop(),
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but no Vulkan device: {e}");
            }
            println!("skipped: no Vulkan device ({e})");
            None
        }
    }
}

fn value(g: &mut Graph, name: &str, shape: &[usize]) -> usize {
    let id = g.value_id(name);
    g.values[id] = ValueInfo {
        name: name.into(),
        dtype: Some(DType::F32),
        shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
    };
    id
}

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    Tensor::from_vec(shape.to_vec(), v).unwrap()
}

/// x[1,3,16,16] -> Conv(8x3x3x3, pad 1) "conv" -> Relu -> Erf (not on Vulkan) -> Mul(x2)
/// -> GlobalAveragePool -> Flatten -> Gemm(4x8, transB) -> y[1,4]
fn mixed_graph() -> Graph {
    let mut g = Graph::new("mixed");
    g.opsets.insert(String::new(), 17);
    let x = value(&mut g, "x", &[1, 3, 16, 16]);
    let w = value(&mut g, "w", &[8, 3, 3, 3]);
    let b = value(&mut g, "b", &[8]);
    let c = value(&mut g, "c", &[1, 8, 16, 16]);
    let r = value(&mut g, "r", &[1, 8, 16, 16]);
    let e = value(&mut g, "e", &[1, 8, 16, 16]);
    let two = value(&mut g, "two", &[1]);
    let m = value(&mut g, "m", &[1, 8, 16, 16]);
    let p = value(&mut g, "p", &[1, 8, 1, 1]);
    let f = value(&mut g, "f", &[1, 8]);
    let w2 = value(&mut g, "w2", &[4, 8]);
    let y = value(&mut g, "y", &[1, 4]);
    g.inputs = vec![x];
    g.outputs = vec![y];
    g.initializers.insert(w, seeded(&[8, 3, 3, 3], 1));
    g.initializers.insert(b, seeded(&[8], 2));
    g.initializers
        .insert(two, Tensor::from_vec(vec![1], vec![2.0f32]).unwrap());
    g.initializers.insert(w2, seeded(&[4, 8], 3));
    let mut node = |name: &str, op: &str, ins: &[usize], out: usize, attrs: Vec<(&str, Attr)>| {
        g.nodes.push(Node {
            name: name.into(),
            op: op.into(),
            inputs: ins.iter().map(|&i| Some(i)).collect(),
            outputs: vec![Some(out)],
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..Default::default()
        })
    };
    node(
        "conv",
        "Conv",
        &[x, w, b],
        c,
        vec![("pads", Attr::Ints(vec![1, 1, 1, 1]))],
    );
    node("relu", "Relu", &[c], r, vec![]);
    node("erf", "Erf", &[r], e, vec![]);
    node("mul", "Mul", &[e, two], m, vec![]);
    node("gap", "GlobalAveragePool", &[m], p, vec![]);
    node("flatten", "Flatten", &[p], f, vec![]);
    node("gemm", "Gemm", &[f, w2], y, vec![("transB", Attr::Int(1))]);
    g
}

fn quick() -> ProfileOptions {
    ProfileOptions {
        cache_dir: None,
        progress: false,
        warmup: 1,
        min_runs: 3,
        max_runs: 5,
        ..ProfileOptions::default()
    }
}

fn run_on(devices: Vec<Arc<dyn Device>>, constraints: PlanConstraints) -> (Vec<f32>, Vec<String>) {
    let g = mixed_graph();
    let opts = SchedulerOptions {
        profile: quick(),
        constraints,
        ..SchedulerOptions::default()
    };
    let s = Scheduler::new(&g, devices, &opts).unwrap();
    let plan = s.plan();
    let used: Vec<String> = plan.used_devices().iter().map(|d| d.to_string()).collect();
    let x = seeded(&[1, 3, 16, 16], 9);
    let out = s.run(vec![("x".to_string(), x)], None).unwrap();
    let y = out
        .iter()
        .find(|(n, _)| n == "y")
        .unwrap()
        .1
        .to_f32()
        .to_vec();
    (y, used)
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * scale, "y[{i}]: {x} vs cpu {y}");
    }
}

#[test]
fn cpu_and_vulkan_planned_run_and_agree_with_cpu_alone() {
    let Some(vk) = vulkan() else { return };
    let vk_name = vk.info().name.clone();
    let cpu: Arc<dyn Device> = Arc::new(edgehal_cpu::device::CpuDevice::new());
    // Erf cannot go to Vulkan; the profile must say so.
    let g = mixed_graph();
    let erf = g.nodes.iter().position(|n| n.op == "Erf").unwrap();
    let prof =
        edgehal::profile::profile(&g, &[Arc::clone(&cpu), Arc::clone(&vk)], &quick()).unwrap();
    assert!(prof.times[erf][1].is_none(), "{:?}", prof.times[erf]);
    assert!(prof.reasons[erf][1]
        .as_deref()
        .unwrap_or("")
        .contains("Erf"));
    let on_vk = (0..g.nodes.len())
        .filter(|&n| prof.times[n][1].is_some())
        .count();
    assert_eq!(on_vk, g.nodes.len() - 1, "{:?}", prof.reasons);

    let (want, used) = run_on(vec![Arc::clone(&cpu)], PlanConstraints::default());
    assert_eq!(used, vec!["cpu"]);
    // Free choice: whatever the partitioner picks is correct.
    let (free, _) = run_on(
        vec![Arc::clone(&cpu), Arc::clone(&vk)],
        PlanConstraints::default(),
    );
    close(&free, &want);
    // The convolution pinned to Vulkan: both devices run nodes, with transfers between.
    let pins = PlanConstraints {
        pins: vec![
            ("conv".into(), vk_name.clone()),
            ("gemm".into(), vk_name.clone()),
        ],
        ..PlanConstraints::default()
    };
    let (mixed, used) = run_on(vec![Arc::clone(&cpu), Arc::clone(&vk)], pins);
    assert!(used.contains(&"cpu".to_string()), "{used:?}");
    assert!(used.contains(&vk_name), "{used:?}");
    close(&mixed, &want);
}

#[test]
fn plan_cli_on_cpu_and_vulkan() {
    if vulkan().is_none() {
        return;
    }
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/lstm_kws.onnx");
    if !model.exists() {
        // The dev models live beside the checkout; the synthetic test above still ran.
        println!("skipped: {} not present", model.display());
        return;
    }
    let cache = std::env::temp_dir().join(format!("edgehal-vk-plan-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .args(["plan", "--devices", "cpu,vulkan", "--json", "--runs", "2"])
        .arg(&model)
        .env("EDGEHAL_CACHE_DIR", &cache)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&cache);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let devices: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(devices, vec!["cpu", "vulkan"]);
    let nodes = v["nodes"].as_array().unwrap();
    assert!(!nodes.is_empty());
    // Every node has a CPU time, and Vulkan measured the nodes it supports.
    let mut vk_timed = 0;
    for n in nodes {
        assert!(n["times_ms"]["cpu"].is_number(), "{n}");
        if n["times_ms"].as_object().unwrap().len() > 1
            && n["times_ms"]
                .as_object()
                .unwrap()
                .iter()
                .any(|(d, t)| d != "cpu" && t.is_number())
        {
            vk_timed += 1;
        }
    }
    assert!(vk_timed > 0, "no node was timed on Vulkan");
    assert!(v["measured_ms"].as_f64().unwrap() > 0.0);
    // At least the CPU alone was measured as the baseline the plan must not lose to.
    assert!(!v["single_device"].as_array().unwrap().is_empty(), "{v}");
}

/// `edgehal run --device vulkan`: the session reaches the registered Vulkan driver, runs the
/// MatMul there (device `plan(vulkan0)`), and agrees with `--device cpu` on the same seed.
#[test]
fn run_cli_with_device_vulkan() {
    if vulkan().is_none() {
        return;
    }
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ffi/tests/data/matmul.onnx");
    let run = |device: &str| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_edgehal"))
            .arg("run")
            .arg(&model)
            .args(["--device", device, "--json"])
            .output()
            .expect("running edgehal");
        assert!(
            out.status.success(),
            "--device {device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let (gpu, cpu) = (run("vulkan"), run("cpu"));
    assert_eq!(gpu["device"], "plan(vulkan0)", "{gpu}");
    assert_eq!(cpu["device"], "cpu", "{cpu}");
    for k in ["min", "max", "mean"] {
        let (a, b) = (
            gpu["outputs"][0]["stats"][k].as_f64().expect("stat"),
            cpu["outputs"][0]["stats"][k].as_f64().expect("stat"),
        );
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{k}: vulkan {a}, cpu {b}"
        );
    }
    let bogus = Command::new(env!("CARGO_BIN_EXE_edgehal"))
        .arg("run")
        .arg(&model)
        .args(["--device", "nosuchdevice"])
        .output()
        .expect("running edgehal");
    assert!(!bogus.status.success());
    let err = String::from_utf8_lossy(&bogus.stderr);
    assert!(
        err.contains("unknown device 'nosuchdevice'") && err.contains("vulkan"),
        "{err}"
    );
}
