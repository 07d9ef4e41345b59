//! The SCSI core: decodes a CDB, answers what a LUN emulates itself, and
//! turns data commands into backend operations.
//!
//! The ring worker calls [`Lun::execute`] for every command. It either
//! answers at once ([`Outcome::Done`], any data already copied into the
//! command's buffers) or hands back a backend [`Op`] with a [`Pending`] token;
//! when the backend finishes, [`Lun::finish`] turns the result into the
//! response, or into one more operation (a flush after a write that must
//! be stable, the compare of a VERIFY).
//!
//! Modules, one idea each: [`cdb`] (decoding), [`sense`], [`inquiry`]
//! (standard data and VPD), [`mode`] (mode pages), [`rw`] (reads, writes,
//! verify, cache sync, capacity), [`provision`] (UNMAP, WRITE SAME),
//! [`caw`] (COMPARE AND WRITE), [`xcopy`] (EXTENDED COPY),
//! [`lba_status`] (GET LBA STATUS), [`alua`], [`opcodes`] (REPORT
//! SUPPORTED OPERATION CODES), [`limits`].

pub mod alua;
pub mod caw;
pub mod cdb;
pub mod inquiry;
pub mod lba_status;
pub mod limits;
pub mod mode;
pub mod opcodes;
pub mod provision;
pub mod rw;
pub mod sense;
pub mod xcopy;

use alua::{AluaMode, AluaSource, SharedAlua};
use cdb::{op, sa, Cdb};
use limits::Limits;
use sense::{invalid_cdb, key, Sense, CHECK_CONDITION, GOOD};
use std::sync::Arc;
use tcmu_handler::{Caps, ExtentSlot, Geometry, IoBufs, IoError, IoResult, Op};

pub use sense::{INVALID_FIELD_IN_CDB, INVALID_OPCODE, LBA_OUT_OF_RANGE};

/// Identity and limits of a LUN, fixed when the device is opened.
#[derive(Clone, Debug)]
pub struct LunInfo {
    /// T10 vendor identification (8 chars, space padded on the wire).
    pub vendor: String,
    /// Product identification (16 chars).
    pub product: String,
    /// Product revision (4 chars).
    pub revision: String,
    /// Unit serial number (VPD 0x80); the same on every gateway of an
    /// image. The NAA designator (VPD 0x83) is derived from it.
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
    /// GOOD with `n` bytes of data-in.
    pub fn data(n: usize) -> Self {
        Response {
            status: GOOD,
            sense: None,
            read_len: Some(u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }
}

/// What a backend operation was for (error mapping, follow-up work).
#[derive(Debug)]
enum Kind {
    Read,
    Write,
    Flush,
    Caw,
    /// VERIFY with BYTCHK: the media was read into `media`; compare.
    Verify(Box<rw::Verify>),
    /// EXTENDED COPY, run by the daemon's copy engine.
    Copy,
    /// GET LBA STATUS: the backend filled `out`; answer from it.
    LbaStatus(Box<lba_status::Query>, ExtentSlot),
}

/// What to do after [`Lun::finish`] for a command that went to the backend.
#[derive(Debug)]
pub struct Pending {
    kind: Kind,
    /// Flush after success: the write must be stable before GOOD (FUA on
    /// an operation without one, or write-through with WCE off).
    flush_after: bool,
}

impl Pending {
    /// Whether the operation reads into a scratch buffer of its own
    /// (VERIFY with BYTCHK) rather than into the command's buffer.
    pub fn reads_into_own_buffer(&self) -> bool {
        matches!(self.kind, Kind::Verify(_))
    }

    fn new(kind: Kind) -> Self {
        Pending {
            kind,
            flush_after: false,
        }
    }
}

/// The result of [`Lun::execute`] and [`Lun::finish`].
#[derive(Debug)]
pub enum Outcome {
    /// Answer now.
    Done(Response),
    /// Run `Op` on the backend, then call [`Lun::finish`] with the token.
    Submit(Op, Pending),
    /// Hand the EXTENDED COPY to the copy engine, then call
    /// [`Lun::finish`] with the token and the copy's result.
    Copy(CopyRequest, Pending),
}

/// An EXTENDED COPY for the copy engine: the plan, and this LUN's own
/// designator (a CSCD naming it is this LUN).
#[derive(Debug)]
pub struct CopyRequest {
    /// The decoded parameter list.
    pub plan: xcopy::CopyPlan,
    /// The NAA designator this LUN reports in VPD page 0x83.
    pub local: xcopy::Designator,
}

impl Outcome {
    fn check(s: Sense) -> Self {
        Outcome::Done(Response::check(s))
    }
}

/// The state of one LUN.
pub struct Lun {
    info: LunInfo,
    limits: Limits,
    blocks: u64,
    bs: u64,
    /// Write cache enabled (caching mode page); only meaningful with a
    /// backend write cache.
    wce: bool,
    /// CAPACITY DATA HAS CHANGED is pending.
    ua_capacity: bool,
    alua: Arc<dyn AluaSource>,
}

impl Lun {
    /// A LUN with `info`, ALUA off.
    pub fn new(info: LunInfo) -> Self {
        Lun {
            limits: Limits::new(&info),
            blocks: info.geometry.blocks(),
            bs: u64::from(info.geometry.block_size.max(1)),
            wce: info.caps.write_cache,
            ua_capacity: false,
            alua: Arc::new(SharedAlua::off()),
            info,
        }
    }

    /// Uses `source` for ALUA groups and states from now on.
    pub fn set_alua(&mut self, source: Arc<dyn AluaSource>) {
        self.alua = source;
    }

    /// ALUA as the source has it now (groups can appear after the device
    /// opened).
    fn alua_mode(&self) -> AluaMode {
        self.alua.mode()
    }

    /// The ALUA source.
    pub fn alua(&self) -> &Arc<dyn AluaSource> {
        &self.alua
    }

    /// New size (online resize); the next command (other than INQUIRY,
    /// REPORT LUNS, REQUEST SENSE) gets CAPACITY DATA HAS CHANGED.
    pub fn set_geometry(&mut self, geometry: Geometry) {
        if geometry != self.info.geometry {
            self.ua_capacity = true;
        }
        self.info.geometry = geometry;
        self.blocks = geometry.blocks();
        self.bs = u64::from(geometry.block_size.max(1));
        self.limits = Limits::new(&self.info);
    }

    /// The LUN's identity and limits.
    pub fn info(&self) -> &LunInfo {
        &self.info
    }

    /// The limits advertised in the Block Limits VPD page.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the write cache is enabled (caching mode page WCE).
    pub fn write_cache_enabled(&self) -> bool {
        self.wce
    }

    /// Writes must reach stable storage before GOOD: the backend caches
    /// and the initiator turned WCE off.
    #[inline]
    fn write_through(&self) -> bool {
        self.info.caps.write_cache && !self.wce
    }

    /// Decodes and runs one command against `bufs` (the data-in or data-out
    /// buffer the kernel allocated for it).
    #[inline]
    pub fn execute(&mut self, cdb: &[u8], bufs: &IoBufs) -> Outcome {
        let Some(&opcode) = cdb.first() else {
            return Outcome::check(INVALID_OPCODE);
        };
        if self.ua_capacity || self.alua_mode().enabled() {
            if let Some(refused) = self.gate(opcode, cdb) {
                return refused;
            }
        }
        // Flags and control bits the usage data does not show (the one
        // table RSOC reports from).
        if let Some(s) = opcodes::unused_bits(cdb) {
            return Outcome::check(s);
        }
        if let Some(o) = self.fast_rw(cdb, bufs) {
            return o;
        }
        self.execute_other(opcode, cdb, bufs)
    }

    /// A pending unit attention, or a port state that refuses `cdb`.
    #[cold]
    fn gate(&mut self, opcode: u8, cdb: &[u8]) -> Option<Outcome> {
        if self.ua_capacity && !matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
        {
            self.ua_capacity = false;
            return Some(Outcome::check(sense::CAPACITY_CHANGED));
        }
        if self.alua_mode().enabled() {
            if let alua::Access::Refuse(s) = alua::check(&*self.alua, self.alua_mode(), cdb) {
                return Some(Outcome::check(s));
            }
        }
        None
    }

    /// Everything but the READ/WRITE(10/16) fast path; kept out of line so
    /// the hot path stays small.
    #[inline(never)]
    fn execute_other(&mut self, opcode: u8, cdb: &[u8], bufs: &IoBufs) -> Outcome {
        let Some(c) = Cdb::parse(cdb) else {
            return Outcome::check(if cdb::group_len(opcode).is_none() {
                INVALID_OPCODE
            } else {
                INVALID_FIELD_IN_CDB
            });
        };
        match opcode {
            op::READ_10 | op::READ_16 | op::READ_6 | op::READ_12 => self.read(&c, bufs),
            op::WRITE_10 | op::WRITE_16 | op::WRITE_6 | op::WRITE_12 => self.write(&c, bufs),
            op::TEST_UNIT_READY => Outcome::Done(Response::good()),
            op::REQUEST_SENSE => self.request_sense(&c, bufs),
            op::INQUIRY => self.data_in(
                inquiry::inquiry(&c, &self.info, &self.limits, &*self.alua),
                usize::from(c.be16(3)),
                bufs,
            ),
            op::MODE_SENSE_6 => self.data_in(
                mode::mode_sense(&c, false, &self.info, self.wce),
                usize::from(c.u8(4)),
                bufs,
            ),
            op::MODE_SENSE_10 => self.data_in(
                mode::mode_sense(&c, true, &self.info, self.wce),
                usize::from(c.be16(7)),
                bufs,
            ),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
                self.mode_select(&c, opcode == op::MODE_SELECT_10, bufs)
            }
            op::READ_CAPACITY_10 => self.data_in(self.read_capacity_10(&c), 8, bufs),
            op::SERVICE_ACTION_IN_16 if c.service_action() == sa::READ_CAPACITY_16 => {
                self.data_in(Ok(self.read_capacity_16()), c.be32(10) as usize, bufs)
            }
            op::SERVICE_ACTION_IN_16 if c.service_action() == sa::GET_LBA_STATUS => {
                self.get_lba_status(&c, bufs)
            }
            op::SERVICE_ACTION_IN_16 => Outcome::check(invalid_cdb(1, Some(4))),
            op::WRITE_VERIFY_10 | op::WRITE_VERIFY_16 => self.write(&c, bufs),
            op::VERIFY_10 | op::VERIFY_16 => self.verify(&c, bufs),
            op::SYNC_CACHE_10 | op::SYNC_CACHE_16 => self.sync_cache(&c),
            op::UNMAP => self.unmap(&c, bufs),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(&c, bufs),
            op::COMPARE_AND_WRITE => self.compare_and_write(&c, bufs),
            op::MAINTENANCE_IN => self.maintenance_in(&c, bufs),
            op::MAINTENANCE_OUT => self.maintenance_out(&c, bufs),
            op::EXTENDED_COPY => self.extended_copy(&c, bufs),
            op::RECEIVE_COPY_RESULTS => self.receive_copy_results(&c, bufs),
            _ => Outcome::check(INVALID_OPCODE),
        }
    }

    /// Copies data-in: at most the allocation length and the buffer,
    /// with `read_len` set to what was copied.
    fn data_in(&self, data: Result<Vec<u8>, Sense>, alloc: usize, bufs: &IoBufs) -> Outcome {
        match data {
            Ok(d) => {
                let n = d.len().min(alloc).min(bufs.len());
                let n = bufs.copy_in(0, &d[..n]);
                Outcome::Done(Response::data(n))
            }
            Err(s) => Outcome::check(s),
        }
    }

    /// Copies the first `len` bytes of a data-out buffer; `None` if the
    /// buffer is shorter.
    fn data_out(bufs: &IoBufs, len: usize) -> Option<Vec<u8>> {
        if bufs.len() < len {
            return None;
        }
        let mut v = vec![0u8; len];
        bufs.copy_out(0, &mut v);
        Some(v)
    }

    fn request_sense(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        if c.u8(1) & 0x01 != 0 {
            // DESC: descriptor-format sense is not supported.
            return Outcome::check(invalid_cdb(1, Some(0)));
        }
        // A pending unit attention is reported (and cleared) here; else
        // the port's ALUA condition; else NO SENSE.
        let s = if std::mem::take(&mut self.ua_capacity) {
            sense::CAPACITY_CHANGED
        } else if self.alua_mode().enabled() {
            alua::state_sense(self.alua.local_state()).unwrap_or(Sense::new(key::NO_SENSE, 0, 0))
        } else {
            Sense::new(key::NO_SENSE, 0, 0)
        };
        self.data_in(Ok(s.to_fixed().to_vec()), usize::from(c.u8(4)), bufs)
    }

    fn mode_select(&mut self, c: &Cdb, ten: bool, bufs: &IoBufs) -> Outcome {
        let len = mode::select_len(c, ten);
        let Some(list) = Self::data_out(bufs, len) else {
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        };
        match mode::mode_select(c, ten, &self.info, &list, self.wce) {
            Ok(wce) => {
                if wce != self.wce {
                    tracing::info!(wce, "write cache setting changed by MODE SELECT");
                }
                self.wce = wce;
                Outcome::Done(Response::good())
            }
            Err(s) => Outcome::check(s),
        }
    }

    fn maintenance_in(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        let alloc = c.be32(6) as usize;
        match c.service_action() {
            sa::REPORT_SUPPORTED_OPCODES => {
                let discard = self.info.caps.discard;
                let mode = self.alua_mode();
                let r = opcodes::report(c, |n| match n {
                    opcodes::Needs::Always => true,
                    opcodes::Needs::Discard => discard,
                    opcodes::Needs::LbaStatus => discard,
                    opcodes::Needs::Alua => mode.enabled(),
                    opcodes::Needs::ExplicitAlua => mode.explicit,
                });
                self.data_in(r, alloc, bufs)
            }
            sa::REPORT_TARGET_PGS if self.alua_mode().enabled() => {
                let extended = match c.u8(1) >> 5 {
                    0 => false,
                    1 => true,
                    _ => return Outcome::check(invalid_cdb(1, Some(7))),
                };
                self.data_in(Ok(alua::rtpg_data(&*self.alua, extended)), alloc, bufs)
            }
            _ => Outcome::check(INVALID_OPCODE),
        }
    }

    fn maintenance_out(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        if c.service_action() != sa::SET_TARGET_PGS || !self.alua_mode().explicit {
            return Outcome::check(INVALID_OPCODE);
        }
        let len = c.be32(6) as usize;
        if len == 0 {
            return Outcome::Done(Response::good());
        }
        // STPG lists are a few descriptors; refuse absurd lengths before
        // copying.
        if len > 4 + 4 * 1024 {
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        }
        let Some(list) = Self::data_out(bufs, len) else {
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        };
        let reqs = match alua::parse_stpg(&list) {
            Ok(r) => r,
            Err(s) => return Outcome::check(s),
        };
        match self.alua.set_target_port_groups(&reqs) {
            Ok(()) => {
                tracing::info!(requests = ?reqs, "set target port groups");
                Outcome::Done(Response::good())
            }
            Err(e) => {
                tracing::warn!(error = %e, "set target port groups refused");
                Outcome::check(alua::stpg_error_sense(&e))
            }
        }
    }

    fn extended_copy(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        if c.service_action() != sa::EXTENDED_COPY_LID1 {
            return Outcome::check(invalid_cdb(1, Some(4)));
        }
        let len = c.be32(10) as usize;
        // A zero-length list moves nothing and is no error (SPC-4 6.4.1).
        if len == 0 {
            return Outcome::Done(Response::good());
        }
        if len > xcopy::HEADER_LEN + xcopy::MAX_DESCRIPTOR_LIST {
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        }
        let Some(list) = Self::data_out(bufs, len) else {
            return Outcome::check(sense::PARAM_LIST_LENGTH_ERROR);
        };
        match xcopy::parse(&list) {
            Ok(plan) if plan.segments.is_empty() => Outcome::Done(Response::good()),
            Ok(plan) => Outcome::Copy(
                CopyRequest {
                    plan,
                    local: inquiry::naa_designator(&self.info.serial),
                },
                Pending::new(Kind::Copy),
            ),
            Err(s) => Outcome::check(s),
        }
    }

    fn receive_copy_results(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        if c.service_action() != sa::COPY_OPERATING_PARAMETERS {
            return Outcome::check(invalid_cdb(1, Some(4)));
        }
        let bs = self.info.geometry.block_size;
        self.data_in(
            Ok(xcopy::operating_parameters(bs)),
            c.be32(10) as usize,
            bufs,
        )
    }

    /// Turns a backend result into the response for the command that
    /// produced `pending`, or into a follow-up operation.
    #[inline]
    pub fn finish(&mut self, pending: Pending, result: IoResult) -> Outcome {
        if result.is_ok()
            && !pending.flush_after
            && matches!(pending.kind, Kind::Read | Kind::Write)
        {
            return Outcome::Done(Response::good());
        }
        self.finish_slow(pending, result)
    }

    #[cold]
    fn finish_slow(&mut self, pending: Pending, result: IoResult) -> Outcome {
        let Pending { kind, flush_after } = pending;
        if let Err(e) = result {
            return Outcome::check(self.error_sense(&kind, &e));
        }
        if flush_after {
            return Outcome::Submit(Op::Flush, Pending::new(kind));
        }
        match kind {
            Kind::Verify(v) => Outcome::Done(v.compare()),
            Kind::LbaStatus(q, out) => self.lba_status_answer(&q, &out),
            _ => Outcome::Done(Response::good()),
        }
    }

    /// GET LBA STATUS: on a LUN that is thin provisioned (LBPME); the
    /// backend is asked only when it can tell allocation apart, else
    /// every block is "mapped or unknown".
    fn get_lba_status(&mut self, c: &Cdb, bufs: &IoBufs) -> Outcome {
        if !self.info.caps.discard {
            return Outcome::check(INVALID_OPCODE);
        }
        let q = match lba_status::decode(c, self.blocks, self.bs, bufs) {
            Ok(q) => q,
            Err(s) => return Outcome::check(s),
        };
        let out = ExtentSlot::default();
        if !self.info.caps.lba_status {
            let all = [(q.lba * self.bs, (q.end - q.lba) * self.bs)];
            *out.lock().unwrap_or_else(|e| e.into_inner()) = all.to_vec();
            return self.lba_status_answer(&q, &out);
        }
        let op = Op::Provisioning {
            offset: q.lba * self.bs,
            len: (q.end - q.lba) * self.bs,
            out: ExtentSlot::clone(&out),
        };
        Outcome::Submit(op, Pending::new(Kind::LbaStatus(Box::new(q), out)))
    }

    /// The parameter data of a GET LBA STATUS, from what the backend
    /// reported allocated.
    fn lba_status_answer(&self, q: &lba_status::Query, out: &ExtentSlot) -> Outcome {
        let allocated = std::mem::take(&mut *out.lock().unwrap_or_else(|e| e.into_inner()));
        let runs = lba_status::runs(q, self.bs, &allocated);
        let data = lba_status::encode(q, &runs);
        self.data_in(Ok(data), q.alloc, &q.bufs)
    }

    fn error_sense(&self, kind: &Kind, e: &IoError) -> Sense {
        match e {
            // A copy's failures are the copy's (SPC-4 6.4.1): the host
            // falls back to reading and writing itself.
            e if matches!(kind, Kind::Copy) => copy_error_sense(e),
            IoError::Miscompare { offset } => {
                sense::MISCOMPARE.with_info(u32::try_from(*offset).unwrap_or(u32::MAX))
            }
            IoError::OutOfRange => LBA_OUT_OF_RANGE,
            IoError::NoSpace => sense::SPACE_ALLOCATION_FAILED,
            // Transient: the initiator retries, then fails the path over.
            IoError::Timeout => Sense::new(key::ABORTED_COMMAND, 0x00, 0x00),
            // This gateway lost the image: send the initiator elsewhere.
            IoError::Fenced(_) if self.alua_mode().enabled() => sense::ALUA_STANDBY,
            IoError::Fenced(_) => sense::NOT_READY,
            IoError::Unsupported => INVALID_OPCODE,
            IoError::Io { .. } => match kind {
                Kind::Read | Kind::Verify(_) | Kind::LbaStatus(..) => sense::MEDIUM_ERROR,
                Kind::Write | Kind::Flush | Kind::Caw | Kind::Copy => sense::WRITE_ERROR,
            },
        }
    }
}

/// The sense for a failed EXTENDED COPY.
fn copy_error_sense(e: &IoError) -> Sense {
    match e {
        IoError::OutOfRange => sense::COPY_LBA_OUT_OF_RANGE,
        // A CSCD the engine may not reach (unknown, not visible to the
        // same initiators, or on a gateway that does not hold its lock).
        IoError::Unsupported | IoError::Fenced(_) => sense::COPY_TARGET_NOT_REACHABLE,
        IoError::NoSpace => sense::SPACE_ALLOCATION_FAILED,
        IoError::Timeout => Sense::new(key::ABORTED_COMMAND, 0x00, 0x00),
        // The engine's word for a CSCD whose block length is not its LUN's.
        IoError::Io {
            errno: libc::EMEDIUMTYPE,
            ..
        } => sense::COPY_TARGET_WRONG_TYPE,
        IoError::Miscompare { .. } | IoError::Io { .. } => sense::COPY_TARGET_FAILURE,
    }
}
