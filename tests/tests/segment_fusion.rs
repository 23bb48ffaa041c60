//! Planned sessions over several devices share a portable graph (no CPU-only rewrites), and
//! each CPU segment gets the CPU's own fusion when it is compiled
//! (`edgehal::passes::compile_segment`). On mobilenet_v2_int8.onnx (QDQ) that is the
//! difference between int8 convolutions and float ones: a plan that keeps everything on the
//! CPU must give the CPU-only session's bytes, and a plan that cuts a QDQ chain (one
//! convolution pinned to a second device) must still run and agree.

use std::sync::Arc;
use std::time::Duration;

use edgehal::plan::PlanConstraints;
use edgehal::profile::{seeded_inputs, Profile};
use edgehal::scheduler::{Scheduler, SchedulerOptions};
use edgehal::Model;
use edgehal_core::buffer::MemoryDomain;
use edgehal_core::driver::{Device, DeviceInfo, DeviceKind};
use edgehal_core::graph::Graph;
use edgehal_core::Tensor;
use edgehal_cpu::device::CpuDevice;
use edgehal_cpu::Registry;

const T: Option<Duration> = Some(Duration::from_secs(60));

fn model_graph(name: &str) -> Option<Graph> {
    let path = edgehal_tests::model(name);
    if !path.exists() {
        assert!(!edgehal_tests::strict(), "{} is missing", path.display());
        println!("SKIP: {} not found", path.display());
        return None;
    }
    Some(Model::load(&path).expect("load").graph)
}

/// A profile where every node costs `cost[d]` on device `d` (no transfers, no overheads).
fn flat_profile(g: &Graph, devices: &[&str], cost: &[f64]) -> Profile {
    let times = vec![cost.iter().map(|&c| Some(c)).collect(); g.nodes.len()];
    let mut p = edgehal_tests::made_up_profile(times, devices, g.values.len());
    p.order = g.topo_order().expect("order");
    p
}

/// A second CPU-backed device from another driver: it computes real results but gets no
/// CPU fusion, like any non-CPU backend.
fn other_device() -> Arc<dyn Device> {
    let info = DeviceInfo::new("cpu2", DeviceKind::Other, "test", vec![MemoryDomain::Host]);
    Arc::new(CpuDevice::with_info(info, Registry::new()))
}

fn run(
    g: &Graph,
    devices: Vec<Arc<dyn Device>>,
    prof: Profile,
    pins: &[(String, String)],
) -> (Vec<(String, Tensor)>, usize) {
    let opts = SchedulerOptions {
        constraints: PlanConstraints {
            exclude: Vec::new(),
            pins: pins.to_vec(),
        },
        ..SchedulerOptions::default()
    };
    let s = Scheduler::with_profile(g, devices, prof, &opts).expect("scheduler");
    let feeds: Vec<(String, Tensor)> = seeded_inputs(g, 7)
        .expect("inputs")
        .into_iter()
        .map(|(id, t)| (g.value_name(id).to_string(), t))
        .collect();
    let segments = s.plan().segments.len();
    (s.run(feeds, T).expect("run"), segments)
}

/// The CPU-only session's outputs: the graph with every CPU rewrite, one CPU segment.
fn cpu_only(g: &Graph) -> Vec<(String, Tensor)> {
    let mut full = g.clone();
    edgehal::passes::optimize(&mut full, &Registry::new()).expect("optimize");
    let prof = flat_profile(&full, &["cpu"], &[1.0]);
    run(&full, vec![Arc::new(CpuDevice::new())], prof, &[]).0
}

fn portable(g: &Graph) -> Graph {
    let mut p = g.clone();
    edgehal::passes::optimize_portable(&mut p, &Registry::new()).expect("optimize_portable");
    p
}

#[test]
fn an_all_cpu_plan_on_the_shared_graph_gives_the_cpu_only_bytes() {
    let Some(g) = model_graph("mobilenet_v2_int8.onnx") else {
        return;
    };
    let want = cpu_only(&g);
    let p = portable(&g);
    // The shared graph still holds the QDQ chains (weights not folded to float).
    assert!(
        p.nodes.iter().any(|n| n.op == "DequantizeLinear"),
        "portable graph lost its DequantizeLinear nodes"
    );
    let prof = flat_profile(&p, &["cpu", "cpu2"], &[1.0, 5.0]);
    let (got, segments) = run(
        &p,
        vec![Arc::new(CpuDevice::new()), other_device()],
        prof,
        &[],
    );
    assert_eq!(segments, 1, "expected the whole graph as one CPU segment");
    assert_eq!(got.len(), want.len());
    for ((gn, gt), (wn, wt)) in got.iter().zip(&want) {
        assert_eq!(gn, wn);
        assert_eq!(gt.shape(), wt.shape());
        // The int8 path and the float QDQ path differ in some outputs (86% equal to
        // onnxruntime in float, 100% as int8): equal bytes mean the segment ran as int8.
        assert_eq!(
            gt.bytes(),
            wt.bytes(),
            "{gn}: the CPU segment did not run as the CPU-only session does"
        );
    }
}

#[test]
fn a_plan_that_cuts_a_qdq_chain_runs_and_agrees() {
    let Some(g) = model_graph("mobilenet_v2_int8.onnx") else {
        return;
    };
    let want = cpu_only(&g);
    let p = portable(&g);
    // A convolution in the middle of the network, reading a DequantizeLinear output.
    let producers = p.producers();
    let qconvs: Vec<usize> = (0..p.nodes.len())
        .filter(|&i| {
            let n = &p.nodes[i];
            n.op == "Conv"
                && n.inputs[0]
                    .and_then(|x| producers[x])
                    .is_some_and(|q| p.nodes[q].op == "DequantizeLinear")
        })
        .collect();
    assert!(
        qconvs.len() > 10,
        "expected the QDQ convolutions, found {}",
        qconvs.len()
    );
    let pinned = qconvs[qconvs.len() / 2];
    let prof = flat_profile(&p, &["cpu", "cpu2"], &[1.0, 5.0]);
    let pins = vec![(pinned.to_string(), "cpu2".to_string())];
    let (got, segments) = run(
        &p,
        vec![Arc::new(CpuDevice::new()), other_device()],
        prof,
        &pins,
    );
    assert_eq!(segments, 3, "the pinned convolution did not split the plan");
    for ((gn, gt), (_, wt)) in got.iter().zip(&want) {
        let (a, b) = (gt.to_f32().to_vec(), wt.to_f32().to_vec());
        assert_eq!(a.len(), b.len());
        let top = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map(|(i, _)| i)
        };
        assert_eq!(top(&a), top(&b), "{gn}: top class differs");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mean: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
        assert!(
            mean <= 0.02 * scale,
            "{gn}: mean difference {mean} against largest magnitude {scale}"
        );
    }
}
