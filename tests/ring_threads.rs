//! The shared ring threads: many devices on a few threads, none starved
//! by a busy neighbour, one stopping device not holding up the others, a
//! device whose step panics ending alone, and threads bounded whatever the
//! number of devices and ended with the pool.

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::completion::Done;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::{Backend, Caps, Geometry, IoResult, Op};
use tcmu_rbd::device::{IdlePoll, WorkerOptions};
use tcmu_rbd::ring_threads::RingThreads;
use tcmu_rbd_testkit::emulator::{Data, KernelEmu};

fn ram() -> Arc<dyn Backend> {
    Arc::new(RamBackend::new(1 << 20, 512).unwrap())
}

/// Submits `cdb` and waits up to `limit` for its status.
fn one(emu: &mut KernelEmu, cdb: &[u8], data: Data<'_>, limit: Duration) -> Option<u8> {
    let id = emu.submit(cdb, data).unwrap();
    emu.kick();
    let t0 = Instant::now();
    loop {
        let mut st = None;
        emu.reap(|r, _| {
            if r.cmd_id == id {
                st = Some(r.status);
            }
        })
        .unwrap();
        if st.is_some() {
            return st;
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn many_devices_on_two_threads_all_serve() {
    let pool = RingThreads::new(2);
    let mut devs = Vec::new();
    for _ in 0..48 {
        let (emu, dev) = emu_device(small_layout(), ram());
        let stop = dev.stopper();
        let served = pool.serve(dev).unwrap();
        devs.push((emu, stop, served));
    }
    assert_eq!(pool.threads(), 2, "48 devices on a pool of 2");
    assert_eq!(pool.alive().load(std::sync::atomic::Ordering::SeqCst), 2);
    // Every device answers, in any order, several times over.
    for round in 0..3u64 {
        for (i, (emu, _, _)) in devs.iter_mut().enumerate() {
            let st = one(
                emu,
                &rw16(true, round * 64 + i as u64, 1),
                Data::ToDevice(&[i as u8; 512]),
                Duration::from_secs(5),
            );
            assert_eq!(st, Some(0), "device {i} round {round}");
        }
    }
    for (_, stop, served) in devs {
        stop.stop();
        assert!(served.wait().is_some(), "a stopped device comes back");
    }
}

#[test]
fn a_busy_device_does_not_starve_its_neighbour() {
    // One thread: both devices share it.
    let pool = RingThreads::new(1);
    let (mut busy, d1) = emu_device(small_layout(), ram());
    let (mut quiet, d2) = emu_device(small_layout(), ram());
    // The busy one never parks: it polls its ring for an hour when idle.
    let mut d1 = d1;
    d1.set_options(WorkerOptions {
        idle_poll: IdlePoll::new(Duration::from_secs(3600)),
        ..WorkerOptions::default()
    });
    let (s1, s2) = (d1.stopper(), d2.stopper());
    let (w1, w2) = (pool.serve(d1).unwrap(), pool.serve(d2).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if one(
                    &mut busy,
                    &rw16(true, n % 2048, 1),
                    Data::ToDevice(&[1u8; 512]),
                    Duration::from_secs(5),
                ) != Some(0)
                {
                    return Err(format!("busy device: write {n} failed"));
                }
                n += 1;
            }
            Ok(n)
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut worst = Duration::ZERO;
    for i in 0..50 {
        let t0 = Instant::now();
        let st = one(
            &mut quiet,
            &rw16(false, i, 1),
            Data::FromDevice(512),
            Duration::from_secs(5),
        );
        assert_eq!(st, Some(0), "quiet device, read {i}");
        worst = worst.max(t0.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = hammer.join().unwrap().unwrap();
    eprintln!("busy device did {n} writes; quiet device's slowest read {worst:?}");
    assert!(n > 100, "the busy device did not run ({n} writes)");
    // Not a timing test: a starved device would wait for the busy one to
    // go idle (never, here) and fail the 5 s limit above.
    s1.stop();
    s2.stop();
    assert!(w1.wait().is_some() && w2.wait().is_some());
}

#[test]
fn a_draining_device_does_not_hold_up_the_others() {
    let pool = RingThreads::new(1);
    let held = Held::new(ram());
    let (mut slow, d1) = emu_device(small_layout(), held.clone());
    let (mut fast, d2) = emu_device(small_layout(), ram());
    let (s1, s2) = (d1.stopper(), d2.stopper());
    let (w1, w2) = (pool.serve(d1).unwrap(), pool.serve(d2).unwrap());
    // Two writes held in the backend, then a stop: the device drains.
    for i in 0..2 {
        slow.submit(&rw16(true, i, 1), Data::ToDevice(&[3u8; 512]))
            .unwrap();
    }
    slow.kick();
    held.wait_len(2, 5);
    s1.stop();
    // Meanwhile its neighbour on the same thread serves.
    for i in 0..20 {
        let st = one(
            &mut fast,
            &rw16(true, i, 1),
            Data::ToDevice(&[4u8; 512]),
            Duration::from_secs(5),
        );
        assert_eq!(st, Some(0), "neighbour write {i} while the other drains");
    }
    assert!(!w1.is_finished(), "stopped with writes in flight");
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(7);
    held.release_random(&mut rng, 2);
    assert!(w1.wait().is_some());
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < 2 && t0.elapsed() < Duration::from_secs(5) {
        slow.reap(|r, _| got.push(r.status)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got, vec![0, 0], "both held writes completed by the drain");
    s2.stop();
    assert!(w2.wait().is_some());
}

/// A backend whose every submission panics.
struct Panics(Arc<dyn Backend>);

impl Backend for Panics {
    fn name(&self) -> String {
        "panics".into()
    }
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn caps(&self) -> Caps {
        self.0.caps()
    }
    fn submit(&self, _op: Op, _done: Done) {
        panic!("backend bug");
    }
    fn try_inline(&self, op: Op) -> Result<IoResult, Op> {
        Err(op)
    }
}

#[test]
fn a_panicking_device_ends_alone() {
    let pool = RingThreads::new(1);
    let (mut bad, d1) = emu_device(small_layout(), Arc::new(Panics(ram())));
    let (mut good, d2) = emu_device(small_layout(), ram());
    let s2 = d2.stopper();
    let (w1, w2) = (pool.serve(d1).unwrap(), pool.serve(d2).unwrap());
    let _ = one(
        &mut bad,
        &rw16(true, 0, 1),
        Data::ToDevice(&[5u8; 512]),
        Duration::from_millis(300),
    );
    // The bad device ended and came back to be dropped.
    assert!(w1.wait().is_some());
    for i in 0..10 {
        let st = one(
            &mut good,
            &rw16(true, i, 1),
            Data::ToDevice(&[6u8; 512]),
            Duration::from_secs(5),
        );
        assert_eq!(st, Some(0), "the neighbour still serves (write {i})");
    }
    s2.stop();
    assert!(w2.wait().is_some());
}

#[test]
fn dropping_the_pool_ends_its_threads() {
    let pool = RingThreads::new(3);
    let alive = pool.alive();
    let mut stops = Vec::new();
    for _ in 0..3 {
        let (emu, dev) = emu_device(small_layout(), ram());
        stops.push((emu, dev.stopper(), pool.serve(dev).unwrap()));
    }
    assert_eq!(pool.threads(), 3);
    for (_, s, w) in stops {
        s.stop();
        assert!(w.wait().is_some());
    }
    assert_eq!(alive.load(std::sync::atomic::Ordering::SeqCst), 3);
    drop(pool);
    let t0 = Instant::now();
    while alive.load(std::sync::atomic::Ordering::SeqCst) > 0
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        alive.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "ring threads outlived the pool"
    );
}
