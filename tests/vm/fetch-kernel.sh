#!/usr/bin/env bash
# Fetch Debian bookworm-backports' 6.12 kernel image .deb into the cache (once) and unpack it.
# Prints the unpacked root directory on stdout. Installs host packages when missing (CI is root).
set -euo pipefail
CACHE="${EDGEHAL_CACHE_DIR:-$HOME/.cache/edgehal/vm}"
mkdir -p "$CACHE"

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_pkgs+=(busybox-static)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ] || need_pkgs+=(kmod)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v zstd >/dev/null || need_pkgs+=(zstd)
apt_updated=0
apt_update() { [ "$apt_updated" = 1 ] || { apt-get update -qq >&2; apt_updated=1; }; }
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "missing host packages: ${need_pkgs[*]} (install them: apt-get install ${need_pkgs[*]})" >&2
        exit 3
    fi
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2
fi

deb=$(ls "$CACHE"/linux-image-6.12*-amd64_*.deb 2>/dev/null | grep -v -- '-dbg' | grep -v unsigned | head -n1 || true)
if [ -z "$deb" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "kernel .deb not cached in $CACHE and cannot use apt as non-root" >&2
        exit 3
    fi
    src=/etc/apt/sources.list.d/edgehal-bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat > "$src" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        apt_updated=0
    fi
    apt_update
    # the newest 6.12 signed image in bookworm-backports
    pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9.+~a-z-]*-amd64$' 2>/dev/null \
          | awk '{print $1}' | grep -v -- '-rt-\|-cloud-\|-dbg\|unsigned' | sort -V | tail -n1)
    [ -n "$pkg" ] || { echo "no linux-image-6.12*-amd64 in bookworm-backports" >&2; exit 3; }
    (cd "$CACHE" && apt-get download -qq "$pkg" >&2)
    deb=$(ls "$CACHE"/linux-image-6.12*-amd64_*.deb | grep -v -- '-dbg' | head -n1)
fi

root="$CACHE/root-$(basename "$deb" .deb)"
if [ ! -f "$root/.done" ]; then
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$deb" "$root"
    touch "$root/.done"
fi
echo "$root"
