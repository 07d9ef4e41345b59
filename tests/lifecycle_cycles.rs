//! A gateway creates and removes LUNs for months: 1,000 create/remove
//! cycles through the registry must leave no fd, thread or memory behind.
//! Each cycle serves a ram LUN, a file LUN and an HA LUN (the failover
//! manager over a lock that is never taken) through the emulated kernel,
//! does I/O on each, and removes all three.
//!
//! `CYCLES` (env `TCMU_CYCLES`, default 1,000) and the figures the test
//! prints (fds, threads, RSS at a quarter, at five eighths and at the end)
//! are what the README's scale section quotes.

mod common;

use common::{emu_device, idle_ha_device, run_cmd, rw16, small_layout};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::Backend;
use tcmu_rbd::registry::{DeviceSpec, Registry};
use tcmu_rbd_testkit::emulator::{Data, KernelEmu};
use tcmu_rbd_testkit::procself;

const MIB: u64 = 1 << 20;
/// RSS the process may gain in each of two equal stretches of cycles
/// (from a quarter of the way to five eighths, and from there to the
/// end). Each cycle maps two 8 MiB rings: leaking either grows both
/// stretches by far more. A leak grows both; a one-time warm-up (a malloc
/// arena that a busy host's contention makes glibc create late: +5 MiB
/// once between cycles 50 and 500, flat after, in a CI run beside other
/// builds) grows one.
const RSS_MARGIN_KIB: u64 = 1024;
/// Heap bytes in use (malloc's own count, every arena) the process may
/// gain over the last 3/8 of the cycles. Exact where RSS moves by pages
/// and jumps with the allocator: a leak of 4 KiB a cycle put in for a try
/// showed as +1,496 KiB here (and +1.5 MiB of RSS in each stretch).
const HEAP_MARGIN: u64 = 256 << 10;

fn spec(name: &str, subtype: &str) -> DeviceSpec {
    DeviceSpec {
        name: name.into(),
        uio_path: PathBuf::from("/dev/null"),
        map_size: 0,
        subtype: subtype.into(),
        cfgstring: String::new(),
        configfs_dir: None,
        size: Some(MIB),
    }
}

/// One write and its read back through the emulated kernel.
fn io(emu: &mut KernelEmu, seed: u8) {
    let data = vec![seed; 4096];
    let (st, _, _) = run_cmd(emu, &rw16(true, 8, 8), Data::ToDevice(&data));
    assert_eq!(st, 0, "write status");
    let (st, _, got) = run_cmd(emu, &rw16(false, 8, 8), Data::FromDevice(4096));
    assert_eq!(st, 0, "read status");
    assert_eq!(got, data, "read back");
}

#[test]
fn a_thousand_create_remove_cycles_leak_nothing() {
    let cycles: usize = std::env::var("TCMU_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Arc::new(Registry::new());
    let mut at_warm = None;
    let mut rss_mid = None;
    let (warm_at, mid_at) = (cycles / 4, cycles * 5 / 8);
    let t0 = Instant::now();
    for c in 0..cycles {
        let ram: Arc<dyn Backend> =
            Arc::new(tcmu_handler::ram::RamBackend::new(MIB, 512).expect("ram"));
        let (mut emu_ram, dev) = emu_device(small_layout(), ram);
        reg.adopt(spec("ram0", "ram"), dev).expect("adopt ram");
        let path = dir.path().join("lun.img");
        let file: Arc<dyn Backend> = Arc::new(
            tcmu_handler::file::FileBackend::open(&path, Some(MIB), 512, 2).expect("file"),
        );
        let (mut emu_file, dev) = emu_device(small_layout(), file);
        reg.adopt(spec("file0", "file"), dev).expect("adopt file");
        let (emu_ha, dev, fo) = idle_ha_device("ha0");
        reg.adopt_ha(spec("ha0", "rbd"), dev, fo).expect("adopt ha");
        io(&mut emu_ram, c as u8);
        io(&mut emu_file, c as u8);
        assert_eq!(reg.names().len(), 3);
        for n in ["ram0", "file0", "ha0"] {
            assert!(reg.remove(n), "{n} removed");
        }
        drop((emu_ram, emu_file, emu_ha));
        if (c + 1) % 500 == 0 {
            println!(
                "cycle {}: fds {} threads {} RSS {} KiB",
                c + 1,
                procself::fds(),
                procself::threads(),
                procself::rss_trimmed_kib()
            );
        }
        if c + 1 == warm_at.max(1) {
            // Warm: allocator arenas, the failover pool, lazy statics.
            at_warm = Some((
                procself::fds(),
                procself::threads(),
                procself::rss_trimmed_kib(),
            ));
        }
        if c + 1 == mid_at.max(1) {
            rss_mid = Some((procself::rss_trimmed_kib(), procself::heap_in_use()));
        }
    }
    // The failover manager stops in the background after a removal, and
    // idle pool workers leave after 30 s: wait for the threads to settle
    // to what they were at the warm point (or fewer).
    let (fds_w, threads_w, rss_w) = at_warm.unwrap_or((procself::fds(), 0, 0));
    let (rss_m, heap_m) = rss_mid.unwrap_or((rss_w, procself::heap_in_use()));
    let settle = Instant::now();
    while procself::threads() > threads_w && settle.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The last removals' rings are unmapped by their background stops.
    while procself::rss_trimmed_kib() > rss_m + RSS_MARGIN_KIB
        && settle.elapsed() < Duration::from_secs(50)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The background stops of the last removals free their tables too.
    while procself::heap_in_use() > heap_m + HEAP_MARGIN
        && settle.elapsed() < Duration::from_secs(55)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (fds_e, threads_e, rss_e, heap_e) = (
        procself::fds(),
        procself::threads(),
        procself::rss_trimmed_kib(),
        procself::heap_in_use(),
    );
    println!(
        "CYCLES {cycles} in {:.1} s: fds {fds_w} -> {fds_e}, threads {threads_w} -> {threads_e}, \
         RSS {rss_w} -> {rss_m} -> {rss_e} KiB (cycle {warm_at} -> {mid_at} -> end), \
         heap in use {} -> {} KiB (cycle {mid_at} -> end)",
        t0.elapsed().as_secs_f64(),
        heap_m >> 10,
        heap_e >> 10
    );
    assert!(reg.names().is_empty());
    assert!(fds_e <= fds_w, "fds grew: {fds_w} -> {fds_e}");
    assert!(
        threads_e <= threads_w,
        "threads grew: {threads_w} -> {threads_e}"
    );
    assert!(
        heap_e <= heap_m + HEAP_MARGIN,
        "heap in use grew by {} KiB over cycles {mid_at}..{cycles}",
        heap_e.saturating_sub(heap_m) >> 10
    );
    let (grew1, grew2) = (rss_m.saturating_sub(rss_w), rss_e.saturating_sub(rss_m));
    assert!(
        grew1 <= RSS_MARGIN_KIB || grew2 <= RSS_MARGIN_KIB,
        "RSS grew in both stretches, as a leak does: {grew1} KiB over cycles {warm_at}..{mid_at}, \
         {grew2} KiB over {mid_at}..{cycles}"
    );
}
