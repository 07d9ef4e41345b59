//! One TCMU device: its ring, its LUN state and its backend, driven by one
//! worker thread.
//!
//! The worker loop: take what the kernel queued, answer emulated commands
//! at once and submit data commands to the backend, collect finished
//! backend operations, write their completions, publish `cmd_tail` and ring
//! the doorbell once per batch. It sleeps in epoll_wait() on the doorbell
//! fd, the completion queue's eventfd and a stop eventfd.

use crate::ring::shm::SharedMem;
use crate::ring::{Completion, Entry, Ring, RingError};
use crate::scsi::{sense::Sense, Lun, LunInfo, Outcome, Pending, Response};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::{Backend, CompletionQueue};
use tracing::{debug, error, info, warn};

/// Why a device stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The ring was refused.
    #[error("device {dev}: {source}")]
    Ring {
        /// Device name.
        dev: String,
        /// The ring error.
        source: RingError,
    },
    /// A system call on the device failed.
    #[error("device {dev}: {what}: {source}")]
    Io {
        /// Device name.
        dev: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// How the kernel and the worker poke each other.
pub trait Doorbell: Send {
    /// Readable when the kernel queued something.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Consumes the pending event; call after `fd` polled readable.
    fn ack(&self);
    /// Tells the kernel that completions are in the ring.
    fn ring(&self) -> std::io::Result<()>;
}

/// The UIO device's doorbell: a 4-byte read waits for (here: consumes)
/// an event, a 4-byte write makes the kernel reap completions.
pub struct UioDoorbell {
    file: File,
}

impl UioDoorbell {
    /// Wraps an open `/dev/uioN` (opened read-write, non-blocking).
    pub fn new(file: File) -> Self {
        UioDoorbell { file }
    }
}

impl Doorbell for UioDoorbell {
    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
    fn ack(&self) {
        let mut b = [0u8; 4];
        let _ = (&self.file).read(&mut b);
    }
    fn ring(&self) -> std::io::Result<()> {
        (&self.file).write_all(&1u32.to_ne_bytes())
    }
}

/// The emulator's doorbell: two eventfds.
pub struct EventDoorbell {
    to_user: OwnedFd,
    from_user: OwnedFd,
}

impl EventDoorbell {
    /// Wraps the emulator's pair (see [`crate::emulator::UserEnd`]).
    pub fn new(to_user: OwnedFd, from_user: OwnedFd) -> Self {
        EventDoorbell { to_user, from_user }
    }
}

impl Doorbell for EventDoorbell {
    fn fd(&self) -> BorrowedFd<'_> {
        self.to_user.as_fd()
    }
    fn ack(&self) {
        let mut b = [0u8; 8];
        let _ = nix::unistd::read(self.to_user.as_raw_fd(), &mut b);
    }
    fn ring(&self) -> std::io::Result<()> {
        nix::unistd::write(&self.from_user, &1u64.to_ne_bytes())
            .map(|_| ())
            .map_err(std::io::Error::from)
    }
}

/// Counters a device keeps, readable from other threads.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands taken from the ring.
    pub commands: AtomicU64,
    /// Commands completed.
    pub completed: AtomicU64,
    /// Commands completed with CHECK CONDITION.
    pub check_conditions: AtomicU64,
    /// TMR notifications seen.
    pub tmrs: AtomicU64,
    /// Doorbell writes.
    pub notifies: AtomicU64,
    /// Times the worker went to sleep (nothing to do, idle poll over).
    pub sleeps: AtomicU64,
}

/// Adds one to a [`Stats`] counter. Only the device's worker writes its
/// counters, so a plain load and store suffice: a locked add per command
/// would cost more than the rest of the bookkeeping.
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// A change run on the worker thread, between two turns of its loop.
pub type ControlFn = Box<dyn FnOnce(&mut Device) + Send>;

/// Stops or reconfigures a running worker from another thread.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    fd: Arc<OwnedFd>,
    ctl: crossbeam_channel::Sender<ControlFn>,
}

impl Stopper {
    /// Asks the worker to drain and return.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Runs `f` on the worker thread with the device (resize, reopen,
    /// unit attentions). Returns false if the worker is gone.
    pub fn control(&self, f: ControlFn) -> bool {
        let ok = self.ctl.send(f).is_ok();
        self.wake();
        ok
    }

    fn wake(&self) {
        let _ = nix::unistd::write(&*self.fd, &1u64.to_ne_bytes());
    }
}

/// Tuning for the worker loop.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Turns of the loop with nothing to do before sleeping in poll().
    /// Spinning trades a core for latency; 0 sleeps at once.
    pub spin: u32,
    /// Once every command is answered, how long to keep looking at the ring
    /// before sleeping. The kernel usually queues the next command within
    /// microseconds of a completion, and waking a sleeping thread costs
    /// more than that (tens of microseconds when its virtual CPU halted).
    /// Not spent while backend operations are pending: their completions
    /// wake the worker. An idle daemon spends it once per command burst.
    /// A handle: the daemon gives every device the same one, so a change
    /// (tcmu.conf `idle_poll_us`) reaches running devices.
    pub idle_poll: IdlePoll,
    /// How long to wait for backend operations when stopping.
    pub drain_timeout: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            spin: 0,
            idle_poll: IdlePoll::new(Duration::from_micros(50)),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// An idle poll duration that can be changed while workers read it
/// ([`WorkerOptions::idle_poll`]); clones share the value.
#[derive(Debug, Clone)]
pub struct IdlePoll(Arc<AtomicU64>);

impl IdlePoll {
    /// A handle starting at `d`.
    pub fn new(d: Duration) -> Self {
        let h = IdlePoll(Arc::new(AtomicU64::new(0)));
        h.set(d);
        h
    }

    /// Changes it for every device following it.
    pub fn set(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.store(us, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed))
    }
}

impl Default for IdlePoll {
    fn default() -> Self {
        WorkerOptions::default().idle_poll
    }
}

/// One device and its worker state.
pub struct Device {
    name: String,
    ring: Ring,
    lun: Lun,
    backend: Arc<dyn Backend>,
    cq: CompletionQueue,
    pending: Vec<Option<Pending>>,
    bell: Box<dyn Doorbell>,
    entries: Vec<Entry>,
    stats: Arc<Stats>,
    stop_flag: Arc<AtomicBool>,
    stop_fd: Arc<OwnedFd>,
    ctl_tx: crossbeam_channel::Sender<ControlFn>,
    ctl_rx: crossbeam_channel::Receiver<ControlFn>,
    options: WorkerOptions,
    /// Runs EXTENDED COPY (None: refused as not reachable).
    copier: Option<Arc<dyn crate::copy::Copier>>,
    /// The doorbell, the completion queue and the stop fd, registered once
    /// (cheaper per sleep than poll() on three fds).
    epoll: Epoll,
}

/// Which fd an epoll event is for.
const EV_BELL: u64 = 0;
const EV_CQ: u64 = 1;
const EV_STOP: u64 = 2;

impl Device {
    /// Builds a device over a mapped ring.
    pub fn new(
        name: impl Into<String>,
        mem: Arc<SharedMem>,
        bell: Box<dyn Doorbell>,
        backend: Arc<dyn Backend>,
        info: LunInfo,
    ) -> Result<Self, DeviceError> {
        let name = name.into();
        let ring = Ring::new(mem).map_err(|source| DeviceError::Ring {
            dev: name.clone(),
            source,
        })?;
        let io = |what| {
            let dev = name.clone();
            move |source| DeviceError::Io { dev, what, source }
        };
        let cq = CompletionQueue::new().map_err(io("eventfd"))?;
        let stop_fd: OwnedFd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map_err(std::io::Error::from)
        .map_err(io("eventfd"))?
        .into();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .and_then(|ep| {
                ep.add(bell.fd(), EpollEvent::new(EpollFlags::EPOLLIN, EV_BELL))?;
                ep.add(cq.fd(), EpollEvent::new(EpollFlags::EPOLLIN, EV_CQ))?;
                ep.add(&stop_fd, EpollEvent::new(EpollFlags::EPOLLIN, EV_STOP))?;
                Ok(ep)
            })
            .map_err(std::io::Error::from)
            .map_err(io("epoll"))?;
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        let mut pending = Vec::with_capacity(65536);
        pending.resize_with(65536, || None);
        Ok(Device {
            name,
            ring,
            lun: Lun::new(info),
            backend,
            cq,
            pending,
            bell,
            entries: Vec::with_capacity(256),
            stats: Arc::new(Stats::default()),
            stop_flag: Arc::new(AtomicBool::new(false)),
            stop_fd: Arc::new(stop_fd),
            ctl_tx,
            ctl_rx,
            options: WorkerOptions::default(),
            copier: None,
            epoll,
        })
    }

    /// Serves EXTENDED COPY through `copier`.
    pub fn set_copier(&mut self, copier: Arc<dyn crate::copy::Copier>) {
        self.copier = Some(copier);
    }

    /// The backend, as the worker submits to it.
    pub fn backend(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    /// Sets the loop's tuning.
    pub fn set_options(&mut self, options: WorkerOptions) {
        self.options = options;
    }

    /// The device's name (for logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// A handle that stops [`run`](Self::run) from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            flag: self.stop_flag.clone(),
            fd: self.stop_fd.clone(),
            ctl: self.ctl_tx.clone(),
        }
    }

    /// The LUN state (resize, unit attentions).
    pub fn lun_mut(&mut self) -> &mut Lun {
        &mut self.lun
    }

    /// Replaces the backend (reopen after a reconfiguration or after the
    /// old one was fenced). Operations in flight on the old one finish
    /// normally; new commands go to the new one.
    pub fn set_backend(&mut self, backend: Arc<dyn Backend>) {
        info!(dev = %self.name, old = %self.backend.name(), new = %backend.name(), "backend replaced");
        self.backend = backend;
    }

    /// Online resize: the LUN reports `size` bytes from now on and raises
    /// CAPACITY DATA HAS CHANGED.
    pub fn resize(&mut self, size: u64) {
        let mut geo = self.lun.info().geometry;
        if let Err(e) = self.backend.resize(size) {
            error!(dev = %self.name, old = geo.size, new = size, error = %e, "backend cannot resize; capacity unchanged");
            return;
        }
        info!(dev = %self.name, old = geo.size, new = size, "resize");
        geo.size = size;
        self.lun.set_geometry(geo);
    }

    fn run_controls(&mut self) -> bool {
        let mut any = false;
        while let Ok(f) = self.ctl_rx.try_recv() {
            f(self);
            any = true;
        }
        any
    }

    fn ring_err(&self, source: RingError) -> DeviceError {
        DeviceError::Ring {
            dev: self.name.clone(),
            source,
        }
    }

    /// One turn of the loop without sleeping: takes new entries, collects
    /// finished operations, publishes and notifies. Returns whether
    /// anything happened.
    pub fn turn(&mut self) -> Result<bool, DeviceError> {
        let mut progress = false;
        let mut entries = std::mem::take(&mut self.entries);
        let got = self.ring.poll(&mut entries);
        let n = match got {
            Ok(n) => n,
            Err(e) => {
                self.entries = entries;
                return Err(self.ring_err(e));
            }
        };
        if n > 0 {
            progress = true;
            for e in entries.drain(..) {
                self.dispatch(e);
            }
        }
        self.entries = entries;
        while let Some(c) = self.cq.try_recv() {
            progress = true;
            self.finish(c);
        }
        if self.ring.publish().map_err(|e| self.ring_err(e))? {
            bump(&self.stats.notifies);
            if let Err(e) = self.bell.ring() {
                return Err(DeviceError::Io {
                    dev: self.name.clone(),
                    what: "doorbell write",
                    source: e,
                });
            }
        }
        Ok(progress)
    }

    fn dispatch(&mut self, e: Entry) {
        match e {
            Entry::Cmd(cmd) => {
                bump(&self.stats.commands);
                let id = cmd.cmd_id;
                if !cmd.cdb_complete {
                    self.respond(id, Response::check(crate::scsi::INVALID_OPCODE));
                    return;
                }
                let o = self.lun.execute(cmd.cdb(), &cmd.bufs);
                self.advance(id, o);
            }
            Entry::Tmr(t) => {
                bump(&self.stats.tmrs);
                // Backend I/O cannot be recalled (librbd has no abort);
                // aborted commands complete normally and the kernel, which
                // already answered the initiator, just frees them.
                info!(
                    dev = %self.name,
                    tmr_type = t.tmr_type,
                    cmd_ids = ?t.cmd_ids,
                    "task management notification"
                );
            }
        }
    }

    fn finish(&mut self, c: tcmu_handler::Completion) {
        let Ok(id) = u16::try_from(c.tag) else {
            error!(dev = %self.name, tag = c.tag, "completion with a bad tag dropped");
            return;
        };
        let Some(p) = self.pending[id as usize].take() else {
            error!(dev = %self.name, cmd_id = id, "completion for no pending command dropped");
            return;
        };
        let o = self.lun.finish(p, c.result);
        self.advance(id, o);
    }

    /// Carries command `id` on from `o`: responds, runs the backend
    /// operation inline when the backend can, or submits it. A follow-up
    /// operation (e.g. the flush after a FUA write) keeps the same id.
    fn advance(&mut self, id: u16, mut o: Outcome) {
        loop {
            match o {
                Outcome::Done(r) => return self.respond(id, r),
                Outcome::Submit(op, p) => match self.backend.try_inline(op) {
                    Ok(result) => o = self.lun.finish(p, result),
                    Err(op) => {
                        self.pending[id as usize] = Some(p);
                        self.backend.submit(op, self.cq.done(u64::from(id)));
                        return;
                    }
                },
                Outcome::Copy(req, p) => {
                    let Some(copier) = self.copier.clone() else {
                        return self.respond(
                            id,
                            Response::check(crate::scsi::sense::COPY_TARGET_NOT_REACHABLE),
                        );
                    };
                    self.pending[id as usize] = Some(p);
                    let done = self.cq.done(u64::from(id));
                    copier.start(req, &self.name, self.backend.clone(), done);
                    return;
                }
            }
        }
    }

    fn respond(&mut self, id: u16, r: Response) {
        bump(&self.stats.completed);
        let sense_bytes: Option<[u8; 18]> = r.sense.as_ref().map(Sense::to_fixed);
        if r.sense.is_some() {
            bump(&self.stats.check_conditions);
            debug!(dev = %self.name, cmd_id = id, sense = ?r.sense, "check condition");
        }
        let c = Completion {
            cmd_id: id,
            status: r.status,
            sense: sense_bytes.as_ref().map_or(&[][..], |s| &s[..]),
            read_len: r.read_len,
        };
        if let Err(e) = self.ring.complete(c) {
            // Never let a bad completion reach the kernel: it would break
            // the ring for good. The command times out in the kernel.
            error!(dev = %self.name, cmd_id = id, error = %e, "completion refused");
        }
    }

    /// Runs the worker until [`Stopper::stop`], then drains: operations in
    /// flight are waited for (up to the drain timeout) and completed;
    /// entries not yet taken stay in the ring for the next process.
    pub fn run(&mut self) -> Result<(), DeviceError> {
        let span = tracing::info_span!("dev", name = %self.name);
        let _g = span.enter();
        info!(backend = %self.backend.name(), "serving");
        let mut idle = 0u32;
        // End of the current idle poll (read from the handle as it starts,
        // so a changed setting applies at the next idle moment).
        let mut poll_until: Option<Instant> = None;
        while !self.stop_flag.load(Ordering::Relaxed) {
            let ctl = self.run_controls();
            if self.turn()? || ctl {
                idle = 0;
                poll_until = None;
                continue;
            }
            idle += 1;
            if idle <= self.options.spin {
                std::hint::spin_loop();
                continue;
            }
            if self.ring.in_flight() == 0 {
                let until = *poll_until
                    .get_or_insert_with(|| Instant::now() + self.options.idle_poll.get());
                if Instant::now() < until {
                    std::hint::spin_loop();
                    continue;
                }
            }
            idle = 0;
            poll_until = None;
            self.sleep()?;
        }
        self.drain()
    }

    fn sleep(&mut self) -> Result<(), DeviceError> {
        if !self.cq.park() {
            return Ok(());
        }
        bump(&self.stats.sleeps);
        let mut events = [EpollEvent::empty(); 3];
        let n = match self.epoll.wait(&mut events, EpollTimeout::from(1000u16)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                self.cq.unpark();
                return Err(DeviceError::Io {
                    dev: self.name.clone(),
                    what: "epoll_wait",
                    source: e.into(),
                });
            }
        };
        self.cq.unpark();
        // Only the fds that fired are read: a read of an idle eventfd is a
        // wasted system call on every sleep.
        for ev in &events[..n] {
            match ev.data() {
                EV_BELL => self.bell.ack(),
                EV_CQ => self.cq.clear(),
                _ => {
                    let mut b = [0u8; 8];
                    let _ = nix::unistd::read(self.stop_fd.as_raw_fd(), &mut b);
                }
            }
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), DeviceError> {
        let deadline = Instant::now() + self.options.drain_timeout;
        while self.ring.in_flight() > 0 {
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    in_flight = self.ring.in_flight(),
                    "drain timed out; the kernel will time these commands out"
                );
                break;
            }
            if let Some(c) = self.cq.recv_timeout(deadline - now) {
                self.finish(c);
                while let Some(c) = self.cq.try_recv() {
                    self.finish(c);
                }
                if self.ring.publish().map_err(|e| self.ring_err(e))? {
                    let _ = self.bell.ring();
                }
            }
        }
        info!("stopped");
        Ok(())
    }
}
