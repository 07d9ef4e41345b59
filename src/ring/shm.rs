//! The only code that touches the shared mapping.
//!
//! The kernel and this process share one mapping (the UIO device's map0, or
//! the emulator's memfd). Rust references into it would be unsound, since
//! the other side writes whenever it likes, so every access here is a
//! volatile or atomic access through a raw pointer, and every offset is
//! checked against the mapping's length first. Ordering follows the
//! kernel's ABI:
//! - the kernel writes an entry, then publishes `cmd_head` with
//!   `smp_store_release`; we read `cmd_head` with acquire, then the entry;
//! - we write a completion into an entry, then publish `cmd_tail` with
//!   release; the kernel reads `cmd_tail` with `READ_ONCE` after the
//!   doorbell write (a syscall, itself a full barrier).

use std::sync::atomic::{AtomicU32, Ordering};

/// An offset or length fell outside the mapping, or was misaligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "shared memory access at {offset:#x}+{len} outside the {map_len:#x}-byte mapping or misaligned"
)]
pub struct OutOfBounds {
    /// Offset asked for.
    pub offset: u64,
    /// Length asked for.
    pub len: u64,
    /// The mapping's length.
    pub map_len: usize,
}

/// A shared mapping, and checked access to it.
pub struct SharedMem {
    base: *mut u8,
    len: usize,
    _owner: Box<dyn std::any::Any + Send + Sync>,
}

// SAFETY: all access goes through volatile/atomic operations on a raw
// pointer; the mapping stays valid as long as `_owner` lives.
unsafe impl Send for SharedMem {}
// SAFETY: as above; no `&` or `&mut` to the shared bytes is ever created.
unsafe impl Sync for SharedMem {}

impl std::fmt::Debug for SharedMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMem").field("len", &self.len).finish()
    }
}

impl SharedMem {
    /// Wraps a `memmap2::MmapRaw` that maps the whole shared area.
    pub fn from_mmap(map: memmap2::MmapRaw) -> Self {
        let base = map.as_mut_ptr();
        let len = map.len();
        SharedMem {
            base,
            len,
            _owner: Box::new(map),
        }
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never for a valid device).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `[offset, offset+len)` lies inside the mapping and that
    /// `offset` is a multiple of `align`; returns the offset as usize.
    pub fn check(&self, offset: u64, len: u64, align: usize) -> Result<usize, OutOfBounds> {
        let err = OutOfBounds {
            offset,
            len,
            map_len: self.len,
        };
        let end = offset.checked_add(len).ok_or(err)?;
        if end > self.len as u64 || !offset.is_multiple_of(align as u64) {
            return Err(err);
        }
        Ok(offset as usize)
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        // SAFETY: callers checked `off` against `len`.
        unsafe { self.base.add(off) }
    }

    fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, OutOfBounds> {
        let off = self.check(offset as u64, 4, 4)?;
        // SAFETY: in bounds and 4-aligned (the mapping is page aligned);
        // AtomicU32 has the layout of u32 and may alias memory others write.
        Ok(unsafe { &*(self.ptr(off) as *const AtomicU32) })
    }

    /// Loads a u32 with acquire ordering (`cmd_head`).
    pub fn load_acquire_u32(&self, offset: usize) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.load(Ordering::Acquire))
    }

    /// Stores a u32 with release ordering (`cmd_tail`).
    pub fn store_release_u32(&self, offset: usize, v: u32) -> Result<(), OutOfBounds> {
        self.atomic_u32(offset)?.store(v, Ordering::Release);
        Ok(())
    }

    /// Volatile read of a naturally aligned u8/u16/u32/u64 in the host's
    /// byte order (the kernel writes the ring natively, not little-endian).
    pub fn read_u8(&self, offset: usize) -> Result<u8, OutOfBounds> {
        let off = self.check(offset as u64, 1, 1)?;
        // SAFETY: checked above.
        Ok(unsafe { std::ptr::read_volatile(self.ptr(off)) })
    }

    /// See [`read_u8`](Self::read_u8).
    pub fn read_u16(&self, offset: usize) -> Result<u16, OutOfBounds> {
        let off = self.check(offset as u64, 2, 2)?;
        // SAFETY: checked above, including alignment.
        Ok(unsafe { std::ptr::read_volatile(self.ptr(off) as *const u16) })
    }

    /// See [`read_u8`](Self::read_u8).
    pub fn read_u32(&self, offset: usize) -> Result<u32, OutOfBounds> {
        let off = self.check(offset as u64, 4, 4)?;
        // SAFETY: checked above, including alignment.
        Ok(unsafe { std::ptr::read_volatile(self.ptr(off) as *const u32) })
    }

    /// See [`read_u8`](Self::read_u8).
    pub fn read_u64(&self, offset: usize) -> Result<u64, OutOfBounds> {
        let off = self.check(offset as u64, 8, 8)?;
        // SAFETY: checked above, including alignment.
        Ok(unsafe { std::ptr::read_volatile(self.ptr(off) as *const u64) })
    }

    /// Volatile write of a u8.
    pub fn write_u8(&self, offset: usize, v: u8) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, 1, 1)?;
        // SAFETY: checked above.
        unsafe { std::ptr::write_volatile(self.ptr(off), v) };
        Ok(())
    }

    /// Volatile write of an aligned u16.
    pub fn write_u16(&self, offset: usize, v: u16) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, 2, 2)?;
        // SAFETY: checked above, including alignment.
        unsafe { std::ptr::write_volatile(self.ptr(off) as *mut u16, v) };
        Ok(())
    }

    /// Volatile write of an aligned u32.
    pub fn write_u32(&self, offset: usize, v: u32) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, 4, 4)?;
        // SAFETY: checked above, including alignment.
        unsafe { std::ptr::write_volatile(self.ptr(off) as *mut u32, v) };
        Ok(())
    }

    /// Volatile write of an aligned u64.
    pub fn write_u64(&self, offset: usize, v: u64) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, 8, 8)?;
        // SAFETY: checked above, including alignment.
        unsafe { std::ptr::write_volatile(self.ptr(off) as *mut u64, v) };
        Ok(())
    }

    /// Copies bytes out of the mapping, byte by byte volatile (CDBs only:
    /// short, and possibly written concurrently by a misbehaving peer).
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, dst.len() as u64, 1)?;
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: checked above.
            *b = unsafe { std::ptr::read_volatile(self.ptr(off + i)) };
        }
        Ok(())
    }

    /// Copies bytes into the mapping (sense data), volatile.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, src.len() as u64, 1)?;
        for (i, b) in src.iter().enumerate() {
            // SAFETY: checked above.
            unsafe { std::ptr::write_volatile(self.ptr(off + i), *b) };
        }
        Ok(())
    }

    /// Fills a range with zeros, volatile.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, len as u64, 1)?;
        for i in 0..len {
            // SAFETY: checked above.
            unsafe { std::ptr::write_volatile(self.ptr(off + i), 0) };
        }
        Ok(())
    }

    /// Bulk copy into the data area. Not volatile: data blocks belong to
    /// one side at a time by protocol (the emulator fills them before
    /// publishing `cmd_head`), so a plain memcpy is correct and fast.
    pub fn write_bytes_fast(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, src.len() as u64, 1)?;
        // SAFETY: checked above; `src` is ordinary memory, not the mapping.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr(off), src.len()) };
        Ok(())
    }

    /// Bulk copy out of the data area; see [`write_bytes_fast`](Self::write_bytes_fast).
    pub fn read_bytes_fast(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let off = self.check(offset as u64, dst.len() as u64, 1)?;
        // SAFETY: checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Whether `[ptr, ptr+len)` lies inside the mapping at or after
    /// `from` (tests and fuzzers check handed-out buffers with it).
    pub fn contains(&self, from: usize, ptr: *const u8, len: usize) -> bool {
        let base = self.base as usize;
        let p = ptr as usize;
        p >= base + from && p.checked_add(len).is_some_and(|e| e <= base + self.len)
    }

    /// A raw pointer to `[offset, offset+len)`, for data buffers handed to
    /// backends as [`tcmu_handler::IoBufs`]; checked, never dereferenced here.
    pub fn raw_range(&self, offset: u64, len: u64) -> Result<*mut u8, OutOfBounds> {
        let off = self.check(offset, len, 1)?;
        Ok(self.ptr(off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(len: usize) -> SharedMem {
        SharedMem::from_mmap(
            memmap2::MmapOptions::new()
                .len(len)
                .map_anon()
                .unwrap()
                .into(),
        )
    }

    #[test]
    fn bounds_and_alignment_are_checked() {
        let m = mem(4096);
        assert!(m.read_u32(4092).is_ok());
        assert!(m.read_u32(4093).is_err());
        assert!(m.read_u32(4094).is_err());
        assert!(m.read_u64(4096).is_err());
        assert!(m.check(u64::MAX, 2, 1).is_err());
        assert!(m.raw_range(4000, 97).is_err());
        assert!(m.raw_range(4000, 96).is_ok());
        m.write_u32(8, 0xdead_beef).unwrap();
        assert_eq!(m.load_acquire_u32(8).unwrap(), 0xdead_beef);
        assert_eq!(m.read_u16(8).unwrap(), 0xbeef);
        let mut b = [0u8; 4];
        m.read_bytes(8, &mut b).unwrap();
        assert_eq!(b, 0xdead_beefu32.to_le_bytes());
    }
}
