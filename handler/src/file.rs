//! A backend on a regular file or a block device.
//!
//! A pool of threads ([`FilePool`]) runs positional vectored I/O
//! (preadv/pwritev2) straight on the command's buffers, so the ring worker
//! never blocks. The daemon shares one pool between all its file LUNs, so
//! their threads are bounded however many LUNs there are.
//! COMPARE AND WRITE is emulated with read, compare and write under an
//! exclusive lock that ordinary writes take shared, which makes it atomic
//! against every write that goes through this backend.

use crate::{compare_then_write, Backend, Caps, Done, Geometry, IoBufs, IoError, IoResult, Op};
use crossbeam_channel::Sender;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Errors opening a file backend.
#[derive(Debug, thiserror::Error)]
pub enum FileOpenError {
    /// The path could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0} is not a regular file or block device")]
    NotFileOrBlock(PathBuf),
    /// The block device is smaller than the LUN.
    #[error("{path} holds {have} bytes, the device needs {want}")]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The LUN's size.
        want: u64,
    },
}

struct Inner {
    file: File,
    path: PathBuf,
    size: AtomicU64,
    block_size: u32,
    is_block: bool,
    caw_lock: RwLock<()>,
}

/// One queued operation, with the file it is for.
type Job = (Arc<Inner>, Op, Done);

/// Threads that run file I/O for the backends given it. Operations of all
/// its backends share the threads (one slow file can delay another's I/O
/// while every thread waits on it: give such a file its own pool).
pub struct FilePool {
    tx: Option<Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl FilePool {
    /// A pool of `threads` threads (at least one), named `file-io-N`.
    pub fn new(threads: usize) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut pool = FilePool {
            tx: Some(tx),
            workers: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            // On error, dropping `pool` ends the threads started so far.
            let h = std::thread::Builder::new()
                .name(format!("file-io-{i}"))
                .spawn(move || {
                    for (inner, op, done) in rx {
                        done.complete(inner.run(op));
                    }
                })?;
            pool.workers.push(h);
        }
        Ok(Arc::new(pool))
    }

    /// Its threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    fn submit(&self, inner: &Arc<Inner>, op: Op, done: Done) {
        match &self.tx {
            Some(tx) => {
                if let Err(e) = tx.send((inner.clone(), op, done)) {
                    let (_, _, done) = e.into_inner();
                    done.complete(Err(IoError::errno(libc::ENODEV, "backend closed")));
                }
            }
            None => done.complete(Err(IoError::errno(libc::ENODEV, "backend closed"))),
        }
    }
}

impl Drop for FilePool {
    fn drop(&mut self) {
        // Closing the channel lets the workers finish queued work and exit.
        self.tx.take();
        let me = std::thread::current().id();
        for w in self.workers.drain(..) {
            if w.thread().id() != me {
                let _ = w.join();
            }
        }
    }
}

/// A LUN stored in a file or block device.
pub struct FileBackend {
    inner: Arc<Inner>,
    pool: Arc<FilePool>,
}

impl FileBackend {
    /// Opens `path` as a LUN of `size` bytes (a regular file is extended,
    /// sparsely, if shorter; `None` takes the file's own size), served by
    /// `threads` I/O threads of its own.
    pub fn open(
        path: &Path,
        size: Option<u64>,
        block_size: u32,
        threads: usize,
    ) -> Result<Self, FileOpenError> {
        let pool = FilePool::new(threads).map_err(|source| FileOpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::open_in(path, size, block_size, pool)
    }

    /// As [`open`](Self::open), served by the threads of `pool`.
    pub fn open_in(
        path: &Path,
        size: Option<u64>,
        block_size: u32,
        pool: Arc<FilePool>,
    ) -> Result<Self, FileOpenError> {
        let open_err = |source| FileOpenError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(size.is_some())
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let is_block = ft.is_block_device();
        if !ft.is_file() && !is_block {
            return Err(FileOpenError::NotFileOrBlock(path.to_owned()));
        }
        let have = if is_block {
            block_device_size(&file).map_err(open_err)?
        } else {
            meta.len()
        };
        let size = size.unwrap_or(have);
        if have < size {
            if is_block {
                return Err(FileOpenError::TooSmall {
                    path: path.to_owned(),
                    have,
                    want: size,
                });
            }
            file.set_len(size).map_err(open_err)?;
        }
        let inner = Arc::new(Inner {
            file,
            path: path.to_owned(),
            size: AtomicU64::new(size),
            block_size,
            is_block,
            caw_lock: RwLock::new(()),
        });
        Ok(FileBackend { inner, pool })
    }
}

fn block_device_size(f: &File) -> std::io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `size`.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

fn errno_err(what: &str) -> IoError {
    let e = std::io::Error::last_os_error();
    IoError::errno(e.raw_os_error().unwrap_or(libc::EIO), what.to_string())
}

impl Inner {
    fn check(&self, offset: u64, len: u64) -> IoResult {
        match offset.checked_add(len) {
            Some(end) if end <= self.size.load(Ordering::Acquire) => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }

    /// Vectored positional I/O until every byte moved; short transfers are
    /// resumed, a read past EOF of a sparse file reads zeros.
    fn vectored(&self, write: bool, offset: u64, bufs: &IoBufs, flags: i32) -> IoResult {
        let mut done = 0usize;
        let total = bufs.len();
        while done < total {
            let rest = bufs.slice(done, total - done).ok_or(IoError::OutOfRange)?;
            let iov = rest.iovecs();
            let cnt = iov.len().min(1024) as i32;
            let pos = (offset + done as u64) as libc::off_t;
            // SAFETY: the iovecs are valid for their lengths (IoBufs invariant).
            let n = unsafe {
                if write {
                    libc::pwritev2(self.file.as_raw_fd(), iov.as_ptr(), cnt, pos, flags)
                } else {
                    libc::preadv(self.file.as_raw_fd(), iov.as_ptr(), cnt, pos)
                }
            };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(errno_err(if write { "pwritev2" } else { "preadv" }));
            }
            if n == 0 {
                if write {
                    return Err(IoError::errno(libc::EIO, "pwritev2 wrote nothing"));
                }
                bufs.fill_zero(done, total - done);
                return Ok(());
            }
            done += n as usize;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> IoResult {
        if len == 0 {
            return Ok(());
        }
        if self.is_block {
            let range = [offset, len];
            // BLKDISCARD = _IO(0x12, 119)
            const BLKDISCARD: libc::c_ulong = 0x1277;
            // SAFETY: the ioctl reads two u64s from `range`.
            let r = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
            if r < 0 {
                return Err(errno_err("BLKDISCARD"));
            }
            return Ok(());
        }
        // SAFETY: plain syscall on our fd.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r < 0 {
            return Err(errno_err("fallocate(PUNCH_HOLE)"));
        }
        Ok(())
    }

    /// The data ranges of `[offset, offset + len)` of a regular file, by
    /// SEEK_DATA/SEEK_HOLE: holes are what a punch left (or never
    /// written) and read as zeros. A filesystem without hole tracking
    /// reports the whole file as data, which is the safe answer.
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, IoError> {
        let end = offset + len;
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            // SAFETY: plain syscall on our fd.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    // No data at or after `pos` (past EOF reads zeros too).
                    break;
                }
                return Err(errno_err("lseek(SEEK_DATA)"));
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: plain syscall on our fd.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            // EOF counts as a hole; an error here leaves the rest mapped.
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            if hole <= data {
                // Cannot happen on a sane filesystem; never loop on it.
                out.push((data, end - data));
                break;
            }
            out.push((data, hole - data));
            pos = hole;
        }
        Ok(out)
    }

    fn zero_by_writing(&self, offset: u64, len: u64) -> IoResult {
        let chunk = 1 << 20;
        let zeros = IoBufs::from_vec(vec![0u8; chunk.min(len as usize).max(1)]);
        let mut pos = 0u64;
        while pos < len {
            let n = (len - pos).min(zeros.len() as u64) as usize;
            let part = zeros.slice(0, n).ok_or(IoError::OutOfRange)?;
            self.vectored(true, offset + pos, &part, 0)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn lock_shared(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, IoError> {
        self.caw_lock
            .read()
            .map_err(|_| IoError::errno(libc::EIO, "lock poisoned"))
    }

    fn run(&self, op: Op) -> IoResult {
        match op {
            Op::Read { offset, bufs } => {
                self.check(offset, bufs.len() as u64)?;
                self.vectored(false, offset, &bufs, 0)
            }
            Op::Write { offset, bufs, fua } => {
                self.check(offset, bufs.len() as u64)?;
                let _g = self.lock_shared()?;
                self.vectored(true, offset, &bufs, if fua { libc::RWF_DSYNC } else { 0 })
            }
            Op::Flush => {
                // SAFETY: plain syscall on our fd.
                if unsafe { libc::fdatasync(self.file.as_raw_fd()) } < 0 {
                    return Err(errno_err("fdatasync"));
                }
                Ok(())
            }
            Op::Discard { ranges } => {
                let _g = self.lock_shared()?;
                for (o, l) in ranges {
                    self.check(o, l)?;
                    self.punch(o, l)?;
                }
                Ok(())
            }
            Op::WriteZeroes { offset, len, .. } => {
                self.check(offset, len)?;
                let _g = self.lock_shared()?;
                if !self.is_block && self.punch(offset, len).is_ok() {
                    return Ok(());
                }
                self.zero_by_writing(offset, len)
            }
            Op::WriteSame {
                offset,
                len,
                pattern,
            } => {
                self.check(offset, len)?;
                let pat = pattern.to_vec();
                if pat.is_empty() || len % pat.len() as u64 != 0 {
                    return Err(IoError::Unsupported);
                }
                let reps = ((1usize << 20) / pat.len()).max(1);
                let buf = IoBufs::from_vec(pat.repeat(reps));
                let _g = self.lock_shared()?;
                let mut pos = 0u64;
                while pos < len {
                    let n = (len - pos).min(buf.len() as u64) as usize;
                    let part = buf.slice(0, n).ok_or(IoError::OutOfRange)?;
                    self.vectored(true, offset + pos, &part, 0)?;
                    pos += n as u64;
                }
                Ok(())
            }
            Op::CompareAndWrite {
                offset,
                compare,
                write,
            } => {
                self.check(offset, compare.len() as u64)?;
                if write.len() != compare.len() {
                    return Err(IoError::Unsupported);
                }
                let _g = self
                    .caw_lock
                    .write()
                    .map_err(|_| IoError::errno(libc::EIO, "lock poisoned"))?;
                compare_then_write(
                    |cur| {
                        let tmp = IoBufs::from_vec(vec![0u8; cur.len()]);
                        self.vectored(false, offset, &tmp, 0)?;
                        tmp.copy_out(0, cur);
                        Ok(())
                    },
                    |new| self.vectored(true, offset, new, 0),
                    &compare,
                    &write,
                )
            }
            Op::Provisioning { offset, len, out } => {
                self.check(offset, len)?;
                let ranges = if self.is_block {
                    // A block device tells nothing: all mapped (caps do
                    // not offer GET LBA STATUS for it anyway).
                    vec![(offset, len)]
                } else {
                    self.data_ranges(offset, len)?
                };
                *out.lock()
                    .map_err(|_| IoError::errno(libc::EIO, "lock poisoned"))? = ranges;
                Ok(())
            }
        }
    }
}

impl Backend for FileBackend {
    fn resize(&self, size: u64) -> Result<(), IoError> {
        let have = if self.inner.is_block {
            block_device_size(&self.inner.file).map_err(|e| {
                IoError::errno(e.raw_os_error().unwrap_or(libc::EIO), "BLKGETSIZE64")
            })?
        } else {
            let len = self
                .inner
                .file
                .metadata()
                .map_err(|e| IoError::errno(e.raw_os_error().unwrap_or(libc::EIO), "fstat"))?
                .len();
            if len < size {
                self.inner.file.set_len(size).map_err(|e| {
                    IoError::errno(e.raw_os_error().unwrap_or(libc::EIO), "ftruncate")
                })?;
            }
            size.max(len)
        };
        if have < size {
            return Err(IoError::NoSpace);
        }
        self.inner.size.store(size, Ordering::Release);
        Ok(())
    }

    fn name(&self) -> String {
        format!("file:{}", self.inner.path.display())
    }
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.inner.size.load(Ordering::Acquire),
            block_size: self.inner.block_size,
        }
    }
    fn caps(&self) -> Caps {
        Caps {
            discard: true,
            discard_zeroes: !self.inner.is_block,
            write_cache: true,
            // Holes of a regular file are deallocated and read zeros; a
            // block device cannot say what its discards did.
            lba_status: !self.inner.is_block,
        }
    }
    fn submit(&self, op: Op, done: Done) {
        self.pool.submit(&self.inner, op, done);
    }
}
