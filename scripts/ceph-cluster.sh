#!/usr/bin/env bash
# A Ceph micro cluster for tests and benchmarks: one mon and one bluestore
# OSD on a sparse file, cephx on, pool `rbd` (size 1, rbd-initialised), all
# of it (conf, keyrings, data, logs, pid files, sockets) under DIR.
#
#   scripts/ceph-cluster.sh start DIR   create and start; waits until the OSD
#                                       is up and the pool takes writes
#   scripts/ceph-cluster.sh stop DIR    kill every daemon and remove DIR
#   scripts/ceph-cluster.sh env DIR     print `export ...` lines for clients
#   scripts/ceph-cluster.sh kill-osd DIR / start-osd DIR
#                                       stop / restart the OSD (failure tests)
#   scripts/ceph-cluster.sh start-mgr DIR
#                                       add a mgr (service map tests)
#   scripts/ceph-cluster.sh ensure-mgr DIR
#                                       start-mgr unless one runs
#   scripts/ceph-cluster.sh restart-mon DIR
#                                       kill -9 the mon and start it again
#                                       (chaos soak); returns once it answers
#
# Environment:
#   CEPH_BIND_ADDR   address the daemons bind to (default 127.0.0.1)
#   CEPH_MON_PORT    mon msgr2 port; msgr1 is CEPH_MON_PORT+1 (default: the
#                    first base 13300, 13400, ... with no listener in
#                    base..base+99)
#   CEPH_OSD_PORTS   OSD port range (default base+10 - base+99)
#   CEPH_OSD_SIZE    sparse block file size (default 20G)
#   CEPH_WITH_MGR    1: also start a mgr (service daemons show in `ceph -s`)
#
# The ports are far from Ceph's defaults (3300/6789/6800+), so this runs
# beside a developer's own cluster. No mgr is needed for rbd I/O.
set -euo pipefail

die() { echo "ceph-cluster: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: $0 start|stop|env|kill-osd|start-osd|restart-mon|start-mgr|ensure-mgr DIR"
cmd=$1
dir=$2
case "$dir" in /*) ;; *) dir="$PWD/$dir" ;; esac

addr=${CEPH_BIND_ADDR:-127.0.0.1}

# The first block of 100 ports from 13300 up that nothing here (this host,
# or this network namespace) listens in: several clusters of test and bench
# runs can then live side by side. Only `start` needs ports; the other
# commands read them from DIR's ceph.conf.
free_port_block() {
  local base
  for base in $(seq 13300 100 16200); do
    if ! ss -Hltn | awk -v b="$base" '{n = split($4, a, ":"); p = a[n] + 0} p >= b && p < b + 100 {f = 1} END {exit !f}'; then
      echo "$base"
      return 0
    fi
  done
  return 1
}
if [ "$cmd" = start ] && [ -z "${CEPH_MON_PORT:-}" ]; then
  base=$(free_port_block) || die "no free port block in 13300-16299; set CEPH_MON_PORT and CEPH_OSD_PORTS"
  CEPH_MON_PORT=$base
  CEPH_OSD_PORTS=${CEPH_OSD_PORTS:-$((base + 10))-$((base + 99))}
fi
mon_port=${CEPH_MON_PORT:-13300}
mon_port1=$((mon_port + 1))
osd_ports=${CEPH_OSD_PORTS:-13310-13399}
osd_size=${CEPH_OSD_SIZE:-20G}
conf="$dir/ceph.conf"

ceph_() { timeout 60 ceph -c "$conf" "$@"; }

# The tail of every log in DIR, so a failed start says why.
logs_tail() {
  for f in "$dir"/log/*.log "$dir"/log/*.out; do
    [ -s "$f" ] || continue
    echo "----- tail of $f" >&2
    tail -n 25 "$f" >&2
  done
}

fail() {
  echo "ceph-cluster: $*" >&2
  logs_tail
  # A full disk is the one cause the logs cannot tell: the daemons cannot
  # write them.
  df -h "$dir" >&2 2>/dev/null || true
  exit 1
}

# Free space where DIR lives, in GiB (rounded down).
free_gib() {
  local at=$1
  while [ ! -d "$at" ]; do at=$(dirname "$at"); done
  df -Pk "$at" | awk 'NR == 2 {print int($4 / 1048576)}'
}

# Waits up to $1 seconds for "$2..." to succeed.
wait_for() {
  # A deadline on the clock, not a count of tries: one try can itself
  # take seconds (a CLI waiting on a mon that is not back yet), and
  # counting tries let a 30 s wait grow to half an hour.
  local secs=$1; shift
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt "$end" ] || return 1
    sleep 1
  done
}

# One poll of the cluster: short, so wait_for's deadline holds.
ceph_poll() { timeout 10 ceph -c "$conf" --connect-timeout 10 "$@"; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Up means this OSD process finished booting (its admin socket says
# active) and the mon has it up; the osdmap alone can be stale after a kill,
# since with one OSD no peer reports it down.
osd_up() {
  pid_alive "$dir/run/osd.0.pid" &&
    timeout 10 ceph --admin-daemon "$dir/run/osd.0.asok" status 2>/dev/null | grep -q '"state": "active"' &&
    ceph_poll osd dump 2>/dev/null | grep -q '^osd.0 up'
}

start_osd() {
  # Cleared first so a wait never sees the old daemon's pid.
  rm -f "$dir/run/osd.0.pid"
  ceph-osd -c "$conf" -i 0 >>"$dir/log/osd.0.out" 2>&1 ||
    fail "ceph-osd failed to start"
  wait_for 60 osd_up || fail "osd.0 is not up after 60 s"
}

start_mgr() {
  mkdir -p "$dir/mgr.x"
  [ -s "$dir/mgr.x/keyring" ] ||
    ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
      -o "$dir/mgr.x/keyring" || fail "cannot create the mgr key"
  ceph-mgr -c "$conf" -i x >>"$dir/log/mgr.x.out" 2>&1 || fail "ceph-mgr failed to start"
}

kill_daemon() {
  local pidf=$1 pid
  [ -s "$pidf" ] || return 0
  pid=$(cat "$pidf")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

do_start() {
  # ceph-mgr only runs on request (start-mgr, CEPH_WITH_MGR), but the
  # service-map test asks for it.
  for b in ceph-mon ceph-osd ceph-mgr ceph ceph-authtool monmaptool rbd; do
    command -v $b >/dev/null || missing=1
  done
  if [ "${missing:-0}" = 1 ]; then
    echo "ceph-cluster: installing ceph-mon ceph-osd ceph-mgr ceph-common" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 \
      ceph-mon ceph-osd ceph-mgr ceph-common >/dev/null
  fi
  [ ! -e "$dir/ceph.conf" ] || die "$dir already holds a cluster (stop it first)"
  # On a full disk the mon exits at once and cannot even write why (its
  # log and stderr are files there), so say it here. The OSD's sparse
  # block file fills as tests write: a few GiB for the test suite.
  local free need=${CEPH_MIN_FREE_GB:-3}
  free=$(free_gib "$dir")
  [ "$free" -ge "$need" ] ||
    die "only $free GiB free on the filesystem of $dir; a cluster needs $need GiB (CEPH_MIN_FREE_GB). Free some space: the mon does not start on a full disk."
  # mon.a must not exist before mkfs (it refuses a non-empty dir).
  mkdir -p "$dir"/{log,run,osd.0}
  local fsid osd_uuid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:$addr:$mon_port,v1:$addr:$mon_port1]
public addr = $addr
cluster addr = $addr
ms bind port min = ${osd_ports%-*}
ms bind port max = ${osd_ports#*-}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
# Nothing goes to syslog or /var/log.
log to syslog = false
err to syslog = false
clog to syslog = false
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon data avail warn = 2
mon data avail crit = 1
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false

[mon]
mon data = $dir/\$name
mon cluster log file = $dir/log/cluster.log

[mgr]
mgr data = $dir/\$name
keyring = $dir/\$name/keyring

[osd]
osd data = $dir/\$name
keyring = $dir/\$name/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $(numfmt --from=iec "$osd_size")
bluestore fsck on mount = false
osd memory target = 1073741824
# No journal-style warm-up: the OSD serves as soon as it is up.
osd op num shards = 2
osd op num threads per shard = 2

[client]
keyring = $dir/\$name.keyring
EOF

  # Keys: mon., client.admin (all caps) and client.tcmu (rbd profile; the
  # identity a gateway would use).
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. \
    --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$fsid" \
    --addv a "[v2:$addr:$mon_port,v1:$addr:$mon_port1]" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$dir/mon.keyring" \
    >>"$dir/log/mon.a.out" 2>&1 || fail "ceph-mon --mkfs failed"
  ceph-mon -c "$conf" -i a >>"$dir/log/mon.a.out" 2>&1 || fail "ceph-mon failed to start"
  wait_for 30 ceph_poll mon stat || fail "the mon does not answer after 30 s"

  # The OSD: id, key (mkfs needs it), mkfs on a sparse block file, start.
  local id
  id=$(ceph_ osd new "$osd_uuid") || fail "ceph osd new failed"
  [ "$id" = 0 ] || fail "expected osd id 0, got $id"
  ceph_ auth get-or-create osd.0 mon 'allow profile osd' mgr 'allow profile osd' \
    osd 'allow *' -o "$dir/osd.0/keyring" || fail "cannot create the OSD key"
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/osd.0.out" 2>&1 ||
    fail "ceph-osd --mkfs failed"
  start_osd

  if [ "${CEPH_WITH_MGR:-0}" = 1 ]; then
    start_mgr
  fi

  ceph_ osd pool create rbd 32 32 >/dev/null || fail "cannot create pool rbd"
  ceph_ osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
  timeout 120 rbd -c "$conf" pool init rbd || fail "rbd pool init failed"
  ceph_ auth get-or-create client.tcmu mon 'profile rbd' osd 'profile rbd' mgr 'profile rbd' \
    -o "$dir/client.tcmu.keyring" || fail "cannot create client.tcmu"
  # The pool takes writes: PGs are active (no mgr reports PG states, so
  # test it directly).
  echo probe >"$dir/probe"
  timeout 60 rados -c "$conf" -p rbd put probe "$dir/probe" ||
    fail "the pool does not take a write within 60 s"
  timeout 30 rados -c "$conf" -p rbd rm probe || true
  rm -f "$dir/probe"
  echo "ceph-cluster: up in $dir (mon $addr:$mon_port, $(ceph_ osd stat))"
}

do_stop() {
  [ -d "$dir" ] || return 0
  # Only the daemons whose pid files are in DIR.
  for p in "$dir"/run/*.pid; do
    [ -e "$p" ] && kill_daemon "$p"
  done
  [ -e "$dir/ceph.conf" ] || [ -d "$dir/run" ] || die "$dir does not look like a cluster dir; not removing it"
  rm -rf "$dir"
}

case "$cmd" in
  start) do_start ;;
  stop) do_stop ;;
  env)
    [ -e "$conf" ] || die "no cluster in $dir"
    echo "export CEPH_CONF=$conf"
    echo "export TCMU_RBD_TEST_CONF=$conf"
    echo "export TCMU_RBD_TEST_POOL=rbd"
    echo "export TCMU_RBD_TEST_DIR=$dir"
    ;;
  kill-osd)
    [ -s "$dir/run/osd.0.pid" ] || die "no OSD pid file in $dir"
    pid=$(cat "$dir/run/osd.0.pid")
    kill -9 "$pid"
    # Gone before returning, so an immediate start-osd does not see it.
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    ;;
  start-osd)
    [ -e "$conf" ] || die "no cluster in $dir"
    pid_alive "$dir/run/osd.0.pid" && die "osd.0 is already running"
    start_osd
    ;;
  restart-mon)
    [ -s "$dir/run/mon.a.pid" ] || die "no mon pid file in $dir"
    pid=$(cat "$dir/run/mon.a.pid")
    kill -9 "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    rm -f "$dir/run/mon.a.pid"
    ceph-mon -c "$conf" -i a >>"$dir/log/mon.a.out" 2>&1 || fail "ceph-mon failed to restart"
    wait_for 30 ceph_poll mon stat || fail "the mon does not answer 30 s after a restart"
    ;;
  start-mgr)
    [ -e "$conf" ] || die "no cluster in $dir"
    pid_alive "$dir/run/mgr.x.pid" && die "mgr.x is already running"
    start_mgr
    ;;
  ensure-mgr)
    [ -e "$conf" ] || die "no cluster in $dir"
    pid_alive "$dir/run/mgr.x.pid" || start_mgr
    ;;
  *) die "unknown command $cmd (start|stop|env|kill-osd|start-osd|restart-mon|start-mgr|ensure-mgr)" ;;
esac
