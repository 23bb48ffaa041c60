//! The scheduler: runs a [`Plan`] asynchronously over several devices.
//!
//! - **Per-device submission.** Each device has one worker thread and a queue. The worker
//!   binds a segment's inputs, submits it, hands the fence to the [`Reactor`] and waits until
//!   the reactor reports the completion before taking the next job, so a device runs one
//!   segment at a time while other devices work on other segments: with a stream of requests,
//!   device B runs segment 2 of frame n while device A runs segment 1 of frame n+1.
//! - **Completion** is driven by the reactor: a finished segment's outputs are stored in the
//!   request and its next segment is queued on its device. [`Scheduler::submit`] returns a
//!   [`RunHandle`] to poll or wait on, with an optional callback; any number of requests may
//!   be in flight.
//! - **Blocking runs on the CPU.** [`Scheduler::run`] runs a CPU segment on the calling
//!   thread (the CPU executes inside `submit` anyway), taking the device's submission gate
//!   that its worker takes too, so the device still runs one segment at a time. A request
//!   that only uses the CPU then wakes no thread: two wake-ups of a vCPU that had gone idle
//!   cost about 0.07 ms per request on this machine, 15% of lstm_kws or person_detect.
//! - **Device loss.** When a segment fails, the request is re-planned without that device
//!   (from the same profile), recompiled and resumed: segments whose outputs the request
//!   already holds are skipped, the rest run on the remaining devices. If that succeeds the
//!   device is taken as lost and later requests use the new plan; if the same request also
//!   fails elsewhere, the error is the request's (bad input, not a bad device).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use edgehal_core::buffer::{CopyCounter, MemoryDomain};
use edgehal_core::driver::{
    Bindings, Device, DeviceInfo, DeviceKind, Driver, Executable, SysRoot, TensorBuffer,
};
use edgehal_core::graph::Graph;
use edgehal_core::Tensor;

use crate::plan::{Plan, PlanConstraints};
use crate::profile::{profile, Overheads, Profile, ProfileOptions};
use crate::reactor::{Backend, Reactor};
use crate::{Error, Result};

/// Named outputs of one inference.
pub type Outputs = Vec<(String, Tensor)>;

/// How to build a scheduler.
#[derive(Clone, Debug, Default)]
pub struct SchedulerOptions {
    pub profile: ProfileOptions,
    pub constraints: PlanConstraints,
    /// Use the thread fallback instead of io_uring (tests of the fallback).
    pub force_threads: bool,
}

/// A plan compiled for its devices.
pub struct Compiled {
    pub plan: Plan,
    exes: Vec<Arc<dyn Executable>>,
}

struct Inner {
    graph: Graph,
    devices: Vec<Arc<dyn Device>>,
    profile: Profile,
    constraints: PlanConstraints,
    current: Mutex<Arc<Compiled>>,
    lost: Mutex<Vec<bool>>,
    workers: Vec<Mutex<mpsc::Sender<Job>>>,
    /// Per device, held around each submission (see [`execute`]).
    gates: Vec<Mutex<()>>,
    reactor: &'static Reactor,
    counter: CopyCounter,
    replans: AtomicU64,
}

/// Runs plans over devices (see the module docs).
pub struct Scheduler {
    inner: Arc<Inner>,
}

type DoneCallback = Box<dyn FnOnce(&Result<Outputs>) + Send>;

struct Completion {
    result: Mutex<Option<Result<Outputs>>>,
    finished: Mutex<bool>,
    cv: Condvar,
    callback: Mutex<Option<DoneCallback>>,
}

impl Completion {
    fn new(cb: Option<DoneCallback>) -> Arc<Completion> {
        Arc::new(Completion {
            result: Mutex::new(None),
            finished: Mutex::new(false),
            cv: Condvar::new(),
            callback: Mutex::new(cb),
        })
    }

    fn finish(&self, r: Result<Outputs>) {
        let mut f = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        if *f {
            return;
        }
        if let Some(cb) = self
            .callback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            cb(&r);
        }
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        *f = true;
        self.cv.notify_all();
    }
}

/// A request in flight: poll it or wait for it.
pub struct RunHandle {
    c: Arc<Completion>,
}

impl RunHandle {
    /// A handle that is already complete (synchronous backends).
    pub fn ready(r: Result<Outputs>) -> RunHandle {
        let c = Completion::new(None);
        c.finish(r);
        RunHandle { c }
    }

    /// True once the request finished (successfully or not).
    pub fn is_done(&self) -> bool {
        *self.c.finished.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outcome if finished (taken: a second call after a result returns `None`).
    pub fn try_take(&self) -> Option<Result<Outputs>> {
        if !self.is_done() {
            return None;
        }
        self.c
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Wait for the outcome (`None`: forever).
    pub fn wait(self, timeout: Option<Duration>) -> Result<Outputs> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut f = self.c.finished.lock().unwrap_or_else(|p| p.into_inner());
        while !*f {
            match deadline {
                None => f = self.c.cv.wait(f).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Device {
                            device: "scheduler".into(),
                            msg: format!(
                                "request not finished after {:?}",
                                timeout.unwrap_or_default()
                            ),
                        });
                    }
                    f = self
                        .c
                        .cv
                        .wait_timeout(f, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        drop(f);
        self.c
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| Err(Error::arg("request result was already taken")))
    }
}

struct Request {
    sched: Arc<Inner>,
    values: Mutex<HashMap<String, TensorBuffer>>,
    compiled: Mutex<Arc<Compiled>>,
    excluded: Mutex<Vec<bool>>,
    first_error: Mutex<Option<String>>,
    done: Arc<Completion>,
    /// A blocking run: CPU segments run on whichever thread advances the request.
    inline: bool,
}

struct Job {
    req: Arc<Request>,
    compiled: Arc<Compiled>,
    seg: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn compile(&self, excluded: &[bool]) -> Result<Arc<Compiled>> {
        let mut c = self.constraints.clone();
        for (d, &x) in excluded.iter().enumerate() {
            if x {
                c.exclude.push(self.profile.devices[d].clone());
            }
        }
        let plan = Plan::choose(&self.graph, &self.profile, &c)?;
        self.compile_plan(plan)
    }

    fn compile_plan(&self, plan: Plan) -> Result<Arc<Compiled>> {
        let mut exes = Vec::new();
        for s in &plan.segments {
            let dev = self
                .devices
                .get(s.device)
                .ok_or_else(|| Error::arg("plan names a device the scheduler does not have"))?;
            exes.push(Arc::from(crate::passes::compile_segment(
                dev.as_ref(),
                &s.sub,
            )?));
        }
        Ok(Arc::new(Compiled { plan, exes }))
    }
}

fn advance(req: &Arc<Request>, mut i: usize) {
    let c = Arc::clone(&lock(&req.compiled));
    loop {
        let Some(seg) = c.plan.segments.get(i) else {
            finish(req, collect(req));
            return;
        };
        let have = {
            let v = lock(&req.values);
            seg.sub.output_names().iter().all(|n| v.contains_key(n))
        };
        if have {
            i += 1;
            continue;
        }
        let job = Job {
            req: Arc::clone(req),
            compiled: Arc::clone(&c),
            seg: i,
        };
        if req.inline && req.sched.devices[seg.device].info().kind == DeviceKind::Cpu {
            // The CPU's fence comes back signalled; should one not, this caller waits for it
            // as the device's worker would before its next segment.
            if let Some(idle) = execute(job) {
                let _ = idle.recv();
            }
            return;
        }
        let sent = req
            .sched
            .workers
            .get(seg.device)
            .map(|w| lock(w).send(job).is_ok())
            .unwrap_or(false);
        if !sent {
            finish(
                req,
                Err(Error::Device {
                    device: c.plan.devices[seg.device].clone(),
                    msg: "the device's worker has stopped".into(),
                }),
            );
        }
        return;
    }
}

fn collect(req: &Request) -> Result<Outputs> {
    let g = &req.sched.graph;
    let v = lock(&req.values);
    g.outputs
        .iter()
        .map(|&o| {
            let name = g.value_name(o).to_string();
            let t = match v.get(&name) {
                Some(tb) => tb.to_tensor()?,
                None => match g.initializers.get(&o) {
                    Some(t) => t.clone(),
                    None => return Err(Error::arg(format!("output '{name}' was not produced"))),
                },
            };
            Ok((name, t))
        })
        .collect()
}

fn finish(req: &Arc<Request>, r: Result<Outputs>) {
    if r.is_ok() {
        let excluded = lock(&req.excluded).clone();
        if excluded.iter().any(|&x| x) {
            // Re-planning without these devices worked: they are lost for later requests.
            let inner = &req.sched;
            let mut lost = lock(&inner.lost);
            let mut changed = false;
            for (d, &x) in excluded.iter().enumerate() {
                if x && !lost[d] {
                    lost[d] = true;
                    changed = true;
                }
            }
            if changed {
                let c = Arc::clone(&lock(&req.compiled));
                *lock(&inner.current) = c;
            }
        }
    }
    req.done.finish(r);
}

fn on_segment_done(job: Job, b: Bindings, r: Result<()>) {
    let seg = &job.compiled.plan.segments[job.seg];
    let r = r.and_then(|()| {
        let mut v = lock(&job.req.values);
        for (i, name) in seg.sub.output_names().into_iter().enumerate() {
            let tb = b.output(i).ok_or_else(|| Error::Device {
                device: job.compiled.plan.devices[seg.device].clone(),
                msg: format!("segment finished without output '{name}'"),
            })?;
            v.insert(name, tb);
        }
        Ok(())
    });
    match r {
        Ok(()) => advance(&job.req, job.seg + 1),
        Err(e) => {
            // Re-planning compiles: not on the reactor thread.
            let spawned = std::thread::Builder::new()
                .name("edgehal-replan".into())
                .spawn(move || recover(job, e));
            if let Err(e) = spawned {
                eprintln!("edgehal: could not start re-planning: {e}");
            }
        }
    }
}

fn recover(job: Job, e: Error) {
    let req = &job.req;
    let inner = &req.sched;
    let d = job.compiled.plan.segments[job.seg].device;
    let dev = inner.profile.devices[d].clone();
    {
        let mut fe = lock(&req.first_error);
        if fe.is_none() {
            *fe = Some(format!("{dev}: {e}"));
        }
    }
    let excluded = {
        let mut x = lock(&req.excluded);
        x[d] = true;
        let lost = lock(&inner.lost);
        for (i, l) in lost.iter().enumerate() {
            x[i] |= *l;
        }
        x.clone()
    };
    match inner.compile(&excluded) {
        Ok(c) => {
            inner.replans.fetch_add(1, Ordering::SeqCst);
            *lock(&req.compiled) = c;
            advance(req, 0);
        }
        Err(e2) => {
            let first = lock(&req.first_error).clone().unwrap_or_default();
            finish(
                req,
                Err(Error::Device {
                    device: dev,
                    msg: format!("{first}; re-planning without the failed devices: {e2}"),
                }),
            );
        }
    }
}

fn worker(name: String, rx: mpsc::Receiver<Job>) {
    for job in rx {
        // The next segment waits until the reactor has taken this one's completion.
        if let Some(idle) = execute(job) {
            if idle.recv().is_err() {
                eprintln!("edgehal: {name}: completion lost");
            }
        }
    }
}

/// Binds `job`'s inputs and submits its segment to its device while holding the device's
/// gate. A fence signalled at submit (the CPU runs the segment inside `submit`) completes the
/// segment here, on this thread; a pending one goes to the reactor, and the returned receiver
/// gets a message once the reactor has taken its completion.
fn execute(job: Job) -> Option<mpsc::Receiver<()>> {
    let inner = Arc::clone(&job.req.sched);
    let seg = &job.compiled.plan.segments[job.seg];
    let (dev, gate) = (&inner.devices[seg.device], &inner.gates[seg.device]);
    let exe = Arc::clone(&job.compiled.exes[job.seg]);
    let inputs: Result<Vec<TensorBuffer>> = {
        let v = lock(&job.req.values);
        seg.sub
            .input_names()
            .iter()
            .map(|n| {
                v.get(n)
                    .cloned()
                    .ok_or_else(|| Error::arg(format!("segment input '{n}' is missing")))
            })
            .collect()
    };
    let inputs = match inputs {
        Ok(i) => i,
        Err(e) => {
            finish(&job.req, Err(e));
            return None;
        }
    };
    let b = Bindings::new(
        inputs,
        vec![None; seg.sub.graph.outputs.len()],
        &inner.counter,
    );
    let submitted = {
        let _g = lock(gate);
        dev.submit(exe.as_ref(), &b)
    };
    let fence = match submitted {
        Ok(f) => f,
        Err(e) => {
            on_segment_done(job, b, Err(e));
            return None;
        }
    };
    // Handled here, not handed to the reactor and back (two thread wake-ups, about 0.1 ms
    // of a 0.6 ms lstm_kws request on this machine).
    if let Some(r) = fence.poll() {
        on_segment_done(job, b, r);
        return None;
    }
    let (idle_tx, idle_rx) = mpsc::channel::<()>();
    let slot = Arc::new(Mutex::new(Some((job, b.clone(), idle_tx))));
    let s2 = Arc::clone(&slot);
    let watched = inner.reactor.watch(&fence, move |r| {
        if let Some((job, b, idle)) = lock(&s2).take() {
            let _ = idle.send(());
            on_segment_done(job, b, r);
        }
    });
    if let Err(e) = watched {
        if let Some((job, b, idle)) = lock(&slot).take() {
            let _ = idle.send(());
            on_segment_done(job, b, Err(e));
        }
    }
    Some(idle_rx)
}

impl Scheduler {
    /// Profile `graph` on `devices`, choose a plan and start one worker per device.
    pub fn new(
        graph: &Graph,
        devices: Vec<Arc<dyn Device>>,
        opts: &SchedulerOptions,
    ) -> Result<Scheduler> {
        if devices.is_empty() {
            return Err(Error::arg("the scheduler needs at least one device"));
        }
        let mut prof = profile(graph, &devices, &opts.profile)?;
        let mut request = None;
        for (d, dev) in devices.iter().enumerate() {
            let cached = opts
                .profile
                .cache_dir
                .as_ref()
                .and_then(|dir| crate::profile::cached_overheads(dir, dev.info()));
            let o = match cached {
                Some(o) => Some(o),
                None => {
                    let o = measure_overheads(dev, opts);
                    if let (Some(o), Some(dir)) = (o, &opts.profile.cache_dir) {
                        // Not saved costs a measurement next time, not correctness.
                        if let Err(e) = crate::profile::store_overheads(dir, dev.info(), o) {
                            eprintln!("edgehal: scheduler overheads not cached: {e}");
                        }
                    }
                    o
                }
            };
            if let Some(o) = o {
                prof.dispatch_ms[d] = o.dispatch_ms;
                request.get_or_insert(o.request_ms);
            }
        }
        // The request's own cost does not depend on the device: the first device's stands.
        prof.request_ms = request.unwrap_or(0.0);
        Self::with_profile(graph, devices, prof, opts)
    }

    /// Like [`Scheduler::new`] with a profile already made (or made up, in tests).
    pub fn with_profile(
        graph: &Graph,
        devices: Vec<Arc<dyn Device>>,
        prof: Profile,
        opts: &SchedulerOptions,
    ) -> Result<Scheduler> {
        if prof.devices.len() != devices.len() {
            return Err(Error::arg("profile and scheduler disagree on the devices"));
        }
        let reactor: &'static Reactor = if opts.force_threads {
            Box::leak(Box::new(Reactor::new(true)?))
        } else {
            Reactor::global()?
        };
        let mut senders = Vec::new();
        for dev in &devices {
            let (tx, rx) = mpsc::channel();
            let name = dev.info().name.clone();
            std::thread::Builder::new()
                .name(format!("edgehal-{name}"))
                .spawn(move || worker(name, rx))
                .map_err(|e| Error::io("spawning a device worker", e))?;
            senders.push(Mutex::new(tx));
        }
        let gates = devices.iter().map(|_| Mutex::new(())).collect();
        let nd = devices.len();
        let placeholder = Arc::new(Compiled {
            plan: Plan {
                devices: vec![],
                assign: vec![],
                segments: vec![],
                transfers: vec![],
                nodes: vec![],
                predicted_ms: 0.0,
                segment_ms: vec![],
                dispatch_ms: vec![],
                request_ms: 0.0,
                method: String::new(),
            },
            exes: vec![],
        });
        let inner = Arc::new(Inner {
            graph: graph.clone(),
            devices,
            profile: prof,
            constraints: opts.constraints.clone(),
            current: Mutex::new(placeholder),
            lost: Mutex::new(vec![false; nd]),
            workers: senders,
            gates,
            reactor,
            counter: CopyCounter::new(),
            replans: AtomicU64::new(0),
        });
        let c = inner.compile(&vec![false; nd])?;
        *lock(&inner.current) = c;
        Ok(Scheduler { inner })
    }

    /// The plan new requests use.
    pub fn plan(&self) -> Plan {
        lock(&self.inner.current).plan.clone()
    }

    /// Run later requests with `plan` instead (e.g. a single-device plan for comparison).
    pub fn use_plan(&self, plan: Plan) -> Result<()> {
        let c = self.compile(plan)?;
        self.use_compiled(&c);
        Ok(())
    }

    /// `plan` compiled for this scheduler's devices, to install later with
    /// [`Scheduler::use_compiled`] (switching between plans then compiles nothing).
    pub fn compile(&self, plan: Plan) -> Result<Arc<Compiled>> {
        self.inner.compile_plan(plan)
    }

    /// Run later requests with a plan from [`Scheduler::compile`].
    pub fn use_compiled(&self, compiled: &Arc<Compiled>) {
        *lock(&self.inner.current) = Arc::clone(compiled);
    }

    /// The profile the plans come from.
    pub fn profile(&self) -> &Profile {
        &self.inner.profile
    }

    /// The graph it runs.
    pub fn graph(&self) -> &Graph {
        &self.inner.graph
    }

    /// Devices taken as lost after a failure.
    pub fn lost_devices(&self) -> Vec<String> {
        let lost = lock(&self.inner.lost);
        self.inner
            .profile
            .devices
            .iter()
            .zip(lost.iter())
            .filter(|(_, &l)| l)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// How many times a request was re-planned after a failure.
    pub fn replans(&self) -> u64 {
        self.inner.replans.load(Ordering::SeqCst)
    }

    /// The reactor's mechanism.
    pub fn reactor_backend(&self) -> Backend {
        self.inner.reactor.backend()
    }

    /// Start a request; `feeds` by graph input name.
    pub fn submit(&self, feeds: Vec<(String, Tensor)>) -> Result<RunHandle> {
        self.submit_with(feeds, None)
    }

    /// Start a request and call `cb` (on a scheduler thread; keep it short) when it ends.
    pub fn submit_with(
        &self,
        feeds: Vec<(String, Tensor)>,
        cb: Option<DoneCallback>,
    ) -> Result<RunHandle> {
        self.start(feeds, cb, false)
    }

    /// Starts a request; `inline`: CPU segments run on the threads that advance it (see the
    /// module docs), the caller's first.
    fn start(
        &self,
        feeds: Vec<(String, Tensor)>,
        cb: Option<DoneCallback>,
        inline: bool,
    ) -> Result<RunHandle> {
        let g = &self.inner.graph;
        let mut values = HashMap::new();
        for &i in &g.inputs {
            let name = g.value_name(i);
            let t = feeds
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::arg(format!("input '{name}' was not given")))?;
            values.insert(
                name.to_string(),
                TensorBuffer::from_tensor(t, &self.inner.counter),
            );
        }
        let compiled = Arc::clone(&lock(&self.inner.current));
        let done = Completion::new(cb);
        let req = Arc::new(Request {
            sched: Arc::clone(&self.inner),
            values: Mutex::new(values),
            compiled: Mutex::new(compiled),
            excluded: Mutex::new(lock(&self.inner.lost).clone()),
            first_error: Mutex::new(None),
            done: Arc::clone(&done),
            inline,
        });
        advance(&req, 0);
        Ok(RunHandle { c: done })
    }

    /// Run one request and wait for it (`None`: no time limit). Its CPU segments run on the
    /// calling thread (see the module docs); `timeout` cannot stop one of them once started.
    pub fn run(&self, feeds: Vec<(String, Tensor)>, timeout: Option<Duration>) -> Result<Outputs> {
        self.start(feeds, None, true)?.wait(timeout)
    }
}

/// What the scheduler itself costs on `dev` (see [`Overheads`]). A graph of two trivial
/// nodes (`Identity`, else `Relu` or `Abs`, on one float) is compiled as one segment and as
/// two; in each round both plans run as requests through a scheduler over `dev` alone (`t1`,
/// `t2`) and their segments are submitted to `dev` directly (`d1`, `d2`: the devices' own
/// work and submissions, nodes included). With `R` the request's cost and `D` the scheduler's
/// per segment, `t1 = R + D + d1` and `t2 = R + 2 D + d2`, so from the medians
/// `D = (t2 - d2) - (t1 - d1)` and `R = (t1 - d1) - D` (clamped at 0). 5 warm-up rounds, then
/// 101 (at least 21 when rounds are slow, e.g. a null device's set latency). `None` where
/// the device runs none of those ops or a run fails.
pub fn measure_overheads(dev: &Arc<dyn Device>, opts: &SchedulerOptions) -> Option<Overheads> {
    let [t1, t2, d1, d2] = time_one_and_two_segments(dev, opts)?;
    Some(overheads_from(t1, t2, d1, d2))
}

/// [`Overheads`] from the median times of requests of one segment (`t1`) and of two (`t2`)
/// and of the same segments submitted directly (`d1`, `d2`); see [`measure_overheads`].
pub fn overheads_from(t1: f64, t2: f64, d1: f64, d2: f64) -> Overheads {
    let per_segment = (t2 - d2) - (t1 - d1);
    let clamp = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
    Overheads {
        request_ms: clamp(t1 - d1 - per_segment),
        dispatch_ms: clamp(per_segment),
    }
}

fn time_one_and_two_segments(dev: &Arc<dyn Device>, opts: &SchedulerOptions) -> Option<[f64; 4]> {
    use edgehal_core::driver::Subgraph;
    use edgehal_core::graph::{Dim, Node};
    use edgehal_core::DType;
    let mut g = Graph::new("edgehal-overheads");
    g.opsets.insert(String::new(), 17);
    let mut ids = Vec::new();
    for name in ["x", "a", "y"] {
        let v = g.value_id(name);
        g.values[v].dtype = Some(DType::F32);
        g.values[v].shape = Some(vec![Dim::Fixed(1)]);
        ids.push(v);
    }
    g.inputs = vec![ids[0]];
    g.outputs = vec![ids[2]];
    let op = ["Identity", "Relu", "Abs"].into_iter().find(|op| {
        let probe = Node {
            op: (*op).into(),
            inputs: vec![Some(ids[0])],
            outputs: vec![Some(ids[1])],
            ..Default::default()
        };
        dev.supports(&probe, &g).is_yes()
    })?;
    for k in 0..2 {
        g.add_node(Node {
            name: format!("n{k}"),
            op: op.into(),
            inputs: vec![Some(ids[k])],
            outputs: vec![Some(ids[k + 1])],
            ..Default::default()
        });
    }
    let host = [MemoryDomain::Host, MemoryDomain::HostImported];
    let transfer = if dev.memory().iter().any(|d| host.contains(d)) {
        vec![vec![crate::partition::TransferCost::ZERO; 2]; 2]
    } else {
        crate::profile::transfer_table(&[dev.memory().to_vec()]).ok()?
    };
    let prof = Profile {
        devices: vec![dev.info().name.clone()],
        domains: vec![dev.memory().to_vec()],
        order: vec![0, 1],
        times: vec![vec![Some(0.0)]; 2],
        reasons: vec![vec![None]; 2],
        value_bytes: vec![4; g.values.len()],
        transfer,
        segment_ms: vec![0.0],
        dispatch_ms: vec![0.0],
        request_ms: 0.0,
        passes: vec![None],
        calibration: vec![None],
        measured: 0,
        cached: 0,
        rebuilt: 0,
    };
    let sopts = SchedulerOptions {
        force_threads: opts.force_threads,
        ..SchedulerOptions::default()
    };
    let s = Scheduler::with_profile(&g, vec![Arc::clone(dev)], prof, &sopts).ok()?;
    let one = Arc::clone(&lock(&s.inner.current));
    if one.plan.segments.len() != 1 {
        return None;
    }
    let mut split = one.plan.clone();
    split.segments = (0..2)
        .map(|n| {
            Ok(crate::plan::Segment {
                device: 0,
                nodes: vec![n],
                sub: Subgraph::extract(&g, &[n])?,
                predicted_ms: 0.0,
            })
        })
        .collect::<Result<_>>()
        .ok()?;
    let two = s.inner.compile_plan(split).ok()?;
    let x = Tensor::from_vec(vec![1], vec![0.5f32]).ok()?;
    let feeds = vec![("x".to_string(), x.clone())];
    let timeout = Some(opts.profile.run_timeout);
    let counter = CopyCounter::new();
    // Submit `c`'s segments to the device directly, each reading the previous one's output.
    let direct = |c: &Compiled| -> Result<f64> {
        let mut cur = TensorBuffer::from_tensor(&x, &counter);
        let t0 = Instant::now();
        for exe in &c.exes {
            let b = Bindings::new(vec![cur], vec![None], &counter);
            dev.submit(exe.as_ref(), &b)?.wait(timeout)?;
            cur = b
                .output(0)
                .ok_or_else(|| Error::arg("segment made no output"))?;
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let mut t: [Vec<f64>; 4] = Default::default();
    let start = Instant::now();
    for i in 0..106 {
        if i >= 26 && start.elapsed() > Duration::from_millis(300) {
            break;
        }
        for (k, c) in [&one, &two].into_iter().enumerate() {
            *lock(&s.inner.current) = Arc::clone(c);
            let t0 = Instant::now();
            s.run(feeds.clone(), timeout).ok()?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let d = direct(c).ok()?;
            if i >= 5 {
                t[k].push(ms);
                t[k + 2].push(d);
            }
        }
    }
    Some(t.map(|mut v| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }))
}

/// Configuration of null devices opened by name, from `EDGEHAL_NULL_CONFIG`:
/// `default=MS,OP=MS,...,fail_on_submit=N,lose_on_submit=N,passthrough=OP+OP`.
pub fn null_config_from_env() -> Result<(edgehal_null::NullConfig, String)> {
    let spec = std::env::var("EDGEHAL_NULL_CONFIG").unwrap_or_default();
    let mut c = edgehal_null::NullConfig::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| Error::arg(format!("EDGEHAL_NULL_CONFIG: '{item}' is not KEY=VALUE")))?;
        let ms = || -> Result<Duration> {
            let f: f64 = v.parse().map_err(|_| {
                Error::arg(format!("EDGEHAL_NULL_CONFIG: '{v}' is not milliseconds"))
            })?;
            if !(0.0..=60_000.0).contains(&f) {
                return Err(Error::arg(format!(
                    "EDGEHAL_NULL_CONFIG: {f} ms is out of range"
                )));
            }
            Ok(Duration::from_secs_f64(f / 1e3))
        };
        let n = || -> Result<u64> {
            v.parse()
                .map_err(|_| Error::arg(format!("EDGEHAL_NULL_CONFIG: '{v}' is not a count")))
        };
        match k {
            "default" => c.default_latency = ms()?,
            "fail_on_submit" => c.fail_on_submit = Some(n()?),
            "lose_on_submit" => c.lose_device_on_submit = Some(n()?),
            "passthrough" => c.passthrough = v.split('+').map(String::from).collect(),
            op => {
                c.op_latency.insert(op.to_string(), ms()?);
            }
        }
    }
    Ok((c, spec))
}

fn open_compiled_in(name: &str, drivers: &[&dyn Driver]) -> Result<Option<Arc<dyn Device>>> {
    for drv in drivers {
        let infos = drv.probe(&SysRoot::live());
        let by_name = infos.iter().find(|i| i.name == name);
        let info = match by_name {
            Some(i) => Some(i),
            None if drv.name() == name => infos
                .iter()
                .find(|i| i.unavailable.is_none())
                .or(infos.first()),
            None => None,
        };
        match info {
            Some(i) => {
                if let Some(why) = &i.unavailable {
                    return Err(Error::Device {
                        device: name.to_string(),
                        msg: why.clone(),
                    });
                }
                return drv.open(i).map(Some);
            }
            None if drv.name() == name => {
                return Err(Error::Device {
                    device: name.to_string(),
                    msg: "unavailable: the driver found no device".into(),
                })
            }
            None => {}
        }
    }
    Ok(None)
}

/// Open devices by name: `cpu`, `null0`, `null1`, ... (configured by `EDGEHAL_NULL_CONFIG`)
/// and plugin devices found through `EDGEHAL_DRIVER_PATH`.
pub fn open_devices(names: &[String]) -> Result<Vec<Arc<dyn Device>>> {
    let registered = registered_drivers();
    let refs: Vec<&dyn Driver> = registered.iter().map(|d| d.as_ref()).collect();
    open_devices_with(names, &refs)
}

/// Compiled-in drivers this crate does not depend on (the CLI registers the Vulkan driver),
/// consulted by [`open_devices`] and so by sessions.
static REGISTERED: std::sync::Mutex<Vec<Arc<dyn Driver>>> = std::sync::Mutex::new(Vec::new());

/// Make `driver`'s devices reachable by name from [`open_devices`] and
/// [`crate::Session`] (`--device vulkan`). Registering a driver of the same name twice keeps
/// the first.
pub fn register_driver(driver: Arc<dyn Driver>) {
    let mut r = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if !r.iter().any(|d| d.name() == driver.name()) {
        r.push(driver);
    }
}

/// The drivers given to [`register_driver`].
pub fn registered_drivers() -> Vec<Arc<dyn Driver>> {
    REGISTERED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// [`open_devices`], also looking names up among the live devices of `drivers` (compiled-in
/// backends this crate does not depend on, e.g. the Vulkan driver the CLI links): a device
/// by its probed name (`vulkan0`), or a driver's name (`vulkan`) for its first available
/// device. A device a driver reports as unavailable is an error that says why.
pub fn open_devices_with(
    names: &[String],
    compiled: &[&dyn Driver],
) -> Result<Vec<Arc<dyn Device>>> {
    let mut out: Vec<Arc<dyn Device>> = Vec::new();
    let mut plugins: Option<Vec<crate::plugin::PluginDriver>> = None;
    for name in names {
        if out.iter().any(|d| d.info().name == *name) {
            return Err(Error::arg(format!("device '{name}' is listed twice")));
        }
        if name == "cpu" {
            out.push(Arc::new(edgehal_cpu::device::CpuDevice::new()));
            continue;
        }
        if let Some(k) = name
            .strip_prefix("null")
            .and_then(|k| k.parse::<usize>().ok())
        {
            if k >= 16 {
                return Err(Error::arg(format!("{name}: at most 16 null devices")));
            }
            let (cfg, spec) = null_config_from_env()?;
            let drv = edgehal_null::NullDriver::new(k + 1, cfg);
            let mut info: DeviceInfo = drv
                .probe(&SysRoot::new("/nonexistent"))
                .into_iter()
                .find(|i| i.name == *name)
                .ok_or_else(|| Error::arg(format!("no null device '{name}'")))?;
            // Different latency settings must not share cached timings.
            info.properties.insert("config".into(), spec);
            out.push(drv.open(&info)?);
            continue;
        }
        if let Some(d) = open_compiled_in(name, compiled)? {
            if out.iter().any(|o| o.info().name == d.info().name) {
                return Err(Error::arg(format!(
                    "device '{}' is listed twice",
                    d.info().name
                )));
            }
            out.push(d);
            continue;
        }
        let drivers = plugins.get_or_insert_with(|| {
            crate::plugin::load_from_env()
                .into_iter()
                .filter_map(|r| r.ok())
                .collect()
        });
        let mut found = None;
        for d in drivers.iter() {
            if let Some(info) = d
                .probe(&SysRoot::live())
                .into_iter()
                .find(|i| i.name == *name)
            {
                found = Some(d.open(&info)?);
                break;
            }
        }
        match found {
            Some(d) => out.push(d),
            None => {
                let built_in: String = compiled.iter().map(|d| format!("{}, ", d.name())).collect();
                return Err(Error::arg(format!(
                    "unknown device '{name}' (available: cpu, null0..null15, {built_in}and \
                     plugin devices in EDGEHAL_DRIVER_PATH)"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod overhead_tests {
    use super::*;

    #[test]
    fn overheads_recover_request_and_dispatch_costs() {
        // A request costs R = 0.02 ms, each segment D = 0.015 ms through the scheduler; the
        // device's own segments cost 0.004 ms as one and 0.0075 ms as two (nodes included).
        let (r, d, d1, d2) = (0.02, 0.015, 0.004, 0.0075);
        let o = overheads_from(r + d + d1, r + 2.0 * d + d2, d1, d2);
        assert!((o.request_ms - r).abs() < 1e-12, "{o:?}");
        assert!((o.dispatch_ms - d).abs() < 1e-12, "{o:?}");
        // Noise that makes a difference negative is clamped, not charged as a gain.
        let o = overheads_from(0.03, 0.025, 0.004, 0.0075);
        assert_eq!(o.dispatch_ms, 0.0);
        assert!(o.request_ms > 0.0);
        let o = overheads_from(0.01, 0.05, 0.0, 0.0);
        assert_eq!(o.request_ms, 0.0);
        assert!((o.dispatch_ms - 0.04).abs() < 1e-12);
        let o = overheads_from(f64::NAN, 0.05, 0.0, 0.0);
        assert_eq!((o.request_ms, o.dispatch_ms), (0.0, 0.0));
    }
}
