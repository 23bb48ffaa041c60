//! `edgehal bench`: latency of whole-model inference (median, min, p90) and peak memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Result};
use edgehal::{Model, Session, SessionOptions};
use serde_json::json;

use crate::run::{random_input, Rng};

/// Arguments of `edgehal bench`.
pub struct BenchArgs {
    pub model: PathBuf,
    pub device: String,
    pub threads: usize,
    pub runs: usize,
    pub warmup: usize,
    pub json: bool,
}

/// Peak resident set size of this process in MiB (`VmHWM` of /proc/self/status).
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Median, min and 90th percentile of a sample (sorted in place).
pub fn summarize(t: &mut [f64]) -> (f64, f64, f64) {
    t.sort_by(|a, b| a.total_cmp(b));
    let n = t.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    };
    let p90 = t[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
    (median, t[0], p90)
}

/// Run `edgehal bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    let t0 = Instant::now();
    let model = Model::load(&a.model).map_err(|e| anyhow!("{e}"))?;
    let opts = SessionOptions {
        threads: a.threads,
        device: a.device.clone(),
        ..Default::default()
    };
    let session = Session::new(&model, &opts).map_err(|e| anyhow!("{e}"))?;
    let mut rng = Rng::new(7);
    let feeds: Vec<(String, edgehal_core::Tensor)> = session
        .inputs()
        .map(|i| Ok((i.name.clone(), random_input(i, &mut rng)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, edgehal_core::Tensor)> =
        feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let t1 = Instant::now();
    session.run(&refs).map_err(|e| anyhow!("{e}"))?;
    let cold_ms = t0.elapsed().as_secs_f64() * 1e3;
    let first_ms = t1.elapsed().as_secs_f64() * 1e3;
    let show = !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    for _ in 1..a.warmup {
        session.run(&refs).map_err(|e| anyhow!("{e}"))?;
    }
    let mut times = Vec::with_capacity(a.runs);
    for i in 0..a.runs {
        let s = Instant::now();
        session.run(&refs).map_err(|e| anyhow!("{e}"))?;
        times.push(s.elapsed().as_secs_f64() * 1e3);
        if show {
            eprint!("\r{}/{} runs", i + 1, a.runs);
        }
    }
    if show {
        eprintln!();
    }
    let (median, min, p90) = summarize(&mut times);
    let rss = peak_rss_mb();
    let threads = if a.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        a.threads
    };
    if a.json {
        let doc = json!({
            "model": a.model.display().to_string(),
            "device": session.device(),
            "threads": threads,
            "runs": a.runs,
            "warmup": a.warmup,
            "median_ms": median,
            "min_ms": min,
            "p90_ms": p90,
            "first_run_ms": first_ms,
            "cold_start_ms": cold_ms,
            "peak_rss_mb": rss,
            "kernels": edgehal_kernels::dispatch_summary(),
        });
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        println!("model      {}", a.model.display());
        println!("device     {} ({threads} threads)", session.device());
        println!(
            "latency    median {median:.3} ms   min {min:.3} ms   p90 {p90:.3} ms   ({} runs)",
            a.runs
        );
        println!("cold start {cold_ms:.1} ms (load + prepare + first run)");
        println!("{}", edgehal_kernels::dispatch_summary());
        if let Some(r) = rss {
            println!("peak RSS   {r:.1} MiB");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn percentiles() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(summarize(&mut v), (3.0, 1.0, 5.0));
        let mut w: Vec<f64> = (1..=10).map(|x| x as f64).collect();
        assert_eq!(summarize(&mut w), (5.5, 1.0, 9.0));
    }
}
