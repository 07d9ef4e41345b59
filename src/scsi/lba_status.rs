//! GET LBA STATUS(16) (SBC-4 5.8): which blocks from a starting LBA are
//! mapped and which deallocated.
//!
//! The CDB is decoded into a [`Query`]; the backend reports the byte
//! ranges it has allocated in a bounded span from the starting LBA
//! ([`MAX_SPAN_BYTES`], so one command on a huge LUN stays cheap); the
//! answer is an 8-byte header and 16-byte LBA status descriptors, as many
//! as the allocation length holds. The last descriptor may end before the
//! capacity: the initiator asks again from there.
//!
//! A block is reported deallocated only when the backend left every byte
//! of it out; a block partly allocated is mapped. With LBPRZ a
//! deallocated block reads zeros, as UNMAP left it. A backend that cannot
//! tell (no [`Caps::lba_status`](tcmu_handler::Caps)) gets no query: all
//! blocks are reported with status 0, which SBC-4 defines as "mapped or
//! unknown".

use super::cdb::Cdb;
use super::sense::{invalid_cdb, Sense, LBA_OUT_OF_RANGE};
use tcmu_handler::IoBufs;

/// Bytes of the LUN one command reports on at most (4 GiB: 1024 rbd
/// objects of 4 MiB).
pub const MAX_SPAN_BYTES: u64 = 4 << 30;

/// Provisioning status of a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Mapped (or unknown): 0.
    Mapped = 0,
    /// Deallocated: 1.
    Deallocated = 1,
}

/// Which descriptors the initiator asked for (REPORT TYPE, byte 14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportType {
    /// 00h: every LBA.
    All,
    /// 01h: LBAs with a non-zero provisioning status (deallocated or
    /// anchored).
    NonZero,
    /// 02h: mapped LBAs.
    Mapped,
    /// 03h: deallocated LBAs.
    Deallocated,
    /// 04h: anchored LBAs (none here), and 10h: LBAs that may return an
    /// unrecovered error (none known).
    Nothing,
}

impl ReportType {
    fn wants(self, s: Status) -> bool {
        match self {
            ReportType::All => true,
            ReportType::NonZero | ReportType::Deallocated => s == Status::Deallocated,
            ReportType::Mapped => s == Status::Mapped,
            ReportType::Nothing => false,
        }
    }
}

/// A decoded GET LBA STATUS in flight.
#[derive(Debug)]
pub struct Query {
    /// STARTING LBA.
    pub lba: u64,
    /// One past the last block reported on (bounded span).
    pub end: u64,
    /// `end` is the capacity (not the span bound).
    pub to_capacity: bool,
    /// REPORT TYPE.
    pub report: ReportType,
    /// Descriptors that fit the allocation length (at least one: the
    /// header then tells how much there would be).
    pub max_descriptors: usize,
    /// ALLOCATION LENGTH.
    pub alloc: usize,
    /// The data-in buffer.
    pub bufs: IoBufs,
}

/// Decodes the CDB of a LUN of `blocks` blocks of `bs` bytes.
pub fn decode(c: &Cdb, blocks: u64, bs: u64, bufs: &IoBufs) -> Result<Query, Sense> {
    let lba = c.be64(2);
    let alloc = c.be32(10) as usize;
    let report = match c.u8(14) {
        0x00 => ReportType::All,
        0x01 => ReportType::NonZero,
        0x02 => ReportType::Mapped,
        0x03 => ReportType::Deallocated,
        0x04 | 0x10 => ReportType::Nothing,
        _ => return Err(invalid_cdb(14, Some(7))),
    };
    if lba >= blocks {
        return Err(LBA_OUT_OF_RANGE);
    }
    let span = (MAX_SPAN_BYTES / bs.max(1)).max(1);
    let end = lba.saturating_add(span).min(blocks);
    let room = alloc.min(bufs.len()).saturating_sub(8) / 16;
    Ok(Query {
        lba,
        end,
        to_capacity: end == blocks,
        report,
        max_descriptors: room.max(1),
        alloc,
        bufs: bufs.clone(),
    })
}

/// The runs of `[q.lba, q.end)` in order: `allocated` are byte ranges,
/// sorted and not overlapping (as [`tcmu_handler::Op::Provisioning`]
/// fills them); a block any of whose bytes is allocated is mapped.
pub fn runs(q: &Query, bs: u64, allocated: &[(u64, u64)]) -> Vec<(u64, u64, Status)> {
    let bs = bs.max(1);
    let mut out: Vec<(u64, u64, Status)> = Vec::new();
    let mut push = |start: u64, end: u64, s: Status| {
        if start >= end {
            return;
        }
        match out.last_mut() {
            Some((ls, ln, st)) if *st == s && *ls + *ln == start => *ln += end - start,
            _ => out.push((start, end - start, s)),
        }
    };
    let mut pos = q.lba;
    for &(off, len) in allocated {
        if len == 0 {
            continue;
        }
        let first = (off / bs).max(pos);
        let last = off.saturating_add(len).div_ceil(bs).min(q.end);
        if last <= first {
            continue;
        }
        push(pos, first, Status::Deallocated);
        push(first, last, Status::Mapped);
        pos = last;
        if pos >= q.end {
            break;
        }
    }
    push(pos, q.end, Status::Deallocated);
    out
}

/// The parameter data: header and the descriptors `q` asks for, at most
/// `q.max_descriptors` (a run longer than a descriptor holds is split).
pub fn encode(q: &Query, runs: &[(u64, u64, Status)]) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    let mut n = 0;
    let mut cut = false;
    'runs: for &(mut lba, mut len, s) in runs {
        if !q.report.wants(s) {
            continue;
        }
        while len > 0 {
            if n == q.max_descriptors {
                cut = true;
                break 'runs;
            }
            let k = len.min(u64::from(u32::MAX));
            b.extend_from_slice(&lba.to_be_bytes());
            b.extend_from_slice(&(k as u32).to_be_bytes());
            b.extend_from_slice(&[s as u8, 0, 0, 0]);
            lba += k;
            len -= k;
            n += 1;
        }
    }
    // PARAMETER DATA LENGTH: the bytes after this field.
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    // Byte 7: COMPLETION CONDITION (bits 3..1): 001b the allocation
    // length was met, 011b the capacity was; 000b when the span bound
    // ended the answer (no condition names that). RTP (bit 0): the
    // REPORT TYPE field was acted on.
    let cond: u8 = if cut {
        1
    } else if q.to_capacity {
        3
    } else {
        0
    };
    b[7] = (cond << 1) | 0x01;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(lba: u64, alloc: u32, rt: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x12;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&alloc.to_be_bytes());
        c[14] = rt;
        c
    }

    fn q(lba: u64, alloc: u32, rt: u8, blocks: u64) -> Result<Query, Sense> {
        let raw = cdb(lba, alloc, rt);
        let c = Cdb::parse(&raw).expect("16 bytes");
        decode(&c, blocks, 512, &IoBufs::from_vec(vec![0; alloc as usize]))
    }

    #[test]
    fn out_of_range_and_reserved_report_types() {
        assert_eq!(q(100, 24, 0, 100).unwrap_err(), LBA_OUT_OF_RANGE);
        assert_eq!(q(u64::MAX, 24, 0, 100).unwrap_err(), LBA_OUT_OF_RANGE);
        let s = q(0, 24, 5, 100).unwrap_err().to_fixed();
        assert_eq!((s[2], s[12], s[13]), (0x05, 0x24, 0x00));
        // SKSV, C/D, BPV, bit 7 of byte 14.
        assert_eq!(&s[15..18], &[0xcf, 0x00, 0x0e]);
        assert!(q(0, 24, 0x11, 100).is_err());
        for rt in [0, 1, 2, 3, 4, 0x10] {
            assert!(q(99, 24, rt, 100).is_ok(), "report type {rt}");
        }
    }

    #[test]
    fn span_is_bounded() {
        let blocks = 10 * (MAX_SPAN_BYTES / 512);
        let x = q(5, 24, 0, blocks).unwrap();
        assert_eq!(x.end, 5 + MAX_SPAN_BYTES / 512);
        let x = q(blocks - 3, 24, 0, blocks).unwrap();
        assert_eq!(x.end, blocks);
        // Allocation length below one descriptor still makes one (cut).
        assert_eq!(q(0, 0, 0, 10).unwrap().max_descriptors, 1);
        assert_eq!(q(0, 8 + 16 * 3 + 15, 0, 10).unwrap().max_descriptors, 3);
    }

    #[test]
    fn runs_round_partial_blocks_to_mapped() {
        let x = q(0, 1024, 0, 100).unwrap();
        // Bytes 1000..1100 touch blocks 1 and 2; 51200.. is block 100 (past).
        let r = runs(
            &x,
            512,
            &[(1000, 100), (10 * 512, 512), (11 * 512, 1024), (51200, 9)],
        );
        assert_eq!(
            r,
            vec![
                (0, 1, Status::Deallocated),
                (1, 2, Status::Mapped),
                (3, 7, Status::Deallocated),
                (10, 3, Status::Mapped),
                (13, 87, Status::Deallocated),
            ]
        );
        assert_eq!(runs(&x, 512, &[]), vec![(0, 100, Status::Deallocated)]);
        assert_eq!(runs(&x, 512, &[(0, 51200)]), vec![(0, 100, Status::Mapped)]);
        // Starting inside a mapped run.
        let x = q(2, 1024, 0, 100).unwrap();
        assert_eq!(
            runs(&x, 512, &[(0, 2048)]),
            vec![(2, 2, Status::Mapped), (4, 96, Status::Deallocated)]
        );
    }

    #[test]
    fn encodes_header_and_descriptors() {
        let x = q(0, 40, 0, 100).unwrap();
        let r = vec![(0, 4, Status::Mapped), (4, 96, Status::Deallocated)];
        let d = encode(&x, &r);
        assert_eq!(d.len(), 40);
        assert_eq!(&d[0..8], &[0, 0, 0, 36, 0, 0, 0, 0x07], "capacity met, RTP");
        assert_eq!(&d[8..24], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
        assert_eq!(
            &d[24..40],
            &[0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 96, 1, 0, 0, 0]
        );
        // Room for one: the first only, allocation length met.
        let x = q(0, 24, 0, 100).unwrap();
        let d = encode(&x, &r);
        assert_eq!((d.len(), d[7]), (24, 0x03));
        // Only deallocated ones.
        let x = q(0, 1024, 3, 100).unwrap();
        let d = encode(&x, &r);
        assert_eq!(d.len(), 24);
        assert_eq!(&d[8..16], &4u64.to_be_bytes());
        // Anchored: none, header only.
        let x = q(0, 1024, 4, 100).unwrap();
        assert_eq!(encode(&x, &r), vec![0, 0, 0, 4, 0, 0, 0, 0x07]);
        // Ended by the span bound: no condition.
        let x = Query {
            to_capacity: false,
            ..q(0, 1024, 0, 100).unwrap()
        };
        assert_eq!(encode(&x, &r)[7], 0x01);
    }

    #[test]
    fn long_runs_split_at_32_bits() {
        let x = Query {
            lba: 0,
            end: 1 << 33,
            to_capacity: true,
            report: ReportType::All,
            max_descriptors: 8,
            alloc: 1024,
            bufs: IoBufs::from_vec(vec![0; 1024]),
        };
        let d = encode(&x, &[(0, 1 << 33, Status::Mapped)]);
        assert_eq!(d.len(), 8 + 3 * 16);
        assert_eq!(&d[16..20], &u32::MAX.to_be_bytes());
        assert_eq!(&d[24..32], &u64::from(u32::MAX).to_be_bytes());
        assert_eq!(&d[48..52], &2u32.to_be_bytes());
    }
}
