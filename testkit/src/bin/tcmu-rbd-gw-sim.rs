//! One HA gateway in a process, for the failover drills: an rbd backend on
//! its own rados client, the failover manager, the SCSI core with
//! `--groups` ALUA port groups (1 to N, 2 unless told, one port each;
//! this gateway is `--group`), a
//! device worker on a ring, and the kernel's side of that ring
//! (`emulator`), driven over stdin/stdout one line per command:
//!
//! ```text
//! TAG write LBA BLOCKS SEED   -> TAG ok | TAG sense KK/AA/QQ | TAG error TEXT
//! TAG read LBA BLOCKS         -> TAG ok S,S,...   (per block: the SEED that
//!                                wrote it, 0 for zeros, x for anything else)
//! TAG stpg                    -> SET TARGET PORT GROUPS: local group active/optimized
//! TAG rtpg                    -> TAG ok 1=STATE,2=STATE,...   (REPORT TARGET PORT GROUPS)
//! TAG tur                     -> TEST UNIT READY
//! TAG state                   -> TAG ok <failover status>
//! TAG client                  -> TAG ok ADDRS   (the rados client serving the
//!                                image, as `osd blocklist add` takes it)
//! ```
//! Replies come as commands complete (several may be in flight). Each
//! written block carries a header (magic, LBA, SEED) and SEED-derived
//! filler, so a read tells exactly which write a block holds. Logs go to
//! stderr. EOF on stdin stops the gateway.
//!
//! `--cfg` given more than once serves one LUN per image, as a gateway
//! does (one process, so one rados client for all of them); `TAG @K CMD`
//! sends CMD to LUN K (the K-th `--cfg`, from 0), plain `TAG CMD` to LUN 0.
//!
//! tcmu-rbd-gw-sim --cfg CFGSTRING [--cfg CFGSTRING ...] --size BYTES
//!                 --group G [--groups N] [--name NAME] [--holdoff-ms N]

use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;
use tcmu_handler::rbd::RbdBackend;
use tcmu_rbd::device::{Device, EventDoorbell};
use tcmu_rbd::failover::{state_name, Failover, FailoverOptions};
use tcmu_rbd::ring_threads::RingThreads;
use tcmu_rbd::scsi::alua::{AccessState, AluaConfig, GroupConfig, LocalPort, SharedAlua};
use tcmu_rbd::scsi::LunInfo;
use tcmu_rbd_testkit::cdb::rw16;
use tcmu_rbd_testkit::emulator::{Data, EmuError, KernelEmu, Layout};

const BS: usize = 512;
const MAGIC: &[u8; 8] = b"ALUAGWBK";

fn usage() -> ! {
    eprintln!(
        "usage: tcmu-rbd-gw-sim --cfg CFGSTRING [--cfg CFGSTRING ...] --size BYTES --group G [--groups N] [--name NAME] [--holdoff-ms N]"
    );
    std::process::exit(2)
}

/// The filler of block `lba` written with `seed`.
fn filler(seed: u64, lba: u64, out: &mut [u8]) {
    let mut x = (seed ^ lba.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in out {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn block(seed: u64, lba: u64) -> [u8; BS] {
    let mut b = [0u8; BS];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b[16..24].copy_from_slice(&seed.to_le_bytes());
    filler(seed, lba, &mut b[24..]);
    b
}

fn decode(b: &[u8], lba: u64) -> String {
    if b.iter().all(|&x| x == 0) {
        return "0".into();
    }
    if b.len() != BS || &b[..8] != MAGIC || b[8..16] != lba.to_le_bytes() {
        return "x".into();
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[16..24]);
    let seed = u64::from_le_bytes(s);
    if block(seed, lba)[..] == b[..] {
        seed.to_string()
    } else {
        "x".into()
    }
}

/// What a queued command was, to format its reply.
enum Kind {
    Write,
    Read { lba: u64 },
    Stpg,
    Rtpg,
    Tur,
}

struct Cmd {
    tag: String,
    kind: Kind,
    cdb: Vec<u8>,
    out: Vec<u8>,
    in_len: usize,
}

fn parse(line: &str, group: u16) -> Result<Cmd, (String, String)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let tag = w.first().copied().unwrap_or("?").to_string();
    let bad = |m: &str| (tag.clone(), m.to_string());
    let num = |i: usize| -> Result<u64, (String, String)> {
        w.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad number"))
    };
    let cmd = |kind, cdb: Vec<u8>, out: Vec<u8>, in_len| Cmd {
        tag: tag.clone(),
        kind,
        cdb,
        out,
        in_len,
    };
    match w.get(1).copied() {
        Some("write") => {
            let (lba, n, seed) = (num(2)?, num(3)?, num(4)?);
            let n32 = u32::try_from(n).map_err(|_| bad("too many blocks"))?;
            let mut out = Vec::with_capacity(n as usize * BS);
            for i in 0..n {
                out.extend_from_slice(&block(seed, lba + i));
            }
            Ok(cmd(Kind::Write, rw16(true, lba, n32).to_vec(), out, 0))
        }
        Some("read") => {
            let (lba, n) = (num(2)?, num(3)?);
            let n32 = u32::try_from(n).map_err(|_| bad("too many blocks"))?;
            Ok(cmd(
                Kind::Read { lba },
                rw16(false, lba, n32).to_vec(),
                Vec::new(),
                n as usize * BS,
            ))
        }
        Some("stpg") => {
            let list = vec![0, 0, 0, 0, AccessState::ActiveOptimized as u8, 0, 0, 0];
            let mut list = list;
            list[6..8].copy_from_slice(&group.to_be_bytes());
            let len = (list.len() as u32).to_be_bytes();
            let cdb = vec![0xa4, 0x0a, 0, 0, 0, 0, len[0], len[1], len[2], len[3], 0, 0];
            Ok(cmd(Kind::Stpg, cdb, list, 0))
        }
        Some("rtpg") => {
            let cdb = vec![0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
            Ok(cmd(Kind::Rtpg, cdb, Vec::new(), 256))
        }
        Some("tur") => Ok(cmd(Kind::Tur, vec![0; 6], Vec::new(), 0)),
        _ => Err(bad("unknown command")),
    }
}

fn reply(cmd: &Cmd, status: u8, sense: Option<&[u8]>, data: &[u8]) -> String {
    if status != 0 {
        return match sense {
            Some(s) if s.len() >= 14 => format!(
                "{} sense {:02x}/{:02x}/{:02x}",
                cmd.tag,
                s[2] & 0x0f,
                s[12],
                s[13]
            ),
            _ => format!("{} status {status:#x}", cmd.tag),
        };
    }
    match cmd.kind {
        Kind::Write | Kind::Stpg | Kind::Tur => format!("{} ok", cmd.tag),
        Kind::Read { lba } => {
            let v: Vec<String> = data
                .chunks(BS)
                .enumerate()
                .map(|(i, b)| decode(b, lba + i as u64))
                .collect();
            format!("{} ok {}", cmd.tag, v.join(","))
        }
        Kind::Rtpg => {
            // Descriptors after the 4-byte header: state, supported, id,
            // reserved, status, reserved, port count, 4 bytes per port.
            let mut out = Vec::new();
            let mut p = 4;
            while p + 8 <= data.len() {
                let state = AccessState::from_u8(data[p] & 0x0f).map_or("?", state_name);
                let id = u16::from_be_bytes([data[p + 2], data[p + 3]]);
                out.push(format!("{id}={state}"));
                p += 8 + 4 * usize::from(data[p + 7]);
            }
            format!("{} ok {}", cmd.tag, out.join(","))
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut cfgs = Vec::new();
    let mut size = None;
    let mut group: u16 = 1;
    let mut groups: u16 = 2;
    let mut name = None;
    let mut opts = FailoverOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--cfg" => cfgs.push(val()),
            "--size" => size = val().parse::<u64>().ok(),
            "--group" => group = val().parse().unwrap_or_else(|_| usage()),
            "--groups" => groups = val().parse().unwrap_or_else(|_| usage()),
            "--name" => name = Some(val()),
            "--holdoff-ms" => {
                opts.io_holdoff = Duration::from_millis(val().parse().unwrap_or_else(|_| usage()))
            }
            // 0: take locks by fencing at once, never asking the owner.
            "--handoff-ask-ms" => {
                opts.handoff_ask = Duration::from_millis(val().parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }
    let Some(size) = size else { usage() };
    if cfgs.is_empty() || !(2..=8).contains(&groups) || !(1..=groups).contains(&group) {
        usage()
    }
    let name = name.unwrap_or_else(|| format!("gw{group}"));
    if let Err(e) = serve(&name, &cfgs, size, (group, groups), opts) {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

fn serve(
    name: &str,
    cfgs: &[String],
    size: u64,
    (group, groups): (u16, u16),
    opts: FailoverOptions,
) -> Result<(), String> {
    // The daemon's ring threads, as it serves its devices: one for the
    // one-LUN drills (as before), two (this host's CPUs) for a gateway.
    let rings = RingThreads::new(if cfgs.len() > 1 { 2 } else { 1 });
    // A gateway's LUNs take small writes here: a small data area each
    // keeps 64 of them light.
    let data_size = if cfgs.len() > 1 { 2 << 20 } else { 16 << 20 };
    let mut luns = Vec::with_capacity(cfgs.len());
    for (k, cfg) in cfgs.iter().enumerate() {
        // The one-LUN drills keep their device name (their logs say it).
        let dev = if cfgs.len() > 1 {
            format!("{name}-{k}")
        } else {
            name.to_string()
        };
        let (rbd, fo, alua) = open_gateway(&dev, cfg, size, (group, groups), opts)?;
        let (emu, stop, worker) = start_device(&dev, fo.backend(), alua, &rings, data_size)?;
        luns.push(Lun {
            rbd,
            fo,
            emu,
            stop,
            worker,
            host: Host {
                group,
                waiting: VecDeque::new(),
                inflight: HashMap::new(),
            },
        });
    }
    let mut buf = Vec::new();
    let mut eof = false;
    let stdin = std::io::stdin();
    while !(eof && luns.iter().all(|l| l.host.idle())) {
        let (stdin_ready, fired) = wait_input(&luns, &stdin, eof);
        if stdin_ready {
            eof |= read_stdin(&stdin, &mut buf, &mut luns);
        }
        // Only the LUNs with something to do: a doorbell, or commands
        // waiting for ring space. A quiet 100 ms looks at them all.
        let quiet = !stdin_ready && !fired.contains(&true);
        for (lun, &rang) in luns.iter_mut().zip(&fired) {
            if !rang && !quiet && lun.host.waiting.is_empty() {
                continue;
            }
            lun.host.queue_waiting(&mut lun.emu);
            lun.emu.ack_doorbell();
            if let Err(e) = lun.host.reap(&mut lun.emu) {
                say(format!("- error ring: {e}"));
                eof = true;
                lun.host.inflight.clear();
                lun.host.waiting.clear();
            }
        }
    }
    for lun in luns {
        lun.stop.stop();
        drop(lun.worker.wait());
        drop(lun.fo);
    }
    Ok(())
}

/// One LUN of the gateway: its image, failover manager, emulated kernel
/// side and device.
struct Lun {
    rbd: Arc<RbdBackend>,
    fo: Failover,
    emu: KernelEmu,
    stop: tcmu_rbd::device::Stopper,
    worker: Worker,
    host: Host,
}

/// The rbd image behind the failover manager, with this gateway's port
/// in group `group` of `groups` (all Standby until the lock says
/// otherwise).
fn open_gateway(
    name: &str,
    cfg: &str,
    size: u64,
    (group, groups): (u16, u16),
    opts: FailoverOptions,
) -> Result<(Arc<RbdBackend>, Failover, SharedAlua), String> {
    let rbd = Arc::new(RbdBackend::open(cfg, size, BS as u32)?);
    let g = |id: u16| GroupConfig::new(id, AccessState::Standby, vec![(id, id == group)]);
    let alua = SharedAlua::new(AluaConfig {
        groups: (1..=groups).map(g).collect(),
        local: LocalPort {
            group,
            rel_port: group,
        },
    });
    let fo =
        Failover::start(name, Arc::clone(&rbd) as _, &alua, opts).map_err(|e| e.to_string())?;
    Ok((rbd, fo, alua))
}

type Worker = tcmu_rbd::ring_threads::Served;

/// The emulated kernel and the device worker serving `backend` on it.
fn start_device(
    name: &str,
    backend: Arc<dyn tcmu_handler::Backend>,
    alua: SharedAlua,
    rings: &RingThreads,
    data_size: usize,
) -> Result<(KernelEmu, tcmu_rbd::device::Stopper, Worker), String> {
    let emu = KernelEmu::with_layout(Layout {
        data_size,
        ..Layout::default()
    })
    .map_err(|e| e.to_string())?;
    let ue = emu.user_end().map_err(|e| e.to_string())?;
    let mem = ue.map().map_err(|e| e.to_string())?;
    let info = LunInfo {
        vendor: "LIO-ORG".into(),
        product: "TCMU device".into(),
        revision: "0002".into(),
        serial: "alua-drill".into(),
        geometry: backend.geometry(),
        caps: backend.caps(),
        max_transfer_blocks: 2048,
    };
    let mut dev = Device::new(
        name,
        mem,
        Box::new(EventDoorbell::new(ue.to_user, ue.from_user)),
        backend,
        info,
    )
    .map_err(|e| e.to_string())?;
    dev.lun_mut().set_alua(Arc::new(alua));
    let stop = dev.stopper();
    let worker = rings.serve(dev).map_err(|e| e.to_string())?;
    Ok((emu, stop, worker))
}

/// One line to the driver, flushed at once.
fn say(s: String) {
    let out = std::io::stdout();
    let mut o = out.lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

/// Waits up to 100 ms for a doorbell or stdin: whether stdin is
/// readable, and which LUNs' doorbells rang.
fn wait_input(luns: &[Lun], stdin: &std::io::Stdin, eof: bool) -> (bool, Vec<bool>) {
    let sfd = stdin.as_fd();
    let mut fds: Vec<PollFd> = luns
        .iter()
        .map(|l| PollFd::new(l.emu.doorbell_fd(), PollFlags::POLLIN))
        .collect();
    if !eof {
        fds.push(PollFd::new(sfd, PollFlags::POLLIN));
    }
    let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
    let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
    let fired = fds[..luns.len()].iter().map(ready).collect();
    (!eof && fds.last().is_some_and(ready), fired)
}

/// Reads what stdin has and hands each complete line to its LUN; true at
/// EOF.
fn read_stdin(stdin: &std::io::Stdin, buf: &mut Vec<u8>, luns: &mut [Lun]) -> bool {
    let mut chunk = [0u8; 65536];
    let eof = match nix::unistd::read(stdin.as_raw_fd(), &mut chunk) {
        Ok(0) => true,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            false
        }
        Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => false,
        Err(_) => true,
    };
    while let Some(i) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=i).collect();
        let line = String::from_utf8_lossy(&line).trim().to_string();
        if line.is_empty() {
            continue;
        }
        // `TAG @K CMD...` goes to LUN K: the LUN's handler sees `TAG CMD...`.
        let mut w = line.split_whitespace();
        let tag = w.next().unwrap_or("?");
        let rest: Vec<&str> = w.collect();
        let (k, cmd) = match rest.first().and_then(|t| t.strip_prefix('@')) {
            Some(k) => match k.parse::<usize>() {
                Ok(k) => (k, &rest[1..]),
                Err(_) => {
                    say(format!("{tag} error bad LUN {k:?}"));
                    continue;
                }
            },
            None => (0, &rest[..]),
        };
        match luns.get_mut(k) {
            Some(l) => {
                let line = format!("{tag} {}", cmd.join(" "));
                l.host.line(&line, &l.fo, &l.rbd);
            }
            None => say(format!("{tag} error no LUN {k}")),
        }
    }
    eof
}

/// The driver's side of one LUN's ring: commands waiting for ring space,
/// and in flight.
struct Host {
    group: u16,
    waiting: VecDeque<Cmd>,
    inflight: HashMap<u16, Cmd>,
}

impl Host {
    fn idle(&self) -> bool {
        self.waiting.is_empty() && self.inflight.is_empty()
    }

    /// A query (`state`, `client`) is answered at once; a SCSI command
    /// waits for ring space.
    fn line(&mut self, line: &str, fo: &Failover, rbd: &RbdBackend) {
        let tag = line.split_whitespace().next().unwrap_or("?");
        match line.split_whitespace().nth(1) {
            Some("state") => return say(format!("{tag} ok {}", fo.status())),
            Some("client") => {
                return say(match rbd.client_addrs() {
                    Ok(a) => format!("{tag} ok {a}"),
                    Err(e) => format!("{tag} error {e}"),
                })
            }
            _ => {}
        }
        match parse(line, self.group) {
            Ok(c) => self.waiting.push_back(c),
            Err((tag, e)) => say(format!("{tag} error {e}")),
        }
    }

    /// Queues what fits in the ring and kicks; the rest waits for
    /// completions.
    fn queue_waiting(&mut self, emu: &mut KernelEmu) {
        let mut queued = false;
        while let Some(c) = self.waiting.pop_front() {
            let data = if !c.out.is_empty() {
                Data::ToDevice(&c.out)
            } else if c.in_len > 0 {
                Data::FromDevice(c.in_len)
            } else {
                Data::None
            };
            match emu.queue(&c.cdb, data) {
                Ok(id) => {
                    self.inflight.insert(id, c);
                    queued = true;
                }
                Err(EmuError::Full) => {
                    self.waiting.push_front(c);
                    break;
                }
                Err(e) => say(format!("{} error {e}", c.tag)),
            }
        }
        if queued {
            emu.kick();
        }
    }

    /// Answers the completed commands.
    fn reap(&mut self, emu: &mut KernelEmu) -> Result<(), EmuError> {
        let mut done = Vec::new();
        emu.reap(|r, data| {
            done.push((r.cmd_id, r.status, r.sense.clone(), data.to_vec()));
        })?;
        for (id, status, sense, data) in done {
            if let Some(c) = self.inflight.remove(&id) {
                say(reply(&c, status, sense.as_deref(), &data));
            }
        }
        Ok(())
    }
}
