//! A latency histogram cheap enough for every command: fixed log2
//! buckets of atomics, written by one thread (the device's worker) with
//! plain loads and stores, read by any.

use std::sync::atomic::{AtomicU64, Ordering};

/// Number of buckets: bucket `i < BUCKETS - 1` counts latencies of at most
/// 2^i µs (1 µs .. 2^25 µs ≈ 33.5 s); the last one counts the rest (+Inf).
pub const BUCKETS: usize = 27;

/// Adds `n` to a counter only one thread writes: a plain load and store
/// (no locked instruction) suffices.
#[inline]
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Upper bound of bucket `i`, seconds (`f64::INFINITY` for the last).
pub fn upper_bound_secs(i: usize) -> f64 {
    if i + 1 >= BUCKETS {
        f64::INFINITY
    } else {
        (1u64 << i) as f64 / 1e6
    }
}

/// The bucket of a latency of `ns` nanoseconds.
#[inline]
pub fn bucket_of(ns: u64) -> usize {
    // Whole microseconds, rounded up: bucket i holds (2^(i-1), 2^i] µs.
    let us = ns.div_ceil(1000);
    if us <= 1 {
        return 0;
    }
    let i = (64 - (us - 1).leading_zeros()) as usize;
    i.min(BUCKETS - 1)
}

/// Latencies in log2 buckets, with their sum.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one latency. Only one thread may record into a histogram
    /// (the counts are bumped with a load and a store, not a locked add).
    #[inline]
    pub fn record(&self, ns: u64) {
        add(&self.buckets[bucket_of(ns)], 1);
        add(&self.sum_ns, ns);
    }

    /// The counts now.
    pub fn snapshot(&self) -> HistSnapshot {
        HistSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistSnapshot {
    /// Count per bucket (not cumulative).
    pub buckets: [u64; BUCKETS],
    /// Sum of the latencies recorded, ns.
    pub sum_ns: u64,
}

impl Default for HistSnapshot {
    fn default() -> Self {
        HistSnapshot {
            buckets: [0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl HistSnapshot {
    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, b| a.wrapping_add(*b))
    }

    /// What was recorded between `earlier` and this snapshot.
    pub fn since(&self, earlier: &HistSnapshot) -> HistSnapshot {
        HistSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].wrapping_sub(earlier.buckets[i])),
            sum_ns: self.sum_ns.wrapping_sub(earlier.sum_ns),
        }
    }

    /// The `q` quantile (0..=1), as the upper bound of the bucket it falls
    /// in, seconds (a bucket's bound is at most twice the true value).
    /// None when nothing was recorded.
    pub fn quantile_secs(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the sample sought, 1-based, at least 1.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(upper_bound_secs(i));
            }
        }
        Some(f64::INFINITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1000), 0);
        assert_eq!(bucket_of(1001), 1);
        assert_eq!(bucket_of(2000), 1);
        assert_eq!(bucket_of(2001), 2);
        assert_eq!(bucket_of(1_000_000), 10); // 1 ms ≤ 2^10 µs
        assert_eq!(bucket_of(1_000_000_000), 20); // 1 s ≤ 2^20 µs
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for i in 0..BUCKETS - 1 {
            let ns = (upper_bound_secs(i) * 1e9).round() as u64;
            assert_eq!(bucket_of(ns), i, "upper bound of bucket {i} is in it");
            assert_eq!(bucket_of(ns + 1000), i + 1);
        }
    }

    #[test]
    fn quantiles_from_deltas() {
        let h = Histogram::default();
        let before = h.snapshot();
        assert_eq!(before.quantile_secs(0.5), None);
        for _ in 0..98 {
            h.record(3_000); // bucket ≤ 4 µs
        }
        h.record(900_000); // ≤ 1024 µs
        h.record(900_000);
        let d = h.snapshot().since(&before);
        assert_eq!(d.count(), 100);
        assert_eq!(d.sum_ns, 98 * 3_000 + 2 * 900_000);
        assert_eq!(d.quantile_secs(0.5), Some(4e-6));
        assert_eq!(d.quantile_secs(0.98), Some(4e-6));
        assert_eq!(d.quantile_secs(0.99), Some(1024e-6));
        // Only what came after counts.
        let mid = h.snapshot();
        h.record(50_000);
        let d = h.snapshot().since(&mid);
        assert_eq!((d.count(), d.quantile_secs(0.99)), (1, Some(64e-6)));
    }
}
