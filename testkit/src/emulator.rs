//! The kernel's side of the TCMU ring, in process, for tests and
//! benchmarks.
//!
//! It follows drivers/target/target_core_user.c of Linux 6.1 (the kernel
//! Debian 12 ships) in everything userspace can observe:
//! - the map: mailbox (version 2, flags OOOC|READ_LEN|TMR|KEEP_BUF),
//!   command ring at 128 of 8 MiB - 128 bytes, data area after it in 4 KiB
//!   blocks (`queue_cmd_ring`, `tcmu_configure_device`);
//! - a CMD entry is `max(offsetof(req.iov[n]), 112)` bytes plus the CDB
//!   rounded up to 8; `cdb_off` is relative to the map start and points
//!   just past that base (`tcmu_cmd_get_cmd_size`);
//! - a PAD fills the end of the ring when an entry does not fit there, and
//!   one byte is always kept free (`ring_insert_padding`,
//!   `is_ring_space_avail`);
//! - data blocks are taken lowest-free-first and neighbouring blocks share
//!   one iovec (`tcmu_get_empty_block`, `new_block_to_iov`);
//! - cmd_ids are the lowest free id in 1..=65535 (`xa_alloc`);
//! - reaping walks from the last position to `cmd_tail`, skips PAD and TMR,
//!   takes the id and response from each CMD slot, and an unknown id breaks
//!   the ring for good (`tcmu_handle_completions`); READ_LEN only counts
//!   when non-zero and smaller than the buffer (`tcmu_handle_completion`).
//!
//! It is stricter than the kernel where the kernel would silently corrupt
//! state: a `cmd_tail` that does not land on an entry boundary is reported.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use tcmu_rbd::ring::abi::*;
use tcmu_rbd::ring::shm::SharedMem;

/// Errors the emulated kernel reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmuError {
    /// The ring is broken (the kernel's TCMU_DEV_BIT_BROKEN).
    #[error("ring broken: {0}")]
    Broken(String),
    /// No room in the command ring or the data area: the kernel would
    /// queue the command on its qfull list; the caller retries after
    /// reaping.
    #[error("ring full")]
    Full,
    /// The command can never fit.
    #[error("command too large: {0}")]
    TooLarge(String),
    /// Setting up the shared memory failed.
    #[error("setup: {0}")]
    Setup(String),
}

/// Direction and data of a command.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    /// No data.
    None,
    /// Data-out: these bytes are copied into the data area.
    ToDevice(&'a [u8]),
    /// Data-in of this many bytes.
    FromDevice(usize),
}

/// Geometry of an emulated device's map.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Command ring size (the kernel: 8 MiB - 128).
    pub cmdr_size: u32,
    /// Data area size (the kernel: 1 GiB by default).
    pub data_size: usize,
    /// Data block size (the kernel: 4096).
    pub block_size: usize,
    /// Mailbox flags.
    pub flags: u16,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            cmdr_size: (KERNEL_CMDR_AREA - MB_SIZE) as u32,
            data_size: KERNEL_DATA_AREA,
            block_size: KERNEL_DATA_BLOCK,
            flags: FLAG_CAP_OOOC | FLAG_CAP_READ_LEN | FLAG_CAP_TMR | FLAG_CAP_KEEP_BUF,
        }
    }
}

struct EmuCmd {
    blocks: Vec<u32>,
    data_in: usize,
    /// Timed out (`TCMU_CMD_BIT_EXPIRED`): the initiator already got an
    /// error; a late completion only frees the id and the data blocks.
    expired: bool,
}

/// A reaped completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Command id.
    pub cmd_id: u16,
    /// SCSI status.
    pub status: u8,
    /// The 96 sense bytes, when the status is CHECK CONDITION.
    pub sense: Option<Vec<u8>>,
    /// Data-in bytes the initiator receives (read_len applied).
    pub data_len: usize,
    /// UNKNOWN_OP was set.
    pub unknown_op: bool,
}

/// The emulated kernel side of one TCMU device.
pub struct KernelEmu {
    mem: Arc<SharedMem>,
    file: File,
    layout: Layout,
    data_off: usize,
    head: u32,
    last_cleaned: u32,
    bitmap: Vec<u64>,
    free_blocks: usize,
    commands: Vec<Option<EmuCmd>>,
    /// Bit per id in use; id 0 is never handed out.
    ids: Vec<u64>,
    scratch: Vec<u8>,
    /// Block lists and an iovec list kept for reuse, so queueing a
    /// command allocates nothing once warm (the emulator is the bench's
    /// kernel and should not cost more than the kernel does).
    spare_blocks: Vec<Vec<u32>>,
    iov_scratch: Vec<(u64, u64)>,
    live: usize,
    /// Offsets of entries queued and not yet reaped, in ring order.
    queued: VecDeque<u32>,
    broken: Option<String>,
    wraps: u64,
    pads: u64,
    to_user: OwnedFd,
    from_user: OwnedFd,
}

/// The userspace end of an emulated device: the map's file and the two
/// doorbell eventfds.
pub struct UserEnd {
    /// The memfd holding the map.
    pub file: File,
    /// Map length.
    pub map_len: usize,
    /// Readable when the kernel queued work (UIO read side).
    pub to_user: OwnedFd,
    /// Written by userspace after completing (UIO write side).
    pub from_user: OwnedFd,
}

impl UserEnd {
    /// Maps the device's memory as the daemon maps /dev/uioN: the one
    /// place the test kit does it.
    pub fn map(&self) -> Result<Arc<SharedMem>, EmuError> {
        // A raw map: both sides touch it only through SharedMem.
        let map = memmap2::MmapOptions::new()
            .len(self.map_len)
            .map_raw(&self.file)
            .map_err(|e| EmuError::Setup(format!("map the user end: {e}")))?;
        Ok(Arc::new(SharedMem::from_mmap(map)))
    }
}

fn eventfd() -> Result<OwnedFd, EmuError> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let e = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| EmuError::Setup(e.to_string()))?;
    Ok(e.into())
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, EmuError> {
    fd.try_clone_to_owned()
        .map_err(|e| EmuError::Setup(e.to_string()))
}

impl KernelEmu {
    /// A device with the kernel's default layout.
    pub fn new() -> Result<Self, EmuError> {
        Self::with_layout(Layout::default())
    }

    /// A device with a custom layout (smaller rings make wraps frequent).
    pub fn with_layout(layout: Layout) -> Result<Self, EmuError> {
        let setup = |e: std::io::Error| EmuError::Setup(e.to_string());
        let data_off = MB_SIZE + layout.cmdr_size as usize;
        let map_len = data_off + layout.data_size;
        let fd = nix::sys::memfd::memfd_create(
            c"tcmu-emu",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| EmuError::Setup(e.to_string()))?;
        let file = File::from(fd);
        file.set_len(map_len as u64).map_err(setup)?;
        let map = memmap2::MmapOptions::new()
            .len(map_len)
            .map_raw(&file)
            .map_err(setup)?;
        let mem = Arc::new(SharedMem::from_mmap(map));
        let w = |r: Result<(), tcmu_rbd::ring::shm::OutOfBounds>| {
            r.map_err(|e| EmuError::Setup(e.to_string()))
        };
        w(mem.write_u16(MB_VERSION, MAILBOX_VERSION))?;
        w(mem.write_u16(MB_FLAGS, layout.flags))?;
        w(mem.write_u32(MB_CMDR_OFF, MB_SIZE as u32))?;
        w(mem.write_u32(MB_CMDR_SIZE, layout.cmdr_size))?;
        w(mem.write_u32(MB_CMD_HEAD, 0))?;
        w(mem.write_u32(MB_CMD_TAIL, 0))?;
        let nblocks = layout.data_size / layout.block_size;
        let mut commands = Vec::with_capacity(65536);
        commands.resize_with(65536, || None);
        Ok(KernelEmu {
            mem,
            file,
            layout,
            data_off,
            head: 0,
            last_cleaned: 0,
            bitmap: vec![0; nblocks.div_ceil(64)],
            free_blocks: nblocks,
            commands,
            ids: {
                let mut v = vec![0u64; 1024];
                v[0] = 1;
                v
            },
            scratch: Vec::new(),
            spare_blocks: Vec::new(),
            iov_scratch: Vec::new(),
            live: 0,
            queued: VecDeque::new(),
            broken: None,
            wraps: 0,
            pads: 0,
            to_user: eventfd()?,
            from_user: eventfd()?,
        })
    }

    /// The userspace end: what the daemon maps and polls.
    pub fn user_end(&self) -> Result<UserEnd, EmuError> {
        Ok(UserEnd {
            file: self
                .file
                .try_clone()
                .map_err(|e| EmuError::Setup(e.to_string()))?,
            map_len: self.mem.len(),
            to_user: dup(self.to_user.as_fd())?,
            from_user: dup(self.from_user.as_fd())?,
        })
    }

    /// The fd that becomes readable when userspace rang the doorbell.
    pub fn doorbell_fd(&self) -> BorrowedFd<'_> {
        self.from_user.as_fd()
    }

    /// Clears the doorbell (after it fired).
    pub fn ack_doorbell(&self) {
        let mut b = [0u8; 8];
        let _ = nix::unistd::read(self.from_user.as_raw_fd(), &mut b);
    }

    /// Commands queued and not reaped.
    pub fn in_flight(&self) -> usize {
        self.live
    }

    /// The shared mapping (tests poke at it to play a hostile kernel).
    pub fn mem(&self) -> &Arc<SharedMem> {
        &self.mem
    }

    /// How many times the command ring's head wrapped to its start.
    pub fn wraps(&self) -> u64 {
        self.wraps
    }

    /// How many PAD entries were inserted at the wrap.
    pub fn pads(&self) -> u64 {
        self.pads
    }

    fn advance_head(&mut self, size: usize) {
        let next = (self.head + size as u32) % self.layout.cmdr_size;
        if next <= self.head {
            self.wraps += 1;
        }
        self.head = next;
        let _ = self.mem.store_release_u32(MB_CMD_HEAD, self.head);
    }

    /// The broken reason, if the ring broke.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn notify_user(&self) {
        let one: u64 = 1;
        let _ = nix::unistd::write(&self.to_user, &one.to_ne_bytes());
    }

    fn spc_free(&self) -> usize {
        let size = self.layout.cmdr_size as usize;
        let used = (self.head as usize + size - self.last_cleaned as usize) % size;
        size - used - 1
    }

    /// Room for an entry of `size`, counting a PAD if it must wrap.
    fn ring_room(&self, size: usize) -> bool {
        let to_end = self.layout.cmdr_size as usize - self.head as usize;
        let needed = if to_end >= size { size } else { size + to_end };
        self.spc_free() >= needed
    }

    fn insert_pad(&mut self, size: usize) {
        let to_end = self.layout.cmdr_size - self.head;
        if (to_end as usize) < size {
            let at = MB_SIZE + self.head as usize;
            let _ = self.mem.write_u32(at + HDR_LEN_OP, to_end | OP_PAD);
            let _ = self.mem.write_u16(at + HDR_CMD_ID, 0);
            let _ = self.mem.write_u8(at + HDR_KFLAGS, 0);
            let _ = self.mem.write_u8(at + HDR_UFLAGS, 0);
            self.queued.push_back(self.head);
            self.pads += 1;
            self.advance_head(to_end as usize);
        }
    }

    /// The lowest free id in 1..=65535, as `xa_alloc` picks it.
    fn lowest_free_id(&self) -> Option<u16> {
        for (w, word) in self.ids.iter().enumerate() {
            if *word != u64::MAX {
                let id = w * 64 + (!word).trailing_zeros() as usize;
                return u16::try_from(id).ok().filter(|&i| i != 0);
            }
        }
        None
    }

    fn set_id(&mut self, id: u16, used: bool) {
        let w = &mut self.ids[id as usize / 64];
        if used {
            *w |= 1 << (id % 64);
        } else {
            *w &= !(1 << (id % 64));
        }
    }

    fn alloc_blocks(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free_blocks {
            return None;
        }
        let mut out = self.spare_blocks.pop().unwrap_or_default();
        out.clear();
        out.reserve(n);
        let mut w = 0;
        while out.len() < n && w < self.bitmap.len() {
            let word = self.bitmap[w];
            if word == u64::MAX {
                w += 1;
                continue;
            }
            let bit = (!word).trailing_zeros() as usize;
            self.bitmap[w] |= 1 << bit;
            out.push((w * 64 + bit) as u32);
        }
        self.free_blocks -= out.len();
        Some(out)
    }

    fn free_blocks(&mut self, blocks: &[u32]) {
        for &b in blocks {
            self.bitmap[b as usize / 64] &= !(1 << (b % 64));
        }
        self.free_blocks += blocks.len();
    }

    /// Frees a command's blocks and keeps its list for reuse.
    fn release_blocks(&mut self, blocks: Vec<u32>) {
        self.free_blocks(&blocks);
        if self.spare_blocks.len() < 1024 {
            self.spare_blocks.push(blocks);
        }
    }

    /// Queues a command as `queue_cmd_ring` does and pokes userspace.
    /// Returns its cmd_id.
    pub fn submit(&mut self, cdb: &[u8], data: Data<'_>) -> Result<u16, EmuError> {
        let id = self.queue(cdb, data)?;
        self.notify_user();
        Ok(id)
    }

    /// Queues without poking userspace (batching, like a plugged queue);
    /// call [`kick`](Self::kick) after.
    pub fn queue(&mut self, cdb: &[u8], data: Data<'_>) -> Result<u16, EmuError> {
        if let Some(b) = &self.broken {
            return Err(EmuError::Broken(b.clone()));
        }
        let cdb_size = cdb_len(cdb)
            .filter(|&l| l <= cdb.len())
            .ok_or_else(|| EmuError::TooLarge("CDB shorter than its opcode says".into()))?;
        let data_len = match data {
            Data::None => 0,
            Data::ToDevice(b) => b.len(),
            Data::FromDevice(n) => n,
        };
        let bs = self.layout.block_size;
        let nblocks = data_len.div_ceil(bs);
        if nblocks * bs > self.layout.data_size {
            return Err(EmuError::TooLarge(format!("{data_len} bytes of data")));
        }
        let blocks = self.alloc_blocks(nblocks).ok_or(EmuError::Full)?;
        // iovecs: neighbouring blocks share one.
        let mut iovs = std::mem::take(&mut self.iov_scratch);
        iovs.clear();
        let mut left = data_len;
        let mut prev: i64 = -2;
        for &b in &blocks {
            let n = left.min(bs) as u64;
            left -= n as usize;
            if i64::from(b) == prev + 1 {
                if let Some(last) = iovs.last_mut() {
                    last.1 += n;
                }
            } else {
                iovs.push(((self.data_off + b as usize * bs) as u64, n));
            }
            prev = i64::from(b);
        }
        let base_size = base_cmd_size(iovs.len());
        let size = cmd_entry_size(iovs.len(), cdb_size);
        if size > self.layout.cmdr_size as usize / 2 {
            self.release_blocks(blocks);
            self.iov_scratch = iovs;
            return Err(EmuError::TooLarge(format!("{size}-byte entry")));
        }
        if !self.ring_room(size) {
            self.release_blocks(blocks);
            self.iov_scratch = iovs;
            return Err(EmuError::Full);
        }
        let Some(id) = self.lowest_free_id() else {
            self.release_blocks(blocks);
            self.iov_scratch = iovs;
            return Err(EmuError::Full);
        };
        self.insert_pad(size);
        let at = MB_SIZE + self.head as usize;
        let m = &self.mem;
        let _ = m.zero(at, size);
        let _ = m.write_u32(at + HDR_LEN_OP, size as u32 | OP_CMD);
        let _ = m.write_u16(at + HDR_CMD_ID, id);
        let _ = m.write_u32(at + REQ_IOV_CNT, iovs.len() as u32);
        for (i, (b, l)) in iovs.iter().enumerate() {
            let _ = m.write_u64(at + REQ_IOV + i * IOVEC_SIZE, *b);
            let _ = m.write_u64(at + REQ_IOV + i * IOVEC_SIZE + 8, *l);
        }
        let cdb_off = at + base_size;
        let _ = m.write_u64(at + REQ_CDB_OFF, cdb_off as u64);
        let _ = m.write_bytes(cdb_off, &cdb[..cdb_size]);
        if let Data::ToDevice(bytes) = data {
            let mut done = 0;
            for (b, l) in &iovs {
                let p = *b as usize;
                let n = *l as usize;
                let _ = m.write_bytes_fast(p, &bytes[done..done + n]);
                done += n;
            }
        }
        self.set_id(id, true);
        self.commands[id as usize] = Some(EmuCmd {
            blocks,
            data_in: if let Data::FromDevice(n) = data { n } else { 0 },
            expired: false,
        });
        self.live += 1;
        self.iov_scratch = iovs;
        self.queued.push_back(self.head);
        self.advance_head(size);
        Ok(id)
    }

    /// Pokes userspace (after [`queue`](Self::queue)).
    pub fn kick(&self) {
        self.notify_user();
    }

    /// Times a command out as the kernel's cmd_time_out does
    /// (`tcmu_check_expired_ring_cmd`): the initiator gets CHECK
    /// CONDITION now; the id stays allocated until userspace completes it.
    /// Returns false if the id is not in flight.
    pub fn expire(&mut self, cmd_id: u16) -> bool {
        match self
            .commands
            .get_mut(cmd_id as usize)
            .and_then(|c| c.as_mut())
        {
            Some(c) if !c.expired => {
                c.expired = true;
                true
            }
            _ => false,
        }
    }

    /// Queues a TMR notification (`queue_tmr_ring`).
    pub fn tmr(&mut self, tmr_type: u8, cmd_ids: &[u16]) -> Result<(), EmuError> {
        let size = (TMR_ENTRY_SIZE + 2 * cmd_ids.len()).div_ceil(OP_ALIGN) * OP_ALIGN;
        if !self.ring_room(size) {
            return Err(EmuError::Full);
        }
        self.insert_pad(size);
        let at = MB_SIZE + self.head as usize;
        let m = &self.mem;
        let _ = m.zero(at, size);
        let _ = m.write_u32(at + HDR_LEN_OP, size as u32 | OP_TMR);
        let _ = m.write_u8(at + TMR_TYPE, tmr_type);
        let _ = m.write_u32(at + TMR_CMD_CNT, cmd_ids.len() as u32);
        for (i, id) in cmd_ids.iter().enumerate() {
            let _ = m.write_u16(at + TMR_CMD_IDS + 2 * i, *id);
        }
        self.queued.push_back(self.head);
        self.advance_head(size);
        self.notify_user();
        Ok(())
    }

    /// Reaps completions up to `cmd_tail` as `tcmu_handle_completions`
    /// does. For each, `on_done` gets the completion and the data-in bytes
    /// (read_len applied). Returns how many commands completed.
    pub fn reap(&mut self, mut on_done: impl FnMut(&Reaped, &[u8])) -> Result<usize, EmuError> {
        if let Some(b) = &self.broken {
            return Err(EmuError::Broken(b.clone()));
        }
        let tail = self
            .mem
            .read_u32(MB_CMD_TAIL)
            .map_err(|e| self.brk(e.to_string()))?;
        if tail >= self.layout.cmdr_size {
            return Err(self.brk(format!("cmd_tail {tail:#x} outside the ring")));
        }
        let mut n = 0;
        let mut buf = std::mem::take(&mut self.scratch);
        while self.last_cleaned != tail {
            let pos = self.last_cleaned;
            if self.queued.front() != Some(&pos) {
                return Err(self.brk(format!(
                    "cmd_tail {tail:#x} walks to {pos:#x}, not an entry boundary"
                )));
            }
            let at = MB_SIZE + pos as usize;
            let len_op = self
                .mem
                .read_u32(at + HDR_LEN_OP)
                .map_err(|e| self.brk(e.to_string()))?;
            let (op, len) = (len_op & OP_MASK, len_op & !OP_MASK);
            if op == OP_PAD || op == OP_TMR {
                self.queued.pop_front();
                self.last_cleaned = (pos + len) % self.layout.cmdr_size;
                continue;
            }
            let id = self.mem.read_u16(at + HDR_CMD_ID).unwrap_or(0);
            let Some(cmd) = self.commands.get_mut(id as usize).and_then(|c| c.take()) else {
                return Err(self.brk(format!("cmd_id {id} not found, ring is broken")));
            };
            let uflags = self.mem.read_u8(at + HDR_UFLAGS).unwrap_or(0);
            let status = self.mem.read_u8(at + RSP_SCSI_STATUS).unwrap_or(0);
            let read_len = self.mem.read_u32(at + RSP_READ_LEN).unwrap_or(0) as usize;
            let unknown_op = uflags & UFLAG_UNKNOWN_OP != 0;
            let mut data_len = cmd.data_in;
            if uflags & UFLAG_READ_LEN != 0 && read_len != 0 && read_len < data_len {
                data_len = read_len;
            }
            let sense = if status == 0x02 && !unknown_op {
                let mut s = vec![0u8; SENSE_BUFFERSIZE];
                let _ = self.mem.read_bytes(at + RSP_SENSE, &mut s);
                Some(s)
            } else {
                None
            };
            // Gather data-in from the command's blocks.
            let data_len = if unknown_op { 0 } else { data_len };
            if buf.len() < data_len {
                buf.resize(data_len, 0);
            }
            if data_len > 0 {
                let bs = self.layout.block_size;
                for (i, b) in cmd.blocks.iter().enumerate() {
                    let lo = i * bs;
                    if lo >= data_len {
                        break;
                    }
                    let hi = (lo + bs).min(data_len);
                    let _ = self
                        .mem
                        .read_bytes_fast(self.data_off + *b as usize * bs, &mut buf[lo..hi]);
                }
            }
            let r = Reaped {
                cmd_id: id,
                status,
                sense,
                data_len,
                unknown_op,
            };
            if !cmd.expired {
                on_done(&r, &buf[..data_len]);
            }
            self.set_id(id, false);
            self.release_blocks(cmd.blocks);
            self.live -= 1;
            n += 1;
            self.queued.pop_front();
            self.last_cleaned = (pos + len) % self.layout.cmdr_size;
        }
        self.scratch = buf;
        Ok(n)
    }

    fn brk(&mut self, why: String) -> EmuError {
        self.broken = Some(why.clone());
        EmuError::Broken(why)
    }

    /// `action/reset_ring`: fails every command in flight (BUSY) and
    /// zeroes head and tail.
    pub fn reset_ring(&mut self) -> Vec<u16> {
        let mut failed = Vec::new();
        for id in 1..=u16::MAX {
            if let Some(c) = self.commands[id as usize].take() {
                self.free_blocks(&c.blocks);
                self.set_id(id, false);
                failed.push(id);
            }
        }
        self.live = 0;
        self.queued.clear();
        self.head = 0;
        self.last_cleaned = 0;
        let _ = self.mem.write_u32(MB_CMD_TAIL, 0);
        let _ = self.mem.store_release_u32(MB_CMD_HEAD, 0);
        self.broken = None;
        failed
    }
}
