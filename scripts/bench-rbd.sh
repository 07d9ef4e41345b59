#!/usr/bin/env bash
# The rbd benchmark: starts a Ceph micro cluster in a temporary directory,
# runs tcmu-rbd-vs-fio (emulated kernel + ring + SCSI + rbd backend, and
# fio's rbd engine, on one image, alternating) and stops the cluster.
# Extra arguments go to tcmu-rbd-vs-fio (e.g. --seconds 20 --repeat 5).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null || {
  echo "bench-rbd: installing fio"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 fio >/dev/null
}
dir=$(mktemp -d /tmp/tcmu-rbd-bench.XXXXXX)
rmdir "$dir"
trap 'scripts/ceph-cluster.sh stop "$dir" || true' EXIT
scripts/ceph-cluster.sh start "$dir"
cargo build --release -p tcmu-rbd-testkit --bin tcmu-rbd-vs-fio
target/release/tcmu-rbd-vs-fio --conf "$dir/ceph.conf" --size 1G "$@"
