//! The devices this daemon serves: opening a TCMU device (map its ring,
//! reset it through configfs, open its backend, start its worker),
//! resizing, and closing.

use crate::backends;
use crate::configfs;
use crate::device::{Device, IdlePoll, Stats, Stopper, UioDoorbell, WorkerOptions};
use crate::ring::shm::SharedMem;
use crate::ring_threads::{RingThreads, Served};
use crate::scsi::LunInfo;
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tcmu_handler::Backend;
use tracing::{debug, error, info, warn};

/// Everything needed to open one TCMU device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The backstore's name in configfs (`disk0`).
    pub name: String,
    /// `/dev/uioN`.
    pub uio_path: PathBuf,
    /// Length of map0.
    pub map_size: usize,
    /// Handler subtype (`rbd`, `file`, `ram`).
    pub subtype: String,
    /// The config string after the subtype.
    pub cfgstring: String,
    /// The device's configfs directory
    /// (`/sys/kernel/config/target/core/user_<hba>/<name>`), if mounted.
    pub configfs_dir: Option<PathBuf>,
    /// Device size in bytes, when known from netlink; else read from
    /// configfs.
    pub size: Option<u64>,
}

/// Why an online resize left the capacity as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// No such device is served.
    #[error("{0}: not served")]
    NotServed(String),
    /// The device's worker did not run the resize.
    #[error("{0}: worker did not answer")]
    WorkerGone(String),
    /// The backend cannot serve the new size.
    #[error("{dev}: backend cannot serve {size} bytes; capacity stays {capacity}")]
    Refused {
        /// Device.
        dev: String,
        /// The size asked for.
        size: u64,
        /// The capacity served.
        capacity: u64,
    },
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenDeviceError {
    /// A file could not be opened, read or mapped.
    #[error("{name}: {what} {path}: {source}")]
    Io {
        /// Device.
        name: String,
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The device's configuration is unusable.
    #[error("{name}: {msg}")]
    Config {
        /// Device.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The backend refused.
    #[error("{name}: {source}")]
    Backend {
        /// Device.
        name: String,
        /// Why.
        source: backends::OpenError,
    },
    /// The ring was refused.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}

/// What [`reset_ring`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingReset {
    /// Blocked, reset (commands left behind failed BUSY), unblocked.
    Done,
    /// The kernel refused `block_dev` with EINVAL: the device is still
    /// being added (the kernel is waiting for our netlink reply), so its
    /// ring is fresh and there is nothing to reset.
    NotConfigured,
    /// The reset failed; the device was unblocked again where it had been
    /// blocked.
    Failed,
}

/// Resets a device's ring through configfs: `block_dev` 1, `reset_ring` 1
/// (in-flight commands fail BUSY; the initiator retries), `block_dev` 0.
/// Once blocked, the device is always unblocked again, or it would queue
/// every command until cmd_time_out.
pub fn reset_ring(dir: &Path, name: &str) -> RingReset {
    match configfs::action(dir, "block_dev", "1") {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            debug!(dev = %name, "device not configured yet (being added): fresh ring, no reset");
            return RingReset::NotConfigured;
        }
        Err(e) => {
            warn!(dev = %name, error = %e, "could not block the device to reset its ring");
            return RingReset::Failed;
        }
    }
    let reset = configfs::action(dir, "reset_ring", "1");
    let unblock = configfs::action(dir, "block_dev", "0");
    if let Err(e) = &unblock {
        error!(dev = %name, error = %e, "could not unblock the device after a ring reset");
    }
    match reset {
        Err(e) => {
            warn!(dev = %name, error = %e, "could not reset the ring through configfs");
            RingReset::Failed
        }
        Ok(()) if unblock.is_err() => RingReset::Failed,
        Ok(()) => RingReset::Done,
    }
}

struct Running {
    stopper: Stopper,
    stats: Arc<Stats>,
    /// The device on its ring thread.
    served: Served,
    spec: DeviceSpec,
    /// Size the LUN reports now.
    size: u64,
    /// HA failover on the rbd exclusive lock (rbd devices with ALUA groups).
    failover: Option<crate::failover::Failover>,
}

/// The set of devices being served.
#[derive(Default)]
pub struct Registry {
    devices: Mutex<HashMap<String, Running>>,
    /// Devices being opened (outside the `devices` lock: an rbd open is
    /// cluster round trips, up to the mount timeout). Locked after
    /// `devices`, never before.
    opening: Mutex<std::collections::HashSet<String>>,
    /// Signalled when an open ends (a removal of it waits for that).
    opened: std::sync::Condvar,
    /// tcmu.conf's `idle_poll_us`, followed by every device opened here.
    idle_poll: IdlePoll,
    /// Failover managers of removed devices, stopping in the background
    /// (see [`Registry::remove`]); joined by [`Registry::stop_all`].
    retiring: Mutex<Vec<JoinHandle<()>>>,
    /// tcmu.conf's `ha_pr = keep`: leave the kernel's PR emulation on for
    /// lock-gated rbd devices (by default it is turned off, see
    /// [`crate::configfs::set_pr_emulation`]).
    keep_ha_pr: std::sync::atomic::AtomicBool,
    /// Runs EXTENDED COPY between the devices served here.
    copy: Arc<crate::copy::CopyEngine>,
    /// The threads that drive the devices' rings.
    rings: RingThreads,
}

/// A device's state for status output.
#[derive(Debug, Clone)]
pub struct DeviceStatus {
    /// Name.
    pub name: String,
    /// Subtype/cfgstring.
    pub config: String,
    /// Commands taken from the ring.
    pub commands: u64,
    /// Commands completed.
    pub completed: u64,
    /// CHECK CONDITIONs sent.
    pub check_conditions: u64,
    /// HA gateways: ALUA state and exclusive-lock owner
    /// ([`crate::failover::FailoverStatus`]); None without ALUA groups.
    pub alua: Option<String>,
    /// Command latencies so far (for rates over an interval).
    pub latency: crate::metrics::hist::HistSnapshot,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how long every device's worker polls its ring before sleeping
    /// (tcmu.conf `idle_poll_us`); running devices take it at their next
    /// idle moment.
    pub fn set_idle_poll(&self, d: std::time::Duration) {
        self.idle_poll.set(d);
    }

    /// Whether devices opened from now on that are gated on an rbd
    /// exclusive lock keep the kernel's persistent reservations
    /// (tcmu.conf `ha_pr = keep`) or refuse them (`refuse`, the default).
    pub fn set_keep_ha_pr(&self, keep: bool) {
        self.keep_ha_pr
            .store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    /// Opens `spec` and starts serving it. A device already served (or
    /// being opened) under that name is left alone.
    ///
    /// The open runs outside the registry's lock: after a restart several
    /// threads open devices at once, and status, metrics and removals of
    /// other devices go on while an image takes its time to open.
    pub fn add(&self, spec: DeviceSpec) -> Result<(), OpenDeviceError> {
        let poisoned = |name: &str| OpenDeviceError::Config {
            name: name.to_string(),
            msg: "registry lock poisoned".into(),
        };
        {
            let devs = self.devices.lock().map_err(|_| poisoned(&spec.name))?;
            let mut opening = self.opening.lock().map_err(|_| poisoned(&spec.name))?;
            if devs.contains_key(&spec.name) || opening.contains(&spec.name) {
                info!(dev = %spec.name, "already served");
                return Ok(());
            }
            opening.insert(spec.name.clone());
        }
        let keep_pr = self.keep_ha_pr.load(std::sync::atomic::Ordering::Relaxed);
        let opened = open_device(&spec, &self.idle_poll, keep_pr, &self.copy, &self.rings);
        let mut devs = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let r = opened.map(|running| {
            devs.insert(spec.name.clone(), running);
        });
        self.opening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&spec.name);
        self.opened.notify_all();
        r
    }

    /// Serves a device built elsewhere (the emulator, in tests) as if it
    /// had been opened from `spec`; `spec.size` must be its size.
    pub fn adopt(&self, spec: DeviceSpec, dev: Device) -> Result<(), OpenDeviceError> {
        self.adopt_with(spec, dev, None)
    }

    /// As [`adopt`](Self::adopt), for a device served behind the
    /// exclusive-lock gate of `failover` (tests of HA devices without a
    /// kernel).
    pub fn adopt_ha(
        &self,
        spec: DeviceSpec,
        dev: Device,
        failover: crate::failover::Failover,
    ) -> Result<(), OpenDeviceError> {
        self.adopt_with(spec, dev, Some(failover))
    }

    fn adopt_with(
        &self,
        spec: DeviceSpec,
        dev: Device,
        failover: Option<crate::failover::Failover>,
    ) -> Result<(), OpenDeviceError> {
        let size = spec.size.ok_or_else(|| OpenDeviceError::Config {
            name: spec.name.clone(),
            msg: "adopt needs the device size".into(),
        })?;
        let mut running = start_worker(&spec, dev, size, &self.copy, &self.rings)?;
        running.failover = failover;
        match self.devices.lock() {
            Ok(mut devs) => {
                devs.insert(spec.name.clone(), running);
                Ok(())
            }
            Err(_) => Err(OpenDeviceError::Config {
                name: spec.name,
                msg: "registry lock poisoned".into(),
            }),
        }
    }

    /// Stops serving `name`: in-flight commands are drained first.
    pub fn remove(&self, name: &str) -> bool {
        loop {
            let Ok(mut devs) = self.devices.lock() else {
                return false;
            };
            if let Some(r) = devs.remove(name) {
                drop(devs);
                self.retire(name, r);
                return true;
            }
            let opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
            if !opening.contains(name) {
                return false;
            }
            // Being opened: wait for the open to end (the kernel must not
            // tear the device down under a half-made mapping), then remove
            // whatever it left.
            drop(devs);
            info!(dev = %name, "removal waits for the device's open to end");
            let _g = self
                .opened
                .wait_while(opening, |o| o.contains(name))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops a device taken out of the registry: drains its ring, closes
    /// it, and stops its failover manager in the background.
    fn retire(&self, name: &str, mut r: Running) {
        self.copy.unregister(name);
        r.stopper.stop();
        match r.served.wait() {
            // Dropped here: closing the backend can take a while.
            Some(dev) => drop(dev),
            None => error!(dev = %name, "the device's ring thread is gone"),
        }
        // The kernel's rmdir holds the device's configfs directory
        // until the daemon answers the REMOVED event, and the
        // failover thread may be inside a read of that directory
        // (it follows the ALUA groups): stopping it here would
        // wait for the answer it blocks. It stops in the
        // background (releasing the lock if held; the worker has
        // drained every command already).
        if let Some(f) = r.failover.take() {
            let dev = name.to_string();
            match std::thread::Builder::new()
                .name("tcmu-retire".into())
                .spawn(move || drop(f))
            {
                Ok(h) => {
                    let mut g = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
                    g.retain(|h| !h.is_finished());
                    g.push(h);
                }
                Err(e) => {
                    error!(dev = %dev, "cannot stop the failover manager in the background: {e}")
                }
            }
        }
        info!(dev = %name, "removed");
    }

    /// Applies a new size (online resize): the LUN reports the new
    /// capacity and raises CAPACITY DATA HAS CHANGED. Waits for the
    /// worker; an error says why the capacity is unchanged.
    pub fn resize(&self, name: &str, size: u64) -> Result<(), ResizeError> {
        let Some(cur) = self.spec(name).and_then(|s| s.size) else {
            return Err(ResizeError::NotServed(name.to_string()));
        };
        if cur == size {
            return Ok(());
        }
        // The backend is resized here, not on the ring thread, which
        // serves other devices too.
        let backend = self
            .run_on_worker(name, |d: &mut Device| d.backend())
            .ok_or_else(|| ResizeError::WorkerGone(name.to_string()))?;
        if let Err(e) = backend.resize(size) {
            error!(dev = %name, old = cur, new = size, error = %e, "backend cannot resize; capacity unchanged");
            return Err(ResizeError::Refused {
                dev: name.to_string(),
                size,
                capacity: cur,
            });
        }
        self.run_on_worker(name, move |d: &mut Device| d.set_capacity(size))
            .ok_or_else(|| ResizeError::WorkerGone(name.to_string()))?;
        if let Ok(mut devs) = self.devices.lock() {
            if let Some(r) = devs.get_mut(name) {
                r.size = size;
            }
        }
        Ok(())
    }

    /// Runs `f` on `name`'s ring thread, between two of its steps,
    /// and waits for the result (reopen, write cache, resize). `None` if
    /// no such device, or its worker is gone or did not answer within
    /// the drain timeout.
    pub fn run_on_worker<R: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Device) -> R + Send + 'static,
    ) -> Option<R> {
        let stopper = self.devices.lock().ok()?.get(name)?.stopper.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let sent = stopper.control(Box::new(move |d: &mut Device| {
            let _ = tx.send(f(d));
        }));
        if !sent {
            return None;
        }
        rx.recv_timeout(WorkerOptions::default().drain_timeout).ok()
    }

    /// The spec `name` is served with; `size` is the LUN's current size.
    pub fn spec(&self, name: &str) -> Option<DeviceSpec> {
        let devs = self.devices.lock().ok()?;
        let r = devs.get(name)?;
        let mut s = r.spec.clone();
        s.size = Some(r.size);
        Some(s)
    }

    /// Whether `name` is served behind an rbd exclusive-lock gate (an HA
    /// device with a failover manager).
    pub fn is_ha(&self, name: &str) -> bool {
        self.devices
            .lock()
            .ok()
            .and_then(|d| d.get(name).map(|r| r.failover.is_some()))
            .unwrap_or(false)
    }

    /// Records `name`'s config string after a reopen.
    pub fn set_cfgstring(&self, name: &str, cfgstring: &str) {
        if let Ok(mut devs) = self.devices.lock() {
            if let Some(r) = devs.get_mut(name) {
                r.spec.cfgstring = cfgstring.to_string();
            }
        }
    }

    /// For devices with a configfs directory, applies a `dev_size` changed
    /// there (the kernel updates it before telling anyone), so online
    /// resize works even without the netlink channel.
    pub fn poll_resizes(&self) {
        // Listed under the lock, read outside it: configfs reads of
        // hundreds of devices must not hold up status or removals.
        let devices: Vec<(String, PathBuf, u64)> = match self.devices.lock() {
            Ok(devs) => devs
                .values()
                .filter_map(|r| {
                    let dir = r.spec.configfs_dir.clone()?;
                    Some((r.spec.name.clone(), dir, r.size))
                })
                .collect(),
            Err(_) => return,
        };
        for (n, dir, cur) in devices {
            let Some(size) = configfs::read_configfs(&dir).size else {
                continue;
            };
            if size == cur || size == 0 {
                continue;
            }
            if let Err(e) = self.resize(&n, size) {
                warn!(dev = %n, error = %e, "resize refused");
            }
        }
    }

    /// Names of the devices served.
    pub fn names(&self) -> Vec<String> {
        self.devices
            .lock()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Status of every device.
    pub fn status(&self) -> Vec<DeviceStatus> {
        use std::sync::atomic::Ordering::Relaxed;
        let Ok(devs) = self.devices.lock() else {
            return Vec::new();
        };
        devs.values()
            .map(|r| DeviceStatus {
                name: r.spec.name.clone(),
                config: format!("{}/{}", r.spec.subtype, r.spec.cfgstring),
                commands: r.stats.commands.load(Relaxed),
                completed: r.stats.completed.load(Relaxed),
                check_conditions: r.stats.check_conditions.load(Relaxed),
                alua: r.failover.as_ref().map(|f| f.status().to_string()),
                latency: r.stats.latency.snapshot(),
            })
            .collect()
    }

    /// What the metrics endpoint shows of every device (see
    /// [`crate::metrics`]): its counters, and the failover state of HA
    /// devices.
    pub fn metrics(&self) -> Vec<crate::metrics::DeviceMetrics> {
        let Ok(devs) = self.devices.lock() else {
            return Vec::new();
        };
        let mut v: Vec<_> = devs
            .values()
            .map(|r| {
                let rbd = (r.spec.subtype == "rbd")
                    .then(|| tcmu_handler::rbd::config::parse(&r.spec.cfgstring).ok())
                    .flatten();
                crate::metrics::DeviceMetrics {
                    name: r.spec.name.clone(),
                    subtype: r.spec.subtype.clone(),
                    pool: rbd.as_ref().map(|c| c.pool.clone()),
                    image: rbd.map(|c| match c.namespace {
                        Some(ns) => format!("{ns}/{}", c.image),
                        None => c.image,
                    }),
                    stats: r.stats.clone(),
                    failover: r.failover.as_ref().map(|f| f.status()),
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Stops every device (SIGTERM).
    pub fn stop_all(&self) {
        for n in self.names() {
            self.remove(&n);
        }
        let retiring =
            std::mem::take(&mut *self.retiring.lock().unwrap_or_else(|e| e.into_inner()));
        for h in retiring {
            let _ = h.join();
        }
        self.copy.stop();
    }
}

/// Persistent reservations on a device gated on an rbd exclusive lock.
/// The kernel emulates them in each gateway separately (TCMU entries carry
/// no I_T nexus, so no handler can): after an ALUA failover the new
/// gateway knows none of the old one's, and a cluster that fences with PR
/// would lose its fence without a word. So they are refused (the kernel's
/// emulation off: PERSISTENT RESERVE IN/OUT and RESERVE/RELEASE end with
/// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE) unless tcmu.conf says
/// `ha_pr = keep`.
fn ha_pr(name: &str, dir: &Path, keep: bool) {
    if keep {
        warn!(
            dev = %name,
            "persistent reservations kept on an HA device (ha_pr = keep): each gateway's kernel \
             keeps its own; a failover loses them"
        );
        return;
    }
    match configfs::set_pr_emulation(dir, false) {
        Ok(()) => info!(
            dev = %name,
            "persistent reservations refused on this HA device: gateways cannot share them \
             (tcmu.conf ha_pr = keep to allow them)"
        ),
        Err(e) => warn!(
            dev = %name,
            error = %e,
            "cannot turn off the kernel's PR emulation (the LUN is already exported?): \
             persistent reservations stay on, and are not shared between gateways"
        ),
    }
}

fn open_device(
    spec: &DeviceSpec,
    idle_poll: &IdlePoll,
    keep_ha_pr: bool,
    copy: &Arc<crate::copy::CopyEngine>,
    rings: &RingThreads,
) -> Result<Running, OpenDeviceError> {
    let name = spec.name.clone();
    let io = |what: &'static str, path: &Path| {
        let name = name.clone();
        let path = path.to_owned();
        move |source| OpenDeviceError::Io {
            name,
            what,
            path,
            source,
        }
    };
    let attrs = spec
        .configfs_dir
        .as_deref()
        .map(configfs::read_configfs)
        .unwrap_or_default();
    let size = spec
        .size
        .or(attrs.size)
        .ok_or_else(|| OpenDeviceError::Config {
            name: name.clone(),
            msg: "device size unknown (no dev_size in netlink or configfs)".into(),
        })?;
    let block_size = attrs.block_size.unwrap_or(512);
    let backend_err = |source| OpenDeviceError::Backend {
        name: name.clone(),
        source,
    };
    // Every rbd device (with the exclusive-lock feature) is gated on the
    // image's lock; its ALUA groups come from configfs, now or when they
    // are created (ceph-iscsi creates them after enabling the backstore).
    let (backend, ha) = if spec.subtype == "rbd" {
        use crate::scsi::alua::SharedAlua;
        let alua = match &spec.configfs_dir {
            Some(dir) => {
                let a = match configfs::alua_config(dir).map_err(|e| OpenDeviceError::Config {
                    name: name.clone(),
                    msg: format!("ALUA groups: {e}"),
                })? {
                    Some(cfg) => SharedAlua::new(cfg),
                    None => SharedAlua::off(),
                };
                // Fabrics link the LUN after the device opens: RTPG and
                // VPD 0x83 re-read the member ports, and the groups.
                a.follow(configfs::ConfigfsGroups::new(dir));
                a
            }
            None => SharedAlua::off(),
        };
        match crate::failover::open_rbd(
            &name,
            &spec.cfgstring,
            size,
            block_size,
            alua,
            crate::failover::FailoverOptions::default(),
        )
        .map_err(backend_err)?
        {
            crate::failover::RbdDevice::Ha(ha) => {
                if let Some(dir) = &spec.configfs_dir {
                    ha_pr(&name, dir, keep_ha_pr);
                }
                (ha.backend.clone(), Some(ha))
            }
            crate::failover::RbdDevice::Plain(b) => (b, None),
        }
    } else {
        (
            backends::open(&spec.subtype, &spec.cfgstring, size, block_size)
                .map_err(backend_err)?,
            None,
        )
    };

    // Commands a previous process left in the ring may have had their
    // completions half-recorded: fail them back (BUSY, the initiator
    // retries) and start from an empty ring.
    if let Some(dir) = &spec.configfs_dir {
        reset_ring(dir, &name);
    }

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&spec.uio_path)
        .map_err(io("open", &spec.uio_path))?;
    let map = memmap2::MmapOptions::new()
        .len(spec.map_size)
        .map_raw(&file)
        .map_err(io("mmap", &spec.uio_path))?;
    let mem = Arc::new(SharedMem::from_mmap(map));
    let info = lun_info(spec, &attrs, &*backend, mem.len());
    let mut dev = Device::new(
        name.clone(),
        mem,
        Box::new(UioDoorbell::new(file)),
        backend,
        info,
    )?;
    dev.set_options(WorkerOptions {
        idle_poll: idle_poll.clone(),
        ..WorkerOptions::default()
    });
    let failover = ha.map(|ha| {
        dev.lun_mut().set_alua(ha.alua);
        ha.failover
    });
    info!(dev = %name, subtype = %spec.subtype, cfg = %spec.cfgstring, size, block_size, "device opened");
    let mut running = start_worker(spec, dev, size, copy, rings)?;
    running.failover = failover;
    Ok(running)
}

/// Serves `dev` on one of the daemon's ring threads.
fn start_worker(
    spec: &DeviceSpec,
    mut dev: Device,
    size: u64,
    copy: &Arc<crate::copy::CopyEngine>,
    rings: &RingThreads,
) -> Result<Running, OpenDeviceError> {
    // The device can be named in EXTENDED COPY commands (its own and its
    // neighbours') from now on.
    copy.register(
        &spec.name,
        crate::copy::Target {
            naa: crate::scsi::inquiry::naa_designator(&dev.lun_mut().info().serial),
            backend: dev.backend(),
            configfs_dir: spec.configfs_dir.clone(),
        },
    );
    dev.set_copier(Arc::new(copy.clone()));
    let stopper = dev.stopper();
    let stats = dev.stats();
    let served = rings.serve(dev).map_err(|source| {
        copy.unregister(&spec.name);
        OpenDeviceError::Io {
            name: spec.name.clone(),
            what: "start serving",
            path: spec.uio_path.clone(),
            source,
        }
    })?;
    Ok(Running {
        stopper,
        stats,
        served,
        spec: spec.clone(),
        size,
        failover: None,
    })
}

/// The LUN identity for a device: the serial LIO assigned (the same on
/// every gateway when the admin set the wwn), else one derived from the
/// config string, so that it is stable across restarts.
pub fn lun_info(
    spec: &DeviceSpec,
    attrs: &configfs::ConfigfsAttrs,
    backend: &dyn Backend,
    map_len: usize,
) -> LunInfo {
    let serial = attrs.serial.clone().unwrap_or_else(|| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("{}/{}", spec.subtype, spec.cfgstring).bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        format!("{h:016x}")
    });
    let geo = backend.geometry();
    // A command's data must fit the data area with room to spare.
    let data_area = map_len.saturating_sub(crate::ring::abi::KERNEL_CMDR_AREA) as u64;
    let by_area = (data_area / 4 / u64::from(geo.block_size)).max(1);
    let by_attr = attrs.max_sectors.map_or(u64::MAX, u64::from);
    let max_transfer_blocks = by_area.min(by_attr).min(u64::from(u32::MAX)) as u32;
    LunInfo {
        vendor: "LIO-ORG".into(),
        product: "TCMU device".into(),
        revision: "0002".into(),
        serial,
        geometry: geo,
        caps: backend.caps(),
        max_transfer_blocks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ha_devices_refuse_persistent_reservations_unless_kept() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("core/user_0/disk0");
        std::fs::create_dir_all(dev.join("attrib")).unwrap();
        let emulate = || std::fs::read_to_string(dev.join("attrib/emulate_pr")).ok();
        ha_pr("disk0", &dev, true);
        assert_eq!(
            emulate(),
            None,
            "ha_pr = keep leaves the kernel's emulation alone"
        );
        ha_pr("disk0", &dev, false);
        assert_eq!(emulate().as_deref(), Some("0"));
        // No attrib directory (not a device, or an old kernel): a warning,
        // nothing else.
        ha_pr("disk1", &t.path().join("nowhere"), false);
    }

    fn action_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("action")).expect("mkdir action");
        d
    }
    fn read(d: &Path, f: &str) -> String {
        std::fs::read_to_string(d.join("action").join(f)).unwrap_or_default()
    }

    #[test]
    fn reset_ring_blocks_resets_unblocks() {
        let d = action_dir();
        assert_eq!(reset_ring(d.path(), "t"), RingReset::Done);
        assert_eq!(read(d.path(), "reset_ring"), "1");
        assert_eq!(read(d.path(), "block_dev"), "0", "left blocked");
    }

    #[test]
    fn failed_reset_still_unblocks() {
        let d = action_dir();
        // A directory where the attribute should be: the write fails.
        std::fs::create_dir(d.path().join("action/reset_ring")).expect("mkdir");
        assert_eq!(reset_ring(d.path(), "t"), RingReset::Failed);
        assert_eq!(read(d.path(), "block_dev"), "0", "left blocked");
    }

    #[test]
    fn no_action_dir_is_a_failure_not_a_panic() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(reset_ring(d.path(), "t"), RingReset::Failed);
        assert!(!d.path().join("action/block_dev").exists());
    }
}
