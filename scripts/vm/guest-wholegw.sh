# shellcheck shell=bash
# Whole-gateway failover (suite "wholegw", not a default). Sourced by
# scripts/vm/guest.sh; uses its helpers and the multipath suite's
# (guest-mpath.sh: mp_start, mp_daemon's layout).
#
# VM_WG_N images (rbd/wg000.., made by the host), each exported by two
# gateways as in the mpath suite: backstores disk_a_I and disk_b_I with the
# same unit serial, port groups gw_a (11) and gw_b (22), one tcm_loop
# target per gateway carrying all N LUNs, one daemon per gateway
# (--devices), explicit and implicit ALUA. Gateway A takes every image's
# lock (SET TARGET PORT GROUPS through its path, as scsi_dh_alua sends
# it), dm-multipath groups the paths, fio with crc32c verification runs
# on VM_WG_FIO of the maps, and A is killed with SIGKILL. Checked: every
# LUN becomes Active/Optimized on B; B fenced A's client once (one `osd
# blocklist add`, not one per image); every fio verify passes. Recorded
# in wholegw.txt: kill to all Active/Optimized, the span of B's takeovers
# (first start to last done) and the slowest one.

WG_N=${VM_WG_N:-16}
WG_FIO=${VM_WG_FIO:-4}
WG_SIZE=$((64 << 20))
declare -A WG_WWN=([a]=naa.50014050000000c1 [b]=naa.50014050000000d1)
declare -A WG_GID=([a]=11 [b]=22)
declare -A WG_PID=()
WG_SERIAL=() # per image: both gateways' LUNs share it (one WWID per map)
WG_TXT=$OUT/wholegw.txt
WG_T_KILL=

wg_name() { printf 'disk_%s_%03d' "$1" "$2"; } # X I
wg_names() {                                    # X: every device of gateway X, comma-separated
  local i out=
  for ((i = 0; i < WG_N; i++)); do out="$out,$(wg_name "$1" $i)"; done
  echo "${out#,}"
}

wg_backstores() { # X
  local i d g serial
  for ((i = 0; i < WG_N; i++)); do
    d=$T/core/user_0/$(wg_name "$1" $i)
    g=$d/alua/gw_$1
    [ -n "${WG_SERIAL[$i]:-}" ] || WG_SERIAL[$i]=$(cat /proc/sys/kernel/random/uuid)
    serial=${WG_SERIAL[$i]}
    mkdir -p "$d" || { why="mkdir $d"; return 1; }
    echo -n "dev_size=$WG_SIZE,dev_config=rbd/rbd/$(printf wg%03d $i);conf=$CEPH_CONF_GUEST;id=admin,hw_max_sectors=1024" >"$d/control" || { why="control of $d"; return 1; }
    echo -n "$serial" >"$d/wwn/vpd_unit_serial" || { why="serial of $d"; return 1; }
    if ! { mkdir -p "$g" && echo "${WG_GID[$1]}" >"$g/tg_pt_gp_id" && echo 3 >"$g/alua_access_type"; }; then
      why="ALUA group of $d"
      return 1
    fi
    echo 10 >"$d/attrib/cmd_time_out"
    echo -n 1 >"$d/enable" || { why="enable $d"; return 1; }
  done
}

wg_all_served() { [ "$(sc_nserved "${WG_PID[$1]}")" = "$WG_N" ]; } # X (sc_nserved: guest-scale.sh)

wg_daemon() { # X
  local t0=$SECONDS
  echo "--- daemon $1 start $(date +%T)" >>"$OUT/daemon-wg-$1.log"
  # No per-image service-map clients (one rados client each, 256 of
  # them for two gateways): not on the failover path, and under emulation
  # they would only slow the guest down.
  printf 'log_level = 3\nservice_map = off\n' >"$S/wg.conf"
  NO_COLOR=1 "$BIN" --log-stderr --no-dbus --no-netlink --rescan-ms 500 --devices "$(wg_names "$1")" \
    -c "$S/wg.conf" --run-dir "/run/tcmu-rbd-wg-$1" >>"$OUT/daemon-wg-$1.log" 2>&1 &
  WG_PID[$1]=$!
  wait_for $((60 + 2 * WG_N)) wg_all_served "$1" ||
    { why="daemon $1 serves $(sc_nserved "${WG_PID[$1]}") of $WG_N devices"; return 1; }
  echo "daemon $1 serves $WG_N devices after $((SECONDS - t0)) s"
}

wg_export() { # X: one tcm_loop target with every LUN of gateway X
  local tp=$T/loopback/${WG_WWN[$1]}/tpgt_1 i
  mkdir -p "$tp" || { why="mkdir $tp"; return 1; }
  echo -n "naa.50014050000000${1}3" >"$tp/nexus" || { why="nexus of $tp"; return 1; }
  for ((i = 0; i < WG_N; i++)); do
    if ! { mkdir -p "$tp/lun/lun_$i" &&
      ln -s "$T/core/user_0/$(wg_name "$1" $i)" "$tp/lun/lun_$i/$(wg_name "$1" $i)" &&
      echo "gw_$1" >"$tp/lun/lun_$i/alua_tg_pt_gp"; }; then
      why="LUN $i of gateway $1"
      return 1
    fi
  done
}

wg_host() { cut -d: -f1 "$T/loopback/${WG_WWN[$1]}/tpgt_1/address"; } # X: its SCSI host
wg_sd() {                                                              # X I: the sd node of LUN I on gateway X's path
  local b
  for b in /sys/class/scsi_disk/"$(wg_host "$1")":0:1:"$2"/device/block/sd*; do
    [ -e "$b" ] && { echo "/dev/$(basename "$b")"; return 0; }
  done
  return 1
}
wg_ndisks() { # X: LUNs of gateway X with a disk
  local i n=0
  for ((i = 0; i < WG_N; i++)); do wg_sd "$1" $i >/dev/null && n=$((n + 1)); done
  echo $n
}
wg_all_disks() { [ "$(wg_ndisks a)" = "$WG_N" ] && [ "$(wg_ndisks b)" = "$WG_N" ]; }
wg_all_active() { [ "$(wg_active "$1")" = "$WG_N" ]; } # X: every LUN Active/Optimized on X

# Gateway A takes every lock: SET TARGET PORT GROUPS (Active/Optimized for
# its own group) through its path.
t_wg_a_owns_all() {
  local i
  wait_for $((60 + WG_N)) wg_all_disks ||
    { why="disks: $(wg_ndisks a) on A's path, $(wg_ndisks b) on B's, want $WG_N each"; return 1; }
  for ((i = 0; i < WG_N; i++)); do
    sg_stpg --optimized "$(wg_sd a $i)" >/dev/null 2>&1 || sg_stpg --optimized "$(wg_sd a $i)" ||
      { why="STPG through A's path to LUN $i failed twice"; return 1; }
  done
  wait_for 120 wg_all_active a ||
    { why="A is Active/Optimized for $(wg_active a) of $WG_N LUNs"; return 1; }
  echo "A holds all $WG_N locks"
}

wg_status() { "$BIN" status --run-dir "/run/tcmu-rbd-wg-$1" 2>/dev/null; } # X
wg_active() { wg_status "$1" | grep -c 'alua=active/optimized lock=mine'; } # X: LUNs Active/Optimized on X

wg_maps() { multipath -ll 2>/dev/null | awk '/dm-[0-9]+/ {print $1}'; }

t_wg_multipath() {
  MP_LUN=":0:1:[0-9]+" mp_start $((2 * WG_N)) || return 1
  wait_for $((60 + 3 * WG_N)) sh -c "for m in \$(multipath -ll | awk '/dm-[0-9]+/ {print \$1}'); do [ -b /dev/mapper/\$m ] || exit 1; done" ||
    { why="not every map has its /dev/mapper node after $((60 + 3 * WG_N)) s"; return 1; }
  expect "multipath maps" "$(wg_maps | wc -l)" "$WG_N" || return 1
  # Every map's active group is A's path (prio alua: A/O 50 over standby).
  wait_for $((60 + 3 * WG_N)) sh -c "[ \$(multipath -ll | grep -c 'prio=50 status=active') = $WG_N ]" ||
    { why="$(multipath -ll | grep -c 'prio=50 status=active') of $WG_N maps have an active optimized group"; multipath -ll | head -40; return 1; }
}

t_wg_kill_and_verify() {
  local maps=() fpids=() k rc bad=0 t_all m
  # (No process substitution: the guest's chroot has no /dev/fd.)
  for m in $(wg_maps | head -"$WG_FIO"); do maps+=("$m"); done
  [ "${#maps[@]}" = "$WG_FIO" ] || { why="${#maps[@]} maps for fio, want $WG_FIO"; return 1; }
  for k in "${!maps[@]}"; do
    timeout 900 fio --name="wg$k" --filename="/dev/mapper/${maps[$k]}" --direct=1 --ioengine=libaio --iodepth=4 \
      --rw=randwrite --bs=4k --size=8m --verify=crc32c --do_verify=1 --verify_fatal=1 \
      --randrepeat=0 --output="$S/wg-fio-$k.out" >/dev/null 2>&1 &
    fpids+=($!)
  done
  sleep 5
  for k in "${!fpids[@]}"; do
    kill -0 "${fpids[$k]}" 2>/dev/null || { why="fio $k ended before the kill"; cat "$S/wg-fio-$k.out"; return 1; }
  done
  WG_T_KILL=$(date +%s.%N)
  # What B logs from here on is the failover (a LUN can move before, by
  # handoff, when multipathd switches a map under load).
  WG_B_LOG_AT=$(stat -c %s "$OUT/daemon-wg-b.log")
  echo "$(date +%T.%N) kill -9 gateway A (pid ${WG_PID[a]})"
  kill -9 "${WG_PID[a]}"
  wait "${WG_PID[a]}" 2>/dev/null
  wait_for 600 wg_all_active b ||
    { why="B is Active/Optimized for $(wg_active b) of $WG_N LUNs 600 s after the kill"; return 1; }
  t_all=$(date +%s.%N)
  echo "all $WG_N LUNs Active/Optimized on B $(awk "BEGIN {printf \"%.1f\", $t_all - $WG_T_KILL}") s after the kill"
  echo "wholegw.kill_to_all_active_s=$(awk "BEGIN {printf \"%.1f\", $t_all - $WG_T_KILL}")" >>"$WG_TXT"
  for k in "${!fpids[@]}"; do
    wait "${fpids[$k]}"
    rc=$?
    grep -E "err=|verify|WRITE:|READ:" "$S/wg-fio-$k.out" | head -5
    [ $rc -eq 0 ] || { echo "fio $k on ${maps[$k]}: exit $rc"; cat "$S/wg-fio-$k.out"; bad=1; }
  done
  [ $bad = 0 ] || { why="fio verify failed across the failover (see checks.log)"; return 1; }
  echo "fio verify passed on ${#maps[@]} maps across the kill"
}

# B fenced A's client once, not once per image, and every takeover
# finished; the takeovers' span and the slowest one.
t_wg_fenced_once() {
  local log=$OUT/daemon-wg-b.log after n_fence n_done n_before n_adopted first last slowest
  after=$(mktemp)
  tail -c +$((${WG_B_LOG_AT:-0} + 1)) "$log" >"$after"
  n_fence=$(grep -c "fencing the lock owner: osd blocklist add" "$log")
  n_done=$(grep -c "takeover done" "$log")
  n_before=$((n_done - $(grep -c "takeover done" "$after")))
  n_adopted=$(grep -c "taking the exclusive lock why=\"adopting" "$after")
  first=$(grep -m1 "taking the exclusive lock" "$after" | cut -d' ' -f1)
  last=$(grep "takeover done" "$after" | tail -1 | cut -d' ' -f1)
  slowest=$(grep "takeover done" "$after" | grep -oE 'ms=[0-9]+' | cut -d= -f2 | sort -n | tail -1)
  rm -f "$after"
  {
    echo "wholegw.luns=$WG_N"
    echo "wholegw.blocklist_adds=$n_fence"
    # The host counts the monitor's commands for this address.
    echo "wholegw.fenced_owner=$(grep -m1 "fencing the lock owner: osd blocklist add" "$log" | grep -oE 'owner=[^ ]+' | cut -d= -f2)"
    echo "wholegw.takeovers=$n_done"
    echo "wholegw.handovers_before_kill=$n_before"
    echo "wholegw.adopted_after_kill=$n_adopted"
    [ -n "$first" ] && [ -n "$last" ] &&
      echo "wholegw.takeover_span_s=$(awk "BEGIN {printf \"%.2f\", $(date -d "$last" +%s.%N) - $(date -d "$first" +%s.%N)}")"
    [ -n "$first" ] && [ -n "$WG_T_KILL" ] &&
      echo "wholegw.kill_to_first_takeover_s=$(awk "BEGIN {printf \"%.2f\", $(date -d "$first" +%s.%N) - $WG_T_KILL}")"
    echo "wholegw.slowest_takeover_ms=${slowest:-?}"
    echo "wholegw.b_threads=$(sed -n 's/^Threads:[[:space:]]*//p' /proc/"${WG_PID[b]}"/status)"
  } >>"$WG_TXT"
  cat "$WG_TXT"
  expect "takeovers on B" "$n_done" "$WG_N" || return 1
  expect "osd blocklist add calls by B" "$n_fence" 1
}

wg_cleanup() {
  local x i tp
  multipath -F >/dev/null 2>&1
  multipathd shutdown >/dev/null 2>&1
  if [ -n "${WG_PID[b]:-}" ] && kill -0 "${WG_PID[b]}" 2>/dev/null; then
    kill -TERM "${WG_PID[b]}"
    wait_for 120 sh -c "! kill -0 ${WG_PID[b]}" || echo "daemon B still running 120 s after SIGTERM"
  fi
  for x in a b; do
    tp=$T/loopback/${WG_WWN[$x]}/tpgt_1
    for ((i = 0; i < WG_N; i++)); do
      rm -f "$tp/lun/lun_$i/$(wg_name "$x" $i)" 2>/dev/null
      rmdir "$tp/lun/lun_$i" 2>/dev/null
    done
    rmdir "$tp" "$(dirname "$tp")" 2>/dev/null
    for ((i = 0; i < WG_N; i++)); do
      rmdir "$T/core/user_0/$(wg_name "$x" $i)/alua/gw_$x" 2>/dev/null
      timeout 60 rmdir "$T/core/user_0/$(wg_name "$x" $i)"
    done
  done
  umount /etc 2>/dev/null
  return 0
}

t_wg_logs_clean() {
  # shellcheck disable=SC2034 # why: read by check()
  if grep -nE "terminate called|what\(\):|Aborted|panicked|Segmentation|core dumped" \
    "$OUT/daemon-wg-a.log" "$OUT/daemon-wg-b.log"; then
    why="a gateway's log shows a crash (see above)"
    return 1
  fi
}

suite_wholegw() {
  : >"$WG_TXT"
  check wholegw.cluster_reachable ok rbd_cli info rbd/wg000 || return 1
  check wholegw.shared_daemon_stop stop_daemon || return 1
  WG_PID=()
  WG_SERIAL=()
  if check wholegw.backstores_a wg_backstores a && check wholegw.backstores_b wg_backstores b &&
    check wholegw.daemon_a wg_daemon a && check wholegw.daemon_b wg_daemon b &&
    check wholegw.export_a wg_export a && check wholegw.export_b wg_export b &&
    check wholegw.a_owns_all t_wg_a_owns_all && check wholegw.multipath t_wg_multipath; then
    check wholegw.kill_a_fio_verify t_wg_kill_and_verify
    check wholegw.fenced_once t_wg_fenced_once
  fi
  check wholegw.cleanup wg_cleanup
  check wholegw.logs_clean t_wg_logs_clean
  check wholegw.shared_daemon_restart start_daemon
}
