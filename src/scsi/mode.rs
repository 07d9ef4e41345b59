//! MODE SENSE(6)/(10) and MODE SELECT(6)/(10) (SPC-4 6.11-6.14) over the
//! pages a disk needs: read-write error recovery (0x01), caching (0x08,
//! WCE changeable when the backend has a write cache) and control (0x0A).
//! Saved values are not supported.

use super::cdb::Cdb;
use super::sense::{self, invalid_cdb, invalid_param, Sense};
use super::LunInfo;

/// Pages served, in the order 0x3F returns them.
pub const PAGES: [u8; 3] = [0x01, 0x08, 0x0a];

/// Page control: which values a MODE SENSE returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

/// Bytes of a page (header included) for page control `pc`.
fn page(code: u8, pc: Pc, info: &LunInfo, wce: bool) -> Option<Vec<u8>> {
    Some(match code {
        0x01 => {
            // Read-write error recovery: nothing to tune, nothing changeable.
            let mut p = vec![0u8; 12];
            p[0] = 0x01;
            p[1] = 0x0a;
            p
        }
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            let bit = match pc {
                Pc::Current => wce,
                Pc::Default => info.caps.write_cache,
                Pc::Changeable => info.caps.write_cache,
            };
            if bit {
                p[2] |= 0x04; // WCE
            }
            p
        }
        0x0a => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            if pc != Pc::Changeable {
                // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering, as
                // the ring completes out of order; busy timeout unlimited.
                p[3] = 0x10;
                p[8] = 0xff;
                p[9] = 0xff;
            }
            p
        }
        _ => return None,
    })
}

/// Answers MODE SENSE(6) (`ten` false) or MODE SENSE(10).
pub fn mode_sense(c: &Cdb, ten: bool, info: &LunInfo, wce: bool) -> Result<Vec<u8>, Sense> {
    let dbd = c.u8(1) & 0x08 != 0;
    let llbaa = ten && c.u8(1) & 0x10 != 0;
    let pc = match c.u8(2) >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(sense::SAVING_NOT_SUPPORTED),
    };
    let code = c.u8(2) & 0x3f;
    let subpage = c.u8(3);
    if subpage != 0x00 && subpage != 0xff {
        return Err(invalid_cdb(3, Some(7)));
    }
    let mut pages = Vec::with_capacity(48);
    if code == 0x3f {
        for p in PAGES {
            pages.extend(page(p, pc, info, wce).unwrap_or_default());
        }
    } else {
        match page(code, pc, info, wce) {
            Some(p) => pages.extend(p),
            None => return Err(invalid_cdb(2, Some(5))),
        }
    }
    let blocks = info.geometry.blocks();
    let bs = info.geometry.block_size;
    let desc: Vec<u8> = if dbd {
        Vec::new()
    } else if llbaa {
        let mut d = vec![0u8; 16];
        if pc != Pc::Changeable {
            d[0..8].copy_from_slice(&blocks.to_be_bytes());
            d[12..16].copy_from_slice(&bs.to_be_bytes());
        }
        d
    } else {
        let mut d = vec![0u8; 8];
        if pc != Pc::Changeable {
            let n = u32::try_from(blocks).unwrap_or(u32::MAX);
            d[0..4].copy_from_slice(&n.to_be_bytes());
            d[5..8].copy_from_slice(&bs.to_be_bytes()[1..4]);
        }
        d
    };
    // DPOFUA: DPO and FUA are honoured. WP is never set.
    let dev_specific = 0x10;
    let mut b = Vec::with_capacity(8 + desc.len() + pages.len());
    if ten {
        let len = (6 + desc.len() + pages.len()) as u16;
        b.extend_from_slice(&len.to_be_bytes());
        b.push(0);
        b.push(dev_specific);
        b.push(u8::from(llbaa && !dbd));
        b.push(0);
        b.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        b.push((3 + desc.len() + pages.len()) as u8);
        b.push(0);
        b.push(dev_specific);
        b.push(desc.len() as u8);
    }
    b.extend(desc);
    b.extend(pages);
    Ok(b)
}

/// The parameter list length field of a MODE SELECT CDB.
pub fn select_len(c: &Cdb, ten: bool) -> usize {
    if ten {
        usize::from(c.be16(7))
    } else {
        usize::from(c.u8(4))
    }
}

/// Applies a MODE SELECT(6)/(10) parameter list: every field must hold
/// its current value except the changeable ones (WCE). Nothing is
/// changed unless the whole list is valid. Returns the new WCE.
pub fn mode_select(
    c: &Cdb,
    ten: bool,
    info: &LunInfo,
    list: &[u8],
    wce: bool,
) -> Result<bool, Sense> {
    if c.u8(1) & 0x10 == 0 {
        // PF = 0 would mean vendor-specific page formats.
        return Err(invalid_cdb(1, Some(4)));
    }
    if c.u8(1) & 0x01 != 0 {
        return Err(invalid_cdb(1, Some(0)));
    }
    if list.is_empty() {
        return Ok(wce);
    }
    let hdr = if ten { 8 } else { 4 };
    if list.len() < hdr {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    let (medium, bd_len, long) = if ten {
        (
            2usize,
            usize::from(u16::from_be_bytes([list[6], list[7]])),
            list[4] & 0x01 != 0,
        )
    } else {
        (1usize, usize::from(list[3]), false)
    };
    if list[medium] != 0 {
        return Err(invalid_param(medium as u16, Some(7)));
    }
    let dlen = if long { 16 } else { 8 };
    if bd_len % dlen != 0 {
        return Err(invalid_param(if ten { 6 } else { 3 }, Some(7)));
    }
    if hdr + bd_len > list.len() {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    let blocks = info.geometry.blocks();
    let bs = info.geometry.block_size;
    for i in (hdr..hdr + bd_len).step_by(dlen) {
        let d = &list[i..i + dlen];
        // A block count of 0 keeps the capacity; anything else must match.
        let (n, len, len_at) = if long {
            let mut n = [0u8; 8];
            n.copy_from_slice(&d[0..8]);
            (
                u64::from_be_bytes(n),
                u32::from_be_bytes([d[12], d[13], d[14], d[15]]),
                12,
            )
        } else {
            (
                u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]])),
                u32::from_be_bytes([0, d[5], d[6], d[7]]),
                5,
            )
        };
        let expected = if long {
            blocks
        } else {
            blocks.min(u64::from(u32::MAX))
        };
        if n != 0 && n != expected {
            return Err(invalid_param(i as u16, Some(7)));
        }
        if !long && d[4] != 0 {
            return Err(invalid_param((i + 4) as u16, Some(7)));
        }
        if len != bs {
            return Err(invalid_param((i + len_at) as u16, Some(7)));
        }
    }
    let mut new_wce = wce;
    let mut off = hdr + bd_len;
    while off < list.len() {
        if off + 2 > list.len() {
            return Err(sense::PARAM_LIST_LENGTH_ERROR);
        }
        if list[off] & 0x40 != 0 {
            // SPF: no subpages here.
            return Err(invalid_param(off as u16, Some(6)));
        }
        let code = list[off] & 0x3f;
        let len = usize::from(list[off + 1]);
        let Some(cur) = page(code, Pc::Current, info, new_wce) else {
            return Err(invalid_param(off as u16, Some(5)));
        };
        if len + 2 != cur.len() {
            return Err(invalid_param((off + 1) as u16, Some(7)));
        }
        if off + 2 + len > list.len() {
            return Err(sense::PARAM_LIST_LENGTH_ERROR);
        }
        let mask = page(code, Pc::Changeable, info, new_wce).unwrap_or_default();
        let new = &list[off..off + 2 + len];
        for i in 2..cur.len() {
            let bad = (new[i] ^ cur[i]) & !mask.get(i).copied().unwrap_or(0);
            if bad != 0 {
                let bit = 7 - bad.leading_zeros() as u8;
                return Err(invalid_param((off + i) as u16, Some(bit)));
            }
        }
        if code == 0x08 {
            new_wce = new[2] & 0x04 != 0;
        }
        off += 2 + len;
    }
    Ok(new_wce)
}
