//! Timer slack for librados' and librbd's housekeeping threads: what
//! keeps hundreds of idle images from costing a core's percent.
//!
//! librbd ticks each open image's six QoS token buckets once a second even
//! when no limit is set (`TokenBucketThrottle::set_limit` with an average
//! of 0 still schedules a 1 s tick), all on its `safe_timer` thread: 768
//! wakeups a second for 128 images, spread evenly, about 0.9% of a core.
//! Linux lets a thread's timed sleeps end late by its timer slack
//! (`/proc/<tid>/timerslack_ns`); with 10 ms the timer thread wakes once
//! for every event due within 10 ms, and the messenger and Objecter timer
//! threads (`msgr-worker-*`, `ceph_timer`) likewise batch their ticks.
//! Only timed waits are affected: a thread woken by I/O or by a signalled
//! condition (a messenger's epoll, a completion) wakes at once, so the
//! data path does not see it; heartbeats and lock timeouts of seconds
//! fire up to the slack later.
//!
//! An image with a librbd QoS limit is the exception: its buckets tick
//! every `rbd_qos_schedule_tick_min` (50 ms) and add a fixed share per
//! tick, so late ticks would pace it below its limit. While any open image
//! has a limit, `safe_timer` threads keep the kernel's default slack.
//!
//! The slack is `librados_timer_slack_ms` in tcmu.conf (0: the kernel's
//! default). New librados threads appear when a client connects or an
//! image opens; [`settle`] runs after both.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tracing::{debug, warn};

/// The default slack.
pub const DEFAULT: Duration = Duration::from_millis(10);

static SLACK_NS: AtomicU64 = AtomicU64::new(DEFAULT.as_nanos() as u64);
static QOS_OPEN: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicBool = AtomicBool::new(false);
/// Thread id → the slack last written (0: the kernel's default).
static APPLIED: Mutex<Option<HashMap<u32, u64>>> = Mutex::new(None);

/// Sets the slack (`librados_timer_slack_ms`) and applies it to the
/// threads there are.
pub fn set(slack: Duration) {
    SLACK_NS.store(
        slack.as_nanos().min(u64::MAX as u128) as u64,
        Ordering::Relaxed,
    );
    settle();
}

/// The slack set.
pub fn get() -> Duration {
    Duration::from_nanos(SLACK_NS.load(Ordering::Relaxed))
}

/// Held while an image with a librbd QoS limit is open: `safe_timer`
/// threads then keep the kernel's default slack.
#[derive(Debug)]
pub struct QosImage(());

impl QosImage {
    /// Counts an open image that has a QoS limit.
    pub fn hold() -> QosImage {
        QOS_OPEN.fetch_add(1, Ordering::Relaxed);
        settle();
        QosImage(())
    }
}

impl Drop for QosImage {
    fn drop(&mut self) {
        QOS_OPEN.fetch_sub(1, Ordering::Relaxed);
        settle();
    }
}

/// Whether an image's effective librbd configuration sets a QoS limit
/// (`rbd_qos_*_limit` other than 0).
pub fn has_qos_limit(options: &[(String, String)]) -> bool {
    options.iter().any(|(n, v)| {
        n.starts_with("rbd_qos_") && n.ends_with("_limit") && v.trim() != "0" && !v.is_empty()
    })
}

/// Which of librados' threads get the slack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `safe_timer`: librbd's QoS ticks live here.
    SafeTimer,
    /// Messenger workers and the Objecter's timer.
    Other,
}

fn kind(comm: &str) -> Option<Kind> {
    match comm.trim_end() {
        "safe_timer" => Some(Kind::SafeTimer),
        "ceph_timer" => Some(Kind::Other),
        c if c.starts_with("msgr-worker-") => Some(Kind::Other),
        _ => None,
    }
}

/// The slack a thread of `kind` should have now.
fn wanted(kind: Kind, slack_ns: u64, qos_open: usize) -> u64 {
    match kind {
        Kind::SafeTimer if qos_open > 0 => 0,
        _ => slack_ns,
    }
}

/// Gives every librados timer and messenger thread of this process the
/// slack it should have. Threads already done are skipped by id; the
/// names of the others are read again (a new thread names itself when it
/// starts, so one seen too early is caught on the next pass).
pub fn settle() {
    if REFUSED.load(Ordering::Relaxed) {
        return;
    }
    let slack_ns = SLACK_NS.load(Ordering::Relaxed);
    let qos_open = QOS_OPEN.load(Ordering::Relaxed);
    let mut guard = APPLIED.lock().unwrap_or_else(|e| e.into_inner());
    let applied = guard.get_or_insert_with(HashMap::new);
    let mut live = HashSet::new();
    for (tid, comm) in threads() {
        live.insert(tid);
        let Some(k) = kind(&comm) else { continue };
        let want = wanted(k, slack_ns, qos_open);
        if applied.get(&tid) == Some(&want) || (want == 0 && !applied.contains_key(&tid)) {
            continue;
        }
        // /proc/<tid> is the thread itself; /proc/self/task/<tid> has no
        // timerslack_ns. Writing 0 restores the thread's default.
        match std::fs::write(format!("/proc/{tid}/timerslack_ns"), want.to_string()) {
            Ok(()) => {
                applied.insert(tid, want);
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                warn!("cannot set librados threads' timer slack (needs CAP_SYS_NICE): {e}; idle images cost more CPU");
                REFUSED.store(true, Ordering::Relaxed);
                return;
            }
            // The thread ended in between.
            Err(e) => debug!(tid, "timer slack not set: {e}"),
        }
    }
    applied.retain(|t, _| live.contains(t));
}

/// This process's threads: (id, name as `/proc` has it). A thread that
/// ends while it is read is left out.
fn threads() -> impl Iterator<Item = (u32, String)> {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|tid| {
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            Some((tid, comm))
        })
}

/// The slack of this process's threads named `comm`, as the kernel has
/// it (for tests and `tcmu-rbd-idle`).
pub fn slack_of(comm: &str) -> Vec<u64> {
    threads()
        .filter(|(_, c)| c.trim_end() == comm)
        .filter_map(|(tid, _)| {
            std::fs::read_to_string(format!("/proc/{tid}/timerslack_ns"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_qos_limit_is_any_nonzero_limit_option() {
        let none = opts(&[
            ("rbd_qos_iops_limit", "0"),
            ("rbd_qos_iops_burst", "500"),
            ("rbd_qos_schedule_tick_min", "50"),
            ("rbd_cache", "true"),
        ]);
        assert!(!has_qos_limit(&none), "bursts and ticks are not limits");
        let one = opts(&[
            ("rbd_qos_iops_limit", "0"),
            ("rbd_qos_write_bps_limit", "1048576"),
        ]);
        assert!(has_qos_limit(&one));
    }

    #[test]
    fn timers_and_messengers_get_it_other_threads_do_not() {
        assert_eq!(kind("safe_timer\n"), Some(Kind::SafeTimer));
        assert_eq!(kind("ceph_timer\n"), Some(Kind::Other));
        assert_eq!(kind("msgr-worker-0\n"), Some(Kind::Other));
        assert_eq!(kind("tcmu-failover\n"), None);
        assert_eq!(kind("io_context_pool\n"), None);
        assert_eq!(kind("fn_anonymous\n"), None);
    }

    #[test]
    fn a_qos_image_keeps_only_the_timer_threads_at_the_default() {
        assert_eq!(wanted(Kind::SafeTimer, 10_000_000, 0), 10_000_000);
        assert_eq!(wanted(Kind::SafeTimer, 10_000_000, 1), 0);
        assert_eq!(wanted(Kind::Other, 10_000_000, 1), 10_000_000);
    }

    #[test]
    fn settle_sets_a_named_thread_and_restores_it() {
        // A thread named as librados names its timers, parked until told.
        // (A thread names itself when it starts: wait for that.)
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("safe_timer".into())
            .spawn(move || {
                let _ = up_tx.send(());
                let _ = rx.recv();
            })
            .expect("spawn");
        up_rx.recv().expect("thread started");
        let before = slack_of("safe_timer");
        assert_eq!(before.len(), 1, "one thread named safe_timer");
        set(Duration::from_millis(7));
        assert_eq!(slack_of("safe_timer"), vec![7_000_000]);
        {
            let _qos = QosImage::hold();
            assert_eq!(
                slack_of("safe_timer"),
                before,
                "the default while a QoS image is open"
            );
        }
        assert_eq!(slack_of("safe_timer"), vec![7_000_000]);
        set(Duration::ZERO);
        assert_eq!(slack_of("safe_timer"), before);
        set(DEFAULT);
        drop(tx);
        let _ = t.join();
    }
}
