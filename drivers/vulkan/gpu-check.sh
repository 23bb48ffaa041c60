#!/bin/sh
# Run the Vulkan driver's tests and the model benchmark on a machine with a real GPU
# (written for an NVIDIA machine: NVIDIA's ICD is selected when present).
#   sh drivers/vulkan/gpu-check.sh [DEVICE-SELECTOR]
# DEVICE-SELECTOR: index or name substring (default: NVIDIA when present, else the first GPU).
set -eu
cd "$(dirname "$0")/../.."
SEL="${1:-}"
if [ -z "$SEL" ] && ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1; then
    SEL="NVIDIA"
fi
MODELS="${MODELS:-../shared/models}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv || true
echo "== device listing (edgehal probe's Vulkan section)"
cargo run -q --release -p edgehal-cli -- probe | sed -n '/^Vulkan devices/,$p'

echo "== Vulkan tests on '$SEL' (ops, QDQ int8 model, integer GEMM on both kernels, async submits, dma-buf)"
# The lines kept: per-test results, model diffs, the int8 kernel chosen, async timings, dma-buf.
EDGEHAL_VK_DEVICE="$SEL" cargo test --release -p edgehal-vulkan -- --test-threads=1 --nocapture 2>&1 |
    grep -E "vulkan device|dispatches|^test |test result|SKIP|integer_dot_product|submissions queued|dma-buf|mobilenet_v2_int8|panicked"
echo "== vkbench (batch 1, fp32, same run: Vulkan then CPU)"
echo "command: cargo run --release -p edgehal-vulkan --example vkbench -- --device '$SEL' --runs "${RUNS:-200}" --warmup "${WARMUP:-20}" $MODELS/mobilenet_v2.onnx $MODELS/resnet18.onnx $MODELS/mobilenet_v2_int8.onnx"
cargo run -q --release -p edgehal-vulkan --example vkbench -- --device "$SEL" --runs "${RUNS:-200}" --warmup "${WARMUP:-20}" \
    "$MODELS/mobilenet_v2.onnx" "$MODELS/resnet18.onnx" "$MODELS/mobilenet_v2_int8.onnx"

# The CLI contract. Session routes --device vulkan once hal wires the Vulkan driver in; until
# then this prints the CLI's refusal and the script goes on (vkbench above has the numbers).
echo "== edgehal bench --device vulkan"
for m in mobilenet_v2 resnet18; do
    cargo run -q --release -p edgehal-cli -- bench "$MODELS/$m.onnx" --device vulkan \
        --runs "${RUNS:-200}" --warmup "${WARMUP:-20}" --json ||
        echo "edgehal bench --device vulkan: not available in this build (see the line above)"
done

# Peer on the same card in the same run (the issue's target): ncnn's Vulkan backend, when the
# ncnn Python wheel and pnnx-converted models are present (NCNN_DIR holds NAME.ncnn.param/.bin).
PY="${PYTHON:-python3}"
if [ -n "${NCNN_DIR:-}" ] && "$PY" -c "import ncnn" 2>/dev/null; then
    for m in mobilenet_v2 resnet18; do
        "$PY" ../shared/reference/peers_ncnn_mnn.py "$NCNN_DIR" "$m" --vulkan --runs 200
    done
else
    echo "SKIP: ncnn peer (set NCNN_DIR and install the ncnn wheel to compare on this card)"
fi
