//! The TCMU command ring, userspace side.
//!
//! [`Ring::poll`] parses what the kernel queued between our position and
//! `cmd_head`; [`Ring::complete`] writes one completion; [`Ring::publish`]
//! makes completions visible by moving `cmd_tail`. The caller then rings
//! the doorbell (a 4-byte write on the UIO fd).
//!
//! How the kernel reaps (target_core_user.c, `tcmu_handle_completions`): it
//! walks from its last position to `cmd_tail`, skipping PAD and TMR
//! entries; at every CMD entry it takes `hdr.cmd_id` and the `rsp` fields
//! *from that slot* and advances by the slot's `len_op` length. So a
//! completion is written into the oldest unreleased CMD slot, whichever
//! command it belongs to (that is what out-of-order completion means), and
//! the slot's `len_op` is left alone. An id the kernel does not know marks
//! the ring broken for good, so we track every id in flight and refuse to
//! complete anything else.
//!
//! Everything read from the ring is checked before use: entry lengths and
//! alignment, that an entry ends at or before `cmd_head`, iovec counts
//! against the entry length, the CDB inside the entry, every data iovec
//! inside the data area, cmd_ids unique among commands in flight. A
//! violation makes the ring [`RingError`]-broken: we stop reading it rather
//! than trust it.

pub mod abi;
pub mod shm;

use abi::*;
use shm::{OutOfBounds, SharedMem};
use std::collections::VecDeque;
use std::sync::Arc;
use tcmu_handler::{IoBufs, KeepAlive};

/// Why a ring was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The mailbox does not describe a ring we can use.
    #[error("bad mailbox: {0}")]
    BadMailbox(MailboxFault),
    /// An entry the kernel queued is malformed.
    #[error("malformed entry at ring offset {offset:#x}: {fault}")]
    BadEntry {
        /// Offset of the entry in the command ring.
        offset: u32,
        /// What is wrong.
        fault: EntryFault,
    },
    /// `cmd_head` is outside the ring or misaligned.
    #[error("cmd_head {0:#x} outside the command ring or misaligned")]
    BadHead(u32),
    /// An access fell outside the mapping.
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
    /// A completion for an id that is not in flight (our bug, refused so
    /// that the kernel never sees it).
    #[error("completion for cmd_id {0}, which is not in flight")]
    NotInFlight(u16),
}

/// What makes a mailbox unusable (each a way the kernel side can be
/// wrong, or a mapping that is not a TCMU device).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxFault {
    /// The mapping cannot even hold a mailbox.
    #[error("mapping of {len} bytes is too small")]
    TooSmall {
        /// The mapping's length.
        len: usize,
    },
    /// Another mailbox version than the one this code speaks.
    #[error("version {found}, expected {MAILBOX_VERSION}")]
    Version {
        /// The version found.
        found: u16,
    },
    /// The command ring starts inside the mailbox or misaligned.
    #[error("cmdr_off {0:#x}")]
    CmdrOff(usize),
    /// The command ring is too small or misaligned.
    #[error("cmdr_size {0:#x}")]
    CmdrSize(u32),
    /// The command ring ends beyond the mapping.
    #[error("command ring {cmdr_off:#x}+{cmdr_size:#x} beyond the {map_len:#x}-byte mapping")]
    RingBeyondMap {
        /// Ring offset.
        cmdr_off: usize,
        /// Ring size.
        cmdr_size: u32,
        /// Mapping length.
        map_len: usize,
    },
    /// `cmd_tail` is outside the ring or misaligned.
    #[error("cmd_tail {0:#x}")]
    CmdTail(u32),
    /// A mailbox field could not be read.
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
}

/// What makes one ring entry malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryFault {
    /// Not even a header fits before the ring's end or the head.
    #[error("no room for a header (to end {to_end}, queued {queued})")]
    NoRoomForHeader {
        /// Bytes to the end of the ring.
        to_end: u32,
        /// Bytes queued up to the head.
        queued: u32,
    },
    /// The entry's length is zero or runs past the ring's end or the head.
    #[error("length {len} (to end of ring {to_end}, queued {queued})")]
    Length {
        /// The length in the header.
        len: u32,
        /// Bytes to the end of the ring.
        to_end: u32,
        /// Bytes queued up to the head.
        queued: u32,
    },
    /// An opcode other than PAD, CMD and TMR.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u32),
    /// A TMR entry shorter than its fixed part.
    #[error("TMR entry of {0} bytes")]
    TmrTooShort(usize),
    /// A TMR entry listing more ids than it holds.
    #[error("TMR lists {count} ids in {len} bytes")]
    TmrIdsOverflow {
        /// The id count in the entry.
        count: usize,
        /// The entry's length.
        len: usize,
    },
    /// A CMD entry shorter than its fixed part.
    #[error("CMD entry of {0} bytes")]
    CmdTooShort(usize),
    /// cmd_id 0, which the kernel never uses.
    #[error("cmd_id 0")]
    CmdIdZero,
    /// A cmd_id that is already in flight.
    #[error("cmd_id {0} is already in flight")]
    CmdIdInFlight(u16),
    /// The iovec counts do not fit the entry.
    #[error("{iov}+{bidi}+{dif} iovecs do not fit a {len}-byte entry")]
    IovecsOverflow {
        /// Data iovecs.
        iov: usize,
        /// Bidirectional iovecs.
        bidi: usize,
        /// DIF iovecs.
        dif: usize,
        /// The entry's length.
        len: usize,
    },
    /// The CDB offset is outside the entry's CDB area.
    #[error("cdb_off {cdb_off:#x} outside the entry's CDB area {start:#x}..{end:#x}")]
    CdbOffset {
        /// The offset in the entry.
        cdb_off: u64,
        /// Where the CDB area starts (after the iovecs).
        start: usize,
        /// Where the entry ends.
        end: usize,
    },
    /// The CDB area cannot hold the CDB's first bytes.
    #[error("CDB area of {0} bytes too short")]
    CdbAreaTooShort(usize),
    /// The CDB's length (from its opcode) runs past the entry.
    #[error("CDB of {need} bytes overruns the entry ({room} left)")]
    CdbOverrun {
        /// The CDB's length.
        need: usize,
        /// Bytes left in the entry.
        room: usize,
    },
    /// A data iovec points below the data area (into the ring or mailbox).
    #[error("iovec {index} base {base:#x} below the data area")]
    IovecBelowData {
        /// The iovec's index.
        index: usize,
        /// Its base offset.
        base: u64,
    },
    /// A data iovec runs beyond the mapping.
    #[error("iovec {index} {base:#x}+{len:#x} beyond the data area")]
    IovecBeyondData {
        /// The iovec's index.
        index: usize,
        /// Its base offset.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A field of the entry could not be read.
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
}

/// Mailbox capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Out-of-order completion.
    pub ooo: bool,
    /// `read_len` honoured.
    pub read_len: bool,
    /// TMR entries may appear.
    pub tmr: bool,
}

/// A SCSI command taken from the ring.
#[derive(Debug)]
pub struct Command {
    /// Kernel's id for it, 1..=65535.
    pub cmd_id: u16,
    cdb: [u8; MAX_CDB],
    cdb_len: u8,
    /// False when the CDB was longer than [`abi::MAX_CDB`]; the bytes
    /// then hold only the first part and the command must be refused.
    pub cdb_complete: bool,
    /// Data-in or data-out buffer.
    pub bufs: IoBufs,
}

impl Command {
    /// The CDB.
    pub fn cdb(&self) -> &[u8] {
        &self.cdb[..self.cdb_len as usize]
    }
}

/// A task management notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmr {
    /// `TCMU_TMR_*` type.
    pub tmr_type: u8,
    /// Commands in flight that the TMR aborts.
    pub cmd_ids: Vec<u16>,
}

/// Something the kernel queued.
#[derive(Debug)]
pub enum Entry {
    /// A command to run.
    Cmd(Command),
    /// A TMR to note.
    Tmr(Tmr),
}

/// The answer written into the ring for one command.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    /// The command's id.
    pub cmd_id: u16,
    /// SCSI status.
    pub status: u8,
    /// Sense bytes (at most 96 used).
    pub sense: &'a [u8],
    /// Data-in bytes produced, when fewer than the buffer.
    pub read_len: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Ring space of a PAD or TMR entry: the kernel skips it.
    Skip { len: u32 },
    /// A CMD entry already parsed; it receives the next completion.
    Cmd { len: u32 },
}

/// Completions parked until they can be written (in-order rings only).
struct InOrder {
    order: VecDeque<u16>,
    done: std::collections::HashMap<u16, Stored>,
}

struct Stored {
    status: u8,
    sense: [u8; SENSE_BUFFERSIZE],
    sense_len: usize,
    read_len: Option<u32>,
}

/// Userspace's side of one device's command ring.
pub struct Ring {
    mem: Arc<SharedMem>,
    cmdr_off: usize,
    cmdr_size: u32,
    data_off: u64,
    features: Features,
    /// Next entry to parse.
    next: u32,
    /// Our `cmd_tail`: start of the oldest slot not yet released.
    tail: u32,
    /// Last tail stored in the mailbox.
    published: u32,
    /// Parsed, unreleased slots from `tail` on, in ring order.
    slots: VecDeque<Slot>,
    inflight: Box<[u64; 1024]>,
    inflight_count: usize,
    in_order: Option<InOrder>,
    broken: Option<RingError>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("cmdr_size", &self.cmdr_size)
            .field("next", &self.next)
            .field("tail", &self.tail)
            .field("inflight", &self.inflight_count)
            .finish()
    }
}

impl Ring {
    /// Validates the mailbox of `mem` and starts consuming at the current
    /// `cmd_tail`. Entries between `cmd_tail` and `cmd_head` (left by a
    /// previous process) are parsed as new; the device layer resets the
    /// ring through configfs first where it can, since a crashed process
    /// may have left completions half-recorded.
    pub fn new(mem: Arc<SharedMem>) -> Result<Self, RingError> {
        let bad = |f: MailboxFault| Err(RingError::BadMailbox(f));
        if mem.len() < MB_SIZE {
            return bad(MailboxFault::TooSmall { len: mem.len() });
        }
        let rd = |r: Result<u32, OutOfBounds>| r.map_err(|e| RingError::BadMailbox(e.into()));
        let version = mem
            .read_u16(MB_VERSION)
            .map_err(|e| RingError::BadMailbox(e.into()))?;
        if version != MAILBOX_VERSION {
            return bad(MailboxFault::Version { found: version });
        }
        let flags = mem
            .read_u16(MB_FLAGS)
            .map_err(|e| RingError::BadMailbox(e.into()))?;
        let cmdr_off = rd(mem.read_u32(MB_CMDR_OFF))? as usize;
        let cmdr_size = rd(mem.read_u32(MB_CMDR_SIZE))?;
        if cmdr_off < MB_SIZE || !cmdr_off.is_multiple_of(OP_ALIGN) {
            return bad(MailboxFault::CmdrOff(cmdr_off));
        }
        if (cmdr_size as usize) < 2 * CMD_ENTRY_SIZE
            || !(cmdr_size as usize).is_multiple_of(OP_ALIGN)
        {
            return bad(MailboxFault::CmdrSize(cmdr_size));
        }
        let data_off = cmdr_off as u64 + u64::from(cmdr_size);
        if data_off > mem.len() as u64 {
            return bad(MailboxFault::RingBeyondMap {
                cmdr_off,
                cmdr_size,
                map_len: mem.len(),
            });
        }
        let tail = rd(mem.read_u32(MB_CMD_TAIL))?;
        if tail >= cmdr_size || !(tail as usize).is_multiple_of(OP_ALIGN) {
            return bad(MailboxFault::CmdTail(tail));
        }
        let features = Features {
            ooo: flags & FLAG_CAP_OOOC != 0,
            read_len: flags & FLAG_CAP_READ_LEN != 0,
            tmr: flags & FLAG_CAP_TMR != 0,
        };
        Ok(Ring {
            mem,
            cmdr_off,
            cmdr_size,
            data_off,
            features,
            next: tail,
            tail,
            published: tail,
            slots: VecDeque::new(),
            inflight: Box::new([0; 1024]),
            inflight_count: 0,
            in_order: (!features.ooo).then(|| InOrder {
                order: VecDeque::new(),
                done: Default::default(),
            }),
            broken: None,
        })
    }

    /// Mailbox capabilities.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Size of the data area in bytes.
    pub fn data_area_len(&self) -> u64 {
        self.mem.len() as u64 - self.data_off
    }

    /// Size of the command area in bytes.
    pub fn cmd_area_len(&self) -> u32 {
        self.cmdr_size
    }

    /// Command-area bytes taken from the ring and not yet released (the
    /// entries of commands in flight, and of the PADs behind them).
    pub fn cmd_area_used(&self) -> u32 {
        (self.next + self.cmdr_size - self.tail) % self.cmdr_size
    }

    /// Commands taken from the ring and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight_count
    }

    /// The error that broke this ring, if any.
    pub fn broken(&self) -> Option<&RingError> {
        self.broken.as_ref()
    }

    fn is_inflight(&self, id: u16) -> bool {
        self.inflight[id as usize / 64] & (1 << (id % 64)) != 0
    }

    fn set_inflight(&mut self, id: u16, on: bool) {
        let w = &mut self.inflight[id as usize / 64];
        if on {
            *w |= 1 << (id % 64);
            self.inflight_count += 1;
        } else {
            *w &= !(1 << (id % 64));
            self.inflight_count -= 1;
        }
    }

    /// Parses every entry the kernel queued since the last call, appending
    /// them to `out`. Returns how many were appended. After an error the
    /// ring is broken and every later call fails with the same error.
    pub fn poll(&mut self, out: &mut Vec<Entry>) -> Result<usize, RingError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        match self.poll_inner(out) {
            Ok(n) => {
                self.release_skips();
                Ok(n)
            }
            Err(e) => {
                self.broken = Some(e.clone());
                Err(e)
            }
        }
    }

    fn poll_inner(&mut self, out: &mut Vec<Entry>) -> Result<usize, RingError> {
        let head = self.mem.load_acquire_u32(MB_CMD_HEAD)?;
        if head >= self.cmdr_size || !(head as usize).is_multiple_of(OP_ALIGN) {
            return Err(RingError::BadHead(head));
        }
        let mut n = 0;
        while self.next != head {
            let pos = self.next;
            let bad = |fault: EntryFault| RingError::BadEntry { offset: pos, fault };
            // Bytes from pos up to head, going round the ring.
            let avail = (head + self.cmdr_size - pos) % self.cmdr_size;
            let to_end = self.cmdr_size - pos;
            if (to_end as usize) < HDR_SIZE || (avail as usize) < HDR_SIZE {
                return Err(bad(EntryFault::NoRoomForHeader {
                    to_end,
                    queued: avail,
                }));
            }
            let base = self.cmdr_off + pos as usize;
            let len_op = self
                .mem
                .read_u32(base + HDR_LEN_OP)
                .map_err(|e| bad(e.into()))?;
            let op = len_op & OP_MASK;
            let len = len_op & !OP_MASK;
            if len == 0 || len > to_end || len > avail {
                return Err(bad(EntryFault::Length {
                    len,
                    to_end,
                    queued: avail,
                }));
            }
            match op {
                OP_PAD => self.slots.push_back(Slot::Skip { len }),
                OP_TMR => {
                    let tmr = self.parse_tmr(base, len).map_err(bad)?;
                    self.slots.push_back(Slot::Skip { len });
                    out.push(Entry::Tmr(tmr));
                    n += 1;
                }
                OP_CMD => {
                    let cmd = self.parse_cmd(base, len).map_err(bad)?;
                    self.set_inflight(cmd.cmd_id, true);
                    if let Some(io) = &mut self.in_order {
                        io.order.push_back(cmd.cmd_id);
                    }
                    self.slots.push_back(Slot::Cmd { len });
                    out.push(Entry::Cmd(cmd));
                    n += 1;
                }
                other => return Err(bad(EntryFault::UnknownOpcode(other))),
            }
            self.next = (pos + len) % self.cmdr_size;
        }
        Ok(n)
    }

    fn parse_tmr(&self, base: usize, len: u32) -> Result<Tmr, EntryFault> {
        let len = len as usize;
        if len < TMR_ENTRY_SIZE {
            return Err(EntryFault::TmrTooShort(len));
        }
        let m = &self.mem;
        let tmr_type = m.read_u8(base + TMR_TYPE)?;
        let cnt = m.read_u32(base + TMR_CMD_CNT)? as usize;
        if cnt > (len - TMR_ENTRY_SIZE) / 2 {
            return Err(EntryFault::TmrIdsOverflow { count: cnt, len });
        }
        let mut cmd_ids = Vec::with_capacity(cnt);
        for i in 0..cnt {
            cmd_ids.push(m.read_u16(base + TMR_CMD_IDS + 2 * i)?);
        }
        Ok(Tmr { tmr_type, cmd_ids })
    }

    fn parse_cmd(&self, base: usize, len: u32) -> Result<Command, EntryFault> {
        let len = len as usize;
        let m = &self.mem;
        if len < CMD_ENTRY_SIZE {
            return Err(EntryFault::CmdTooShort(len));
        }
        let cmd_id = m.read_u16(base + HDR_CMD_ID)?;
        if cmd_id == 0 {
            return Err(EntryFault::CmdIdZero);
        }
        if self.is_inflight(cmd_id) {
            return Err(EntryFault::CmdIdInFlight(cmd_id));
        }
        let iov_cnt = m.read_u32(base + REQ_IOV_CNT)? as usize;
        let bidi = m.read_u32(base + REQ_IOV_BIDI_CNT)? as usize;
        let dif = m.read_u32(base + REQ_IOV_DIF_CNT)? as usize;
        let total = iov_cnt
            .checked_add(bidi)
            .and_then(|t| t.checked_add(dif))
            .filter(|&t| t <= (len - REQ_IOV) / IOVEC_SIZE)
            .ok_or(EntryFault::IovecsOverflow {
                iov: iov_cnt,
                bidi,
                dif,
                len,
            })?;
        let iov_end = base + REQ_IOV + total * IOVEC_SIZE;
        let entry_end = base + len;

        // The CDB must lie inside this entry, after the iovecs.
        let cdb_off = m.read_u64(base + REQ_CDB_OFF)?;
        if cdb_off < iov_end as u64 || cdb_off >= entry_end as u64 {
            return Err(EntryFault::CdbOffset {
                cdb_off,
                start: iov_end,
                end: entry_end,
            });
        }
        let cdb_off = cdb_off as usize;
        let room = entry_end - cdb_off;
        let mut cdb = [0u8; MAX_CDB];
        let head_len = room.min(MAX_CDB).min(8);
        m.read_bytes(cdb_off, &mut cdb[..head_len])?;
        let need = cdb_len(&cdb[..head_len]).ok_or(EntryFault::CdbAreaTooShort(room))?;
        if need > room {
            return Err(EntryFault::CdbOverrun { need, room });
        }
        let take = need.min(MAX_CDB);
        m.read_bytes(cdb_off, &mut cdb[..take])?;

        // Data iovecs: offsets from the start of the map, inside the data area.
        // Most commands carry one or two iovecs: keep those off the heap.
        let mut inline: [(*mut u8, usize); 4] = [(std::ptr::null_mut(), 0); 4];
        let mut heap: Vec<(*mut u8, usize)> = Vec::new();
        let mut nseg = 0usize;
        for i in 0..iov_cnt {
            let at = base + REQ_IOV + i * IOVEC_SIZE;
            let ib = m.read_u64(at)?;
            let il = m.read_u64(at + 8)?;
            if ib < self.data_off {
                return Err(EntryFault::IovecBelowData { index: i, base: ib });
            }
            let p = m
                .raw_range(ib, il)
                .map_err(|_| EntryFault::IovecBeyondData {
                    index: i,
                    base: ib,
                    len: il,
                })?;
            if il > 0 {
                if nseg < inline.len() {
                    inline[nseg] = (p, il as usize);
                } else {
                    if heap.is_empty() {
                        heap.extend_from_slice(&inline);
                    }
                    heap.push((p, il as usize));
                }
                nseg += 1;
            }
        }
        let segs = if heap.is_empty() {
            &inline[..nseg]
        } else {
            &heap[..]
        };
        let keep: KeepAlive = self.mem.clone();
        // SAFETY: every segment was checked to lie inside the data area of
        // the mapping, which `keep` holds mapped. The kernel does not touch
        // a command's data blocks until it reaps the completion, and we
        // complete only after the backend is done with them.
        let bufs = unsafe { IoBufs::from_raw(segs, Some(keep)) };
        Ok(Command {
            cmd_id,
            cdb,
            cdb_len: take as u8,
            cdb_complete: need <= MAX_CDB,
            bufs,
        })
    }

    /// Releases PAD/TMR slots at the front: the kernel skips them too, and
    /// releasing them frees ring space without waiting for a completion.
    fn release_skips(&mut self) {
        while let Some(Slot::Skip { len }) = self.slots.front() {
            self.tail = (self.tail + len) % self.cmdr_size;
            self.slots.pop_front();
        }
    }

    /// Records the completion of a command in flight. It becomes visible to
    /// the kernel at the next [`publish`](Self::publish).
    pub fn complete(&mut self, c: Completion<'_>) -> Result<(), RingError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if !self.is_inflight(c.cmd_id) {
            return Err(RingError::NotInFlight(c.cmd_id));
        }
        if self.in_order.is_some() {
            let mut sense = [0u8; SENSE_BUFFERSIZE];
            let n = c.sense.len().min(SENSE_BUFFERSIZE);
            sense[..n].copy_from_slice(&c.sense[..n]);
            if let Some(io) = &mut self.in_order {
                io.done.insert(
                    c.cmd_id,
                    Stored {
                        status: c.status,
                        sense,
                        sense_len: n,
                        read_len: c.read_len,
                    },
                );
            }
            return self.flush_in_order();
        }
        self.write_front(c)
    }

    fn flush_in_order(&mut self) -> Result<(), RingError> {
        loop {
            let Some(io) = &mut self.in_order else {
                return Ok(());
            };
            let Some(&id) = io.order.front() else {
                return Ok(());
            };
            let Some(s) = io.done.remove(&id) else {
                return Ok(());
            };
            io.order.pop_front();
            self.write_front(Completion {
                cmd_id: id,
                status: s.status,
                sense: &s.sense[..s.sense_len],
                read_len: s.read_len,
            })?;
        }
    }

    /// Writes `c` into the oldest unreleased CMD slot and releases it.
    fn write_front(&mut self, c: Completion<'_>) -> Result<(), RingError> {
        self.release_skips();
        let Some(Slot::Cmd { len }) = self.slots.front().copied() else {
            // Cannot happen while the id is in flight: every id in flight
            // has one unreleased CMD slot. Refuse rather than guess.
            return Err(RingError::NotInFlight(c.cmd_id));
        };
        let base = self.cmdr_off + self.tail as usize;
        let m = &self.mem;
        let mut uflags = 0u8;
        let read_len = match (c.read_len, self.features.read_len) {
            (Some(n), true) if n > 0 => {
                uflags |= UFLAG_READ_LEN;
                n
            }
            _ => 0,
        };
        m.write_u16(base + HDR_CMD_ID, c.cmd_id)?;
        m.write_u8(base + HDR_UFLAGS, uflags)?;
        m.write_u8(base + RSP_SCSI_STATUS, c.status)?;
        m.write_u8(base + RSP_SCSI_STATUS + 1, 0)?;
        m.write_u16(base + RSP_SCSI_STATUS + 2, 0)?;
        m.write_u32(base + RSP_READ_LEN, read_len)?;
        let n = c.sense.len().min(SENSE_BUFFERSIZE);
        m.write_bytes(base + RSP_SENSE, &c.sense[..n])?;
        if n > 0 {
            m.zero(base + RSP_SENSE + n, SENSE_BUFFERSIZE - n)?;
        } else {
            // The kernel copies sense only with CHECK CONDITION; clear the
            // first bytes so a stale CDB never reads as sense.
            m.write_u64(base + RSP_SENSE, 0)?;
        }
        self.slots.pop_front();
        self.tail = (self.tail + len) % self.cmdr_size;
        self.set_inflight(c.cmd_id, false);
        self.release_skips();
        Ok(())
    }

    /// Stores our tail into the mailbox if it moved; returns true if the
    /// kernel should be notified.
    pub fn publish(&mut self) -> Result<bool, RingError> {
        if self.tail == self.published {
            return Ok(false);
        }
        self.mem.store_release_u32(MB_CMD_TAIL, self.tail)?;
        self.published = self.tail;
        Ok(true)
    }
}
