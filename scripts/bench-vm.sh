#!/usr/bin/env bash
# The in-guest comparison benchmark (not a test: CI does not run it):
# fio 4K randread/randwrite QD32 on one rbd image in Debian's kernel under
# QEMU, librbd direct (fio ioengine=rbd) vs tcmu-runner vs tcmu-rbd,
# alternated in one boot, with the CPU time per I/O of each serving
# process, of fio and of the whole guest. The table is printed at the end
# and kept in the result directory (compare.txt).
# VM_COMPARE_B_ENV / VM_COMPARE_B_BIN add a candidate (scripts/test-vm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
VM_SUITES=${VM_SUITES:-compare} VM_KEEP=${VM_KEEP:-1} exec scripts/test-vm.sh
