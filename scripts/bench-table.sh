#!/usr/bin/env bash
# edgehal side by side with its peer runtimes (issue 5): the one command that reproduces the
# table in BENCHMARKS.md. Makes the venv (.venv, as scripts/test-all.sh does) if needed,
# installs the peers once (pinned: onnxruntime, LiteRT from scripts/requirements.txt; ncnn,
# pnnx, MNN, tract below), builds edgehal (`cargo build --profile ci -p edgehal-cli`), measures
# the FMA peak, converts the ONNX CNNs for ncnn/MNN into target/peers/ (reused), then runs
# edgehal and every peer alternately (A B A B) and prints a markdown table.
#
# Usage: scripts/bench-table.sh [--models a.onnx,b.tflite] [--threads 1,2] [--rounds 2]
#                               [--runs 30] [--warmup 5] [--quick] [--json FILE] [--no-peak]
#        (all options: scripts/bench-table.sh --help)
# Run it on an idle machine: the load average at start and end is printed with the table.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/models ]; then
  echo "error: ../shared (models) must sit beside the checkout" >&2
  exit 1
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import onnx, onnxruntime, numpy, ai_edge_litert' 2>/dev/null; then
  echo "making .venv with the reference runtimes (scripts/requirements.txt)" >&2
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
  fi
  .venv/bin/pip install -q -r scripts/requirements.txt
fi

# Peers, pinned to the versions the table was first taken with. pnnx without dependencies: its
# wheel's executable converts ONNX on its own; the dependency it declares (torch, ~5 GB with
# CUDA libraries) is only for its PyTorch export helpers.
peers=(ncnn==1.0.20261020 MNN==3.6.1 tract==0.23.9)
pnnx=pnnx==20261020
have() { # have PKG==VERSION: installed at that version?
  .venv/bin/python - "$1" <<'PY' 2>/dev/null
import sys, importlib.metadata as m
name, ver = sys.argv[1].split("==")
sys.exit(0 if m.version(name) == ver else 1)
PY
}
need=()
for p in "${peers[@]}"; do have "$p" || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing peers: ${need[*]}" >&2
  .venv/bin/pip install -q "${need[@]}"
fi
if ! have "$pnnx"; then
  echo "installing $pnnx (--no-deps)" >&2
  .venv/bin/pip install -q --no-deps "$pnnx"
fi

exec .venv/bin/python scripts/bench_table.py "$@"
