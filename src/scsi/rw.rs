//! The data path: READ/WRITE(6/10/12/16), WRITE AND VERIFY, VERIFY,
//! SYNCHRONIZE CACHE, READ CAPACITY (SBC-3 5.*). READ and WRITE 10/16
//! are the hot path: no allocation beyond the buffer view, no copies.

use super::cdb::{op, transfer, Cdb, Transfer};
use super::sense::{self, invalid_cdb, Sense};
use super::{Kind, Lun, Outcome, Pending, Response};
use tcmu_handler::{IoBufs, Op};

/// A VERIFY with BYTCHK in flight: the media was read into `media`.
#[derive(Debug)]
pub struct Verify {
    /// What the backend read.
    media: IoBufs,
    /// The initiator's data-out buffer.
    expected: IoBufs,
    /// BYTCHK 11b: `expected` is one block to compare with every block.
    one_block: Option<usize>,
}

impl Verify {
    /// GOOD, or MISCOMPARE with INFORMATION = the offset of the first
    /// differing byte in the data-out buffer (as COMPARE AND WRITE does).
    pub(super) fn compare(&self) -> Response {
        let media = self.media.to_vec();
        let expected = self.expected.to_vec();
        let diff = match self.one_block {
            None => media.iter().zip(&expected).position(|(a, b)| a != b),
            Some(bs) if bs > 0 => media
                .chunks(bs)
                .find_map(|blk| blk.iter().zip(&expected).position(|(a, b)| a != b)),
            Some(_) => None,
        };
        match diff {
            None => Response::good(),
            Some(i) => {
                Response::check(sense::MISCOMPARE.with_info(u32::try_from(i).unwrap_or(u32::MAX)))
            }
        }
    }
}

impl Lun {
    /// LBA OUT OF RANGE unless `lba..lba+blocks` lies inside the LUN.
    #[inline]
    pub(super) fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(sense::LBA_OUT_OF_RANGE),
        }
    }

    /// The common checks of a transfer: no protection information asked
    /// for (byte 1 bits 7..5), within MAXIMUM TRANSFER LENGTH, inside the
    /// LUN.
    #[inline(always)]
    fn check_transfer(&self, t: &Transfer, protect: bool) -> Result<(), Sense> {
        if protect && t.flags & 0xe0 != 0 {
            return Err(invalid_cdb(1, Some(7)));
        }
        if t.blocks > self.limits.max_transfer {
            return Err(invalid_cdb(t.len_field, Some(7)));
        }
        self.check_range(t.lba, u64::from(t.blocks))
    }

    /// The first `blocks` blocks of `bufs`, or INVALID FIELD IN CDB
    /// (pointing at the transfer length) when the buffer is shorter than
    /// the transfer.
    #[inline(always)]
    fn view(&self, bufs: &IoBufs, blocks: u64, t: &Transfer) -> Result<IoBufs, Sense> {
        let len =
            usize::try_from(blocks * self.bs).map_err(|_| invalid_cdb(t.len_field, Some(7)))?;
        bufs.slice(0, len)
            .ok_or_else(|| invalid_cdb(t.len_field, Some(7)))
    }

    /// The hot path: READ/WRITE(10/16) decoded straight from the CDB
    /// (no generic decoding, no allocation). `None` for anything else.
    #[inline(always)]
    pub(super) fn fast_rw(&mut self, cdb: &[u8], bufs: &IoBufs) -> Option<Outcome> {
        let (write, t) = match cdb.first_chunk::<16>() {
            Some(c) if c[0] == op::READ_16 || c[0] == op::WRITE_16 => (
                c[0] == op::WRITE_16,
                Transfer {
                    lba: u64::from_be_bytes([c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]]),
                    blocks: u32::from_be_bytes([c[10], c[11], c[12], c[13]]),
                    flags: c[1],
                    lba_field: 2,
                    len_field: 10,
                },
            ),
            _ => match cdb.first_chunk::<10>() {
                Some(c) if c[0] == op::READ_10 || c[0] == op::WRITE_10 => (
                    c[0] == op::WRITE_10,
                    Transfer {
                        lba: u64::from(u32::from_be_bytes([c[2], c[3], c[4], c[5]])),
                        blocks: u32::from(u16::from_be_bytes([c[7], c[8]])),
                        flags: c[1],
                        lba_field: 2,
                        len_field: 7,
                    },
                ),
                _ => return None,
            },
        };
        let fua = write && (t.flags & 0x08 != 0 || self.write_through());
        Some(self.transfer_data(&t, true, write, fua, bufs))
    }

    /// Checks a read or write and builds its backend operation.
    #[inline(always)]
    fn transfer_data(
        &self,
        t: &Transfer,
        protect: bool,
        write: bool,
        fua: bool,
        bufs: &IoBufs,
    ) -> Outcome {
        if let Err(s) = self.check_transfer(t, protect) {
            return Outcome::check(s);
        }
        if t.blocks == 0 {
            return Outcome::Done(Response::good());
        }
        let view = match self.view(bufs, u64::from(t.blocks), t) {
            Ok(v) => v,
            Err(s) => return Outcome::check(s),
        };
        let offset = t.lba * self.bs;
        if write {
            Outcome::Submit(
                Op::Write {
                    offset,
                    bufs: view,
                    fua,
                },
                Pending::new(Kind::Write),
            )
        } else {
            Outcome::Submit(Op::Read { offset, bufs: view }, Pending::new(Kind::Read))
        }
    }

    /// READ(6/12) (and 10/16 when they miss the fast path).
    pub(super) fn read(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        let Some(t) = transfer(c) else {
            return Outcome::check(sense::INVALID_OPCODE);
        };
        self.transfer_data(&t, c.opcode() != op::READ_6, false, false, bufs)
    }

    /// WRITE(6/12) (10/16 normally take the fast path) and WRITE AND
    /// VERIFY(10/16) (a write with FUA: what reached the backend's stable
    /// storage verifies by definition).
    pub(super) fn write(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        let Some(t) = transfer(c) else {
            return Outcome::check(sense::INVALID_OPCODE);
        };
        let opc = c.opcode();
        let verify = matches!(opc, op::WRITE_VERIFY_10 | op::WRITE_VERIFY_16);
        let fua = verify || (opc != op::WRITE_6 && t.flags & 0x08 != 0) || self.write_through();
        self.transfer_data(&t, opc != op::WRITE_6, true, fua, bufs)
    }

    /// VERIFY(10/16): BYTCHK 00b checks the range only (the backend has no
    /// separate medium check); 01b compares the data-out buffer with the
    /// media; 11b compares one data-out block with every block.
    pub(super) fn verify(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        let Some(t) = transfer(c) else {
            return Outcome::check(sense::INVALID_OPCODE);
        };
        let bytchk = (t.flags >> 1) & 0x03;
        if bytchk == 0b10 {
            return Outcome::check(invalid_cdb(1, Some(2)));
        }
        if bytchk == 0 {
            if t.flags & 0xe0 != 0 {
                return Outcome::check(invalid_cdb(1, Some(7)));
            }
            return match self.check_range(t.lba, u64::from(t.blocks)) {
                Ok(()) => Outcome::Done(Response::good()),
                Err(s) => Outcome::check(s),
            };
        }
        if let Err(s) = self.check_transfer(&t, true) {
            return Outcome::check(s);
        }
        if t.blocks == 0 {
            return Outcome::Done(Response::good());
        }
        let expected_blocks = if bytchk == 0b11 {
            1
        } else {
            u64::from(t.blocks)
        };
        let expected = match self.view(bufs, expected_blocks, &t) {
            Ok(v) => v,
            Err(s) => return Outcome::check(s),
        };
        // Bounded by MAXIMUM TRANSFER LENGTH, checked above.
        let len = u64::from(t.blocks) * self.bs;
        let media = IoBufs::from_vec(vec![0u8; len as usize]);
        let v = Verify {
            media: media.clone(),
            expected,
            one_block: (bytchk == 0b11).then_some(self.bs as usize),
        };
        Outcome::Submit(
            Op::Read {
                offset: t.lba * self.bs,
                bufs: media,
            },
            Pending::new(Kind::Verify(Box::new(v))),
        )
    }

    /// SYNCHRONIZE CACHE(10/16): the range is checked (0 blocks = to the
    /// end), then the whole cache is flushed. IMMED is not honoured: GOOD
    /// comes once the flush is done, which SBC-3 allows.
    pub(super) fn sync_cache(&mut self, c: &Cdb) -> Outcome {
        let Some(t) = transfer(c) else {
            return Outcome::check(sense::INVALID_OPCODE);
        };
        let blocks = if t.blocks == 0 {
            self.blocks.saturating_sub(t.lba)
        } else {
            u64::from(t.blocks)
        };
        if t.lba > self.blocks {
            return Outcome::check(sense::LBA_OUT_OF_RANGE);
        }
        if let Err(s) = self.check_range(t.lba, blocks) {
            return Outcome::check(s);
        }
        Outcome::Submit(Op::Flush, Pending::new(Kind::Flush))
    }

    /// READ CAPACITY(10) data (SBC-3 5.15): last LBA (0xFFFFFFFF when it
    /// does not fit: use READ CAPACITY(16)) and block length.
    pub(super) fn read_capacity_10(&self, c: &Cdb) -> Result<Vec<u8>, Sense> {
        // PMI = 0 requires LOGICAL BLOCK ADDRESS = 0.
        if c.u8(8) & 0x01 == 0 && c.be32(2) != 0 {
            return Err(invalid_cdb(2, Some(7)));
        }
        let last = self.blocks.saturating_sub(1);
        let last = u32::try_from(last).unwrap_or(u32::MAX);
        let mut b = vec![0u8; 8];
        b[0..4].copy_from_slice(&last.to_be_bytes());
        b[4..8].copy_from_slice(&self.info.geometry.block_size.to_be_bytes());
        Ok(b)
    }

    /// READ CAPACITY(16) data (SBC-3 5.16), 32 bytes: last LBA, block
    /// length, LBPME/LBPRZ from the backend's discard support.
    pub(super) fn read_capacity_16(&self) -> Vec<u8> {
        let mut b = vec![0u8; 32];
        b[0..8].copy_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
        b[8..12].copy_from_slice(&self.info.geometry.block_size.to_be_bytes());
        let caps = self.info.caps;
        if caps.discard {
            b[14] |= 0x80;
            if caps.discard_zeroes {
                b[14] |= 0x40;
            }
        }
        b
    }
}
