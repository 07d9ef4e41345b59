//! 4K random read and write through emulator + ring + SCSI + ram backend
//! at queue depth 1, 32 and 128. `cargo bench --bench ring`.
//!
//! IOPS per core is operations per second of the device worker's CPU time
//! (the daemon's only thread on this path; the emulated kernel runs on the
//! bench's own thread, as the real kernel runs on the initiator's cores, and
//! spins for completions, since the real kernel is never asleep when one
//! lands; the worker waits as the daemon does).
//! Each case runs BENCH_REPEAT times (default 3); the median run is shown
//! with the spread of IOPS per core, since a shared machine is noisy.
//!
//! Environment: BENCH_SECONDS per run (default 3), BENCH_REPEAT,
//! BENCH_SPIN the worker's idle spin (default: the daemon's), BENCH_ONLY to
//! run only the cases whose `pattern/qd` name contains it (`randread/32`).

use std::sync::Arc;
use std::time::Duration;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd::scsi::LunInfo;
use tcmu_rbd_testkit::loadgen::{run_with, Job, Pattern, Report};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn one(pattern: Pattern, qd: usize, secs: u64, spin: u32) -> Report {
    let ram: Arc<dyn Backend> =
        Arc::new(RamBackend::with_options(256 << 20, 512, true).expect("ram"));
    let info = LunInfo {
        vendor: "LIO-ORG".into(),
        product: "TCMU device".into(),
        revision: "0002".into(),
        serial: "bench".into(),
        geometry: ram.geometry(),
        caps: ram.caps(),
        max_transfer_blocks: 2048,
    };
    let job = Job {
        pattern,
        block_size: 4096,
        queue_depth: qd,
        duration: Duration::from_secs(secs),
        spin,
        data_area: None,
        max_transfer: None,
    };
    // The emulated kernel answers at once, as the real one does.
    match run_with(ram, info, job, Some(Duration::from_millis(1))) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{pattern:?} qd {qd}: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let secs: u64 = env("BENCH_SECONDS", 3);
    let repeat: usize = env("BENCH_REPEAT", 3usize).max(1);
    let spin: u32 = env(
        "BENCH_SPIN",
        tcmu_rbd::device::WorkerOptions::default().spin,
    );
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    println!(
        "4K random I/O, emulated kernel + ring + SCSI + ram backend, \
         {repeat} x {secs} s per case (median run shown), worker spin {spin}"
    );
    println!(
        "{:<10} {:>4} {:>10} {:>11} {:>21} {:>8} {:>8} {:>6}",
        "pattern", "qd", "IOPS", "IOPS/core", "IOPS/core min..max", "p50 us", "p99 us", "errors"
    );
    for pattern in [Pattern::RandRead, Pattern::RandWrite] {
        for qd in [1usize, 32, 128] {
            let name = format!("{pattern:?}/{qd}").to_lowercase();
            if !name.contains(&only) {
                continue;
            }
            let mut runs: Vec<Report> = (0..repeat).map(|_| one(pattern, qd, secs, spin)).collect();
            runs.sort_by(|a, b| a.iops_per_core().total_cmp(&b.iops_per_core()));
            let (lo, hi) = (runs[0].iops_per_core(), runs[repeat - 1].iops_per_core());
            let errors: u64 = runs.iter().map(|r| r.errors).sum();
            let r = &runs[repeat / 2];
            println!(
                "{:<10} {:>4} {:>10.0} {:>11.0} {:>21} {:>8.1} {:>8.1} {:>6}",
                format!("{pattern:?}").to_lowercase(),
                qd,
                r.iops(),
                r.iops_per_core(),
                format!("{lo:.0}..{hi:.0}"),
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                errors
            );
        }
    }
}
