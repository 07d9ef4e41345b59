//! The path a result takes from whoever finished an operation back to the
//! ring worker.
//!
//! Completions go through a crossbeam channel. The worker sleeps in poll()
//! on the UIO fd and on an eventfd; a completer writes the eventfd only when
//! the worker said it is about to sleep, so a busy worker costs no syscalls
//! on this path.

use crate::IoResult;
use crossbeam_channel::{Receiver, Sender};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The tag given to [`CompletionQueue::done`].
    pub tag: u64,
    /// Its outcome.
    pub result: IoResult,
}

struct Waker {
    fd: OwnedFd,
    parked: AtomicBool,
}

impl Waker {
    fn wake(&self) {
        if self.parked.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // An eventfd write fails only when the counter would overflow,
            // and then the worker is awake anyway.
            let _ = nix::unistd::write(&self.fd, &one.to_ne_bytes());
        }
    }
}

/// The receiving end, owned by a ring worker.
pub struct CompletionQueue {
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
    waker: Arc<Waker>,
}

impl CompletionQueue {
    /// A new queue with its own eventfd.
    pub fn new() -> std::io::Result<Self> {
        let fd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .map_err(std::io::Error::from)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        Ok(CompletionQueue {
            tx,
            rx,
            waker: Arc::new(Waker {
                fd: fd.into(),
                parked: AtomicBool::new(false),
            }),
        })
    }

    /// A one-shot completer for the operation tagged `tag`.
    pub fn done(&self, tag: u64) -> Done {
        Done {
            tag,
            tx: self.tx.clone(),
            waker: self.waker.clone(),
            sent: false,
        }
    }

    /// Takes one finished operation, if any, without blocking.
    pub fn try_recv(&self) -> Option<Completion> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for one finished operation.
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Completion> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Call before sleeping on [`fd`](Self::fd): returns false if completions
    /// are already waiting (do not sleep then).
    pub fn park(&self) -> bool {
        self.waker.parked.store(true, Ordering::SeqCst);
        if !self.rx.is_empty() {
            self.waker.parked.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Call after waking (whatever woke the worker).
    pub fn unpark(&self) {
        self.waker.parked.store(false, Ordering::SeqCst);
    }

    /// Resets the eventfd; call when [`fd`](Self::fd) polled readable
    /// (reading it otherwise only costs a system call).
    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(self.waker.fd.as_raw_fd(), &mut buf);
    }

    /// The eventfd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.waker.fd.as_fd()
    }
}

/// Completes one operation, exactly once (consumed by [`complete`](Self::complete)).
/// Dropped without completing, it fails the operation (EIO) with a logged
/// error rather than leave its command to the kernel's timeout.
#[must_use = "complete() it, or its command is failed when it is dropped"]
pub struct Done {
    tag: u64,
    tx: Sender<Completion>,
    waker: Arc<Waker>,
    sent: bool,
}

impl Done {
    /// The operation's tag.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Reports the outcome and wakes the worker if it sleeps.
    pub fn complete(mut self, result: IoResult) {
        self.send(result);
    }

    fn send(&mut self, result: IoResult) {
        if self.sent {
            return;
        }
        self.sent = true;
        // The worker may be gone (device removed); nothing is owed then.
        let _ = self.tx.send(Completion {
            tag: self.tag,
            result,
        });
        self.waker.wake();
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if !self.sent {
            tracing::error!(
                tag = self.tag,
                "an operation was dropped without being completed: failing it"
            );
            self.send(Err(crate::IoError::Io {
                errno: libc::EIO,
                msg: "the backend dropped the operation without completing it".into(),
            }));
        }
    }
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done").field("tag", &self.tag).finish()
    }
}

#[cfg(test)]
mod drop_tests {
    use super::*;

    #[test]
    fn a_dropped_done_fails_its_operation_once() {
        let q = CompletionQueue::new().unwrap();
        drop(q.done(7));
        let c = q
            .try_recv()
            .expect("a completion for the dropped operation");
        assert_eq!(c.tag, 7);
        assert!(matches!(c.result, Err(crate::IoError::Io { errno, .. }) if errno == libc::EIO));
        q.done(8).complete(Ok(()));
        let c = q.try_recv().expect("completed");
        assert_eq!((c.tag, c.result), (8, Ok(())));
        assert!(q.try_recv().is_none(), "completed once, not again on drop");
    }
}
