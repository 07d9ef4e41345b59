//! The SCSI fuzz harness: arbitrary CDBs and data-out buffers through the
//! SCSI core (`fuzz/fuzz_targets/cdb.rs` and `tests/scsi_fuzzish.rs`).

use std::sync::Arc;
use tcmu_handler::{Caps, Geometry, IoBufs, IoError, Op};
use tcmu_rbd::scsi::alua::{self, AluaMode, SharedAlua};
use tcmu_rbd::scsi::{Lun, LunInfo, Outcome};

/// A small LUN for the fuzzer and for tests: 1 MiB of 512-byte blocks,
/// discard and write cache, 128-block transfers.
pub fn fuzz_lun() -> Lun {
    Lun::new(LunInfo {
        vendor: "FUZZ".into(),
        product: "LUN".into(),
        revision: "0001".into(),
        serial: "fuzz".into(),
        geometry: Geometry {
            size: 1 << 20,
            block_size: 512,
        },
        caps: Caps {
            discard: true,
            discard_zeroes: true,
            write_cache: true,
            lba_status: false,
        },
        max_transfer_blocks: 128,
    })
}

/// Runs one arbitrary input through the SCSI core: its first 16 bytes are
/// the CDB, the rest the data-out buffer (and the data-in buffer's size).
/// The core must answer without panicking, data-in must fit the buffer,
/// and any backend operation it produces must lie inside the device and
/// inside the command's buffer. The first byte after the CDB also picks
/// ALUA on/off, its mode and the port state, so the ALUA paths are reached.
pub fn fuzz_one(data: &[u8]) {
    let mut lun = fuzz_lun();
    let size = lun.info().geometry.size;
    let (cdb, rest) = data.split_at(data.len().min(16));
    if let Some(&sel) = rest.first() {
        if sel & 0x80 != 0 {
            let g = |id, state| alua::GroupConfig {
                name: format!("g{id}"),
                id,
                state,
                status: 0,
                preferred: false,
                supported: alua::support::DEFAULT,
                mode: AluaMode {
                    implicit: sel & 1 != 0,
                    explicit: sel & 2 != 0,
                },
                implicit_trans_secs: 5,
                ports: vec![(id, true)],
            };
            let state =
                alua::AccessState::from_u8((sel >> 2) & 0x0f).unwrap_or(alua::AccessState::Standby);
            lun.set_alua(Arc::new(SharedAlua::new(alua::AluaConfig {
                groups: vec![g(1, state), g(2, alua::AccessState::ActiveOptimized)],
                local: alua::LocalPort {
                    group: 1,
                    rel_port: 1,
                },
            })));
        }
    }
    let mut buf = rest.to_vec();
    buf.resize(rest.len().max(4096), 0);
    let buf_len = buf.len() as u64;
    let bufs = IoBufs::from_vec(buf);
    let mut outcome = lun.execute(cdb, &bufs);
    // Follow each command through its backend operations, failing the
    // last one with a miscompare to reach the error paths too.
    for round in 0..3 {
        let (op, pending) = match outcome {
            Outcome::Done(r) => {
                if let Some(n) = r.read_len {
                    assert!(u64::from(n) <= buf_len, "read_len {n} past the buffer");
                }
                return;
            }
            Outcome::Submit(op, p) => (op, p),
            // The plan's ranges are the copy engine's to check; the
            // fuzzer checks the error path of a failed copy.
            Outcome::Copy(_, p) => {
                let _ = lun.finish(p, Err(IoError::OutOfRange));
                return;
            }
        };
        let (end, data_len) = match &op {
            Op::Read { offset, bufs } | Op::Write { offset, bufs, .. } => {
                (offset + bufs.len() as u64, bufs.len() as u64)
            }
            Op::WriteZeroes { offset, len, .. } => (offset + len, 0),
            Op::WriteSame {
                offset,
                len,
                pattern,
            } => {
                assert_eq!(len % pattern.len().max(1) as u64, 0, "{op:?}");
                (offset + len, pattern.len() as u64)
            }
            Op::CompareAndWrite {
                offset,
                write,
                compare,
            } => (
                offset + write.len() as u64,
                (compare.len() + write.len()) as u64,
            ),
            Op::Discard { ranges } => (ranges.iter().map(|(o, l)| o + l).max().unwrap_or(0), 0),
            Op::Flush => (0, 0),
            Op::Provisioning { offset, len, .. } => (offset + len, 0),
        };
        assert!(end <= size, "operation past the end: {op:?}");
        // VERIFY reads into its own scratch buffer; everything else must
        // stay inside the command's buffer.
        if !pending.reads_into_own_buffer() {
            assert!(data_len <= buf_len, "operation past the buffer: {op:?}");
        }
        let result = if round == 2 {
            Err(IoError::Miscompare { offset: 3 })
        } else {
            Ok(())
        };
        outcome = lun.finish(pending, result);
    }
}
