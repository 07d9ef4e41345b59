# shellcheck shell=bash
# The VM stage's multipath drill (suite "mpath", one of the default suites).
# Sourced by scripts/vm/guest.sh, whose helpers (check, ok, wait_for,
# uio_of, rbd_cli, stop_daemon, start_daemon, ...) it uses.
#
# Two HA gateways of one rbd image in one guest, as ceph-iscsi sets them
# up on two hosts: two user:rbd backstores (disk_a, disk_b) on the same
# image with the same unit serial, each with its own ALUA port group,
# each exported by its own tcm_loop target (two SCSI hosts, two paths) and
# served by its own daemon (--devices disk_X --no-netlink --no-dbus).
# dm-multipath (udevd + multipathd from the host's multipath-tools) groups
# the two paths; fio with crc32c verification runs on the multipath device
# while the daemon of the active path is killed with SIGKILL: the I/O
# must move to the other path (whose gateway takes the exclusive lock and
# fences the dead one) and every block must verify. Both gateways start
# Standby; multipath's first activation picks the owner, which must then
# stay put. Each daemon's exit and log are checked for crashes.

MP_IMG=rbd/mpath
MP_SIZE=$((256 << 20))
declare -A MP_PID=() MP_EXIT=() MP_WWN=([a]=naa.50014050000000a1 [b]=naa.50014050000000b1) MP_GID=([a]=11 [b]=22)
declare -A MP_IQN=([a]=iqn.2003-01.org.linux-iscsi.tcmu-rbd:mp-a [b]=iqn.2003-01.org.linux-iscsi.tcmu-rbd:mp-b)
declare -A MP_PORT=([a]=3260 [b]=3261)
MP_SERIAL=
MP_ACT_AFTER=
# The fabric: loop (tcm_loop, suite mpath) or iscsi (LIO iSCSI target and
# open-iscsi, suite mpath_iscsi); the groups' ALUA type: 3 (implicit and
# explicit: STPG moves the lock) or 1 (implicit only, as ceph-iscsi
# creates its groups: I/O at a non-optimized port moves the lock).
MP_FABRIC=loop
MP_ALUA_TYPE=3
MP_LUN=":0:1:0"

mp_served() { # X: daemon X holds disk_X's uio device
  local u
  u=$(uio_of "disk_$1") || return 1
  kill -0 "${MP_PID[$1]}" 2>/dev/null || return 1
  ls -l /proc/"${MP_PID[$1]}"/fd 2>/dev/null | grep -q "/dev/$u\$"
}

mp_backstore() { # X
  local d=$T/core/user_0/disk_$1 g
  g=$d/alua/gw_$1
  ok mkdir -p "$d" || return 1
  ok sh -c "echo -n 'dev_size=$MP_SIZE,dev_config=rbd/$MP_IMG;conf=$CEPH_CONF_GUEST;id=admin,hw_max_sectors=1024' > $d/control" || return 1
  # Same identity on both gateways, or multipath cannot group the paths.
  ok sh -c "echo -n '$MP_SERIAL' > $d/wwn/vpd_unit_serial" || return 1
  # The gateway's own port group, explicit and implicit ALUA.
  ok mkdir -p "$g" || return 1
  ok sh -c "echo ${MP_GID[$1]} > $g/tg_pt_gp_id" || return 1
  ok sh -c "echo $MP_ALUA_TYPE > $g/alua_access_type" || return 1
  # A dead gateway's commands fail back after 10 s (default 30 s), so
  # the path fails and multipath moves on.
  ok sh -c "echo 10 > $d/attrib/cmd_time_out" || return 1
  ok sh -c "echo -n 1 > $d/enable"
}

mp_daemon() { # X
  echo "--- daemon $1 start $(date +%T)" >>"$OUT/daemon-$1.log"
  NO_COLOR=1 "$BIN" --log-stderr --no-dbus --no-netlink --rescan-ms 200 --devices "disk_$1" \
    --run-dir "/run/tcmu-rbd-$1" >>"$OUT/daemon-$1.log" 2>&1 &
  MP_PID[$1]=$!
  wait_for 30 mp_served "$1" || { why="daemon $1 does not serve disk_$1 after 30 s"; return 1; }
  # The filter holds: the other gateway's device is not opened here.
  local o=b
  [ "$1" = b ] && o=a
  if [ -n "$(uio_of "disk_$o")" ] && ls -l /proc/"${MP_PID[$1]}"/fd | grep -q "/dev/$(uio_of "disk_$o")\$"; then
    why="daemon $1 also opened disk_$o"
    return 1
  fi
}

mp_tpg() { # X: gateway X's TPG directory
  if [ "$MP_FABRIC" = iscsi ]; then
    echo "$T/iscsi/${MP_IQN[$1]}/tpgt_1"
  else
    echo "$T/loopback/${MP_WWN[$1]}/tpgt_1"
  fi
}

mp_export() { # X
  local tp h
  tp=$(mp_tpg "$1")
  ok mkdir -p "$tp/lun/lun_0" || return 1
  [ "$MP_FABRIC" = loop ] && { ok sh -c "echo -n naa.50014050000000${1}2 > $tp/nexus" || return 1; }
  ok ln -s "$T/core/user_0/disk_$1" "$tp/lun/lun_0/disk_$1" || return 1
  ok sh -c "echo gw_$1 > $tp/lun/lun_0/alua_tg_pt_gp" || return 1
  cat "$tp/lun/lun_0/alua_tg_pt_gp"
  if [ "$MP_FABRIC" = iscsi ]; then
    # One portal per gateway; any initiator, no CHAP (suite iscsi tests it).
    ok mkdir -p "$tp/np/$IS_ADDR:${MP_PORT[$1]}" || return 1
    ok sh -c "echo 0 > $tp/attrib/authentication" || return 1
    ok sh -c "echo 1 > $tp/attrib/generate_node_acls" || return 1
    ok sh -c "echo 0 > $tp/attrib/demo_mode_write_protect" || return 1
    ok sh -c "echo 1 > $tp/enable" || return 1
    ok timeout 60 iscsiadm -m discovery -t sendtargets -p "$IS_ADDR:${MP_PORT[$1]}" || return 1
    ok timeout 60 iscsiadm -m node -T "${MP_IQN[$1]}" -p "$IS_ADDR:${MP_PORT[$1]}" --login || return 1
  fi
  h=$(mp_host_of "$1") || { why="no SCSI host for gateway $1's path"; return 1; }
  wait_for 60 mp_has_disk "$h" || { why="no disk on scsi host $h after 60 s"; return 1; }
  echo "disk_$1: scsi host $h, $(basename /sys/class/scsi_disk/"$h$MP_LUN"/device/block/sd*)"
}

mp_has_disk() { # H
  local b
  for b in /sys/class/scsi_disk/"$1$MP_LUN"/device/block/sd*; do
    [ -e "$b" ] && return 0
  done
  return 1
}

mp_host_of() { # X: SCSI host number of gateway X's path
  local s t
  if [ "$MP_FABRIC" = iscsi ]; then
    for s in /sys/class/iscsi_session/session*; do
      grep -qx "${MP_IQN[$1]}" "$s/targetname" 2>/dev/null || continue
      for t in "$s"/device/target*; do
        [ -e "$t" ] || continue
        t=$(basename "$t")
        t=${t#target}
        echo "${t%%:*}"
        return 0
      done
    done
    return 1
  fi
  cut -d: -f1 "$T/loopback/${MP_WWN[$1]}/tpgt_1/address"
}

mp_sd() { # X: the sd node of gateway X's path
  echo "/dev/$(basename /sys/class/scsi_disk/"$(mp_host_of "$1")$MP_LUN"/device/block/sd*)"
}

# RTPG through gateway X's path reports its port group with the port the
# LUN is reached through (its relative target port id, the LUN's
# statistics/scsi_port/indx), not an empty group: the daemon reads the
# members again after the fabric linked the LUN.
t_mp_rtpg_port() { # X
  local indx out gid id
  indx=$(cat "$(mp_tpg "$1")/lun/lun_0/statistics/scsi_port/indx") ||
    { why="no scsi_port index for gateway $1"; return 1; }
  out=$(sg_rtpg -d "$(mp_sd "$1")") || { why="sg_rtpg failed on gateway $1's path"; return 1; }
  echo "$out"
  gid=$(printf 0x%x "${MP_GID[$1]}")
  echo "$out" | grep -q "target port group id : $gid ," || { why="RTPG does not show group $gid"; return 1; }
  expect "target port count" "$(echo "$out" | sed -n 's/.*target port count : *//p' | head -1)" 01 || return 1
  id=$(echo "$out" | grep -A1 "Relative target port ids" | tail -1 | tr -d ' ')
  expect "relative target port id (scsi_port indx $indx)" "$((id))" "$indx"
}

mp_start() { # [PATHS]: wait for PATHS paths (default 2) matching MP_LUN
  local paths=${1:-2}
  # The 9p root is read-only: /etc on a tmpfs copy (multipathd writes
  # /etc/multipath/{wwids,bindings}; its config is fixed at
  # /etc/multipath.conf).
  rm -rf /tmp/etc
  ok cp -a /etc /tmp/etc || return 1
  ok mount --bind /tmp/etc /etc || return 1
  mkdir -p /etc/multipath
  cat >/etc/multipath.conf <<'EOF'
defaults {
	user_friendly_names no
	find_multipaths no
	polling_interval 1
}
devices {
	device {
		vendor "LIO-ORG"
		product ".*"
		hardware_handler "1 alua"
		detect_prio no
		prio alua
		path_grouping_policy failover
		path_checker tur
		no_path_retry queue
		failback manual
	}
}
EOF
  # udev gives multipath the paths' WWIDs (ID_SERIAL) and makes the
  # /dev/mapper nodes. systemd's tools refuse to act in a chroot unless
  # told to.
  export SYSTEMD_IGNORE_CHROOT=1
  # One udevd for every multipath suite: a second one started right after
  # the first was told to exit fails (settle: "Broken pipe").
  if ! pgrep -x systemd-udevd >/dev/null; then
    ok /lib/systemd/systemd-udevd --daemon || return 1
  fi
  ok udevadm trigger --action=add || return 1
  ok timeout 120 udevadm settle || return 1
  ok multipathd || return 1
  wait_for $((60 + paths)) sh -c "[ \$(multipath -ll 2>/dev/null | grep -cE '[0-9]+$MP_LUN +sd') = $paths ]" ||
    { why="multipath did not group $paths paths within $((60 + paths)) s"; multipath -ll; multipath -v3 2>&1 | tail -50; return 1; }
  multipath -ll
  # udev makes /dev/mapper/<wwid> a moment after the map.
  wait_for 30 sh -c 'd=$(multipath -ll | awk "/dm-[0-9]+/ {print \$1; exit}"); [ -b "/dev/mapper/$d" ]' ||
    { why="no /dev/mapper node for the map after 30 s"; ls -l /dev/mapper; return 1; }
}

# Persistent reservations are refused through gateway X's path (each
# gateway's kernel would keep its own; t_pr in guest.sh).
t_mp_pr() { # X
  local DEV
  DEV=$(basename "$(mp_sd "$1")")
  t_pr refused
}

mp_dev() { # the map's block device
  local m
  m=$(multipath -ll 2>/dev/null | awk '/dm-[0-9]+/ {print $1; exit}')
  [ -n "$m" ] && echo "/dev/mapper/$m"
}

t_mp_topology() {
  local o
  # One I/O through the map activates a path group: with explicit ALUA a
  # read (scsi_dh_alua sends STPG); with implicit-only ALUA a write (a
  # non-optimized port serves reads without taking the lock).
  if [ "$MP_ALUA_TYPE" = 1 ]; then
    ok dd if=/dev/zero of="$(mp_dev)" bs=4k count=1 oflag=direct conv=notrunc status=none || return 1
    # multipathd re-reads the priorities (AO 50, ANO 10) on its next check.
    wait_for 30 sh -c "multipath -ll | grep -q 'prio=50 status=active'" || true
  else
    ok dd if="$(mp_dev)" of=/dev/null bs=4k count=1 iflag=direct status=none || return 1
  fi
  wait_for 30 sh -c "multipath -ll | grep -q 'status=active'" || true
  sleep 2
  o=$(multipath -ll)
  echo "$o"
  [ "$(echo "$o" | grep -cE "[0-9]+$MP_LUN +sd")" = 2 ] || { why="not 2 paths in the map"; return 1; }
  echo "$o" | grep -q "status=active" || { why="no active path group"; return 1; }
  if [ "$MP_ALUA_TYPE" = 1 ]; then
    # Implicit only: the other gateway is Active/Non-optimized (a usable
    # path in the group multipath keeps enabled), not a ghost.
    echo "$o" | grep -q "status=enabled" || { why="no enabled (non-optimized) path group"; return 1; }
    echo "$o" | grep -q "ghost" && { why="a ghost path with implicit-only ALUA (nothing could activate it)"; return 1; }
  else
    echo "$o" | grep -q "ghost" || { why="no standby (ghost) path"; return 1; }
  fi
  echo "$o" | grep -q "hwhandler='1 alua'" || { why="alua hardware handler not attached"; return 1; }
}

mp_count() { # PATTERN: matching lines in both gateways' logs
  cat "$OUT/daemon-a.log" "$OUT/daemon-b.log" | grep -c "$1"
}

# The maps as multipathd holds them. Not `multipath -ll`: that one sends
# its own ALUA inquiries down every path, and after a gateway is killed
# each inquiry to the dead path waits out the SCSI command timeout (the
# LUN's cmd_time_out is 0, as ceph-iscsi sets it): a minute per call.
mp_topology() { multipathd show topology; }

# The same, asked again for up to 30 s while multipathd answers with no
# path group (a busy multipathd answers its client "timeout").
mp_topology_settled() {
  local o i
  for i in $(seq 30); do
    o=$(mp_topology 2>&1)
    echo "$o" | grep -q "status=" && { echo "$o"; return 0; }
    sleep 1
  done
  echo "$o"
  return 1
}

# Both gateways started Standby and nobody moved the lock by hand: the
# host's first I/O made multipath activate one path group, and the lock
# stays with that gateway (no takeover, no loss) for 30 s of I/O through
# the map (a write every 2 s; multipathd checks paths every second), with one
# path Active/Optimized and the other a ghost.

t_mp_settled() {
  local dev act tk ls i o
  dev=$(mp_dev) || { why="no multipath device"; return 1; }
  act=$(mp_active) || { why="cannot tell the active gateway"; return 1; }
  tk=$(mp_count "takeover done")
  ls=$(mp_count "exclusive lock lost")
  echo "active gateway $act; takeovers so far $tk, losses $ls"
  [ "$tk" -ge 1 ] || { why="no gateway took the lock"; return 1; }
  for i in $(seq 15); do
    ok dd if=/dev/urandom of="$dev" bs=4k count=1 seek=$((RANDOM % 4096)) oflag=direct conv=notrunc status=none || return 1
    sleep 2
  done
  o=$(mp_topology_settled)
  echo "$o"
  expect "takeovers in 30 s" "$(mp_count "takeover done")" "$tk" || return 1
  expect "lock losses in 30 s" "$(mp_count "exclusive lock lost")" "$ls" || return 1
  expect "active gateway after 30 s" "$(mp_active)" "$act" || return 1
  sg_rtpg -d "$(mp_sd "$act")" | grep -q "active/optimized" || { why="gateway $act is not active/optimized"; return 1; }
  if [ "$MP_ALUA_TYPE" = 1 ]; then
    local other=b
    [ "$act" = b ] && other=a
    sg_rtpg -d "$(mp_sd "$other")" | grep -q "active/non optimized" ||
      { why="gateway $other is not active/non-optimized"; sg_rtpg -d "$(mp_sd "$other")"; return 1; }
  else
    [ "$(echo "$o" | grep -c ghost)" = 1 ] || { why="not exactly one ghost path"; return 1; }
  fi
}

# The gateway whose path is in the active group.
mp_active() {
  local o h x
  o=$(mp_topology_settled)
  h=$(echo "$o" | awk '/status=active/ {getline; print}' | grep -oE "[0-9]+$MP_LUN" | cut -d: -f1)
  for x in a b; do
    [ "$(mp_host_of $x)" = "$h" ] && { echo $x; return 0; }
  done
  return 1
}

mp_active_is() { [ "$(mp_active)" = "$1" ]; } # X

t_mp_fio_kill() {
  local dev act other fpid t_kill t_done rc
  dev=$(mp_dev) || { why="no multipath device"; return 1; }
  act=$(mp_active) || { why="cannot tell the active gateway"; return 1; }
  other=b
  [ "$act" = b ] && other=a
  echo "active gateway: $act (pid ${MP_PID[$act]}), standby: $other"
  timeout 600 fio --name=mpath --filename="$dev" --direct=1 --ioengine=libaio --iodepth=8 \
    --rw=randwrite --bs=4k --size=24m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --randrepeat=0 --output-format=json --output="$OUT/mpath-fio.json" >"$S/mpath-fio.out" 2>&1 &
  fpid=$!
  sleep 4
  kill -0 $fpid 2>/dev/null || { why="fio ended before the kill"; cat "$S/mpath-fio.out" "$OUT/mpath-fio.json"; return 1; }
  t_kill=$(date +%s.%N)
  echo "$(date +%T.%N) kill -9 daemon $act"
  kill -9 "${MP_PID[$act]}"
  wait "${MP_PID[$act]}" 2>/dev/null
  wait $fpid
  rc=$?
  t_done=$(date +%s.%N)
  cat "$S/mpath-fio.out"
  mp_topology
  echo "fio exit $rc, $(awk "BEGIN {printf \"%.1f\", $t_done - $t_kill}") s after the kill"
  python3 - "$OUT/mpath-fio.json" <<'PY' || true
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
w, r = j["write"], j["read"]
print(f"fio: wrote {w['io_kbytes']} KiB, verified (read) {r['io_kbytes']} KiB, errors {j['error']}, "
      f"max write completion latency {w['clat_ns']['max'] / 1e9:.2f} s (the failover stall)")
PY
  # Failover time: the kill to the new gateway's Active/Optimized (its
  # log's UTC timestamp; the guest clock is UTC too).
  local t_act
  t_act=$(grep -m1 "takeover done" "$OUT/daemon-$other.log" | cut -d' ' -f1)
  [ -n "$t_act" ] && echo "failover: kill -9 to gateway $other active/optimized in" \
    "$(awk "BEGIN {printf \"%.2f\", $(date -d "$t_act" +%s.%N) - $t_kill}") s"
  [ $rc -eq 0 ] || { why="fio failed (exit $rc) across the failover"; return 1; }
  # Right after a failover multipathd may not have switched groups yet
  # (mp_active already asks again while it answers "timeout"); give it
  # up to 30 s before judging.
  wait_for 30 mp_active_is "$other" || true
  MP_ACT_AFTER=$(mp_active)
  expect "active gateway after the kill" "$MP_ACT_AFTER" "$other"
}

mp_cleanup() {
  local x
  multipath -F >/dev/null 2>&1
  multipathd shutdown >/dev/null 2>&1
  for x in a b; do
    if [ -n "${MP_PID[$x]:-}" ] && kill -0 "${MP_PID[$x]}" 2>/dev/null; then
      kill -TERM "${MP_PID[$x]}"
      if wait_for 60 sh -c "! kill -0 ${MP_PID[$x]}"; then
        wait "${MP_PID[$x]}"
        MP_EXIT[$x]=$?
      else
        MP_EXIT[$x]="still running 60 s after SIGTERM"
      fi
      echo "--- daemon $x exit after SIGTERM: ${MP_EXIT[$x]}" >>"$OUT/daemon-$x.log"
    fi
  done
  for x in a b; do
    local tp
    tp=$(mp_tpg "$x")
    if [ "$MP_FABRIC" = iscsi ]; then
      timeout 60 iscsiadm -m node -T "${MP_IQN[$x]}" -p "$IS_ADDR:${MP_PORT[$x]}" --logout
      echo 0 >"$tp/enable"
      timeout 30 rmdir "$tp/np/$IS_ADDR:${MP_PORT[$x]}"
    fi
    timeout 60 rm -f "$tp/lun/lun_0/disk_$x"
    timeout 30 rmdir "$tp/lun/lun_0" "$tp" "$(dirname "$tp")"
    timeout 30 rmdir "$T/core/user_0/disk_$x/alua/gw_$x"
    timeout 60 rmdir "$T/core/user_0/disk_$x"
  done
  umount /etc 2>/dev/null
  return 0
}

# Every gateway daemon stopped by SIGTERM exited 0, and no gateway's log
# shows a crash (a C++ exception from librados/librbd, an abort, a panic).
t_mp_daemons_clean() {
  local x bad=
  for x in a b; do
    if grep -nE "terminate called|what\(\):|Aborted|panicked|Segmentation|core dumped" "$OUT/daemon-$x.log"; then
      bad="$bad daemon $x's log shows a crash;"
    fi
    if [ -n "${MP_EXIT[$x]:-}" ] && [ "${MP_EXIT[$x]}" != 0 ]; then
      bad="$bad daemon $x exited with '${MP_EXIT[$x]}' after SIGTERM;"
    fi
    echo "daemon $x: SIGTERM exit '${MP_EXIT[$x]:-not running (killed by the drill)}'"
  done
  # The drill kills one daemon; the other one must have been stopped here.
  [ -n "${MP_EXIT[a]:-}${MP_EXIT[b]:-}" ] || bad="$bad no daemon was left to stop with SIGTERM;"
  [ -z "$bad" ] || { why=${bad%;}; return 1; }
}

mp_suite() { # NAME
  local n=$1
  check $n.cluster_reachable ok rbd_cli info rbd/img0 || return 1
  check $n.image ok rbd_cli create --size "$((MP_SIZE >> 20))M" "$MP_IMG" || return 1
  # One daemon per gateway: the shared one must not claim these devices.
  check $n.shared_daemon_stop stop_daemon || return 1
  MP_SERIAL=$(cat /proc/sys/kernel/random/uuid)
  MP_PID=()
  MP_EXIT=()
  MP_ACT_AFTER=
  if check $n.backstore_a mp_backstore a && check $n.backstore_b mp_backstore b &&
    check $n.daemon_a mp_daemon a && check $n.daemon_b mp_daemon b &&
    check $n.export_a mp_export a && check $n.export_b mp_export b &&
    check $n.multipathd mp_start; then
    check $n.rtpg_port_a t_mp_rtpg_port a
    check $n.rtpg_port_b t_mp_rtpg_port b
    check $n.persistent_reservations_refused_a t_mp_pr a
    check $n.persistent_reservations_refused_b t_mp_pr b
    check $n.topology t_mp_topology
    check $n.one_owner_30s t_mp_settled
    check $n.fio_verify_across_kill t_mp_fio_kill
    # The log of the gateway that took over shows the takeover.
    [ -n "${MP_ACT_AFTER:-}" ] && grep -iE "lock|alua|takeover|standby|active" "$OUT/daemon-$MP_ACT_AFTER.log" | tail -20 >>"$LOG"
  fi
  check $n.cleanup mp_cleanup
  check $n.daemons_clean_exit t_mp_daemons_clean
  check $n.shared_daemon_restart start_daemon
}

# Two gateways through tcm_loop, explicit and implicit ALUA (STPG).
suite_mpath() {
  MP_FABRIC=loop MP_ALUA_TYPE=3 MP_LUN=":0:1:0" MP_IMG=rbd/mpath
  mp_suite mpath
}

# Two gateways through LIO's iSCSI target and open-iscsi, with
# ceph-iscsi's implicit-only ALUA: no STPG, the non-owner reports
# Active/Non-optimized and I/O reaching it moves the lock.
suite_mpath_iscsi() {
  MP_FABRIC=iscsi MP_ALUA_TYPE=1 MP_LUN=":0:0:0" MP_IMG=rbd/mpath_iscsi
  if ! pgrep -x iscsid >/dev/null; then
    check mpath_iscsi.iscsid t_iscsid || return 1
  fi
  # The daemons' logs of suite mpath stay apart.
  for x in a b; do
    [ -e "$OUT/daemon-$x.log" ] && mv "$OUT/daemon-$x.log" "$OUT/daemon-$x.mpath.log"
  done
  mp_suite mpath_iscsi
}
