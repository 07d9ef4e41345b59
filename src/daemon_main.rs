//! The daemon's top level: find the TCMU devices this process serves,
//! serve them, follow the kernel's add/remove/reconfigure events, stop
//! cleanly on SIGTERM.

use crate::registry::{DeviceSpec, Registry};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::{error, info, warn};

/// Subtypes this daemon serves.
pub const SUBTYPES: &[&str] = &["file", "ram", "rbd"];

/// Parses a UIO device name `tcm-user/<hba>/<name>/<subtype>/<cfgstring>`.
pub fn parse_uio_name(name: &str) -> Option<(u32, String, String, String)> {
    let rest = name.strip_prefix("tcm-user/")?;
    let mut it = rest.splitn(4, '/');
    let hba = it.next()?.parse().ok()?;
    let dev = it.next()?.to_string();
    let subtype = it.next()?.to_string();
    let cfg = it.next().unwrap_or("").to_string();
    if dev.is_empty() || subtype.is_empty() {
        return None;
    }
    Some((hba, dev, subtype, cfg))
}

/// Scans `sysfs/class/uio` for TCMU devices of the subtypes served.
pub fn scan(sysfs: &Path, configfs: &Path) -> Vec<DeviceSpec> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(sysfs.join("class/uio")) else {
        return out;
    };
    for e in rd.flatten() {
        let d = e.path();
        let Some(uio) = d.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let Ok(name) = std::fs::read_to_string(d.join("name")) else {
            continue;
        };
        let Some((hba, dev, subtype, cfg)) = parse_uio_name(name.trim_end_matches('\n')) else {
            continue;
        };
        if !SUBTYPES.contains(&subtype.as_str()) {
            continue;
        }
        let size = std::fs::read_to_string(d.join("maps/map0/size"))
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok());
        let Some(map_size) = size else {
            warn!(uio = %uio, "no map0 size; skipped");
            continue;
        };
        let cfs = configfs.join(format!("target/core/user_{hba}/{dev}"));
        out.push(DeviceSpec {
            name: dev,
            uio_path: PathBuf::from("/dev").join(&uio),
            map_size,
            subtype,
            cfgstring: cfg,
            configfs_dir: cfs.is_dir().then_some(cfs),
            size: None,
        });
    }
    out
}

fn usage() -> i32 {
    eprintln!(
        "usage: tcmu-rbd [--sysfs-root DIR] [--configfs-root DIR] [--rescan-ms N]\n       tcmu-rbd check-config SUBTYPE/CFGSTRING\n       tcmu-rbd --version"
    );
    2
}

/// Entry point; returns the exit code.
pub fn run(args: Vec<String>) -> i32 {
    let mut sysfs = PathBuf::from("/sys");
    let mut configfs = PathBuf::from("/sys/kernel/config");
    let mut rescan = Duration::from_millis(500);
    let mut it = args.into_iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--version" | "-V" => {
                println!("tcmu-rbd {}", env!("CARGO_PKG_VERSION"));
                return 0;
            }
            "--help" | "-h" => {
                usage();
                return 0;
            }
            "--sysfs-root" => match it.next() {
                Some(v) => sysfs = v.into(),
                None => return usage(),
            },
            "--configfs-root" => match it.next() {
                Some(v) => configfs = v.into(),
                None => return usage(),
            },
            "--rescan-ms" => match it.next().and_then(|v| v.parse().ok()) {
                Some(v) => rescan = Duration::from_millis(v),
                None => return usage(),
            },
            "check-config" => {
                let Some(cfg) = it.next() else { return usage() };
                let Some((sub, rest)) = cfg.split_once('/') else {
                    eprintln!("config string {cfg:?} has no SUBTYPE/ prefix");
                    return 1;
                };
                return match crate::backends::check_config(sub, rest) {
                    Ok(()) => {
                        println!("valid");
                        0
                    }
                    Err(m) => {
                        eprintln!("{m}");
                        1
                    }
                };
            }
            _ => return usage(),
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    use nix::sys::signal::Signal;
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        if let Err(e) = install_signal(sig) {
            error!(error = %e, "cannot install signal handler");
            return 1;
        }
    }
    let reg = Registry::new();
    info!(version = env!("CARGO_PKG_VERSION"), "tcmu-rbd starting");
    while !STOP.load(Ordering::SeqCst) {
        let found = scan(&sysfs, &configfs);
        let names: Vec<String> = found.iter().map(|s| s.name.clone()).collect();
        for spec in found {
            if reg.names().contains(&spec.name) {
                continue;
            }
            if let Err(e) = reg.add(spec) {
                error!(error = %e, "cannot open device");
            }
        }
        for n in reg.names() {
            if !names.contains(&n) {
                info!(dev = %n, "device gone");
                reg.remove(&n);
            }
        }
        reg.poll_resizes();
        std::thread::sleep(rescan);
    }
    info!("stopping: draining devices");
    reg.stop_all();
    0
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal(sig: nix::sys::signal::Signal) -> std::io::Result<()> {
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only does an atomic store (see on_signal).
    unsafe { nix::sys::signal::sigaction(sig, &action) }.map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uio_names() {
        assert_eq!(
            parse_uio_name("tcm-user/1/disk0/rbd/rbd/img;osd_op_timeout=30"),
            Some((
                1,
                "disk0".into(),
                "rbd".into(),
                "rbd/img;osd_op_timeout=30".into()
            ))
        );
        assert_eq!(
            parse_uio_name("tcm-user/0/d/file//tmp/x.img"),
            Some((0, "d".into(), "file".into(), "/tmp/x.img".into()))
        );
        assert_eq!(parse_uio_name("uio_pci_generic"), None);
        assert_eq!(parse_uio_name("tcm-user/x/d/file/a"), None);
    }
}
