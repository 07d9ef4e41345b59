#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run). Installs what it needs,
# starts what it needs (a Ceph micro cluster, a VM) and tears it down.
#
# Stages (each says PASS/FAIL; the script stops at the first failure):
#   lint    cargo fmt --check, cargo clippy -D warnings
#   unit    cargo test --workspace: ring, emulator, SCSI, backends
#   fuzz    short fuzz runs of ring parsing and CDB decoding
#   rbd     rbd backend tests against a live micro cluster
#   vm      the daemon in Debian's kernel under QEMU
# STAGES="unit rbd" scripts/test.sh runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
STAGES=${STAGES:-"lint unit fuzz rbd vm"}
export CARGO_TERM_COLOR=never
t0=$(date +%s)

times=()
last=
tl=$t0
# Closes the previous stage's timing and opens the next.
stage() {
  local now; now=$(date +%s)
  [ -n "$last" ] && times+=("$last $((now - tl)) s")
  last=$1; tl=$now
  [ "$1" = end ] && return
  echo; echo "=== stage $1 ($((now - t0)) s elapsed, $(df -Ph . | awk 'NR == 2 {print $4}') free on disk)"
}
has() { [[ " $STAGES " == *" $1 "* ]]; }

stage deps
# The suite's builds and clusters take about 12 GiB; a full disk shows up
# later as a mon that dies without a word, so warn here.
free_gib=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$free_gib" -lt 12 ]; then
  echo "WARNING: only $free_gib GiB free on this disk; the suite needs about 12 GiB (builds, fuzz, Ceph OSDs)"
fi
scripts/deps.sh
# The packages of the rbd and vm stages, installed in the background while
# lint and unit compile: on a fresh machine that is minutes of downloads
# off the critical path. Each stage still installs what it needs itself
# (deps.sh is idempotent), so this list only moves the wait.
prefetch=
if has rbd || has vm; then
  mkdir -p target
  scripts/deps.sh ceph-mon ceph-osd ceph-mgr ceph-common ceph-iscsi qemu-system-x86 \
    linux-image-amd64 busybox-static kmod cpio fio sg3-utils util-linux curl iproute2 \
    tcmu-runner targetcli-fb python3-rtslib-fb dbus-daemon dbus-bin multipath-tools udev \
    open-iscsi >target/deps-prefetch.log 2>&1 &
  prefetch=$!
fi
prefetched() {
  [ -n "$prefetch" ] || return 0
  wait "$prefetch" || { echo "deps: background install failed (the stage installs its own):"; tail -5 target/deps-prefetch.log; }
  prefetch=
}

if has lint; then
  stage lint
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets -- -D warnings
  # The systemd unit as systemd reads it (the binary is not installed
  # here: that one complaint is expected).
  if command -v systemd-analyze >/dev/null; then
    bad=$(systemd-analyze verify --man=no systemd/tcmu-rbd.service 2>&1 | grep -v "is not executable" || true)
    [ -z "$bad" ] || { echo "systemd/tcmu-rbd.service: $bad"; exit 1; }
  fi
fi

if has unit; then
  stage unit
  cargo test --workspace --exclude rbd-ffi
fi

for s in fuzz rbd vm; do
  if has $s && [ -x "scripts/test-$s.sh" ]; then
    [ $s = fuzz ] || prefetched
    stage $s
    "scripts/test-$s.sh"
  fi
done

stage end
echo
echo "=== stage times: ${times[*]/%/;}"
echo "=== all stages passed in $(( $(date +%s) - t0 )) s"
