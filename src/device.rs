//! One TCMU device: its ring, its LUN state and its backend.
//!
//! One [`step`](Device::step) of a device: take what the kernel queued,
//! answer emulated commands at once and submit data commands to the
//! backend, collect finished backend operations, write their completions,
//! publish `cmd_tail` and ring the doorbell once per batch. With nothing to
//! do it sleeps until one of its three fds fires ([`Device::wake_fds`]):
//! the doorbell fd, the completion queue's eventfd and a stop eventfd. The
//! daemon's ring threads ([`crate::ring_threads`]) step many devices each
//! and watch all their fds in one epoll set; [`run`](Device::run) drives
//! one device on the calling thread.

use crate::metrics::hist::{add, Histogram};
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
use tcmu_handler::{Backend, CompletionQueue, IoBufs, Op};
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

/// Counters a device keeps, readable from other threads. Only the
/// device's worker writes them (plain loads and stores, no locked adds):
/// the metrics endpoint and `tcmu-rbd status` read them.
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
    /// READ(6/10/12/16) commands taken.
    pub reads: AtomicU64,
    /// WRITE(6/10/12/16) and WRITE AND VERIFY commands taken.
    pub writes: AtomicU64,
    /// Every other command taken.
    pub others: AtomicU64,
    /// Data-in buffer bytes of the reads taken.
    pub read_bytes: AtomicU64,
    /// Data-out buffer bytes of the writes taken.
    pub write_bytes: AtomicU64,
    /// CHECK CONDITIONs sent, by sense key.
    pub sense_keys: [AtomicU64; 16],
    /// Commands answered BUSY or TASK SET FULL.
    pub qfull: AtomicU64,
    /// Times the worker found its ring nearly full (data area or command
    /// area at least 90% taken by commands in flight), counted when it
    /// crosses that mark.
    pub ring_full: AtomicU64,
    /// Data-area bytes held by commands in flight (their buffers).
    pub data_in_use: AtomicU64,
    /// Commands served by a merged backend operation (one read or write
    /// for adjacent commands taken together; see
    /// [`Backend::merge_limit`](tcmu_handler::Backend::merge_limit)).
    pub merged_commands: AtomicU64,
    /// Merged backend operations submitted.
    pub merged_ops: AtomicU64,
    /// Size of the data area, bytes.
    pub data_area: AtomicU64,
    /// Time from taking a command off the ring to writing its completion.
    pub latency: Histogram,
    /// Time the backend spent on an operation (submit to completion;
    /// inline operations included).
    pub backend: Histogram,
}

/// What a command is, for the per-kind counters.
#[derive(Clone, Copy)]
enum Class {
    Read,
    Write,
    Other,
}

fn classify(opcode: u8) -> Class {
    use crate::scsi::cdb::op;
    match opcode {
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => Class::Read,
        op::WRITE_6
        | op::WRITE_10
        | op::WRITE_12
        | op::WRITE_16
        | op::WRITE_VERIFY_10
        | op::WRITE_VERIFY_16 => Class::Write,
        _ => Class::Other,
    }
}

/// SCSI status BUSY.
const STATUS_BUSY: u8 = 0x08;
/// SCSI status TASK SET FULL.
const STATUS_TASK_SET_FULL: u8 = 0x28;

/// Adds one to a [`Stats`] counter. Only the device's worker writes its
/// counters, so a plain load and store suffice: a locked add per command
/// would cost more than the rest of the bookkeeping.
fn bump(c: &AtomicU64) {
    add(c, 1);
}

/// A change run on the device's ring thread, between two of its steps.
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

    /// Runs `f` on the ring thread with the device (resize, reopen,
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
    /// Per command id, [`TRACK`] words: when it was taken and when its
    /// backend operation was submitted (ns since `epoch`), and the bytes
    /// of its buffers. Zeroed lazily by the allocator: only the pages of
    /// ids the kernel used are ever touched.
    track: Vec<u64>,
    /// The worker's clock origin.
    epoch: Instant,
    /// Data-area bytes held by the commands in flight, and the value last
    /// published in `stats`.
    data_in_use: u64,
    data_published: u64,
    /// The ring was nearly full at the last look (see [`Stats::ring_full`]).
    was_full: bool,
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
    /// Turns in a row with nothing done (see [`WorkerOptions::spin`]).
    idle: u32,
    /// End of the current idle poll (read from the handle as it starts,
    /// so a changed setting applies at the next idle moment).
    poll_until: Option<Instant>,
    /// Set once stopping: when the drain gives up on operations in flight.
    drain_deadline: Option<Instant>,
    /// The device's tracing span, entered around its steps.
    span: tracing::Span,
    /// Reads and writes of the batch being taken, held back to be merged
    /// with their neighbours (empty outside [`Device::turn`]'s dispatch).
    staged: Vec<(u16, Op)>,
    /// Gather reads and writes into `staged` (set while a batch is taken
    /// and the backend merges).
    staging: bool,
    /// The members of each merged operation in flight, by group slot
    /// (the operation's tag is [`GROUP_TAG`] | slot); free slots are
    /// empty and listed in `free_groups`.
    groups: Vec<Vec<u16>>,
    free_groups: Vec<usize>,
}

/// Tag bit of a merged operation's completion (command tags are command
/// ids, below 2^16).
const GROUP_TAG: u64 = 1 << 32;
/// The most iovecs in one merged operation (`IOV_MAX`).
const MERGE_IOVECS: usize = 1024;

/// What a device wants after one [`Device::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It did something or is polling: step it again.
    Busy,
    /// Nothing to do: it may sleep until one of its fds fires, or until
    /// the given time at the latest (a drain's deadline).
    Idle(Option<Instant>),
    /// It stopped: drained, or the drain timed out.
    Done,
}

/// Words of [`Device::track`] per command id.
const TRACK: usize = 3;
/// Offsets in a command's track words.
const T_TAKEN: usize = 0;
const T_SUBMITTED: usize = 1;
const T_LEN: usize = 2;

/// Where a staged read or write lies, to tell whether the next one
/// continues it.
#[derive(Clone, Copy)]
struct Extent {
    write: bool,
    fua: bool,
    offset: u64,
    len: u64,
    iovecs: usize,
}

impl Extent {
    fn of(op: &Op) -> Option<Extent> {
        let (write, fua, offset, bufs) = match op {
            Op::Read { offset, bufs } => (false, false, *offset, bufs),
            Op::Write { offset, bufs, fua } => (true, *fua, *offset, bufs),
            _ => return None,
        };
        Some(Extent {
            write,
            fua,
            offset,
            len: bufs.len() as u64,
            iovecs: bufs.iovecs().len(),
        })
    }

    /// `next`'s extent when it starts where this run ends, in the same
    /// direction and FUA, and fits the limits.
    fn joins(&self, next: &Op, limit: usize) -> Option<Extent> {
        let e = Extent::of(next)?;
        let joins = e.write == self.write
            && e.fua == self.fua
            && self.offset.checked_add(self.len) == Some(e.offset)
            && self.len + e.len <= limit as u64
            && self.iovecs + e.iovecs <= MERGE_IOVECS;
        joins.then_some(e)
    }
}

/// A staged read's or write's buffers (only those are staged).
fn into_bufs(op: Op) -> IoBufs {
    match op {
        Op::Read { bufs, .. } | Op::Write { bufs, .. } => bufs,
        _ => IoBufs::empty(),
    }
}

/// Which of a device's fds fired ([`Device::wake_fds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The doorbell: the kernel queued commands.
    Bell,
    /// The completion queue: backend operations finished.
    Completion,
    /// The stop fd: a stop or a control arrived.
    Stop,
}

impl Wake {
    /// The three kinds, in [`Device::wake_fds`]'s order.
    pub const ALL: [Wake; 3] = [Wake::Bell, Wake::Completion, Wake::Stop];

    /// A small number for an epoll token (0, 1 or 2).
    pub fn index(self) -> u64 {
        match self {
            Wake::Bell => 0,
            Wake::Completion => 1,
            Wake::Stop => 2,
        }
    }

    /// The kind whose [`index`](Self::index) is `i`.
    pub fn from_index(i: u64) -> Option<Wake> {
        Wake::ALL.get(usize::try_from(i).ok()?).copied()
    }
}

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
        let name_for_span = name.clone();
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
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        let stats = Stats::default();
        stats
            .data_area
            .store(ring.data_area_len(), Ordering::Relaxed);
        Ok(Device {
            name,
            ring,
            lun: Lun::new(info),
            backend,
            cq,
            pending: Vec::new(),
            track: Vec::new(),
            epoch: Instant::now(),
            data_in_use: 0,
            data_published: 0,
            was_full: false,
            bell,
            entries: Vec::with_capacity(256),
            stats: Arc::new(stats),
            stop_flag: Arc::new(AtomicBool::new(false)),
            stop_fd: Arc::new(stop_fd),
            ctl_tx,
            ctl_rx,
            options: WorkerOptions::default(),
            copier: None,
            idle: 0,
            poll_until: None,
            drain_deadline: None,
            span: tracing::info_span!("dev", name = %name_for_span),
            staged: Vec::new(),
            staging: false,
            groups: Vec::new(),
            free_groups: Vec::new(),
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
        let geo = self.lun.info().geometry;
        if let Err(e) = self.backend.resize(size) {
            error!(dev = %self.name, old = geo.size, new = size, error = %e, "backend cannot resize; capacity unchanged");
            return;
        }
        self.set_capacity(size);
    }

    /// The LUN reports `size` bytes from now on and raises CAPACITY DATA
    /// HAS CHANGED; the backend was resized already (by the caller, off
    /// the ring thread: an rbd resize is a round trip to the cluster).
    pub fn set_capacity(&mut self, size: u64) {
        let mut geo = self.lun.info().geometry;
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
            // One clock read per batch: a command's latency counts from
            // the poll that took it.
            let now = self.now_ns();
            // With more than one command, reads and writes wait for the
            // batch's end, to go out merged where they follow each other.
            self.staging = n > 1 && self.backend.merge_limit() > 0;
            for e in entries.drain(..) {
                self.dispatch(e, now);
            }
            if self.staging {
                self.staging = false;
                self.submit_staged();
            }
            self.check_full();
        }
        self.entries = entries;
        while let Some(c) = self.cq.try_recv() {
            progress = true;
            self.finish(c);
        }
        if self.data_in_use != self.data_published {
            self.data_published = self.data_in_use;
            self.stats
                .data_in_use
                .store(self.data_in_use, Ordering::Relaxed);
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

    /// Nanoseconds since the worker's clock origin.
    #[inline]
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Counts a crossing of the ring-full mark (90% of the data area or
    /// of the command area held by commands in flight).
    fn check_full(&mut self) {
        let data_area = self.ring.data_area_len();
        let cmd_area = u64::from(self.ring.cmd_area_len());
        let full = self.data_in_use * 10 >= data_area * 9
            || u64::from(self.ring.cmd_area_used()) * 10 >= cmd_area * 9;
        if full && !self.was_full {
            bump(&self.stats.ring_full);
        }
        self.was_full = full;
    }

    /// Makes room for command `id` in the per-command tables. The kernel
    /// hands out the lowest free id (an IDR), so the tables grow to the
    /// most commands ever in flight at once, not to 65,536 per device:
    /// an idle LUN costs a few KiB here, not megabytes.
    fn grow_tables(&mut self, id: u16) {
        let need = usize::from(id) + 1;
        if self.pending.len() < need {
            let len = need.next_power_of_two().max(64);
            self.pending.resize_with(len, || None);
            self.track.resize(TRACK * len, 0);
        }
    }

    fn dispatch(&mut self, e: Entry, now: u64) {
        match e {
            Entry::Cmd(cmd) => {
                bump(&self.stats.commands);
                let id = cmd.cmd_id;
                self.grow_tables(id);
                let len = cmd.bufs.len() as u64;
                let t = TRACK * id as usize;
                self.track[t + T_TAKEN] = now;
                self.track[t + T_LEN] = len;
                self.data_in_use += len;
                match classify(cmd.cdb().first().copied().unwrap_or(0)) {
                    Class::Read => {
                        bump(&self.stats.reads);
                        add(&self.stats.read_bytes, len);
                    }
                    Class::Write => {
                        bump(&self.stats.writes);
                        add(&self.stats.write_bytes, len);
                    }
                    Class::Other => bump(&self.stats.others),
                }
                if !cmd.cdb_complete {
                    self.respond(id, Response::check(crate::scsi::INVALID_OPCODE), now);
                    return;
                }
                let o = self.lun.execute(cmd.cdb(), &cmd.bufs);
                self.advance(id, o, now);
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
        if c.tag & GROUP_TAG != 0 {
            return self.finish_group(c);
        }
        let Ok(id) = u16::try_from(c.tag) else {
            error!(dev = %self.name, tag = c.tag, "completion with a bad tag dropped");
            return;
        };
        let Some(p) = self.pending.get_mut(id as usize).and_then(Option::take) else {
            error!(dev = %self.name, cmd_id = id, "completion for no pending command dropped");
            return;
        };
        let submitted = self.track[TRACK * id as usize + T_SUBMITTED];
        let now = self.now_ns();
        self.stats.backend.record(now.saturating_sub(submitted));
        let o = self.lun.finish(p, c.result);
        self.advance(id, o, now);
    }

    /// Carries command `id` on from `o`: responds, runs the backend
    /// operation inline when the backend can, or submits it. A follow-up
    /// operation (e.g. the flush after a FUA write) keeps the same id.
    /// `now`: the clock (ns since `epoch`) as last read, at most
    /// microseconds ago (the worker does not block in between).
    fn advance(&mut self, id: u16, mut o: Outcome, mut now: u64) {
        loop {
            match o {
                Outcome::Done(r) => return self.respond(id, r, now),
                Outcome::Submit(op, p) => match self.backend.try_inline(op) {
                    Ok(result) => {
                        let done = self.now_ns();
                        self.stats.backend.record(done.saturating_sub(now));
                        now = done;
                        o = self.lun.finish(p, result);
                    }
                    Err(op) => {
                        self.pending[id as usize] = Some(p);
                        self.track[TRACK * id as usize + T_SUBMITTED] = now;
                        if self.staging && matches!(op, Op::Read { .. } | Op::Write { .. }) {
                            self.staged.push((id, op));
                        } else {
                            // Reads and writes taken before this command
                            // go out before it.
                            self.submit_staged();
                            self.backend.submit(op, self.cq.done(u64::from(id)));
                        }
                        return;
                    }
                },
                Outcome::Copy(req, p) => {
                    let Some(copier) = self.copier.clone() else {
                        return self.respond(
                            id,
                            Response::check(crate::scsi::sense::COPY_TARGET_NOT_REACHABLE),
                            now,
                        );
                    };
                    self.submit_staged();
                    self.pending[id as usize] = Some(p);
                    // The copy's time counts as the backend's.
                    self.track[TRACK * id as usize + T_SUBMITTED] = now;
                    let done = self.cq.done(u64::from(id));
                    copier.start(req, &self.name, self.backend.clone(), done);
                    return;
                }
            }
        }
    }

    /// Submits the batch's staged reads and writes: each run of commands
    /// in ring order whose ranges follow each other (same direction, same
    /// FUA, within the backend's merge limit and [`MERGE_IOVECS`]) as one
    /// operation, anything else on its own. Only neighbours in ring order
    /// merge, so no two commands' operations are reordered: an initiator
    /// that overlaps writes in flight sees them reach the backend in the
    /// order it queued them, as without merging. A command of another
    /// kind in the batch (a flush, an UNMAP) sends what was staged before
    /// it first.
    fn submit_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let limit = self.backend.merge_limit();
        let mut staged = std::mem::take(&mut self.staged);
        let mut it = staged.drain(..).peekable();
        while let Some((id, op)) = it.next() {
            let Some(first) = Extent::of(&op) else {
                self.backend.submit(op, self.cq.done(u64::from(id)));
                continue;
            };
            if it
                .peek()
                .and_then(|(_, next)| first.joins(next, limit))
                .is_none()
            {
                self.backend.submit(op, self.cq.done(u64::from(id)));
                continue;
            }
            let mut run = first;
            let mut ids = vec![id];
            let mut parts = vec![into_bufs(op)];
            while let Some(e) = it.peek().and_then(|(_, next)| run.joins(next, limit)) {
                // Peeked just above: `next` is there.
                let Some((nid, nop)) = it.next() else { break };
                run.len += e.len;
                run.iovecs += e.iovecs;
                ids.push(nid);
                parts.push(into_bufs(nop));
            }
            let bufs = IoBufs::concat(&parts);
            let op = if first.write {
                Op::Write {
                    offset: first.offset,
                    bufs,
                    fua: first.fua,
                }
            } else {
                Op::Read {
                    offset: first.offset,
                    bufs,
                }
            };
            // Each member's submit time was noted when it was staged.
            add(&self.stats.merged_commands, ids.len() as u64);
            bump(&self.stats.merged_ops);
            let slot = match self.free_groups.pop() {
                Some(i) => {
                    self.groups[i] = ids;
                    i
                }
                None => {
                    self.groups.push(ids);
                    self.groups.len() - 1
                }
            };
            self.backend
                .submit(op, self.cq.done(GROUP_TAG | slot as u64));
        }
        drop(it);
        // Keep the vector's room for the next batch.
        self.staged = staged;
    }

    /// A merged operation finished: every command it served gets its
    /// result, and goes on as it would have alone.
    fn finish_group(&mut self, c: tcmu_handler::Completion) {
        let slot = (c.tag & !GROUP_TAG) as usize;
        let ids = self
            .groups
            .get_mut(slot)
            .map(std::mem::take)
            .unwrap_or_default();
        if ids.is_empty() {
            error!(dev = %self.name, tag = c.tag, "completion for no merged operation dropped");
            return;
        }
        self.free_groups.push(slot);
        let now = self.now_ns();
        for id in ids {
            let Some(p) = self.pending.get_mut(id as usize).and_then(Option::take) else {
                error!(dev = %self.name, cmd_id = id, "merged completion for no pending command dropped");
                continue;
            };
            let submitted = self.track[TRACK * id as usize + T_SUBMITTED];
            self.stats.backend.record(now.saturating_sub(submitted));
            let o = self.lun.finish(p, c.result.clone());
            self.advance(id, o, now);
        }
    }

    /// Writes command `id`'s completion; `now` as in [`advance`](Self::advance).
    fn respond(&mut self, id: u16, r: Response, now: u64) {
        bump(&self.stats.completed);
        let t = TRACK * id as usize;
        self.stats
            .latency
            .record(now.saturating_sub(self.track[t + T_TAKEN]));
        self.data_in_use = self.data_in_use.saturating_sub(self.track[t + T_LEN]);
        let sense_bytes: Option<[u8; 18]> = r.sense.as_ref().map(Sense::to_fixed);
        if let Some(s) = &r.sense {
            bump(&self.stats.check_conditions);
            bump(&self.stats.sense_keys[usize::from(s.key & 0xf)]);
            debug!(dev = %self.name, cmd_id = id, sense = ?r.sense, "check condition");
        } else if r.status == STATUS_BUSY || r.status == STATUS_TASK_SET_FULL {
            bump(&self.stats.qfull);
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

    /// The device's tracing span (its name), for whoever steps it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The fds that are readable when the device has something to do (the
    /// kernel rang, a backend operation finished, a stop or a control
    /// arrived), each with its kind for [`fired`](Self::fired). Whoever
    /// steps the device watches all three (level-triggered).
    pub fn wake_fds(&self) -> [(BorrowedFd<'_>, Wake); 3] {
        [
            (self.bell.fd(), Wake::Bell),
            (self.cq.fd(), Wake::Completion),
            (self.stop_fd.as_fd(), Wake::Stop),
        ]
    }

    /// One step: runs pending controls, takes new commands, collects
    /// finished operations and publishes; spins or idle-polls as
    /// [`WorkerOptions`] say. Once [`Stopper::stop`] was called it only
    /// drains: operations in flight are collected (up to the drain
    /// timeout) and completed; entries not yet taken stay in the ring for
    /// the next process.
    pub fn step(&mut self) -> Result<Step, DeviceError> {
        if self.drain_deadline.is_some() || self.stop_flag.load(Ordering::Relaxed) {
            return self.drain_step();
        }
        let ctl = self.run_controls();
        if self.turn()? || ctl {
            self.idle = 0;
            self.poll_until = None;
            return Ok(Step::Busy);
        }
        self.idle += 1;
        if self.idle <= self.options.spin {
            std::hint::spin_loop();
            return Ok(Step::Busy);
        }
        if self.ring.in_flight() == 0 {
            let until = *self
                .poll_until
                .get_or_insert_with(|| Instant::now() + self.options.idle_poll.get());
            if Instant::now() < until {
                std::hint::spin_loop();
                return Ok(Step::Busy);
            }
        }
        self.idle = 0;
        self.poll_until = None;
        Ok(Step::Idle(None))
    }

    fn drain_step(&mut self) -> Result<Step, DeviceError> {
        let now = Instant::now();
        let deadline = *self
            .drain_deadline
            .get_or_insert(now + self.options.drain_timeout);
        let mut any = false;
        while let Some(c) = self.cq.try_recv() {
            self.finish(c);
            any = true;
        }
        if any && self.ring.publish().map_err(|e| self.ring_err(e))? {
            let _ = self.bell.ring();
        }
        if self.ring.in_flight() == 0 {
            info!("stopped");
            return Ok(Step::Done);
        }
        if now >= deadline {
            warn!(
                in_flight = self.ring.in_flight(),
                "drain timed out; the kernel will time these commands out"
            );
            info!("stopped");
            return Ok(Step::Done);
        }
        Ok(Step::Idle(Some(deadline)))
    }

    /// Before sleeping on [`wake_fds`](Self::wake_fds) after
    /// [`Step::Idle`]: false if a completion is already waiting (step
    /// again instead). Completers write the eventfd only while parked.
    pub fn park(&mut self) -> bool {
        if !self.cq.park() {
            return false;
        }
        bump(&self.stats.sleeps);
        true
    }

    /// After one of [`wake_fds`](Self::wake_fds) fired: acknowledges it
    /// without blocking and unparks. Only the fd that fired is read: a
    /// read of an idle eventfd is a wasted system call on every sleep.
    pub fn fired(&mut self, w: Wake) {
        self.cq.unpark();
        match w {
            Wake::Bell => self.bell.ack(),
            Wake::Completion => self.cq.clear(),
            Wake::Stop => {
                let mut b = [0u8; 8];
                let _ = nix::unistd::read(self.stop_fd.as_raw_fd(), &mut b);
            }
        }
    }

    /// After a sleep that ended with no fd fired (a deadline): unparks.
    pub fn unpark(&mut self) {
        self.cq.unpark();
    }

    /// Runs the device on the calling thread until [`Stopper::stop`] and
    /// the drain that follows.
    pub fn run(&mut self) -> Result<(), DeviceError> {
        let span = self.span.clone();
        let _g = span.enter();
        let name = self.name.clone();
        let io_err = |what| {
            let dev = name.clone();
            move |e: nix::errno::Errno| DeviceError::Io {
                dev,
                what,
                source: e.into(),
            }
        };
        // One epoll set for the three fds, registered once (cheaper per
        // sleep than poll() on three fds).
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io_err("epoll"))?;
        for (fd, w) in self.wake_fds() {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, w.index()))
                .map_err(io_err("epoll_ctl"))?;
        }
        info!(backend = %self.backend.name(), "serving");
        let mut events = [EpollEvent::empty(); 3];
        loop {
            match self.step()? {
                Step::Busy => {}
                Step::Idle(until) => {
                    if self.park() {
                        // Every wake-up comes through an fd (kernel,
                        // completions, stop and controls); the timeout is
                        // only a net. Long, so that idle LUNs cost no CPU.
                        let ms = until.map_or(10_000, |u| {
                            let left = u.saturating_duration_since(Instant::now());
                            u16::try_from(left.as_millis() + 1)
                                .unwrap_or(10_000)
                                .min(10_000)
                        });
                        let n = match epoll.wait(&mut events, EpollTimeout::from(ms)) {
                            Ok(n) => n,
                            Err(nix::errno::Errno::EINTR) => 0,
                            Err(e) => {
                                self.unpark();
                                return Err(io_err("epoll_wait")(e));
                            }
                        };
                        self.unpark();
                        for ev in &events[..n] {
                            if let Some(w) = Wake::from_index(ev.data()) {
                                self.fired(w);
                            }
                        }
                    }
                }
                Step::Done => return Ok(()),
            }
        }
    }
}
