# shellcheck shell=bash
# The VM stage's iSCSI suite ("iscsi", one of the default suites). Sourced
# by scripts/vm/guest.sh, whose helpers (check, ok, wait_for, mk_backstore,
# t_fio, ...) it uses.
#
# A gateway as users build one: a user:rbd LUN exported by LIO's iSCSI
# target (iscsi_target_mod) with CHAP and mutual CHAP, a portal on the
# guest's address on the test bridge, and an initiator (open-iscsi's
# iscsid and iscsiadm, from the host) in the same guest that discovers
# the target and logs in. A login with a wrong secret must be refused;
# the right one gets the disk, which passes the same fio verification as
# the tcm_loop suites.

IS_IQN=iqn.2003-01.org.linux-iscsi.tcmu-rbd:gw1
IS_INIT=iqn.1993-08.org.debian:01:tcmu-rbd-test
IS_USER=tcmu-user
IS_PASS=tcmu-secret-12
IS_MUSER=tcmu-target
IS_MPASS=tcmu-mutual-34
IS_PORT=3260
IS_ADDR=

is_addr() { # the guest's address on the test bridge (127.0.0.1 without one)
  local a
  a=$(ip -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1)
  echo "${a:-127.0.0.1}"
}

# iscsid needs a writable /etc/iscsi (initiator name, node records) and
# /run/lock/iscsi; the guest's root is the host's, read-only.
t_iscsid() {
  IS_ADDR=$(is_addr)
  mkdir -p /tmp/iscsi-etc
  cp -a /etc/iscsi/. /tmp/iscsi-etc/ 2>/dev/null
  ok mount --bind /tmp/iscsi-etc /etc/iscsi || return 1
  echo "InitiatorName=$IS_INIT" >/etc/iscsi/initiatorname.iscsi
  if [ -d /var/lib/iscsi ]; then
    ok mount -t tmpfs tmpfs /var/lib/iscsi || return 1
  fi
  mkdir -p /run/lock/iscsi
  ok iscsid || return 1
  echo "iscsid up; portal $IS_ADDR:$IS_PORT"
}

# The target: one TPG, the LUN, a portal, an ACL for the initiator with
# CHAP (userid/password) and mutual CHAP (userid_mutual/password_mutual).
t_iscsi_target() { # BACKSTORE
  local tp=$T/iscsi/$IS_IQN/tpgt_1 acl
  ok mkdir -p "$tp/lun/lun_0" || return 1
  ok ln -s "$(bs_dir "$1")" "$tp/lun/lun_0/$1" || return 1
  ok mkdir -p "$tp/np/$IS_ADDR:$IS_PORT" || return 1
  acl=$tp/acls/$IS_INIT
  ok mkdir -p "$acl/lun_0" || return 1
  ok ln -s "$tp/lun/lun_0" "$acl/lun_0/lun_0" || return 1
  ok sh -c "echo -n $IS_USER > $acl/auth/userid" || return 1
  ok sh -c "echo -n $IS_PASS > $acl/auth/password" || return 1
  ok sh -c "echo -n $IS_MUSER > $acl/auth/userid_mutual" || return 1
  ok sh -c "echo -n $IS_MPASS > $acl/auth/password_mutual" || return 1
  ok sh -c "echo 1 > $tp/attrib/authentication" || return 1
  ok sh -c "echo 0 > $tp/attrib/generate_node_acls" || return 1
  ok sh -c "echo 1 > $tp/enable"
}

is_node() { # iscsiadm -m node ... for our target
  timeout 60 iscsiadm -m node -T "$IS_IQN" -p "$IS_ADDR:$IS_PORT" "$@"
}

t_iscsi_discovery() {
  local out
  out=$(timeout 60 iscsiadm -m discovery -t sendtargets -p "$IS_ADDR:$IS_PORT" 2>&1)
  echo "$out"
  echo "$out" | grep -q "$IS_IQN" || { why="discovery did not list $IS_IQN: $out"; return 1; }
}

is_chap() { # PASSWORD MUTUAL_PASSWORD
  is_node -o update -n node.session.auth.authmethod -v CHAP &&
    is_node -o update -n node.session.auth.username -v "$IS_USER" &&
    is_node -o update -n node.session.auth.password -v "$1" &&
    is_node -o update -n node.session.auth.username_in -v "$IS_MUSER" &&
    is_node -o update -n node.session.auth.password_in -v "$2"
}

is_sessions() { timeout 30 iscsiadm -m session 2>/dev/null | grep -c "$IS_IQN"; }

t_iscsi_wrong_secret() {
  local rc
  ok is_chap wrong-secret-99 "$IS_MPASS" || return 1
  is_node --login
  rc=$?
  # 24: iSCSI login failed due to authorization failure.
  [ $rc -ne 0 ] || { why="a login with a wrong CHAP secret succeeded"; is_node --logout; return 1; }
  expect "sessions after a refused login" "$(is_sessions)" 0 || return 1
  echo "refused as expected (iscsiadm exit $rc)"
}

t_iscsi_wrong_mutual() {
  local rc
  ok is_chap "$IS_PASS" wrong-mutual-77 || return 1
  is_node --login
  rc=$?
  [ $rc -ne 0 ] || { why="a target that did not prove the mutual secret was accepted"; is_node --logout; return 1; }
  expect "sessions after a refused login" "$(is_sessions)" 0 || return 1
  echo "refused as expected (iscsiadm exit $rc)"
}

is_disk() { # [IQN [LUN]]: the sd node of LUN (0) of our session to IQN (default ours)
  local s b iqn=${1:-$IS_IQN} lun=${2:-0}
  for s in /sys/class/iscsi_session/session*; do
    grep -qx "$iqn" "$s/targetname" 2>/dev/null || continue
    for b in "$s"/device/target*/*:0:0:"$lun"/block/sd*; do
      [ -e "$b" ] && { basename "$b"; return 0; }
    done
  done
  return 1
}

t_iscsi_login() {
  ok is_chap "$IS_PASS" "$IS_MPASS" || return 1
  ok is_node --login || return 1
  expect "sessions" "$(is_sessions)" 1 || return 1
  wait_for 60 is_disk || { why="no disk on the iSCSI session after 60 s"; return 1; }
  DEV=$(is_disk)
  wait_for 10 test -b "/dev/$DEV" ||
    mknod "/dev/$DEV" b $(tr : ' ' <"/sys/block/$DEV/dev") || { why="no /dev/$DEV"; return 1; }
  timeout 30 iscsiadm -m session -P 3 | grep -E "Target:|Current Portal|CHAP|username|Attached scsi disk" || true
  echo "iSCSI disk /dev/$DEV"
}

t_iscsi_logout() {
  ok is_node --logout || return 1
  expect "sessions after logout" "$(is_sessions)" 0
}

t_iscsi_teardown() { # BACKSTORE
  local tp=$T/iscsi/$IS_IQN/tpgt_1
  ok sh -c "echo 0 > $tp/enable" || return 1
  if [ -d "$tp/lun/lun_1" ]; then
    ok rm "$tp/acls/$IS_INIT/lun_1/lun_1" || return 1
    ok rmdir "$tp/acls/$IS_INIT/lun_1" || return 1
    ok rm "$tp/lun/lun_1/$XC_DISK" || return 1
    ok rmdir "$tp/lun/lun_1" || return 1
    rm_backstore "$XC_DISK" || return 1
  fi
  ok rm "$tp/acls/$IS_INIT/lun_0/lun_0" || return 1
  ok rmdir "$tp/acls/$IS_INIT/lun_0" "$tp/acls/$IS_INIT" || return 1
  ok rmdir "$tp/np/$IS_ADDR:$IS_PORT" || return 1
  ok rm "$tp/lun/lun_0/$1" || return 1
  ok rmdir "$tp/lun/lun_0" "$tp" "$T/iscsi/$IS_IQN" || return 1
  rm_backstore "$1"
}

suite_iscsi() {
  local n=iscsi
  daemon_alive || check $n.daemon_start start_daemon || return 1
  check $n.iscsid t_iscsid || return 1
  # The LUN as ceph-iscsi makes it: 8 MiB data area, 512 KiB max I/O,
  # cmd_time_out=0, qfull_time_out=5 (gw_backstore, below).
  check $n.create gw_backstore iscsi_disk "rbd/iscsi0;conf=$CEPH_CONF_GUEST;id=admin" $((256 << 20)) || return 1
  check $n.target_chap t_iscsi_target iscsi_disk || return 1
  check $n.discovery t_iscsi_discovery || return 1
  check $n.login_wrong_secret_refused t_iscsi_wrong_secret
  check $n.login_wrong_mutual_secret_refused t_iscsi_wrong_mutual
  check $n.login_chap t_iscsi_login || DEV=
  # Object 48 of the fresh 256 MiB image (4 MiB objects: 8192 blocks),
  # beyond what dd and fio write below.
  lba_checks $n 393216 8192
  check_dev $n.dd_pattern t_dd
  check_dev $n.fio_verify_4k t_fio 4k 4m
  check_dev $n.fio_verify_64k t_fio 64k 16m
  # Large I/Os split to 512 KiB by the kernel and filling the 8 MiB data
  # area 16 at a time (QD16): queued for space (qfull), never failed.
  check_dev $n.fio_verify_1m t_fio 1m 64m
  check_dev $n.sg_inq_std t_inq_std
  check_dev $n.sg_readcap t_readcap $((256 << 20))
  check_dev $n.persistent_reservations_refused t_pr refused
  xcopy_checks $n
  check_dev $n.logout t_iscsi_logout
  DEV=
  check $n.teardown t_iscsi_teardown iscsi_disk
  check $n.daemon_alive ok daemon_alive
}

# --- EXTENDED COPY (VAAI XCOPY) over iSCSI --------------------------------
# A second rbd LUN on the same target and ACL, and a ram LUN exported only
# through tcm_loop (no iSCSI initiator reaches it). sg_xcopy sends what
# ESXi sends: LID1, no list id, identification CSCDs naming the LUNs'
# NAA designators, block-to-block segments.
XC_DISK=iscsi_xc
XC_LOOP=xc_ram
XC_WWN=naa.5001405000000090

t_iscsi_add_lun() { # BACKSTORE LUN: map another LUN to our ACL
  local tp=$T/iscsi/$IS_IQN/tpgt_1 acl=$T/iscsi/$IS_IQN/tpgt_1/acls/$IS_INIT
  ok mkdir -p "$tp/lun/lun_$2" || return 1
  ok ln -s "$(bs_dir "$1")" "$tp/lun/lun_$2/$1" || return 1
  ok mkdir -p "$acl/lun_$2" || return 1
  ok ln -s "$tp/lun/lun_$2" "$acl/lun_$2/lun_$2" || return 1
  # The initiator sees the new LUN after a rescan.
  ok timeout 30 iscsiadm -m session -R || return 1
  wait_for 60 is_disk "$IS_IQN" "$2" || { why="LUN $2 did not appear on the session"; return 1; }
  DEV2=$(is_disk "$IS_IQN" "$2")
  wait_for 10 test -b "/dev/$DEV2" ||
    mknod "/dev/$DEV2" b $(tr : ' ' <"/sys/block/$DEV2/dev") || { why="no /dev/$DEV2"; return 1; }
  echo "LUN $2 is /dev/$DEV2"
}

t_tpc_vpd() {
  local o
  o=$(sg_vpd -p tpc "/dev/$DEV" 2>&1) || { why="sg_vpd -p tpc failed: $o"; return 1; }
  echo "$o"
  for want in "Extended copy(LID1)" "Maximum segment descriptor count: 32" \
    "block -> block" "Identification Descriptor" "Maximum segment length"; do
    echo "$o" | grep -qi "$want" || { why="Third-party Copy page without '$want'"; return 1; }
  done
  o=$(sg_inq "/dev/$DEV") || return 1
  echo "$o" | grep -q "3PC=1" || { why="standard INQUIRY without 3PC: $o"; return 1; }
}

sg_nodes() { # sg_xcopy opens /dev/block/MAJ:MIN (udev's links; the guest has no udev)
  local b
  mkdir -p /dev/block || return 1
  for b in /sys/block/sd*; do
    [ -e "$b/dev" ] || continue
    ln -sfn "../$(basename "$b")" "/dev/block/$(cat "$b/dev")" || return 1
  done
}

xc() { # IF OF SKIP SEEK COUNT BPT [sg_xcopy args...]: as ESXi's offload
  local i=$1 o=$2 sk=$3 se=$4 c=$5 b=$6
  shift 6
  sg_nodes || return 1
  timeout 300 sg_xcopy if="$i" of="$o" bs=512 skip="$sk" seek="$se" count="$c" \
    bpt="$b" id_usage=disable "$@"
}

t_xcopy_luns() { # 32 MiB from LUN 0 to LUN 1, sent to either
  head -c 32M /dev/urandom >"$S/xc" || return 1
  ok dd if="$S/xc" of="/dev/$DEV" bs=1M oflag=direct conv=fsync status=none || return 1
  ok xc "/dev/$DEV" "/dev/$DEV2" 0 0 65536 8192 || return 1
  ok dd if="/dev/$DEV2" of="$S/xc.back" bs=1M count=32 iflag=direct status=none || return 1
  ok cmp "$S/xc" "$S/xc.back" || return 1
  # Sent to the destination this time (it pulls), to another offset.
  ok xc "/dev/$DEV" "/dev/$DEV2" 0 131072 65536 8192 --on_dst || return 1
  ok dd if="/dev/$DEV2" of="$S/xc.back" bs=1M skip=64 count=32 iflag=direct status=none || return 1
  ok cmp "$S/xc" "$S/xc.back"
}

t_xcopy_within() { # within LUN 0, overlapping: 16 MiB forward by 4 MiB in one command
  ok xc "/dev/$DEV" "/dev/$DEV" 0 8192 32768 32768 || return 1
  ok dd if="/dev/$DEV" of="$S/xc.back" bs=1M skip=4 count=16 iflag=direct status=none || return 1
  ok cmp -n $((16 << 20)) "$S/xc" "$S/xc.back"
}

t_xcopy_unreachable() { # between an iSCSI LUN and a LUN only tcm_loop exports
  local o rc on
  # Sent to either LUN: the initiators of the one receiving it do not
  # all reach the other.
  for on in --on_src --on_dst; do
    o=$(xc "/dev/$DEV" "/dev/$DEV3" 0 0 2048 2048 "$on" 2>&1)
    rc=$?
    echo "$on: $o (exit $rc)"
    [ $rc -ne 0 ] || { why="a copy ($on) to a LUN outside the initiator's ACL succeeded"; return 1; }
    echo "$o" | grep -qi "copy aborted" || { why="expected COPY ABORTED ($on): $o"; return 1; }
  done
  ok cmp -n $((1 << 20)) /dev/zero "/dev/$DEV3" || { why="a refused copy wrote data"; return 1; }
}

t_xc_loop_rm() { rm_loop $XC_LOOP $XC_WWN && rm_backstore $XC_LOOP; }

xcopy_checks() { # SUITE
  local n=$1 d=$DEV
  check_dev $n.vpd_third_party_copy t_tpc_vpd
  check $n.xcopy_second_lun gw_backstore $XC_DISK "rbd/iscsi1;conf=$CEPH_CONF_GUEST;id=admin" $((256 << 20)) || return 1
  check $n.xcopy_second_lun_mapped t_iscsi_add_lun $XC_DISK 1 || return 1
  check_dev $n.xcopy_between_luns t_xcopy_luns
  check_dev $n.xcopy_within_lun_overlapping t_xcopy_within
  if check $n.xcopy_loop_lun mk_backstore $XC_LOOP ram - $((64 << 20)) &&
    check $n.xcopy_loop_export mk_loop $XC_LOOP $XC_WWN; then
    DEV3=$DEV
    DEV=$d
    check_dev $n.xcopy_unreachable_lun_refused t_xcopy_unreachable
    check $n.xcopy_loop_removed t_xc_loop_rm
  fi
  DEV=$d
}

# --- suite "xcopy_bench": a 1 GiB clone, offloaded or not -----------------
suite_xcopy_bench() {
  local n=xcopy_bench t0 t1 t2
  daemon_alive || check $n.daemon_start start_daemon || return 1
  check $n.iscsid t_iscsid || return 1
  check $n.create gw_backstore iscsi_disk "rbd/xsrc;conf=$CEPH_CONF_GUEST;id=admin" $((1 << 30)) || return 1
  check $n.target_chap t_iscsi_target iscsi_disk || return 1
  check $n.discovery t_iscsi_discovery || return 1
  check $n.login_chap t_iscsi_login || return 1
  check $n.dst gw_backstore $XC_DISK "rbd/xdst;conf=$CEPH_CONF_GUEST;id=admin" $((1 << 30)) || return 1
  check $n.dst_mapped t_iscsi_add_lun $XC_DISK 1 || return 1
  check_dev $n.fill ok timeout 600 fio --name=fill --filename="/dev/$DEV" --direct=1 \
    --ioengine=libaio --iodepth=8 --rw=write --bs=1m --size=1g --refill_buffers || return 1
  sg_nodes || return 1
  for round in 1 2; do
    t0=$(date +%s%N)
    check_dev $n.xcopy_$round ok timeout 900 sg_xcopy if="/dev/$DEV" of="/dev/$DEV2" bs=512 \
      count=$((1 << 21)) bpt=65535 id_usage=disable || return 1
    t1=$(date +%s%N)
    check_dev $n.dd_$round ok timeout 900 dd if="/dev/$DEV" of="/dev/$DEV2" bs=4M \
      iflag=direct oflag=direct status=none || return 1
    t2=$(date +%s%N)
    echo "xcopy_bench: round $round: 1 GiB by EXTENDED COPY $(((t1 - t0) / 1000000)) ms, by dd through the initiator $(((t2 - t1) / 1000000)) ms" |
      tee -a "$OUT/xcopy_bench.txt"
  done
  check_dev $n.same ok cmp -n $((1 << 30)) "/dev/$DEV" "/dev/$DEV2"
}

# --- suite "gateway": the README's main job -------------------------------
# The same gateway as suite iscsi (CHAP, open-iscsi in the guest), with the
# LUN settings ceph-iscsi uses (max_data_area_mb=8, hw_max_sectors=1024,
# cmd_time_out=0, qfull_time_out=5), measured with fio through the
# initiator: 4K random QD32 and 1 MiB sequential QD8, served by tcmu-rbd
# and by tcmu-runner (handler_rbd) on the same image, in the order
# tcmu-rbd, tcmu-runner, tcmu-runner, tcmu-rbd.

gw_backstore() { # NAME CFG SIZE
  local d
  mk_backstore "$1" rbd "$2" "$3" ",max_data_area_mb=8" || return 1
  d=$(bs_dir "$1")
  ok sh -c "echo 0 > $d/attrib/cmd_time_out" || return 1
  ok sh -c "echo 5 > $d/attrib/qfull_time_out"
}

gw_fio() { # LABEL ROUND
  local job
  echo "--- $1 round $2 $(date +%T)"
  for job in "randwrite 4k 32" "randread 4k 32" "write 1m 8" "read 1m 8"; do
    set -- "$1" "$2" $job
    ok timeout 120 fio --name="$3-$4" --filename="/dev/$DEV" --direct=1 --ioengine=libaio \
      --iodepth="$5" --rw="$3" --bs="$4" --size=1g --time_based --runtime=10 --ramp_time=2 \
      --randrepeat=0 --output-format=json --output="$OUT/gateway.$1.$3-$4.$2.json" || return 1
    echo "gateway: $1 round $2 $3 $4 QD$5 done"
    set -- "$1" "$2"
  done
}

gw_round() { # LABEL ROUND
  local n="gateway.$1.$2" extra=
  # GW_CFG_EXTRA: options appended to tcmu-rbd's cfgstring (";merge_kb=0").
  [ "$1" = tcmu-rbd ] && extra=${GW_CFG_EXTRA:-}
  if check "$n.create" gw_backstore gwbench "rbd/bench;conf=$CEPH_CONF_GUEST;id=admin$extra" $((1 << 30)) &&
    check "$n.target" t_iscsi_target gwbench && check "$n.discovery" t_iscsi_discovery &&
    check "$n.login" t_iscsi_login; then
    check_dev "$n.fio" gw_fio "$1" "$2"
    check "$n.logout" t_iscsi_logout
  fi
  DEV=
  check "$n.teardown" t_iscsi_teardown gwbench
}

suite_gateway() {
  pgrep -x iscsid >/dev/null || check gateway.iscsid t_iscsid || return 1
  abba gateway gw_round
}
