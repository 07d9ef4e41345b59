#!/bin/bash
# The VM stage's guest side. Runs inside the test guest (scripts/vm/init),
# chrooted into the host's / over 9p, so the host's fio, sg3-utils and the
# daemon binary run against Debian's kernel. Each check prints
# "PASS name" or "FAIL name: why" to the console and to /tmp/out/results;
# command output goes to /tmp/out/checks.log, the daemon's log to
# /tmp/out/daemon.log. The host (scripts/test-vm.sh) judges the results.
#
# /tmp/out/env (written by the host) sets:
#   BIN     the tcmu-rbd binary
#   TOP     the repository (systemd/ holds the D-Bus policy)
#   SUITES  which groups to run: local (file, ram, resize, removal,
#           restart), rbd (the same on an rbd image), compare (fio 4K QD32,
#           librbd direct vs tcmu-runner vs tcmu-rbd on one image, with
#           the CPU time of each)
#   CEPH_CONF_GUEST  the guest's ceph.conf (rbd, compare)
#   COMPARE_B_ENV, COMPARE_B_BIN, COMPARE_B_CONF  (optional) the compare
#     suite's tcmu-rbd-B (environment, binary, tcmu.conf lines)
#           side: the daemon with these VAR=value settings, or this binary
#   VM_SCALE_N, VM_SCALE_CYCLES, VM_SCALE_CYCLE_S  LUNs, create/remove
#           cycles and their time limit (scale)
#   VM_WG_N, VM_WG_FIO  images and fio-verified maps (wholegw)
set -u
OUT=/tmp/out
# shellcheck source=/dev/null
. "$OUT/env"
CFS=/sys/kernel/config
T=$CFS/target
LOG=$OUT/checks.log
DLOG=$OUT/daemon.log
S=/tmp/scratch
mkdir -p "$S"
cd "$S" || exit 1 # fio keeps state files in its working directory
exec 3>>"$OUT/results"
DPID=
DEV=
METRICS=127.0.0.1:9288
INITIATOR=naa.5001405000000001

say() { echo "vm-guest: $*"; }
pass() { echo "PASS $1"; echo "PASS $1" >&3; }
fail() { echo "FAIL $1: $2"; echo "FAIL $1: $2" >&3; }

# check NAME FUNC ARGS...: one named check. FUNC runs in this shell with
# its output in checks.log; on failure it leaves the reason in $why.
check() {
  local name=$1 rc
  shift
  why=
  echo "=== $name ($(date +%T))" >>"$LOG"
  "$@" >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then pass "$name"; else fail "$name" "${why:-exit status $rc}"; fi
  return $rc
}
# check_dev NAME FUNC ARGS...: a check that needs the exported disk.
check_dev() {
  if [ -z "$DEV" ] || [ ! -b "/dev/$DEV" ]; then
    fail "$1" "not run: no disk exported"
    return 1
  fi
  check "$@"
}
# ok CMD...: run CMD; on failure record it as the reason.
ok() {
  "$@" && return 0
  why="failed ($?): $*"
  return 1
}
# expect WHAT ACTUAL WANTED
expect() {
  [ "$2" = "$3" ] && return 0
  why="$1: got '$2', want '$3'"
  return 1
}
# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds or
# SECONDS (wall clock) pass.
wait_for() {
  local end=$((SECONDS + $1))
  shift
  until "$@" 2>/dev/null; do
    [ $SECONDS -ge $end ] && return 1
    sleep 0.2
  done
}

daemon_alive() { [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null; }
start_daemon() {
  echo "--- daemon start $(date +%T)" >>"$DLOG"
  # Netlink on (the kernel's add/remove/reconfigure events, with replies);
  # no D-Bus in this guest.
  local dbus=--no-dbus
  [ "${DAEMON_DBUS:-0}" = 1 ] && dbus=
  # The Prometheus endpoint on loopback (t_metrics scrapes it).
  ip link set lo up 2>/dev/null || busybox ip link set lo up
  echo "metrics_listen = $METRICS" >"$S/tcmu.conf"
  # DAEMON_CONF: more tcmu.conf lines for this start, separated by ';'.
  [ -n "${DAEMON_CONF:-}" ] && tr ';' '\n' <<<"$DAEMON_CONF" >>"$S/tcmu.conf"
  # DAEMON_ENV (VAR=value ...) and DAEMON_BIN: another environment or
  # binary for this start (the compare suite's B side).
  local denv
  read -ra denv <<<"${DAEMON_ENV:-}"
  env ${denv[@]+"${denv[@]}"} NO_COLOR=1 "${DAEMON_BIN:-$BIN}" --log-stderr $dbus --run-dir /run/tcmu-rbd -c "$S/tcmu.conf" >>"$DLOG" 2>&1 &
  DPID=$!
  # Ready: it has scanned the devices that exist and listens to netlink.
  wait_for 20 sh -c "sed -n '/^--- daemon start/h; /^--- daemon start/!H; \${x;p}' '$DLOG' | grep -q ' ready '" ||
    { why="daemon did not log 'ready' within 20 s"; return 1; }
  daemon_alive
}

# uio_of NAME: the uioN the kernel made for backstore NAME.
uio_of() {
  local f
  for f in /sys/class/uio/uio*/name; do
    [ -e "$f" ] || continue
    case "$(cat "$f")" in tcm-user/*/"$1"/*) basename "$(dirname "$f")"; return 0 ;; esac
  done
  return 1
}
# served NAME: the daemon holds NAME's /dev/uioN open.
served() {
  local u
  u=$(uio_of "$1") || return 1
  daemon_alive || return 1
  ls -l /proc/"$DPID"/fd 2>/dev/null | grep -q "/dev/$u\$"
}

# bs_dir NAME: backstore NAME's configfs directory (targetcli may put it
# under another user_N HBA than user_0).
bs_dir() {
  local d
  for d in "$T"/core/user_*/"$1"; do
    [ -d "$d" ] && { echo "$d"; return 0; }
  done
  echo "$T/core/user_0/$1"
}
# mk_backstore NAME SUBTYPE CFG SIZE [CONTROL]: a user:SUBTYPE backstore
# (CONTROL: more control options, ",opt=val,..."), enabled, then waits for
# the daemon to serve it.
mk_backstore() {
  local d=$T/core/user_0/$1
  ok mkdir -p "$d" || return 1
  ok sh -c "echo -n 'dev_size=$4,dev_config=$2/$3,hw_max_sectors=1024${5:-}' > $d/control" || return 1
  # Like targetcli: the unit serial is set before the LUN is exported.
  ok sh -c "echo -n '$(cat /proc/sys/kernel/random/uuid)' > $d/wwn/vpd_unit_serial" || return 1
  ok sh -c "echo -n 1 > $d/enable" || return 1
  if ! wait_for 20 served "$1"; then
    why="daemon did not open $1's uio device within 20 s"
    return 1
  fi
}
# has_disk H: SCSI host H's LUN 0 has a block device.
has_disk() {
  local b
  for b in /sys/class/scsi_disk/"$1":0:1:0/device/block/sd*; do
    [ -e "$b" ] && return 0
  done
  return 1
}
# mk_loop NAME WWN: export backstore NAME through a tcm_loop target and
# wait for its disk; sets DEV (sdX).
mk_loop() {
  local tp=$T/loopback/$2/tpgt_1 h
  ok mkdir -p "$tp/lun/lun_0" || return 1
  ok sh -c "echo -n $INITIATOR > $tp/nexus" || return 1
  ok ln -s "$(bs_dir "$1")" "$tp/lun/lun_0/$1" || return 1
  h=$(cut -d: -f1 "$tp/address") || { why="no tcm_loop address"; return 1; }
  if ! wait_for 40 has_disk "$h"; then
    why="no disk appeared on scsi host $h within 40 s"
    return 1
  fi
  DEV=$(basename /sys/class/scsi_disk/"$h":0:1:0/device/block/sd*)
  if ! wait_for 10 test -b "/dev/$DEV"; then
    # devtmpfs can lose a node whose name was just freed by a removed disk
    # (deferred delete of the old node after the create of the new one).
    echo "/dev/$DEV missing after 10 s; creating it from /sys/block/$DEV/dev"
    mknod "/dev/$DEV" b $(tr : ' ' <"/sys/block/$DEV/dev") || test -b "/dev/$DEV" ||
      { why="no /dev/$DEV"; return 1; }
  fi
  echo "$1 is /dev/$DEV"
}
rm_loop() {
  local tp=$T/loopback/$2/tpgt_1
  ok timeout 60 rm "$tp/lun/lun_0/$1" || return 1
  ok timeout 30 rmdir "$tp/lun/lun_0" "$tp" "$T/loopback/$2"
}
rm_backstore() { ok timeout 60 rmdir "$(bs_dir "$1")"; }

# --- I/O checks -------------------------------------------------------
t_dd() {
  head -c 4M /dev/urandom >"$S/pat" || return 1
  ok dd if="$S/pat" of="/dev/$DEV" bs=1M seek=3 oflag=direct conv=fsync status=none || return 1
  ok dd if="/dev/$DEV" of="$S/back" bs=1M skip=3 count=4 iflag=direct status=none || return 1
  ok cmp "$S/pat" "$S/back"
}
t_fio() { # BS SIZE
  ok timeout 600 fio --name="verify-$1" --filename="/dev/$DEV" --direct=1 --ioengine=libaio \
    --iodepth=16 --rw=randwrite --bs="$1" --size="$2" --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --randrepeat=0 --norandommap=0 --group_reporting
}

# --- SCSI checks (sg3-utils) -------------------------------------------
t_inq_std() {
  local o
  o=$(sg_inq "/dev/$DEV") || { why="sg_inq failed"; return 1; }
  echo "$o"
  echo "$o" | grep -q "Vendor identification: LIO-ORG" || { why="vendor is not LIO-ORG"; return 1; }
  echo "$o" | grep -q "Peripheral device type: disk" || { why="not a disk"; return 1; }
}
t_vpd_pages() {
  local o p
  o=$(sg_inq -p 0x00 "/dev/$DEV") || { why="VPD 0x00 failed"; return 1; }
  echo "$o"
  for p in 0x80 0x83 0xb0 0xb1 0xb2; do
    echo "$o" | grep -qi "\[$p\]\|$p" || { why="page $p not listed in VPD 0x00"; return 1; }
    sg_inq -p "$p" "/dev/$DEV" || { why="VPD page $p failed"; return 1; }
  done
}
t_vpd_serial() {
  local o want
  want=$(sed 's/.*: *//' "$(bs_dir "$1")/wwn/vpd_unit_serial")
  o=$(sg_vpd -p sn "/dev/$DEV") || { why="sg_vpd -p sn failed"; return 1; }
  echo "$o"
  echo "$o" | grep -q "Unit serial number: $want" || { why="serial is not the configfs one ($want)"; return 1; }
}
t_vpd_devid() {
  local o
  o=$(sg_vpd -p di "/dev/$DEV") || { why="sg_vpd -p di failed"; return 1; }
  echo "$o"
  echo "$o" | grep -q "NAA" || { why="no NAA designator"; return 1; }
}
t_readcap() { # SIZE
  local o
  o=$(sg_readcap -l "/dev/$DEV") || { why="sg_readcap -l failed"; return 1; }
  echo "$o"
  echo "$o" | grep -q "Logical block length=512 bytes" || { why="block length is not 512"; return 1; }
  echo "$o" | grep -q "Last LBA=$(($1 / 512 - 1)) " || { why="last LBA is not $(($1 / 512 - 1))"; return 1; }
  echo "$o" | grep -q "lbpme=1" || { why="LBPME not set"; return 1; }
  echo "$o" | grep -q "lbprz=1" || { why="LBPRZ not set"; return 1; }
}
t_vpd_bl() {
  local o n
  o=$(sg_vpd -p bl "/dev/$DEV") || { why="sg_vpd -p bl failed"; return 1; }
  echo "$o"
  n=$(echo "$o" | sed -n 's/.*Maximum unmap LBA count: *\([0-9]*\).*/\1/p')
  [ -n "$n" ] && [ "$n" -gt 0 ] || { why="maximum unmap LBA count is '${n}'"; return 1; }
}
t_vpd_lbpv() {
  local o
  o=$(sg_vpd -p lbpv "/dev/$DEV") || { why="sg_vpd -p lbpv failed"; return 1; }
  echo "$o"
  echo "$o" | grep -q "Unmap command supported (LBPU): 1" || { why="LBPU not set"; return 1; }
}
# zeros_at LBA N: the N blocks at LBA read back as zeros.
zeros_at() {
  dd if="/dev/$DEV" bs=$(($2 * 512)) skip=$(($1 * 512)) count=1 iflag=direct,skip_bytes status=none >"$S/z" || return 1
  cmp -n $(($2 * 512)) "$S/z" /dev/zero
}
write_pat() { # LBA N
  head -c $(($2 * 512)) /dev/urandom >"$S/wp"
  dd if="$S/wp" of="/dev/$DEV" bs=$(($2 * 512)) seek=$(($1 * 512)) oflag=direct,seek_bytes conv=fsync status=none
}
t_unmap() {
  ok write_pat 2048 256 || return 1
  if zeros_at 2048 256; then why="pattern did not land"; return 1; fi
  ok sg_unmap --force --lba=2048 --num=256 "/dev/$DEV" || return 1
  zeros_at 2048 256 || { why="unmapped range does not read zeros"; return 1; }
}
t_write_same() {
  head -c 512 /dev/urandom >"$S/blk"
  ok sg_write_same --16 --in="$S/blk" --lba=4096 --num=64 "/dev/$DEV" || return 1
  # 64 copies by doubling (a process per copy costs seconds under emulation).
  cp "$S/blk" "$S/ws_want"
  for _ in 1 2 3 4 5 6; do cat "$S/ws_want" "$S/ws_want" >"$S/ws_2" && mv "$S/ws_2" "$S/ws_want"; done
  ok dd if="/dev/$DEV" of="$S/ws_got" bs=32k skip=$((4096 * 512)) count=1 iflag=direct,skip_bytes status=none || return 1
  ok cmp "$S/ws_want" "$S/ws_got"
}
t_caw() {
  local rc
  ok write_pat 8192 1 || return 1
  cp "$S/wp" "$S/old"
  head -c 512 /dev/urandom >"$S/new"
  cat "$S/old" "$S/new" >"$S/cw"
  ok sg_compare_and_write --in="$S/cw" --lba=8192 --num=1 "/dev/$DEV" || return 1
  ok dd if="/dev/$DEV" of="$S/got" bs=512 skip=8192 count=1 iflag=direct status=none || return 1
  cmp "$S/new" "$S/got" || { why="CAW success did not write the new data"; return 1; }
  # Miscompare: the compare half no longer matches ("old" was replaced).
  head -c 512 /dev/urandom >"$S/other"
  cat "$S/old" "$S/other" >"$S/cw2"
  sg_compare_and_write --in="$S/cw2" --lba=8192 --num=1 "/dev/$DEV"
  rc=$?
  [ $rc -eq 14 ] || { why="miscompare: sg_compare_and_write exit $rc, want 14 (MISCOMPARE)"; return 1; }
  ok dd if="/dev/$DEV" of="$S/got" bs=512 skip=8192 count=1 iflag=direct status=none || return 1
  cmp "$S/new" "$S/got" || { why="a miscompared CAW changed the block"; return 1; }
}
# lba_is LBA N STATUS: GET LBA STATUS from LBA answers a first descriptor
# that starts at LBA, covers at least N blocks and has STATUS (0 mapped or
# unknown, 1 deallocated).
lba_is() {
  local o d_lba d_n d_st
  o=$(sg_get_lba_status --brief --maxlen=1024 --lba="$1" "/dev/$DEV") || { why="sg_get_lba_status --lba=$1 failed"; return 1; }
  echo "$o"
  # Descriptor lines (0x<lba>  0x<blocks>  <status>  <additional>) follow
  # the completion condition and RTP lines.
  read -r d_lba d_n d_st _ <<<"$(echo "$o" | grep -m 1 '^0x')"
  [ -n "$d_st" ] || { why="no descriptor"; return 1; }
  [ $((d_lba)) -eq "$1" ] || { why="first descriptor at $d_lba, not $1"; return 1; }
  [ $((d_n)) -ge "$2" ] || { why="first descriptor covers $((d_n)) blocks, fewer than $2"; return 1; }
  [ "$d_st" = "$3" ] || { why="status $d_st at $1, want $3"; return 1; }
}
# The GET LBA STATUS checks of a LUN that tells allocation apart, on N
# blocks at LBA (whole allocation units of its backend: fs blocks, rbd
# objects), untouched until then: deallocated, mapped once written,
# deallocated after UNMAP, and again after WRITE SAME with UNMAP (which
# must also read back as zeros).
lba_checks() { # PREFIX LBA N
  check_dev "$1.lba_status_fresh" lba_is "$2" "$3" 1
  check_dev "$1.lba_status_written" t_lba_written "$2" "$3"
  check_dev "$1.lba_status_unmap" t_lba_unmap "$2" "$3"
  check_dev "$1.lba_status_write_same_unmap" t_lba_write_same "$2" "$3"
}
t_lba_written() {
  ok write_pat "$1" "$2" || return 1
  lba_is "$1" "$2" 0
}
t_lba_unmap() {
  ok sg_unmap --force --lba="$1" --num="$2" "/dev/$DEV" || return 1
  lba_is "$1" "$2" 1
}
t_lba_write_same() {
  ok write_pat "$1" "$2" || return 1
  lba_is "$1" "$2" 0 || return 1
  # No --in: the block written is zeros.
  ok sg_write_same --16 --unmap --lba="$1" --num="$2" "/dev/$DEV" || return 1
  lba_is "$1" "$2" 1 || return 1
  zeros_at "$1" "$2" || { why="deallocated range does not read zeros"; return 1; }
}
t_blkdiscard() {
  ok write_pat 20480 2048 || return 1
  ok blkdiscard -o $((20480 * 512)) -l $((2048 * 512)) "/dev/$DEV" || return 1
  zeros_at 20480 2048 || { why="discarded range does not read zeros"; return 1; }
}
t_sd_thin() {
  local q=/sys/block/$DEV/queue m
  m=$(cat /sys/block/"$DEV"/device/scsi_disk/*/provisioning_mode)
  echo "discard_max_bytes=$(cat $q/discard_max_bytes) provisioning_mode=$m"
  [ "$(cat $q/discard_max_bytes)" -gt 0 ] || { why="discard_max_bytes is 0"; return 1; }
  expect provisioning_mode "$m" unmap
}
t_sd_cache() { # WANT ("write back" / "write through")
  expect cache_type "$(cat /sys/block/"$DEV"/device/scsi_disk/*/cache_type)" "$1"
}

# suite NAME SUBTYPE CFG SIZE WWN CACHE: a backstore through tcm_loop, every
# I/O and SCSI check on it. Leaves it exported (DEV set).
suite() {
  local n=$1
  check "$n.create" mk_backstore "$1" "$2" "$3" "$4" || return 1
  check "$n.export" mk_loop "$1" "$5" || DEV=
  check_dev "$n.dd_pattern" t_dd
  # Sizes keep each run to seconds under emulation; every block written is
  # read back and checked (crc32c header per block).
  check_dev "$n.fio_verify_4k" t_fio 4k 4m
  check_dev "$n.fio_verify_64k" t_fio 64k 16m
  check_dev "$n.sg_inq_std" t_inq_std
  check_dev "$n.sg_inq_vpd_pages" t_vpd_pages
  check_dev "$n.vpd_serial" t_vpd_serial "$1"
  check_dev "$n.vpd_devid" t_vpd_devid
  check_dev "$n.sg_readcap" t_readcap "$4"
  check_dev "$n.vpd_block_limits" t_vpd_bl
  check_dev "$n.vpd_lbpv" t_vpd_lbpv
  check_dev "$n.sg_unmap" t_unmap
  check_dev "$n.sg_write_same" t_write_same
  check_dev "$n.sg_compare_and_write" t_caw
  check_dev "$n.sg_sync" ok sg_sync "/dev/$DEV"
  check_dev "$n.blkdiscard" t_blkdiscard
  check_dev "$n.sd_thin_provisioning" t_sd_thin
  case $2 in
    # 1 MiB at 195 MiB, beyond what the checks above write.
    file) lba_checks "$n" 400000 2048 ;;
    # The store cannot tell: every block "mapped or unknown".
    ram) check_dev "$n.lba_status_unknown" lba_is 0 1 0 ;;
  esac
  check_dev "$n.sd_write_cache" t_sd_cache "$6"
  if [ "$2" = rbd ]; then
    check_dev "$n.persistent_reservations_refused" t_pr refused
  else
    check_dev "$n.persistent_reservations_kept" t_pr kept
  fi
  check "$n.daemon_alive" ok daemon_alive
}

# Persistent reservations: the kernel keeps them for single-gateway LUNs
# (file, ram); a LUN gated on an rbd exclusive lock refuses them (tcmu.conf
# ha_pr), since each gateway's kernel would keep its own. sg_persist exits
# 9 for ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
t_pr() { # kept|refused
  local out rc
  out=$(sg_persist --out --register --param-sark=0x7e57 "/dev/$DEV" 2>&1)
  rc=$?
  echo "register: exit $rc: $out"
  if [ "$1" = kept ]; then
    [ $rc -eq 0 ] || { why="PERSISTENT RESERVE OUT REGISTER failed ($rc): $out"; return 1; }
    out=$(sg_persist --in --read-keys "/dev/$DEV" 2>&1)
    echo "$out"
    echo "$out" | grep -q 0x7e57 || { why="the registered key is not listed: $out"; return 1; }
    ok sg_persist --out --register --param-rk=0x7e57 --param-sark=0 "/dev/$DEV"
    return
  fi
  [ $rc -eq 9 ] || { why="REGISTER on an HA LUN: exit $rc, want 9 (invalid opcode): $out"; return 1; }
  out=$(sg_persist --in --read-keys "/dev/$DEV" 2>&1)
  rc=$?
  echo "read keys: exit $rc: $out"
  [ $rc -eq 9 ] || { why="READ KEYS on an HA LUN: exit $rc, want 9 (invalid opcode): $out"; return 1; }
}

# --- lifecycle checks ----------------------------------------------------
t_resize() { # NAME NEWSIZE
  local d=$T/core/user_0/$1 got
  # As an admin (or ceph-iscsi) resizes: the kernel sends the daemon a
  # netlink RECONFIG with the new size and waits for its reply.
  ok sh -c "echo -n $2 > $d/attrib/dev_size" || return 1
  ok expect attrib/dev_size "$(cat "$d/attrib/dev_size")" "$2" || return 1
  # The initiator is told by a unit attention; a rescan reads the capacity.
  wait_for 20 sh -c "echo 1 > /sys/block/$DEV/device/rescan; [ \$(( \$(cat /sys/block/$DEV/size) * 512 )) -eq $2 ]" ||
    { why="capacity is $(($(cat /sys/block/"$DEV"/size) * 512)), want $2"; return 1; }
  # The new end is usable.
  ok dd if=/dev/urandom of="/dev/$DEV" bs=512 seek=$(($2 / 512 - 8)) count=8 oflag=direct status=none
}
t_remove_idle() { # NAME WWN
  local u
  u=$(uio_of "$1") || { why="no uio device for $1"; return 1; }
  rm_loop "$1" "$2" || return 1
  rm_backstore "$1" || return 1
  wait_for 10 sh -c "! ls -l /proc/$DPID/fd | grep -q '/dev/$u\$'" ||
    { why="daemon still holds /dev/$u of the removed $1"; return 1; }
  ok daemon_alive
}
t_remove_busy() { # NAME WWN
  local fpid rc
  timeout 120 fio --name=busy --filename="/dev/$DEV" --direct=1 --ioengine=libaio --iodepth=32 \
    --rw=randrw --bs=4k --size=32m --time_based --runtime=60 >"$S/busy.out" 2>&1 &
  fpid=$!
  sleep 3
  kill -0 $fpid || { why="fio did not start"; cat "$S/busy.out"; return 1; }
  rm_loop "$1" "$2" || return 1
  rm_backstore "$1" || return 1
  # fio sees errors (its disk is gone) but must finish, not hang.
  wait_for 60 sh -c "! kill -0 $fpid" || { why="fio still hung 60 s after removal"; return 1; }
  wait $fpid
  rc=$?
  echo "fio exit $rc (errors are expected: its disk was removed)"
  ok daemon_alive
}
# t_metrics NAME: the Prometheus endpoint while fio runs on NAME's disk:
# its read and write counters move, `promtool check metrics` accepts the
# output, and `tcmu-rbd status` shows IOPS over its interval.
metric() { # FILE SERIES: the value of SERIES in a scrape
  awk -v s="$2" '$1 == s {print $2}' "$1"
}
t_metrics() {
  local fpid r0 r1 w0 w1 url=http://$METRICS/metrics
  ok curl -sf --max-time 5 -o "$S/m0" "$url" || return 1
  timeout 60 fio --name=metrics --filename="/dev/$DEV" --direct=1 --ioengine=libaio --iodepth=16 \
    --rw=randrw --bs=4k --size=32m --time_based --runtime=8 >"$S/mfio.out" 2>&1 &
  fpid=$!
  sleep 4
  ok curl -sf --max-time 5 -o "$S/m1" "$url" || { kill $fpid; return 1; }
  "$BIN" status --run-dir /run/tcmu-rbd --interval 1 >"$S/mstatus" || { why="tcmu-rbd status failed"; kill $fpid; return 1; }
  wait $fpid || { why="fio failed"; cat "$S/mfio.out"; return 1; }
  r0=$(metric "$S/m0" "tcmu_rbd_reads_total{device=\"$1\"}")
  r1=$(metric "$S/m1" "tcmu_rbd_reads_total{device=\"$1\"}")
  w0=$(metric "$S/m0" "tcmu_rbd_writes_total{device=\"$1\"}")
  w1=$(metric "$S/m1" "tcmu_rbd_writes_total{device=\"$1\"}")
  echo "during fio: reads $r0 -> $r1, writes $w0 -> $w1"
  grep "device $1 " "$S/mstatus"
  [ -n "$r0" ] && [ -n "$r1" ] && [ "${r1%.*}" -gt $((${r0%.*} + 100)) ] ||
    { why="reads_total did not move during fio ($r0 -> $r1)"; return 1; }
  [ -n "$w0" ] && [ -n "$w1" ] && [ "${w1%.*}" -gt $((${w0%.*} + 100)) ] ||
    { why="writes_total did not move during fio ($w0 -> $w1)"; return 1; }
  grep -q "tcmu_rbd_command_duration_seconds_bucket{device=\"$1\",le=" "$S/m1" ||
    { why="no latency histogram for $1"; return 1; }
  promtool check metrics <"$S/m1" || { why="promtool check metrics refused the output"; return 1; }
  grep "device $1 " "$S/mstatus" | grep -qE " iops=[1-9][0-9]* p50=[0-9.]+(us|ms|s) p99=" ||
    { why="tcmu-rbd status shows no IOPS/latency for $1"; return 1; }
}
t_restart() { # NAME
  local wpid rc
  head -c 8M /dev/urandom >"$S/rs"
  kill -9 "$DPID"
  wait "$DPID" 2>/dev/null
  # I/O issued while no daemon runs waits in the ring...
  dd if="$S/rs" of="/dev/$DEV" bs=1M seek=8 oflag=direct conv=fsync status=none &
  wpid=$!
  sleep 2
  kill -0 $wpid 2>/dev/null || { why="a write completed while no daemon ran"; return 1; }
  ok start_daemon || return 1
  wait_for 20 served "$1" || { why="restarted daemon did not pick $1 up"; return 1; }
  # ...and completes once the new daemon resets the ring (BUSY, retried).
  wait_for 60 sh -c "! kill -0 $wpid" || { why="write still stuck 60 s after restart"; return 1; }
  wait $wpid
  rc=$?
  [ $rc -eq 0 ] || { why="write across the restart failed (dd exit $rc)"; return 1; }
  ok dd if="/dev/$DEV" of="$S/rs_back" bs=1M skip=8 count=8 iflag=direct status=none || return 1
  ok cmp "$S/rs" "$S/rs_back" || return 1
  ok t_dd
}

suite_local() {
  suite file file "$S/file0.img" $((256 << 20)) naa.5001405000000010 "write back"
  check_dev file.resize t_resize file $((384 << 20))
  check_dev file.daemon_restart t_restart file
  check_dev file.remove_idle t_remove_idle file naa.5001405000000010
  suite ram ram - $((128 << 20)) naa.5001405000000020 "write through"
  check_dev ram.metrics t_metrics ram
  check_dev ram.remove_busy t_remove_busy ram naa.5001405000000020
  check daemon_alive_at_end ok daemon_alive
}

# --- rbd -------------------------------------------------------------------
rbd_cli() { timeout 120 rbd -c "$CEPH_CONF_GUEST" --id admin "$@"; }
t_rbd_pattern() {
  # Left at 64 MiB, which no other check touches; the host reads the image
  # back with rbd export after the run and compares.
  head -c 4M /dev/urandom >"$OUT/rbd_pattern" || return 1
  ok dd if="$OUT/rbd_pattern" of="/dev/$DEV" bs=1M seek=64 oflag=direct conv=fsync status=none || return 1
  ok dd if="/dev/$DEV" of="$S/rp" bs=1M skip=64 count=4 iflag=direct status=none || return 1
  ok cmp "$OUT/rbd_pattern" "$S/rp" || return 1
  echo $((64 << 20)) >"$OUT/rbd_pattern_offset"
}
# t_rbd_merge NAME: 4 MiB direct writes and reads, which the block layer
# splits into 512 KiB commands (hw_max_sectors=1024) queued together,
# read back right, and the daemon served some of those commands through
# merged librbd operations (its merged-commands counter moved).
t_rbd_merge() {
  local url=http://$METRICS/metrics m0 m1 s="tcmu_rbd_merged_commands_total{device=\"$1\"}"
  ok curl -sf --max-time 5 -o "$S/mg0" "$url" || return 1
  head -c 16M /dev/urandom >"$S/mg" || return 1
  ok dd if="$S/mg" of="/dev/$DEV" bs=4M seek=20 oflag=direct status=none || return 1
  ok dd if="/dev/$DEV" of="$S/mg_back" bs=4M skip=20 count=4 iflag=direct status=none || return 1
  ok cmp "$S/mg" "$S/mg_back" || return 1
  ok curl -sf --max-time 5 -o "$S/mg1" "$url" || return 1
  m0=$(metric "$S/mg0" "$s")
  m1=$(metric "$S/mg1" "$s")
  echo "merged commands: $m0 -> $m1 (of 64 commands of 512 KiB)"
  [ -n "$m0" ] && [ -n "$m1" ] && [ "${m1%.*}" -gt "${m0%.*}" ] ||
    { why="no command of the 4 MiB I/Os was merged ($s: $m0 -> $m1)"; return 1; }
}
t_rbd_resize() { # NAME IMAGE NEWSIZE
  ok rbd_cli resize --size "$(($3 >> 20))M" "$2" || return 1
  t_resize "$1" "$3"
}
suite_rbd() {
  local cfg="rbd/img0;conf=$CEPH_CONF_GUEST;id=admin" sz=$((256 << 20))
  check rbd.cluster_reachable ok rbd_cli info rbd/img0 || return 1
  suite rbd rbd "$cfg" $sz naa.5001405000000030 "write through"
  check_dev rbd.export_pattern t_rbd_pattern
  check_dev rbd.merge t_rbd_merge rbd
  check_dev rbd.resize t_rbd_resize rbd rbd/img0 $((320 << 20))
  check_dev rbd.daemon_restart t_restart rbd
  check_dev rbd.remove_busy t_remove_busy rbd naa.5001405000000030
}

# --- targetcli through the daemon's D-Bus service --------------------------
start_dbus() {
  mkdir -p /run/dbus
  # Debian's system bus default policy (deny owning names and calling
  # methods), plus only the project's own policy file: the daemon gets its
  # name through that file, not through another package's (tcmu-runner's
  # policy in /etc/dbus-1/system.d is not read).
  cat >"$S/system-bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <user>messagebus</user>
  <fork/>
  <pidfile>/run/dbus/pid</pidfile>
  <auth>EXTERNAL</auth>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>$TOP/systemd/org.kernel.TCMUService1.conf</include>
</busconfig>
EOF
  dbus-daemon --config-file="$S/system-bus.conf" --print-pid >"$S/dbus.pid" 2>>"$OUT/dbus.log" || return 1
  wait_for 10 test -S /run/dbus/system_bus_socket
}
tcli() { HOME=/tmp timeout 120 targetcli "$@"; }
on_bus() {
  dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus.NameHasOwner string:org.kernel.TCMUService1 | grep -q "boolean true"
}
t_tcli_handlers() {
  local o
  o=$(tcli ls /backstores 2>&1)
  echo "$o"
  echo "$o" | grep -q "user:rbd" || { why="targetcli does not list user:rbd"; return 1; }
}
t_tcli_create() { # CFG
  local o
  o=$(tcli /backstores/user:rbd create name=disk0 size=1G "cfgstring=$1" 2>&1)
  echo "$o"
  echo "$o" | grep -q "Created user-backed storage object disk0" ||
    { why="targetcli did not create disk0: $(echo "$o" | tail -1)"; return 1; }
  wait_for 20 served disk0 || { why="daemon does not serve disk0"; return 1; }
}
t_tcli_bad() { # CFG
  local o want
  # What the daemon says about this config string is what targetcli shows.
  want=$("$BIN" check-config "rbd/$1" 2>&1)
  [ -n "$want" ] || { why="check-config gave no message for rbd/$1"; return 1; }
  o=$(tcli /backstores/user:rbd create name=bad0 size=1G "cfgstring=$1" 2>&1)
  echo "$o"
  echo "$o" | grep -qF "$want" || { why="targetcli output lacks the daemon's message '$want'"; return 1; }
  [ ! -e "$(bs_dir bad0)" ] || { why="a backstore was created for a bad cfgstring"; return 1; }
}
suite_targetcli() {
  local cfg="rbd/tcli;conf=$CEPH_CONF_GUEST;id=admin" w=naa.5001405000000050
  check targetcli.dbus_daemon start_dbus || return 1
  # The daemon again, now on the system bus.
  check targetcli.daemon_stop stop_daemon || return 1
  DAEMON_DBUS=1 check targetcli.daemon_start start_daemon || return 1
  wait_for 20 on_bus || { fail targetcli.bus_name "org.kernel.TCMUService1 not on the bus after 20 s"; return 1; }
  tcli set global auto_save_on_exit=false >>"$LOG" 2>&1
  check targetcli.handlers_listed t_tcli_handlers || return 1
  check targetcli.bad_cfgstring_refused t_tcli_bad "rbd/tcli;bogus=1"
  check targetcli.create t_tcli_create "$cfg" || return 1
  if check targetcli.export mk_loop disk0 $w; then
    check_dev targetcli.dd_pattern t_dd
  fi
  rm_loop disk0 $w >>"$LOG" 2>&1
  check targetcli.delete ok tcli /backstores/user:rbd delete disk0
}

# --- comparison: librbd direct, tcmu-runner, tcmu-rbd ----------------------
# CPU time is read from /proc with shell builtins only (no process is
# started to take it), in clock ticks (USER_HZ).
# proc_times PID: "UTIME STIME" of process PID, every thread's (librbd's
# included, exited ones too), or "0 0" without one.
proc_times() {
  local line
  if [ -n "${1:-}" ] && read -r line 2>/dev/null <"/proc/$1/stat"; then
    # Fields after "(comm) ": state is the 1st, utime the 12th, stime the 13th.
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- ${line##*) }
    echo "${12} ${13}"
  else
    echo "0 0"
  fi
}
# fio_pid PARENT: a running fio process whose parent is PARENT (a pid, or
# "fio": fio's forked job process).
fio_pid() {
  local d c pc line want=$1
  for d in /proc/[0-9]*; do
    read -r c 2>/dev/null <"$d/comm" || continue
    [ "$c" = fio ] || continue
    read -r line 2>/dev/null <"$d/stat" || continue
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- ${line##*) }
    if [ "$want" = fio ]; then
      read -r pc 2>/dev/null <"/proc/$2/comm" && [ "$pc" = fio ] && { echo "${d#/proc/}"; return 0; }
    elif [ "$2" = "$want" ]; then
      echo "${d#/proc/}"
      return 0
    fi
  done
  return 1
}
# has_thread PID PREFIX: PID has a thread whose name starts with PREFIX.
has_thread() {
  local t c
  for t in /proc/"$1"/task/*/comm; do
    read -r c 2>/dev/null <"$t" && [[ $c == "$2"* ]] && return 0
  done
  return 1
}
# cpu_snap SERVING_PID FIO_PID DEV: the guest's uptime, its non-idle CPU
# time from /proc/stat (user nice system irq softirq steal) and the kernel
# part of it (system irq softirq), the serving process's and fio's job
# process's utime and stime, the I/Os DEV completed (/sys/block), and
# each thread of the serving process.
cpu_snap() {
  local up _r _c u n s _i _w q sq st line t comm spid=$1
  read -r up _r </proc/uptime
  read -r _c u n s _i _w q sq st _r </proc/stat
  echo "uptime $up"
  echo "guest $((u + n + s + q + sq + st)) $((s + q + sq))"
  echo "serving $(proc_times "$1")"
  echo "fio $(proc_times "$2")"
  if [ -n "$3" ] && read -r line <"/sys/block/$3/stat"; then
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- $line
    # Requests and sectors done: a large I/O is several requests once
    # the block layer splits it, so I/Os are counted in sectors.
    echo "dev $(($1 + $5)) $(($3 + $7))"
  fi
  [ -n "$spid" ] || return 0
  for t in /proc/"$spid"/task/*; do
    read -r comm 2>/dev/null <"$t/comm" && read -r line 2>/dev/null <"$t/stat" || continue
    # shellcheck disable=SC2086 # split into fields on purpose
    set -- ${line##*) }
    echo "task ${comm// /_} ${12} ${13}"
  done
}
# bench_fio LABEL ROUND [FIO TARGET ARGS...]: the COMPARE_JOBS (default
# fio 4K QD32 randwrite then randread; each RW:BS:QD), 10 s each after 2 s
# of ramp, on /dev/$DEV, or on what the target args name (librbd direct). CPU is taken over a window inside the
# measured run: snapshots (cpu_snap) 3 s after fio's job appears (5 s for
# librbd direct) and 5 s later, to compare.LABEL.RW.ROUND.a/.b. The serving
# process is the daemon ($DPID), or for librbd direct fio's process itself
# (the rbd engine runs its job as a thread, beside librbd's threads).
bench_fio() { # LABEL ROUND [ARGS...]
  local label=$1 rnd=$2 rw bs qd job name fp jp i srv dev=$DEV
  shift 2
  local tgt=("$@")
  if [ ${#tgt[@]} -eq 0 ]; then
    tgt=(--filename="/dev/$DEV" --direct=1 --ioengine=libaio)
  else
    dev=
  fi
  for job in ${COMPARE_JOBS:-randwrite:4k:32 randread:4k:32}; do
    IFS=: read -r rw bs qd <<<"$job"
    name=$(compare_name "$job")
    local base="$OUT/compare.$label.$name.$rnd"
    timeout 120 fio --name="$rw" "${tgt[@]}" --iodepth="$qd" --rw="$rw" --bs="$bs" --size=256m \
      --time_based --runtime=10 --ramp_time=2 --randrepeat=0 \
      --output-format=json --output="$base.json" &
    fp=$!
    jp=
    for i in $(seq 100); do
      if [ -n "$dev" ]; then
        # libaio: the job is a process fio forks; it starts at once.
        jp=$(fio_pid fio) && break
      else
        # The rbd engine runs its job as a thread of fio's own process;
        # it has started once librbd's messenger threads are there.
        jp=$(fio_pid "$fp") && has_thread "$jp" msgr-worker && break
        jp=
      fi
      kill -0 $fp 2>/dev/null || break
      sleep 0.1
    done
    if [ -z "$jp" ]; then
      wait $fp
      why="fio ($rw) exited with $? before its job was seen"
      return 1
    fi
    srv=${DPID:-$jp}
    # 2 s of ramp, then 10 s measured: the window is 3 to 8 s in (5 to 10
    # s for librbd, whose job connects to the cluster first).
    sleep 3
    [ -n "$dev" ] || sleep 2
    cpu_snap "$srv" "$jp" "$dev" >"$base.a"
    sleep 5
    cpu_snap "$srv" "$jp" "$dev" >"$base.b"
    wait $fp || { why="fio ($rw) failed ($?)"; return 1; }
  done
}
# compare_name RW:BS:QD: the job's name in file names and the table
# (randwrite, or write-1m-qd8 for anything but 4K QD32).
compare_name() {
  local rw bs qd
  IFS=: read -r rw bs qd <<<"$1"
  if [ "$bs:$qd" = 4k:32 ]; then echo "$rw"; else echo "$rw-$bs-qd$qd"; fi
}
# abba PREFIX ROUND_FN: the side-by-side benchmarks' round order,
# ROUND_FN tcmu-rbd 1, tcmu-runner 1, tcmu-runner 2, tcmu-rbd 2 (a drift in
# the host's load weighs on both daemons alike), each daemon started
# before its rounds and stopped after; checks are named PREFIX.<daemon>.*.
abba() {
  local p=$1 f=$2
  daemon_alive || check "$p.tcmu-rbd.start" start_daemon || return 1
  "$f" tcmu-rbd 1
  check "$p.tcmu-rbd.stop" stop_daemon || return 1
  check "$p.tcmu-runner.start" start_tcmu_runner || return 1
  "$f" tcmu-runner 1
  "$f" tcmu-runner 2
  check "$p.tcmu-runner.stop" stop_daemon || return 1
  check "$p.tcmu-rbd.restart" start_daemon || return 1
  "$f" tcmu-rbd 2
}
start_tcmu_runner() {
  mkdir -p "$OUT/tcmu-runner"
  tcmu-runner --tcmu-log-dir "$OUT/tcmu-runner" >>"$OUT/tcmu-runner/stdout.log" 2>&1 &
  DPID=$!
  # Ready once its handlers are loaded (it then listens to netlink).
  wait_for 30 grep -q "Handler rbd is registered" "$OUT/tcmu-runner/tcmu-runner.log" ||
    { why="tcmu-runner did not load its rbd handler in 30 s"; return 1; }
  sleep 1
  daemon_alive
}
stop_daemon() {
  daemon_alive || return 0
  kill -TERM "$DPID"
  wait_for 30 sh -c "! kill -0 $DPID" || { why="pid $DPID did not exit on SIGTERM"; return 1; }
  wait "$DPID" 2>/dev/null
  DPID=
}
# One round of one side of the comparison: export rbd/bench through the
# running daemon, run the fio jobs, take it down again.
compare_one() { # LABEL ROUND
  local cfg="rbd/bench;conf=$CEPH_CONF_GUEST;id=admin" w=naa.5001405000000040 n="compare.$1.$2"
  # COMPARE_CFG, COMPARE_B_CFG: more cfgstring options for each side.
  case $1 in
  tcmu-rbd) cfg+=${COMPARE_CFG:-} ;;
  tcmu-rbd-B) cfg+=${COMPARE_B_CFG:-} ;;
  esac
  # COMPARE_ATTRS: more control attributes for the LUN (after the suite's
  # hw_max_sectors=1024, which a later one overrides).
  if check "$n.create" mk_backstore bench rbd "$cfg" $((1 << 30)) "${COMPARE_ATTRS:-}" &&
    check "$n.export" mk_loop bench $w; then
    check_dev "$n.fio" bench_fio "$1" "$2"
    # What merging did in the round (tcmu-rbd's counters; no output from
    # tcmu-runner, which has no metrics endpoint).
    case $1 in tcmu-rbd*)
      curl -s --max-time 5 "http://$METRICS/metrics" |
        grep -E '^tcmu_rbd_(merged_commands|merged_operations|reads|writes|qfull|ring_full)_total\{device="bench"' \
          >"$OUT/compare.$1.$2.metrics" ;;
    esac
    check "$n.remove" t_remove_idle bench $w
  else
    # Leave nothing behind for the other daemon.
    rm_loop bench $w >/dev/null 2>&1
    rm_backstore bench >/dev/null 2>&1
    return 1
  fi
}
# One round of fio's own rbd engine on the image, no daemon running, with
# librbd's cache off as both daemons have it (tcmu-runner sets
# rbd_cache=false too): a write completes once the OSD has it.
compare_librbd() { # ROUND
  { cat "$CEPH_CONF_GUEST" && echo "rbd cache = false"; } >"$S/librbd.conf" || return 1
  CEPH_CONF=$S/librbd.conf check "compare.librbd.$1.fio" bench_fio librbd "$1" \
    --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench
}
# The daemon again, with the B side's environment and binary when asked
# (COMPARE_B_ENV, COMPARE_B_BIN from the host).
start_daemon_b() {
  local e
  read -ra e <<<"${COMPARE_B_ENV:-}"
  DAEMON_ENV="${e[*]}" DAEMON_BIN=${COMPARE_B_BIN:-$BIN} DAEMON_CONF=${COMPARE_B_CONF:-} start_daemon
}
suite_compare() {
  # One serving process at a time (both daemons would claim user:rbd
  # devices; librbd direct runs with neither), in the order tcmu-rbd,
  # [tcmu-rbd-B,] librbd, tcmu-runner, tcmu-runner, librbd, [tcmu-rbd-B,]
  # tcmu-rbd, so that a drift in the host's load during the run weighs on
  # each alike. tcmu-rbd-B (when COMPARE_B_ENV or COMPARE_B_BIN is set) is a
  # candidate change measured beside the code as it is.
  local b=0
  [ -n "${COMPARE_B_ENV:-}${COMPARE_B_BIN:-}${COMPARE_B_CFG:-}${COMPARE_B_CONF:-}" ] && b=1
  daemon_alive || check compare.tcmu-rbd.start start_daemon
  compare_one tcmu-rbd 1
  check compare.tcmu-rbd.stop stop_daemon || return 1
  if [ $b = 1 ]; then
    check compare.tcmu-rbd-B.start start_daemon_b || return 1
    compare_one tcmu-rbd-B 1
    check compare.tcmu-rbd-B.stop stop_daemon || return 1
  fi
  compare_librbd 1
  check compare.tcmu-runner.start start_tcmu_runner || return 1
  compare_one tcmu-runner 1
  compare_one tcmu-runner 2
  check compare.tcmu-runner.stop stop_daemon || return 1
  compare_librbd 2
  if [ $b = 1 ]; then
    check compare.tcmu-rbd-B.restart start_daemon_b || return 1
    compare_one tcmu-rbd-B 2
    check compare.tcmu-rbd-B.stop2 stop_daemon || return 1
  fi
  check compare.tcmu-rbd.restart start_daemon || return 1
  compare_one tcmu-rbd 2
}

# The iSCSI gateway with CHAP (suite_iscsi), in its own file.
# shellcheck source=scripts/vm/guest-iscsi.sh
. "$TOP/scripts/vm/guest-iscsi.sh"

# ceph-iscsi's rbd-target-api and gwcli over tcmu-rbd (suite_ceph_iscsi).
# shellcheck source=scripts/vm/guest-ceph-iscsi.sh
. "$TOP/scripts/vm/guest-ceph-iscsi.sh"

# The multipath drill (suite_mpath), in its own file.
# shellcheck source=scripts/vm/guest-mpath.sh
. "$TOP/scripts/vm/guest-mpath.sh"

# Whole-gateway failover (suite_wholegw, not a default).
# shellcheck source=scripts/vm/guest-wholegw.sh
. "$TOP/scripts/vm/guest-wholegw.sh"

# Four busy LUNs on one daemon (suite_multi, a benchmark).
# shellcheck source=scripts/vm/guest-multi.sh
. "$TOP/scripts/vm/guest-multi.sh"

# What hundreds of LUNs cost on one daemon (suite_scale, not a default).
# shellcheck source=scripts/vm/guest-scale.sh
. "$TOP/scripts/vm/guest-scale.sh"

say "start $(date +%T), kernel $(uname -r)"
mount -t configfs configfs $CFS || { fail setup "cannot mount configfs"; exit 1; }
# LIO keeps PR and ALUA state under its dbroot (default /etc/target, here
# the host's read-only root): point it at a writable directory before any
# device exists, or PERSISTENT RESERVE OUT fails with NOT READY. The
# kernel writes <dbroot>/pr/aptpl_<serial> on every registration (APTPL
# or not) and does not create the directory.
mkdir -p /tmp/target/pr /tmp/target/alua && echo /tmp/target >"$T/dbroot" || say "cannot set the LIO dbroot"
# The iSCSI target and initiator need crc32c (digests); the guest has no
# modprobe for the kernel to load it on demand (test-vm.sh preloads it).
check daemon.start start_daemon || exit 1
for s in $SUITES; do
  "suite_$s"
done
if daemon_alive; then
  kill -TERM "$DPID"
  wait_for 20 sh -c "! kill -0 $DPID" || fail daemon.sigterm "daemon did not exit 20 s after SIGTERM"
fi
# Whatever happened above, the daemon never panicked and never left a
# device blocked or a ring unreset.
t_daemon_log() {
  if grep -nE "panicked|could not (reset|block|unblock)" "$DLOG"; then
    why="daemon log shows a panic or a failed ring reset (see above)"
    return 1
  fi
}
check daemon.log_clean t_daemon_log
dmesg >"$OUT/dmesg.log" 2>&1
say "done $(date +%T)"
echo DONE >&3
