//! The SCSI core: decodes a CDB, answers what a LUN emulates itself, and
//! turns data commands into backend operations.
//!
//! The ring worker calls [`Lun::execute`] for every command. It either
//! answers at once ([`Outcome::Done`], any data already copied into the
//! command's buffers) or hands back a backend [`Op`] with a [`Pending`] token;
//! when the backend finishes, [`Lun::finish`] turns the result into the
//! response.

pub mod sense;

use sense::{key, Sense, CHECK_CONDITION, GOOD};
use tcmu_handler::{Caps, Geometry, IoBufs, IoError, IoResult, Op};

/// Identity and limits of a LUN, fixed when the device is opened.
#[derive(Clone, Debug)]
pub struct LunInfo {
    /// T10 vendor identification (8 chars, space padded on the wire).
    pub vendor: String,
    /// Product identification (16 chars).
    pub product: String,
    /// Product revision (4 chars).
    pub revision: String,
    /// Unit serial number (VPD 0x80); the same on every gateway of an image.
    pub serial: String,
    /// Size and block size.
    pub geometry: Geometry,
    /// What the backend supports.
    pub caps: Caps,
    /// Maximum transfer length in blocks (VPD 0xB0), bounded by the data area.
    pub max_transfer_blocks: u32,
}

/// The answer to one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// SCSI status byte.
    pub status: u8,
    /// Sense data, with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Bytes of data-in actually produced, when fewer than the buffer holds.
    pub read_len: Option<u32>,
}

impl Response {
    /// GOOD status, no data length adjustment.
    pub fn good() -> Self {
        Response {
            status: GOOD,
            sense: None,
            read_len: None,
        }
    }
    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> Self {
        Response {
            status: CHECK_CONDITION,
            sense: Some(sense),
            read_len: None,
        }
    }
}

/// What to do after [`Lun::finish`] for a command that went to the backend.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    opcode: u8,
}

/// The result of [`Lun::execute`].
#[derive(Debug)]
pub enum Outcome {
    /// Answer now.
    Done(Response),
    /// Run `Op` on the backend, then call [`Lun::finish`] with the token.
    Submit(Op, Pending),
}

/// INVALID COMMAND OPERATION CODE.
pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
/// LOGICAL BLOCK ADDRESS OUT OF RANGE.
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
/// INVALID FIELD IN CDB (without a field pointer).
pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);

/// The state of one LUN.
pub struct Lun {
    info: LunInfo,
}

impl Lun {
    /// A LUN with `info`.
    pub fn new(info: LunInfo) -> Self {
        Lun { info }
    }

    /// New size (online resize).
    pub fn set_geometry(&mut self, geometry: Geometry) {
        self.info.geometry = geometry;
    }

    /// The LUN's identity and limits.
    pub fn info(&self) -> &LunInfo {
        &self.info
    }

    /// Decodes and runs one command against `bufs` (the data-in or data-out
    /// buffer the kernel allocated for it).
    pub fn execute(&mut self, cdb: &[u8], bufs: &IoBufs) -> Outcome {
        let Some(&op) = cdb.first() else {
            return Outcome::Done(Response::check(INVALID_OPCODE));
        };
        match op {
            0x00 => Outcome::Done(Response::good()),
            0x28 | 0x2a | 0x88 | 0x8a => self.rw(cdb, bufs),
            _ => Outcome::Done(Response::check(INVALID_OPCODE)),
        }
    }

    fn rw(&mut self, cdb: &[u8], bufs: &IoBufs) -> Outcome {
        let (lba, blocks, fua) = match cdb[0] {
            0x28 | 0x2a if cdb.len() >= 10 => (
                u64::from(u32::from_be_bytes([cdb[2], cdb[3], cdb[4], cdb[5]])),
                u32::from(u16::from_be_bytes([cdb[7], cdb[8]])),
                cdb[1] & 0x08 != 0,
            ),
            0x88 | 0x8a if cdb.len() >= 16 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&cdb[2..10]);
                (
                    u64::from_be_bytes(l),
                    u32::from_be_bytes([cdb[10], cdb[11], cdb[12], cdb[13]]),
                    cdb[1] & 0x08 != 0,
                )
            }
            _ => return Outcome::Done(Response::check(INVALID_FIELD_IN_CDB)),
        };
        let bs = u64::from(self.info.geometry.block_size);
        let nblocks = self.info.geometry.blocks();
        match lba.checked_add(u64::from(blocks)) {
            Some(end) if end <= nblocks => {}
            _ => return Outcome::Done(Response::check(LBA_OUT_OF_RANGE)),
        }
        if blocks == 0 {
            return Outcome::Done(Response::good());
        }
        let len = u64::from(blocks) * bs;
        let Some(view) = bufs.slice(0, len as usize) else {
            return Outcome::Done(Response::check(INVALID_FIELD_IN_CDB));
        };
        let offset = lba * bs;
        let op = if cdb[0] == 0x28 || cdb[0] == 0x88 {
            Op::Read { offset, bufs: view }
        } else {
            Op::Write {
                offset,
                bufs: view,
                fua,
            }
        };
        Outcome::Submit(op, Pending { opcode: cdb[0] })
    }

    /// Turns a backend result into the response for the command that
    /// produced `pending`.
    pub fn finish(&mut self, pending: Pending, result: IoResult) -> Response {
        let _ = pending.opcode;
        match result {
            Ok(()) => Response::good(),
            Err(IoError::Miscompare { offset }) => {
                let mut s = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
                s.info = u32::try_from(offset).ok();
                Response::check(s)
            }
            Err(IoError::OutOfRange) => Response::check(LBA_OUT_OF_RANGE),
            Err(_) => Response::check(Sense::new(key::MEDIUM_ERROR, 0x11, 0x00)),
        }
    }
}

/// Runs one arbitrary CDB (the fuzzer's input) against a small LUN: the
/// SCSI core must answer without panicking, and any backend operation it
/// produces must lie inside the device.
pub fn fuzz_one(cdb: &[u8]) {
    let geometry = Geometry {
        size: 1 << 20,
        block_size: 512,
    };
    let mut lun = Lun::new(LunInfo {
        vendor: "FUZZ".into(),
        product: "LUN".into(),
        revision: "0001".into(),
        serial: "fuzz".into(),
        geometry,
        caps: Caps {
            discard: true,
            discard_zeroes: true,
            write_cache: true,
        },
        max_transfer_blocks: 128,
    });
    let bufs = IoBufs::from_vec(vec![0u8; 64 * 1024]);
    if let Outcome::Submit(op, _) = lun.execute(cdb, &bufs) {
        let end = match &op {
            Op::Read { offset, bufs } | Op::Write { offset, bufs, .. } => {
                offset + bufs.len() as u64
            }
            Op::WriteZeroes { offset, len, .. } | Op::WriteSame { offset, len, .. } => offset + len,
            Op::CompareAndWrite { offset, write, .. } => offset + write.len() as u64,
            Op::Discard { ranges } => ranges.iter().map(|(o, l)| o + l).max().unwrap_or(0),
            Op::Flush => 0,
        };
        assert!(end <= geometry.size, "operation past the end: {op:?}");
    }
}
