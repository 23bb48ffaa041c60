//! classify: image classification with the `edgehal` Rust API, the twin of
//! `examples/c/classify.c` (same preprocessing, same output format).
//!
//!     cargo run -p edgehal-cli --example classify -- MODEL IMAGE.png [DEVICE] [RUNS]
//!
//! Reads a PNG, resizes it bilinearly (half-pixel centres) to the model's input size,
//! normalises with the ImageNet mean/std into NCHW or NHWC as the input shape says, runs the
//! model and prints the top-5 classes (softmax) and the median latency.
//! Exit status: 0 ok, 1 error, 3 the model needs an operator this edgehal lacks.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use edgehal::{DType, Error, Model, Session, SessionOptions, Tensor};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decode a PNG into 8-bit RGB (palette, grey, alpha and 16-bit images are converted).
fn read_png(path: &str) -> Result<(Vec<u8>, usize, usize)> {
    let file = std::fs::File::open(path).with_context(|| format!("{path}: cannot open"))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{path}: not a PNG"))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{path}: cannot decode"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let px = &buf[..info.buffer_size()];
    let rgb: Vec<u8> = match info.color_type {
        png::ColorType::Rgb => px.to_vec(),
        png::ColorType::Rgba => px
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => px
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => bail!("{path}: palette was not expanded"),
    };
    if rgb.len() != w * h * 3 {
        bail!("{path}: decoded {} bytes for {w}x{h} RGB", rgb.len());
    }
    Ok((rgb, w, h))
}

/// Bilinear sample of channel `c` at output pixel (ox, oy), half-pixel centres, edges clamped.
#[allow(clippy::too_many_arguments)]
fn sample(
    rgb: &[u8],
    w: usize,
    h: usize,
    ow: usize,
    oh: usize,
    ox: usize,
    oy: usize,
    c: usize,
) -> f32 {
    let sx = ((ox as f32 + 0.5) * w as f32 / ow as f32 - 0.5).clamp(0.0, (w - 1) as f32);
    let sy = ((oy as f32 + 0.5) * h as f32 / oh as f32 - 0.5).clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (sx as usize, sy as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
    let px = |x: usize, y: usize| rgb[(y * w + x) * 3 + c] as f32;
    let top = px(x0, y0) * (1.0 - fx) + px(x1, y0) * fx;
    let bot = px(x0, y1) * (1.0 - fx) + px(x1, y1) * fx;
    top * (1.0 - fy) + bot * fy
}

fn main() {
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            let unsupported = e
                .downcast_ref::<Error>()
                .is_some_and(|e| matches!(e, Error::Unsupported(_)));
            std::process::exit(if unsupported { 3 } else { 1 });
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if !(3..=5).contains(&args.len()) {
        bail!("usage: classify MODEL IMAGE.png [DEVICE] [RUNS]");
    }
    let (model_path, image_path) = (&args[1], &args[2]);
    let device = args.get(3).cloned().unwrap_or_else(|| "auto".into());
    let runs: usize = args
        .get(4)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(3)
        .max(1);

    let model = Model::load(model_path)?;
    let opts = SessionOptions {
        device,
        ..SessionOptions::default()
    };
    let session = Session::new(&model, &opts)?;
    let input = session
        .inputs()
        .next()
        .context("the model has no input")?
        .clone();
    let shape: Vec<i64> = match &input.shape {
        Some(s) => s
            .iter()
            .map(|d| d.fixed().map_or(-1, |v| v as i64))
            .collect(),
        None => bail!("input '{}' has no declared shape", input.name),
    };
    if input.dtype != Some(DType::F32) || shape.len() != 4 {
        bail!(
            "input '{}' is {}; expected a float32 image tensor of rank 4",
            input.name,
            input.describe()
        );
    }
    let nchw = shape[1] == 3;
    if !nchw && shape[3] != 3 {
        bail!(
            "input '{}' has no 3-channel axis (neither NCHW nor NHWC)",
            input.name
        );
    }
    let size = |d: i64| if d > 0 { d as usize } else { 224 };
    let (oh, ow) = if nchw {
        (size(shape[2]), size(shape[3]))
    } else {
        (size(shape[1]), size(shape[2]))
    };

    let (rgb, w, h) = read_png(image_path)?;
    let mut x = vec![0f32; 3 * oh * ow];
    for oy in 0..oh {
        for ox in 0..ow {
            for c in 0..3 {
                let v = (sample(&rgb, w, h, ow, oh, ox, oy, c) / 255.0 - MEAN[c]) / STD[c];
                let i = if nchw {
                    (c * oh + oy) * ow + ox
                } else {
                    (oy * ow + ox) * 3 + c
                };
                x[i] = v;
            }
        }
    }
    let dims = if nchw {
        vec![1, 3, oh, ow]
    } else {
        vec![1, oh, ow, 3]
    };
    println!(
        "model: {model_path} (input '{}' float32[1,{},{},{}], {}), device {}",
        input.name,
        dims[1],
        dims[2],
        dims[3],
        if nchw { "NCHW" } else { "NHWC" },
        session.device()
    );
    println!("image: {image_path} ({w}x{h}) -> {ow}x{oh}");
    let tensor = Tensor::from_vec(dims, x)?;

    let mut times = Vec::with_capacity(runs);
    let mut outputs = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        outputs = session.run(&[(input.name.as_str(), tensor.clone())])?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let (_, out) = outputs.first().context("the model has no output")?;
    if out.dtype() != DType::F32 || out.is_empty() {
        bail!(
            "output is {} {:?}; expected float32 scores",
            out.dtype(),
            out.shape()
        );
    }
    let logits = out.to_f32();
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&v| ((v - mx) as f64).exp()).sum();
    // Stable sort: ties keep the lower class index first, as the C example does.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top = order.len().min(5);
    println!("top-{top}:");
    for (rank, &i) in order.iter().take(top).enumerate() {
        println!(
            "  {}: class {i}  p={:.6}",
            rank + 1,
            ((logits[i] - mx) as f64).exp() / sum
        );
    }
    println!("latency: {:.3} ms (median of {runs} runs)", times[runs / 2]);
    Ok(())
}
