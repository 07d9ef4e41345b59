//! A deterministic stand-in for the cargo-fuzz CDB target, so every test
//! run covers it: random CDBs (mostly with opcodes the core serves, with
//! small LBAs and lengths so they pass the range checks and reach the
//! parameter-list parsers) and random data-out buffers, through
//! `tcmu_rbd_testkit::fuzz::fuzz_one`, which asserts no panic, data-in within the buffer
//! and every backend operation inside the device and the buffer.

use rand::{rngs::SmallRng, Rng, SeedableRng};
use tcmu_rbd::scsi::opcodes::COMMANDS;

#[test]
fn random_cdbs_and_parameter_lists() {
    let mut rng = SmallRng::seed_from_u64(0x5c51);
    for _ in 0..200_000 {
        let mut cdb = [0u8; 16];
        rng.fill(&mut cdb[..]);
        if rng.gen_bool(0.9) {
            let k = &COMMANDS[rng.gen_range(0..COMMANDS.len())];
            cdb[0] = k.opcode;
            if let Some(sa) = k.sa {
                cdb[1] = (cdb[1] & 0xe0) | sa;
            }
            if rng.gen_bool(0.7) {
                // Small fields: in range, within limits, short lists.
                for b in cdb.iter_mut().skip(2).take(12) {
                    *b = if rng.gen_bool(0.8) {
                        0
                    } else {
                        rng.gen_range(0..4)
                    };
                }
                cdb[1] &= if rng.gen_bool(0.5) { 0x1f } else { 0xff };
            }
        }
        if rng.gen_bool(0.02) {
            // A truncated CDB and nothing else.
            tcmu_rbd_testkit::fuzz::fuzz_one(&cdb[..rng.gen_range(0..16)]);
            continue;
        }
        let mut input = cdb.to_vec();
        let plen = match rng.gen_range(0..4) {
            0 => 0,
            1 => rng.gen_range(0..32),
            2 => rng.gen_range(0..600),
            _ => rng.gen_range(0..5000),
        };
        let mut rest = vec![0u8; plen];
        if rng.gen_bool(0.5) {
            rng.fill(&mut rest[..]);
        } else if plen >= 24 {
            // A plausible UNMAP/STPG/MODE SELECT header.
            rest[1] = (plen - 2) as u8;
            rest[3] = ((plen - 8) & 0xf0) as u8;
            // Descriptors near the LUN's end (2048 blocks) or far past it.
            for d in rest[8..].chunks_exact_mut(16).take(4) {
                let lba: u64 = match rng.gen_range(0..3) {
                    0 => rng.gen_range(0..16),
                    1 => rng.gen_range(2030..2060),
                    _ => rng.gen(),
                };
                d[..8].copy_from_slice(&lba.to_be_bytes());
                d[8..12].copy_from_slice(&rng.gen_range(0u32..40).to_be_bytes());
            }
        }
        input.extend(rest);
        tcmu_rbd_testkit::fuzz::fuzz_one(&input);
    }
}
