//! Data integrity through the emulated kernel, the ring, the SCSI core and
//! a backend: random commands of mixed sizes, ring wraps, out-of-order
//! completions, and every byte verified against a model of the disk.

mod common;

use common::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd_testkit::emulator::{Data, EmuError};

const BS: u64 = 512;

struct Inflight {
    write: bool,
    lba: u64,
    blocks: u32,
}

fn overlaps(a: (u64, u32), b: (u64, u32)) -> bool {
    a.0 < b.0 + u64::from(b.1) && b.0 < a.0 + u64::from(a.1)
}

/// Drives `ops` random commands; `release` decides how the backend
/// completes (None: inline; Some(held): random order, random batches).
/// With `chain`, half the commands start where the one queued before
/// ended (a split large I/O, a sequential stream): what merging joins.
fn run_random(
    seed: u64,
    ops: usize,
    disk_blocks: u64,
    backend: Arc<dyn Backend>,
    held: Option<Arc<Held>>,
    chain: bool,
) -> tcmu_rbd::device::Device {
    let ooo_expected = held.is_some();
    let mut rng = SmallRng::seed_from_u64(seed);
    let (mut emu, mut dev) = emu_device(small_layout(), backend);
    let mut model = vec![0u8; (disk_blocks * BS) as usize];
    let mut inflight: HashMap<u16, Inflight> = HashMap::new();
    let mut issued = 0usize;
    let mut completed = 0usize;
    let mut out_of_order = 0usize;
    let mut issue_seq: HashMap<u16, usize> = HashMap::new();
    let mut last_reaped_seq = 0usize;
    let mut prev_end = 0u64;
    while completed < ops {
        // Queue a burst of commands that do not overlap anything in flight.
        let burst = rng.gen_range(1..24);
        for _ in 0..burst {
            if issued >= ops {
                break;
            }
            let blocks = match rng.gen_range(0..10) {
                0 => rng.gen_range(64..257),
                1..=3 => rng.gen_range(9..64),
                _ => rng.gen_range(1..9),
            };
            let mut lba = rng.gen_range(0..disk_blocks - u64::from(blocks));
            if chain && rng.gen_bool(0.5) && prev_end + u64::from(blocks) <= disk_blocks {
                lba = prev_end;
            }
            if inflight
                .values()
                .any(|f| overlaps((f.lba, f.blocks), (lba, blocks)))
            {
                continue;
            }
            let write = rng.gen_bool(0.5);
            let len = (u64::from(blocks) * BS) as usize;
            let res = if write {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let r = emu.queue(&rw16(true, lba, blocks), Data::ToDevice(&data));
                if r.is_ok() {
                    model[(lba * BS) as usize..(lba * BS) as usize + len].copy_from_slice(&data);
                }
                r
            } else {
                emu.queue(&rw16(false, lba, blocks), Data::FromDevice(len))
            };
            match res {
                Ok(id) => {
                    prev_end = lba + u64::from(blocks);
                    issue_seq.insert(id, issued);
                    inflight.insert(id, Inflight { write, lba, blocks });
                    issued += 1;
                }
                Err(EmuError::Full) => break,
                Err(e) => panic!("emulator: {e}"),
            }
        }
        emu.kick();
        dev.turn().expect("device turn");
        if let Some(h) = &held {
            let n = rng.gen_range(0..=h.len());
            h.release_random(&mut rng, n);
        }
        dev.turn().expect("device turn");
        emu.reap(|r, data| {
            let f = inflight
                .remove(&r.cmd_id)
                .expect("reaped an id not in flight");
            let seq = issue_seq[&r.cmd_id];
            if seq < last_reaped_seq {
                out_of_order += 1;
            }
            last_reaped_seq = seq;
            assert_eq!(r.status, 0, "cmd {} failed: {:?}", r.cmd_id, r.sense);
            if !f.write {
                let lo = (f.lba * BS) as usize;
                let hi = lo + (u64::from(f.blocks) * BS) as usize;
                assert_eq!(data.len(), hi - lo);
                assert!(
                    data == &model[lo..hi],
                    "read of lba {} x{} returned wrong data",
                    f.lba,
                    f.blocks
                );
            }
            completed += 1;
        })
        .expect("reap");
    }
    assert!(inflight.is_empty());
    assert_eq!(emu.in_flight(), 0);
    assert!(emu.broken().is_none());
    assert!(
        emu.wraps() > 20,
        "the ring wrapped only {} times",
        emu.wraps()
    );
    assert!(emu.pads() > 5, "only {} PADs", emu.pads());
    if ooo_expected {
        assert!(
            out_of_order > ops / 10,
            "only {out_of_order} completions out of order"
        );
    }
    dev
}

#[test]
fn random_io_inline_completion() {
    let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(4096 * BS, BS as u32).unwrap());
    run_random(1, 60_000, 4096, ram, None, false);
}

#[test]
fn random_io_out_of_order_completion() {
    for seed in 0..4 {
        let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(4096 * BS, BS as u32).unwrap());
        let held = Held::new(ram);
        run_random(100 + seed, 40_000, 4096, held.clone(), Some(held), false);
    }
}

#[test]
fn random_io_merged_and_out_of_order() {
    // Half the commands continue the one before: the worker merges runs
    // of them (up to 64 KiB) into held operations, released in random
    // order; every byte is still checked against the model.
    for seed in 0..4 {
        let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(4096 * BS, BS as u32).unwrap());
        let held = Held::merging(ram, 64 << 10);
        let dev = run_random(200 + seed, 40_000, 4096, held.clone(), Some(held), true);
        let merged = dev
            .stats()
            .merged_commands
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            merged > 5_000,
            "seed {seed}: only {merged} of 40,000 commands were merged"
        );
    }
}

#[test]
fn random_io_file_backend_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun.img");
    let fb: Arc<dyn Backend> = Arc::new(
        tcmu_handler::file::FileBackend::open(&path, Some(2048 * BS), BS as u32, 4).unwrap(),
    );
    // The file backend completes from its own threads, in any order; run
    // the worker on a thread and drive the emulator here.
    let mut rng = SmallRng::seed_from_u64(7);
    let (mut emu, mut dev) = emu_device(small_layout(), fb);
    let stop = dev.stopper();
    let worker = std::thread::spawn(move || dev.run());
    let mut model = vec![0u8; (2048 * BS) as usize];
    let mut done = 0;
    for round in 0..400 {
        // Disjoint commands per round, then wait for all of them.
        let mut want: HashMap<u16, (bool, u64, u32)> = HashMap::new();
        let mut used: Vec<(u64, u32)> = Vec::new();
        for _ in 0..rng.gen_range(1..32) {
            let blocks = rng.gen_range(1..40u32);
            let lba = rng.gen_range(0..2048 - u64::from(blocks));
            if used.iter().any(|&u| overlaps(u, (lba, blocks))) {
                continue;
            }
            used.push((lba, blocks));
            let len = (u64::from(blocks) * BS) as usize;
            let write = rng.gen_bool(0.5);
            let id = if write {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                model[(lba * BS) as usize..(lba * BS) as usize + len].copy_from_slice(&data);
                emu.queue(&rw16(true, lba, blocks), Data::ToDevice(&data))
            } else {
                emu.queue(&rw16(false, lba, blocks), Data::FromDevice(len))
            }
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
            want.insert(id, (write, lba, blocks));
        }
        emu.kick();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !want.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "commands never completed"
            );
            let mut fds = [nix::poll::PollFd::new(
                emu.doorbell_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            emu.ack_doorbell();
            emu.reap(|r, data| {
                let (w, lba, blocks) = want.remove(&r.cmd_id).expect("unknown id reaped");
                assert_eq!(r.status, 0);
                if !w {
                    let lo = (lba * BS) as usize;
                    assert!(data == &model[lo..lo + (u64::from(blocks) * BS) as usize]);
                }
                done += 1;
            })
            .unwrap();
        }
    }
    stop.stop();
    worker.join().unwrap().unwrap();
    assert!(done > 1000);
    // What the initiator wrote is in the file.
    let on_disk = std::fs::read(&path).unwrap();
    assert!(
        on_disk == model,
        "file contents differ from what was written"
    );
}
