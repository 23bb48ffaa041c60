#!/usr/bin/env bash
# Smoke test of scripts/bench-table.sh for CI: one small model, --quick (5 runs, 1 round), both
# thread counts; checks that the table has a row per thread count with edgehal and every
# required peer timed (onnxruntime, ncnn, MNN for mobilenet_v2.onnx), the expected columns, a
# measured FMA peak, a load average, and that the peers' seeded inputs are the ones edgehal
# uses (same model output as `edgehal run`). Timings are not judged: a benchmark is not a test.
# Usage: scripts/bench-table-smoke.sh   (from the repository root; ../shared beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${SMOKE_MODEL:-mobilenet_v2.onnx}
out=target/bench-table-smoke
rm -rf "$out"
mkdir -p "$out"

status=0
scripts/bench-table.sh --quick --models "$model" --threads 1,2 --json "$out/table.json" \
  >"$out/table.md" 2>"$out/stderr.txt" || status=$?
cat "$out/table.md"
if [ "$status" -ne 0 ]; then
  echo "bench-table smoke: bench-table.sh exited $status; its stderr:" >&2
  tail -n 20 "$out/stderr.txt" >&2
  exit 1
fi

target_dir=${CARGO_TARGET_DIR:-target}
.venv/bin/python - "$out" "$model" "$target_dir/ci/edgehal" <<'PY'
import json, os, subprocess, sys, tempfile
out, model, edgehal = sys.argv[1:4]
fails, checks = [], 0
def check(ok, what):
    global checks
    checks += 1
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        fails.append(what)

md = open(os.path.join(out, "table.md")).read().splitlines()
doc = json.load(open(os.path.join(out, "table.json")))
header = next((l for l in md if l.startswith("| model |")), "")
cols = [c.strip() for c in header.strip("|").split("|")]
want = ["model", "threads", "edgehal median", "fastest peer", "peer median", "edgehal / peer",
        "edgehal peak RSS", "peer peak RSS", "GFLOP", "edgehal GFLOP/s", "peer GFLOP/s",
        "edgehal % of peak", "all peers"]
check(cols == want, f"table columns {cols}")
rows = [l for l in md if l.startswith(f"| {model} |")]
check(len(rows) == 2, f"two table rows for {model} (threads 1 and 2), got {len(rows)}")
for l in rows:
    cells = [c.strip() for c in l.strip("|").split("|")]
    check(len(cells) == len(want), f"row has {len(want)} cells: {l[:60]}")
    check("FAILED" not in l and "MISSING" not in l.replace("(optional)", ""),
          f"no failed/missing required peer: {l[:60]}")
check(any(l.startswith("- load average") and "at end" in l for l in md), "load average line")
check(isinstance(doc.get("fma_peak_gflops"), (int, float)) and doc["fma_peak_gflops"] > 0,
      f"FMA peak measured: {doc.get('fma_peak_gflops')}")
check(sorted(r["threads"] for r in doc["rows"]) == [1, 2], "JSON rows for threads 1 and 2")
for r in doc["rows"]:
    t = r["threads"]
    check((r["edgehal"]["median_ms"] or 0) > 0, f"threads {t}: edgehal median > 0")
    check((r["edgehal"]["peak_rss_mb"] or 0) > 0, f"threads {t}: edgehal peak RSS > 0")
    req = ["ort", "ncnn", "mnn"] if model in ("mobilenet_v2.onnx", "resnet18.onnx") else \
          ["litert"] if model.endswith(".tflite") else ["ort"]
    for p in req:
        v = r["peers"].get(p) or {}
        check((v.get("median_ms") or 0) > 0 and (v.get("peak_rss_mb") or 0) > 0,
              f"threads {t}: peer {p} timed with RSS ({v.get('error')})")
    best = r["fastest_peer"]
    check(best in req and all(r["peers"][best]["median_ms"] <= r["peers"][p]["median_ms"]
                              for p in r["peers"] if r["peers"][p]["median_ms"] is not None),
          f"threads {t}: fastest peer is the minimum ({best})")
    check(abs(r["ratio"] - r["edgehal"]["median_ms"] / r["peers"][best]["median_ms"]) < 1e-9,
          f"threads {t}: ratio = edgehal / fastest peer")
    check(r["flops"] and 0.5e9 < r["flops"] < 0.7e9 if model == "mobilenet_v2.onnx" else
          bool(r["flops"]), f"threads {t}: model FLOPs counted ({r['flops']})")

# Same seeded inputs: onnxruntime on bench_table's inputs gives `edgehal run`'s output.
sys.path.insert(0, "scripts")
import numpy as np
import onnxruntime as ort
import bench_table
path = os.path.join("..", "shared", "models", "lstm_kws.onnx")
with tempfile.TemporaryDirectory() as d:
    subprocess.run([edgehal, "run", path, "--device", "cpu", "--seed", "7", "--output-dir", d],
                   check=True, stdout=subprocess.DEVNULL)
    got = np.load(os.path.join(d, "output.npy"))
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
x = bench_table.seeded_inputs([(i.shape, np.float32) for i in s.get_inputs()])
ref = s.run(None, {i.name: v for i, v in zip(s.get_inputs(), x)})[0]
other = s.run(None, {s.get_inputs()[0].name: np.zeros_like(x[0])})[0]
diff = float(np.abs(ref - got).max())
check(diff < 1e-5 and float(np.abs(other - got).max()) > 1e-3,
      f"peers' seeded inputs are edgehal's (lstm_kws max |diff| {diff:.2e})")
print(f"bench-table-smoke: {checks - len(fails)} passed, {len(fails)} failed")
sys.exit(1 if fails else 0)
PY
