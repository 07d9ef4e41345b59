#!/usr/bin/env bash
# The main job: a whole Ceph iSCSI gateway on this machine, measured as its
# users measure it. Installs what it needs (Debian packages), starts a Ceph
# micro cluster in a network namespace, boots Debian's kernel under QEMU
# with LIO's iSCSI target, serves an rbd image through it with tcmu-rbd
# (CHAP, ceph-iscsi's LUN settings), logs in with open-iscsi and runs fio
# through the initiator: 4K random QD32 and 1 MiB sequential QD8, beside
# the same runs served by tcmu-runner. Progress shows as it goes; the table
# comes at the end. Takes about 6 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
VM_SUITES=gateway exec scripts/test-vm.sh
