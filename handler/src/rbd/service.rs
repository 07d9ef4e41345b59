//! Per-image entries in the mgr's service map, as ceph-iscsi and the Ceph
//! dashboard read them.
//!
//! Both look under the service type `tcmu-runner` for one daemon per image
//! named `<gateway>:<pool>/<image>` (ceph-iscsi's `device_status.py` splits
//! the name at the first `:`), with metadata `pool_name`, `image_name`,
//! `image_id` and a status holding `lock_owner` (`"true"`/`"false"`) and
//! the counters `lock_lost_cnt`, `conn_lost_cnt` and `cmd_timed_out_cnt`.
//! ceph-iscsi marks an image degraded when one of the counters moves, and
//! the dashboard counts an image's optimized paths by `lock_owner`.
//!
//! librados registers one daemon per client, so each image gets a small
//! rados client of its own for this entry (as tcmu-runner does, which has
//! one client per image anyway). That client does no I/O, so fencing the
//! gateway's I/O client never touches it. One thread per process connects
//! the clients and pushes a status when it changed; device opens do not
//! wait for it, and while images are being opened (a restart opens
//! hundreds) it connects none, for up to [`DEFER_MAX`]: each connect is a
//! new librados client (config, mon session, registration), CPU the opens
//! need more. `service_map = off` in tcmu.conf turns the entries off
//! (each costs a mon and a mgr session and a few threads); the gateway's
//! own `tcmu-rbd` entry (see [`super::conn`]) stays.

use super::conn::ConnKey;
use rbd_ffi::{Rados, RadosBuilder};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tracing::{info, warn};

/// The service type ceph-iscsi and the dashboard read.
pub const SERVICE: &str = "tcmu-runner";

/// How often the status thread looks for changes.
const TICK: Duration = Duration::from_secs(1);

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Images being opened now (see [`opening`]).
static OPENING: AtomicUsize = AtomicUsize::new(0);

/// The longest new entries wait for opens to end: a stream of opens that
/// never pauses does not keep them out of the service map for ever.
pub const DEFER_MAX: Duration = Duration::from_secs(30);

/// Marks an image open under way until dropped: new entries' clients wait
/// (see the module's doc).
pub fn opening() -> Opening {
    OPENING.fetch_add(1, Ordering::SeqCst);
    Opening(())
}

/// An image open under way ([`opening`]).
pub struct Opening(());

impl Drop for Opening {
    fn drop(&mut self) {
        OPENING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether new entries' clients wait now: opens are under way, and the
/// wait that began at `since` (set here on its first tick) is not over.
fn defer_connects(opening: usize, since: &mut Option<std::time::Instant>) -> bool {
    if opening == 0 {
        *since = None;
        return false;
    }
    since.get_or_insert_with(std::time::Instant::now).elapsed() < DEFER_MAX
}

/// Set by [`stop`]: the status thread ends.
static STOPPED: AtomicBool = AtomicBool::new(false);

/// Turns the per-image entries on or off for images opened from now on
/// (tcmu.conf's `service_map`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether images opened now get an entry.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What an image reports; the rbd backend and the failover manager
/// update it, the status thread publishes it.
#[derive(Debug, Default)]
pub struct ImageStatus {
    lock_owner: AtomicBool,
    lock_lost: AtomicU64,
    conn_lost: AtomicU64,
    cmd_timed_out: AtomicU64,
}

impl ImageStatus {
    /// This gateway holds (true) or no longer holds the exclusive lock.
    pub fn set_lock_owner(&self, owner: bool) {
        self.lock_owner.store(owner, Ordering::Relaxed);
    }
    /// The lock was lost to another gateway.
    pub fn lock_lost(&self) {
        self.lock_lost.fetch_add(1, Ordering::Relaxed);
    }
    /// The image's client was cut off (blocklisted) and is reopened.
    pub fn conn_lost(&self) {
        self.conn_lost.fetch_add(1, Ordering::Relaxed);
    }
    /// A command failed because an OSD op timed out.
    pub fn cmd_timed_out(&self) {
        self.cmd_timed_out.fetch_add(1, Ordering::Relaxed);
    }
    /// The status fields as the service map takes them.
    pub fn fields(&self) -> [(&'static str, String); 4] {
        [
            (
                "lock_owner",
                self.lock_owner.load(Ordering::Relaxed).to_string(),
            ),
            (
                "lock_lost_cnt",
                self.lock_lost.load(Ordering::Relaxed).to_string(),
            ),
            (
                "conn_lost_cnt",
                self.conn_lost.load(Ordering::Relaxed).to_string(),
            ),
            (
                "cmd_timed_out_cnt",
                self.cmd_timed_out.load(Ordering::Relaxed).to_string(),
            ),
        ]
    }
}

/// What identifies an image's entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Connection settings (the image's ceph.conf and cephx id).
    pub key: ConnKey,
    /// `<pool>/<image>` or `<pool>/<namespace>/<image>`.
    pub spec: String,
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// The image's id (empty if unknown).
    pub image_id: String,
}

impl Entry {
    /// The daemon name: `<gateway>:<spec>`, the gateway being this host.
    pub fn daemon(&self) -> String {
        format!("{}:{}", hostname(), self.spec)
    }
}

/// This gateway's name in the service map: the host name.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// An image's registration; dropping it (with the backend) ends the
/// entry: the mgr drops a daemon that stopped reporting.
pub struct Registration {
    /// Held only to keep the entry alive (the status thread has a Weak).
    _slot: Arc<Slot>,
}

struct Slot {
    entry: Entry,
    status: Arc<ImageStatus>,
    /// The entry's own client, once connected, and the status last sent.
    conn: Mutex<SlotConn>,
}

#[derive(Default)]
struct SlotConn {
    rados: Option<Rados>,
    sent: Option<[(&'static str, String); 4]>,
    /// Connect attempts that failed (logged once, then retried quietly).
    failures: u32,
}

/// The status thread, joined by [`stop`].
static THREAD: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);

fn slots() -> &'static Mutex<Vec<Weak<Slot>>> {
    static SLOTS: OnceLock<Mutex<Vec<Weak<Slot>>>> = OnceLock::new();
    SLOTS.get_or_init(|| {
        match std::thread::Builder::new()
            .name("rbd-service-map".into())
            .spawn(publisher)
        {
            Ok(h) => *THREAD.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
            Err(e) => warn!("no service-map thread (ceph-iscsi will not see the images): {e}"),
        }
        Mutex::new(Vec::new())
    })
}

/// Registers `entry` (if entries are enabled); the status thread connects
/// its client and publishes within a second or two.
pub fn register(entry: Entry, status: Arc<ImageStatus>) -> Option<Registration> {
    if !enabled() {
        return None;
    }
    let inner = Arc::new(Slot {
        entry,
        status,
        conn: Mutex::new(SlotConn::default()),
    });
    let mut v = slots().lock().unwrap_or_else(|e| e.into_inner());
    v.retain(|w| w.strong_count() > 0);
    v.push(Arc::downgrade(&inner));
    Some(Registration { _slot: inner })
}

/// Stops the status thread and waits for it to end (at most one entry's
/// librados call: a connect gives up after 10 s): a process must not exit
/// while a thread is inside librados (its static destructors then run
/// under the thread). The daemon calls it after its devices stopped.
pub fn stop() {
    STOPPED.store(true, Ordering::SeqCst);
    let h = THREAD.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(h) = h {
        h.thread().unpark();
        let _ = h.join();
    }
}

/// The status thread: connects new entries, publishes changed statuses.
/// Entries whose image closed meanwhile are dropped (their clients shut
/// down) here, before the thread ends.
fn publisher() {
    let mut deferring = None;
    while !STOPPED.load(Ordering::SeqCst) {
        std::thread::park_timeout(TICK);
        let mut connected = false;
        let live: Vec<Arc<Slot>> = {
            let mut v = slots().lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|w| w.strong_count() > 0);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        for s in live {
            if STOPPED.load(Ordering::SeqCst) {
                break;
            }
            // Looked at per entry: a connect takes a while, and opens may
            // start meanwhile.
            let connect = !defer_connects(OPENING.load(Ordering::SeqCst), &mut deferring);
            connected |= s.publish(connect);
        }
        if connected {
            // The new clients' timer and messenger threads.
            super::slack::settle();
        }
    }
}

impl Slot {
    /// Sends the entry's status if it changed; connects its client first
    /// if it has none and `connect`. True if it connected a client.
    fn publish(&self, connect: bool) -> bool {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh = false;
        if c.rados.is_none() {
            if !connect {
                return false;
            }
            // Every tenth tick after a failure: a cluster that is down is
            // not hammered by hundreds of images.
            if c.failures > 0 && !c.failures.is_multiple_of(10) {
                c.failures += 1;
                return false;
            }
            match self.connect() {
                Ok(r) => {
                    c.rados = Some(r);
                    c.failures = 0;
                }
                Err(e) => {
                    if c.failures == 0 {
                        warn!(image = %self.entry.spec, "no service-map entry yet (retrying): {e}");
                    }
                    c.failures += 1;
                    return false;
                }
            }
            fresh = true;
        }
        let now = self.status.fields();
        if c.sent.as_ref() == Some(&now) {
            return fresh;
        }
        let Some(r) = &c.rados else { return fresh };
        let kv: Vec<(&str, &str)> = now.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match r.service_update_status(&kv) {
            Ok(()) => c.sent = Some(now),
            Err(e) => warn!(image = %self.entry.spec, "service-map status update failed: {e}"),
        }
        fresh
    }

    fn connect(&self) -> Result<Rados, String> {
        let e = &self.entry;
        let b = RadosBuilder::new(Some(&e.key.id)).map_err(|x| x.to_string())?;
        let b = b
            .read_conf(e.key.conf.as_deref())
            .map_err(|x| format!("ceph config: {x}"))?;
        // A client that only talks to the mon and the mgr: one messenger
        // thread and one completion thread (librados' io_context pool,
        // 2 by default) are plenty; there is one such client per image.
        let b = b
            .set("ms_async_op_threads", "1")
            .map_err(|x| x.to_string())?;
        let b = b
            .set("librados_thread_count", "1")
            .map_err(|x| x.to_string())?;
        let b = b
            .set("client_mount_timeout", "10")
            .map_err(|x| x.to_string())?;
        let r = b.connect().map_err(|x| format!("connect: {x}"))?;
        let host = hostname();
        let daemon = e.daemon();
        let meta = [
            ("pool_name", e.pool.as_str()),
            ("image_name", e.image.as_str()),
            ("image_id", e.image_id.as_str()),
            ("daemon_type", "portal"),
            ("daemon_prefix", host.as_str()),
            ("gateway", "tcmu-rbd"),
            ("version", env!("CARGO_PKG_VERSION")),
        ];
        r.service_register(SERVICE, &daemon, &meta)
            .map_err(|x| format!("service register {SERVICE}/{daemon}: {x}"))?;
        info!(service = SERVICE, daemon = %daemon, "image registered in the service map");
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_entries_wait_while_images_open_but_not_for_ever() {
        let mut since = None;
        assert!(!defer_connects(0, &mut since), "no opens: connect");
        assert!(defer_connects(3, &mut since), "opens under way: wait");
        let started = since.expect("the wait's start is kept");
        assert!(defer_connects(1, &mut since));
        assert_eq!(since, Some(started), "one wait, from its first tick");
        since = Some(std::time::Instant::now() - DEFER_MAX);
        assert!(
            !defer_connects(1, &mut since),
            "opens that never pause do not keep entries out past DEFER_MAX"
        );
        assert!(!defer_connects(0, &mut since));
        assert_eq!(since, None, "the opens ended: the next wait starts anew");
        let g = opening();
        let h = opening();
        assert!(OPENING.load(Ordering::SeqCst) >= 2);
        drop((g, h));
    }

    #[test]
    fn fields_are_what_ceph_iscsi_parses() {
        let s = ImageStatus::default();
        s.set_lock_owner(true);
        s.lock_lost();
        s.lock_lost();
        s.conn_lost();
        s.cmd_timed_out();
        let f = s.fields();
        assert_eq!(
            f.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            [
                "lock_owner=true",
                "lock_lost_cnt=2",
                "conn_lost_cnt=1",
                "cmd_timed_out_cnt=1"
            ]
        );
        s.set_lock_owner(false);
        assert_eq!(s.fields()[0].1, "false");
    }

    #[test]
    fn the_daemon_name_splits_at_the_first_colon_into_gateway_and_image() {
        let e = Entry {
            key: ConnKey {
                conf: None,
                id: "admin".into(),
            },
            spec: "rbd/ns1/disk_1".into(),
            pool: "rbd".into(),
            image: "disk_1".into(),
            image_id: String::new(),
        };
        let d = e.daemon();
        let (gw, image) = d.split_once(':').expect("a colon");
        assert_eq!(gw, hostname());
        assert_eq!(image, "rbd/ns1/disk_1");
    }
}
