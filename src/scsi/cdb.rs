//! CDB decoding: operation codes, the CDB length each opcode needs, and
//! typed readers over a zero-padded copy (so no decoder can index past
//! what the initiator sent).

/// Operation codes the SCSI core knows (SPC-4, SBC-3).
#[allow(missing_docs)]
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const MAINTENANCE_OUT: u8 = 0xa4;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
}

/// Service actions.
#[allow(missing_docs)]
pub mod sa {
    /// SERVICE ACTION IN(16): READ CAPACITY(16).
    pub const READ_CAPACITY_16: u8 = 0x10;
    /// SERVICE ACTION IN(16): GET LBA STATUS.
    pub const GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN: REPORT TARGET PORT GROUPS.
    pub const REPORT_TARGET_PGS: u8 = 0x0a;
    /// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
    pub const REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
    /// MAINTENANCE OUT: SET TARGET PORT GROUPS.
    pub const SET_TARGET_PGS: u8 = 0x0a;
    /// EXTENDED COPY: the LID1 parameter list (SPC-4 6.4).
    pub const EXTENDED_COPY_LID1: u8 = 0x00;
    /// RECEIVE COPY RESULTS: OPERATING PARAMETERS (SPC-4 6.18.4).
    pub const COPY_OPERATING_PARAMETERS: u8 = 0x03;
}

/// The CDB length an opcode's group implies (SAM-5 5.2); `None` for the
/// groups this LUN serves nothing from (variable length, vendor specific).
pub fn group_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// A CDB of at least its opcode group's length. Readers return 0 past
/// the end, so no decoder can index past what the initiator sent.
#[derive(Clone, Copy)]
pub struct Cdb<'a> {
    b: &'a [u8],
}

impl<'a> Cdb<'a> {
    /// Wraps `cdb`; `None` if it is shorter than its opcode's group
    /// length or from a group this LUN does not serve.
    #[inline]
    pub fn parse(cdb: &'a [u8]) -> Option<Cdb<'a>> {
        let need = group_len(*cdb.first()?)?;
        if cdb.len() < need {
            return None;
        }
        Some(Cdb { b: &cdb[..need] })
    }

    /// The operation code.
    #[inline]
    pub fn opcode(&self) -> u8 {
        self.u8(0)
    }
    /// Byte `i` (0 past the CDB's end).
    #[inline]
    pub fn u8(&self, i: usize) -> u8 {
        self.b.get(i).copied().unwrap_or(0)
    }
    #[inline]
    fn bytes<const N: usize>(&self, i: usize) -> [u8; N] {
        match self.b.get(i..i + N) {
            Some(s) => s.try_into().unwrap_or([0; N]),
            None => [0; N],
        }
    }
    /// Big-endian 16-bit field at `i`.
    #[inline]
    pub fn be16(&self, i: usize) -> u16 {
        u16::from_be_bytes(self.bytes(i))
    }
    /// Big-endian 24-bit field at `i`.
    #[inline]
    pub fn be24(&self, i: usize) -> u32 {
        let [a, b, c] = self.bytes(i);
        u32::from_be_bytes([0, a, b, c])
    }
    /// Big-endian 32-bit field at `i`.
    #[inline]
    pub fn be32(&self, i: usize) -> u32 {
        u32::from_be_bytes(self.bytes(i))
    }
    /// Big-endian 64-bit field at `i`.
    #[inline]
    pub fn be64(&self, i: usize) -> u64 {
        u64::from_be_bytes(self.bytes(i))
    }
    /// The service action (byte 1, bits 4..0).
    #[inline]
    pub fn service_action(&self) -> u8 {
        self.u8(1) & 0x1f
    }
}

/// A block-addressed transfer: where, how many, and where in the CDB the
/// length field is (for field pointers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks.
    pub blocks: u32,
    /// Byte 1 (protect, DPO, FUA, BYTCHK... depending on the opcode).
    pub flags: u8,
    /// Offset of the LBA field.
    pub lba_field: u16,
    /// Offset of the length field.
    pub len_field: u16,
}

/// Decodes the LBA and length of the READ/WRITE/VERIFY/WRITE SAME/SYNC
/// CACHE family; `None` for other opcodes.
#[inline]
pub fn transfer(c: &Cdb<'_>) -> Option<Transfer> {
    let t = |lba, blocks, lba_field, len_field| Transfer {
        lba,
        blocks,
        flags: c.u8(1),
        lba_field,
        len_field,
    };
    Some(match c.opcode() {
        op::READ_6 | op::WRITE_6 => {
            // 21-bit LBA; a length of 0 means 256 blocks (SBC-3 5.8).
            let n = match c.u8(4) {
                0 => 256,
                n => u32::from(n),
            };
            Transfer {
                flags: 0,
                ..t(u64::from(c.be24(1) & 0x1f_ffff), n, 1, 4)
            }
        }
        op::READ_10
        | op::WRITE_10
        | op::WRITE_VERIFY_10
        | op::VERIFY_10
        | op::SYNC_CACHE_10
        | op::WRITE_SAME_10 => t(u64::from(c.be32(2)), u32::from(c.be16(7)), 2, 7),
        op::READ_12 | op::WRITE_12 => t(u64::from(c.be32(2)), c.be32(6), 2, 6),
        op::READ_16
        | op::WRITE_16
        | op::WRITE_VERIFY_16
        | op::VERIFY_16
        | op::SYNC_CACHE_16
        | op::WRITE_SAME_16 => t(c.be64(2), c.be32(10), 2, 10),
        op::COMPARE_AND_WRITE => t(c.be64(2), u32::from(c.u8(13)), 2, 13),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_cdbs_are_refused() {
        assert!(Cdb::parse(&[]).is_none());
        assert!(Cdb::parse(&[0x28, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(Cdb::parse(&[0x7f; 32]).is_none());
        assert!(Cdb::parse(&[0x28; 10]).is_some());
    }

    #[test]
    fn decodes_each_size() {
        let c = Cdb::parse(&[0x08, 0xff, 0x12, 0x34, 0, 0]).unwrap();
        let t = transfer(&c).unwrap();
        assert_eq!((t.lba, t.blocks), (0x1f_1234, 256));
        let c = Cdb::parse(&[0x2a, 0x08, 1, 2, 3, 4, 0, 0x10, 0x20, 0]).unwrap();
        let t = transfer(&c).unwrap();
        assert_eq!((t.lba, t.blocks, t.flags), (0x0102_0304, 0x1020, 0x08));
        let c = Cdb::parse(&[0xa8, 0, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0]).unwrap();
        assert_eq!(transfer(&c).unwrap().blocks, 0x1_0000);
        let mut b = [0u8; 16];
        b[0] = 0x88;
        b[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        b[10..14].copy_from_slice(&7u32.to_be_bytes());
        let t = transfer(&Cdb::parse(&b).unwrap()).unwrap();
        assert_eq!(
            (t.lba, t.blocks, t.len_field),
            (0x0102_0304_0506_0708, 7, 10)
        );
    }
}
