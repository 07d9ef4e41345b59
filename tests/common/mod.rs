//! Shared helpers for the integration tests: a LUN over a backend, driven
//! through the emulated kernel.
#![allow(dead_code)]

use rand::Rng;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tcmu_handler::ram::RamBackend;
use tcmu_handler::rbd::lock::{LockError, LockView, TakeOptions, Taken};
use tcmu_handler::{Backend, Caps, Done, Geometry, Op};
use tcmu_rbd::device::{Device, EventDoorbell};
use tcmu_rbd::failover::{Failover, FailoverOptions, LockSource};
use tcmu_rbd::scsi::alua::SharedAlua;
use tcmu_rbd::scsi::LunInfo;
#[allow(unused_imports)]
pub use tcmu_rbd_testkit::cdb::rw16;
use tcmu_rbd_testkit::emulator::{Data, KernelEmu, Layout};

/// LunInfo for a backend.
pub fn lun_info(b: &dyn Backend) -> LunInfo {
    LunInfo {
        vendor: "LIO-ORG".into(),
        product: "TCMU device".into(),
        revision: "0002".into(),
        serial: "test-serial".into(),
        geometry: b.geometry(),
        caps: b.caps(),
        max_transfer_blocks: 2048,
    }
}

/// An emulated kernel and a device serving `backend` over it.
pub fn emu_device(layout: Layout, backend: Arc<dyn Backend>) -> (KernelEmu, Device) {
    let emu = KernelEmu::with_layout(layout).expect("emulator");
    let ue = emu.user_end().expect("user end");
    let mem = ue.map().expect("map");
    let info = lun_info(&*backend);
    let dev = Device::new(
        "test",
        mem,
        Box::new(EventDoorbell::new(ue.to_user, ue.from_user)),
        backend,
        info,
    )
    .expect("device");
    (emu, dev)
}

/// An HA device named `name` (1 MiB of 512-byte blocks) served through
/// an emulated kernel, its backend behind the lock gate of a failover
/// manager over an [`IdleLock`] (ALUA off): the emulator, the device and
/// the manager, for `Registry::adopt_ha`. The device never gets the lock.
pub fn idle_ha_device(name: &str) -> (KernelEmu, Device, Failover) {
    let lock = Arc::new(IdleLock(RamBackend::new(1 << 20, 512).expect("ram")));
    let alua = SharedAlua::off();
    let fo = Failover::start(name, lock, &alua, FailoverOptions::default()).expect("failover");
    let (emu, dev) = emu_device(small_layout(), fo.backend());
    (emu, dev, fo)
}

/// A small layout that wraps the command ring often.
pub fn small_layout() -> Layout {
    Layout {
        // Not a multiple of the common entry sizes, so PADs are needed.
        cmdr_size: 16_200,
        data_size: 8 << 20,
        ..Layout::default()
    }
}

/// A backend that holds operations until the test releases them, in any
/// order, onto an inner backend: out-of-order completion on demand.
pub struct Held {
    pub inner: Arc<dyn Backend>,
    pub held: Mutex<Vec<(Op, Done)>>,
    /// Its `Backend::merge_limit` (0: the default, no merging).
    pub merge: usize,
}

impl Held {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Self::merging(inner, 0)
    }

    /// As `new`, but the worker may merge adjacent commands up to
    /// `limit` bytes into one held operation.
    pub fn merging(inner: Arc<dyn Backend>, limit: usize) -> Arc<Self> {
        Arc::new(Held {
            inner,
            held: Mutex::new(Vec::new()),
            merge: limit,
        })
    }

    /// Releases up to `n` held operations in random order.
    pub fn release_random(&self, rng: &mut impl Rng, n: usize) -> usize {
        let mut h = self.held.lock().unwrap();
        let mut k = 0;
        while k < n && !h.is_empty() {
            let i = rng.gen_range(0..h.len());
            let (op, done) = h.swap_remove(i);
            self.inner.submit(op, done);
            k += 1;
        }
        k
    }

    pub fn len(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Waits up to `secs` until `n` operations are held; panics if not.
    pub fn wait_len(&self, n: usize, secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while self.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "commands never reached the backend"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Backend for Held {
    fn name(&self) -> String {
        format!("held:{}", self.inner.name())
    }
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn merge_limit(&self) -> usize {
        self.merge
    }
    fn submit(&self, op: Op, done: Done) {
        self.held.lock().unwrap().push((op, done));
    }
}

/// A lock nobody holds and this gateway never gets, over a ram disk:
/// enough for a failover manager (its device stays Standby).
pub struct IdleLock(pub RamBackend);

impl Backend for IdleLock {
    fn name(&self) -> String {
        "idle-lock".into()
    }
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn caps(&self) -> Caps {
        self.0.caps()
    }
    fn submit(&self, op: Op, done: Done) {
        self.0.submit(op, done)
    }
}

impl LockSource for IdleLock {
    fn generation(&self) -> u64 {
        1
    }
    fn is_fenced(&self) -> bool {
        false
    }
    fn lock_held(&self) -> Result<bool, LockError> {
        Ok(false)
    }
    fn lock_view(&self) -> Result<LockView, LockError> {
        Ok(LockView::Free)
    }
    fn take_lock(&self, _opts: &TakeOptions) -> Result<Taken, LockError> {
        Err(LockError::Fenced {
            image: "idle".into(),
        })
    }
    fn release_lock(&self) -> Result<(), LockError> {
        Ok(())
    }
    fn fence_and_reopen(&self, _generation: u64) {}
    fn submit_on(&self, _generation: u64, op: Op, done: Done) {
        self.0.submit(op, done)
    }
}

/// Runs one command to completion: (status, sense key, data). A unit
/// attention (the resize announces itself) is consumed and retried.
pub fn run_cmd(emu: &mut KernelEmu, cdb: &[u8], data: Data<'_>) -> (u8, Option<u8>, Vec<u8>) {
    for _ in 0..2 {
        let d = match &data {
            Data::None => Data::None,
            Data::ToDevice(b) => Data::ToDevice(b),
            Data::FromDevice(n) => Data::FromDevice(*n),
        };
        emu.submit(cdb, d).expect("submit");
        let mut got = None;
        let end = Instant::now() + Duration::from_secs(10);
        while got.is_none() {
            assert!(Instant::now() < end, "command never completed");
            emu.reap(|r, bytes| {
                got = Some((
                    r.status,
                    r.sense.as_ref().map(|s| s[2] & 0xf),
                    bytes.to_vec(),
                ))
            })
            .expect("reap");
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = got.unwrap();
        if got.1 == Some(0x6) {
            continue;
        }
        return got;
    }
    panic!("unit attention on every try");
}
