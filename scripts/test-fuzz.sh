#!/usr/bin/env bash
# Short fuzz runs (libFuzzer, through libfuzzer-sys) of ring-entry parsing
# and CDB decoding. FUZZ_SECONDS per target (default 20).
#
# Built with plain cargo and the instrumentation flags cargo-fuzz passes
# (sancov, AddressSanitizer, --cfg fuzzing), so CI does not spend minutes
# compiling cargo-fuzz itself; `cargo fuzz run` works on the same crate for
# longer runs by hand. The machine has only a stable toolchain:
# RUSTC_BOOTSTRAP lets it take -Zsanitizer.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECONDS:-20}
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTC_BOOTSTRAP=1
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Zsanitizer=address -Cdebug-assertions -Coverflow-checks"
t0=$(date +%s)
# opt-level 1: a build in half the time, for runs of seconds.
CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --release --target "$triple" --bins --target-dir target/ci
echo "fuzz: targets built in $(( $(date +%s) - t0 )) s"
for t in ring_entries cdb; do
  echo "fuzz: $t for ${secs}s"
  mkdir -p "corpus/$t" "artifacts/$t"
  if ! "target/ci/$triple/release/$t" "corpus/$t" -max_total_time="$secs" \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 > "/tmp/fuzz-$t.log" 2>&1; then
    tail -40 "/tmp/fuzz-$t.log"
    echo "fuzz: $t FAILED (crash artifact under fuzz/artifacts/$t)"
    exit 1
  fi
  grep -E "stat::number_of_executed_units|Done" "/tmp/fuzz-$t.log" | head -2
done
echo "fuzz: PASS"
