//! A storage backend in a few lines, served through the ring.
//!
//! `Null` is a LUN that reads zeros and accepts every write (a
//! `/dev/null` disk). The daemon would hand it a real TCMU ring; here the
//! test kit's emulator plays the kernel: it queues SCSI commands in the
//! shared mapping, rings the doorbell and reaps the completions, exactly as
//! target_core_user does. The device worker (ring, SCSI core, backend) is
//! the daemon's own.
//!
//! Run it: `cargo run --example null_backend`. `cargo test` runs it too
//! (`example_runs`), so it cannot rot.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::{Backend, Caps, Done, Geometry, Op};
use tcmu_rbd::device::{Device, EventDoorbell};
use tcmu_rbd::scsi::LunInfo;
use tcmu_rbd_testkit::cdb::rw16;
use tcmu_rbd_testkit::emulator::{Data, KernelEmu, Layout, Reaped};

/// A LUN of `size` bytes that reads zeros and forgets what is written.
struct Null {
    size: u64,
}

impl Backend for Null {
    fn name(&self) -> String {
        "null".into()
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size,
            block_size: 512,
        }
    }

    fn caps(&self) -> Caps {
        Caps {
            discard: false,
            discard_zeroes: false,
            write_cache: false,
            lba_status: false,
        }
    }

    /// Every operation completes at once. A real backend completes
    /// later, from any thread: `done` is the completion's handle.
    fn submit(&self, op: Op, done: Done) {
        if let Op::Read { bufs, .. } = &op {
            bufs.fill_zero(0, bufs.len());
        }
        done.complete(Ok(()));
    }
}

/// Queues `cdb` with `data`, then waits for its completion.
fn run(emu: &mut KernelEmu, cdb: &[u8], data: Data<'_>) -> (Reaped, Vec<u8>) {
    let id = emu.submit(cdb, data).expect("the ring has room");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut got = None;
        emu.reap(|r, bytes| {
            if r.cmd_id == id {
                got = Some((r.clone(), bytes.to_vec()));
            }
        })
        .expect("the ring stays sane");
        if let Some(g) = got {
            return g;
        }
        assert!(Instant::now() < deadline, "no completion in 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    // The kernel's side: mailbox, command ring and data area in a memfd,
    // and the two doorbells.
    let mut emu = KernelEmu::with_layout(Layout::default()).expect("emulator");
    let user = emu.user_end().expect("user end");
    let mem = user.map().expect("map");

    // The daemon's side: one device worker over the mapping.
    let backend: Arc<dyn Backend> = Arc::new(Null { size: 64 << 20 });
    let info = LunInfo {
        vendor: "EXAMPLE".into(),
        product: "NULL LUN".into(),
        revision: "0001".into(),
        serial: "null-0".into(),
        geometry: backend.geometry(),
        caps: backend.caps(),
        max_transfer_blocks: 2048,
    };
    let doorbell = Box::new(EventDoorbell::new(user.to_user, user.from_user));
    let mut dev = Device::new("null0", mem, doorbell, backend, info).expect("device");
    let stop = dev.stopper();
    let worker = std::thread::spawn(move || dev.run());

    // INQUIRY: answered by the SCSI core.
    let (r, inq) = run(&mut emu, &[0x12, 0, 0, 0, 96, 0], Data::FromDevice(96));
    assert_eq!(r.status, 0);
    let vendor = String::from_utf8_lossy(&inq[8..16]);
    println!("INQUIRY: vendor {vendor:?}");
    assert_eq!(vendor.trim(), "EXAMPLE");

    // READ CAPACITY(16): the last LBA and the block size.
    let rc16 = [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0];
    let (r, cap) = run(&mut emu, &rc16, Data::FromDevice(32));
    assert_eq!(r.status, 0);
    let last = u64::from_be_bytes(cap[..8].try_into().expect("8 bytes"));
    println!("READ CAPACITY: {} blocks of 512 bytes", last + 1);
    assert_eq!(last + 1, (64 << 20) / 512);

    // WRITE(16) then READ(16): the write is accepted, the read gives zeros.
    let (r, _) = run(&mut emu, &rw16(true, 8, 8), Data::ToDevice(&[0xab; 4096]));
    assert_eq!(r.status, 0);
    let (r, data) = run(&mut emu, &rw16(false, 8, 8), Data::FromDevice(4096));
    assert_eq!(r.status, 0);
    assert!(data.iter().all(|&b| b == 0));
    println!("WRITE then READ of 4 KiB: GOOD, zeros back");

    // A read past the end: CHECK CONDITION, LBA OUT OF RANGE (05/21/00).
    let (r, _) = run(
        &mut emu,
        &rw16(false, (64 << 20) / 512, 1),
        Data::FromDevice(512),
    );
    let sense = r.sense.expect("sense data");
    println!(
        "READ past the end: status {:#04x}, sense {:02x}/{:02x}/{:02x}",
        r.status,
        sense[2] & 0x0f,
        sense[12],
        sense[13]
    );
    assert_eq!((r.status, sense[2] & 0x0f, sense[12]), (0x02, 0x05, 0x21));

    stop.stop();
    worker
        .join()
        .expect("worker thread")
        .expect("worker ran cleanly");
}

#[cfg(test)]
mod tests {
    #[test]
    fn example_runs() {
        super::main();
    }
}
