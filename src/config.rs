//! `/etc/tcmu/tcmu.conf`, read as tcmu-runner reads it, and the logging
//! it controls.
//!
//! The format (tcmu-runner's libtcmu_config.c): one option per line,
//! `key = value`; `#` starts a comment line; a value is an integer
//! (`log_level = 4`) or a string, optionally in single or double quotes
//! (`log_dir = "/var/log"`); a bare `key` is a boolean set to true. The
//! options tcmu-runner 1.5 knows are `log_level` (0 CRIT, 1 ERROR,
//! 2 WARNING, 3 INFO (default), 4 DEBUG, 5 DEBUG SCSI CMD) and `log_dir`
//! (default `/var/log`; older releases called it `log_dir_path`, also
//! accepted). tcmu-rbd adds `idle_poll_us` (default 50, at most
//! 1000000): how long a device's worker keeps looking at its ring after
//! answering every command before it sleeps; 0 sleeps at once, which saves
//! CPU on many lightly used devices at the cost of a wakeup per burst.
//! And `service_map` (`per_image`, the default, or `off`): whether each
//! rbd image gets the `tcmu-runner` service-map entry ceph-iscsi and the
//! Ceph dashboard read (see `tcmu_handler::rbd::service`); it applies to
//! images opened after a change. And `ha_pr` (`refuse`, the default, or
//! `keep`): whether devices gated on an rbd exclusive lock refuse
//! persistent reservations, which gateways cannot share (see
//! `registry::ha_pr`); it applies to devices opened after a change.
//! And `metrics_listen` (`off`, the default, or `ADDRESS:PORT`, e.g.
//! `127.0.0.1:9288` or `[::]:9288`): where the Prometheus endpoint
//! listens (see `metrics`); a change restarts it.
//! And `librados_timer_slack_ms` (default 10, at most 1000; 0 is the
//! kernel's default of 50 µs): how late librados' and librbd's timer and
//! messenger threads may wake from a timed sleep, so that hundreds of idle
//! images' once-a-second ticks share wakeups (see
//! `tcmu_handler::rbd::slack`); it applies at once.
//! Other keys are noted and ignored, a malformed line gets a
//! warning naming it, and everything else in the file still applies.
//!
//! Logs go to journald when running under systemd (`JOURNAL_STREAM` is
//! set), else to `<log_dir>/tcmu-rbd.log` and stderr. A reload (file
//! change or SIGHUP) changes the level and the log file live.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing::level_filters::LevelFilter;
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

/// Where tcmu-runner (and this daemon) look for the file.
pub const DEFAULT_PATH: &str = "/etc/tcmu/tcmu.conf";
/// tcmu-runner's default log directory.
pub const DEFAULT_LOG_DIR: &str = "/var/log";
/// The log file's name inside the log directory.
pub const LOG_FILE_NAME: &str = "tcmu-rbd.log";
/// tcmu-runner's default level (INFO).
pub const DEFAULT_LOG_LEVEL: u8 = 3;
/// The highest tcmu-runner level (DEBUG SCSI CMD).
pub const MAX_LOG_LEVEL: u8 = 5;
/// The default idle poll, µs (the worker's own default).
pub const DEFAULT_IDLE_POLL_US: u32 = 50;
/// The default librados timer slack, ms.
pub const DEFAULT_TIMER_SLACK_MS: u32 = 10;
/// The largest librados timer slack accepted, ms (librados' shortest
/// timeouts are seconds).
pub const MAX_TIMER_SLACK_MS: u32 = 1000;
/// The longest idle poll accepted, µs (a second: beyond that a worker
/// would be a busy loop in all but name).
pub const MAX_IDLE_POLL_US: u32 = 1_000_000;

/// The settings this daemon takes from tcmu.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// tcmu-runner log level, 0..=5.
    pub log_level: u8,
    /// Directory of the log file.
    pub log_dir: PathBuf,
    /// How long a worker polls its ring before sleeping, µs.
    pub idle_poll_us: u32,
    /// Per-image `tcmu-runner` service-map entries (`service_map`).
    pub service_map: bool,
    /// Keep persistent reservations on lock-gated rbd devices (`ha_pr =
    /// keep`; refused by default).
    pub keep_ha_pr: bool,
    /// Where the Prometheus endpoint listens (`metrics_listen`); None:
    /// off, the default.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Timer slack of librados' timer and messenger threads, ms
    /// (`librados_timer_slack_ms`; 0: the kernel's default).
    pub timer_slack_ms: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: DEFAULT_LOG_LEVEL,
            log_dir: PathBuf::from(DEFAULT_LOG_DIR),
            idle_poll_us: DEFAULT_IDLE_POLL_US,
            service_map: true,
            keep_ha_pr: false,
            metrics_listen: None,
            timer_slack_ms: DEFAULT_TIMER_SLACK_MS,
        }
    }
}

/// Something about one line of the file worth telling the admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// 1-based line number.
    pub line: usize,
    /// The line as written (trimmed).
    pub text: String,
    /// What is wrong with it.
    pub msg: String,
    /// Malformed (a warning) rather than merely unknown (info).
    pub malformed: bool,
}

/// Maps a tcmu-runner level to a tracing level: CRIT and ERROR are
/// `error`, DEBUG SCSI CMD (per-command logging) is `trace`.
pub fn level_filter(level: u8) -> LevelFilter {
    match level {
        0 | 1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

fn valid_key(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// A number up to `max`: a larger one is clamped to `max` with a note (as
/// tcmu-runner clamps log_level), anything else is a note and no value.
fn bounded(
    key: &str,
    v: &str,
    max: u32,
    what: &str,
    note: &mut impl FnMut(String, bool),
) -> Option<u32> {
    match v.parse::<u64>() {
        Ok(n) if n <= u64::from(max) => Some(n as u32),
        Ok(n) => {
            note(format!("{key} {n} is above {max}; using {max}"), true);
            Some(max)
        }
        Err(_) => {
            note(format!("{key} wants {what}, got {v:?}"), true);
            None
        }
    }
}

/// Parses the file's text over the defaults.
pub fn parse(text: &str) -> (Config, Vec<Note>) {
    let mut cfg = Config::default();
    let mut notes = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut note = |msg: String, malformed: bool| {
            notes.push(Note {
                line: i + 1,
                text: line.to_string(),
                msg,
                malformed,
            })
        };
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (line, None),
        };
        if !valid_key(key) {
            note(format!("{key:?} is not an option name"), true);
            continue;
        }
        match (key, value) {
            ("log_level", Some(v)) => {
                let what = format!("a number 0..{MAX_LOG_LEVEL}");
                if let Some(n) = bounded(key, v, MAX_LOG_LEVEL.into(), &what, &mut note) {
                    cfg.log_level = n as u8;
                }
            }
            ("log_dir" | "log_dir_path", Some(v)) => {
                let dir = unquote(v);
                if dir.starts_with('/') {
                    cfg.log_dir = PathBuf::from(dir);
                } else {
                    note(
                        format!("{key} wants an absolute directory, got {v:?}"),
                        true,
                    );
                }
            }
            ("idle_poll_us", Some(v)) => {
                let what = "a number of microseconds";
                if let Some(n) = bounded(key, v, MAX_IDLE_POLL_US, what, &mut note) {
                    cfg.idle_poll_us = n;
                }
            }
            ("librados_timer_slack_ms", Some(v)) => {
                let what = "a number of milliseconds";
                if let Some(n) = bounded(key, v, MAX_TIMER_SLACK_MS, what, &mut note) {
                    cfg.timer_slack_ms = n;
                }
            }
            ("service_map", Some(v)) => match unquote(v) {
                "per_image" => cfg.service_map = true,
                "off" => cfg.service_map = false,
                other => note(
                    format!("service_map is per_image or off, got {other:?}"),
                    true,
                ),
            },
            ("ha_pr", Some(v)) => match unquote(v) {
                "refuse" => cfg.keep_ha_pr = false,
                "keep" => cfg.keep_ha_pr = true,
                other => note(format!("ha_pr is refuse or keep, got {other:?}"), true),
            },
            ("metrics_listen", Some(v)) => match unquote(v) {
                "off" => cfg.metrics_listen = None,
                other => match other.parse::<std::net::SocketAddr>() {
                    Ok(a) => cfg.metrics_listen = Some(a),
                    Err(_) => note(
                        format!(
                            "metrics_listen wants off or an IP address and port \
                             (127.0.0.1:9288, [::1]:9288), got {other:?}"
                        ),
                        true,
                    ),
                },
            },
            (
                "log_level"
                | "log_dir"
                | "log_dir_path"
                | "idle_poll_us"
                | "service_map"
                | "ha_pr"
                | "metrics_listen"
                | "librados_timer_slack_ms",
                None,
            ) => note(format!("{key} needs a value (`{key} = ...`)"), true),
            _ => note(format!("unknown option {key:?} ignored"), false),
        }
    }
    (cfg, notes)
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// tcmu-runner refuses files above this size; so do we.
const MAX_FILE: u64 = 2 * 1024 * 1024;

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<(Config, Vec<Note>), LoadError> {
    let err = |source| LoadError {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(err)?.len();
    if len > MAX_FILE {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{len} bytes, more than a config file should hold"),
        )));
    }
    let bytes = std::fs::read(path).map_err(err)?;
    Ok(parse(&String::from_utf8_lossy(&bytes)))
}

/// Logs what parsing noted, naming the file and line.
pub fn report(path: &Path, notes: &[Note]) {
    for n in notes {
        if n.malformed {
            warn!(file = %path.display(), line = n.line, text = %n.text, "{}; line ignored", n.msg);
        } else {
            info!(file = %path.display(), line = n.line, text = %n.text, "{}", n.msg);
        }
    }
}

/// Where logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// The systemd journal (native protocol).
    Journald,
    /// `<log_dir>/tcmu-rbd.log` and stderr.
    FileAndStderr,
    /// stderr only.
    Stderr,
}

/// Picks the log target: journald under systemd, else file + stderr.
pub fn default_target() -> LogTarget {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        LogTarget::Journald
    } else {
        LogTarget::FileAndStderr
    }
}

#[derive(Clone)]
struct SharedWriter {
    file: Arc<Mutex<Option<File>>>,
    stderr: bool,
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut f) = self.file.lock() {
            if let Some(f) = f.as_mut() {
                // A full disk must not stop the daemon; stderr still has it.
                let _ = f.write_all(buf);
            }
        }
        if self.stderr {
            let _ = std::io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SharedWriter {
    type Writer = SharedWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The live logging setup: change level and log file on reload.
pub struct Logging {
    level: reload::Handle<LevelFilter, Registry>,
    file: Arc<Mutex<Option<File>>>,
    target: LogTarget,
    dir: Mutex<Option<PathBuf>>,
    /// With `--debug`, the level stays at DEBUG whatever the file says.
    forced_level: Option<u8>,
}

fn open_log(dir: &Path) -> std::io::Result<File> {
    std::fs::create_dir_all(dir)?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_FILE_NAME))
}

impl Logging {
    /// Installs the global subscriber. `forced_level` overrides the
    /// file's level (the `--debug` flag).
    pub fn init(cfg: &Config, target: LogTarget, forced_level: Option<u8>) -> Logging {
        let level = level_filter(forced_level.unwrap_or(cfg.log_level));
        let (filter, handle) = reload::Layer::new(level);
        let file = Arc::new(Mutex::new(None));
        let mut target = target;
        let mut journald_err = None;
        let journald = if target == LogTarget::Journald {
            match tracing_journald::layer() {
                Ok(j) => Some(j.with_syslog_identifier("tcmu-rbd".into())),
                Err(e) => {
                    journald_err = Some(e);
                    target = LogTarget::Stderr;
                    None
                }
            }
        } else {
            None
        };
        let fmt = journald.is_none().then(|| {
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(SharedWriter {
                    file: file.clone(),
                    stderr: true,
                })
        });
        // A second init (tests running several daemons in one process)
        // keeps the first subscriber.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .with(fmt)
            .try_init();
        let lg = Logging {
            level: handle,
            file,
            target,
            dir: Mutex::new(None),
            forced_level,
        };
        if let Some(e) = journald_err {
            warn!(error = %e, "journald unreachable; logging to stderr");
        }
        lg.set_dir(&cfg.log_dir);
        lg
    }

    /// Where logs go now.
    pub fn target(&self) -> LogTarget {
        self.target
    }

    fn set_dir(&self, dir: &Path) {
        if self.target != LogTarget::FileAndStderr {
            return;
        }
        let Ok(mut cur) = self.dir.lock() else { return };
        if cur.as_deref() == Some(dir) {
            return;
        }
        match open_log(dir) {
            Ok(f) => {
                if let Ok(mut slot) = self.file.lock() {
                    *slot = Some(f);
                }
                *cur = Some(dir.to_owned());
                info!(file = %dir.join(LOG_FILE_NAME).display(), "logging to file");
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot open the log file; keeping the previous log target");
            }
        }
    }

    /// Applies a (re)loaded configuration: level and log directory.
    pub fn apply(&self, cfg: &Config) {
        let level = level_filter(self.forced_level.unwrap_or(cfg.log_level));
        if let Err(e) = self.level.modify(|f| *f = level) {
            warn!(error = %e, "cannot change the log level");
        }
        self.set_dir(&cfg.log_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_default_file_is_all_defaults() {
        let text =
            "# Master TCMU configuration file\n\n# log_level = 3\n#\n# log_dir = \"/var/log\"\n";
        let (cfg, notes) = parse(text);
        assert_eq!(cfg, Config::default());
        assert!(notes.is_empty());
    }

    #[test]
    fn values_quotes_and_aliases() {
        let (cfg, notes) = parse("log_level = 4\nlog_dir = \"/tmp/a b\"\n");
        assert_eq!(cfg.log_level, 4);
        assert_eq!(cfg.log_dir, PathBuf::from("/tmp/a b"));
        assert!(notes.is_empty());
        let (cfg, _) = parse("  log_level=0\nlog_dir_path = '/x'\n");
        assert_eq!(cfg.log_level, 0);
        assert_eq!(cfg.log_dir, PathBuf::from("/x"));
        let (cfg, _) = parse("log_dir = /plain\n");
        assert_eq!(cfg.log_dir, PathBuf::from("/plain"));
    }

    #[test]
    fn malformed_lines_are_named_and_the_rest_applies() {
        let text = "log_level = loud\n= 3\nlog_dir = relative\nlog_dir = \"/good\"\nlog_level = 9\nfrobnicate = 1\nlog_level\n";
        let (cfg, notes) = parse(text);
        // log_level = 9 is clamped (as tcmu-runner clamps), log_dir applied.
        assert_eq!(cfg.log_level, MAX_LOG_LEVEL);
        assert_eq!(cfg.log_dir, PathBuf::from("/good"));
        let lines: Vec<(usize, bool)> = notes.iter().map(|n| (n.line, n.malformed)).collect();
        assert_eq!(
            lines,
            vec![
                (1, true),
                (2, true),
                (3, true),
                (5, true),
                (6, false),
                (7, true)
            ]
        );
        assert!(notes[0].msg.contains("loud"), "{:?}", notes[0]);
        assert_eq!(notes[0].text, "log_level = loud");
    }

    #[test]
    fn idle_poll_is_read_bounded_and_named_when_bad() {
        assert_eq!(parse("").0.idle_poll_us, 50);
        assert_eq!(parse("idle_poll_us = 0\n").0.idle_poll_us, 0);
        assert_eq!(parse("idle_poll_us = 200\n").0.idle_poll_us, 200);
        let (cfg, notes) = parse("idle_poll_us = 5000000\n");
        assert_eq!(cfg.idle_poll_us, MAX_IDLE_POLL_US);
        assert!(
            notes[0].malformed && notes[0].msg.contains("above"),
            "{notes:?}"
        );
        let (cfg, notes) = parse("idle_poll_us = 20\nidle_poll_us = -1\nidle_poll_us\n");
        assert_eq!(cfg.idle_poll_us, 20, "a bad value leaves the last good one");
        assert_eq!(notes.len(), 2);
        assert!(notes[0].msg.contains("\"-1\""), "{notes:?}");
        assert!(notes[1].msg.contains("needs a value"), "{notes:?}");
    }

    #[test]
    fn timer_slack_is_ten_ms_unless_set_and_bounded() {
        assert_eq!(parse("").0.timer_slack_ms, 10);
        assert_eq!(parse("librados_timer_slack_ms = 0\n").0.timer_slack_ms, 0);
        assert_eq!(parse("librados_timer_slack_ms = 40\n").0.timer_slack_ms, 40);
        let (cfg, notes) = parse("librados_timer_slack_ms = 60000\n");
        assert_eq!(cfg.timer_slack_ms, MAX_TIMER_SLACK_MS);
        assert!(notes[0].msg.contains("above 1000"), "{:?}", notes);
        let (cfg, notes) = parse("librados_timer_slack_ms = 5\nlibrados_timer_slack_ms = soon\n");
        assert_eq!(
            cfg.timer_slack_ms, 5,
            "a bad value leaves the last good one"
        );
        assert!(
            notes[0].malformed && notes[0].msg.contains("milliseconds"),
            "{:?}",
            notes
        );
    }

    #[test]
    fn service_map_is_per_image_unless_turned_off() {
        assert!(parse("").0.service_map);
        assert!(!parse("service_map = off\n").0.service_map);
        assert!(parse("service_map = \"per_image\"\n").0.service_map);
        let (cfg, notes) = parse("service_map = off\nservice_map = sometimes\n");
        assert!(!cfg.service_map, "a bad value leaves the last good one");
        assert!(
            notes[0].malformed && notes[0].msg.contains("\"sometimes\""),
            "{notes:?}"
        );
    }

    #[test]
    fn ha_pr_is_refused_unless_kept() {
        assert!(!parse("").0.keep_ha_pr);
        assert!(parse("ha_pr = keep\n").0.keep_ha_pr);
        assert!(!parse("ha_pr = keep\nha_pr = refuse\n").0.keep_ha_pr);
        let (cfg, notes) = parse("ha_pr = maybe\n");
        assert!(!cfg.keep_ha_pr);
        assert!(
            notes[0].malformed && notes[0].msg.contains("\"maybe\""),
            "{notes:?}"
        );
    }

    #[test]
    fn metrics_listen_is_off_unless_given_an_address() {
        assert_eq!(parse("").0.metrics_listen, None);
        let a = parse("metrics_listen = 127.0.0.1:9288\n").0.metrics_listen;
        assert_eq!(a, Some("127.0.0.1:9288".parse().unwrap()));
        let a = parse("metrics_listen = \"[::]:9288\"\n").0.metrics_listen;
        assert_eq!(a, Some("[::]:9288".parse().unwrap()));
        assert_eq!(
            parse("metrics_listen = 127.0.0.1:1\nmetrics_listen = off\n")
                .0
                .metrics_listen,
            None
        );
        for bad in ["localhost:9288", "9288", "127.0.0.1", "127.0.0.1:99999", ""] {
            let (cfg, notes) = parse(&format!("metrics_listen = {bad}\n"));
            assert_eq!(cfg.metrics_listen, None, "{bad}");
            assert!(
                notes.len() == 1 && notes[0].malformed && notes[0].msg.contains("metrics_listen"),
                "{bad}: {notes:?}"
            );
        }
    }

    #[test]
    fn later_lines_win() {
        let (cfg, _) = parse("log_level = 1\nlog_level = 2\n");
        assert_eq!(cfg.log_level, 2);
    }

    #[test]
    fn levels_map_to_tracing() {
        assert_eq!(level_filter(0), LevelFilter::ERROR);
        assert_eq!(level_filter(1), LevelFilter::ERROR);
        assert_eq!(level_filter(2), LevelFilter::WARN);
        assert_eq!(level_filter(3), LevelFilter::INFO);
        assert_eq!(level_filter(4), LevelFilter::DEBUG);
        assert_eq!(level_filter(5), LevelFilter::TRACE);
    }

    #[test]
    fn load_reads_files_and_refuses_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tcmu.conf");
        std::fs::write(&p, "log_level = 5\n").unwrap();
        assert_eq!(load(&p).unwrap().0.log_level, 5);
        let e = load(&dir.path().join("nope")).unwrap_err();
        assert_eq!(e.source.kind(), std::io::ErrorKind::NotFound);
    }
}
