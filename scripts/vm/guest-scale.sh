# shellcheck shell=bash
# The VM stage's scale suite ("scale", not in the default suites). Sourced
# by scripts/vm/guest.sh, whose helpers (check, ok, wait_for, stop_daemon,
# start_daemon, start_tcmu_runner, ...) it uses.
#
# What N LUNs on one daemon cost (VM_SCALE_N, default 256, rounded down to
# a multiple of 4): a quarter rbd LUNs with an ALUA group as a ceph-iscsi
# gateway makes it (`ao`, implicit only: HA), a quarter rbd LUNs without
# groups (single gateway), a quarter file, a quarter ram. The backstores
# are made through configfs (mkdir, control, unit serial, enable: the
# kernel waits for the daemon's netlink reply) and are not linked to a
# fabric. Measured: the time to create them all until the daemon holds
# every uio device, its threads (by name), RSS and open fds, its CPU over
# 30 s with every LUN idle, the time from a restart to all served (with
# tcmu.conf's default per-image service-map clients and with
# `service_map = off`), the time to remove them all, and fds, RSS and
# threads over VM_SCALE_CYCLES (default 50) create/remove cycles of one
# LUN of each kind. Then the same for tcmu-runner 1.5.4 with its rbd
# LUNs (it has no ram or plain file handler). The figures go to
# $OUT/scale.txt; checks assert only what must hold (all served, the
# daemon alive, everything removed, no fd or thread growth over the
# cycles), never a time or a size.

SC_N=$((${VM_SCALE_N:-256} / 4 * 4))
SC_Q=$((SC_N / 4))
SC_CYCLES=${VM_SCALE_CYCLES:-50}
# Each side's cycles stop after this many seconds (at least 6 cycles).
SC_CYCLE_S=${VM_SCALE_CYCLE_S:-420}
SC_TXT=$OUT/scale.txt
SC_KV=$OUT/scale.kv
SC_DLOG=$OUT/daemon-scale.log
SC_CONF=$S/scale-tcmu.conf
# What a LUN is: ha (rbd, ALUA group), sg (rbd, single gateway), fl
# (file), rm (ram); its name is the kind and a number.
SC_KINDS="ha sg fl rm"

sc_say() { echo "$*" | tee -a "$SC_TXT"; }
sc_rec() { echo "$1=$2" >>"$SC_KV"; } # KEY VALUE, for the table at the end
sc_now() { date +%s.%N; }
sc_since() { awk "BEGIN {printf \"%.1f\", $(sc_now) - $1}"; } # T0: seconds since

sc_name() { printf '%s%03d' "$1" "$2"; } # KIND I
# sc_cfg KIND I: the backstore's control string.
sc_cfg() {
  case $1 in
    ha) echo "dev_size=$((64 << 20)),dev_config=rbd/rbd/scale$(printf %03d "$2");conf=$CEPH_CONF_GUEST;id=admin,hw_max_sectors=1024" ;;
    sg) echo "dev_size=$((64 << 20)),dev_config=rbd/rbd/scale$(printf %03d $(($2 + SC_Q)));conf=$CEPH_CONF_GUEST;id=admin,hw_max_sectors=1024" ;;
    fl) echo "dev_size=$((64 << 20)),dev_config=file/$S/scale/$(sc_name fl "$2").img,hw_max_sectors=1024" ;;
    rm) echo "dev_size=$((16 << 20)),dev_config=ram/-,hw_max_sectors=1024" ;;
  esac
}

# sc_mk KIND I: one backstore, made as targetcli/ceph-iscsi make it
# (builtins where possible: a process costs tens of ms under emulation).
# The enable waits for the daemon's reply, bounded.
sc_mk() {
  local n d
  n=$(sc_name "$1" "$2")
  d=$T/core/user_0/$n
  # The HBA: made with the first backstore, kept after the last one.
  [ -d "$T/core/user_0" ] || mkdir -p "$T/core/user_0"
  mkdir "$d" || { why="mkdir $n"; return 1; }
  echo -n "$(sc_cfg "$1" "$2")" >"$d/control" || { why="control of $n"; return 1; }
  printf '5ca1e000-0000-4000-8000-%012d' "$((RANDOM * 32768 + RANDOM))" >"$d/wwn/vpd_unit_serial" ||
    { why="serial of $n"; return 1; }
  if [ "$1" = ha ]; then
    # ceph-iscsi's group on the owning gateway: `ao`, implicit ALUA only.
    if ! { mkdir "$d/alua/ao" && echo 1 >"$d/alua/ao/tg_pt_gp_id" && echo 1 >"$d/alua/ao/alua_access_type"; }; then
      why="ALUA group of $n"
      return 1
    fi
  fi
  timeout 300 sh -c "echo -n 1 > '$d/enable'" || { why="enable of $n failed or hung"; return 1; }
}
# sc_rm KIND I: remove one backstore (its group first).
sc_rm() {
  local d
  d=$T/core/user_0/$(sc_name "$1" "$2")
  [ -d "$d" ] || return 0
  [ -d "$d/alua/ao" ] && rmdir "$d/alua/ao"
  timeout 300 rmdir "$d" || { why="rmdir $d failed or hung"; return 1; }
}

# Per process: uio devices held, open fds, threads, RSS (kB), CPU ticks.
# (/proc/PID/fd holds numbers only: ls is fine there.)
# shellcheck disable=SC2010
sc_nserved() { ls -l /proc/"$1"/fd 2>/dev/null | grep -c ' /dev/uio[0-9]*$'; }
# shellcheck disable=SC2012
sc_fds() { ls /proc/"$1"/fd 2>/dev/null | wc -l; }
sc_threads() { sed -n 's/^Threads:[[:space:]]*//p' /proc/"$1"/status; }
sc_rss() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' /proc/"$1"/status; }
sc_ticks() { sed 's/.*) //' /proc/"$1"/stat | awk '{print $12 + $13}'; }
# sc_wait_served PID N SECONDS: until PID holds N uio devices.
sc_wait_served() {
  local end=$((SECONDS + $3)) got
  while :; do
    got=$(sc_nserved "$1")
    [ "$got" -eq "$2" ] && return 0
    kill -0 "$1" 2>/dev/null || { why="pid $1 died with $got of $2 devices served"; return 1; }
    [ $SECONDS -ge $end ] && { why="$got of $2 devices served after $3 s"; return 1; }
    sleep 0.5
  done
}

# sc_snap LABEL PHASE PID: threads, RSS, fds, and the threads grouped by
# name (trailing digits dropped: tcmu-ha012 counts as tcmu-ha).
sc_snap() {
  local t r f
  t=$(sc_threads "$3") r=$(sc_rss "$3") f=$(sc_fds "$3")
  sc_rec "$1.$2.threads" "$t"
  sc_rec "$1.$2.rss_mib" "$((r / 1024))"
  sc_rec "$1.$2.fds" "$f"
  sc_say "$1 $2: threads $t, RSS $((r / 1024)) MiB ($r kB), fds $f, uio devices held $(sc_nserved "$3")"
  {
    echo "== $1 $2 (pid $3): threads by name"
    cat /proc/"$3"/task/*/comm | sed -E 's/[0-9]+$//' | sort | uniq -c | sort -rn
    echo "== $1 $2: fds by target"
    # shellcheck disable=SC2012
    ls -l /proc/"$3"/fd | sed -n 's/.* -> //p' | sed -E 's/[0-9]+/N/g' | sort | uniq -c | sort -rn
  } >>"$OUT/scale-threads.txt"
}
# sc_task_ticks PID: "name ticks" per thread (utime+stime, trailing
# digits of the name dropped).
sc_task_ticks() {
  # One awk over every thread's stat (not three processes per thread: with
  # 1,500 threads under emulation that took minutes). Field 2 is the name
  # in parentheses (the daemon's and librados' thread names have no
  # spaces), fields 14 and 15 utime and stime.
  awk '{ n = $2; gsub(/[()]/, "", n); sub(/[0-9]+$/, "", n); print n, $14 + $15 }' \
    /proc/"$1"/task/*/stat 2>/dev/null
}
# sc_idle LABEL PHASE PID: CPU over 30 s, as % of one core, and which
# threads (by name) spent it (scale-threads.txt).
sc_idle() {
  local hz t0 c0 c1 el pct
  hz=$(getconf CLK_TCK)
  sc_task_ticks "$3" >"$S/ticks0"
  t0=$(sc_now) c0=$(sc_ticks "$3")
  sleep 30
  c1=$(sc_ticks "$3")
  # The window ends here, before the per-thread snapshot (which takes a
  # while and is not part of it).
  el=$(sc_since "$t0")
  sc_task_ticks "$3" >"$S/ticks1"
  {
    echo "== $1 $2: idle CPU ticks (1/$hz s) over 30 s by thread name"
    awk 'NR == FNR {a[$1] -= $2; next} {a[$1] += $2} END {for (k in a) if (a[k] > 0) print a[k], k}' \
      "$S/ticks0" "$S/ticks1" | sort -rn | head -15
  } >>"$OUT/scale-threads.txt"
  pct=$(awk "BEGIN {printf \"%.2f\", 100 * ($c1 - $c0) / $hz / $el}")
  sc_rec "$1.$2.idle_cpu_pct" "$pct"
  sc_say "$1 $2: idle CPU $pct% of one core ($((c1 - c0)) ticks of 1/$hz s in $el s)"
}

# sc_create_all LABEL KINDS PID: every LUN of KINDS, timed per kind.
sc_create_all() {
  local k i t0 tk want=0 bad=0
  t0=$(sc_now)
  for k in $2; do
    tk=$(sc_now)
    for ((i = 0; i < SC_Q; i++)); do
      if sc_mk "$k" "$i"; then
        want=$((want + 1))
      else
        echo "create $(sc_name "$k" "$i"): $why"
        bad=$((bad + 1))
      fi
    done
    sc_wait_served "$3" "$want" 300 || { echo "after kind $k: $why"; bad=$((bad + 1)); }
    sc_rec "$1.create_$k.s" "$(sc_since "$tk")"
    sc_say "$1: created $SC_Q $k LUNs in $(sc_since "$tk") s"
  done
  sc_rec "$1.create.s" "$(sc_since "$t0")"
  sc_say "$1: created $want LUNs in $(sc_since "$t0") s (served: $(sc_nserved "$3"))"
  [ $bad -eq 0 ] || { why="$bad LUNs failed to create or be served (see checks.log)"; return 1; }
  expect "uio devices held" "$(sc_nserved "$3")" "$((SC_Q * $(echo "$2" | wc -w)))"
}
# sc_remove_all LABEL KINDS PID
sc_remove_all() {
  local k i t0 bad=0
  t0=$(sc_now)
  for k in $2; do
    for ((i = 0; i < SC_Q; i++)); do
      sc_rm "$k" "$i" || { echo "remove $(sc_name "$k" "$i"): $why"; bad=$((bad + 1)); }
    done
  done
  sc_rec "$1.remove.s" "$(sc_since "$t0")"
  sc_say "$1: removed them all in $(sc_since "$t0") s"
  [ $bad -eq 0 ] || { why="$bad LUNs failed to be removed"; return 1; }
  wait_for 60 sh -c "[ \$(ls -l /proc/$3/fd | grep -c ' /dev/uio') = 0 ]" ||
    { why="pid $3 still holds $(sc_nserved "$3") uio devices"; return 1; }
  kill -0 "$3" || { why="pid $3 died"; return 1; }
}

# The daemon with the scale suite's tcmu.conf (service_map as given).
sc_conf() { printf 'log_level = 3\nlog_dir = /tmp\nservice_map = %s\n' "$1" >"$SC_CONF"; }
# Both daemons run with the open-file limit their systemd units give them
# (systemd/tcmu-rbd.service: LimitNOFILE=1048576; tcmu-runner's 1000000):
# with the shell's default soft limit of 1024 the daemon served 113 LUNs
# of this mix (the rbd ones with their service-map clients, 9 fds each)
# and refused every later one with EMFILE.
sc_start_daemon() {
  SC_READY0=$(grep -c ' ready ' "$SC_DLOG" 2>/dev/null)
  echo "--- daemon start $(date +%T)" >>"$SC_DLOG"
  (
    ulimit -n 1048576
    NO_COLOR=1 exec "$BIN" --log-stderr --no-dbus --run-dir /run/tcmu-rbd -c "$SC_CONF"
  ) >>"$SC_DLOG" 2>&1 &
  DPID=$!
}
sc_start_tcmu_runner() {
  local rc
  ulimit -n 1000000
  start_tcmu_runner
  rc=$?
  ulimit -n 1024
  return $rc
}
# sc_nuio: the uio devices there are (enabled backstores).
sc_nuio() { find /sys/class/uio -mindepth 1 -maxdepth 1 -name 'uio*' | wc -l; }
# sc_ready: the daemon started last logged 'ready' (scanned, listening).
sc_ready() { [ "$(grep -c ' ready ' "$SC_DLOG")" -gt "${SC_READY0:-0}" ]; }
# sc_stop: SIGTERM, as stop_daemon, but with time for hundreds of
# devices to close (SIGKILL after 300 s, which fails the check).
sc_stop() {
  daemon_alive || return 0
  kill -TERM "$DPID"
  if ! wait_for 300 sh -c "! kill -0 $DPID"; then
    kill -KILL "$DPID"
    why="pid $DPID did not exit within 300 s of SIGTERM"
    wait "$DPID" 2>/dev/null
    DPID=
    return 1
  fi
  wait "$DPID" 2>/dev/null
  DPID=
}
# sc_restart LABEL PHASE N START_FN: SIGTERM, start, time to N served.
sc_restart() {
  local t0
  t0=$(sc_now)
  sc_stop || return 1
  sc_rec "$1.$2.stop_s" "$(sc_since "$t0")"
  sc_say "$1 $2: stopped (SIGTERM to exit) in $(sc_since "$t0") s"
  t0=$(sc_now)
  "$4" || return 1
  sc_wait_served "$DPID" "$3" 300 || return 1
  sc_rec "$1.$2.restart_s" "$(sc_since "$t0")"
  sc_say "$1 $2: start to all $3 served in $(sc_since "$t0") s"
}

# sc_cycles LABEL KINDS COUNT PID: create and remove one LUN of each of
# KINDS COUNT times (or until SC_CYCLE_S seconds have passed); fds, RSS and threads after cycle 1, 5 (the base:
# the first cycles warm librados up) and every 10th; the fds and threads
# at the end may not exceed the base by more than 2.
sc_cycles() {
  local c k t0 base_f='' base_t='' f t r end=$((SECONDS + SC_CYCLE_S)) last=$3
  t0=$(sc_now)
  for ((c = 1; c <= last; c++)); do
    for k in $2; do
      sc_mk "$k" 0 || { why="cycle $c: create $k: $why"; return 1; }
    done
    sc_wait_served "$4" "$(echo "$2" | wc -w)" 120 || { why="cycle $c: $why"; return 1; }
    for k in $2; do
      sc_rm "$k" 0 || { why="cycle $c: remove $k: $why"; return 1; }
    done
    wait_for 60 sh -c "[ \$(ls -l /proc/$4/fd | grep -c ' /dev/uio') = 0 ]" ||
      { why="cycle $c: uio devices still held after removal"; return 1; }
    # Out of time: this cycle is the last (at least 6 run).
    [ $SECONDS -ge $end ] && [ $c -ge 6 ] && last=$c
    if [ $c = 1 ] || [ $c = 5 ] || [ $((c % 10)) = 0 ] || [ $c = "$last" ]; then
      f=$(sc_fds "$4") t=$(sc_threads "$4") r=$(sc_rss "$4")
      echo "$1 cycle $c: fds $f threads $t RSS $r kB" | tee -a "$OUT/scale-cycles.txt"
      [ $c = 5 ] && base_f=$f base_t=$t
    fi
  done
  sc_rec "$1.cycles" "$last"
  sc_rec "$1.cycles.s" "$(sc_since "$t0")"
  sc_say "$1: $last create/remove cycles of one LUN each of ($2) in $(sc_since "$t0") s:"
  grep "^$1 cycle" "$OUT/scale-cycles.txt" | sed 's/^/  /' | tee -a "$SC_TXT"
  [ -n "$base_f" ] || return 0
  sc_rec "$1.cycles.fd_growth" "$((f - base_f))"
  sc_rec "$1.cycles.thread_growth" "$((t - base_t))"
  sc_rec "$1.cycles.rss_end_kb" "$r"
  [ $((f - base_f)) -le 2 ] || { why="fds grew from $base_f (cycle 5) to $f (cycle $last)"; return 1; }
  [ $((t - base_t)) -le 2 ] || { why="threads grew from $base_t (cycle 5) to $t (cycle $last)"; return 1; }
}

sc_daemon_log_clean() {
  if grep -nE "panicked|terminate called|Segmentation|could not (reset|block|unblock)" "$SC_DLOG"; then
    why="the daemon's log shows a crash or a failed ring reset"
    return 1
  fi
}

# The side-by-side table from the recorded figures.
sc_table() {
  /usr/bin/python3 - "$SC_KV" "$SC_N" <<'PY' | tee -a "$SC_TXT"
import sys
kv = {}
for line in open(sys.argv[1]):
    k, _, v = line.strip().partition("=")
    kv[k] = v
n = int(sys.argv[2])
def g(k):
    return kv.get(k, "-")
rows = [
    ("LUNs served", f"{n} (rbd HA/single, file, ram: {n // 4} each)", f"{n // 2} (rbd HA/single: {n // 4} each)"),
    ("create all (s)", g("tcmu-rbd.create.s"), g("tcmu-runner.create.s")),
    ("  of which rbd HA (s)", g("tcmu-rbd.create_ha.s"), g("tcmu-runner.create_ha.s")),
    ("  of which rbd single (s)", g("tcmu-rbd.create_sg.s"), g("tcmu-runner.create_sg.s")),
    ("  of which file (s)", g("tcmu-rbd.create_fl.s"), "-"),
    ("  of which ram (s)", g("tcmu-rbd.create_rm.s"), "-"),
    ("threads", g("tcmu-rbd.created.threads"), g("tcmu-runner.created.threads")),
    ("RSS (MiB)", g("tcmu-rbd.created.rss_mib"), g("tcmu-runner.created.rss_mib")),
    ("open fds", g("tcmu-rbd.created.fds"), g("tcmu-runner.created.fds")),
    ("idle CPU (% of a core)", g("tcmu-rbd.created.idle_cpu_pct"), g("tcmu-runner.created.idle_cpu_pct")),
    ("stop (SIGTERM to exit, s)", g("tcmu-rbd.restart.stop_s"), g("tcmu-runner.restart.stop_s")),
    ("restart to all served (s)", g("tcmu-rbd.restart.restart_s"), g("tcmu-runner.restart.restart_s")),
    ("service_map=off: restart (s)", g("tcmu-rbd.nomap.restart_s"), "-"),
    ("service_map=off: threads", g("tcmu-rbd.nomap.threads"), "-"),
    ("service_map=off: RSS (MiB)", g("tcmu-rbd.nomap.rss_mib"), "-"),
    ("service_map=off: fds", g("tcmu-rbd.nomap.fds"), "-"),
    ("service_map=off: idle CPU (%)", g("tcmu-rbd.nomap.idle_cpu_pct"), "-"),
    ("remove all (s)", g("tcmu-rbd.remove.s"), g("tcmu-runner.remove.s")),
    ("create/remove cycles run", g("tcmu-rbd.cycles"), g("tcmu-runner.cycles")),
    ("  cycles took (s)", g("tcmu-rbd.cycles.s"), g("tcmu-runner.cycles.s")),
    ("  fd growth cycle 5 to end", g("tcmu-rbd.cycles.fd_growth"), g("tcmu-runner.cycles.fd_growth")),
    ("  thread growth cycle 5 to end", g("tcmu-rbd.cycles.thread_growth"), g("tcmu-runner.cycles.thread_growth")),
]
print()
print(f"| {'':<32} | {'tcmu-rbd':<44} | {'tcmu-runner 1.5.4':<36} |")
print(f"|{'-' * 34}|{'-' * 46}|{'-' * 38}|")
for name, a, b in rows:
    print(f"| {name:<32} | {a:<44} | {b:<36} |")
PY
}

suite_scale() {
  local L=tcmu-rbd
  : >"$SC_TXT"
  : >"$SC_KV"
  : >"$OUT/scale-threads.txt"
  : >"$OUT/scale-cycles.txt"
  mkdir -p "$S/scale"
  sc_say "scale: $SC_N LUNs ($SC_Q each of rbd HA (ALUA group ao), rbd single gateway, file, ram)," \
    "$SC_CYCLES create/remove cycles; guest $(nproc) vCPUs (QEMU TCG), $(($(sed -n 's/MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo) / 1024)) MiB"
  check scale.cluster_reachable ok rbd_cli info rbd/scale000 || return 1
  # The suite's own daemon, with its own tcmu.conf.
  check scale.shared_daemon_stop sc_stop || return 1
  sc_conf per_image
  sc_start_daemon
  check scale.$L.start wait_for 30 sc_ready || return 1
  sc_snap $L empty "$DPID"
  check scale.$L.create_all sc_create_all $L "$SC_KINDS" "$DPID"
  sc_snap $L created "$DPID"
  sc_idle $L created "$DPID"
  check scale.$L.alive_after_idle ok daemon_alive || return 1
  check scale.$L.restart_all_served sc_restart $L restart "$(sc_nuio)" sc_start_daemon
  sc_snap $L restarted "$DPID"
  # The same without the per-image service-map clients.
  sc_conf off
  check scale.$L.restart_no_service_map sc_restart $L nomap "$(sc_nuio)" sc_start_daemon
  sc_snap $L nomap "$DPID"
  sc_idle $L nomap "$DPID"
  # Back to the default for the cycles (started later).
  sc_conf per_image
  check scale.$L.remove_all sc_remove_all $L "$SC_KINDS" "$DPID"
  sc_snap $L removed "$DPID"
  check scale.$L.stop_for_runner sc_stop

  # tcmu-runner: its rbd LUNs (no ram handler; its file handlers are for
  # ZBC and optical media). Before the cycles, which may be cut short.
  L=tcmu-runner
  if check scale.$L.start sc_start_tcmu_runner; then
    sc_snap $L empty "$DPID"
    check scale.$L.create_all sc_create_all $L "ha sg" "$DPID"
    sc_snap $L created "$DPID"
    sc_idle $L created "$DPID"
    check scale.$L.alive_after_idle ok daemon_alive
    check scale.$L.restart_all_served sc_restart $L restart "$(sc_nuio)" sc_start_tcmu_runner
    sc_snap $L restarted "$DPID"
    check scale.$L.remove_all sc_remove_all $L "ha sg" "$DPID"
    sc_snap $L removed "$DPID"
    local rc=$SC_CYCLES
    [ "$rc" -gt 20 ] && rc=20
    SC_CYCLE_S=$((SC_CYCLE_S / 2)) check scale.$L.cycles sc_cycles $L "ha sg" "$rc" "$DPID"
    check scale.$L.stop sc_stop
  fi

  # The daemon's cycles, with the default tcmu.conf.
  L=tcmu-rbd
  sc_start_daemon
  check scale.$L.start_for_cycles wait_for 30 sc_ready || return 1
  check scale.$L.cycles_no_growth sc_cycles $L "$SC_KINDS" "$SC_CYCLES" "$DPID"
  sc_snap $L after_cycles "$DPID"
  check scale.$L.alive_at_end ok daemon_alive
  check scale.$L.stop sc_stop
  check scale.$L.log_clean sc_daemon_log_clean
  # Whatever is left (a failed run), then the shared daemon again.
  for k in $SC_KINDS; do
    for ((i = 0; i < SC_Q; i++)); do sc_rm "$k" "$i" >>"$LOG" 2>&1; done
  done
  sc_table
  check scale.shared_daemon_restart start_daemon
}
