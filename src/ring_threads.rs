//! The threads that drive the rings: a few, shared by every device (one
//! per CPU by default), not one per LUN.
//!
//! Each thread holds one epoll set with every fd of its devices (each
//! device's doorbell, completion eventfd and stop eventfd, see
//! [`Device::wake_fds`]), tagged with the device's slot and the fd's kind,
//! so one epoll_wait says which device to wake and what to acknowledge.
//! It steps every device that has work, in turn,
//! until none has; then it sleeps. A device stays on the thread it was
//! given (the least loaded when it came) for its whole life, so its ring
//! has one writer and takes no lock.
//!
//! While some devices are busy, the thread still looks at the others' fds
//! every [`LOOK`] (one non-blocking epoll_wait), so a busy LUN cannot starve
//! its neighbours. Nothing in a step blocks on the network: backend
//! operations are submitted and complete through the completion queue; only
//! the ram backend runs inline (a memory copy). A device that stops is
//! handed back to whoever waits for it ([`Served::wait`]) and dropped
//! there, so closing an image never stalls the thread's other devices.

use crate::device::{Device, Step, Wake};
use crossbeam_channel::{Receiver, Sender};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info};

/// How often a thread with busy devices looks at its idle devices' fds.
const LOOK: Duration = Duration::from_micros(50);

/// The epoll token of a thread's own wake-up eventfd.
const WAKE: u64 = u64::MAX;

/// A device fd's epoll token: its slot, and its kind in the low bits.
fn token(slot: usize, w: Wake) -> u64 {
    ((slot as u64) << 2) | w.index()
}

/// The slot and kind a device fd's token stands for.
fn untoken(t: u64) -> Option<(usize, Wake)> {
    Some((usize::try_from(t >> 2).ok()?, Wake::from_index(t & 3)?))
}

/// The shared ring threads of a daemon.
pub struct RingThreads {
    max: usize,
    threads: Mutex<Vec<Arc<Thread>>>,
    /// Threads whose loop is running (they end after the pool is dropped
    /// and their last device stopped).
    alive: Arc<AtomicUsize>,
}

/// The pool's end of one thread. Dropping it (with the pool) disconnects
/// the thread's channel: the thread ends once its devices have.
struct Thread {
    tx: Sender<Arriving>,
    wake: Arc<OwnedFd>,
    /// Devices on this thread.
    load: Arc<AtomicUsize>,
}

struct Arriving {
    dev: Device,
    back: Sender<Device>,
}

/// A device being served; [`wait`](Self::wait) for it after stopping it.
pub struct Served {
    back: Receiver<Device>,
}

impl Served {
    /// Waits until the device stopped (drained), and returns it, to be
    /// dropped by the caller. `None` if its thread died.
    pub fn wait(self) -> Option<Device> {
        self.back.recv().ok()
    }

    /// Whether the device stopped already.
    pub fn is_finished(&self) -> bool {
        !self.back.is_empty()
    }
}

impl Default for RingThreads {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        RingThreads::new(cpus)
    }
}

impl RingThreads {
    /// At most `max` threads (at least one); they start as devices come.
    pub fn new(max: usize) -> Self {
        RingThreads {
            max: max.max(1),
            threads: Mutex::new(Vec::new()),
            alive: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Serves `dev` on the least loaded thread (a new one while there are
    /// fewer than the maximum and each has a device already).
    pub fn serve(&self, dev: Device) -> std::io::Result<Served> {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let least = threads
            .iter()
            .min_by_key(|t| t.load.load(Ordering::Relaxed))
            .cloned();
        let t = match least {
            Some(t) if t.load.load(Ordering::Relaxed) == 0 || threads.len() >= self.max => t,
            _ => {
                let t = spawn(threads.len(), &self.alive)?;
                threads.push(t.clone());
                t
            }
        };
        let (back, rx) = crossbeam_channel::bounded(1);
        t.load.fetch_add(1, Ordering::Relaxed);
        if t.tx.send(Arriving { dev, back }).is_err() {
            t.load.fetch_sub(1, Ordering::Relaxed);
            return Err(std::io::Error::other("ring thread gone"));
        }
        let _ = nix::unistd::write(&*t.wake, &1u64.to_ne_bytes());
        Ok(Served { back: rx })
    }

    /// Threads started by this pool.
    pub fn threads(&self) -> usize {
        self.threads.lock().map_or(0, |t| t.len())
    }

    /// A count of this pool's threads still running, which outlives the
    /// pool (to see them end).
    pub fn alive(&self) -> Arc<AtomicUsize> {
        self.alive.clone()
    }
}

fn spawn(n: usize, alive: &Arc<AtomicUsize>) -> std::io::Result<Arc<Thread>> {
    let wake: OwnedFd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(std::io::Error::from)?
        .into();
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(std::io::Error::from)?;
    epoll
        .add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE))
        .map_err(std::io::Error::from)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let t = Arc::new(Thread {
        tx,
        wake: Arc::new(wake),
        load: Arc::new(AtomicUsize::new(0)),
    });
    let (wake, load, running) = (t.wake.clone(), t.load.clone(), alive.clone());
    alive.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name(format!("tcmu-ring-{n}"))
        .spawn(move || {
            Worker::new(epoll, rx, wake, load).run();
            running.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        alive.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    Ok(t)
}

struct Slot {
    dev: Device,
    /// The device's span (entered around each step), cloned once.
    span: tracing::Span,
    back: Sender<Device>,
    /// Stepped each round; false while parked on its fd.
    active: bool,
    /// Parked, but to be stepped again by then (a drain's deadline).
    until: Option<Instant>,
}

struct Worker {
    epoll: Epoll,
    rx: Receiver<Arriving>,
    wake: Arc<OwnedFd>,
    load: Arc<AtomicUsize>,
    slots: Vec<Option<Slot>>,
    events: Vec<EpollEvent>,
    /// The pool is gone: end once the last device has.
    closing: bool,
}

impl Worker {
    fn new(
        epoll: Epoll,
        rx: Receiver<Arriving>,
        wake: Arc<OwnedFd>,
        load: Arc<AtomicUsize>,
    ) -> Self {
        Worker {
            epoll,
            rx,
            wake,
            load,
            slots: Vec::new(),
            events: vec![EpollEvent::empty(); 64],
            closing: false,
        }
    }

    fn run(mut self) {
        let mut looked = Instant::now();
        loop {
            self.arrivals();
            if self.closing && self.slots.iter().all(Option::is_none) {
                return;
            }
            let active = self.slots.iter().flatten().filter(|s| s.active).count();
            let parked = self.slots.iter().flatten().count() - active;
            if active == 0 {
                self.look(self.sleep_timeout());
                looked = Instant::now();
            } else if parked > 0 && looked.elapsed() >= LOOK {
                self.look(EpollTimeout::ZERO);
                looked = Instant::now();
            }
            self.due();
            for i in 0..self.slots.len() {
                self.step(i);
            }
        }
    }

    /// Takes devices handed to this thread.
    fn arrivals(&mut self) {
        loop {
            let Arriving { dev, back } = match self.rx.try_recv() {
                Ok(a) => a,
                Err(crossbeam_channel::TryRecvError::Empty) => return,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            };
            let i = match self.slots.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let span = dev.span().clone();
            {
                let _g = span.enter();
                if let Err(e) = self.watch(&dev, i) {
                    error!(error = %e, "cannot watch the device's fds; not served");
                    self.unwatch(&dev);
                    self.load.fetch_sub(1, Ordering::Relaxed);
                    let _ = back.send(dev);
                    continue;
                }
                info!(backend = %dev.backend().name(), "serving");
            }
            self.slots[i] = Some(Slot {
                dev,
                span,
                back,
                active: true,
                until: None,
            });
        }
    }

    fn watch(&self, dev: &Device, slot: usize) -> nix::Result<()> {
        for (fd, w) in dev.wake_fds() {
            self.epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token(slot, w)))?;
        }
        Ok(())
    }

    fn unwatch(&self, dev: &Device) {
        for (fd, _) in dev.wake_fds() {
            // Fails only for an fd not (yet) watched.
            let _ = self.epoll.delete(fd);
        }
    }

    /// How long to sleep with no device active: until the earliest drain
    /// deadline, else 10 s (every wake-up comes through an fd; the timeout
    /// is only a net).
    fn sleep_timeout(&self) -> EpollTimeout {
        let now = Instant::now();
        let ms = self
            .slots
            .iter()
            .flatten()
            .filter_map(|s| s.until)
            .map(|u| u.saturating_duration_since(now).as_millis() + 1)
            .min()
            .unwrap_or(10_000)
            .min(10_000);
        EpollTimeout::from(u16::try_from(ms).unwrap_or(10_000))
    }

    /// Waits up to `timeout` for fds; wakes the devices whose fd fired.
    fn look(&mut self, timeout: EpollTimeout) {
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                error!(error = %e, "ring thread: epoll_wait failed");
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        for k in 0..n {
            let token = self.events[k].data();
            if token == WAKE {
                let mut b = [0u8; 8];
                let _ = nix::unistd::read(self.wake.as_raw_fd(), &mut b);
                continue;
            }
            let Some((i, w)) = untoken(token) else {
                continue;
            };
            let Some(Some(s)) = self.slots.get_mut(i) else {
                continue;
            };
            s.active = true;
            s.until = None;
            s.dev.fired(w);
        }
    }

    /// Parked devices whose deadline passed are stepped again.
    fn due(&mut self) {
        let now = Instant::now();
        for s in self.slots.iter_mut().flatten() {
            if !s.active && s.until.is_some_and(|u| u <= now) {
                s.active = true;
                s.until = None;
                s.dev.unpark();
            }
        }
    }

    fn step(&mut self, i: usize) {
        let Some(s) = self.slots[i].as_mut().filter(|s| s.active) else {
            return;
        };
        let ended = {
            let _g = s.span.enter();
            // A panic in one device's step must not take the thread's other
            // devices with it: that device alone ends.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.dev.step()));
            match r {
                Ok(Ok(Step::Busy)) => false,
                Ok(Ok(Step::Idle(until))) => {
                    if s.dev.park() {
                        s.active = false;
                        s.until = until;
                    }
                    false
                }
                Ok(Ok(Step::Done)) => true,
                Ok(Err(e)) => {
                    error!(error = %e, "device stopped");
                    true
                }
                Err(_) => {
                    error!("device stopped: its worker step panicked");
                    true
                }
            }
        };
        if ended {
            self.finish(i);
        }
    }

    fn finish(&mut self, i: usize) {
        let Some(s) = self.slots[i].take() else {
            return;
        };
        self.unwatch(&s.dev);
        self.load.fetch_sub(1, Ordering::Relaxed);
        // Dropped by the waiter, not here: closing a backend can take a
        // while (an rbd image releases its lock).
        let _ = s.back.send(s.dev);
    }
}

impl Drop for RingThreads {
    fn drop(&mut self) {
        // Disconnect each thread's channel, then wake it to notice.
        let threads = std::mem::take(self.threads.get_mut().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let wake = t.wake.clone();
            drop(t);
            let _ = nix::unistd::write(&*wake, &1u64.to_ne_bytes());
        }
    }
}
