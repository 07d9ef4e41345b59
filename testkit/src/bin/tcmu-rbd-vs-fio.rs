//! Side by side on one RBD image, in one run: the load generator through
//! the emulated kernel, the ring, the SCSI core and the rbd backend, and
//! fio's own librbd engine (`ioengine=rbd`). Prints IOPS and p99 latency of
//! both and the ratios.
//!
//! tcmu-rbd-vs-fio --conf PATH [--pool rbd] [--image NAME] [--size 1G] [--direct]
//!                 [--seconds 10] [--repeat 3]
//!                 [--cases randwrite:4k:32,randread:4k:32,write:64k:32,read:64k:32]
//!
//! A case's optional fourth field sets our ring's data area
//! (`write:512k:32:8m`: ceph-iscsi's `max_data_area_mb=8`, so 16 such
//! commands fit and the rest wait as in the kernel's qfull queue); an
//! optional fifth the LUN's maximum transfer (`write:1m:8::64k`: LIO's
//! default `hw_max_sectors=128`, so each 1 MiB I/O reaches the ring as 16
//! commands of 64 KiB, as the initiator's block layer splits it; fio gets
//! whole 1 MiB I/Os).
//!
//! Each case runs both `--repeat` times, alternating in ABBA order, and
//! reports each figure's median, every run, and the ratios as the median
//! of each round's ours/fio (the two runs of a round are back to back),
//! so load drifting on a shared machine hits both. CPU time and context switches are counted
//! the same way for both (getrusage of the process, all threads).
//! `--direct` also drives the rbd backend alone (no ring), once per case.
//! fio's client gets the backend's librbd settings (rbd_cache=false,
//! rbd_non_blocking_aio=false, the same op timeouts); `--fio-defaults` adds
//! a run with librbd's dispatch thread and one with librbd's defaults.
//! The image is created if missing and filled once (so reads hit real
//! objects). The two never run at once: each holds the image's exclusive
//! lock while it runs.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tcmu_rbd_testkit::loadgen::{daemon_lun_info, parse_size, run, thread_cpu, Job, Pattern};

struct Case {
    rw: String,
    pattern: Pattern,
    bs: usize,
    qd: usize,
    /// Our ring's data area (`max_data_area_mb`), when the case sets one:
    /// commands that do not fit wait as in the kernel's qfull queue. fio
    /// has no such limit.
    data_area: Option<usize>,
    /// The LUN's maximum transfer: our I/Os split into commands of this
    /// size (fio's are not).
    max_transfer: Option<usize>,
}

struct Measured {
    iops: f64,
    p99_us: f64,
    /// Process CPU time (all threads, librbd's included) per I/O.
    cpu_us_per_io: f64,
    /// Context switches (voluntary and not, all threads) per I/O.
    cs_per_io: f64,
    /// Ours only: CPU µs per I/O of the ring worker thread and of the load
    /// generator's thread (the emulated kernel and initiator); the rest of
    /// `cpu_us_per_io` is librbd's threads and setup.
    split: Option<(f64, f64)>,
    /// Ours only: commands per I/O that went out in a merged backend
    /// operation.
    merged_per_io: Option<f64>,
}

/// CPU time and context switches so far, of this process (all threads)
/// or of its reaped children: the same accounting for both sides.
#[derive(Clone, Copy)]
struct Usage {
    cpu: Duration,
    switches: u64,
}

impl Usage {
    fn now(who: libc::c_int) -> Usage {
        // SAFETY: getrusage fills the struct we pass; zeroed is a valid start.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a rusage.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        Usage {
            cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
            switches: (ru.ru_nvcsw + ru.ru_nivcsw) as u64,
        }
    }

    /// What was used since `self`, per I/O: (CPU µs, context switches).
    fn per_io(self, who: libc::c_int, ios: f64) -> (f64, f64) {
        let n = Usage::now(who);
        let ios = ios.max(1.0);
        (
            (n.cpu - self.cpu).as_secs_f64() * 1e6 / ios,
            n.switches.saturating_sub(self.switches) as f64 / ios,
        )
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: tcmu-rbd-vs-fio --conf PATH [--pool rbd] [--image NAME] [--size 1G] \
         [--seconds 10] [--repeat 3] [--direct] [--fio-defaults] [--spin N] [--cfg-extra ';merge_kb=0'] [--cases rw:bs:qd[:data_area[:max_transfer]],...]"
    );
    std::process::exit(2)
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("tcmu-rbd-vs-fio: {msg}");
    std::process::exit(1)
}

fn rbd_cli(conf: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .map_err(|e| format!("rbd: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The librbd settings the backend uses (handler/src/rbd/conn.rs), given
/// to fio's client too. librbd's default cache policy (writearound)
/// acknowledges writes before the OSDs have them, which a SCSI target
/// without a volatile cache must not do. rbd_non_blocking_aio=false: the
/// backend dispatches on its own thread, so fio's does too.
const SAME_AS_BACKEND: &str = "--rbd_cache=false --rbd_non_blocking_aio=false \
     --rados_osd_op_timeout=31 --rados_mon_op_timeout=31";

/// The backend's settings but librbd's default dispatch thread
/// (`--fio-defaults` shows what the backend's choice is worth to fio).
const SAME_BUT_DISPATCH_THREAD: &str =
    "--rbd_cache=false --rados_osd_op_timeout=31 --rados_mon_op_timeout=31";

/// Runs fio's rbd engine; returns IOPS and p99 completion latency.
fn fio(
    conf: &str,
    ceph_args: &str,
    pool: &str,
    image: &str,
    c: &Case,
    secs: u64,
) -> Result<Measured, String> {
    let u0 = Usage::now(libc::RUSAGE_CHILDREN);
    let out = Command::new("fio")
        .env("CEPH_CONF", conf)
        .env("CEPH_ARGS", ceph_args)
        .args([
            "--name=rbd",
            "--ioengine=rbd",
            "--clientname=admin",
            &format!("--pool={pool}"),
            &format!("--rbdname={image}"),
            &format!("--rw={}", c.rw),
            &format!("--bs={}", c.bs),
            &format!("--iodepth={}", c.qd),
            &format!("--runtime={secs}"),
            "--time_based",
            // Percentiles of the whole latency (submission to completion),
            // as the load generator measures ours, not of clat alone.
            "--lat_percentiles=1",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("3;"))
        .ok_or_else(|| format!("no terse line in fio output: {text}"))?;
    let f: Vec<&str> = line.split(';').collect();
    // Terse v3: read iops at 7, read latency percentiles at 17..37; write
    // iops at 48, write percentiles at 58..78 (values in µs). With
    // lat_percentiles these are of the total latency.
    let write = c.rw.contains("write");
    let (iops_at, pct) = if write { (48, 58..78) } else { (7, 17..37) };
    let iops: f64 = f
        .get(iops_at)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad fio terse line: {line}"))?;
    let p99 = f
        .get(pct)
        .into_iter()
        .flatten()
        .find_map(|v| v.strip_prefix("99.000000%=")?.parse::<f64>().ok())
        .ok_or_else(|| format!("no p99 in fio terse line: {line}"))?;
    let (cpu_us_per_io, cs_per_io) = u0.per_io(libc::RUSAGE_CHILDREN, iops * secs as f64);
    Ok(Measured {
        iops,
        p99_us: p99,
        cpu_us_per_io,
        cs_per_io,
        split: None,
        merged_per_io: None,
    })
}

/// The rbd backend alone, without the ring: QD operations kept in flight
/// through a completion queue (shows what the ring path adds).
fn direct(cfg: &str, size: u64, c: &Case, secs: u64) -> Result<Measured, String> {
    use tcmu_handler::{CompletionQueue, IoBufs, Op};
    let be = tcmu_rbd::backends::open("rbd", cfg, size, 512).map_err(|e| e.to_string())?;
    let q = CompletionQueue::new().map_err(|e| e.to_string())?;
    let slots = size / c.bs as u64;
    let write = matches!(c.pattern, Pattern::RandWrite | Pattern::SeqWrite);
    let random = matches!(c.pattern, Pattern::RandRead | Pattern::RandWrite);
    let bufs: Vec<IoBufs> = (0..c.qd)
        .map(|i| IoBufs::from_vec(vec![i as u8; c.bs]))
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut seq = 0u64;
    let mut next_off = || {
        let slot = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % slots
        } else {
            seq = (seq + 1) % slots;
            seq
        };
        slot * c.bs as u64
    };
    let u0 = Usage::now(libc::RUSAGE_SELF);
    let mut started = vec![std::time::Instant::now(); c.qd];
    let submit = |i: usize, off: u64| {
        let bufs = bufs[i].clone();
        let op = if write {
            Op::Write {
                offset: off,
                bufs,
                fua: false,
            }
        } else {
            Op::Read { offset: off, bufs }
        };
        be.submit(op, q.done(i as u64));
    };
    for (i, t) in started.iter_mut().enumerate() {
        *t = std::time::Instant::now();
        submit(i, next_off());
    }
    let t0 = std::time::Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let mut lat = Vec::new();
    let mut inflight = c.qd;
    while inflight > 0 {
        let Some(done) = q.recv_timeout(Duration::from_secs(60)) else {
            return Err("no completion in 60 s".into());
        };
        done.result.map_err(|e| e.to_string())?;
        let i = done.tag as usize;
        lat.push(started[i].elapsed());
        if std::time::Instant::now() < end {
            started[i] = std::time::Instant::now();
            submit(i, next_off());
        } else {
            inflight -= 1;
        }
    }
    let elapsed = t0.elapsed();
    lat.sort();
    let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
    let (cpu_us_per_io, cs_per_io) = u0.per_io(libc::RUSAGE_SELF, lat.len() as f64);
    Ok(Measured {
        iops: lat.len() as f64 / elapsed.as_secs_f64(),
        p99_us: p99.as_secs_f64() * 1e6,
        cpu_us_per_io,
        cs_per_io,
        split: None,
        merged_per_io: None,
    })
}

fn ours(cfg: &str, size: u64, c: &Case, secs: u64, spin: u32) -> Result<Measured, String> {
    // Counted from before the connection to after the close, as fio's
    // whole process is.
    let u0 = Usage::now(libc::RUSAGE_SELF);
    let be = tcmu_rbd::backends::open("rbd", cfg, size, 512).map_err(|e| e.to_string())?;
    let info = daemon_lun_info("rbd", cfg, size, &*be);
    let job = Job {
        pattern: c.pattern,
        block_size: c.bs,
        queue_depth: c.qd,
        duration: Duration::from_secs(secs),
        spin,
        data_area: c.data_area,
        max_transfer: c.max_transfer,
    };
    let gen0 = thread_cpu();
    let r = run(Arc::clone(&be), info, job).map_err(|e| e.to_string())?;
    let gen = thread_cpu() - gen0;
    drop(be);
    let per_io = |d: Duration| d.as_secs_f64() * 1e6 / (r.ops as f64).max(1.0);
    let (cpu_us_per_io, cs_per_io) = u0.per_io(libc::RUSAGE_SELF, r.ops as f64);
    if r.errors > 0 {
        return Err(format!(
            "{} commands failed (RUST_LOG=tcmu_rbd::device=debug shows their sense)",
            r.errors
        ));
    }
    Ok(Measured {
        iops: r.iops(),
        p99_us: r.p99.as_secs_f64() * 1e6,
        cpu_us_per_io,
        cs_per_io,
        split: Some((per_io(r.worker_cpu), per_io(gen))),
        merged_per_io: Some(r.merged_commands as f64 / (r.ops as f64).max(1.0)),
    })
}

fn median_of(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x.get(x.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Each figure's median over the runs (the p99 of the median-IOPS run
/// would let one figure pick the other).
fn median(v: Vec<Measured>) -> Measured {
    let med = |f: fn(&Measured) -> f64| median_of(v.iter().map(f).collect());
    Measured {
        iops: med(|m| m.iops),
        p99_us: med(|m| m.p99_us),
        cpu_us_per_io: med(|m| m.cpu_us_per_io),
        cs_per_io: med(|m| m.cs_per_io),
        split: None,
        merged_per_io: None,
    }
}

fn main() {
    // RUST_LOG=debug shows the backend's and the worker's logs (e.g. the
    // sense of failed commands) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let real = prepare_image(&a);
    let cfg = format!("{};conf={}{}", a.spec(), a.conf, a.cfg_extra);
    print_header(&a, real);
    for c in &a.cases {
        compare_case(&a, c, &cfg, real);
    }
}

/// The command line.
struct Args {
    conf: String,
    pool: String,
    image: String,
    size: u64,
    secs: u64,
    repeat: usize,
    with_direct: bool,
    fio_defaults: bool,
    spin: u32,
    /// Appended to our cfgstring (`;merge_kb=0`).
    cfg_extra: String,
    cases: Vec<Case>,
}

impl Args {
    fn parse() -> Args {
        let mut conf = None;
        let mut pool = "rbd".to_string();
        let mut image = "tcmu-bench".to_string();
        let mut size: u64 = 1 << 30;
        let mut secs = 10u64;
        let mut repeat = 3usize;
        let mut with_direct = false;
        let mut fio_defaults = false;
        // Two cores serve librbd, the OSD and the ring here: no spinning
        // by default.
        let mut spin = 0u32;
        let mut cfg_extra = String::new();
        let mut cases = "randwrite:4k:32,randread:4k:32,write:64k:32,read:64k:32".to_string();
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().unwrap_or_else(|| usage());
            match a.as_str() {
                "--conf" => conf = Some(val()),
                "--pool" => pool = val(),
                "--image" => image = val(),
                "--size" => size = parse_size(&val()).unwrap_or_else(|| usage()),
                "--seconds" => secs = val().parse().unwrap_or_else(|_| usage()),
                "--cases" => cases = val(),
                "--direct" => with_direct = true,
                "--fio-defaults" => fio_defaults = true,
                "--spin" => spin = val().parse().unwrap_or_else(|_| usage()),
                "--cfg-extra" => cfg_extra = val(),
                "--repeat" => repeat = val().parse().unwrap_or_else(|_| usage()),
                _ => usage(),
            }
        }
        let cases = cases
            .split(',')
            .map(|c| {
                let p: Vec<&str> = c.split(':').collect();
                let (rw, bs, qd, area, mt) = match p.as_slice() {
                    [rw, bs, qd] => (rw, bs, qd, None, None),
                    [rw, bs, qd, area] => (rw, bs, qd, Some(area), None),
                    [rw, bs, qd, area, mt] => (rw, bs, qd, Some(area), Some(mt)),
                    _ => usage(),
                };
                let size = |s: &str| parse_size(s).unwrap_or_else(|| usage()) as usize;
                Case {
                    rw: rw.to_string(),
                    pattern: rw.parse().unwrap_or_else(|e: String| fail(e)),
                    bs: parse_size(bs).unwrap_or_else(|| usage()) as usize,
                    qd: qd.parse().unwrap_or_else(|_| usage()),
                    data_area: area.filter(|a| !a.is_empty()).map(|a| size(a)),
                    max_transfer: mt.map(|m| size(m)),
                }
            })
            .collect();
        Args {
            conf: conf.unwrap_or_else(|| usage()),
            pool,
            image,
            size,
            secs,
            repeat,
            with_direct,
            fio_defaults,
            spin,
            cfg_extra,
            cases,
        }
    }

    fn spec(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

/// Creates and fills the image if it does not exist (so reads meet
/// allocated objects on both sides); returns its size.
fn prepare_image(a: &Args) -> u64 {
    let spec = a.spec();
    if rbd_cli(&a.conf, &["info", &spec]).is_err() {
        rbd_cli(
            &a.conf,
            &["create", "--size", &format!("{}B", a.size), &spec],
        )
        .unwrap_or_else(|e| fail(format!("cannot create {spec}: {e}")));
        let st = Command::new("fio")
            .env("CEPH_CONF", &a.conf)
            .args([
                "--name=fill",
                "--ioengine=rbd",
                "--clientname=admin",
                &format!("--pool={}", a.pool),
                &format!("--rbdname={}", a.image),
                "--rw=write",
                &format!("--bs={}", 4 << 20),
                "--iodepth=8",
                "--output-format=terse",
            ])
            .output()
            .unwrap_or_else(|e| fail(format!("cannot run fio: {e}")));
        if !st.status.success() {
            fail(format!(
                "filling {spec} failed: {}",
                String::from_utf8_lossy(&st.stderr)
            ));
        }
    }
    rbd_cli(&a.conf, &["info", "--format", "json", &spec])
        .ok()
        .and_then(|j| {
            let i = j.find("\"size\":")? + 7;
            j[i..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(a.size)
}

fn print_header(a: &Args, real: u64) {
    println!(
        "image {} ({real} bytes), {} s per run, {} runs each, same image, \
         one after the other (ABBA order); medians, the ratios are medians of \
         each round's ours/fio; fio CEPH_ARGS: {SAME_AS_BACKEND}",
        a.spec(),
        a.secs,
        a.repeat
    );
    println!(
        "{:<13} {:>5} {:>3} | {:>9} {:>9} | {:>9} {:>9} | {:>6} {:>6} | {:>9} | {:>9}",
        "pattern",
        "bs",
        "qd",
        "ours IOPS",
        "fio IOPS",
        "ours p99",
        "fio p99",
        "IOPS x",
        "p99 x",
        "CPU us/IO",
        "ctxsw/IO"
    );
}

/// Each run's IOPS and p99 (and the CPU split, when known).
fn runs_text(v: &[Measured]) -> String {
    v.iter()
        .map(|m| {
            let split = m.split.map_or(String::new(), |(w, g)| {
                format!(" (cpu {:.0}: worker {w:.0} gen {g:.0})", m.cpu_us_per_io)
            });
            let split = match m.merged_per_io {
                Some(x) if x > 0.0 => format!("{split} [merged {x:.1} cmds/IO]"),
                _ => split,
            };
            format!("{:.0}/{:.1}ms{split}", m.iops, m.p99_us / 1000.0)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One case: `repeat` rounds of ours and fio back to back (ABBA), the
/// medians and the per-round ratios, then the optional extra runs.
fn compare_case(a: &Args, c: &Case, cfg: &str, real: u64) {
    let mut os = Vec::new();
    let mut fs = Vec::new();
    let run_ours = || {
        ours(cfg, real, c, a.secs, a.spin).unwrap_or_else(|e| fail(format!("{}: ours: {e}", c.rw)))
    };
    let run_fio = || {
        fio(&a.conf, SAME_AS_BACKEND, &a.pool, &a.image, c, a.secs)
            .unwrap_or_else(|e| fail(format!("{}: fio: {e}", c.rw)))
    };
    // ABBA: neither side always runs first (OSD caches, lock handover).
    for i in 0..a.repeat.max(1) {
        if i % 2 == 0 {
            os.push(run_ours());
            fs.push(run_fio());
        } else {
            fs.push(run_fio());
            os.push(run_ours());
        }
    }
    // Ratios of the two runs of one round, which ran back to back: load
    // drifting between rounds moves both sides of a pair alike.
    let iops_x: Vec<f64> = os
        .iter()
        .zip(&fs)
        .map(|(o, f)| o.iops / f.iops.max(1e-9))
        .collect();
    let p99_x: Vec<f64> = os
        .iter()
        .zip(&fs)
        .map(|(o, f)| o.p99_us / f.p99_us.max(1e-9))
        .collect();
    let runs_line = format!(
        "  runs (IOPS/p99): ours {}; fio {}\n  per-round ratios: IOPS {}; p99 {}",
        runs_text(&os),
        runs_text(&fs),
        list(&iops_x),
        list(&p99_x)
    );
    let (o, f) = (median(os), median(fs));
    let d = a.with_direct.then(|| {
        direct(cfg, real, c, a.secs).unwrap_or_else(|e| fail(format!("{}: direct: {e}", c.rw)))
    });
    println!(
        "{:<13} {:>5} {:>3} | {:>9.0} {:>9.0} | {:>7.0}us {:>7.0}us | {:>6.3} {:>6.3} | {:>4.0}/{:<4.0} | {:>4.1}/{:<4.1}",
        format!(
            "{}{}{}",
            c.rw,
            c.data_area.map_or(String::new(), |d| format!("/{}m", d >> 20)),
            c.max_transfer.map_or(String::new(), |m| format!("/{}k", m >> 10))
        ),
        format!("{}k", c.bs / 1024),
        c.qd,
        o.iops,
        f.iops,
        o.p99_us,
        f.p99_us,
        median_of(iops_x),
        median_of(p99_x),
        o.cpu_us_per_io,
        f.cpu_us_per_io,
        o.cs_per_io,
        f.cs_per_io
    );
    println!("{runs_line}");
    if a.fio_defaults {
        let f = fio(
            &a.conf,
            SAME_BUT_DISPATCH_THREAD,
            &a.pool,
            &a.image,
            c,
            a.secs,
        )
        .unwrap_or_else(|e| fail(format!("{}: fio: {e}", c.rw)));
        println!(
            "  (fio with librbd's dispatch thread, rbd_non_blocking_aio=true: {:.0} IOPS, p99 {:.0}us, {:.0} CPU us/IO)",
            f.iops, f.p99_us, f.cpu_us_per_io
        );
        let f = fio(&a.conf, "", &a.pool, &a.image, c, a.secs)
            .unwrap_or_else(|e| fail(format!("{}: fio: {e}", c.rw)));
        println!(
            "  (fio with librbd's defaults, writes acknowledged early by its cache: {:.0} IOPS, p99 {:.0}us, {:.0} CPU us/IO)",
            f.iops, f.p99_us, f.cpu_us_per_io
        );
    }
    if let Some(d) = d {
        println!(
            "  (backend alone, no ring: {:.0} IOPS, p99 {:.0}us, {:.0} CPU us/IO, {:.1} ctxsw/IO)",
            d.iops, d.p99_us, d.cpu_us_per_io, d.cs_per_io
        );
    }
}
