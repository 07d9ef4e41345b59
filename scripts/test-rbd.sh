#!/usr/bin/env bash
# The rbd stage: starts a Ceph micro cluster in a temporary directory,
# runs the live-cluster tests (ignored in plain `cargo test`, run here
# with --ignored), and stops the cluster whatever happens.
#
#   scripts/test-rbd.sh             all rbd tests
#   KEEP_CLUSTER=DIR scripts/test-rbd.sh   reuse a running cluster in DIR
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${KEEP_CLUSTER:-}" ]; then
  dir=$KEEP_CLUSTER
else
  # ceph-cluster.sh picks a port block no other cluster here listens in.
  dir=$(mktemp -d /tmp/tcmu-rbd-ceph.XXXXXX)
  rmdir "$dir"
  trap 'scripts/ceph-cluster.sh stop "$dir" || true' EXIT
  t0=$(date +%s)
  scripts/ceph-cluster.sh start "$dir"
  echo "rbd: cluster up in $(( $(date +%s) - t0 )) s"
fi
eval "$(scripts/ceph-cluster.sh env "$dir")"
# ceph-iscsi's own health watcher reads the service-map entries in
# rbd_outage (its Python modules, run as the package ships them).
scripts/deps.sh ceph-iscsi

run() {
  echo "rbd: cargo test $*"
  cargo test "$@"
}
# The bindings (their unit tests too: the unit stage leaves rbd-ffi out),
# then the backend through the ring; the outage tests stop
# cluster daemons, so they run alone and one at a time.
run -p rbd-ffi -- --include-ignored
run -p tcmu-rbd --test rbd_live --test rbd_scsi --test scsi_rbd --test rbd_timer_slack -- --ignored
run -p tcmu-rbd --test rbd_outage -- --ignored --test-threads=1
# HA failover drills: two gateway processes per drill on one image; one
# drill at a time so the failover times are not skewed by the others.
# They guard data, so each runs twice in a row (DRILL_RUNS), and the chaos
# soak below repeats the same faults at random: a race that fails one run
# in three must show here, not on a user's gateway.
runs=${DRILL_RUNS:-2}
for i in $(seq "$runs"); do
  echo "rbd: HA drills, run $i of $runs"
  run -p tcmu-rbd-testkit --test alua_failover -- --ignored --test-threads=1 --nocapture
done
# The chaos soak, bounded: random faults (planned move, kill -9, SIGSTOP,
# OSD and mon restarts, blocklisting) under a writer whose every write is
# checked after each round. It stops the OSD and the mon, so it runs last.
cargo build -p tcmu-rbd-testkit --bins
# Each pump inside is bounded (tcmu-rbd-chaos fails a round that does not
# reach its goal); the timeout is the net for anything else.
timeout 1200 target/debug/tcmu-rbd-chaos --rounds "${CHAOS_ROUNDS:-30}" --top "$PWD" \
  --gw-sim target/debug/tcmu-rbd-gw-sim --log-dir target/tmp/chaos
# What the suite wrote to the OSD: the block file is sparse and never
# shrinks, so this is the cluster's share of the disk.
[ -e "$dir/osd.0/block" ] && echo "rbd: OSD block file holds $(du -h "$dir/osd.0/block" | cut -f1)"
echo "rbd: PASS"
