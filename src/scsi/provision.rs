//! Thin provisioning: UNMAP and WRITE SAME(10/16) (SBC-3 5.28, 5.42-5.43).

use super::cdb::{op, transfer, Cdb};
use super::sense::{self, invalid_cdb, invalid_param};
use super::{Kind, Lun, Outcome, Pending, Response};
use tcmu_handler::{IoBufs, Op};

/// Whether the first `len` bytes of `bufs` are all zero (no allocation:
/// checked through a stack buffer).
pub fn is_zero(bufs: &IoBufs, len: usize) -> bool {
    let mut chunk = [0u8; 512];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len());
        let got = bufs.copy_out(off, &mut chunk[..n]);
        if got < n || chunk[..n].iter().any(|&b| b != 0) {
            return false;
        }
        off += n;
    }
    true
}

impl Lun {
    /// A write-like operation: flushed afterwards when writes must be
    /// stable (WCE off on a caching backend).
    fn write_op(&self, op: Op) -> Outcome {
        Outcome::Submit(
            op,
            Pending {
                kind: Kind::Write,
                flush_after: self.write_through(),
            },
        )
    }

    /// UNMAP: the parameter list (8-byte header, 16-byte descriptors) is
    /// parsed within its stated and actual lengths; descriptor count and
    /// total blocks are held to the Block Limits VPD values, and every
    /// range to the capacity.
    pub(super) fn unmap(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        if !self.info.caps.discard {
            return Outcome::check(sense::INVALID_OPCODE);
        }
        if c.u8(1) & 0x01 != 0 {
            // ANCHOR: anchored blocks are not supported (ANC_SUP = 0).
            return Outcome::check(invalid_cdb(1, Some(0)));
        }
        let plen = usize::from(c.be16(7));
        if plen == 0 {
            return Outcome::Done(Response::good());
        }
        if plen < 8 {
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        }
        let Some(list) = Self::data_out(bufs, plen) else {
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        };
        let bd_len = usize::from(u16::from_be_bytes([list[2], list[3]]));
        if 8 + bd_len > plen {
            // The descriptors said to follow are not all there.
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        }
        // A partial descriptor at the end is ignored (SBC-3 5.28.2).
        let count = bd_len / 16;
        if count as u64 > u64::from(self.limits.max_unmap_descriptors) {
            return Outcome::check(invalid_param(2, Some(7)));
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total: u64 = 0;
        for i in 0..count {
            let d = &list[8 + 16 * i..8 + 16 * (i + 1)];
            let mut lba = [0u8; 8];
            lba.copy_from_slice(&d[0..8]);
            let lba = u64::from_be_bytes(lba);
            let n = u64::from(u32::from_be_bytes([d[8], d[9], d[10], d[11]]));
            if n == 0 {
                continue;
            }
            if let Err(s) = self.check_range(lba, n) {
                return Outcome::check(s);
            }
            total += n;
            if total > u64::from(self.limits.max_unmap_lbas) {
                return Outcome::check(invalid_param((8 + 16 * i + 8) as u16, Some(7)));
            }
            ranges.push((lba * self.bs, n * self.bs));
        }
        if ranges.is_empty() {
            return Outcome::Done(Response::good());
        }
        self.write_op(Op::Discard { ranges })
    }

    /// WRITE SAME(10/16). A zero pattern (or NDOB) becomes WriteZeroes,
    /// deallocating when UNMAP is set and the backend discards; any other
    /// pattern is written as is, UNMAP or not (the blocks must read back
    /// as the pattern). WSNZ is advertised: 0 blocks is refused.
    pub(super) fn write_same(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        let Some(t) = transfer(c) else {
            return Outcome::check(sense::INVALID_OPCODE);
        };
        let f = t.flags;
        if f & 0xe0 != 0 {
            return Outcome::check(invalid_cdb(1, Some(7)));
        }
        if f & 0x10 != 0 {
            return Outcome::check(invalid_cdb(1, Some(4)));
        }
        if f & 0x06 != 0 {
            // PBDATA/LBDATA (obsolete).
            return Outcome::check(invalid_cdb(1, Some(2)));
        }
        let ndob = f & 0x01 != 0;
        if ndob && c.opcode() == op::WRITE_SAME_10 {
            return Outcome::check(invalid_cdb(1, Some(0)));
        }
        let unmap = f & 0x08 != 0 && self.info.caps.discard;
        if t.blocks == 0 || u64::from(t.blocks) > self.limits.max_write_same {
            return Outcome::check(invalid_cdb(t.len_field, Some(7)));
        }
        if let Err(s) = self.check_range(t.lba, u64::from(t.blocks)) {
            return Outcome::check(s);
        }
        let offset = t.lba * self.bs;
        let len = u64::from(t.blocks) * self.bs;
        let bs = self.bs as usize;
        if ndob || {
            if bufs.len() < bs {
                // The one-block data-out buffer is missing.
                return Outcome::check(sense::INVALID_FIELD_IN_CDB);
            }
            is_zero(bufs, bs)
        } {
            return self.write_op(Op::WriteZeroes { offset, len, unmap });
        }
        match bufs.slice(0, bs) {
            Some(pattern) => self.write_op(Op::WriteSame {
                offset,
                len,
                pattern,
            }),
            None => Outcome::check(sense::INVALID_FIELD_IN_CDB),
        }
    }
}
