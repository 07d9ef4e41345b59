#!/usr/bin/env bash
# Short fuzz runs (cargo fuzz / libFuzzer) of ring-entry parsing and CDB
# decoding. FUZZ_SECONDS per target (default 30). The machine has only a
# stable toolchain; RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECONDS:-30}
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
for t in ring_entries cdb; do
  echo "fuzz: $t for ${secs}s"
  mkdir -p "corpus/$t"
  if ! cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 > "/tmp/fuzz-$t.log" 2>&1; then
    tail -40 "/tmp/fuzz-$t.log"
    echo "fuzz: $t FAILED (crash artifact under fuzz/artifacts/$t)"
    exit 1
  fi
  grep -E "stat::number_of_executed_units|Done" "/tmp/fuzz-$t.log" | head -2
done
echo "fuzz: PASS"
