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

is_disk() { # [IQN]: the sd node of LUN 0 of our session to IQN (default ours)
  local s b iqn=${1:-$IS_IQN}
  for s in /sys/class/iscsi_session/session*; do
    grep -qx "$iqn" "$s/targetname" 2>/dev/null || continue
    for b in "$s"/device/target*/*:0:0:0/block/sd*; do
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
  check_dev $n.logout t_iscsi_logout
  DEV=
  check $n.teardown t_iscsi_teardown iscsi_disk
  check $n.daemon_alive ok daemon_alive
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
  local n="gateway.$1.$2"
  if check "$n.create" gw_backstore gwbench "rbd/bench;conf=$CEPH_CONF_GUEST;id=admin" $((1 << 30)) &&
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
  daemon_alive || check gateway.tcmu-rbd.start start_daemon || return 1
  gw_round tcmu-rbd 1
  check gateway.tcmu-rbd.stop stop_daemon || return 1
  check gateway.tcmu-runner.start start_tcmu_runner || return 1
  gw_round tcmu-runner 1
  gw_round tcmu-runner 2
  check gateway.tcmu-runner.stop stop_daemon || return 1
  check gateway.tcmu-rbd.restart start_daemon || return 1
  gw_round tcmu-rbd 2
}
