//! The profiler: how long each node takes on each device that supports it, and what moving
//! bytes between memory domains costs, cached on disk.
//!
//! - Inputs of the real shapes (and, where possible, the real values): the whole graph is run
//!   once on the CPU with seeded inputs and every intermediate value kept; where the CPU cannot
//!   run the graph, shape inference gives the shapes and values are zeros.
//! - Each node is compiled alone as a [`Subgraph`] on each device, and timed *in sequence*:
//!   a pass runs all the device's nodes in topological order, each reading what the earlier
//!   ones produced in that pass, as an inference does (weights are not hot in cache,
//!   outputs are freshly allocated; timing one node in a loop predicted mobilenet_v2 63%
//!   under its measured total). After a warm-up pass, passes repeat until the relative
//!   median absolute deviation of the pass totals is under [`ProfileOptions::target_mad`]
//!   (or a run/time cap). A node's time is its mean over the passes whose totals are in the
//!   middle half, so the nodes of a device add up to a typical pass (the sum of per-node
//!   medians did not: it was 36% under on mobilenet_v2).
//! - Only the example values a pass reads without making them (graph inputs, values made by
//!   nodes the device does not run) are held while timing: holding every intermediate of the
//!   dry run changed how the allocator served the passes (fresh pages faulted in each time).
//! - Calibration: each maximal run of a device's nodes that are consecutive in the
//!   topological order is also timed as one segment, in sequence the same way, and its nodes'
//!   times are scaled so that they add up to it (less one segment's fixed cost). A device's
//!   nodes are therefore measured all together or taken all from the cache.
//! - Per device, the fixed cost of one segment (submit + completion of a subgraph with no
//!   nodes) is measured too: it is subtracted from every node's time (each node ran as its
//!   own segment) and charged once per segment of a plan instead.
//! - Per device, what the *scheduler* adds per segment (handing the segment to the device's
//!   worker thread, its completion back through the reactor) and per request (binding the
//!   inputs, waking the caller, collecting the outputs) is measured by
//!   [`crate::scheduler::measure_overheads`] through the scheduler itself, with a plan of one
//!   and of two empty segments, and cached with the node times ([`cached_overheads`]):
//!   [`Profile::dispatch_ms`] and [`Profile::request_ms`]. Without them a plan's nodes and
//!   segments added up to a run of the segment as the profiler submits it, which is 0.1 ms
//!   (lstm_kws) under a run through the scheduler.
//! - Transfers: zero between locations that share a memory domain (host and host-imported
//!   memory reach every device here); otherwise a staged copy through host memory, timed at
//!   two sizes and fitted as fixed + per-byte cost.
//! - The cache is one text file per device under [`default_cache_dir`], named by the device
//!   fingerprint (name, driver, kind, description, properties) and stamped with the format and
//!   driver version; each line is `signature-hash median-ms checksum`. A file whose stamp does
//!   not match is stale and rebuilt; a line whose checksum does not match is dropped and that
//!   node measured again.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgehal_core::buffer::{Buffer, CopyCounter, MemoryDomain};
use edgehal_core::driver::{Bindings, Device, DeviceInfo, Subgraph, Support, TensorBuffer};
use edgehal_core::graph::{Dim, Graph, NodeId, ValueId};
use edgehal_core::infer::infer_shapes;
use edgehal_core::{DType, Tensor};

use crate::partition::{Problem, TransferCost, Value};
use crate::{Error, Result};

/// Version of the cache file format (bump when the meaning of an entry changes).
/// 4: the scheduler's overheads per device ([`cached_overheads`]) joined the node times.
pub const CACHE_FORMAT: u32 = 4;

/// Where the latency cache lives: `$EDGEHAL_CACHE_DIR`, else `~/.cache/edgehal`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("EDGEHAL_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/edgehal"))
}

/// How to profile.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Cache directory (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Warm-up runs of [`time_subgraph`]; the sequence profiler takes one warm-up pass when
    /// this is not 0.
    pub warmup: usize,
    /// Fewest timed runs (passes, for the sequence profiler).
    pub min_runs: usize,
    /// Most timed runs (passes).
    pub max_runs: usize,
    /// Stop repeating once MAD / median (of the run times, or of the pass totals) is below
    /// this.
    pub target_mad: f64,
    /// Time cap per node and device (after warm-up); a device's passes may take this times
    /// its number of nodes.
    pub budget: Duration,
    /// Longest wait for one run before the device is taken as failed.
    pub run_timeout: Duration,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            cache_dir: default_cache_dir(),
            progress: true,
            warmup: 2,
            min_runs: 5,
            max_runs: DEFAULT_MAX_RUNS,
            target_mad: 0.05,
            budget: Duration::from_millis(300),
            run_timeout: Duration::from_secs(30),
        }
    }
}

/// [`ProfileOptions::max_runs`] by default.
const DEFAULT_MAX_RUNS: usize = 50;

/// Fewest timed passes of the calibration runs (see [`profile`]).
const CALIBRATION_MIN_PASSES: usize = 15;

/// Time after which calibration passes past the first three stop (see [`profile`]).
const CALIBRATION_BUDGET: Duration = Duration::from_secs(2);

/// Shortest time the calibration passes of a device take, and the most passes that may fill
/// it (see [`profile`]).
const CALIBRATION_MIN_TIME: Duration = Duration::from_millis(250);
const CALIBRATION_MAX_PASSES: usize = 2000;

/// What the profiler found.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Device names, in the order of the columns below.
    pub devices: Vec<String>,
    /// Memory domains of each device.
    pub domains: Vec<Vec<MemoryDomain>>,
    /// Nodes in a topological order.
    pub order: Vec<NodeId>,
    /// `times[node][device]`: median milliseconds, `None` where the device does not run it.
    pub times: Vec<Vec<Option<f64>>>,
    /// Why a device does not run a node.
    pub reasons: Vec<Vec<Option<String>>>,
    /// Bytes of each value (0 where unknown).
    pub value_bytes: Vec<u64>,
    /// Transfer cost over locations `0..=devices.len()` (the last is the host).
    pub transfer: Vec<Vec<TransferCost>>,
    /// Fixed cost of one segment (submit + completion) per device, in ms; not part of
    /// `times`.
    pub segment_ms: Vec<f64>,
    /// Per device, what the scheduler adds to each segment beyond `segment_ms` (the worker's
    /// and the reactor's hand-offs), in ms; charged once per segment of a plan.
    pub dispatch_ms: Vec<f64>,
    /// Fixed cost of one request through the scheduler (inputs bound, caller woken, outputs
    /// collected), in ms; charged once per plan.
    pub request_ms: f64,
    /// Per device, when its nodes were timed in sequence now: the median total of one pass
    /// and the sum of the nodes' times (both with every node's submission included).
    pub passes: Vec<Option<(f64, f64)>>,
    /// Per device, when its nodes were measured now: each calibrated run (nodes consecutive
    /// in the topological order, timed as one segment) as (nodes, scale applied to their
    /// times measured alone).
    pub calibration: Vec<Option<Vec<(usize, f64)>>>,
    /// Node/device pairs measured now.
    pub measured: usize,
    /// Node/device pairs taken from the cache.
    pub cached: usize,
    /// Cache entries found corrupt or stale (and measured again).
    pub rebuilt: usize,
}

/// FNV-1a, 64 bit: cache keys and checksums (not for security).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A stable identity for a device: what the probe said about it.
pub fn device_fingerprint(info: &DeviceInfo) -> u64 {
    let props: Vec<String> = info
        .properties
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    fnv64(
        format!(
            "{}\n{}\n{:?}\n{}\n{}",
            info.name,
            info.driver,
            info.kind,
            info.description,
            props.join("\n")
        )
        .as_bytes(),
    )
}

/// Driver version stamped into cache files: edgehal's own version plus what the device
/// reports (`version` / `driver_version` properties).
pub fn driver_version(info: &DeviceInfo) -> String {
    let own = env!("CARGO_PKG_VERSION");
    let dev = info
        .properties
        .get("driver_version")
        .or_else(|| info.properties.get("version"))
        .cloned()
        .unwrap_or_else(|| "-".into());
    format!("{own}/{}/{dev}", info.driver).replace(char::is_whitespace, "_")
}

/// The op signature of node `n`: op, domain, attributes and input dtypes/shapes.
pub fn op_signature(g: &Graph, n: NodeId, inputs: &[Option<(DType, Vec<usize>)>]) -> String {
    let node = &g.nodes[n];
    let ins: Vec<String> = inputs
        .iter()
        .map(|i| match i {
            Some((d, s)) => format!("{d}{s:?}"),
            None => "-".into(),
        })
        .collect();
    format!(
        "{}.{} {:?} ({})",
        node.domain,
        node.op,
        node.attrs,
        ins.join(", ")
    )
}

/// One device's cache file.
struct CacheFile {
    path: PathBuf,
    stamp: String,
    entries: BTreeMap<u64, f64>,
    dirty: bool,
    /// Lines dropped as corrupt, or a whole stale file.
    bad: usize,
}

/// The cache file of the device with fingerprint `fp` under `dir`.
fn cache_path(dir: &Path, fp: u64) -> PathBuf {
    dir.join(format!("profile-{fp:016x}.txt"))
}

fn entry_checksum(key: u64, ms: f64) -> u64 {
    fnv64(format!("{key:016x} {:016x}", ms.to_bits()).as_bytes())
}

impl CacheFile {
    fn open(dir: &Path, info: &DeviceInfo) -> CacheFile {
        let fp = device_fingerprint(info);
        let path = cache_path(dir, fp);
        let stamp = format!(
            "edgehal-profile {CACHE_FORMAT} {fp:016x} {}",
            driver_version(info)
        );
        let mut c = CacheFile {
            path,
            stamp,
            entries: BTreeMap::new(),
            dirty: false,
            bad: 0,
        };
        let Ok(text) = std::fs::read(&c.path) else {
            return c;
        };
        let text = String::from_utf8_lossy(&text);
        let mut lines = text.lines();
        if lines.next() != Some(c.stamp.as_str()) {
            // Stale (other version or format) or a damaged header: rebuild everything.
            c.bad += 1;
            c.dirty = true;
            return c;
        }
        for line in lines {
            let parsed = (|| {
                let mut f = line.split(' ');
                let key = u64::from_str_radix(f.next()?, 16).ok()?;
                let bits = u64::from_str_radix(f.next()?, 16).ok()?;
                let sum = u64::from_str_radix(f.next()?, 16).ok()?;
                if f.next().is_some() {
                    return None;
                }
                let ms = f64::from_bits(bits);
                (sum == entry_checksum(key, ms) && ms.is_finite() && ms >= 0.0).then_some((key, ms))
            })();
            match parsed {
                Some((k, ms)) => {
                    c.entries.insert(k, ms);
                }
                None => {
                    c.bad += 1;
                    c.dirty = true;
                }
            }
        }
        c
    }

    fn save(&self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let mut s = String::new();
        s.push_str(&self.stamp);
        s.push('\n');
        for (k, ms) in &self.entries {
            s.push_str(&format!(
                "{k:016x} {:016x} {:016x}\n",
                ms.to_bits(),
                entry_checksum(*k, *ms)
            ));
        }
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, s).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| Error::io(format!("renaming to {}", self.path.display()), e))
    }
}

/// The scheduler's measured overheads on one device (see [`Profile::dispatch_ms`] and
/// [`Profile::request_ms`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Overheads {
    /// Fixed cost of one request, ms.
    pub request_ms: f64,
    /// Cost of one more segment through the scheduler beyond the device's own submission and
    /// completion, ms.
    pub dispatch_ms: f64,
}

/// Cache keys of [`Overheads`] (in the same file as the node times; op signatures hash to
/// other values).
fn overhead_keys() -> (u64, u64) {
    (
        fnv64(b"edgehal.scheduler request_ms"),
        fnv64(b"edgehal.scheduler dispatch_ms"),
    )
}

/// Drops everything cached for `info` under `dir` (node times and overheads), so the next
/// profile measures the device again. Nothing cached is not an error.
pub fn forget_cached(dir: &Path, info: &DeviceInfo) -> std::io::Result<()> {
    match std::fs::remove_file(cache_path(dir, device_fingerprint(info))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The overheads cached for `info` under `dir`, if the device's cache file is current and
/// both entries pass their checksums.
pub fn cached_overheads(dir: &Path, info: &DeviceInfo) -> Option<Overheads> {
    let c = CacheFile::open(dir, info);
    let (rk, dk) = overhead_keys();
    Some(Overheads {
        request_ms: *c.entries.get(&rk)?,
        dispatch_ms: *c.entries.get(&dk)?,
    })
}

/// Store `o` for `info` under `dir` (the device's other entries are kept; a stale file is
/// rewritten with these alone).
pub fn store_overheads(dir: &Path, info: &DeviceInfo, o: Overheads) -> Result<()> {
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    if !ok(o.request_ms) || !ok(o.dispatch_ms) {
        return Err(Error::arg(format!("overheads {o:?} are not durations")));
    }
    let mut c = CacheFile::open(dir, info);
    let (rk, dk) = overhead_keys();
    c.entries.insert(rk, o.request_ms);
    c.entries.insert(dk, o.dispatch_ms);
    c.dirty = true;
    c.save()
}

/// Seeded values for the graph inputs (floats in [-1, 1), everything else zeros; symbolic
/// dimensions become 1).
pub fn seeded_inputs(g: &Graph, seed: u64) -> Result<Vec<(ValueId, Tensor)>> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut out = Vec::new();
    for &id in &g.inputs {
        let v = &g.values[id];
        let dt = v.dtype.unwrap_or(DType::F32);
        let shape: Vec<usize> = v
            .shape
            .as_ref()
            .map(|s| s.iter().map(|d| d.fixed().unwrap_or(1)).collect())
            .unwrap_or_default();
        let n: usize = shape.iter().product();
        if n as u64 > edgehal_core::MAX_TENSOR_BYTES / 4 {
            return Err(Error::TooLarge(format!(
                "input '{}' {shape:?} is too large to profile",
                v.name
            )));
        }
        let t = if dt.is_float() {
            Tensor::from_vec(shape, (0..n).map(|_| next()).collect::<Vec<f32>>())?.cast(dt)?
        } else {
            Tensor::zeros(dt, shape)?
        };
        out.push((id, t));
    }
    Ok(out)
}

/// Every value of one inference: a CPU dry run with seeded inputs, or zeros of the inferred
/// shapes where the CPU cannot run the graph.
pub fn example_values(g: &Graph, seed: u64) -> Result<HashMap<ValueId, Tensor>> {
    let feeds = seeded_inputs(g, seed)?;
    let mut all = g.clone();
    let mut outs: Vec<ValueId> = Vec::new();
    for n in &g.nodes {
        for &o in n.outputs.iter().flatten() {
            if !outs.contains(&o) {
                outs.push(o);
            }
        }
    }
    all.outputs = outs.clone();
    let mut values: HashMap<ValueId, Tensor> = feeds.iter().cloned().collect();
    for (id, t) in &g.initializers {
        values.insert(*id, t.clone());
    }
    let dry = edgehal_cpu::Executor::new(&all, &edgehal_cpu::Registry::new())
        .and_then(|ex| ex.run(&feeds));
    match dry {
        Ok(ts) => {
            values.extend(outs.into_iter().zip(ts));
        }
        Err(_) => {
            let mut shaped = g.clone();
            for (id, t) in &feeds {
                shaped.values[*id].dtype = Some(t.dtype());
                shaped.values[*id].shape = Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect());
            }
            infer_shapes(&mut shaped);
            for o in outs {
                let v = &shaped.values[o];
                if let (Some(dt), Some(s)) = (v.dtype, v.fixed_shape()) {
                    values.insert(o, Tensor::zeros(dt, s)?);
                }
            }
        }
    }
    Ok(values)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median absolute deviation relative to the median.
fn rel_mad(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    let m = median(&mut s);
    let mut dev: Vec<f64> = v.iter().map(|x| (x - m).abs()).collect();
    let mad = median(&mut dev);
    if m > 0.0 {
        mad / m
    } else {
        0.0
    }
}

/// Time `sub` on `dev` with `inputs` (see the module docs); returns the median in ms.
pub fn time_subgraph(
    dev: &dyn Device,
    sub: &Subgraph,
    inputs: &[Tensor],
    opts: &ProfileOptions,
) -> Result<f64> {
    let exe = crate::passes::compile_segment(dev, sub)?;
    let counter = CopyCounter::new();
    let ins: Vec<TensorBuffer> = inputs
        .iter()
        .map(|t| TensorBuffer::from_tensor(t, &counter))
        .collect();
    let once = || -> Result<f64> {
        let b = Bindings::new(ins.clone(), vec![None; sub.graph.outputs.len()], &counter);
        let t0 = Instant::now();
        dev.submit(exe.as_ref(), &b)?.wait(Some(opts.run_timeout))?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..opts.warmup {
        once()?;
    }
    let start = Instant::now();
    let mut times = Vec::new();
    loop {
        times.push(once()?);
        let n = times.len();
        if n >= opts.max_runs.max(1)
            || (n >= opts.min_runs && rel_mad(&times) < opts.target_mad)
            || (n >= 3 && start.elapsed() > opts.budget)
        {
            break;
        }
    }
    Ok(median(&mut times))
}

/// Time of one host copy of `bytes` bytes through a staging buffer, in ms (median of 5).
fn host_copy_ms(bytes: usize) -> Result<f64> {
    let c = CopyCounter::new();
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut t = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let b = Buffer::alloc(bytes, &c)?;
        b.write_from(0, &src)?;
        b.read_into(0, &mut dst)?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&mut t))
}

/// Transfer costs between locations with the given domains (host last).
pub fn transfer_table(domains: &[Vec<MemoryDomain>]) -> Result<Vec<Vec<TransferCost>>> {
    let mut locs: Vec<Vec<MemoryDomain>> = domains.to_vec();
    locs.push(vec![MemoryDomain::Host, MemoryDomain::HostImported]);
    let mut staged: Option<TransferCost> = None;
    let mut t = vec![vec![TransferCost::ZERO; locs.len()]; locs.len()];
    for i in 0..locs.len() {
        for j in 0..locs.len() {
            if i == j || locs[i].iter().any(|d| locs[j].contains(d)) {
                continue;
            }
            let c = match staged {
                Some(c) => c,
                None => {
                    let small = 4096;
                    let big = 4 << 20;
                    let a = host_copy_ms(small)?;
                    let b = host_copy_ms(big)?;
                    let per = ((b - a) / (big - small) as f64).max(0.0);
                    let c = TransferCost {
                        fixed_ms: (a - per * small as f64).max(0.0),
                        per_byte_ms: per,
                    };
                    staged = Some(c);
                    c
                }
            };
            t[i][j] = c;
        }
    }
    Ok(t)
}

struct Bar {
    on: bool,
    total: usize,
    done: usize,
}

impl Bar {
    fn new(on: bool, total: usize) -> Bar {
        Bar {
            on: on && std::io::stderr().is_terminal(),
            total,
            done: 0,
        }
    }
    fn step(&mut self, what: &str) {
        self.done += 1;
        if !self.on {
            return;
        }
        let w = 30;
        let fill = (self.done * w) / self.total.max(1);
        let what: String = what.chars().take(40).collect();
        eprint!(
            "\rprofiling [{}{}] {}/{} {what:<40}",
            "#".repeat(fill),
            ".".repeat(w - fill),
            self.done,
            self.total
        );
        if self.done == self.total {
            eprintln!();
        }
    }
}

/// Cost of one segment submission on `dev`: submit and wait for a subgraph with no nodes (its
/// one input is its output) or, where the device cannot run that, one `Identity` of a single
/// float (whose own work is negligible next to a submission); median of 20 after 3 warm-up
/// runs. `None` where the device runs neither.
pub fn segment_overhead(dev: &dyn Device, opts: &ProfileOptions) -> Option<f64> {
    let o = ProfileOptions {
        warmup: 3,
        min_runs: 20,
        max_runs: 20,
        target_mad: 0.0,
        ..opts.clone()
    };
    let t = Tensor::from_vec(vec![1], vec![0.0f32]).ok()?;
    [false, true].into_iter().find_map(|identity| {
        let mut g = Graph::new("edgehal-empty-segment");
        g.opsets.insert(String::new(), 17);
        let x = g.value_id("x");
        g.values[x].dtype = Some(DType::F32);
        g.values[x].shape = Some(vec![Dim::Fixed(1)]);
        g.inputs = vec![x];
        g.outputs = vec![x];
        if identity {
            let y = g.value_id("y");
            g.values[y].dtype = Some(DType::F32);
            g.values[y].shape = Some(vec![Dim::Fixed(1)]);
            g.outputs = vec![y];
            let node = edgehal_core::graph::Node {
                op: "Identity".into(),
                inputs: vec![Some(x)],
                outputs: vec![Some(y)],
                ..Default::default()
            };
            if !dev.supports(&node, &g).is_yes() {
                return None;
            }
            g.add_node(node);
        }
        let sub = Subgraph {
            parent_nodes: (0..g.nodes.len()).collect(),
            graph: g,
        };
        time_subgraph(dev, &sub, std::slice::from_ref(&t), &o).ok()
    })
}

/// Where the inputs of a node come from during a profiling pass.
fn node_inputs(
    g: &Graph,
    sub: &Subgraph,
    pass: &HashMap<ValueId, Tensor>,
    values: &HashMap<ValueId, Tensor>,
) -> std::result::Result<Vec<Tensor>, String> {
    sub.graph
        .inputs
        .iter()
        .map(|&v| {
            let name = sub.graph.value_name(v);
            g.find_value(name)
                .and_then(|id| pass.get(&id).or_else(|| values.get(&id)))
                .cloned()
                .ok_or_else(|| format!("no example value for input '{name}'"))
        })
        .collect()
}

/// A group's time on a device in ms (by index into the groups given), or why it has none.
type GroupTiming = (usize, std::result::Result<f64, String>);

/// Time the node groups in `groups` (topological order; each group is compiled as one
/// [`Subgraph`]) on `dev` *in sequence*: each pass runs them one after another the way an
/// inference does, each group reading what the previous ones produced in the same pass
/// (example values for inputs made elsewhere), so weights come from memory rather than a hot
/// cache and outputs are freshly allocated. Passes repeat until the pass totals are stable
/// (see [`ProfileOptions`]; the time cap is per node); every group keeps its mean over the
/// central passes. Returns per group its time or why it failed, and (median pass total, sum
/// of the group times). `bar`, if given, advances once per node.
fn profile_in_sequence(
    g: &Graph,
    dev: &dyn Device,
    groups: &[Vec<NodeId>],
    values: &HashMap<ValueId, Tensor>,
    opts: &ProfileOptions,
    min_time: Duration,
    mut bar: Option<&mut Bar>,
) -> (Vec<GroupTiming>, Option<(f64, f64)>) {
    let counter = CopyCounter::new();
    let name = dev.info().name.clone();
    let step = |bar: &mut Option<&mut Bar>, nodes: &[NodeId]| {
        if let Some(bar) = bar {
            for &n in nodes {
                bar.step(&format!("{} on {name}", g.describe_node(n)));
            }
        }
    };
    // Compile every group alone.
    let mut live: Vec<(usize, Subgraph, Box<dyn edgehal_core::driver::Executable>)> = Vec::new();
    let mut out: Vec<GroupTiming> = Vec::new();
    for (gi, nodes) in groups.iter().enumerate() {
        let compiled = Subgraph::extract(g, nodes).and_then(|sub| {
            let exe = crate::passes::compile_segment(dev, &sub)?;
            Ok((sub, exe))
        });
        match compiled {
            Ok((sub, exe)) => live.push((gi, sub, exe)),
            Err(e) => {
                step(&mut bar, nodes);
                out.push((gi, Err(format!("failed while profiling: {e}"))));
            }
        }
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); live.len()];
    let mut failed: Vec<Option<String>> = vec![None; live.len()];
    let mut totals: Vec<f64> = Vec::new();
    let n_nodes: usize = live.iter().map(|(gi, _, _)| groups[*gi].len()).sum();
    let budget = opts
        .budget
        .saturating_mul(u32::try_from(n_nodes.max(1)).unwrap_or(u32::MAX));
    let start = Instant::now();
    let mut pass_no = 0usize;
    // As the executor does, a value made in the pass is dropped after its last reader, so the
    // allocator can reuse its memory (keeping every value made the pass slower than a run).
    let ids = |sub: &Subgraph, vs: &[ValueId]| -> Vec<ValueId> {
        vs.iter()
            .filter_map(|&v| g.find_value(sub.graph.value_name(v)))
            .collect()
    };
    let mut last_use: HashMap<ValueId, usize> = HashMap::new();
    for (k, (_, sub, _)) in live.iter().enumerate() {
        for id in ids(sub, &sub.graph.inputs) {
            last_use.insert(id, k);
        }
    }
    loop {
        let mut pass: HashMap<ValueId, Tensor> = HashMap::new();
        let mut total = 0.0;
        for (k, (gi, sub, exe)) in live.iter().enumerate() {
            if pass_no == 0 {
                step(&mut bar, &groups[*gi]);
            }
            if failed[k].is_some() {
                continue;
            }
            let r = (|| -> std::result::Result<f64, String> {
                let ins: Vec<TensorBuffer> = node_inputs(g, sub, &pass, values)?
                    .iter()
                    .map(|t| TensorBuffer::from_tensor(t, &counter))
                    .collect();
                let b = Bindings::new(ins, vec![None; sub.graph.outputs.len()], &counter);
                let t0 = Instant::now();
                dev.submit(exe.as_ref(), &b)
                    .and_then(|f| f.wait(Some(opts.run_timeout)))
                    .map_err(|e| format!("failed while profiling: {e}"))?;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                for (i, &v) in sub.graph.outputs.iter().enumerate() {
                    let Some(id) = g.find_value(sub.graph.value_name(v)) else {
                        continue;
                    };
                    if last_use.get(&id).is_some_and(|&l| l > k) {
                        if let Some(Ok(t)) = b.output(i).map(|tb| tb.to_tensor()) {
                            pass.insert(id, t);
                        }
                    }
                }
                Ok(ms)
            })();
            for id in ids(sub, &sub.graph.inputs) {
                if last_use.get(&id) == Some(&k) {
                    pass.remove(&id);
                }
            }
            match r {
                Ok(ms) => {
                    total += ms;
                    if pass_no >= opts.warmup.min(1) {
                        samples[k].push(ms);
                    }
                }
                Err(e) => failed[k] = Some(e),
            }
        }
        if pass_no >= opts.warmup.min(1) {
            totals.push(total);
        }
        pass_no += 1;
        let m = totals.len();
        let elapsed = start.elapsed();
        if m >= opts.max_runs.max(1)
            || (m >= opts.min_runs && rel_mad(&totals) < opts.target_mad && elapsed >= min_time)
            || (m >= 3 && elapsed > budget)
        {
            break;
        }
    }
    // The passes whose totals lie in the middle half; each group's time is its mean over
    // them. (Per-node medians missed: with many small nodes whose time is sometimes much
    // longer, e.g. when a fresh allocation faults its pages in, the sum of the medians was
    // 36% under a typical pass on mobilenet_v2.) Their sum is then a typical pass.
    let mut by_total: Vec<usize> = (0..totals.len()).collect();
    by_total.sort_by(|&a, &b| totals[a].total_cmp(&totals[b]));
    let q = totals.len() / 4;
    let central = by_total.get(q..totals.len() - q).unwrap_or(&[]);
    let mut sum = 0.0;
    for (k, (gi, _, _)) in live.iter().enumerate() {
        let r = match failed[k].take() {
            Some(e) => Err(e),
            None => {
                let picked: Vec<f64> = central
                    .iter()
                    .filter_map(|&i| samples[k].get(i).copied())
                    .collect();
                if picked.is_empty() {
                    Err("no timed pass".to_string())
                } else {
                    Ok(picked.iter().sum::<f64>() / picked.len() as f64)
                }
            }
        };
        if let Ok(ms) = r {
            sum += ms;
        }
        out.push((*gi, r));
    }
    let pass = (!totals.is_empty()).then(|| (median(&mut totals), sum));
    (out, pass)
}

/// Maximal runs of `nodes` (a subsequence of `order`) that are consecutive in `order`.
fn consecutive_runs(order: &[NodeId], nodes: &[NodeId]) -> Vec<Vec<NodeId>> {
    let set: std::collections::HashSet<NodeId> = nodes.iter().copied().collect();
    let mut runs: Vec<Vec<NodeId>> = Vec::new();
    let mut cur: Vec<NodeId> = Vec::new();
    for &n in order {
        if set.contains(&n) {
            cur.push(n);
        } else if !cur.is_empty() {
            runs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs
}

/// Scale factor per run: what the run costs as one segment (less one segment's fixed cost)
/// over the sum of its nodes' times measured alone. Runs of one node, or whose numbers are
/// unusable, get 1.
pub fn run_scale(segment_total_ms: f64, segment_ms: f64, node_sum_ms: f64) -> f64 {
    let inner = segment_total_ms - segment_ms;
    if node_sum_ms > 0.0 && inner.is_finite() && inner > 0.0 {
        inner / node_sum_ms
    } else {
        1.0
    }
}

/// Profile every node of `g` on every device in `devices` (see the module docs).
pub fn profile(g: &Graph, devices: &[Arc<dyn Device>], opts: &ProfileOptions) -> Result<Profile> {
    let order = g.topo_order()?;
    let mut values = example_values(g, 7)?;
    let mut value_bytes = vec![0u64; g.values.len()];
    for (id, t) in &values {
        if let Some(b) = value_bytes.get_mut(*id) {
            *b = t.bytes().len() as u64;
        }
    }
    let nd = devices.len();
    let mut caches: Vec<Option<CacheFile>> = devices
        .iter()
        .map(|d| {
            opts.cache_dir
                .as_ref()
                .map(|dir| CacheFile::open(dir, d.info()))
        })
        .collect();
    let mut times = vec![vec![None; nd]; g.nodes.len()];
    let mut reasons = vec![vec![None; nd]; g.nodes.len()];
    let (mut measured, mut cached) = (0, 0);
    let rebuilt = caches.iter().flatten().map(|c| c.bad).sum();
    let mut bar = Bar::new(opts.progress, order.len() * nd);
    let keys: Vec<u64> = (0..g.nodes.len())
        .map(|n| {
            let sig_inputs: Vec<Option<(DType, Vec<usize>)>> = g.nodes[n]
                .inputs
                .iter()
                .map(|i| {
                    i.and_then(|i| values.get(&i))
                        .map(|t| (t.dtype(), t.shape().to_vec()))
                })
                .collect();
            fnv64(op_signature(g, n, &sig_inputs).as_bytes())
        })
        .collect();
    let mut segment_ms = vec![0.0; nd];
    let mut passes = vec![None; nd];
    let mut calibration = vec![None; nd];
    let mut todos: Vec<Vec<NodeId>> = Vec::new();
    for (d, dev) in devices.iter().enumerate() {
        let mut todo = Vec::new();
        for &n in &order {
            if let Support::No { reason } = dev.supports(&g.nodes[n], g) {
                reasons[n][d] = Some(reason);
                bar.step(&format!("{} on {}", g.describe_node(n), dev.info().name));
            } else {
                todo.push(n);
            }
        }
        todos.push(todo);
    }
    // Keep only the example values a pass reads without making them itself (graph inputs,
    // initializers, values made by nodes a device does not run). Holding every intermediate
    // of the dry run while timing changed how the allocator served the passes: their
    // outputs were page-faulted in afresh each time, and mobilenet_v2's portable graph
    // profiled on one CPU thread at twice what it then ran at (measured: the same timings
    // with glibc's mmap and trim thresholds pinned high matched the run).
    let producers = g.producers();
    let mut keep: std::collections::HashSet<ValueId> = std::collections::HashSet::new();
    for todo in &todos {
        let set: std::collections::HashSet<NodeId> = todo.iter().copied().collect();
        for &n in todo {
            let node = &g.nodes[n];
            for &v in node.inputs.iter().flatten() {
                if producers
                    .get(v)
                    .copied()
                    .flatten()
                    .is_none_or(|p| !set.contains(&p))
                {
                    keep.insert(v);
                }
            }
            for a in node.attrs.values() {
                if let edgehal_core::Attr::Graph(body) = a {
                    keep.extend(body.captured_names().iter().filter_map(|c| g.find_value(c)));
                }
            }
        }
    }
    values.retain(|id, _| keep.contains(id));
    for (d, todo) in todos.into_iter().enumerate() {
        let dev = &devices[d];
        // When every node is in the cache, the cache answers. Otherwise every node of the
        // device is timed again: calibration (below) scales node times to the runs they
        // form in this graph, so a run with some nodes cached (from another graph, or
        // calibrated within other runs) would be scaled from a mix of contexts.
        let all_cached = caches[d]
            .as_ref()
            .is_some_and(|c| todo.iter().all(|n| c.entries.contains_key(&keys[*n])));
        let mut fresh = Vec::new();
        for n in todo {
            match caches[d]
                .as_ref()
                .and_then(|c| c.entries.get(&keys[n]))
                .filter(|_| all_cached)
            {
                Some(&ms) => {
                    bar.step(&format!("{} on {}", g.describe_node(n), dev.info().name));
                    times[n][d] = Some(ms);
                    cached += 1;
                }
                None => fresh.push(n),
            }
        }
        // The segment cost is cheap to measure (a few empty submissions) and not cached.
        let seg = segment_overhead(dev.as_ref(), opts).unwrap_or(0.0);
        segment_ms[d] = seg;
        if fresh.is_empty() {
            continue;
        }
        let singles: Vec<Vec<NodeId>> = fresh.iter().map(|&n| vec![n]).collect();
        let (results, pass) = profile_in_sequence(
            g,
            dev.as_ref(),
            &singles,
            &values,
            opts,
            Duration::ZERO,
            Some(&mut bar),
        );
        passes[d] = pass;
        let mut alone: HashMap<NodeId, f64> = HashMap::new();
        for (gi, r) in results {
            let n = fresh[gi];
            match r {
                // Every node ran as its own segment: one segment's cost is not the node's.
                Ok(ms) => {
                    alone.insert(n, (ms - seg).max(0.0));
                }
                Err(e) => reasons[n][d] = Some(e),
            }
        }
        // Calibration: nodes run inside one segment cost less than alone (on mobilenet_v2's
        // portable graph on one CPU thread the nodes alone summed to 21.2 ms, the graph as
        // one segment measured 13.2 ms; see ARCHITECTURE.md). Each maximal run of the
        // measured nodes (consecutive in the topological order) is timed as one segment the
        // same way, and its nodes' times are scaled so that they add up to it.
        let ok: Vec<NodeId> = fresh
            .iter()
            .copied()
            .filter(|n| alone.contains_key(n))
            .collect();
        let runs: Vec<Vec<NodeId>> = consecutive_runs(&order, &ok)
            .into_iter()
            .filter(|r| r.len() > 1)
            .collect();
        if !runs.is_empty() {
            // Every node time is scaled by these passes, so they get more of them than the
            // node passes' minimum: five passes that all fell in a slow second of a shared
            // machine once predicted mobilenet_v2_int8 38% high.
            // On a slow device (the null device's 5 ms per node over 1461 nodes: 7 s a
            // pass) the extra passes stop after about two seconds, as long as three ran. On
            // a fast model they go on for a quarter of a second: fifteen passes of a 0.5 ms
            // model are 8 ms, short enough to fall in one slow stretch of this machine
            // whole (person_detect predicted 0.61 ms, measured 0.44 ms). Callers that cap
            // the passes below the default (quick profiles in tests) keep a cap.
            let cal_nodes: usize = runs.iter().map(|r| r.len()).sum();
            let (max_runs, min_time) = if opts.max_runs >= DEFAULT_MAX_RUNS {
                (CALIBRATION_MAX_PASSES, CALIBRATION_MIN_TIME)
            } else {
                (opts.max_runs.max(CALIBRATION_MIN_PASSES), Duration::ZERO)
            };
            let cal_opts = ProfileOptions {
                min_runs: opts.min_runs.max(CALIBRATION_MIN_PASSES),
                max_runs,
                budget: opts
                    .budget
                    .min(CALIBRATION_BUDGET / u32::try_from(cal_nodes.max(1)).unwrap_or(u32::MAX)),
                ..opts.clone()
            };
            let (seg_results, _) =
                profile_in_sequence(g, dev.as_ref(), &runs, &values, &cal_opts, min_time, None);
            let mut scale = vec![1.0; runs.len()];
            for (ri, r) in seg_results {
                if let (Ok(total), Some(run)) = (r, runs.get(ri)) {
                    let sum: f64 = run.iter().filter_map(|n| alone.get(n)).sum();
                    scale[ri] = run_scale(total, seg, sum);
                }
            }
            for (run, f) in runs.iter().zip(&scale) {
                for n in run {
                    if let Some(ms) = alone.get_mut(n) {
                        *ms *= f;
                    }
                }
            }
            calibration[d] = Some(
                runs.iter()
                    .zip(&scale)
                    .map(|(r, f)| (r.len(), *f))
                    .collect(),
            );
        }
        for n in ok {
            let Some(&ms) = alone.get(&n) else { continue };
            times[n][d] = Some(ms);
            measured += 1;
            if let Some(c) = caches[d].as_mut() {
                c.entries.insert(keys[n], ms);
                c.dirty = true;
            }
        }
    }
    for c in caches.iter().flatten() {
        // A cache that cannot be written costs time next run, not correctness.
        if let Err(e) = c.save() {
            eprintln!("edgehal: latency cache not saved: {e}");
        }
    }
    let domains: Vec<Vec<MemoryDomain>> = devices.iter().map(|d| d.memory().to_vec()).collect();
    Ok(Profile {
        devices: devices.iter().map(|d| d.info().name.clone()).collect(),
        transfer: transfer_table(&domains)?,
        domains,
        order,
        times,
        reasons,
        value_bytes,
        dispatch_ms: vec![0.0; nd],
        request_ms: 0.0,
        segment_ms,
        passes,
        calibration,
        measured,
        cached,
        rebuilt,
    })
}

impl Profile {
    /// What one segment on device `d` costs beyond its nodes: the device's submission and
    /// completion plus the scheduler's hand-offs.
    pub fn segment_cost(&self, d: usize) -> f64 {
        self.segment_ms.get(d).copied().unwrap_or(0.0)
            + self.dispatch_ms.get(d).copied().unwrap_or(0.0)
    }

    /// The partitioning problem for `g` (nodes renumbered in [`Profile::order`]); devices with
    /// `allowed[d] == false` are excluded and pinned nodes may only go where they are pinned.
    pub fn problem(&self, g: &Graph, allowed: &[bool], pins: &HashMap<NodeId, usize>) -> Problem {
        let nd = self.devices.len();
        let mut pos = vec![usize::MAX; g.nodes.len()];
        for (i, &n) in self.order.iter().enumerate() {
            pos[n] = i;
        }
        let cost = self
            .order
            .iter()
            .map(|&n| {
                (0..nd)
                    .map(|d| {
                        let ok = allowed.get(d).copied().unwrap_or(false)
                            && pins.get(&n).is_none_or(|&p| p == d);
                        if ok {
                            self.times[n][d]
                        } else {
                            None
                        }
                    })
                    .collect()
            })
            .collect();
        let producers = g.producers();
        let consumers = g.consumers();
        let mut values = Vec::new();
        for v in 0..g.values.len() {
            if g.initializers.contains_key(&v) {
                continue;
            }
            let to_host = g.outputs.contains(&v);
            if consumers[v].is_empty() && !to_host {
                continue;
            }
            if producers[v].is_none() && !g.inputs.contains(&v) {
                continue;
            }
            values.push(Value {
                producer: producers[v].map(|p| pos[p]),
                consumers: consumers[v].iter().map(|&c| pos[c]).collect(),
                to_host,
                bytes: self.value_bytes.get(v).copied().unwrap_or(0),
            });
        }
        Problem {
            n_devices: nd,
            cost,
            values,
            transfer: self.transfer.clone(),
            segment_ms: (0..nd).map(|d| self.segment_cost(d)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_maximal_and_consecutive_in_the_order() {
        let order = [4, 0, 3, 1, 2, 5];
        assert_eq!(
            consecutive_runs(&order, &[0, 4, 1, 2]),
            vec![vec![4, 0], vec![1, 2]]
        );
        assert_eq!(consecutive_runs(&order, &[5]), vec![vec![5]]);
        assert!(consecutive_runs(&order, &[]).is_empty());
    }

    #[test]
    fn run_scale_maps_node_sums_onto_the_segment() {
        // Nodes alone summed to 20 ms; the run as one segment took 12 ms of which 2 ms is
        // the segment's fixed cost: node times scale by 0.5.
        assert!((run_scale(12.0, 2.0, 20.0) - 0.5).abs() < 1e-12);
        assert!((run_scale(30.0, 0.0, 20.0) - 1.5).abs() < 1e-12);
        // Unusable numbers leave the times alone.
        assert_eq!(run_scale(1.0, 2.0, 20.0), 1.0);
        assert_eq!(run_scale(5.0, 0.0, 0.0), 1.0);
        assert_eq!(run_scale(f64::NAN, 0.0, 3.0), 1.0);
    }

    fn overhead_dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("edgehal-overheads-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn null_info() -> DeviceInfo {
        DeviceInfo::new(
            "null0",
            edgehal_core::driver::DeviceKind::Other,
            "null",
            vec![MemoryDomain::Host],
        )
    }

    #[test]
    fn overheads_are_cached_and_bad_or_stale_entries_are_not_trusted() {
        let dir = overhead_dir("cache");
        let info = null_info();
        assert_eq!(cached_overheads(&dir, &info), None, "nothing cached yet");
        let o = Overheads {
            request_ms: 0.0165,
            dispatch_ms: 0.0125,
        };
        store_overheads(&dir, &info, o).unwrap();
        assert_eq!(cached_overheads(&dir, &info), Some(o));
        // Another device has its own file.
        let mut other = null_info();
        other.name = "null1".into();
        assert_eq!(cached_overheads(&dir, &other), None);
        let file = dir.join(format!("profile-{:016x}.txt", device_fingerprint(&info)));
        let text = std::fs::read_to_string(&file).unwrap();
        // A flipped digit in one entry fails its checksum: not trusted.
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let mid = lines[1].find(' ').unwrap() + 3;
        let ch = lines[1].as_bytes()[mid];
        let flipped = if ch == b'0' { "1" } else { "0" };
        lines[1].replace_range(mid..mid + 1, flipped);
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        assert_eq!(cached_overheads(&dir, &info), None, "corrupt entry");
        // A file of the previous format (before the overheads were part of it) is stale.
        std::fs::write(
            &file,
            text.replacen(
                &format!("edgehal-profile {CACHE_FORMAT} "),
                &format!("edgehal-profile {} ", CACHE_FORMAT - 1),
                1,
            ),
        )
        .unwrap();
        assert_eq!(cached_overheads(&dir, &info), None, "stale format");
        // Storing again rewrites the stale file.
        store_overheads(&dir, &info, o).unwrap();
        assert_eq!(cached_overheads(&dir, &info), Some(o));
        assert!(store_overheads(
            &dir,
            &info,
            Overheads {
                request_ms: f64::NAN,
                dispatch_ms: 0.0
            }
        )
        .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn segment_cost_adds_submission_and_dispatch() {
        let p = Profile {
            devices: vec!["a".into(), "b".into()],
            domains: vec![vec![MemoryDomain::Host]; 2],
            order: vec![],
            times: vec![],
            reasons: vec![],
            value_bytes: vec![],
            transfer: vec![vec![TransferCost::ZERO; 3]; 3],
            segment_ms: vec![0.5, 0.25],
            dispatch_ms: vec![0.125, 2.0],
            request_ms: 1.0,
            passes: vec![None; 2],
            calibration: vec![None; 2],
            measured: 0,
            cached: 0,
            rebuilt: 0,
        };
        assert_eq!(p.segment_cost(0), 0.625);
        assert_eq!(p.segment_cost(1), 2.25);
        assert_eq!(p.segment_cost(2), 0.0);
    }
}
