//! A kernel ring that looks wrong is refused, not trusted; and nothing we
//! write can make the kernel see an id it does not know.

mod common;

use common::*;
use std::sync::Arc;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd::ring::abi::*;
use tcmu_rbd::ring::shm::SharedMem;
use tcmu_rbd::ring::{Completion, Entry, EntryFault, MailboxFault, Ring, RingError};
use tcmu_rbd_testkit::emulator::{Data, KernelEmu, Layout};

fn ram() -> Arc<dyn Backend> {
    Arc::new(RamBackend::new(1 << 20, 512).unwrap())
}

/// The emulator plus a Ring of our own over the same memory.
fn ring_over(emu: &KernelEmu) -> Ring {
    Ring::new(emu.user_end().unwrap().map().unwrap()).unwrap()
}

fn small() -> Layout {
    Layout {
        cmdr_size: 8192,
        data_size: 1 << 20,
        ..Layout::default()
    }
}

fn first_entry() -> usize {
    MB_SIZE
}

/// Queues a READ(10) of one block, corrupts it with `f`, and checks that
/// the ring refuses it, stays refused, and wrote nothing back.
fn refused(what: &str, f: impl FnOnce(&SharedMem)) -> RingError {
    let mut emu = KernelEmu::with_layout(small()).unwrap();
    let mut ring = ring_over(&emu);
    emu.submit(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], Data::FromDevice(512))
        .unwrap();
    f(emu.mem());
    let mut out = Vec::new();
    let err = ring.poll(&mut out).expect_err(what);
    assert!(out.is_empty(), "{what}: an entry was handed out");
    assert_eq!(ring.poll(&mut out).expect_err("stays broken"), err);
    assert!(!ring.publish().unwrap_or(false), "{what}: tail moved");
    assert_eq!(emu.mem().read_u32(MB_CMD_TAIL).unwrap(), 0);
    err
}

/// Asserts that a refused entry was refused for the fault `pat`.
macro_rules! fault {
    ($err:expr, $pat:pat) => {{
        let err = $err;
        assert!(
            matches!(
                &err,
                RingError::BadEntry {
                    offset: 0,
                    fault: $pat
                }
            ),
            "want {}, got {err:?}",
            stringify!($pat)
        );
    }};
}

#[test]
fn malformed_entries_are_refused() {
    let e = first_entry();
    fault!(
        refused("zero length", |m| m.write_u32(e, OP_CMD).unwrap()),
        EntryFault::Length { len: 0, .. }
    );
    fault!(
        refused("length past head", |m| {
            m.write_u32(e, 4096 | OP_CMD).unwrap()
        }),
        EntryFault::Length { len: 4096, .. }
    );
    fault!(
        refused("unknown op", |m| {
            let l = m.read_u32(e).unwrap();
            m.write_u32(e, (l & !OP_MASK) | 5).unwrap()
        }),
        EntryFault::UnknownOpcode(5)
    );
    fault!(
        refused("short CMD entry", |m| {
            m.write_u32(e, 64 | OP_CMD).unwrap();
            m.write_u32(MB_CMD_HEAD, 64).unwrap();
        }),
        EntryFault::CmdTooShort(64)
    );
    fault!(
        refused("cmd_id 0", |m| m.write_u16(e + HDR_CMD_ID, 0).unwrap()),
        EntryFault::CmdIdZero
    );
    fault!(
        refused("iov count beyond entry", |m| {
            m.write_u32(e + REQ_IOV_CNT, 1000).unwrap()
        }),
        EntryFault::IovecsOverflow { iov: 1000, .. }
    );
    fault!(
        refused("iov count overflow", |m| {
            m.write_u32(e + REQ_IOV_CNT, u32::MAX).unwrap();
            m.write_u32(e + REQ_IOV_BIDI_CNT, u32::MAX).unwrap();
        }),
        EntryFault::IovecsOverflow { .. }
    );
    fault!(
        refused("iov base in the command ring", |m| {
            m.write_u64(e + REQ_IOV, 256).unwrap()
        }),
        EntryFault::IovecBelowData {
            index: 0,
            base: 256
        }
    );
    fault!(
        refused("iov beyond the map", |m| {
            m.write_u64(e + REQ_IOV + 8, 1 << 40).unwrap()
        }),
        EntryFault::IovecBeyondData {
            index: 0,
            len: 0x100_0000_0000,
            ..
        }
    );
    fault!(
        refused("iov length overflow", |m| {
            m.write_u64(e + REQ_IOV + 8, u64::MAX).unwrap()
        }),
        EntryFault::IovecBeyondData {
            index: 0,
            len: u64::MAX,
            ..
        }
    );
    fault!(
        refused("cdb_off before the entry", |m| {
            m.write_u64(e + REQ_CDB_OFF, 8).unwrap()
        }),
        EntryFault::CdbOffset { cdb_off: 8, .. }
    );
    fault!(
        refused("cdb_off inside the iovecs", |m| {
            m.write_u64(e + REQ_CDB_OFF, (e + REQ_IOV) as u64).unwrap()
        }),
        EntryFault::CdbOffset { .. }
    );
    fault!(
        refused("cdb_off past the entry", |m| {
            m.write_u64(e + REQ_CDB_OFF, (e + 4096) as u64).unwrap()
        }),
        EntryFault::CdbOffset { .. }
    );
    fault!(
        refused("CDB overruns the entry", |m| {
            // A 16-byte opcode placed 8 bytes before the end of the entry.
            let len = m.read_u32(e).unwrap() & !OP_MASK;
            let at = e + len as usize - 8;
            m.write_u64(e + REQ_CDB_OFF, at as u64).unwrap();
            m.write_u8(at, 0x88).unwrap();
        }),
        EntryFault::CdbOverrun { need: 16, room: 8 }
    );
    assert_eq!(
        refused("head misaligned", |m| m.write_u32(MB_CMD_HEAD, 3).unwrap()),
        RingError::BadHead(3)
    );
    assert_eq!(
        refused("head outside the ring", |m| {
            m.write_u32(MB_CMD_HEAD, 1 << 30).unwrap()
        }),
        RingError::BadHead(1 << 30)
    );
}

#[test]
fn duplicate_id_in_flight_is_refused() {
    let mut emu = KernelEmu::with_layout(small()).unwrap();
    let mut ring = ring_over(&emu);
    emu.submit(&[0, 0, 0, 0, 0, 0], Data::None).unwrap();
    let second = emu.submit(&[0, 0, 0, 0, 0, 0], Data::None).unwrap();
    assert_eq!(second, 2);
    // Make the second entry claim id 1, still in flight.
    let first_len = emu.mem().read_u32(MB_SIZE).unwrap() & !OP_MASK;
    assert_eq!(first_len, 120, "112-byte base + 6-byte CDB rounded to 8");
    emu.mem()
        .write_u16(MB_SIZE + first_len as usize + HDR_CMD_ID, 1)
        .unwrap();
    let mut out = Vec::new();
    let err = ring.poll(&mut out).unwrap_err();
    assert_eq!(
        err,
        RingError::BadEntry {
            offset: first_len,
            fault: EntryFault::CmdIdInFlight(1)
        }
    );
    assert!(err.to_string().contains("already in flight"), "{err}");
}

#[test]
fn bad_mailboxes_are_refused() {
    let check = |what: &str, f: &dyn Fn(&SharedMem)| -> MailboxFault {
        let emu = KernelEmu::with_layout(small()).unwrap();
        f(emu.mem());
        let mem = emu.user_end().unwrap().map().unwrap();
        match Ring::new(mem).expect_err(what) {
            RingError::BadMailbox(f) => f,
            other => panic!("{what}: not a mailbox fault: {other}"),
        }
    };
    assert_eq!(
        check("version", &|m| m.write_u16(MB_VERSION, 1).unwrap()),
        MailboxFault::Version { found: 1 }
    );
    assert_eq!(
        check("cmdr_off inside the mailbox", &|m| {
            m.write_u32(MB_CMDR_OFF, 64).unwrap()
        }),
        MailboxFault::CmdrOff(64)
    );
    assert_eq!(
        check("cmdr_off misaligned", &|m| {
            m.write_u32(MB_CMDR_OFF, 130).unwrap()
        }),
        MailboxFault::CmdrOff(130)
    );
    assert_eq!(
        check("cmdr_size zero", &|m| m.write_u32(MB_CMDR_SIZE, 0).unwrap()),
        MailboxFault::CmdrSize(0)
    );
    assert!(matches!(
        check("ring beyond map", &|m| {
            m.write_u32(MB_CMDR_SIZE, u32::MAX - 7).unwrap()
        }),
        MailboxFault::RingBeyondMap {
            cmdr_size: 0xffff_fff8,
            ..
        }
    ));
    assert_eq!(
        check("tail outside ring", &|m| {
            m.write_u32(MB_CMD_TAIL, 8192).unwrap()
        }),
        MailboxFault::CmdTail(8192)
    );
    assert_eq!(
        check("tail misaligned", &|m| m.write_u32(MB_CMD_TAIL, 4).unwrap()),
        MailboxFault::CmdTail(4)
    );
}

#[test]
fn completions_for_unknown_ids_never_reach_the_kernel() {
    let mut emu = KernelEmu::with_layout(small()).unwrap();
    let mut ring = ring_over(&emu);
    let id = emu.submit(&[0, 0, 0, 0, 0, 0], Data::None).unwrap();
    let mut out = Vec::new();
    ring.poll(&mut out).unwrap();
    let bogus = Completion {
        cmd_id: id + 7,
        status: 0,
        sense: &[],
        read_len: None,
    };
    assert_eq!(
        ring.complete(bogus).unwrap_err(),
        RingError::NotInFlight(id + 7)
    );
    assert!(!ring.publish().unwrap());
    // The real one completes; a second completion of it is refused.
    let good = Completion {
        cmd_id: id,
        ..bogus
    };
    ring.complete(good).unwrap();
    assert!(ring.complete(good).is_err());
    assert!(ring.publish().unwrap());
    let mut seen = Vec::new();
    emu.reap(|r, _| seen.push(r.cmd_id)).unwrap();
    assert_eq!(seen, vec![id]);
    assert!(emu.broken().is_none());
}

#[test]
fn tmr_entries_are_reported_and_skipped() {
    let (mut emu, mut dev) = emu_device(small(), ram());
    let a = emu
        .submit(&rw16(false, 0, 1), Data::FromDevice(512))
        .unwrap();
    emu.tmr(1, &[a, 9]).unwrap();
    let b = emu
        .submit(&rw16(false, 1, 1), Data::FromDevice(512))
        .unwrap();
    dev.turn().unwrap();
    let mut seen = Vec::new();
    emu.reap(|r, _| seen.push((r.cmd_id, r.status))).unwrap();
    assert_eq!(seen, vec![(a, 0), (b, 0)]);
    assert_eq!(
        dev.stats().tmrs.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Only a TMR queued: its ring space is released without a completion.
    emu.tmr(5, &[]).unwrap();
    dev.turn().unwrap();
    let mut ring_tail = 0;
    emu.reap(|_, _| ring_tail += 1).unwrap();
    assert_eq!(ring_tail, 0);
    assert_eq!(
        emu.mem().read_u32(MB_CMD_TAIL).unwrap(),
        emu.mem().read_u32(MB_CMD_HEAD).unwrap(),
        "TMR space not released"
    );
    assert!(emu.broken().is_none());
}

#[test]
fn in_order_mailbox_gets_in_order_completions() {
    let layout = Layout {
        flags: FLAG_CAP_READ_LEN,
        ..small()
    };
    let held = Held::new(ram());
    let (mut emu, mut dev) = emu_device(layout, held.clone());
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            emu.submit(&rw16(false, i, 1), Data::FromDevice(512))
                .unwrap(),
        );
    }
    dev.turn().unwrap();
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(3);
    let mut seen = Vec::new();
    while seen.len() < 20 {
        held.release_random(&mut rng, 3);
        dev.turn().unwrap();
        emu.reap(|r, _| seen.push(r.cmd_id)).unwrap();
    }
    assert_eq!(seen, ids);
}

#[test]
fn unknown_opcode_gets_invalid_command_sense() {
    let (mut emu, mut dev) = emu_device(small(), ram());
    emu.submit(&[0xd9, 0, 0, 0, 0, 0, 0, 0, 0, 0], Data::None)
        .unwrap();
    dev.turn().unwrap();
    let mut got = None;
    emu.reap(|r, _| got = Some(r.clone())).unwrap();
    let r = got.expect("completed");
    assert_eq!(r.status, 0x02);
    assert!(!r.unknown_op);
    let s = r.sense.expect("sense");
    assert_eq!(s[0] & 0x7f, 0x70);
    assert_eq!(s[2] & 0x0f, 0x05, "ILLEGAL REQUEST");
    assert_eq!(
        (s[12], s[13]),
        (0x20, 0x00),
        "INVALID COMMAND OPERATION CODE"
    );
}

#[test]
fn restart_picks_up_entries_left_in_the_ring() {
    let mut emu = KernelEmu::with_layout(small()).unwrap();
    let a = emu
        .submit(&rw16(false, 0, 1), Data::FromDevice(512))
        .unwrap();
    // A first process reads the entry and dies without completing it.
    {
        let mut r = ring_over(&emu);
        let mut out = Vec::new();
        assert_eq!(r.poll(&mut out).unwrap(), 1);
    }
    let b = emu
        .submit(&rw16(false, 1, 1), Data::FromDevice(512))
        .unwrap();
    let mut r = ring_over(&emu);
    let mut out = Vec::new();
    assert_eq!(r.poll(&mut out).unwrap(), 2);
    let ids: Vec<u16> = out
        .iter()
        .map(|e| match e {
            Entry::Cmd(c) => c.cmd_id,
            Entry::Tmr(_) => 0,
        })
        .collect();
    assert_eq!(ids, vec![a, b]);
}

#[test]
fn random_garbage_rings_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    for _ in 0..3000 {
        let mut emu = KernelEmu::with_layout(small()).unwrap();
        let mut ring = ring_over(&emu);
        for _ in 0..rng.gen_range(1..6) {
            let _ = emu.submit(
                &rw16(rng.gen(), rng.gen_range(0..100), 1),
                Data::FromDevice(512),
            );
        }
        // Flip random bytes in the command area and the mailbox head.
        for _ in 0..rng.gen_range(1..8) {
            let off = rng.gen_range(MB_SIZE..MB_SIZE + 1024);
            emu.mem().write_u8(off, rng.gen()).unwrap();
        }
        if rng.gen_bool(0.2) {
            emu.mem()
                .write_u32(MB_CMD_HEAD, rng.gen_range(0..9000))
                .unwrap();
        }
        let mut out = Vec::new();
        if ring.poll(&mut out).is_ok() {
            for e in out {
                if let Entry::Cmd(c) = e {
                    // Everything handed out lies inside the data area.
                    for iov in c.bufs.iovecs() {
                        assert!(iov.iov_len <= 1 << 20);
                    }
                    let _ = ring.complete(Completion {
                        cmd_id: c.cmd_id,
                        status: 0,
                        sense: &[],
                        read_len: None,
                    });
                }
            }
        }
    }
}

#[test]
fn late_completion_of_a_timed_out_command_is_accepted() {
    let held = Held::new(ram());
    let (mut emu, mut dev) = emu_device(small(), held.clone());
    let slow = emu
        .submit(&rw16(false, 0, 1), Data::FromDevice(512))
        .unwrap();
    dev.turn().unwrap();
    // The kernel gives up on it (cmd_time_out) while the backend is stuck.
    assert!(emu.expire(slow));
    let fast = emu
        .submit(&rw16(false, 1, 1), Data::FromDevice(512))
        .unwrap();
    dev.turn().unwrap();
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(5);
    held.release_random(&mut rng, 2);
    dev.turn().unwrap();
    let mut seen = Vec::new();
    emu.reap(|r, _| seen.push(r.cmd_id)).unwrap();
    // Only the live command reaches the initiator; the late one just frees
    // its id and blocks, and the ring stays healthy.
    assert_eq!(seen, vec![fast]);
    assert_eq!(emu.in_flight(), 0);
    assert!(emu.broken().is_none());
    let again = emu
        .submit(&rw16(false, 2, 1), Data::FromDevice(512))
        .unwrap();
    assert_eq!(again, slow, "the expired id is free again (lowest free id)");
}
