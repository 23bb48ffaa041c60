//! `edgehal run`: load a model, feed inputs (files or seeded random data), write outputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use edgehal::session::IoInfo;
use edgehal::{Model, Session, SessionOptions};
use edgehal_core::{DType, Tensor};
use serde_json::json;

/// Arguments of `edgehal run`.
pub struct RunArgs {
    pub model: PathBuf,
    pub inputs: Vec<String>,
    pub output_dir: Option<PathBuf>,
    pub device: String,
    pub threads: usize,
    pub seed: u64,
    pub json: bool,
}

/// A small seeded generator (splitmix64): the same seed gives the same inputs everywhere.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Seeded random data for an input: floats uniform in [-1, 1), integers in [0, 100), bools
/// fair; unknown dimensions become 1.
pub fn random_input(info: &IoInfo, rng: &mut Rng) -> Result<Tensor> {
    let shape = info.concrete_shape(1);
    let dtype = info.dtype.unwrap_or(DType::F32);
    let n: usize = shape.iter().product();
    let vals: Vec<f64> = (0..n)
        .map(|_| match dtype {
            DType::Bool => (rng.next_u64() & 1) as f64,
            d if d.is_float() => rng.unit(),
            _ => (rng.next_u64() % 100) as f64,
        })
        .collect();
    let t = Tensor::from_vec(shape, vals)?;
    Ok(t.cast(dtype)?)
}

/// Read an input file: `.npy`, or an ONNX `TensorProto` `.pb`.
pub fn read_input(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let t = match ext {
        "npy" => edgehal::npy::from_npy(bytes.into()),
        "pb" => edgehal::onnx::read_tensor_pb(bytes.into()).map(|(_, t)| t),
        _ => bail!(
            "{}: input files must be .npy or .pb (ONNX TensorProto)",
            path.display()
        ),
    };
    t.with_context(|| format!("{}", path.display()))
}

/// File-system-safe version of an output name.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("output{s}")
    } else {
        s
    }
}

fn stats(t: &Tensor) -> serde_json::Value {
    let v = t.to_f64_vec();
    if v.is_empty() {
        return json!(null);
    }
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let argmax = v
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    json!({"min": min, "max": max, "mean": mean, "argmax": argmax})
}

/// Run `edgehal run`.
pub fn run(a: RunArgs) -> Result<()> {
    let t0 = Instant::now();
    let model = Model::load(&a.model).map_err(|e| anyhow!("{e}"))?;
    let opts = SessionOptions {
        threads: a.threads,
        device: a.device.clone(),
        ..Default::default()
    };
    let session = Session::new(&model, &opts).map_err(|e| anyhow!("{e}"))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let infos: Vec<IoInfo> = session.inputs().cloned().collect();
    let mut given: Vec<(String, Tensor)> = Vec::new();
    for spec in &a.inputs {
        let (name, file) = match spec.split_once('=') {
            Some((n, f)) => (n.to_string(), f.to_string()),
            None if infos.len() == 1 => (infos[0].name.clone(), spec.clone()),
            None => bail!(
                "--input {spec}: give NAME=FILE (the model has {} inputs)",
                infos.len()
            ),
        };
        if !infos.iter().any(|i| i.name == name) {
            let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
            bail!(
                "--input {spec}: the model has no input '{name}' (inputs: {})",
                names.join(", ")
            );
        }
        given.push((name, read_input(Path::new(&file))?));
    }
    let mut rng = Rng::new(a.seed);
    let mut feeds: Vec<(String, Tensor, &str)> = Vec::new();
    for info in &infos {
        match given.iter().position(|(n, _)| *n == info.name) {
            Some(p) => feeds.push((info.name.clone(), given[p].1.clone(), "file")),
            None => feeds.push((info.name.clone(), random_input(info, &mut rng)?, "random")),
        }
    }
    let refs: Vec<(&str, Tensor)> = feeds
        .iter()
        .map(|(n, t, _)| (n.as_str(), t.clone()))
        .collect();
    let t1 = Instant::now();
    let outs = session.run(&refs).map_err(|e| anyhow!("{e}"))?;
    let run_ms = t1.elapsed().as_secs_f64() * 1e3;
    if let Some(dir) = &a.output_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let mut out_json = Vec::new();
    for (name, t) in &outs {
        let file = match &a.output_dir {
            Some(dir) => {
                let p = dir.join(format!("{}.npy", sanitize(name)));
                std::fs::write(&p, edgehal::npy::to_npy(t))
                    .with_context(|| format!("{}", p.display()))?;
                Some(p.display().to_string())
            }
            None => None,
        };
        out_json.push(json!({"name": name, "dtype": t.dtype().name(), "shape": t.shape(), "file": file, "stats": stats(t)}));
    }
    if a.json {
        let inputs: Vec<_> = feeds
            .iter()
            .map(|(n, t, src)| json!({"name": n, "dtype": t.dtype().name(), "shape": t.shape(), "source": src}))
            .collect();
        let doc = json!({
            "model": a.model.display().to_string(),
            "format": format!("{:?}", model.format).to_lowercase(),
            "device": session.device(),
            "seed": a.seed,
            "load_ms": load_ms,
            "run_ms": run_ms,
            "inputs": inputs,
            "outputs": out_json,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "model   {} ({:?}, {} nodes after passes)",
            a.model.display(),
            model.format,
            session.graph().nodes.len()
        );
        println!(
            "device  {}   load {load_ms:.1} ms   run {run_ms:.2} ms",
            session.device()
        );
        for (n, t, src) in &feeds {
            println!("input   {n}: {}{:?} ({src})", t.dtype(), t.shape());
        }
        for o in &out_json {
            let file = o["file"]
                .as_str()
                .map(|f| format!(" -> {f}"))
                .unwrap_or_default();
            println!(
                "output  {}: {}{} {}{file}",
                o["name"].as_str().unwrap_or(""),
                o["dtype"].as_str().unwrap_or(""),
                o["shape"],
                o["stats"]
            );
        }
    }
    Ok(())
}
