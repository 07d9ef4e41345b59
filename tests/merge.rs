//! Adjacent reads and writes taken off the ring together go to the
//! backend as one operation (`Backend::merge_limit`), and every command
//! of it completes with that operation's result: the data lands where
//! each command put it or asked for it, a failure fails each of them,
//! and nothing else is merged or reordered.

mod common;

use common::*;
use std::collections::HashMap;
use std::sync::Arc;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::{Backend, IoError, Op};
use tcmu_rbd::device::Device;
use tcmu_rbd_testkit::emulator::{Data, KernelEmu, Layout};

const BS: u64 = 512;

/// What reached the backend: read or write, byte offset, length.
type Seen = (bool, u64, usize);

/// Completes every operation `held` holds (`Held::merging` notes
/// nothing else): run on its ram disk, or failed with `fail` where it
/// names the operation's offset. Returns what reached the backend.
fn release(held: &Held, fail: &HashMap<u64, IoError>) -> Vec<Seen> {
    let ops = std::mem::take(&mut *held.held.lock().unwrap());
    let mut seen = Vec::new();
    for (op, done) in ops {
        let (write, offset, len) = match &op {
            Op::Read { offset, bufs } => (false, *offset, bufs.len()),
            Op::Write { offset, bufs, .. } => (true, *offset, bufs.len()),
            other => panic!("unexpected operation {other:?}"),
        };
        seen.push((write, offset, len));
        match fail.get(&offset) {
            Some(e) => done.complete(Err(e.clone())),
            None => held.inner.submit(op, done),
        }
    }
    seen
}

fn device(limit: usize) -> (KernelEmu, Device, Arc<Held>) {
    let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(16 << 20, BS as u32).expect("ram"));
    let rec = Held::merging(ram, limit);
    let layout = Layout {
        data_size: 32 << 20,
        ..Layout::default()
    };
    let (emu, dev) = emu_device(layout, rec.clone());
    (emu, dev, rec)
}

/// A distinct pattern for block `lba` onwards.
fn pattern(lba: u64, blocks: u32) -> Vec<u8> {
    (0..u64::from(blocks) * BS)
        .map(|i| ((lba * 7 + i / BS * 13 + i) % 251) as u8)
        .collect()
}

/// One command of a batch: write or read, first block, blocks.
type Cmd = (bool, u64, u32);

/// A command's outcome: status, sense key, data read.
type Outcome = (u8, Option<u8>, Vec<u8>);

/// Queues `cmds` as one batch, lets the device take them in one turn and
/// returns their ids; `turn()` only, so nothing completes yet.
fn queue_batch(emu: &mut KernelEmu, dev: &mut Device, cmds: &[Cmd]) -> Vec<u16> {
    let ids: Vec<u16> = cmds
        .iter()
        .map(|&(w, lba, blocks)| {
            if w {
                emu.queue(
                    &rw16(true, lba, blocks),
                    Data::ToDevice(&pattern(lba, blocks)),
                )
            } else {
                emu.queue(
                    &rw16(false, lba, blocks),
                    Data::FromDevice((u64::from(blocks) * BS) as usize),
                )
            }
            .expect("queue")
        })
        .collect();
    emu.kick();
    assert!(dev.turn().expect("turn"), "the device took the batch");
    ids
}

/// Collects completions after the backend finished: (status, sense key,
/// data) by command id.
fn reap_all(emu: &mut KernelEmu, dev: &mut Device, n: usize) -> HashMap<u16, Outcome> {
    let mut got = HashMap::new();
    for _ in 0..1000 {
        dev.turn().expect("turn");
        emu.reap(|r, bytes| {
            got.insert(
                r.cmd_id,
                (
                    r.status,
                    r.sense.as_ref().map(|s| s[2] & 0xf),
                    bytes.to_vec(),
                ),
            );
        })
        .expect("reap");
        if got.len() >= n {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(got.len(), n, "every command completed");
    got
}

/// Runs `cmds` as one batch: what the backend got, and each command's
/// (status, sense key, data) in `cmds`' order. Operations at the byte
/// offsets in `fail` fail with the given error.
fn batch(
    emu: &mut KernelEmu,
    dev: &mut Device,
    rec: &Held,
    cmds: &[Cmd],
    fail: &HashMap<u64, IoError>,
) -> (Vec<Seen>, Vec<Outcome>) {
    let ids = queue_batch(emu, dev, cmds);
    let seen = release(rec, fail);
    let mut got = reap_all(emu, dev, ids.len());
    let res = ids
        .iter()
        .map(|id| got.remove(id).expect("a completion per command"))
        .collect();
    (seen, res)
}

fn writes(first: u64, n: u64, blocks: u32) -> Vec<Cmd> {
    (0..n)
        .map(|i| (true, first + i * u64::from(blocks), blocks))
        .collect()
}

fn as_reads(cmds: &[Cmd]) -> Vec<Cmd> {
    cmds.iter().map(|&(_, l, b)| (false, l, b)).collect()
}

#[test]
fn a_split_large_write_and_read_reach_the_backend_as_one_operation_each() {
    let (mut emu, mut dev, rec) = device(4 << 20);
    let ok = HashMap::new();
    // A 1 MiB write as the block layer splits it at 64 KiB.
    let w = writes(8, 16, 128);
    let (seen, res) = batch(&mut emu, &mut dev, &rec, &w, &ok);
    assert_eq!(seen, vec![(true, 8 * BS, 1 << 20)], "one write for all 16");
    assert!(res.iter().all(|r| r.0 == 0), "every write GOOD: {res:?}");
    // Each command's data is where it was written: read one at a time
    // (a batch of one is never held back).
    for &c in &as_reads(&w) {
        let (seen, res) = batch(&mut emu, &mut dev, &rec, &[c], &ok);
        assert_eq!(seen.len(), 1);
        assert_eq!(res[0].0, 0);
        assert_eq!(res[0].2, pattern(c.1, c.2), "blocks {}+{}", c.1, c.2);
    }
    // The same range read back in one batch: one read, each command gets
    // its own part of it.
    let r = as_reads(&w);
    let (seen, res) = batch(&mut emu, &mut dev, &rec, &r, &ok);
    assert_eq!(seen, vec![(false, 8 * BS, 1 << 20)], "one read for all 16");
    for (c, got) in r.iter().zip(&res) {
        assert_eq!(got.0, 0);
        assert_eq!(got.2, pattern(c.1, c.2), "read of {}+{}", c.1, c.2);
    }
    use std::sync::atomic::Ordering::Relaxed;
    let stats = dev.stats();
    assert_eq!(stats.merged_ops.load(Relaxed), 2);
    assert_eq!(stats.merged_commands.load(Relaxed), 32);
}

#[test]
fn only_neighbours_in_ring_order_merge_within_the_limit() {
    let (mut emu, mut dev, rec) = device(256 << 10);
    let ok = HashMap::new();
    // 8 x 64 KiB contiguous under a 256 KiB limit: two operations.
    let (seen, res) = batch(&mut emu, &mut dev, &rec, &writes(0, 8, 128), &ok);
    assert_eq!(
        seen,
        vec![(true, 0, 256 << 10), (true, 256 << 10, 256 << 10)]
    );
    assert!(res.iter().all(|r| r.0 == 0));
    // Adjacent but in the other direction, out of order, or not touching:
    // nothing merges but the first two writes.
    let mixed: Vec<Cmd> = vec![
        (true, 2000, 8),
        (true, 2008, 8),  // follows: merged
        (false, 2016, 8), // a read after writes: alone
        (true, 3000, 8),  // elsewhere: alone
        (true, 2024, 8),  // continues 2016, but not its neighbour: alone
        (true, 2016, 8),  // precedes its ring neighbour: alone
        (false, 4000, 8),
        (false, 4009, 8), // a gap of one block: alone
    ];
    let (seen, res) = batch(&mut emu, &mut dev, &rec, &mixed, &ok);
    let b = |l: u64| l * BS;
    assert_eq!(
        seen,
        vec![
            (true, b(2000), 8192),
            (false, b(2016), 4096),
            (true, b(3000), 4096),
            (true, b(2024), 4096),
            (true, b(2016), 4096),
            (false, b(4000), 4096),
            (false, b(4009), 4096),
        ],
        "ring order kept, only the first two joined"
    );
    assert!(res.iter().all(|r| r.0 == 0), "{res:?}");
    // A backend that does not merge (the default) gets every command.
    let (mut emu, mut dev, rec) = device(0);
    let (seen, _) = batch(&mut emu, &mut dev, &rec, &writes(0, 16, 128), &ok);
    assert_eq!(seen.len(), 16);
}

#[test]
fn a_failed_merged_operation_fails_each_of_its_commands_and_no_other() {
    let (mut emu, mut dev, rec) = device(4 << 20);
    let mut fail = HashMap::new();
    fail.insert(
        0,
        IoError::Io {
            errno: libc::EIO,
            msg: "test".into(),
        },
    );
    // Writes 0..8 merge (and fail); the read at 1000 and the writes at
    // 2000.. are separate operations and succeed.
    let mut cmds = writes(0, 8, 16);
    cmds.push((false, 1000, 8));
    cmds.extend(writes(2000, 4, 16));
    let (seen, res) = batch(&mut emu, &mut dev, &rec, &cmds, &fail);
    assert_eq!(
        seen,
        vec![
            (true, 0, 8 * 16 * 512),
            (false, 1000 * BS, 4096),
            (true, 2000 * BS, 4 * 16 * 512)
        ]
    );
    for (i, r) in res.iter().enumerate() {
        if i < 8 {
            // CHECK CONDITION, MEDIUM ERROR (write error).
            assert_eq!((r.0, r.1), (2, Some(0x3)), "merged write {i}: {r:?}");
        } else {
            assert_eq!(r.0, 0, "command {i} outside the failed operation: {r:?}");
        }
    }
    // The failed range was not written; the other one was.
    let (_, res) = batch(
        &mut emu,
        &mut dev,
        &rec,
        &[(false, 0, 16), (false, 2000, 16)],
        &HashMap::new(),
    );
    assert_eq!(
        res[0].2,
        vec![0u8; 16 * 512],
        "nothing written where it failed"
    );
    assert_eq!(res[1].2, pattern(2000, 16));
    // And a timeout (as after osd_op_timeout) fails a merged read alike.
    let mut fail = HashMap::new();
    fail.insert(2000 * BS, IoError::Timeout);
    let (seen, res) = batch(
        &mut emu,
        &mut dev,
        &rec,
        &as_reads(&writes(2000, 4, 16)),
        &fail,
    );
    assert_eq!(seen.len(), 1);
    let first = res[0].clone();
    assert_eq!(first.0, 2);
    assert!(
        res.iter().all(|r| (r.0, r.1) == (first.0, first.1)),
        "{res:?}"
    );
}

#[test]
fn a_flush_in_a_batch_goes_out_after_the_writes_queued_before_it() {
    let (mut emu, mut dev, rec) = device(4 << 20);
    // Two adjacent writes, SYNCHRONIZE CACHE (10) for the whole LUN, one
    // more write that continues the first two: taken as one batch.
    let mut ids: Vec<u16> = writes(0, 2, 128)
        .iter()
        .map(|&(_, lba, blocks)| {
            emu.queue(
                &rw16(true, lba, blocks),
                Data::ToDevice(&pattern(lba, blocks)),
            )
            .expect("queue")
        })
        .collect();
    ids.push(
        emu.queue(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], Data::None)
            .expect("queue"),
    );
    ids.push(
        emu.queue(&rw16(true, 256, 128), Data::ToDevice(&pattern(256, 128)))
            .expect("queue"),
    );
    emu.kick();
    assert!(dev.turn().expect("turn"));
    let ops = std::mem::take(&mut *rec.held.lock().unwrap());
    let seen: Vec<(&str, u64, usize)> = ops
        .iter()
        .map(|(op, _)| match op {
            Op::Write { offset, bufs, .. } => ("write", *offset, bufs.len()),
            Op::Flush => ("flush", 0, 0),
            _ => ("other", 0, 0),
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("write", 0, 128 << 10),
            ("flush", 0, 0),
            ("write", 256 * BS, 64 << 10)
        ],
        "the writes before the flush reach the backend before it, merged; \
         the one after it does not join them"
    );
    for (op, done) in ops {
        rec.inner.submit(op, done);
    }
    let got = reap_all(&mut emu, &mut dev, ids.len());
    assert!(got.values().all(|r| r.0 == 0), "{got:?}");
}
