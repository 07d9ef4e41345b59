//! Storage backends for tcmu-rbd.
//!
//! A backend serves byte-addressed I/O for one LUN. The ring worker decodes
//! SCSI, turns each data command into an [`Op`] and calls
//! [`Backend::submit`], which must not block: the result comes back later
//! through [`Done::complete`], from whichever thread finishes the work
//! (librbd's callback thread, a file worker, or the submitter itself for the
//! ram backend). Completions land on a [`CompletionQueue`] that the ring
//! worker drains.

pub mod completion;
pub mod file;
pub mod iobuf;
pub mod ram;
pub mod rbd;

pub use completion::{Completion, CompletionQueue, Done};
pub use iobuf::{IoBufs, KeepAlive};

/// What a LUN looks like to the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
}

impl Geometry {
    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.size / u64::from(self.block_size)
    }
}

/// What a backend can do natively; the SCSI layer advertises only these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Discard is supported (thin provisioning: UNMAP, WRITE SAME with UNMAP).
    pub discard: bool,
    /// Discarded ranges read back as zeros (LBPRZ).
    pub discard_zeroes: bool,
    /// The backend has a volatile write cache that FLUSH persists (WCE).
    pub write_cache: bool,
    /// The backend tells allocated from deallocated ranges
    /// ([`Op::Provisioning`]): GET LBA STATUS is offered.
    pub lba_status: bool,
}

/// Where an [`Op::Provisioning`] puts its answer (an [`IoResult`] carries
/// no payload): the byte ranges `(offset, len)` that are, or may be,
/// allocated, sorted and not overlapping.
pub type ExtentSlot = std::sync::Arc<std::sync::Mutex<Vec<(u64, u64)>>>;

/// One backend operation. Offsets and lengths are in bytes and already
/// checked against the device size by the SCSI layer.
#[derive(Debug)]
pub enum Op {
    /// Fill `bufs` from `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Destination.
        bufs: IoBufs,
    },
    /// Write `bufs` at `offset`; with `fua`, stable before completion.
    Write {
        /// Byte offset.
        offset: u64,
        /// Source.
        bufs: IoBufs,
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write stable.
    Flush,
    /// Deallocate ranges `(offset, len)`; they read back as zeros when
    /// [`Caps::discard_zeroes`].
    Discard {
        /// Ranges in bytes.
        ranges: Vec<(u64, u64)>,
    },
    /// Write zeros over `len` bytes; `unmap` allows deallocating them.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Deallocation allowed.
        unmap: bool,
    },
    /// Repeat `pattern` (one logical block) over `len` bytes.
    WriteSame {
        /// Byte offset.
        offset: u64,
        /// Length in bytes, a multiple of the pattern length.
        len: u64,
        /// One block of data.
        pattern: IoBufs,
    },
    /// Atomically: if the bytes at `offset` equal `compare`, write `write`
    /// there; else fail with [`IoError::Miscompare`].
    CompareAndWrite {
        /// Byte offset.
        offset: u64,
        /// Expected current contents.
        compare: IoBufs,
        /// New contents, same length as `compare`.
        write: IoBufs,
    },
    /// Which bytes of `[offset, offset + len)` are allocated: the backend
    /// fills `out` before it completes. Everything it leaves out must be
    /// deallocated and read back as zeros; where it cannot tell, it
    /// reports the range allocated (never the other way round).
    Provisioning {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The allocated ranges, clipped to the query.
        out: ExtentSlot,
    },
}

/// Why an operation failed; the SCSI layer maps each to sense data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// COMPARE AND WRITE found different data at this byte offset from the
    /// start of the compared range.
    #[error("miscompare at byte {offset}")]
    Miscompare {
        /// First differing byte, relative to the operation's offset.
        offset: u64,
    },
    /// The backend has no room (thin pool full, cluster full).
    #[error("no space left")]
    NoSpace,
    /// The operation did not finish in time (osd_op_timeout).
    #[error("timed out")]
    Timeout,
    /// This client was fenced off (blocklisted, lost the exclusive lock).
    #[error("fenced: {0}")]
    Fenced(String),
    /// The backend cannot do this operation.
    #[error("operation not supported")]
    Unsupported,
    /// Out of the backend's range (the image shrank under us).
    #[error("out of range")]
    OutOfRange,
    /// Any other I/O error, with the errno where there is one.
    #[error("I/O error (errno {errno}): {msg}")]
    Io {
        /// The errno, positive.
        errno: i32,
        /// Context.
        msg: String,
    },
}

impl IoError {
    /// An I/O error from an errno and a context.
    pub fn errno(errno: i32, msg: impl Into<String>) -> Self {
        match errno {
            libc::ENOSPC | libc::EDQUOT => IoError::NoSpace,
            libc::ETIMEDOUT => IoError::Timeout,
            // Ceph reports a blocklisted client as ESHUTDOWN (EBLOCKLISTED).
            libc::ESHUTDOWN => IoError::Fenced(msg.into()),
            libc::EOPNOTSUPP => IoError::Unsupported,
            _ => IoError::Io {
                errno,
                msg: msg.into(),
            },
        }
    }
}

/// The result of an operation.
pub type IoResult = Result<(), IoError>;

/// A storage backend for one LUN.
pub trait Backend: Send + Sync {
    /// Short name for logs (`ram`, `file:/path`, `rbd:pool/image`).
    fn name(&self) -> String;
    /// Size and block size.
    fn geometry(&self) -> Geometry;
    /// What the backend supports natively.
    fn caps(&self) -> Caps;
    /// Starts `op`; never blocks on I/O. `done` must be completed exactly
    /// once, possibly before this returns.
    fn submit(&self, op: Op, done: Done);
    /// Runs `op` at once on the caller's thread when this backend finishes
    /// it without waiting on anything (a memory copy), and returns its
    /// result; otherwise hands `op` back for [`submit`](Self::submit). The
    /// ring worker tries this first, so an in-memory backend costs no trip
    /// through the completion queue.
    fn try_inline(&self, op: Op) -> Result<IoResult, Op> {
        Err(op)
    }
    /// The most bytes the ring worker may gather into one read or one
    /// write from commands taken off the ring together for ranges that
    /// follow each other (a large I/O that the initiator's block layer
    /// split at the LUN's maximum transfer length arrives that way): one
    /// backend operation then serves them all, and each of them completes
    /// with its result. 0 (the default) submits every command on its own;
    /// a backend whose every operation costs a network round trip (rbd)
    /// gains by it.
    fn merge_limit(&self) -> usize {
        0
    }
    /// Online resize to `size` bytes (the kernel's dev_size changed). A
    /// backend that cannot serve the new size refuses, and the LUN keeps
    /// its old capacity.
    fn resize(&self, size: u64) -> Result<(), IoError> {
        let _ = size;
        Err(IoError::Unsupported)
    }
}

/// Performs a compare-and-write with plain reads and writes, for backends
/// without a native one. The caller must hold whatever lock makes this
/// atomic against other writers of the range.
pub fn compare_then_write(
    read: impl FnOnce(&mut [u8]) -> IoResult,
    write: impl FnOnce(&IoBufs) -> IoResult,
    compare: &IoBufs,
    new: &IoBufs,
) -> IoResult {
    let mut current = vec![0u8; compare.len()];
    read(&mut current)?;
    let expected = compare.to_vec();
    if let Some(i) = current.iter().zip(&expected).position(|(a, b)| a != b) {
        return Err(IoError::Miscompare { offset: i as u64 });
    }
    write(new)
}
