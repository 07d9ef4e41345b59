//! CDB builders for tests and load generators, and the EXTENDED COPY
//! (LID1) parameter list pieces the copy tests send.

/// READ(16) (`write` false) or WRITE(16) of `blocks` blocks at `lba`.
pub fn rw16(write: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x8a } else { 0x88 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// READ(10)/WRITE(10)-shaped CDB with opcode `opcode` and byte 1 = `flags`.
pub fn rw10(opcode: u8, flags: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// An EXTENDED COPY identification CSCD descriptor (type E4h, SPC-4
/// 6.4.5.2) naming the logical unit with NAA designator `naa` (16 bytes,
/// IEEE Registered Extended, as VPD page 0x83 reports it), a block
/// device of `block_len`-byte blocks.
pub fn xcopy_cscd(naa: &[u8; 16], block_len: u32) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0] = 0xe4;
    d[4] = 0x01; // binary code set
    d[5] = 0x03; // associated with the logical unit, NAA
    d[7] = 16;
    d[8..24].copy_from_slice(naa);
    d[29..32].copy_from_slice(&block_len.to_be_bytes()[1..]);
    d
}

/// An EXTENDED COPY block-to-block segment descriptor (type 02h, SPC-4
/// 6.4.6.5): `blocks` blocks from `src_lba` of CSCD `src` to `dst_lba`
/// of CSCD `dst`.
pub fn xcopy_segment(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
    let mut d = vec![0u8; 28];
    d[0] = 0x02;
    d[2..4].copy_from_slice(&24u16.to_be_bytes());
    d[4..6].copy_from_slice(&src.to_be_bytes());
    d[6..8].copy_from_slice(&dst.to_be_bytes());
    d[10..12].copy_from_slice(&blocks.to_be_bytes());
    d[12..20].copy_from_slice(&src_lba.to_be_bytes());
    d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
    d
}

/// An EXTENDED COPY (LID1) parameter list of `cscds` then `segments`,
/// with no inline data and no list identifier (LIST ID USAGE 11b), as
/// ESXi and sg_xcopy send it.
pub fn xcopy_list(cscds: &[Vec<u8>], segments: &[Vec<u8>]) -> Vec<u8> {
    let c = cscds.concat();
    let s = segments.concat();
    let mut b = vec![0u8; 16];
    b[1] = 0x18;
    b[2..4].copy_from_slice(&(c.len() as u16).to_be_bytes());
    b[8..12].copy_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(&c);
    b.extend_from_slice(&s);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_land_where_sbc_puts_them() {
        let c = rw16(true, 0x0102_0304_0506_0708, 0x0a0b_0c0d);
        assert_eq!(c[0], 0x8a);
        assert_eq!(&c[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&c[10..14], &[0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(rw16(false, 0, 1)[0], 0x88);
        let c = rw10(0x2f, 0x10, 0x0102_0304, 0x0506);
        assert_eq!(c, [0x2f, 0x10, 1, 2, 3, 4, 0, 5, 6, 0]);
    }

    #[test]
    fn an_extended_copy_list_is_what_tcmu_rbd_decodes() {
        let naa = tcmu_rbd::scsi::inquiry::naa_designator("0a0a-1111");
        let l = xcopy_list(
            &[xcopy_cscd(&naa, 512), xcopy_cscd(&naa, 512)],
            &[xcopy_segment(0, 1, 8, 10, 20)],
        );
        assert_eq!(l.len(), 16 + 2 * 32 + 28);
        let p = tcmu_rbd::scsi::xcopy::parse(&l).unwrap();
        assert_eq!(p.cscds[1].naa, naa);
        assert_eq!(p.cscds[1].block_len, 512);
        let s = &p.segments[0];
        assert_eq!(
            (s.src, s.dst, s.blocks, s.src_lba, s.dst_lba),
            (0, 1, 8, 10, 20)
        );
    }
}
