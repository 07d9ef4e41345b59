//! Opening a device does not hold the registry: after a restart the
//! daemon opens devices on several threads, and an rbd image that takes
//! its time (a cluster round trip each, or the whole mount timeout when
//! the monitors are unreachable) must not stall the other opens, status
//! and metrics, or removals.
//!
//! The slow open here is a real one: librados connecting to a monitor
//! address where nothing listens, which it retries until the cfgstring's
//! `osd_op_timeout` (librados' mount timeout). No cluster is needed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tcmu_rbd::registry::{DeviceSpec, Registry};

/// The mount timeout the slow opens wait out.
const OPEN_S: u64 = 3;

/// A ceph.conf whose only monitor is a closed local port.
fn dead_cluster_conf(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        "[global]\nmon_host = 127.0.0.1:1\nauth_client_required = none\n\
         auth_cluster_required = none\nauth_service_required = none\n",
    )
    .expect("write ceph.conf");
    p
}

fn slow_rbd(name: &str, conf: &Path) -> DeviceSpec {
    DeviceSpec {
        name: name.into(),
        uio_path: PathBuf::from("/dev/null"),
        map_size: 0,
        subtype: "rbd".into(),
        cfgstring: format!(
            "rbd/{name};osd_op_timeout={OPEN_S};conf={};id=admin",
            conf.display()
        ),
        configfs_dir: None,
        size: Some(1 << 20),
    }
}

#[test]
fn slow_opens_run_side_by_side_and_leave_the_registry_free() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two connection keys (two ceph.confs), so that the connection cache
    // does not serialise the two connects itself.
    let a = dead_cluster_conf(dir.path(), "a.conf");
    let b = dead_cluster_conf(dir.path(), "b.conf");
    let reg = Registry::new();
    let t0 = Instant::now();
    let (ra, rb, status_took) = std::thread::scope(|s| {
        let ha = s.spawn(|| reg.add(slow_rbd("slow-a", &a)));
        let hb = s.spawn(|| reg.add(slow_rbd("slow-b", &b)));
        // While both open, the registry answers at once.
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let _ = reg.status();
        let _ = reg.names();
        let _ = reg.metrics();
        let took = t.elapsed();
        (
            ha.join().expect("open thread a"),
            hb.join().expect("open thread b"),
            took,
        )
    });
    let both = t0.elapsed();
    assert!(
        status_took < Duration::from_secs(1),
        "status waited {status_took:?} behind the opens"
    );
    let ea = ra.expect_err("no cluster: the open must fail");
    rb.expect_err("no cluster: the open must fail");
    assert!(
        ea.to_string().contains("slow-a"),
        "the error names the device: {ea}"
    );
    // Each waited out the mount timeout; one after the other would be
    // twice that.
    assert!(
        both >= Duration::from_secs(OPEN_S) && both < Duration::from_secs(2 * OPEN_S - 1),
        "two {OPEN_S} s opens took {both:?}: they did not run side by side"
    );
    assert!(
        reg.names().is_empty(),
        "a failed open left {:?}",
        reg.names()
    );
}

#[test]
fn a_removal_during_an_open_waits_for_it_and_a_second_add_is_a_no_op() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dead_cluster_conf(dir.path(), "c.conf");
    let reg = Registry::new();
    std::thread::scope(|s| {
        let t0 = Instant::now();
        let h = s.spawn(|| reg.add(slow_rbd("slow-c", &conf)));
        // The name is taken while it opens: a second add of it returns at
        // once instead of opening it twice.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        reg.add(slow_rbd("slow-c", &conf))
            .expect("a second add of a device being opened is a no-op");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "the second add waited {:?}",
            t.elapsed()
        );
        // A removal waits for the open to end (the kernel tears the device
        // down once it is answered); this open fails, so nothing is left
        // to remove.
        assert!(
            !reg.remove("slow-c"),
            "the open failed: there was nothing to remove"
        );
        assert!(
            t0.elapsed() >= Duration::from_secs(OPEN_S),
            "the removal returned after {:?}, before the open ended",
            t0.elapsed()
        );
        assert!(h.join().expect("open thread").is_err());
    });
    assert!(reg.names().is_empty(), "served: {:?}", reg.names());
    // It can be added again (and fails again: no cluster).
    assert!(reg.add(slow_rbd("slow-c", &conf)).is_err());
}
