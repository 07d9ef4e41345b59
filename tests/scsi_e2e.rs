//! The SCSI core end to end: commands queued by the emulated kernel,
//! taken from the ring by the device worker, answered by the SCSI core
//! over the ram backend, reaped by the emulated kernel (which applies
//! read_len and copies the sense bytes as target_core_user.c does).

mod common;

use common::*;
use std::sync::Arc;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd::device::Device;
use tcmu_rbd::scsi::alua::{AccessState, AluaConfig, GroupConfig, LocalPort, SharedAlua};
use tcmu_rbd_testkit::emulator::{Data, KernelEmu, Reaped};

const BS: usize = 512;

struct Rig {
    emu: KernelEmu,
    dev: Device,
}

impl Rig {
    fn new(blocks: u64) -> Rig {
        let ram: Arc<dyn Backend> =
            Arc::new(RamBackend::new(blocks * BS as u64, BS as u32).expect("ram"));
        Self::over(ram)
    }

    fn over(backend: Arc<dyn Backend>) -> Rig {
        let (emu, dev) = emu_device(small_layout(), backend);
        Rig { emu, dev }
    }

    /// Runs one command through the ring; returns its completion and the
    /// data-in bytes the initiator would receive.
    fn cmd(&mut self, cdb: &[u8], data: Data<'_>) -> (Reaped, Vec<u8>) {
        let id = self.emu.submit(cdb, data).expect("queue");
        // Backends on threads (file) complete later: poll for a while.
        for _ in 0..20_000 {
            if !self.dev.turn().expect("turn") {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            let mut got = None;
            self.emu
                .reap(|r, d| {
                    assert_eq!(r.cmd_id, id);
                    got = Some((r.clone(), d.to_vec()));
                })
                .expect("reap");
            if let Some(g) = got {
                return g;
            }
        }
        panic!("command {cdb:02x?} never completed");
    }

    fn good_in(&mut self, cdb: &[u8], len: usize) -> Vec<u8> {
        let (r, d) = self.cmd(cdb, Data::FromDevice(len));
        assert_eq!(r.status, 0, "{cdb:02x?}: {:?}", r.sense);
        d
    }

    fn good_out(&mut self, cdb: &[u8], data: &[u8]) {
        let (r, _) = self.cmd(cdb, Data::ToDevice(data));
        assert_eq!(r.status, 0, "{cdb:02x?}: {:?}", r.sense);
    }

    fn check(&mut self, cdb: &[u8], data: Data<'_>) -> Vec<u8> {
        let (r, _) = self.cmd(cdb, data);
        assert_eq!(r.status, 2, "{cdb:02x?} should fail");
        r.sense.expect("sense bytes")
    }

    fn read(&mut self, lba: u64, blocks: u32) -> Vec<u8> {
        self.good_in(&rw16(false, lba, blocks), blocks as usize * BS)
    }
}

#[test]
fn inquiry_and_vpd_through_the_ring() {
    let mut r = Rig::new(4096);
    // The kernel allocates the allocation length; read_len trims it to
    // what the LUN produced.
    let d = r.good_in(&[0x12, 0, 0, 0, 255, 0], 255);
    assert_eq!(d.len(), 74);
    assert_eq!(&d[8..16], b"LIO-ORG ");
    assert_eq!(d[2], 0x06);
    let d = r.good_in(&[0x12, 1, 0x00, 0, 255, 0], 255);
    assert_eq!(
        d,
        vec![0, 0, 0, 7, 0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2]
    );
    let d = r.good_in(&[0x12, 1, 0x80, 0, 255, 0], 255);
    assert_eq!(&d[4..], b"test-serial");
    let d = r.good_in(&[0x12, 1, 0x83, 0, 255, 0], 255);
    assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 0x10]);
    // "test-serial" has hex digits e, e, a: NAA 6, 00-14-05, then e e a.
    assert_eq!(&d[8..12], &[0x60, 0x01, 0x40, 0x5e]);
    assert_eq!(&d[12..14], &[0xea, 0x00]);
    let d = r.good_in(&[0x12, 1, 0xb0, 0, 255, 0], 255);
    assert_eq!(&d[..4], &[0x00, 0xb0, 0x00, 0x3c]);
    assert_eq!(
        &d[8..12],
        &2048u32.to_be_bytes(),
        "max transfer from LunInfo"
    );
    let d = r.good_in(&[0x12, 1, 0xb2, 0, 255, 0], 255);
    assert_eq!(d[5], 0xe4, "ram discards and reads zeros back");
    // A bad field comes back as fixed sense with the field pointer.
    let s = r.check(&[0x12, 1, 0x42, 0, 255, 0], Data::FromDevice(255));
    assert_eq!((s[0], s[2], s[12], s[13]), (0x70, 0x05, 0x24, 0x00));
    assert_eq!(&s[15..18], &[0xcf, 0x00, 0x02]);
}

fn unmap(descs: &[(u64, u32)]) -> (Vec<u8>, [u8; 10]) {
    let bd = (descs.len() * 16) as u16;
    let mut v = Vec::new();
    v.extend_from_slice(&(bd + 6).to_be_bytes());
    v.extend_from_slice(&bd.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for (lba, n) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    let l = (v.len() as u16).to_be_bytes();
    (v, [0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0])
}

#[test]
fn unmap_then_read_zeros() {
    let mut r = Rig::new(4096);
    let data: Vec<u8> = (0..64 * BS).map(|i| (i % 251) as u8 + 1).collect();
    r.good_out(&rw16(true, 100, 64), &data);
    let (list, cdb) = unmap(&[(108, 8), (150, 10)]);
    r.good_out(&cdb, &list);
    let d = r.read(100, 64);
    for (i, (got, want)) in d.chunks(BS).zip(data.chunks(BS)).enumerate() {
        let lba = 100 + i;
        if (108..116).contains(&lba) || (150..160).contains(&lba) {
            assert!(got.iter().all(|&b| b == 0), "lba {lba} not zero");
        } else {
            assert_eq!(got, want, "lba {lba} changed");
        }
    }
    // Out of range: nothing discarded.
    let (list, cdb) = unmap(&[(100, 1), (4095, 2)]);
    let s = r.check(&cdb, Data::ToDevice(&list));
    assert_eq!((s[2], s[12]), (0x05, 0x21));
    assert_eq!(&r.read(100, 1)[..], &data[..BS]);
}

#[test]
fn write_same_through_the_ring() {
    let mut r = Rig::new(4096);
    r.good_out(&rw16(true, 0, 32), &vec![0x77u8; 32 * BS]);
    let pat: Vec<u8> = (0..BS).map(|i| (i * 7) as u8).collect();
    let mut c = rw16(true, 4, 8);
    c[0] = 0x93;
    r.good_out(&c, &pat);
    // WRITE SAME(10) with UNMAP and a zero block.
    r.good_out(&[0x41, 0x08, 0, 0, 0, 20, 0, 0, 4, 0], &[0u8; BS]);
    let d = r.read(0, 32);
    for (lba, blk) in d.chunks(BS).enumerate() {
        if (4..12).contains(&lba) {
            assert_eq!(blk, &pat[..], "lba {lba}");
        } else if (20..24).contains(&lba) {
            assert!(blk.iter().all(|&b| b == 0), "lba {lba}");
        } else {
            assert!(blk.iter().all(|&b| b == 0x77), "lba {lba}");
        }
    }
}

#[test]
fn compare_and_write_through_the_ring() {
    let mut r = Rig::new(4096);
    let old = vec![0x11u8; BS];
    let new = vec![0x22u8; BS];
    r.good_out(&rw16(true, 9, 1), &old);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&9u64.to_be_bytes());
    cdb[13] = 1;
    let mut buf = old.clone();
    buf.extend(&new);
    r.good_out(&cdb, &buf);
    assert_eq!(r.read(9, 1), new);
    // The same buffer again miscompares at byte 0 (0x11 vs 0x22)...
    let s = r.check(&cdb, Data::ToDevice(&buf));
    assert_eq!((s[0], s[2], s[12], s[13]), (0xf0, 0x0e, 0x1d, 0x00));
    assert_eq!(&s[3..7], &[0, 0, 0, 0]);
    // ...and a compare half differing at byte 300 reports 300.
    let mut cmp = new.clone();
    cmp[300] = 0;
    cmp.extend(&old);
    let s = r.check(&cdb, Data::ToDevice(&cmp));
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 300);
    assert_eq!(r.read(9, 1), new);
}

#[test]
fn alua_standby_and_resize_through_the_ring() {
    let mut r = Rig::new(4096);
    let g = |id, state| GroupConfig {
        implicit_trans_secs: 20,
        ..GroupConfig::new(id, state, vec![(id, id == 1)])
    };
    let alua = SharedAlua::new(AluaConfig {
        groups: vec![
            g(1, AccessState::Standby),
            g(2, AccessState::ActiveOptimized),
        ],
        local: LocalPort {
            group: 1,
            rel_port: 1,
        },
    });
    r.dev.lun_mut().set_alua(Arc::new(alua.clone()));
    let s = r.check(&[0, 0, 0, 0, 0, 0], Data::None);
    assert_eq!((s[2], s[12], s[13]), (0x02, 0x04, 0x0b));
    let d = r.good_in(&[0xa3, 0x2a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256);
    assert_eq!(&d[..8], &[0, 0, 0, 28, 0x10, 20, 0, 0]);
    // STPG makes this port active; I/O flows.
    let stpg = [0, 0, 0, 0, 0x00, 0, 0, 1];
    r.good_out(&[0xa4, 0x0a, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &stpg);
    assert_eq!(alua.handle().state(1), Some(AccessState::ActiveOptimized));
    r.good_out(&rw16(true, 0, 1), &[5u8; BS]);
    // Online resize: one CAPACITY DATA HAS CHANGED, then the new size.
    r.dev.resize(8192 * BS as u64);
    let s = r.check(&rw16(false, 0, 1), Data::FromDevice(BS));
    assert_eq!((s[2], s[12], s[13]), (0x06, 0x2a, 0x09));
    let d = r.good_in(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(&d[..4], &8191u32.to_be_bytes());
    r.good_out(&rw16(true, 8191, 1), &[6u8; BS]);
    assert_eq!(r.read(8191, 1), vec![6u8; BS]);
}

#[test]
fn file_backend_through_the_ring() {
    // The file backend: its own threads, a write cache (WCE on, FUA and
    // flushes matter), hole punching for UNMAP, the generic CAW.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun.img");
    let fb: Arc<dyn Backend> = Arc::new(
        tcmu_handler::file::FileBackend::open(&path, Some(4096 * BS as u64), BS as u32, 2).unwrap(),
    );
    let mut r = Rig::over(fb);
    let d = r.good_in(&[0x1a, 0x08, 0x08, 0, 255, 0], 255);
    assert_eq!(d[6] & 0x04, 0x04, "WCE on a caching backend");
    let data: Vec<u8> = (0..32 * BS).map(|i| (i % 253) as u8 + 1).collect();
    let mut w = rw16(true, 0, 32);
    w[1] = 0x08; // FUA
    r.good_out(&w, &data);
    let (list, cdb) = unmap(&[(8, 8)]);
    r.good_out(&cdb, &list);
    let pat = vec![0xa5u8; BS];
    let mut ws = rw16(true, 20, 4);
    ws[0] = 0x93;
    r.good_out(&ws, &pat);
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[13] = 1;
    let mut buf = data[..BS].to_vec();
    buf.extend(vec![0x3cu8; BS]);
    r.good_out(&caw, &buf);
    let s = r.check(&caw, Data::ToDevice(&buf));
    assert_eq!((s[2], s[12]), (0x0e, 0x1d));
    r.good_out(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    let d = r.read(0, 32);
    for (lba, blk) in d.chunks(BS).enumerate() {
        let want: Vec<u8> = match lba {
            0 => vec![0x3c; BS],
            8..=15 => vec![0; BS],
            20..=23 => pat.clone(),
            _ => data[lba * BS..(lba + 1) * BS].to_vec(),
        };
        assert_eq!(blk, &want[..], "lba {lba}");
    }
    // What the file holds after SYNCHRONIZE CACHE matches.
    drop(r);
    let f = std::fs::read(&path).unwrap();
    assert_eq!(&f[..32 * BS], &d[..]);
}
