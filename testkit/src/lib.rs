//! The test kit of tcmu-rbd: what the HA drills and the chaos soak share,
//! kept out of the daemon's crates (nothing here ships).
//!
//! - [`cluster`]: the live micro cluster that `scripts/ceph-cluster.sh`
//!   starts (CLI calls, test images, stopping and starting its daemons);
//! - [`gw`]: one HA gateway process (`tcmu-rbd-gw-sim`) driven over its
//!   stdin/stdout line protocol;
//! - [`ledger`]: every write a host issued, with its outcome, and the
//!   check of an image against it (lost writes, zombie writes).

pub mod cluster;
pub mod gw;
pub mod ledger;
