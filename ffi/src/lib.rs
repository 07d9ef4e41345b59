//! Safe bindings to the subset of librados and librbd (Ceph 16.2) that
//! tcmu-rbd uses.
//!
//! All `unsafe` code that crosses into C lives in this crate, behind types
//! that own their handles:
//! - [`Rados`]: a connected cluster handle, shared (`Clone` is an `Arc`);
//!   shut down when the last clone, [`IoCtx`] and [`Image`] are gone.
//! - [`IoCtx`]: a pool (and optional namespace).
//! - [`Image`]: an open RBD image; closed on drop, so it cannot be used
//!   after close. Asynchronous I/O takes ownership of its buffers (an
//!   [`AioBuf`]) and of a completion closure that runs exactly once.
//!
//! # Why hand-written
//! The `librbd-sys` crate (0.1) predates iovec I/O, compare-and-write,
//! write-same, write-zeroes, the exclusive-lock calls and service
//! registration; bindgen would generate all of it but adds libclang as a
//! build dependency for some sixty declarations. [`sys`] declares exactly
//! the calls used, each copied from the Debian 12 headers
//! (`/usr/include/rados/librados.h`, `/usr/include/rbd/librbd.h`, 16.2.15).
//! The `ceph` crate (ceph-rust) covers rados but not librbd's aio calls;
//! one small binding for both is simpler than two.
//!
//! # Threads
//! librbd runs completion callbacks and update-watch callbacks on its own
//! threads. A callback must only hand its result on (a channel send, an
//! atomic store): blocking there stalls every image of the client, and
//! closing an image or shutting down the client from there deadlocks.

mod image;
mod notify;
mod rados;
// The C declarations, one for one with librados.h and librbd.h, which
// document each call.
#[allow(missing_docs)]
pub mod sys;

pub use image::Image;
pub use image::{AioBuf, CawError, ImageInfo, LockMode, LockOwners, OwnedBuf, WatchHandle};
pub use notify::{parse_notify_reply, watch, Notice, NotifyAck, NotifyReply, ObjectWatch};
pub use rados::{IoCtx, Rados, RadosBuilder, WeakRados};

/// A failed librados/librbd call: what was attempted and the errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {} (errno {errno})", strerror(*errno))]
pub struct Error {
    /// What was attempted, with its arguments.
    pub op: String,
    /// The errno, positive.
    pub errno: i32,
}

impl Error {
    pub(crate) fn new(op: impl Into<String>, errno: i32) -> Self {
        Error {
            op: op.into(),
            errno: errno.abs(),
        }
    }
}

/// The errno's description, without std's "(os error N)" suffix.
fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Result of the calls in this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A negative return code as an error, anything else as success.
pub(crate) fn check(ret: libc::c_int, op: impl FnOnce() -> String) -> Result<libc::c_int> {
    if ret < 0 {
        Err(Error::new(op(), -ret))
    } else {
        Ok(ret)
    }
}

/// A Rust string as a C string; an interior NUL is EINVAL.
pub(crate) fn cstr(s: &str, what: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(s)
        .map_err(|_| Error::new(format!("{what} {s:?} contains a NUL byte"), libc::EINVAL))
}

/// Encodes a string map as librados expects for service metadata and
/// status: `key\0value\0...` ended by an empty key.
pub(crate) fn encode_dict(pairs: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        if k.is_empty() || k.contains('\0') || val.contains('\0') {
            return Err(Error::new(
                format!("service dict entry {k:?}={val:?}: empty key or NUL byte"),
                libc::EINVAL,
            ));
        }
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v.push(0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dict_encoding() {
        assert_eq!(
            encode_dict(&[("a", "1"), ("bc", "")]).unwrap(),
            b"a\x001\x00bc\x00\x00\x00".to_vec()
        );
        assert_eq!(encode_dict(&[]).unwrap(), vec![0]);
        assert!(encode_dict(&[("", "x")]).is_err());
        assert!(encode_dict(&[("a", "x\0y")]).is_err());
    }

    #[test]
    fn error_names_op_and_errno() {
        let e = Error::new("rbd_open(rbd/x)", -libc::ENOENT);
        assert_eq!(e.errno, libc::ENOENT);
        let s = e.to_string();
        assert!(s.starts_with("rbd_open(rbd/x): "), "{s}");
        assert!(
            s.contains("No such file") && s.ends_with("(errno 2)"),
            "{s}"
        );
        assert!(!s.contains("os error"), "{s}");
    }

    #[test]
    fn config_option_layout_matches_c() {
        // Two pointers and an int enum, padded to pointer alignment.
        assert_eq!(std::mem::size_of::<sys::rbd_config_option_t>(), 24);
    }

    #[test]
    fn image_info_layout_matches_c() {
        // 3 x u64, int + char[24] (+4 padding), int64, char[96].
        assert_eq!(
            std::mem::size_of::<sys::rbd_image_info_t>(),
            24 + 4 + 24 + 4 + 8 + 96
        );
    }
}
