//! The TCMU family: its commands, attributes and device events, and the
//! replies the kernel waits for.

use super::wire::*;

/// The family name the kernel registers (`tcmu_genl_family.name`).
pub const FAMILY_NAME: &str = "TCM-USER";
/// The multicast group device events go to.
pub const CONFIG_GROUP: &str = "config";
/// Version of the family's protocol this daemon speaks (`.version = 2`:
/// events carry `DEVICE_ID` and expect replies).
pub const TCMU_NL_VERSION: u8 = 2;

/// `enum tcmu_genl_cmd`.
pub mod cmd {
    /// Unused.
    pub const UNSPEC: u8 = 0;
    /// A device was enabled (kernel → daemon).
    pub const ADDED_DEVICE: u8 = 1;
    /// A device is being deleted (kernel → daemon).
    pub const REMOVED_DEVICE: u8 = 2;
    /// A live device's configuration changes (kernel → daemon).
    pub const RECONFIG_DEVICE: u8 = 3;
    /// Reply to `ADDED_DEVICE` (daemon → kernel).
    pub const ADDED_DEVICE_DONE: u8 = 4;
    /// Reply to `REMOVED_DEVICE` (daemon → kernel).
    pub const REMOVED_DEVICE_DONE: u8 = 5;
    /// Reply to `RECONFIG_DEVICE` (daemon → kernel).
    pub const RECONFIG_DEVICE_DONE: u8 = 6;
    /// Daemon → kernel: what the daemon supports.
    pub const SET_FEATURES: u8 = 7;
}

/// `enum tcmu_genl_attr`.
pub mod attr {
    /// Unused.
    pub const UNSPEC: u16 = 0;
    /// NUL-terminated UIO name `tcm-user/<hba>/<dev>/<subtype>/<cfg>`.
    pub const DEVICE: u16 = 1;
    /// u32: UIO minor (`/dev/uio<minor>`).
    pub const MINOR: u16 = 2;
    /// Padding before a 64-bit attribute on strict-alignment machines.
    pub const PAD: u16 = 3;
    /// NUL-terminated new `dev_config` (`<subtype>/<cfgstring>`).
    pub const DEV_CFG: u16 = 4;
    /// u64: new device size in bytes.
    pub const DEV_SIZE: u16 = 5;
    /// u8: new `emulate_write_cache`.
    pub const WRITECACHE: u16 = 6;
    /// s32: reply status (0 or -errno).
    pub const CMD_STATUS: u16 = 7;
    /// u32: the LIO device index the reply refers to.
    pub const DEVICE_ID: u16 = 8;
    /// u8: the daemon replies to events.
    pub const SUPP_KERN_CMD_REPLY: u16 = 9;
}

/// The `SET_FEATURES` request: whether this daemon replies to events.
pub fn set_features_msg(family: u16, seq: u32, replies: bool) -> Vec<u8> {
    MsgBuilder::genl(
        family,
        nl::NLM_F_REQUEST | nl::NLM_F_ACK,
        seq,
        cmd::SET_FEATURES,
        TCMU_NL_VERSION,
    )
    .attr(attr::SUPP_KERN_CMD_REPLY, &[u8::from(replies)])
    .finish()
}

/// A `*_DONE` reply: `status` is 0 or a negative errno.
pub fn reply_msg(family: u16, seq: u32, done_cmd: u8, device_id: u32, status: i32) -> Vec<u8> {
    MsgBuilder::genl(family, nl::NLM_F_REQUEST, seq, done_cmd, TCMU_NL_VERSION)
        .attr(attr::CMD_STATUS, &status.to_ne_bytes())
        .attr(attr::DEVICE_ID, &device_id.to_ne_bytes())
        .finish()
}

/// What the kernel asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A device was enabled.
    Added,
    /// A device is being removed.
    Removed,
    /// A new `dev_config` (`<subtype>/<cfgstring>`, as written).
    ReconfigCfg(String),
    /// A new size in bytes.
    ReconfigSize(u64),
    /// A new `emulate_write_cache`.
    ReconfigWriteCache(bool),
}

/// One kernel event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The genl header's version (replies are expected from version 2 on).
    pub version: u8,
    /// The UIO name `tcm-user/<hba>/<dev>/<subtype>/<cfg>`.
    pub device: String,
    /// The UIO minor.
    pub minor: u32,
    /// The LIO device index (version 2).
    pub device_id: Option<u32>,
}

impl Event {
    /// The reply command and device id, when the kernel waits for one.
    pub fn reply_to(&self) -> Option<(u8, u32)> {
        let done = match self.kind {
            EventKind::Added => cmd::ADDED_DEVICE_DONE,
            EventKind::Removed => cmd::REMOVED_DEVICE_DONE,
            _ => cmd::RECONFIG_DEVICE_DONE,
        };
        (self.version > 1).then_some(done).zip(self.device_id)
    }
}

/// An event that could not be decoded. When its command and device id
/// could be read, the kernel still waits for an answer: `reply` says
/// which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed TCMU event (cmd {cmd:?}): {error}")]
pub struct BadEvent {
    /// The genl command, if the header was readable.
    pub cmd: Option<u8>,
    /// `(done command, device id)` to reply with an error, if known.
    pub reply: Option<(u8, u32)>,
    /// What was wrong.
    pub error: ParseError,
}

pub(crate) fn done_for(cmd_: u8) -> Option<u8> {
    match cmd_ {
        cmd::ADDED_DEVICE => Some(cmd::ADDED_DEVICE_DONE),
        cmd::REMOVED_DEVICE => Some(cmd::REMOVED_DEVICE_DONE),
        cmd::RECONFIG_DEVICE => Some(cmd::RECONFIG_DEVICE_DONE),
        _ => None,
    }
}

/// Decodes a TCMU event from a genl payload (genl header + attributes).
/// `Ok(None)`: a command this daemon does not handle (not an event).
pub fn parse_event(genl_payload: &[u8]) -> Result<Option<Event>, BadEvent> {
    let bad = |cmd, reply, error| BadEvent { cmd, reply, error };
    let (Some(&c), Some(&version)) = (genl_payload.first(), genl_payload.get(1)) else {
        return Err(bad(
            None,
            None,
            ParseError::Short {
                what: "genlmsghdr",
                have: genl_payload.len(),
                need: nl::GENL_HDRLEN,
            },
        ));
    };
    let Some(done) = done_for(c) else {
        return Ok(None);
    };
    let body = genl_body(genl_payload).map_err(|e| bad(Some(c), None, e))?;
    let a = attrs(body).map_err(|e| bad(Some(c), None, e))?;
    // The device id first: with it, even a broken event can be answered.
    let device_id = attr_u32(&a, attr::DEVICE_ID).map_err(|e| bad(Some(c), None, e))?;
    let reply = (version > 1).then_some(done).zip(device_id);
    let fail = |e| bad(Some(c), reply, e);
    if version > 1 && device_id.is_none() {
        return Err(fail(ParseError::Missing {
            attr: attr::DEVICE_ID,
        }));
    }
    let device = attr_str(&a, attr::DEVICE)
        .map_err(fail)?
        .ok_or(ParseError::Missing { attr: attr::DEVICE })
        .map_err(fail)?;
    let minor = attr_u32(&a, attr::MINOR)
        .map_err(fail)?
        .ok_or(ParseError::Missing { attr: attr::MINOR })
        .map_err(fail)?;
    let kind = match c {
        cmd::ADDED_DEVICE => EventKind::Added,
        cmd::REMOVED_DEVICE => EventKind::Removed,
        _ => {
            // The kernel sends exactly one of these per reconfiguration.
            if let Some(cfg) = attr_str(&a, attr::DEV_CFG).map_err(fail)? {
                EventKind::ReconfigCfg(cfg)
            } else if let Some(size) = attr_u64(&a, attr::DEV_SIZE).map_err(fail)? {
                EventKind::ReconfigSize(size)
            } else if let Some(wc) = attr_u8(&a, attr::WRITECACHE).map_err(fail)? {
                EventKind::ReconfigWriteCache(wc != 0)
            } else {
                return Err(fail(ParseError::Missing {
                    attr: attr::DEV_CFG,
                }));
            }
        }
    };
    Ok(Some(Event {
        kind,
        version,
        device,
        minor,
        device_id,
    }))
}

/// What one datagram from the channel held.
#[derive(Debug)]
pub enum Incoming {
    /// A device event.
    Event(Event),
    /// A malformed event (reply with an error if `reply` is set).
    Bad(BadEvent),
    /// The kernel refused one of our replies (errno, sequence number).
    ReplyRefused(i32, u32),
}

/// Decodes one datagram read from the TCMU channel into `out`; messages
/// of other families and control messages are skipped, malformed ones
/// logged.
pub fn decode_datagram(d: &[u8], family: u16, out: &mut Vec<Incoming>) {
    for m in messages(d) {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "malformed netlink datagram ignored");
                break;
            }
        };
        match m.ty {
            nl::NLMSG_ERROR => match parse_error(m.payload) {
                Ok((0, _)) => {}
                Ok((err, seq)) => out.push(Incoming::ReplyRefused(err, seq)),
                Err(e) => tracing::warn!(error = %e, "malformed netlink error ignored"),
            },
            nl::NLMSG_NOOP | nl::NLMSG_DONE | nl::NLMSG_OVERRUN => {}
            t if t == family => match parse_event(m.payload) {
                Ok(Some(ev)) => out.push(Incoming::Event(ev)),
                Ok(None) => {}
                Err(b) => out.push(Incoming::Bad(b)),
            },
            _ => {}
        }
    }
}
