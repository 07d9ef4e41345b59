//! REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the commands this LUN
//! serves, with their CDB usage data (a bit is set where the device
//! server looks at the CDB).
//!
//! The same table decides what the decoders accept ([`unused_bits`]): a
//! bit of byte 1 (the flags: DPO, FUA, BYTCHK, ...) or of the control
//! byte that the usage data does not show ends the command with ILLEGAL
//! REQUEST / INVALID FIELD IN CDB before any decoder sees it, so what
//! RSOC reports and what the LUN does cannot drift apart. Other
//! reserved bytes are not checked (SPC-4 does not require it).

use super::cdb::{op, sa, Cdb};
use super::sense::{invalid_cdb, Sense};

/// When a command is offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Always.
    Always,
    /// The backend discards (UNMAP).
    Discard,
    /// The LUN is thin provisioned (GET LBA STATUS).
    LbaStatus,
    /// ALUA is enabled (REPORT TARGET PORT GROUPS).
    Alua,
    /// Explicit ALUA (SET TARGET PORT GROUPS).
    ExplicitAlua,
}

/// One supported command.
#[derive(Clone, Copy, Debug)]
pub struct Command {
    /// Operation code.
    pub opcode: u8,
    /// Service action, for opcodes that have them.
    pub sa: Option<u8>,
    /// CDB usage data (its length is the CDB length).
    pub usage: &'static [u8],
    /// When it is offered.
    pub needs: Needs,
}

const FF: u8 = 0xff;

macro_rules! cmd {
    ($op:expr, $sa:expr, $needs:ident, [$($b:expr),* $(,)?]) => {
        Command { opcode: $op, sa: $sa, usage: &[$($b),*], needs: Needs::$needs }
    };
}

/// Every command the SCSI core serves, by opcode then service action.
pub const COMMANDS: &[Command] = &[
    cmd!(op::TEST_UNIT_READY, None, Always, [0x00, 0, 0, 0, 0, 0]),
    cmd!(op::REQUEST_SENSE, None, Always, [0x03, 0x01, 0, 0, FF, 0]),
    cmd!(op::READ_6, None, Always, [0x08, 0x1f, FF, FF, FF, 0]),
    cmd!(op::WRITE_6, None, Always, [0x0a, 0x1f, FF, FF, FF, 0]),
    cmd!(op::INQUIRY, None, Always, [0x12, 0x03, FF, FF, FF, 0]),
    cmd!(op::MODE_SELECT_6, None, Always, [0x15, 0x11, 0, 0, FF, 0]),
    cmd!(op::MODE_SENSE_6, None, Always, [0x1a, 0x08, FF, FF, FF, 0]),
    cmd!(
        op::READ_CAPACITY_10,
        None,
        Always,
        [0x25, 0, FF, FF, FF, FF, 0, 0, 0x01, 0]
    ),
    cmd!(
        op::READ_10,
        None,
        Always,
        [0x28, 0xf8, FF, FF, FF, FF, 0, FF, FF, 0]
    ),
    cmd!(
        op::WRITE_10,
        None,
        Always,
        [0x2a, 0xf8, FF, FF, FF, FF, 0, FF, FF, 0]
    ),
    cmd!(
        op::WRITE_VERIFY_10,
        None,
        Always,
        [0x2e, 0xf2, FF, FF, FF, FF, 0, FF, FF, 0]
    ),
    cmd!(
        op::VERIFY_10,
        None,
        Always,
        [0x2f, 0xf6, FF, FF, FF, FF, 0, FF, FF, 0]
    ),
    cmd!(
        op::SYNC_CACHE_10,
        None,
        Always,
        [0x35, 0x02, FF, FF, FF, FF, 0, FF, FF, 0]
    ),
    cmd!(
        op::WRITE_SAME_10,
        None,
        Always,
        [0x41, 0xff, FF, FF, FF, FF, 0, FF, FF, 0]
    ),
    cmd!(
        op::UNMAP,
        None,
        Discard,
        [0x42, 0x01, 0, 0, 0, 0, 0, FF, FF, 0]
    ),
    cmd!(
        op::MODE_SELECT_10,
        None,
        Always,
        [0x55, 0x11, 0, 0, 0, 0, 0, FF, FF, 0]
    ),
    cmd!(
        op::MODE_SENSE_10,
        None,
        Always,
        [0x5a, 0x18, FF, FF, 0, 0, 0, FF, FF, 0]
    ),
    cmd!(
        op::EXTENDED_COPY,
        Some(sa::EXTENDED_COPY_LID1),
        Always,
        [0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::RECEIVE_COPY_RESULTS,
        Some(sa::COPY_OPERATING_PARAMETERS),
        Always,
        [0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::READ_16,
        None,
        Always,
        [0x88, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::COMPARE_AND_WRITE,
        None,
        Always,
        [0x89, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, 0]
    ),
    cmd!(
        op::WRITE_16,
        None,
        Always,
        [0x8a, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::WRITE_VERIFY_16,
        None,
        Always,
        [0x8e, 0xf2, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::VERIFY_16,
        None,
        Always,
        [0x8f, 0xf6, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::SYNC_CACHE_16,
        None,
        Always,
        [0x91, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::WRITE_SAME_16,
        None,
        Always,
        [0x93, 0xff, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::SERVICE_ACTION_IN_16,
        Some(sa::READ_CAPACITY_16),
        Always,
        [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::SERVICE_ACTION_IN_16,
        Some(sa::GET_LBA_STATUS),
        LbaStatus,
        [0x9e, 0x12, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0]
    ),
    cmd!(
        op::MAINTENANCE_IN,
        Some(sa::REPORT_TARGET_PGS),
        Alua,
        [0xa3, 0xea, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::MAINTENANCE_IN,
        Some(sa::REPORT_SUPPORTED_OPCODES),
        Always,
        [0xa3, 0x0c, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::MAINTENANCE_OUT,
        Some(sa::SET_TARGET_PGS),
        ExplicitAlua,
        [0xa4, 0x0a, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::READ_12,
        None,
        Always,
        [0xa8, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
    cmd!(
        op::WRITE_12,
        None,
        Always,
        [0xaa, 0xf8, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0]
    ),
];

/// Index + 1 into [`COMMANDS`] of each opcode's first entry (0: not
/// served), built at compile time: the lookup on every command's path is
/// one load.
const FIRST: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = COMMANDS.len();
    while i > 0 {
        i -= 1;
        t[COMMANDS[i].opcode as usize] = (i + 1) as u8;
    }
    t
};

/// The table entry for `cdb` (opcode, and service action where the
/// opcode has them); None for commands this table does not list.
#[inline]
fn lookup(cdb: &[u8]) -> Option<&'static Command> {
    let &opcode = cdb.first()?;
    let first = FIRST[opcode as usize];
    if first == 0 {
        return None;
    }
    let k = &COMMANDS[first as usize - 1];
    if k.sa.is_none() {
        return Some(k);
    }
    let sa = cdb.get(1)? & 0x1f;
    COMMANDS[first as usize - 1..]
        .iter()
        .take_while(|k| k.opcode == opcode)
        .find(|k| k.sa == Some(sa))
}

/// The sense for a CDB with a bit set, in byte 1 or the control byte,
/// that its command's usage data does not show (None: none, or not a
/// command of this table, or too short: its decoder answers).
#[inline]
pub fn unused_bits(cdb: &[u8]) -> Option<Sense> {
    let k = lookup(cdb)?;
    let len = k.usage.len();
    if cdb.len() < len {
        return None;
    }
    // The service action field is the command's own, not a flag.
    let sa_bits = if k.sa.is_some() { 0x1f } else { 0 };
    let bad = cdb[1] & !k.usage[1] & !sa_bits;
    if bad != 0 {
        return Some(invalid_cdb(1, Some(7 - bad.leading_zeros() as u8)));
    }
    let bad = cdb[len - 1] & !k.usage[len - 1];
    if bad != 0 {
        return Some(invalid_cdb(
            (len - 1) as u16,
            Some(7 - bad.leading_zeros() as u8),
        ));
    }
    None
}

/// Whether an opcode has service actions.
fn has_sa(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.sa.is_some())
}

/// The command timeouts descriptor (SPC-4 6.35.4): length 0x0A, timeouts
/// not specified.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Answers REPORT SUPPORTED OPERATION CODES; `offered` says which
/// commands this LUN serves now.
pub fn report(c: &Cdb, offered: impl Fn(Needs) -> bool) -> Result<Vec<u8>, Sense> {
    let rctd = c.u8(2) & 0x80 != 0;
    let options = c.u8(2) & 0x07;
    let req_op = c.u8(3);
    let req_sa = c.be16(4);
    let list = COMMANDS.iter().filter(|k| offered(k.needs));
    if options == 0 {
        let mut b = vec![0u8; 4];
        for k in list {
            b.push(k.opcode);
            b.push(0);
            b.extend_from_slice(&u16::from(k.sa.unwrap_or(0)).to_be_bytes());
            b.push(0);
            b.push((u8::from(rctd) << 1) | u8::from(k.sa.is_some()));
            b.extend_from_slice(&(k.usage.len() as u16).to_be_bytes());
            if rctd {
                b.extend_from_slice(&TIMEOUTS);
            }
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        return Ok(b);
    }
    let want_sa = match options {
        // Opcode only: an opcode with service actions is an error.
        1 if has_sa(req_op) => return Err(invalid_cdb(2, Some(2))),
        1 => None,
        // Opcode and service action: an opcode without is an error.
        2 if !has_sa(req_op) => return Err(invalid_cdb(2, Some(2))),
        2 => Some(req_sa),
        3 => has_sa(req_op).then_some(req_sa),
        _ => return Err(invalid_cdb(2, Some(2))),
    };
    let found = list
        .into_iter()
        .find(|k| k.opcode == req_op && k.sa.map(u16::from) == want_sa);
    let mut b = vec![0u8; 4];
    match found {
        Some(k) => {
            // SUPPORT 011b: supported as the standard says.
            b[1] = (u8::from(rctd) << 7) | 0x03;
            b[2..4].copy_from_slice(&(k.usage.len() as u16).to_be_bytes());
            b.extend_from_slice(k.usage);
            if rctd {
                b.extend_from_slice(&TIMEOUTS);
            }
        }
        // SUPPORT 001b: not supported; no usage data.
        None => b[1] = 0x01,
    }
    Ok(b)
}
