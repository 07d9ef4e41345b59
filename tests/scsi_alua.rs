//! ALUA: TPGS bits, the VPD 0x83 port designators, REPORT/SET TARGET
//! PORT GROUPS, what standby/transitioning/unavailable ports serve and
//! with which sense, implicit activation requests, and reading the groups
//! from a configfs tree. The RTPG and VPD data are also parsed the way
//! Linux's scsi_dh_alua does, so dm-multipath understands them.

mod scsi_util;

use scsi_util::*;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tcmu_rbd::scsi::alua::{
    support, AccessState, AluaConfig, AluaMode, AluaSource, GroupConfig, LocalPort, SharedAlua,
};

fn group(id: u16, state: AccessState, ports: &[u16], mode: AluaMode) -> GroupConfig {
    GroupConfig {
        preferred: id == 1,
        mode,
        implicit_trans_secs: 30,
        ..GroupConfig::new(id, state, ports.iter().map(|&p| (p, p == 2)).collect())
    }
}

const BOTH: AluaMode = AluaMode {
    implicit: true,
    explicit: true,
};

/// Two gateways' groups, this one being group 2 (port 2), standby.
fn setup(mode: AluaMode, local_state: AccessState) -> (T, SharedAlua) {
    let alua = SharedAlua::new(AluaConfig {
        groups: vec![
            group(1, AccessState::ActiveOptimized, &[1], mode),
            group(2, local_state, &[2], mode),
        ],
        local: LocalPort {
            group: 2,
            rel_port: 2,
        },
    });
    let mut t = T::new(2048);
    t.lun.set_alua(Arc::new(alua.clone()));
    (t, alua)
}

fn rtpg(ext: bool, alloc: u32) -> [u8; 12] {
    let a = alloc.to_be_bytes();
    [
        0xa3,
        0x0a | if ext { 0x20 } else { 0 },
        0,
        0,
        0,
        0,
        a[0],
        a[1],
        a[2],
        a[3],
        0,
        0,
    ]
}

fn stpg_cdb(len: u32) -> [u8; 12] {
    let a = len.to_be_bytes();
    [0xa4, 0x0a, 0, 0, 0, 0, a[0], a[1], a[2], a[3], 0, 0]
}

fn stpg_list(reqs: &[(u8, u16)]) -> Vec<u8> {
    let mut v = vec![0u8; 4];
    for (state, id) in reqs {
        v.push(*state);
        v.push(0);
        v.extend_from_slice(&id.to_be_bytes());
    }
    v
}

#[test]
fn tpgs_bits_follow_the_mode() {
    for (mode, tpgs) in [
        (AluaMode::default(), 0u8),
        (
            AluaMode {
                implicit: true,
                explicit: false,
            },
            1,
        ),
        (
            AluaMode {
                implicit: false,
                explicit: true,
            },
            2,
        ),
        (BOTH, 3),
    ] {
        let (mut t, _) = setup(mode, AccessState::ActiveOptimized);
        let d = t.good_in(&[0x12, 0, 0, 0, 96, 0], 96);
        assert_eq!((d[5] >> 4) & 0x03, tpgs, "{mode:?}");
    }
}

/// What scsi_vpd_tpg_id() in Linux extracts from VPD 0x83: the relative
/// port and group from designators with target port association.
fn kernel_vpd_tpg_id(page: &[u8]) -> Option<(u16, u16)> {
    let len = usize::from(u16::from_be_bytes([page[2], page[3]])) + 4;
    let mut d = &page[4..len.min(page.len())];
    let (mut rel, mut grp) = (None, None);
    while d.len() >= 4 {
        let dl = usize::from(d[3]) + 4;
        if (d[1] & 0x30) == 0x10 {
            match d[1] & 0x0f {
                0x4 => rel = Some(u16::from_be_bytes([d[6], d[7]])),
                0x5 => grp = Some(u16::from_be_bytes([d[6], d[7]])),
                _ => {}
            }
        }
        d = &d[dl.min(d.len())..];
    }
    Some((rel?, grp?))
}

#[test]
fn vpd83_carries_port_and_group_designators() {
    let (mut t, _) = setup(BOTH, AccessState::Standby);
    let d = t.good_in(&[0x12, 1, 0x83, 1, 0, 0], 256);
    // NAA (20) + T10 (4 + 8 + serial) + relative port (8) + group (8).
    let serial_len = 36;
    assert_eq!(d.len(), 4 + 20 + 12 + serial_len + 16);
    let tail = &d[d.len() - 16..];
    assert_eq!(
        tail,
        &[1, 0x14, 0, 4, 0, 0, 0, 2, 1, 0x15, 0, 4, 0, 0, 0, 2]
    );
    assert_eq!(kernel_vpd_tpg_id(&d), Some((2, 2)));
}

/// The parse in scsi_dh_alua's alua_rtpg(): returns the transition time
/// it would use and (group, state, pref, supported) per descriptor.
fn kernel_rtpg_parse(buf: &[u8]) -> (u8, Vec<(u16, u8, bool, u8)>) {
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize + 4;
    let ext = buf[4] & 0x70 == 0x10;
    let tmo = if ext && buf[5] != 0 { buf[5] } else { 60 };
    let mut k = if ext { 8 } else { 4 };
    let mut out = Vec::new();
    while k < len {
        let d = &buf[k..];
        out.push((
            u16::from_be_bytes([d[2], d[3]]),
            d[0] & 0x0f,
            d[0] >> 7 == 1,
            d[1],
        ));
        k += 8 + usize::from(d[7]) * 4;
    }
    (tmo, out)
}

#[test]
fn report_target_port_groups_both_formats() {
    let (mut t, _) = setup(BOTH, AccessState::Standby);
    let d = t.good_in(&rtpg(true, 1024), 1024);
    assert_eq!(
        d,
        vec![
            0, 0, 0, 28, // RETURN DATA LENGTH
            0x10, 30, 0, 0, // format 001b, implicit transition time 30 s
            0x80, 0xcf, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, // group 1: pref, AO, port 1
            0x02, 0xcf, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, // group 2: standby, port 2
        ]
    );
    assert_eq!(
        kernel_rtpg_parse(&d),
        (30, vec![(1, 0, true, 0xcf), (2, 2, false, 0xcf)])
    );
    let d = t.good_in(&rtpg(false, 1024), 1024);
    assert_eq!(&d[..4], &[0, 0, 0, 24]);
    assert_eq!(d.len(), 28);
    assert_eq!(kernel_rtpg_parse(&d).1.len(), 2);
    // Allocation length: the header still gives the full length so the
    // kernel resubmits with a bigger buffer.
    let (r, d) = t.din(&rtpg(true, 12), 12);
    assert_eq!(r.read_len, Some(12));
    assert_eq!(&d[..4], &[0, 0, 0, 28]);
    // Reserved parameter data formats.
    let mut c = rtpg(false, 64);
    c[1] = 0x4a;
    let s = t.sense(&c, vec![0; 64]);
    assert_field(&s, true, 1, Some(7));
}

#[test]
fn standby_serves_only_what_spc4_lists() {
    let (mut t, alua) = setup(BOTH, AccessState::Standby);
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    alua.on_request_active(move || {
        c2.fetch_add(1, Ordering::SeqCst);
    });
    // TUR: multipath's checker must see a ghost path.
    let s = t.sense(&[0, 0, 0, 0, 0, 0], vec![]);
    assert_sense(&s, 0x02, 0x04, 0x0b);
    for cdb in [
        rw16(false, 0, 1).to_vec(),
        rw16(true, 0, 1).to_vec(),
        vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        vec![0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
    ] {
        let s = t.sense(&cdb, vec![0; 1024]);
        assert_sense(&s, 0x02, 0x04, 0x0b);
    }
    assert!(t.ops().is_empty(), "no I/O reached the backend");
    // Implicit ALUA: each command that changes the image (WRITE, UNMAP,
    // WRITE SAME) asked to become active; the READ and SYNCHRONIZE CACHE
    // did not (a read needs no lock, and udev probes every path's disk).
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Allowed: INQUIRY, RTPG, READ CAPACITY, MODE SENSE, REQUEST SENSE,
    // and STPG.
    t.good_in(&[0x12, 0, 0, 0, 36, 0], 36);
    t.good_in(&rtpg(true, 256), 256);
    t.good_in(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    t.good_in(&[0x1a, 0x08, 0x3f, 0, 255, 0], 255);
    let d = t.good_in(&[0x03, 0, 0, 0, 18, 0], 18);
    assert_eq!(
        (d[2], d[12], d[13]),
        (0x02, 0x04, 0x0b),
        "REQUEST SENSE reports standby"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "non-media commands ask nothing"
    );
}

#[test]
fn implicit_activation_turns_io_into_a_retry() {
    let (mut t, alua) = setup(BOTH, AccessState::Standby);
    let h = alua.handle();
    // The lock watcher's role: start acquiring, report Transitioning.
    alua.on_request_active(move || {
        h.set_local_state(AccessState::Transitioning);
    });
    let s = t.sense(&rw16(true, 0, 1), vec![0; 512]);
    assert_sense(&s, 0x02, 0x04, 0x0a);
    // While transitioning: INQUIRY, RTPG and REQUEST SENSE only; TUR
    // gets the standby sense (multipathd's checker: ghost, not dead).
    let s = t.sense(&[0, 0, 0, 0, 0, 0], vec![]);
    assert_sense(&s, 0x02, 0x04, 0x0b);
    let s = t.sense(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![0; 8]);
    assert_sense(&s, 0x02, 0x04, 0x0a);
    t.good_in(&[0x12, 0, 0, 0, 36, 0], 36);
    let d = t.good_in(&rtpg(true, 256), 256);
    assert_eq!(kernel_rtpg_parse(&d).1[1].1, 0x0f, "group 2 transitioning");
    // The watcher got the lock: Active/Optimized, I/O flows.
    alua.handle().set_local_state(AccessState::ActiveOptimized);
    t.write(0, &[4u8; 512]);
    assert_eq!(t.read(0, 1), vec![4u8; 512]);
    let d = t.good_in(&rtpg(true, 256), 256);
    let groups = kernel_rtpg_parse(&d).1;
    assert_eq!(groups[1].1, 0x00);
    assert_eq!(
        d[8 + 12 + 5],
        0x02,
        "status: altered by implicit transition"
    );
}

#[test]
fn non_optimized_serves_and_asks_to_become_optimized() {
    let (mut t, alua) = setup(BOTH, AccessState::ActiveNonOptimized);
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    alua.on_request_active(move || {
        c2.fetch_add(1, Ordering::SeqCst);
    });
    t.write(3, &[1u8; 512]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    t.good(&[0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn unavailable_and_offline() {
    let (mut t, alua) = setup(BOTH, AccessState::Unavailable);
    let s = t.sense(&[0x1a, 0x08, 0x3f, 0, 255, 0], vec![0; 255]);
    assert_sense(&s, 0x02, 0x04, 0x0c);
    t.good_in(&[0x12, 0, 0, 0, 36, 0], 36);
    // STPG still works there.
    let l = stpg_list(&[(0x00, 2)]);
    t.good(&stpg_cdb(l.len() as u32), &l);
    assert_eq!(alua.local_state(), AccessState::ActiveOptimized);
    alua.handle().set_local_state(AccessState::Offline);
    let s = t.sense(&rw16(false, 0, 1), vec![0; 512]);
    assert_sense(&s, 0x02, 0x04, 0x12);
}

#[test]
fn set_target_port_groups() {
    let (mut t, alua) = setup(BOTH, AccessState::Standby);
    // Make this gateway optimized and the other standby.
    let l = stpg_list(&[(0x00, 2), (0x02, 1)]);
    t.good(&stpg_cdb(l.len() as u32), &l);
    let d = t.good_in(&rtpg(true, 256), 256);
    let g = kernel_rtpg_parse(&d).1;
    assert_eq!((g[0].1, g[1].1), (0x02, 0x00));
    assert_eq!(d[8 + 5], 0x01, "status: altered by SET TARGET PORT GROUPS");
    assert_eq!(alua.local_state(), AccessState::ActiveOptimized);
    t.write(0, &[1u8; 512]);
    // Unknown group: pointer at its TARGET PORT GROUP field.
    let l = stpg_list(&[(0x00, 2), (0x00, 9)]);
    let s = t.sense(&stpg_cdb(l.len() as u32), l);
    assert_field(&s, false, 10, None);
    // Transitioning cannot be asked for.
    let l = stpg_list(&[(0x0f, 2)]);
    let s = t.sense(&stpg_cdb(l.len() as u32), l);
    assert_field(&s, false, 4, Some(3));
    // Too short a list; a buffer shorter than the list.
    let s = t.sense(&stpg_cdb(2), vec![0; 2]);
    assert_sense(&s, 5, 0x1a, 0);
    let s = t.sense(&stpg_cdb(12), vec![0; 8]);
    assert_sense(&s, 5, 0x1a, 0);
    // A state the group does not support.
    let lbd = SharedAlua::new(AluaConfig {
        groups: vec![GroupConfig {
            supported: support::AO | support::S,
            ..group(1, AccessState::ActiveOptimized, &[1], BOTH)
        }],
        local: LocalPort {
            group: 1,
            rel_port: 1,
        },
    });
    t.lun.set_alua(Arc::new(lbd));
    let l = stpg_list(&[(0x01, 1)]);
    let s = t.sense(&stpg_cdb(l.len() as u32), l);
    assert_field(&s, false, 4, Some(3));
    // Implicit-only ALUA has no STPG.
    let (mut t, _) = setup(
        AluaMode {
            implicit: true,
            explicit: false,
        },
        AccessState::ActiveOptimized,
    );
    let l = stpg_list(&[(0x00, 2)]);
    let s = t.sense(&stpg_cdb(l.len() as u32), l);
    assert_sense(&s, 5, 0x20, 0);
    // ...and lists RTPG but not STPG in REPORT SUPPORTED OPERATION CODES.
    let d = t.good_in(&[0xa3, 0x0c, 0x02, 0xa4, 0, 0x0a, 0, 0, 1, 0, 0, 0], 256);
    assert_eq!(d[1] & 0x07, 0x01);
    let d = t.good_in(&[0xa3, 0x0c, 0x02, 0xa3, 0, 0x0a, 0, 0, 1, 0, 0, 0], 256);
    assert_eq!(d[1] & 0x07, 0x03);
}

#[test]
fn states_follow_another_thread() {
    let (mut t, alua) = setup(BOTH, AccessState::ActiveOptimized);
    t.write(0, &[1u8; 512]);
    let h = alua.handle();
    std::thread::spawn(move || {
        h.set_local_state(AccessState::Standby);
    })
    .join()
    .unwrap();
    let s = t.sense(&rw16(false, 0, 1), vec![0; 512]);
    assert_sense(&s, 0x02, 0x04, 0x0b);
}

fn write(p: &Path, rel: &str, v: &str) {
    let f = p.join(rel);
    std::fs::create_dir_all(f.parent().unwrap()).unwrap();
    std::fs::write(f, format!("{v}\n")).unwrap();
}

/// A configfs tree like ceph-iscsi builds on gateway 2 of two: one group
/// per gateway, each with its gateway's TPG; only the local TPG enabled.
fn fake_configfs(root: &Path) -> std::path::PathBuf {
    let dev = root.join("target/core/user_3/disk0");
    let iqn = "iqn.2003-01.com.redhat.iscsi-gw:ceph-igw";
    for (name, id, state, tpgt, indx, enabled) in [("gw1", 1, 0, 1, 7, 0), ("gw2", 2, 2, 2, 8, 1)] {
        let g = format!("alua/{name}");
        write(&dev, &format!("{g}/tg_pt_gp_id"), &id.to_string());
        write(&dev, &format!("{g}/alua_access_state"), &state.to_string());
        write(&dev, &format!("{g}/alua_access_status"), "0");
        write(&dev, &format!("{g}/alua_access_type"), "Implicit");
        write(
            &dev,
            &format!("{g}/preferred"),
            if id == 1 { "1" } else { "0" },
        );
        write(&dev, &format!("{g}/implicit_trans_secs"), "10");
        write(&dev, &format!("{g}/alua_support_lba_dependent"), "0");
        write(&dev, &format!("{g}/alua_support_offline"), "0");
        write(
            &dev,
            &format!("{g}/members"),
            &format!("iSCSI/{iqn}/tpgt_{tpgt}/lun_0"),
        );
        let tpg = root.join(format!("target/iscsi/{iqn}/tpgt_{tpgt}"));
        write(&tpg, "enable", &enabled.to_string());
        write(
            &tpg,
            "lun/lun_0/statistics/scsi_port/indx",
            &indx.to_string(),
        );
    }
    // LIO's own group, always there.
    write(&dev, "alua/default_tg_pt_gp/tg_pt_gp_id", "0");
    write(
        &dev,
        "alua/default_tg_pt_gp/alua_access_type",
        "Implicit and Explicit",
    );
    dev
}

#[test]
fn configfs_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = fake_configfs(tmp.path());
    let cfg = tcmu_rbd::configfs::alua_config(&dev)
        .unwrap()
        .expect("groups");
    assert_eq!(cfg.groups.len(), 2, "default_tg_pt_gp ignored");
    assert_eq!(
        cfg.local,
        LocalPort {
            group: 2,
            rel_port: 8
        }
    );
    let g1 = &cfg.groups[0];
    assert_eq!((g1.name.as_str(), g1.id), ("gw1", 1));
    assert_eq!(g1.state, AccessState::ActiveOptimized);
    assert!(g1.preferred);
    assert_eq!(g1.ports, vec![(7, false)]);
    assert_eq!(
        g1.mode,
        AluaMode {
            implicit: true,
            explicit: false
        }
    );
    assert_eq!(g1.implicit_trans_secs, 10);
    assert_eq!(
        g1.supported,
        support::T | support::U | support::S | support::AN | support::AO
    );
    let g2 = &cfg.groups[1];
    assert_eq!(
        (g2.id, g2.state, g2.ports.clone()),
        (2, AccessState::Standby, vec![(8, true)])
    );
    // Served through a LUN: TPGS implicit, designators of the local port.
    let mut t = T::new(2048);
    t.lun.set_alua(Arc::new(SharedAlua::new(cfg)));
    let d = t.good_in(&[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!((d[5] >> 4) & 3, 1);
    let d = t.good_in(&[0x12, 1, 0x83, 1, 0, 0], 256);
    assert_eq!(kernel_vpd_tpg_id(&d), Some((8, 2)));
    let d = t.good_in(&rtpg(true, 256), 256);
    assert_eq!(d[5], 10);
    let s = t.sense(&[0, 0, 0, 0, 0, 0], vec![]);
    assert_sense(&s, 0x02, 0x04, 0x0b);
}

#[test]
fn configfs_tcm_loop_port_without_enable() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("target/core/user_1/disk1");
    write(&dev, "alua/gwb/tg_pt_gp_id", "22");
    write(&dev, "alua/gwb/alua_access_type", "3");
    write(&dev, "alua/gwb/alua_access_state", "1");
    write(
        &dev,
        "alua/gwb/members",
        "loopback/naa.500140512345678a/tpgt_1/lun_0",
    );
    let tpg = tmp
        .path()
        .join("target/loopback/naa.500140512345678a/tpgt_1");
    write(&tpg, "lun/lun_0/statistics/scsi_port/indx", "0x3");
    let cfg = tcmu_rbd::configfs::alua_config(&dev)
        .unwrap()
        .expect("group");
    assert_eq!(
        cfg.local,
        LocalPort {
            group: 22,
            rel_port: 3
        }
    );
    assert_eq!(cfg.groups[0].mode, BOTH);
    assert_eq!(cfg.groups[0].state, AccessState::ActiveNonOptimized);
    assert_eq!(cfg.groups[0].supported, support::DEFAULT);
}

#[test]
fn configfs_without_alua_and_with_bad_values() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("target/core/user_0/d");
    std::fs::create_dir_all(&dev).unwrap();
    assert!(
        tcmu_rbd::configfs::alua_config(&dev).unwrap().is_none(),
        "no alua dir"
    );
    write(&dev, "alua/default_tg_pt_gp/tg_pt_gp_id", "0");
    assert!(
        tcmu_rbd::configfs::alua_config(&dev).unwrap().is_none(),
        "only LIO's default"
    );
    let dev = fake_configfs(tmp.path());
    write(&dev, "alua/gw1/alua_access_state", "7");
    let e = tcmu_rbd::configfs::alua_config(&dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("alua_access_state"), "{e}");
    let dev = fake_configfs(tmp.path());
    write(&dev, "alua/gw1/alua_access_type", "sometimes");
    let e = tcmu_rbd::configfs::alua_config(&dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("alua_access_type"), "{e}");
    let dev = fake_configfs(tmp.path());
    std::fs::remove_file(dev.join("alua/gw2/tg_pt_gp_id")).unwrap();
    assert!(tcmu_rbd::configfs::alua_config(&dev).is_err());
}

#[test]
fn alua_off_by_default() {
    let mut t = T::new(2048);
    let d = t.good_in(&[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!(d[5] & 0x30, 0);
    assert!(!t.lun.alua().mode().enabled());
    assert_eq!(t.lun.alua().local_state(), AccessState::ActiveOptimized);
}
