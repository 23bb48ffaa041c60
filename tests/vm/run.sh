#!/usr/bin/env bash
# VM integration test for edgehal's VFIO / DMA / dma-buf / io_uring paths (see
# ../shared/VM-TESTING.md): boots Debian's 6.12 kernel under QEMU TCG with a virtual Intel IOMMU
# and QEMU's `edu` DMA device bound to vfio-pci, runs the statically linked `vm_guest` example,
# and prints its `CHECK name PASS|FAIL detail` lines under a `SCENARIO name` header.
#
# Usage: tests/vm/run.sh [SCENARIO...]   (default: normal no_busmaster no_iommu)
#   normal        everything on; every check must pass
#   no_busmaster  bus mastering left off: the DMA round trip must fail (target stays zero)
#   no_iommu      intel_iommu=off: vfio-pci cannot bind, opening the device must fail
# Env: EDGEHAL_CACHE_DIR (default ~/.cache/edgehal/vm) caches the kernel .deb;
#      EDGEHAL_VM_TIMEOUT (seconds per guest, default 60).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
CACHE="${EDGEHAL_CACHE_DIR:-$HOME/.cache/edgehal/vm}"
mkdir -p "$CACHE"
scenarios=("$@")
[ "${#scenarios[@]}" -gt 0 ] || scenarios=(normal no_busmaster no_iommu)

kroot=$("$here/fetch-kernel.sh")
vmlinuz=$(ls "$kroot"/boot/vmlinuz-* | head -n1)
kver=$(basename "$vmlinuz" | sed 's/^vmlinuz-//')
moddir="$kroot/lib/modules/$kver/kernel"

# --- the guest test binary: static, in its own target dir -----------------------------------
target_dir="$repo/target/vm-guest"
host_triple=$(rustc -vV | sed -n 's/^host: //p')
echo "building vm_guest (static, $host_triple) into $target_dir" >&2
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target_dir" \
    cargo build --quiet --release -p edgehal-vfio --example vm_guest --target "$host_triple" \
    --manifest-path "$repo/Cargo.toml" >&2
guest_bin="$target_dir/$host_triple/release/examples/vm_guest"

# --- initramfs -------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/edgehal-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
ir="$work/initramfs"
mkdir -p "$ir"/{bin,dev,proc,sys,tmp,lib/modules}
busybox=$(command -v busybox || echo /bin/busybox)
cp "$busybox" "$ir/bin/busybox"
cp "$guest_bin" "$ir/edgehal-vm-guest"
for f in drivers/vfio/vfio.ko.xz virt/lib/irqbypass.ko.xz drivers/vfio/vfio_iommu_type1.ko.xz \
         drivers/vfio/pci/vfio-pci-core.ko.xz drivers/vfio/pci/vfio-pci.ko.xz; do
    xz -dc "$moddir/$f" > "$ir/lib/modules/$(basename "$f" .xz)"
done
cat > "$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in vfio irqbypass vfio_iommu_type1 vfio-pci-core vfio-pci; do
    insmod /lib/modules/$m.ko 2>/dev/null || echo "CHECK insmod FAIL $m"
done
echo "CHECK kernel PASS $(uname -r)"
BDF=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1234 ] && [ "$(cat $d/device)" = 0x11e8 ]; then BDF=${d##*/}; fi
done
if [ -z "$BDF" ]; then
    echo "CHECK bind FAIL no edu device (1234:11e8) on the PCI bus"
else
    echo vfio-pci > /sys/bus/pci/devices/$BDF/driver_override
    echo $BDF > /sys/bus/pci/drivers_probe 2>/dev/null
    G=$(readlink /sys/bus/pci/devices/$BDF/iommu_group 2>/dev/null)
    G=${G##*/}
    if [ -n "$G" ] && [ -e /dev/vfio/$G ]; then
        echo "CHECK bind PASS $BDF bound to vfio-pci, /dev/vfio/$G"
    else
        echo "CHECK bind FAIL $BDF: no /dev/vfio group node (iommu_group='$G', driver=$(readlink /sys/bus/pci/devices/$BDF/driver))"
    fi
    /edgehal-vm-guest $BDF
    echo "GUEST_EXIT $?"
    if dmesg | grep -qE 'DMAR: \[DMA (Write|Read)'; then
        echo "CHECK dmar_fault PASS $(dmesg | grep -E 'DMAR: \[DMA (Write|Read)' | head -n1 | tr -s ' ')"
    else
        echo "CHECK dmar_fault FAIL no DMAR fault in the kernel log"
    fi
fi
echo EDGEHAL_VM_DONE
poweroff -f
INIT
chmod +x "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"

# --- boot ------------------------------------------------------------------------------------
# The scenarios boot in parallel (each guest is mostly idle waiting on virtual-time DMA and
# kernel init); results are printed in the order asked.
accel="-accel tcg,thread=multi"   # never KVM here: /dev/kvm on these hosts is a software model
boot() {
    local sc=$1 rc=0 t0 t1 try
    # no_timer_check: under TCG on a loaded host the early IO-APIC timer probe can miss its
    # window, and with interrupt remapping on the kernel then panics instead of falling back.
    local append="console=ttyS0 panic=-1 loglevel=4 no_timer_check"
    case "$sc" in
        normal) append="$append intel_iommu=on" ;;
        no_busmaster) append="$append intel_iommu=on EDGEHAL_NO_BUSMASTER=1" ;;
        no_iommu) append="$append intel_iommu=off" ;;
    esac
    t0=$(date +%s.%N)
    # A guest that never reached /init (an emulator hiccup in early boot) is booted once more;
    # anything that happens after /init starts counts as it is.
    for try in 1 2; do
        rc=0
        timeout "${EDGEHAL_VM_TIMEOUT:-90}" qemu-system-x86_64 $accel -cpu max -smp 2 -m 512M \
            -machine q35 -device intel-iommu,intremap=on,caching-mode=on -device edu \
            -display none -monitor none -serial "file:$work/$sc.log" -no-reboot \
            -kernel "$vmlinuz" -initrd "$work/initrd.gz" -append "$append" </dev/null \
            >"$work/$sc.qemu" 2>&1 || rc=$?
        grep -q '^CHECK kernel' "$work/$sc.log" && break
        [ "$try" = 2 ] || cp "$work/$sc.log" "$work/$sc.log.try1"
    done
    t1=$(date +%s.%N)
    echo "qemu_rc=$rc boots=$try seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')" > "$work/$sc.status"
}
for sc in "${scenarios[@]}"; do
    case "$sc" in
        normal|no_busmaster|no_iommu) ;;
        *) echo "unknown scenario $sc" >&2; exit 2 ;;
    esac
done
pids=()
for sc in "${scenarios[@]}"; do
    boot "$sc" &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for sc in "${scenarios[@]}"; do
    echo "SCENARIO $sc $(cat "$work/$sc.status")"
    sed 's/^/  qemu| /' "$work/$sc.qemu" >&2
    [ ! -f "$work/$sc.log.try1" ] || tr -d '\r' < "$work/$sc.log.try1" | sed "s/^/  $sc(boot 1)| /" >&2
    tr -d '\r' < "$work/$sc.log" | sed "s/^/  $sc| /" >&2
    tr -d '\r' < "$work/$sc.log" | grep -E '^(CHECK|GUEST_EXIT|EDGEHAL_VM_DONE)' || true
done
