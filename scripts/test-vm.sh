#!/usr/bin/env bash
# The VM stage: the daemon against Debian's own kernel (linux-image-amd64),
# under QEMU (software emulation), with the tools a storage admin uses.
#
# The guest is a busybox initramfs holding the modules needed to reach the
# host (virtio, 9p) and to serve LUNs (configfs, target_core_user,
# tcm_loop, sd_mod, ...). It mounts the host's / read-only over 9p and
# chroots into it, so the host's fio, sg3-utils and the freshly built daemon
# run against the guest's kernel (scripts/vm/init, scripts/vm/guest.sh).
# Results come back over a second, writable 9p share.
#
# Environment:
#   VM_SUITES   guest check groups (default: "local")
#   VM_PROFILE  cargo profile of the daemon under test (default: release)
#   VM_CACHE    initramfs cache (default: target/vm-cache), keyed on kernel
#               version and the init script
#   VM_KEEP=1   keep the result directory
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
t0=$(date +%s)
SUITES=${VM_SUITES:-local}
PROFILE=${VM_PROFILE:-release}
CACHE=${VM_CACHE:-$top/target/vm-cache}
log() { echo "vm: $*"; }
die() { echo "vm: FAIL: $*" >&2; exit 1; }

# What the guest build and the checks need, from Debian packages only.
scripts/deps.sh qemu-system-x86 linux-image-amd64 busybox-static kmod cpio \
  fio sg3-utils util-linux

# The kernel: Debian's newest installed (not the host's running kernel).
kver=$(ls /lib/modules | grep -E -- '-amd64$' | sort -V | tail -1)
[ -n "$kver" ] && [ -f "/boot/vmlinuz-$kver" ] || die "no Debian amd64 kernel in /boot and /lib/modules"
kernel=/boot/vmlinuz-$kver
log "kernel $kver"

# The daemon under test.
if [ "$PROFILE" = release ]; then
  cargo build --release --bin tcmu-rbd
  bin=$top/target/release/tcmu-rbd
else
  cargo build --bin tcmu-rbd
  bin=$top/target/debug/tcmu-rbd
fi
[ -x "$bin" ] || die "no daemon binary at $bin"

# --- initramfs (cached) ---------------------------------------------------
mods="virtio_pci 9pnet_virtio 9p configfs target_core_user tcm_loop sd_mod scsi_dh_alua
  dm_multipath virtio_net"
busybox=$(command -v busybox)
key=$( (echo "$kver $mods"; cat scripts/vm/init; sha256sum "$busybox" "$kernel") | sha256sum | cut -c1-16)
initrd=$CACHE/$kver/initrd-$key.cpio.gz
if [ ! -f "$initrd" ]; then
  log "building initramfs $initrd"
  tb=$(date +%s)
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,proc,sys,dev,host,lib/modules}
  file -L "$busybox" 2>/dev/null | grep -q "statically linked" ||
    ldd "$busybox" 2>&1 | grep -q "not a dynamic" || die "$busybox is not static (busybox-static)"
  cp "$busybox" "$root/bin/busybox"
  cp scripts/vm/init "$root/init"
  chmod +x "$root/init"
  : >"$root/modules.load"
  # Every module with its dependencies, in load order, each once.
  for m in $mods; do
    modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    mkdir -p "$root$(dirname "$ko")"
    case "$ko" in
      *.ko) cp "$ko" "$root$ko" ;;
      *.ko.xz) xz -dc "$ko" >"$root${ko%.xz}"; ko=${ko%.xz} ;;
      *.ko.zst) zstd -qdc "$ko" >"$root${ko%.zst}"; ko=${ko%.zst} ;;
      *) die "unexpected module file $ko" ;;
    esac
    echo "$ko" >>"$root/modules.load"
  done
  depmod -b "$root" "$kver"
  mkdir -p "$CACHE/$kver"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$root"
  log "initramfs built in $(($(date +%s) - tb)) s ($(du -h "$initrd" | cut -f1))"
else
  log "initramfs from cache $initrd"
fi

# --- run the guest --------------------------------------------------------
out=$(mktemp -d /tmp/tcmu-vm.XXXXXX)
chmod 777 "$out"
cat >"$out/env" <<EOF
BIN=$bin
SUITES="$SUITES"
EOF
: >"$out/results"
cleanup() {
  if [ "${VM_KEEP:-0}" = 1 ]; then log "results kept in $out"; else rm -rf "$out"; fi
}
trap cleanup EXIT

log "booting guest (suites: $SUITES)"
tg=$(date +%s)
set +e
timeout 900 qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 \
  -nographic -no-reboot -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 loglevel=5 vmtest.script=$top/scripts/vm/guest.sh" \
  -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$out",mount_tag=out,security_model=none \
  </dev/null >"$out/console.log" 2>&1 &
qpid=$!
# Follow the results as they come.
tail -n +1 -f "$out/results" --pid=$qpid 2>/dev/null | grep --line-buffered -E '^(PASS|FAIL) ' &
wait $qpid
qrc=$?
set -e
sleep 0.5
log "guest ran $(($(date +%s) - tg)) s (qemu exit $qrc)"

npass=$(grep -c '^PASS ' "$out/results" || true)
nfail=$(grep -c '^FAIL ' "$out/results" || true)
done_ok=0
grep -qx DONE "$out/results" && done_ok=1
if [ "$nfail" -gt 0 ] || [ "$done_ok" != 1 ] || [ "$qrc" != 0 ]; then
  echo
  echo "===== guest console ($out/console.log)"
  cat "$out/console.log"
  echo "===== guest kernel log"
  cat "$out/dmesg.log" 2>/dev/null || true
  echo "===== daemon log"
  cat "$out/daemon.log" 2>/dev/null || true
  echo "===== check output (last 200 lines)"
  tail -n 200 "$out/checks.log" 2>/dev/null || true
  echo "===== results"
  cat "$out/results"
  [ "$done_ok" = 1 ] || echo "vm: the guest did not finish (qemu exit $qrc; 124 = timed out)"
  die "$nfail check(s) failed, $npass passed; stage took $(($(date +%s) - t0)) s"
fi
log "PASS: all $npass guest checks passed; stage took $(($(date +%s) - t0)) s"
