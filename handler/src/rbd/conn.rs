//! One rados connection per (ceph.conf, cephx id), shared by every device
//! that uses it, as long as one does.
//!
//! The op timeout is a setting of the whole connection, so a device whose
//! `osd_op_timeout` differs from the shared connection's gets a
//! connection of its own: each device keeps the timeout its cfgstring
//! asks for, and devices that agree still share.
//!
//! A connection that was blocklisted is replaced, not reused: the first
//! device to notice asks for a fresh one in place of the fenced one, and
//! the others find the fresh one when they reopen.

use rbd_ffi::{Rados, RadosBuilder, WeakRados};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing::{info, warn};

/// The service name gateways register under (`ceph -s` lists it).
pub const SERVICE: &str = "tcmu-rbd";

/// What identifies a shareable connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The ceph.conf (None: librados' default search).
    pub conf: Option<PathBuf>,
    /// The cephx id.
    pub id: String,
}

/// One shareable connection: at most one connect at a time per slot, so
/// devices that open together share the first one's connection, while
/// connects for other keys go on beside it.
#[derive(Default)]
struct Slot {
    /// Held while connecting (up to the mount timeout).
    connecting: Mutex<()>,
    /// The connection, while a device holds it; only ever held briefly.
    conn: Mutex<Option<WeakRados>>,
}

impl Slot {
    fn live(&self) -> Option<Rados> {
        self.conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(WeakRados::upgrade)
    }
}

/// Connections by key and the op timeout they were made with (a rados
/// client's timeout cannot change once connected). The map's lock is
/// only ever held briefly, never across a connect.
type Cache = HashMap<(ConnKey, Duration), Arc<Slot>>;

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The default op timeout, as tcmu-runner picks it: longer than the time
/// the cluster takes to mark a dead OSD down (heartbeat grace 20 s +
/// interval 6 s), so an op is retried on another OSD before it fails.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(31);

/// The shared connection for `key` with op timeout `timeout`, connecting
/// if there is none (or if the cached one is `stale`, e.g. blocklisted).
pub fn get(key: &ConnKey, timeout: Duration, stale: Option<&Rados>) -> Result<Rados, String> {
    let fresh = |r: &Rados| !stale.is_some_and(|s| s.same(r));
    let slot = {
        let mut map = cache().lock().unwrap_or_else(|e| e.into_inner());
        // Slots nobody uses any more (no connection, no one connecting).
        map.retain(|_, s| Arc::strong_count(s) > 1 || s.live().is_some());
        map.entry((key.clone(), timeout)).or_default().clone()
    };
    if let Some(r) = slot.live().filter(fresh) {
        return Ok(r);
    }
    // Connects of one key wait for each other (the first one's connection
    // is then shared); those of other keys do not wait for this one.
    let _connecting = slot.connecting.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = slot.live().filter(fresh) {
        return Ok(r);
    }
    let r = connect(key, timeout)?;
    let others = cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|((k, t), s)| k == key && *t != timeout && s.live().is_some());
    if others {
        info!(
            id = %key.id,
            timeout = timeout.as_secs(),
            "a connection of its own for this osd_op_timeout (the shared one has another)"
        );
    }
    register_service(&r, key, timeout);
    *slot.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.downgrade());
    Ok(r)
}

/// The addresses of this process's open connections for `key`, whatever
/// their op timeout: devices that differ only in `osd_op_timeout` belong
/// to one gateway, so a takeover by one must never blocklist another's
/// client. (Clients of another cephx user or ceph.conf are kept apart
/// on purpose, as separate gateways would be.)
pub fn live_addrs(key: &ConnKey) -> Vec<String> {
    let map = cache().lock().unwrap_or_else(|e| e.into_inner());
    map.iter()
        .filter(|((k, _), _)| k == key)
        .filter_map(|(_, s)| s.live())
        .filter_map(|r| r.addrs().ok())
        .collect()
}

fn connect(key: &ConnKey, timeout: Duration) -> Result<Rados, String> {
    let secs = timeout.as_secs().max(1).to_string();
    let who = format!("client.{}", key.id);
    let b = RadosBuilder::new(Some(&key.id)).map_err(|e| format!("rbd: {e}"))?;
    let b = match &key.conf {
        Some(p) => {
            if !p.exists() {
                return Err(format!("rbd: ceph config {} does not exist", p.display()));
            }
            b.read_conf(Some(p)).map_err(|e| {
                // librados' parser says EINVAL for any syntax error, and for
                // a last line without a newline.
                let hint = if e.errno == libc::EINVAL {
                    " (a syntax error, or no newline at the end)"
                } else {
                    ""
                };
                format!("rbd: cannot read ceph config {}{hint}: {e}", p.display())
            })?
        }
        None => b.read_conf(None).map_err(|e| {
            format!(
                "rbd: no readable default ceph config (/etc/ceph/ceph.conf); give conf=PATH: {e}"
            )
        })?,
    };
    let set = |b: RadosBuilder, k: &str, v: &str| {
        b.set(k, v)
            .map_err(|e| format!("rbd: cannot set {k}={v}: {e}"))
    };
    // No client-side cache: a completed write is on the OSDs, which is what
    // a SCSI target without a volatile write cache promises.
    let b = set(b, "rbd_cache", "false")?;
    // Discards smaller than the discard granularity would otherwise be
    // dropped; UNMAP'd blocks must read back as zeros (LBPRZ).
    let b = set(b, "rbd_skip_partial_discard", "false")?;
    // Dispatch I/O on the calling thread (the ring worker) instead of
    // handing each request to librbd's io_context thread: that hand-off
    // was a futex wake and, on a busy machine, a preemption of the worker
    // per request. librbd's dispatch layers (exclusive lock, refresh) stay
    // asynchronous; with rbd_cache off nothing in them waits, except the
    // Objecter's in-flight throttle, which is backpressure either way.
    let b = set(b, "rbd_non_blocking_aio", "false")?;
    // A takeover blocklists the old owner itself, once per owner for all
    // its images (`lock::fence_once`), before it breaks any lock; librbd
    // would otherwise add the same entry again inside every lock break: a
    // monitor command and a new osdmap per image, which a whole gateway's
    // takeovers then queue behind.
    let b = set(b, "rbd_blocklist_on_break_lock", "false")?;
    // Not zero-copy writes (`rbd_disable_zero_copy_writes=false`, which
    // would save librbd's copy of each write on the ring thread): with it
    // librbd 16.2 hung for good in rbd_close after a lock handover
    // (`rbd_outage`'s handover test, every run). librbd holds back a
    // zero-copy write's completion until its last reference to the buffer
    // is dropped; presumably one never was. The default, copying, stays.
    let b = set(b, "rados_osd_op_timeout", &secs)?;
    let b = set(b, "rados_mon_op_timeout", &secs)?;
    let b = set(b, "client_mount_timeout", &secs)?;
    let grace: u64 = b
        .get("osd_heartbeat_grace")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let interval: u64 = b
        .get("osd_heartbeat_interval")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    if timeout.as_secs() <= grace + interval {
        warn!(
            id = %key.id,
            timeout = timeout.as_secs(),
            grace,
            interval,
            "osd_op_timeout is not longer than osd heartbeat grace + interval: ops to a dead OSD \
             fail before the cluster re-routes them (the initiator retries)"
        );
    }
    let r = b.connect().map_err(|e| {
        let conf = conf_name(key.conf.as_deref());
        match e.errno {
            libc::EACCES | libc::EPERM => format!(
                "rbd: bad credentials: the cluster refused the key of {who} (conf {conf}): {e}"
            ),
            libc::ENOENT => {
                format!("rbd: bad credentials: no keyring holds a key for {who} (conf {conf}): {e}")
            }
            libc::ETIMEDOUT => format!("rbd: no monitor answered {who} (conf {conf}): {e}"),
            _ => format!("rbd: {who} cannot connect (conf {conf}): {e}"),
        }
    })?;
    info!(client = %who, instance = r.instance_id(), "connected to the ceph cluster");
    Ok(r)
}

fn conf_name(p: Option<&Path>) -> String {
    p.map_or("default".into(), |p| p.display().to_string())
}

/// Registers the connection as a gateway daemon in the service map (shown
/// by `ceph -s` where a mgr runs); failure only costs visibility.
fn register_service(r: &Rados, key: &ConnKey, timeout: Duration) {
    let host = super::service::hostname();
    let mut daemon = if key.id == "admin" {
        host.clone()
    } else {
        format!("{host}:{}", key.id)
    };
    // A second connection of the same user (another op timeout) needs a
    // name of its own in the service map.
    if timeout != DEFAULT_OP_TIMEOUT {
        daemon = format!("{daemon}:t{}", timeout.as_secs());
    }
    let meta = [
        ("hostname", host.as_str()),
        ("daemon_type", "gateway"),
        ("version", env!("CARGO_PKG_VERSION")),
    ];
    match r.service_register(SERVICE, &daemon, &meta) {
        Ok(()) => info!(service = SERVICE, daemon = %daemon, "registered with the service map"),
        Err(e) => warn!(service = SERVICE, daemon = %daemon, "service registration failed: {e}"),
    }
}
