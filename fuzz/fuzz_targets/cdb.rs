//! Arbitrary CDBs (first 16 bytes of the input) with arbitrary data-out
//! buffers (the rest; its first byte also picks an ALUA setup) through
//! the SCSI core, following each command through its backend operations:
//! no panic, data-in within the buffer, and no backend operation outside
//! the device or the command's buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tcmu_rbd_testkit::fuzz::fuzz_one(data);
});
