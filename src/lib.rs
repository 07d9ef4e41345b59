//! tcmu-rbd: a userspace TCMU handler serving Ceph RBD images (and files
//! and ram) to the Linux SCSI target.
//!
//! Layout: [`ring`] is the kernel ABI (the shared mapping, the command
//! ring), [`scsi`] decodes and emulates SCSI, [`device`] ties one ring to one
//! backend, [`emulator`] is the kernel's side of the ring for tests and
//! benchmarks.

pub mod backends;
pub mod config;
pub mod control;
pub mod daemon_main;
pub mod dbus;
pub mod device;
pub mod emulator;
pub mod failover;
pub mod loadgen;
pub mod netlink;
pub mod registry;
pub mod ring;
pub mod scsi;
