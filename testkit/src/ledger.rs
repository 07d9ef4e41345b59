//! Every write a host issued, in issue order, with what became of it, and
//! the check of an image's blocks against that record.
//!
//! Each write has its own seed, so a block tells exactly which write it
//! holds. For every block the image must hold the newest-issued write that
//! was acknowledged, unless writes issued after that one were abandoned
//! (the host gave up without an answer: gateway killed or stopped, or an
//! error that does not say the write was not done): those may or may not
//! have landed, so their seeds are allowed too. Anything else is a fault:
//!
//! - **lost**: the block holds an older acknowledged write, or zeros,
//!   where a newer acknowledged write should be;
//! - **zombie**: the block holds a write that was refused (its gateway
//!   said it was not done), or an abandoned write that landed after a
//!   newer acknowledged write: a fenced gateway's late write;
//! - **corrupt**: neither zeros nor any write of this block.

use crate::gw::Block;
use std::collections::HashMap;

/// What became of one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Sent, no answer yet.
    InFlight,
    /// Acknowledged (GOOD status): it is on the image.
    Acked,
    /// Failed with a sense that says it was not done (standby,
    /// transitioning): it must never appear.
    Refused(String),
    /// Given up without a definite answer: it may have landed, but never
    /// after a newer acknowledged write of the same block.
    Abandoned(String),
}

/// One write.
#[derive(Debug, Clone)]
pub struct WriteRec {
    /// Its seed (unique).
    pub seed: u64,
    /// First block.
    pub lba: u64,
    /// Blocks.
    pub blocks: u64,
    /// The gateway it was sent to.
    pub gw: String,
    /// What became of it.
    pub outcome: Outcome,
    /// An answer came after the host had abandoned it (kept for the
    /// report; the check goes by issue order).
    pub late: Option<String>,
}

/// A fault found by [`Ledger::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An acknowledged write is not on the image.
    Lost {
        /// Block.
        lba: u64,
        /// What the block should hold.
        want: u64,
        /// What it holds.
        found: Block,
    },
    /// A refused write, or an abandoned one that landed after a newer
    /// acknowledged write.
    Zombie {
        /// Block.
        lba: u64,
        /// The write found there.
        seed: u64,
        /// Its record's outcome.
        outcome: Outcome,
    },
    /// The block holds something no write of it wrote.
    Corrupt {
        /// Block.
        lba: u64,
        /// What it holds.
        found: Block,
    },
}

/// The result of a check.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Blocks compared.
    pub blocks: u64,
    /// Blocks whose newest acknowledged write was found.
    pub acked_blocks_ok: u64,
    /// Faults (at most 20 kept; `faults_total` counts them all).
    pub faults: Vec<Fault>,
    /// All faults.
    pub faults_total: u64,
    /// Lost-write faults.
    pub lost: u64,
    /// Zombie-write faults.
    pub zombies: u64,
    /// Corrupt blocks.
    pub corrupt: u64,
}

/// The record of every write, by issue order.
#[derive(Debug, Default)]
pub struct Ledger {
    base_seed: u64,
    writes: Vec<WriteRec>,
    /// Per block: indexes into `writes`, in issue order.
    per_block: HashMap<u64, Vec<usize>>,
}

impl Ledger {
    /// An empty ledger whose seeds start at `base_seed` (nonzero: a seed
    /// of 0 would read back as zeros).
    pub fn new(base_seed: u64) -> Ledger {
        Ledger {
            base_seed: base_seed.max(1),
            ..Ledger::default()
        }
    }

    /// Records a write of `blocks` blocks at `lba` sent to `gw`; returns
    /// its seed.
    pub fn issue(&mut self, lba: u64, blocks: u64, gw: &str) -> u64 {
        let i = self.writes.len();
        let seed = self.base_seed + i as u64;
        self.writes.push(WriteRec {
            seed,
            lba,
            blocks,
            gw: gw.to_string(),
            outcome: Outcome::InFlight,
            late: None,
        });
        for b in lba..lba + blocks {
            self.per_block.entry(b).or_default().push(i);
        }
        seed
    }

    fn rec(&mut self, seed: u64) -> Option<&mut WriteRec> {
        let i = seed.checked_sub(self.base_seed)?;
        self.writes.get_mut(usize::try_from(i).ok()?)
    }

    /// Records the gateway's answer to write `seed`: `ok`, a sense
    /// (`sense KK/AA/QQ`) or anything else. Standby and transitioning
    /// senses are refusals (the write was not done); other failures leave
    /// it undetermined (abandoned). An answer to a write already abandoned
    /// is kept as `late` and, if `ok`, makes it acknowledged.
    pub fn answer(&mut self, seed: u64, reply: &str) {
        let Some(r) = self.rec(seed) else { return };
        let refused = reply == "sense 02/04/0b" || reply == "sense 02/04/0a";
        match r.outcome {
            Outcome::InFlight => {
                r.outcome = if reply == "ok" {
                    Outcome::Acked
                } else if refused {
                    Outcome::Refused(reply.to_string())
                } else {
                    Outcome::Abandoned(reply.to_string())
                };
            }
            Outcome::Abandoned(_) => {
                r.late = Some(reply.to_string());
                if reply == "ok" {
                    r.outcome = Outcome::Acked;
                } else if refused {
                    r.outcome = Outcome::Refused(reply.to_string());
                }
            }
            _ => {}
        }
    }

    /// The host gives up on write `seed` (its gateway died or hangs).
    pub fn abandon(&mut self, seed: u64, why: &str) {
        if let Some(r) = self.rec(seed) {
            if r.outcome == Outcome::InFlight {
                r.outcome = Outcome::Abandoned(why.to_string());
            }
        }
    }

    /// The write with seed `seed`.
    pub fn get(&self, seed: u64) -> Option<&WriteRec> {
        let i = seed.checked_sub(self.base_seed)?;
        self.writes.get(usize::try_from(i).ok()?)
    }

    /// All writes in issue order.
    pub fn writes(&self) -> &[WriteRec] {
        &self.writes
    }

    /// Blocks ever written, sorted.
    pub fn blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.per_block.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.writes
            .iter()
            .filter(|w| w.outcome == Outcome::Acked)
            .count() as u64
    }

    /// Checks what each written block holds (`read(lba)`) against the
    /// record. In-flight writes are treated as abandoned (check only when
    /// none is in flight, or accept that they may have landed).
    pub fn check(&self, mut read: impl FnMut(u64) -> Block) -> Report {
        let mut rep = Report::default();
        for lba in self.blocks() {
            rep.blocks += 1;
            let found = read(lba);
            if let Some(f) = self.check_block(lba, found) {
                match f {
                    Fault::Lost { .. } => rep.lost += 1,
                    Fault::Zombie { .. } => rep.zombies += 1,
                    Fault::Corrupt { .. } => rep.corrupt += 1,
                }
                rep.faults_total += 1;
                if rep.faults.len() < 20 {
                    rep.faults.push(f);
                }
            } else if self.newest_acked(lba).is_some() {
                rep.acked_blocks_ok += 1;
            }
        }
        rep
    }

    fn newest_acked(&self, lba: u64) -> Option<usize> {
        let list = self.per_block.get(&lba)?;
        list.iter()
            .rposition(|&i| self.writes[i].outcome == Outcome::Acked)
    }

    /// The fault block `lba` shows, if any.
    pub fn check_block(&self, lba: u64, found: Block) -> Option<Fault> {
        let list = self.per_block.get(&lba).map_or(&[][..], Vec::as_slice);
        let newest = self.newest_acked(lba);
        let want = newest.map(|p| self.writes[list[p]].seed);
        let seed = match found {
            Block::Seed(s) => s,
            Block::Zero => {
                return want.map(|w| Fault::Lost {
                    lba,
                    want: w,
                    found,
                })
            }
            Block::Other => return Some(Fault::Corrupt { lba, found }),
        };
        let Some(pos) = list.iter().position(|&i| self.writes[i].seed == seed) else {
            return Some(Fault::Corrupt { lba, found });
        };
        let rec = &self.writes[list[pos]];
        match (&rec.outcome, newest) {
            (Outcome::Refused(_), _) => Some(Fault::Zombie {
                lba,
                seed,
                outcome: rec.outcome.clone(),
            }),
            (_, Some(n)) if pos == n => None,
            // Issued after the newest acknowledged write and given up on:
            // it may have landed.
            (Outcome::Abandoned(_) | Outcome::InFlight, Some(n)) if pos > n => None,
            (Outcome::Abandoned(_) | Outcome::InFlight, None) => None,
            (Outcome::Acked, Some(_)) => Some(Fault::Lost {
                lba,
                want: want.unwrap_or(0),
                found,
            }),
            (outcome, _) => Some(Fault::Zombie {
                lba,
                seed,
                outcome: outcome.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pairs: &[(u64, Block)]) -> impl FnMut(u64) -> Block + '_ {
        move |lba| {
            pairs
                .iter()
                .find(|(l, _)| *l == lba)
                .map_or(Block::Zero, |p| p.1)
        }
    }

    #[test]
    fn the_newest_acknowledged_write_passes() {
        let mut l = Ledger::new(100);
        let a = l.issue(0, 1, "A");
        l.answer(a, "ok");
        let b = l.issue(0, 1, "A");
        l.answer(b, "ok");
        let r = l.check(image(&[(0, Block::Seed(b))]));
        assert_eq!((r.faults_total, r.acked_blocks_ok), (0, 1));
    }

    #[test]
    fn an_older_acknowledged_write_is_a_lost_write() {
        let mut l = Ledger::new(100);
        let a = l.issue(0, 1, "A");
        l.answer(a, "ok");
        let b = l.issue(0, 1, "B");
        l.answer(b, "ok");
        let r = l.check(image(&[(0, Block::Seed(a))]));
        assert_eq!(r.lost, 1);
        let r = l.check(image(&[]));
        assert_eq!(r.lost, 1, "zeros where an acked write should be");
    }

    #[test]
    fn a_refused_write_is_a_zombie_wherever_it_shows() {
        let mut l = Ledger::new(100);
        let a = l.issue(0, 1, "A");
        l.answer(a, "sense 02/04/0b");
        let r = l.check(image(&[(0, Block::Seed(a))]));
        assert_eq!(r.zombies, 1);
        assert!(matches!(r.faults[0], Fault::Zombie { seed, .. } if seed == a));
    }

    #[test]
    fn an_abandoned_write_may_land_only_if_nothing_newer_was_acknowledged() {
        let mut l = Ledger::new(100);
        let a = l.issue(0, 1, "A");
        l.abandon(a, "A killed");
        // Not superseded: either value is fine.
        assert_eq!(l.check(image(&[(0, Block::Seed(a))])).faults_total, 0);
        assert_eq!(l.check(image(&[])).faults_total, 0);
        // The host's retry on B is acknowledged: A's write landing after
        // it is a fenced gateway's late write.
        let b = l.issue(0, 1, "B");
        l.answer(b, "ok");
        let r = l.check(image(&[(0, Block::Seed(a))]));
        assert_eq!(r.zombies, 1);
        // A's late acknowledgement does not change the order.
        l.answer(a, "ok");
        assert_eq!(l.get(a).and_then(|w| w.late.clone()).as_deref(), Some("ok"));
        let r = l.check(image(&[(0, Block::Seed(a))]));
        assert_eq!(r.lost, 1, "B's newer acknowledged write was overwritten");
        assert_eq!(l.check(image(&[(0, Block::Seed(b))])).faults_total, 0);
    }

    #[test]
    fn foreign_data_is_corrupt() {
        let mut l = Ledger::new(100);
        let a = l.issue(8, 2, "A");
        l.answer(a, "ok");
        let r = l.check(image(&[(8, Block::Seed(a)), (9, Block::Other)]));
        assert_eq!((r.corrupt, r.acked_blocks_ok), (1, 1));
        let r = l.check(image(&[(8, Block::Seed(a)), (9, Block::Seed(7))]));
        assert_eq!(r.corrupt, 1, "a seed no write of this block had");
    }
}
