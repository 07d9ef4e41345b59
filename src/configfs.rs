//! Everything the daemon reads from or writes to configfs
//! (`/sys/kernel/config/target`), in one place: a device's attributes,
//! its ring actions, its netlink reply mode, attribute writes for
//! targetcli's medium change, and its ALUA port groups. The rest of the
//! daemon, the SCSI core above all, gets plain values.

use crate::scsi::alua::{
    support, AccessState, AluaConfig, AluaConfigError, AluaMode, GroupConfig, GroupSource,
    LocalPort,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

// --- device attributes and actions ----------------------------------------

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Attributes of a device read from configfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigfsAttrs {
    /// `attrib/dev_size`.
    pub size: Option<u64>,
    /// `attrib/hw_block_size`.
    pub block_size: Option<u32>,
    /// `attrib/hw_max_sectors`.
    pub max_sectors: Option<u32>,
    /// The unit serial from `wwn/vpd_unit_serial`.
    pub serial: Option<String>,
}

/// Reads what the daemon needs from a device's configfs directory.
pub fn read_configfs(dir: &Path) -> ConfigfsAttrs {
    let num = |f: &str| read_trimmed(&dir.join(f)).and_then(|s| s.parse::<u64>().ok());
    let num32 = |f: &str| num(f).and_then(|v| u32::try_from(v).ok());
    let serial = read_trimmed(&dir.join("wwn/vpd_unit_serial")).and_then(|s| {
        // "T10 VPD Unit Serial Number: <serial>"
        s.rsplit(':')
            .next()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    });
    ConfigfsAttrs {
        size: num("attrib/dev_size"),
        block_size: num32("attrib/hw_block_size"),
        max_sectors: num32("attrib/hw_max_sectors"),
        serial,
    }
}

/// Runs a configfs action (`block_dev`, `reset_ring`) on a device.
pub fn action(dir: &Path, name: &str, val: &str) -> std::io::Result<()> {
    std::fs::write(dir.join("action").join(name), val)
}

/// The device's `attrib/nl_reply_supported` (None: unreadable).
pub fn nl_reply_supported(dev_dir: &Path) -> Option<i32> {
    read_trimmed(&dev_dir.join("attrib/nl_reply_supported"))?
        .parse()
        .ok()
}

/// Writes `val` to the device's `attrib/<attr>` (the kernel applies it,
/// or refuses it with an errno).
pub fn write_attrib(dev_dir: &Path, attr: &str, val: &str) -> std::io::Result<()> {
    std::fs::write(dev_dir.join("attrib").join(attr), val)
}

/// Turns the kernel's emulation of persistent reservations (SPC-3 PR and
/// SPC-2 RESERVE/RELEASE) on or off for the device (`attrib/emulate_pr`;
/// off, the kernel refuses those commands itself). The kernel takes a
/// change only while the device is not exported through any LUN.
pub fn set_pr_emulation(dev_dir: &Path, on: bool) -> std::io::Result<()> {
    write_attrib(dev_dir, "emulate_pr", if on { "1" } else { "0" })
}

// --- ALUA port groups ------------------------------------------------------

fn read_str(path: &Path) -> Result<String, AluaConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| AluaConfigError::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn parse_num(path: &Path, s: &str) -> Result<u64, AluaConfigError> {
    let t = s.trim();
    let v = if let Some(h) = t.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        t.parse().ok()
    };
    v.ok_or_else(|| AluaConfigError::Parse {
        path: path.to_path_buf(),
        value: s.to_string(),
    })
}

fn read_num(path: &Path) -> Result<u64, AluaConfigError> {
    parse_num(path, &read_str(path)?)
}

fn read_num_or(path: &Path, default: u64) -> Result<u64, AluaConfigError> {
    match std::fs::read_to_string(path) {
        Ok(s) => parse_num(path, &s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(default),
        Err(source) => Err(AluaConfigError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads the groups of a TCMU device from its configfs directory
/// (`.../target/core/user_N/DEV`): each `alua/<group>/` gives
/// `tg_pt_gp_id`, `alua_access_state`, `alua_access_status`,
/// `alua_access_type`, `preferred`, `implicit_trans_secs`, the
/// `alua_support_*` flags and `members` (`fabric/wwn/tpgt_N/lun_M`
/// lines). A member port's relative target port id is the LUN's
/// `statistics/scsi_port/indx` and its TPG's `enable` says whether it
/// is on this host, as tcmu-runner reads them (a TPG without `enable`,
/// as tcm_loop's, counts as enabled). The local port is the
/// first enabled member. `default_tg_pt_gp` is ignored: LIO creates it
/// for every device, so it alone means ALUA was not configured.
/// Returns `None` when no group is configured.
pub fn alua_config(dev_dir: &Path) -> Result<Option<AluaConfig>, AluaConfigError> {
    let alua = dev_dir.join("alua");
    let root = fabric_root(dev_dir);
    let rd = match std::fs::read_dir(&alua) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(AluaConfigError::Io { path: alua, source }),
    };
    let mut names: Vec<String> = rd
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "default_tg_pt_gp")
        .collect();
    names.sort();
    let mut groups = Vec::with_capacity(names.len());
    let mut local = None;
    for name in names {
        let g = alua.join(&name);
        let id = read_num(&g.join("tg_pt_gp_id"))?;
        let id = u16::try_from(id).map_err(|_| AluaConfigError::Parse {
            path: g.join("tg_pt_gp_id"),
            value: id.to_string(),
        })?;
        let sp = g.join("alua_access_state");
        let state = AccessState::from_u8(read_num_or(&sp, 0)? as u8).ok_or_else(|| {
            AluaConfigError::Parse {
                path: sp.clone(),
                value: read_str(&sp).unwrap_or_default(),
            }
        })?;
        let status = read_num_or(&g.join("alua_access_status"), 0)
            .ok()
            .and_then(|v| u8::try_from(v).ok())
            .unwrap_or(0);
        let tp = g.join("alua_access_type");
        let ty = read_str(&tp)?;
        // Shown as text ("Implicit and Explicit"), stored as 0..=3.
        let mode = match ty.to_ascii_lowercase().as_str() {
            "implicit and explicit" | "3" => AluaMode {
                implicit: true,
                explicit: true,
            },
            "implicit" | "1" => AluaMode {
                implicit: true,
                explicit: false,
            },
            "explicit" | "2" => AluaMode {
                implicit: false,
                explicit: true,
            },
            "none" | "0" => AluaMode::default(),
            _ => {
                return Err(AluaConfigError::Parse {
                    path: tp,
                    value: ty,
                })
            }
        };
        let preferred = read_num_or(&g.join("preferred"), 0)? != 0;
        let implicit_trans_secs = read_num_or(&g.join("implicit_trans_secs"), 0)?.min(255) as u8;
        let mut supported = 0u8;
        for (file, bit) in [
            ("alua_support_transitioning", support::T),
            ("alua_support_offline", support::O),
            ("alua_support_lba_dependent", support::LBD),
            ("alua_support_unavailable", support::U),
            ("alua_support_standby", support::S),
            ("alua_support_active_nonoptimized", support::AN),
            ("alua_support_active_optimized", support::AO),
        ] {
            let default = u64::from(support::DEFAULT & bit != 0);
            if read_num_or(&g.join(file), default)? != 0 {
                supported |= bit;
            }
        }
        let ports = group_members(&root, &g)?;
        if local.is_none() {
            local = ports.iter().find(|p| p.1).map(|p| LocalPort {
                group: id,
                rel_port: p.0,
            });
        }
        groups.push(GroupConfig {
            name,
            id,
            state,
            status,
            preferred,
            supported,
            mode,
            implicit_trans_secs,
            ports,
        });
    }
    if groups.is_empty() {
        return Ok(None);
    }
    let local = local.unwrap_or(LocalPort {
        group: groups[0].id,
        rel_port: groups[0].ports.first().map_or(1, |p| p.0),
    });
    Ok(Some(AluaConfig { groups, local }))
}

/// The fabric root (`.../target`) of a device directory
/// (`<root>/core/user_N/DEV`).
fn fabric_root(dev_dir: &Path) -> PathBuf {
    dev_dir
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The member ports of the group directory `g` (its `members` file): (relative
/// target port id, enabled here), in the file's order.
fn group_members(root: &Path, g: &Path) -> Result<Vec<(u16, bool)>, AluaConfigError> {
    let mut ports = Vec::new();
    let members = std::fs::read_to_string(g.join("members")).unwrap_or_default();
    for line in members.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(p) = member_port(root, line)? {
            ports.push(p);
        }
    }
    Ok(ports)
}

/// Resolves one `members` line, `fabric/wwn/tpgt_N/lun_M`, to the port's
/// relative target port id and whether its TPG is enabled here.
fn member_port(root: &Path, line: &str) -> Result<Option<(u16, bool)>, AluaConfigError> {
    let parts: Vec<&str> = line.split('/').collect();
    let [fabric, wwn, tpgt, lun] = parts[..] else {
        return Ok(None);
    };
    // LIO shows the iSCSI fabric as "iSCSI" but names its directory "iscsi".
    let fabric = if fabric == "iSCSI" { "iscsi" } else { fabric };
    let tpg_dir = root.join(fabric).join(wwn).join(tpgt);
    let indx = tpg_dir
        .join("lun")
        .join(lun)
        .join("statistics/scsi_port/indx");
    let port = read_num(&indx)?;
    let port = u16::try_from(port).map_err(|_| AluaConfigError::Parse {
        path: indx,
        value: port.to_string(),
    })?;
    // Fabrics without an `enable` attribute (tcm_loop) are always live.
    let enabled = read_num_or(&tpg_dir.join("enable"), 1)? != 0;
    Ok(Some((port, enabled)))
}

/// A device's groups and member ports, re-read from its configfs
/// directory on demand (what [`crate::scsi::alua::SharedAlua::follow`]
/// takes).
pub struct ConfigfsGroups {
    dev_dir: PathBuf,
    root: PathBuf,
}

impl ConfigfsGroups {
    /// The groups of the device at `dev_dir` (`.../core/user_N/DEV`).
    pub fn new(dev_dir: &Path) -> Arc<ConfigfsGroups> {
        Arc::new(ConfigfsGroups {
            dev_dir: dev_dir.to_path_buf(),
            root: fabric_root(dev_dir),
        })
    }
}

impl GroupSource for ConfigfsGroups {
    fn groups(&self) -> Result<Option<AluaConfig>, AluaConfigError> {
        alua_config(&self.dev_dir)
    }
    fn members(&self, name: &str) -> Result<Vec<(u16, bool)>, AluaConfigError> {
        group_members(&self.root, &self.dev_dir.join("alua").join(name))
    }
}

// --- who reaches a LUN (EXTENDED COPY between LUNs) ------------------------

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

fn name_starts(p: &Path, prefix: &str) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// Whether a LUN directory (a fabric's `lun/lun_N` or an ACL's mapped
/// `lun_N`) holds a link to one of `to` (canonical paths).
fn links_to(dir: &Path, to: &[PathBuf]) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_symlink())
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .any(|c| to.contains(&c))
}

/// Who reaches the LUN of the device at `dev_dir` through LIO: for every
/// target port group exporting it, `*` when any initiator that logs in
/// sees it (a fabric without ACLs, as tcm_loop, whose TPG has no
/// `generate_node_acls` attribute, or generated ACLs in demo mode), and
/// each initiator whose ACL maps it.
pub fn lun_reach(dev_dir: &Path) -> std::io::Result<crate::copy::Reach> {
    let root = fabric_root(dev_dir);
    let dev = vec![std::fs::canonicalize(dev_dir)?];
    let mut out = crate::copy::Reach::new();
    for fabric in subdirs(&root) {
        if fabric.file_name().is_some_and(|n| n == "core") {
            continue;
        }
        for wwn in subdirs(&fabric) {
            for tpg in subdirs(&wwn)
                .into_iter()
                .filter(|t| name_starts(t, "tpgt_"))
            {
                let luns: Vec<PathBuf> = subdirs(&tpg.join("lun"))
                    .into_iter()
                    .filter(|l| links_to(l, &dev))
                    .filter_map(|l| std::fs::canonicalize(l).ok())
                    .collect();
                if luns.is_empty() {
                    continue;
                }
                let acls = tpg.join("acls");
                // A fabric without the attribute has no ACLs to enforce
                // (tcm_loop: the local host is the initiator, always).
                let generated =
                    read_trimmed(&tpg.join("attrib/generate_node_acls")).is_none_or(|v| v == "1");
                if generated {
                    out.insert((tpg.clone(), "*".to_string()));
                }
                for acl in subdirs(&acls) {
                    let maps = subdirs(&acl)
                        .into_iter()
                        .filter(|m| name_starts(m, "lun_"))
                        .any(|m| links_to(&m, &luns));
                    if let (true, Some(who)) = (maps, acl.file_name().and_then(|n| n.to_str())) {
                        out.insert((tpg.clone(), who.to_string()));
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::alua::{rtpg_data, AluaSource, SharedAlua};

    fn put(p: &Path, rel: &str, v: &str) {
        let f = p.join(rel);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, format!("{v}\n")).unwrap();
    }

    /// ceph-iscsi enables the backstore (the daemon opens the device with
    /// no groups: ALUA off), then creates its groups when it maps the
    /// disk: `ao` for the owner gateway and `ano<N>` for the others,
    /// implicit only. The device must follow: groups, TPGS, states.
    #[test]
    fn groups_created_after_open_are_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("target");
        let dev = root.join("core/user_0/disk_1");
        std::fs::create_dir_all(dev.join("alua/default_tg_pt_gp")).unwrap();
        let a = SharedAlua::off();
        a.follow(ConfigfsGroups::new(&dev));
        assert!(!a.mode().enabled(), "no groups yet: ALUA off");
        assert!(!a.reload_groups(), "nothing changed");
        assert_eq!(a.local_state(), AccessState::ActiveOptimized);

        let tpg1 = root.join("iscsi/iqn.2003-01.com.redhat.iscsi-gw:ceph-igw/tpgt_1");
        put(&tpg1, "lun/lun_0/statistics/scsi_port/indx", "1");
        put(&tpg1, "enable", "1");
        let tpg2 = root.join("iscsi/iqn.2003-01.com.redhat.iscsi-gw:ceph-igw/tpgt_2");
        put(&tpg2, "lun/lun_0/statistics/scsi_port/indx", "2");
        put(&tpg2, "enable", "0");
        for (name, id, state, tpg) in [("ao", 1, 0, 1), ("ano2", 2, 1, 2)] {
            let g = format!("alua/{name}");
            put(&dev, &format!("{g}/tg_pt_gp_id"), &id.to_string());
            put(&dev, &format!("{g}/alua_access_type"), "Implicit");
            put(&dev, &format!("{g}/alua_access_state"), &state.to_string());
            put(
                &dev,
                &format!("{g}/members"),
                &format!("iSCSI/iqn.2003-01.com.redhat.iscsi-gw:ceph-igw/tpgt_{tpg}/lun_0"),
            );
        }
        assert!(a.reload_groups(), "the new groups are picked up");
        assert_eq!(
            a.mode(),
            AluaMode {
                implicit: true,
                explicit: false
            }
        );
        assert_eq!(a.local_port().group, 1);
        let mut g: Vec<_> = a
            .groups()
            .into_iter()
            .map(|g| (g.id, g.state, g.ports))
            .collect();
        g.sort_by_key(|x| x.0);
        assert_eq!(
            g,
            vec![
                (1, AccessState::ActiveOptimized, vec![1]),
                (2, AccessState::ActiveNonOptimized, vec![2]),
            ]
        );
        // A live state survives a reload that changes another group.
        a.handle().set_local_state(AccessState::Transitioning);
        put(&dev, "alua/ano2/alua_access_type", "Implicit and Explicit");
        assert!(a.reload_groups());
        assert_eq!(a.local_state(), AccessState::Transitioning);
        // The groups go away (disk unmapped): ALUA off again.
        std::fs::remove_dir_all(dev.join("alua/ao")).unwrap();
        std::fs::remove_dir_all(dev.join("alua/ano2")).unwrap();
        assert!(a.reload_groups());
        assert!(!a.mode().enabled());
        assert!(a.groups().is_empty());
    }

    /// The daemon opens a device before its LUN is linked: the members
    /// read then are none, RTPG and VPD 0x83 must show the real ports.
    #[test]
    fn members_linked_after_open_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("target");
        let dev = root.join("core/user_0/disk_b");
        for (name, id) in [("gw_a", 11), ("gw_b", 22)] {
            put(&dev, &format!("alua/{name}/tg_pt_gp_id"), &id.to_string());
            put(
                &dev,
                &format!("alua/{name}/alua_access_type"),
                "Implicit and Explicit",
            );
            put(&dev, &format!("alua/{name}/members"), "");
        }
        let cfg = alua_config(&dev).unwrap().unwrap();
        assert!(cfg.groups.iter().all(|g| g.ports.is_empty()));
        let a = SharedAlua::new(cfg);
        a.follow(ConfigfsGroups::new(&dev));
        // Not linked yet: the fallback local port (first group), no ports.
        assert_eq!(a.groups().iter().map(|g| g.ports.len()).sum::<usize>(), 0);
        a.handle().set_local_state(AccessState::Standby);
        assert_eq!(a.local_port().group, 11);
        // The fabric links the LUN into gw_b (port 7) and another
        // gateway's disabled TPG into gw_a (port 3).
        let tpg = root.join("iscsi/iqn.x/tpgt_1");
        put(&tpg, "lun/lun_0/statistics/scsi_port/indx", "7");
        put(&tpg, "enable", "1");
        let other = root.join("iscsi/iqn.x/tpgt_2");
        put(&other, "lun/lun_0/statistics/scsi_port/indx", "3");
        put(&other, "enable", "0");
        put(&dev, "alua/gw_b/members", "iSCSI/iqn.x/tpgt_1/lun_0");
        put(&dev, "alua/gw_a/members", "iSCSI/iqn.x/tpgt_2/lun_0");
        let g = a.groups();
        assert_eq!(g[0].ports, vec![3]);
        assert_eq!(g[1].ports, vec![7]);
        assert_eq!(
            a.local_port(),
            LocalPort {
                group: 22,
                rel_port: 7
            }
        );
        assert_eq!(a.handle().local_group(), 22);
        // The local state moved with the local port.
        assert_eq!(a.local_state(), AccessState::Standby);
        let d = rtpg_data(&a, false);
        // Group 22's descriptor: TARGET PORT COUNT 1, port 7.
        assert_eq!(&d[16..24], &[0x02, support::DEFAULT, 0, 22, 0, 0x02, 0, 1]);
        assert_eq!(&d[24..28], &[0, 0, 0, 7]);
    }

    /// Two LUNs on one iSCSI target: host A's ACL maps both, host B's
    /// only the first; a tcm_loop port exports the first too.
    #[test]
    fn lun_reach_follows_lun_links_and_acl_mappings() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("target");
        let d1 = root.join("core/user_0/disk1");
        let d2 = root.join("core/user_0/disk2");
        std::fs::create_dir_all(&d1).unwrap();
        std::fs::create_dir_all(&d2).unwrap();
        let tpg = root.join("iscsi/iqn.t/tpgt_1");
        for (lun, dev) in [("lun_0", &d1), ("lun_1", &d2)] {
            std::fs::create_dir_all(tpg.join("lun").join(lun)).unwrap();
            symlink(dev, tpg.join("lun").join(lun).join("x")).unwrap();
        }
        put(&tpg, "attrib/generate_node_acls", "0");
        for (host, luns) in [
            ("iqn.a", &["lun_0", "lun_1"][..]),
            ("iqn.b", &["lun_0"][..]),
        ] {
            for (i, lun) in luns.iter().enumerate() {
                let m = tpg.join("acls").join(host).join(format!("lun_{i}"));
                std::fs::create_dir_all(&m).unwrap();
                symlink(tpg.join("lun").join(lun), m.join("y")).unwrap();
            }
        }
        let lo = root.join("loopback/naa.1/tpgt_1/lun/lun_0");
        std::fs::create_dir_all(&lo).unwrap();
        // As the kernel makes every TPG: acls/ and attrib/, here empty.
        std::fs::create_dir_all(root.join("loopback/naa.1/tpgt_1/acls")).unwrap();
        std::fs::create_dir_all(root.join("loopback/naa.1/tpgt_1/attrib")).unwrap();
        symlink(&d1, lo.join("z")).unwrap();
        let names = |r: crate::copy::Reach| -> Vec<String> {
            r.into_iter()
                .map(|(t, w)| format!("{}:{w}", t.strip_prefix(&root).unwrap().display()))
                .collect()
        };
        assert_eq!(
            names(lun_reach(&d1).unwrap()),
            vec![
                "iscsi/iqn.t/tpgt_1:iqn.a",
                "iscsi/iqn.t/tpgt_1:iqn.b",
                "loopback/naa.1/tpgt_1:*"
            ]
        );
        assert_eq!(
            names(lun_reach(&d2).unwrap()),
            vec!["iscsi/iqn.t/tpgt_1:iqn.a"]
        );
        // Copies disk2 -> disk1 are fine for every initiator of disk2;
        // the other way host B (and the loopback port) would gain disk2.
        let (r1, r2) = (lun_reach(&d1).unwrap(), lun_reach(&d2).unwrap());
        assert_eq!(crate::copy::reach_gap(&r2, &r1), None);
        assert!(crate::copy::reach_gap(&r1, &r2).is_some());
    }
}
