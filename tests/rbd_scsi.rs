//! The SCSI commands beyond READ/WRITE through the emulated kernel, the
//! ring, the SCSI core and the rbd backend on the live micro cluster
//! (scripts/test-rbd.sh): UNMAP, WRITE SAME with and without UNMAP,
//! COMPARE AND WRITE (match and miscompare sense), SYNCHRONIZE CACHE, FUA.

mod common;
mod rbd_util;

use common::*;
use rbd_util::*;
use std::time::{Duration, Instant};
use tcmu_rbd::device::Stopper;
use tcmu_rbd_testkit::emulator::{Data, KernelEmu, Reaped};

const BS: usize = 512;

struct Rig {
    emu: KernelEmu,
    stop: Stopper,
    worker: Option<std::thread::JoinHandle<Result<(), tcmu_rbd::device::DeviceError>>>,
    img: TestImage,
}

impl Rig {
    fn new(tag: &str, size: u64) -> Rig {
        let img = TestImage::new(tag, size);
        let be = tcmu_rbd::backends::open("rbd", &img.cfg(""), size, BS as u32)
            .unwrap_or_else(|e| panic!("open: {e}"));
        let (emu, mut dev) = emu_device(small_layout(), be);
        let stop = dev.stopper();
        let worker = Some(std::thread::spawn(move || dev.run()));
        Rig {
            emu,
            stop,
            worker,
            img,
        }
    }

    /// One command through the ring, completed by librbd's threads.
    fn cmd(&mut self, cdb: &[u8], data: Data<'_>) -> (Reaped, Vec<u8>) {
        let id = self.emu.queue(cdb, data).expect("queue");
        self.emu.kick();
        let t0 = Instant::now();
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{cdb:02x?} never completed"
            );
            let mut fds = [nix::poll::PollFd::new(
                self.emu.doorbell_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            self.emu.ack_doorbell();
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
    }

    fn good_out(&mut self, cdb: &[u8], data: &[u8]) {
        let (r, _) = self.cmd(cdb, Data::ToDevice(data));
        assert_eq!(r.status, 0, "{cdb:02x?}: {:?}", r.sense);
    }

    fn good(&mut self, cdb: &[u8]) {
        let (r, _) = self.cmd(cdb, Data::None);
        assert_eq!(r.status, 0, "{cdb:02x?}: {:?}", r.sense);
    }

    fn read(&mut self, lba: u64, blocks: u32) -> Vec<u8> {
        let (r, d) = self.cmd(
            &rw16(false, lba, blocks),
            Data::FromDevice(blocks as usize * BS),
        );
        assert_eq!(r.status, 0, "read: {:?}", r.sense);
        d
    }

    fn write(&mut self, lba: u64, data: &[u8]) {
        self.good_out(&rw16(true, lba, (data.len() / BS) as u32), data);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn unmap_cdb(param_len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&param_len.to_be_bytes());
    c
}

fn unmap_params(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    let desc_len = (ranges.len() * 16) as u16;
    p[0..2].copy_from_slice(&(desc_len + 6).to_be_bytes());
    p[2..4].copy_from_slice(&desc_len.to_be_bytes());
    for &(lba, n) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn write_same16(lba: u64, blocks: u32, unmap: bool) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x93;
    if unmap {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn caw(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn unmap_and_write_same_through_the_ring() {
    let mut r = Rig::new("scsi-unmap", 16 << 20);
    let data = pattern(1, 1 << 20);
    r.write(0, &data[..512 * 1024]);
    r.write(1024, &data[512 * 1024..]);
    // UNMAP two ranges; they read back as zeros, the rest is untouched.
    let p = unmap_params(&[(8, 8), (300, 200)]);
    r.good_out(&unmap_cdb(p.len() as u16), &p);
    let mut want = data.clone();
    want[8 * BS..16 * BS].fill(0);
    want[300 * BS..500 * BS].fill(0);
    // WRITE SAME with UNMAP: zeros.
    r.good_out(&write_same16(600, 100, true), &[0u8; BS]);
    want[600 * BS..700 * BS].fill(0);
    // WRITE SAME without UNMAP: the pattern repeated.
    let pat = pattern(2, BS);
    r.good_out(&write_same16(800, 64, false), &pat);
    for k in 0..64 {
        want[(800 + k) * BS..(801 + k) * BS].copy_from_slice(&pat);
    }
    let got = [r.read(0, 1024), r.read(1024, 1024)].concat();
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("byte {i} (lba {}) differs", i / BS);
    }
    assert!(r.img.export()[..1 << 20] == want[..], "rbd export differs");
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn compare_and_write_and_cache_commands_through_the_ring() {
    let mut r = Rig::new("scsi-caw", 16 << 20);
    // One block: librbd's native compare-and-write.
    let old = pattern(3, BS);
    let new = pattern(4, BS);
    r.write(100, &old);
    r.good_out(&caw(100, 1), &[old.clone(), new.clone()].concat());
    assert_eq!(r.read(100, 1), new);
    // A miscompare: MISCOMPARE sense, INFORMATION = first differing byte.
    let mut wrong = new.clone();
    wrong[321] ^= 1;
    let (rep, _) = r.cmd(&caw(100, 1), Data::ToDevice(&[wrong, old.clone()].concat()));
    assert_eq!(rep.status, 2);
    let s = rep.sense.expect("sense");
    assert_eq!(s[2] & 0x0f, 0x0e, "sense key {s:02x?}");
    assert_eq!((s[12], s[13]), (0x1d, 0x00));
    assert_eq!(s[0] & 0x80, 0x80, "INFORMATION not valid");
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 321);
    assert_eq!(r.read(100, 1), new, "a miscompare wrote");
    // Four blocks: the emulated path.
    let old4 = pattern(5, 4 * BS);
    r.write(2000, &old4);
    let mut wrong4 = old4.clone();
    wrong4[3 * BS + 7] ^= 0x80;
    let (rep, _) = r.cmd(
        &caw(2000, 4),
        Data::ToDevice(&[wrong4, vec![9; 4 * BS]].concat()),
    );
    let s = rep.sense.expect("sense");
    assert_eq!(s[2] & 0x0f, 0x0e);
    assert_eq!(
        u32::from_be_bytes([s[3], s[4], s[5], s[6]]),
        3 * BS as u32 + 7
    );
    r.good_out(&caw(2000, 4), &[old4, vec![9; 4 * BS]].concat());
    assert_eq!(r.read(2000, 4), vec![9; 4 * BS]);
    // SYNCHRONIZE CACHE(10) and (16), a FUA WRITE(16).
    r.good(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    r.good(&[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut fua = rw16(true, 4000, 8);
    fua[1] = 0x08;
    let d = pattern(6, 8 * BS);
    r.good_out(&fua, &d);
    let exported = r.img.export();
    assert_eq!(&exported[4000 * BS..4008 * BS], &d[..]);
    assert_eq!(&exported[100 * BS..101 * BS], &new[..]);
}
