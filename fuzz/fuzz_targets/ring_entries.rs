//! Arbitrary bytes in the command ring and the mailbox's head: the ring
//! parser must refuse or accept without panicking, and never hand out a
//! buffer outside the data area.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcmu_rbd_testkit::emulator::{KernelEmu, Layout};
use tcmu_rbd::ring::abi::*;
use tcmu_rbd::ring::{Completion, Entry, Ring};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let layout = Layout {
        cmdr_size: 4096,
        data_size: 64 * 1024,
        ..Layout::default()
    };
    let Ok(emu) = KernelEmu::with_layout(layout) else { return };
    let m = emu.mem();
    let head = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) % 4200;
    for (i, b) in data[4..].iter().take(4096).enumerate() {
        let _ = m.write_u8(MB_SIZE + i, *b);
    }
    let _ = m.write_u32(MB_CMD_HEAD, head);
    let Ok(ue) = emu.user_end() else { return };
    let Ok(mem) = ue.map() else { return };
    let Ok(mut ring) = Ring::new(mem.clone()) else { return };
    let mut out = Vec::new();
    if ring.poll(&mut out).is_ok() {
        for e in out {
            if let Entry::Cmd(c) = e {
                for iov in c.bufs.iovecs() {
                    assert!(
                        mem.contains(MB_SIZE + 4096, iov.iov_base as *const u8, iov.iov_len),
                        "buffer outside the data area"
                    );
                }
                let _ = ring.complete(Completion {
                    cmd_id: c.cmd_id,
                    status: 0,
                    sense: &[],
                    read_len: None,
                });
            }
        }
        let _ = ring.publish();
    }
});
