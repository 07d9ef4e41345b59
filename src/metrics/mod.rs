//! The Prometheus endpoint: per-LUN and daemon-wide series, rendered at
//! scrape time from counters the device workers keep anyway.
//!
//! Off by default; tcmu.conf's `metrics_listen = ADDRESS:PORT` turns it
//! on. The cost on the I/O path is the counters themselves: each device's
//! worker bumps its own [`Stats`] (relaxed loads and stores, no locked
//! instruction, no lock) and records two [`hist::Histogram`]s of fixed
//! log2 buckets; nothing is allocated or formatted per command. A scrape
//! reads those atomics and renders them with the `prometheus` crate's
//! text encoder (the classic text format 0.0.4, which Prometheus scrapes
//! and `promtool check metrics` checks).
//!
//! One thread serves HTTP for the whole daemon, started only when
//! configured: `GET /metrics` and nothing else, one connection at a time,
//! a request bounded in size and time.

pub mod hist;

use crate::device::Stats;
use crate::failover::{state_name, FailoverStatus};
use crate::scsi::alua::AccessState;
use hist::{upper_bound_secs, HistSnapshot, BUCKETS};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// What the endpoint shows of one device.
#[derive(Debug, Clone)]
pub struct DeviceMetrics {
    /// The backstore's name (the `device` label).
    pub name: String,
    /// Handler subtype (`rbd`, `file`, `ram`).
    pub subtype: String,
    /// RADOS pool, for rbd devices.
    pub pool: Option<String>,
    /// RBD image (`namespace/image` inside a namespace), for rbd devices.
    pub image: Option<String>,
    /// The worker's counters.
    pub stats: Arc<Stats>,
    /// The failover manager's state, for rbd devices served behind the
    /// exclusive-lock gate.
    pub failover: Option<FailoverStatus>,
}

/// Where the endpoint gets the device list from at each scrape.
pub type Source = Arc<dyn Fn() -> Vec<DeviceMetrics> + Send + Sync>;

/// Why the endpoint could not start or a scrape could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listening socket could not be set up.
    #[error("metrics endpoint {addr}: {what}: {source}")]
    Io {
        /// The configured address.
        addr: SocketAddr,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The encoder refused the series (a bug: names are fixed).
    #[error("metrics encoding: {0}")]
    Encode(String),
}

/// The sense key names (SPC-4 table 28), as the `sense_key` label shows them.
pub const SENSE_KEYS: [&str; 16] = [
    "no_sense",
    "recovered_error",
    "not_ready",
    "medium_error",
    "hardware_error",
    "illegal_request",
    "unit_attention",
    "data_protect",
    "blank_check",
    "vendor_specific",
    "copy_aborted",
    "aborted_command",
    "reserved_c",
    "volume_overflow",
    "miscompare",
    "reserved_f",
];

const ALUA_STATES: [AccessState; 7] = [
    AccessState::ActiveOptimized,
    AccessState::ActiveNonOptimized,
    AccessState::Standby,
    AccessState::Unavailable,
    AccessState::LbaDependent,
    AccessState::Offline,
    AccessState::Transitioning,
];

fn label_pairs(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).to_string());
            l.set_value((*v).to_string());
            l
        })
        .collect()
}

fn counter(labels: &[(&str, &str)], v: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v as f64);
    let mut m = Metric::from_label(label_pairs(labels));
    m.set_counter(c);
    m
}

fn gauge(labels: &[(&str, &str)], v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(label_pairs(labels));
    m.set_gauge(g);
    m
}

fn histogram(labels: &[(&str, &str)], s: &HistSnapshot) -> Metric {
    let mut cum = 0u64;
    // The last bucket is +Inf: the encoder writes that one from the count.
    let buckets = s.buckets[..BUCKETS - 1]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            cum += n;
            let mut b = Bucket::default();
            b.set_upper_bound(upper_bound_secs(i));
            b.set_cumulative_count(cum);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_sample_count(s.count());
    h.set_sample_sum(s.sum_ns as f64 / 1e9);
    h.set_bucket(buckets);
    let mut m = Metric::from_label(label_pairs(labels));
    m.set_histogram(h);
    m
}

/// The series families, filled device by device, in exposition order.
struct Families(Vec<MetricFamily>);

impl Families {
    fn add(&mut self, name: &str, help: &str, ty: MetricType, metrics: Vec<Metric>) {
        if metrics.is_empty() {
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(ty);
        f.set_metric(metrics);
        self.0.push(f);
    }
}

/// Daemon-wide figures from `/proc/self/status`: (threads, resident bytes).
fn process_figures() -> (Option<u64>, Option<u64>) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |key: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    (field("Threads:"), field("VmRSS:").map(|kb| kb * 1024))
}

/// Renders the endpoint's text for `devs` (Prometheus text format 0.0.4).
pub fn render(devs: &[DeviceMetrics]) -> Result<String, MetricsError> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let mut f = Families(Vec::new());
    let per = |get: &dyn Fn(&Stats) -> u64| -> Vec<Metric> {
        devs.iter()
            .map(|d| counter(&[("device", &d.name)], get(&d.stats)))
            .collect()
    };

    f.add(
        "tcmu_rbd_device_info",
        "A device served, with its handler and (rbd) pool and image.",
        GAUGE,
        devs.iter()
            .map(|d| {
                let pool = d.pool.as_deref().unwrap_or("");
                let image = d.image.as_deref().unwrap_or("");
                gauge(
                    &[
                        ("device", &d.name),
                        ("subtype", &d.subtype),
                        ("pool", pool),
                        ("image", image),
                    ],
                    1.0,
                )
            })
            .collect(),
    );
    f.add(
        "tcmu_rbd_reads_total",
        "READ commands taken from the ring.",
        COUNTER,
        per(&|s| s.reads.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_writes_total",
        "WRITE and WRITE AND VERIFY commands taken from the ring.",
        COUNTER,
        per(&|s| s.writes.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_other_commands_total",
        "Commands other than reads and writes taken from the ring.",
        COUNTER,
        per(&|s| s.others.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_read_bytes_total",
        "Data-in buffer bytes of the reads taken.",
        COUNTER,
        per(&|s| s.read_bytes.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_write_bytes_total",
        "Data-out buffer bytes of the writes taken.",
        COUNTER,
        per(&|s| s.write_bytes.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_completed_commands_total",
        "Commands answered.",
        COUNTER,
        per(&|s| s.completed.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_command_duration_seconds",
        "Handler time: from taking a command off the ring to writing its completion.",
        HISTOGRAM,
        devs.iter()
            .map(|d| histogram(&[("device", &d.name)], &d.stats.latency.snapshot()))
            .collect(),
    );
    f.add(
        "tcmu_rbd_backend_duration_seconds",
        "Backend time: from submitting an operation to its completion.",
        HISTOGRAM,
        devs.iter()
            .map(|d| histogram(&[("device", &d.name)], &d.stats.backend.snapshot()))
            .collect(),
    );
    let mut errors = Vec::new();
    for d in devs {
        for (k, name) in SENSE_KEYS.iter().enumerate() {
            let n = d.stats.sense_keys[k].load(Relaxed);
            // A key is listed from its first use (16 series per device
            // would be mostly zeros); rate() treats a new series as 0.
            if n > 0 {
                errors.push(counter(&[("device", &d.name), ("sense_key", name)], n));
            }
        }
    }
    f.add(
        "tcmu_rbd_check_conditions_total",
        "Commands answered CHECK CONDITION, by sense key (listed from its first use).",
        COUNTER,
        errors,
    );
    f.add(
        "tcmu_rbd_qfull_total",
        "Commands answered BUSY or TASK SET FULL.",
        COUNTER,
        per(&|s| s.qfull.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_ring_full_total",
        "Times the ring became nearly full (90% of its data or command area held by commands in flight).",
        COUNTER,
        per(&|s| s.ring_full.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_merged_commands_total",
        "Reads and writes served by a merged backend operation (adjacent commands taken off the ring together).",
        COUNTER,
        per(&|s| s.merged_commands.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_merged_operations_total",
        "Merged backend operations submitted (each serves two or more commands).",
        COUNTER,
        per(&|s| s.merged_ops.load(Relaxed)),
    );
    f.add(
        "tcmu_rbd_data_area_used_bytes",
        "Data-area bytes held by the buffers of commands in flight.",
        GAUGE,
        devs.iter()
            .map(|d| {
                gauge(
                    &[("device", &d.name)],
                    d.stats.data_in_use.load(Relaxed) as f64,
                )
            })
            .collect(),
    );
    f.add(
        "tcmu_rbd_data_area_size_bytes",
        "Size of the ring's data area.",
        GAUGE,
        devs.iter()
            .map(|d| {
                gauge(
                    &[("device", &d.name)],
                    d.stats.data_area.load(Relaxed) as f64,
                )
            })
            .collect(),
    );
    f.add(
        "tcmu_rbd_commands_in_flight",
        "Commands taken from the ring and not yet answered.",
        GAUGE,
        devs.iter()
            .map(|d| {
                let taken = d.stats.commands.load(Relaxed);
                let done = d.stats.completed.load(Relaxed);
                gauge(&[("device", &d.name)], taken.saturating_sub(done) as f64)
            })
            .collect(),
    );

    // rbd devices behind the exclusive-lock gate (HA gateways).
    let ha: Vec<(&str, &FailoverStatus)> = devs
        .iter()
        .filter_map(|d| d.failover.as_ref().map(|f| (d.name.as_str(), f)))
        .collect();
    let mut alua = Vec::new();
    for (dev, s) in &ha {
        for st in ALUA_STATES {
            let on = if s.state == st { 1.0 } else { 0.0 };
            alua.push(gauge(&[("device", dev), ("state", state_name(st))], on));
        }
    }
    f.add(
        "tcmu_rbd_alua_state",
        "The local port group's ALUA state (1 for the current one).",
        GAUGE,
        alua,
    );
    f.add(
        "tcmu_rbd_lock_owner",
        "Who holds the image's exclusive lock, as last seen (mine, free, an address, unknown).",
        GAUGE,
        ha.iter()
            .map(|(dev, s)| gauge(&[("device", dev), ("owner", &s.lock)], 1.0))
            .collect(),
    );
    f.add(
        "tcmu_rbd_lock_held",
        "1 while this gateway holds the exclusive lock and serves I/O.",
        GAUGE,
        ha.iter()
            .map(|(dev, s)| gauge(&[("device", dev)], if s.serving { 1.0 } else { 0.0 }))
            .collect(),
    );
    f.add(
        "tcmu_rbd_takeovers_total",
        "Times this gateway took the exclusive lock.",
        COUNTER,
        ha.iter()
            .map(|(dev, s)| counter(&[("device", dev)], s.takeovers))
            .collect(),
    );
    f.add(
        "tcmu_rbd_lock_handovers_total",
        "Times this gateway handed the exclusive lock over to another gateway that asked (no fence).",
        COUNTER,
        ha.iter()
            .map(|(dev, s)| counter(&[("device", dev)], s.handovers))
            .collect(),
    );
    f.add(
        "tcmu_rbd_lock_losses_total",
        "Times this gateway lost the exclusive lock.",
        COUNTER,
        ha.iter()
            .map(|(dev, s)| counter(&[("device", dev)], s.losses))
            .collect(),
    );
    f.add(
        "tcmu_rbd_blocklist_reopens_total",
        "Times the image was reopened on a fresh client after this one was blocklisted.",
        COUNTER,
        ha.iter()
            .map(|(dev, s)| counter(&[("device", dev)], s.generation.saturating_sub(1)))
            .collect(),
    );

    // Daemon-wide.
    let (threads, rss) = process_figures();
    f.add(
        "tcmu_rbd_devices",
        "Devices served.",
        GAUGE,
        vec![gauge(&[], devs.len() as f64)],
    );
    f.add(
        "tcmu_rbd_threads",
        "Threads of the daemon process.",
        GAUGE,
        threads.map(|t| gauge(&[], t as f64)).into_iter().collect(),
    );
    f.add(
        "tcmu_rbd_resident_memory_bytes",
        "Resident memory of the daemon process.",
        GAUGE,
        rss.map(|b| gauge(&[], b as f64)).into_iter().collect(),
    );
    f.add(
        "tcmu_rbd_build_info",
        "The daemon's version.",
        GAUGE,
        vec![gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    );

    prometheus::TextEncoder::new()
        .encode_to_string(&f.0)
        .map_err(|e| MetricsError::Encode(e.to_string()))
}

/// Longest request accepted (headers included).
const MAX_REQUEST: usize = 8192;
/// How long one client may take to send its request, and to take the
/// answer: the endpoint has one thread, so a slow client must not hold it.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoint's thread; dropping it stops the thread.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Listens on `addr` and serves `GET /metrics` from `source` on one
    /// thread.
    pub fn start(addr: SocketAddr, source: Source) -> Result<Self, MetricsError> {
        let err = |what| move |source| MetricsError::Io { addr, what, source };
        let listener = TcpListener::bind(addr).map_err(err("bind"))?;
        let bound = listener.local_addr().map_err(err("local address"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tcmu-metrics".into())
            .spawn(move || serve(listener, &flag, &source))
            .map_err(err("spawn thread"))?;
        info!(addr = %bound, "metrics endpoint listening");
        Ok(Server {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The address bound (the port chosen when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Wake accept() with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        info!(addr = %self.addr, "metrics endpoint stopped");
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool, source: &Source) {
    for conn in listener.incoming() {
        if stop.load(Relaxed) {
            return;
        }
        match conn {
            Ok(stream) => {
                if let Err(e) = answer(stream, source) {
                    debug!(error = %e, "metrics request dropped");
                }
            }
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request and writes its answer.
fn answer(mut stream: TcpStream, source: &Source) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_REQUEST {
            return reply(&mut stream, "431 Request Header Fields Too Large", "", b"");
        }
        if Instant::now() > deadline {
            return reply(&mut stream, "408 Request Timeout", "", b"");
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => match render(&source()) {
            Ok(body) => {
                let body = if method == "HEAD" { "" } else { body.as_str() };
                reply(
                    &mut stream,
                    "200 OK",
                    prometheus::TEXT_FORMAT,
                    body.as_bytes(),
                )
            }
            Err(e) => {
                warn!(error = %e, "metrics endpoint cannot render");
                reply(&mut stream, "500 Internal Server Error", "", b"")
            }
        },
        ("GET" | "HEAD", _) => reply(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"tcmu-rbd serves /metrics\n",
        ),
        _ => reply(&mut stream, "405 Method Not Allowed", "", b""),
    }
}

fn reply(stream: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !ctype.is_empty() {
        head.push_str(&format!("Content-Type: {ctype}; charset=utf-8\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str) -> DeviceMetrics {
        DeviceMetrics {
            name: name.into(),
            subtype: "ram".into(),
            pool: None,
            image: None,
            stats: Arc::new(Stats::default()),
            failover: None,
        }
    }

    #[test]
    fn renders_counters_and_histograms() {
        let d = dev("disk0");
        d.stats.reads.store(7, Relaxed);
        d.stats.sense_keys[5].store(2, Relaxed);
        d.stats.latency.record(3_000);
        let text = render(&[d]).unwrap();
        assert!(
            text.contains("tcmu_rbd_reads_total{device=\"disk0\"} 7\n"),
            "{text}"
        );
        assert!(text.contains(
            "tcmu_rbd_check_conditions_total{device=\"disk0\",sense_key=\"illegal_request\"} 2\n"
        ));
        assert!(
            text.contains(
                "tcmu_rbd_command_duration_seconds_bucket{device=\"disk0\",le=\"0.000004\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "tcmu_rbd_command_duration_seconds_bucket{device=\"disk0\",le=\"+Inf\"} 1\n"
        ));
        assert!(text.contains("tcmu_rbd_devices 1\n"));
        // No HA device: no HA families at all.
        assert!(!text.contains("tcmu_rbd_alua_state"));
    }

    #[test]
    fn http_serves_metrics_only() {
        let src: Source = Arc::new(|| vec![dev("d")]);
        let s = Server::start("127.0.0.1:0".parse().unwrap(), src).unwrap();
        let get = |req: &str| {
            let mut c = TcpStream::connect(s.local_addr()).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("tcmu_rbd_reads_total{device=\"d\"} 0"));
        assert!(get("GET /nope HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 405"));
        drop(s);
    }
}
