//! The Prometheus endpoint, scraped over HTTP while devices served
//! through the emulated kernel do I/O: the counters move by exactly the
//! commands done, `promtool check metrics` accepts the output, every
//! series the Grafana dashboard uses is in it, and the status lines show
//! IOPS and latency over the interval.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::ram::RamBackend;
use tcmu_handler::Backend;
use tcmu_rbd::control::Control;
use tcmu_rbd::metrics::{Server, Source};
use tcmu_rbd::registry::{DeviceSpec, Registry};
use tcmu_rbd_testkit::emulator::{Data, KernelEmu};

const MIB: u64 = 1 << 20;

/// Runs one command to completion: (status, sense key).
fn io(emu: &mut KernelEmu, cdb: &[u8], data: Data<'_>) -> (u8, Option<u8>) {
    emu.submit(cdb, data).expect("submit");
    let mut got = None;
    let end = Instant::now() + Duration::from_secs(10);
    while got.is_none() {
        assert!(Instant::now() < end, "command never completed");
        emu.reap(|r, _| got = Some((r.status, r.sense.as_ref().map(|s| s[2] & 0xf))))
            .expect("reap");
        std::thread::sleep(Duration::from_micros(200));
    }
    got.unwrap()
}

fn spec(name: &str, subtype: &str, cfg: &str) -> DeviceSpec {
    DeviceSpec {
        name: name.into(),
        uio_path: PathBuf::from("/dev/null"),
        map_size: 0,
        subtype: subtype.into(),
        cfgstring: cfg.into(),
        configfs_dir: None,
        size: Some(MIB),
    }
}

fn scrape(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// Samples by their full series (`name{labels}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The metric names a scrape holds (histograms with their suffixes).
fn names(text: &str) -> std::collections::BTreeSet<String> {
    samples(text)
        .keys()
        .map(|k| k.split('{').next().unwrap_or(k).to_string())
        .collect()
}

fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool cannot be run ({e}): install Debian's prometheus package \
             (scripts/deps.sh does); this test does not pass without it"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- output was:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Metric names used by the dashboard's queries (`expr`, and the
/// template variables' `definition`).
fn dashboard_names() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/tcmu-rbd.json");
    let text = std::fs::read_to_string(path).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&json, &mut exprs);
    assert!(exprs.len() > 10, "the dashboard has queries: {exprs:?}");
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        let b = e.as_bytes();
        let mut i = 0;
        while let Some(at) = e[i..].find("tcmu_rbd_") {
            let start = i + at;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            names.insert(e[start..end].to_string());
            i = end;
        }
    }
    names
}

#[test]
fn scraped_counters_move_promtool_accepts_and_the_dashboard_matches() {
    let reg = Arc::new(Registry::new());
    let t = std::env::temp_dir();
    let ctl = Control::new(reg.clone(), &t, &t);

    let ram: Arc<dyn Backend> = Arc::new(RamBackend::new(MIB, 512).unwrap());
    let (mut emu, dev) = emu_device(small_layout(), ram);
    reg.adopt(spec("ram0", "ram", "r0"), dev).expect("adopt");

    let (_emu_ha, dev, fo) = idle_ha_device("ha0");
    reg.adopt_ha(spec("ha0", "rbd", "pool1/ns/img1"), dev, fo)
        .expect("adopt ha");

    let r = reg.clone();
    let source: Source = Arc::new(move || r.metrics());
    let server = Server::start("127.0.0.1:0".parse().unwrap(), source).expect("endpoint");
    let addr = server.local_addr();

    assert!(ctl.status_lines()[1].contains("device ram0"));
    let before = samples(&scrape(addr));
    let v = |s: &BTreeMap<String, f64>, k: &str| s.get(k).copied().unwrap_or(0.0);

    let data = vec![0x5au8; 4096];
    for i in 0..5 {
        assert_eq!(
            io(&mut emu, &rw16(true, i * 8, 8), Data::ToDevice(&data)).0,
            0
        );
    }
    for i in 0..10 {
        assert_eq!(
            io(&mut emu, &rw16(false, i * 8, 8), Data::FromDevice(4096)).0,
            0
        );
    }
    // Past the end: ILLEGAL REQUEST.
    let (st, key) = io(&mut emu, &rw16(false, 1 << 20, 1), Data::FromDevice(512));
    assert_eq!((st, key), (2, Some(5)));
    // TEST UNIT READY: another command.
    assert_eq!(io(&mut emu, &[0u8; 6], Data::None).0, 0);

    let text = scrape(addr);
    let after = samples(&text);
    let d = |k: &str| v(&after, k) - v(&before, k);
    assert_eq!(d("tcmu_rbd_reads_total{device=\"ram0\"}"), 11.0, "{text}");
    assert_eq!(d("tcmu_rbd_writes_total{device=\"ram0\"}"), 5.0);
    assert_eq!(d("tcmu_rbd_other_commands_total{device=\"ram0\"}"), 1.0);
    assert_eq!(
        d("tcmu_rbd_read_bytes_total{device=\"ram0\"}"),
        10.0 * 4096.0 + 512.0
    );
    assert_eq!(
        d("tcmu_rbd_write_bytes_total{device=\"ram0\"}"),
        5.0 * 4096.0
    );
    assert_eq!(
        d("tcmu_rbd_check_conditions_total{device=\"ram0\",sense_key=\"illegal_request\"}"),
        1.0
    );
    assert_eq!(
        d("tcmu_rbd_command_duration_seconds_count{device=\"ram0\"}"),
        17.0
    );
    assert_eq!(
        v(
            &after,
            "tcmu_rbd_command_duration_seconds_bucket{device=\"ram0\",le=\"+Inf\"}"
        ),
        v(
            &after,
            "tcmu_rbd_command_duration_seconds_count{device=\"ram0\"}"
        )
    );
    // Every read and write that reached the backend was timed there.
    assert_eq!(
        d("tcmu_rbd_backend_duration_seconds_count{device=\"ram0\"}"),
        15.0
    );
    assert!(d("tcmu_rbd_command_duration_seconds_sum{device=\"ram0\"}") > 0.0);
    assert_eq!(
        v(&after, "tcmu_rbd_data_area_used_bytes{device=\"ram0\"}"),
        0.0
    );
    assert_eq!(
        v(&after, "tcmu_rbd_data_area_size_bytes{device=\"ram0\"}"),
        (8 << 20) as f64
    );
    assert_eq!(
        v(&after, "tcmu_rbd_commands_in_flight{device=\"ram0\"}"),
        0.0
    );
    assert_eq!(v(&after, "tcmu_rbd_devices"), 2.0);
    assert!(v(&after, "tcmu_rbd_threads") >= 3.0);
    assert!(v(&after, "tcmu_rbd_resident_memory_bytes") > 0.0);
    // The HA device: its ALUA state, lock owner and counters.
    assert_eq!(
        v(
            &after,
            "tcmu_rbd_device_info{device=\"ha0\",subtype=\"rbd\",pool=\"pool1\",image=\"ns/img1\"}"
        ),
        1.0,
        "{text}"
    );
    let states: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("tcmu_rbd_alua_state{device=\"ha0\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(states, 1.0, "one ALUA state is current: {text}");
    assert!(text.contains("tcmu_rbd_lock_owner{device=\"ha0\""));
    assert_eq!(v(&after, "tcmu_rbd_takeovers_total{device=\"ha0\"}"), 0.0);
    assert_eq!(
        v(&after, "tcmu_rbd_blocklist_reopens_total{device=\"ha0\"}"),
        0.0
    );

    promtool_check(&text);

    // Every series the dashboard queries is in the output.
    let have = names(&text);
    let missing: Vec<_> = dashboard_names()
        .into_iter()
        .filter(|n| !have.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard series not exported: {missing:?}"
    );

    // Status: IOPS and percentiles over the interval since the last call.
    let lines = ctl.status_lines();
    let ram_line = lines.iter().find(|l| l.contains("device ram0")).unwrap();
    assert!(ram_line.contains(" iops="), "{ram_line}");
    assert!(
        ram_line.contains(" p50=") && !ram_line.contains("p50=-"),
        "{ram_line}"
    );
    assert!(ram_line.contains(" p99="), "{ram_line}");
    let ha_line = lines.iter().find(|l| l.contains("device ha0")).unwrap();
    assert!(
        ha_line.contains("alua=") && ha_line.contains("lock="),
        "{ha_line}"
    );
    assert!(ha_line.contains("p50=-"), "no I/O on ha0: {ha_line}");

    drop(server);
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
    assert!(reg.remove("ram0"));
    assert!(reg.remove("ha0"));
}
