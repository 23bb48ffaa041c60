//! Issue 3: the C example plugin runs its ops inside a real model. resnet18's Relu and Add
//! nodes are pinned to the plugin device (`example0`), the CPU runs the rest (Conv, pooling,
//! Gemm), the scheduler hands values across, and the output agrees with a CPU-only run.
//!
//! Proof that the plugin really computed those nodes, beyond the plan saying so: the same
//! plugin built with `-DEXAMPLE_ADD_SKEW=1.0` (every Add result off by one) changes the
//! model's output, while the exact build leaves it within tolerance.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgehal::plan::PlanConstraints;
use edgehal::plugin::PluginDriver;
use edgehal::profile::ProfileOptions;
use edgehal::scheduler::{Scheduler, SchedulerOptions};
use edgehal::{Model, Session, SessionOptions};
use edgehal_core::driver::{Device, Driver, SysRoot};
use edgehal_core::{Graph, Tensor};
use edgehal_cpu::device::CpuDevice;

fn build_plugin(dir: &str, defines: &[&str]) -> PathBuf {
    let root = edgehal_tests::repo_root().join("drivers/plugin-example");
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("plugins-model")
        .join(dir);
    std::fs::create_dir_all(&d).expect("plugin dir");
    let so = d.join("libedgehal_example.so");
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let compiler = cc::Build::new()
        .target(&target)
        .host(&target)
        .opt_level(1)
        .cargo_metadata(false)
        .get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"));
    for def in defines {
        cmd.arg(format!("-D{def}"));
    }
    cmd.arg("-o").arg(&so).arg(root.join("example_plugin.c"));
    let st = cmd.status().expect("running the C compiler");
    assert!(st.success(), "compiling the example plugin failed: {cmd:?}");
    so
}

fn plugin_device(so: &Path) -> Arc<dyn Device> {
    let d = PluginDriver::load(so).expect("load plugin");
    let infos = d.probe(&SysRoot::live());
    let info = infos
        .iter()
        .find(|i| i.name == "example0")
        .expect("example0");
    d.open(info).expect("open example0")
}

fn quick_profile() -> ProfileOptions {
    ProfileOptions {
        cache_dir: None,
        progress: false,
        warmup: 0,
        min_runs: 1,
        max_runs: 1,
        budget: Duration::from_millis(5),
        ..ProfileOptions::default()
    }
}

/// Deterministic input in [-1, 1).
fn input(n: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Split {
    plugin_nodes: usize,
    out: Vec<f32>,
}

/// Run `graph` with its Relu/Add nodes pinned to the plugin at `so`.
fn run_split(graph: &Graph, so: &Path, feeds: &[(String, Tensor)]) -> Split {
    let devices: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new()), plugin_device(so)];
    let pins: Vec<(String, String)> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op == "Relu" || n.op == "Add")
        .map(|(i, _)| (i.to_string(), "example0".to_string()))
        .collect();
    assert!(
        pins.len() >= 16,
        "resnet18 has {} Relu/Add nodes",
        pins.len()
    );
    let opts = SchedulerOptions {
        profile: quick_profile(),
        constraints: PlanConstraints {
            exclude: vec![],
            pins: pins.clone(),
        },
        force_threads: false,
    };
    let s = Scheduler::new(graph, devices, &opts).expect("scheduler");
    let plan = s.plan();
    let ex = plan
        .devices
        .iter()
        .position(|d| d == "example0")
        .expect("plugin in the plan");
    let cpu = plan
        .devices
        .iter()
        .position(|d| d == "cpu")
        .expect("cpu in the plan");
    // Per node: Relu/Add on the plugin, everything else (Conv, Gemm, pools) on the CPU.
    for (i, n) in graph.nodes.iter().enumerate() {
        let want = if n.op == "Relu" || n.op == "Add" {
            ex
        } else {
            cpu
        };
        assert_eq!(plan.assign[i], want, "node {i} ({})", n.op);
    }
    let plugin_segments = plan.segments.iter().filter(|s| s.device == ex).count();
    assert!(plugin_segments >= 8, "{plugin_segments} plugin segments");
    let plugin_nodes = plan
        .segments
        .iter()
        .filter(|s| s.device == ex)
        .map(|s| s.nodes.len())
        .sum();
    let outs = s.run(feeds.to_vec(), None).expect("split run");
    let out = outs[0].1.to_f32().into_owned();
    Split { plugin_nodes, out }
}

#[test]
fn resnet18_runs_relu_and_add_on_the_c_plugin_and_the_rest_on_cpu() {
    let path = edgehal_tests::model("resnet18.onnx");
    if !path.exists() {
        assert!(!edgehal_tests::strict(), "{} missing", path.display());
        println!("SKIP: {} missing", path.display());
        return;
    }
    let model = Model::load(&path).expect("load");
    let session = Session::new(&model, &SessionOptions::default()).expect("cpu session");
    // The graph a multi-device session plans: batch norms folded, no CPU-only fusion.
    let mut graph = model.graph.clone();
    edgehal::passes::optimize_portable(&mut graph, &edgehal_cpu::Registry::new()).expect("passes");
    let inp = session.inputs().next().expect("input").clone();
    let shape = inp.concrete_shape(1);
    let x = Tensor::from_vec(shape.clone(), input(shape.iter().product())).expect("tensor");
    let feeds = vec![(inp.name.clone(), x.clone())];
    let want = session.run(&[(inp.name.as_str(), x)]).expect("cpu run");
    let want = want[0].1.to_f32().into_owned();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = 1e-4 * scale.max(1.0);
    let max_diff = |got: &[f32]| {
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };

    let exact = run_split(&graph, &build_plugin("exact", &[]), &feeds);
    let d = max_diff(&exact.out);
    assert!(
        d <= tol,
        "cpu+plugin differs from cpu-only by {d} (tolerance {tol})"
    );
    assert!(exact.plugin_nodes >= 16, "{} nodes", exact.plugin_nodes);

    // A plugin whose Add is off by one: if the Adds really run in C, the output moves.
    let skewed = run_split(
        &graph,
        &build_plugin("skewed", &["EXAMPLE_ADD_SKEW=1.0f"]),
        &feeds,
    );
    let d = max_diff(&skewed.out);
    assert!(
        d > 100.0 * tol,
        "the skewed plugin did not change the output (diff {d}): its Adds did not run"
    );
}
