//! The device worker as the daemon runs it: on its own thread, stopped
//! with commands in flight (they are drained, not dropped), reconfigured
//! through its control channel.

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd_testkit::emulator::Data;

fn wait_reap(
    emu: &mut tcmu_rbd_testkit::emulator::KernelEmu,
    want: usize,
    secs: u64,
) -> Vec<(u16, u8)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while got.len() < want && Instant::now() < deadline {
        emu.reap(|r, _| got.push((r.cmd_id, r.status))).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    got
}

#[test]
fn stop_drains_commands_in_flight() {
    let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 512).unwrap());
    let held = Held::new(ram);
    let (mut emu, dev) = emu_device(small_layout(), held.clone());
    let stop = dev.stopper();
    let mut dev = dev;
    let worker = std::thread::spawn(move || dev.run());
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            emu.submit(&rw16(true, i, 1), Data::ToDevice(&[7u8; 512]))
                .unwrap(),
        );
    }
    // Wait until the worker has handed all ten to the backend.
    held.wait_len(10, 10);
    stop.stop();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!worker.is_finished(), "worker quit with commands in flight");
    // The backend finishes; the worker completes them all and returns.
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(1);
    held.release_random(&mut rng, 10);
    worker.join().unwrap().unwrap();
    let got = wait_reap(&mut emu, 10, 5);
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|&(_, s)| s == 0));
    assert_eq!(emu.in_flight(), 0);
}

#[test]
fn resize_through_the_control_channel() {
    let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 512).unwrap());
    let (mut emu, mut dev) = emu_device(small_layout(), ram);
    let stop = dev.stopper();
    // Block 2048 is past the end of a 1 MiB LUN.
    emu.submit(&rw16(false, 2048, 1), Data::FromDevice(512))
        .unwrap();
    dev.turn().unwrap();
    let mut r = Vec::new();
    emu.reap(|x, _| r.push(x.clone())).unwrap();
    assert_eq!(r[0].status, 2, "read past the end must fail");
    let worker = std::thread::spawn(move || dev.run());
    assert!(stop.control(Box::new(|d| d.resize(2 << 20))));
    std::thread::sleep(Duration::from_millis(50));
    // The first command after a resize may carry CAPACITY DATA HAS
    // CHANGED (unit attention); the read must then succeed.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        emu.submit(&rw16(false, 2048, 1), Data::FromDevice(512))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut done = None;
        while done.is_none() && Instant::now() < deadline {
            emu.reap(|x, _| done = Some(x.clone())).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let x = done.expect("read after resize never completed");
        statuses.push(x.status);
        if x.status == 0 {
            break;
        }
        let sense = x.sense.expect("sense with CHECK CONDITION");
        assert_eq!(
            sense[2] & 0xf,
            0x6,
            "only a unit attention may precede success"
        );
        assert_eq!((sense[12], sense[13]), (0x2a, 0x09));
    }
    stop.stop();
    worker.join().unwrap().unwrap();
    assert_eq!(
        statuses.last(),
        Some(&0),
        "read past the old end failed after resize: {statuses:?}"
    );
}

#[test]
fn idle_poll_follows_the_daemon_setting_live() {
    use std::sync::atomic::Ordering;
    use tcmu_rbd::device::{IdlePoll, WorkerOptions};
    let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 512).unwrap());
    let (mut emu, mut dev) = emu_device(small_layout(), ram);
    let live = IdlePoll::new(Duration::ZERO);
    dev.set_options(WorkerOptions {
        idle_poll: live.clone(),
        ..WorkerOptions::default()
    });
    let stats = dev.stats();
    let stop = dev.stopper();
    let worker = std::thread::spawn(move || dev.run());
    let sleeps = || stats.sleeps.load(Ordering::Relaxed);
    let wait_sleeps = |n: u64, within: Duration| {
        let deadline = Instant::now() + within;
        while sleeps() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        sleeps()
    };
    let tur = [0u8; 6];
    // 0: the worker sleeps as soon as it has nothing to do.
    assert!(wait_sleeps(1, Duration::from_secs(5)) >= 1, "never slept");
    // Counted before the command: the worker may already be back asleep
    // when the reap returns, and then sleeps only at its 10 s epoll net.
    let s0 = sleeps();
    emu.submit(&tur, Data::None).unwrap();
    assert_eq!(wait_reap(&mut emu, 1, 5).len(), 1);
    assert!(
        wait_sleeps(s0 + 1, Duration::from_secs(5)) > s0,
        "idle poll 0 but the worker did not sleep after answering"
    );
    // 400 ms, changed while the device runs: after answering, the worker
    // keeps polling (does not sleep) for that long, then sleeps.
    live.set(Duration::from_millis(400));
    emu.submit(&tur, Data::None).unwrap();
    assert_eq!(wait_reap(&mut emu, 1, 5).len(), 1);
    let s1 = sleeps();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(sleeps(), s1, "slept during a 400 ms idle poll");
    assert!(
        wait_sleeps(s1 + 1, Duration::from_secs(5)) > s1,
        "never slept after the idle poll ran out"
    );
    stop.stop();
    worker.join().unwrap().unwrap();
}
