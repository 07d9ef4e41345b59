#!/usr/bin/python3
"""What ceph-iscsi's own health watcher makes of the service map.

Runs ceph_iscsi_config.device_status.DeviceStatusWatcher (ceph-iscsi 3.5,
the code rbd-target-api runs) against a cluster, polling every second, until
its stdin closes (or SECONDS pass), then prints its view of every image as
JSON: {"pool/image": {"state", "lock_owner",
"gateways": {gw: counters}}}. Tests compare that with what the gateway
did, so the registration is checked by the reader that matters.

usage: ceph_iscsi_status.py CEPH_CONF SECONDS
"""
import json
import logging
import os
import sys
import time

import ceph_iscsi_config.settings as settings


def main():
    conf, secs = sys.argv[1], float(sys.argv[2])
    settings.init()
    # ceph-iscsi finds the cluster as <ceph_config_dir>/<cluster_name>.conf.
    settings.config.ceph_config_dir = os.path.dirname(os.path.abspath(conf))
    settings.config.cluster_name = os.path.basename(conf)[: -len(".conf")]
    settings.config.status_check_interval = 1
    from ceph_iscsi_config.device_status import DeviceStatusWatcher

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    w = DeviceStatusWatcher(logging.getLogger("device_status"))
    w.start()
    # Until the caller closes stdin (it watched the events happen), or
    # the time is up.
    import select
    select.select([sys.stdin], [], [], secs)
    view = {k: v.get_status_dict() for k, v in list(w.status_lookup.items())}
    print(json.dumps(view, sort_keys=True))
    # The watcher is a daemon thread: exit without joining it.
    os._exit(0)


if __name__ == "__main__":
    main()
