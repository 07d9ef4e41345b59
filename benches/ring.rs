//! 4K random read and write through emulator + ring + SCSI + ram backend
//! at queue depth 1, 32 and 128. `cargo bench --bench ring`; set
//! BENCH_SECONDS to change the run length (default 3 s per case),
//! BENCH_SPIN the worker's idle spin (default: the daemon's), and
//! BENCH_ONLY to run the cases whose `pattern/qd` name contains it
//! (e.g. `randread/32`).

use std::sync::Arc;
use std::time::Duration;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd::loadgen::{run, Job, Pattern};
use tcmu_rbd::scsi::LunInfo;

fn main() {
    let secs: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let spin: u32 = std::env::var("BENCH_SPIN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(tcmu_rbd::device::WorkerOptions::default().spin);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    println!("4K random I/O, emulated kernel + ring + SCSI + ram backend, {secs} s per case, worker spin {spin}");
    println!(
        "{:<10} {:>4} {:>12} {:>14} {:>10} {:>10} {:>7}",
        "pattern", "qd", "IOPS", "IOPS/core", "p50 us", "p99 us", "errors"
    );
    for pattern in [Pattern::RandRead, Pattern::RandWrite] {
        for qd in [1usize, 32, 128] {
            let name = format!("{pattern:?}/{qd}").to_lowercase();
            if !name.contains(&only) {
                continue;
            }
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
            };
            match run(ram, info, job) {
                Ok(r) => println!(
                    "{:<10} {:>4} {:>12.0} {:>14.0} {:>10.1} {:>10.1} {:>7}",
                    format!("{pattern:?}").to_lowercase(),
                    qd,
                    r.iops(),
                    r.iops_per_core(),
                    r.p50.as_secs_f64() * 1e6,
                    r.p99.as_secs_f64() * 1e6,
                    r.errors
                ),
                Err(e) => {
                    eprintln!("{pattern:?} qd {qd}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
