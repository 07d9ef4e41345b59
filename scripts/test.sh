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

stage() { echo; echo "=== stage $1 ($(( $(date +%s) - t0 )) s elapsed)"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

scripts/deps.sh

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
    stage $s
    "scripts/test-$s.sh"
  fi
done

echo
echo "=== all stages passed in $(( $(date +%s) - t0 )) s"
