//! A volatile in-memory backend, for tests, benchmarks and scratch LUNs.
//!
//! The store is an anonymous mapping, so a large LUN costs memory only for
//! blocks that were written. Operations run inline in `submit` (a memcpy is
//! faster than any hand-off), under a reader-writer lock so that several
//! devices may share one store.

use crate::{compare_then_write, Backend, Caps, Done, Geometry, IoBufs, IoError, IoResult, Op};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// An in-memory LUN.
pub struct RamBackend {
    store: RwLock<memmap2::MmapMut>,
    size: AtomicU64,
    block_size: u32,
}

impl RamBackend {
    /// A zeroed LUN of `size` bytes with `block_size`-byte blocks; memory
    /// is taken as blocks are written.
    pub fn new(size: u64, block_size: u32) -> std::io::Result<Self> {
        Self::with_options(size, block_size, false)
    }

    /// As [`new`](Self::new); with `populate`, all memory is faulted in up
    /// front (benchmarks, where first-touch page faults would dominate).
    pub fn with_options(size: u64, block_size: u32, populate: bool) -> std::io::Result<Self> {
        let len = usize::try_from(size)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "size too large"))?;
        let mut map = memmap2::MmapOptions::new().len(len.max(1)).map_anon()?;
        if populate {
            // Huge pages where the kernel allows (THP in madvise mode): a
            // random block then costs no TLB miss. Advice only; failure is
            // fine. Then fault everything in, after the advice, so the
            // faults take huge pages.
            let _ = map.advise(memmap2::Advice::HugePage);
            for page in map.chunks_mut(4096) {
                page[0] = 0;
            }
        }
        // Not for a store filled as it is written (a LUN in the daemon):
        // with THP defrag in its default madvise mode, a first write to
        // each 2 MiB region would wait for the kernel to compact and zero
        // a huge page (measured: a 1 GiB LUN served 238 random 4K writes
        // in its first second, at 132 ms each), where a 4 KiB page costs
        // about a microsecond.
        Ok(RamBackend {
            store: RwLock::new(map),
            size: AtomicU64::new(size),
            block_size,
        })
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, IoError> {
        let end = offset.checked_add(len).ok_or(IoError::OutOfRange)?;
        if end > self.size.load(Ordering::Acquire) {
            return Err(IoError::OutOfRange);
        }
        Ok(offset as usize..end as usize)
    }

    fn run(&self, op: Op) -> IoResult {
        match op {
            Op::Read { offset, bufs } => {
                let r = self.range(offset, bufs.len() as u64)?;
                let store = self.store.read().map_err(|_| poisoned())?;
                bufs.copy_in(0, &store[r]);
                Ok(())
            }
            Op::Write { offset, bufs, .. } => {
                let r = self.range(offset, bufs.len() as u64)?;
                let mut store = self.store.write().map_err(|_| poisoned())?;
                bufs.copy_out_streaming(0, &mut store[r]);
                Ok(())
            }
            Op::Flush => Ok(()),
            Op::Discard { ranges } => {
                let mut store = self.store.write().map_err(|_| poisoned())?;
                for (o, l) in ranges {
                    let r = self.range(o, l)?;
                    store[r].fill(0);
                }
                Ok(())
            }
            Op::WriteZeroes { offset, len, .. } => {
                let r = self.range(offset, len)?;
                let mut store = self.store.write().map_err(|_| poisoned())?;
                store[r].fill(0);
                Ok(())
            }
            Op::WriteSame {
                offset,
                len,
                pattern,
            } => {
                let r = self.range(offset, len)?;
                let pat = pattern.to_vec();
                if pat.is_empty() || len % pat.len() as u64 != 0 {
                    return Err(IoError::Unsupported);
                }
                let mut store = self.store.write().map_err(|_| poisoned())?;
                for chunk in store[r].chunks_mut(pat.len()) {
                    chunk.copy_from_slice(&pat);
                }
                Ok(())
            }
            Op::CompareAndWrite {
                offset,
                compare,
                write,
            } => {
                let r = self.range(offset, compare.len() as u64)?;
                if write.len() != compare.len() {
                    return Err(IoError::Unsupported);
                }
                // The write lock makes compare+write atomic against every
                // other writer of this store.
                let mut store = self.store.write().map_err(|_| poisoned())?;
                let region = &mut store[r];
                let snapshot = region.to_vec();
                compare_then_write(
                    |cur| {
                        cur.copy_from_slice(&snapshot);
                        Ok(())
                    },
                    |new: &IoBufs| {
                        new.copy_out(0, region);
                        Ok(())
                    },
                    &compare,
                    &write,
                )
            }
            Op::Provisioning { offset, len, out } => {
                // The store cannot tell written from untouched pages (see
                // caps): everything is mapped.
                self.range(offset, len)?;
                *out.lock().map_err(|_| poisoned())? = vec![(offset, len)];
                Ok(())
            }
        }
    }
}

fn poisoned() -> IoError {
    IoError::Io {
        errno: libc::EIO,
        msg: "ram store lock poisoned".into(),
    }
}

impl Backend for RamBackend {
    fn name(&self) -> String {
        format!("ram:{}", self.size.load(Ordering::Relaxed))
    }
    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size.load(Ordering::Acquire),
            block_size: self.block_size,
        }
    }
    fn caps(&self) -> Caps {
        Caps {
            discard: true,
            discard_zeroes: true,
            write_cache: false,
            // Not offered: a discard zero-fills (the pages stay), and
            // mincore() cannot tell an untouched page from a swapped-out
            // written one, so the store has no allocation to report.
            lba_status: false,
        }
    }
    fn submit(&self, op: Op, done: Done) {
        done.complete(self.run(op));
    }
    fn try_inline(&self, op: Op) -> Result<IoResult, Op> {
        Ok(self.run(op))
    }
    fn resize(&self, size: u64) -> Result<(), IoError> {
        let len = usize::try_from(size).map_err(|_| IoError::OutOfRange)?;
        let mut store = self.store.write().map_err(|_| poisoned())?;
        if len > store.len() {
            // Grow into a new anonymous map; untouched pages cost nothing.
            let mut bigger = memmap2::MmapOptions::new()
                .len(len)
                .map_anon()
                .map_err(|e| {
                    IoError::errno(e.raw_os_error().unwrap_or(libc::ENOMEM), "grow ram LUN")
                })?;
            let keep = store.len().min(self.size.load(Ordering::Acquire) as usize);
            bigger[..keep].copy_from_slice(&store[..keep]);
            *store = bigger;
        } else if len < self.size.load(Ordering::Acquire) as usize {
            // Shrinking: what lies past the new end must read as zeros if
            // the LUN grows again.
            let old = self.size.load(Ordering::Acquire) as usize;
            let end = old.min(store.len());
            store[len..end].fill(0);
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }
}
