//! What idle LUNs cost the daemon, on a real core: serves `--rbd` HA rbd
//! LUNs (half of them holding their image's lock, as the owner gateway's
//! do; half not), `--file` file LUNs and `--ram` ram LUNs through the
//! emulated kernel in one process, exactly as the daemon's registry
//! serves them (ring worker, failover manager, service-map entry), then
//! measures the process's CPU over `--seconds` with every LUN idle, and
//! which threads spent it. The kernel's side of an idle LUN costs nothing,
//! so this is the daemon's idle cost without the emulation a VM adds.
//!
//! Needs the micro cluster's environment (`scripts/ceph-cluster.sh env`).
//!
//! tcmu-rbd-idle [--rbd N] [--file N] [--ram N] [--seconds S] [--service-map on|off]
//!               [--timer-slack-ms N]
//!
//! `--timer-slack-ms` is tcmu.conf's `librados_timer_slack_ms` (default
//! 10; 0 measures without it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::Backend;
use tcmu_rbd::device::{Device, EventDoorbell};
use tcmu_rbd::failover::{open_rbd, FailoverOptions, RbdDevice};
use tcmu_rbd::registry::{DeviceSpec, Registry};
use tcmu_rbd::scsi::alua::SharedAlua;
use tcmu_rbd_testkit::cluster::TestImage;
use tcmu_rbd_testkit::direct::{pattern, Direct};
use tcmu_rbd_testkit::emulator::{KernelEmu, Layout};
use tcmu_rbd_testkit::loadgen::daemon_lun_info;
use tcmu_rbd_testkit::procself;

const SIZE: u64 = 64 << 20;

fn usage() -> ! {
    eprintln!(
        "usage: tcmu-rbd-idle [--rbd N] [--file N] [--ram N] [--seconds S] [--service-map on|off] \
         [--timer-slack-ms N]"
    );
    std::process::exit(2)
}

fn spec(name: &str, subtype: &str) -> DeviceSpec {
    DeviceSpec {
        name: name.into(),
        uio_path: "/dev/null".into(),
        map_size: 0,
        subtype: subtype.into(),
        cfgstring: String::new(),
        configfs_dir: None,
        size: Some(SIZE),
    }
}

/// The device over an emulated kernel with the daemon's default layout.
fn device(name: &str, subtype: &str, backend: Arc<dyn Backend>) -> (KernelEmu, Device) {
    let emu = KernelEmu::with_layout(Layout::default()).unwrap_or_else(|e| die(&e.to_string()));
    let ue = emu.user_end().unwrap_or_else(|e| die(&e.to_string()));
    let mem = ue.map().unwrap_or_else(|e| die(&e.to_string()));
    let info = daemon_lun_info(subtype, "", SIZE, &*backend);
    let dev = Device::new(
        name,
        mem,
        Box::new(EventDoorbell::new(ue.to_user, ue.from_user)),
        backend,
        info,
    )
    .unwrap_or_else(|e| die(&e.to_string()));
    (emu, dev)
}

fn die(msg: &str) -> ! {
    eprintln!("tcmu-rbd-idle: {msg}");
    std::process::exit(1)
}

/// (name, utime+stime ticks) of every thread, digits at the end of the
/// name dropped.
fn thread_ticks() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[l + 1..r].trim_end_matches(|c: char| c.is_ascii_digit());
        let f: Vec<&str> = stat[r + 2..].split_whitespace().collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.push((name.to_string(), t(11) + t(12)));
    }
    out
}

fn main() {
    let (mut n_rbd, mut n_file, mut n_ram, mut secs, mut svc) =
        (128usize, 64usize, 64usize, 30u64, true);
    let mut slack_ms = tcmu_handler::rbd::slack::DEFAULT.as_millis() as u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--rbd" => n_rbd = val().parse().unwrap_or_else(|_| usage()),
            "--file" => n_file = val().parse().unwrap_or_else(|_| usage()),
            "--ram" => n_ram = val().parse().unwrap_or_else(|_| usage()),
            "--seconds" => secs = val().parse().unwrap_or_else(|_| usage()),
            "--service-map" => svc = val() == "on",
            "--timer-slack-ms" => slack_ms = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    tcmu_handler::rbd::service::set_enabled(svc);
    tcmu_handler::rbd::slack::set(Duration::from_millis(slack_ms));
    let reg = Registry::new();
    let dir = tempfile::tempdir().unwrap_or_else(|e| die(&e.to_string()));
    let mut emus = Vec::new();
    let t0 = Instant::now();
    // The images, eight `rbd create` at a time.
    let mut images = Vec::new();
    for chunk in (0..n_rbd).collect::<Vec<_>>().chunks(8) {
        let made: Vec<TestImage> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|i| s.spawn(move || TestImage::new(&format!("idle{i:03}"), SIZE)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| die("rbd create failed")))
                .collect()
        });
        images.extend(made);
    }
    eprintln!("{n_rbd} images made in {:.1} s", t0.elapsed().as_secs_f64());
    let t1 = Instant::now();
    let cpu_open0 = tcmu_rbd_testkit::procself::process_cpu();
    for (i, img) in images.iter().enumerate() {
        let name = format!("rbd{i:03}");
        let ha = match open_rbd(
            &name,
            &img.cfg(""),
            SIZE,
            512,
            SharedAlua::off(),
            FailoverOptions::default(),
        ) {
            Ok(RbdDevice::Ha(ha)) => ha,
            Ok(RbdDevice::Plain(_)) => die("an image without exclusive-lock"),
            Err(e) => die(&format!("open {name}: {e}")),
        };
        // Half are owners: one write takes the lock (ALUA off).
        if i % 2 == 0 {
            Direct::new(ha.backend.clone())
                .write(0, &pattern(i as u64, 4096))
                .unwrap_or_else(|e| die(&format!("write {name}: {e}")));
        }
        let (emu, dev) = device(&name, "rbd", ha.backend.clone());
        reg.adopt_ha(spec(&name, "rbd"), dev, ha.failover)
            .unwrap_or_else(|e| die(&e.to_string()));
        emus.push(emu);
    }
    for i in 0..n_file {
        let name = format!("file{i:03}");
        // The daemon's shared file I/O pool, as backends::open uses it.
        let pool = tcmu_rbd::backends::file_pool().unwrap_or_else(|e| die(&e.to_string()));
        let b: Arc<dyn Backend> = Arc::new(
            tcmu_handler::file::FileBackend::open_in(
                &dir.path().join(&name),
                Some(SIZE),
                512,
                pool,
            )
            .unwrap_or_else(|e| die(&e.to_string())),
        );
        let (emu, dev) = device(&name, "file", b);
        reg.adopt(spec(&name, "file"), dev)
            .unwrap_or_else(|e| die(&e.to_string()));
        emus.push(emu);
    }
    for i in 0..n_ram {
        let name = format!("ram{i:03}");
        let b: Arc<dyn Backend> = Arc::new(
            tcmu_handler::ram::RamBackend::new(SIZE, 512).unwrap_or_else(|e| die(&e.to_string())),
        );
        let (emu, dev) = device(&name, "ram", b);
        reg.adopt(spec(&name, "ram"), dev)
            .unwrap_or_else(|e| die(&e.to_string()));
        emus.push(emu);
    }
    eprintln!(
        "{} LUNs served in {:.1} s; settling 10 s",
        reg.names().len(),
        t1.elapsed().as_secs_f64()
    );
    // Let the opens' own work (service-map registration, first lock
    // views) finish before measuring.
    std::thread::sleep(Duration::from_secs(10));
    // What a restart's first seconds cost on the CPU: the opens and the
    // work they start (first lock views, group reads, service-map
    // registration). Under emulation that CPU is what bounds a restart.
    eprintln!(
        "CPU from the first open to the end of the settle: {:.2} s",
        (tcmu_rbd_testkit::procself::process_cpu() - cpu_open0).as_secs_f64()
    );
    let before = thread_ticks();
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let after = thread_ticks();
    let wall = w0.elapsed().as_secs_f64();
    // SAFETY: sysconf reads a constant of the system.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    let mut by_name: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for (n, t) in &after {
        let e = by_name.entry(n.clone()).or_default();
        e.0 += t;
        e.1 += 1;
    }
    for (n, t) in &before {
        if let Some(e) = by_name.get_mut(n) {
            e.0 = e.0.saturating_sub(*t);
        }
    }
    let total: u64 = by_name.values().map(|v| v.0).sum();
    println!(
        "IDLE rbd={n_rbd} (half owners) file={n_file} ram={n_ram} service_map={} \
         timer_slack={slack_ms}ms: CPU {:.2}% of one core over {wall:.1} s; threads {}, RSS {} MiB, fds {}",
        if svc { "on" } else { "off" },
        100.0 * total as f64 / hz / wall,
        procself::threads(),
        procself::status("VmRSS:") / 1024,
        procself::fds(),
    );
    // What the kernel has, so a run shows the slack took.
    let mut timers: BTreeMap<u64, usize> = BTreeMap::new();
    for ns in tcmu_handler::rbd::slack::slack_of("safe_timer") {
        *timers.entry(ns).or_default() += 1;
    }
    println!("  safe_timer threads by timer slack (ns: threads): {timers:?}");
    let mut rows: Vec<_> = by_name.into_iter().filter(|(_, v)| v.0 > 0).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    for (n, (t, count)) in rows.iter().take(12) {
        println!(
            "  {:>6.2}%  {n} ({count} threads)",
            100.0 * *t as f64 / hz / wall
        );
    }
    for n in reg.names() {
        reg.remove(&n);
    }
    drop(emus);
}
