//! The daemon's top level: command line, configuration and logging,
//! signals, the kernel's netlink events (or a sysfs rescan where the
//! TCMU family is absent), the D-Bus service, systemd notification and
//! the status file.
//!
//! One thread runs everything here, sleeping in poll() on a signalfd, the
//! netlink socket and an inotify watch of the config directory; the
//! devices are served by the shared ring threads
//! ([`crate::ring_threads`]); zbus runs the D-Bus service on its own
//! thread. Signals are blocked in every thread and read from the
//! signalfd, so no handler runs asynchronously.

use crate::config::{self, Config, LogTarget, Logging};
use crate::control::Control;
use crate::dbus;
use crate::netlink::{NlError, TcmuChannel};
use crate::registry::Registry;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

pub use crate::control::parse_uio_name;

/// Subtypes this daemon serves.
pub fn subtypes() -> Vec<&'static str> {
    crate::control::subtypes()
}

/// Where the pid and status files go by default.
pub const DEFAULT_RUN_DIR: &str = "/run/tcmu-rbd";
const PID_FILE: &str = "tcmu-rbd.pid";
const STATUS_FILE: &str = "status";
/// How often the D-Bus registration is checked (and redone after the bus
/// restarted).
const DBUS_CHECK: Duration = Duration::from_secs(2);

const USAGE: &str = "\
usage: tcmu-rbd [OPTIONS]                 serve TCMU devices (file, ram, rbd)
       tcmu-rbd check-config SUBTYPE/CFGSTRING
       tcmu-rbd status [--run-dir DIR] [--interval SECS]
       tcmu-rbd --help | --version

options:
  -c, --config PATH       tcmu.conf to read (default /etc/tcmu/tcmu.conf);
                          reloaded when it changes and on SIGHUP
  -d, --debug             log at DEBUG whatever tcmu.conf says
      --log-stderr        log to stderr only (no journald, no log file)
      --run-dir DIR       pid and status files (default /run/tcmu-rbd)
      --no-dbus           do not register org.kernel.TCMUService1
      --dbus-address ADDR use this D-Bus instead of the system bus
      --no-netlink        do not listen to the kernel; rescan sysfs instead
      --rescan-ms N       sysfs rescan period without netlink (default 500)
      --devices NAME[,NAME...]
                          serve only the backstores with these names; for
                          several daemons on one host, each with its own
                          devices and --run-dir. Needs --no-netlink (the
                          kernel expects one reply per event, so only one
                          daemon may answer them); use --no-dbus on all
                          but one of them (one owner of the bus name)
      --sysfs-root DIR    (tests) sysfs mount point (default /sys)
      --configfs-root DIR (tests) configfs mount point (default /sys/kernel/config)
      --interval SECS     (status) refresh twice, SECS apart (default 1), so
                          that IOPS and p50/p99 latency cover that interval;
                          0: one refresh, over the time since the last one

signals: SIGTERM/SIGINT drain every device and exit; SIGHUP reloads tcmu.conf;
         SIGUSR1 logs device status and rewrites RUN_DIR/status.
check-config exits 0 when valid, 1 when not (the reason on stderr), 2 on usage errors.
status exits 0, 1 when the daemon did not answer, 3 when it is not running.
";

#[derive(Debug, Clone)]
struct Opts {
    config: PathBuf,
    debug: bool,
    log_stderr: bool,
    run_dir: PathBuf,
    dbus: Option<dbus::Bus>,
    netlink: bool,
    rescan: Duration,
    devices: Option<std::collections::BTreeSet<String>>,
    sysfs: PathBuf,
    configfs: PathBuf,
}

enum Cmd {
    Serve(Opts),
    CheckConfig(String),
    Status(PathBuf, Duration),
    Exit(i32),
}

fn usage_error(msg: &str) -> Cmd {
    eprintln!("tcmu-rbd: {msg}\n{USAGE}");
    Cmd::Exit(2)
}

fn parse_args(args: Vec<String>) -> Cmd {
    let mut o = Opts {
        config: PathBuf::from(config::DEFAULT_PATH),
        debug: false,
        log_stderr: false,
        run_dir: PathBuf::from(DEFAULT_RUN_DIR),
        dbus: Some(dbus::Bus::System),
        netlink: true,
        rescan: Duration::from_millis(500),
        devices: None,
        sysfs: PathBuf::from("/sys"),
        configfs: PathBuf::from("/sys/kernel/config"),
    };
    let mut it = args.into_iter().skip(1);
    let mut status = false;
    let mut interval = Duration::from_secs(1);
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let r: Result<(), String> = match a.as_str() {
            "--version" | "-V" => {
                println!("tcmu-rbd {}", env!("CARGO_PKG_VERSION"));
                return Cmd::Exit(0);
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return Cmd::Exit(0);
            }
            "check-config" => {
                let Some(cfg) = it.next() else {
                    return usage_error("check-config needs SUBTYPE/CFGSTRING");
                };
                if let Some(extra) = it.next() {
                    return usage_error(&format!("unexpected argument {extra:?}"));
                }
                return Cmd::CheckConfig(cfg);
            }
            "status" => {
                status = true;
                Ok(())
            }
            "-c" | "--config" => val(&a).map(|v| o.config = v.into()),
            "-d" | "--debug" => {
                o.debug = true;
                Ok(())
            }
            "--log-stderr" => {
                o.log_stderr = true;
                Ok(())
            }
            "--run-dir" => val(&a).map(|v| o.run_dir = v.into()),
            "--no-dbus" => {
                o.dbus = None;
                Ok(())
            }
            "--dbus-address" => val(&a).map(|v| o.dbus = Some(dbus::Bus::Address(v))),
            "--no-netlink" => {
                o.netlink = false;
                Ok(())
            }
            "--rescan-ms" => val(&a).and_then(|v| {
                v.parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .map(|n| o.rescan = Duration::from_millis(n))
                    .ok_or(format!("--rescan-ms wants a positive number, got {v:?}"))
            }),
            "--devices" => val(&a).and_then(|v| {
                let set: std::collections::BTreeSet<String> = v
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(String::from)
                    .collect();
                if set.is_empty() || set.iter().any(|n| n.contains('/')) {
                    return Err(format!("--devices wants NAME[,NAME...], got {v:?}"));
                }
                o.devices = Some(set);
                Ok(())
            }),
            "--interval" => val(&a).and_then(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && (0.0..=3600.0).contains(s))
                    .map(|s| interval = Duration::from_secs_f64(s))
                    .ok_or(format!("--interval wants seconds (0 to 3600), got {v:?}"))
            }),
            "--sysfs-root" => val(&a).map(|v| o.sysfs = v.into()),
            "--configfs-root" => val(&a).map(|v| o.configfs = v.into()),
            other => Err(format!("unknown argument {other:?}")),
        };
        if let Err(m) = r {
            return usage_error(&m);
        }
    }
    if o.devices.is_some() && o.netlink && !status {
        // Every listening daemon would get every event, and the kernel
        // takes only one reply per event: a filtered daemon must not
        // listen (it finds its devices by rescanning sysfs instead).
        return usage_error("--devices needs --no-netlink");
    }
    if status {
        Cmd::Status(o.run_dir, interval)
    } else {
        Cmd::Serve(o)
    }
}

/// Entry point; returns the exit code.
pub fn run(args: Vec<String>) -> i32 {
    match parse_args(args) {
        Cmd::Exit(c) => c,
        Cmd::CheckConfig(c) => check_config_cmd(&c),
        Cmd::Status(dir, interval) => status_cmd(&dir, interval),
        Cmd::Serve(o) => serve(o),
    }
}

fn check_config_cmd(cfg: &str) -> i32 {
    let Some((sub, _)) = cfg.split_once('/') else {
        eprintln!("config string {cfg:?} has no SUBTYPE/ prefix (e.g. rbd/pool/image, file//path)");
        return 2;
    };
    if !subtypes().contains(&sub) {
        eprintln!(
            "no handler for subtype {sub:?} (this daemon serves: {})",
            subtypes().join(", ")
        );
        return 1;
    }
    let (ok, msg) = dbus::check(sub, cfg);
    if ok {
        println!("valid");
        0
    } else {
        eprintln!("{msg}");
        1
    }
}

/// Tells systemd (Type=notify) about a state change; a no-op outside
/// systemd.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let r = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        if let Some(abs) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abs)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            sock.send_to(msg.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        warn!(error = %e, msg, "sd_notify failed");
    }
}

fn load_config(path: &Path) -> Option<(Config, Vec<config::Note>)> {
    match config::load(path) {
        Ok(r) => Some(r),
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warn!(error = %e, "cannot read the configuration");
            None
        }
    }
}

struct Status {
    dir: PathBuf,
    generation: u64,
}

impl Status {
    fn write(&mut self, header: &str, lines: &[String]) {
        self.generation += 1;
        let mut text = format!("{header} generation={}\n", self.generation);
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        let tmp = self.dir.join(format!(".{STATUS_FILE}.tmp"));
        let r = std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, self.dir.join(STATUS_FILE)));
        if let Err(e) = r {
            warn!(dir = %self.dir.display(), error = %e, "cannot write the status file");
        }
    }
}

fn generation(dir: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(dir.join(STATUS_FILE)).ok()?;
    let first = s.lines().next()?;
    first
        .split_whitespace()
        .find_map(|w| w.strip_prefix("generation="))
        .and_then(|g| g.parse().ok())
}

/// Asks the daemon to refresh its status file (SIGUSR1) and waits up to
/// 3 s for the new one. None: it did not answer.
fn refresh_status(dir: &Path, pid: nix::unistd::Pid) -> Result<Option<String>, nix::Error> {
    let before = generation(dir);
    nix::sys::signal::kill(pid, Signal::SIGUSR1)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if generation(dir).is_some() && generation(dir) != before {
            if let Ok(s) = std::fs::read_to_string(dir.join(STATUS_FILE)) {
                return Ok(Some(s));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}

/// `tcmu-rbd status`: a first refresh starts the interval (unless it is
/// 0), the second one's lines show IOPS and latency over it.
fn status_cmd(dir: &Path, interval: Duration) -> i32 {
    let pid = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&p| p > 0);
    let Some(pid) = pid else {
        eprintln!("tcmu-rbd is not running (no pid file in {})", dir.display());
        return 3;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    let rounds = if interval.is_zero() { 1 } else { 2 };
    for round in 0..rounds {
        if round > 0 {
            std::thread::sleep(interval);
        }
        match refresh_status(dir, pid) {
            Err(e) => {
                eprintln!("tcmu-rbd (pid {pid}) is not running: {e}");
                return 3;
            }
            Ok(Some(s)) if round + 1 == rounds => {
                print!("{s}");
                return 0;
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
        }
    }
    eprintln!("tcmu-rbd (pid {pid}) did not refresh its status in 3 s");
    if let Ok(s) = std::fs::read_to_string(dir.join(STATUS_FILE)) {
        print!("{s}");
    }
    1
}

/// `ChangeMedium` through configfs: writing `dev_config` and `dev_size`
/// makes the kernel send RECONFIG events, which the main loop applies and
/// answers; the kernel returns that answer as the write's result, and
/// keeps its own view of the device in step with ours.
struct ConfigfsMedium {
    reg: Arc<Registry>,
}

impl dbus::MediumChanger for ConfigfsMedium {
    fn change_medium(
        &self,
        name: &str,
        size: u64,
        subtype: &str,
        cfgstring: &str,
    ) -> Result<(), (i32, String)> {
        let Some(spec) = self.reg.spec(name) else {
            return Err((-libc::ENODEV, format!("no device {name:?} is served")));
        };
        if spec.subtype != subtype {
            return Err((
                -libc::EINVAL,
                format!("{name} is a {} device, not {subtype}", spec.subtype),
            ));
        }
        let Some(dir) = spec.configfs_dir else {
            return Err((-libc::ENODEV, format!("{name} has no configfs directory")));
        };
        let write = |attr: &str, val: String| {
            crate::configfs::write_attrib(&dir, attr, &val).map_err(|e| {
                (
                    -e.raw_os_error().unwrap_or(libc::EIO),
                    format!("{name}: setting {attr}={val}: {e}"),
                )
            })
        };
        write("dev_config", format!("{subtype}/{cfgstring}"))?;
        if spec.size != Some(size) {
            write("dev_size", size.to_string())?;
        }
        Ok(())
    }
}

fn block_signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
    ] {
        mask.add(s);
    }
    // Threads spawned from here on inherit the mask: signals only ever
    // arrive through the signalfd.
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

fn watch_config(path: &Path) -> Option<Inotify> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let ino = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            warn!(error = %e, "inotify unavailable; tcmu.conf is reloaded on SIGHUP only");
            return None;
        }
    };
    // The directory, not the file: editors replace files by renaming.
    let flags = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE;
    match ino.add_watch(dir, flags) {
        Ok(_) => Some(ino),
        Err(e) => {
            info!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload with SIGHUP");
            None
        }
    }
}

fn config_changed(ino: &Inotify, path: &Path) -> bool {
    let name = path.file_name();
    let mut hit = false;
    while let Ok(evs) = ino.read_events() {
        if evs.is_empty() {
            break;
        }
        hit |= evs.iter().any(|e| e.name.as_deref() == name);
    }
    hit
}

struct Daemon {
    o: Opts,
    ctl: Arc<Control>,
    logging: Logging,
    cfg: Config,
    nl: Option<TcmuChannel>,
    status: Status,
    /// Registered on D-Bus now (the supervisor thread keeps it current).
    dbus_up: Arc<AtomicBool>,
    /// The Prometheus endpoint, while tcmu.conf's `metrics_listen` asks
    /// for one and its address could be bound.
    metrics: Option<crate::metrics::Server>,
}

impl Daemon {
    fn header(&self) -> String {
        format!(
            "tcmu-rbd {} pid={} netlink={} dbus={} config={} log_level={} idle_poll_us={} metrics={}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            if self.nl.is_some() { "yes" } else { "no" },
            if self.dbus_up.load(Ordering::Relaxed) {
                "yes"
            } else {
                "no"
            },
            self.o.config.display(),
            self.cfg.log_level,
            self.cfg.idle_poll_us,
            self.metrics
                .as_ref()
                .map_or_else(|| "off".to_string(), |m| m.local_addr().to_string())
        )
    }

    /// Starts, moves or stops the Prometheus endpoint to match
    /// `metrics_listen`. A bind failure is logged and the daemon goes on
    /// serving I/O without the endpoint.
    fn apply_metrics(&mut self, want: Option<std::net::SocketAddr>) {
        let have = self.metrics.as_ref().map(|m| m.local_addr());
        if want.is_some() && want == have {
            return;
        }
        // Dropping the old server first frees its port for the new one.
        self.metrics = None;
        let Some(addr) = want else { return };
        let reg = self.ctl.registry().clone();
        let source: crate::metrics::Source = Arc::new(move || reg.metrics());
        match crate::metrics::Server::start(addr, source) {
            Ok(s) => self.metrics = Some(s),
            Err(e) => error!(error = %e, "metrics endpoint not started"),
        }
    }

    fn write_status(&mut self, log: bool) {
        let lines = self.ctl.status_lines();
        let header = self.header();
        if log {
            info!("status: {header}");
            for l in &lines {
                info!("status: {l}");
            }
        }
        self.status.write(&header, &lines);
    }

    fn reload(&mut self, why: &str) {
        let (cfg, notes) = match config::load(&self.o.config) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "config reload ({why}): cannot read it; settings unchanged");
                return;
            }
        };
        config::report(&self.o.config, &notes);
        self.logging.apply(&cfg);
        self.ctl
            .registry()
            .set_idle_poll(Duration::from_micros(u64::from(cfg.idle_poll_us)));
        tcmu_handler::rbd::service::set_enabled(cfg.service_map);
        tcmu_handler::rbd::slack::set(Duration::from_millis(u64::from(cfg.timer_slack_ms)));
        self.ctl.registry().set_keep_ha_pr(cfg.keep_ha_pr);
        // Also retries a bind that failed before.
        self.apply_metrics(cfg.metrics_listen);
        info!(reason = why, log_level = cfg.log_level, log_dir = %cfg.log_dir.display(), idle_poll_us = cfg.idle_poll_us, service_map = cfg.service_map, timer_slack_ms = cfg.timer_slack_ms, "configuration reloaded");
        debug!("debug logging is on");
        self.cfg = cfg;
        self.write_status(false);
    }

    fn open_netlink(&mut self) {
        match TcmuChannel::open() {
            Ok(ch) => {
                info!(
                    family = ch.family(),
                    "listening to the kernel's TCMU netlink events"
                );
                self.nl = Some(ch);
            }
            Err(NlError::NoFamily(f)) => {
                debug!(family = %f, "TCMU netlink family absent; rescanning sysfs instead");
            }
            Err(e) => warn!(error = %e, "TCMU netlink unavailable; rescanning sysfs instead"),
        }
    }

    fn netlink_ready(&mut self) {
        let Some(ch) = self.nl.as_mut() else { return };
        let incoming = match ch.poll_events() {
            Ok(v) => v,
            Err(e) => {
                // ENOBUFS: the socket overflowed and events were lost;
                // sysfs has the truth.
                error!(error = %e, "netlink receive failed; rescanning sysfs");
                self.ctl.rescan();
                return;
            }
        };
        let changed = !incoming.is_empty();
        for inc in &incoming {
            let reply = self.ctl.answer(inc);
            if let (Some((done, id, status)), Some(ch)) = (reply, self.nl.as_mut()) {
                if let Err(e) = ch.reply(done, id, status) {
                    error!(error = %e, device_id = id, "cannot reply to the kernel");
                }
            }
        }
        if changed {
            self.write_status(false);
        }
    }
}

fn serve(o: Opts) -> i32 {
    let Some((mut d, sigfd, reg)) = start(o) else {
        return 1;
    };
    if d.o.netlink {
        d.open_netlink();
    }
    if let Err(code) = start_dbus(&mut d, &reg) {
        return code;
    }
    let ino = go_ready(&mut d, &reg);
    dispatch(&mut d, &sigfd, ino.as_ref(), &reg);
    shutdown(&mut d, &reg);
    0
}

/// Reads the configuration, starts logging, blocks the signals the main
/// loop takes, writes the pid file and builds the device registry.
/// Raises the soft open-file limit to the hard one. Every rbd LUN holds
/// about 9 fds (its ring worker's 4, its service-map client's 5): at the
/// usual soft limit of 1024 a daemon started outside its unit (which sets
/// `LimitNOFILE`) refused its 114th rbd LUN with EMFILE in the VM's scale
/// run. Says so when the limit stays low.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok((soft, _)) if soft < 16_384 => warn!(
            limit = soft,
            "open-file limit is low: an rbd LUN holds about 9 fds (raise LimitNOFILE)"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

fn start(o: Opts) -> Option<(Daemon, SignalFd, Arc<Registry>)> {
    let loaded = load_config(&o.config);
    let cfg = loaded.as_ref().map(|l| l.0.clone()).unwrap_or_default();
    let target = if o.log_stderr {
        LogTarget::Stderr
    } else {
        config::default_target()
    };
    let logging = Logging::init(&cfg, target, o.debug.then_some(4));
    info!(version = env!("CARGO_PKG_VERSION"), config = %o.config.display(), "tcmu-rbd starting");
    match &loaded {
        Some((_, notes)) => config::report(&o.config, notes),
        None => info!(config = %o.config.display(), "no configuration file; using defaults"),
    }
    raise_fd_limit();
    let sigfd = match block_signals() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot set up signal handling");
            return None;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&o.run_dir).and_then(|_| {
        std::fs::write(
            o.run_dir.join(PID_FILE),
            format!("{}\n", std::process::id()),
        )
    }) {
        error!(dir = %o.run_dir.display(), error = %e, "cannot write the pid file");
        return None;
    }
    let reg = Arc::new(Registry::new());
    reg.set_idle_poll(Duration::from_micros(u64::from(cfg.idle_poll_us)));
    tcmu_handler::rbd::service::set_enabled(cfg.service_map);
    tcmu_handler::rbd::slack::set(Duration::from_millis(u64::from(cfg.timer_slack_ms)));
    reg.set_keep_ha_pr(cfg.keep_ha_pr);
    let mut ctl = Control::new(reg.clone(), &o.sysfs, &o.configfs);
    if let Some(names) = &o.devices {
        info!(devices = ?names, "serving only these backstores (--devices)");
        ctl = ctl.with_device_filter(names.clone());
    }
    let d = Daemon {
        status: Status {
            dir: o.run_dir.clone(),
            generation: 0,
        },
        o,
        ctl: Arc::new(ctl),
        logging,
        cfg,
        nl: None,
        dbus_up: Arc::new(AtomicBool::new(false)),
        metrics: None,
    };
    Some((d, sigfd, reg))
}

/// Registers the D-Bus service targetcli talks to (if asked) and starts
/// the thread that keeps it registered. Err: the exit code.
fn start_dbus(d: &mut Daemon, reg: &Arc<Registry>) -> Result<(), i32> {
    let Some(bus) = d.o.dbus.clone() else {
        return Ok(());
    };
    let changer: Arc<dyn dbus::MediumChanger> = Arc::new(ConfigfsMedium { reg: reg.clone() });
    let first = match dbus::serve(&bus, &crate::backends::handlers(), Some(changer.clone())) {
        Ok(c) => {
            info!(name = dbus::BUS_NAME, "D-Bus service registered");
            d.dbus_up.store(true, Ordering::Relaxed);
            Some(c)
        }
        Err(e @ dbus::DbusError::NameTaken) => {
            error!(error = %e, "refusing to run next to another TCMU daemon");
            let _ = std::fs::remove_file(d.o.run_dir.join(PID_FILE));
            return Err(1);
        }
        Err(e) => {
            warn!(error = %e, "D-Bus unavailable: targetcli cannot list user: backstores until it is back");
            None
        }
    };
    if let Err(e) = dbus::supervise(
        bus,
        crate::backends::handlers(),
        Some(changer),
        first,
        d.dbus_up.clone(),
        DBUS_CHECK,
    ) {
        error!(error = %e, "cannot start the D-Bus thread");
        return Err(1);
    }
    Ok(())
}

/// Serves the devices that exist (created before this daemon started, or
/// while none ran), watches the config file and tells systemd it is
/// ready.
fn go_ready(d: &mut Daemon, reg: &Registry) -> Option<Inotify> {
    d.apply_metrics(d.cfg.metrics_listen);
    d.ctl.rescan();
    d.write_status(false);
    let ino = watch_config(&d.o.config);
    sd_notify("READY=1");
    info!(
        devices = reg.names().len(),
        netlink = d.nl.is_some(),
        "ready"
    );
    ino
}

/// Which of the main loop's inputs are ready.
struct Ready {
    signal: bool,
    netlink: bool,
    config: bool,
}

/// Waits up to `timeout` for a signal, a netlink message or a config
/// file change. None: poll failed for good.
fn wait_inputs(
    d: &Daemon,
    sigfd: &SignalFd,
    ino: Option<&Inotify>,
    timeout: Duration,
) -> Option<Ready> {
    let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
    if let Some(ch) = &d.nl {
        fds.push(PollFd::new(ch.fd(), PollFlags::POLLIN));
    }
    let ino_idx = ino.map(|i| {
        fds.push(PollFd::new(i.as_fd(), PollFlags::POLLIN));
        fds.len() - 1
    });
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    if let Err(e) = nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        if e != nix::errno::Errno::EINTR {
            error!(error = %e, "poll failed");
            return None;
        }
    }
    let ready = |i: usize| {
        fds.get(i)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty())
    };
    Some(Ready {
        signal: ready(0),
        netlink: d.nl.is_some() && ready(1),
        config: ino_idx.is_some_and(ready),
    })
}

/// Handles the pending signals; true: stop.
fn take_signals(d: &mut Daemon, sigfd: &SignalFd) -> bool {
    let mut stop = false;
    while let Ok(Some(si)) = sigfd.read_signal() {
        match Signal::try_from(si.ssi_signo as i32) {
            Ok(Signal::SIGTERM | Signal::SIGINT) => {
                info!(signal = si.ssi_signo, "stopping");
                stop = true;
            }
            Ok(Signal::SIGHUP) => d.reload("SIGHUP"),
            Ok(Signal::SIGUSR1) => d.write_status(true),
            _ => {}
        }
    }
    stop
}

/// The main loop: kernel events, signals and config changes, until
/// SIGTERM/SIGINT. Without netlink, sysfs is rescanned and netlink tried
/// again now and then (the module may be loaded later).
fn dispatch(d: &mut Daemon, sigfd: &SignalFd, ino: Option<&Inotify>, reg: &Registry) {
    let mut last_scan = Instant::now();
    let mut last_nl_try = Instant::now();
    loop {
        let timeout = if d.nl.is_some() {
            Duration::from_secs(5)
        } else {
            d.o.rescan
        };
        let Some(ready) = wait_inputs(d, sigfd, ino, timeout) else {
            break;
        };
        if ready.signal && take_signals(d, sigfd) {
            break;
        }
        if ready.netlink {
            d.netlink_ready();
        }
        if ready.config {
            if let Some(i) = ino {
                if config_changed(i, &d.o.config) {
                    d.reload("file changed");
                }
            }
        }
        if d.nl.is_none() {
            if last_scan.elapsed() >= d.o.rescan {
                d.ctl.rescan();
                reg.poll_resizes();
                last_scan = Instant::now();
            }
            if d.o.netlink && last_nl_try.elapsed() >= Duration::from_secs(10) {
                last_nl_try = Instant::now();
                d.open_netlink();
                if d.nl.is_some() {
                    d.ctl.rescan();
                }
            }
        }
    }
}

/// Drains and stops every device, then the service-map thread.
fn shutdown(d: &mut Daemon, reg: &Registry) {
    sd_notify("STOPPING=1");
    info!("draining devices");
    // Devices created while no daemon runs must not wait for a reply
    // nobody will send; the next daemon picks them up from sysfs.
    if let Some(ch) = d.nl.as_mut() {
        if let Err(e) = ch.set_reply_support(false) {
            warn!(error = %e, "cannot withdraw netlink reply support");
        }
    }
    d.metrics = None;
    reg.stop_all();
    tcmu_handler::rbd::service::stop();
    d.write_status(false);
    let _ = std::fs::remove_file(d.o.run_dir.join(PID_FILE));
    info!("stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("tcmu-rbd")
            .chain(a.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // As a shell leaves it: soft 1024 (or the hard limit if lower).
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(1024), hard).unwrap();
        raise_fd_limit();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }

    #[test]
    fn argument_parsing() {
        assert!(matches!(parse_args(args(&["--bogus"])), Cmd::Exit(2)));
        assert!(matches!(
            parse_args(args(&["--rescan-ms", "x"])),
            Cmd::Exit(2)
        ));
        assert!(matches!(parse_args(args(&["--config"])), Cmd::Exit(2)));
        assert!(matches!(parse_args(args(&["check-config"])), Cmd::Exit(2)));
        assert!(matches!(
            parse_args(args(&["check-config", "ram/x", "extra"])),
            Cmd::Exit(2)
        ));
        match parse_args(args(&["-c", "/x.conf", "--no-dbus", "--rescan-ms", "50"])) {
            Cmd::Serve(o) => {
                assert_eq!(o.config, PathBuf::from("/x.conf"));
                assert_eq!(o.dbus, None);
                assert_eq!(o.rescan, Duration::from_millis(50));
                assert!(o.netlink);
            }
            _ => panic!("expected serve"),
        }
        // A filter without --no-netlink would let two daemons answer one
        // kernel event.
        assert!(matches!(
            parse_args(args(&["--devices", "disk_a"])),
            Cmd::Exit(2)
        ));
        assert!(matches!(
            parse_args(args(&["--no-netlink", "--devices", ","])),
            Cmd::Exit(2)
        ));
        match parse_args(args(&["--no-netlink", "--devices", "disk_a,disk_b"])) {
            Cmd::Serve(o) => {
                assert!(!o.netlink);
                let want: std::collections::BTreeSet<String> =
                    ["disk_a".to_string(), "disk_b".to_string()].into();
                assert_eq!(o.devices, Some(want));
            }
            _ => panic!("expected serve"),
        }
        match parse_args(args(&["status", "--run-dir", "/r"])) {
            Cmd::Status(d, i) => assert_eq!((d, i), (PathBuf::from("/r"), Duration::from_secs(1))),
            _ => panic!("expected status"),
        }
        match parse_args(args(&["status", "--interval", "0.5"])) {
            Cmd::Status(_, i) => assert_eq!(i, Duration::from_millis(500)),
            _ => panic!("expected status"),
        }
        assert!(matches!(
            parse_args(args(&["status", "--interval", "-1"])),
            Cmd::Exit(2)
        ));
    }

    #[test]
    fn status_generation_is_read_back() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Status {
            dir: t.path().to_owned(),
            generation: 0,
        };
        assert_eq!(generation(t.path()), None);
        s.write("hdr", &["device a".into()]);
        assert_eq!(generation(t.path()), Some(1));
        s.write("hdr", &[]);
        assert_eq!(generation(t.path()), Some(2));
    }
}
