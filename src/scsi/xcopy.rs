//! EXTENDED COPY (LID1), RECEIVE COPY RESULTS and the Third-party Copy
//! VPD page (SPC-4 6.4, 6.18, 7.8.17): what VMware's VAAI clone and
//! Storage vMotion offload use.
//!
//! This module decodes the parameter list into a [`CopyPlan`] and says
//! what the copy manager supports; it does no I/O. The daemon's copy
//! engine (`crate::copy`) finds the logical units the plan names (by the
//! NAA designator of their VPD page 0x83), checks the ranges, and moves
//! the data backend to backend, so nothing crosses the initiator's link.
//!
//! Served: block-to-block segment descriptors (type 02h) between
//! identification CSCD descriptors (type E4h) naming an NAA designator,
//! LIST ID USAGE 10b or 11b (the copy manager keeps no results: the
//! command ends when the copy does). Everything else ends with the sense
//! SPC-4 gives for it, with the field pointer into the parameter list.

use super::sense::{self, invalid_param, Sense};

/// The parameter list header.
pub const HEADER_LEN: usize = 16;
/// One identification CSCD descriptor.
pub const CSCD_LEN: usize = 32;
/// One block-to-block segment descriptor.
pub const SEGMENT_LEN: usize = 28;
/// CSCD descriptors one command may carry.
pub const MAX_CSCDS: usize = 8;
/// Segment descriptors one command may carry.
pub const MAX_SEGMENTS: usize = 32;
/// The largest descriptor list (CSCDs plus segments) taken.
pub const MAX_DESCRIPTOR_LIST: usize = MAX_CSCDS * CSCD_LEN + MAX_SEGMENTS * SEGMENT_LEN;
/// Copies the engine runs at once daemon-wide (more wait their turn).
pub const MAX_CONCURRENT_COPIES: u16 = 2;

/// CSCD descriptor type: identification descriptor (SPC-4 6.4.5.2).
const CSCD_IDENTIFICATION: u8 = 0xe4;
/// Segment descriptor type: block device to block device (SPC-4 6.4.6.5).
const SEG_BLOCK_TO_BLOCK: u8 = 0x02;

/// An NAA designator (the 16-byte IEEE Registered Extended form LIO and
/// this daemon report in VPD page 0x83).
pub type Designator = [u8; 16];

/// One copy source or destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cscd {
    /// The logical unit's NAA designator.
    pub naa: Designator,
    /// The DISK BLOCK LENGTH the host assumes.
    pub block_len: u32,
}

/// One block-to-block segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Index of the source in [`CopyPlan::cscds`].
    pub src: usize,
    /// Index of the destination.
    pub dst: usize,
    /// Logical blocks to copy (of the source's block length).
    pub blocks: u32,
    /// First source block.
    pub src_lba: u64,
    /// First destination block.
    pub dst_lba: u64,
}

/// A decoded EXTENDED COPY parameter list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyPlan {
    /// The CSCD descriptors, in list order.
    pub cscds: Vec<Cscd>,
    /// The segments, run in order.
    pub segments: Vec<Segment>,
}

impl CopyPlan {
    /// Bytes the plan moves.
    pub fn bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| {
                let bl = self.cscds.get(s.src).map_or(0, |c| u64::from(c.block_len));
                u64::from(s.blocks) * bl
            })
            .sum()
    }
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

fn field(byte: usize, bit: u8) -> Sense {
    invalid_param(u16::try_from(byte).unwrap_or(u16::MAX), Some(bit))
}

/// Decodes an LID1 parameter list (`list` is exactly the PARAMETER LIST
/// LENGTH bytes of the data-out buffer).
pub fn parse(list: &[u8]) -> Result<CopyPlan, Sense> {
    if list.len() < HEADER_LEN {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    // LIST ID USAGE 00b/01b ask the copy manager to keep results for
    // RECEIVE COPY STATUS, which it does not offer.
    match (list[1] >> 3) & 0x03 {
        0b10 => {}
        0b11 if list[0] == 0 => {}
        0b11 => return Err(field(0, 7)),
        _ => return Err(field(1, 4)),
    }
    let cscd_len = be16(list, 2);
    let seg_len = be32(list, 8);
    let inline_len = be32(list, 12);
    if inline_len != 0 {
        return Err(field(12, 7));
    }
    if !cscd_len.is_multiple_of(CSCD_LEN) {
        return Err(field(2, 7));
    }
    if cscd_len > MAX_CSCDS * CSCD_LEN {
        return Err(sense::TOO_MANY_TARGET_DESCRIPTORS);
    }
    if seg_len > MAX_SEGMENTS * SEGMENT_LEN {
        return Err(sense::TOO_MANY_SEGMENT_DESCRIPTORS);
    }
    if HEADER_LEN + cscd_len + seg_len > list.len() {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    let cscds = (0..cscd_len / CSCD_LEN)
        .map(|i| parse_cscd(list, HEADER_LEN + i * CSCD_LEN))
        .collect::<Result<Vec<_>, _>>()?;
    let mut segments = Vec::new();
    let mut at = HEADER_LEN + cscd_len;
    let end = at + seg_len;
    while at < end {
        if segments.len() == MAX_SEGMENTS {
            return Err(sense::TOO_MANY_SEGMENT_DESCRIPTORS);
        }
        let (seg, len) = parse_segment(list, at, end, cscds.len())?;
        segments.push(seg);
        at += len;
    }
    Ok(CopyPlan { cscds, segments })
}

fn parse_cscd(list: &[u8], at: usize) -> Result<Cscd, Sense> {
    let d = &list[at..at + CSCD_LEN];
    if d[0] != CSCD_IDENTIFICATION {
        return Err(sense::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE);
    }
    // NUL (a null device) and peripheral types other than a block device.
    if d[1] & 0x20 != 0 {
        return Err(field(at + 1, 5));
    }
    if d[1] & 0x1f != 0 {
        return Err(field(at + 1, 4));
    }
    // Binary code set, associated with the logical unit, NAA, 16 bytes
    // in the IEEE Registered Extended format.
    if d[4] & 0x0f != 0x01 {
        return Err(field(at + 4, 3));
    }
    if d[5] & 0x30 != 0 {
        return Err(field(at + 5, 5));
    }
    if d[5] & 0x0f != 0x03 {
        return Err(field(at + 5, 3));
    }
    if d[7] != 16 {
        return Err(field(at + 7, 7));
    }
    if d[8] >> 4 != 0x6 {
        return Err(field(at + 8, 7));
    }
    let mut naa = [0u8; 16];
    naa.copy_from_slice(&d[8..24]);
    let block_len = u32::from_be_bytes([0, d[29], d[30], d[31]]);
    if block_len == 0 {
        return Err(field(at + 29, 7));
    }
    Ok(Cscd { naa, block_len })
}

/// One segment descriptor at `at`, and its length.
fn parse_segment(
    list: &[u8],
    at: usize,
    end: usize,
    cscds: usize,
) -> Result<(Segment, usize), Sense> {
    if at + 4 > end {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    if list[at] != SEG_BLOCK_TO_BLOCK {
        return Err(sense::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE);
    }
    if be16(list, at + 2) != SEGMENT_LEN - 4 {
        return Err(field(at + 2, 7));
    }
    if at + SEGMENT_LEN > end {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    let src = be16(list, at + 4);
    if src >= cscds {
        return Err(field(at + 4, 7));
    }
    let dst = be16(list, at + 6);
    if dst >= cscds {
        return Err(field(at + 6, 7));
    }
    Ok((
        Segment {
            src,
            dst,
            blocks: be16(list, at + 10) as u32,
            src_lba: be64(list, at + 12),
            dst_lba: be64(list, at + 20),
        },
        SEGMENT_LEN,
    ))
}

/// The most bytes one segment may move (the 16-bit block count of the
/// largest block length this daemon serves).
fn max_segment_bytes(block_size: u32) -> u32 {
    65_535u32.saturating_mul(block_size)
}

/// RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 6.18.4).
pub fn operating_parameters(block_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 44];
    b[4] = 0x01; // SNLID: LIST ID USAGE 11b is served
    b[8..10].copy_from_slice(&(MAX_CSCDS as u16).to_be_bytes());
    b[10..12].copy_from_slice(&(MAX_SEGMENTS as u16).to_be_bytes());
    b[12..16].copy_from_slice(&(MAX_DESCRIPTOR_LIST as u32).to_be_bytes());
    b[16..20].copy_from_slice(&max_segment_bytes(block_size).to_be_bytes());
    // Maximum inline data length, held data limit, stream transfer: 0.
    b[34..36].copy_from_slice(&MAX_CONCURRENT_COPIES.to_be_bytes());
    b[36] = MAX_CONCURRENT_COPIES as u8;
    // Granularities (log2): one logical block.
    let gran = block_size.max(1).trailing_zeros() as u8;
    b[37] = gran;
    b[38] = gran;
    b[39] = gran;
    // The implemented descriptor type codes.
    b.push(SEG_BLOCK_TO_BLOCK);
    b.push(CSCD_IDENTIFICATION);
    b[43] = 2;
    let avail = (b.len() - 4) as u32;
    b[0..4].copy_from_slice(&avail.to_be_bytes());
    b
}

/// The Third-party Copy VPD page's payload (SPC-4 7.8.17) for LID1: the
/// supported commands, the parameter data limits, the supported
/// descriptors and the general copy operations descriptor.
pub fn third_party_copy_vpd(block_size: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    let mut desc = |kind: u16, body: &[u8]| {
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(body);
    };
    // Supported commands: EXTENDED COPY(LID1), RECEIVE COPY RESULTS
    // (OPERATING PARAMETERS); padded to a multiple of four.
    let cmds = [
        super::cdb::op::EXTENDED_COPY,
        1,
        super::cdb::sa::EXTENDED_COPY_LID1,
        super::cdb::op::RECEIVE_COPY_RESULTS,
        1,
        super::cdb::sa::COPY_OPERATING_PARAMETERS,
    ];
    let mut body = vec![cmds.len() as u8];
    body.extend_from_slice(&cmds);
    body.resize(body.len().div_ceil(4) * 4, 0);
    desc(0x0001, &body);
    // Parameter data.
    let mut body = [0u8; 28];
    body[4..6].copy_from_slice(&(MAX_CSCDS as u16).to_be_bytes());
    body[6..8].copy_from_slice(&(MAX_SEGMENTS as u16).to_be_bytes());
    body[8..12].copy_from_slice(&(MAX_DESCRIPTOR_LIST as u32).to_be_bytes());
    desc(0x0004, &body);
    // Supported descriptors.
    desc(0x0008, &[2, SEG_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION, 0]);
    // Supported CSCD IDs above 07FFh: none (CSCDs are named by index).
    desc(0x000c, &[0, 0, 0, 0]);
    // General copy operations.
    let mut body = [0u8; 32];
    body[0..4].copy_from_slice(&u32::from(MAX_CONCURRENT_COPIES).to_be_bytes());
    body[4..8].copy_from_slice(&u32::from(MAX_CONCURRENT_COPIES).to_be_bytes());
    body[8..12].copy_from_slice(&max_segment_bytes(block_size).to_be_bytes());
    let gran = block_size.max(1).trailing_zeros() as u8;
    body[12] = gran;
    body[13] = gran;
    desc(0x8001, &body);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::sense::key;
    use tcmu_rbd_testkit::cdb::{xcopy_cscd as cscd, xcopy_list as list, xcopy_segment as seg};

    const A: Designator = [
        0x60, 0x01, 0x40, 0x5a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];
    const B: Designator = [
        0x60, 0x01, 0x40, 0x5b, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];

    /// A list as sg_xcopy and ESXi send it: no list id, two CSCDs.
    fn good() -> Vec<u8> {
        list(&[cscd(&A, 512), cscd(&B, 512)], &[seg(0, 1, 128, 10, 20)])
    }

    #[test]
    fn a_list_from_one_lun_to_another_decodes() {
        let p = parse(&good()).unwrap();
        assert_eq!(p.cscds.len(), 2);
        assert_eq!(p.cscds[0].naa, A);
        assert_eq!(p.cscds[1].naa, B);
        assert_eq!(
            p.segments,
            vec![Segment {
                src: 0,
                dst: 1,
                blocks: 128,
                src_lba: 10,
                dst_lba: 20
            }]
        );
        assert_eq!(p.bytes(), 128 * 512);
    }

    #[test]
    fn every_fault_gets_its_sense_and_field_pointer() {
        let sks = |byte: u16, bit: u8| Some([0x88 | bit, (byte >> 8) as u8, byte as u8]);
        type Mangle = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Mangle, Sense)> = vec![
            (
                "short header",
                Box::new(|l| l.truncate(15)),
                sense::PARAM_LIST_LENGTH_ERROR,
            ),
            (
                "list id usage 00b (keep results)",
                Box::new(|l| l[1] = 0),
                sense::INVALID_FIELD_IN_PARAM,
            ),
            (
                "no list id but an id",
                Box::new(|l| l[0] = 7),
                sense::INVALID_FIELD_IN_PARAM,
            ),
            (
                "inline data",
                Box::new(|l| l[15] = 4),
                sense::INVALID_FIELD_IN_PARAM,
            ),
            (
                "cscd list not a multiple of 32",
                Box::new(|l| l[3] = 63),
                sense::INVALID_FIELD_IN_PARAM,
            ),
            (
                "cscd type 0xe0",
                Box::new(|l| l[16] = 0xe0),
                sense::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE,
            ),
            (
                "segment type 0x0a",
                Box::new(|l| l[80] = 0x0a),
                sense::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE,
            ),
            (
                "list shorter than its descriptors",
                Box::new(|l| l.truncate(100)),
                sense::PARAM_LIST_LENGTH_ERROR,
            ),
        ];
        for (what, mangle, want) in cases {
            let mut l = good();
            mangle(&mut l);
            let got = parse(&l).expect_err(what);
            assert_eq!(
                (got.key, got.asc, got.ascq),
                (want.key, want.asc, want.ascq),
                "{what}"
            );
        }
        // Field pointers into the parameter list (C/D = 0).
        let at = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut l = good();
            f(&mut l);
            parse(&l).unwrap_err().sks
        };
        assert_eq!(at(&|l| l[1] = 0x08), sks(1, 4));
        assert_eq!(at(&|l| l[0] = 1), sks(0, 7));
        assert_eq!(at(&|l| l[16 + 1] = 0x20), sks(17, 5), "NUL device");
        assert_eq!(at(&|l| l[16 + 1] = 0x05), sks(17, 4), "not a block device");
        assert_eq!(at(&|l| l[48 + 4] = 0x02), sks(52, 3), "ASCII code set");
        assert_eq!(at(&|l| l[48 + 5] = 0x13), sks(53, 5), "port association");
        assert_eq!(at(&|l| l[48 + 5] = 0x02), sks(53, 3), "EUI-64 designator");
        assert_eq!(at(&|l| l[48 + 7] = 8), sks(55, 7), "8-byte NAA");
        assert_eq!(at(&|l| l[48 + 8] = 0x50), sks(56, 7), "NAA 5");
        assert_eq!(at(&|l| l[48 + 30] = 0), sks(77, 7), "block length 0");
        assert_eq!(at(&|l| l[80 + 3] = 0x20), sks(82, 7), "segment length");
        assert_eq!(at(&|l| l[80 + 5] = 2), sks(84, 7), "source index");
        assert_eq!(at(&|l| l[80 + 7] = 9), sks(86, 7), "destination index");
    }

    #[test]
    fn descriptor_counts_are_bounded() {
        let many: Vec<Vec<u8>> = (0..MAX_CSCDS + 1).map(|_| cscd(&A, 512)).collect();
        let l = list(&many, &[seg(0, 1, 1, 0, 0)]);
        assert_eq!(parse(&l).unwrap_err(), sense::TOO_MANY_TARGET_DESCRIPTORS);
        let segs: Vec<Vec<u8>> = (0..MAX_SEGMENTS + 1).map(|_| seg(0, 1, 1, 0, 0)).collect();
        let l = list(&[cscd(&A, 512), cscd(&B, 512)], &segs);
        assert_eq!(parse(&l).unwrap_err(), sense::TOO_MANY_SEGMENT_DESCRIPTORS);
        let segs: Vec<Vec<u8>> = (0..MAX_SEGMENTS).map(|_| seg(0, 1, 1, 0, 0)).collect();
        let l = list(&[cscd(&A, 512), cscd(&B, 512)], &segs);
        assert_eq!(parse(&l).unwrap().segments.len(), MAX_SEGMENTS);
        assert_eq!(
            sense::TOO_MANY_SEGMENT_DESCRIPTORS.key,
            key::ILLEGAL_REQUEST
        );
    }

    #[test]
    fn no_list_and_no_byte_of_a_list_panics() {
        let g = good();
        for n in 0..=g.len() {
            let _ = parse(&g[..n]);
        }
        for i in 0..g.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut l = g.clone();
                l[i] = v;
                let _ = parse(&l);
            }
        }
    }

    #[test]
    fn operating_parameters_and_vpd_report_the_limits_the_parser_keeps() {
        let b = operating_parameters(512);
        assert_eq!(
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
            b.len() - 4
        );
        assert_eq!(b[4] & 1, 1);
        assert_eq!(u16::from_be_bytes([b[8], b[9]]) as usize, MAX_CSCDS);
        assert_eq!(u16::from_be_bytes([b[10], b[11]]) as usize, MAX_SEGMENTS);
        assert_eq!(b[43], 2);
        assert_eq!(&b[44..46], &[0x02, 0xe4]);
        assert_eq!(b[37], 9);
        let v = third_party_copy_vpd(4096);
        // Walk the descriptors: each is type, length, body.
        let mut at = 0;
        let mut kinds = vec![];
        while at < v.len() {
            kinds.push(u16::from_be_bytes([v[at], v[at + 1]]));
            at += 4 + usize::from(u16::from_be_bytes([v[at + 2], v[at + 3]]));
        }
        assert_eq!(at, v.len());
        // Supported commands, parameter data, supported descriptors,
        // supported CSCD IDs, general copy operations (SPC-4 7.8.17).
        assert_eq!(kinds, vec![0x0001, 0x0004, 0x0008, 0x000c, 0x8001]);
    }
}
