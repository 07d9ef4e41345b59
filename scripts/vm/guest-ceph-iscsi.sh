# shellcheck shell=bash
# The VM stage's ceph-iscsi suite ("ceph_iscsi"). Sourced by
# scripts/vm/guest.sh (helpers: check, ok, wait_for, ...) after
# guest-iscsi.sh (t_iscsid, is_addr).
#
# ceph-iscsi 3.5 as Debian ships it, with tcmu-rbd in tcmu-runner's place:
# rbd-target-api runs in the guest, gwcli creates the target, the gateway,
# a disk, a host with CHAP and the mapping, exactly as its documentation
# tells an admin to. The initiator (open-iscsi in the same guest) logs in
# with CHAP and verifies I/O; `gwcli ls` must then show the disk Online
# with this gateway as its owner (ceph-iscsi reads both from the
# per-image service-map entries tcmu-rbd registers, so the cluster runs a
# mgr for this suite), and the image's exclusive lock must be this
# gateway's.

CI_IQN=iqn.2003-01.com.redhat.iscsi-gw:ceph-igw
CI_HOST=ceph-gw1
CI_USER=ceph-iscsi-user
CI_PASS=ceph-secret-123
CI_API=
CI_DISK=disk_1

ci_gwcli() { HOME=/tmp/gwcli-home timeout 180 gwcli "$@"; }

# ceph-iscsi reads /etc/ceph/<cluster>.conf, its keyring beside it and
# /etc/ceph/iscsi-gateway.cfg, and names this gateway by its FQDN; the
# guest's root is the host's, read-only: a writable /etc/ceph and
# /etc/hosts, and a host name of the gateway's own.
t_ci_env() {
  local a keyring
  a=$(is_addr)
  mkdir -p /tmp/ceph-etc /tmp/gwcli-home
  keyring=$(sed -n 's/^keyring = //p' "$CEPH_CONF_GUEST")
  ok cp "$keyring" /tmp/ceph-etc/ceph.client.admin.keyring || return 1
  sed "s|^keyring = .*|keyring = /etc/ceph/ceph.client.admin.keyring|" "$CEPH_CONF_GUEST" \
    >/tmp/ceph-etc/ceph.conf || return 1
  cat >/tmp/ceph-etc/iscsi-gateway.cfg <<EOF
[config]
cluster_name = ceph
gateway_keyring = ceph.client.admin.keyring
pool = rbd
api_secure = false
api_host = 0.0.0.0
api_port = 5000
api_user = admin
api_password = admin-secret
trusted_ip_list = 127.0.0.1,$a,::1
log_to_stderr = true
log_to_file = false
# One gateway in this guest (ceph-iscsi wants two before it accepts a
# host); two gateways over iSCSI are the mpath_iscsi suite's.
minimum_gateways = 1
EOF
  ok mount --bind /tmp/ceph-etc /etc/ceph || return 1
  { echo "127.0.0.1 localhost"; echo "$a $CI_HOST"; } >/tmp/hosts
  ok mount --bind /tmp/hosts /etc/hosts || return 1
  ok hostname "$CI_HOST" || return 1
  CI_API=http://127.0.0.1:5000
  expect "ceph-iscsi's name for this host" \
    "$(/usr/bin/python3 -c 'import socket; print(socket.getfqdn())')" "$CI_HOST"
}

ci_ping() { # the API answers an authenticated _ping (as gwcli sends it)
  /usr/bin/python3 - "$CI_API" <<'EOF'
import base64, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/_ping")
req.add_header("Authorization", "Basic " + base64.b64encode(b"admin:admin-secret").decode())
urllib.request.urlopen(req, timeout=5)
EOF
}

t_ci_api_start() {
  /usr/bin/python3 /usr/bin/rbd-target-api >>"$OUT/rbd-target-api.log" 2>&1 &
  CI_PID=$!
  wait_for 120 ci_ping || { why="rbd-target-api did not answer /api/_ping in 120 s (see rbd-target-api.log)"; return 1; }
  kill -0 "$CI_PID"
}

t_ci_target() {
  ok ci_gwcli /iscsi-targets create "$CI_IQN" || return 1
  ok ci_gwcli "/iscsi-targets/$CI_IQN/gateways" create "$CI_HOST" "$(is_addr)" skipchecks=true
}

t_ci_disk() {
  ok ci_gwcli /disks create pool=rbd image=$CI_DISK size=1G || return 1
  rbd_cli info rbd/$CI_DISK | grep features
}

t_ci_host() {
  local h=/iscsi-targets/$CI_IQN/hosts
  ok ci_gwcli "$h" create "$IS_INIT" || return 1
  ok ci_gwcli "$h/$IS_INIT" auth username=$CI_USER password=$CI_PASS || return 1
  ok ci_gwcli "$h/$IS_INIT" disk add rbd/$CI_DISK
}

# The backstore ceph-iscsi made: served by tcmu-rbd, with its settings.
t_ci_backstore() {
  local d
  d=$(bs_dir rbd.$CI_DISK)
  [ -d "$d" ] || { why="no backstore rbd.$CI_DISK in configfs"; return 1; }
  grep -E "^(max_data_area_mb|hw_max_sectors|dev_config)" "$d/info" 2>/dev/null
  cat "$d/info"
  expect cmd_time_out "$(cat "$d/attrib/cmd_time_out")" 0 || return 1
  expect qfull_time_out "$(cat "$d/attrib/qfull_time_out")" 5 || return 1
  wait_for 30 served rbd.$CI_DISK || { why="tcmu-rbd does not serve rbd.$CI_DISK"; return 1; }
  ls "$d/alua"
}

ci_node() { timeout 60 iscsiadm -m node -T "$CI_IQN" -p "$(is_addr):3260" "$@"; }

ci_disk_node() { is_disk "$CI_IQN"; }

t_ci_login() {
  local out
  out=$(timeout 60 iscsiadm -m discovery -t sendtargets -p "$(is_addr):3260" 2>&1)
  echo "$out"
  echo "$out" | grep -q "$CI_IQN" || { why="discovery did not list $CI_IQN: $out"; return 1; }
  ok ci_node -o update -n node.session.auth.authmethod -v CHAP || return 1
  ok ci_node -o update -n node.session.auth.username -v $CI_USER || return 1
  ok ci_node -o update -n node.session.auth.password -v $CI_PASS || return 1
  ok ci_node --login || return 1
  wait_for 60 ci_disk_node || { why="no disk on the ceph-iscsi session after 60 s"; return 1; }
  DEV=$(ci_disk_node)
  wait_for 10 test -b "/dev/$DEV" ||
    mknod "/dev/$DEV" b $(tr : ' ' <"/sys/block/$DEV/dev") || { why="no /dev/$DEV"; return 1; }
  echo "ceph-iscsi disk /dev/$DEV"
}

# This gateway's client holds the image's exclusive lock after I/O.
t_ci_lock() {
  local out
  out=$(rbd_cli lock ls rbd/$CI_DISK 2>&1)
  echo "$out"
  echo "$out" | grep -q "auto " || { why="no exclusive lock on rbd/$CI_DISK after I/O: $out"; return 1; }
}

ci_service_owner() { # the image's tcmu-runner entry says lock_owner true
  timeout 30 ceph -c "$CEPH_CONF_GUEST" service status --format json 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
st = json.load(sys.stdin)
e = st.get("tcmu-runner", {}).get(sys.argv[1], {}).get("status", {})
sys.exit(0 if e.get("lock_owner") == "true" else 1)
' "$CI_HOST:rbd/$CI_DISK"
}

# The mgr's service map holds the per-image entry ceph-iscsi reads.
t_ci_service_map() {
  if ! wait_for 60 ci_service_owner; then
    timeout 30 ceph -c "$CEPH_CONF_GUEST" service status --format json-pretty
    why="no tcmu-runner entry $CI_HOST:rbd/$CI_DISK with lock_owner true in the service map"
    return 1
  fi
  timeout 30 ceph -c "$CEPH_CONF_GUEST" service status --format json-pretty
}

ci_ls_ok() {
  local out info
  out=$(ci_gwcli ls 2>&1)
  info=$(ci_gwcli /disks/rbd/$CI_DISK info 2>&1)
  printf '%s\n--- info\n%s\n' "$out" "$info" >"$S/gwcli-ls"
  echo "$out" | grep -F "rbd/$CI_DISK (Online," >/dev/null &&
    echo "$out" | grep -F "Owner: $CI_HOST" >/dev/null &&
    echo "$info" | grep -i "lock.owner" | grep -F "$CI_HOST" >/dev/null
}

# `gwcli ls` and the disk's info: Online and locked by this gateway
# (ceph-iscsi's health watcher, from the service map), owned by it (the
# disk's configured owner).
t_ci_ls() {
  if ! wait_for 90 ci_ls_ok; then
    cat "$S/gwcli-ls"
    why="gwcli does not show $CI_DISK Online with lock owner and owner $CI_HOST"
    return 1
  fi
  cat "$S/gwcli-ls"
}

t_ci_logout() {
  ok ci_node --logout
}

t_ci_api_stop() {
  cp /tmp/gwcli-home/.gwcli/gwcli.log "$OUT/gwcli.log" 2>/dev/null
  kill -TERM "$CI_PID" 2>/dev/null
  wait_for 60 sh -c "! kill -0 $CI_PID" || { why="rbd-target-api did not stop"; kill -9 "$CI_PID"; return 1; }
  wait "$CI_PID" 2>/dev/null
  return 0
}

suite_ceph_iscsi() {
  local n=ceph_iscsi
  daemon_alive || check $n.daemon_start start_daemon || return 1
  pgrep -x iscsid >/dev/null || check $n.iscsid t_iscsid || return 1
  check $n.env t_ci_env || return 1
  check $n.api_start t_ci_api_start || return 1
  check $n.target_gateway t_ci_target || return 1
  check $n.disk_create t_ci_disk || return 1
  check $n.host_chap_map t_ci_host || return 1
  check $n.backstore t_ci_backstore
  check $n.login_chap t_ci_login || DEV=
  check_dev $n.fio_verify_4k t_fio 4k 4m
  check_dev $n.fio_verify_1m t_fio 1m 64m
  check $n.exclusive_lock t_ci_lock
  check $n.service_map t_ci_service_map
  check $n.gwcli_ls t_ci_ls
  check_dev $n.logout t_ci_logout
  DEV=
  check $n.api_stop t_ci_api_stop
  check $n.daemon_alive ok daemon_alive
}
