//! Operations straight on a backend, without the ring or the SCSI layer
//! (for what the SCSI layer does not decode, and for backend-level
//! checks), and deterministic test data.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::{Backend, CompletionQueue, IoBufs, IoResult, Op};

/// Runs operations straight on a backend (for what the SCSI layer does not
/// decode yet: UNMAP, WRITE SAME, COMPARE AND WRITE).
pub struct Direct {
    /// The backend under test.
    pub backend: Arc<dyn Backend>,
    /// Where its completions arrive.
    pub q: CompletionQueue,
    next: u64,
}

impl Direct {
    /// Drives `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Direct {
            backend,
            q: CompletionQueue::new().expect("completion queue"),
            next: 1,
        }
    }

    /// Submits `op` and waits for its result (at most `limit`).
    pub fn run_within(&mut self, op: Op, limit: Duration) -> IoResult {
        let tag = self.next;
        self.next += 1;
        self.backend.submit(op, self.q.done(tag));
        let t0 = Instant::now();
        loop {
            let left = limit
                .checked_sub(t0.elapsed())
                .unwrap_or_else(|| panic!("operation {tag} did not complete within {limit:?}"));
            if let Some(c) = self.q.recv_timeout(left) {
                assert_eq!(c.tag, tag, "a completion for another operation");
                return c.result;
            }
        }
    }

    /// Submits and waits up to a minute.
    pub fn run(&mut self, op: Op) -> IoResult {
        self.run_within(op, Duration::from_secs(60))
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> IoResult {
        self.run(Op::Write {
            offset,
            bufs: IoBufs::from_vec(data.to_vec()),
            fua: false,
        })
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, tcmu_handler::IoError> {
        let bufs = IoBufs::from_vec(vec![0xa5; len]);
        self.run(Op::Read {
            offset,
            bufs: bufs.clone(),
        })?;
        Ok(bufs.to_vec())
    }
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
