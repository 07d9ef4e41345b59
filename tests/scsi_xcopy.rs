//! EXTENDED COPY through the emulated kernel: two LUNs served by one
//! registry (as by one daemon), the copy sent to either of them, the data
//! checked by reading it back through the ring; a copy within one LUN
//! whose ranges overlap; and the refusals a host falls back from.

mod common;

use common::small_layout;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd::device::{Device, EventDoorbell};
use tcmu_rbd::registry::{DeviceSpec, Registry};
use tcmu_rbd::scsi::inquiry::naa_designator;
use tcmu_rbd::scsi::LunInfo;
use tcmu_rbd_testkit::cdb::{rw16, xcopy_cscd, xcopy_list as list, xcopy_segment as seg};
use tcmu_rbd_testkit::emulator::{Data, KernelEmu};

const MIB: u64 = 1 << 20;
const SERIAL_A: &str = "0a0a0a0a-1111-2222-3333-444444444444";
const SERIAL_B: &str = "0b0b0b0b-5555-6666-7777-888888888888";

fn lun(reg: &Registry, name: &str, serial: &str, size: u64, bs: u32) -> KernelEmu {
    let backend: Arc<dyn Backend> = Arc::new(RamBackend::new(size, bs).unwrap());
    let emu = KernelEmu::with_layout(small_layout()).unwrap();
    let ue = emu.user_end().unwrap();
    let info = LunInfo {
        vendor: "LIO-ORG".into(),
        product: "TCMU device".into(),
        revision: "0002".into(),
        serial: serial.into(),
        geometry: backend.geometry(),
        caps: backend.caps(),
        max_transfer_blocks: 2048,
    };
    let dev = Device::new(
        name,
        ue.map().unwrap(),
        Box::new(EventDoorbell::new(ue.to_user, ue.from_user)),
        backend,
        info,
    )
    .unwrap();
    reg.adopt(
        DeviceSpec {
            name: name.into(),
            uio_path: PathBuf::from("/dev/null"),
            map_size: 0,
            subtype: "ram".into(),
            cfgstring: name.into(),
            configfs_dir: None,
            size: Some(size),
        },
        dev,
    )
    .unwrap();
    emu
}

/// Runs one command: (status, sense, data in).
fn run(emu: &mut KernelEmu, cdb: &[u8], data: Data<'_>) -> (u8, Option<Vec<u8>>, Vec<u8>) {
    emu.submit(cdb, data).expect("submit");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let mut got = None;
        emu.reap(|r, bytes| got = Some((r.status, r.sense.clone(), bytes.to_vec())))
            .expect("reap");
        if let Some(g) = got {
            return g;
        }
        assert!(Instant::now() < end, "command never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn write(emu: &mut KernelEmu, lba: u64, data: &[u8]) {
    let (st, sense, _) = run(
        emu,
        &rw16(true, lba, (data.len() / 512) as u32),
        Data::ToDevice(data),
    );
    assert_eq!(st, 0, "write: {sense:?}");
}

fn read(emu: &mut KernelEmu, lba: u64, blocks: u32) -> Vec<u8> {
    let (st, sense, d) = run(
        emu,
        &rw16(false, lba, blocks),
        Data::FromDevice(blocks as usize * 512),
    );
    assert_eq!(st, 0, "read: {sense:?}");
    d
}

/// The CSCD naming the LUN of `serial`.
fn cscd(serial: &str, bl: u32) -> Vec<u8> {
    xcopy_cscd(&naa_designator(serial), bl)
}

fn xcopy_cdb(len: usize) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

fn xcopy(emu: &mut KernelEmu, l: &[u8]) -> (u8, Option<Vec<u8>>) {
    let (st, sense, _) = run(emu, &xcopy_cdb(l.len()), Data::ToDevice(l));
    (st, sense)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 9) as u8)
        .collect()
}

fn key_asc(sense: &Option<Vec<u8>>) -> (u8, u8, u8) {
    let s = sense.as_ref().expect("sense");
    (s[2] & 0xf, s[12], s[13])
}

#[test]
fn a_copy_between_two_luns_moves_the_data_inside_the_daemon() {
    let reg = Registry::new();
    let mut a = lun(&reg, "a", SERIAL_A, 16 * MIB, 512);
    let mut b = lun(&reg, "b", SERIAL_B, 16 * MIB, 512);
    // 5 MiB + 3 blocks: several pieces in flight and a short last one.
    let n = 5 * MIB as usize + 3 * 512;
    let data = pattern(7, n);
    for (i, chunk) in data.chunks(512 * 2048).enumerate() {
        write(&mut a, 100 + (i * 2048) as u64, chunk);
    }
    let blocks = (n / 512) as u64;
    // Two segments (the 16-bit count caps one at 65535 blocks), sent to
    // the destination LUN: it pulls from the source.
    let first = 6000u64;
    let l = list(
        &[cscd(SERIAL_A, 512), cscd(SERIAL_B, 512)],
        &[
            seg(0, 1, first as u16, 100, 900),
            seg(0, 1, (blocks - first) as u16, 100 + first, 900 + first),
        ],
    );
    let (st, sense) = xcopy(&mut b, &l);
    assert_eq!(st, 0, "xcopy: {sense:?}");
    let mut got = Vec::new();
    let mut lba = 900;
    while (got.len()) < n {
        let k = ((n - got.len()) / 512).min(2048) as u32;
        got.extend(read(&mut b, lba, k));
        lba += u64::from(k);
    }
    assert!(got == data, "the destination holds the source's data");
    // Nothing around the range was touched.
    assert_eq!(read(&mut b, 899, 1), vec![0u8; 512]);
    assert_eq!(read(&mut b, 900 + blocks, 1), vec![0u8; 512]);

    // Sent to the source LUN it pushes, the same way.
    let l = list(
        &[cscd(SERIAL_A, 512), cscd(SERIAL_B, 512)],
        &[seg(0, 1, 64, 100, 20_000)],
    );
    assert_eq!(xcopy(&mut a, &l).0, 0);
    assert_eq!(read(&mut b, 20_000, 64), data[..64 * 512].to_vec());
    reg.stop_all();
}

#[test]
fn a_copy_within_one_lun_over_overlapping_ranges_reads_before_it_overwrites() {
    let reg = Registry::new();
    let mut a = lun(&reg, "a", SERIAL_A, 32 * MIB, 512);
    // More pieces than the engine keeps in flight, so the order matters.
    let n = 12 * MIB as usize;
    assert!(n > tcmu_rbd::copy::DEPTH * tcmu_rbd::copy::CHUNK);
    let data = pattern(3, n);
    for (i, chunk) in data.chunks(512 * 2048).enumerate() {
        write(&mut a, (i * 2048) as u64, chunk);
    }
    let blocks = (n / 512) as u16;
    // Forward by 1000 blocks (less than the range): a naive front-to-back
    // copy would read blocks it already overwrote.
    let l = list(&[cscd(SERIAL_A, 512)], &[seg(0, 0, blocks, 0, 1000)]);
    assert_eq!(xcopy(&mut a, &l).0, 0);
    let mut got = Vec::new();
    for k in 0..(blocks as u64).div_ceil(2048) {
        let left = (blocks as u64 - k * 2048).min(2048) as u32;
        got.extend(read(&mut a, 1000 + k * 2048, left));
    }
    assert!(got == data, "forward overlapping copy");
    // And back by 500 blocks.
    let l = list(&[cscd(SERIAL_A, 512)], &[seg(0, 0, blocks, 1000, 500)]);
    assert_eq!(xcopy(&mut a, &l).0, 0);
    let mut got = Vec::new();
    for k in 0..(blocks as u64).div_ceil(2048) {
        let left = (blocks as u64 - k * 2048).min(2048) as u32;
        got.extend(read(&mut a, 500 + k * 2048, left));
    }
    assert!(got == data, "backward overlapping copy");
    reg.stop_all();
}

#[test]
fn copies_the_daemon_cannot_do_end_with_the_sense_a_host_falls_back_from() {
    let reg = Registry::new();
    let mut a = lun(&reg, "a", SERIAL_A, 4 * MIB, 512);
    let _b = lun(&reg, "b", SERIAL_B, 4 * MIB, 512);
    let _c = lun(&reg, "c", "0c0c0c0c-9999", 4 * MIB, 4096);
    write(&mut a, 0, &pattern(1, 4096));
    // A LUN this daemon does not serve: COPY ABORTED, COPY TARGET DEVICE
    // NOT REACHABLE.
    let l = list(
        &[cscd(SERIAL_A, 512), cscd("0d0d0d0d", 512)],
        &[seg(0, 1, 8, 0, 0)],
    );
    assert_eq!(key_asc(&xcopy(&mut a, &l).1), (0x0a, 0x0d, 0x02));
    // Past the end of the destination: nothing is written.
    let blocks = 4 * MIB / 512;
    let l = list(
        &[cscd(SERIAL_A, 512), cscd(SERIAL_B, 512)],
        &[seg(0, 1, 8, 0, 0), seg(0, 1, 8, 0, blocks - 4)],
    );
    assert_eq!(key_asc(&xcopy(&mut a, &l).1), (0x0a, 0x21, 0x00));
    // The host's block length is not the LUN's.
    let l = list(
        &[cscd(SERIAL_A, 512), cscd("0c0c0c0c-9999", 512)],
        &[seg(0, 1, 8, 0, 0)],
    );
    assert_eq!(key_asc(&xcopy(&mut a, &l).1), (0x0a, 0x0d, 0x03));
    // A decoding fault: ILLEGAL REQUEST with a field pointer into the
    // parameter list (byte 1, LIST ID USAGE 00b asks for held results).
    let mut l = list(&[cscd(SERIAL_A, 512)], &[seg(0, 0, 8, 0, 8)]);
    l[1] = 0;
    let (st, sense) = xcopy(&mut a, &l);
    assert_eq!(st, 2);
    let s = sense.unwrap();
    assert_eq!((s[2] & 0xf, s[12], s[13]), (0x05, 0x26, 0x00));
    assert_eq!(&s[15..18], &[0x8c, 0x00, 0x01]);
    // LID4 service actions are not served.
    let mut c = xcopy_cdb(0);
    c[1] = 0x01;
    let (st, sense, _) = run(&mut a, &c, Data::None);
    assert_eq!((st, key_asc(&sense)), (2, (0x05, 0x24, 0x00)));
    // A zero-length list is no error.
    assert_eq!(run(&mut a, &xcopy_cdb(0), Data::None).0, 0);
    // The first segment of the out-of-range copy was not run either.
    assert_eq!(read(&mut a, 0, 8), pattern(1, 4096));
    reg.stop_all();
}

#[test]
fn the_lun_reports_what_its_copy_manager_serves() {
    let reg = Registry::new();
    let mut a = lun(&reg, "a", SERIAL_A, 4 * MIB, 512);
    // Standard INQUIRY: 3PC.
    let (st, _, d) = run(&mut a, &[0x12, 0, 0, 0, 96, 0], Data::FromDevice(96));
    assert_eq!(st, 0);
    assert_eq!(d[5] & 0x08, 0x08, "3PC");
    // VPD 0x00 lists 0x8F, which answers.
    let (_, _, d) = run(&mut a, &[0x12, 1, 0, 0, 64, 0], Data::FromDevice(64));
    assert!(d[4..4 + d[3] as usize].contains(&0x8f));
    let (st, _, d) = run(&mut a, &[0x12, 1, 0x8f, 0, 255, 0], Data::FromDevice(255));
    assert_eq!((st, d[1]), (0, 0x8f));
    // RECEIVE COPY RESULTS, OPERATING PARAMETERS.
    let mut c = [0u8; 16];
    c[0] = 0x84;
    c[1] = 0x03;
    c[13] = 64;
    let (st, _, d) = run(&mut a, &c, Data::FromDevice(64));
    assert_eq!(st, 0);
    assert_eq!(d[4] & 1, 1, "SNLID");
    assert!(
        u16::from_be_bytes([d[10], d[11]]) >= 2,
        "segments per command"
    );
    // Other RECEIVE COPY RESULTS service actions are refused.
    c[1] = 0x00;
    let (st, sense, _) = run(&mut a, &c, Data::FromDevice(64));
    assert_eq!((st, key_asc(&sense)), (2, (0x05, 0x24, 0x00)));
    reg.stop_all();
}
