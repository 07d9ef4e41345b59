//! INQUIRY: standard data (SPC-4 6.6.2) and the vital product data pages
//! (SPC-4 7.8, SBC-3 6.6).

use super::alua::AluaSource;
use super::cdb::Cdb;
use super::limits::Limits;
use super::sense::{invalid_cdb, Sense};
use super::LunInfo;

/// The VPD pages served, in the order page 0x00 lists them.
pub const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2];

/// IEEE company id in the NAA designator: the one LIO uses (0x001405),
/// so a LUN keeps its identity whether LIO or tcmu-rbd answers INQUIRY.
pub const COMPANY_ID: u32 = 0x00_1405;

/// Copies `s` into `dst`, ASCII space padded, truncated to fit.
fn ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        // Only printable ASCII is allowed in these fields (SPC-4 4.4.1).
        *d = if (0x20..0x7f).contains(&c) { c } else { b' ' };
    }
}

/// Answers INQUIRY: standard data, or the VPD page the CDB asks for.
pub fn inquiry(
    c: &Cdb,
    info: &LunInfo,
    limits: &Limits,
    alua: &dyn AluaSource,
) -> Result<Vec<u8>, Sense> {
    let evpd = c.u8(1) & 0x01 != 0;
    if c.u8(1) & 0x02 != 0 {
        // CMDDT (obsolete) is not supported.
        return Err(invalid_cdb(1, Some(1)));
    }
    let page = c.u8(2);
    if !evpd {
        if page != 0 {
            return Err(invalid_cdb(2, Some(7)));
        }
        return Ok(standard(info, alua));
    }
    match page {
        0x00 => Ok(vpd(0x00, &VPD_PAGES)),
        0x80 => Ok(vpd(0x80, unit_serial(info).as_bytes())),
        0x83 => Ok(vpd(0x83, &device_identification(info, alua))),
        0x8f => Ok(vpd(
            0x8f,
            &super::xcopy::third_party_copy_vpd(info.geometry.block_size),
        )),
        0xb0 => Ok(vpd(0xb0, &block_limits(limits))),
        0xb1 => Ok(vpd(0xb1, &block_characteristics())),
        0xb2 => Ok(vpd(0xb2, &provisioning(info))),
        _ => Err(invalid_cdb(2, Some(7))),
    }
}

/// Standard INQUIRY data: 36 bytes of SPC-4 fields, then the version
/// descriptors (SAM-5, SPC-4, SBC-3) at bytes 58..64; 74 bytes in all.
pub fn standard(info: &LunInfo, alua: &dyn AluaSource) -> Vec<u8> {
    let mut b = vec![0u8; 74];
    b[0] = 0x00; // connected, direct-access block device
    b[2] = 0x06; // SPC-4
    b[3] = 0x12; // HISUP, response data format 2
    b[4] = (b.len() - 5) as u8;
    // TPGS, and 3PC: EXTENDED COPY is served (see `xcopy`).
    b[5] = (alua.mode().tpgs() << 4) | 0x08;
    b[7] = 0x02; // CMDQUE
    ascii(&mut b[8..16], &info.vendor);
    ascii(&mut b[16..32], &info.product);
    ascii(&mut b[32..36], &info.revision);
    for (i, v) in [0x00a0u16, 0x0460, 0x04c0].iter().enumerate() {
        b[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    b
}

/// A VPD page: header (device type, page code, page length) + payload.
fn vpd(page: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + payload.len());
    b.push(0x00);
    b.push(page);
    b.extend_from_slice(&(payload.len().min(0xffff) as u16).to_be_bytes());
    b.extend_from_slice(&payload[..payload.len().min(0xffff)]);
    b
}

/// The unit serial as reported: printable ASCII only, at most 251 bytes
/// (the page must fit a one-byte allocation length with its header).
pub fn unit_serial(info: &LunInfo) -> String {
    info.serial
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(251)
        .collect()
}

/// The NAA IEEE Registered Extended designator (16 bytes, NAA 6): the
/// company id, then 100 bits taken from the hex digits of the unit serial
/// in order (other characters skipped), as LIO derives it from its wwn.
/// Every gateway configured with the same serial reports the same one.
pub fn naa_designator(serial: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = 0x60 | ((COMPANY_ID >> 20) & 0x0f) as u8;
    b[1] = (COMPANY_ID >> 12) as u8;
    b[2] = (COMPANY_ID >> 4) as u8;
    b[3] = ((COMPANY_ID & 0x0f) << 4) as u8;
    // Nibble positions 7 (low half of byte 3) through 31.
    let digits = serial.chars().filter_map(|c| c.to_digit(16));
    for (nibble, d) in (7usize..32).zip(digits) {
        let d = d as u8;
        if nibble.is_multiple_of(2) {
            b[nibble / 2] |= d << 4;
        } else {
            b[nibble / 2] |= d;
        }
    }
    b
}

/// Device identification payload (VPD 0x83): NAA, T10 vendor id, and
/// with ALUA the relative target port and target port group designators
/// (association: target port) that Linux's ALUA handler looks for.
pub fn device_identification(info: &LunInfo, alua: &dyn AluaSource) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    // NAA: binary, associated with the logical unit, type 3.
    b.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
    b.extend_from_slice(&naa_designator(&info.serial));
    // T10 vendor id: ASCII, logical unit, type 1: vendor (8) + serial.
    let serial = unit_serial(info);
    let mut t10 = [b' '; 8];
    ascii(&mut t10, &info.vendor);
    let id_len = (8 + serial.len()).min(255);
    b.extend_from_slice(&[0x02, 0x01, 0x00, id_len as u8]);
    b.extend_from_slice(&t10);
    b.extend_from_slice(&serial.as_bytes()[..id_len - 8]);
    if alua.mode().enabled() {
        let local = alua.local_port();
        // Relative target port: binary, target port association, type 4.
        b.extend_from_slice(&[0x01, 0x14, 0x00, 4, 0, 0]);
        b.extend_from_slice(&local.rel_port.to_be_bytes());
        // Target port group: binary, target port association, type 5.
        b.extend_from_slice(&[0x01, 0x15, 0x00, 4, 0, 0]);
        b.extend_from_slice(&local.group.to_be_bytes());
    }
    b
}

/// Block limits payload (VPD 0xB0, page length 0x3C).
pub fn block_limits(l: &Limits) -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    // Offsets below are of the page, minus the 4-byte header.
    b[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
    b[1] = l.max_caw_blocks;
    b[4..8].copy_from_slice(&l.max_transfer.to_be_bytes());
    if l.unmap {
        b[16..20].copy_from_slice(&l.max_unmap_lbas.to_be_bytes());
        b[20..24].copy_from_slice(&l.max_unmap_descriptors.to_be_bytes());
        b[24..28].copy_from_slice(&l.unmap_granularity.to_be_bytes());
        // UGAVALID, alignment 0.
        b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes());
    }
    b[32..40].copy_from_slice(&l.max_write_same.to_be_bytes());
    b
}

/// Block device characteristics payload (VPD 0xB1): non-rotating medium.
pub fn block_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    b[0..2].copy_from_slice(&1u16.to_be_bytes());
    b
}

/// Logical block provisioning payload (VPD 0xB2).
pub fn provisioning(info: &LunInfo) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if info.caps.discard {
        // LBPU, LBPWS, LBPWS10; LBPRZ when unmapped blocks read zeros.
        b[1] = 0x80 | 0x40 | 0x20;
        if info.caps.discard_zeroes {
            b[1] |= 0x04;
        }
        b[2] = 0x02; // thin provisioned
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naa_follows_the_serial_hex_digits() {
        let n = naa_designator("1234-5678-9abc-def0-1234-5678-9abc-def0");
        assert_eq!(
            n,
            [
                0x60, 0x01, 0x40, 0x51, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45,
                0x67, 0x89
            ]
        );
        // Few digits: the rest stays zero.
        assert_eq!(&naa_designator("xz-a")[3..5], &[0x5a, 0x00]);
    }
}
