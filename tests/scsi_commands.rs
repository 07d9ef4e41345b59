//! Emulated SCSI commands against the byte layouts of SPC-4 and SBC-3:
//! INQUIRY and its VPD pages, READ CAPACITY, MODE SENSE/SELECT, REQUEST
//! SENSE, REPORT SUPPORTED OPERATION CODES, and the sense for bad fields.

mod scsi_util;

use scsi_util::*;
use tcmu_handler::{Caps, Geometry, IoBufs};
use tcmu_rbd::scsi::{Lun, LunInfo, Outcome, Response};

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

#[test]
fn standard_inquiry() {
    let mut t = T::new(2048);
    let d = t.good_in(&inquiry(false, 0, 255), 255);
    assert_eq!(d.len(), 74, "read_len is the data produced");
    assert_eq!(d[0], 0x00, "qualifier 0, direct access");
    assert_eq!(d[1], 0x00, "not removable");
    assert_eq!(d[2], 0x06, "SPC-4");
    assert_eq!(d[3] & 0x0f, 0x02, "response data format 2");
    assert_eq!(d[3] & 0x10, 0x10, "HISUP");
    assert_eq!(usize::from(d[4]) + 5, d.len(), "ADDITIONAL LENGTH");
    assert_eq!(d[5] & 0x30, 0, "TPGS 0 without ALUA");
    assert_eq!(d[7] & 0x02, 0x02, "CMDQUE");
    assert_eq!(&d[8..16], b"LIO-ORG ");
    assert_eq!(&d[16..32], b"TCMU device     ");
    assert_eq!(&d[32..36], b"0002");
    // Version descriptors: SAM-5, SPC-4, SBC-3.
    assert_eq!(&d[58..64], &[0x00, 0xa0, 0x04, 0x60, 0x04, 0xc0]);
}

#[test]
fn inquiry_allocation_length_truncates() {
    let mut t = T::new(2048);
    let d = t.good_in(&inquiry(false, 0, 36), 36);
    assert_eq!(d.len(), 36);
    assert_eq!(&d[8..16], b"LIO-ORG ");
    // A buffer smaller than the allocation length bounds the copy too.
    let (r, d) = t.din(&inquiry(false, 0, 255), 10);
    assert_eq!(r.read_len, Some(10));
    assert_eq!(d.len(), 10);
    // Allocation length 0: nothing transferred, not an error.
    let (r, _) = t.din(&inquiry(false, 0, 0), 0);
    assert_eq!((r.status, r.read_len), (0, Some(0)));
    // VPD page 0x83 cut at 8 bytes keeps the header's full length.
    let d = t.good_in(&inquiry(true, 0x83, 8), 8);
    assert_eq!(d.len(), 8);
    assert!(u16::from_be_bytes([d[2], d[3]]) > 4);
}

#[test]
fn inquiry_bad_fields() {
    let mut t = T::new(2048);
    // Page code without EVPD: byte 2.
    let s = t.sense(&inquiry(false, 0x80, 255), vec![0; 255]);
    assert_field(&s, true, 2, Some(7));
    // Unknown VPD page.
    let s = t.sense(&inquiry(true, 0x99, 255), vec![0; 255]);
    assert_field(&s, true, 2, Some(7));
    // CMDDT.
    let s = t.sense(&[0x12, 0x02, 0, 0, 255, 0], vec![0; 255]);
    assert_field(&s, true, 1, Some(1));
}

#[test]
fn vpd_supported_pages_and_serial() {
    let mut t = T::new(2048);
    let d = t.good_in(&inquiry(true, 0x00, 255), 255);
    assert_eq!(&d[..4], &[0x00, 0x00, 0x00, 7]);
    assert_eq!(&d[4..], &[0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2]);
    let d = t.good_in(&inquiry(true, 0x80, 255), 255);
    let serial = b"5a1e0f00-cafe-4bee-8000-0123456789ab";
    assert_eq!(&d[..4], &[0x00, 0x80, 0x00, serial.len() as u8]);
    assert_eq!(&d[4..], serial);
}

#[test]
fn vpd_device_identification() {
    let mut t = T::new(2048);
    let d = t.good_in(&inquiry(true, 0x83, 512), 512);
    assert_eq!(&d[..2], &[0x00, 0x83]);
    assert_eq!(usize::from(u16::from_be_bytes([d[2], d[3]])) + 4, d.len());
    // 1: NAA IEEE Registered Extended, binary, LU association.
    assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 0x10]);
    // NAA 6, company id 00-14-05, then the serial's hex digits
    // 5a1e0f00cafe4bee8000012345... (25 nibbles).
    assert_eq!(
        &d[8..24],
        &[
            0x60, 0x01, 0x40, 0x55, 0xa1, 0xe0, 0xf0, 0x0c, 0xaf, 0xe4, 0xbe, 0xe8, 0x00, 0x00,
            0x12, 0x34
        ]
    );
    // 2: T10 vendor id, ASCII, LU association: vendor + serial.
    let serial = b"5a1e0f00-cafe-4bee-8000-0123456789ab";
    assert_eq!(&d[24..28], &[0x02, 0x01, 0x00, (8 + serial.len()) as u8]);
    assert_eq!(&d[28..36], b"LIO-ORG ");
    assert_eq!(&d[36..36 + serial.len()], serial);
    // No ALUA: no target port designators.
    assert_eq!(d.len(), 36 + serial.len());
}

#[test]
fn same_serial_same_naa_on_every_gateway() {
    let mut a = T::new(2048);
    let mut b = T::new(4096);
    let da = a.good_in(&inquiry(true, 0x83, 512), 512);
    let db = b.good_in(&inquiry(true, 0x83, 512), 512);
    assert_eq!(da, db);
}

#[test]
fn vpd_block_limits() {
    let mut t = T::new(1 << 21);
    let d = t.good_in(&inquiry(true, 0xb0, 255), 255);
    assert_eq!(d.len(), 64);
    assert_eq!(&d[..4], &[0x00, 0xb0, 0x00, 0x3c]);
    assert_eq!(d[4] & 0x01, 0x01, "WSNZ");
    assert_eq!(
        d[5], 32,
        "MAXIMUM COMPARE AND WRITE LENGTH = max transfer / 2"
    );
    let be32 = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
    assert_eq!(be32(8), 64, "MAXIMUM TRANSFER LENGTH");
    assert_eq!(be32(20), (1 << 30) / 512, "MAXIMUM UNMAP LBA COUNT");
    assert_eq!(be32(24), 256, "MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT");
    assert_eq!(be32(28), 8, "OPTIMAL UNMAP GRANULARITY: 4 KiB");
    assert_eq!(be32(32), 0x8000_0000, "UGAVALID, alignment 0");
    let mut ws = [0u8; 8];
    ws.copy_from_slice(&d[36..44]);
    assert_eq!(
        u64::from_be_bytes(ws),
        (1 << 30) / 512,
        "MAXIMUM WRITE SAME LENGTH"
    );
    // Without discard the UNMAP fields are zero.
    let mut t = T::with_caps(
        2048,
        Caps {
            discard: false,
            discard_zeroes: false,
            write_cache: false,
            lba_status: false,
        },
    );
    let d = t.good_in(&inquiry(true, 0xb0, 255), 255);
    assert_eq!(&d[20..36], &[0u8; 16]);
}

#[test]
fn vpd_characteristics_and_provisioning() {
    let mut t = T::new(2048);
    let d = t.good_in(&inquiry(true, 0xb1, 255), 255);
    assert_eq!(
        &d[..6],
        &[0x00, 0xb1, 0x00, 0x3c, 0x00, 0x01],
        "non-rotating"
    );
    let d = t.good_in(&inquiry(true, 0xb2, 255), 255);
    // LBPU | LBPWS | LBPWS10 | LBPRZ, provisioning type 010b (thin).
    assert_eq!(d, vec![0x00, 0xb2, 0x00, 0x04, 0x00, 0xe4, 0x02, 0x00]);
    let mut t = T::with_caps(
        2048,
        Caps {
            discard: true,
            discard_zeroes: false,
            write_cache: false,
            lba_status: false,
        },
    );
    let d = t.good_in(&inquiry(true, 0xb2, 255), 255);
    assert_eq!(
        d[5], 0xe0,
        "no LBPRZ when discarded blocks may not read zeros"
    );
}

fn bare_lun(blocks: u64, caps: Caps) -> Lun {
    Lun::new(LunInfo {
        vendor: "V".into(),
        product: "P".into(),
        revision: "1".into(),
        serial: "s".into(),
        geometry: Geometry {
            size: blocks * 512,
            block_size: 512,
        },
        caps,
        max_transfer_blocks: 64,
    })
}

fn run_in(lun: &mut Lun, cdb: &[u8], len: usize) -> (Response, Vec<u8>) {
    let bufs = IoBufs::from_vec(vec![0u8; len]);
    match lun.execute(cdb, &bufs) {
        Outcome::Done(r) => {
            let mut d = bufs.to_vec();
            d.truncate(r.read_len.unwrap_or(len as u32) as usize);
            (r, d)
        }
        Outcome::Submit(op, _) => panic!("unexpected backend op {op:?}"),
        Outcome::Copy(..) => panic!("unexpected copy"),
    }
}

#[test]
fn read_capacity_10_and_16() {
    let mut t = T::new(2048);
    let d = t.good_in(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(d, vec![0, 0, 0x07, 0xff, 0, 0, 0x02, 0x00]);
    let mut c16 = [0u8; 16];
    c16[0] = 0x9e;
    c16[1] = 0x10;
    c16[13] = 32;
    let d = t.good_in(&c16, 32);
    assert_eq!(&d[..8], &2047u64.to_be_bytes());
    assert_eq!(&d[8..12], &512u32.to_be_bytes());
    assert_eq!(d[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    // Allocation length 12 truncates.
    c16[13] = 12;
    let (r, d) = t.din(&c16, 32);
    assert_eq!(r.read_len, Some(12));
    assert_eq!(d.len(), 12);
    // PMI = 0 with a non-zero LBA.
    let s = t.sense(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], vec![0; 8]);
    assert_field(&s, true, 2, Some(7));
    // Unknown SERVICE ACTION IN(16) service action.
    c16[1] = 0x11;
    let s = t.sense(&c16, vec![0; 32]);
    assert_field(&s, true, 1, Some(4));
}

#[test]
fn read_capacity_10_saturates_on_huge_luns() {
    let no = Caps {
        discard: false,
        discard_zeroes: false,
        write_cache: false,
        lba_status: false,
    };
    // 2^33 blocks: the last LBA does not fit 32 bits.
    let mut lun = bare_lun(1 << 33, no);
    let (r, d) = run_in(&mut lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(r.status, 0);
    assert_eq!(d, vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0x02, 0x00]);
    let mut c16 = [0u8; 16];
    c16[0] = 0x9e;
    c16[1] = 0x10;
    c16[13] = 32;
    let (_, d) = run_in(&mut lun, &c16, 32);
    assert_eq!(&d[..8], &((1u64 << 33) - 1).to_be_bytes());
    assert_eq!(d[14] & 0xc0, 0, "no LBPME without discard");
    // MODE SENSE(6) block descriptor saturates too; (10) with LLBAA not.
    let (_, d) = run_in(&mut lun, &[0x1a, 0, 0x08, 0, 255, 0], 255);
    assert_eq!(&d[4..8], &[0xff; 4]);
    let (_, d) = run_in(&mut lun, &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], 256);
    assert_eq!(d[4] & 1, 1, "LONGLBA");
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
    assert_eq!(&d[8..16], &(1u64 << 33).to_be_bytes());
    assert_eq!(&d[20..24], &512u32.to_be_bytes());
}

fn mode_sense6(dbd: bool, pc: u8, page: u8, alloc: u8) -> [u8; 6] {
    [
        0x1a,
        if dbd { 0x08 } else { 0 },
        (pc << 6) | page,
        0,
        alloc,
        0,
    ]
}

#[test]
fn mode_sense_6_caching_page() {
    let mut t = T::new(2048);
    let d = t.good_in(&mode_sense6(false, 0, 0x08, 255), 255);
    // Header: length, medium type, WP=0/DPOFUA=1, block descriptor length 8.
    assert_eq!(&d[..4], &[(d.len() - 1) as u8, 0, 0x10, 8]);
    // Short block descriptor: 2048 blocks, density 0, 512-byte blocks.
    assert_eq!(&d[4..12], &[0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00]);
    // Caching page: code 08, length 0x12, WCE set (caching backend).
    assert_eq!(&d[12..14], &[0x08, 0x12]);
    assert_eq!(d[14] & 0x04, 0x04);
    assert_eq!(d.len(), 12 + 20);
    // DBD: no block descriptor.
    let d = t.good_in(&mode_sense6(true, 0, 0x08, 255), 255);
    assert_eq!(d[3], 0);
    assert_eq!(&d[4..6], &[0x08, 0x12]);
    // Changeable values: only WCE.
    let d = t.good_in(&mode_sense6(true, 1, 0x08, 255), 255);
    let mut expect = [0u8; 20];
    expect[0] = 0x08;
    expect[1] = 0x12;
    expect[2] = 0x04;
    assert_eq!(&d[4..], &expect[..]);
    // Saved values are not supported.
    let s = t.sense(&mode_sense6(true, 3, 0x08, 255), vec![0; 255]);
    assert_sense(&s, 5, 0x39, 0x00);
}

#[test]
fn mode_sense_all_pages_and_each() {
    let mut t = T::new(2048);
    let d = t.good_in(&mode_sense6(true, 0, 0x3f, 255), 255);
    // 01 (12 bytes), 08 (20), 0A (12), after a 4-byte header.
    assert_eq!(d.len(), 4 + 12 + 20 + 12);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(&d[4..6], &[0x01, 0x0a]);
    assert_eq!(&d[16..18], &[0x08, 0x12]);
    assert_eq!(&d[36..38], &[0x0a, 0x0a]);
    // Control page: D_SENSE 0 (fixed sense), QAM 1.
    assert_eq!(d[38] & 0x04, 0);
    assert_eq!(d[39] >> 4, 1);
    let d01 = t.good_in(&mode_sense6(true, 0, 0x01, 255), 255);
    assert_eq!(&d01[4..], &d[4..16]);
    let d0a = t.good_in(&mode_sense6(true, 0, 0x0a, 255), 255);
    assert_eq!(&d0a[4..], &d[36..48]);
    // Allocation length truncation keeps the full MODE DATA LENGTH.
    let (r, d) = t.din(&mode_sense6(true, 0, 0x3f, 10), 10);
    assert_eq!(r.read_len, Some(10));
    assert_eq!(d[0] as usize, 4 + 12 + 20 + 12 - 1);
    // Unknown page, unsupported subpage.
    let s = t.sense(&mode_sense6(true, 0, 0x1c, 255), vec![0; 255]);
    assert_field(&s, true, 2, Some(5));
    let s = t.sense(&[0x1a, 0x08, 0x08, 0x05, 255, 0], vec![0; 255]);
    assert_field(&s, true, 3, Some(7));
}

#[test]
fn mode_sense_10_header() {
    let mut t = T::new(2048);
    let d = t.good_in(&[0x5a, 0, 0x08, 0, 0, 0, 0, 0, 255, 0], 255);
    let len = u16::from_be_bytes([d[0], d[1]]) as usize;
    assert_eq!(len + 2, d.len());
    assert_eq!(d[3], 0x10, "DPOFUA, never WP");
    assert_eq!(d[4] & 1, 0, "short descriptor without LLBAA");
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 8);
    assert_eq!(&d[8..16], &[0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00]);
    assert_eq!(&d[16..18], &[0x08, 0x12]);
}

fn caching_page(wce: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    if wce {
        p[2] = 0x04;
    }
    p
}

#[test]
fn mode_select_toggles_wce_and_forces_fua() {
    let mut t = T::new(2048);
    assert!(t.lun.write_cache_enabled());
    // MODE SELECT(6), PF, header + caching page with WCE = 0.
    let mut list = vec![0, 0, 0, 0];
    list.extend(caching_page(false));
    t.good(&[0x15, 0x10, 0, 0, list.len() as u8, 0], &list);
    assert!(!t.lun.write_cache_enabled());
    let d = t.good_in(&mode_sense6(true, 0, 0x08, 255), 255);
    assert_eq!(d[6] & 0x04, 0, "MODE SENSE shows the new WCE");
    // Write-through: every write is FUA.
    t.good(&rw10(0x2a, 0, 0, 1), &[1u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::Write {
            off: 0,
            len: 512,
            fua: true
        }]
    );
    // MODE SELECT(10) with a block descriptor that matches: WCE back on.
    let mut list = vec![0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00];
    list.extend(caching_page(true));
    let l = (list.len() as u16).to_be_bytes();
    t.good(&[0x55, 0x10, 0, 0, 0, 0, 0, l[0], l[1], 0], &list);
    assert!(t.lun.write_cache_enabled());
    t.good(&rw10(0x2a, 0, 0, 1), &[1u8; 512]);
    assert_eq!(
        t.ops(),
        vec![Rec::Write {
            off: 0,
            len: 512,
            fua: false
        }]
    );
}

#[test]
fn mode_select_refuses_what_is_not_changeable() {
    let mut t = T::new(2048);
    let sel6 = |len: usize| [0x15, 0x10, 0, 0, len as u8, 0];
    // RCD (bit 0 of byte 2) is not changeable: pointer at byte 4+2, bit 0.
    let mut list = vec![0, 0, 0, 0];
    let mut p = caching_page(true);
    p[2] |= 0x01;
    list.extend(&p);
    let s = t.sense(&sel6(list.len()), list.clone());
    assert_field(&s, false, 6, Some(0));
    // Nothing changed.
    assert!(t.lun.write_cache_enabled());
    // A page length that does not match.
    let mut list = vec![0, 0, 0, 0, 0x08, 0x0a];
    list.extend([0u8; 10]);
    let s = t.sense(&sel6(list.len()), list);
    assert_field(&s, false, 5, Some(7));
    // Unknown page.
    let list = vec![0, 0, 0, 0, 0x1c, 0x02, 0, 0];
    let s = t.sense(&sel6(list.len()), list);
    assert_field(&s, false, 4, Some(5));
    // Truncated page.
    let mut list = vec![0, 0, 0, 0];
    list.extend(&caching_page(true)[..10]);
    let s = t.sense(&sel6(list.len()), list);
    assert_sense(&s, 5, 0x1a, 0);
    // Block descriptor with another block length.
    let mut list = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0x00];
    list.extend(caching_page(true));
    let s = t.sense(&sel6(list.len()), list);
    assert_field(&s, false, 9, Some(7));
    // Control page: D_SENSE cannot be turned on.
    let mut list = vec![
        0, 0, 0, 0, 0x0a, 0x0a, 0x04, 0x10, 0, 0, 0, 0, 0xff, 0xff, 0, 0,
    ];
    let s = t.sense(&sel6(list.len()), list.clone());
    assert_field(&s, false, 6, Some(2));
    list[6] = 0;
    t.good(&sel6(list.len()), &list);
    // PF = 0 and SP = 1 are refused.
    let s = t.sense(&[0x15, 0x00, 0, 0, 0, 0], vec![]);
    assert_field(&s, true, 1, Some(4));
    let s = t.sense(&[0x15, 0x11, 0, 0, 0, 0], vec![]);
    assert_field(&s, true, 1, Some(0));
    // A buffer shorter than the parameter list length.
    let s = t.sense(&sel6(24), vec![0; 8]);
    assert_sense(&s, 5, 0x1a, 0);
}

#[test]
fn mode_select_wce_needs_a_backend_cache() {
    let mut t = T::with_caps(
        2048,
        Caps {
            discard: true,
            discard_zeroes: true,
            write_cache: false,
            lba_status: false,
        },
    );
    let d = t.good_in(&mode_sense6(true, 0, 0x08, 255), 255);
    assert_eq!(d[6] & 0x04, 0, "no cache, WCE 0");
    let mut list = vec![0, 0, 0, 0];
    list.extend(caching_page(true));
    let s = t.sense(&[0x15, 0x10, 0, 0, list.len() as u8, 0], list);
    assert_field(&s, false, 6, Some(2));
}

#[test]
fn request_sense_and_tur() {
    let mut t = T::new(2048);
    t.good(&[0, 0, 0, 0, 0, 0], &[]);
    let d = t.good_in(&[0x03, 0, 0, 0, 252, 0], 252);
    assert_eq!(d.len(), 18);
    assert_eq!(d[0], 0x70);
    assert_eq!((d[2], d[7], d[12], d[13]), (0, 10, 0, 0), "NO SENSE");
    let s = t.sense(&[0x03, 1, 0, 0, 252, 0], vec![0; 252]);
    assert_field(&s, true, 1, Some(0));
}

#[test]
fn unknown_opcodes() {
    let mut t = T::new(2048);
    for cdb in [
        &[0x04u8, 0, 0, 0, 0, 0][..],
        &[0x1b, 0, 0, 0, 1, 0],
        &[0x7f; 32],
        &[0xc0; 16],
        &[0xa3, 0x05, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    ] {
        let s = t.sense(cdb, vec![0; 256]);
        assert_sense(&s, 5, 0x20, 0);
    }
    // RTPG and STPG are not served without ALUA.
    let s = t.sense(&[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], vec![0; 256]);
    assert_sense(&s, 5, 0x20, 0);
    let s = t.sense(&[0xa4, 0x0a, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], vec![0; 8]);
    assert_sense(&s, 5, 0x20, 0);
}

fn rsoc(options: u8, rctd: bool, opcode: u8, sa: u16, alloc: u32) -> [u8; 12] {
    let s = sa.to_be_bytes();
    let a = alloc.to_be_bytes();
    [
        0xa3,
        0x0c,
        (u8::from(rctd) << 7) | options,
        opcode,
        s[0],
        s[1],
        a[0],
        a[1],
        a[2],
        a[3],
        0,
        0,
    ]
}

#[test]
fn report_supported_opcodes_all() {
    let mut t = T::new(2048);
    let d = t.good_in(&rsoc(0, false, 0, 0, 4096), 4096);
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len + 4, d.len());
    assert_eq!(len % 8, 0);
    let descs: Vec<&[u8]> = d[4..].chunks(8).collect();
    let find = |op: u8, sa: Option<u16>| {
        descs.iter().find(|x| {
            x[0] == op && (sa.is_none() || u16::from_be_bytes([x[2], x[3]]) == sa.unwrap())
        })
    };
    // READ(16): no service action, CDB length 16.
    let r16 = find(0x88, None).expect("READ(16) listed");
    assert_eq!(r16[5], 0x00);
    assert_eq!(u16::from_be_bytes([r16[6], r16[7]]), 16);
    // READ CAPACITY(16): SERVACTV, SA 0x10.
    let rc = find(0x9e, Some(0x10)).expect("READ CAPACITY(16) listed");
    assert_eq!(rc[5] & 0x01, 0x01);
    for op in [
        0x00, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x1a, 0x25, 0x28, 0x2a, 0x2e, 0x2f, 0x35, 0x41, 0x42,
        0x55, 0x5a, 0x89, 0x8a, 0x8e, 0x8f, 0x91, 0x93, 0xa8, 0xaa,
    ] {
        assert!(find(op, None).is_some(), "opcode {op:#x} listed");
    }
    // No ALUA: neither RTPG nor STPG.
    assert!(find(0xa4, None).is_none());
    assert!(find(0xa3, Some(0x0a)).is_none());
    // With RCTD each descriptor grows by a 12-byte timeouts descriptor.
    let d2 = t.good_in(&rsoc(0, true, 0, 0, 8192), 8192);
    let len2 = u32::from_be_bytes([d2[0], d2[1], d2[2], d2[3]]) as usize;
    assert_eq!(len2, len / 8 * 20);
    assert_eq!(d2[4 + 5] & 0x02, 0x02, "CTDP");
    assert_eq!(&d2[4 + 8..4 + 10], &[0x00, 0x0a]);
    // Truncation.
    let (r, _) = t.din(&rsoc(0, false, 0, 0, 16), 16);
    assert_eq!(r.read_len, Some(16));
}

#[test]
fn report_supported_opcodes_one() {
    let mut t = T::new(2048);
    // WRITE(10), opcode-only format.
    let d = t.good_in(&rsoc(1, false, 0x2a, 0, 64), 64);
    assert_eq!(&d[..4], &[0, 0x03, 0, 10], "SUPPORT 011b, CDB SIZE 10");
    assert_eq!(
        &d[4..14],
        &[0x2a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0]
    );
    // With RCTD: CTDP and the timeouts descriptor after the usage data.
    let d = t.good_in(&rsoc(1, true, 0x2a, 0, 64), 64);
    assert_eq!(d[1], 0x83);
    assert_eq!(d.len(), 4 + 10 + 12);
    // Opcode + SA format for READ CAPACITY(16).
    let d = t.good_in(&rsoc(2, false, 0x9e, 0x10, 64), 64);
    assert_eq!(&d[..4], &[0, 0x03, 0, 16]);
    assert_eq!(&d[4..6], &[0x9e, 0x10]);
    // Unsupported opcode: SUPPORT 001b, no usage data.
    let d = t.good_in(&rsoc(1, false, 0x1b, 0, 64), 64);
    assert_eq!(d, vec![0, 0x01, 0, 0]);
    // Opcode-only format for an opcode with service actions.
    let s = t.sense(&rsoc(1, false, 0x9e, 0, 64), vec![0; 64]);
    assert_field(&s, true, 2, Some(2));
    // Opcode + SA format for an opcode without.
    let s = t.sense(&rsoc(2, false, 0x28, 0, 64), vec![0; 64]);
    assert_field(&s, true, 2, Some(2));
    // Reserved reporting option.
    let s = t.sense(&rsoc(5, false, 0x28, 0, 64), vec![0; 64]);
    assert_field(&s, true, 2, Some(2));
    // UNMAP is reported only with discard.
    let d = t.good_in(&rsoc(1, false, 0x42, 0, 64), 64);
    assert_eq!(d[1] & 0x07, 0x03);
    let mut nd = T::with_caps(
        2048,
        Caps {
            discard: false,
            discard_zeroes: false,
            write_cache: false,
            lba_status: false,
        },
    );
    let d = nd.good_in(&rsoc(1, false, 0x42, 0, 64), 64);
    assert_eq!(d[1] & 0x07, 0x01);
    let s = nd.sense(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], vec![0; 24]);
    assert_sense(&s, 5, 0x20, 0);
}

/// The CDB usage data REPORT SUPPORTED OPERATION CODES reports and what
/// the decoders accept come from one table (`scsi::opcodes::COMMANDS`):
/// every flag (byte 1) and control-byte bit outside a command's usage
/// data is refused with ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at
/// that byte and bit, for every command the LUN serves.
#[test]
fn bits_outside_the_usage_data_are_refused_for_every_command() {
    use tcmu_rbd::scsi::opcodes::COMMANDS;
    let mut drift = Vec::new();
    for k in COMMANDS {
        for byte in [1, k.usage.len() - 1] {
            for bit in 0..8u8 {
                let mask = 1u8 << bit;
                if k.usage[byte] & mask != 0 {
                    continue;
                }
                // A CDB that is valid as far as usage goes: opcode and
                // service action, everything else zero.
                let mut cdb = k.usage.to_vec();
                cdb.iter_mut().skip(1).for_each(|b| *b = 0);
                if let Some(sa) = k.sa {
                    cdb[1] = sa;
                }
                if (byte == 1 && k.sa.is_some() && mask & 0x1f != 0) || cdb[byte] & mask != 0 {
                    continue; // the service action field itself
                }
                cdb[byte] |= mask;
                let mut t = T::with_alua_explicit(64);
                let (r, _) = t.run(&cdb, vec![0u8; 4096]);
                let ok = r.status == 2
                    && r.sense.as_ref().is_some_and(|s| {
                        let f = s.to_fixed();
                        f[2] & 0x0f == 5
                            && f[12] == 0x24
                            && f[15] == 0xc8 | bit
                            && usize::from(u16::from_be_bytes([f[16], f[17]])) == byte
                    });
                if !ok {
                    drift.push(format!(
                        "{:02x}{} byte {byte} bit {bit}: status {}",
                        k.opcode,
                        k.sa.map_or(String::new(), |s| format!("/{s:02x}")),
                        r.status
                    ));
                }
            }
        }
    }
    assert!(
        drift.is_empty(),
        "accepted outside the usage data:\n{}",
        drift.join("\n")
    );
}

/// DPO (byte 1 bit 4), which every read, write, verify and compare
/// command's usage data shows, is accepted by each of them.
#[test]
fn dpo_is_accepted_where_the_usage_data_shows_it() {
    use tcmu_rbd::scsi::opcodes::COMMANDS;
    // READ/WRITE(10/12/16), WRITE AND VERIFY, VERIFY, COMPARE AND WRITE.
    for op in [
        0x28, 0x2a, 0x2e, 0x2f, 0x88, 0x89, 0x8a, 0x8e, 0x8f, 0xa8, 0xaa,
    ] {
        let k = COMMANDS.iter().find(|k| k.opcode == op).unwrap();
        assert_eq!(k.usage[1] & 0x10, 0x10, "usage data of {op:02x} lacks DPO");
        let mut cdb = vec![0u8; k.usage.len()];
        cdb[0] = op;
        cdb[1] = 0x10;
        let mut t = T::new(64);
        let (r, _) = t.run(&cdb, vec![0u8; 4096]);
        assert_eq!(r.status, 0, "{op:02x} with DPO: {r:?}");
    }
}
