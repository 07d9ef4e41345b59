//! The test kit of tcmu-rbd: what the HA drills and the chaos soak share,
//! kept out of the daemon's crates (nothing here ships).
//!
//! - [`emulator`]: the kernel's side of the TCMU ring (the mailbox, the
//!   command ring and the data area in a memfd, eventfd doorbells), as
//!   target_core_user.c behaves;
//! - [`fuzz`]: the SCSI core under arbitrary CDBs and buffers;
//! - [`loadgen`]: fio-like load through the emulated ring
//!   (`tcmu-rbd-bench`, `tcmu-rbd-vs-fio`);
//! - [`cdb`]: CDB builders;
//! - [`cluster`]: the live micro cluster that `scripts/ceph-cluster.sh`
//!   starts (CLI calls, test images, stopping and starting its daemons);
//! - [`direct`]: operations straight on a backend, and test patterns;
//! - [`gw`]: one HA gateway process (`tcmu-rbd-gw-sim`) driven over its
//!   stdin/stdout line protocol;
//! - [`ledger`]: every write a host issued, with its outcome, and the
//!   check of an image against it (lost writes, zombie writes).

pub mod cdb;
pub mod cluster;
pub mod direct;
pub mod emulator;
pub mod fuzz;
pub mod gw;
pub mod ledger;
pub mod loadgen;
pub mod procself;
