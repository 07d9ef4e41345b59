//! The kernel's TCMU generic-netlink channel (`TCM-USER` family, multicast
//! group `config`), encoded and decoded by hand.
//!
//! target_core_user announces device lifecycle events on the group:
//! `ADDED_DEVICE` when a backstore is enabled, `REMOVED_DEVICE` when it is
//! deleted, `RECONFIG_DEVICE` when `dev_config`, `dev_size` or
//! `emulate_write_cache` change on a live device. After a daemon sends
//! `SET_FEATURES` with `SUPP_KERN_CMD_REPLY=1`, the kernel blocks each of
//! those configfs operations until the daemon answers with the matching
//! `*_DONE` command carrying a status (0 or a negative errno) — so every
//! event that names a device id must get exactly one reply, even a
//! malformed one.
//!
//! Byte layouts (all integers in host byte order, as the kernel writes
//! them; everything 4-byte aligned):
//! - `struct nlmsghdr` (16 bytes): len u32, type u16, flags u16, seq u32,
//!   pid u32;
//! - `struct genlmsghdr` (4 bytes): cmd u8, version u8, reserved u16;
//! - `struct nlattr` (4 bytes): len u16 (header included, padding not),
//!   type u16 (top two bits are flags), then the payload padded to 4.
//!
//! Command and attribute numbers are those of `<linux/target_core_user.h>`;
//! the family's name, version and group are from the kernel's
//! drivers/target/target_core_user.c.

use nix::sys::socket::{
    bind, recvfrom, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

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

/// Netlink constants from `<linux/netlink.h>` and `<linux/genetlink.h>`.
mod nl {
    pub const NLMSG_HDRLEN: usize = 16;
    pub const GENL_HDRLEN: usize = 4;
    pub const NLA_HDRLEN: usize = 4;
    pub const NLMSG_NOOP: u16 = 1;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const NLMSG_OVERRUN: u16 = 4;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLA_TYPE_MASK: u16 = 0x3fff;
    pub const GENL_ID_CTRL: u16 = 0x10;
    pub const CTRL_CMD_NEWFAMILY: u8 = 1;
    pub const CTRL_CMD_GETFAMILY: u8 = 3;
    pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
    pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    pub const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
    pub const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
    pub const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
    pub const SOL_NETLINK: i32 = 270;
    pub const NETLINK_ADD_MEMBERSHIP: i32 = 1;
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than a header needs.
    #[error("{what}: {have} bytes, need {need}")]
    Short {
        /// Which structure.
        what: &'static str,
        /// Bytes available.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A length field points outside the buffer or below its header.
    #[error("{what}: length {len} invalid with {have} bytes left")]
    BadLength {
        /// Which structure.
        what: &'static str,
        /// The length field.
        len: usize,
        /// Bytes available.
        have: usize,
    },
    /// An attribute's payload has the wrong size for its type.
    #[error("attribute {attr}: payload of {len} bytes, expected {expected}")]
    AttrSize {
        /// Attribute type.
        attr: u16,
        /// Payload length.
        len: usize,
        /// Expected payload length.
        expected: usize,
    },
    /// A string attribute is not NUL-terminated UTF-8.
    #[error("attribute {attr}: not a NUL-terminated UTF-8 string")]
    BadString {
        /// Attribute type.
        attr: u16,
    },
    /// A required attribute is missing.
    #[error("attribute {attr} missing")]
    Missing {
        /// Attribute type.
        attr: u16,
    },
}

/// One netlink message inside a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlMsg<'a> {
    /// `nlmsg_type` (a family id, or NLMSG_ERROR/DONE/...).
    pub ty: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// `nlmsg_pid`.
    pub pid: u32,
    /// Bytes after the header, up to `nlmsg_len`.
    pub payload: &'a [u8],
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Splits a datagram into its netlink messages. Stops at the first bad
/// header (the rest of the datagram cannot be framed).
pub fn messages(mut buf: &[u8]) -> Vec<Result<NlMsg<'_>, ParseError>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < nl::NLMSG_HDRLEN {
            out.push(Err(ParseError::Short {
                what: "nlmsghdr",
                have: buf.len(),
                need: nl::NLMSG_HDRLEN,
            }));
            break;
        }
        let len = u32_at(buf, 0).unwrap_or(0) as usize;
        if len < nl::NLMSG_HDRLEN || len > buf.len() {
            out.push(Err(ParseError::BadLength {
                what: "nlmsghdr",
                len,
                have: buf.len(),
            }));
            break;
        }
        out.push(Ok(NlMsg {
            ty: u16_at(buf, 4).unwrap_or(0),
            flags: u16_at(buf, 6).unwrap_or(0),
            seq: u32_at(buf, 8).unwrap_or(0),
            pid: u32_at(buf, 12).unwrap_or(0),
            payload: &buf[nl::NLMSG_HDRLEN..len],
        }));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// Splits an attribute stream into `(type, payload)` pairs (type without
/// the NESTED/BYTEORDER flag bits).
pub fn attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, ParseError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < nl::NLA_HDRLEN {
            return Err(ParseError::Short {
                what: "nlattr",
                have: buf.len(),
                need: nl::NLA_HDRLEN,
            });
        }
        let len = usize::from(u16_at(buf, 0).unwrap_or(0));
        if len < nl::NLA_HDRLEN || len > buf.len() {
            return Err(ParseError::BadLength {
                what: "nlattr",
                len,
                have: buf.len(),
            });
        }
        let ty = u16_at(buf, 2).unwrap_or(0) & nl::NLA_TYPE_MASK;
        out.push((ty, &buf[nl::NLA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn get<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    // The kernel's nla_parse keeps the last occurrence; so do we.
    attrs.iter().rev().find(|(t, _)| *t == ty).map(|(_, p)| *p)
}

fn exact<const N: usize>(ty: u16, p: &[u8]) -> Result<[u8; N], ParseError> {
    p.try_into().map_err(|_| ParseError::AttrSize {
        attr: ty,
        len: p.len(),
        expected: N,
    })
}

fn attr_u8(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u8>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<1>(ty, p).map(|b| b[0]))
        .transpose()
}

fn attr_u16(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u16>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<2>(ty, p).map(u16::from_ne_bytes))
        .transpose()
}

fn attr_u32(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u32>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<4>(ty, p).map(u32::from_ne_bytes))
        .transpose()
}

fn attr_u64(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u64>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<8>(ty, p).map(u64::from_ne_bytes))
        .transpose()
}

fn attr_str(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<String>, ParseError> {
    let Some(p) = get(attrs, ty) else {
        return Ok(None);
    };
    // NLA_STRING: the kernel puts a NUL at the end; take what is before
    // the first NUL and insist there is one.
    let Some(end) = p.iter().position(|&b| b == 0) else {
        return Err(ParseError::BadString { attr: ty });
    };
    std::str::from_utf8(&p[..end])
        .map(|s| Some(s.to_string()))
        .map_err(|_| ParseError::BadString { attr: ty })
}

/// Builds one netlink message.
#[derive(Debug, Clone)]
pub struct MsgBuilder {
    buf: Vec<u8>,
}

impl MsgBuilder {
    /// A generic-netlink message for `family` with `cmd` and `version`.
    pub fn genl(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MsgBuilder { buf }
    }

    /// Appends an attribute with `payload`, padded to 4 bytes.
    pub fn attr(mut self, ty: u16, payload: &[u8]) -> Self {
        let len = nl::NLA_HDRLEN + payload.len();
        // Attributes here are a few bytes; a length past u16 is a bug.
        let len16 = u16::try_from(len).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Appends a NUL-terminated string attribute.
    pub fn attr_str(self, ty: u16, s: &str) -> Self {
        let mut p = Vec::with_capacity(s.len() + 1);
        p.extend_from_slice(s.as_bytes());
        p.push(0);
        self.attr(ty, &p)
    }

    /// The finished message with its length filled in.
    pub fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
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

/// The controller request resolving a family name.
pub fn getfamily_msg(name: &str, seq: u32) -> Vec<u8> {
    MsgBuilder::genl(
        nl::GENL_ID_CTRL,
        nl::NLM_F_REQUEST,
        seq,
        nl::CTRL_CMD_GETFAMILY,
        1,
    )
    .attr_str(nl::CTRL_ATTR_FAMILY_NAME, name)
    .finish()
}

/// A resolved generic-netlink family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// Its id (the `nlmsg_type` of its messages).
    pub id: u16,
    /// Its multicast groups: name and id.
    pub groups: Vec<(String, u32)>,
}

impl Family {
    /// The id of group `name`.
    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
}

/// Decodes the controller's `NEWFAMILY` answer (the genl payload).
pub fn parse_family(genl_payload: &[u8]) -> Result<Family, ParseError> {
    let body = genl_body(genl_payload)?;
    let a = attrs(body)?;
    let id = attr_u16(&a, nl::CTRL_ATTR_FAMILY_ID)?.ok_or(ParseError::Missing {
        attr: nl::CTRL_ATTR_FAMILY_ID,
    })?;
    let mut groups = Vec::new();
    if let Some(list) = get(&a, nl::CTRL_ATTR_MCAST_GROUPS) {
        // A nested array: each element is itself a nest of NAME and ID.
        for (_, grp) in attrs(list)? {
            let g = attrs(grp)?;
            let name = attr_str(&g, nl::CTRL_ATTR_MCAST_GRP_NAME)?.ok_or(ParseError::Missing {
                attr: nl::CTRL_ATTR_MCAST_GRP_NAME,
            })?;
            let gid = attr_u32(&g, nl::CTRL_ATTR_MCAST_GRP_ID)?.ok_or(ParseError::Missing {
                attr: nl::CTRL_ATTR_MCAST_GRP_ID,
            })?;
            groups.push((name, gid));
        }
    }
    Ok(Family { id, groups })
}

fn genl_body(genl_payload: &[u8]) -> Result<&[u8], ParseError> {
    genl_payload
        .get(nl::GENL_HDRLEN..)
        .ok_or(ParseError::Short {
            what: "genlmsghdr",
            have: genl_payload.len(),
            need: nl::GENL_HDRLEN,
        })
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

fn done_for(cmd_: u8) -> Option<u8> {
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

/// Decodes an NLMSG_ERROR payload: the errno (0 = ACK) and the sequence
/// number of the request it answers.
pub fn parse_error(payload: &[u8]) -> Result<(i32, u32), ParseError> {
    // struct nlmsgerr: int error; struct nlmsghdr msg (the request's header).
    let have = payload.len();
    let short = ParseError::Short {
        what: "nlmsgerr",
        have,
        need: 4 + nl::NLMSG_HDRLEN,
    };
    let err = u32_at(payload, 0).ok_or(short.clone())? as i32;
    let seq = u32_at(payload, 4 + 8).ok_or(short)?;
    Ok((err, seq))
}

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// A socket call failed.
    #[error("netlink {what}: {source}")]
    Io {
        /// Which call.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel answered with an error.
    #[error("netlink {what}: kernel said {}", std::io::Error::from_raw_os_error(-errno))]
    Kernel {
        /// Which request.
        what: &'static str,
        /// The negative errno.
        errno: i32,
    },
    /// The answer could not be decoded.
    #[error("netlink {what}: {source}")]
    Parse {
        /// Which request.
        what: &'static str,
        /// Why.
        source: ParseError,
    },
    /// No answer in time.
    #[error("netlink {0}: no answer from the kernel")]
    Timeout(&'static str),
    /// The family or group is not registered (module not loaded).
    #[error("generic netlink family {0:?} (or its group) is not registered")]
    NoFamily(String),
}

fn io(what: &'static str) -> impl FnOnce(nix::Error) -> NlError {
    move |e| NlError::Io {
        what,
        source: e.into(),
    }
}

/// A generic-netlink socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    /// Datagrams read while waiting for an answer that were not the
    /// answer (events): handed out by the next [`recv`](Self::recv).
    held: std::collections::VecDeque<Vec<u8>>,
}

/// Receive buffer size; kernel messages here are far below a page.
const RECV_BUF: usize = 64 * 1024;

impl GenlSocket {
    /// Opens and binds a non-blocking NETLINK_GENERIC socket.
    pub fn open() -> Result<Self, NlError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(io("socket"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(io("bind"))?;
        Ok(GenlSocket {
            fd,
            seq: 1,
            held: Default::default(),
        })
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one message to the kernel.
    pub fn send(&self, msg: &[u8]) -> Result<(), NlError> {
        sendto(
            self.fd.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(io("send"))?;
        Ok(())
    }

    /// Reads one datagram: `Ok(None)` when nothing is pending. Datagrams
    /// not from the kernel (port id 0) are dropped.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, NlError> {
        if let Some(d) = self.held.pop_front() {
            return Ok(Some(d));
        }
        self.recv_raw()
    }

    fn recv_raw(&mut self) -> Result<Option<Vec<u8>>, NlError> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            match recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut buf) {
                Ok((n, from)) => {
                    if from.is_some_and(|a| a.pid() != 0) {
                        tracing::warn!(
                            pid = from.map(|a| a.pid()),
                            "netlink datagram not from the kernel dropped"
                        );
                        continue;
                    }
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io("recv")(e)),
            }
        }
    }

    /// Sends `msg` (built with `seq`) and waits for the kernel's answer
    /// to it: an NLMSG_ERROR (0 = ACK) or a message of type `want`.
    /// Anything else read meanwhile is held for [`recv`](Self::recv).
    fn transact(
        &mut self,
        what: &'static str,
        msg: &[u8],
        seq: u32,
        want: Option<u16>,
    ) -> Result<Option<Vec<u8>>, NlError> {
        self.send(msg)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(NlError::Timeout(what));
            }
            let left = deadline - now;
            let mut fds = [nix::poll::PollFd::new(
                self.fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io("poll")(e)),
            }
            let Some(d) = self.recv_raw()? else { continue };
            let mut answer = None;
            for m in messages(&d) {
                let m = m.map_err(|source| NlError::Parse { what, source })?;
                if m.seq != seq {
                    continue;
                }
                if m.ty == nl::NLMSG_ERROR {
                    let (err, _) =
                        parse_error(m.payload).map_err(|source| NlError::Parse { what, source })?;
                    if err != 0 {
                        return Err(NlError::Kernel { what, errno: err });
                    }
                    answer = Some(None);
                } else if Some(m.ty) == want {
                    answer = Some(Some(m.payload.to_vec()));
                }
            }
            match answer {
                Some(a) => return Ok(a),
                None => self.held.push_back(d),
            }
        }
    }

    /// Resolves a family by name through the controller.
    pub fn resolve(&mut self, name: &str) -> Result<Family, NlError> {
        let seq = self.next_seq();
        let msg = getfamily_msg(name, seq);
        match self.transact("CTRL_CMD_GETFAMILY", &msg, seq, Some(nl::GENL_ID_CTRL)) {
            Ok(Some(p)) => {
                if p.first() != Some(&nl::CTRL_CMD_NEWFAMILY) {
                    return Err(NlError::Parse {
                        what: "CTRL_CMD_GETFAMILY",
                        source: ParseError::Missing {
                            attr: nl::CTRL_ATTR_FAMILY_ID,
                        },
                    });
                }
                parse_family(&p).map_err(|source| NlError::Parse {
                    what: "CTRL_CMD_GETFAMILY",
                    source,
                })
            }
            Ok(None) => Err(NlError::NoFamily(name.to_string())),
            Err(NlError::Kernel { errno, .. }) if errno == -libc::ENOENT => {
                Err(NlError::NoFamily(name.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Joins multicast group `group`.
    pub fn join(&self, group: u32) -> Result<(), NlError> {
        // nix has no wrapper for NETLINK_ADD_MEMBERSHIP.
        // SAFETY: the fd is a valid open socket and the option value is a
        // u32 that outlives the call, with its exact size passed.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                nl::SOL_NETLINK,
                nl::NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(NlError::Io {
                what: "NETLINK_ADD_MEMBERSHIP",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
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

/// The TCMU channel: subscribed to `config`, replies enabled.
pub struct TcmuChannel {
    sock: GenlSocket,
    family: u16,
}

impl TcmuChannel {
    /// Resolves the family, joins its `config` group and tells the kernel
    /// that this daemon replies. [`NlError::NoFamily`] when
    /// target_core_user is not loaded.
    pub fn open() -> Result<Self, NlError> {
        let mut sock = GenlSocket::open()?;
        let fam = sock.resolve(FAMILY_NAME)?;
        let group = fam
            .group(CONFIG_GROUP)
            .ok_or_else(|| NlError::NoFamily(format!("{FAMILY_NAME}/{CONFIG_GROUP}")))?;
        // Join before announcing replies, so no event that waits for a
        // reply can be missed.
        sock.join(group)?;
        let mut ch = TcmuChannel {
            sock,
            family: fam.id,
        };
        ch.set_reply_support(true)?;
        Ok(ch)
    }

    /// Tells the kernel whether to wait for replies to its events (the
    /// setting is global to the module: turned off when the daemon
    /// stops, so that devices created meanwhile do not hang).
    pub fn set_reply_support(&mut self, on: bool) -> Result<(), NlError> {
        let seq = self.sock.next_seq();
        let msg = set_features_msg(self.family, seq, on);
        match self.sock.transact("TCMU_CMD_SET_FEATURES", &msg, seq, None) {
            Ok(_) => Ok(()),
            // An older kernel without the command: events come without
            // waiting for replies.
            Err(NlError::Kernel { errno, .. }) if errno == -libc::EOPNOTSUPP => {
                tracing::warn!("kernel does not support TCMU reply negotiation");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The fd to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.fd()
    }

    /// The family id.
    pub fn family(&self) -> u16 {
        self.family
    }

    /// Everything pending, decoded. An `Err` means the socket failed
    /// (ENOBUFS: events were lost, the caller should rescan).
    pub fn poll_events(&mut self) -> Result<Vec<Incoming>, NlError> {
        let mut out = Vec::new();
        while let Some(d) = self.sock.recv()? {
            decode_datagram(&d, self.family, &mut out);
        }
        Ok(out)
    }

    /// Answers an event: `status` 0 or a negative errno.
    pub fn reply(&mut self, done_cmd: u8, device_id: u32, status: i32) -> Result<(), NlError> {
        let seq = self.sock.next_seq();
        self.sock
            .send(&reply_msg(self.family, seq, done_cmd, device_id, status))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's ADDED_DEVICE for `tcm-user/1/disk0/file//tmp/x`, minor
    /// 3, device index 7, family id 0x1a, laid out byte by byte as
    /// genlmsg_put + nla_put_string + nla_put_u32 x2 produce it.
    fn added_bytes() -> Vec<u8> {
        let name = b"tcm-user/1/disk0/file//tmp/x\0"; // 29 bytes
        let mut v = Vec::new();
        let total: u32 = 16 + 4 + (4 + 32) + 8 + 8;
        v.extend_from_slice(&total.to_ne_bytes());
        v.extend_from_slice(&0x1au16.to_ne_bytes()); // type = family id
        v.extend_from_slice(&0u16.to_ne_bytes()); // flags
        v.extend_from_slice(&0u32.to_ne_bytes()); // seq
        v.extend_from_slice(&0u32.to_ne_bytes()); // pid: kernel
        v.extend_from_slice(&[1, 2, 0, 0]); // cmd ADDED_DEVICE, version 2
        v.extend_from_slice(&(4u16 + 29).to_ne_bytes()); // nla_len excludes padding
        v.extend_from_slice(&1u16.to_ne_bytes()); // TCMU_ATTR_DEVICE
        v.extend_from_slice(name);
        v.extend_from_slice(&[0, 0, 0]); // pad to 4
        v.extend_from_slice(&8u16.to_ne_bytes());
        v.extend_from_slice(&2u16.to_ne_bytes()); // TCMU_ATTR_MINOR
        v.extend_from_slice(&3u32.to_ne_bytes());
        v.extend_from_slice(&8u16.to_ne_bytes());
        v.extend_from_slice(&8u16.to_ne_bytes()); // TCMU_ATTR_DEVICE_ID
        v.extend_from_slice(&7u32.to_ne_bytes());
        assert_eq!(v.len(), total as usize);
        v
    }

    #[test]
    fn header_constants_match_the_kernel_header() {
        // Checked against /usr/include/linux/target_core_user.h when it
        // is installed, else against the values copied from it.
        let want_cmds = [
            ("TCMU_CMD_ADDED_DEVICE", cmd::ADDED_DEVICE),
            ("TCMU_CMD_REMOVED_DEVICE", cmd::REMOVED_DEVICE),
            ("TCMU_CMD_RECONFIG_DEVICE", cmd::RECONFIG_DEVICE),
            ("TCMU_CMD_ADDED_DEVICE_DONE", cmd::ADDED_DEVICE_DONE),
            ("TCMU_CMD_REMOVED_DEVICE_DONE", cmd::REMOVED_DEVICE_DONE),
            ("TCMU_CMD_RECONFIG_DEVICE_DONE", cmd::RECONFIG_DEVICE_DONE),
            ("TCMU_CMD_SET_FEATURES", cmd::SET_FEATURES),
        ];
        let want_attrs = [
            ("TCMU_ATTR_DEVICE", attr::DEVICE),
            ("TCMU_ATTR_MINOR", attr::MINOR),
            ("TCMU_ATTR_PAD", attr::PAD),
            ("TCMU_ATTR_DEV_CFG", attr::DEV_CFG),
            ("TCMU_ATTR_DEV_SIZE", attr::DEV_SIZE),
            ("TCMU_ATTR_WRITECACHE", attr::WRITECACHE),
            ("TCMU_ATTR_CMD_STATUS", attr::CMD_STATUS),
            ("TCMU_ATTR_DEVICE_ID", attr::DEVICE_ID),
            ("TCMU_ATTR_SUPP_KERN_CMD_REPLY", attr::SUPP_KERN_CMD_REPLY),
        ];
        let Ok(h) = std::fs::read_to_string("/usr/include/linux/target_core_user.h") else {
            eprintln!(
                "SKIPPED: /usr/include/linux/target_core_user.h missing (install linux-libc-dev)"
            );
            return;
        };
        // Enumerators are implicit: their value is their position.
        let enum_body = |name: &str| -> Vec<String> {
            let start = h.find(&format!("enum {name} {{")).expect("enum in header");
            let body = &h[start..];
            let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
            body.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let cmds = enum_body("tcmu_genl_cmd");
        for (n, v) in want_cmds {
            assert_eq!(
                cmds.iter().position(|c| c == n),
                Some(usize::from(v)),
                "{n}"
            );
        }
        let attrs_ = enum_body("tcmu_genl_attr");
        for (n, v) in want_attrs {
            assert_eq!(
                attrs_.iter().position(|c| c == n),
                Some(usize::from(v)),
                "{n}"
            );
        }
    }

    #[test]
    fn decodes_added_device() {
        let d = added_bytes();
        let mut out = Vec::new();
        decode_datagram(&d, 0x1a, &mut out);
        assert_eq!(out.len(), 1);
        let Incoming::Event(ev) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(ev.kind, EventKind::Added);
        assert_eq!(ev.device, "tcm-user/1/disk0/file//tmp/x");
        assert_eq!(ev.minor, 3);
        assert_eq!(ev.device_id, Some(7));
        assert_eq!(ev.reply_to(), Some((cmd::ADDED_DEVICE_DONE, 7)));
        // Another family's message in the same group is not ours.
        let mut out = Vec::new();
        decode_datagram(&d, 0x1b, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn decodes_reconfig_variants() {
        let base = |b: MsgBuilder| {
            b.attr_str(attr::DEVICE, "tcm-user/0/d/ram/x")
                .attr(attr::MINOR, &0u32.to_ne_bytes())
                .attr(attr::DEVICE_ID, &5u32.to_ne_bytes())
        };
        let m = base(MsgBuilder::genl(30, 0, 0, cmd::RECONFIG_DEVICE, 2))
            // On strict-alignment machines the kernel pads before u64s.
            .attr(attr::PAD, &[])
            .attr(attr::DEV_SIZE, &(3u64 << 30).to_ne_bytes())
            .finish();
        let msgs = messages(&m);
        let ev = parse_event(msgs[0].as_ref().unwrap().payload)
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind, EventKind::ReconfigSize(3 << 30));
        assert_eq!(ev.reply_to(), Some((cmd::RECONFIG_DEVICE_DONE, 5)));

        let m = base(MsgBuilder::genl(30, 0, 0, cmd::RECONFIG_DEVICE, 2))
            .attr_str(attr::DEV_CFG, "file//new/path\n")
            .finish();
        let ev = parse_event(messages(&m)[0].as_ref().unwrap().payload)
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind, EventKind::ReconfigCfg("file//new/path\n".into()));

        let m = base(MsgBuilder::genl(30, 0, 0, cmd::RECONFIG_DEVICE, 2))
            .attr(attr::WRITECACHE, &[1])
            .finish();
        let ev = parse_event(messages(&m)[0].as_ref().unwrap().payload)
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind, EventKind::ReconfigWriteCache(true));
    }

    #[test]
    fn reply_layout_is_what_the_kernel_parses() {
        let m = reply_msg(0x1a, 9, cmd::REMOVED_DEVICE_DONE, 7, -libc::ENOENT);
        let mut want = Vec::new();
        want.extend_from_slice(&36u32.to_ne_bytes()); // 16 + 4 + 8 + 8
        want.extend_from_slice(&0x1au16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
        want.extend_from_slice(&9u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[5, 2, 0, 0]); // REMOVED_DEVICE_DONE, v2
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&7u16.to_ne_bytes()); // TCMU_ATTR_CMD_STATUS
        want.extend_from_slice(&(-2i32).to_ne_bytes());
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&8u16.to_ne_bytes()); // TCMU_ATTR_DEVICE_ID
        want.extend_from_slice(&7u32.to_ne_bytes());
        assert_eq!(m, want);

        let f = set_features_msg(0x1a, 2, true);
        assert_eq!(f.len(), 16 + 4 + 8);
        assert_eq!(u16::from_ne_bytes([f[6], f[7]]), 0x5); // REQUEST | ACK
        assert_eq!(&f[16..20], &[7, 2, 0, 0]);
        // nla_put_u8: len 5 (header + 1), type 9, payload 1, padded to 8.
        let mut want = Vec::new();
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&9u16.to_ne_bytes());
        want.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(&f[20..28], &want[..]);
    }

    #[test]
    fn getfamily_and_newfamily() {
        let m = getfamily_msg("TCM-USER", 4);
        // 16 + 4 + nla(4 + 9 -> padded 16)
        assert_eq!(m.len(), 36);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x10);
        assert_eq!(&m[16..18], &[3, 1]);
        assert_eq!(&m[24..33], b"TCM-USER\0");

        // The controller's answer: FAMILY_ID u16, FAMILY_NAME, and
        // MCAST_GROUPS = nest { nest#1 { GRP_NAME "config", GRP_ID 9 } }.
        let grp = MsgBuilder { buf: Vec::new() }
            .attr_str(nl::CTRL_ATTR_MCAST_GRP_NAME, "config")
            .attr(nl::CTRL_ATTR_MCAST_GRP_ID, &9u32.to_ne_bytes())
            .buf;
        let list = MsgBuilder { buf: Vec::new() }.attr(1 | 0x8000, &grp).buf;
        let ans = MsgBuilder::genl(0x10, 0, 4, nl::CTRL_CMD_NEWFAMILY, 2)
            .attr(nl::CTRL_ATTR_FAMILY_ID, &0x1au16.to_ne_bytes())
            .attr_str(nl::CTRL_ATTR_FAMILY_NAME, "TCM-USER")
            .attr(nl::CTRL_ATTR_MCAST_GROUPS | 0x8000, &list)
            .finish();
        let msgs = messages(&ans);
        let fam = parse_family(msgs[0].as_ref().unwrap().payload).unwrap();
        assert_eq!(fam.id, 0x1a);
        assert_eq!(fam.group("config"), Some(9));
        assert_eq!(fam.group("other"), None);
    }

    #[test]
    fn error_messages() {
        // nlmsgerr { error = -ENOENT, msg = the request's header (seq 4) }
        let mut p = Vec::new();
        p.extend_from_slice(&(-2i32).to_ne_bytes());
        p.extend_from_slice(&getfamily_msg("X", 4)[..16]);
        assert_eq!(parse_error(&p), Ok((-2, 4)));
        assert!(parse_error(&p[..10]).is_err());
    }

    #[test]
    fn truncated_and_corrupt_input_never_panics_and_is_reported() {
        let d = added_bytes();
        // Every truncation: either nothing decoded or an error, no panic.
        for n in 0..d.len() {
            let mut out = Vec::new();
            decode_datagram(&d[..n], 0x1a, &mut out);
            assert!(
                !out.iter().any(|i| matches!(i, Incoming::Event(_))),
                "truncated to {n} still decoded an event"
            );
        }
        // Every single-byte corruption: no panic.
        for i in 0..d.len() {
            for v in [0u8, 0xff, 0x7f] {
                let mut c = d.clone();
                c[i] = v;
                let mut out = Vec::new();
                decode_datagram(&c, 0x1a, &mut out);
            }
        }
        // An attribute length running past the message.
        let mut c = d.clone();
        c[20] = 200;
        let msgs = messages(&c);
        let e = parse_event(msgs[0].as_ref().unwrap().payload).unwrap_err();
        assert!(matches!(e.error, ParseError::BadLength { .. }), "{e:?}");
        assert_eq!(e.reply, None);
    }

    #[test]
    fn malformed_event_with_device_id_gets_an_error_reply() {
        // MINOR has a 2-byte payload: broken, but DEVICE_ID is readable.
        let m = MsgBuilder::genl(30, 0, 0, cmd::ADDED_DEVICE, 2)
            .attr(attr::DEVICE_ID, &11u32.to_ne_bytes())
            .attr_str(attr::DEVICE, "tcm-user/0/d/ram/x")
            .attr(attr::MINOR, &[0, 0])
            .finish();
        let e = parse_event(messages(&m)[0].as_ref().unwrap().payload).unwrap_err();
        assert_eq!(e.reply, Some((cmd::ADDED_DEVICE_DONE, 11)));
        assert_eq!(
            e.error,
            ParseError::AttrSize {
                attr: attr::MINOR,
                len: 2,
                expected: 4
            }
        );
        // A string without its NUL.
        let m = MsgBuilder::genl(30, 0, 0, cmd::REMOVED_DEVICE, 2)
            .attr(attr::DEVICE_ID, &11u32.to_ne_bytes())
            .attr(attr::DEVICE, b"abc")
            .attr(attr::MINOR, &0u32.to_ne_bytes())
            .finish();
        let e = parse_event(messages(&m)[0].as_ref().unwrap().payload).unwrap_err();
        assert_eq!(e.error, ParseError::BadString { attr: attr::DEVICE });
        assert_eq!(e.reply, Some((cmd::REMOVED_DEVICE_DONE, 11)));
        // Version 1 events expect no reply.
        let m = MsgBuilder::genl(30, 0, 0, cmd::ADDED_DEVICE, 1)
            .attr_str(attr::DEVICE, "tcm-user/0/d/ram/x")
            .attr(attr::MINOR, &0u32.to_ne_bytes())
            .finish();
        let ev = parse_event(messages(&m)[0].as_ref().unwrap().payload)
            .unwrap()
            .unwrap();
        assert_eq!(ev.reply_to(), None);
        // Commands we send, echoed back, are not events.
        let m = reply_msg(30, 1, cmd::ADDED_DEVICE_DONE, 1, 0);
        assert_eq!(
            parse_event(messages(&m)[0].as_ref().unwrap().payload),
            Ok(None)
        );
    }

    #[test]
    fn two_messages_in_one_datagram() {
        let mut d = added_bytes();
        d.extend_from_slice(&added_bytes());
        let mut out = Vec::new();
        decode_datagram(&d, 0x1a, &mut out);
        assert_eq!(out.len(), 2);
    }
}
