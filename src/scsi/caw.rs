//! COMPARE AND WRITE (SBC-3 5.2): the data-out buffer holds the compare
//! blocks then the write blocks; on a difference the backend fails with
//! the offset of the first differing byte, reported as MISCOMPARE
//! (0E/1D/00) with that offset in INFORMATION.

use super::cdb::{transfer, Cdb};
use super::sense::{self, invalid_cdb};
use super::{Kind, Lun, Outcome, Pending, Response};
use tcmu_handler::{IoBufs, Op};

impl Lun {
    pub(super) fn compare_and_write(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        let Some(t) = transfer(c) else {
            return Outcome::check(sense::INVALID_OPCODE);
        };
        if t.flags & 0xe0 != 0 {
            return Outcome::check(invalid_cdb(1, Some(7)));
        }
        // NUMBER OF LOGICAL BLOCKS 0: nothing compared, nothing written.
        if t.blocks == 0 {
            return Outcome::Done(Response::good());
        }
        if t.blocks > u32::from(self.limits.max_caw_blocks) {
            return Outcome::check(invalid_cdb(13, Some(7)));
        }
        if let Err(s) = self.check_range(t.lba, u64::from(t.blocks)) {
            return Outcome::check(s);
        }
        let len = (u64::from(t.blocks) * self.bs) as usize;
        let (Some(compare), Some(write)) = (bufs.slice(0, len), bufs.slice(len, len)) else {
            return Outcome::check(invalid_cdb(13, Some(7)));
        };
        // FUA (or write-through) needs a flush once the write is done:
        // the backend operation has no FUA of its own.
        let flush_after = t.flags & 0x08 != 0 || self.write_through();
        Outcome::Submit(
            Op::CompareAndWrite {
                offset: t.lba * self.bs,
                compare,
                write,
            },
            Pending {
                kind: Kind::Caw,
                flush_after,
            },
        )
    }
}
