//! Asymmetric logical unit access (SPC-4 5.16): target port groups, their
//! states, REPORT/SET TARGET PORT GROUPS, and which commands a port in
//! each state serves.
//!
//! The port groups come from an [`AluaSource`], swappable so that tests
//! and the emulator can supply their own. [`SharedAlua`] is the provided
//! one: its groups are given when it is built (in code, or read from the
//! device's `alua/` directory in configfs by `crate::configfs`, which also
//! re-reads them through a [`GroupSource`]: this module does no file I/O)
//! and their states live in atomics that another thread (the rbd
//! exclusive-lock watcher) changes at any time through an [`AluaHandle`].
//!
//! TCMU devices carry `TRANSPORT_FLAG_PASSTHROUGH_ALUA`: the kernel neither
//! checks ALUA states nor answers RTPG/STPG itself; this module does.
//!
//! How Linux initiators (dm-multipath with `hardware_handler "1 alua"`,
//! drivers/scsi/device_handler/scsi_dh_alua.c) react, which decides how a
//! failover driver should use this:
//! - I/O is never sent down a path whose group the host last saw as
//!   Standby, Unavailable or Offline (`alua_prep_fn` fails it locally).
//! - When multipath switches to such a path group it "activates" it: with
//!   explicit ALUA (TPGS 2 or 3) that is a SET TARGET PORT GROUPS asking
//!   Active/Optimized for that group, then REPORT TARGET PORT GROUPS until
//!   the state is no longer Transitioning (for up to the IMPLICIT
//!   TRANSITION TIME); with implicit-only ALUA it only re-reads the states.
//!   So standby gateways need explicit ALUA (install [`SharedAlua::on_stpg`]
//!   to start taking the lock and report Transitioning), or, for I/O-driven
//!   implicit failover as tcmu-runner does it, non-owners must report
//!   Active/Non-optimized so that I/O reaches them and
//!   [`AluaSource::request_active`] runs.
//! - NOT READY / ASYMMETRIC ACCESS STATE TRANSITION (02/04/0A) makes the
//!   host retry the command and re-read the states; LOGICAL UNIT NOT
//!   ACCESSIBLE, TARGET PORT IN STANDBY STATE (02/04/0B) fails the path
//!   (multipath's TUR checker shows it as a ghost) and the I/O moves on.
//!   But multipathd's TUR checker (libmultipath/checkers/tur.c) reads any
//!   NOT READY other than 04/0B as a dead path, and the kernel does not
//!   retry its SG_IO: a TUR answered 04/0A fails the path mid-activation.
//!   So a transitioning port answers TUR with the standby sense ([`check`]).
//! - The states in an RTPG answer update every port group the host knows,
//!   not only the one asked through: the gateway that takes the lock
//!   should also mark the previous owner's group Standby.
//!
//! Wiring, for a device worker:
//! ```no_run
//! # use std::sync::Arc;
//! # use tcmu_rbd::scsi::{alua::*, Lun};
//! # fn f(lun: &mut Lun, dev_dir: &std::path::Path) -> Result<(), AluaConfigError> {
//! if let Some(cfg) = tcmu_rbd::configfs::alua_config(dev_dir)? {
//!     let alua = SharedAlua::new(cfg);
//!     let handle = alua.handle(); // for the lock watcher thread
//!     alua.on_request_active(move || {
//!         // kick the exclusive-lock acquisition; never block here
//!         handle.set_local_state(AccessState::Transitioning);
//!     });
//!     lun.set_alua(Arc::new(alua));
//! }
//! # Ok(()) }
//! ```

use super::sense::{self, Sense};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Asymmetric access states (SPC-4 table 180).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AccessState {
    /// Active/optimized.
    ActiveOptimized = 0x0,
    /// Active/non-optimized.
    ActiveNonOptimized = 0x1,
    /// Standby.
    Standby = 0x2,
    /// Unavailable.
    Unavailable = 0x3,
    /// Logical block dependent.
    LbaDependent = 0x4,
    /// Offline.
    Offline = 0xe,
    /// Transitioning between states.
    Transitioning = 0xf,
}

impl AccessState {
    /// The state with wire value `v`.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::ActiveOptimized,
            0x1 => Self::ActiveNonOptimized,
            0x2 => Self::Standby,
            0x3 => Self::Unavailable,
            0x4 => Self::LbaDependent,
            0xe => Self::Offline,
            0xf => Self::Transitioning,
            _ => return None,
        })
    }

    /// The bit for this state in the SUPPORTED STATES byte of an RTPG
    /// descriptor.
    pub fn support_bit(self) -> u8 {
        match self {
            Self::ActiveOptimized => support::AO,
            Self::ActiveNonOptimized => support::AN,
            Self::Standby => support::S,
            Self::Unavailable => support::U,
            Self::LbaDependent => support::LBD,
            Self::Offline => support::O,
            Self::Transitioning => support::T,
        }
    }
}

/// Bits of the SUPPORTED STATES byte (SPC-4 table 179).
#[allow(missing_docs)]
pub mod support {
    pub const T: u8 = 0x80;
    pub const O: u8 = 0x40;
    pub const LBD: u8 = 0x10;
    pub const U: u8 = 0x08;
    pub const S: u8 = 0x04;
    pub const AN: u8 = 0x02;
    pub const AO: u8 = 0x01;
    /// What LIO groups support by default: all but LBA dependent.
    pub const DEFAULT: u8 = T | O | U | S | AN | AO;
}

/// STATUS CODE of an RTPG descriptor (SPC-4 table 181).
#[allow(missing_docs)]
pub mod status {
    pub const NONE: u8 = 0x00;
    pub const BY_STPG: u8 = 0x01;
    pub const BY_IMPLICIT: u8 = 0x02;
}

/// Which kinds of ALUA the LUN supports (the TPGS field of standard
/// INQUIRY data). Both false: no ALUA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AluaMode {
    /// The target changes states itself (e.g. following the rbd lock).
    pub implicit: bool,
    /// Initiators change states with SET TARGET PORT GROUPS.
    pub explicit: bool,
}

impl AluaMode {
    /// The two-bit TPGS value.
    pub fn tpgs(self) -> u8 {
        u8::from(self.implicit) | (u8::from(self.explicit) << 1)
    }
    /// ALUA is reported at all.
    pub fn enabled(self) -> bool {
        self.implicit || self.explicit
    }
}

/// A target port group as reported by REPORT TARGET PORT GROUPS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroup {
    /// TARGET PORT GROUP identifier.
    pub id: u16,
    /// Current state.
    pub state: AccessState,
    /// PREF bit.
    pub preferred: bool,
    /// SUPPORTED STATES bits ([`support`]).
    pub supported: u8,
    /// STATUS CODE ([`status`]).
    pub status: u8,
    /// Relative target port identifiers of the member ports.
    pub ports: Vec<u16>,
}

/// The port the LUN is reached through on this gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPort {
    /// Its target port group.
    pub group: u16,
    /// Its relative target port identifier.
    pub rel_port: u16,
}

/// One request of a SET TARGET PORT GROUPS parameter list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StpgRequest {
    /// The group to change.
    pub group: u16,
    /// The state asked for.
    pub state: AccessState,
}

/// Why a SET TARGET PORT GROUPS was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StpgError {
    /// Descriptor `index` names a group that does not exist.
    #[error("descriptor {index}: no target port group {group}")]
    UnknownGroup {
        /// Descriptor number.
        index: usize,
        /// The group named.
        group: u16,
    },
    /// Descriptor `index` asks for a state its group does not support.
    #[error("descriptor {index}: state {state:?} not supported")]
    UnsupportedState {
        /// Descriptor number.
        index: usize,
        /// The state asked for.
        state: AccessState,
    },
    /// The change was valid but could not be made.
    #[error("set target port groups failed: {0}")]
    Failed(String),
}

/// Where port groups and their states come from.
///
/// `local_state` is called for every command while ALUA is enabled and
/// must be cheap (an atomic load). `request_active` must not block: it
/// starts whatever makes this gateway Active/Optimized (taking the rbd
/// exclusive lock) and returns; the source moves the local group to
/// Transitioning first if it wants initiators to retry meanwhile.
pub trait AluaSource: Send + Sync {
    /// Implicit and/or explicit support; neither = ALUA off.
    fn mode(&self) -> AluaMode;
    /// All target port groups, with their current states.
    fn groups(&self) -> Vec<PortGroup>;
    /// The port commands arrive through.
    fn local_port(&self) -> LocalPort;
    /// The state of the local port's group.
    fn local_state(&self) -> AccessState;
    /// IMPLICIT TRANSITION TIME (seconds) for the extended RTPG header.
    fn implicit_transition_secs(&self) -> u8;
    /// Asks for the local group to become Active/Optimized (implicit
    /// ALUA: I/O arrived at a standby port). Never blocks.
    fn request_active(&self);
    /// Applies a SET TARGET PORT GROUPS (explicit ALUA).
    fn set_target_port_groups(&self, requests: &[StpgRequest]) -> Result<(), StpgError>;
}

/// A group's configuration (states excluded: those are live).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// Name (the configfs directory), for logs.
    pub name: String,
    /// TARGET PORT GROUP identifier.
    pub id: u16,
    /// Initial state.
    pub state: AccessState,
    /// Initial status code.
    pub status: u8,
    /// PREF bit.
    pub preferred: bool,
    /// SUPPORTED STATES bits.
    pub supported: u8,
    /// Implicit/explicit support of this group.
    pub mode: AluaMode,
    /// Implicit transition time in seconds.
    pub implicit_trans_secs: u8,
    /// Member ports: (relative target port id, enabled on this host).
    pub ports: Vec<(u16, bool)>,
}

impl GroupConfig {
    /// A group built in code (the gateway simulator, tests): named
    /// `gw<id>`, in `state` with status 0, not preferred, every state
    /// supported, implicit and explicit ALUA, a 10 s implicit transition;
    /// `ports` are its members. Change fields with struct update syntax.
    pub fn new(id: u16, state: AccessState, ports: Vec<(u16, bool)>) -> Self {
        GroupConfig {
            name: format!("gw{id}"),
            id,
            state,
            status: 0,
            preferred: false,
            supported: support::DEFAULT,
            mode: AluaMode {
                implicit: true,
                explicit: true,
            },
            implicit_trans_secs: 10,
            ports,
        }
    }
}

/// The ALUA configuration of one LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AluaConfig {
    /// The groups.
    pub groups: Vec<GroupConfig>,
    /// The local port.
    pub local: LocalPort,
}

/// Where a [`SharedAlua`] re-reads its groups and their member ports
/// (the daemon's configfs reader, `crate::configfs::ConfigfsGroups`;
/// tests can supply their own). Reading is the source's business: the
/// SCSI core only takes the values.
pub trait GroupSource: Send + Sync {
    /// The groups now (None: no group configured).
    fn groups(&self) -> Result<Option<AluaConfig>, AluaConfigError>;
    /// The member ports of group `name` now: (relative target port id,
    /// enabled on this host), in configfs order.
    fn members(&self, name: &str) -> Result<Vec<(u16, bool)>, AluaConfigError>;
}

/// Errors reading ALUA configuration from configfs.
#[derive(Debug, thiserror::Error)]
pub enum AluaConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file held something unexpected.
    #[error("{path}: bad value {value:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Its contents.
        value: String,
    },
}

struct Slot {
    cfg: GroupConfig,
    state: AtomicU8,
    status: AtomicU8,
    /// Member ports now (the configuration's, or re-read from configfs).
    ports: Mutex<Vec<(u16, bool)>>,
}

/// `local_slot` when the local group is not among the groups.
const NO_SLOT: usize = usize::MAX;

fn pack_mode(m: AluaMode) -> u8 {
    m.tpgs()
}

fn unpack_mode(v: u8) -> AluaMode {
    AluaMode {
        implicit: v & 1 != 0,
        explicit: v & 2 != 0,
    }
}

/// What makes two group sets the same set (states and members aside).
fn shape<'a>(
    groups: impl IntoIterator<Item = &'a GroupConfig>,
) -> Vec<(&'a str, u16, u8, u8, bool, u8)> {
    groups
        .into_iter()
        .map(|g| {
            (
                g.name.as_str(),
                g.id,
                g.mode.tpgs(),
                g.supported,
                g.preferred,
                g.implicit_trans_secs,
            )
        })
        .collect()
}

fn make_slots(groups: Vec<GroupConfig>) -> Vec<Slot> {
    groups
        .into_iter()
        .map(|cfg| Slot {
            state: AtomicU8::new(cfg.state as u8),
            status: AtomicU8::new(cfg.status),
            ports: Mutex::new(cfg.ports.clone()),
            cfg,
        })
        .collect()
}

fn pack_local(l: LocalPort) -> u32 {
    (u32::from(l.group) << 16) | u32::from(l.rel_port)
}

fn unpack_local(v: u32) -> LocalPort {
    LocalPort {
        group: (v >> 16) as u16,
        rel_port: v as u16,
    }
}

type RequestHook = Box<dyn Fn() + Send + Sync>;
type StpgHook = Box<dyn Fn(&AluaHandle, &[StpgRequest]) -> Result<(), StpgError> + Send + Sync>;

struct Inner {
    /// The local group's [`AluaMode`] ([`pack_mode`]): it changes when
    /// groups appear or go in configfs.
    mode: AtomicU8,
    /// The local port ([`pack_local`]): it can change when the members
    /// are re-read.
    local: AtomicU32,
    /// Index of the local group in `slots`, or [`NO_SLOT`].
    local_slot: AtomicUsize,
    trans_secs: AtomicU8,
    /// The groups. Replaced whole when configfs shows another set of
    /// groups ([`SharedAlua::reload_groups`]): ceph-iscsi creates them
    /// after the backstore is enabled, so after the daemon opened it.
    slots: RwLock<Vec<Slot>>,
    /// Where groups and member ports are re-read from
    /// ([`SharedAlua::follow`]).
    source: Mutex<Option<Arc<dyn GroupSource>>>,
    on_request_active: Mutex<Option<RequestHook>>,
    on_stpg: Mutex<Option<StpgHook>>,
}

/// The provided [`AluaSource`]: fixed groups, live states.
#[derive(Clone)]
pub struct SharedAlua {
    inner: Arc<Inner>,
}

/// Changes a [`SharedAlua`]'s states from another thread.
#[derive(Clone)]
pub struct AluaHandle {
    inner: Arc<Inner>,
}

impl SharedAlua {
    /// ALUA off: TPGS 0, no groups reported, everything served
    /// (Active/Optimized).
    pub fn off() -> Self {
        Self::build(
            AluaMode::default(),
            AluaConfig {
                groups: Vec::new(),
                local: LocalPort {
                    group: 0,
                    rel_port: 1,
                },
            },
        )
    }

    /// ALUA from a configuration. The TPGS bits and the transition time
    /// are the local group's.
    pub fn new(config: AluaConfig) -> Self {
        let local = config
            .groups
            .iter()
            .find(|g| g.id == config.local.group)
            .map(|g| g.mode)
            .unwrap_or_default();
        Self::build(local, config)
    }

    fn build(mode: AluaMode, config: AluaConfig) -> Self {
        let local_slot = config
            .groups
            .iter()
            .position(|g| g.id == config.local.group);
        let trans_secs = local_slot.map_or(0, |i| config.groups[i].implicit_trans_secs);
        SharedAlua {
            inner: Arc::new(Inner {
                mode: AtomicU8::new(pack_mode(mode)),
                local: AtomicU32::new(pack_local(config.local)),
                local_slot: AtomicUsize::new(local_slot.unwrap_or(NO_SLOT)),
                trans_secs: AtomicU8::new(trans_secs),
                slots: RwLock::new(make_slots(config.groups)),
                source: Mutex::new(None),
                on_request_active: Mutex::new(None),
                on_stpg: Mutex::new(None),
            }),
        }
    }

    /// Re-reads the groups' member ports from `source` whenever they are
    /// reported (REPORT TARGET PORT GROUPS, the port designators of VPD
    /// page 0x83), and the groups on [`reload_groups`](Self::reload_groups).
    /// The daemon opens a device when its backstore is enabled, before any
    /// fabric links a LUN to it, so the members read at open are usually
    /// none.
    pub fn follow(&self, source: Arc<dyn GroupSource>) {
        if let Ok(mut g) = self.inner.source.lock() {
            *g = Some(source);
        }
        self.refresh();
    }

    /// Re-reads the set of groups from configfs (when following it) and
    /// replaces it if groups were created, removed or reconfigured. A
    /// group that stays keeps its live state; a new one starts in its
    /// configured state. Returns whether the set changed (the caller that
    /// drives the states should then apply them again). A configuration
    /// that cannot be read now (a group being created) is left for the
    /// next call.
    pub fn reload_groups(&self) -> bool {
        self.handle().reload_groups()
    }

    /// Re-reads the member ports and the local port (see
    /// [`follow`](Self::follow)). When the local port
    /// moves to another group, that group takes over the local state (the
    /// lock's view does not depend on which group names it) and the old
    /// one is reported Standby.
    fn refresh(&self) {
        let Some(source) = self.inner.source.lock().ok().and_then(|g| g.clone()) else {
            return;
        };
        self.reload_groups();
        let mut local = None;
        let slots = self.inner.slots();
        for (i, s) in slots.iter().enumerate() {
            let ports = match source.members(&s.cfg.name) {
                Ok(p) => p,
                Err(e) => {
                    // A LUN being linked or unlinked: keep what we had.
                    tracing::debug!(group = s.cfg.id, error = %e, "ALUA members not readable now");
                    continue;
                }
            };
            if local.is_none() {
                local = ports.iter().find(|p| p.1).map(|p| {
                    (
                        i,
                        LocalPort {
                            group: s.cfg.id,
                            rel_port: p.0,
                        },
                    )
                });
            }
            if let Ok(mut g) = s.ports.lock() {
                if *g != ports {
                    tracing::info!(group = s.cfg.id, name = %s.cfg.name, ports = ?ports, "ALUA group members");
                    *g = ports;
                }
            }
        }
        let Some((slot, port)) = local else { return };
        let old = unpack_local(self.inner.local.swap(pack_local(port), Ordering::AcqRel));
        let old_slot = self.inner.local_slot.swap(slot, Ordering::AcqRel);
        if old_slot != slot {
            if let Some(o) = slots.get(old_slot) {
                let st = o.state.swap(AccessState::Standby as u8, Ordering::AcqRel);
                let new = &slots[slot];
                new.status
                    .store(o.status.load(Ordering::Relaxed), Ordering::Relaxed);
                new.state.store(st, Ordering::Release);
            }
        }
        if old != port {
            tracing::info!(
                group = port.group,
                rel_port = port.rel_port,
                "ALUA local port"
            );
        }
    }

    /// The local port as last read, without re-reading configfs.
    pub fn local_port_cached(&self) -> LocalPort {
        unpack_local(self.inner.local.load(Ordering::Acquire))
    }

    /// A handle for the thread that drives the states.
    pub fn handle(&self) -> AluaHandle {
        AluaHandle {
            inner: self.inner.clone(),
        }
    }

    /// Called (on the ring thread, must not block) when I/O reaches a
    /// standby or non-optimized port with implicit ALUA.
    pub fn on_request_active(&self, f: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut g) = self.inner.on_request_active.lock() {
            *g = Some(Box::new(f));
        }
    }

    /// Replaces what SET TARGET PORT GROUPS does once the requests are
    /// validated (the default sets the asked states at once).
    pub fn on_stpg(
        &self,
        f: impl Fn(&AluaHandle, &[StpgRequest]) -> Result<(), StpgError> + Send + Sync + 'static,
    ) {
        if let Ok(mut g) = self.inner.on_stpg.lock() {
            *g = Some(Box::new(f));
        }
    }
}

impl AluaHandle {
    /// Sets group `id`'s state and status code; false if no such group.
    /// A change is logged (in the caller's span, which names the device).
    pub fn set_state(&self, id: u16, state: AccessState, status: u8) -> bool {
        match self.inner.slots().iter().find(|s| s.cfg.id == id) {
            Some(s) => {
                s.status.store(status, Ordering::Relaxed);
                let old = s.state.swap(state as u8, Ordering::AcqRel);
                if old != state as u8 {
                    tracing::info!(
                        group = id,
                        name = %s.cfg.name,
                        old = ?AccessState::from_u8(old),
                        new = ?state,
                        "ALUA state change"
                    );
                }
                true
            }
            None => false,
        }
    }

    /// Sets the local group's state (implicit transition).
    pub fn set_local_state(&self, state: AccessState) -> bool {
        let group = unpack_local(self.inner.local.load(Ordering::Acquire)).group;
        self.set_state(group, state, status::BY_IMPLICIT)
    }

    /// The local port's group (it can change when the members are
    /// re-read from configfs).
    pub fn local_group(&self) -> u16 {
        unpack_local(self.inner.local.load(Ordering::Acquire)).group
    }

    /// Group `id`'s state.
    pub fn state(&self, id: u16) -> Option<AccessState> {
        let slots = self.inner.slots();
        let s = slots.iter().find(|s| s.cfg.id == id)?;
        AccessState::from_u8(s.state.load(Ordering::Acquire))
    }

    /// The ids of the groups now.
    pub fn group_ids(&self) -> Vec<u16> {
        self.inner.slots().iter().map(|s| s.cfg.id).collect()
    }

    /// The local group's ALUA mode now (off while there are no groups).
    pub fn mode(&self) -> AluaMode {
        unpack_mode(self.inner.mode.load(Ordering::Acquire))
    }

    /// Whether the groups come from a source that can change (configfs):
    /// only then is [`reload_groups`](Self::reload_groups) worth calling.
    pub fn follows_source(&self) -> bool {
        self.inner
            .source
            .lock()
            .map(|g| g.is_some())
            .unwrap_or(false)
    }

    /// See [`SharedAlua::reload_groups`].
    pub fn reload_groups(&self) -> bool {
        let Some(source) = self.inner.source.lock().ok().and_then(|g| g.clone()) else {
            return false;
        };
        let cfg = match source.groups() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "ALUA groups not readable now");
                return false;
            }
        };
        let groups = cfg.as_ref().map_or(&[][..], |c| c.groups.as_slice());
        // Write-locked from the comparison to the swap: a state set
        // meanwhile (the failover thread) is not lost in the copy.
        let mut old = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
        if shape(old.iter().map(|s| &s.cfg)) == shape(groups) {
            return false;
        }
        let (groups, local) = match cfg {
            Some(c) => (c.groups, c.local),
            None => (
                Vec::new(),
                LocalPort {
                    group: 0,
                    rel_port: 1,
                },
            ),
        };
        let slots = make_slots(groups);
        for s in &slots {
            if let Some(o) = old.iter().find(|o| o.cfg.id == s.cfg.id) {
                s.state
                    .store(o.state.load(Ordering::Acquire), Ordering::Release);
                s.status
                    .store(o.status.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        let local_slot = slots.iter().position(|s| s.cfg.id == local.group);
        let mode = local_slot.map_or(AluaMode::default(), |i| slots[i].cfg.mode);
        let trans = local_slot.map_or(0, |i| slots[i].cfg.implicit_trans_secs);
        tracing::info!(
            groups = ?slots.iter().map(|s| (s.cfg.name.as_str(), s.cfg.id)).collect::<Vec<_>>(),
            local_group = local.group,
            tpgs = mode.tpgs(),
            "ALUA groups changed in configfs"
        );
        *old = slots;
        self.inner
            .local_slot
            .store(local_slot.unwrap_or(NO_SLOT), Ordering::Release);
        self.inner.local.store(pack_local(local), Ordering::Release);
        self.inner.trans_secs.store(trans, Ordering::Relaxed);
        self.inner.mode.store(pack_mode(mode), Ordering::Release);
        true
    }
}

impl Inner {
    /// The groups, read-locked (no copy, no reference count: this is on
    /// every command's path through [`check`]).
    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl AluaSource for SharedAlua {
    fn mode(&self) -> AluaMode {
        unpack_mode(self.inner.mode.load(Ordering::Acquire))
    }

    fn groups(&self) -> Vec<PortGroup> {
        self.refresh();
        self.inner
            .slots()
            .iter()
            .map(|s| PortGroup {
                id: s.cfg.id,
                state: AccessState::from_u8(s.state.load(Ordering::Acquire))
                    .unwrap_or(AccessState::Transitioning),
                preferred: s.cfg.preferred,
                supported: s.cfg.supported,
                status: s.status.load(Ordering::Relaxed),
                ports: s
                    .ports
                    .lock()
                    .map(|p| p.iter().map(|p| p.0).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    fn local_port(&self) -> LocalPort {
        self.refresh();
        self.local_port_cached()
    }

    #[inline]
    fn local_state(&self) -> AccessState {
        let slots = self.inner.slots();
        match slots.get(self.inner.local_slot.load(Ordering::Acquire)) {
            Some(s) => AccessState::from_u8(s.state.load(Ordering::Acquire))
                .unwrap_or(AccessState::Transitioning),
            None => AccessState::ActiveOptimized,
        }
    }

    fn implicit_transition_secs(&self) -> u8 {
        self.inner.trans_secs.load(Ordering::Relaxed)
    }

    fn request_active(&self) {
        if let Ok(g) = self.inner.on_request_active.lock() {
            if let Some(f) = g.as_ref() {
                f();
            }
        }
    }

    fn set_target_port_groups(&self, requests: &[StpgRequest]) -> Result<(), StpgError> {
        let slots = self.inner.slots();
        for (index, r) in requests.iter().enumerate() {
            let Some(s) = slots.iter().find(|s| s.cfg.id == r.group) else {
                return Err(StpgError::UnknownGroup {
                    index,
                    group: r.group,
                });
            };
            if s.cfg.supported & r.state.support_bit() == 0 {
                return Err(StpgError::UnsupportedState {
                    index,
                    state: r.state,
                });
            }
        }
        let handle = self.handle();
        let hook = self
            .inner
            .on_stpg
            .lock()
            .map_err(|_| StpgError::Failed("stpg hook poisoned".into()))?;
        match hook.as_ref() {
            Some(f) => f(&handle, requests),
            None => {
                for r in requests {
                    handle.set_state(r.group, r.state, status::BY_STPG);
                }
                Ok(())
            }
        }
    }
}

/// What the port's state allows for one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Serve it.
    Serve,
    /// Refuse it with this sense.
    Refuse(Sense),
}

/// Commands every state serves that reports anything (SPC-4 5.16.2.6:
/// transitioning serves INQUIRY, REPORT LUNS, RTPG, REQUEST SENSE).
fn always_allowed(cdb: &[u8]) -> bool {
    use super::cdb::{op, sa};
    match cdb.first().copied() {
        Some(op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE) => true,
        Some(op::MAINTENANCE_IN) => cdb.get(1).map(|b| b & 0x1f) == Some(sa::REPORT_TARGET_PGS),
        _ => false,
    }
}

/// What a standby port serves besides
/// [`always_allowed`] (SPC-4 5.16.2.4.4 and 5.16.2.4.5: mode pages,
/// STPG, and — as LIO does — READ CAPACITY so the host can size the
/// disk). TEST UNIT READY is refused so that multipath's TUR checker sees
/// the path as a ghost.
fn standby_allowed(cdb: &[u8]) -> bool {
    use super::cdb::{op, sa};
    match cdb.first().copied() {
        Some(
            op::MODE_SENSE_6
            | op::MODE_SENSE_10
            | op::MODE_SELECT_6
            | op::MODE_SELECT_10
            | op::READ_CAPACITY_10,
        ) => true,
        Some(op::SERVICE_ACTION_IN_16) => {
            cdb.get(1).map(|b| b & 0x1f) == Some(sa::READ_CAPACITY_16)
        }
        Some(op::MAINTENANCE_IN) => {
            cdb.get(1).map(|b| b & 0x1f) == Some(sa::REPORT_SUPPORTED_OPCODES)
        }
        Some(op::MAINTENANCE_OUT) => cdb.get(1).map(|b| b & 0x1f) == Some(sa::SET_TARGET_PGS),
        _ => false,
    }
}

/// Whether a media command that changes the image.
fn media_write(cdb: &[u8]) -> bool {
    use super::cdb::op;
    matches!(
        cdb.first().copied(),
        Some(
            op::WRITE_6
                | op::WRITE_10
                | op::WRITE_12
                | op::WRITE_16
                | op::WRITE_VERIFY_10
                | op::WRITE_VERIFY_16
                | op::WRITE_SAME_10
                | op::WRITE_SAME_16
                | op::UNMAP
                | op::COMPARE_AND_WRITE
        )
    )
}

/// Decides whether the local port serves `cdb` in its current state. With
/// implicit ALUA, a media command reaching a non-optimized or standby
/// port asks the source to become active; if the source then reports
/// Transitioning, the command gets the transition sense (dm-multipath's
/// ALUA handler retries it) instead of the standby one (which fails the
/// path over).
pub fn check(src: &dyn AluaSource, mode: AluaMode, cdb: &[u8]) -> Access {
    let mut state = src.local_state();
    if state == AccessState::ActiveOptimized {
        return Access::Serve;
    }
    // Only a write asks for the lock. A non-optimized port (implicit-only
    // groups, as ceph-iscsi makes them) serves reads without it; a standby
    // port refuses them with the standby sense, as LIO's own ALUA does.
    // Either way the reads an initiator's scan sends down every path at
    // login (udev's probe of each raw path disk) do not move the lock: a
    // move fences the old owner's client, and with it every LUN that
    // gateway serves through that client.
    let wants_lock = matches!(
        state,
        AccessState::Standby | AccessState::ActiveNonOptimized
    ) && media_write(cdb);
    if mode.implicit && wants_lock {
        src.request_active();
        state = src.local_state();
    }
    let refuse = match state {
        AccessState::ActiveOptimized
        | AccessState::ActiveNonOptimized
        | AccessState::LbaDependent => return Access::Serve,
        // TEST UNIT READY while transitioning: multipathd's TUR checker
        // takes 04/0A for a dead path and fails it, so dm-multipath
        // switches to the other path group and activates that one: the
        // gateway taking the lock loses it again to the other, and the
        // next transition there repeats it (the lock bounced every ~2 s
        // between two gateways started Standby). The standby sense keeps
        // the path a ghost: alive, not yet serving, which is what it is.
        AccessState::Transitioning if cdb.first() == Some(&super::cdb::op::TEST_UNIT_READY) => {
            sense::ALUA_STANDBY
        }
        AccessState::Transitioning => sense::ALUA_TRANSITIONING,
        AccessState::Standby => sense::ALUA_STANDBY,
        AccessState::Unavailable => sense::ALUA_UNAVAILABLE,
        AccessState::Offline => sense::ALUA_OFFLINE,
    };
    if always_allowed(cdb) {
        return Access::Serve;
    }
    let stpg = cdb.first() == Some(&super::cdb::op::MAINTENANCE_OUT)
        && cdb.get(1).map(|b| b & 0x1f) == Some(super::cdb::sa::SET_TARGET_PGS);
    match state {
        AccessState::Standby if standby_allowed(cdb) => return Access::Serve,
        // SPC-4 5.16.2.4.5: unavailable ports still take STPG.
        AccessState::Unavailable if stpg => return Access::Serve,
        _ => {}
    }
    Access::Refuse(refuse)
}

/// The sense REQUEST SENSE reports for the port's state (NO SENSE when it
/// serves everything).
pub fn state_sense(state: AccessState) -> Option<Sense> {
    match state {
        AccessState::Transitioning => Some(sense::ALUA_TRANSITIONING),
        AccessState::Standby => Some(sense::ALUA_STANDBY),
        AccessState::Unavailable => Some(sense::ALUA_UNAVAILABLE),
        AccessState::Offline => Some(sense::ALUA_OFFLINE),
        _ => None,
    }
}

/// REPORT TARGET PORT GROUPS parameter data (SPC-4 6.27): `extended`
/// selects the extended header (format 001b) with the implicit transition
/// time.
pub fn rtpg_data(src: &dyn AluaSource, extended: bool) -> Vec<u8> {
    let groups = src.groups();
    let hdr = if extended { 8 } else { 4 };
    let mut b = vec![0u8; hdr];
    if extended {
        b[4] = 0x10;
        b[5] = src.implicit_transition_secs();
    }
    for g in &groups {
        b.push((u8::from(g.preferred) << 7) | (g.state as u8 & 0x0f));
        b.push(g.supported);
        b.extend_from_slice(&g.id.to_be_bytes());
        b.push(0);
        b.push(g.status);
        b.push(0);
        // TARGET PORT COUNT is one byte; more ports cannot be described.
        let ports = &g.ports[..g.ports.len().min(255)];
        b.push(ports.len() as u8);
        for p in ports {
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&p.to_be_bytes());
        }
    }
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

/// Parses a SET TARGET PORT GROUPS parameter list (SPC-4 6.36): a
/// 4-byte reserved header, then 4-byte descriptors (state in byte 0 bits
/// 3..0, group id in bytes 2..3). Only the states SPC-4 allows an
/// initiator to ask for are accepted.
pub fn parse_stpg(list: &[u8]) -> Result<Vec<StpgRequest>, Sense> {
    if list.len() < 4 {
        return Err(sense::PARAM_LIST_LENGTH_ERROR);
    }
    let mut out = Vec::with_capacity((list.len() - 4) / 4);
    // Bytes past the last whole descriptor are ignored.
    for (i, d) in list[4..].chunks_exact(4).enumerate() {
        let off = (4 + 4 * i) as u16;
        let state = match AccessState::from_u8(d[0] & 0x0f) {
            Some(
                s @ (AccessState::ActiveOptimized
                | AccessState::ActiveNonOptimized
                | AccessState::Standby
                | AccessState::Unavailable
                | AccessState::Offline),
            ) => s,
            _ => return Err(sense::invalid_param(off, Some(3))),
        };
        out.push(StpgRequest {
            group: u16::from_be_bytes([d[2], d[3]]),
            state,
        });
    }
    Ok(out)
}

/// SET TARGET PORT GROUPS COMMAND FAILED (04/67/0A).
pub const STPG_FAILED: Sense = Sense::new(sense::key::HARDWARE_ERROR, 0x67, 0x0a);

/// The sense for a refused STPG.
pub fn stpg_error_sense(e: &StpgError) -> Sense {
    match e {
        StpgError::UnknownGroup { index, .. } => {
            sense::invalid_param((4 + 4 * index + 2).min(0xffff) as u16, None)
        }
        StpgError::UnsupportedState { index, .. } => {
            sense::invalid_param((4 + 4 * index).min(0xffff) as u16, Some(3))
        }
        StpgError::Failed(_) => STPG_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_groups() -> SharedAlua {
        let g = |id, state, ports: Vec<(u16, bool)>| GroupConfig {
            name: format!("g{id}"),
            preferred: id == 1,
            ..GroupConfig::new(id, state, ports)
        };
        SharedAlua::new(AluaConfig {
            groups: vec![
                g(1, AccessState::ActiveOptimized, vec![(1, true)]),
                g(2, AccessState::Standby, vec![(2, false), (3, false)]),
            ],
            local: LocalPort {
                group: 1,
                rel_port: 1,
            },
        })
    }

    #[test]
    fn rtpg_layout_matches_spc4() {
        let a = two_groups();
        let d = rtpg_data(&a, true);
        // Header: RETURN DATA LENGTH = total - 4; format 001b; 10 s.
        assert_eq!(&d[..8], &[0, 0, 0, 32, 0x10, 10, 0, 0]);
        // Group 1: PREF, AO, supported, id 1, count 1, port 1.
        assert_eq!(&d[8..20], &[0x80, 0xcf, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
        // Group 2: standby, id 2, two ports.
        assert_eq!(
            &d[20..36],
            &[0x02, 0xcf, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]
        );
        let short = rtpg_data(&a, false);
        assert_eq!(&short[..4], &[0, 0, 0, 28]);
        assert_eq!(&short[4..], &d[8..]);
    }

    #[test]
    fn states_change_from_another_thread() {
        let a = two_groups();
        let h = a.handle();
        std::thread::spawn(move || {
            assert!(h.set_local_state(AccessState::Standby));
            assert!(!h.set_state(9, AccessState::Standby, 0));
        })
        .join()
        .unwrap();
        assert_eq!(a.local_state(), AccessState::Standby);
        assert_eq!(a.groups()[0].status, status::BY_IMPLICIT);
    }

    #[test]
    fn stpg_validates_then_applies() {
        let a = two_groups();
        let bad = a.set_target_port_groups(&[StpgRequest {
            group: 7,
            state: AccessState::ActiveOptimized,
        }]);
        assert_eq!(bad, Err(StpgError::UnknownGroup { index: 0, group: 7 }));
        a.set_target_port_groups(&[
            StpgRequest {
                group: 2,
                state: AccessState::ActiveOptimized,
            },
            StpgRequest {
                group: 1,
                state: AccessState::Standby,
            },
        ])
        .unwrap();
        let g = a.groups();
        assert_eq!(g[1].state, AccessState::ActiveOptimized);
        assert_eq!(g[1].status, status::BY_STPG);
        assert_eq!(a.local_state(), AccessState::Standby);
    }

    #[test]
    fn stpg_list_parsing() {
        assert_eq!(parse_stpg(&[0, 0]), Err(sense::PARAM_LIST_LENGTH_ERROR));
        let l = [0, 0, 0, 0, 0x0f, 0, 0, 1];
        assert_eq!(parse_stpg(&l), Err(sense::invalid_param(4, Some(3))));
        let l = [0, 0, 0, 0, 0x02, 0, 0x01, 0x02, 0xaa];
        assert_eq!(
            parse_stpg(&l).unwrap(),
            vec![StpgRequest {
                group: 0x0102,
                state: AccessState::Standby
            }]
        );
    }

    #[test]
    fn standby_allows_only_the_spc_list() {
        let a = two_groups();
        a.handle().set_local_state(AccessState::Standby);
        let m = a.mode();
        assert_eq!(check(&a, m, &[0x12, 0, 0, 0, 36, 0]), Access::Serve);
        assert_eq!(
            check(&a, m, &[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
            Access::Serve
        );
        assert_eq!(check(&a, m, &[0x25; 10]), Access::Serve);
        assert_eq!(
            check(&a, m, &[0, 0, 0, 0, 0, 0]),
            Access::Refuse(sense::ALUA_STANDBY)
        );
        assert_eq!(
            check(&a, m, &[0x28; 10]),
            Access::Refuse(sense::ALUA_STANDBY)
        );
    }

    /// Two groups, the local one in `state`; asking for the lock counts
    /// the request and turns the local group Transitioning.
    fn local_in(state: AccessState) -> (SharedAlua, Arc<AtomicU8>) {
        let a = two_groups();
        a.handle().set_local_state(state);
        let calls = Arc::new(AtomicU8::new(0));
        let c2 = calls.clone();
        let h = a.handle();
        a.on_request_active(move || {
            c2.fetch_add(1, Ordering::SeqCst);
            h.set_local_state(AccessState::Transitioning);
        });
        (a, calls)
    }

    #[test]
    fn implicit_request_can_turn_standby_into_transitioning() {
        let (a, calls) = local_in(AccessState::Standby);
        let m = a.mode();
        // Neither TUR nor a read (udev's probe of a standby path) asks for
        // the lock: they get the standby sense. A write does.
        assert_eq!(check(&a, m, &[0; 6]), Access::Refuse(sense::ALUA_STANDBY));
        for read in [[0x28u8; 10], [0x2f; 10], [0x35; 10]] {
            assert_eq!(
                check(&a, m, &read),
                Access::Refuse(sense::ALUA_STANDBY),
                "{:#x}",
                read[0]
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "a read asked for the lock");
        assert_eq!(
            check(&a, m, &[0x2a; 10]),
            Access::Refuse(sense::ALUA_TRANSITIONING)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Transitioning still answers INQUIRY and RTPG, not READ CAPACITY.
        assert_eq!(check(&a, m, &[0x12, 0, 0, 0, 36, 0]), Access::Serve);
        assert_eq!(
            check(&a, m, &[0x25; 10]),
            Access::Refuse(sense::ALUA_TRANSITIONING)
        );
        // TUR sees a ghost (standby), not a dead path (see `check`).
        assert_eq!(check(&a, m, &[0; 6]), Access::Refuse(sense::ALUA_STANDBY));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A non-optimized port (implicit-only groups) serves reads without
    /// asking for the lock, and asks for it on a write.
    #[test]
    fn a_non_optimized_port_asks_for_the_lock_on_writes_only() {
        let (a, calls) = local_in(AccessState::ActiveNonOptimized);
        let m = a.mode();
        for read in [[0x28u8; 10], [0x2f; 10], [0x35; 10]] {
            assert_eq!(check(&a, m, &read), Access::Serve, "{:#x}", read[0]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "a read asked for the lock");
        assert_eq!(
            check(&a, m, &[0x2a; 10]),
            Access::Refuse(sense::ALUA_TRANSITIONING)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
