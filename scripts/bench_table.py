#!/usr/bin/env python3
"""edgehal against its peers, side by side (issue 5, item 5), as one command.

For every model and thread count: edgehal (`edgehal bench --json`) and each peer runtime run in
their own child process, alternating A B C A B C for --rounds rounds, each a median of --runs
timed runs after --warmup untimed ones, on the same seeded inputs (the splitmix64 stream
`edgehal bench` feeds its inputs from, reproduced here) and the same thread count. The table
gives the median of the round medians, the fastest peer, the ratio, both peak RSS figures, each
side's achieved GFLOP/s (model FLOPs counted from the graph: 2 x the multiply-adds of Conv,
Gemm, MatMul, LSTM/GRU and their int8 forms) and the core's measured FMA peak.

Peers (the issue's table): .onnx float CNNs -> onnxruntime (CPU EP), ncnn, MNN (converted once
with pnnx / mnnconvert into the cache dir); other .onnx -> onnxruntime; .tflite -> LiteRT with
XNNPACK. tract runs too where it can (ONNX, one thread: it has no thread pool) but is optional:
its failures are noted, not fatal.

Run it through scripts/bench-table.sh, which makes the venv and installs the peers. Direct use:
  .venv/bin/python scripts/bench_table.py [--models a.onnx,b.tflite] [--threads 1,2]
      [--rounds 2] [--runs 30] [--warmup 5] [--quick] [--json FILE]
Exit status: 0 when every row has edgehal and all of its required peers timed, 1 otherwise
(the table is printed either way, failed or missing peers marked in it).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODELS = [
    "mobilenet_v2.onnx",
    "resnet18.onnx",
    "lstm_kws.onnx",
    "mobilenet_v2_int8.onnx",
    "mobilenet_v2_keras.tflite",
    "mobilenet_v2_keras_int8.tflite",
    "person_detect_cnn_int8.tflite",
]
# Float CNNs that ncnn and MNN get (converted from ONNX at a fixed 1x3x224x224 input).
CONVERTED_PEERS = {"mobilenet_v2.onnx", "resnet18.onnx"}
PEER_NAMES = {
    "ort": "onnxruntime",
    "ncnn": "ncnn",
    "mnn": "MNN",
    "tract": "tract",
    "litert": "LiteRT/XNNPACK",
}
# Which module each peer needs, and the PyPI package that provides it.
PEER_MODULES = {
    "ort": ("onnxruntime", "onnxruntime"),
    "ncnn": ("ncnn", "ncnn"),
    "mnn": ("MNN", "MNN"),
    "tract": ("tract", "tract"),
    "litert": ("ai_edge_litert", "ai-edge-litert"),
}
OPTIONAL_PEERS = {"tract"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Seeded inputs: the same values `edgehal bench` generates (tools/src/run.rs: splitmix64 seeded
# with 7, one draw per element across the inputs in order; floats uniform in [-1, 1), integers
# in [0, 100), bools fair; unknown dimensions become 1).


def splitmix64(start, n, seed=7):
    import numpy as np

    k = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + k * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_inputs(specs, seed=7):
    """specs: [(shape, numpy dtype)] in the model's input order -> list of arrays."""
    import numpy as np

    out, used = [], 0
    for shape, dt in specs:
        shape = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]
        n = int(np.prod(shape)) if shape else 1
        z = splitmix64(used, n, seed)
        used += n
        dt = np.dtype(dt)
        if dt.kind == "f":
            v = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2.0 - 1.0
        elif dt.kind == "b":
            v = (z & np.uint64(1)).astype(np.float64)
        else:
            v = (z % np.uint64(100)).astype(np.float64)
        out.append(v.astype(dt).reshape(shape))
    return out


# ---------------------------------------------------------------------------------------------
# Model FLOPs (2 x multiply-adds of the matrix work).


def _prod(xs):
    p = 1
    for x in xs:
        p *= int(x)
    return p


def onnx_flops(path):
    import onnx
    from onnx import shape_inference

    m = onnx.load(path)
    g = m.graph
    inits = {i.name for i in g.initializer}
    for i in g.input:
        if i.name in inits:
            continue
        for d in i.type.tensor_type.shape.dim:
            if not d.dim_value:
                d.dim_value = 1
    m = shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if all(d.dim_value > 0 for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)

    def sh(name):
        s = shapes.get(name)
        if s is None:
            raise ValueError(f"{os.path.basename(path)}: no static shape for tensor {name!r}")
        return s

    macs = 0
    for n in m.graph.node:
        op, ins = n.op_type, n.input
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = sh(ins[3] if op == "QLinearConv" else ins[1])
            macs += _prod(sh(n.output[0])) * _prod(w[1:])
        elif op == "Gemm":
            a = sh(ins[0])
            k = a[0] if attrs.get("transA", 0) else a[1]
            macs += _prod(sh(n.output[0])) * k
        elif op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
            macs += _prod(sh(n.output[0])) * sh(ins[0])[-1]
        elif op in ("LSTM", "GRU", "RNN"):
            x, w = sh(ins[0]), sh(ins[1])
            seq, batch = (x[1], x[0]) if attrs.get("layout", 0) else (x[0], x[1])
            dirs, gates_h, inp = w
            hidden = sh(ins[2])[2]
            macs += dirs * seq * batch * gates_h * (inp + hidden)
    return 2 * macs


def tflite_flops(path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path)
    it.allocate_tensors()
    td = {t["index"]: list(t["shape"]) for t in it.get_tensor_details()}
    macs = 0
    for o in it._get_ops_details():
        name = o["op_name"]
        ins = [i for i in o["inputs"]]
        if not len(o["outputs"]):
            continue
        out = _prod(td[o["outputs"][0]])
        if name == "CONV_2D":
            macs += out * _prod(td[ins[1]][1:])
        elif name == "DEPTHWISE_CONV_2D":
            macs += out * _prod(td[ins[1]][1:3])
        elif name == "FULLY_CONNECTED":
            macs += out * td[ins[1]][-1]
        elif name == "BATCH_MATMUL":
            macs += out * td[ins[0]][-1]
    return 2 * macs


def model_flops(path):
    try:
        return int(onnx_flops(path) if path.endswith(".onnx") else tflite_flops(path))
    except Exception as e:  # a FLOP count is a nice-to-have column, never fatal
        log(f"warning: FLOPs of {os.path.basename(path)} not counted: {e}")
        return None


# ---------------------------------------------------------------------------------------------
# Child process: one peer runtime on one model; prints one JSON line.


def vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(a):
    import numpy as np

    base_mb = vm_kib("VmRSS") / 1024.0  # Python + numpy, before the runtime is imported
    mod, pkg = PEER_MODULES[a.runtime]
    try:
        __import__(mod)
    except ImportError as e:
        print(json.dumps({"missing": True, "error": f"{e} (pip install {pkg})"}))
        return 3
    threads, model = a.threads, a.model
    if a.runtime == "ort":
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        types = {
            "tensor(float)": np.float32,
            "tensor(int64)": np.int64,
            "tensor(int32)": np.int32,
            "tensor(uint8)": np.uint8,
            "tensor(int8)": np.int8,
            "tensor(bool)": np.bool_,
        }
        ins = s.get_inputs()
        xs = seeded_inputs([(i.shape, types[i.type]) for i in ins])
        feed = {i.name: x for i, x in zip(ins, xs)}
        version = f"onnxruntime {ort.__version__}"

        def run():
            s.run(None, feed)

    elif a.runtime == "tract":
        import importlib.metadata
        import onnx
        import tract

        g = onnx.load(model, load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        specs = []
        for i in g.input:
            if i.name in inits:
                continue
            dt = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            specs.append(([d.dim_value for d in i.type.tensor_type.shape.dim], dt))
        xs = seeded_inputs(specs)
        r = tract.onnx().load(model).into_model().into_runnable()
        version = f"tract {importlib.metadata.version('tract')}"

        def run():
            r.run(xs)

    elif a.runtime == "ncnn":
        import ncnn

        (x,) = seeded_inputs([(a.shape, np.float32)])
        net = ncnn.Net()
        net.opt.use_vulkan_compute = False
        net.opt.num_threads = threads
        net.opt.use_fp16_packed = False
        net.opt.use_fp16_storage = False
        net.opt.use_fp16_arithmetic = False
        if net.load_param(a.base + ".ncnn.param") != 0 or net.load_model(a.base + ".ncnn.bin") != 0:
            print(json.dumps({"error": f"ncnn could not load {a.base}.ncnn.param/.bin"}))
            return 2
        mat = ncnn.Mat(np.ascontiguousarray(x[0]))
        version = f"ncnn {ncnn.__version__}"

        def run():
            ex = net.create_extractor()
            ex.input("in0", mat)
            rc, _ = ex.extract("out0")
            if rc != 0:
                raise RuntimeError(f"ncnn extract returned {rc}")

    elif a.runtime == "mnn":
        import MNN

        (x,) = seeded_inputs([(a.shape, np.float32)])
        it = MNN.Interpreter(a.base + ".mnn")
        sess = it.createSession({"numThread": threads, "precision": "high"})
        ti = it.getSessionInput(sess)
        host = MNN.Tensor(a.shape, MNN.Halide_Type_Float, x, MNN.Tensor_DimensionType_Caffe)
        version = f"MNN {MNN.version()}"

        def run():
            ti.copyFrom(host)
            it.runSession(sess)

    elif a.runtime == "litert":
        import importlib.metadata
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=model, num_threads=threads)
        it.allocate_tensors()
        dets = it.get_input_details()
        xs = seeded_inputs([(list(d["shape"]), d["dtype"]) for d in dets])
        for d, x in zip(dets, xs):
            it.set_tensor(d["index"], x)
        version = f"LiteRT {importlib.metadata.version('ai-edge-litert')} (XNNPACK)"

        def run():
            it.invoke()

    else:
        print(json.dumps({"error": f"unknown runtime {a.runtime}"}))
        return 2
    for _ in range(a.warmup):
        run()
    t = []
    for _ in range(a.runs):
        s0 = time.perf_counter()
        run()
        t.append((time.perf_counter() - s0) * 1e3)
    print(
        json.dumps(
            {
                "runtime": version,
                "threads": threads,
                "runs": a.runs,
                "median_ms": statistics.median(t),
                "min_ms": min(t),
                "peak_rss_mb": vm_kib("VmHWM") / 1024.0,
                "python_baseline_mb": base_mb,
            }
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Orchestration.


def run_json(cmd, timeout, env=None):
    """Runs cmd, returns (last JSON line as dict or None, error text or None)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    doc = None
    for line in reversed(p.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if p.returncode != 0 or doc is None:
        err = (doc or {}).get("error") or (p.stderr.strip().splitlines() or ["no output"])[-1]
        return doc, f"exit {p.returncode}: {err}"
    return doc, None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def pkg_version(name):
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pnnx_binary():
    """The pnnx executable inside the `pnnx` wheel (its console script imports torch, which the
    ONNX path does not need, so the wheel is installed without dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        return None
    exe = os.path.join(list(spec.submodule_search_locations)[0], "pnnx")
    return exe if os.access(exe, os.X_OK) else None


def convert(model_path, cache, shape):
    """ncnn (pnnx) and MNN (mnnconvert) files for model_path under cache, made once and reused
    while the model's hash and the converters' versions stay the same. Returns
    (base path, {peer: error}) for the conversions that failed."""
    name = os.path.splitext(os.path.basename(model_path))[0]
    d = os.path.join(cache, name)
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, name)
    errors = {}
    key = f"{sha256(model_path)} pnnx {pkg_version('pnnx')} MNN {pkg_version('MNN')} {shape}"
    stamp = base + ".stamp"
    try:
        with open(stamp) as f:
            done = json.load(f)
    except (OSError, ValueError):
        done = {}
    if not isinstance(done, dict) or done.get("key") != key:
        done = {"key": key}  # new model or new converters: convert again
    src = base + ".onnx"
    if not done.get("copied") or not os.path.exists(src):
        shutil.copyfile(model_path, src)  # pnnx writes its outputs beside its input
        done["copied"] = True
    if not done.get("ncnn") or not os.path.exists(base + ".ncnn.bin"):
        exe = pnnx_binary()
        if exe is None:
            errors["ncnn"] = "pnnx is not installed (pip install --no-deps pnnx) to convert for ncnn"
        else:
            shp = "[" + ",".join(str(s) for s in shape) + "]"
            log(f"converting {name}.onnx for ncnn: pnnx {name}.onnx inputshape={shp} fp16=0")
            p = subprocess.run([exe, name + ".onnx", f"inputshape={shp}", "fp16=0"], cwd=d,
                               capture_output=True, text=True)
            if p.returncode != 0 or not os.path.exists(base + ".ncnn.param"):
                errors["ncnn"] = f"pnnx failed (exit {p.returncode}): {p.stderr.strip()[-300:]}"
            else:
                done["ncnn"] = True
    if not done.get("mnn") or not os.path.exists(base + ".mnn"):
        conv = os.path.join(os.path.dirname(sys.executable), "mnnconvert")
        if not os.path.exists(conv):
            errors["mnn"] = "mnnconvert is not installed (pip install MNN) to convert for MNN"
        else:
            log(f"converting {name}.onnx for MNN: mnnconvert -f ONNX --modelFile {name}.onnx "
                f"--MNNModel {name}.mnn --bizCode biz")
            p = subprocess.run([conv, "-f", "ONNX", "--modelFile", name + ".onnx", "--MNNModel",
                                name + ".mnn", "--bizCode", "biz"], cwd=d, capture_output=True,
                               text=True)
            if p.returncode != 0 or not os.path.exists(base + ".mnn"):
                errors["mnn"] = f"mnnconvert failed (exit {p.returncode}): {p.stdout.strip()[-300:]}"
            else:
                done["mnn"] = True
    with open(stamp, "w") as f:
        json.dump(done, f)
    return base, errors


def onnx_input_shape(path):
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    ins = [i for i in g.input if i.name not in inits]
    if len(ins) != 1:
        raise ValueError(f"{os.path.basename(path)}: {len(ins)} inputs, ncnn/MNN rows expect one")
    return [d.dim_value or 1 for d in ins[0].type.tensor_type.shape.dim]


def fma_peak(quick):
    """Single-core FMA peak in GFLOP/s from the kernels' criterion bench (fma_peak group),
    the best variant; None when it cannot run."""
    secs = ["--warm-up-time", "0.5", "--measurement-time", "1"] if quick else \
        ["--warm-up-time", "1", "--measurement-time", "3"]
    cmd = ["cargo", "bench", "--profile", "ci", "-p", "edgehal-kernels", "--bench", "gemm", "--",
           "fma_peak", "--noplot"] + secs
    log("measuring the FMA peak: " + " ".join(cmd))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        log("warning: FMA peak bench failed: " + (p.stderr.strip().splitlines() or ["?"])[-1])
        return None, {}
    scale = {"Kelem/s": 1e-6, "Melem/s": 1e-3, "Gelem/s": 1.0, "Telem/s": 1e3, "elem/s": 1e-9}
    per, cur = {}, None
    for line in p.stdout.splitlines():
        m = re.match(r"^fma_peak/(\S+)", line.strip())
        if m:
            cur = m.group(1)
        m = re.search(r"thrpt:\s*\[\s*\S+ \S+\s+(\S+) (\S+)\s+\S+ \S+\s*\]", line)
        if m and cur:
            per[cur] = float(m.group(1)) * scale.get(m.group(2), float("nan"))
            cur = None
    if not per:
        log("warning: no fma_peak throughput in the bench output")
        return None, {}
    return max(per.values()), per


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def fmt_ms(v):
    return "–" if v is None else (f"{v:.3f} ms" if v < 1 else f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms")


def fmt_mb(v):
    return "–" if v is None else f"{v:.0f} MiB"


def gflops(flops, ms):
    return None if not flops or not ms else flops / (ms * 1e-3) / 1e9


def fmt_g(v):
    return "–" if v is None else f"{v:.1f}"


def peers_for(model, threads):
    if model.endswith(".tflite"):
        return ["litert"]
    ps = ["ort"]
    if os.path.basename(model) in CONVERTED_PEERS:
        ps += ["ncnn", "mnn"]
    if threads == 1:
        ps.append("tract")
    return ps


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        ap = argparse.ArgumentParser(prog="bench_table.py --child")
        ap.add_argument("--child", action="store_true")
        ap.add_argument("runtime", choices=sorted(PEER_MODULES))
        ap.add_argument("model")
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("--runs", type=int, default=30)
        ap.add_argument("--warmup", type=int, default=5)
        ap.add_argument("--base", default="", help="ncnn/MNN files: BASE.ncnn.param, BASE.mnn")
        ap.add_argument("--shape", default="1,3,224,224")
        a = ap.parse_args()
        a.shape = [int(s) for s in a.shape.split(",")]
        return child(a)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma list of model files (names resolve in --models-dir)")
    ap.add_argument("--models-dir", default=os.path.join(ROOT, "..", "shared", "models"))
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts")
    ap.add_argument("--rounds", type=int, default=2, help="A B A B rounds per row")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per process")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    ap.add_argument("--quick", action="store_true", help="runs 5, rounds 1, short peak (CI smoke)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--cache-dir", default=None,
                    help="converted ncnn/MNN models (default $EDGEHAL_PEERS_DIR or target/peers)")
    ap.add_argument("--edgehal", default=None, help="edgehal binary (default: build target/ci)")
    ap.add_argument("--no-build", action="store_true", help="use --edgehal or target/ci as is")
    ap.add_argument("--no-peak", action="store_true", help="skip the FMA peak microbenchmark")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.rounds, a.warmup = 5, 1, 2
    if a.runs < 1 or a.rounds < 1 or a.warmup < 0:
        ap.error("--runs and --rounds must be at least 1, --warmup at least 0")
    try:
        threads = [int(t) for t in a.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads {a.threads!r}: expected a comma list of integers")
    if not threads or any(t < 1 for t in threads):
        ap.error("--threads: every thread count must be at least 1")
    models = []
    for m in [m.strip() for m in a.models.split(",") if m.strip()]:
        p = m if os.path.exists(m) else os.path.join(a.models_dir, m)
        if not os.path.exists(p):
            ap.error(f"model {m}: not found (looked in {a.models_dir})")
        if not p.endswith((".onnx", ".tflite")):
            ap.error(f"model {m}: expected .onnx or .tflite")
        models.append(os.path.abspath(p))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    cache = a.cache_dir or os.environ.get("EDGEHAL_PEERS_DIR") or os.path.join(target, "peers")
    exe = a.edgehal or os.path.join(target, "ci", "edgehal")

    load_start = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    log(f"load average at start: {load_start}")
    if not a.no_build and a.edgehal is None:
        log("building edgehal: cargo build --profile ci -p edgehal-cli")
        if subprocess.run(["cargo", "build", "--profile", "ci", "-p", "edgehal-cli"],
                          cwd=ROOT).returncode != 0:
            log("error: cargo build --profile ci -p edgehal-cli failed")
            return 1
    if not os.access(exe, os.X_OK):
        log(f"error: no edgehal binary at {exe}")
        return 1
    peak, peak_per = (None, {}) if a.no_peak else fma_peak(a.quick)

    versions = {k: pkg_version(v) for k, v in (("onnxruntime", "onnxruntime"), ("ncnn", "ncnn"),
                ("MNN", "MNN"), ("pnnx", "pnnx"), ("tract", "tract"),
                ("ai-edge-litert", "ai-edge-litert"))}
    me = [sys.executable, os.path.abspath(__file__), "--child"]
    rows, failed = [], False
    for model in models:
        mname = os.path.basename(model)
        flops = model_flops(model)
        conv_err, base, shape = {}, "", None
        if mname in CONVERTED_PEERS:
            try:
                shape = onnx_input_shape(model)
                base, conv_err = convert(model, cache, shape)
            except Exception as e:
                conv_err = {"ncnn": str(e), "mnn": str(e)}
            for p, e in conv_err.items():
                log(f"error: {mname}: {PEER_NAMES[p]} conversion: {e}")
        for t in threads:
            peers = peers_for(model, t)
            eh_rounds, eh_rss, eh_err = [], [], None
            pr = {p: {"rounds": [], "rss": [], "base": [], "version": None, "error": None,
                      "missing": False} for p in peers}
            for p, e in conv_err.items():
                if p in pr:
                    pr[p]["error"] = e
            for r in range(a.rounds):
                log(f"{mname} threads {t} round {r + 1}/{a.rounds} (load {loadavg()})")
                doc, err = run_json([exe, "bench", model, "--device", "cpu", "--threads", str(t),
                                     "--runs", str(a.runs), "--warmup", str(max(a.warmup, 1)),
                                     "--json"], a.timeout)
                if err:
                    eh_err = err
                    log(f"error: edgehal bench {mname} --threads {t}: {err}")
                else:
                    eh_rounds.append(doc["median_ms"])
                    if doc.get("peak_rss_mb") is not None:
                        eh_rss.append(doc["peak_rss_mb"])
                for p in peers:
                    st = pr[p]
                    if st["error"] and (st["missing"] or p in conv_err):
                        continue  # will not get better this round
                    cmd = me + [p, model, "--threads", str(t), "--runs", str(a.runs),
                                "--warmup", str(a.warmup)]
                    if p in ("ncnn", "mnn"):
                        cmd += ["--base", base, "--shape", ",".join(str(s) for s in shape)]
                    doc, err = run_json(cmd, a.timeout)
                    if err:
                        st["error"] = (doc or {}).get("error") or err
                        st["missing"] = bool((doc or {}).get("missing"))
                        what = "MISSING" if st["missing"] else "failed"
                        log(f"{'warning' if p in OPTIONAL_PEERS else 'error'}: {PEER_NAMES[p]} "
                            f"{what} on {mname} --threads {t}: {st['error']}")
                    else:
                        st["rounds"].append(doc["median_ms"])
                        st["rss"].append(doc["peak_rss_mb"])
                        st["base"].append(doc["python_baseline_mb"])
                        st["version"] = doc["runtime"]
            eh_med = statistics.median(eh_rounds) if eh_rounds else None
            peer_rows = {}
            for p, st in pr.items():
                peer_rows[p] = {
                    "runtime": st["version"] or PEER_NAMES[p],
                    "median_ms": statistics.median(st["rounds"]) if st["rounds"] else None,
                    "rounds_ms": st["rounds"],
                    "peak_rss_mb": max(st["rss"]) if st["rss"] else None,
                    "python_baseline_mb": min(st["base"]) if st["base"] else None,
                    "error": st["error"],
                    "missing": st["missing"],
                    "optional": p in OPTIONAL_PEERS,
                }
            timed = {p: v for p, v in peer_rows.items() if v["median_ms"] is not None}
            best = min(timed, key=lambda p: timed[p]["median_ms"]) if timed else None
            required_bad = [p for p, v in peer_rows.items()
                            if not v["optional"] and (v["error"] or v["median_ms"] is None)]
            if eh_med is None or required_bad:
                failed = True
            bp = peer_rows[best] if best else None
            rows.append({
                "model": mname,
                "threads": t,
                "flops": flops,
                "edgehal": {"median_ms": eh_med, "rounds_ms": eh_rounds,
                            "peak_rss_mb": max(eh_rss) if eh_rss else None, "error": eh_err},
                "peers": peer_rows,
                "fastest_peer": best,
                "ratio": (eh_med / bp["median_ms"]) if (eh_med and bp) else None,
                "edgehal_gflops": gflops(flops, eh_med),
                "peer_gflops": gflops(flops, bp["median_ms"]) if bp else None,
            })

    load_end = loadavg()
    log(f"load average at end: {load_end}")
    cmdline = "scripts/bench-table.sh " + " ".join(sys.argv[1:])
    out = []
    out.append(f"edgehal vs peers, {started}; `{cmdline.strip()}`")
    out.append("")
    out.append(f"- load average (1/5/15 min) at start {load_start}, at end {load_end}")
    pk = f"{peak:.1f} GFLOP/s" if peak else "not measured"
    if peak_per:
        pk += " (" + ", ".join(f"{k} {v:.1f}" for k, v in sorted(peak_per.items())) + ")"
    out.append(f"- FMA peak, one core: {pk}; `cargo bench --profile ci -p edgehal-kernels "
               f"--bench gemm -- fma_peak`")
    out.append(f"- each cell: median of {a.rounds} round medians, each {a.runs} timed runs after "
               f"{a.warmup} warm-up runs, one process per runtime per round, same seeded inputs")
    out.append("- peer versions: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in versions.items()))
    out.append("- peer peak RSS is the whole Python process (VmHWM); the Python + numpy baseline "
               "before the runtime loads is in brackets")
    out.append("- GFLOP counts 2 x the multiply-adds of Conv/Gemm/MatMul/LSTM (int8 models: "
               "integer ops, still set against the float FMA peak); % of peak uses "
               "peak x threads")
    out.append("")
    out.append("| model | threads | edgehal median | fastest peer | peer median | edgehal / peer "
               "| edgehal peak RSS | peer peak RSS | GFLOP | edgehal GFLOP/s | peer GFLOP/s "
               "| edgehal % of peak | all peers |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        e, best = row["edgehal"], row["fastest_peer"]
        bp = row["peers"][best] if best else None
        cells = []
        for p, v in row["peers"].items():
            if v["median_ms"] is not None:
                cells.append(f"{PEER_NAMES[p]} {fmt_ms(v['median_ms'])}")
            else:
                tag = "MISSING" if v["missing"] else "FAILED"
                opt = " (optional)" if v["optional"] else ""
                cells.append(f"{PEER_NAMES[p]} {tag}{opt}: {(v['error'] or '')[:80]}")
        lacking = [PEER_NAMES[p] for p, v in row["peers"].items()
                   if not v["optional"] and v["median_ms"] is None]
        incomplete = f" (INCOMPLETE: {', '.join(lacking)} not timed)" if lacking else ""
        pct = None
        if peak and row["edgehal_gflops"]:
            pct = 100 * row["edgehal_gflops"] / (peak * row["threads"])
        peer_rss = "–"
        if bp and bp["peak_rss_mb"] is not None:
            peer_rss = f"{fmt_mb(bp['peak_rss_mb'])} ({fmt_mb(bp['python_baseline_mb'])})"
        out.append("| " + " | ".join([
            row["model"], str(row["threads"]),
            fmt_ms(e["median_ms"]) if e["median_ms"] is not None else f"FAILED: {e['error']}",
            (bp["runtime"] if bp else "NONE TIMED") + incomplete,
            fmt_ms(bp["median_ms"]) if bp else "–",
            f"{row['ratio']:.2f}" if row["ratio"] else "–",
            fmt_mb(e["peak_rss_mb"]), peer_rss,
            f"{row['flops'] / 1e9:.3f}" if row["flops"] else "–",
            fmt_g(row["edgehal_gflops"]), fmt_g(row["peer_gflops"]),
            f"{pct:.0f}%" if pct is not None else "–",
            "; ".join(cells).replace("|", "/"),
        ]) + " |")
    print("\n".join(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({
                "started": started, "command": cmdline.strip(), "load_start": load_start,
                "load_end": load_end, "fma_peak_gflops": peak, "fma_peak_by_variant": peak_per,
                "rounds": a.rounds, "runs": a.runs, "warmup": a.warmup,
                "versions": versions, "edgehal": exe, "rows": rows,
            }, f, indent=1)
    if failed:
        log("error: some rows lack edgehal or a required peer (marked FAILED/MISSING above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
