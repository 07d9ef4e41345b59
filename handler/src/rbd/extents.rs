//! Allocation queries (GET LBA STATUS) for rbd images.
//!
//! `rbd_diff_iterate2` is synchronous, and may wait on the OSDs, so it
//! runs neither on a ring worker (whose `submit` must not block) nor on
//! librbd's callback thread (which it would deadlock). One daemon-wide
//! thread runs the queries one after another, fed through a queue of
//! [`QUEUE_DEPTH`] entries; a query that finds the queue full fails at
//! once with [`IoError::Timeout`] (ABORTED COMMAND: the initiator
//! retries) instead of waiting for room.
//!
//! Granularity: whole objects (`whole_object = true`). With the
//! object-map and fast-diff features librbd then answers from the object
//! map alone, one extent per object that exists, with no OSD round trip
//! per object; without them it lists each object of the range on its OSD.
//! An object that exists is reported allocated as a whole, even where
//! part of it was discarded (zeroed, not removed): conservative, never
//! "deallocated" for data that is there.
//!
//! librbd's object-map path does not look at a clone's parent (as its
//! source reads; 16.2 did report parent data in a check, but that is not
//! relied on), so for a clone the range still backed by the parent (its
//! overlap) is reported allocated as a whole: coarse, never wrong.

use crate::{Done, ExtentSlot, IoError, IoResult};
use crossbeam_channel::{Sender, TrySendError};
use std::sync::OnceLock;

/// Queries waiting for the extents thread, daemon-wide.
pub const QUEUE_DEPTH: usize = 64;

/// One query: the work, and where its result goes.
struct Job {
    run: Box<dyn FnOnce() -> IoResult + Send>,
    done: Done,
}

/// The extents thread's queue, started on first use (None: it could not
/// be started; queries then fail).
fn queue() -> Option<&'static Sender<Job>> {
    static Q: OnceLock<Option<Sender<Job>>> = OnceLock::new();
    Q.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("rbd-extents".into())
            .spawn(move || {
                for job in rx {
                    let r = (job.run)();
                    job.done.complete(r);
                }
            })
            .map_err(|e| tracing::error!("cannot start the rbd extents thread: {e}"))
            .ok()
            .map(|_| tx)
    })
    .as_ref()
}

/// Runs `run` on the extents thread and completes `done` with its
/// result; never blocks.
pub(super) fn submit(run: Box<dyn FnOnce() -> IoResult + Send>, done: Done) {
    let Some(tx) = queue() else {
        done.complete(Err(IoError::errno(
            libc::EAGAIN,
            "the rbd extents thread could not be started",
        )));
        return;
    };
    match tx.try_send(Job { run, done }) {
        Ok(()) => {}
        // Transient: the initiator retries the command.
        Err(TrySendError::Full(job)) => job.done.complete(Err(IoError::Timeout)),
        Err(TrySendError::Disconnected(job)) => job.done.complete(Err(IoError::errno(
            libc::EIO,
            "the rbd extents thread is gone",
        ))),
    }
}

/// The allocated ranges of `[offset, offset + len)`: `extents` as librbd
/// reported them (any order, may overlap, may reach past the query),
/// plus `[0, parent_overlap)`, clipped, sorted and merged.
pub fn merge(
    offset: u64,
    len: u64,
    parent_overlap: u64,
    extents: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let end = offset.saturating_add(len);
    let mut v: Vec<(u64, u64)> = extents
        .iter()
        .copied()
        .chain(std::iter::once((0, parent_overlap)))
        .filter_map(|(o, l)| {
            let s = o.max(offset);
            let e = o.saturating_add(l).min(end);
            (s < e).then_some((s, e))
        })
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some((_, last_end)) if s <= *last_end => *last_end = (*last_end).max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Stores `ranges` in `out`.
pub(super) fn store(out: &ExtentSlot, ranges: Vec<(u64, u64)>) -> IoResult {
    *out.lock()
        .map_err(|_| IoError::errno(libc::EIO, "extent slot poisoned"))? = ranges;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn clips_sorts_and_merges() {
        let m = 4 << 20;
        // Objects 0, 1 and 3 exist; the query is [1 MiB, 14 MiB).
        let got = merge(1 << 20, 13 << 20, 0, &[(3 * m, m), (0, m), (m, m)]);
        assert_eq!(got, vec![(1 << 20, 7 << 20), (3 * m, 2 << 20)]);
        assert!(merge(0, 100, 0, &[]).is_empty());
        assert!(merge(0, 100, 0, &[(100, 5)]).is_empty());
    }

    #[test]
    fn parent_overlap_is_allocated() {
        assert_eq!(merge(0, 100, 40, &[(60, 10)]), vec![(0, 40), (60, 10)]);
        assert_eq!(merge(50, 50, 40, &[]), vec![]);
        assert_eq!(merge(0, 100, 1000, &[(60, 10)]), vec![(0, 100)]);
        // Touching ranges merge; no overflow at the top.
        assert_eq!(merge(0, 100, 40, &[(40, 10)]), vec![(0, 50)]);
        assert_eq!(
            merge(u64::MAX - 10, 10, 0, &[(u64::MAX - 5, 100)]),
            vec![(u64::MAX - 5, 5)]
        );
    }
}
