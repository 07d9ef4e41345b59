//! The live micro cluster that `scripts/test-rbd.sh` starts: it exports
//! `TCMU_RBD_TEST_CONF`, `TCMU_RBD_TEST_POOL` and `TCMU_RBD_TEST_DIR`.

use std::process::Command;

/// The cluster's ceph.conf.
pub fn conf() -> String {
    std::env::var("TCMU_RBD_TEST_CONF")
        .expect("TCMU_RBD_TEST_CONF is not set: run scripts/test-rbd.sh (it starts the cluster)")
}

/// The pool images go in.
pub fn pool() -> String {
    std::env::var("TCMU_RBD_TEST_POOL").unwrap_or_else(|_| "rbd".into())
}

/// The cluster's directory (for `scripts/ceph-cluster.sh` commands).
pub fn cluster_dir() -> String {
    std::env::var("TCMU_RBD_TEST_DIR")
        .expect("TCMU_RBD_TEST_DIR is not set: run scripts/test-rbd.sh")
}

/// Runs the `rbd` or `ceph` CLI against the test cluster (2 minutes at
/// most); panics with its stderr if it fails.
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

/// Runs `scripts/ceph-cluster.sh CMD DIR` (kill-osd, start-osd, restart-mon,
/// ...) from the workspace `top`.
pub fn cluster_script(top: &str, cmd: &str) -> Result<(), String> {
    let out = Command::new(format!("{top}/scripts/ceph-cluster.sh"))
        .args([cmd, &cluster_dir()])
        .output()
        .map_err(|e| format!("ceph-cluster.sh {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ceph-cluster.sh {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// An image created for one test and removed after it.
pub struct TestImage {
    /// Image name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

impl TestImage {
    /// Creates `tag-<pid>` of `size` bytes (replacing a leftover).
    pub fn new(tag: &str, size: u64) -> Self {
        let name = format!("{tag}-{}", std::process::id());
        let spec = format!("{}/{name}", pool());
        let _ = Command::new("rbd")
            .args(["-c", &conf(), "rm", "--no-progress", &spec])
            .output();
        cli("rbd", &["create", "--size", &format!("{size}B"), &spec]);
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
