//! GET LBA STATUS(16) through the SCSI core (SBC-4 5.8): descriptors from
//! what the backend reports allocated, the span bound, the allocation
//! length, and the sense (with field pointers) for bad CDBs.

mod scsi_util;

use scsi_util::*;
use tcmu_handler::Caps;
use tcmu_rbd::scsi::lba_status::MAX_SPAN_BYTES;

fn glbas(lba: u64, alloc: u32, report_type: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c[14] = report_type;
    c
}

/// The descriptors of parameter data: (lba, blocks, status).
fn descriptors(d: &[u8]) -> Vec<(u64, u32, u8)> {
    assert!(d.len() >= 8, "no header: {d:02x?}");
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len + 4, d.len(), "PARAMETER DATA LENGTH");
    assert_eq!(d[7] & 0x01, 0x01, "RTP");
    d[8..]
        .chunks(16)
        .map(|x| {
            let mut lba = [0u8; 8];
            lba.copy_from_slice(&x[..8]);
            (
                u64::from_be_bytes(lba),
                u32::from_be_bytes([x[8], x[9], x[10], x[11]]),
                x[12] & 0x0f,
            )
        })
        .collect()
}

fn allocate(t: &T, blocks: &[(u64, u64)]) {
    *t.be.allocated.lock().unwrap() = blocks.iter().map(|&(b, n)| (b * BS, n * BS)).collect();
}

#[test]
fn mapped_and_deallocated_runs_from_the_starting_lba() {
    let mut t = T::new(100);
    allocate(&t, &[(8, 8), (40, 2)]);
    let d = t.good_in(&glbas(0, 1024, 0), 1024);
    assert_eq!(
        descriptors(&d),
        vec![(0, 8, 1), (8, 8, 0), (16, 24, 1), (40, 2, 0), (42, 58, 1)]
    );
    assert_eq!(
        t.ops(),
        vec![Rec::Provisioning {
            off: 0,
            len: 100 * BS
        }]
    );
    // From inside a mapped run: the first descriptor starts there.
    let d = t.good_in(&glbas(10, 1024, 0), 1024);
    assert_eq!(descriptors(&d)[0], (10, 6, 0));
    assert_eq!(
        t.ops(),
        vec![Rec::Provisioning {
            off: 10 * BS,
            len: 90 * BS
        }]
    );
    // The last LBA.
    let d = t.good_in(&glbas(99, 1024, 0), 1024);
    assert_eq!(descriptors(&d), vec![(99, 1, 1)]);
}

#[test]
fn report_types_filter_descriptors() {
    let mut t = T::new(100);
    allocate(&t, &[(8, 8)]);
    let mapped = t.good_in(&glbas(0, 1024, 2), 1024);
    assert_eq!(descriptors(&mapped), vec![(8, 8, 0)]);
    for rt in [1, 3] {
        let d = t.good_in(&glbas(0, 1024, rt), 1024);
        assert_eq!(descriptors(&d), vec![(0, 8, 1), (16, 84, 1)], "type {rt}");
    }
    for rt in [4, 0x10] {
        let d = t.good_in(&glbas(0, 1024, rt), 1024);
        assert!(descriptors(&d).is_empty(), "type {rt}");
    }
}

#[test]
fn allocation_length_bounds_the_descriptors() {
    let mut t = T::new(100);
    allocate(&t, &[(8, 8), (40, 2)]);
    // sg_get_lba_status's default: room for one descriptor; COMPLETION
    // CONDITION 001b: the allocation length was met.
    let d = t.good_in(&glbas(0, 24, 0), 1024);
    assert_eq!(descriptors(&d), vec![(0, 8, 1)]);
    assert_eq!((d[7] >> 1) & 0x07, 1);
    // All of it: 011b, the capacity was met.
    let d = t.good_in(&glbas(0, 1024, 0), 1024);
    assert_eq!((d[7] >> 1) & 0x07, 3);
    let d = t.good_in(&glbas(0, 8 + 2 * 16 + 8, 0), 1024);
    assert_eq!(d.len(), 40, "two whole descriptors");
    // Shorter than a descriptor: the data is cut, no error.
    let (r, d) = t.din(&glbas(0, 12, 0), 1024);
    assert_eq!((r.status, r.read_len), (0, Some(12)));
    assert_eq!(&d[..4], &[0, 0, 0, 20]);
    let (r, _) = t.din(&glbas(0, 0, 0), 1024);
    assert_eq!((r.status, r.read_len), (0, Some(0)));
}

#[test]
fn one_command_covers_a_bounded_span() {
    let span = MAX_SPAN_BYTES / BS;
    let mut t = T::new(2 * span);
    allocate(&t, &[(5, 1)]);
    let d = t.good_in(&glbas(0, 1024, 0), 1024);
    assert_eq!(
        descriptors(&d),
        vec![(0, 5, 1), (5, 1, 0), (6, span as u32 - 6, 1)]
    );
    assert_eq!(
        t.ops(),
        vec![Rec::Provisioning {
            off: 0,
            len: MAX_SPAN_BYTES
        }]
    );
    // The initiator goes on from where the answer ended.
    let d = t.good_in(&glbas(span, 1024, 0), 1024);
    assert_eq!(descriptors(&d), vec![(span, span as u32, 1)]);
    let d = t.good_in(&glbas(2 * span - 7, 1024, 0), 1024);
    assert_eq!(descriptors(&d), vec![(2 * span - 7, 7, 1)]);
}

#[test]
fn a_backend_that_cannot_tell_reports_mapped_or_unknown() {
    let caps = Caps {
        lba_status: false,
        ..caps_all()
    };
    let mut t = T::with_caps(100, caps);
    let d = t.good_in(&glbas(3, 1024, 0), 1024);
    assert_eq!(descriptors(&d), vec![(3, 97, 0)]);
    assert!(t.ops().is_empty(), "no backend query");
}

#[test]
fn bad_cdbs_and_lbas() {
    let mut t = T::new(100);
    // Starting LBA past the capacity.
    for lba in [100, u64::MAX] {
        let s = t.sense(&glbas(lba, 24, 0), vec![0; 24]);
        assert_sense(&s, 0x05, 0x21, 0x00);
    }
    // Reserved report types: INVALID FIELD IN CDB at byte 14.
    for rt in [5, 0x0f, 0x11, 0xff] {
        let s = t.sense(&glbas(0, 24, rt), vec![0; 24]);
        assert_field(&s, true, 14, Some(7));
    }
    // Reserved bits of byte 1 and the control byte.
    let mut c = glbas(0, 24, 0);
    c[1] |= 0x20;
    assert_field(&t.sense(&c, vec![0; 24]), true, 1, Some(5));
    let mut c = glbas(0, 24, 0);
    c[15] = 0x04;
    assert_field(&t.sense(&c, vec![0; 24]), true, 15, Some(2));
    // An unknown service action still points at the field.
    let mut c = glbas(0, 24, 0);
    c[1] = 0x13;
    assert_field(&t.sense(&c, vec![0; 24]), true, 1, Some(4));
    assert!(t.ops().is_empty());
}

#[test]
fn only_thin_provisioned_luns_serve_it() {
    let caps = Caps {
        discard: false,
        discard_zeroes: false,
        ..caps_all()
    };
    let mut t = T::with_caps(100, caps);
    assert_sense(&t.sense(&glbas(0, 24, 0), vec![0; 24]), 0x05, 0x20, 0x00);
    // Not in REPORT SUPPORTED OPERATION CODES either.
    let one = [0xa3, 0x0c, 0x02, 0x9e, 0x00, 0x12, 0, 0, 0, 64, 0, 0];
    let d = t.good_in(&one, 64);
    assert_eq!(d[1] & 0x07, 0x01, "SUPPORT 001b");
    // Thin provisioned: listed, with its usage data.
    let mut t = T::new(100);
    let d = t.good_in(&one, 64);
    assert_eq!(&d[..4], &[0, 0x03, 0, 16], "SUPPORT 011b, CDB SIZE 16");
    assert_eq!(&d[4..6], &[0x9e, 0x12]);
    assert_eq!(&d[6..18], &[0xff; 12], "STARTING LBA, ALLOCATION LENGTH");
    assert_eq!((d[18], d[19]), (0xff, 0x00), "REPORT TYPE, CONTROL");
}
