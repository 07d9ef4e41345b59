//! The HA chaos soak: two gateway processes (`tcmu-rbd-gw-sim`) serve one
//! image on the live micro cluster; a host writes through them as
//! dm-multipath would (one path at a time, the other path on a standby
//! sense or a dead gateway) and records every write in a ledger. Each
//! round does one fault, picked at random:
//!
//! - `move`: STPG on the standby gateway (planned move);
//! - `kill`: `kill -9` of the owner, restarted at once;
//! - `stop`: SIGSTOP of the owner (split brain): the host gives up on its
//!   writes in flight, as it does after a command timeout or an abort, and
//!   moves to the other gateway; writes are queued to the stopped one
//!   meanwhile; SIGCONT once the other serves: every late write must be
//!   refused;
//! - `osd`: the OSD killed and restarted under I/O;
//! - `blocklist`: `ceph osd blocklist add` of the owner's client;
//! - `mon`: the monitor killed and restarted under I/O.
//!
//! After each round every written block is read through the serving
//! gateway and from `rbd export`, and checked against the ledger (see
//! `tcmu_rbd_testkit::ledger`): no acknowledged write lost, no refused or
//! abandoned write landing after a newer acknowledged one.
//!
//! ```text
//! eval "$(scripts/ceph-cluster.sh env DIR)"
//! tcmu-rbd-chaos --rounds 30 [--seed N] [--actions move,kill,stop,osd,blocklist,mon]
//!                [--gw-sim PATH] [--top DIR] [--log-dir DIR]
//! ```
//! Exits 1 on the first fault, with the ledger's account of the block.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tcmu_rbd_testkit::cluster::{cli, cluster_script, TestImage};
use tcmu_rbd_testkit::gw::{block_at, Block, Gw, GwSpec, BS};
use tcmu_rbd_testkit::ledger::{Fault, Ledger, Report};

/// Blocks per write (4 KiB).
const WB: u64 = 8;
/// Write slots: a 16 MiB region, small enough that slots are rewritten
/// often (a late write then has newer data to overwrite).
const SLOTS: u64 = 4096;
const SIZE: u64 = SLOTS * WB * BS;
/// Writes in flight.
const QD: usize = 8;
/// Late writes queued to a stopped gateway per `stop` round.
const LATE: u64 = 8;
/// A pump that makes no progress for this long is a hang.
const STALL: Duration = Duration::from_secs(120);
/// A pump whose goal is not reached in this long fails, even while writes
/// are acknowledged (say on the wrong path): a round can never run forever.
const PUMP_LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Action {
    Move,
    Kill,
    Stop,
    Osd,
    Blocklist,
    Mon,
}

impl Action {
    const ALL: [Action; 6] = [
        Action::Move,
        Action::Kill,
        Action::Stop,
        Action::Osd,
        Action::Blocklist,
        Action::Mon,
    ];

    fn name(self) -> &'static str {
        match self {
            Action::Move => "move",
            Action::Kill => "kill",
            Action::Stop => "stop",
            Action::Osd => "osd",
            Action::Blocklist => "blocklist",
            Action::Mon => "mon",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// xorshift64*: reproducible rounds from `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A write sent and not yet answered.
struct Pending {
    seed: u64,
    slot: u64,
    /// The host gave up on it (its answer, if one comes, is late).
    abandoned: bool,
    /// Queued to a stopped gateway after the host left it: must be refused.
    late: bool,
}

/// How long a pump runs.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// This many acknowledgements (any path).
    Acks(u64),
    /// This many acknowledgements on this gateway, or stop trying after
    /// this long (the caller looks).
    AcksOnWithin(usize, u64, Duration),
    /// This many acknowledgements, then return with the writes still in
    /// flight (the round's fault strikes under load).
    AcksLeave(u64),
    /// This long, then return without waiting for the writes in flight
    /// (they hang while the OSD is down).
    Leave(Duration),
}

struct Host {
    ledger: Ledger,
    rng: Rng,
    /// The gateway the host writes to (its active path).
    active: usize,
    /// By gateway, by tag.
    pending: Vec<HashMap<String, Pending>>,
    /// Slots with a write in flight that the host still waits for.
    busy: HashSet<u64>,
    /// Slots whose last write failed or was given up: rewritten first, as
    /// a host retries.
    retry: Vec<u64>,
    /// Time of the last acknowledgement, by gateway.
    last_ack: Vec<Option<Instant>>,
    /// The first acknowledgement since the round's fault, by gateway.
    first_ack: Vec<Option<Instant>>,
    /// Acknowledgements, by gateway.
    acks: Vec<u64>,
    /// Late writes acknowledged (must stay 0).
    late_acked: Vec<String>,
    path_switches: u64,
    /// Writes the host gave up on; of those, answered later with GOOD
    /// (landed before the fence) or refused.
    given_up: u64,
    given_up_late_ok: u64,
    given_up_late_refused: u64,
    /// Paths the host does not use (their gateway is stopped or dead, as
    /// multipath's path checker would find).
    down: Vec<bool>,
}

impl Host {
    fn new(seed: u64, gateways: usize) -> Host {
        Host {
            ledger: Ledger::new(1),
            rng: Rng(seed | 1),
            active: 0,
            pending: (0..gateways).map(|_| HashMap::new()).collect(),
            busy: HashSet::new(),
            retry: Vec::new(),
            last_ack: vec![None; gateways],
            first_ack: vec![None; gateways],
            acks: vec![0; gateways],
            late_acked: Vec::new(),
            path_switches: 0,
            given_up: 0,
            given_up_late_ok: 0,
            given_up_late_refused: 0,
            down: vec![false; gateways],
        }
    }

    fn in_flight(&self, gw: usize) -> usize {
        self.pending[gw].values().filter(|p| !p.abandoned).count()
    }

    fn pick_slot(&mut self) -> Option<u64> {
        while let Some(s) = self.retry.pop() {
            if !self.busy.contains(&s) {
                return Some(s);
            }
        }
        for _ in 0..64 {
            let s = self.rng.below(SLOTS);
            if !self.busy.contains(&s) {
                return Some(s);
            }
        }
        None
    }

    fn send_write(&mut self, gws: &mut [Gw], gw: usize, slot: u64, late: bool) {
        let seed = self.ledger.issue(slot * WB, WB, &gws[gw].name);
        let tag = gws[gw].send(&format!("write {} {WB} {seed}", slot * WB));
        if !late {
            self.busy.insert(slot);
        }
        self.pending[gw].insert(
            tag,
            Pending {
                seed,
                slot,
                abandoned: late,
                late,
            },
        );
    }

    /// The host gives up on every write in flight on `gw` (gateway dead or
    /// hung): its slots are rewritten elsewhere.
    fn abandon_all(&mut self, gw: usize, why: &str) {
        for p in self.pending[gw].values_mut() {
            if !p.abandoned {
                p.abandoned = true;
                self.given_up += 1;
                self.ledger.abandon(p.seed, why);
                self.busy.remove(&p.slot);
                self.retry.push(p.slot);
            }
        }
    }

    /// Moves to the next path that is not down (as multipath does on a
    /// standby sense); stays if there is none.
    fn switch_path(&mut self, gws: usize) {
        for k in 1..gws {
            let next = (self.active + k) % gws;
            if !self.down[next] {
                self.active = next;
                self.path_switches += 1;
                return;
            }
        }
    }

    /// Takes the answers that arrived (waiting up to 20 ms on the active
    /// path); returns whether the active path answered with a standby
    /// sense (the host then moves to the other path).
    fn collect(&mut self, gws: &mut [Gw]) -> bool {
        let mut standby = false;
        for (i, gw) in gws.iter_mut().enumerate() {
            if self.pending[i].is_empty() && i != self.active {
                continue;
            }
            let wait = if i == self.active {
                Duration::from_millis(20)
            } else {
                Duration::ZERO
            };
            gw.take_lines(wait);
            let answered: Vec<String> = self.pending[i]
                .keys()
                .filter(|t| gw.replies.contains_key(*t))
                .cloned()
                .collect();
            for tag in answered {
                let Some(p) = self.pending[i].remove(&tag) else {
                    continue;
                };
                let r = gw.replies.remove(&tag).unwrap_or_default();
                self.ledger.answer(p.seed, &r);
                if p.late {
                    if r == "ok" {
                        self.late_acked.push(format!(
                            "{} acknowledged late write seed {} (slot {})",
                            gw.name, p.seed, p.slot
                        ));
                    }
                    continue;
                }
                if p.abandoned {
                    if r == "ok" {
                        self.given_up_late_ok += 1;
                    } else {
                        self.given_up_late_refused += 1;
                    }
                    continue;
                }
                self.busy.remove(&p.slot);
                if r == "ok" {
                    let now = Instant::now();
                    self.acks[i] += 1;
                    self.last_ack[i] = Some(now);
                    self.first_ack[i].get_or_insert(now);
                } else {
                    self.retry.push(p.slot);
                    if i == self.active {
                        if r == "sense 02/04/0a" {
                            // Transitioning: retry here shortly.
                            std::thread::sleep(Duration::from_millis(10));
                        } else {
                            standby = true;
                        }
                    }
                }
            }
        }
        standby
    }

    /// Writes through the active path until `until`, moving to the other
    /// path when the active one refuses; waits for the active path's
    /// writes to finish before returning.
    fn pump(&mut self, gws: &mut [Gw], until: Until) -> Result<(), String> {
        let t0 = Instant::now();
        let acks0 = self.acks.iter().sum::<u64>();
        let per_gw0 = self.acks.clone();
        let mut progress = Instant::now();
        let mut stopping = false;
        loop {
            if !stopping {
                while self.in_flight(self.active) < QD {
                    let Some(slot) = self.pick_slot() else { break };
                    let a = self.active;
                    self.send_write(gws, a, slot, false);
                }
            }
            let before = self.acks.iter().sum::<u64>();
            if self.collect(gws) {
                // Standby: the other path, as multipath fails over; with
                // no other path up, retry here shortly.
                self.switch_path(gws.len());
                std::thread::sleep(Duration::from_millis(20));
            }
            let now_acks = self.acks.iter().sum::<u64>();
            if now_acks > before {
                progress = Instant::now();
            }
            if !stopping {
                stopping = match until {
                    Until::Acks(n) => now_acks - acks0 >= n,
                    Until::AcksOnWithin(g, n, d) => {
                        self.acks[g] - per_gw0[g] >= n || t0.elapsed() >= d
                    }
                    Until::AcksLeave(n) => {
                        if now_acks - acks0 >= n {
                            return Ok(());
                        }
                        false
                    }
                    Until::Leave(d) => {
                        if t0.elapsed() >= d {
                            return Ok(());
                        }
                        false
                    }
                };
            }
            let busy = (0..gws.len()).any(|i| self.in_flight(i) > 0);
            if stopping && !busy {
                return Ok(());
            }
            if t0.elapsed() > PUMP_LIMIT {
                return Err(format!(
                    "{until:?} not reached in {PUMP_LIMIT:?} though writes were acknowledged \
                     ({} on A, {} on B since the pump began; active path {}; logs {} and {})",
                    self.acks[0] - per_gw0[0],
                    self.acks[1] - per_gw0[1],
                    gws[self.active].name,
                    gws[0].log,
                    gws[1].log
                ));
            }
            if progress.elapsed() > STALL {
                return Err(format!(
                    "no write acknowledged for {STALL:?} (active path {}; logs {} and {})",
                    gws[self.active].name, gws[0].log, gws[1].log
                ));
            }
        }
    }

    /// Waits until every write sent to `gw` was answered (late ones too).
    fn drain(&mut self, gws: &mut [Gw], gw: usize, limit: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        while !self.pending[gw].is_empty() {
            if t0.elapsed() > limit {
                return Err(format!(
                    "{}: {} writes unanswered {limit:?} after it resumed (log {})",
                    gws[gw].name,
                    self.pending[gw].len(),
                    gws[gw].log
                ));
            }
            self.collect(gws);
        }
        Ok(())
    }
}

struct Soak {
    spec: GwSpec,
    top: String,
    img: TestImage,
    gws: Vec<Gw>,
    host: Host,
    failovers: Vec<Duration>,
    counts: HashMap<Action, u64>,
    checks: u64,
}

impl Soak {
    fn spawn(&self, i: usize) -> Gw {
        let (name, group) = [("A", 1u16), ("B", 2u16)][i];
        Gw::spawn(&self.spec, name, group, "chaos")
    }

    fn other(&self) -> usize {
        (self.host.active + 1) % self.gws.len()
    }

    /// Reads every written block through the active gateway and from
    /// `rbd export`; both must agree with the ledger.
    fn verify(&mut self, round: u64) -> Result<(), String> {
        let a = self.host.active;
        let mut seen: HashMap<u64, Block> = HashMap::new();
        let total = SLOTS * WB;
        let mut lba = 0;
        while lba < total {
            let n = 256.min(total - lba);
            // A standby path refuses reads: read where the lock is.
            let blocks = match self.gws[a].read_blocks(lba, n) {
                Ok(b) => b,
                Err(e) => return Err(format!("round {round}: {e} (the path in use)")),
            };
            for (i, b) in blocks.into_iter().enumerate() {
                seen.insert(lba + i as u64, b);
            }
            lba += n;
        }
        let through = self
            .host
            .ledger
            .check(|l| seen.get(&l).copied().unwrap_or(Block::Other));
        let bytes = self.img.export();
        let export = self.host.ledger.check(|l| block_at(&bytes, l));
        self.checks += through.blocks + export.blocks;
        for (what, r) in [
            ("read through the owner", &through),
            ("rbd export", &export),
        ] {
            if r.faults_total > 0 || !self.host.late_acked.is_empty() {
                return Err(self.explain(round, what, r));
            }
        }
        Ok(())
    }

    fn explain(&self, round: u64, what: &str, r: &Report) -> String {
        let mut s = format!(
            "round {round}: {what}: {} lost, {} zombie, {} corrupt; late writes acknowledged: {:?}\n",
            r.lost, r.zombies, r.corrupt, self.host.late_acked
        );
        for f in &r.faults {
            let lba = match f {
                Fault::Lost { lba, .. }
                | Fault::Zombie { lba, .. }
                | Fault::Corrupt { lba, .. } => *lba,
            };
            s += &format!("  {f:?}\n    writes of block {lba}, in issue order:\n");
            for w in self
                .host
                .ledger
                .writes()
                .iter()
                .filter(|w| (w.lba..w.lba + w.blocks).contains(&lba))
            {
                s += &format!(
                    "      seed {} via {}: {:?}{}\n",
                    w.seed,
                    w.gw,
                    w.outcome,
                    w.late
                        .as_ref()
                        .map_or(String::new(), |l| format!(" (late answer: {l})"))
                );
            }
        }
        s
    }

    fn round(&mut self, round: u64, action: Action) -> Result<(), String> {
        *self.counts.entry(action).or_default() += 1;
        self.host.pump(&mut self.gws, Until::AcksLeave(100))?;
        let owner = self.host.active;
        let last_old = self.host.last_ack[owner];
        self.host.first_ack = vec![None; self.gws.len()];
        match action {
            Action::Move => {
                let to = self.other();
                let mut moved = false;
                for attempt in 1..=3 {
                    // As multipath's ALUA handler: STPG, retried while the
                    // port is transitioning.
                    let t0 = Instant::now();
                    loop {
                        let r = self.gws[to].call("stpg");
                        if r == "ok" {
                            break;
                        }
                        if r != "sense 02/04/0a" || t0.elapsed() > Duration::from_secs(60) {
                            return Err(format!(
                                "round {round}: STPG on {}: {r}",
                                self.gws[to].name
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    // The old owner is fenced by the takeover: its writes
                    // fail with the standby sense and the host follows.
                    let before = self.host.acks[to];
                    self.host.pump(
                        &mut self.gws,
                        Until::AcksOnWithin(to, 50, Duration::from_secs(8)),
                    )?;
                    if self.host.acks[to] - before >= 50 {
                        moved = true;
                        break;
                    }
                    // A gateway fenced without knowing it yet (stopped
                    // while the other took over, idle since) answers the
                    // STPG as the owner it thinks it is, then finds out
                    // and turns Standby; multipath, seeing that, asks
                    // again.
                    eprintln!(
                        "round {round}: {} answered STPG {attempt} as the owner but did not serve; again",
                        self.gws[to].name
                    );
                }
                if !moved {
                    return Err(format!(
                        "round {round}: {} never served after 3 STPGs (logs {} and {})",
                        self.gws[to].name, self.gws[0].log, self.gws[1].log
                    ));
                }
            }
            Action::Kill => {
                self.gws[owner].kill();
                self.host.abandon_all(owner, "gateway killed");
                self.host.pending[owner].clear();
                self.gws[owner] = self.spawn(owner);
                self.host.switch_path(self.gws.len());
            }
            Action::Stop => {
                use nix::sys::signal::Signal;
                self.gws[owner].signal(Signal::SIGSTOP);
                self.host.down[owner] = true;
                // The host gives up on the stopped path's writes (command
                // timeout / abort) and retries them on the other path.
                self.host
                    .abandon_all(owner, "gateway stopped (host gave up)");
                for _ in 0..LATE {
                    let slot = self.host.rng.below(SLOTS);
                    self.host.send_write(&mut self.gws, owner, slot, true);
                }
                self.host.switch_path(self.gws.len());
                self.host.pump(&mut self.gws, Until::Acks(100))?;
                self.gws[owner].signal(Signal::SIGCONT);
                self.host.down[owner] = false;
                self.host
                    .drain(&mut self.gws, owner, Duration::from_secs(90))?;
            }
            Action::Osd => {
                cluster_script(&self.top, "kill-osd")?;
                self.host
                    .pump(&mut self.gws, Until::Leave(Duration::from_millis(500)))?;
                cluster_script(&self.top, "start-osd")?;
            }
            Action::Blocklist => {
                let r = self.gws[owner].call("client");
                let addrs = r
                    .strip_prefix("ok ")
                    .ok_or_else(|| format!("round {round}: client address: {r}"))?;
                let addr = addrs
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("v2:")
                    .trim_start_matches("v1:")
                    .to_string();
                cli("ceph", &["osd", "blocklist", "add", &addr, "3600"]);
                // Its writes fail from now on and the host follows the
                // standby senses. Either gateway may end up the owner: the
                // fenced one reopens on a fresh client and may take the
                // lock back (rightly, when the other is still in its
                // hold-off after a loss of its own); the ledger checks that
                // nothing the old client wrote after the fence was acked.
                self.host.pump(&mut self.gws, Until::Acks(50))?;
            }
            Action::Mon => {
                cluster_script(&self.top, "restart-mon")?;
            }
        }
        self.host.pump(&mut self.gws, Until::Acks(200))?;
        let now = self.host.active;
        if now != owner {
            // Last acknowledgement on the old path before the fault to
            // the first on the new one after it.
            if let (Some(a), Some(b)) = (last_old, self.host.first_ack[now]) {
                self.failovers.push(b.saturating_duration_since(a));
            }
        }
        self.verify(round)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn usage() -> ! {
    eprintln!(
        "usage: tcmu-rbd-chaos --rounds N [--seed N] [--actions move,kill,stop,osd,blocklist,mon] \
         [--gw-sim PATH] [--top DIR] [--log-dir DIR]\n\
         (run under: eval \"$(scripts/ceph-cluster.sh env DIR)\")"
    );
    std::process::exit(2)
}

fn main() {
    let mut rounds = 30u64;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut actions: Vec<Action> = Action::ALL.to_vec();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .unwrap_or_default();
    let mut gw_sim = exe_dir
        .join("tcmu-rbd-gw-sim")
        .to_string_lossy()
        .into_owned();
    let mut top = ".".to_string();
    let mut log_dir = std::env::temp_dir()
        .join("tcmu-rbd-chaos")
        .to_string_lossy()
        .into_owned();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--rounds" => rounds = val().parse().unwrap_or_else(|_| usage()),
            "--seed" => seed = val().parse().unwrap_or_else(|_| usage()),
            "--actions" => {
                actions = val()
                    .split(',')
                    .map(|s| Action::parse(s).unwrap_or_else(|| usage()))
                    .collect()
            }
            "--gw-sim" => gw_sim = val(),
            "--top" => top = val(),
            "--log-dir" => log_dir = val(),
            _ => usage(),
        }
    }
    if actions.is_empty() || rounds == 0 {
        usage()
    }
    std::process::exit(match run(rounds, seed, &actions, gw_sim, top, log_dir) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("chaos: FAIL: {e}");
            1
        }
    })
}

fn run(
    rounds: u64,
    seed: u64,
    actions: &[Action],
    gw_sim: String,
    top: String,
    log_dir: String,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(&log_dir);
    let img = TestImage::new("chaos", SIZE);
    let spec = GwSpec {
        bin: gw_sim,
        cfg: img.cfg(";osd_op_timeout=30"),
        size: SIZE,
        log_dir,
        // Short enough that a path the host comes back to soon after a
        // loss takes the lock by I/O again.
        extra: vec!["--holdoff-ms".into(), "1000".into()],
    };
    println!(
        "chaos: seed {seed}, {rounds} rounds of {:?}, image {} ({} slots of {} KiB), QD {QD}",
        actions.iter().map(|a| a.name()).collect::<Vec<_>>(),
        img.spec(),
        SLOTS,
        WB * BS / 1024
    );
    let mut soak = Soak {
        spec,
        top,
        img,
        gws: Vec::new(),
        host: Host::new(seed, 2),
        failovers: Vec::new(),
        counts: HashMap::new(),
        checks: 0,
    };
    soak.gws = vec![soak.spawn(0), soak.spawn(1)];
    let t0 = Instant::now();
    for round in 1..=rounds {
        let action = actions[soak.host.rng.below(actions.len() as u64) as usize];
        let tr = Instant::now();
        soak.round(round, action)?;
        println!(
            "round {round}/{rounds}: {:<9} path {} acked {} writes, ledger clean ({} ms)",
            action.name(),
            soak.gws[soak.host.active].name,
            soak.host.ledger.acked(),
            tr.elapsed().as_millis()
        );
    }
    let mut fo = soak.failovers.clone();
    fo.sort();
    let counts: Vec<String> = Action::ALL
        .iter()
        .map(|a| format!("{} {}", a.name(), soak.counts.get(a).copied().unwrap_or(0)))
        .collect();
    println!(
        "chaos: {rounds} rounds in {} s ({})",
        t0.elapsed().as_secs(),
        counts.join(", ")
    );
    println!(
        "chaos: failovers {} (host path switches {}), failover ms p50 {} p99 {} max {}",
        fo.len(),
        soak.host.path_switches,
        percentile(&fo, 0.5).as_millis(),
        percentile(&fo, 0.99).as_millis(),
        fo.last().copied().unwrap_or_default().as_millis()
    );
    let h = &soak.host;
    let refused = h
        .ledger
        .writes()
        .iter()
        .filter(|w| matches!(w.outcome, tcmu_rbd_testkit::ledger::Outcome::Refused(_)))
        .count();
    println!(
        "chaos: acknowledged writes {} verified ({} block checks through the owner and rbd export); \
         refused {refused}",
        h.ledger.acked(),
        soak.checks,
    );
    println!(
        "chaos: writes the host gave up on {} (answered later: {} GOOD, landed before the fence; \
         {} refused; {} never, gateway killed); late writes to a stopped gateway {}, all refused",
        h.given_up,
        h.given_up_late_ok,
        h.given_up_late_refused,
        h.given_up - h.given_up_late_ok - h.given_up_late_refused,
        soak.counts.get(&Action::Stop).copied().unwrap_or(0) * LATE
    );
    println!("chaos: zombie writes 0, lost writes 0, corrupt blocks 0");
    for g in std::mem::take(&mut soak.gws) {
        g.stop_clean();
    }
    Ok(())
}
