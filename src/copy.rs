//! The copy engine behind EXTENDED COPY: finds the logical units a copy
//! plan names among the devices this daemon serves, checks that the
//! initiator could reach them itself, and moves the data backend to
//! backend (librbd to librbd for rbd LUNs), nothing through the
//! initiator.
//!
//! - A ring worker hands a decoded plan over ([`Copier::start`]) and goes
//!   on; the copy runs on one of [`MAX_CONCURRENT_COPIES`] engine threads
//!   shared by every device (started at the first copy), and completes the
//!   command through the device's completion queue like any backend
//!   operation.
//! - **Who may copy where.** TCMU's ring entries carry no I_T nexus, so
//!   the engine cannot ask which initiator sent the command. A copy
//!   between two LUNs is served only when every initiator that reaches the
//!   LUN receiving the command (per LIO's configfs: the target port groups
//!   exporting it and their ACLs) also reaches the other one; otherwise
//!   an initiator could read or overwrite a LUN it was never given (the
//!   hole the kernel closed for its own XCOPY as CVE-2020-28374). Copies
//!   within one LUN are always served. Refused copies end with COPY
//!   TARGET DEVICE NOT REACHABLE, and the host copies by itself.
//! - An HA rbd LUN's backend is the lock gate: a copy to or from an image
//!   this gateway does not hold ends the same way, and never takes a lock.
//! - Data moves in [`CHUNK`]-byte pieces, [`DEPTH`] in flight per copy
//!   (reads and writes overlap); a copy within one LUN whose ranges
//!   overlap goes one piece at a time, in the direction that reads every
//!   block before overwriting it. Each of the [`DEPTH`] slots keeps one
//!   buffer for the whole copy (all its segments), made at its first
//!   piece: no allocation per piece.

use crate::scsi::xcopy::{CopyPlan, Designator, MAX_CONCURRENT_COPIES};
use crate::scsi::CopyRequest;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tcmu_handler::{Backend, CompletionQueue, Done, IoBufs, IoError, IoResult, Op};
use tracing::{debug, warn};

/// Bytes per piece of a copy.
pub const CHUNK: usize = 1 << 20;
/// Pieces in flight per copy.
pub const DEPTH: usize = 8;

/// Starts EXTENDED COPY commands for a device's ring worker.
pub trait Copier: Send + Sync {
    /// Runs `req`, received by device `local_name` served by `local`;
    /// completes `done` when the copy ends. Never blocks.
    fn start(&self, req: CopyRequest, local_name: &str, local: Arc<dyn Backend>, done: Done);
}

/// A device a copy may name.
#[derive(Clone)]
pub struct Target {
    /// Its VPD 0x83 NAA designator.
    pub naa: Designator,
    /// Its backend, as its ring worker uses it (the HA gate included).
    pub backend: Arc<dyn Backend>,
    /// Its configfs directory (None: no kernel, as in the emulator's tests).
    pub configfs_dir: Option<PathBuf>,
}

/// Who reaches a LUN: (target port group directory, initiator or `*`).
pub type Reach = BTreeSet<(PathBuf, String)>;

/// Says who reaches the LUN of a configfs device directory.
pub type ReachFn = dyn Fn(&std::path::Path) -> std::io::Result<Reach> + Send + Sync;

struct Job {
    req: CopyRequest,
    local_name: String,
    local: Arc<dyn Backend>,
    done: Done,
}

/// The daemon's copy engine: the devices a copy may name, and the
/// threads that copy.
pub struct CopyEngine {
    targets: RwLock<HashMap<String, Target>>,
    tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    reach: Arc<ReachFn>,
}

impl Default for CopyEngine {
    fn default() -> Self {
        Self::with_reach(Arc::new(|dir: &std::path::Path| {
            crate::configfs::lun_reach(dir)
        }))
    }
}

impl CopyEngine {
    /// An engine that asks `reach` who reaches a device (tests pass a
    /// fake configfs).
    pub fn with_reach(reach: Arc<ReachFn>) -> Self {
        CopyEngine {
            targets: RwLock::new(HashMap::new()),
            tx: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            reach,
        }
    }

    /// Makes device `name` nameable in copies.
    pub fn register(&self, name: &str, target: Target) {
        if let Ok(mut t) = self.targets.write() {
            t.insert(name.to_string(), target);
        }
    }

    /// Forgets device `name` (it is being removed).
    pub fn unregister(&self, name: &str) {
        if let Ok(mut t) = self.targets.write() {
            t.remove(name);
        }
    }

    /// Stops the engine threads after the copies queued so far.
    pub fn stop(&self) {
        drop(self.tx.lock().ok().and_then(|mut t| t.take()));
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }

    fn sender(self: &Arc<Self>) -> Option<Sender<Job>> {
        let mut tx = self.tx.lock().ok()?;
        if let Some(s) = tx.as_ref() {
            return Some(s.clone());
        }
        let (s, r) = crossbeam_channel::unbounded::<Job>();
        let mut threads = self.threads.lock().ok()?;
        for i in 0..MAX_CONCURRENT_COPIES {
            let r: Receiver<Job> = r.clone();
            let me = Arc::downgrade(self);
            let t = std::thread::Builder::new()
                .name(format!("tcmu-xcopy{i}"))
                .spawn(move || {
                    for job in r.iter() {
                        let Some(engine) = me.upgrade() else { break };
                        engine.run(job);
                    }
                })
                .ok()?;
            threads.push(t);
        }
        *tx = Some(s.clone());
        Some(s)
    }

    fn run(&self, job: Job) {
        let span = tracing::info_span!("dev", name = %job.local_name);
        let _g = span.enter();
        let t0 = Instant::now();
        let bytes = job.req.plan.bytes();
        let r = self.copy(&job.req, &job.local_name, &job.local);
        match &r {
            Ok(()) => debug!(
                bytes,
                ms = t0.elapsed().as_millis() as u64,
                "extended copy done"
            ),
            Err(e) => warn!(bytes, error = %e, "extended copy failed"),
        }
        job.done.complete(r);
    }

    /// Resolves the plan's CSCDs to backends, or says why not.
    fn resolve(
        &self,
        req: &CopyRequest,
        local_name: &str,
        local: &Arc<dyn Backend>,
    ) -> Result<Vec<Arc<dyn Backend>>, IoError> {
        let targets = self
            .targets
            .read()
            .map_err(|_| IoError::errno(libc::EIO, "copy targets lock poisoned"))?;
        let local_dir = targets.get(local_name).and_then(|t| t.configfs_dir.clone());
        let mut out = Vec::with_capacity(req.plan.cscds.len());
        for c in &req.plan.cscds {
            let backend = if c.naa == req.local {
                local.clone()
            } else {
                let found: Vec<(&String, &Target)> =
                    targets.iter().filter(|(_, t)| t.naa == c.naa).collect();
                let [(name, t)] = found[..] else {
                    warn!(
                        naa = %hex(&c.naa),
                        matches = found.len(),
                        "extended copy names no single LUN of this daemon"
                    );
                    return Err(IoError::Unsupported);
                };
                self.may_reach(local_name, local_dir.as_deref(), name, t)?;
                t.backend.clone()
            };
            if backend.geometry().block_size != c.block_len {
                warn!(
                    naa = %hex(&c.naa),
                    host = c.block_len,
                    lun = backend.geometry().block_size,
                    "extended copy assumes another block length"
                );
                return Err(IoError::Io {
                    errno: libc::EMEDIUMTYPE,
                    msg: "CSCD block length differs from the LUN's".into(),
                });
            }
            out.push(backend);
        }
        Ok(out)
    }

    /// Whether every initiator reaching the receiving LUN reaches `other`.
    fn may_reach(
        &self,
        local_name: &str,
        local_dir: Option<&std::path::Path>,
        other_name: &str,
        other: &Target,
    ) -> Result<(), IoError> {
        let refuse = |why: String| {
            warn!(other = %other_name, "extended copy refused: {why}");
            Err(IoError::Unsupported)
        };
        match (local_dir, other.configfs_dir.as_deref()) {
            // No kernel exports either (the emulator): nothing to compare.
            (None, None) => Ok(()),
            (Some(l), Some(o)) => {
                let lr = (self.reach)(l);
                let or = (self.reach)(o);
                match (lr, or) {
                    // The command came through some port: if the walk
                    // found none, it cannot vouch for anyone.
                    (Ok(lr), Ok(_)) if lr.is_empty() => {
                        refuse(format!("no export of {local_name} found in configfs"))
                    }
                    (Ok(lr), Ok(or)) => match reach_gap(&lr, &or) {
                        None => Ok(()),
                        Some((tpg, who)) => refuse(format!(
                            "{who} reaches {local_name} through {} but not {other_name}",
                            tpg.display()
                        )),
                    },
                    (Err(e), _) | (_, Err(e)) => refuse(format!("reading configfs: {e}")),
                }
            }
            _ => refuse("one LUN is served without configfs".into()),
        }
    }

    fn copy(&self, req: &CopyRequest, local_name: &str, local: &Arc<dyn Backend>) -> IoResult {
        let backends = self.resolve(req, local_name, local)?;
        let plan: &CopyPlan = &req.plan;
        // Ranges first: nothing is written unless every segment fits.
        for s in &plan.segments {
            for (idx, lba) in [(s.src, s.src_lba), (s.dst, s.dst_lba)] {
                let blocks = backends[idx].geometry().blocks();
                if !matches!(lba.checked_add(u64::from(s.blocks)), Some(end) if end <= blocks) {
                    return Err(IoError::OutOfRange);
                }
            }
        }
        // A piece is never larger than the largest segment: a small copy
        // does not take CHUNK-sized buffers.
        let largest = plan
            .segments
            .iter()
            .map(|s| u64::from(s.blocks) * u64::from(plan.cscds[s.src].block_len))
            .max()
            .unwrap_or(0);
        let mut mover = Mover {
            cq: CompletionQueue::new()
                .map_err(|e| IoError::errno(e.raw_os_error().unwrap_or(libc::EIO), "eventfd"))?,
            pool: Pool::new(largest.min(CHUNK as u64) as usize),
        };
        for s in &plan.segments {
            let src = &backends[s.src];
            let dst = &backends[s.dst];
            let bs = u64::from(plan.cscds[s.src].block_len);
            let len = u64::from(s.blocks) * bs;
            let (from, to) = (s.src_lba * bs, s.dst_lba * bs);
            let same = plan.cscds[s.src].naa == plan.cscds[s.dst].naa;
            let overlap = same && from < to + len && to < from + len;
            move_range(&mut mover, src, dst, from, to, len, overlap)?;
        }
        Ok(())
    }
}

impl Copier for Arc<CopyEngine> {
    fn start(&self, req: CopyRequest, local_name: &str, local: Arc<dyn Backend>, done: Done) {
        let job = Job {
            req,
            local_name: local_name.to_string(),
            local,
            done,
        };
        match self.sender() {
            Some(tx) => {
                if let Err(e) = tx.send(job) {
                    e.into_inner()
                        .done
                        .complete(Err(IoError::errno(libc::EIO, "copy engine stopped")));
                }
            }
            None => job
                .done
                .complete(Err(IoError::errno(libc::EAGAIN, "copy engine threads"))),
        }
    }
}

/// The first (port group, initiator) reaching the receiving LUN (`local`)
/// but not the other one, if any. `*` (every initiator: a port group
/// without ACLs, or with generated ones) covers any initiator of that
/// group; an initiator does not cover `*`.
pub fn reach_gap(local: &Reach, other: &Reach) -> Option<(PathBuf, String)> {
    local
        .iter()
        .find(|(tpg, who)| {
            !other.contains(&(tpg.clone(), who.clone()))
                && !other.contains(&(tpg.clone(), "*".to_string()))
        })
        .cloned()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What one copy moves its data with, from segment to segment.
struct Mover {
    /// Where its reads and writes complete.
    cq: CompletionQueue,
    /// Its buffers.
    pool: Pool,
}

/// The buffers one copy moves its pieces through: one per slot, made
/// the first time the slot is used, then used again for every later
/// piece of the copy.
struct Pool {
    bufs: Vec<Option<IoBufs>>,
    size: usize,
}

impl Pool {
    /// A pool of [`DEPTH`] buffers of `size` bytes (the largest piece).
    fn new(size: usize) -> Self {
        Pool {
            bufs: vec![None; DEPTH],
            size,
        }
    }

    /// The first `n` bytes of slot `slot`'s buffer. The caller uses it
    /// for one piece at a time: a slot is given a new piece only after
    /// the write of its last one completed.
    fn piece(&mut self, slot: usize, n: usize) -> IoBufs {
        let buf = match self.bufs[slot].take() {
            Some(b) if b.len() >= n => b,
            _ => IoBufs::from_vec(vec![0u8; n.max(self.size)]),
        };
        let piece = buf.slice(0, n).unwrap_or_else(|| buf.clone());
        self.bufs[slot] = Some(buf);
        piece
    }
}

/// Copies `len` bytes from `from` on `src` to `to` on `dst`, [`DEPTH`]
/// pieces in flight (one, backwards when needed, if the ranges overlap),
/// through `mover`'s buffers.
fn move_range(
    mover: &mut Mover,
    src: &Arc<dyn Backend>,
    dst: &Arc<dyn Backend>,
    from: u64,
    to: u64,
    len: u64,
    overlap: bool,
) -> IoResult {
    let Mover { cq, pool } = mover;
    let pieces = len.div_ceil(CHUNK as u64);
    let depth = if overlap { 1 } else { DEPTH };
    let backwards = overlap && to > from;
    // Piece k's offset within the range, in the order they are copied.
    let piece = |k: u64| {
        let i = if backwards { pieces - 1 - k } else { k };
        let off = i * CHUNK as u64;
        (off, (len - off).min(CHUNK as u64) as usize)
    };
    let mut slots: Vec<Option<(IoBufs, u64)>> = vec![None; depth];
    let mut next = 0u64;
    let mut in_flight = 0usize;
    let mut failed: Option<IoError> = None;
    // Tags: slot * 2 for its read, slot * 2 + 1 for its write.
    let mut issue = |slot: usize, slots: &mut Vec<Option<(IoBufs, u64)>>, k: u64| {
        let (off, n) = piece(k);
        let bufs = pool.piece(slot, n);
        slots[slot] = Some((bufs.clone(), off));
        src.submit(
            Op::Read {
                offset: from + off,
                bufs,
            },
            cq.done(slot as u64 * 2),
        );
    };
    for slot in 0..depth {
        if next < pieces {
            issue(slot, &mut slots, next);
            next += 1;
            in_flight += 1;
        }
    }
    while in_flight > 0 {
        let Some(c) = cq.recv_timeout(Duration::from_secs(60)) else {
            continue;
        };
        let slot = (c.tag / 2) as usize;
        let is_write = c.tag % 2 == 1;
        if let Err(e) = c.result {
            failed.get_or_insert(e);
        }
        if failed.is_some() {
            in_flight -= 1;
            continue;
        }
        if !is_write {
            if let Some((bufs, off)) = slots[slot].clone() {
                dst.submit(
                    Op::Write {
                        offset: to + off,
                        bufs,
                        fua: false,
                    },
                    cq.done(c.tag + 1),
                );
            }
            continue;
        }
        in_flight -= 1;
        if next < pieces {
            issue(slot, &mut slots, next);
            next += 1;
            in_flight += 1;
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcmu_handler::ram::RamBackend;
    use tcmu_handler::{Caps, Geometry};
    use tcmu_rbd_testkit::direct::{pattern, Direct};

    const MIB: u64 = 1 << 20;

    /// A ram disk that notes every buffer read into, and keeps it (so
    /// that no later buffer can be allocated at its address).
    struct Noting {
        ram: RamBackend,
        reads: Mutex<Vec<IoBufs>>,
    }

    impl Noting {
        fn new(size: u64) -> Arc<Self> {
            Arc::new(Noting {
                ram: RamBackend::new(size, 512).unwrap(),
                reads: Mutex::new(Vec::new()),
            })
        }

        /// The addresses of the buffers read into since the last call,
        /// in order.
        fn take(&self) -> Vec<usize> {
            let reads = std::mem::take(&mut *self.reads.lock().unwrap());
            reads
                .iter()
                .map(|b| b.iovecs()[0].iov_base as usize)
                .collect()
        }
    }

    impl Backend for Noting {
        fn name(&self) -> String {
            "noting".into()
        }
        fn geometry(&self) -> Geometry {
            self.ram.geometry()
        }
        fn caps(&self) -> Caps {
            self.ram.caps()
        }
        fn submit(&self, op: Op, done: Done) {
            if let Op::Read { bufs, .. } = &op {
                self.reads.lock().unwrap().push(bufs.clone());
            }
            self.ram.submit(op, done)
        }
    }

    fn mover(size: u64) -> Mover {
        Mover {
            cq: CompletionQueue::new().unwrap(),
            pool: Pool::new(size.min(CHUNK as u64) as usize),
        }
    }

    #[test]
    fn pieces_go_through_the_slots_buffers_and_nothing_else() {
        let a = Noting::new(32 * MIB);
        let b = Noting::new(32 * MIB);
        let (src, dst): (Arc<dyn Backend>, Arc<dyn Backend>) = (a.clone(), b.clone());
        // Many more pieces than slots, and a short last one.
        let len = 20 * MIB + 3 * 512;
        let data = pattern(5, len as usize);
        Direct::new(src.clone()).write(4096, &data).unwrap();
        let mut m = mover(len);
        move_range(&mut m, &src, &dst, 4096, 8192, len, false).unwrap();
        let reads = a.take();
        assert_eq!(reads.len(), 21);
        let used: BTreeSet<usize> = reads.into_iter().collect();
        assert!(used.len() <= DEPTH, "{} buffers for 21 pieces", used.len());
        assert!(Direct::new(dst.clone()).read(8192, len as usize).unwrap() == data);
        // The next segment of the same copy uses them again.
        b.take();
        move_range(&mut m, &dst, &src, 8192, 0, 4 * MIB, false).unwrap();
        let again: BTreeSet<usize> = b.take().into_iter().collect();
        assert!(again.is_subset(&used), "{again:?} not in {used:?}");
    }

    #[test]
    fn an_overlapping_copy_reads_before_it_overwrites_through_one_buffer() {
        let a = Noting::new(32 * MIB);
        let disk: Arc<dyn Backend> = a.clone();
        let len = 10 * MIB + 512;
        let data = pattern(9, len as usize);
        let mut io = Direct::new(disk.clone());
        // Forward by less than a piece, then back by more than one.
        for (from, to) in [(0, 300 * 512), (300 * 512 + 3 * MIB, 300 * 512)] {
            io.write(from, &data).unwrap();
            a.take();
            move_range(&mut mover(len), &disk, &disk, from, to, len, true).unwrap();
            let reads = a.take();
            assert_eq!(reads.len(), 11);
            // Depth one: one buffer.
            assert!(reads.iter().all(|&r| r == reads[0]), "{from} -> {to}");
            assert!(io.read(to, len as usize).unwrap() == data, "{from} -> {to}");
        }
    }

    fn r(v: &[(&str, &str)]) -> Reach {
        v.iter()
            .map(|(t, w)| (PathBuf::from(t), w.to_string()))
            .collect()
    }

    #[test]
    fn a_copy_may_reach_only_what_every_initiator_of_the_receiving_lun_reaches() {
        let both = r(&[("iscsi/t1/tpgt_1", "iqn.host-a")]);
        assert_eq!(reach_gap(&both, &both), None);
        // The other LUN is mapped to host A only; host B reaches the
        // receiving LUN: refused, naming host B.
        let local = r(&[
            ("iscsi/t1/tpgt_1", "iqn.host-a"),
            ("iscsi/t1/tpgt_1", "iqn.host-b"),
        ]);
        assert_eq!(
            reach_gap(&local, &both),
            Some((PathBuf::from("iscsi/t1/tpgt_1"), "iqn.host-b".into()))
        );
        // A port group open to every initiator covers each of them...
        let open = r(&[("iscsi/t1/tpgt_1", "*")]);
        assert_eq!(reach_gap(&local, &open), None);
        // ... but one initiator's mapping does not cover everyone.
        assert!(reach_gap(&open, &both).is_some());
        // Another port group is another way in.
        let elsewhere = r(&[("loopback/naa.1/tpgt_1", "*")]);
        assert!(reach_gap(&elsewhere, &open).is_some());
    }
}
