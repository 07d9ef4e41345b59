//! The limits a LUN advertises in the Block Limits VPD page and enforces
//! on every command.

use super::LunInfo;

/// Most UNMAP block descriptors per command.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Most bytes one UNMAP or WRITE SAME may cover: bounded so one command
/// cannot keep the backend busy past an initiator's timeout.
pub const MAX_UNMAP_BYTES: u64 = 1 << 30;
/// Most blocks a COMPARE AND WRITE may cover (the field is one byte).
pub const MAX_CAW_BLOCKS: u32 = 255;

/// Limits derived from [`LunInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// MAXIMUM TRANSFER LENGTH (blocks).
    pub max_transfer: u32,
    /// MAXIMUM COMPARE AND WRITE LENGTH (blocks, at least 1).
    pub max_caw_blocks: u8,
    /// UNMAP is supported.
    pub unmap: bool,
    /// MAXIMUM UNMAP LBA COUNT.
    pub max_unmap_lbas: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY (blocks).
    pub unmap_granularity: u32,
    /// MAXIMUM WRITE SAME LENGTH (blocks).
    pub max_write_same: u64,
}

impl Limits {
    /// The limits of `info`.
    pub fn new(info: &LunInfo) -> Self {
        let bs = u64::from(info.geometry.block_size.max(1));
        let max_transfer = info.max_transfer_blocks.max(1);
        // The compare and the write half both travel in one transfer.
        let max_caw_blocks = (max_transfer / 2).clamp(1, MAX_CAW_BLOCKS) as u8;
        let per_cmd = (MAX_UNMAP_BYTES / bs).clamp(1, u64::from(u32::MAX));
        Limits {
            max_transfer,
            max_caw_blocks,
            unmap: info.caps.discard,
            max_unmap_lbas: per_cmd as u32,
            max_unmap_descriptors: MAX_UNMAP_DESCRIPTORS,
            // Backends deallocate at least a 4 KiB page at a time.
            unmap_granularity: (4096 / bs).max(1) as u32,
            max_write_same: per_cmd,
        }
    }
}
