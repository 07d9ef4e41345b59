//! The generic-netlink socket, and the TCMU channel on it (family lookup,
//! group membership, reply support, receiving events, sending replies).

use super::tcmu::*;
use super::wire::*;
use nix::sys::socket::{
    bind, recvfrom, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

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

pub(crate) fn io(what: &'static str) -> impl FnOnce(nix::Error) -> NlError {
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
pub(crate) const RECV_BUF: usize = 64 * 1024;

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
