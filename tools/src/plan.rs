//! `edgehal plan`: profile a model on the given devices, choose the split with the lowest
//! end-to-end latency, run it and explain it (table, `--json`, `--svg`). Also the streaming
//! throughput benchmark behind `edgehal bench --stream N`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use edgehal::plan::Plan;
use edgehal::profile::{seeded_inputs, ProfileOptions};
use edgehal::scheduler::{open_devices, Scheduler, SchedulerOptions};
use edgehal::{Model, Session, SessionOptions};
use edgehal_core::{Graph, Tensor};
use serde_json::json;

use crate::bench::summarize;

/// Arguments of `edgehal plan`.
pub struct PlanArgs {
    pub model: PathBuf,
    pub devices: String,
    /// `WHAT=DEVICE,...` (op type, node index or node name).
    pub pin: String,
    pub json: bool,
    pub svg: Option<PathBuf>,
    pub runs: usize,
}

/// Plan pins from `WHAT=DEVICE,...`: an op type pins every node of that type; anything else
/// (node index or name) is passed on as is.
fn pins(g: &Graph, spec: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((what, dev)) = item.split_once('=') else {
            bail!("--pin {item}: expected WHAT=DEVICE (op type, node index or node name)");
        };
        let nodes: Vec<usize> = (0..g.nodes.len())
            .filter(|&i| g.nodes[i].op == what)
            .collect();
        if nodes.is_empty() {
            out.push((what.to_string(), dev.to_string()));
        } else {
            out.extend(nodes.into_iter().map(|i| (i.to_string(), dev.to_string())));
        }
    }
    Ok(out)
}

fn device_list(s: &str) -> Result<Vec<String>> {
    let v: Vec<String> = s
        .split(',')
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect();
    if v.is_empty() {
        bail!("--devices needs at least one device name");
    }
    Ok(v)
}

fn feeds_for(g: &Graph) -> Result<Vec<(String, Tensor)>> {
    Ok(seeded_inputs(g, 7)
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .map(|(id, t)| (g.value_name(id).to_string(), t))
        .collect())
}

/// Warm-up runs before each measured plan: the first run after a plan change compiles
/// nothing but meets cold caches, fresh allocations and sleeping pool threads.
const WARMUP: usize = 3;

/// Rounds the measured plans take turns in (see [`measure_all`]).
const ROUNDS: usize = 10;

/// A plan whose runs take at least this long gets no warm-up run after its first: a cold
/// cache is lost in its time (a null device's plan of 5 ms per node takes seconds).
const WARM_LONG_MS: f64 = 50.0;

/// Shortest span of a plan's timed runs in [`measure_all`]: a fast plan takes more runs than
/// asked (30 runs of a 0.5 ms model are 15 ms, which one slow stretch of this machine covers
/// whole), at most [`MAX_RUNS_FACTOR`] times as many.
const MIN_MEASURE_MS: f64 = 250.0;
const MAX_RUNS_FACTOR: usize = 20;

/// A long plan (see [`WARM_LONG_MS`]) at least this many times slower than the fastest one
/// takes its later runs after the rounds, not between them. At 10, resnet18's null0 plan
/// (240 ms against 35) stayed in the rounds, and the plan run right after it (the chosen
/// one, the same all-CPU plan as "cpu alone") measured 41.2 ms against 35.0 ms.
const DEFER_RATIO: f64 = 4.0;

/// Median wall time of each plan in `plans`: `runs` timed runs each (more for a fast plan,
/// see [`MIN_MEASURE_MS`]), taken in [`ROUNDS`]
/// rounds in which every plan runs in turn (after untimed runs whenever it is installed:
/// [`WARMUP`] the first time, then one unless its runs are long), so the plans compared, and
/// the measured total set against the prediction, share the machine's state. On this shared
/// 2-vCPU machine the same code runs 1.5 times slower for stretches of 0.1 s to seconds:
/// with the runs in three blocks one such stretch could take a third of a plan's samples and
/// shift its median (the all-CPU plan of mobilenet_v2_int8 measured 8.4 ms as the chosen plan
/// and 6.0 ms as "cpu alone" in the same call). A plan far slower than the others (a null
/// device's, seconds a run) runs in the first round only and takes its other runs at the
/// end: between the rounds it spread the fast plans' samples over a minute of mostly idle
/// time instead of the second they need.
fn measure_all(
    s: &Scheduler,
    plans: &[Plan],
    feeds: &[(String, Tensor)],
    runs: usize,
) -> Result<Vec<(f64, usize)>> {
    let runs = runs.max(1);
    // Compiled once: switching plans between rounds must not repack every weight.
    let compiled = plans
        .iter()
        .map(|p| s.compile(p.clone()).map_err(|e| anyhow!("{e}")))
        .collect::<Result<Vec<_>>>()?;
    let median = |t: &[f64]| summarize(&mut t.to_vec()).0;
    let timed = |c, t: &mut Vec<f64>, n: usize| -> Result<()> {
        s.use_compiled(c);
        // The first installation meets fresh allocations and cold pool threads; later ones
        // only a cold cache.
        let warm = if t.is_empty() {
            WARMUP
        } else if median(t) >= WARM_LONG_MS {
            0
        } else {
            1
        };
        for _ in 0..warm {
            s.run(feeds.to_vec(), None).map_err(|e| anyhow!("{e}"))?;
        }
        for _ in 0..n {
            let t0 = Instant::now();
            s.run(feeds.to_vec(), None).map_err(|e| anyhow!("{e}"))?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    };
    // First round: every plan, a tenth of its runs.
    let first = runs.div_ceil(ROUNDS);
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); plans.len()];
    for (c, t) in compiled.iter().zip(samples.iter_mut()) {
        timed(c, t, first)?;
    }
    let medians: Vec<f64> = samples.iter().map(|t| median(t)).collect();
    let fastest = medians.iter().copied().fold(f64::INFINITY, f64::min);
    let deferred: Vec<bool> = medians
        .iter()
        .map(|&m| m >= WARM_LONG_MS && m >= DEFER_RATIO * fastest)
        .collect();
    // Runs in all: `runs`, more for a fast plan, so its samples span [`MIN_MEASURE_MS`].
    let target: Vec<usize> = medians
        .iter()
        .map(|&m| {
            let by_time = (MIN_MEASURE_MS / m.max(1e-3)).ceil() as usize;
            by_time.clamp(runs, runs * MAX_RUNS_FACTOR)
        })
        .collect();
    // The other rounds share what is left of the fast plans' runs.
    for round in 1..ROUNDS {
        for (i, (c, t)) in compiled.iter().zip(samples.iter_mut()).enumerate() {
            if deferred[i] {
                continue;
            }
            let left = target[i].saturating_sub(first);
            let n = left * round / (ROUNDS - 1) - left * (round - 1) / (ROUNDS - 1);
            if n > 0 {
                timed(c, t, n)?;
            }
        }
    }
    for (c, t) in compiled.iter().zip(samples.iter_mut()) {
        if t.len() < runs {
            let n = runs - t.len();
            timed(c, t, n)?;
        }
    }
    Ok(samples
        .iter_mut()
        .map(|t| (summarize(t).0, t.len()))
        .collect())
}

/// Prediction error limit beyond which [`speed_shift`] suspects the profile.
const SHIFT_LIMIT: f64 = 0.15;

/// The device carrying most of `chosen`'s predicted time and how far its single-device plan
/// measured from its prediction (`measured / predicted - 1`), when the chosen plan and that device's single-device
/// plan both missed by more than [`SHIFT_LIMIT`] in the same direction: the device's profile
/// no longer matches how fast it runs. `times[i]` is the measured median of `plans[i]`;
/// `single_of[d]` the index of device `d`'s single-device plan.
fn speed_shift(
    chosen: &Plan,
    plans: &[Plan],
    times: &[(f64, usize)],
    single_of: &[Option<usize>],
) -> Option<(usize, f64)> {
    let err = |i: usize| (plans[i].predicted_ms - times[i].0) / times[i].0;
    let mut per_device = vec![0.0; single_of.len()];
    for seg in &chosen.segments {
        if let Some(t) = per_device.get_mut(seg.device) {
            *t += seg.predicted_ms;
        }
    }
    let d = (0..per_device.len()).max_by(|&a, &b| per_device[a].total_cmp(&per_device[b]))?;
    let (c, e) = (err(0), err(single_of[d]?));
    (c.abs() > SHIFT_LIMIT && e.abs() > SHIFT_LIMIT && c.signum() == e.signum())
        .then_some((d, 1.0 / (1.0 + e) - 1.0))
}

/// Run `edgehal plan`.
pub fn run(a: PlanArgs) -> Result<()> {
    let model = Model::load(&a.model).map_err(|e| anyhow!("{e}"))?;
    let mut graph = model.graph.clone();
    let names = device_list(&a.devices)?;
    // CPU-only fusion (edgehal.FusedConv) would hide Conv/Add/Relu from the other devices.
    if names.len() > 1 {
        edgehal::passes::optimize_portable(&mut graph, &edgehal_cpu::Registry::new())
    } else {
        edgehal::passes::optimize(&mut graph, &edgehal_cpu::Registry::new())
    }
    .map_err(|e| anyhow!("{e}"))?;
    // Compiled-in backends (Vulkan) are registered by main().
    let devices = open_devices(&names).map_err(|e| anyhow!("{e}"))?;
    let opts = SchedulerOptions {
        profile: ProfileOptions {
            progress: !a.json,
            ..ProfileOptions::default()
        },
        constraints: edgehal::plan::PlanConstraints {
            exclude: Vec::new(),
            pins: pins(&graph, &a.pin)?,
        },
        ..SchedulerOptions::default()
    };
    let feeds = feeds_for(&graph)?;
    // A profile taken while the machine ran at another speed (a shared host's slow minute,
    // or a cache from before a change) predicts every plan off by the same factor. Then the
    // device's cached timings are dropped and it is profiled and measured once more.
    let mut reprofiled: Option<String> = None;
    let (s, chosen, plans, single_names, times) = loop {
        let s = Scheduler::new(&graph, devices.clone(), &opts)
            .map_err(|e| anyhow!("{}: {e}", model.name))?;
        let chosen = s.plan();
        let mut plans = vec![chosen.clone()];
        let mut single_names = Vec::new();
        let mut single_of = vec![None; names.len()];
        for (d, name) in names.iter().enumerate() {
            if let Some(p) = Plan::single_device(&graph, s.profile(), d) {
                single_of[d] = Some(plans.len());
                plans.push(p);
                single_names.push(name.clone());
            }
        }
        let times = measure_all(&s, &plans, &feeds, a.runs)?;
        if reprofiled.is_none() {
            if let Some((d, off)) = speed_shift(&chosen, &plans, &times, &single_of) {
                let why = format!(
                    "the chosen plan and {0} alone both measured {1:+.0}% against their \
                     predictions: {0} ran at another speed than when it was profiled; \
                     profiled it again",
                    names[d],
                    off * 100.0
                );
                eprintln!("edgehal: {why}");
                if let Some(dir) = &opts.profile.cache_dir {
                    edgehal::profile::forget_cached(dir, devices[d].info())
                        .map_err(|e| anyhow!("dropping the cached profile of {}: {e}", names[d]))?;
                }
                reprofiled = Some(why);
                continue;
            }
        }
        break (s, chosen, plans, single_names, times);
    };
    let (chosen_ms, chosen_runs) = times[0];
    let singles: Vec<(String, Plan, f64, usize)> = single_names
        .into_iter()
        .zip(plans.into_iter().skip(1))
        .zip(times.into_iter().skip(1))
        .map(|((n, p), (ms, k))| (n, p, ms, k))
        .collect();
    // The chosen plan must not measure slower than the best single device; if it does (the
    // prediction missed), the single device wins and we say so. Pinned plans are kept: the
    // caller asked for that placement.
    let pinned = !opts.constraints.pins.is_empty();
    let best_single = singles
        .iter()
        .min_by(|x, y| x.2.total_cmp(&y.2))
        .map(|(n, p, ms, k)| (n.clone(), p.clone(), *ms, *k));
    let (plan, measured, measured_runs, note) = match &best_single {
        Some((n, p, ms, k)) if !pinned && *ms < chosen_ms && p.assign != chosen.assign => (
            p.clone(),
            *ms,
            *k,
            Some(format!(
                "the partitioned plan measured {chosen_ms:.3} ms, slower than {n} alone; using {n}"
            )),
        ),
        _ => (chosen.clone(), chosen_ms, chosen_runs, None),
    };
    let prof = s.profile();
    if let Some(path) = &a.svg {
        std::fs::write(path, svg(&graph, &plan, measured))
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    }
    let err_pct = if measured > 0.0 {
        (plan.predicted_ms - measured) / measured * 100.0
    } else {
        0.0
    };
    if a.json {
        let nodes: Vec<_> = plan
            .nodes
            .iter()
            .map(|n| {
                let times: serde_json::Map<String, serde_json::Value> = plan
                    .devices
                    .iter()
                    .zip(&n.times)
                    .map(|(d, t)| (d.clone(), json!(t)))
                    .collect();
                let reasons: serde_json::Map<String, serde_json::Value> = plan
                    .devices
                    .iter()
                    .zip(&n.reasons)
                    .filter_map(|(d, r)| r.as_ref().map(|r| (d.clone(), json!(r))))
                    .collect();
                json!({"node": n.node, "label": n.label, "device": plan.devices[n.device],
                       "times_ms": times, "unsupported": reasons})
            })
            .collect();
        let segments: Vec<_> = plan
            .segments
            .iter()
            .map(|sg| {
                json!({"device": plan.devices[sg.device], "nodes": sg.nodes,
                       "predicted_ms": sg.predicted_ms,
                       "segment_overhead_ms": plan.segment_ms.get(sg.device),
                       "scheduler_dispatch_ms": plan.dispatch_ms.get(sg.device)})
            })
            .collect();
        let transfers: Vec<_> = plan
            .transfers
            .iter()
            .map(|t| {
                json!({"value": t.value, "from": t.from, "to": t.to, "bytes": t.bytes,
                            "predicted_ms": t.predicted_ms})
            })
            .collect();
        let single: Vec<_> = singles
            .iter()
            .map(|(n, p, ms, k)| {
                json!({"device": n, "predicted_ms": p.predicted_ms,
                "measured_ms": ms, "measured_runs": k})
            })
            .collect();
        let doc = json!({
            "model": a.model.display().to_string(),
            "devices": names,
            "method": plan.method,
            "nodes": nodes,
            "segments": segments,
            "transfers": transfers,
            "request_overhead_ms": plan.request_ms,
            "dispatch_ms": prof.devices.iter().zip(&prof.dispatch_ms)
                .map(|(d, ms)| (d.clone(), json!(ms)))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            "predicted_ms": plan.predicted_ms,
            "measured_ms": measured,
            "measured_runs": measured_runs,
            "warmup_runs": WARMUP,
            "measure_rounds": ROUNDS,
            "prediction_error_pct": err_pct,
            "reprofiled": reprofiled,
            "single_device": single,
            "note": note,
            "calibration": prof.devices.iter().zip(&prof.calibration)
                .filter_map(|(d, c)| c.as_ref().map(|runs| json!({"device": d,
                    "runs": runs.iter().map(|(n, f)| json!({"nodes": n, "scale": f}))
                        .collect::<Vec<_>>()})))
                .collect::<Vec<_>>(),
            "profiled": prof.measured,
            "from_cache": prof.cached,
            "cache_rebuilt": prof.rebuilt,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", plan.table());
        println!(
            "measured total  {measured:.3} ms (median of {} runs in {ROUNDS} rounds taken in \
             turn with the single-device plans, after warm-up runs; prediction off by \
             {err_pct:+.1}%)",
            measured_runs
        );
        for (n, p, ms, _) in &singles {
            println!(
                "  {n} alone: predicted {:.3} ms, measured {ms:.3} ms",
                p.predicted_ms
            );
        }
        if let Some(n) = note {
            println!("note: {n}");
        }
        if let Some(r) = &reprofiled {
            println!("note: {r}");
        }
        let hand_offs: Vec<String> = prof
            .devices
            .iter()
            .zip(&prof.dispatch_ms)
            .map(|(d, ms)| format!("{d} {ms:.4} ms"))
            .collect();
        println!(
            "scheduler overheads (measured through the scheduler): {:.4} ms per request; \
             per segment hand-off {}",
            prof.request_ms,
            hand_offs.join(", ")
        );
        for (d, pass) in prof.passes.iter().enumerate() {
            if let Some((total, sum)) = pass {
                println!(
                    "profiling on {}: one pass {total:.3} ms (median), node times sum to \
                     {sum:.3} ms; segment overhead {:.4} ms",
                    prof.devices[d], prof.segment_ms[d]
                );
            }
            if let Some(runs) = prof.calibration.get(d).and_then(|c| c.as_ref()) {
                let parts: Vec<String> = runs
                    .iter()
                    .map(|(n, f)| format!("{n} nodes x{f:.3}"))
                    .collect();
                println!(
                    "calibrated on {} (node times scaled to their run as one segment): {}",
                    prof.devices[d],
                    parts.join(", ")
                );
            }
        }
        println!(
            "profile: {} measured, {} from cache{}",
            prof.measured,
            prof.cached,
            if prof.rebuilt > 0 {
                format!(", {} stale/corrupt cache entries rebuilt", prof.rebuilt)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

const COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The plan as a picture: nodes in topological order coloured by device with their data
/// edges on the left, and a timeline (one lane per device, segments and transfers in
/// order, widths from the prediction) on the right.
pub fn svg(g: &Graph, plan: &Plan, measured_ms: f64) -> String {
    let row = 22.0;
    let top = 60.0;
    let n = plan.nodes.len();
    let node_x = 120.0;
    let node_w = 260.0;
    let tl_x = node_x + node_w + 60.0;
    let tl_w = 520.0;
    let lanes = plan.devices.len() + 1;
    let height = (top + row * n as f64).max(top + 40.0 * lanes as f64 + 80.0) + 40.0;
    let width = tl_x + tl_w + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{} — predicted {:.3} ms (request overhead {:.3} ms), measured {:.3} ms ({})</text>"#,
        esc(&g.name),
        plan.predicted_ms,
        plan.request_ms,
        measured_ms,
        esc(&plan.method)
    );
    // Legend.
    for (i, d) in plan.devices.iter().enumerate() {
        let x = 10.0 + 140.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="30" width="12" height="12" fill="{}"/><text x="{}" y="40">{}</text>"#,
            COLORS[i % COLORS.len()],
            x + 16.0,
            esc(d)
        );
    }
    // Graph: one row per node, edges as arcs on the left.
    let mut y_of = vec![0.0; g.nodes.len()];
    for (i, nc) in plan.nodes.iter().enumerate() {
        y_of[nc.node] = top + row * i as f64;
    }
    let producers = g.producers();
    for nc in &plan.nodes {
        for v in g.nodes[nc.node].inputs.iter().flatten() {
            if let Some(p) = producers.get(*v).copied().flatten() {
                let (y1, y2) = (y_of[p] + 9.0, y_of[nc.node] + 9.0);
                let bend = node_x - 10.0 - ((y2 - y1) / row).min(10.0) * 9.0;
                let cross = plan.assign[p] != plan.assign[nc.node];
                let _ = writeln!(
                    s,
                    r#"<path d="M{node_x},{y1} C{bend},{y1} {bend},{y2} {node_x},{y2}" fill="none" stroke="{}" stroke-width="{}"/>"#,
                    if cross { "#d62728" } else { "#999" },
                    if cross { 2 } else { 1 }
                );
            }
        }
    }
    for nc in &plan.nodes {
        let y = y_of[nc.node];
        let label: String = nc.label.chars().take(40).collect();
        let t = nc.times.get(nc.device).copied().flatten().unwrap_or(0.0);
        let _ = writeln!(
            s,
            r#"<rect x="{node_x}" y="{y}" width="{node_w}" height="18" rx="4" fill="{}"><title>{}</title></rect><text x="{}" y="{}" fill="white">{} ({t:.3} ms)</text>"#,
            COLORS[nc.device % COLORS.len()],
            esc(&nc.label),
            node_x + 4.0,
            y + 13.0,
            esc(&label)
        );
    }
    // Timeline.
    let total = plan.predicted_ms.max(1e-9);
    let scale = tl_w / total;
    let _ = writeln!(
        s,
        r#"<text x="{tl_x}" y="{}" font-weight="bold">timeline (predicted, one request)</text>"#,
        top - 8.0
    );
    for (i, d) in plan
        .devices
        .iter()
        .chain(std::iter::once(&"transfers".to_string()))
        .enumerate()
    {
        let y = top + 40.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{tl_x}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            tl_x - 4.0,
            y + 18.0,
            esc(d),
            y + 30.0,
            tl_x + tl_w,
            y + 30.0
        );
    }
    let mut t = 0.0;
    let tr_lane = top + 40.0 * plan.devices.len() as f64;
    for seg in &plan.segments {
        // Transfers into this segment, then the segment.
        let names = seg.sub.input_names();
        for tr in plan
            .transfers
            .iter()
            .filter(|tr| names.contains(&tr.value) && tr.to == plan.devices[seg.device])
        {
            let w = (tr.predicted_ms * scale).max(1.0);
            let _ = writeln!(
                s,
                r##"<rect x="{}" y="{tr_lane}" width="{w}" height="26" fill="#d62728"><title>{} {} -> {} ({} bytes, {:.3} ms)</title></rect>"##,
                tl_x + t * scale,
                esc(&tr.value),
                esc(&tr.from),
                esc(&tr.to),
                tr.bytes,
                tr.predicted_ms
            );
            t += tr.predicted_ms;
        }
        let y = top + 40.0 * seg.device as f64;
        let w = (seg.predicted_ms * scale).max(1.0);
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{y}" width="{w}" height="26" fill="{}" stroke="white"><title>{} nodes on {}: {:.3} ms</title></rect>"#,
            tl_x + t * scale,
            COLORS[seg.device % COLORS.len()],
            seg.nodes.len(),
            esc(&plan.devices[seg.device]),
            seg.predicted_ms
        );
        t += seg.predicted_ms;
    }
    let axis_y = top + 40.0 * lanes as f64 + 10.0;
    let _ = writeln!(
        s,
        r#"<text x="{tl_x}" y="{axis_y}">0 ms</text><text x="{}" y="{axis_y}" text-anchor="end">{:.3} ms</text>"#,
        tl_x + tl_w,
        total
    );
    s.push_str("</svg>\n");
    s
}

/// Arguments of `edgehal bench --stream N`.
pub struct StreamArgs {
    pub model: PathBuf,
    pub devices: String,
    pub frames: usize,
    pub json: bool,
}

/// Throughput of a stream of `frames` inputs with several in flight (pipelined across
/// devices), compared with one request at a time.
pub fn stream(a: StreamArgs) -> Result<()> {
    if a.frames == 0 {
        bail!("--stream needs at least 1 frame");
    }
    let model = Model::load(&a.model).map_err(|e| anyhow!("{e}"))?;
    let names = device_list(&a.devices)?;
    let opts = SessionOptions {
        devices: names.clone(),
        ..SessionOptions::default()
    };
    let session = Session::new(&model, &opts).map_err(|e| anyhow!("{e}"))?;
    let feeds = feeds_for(session.graph())?;
    let refs: Vec<(&str, Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    session.run(&refs).map_err(|e| anyhow!("{e}"))?;
    // One at a time.
    let seq_n = a.frames.min(20);
    let t0 = Instant::now();
    let mut lat = Vec::new();
    for _ in 0..seq_n {
        let s = Instant::now();
        session.run(&refs).map_err(|e| anyhow!("{e}"))?;
        lat.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let seq_fps = seq_n as f64 / t0.elapsed().as_secs_f64();
    // Pipelined: keep several requests in flight.
    let in_flight = (names.len() * 2).max(2);
    let t0 = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for _ in 0..a.frames {
        if window.len() >= in_flight {
            let h: edgehal::scheduler::RunHandle =
                window.pop_front().ok_or_else(|| anyhow!("empty window"))?;
            h.wait(None).map_err(|e| anyhow!("{e}"))?;
        }
        window.push_back(session.submit(&refs).map_err(|e| anyhow!("{e}"))?);
    }
    for h in window {
        h.wait(None).map_err(|e| anyhow!("{e}"))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let fps = a.frames as f64 / secs;
    let (median, _, _) = summarize(&mut lat);
    if a.json {
        let doc = json!({
            "model": a.model.display().to_string(),
            "device": session.device(),
            "devices": names,
            "frames": a.frames,
            "in_flight": in_flight,
            "seconds": secs,
            "throughput_fps": fps,
            "sequential_fps": seq_fps,
            "median_ms": median,
        });
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        println!("model       {}", a.model.display());
        println!("device      {}", session.device());
        println!(
            "stream      {} frames, {in_flight} in flight: {fps:.1} frames/s ({secs:.3} s)",
            a.frames
        );
        println!("sequential  {seq_fps:.1} frames/s (median latency {median:.3} ms)");
    }
    Ok(())
}
