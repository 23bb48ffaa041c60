#!/bin/sh
# Recompile every kernel to SPIR-V next to its source. The flags here are the ones the drift
# test (drivers/vulkan/tests/shaders.rs) uses; keep them in sync.
set -eu
cd "$(dirname "$0")"
for f in *.comp; do
    glslc --target-env=vulkan1.0 -O -I . "$f" -o "${f%.comp}.spv"
    spirv-val --target-env vulkan1.0 "${f%.comp}.spv"
done
