//! Time dev models on a Vulkan device and on the CPU in one run.
//!
//! `cargo run --release -p edgehal-vulkan --example vkbench -- [--device SEL] [--runs N]
//!  [--warmup N] MODEL...` prints one JSON object per model and device with `median_ms`,
//! `min_ms`, `p90_ms` (the `edgehal bench` keys) and the max |difference| between the two.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use edgehal_core::Tensor;

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    (v[n / 2], v[0], v[((n * 9) / 10).min(n - 1)])
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut sel, mut runs, mut warmup, mut models) = (String::new(), 50usize, 5usize, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" => sel = args.next().context("--device needs a value")?,
            "--runs" => runs = args.next().context("--runs needs a value")?.parse()?,
            "--warmup" => warmup = args.next().context("--warmup needs a value")?.parse()?,
            m => models.push(m.to_string()),
        }
    }
    if models.is_empty() || runs == 0 {
        bail!("usage: vkbench [--device SEL] [--runs N] [--warmup N] MODEL...");
    }
    let dev = edgehal_vulkan::open(&sel)?;
    eprintln!(
        "vulkan device: {} (Vulkan {}, driver {})",
        dev.phys().name,
        dev.phys().api_version,
        dev.phys().driver_name
    );
    for path in &models {
        let m = edgehal::Model::load(path)?;
        let g = &m.graph;
        let inputs: Vec<Tensor> = g
            .inputs
            .iter()
            .map(|&v| {
                let shape = g.values[v]
                    .fixed_shape()
                    .context("model input needs a fixed shape")?;
                let n: usize = shape.iter().product();
                let mut s = 7u64;
                let data: Vec<f32> = (0..n)
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                    })
                    .collect();
                Ok(Tensor::from_vec(shape, data)?)
            })
            .collect::<anyhow::Result<_>>()?;
        let t0 = Instant::now();
        let runner = edgehal_vulkan::Runner::new(Arc::clone(&dev), g, &inputs)?;
        let vk_out = runner.run()?;
        let cold = t0.elapsed().as_secs_f64() * 1e3;
        for _ in 0..warmup {
            runner.run()?;
        }
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            runner.run()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (med, min, p90) = stats(times);
        println!(
            "{}",
            serde_json::json!({"model": path, "device": format!("vulkan:{}", dev.phys().name), "runs": runs,
                "median_ms": med, "min_ms": min, "p90_ms": p90, "cold_start_ms": cold,
                "dispatches": runner.executable().dispatches()})
        );
        let reg = edgehal_cpu::Registry::new();
        let mut missing: Vec<&str> = g
            .nodes
            .iter()
            .filter(|n| reg.get(&n.domain, &n.op).is_none())
            .map(|n| n.op.as_str())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if !missing.is_empty() {
            println!(
                "{}",
                serde_json::json!({"model": path, "device": "cpu", "skipped": format!("cpu lacks {:?}", missing)})
            );
            continue;
        }
        let ex = edgehal_cpu::Executor::new(g, &reg)?;
        let feed: Vec<_> = g
            .inputs
            .iter()
            .copied()
            .zip(inputs.iter().cloned())
            .collect();
        let cpu_out = ex.run(&feed)?;
        let cpu_runs = runs.min(10);
        let mut times = Vec::with_capacity(cpu_runs);
        for _ in 0..cpu_runs {
            let t = Instant::now();
            ex.run(&feed)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (med, min, p90) = stats(times);
        let a = vk_out[0].to_f32();
        let b = cpu_out[0].to_f32();
        let max = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        println!(
            "{}",
            serde_json::json!({"model": path, "device": "cpu", "runs": cpu_runs, "median_ms": med, "min_ms": min,
                "p90_ms": p90, "max_abs_diff_vs_vulkan": diff, "max_abs_output": max})
        );
    }
    Ok(())
}
