//! Helpers for the SCSI tests: a LUN over a ram backend, every backend
//! operation recorded, commands run to completion synchronously.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use tcmu_handler::ram::RamBackend;
use tcmu_handler::{Backend, Caps, CompletionQueue, Done, Geometry, IoBufs, Op};
use tcmu_rbd::scsi::{Lun, LunInfo, Outcome, Response};
#[allow(unused_imports)]
pub use tcmu_rbd_testkit::cdb::rw10;
#[allow(unused_imports)]
pub use tcmu_rbd_testkit::cdb::rw16;

/// What the backend was asked to do, without the buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    Read {
        off: u64,
        len: u64,
    },
    Write {
        off: u64,
        len: u64,
        fua: bool,
    },
    Flush,
    Discard(Vec<(u64, u64)>),
    WriteZeroes {
        off: u64,
        len: u64,
        unmap: bool,
    },
    WriteSame {
        off: u64,
        len: u64,
        pattern: Vec<u8>,
    },
    Caw {
        off: u64,
        len: u64,
    },
    Provisioning {
        off: u64,
        len: u64,
    },
}

/// A ram backend that records each operation and can report other caps.
pub struct Recorder {
    pub ram: RamBackend,
    pub caps: Caps,
    pub ops: Mutex<Vec<Rec>>,
    /// What an allocation query reports allocated (byte ranges, sorted).
    pub allocated: Mutex<Vec<(u64, u64)>>,
}

impl Backend for Recorder {
    fn name(&self) -> String {
        "recorder".into()
    }
    fn geometry(&self) -> Geometry {
        self.ram.geometry()
    }
    fn caps(&self) -> Caps {
        self.caps
    }
    fn submit(&self, op: Op, done: Done) {
        let r = match &op {
            Op::Read { offset, bufs } => Rec::Read {
                off: *offset,
                len: bufs.len() as u64,
            },
            Op::Write { offset, bufs, fua } => Rec::Write {
                off: *offset,
                len: bufs.len() as u64,
                fua: *fua,
            },
            Op::Flush => Rec::Flush,
            Op::Discard { ranges } => Rec::Discard(ranges.clone()),
            Op::WriteZeroes { offset, len, unmap } => Rec::WriteZeroes {
                off: *offset,
                len: *len,
                unmap: *unmap,
            },
            Op::WriteSame {
                offset,
                len,
                pattern,
            } => Rec::WriteSame {
                off: *offset,
                len: *len,
                pattern: pattern.to_vec(),
            },
            Op::CompareAndWrite { offset, write, .. } => Rec::Caw {
                off: *offset,
                len: write.len() as u64,
            },
            Op::Provisioning { offset, len, out } => {
                // Scripted: the configured ranges, clipped to the query.
                let end = offset + len;
                *out.lock().unwrap() = self
                    .allocated
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|&(o, l)| (o.max(*offset), (o + l).min(end)))
                    .filter(|(s, e)| s < e)
                    .map(|(s, e)| (s, e - s))
                    .collect();
                self.ops.lock().unwrap().push(Rec::Provisioning {
                    off: *offset,
                    len: *len,
                });
                return done.complete(Ok(()));
            }
        };
        self.ops.lock().unwrap().push(r);
        self.ram.submit(op, done);
    }
}

pub const BS: u64 = 512;

/// A test LUN: `blocks` blocks of 512 bytes.
pub struct T {
    pub lun: Lun,
    pub be: Arc<Recorder>,
    cq: CompletionQueue,
}

pub fn caps_all() -> Caps {
    Caps {
        discard: true,
        discard_zeroes: true,
        write_cache: true,
        lba_status: true,
    }
}

pub fn info(be: &dyn Backend, serial: &str) -> LunInfo {
    LunInfo {
        vendor: "LIO-ORG".into(),
        product: "TCMU device".into(),
        revision: "0002".into(),
        serial: serial.into(),
        geometry: be.geometry(),
        caps: be.caps(),
        max_transfer_blocks: 64,
    }
}

impl T {
    pub fn new(blocks: u64) -> T {
        Self::with_caps(blocks, caps_all())
    }

    /// With ALUA on (one Active/Optimized group, implicit and explicit),
    /// so that RTPG and STPG are served too.
    pub fn with_alua_explicit(blocks: u64) -> T {
        use tcmu_rbd::scsi::alua::{AccessState, AluaConfig, GroupConfig, LocalPort, SharedAlua};
        let mut t = Self::new(blocks);
        t.lun.set_alua(Arc::new(SharedAlua::new(AluaConfig {
            groups: vec![GroupConfig::new(
                1,
                AccessState::ActiveOptimized,
                vec![(1, true)],
            )],
            local: LocalPort {
                group: 1,
                rel_port: 1,
            },
        })));
        t
    }

    pub fn with_caps(blocks: u64, caps: Caps) -> T {
        let be = Arc::new(Recorder {
            ram: RamBackend::new(blocks * BS, BS as u32).expect("ram"),
            caps,
            ops: Mutex::new(Vec::new()),
            allocated: Mutex::new(Vec::new()),
        });
        let lun = Lun::new(info(&*be, "5a1e0f00-cafe-4bee-8000-0123456789ab"));
        T {
            lun,
            be,
            cq: CompletionQueue::new().expect("cq"),
        }
    }

    /// Runs `cdb` with a data buffer of `buf` (data-out contents, or
    /// zeros of the data-in size); returns the response and the buffer
    /// afterwards, cut to `read_len` when set.
    pub fn run(&mut self, cdb: &[u8], buf: Vec<u8>) -> (Response, Vec<u8>) {
        let bufs = IoBufs::from_vec(buf);
        let mut out = self.lun.execute(cdb, &bufs);
        let r = loop {
            match out {
                Outcome::Done(r) => break r,
                Outcome::Submit(op, p) => {
                    self.be.submit(op, self.cq.done(7));
                    let c = self.cq.try_recv().expect("ram completes inline");
                    out = self.lun.finish(p, c.result);
                }
                // No copy engine here (tests/scsi_xcopy.rs runs copies
                // through a registry): answered as the device does
                // without one.
                Outcome::Copy(..) => {
                    break Response::check(tcmu_rbd::scsi::sense::COPY_TARGET_NOT_REACHABLE)
                }
            }
        };
        let mut data = bufs.to_vec();
        if let Some(n) = r.read_len {
            data.truncate(n as usize);
        }
        (r, data)
    }

    /// Data-in command with a buffer of `len` bytes.
    pub fn din(&mut self, cdb: &[u8], len: usize) -> (Response, Vec<u8>) {
        self.run(cdb, vec![0u8; len])
    }

    /// Data-in command expected GOOD; returns the data.
    pub fn good_in(&mut self, cdb: &[u8], len: usize) -> Vec<u8> {
        let (r, d) = self.din(cdb, len);
        assert_eq!(r.status, 0, "{cdb:02x?}: {r:?}");
        d
    }

    /// Command without data (or data-out) expected GOOD.
    pub fn good(&mut self, cdb: &[u8], out: &[u8]) {
        let (r, _) = self.run(cdb, out.to_vec());
        assert_eq!(r, Response::good(), "{cdb:02x?}");
    }

    /// The fixed sense bytes of a command expected to CHECK CONDITION.
    pub fn sense(&mut self, cdb: &[u8], buf: Vec<u8>) -> [u8; 18] {
        let (r, _) = self.run(cdb, buf);
        assert_eq!(r.status, 2, "{cdb:02x?} should fail: {r:?}");
        r.sense.expect("sense").to_fixed()
    }

    /// Backend operations so far (and forgets them).
    pub fn ops(&self) -> Vec<Rec> {
        std::mem::take(&mut *self.be.ops.lock().unwrap())
    }

    /// Reads `blocks` at `lba` through READ(16).
    pub fn read(&mut self, lba: u64, blocks: u32) -> Vec<u8> {
        let d = self.good_in(&rw16(false, lba, blocks), (u64::from(blocks) * BS) as usize);
        self.ops();
        d
    }

    /// Writes `data` at `lba` through WRITE(16).
    pub fn write(&mut self, lba: u64, data: &[u8]) {
        self.good(&rw16(true, lba, (data.len() as u64 / BS) as u32), data);
        self.ops();
    }
}

/// Asserts key/ASC/ASCQ of fixed sense bytes.
pub fn assert_sense(s: &[u8; 18], key: u8, asc: u8, ascq: u8) {
    assert_eq!(s[0] & 0x7f, 0x70, "fixed format, current: {s:02x?}");
    assert_eq!((s[2] & 0x0f, s[12], s[13]), (key, asc, ascq), "{s:02x?}");
}

/// Asserts INVALID FIELD IN CDB (or PARAMETER LIST when `!cdb`) with the
/// field pointer at `byte` (and `bit`).
pub fn assert_field(s: &[u8; 18], cdb: bool, byte: u16, bit: Option<u8>) {
    assert_sense(s, 5, if cdb { 0x24 } else { 0x26 }, 0);
    let mut b15 = 0x80 | if cdb { 0x40 } else { 0 };
    if let Some(bit) = bit {
        b15 |= 0x08 | bit;
    }
    assert_eq!(s[15], b15, "SKSV/C-D/BPV/bit pointer: {s:02x?}");
    assert_eq!(
        u16::from_be_bytes([s[16], s[17]]),
        byte,
        "field pointer: {s:02x?}"
    );
}
