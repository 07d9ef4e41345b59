//! The threads behind every device's failover manager, shared by the
//! whole daemon: a bounded pool that runs each device's jobs one at a
//! time, and one timer thread that posts the periodic ones.
//!
//! A thread per device would cost hundreds of threads and wake-ups on a
//! gateway with hundreds of LUNs, most of them idle. Here the cost is:
//!
//! - one timer thread, asleep until the earliest thing due on any device
//!   (due times within [`SLACK`] of each other share one wake-up);
//! - pool workers only while there is work: they start on demand, up to
//!   [`MAX_WORKERS`], and leave after [`WORKER_IDLE`] without a job (one
//!   stays). A whole-gateway failover starts as many takeovers at once as
//!   the cap allows, since each mostly waits on the cluster.
//!
//! Jobs may block (a lock round trip to an OSD that is down waits for
//! `osd_op_timeout`; a configfs read of a directory being removed waits for
//! the daemon's own answer): a job that waits more than [`STALL`] gets a
//! fresh worker started beside it, so one stuck image never delays the
//! others for long.

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tracing::{error, warn};

/// Most pool workers at once: the most takeovers that run in parallel.
pub const MAX_WORKERS: usize = 64;
/// A worker with nothing to do for this long leaves (one always stays).
pub const WORKER_IDLE: Duration = Duration::from_secs(30);
/// Queued jobs nobody picked up for this long get a new worker.
pub const STALL: Duration = Duration::from_millis(250);
/// Due times this close together are served by one timer wake-up.
pub const SLACK: Duration = Duration::from_millis(50);
/// Due times a second or more away are rounded up to this grid, so that
/// hundreds of idle devices share a few wake-ups a second instead of
/// each waking the timer on its own.
pub const GRID: Duration = Duration::from_millis(250);

/// A device with a queue of jobs, run one at a time on the pool.
pub trait Serial: Send + Sync + 'static {
    /// Runs the queued jobs until [`Mailbox::next`] says none is left.
    fn run_queued(&self);
}

/// Something the timer thread looks at.
pub trait Timed: Send + Sync + 'static {
    /// Posts what is due at `now` (never blocks) and says when it next
    /// wants a look.
    fn tick(&self, now: Instant) -> Instant;
}

/// One device's job queue: posting never blocks, and at most one pool
/// worker drains it at a time, so a device's jobs never overlap.
pub struct Mailbox<J> {
    inner: Mutex<Queue<J>>,
}

struct Queue<J> {
    jobs: VecDeque<J>,
    /// A worker owns the queue (is draining it or about to).
    scheduled: bool,
}

impl<J: PartialEq> Mailbox<J> {
    /// An empty mailbox.
    pub fn new() -> Self {
        Mailbox {
            inner: Mutex::new(Queue {
                jobs: VecDeque::new(),
                scheduled: false,
            }),
        }
    }

    /// Queues `job` (skipped when `once` and an equal job is already
    /// queued). Returns whether the caller must hand the device to the
    /// pool (nobody owns the queue).
    pub fn post(&self, job: J, once: bool) -> bool {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if once && q.jobs.contains(&job) {
            return false;
        }
        q.jobs.push_back(job);
        !std::mem::replace(&mut q.scheduled, true)
    }

    /// The next job, for the worker that owns the queue; None gives up
    /// ownership (the next post schedules again).
    pub fn next(&self) -> Option<J> {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let j = q.jobs.pop_front();
        if j.is_none() {
            q.scheduled = false;
        }
        j
    }
}

impl<J: PartialEq> Default for Mailbox<J> {
    fn default() -> Self {
        Self::new()
    }
}

/// The pool and the timer thread.
pub struct Supervisor {
    tx: Sender<Arc<dyn Serial>>,
    rx: Receiver<Arc<dyn Serial>>,
    workers: AtomicUsize,
    idle: AtomicUsize,
    /// When a worker last took a job (ms since `epoch`).
    last_pick: AtomicU64,
    epoch: Instant,
    /// Devices put under the timer since it last looked.
    timed: Mutex<Vec<Weak<dyn Timed>>>,
    /// Set by [`nudge`](Self::nudge): look at every device now.
    nudged: Mutex<bool>,
    /// A job was queued with no worker free: the timer thread must look
    /// at the queue (the [`STALL`] rule) instead of sleeping until its
    /// next device is due, which can be a minute away.
    stall_check: AtomicBool,
    wake: Condvar,
    timer: OnceLock<()>,
}

impl Supervisor {
    /// The daemon's one supervisor.
    pub fn global() -> Arc<Supervisor> {
        static GLOBAL: OnceLock<Arc<Supervisor>> = OnceLock::new();
        GLOBAL.get_or_init(Supervisor::new).clone()
    }

    /// A supervisor of its own (tests); its threads live as long as it is
    /// referenced.
    pub fn new() -> Arc<Supervisor> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Arc::new(Supervisor {
            tx,
            rx,
            workers: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            last_pick: AtomicU64::new(0),
            epoch: Instant::now(),
            timed: Mutex::new(Vec::new()),
            nudged: Mutex::new(false),
            stall_check: AtomicBool::new(false),
            wake: Condvar::new(),
            timer: OnceLock::new(),
        })
    }

    /// Hands `dev` to the pool (after [`Mailbox::post`] said so). `urgent`
    /// work (a takeover) gets its own worker at once when none is free;
    /// other work waits up to [`STALL`] for one.
    pub fn schedule(self: &Arc<Self>, dev: Arc<dyn Serial>, urgent: bool) {
        if self.tx.send(dev).is_err() {
            return; // cannot happen: self holds the receiver
        }
        let free = self.idle.load(Ordering::SeqCst);
        if self.workers.load(Ordering::SeqCst) == 0 || (urgent && self.rx.len() > free) {
            self.spawn_worker();
        } else if !urgent {
            self.ensure_timer();
            if free == 0 {
                // Flag first, then notify under the timer's lock: the
                // timer either sees the flag before it sleeps or is
                // asleep when the notification comes.
                self.stall_check.store(true, Ordering::SeqCst);
                let _g = self.nudged.lock().unwrap_or_else(|e| e.into_inner());
                self.wake.notify_one();
            }
        }
    }

    /// Pool workers now (tests, metrics).
    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::SeqCst)
    }

    /// Puts `t` under the timer thread until it is dropped.
    pub fn watch(self: &Arc<Self>, t: Weak<dyn Timed>) {
        self.timed.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        self.ensure_timer();
        self.nudge();
    }

    /// Makes the timer thread look at every device now (a device whose
    /// schedule changed: it started serving, its I/O resumed).
    pub fn nudge(&self) {
        *self.nudged.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_one();
    }

    fn ensure_timer(self: &Arc<Self>) {
        self.timer.get_or_init(|| {
            let weak = Arc::downgrade(self);
            if let Err(e) = std::thread::Builder::new()
                .name("tcmu-failover".into())
                .spawn(move || timer(weak))
            {
                error!("cannot start the failover timer thread: {e}");
            }
        });
    }

    fn spawn_worker(self: &Arc<Self>) {
        // Reserve a slot first so that racing callers never pass the cap.
        let n = self.workers.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_WORKERS {
            self.workers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        self.ensure_timer();
        let me = Arc::clone(self);
        if let Err(e) = std::thread::Builder::new()
            .name("tcmu-failover-w".into())
            .spawn(move || me.work())
        {
            self.workers.fetch_sub(1, Ordering::SeqCst);
            error!("cannot start a failover worker: {e}");
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn work(self: Arc<Self>) {
        self.idle.fetch_add(1, Ordering::SeqCst);
        loop {
            match self.rx.recv_timeout(WORKER_IDLE) {
                Ok(dev) => {
                    self.idle.fetch_sub(1, Ordering::SeqCst);
                    self.last_pick.store(self.now_ms(), Ordering::SeqCst);
                    dev.run_queued();
                    self.idle.fetch_add(1, Ordering::SeqCst);
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    // Leave, unless this is the last one. Uncount first,
                    // then look once more: a job sent meanwhile either
                    // saw this worker gone (and started one) or is found.
                    if self.workers.load(Ordering::SeqCst) <= 1 {
                        continue;
                    }
                    self.idle.fetch_sub(1, Ordering::SeqCst);
                    self.workers.fetch_sub(1, Ordering::SeqCst);
                    match self.rx.try_recv() {
                        Ok(dev) => {
                            self.workers.fetch_add(1, Ordering::SeqCst);
                            self.last_pick.store(self.now_ms(), Ordering::SeqCst);
                            dev.run_queued();
                            self.idle.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => return,
                    }
                }
            }
        }
        self.idle.fetch_sub(1, Ordering::SeqCst);
        self.workers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Starts a worker when jobs wait and none was picked up for
    /// [`STALL`] (every worker is stuck in a slow call).
    fn unstall(self: &Arc<Self>) -> bool {
        let waiting = !self.rx.is_empty();
        if waiting
            && self.idle.load(Ordering::SeqCst) == 0
            && self
                .now_ms()
                .saturating_sub(self.last_pick.load(Ordering::SeqCst))
                >= STALL.as_millis() as u64
        {
            warn!(
                workers = self.workers(),
                "failover jobs waiting behind slow ones: starting another worker"
            );
            self.last_pick.store(self.now_ms(), Ordering::SeqCst);
            self.spawn_worker();
        }
        waiting
    }
}

/// Rounds `at` up to [`GRID`] (counted from `origin`) when it is a second
/// or more after `now`.
fn on_grid(origin: Instant, now: Instant, at: Instant) -> Instant {
    if at < now + Duration::from_secs(1) {
        return at;
    }
    let grid = GRID.as_nanos();
    let since = at.saturating_duration_since(origin).as_nanos();
    let up = since.div_ceil(grid) * grid;
    origin + Duration::from_nanos(u64::try_from(up).unwrap_or(u64::MAX))
}

/// The timer thread: ticks every watched device that is due (or all of
/// them after a nudge), then sleeps until the earliest next due time.
fn timer(sup: Weak<Supervisor>) {
    let mut due: Vec<(Weak<dyn Timed>, Instant)> = Vec::new();
    let origin = Instant::now();
    loop {
        let Some(s) = sup.upgrade() else { return };
        let nudged = std::mem::take(&mut *s.nudged.lock().unwrap_or_else(|e| e.into_inner()));
        // New devices are due at once.
        let new = std::mem::take(&mut *s.timed.lock().unwrap_or_else(|e| e.into_inner()));
        let now = Instant::now();
        due.extend(new.into_iter().map(|w| (w, now)));
        due.retain(|(w, _)| w.strong_count() > 0);
        let mut earliest = now + Duration::from_secs(60);
        for (w, at) in due.iter_mut() {
            if nudged || *at <= now + SLACK {
                if let Some(t) = w.upgrade() {
                    *at = on_grid(origin, now, t.tick(now));
                }
            }
            earliest = earliest.min(*at);
        }
        s.stall_check.store(false, Ordering::SeqCst);
        if s.unstall() {
            earliest = earliest.min(now + STALL);
        }
        let g = s.nudged.lock().unwrap_or_else(|e| e.into_inner());
        if *g || s.stall_check.load(Ordering::SeqCst) {
            continue;
        }
        let wait = earliest.saturating_duration_since(Instant::now());
        let (g, _) = s
            .wake
            .wait_timeout(g, wait)
            .unwrap_or_else(|e| e.into_inner());
        drop(g);
        drop(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[derive(PartialEq, Debug)]
    enum Job {
        Sleep(u64),
        Note(u32),
    }

    #[derive(Default)]
    struct Dev {
        mail: Mailbox<Job>,
        done: Mutex<Vec<u32>>,
        running: AtomicBool,
        overlapped: AtomicBool,
    }

    impl Serial for Dev {
        fn run_queued(&self) {
            while let Some(j) = self.mail.next() {
                if self.running.swap(true, Ordering::SeqCst) {
                    self.overlapped.store(true, Ordering::SeqCst);
                }
                match j {
                    Job::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
                    Job::Note(n) => self.done.lock().unwrap().push(n),
                }
                self.running.store(false, Ordering::SeqCst);
            }
        }
    }

    fn post(s: &Arc<Supervisor>, d: &Arc<Dev>, j: Job, urgent: bool) {
        if d.mail.post(j, false) {
            s.schedule(d.clone(), urgent);
        }
    }

    fn wait(what: &str, ok: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !ok() {
            assert!(t0.elapsed() < Duration::from_secs(5), "never {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_device_s_jobs_run_in_order_and_never_overlap() {
        let s = Supervisor::new();
        let d = Arc::new(Dev::default());
        for n in 0..200 {
            post(&s, &d, Job::Note(n), n % 2 == 0);
        }
        wait("all jobs done", || d.done.lock().unwrap().len() == 200);
        assert_eq!(*d.done.lock().unwrap(), (0..200).collect::<Vec<_>>());
        assert!(!d.overlapped.load(Ordering::SeqCst));
    }

    #[test]
    fn once_skips_a_job_already_queued() {
        let m: Mailbox<Job> = Mailbox::new();
        assert!(m.post(Job::Note(1), true), "first post schedules");
        assert!(!m.post(Job::Note(1), true), "same job queued: skipped");
        assert!(
            !m.post(Job::Note(2), true),
            "queue owned: no second schedule"
        );
        assert_eq!(m.next(), Some(Job::Note(1)));
        assert_eq!(m.next(), Some(Job::Note(2)));
        assert_eq!(m.next(), None);
        assert!(
            m.post(Job::Note(1), true),
            "after giving it up, schedules again"
        );
    }

    #[test]
    fn a_stuck_device_does_not_hold_up_the_others() {
        let s = Supervisor::new();
        let stuck = Arc::new(Dev::default());
        let other = Arc::new(Dev::default());
        post(&s, &stuck, Job::Sleep(3000), false);
        wait("the slow job started", || {
            stuck.running.load(Ordering::SeqCst)
        });
        let t0 = Instant::now();
        post(&s, &other, Job::Note(7), false);
        wait("the other device's job", || {
            other.done.lock().unwrap().len() == 1
        });
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "waited {:?} behind a stuck job",
            t0.elapsed()
        );
    }

    #[test]
    fn urgent_jobs_of_many_devices_run_in_parallel_up_to_the_cap() {
        let s = Supervisor::new();
        let devs: Vec<_> = (0..16).map(|_| Arc::new(Dev::default())).collect();
        let t0 = Instant::now();
        for d in &devs {
            post(&s, d, Job::Sleep(500), true);
            post(&s, d, Job::Note(1), true);
        }
        wait("every takeover", || {
            devs.iter().all(|d| d.done.lock().unwrap().len() == 1)
        });
        // Serially this is 8 s; in parallel about one sleep.
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t0.elapsed()
        );
        assert!(s.workers() <= MAX_WORKERS);
        assert!(s.workers() >= 2, "ran on {} worker(s)", s.workers());
    }

    #[test]
    fn far_due_times_share_grid_points_and_near_ones_stay_exact() {
        let origin = Instant::now();
        let now = origin + Duration::from_millis(1234);
        let near = now + Duration::from_millis(100);
        assert_eq!(on_grid(origin, now, near), near);
        let far = now + Duration::from_millis(5010);
        let g = on_grid(origin, now, far);
        assert!(g >= far && g < far + GRID, "{:?}", g - far);
        assert_eq!(g.duration_since(origin).as_nanos() % GRID.as_nanos(), 0);
        // Two devices due 100 ms apart, 5 s from now, share a grid point.
        assert_eq!(
            on_grid(origin, now, now + Duration::from_millis(5020)),
            on_grid(origin, now, now + Duration::from_millis(5120))
        );
    }

    struct Ticker {
        ticks: AtomicU64,
        every: Duration,
    }

    impl Timed for Ticker {
        fn tick(&self, now: Instant) -> Instant {
            self.ticks.fetch_add(1, Ordering::SeqCst);
            now + self.every
        }
    }

    #[test]
    fn the_timer_ticks_each_device_when_due_and_forgets_dropped_ones() {
        let s = Supervisor::new();
        let fast = Arc::new(Ticker {
            ticks: AtomicU64::new(0),
            every: Duration::from_millis(100),
        });
        let slow = Arc::new(Ticker {
            ticks: AtomicU64::new(0),
            every: Duration::from_secs(30),
        });
        s.watch(Arc::downgrade(&fast) as Weak<dyn Timed>);
        s.watch(Arc::downgrade(&slow) as Weak<dyn Timed>);
        std::thread::sleep(Duration::from_millis(1050));
        let f = fast.ticks.load(Ordering::SeqCst);
        assert!((6..=13).contains(&f), "fast device ticked {f} times in 1 s");
        // Once at start (and possibly once more for a nudge), then never.
        assert!(slow.ticks.load(Ordering::SeqCst) <= 3);
        // The timer holds devices weakly: a dropped one is not kept alive.
        let weak = Arc::downgrade(&fast);
        drop(fast);
        s.nudge();
        std::thread::sleep(Duration::from_millis(100));
        assert!(weak.upgrade().is_none());
    }
}
