//! The scheduler over CPU + null devices and CPU + the C example plugin: async submission
//! with many requests in flight (io_uring reactor and the thread fallback), device loss
//! mid-run (null driver injection, and a plugin device wrapped to fail) re-planned onto the
//! remaining devices with correct results, failures that end in an error instead of a hang,
//! and file reads through the reactor into aligned buffers.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edgehal::plugin::load_all;
use edgehal::profile::{profile, ProfileOptions};
use edgehal::reactor::{Backend, Reactor};
use edgehal::scheduler::{Scheduler, SchedulerOptions};
use edgehal_core::buffer::{page_size, MemoryDomain};
use edgehal_core::driver::{
    Bindings, Device, DeviceInfo, DeviceKind, Driver, Executable, Fence, Subgraph, Support, SysRoot,
};
use edgehal_core::graph::{Dim, Graph, Node, ValueInfo};
use edgehal_core::{DType, Error, Result, Tensor};
use edgehal_cpu::device::CpuDevice;
use edgehal_null::{NullConfig, NullDevice};
use edgehal_tests::made_up_profile;

const T: Option<Duration> = Some(Duration::from_secs(20));

fn f32_value(g: &mut Graph, name: &str, shape: &[usize]) -> usize {
    let id = g.value_id(name);
    g.values[id] = ValueInfo {
        name: name.into(),
        dtype: Some(DType::F32),
        shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
    };
    id
}

/// x -> Abs -> a ; a * w -> b ; Exp(b) -> c ; c + x -> y   (y = exp(|x| / 2) + x)
fn graph() -> Graph {
    let mut g = Graph::new("sched");
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

fn input(k: usize) -> Tensor {
    let v: Vec<f32> = (0..32)
        .map(|i| (i as f32 - 16.0) / 8.0 + k as f32 * 0.01)
        .collect();
    Tensor::from_vec(vec![4, 8], v).unwrap()
}

fn expected(x: &Tensor) -> Vec<f32> {
    x.to_f32()
        .iter()
        .map(|&x| (x.abs() * 0.5).exp() + x)
        .collect()
}

fn check(out: &[(String, Tensor)], x: &Tensor) {
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "y");
    let got = out[0].1.to_f32().to_vec();
    let want = expected(x);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
}

fn null(name: &str, cfg: NullConfig) -> Arc<NullDevice> {
    let info = DeviceInfo::new(name, DeviceKind::Other, "null", vec![MemoryDomain::Host]);
    Arc::new(NullDevice::new(info, cfg))
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

fn many_in_flight(force_threads: bool) {
    // The null device runs Abs as pass-through, which is exact where Abs's input is already
    // non-negative: a second Abs after the first.
    let mut g = graph();
    // Insert Abs(a) -> a2 in front of Mul so a pass-through Abs on null0 is exact.
    let a = g.find_value("a").unwrap();
    let a2 = f32_value(&mut g, "a2", &[4, 8]);
    g.nodes.insert(
        1,
        Node {
            op: "Abs".into(),
            inputs: vec![Some(a)],
            outputs: vec![Some(a2)],
            ..Default::default()
        },
    );
    g.nodes[2].inputs[0] = Some(a2);
    let cfg = NullConfig {
        passthrough: HashSet::from(["Abs".to_string()]),
        default_latency: Duration::from_millis(2),
        ..NullConfig::default()
    };
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new()), null("null0", cfg)];
    // Node 1 (the second Abs) is fastest on null0; everything else on the CPU.
    let mut prof = made_up_profile(
        vec![
            vec![Some(1.0), None],
            vec![Some(5.0), Some(1.0)],
            vec![Some(1.0), None],
            vec![Some(1.0), None],
            vec![Some(1.0), None],
        ],
        &["cpu", "null0"],
        6,
    );
    prof.value_bytes = vec![128; g.values.len()];
    let opts = SchedulerOptions {
        force_threads,
        ..SchedulerOptions::default()
    };
    let s = Scheduler::with_profile(&g, devs, prof, &opts).unwrap();
    assert_eq!(
        s.reactor_backend(),
        if force_threads {
            Backend::Threads
        } else {
            Backend::IoUring
        }
    );
    let plan = s.plan();
    assert_eq!(plan.assign, vec![0, 1, 0, 0, 0]);
    assert_eq!(plan.segments.len(), 3);
    let called = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for k in 0..24 {
        let c = Arc::clone(&called);
        let h = s
            .submit_with(
                vec![("x".into(), input(k))],
                Some(Box::new(move |r| {
                    assert!(r.is_ok());
                    c.fetch_add(1, Ordering::SeqCst);
                })),
            )
            .unwrap();
        handles.push((k, h));
    }
    for (k, h) in handles {
        let out = h.wait(T).unwrap();
        check(&out, &input(k));
    }
    assert_eq!(
        called.load(Ordering::SeqCst),
        24,
        "one callback per request"
    );
    // Polling works too.
    let h = s.submit(vec![("x".into(), input(99))]).unwrap();
    let t0 = std::time::Instant::now();
    let out = loop {
        if let Some(r) = h.try_take() {
            break r.unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "poll never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    check(&out, &input(99));
}

#[test]
fn many_requests_in_flight_on_io_uring() {
    many_in_flight(false);
}

#[test]
fn many_requests_in_flight_on_the_thread_fallback() {
    many_in_flight(true);
}

#[test]
fn lost_null_device_is_replanned_onto_the_cpu_with_correct_results() {
    let g = graph();
    let cfg = NullConfig {
        lose_device_on_submit: Some(1),
        ..NullConfig::default()
    };
    let nd = null("null0", cfg);
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new()), nd.clone()];
    // null0 looks fastest for Mul and Exp: the plan uses it, and it dies on first use.
    let prof = made_up_profile(
        vec![
            vec![Some(1.0), Some(5.0)],
            vec![Some(5.0), Some(1.0)],
            vec![Some(5.0), Some(1.0)],
            vec![Some(1.0), Some(5.0)],
        ],
        &["cpu", "null0"],
        6,
    );
    let s = Scheduler::with_profile(&g, devs, prof, &SchedulerOptions::default()).unwrap();
    assert_eq!(s.plan().assign, vec![0, 1, 1, 0]);
    let x = input(3);
    let out = s.run(vec![("x".into(), x.clone())], T).unwrap();
    check(&out, &x);
    assert!(nd.is_lost());
    assert_eq!(s.lost_devices(), vec!["null0".to_string()]);
    assert_eq!(s.replans(), 1);
    assert_eq!(s.plan().used_devices(), vec!["cpu"]);
    // Later requests go straight to the new plan.
    let before = nd.submit_count();
    let out = s.run(vec![("x".into(), input(4))], T).unwrap();
    check(&out, &input(4));
    assert_eq!(
        nd.submit_count(),
        before,
        "the lost device gets no more work"
    );
}

#[test]
fn device_lost_while_many_requests_are_in_flight() {
    let g = graph();
    let cfg = NullConfig {
        lose_device_on_submit: Some(3),
        default_latency: Duration::from_millis(1),
        ..NullConfig::default()
    };
    // Null runs Abs as pass-through; the inputs here are non-negative so that is exact.
    let cfg = NullConfig {
        passthrough: HashSet::from(["Abs".to_string()]),
        ..cfg
    };
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new()), null("null0", cfg)];
    let prof = made_up_profile(
        vec![
            vec![Some(5.0), Some(1.0)],
            vec![Some(1.0), None],
            vec![Some(1.0), None],
            vec![Some(1.0), None],
        ],
        &["cpu", "null0"],
        6,
    );
    let s = Scheduler::with_profile(&g, devs, prof, &SchedulerOptions::default()).unwrap();
    let pos = |k: usize| {
        let v: Vec<f32> = (0..32).map(|i| i as f32 / 16.0 + k as f32 * 0.01).collect();
        Tensor::from_vec(vec![4, 8], v).unwrap()
    };
    let hs: Vec<_> = (0..10)
        .map(|k| (k, s.submit(vec![("x".into(), pos(k))]).unwrap()))
        .collect();
    for (k, h) in hs {
        check(&h.wait(T).unwrap(), &pos(k));
    }
    assert_eq!(s.lost_devices(), vec!["null0".to_string()]);
}

#[test]
fn failure_with_no_device_left_is_an_error_not_a_hang() {
    let g = graph();
    let cfg = NullConfig {
        lose_device_on_submit: Some(1),
        ..NullConfig::default()
    };
    let devs: Vec<Arc<dyn Device>> = vec![null("null0", cfg)];
    let prof = made_up_profile(vec![vec![Some(1.0)]; 4], &["null0"], 6);
    let s = Scheduler::with_profile(&g, devs, prof, &SchedulerOptions::default()).unwrap();
    let e = s
        .run(vec![("x".into(), input(0))], T)
        .unwrap_err()
        .to_string();
    assert!(e.contains("device lost"), "{e}");
    assert!(e.contains("re-planning"), "{e}");
    // A bad input on the CPU fails the request without declaring the CPU lost.
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new())];
    let s = Scheduler::new(
        &g,
        devs,
        &SchedulerOptions {
            profile: quick(),
            ..Default::default()
        },
    )
    .unwrap();
    // An int64 input makes Mul(int64, float32 weight) fail on the CPU.
    let bad_i = Tensor::from_vec(vec![4, 8], vec![1i64; 32]).unwrap();
    assert!(s.run(vec![("x".into(), bad_i)], T).is_err());
    assert!(s.lost_devices().is_empty());
    check(&s.run(vec![("x".into(), input(1))], T).unwrap(), &input(1));
}

/// A device that forwards to `inner`, its submissions going through `hook(inner, exe, b)`:
/// failure injection (the plugin ABI v1 has none of its own) and watching submissions.
struct Hooked<F> {
    inner: Arc<dyn Device>,
    hook: F,
}

impl<F> Device for Hooked<F>
where
    F: Fn(&dyn Device, &dyn Executable, &Bindings) -> Result<Fence> + Send + Sync,
{
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn supports(&self, node: &Node, g: &Graph) -> Support {
        self.inner.supports(node, g)
    }
    fn memory(&self) -> &[MemoryDomain] {
        self.inner.memory()
    }
    fn compile(&self, sub: &Subgraph) -> Result<Box<dyn Executable>> {
        self.inner.compile(sub)
    }
    fn submit(&self, exe: &dyn Executable, b: &Bindings) -> Result<Fence> {
        (self.hook)(self.inner.as_ref(), exe, b)
    }
}

/// On which threads a device was submitted to, and the most submissions that overlapped.
#[derive(Default)]
struct SubmitLog {
    threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
    now: AtomicUsize,
    most: AtomicUsize,
}

#[test]
fn blocking_runs_use_the_cpu_on_the_calling_thread_one_segment_at_a_time() {
    let g = graph();
    let seen = Arc::new(SubmitLog::default());
    let log = Arc::clone(&seen);
    let watched = Hooked {
        inner: Arc::new(CpuDevice::new()),
        hook: move |dev: &dyn Device, exe: &dyn Executable, b: &Bindings| {
            let n = log.now.fetch_add(1, Ordering::SeqCst) + 1;
            log.most.fetch_max(n, Ordering::SeqCst);
            log.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            // Long enough for submissions from other threads to overlap if nothing stopped
            // them.
            std::thread::sleep(Duration::from_micros(300));
            let r = dev.submit(exe, b);
            log.now.fetch_sub(1, Ordering::SeqCst);
            r
        },
    };
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(watched)];
    let prof = made_up_profile(vec![vec![Some(1.0)]; 4], &["cpu"], 6);
    let s = Scheduler::with_profile(&g, devs, prof, &SchedulerOptions::default()).unwrap();
    let me = std::thread::current().id();
    check(&s.run(vec![("x".into(), input(1))], T).unwrap(), &input(1));
    assert_eq!(
        *seen.threads.lock().unwrap(),
        vec![me],
        "run: on the caller"
    );
    check(
        &s.submit(vec![("x".into(), input(2))])
            .unwrap()
            .wait(T)
            .unwrap(),
        &input(2),
    );
    assert_ne!(
        seen.threads.lock().unwrap()[1],
        me,
        "submit: on the device's worker"
    );
    // Requests in flight on the worker and blocking runs from two threads at once: every
    // result right, and the device never had two submissions at a time.
    let handles: Vec<_> = (0..12)
        .map(|k| (k, s.submit(vec![("x".into(), input(k))]).unwrap()))
        .collect();
    std::thread::scope(|sc| {
        for t in 0..2 {
            let s = &s;
            sc.spawn(move || {
                for k in 0..6 {
                    let x = input(100 + 10 * t + k);
                    check(&s.run(vec![("x".into(), x.clone())], T).unwrap(), &x);
                }
            });
        }
    });
    for (k, h) in handles {
        check(&h.wait(T).unwrap(), &input(k));
    }
    assert_eq!(seen.threads.lock().unwrap().len(), 2 + 12 + 12);
    assert_eq!(
        seen.most.load(Ordering::SeqCst),
        1,
        "overlapping submissions"
    );
}

#[test]
fn measured_scheduler_overheads_are_in_the_prediction_and_cached() {
    use std::collections::HashMap;
    let dir = std::env::temp_dir().join(format!("edgehal-overheads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let g = graph();
    let ms = |x: f64| Duration::from_secs_f64(x / 1e3);
    let devs: Vec<Arc<dyn Device>> = vec![
        null(
            "null0",
            NullConfig {
                default_latency: ms(0.2),
                op_latency: HashMap::from([("Exp".to_string(), ms(3.0))]),
                ..NullConfig::default()
            },
        ),
        null(
            "null1",
            NullConfig {
                default_latency: ms(1.0),
                op_latency: HashMap::from([("Exp".to_string(), ms(0.1))]),
                ..NullConfig::default()
            },
        ),
    ];
    let opts = SchedulerOptions {
        profile: ProfileOptions {
            cache_dir: Some(dir.clone()),
            ..quick()
        },
        ..SchedulerOptions::default()
    };
    let s = Scheduler::new(&g, devs.clone(), &opts).unwrap();
    let p = s.profile();
    let plan = s.plan();
    assert!(p.request_ms.is_finite() && p.request_ms >= 0.0);
    assert!(p.dispatch_ms.iter().all(|d| d.is_finite() && *d >= 0.0));
    // A request through the scheduler costs more than its segments submitted directly, so
    // the two terms cannot both come out as nothing.
    assert!(
        p.request_ms + p.dispatch_ms[0] > 0.0,
        "request {} dispatch {:?}",
        p.request_ms,
        p.dispatch_ms
    );
    // The prediction is the nodes' times on their devices, each segment's submission and
    // hand-offs, the transfers and the request's cost, exactly.
    let nodes: f64 = plan
        .nodes
        .iter()
        .map(|n| p.times[n.node][n.device].unwrap())
        .sum();
    let segs: f64 = plan
        .segments
        .iter()
        .map(|sg| p.segment_ms[sg.device] + p.dispatch_ms[sg.device])
        .sum();
    let moves: f64 = plan.transfers.iter().map(|t| t.predicted_ms).sum();
    let want = nodes + segs + moves + p.request_ms;
    assert!(
        (plan.predicted_ms - want).abs() < 1e-9,
        "predicted {} want {want}:\n{}",
        plan.predicted_ms,
        plan.table()
    );
    assert_eq!(plan.request_ms, p.request_ms);
    assert_eq!(plan.dispatch_ms, p.dispatch_ms);
    // (Null devices compute zeros: only that the plan runs.)
    s.run(vec![("x".into(), input(0))], T).unwrap();
    let (request, dispatch) = (p.request_ms, p.dispatch_ms.clone());
    drop(s);
    // A second scheduler takes nodes and overheads from the cache, bit for bit.
    let s2 = Scheduler::new(&g, devs, &opts).unwrap();
    assert_eq!(s2.profile().measured, 0);
    assert_eq!(s2.profile().request_ms, request);
    assert_eq!(s2.profile().dispatch_ms, dispatch);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reactor_reads_files_into_page_aligned_buffers() {
    let dir = std::env::temp_dir().join(format!("edgehal-reactor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weights.bin");
    let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    for force in [false, true] {
        let r = Reactor::new(force).unwrap();
        let b = r.read_file(&path).unwrap();
        assert_eq!(b.len(), data.len());
        assert_eq!(b.addr() % page_size(), 0);
        assert_eq!(b.to_vec().unwrap(), data, "backend {:?}", r.backend());
        assert!(r.read_file(&dir.join("missing")).is_err());
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(r.read_file(&empty).unwrap().len(), 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- CPU + the C example plugin -------------------------------------------------------

fn plugin_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let root = edgehal_tests::repo_root().join("drivers/plugin-example");
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sched-plugin");
        std::fs::create_dir_all(&d).unwrap();
        let so = d.join("libedgehal_example.so");
        let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        let compiler = cc::Build::new()
            .target(&target)
            .host(&target)
            .opt_level(1)
            .cargo_metadata(false)
            .get_compiler();
        let mut cmd = compiler.to_command();
        cmd.args(["-shared", "-fPIC", "-I"])
            .arg(root.join("include"))
            .arg("-o")
            .arg(&so)
            .arg(root.join("example_plugin.c"));
        assert!(cmd.status().unwrap().success(), "{cmd:?}");
        d
    })
}

fn plugin_device() -> Arc<dyn Device> {
    let mut drivers = load_all(plugin_dir().to_str().unwrap());
    let d = drivers.remove(0).unwrap();
    let infos = d.probe(&SysRoot::live());
    d.open(&infos[0]).unwrap()
}

/// `inner` with every submit from the `from`-th on failing as if unplugged.
fn failing(inner: Arc<dyn Device>, from: u64) -> Arc<dyn Device> {
    let n = AtomicU64::new(0);
    Arc::new(Hooked {
        inner,
        hook: move |dev: &dyn Device, exe: &dyn Executable, b: &Bindings| {
            if n.fetch_add(1, Ordering::SeqCst) + 1 >= from {
                let name = &dev.info().name;
                return Fence::done(
                    name,
                    Err(Error::Device {
                        device: name.clone(),
                        msg: "device lost (unplugged)".into(),
                    }),
                );
            }
            dev.submit(exe, b)
        },
    })
}

#[test]
fn cpu_and_plugin_profiled_planned_and_run() {
    let g = graph();
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new()), plugin_device()];
    let p = profile(&g, &devs, &quick()).unwrap();
    // The plugin runs Mul and Add (no attributes, float32), not Abs or Exp.
    assert!(p.times[0][1].is_none() && p.times[2][1].is_none());
    assert!(p.times[1][1].is_some() && p.times[3][1].is_some());
    assert!(p.reasons[0][1].as_deref().unwrap_or("").contains("Abs"));
    // Force the plugin into the plan with a pin, then run.
    let opts = SchedulerOptions {
        profile: quick(),
        constraints: edgehal::plan::PlanConstraints {
            pins: vec![("1".into(), "example0".into())],
            ..Default::default()
        },
        ..SchedulerOptions::default()
    };
    let s = Scheduler::with_profile(&g, devs, p, &opts).unwrap();
    assert_eq!(s.plan().assign[1], 1);
    for k in 0..4 {
        check(&s.run(vec![("x".into(), input(k))], T).unwrap(), &input(k));
    }
}

#[test]
fn failing_plugin_device_is_replanned_onto_the_cpu() {
    let g = graph();
    let devs: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new()), failing(plugin_device(), 2)];
    let prof = made_up_profile(
        vec![
            vec![Some(1.0), None],
            vec![Some(5.0), Some(1.0)],
            vec![Some(1.0), None],
            vec![Some(5.0), Some(1.0)],
        ],
        &["cpu", "example0"],
        6,
    );
    let s = Scheduler::with_profile(&g, devs, prof, &SchedulerOptions::default()).unwrap();
    assert_eq!(s.plan().assign, vec![0, 1, 0, 1]);
    // Submit 1 (Mul) works on the plugin, submit 2 (Add) fails: the request finishes on
    // the CPU with the plugin's Mul result kept.
    let x = input(5);
    check(&s.run(vec![("x".into(), x.clone())], T).unwrap(), &x);
    assert_eq!(s.lost_devices(), vec!["example0".to_string()]);
    check(&s.run(vec![("x".into(), input(6))], T).unwrap(), &input(6));
}
