//! The TCMU shared-memory ABI (include/uapi/linux/target_core_user.h),
//! as byte offsets. Pinned by `tests/abi_layout.rs`, which compiles a C
//! program against the installed header (Debian's linux-libc-dev) and
//! compares every `offsetof`/`sizeof` and flag below.

/// Mailbox version this code speaks.
pub const MAILBOX_VERSION: u16 = 2;

/// `tcmu_mailbox.version` (u16).
pub const MB_VERSION: usize = 0;
/// `tcmu_mailbox.flags` (u16).
pub const MB_FLAGS: usize = 2;
/// `tcmu_mailbox.cmdr_off` (u32): command ring offset from the map start.
pub const MB_CMDR_OFF: usize = 4;
/// `tcmu_mailbox.cmdr_size` (u32).
pub const MB_CMDR_SIZE: usize = 8;
/// `tcmu_mailbox.cmd_head` (u32), written by the kernel.
pub const MB_CMD_HEAD: usize = 12;
/// `tcmu_mailbox.cmd_tail` (u32), written by userspace, own cache line.
pub const MB_CMD_TAIL: usize = 64;
/// `sizeof(struct tcmu_mailbox)`.
pub const MB_SIZE: usize = 128;

/// Out-of-order completions.
pub const FLAG_CAP_OOOC: u16 = 1 << 0;
/// `rsp.read_len` honoured.
pub const FLAG_CAP_READ_LEN: u16 = 1 << 1;
/// TMR notifications in the ring.
pub const FLAG_CAP_TMR: u16 = 1 << 2;
/// KEEP_BUF completions.
pub const FLAG_CAP_KEEP_BUF: u16 = 1 << 3;

/// Entry opcodes (low 3 bits of `len_op`).
pub const OP_PAD: u32 = 0;
/// A SCSI command.
pub const OP_CMD: u32 = 1;
/// A task management notification.
pub const OP_TMR: u32 = 2;
/// Mask of the opcode bits in `len_op`.
pub const OP_MASK: u32 = 0x7;
/// Entries are this aligned, and so are their lengths.
pub const OP_ALIGN: usize = 8;

/// `hdr.len_op` (u32).
pub const HDR_LEN_OP: usize = 0;
/// `hdr.cmd_id` (u16).
pub const HDR_CMD_ID: usize = 4;
/// `hdr.kflags` (u8).
pub const HDR_KFLAGS: usize = 6;
/// `hdr.uflags` (u8).
pub const HDR_UFLAGS: usize = 7;
/// Size of the entry header.
pub const HDR_SIZE: usize = 8;

/// The kernel should answer CHECK CONDITION itself (no sense). We never
/// set it: we send INVALID COMMAND OPERATION CODE sense instead.
pub const UFLAG_UNKNOWN_OP: u8 = 0x1;
/// `rsp.read_len` is valid.
pub const UFLAG_READ_LEN: u8 = 0x2;
/// Keep the data buffer after completion.
pub const UFLAG_KEEP_BUF: u8 = 0x4;

/// `req.iov_cnt` (u32).
pub const REQ_IOV_CNT: usize = 8;
/// `req.iov_bidi_cnt` (u32).
pub const REQ_IOV_BIDI_CNT: usize = 12;
/// `req.iov_dif_cnt` (u32).
pub const REQ_IOV_DIF_CNT: usize = 16;
/// `req.cdb_off` (u64): CDB offset from the start of the map.
pub const REQ_CDB_OFF: usize = 24;
/// `req.iov[0]`; each `struct iovec` is 16 bytes (base, len).
pub const REQ_IOV: usize = 48;
/// `sizeof(struct iovec)`.
pub const IOVEC_SIZE: usize = 16;

/// `rsp.scsi_status` (u8).
pub const RSP_SCSI_STATUS: usize = 8;
/// `rsp.read_len` (u32).
pub const RSP_READ_LEN: usize = 12;
/// `rsp.sense_buffer[96]`.
pub const RSP_SENSE: usize = 16;
/// `TCMU_SENSE_BUFFERSIZE`.
pub const SENSE_BUFFERSIZE: usize = 96;
/// `sizeof(struct tcmu_cmd_entry)`: the smallest CMD entry.
pub const CMD_ENTRY_SIZE: usize = 112;

/// `tmr.tmr_type` (u8).
pub const TMR_TYPE: usize = 8;
/// `tmr.cmd_cnt` (u32).
pub const TMR_CMD_CNT: usize = 12;
/// `tmr.cmd_ids[]` (u16 each).
pub const TMR_CMD_IDS: usize = 32;
/// `sizeof(struct tcmu_tmr_entry)`.
pub const TMR_ENTRY_SIZE: usize = 32;

/// What Debian's 6.1 kernel maps: 8 MiB command area (mailbox included)
/// and a 1 GiB data area of 4 KiB blocks.
pub const KERNEL_CMDR_AREA: usize = 8 * 1024 * 1024;
/// Default data area size (`max_data_area_mb` 1024).
pub const KERNEL_DATA_AREA: usize = 1024 * 1024 * 1024;
/// Data block size (`data_pages_per_blk` 1).
pub const KERNEL_DATA_BLOCK: usize = 4096;

/// Largest CDB the target core hands out (`TCM_MAX_COMMAND_SIZE`).
pub const MAX_CDB: usize = 32;

/// Length of a CDB, from its opcode, the way the kernel's
/// `scsi_command_size()` computes it; `None` if the CDB is too short to say.
pub fn cdb_len(cdb_start: &[u8]) -> Option<usize> {
    let op = *cdb_start.first()?;
    if op == 0x7f {
        // VARIABLE LENGTH: additional CDB length in byte 7.
        let add = *cdb_start.get(7)?;
        return Some(8 + add as usize);
    }
    Some(match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 10,
    })
}

/// Size of a CMD entry for `iov_cnt` iovecs and a CDB of `cdb_len` bytes,
/// as `tcmu_cmd_get_cmd_size()` computes it.
pub fn cmd_entry_size(iov_cnt: usize, cdb_len: usize) -> usize {
    base_cmd_size(iov_cnt) + cdb_len.div_ceil(OP_ALIGN) * OP_ALIGN
}

/// Where the CDB starts inside a CMD entry with `iov_cnt` iovecs
/// (`tcmu_cmd_get_base_cmd_size()`).
pub fn base_cmd_size(iov_cnt: usize) -> usize {
    (REQ_IOV + iov_cnt * IOVEC_SIZE).max(CMD_ENTRY_SIZE)
}
