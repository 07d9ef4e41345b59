//! Arbitrary CDBs through the SCSI core: no panic, and no backend
//! operation outside the device.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tcmu_rbd::scsi::fuzz_one(data);
});
