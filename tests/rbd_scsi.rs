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
        Self::open(TestImage::new(tag, size), size)
    }

    fn open(img: TestImage, size: u64) -> Rig {
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

fn glbas(lba: u64, alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

impl Rig {
    /// GET LBA STATUS from `lba`: (lba, blocks, status) descriptors.
    fn lba_status(&mut self, lba: u64) -> Vec<(u64, u64, u8)> {
        let (r, d) = self.cmd(&glbas(lba, 4096), Data::FromDevice(4096));
        assert_eq!(r.status, 0, "GET LBA STATUS {lba}: {:?}", r.sense);
        d[8..]
            .chunks_exact(16)
            .map(|x| {
                let mut l = [0u8; 8];
                l.copy_from_slice(&x[..8]);
                let n = u32::from_be_bytes([x[8], x[9], x[10], x[11]]);
                (u64::from_be_bytes(l), u64::from(n), x[12] & 0x0f)
            })
            .collect()
    }

    /// The status of every block, asking again where an answer ended.
    fn lba_map(&mut self, blocks: u64) -> Vec<(u64, u64, u8)> {
        let mut all: Vec<(u64, u64, u8)> = Vec::new();
        let mut at = 0;
        while at < blocks {
            let part = self.lba_status(at);
            assert_eq!(part.first().map(|d| d.0), Some(at), "first descriptor");
            for d in part {
                assert_eq!(d.0, at, "descriptors are contiguous");
                at = d.0 + d.1;
                match all.last_mut() {
                    Some(l) if l.2 == d.2 && l.0 + l.1 == d.0 => l.1 += d.1,
                    _ => all.push(d),
                }
            }
        }
        assert_eq!(at, blocks, "ends at the capacity");
        all
    }
}

/// 4 MiB objects: 8192 blocks of 512 bytes.
const OBJ: u64 = 8192;

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn get_lba_status_follows_writes_unmap_and_write_same() {
    let blocks = 8 * OBJ;
    let mut r = Rig::new("scsi-glbas", blocks * BS as u64);
    // Fresh: nothing allocated.
    assert_eq!(r.lba_map(blocks), vec![(0, blocks, 1)]);
    // One block written in object 1, eight in object 3 across nothing
    // else: those objects are mapped, whole.
    r.write(OBJ + 100, &pattern(1, BS));
    r.write(3 * OBJ + 5, &pattern(2, 8 * BS));
    assert_eq!(
        r.lba_map(blocks),
        vec![
            (0, OBJ, 1),
            (OBJ, OBJ, 0),
            (2 * OBJ, OBJ, 1),
            (3 * OBJ, OBJ, 0),
            (4 * OBJ, 4 * OBJ, 1)
        ]
    );
    // From inside a mapped object the answer starts at the LBA asked for.
    assert_eq!(r.lba_status(OBJ + 7)[0], (OBJ + 7, OBJ - 7, 0));
    // UNMAP of part of object 3: zeroed, not removed: still mapped (never
    // "deallocated" while the object is there).
    let p = unmap_params(&[(3 * OBJ, 16)]);
    r.good_out(&unmap_cdb(p.len() as u16), &p);
    assert_eq!(r.lba_status(3 * OBJ)[0], (3 * OBJ, OBJ, 0));
    // UNMAP of the whole of object 1: deallocated again.
    let p = unmap_params(&[(OBJ, OBJ as u32)]);
    r.good_out(&unmap_cdb(p.len() as u16), &p);
    assert_eq!(r.lba_status(0)[0], (0, 3 * OBJ, 1));
    // WRITE SAME with UNMAP over object 3 and half of object 4 (written
    // first): object 3 deallocated, object 4 still holds data.
    r.write(4 * OBJ + 10, &pattern(3, BS));
    r.good_out(
        &write_same16(3 * OBJ, (OBJ + OBJ / 2) as u32, true),
        &[0u8; BS],
    );
    assert_eq!(
        r.lba_map(blocks),
        vec![(0, 4 * OBJ, 1), (4 * OBJ, OBJ, 0), (5 * OBJ, 3 * OBJ, 1)]
    );
    // WRITE SAME without UNMAP writes zeros, thick: mapped.
    r.good_out(&write_same16(6 * OBJ, OBJ as u32, false), &[0u8; BS]);
    assert_eq!(r.lba_status(6 * OBJ)[0], (6 * OBJ, OBJ, 0));
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn deallocated_blocks_always_read_zeros() {
    // Random writes and discards of random sizes: every block reported
    // deallocated must read back as zeros.
    let blocks = 16 * OBJ;
    let mut r = Rig::new("scsi-glbas-zero", blocks * BS as u64);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    for i in 0..60 {
        let n = 1 + next(64);
        let lba = next(blocks - n);
        if i % 3 == 2 {
            let len = 1 + next(2 * OBJ).min(blocks - lba - 1);
            let p = unmap_params(&[(lba, len as u32)]);
            r.good_out(&unmap_cdb(p.len() as u16), &p);
        } else {
            r.write(lba, &pattern(i, n as usize * BS));
        }
    }
    let map = r.lba_map(blocks);
    assert!(
        map.iter().any(|d| d.2 == 0) && map.iter().any(|d| d.2 == 1),
        "{map:?}"
    );
    let image = r.img.export();
    for &(lba, n, st) in &map {
        if st == 1 {
            let s = (lba * BS as u64) as usize;
            let e = ((lba + n) * BS as u64) as usize;
            if let Some(i) = image[s..e].iter().position(|&b| b != 0) {
                panic!(
                    "block {} reported deallocated holds data",
                    lba + i as u64 / BS as u64
                );
            }
        }
    }
}

/// Times one GET LBA STATUS (the 4 GiB a command covers) on a 10 GiB
/// image with 100 objects written at random, with the object map and
/// without (printed; run with --nocapture for the numbers).
#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn get_lba_status_cost_with_and_without_object_map() {
    let size: u64 = 10 << 30;
    for (tag, features) in [
        ("glbas-map", None),
        ("glbas-nomap", Some("layering,exclusive-lock")),
    ] {
        let img = TestImage::new(tag, size);
        if let Some(f) = features {
            // Made again without object-map/fast-diff.
            cli("rbd", &["rm", "--no-progress", &img.spec()]);
            cli(
                "rbd",
                &["create", "--size", "10G", "--image-feature", f, &img.spec()],
            );
        }
        let mut r = Rig::open(img, size);
        let mut x: u64 = 0x9e37_79b9;
        for _ in 0..100 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let obj = (x >> 33) % (size / (4 << 20));
            r.write(obj * OBJ, &pattern(obj, BS));
        }
        let mut times = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            let d = r.lba_status(0);
            times.push(t0.elapsed());
            assert!(!d.is_empty());
        }
        times.sort();
        let t0 = Instant::now();
        let map = r.lba_map(size / BS as u64);
        let whole = t0.elapsed();
        let mapped: u64 = map.iter().filter(|d| d.2 == 0).map(|d| d.1).sum();
        eprintln!(
            "{tag}: one GET LBA STATUS (4 GiB) median {:?} (min {:?}, max {:?}); whole 10 GiB ({} runs) {:?}; mapped {} MiB",
            times[2],
            times[0],
            times[4],
            map.len(),
            whole,
            (mapped * BS as u64) >> 20
        );
        assert!((OBJ..=100 * OBJ).contains(&mapped), "{mapped}");
    }
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn a_clone_reports_its_parent_data_mapped() {
    // librbd's object-map path ignores the parent: the backend reports the
    // parent overlap mapped, so data a clone reads from its parent is
    // never "deallocated".
    let blocks = 4 * OBJ;
    let size = blocks * BS as u64;
    let parent = TestImage::new("glbas-parent", size);
    cli(
        "rbd",
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4K",
            "--io-total",
            "4K",
            &parent.spec(),
        ],
    );
    let snap = format!("{}@s", parent.spec());
    cli("rbd", &["snap", "create", "--no-progress", &snap]);
    cli("rbd", &["snap", "protect", &snap]);
    let clone = TestImage {
        name: format!("glbas-clone-{}", std::process::id()),
        size,
    };
    cli("rbd", &["clone", &snap, &clone.spec()]);
    {
        let mut r = Rig::open(clone, size);
        assert_eq!(r.lba_map(blocks), vec![(0, blocks, 0)]);
        assert_eq!(r.read(0, 8), parent.export()[..4096]);
    }
    cli("rbd", &["snap", "unprotect", &snap]);
    cli("rbd", &["snap", "rm", "--no-progress", &snap]);
}
