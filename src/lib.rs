//! tcmu-rbd: a userspace TCMU handler serving Ceph RBD images (and files
//! and ram) to the Linux SCSI target.
//!
//! Layout: [`ring`] is the kernel ABI (the shared mapping, the command
//! ring), [`scsi`] decodes and emulates SCSI, [`device`] ties one ring to one
//! backend. The kernel's side of the ring for tests and benchmarks (the
//! emulator), the load generator and the drills live in the
//! `tcmu-rbd-testkit` crate, which nothing shipped depends on.

pub mod backends;
pub mod config;
pub mod configfs;
pub mod control;
pub mod copy;
pub mod daemon_main;
pub mod dbus;
pub mod device;
pub mod failover;
pub mod metrics;
pub mod netlink;
pub mod registry;
pub mod ring;
pub mod ring_threads;
pub mod scsi;
