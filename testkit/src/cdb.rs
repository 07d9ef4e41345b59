//! CDB builders for tests and load generators.

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
}
