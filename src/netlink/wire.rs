//! Netlink and generic-netlink framing: headers, attributes, message
//! building, and the controller's family lookup.

/// Netlink constants from `<linux/netlink.h>` and `<linux/genetlink.h>`.
pub(crate) mod nl {
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

pub(crate) fn align4(n: usize) -> usize {
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

pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
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

pub(crate) fn get<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    // The kernel's nla_parse keeps the last occurrence; so do we.
    attrs.iter().rev().find(|(t, _)| *t == ty).map(|(_, p)| *p)
}

pub(crate) fn exact<const N: usize>(ty: u16, p: &[u8]) -> Result<[u8; N], ParseError> {
    p.try_into().map_err(|_| ParseError::AttrSize {
        attr: ty,
        len: p.len(),
        expected: N,
    })
}

pub(crate) fn attr_u8(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u8>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<1>(ty, p).map(|b| b[0]))
        .transpose()
}

pub(crate) fn attr_u16(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u16>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<2>(ty, p).map(u16::from_ne_bytes))
        .transpose()
}

pub(crate) fn attr_u32(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u32>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<4>(ty, p).map(u32::from_ne_bytes))
        .transpose()
}

pub(crate) fn attr_u64(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<u64>, ParseError> {
    get(attrs, ty)
        .map(|p| exact::<8>(ty, p).map(u64::from_ne_bytes))
        .transpose()
}

pub(crate) fn attr_str(attrs: &[(u16, &[u8])], ty: u16) -> Result<Option<String>, ParseError> {
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
    pub(crate) buf: Vec<u8>,
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

pub(crate) fn genl_body(genl_payload: &[u8]) -> Result<&[u8], ParseError> {
    genl_payload
        .get(nl::GENL_HDRLEN..)
        .ok_or(ParseError::Short {
            what: "genlmsghdr",
            have: genl_payload.len(),
            need: nl::GENL_HDRLEN,
        })
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
