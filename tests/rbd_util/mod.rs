//! Helpers for the tests against the live micro cluster that
//! scripts/test-rbd.sh starts (it exports TCMU_RBD_TEST_CONF, _POOL, _DIR).
#![allow(dead_code)]

/// The reason every live test gives when ignored.
pub const NEEDS: &str = "needs the live Ceph cluster: scripts/test-rbd.sh runs it";

#[allow(unused_imports)]
pub use tcmu_rbd_testkit::cluster::{cli, cluster_dir, conf, pool, TestImage};
#[allow(unused_imports)]
pub use tcmu_rbd_testkit::direct::{pattern, Direct};
