//! The `edgehal` command.

#![forbid(unsafe_code)]

mod bench;
mod ops;
mod plan;
mod probe;
mod run;

use clap::{Parser, Subcommand};

/// Large blocks (activations) on a 64-byte line: NHWC channel vectors then never straddle two
/// cache lines (see `edgehal_kernels::alloc`).
#[global_allocator]
static ALLOC: edgehal_kernels::alloc::LineAligned = edgehal_kernels::alloc::LineAligned;

#[derive(Parser)]
#[command(
    name = "edgehal",
    version,
    about = "edge AI hardware abstraction layer and inference runtime"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the CPUs, GPUs, NPUs and Edge TPUs of this machine (or of a fixture tree).
    Probe {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Probe this directory as if it were `/` (fixture trees).
        #[arg(long)]
        sysroot: Option<std::path::PathBuf>,
    },
    /// Run a model once and write its outputs.
    Run {
        /// Model file (.onnx or .tflite).
        model: std::path::PathBuf,
        /// NAME=FILE (.npy or ONNX TensorProto .pb); repeatable. Inputs not given get seeded random data.
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
        /// Write each output as DIR/<output name>.npy.
        #[arg(long)]
        output_dir: Option<std::path::PathBuf>,
        /// auto or cpu (the CPU executor); vulkan, vulkanN, a plugin device or nullN: every node
        /// that device supports runs there, the CPU runs the rest.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Seed for the random inputs.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Time whole-model inference: median/min/p90 latency and peak RSS.
    Bench {
        /// Model file (.onnx or .tflite).
        model: std::path::PathBuf,
        /// auto or cpu (the CPU executor); vulkan, vulkanN, a plugin device or nullN: every node
        /// that device supports runs there, the CPU runs the rest.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed runs.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Untimed runs first (the first also measures cold start).
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
        /// Throughput of a stream of N frames, several in flight, pipelined across devices.
        #[arg(long, value_name = "N")]
        stream: Option<usize>,
        /// Devices for --stream (comma-separated: cpu,null0,...).
        #[arg(long, default_value = "cpu")]
        devices: String,
    },
    /// Profile a model on devices, split it for the lowest latency, run and explain the plan.
    Plan {
        /// Model file (.onnx or .tflite).
        model: std::path::PathBuf,
        /// Comma-separated devices (cpu, null0, ..., vulkan or vulkanN, plugin devices).
        #[arg(long, default_value = "cpu")]
        devices: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Write the plan as an SVG picture.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
        /// Timed runs of each measured plan, at least (a fast plan runs for 0.25 s; the median
        /// is reported).
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Pin nodes to devices: comma-separated WHAT=DEVICE, where WHAT is an op type (every
        /// node of it: `Relu=example0`), a node index or a node name.
        #[arg(long, default_value = "")]
        pin: String,
    },
    /// List the ops each device supports.
    Ops {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    // A bug must still end in one line, not a backtrace: operators script this tool.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("edgehal: internal error: {msg}{at} (please report this)");
        std::process::exit(101);
    }));
    let cli = Cli::parse();
    // The Vulkan backend is compiled into the CLI: sessions reach it as `--device vulkan`.
    edgehal::scheduler::register_driver(std::sync::Arc::new(edgehal_vulkan::Driver));
    let res = match cli.cmd {
        Cmd::Probe { json, sysroot } => probe::run(json, sysroot),
        Cmd::Run {
            model,
            inputs,
            output_dir,
            device,
            threads,
            seed,
            json,
        } => run::run(run::RunArgs {
            model,
            inputs,
            output_dir,
            device,
            threads,
            seed,
            json,
        }),
        Cmd::Ops { json } => ops::run(json),
        Cmd::Plan {
            model,
            devices,
            json,
            svg,
            runs,
            pin,
        } => plan::run(plan::PlanArgs {
            model,
            devices,
            pin,
            json,
            svg,
            runs,
        }),
        Cmd::Bench {
            model,
            json,
            stream: Some(frames),
            devices,
            ..
        } => plan::stream(plan::StreamArgs {
            model,
            devices,
            frames,
            json,
        }),
        Cmd::Bench {
            model,
            device,
            threads,
            runs,
            warmup,
            json,
            ..
        } => bench::run(bench::BenchArgs {
            model,
            device,
            threads,
            runs,
            warmup,
            json,
        }),
    };
    if let Err(e) = res {
        eprintln!("edgehal: {e:#}");
        std::process::exit(1);
    }
}
