//! Doorbell writes moved off the ring threads, for completions that make
//! the kernel copy a lot.
//!
//! The 4-byte write to `/dev/uioN` that tells the kernel completions are
//! in the ring runs the kernel's reaping in the writer's context
//! (`tcmu_irqcontrol` → `tcmu_handle_completions`): for each finished
//! read the kernel copies its data out of the data area into the
//! command's pages (`gather_data_area`) before completing it to LIO. For
//! a batch of large reads that is milliseconds, and a ring thread inside
//! that write serves nothing else: not the next commands of its LUN, not
//! its other LUNs. So a device whose published batch holds at least the
//! offload threshold of read data hands the write to a [`BellPool`]
//! thread and goes on.
//!
//! Correctness does not depend on which thread writes: the kernel reaps up
//! to whatever `cmd_tail` it reads under its lock, so a write made after a
//! tail was stored covers it. Every offloaded request is written after
//! the tail it follows ([`Bell::request`]), and a doorbell dropped with a
//! request outstanding writes once more itself.

use crossbeam_channel::{Receiver, Sender};
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tracing::{debug, warn};

/// One device's doorbell as the pool sees it: the uio fd and whether a
/// write for it is queued or running.
#[derive(Debug)]
pub struct Bell {
    file: File,
    /// A write is queued in the pool and not yet taken by a thread.
    queued: AtomicBool,
    /// A pool thread is inside the write.
    writing: AtomicBool,
    /// The errno of the last failed pool write, 0 if none: the device's
    /// next doorbell returns it, as if its own write had failed.
    failed: AtomicI32,
}

impl Bell {
    /// Wraps a device's uio fd (opened read-write).
    pub fn new(file: File) -> Self {
        Bell {
            file,
            queued: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            failed: AtomicI32::new(0),
        }
    }

    /// The fd, for polling the kernel's events.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The write itself: the kernel reaps every completion up to the
    /// published tail.
    pub fn write(&self) -> std::io::Result<()> {
        (&self.file).write_all(&1u32.to_ne_bytes())
    }

    /// Whether a pool write for this bell is queued or running: a write
    /// from the device now would wait in the kernel for that one (both
    /// take the device's ring lock), so it is better queued behind it.
    pub fn busy(&self) -> bool {
        self.queued.load(Ordering::Acquire) || self.writing.load(Ordering::Acquire)
    }

    /// Takes the error a pool write left, if any.
    pub fn take_error(&self) -> Option<std::io::Error> {
        match self.failed.swap(0, Ordering::AcqRel) {
            0 => None,
            e => Some(std::io::Error::from_raw_os_error(e)),
        }
    }

    /// Marks a write as wanted; true if the caller must queue the bell
    /// (none was queued). Called after the tail was stored: AcqRel makes
    /// that store visible to the pool thread that takes the request.
    fn request(&self) -> bool {
        !self.queued.swap(true, Ordering::AcqRel)
    }

    /// A pool thread takes the request: from here a new request queues
    /// the bell again, so a tail stored after this point gets a write of
    /// its own.
    fn take(&self) {
        self.writing.store(true, Ordering::Release);
        self.queued.swap(false, Ordering::AcqRel);
    }
}

/// A few threads that write doorbells for the ring threads (see the module
/// doc). They start at the first offloaded write, not before: a daemon
/// whose LUNs never complete large reads has none.
pub struct BellPool {
    inner: Arc<Inner>,
}

struct Inner {
    threads: usize,
    /// Read bytes in one published batch from which its doorbell is
    /// offloaded; 0 turns offloading off.
    threshold: AtomicU64,
    /// The queue's sender, once the threads started (None: they could
    /// not start, and nothing is offloaded).
    tx: OnceLock<Option<Sender<Arc<Bell>>>>,
}

/// The default offload threshold: 256 KiB of read data in one batch (the
/// kernel's copy of it takes tens of microseconds even on a real core; a
/// 4K read's takes about a microsecond, less than a thread hop).
pub const DEFAULT_THRESHOLD: u64 = 256 * 1024;

impl Default for BellPool {
    fn default() -> Self {
        BellPool::new(1, DEFAULT_THRESHOLD)
    }
}

impl BellPool {
    /// A pool of `threads` threads (at least one), offloading batches with
    /// at least `threshold` bytes of read data (0: never).
    pub fn new(threads: usize, threshold: u64) -> Self {
        BellPool {
            inner: Arc::new(Inner {
                threads: threads.max(1),
                threshold: AtomicU64::new(threshold),
                tx: OnceLock::new(),
            }),
        }
    }

    /// Changes the threshold; devices follow at their next doorbell.
    pub fn set_threshold(&self, bytes: u64) {
        self.inner.threshold.store(bytes, Ordering::Relaxed);
    }

    /// The threshold now.
    pub fn threshold(&self) -> u64 {
        self.inner.threshold.load(Ordering::Relaxed)
    }

    /// A handle for one device's doorbell.
    pub fn handle(&self) -> Offload {
        Offload {
            inner: self.inner.clone(),
        }
    }

    /// Whether the pool's threads run.
    pub fn started(&self) -> bool {
        matches!(self.inner.tx.get(), Some(Some(_)))
    }
}

impl Inner {
    /// The queue's sender, starting the threads on first use.
    fn sender(&self) -> Option<&Sender<Arc<Bell>>> {
        self.tx
            .get_or_init(|| {
                let (tx, rx) = crossbeam_channel::unbounded();
                for i in 0..self.threads {
                    let rx: Receiver<Arc<Bell>> = rx.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("tcmu-bell-{i}"))
                        .spawn(move || serve(rx));
                    if let Err(e) = spawned {
                        // Threads started before this one end with the
                        // sender dropped here; devices write their own
                        // doorbells.
                        warn!(error = %e, "cannot start a doorbell thread; doorbells stay on the ring threads");
                        return None;
                    }
                }
                Some(tx)
            })
            .as_ref()
    }
}

/// A pool thread: writes each queued bell once. Ends when the pool and
/// every device's [`Offload`] are gone.
fn serve(rx: Receiver<Arc<Bell>>) {
    for bell in rx {
        bell.take();
        if let Err(e) = bell.write() {
            debug!(error = %e, "offloaded doorbell write failed");
            bell.failed
                .store(e.raw_os_error().unwrap_or(libc::EIO), Ordering::Release);
        }
        bell.writing.store(false, Ordering::Release);
    }
}

/// A device's way into the pool.
#[derive(Clone)]
pub struct Offload {
    inner: Arc<Inner>,
}

impl Offload {
    /// Whether a batch with `read_bytes` of read data goes to the pool.
    pub fn wants(&self, read_bytes: u64) -> bool {
        let t = self.inner.threshold.load(Ordering::Relaxed);
        t > 0 && read_bytes >= t
    }

    /// Queues a write of `bell` (the tail is stored already). False if
    /// the pool has no threads: the caller writes it itself.
    pub fn queue(&self, bell: &Arc<Bell>) -> bool {
        let Some(tx) = self.inner.sender() else {
            return false;
        };
        if !bell.request() {
            // One is queued and not yet taken: it covers this tail too.
            return true;
        }
        if tx.send(bell.clone()).is_err() {
            bell.queued.store(false, Ordering::Release);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// A bell over one end of a socket pair: each doorbell write shows up
    /// as 4 bytes at the other end.
    fn pair() -> (Arc<Bell>, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let file = File::from(std::os::fd::OwnedFd::from(a));
        (Arc::new(Bell::new(file)), b)
    }

    fn writes(peer: &mut UnixStream) -> usize {
        peer.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut n = 0;
        let mut b = [0u8; 4];
        while peer.read_exact(&mut b).is_ok() {
            assert_eq!(u32::from_ne_bytes(b), 1);
            n += 1;
        }
        n
    }

    #[test]
    fn a_queued_bell_is_written_and_no_longer_busy() {
        let pool = BellPool::new(1, 1024);
        let off = pool.handle();
        assert!(!pool.started(), "threads started before any offload");
        let (bell, mut peer) = pair();
        assert!(off.queue(&bell));
        assert!(pool.started());
        assert_eq!(writes(&mut peer), 1);
        assert!(!bell.busy());
        assert!(bell.take_error().is_none());
    }

    #[test]
    fn requests_before_the_thread_takes_one_share_its_write() {
        let (bell, mut peer) = pair();
        // No thread yet: queue by hand, as `queue` does, three times.
        assert!(bell.request());
        assert!(!bell.request());
        assert!(!bell.request());
        bell.take();
        bell.write().expect("write");
        bell.writing.store(false, Ordering::Release);
        // A request after the take needs a write of its own.
        assert!(bell.request());
        assert_eq!(writes(&mut peer), 1);
    }

    #[test]
    fn the_threshold_decides_and_zero_turns_it_off() {
        let pool = BellPool::new(1, 256 * 1024);
        let off = pool.handle();
        assert!(!off.wants(4096));
        assert!(off.wants(256 * 1024));
        pool.set_threshold(0);
        assert!(!off.wants(u64::MAX));
    }

    #[test]
    fn a_device_doorbell_writes_small_batches_itself_and_large_ones_from_the_pool() {
        use crate::device::{Doorbell, UioDoorbell};
        let pool = BellPool::new(1, 256 * 1024);
        let (a, mut peer) = UnixStream::pair().expect("socketpair");
        let bell = UioDoorbell::new(File::from(std::os::fd::OwnedFd::from(a)))
            .with_offload(Some(pool.handle()));
        bell.ring(4096).expect("ring");
        assert!(!pool.started(), "a 4 KiB batch was offloaded");
        assert_eq!(writes(&mut peer), 1);
        bell.ring(1 << 20).expect("ring");
        assert!(pool.started(), "a 1 MiB batch was not offloaded");
        assert_eq!(writes(&mut peer), 1);
        pool.set_threshold(0);
        bell.ring(1 << 20).expect("ring");
        assert_eq!(writes(&mut peer), 1);
    }

    #[test]
    fn a_doorbell_dropped_with_a_write_queued_writes_it_itself() {
        use crate::device::{Doorbell, UioDoorbell};
        // A pool whose only thread is held up: requests stay queued.
        let pool = BellPool::new(1, 1);
        let off = pool.handle();
        let (stuck, _stuck_peer) = pair();
        let (a, mut peer) = UnixStream::pair().expect("socketpair");
        let bell = UioDoorbell::new(File::from(std::os::fd::OwnedFd::from(a)))
            .with_offload(Some(off.clone()));
        // Fill the stuck bell's socket so its pool write blocks (the fd
        // shares its blocking mode with this dup: set back after).
        let fill = vec![0u8; 1 << 16];
        let s = UnixStream::from(std::os::fd::OwnedFd::from(
            stuck.file().try_clone().expect("dup"),
        ));
        s.set_nonblocking(true).expect("nonblocking");
        while (&s).write(&fill).is_ok() {}
        s.set_nonblocking(false).expect("blocking");
        assert!(off.queue(&stuck));
        std::thread::sleep(Duration::from_millis(50));
        bell.ring(1 << 20).expect("ring");
        drop(bell);
        assert_eq!(
            writes(&mut peer),
            1,
            "the dropped doorbell's last write is missing"
        );
    }

    #[test]
    fn a_failed_pool_write_reaches_the_device() {
        let pool = BellPool::new(1, 1);
        let off = pool.handle();
        let (bell, peer) = pair();
        drop(peer);
        assert!(off.queue(&bell));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let err = loop {
            if let Some(e) = bell.take_error() {
                break e;
            }
            assert!(std::time::Instant::now() < deadline, "no error came back");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }
}
