//! From a TCMU device's subtype and config string to a backend.
//!
//! The kernel names a device `tcm-user/<hba>/<name>/<subtype>/<cfgstring>`;
//! the subtype picks the handler:
//! - `file`: cfgstring is a path (`file//var/lib/lun0.img` in targetcli's
//!   `cfgstring=/var/lib/lun0.img`); a regular file is grown sparsely to
//!   the device size, a block device must be at least that large;
//! - `ram`: cfgstring is ignored; a zeroed in-memory LUN (volatile!);
//! - `rbd`: cfgstring is `pool/[namespace/]image[;osd_op_timeout=N][;conf=PATH][;id=USER]`
//!   (see `tcmu_handler::rbd`); the image must be exactly the device size.

use std::path::Path;
use std::sync::Arc;
use tcmu_handler::Backend;

/// Threads that run the I/O of all the daemon's file LUNs together
/// ([`file_pool`]): a bound, not a number per LUN.
pub const FILE_THREADS: usize = 8;

/// The daemon's one pool of file I/O threads, started with the first file
/// LUN.
pub fn file_pool() -> std::io::Result<Arc<tcmu_handler::file::FilePool>> {
    static POOL: std::sync::OnceLock<Arc<tcmu_handler::file::FilePool>> =
        std::sync::OnceLock::new();
    if let Some(p) = POOL.get() {
        return Ok(p.clone());
    }
    let p = tcmu_handler::file::FilePool::new(FILE_THREADS)?;
    // Two first LUNs at once: the loser's pool ends here, unused.
    Ok(POOL.get_or_init(|| p).clone())
}

/// A handler this daemon serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerDesc {
    /// The subtype (`user:<subtype>` in targetcli).
    pub subtype: &'static str,
    /// What the config string holds, as targetcli shows it.
    pub config_desc: &'static str,
}

/// Every handler compiled in.
pub fn handlers() -> Vec<HandlerDesc> {
    vec![
        HandlerDesc {
            subtype: "file",
            config_desc: "Path to a regular file or block device holding the LUN's data.",
        },
        HandlerDesc {
            subtype: "ram",
            config_desc: "Volatile in-memory LUN; the config string is ignored.",
        },
        HandlerDesc {
            subtype: "rbd",
            config_desc: "Ceph RBD image: \
                pool/[namespace/]image[;osd_op_timeout=SECONDS][;conf=/etc/ceph/ceph.conf][;id=USER]",
        },
    ]
}

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No handler for this subtype.
    #[error("no handler for subtype {0:?} (this daemon serves: file, ram, rbd)")]
    UnknownSubtype(String),
    /// The config string is wrong.
    #[error("{0}")]
    BadConfig(String),
    /// The storage could not be opened.
    #[error("{0}")]
    Open(String),
}

/// Refuses a LUN geometry no backend can serve: a block size that is not
/// a power of two, or a size that is not a positive multiple of it.
pub fn check_geometry(size: u64, block_size: u32) -> Result<(), OpenError> {
    if block_size == 0 || !block_size.is_power_of_two() {
        return Err(OpenError::BadConfig(format!(
            "block size {block_size} is not a power of two"
        )));
    }
    if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
        return Err(OpenError::BadConfig(format!(
            "device size {size} is not a positive multiple of the block size {block_size}"
        )));
    }
    Ok(())
}

/// Opens the backend for `subtype`/`cfgstring` with the LUN's size and
/// block size.
pub fn open(
    subtype: &str,
    cfgstring: &str,
    size: u64,
    block_size: u32,
) -> Result<Arc<dyn Backend>, OpenError> {
    check_geometry(size, block_size)?;
    match subtype {
        "file" => {
            let path = file_path(cfgstring)?;
            let pool = file_pool()
                .map_err(|e| OpenError::Open(format!("cannot start file I/O threads: {e}")))?;
            let b = tcmu_handler::file::FileBackend::open_in(
                Path::new(path),
                Some(size),
                block_size,
                pool,
            )
            .map_err(|e| OpenError::Open(e.to_string()))?;
            Ok(Arc::new(b))
        }
        "ram" => {
            let b = tcmu_handler::ram::RamBackend::new(size, block_size)
                .map_err(|e| OpenError::Open(format!("cannot allocate {size} bytes: {e}")))?;
            Ok(Arc::new(b))
        }
        "rbd" => {
            let b = tcmu_handler::rbd::RbdBackend::open(cfgstring, size, block_size)
                .map_err(OpenError::Open)?;
            Ok(Arc::new(b))
        }
        other => Err(OpenError::UnknownSubtype(other.to_string())),
    }
}

fn file_path(cfgstring: &str) -> Result<&str, OpenError> {
    if cfgstring.is_empty() {
        return Err(OpenError::BadConfig(
            "file: empty config string, expected a path".into(),
        ));
    }
    if !cfgstring.starts_with('/') {
        return Err(OpenError::BadConfig(format!(
            "file: {cfgstring:?} is not an absolute path"
        )));
    }
    Ok(cfgstring)
}

/// Checks a config string without opening anything that has side
/// effects (what targetcli's CheckConfig asks before creating a backstore).
pub fn check_config(subtype: &str, cfgstring: &str) -> Result<(), String> {
    match subtype {
        "file" => {
            let p = file_path(cfgstring).map_err(|e| e.to_string())?;
            let path = Path::new(p);
            match std::fs::metadata(path) {
                Ok(m)
                    if m.is_file()
                        || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) =>
                {
                    Ok(())
                }
                Ok(_) => Err(format!("file: {p} is not a regular file or block device")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match path.parent().map(std::fs::metadata) {
                        Some(Ok(d)) if d.is_dir() => Ok(()),
                        _ => Err(format!(
                            "file: {p} does not exist and its directory is missing"
                        )),
                    }
                }
                Err(e) => Err(format!("file: {p}: {e}")),
            }
        }
        "ram" => Ok(()),
        "rbd" => tcmu_handler::rbd::check_config(cfgstring),
        other => Err(OpenError::UnknownSubtype(other.to_string()).to_string()),
    }
}
