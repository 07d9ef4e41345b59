//! Drives a backend through the emulated kernel ring, the SCSI core and
//! the device worker, the way fio drives a LUN, and prints IOPS and
//! latency.
//!
//! tcmu-rbd-bench [--backend ram|file:PATH] [--size BYTES] [--rw randread|randwrite|read|write]
//!                [--bs BYTES] [--qd N] [--seconds N] [--spin N]

use std::sync::Arc;
use std::time::Duration;
use tcmu_rbd_testkit::loadgen::{daemon_lun_info, parse_size, run, Job, Pattern};

fn usage() -> ! {
    eprintln!(
        "usage: tcmu-rbd-bench [--backend ram|file:PATH] [--size BYTES] \
         [--rw randread|randwrite|read|write[,...]] [--bs BYTES] [--qd N[,N...]] [--seconds N] [--spin N]"
    );
    std::process::exit(2)
}

fn main() {
    let mut backend = "ram".to_string();
    let mut size: u64 = 1 << 30;
    let mut patterns = vec![Pattern::RandRead, Pattern::RandWrite];
    let mut bs = 4096usize;
    let mut qds = vec![1usize, 32];
    let mut secs = 5u64;
    let mut spin = 2000u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--backend" => backend = val(),
            "--size" => size = parse_size(&val()).unwrap_or_else(|| usage()),
            "--rw" => {
                patterns = val()
                    .split(',')
                    .map(|p| {
                        p.parse().unwrap_or_else(|e: String| {
                            eprintln!("{e}");
                            usage()
                        })
                    })
                    .collect()
            }
            "--bs" => bs = parse_size(&val()).unwrap_or_else(|| usage()) as usize,
            "--qd" => {
                qds = val()
                    .split(',')
                    .map(|q| q.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--seconds" => secs = val().parse().unwrap_or_else(|_| usage()),
            "--spin" => spin = val().parse().unwrap_or_else(|_| usage()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let (subtype, cfg) = match backend.split_once(':') {
        Some((s, c)) => (s.to_string(), c.to_string()),
        None => (backend.clone(), String::new()),
    };
    println!("backend {backend}, size {size}, bs {bs}, {secs} s per case");
    println!(
        "{:<10} {:>4} {:>12} {:>10} {:>10} {:>10} {:>7}",
        "pattern", "qd", "IOPS", "MiB/s", "p50 us", "p99 us", "errors"
    );
    for &pattern in &patterns {
        for &qd in &qds {
            let be = match tcmu_rbd::backends::open(&subtype, &cfg, size, 512) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("cannot open backend {backend}: {e}");
                    std::process::exit(1);
                }
            };
            let info = daemon_lun_info(&subtype, &cfg, size, &*be);
            let job = Job {
                pattern,
                block_size: bs,
                queue_depth: qd,
                duration: Duration::from_secs(secs),
                spin,
                data_area: None,
                max_transfer: None,
            };
            match run(Arc::clone(&be), info, job) {
                Ok(r) => println!(
                    "{:<10} {:>4} {:>12.0} {:>10.1} {:>10.1} {:>10.1} {:>7}",
                    format!("{pattern:?}").to_lowercase(),
                    qd,
                    r.iops(),
                    r.iops() * bs as f64 / (1 << 20) as f64,
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
