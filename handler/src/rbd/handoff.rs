//! Handing an image's lock over between live gateways, so that only a
//! gateway that does not answer is fenced.
//!
//! Fencing is per rados client, and a gateway serves all its images
//! through one client: blocklisting it to take one image costs it every
//! image. So a gateway taking a lock first asks the owner to give it up:
//! - every HA gateway watches the object [`OBJECT`] in the pool (and
//!   namespace) of its images, on the client that serves them;
//! - the taker notifies it with the image id and the owner's address
//!   ([`encode_request`]);
//! - the watcher on the owner's client answers [`RELEASING`] when the
//!   image's failover manager agrees (it serves the image) and then
//!   releases the lock as in a planned move: the gate closes, librbd
//!   finishes the writes in flight, the lock is freed. Every other
//!   watcher answers nothing;
//! - the taker waits for the lock to be free and acquires it, with no
//!   blocklist entry.
//!
//! Nothing here is needed for safety: no answer in time (the owner is dead,
//! stopped or cut off, or runs an older version), or a lock still held
//! after the wait, and the taker fences the owner as before.

use rbd_ffi::{IoCtx, Notice, NotifyReply, ObjectWatch, Rados};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tracing::{info, warn};

/// The object gateways watch, one per pool and namespace. It is empty;
/// the first gateway to watch creates it.
pub const OBJECT: &str = "tcmu-rbd.handoff";
/// The first line of a request (its version).
const MAGIC: &str = "tcmu-rbd handoff 1";
/// An owner's answer: it releases the lock now.
pub const RELEASING: &[u8] = b"releasing";

/// The notify payload asking the client at `owner` to give up the lock of
/// image `image_id`.
pub fn encode_request(image_id: &str, owner: &str) -> Vec<u8> {
    format!("{MAGIC}\n{image_id}\n{owner}\n").into_bytes()
}

/// (image id, owner address) of a request; None for anything else.
pub fn decode_request(b: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(b).ok()?;
    let mut l = s.lines();
    if l.next()? != MAGIC {
        return None;
    }
    let id = l.next()?.trim();
    let owner = l.next()?.trim();
    if id.is_empty() || owner.is_empty() || l.next().is_some() {
        return None;
    }
    Some((id.to_string(), owner.to_string()))
}

/// Whether the owner answered that it releases (any ack saying so).
pub fn owner_releases(r: &NotifyReply) -> bool {
    r.acks.iter().any(|a| a.payload == RELEASING)
}

/// An image this process serves, as the watcher needs it.
pub trait Holder: Send + Sync {
    /// Whether this image is served through `rados` now.
    fn on_client(&self, rados: &Rados) -> bool;
    /// Asked to give the lock up: true if it will (it then releases in
    /// the background).
    fn hand_over(&self) -> bool;
}

/// Images by id; several entries when this process opened one twice.
type Holders = HashMap<String, Vec<Weak<dyn Holder>>>;

fn holders() -> &'static Mutex<Holders> {
    static H: OnceLock<Mutex<Holders>> = OnceLock::new();
    H.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Makes image `image_id` answer requests through `h` (as long as `h`
/// lives).
pub fn register(image_id: &str, h: Weak<dyn Holder>) {
    let mut m = holders().lock().unwrap_or_else(|e| e.into_inner());
    let v = m.entry(image_id.to_string()).or_default();
    v.retain(|w| w.strong_count() > 0);
    v.push(h);
}

/// The holder of `image_id` served through `rados`, asked to hand over.
fn ask_holder(image_id: &str, rados: &Rados) -> bool {
    let hs: Vec<Arc<dyn Holder>> = {
        let mut m = holders().lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, v| {
            v.retain(|w| w.strong_count() > 0);
            !v.is_empty()
        });
        m.get(image_id)
            .map(|v| v.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    };
    // The lock outside the registry's lock: hand_over posts a job.
    let r = hs
        .iter()
        .find(|h| h.on_client(rados))
        .is_some_and(|h| h.hand_over());
    // Every gateway watching the pool hears every request: most hold
    // nothing of this image, and an empty list needs no thread.
    if !hs.is_empty() {
        drop_elsewhere(hs);
    }
    r
}

/// Drops `v` on a thread of its own. For references taken on librados'
/// callback thread: if one turns out to be the last (the device was
/// closed meanwhile), its drop unwatches, and an unwatch waits for the
/// callbacks to finish, this one included.
pub fn drop_elsewhere<T: Send + 'static>(v: T) {
    let slot = Arc::new(Mutex::new(Some(v)));
    let theirs = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("handoff-drop".into())
        .spawn(move || drop(theirs.lock().unwrap_or_else(|e| e.into_inner()).take()));
    if let Err(e) = spawned {
        // Only short of threads: leak it rather than risk the deadlock.
        warn!("handoff: no thread to drop a reference on: {e}");
        std::mem::forget(slot.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// One client's watch on [`OBJECT`] in one pool and namespace, shared by
/// the images there; it answers for this client's images.
pub struct Bus {
    io: Arc<IoCtx>,
    addrs: String,
    watch: Mutex<Option<ObjectWatch>>,
    /// The watch was lost (see [`Bus::rearm`]).
    broken: Arc<AtomicBool>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("pool", &self.io.pool())
            .field("client", &self.addrs)
            .finish()
    }
}

type BusKey = (u64, String, String);

fn buses() -> &'static Mutex<HashMap<BusKey, Weak<Bus>>> {
    static B: OnceLock<Mutex<HashMap<BusKey, Weak<Bus>>>> = OnceLock::new();
    B.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The bus of client `rados` in `pool` (and `namespace`), watching.
pub fn bus(rados: &Rados, pool: &str, namespace: Option<&str>) -> Result<Arc<Bus>, String> {
    let key = (
        rados.instance_id(),
        pool.to_string(),
        namespace.unwrap_or("").to_string(),
    );
    let mut m = buses().lock().unwrap_or_else(|e| e.into_inner());
    m.retain(|_, w| w.strong_count() > 0);
    if let Some(b) = m.get(&key).and_then(Weak::upgrade) {
        return Ok(b);
    }
    let mut io = rados
        .ioctx(pool)
        .map_err(|e| format!("handoff: pool {pool}: {e}"))?;
    if let Some(ns) = namespace {
        io.set_namespace(ns)
            .map_err(|e| format!("handoff: namespace {ns}: {e}"))?;
    }
    let addrs = rados
        .addrs()
        .map_err(|e| format!("handoff: client address: {e}"))?;
    let b = Arc::new(Bus {
        io: Arc::new(io),
        addrs,
        watch: Mutex::new(None),
        broken: Arc::new(AtomicBool::new(false)),
    });
    b.arm()?;
    m.insert(key, Arc::downgrade(&b));
    Ok(b)
}

impl Bus {
    fn arm(&self) -> Result<(), String> {
        let rados = self.io.rados().downgrade();
        let addrs = self.addrs.clone();
        let on_notify = move |n: &Notice<'_>| {
            let mut reply: &[u8] = b"";
            if let Some((id, owner)) = decode_request(n.payload()) {
                if super::lock::same_client(&owner, &addrs) {
                    if let Some(r) = rados.upgrade() {
                        if ask_holder(&id, &r) {
                            info!(image_id = %id, asker = n.notifier(), "asked to hand the lock over: releasing");
                            reply = RELEASING;
                        } else {
                            info!(image_id = %id, asker = n.notifier(), "asked to hand the lock over: not serving it here, declined");
                        }
                    }
                }
            }
            if let Err(e) = n.ack(reply) {
                warn!("handoff: ack failed: {e}");
            }
        };
        let broken = Arc::clone(&self.broken);
        let pool = self.io.pool().to_string();
        let on_error = move |errno: i32| {
            warn!(pool = %pool, errno, "handoff watch lost; it is renewed at the next lock check");
            broken.store(true, Ordering::SeqCst);
        };
        let w = match rbd_ffi::watch(&self.io, OBJECT, on_notify.clone(), on_error.clone()) {
            Err(e) if e.errno == libc::ENOENT => {
                // First gateway in this pool: create the (empty) object.
                self.io
                    .write_full(OBJECT, b"")
                    .map_err(|e| format!("handoff: creating {OBJECT}: {e}"))?;
                rbd_ffi::watch(&self.io, OBJECT, on_notify, on_error)
            }
            r => r,
        }
        .map_err(|e| format!("handoff: watching {OBJECT}: {e}"))?;
        self.broken.store(false, Ordering::SeqCst);
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        Ok(())
    }

    /// Renews a lost watch (call it now and then: the owner must be
    /// reachable when asked).
    pub fn rearm(&self) {
        if !self.broken.load(Ordering::SeqCst) {
            return;
        }
        drop(self.watch.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Err(e) = self.arm() {
            warn!("{e}");
        }
    }

    /// Asks the client at `owner` to hand over the lock of `image_id`;
    /// waits up to `timeout` for the watchers' answers. True if the owner
    /// answered that it releases.
    pub fn ask(&self, image_id: &str, owner: &str, timeout: Duration) -> Result<bool, String> {
        let r = self
            .io
            .notify(OBJECT, &encode_request(image_id, owner), timeout)
            .map_err(|e| format!("handoff: notify: {e}"))?;
        Ok(owner_releases(&r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rbd_ffi::NotifyAck;

    #[test]
    fn a_request_round_trips_and_nothing_else_decodes() {
        let b = encode_request("10e3a9b2c4d", "127.0.0.1:0/2193471925");
        assert_eq!(
            decode_request(&b),
            Some(("10e3a9b2c4d".into(), "127.0.0.1:0/2193471925".into()))
        );
        for bad in [
            &b""[..],
            b"tcmu-rbd handoff 2\nid\nowner\n",
            b"tcmu-rbd handoff 1\nid\n",
            b"tcmu-rbd handoff 1\n\nowner\n",
            b"tcmu-rbd handoff 1\nid\nowner\nmore\n",
            b"\xff\xfe",
            // librbd's own header notifications are binary.
            b"\x01\x02\x00\x00\x00\x0e",
        ] {
            assert_eq!(decode_request(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_an_ack_saying_releasing_counts() {
        let ack = |p: &[u8]| NotifyAck {
            gid: 1,
            cookie: 2,
            payload: p.to_vec(),
        };
        let mut r = NotifyReply::default();
        assert!(!owner_releases(&r));
        r.acks.push(ack(b""));
        r.timeouts.push((9, 9));
        assert!(!owner_releases(&r));
        r.acks.push(ack(b"releasingX"));
        assert!(!owner_releases(&r));
        r.acks.push(ack(RELEASING));
        assert!(owner_releases(&r));
    }
}
