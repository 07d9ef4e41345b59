//! The daemon's handling of the kernel's device events, applied to a
//! device served through the emulated kernel: online resize, reopen with
//! a new config string, a reopen that fails (the device refuses I/O with
//! sense, the daemon carries on, a later good reopen recovers it), write
//! cache, removal. The same handlers the netlink loop calls.

mod common;

use common::run_cmd as io;
use common::*;
use std::path::PathBuf;
use std::sync::Arc;
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd::control::{Control, DevState};
use tcmu_rbd::netlink::{Event, EventKind};
use tcmu_rbd::registry::{DeviceSpec, Registry};
use tcmu_rbd_testkit::emulator::{Data, KernelEmu};

const MIB: u64 = 1 << 20;

fn event(kind: EventKind) -> Event {
    Event {
        kind,
        version: 2,
        device: "tcm-user/1/test/ram/first".into(),
        minor: 0,
        device_id: Some(1),
    }
}

fn served() -> (KernelEmu, Control) {
    served_with(None)
}

fn served_with(configfs_dir: Option<PathBuf>) -> (KernelEmu, Control) {
    let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(MIB, 512).unwrap());
    let (emu, dev) = emu_device(small_layout(), ram);
    let t = std::env::temp_dir();
    let ctl = Control::new(Arc::new(Registry::new()), &t, &t);
    let st = ctl.adopt(
        DeviceSpec {
            name: "test".into(),
            uio_path: PathBuf::from("/dev/null"),
            map_size: 0,
            subtype: "ram".into(),
            cfgstring: "first".into(),
            configfs_dir,
            size: Some(MIB),
        },
        dev,
    );
    assert_eq!(st, 0);
    (emu, ctl)
}

#[test]
fn resize_reopen_failed_reopen_recovery_and_removal() {
    let (mut emu, ctl) = served();
    let pattern = vec![0xa5u8; 512];

    // Online resize: block 2048 (past 1 MiB) becomes readable.
    assert_eq!(
        io(&mut emu, &rw16(false, 2048, 1), Data::FromDevice(512)).0,
        2
    );
    assert_eq!(ctl.handle(&event(EventKind::ReconfigSize(2 * MIB))), 0);
    let (st, _, _) = io(&mut emu, &rw16(true, 2048, 1), Data::ToDevice(&pattern));
    assert_eq!(st, 0);
    let (st, _, data) = io(&mut emu, &rw16(false, 2048, 1), Data::FromDevice(512));
    assert_eq!((st, &data[..]), (0, &pattern[..]));
    assert!(
        ctl.status_lines()[0].contains("size=2097152"),
        "{:?}",
        ctl.status_lines()
    );

    // Write cache: the ram backend reports none; asking for one is refused.
    assert_eq!(ctl.handle(&event(EventKind::ReconfigWriteCache(false))), 0);
    assert_eq!(
        ctl.handle(&event(EventKind::ReconfigWriteCache(true))),
        -libc::EOPNOTSUPP
    );

    // Reopen with a new config: a fresh ram backend, so the data is gone
    // and the size is kept.
    assert_eq!(
        ctl.handle(&event(EventKind::ReconfigCfg("ram/second\n".into()))),
        0
    );
    let (st, _, data) = io(&mut emu, &rw16(false, 2048, 1), Data::FromDevice(512));
    assert_eq!(st, 0);
    assert!(data.iter().all(|&b| b == 0), "old backend still answering");
    assert!(ctl.status_lines()[0].contains("config=\"ram/second\""));

    // A handler change is refused outright; nothing changes.
    assert_eq!(
        ctl.handle(&event(EventKind::ReconfigCfg("file//tmp/x".into()))),
        -libc::EINVAL
    );
    assert_eq!(ctl.state("test"), Some(DevState::Serving));

    // A reopen whose backend cannot be opened: the device stays, refuses
    // I/O with sense, and says why in its status.
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("gone/disk.img");
    let (mut emu2, ctl2) = served_file(&t.path().join("lun.img"));
    let ev = |c: String| Event {
        kind: EventKind::ReconfigCfg(c),
        version: 2,
        device: "tcm-user/1/test/file/x".into(),
        minor: 0,
        device_id: Some(2),
    };
    let st = ctl2.handle(&ev(format!("file/{}", missing.display())));
    assert!(st < 0, "a failed reopen must be reported to the kernel");
    let (st, key, _) = io(&mut emu2, &rw16(false, 0, 1), Data::FromDevice(512));
    assert_eq!(st, 2, "I/O must be refused");
    assert!(key.is_some(), "with sense data");
    let line = &ctl2.status_lines()[0];
    assert!(
        line.contains("state=offline") && line.contains("reason="),
        "{line}"
    );
    // Still alive: a good reopen brings it back.
    let good = t.path().join("lun2.img");
    assert_eq!(ctl2.handle(&ev(format!("file/{}", good.display()))), 0);
    let (st, _, _) = io(&mut emu2, &rw16(true, 0, 1), Data::ToDevice(&pattern));
    assert_eq!(st, 0);
    assert_eq!(ctl2.state("test"), Some(DevState::Serving));
    assert!(ctl2.status_lines()[0].contains("state=serving"));

    // Removal drains and forgets the device.
    assert_eq!(ctl.handle(&event(EventKind::Removed)), 0);
    assert!(ctl.registry().names().is_empty());
    assert!(ctl.status_lines().is_empty());
    assert_eq!(
        ctl.handle(&event(EventKind::ReconfigSize(MIB))),
        -libc::ENODEV
    );
}

fn served_file(path: &std::path::Path) -> (KernelEmu, Control) {
    let b: Arc<dyn Backend> =
        Arc::new(tcmu_handler::file::FileBackend::open(path, Some(MIB), 512, 2).unwrap());
    let (emu, dev) = emu_device(small_layout(), b);
    let reg = Arc::new(Registry::new());
    reg.adopt(
        DeviceSpec {
            name: "test".into(),
            uio_path: PathBuf::from("/dev/null"),
            map_size: 0,
            subtype: "file".into(),
            cfgstring: path.display().to_string(),
            configfs_dir: None,
            size: Some(MIB),
        },
        dev,
    )
    .unwrap();
    let t = std::env::temp_dir();
    (emu, Control::new(reg, &t, &t))
}

/// From the kernel's bytes to the reply's bytes, as the netlink loop
/// does it: a DEV_SIZE reconfiguration, a malformed event that still
/// names its device id, an event for an unknown device.
#[test]
fn netlink_datagrams_to_replies() {
    use tcmu_rbd::netlink::{attr, cmd, decode_datagram, reply_msg, MsgBuilder};
    let (mut emu, ctl) = served();
    const FAM: u16 = 0x1c;
    let ev = |c: u8| {
        MsgBuilder::genl(FAM, 0, 0, c, 2)
            .attr_str(attr::DEVICE, "tcm-user/1/test/ram/first")
            .attr(attr::MINOR, &0u32.to_ne_bytes())
            .attr(attr::DEVICE_ID, &42u32.to_ne_bytes())
    };
    let mut d = ev(cmd::RECONFIG_DEVICE)
        .attr(attr::DEV_SIZE, &(4 * MIB).to_ne_bytes())
        .finish();
    // A second message in the same datagram: WRITECACHE with a 4-byte
    // payload where the kernel sends one byte.
    d.extend(
        ev(cmd::RECONFIG_DEVICE)
            .attr(attr::WRITECACHE, &[1, 0, 0, 0])
            .finish(),
    );
    let mut inc = Vec::new();
    decode_datagram(&d, FAM, &mut inc);
    let replies: Vec<_> = inc.iter().filter_map(|i| ctl.answer(i)).collect();
    assert_eq!(
        replies,
        vec![
            (cmd::RECONFIG_DEVICE_DONE, 42, 0),
            (cmd::RECONFIG_DEVICE_DONE, 42, -libc::EINVAL)
        ]
    );
    // The resize took effect.
    let (st, _, _) = io(&mut emu, &rw16(false, 8191, 1), Data::FromDevice(512));
    assert_eq!(st, 0);
    // The reply bytes carry the status and the id.
    let (done, id, status) = replies[1];
    let m = reply_msg(FAM, 7, done, id, status);
    assert_eq!(&m[16..18], &[cmd::RECONFIG_DEVICE_DONE, 2]);
    assert_eq!(&m[24..28], &(-libc::EINVAL).to_ne_bytes());
    assert_eq!(&m[32..36], &42u32.to_ne_bytes());

    // Removal of a device nobody serves is still answered (0), so the
    // kernel never waits forever.
    let d = MsgBuilder::genl(FAM, 0, 0, cmd::REMOVED_DEVICE, 2)
        .attr_str(attr::DEVICE, "tcm-user/1/other/ram/x")
        .attr(attr::MINOR, &3u32.to_ne_bytes())
        .attr(attr::DEVICE_ID, &43u32.to_ne_bytes())
        .finish();
    let mut inc = Vec::new();
    decode_datagram(&d, FAM, &mut inc);
    assert_eq!(ctl.answer(&inc[0]), Some((cmd::REMOVED_DEVICE_DONE, 43, 0)));
    assert_eq!(ctl.registry().names(), vec!["test".to_string()]);
}

/// A device enabled while no daemon had negotiated replies
/// (attrib/nl_reply_supported = 0) gets none: the kernel would log an
/// error for each. One that expects replies gets them.
#[test]
fn no_replies_for_devices_that_expect_none() {
    use tcmu_rbd::netlink::cmd;
    for (mode, want) in [
        ("0\n", None),
        ("1\n", Some((cmd::RECONFIG_DEVICE_DONE, 1, 0))),
    ] {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("attrib")).unwrap();
        std::fs::write(t.path().join("attrib/nl_reply_supported"), mode).unwrap();
        let (_emu, ctl) = served_with(Some(t.path().to_owned()));
        let inc = tcmu_rbd::netlink::Incoming::Event(event(EventKind::ReconfigSize(2 * MIB)));
        assert_eq!(ctl.answer(&inc), want, "nl_reply_supported={mode}");
        let rm = tcmu_rbd::netlink::Incoming::Event(event(EventKind::Removed));
        assert_eq!(ctl.answer(&rm).is_some(), want.is_some());
        assert!(ctl.registry().names().is_empty());
    }
}

/// An HA rbd device's backend sits behind the lock gate and its failover
/// manager; reconfiguring its config string would serve the image past
/// both, so it is refused (EOPNOTSUPP) and the device keeps its config.
#[test]
fn an_ha_device_refuses_a_reconfigured_config_string() {
    let (_emu, dev, fo) = idle_ha_device("ha0");
    let reg = Arc::new(Registry::new());
    let t = std::env::temp_dir();
    let ctl = Control::new(reg.clone(), &t, &t);
    reg.adopt_ha(
        DeviceSpec {
            name: "test".into(),
            uio_path: PathBuf::from("/dev/null"),
            map_size: 0,
            subtype: "rbd".into(),
            cfgstring: "rbd/img".into(),
            configfs_dir: None,
            size: Some(MIB),
        },
        dev,
        fo,
    )
    .expect("adopt");
    assert!(reg.is_ha("test"));
    let st = ctl.handle(&event(EventKind::ReconfigCfg("rbd/rbd/other".into())));
    assert_eq!(st, -libc::EOPNOTSUPP);
    assert_eq!(reg.spec("test").unwrap().cfgstring, "rbd/img");
    assert!(reg.remove("test"));
}

/// Without netlink the daemon applies a `dev_size` changed in configfs
/// (the kernel writes it before telling anyone) at its next rescan.
#[test]
fn a_dev_size_changed_in_configfs_is_applied_without_netlink() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("attrib")).unwrap();
    std::fs::write(dir.path().join("attrib/dev_size"), format!("{MIB}\n")).unwrap();
    let (mut emu, ctl) = served_with(Some(dir.path().to_owned()));
    let reg = ctl.registry().clone();
    reg.poll_resizes();
    assert_eq!(reg.spec("test").and_then(|s| s.size), Some(MIB));
    // Past the end: refused with ILLEGAL REQUEST.
    assert_eq!(
        io(&mut emu, &rw16(false, 2048, 1), Data::FromDevice(512)).0,
        2
    );
    std::fs::write(dir.path().join("attrib/dev_size"), format!("{}\n", 2 * MIB)).unwrap();
    reg.poll_resizes();
    assert_eq!(reg.spec("test").and_then(|s| s.size), Some(2 * MIB));
    let pattern = vec![0x3cu8; 512];
    let st = io(&mut emu, &rw16(true, 2048, 1), Data::ToDevice(&pattern)).0;
    assert_eq!(st, 0, "the new end is writable");
    let (st, _, data) = io(&mut emu, &rw16(false, 2048, 1), Data::FromDevice(512));
    assert_eq!((st, &data[..]), (0, &pattern[..]));
}
