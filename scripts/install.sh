#!/usr/bin/env bash
# Build libedgehal (release) and install it with its header and pkg-config file.
#
#   scripts/install.sh [PREFIX]        PREFIX defaults to /usr/local
#
# Installs PREFIX/lib/libedgehal.so.X.Y.Z (+ .so.X and .so links), PREFIX/lib/libedgehal.a,
# PREFIX/include/edgehal.h and PREFIX/lib/pkgconfig/edgehal.pc. Then, as a self-check, it
# compiles a small C program with `cc app.c $(pkg-config --cflags --libs edgehal)` and runs it.
# Environment: DESTDIR (staged installs, as make install), LIBDIR (default PREFIX/lib),
# EDGEHAL_SKIP_BUILD=1 to install an already built target/release (CARGO_TARGET_DIR honoured).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${1:-/usr/local}
case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac
libdir=${LIBDIR:-$prefix/lib}
includedir=$prefix/include
dest=${DESTDIR:-}
target=${CARGO_TARGET_DIR:-target}

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
major=${version%%.*}
[ -n "$version" ] || { echo "error: no version in Cargo.toml" >&2; exit 1; }

if [ "${EDGEHAL_SKIP_BUILD:-}" != 1 ]; then
  cargo build --release -p edgehal-ffi
fi
so=$target/release/libedgehal.so
[ -f "$so" ] || { echo "error: $so not built" >&2; exit 1; }

install -d "$dest$libdir/pkgconfig" "$dest$includedir"
install -m 0755 "$so" "$dest$libdir/libedgehal.so.$version"
# The soname the binary carries is libedgehal.so (cargo sets none), so the plain name links
# to the versioned file and programs find it either way.
ln -sf "libedgehal.so.$version" "$dest$libdir/libedgehal.so.$major"
ln -sf "libedgehal.so.$version" "$dest$libdir/libedgehal.so"
install -m 0644 "$target/release/libedgehal.a" "$dest$libdir/libedgehal.a"
strip --strip-unneeded "$dest$libdir/libedgehal.so.$version" 2>/dev/null || true
install -m 0644 include/edgehal.h "$dest$includedir/edgehal.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@LIBDIR@|$libdir|" -e "s|@INCLUDEDIR@|$includedir|" \
    -e "s|@VERSION@|$version|" edgehal.pc.in > "$dest$libdir/pkgconfig/edgehal.pc"
echo "installed libedgehal $version into $dest$prefix"

# Self-check: compile and run a program through pkg-config, as an integrator would.
if [ -z "$dest" ] && command -v pkg-config >/dev/null && command -v cc >/dev/null; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cat > "$tmp/app.c" <<'C'
#include <edgehal.h>
#include <stdio.h>
#include <string.h>
int main(void) {
  edgehal_runtime *rt = NULL;
  if (edgehal_runtime_create(&rt) != EDGEHAL_OK) return 1;
  size_t n = 0;
  edgehal_runtime_device_count(rt, &n);
  printf("libedgehal %s, %zu device(s)\n", edgehal_version(), n);
  edgehal_runtime_release(rt);
  return strcmp(edgehal_version(), EDGEHAL_VERSION_STRING_FOR_CHECK) == 0 ? 0 : 2;
}
C
  export PKG_CONFIG_PATH="$libdir/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  # shellcheck disable=SC2046
  cc "$tmp/app.c" -DEDGEHAL_VERSION_STRING_FOR_CHECK="\"$version\"" -o "$tmp/app" \
    $(pkg-config --cflags --libs edgehal) -Wl,-rpath,"$libdir"
  "$tmp/app"
  echo "self-check passed: cc app.c \$(pkg-config --cflags --libs edgehal) works"
fi
