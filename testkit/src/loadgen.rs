//! A fio-like load generator that plays the kernel: it drives a device
//! through the emulated ring at a fixed queue depth and measures IOPS,
//! latency and the worker's CPU time. Used by the benchmarks and by
//! `tcmu-rbd-bench`.

use crate::emulator::{Data, EmuError, KernelEmu, Layout};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::Backend;
use tcmu_rbd::device::{Device, WorkerOptions};
use tcmu_rbd::scsi::LunInfo;

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads.
    SeqRead,
    /// Sequential writes.
    SeqWrite,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::SeqRead,
            "write" => Pattern::SeqWrite,
            _ => {
                return Err(format!(
                    "unknown pattern {s:?} (randread, randwrite, read, write)"
                ))
            }
        })
    }
}

/// One job's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes per I/O.
    pub block_size: usize,
    /// Commands kept in flight.
    pub queue_depth: usize,
    /// How long to run.
    pub duration: Duration,
    /// Worker spin turns before sleeping (see [`WorkerOptions::spin`]).
    pub spin: u32,
    /// The ring's data area in bytes (`max_data_area_mb`); `None` for the
    /// kernel's default. Commands that do not fit wait, as the kernel's
    /// qfull queue holds them, until completions free space.
    pub data_area: Option<usize>,
    /// The LUN's maximum transfer in bytes (`hw_max_sectors` × 512): a
    /// larger I/O is queued as commands of at most this size back to back
    /// in one batch, as the initiator's block layer splits it. IOPS and
    /// latency then count I/Os (one completes with its last command).
    /// `None`: one command per I/O.
    pub max_transfer: Option<usize>,
}

/// What a job measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Commands completed.
    pub ops: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// CPU time the device worker thread used.
    pub worker_cpu: Duration,
    /// Commands the worker served through merged backend operations.
    pub merged_commands: u64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Commands that did not return GOOD.
    pub errors: u64,
}

impl Report {
    /// Operations per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    /// Operations per second of worker CPU time: IOPS per core.
    pub fn iops_per_core(&self) -> f64 {
        self.ops as f64 / self.worker_cpu.as_secs_f64().max(1e-9)
    }
}

/// The LUN the daemon would serve for a `subtype`/`cfg` device of `size`
/// bytes on `backend`: default configfs attributes, the kernel's default
/// ring size (what the bench binaries measure).
pub fn daemon_lun_info(subtype: &str, cfg: &str, size: u64, backend: &dyn Backend) -> LunInfo {
    use tcmu_rbd::ring::abi::{KERNEL_CMDR_AREA, KERNEL_DATA_AREA};
    let spec = tcmu_rbd::registry::DeviceSpec {
        name: "bench".into(),
        uio_path: "/dev/null".into(),
        map_size: 0,
        subtype: subtype.into(),
        cfgstring: cfg.into(),
        configfs_dir: None,
        size: Some(size),
    };
    tcmu_rbd::registry::lun_info(
        &spec,
        &tcmu_rbd::configfs::ConfigfsAttrs::default(),
        backend,
        KERNEL_CMDR_AREA + KERNEL_DATA_AREA,
    )
}

/// A byte count as the bench tools take it: a number with an optional
/// binary suffix K, M or G (`4k`, `64K`, `1G`); None if malformed or
/// too large.
pub fn parse_size(s: &str) -> Option<u64> {
    let (n, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().ok()?.checked_mul(mult)
}

/// CPU time the calling thread has used.
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Errors setting up or running a job.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The emulator failed.
    #[error("emulator: {0}")]
    Emu(#[from] EmuError),
    /// The device failed.
    #[error("device: {0}")]
    Device(#[from] tcmu_rbd::device::DeviceError),
    /// Mapping the ring failed.
    #[error("map: {0}")]
    Map(#[from] std::io::Error),
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `job` against `backend` through a fresh emulated device; the
/// generator waits for completions as the worker does (`job.spin` turns,
/// then sleep).
pub fn run(backend: Arc<dyn Backend>, info: LunInfo, job: Job) -> Result<Report, LoadError> {
    run_with(backend, info, job, None)
}

/// As [`run`], but the generator, which stands for the kernel and the
/// initiator, spins up to `generator_spin` for each completion before it
/// sleeps. The kernel is never asleep when a completion lands, so this
/// makes the worker's own wait policy what the figures measure; the
/// generator's CPU time is not counted in IOPS per core.
pub fn run_with(
    backend: Arc<dyn Backend>,
    info: LunInfo,
    job: Job,
    generator_spin: Option<Duration>,
) -> Result<Report, LoadError> {
    let shape = Shape::of(&job, backend.geometry())?;
    let (mut emu, stopper, worker, stats) = start_worker(backend, info, &job)?;
    let mut gen = Generator::new(&job, shape);
    let start = Instant::now();
    let result = gen.drive(&mut emu, start + job.duration, generator_spin);
    let elapsed = start.elapsed();
    stopper.stop();
    let (wr, worker_cpu) = worker
        .join()
        .map_err(|_| LoadError::Invalid("worker thread panicked".into()))?;
    result?;
    wr?;
    let merged = stats
        .merged_commands
        .load(std::sync::atomic::Ordering::Relaxed);
    Ok(gen.report(elapsed, worker_cpu, merged))
}

/// How a job maps onto the device: blocks per I/O and I/O slots.
#[derive(Clone, Copy)]
struct Shape {
    blocks_per_io: u32,
    /// Blocks per command: `blocks_per_io` split at the maximum transfer.
    blocks_per_cmd: u32,
    slots: u64,
}

impl Shape {
    fn of(job: &Job, geo: tcmu_handler::Geometry) -> Result<Shape, LoadError> {
        let bs = geo.block_size as usize;
        if job.block_size == 0 || !job.block_size.is_multiple_of(bs) || job.queue_depth == 0 {
            return Err(LoadError::Invalid(format!(
                "block size {} must be a multiple of {bs}, queue depth > 0",
                job.block_size
            )));
        }
        let blocks_per_io = (job.block_size / bs) as u32;
        let slots = geo.blocks() / u64::from(blocks_per_io);
        if slots == 0 {
            return Err(LoadError::Invalid("device smaller than one I/O".into()));
        }
        let blocks_per_cmd = match job.max_transfer {
            Some(m) if m < bs || !m.is_multiple_of(bs) => {
                return Err(LoadError::Invalid(format!(
                    "maximum transfer {m} must be a multiple of {bs}"
                )))
            }
            Some(m) => ((m / bs) as u32).min(blocks_per_io),
            None => blocks_per_io,
        };
        Ok(Shape {
            blocks_per_io,
            blocks_per_cmd,
            slots,
        })
    }
}

/// The worker's result and its thread CPU time.
type WorkerResult = (Result<(), tcmu_rbd::device::DeviceError>, Duration);

/// The emulated kernel and a device worker serving `backend` over it, on
/// its own thread (the daemon's worker, as it runs in production).
fn start_worker(
    backend: Arc<dyn Backend>,
    info: LunInfo,
    job: &Job,
) -> Result<
    (
        KernelEmu,
        tcmu_rbd::device::Stopper,
        std::thread::JoinHandle<WorkerResult>,
        Arc<tcmu_rbd::device::Stats>,
    ),
    LoadError,
> {
    let mut layout = Layout::default();
    if let Some(d) = job.data_area {
        layout.data_size = d;
    }
    let emu = KernelEmu::with_layout(layout)?;
    let ue = emu.user_end()?;
    let mem = ue.map()?;
    let mut dev = Device::new(
        "bench",
        mem,
        Box::new(tcmu_rbd::device::EventDoorbell::new(
            ue.to_user,
            ue.from_user,
        )),
        backend,
        info,
    )?;
    dev.set_options(WorkerOptions {
        spin: job.spin,
        ..WorkerOptions::default()
    });
    let stopper = dev.stopper();
    let stats = dev.stats();
    let worker = std::thread::Builder::new()
        .name("tcmu-worker".into())
        .spawn(move || {
            let t0 = thread_cpu();
            let r = dev.run();
            (r, thread_cpu() - t0)
        })?;
    Ok((emu, stopper, worker, stats))
}

/// The host side of the load: issues commands, reaps them, times them.
struct Generator {
    shape: Shape,
    write: bool,
    random: bool,
    block_size: usize,
    queue_depth: usize,
    spin: u32,
    rng: Xorshift,
    seq: u64,
    payload: Vec<u8>,
    cdb: [u8; 16],
    /// Per I/O in flight (by index): commands still out, and when its
    /// batch was queued; free indices in `free_ios`.
    ios: Vec<(u32, Instant)>,
    free_ios: Vec<u32>,
    /// The I/O each command id belongs to.
    io_of_cmd: Vec<u32>,
    /// The I/O being queued: its index, first block, next command.
    cur: Option<(u32, u64, u32)>,
    /// Latencies, ns.
    lat: Vec<u32>,
    errors: u64,
    ops: u64,
    outstanding: usize,
}

impl Generator {
    fn new(job: &Job, shape: Shape) -> Generator {
        let write = matches!(job.pattern, Pattern::RandWrite | Pattern::SeqWrite);
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        let payload: Vec<u8> = (0..job.block_size).map(|_| rng.next() as u8).collect();
        Generator {
            shape,
            write,
            random: matches!(job.pattern, Pattern::RandRead | Pattern::RandWrite),
            block_size: job.block_size,
            queue_depth: job.queue_depth,
            spin: job.spin,
            rng,
            seq: 0,
            payload,
            cdb: crate::cdb::rw16(write, 0, shape.blocks_per_cmd),
            ios: Vec::new(),
            free_ios: Vec::new(),
            io_of_cmd: vec![0; 65536],
            cur: None,
            lat: Vec::with_capacity(1 << 22),
            errors: 0,
            ops: 0,
            outstanding: 0,
        }
    }

    /// Queues the next command: the next piece of the I/O being queued,
    /// or the first of a new one (counted in `outstanding`); false when
    /// the ring is full. An I/O's latency counts from `batch`, the start
    /// of the batch it was queued in (the kernel makes a batch visible at
    /// once, on the kick after it), so one clock read serves the batch.
    #[inline]
    fn issue(&mut self, emu: &mut KernelEmu, batch: Instant) -> Result<bool, EmuError> {
        let (io, first, piece) = match self.cur {
            Some(c) => c,
            None => {
                let slot = if self.random {
                    self.rng.next() % self.shape.slots
                } else {
                    self.seq = (self.seq + 1) % self.shape.slots;
                    self.seq
                };
                (u32::MAX, slot * u64::from(self.shape.blocks_per_io), 0)
            }
        };
        let per = self.shape.blocks_per_cmd;
        let lba = first + u64::from(piece * per);
        let bytes = (per as usize) * (self.block_size / self.shape.blocks_per_io as usize);
        self.cdb[2..10].copy_from_slice(&lba.to_be_bytes());
        let data = if self.write {
            Data::ToDevice(&self.payload[..bytes])
        } else {
            Data::FromDevice(bytes)
        };
        let id = match emu.queue(&self.cdb, data) {
            Ok(id) => id,
            Err(EmuError::Full) => {
                // Resume this I/O at this piece next time.
                if io != u32::MAX {
                    self.cur = Some((io, first, piece));
                }
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let io = if io == u32::MAX {
            self.outstanding += 1;
            let pieces = self.shape.blocks_per_io / per;
            match self.free_ios.pop() {
                Some(i) => {
                    self.ios[i as usize] = (pieces, batch);
                    i
                }
                None => {
                    self.ios.push((pieces, batch));
                    (self.ios.len() - 1) as u32
                }
            }
        } else {
            io
        };
        self.io_of_cmd[id as usize] = io;
        self.cur = ((piece + 1) * per < self.shape.blocks_per_io).then_some((io, first, piece + 1));
        Ok(true)
    }

    /// Reaps what completed; how many.
    #[inline]
    fn reap(&mut self, emu: &mut KernelEmu) -> Result<usize, EmuError> {
        let mut now: Option<Instant> = None;
        let mut ended = 0usize;
        let (errors, lat, ios, free, of) = (
            &mut self.errors,
            &mut self.lat,
            &mut self.ios,
            &mut self.free_ios,
            &self.io_of_cmd,
        );
        emu.reap(|r, _| {
            if r.status != 0 {
                *errors += 1;
            }
            let io = of[r.cmd_id as usize];
            let Some(e) = ios.get_mut(io as usize) else {
                return;
            };
            e.0 = e.0.saturating_sub(1);
            if e.0 == 0 {
                let t = *now.get_or_insert_with(Instant::now);
                lat.push(t.duration_since(e.1).as_nanos() as u32);
                free.push(io);
                ended += 1;
            }
        })?;
        self.ops += ended as u64;
        self.outstanding -= ended;
        Ok(ended)
    }

    /// Waits until at least one command completed: spins (for
    /// `generator_spin`, or `spin` turns), then sleeps in poll() on the
    /// doorbell.
    fn wait_completions(
        &mut self,
        emu: &mut KernelEmu,
        generator_spin: Option<Duration>,
    ) -> Result<(), EmuError> {
        loop {
            let spin_until = generator_spin.map(|d| Instant::now() + d);
            let mut turns = 0u32;
            loop {
                if self.reap(emu)? > 0 {
                    return Ok(());
                }
                turns += 1;
                let spun_out = match spin_until {
                    Some(t) => Instant::now() >= t,
                    None => turns > self.spin.max(1),
                };
                if spun_out {
                    break;
                }
                std::hint::spin_loop();
            }
            let mut fds = [nix::poll::PollFd::new(
                emu.doorbell_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            emu.ack_doorbell();
        }
    }

    /// Keeps `queue_depth` commands in flight until `end`, then lets the
    /// rest finish.
    fn drive(
        &mut self,
        emu: &mut KernelEmu,
        end: Instant,
        generator_spin: Option<Duration>,
    ) -> Result<(), LoadError> {
        let mut batch = Instant::now();
        loop {
            // Whole I/Os: the one begun is queued to its last command.
            while self.outstanding < self.queue_depth || self.cur.is_some() {
                if !self.issue(emu, batch)? {
                    break;
                }
            }
            emu.kick();
            self.wait_completions(emu, generator_spin)?;
            batch = Instant::now();
            if batch >= end {
                break;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while emu.in_flight() > 0 && Instant::now() < deadline {
            let n = emu.reap(|_, _| {})?;
            if n == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    fn report(mut self, elapsed: Duration, worker_cpu: Duration, merged_commands: u64) -> Report {
        self.lat.sort_unstable();
        let lat = &self.lat;
        let pct = |p: f64| -> Duration {
            if lat.is_empty() {
                return Duration::ZERO;
            }
            let i = ((lat.len() as f64 * p) as usize).min(lat.len() - 1);
            Duration::from_nanos(u64::from(lat[i]))
        };
        Report {
            ops: self.ops,
            elapsed,
            worker_cpu,
            merged_commands,
            p50: pct(0.50),
            p99: pct(0.99),
            errors: self.errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_and_without_suffix() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        for bad in ["", "k", "4x", "-1", "1.5G", "99999999999999999999G"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
