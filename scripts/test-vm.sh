#!/usr/bin/env bash
# The VM stage: the daemon against Debian's own kernel (linux-image-amd64),
# under QEMU (software emulation), with the tools a storage admin uses.
#
# The guest is a busybox initramfs holding the modules needed to reach the
# host (virtio, 9p) and to serve LUNs (configfs, target_core_user,
# tcm_loop, sd_mod, ...). It mounts the host's / read-only over 9p and
# chroots into it, so the host's fio, sg3-utils and the freshly built daemon
# run against the guest's kernel (scripts/vm/init, scripts/vm/guest.sh).
# Results come back over a second, writable 9p share.
#
# Environment:
#   VM_SUITES   guest check groups (default: "local rbd iscsi ceph_iscsi targetcli mpath mpath_iscsi"):
#               local    file and ram LUNs: I/O, SCSI, resize, removal, restart
#               rbd      an rbd LUN on a Ceph micro cluster the guest reaches
#                        over a bridge in a network namespace of this run;
#                        the image is read back on the host with rbd export
#               iscsi    an rbd LUN through LIO's iSCSI target with CHAP and
#                        mutual CHAP; open-iscsi in the guest logs in
#                        (wrong secrets refused) and verifies I/O
#                        (vm/guest-iscsi.sh)
#               ceph_iscsi  ceph-iscsi's rbd-target-api and gwcli on
#                        tcmu-rbd: target, gateway, disk, CHAP host, mapping;
#                        the initiator verifies I/O; gwcli shows the disk
#                        Online and locked by this gateway (the cluster
#                        gets a mgr for the service map) (vm/guest-ceph-iscsi.sh)
#               targetcli  /backstores/user:rbd create through the
#                        daemon's D-Bus service (dbus-daemon in the guest)
#               compare  (not in the default suites: a benchmark,
#                        scripts/bench-vm.sh runs it)
#                        fio 4K randread/randwrite QD32 on one image: librbd
#                        direct (fio ioengine=rbd), tcmu-runner (handler_rbd)
#                        and tcmu-rbd, alternated, with the CPU time per I/O
#                        of the serving process, of fio and of the whole
#                        guest (table in compare.txt)
#               multi    (not in the default suites: a benchmark,
#                        VM_SUITES=multi scripts/bench-vm.sh) four rbd LUNs
#                        on one daemon, fio 4K QD32 on one alone then on all
#                        four, tcmu-rbd and tcmu-runner alternated
#                        (vm/guest-multi.sh; table in multi.txt)
#               mpath    two HA gateways of one rbd image, each its
#                        own daemon (--devices) and tcm_loop target, grouped
#                        by dm-multipath; fio with verification while the
#                        active gateway's daemon is killed (vm/guest-mpath.sh)
#               gateway  (not in the default suites: the README's main job)
#                        fio through the iSCSI initiator, tcmu-rbd vs
#                        tcmu-runner, ceph-iscsi's LUN settings
#               xcopy_bench  (not in the default suites) a 1 GiB clone
#                        between two rbd LUNs over iSCSI: EXTENDED COPY
#                        (sg_xcopy, the copy inside the gateway) against
#                        dd through the initiator (vm/guest-iscsi.sh)
#               scale    (not in the default suites) VM_SCALE_N LUNs (default
#                        256: rbd HA, rbd single gateway, file, ram, a
#                        quarter each) on one daemon: create/remove time,
#                        threads, RSS, fds, idle CPU, restart to all
#                        served, VM_SCALE_CYCLES (default 50) create/remove
#                        cycles (at most VM_SCALE_CYCLE_S, default 420 s);
#                        tcmu-runner with its rbd LUNs
#                        (vm/guest-scale.sh); figures in scale.txt
#               wholegw  (not in the default suites) whole-gateway failover:
#                        VM_WG_N images (default 16; 64 overloads the
#                        emulated guest, see README) exported by two
#                        gateways (two daemons, tcm_loop, dm-multipath),
#                        all owned by A; A killed: every LUN Active/
#                        Optimized on B, A fenced once, fio verify on
#                        VM_WG_FIO maps (default 4) (vm/guest-wholegw.sh);
#                        figures in wholegw.txt
#               mpath_iscsi  the same over LIO iSCSI (two targets, two
#                        portals, open-iscsi sessions) with ceph-iscsi's
#                        implicit-only ALUA: no STPG, I/O moves the lock
#   VM_COMPARE_B_ENV  (compare) also run "tcmu-rbd-B": the daemon with these
#               VAR=value settings (space-separated), a candidate change
#               measured beside the code as it is, in the same boot
#   VM_COMPARE_B_BIN  (compare) the same with another daemon binary
#   VM_COMPARE_CFG    (compare) appended to tcmu-rbd's cfgstring, e.g.
#                     ";merge_kb=0"
#   VM_COMPARE_B_CFG  (compare) the same for tcmu-rbd-B (which then runs
#                     even with neither B_ENV nor B_BIN: the same daemon
#                     with another cfgstring)
#   VM_COMPARE_B_CONF (compare) tcmu.conf lines for tcmu-rbd-B, separated
#                     by ";" (e.g. "idle_poll_us = 0")
#   VM_COMPARE_JOBS   (compare) fio jobs RW:BS:QD (default "randwrite:4k:32
#                     randread:4k:32"; e.g. "write:1m:8 read:1m:8")
#   VM_GW_CFG_EXTRA   (gateway) appended to tcmu-rbd's cfgstring, e.g.
#                     ";merge_kb=0"
#   VM_COMPARE_ATTRS  (compare) more LUN control attributes, e.g.
#                     ",hw_max_sectors=128" (LIO's default; the suite sets
#                     1024) or ",max_data_area_mb=8" (ceph-iscsi's)
#   VM_PROFILE  cargo profile of the daemon under test (default: release)
#   VM_CACHE    initramfs cache (default: target/vm-cache), keyed on kernel
#               version and the init script
#   VM_KEEP=1   keep the result directory
#   VM_TIMEOUT  seconds the guest may run (default 1800)
#   VM_MEM      guest memory, MiB (default 1024; 3072 with the scale suite,
#               whose tcmu-runner opens a rados client per rbd LUN, and
#               with wholegw, two daemons with VM_WG_N images each)
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
t0=$(date +%s)
SUITES=${VM_SUITES:-local rbd iscsi ceph_iscsi targetcli mpath mpath_iscsi}
PROFILE=${VM_PROFILE:-release}
CACHE=${VM_CACHE:-$top/target/vm-cache}
log() { echo "vm: $*"; }
die() { echo "vm: FAIL: $*" >&2; exit 1; }
# The guest sees the host's / but mounts a tmpfs of its own on /tmp.
case "$top/" in /tmp/*) die "the repository is under /tmp ($top), which the guest hides behind its own tmpfs; clone it elsewhere" ;; esac

# What the guest build and the checks need, from Debian packages only.
want_rbd=0
case " $SUITES " in *" rbd "* | *" compare "* | *" multi "* | *" targetcli "* | *" mpath"* | *"iscsi "* | *" gateway "* | *" xcopy_bench "* | *" scale "* | *" wholegw "*) want_rbd=1 ;; esac
extra=()
[ $want_rbd = 1 ] && extra=(ceph-mon ceph-osd ceph-common iproute2 tcmu-runner targetcli-fb
  python3-rtslib-fb dbus-daemon dbus-bin)
case " $SUITES " in *" mpath"*) extra+=(multipath-tools udev) ;; esac
case " $SUITES " in *"iscsi "* | *" gateway "* | *" xcopy_bench "*) extra+=(open-iscsi) ;; esac
case " $SUITES " in *" ceph_iscsi "*) extra+=(ceph-iscsi ceph-mgr) ;; esac
scripts/deps.sh qemu-system-x86 linux-image-amd64 busybox-static kmod cpio \
  fio sg3-utils util-linux curl iproute2 "${extra[@]}"

# The kernel: Debian's newest installed (not the host's running kernel).
kver=$(ls /lib/modules | grep -E -- '-amd64$' | sort -V | tail -1)
[ -n "$kver" ] && [ -f "/boot/vmlinuz-$kver" ] || die "no Debian amd64 kernel in /boot and /lib/modules"
kernel=/boot/vmlinuz-$kver
log "kernel $kver"

# The daemon under test.
if [ "$PROFILE" = release ]; then
  cargo build --release --bin tcmu-rbd
  bin=${CARGO_TARGET_DIR:-$top/target}/release/tcmu-rbd
else
  cargo build --bin tcmu-rbd
  bin=${CARGO_TARGET_DIR:-$top/target}/debug/tcmu-rbd
fi
[ -x "$bin" ] || die "no daemon binary at $bin"

# --- initramfs (cached) ---------------------------------------------------
mods="virtio_pci 9pnet_virtio 9p configfs target_core_user tcm_loop sd_mod sg scsi_dh_alua
  dm_multipath dm_service_time virtio_net iscsi_target_mod iscsi_tcp crc32c_generic"
busybox=$(command -v busybox)
key=$( (echo "$kver $mods"; cat scripts/vm/init; sha256sum "$busybox" "$kernel") | sha256sum | cut -c1-16)
initrd=$CACHE/$kver/initrd-$key.cpio.gz
if [ ! -f "$initrd" ]; then
  log "building initramfs $initrd"
  tb=$(date +%s)
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,proc,sys,dev,host,lib/modules}
  file -L "$busybox" 2>/dev/null | grep -q "statically linked" ||
    ldd "$busybox" 2>&1 | grep -q "not a dynamic" || die "$busybox is not static (busybox-static)"
  cp "$busybox" "$root/bin/busybox"
  cp scripts/vm/init "$root/init"
  chmod +x "$root/init"
  : >"$root/modules.load"
  # Every module with its dependencies, in load order, each once.
  for m in $mods; do
    modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    mkdir -p "$root$(dirname "$ko")"
    case "$ko" in
      *.ko) cp "$ko" "$root$ko" ;;
      *.ko.xz) xz -dc "$ko" >"$root${ko%.xz}"; ko=${ko%.xz} ;;
      *.ko.zst) zstd -qdc "$ko" >"$root${ko%.zst}"; ko=${ko%.zst} ;;
      *) die "unexpected module file $ko" ;;
    esac
    echo "$ko" >>"$root/modules.load"
  done
  depmod -b "$root" "$kver"
  mkdir -p "$CACHE/$kver"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$root"
  log "initramfs built in $(($(date +%s) - tb)) s ($(du -h "$initrd" | cut -f1))"
else
  log "initramfs from cache $initrd"
fi

# --- run the guest --------------------------------------------------------
out=$(mktemp -d /tmp/tcmu-vm.XXXXXX)
chmod 777 "$out"
cat >"$out/env" <<EOF
BIN=$bin
TOP=$top
SUITES="$SUITES"
VM_SCALE_N=${VM_SCALE_N:-256}
VM_SCALE_CYCLES=${VM_SCALE_CYCLES:-50}
VM_SCALE_CYCLE_S=${VM_SCALE_CYCLE_S:-420}
COMPARE_B_ENV="${VM_COMPARE_B_ENV:-}"
COMPARE_B_BIN="${VM_COMPARE_B_BIN:-}"
COMPARE_JOBS="${VM_COMPARE_JOBS:-randwrite:4k:32 randread:4k:32}"
COMPARE_ATTRS="${VM_COMPARE_ATTRS:-}"
COMPARE_CFG="${VM_COMPARE_CFG:-}"
COMPARE_B_CFG="${VM_COMPARE_B_CFG:-}"
COMPARE_B_CONF="${VM_COMPARE_B_CONF:-}"
GW_CFG_EXTRA="${VM_GW_CFG_EXTRA:-}"
VM_WG_N=${VM_WG_N:-16}
VM_WG_FIO=${VM_WG_FIO:-4}
EOF
: >"$out/results"
ns=
cdir=
cleanup() {
  if [ -n "$cdir" ]; then
    ip netns exec "$ns" scripts/ceph-cluster.sh stop "$cdir" >/dev/null 2>&1 || true
  fi
  [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null
  if [ "${VM_KEEP:-0}" = 1 ]; then log "results kept in $out"; else rm -rf "$out"; fi
}
trap cleanup EXIT

# --- network namespace, bridge, tap, Ceph micro cluster (rbd suites) ------
qnet=()
append_net=
if [ $want_rbd = 1 ]; then
  [ -x scripts/ceph-cluster.sh ] || die "scripts/ceph-cluster.sh is missing (rbd suites need it)"
  ns=tcmu-vm-$$
  br_addr=10.77.0.1
  guest_addr=10.77.0.2
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add br0 type bridge
  ip -n "$ns" addr add $br_addr/24 dev br0
  ip -n "$ns" link set br0 up
  ip -n "$ns" tuntap add dev tap0 mode tap
  ip -n "$ns" link set tap0 master br0 up
  # Not under /tmp: the guest mounts its own tmpfs there.
  cdir=$top/target/vm-ceph-$$
  log "starting the Ceph micro cluster at $br_addr (netns $ns)"
  tc=$(date +%s)
  # ceph-iscsi reads the mgr's service map.
  with_mgr=0
  case " $SUITES " in *" ceph_iscsi "*) with_mgr=1 ;; esac
  ip netns exec "$ns" env CEPH_BIND_ADDR=$br_addr CEPH_OSD_SIZE=8G CEPH_WITH_MGR=$with_mgr \
    scripts/ceph-cluster.sh start "$cdir" || die "the Ceph micro cluster did not start"
  rbd_() { ip netns exec "$ns" timeout 120 rbd -c "$cdir/ceph.conf" "$@"; }
  rbd_ create --size 256M rbd/img0
  rbd_ create --size 1G rbd/bench
  rbd_ create --size 1G rbd/tcli
  rbd_ create --size 256M rbd/iscsi0
  rbd_ create --size 256M rbd/iscsi1
  case " $SUITES " in *" xcopy_bench "*) rbd_ create --size 1G rbd/xsrc && rbd_ create --size 1G rbd/xdst ;; esac
  case " $SUITES " in *" multi "*) for i in 0 1 2 3; do rbd_ create --size 1G "rbd/multi$i"; done ;; esac
  # The comparison reads what it did not write first: every object of the
  # image exists, or a read round that runs before any write round would
  # be answered from nothing (an OSD returns zeros for a missing object
  # without touching its disk).
  if [[ " $SUITES " == *" compare "* ]]; then
    rbd_ bench --io-type write --io-size 4M --io-threads 4 --io-total 1G --io-pattern seq rbd/bench >/dev/null ||
      die "could not fill rbd/bench"
  fi
  # many_images PREFIX N: rbd/PREFIX000.. , N thin 64 MiB images, eight
  # rbd clients at a time.
  many_images() {
    local i got ts
    ts=$(date +%s)
    for ((i = 0; i < $2; i++)); do
      rbd_ create --size 64M "rbd/$1$(printf %03d $i)" &
      [ $((i % 8)) = 7 ] && wait
    done
    wait
    got=$(rbd_ ls rbd | grep -c "^$1[0-9]" || true)
    [ "$got" = "$2" ] || die "made $got of $2 images rbd/$1..."
    log "$2 images rbd/$1000.. (64M) in $(($(date +%s) - ts)) s"
  }
  # The scale suite's images: one per rbd LUN (half the LUNs).
  [[ " $SUITES " == *" scale "* ]] && many_images scale $((${VM_SCALE_N:-256} / 4 * 2))
  # The whole-gateway suite's images.
  [[ " $SUITES " == *" wholegw "* ]] && many_images wg "${VM_WG_N:-16}"
  log "cluster up in $(($(date +%s) - tc)) s; images rbd/img0 and rbd/iscsi0-1 (256M), rbd/bench and rbd/tcli (1G)"
  # The guest's client config: the cluster's address and key, but logs and
  # sockets in the guest's own writable /tmp and /run.
  mon_host=$(sed -n 's/^mon host = //p' "$cdir/ceph.conf")
  cat >"$out/guest.conf" <<EOF
[global]
mon host = $mon_host
auth client required = cephx
keyring = $cdir/client.admin.keyring
log file = /tmp/ceph-\$name.\$pid.log
admin socket = /run/ceph-\$name.\$pid.asok
log to syslog = false
EOF
  echo "CEPH_CONF_GUEST=/tmp/out/guest.conf" >>"$out/env"
  qnet=(-netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0)
  append_net=" vmtest.net=$guest_addr/24"
fi

log "booting guest (suites: $SUITES)"
tg=$(date +%s)
set +e
netns_exec=()
[ -n "$ns" ] && netns_exec=(ip netns exec "$ns")
# The default suites take the guest about 19 minutes here under software
# emulation; the limit leaves room for a slower machine.
mem=1024
[[ " $SUITES " == *" scale "* || " $SUITES " == *" wholegw "* ]] && mem=3072
timeout "${VM_TIMEOUT:-1800}" "${netns_exec[@]}" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -m "${VM_MEM:-$mem}" -smp 2 \
  -nographic -no-reboot -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 loglevel=5 vmtest.script=$top/scripts/vm/guest.sh$append_net" \
  -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$out",mount_tag=out,security_model=none "${qnet[@]}" \
  </dev/null >"$out/console.log" 2>&1 &
qpid=$!
# Follow the results as they come.
tail -n +1 -f "$out/results" --pid=$qpid 2>/dev/null | grep --line-buffered -E '^(PASS|FAIL) ' &
wait $qpid
qrc=$?
set -e
sleep 0.5
log "guest ran $(($(date +%s) - tg)) s (qemu exit $qrc)"

# The rbd image, read back on the host, holds what the guest wrote.
host_check() { echo "$1 $2${3:+: $3}" | tee -a "$out/results"; }
if [ -s "$out/rbd_pattern_offset" ]; then
  off=$(cat "$out/rbd_pattern_offset")
  if rbd_ export rbd/img0 "$out/img0.export" >/dev/null 2>&1 &&
    cmp -n "$(stat -c %s "$out/rbd_pattern")" -i "$off:0" "$out/img0.export" "$out/rbd_pattern"; then
    host_check PASS rbd.host_export_matches
  else
    host_check FAIL rbd.host_export_matches "rbd export of rbd/img0 differs from what the guest wrote at $off"
  fi
  rm -f "$out/img0.export"
elif [[ " $SUITES " == *" rbd "* ]]; then
  host_check FAIL rbd.host_export_matches "the guest wrote no pattern to compare"
fi

# The whole-gateway failover fenced the dead gateway's client once at the
# monitor too: its audit log holds every `osd blocklist add` anyone sent,
# librbd's own inside lock breaks included (the guest sees only B's log).
if [[ " $SUITES " == *" wholegw "* ]]; then
  owner=$(sed -n 's/^wholegw.fenced_owner=//p' "$out/wholegw.txt" 2>/dev/null)
  if [ -z "$owner" ]; then
    host_check FAIL wholegw.monitor_fenced_once "the guest recorded no fenced owner"
  else
    n=$(grep -F "\"addr\": \"$owner\"" "$cdir/log/cluster.log" | grep -F '"blocklistop": "add"' |
      grep -c ': dispatch$' || true)
    echo "wholegw.monitor_blocklist_adds=$n" >>"$out/wholegw.txt"
    if [ "$n" = 1 ]; then
      host_check PASS wholegw.monitor_fenced_once
    else
      host_check FAIL wholegw.monitor_fenced_once "the monitor got $n osd blocklist add commands for $owner"
    fi
  fi
fi

# The comparison run: IOPS and CPU per I/O of each path, and their ratios.
if [[ " $SUITES " == *" compare "* ]]; then
  b_side=0
  [ -n "${VM_COMPARE_B_ENV:-}${VM_COMPARE_B_BIN:-}${VM_COMPARE_B_CFG:-}${VM_COMPARE_B_CONF:-}" ] && b_side=1
  if python3 - "$out" "$b_side" "${VM_COMPARE_B_ENV:-}${VM_COMPARE_B_BIN:+ bin=$VM_COMPARE_B_BIN}${VM_COMPARE_B_CFG:+ cfg=$VM_COMPARE_B_CFG}${VM_COMPARE_B_CONF:+ conf=$VM_COMPARE_B_CONF}" \
    "${VM_COMPARE_JOBS:-randwrite:4k:32 randread:4k:32}" "${VM_COMPARE_ATTRS:-}" <<'PY' | tee "$out/compare.txt"; then
import json, sys, os, re
out, b_side, b_what = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
def size(s):
    return int(s[:-1]) << {"k": 10, "m": 20}[s[-1].lower()] if s[-1].lower() in "km" else int(s)
jobs = []  # (name as in the file names, bytes per I/O)
for j in sys.argv[4].split():
    rw, bs, qd = j.split(":")
    jobs.append((rw if (bs, qd) == ("4k", "32") else f"{rw}-{bs}-qd{qd}", size(bs)))
attrs = sys.argv[5]
TICK_US = 10000  # USER_HZ is 100 on Linux
missing = []
def snap(path):
    d = {"task": {}}
    with open(path) as f:
        for line in f:
            k, *v = line.split()
            if k == "task":
                # Threads by name, numbers dropped (msgr-worker-0 -> msgr-worker-N).
                name = re.sub(r"[0-9]+", "N", v[0])
                t = d["task"].setdefault(name, [0, 0])
                t[0] += int(v[1]); t[1] += int(v[2])
            else:
                d[k] = [float(x) for x in v]
    return d
def result(label, rw, rnd, bsz):
    base = os.path.join(out, f"compare.{label}.{rw}.{rnd}")
    try:
        with open(base + ".json") as f:
            job = json.load(f)["jobs"][0]
        a, b = snap(base + ".a"), snap(base + ".b")
        side = job["write" if "write" in rw else "read"]
        if job["error"] or side["total_ios"] <= 0:
            raise ValueError("no I/O or a fio error")
        dt = b["uptime"][0] - a["uptime"][0]
        if dt < 4 or b["fio"][0] + b["fio"][1] <= 0:
            raise ValueError(f"CPU window {dt:.1f} s, or fio's job gone at its end")
        # I/Os in the window: what the disk completed, in sectors (the
        # block layer splits a large I/O into several requests); librbd
        # direct has no disk: its mean rate over the run times the window
        # (so has a large I/O from a run recorded before sectors were).
        if "dev" in a and len(a["dev"]) > 1:
            ios = (b["dev"][1] - a["dev"][1]) * 512 / bsz
        elif "dev" in a and bsz <= 4096:
            ios = b["dev"][0] - a["dev"][0]
        else:
            ios = side["iops"] * dt
        if ios <= 0:
            raise ValueError("no I/O in the CPU window")
        dl = lambda k, i: (b[k][i] - a[k][i]) * TICK_US
        tasks = {n: (t[0] - a["task"].get(n, [0, 0])[0], t[1] - a["task"].get(n, [0, 0])[1])
                 for n, t in b["task"].items()}
        return {
            "iops": side["iops"], "ios": ios, "win_iops": ios / dt,
            "p99": side["clat_ns"]["percentile"].get("99.000000", 0) / 1000,
            "srv_u": dl("serving", 0), "srv_s": dl("serving", 1),
            "fio": dl("fio", 0) + dl("fio", 1),
            "guest": dl("guest", 0), "kernel": dl("guest", 1),
            "tasks": {n: (u * TICK_US, s_ * TICK_US) for n, (u, s_) in tasks.items()},
        }
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        missing.append(f"{label} {rw} round {rnd}: {e}")
        return None
paths = ["librbd", "tcmu-runner", "tcmu-rbd"] + (["tcmu-rbd-B"] if b_side else [])
order = "tcmu-rbd, " + ("tcmu-rbd-B, " if b_side else "") + "librbd, tcmu-runner, tcmu-runner, librbd, " + \
    ("tcmu-rbd-B, " if b_side else "") + "tcmu-rbd"
print(f"comparison: fio {' '.join(n for n, _ in jobs)} in the guest on rbd/bench (1 GiB), same kernel and cluster; librbd = fio")
print("ioengine=rbd (no TCMU, rbd_cache=false as both daemons set it), the others fio libaio direct via")
print("tcm_loop; rounds " + order + ", 10 s each after 2 s of ramp.")
print("LUN attributes: hw_max_sectors=1024" + attrs + " (a later value overrides an earlier one)")
print("IOPS: fio's, mean of 2 rounds (MB/s where an I/O is over 4 KiB). CPU in microseconds per I/O, over a 5 s window inside each run")
print("(both rounds: CPU time / I/Os the disk completed in the window; librbd: fio's rate x window):")
print("  serving = the serving process (/proc/PID/stat utime+stime, all threads; librbd: fio's")
print("  process, its job thread and librbd's), fio = fio's job process, guest = the whole guest's")
print("  non-idle CPU (/proc/stat), of it kernel = system+irq+softirq; rest = guest - serving - fio")
print("  (kernel threads, interrupts, other processes).")
if b_side:
    print(f"  tcmu-rbd-B: the daemon with {b_what}")
print(f"  {'pattern':<10} {'path':<12} {'IOPS':>6} {'p99 ms':>7} {'serving':>8} {'(usr/sys)':>11} "
      f"{'fio':>6} {'guest':>6} {'kernel':>7} {'rest':>6}   per round IOPS (window)")
rows, threads = {}, {}
for rw, bsz in jobs:
    for label in paths:
        r = [result(label, rw, n, bsz) for n in (1, 2)]
        if None in r:
            print(f"  {rw:<10} {label:<12} missing result")
            continue
        ios = sum(x["ios"] for x in r)
        per = lambda k: sum(x[k] for x in r) / ios
        iops = sum(x["iops"] for x in r) / 2
        su, ss, fio, guest, kern = per("srv_u"), per("srv_s"), per("fio"), per("guest"), per("kernel")
        srv = su + ss
        rest = guest - srv - (0 if label == "librbd" else fio)
        rows[(rw, label)] = (iops, srv, guest)
        th = {}
        for x in r:
            for n, (u, s_) in x["tasks"].items():
                t = th.setdefault(n, [0, 0]); t[0] += u / ios; t[1] += s_ / ios
        threads[(rw, label)] = th
        p99 = max(x["p99"] for x in r) / 1000
        rounds = " ".join(f"{x['iops']:.0f}({x['win_iops']:.0f})" for x in r)
        if bsz > 4096:
            rounds += f"  = {iops * bsz / 1e6:.1f} MB/s"
        print(f"  {rw:<10} {label:<12} {iops:>6.0f} {p99:>7.1f} {srv:>8.0f} {f'({su:.0f}/{ss:.0f})':>11} "
              f"{'=' if label == 'librbd' else f'{fio:.0f}':>6} {guest:>6.0f} {kern:>7.0f} {rest:>6.0f}   {rounds}")
print("ratios (IOPS; serving CPU per I/O; guest CPU per I/O):")
pairs = [("tcmu-rbd", "tcmu-runner"), ("tcmu-rbd", "librbd"), ("tcmu-runner", "librbd")]
if b_side:
    pairs.insert(0, ("tcmu-rbd-B", "tcmu-rbd"))
for rw, _ in jobs:
    for a, b in pairs:
        if (rw, a) in rows and (rw, b) in rows:
            x, y = rows[(rw, a)], rows[(rw, b)]
            q = lambda i: f"{x[i] / y[i]:.2f}x" if y[i] else "-"
            print(f"  {rw:<10} {a + ' / ' + b:<26} IOPS {q(0):>6}  serving CPU {q(1):>6}  guest CPU {q(2):>6}")
print("the serving process by thread (microseconds per I/O, usr/sys; threads of one name summed):")
for (rw, label), th in threads.items():
    top = sorted(th.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
    shown = [f"{n} {u:.0f}/{s_:.0f}" for n, (u, s_) in top if u + s_ >= 1]
    print(f"  {rw:<10} {label:<12} " + ", ".join(shown))
if missing:
    print("unparsed: " + "; ".join(missing))
    sys.exit(1)
PY
    host_check PASS compare.figures_parsed
  else
    host_check FAIL compare.figures_parsed "a compare run left no figures (see compare.txt)"
  fi
fi

# The gateway run (the README's main job): fio through the iSCSI initiator.
if [[ " $SUITES " == *" gateway "* ]]; then
  python3 - "$out" <<'PY' | tee "$out/gateway.txt"
import json, sys, os
out = sys.argv[1]
def result(label, job, rnd):
    p = os.path.join(out, f"gateway.{label}.{job}.{rnd}.json")
    try:
        with open(p) as f:
            j = json.load(f)["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    side = j["write" if "write" in job else "read"]
    pct = side["clat_ns"]["percentile"]
    return (side["iops"], side["bw_bytes"] / 1e6, pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3)
print("gateway: fio through the iSCSI initiator (open-iscsi, CHAP) in the guest, LIO iSCSI target,")
print("LUN settings as ceph-iscsi makes them (max_data_area_mb=8, hw_max_sectors=1024, cmd_time_out=0),")
print("image rbd/bench on the micro cluster; rounds tcmu-rbd, tcmu-runner, tcmu-runner, tcmu-rbd, 10 s each;")
print("figures are the mean of 2 rounds (latency: the worse round)")
hdr = f"  {'job':<18} {'daemon':<12} {'IOPS':>8} {'MB/s':>8} {'p50 us':>9} {'p99 us':>9}"
print(hdr)
for job, name in (("randwrite-4k", "4K randwrite QD32"), ("randread-4k", "4K randread QD32"),
                  ("write-1m", "1M write QD8"), ("read-1m", "1M read QD8")):
    rows = {}
    for label in ("tcmu-rbd", "tcmu-runner"):
        r = [result(label, job, n) for n in (1, 2)]
        if None in r:
            print(f"  {name:<18} {label:<12} missing result")
            continue
        rows[label] = (sum(x[0] for x in r) / 2, sum(x[1] for x in r) / 2,
                       max(x[2] for x in r), max(x[3] for x in r))
        i, mb, p50, p99 = rows[label]
        print(f"  {name:<18} {label:<12} {i:>8.0f} {mb:>8.1f} {p50:>9.0f} {p99:>9.0f}")
    if len(rows) == 2 and rows["tcmu-runner"][0]:
        a, b = rows["tcmu-rbd"], rows["tcmu-runner"]
        print(f"  {name:<18} {'ratio':<12} {a[0] / b[0]:>8.2f}x{'':>8} {'':>9} {a[3] / b[3] if b[3] else 0:>8.2f}x")
PY
fi

# The scale run's figures (written by the guest).
[ -s "$out/scale.txt" ] && { echo; cat "$out/scale.txt"; }

# A check the guest's shell aborted (an unbound variable under set -u,
# say) printed neither PASS nor FAIL: it counts as failed, not as absent.
if [ -f "$out/checks.log" ]; then
  while read -r name; do
    awk -v n="$name" '($1 == "PASS" || $1 == "FAIL") && ($2 == n || $2 == n ":") {f = 1} END {exit !f}' "$out/results" ||
      host_check FAIL "$name" "started but never reported: the guest's shell aborted it"
  done < <(sed -n 's/^=== \([^ ]*\) (.*/\1/p' "$out/checks.log" | sort -u)
fi
npass=$(grep -c '^PASS ' "$out/results" || true)
nfail=$(grep -c '^FAIL ' "$out/results" || true)
done_ok=0
grep -qx DONE "$out/results" && done_ok=1
if [ "$nfail" -gt 0 ] || [ "$done_ok" != 1 ] || [ "$qrc" != 0 ]; then
  echo
  echo "===== guest console ($out/console.log)"
  cat "$out/console.log"
  echo "===== guest kernel log"
  cat "$out/dmesg.log" 2>/dev/null || true
  echo "===== daemon log"
  cat "$out/daemon.log" 2>/dev/null || true
  echo "===== check output (last 200 lines)"
  tail -n 200 "$out/checks.log" 2>/dev/null || true
  echo "===== results"
  cat "$out/results"
  [ "$done_ok" = 1 ] || echo "vm: the guest did not finish (qemu exit $qrc; 124 = timed out)"
  die "$nfail check(s) failed, $npass passed; stage took $(($(date +%s) - t0)) s"
fi
log "PASS: all $npass guest checks passed; stage took $(($(date +%s) - t0)) s"
