//! HA failover on the rbd exclusive lock: the glue between an image's
//! exclusive lock and the device's ALUA states.
//!
//! - The gateway whose client holds the lock reports its port group
//!   Active/Optimized and the others Standby; a gateway that does not hold
//!   it reports its own group Standby, and Transitioning while it takes
//!   the lock.
//! - An explicit SET TARGET PORT GROUPS asking the local group for
//!   Active/Optimized (what dm-multipath's ALUA handler sends when it
//!   switches to this path group), or with implicit ALUA a media command
//!   reaching a standby port, starts the takeover on the manager's own
//!   thread; the ring keeps answering 02/04/0A (transitioning, the host
//!   retries). The takeover fences the old owner before breaking its lock
//!   (see `tcmu_handler::rbd::lock`), then acquires, then reports
//!   Active/Optimized and marks every other group Standby.
//! - Every backend operation passes [`Failover::backend`]'s gate: only a
//!   gateway that took the lock on the session serving I/O reaches librbd.
//!   A gateway that loses the lock (its I/O sees ESHUTDOWN, or librbd no
//!   longer reports it as the owner) stops at once: the gate closes, the
//!   port goes Standby, the image is reopened on a fresh rados client and
//!   the gateway can take the lock back later.
//! - After losing the lock, I/O alone does not take it back for
//!   [`FailoverOptions::io_holdoff`]: commands the host had queued on this
//!   path before it failed over would otherwise steal the lock back from
//!   the new owner. An explicit STPG always does.
//!
//! Lock and state changes are logged in a `failover` span with the device
//! name; [`Failover::status`] is what the daemon's status shows.
//!
//! The managers of all devices share the daemon's [`Supervisor`]: a
//! device's jobs (takeover, release, lock check, ALUA group reload, lock
//! owner view) run one at a time on a bounded pool, and one timer thread
//! posts the periodic ones. An owner checks its lock every
//! [`FailoverOptions::poll`] while it serves I/O and every
//! [`FailoverOptions::idle_check`] while idle; a device that does not hold
//! the lock looks at the owner every [`VIEW_EVERY`] (or when its status is
//! asked for).

pub mod supervisor;

use crate::scsi::alua::{status, AccessState, AluaHandle, SharedAlua, StpgError, StpgRequest};
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use supervisor::{Mailbox, Serial, Supervisor, Timed};
use tcmu_handler::rbd::lock::{LockError, LockView, TakeOptions, Taken};
use tcmu_handler::rbd::{HandoffFn, RbdBackend};
use tcmu_handler::{Backend, Caps, Done, Geometry, IoError, Op};
use tracing::{error, info, info_span, warn};

/// What the failover manager needs of an image's exclusive lock: the rbd
/// backend in the daemon (see `tcmu_handler::rbd::lock` for the meaning of
/// each call); the state machine's tests supply a fake.
pub trait LockSource: Backend {
    /// The session (reopen) generation now.
    fn generation(&self) -> u64;
    /// Whether the current session was blocklisted.
    fn is_fenced(&self) -> bool;
    /// Whether this client holds the lock (a local call).
    fn lock_held(&self) -> Result<bool, LockError>;
    /// Who holds the lock.
    fn lock_view(&self) -> Result<LockView, LockError>;
    /// Takes the lock: asks another owner to hand it over, fences and
    /// breaks its lock if it does not.
    fn take_lock(&self, opts: &TakeOptions) -> Result<Taken, LockError>;
    /// Releases the lock.
    fn release_lock(&self) -> Result<(), LockError>;
    /// Marks session `generation` fenced and reopens on a fresh client
    /// (nothing if that session was already replaced).
    fn fence_and_reopen(&self, generation: u64);
    /// Submits `op` only if session `generation` is the one serving I/O
    /// (checked on the same session the op then runs on, so a reopen
    /// between the gate and the submission cannot send it to a session
    /// that never took the lock); otherwise completes it with
    /// [`IoError::Fenced`].
    fn submit_on(&self, generation: u64, op: Op, done: Done);
    /// Tells the image's service-map entry whether this gateway holds the
    /// lock, and counts a loss (`lost`); ceph-iscsi and the dashboard read
    /// it. Nothing by default.
    fn report_lock(&self, _owner: bool, _lost: bool) {}
    /// Answers other gateways' requests to hand the lock over with `f`.
    /// Nothing by default (such a gateway is fenced instead).
    fn set_handoff(&self, _f: Option<HandoffFn>) {}
    /// Keeps the handoff watch alive (called at each lock check).
    fn handoff_ready(&self) {}
    /// The cluster the image is in (managers of one cluster adopt each
    /// other's fenced owners' images); None: no adoption.
    fn cluster(&self) -> Option<String> {
        None
    }
}

impl LockSource for RbdBackend {
    fn generation(&self) -> u64 {
        RbdBackend::generation(self)
    }
    fn is_fenced(&self) -> bool {
        RbdBackend::is_fenced(self)
    }
    fn lock_held(&self) -> Result<bool, LockError> {
        RbdBackend::lock_held(self)
    }
    fn lock_view(&self) -> Result<LockView, LockError> {
        RbdBackend::lock_view(self)
    }
    fn take_lock(&self, opts: &TakeOptions) -> Result<Taken, LockError> {
        RbdBackend::take_lock(self, opts)
    }
    fn release_lock(&self) -> Result<(), LockError> {
        RbdBackend::release_lock(self)
    }
    fn fence_and_reopen(&self, generation: u64) {
        RbdBackend::fence_and_reopen(self, generation)
    }
    fn submit_on(&self, generation: u64, op: Op, done: Done) {
        RbdBackend::submit_on(self, generation, op, done)
    }
    fn set_handoff(&self, f: Option<HandoffFn>) {
        RbdBackend::set_handoff(self, f)
    }
    fn handoff_ready(&self) {
        RbdBackend::handoff_ready(self)
    }
    fn cluster(&self) -> Option<String> {
        Some(RbdBackend::cluster(self))
    }
    fn report_lock(&self, owner: bool, lost: bool) {
        let s = self.service_status();
        s.set_lock_owner(owner);
        if lost {
            s.lock_lost();
        }
    }
}

/// Tuning of the failover manager.
#[derive(Debug, Clone, Copy)]
pub struct FailoverOptions {
    /// How often an owner serving I/O looks for a fenced or replaced
    /// session (local: with I/O flowing a fence shows at once as
    /// ESHUTDOWN, which replaces the session). It does not ask librbd
    /// then: that is an OSD round trip holding librbd's owner_lock, which
    /// with an OSD down delays the I/O behind it by `osd_op_timeout` (and
    /// at 100 ms it cost a busy LUN's daemon 1–3% of its CPU).
    pub poll: Duration,
    /// How long an `osd blocklist add` of a fenced owner lasts. Longer
    /// than any op of the old client can stay in flight; the old gateway
    /// reconnects with a fresh client (new address) anyway.
    pub blocklist_expire_secs: u32,
    /// After losing the lock, I/O does not take it back for this long
    /// (STPG does).
    pub io_holdoff: Duration,
    /// How long a takeover waits for the owner's answer to a handoff
    /// request before fencing it (zero: never ask, always fence). A live
    /// gateway answers within a round trip; a dead or stopped one never
    /// does, so this is what a crash takeover pays on top of the fence.
    pub handoff_ask: Duration,
    /// After the owner agreed to hand over, how long to wait for it to
    /// release (it finishes its writes in flight first) before fencing it
    /// after all.
    pub handoff_wait: Duration,
    /// How long a takeover keeps trying (waiting for a reopen, retrying
    /// a racing acquire) before the port goes back to Standby.
    pub acquire_timeout: Duration,
    /// How often an owner with no I/O since its last check checks the
    /// lock. The check is a round trip to the OSD holding the image
    /// header (librbd asserts the lock there), so hundreds of idle LUNs
    /// must not do it ten times a second. An idle owner that was fenced
    /// is noticed by this check or by its next I/O, which the gate
    /// refuses with the standby sense.
    pub idle_check: Duration,
}

/// How often a device that does not hold the lock looks up who does, when
/// nobody asks (a round trip to the OSD, for the log). Status and metrics
/// start a look themselves when theirs is older than [`VIEW_FRESH`], so
/// this is only a net, kept rare: hundreds of idle standby LUNs each
/// looking every 30 s kept the failover pool busy for nobody.
pub const VIEW_EVERY: Duration = Duration::from_secs(300);
/// A status asked for shows an owner seen at most this long ago (it
/// starts a look when the last one is older).
pub const VIEW_FRESH: Duration = Duration::from_secs(10);
/// The first look at the lock owner of a device that does not hold it
/// comes this long after the manager starts, not at once: the look is
/// for the log and for status (which starts one itself when asked), and
/// at a restart hundreds of them at once compete with the opens for the
/// CPU (under emulation, what bounds a restart).
const VIEW_FIRST: Duration = Duration::from_secs(20);
/// How often the ALUA groups are read again from configfs: often while a
/// young device has none yet (ceph-iscsi creates them right after
/// enabling the backstore), rarely once they exist (a gateway added later)
/// or once the device is older than [`GROUPS_YOUNG`] (a LUN served without
/// groups; its first I/O takes the lock anyway).
const GROUPS_EARLY: Duration = Duration::from_secs(1);
const GROUPS_LATER: Duration = Duration::from_secs(10);
const GROUPS_YOUNG: Duration = Duration::from_secs(120);

impl Default for FailoverOptions {
    fn default() -> Self {
        FailoverOptions {
            poll: Duration::from_secs(1),
            blocklist_expire_secs: 3600,
            io_holdoff: Duration::from_secs(5),
            handoff_ask: Duration::from_secs(1),
            handoff_wait: Duration::from_secs(10),
            acquire_timeout: Duration::from_secs(20),
            idle_check: Duration::from_secs(5),
        }
    }
}

/// A fenced owner's images are adopted once in this long (the takeovers
/// that found it together ask once).
const ADOPT_ONCE: Duration = Duration::from_secs(60);

/// The managers of this process, by cluster (see [`Shared::adopt`]).
type Managers = Mutex<Vec<(String, Weak<Shared>)>>;

fn managers() -> &'static Managers {
    static M: std::sync::OnceLock<Managers> = std::sync::OnceLock::new();
    M.get_or_init(|| Mutex::new(Vec::new()))
}

/// A device's jobs, run one at a time on the supervisor's pool.
#[derive(Debug, PartialEq)]
enum Job {
    Acquire(&'static str),
    /// Another device of this process fenced this owner: take over this
    /// image too if it was the owner's (it cannot serve it any more).
    Adopt(String),
    Release,
    /// Another gateway asked for the lock: release it, and do not take it
    /// back on I/O for [`FailoverOptions::io_holdoff`].
    HandOver,
    /// While serving: is the lock still ours? `true`: ask librbd too
    /// (an OSD round trip); `false`: only what this process knows (the
    /// session was fenced or replaced).
    Check(bool),
    /// Read the ALUA groups again.
    Groups,
    /// Look up the lock owner.
    View,
    Stop,
}

/// When the timer thread next posts each periodic job.
struct Timers {
    check: Instant,
    groups: Instant,
    view: Instant,
    /// `Shared::ops` at the last check.
    last_ops: u64,
    /// When the manager started.
    born: Instant,
}

/// A snapshot of the manager's state for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverStatus {
    /// The local port group's ALUA state.
    pub state: AccessState,
    /// Whether this gateway holds the lock and serves I/O.
    pub serving: bool,
    /// Who holds the lock, as last seen (`mine`, `free`, an address, or
    /// `unknown`).
    pub lock: String,
    /// The backend session generation (1 + reopens on a fresh client).
    pub generation: u64,
    /// Times this gateway took the lock.
    pub takeovers: u64,
    /// Times it lost the lock.
    pub losses: u64,
    /// Times it handed the lock over to another gateway that asked.
    pub handovers: u64,
    /// The last takeover's duration (request to Active/Optimized).
    pub last_takeover_ms: Option<u64>,
}

/// Short name of an ALUA state, as status lines show it.
pub fn state_name(s: AccessState) -> &'static str {
    match s {
        AccessState::ActiveOptimized => "active/optimized",
        AccessState::ActiveNonOptimized => "active/non-optimized",
        AccessState::Standby => "standby",
        AccessState::Unavailable => "unavailable",
        AccessState::LbaDependent => "lba-dependent",
        AccessState::Offline => "offline",
        AccessState::Transitioning => "transitioning",
    }
}

impl std::fmt::Display for FailoverStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "alua={} lock={} generation={} takeovers={} losses={} handovers={}",
            state_name(self.state),
            self.lock,
            self.generation,
            self.takeovers,
            self.losses,
            self.handovers
        )?;
        if let Some(ms) = self.last_takeover_ms {
            write!(f, " last_takeover_ms={ms}")?;
        }
        Ok(())
    }
}

struct Shared {
    name: String,
    backend: Arc<dyn LockSource>,
    alua: AluaHandle,
    opts: FailoverOptions,
    /// The gate: set only while the lock is held on session `owned_gen`.
    serving: AtomicBool,
    owned_gen: AtomicU64,
    /// A takeover is queued or running.
    acquiring: AtomicBool,
    /// The gate refused an op on a lost session: the manager should look.
    suspect: AtomicBool,
    takeovers: AtomicU64,
    losses: AtomicU64,
    /// Times it handed the lock over on request.
    handovers: AtomicU64,
    /// Held while a loss or takeover updates the ALUA state and its
    /// counter, and while [`Failover::status`] reads them: a status never
    /// shows one without the other.
    transition: Mutex<()>,
    lost_at: Mutex<Option<Instant>>,
    lock_view: Mutex<String>,
    last_takeover_ms: Mutex<Option<u64>>,
    /// Ops that arrived with no ALUA groups while the first takeover ran.
    parked: Mutex<Vec<(Op, Done)>>,
    me: Weak<Shared>,
    sup: Arc<Supervisor>,
    mail: Mailbox<Job>,
    timers: Mutex<Timers>,
    /// Ops through the gate (an owner with none since its last check is
    /// idle: see [`FailoverOptions::idle_check`]).
    ops: AtomicU64,
    /// The last check found the owner idle: the next op asks for checks
    /// at the busy rate again.
    idle: AtomicBool,
    /// When the lock owner was last looked up.
    view_at: Mutex<Option<Instant>>,
    stopped: AtomicBool,
    stop_tx: Sender<()>,
    stop_rx: Receiver<()>,
}

impl Shared {
    fn set_local(&self, state: AccessState, why: &str) {
        let old = self.alua.state(self.alua.local_group());
        self.alua.set_local_state(state);
        // No group (ALUA off): nothing is reported, nothing to log.
        if old.is_some() && old != Some(state) {
            info!(
                dev = %self.name,
                group = self.alua.local_group(),
                from = old.map_or("?", state_name),
                to = state_name(state),
                why,
                "ALUA state change"
            );
        }
    }

    /// What this gateway's group reports while it does not hold the lock:
    /// Standby, or Active/Non-optimized when the group only does implicit
    /// ALUA (ceph-iscsi's groups): a host never sends I/O to a Standby
    /// path it cannot activate by STPG, so the I/O that takes the lock
    /// would never come.
    fn idle_state(&self) -> AccessState {
        let m = self.alua.mode();
        if m.implicit && !m.explicit {
            AccessState::ActiveNonOptimized
        } else {
            AccessState::Standby
        }
    }

    /// Reports every group as the lock says now: this one Active/Optimized
    /// and the others idle while serving; this one Transitioning while
    /// taking the lock; idle otherwise.
    fn apply_states(&self) {
        let local = self.alua.local_group();
        if self.serving.load(Ordering::Acquire) {
            let others = self.idle_state();
            for g in self.alua.group_ids() {
                if g != local {
                    self.alua.set_state(g, others, status::BY_IMPLICIT);
                }
            }
            self.set_local(AccessState::ActiveOptimized, "exclusive lock held");
        } else if self.acquiring.load(Ordering::Acquire) {
            self.set_local(AccessState::Transitioning, "taking the exclusive lock");
        } else {
            self.set_local(self.idle_state(), "this gateway does not hold the lock");
        }
    }

    /// Submits the ops parked during a takeover if it left the gate open,
    /// fails them otherwise.
    fn flush_parked(&self) {
        let ops = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        for (op, done) in ops {
            match self.admitted_generation() {
                Some(gen) => self.backend.submit_on(gen, op, done),
                None => done.complete(Err(IoError::Fenced(format!(
                    "{}: the takeover failed; this gateway does not hold the image's exclusive lock",
                    self.name
                )))),
            }
        }
    }

    /// Starts a takeover unless one is under way. Never blocks.
    fn kick_acquire(&self, why: &'static str) {
        if self.serving.load(Ordering::Acquire) {
            return;
        }
        if self.acquiring.swap(true, Ordering::AcqRel) {
            return;
        }
        self.set_local(AccessState::Transitioning, why);
        if !self.post(Job::Acquire(why)) {
            self.acquiring.store(false, Ordering::Release);
            self.set_local(self.idle_state(), "failover manager gone");
            self.flush_parked();
        }
    }

    fn in_holdoff(&self) -> bool {
        self.lost_at
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|t| t.elapsed() < self.opts.io_holdoff)
    }

    fn on_request_active(&self) {
        if self.serving.load(Ordering::Acquire) || self.in_holdoff() {
            return;
        }
        self.kick_acquire("I/O at a standby port");
    }

    fn on_stpg(&self, handle: &AluaHandle, reqs: &[StpgRequest]) -> Result<(), StpgError> {
        for r in reqs {
            if r.group == self.alua.local_group() {
                match r.state {
                    AccessState::ActiveOptimized | AccessState::ActiveNonOptimized => {
                        if self.serving.load(Ordering::Acquire) {
                            handle.set_state(
                                r.group,
                                AccessState::ActiveOptimized,
                                status::BY_STPG,
                            );
                            // A host asks a gateway that thinks it owns the
                            // lock to be active: it may have been fenced
                            // without knowing yet (stopped while another
                            // took over, and idle since). Ask librbd now,
                            // not at the next idle check, so a stale owner
                            // turns Standby within a round trip and the
                            // host's next I/O there moves it on.
                            self.post(Job::Check(true));
                        } else {
                            self.kick_acquire("SET TARGET PORT GROUPS");
                        }
                    }
                    _ => {
                        if self.serving.load(Ordering::Acquire) {
                            if !self.post(Job::Release) {
                                return Err(StpgError::Failed("failover manager gone".into()));
                            }
                        } else {
                            handle.set_state(r.group, r.state, status::BY_STPG);
                        }
                    }
                }
            } else if !(self.serving.load(Ordering::Acquire)
                && matches!(
                    r.state,
                    AccessState::ActiveOptimized | AccessState::ActiveNonOptimized
                ))
            {
                // Another gateway's group: only what it looks like from
                // here; it cannot be active while this one holds the lock.
                handle.set_state(r.group, r.state, status::BY_STPG);
            }
        }
        Ok(())
    }

    /// The session an op may run on now: the one that took the lock,
    /// while this gateway serves. The backend checks it again against
    /// the session it submits on ([`LockSource::submit_on`]).
    fn admitted_generation(&self) -> Option<u64> {
        // owned_gen before serving: a takeover stores owned_gen and then
        // sets serving, so a stale generation read here can only be
        // refused by the backend, never admitted to a newer session.
        let gen = self.owned_gen.load(Ordering::Acquire);
        (self.serving.load(Ordering::Acquire) && gen != 0).then_some(gen)
    }

    /// Queues `job`; false once the manager stopped. The periodic jobs are
    /// queued once at most; a takeover or release gets a worker at once.
    fn post(&self, job: Job) -> bool {
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        let urgent = matches!(
            job,
            Job::Acquire(_) | Job::Adopt(_) | Job::Release | Job::HandOver | Job::Stop
        );
        if self.mail.post(job, !urgent) {
            if let Some(me) = self.me.upgrade() {
                self.sup.schedule(me, urgent);
            }
        }
        true
    }

    /// Called for every op through the gate: an idle owner's next check
    /// comes at the busy rate, now.
    fn note_op(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::AcqRel) {
            self.timers.lock().unwrap_or_else(|e| e.into_inner()).check = Instant::now();
            self.sup.nudge();
        }
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.flush_parked();
        info!("failover manager stopped");
        let _ = self.stop_tx.send(());
    }

    fn refresh_view(&self) {
        *self.view_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let v = match self.backend.lock_view() {
            Ok(v) => v.to_string(),
            Err(LockError::Fenced { .. }) => "unknown (reopening)".into(),
            Err(_) => "unknown".into(),
        };
        let mut g = self.lock_view.lock().unwrap_or_else(|e| e.into_inner());
        if *g != v {
            info!(owner = %v, "lock owner seen");
            *g = v;
        }
    }

    /// While serving: the lock must still be ours on the same session.
    /// `full`: also ask librbd (an OSD round trip), else only the local
    /// signs (fenced, reopened).
    fn check(&self, full: bool) {
        self.backend.handoff_ready();
        let suspect = self.suspect.swap(false, Ordering::AcqRel);
        if !self.serving.load(Ordering::Acquire) {
            return;
        }
        let gen = self.owned_gen.load(Ordering::Acquire);
        let why = if self.backend.generation() != gen || self.backend.is_fenced() {
            Some("this client was blocklisted (I/O failed with ESHUTDOWN)".to_string())
        } else if !full {
            None
        } else {
            match self.backend.lock_held() {
                Ok(true) => None,
                Ok(false) => Some("librbd no longer reports this client as the lock owner".into()),
                Err(LockError::Fenced { .. }) => Some("this client was blocklisted".into()),
                Err(e) => {
                    if suspect {
                        Some(format!("lock check failed: {e}"))
                    } else {
                        warn!(error = %e, "lock check failed; keeping the lock for now");
                        None
                    }
                }
            }
        };
        if let Some(why) = why {
            self.lost(&why);
        }
    }

    fn lost(&self, why: &str) {
        // Gate first: not one more op reaches librbd on this session.
        self.serving.store(false, Ordering::Release);
        if let Ok(mut g) = self.lost_at.lock() {
            *g = Some(Instant::now());
        }
        warn!(
            why,
            "exclusive lock lost: serving no more I/O, reopening on a fresh client"
        );
        {
            let _t = self.transition.lock().unwrap_or_else(|e| e.into_inner());
            self.set_local(self.idle_state(), "lock lost");
            self.losses.fetch_add(1, Ordering::Relaxed);
        }
        self.backend.report_lock(false, true);
        *self.lock_view.lock().unwrap_or_else(|e| e.into_inner()) = "lost".into();
        // The session that held the lock: a reopen that already replaced
        // it (an I/O saw ESHUTDOWN first) must not be thrown away too.
        self.backend
            .fence_and_reopen(self.owned_gen.load(Ordering::Acquire));
    }

    fn acquire(&self, why: &str) {
        self.take(why, None);
    }

    /// A gateway was fenced by another device of this process: if it
    /// held this image's lock too, take it now (that gateway serves
    /// nothing any more), instead of waiting for each host to notice, path
    /// by path. Only an image held by exactly that owner is taken: a
    /// free lock, or one another live gateway took meanwhile, is left.
    fn adopt(&self, owner: &str) {
        if self.stopped.load(Ordering::Acquire) || self.serving.load(Ordering::Acquire) {
            return;
        }
        // Look first, so a device that was not the owner's never shows a
        // transition.
        match self.backend.lock_view() {
            Ok(LockView::Other(o)) if o == owner => {}
            _ => return,
        }
        if self.acquiring.swap(true, Ordering::AcqRel) {
            return;
        }
        self.set_local(
            AccessState::Transitioning,
            "adopting an image of a gateway this one fenced",
        );
        self.take(
            "adopting an image of a gateway this one fenced",
            Some(owner.to_string()),
        );
    }

    /// Tells the other managers of this cluster that `fenced` were fenced.
    fn adopt_others(&self, fenced: &[String]) {
        let Some(cluster) = self.backend.cluster() else {
            return;
        };
        // Once per fenced owner: a whole gateway's takeovers all find the
        // same owner, and one call asks every device already.
        let fenced: Vec<String> = {
            static DONE: std::sync::OnceLock<Mutex<std::collections::HashMap<String, Instant>>> =
                std::sync::OnceLock::new();
            let mut done = DONE
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            done.retain(|_, t| t.elapsed() < ADOPT_ONCE);
            fenced
                .iter()
                .filter(|o| {
                    done.insert(format!("{cluster} {o}"), Instant::now())
                        .is_none()
                })
                .cloned()
                .collect()
        };
        if fenced.is_empty() {
            return;
        }
        let others: Vec<Arc<Shared>> = managers()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(c, _)| *c == cluster)
            .filter_map(|(_, w)| w.upgrade())
            .filter(|m| !std::ptr::eq(Arc::as_ptr(m), self))
            .collect();
        for m in &others {
            for owner in &fenced {
                m.post(Job::Adopt(owner.clone()));
            }
        }
        if !others.is_empty() {
            info!(fenced = ?fenced, devices = others.len(), "asked this gateway's other devices to adopt the fenced owner's images");
        }
    }

    /// Takes the lock (see [`LockSource::take_lock`]); `only_from`: only
    /// from that (fenced) owner. Ends the takeover `acquiring` marks.
    fn take(&self, why: &str, only_from: Option<String>) {
        let t0 = Instant::now();
        info!(why, "taking the exclusive lock");
        let deadline = t0 + self.opts.acquire_timeout;
        let result = loop {
            let opts = TakeOptions {
                blocklist_expire_secs: self.opts.blocklist_expire_secs,
                handoff_ask: self.opts.handoff_ask,
                handoff_wait: self.opts.handoff_wait,
                only_from: only_from.clone(),
            };
            match self.backend.take_lock(&opts) {
                Ok(t) => break Ok(t),
                // Blocklisted earlier: wait for the reopen on a fresh client.
                Err(LockError::Fenced { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // Another gateway raced us between break and acquire.
                Err(LockError::Call { ref source, .. })
                    if (source.errno == libc::EBUSY || source.errno == libc::EAGAIN)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(t) => {
                let _t = self.transition.lock().unwrap_or_else(|e| e.into_inner());
                self.owned_gen.store(t.generation, Ordering::Release);
                self.serving.store(true, Ordering::Release);
                self.apply_states();
                let ms = t0.elapsed().as_millis() as u64;
                *self
                    .last_takeover_ms
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(ms);
                *self.lock_view.lock().unwrap_or_else(|e| e.into_inner()) = "mine".into();
                self.backend.report_lock(true, false);
                if !t.already {
                    self.takeovers.fetch_add(1, Ordering::Relaxed);
                }
                info!(fenced = ?t.fenced, handed_over = ?t.handed_over, generation = t.generation, ms, "takeover done: active/optimized");
                if !t.fenced.is_empty() {
                    self.adopt_others(&t.fenced);
                }
            }
            Err(e @ LockError::NotFrom { .. }) => {
                info!(error = %e, "nothing to adopt");
                self.set_local(self.idle_state(), "nothing to adopt");
            }
            // librbd refuses to acquire a lock another client holds: a
            // gateway that was also taking it won the race (after both
            // fenced a dead owner). Not a fault; the host's next command
            // here asks that gateway for it.
            Err(LockError::Call { ref source, .. })
                if source.errno == libc::EROFS
                    && matches!(self.backend.lock_view(), Ok(LockView::Other(_))) =>
            {
                info!("another gateway took the lock first; staying standby");
                self.set_local(self.idle_state(), "another gateway took the lock first");
            }
            Err(e) => {
                error!(error = %e, "takeover failed; staying standby");
                self.set_local(self.idle_state(), "takeover failed");
            }
        }
        self.acquiring.store(false, Ordering::Release);
        self.flush_parked();
    }

    /// Gives the lock up; false if this gateway turned out to be fenced
    /// already (then it is handled as a loss: reopen on a fresh client).
    fn release(&self) -> bool {
        // Gate first, then the state the port will have: the host moves
        // its I/O to the other path now (the standby sense), instead of
        // retrying here (the transitioning sense) while librbd releases.
        let was_serving = self.serving.swap(false, Ordering::AcqRel);
        self.set_local(self.idle_state(), "releasing the lock");
        // Writes in flight finish on librbd's side before it releases.
        match self.backend.release_lock() {
            Ok(()) => {
                self.backend.report_lock(false, false);
                info!("lock released");
                true
            }
            // Fenced while it thought it held the lock (e.g. stopped while
            // another gateway took over, then asked by that gateway's
            // request, delivered late): a loss, and the session must be
            // replaced, or it would stay on a blocklisted client.
            Err(LockError::Fenced { .. }) => {
                // (Counted once: a check that found it first already did.)
                if was_serving {
                    self.lost("this client was blocklisted (found when releasing the lock)");
                }
                false
            }
            Err(e) => {
                warn!(error = %e, "lock release failed");
                self.backend.report_lock(false, false);
                true
            }
        }
    }

    /// Asked by another gateway's takeover (on librados' callback thread):
    /// agrees, and releases on the pool, if this gateway serves the image
    /// or is taking it. Declining gets this gateway fenced, so it declines
    /// only when it does not hold the lock as far as it knows. A takeover
    /// under way may hold the lock already (librbd acquired it, the gate is
    /// not open yet): asked then, it agrees, and the handover job runs
    /// after the takeover's (one job at a time per device), so the asker
    /// gets the lock without fencing a live gateway.
    fn on_handoff(&self) -> bool {
        if self.stopped.load(Ordering::Acquire)
            || !(self.serving.load(Ordering::Acquire) || self.acquiring.load(Ordering::Acquire))
        {
            return false;
        }
        self.post(Job::HandOver)
    }

    fn hand_over(&self) {
        // A check between the request and this job found the lock lost:
        // nothing left to hand over.
        if !self.serving.load(Ordering::Acquire) {
            return;
        }
        // Holdoff first: commands the host queued here before it switched
        // paths must not ask for the lock straight back.
        if let Ok(mut g) = self.lost_at.lock() {
            *g = Some(Instant::now());
        }
        info!("another gateway asked for the lock: handing it over (no fence)");
        if !self.release() {
            return;
        }
        // A request can arrive late: sent while this gateway was stopped,
        // the asker fenced it when no answer came. Then librbd's release
        // succeeds locally, and only a call to the cluster tells.
        if let Err(LockError::Fenced { .. }) = self.backend.lock_view() {
            self.lost("this client was blocklisted (the handover request came late)");
            return;
        }
        self.handovers.fetch_add(1, Ordering::Relaxed);
        *self.lock_view.lock().unwrap_or_else(|e| e.into_inner()) = "handed over".into();
    }
}

impl Serial for Shared {
    fn run_queued(&self) {
        let span = info_span!("failover", dev = %self.name);
        let _g = span.enter();
        while let Some(job) = self.mail.next() {
            if self.stopped.load(Ordering::Acquire) {
                continue;
            }
            match job {
                Job::Acquire(why) => self.acquire(why),
                Job::Adopt(owner) => self.adopt(&owner),
                Job::Release => {
                    self.release();
                }
                Job::HandOver => self.hand_over(),
                Job::Check(full) => self.check(full),
                Job::Groups => {
                    // Groups created after the device opened (ceph-iscsi
                    // maps the disk, and creates its groups, after
                    // enabling the backstore).
                    if self.alua.reload_groups() {
                        self.apply_states();
                    }
                }
                Job::View => self.refresh_view(),
                Job::Stop => self.stop(),
            }
        }
    }
}

impl Timed for Shared {
    fn tick(&self, now: Instant) -> Instant {
        if self.stopped.load(Ordering::Acquire) {
            return now + Duration::from_secs(3600);
        }
        let serving = self.serving.load(Ordering::Acquire);
        let mut t = self.timers.lock().unwrap_or_else(|e| e.into_inner());
        if now >= t.check {
            let ops = self.ops.load(Ordering::Relaxed);
            // A refused op marks the device suspect for the next check;
            // without the lock there is nothing to check.
            let suspect = if serving {
                self.suspect.load(Ordering::Acquire)
            } else {
                self.suspect.swap(false, Ordering::AcqRel)
            };
            let busy = ops != t.last_ops || suspect;
            t.last_ops = ops;
            if serving {
                // Busy: an op on a fenced session fails with ESHUTDOWN
                // and replaces the session, which the local check sees;
                // asking librbd meanwhile would hold its owner_lock
                // through a round trip that, with an OSD down, lasts
                // osd_op_timeout and delays the I/O behind it.
                self.post(Job::Check(!busy || suspect));
            }
            self.idle.store(!busy, Ordering::Release);
            t.check = now
                + if busy {
                    self.opts.poll
                } else {
                    self.opts.idle_check
                };
        }
        if now >= t.groups && self.alua.follows_source() {
            self.post(Job::Groups);
            t.groups = now
                + if self.alua.group_ids().is_empty() && now < t.born + GROUPS_YOUNG {
                    GROUPS_EARLY
                } else {
                    GROUPS_LATER
                };
        }
        if !serving && now >= t.view {
            self.post(Job::View);
            t.view = now + VIEW_EVERY;
        }
        let mut next = t.check;
        if self.alua.follows_source() {
            next = next.min(t.groups);
        }
        if !serving {
            next = next.min(t.view);
        }
        next
    }
}

/// The failover manager of one device. Dropping it (after the device's
/// worker stopped) releases the lock if held and stops its thread.
pub struct Failover {
    shared: Arc<Shared>,
}

/// Why the manager could not start.
#[derive(Debug, thiserror::Error)]
#[error("{dev}: cannot start the failover thread: {source}")]
pub struct FailoverError {
    /// Device.
    pub dev: String,
    /// Why.
    pub source: std::io::Error,
}

impl Failover {
    /// Drives `alua`'s states from `backend`'s exclusive lock: installs the
    /// STPG and implicit-activation hooks, reports the local group Standby
    /// (nobody holds the lock for this gateway yet) and starts the
    /// manager thread.
    pub fn start(
        name: &str,
        backend: Arc<dyn LockSource>,
        alua: &SharedAlua,
        opts: FailoverOptions,
    ) -> Result<Failover, FailoverError> {
        let local_group = alua.local_port_cached().group;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let now = Instant::now();
        let shared = Arc::new_cyclic(|me| Shared {
            name: name.to_string(),
            backend,
            alua: alua.handle(),
            opts,
            serving: AtomicBool::new(false),
            owned_gen: AtomicU64::new(0),
            acquiring: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            takeovers: AtomicU64::new(0),
            losses: AtomicU64::new(0),
            handovers: AtomicU64::new(0),
            transition: Mutex::new(()),
            lost_at: Mutex::new(None),
            lock_view: Mutex::new("unknown".into()),
            last_takeover_ms: Mutex::new(None),
            parked: Mutex::new(Vec::new()),
            me: me.clone(),
            sup: Supervisor::global(),
            mail: Mailbox::new(),
            timers: Mutex::new(Timers {
                check: now,
                // The groups were just read to build the device's ALUA
                // state: the first re-read can wait its interval.
                groups: now
                    + if alua.handle().group_ids().is_empty() {
                        GROUPS_EARLY
                    } else {
                        GROUPS_LATER
                    },
                view: now + VIEW_FIRST,
                last_ops: 0,
                born: now,
            }),
            ops: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            view_at: Mutex::new(None),
            stopped: AtomicBool::new(false),
            stop_tx,
            stop_rx,
        });
        shared.set_local(shared.idle_state(), "gateway started without the lock");
        let weak = Arc::downgrade(&shared);
        alua.on_request_active(move || {
            if let Some(s) = weak.upgrade() {
                s.on_request_active();
            }
        });
        let weak = Arc::downgrade(&shared);
        alua.on_stpg(move |h, reqs| match weak.upgrade() {
            Some(s) => s.on_stpg(h, reqs),
            None => Err(StpgError::Failed("failover manager gone".into())),
        });
        if let Some(c) = shared.backend.cluster() {
            let mut m = managers().lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|(_, w)| w.strong_count() > 0);
            m.push((c, Arc::downgrade(&shared)));
        }
        let weak = Arc::downgrade(&shared);
        shared.backend.set_handoff(Some(Arc::new(move || {
            let Some(s) = weak.upgrade() else {
                return false;
            };
            let agreed = s.on_handoff();
            // Runs on librados' callback thread: never drop the manager
            // (and with it the backend and its watch) there.
            tcmu_handler::rbd::handoff::drop_elsewhere(s);
            agreed
        })));
        let timed: Weak<dyn Timed> = Arc::downgrade(&shared) as Weak<dyn Timed>;
        shared.sup.watch(timed);
        info!(dev = %name, group = local_group, "failover manager started");
        Ok(Failover { shared })
    }

    /// The backend to serve the device with: the rbd backend behind the
    /// lock gate.
    pub fn backend(&self) -> Arc<dyn Backend> {
        Arc::new(Gated {
            shared: Arc::clone(&self.shared),
        })
    }

    /// Asks for a takeover, as an STPG would (tests, admin commands).
    pub fn request_active(&self) {
        self.shared.kick_acquire("requested");
    }

    /// The manager's state now.
    pub fn status(&self) -> FailoverStatus {
        let s = &self.shared;
        if !s.serving.load(Ordering::Acquire)
            && s.view_at
                .lock()
                .map(|g| g.is_none_or(|t| t.elapsed() > VIEW_FRESH))
                .unwrap_or(false)
        {
            s.post(Job::View);
        }
        // State and counters under one lock (see `transition`).
        let _t = s.transition.lock().unwrap_or_else(|e| e.into_inner());
        let losses = s.losses.load(Ordering::Relaxed);
        let takeovers = s.takeovers.load(Ordering::Relaxed);
        FailoverStatus {
            state: s
                .alua
                .state(s.alua.local_group())
                .unwrap_or(AccessState::Transitioning),
            serving: s.serving.load(Ordering::Acquire),
            lock: s
                .lock_view
                .lock()
                .map(|g| g.clone())
                .unwrap_or_else(|_| "unknown".into()),
            generation: s.backend.generation(),
            takeovers,
            losses,
            handovers: s.handovers.load(Ordering::Relaxed),
            last_takeover_ms: s.last_takeover_ms.lock().ok().and_then(|g| *g),
        }
    }
}

impl Drop for Failover {
    fn drop(&mut self) {
        // A clean stop (device removed, daemon stopping; its worker has
        // drained) hands the lock over instead of waiting to be fenced.
        let s = &self.shared;
        if s.serving.load(Ordering::Acquire) {
            s.post(Job::Release);
        }
        // Waits for the jobs before it (a takeover under way ends first,
        // within its acquire timeout).
        if s.post(Job::Stop)
            && s.stop_rx
                .recv_timeout(s.opts.acquire_timeout + Duration::from_secs(60))
                .is_err()
        {
            error!(dev = %s.name, "failover manager did not stop in time");
        }
        // The pool worker that ran the stop still holds the manager for a
        // moment after it signalled. Wait for it to let go, so the
        // backend's last reference (whose drop joins a reopen's librados
        // calls) is not dropped on that worker while the process exits:
        // a gateway stopped during a reopen exited with a failure that way
        // (the clean-stop drill, 1 run in about 12).
        let t0 = Instant::now();
        while Arc::strong_count(&self.shared) > 1 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The rbd backend behind the lock gate.
struct Gated {
    shared: Arc<Shared>,
}

impl Backend for Gated {
    fn name(&self) -> String {
        self.shared.backend.name()
    }

    fn geometry(&self) -> Geometry {
        self.shared.backend.geometry()
    }

    fn caps(&self) -> Caps {
        self.shared.backend.caps()
    }

    fn merge_limit(&self) -> usize {
        self.shared.backend.merge_limit()
    }

    fn submit(&self, op: Op, done: Done) {
        self.shared.note_op();
        let Some(gen) = self.shared.admitted_generation() else {
            // A non-optimized port serves reads without the lock (librbd
            // reads need none; nothing is changed) and answers a flush:
            // with rbd_cache off every acknowledged write is already on
            // the OSDs.
            if self.shared.alua.state(self.shared.alua.local_group())
                == Some(AccessState::ActiveNonOptimized)
            {
                match op {
                    // An allocation query reads nothing but metadata.
                    Op::Read { .. } | Op::Provisioning { .. } => {
                        return self.shared.backend.submit(op, done)
                    }
                    Op::Flush => return done.complete(Ok(())),
                    _ => {}
                }
            }
            self.shared.suspect.store(true, Ordering::Release);
            // Without ALUA groups nothing else asks for the lock: the
            // first I/O does, and waits for it (such a host has no ALUA
            // handler to retry a transition sense). It is parked off the
            // ring thread; the manager submits or fails it when the
            // takeover ends.
            if !self.shared.alua.mode().enabled() && !self.shared.in_holdoff() {
                self.shared.kick_acquire("I/O (no ALUA groups)");
                if self.shared.acquiring.load(Ordering::Acquire) {
                    self.shared
                        .parked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((op, done));
                    // The takeover may have ended between the check and
                    // the push: then nobody else would flush.
                    if !self.shared.acquiring.load(Ordering::Acquire) {
                        self.shared.flush_parked();
                    }
                    return;
                }
                // Or it ended before the check (a fast takeover on a
                // worker while this thread was preempted): serve on it.
                if let Some(gen) = self.shared.admitted_generation() {
                    return self.shared.backend.submit_on(gen, op, done);
                }
            }
            done.complete(Err(IoError::Fenced(format!(
                "{}: this gateway does not hold the image's exclusive lock",
                self.shared.name
            ))));
            return;
        };
        // A reopen since the lock was taken makes the backend refuse it
        // (and the manager notices the new generation at its next check).
        self.shared.backend.submit_on(gen, op, done);
    }

    fn resize(&self, size: u64) -> Result<(), IoError> {
        self.shared.backend.resize(size)
    }
}

/// An rbd device served by an HA gateway: the gated backend, the ALUA
/// source to install on the LUN, and the manager driving it.
pub struct HaRbd {
    /// The backend to serve the device with.
    pub backend: Arc<dyn Backend>,
    /// The ALUA source ([`crate::scsi::Lun::set_alua`]).
    pub alua: Arc<SharedAlua>,
    /// The failover manager (keep it as long as the device is served).
    pub failover: Failover,
}

/// What [`open_rbd`] opened.
pub enum RbdDevice {
    /// Gated on the image's exclusive lock.
    Ha(HaRbd),
    /// The image has no exclusive-lock feature: served as it is, with no
    /// failover (logged as a warning).
    Plain(Arc<dyn Backend>),
}

/// Opens the rbd image `cfgstring` for device `name`. Every image with the
/// exclusive-lock feature is served behind the lock gate: only the gateway
/// holding the lock writes, whether or not ALUA groups exist yet. `alua`
/// holds the device's groups (none yet is fine: with
/// [`SharedAlua::follow`] (from `crate::configfs::ConfigfsGroups`) groups created later are picked up,
/// and until then the first I/O takes the lock).
pub fn open_rbd(
    name: &str,
    cfgstring: &str,
    size: u64,
    block_size: u32,
    alua: SharedAlua,
    opts: FailoverOptions,
) -> Result<RbdDevice, crate::backends::OpenError> {
    use crate::backends::OpenError;
    crate::backends::check_geometry(size, block_size)?;
    let rbd = Arc::new(RbdBackend::open(cfgstring, size, block_size).map_err(OpenError::Open)?);
    // (RbdBackend::open logged the warning for an image without it.)
    if !rbd.has_exclusive_lock().map_err(OpenError::Open)? {
        return Ok(RbdDevice::Plain(rbd));
    }
    let failover =
        Failover::start(name, rbd, &alua, opts).map_err(|e| OpenError::Open(e.to_string()))?;
    Ok(RbdDevice::Ha(HaRbd {
        backend: failover.backend(),
        alua: Arc::new(alua),
        failover,
    }))
}

#[cfg(test)]
mod tests {
    //! The state machine against a fake lock: no cluster.
    use super::*;
    use crate::scsi::alua::{AluaConfig, AluaSource, GroupConfig, LocalPort, StpgRequest};
    use tcmu_handler::{CompletionQueue, IoResult};

    /// Something done to the fake at a chosen moment.
    type Hook = Box<dyn FnOnce(&FakeLock) + Send>;

    /// The lock as the fake cluster sees it.
    #[derive(Default)]
    struct Lock {
        generation: u64,
        /// This client holds the lock.
        held: bool,
        /// This client's session was blocklisted.
        fenced: bool,
        /// Another client holds it.
        other: Option<String>,
        /// take_lock fails this many more times with a non-retryable error.
        refuse_takes: u32,
        takes: u32,
        releases: u32,
        reopens: u32,
        ops: u32,
        /// Lock checks (each a round trip to the OSD in librbd).
        checks: u32,
        /// Run once at the next submit_on, before its session check.
        reopen_before_submit: Option<Hook>,
        /// What `cluster()` answers (None: no adoption).
        cluster: Option<String>,
        /// Run once in the next take_lock that acquires, after the lock is
        /// held and before the manager opens its gate.
        during_take: Option<Hook>,
    }

    struct FakeLock(Mutex<Lock>, Mutex<Option<HandoffFn>>);

    impl FakeLock {
        fn new() -> Arc<FakeLock> {
            Arc::new(FakeLock(
                Mutex::new(Lock {
                    generation: 1,
                    other: Some("10.0.0.2:0/1".into()),
                    ..Lock::default()
                }),
                Mutex::new(None),
            ))
        }
        fn with<T>(&self, f: impl FnOnce(&mut Lock) -> T) -> T {
            f(&mut self.0.lock().unwrap())
        }
        /// Another gateway fences this one and takes the lock.
        fn stolen(&self) {
            self.with(|l| {
                l.held = false;
                l.fenced = true;
                l.other = Some("10.0.0.2:0/2".into());
            });
        }
    }

    impl Backend for FakeLock {
        fn name(&self) -> String {
            "fake".into()
        }
        fn geometry(&self) -> Geometry {
            Geometry {
                size: 1 << 20,
                block_size: 512,
            }
        }
        fn caps(&self) -> Caps {
            Caps {
                discard: false,
                discard_zeroes: false,
                write_cache: false,
                lba_status: false,
            }
        }
        fn submit(&self, _op: Op, done: Done) {
            // As librbd does on a blocklisted session: ESHUTDOWN.
            let r = self.with(|l| {
                if l.fenced {
                    return Err(IoError::Fenced("fake: blocklisted".into()));
                }
                l.ops += 1;
                Ok(())
            });
            done.complete(r);
        }
    }

    impl LockSource for FakeLock {
        fn generation(&self) -> u64 {
            self.with(|l| l.generation)
        }
        fn is_fenced(&self) -> bool {
            self.with(|l| l.fenced)
        }
        fn lock_held(&self) -> Result<bool, LockError> {
            Ok(self.with(|l| {
                l.checks += 1;
                l.held
            }))
        }
        fn lock_view(&self) -> Result<LockView, LockError> {
            Ok(self.with(|l| {
                if l.held {
                    LockView::Mine
                } else {
                    l.other.clone().map_or(LockView::Free, LockView::Other)
                }
            }))
        }
        fn take_lock(&self, opts: &TakeOptions) -> Result<Taken, LockError> {
            self.with(|l| {
                if let Some(from) = &opts.only_from {
                    if l.other.as_ref() != Some(from) {
                        return Err(LockError::NotFrom {
                            image: "fake".into(),
                            from: from.clone(),
                            now: l.other.clone().unwrap_or_else(|| "free".into()),
                        });
                    }
                }
                l.takes += 1;
                if l.fenced {
                    return Err(LockError::Fenced {
                        image: "fake".into(),
                    });
                }
                if l.refuse_takes > 0 {
                    l.refuse_takes -= 1;
                    return Err(LockError::Fenced {
                        image: "fake (refused)".into(),
                    });
                }
                let already = l.held;
                let fenced = l.other.take().into_iter().collect();
                l.held = true;
                Ok(Taken {
                    fenced,
                    handed_over: Vec::new(),
                    already,
                    generation: l.generation,
                })
            })
            .inspect(|_| {
                if let Some(hook) = self.with(|l| l.during_take.take()) {
                    hook(self);
                }
            })
        }
        fn release_lock(&self) -> Result<(), LockError> {
            self.with(|l| {
                l.releases += 1;
                l.held = false;
            });
            Ok(())
        }
        fn set_handoff(&self, f: Option<HandoffFn>) {
            *self.1.lock().unwrap() = f;
        }
        fn cluster(&self) -> Option<String> {
            self.with(|l| l.cluster.clone())
        }
        fn fence_and_reopen(&self, generation: u64) {
            // The reopen on a fresh client, done at once.
            self.with(|l| {
                if l.generation != generation {
                    return;
                }
                l.fenced = false;
                l.generation += 1;
                l.reopens += 1;
            });
        }
        fn submit_on(&self, generation: u64, op: Op, done: Done) {
            // A reopen that lands between the gate and the submission.
            if let Some(hook) = self.with(|l| l.reopen_before_submit.take()) {
                hook(self);
            }
            if self.with(|l| l.generation) != generation {
                return done.complete(Err(IoError::Fenced("fake: another session".into())));
            }
            self.submit(op, done)
        }
    }

    fn alua() -> SharedAlua {
        let g = |id: u16| GroupConfig::new(id, AccessState::ActiveOptimized, vec![(id, id == 1)]);
        SharedAlua::new(AluaConfig {
            groups: vec![g(1), g(2)],
            local: LocalPort {
                group: 1,
                rel_port: 1,
            },
        })
    }

    /// A manager over the fake lock, polling fast, with the given I/O
    /// hold-off and acquire timeout.
    fn start(
        lock: &Arc<FakeLock>,
        a: &SharedAlua,
        holdoff: Duration,
        acquire_timeout: Duration,
    ) -> Failover {
        let opts = FailoverOptions {
            poll: Duration::from_millis(10),
            blocklist_expire_secs: 60,
            io_holdoff: holdoff,
            acquire_timeout,
            idle_check: Duration::from_millis(50),
            ..FailoverOptions::default()
        };
        Failover::start("t", lock.clone(), a, opts).unwrap()
    }

    fn wait(f: &Failover, what: &str, ok: impl Fn(&FailoverStatus) -> bool) -> FailoverStatus {
        let t0 = Instant::now();
        loop {
            let s = f.status();
            if ok(&s) {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "never {what}: {s}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `op` on `b` and waits for its result.
    fn run(b: &dyn Backend, op: Op) -> IoResult {
        let q = CompletionQueue::new().unwrap();
        b.submit(op, q.done(1));
        q.recv_timeout(Duration::from_secs(5)).unwrap().result
    }

    fn write_through(b: &dyn Backend) -> IoResult {
        run(b, Op::Flush)
    }

    fn stpg(a: &SharedAlua, group: u16, state: AccessState) {
        a.set_target_port_groups(&[StpgRequest { group, state }])
            .unwrap();
    }

    #[test]
    fn starts_standby_and_the_gate_is_closed() {
        let lock = FakeLock::new();
        let a = alua();
        let f = Failover::start("t", lock.clone(), &a, FailoverOptions::default()).unwrap();
        let s = f.status();
        assert_eq!((s.state, s.serving), (AccessState::Standby, false));
        assert!(matches!(
            write_through(&*f.backend()),
            Err(IoError::Fenced(_))
        ));
        assert_eq!(lock.with(|l| l.ops), 0, "nothing reached the image");
    }

    #[test]
    fn stpg_takes_the_lock_then_serves_and_marks_others_standby() {
        let lock = FakeLock::new();
        let a = alua();
        let f = start(&lock, &a, Duration::ZERO, Duration::from_secs(1));
        stpg(&a, 1, AccessState::ActiveOptimized);
        let s = wait(&f, "active", |s| s.serving);
        assert_eq!(s.state, AccessState::ActiveOptimized);
        assert_eq!((s.takeovers, s.lock.as_str()), (1, "mine"));
        let g = a.groups();
        assert_eq!(
            g[1].state,
            AccessState::Standby,
            "the other gateway's group"
        );
        assert_eq!(write_through(&*f.backend()), Ok(()));
        assert_eq!(lock.with(|l| l.ops), 1);
        // A second STPG while serving takes nothing more.
        stpg(&a, 1, AccessState::ActiveOptimized);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(lock.with(|l| l.takes), 1);
    }

    /// An I/O that saw ESHUTDOWN makes the backend reopen on its own; the
    /// manager, noticing the loss afterwards, must not fence and reopen
    /// that fresh session again (it did: two reopens per loss, and a
    /// drill waiting for generation 2 saw 3).
    #[test]
    fn a_loss_seen_after_the_backend_reopened_keeps_the_fresh_session() {
        let lock = FakeLock::new();
        let a = alua();
        let f = start(&lock, &a, Duration::from_secs(60), Duration::from_secs(1));
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "active", |s| s.serving);
        // Blocklisted; the ring path's reopen finishes before the manager looks.
        lock.with(|l| {
            l.held = false;
            l.generation = 2;
        });
        let s = wait(&f, "lost", |s| s.losses == 1);
        assert_eq!(s.generation, 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            lock.with(|l| (l.generation, l.reopens)),
            (2, 0),
            "the fresh session was fenced and reopened again"
        );
    }

    /// Without ALUA groups the device is still gated: the first I/O takes
    /// the lock and waits for it (such a host has no ALUA handler to
    /// retry a transition sense); nothing reaches the image before the
    /// lock is held.
    #[test]
    fn without_alua_groups_the_first_io_takes_the_lock() {
        let lock = FakeLock::new();
        let a = SharedAlua::off();
        let f = start(&lock, &a, Duration::from_secs(60), Duration::from_secs(1));
        assert_eq!(write_through(&*f.backend()), Ok(()));
        assert_eq!(lock.with(|l| (l.takes, l.ops)), (1, 1));
        assert!(f.status().serving);
        assert_eq!(write_through(&*f.backend()), Ok(()));
        assert_eq!(lock.with(|l| (l.takes, l.ops)), (1, 2));
        // Lost: refused, and within the hold-off I/O does not take it back.
        lock.stolen();
        wait(&f, "lost", |s| !s.serving && s.losses == 1);
        assert!(matches!(
            write_through(&*f.backend()),
            Err(IoError::Fenced(_))
        ));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(lock.with(|l| l.takes), 1, "stale I/O took the lock back");
    }

    /// Implicit-only groups (ceph-iscsi's): a gateway without the lock
    /// reports Active/Non-optimized, not Standby (a host never sends I/O
    /// to a Standby path it cannot activate), and the owner reports the
    /// others Active/Non-optimized too.
    #[test]
    fn implicit_only_groups_report_non_optimized_not_standby() {
        let lock = FakeLock::new();
        let g = |id: u16| GroupConfig {
            mode: crate::scsi::alua::AluaMode {
                implicit: true,
                explicit: false,
            },
            ..GroupConfig::new(id, AccessState::ActiveOptimized, vec![(id, id == 1)])
        };
        let a = SharedAlua::new(AluaConfig {
            groups: vec![g(1), g(2)],
            local: LocalPort {
                group: 1,
                rel_port: 1,
            },
        });
        let f = start(&lock, &a, Duration::ZERO, Duration::from_secs(1));
        assert_eq!(f.status().state, AccessState::ActiveNonOptimized);
        // I/O at the non-optimized port (the SCSI layer's implicit check).
        a.request_active();
        wait(&f, "active", |s| s.serving);
        let states: Vec<_> = a.groups().iter().map(|g| g.state).collect();
        assert_eq!(
            states,
            vec![
                AccessState::ActiveOptimized,
                AccessState::ActiveNonOptimized
            ]
        );
        lock.stolen();
        let s = wait(&f, "lost", |s| !s.serving);
        assert_eq!(s.state, AccessState::ActiveNonOptimized);
        // Not the owner: reads are served, writes refused.
        let ops = lock.with(|l| l.ops);
        let b = f.backend();
        let read = Op::Read {
            offset: 0,
            bufs: tcmu_handler::IoBufs::from_vec(vec![0; 512]),
        };
        assert_eq!(run(&*b, read), Ok(()));
        assert_eq!(lock.with(|l| l.ops), ops + 1, "the read reached the image");
        let write = Op::Write {
            offset: 0,
            bufs: tcmu_handler::IoBufs::from_vec(vec![0; 512]),
            fua: false,
        };
        assert!(matches!(run(&*b, write), Err(IoError::Fenced(_))));
        assert_eq!(lock.with(|l| l.ops), ops + 1, "the write reached the image");
    }

    /// The gate and the session check are one step: a reopen on a fresh
    /// client that lands after the gate admitted an op (and before the
    /// manager's next check) must not send the op to the new session,
    /// which never took the lock.
    #[test]
    fn an_op_admitted_before_a_reopen_never_runs_on_the_new_session() {
        let lock = FakeLock::new();
        let a = alua();
        // A slow poll: the manager does not see the reopen in time.
        let opts = FailoverOptions {
            poll: Duration::from_secs(60),
            ..FailoverOptions::default()
        };
        let f = Failover::start("t", lock.clone(), &a, opts).unwrap();
        f.request_active();
        wait(&f, "active", |s| s.serving);
        assert_eq!(write_through(&*f.backend()), Ok(()));
        lock.with(|l| {
            l.reopen_before_submit = Some(Box::new(|fake: &FakeLock| {
                fake.with(|l| {
                    l.generation += 1;
                    l.held = false;
                })
            }))
        });
        assert!(matches!(
            write_through(&*f.backend()),
            Err(IoError::Fenced(_))
        ));
        assert_eq!(
            lock.with(|l| l.ops),
            1,
            "the op admitted on generation 1 reached generation 2"
        );
    }

    #[test]
    fn a_stolen_lock_closes_the_gate_reopens_and_holds_off_io() {
        let lock = FakeLock::new();
        let a = alua();
        let f = start(&lock, &a, Duration::from_secs(60), Duration::from_secs(1));
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "active", |s| s.serving);
        lock.stolen();
        // Refused at once (by the fenced session, then by the gate).
        assert!(matches!(
            write_through(&*f.backend()),
            Err(IoError::Fenced(_))
        ));
        let s = wait(&f, "lost", |s| s.losses == 1);
        assert!(matches!(
            write_through(&*f.backend()),
            Err(IoError::Fenced(_))
        ));
        assert_eq!((s.state, s.serving), (AccessState::Standby, false));
        assert_eq!(
            lock.with(|l| (l.reopens, l.ops)),
            (1, 0),
            "reopened; the reopened session got no op"
        );
        // I/O the host had queued on this path does not steal it back
        // during the hold-off (the port stays Standby)...
        a.request_active();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(f.status().state, AccessState::Standby);
        assert_eq!(lock.with(|l| l.takes), 1);
        // ...but an explicit STPG does, on the reopened session.
        stpg(&a, 1, AccessState::ActiveOptimized);
        let s = wait(&f, "active again", |s| s.serving);
        assert_eq!((s.takeovers, s.generation), (2, 2));
        assert_eq!(write_through(&*f.backend()), Ok(()));
    }

    #[test]
    fn asked_by_another_gateway_it_releases_without_a_fence_and_holds_off_io() {
        let lock = FakeLock::new();
        let a = alua();
        let f = start(&lock, &a, Duration::from_secs(60), Duration::from_secs(1));
        let ask = || (lock.1.lock().unwrap().clone().expect("handoff installed"))();
        assert!(!ask(), "a gateway that does not serve declines");
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "active", |s| s.serving);
        assert!(ask(), "the owner agrees");
        let s = wait(&f, "handed over", |s| s.handovers == 1 && !s.serving);
        // (handovers counts after the release returned.)
        assert_eq!(s.state, AccessState::Standby);
        assert_eq!(
            lock.with(|l| (l.releases, l.held, l.reopens)),
            (1, false, 0),
            "released, not fenced: no reopen"
        );
        assert_eq!(s.losses, 0, "a handover is not a loss");
        assert!(matches!(
            write_through(&*f.backend()),
            Err(IoError::Fenced(_))
        ));
        // Commands the host queued here do not take it straight back...
        a.request_active();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(f.status().state, AccessState::Standby);
        assert_eq!(lock.with(|l| l.takes), 1);
        // ...an STPG does.
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "active again", |s| s.serving);
        drop(f);
        assert!(!ask(), "a stopped manager declines");
    }

    #[test]
    fn asked_while_it_takes_the_lock_it_agrees_and_hands_over_after() {
        // Another gateway sees this one as the owner the moment librbd
        // acquired the lock, before the manager opened its gate. Declining
        // then would get a live gateway fenced.
        let lock = FakeLock::new();
        let a = alua();
        let f = start(&lock, &a, Duration::from_secs(60), Duration::from_secs(1));
        let answer = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&answer);
        lock.with(|l| {
            l.during_take = Some(Box::new(move |fake: &FakeLock| {
                let ask = fake.1.lock().unwrap().clone().expect("handoff installed");
                *seen.lock().unwrap() = Some(ask());
            }))
        });
        stpg(&a, 1, AccessState::ActiveOptimized);
        let s = wait(&f, "handed over", |s| s.handovers == 1);
        assert_eq!(
            *answer.lock().unwrap(),
            Some(true),
            "asked mid-takeover, it must agree"
        );
        assert!(!s.serving, "{s}");
        assert_eq!(s.state, AccessState::Standby);
        assert_eq!(
            lock.with(|l| (l.takes, l.releases, l.held, l.reopens)),
            (1, 1, false, 0),
            "took, then released: no fence, no reopen"
        );
        assert_eq!((s.takeovers, s.losses), (1, 0), "{s}");
    }

    #[test]
    fn a_fence_makes_the_other_devices_adopt_what_the_fenced_gateway_held() {
        // A cluster name of this test's own: managers of other tests
        // (same process) must not adopt anything here.
        let cluster = format!("adopt-test-{}", std::process::id());
        let mk = |other: Option<&str>| {
            let l = FakeLock::new();
            l.with(|x| {
                x.other = other.map(str::to_string);
                x.cluster = Some(cluster.clone());
            });
            l
        };
        let dead = "10.0.0.7:0/1";
        let (l1, l2, l3, l4) = (
            mk(Some(dead)),
            mk(Some(dead)),
            mk(Some("10.0.0.8:0/2")),
            mk(None),
        );
        let (a1, a2, a3, a4) = (alua(), alua(), alua(), alua());
        let sec = Duration::from_secs(1);
        let f1 = start(&l1, &a1, Duration::ZERO, sec);
        let f2 = start(&l2, &a2, Duration::ZERO, sec);
        let f3 = start(&l3, &a3, Duration::ZERO, sec);
        let f4 = start(&l4, &a4, Duration::ZERO, sec);
        stpg(&a1, 1, AccessState::ActiveOptimized);
        wait(&f1, "active", |s| s.serving);
        // f1 fenced the dead gateway, which held f2's image too: f2 takes
        // it without any host asking.
        let s2 = wait(&f2, "adopted", |s| s.serving);
        assert_eq!((s2.takeovers, s2.state), (1, AccessState::ActiveOptimized));
        // Another live gateway's image, and a free lock, are left alone.
        std::thread::sleep(Duration::from_millis(200));
        for (f, l, what) in [(&f3, &l3, "another owner's"), (&f4, &l4, "a free")] {
            let s = f.status();
            assert!(!s.serving, "{what} lock was taken: {s}");
            assert_eq!(s.state, AccessState::Standby, "{what}: {s}");
            assert_eq!(l.with(|l| l.takes), 0, "{what}");
        }
    }

    #[test]
    fn io_at_a_standby_port_takes_the_lock_without_holdoff() {
        let lock = FakeLock::new();
        let a = alua();
        let f = start(&lock, &a, Duration::ZERO, Duration::from_secs(1));
        a.request_active();
        assert_ne!(
            a.local_state(),
            AccessState::Standby,
            "transitioning at once"
        );
        wait(&f, "active", |s| s.serving);
    }

    #[test]
    fn a_failed_takeover_goes_back_to_standby() {
        let lock = FakeLock::new();
        lock.with(|l| l.refuse_takes = 1000);
        let a = alua();
        let f = start(&lock, &a, Duration::ZERO, Duration::from_millis(200));
        stpg(&a, 1, AccessState::ActiveOptimized);
        assert_eq!(a.local_state(), AccessState::Transitioning);
        let t0 = Instant::now();
        while a.local_state() == AccessState::Transitioning {
            assert!(t0.elapsed() < Duration::from_secs(5), "still transitioning");
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = f.status();
        assert_eq!(
            (s.state, s.serving, s.takeovers),
            (AccessState::Standby, false, 0)
        );
        assert!(matches!(
            write_through(&*f.backend()),
            Err(IoError::Fenced(_))
        ));
    }

    #[test]
    fn stpg_to_standby_and_drop_release_the_lock() {
        let lock = FakeLock::new();
        let a = alua();
        let f = start(&lock, &a, Duration::ZERO, Duration::from_secs(1));
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "active", |s| s.serving);
        stpg(&a, 1, AccessState::Standby);
        wait(&f, "released", |s| {
            !s.serving && s.state == AccessState::Standby
        });
        // The port is Standby as the release starts; the release follows.
        let t0 = Instant::now();
        while lock.with(|l| l.releases) == 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(lock.with(|l| (l.releases, l.held)), (1, false));
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "active", |s| s.serving);
        drop(f);
        assert_eq!(
            lock.with(|l| (l.releases, l.held)),
            (2, false),
            "a clean stop hands the lock over"
        );
    }

    #[test]
    fn an_idle_owner_asks_librbd_rarely_and_a_busy_one_not_at_all() {
        let lock = FakeLock::new();
        let a = alua();
        let opts = FailoverOptions {
            poll: Duration::from_millis(10),
            idle_check: Duration::from_secs(1),
            ..FailoverOptions::default()
        };
        let f = Failover::start("t", lock.clone(), &a, opts).unwrap();
        f.request_active();
        wait(&f, "active", |s| s.serving);
        std::thread::sleep(Duration::from_millis(300));
        let before = lock.with(|l| l.checks);
        std::thread::sleep(Duration::from_millis(1500));
        let idle = lock.with(|l| l.checks) - before;
        assert!(idle <= 3, "{idle} checks in 1.5 s with no I/O");
        let b = f.backend();
        let t0 = Instant::now();
        let before = lock.with(|l| l.checks);
        while t0.elapsed() < Duration::from_millis(500) {
            assert_eq!(write_through(&*b), Ok(()));
            std::thread::sleep(Duration::from_millis(2));
        }
        let busy = lock.with(|l| l.checks) - before;
        // While busy, no round trips (the fence would show in the I/O);
        // at most the one of the check that found it idle.
        assert!(busy <= 1, "{busy} lock round trips in 0.5 s of I/O");
        // A lock gone while idle, with no sign in this process (librbd
        // alone knows), is still noticed: the idle check asks librbd.
        std::thread::sleep(Duration::from_millis(1200));
        lock.with(|l| {
            l.held = false;
            l.other = Some("10.0.0.2:0/2".into());
        });
        wait(&f, "the loss", |s| !s.serving && s.losses == 1);
    }

    #[test]
    fn stpg_at_an_owner_fenced_unawares_asks_librbd_at_once() {
        let lock = FakeLock::new();
        let a = alua();
        // Idle checks an hour apart: only the STPG can bring the check.
        let opts = FailoverOptions {
            idle_check: Duration::from_secs(3600),
            ..FailoverOptions::default()
        };
        let f = Failover::start("t", lock.clone(), &a, opts).unwrap();
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "active", |s| s.serving);
        // Another gateway took the lock while this one was stopped; it
        // has had no I/O since, so nothing here shows it.
        lock.with(|l| {
            l.held = false;
            l.other = Some("10.0.0.2:0/2".into());
        });
        let before = lock.with(|l| l.checks);
        stpg(&a, 1, AccessState::ActiveOptimized);
        wait(&f, "the loss after the STPG", |s| {
            !s.serving && s.losses == 1
        });
        assert!(lock.with(|l| l.checks) > before, "librbd was not asked");
    }
}
