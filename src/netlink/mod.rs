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
//!
//! The code is in three parts: [`wire`] (netlink and generic-netlink
//! framing and attributes, the controller's family lookup), [`tcmu`] (the
//! TCMU family's commands, attributes and events) and [`socket`] (the
//! socket and the TCMU channel on it).

pub mod socket;
pub mod tcmu;
pub mod wire;

pub use socket::*;
pub use tcmu::*;
pub use wire::*;

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
