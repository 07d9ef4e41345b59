//! SCSI status codes and fixed-format sense data (SPC-4 4.5.3), plus the
//! sense conditions the SCSI core reports.

/// GOOD.
pub const GOOD: u8 = 0x00;
/// CHECK CONDITION: sense data follows.
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys (SPC-4 table 48).
#[allow(missing_docs)]
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xa;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// A sense condition: key, additional sense code and qualifier, plus the
/// optional INFORMATION and SENSE KEY SPECIFIC fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field (VALID bit set when present).
    pub info: Option<u32>,
    /// Sense-key specific bytes 15..18, SKSV included (see
    /// [`Sense::with_field`]).
    pub sks: Option<[u8; 3]>,
}

impl Sense {
    /// A sense with no INFORMATION or SKS field.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            sks: None,
        }
    }

    /// Adds a field pointer (SPC-4 4.5.2.4.2): SKSV set, C/D = `in_cdb`,
    /// the byte of the offending field and, when given, the bit (BPV set)
    /// of its most significant bit.
    pub const fn with_field(mut self, in_cdb: bool, byte: u16, bit: Option<u8>) -> Self {
        let mut b0 = 0x80;
        if in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let f = byte.to_be_bytes();
        self.sks = Some([b0, f[0], f[1]]);
        self
    }

    /// Adds the INFORMATION field.
    pub const fn with_info(mut self, info: u32) -> Self {
        self.info = Some(info);
        self
    }

    /// Fixed-format sense data, 18 bytes.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        if let Some(info) = self.info {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key & 0x0f;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(sks) = self.sks {
            b[15..18].copy_from_slice(&sks);
        }
        b
    }
}

/// INVALID COMMAND OPERATION CODE (05/20/00).
pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
/// LOGICAL BLOCK ADDRESS OUT OF RANGE (05/21/00).
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
/// INVALID FIELD IN CDB (05/24/00) without a field pointer.
pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
/// INVALID FIELD IN PARAMETER LIST (05/26/00) without a field pointer.
pub const INVALID_FIELD_IN_PARAM: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
/// PARAMETER LIST LENGTH ERROR (05/1A/00).
pub const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
/// SAVING PARAMETERS NOT SUPPORTED (05/39/00).
pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
/// CAPACITY DATA HAS CHANGED (06/2A/09).
pub const CAPACITY_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x09);
/// MISCOMPARE DURING VERIFY OPERATION (0E/1D/00); INFORMATION is added.
pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
/// LOGICAL UNIT NOT READY, ASYMMETRIC ACCESS STATE TRANSITION (02/04/0A).
pub const ALUA_TRANSITIONING: Sense = Sense::new(key::NOT_READY, 0x04, 0x0a);
/// LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE (02/04/0B).
pub const ALUA_STANDBY: Sense = Sense::new(key::NOT_READY, 0x04, 0x0b);
/// LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (02/04/0C).
pub const ALUA_UNAVAILABLE: Sense = Sense::new(key::NOT_READY, 0x04, 0x0c);
/// LOGICAL UNIT NOT READY, OFFLINE (02/04/12).
pub const ALUA_OFFLINE: Sense = Sense::new(key::NOT_READY, 0x04, 0x12);
/// UNRECOVERED READ ERROR (03/11/00): a backend I/O error.
pub const MEDIUM_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
/// WRITE ERROR (03/0C/00).
pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
/// SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07): the thin pool is full.
pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
/// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE (02/04/00): the backend
/// timed out or was fenced; the initiator retries (or fails over).
pub const NOT_READY: Sense = Sense::new(key::NOT_READY, 0x04, 0x00);

/// TOO MANY TARGET DESCRIPTORS (05/26/06): more CSCD descriptors in an
/// EXTENDED COPY than the copy manager takes.
pub const TOO_MANY_TARGET_DESCRIPTORS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06);
/// UNSUPPORTED TARGET DESCRIPTOR TYPE CODE (05/26/07).
pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x07);
/// TOO MANY SEGMENT DESCRIPTORS (05/26/08).
pub const TOO_MANY_SEGMENT_DESCRIPTORS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08);
/// UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE (05/26/09).
pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x09);
/// COPY TARGET DEVICE NOT REACHABLE (0A/0D/02): a CSCD of an EXTENDED
/// COPY is no logical unit this copy manager may reach; the host falls
/// back to reading and writing itself.
pub const COPY_TARGET_NOT_REACHABLE: Sense = Sense::new(key::COPY_ABORTED, 0x0d, 0x02);
/// THIRD PARTY DEVICE FAILURE (0A/0D/01): reading or writing a CSCD
/// failed during an EXTENDED COPY.
pub const COPY_TARGET_FAILURE: Sense = Sense::new(key::COPY_ABORTED, 0x0d, 0x01);
/// INCORRECT COPY TARGET DEVICE TYPE (0A/0D/03): a CSCD's DISK BLOCK
/// LENGTH is not the logical unit's.
pub const COPY_TARGET_WRONG_TYPE: Sense = Sense::new(key::COPY_ABORTED, 0x0d, 0x03);
/// LOGICAL BLOCK ADDRESS OUT OF RANGE under COPY ABORTED (0A/21/00): a
/// segment runs past the end of its CSCD.
pub const COPY_LBA_OUT_OF_RANGE: Sense = Sense::new(key::COPY_ABORTED, 0x21, 0x00);

/// INVALID FIELD IN CDB pointing at `byte` (and `bit`, the field's most
/// significant bit).
pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
    INVALID_FIELD_IN_CDB.with_field(true, byte, bit)
}

/// INVALID FIELD IN PARAMETER LIST pointing at `byte` of the data-out
/// buffer (and `bit`).
pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Sense {
    INVALID_FIELD_IN_PARAM.with_field(false, byte, bit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_pointer_layout() {
        // SPC-4 table 50: byte 15 = SKSV | C/D | BPV | bit pointer,
        // bytes 16-17 = field pointer.
        let s = invalid_cdb(0x0102, Some(5)).to_fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x24, 0x00));
        assert_eq!(&s[15..18], &[0x80 | 0x40 | 0x08 | 5, 0x01, 0x02]);
        let p = invalid_param(7, None).to_fixed();
        assert_eq!((p[12], p[13]), (0x26, 0x00));
        assert_eq!(&p[15..18], &[0x80, 0x00, 0x07]);
    }

    #[test]
    fn information_sets_valid() {
        let s = MISCOMPARE.with_info(0x1234_5678).to_fixed();
        assert_eq!(s[0], 0xf0);
        assert_eq!(&s[3..7], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(s[2], 0x0e);
        assert_eq!((s[12], s[13]), (0x1d, 0x00));
        assert_eq!(&s[15..18], &[0, 0, 0]);
    }
}
