//! The SCSI core's provisioning and compare commands over the rbd backend
//! on the live micro cluster, through the emulated kernel and the ring:
//! UNMAP, WRITE SAME (pattern, zeros with UNMAP, NDOB), COMPARE AND WRITE
//! (native or emulated, miscompare offset), VERIFY with BYTCHK, SYNCHRONIZE
//! CACHE, with the image checked against `rbd export` at the end.
//!
//! Needs the cluster scripts/test-rbd.sh starts; to run it alone:
//! `scripts/ceph-cluster.sh start DIR && eval "$(scripts/ceph-cluster.sh env DIR)"
//!  && cargo test --test scsi_rbd -- --ignored`.

mod common;
mod rbd_util;

use common::*;
use rbd_util::*;
use tcmu_rbd::device::Device;
use tcmu_rbd_testkit::emulator::{Data, KernelEmu, Reaped};

const BS: usize = 512;

struct Rig {
    emu: KernelEmu,
    stop: tcmu_rbd::device::Stopper,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Rig {
    fn new(img: &TestImage) -> Rig {
        let be =
            tcmu_rbd::backends::open("rbd", &img.cfg(";osd_op_timeout=60"), img.size, BS as u32)
                .unwrap_or_else(|e| panic!("open: {e}"));
        let (emu, mut dev): (KernelEmu, Device) = emu_device(small_layout(), be);
        let stop = dev.stopper();
        let worker = std::thread::spawn(move || dev.run().expect("worker"));
        Rig {
            emu,
            stop,
            worker: Some(worker),
        }
    }

    fn cmd(&mut self, cdb: &[u8], data: Data<'_>) -> (Reaped, Vec<u8>) {
        let id = self.emu.submit(cdb, data).expect("queue");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
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
            assert!(std::time::Instant::now() < deadline, "{cdb:02x?} timed out");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn good(&mut self, cdb: &[u8], data: Data<'_>) -> Vec<u8> {
        let (r, d) = self.cmd(cdb, data);
        assert_eq!(r.status, 0, "{cdb:02x?}: {:?}", r.sense);
        d
    }

    fn read(&mut self, lba: u64, blocks: u32) -> Vec<u8> {
        self.good(
            &rw16(false, lba, blocks),
            Data::FromDevice(blocks as usize * BS),
        )
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

fn ws16(flags: u8, lba: u64, n: u32) -> [u8; 16] {
    let mut c = rw16(true, lba, n);
    c[0] = 0x93;
    c[1] = flags;
    c
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn provisioning_and_compare_commands_on_rbd() {
    let img = TestImage::new("scsi-prov", 16 << 20);
    let mut model = vec![0u8; img.size as usize];
    let mut r = Rig::new(&img);
    let put = |model: &mut Vec<u8>, lba: u64, data: &[u8]| {
        let o = lba as usize * BS;
        model[o..o + data.len()].copy_from_slice(data);
    };
    // Fill 4 MiB (one rbd object) and some of the next.
    let data = pattern(1, 5 << 20);
    for (i, chunk) in data.chunks(128 * BS).enumerate() {
        let lba = (i * 128) as u64;
        r.good(
            &rw16(true, lba, (chunk.len() / BS) as u32),
            Data::ToDevice(chunk),
        );
        put(&mut model, lba, chunk);
    }
    // UNMAP two ranges, one spanning the object boundary (LBA 8192).
    let mut list = vec![0, 38, 0, 32, 0, 0, 0, 0];
    for (lba, n) in [(100u64, 50u32), (8100, 200)] {
        list.extend_from_slice(&lba.to_be_bytes());
        list.extend_from_slice(&n.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        put(&mut model, lba, &vec![0u8; n as usize * BS]);
    }
    r.good(&[0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0], Data::ToDevice(&list));
    assert!(r.read(100, 50).iter().all(|&b| b == 0));
    // WRITE SAME with a pattern, with zeros + UNMAP, and with NDOB.
    let blk = pattern(2, BS);
    r.good(&ws16(0, 1000, 300), Data::ToDevice(&blk));
    for l in 1000..1300 {
        put(&mut model, l, &blk);
    }
    r.good(&ws16(0x08, 2000, 64), Data::ToDevice(&[0u8; BS]));
    put(&mut model, 2000, &[0u8; 64 * BS]);
    r.good(&ws16(0x09, 3000, 16), Data::None);
    put(&mut model, 3000, &[0u8; 16 * BS]);
    assert_eq!(r.read(1299, 1), blk);
    // COMPARE AND WRITE: match, then a miscompare at byte 777.
    let old = r.read(5000, 2);
    let new = pattern(3, 2 * BS);
    let mut buf = old.clone();
    buf.extend(&new);
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[2..10].copy_from_slice(&5000u64.to_be_bytes());
    caw[13] = 2;
    r.good(&caw, Data::ToDevice(&buf));
    put(&mut model, 5000, &new);
    let mut cmp = new.clone();
    cmp[777] ^= 0x5a;
    cmp.extend(pattern(4, 2 * BS));
    let (rsp, _) = r.cmd(&caw, Data::ToDevice(&cmp));
    let s = rsp.sense.expect("miscompare sense");
    assert_eq!(
        (rsp.status, s[2] & 0x0f, s[12], s[13]),
        (2, 0x0e, 0x1d, 0x00)
    );
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 777);
    assert_eq!(r.read(5000, 2), new, "a miscompare writes nothing");
    // VERIFY(16) BYTCHK=1 against the media, equal and not.
    let mut v = rw16(false, 1000, 4);
    v[0] = 0x8f;
    v[1] = 0x02;
    r.good(&v, Data::ToDevice(&model[1000 * BS..1004 * BS]));
    let mut bad = model[1000 * BS..1004 * BS].to_vec();
    bad[1500] ^= 1;
    let (rsp, _) = r.cmd(&v, Data::ToDevice(&bad));
    let s = rsp.sense.expect("verify miscompare");
    assert_eq!(u32::from_be_bytes([s[3], s[4], s[5], s[6]]), 1500);
    // SYNCHRONIZE CACHE(16) over the whole image.
    let mut sc = [0u8; 16];
    sc[0] = 0x91;
    r.good(&sc, Data::None);
    drop(r);
    assert!(img.export() == model, "rbd export differs from the model");
}
