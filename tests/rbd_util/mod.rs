//! Helpers for the tests against the live micro cluster that
//! scripts/test-rbd.sh starts (it exports TCMU_RBD_TEST_CONF, _POOL, _DIR).
#![allow(dead_code)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tcmu_handler::{Backend, CompletionQueue, IoBufs, IoResult, Op};

/// The reason every live test gives when ignored.
pub const NEEDS: &str = "needs the live Ceph cluster: scripts/test-rbd.sh runs it";

/// The cluster's ceph.conf.
pub fn conf() -> String {
    std::env::var("TCMU_RBD_TEST_CONF")
        .expect("TCMU_RBD_TEST_CONF is not set: run scripts/test-rbd.sh (it starts the cluster)")
}

/// The pool images go in.
pub fn pool() -> String {
    std::env::var("TCMU_RBD_TEST_POOL").unwrap_or_else(|_| "rbd".into())
}

/// The cluster's directory (for scripts/ceph-cluster.sh kill-osd/start-osd).
pub fn cluster_dir() -> String {
    std::env::var("TCMU_RBD_TEST_DIR")
        .expect("TCMU_RBD_TEST_DIR is not set: run scripts/test-rbd.sh")
}

/// Runs the `rbd` or `ceph` CLI against the test cluster.
pub fn cli(tool: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("120")
        .arg(tool)
        .arg("-c")
        .arg(conf())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An image created for one test and removed after it.
pub struct TestImage {
    /// Image name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

impl TestImage {
    /// Creates `tag-<pid>` of `size` bytes.
    pub fn new(tag: &str, size: u64) -> Self {
        let name = format!("{tag}-{}", std::process::id());
        let spec = format!("{}/{name}", pool());
        let _ = Command::new("rbd")
            .args(["-c", &conf(), "rm", "--no-progress", &spec])
            .output();
        cli("rbd", &["create", "--size", &format!("{}B", size), &spec]);
        TestImage { name, size }
    }

    /// `pool/name`.
    pub fn spec(&self) -> String {
        format!("{}/{}", pool(), self.name)
    }

    /// The handler's config string with `extra` options.
    pub fn cfg(&self, extra: &str) -> String {
        format!("{};conf={}{extra}", self.spec(), conf())
    }

    /// The image's contents as `rbd export` writes them.
    pub fn export(&self) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("export.img");
        cli(
            "rbd",
            &[
                "export",
                "--no-progress",
                &self.spec(),
                path.to_str().expect("utf-8 path"),
            ],
        );
        std::fs::read(&path).expect("read export")
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("rbd")
            .args(["-c", &conf(), "rm", "--no-progress", &self.spec()])
            .output();
    }
}

/// Runs operations straight on a backend (for what the SCSI layer does not
/// decode yet: UNMAP, WRITE SAME, COMPARE AND WRITE).
pub struct Direct {
    pub backend: Arc<dyn Backend>,
    pub q: CompletionQueue,
    next: u64,
}

impl Direct {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Direct {
            backend,
            q: CompletionQueue::new().expect("completion queue"),
            next: 1,
        }
    }

    /// Submits `op` and waits for its result (at most `limit`).
    pub fn run_within(&mut self, op: Op, limit: Duration) -> IoResult {
        let tag = self.next;
        self.next += 1;
        self.backend.submit(op, self.q.done(tag));
        let t0 = Instant::now();
        loop {
            let left = limit
                .checked_sub(t0.elapsed())
                .unwrap_or_else(|| panic!("operation {tag} did not complete within {limit:?}"));
            if let Some(c) = self.q.recv_timeout(left) {
                assert_eq!(c.tag, tag, "a completion for another operation");
                return c.result;
            }
        }
    }

    /// Submits and waits up to a minute.
    pub fn run(&mut self, op: Op) -> IoResult {
        self.run_within(op, Duration::from_secs(60))
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> IoResult {
        self.run(Op::Write {
            offset,
            bufs: IoBufs::from_vec(data.to_vec()),
            fua: false,
        })
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, tcmu_handler::IoError> {
        let bufs = IoBufs::from_vec(vec![0xa5; len]);
        self.run(Op::Read {
            offset,
            bufs: bufs.clone(),
        })?;
        Ok(bufs.to_vec())
    }
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
