#!/usr/bin/env bash
# Run the whole edgehal test suite as CI does: installs what it needs (a Python venv with the
# reference runtimes), checks formatting and lints, runs every test and prints what ran.
# Usage: scripts/test-all.sh            (from the repository root; ../shared must be beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
step() { printf '\n==> %s   [disk free: %s]\n' "$*" "$(avail)"; }
avail() { df -h --output=avail . 2>/dev/null | tail -n 1 | tr -d ' '; }
avail_gib() { df -B1G --output=avail . 2>/dev/null | tail -n 1 | tr -d ' '; }
# The suite needs about 3 GiB of disk (x86 and aarch64 builds, the venv). On a machine with less
# than ${EDGEHAL_LOW_DISK_GIB:-12} GiB free it deletes build products as soon as no later step
# needs them, and says so; with more, it keeps them so that a rerun builds less.
low_disk() { [ "$(avail_gib)" -lt "${EDGEHAL_LOW_DISK_GIB:-12}" ]; }

if [ ! -d ../shared/models ]; then
  echo "error: ../shared (models, reference scripts) must sit beside the checkout" >&2
  exit 1
fi

step "system packages"
# lavapipe (Vulkan tests), glslc/spirv-tools (shader drift check), valgrind/pkg-config/libpng
# (C API tests), QEMU + busybox + kernel tools (the VFIO/dma-buf VM test), python3-venv,
# the aarch64 cross linker and qemu-user (aarch64 kernels under emulation).
pkgs=(mesa-vulkan-drivers libvulkan1 glslc spirv-tools valgrind pkg-config libpng-dev gcc
      qemu-system-x86 busybox-static cpio kmod xz-utils zstd python3-venv
      gcc-aarch64-linux-gnu qemu-user-static)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}"
else
  echo "all present: ${pkgs[*]}"
fi

step "python venv with reference runtimes (.venv)"
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import onnx, onnxruntime, numpy, ai_edge_litert' 2>/dev/null; then
  rm -rf .venv
  "$py" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -r scripts/requirements.txt
export EDGEHAL_PYTHON=$root/.venv/bin/python
.venv/bin/python -c 'import onnx, onnxruntime, ai_edge_litert; print("onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__)'

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -q -- -D warnings
if low_disk; then
  echo "low disk ($(avail) free): removing clippy's check artifacts (target/debug, $(du -sh target/debug 2>/dev/null | cut -f1))"
  rm -rf target/debug
fi

step "cargo test --workspace --profile ci (release without LTO)"
export CI=${CI:-true}
cargo test --workspace --profile ci 2>&1 | tee target/test-output.txt
summary=$(grep -E '^test result:' target/test-output.txt | awk '{p+=$4; f+=$6; i+=$8} END {print p" passed, "f" failed, "i" ignored"}')

if low_disk; then
  # Test executables of the host build: later steps relink the two they run.
  n=$(find target/ci/deps -maxdepth 1 -type f -executable ! -name '*.*' | wc -l)
  echo "low disk ($(avail) free): removing $n host test executables (target/ci/deps)"
  find target/ci/deps -maxdepth 1 -type f -executable ! -name '*.*' -delete
fi

step "aarch64 kernels and a model under qemu-user (cortex-a53/a72: NEON, a76: +dotprod, max: +i8mm)"
scripts/aarch64-tests.sh 2>&1 | tee target/aarch64-output.txt

step "peer table smoke: scripts/bench-table.sh --quick on mobilenet_v2.onnx vs onnxruntime, ncnn, MNN"
scripts/bench-table-smoke.sh 2>&1 | tee target/bench-smoke-output.txt

step "ONNX node conformance (by op)"
cat target/conformance-summary.txt

step "summary"
echo "disk: $(avail) free at the end; target $(du -sh target 2>/dev/null | cut -f1), .venv $(du -sh .venv 2>/dev/null | cut -f1)"
echo "suites: core, kernels (+ SIMD dispatch), cpu ops, ONNX/TFLite importers, session, CLI, probe fixtures,"
echo "        HAL buffers/drivers/plugin, partitioner/scheduler, Vulkan on lavapipe, C API (ASan, valgrind),"
echo "        VFIO/dma-buf QEMU VM, ONNX conformance, model agreement (onnxruntime, LiteRT), bad input"
tail -n 1 target/conformance-summary.txt
echo "rust tests: $summary"
echo "peer table smoke: $(tail -n 1 target/bench-smoke-output.txt)"
echo "aarch64 (qemu-user):"
sed -n '/aarch64 summary/,$p' target/aarch64-output.txt | tail -n +2
