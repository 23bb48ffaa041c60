#!/usr/bin/env bash
# aarch64 correctness under emulation: cross-build the kernel tests and a whole-model test for
# aarch64-unknown-linux-gnu and run them under qemu-aarch64-static with QEMU_CPU set to
# cortex-a53 and cortex-a72 (NEON only), cortex-a76 (+ dotprod) and max (+ i8mm), so every
# aarch64 dispatch path runs. Fails if a CPU did not select the variant expected of it
# (EDGEHAL_EXPECT_KERNELS, checked inside the kernel tests), if a test fails, or if a model
# output differs from the host's (int8 outputs bit for bit).
# Usage: scripts/aarch64-tests.sh   (from anywhere; installs what it needs when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
profile=${PROFILE:-ci}
out=$PWD/target/aarch64-tests
say() { printf -- '--> %s\n' "$*"; }

pkgs=(gcc-aarch64-linux-gnu qemu-user-static)
need=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  say "installing: ${need[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}"
fi
if ! rustup target list --installed | grep -qx "$target"; then
  say "rustup target add $target"
  rustup target add "$target"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
# Where qemu-user finds the aarch64 dynamic loader and libc.
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
export CI=${CI:-true}
rm -rf "$out"
mkdir -p "$out"

kernels=(cargo test -q --profile "$profile" --target "$target" -p edgehal-kernels --lib --tests)
models=(cargo test -q --profile "$profile" --target "$target" -p edgehal-tests --test dispatch_models)

say "host reference outputs of the model test ($(uname -m))"
EDGEHAL_MODEL_OUT=$out/host cargo test -q --profile "$profile" -p edgehal-tests \
  --test dispatch_models -- --nocapture 2>&1 | grep -E 'ran,|SKIP|test result' || true
[ -n "$(ls "$out/host" 2>/dev/null)" ] || { echo "error: host model outputs missing" >&2; exit 1; }

say "cross-build for $target ($profile profile)"
"${kernels[@]}" --no-run
"${models[@]}" --no-run

fail=0
summary=()
for spec in cortex-a53:neon,portable cortex-a72:neon,portable cortex-a76:neon,dotprod max:neon,i8mm; do
  cpu=${spec%%:*}
  want=${spec#*:}
  say "QEMU_CPU=$cpu (expect float,int8 = $want)"
  log=$out/$cpu-kernels.log
  if QEMU_CPU=$cpu EDGEHAL_EXPECT_KERNELS=$want "${kernels[@]}" -- --nocapture >"$log" 2>&1; then
    kres=ok
  else
    kres=FAILED; fail=1
  fi
  ran=$(grep -m1 -o 'kernels: .*' "$log" || echo "kernels: (no dispatch line)")
  grep -E '^test result' "$log" | sed 's/^/    /'
  grep -E 'panicked|FAILED' "$log" | head -5 | sed 's/^/    /' || true
  mlog=$out/$cpu-models.log
  if QEMU_CPU=$cpu EDGEHAL_MODEL_EXPECT=$out/host EDGEHAL_MODEL_OUT=$out/$cpu \
      "${models[@]}" -- --nocapture >"$mlog" 2>&1; then
    mres=ok
  else
    mres=FAILED; fail=1
  fi
  grep -E 'max diff|SKIP|panicked' "$mlog" | sed 's/^/    /' || true
  # Nothing skipped silently: every model the host ran must have run here too.
  for f in "$out"/host/*.txt; do
    if [ ! -f "$out/$cpu/$(basename "$f")" ]; then
      echo "    missing model output under $cpu: $(basename "$f" .txt)"; mres=FAILED; fail=1
    fi
  done
  summary+=("$cpu: $ran | kernel tests $kres | model test $mres")
done

say "aarch64 summary"
printf '    %s\n' "${summary[@]}"
exit $fail
