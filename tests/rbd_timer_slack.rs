//! librados' timer threads take tcmu.conf's timer slack once an image is
//! open, and keep the kernel's default while an image with a librbd QoS
//! limit is open (see `tcmu_handler::rbd::slack`): what keeps hundreds of
//! idle images cheap without pacing a limited image below its limit.
//! A binary of its own: the slack is process-wide, and other tests'
//! opens would race these checks.

mod rbd_util;

use rbd_util::*;
use tcmu_handler::rbd::slack;

const MB4: u64 = 4 << 20;

/// The kernel's default slack, as this process's main thread has it.
fn default_slack() -> u64 {
    std::fs::read_to_string("/proc/self/timerslack_ns")
        .expect("read /proc/self/timerslack_ns")
        .trim()
        .parse()
        .expect("a number")
}

fn all_at(comm: &str, ns: u64) {
    let got = slack::slack_of(comm);
    assert!(!got.is_empty(), "no {comm} thread: is librados loaded?");
    assert!(
        got.iter().all(|&n| n == ns),
        "{comm} threads' slack {got:?}, wanted all {ns}"
    );
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn idle_timers_batch_unless_an_image_has_a_qos_limit() {
    let _ = NEEDS;
    let dflt = default_slack();
    let want = slack::DEFAULT.as_nanos() as u64;
    assert_ne!(dflt, want);
    let plain = TestImage::new("slack-plain", MB4);
    let be = tcmu_rbd::backends::open("rbd", &plain.cfg(""), MB4, 512)
        .unwrap_or_else(|e| panic!("open: {e}"));
    all_at("safe_timer", want);
    all_at("ceph_timer", want);

    // An admin's per-image limit (`rbd config image set` writes this key).
    let limited = TestImage::new("slack-qos", MB4);
    cli(
        "rbd",
        &[
            "image-meta",
            "set",
            &limited.spec(),
            "conf_rbd_qos_iops_limit",
            "500",
        ],
    );
    let qos = tcmu_rbd::backends::open("rbd", &limited.cfg(""), MB4, 512)
        .unwrap_or_else(|e| panic!("open the limited image: {e}"));
    all_at("safe_timer", dflt);
    all_at("ceph_timer", want);
    drop(qos);
    all_at("safe_timer", want);

    // tcmu.conf's 0: the kernel's default everywhere.
    slack::set(std::time::Duration::ZERO);
    all_at("safe_timer", dflt);
    all_at("ceph_timer", dflt);
    slack::set(slack::DEFAULT);
    all_at("safe_timer", want);
    drop(be);
}
