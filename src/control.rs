//! Applying the kernel's device events (from netlink, or found by a sysfs
//! scan) to the set of served devices, and the daemon's per-device state
//! for status output.
//!
//! Every handler returns the status the kernel gets in its `*_DONE`
//! reply: 0 or a negative errno.

use crate::backends;
use crate::metrics::hist::HistSnapshot;
use crate::netlink::{Event, EventKind, Incoming};
use crate::registry::{DeviceSpec, OpenDeviceError, Registry};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tcmu_handler::{Backend, Caps, Done, Geometry, IoError, Op};
use tracing::{debug, error, info, warn};

/// Subtypes this daemon serves.
pub fn subtypes() -> Vec<&'static str> {
    backends::handlers().iter().map(|h| h.subtype).collect()
}

/// A TCMU device's UIO name, `tcm-user/<hba>/<name>/<subtype>/<cfgstring>`,
/// taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioName {
    /// The user HBA's index (`core/user_<hba>` in configfs).
    pub hba: u32,
    /// The backstore's name.
    pub dev: String,
    /// The handler subtype (`rbd`, `file`, ...).
    pub subtype: String,
    /// The config string after the subtype.
    pub cfgstring: String,
}

/// Parses a UIO device name; None if it is not a TCMU device's.
pub fn parse_uio_name(name: &str) -> Option<UioName> {
    let rest = name.strip_prefix("tcm-user/")?;
    let mut it = rest.splitn(4, '/');
    let hba = it.next()?.parse().ok()?;
    let dev = it.next()?.to_string();
    let subtype = it.next()?.to_string();
    let cfgstring = it.next().unwrap_or("").to_string();
    if dev.is_empty() || subtype.is_empty() {
        return None;
    }
    Some(UioName {
        hba,
        dev,
        subtype,
        cfgstring,
    })
}

/// Why a UIO device cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The name is not a TCMU device's.
    #[error("{0:?} is not a TCMU device name")]
    NotTcmu(String),
    /// Another handler's subtype.
    #[error("subtype {0:?} is not served by this daemon")]
    SubtypeNotServed(String),
    /// sysfs does not give the ring's size.
    #[error("cannot read the ring size from {0}")]
    NoRingSize(PathBuf),
}

impl SpecError {
    /// The status the kernel gets in its netlink reply.
    pub fn errno(&self) -> i32 {
        neg(match self {
            SpecError::NotTcmu(_) => libc::EINVAL,
            SpecError::SubtypeNotServed(_) => libc::ENOENT,
            SpecError::NoRingSize(_) => libc::ENODEV,
        })
    }
}

/// What the daemon knows about a device beyond its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevState {
    /// Serving I/O.
    Serving,
    /// Refusing I/O with sense; why.
    Offline(String),
}

/// Devices opened at once by a rescan (daemon start).
pub const OPEN_THREADS: usize = 8;

/// Serves devices as the kernel adds, removes and reconfigures them.
pub struct Control {
    reg: Arc<Registry>,
    sysfs: PathBuf,
    configfs: PathBuf,
    states: Mutex<BTreeMap<String, DevState>>,
    /// Devices whose `attrib/nl_reply_supported` was 0 or less when they
    /// were opened: the kernel does not wait for replies about them and
    /// logs an error for each reply it gets.
    silent: Mutex<BTreeSet<String>>,
    /// `--devices`: serve only backstores with these names (None: all).
    only: Option<BTreeSet<String>>,
    /// Each device's latency histogram at the last status refresh: the
    /// next one shows IOPS and percentiles over the interval between.
    last_status: Mutex<BTreeMap<String, (std::time::Instant, HistSnapshot)>>,
}

/// Formats a latency in seconds for a status line (`42us`, `3.1ms`, `2.0s`).
fn fmt_latency(secs: f64) -> String {
    if secs.is_infinite() {
        ">33s".into()
    } else if secs < 1e-3 {
        format!("{:.0}us", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.1}ms", secs * 1e3)
    } else {
        format!("{secs:.1}s")
    }
}

/// The device's `attrib/nl_reply_supported`: the kernel fixes a device's
/// reply mode when it is enabled (from the module-wide setting, or the
/// admin's `nl_reply_supported=`), so devices created while no daemon
/// had negotiated replies expect none, ever.
fn reply_mode(spec: &DeviceSpec) -> Option<i32> {
    crate::configfs::nl_reply_supported(spec.configfs_dir.as_ref()?)
}

fn neg(errno: i32) -> i32 {
    -errno.abs()
}

fn open_errno(e: &OpenDeviceError) -> i32 {
    match e {
        OpenDeviceError::Io { source, .. } => neg(source.raw_os_error().unwrap_or(libc::EIO)),
        OpenDeviceError::Config { .. } => neg(libc::EINVAL),
        OpenDeviceError::Backend { source, .. } => match source {
            backends::OpenError::UnknownSubtype(_) => neg(libc::ENOENT),
            backends::OpenError::BadConfig(_) => neg(libc::EINVAL),
            backends::OpenError::Open(_) => neg(libc::EIO),
        },
        OpenDeviceError::Device(_) => neg(libc::EIO),
    }
}

impl Control {
    /// Controls `reg`; sysfs and configfs roots are parameters for tests.
    pub fn new(reg: Arc<Registry>, sysfs: &Path, configfs: &Path) -> Self {
        Control {
            reg,
            sysfs: sysfs.to_owned(),
            configfs: configfs.to_owned(),
            states: Mutex::new(BTreeMap::new()),
            silent: Mutex::new(BTreeSet::new()),
            only: None,
            last_status: Mutex::new(BTreeMap::new()),
        }
    }

    /// Serves only the backstores named in `names` (`--devices`), so that
    /// several daemons can share one host, each serving its own devices
    /// (e.g. two HA gateways of one image in a test guest). Applies to
    /// the sysfs scan; the daemon refuses a filter with netlink on, since
    /// the kernel expects exactly one reply per event.
    pub fn with_device_filter(mut self, names: BTreeSet<String>) -> Self {
        self.only = Some(names);
        self
    }

    /// Whether backstore `name` passes the `--devices` filter.
    pub fn wants(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(name))
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.reg
    }

    fn set_state(&self, name: &str, st: Option<DevState>) {
        if let Ok(mut m) = self.states.lock() {
            match st {
                Some(s) => {
                    m.insert(name.to_string(), s);
                }
                None => {
                    m.remove(name);
                }
            }
        }
    }

    /// The daemon-side state of `name`.
    pub fn state(&self, name: &str) -> Option<DevState> {
        self.states.lock().ok()?.get(name).cloned()
    }

    /// The spec for UIO device `uio<minor>` named `uio_name`, if its
    /// subtype is served.
    pub fn spec_for(&self, uio_name: &str, minor: u32) -> Result<DeviceSpec, SpecError> {
        let Some(UioName {
            hba,
            dev,
            subtype,
            cfgstring,
        }) = parse_uio_name(uio_name)
        else {
            return Err(SpecError::NotTcmu(uio_name.to_string()));
        };
        if !subtypes().contains(&subtype.as_str()) {
            return Err(SpecError::SubtypeNotServed(subtype));
        }
        let uio = format!("uio{minor}");
        let size_path = self
            .sysfs
            .join("class/uio")
            .join(&uio)
            .join("maps/map0/size");
        let map_size = std::fs::read_to_string(&size_path)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok());
        let Some(map_size) = map_size else {
            return Err(SpecError::NoRingSize(size_path));
        };
        let cfs = self.configfs.join(format!("target/core/user_{hba}/{dev}"));
        Ok(DeviceSpec {
            name: dev,
            uio_path: PathBuf::from("/dev").join(uio),
            map_size,
            subtype,
            cfgstring,
            configfs_dir: cfs.is_dir().then_some(cfs),
            size: None,
        })
    }

    fn is_silent(&self, name: &str) -> bool {
        self.silent.lock().is_ok_and(|s| s.contains(name))
    }

    /// Opens and serves a device.
    pub fn add(&self, spec: DeviceSpec) -> i32 {
        let name = spec.name.clone();
        let replies = reply_mode(&spec);
        match self.reg.add(spec) {
            Ok(()) => {
                self.track(&name, replies);
                0
            }
            Err(e) => {
                error!(dev = %name, error = %e, "cannot open device");
                open_errno(&e)
            }
        }
    }

    /// Serves a device built elsewhere (the emulator, in tests) with the
    /// same bookkeeping as [`add`](Self::add).
    pub fn adopt(&self, spec: DeviceSpec, dev: crate::device::Device) -> i32 {
        let name = spec.name.clone();
        let replies = reply_mode(&spec);
        match self.reg.adopt(spec, dev) {
            Ok(()) => {
                self.track(&name, replies);
                0
            }
            Err(e) => open_errno(&e),
        }
    }

    fn track(&self, name: &str, replies: Option<i32>) {
        if self.state(name).is_none() {
            self.set_state(name, Some(DevState::Serving));
        }
        if let Ok(mut s) = self.silent.lock() {
            if replies.is_some_and(|r| r <= 0) {
                s.insert(name.to_string());
            } else {
                s.remove(name);
            }
        }
    }

    /// Stops serving a device (drains it first).
    pub fn remove(&self, name: &str) -> i32 {
        if self.reg.remove(name) {
            info!(dev = %name, "device removed");
        }
        self.set_state(name, None);
        if let Ok(mut s) = self.silent.lock() {
            s.remove(name);
        }
        0
    }

    /// Reopens `name` with a new `dev_config` (`<subtype>/<cfgstring>`).
    /// If the new backend cannot be opened, the device stays up but
    /// refuses I/O with sense until a later reconfiguration works.
    pub fn reopen(&self, name: &str, dev_config: &str) -> i32 {
        let dev_config = dev_config.trim_end_matches(['\n', '\0']);
        let Some(spec) = self.reg.spec(name) else {
            warn!(dev = %name, "reconfigure: device not served");
            return neg(libc::ENODEV);
        };
        let Some((subtype, cfg)) = dev_config.split_once('/') else {
            warn!(dev = %name, config = dev_config, "reconfigure: no <subtype>/ prefix");
            return neg(libc::EINVAL);
        };
        if subtype != spec.subtype {
            warn!(dev = %name, old = %spec.subtype, new = subtype, "reconfigure cannot change the handler");
            return neg(libc::EINVAL);
        }
        // An HA device's backend sits behind the exclusive-lock gate and
        // its failover manager: a plain reopen would serve the image past
        // both. Such a device is re-created, not reconfigured.
        if self.reg.is_ha(name) {
            warn!(
                dev = %name,
                config = dev_config,
                "reconfigure refused: an HA rbd device (gated on the exclusive lock) keeps its \
                 image; remove and re-create the backstore to serve another"
            );
            return neg(libc::EOPNOTSUPP);
        }
        let Some((geo, caps)) = self.reg.run_on_worker(name, |d| {
            let i = d.lun_mut().info();
            (i.geometry, i.caps)
        }) else {
            return neg(libc::ENODEV);
        };
        info!(dev = %name, old = %spec.cfgstring, new = cfg, "reopening with a new config");
        match backends::open(subtype, cfg, geo.size, geo.block_size) {
            Ok(b) => {
                if self
                    .reg
                    .run_on_worker(name, move |d| d.set_backend(b))
                    .is_none()
                {
                    return neg(libc::ENODEV);
                }
                self.reg.set_cfgstring(name, cfg);
                self.set_state(name, Some(DevState::Serving));
                0
            }
            Err(e) => {
                let reason = format!("reopen with {dev_config:?} failed: {e}");
                error!(dev = %name, error = %e, config = dev_config, "reopen failed; the device refuses I/O until reconfigured");
                let off: Arc<dyn Backend> = Arc::new(Offline {
                    geometry: geo,
                    caps,
                    reason: reason.clone(),
                });
                let _ = self.reg.run_on_worker(name, move |d| d.set_backend(off));
                self.set_state(name, Some(DevState::Offline(reason)));
                match e {
                    backends::OpenError::UnknownSubtype(_) => neg(libc::ENOENT),
                    backends::OpenError::BadConfig(_) => neg(libc::EINVAL),
                    backends::OpenError::Open(_) => neg(libc::EIO),
                }
            }
        }
    }

    /// Online resize.
    pub fn resize(&self, name: &str, size: u64) -> i32 {
        match self.reg.resize(name, size) {
            Ok(()) => 0,
            Err(e) => {
                warn!(dev = %name, size, error = %e, "resize refused");
                match e {
                    crate::registry::ResizeError::NotServed(_) => neg(libc::ENODEV),
                    _ => neg(libc::EOPNOTSUPP),
                }
            }
        }
    }

    /// `emulate_write_cache` changed. The LUN reports the backend's own
    /// cache (WCE) and the kernel passes MODE SENSE through to us, so a
    /// setting that differs cannot be honoured: refused, as tcmu-runner's
    /// rbd handler refuses it.
    pub fn write_cache(&self, name: &str, on: bool) -> i32 {
        let Some(wce) = self
            .reg
            .run_on_worker(name, |d| d.lun_mut().info().caps.write_cache)
        else {
            return neg(libc::ENODEV);
        };
        if wce == on {
            0
        } else {
            warn!(dev = %name, requested = on, reported = wce, "write cache setting is fixed by the backend");
            neg(libc::EOPNOTSUPP)
        }
    }

    /// Handles one kernel event; returns the reply status.
    pub fn handle(&self, ev: &Event) -> i32 {
        let name = parse_uio_name(&ev.device).map(|p| p.dev);
        match (&ev.kind, name) {
            (EventKind::Added, _) => match self.spec_for(&ev.device, ev.minor) {
                Ok(spec) => self.add(spec),
                Err(e) => {
                    warn!(uio = %ev.device, error = %e, "device not served");
                    e.errno()
                }
            },
            (_, None) => {
                warn!(uio = %ev.device, "event for a device name that is not TCMU's");
                neg(libc::EINVAL)
            }
            (EventKind::Removed, Some(n)) => self.remove(&n),
            (EventKind::ReconfigCfg(c), Some(n)) => self.reopen(&n, c),
            (EventKind::ReconfigSize(s), Some(n)) => self.resize(&n, *s),
            (EventKind::ReconfigWriteCache(w), Some(n)) => self.write_cache(&n, *w),
        }
    }

    /// Handles one decoded datagram item from the netlink channel;
    /// returns the reply the kernel waits for: `(done command, device
    /// id, status)`.
    pub fn answer(&self, inc: &Incoming) -> Option<(u8, u32, i32)> {
        match inc {
            Incoming::Event(ev) => {
                let span = tracing::info_span!("event", dev = %ev.device);
                let _g = span.enter();
                info!(kind = ?ev.kind, minor = ev.minor, "kernel event");
                let name = parse_uio_name(&ev.device).map(|p| p.dev);
                let silent_before = name.as_deref().is_some_and(|n| self.is_silent(n));
                let st = self.handle(ev);
                if st != 0 {
                    warn!(status = st, "event failed");
                }
                // Checked before (removal forgets the device) and after
                // (an addition learns it).
                if silent_before || name.as_deref().is_some_and(|n| self.is_silent(n)) {
                    debug!("the kernel expects no reply for this device");
                    return None;
                }
                ev.reply_to().map(|(done, id)| (done, id, st))
            }
            Incoming::Bad(b) => {
                warn!(error = %b, "malformed kernel event ignored");
                b.reply.map(|(done, id)| (done, id, -libc::EINVAL))
            }
            Incoming::ReplyRefused(err, seq) => {
                warn!(errno = err, seq, "the kernel refused a reply");
                None
            }
        }
    }

    /// Scans sysfs: serves devices not yet served, drops those gone.
    pub fn rescan(&self) {
        let found = self.scan();
        let names: Vec<String> = found.iter().map(|s| s.name.clone()).collect();
        let served = self.reg.names();
        let new: Vec<DeviceSpec> = found
            .into_iter()
            .filter(|s| !served.contains(&s.name))
            .collect();
        self.add_all(new);
        for n in self.reg.names() {
            if !names.contains(&n) {
                info!(dev = %n, "device gone from sysfs");
                self.remove(&n);
            }
        }
    }

    /// Opens `specs` on up to [`OPEN_THREADS`] threads: after a restart
    /// every device waits for its image to open (a few cluster round
    /// trips each), and one at a time that is tens of seconds for a
    /// gateway with hundreds of LUNs.
    fn add_all(&self, specs: Vec<DeviceSpec>) {
        let n = specs.len().min(OPEN_THREADS);
        if n <= 1 {
            for spec in specs {
                self.add(spec);
            }
            return;
        }
        let queue = Mutex::new(specs.into_iter());
        let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        std::thread::scope(|sc| {
            for _ in 0..n {
                let spawned = std::thread::Builder::new()
                    .name("tcmu-open".into())
                    .spawn_scoped(sc, || {
                        while let Some(spec) = next() {
                            self.add(spec);
                        }
                    });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start an open thread; the others go on");
                }
            }
        });
        // Whatever no thread took (none could start): here, one by one.
        while let Some(spec) = next() {
            self.add(spec);
        }
    }

    /// The TCMU devices in sysfs whose subtype is served.
    pub fn scan(&self) -> Vec<DeviceSpec> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.sysfs.join("class/uio")) else {
            return out;
        };
        for e in rd.flatten() {
            let d = e.path();
            let Some(minor) = d
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("uio"))
                .and_then(|m| m.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(name) = std::fs::read_to_string(d.join("name")) else {
                continue;
            };
            let name = name.trim_end_matches('\n');
            if !parse_uio_name(name).is_some_and(|p| self.wants(&p.dev)) {
                continue;
            }
            match self.spec_for(name, minor) {
                Ok(spec) => out.push(spec),
                Err(SpecError::SubtypeNotServed(_)) => {}
                Err(e) => warn!(uio = name, error = %e, "device not served"),
            }
        }
        out
    }

    /// One line per device for status output: the registry's counters
    /// plus the daemon's state. Features that track more per device
    /// (ALUA state, lock owner) append `key=value` fields here.
    ///
    /// Each line also shows the IOPS and the p50/p99 latency (the upper
    /// bound of the log2 bucket each falls in) over the interval since the
    /// previous call (`interval=`; none on the first).
    pub fn status_lines(&self) -> Vec<String> {
        let mut st = self.reg.status();
        st.sort_by(|a, b| a.name.cmp(&b.name));
        let now = std::time::Instant::now();
        let mut last = self.last_status.lock().unwrap_or_else(|e| e.into_inner());
        let intervals: BTreeMap<String, String> = st
            .iter()
            .filter_map(|d| {
                let prev = last.insert(d.name.clone(), (now, d.latency));
                let (then, before) = prev?;
                let secs = now.duration_since(then).as_secs_f64();
                let delta = d.latency.since(&before);
                let iops = if secs > 0.0 {
                    delta.count() as f64 / secs
                } else {
                    0.0
                };
                let pct = |q| {
                    delta
                        .quantile_secs(q)
                        .map_or_else(|| "-".to_string(), fmt_latency)
                };
                Some((
                    d.name.clone(),
                    format!(
                        " interval={secs:.1}s iops={iops:.0} p50={} p99={}",
                        pct(0.5),
                        pct(0.99)
                    ),
                ))
            })
            .collect();
        last.retain(|n, _| st.iter().any(|d| &d.name == n));
        drop(last);
        st.iter()
            .map(|d| {
                let (state, why) = match self.state(&d.name) {
                    Some(DevState::Offline(r)) => ("offline", Some(r)),
                    _ => ("serving", None),
                };
                let size = self.reg.spec(&d.name).and_then(|s| s.size).unwrap_or(0);
                let mut line = format!(
                    "device {} state={} config={:?} size={} commands={} completed={} check_conditions={}",
                    d.name, state, d.config, size, d.commands, d.completed, d.check_conditions
                );
                if let Some(r) = why {
                    line.push_str(&format!(" reason={r:?}"));
                }
                if let Some(i) = intervals.get(&d.name) {
                    line.push_str(i);
                }
                if let Some(a) = &d.alua {
                    line.push(' ');
                    line.push_str(a);
                }
                line
            })
            .collect()
    }
}

/// The backend of a device whose reopen failed: every operation fails
/// (the SCSI layer turns that into sense data), nothing is touched.
pub struct Offline {
    geometry: Geometry,
    caps: Caps,
    reason: String,
}

impl Backend for Offline {
    fn name(&self) -> String {
        format!("offline ({})", self.reason)
    }
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn caps(&self) -> Caps {
        self.caps
    }
    fn submit(&self, _op: Op, done: Done) {
        done.complete(Err(IoError::Io {
            errno: libc::ENXIO,
            msg: self.reason.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uio_names() {
        assert_eq!(
            parse_uio_name("tcm-user/1/disk0/rbd/rbd/img;osd_op_timeout=30"),
            Some(UioName {
                hba: 1,
                dev: "disk0".into(),
                subtype: "rbd".into(),
                cfgstring: "rbd/img;osd_op_timeout=30".into()
            })
        );
        assert_eq!(
            parse_uio_name("tcm-user/0/d/file//tmp/x.img"),
            Some(UioName {
                hba: 0,
                dev: "d".into(),
                subtype: "file".into(),
                cfgstring: "/tmp/x.img".into()
            })
        );
        assert_eq!(parse_uio_name("uio_pci_generic"), None);
        assert_eq!(parse_uio_name("tcm-user/x/d/file/a"), None);
    }

    #[test]
    fn devices_not_served_say_why_and_get_their_errno() {
        let t = tempfile::tempdir().unwrap();
        fake_sysfs(t.path(), 3, "tcm-user/0/d3/file//tmp/x");
        let c = Control::new(Arc::new(Registry::new()), t.path(), &t.path().join("cfs"));
        let e = c.spec_for("uio_pci_generic", 1).unwrap_err();
        assert_eq!(e, SpecError::NotTcmu("uio_pci_generic".into()));
        assert_eq!(e.errno(), -libc::EINVAL);
        let e = c.spec_for("tcm-user/0/d/glfs/vol@host/f", 3).unwrap_err();
        assert_eq!(e, SpecError::SubtypeNotServed("glfs".into()));
        assert_eq!(e.errno(), -libc::ENOENT);
        // uio9 has no sysfs entry: no ring size.
        let e = c.spec_for("tcm-user/0/d9/file//tmp/x", 9).unwrap_err();
        assert!(
            matches!(e, SpecError::NoRingSize(ref p) if p.ends_with("uio9/maps/map0/size")),
            "{e}"
        );
        assert_eq!(e.errno(), -libc::ENODEV);
        let spec = c.spec_for("tcm-user/0/d3/file//tmp/x", 3).unwrap();
        assert_eq!((spec.name.as_str(), spec.map_size), ("d3", 0x800000));
    }

    fn fake_sysfs(root: &Path, minor: u32, name: &str) {
        let d = root.join(format!("class/uio/uio{minor}/maps/map0"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            root.join(format!("class/uio/uio{minor}/name")),
            format!("{name}\n"),
        )
        .unwrap();
        std::fs::write(d.join("size"), "0x800000\n").unwrap();
    }

    #[test]
    fn scan_keeps_served_subtypes_only() {
        let t = tempfile::tempdir().unwrap();
        fake_sysfs(t.path(), 0, "tcm-user/1/a/file//tmp/a");
        fake_sysfs(t.path(), 1, "tcm-user/1/b/glfs/vol@host/b");
        fake_sysfs(t.path(), 2, "some-other-uio");
        let c = Control::new(Arc::new(Registry::new()), t.path(), &t.path().join("cfs"));
        let found = c.scan();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "a");
        assert_eq!(found[0].uio_path, PathBuf::from("/dev/uio0"));
        assert_eq!(found[0].map_size, 0x800000);
        assert_eq!(found[0].cfgstring, "/tmp/a");
        assert_eq!(found[0].configfs_dir, None);
    }

    #[test]
    fn device_filter_limits_the_scan_to_the_named_backstores() {
        let t = tempfile::tempdir().unwrap();
        fake_sysfs(t.path(), 0, "tcm-user/1/disk_a/ram/x");
        fake_sysfs(t.path(), 1, "tcm-user/1/disk_b/ram/x");
        fake_sysfs(t.path(), 2, "tcm-user/2/disk_c/file//tmp/c");
        let cfs = t.path().join("cfs");
        let all = Control::new(Arc::new(Registry::new()), t.path(), &cfs);
        let mut names: Vec<String> = all.scan().into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(names, ["disk_a", "disk_b", "disk_c"]);
        let only = ["disk_b", "disk_c", "absent"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let some = Control::new(Arc::new(Registry::new()), t.path(), &cfs).with_device_filter(only);
        let mut names: Vec<String> = some.scan().into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(names, ["disk_b", "disk_c"]);
        assert!(!some.wants("disk_a"));
        assert!(some.wants("disk_b"));
        assert!(all.wants("disk_a"));
    }

    #[test]
    fn events_for_unknown_or_unserved_devices_get_errors() {
        let t = tempfile::tempdir().unwrap();
        fake_sysfs(t.path(), 4, "tcm-user/1/b/glfs/x");
        let c = Control::new(Arc::new(Registry::new()), t.path(), t.path());
        let ev = |kind, device: &str| Event {
            kind,
            version: 2,
            device: device.into(),
            minor: 4,
            device_id: Some(1),
        };
        assert_eq!(
            c.handle(&ev(EventKind::Added, "tcm-user/1/b/glfs/x")),
            -libc::ENOENT
        );
        assert_eq!(c.handle(&ev(EventKind::Added, "garbage")), -libc::EINVAL);
        // No sysfs entry for the minor: the ring cannot be sized.
        let mut e = ev(EventKind::Added, "tcm-user/1/c/ram/x");
        e.minor = 9;
        assert_eq!(c.handle(&e), -libc::ENODEV);
        assert_eq!(c.handle(&ev(EventKind::Removed, "tcm-user/1/zz/ram/x")), 0);
        assert_eq!(
            c.handle(&ev(EventKind::ReconfigSize(1 << 20), "tcm-user/1/zz/ram/x")),
            -libc::ENODEV
        );
        assert_eq!(
            c.handle(&ev(
                EventKind::ReconfigCfg("ram/y".into()),
                "tcm-user/1/zz/ram/x"
            )),
            -libc::ENODEV
        );
        assert_eq!(
            c.handle(&ev(
                EventKind::ReconfigWriteCache(true),
                "tcm-user/1/zz/ram/x"
            )),
            -libc::ENODEV
        );
    }
}
