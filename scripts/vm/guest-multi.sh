# shellcheck shell=bash
# The VM stage's four-LUN benchmark ("multi", not in the default suites;
# scripts/bench-vm.sh with VM_SUITES=multi). Sourced by scripts/vm/guest.sh,
# whose helpers (check, ok, mk_backstore, mk_loop, start_daemon, ...) it uses.
#
# Does the aggregate of several busy LUNs on one daemon scale, or collapse
# onto one thread? Four rbd LUNs (rbd/multi0-3, one image each, each its
# own tcm_loop target) served by one daemon; fio 4K QD32 randwrite then
# randread on LUN 0 alone, then on all four at once (one job per disk,
# QD32 each). tcmu-rbd and tcmu-runner alternate (rbd, runner, runner,
# rbd). The table (multi.txt) shows, per daemon and pattern, one LUN's
# IOPS, the four's sum, and the slowest and fastest of the four (a LUN
# starved by its neighbours shows as a low minimum). Only fio's success is
# checked.

MU_N=4
MU_TXT=$OUT/multi.txt

# mu_fio LABEL ROUND RW NDISKS: fio on the first NDISKS of MU_DEVS.
mu_fio() {
  local label=$1 rnd=$2 rw=$3 n=$4 i args=()
  for ((i = 0; i < n; i++)); do
    args+=(--name="lun$i" --filename="/dev/${MU_DEVS[$i]}")
  done
  ok timeout 120 fio --ioengine=libaio --direct=1 --iodepth=32 --rw="$rw" --bs=4k --size=256m \
    --time_based --runtime=10 --ramp_time=2 --randrepeat=0 --output-format=json \
    --output="$OUT/multi.$label.$rw.$n.$rnd.json" "${args[@]}"
}

# mu_round LABEL ROUND: the running daemon serves the four LUNs for one
# round of both patterns, then they are removed.
mu_round() {
  local label=$1 rnd=$2 i rw made=0 rc=0
  MU_DEVS=()
  for ((i = 0; i < MU_N; i++)); do
    if ! check "multi.$label.$rnd.create$i" mk_backstore "multi$i" rbd \
      "rbd/multi$i;conf=$CEPH_CONF_GUEST;id=admin" $((1 << 30)); then
      rc=1
      break
    fi
    if ! check "multi.$label.$rnd.export$i" mk_loop "multi$i" "naa.50014050000000a$i"; then
      rc=1
      made=$((i + 1))
      break
    fi
    MU_DEVS+=("$DEV")
    made=$((i + 1))
  done
  if [ $rc = 0 ]; then
    for rw in randwrite randread; do
      check "multi.$label.$rnd.$rw.one" mu_fio "$label" "$rnd" $rw 1
      check "multi.$label.$rnd.$rw.four" mu_fio "$label" "$rnd" $rw $MU_N
    done
  fi
  for ((i = 0; i < MU_N; i++)); do
    rm_loop "multi$i" "naa.50014050000000a$i" >/dev/null 2>&1
    rm_backstore "multi$i" >/dev/null 2>&1
  done
  [ "$made" = $MU_N ] || return 1
  return $rc
}

mu_table() {
  python3 - "$OUT" >"$MU_TXT" <<'PY'
import glob, json, os, re, sys
out = sys.argv[1]
runs = {}
for f in sorted(glob.glob(os.path.join(out, "multi.*.json"))):
    m = re.match(r"multi\.(.+)\.(randwrite|randread)\.(\d)\.(\d)\.json$", os.path.basename(f))
    if not m:
        continue
    label, rw, n, rnd = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    try:
        j = json.load(open(f))
    except ValueError:
        continue
    key = "write" if rw == "randwrite" else "read"
    iops = [job[key]["iops"] for job in j["jobs"]]
    runs.setdefault((label, rw, n), []).append(iops)
print("four LUNs on one daemon: fio 4K QD32 per LUN (libaio, direct, tcm_loop), rbd/multi0-3 (1 GiB each),")
print("10 s after 2 s of ramp; one LUN alone, then all four at once; mean of the rounds")
print(f"  {'daemon':<12} {'pattern':<10} {'1 LUN':>7} {'4 LUNs sum':>11} {'ratio':>6} {'slowest':>8} {'fastest':>8}  rounds (sum)")
for label in ("tcmu-rbd", "tcmu-runner"):
    for rw in ("randwrite", "randread"):
        one = runs.get((label, rw, 1), [])
        four = runs.get((label, rw, 4), [])
        if not one or not four:
            continue
        o = sum(r[0] for r in one) / len(one)
        sums = [sum(r) for r in four]
        s = sum(sums) / len(sums)
        lo = min(min(r) for r in four)
        hi = max(max(r) for r in four)
        print(f"  {label:<12} {rw:<10} {o:>7.0f} {s:>11.0f} {s / o:>5.2f}x {lo:>8.0f} {hi:>8.0f}  "
              + ", ".join(f"{x:.0f}" for x in sums))
PY
  cat "$MU_TXT"
}

suite_multi() {
  abba multi mu_round || return 1
  check multi.table mu_table
}
