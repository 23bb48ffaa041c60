//! The partitioner against brute force on 500 seeded random DAGs (up to 12 nodes, 3
//! devices, random latency tables with unsupported entries and random transfer costs), pins
//! and exclusions, and the profiler's disk cache (second load profiles nothing; corrupt and
//! stale entries are rebuilt).

use std::collections::HashMap;
use std::sync::Arc;

use edgehal::partition::{self, Problem, TransferCost, Value};
use edgehal::plan::{Plan, PlanConstraints};
use edgehal::profile::{profile, ProfileOptions};
use edgehal_core::buffer::MemoryDomain;
use edgehal_core::driver::Device;
use edgehal_core::graph::{Dim, Graph, Node, ValueInfo};
use edgehal_core::{DType, Tensor};
use edgehal_cpu::device::CpuDevice;
use edgehal_null::{NullConfig, NullDevice};
use edgehal_tests::made_up_profile;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn random_problem(seed: u64) -> Problem {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let n = 2 + r.below(11) as usize; // 2..=12
    let nd = 1 + r.below(3) as usize; // 1..=3
    let cost: Vec<Vec<Option<f64>>> = (0..n)
        .map(|_| {
            let mut row: Vec<Option<f64>> = (0..nd)
                .map(|_| (r.below(5) != 0).then(|| 0.1 + 10.0 * r.f()))
                .collect();
            if row.iter().all(|c| c.is_none()) {
                let d = r.below(nd as u64) as usize;
                row[d] = Some(0.1 + 10.0 * r.f());
            }
            row
        })
        .collect();
    let mut values = Vec::new();
    // Graph inputs read by random early nodes.
    for _ in 0..1 + r.below(2) {
        let c = r.below(n.min(3) as u64) as usize;
        values.push(Value {
            producer: None,
            consumers: vec![c],
            to_host: false,
            bytes: r.below(1 << 20),
        });
    }
    // One output per node, read by up to three later nodes; the rest are graph outputs.
    for i in 0..n {
        let mut cons = Vec::new();
        if i + 1 < n {
            for _ in 0..1 + r.below(3) {
                let c = i + 1 + r.below((n - i - 1) as u64) as usize;
                if !cons.contains(&c) {
                    cons.push(c);
                }
            }
        }
        values.push(Value {
            producer: Some(i),
            to_host: cons.is_empty() || r.below(6) == 0,
            consumers: cons,
            bytes: r.below(1 << 20),
        });
    }
    let transfer = (0..=nd)
        .map(|i| {
            (0..=nd)
                .map(|j| {
                    if i == j || r.below(4) == 0 {
                        TransferCost::ZERO
                    } else {
                        TransferCost {
                            fixed_ms: 3.0 * r.f(),
                            per_byte_ms: 4e-6 * r.f(),
                        }
                    }
                })
                .collect()
        })
        .collect();
    // Half the problems also charge a fixed cost per segment (per device).
    let segment_ms = if r.below(2) == 0 {
        (0..nd).map(|_| 2.0 * r.f()).collect()
    } else {
        vec![]
    };
    Problem {
        n_devices: nd,
        cost,
        values,
        transfer,
        segment_ms,
    }
}

/// Every assignment, no pruning.
fn brute_force(p: &Problem) -> f64 {
    let n = p.n_nodes();
    let mut a = vec![0usize; n];
    let mut best = f64::INFINITY;
    loop {
        best = best.min(p.cost(&a));
        let mut k = 0;
        loop {
            if k == n {
                return best;
            }
            a[k] += 1;
            if a[k] < p.n_devices {
                break;
            }
            a[k] = 0;
            k += 1;
        }
    }
}

#[test]
fn heuristic_and_partition_are_within_two_percent_of_brute_force_on_500_graphs() {
    let mut exact_hits = 0;
    let mut worst: f64 = 1.0;
    let mut chains = 0;
    for seed in 1..=500u64 {
        let p = random_problem(seed);
        let opt = brute_force(&p);
        assert!(opt.is_finite(), "seed {seed}: no feasible assignment");
        let h = partition::heuristic(&p).unwrap();
        assert_eq!(h.assign.len(), p.n_nodes());
        assert!((p.cost(&h.assign) - h.cost).abs() < 1e-9);
        let ratio = h.cost / opt;
        assert!(
            ratio <= 1.02 + 1e-12,
            "seed {seed}: heuristic {} vs optimum {opt} ({} nodes, {} devices)",
            h.cost,
            p.n_nodes(),
            p.n_devices
        );
        assert!(h.cost >= opt - 1e-9, "seed {seed}: below the optimum?");
        worst = worst.max(ratio);
        if (h.cost - opt).abs() < 1e-9 {
            exact_hits += 1;
        }
        let s = partition::partition(&p).unwrap();
        assert!(
            s.cost <= opt * 1.02 + 1e-12,
            "seed {seed}: partition {}",
            s.cost
        );
        if s.method == "exact" {
            assert!((s.cost - opt).abs() < 1e-9, "seed {seed}: exact missed");
        }
        if p.is_chain() {
            chains += 1;
            assert!(
                (s.cost - opt).abs() < 1e-9,
                "seed {seed}: chain DP not exact"
            );
        }
    }
    println!("heuristic optimal on {exact_hits}/500, worst ratio {worst:.4}, {chains} chains");
}

#[test]
fn chain_dp_is_exact_on_long_random_chains() {
    for seed in 1..=100u64 {
        let mut r = Rng(seed * 7919 + 1);
        let n = 10;
        let nd = 3;
        let cost: Vec<Vec<Option<f64>>> = (0..n)
            .map(|_| (0..nd).map(|_| Some(0.1 + 5.0 * r.f())).collect())
            .collect();
        let mut values = vec![Value {
            producer: None,
            consumers: vec![0],
            to_host: false,
            bytes: 1000,
        }];
        for i in 0..n {
            values.push(Value {
                producer: Some(i),
                consumers: if i + 1 < n { vec![i + 1] } else { vec![] },
                to_host: i + 1 == n,
                bytes: 1000,
            });
        }
        let transfer = (0..=nd)
            .map(|i| {
                (0..=nd)
                    .map(|j| TransferCost {
                        fixed_ms: if i == j { 0.0 } else { 2.0 * r.f() },
                        per_byte_ms: 0.0,
                    })
                    .collect()
            })
            .collect();
        let segment_ms = (0..nd).map(|_| r.f()).collect();
        let p = Problem {
            n_devices: nd,
            cost,
            values,
            transfer,
            segment_ms,
        };
        assert!(p.is_chain());
        let s = partition::partition(&p).unwrap();
        assert_eq!(s.method, "chain-dp");
        assert!((s.cost - brute_force(&p)).abs() < 1e-9, "seed {seed}");
    }
}

fn f32_value(g: &mut Graph, name: &str, shape: &[usize]) -> usize {
    let id = g.value_id(name);
    g.values[id] = ValueInfo {
        name: name.into(),
        dtype: Some(DType::F32),
        shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
    };
    id
}

/// x -> Abs -> a ; a * w -> b ; Exp(b) -> c ; c + x -> y
pub fn small_graph() -> Graph {
    let mut g = Graph::new("small");
    let x = f32_value(&mut g, "x", &[4, 8]);
    let a = f32_value(&mut g, "a", &[4, 8]);
    let w = f32_value(&mut g, "w", &[1]);
    let b = f32_value(&mut g, "b", &[4, 8]);
    let c = f32_value(&mut g, "c", &[4, 8]);
    let y = f32_value(&mut g, "y", &[4, 8]);
    g.inputs = vec![x];
    g.outputs = vec![y];
    g.opsets.insert(String::new(), 17);
    g.initializers
        .insert(w, Tensor::from_vec(vec![1], vec![0.5f32]).unwrap());
    let mk = |op: &str, i: Vec<usize>, o: usize| Node {
        op: op.into(),
        inputs: i.into_iter().map(Some).collect(),
        outputs: vec![Some(o)],
        ..Default::default()
    };
    g.nodes.push(mk("Abs", vec![x], a));
    g.nodes.push(mk("Mul", vec![a, w], b));
    g.nodes.push(mk("Exp", vec![b], c));
    g.nodes.push(mk("Add", vec![c, x], y));
    g
}

#[test]
fn segment_costs_are_charged_once_per_segment() {
    let g = small_graph();
    let times = vec![
        vec![Some(5.0), Some(1.0)],
        vec![Some(5.0), Some(1.0)],
        vec![Some(1.0), Some(5.0)],
        vec![Some(5.0), Some(1.0)],
    ];
    // Cheap segments: split around node 2 (3 segments), 4 ms of nodes + 3 x 0.5.
    let mut p = made_up_profile(times.clone(), &["cpu", "null0"], 6);
    p.segment_ms = vec![0.5, 0.5];
    let plan = Plan::choose(&g, &p, &PlanConstraints::default()).unwrap();
    assert_eq!(plan.assign, vec![1, 1, 0, 1]);
    assert!(
        (plan.predicted_ms - 5.5).abs() < 1e-9,
        "{}",
        plan.predicted_ms
    );
    let seg_sum: f64 = plan.segments.iter().map(|s| s.predicted_ms).sum();
    assert!((seg_sum - 5.5).abs() < 1e-9, "{seg_sum}");
    // Dear segments on null0: all on null0 (8 + 4 = 12) beats the split (4 + 4 + 0.5 + 4)
    // and [null0, null0, cpu, cpu] (8 + 4 + 0.5).
    p.segment_ms = vec![0.5, 4.0];
    let plan = Plan::choose(&g, &p, &PlanConstraints::default()).unwrap();
    assert_eq!(plan.segments.len(), 1, "{:?}", plan.assign);
    assert_eq!(plan.assign, vec![1, 1, 1, 1]);
    assert!(
        (plan.predicted_ms - 12.0).abs() < 1e-9,
        "{}",
        plan.predicted_ms
    );
}

#[test]
fn request_and_dispatch_overheads_are_in_the_prediction() {
    let g = small_graph();
    let times = vec![
        vec![Some(5.0), Some(1.0)],
        vec![Some(5.0), Some(1.0)],
        vec![Some(1.0), Some(5.0)],
        vec![Some(5.0), Some(1.0)],
    ];
    // Submission 0.5 ms per segment, the scheduler's hand-offs 0.25 ms more on cpu and
    // 0.125 ms more on null0, and 0.75 ms per request: the split (3 segments) predicts
    // 4 ms of nodes + (0.5 + 0.125) x 2 + (0.5 + 0.25) + 0.75.
    let mut p = made_up_profile(times, &["cpu", "null0"], 6);
    p.segment_ms = vec![0.5, 0.5];
    p.dispatch_ms = vec![0.25, 0.125];
    p.request_ms = 0.75;
    let plan = Plan::choose(&g, &p, &PlanConstraints::default()).unwrap();
    assert_eq!(plan.assign, vec![1, 1, 0, 1]);
    let want = 4.0 + 0.625 * 2.0 + 0.75 + 0.75;
    assert!(
        (plan.predicted_ms - want).abs() < 1e-9,
        "{}",
        plan.predicted_ms
    );
    assert_eq!(plan.request_ms, 0.75);
    assert_eq!(plan.segment_ms, vec![0.75, 0.625]);
    assert_eq!(plan.dispatch_ms, vec![0.25, 0.125]);
    // Segments carry their own overheads, the plan adds the request once.
    let seg_sum: f64 = plan.segments.iter().map(|s| s.predicted_ms).sum();
    assert!((seg_sum + 0.75 - want).abs() < 1e-9, "{seg_sum}");
    assert!(plan.table().contains("request overhead 0.7500 ms"));
    // Single-device plans include them too.
    let single = Plan::single_device(&g, &p, 1).unwrap();
    assert!((single.predicted_ms - (8.0 + 0.625 + 0.75)).abs() < 1e-9);
    // Dear hand-offs on null0 (3 ms a segment) make the split lose to null0 alone
    // (8 + 3.5) against 4 + 2 x 3.5 + 0.75; the request's cost never changes the choice.
    p.dispatch_ms = vec![0.25, 3.0];
    let plan = Plan::choose(&g, &p, &PlanConstraints::default()).unwrap();
    assert_eq!(plan.assign, vec![1, 1, 1, 1]);
    assert!((plan.predicted_ms - (8.0 + 3.5 + 0.75)).abs() < 1e-9);
}

#[test]
fn pins_and_exclusions_are_obeyed() {
    let g = small_graph();
    let p = made_up_profile(
        vec![
            vec![Some(5.0), Some(1.0)],
            vec![Some(5.0), Some(1.0)],
            vec![Some(1.0), Some(5.0)],
            vec![Some(5.0), Some(1.0)],
        ],
        &["cpu", "null0"],
        6,
    );
    let free = Plan::choose(&g, &p, &PlanConstraints::default()).unwrap();
    assert_eq!(free.assign, vec![1, 1, 0, 1]);
    assert_eq!(free.segments.len(), 3);
    assert!((free.predicted_ms - 4.0).abs() < 1e-9);
    let pinned = Plan::choose(
        &g,
        &p,
        &PlanConstraints {
            pins: vec![("1".into(), "cpu".into())],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(pinned.assign[1], 0);
    let excl = Plan::choose(
        &g,
        &p,
        &PlanConstraints {
            exclude: vec!["null0".into()],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(excl.assign, vec![0, 0, 0, 0]);
    assert_eq!(excl.used_devices(), vec!["cpu"]);
    // Excluding the only device that runs a node is an error naming the node.
    let only = made_up_profile(
        vec![
            vec![None, Some(1.0)],
            vec![Some(5.0), Some(1.0)],
            vec![Some(1.0), Some(5.0)],
            vec![Some(5.0), Some(1.0)],
        ],
        &["cpu", "null0"],
        6,
    );
    let e = Plan::choose(
        &g,
        &only,
        &PlanConstraints {
            exclude: vec!["null0".into()],
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("node 0 (Abs)") && e.contains("null0: excluded"),
        "{e}"
    );
    assert!(Plan::choose(
        &g,
        &p,
        &PlanConstraints {
            exclude: vec!["gpu9".into()],
            ..Default::default()
        }
    )
    .is_err());
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

#[test]
fn second_profile_comes_from_the_cache_and_bad_entries_are_rebuilt() {
    let dir = std::env::temp_dir().join(format!("edgehal-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let g = small_graph();
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new())];
    let opts = ProfileOptions {
        cache_dir: Some(dir.clone()),
        ..quick()
    };
    let p1 = profile(&g, &devs, &opts).unwrap();
    assert_eq!((p1.measured, p1.cached, p1.rebuilt), (4, 0, 0));
    let p2 = profile(&g, &devs, &opts).unwrap();
    assert_eq!(
        (p2.measured, p2.cached, p2.rebuilt),
        (0, 4, 0),
        "second load profiles nothing"
    );
    assert_eq!(p1.times, p2.times);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "txt"))
        .unwrap();
    // Corrupt one entry: flip a digit of its time.
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let line = &mut lines[2];
    let mid = line.find(' ').unwrap() + 3;
    let ch = line.as_bytes()[mid];
    let flipped = if ch == b'0' { '1' } else { '0' };
    line.replace_range(mid..mid + 1, &flipped.to_string());
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let p3 = profile(&g, &devs, &opts).unwrap();
    // The corrupt entry is dropped, and the device's nodes are all timed again: node times
    // are calibrated against the runs they form, so a device is measured whole or not at all.
    assert_eq!(
        (p3.measured, p3.cached, p3.rebuilt),
        (4, 0, 1),
        "corrupt entry measured again"
    );
    let p4 = profile(&g, &devs, &opts).unwrap();
    assert_eq!(
        (p4.measured, p4.rebuilt),
        (0, 0),
        "and the file was rewritten"
    );
    // A stale stamp (another format or driver version) rebuilds everything.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replacen(
            &format!("edgehal-profile {} ", edgehal::profile::CACHE_FORMAT),
            "edgehal-profile 0 ",
            1,
        ),
    )
    .unwrap();
    let p5 = profile(&g, &devs, &opts).unwrap();
    assert_eq!((p5.measured, p5.cached, p5.rebuilt), (4, 0, 1));
    // Garbage instead of a cache file is not trusted either.
    std::fs::write(&file, b"\xff\xfe garbage\n1 2 3\n").unwrap();
    let p6 = profile(&g, &devs, &opts).unwrap();
    assert_eq!((p6.measured, p6.cached), (4, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn profiled_null_latencies_drive_the_plan() {
    // Two null devices with configured latencies: Exp is slow on null0 and fast on null1,
    // everything else the other way round. The profile must see at least the configured
    // sleep and the plan must follow it (no assertion on an upper bound of a timing).
    let ms = std::time::Duration::from_millis;
    let mk = |name: &str, slow: &[&str], fast: &[&str]| -> Arc<dyn Device> {
        let mut op_latency = HashMap::new();
        for s in slow {
            op_latency.insert(s.to_string(), ms(40));
        }
        for f in fast {
            op_latency.insert(f.to_string(), ms(0));
        }
        let info = edgehal_core::driver::DeviceInfo::new(
            name,
            edgehal_core::driver::DeviceKind::Other,
            "null",
            vec![MemoryDomain::Host],
        );
        Arc::new(NullDevice::new(
            info,
            NullConfig {
                op_latency,
                ..NullConfig::default()
            },
        ))
    };
    let devs = vec![
        mk("null0", &["Exp"], &["Abs", "Mul", "Add"]),
        mk("null1", &["Abs", "Mul", "Add"], &["Exp"]),
    ];
    let g = small_graph();
    let opts = ProfileOptions {
        min_runs: 1,
        max_runs: 3,
        warmup: 0,
        ..quick()
    };
    let p = profile(&g, &devs, &opts).unwrap();
    assert!(p.times[2][0].unwrap() >= 40.0, "{:?}", p.times);
    assert!(p.times[0][1].unwrap() >= 40.0, "{:?}", p.times);
    let plan = Plan::choose(&g, &p, &PlanConstraints::default()).unwrap();
    assert_eq!(plan.assign, vec![0, 0, 1, 0]);
    assert_eq!(plan.segments.len(), 3);
    assert!(plan.predicted_ms < 40.0);
    // The prediction is the chosen nodes' times plus one segment cost per segment (the
    // devices share memory: no transfers).
    assert!(p.segment_ms.iter().all(|&s| s > 0.0), "{:?}", p.segment_ms);
    let nodes: f64 = (0..4).map(|n| p.times[n][plan.assign[n]].unwrap()).sum();
    let segs: f64 = plan.segments.iter().map(|s| p.segment_ms[s.device]).sum();
    assert!(plan.transfers.iter().all(|t| t.predicted_ms == 0.0));
    assert!(
        (plan.predicted_ms - (nodes + segs)).abs() < 1e-9,
        "{} vs {nodes} + {segs}",
        plan.predicted_ms
    );
}
