//! One HA gateway process (`tcmu-rbd-gw-sim`: rbd backend, failover
//! manager, SCSI core and an emulated kernel ring in one process), driven
//! one line per command over stdin/stdout (the protocol is in the
//! simulator's module doc).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// Block size of the simulator's LUN.
pub const BS: u64 = 512;

/// What a block written by the simulator holds, read from raw image bytes
/// (`rbd export`): the simulator's block header is the magic, the LBA and
/// the seed of the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// All zeros (never written, or discarded).
    Zero,
    /// The block of the write with this seed.
    Seed(u64),
    /// Anything else (torn, foreign, another LBA's block).
    Other,
}

/// Decodes block `lba` of raw image bytes.
pub fn block_at(image: &[u8], lba: u64) -> Block {
    let start = (lba * BS) as usize;
    let Some(b) = image.get(start..start + BS as usize) else {
        return Block::Zero; // past the export's end: never written
    };
    if b.iter().all(|&x| x == 0) {
        return Block::Zero;
    }
    if &b[..8] != b"ALUAGWBK" || b[8..16] != lba.to_le_bytes() {
        return Block::Other;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[16..24]);
    Block::Seed(u64::from_le_bytes(s))
}

/// Decodes one entry of the simulator's `read` reply.
pub fn parse_read_entry(v: &str) -> Block {
    match v {
        "0" => Block::Zero,
        s => s.parse().map_or(Block::Other, Block::Seed),
    }
}

/// How to start a gateway.
#[derive(Debug, Clone)]
pub struct GwSpec {
    /// The `tcmu-rbd-gw-sim` binary.
    pub bin: String,
    /// Its config string (`pool/image;conf=...`).
    pub cfg: String,
    /// The LUN size in bytes.
    pub size: u64,
    /// Directory for its log (stderr).
    pub log_dir: String,
    /// Extra arguments (`--holdoff-ms N`).
    pub extra: Vec<String>,
}

/// One gateway process.
pub struct Gw {
    /// Its name (also the prefix of its request tags).
    pub name: String,
    /// Its ALUA group (from 1).
    pub group: u16,
    /// The process.
    pub child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<String>,
    /// Replies received and not yet taken, by tag.
    pub replies: HashMap<String, String>,
    next: u64,
    /// Its log file (appended to across runs).
    pub log: String,
    /// The log's length when this process started: what it logged
    /// follows.
    pub log_at: u64,
}

impl Gw {
    /// Starts gateway `name` in ALUA group `group`; `test` names the log.
    pub fn spawn(spec: &GwSpec, name: &str, group: u16, test: &str) -> Gw {
        std::fs::create_dir_all(&spec.log_dir).expect("log dir");
        let log = format!("{}/{test}-{name}.log", spec.log_dir);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let log_at = logf.metadata().map_or(0, |m| m.len());
        let mut child = Command::new(&spec.bin)
            .args(["--cfg", &spec.cfg])
            .args(["--size", &spec.size.to_string()])
            .args(["--group", &group.to_string(), "--name", name])
            .args(&spec.extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", spec.bin));
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(l) = line else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        eprintln!("{name}: pid {}, log {log}", child.id());
        Gw {
            name: name.to_string(),
            group,
            stdin: child.stdin.take(),
            child,
            rx,
            replies: HashMap::new(),
            next: 1,
            log,
            log_at,
        }
    }

    /// What this process logged (not earlier runs').
    pub fn own_log(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        let from = usize::try_from(self.log_at).unwrap_or(0).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    /// Sends a command; returns its tag.
    pub fn send(&mut self, cmd: &str) -> String {
        let tag = format!("{}{}", self.name, self.next);
        self.next += 1;
        let w = self.stdin.as_mut().expect("stdin open");
        // A gateway that died is seen by its missing replies.
        let _ = writeln!(w, "{tag} {cmd}").and_then(|_| w.flush());
        tag
    }

    /// Sends `cmd` to LUN `lun` of a gateway serving several (`@K`);
    /// returns its tag.
    pub fn send_to(&mut self, lun: usize, cmd: &str) -> String {
        self.send(&format!("@{lun} {cmd}"))
    }

    /// Takes the replies that arrive within `wait` (at least one, if any).
    pub fn take_lines(&mut self, wait: Duration) {
        if let Ok(l) = self.rx.recv_timeout(wait) {
            self.store(l);
            while let Ok(l) = self.rx.try_recv() {
                self.store(l);
            }
        }
    }

    fn store(&mut self, l: String) {
        let (tag, rest) = l.split_once(' ').unwrap_or((&l, ""));
        self.replies.insert(tag.to_string(), rest.to_string());
    }

    /// The reply to `tag`, waiting up to `limit`.
    pub fn wait(&mut self, tag: &str, limit: Duration) -> Option<String> {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.replies.remove(tag) {
                return Some(r);
            }
            let left = limit.checked_sub(t0.elapsed())?;
            self.take_lines(left.min(Duration::from_millis(50)));
        }
    }

    /// Sends `cmd` and waits for its reply (a minute at most).
    pub fn call(&mut self, cmd: &str) -> String {
        let tag = self.send(cmd);
        self.wait(&tag, Duration::from_secs(60)).unwrap_or_else(|| {
            panic!(
                "{}: no reply to {cmd:?} in 60 s (log {})",
                self.name, self.log
            )
        })
    }

    /// Its failover status line.
    pub fn state(&mut self) -> String {
        self.call("state")
    }

    /// Waits until `state` contains `want`.
    pub fn wait_state(&mut self, want: &str, limit: Duration) -> String {
        self.wait_state_every(want, limit, Duration::from_millis(100))
    }

    /// As [`wait_state`](Self::wait_state), on LUN `lun`.
    pub fn wait_state_on(&mut self, lun: usize, want: &str, limit: Duration) -> String {
        self.wait_state_of(lun, want, limit, Duration::from_millis(50))
    }

    /// As [`wait_state`](Self::wait_state), asking every `every`.
    pub fn wait_state_every(&mut self, want: &str, limit: Duration, every: Duration) -> String {
        self.wait_state_of(0, want, limit, every)
    }

    fn wait_state_of(
        &mut self,
        lun: usize,
        want: &str,
        limit: Duration,
        every: Duration,
    ) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.call(&format!("@{lun} state"));
            if s.contains(want) {
                return s;
            }
            assert!(
                t0.elapsed() < limit,
                "{}: state never showed {want:?} in {limit:?}; last: {s} (log {})",
                self.name,
                self.log
            );
            std::thread::sleep(every);
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal gateway");
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Reads `n` blocks from `lba` through this gateway: what each holds.
    pub fn read_blocks(&mut self, lba: u64, n: u64) -> Result<Vec<Block>, String> {
        self.read_blocks_on(0, lba, n)
    }

    /// As [`read_blocks`](Self::read_blocks), on LUN `lun`.
    pub fn read_blocks_on(&mut self, lun: usize, lba: u64, n: u64) -> Result<Vec<Block>, String> {
        let r = self.call(&format!("@{lun} read {lba} {n}"));
        let list = r
            .strip_prefix("ok ")
            .ok_or_else(|| format!("{} LUN {lun}: read {lba}+{n} failed: {r}", self.name))?;
        Ok(list.split(',').map(parse_read_entry).collect())
    }

    /// Stops the gateway as a clean shutdown does (EOF on its stdin: the
    /// worker drains, the lock is released if held, the image closes) and
    /// checks that it exited 0 with nothing in its log that says it
    /// crashed on the way out (librados/librbd teardown).
    pub fn stop_clean(mut self) {
        use std::os::unix::process::ExitStatusExt;
        drop(self.stdin.take());
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait for gateway") {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{}: still running 60 s after EOF (log {})",
                self.name,
                self.log
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        for bad in ["terminate called", "Aborted", "panicked", "Segmentation"] {
            assert!(
                !log.contains(bad),
                "{}: its log shows {bad:?} at shutdown (log {})",
                self.name,
                self.log
            );
        }
        assert!(
            status.success(),
            "{}: exited with {status:?} (signal {:?}) at a clean stop (log {})",
            self.name,
            status.signal(),
            self.log
        );
        eprintln!(
            "{}: clean stop in {} ms",
            self.name,
            t0.elapsed().as_millis()
        );
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // A stopped process would not die of SIGKILL until continued.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
