//! The image's exclusive lock as HA gateways use it: who holds it, taking
//! it from another gateway (fencing that gateway first), giving it up, and
//! noticing that this gateway was fenced.
//!
//! Taking the lock from another gateway, in this order:
//! 0. ask the owner to hand it over (see [`super::handoff`]): a live
//!    gateway releases it, and it is taken with no fence, so the owner's
//!    other images keep their lock; a gateway that does not answer in
//!    time is fenced:
//! 1. `osd blocklist add <owner address> <expire>` (librados'
//!    `rados_blocklist_add`, which also waits for the osdmap that carries
//!    the entry): from then on the OSDs refuse every operation of the old
//!    owner's client, including writes it had in flight, and ops this
//!    client sends later are only served by OSDs that have that map;
//! 2. break the old owner's lock (librbd blocklists it again, harmlessly);
//! 3. `rbd_lock_acquire(EXCLUSIVE)` (an explicitly acquired lock is not
//!    handed over when another client asks for it, so it only moves by
//!    being broken).
//!
//! The owner's address is what `rbd_lock_get_owners` returns (the locker's
//! address in the header lock, e.g. `127.0.0.1:0/2193471925`).

use super::{RbdBackend, Session};
use rbd_ffi::LockMode;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Where one owner's fencing stands.
enum Fence {
    /// A takeover is blocklisting it now; others wait for the outcome.
    Running,
    /// Blocklisted at this time.
    Done(Instant),
}

/// The blocklist entries this process added, by (owner, own client).
///
/// A gateway that dies held the locks of all its images through one
/// client, so every takeover on the survivor finds the same owner: the
/// first blocklists it (a monitor command, then the osdmap that carries
/// the entry) and the others, on the same client of ours, which already
/// has that map, only break the lock. A whole gateway is fenced once, not
/// once per image, and its images move together.
struct Fences {
    by_owner: Mutex<HashMap<String, Fence>>,
    changed: Condvar,
}

static FENCES: OnceLock<Fences> = OnceLock::new();
static BLOCKLISTS: AtomicU64 = AtomicU64::new(0);

/// `osd blocklist add` calls this process made (tests and status).
pub fn blocklists_issued() -> u64 {
    BLOCKLISTS.load(Ordering::Relaxed)
}

/// Runs `add` unless `key` was blocklisted by this process within half
/// of `expire` (an entry about to expire is renewed); concurrent callers
/// for the same key wait for the first one's result. Returns whether
/// `add` ran.
fn fence_once<E>(
    key: &str,
    expire: Duration,
    add: impl FnOnce() -> Result<(), E>,
) -> Result<bool, E> {
    let f = FENCES.get_or_init(|| Fences {
        by_owner: Mutex::new(HashMap::new()),
        changed: Condvar::new(),
    });
    let mut m = f.by_owner.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match m.get(key) {
            Some(Fence::Done(at)) if at.elapsed() < expire / 2 => return Ok(false),
            Some(Fence::Running) => {
                m = f.changed.wait(m).unwrap_or_else(|e| e.into_inner());
            }
            _ => break,
        }
    }
    m.insert(key.to_string(), Fence::Running);
    drop(m);
    let r = add();
    let mut m = f.by_owner.lock().unwrap_or_else(|e| e.into_inner());
    match &r {
        Ok(()) => {
            BLOCKLISTS.fetch_add(1, Ordering::Relaxed);
            m.insert(key.to_string(), Fence::Done(Instant::now()));
        }
        Err(_) => {
            m.remove(key);
        }
    }
    // Forget entries that expired long ago (owners come and go).
    m.retain(|_, v| !matches!(v, Fence::Done(at) if at.elapsed() > expire));
    drop(m);
    f.changed.notify_all();
    r.map(|()| true)
}

/// Why a lock operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// This gateway's client was blocklisted; the image is being reopened
    /// on a fresh client (retry after the reopen).
    #[error("{image}: this client is blocklisted; the image is being reopened")]
    Fenced {
        /// The image.
        image: String,
    },
    /// A librados/librbd call failed.
    #[error("{image}: {what}: {source}")]
    Call {
        /// The image.
        image: String,
        /// What was being done.
        what: String,
        /// The error.
        source: rbd_ffi::Error,
    },
    /// The lock is held by another image handle of this gateway's own
    /// client, or of its client for the same user with another op timeout
    /// (a second device of this daemon on the same image): blocklisting
    /// it would fence this gateway itself.
    #[error("{image}: the lock is held by this gateway's own client ({owner}), another device of this daemon")]
    OwnClient {
        /// The image.
        image: String,
        /// The owner address.
        owner: String,
    },
    /// The lock was acquired but librbd does not report this client as
    /// the owner (another gateway took it in between).
    #[error("{image}: lock acquired but not owned afterwards")]
    NotOwner {
        /// The image.
        image: String,
    },
    /// An adoption ([`TakeOptions::only_from`]) found the lock free or
    /// held by someone else than the gateway being adopted from: nothing
    /// was done.
    #[error("{image}: the lock is not held by {from} (now: {now})")]
    NotFrom {
        /// The image.
        image: String,
        /// The owner the adoption was for.
        from: String,
        /// Who holds it now (`free` or an address).
        now: String,
    },
}

/// How [`RbdBackend::take_lock`] treats the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeOptions {
    /// How long the blocklist entry of a fenced owner lasts.
    pub blocklist_expire_secs: u32,
    /// How long to wait for the answers to a handoff request (zero: do
    /// not ask, fence at once).
    pub handoff_ask: Duration,
    /// After the owner answered that it releases, how long to wait for
    /// the lock to be free (it first finishes its writes in flight)
    /// before fencing it after all.
    pub handoff_wait: Duration,
    /// Adopt only: take the lock only if this owner (a gateway this one
    /// just fenced) holds it; otherwise [`LockError::NotFrom`]. No handoff
    /// request is sent (the owner is fenced already).
    pub only_from: Option<String>,
}

impl TakeOptions {
    /// Fence any owner at once, with no handoff request.
    pub fn fence_only(blocklist_expire_secs: u32) -> TakeOptions {
        TakeOptions {
            blocklist_expire_secs,
            handoff_ask: Duration::ZERO,
            handoff_wait: Duration::ZERO,
            only_from: None,
        }
    }
}

/// What [`RbdBackend::take_lock`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The owners that were blocklisted and broken (empty: the lock was
    /// free, handed over, or already ours).
    pub fenced: Vec<String>,
    /// The owners that released the lock when asked (not fenced).
    pub handed_over: Vec<String>,
    /// The lock was already held by this client.
    pub already: bool,
    /// The session (reopen generation) that holds the lock.
    pub generation: u64,
}

/// Who holds the lock, as seen from this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockView {
    /// This client.
    Mine,
    /// Nobody.
    Free,
    /// Another client, by address.
    Other(String),
}

impl std::fmt::Display for LockView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockView::Mine => f.write_str("mine"),
            LockView::Free => f.write_str("free"),
            LockView::Other(a) => write!(f, "{a}"),
        }
    }
}

impl RbdBackend {
    /// Maps a failed lock call. ESHUTDOWN means this client was
    /// blocklisted: the session is marked fenced and a reopen starts, or
    /// a gateway that learns it here (not from I/O) would stay on a dead
    /// client.
    fn call_err(&self, what: impl Into<String>) -> impl FnOnce(rbd_ffi::Error) -> LockError + '_ {
        let image = self.name.to_string();
        let what = what.into();
        let generation = self.session().generation;
        move |source| {
            if source.errno == libc::ESHUTDOWN {
                self.fence_and_reopen(generation);
                LockError::Fenced { image }
            } else {
                LockError::Call {
                    image,
                    what,
                    source,
                }
            }
        }
    }

    fn live_session(&self) -> Result<Arc<Session>, LockError> {
        let s = self.session();
        if self.session_fenced(&s) {
            self.start_reopen();
            return Err(LockError::Fenced {
                image: self.name.to_string(),
            });
        }
        Ok(s)
    }

    fn session_fenced(&self, s: &Session) -> bool {
        let f = self.shared.signals.fenced.load(Ordering::SeqCst);
        f != 0 && f == s.generation
    }

    /// The reopen generation of the session serving I/O now (1 after open,
    /// +1 per reopen on a fresh client).
    pub fn generation(&self) -> u64 {
        self.session().generation
    }

    /// True while the session serving I/O is known blocklisted (an
    /// operation saw ESHUTDOWN) and not yet replaced by a reopen.
    pub fn is_fenced(&self) -> bool {
        let s = self.session();
        self.session_fenced(&s)
    }

    /// Marks session `generation` fenced (e.g. the lock was found taken by
    /// another gateway, so its client must be blocklisted) and starts a
    /// reopen on a fresh client; operations on it fail fast from now on.
    /// If that session was already replaced (an I/O saw ESHUTDOWN and the
    /// reopen finished first), the fresh session is left alone.
    pub fn fence_and_reopen(&self, generation: u64) {
        let s = self.session();
        if s.generation != generation {
            return;
        }
        self.shared
            .signals
            .fenced
            .store(s.generation, Ordering::SeqCst);
        self.start_reopen();
    }

    /// Who holds the lock now.
    pub fn lock_view(&self) -> Result<LockView, LockError> {
        let s = self.live_session()?;
        if s.image
            .is_exclusive_lock_owner()
            .map_err(self.call_err("is_exclusive_lock_owner"))?
        {
            return Ok(LockView::Mine);
        }
        let o = s
            .image
            .lock_owners()
            .map_err(self.call_err("lock_get_owners"))?;
        Ok(match o.owners.into_iter().next() {
            Some(a) => LockView::Other(a),
            None => LockView::Free,
        })
    }

    /// Whether the current session holds the lock. Not a local check:
    /// librbd asserts the lock on the image header, a round trip to its
    /// OSD (so callers pace it; see the failover manager's idle check).
    pub fn lock_held(&self) -> Result<bool, LockError> {
        let s = self.live_session()?;
        s.image
            .is_exclusive_lock_owner()
            .map_err(self.call_err("is_exclusive_lock_owner"))
    }

    /// Takes the exclusive lock (see the module doc): asks another owner
    /// to hand it over, fences it if it does not (blocklist its address,
    /// break its lock), acquires. Blocks for the cluster round trips (a
    /// second or two); run it off the ring thread.
    pub fn take_lock(&self, opts: &TakeOptions) -> Result<Taken, LockError> {
        let blocklist_expire_secs = opts.blocklist_expire_secs;
        let s = self.live_session()?;
        let image = self.name.to_string();
        if s.image
            .is_exclusive_lock_owner()
            .map_err(self.call_err("is_exclusive_lock_owner"))?
        {
            return Ok(Taken {
                fenced: Vec::new(),
                handed_over: Vec::new(),
                already: true,
                generation: s.generation,
            });
        }
        let owners = s
            .image
            .lock_owners()
            .map_err(self.call_err("lock_get_owners"))?;
        // This user's clients with another osd_op_timeout count as this
        // gateway's own too: blocklisting one would fence its devices.
        let mut mine = vec![s.rados.addrs().map_err(self.call_err("rados_getaddrs"))?];
        mine.extend(super::conn::live_addrs(&self.shared.key));
        if let Some(owner) = owners
            .owners
            .iter()
            .find(|o| mine.iter().any(|m| same_client(o, m)))
        {
            return Err(LockError::OwnClient {
                image,
                owner: owner.clone(),
            });
        }
        if let Some(from) = &opts.only_from {
            if !owners.owners.iter().any(|o| o == from) {
                return Err(LockError::NotFrom {
                    image,
                    from: from.clone(),
                    now: owners
                        .owners
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "free".into()),
                });
            }
        }
        let (owners, handed_over) =
            if opts.handoff_ask.is_zero() || owners.owners.is_empty() || opts.only_from.is_some() {
                (owners, Vec::new())
            } else {
                self.ask_handoff(&s, owners, opts)?
            };
        let mut fenced = Vec::new();
        let expire = Duration::from_secs(u64::from(blocklist_expire_secs));
        for owner in owners.owners {
            // Keyed on our own client too: only the client that added the
            // entry is known to hold the osdmap with it.
            let key = format!("{owner} {}", mine[0]);
            let added = fence_once(&key, expire, || {
                warn!(image = %image, owner = %owner, expire = blocklist_expire_secs, "fencing the lock owner: osd blocklist add");
                s.rados
                    .blocklist_add(&owner, blocklist_expire_secs)
                    .map_err(self.call_err(format!("osd blocklist add {owner}")))
            })?;
            if !added {
                info!(image = %image, owner = %owner, "owner already blocklisted by this gateway (another image of the same gateway)");
            }
            match s.image.lock_break(owners.mode, &owner) {
                Ok(()) => {}
                // Released or broken by someone else meanwhile: fine, the
                // owner is blocklisted either way.
                Err(e) if e.errno == libc::ENOENT => {}
                Err(e) => return Err(self.call_err(format!("lock break {owner}"))(e)),
            }
            info!(image = %image, owner = %owner, "old owner blocklisted and its lock broken");
            fenced.push(owner);
        }
        s.image
            .lock_acquire(LockMode::Exclusive)
            .map_err(self.call_err("lock_acquire"))?;
        let owned = s
            .image
            .is_exclusive_lock_owner()
            .map_err(self.call_err("is_exclusive_lock_owner"))?;
        if !owned {
            return Err(LockError::NotOwner { image });
        }
        info!(image = %image, generation = s.generation, "exclusive lock acquired");
        Ok(Taken {
            fenced,
            handed_over,
            already: false,
            generation: s.generation,
        })
    }

    /// Asks each owner to hand the lock over and waits for the ones that
    /// agree to release it. Returns the owners left (to fence) and those
    /// that handed over.
    fn ask_handoff(
        &self,
        s: &Session,
        owners: rbd_ffi::LockOwners,
        opts: &TakeOptions,
    ) -> Result<(rbd_ffi::LockOwners, Vec<String>), LockError> {
        let image = &self.name;
        let Some(bus) = super::bus_of(&self.shared, s) else {
            return Ok((owners, Vec::new()));
        };
        let mut handed = Vec::new();
        for owner in &owners.owners {
            let t0 = Instant::now();
            match bus.ask(&self.shared.image_id, owner, opts.handoff_ask) {
                Ok(true) => {
                    if self.wait_released(s, owner, opts.handoff_wait)? {
                        info!(image = %image, owner = %owner, ms = t0.elapsed().as_millis() as u64, "the owner handed the lock over: no fence");
                        handed.push(owner.clone());
                    } else {
                        warn!(image = %image, owner = %owner, wait = ?opts.handoff_wait, "the owner agreed to release the lock but still holds it: fencing it");
                    }
                }
                Ok(false) => {
                    info!(image = %image, owner = %owner, ms = t0.elapsed().as_millis() as u64, "the owner did not agree to hand the lock over (not answering, or not serving it): fencing it");
                }
                Err(e) => {
                    warn!(image = %image, owner = %owner, "handoff request failed, fencing the owner: {e}")
                }
            }
        }
        if handed.is_empty() {
            return Ok((owners, handed));
        }
        let left = s
            .image
            .lock_owners()
            .map_err(self.call_err("lock_get_owners"))?;
        Ok((left, handed))
    }

    /// Waits up to `wait` for `owner` to stop holding the lock.
    fn wait_released(&self, s: &Session, owner: &str, wait: Duration) -> Result<bool, LockError> {
        let deadline = Instant::now() + wait;
        loop {
            let o = s
                .image
                .lock_owners()
                .map_err(self.call_err("lock_get_owners"))?;
            if !o.owners.iter().any(|x| x == owner) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Gives the lock up (planned move to another gateway). Not holding it
    /// is not an error.
    pub fn release_lock(&self) -> Result<(), LockError> {
        let s = self.live_session()?;
        match s.image.lock_release() {
            Ok(()) => {
                info!(image = %self.name, "exclusive lock released");
                Ok(())
            }
            Err(e) if e.errno == libc::EINVAL || e.errno == libc::ENOENT => Ok(()),
            Err(e) => Err(self.call_err("lock_release")(e)),
        }
    }
}

/// The `ip:port/nonce` parts of an address list as librados prints it
/// (`[v2:127.0.0.1:0/12,v1:127.0.0.1:0/12]`, or one bare address).
fn addr_parts(list: &str) -> Vec<&str> {
    list.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|a| {
            let a = a.trim();
            a.strip_prefix("v2:")
                .or_else(|| a.strip_prefix("v1:"))
                .or_else(|| a.strip_prefix("any:"))
                .unwrap_or(a)
        })
        .filter(|a| !a.is_empty())
        .collect()
}

/// Whether lock owner `owner` is the client with addresses `mine`.
pub(super) fn same_client(owner: &str, mine: &str) -> bool {
    let m = addr_parts(mine);
    addr_parts(owner).iter().any(|o| m.contains(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_is_blocklisted_once_however_many_images_it_held() {
        let calls = Arc::new(AtomicU64::new(0));
        let expire = Duration::from_secs(600);
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let calls = calls.clone();
                std::thread::spawn(move || {
                    fence_once::<()>("10.0.0.9:0/77 mine", expire, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        // A monitor round trip: the others arrive meanwhile.
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(())
                    })
                    .unwrap()
                })
            })
            .collect();
        let ran = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|&ran| ran)
            .count();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(ran, 1);
        // Another of our clients, or another owner, is fenced on its own.
        assert!(fence_once::<()>("10.0.0.9:0/77 other", expire, || Ok(())).unwrap());
        // A failed blocklist is not remembered: the next takeover retries.
        assert!(fence_once("10.0.0.9:0/78 mine", expire, || Err(())).is_err());
        assert!(fence_once::<()>("10.0.0.9:0/78 mine", expire, || Ok(())).unwrap());
        // An entry past half its expiry is renewed.
        let short = Duration::from_millis(100);
        assert!(fence_once::<()>("10.0.0.9:0/79 mine", short, || Ok(())).unwrap());
        std::thread::sleep(Duration::from_millis(60));
        assert!(fence_once::<()>("10.0.0.9:0/79 mine", short, || Ok(())).unwrap());
    }

    #[test]
    fn owner_matches_own_addresses() {
        let mine = "[v2:127.0.0.1:0/2411341891,v1:127.0.0.1:0/2411341891]";
        assert!(same_client("127.0.0.1:0/2411341891", mine));
        assert!(same_client(
            "127.0.0.1:0/2411341891",
            "127.0.0.1:0/2411341891"
        ));
        assert!(!same_client("127.0.0.1:0/2411341892", mine));
        assert!(!same_client("10.0.0.1:0/2411341891", mine));
        assert!(!same_client("", mine));
    }
}
