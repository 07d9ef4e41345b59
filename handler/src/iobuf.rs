//! Views of the data buffers a command carries.
//!
//! On the kernel side these buffers live in the TCMU data area, a shared
//! mapping the ring layer owns. An [`IoBufs`] is a list of `iovec`s into that
//! mapping plus a keep-alive handle: the mapping cannot be unmapped while any
//! view of it exists, so a backend that completes late (a stuck OSD, a slow
//! disk) never writes into freed memory.
//!
//! The kernel does not touch a command's data blocks between handing the
//! command to userspace and reaping its completion, so for that window the
//! process owns the bytes; that is the invariant [`IoBufs::from_raw`] asks its
//! caller to uphold.

use std::any::Any;
use std::sync::Arc;

/// Something that keeps the memory behind a set of buffers mapped.
pub type KeepAlive = Arc<dyn Any + Send + Sync>;

/// One or more byte ranges, readable and writable, that make up a command's
/// data buffer, in order.
#[derive(Clone)]
pub struct IoBufs {
    iovs: Iovs,
    len: usize,
    _keep: Option<KeepAlive>,
}

#[derive(Clone)]
enum Iovs {
    One([libc::iovec; 1]),
    Many(Box<[libc::iovec]>),
}

// SAFETY: the iovecs point into memory that the creator of the `IoBufs`
// guarantees stays valid and exclusively ours while the command is in flight
// (see `from_raw`); moving the view between threads does not change that.
unsafe impl Send for IoBufs {}
// SAFETY: as above. `IoBufs` is `Clone + Sync` and writes through `&self`
// (`copy_in`, `fill_zero`, and librbd/preadv through `iovecs`), so safe
// code *could* write one buffer from two threads at once. No caller does,
// by this rule, which every writer keeps: a command's buffer has one
// writer at a time, in order:
// - the SCSI core, on the ring worker, before the command reaches a
//   backend (emulated commands never do);
// - then the one backend operation it was handed to (ram and file copy
//   in on their own thread, rbd gives the iovecs to librbd), until that
//   operation completes;
// - the only clone that outlives a submission is VERIFY's scratch
//   buffer (`scsi/rw.rs`), which the core reads after the read into it
//   completed.
// The ring takes the buffer back only after the completion. Making
// writes take `&mut` would state this in types; it is left for when the
// backend trait next changes.
unsafe impl Sync for IoBufs {}

impl std::fmt::Debug for IoBufs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBufs")
            .field("segments", &self.iovecs().len())
            .field("len", &self.len)
            .finish()
    }
}

impl IoBufs {
    /// An empty buffer list (commands that move no data).
    pub fn empty() -> Self {
        IoBufs {
            iovs: Iovs::Many(Box::new([])),
            len: 0,
            _keep: None,
        }
    }

    /// Builds a view from raw `(pointer, length)` segments.
    ///
    /// # Safety
    /// Every segment must be valid for reads and writes of its length for as
    /// long as this value or any clone of it lives, and no other code may
    /// access those bytes during that time except through these views. `keep`
    /// must keep the memory mapped.
    pub unsafe fn from_raw(segs: &[(*mut u8, usize)], keep: Option<KeepAlive>) -> Self {
        let mut len = 0usize;
        let iov = |&(p, l): &(*mut u8, usize)| libc::iovec {
            iov_base: p.cast(),
            iov_len: l,
        };
        for s in segs {
            len += s.1;
        }
        let iovs = if segs.len() == 1 {
            Iovs::One([iov(&segs[0])])
        } else {
            Iovs::Many(segs.iter().map(iov).collect())
        };
        IoBufs {
            iovs,
            len,
            _keep: keep,
        }
    }

    /// A view of a heap buffer the caller owns (tests and the generic
    /// emulations); the `Vec` is kept alive by the view.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let mut v = v.into_boxed_slice();
        let seg = (v.as_mut_ptr(), v.len());
        let keep: KeepAlive = Arc::new(std::sync::Mutex::new(v));
        // SAFETY: the boxed slice is owned by `keep`, which the view holds;
        // a boxed slice's heap storage does not move when the box moves.
        unsafe { IoBufs::from_raw(&[seg], Some(keep)) }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffers hold no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments as `iovec`s, for preadv/pwritev and librbd's readv/writev.
    pub fn iovecs(&self) -> &[libc::iovec] {
        match &self.iovs {
            Iovs::One(a) => a,
            Iovs::Many(b) => b,
        }
    }

    /// A view of `len` bytes starting at `offset`; `None` if out of range.
    pub fn slice(&self, offset: usize, len: usize) -> Option<IoBufs> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        if offset == 0 && len == self.len {
            return Some(self.clone());
        }
        let mut segs = Vec::new();
        let mut pos = 0usize;
        for iov in self.iovecs() {
            let s = pos;
            let e = pos + iov.iov_len;
            pos = e;
            let lo = s.max(offset);
            let hi = e.min(end);
            if lo < hi {
                // SAFETY: lo - s < iov_len, so the pointer stays inside the segment.
                let p = unsafe { (iov.iov_base as *mut u8).add(lo - s) };
                segs.push((p, hi - lo));
            }
        }
        // SAFETY: sub-ranges of segments this view already owns.
        Some(unsafe { IoBufs::from_raw(&segs, self._keep.clone()) })
    }

    /// One view of `parts` back to back: the buffers of several commands
    /// for one backend operation that serves them all (see
    /// [`Backend::merge_limit`](crate::Backend::merge_limit)). Segments
    /// that touch are joined (neighbouring commands often sit in
    /// neighbouring data-area blocks), and every part's memory is kept
    /// alive as long as the view.
    pub fn concat(parts: &[IoBufs]) -> IoBufs {
        let n: usize = parts.iter().map(|p| p.iovecs().len()).sum();
        let mut segs: Vec<libc::iovec> = Vec::with_capacity(n);
        let mut len = 0usize;
        for p in parts {
            len += p.len;
            for v in p.iovecs() {
                if v.iov_len == 0 {
                    continue;
                }
                if let Some(last) = segs.last_mut() {
                    if (last.iov_base as usize).wrapping_add(last.iov_len) == v.iov_base as usize {
                        last.iov_len += v.iov_len;
                        continue;
                    }
                }
                segs.push(*v);
            }
        }
        // One keep-alive when every part shares it (the ring's mapping);
        // otherwise all of them.
        let keep = match parts.first().and_then(|p| p._keep.as_ref()) {
            Some(k0)
                if parts
                    .iter()
                    .all(|p| p._keep.as_ref().is_some_and(|k| Arc::ptr_eq(k, k0))) =>
            {
                Some(Arc::clone(k0))
            }
            _ => {
                let all: Vec<Option<KeepAlive>> = parts.iter().map(|p| p._keep.clone()).collect();
                Some(Arc::new(all) as KeepAlive)
            }
        };
        let iovs = if segs.len() == 1 {
            Iovs::One([segs[0]])
        } else {
            Iovs::Many(segs.into_boxed_slice())
        };
        IoBufs {
            iovs,
            len,
            _keep: keep,
        }
    }

    /// Copies bytes from `offset` into `dst`; returns how many were copied
    /// (less than `dst.len()` only at the end of the buffers).
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        self.for_ranges(offset, dst.len(), |p, n| {
            // SAFETY: `p..p+n` lies inside one of our segments (for_ranges).
            unsafe { std::ptr::copy_nonoverlapping(p, dst[done..].as_mut_ptr(), n) };
            done += n;
        });
        done
    }

    /// As [`copy_out`](Self::copy_out), but writes `dst` with non-temporal
    /// (streaming) stores where the CPU has them. For a store whose blocks
    /// are not read back soon (a ram LUN): the CPU then does not first read
    /// each destination cache line it overwrites, which halves the memory
    /// traffic of a random write. The stores are fenced before returning.
    pub fn copy_out_streaming(&self, offset: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        self.for_ranges(offset, dst.len(), |p, n| {
            // SAFETY: `p..p+n` lies inside one of our segments (for_ranges),
            // and `done + n <= dst.len()` since for_ranges yields at most
            // `dst.len()` bytes in all.
            unsafe { stream_copy(p, dst[done..].as_mut_ptr(), n) };
            done += n;
        });
        stream_fence();
        done
    }

    /// Copies `src` into the buffers at `offset`; returns how many bytes fit.
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> usize {
        let mut done = 0;
        self.for_ranges(offset, src.len(), |p, n| {
            // SAFETY: as in copy_out.
            unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), p, n) };
            done += n;
        });
        done
    }

    /// Sets `len` bytes from `offset` to zero.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        self.for_ranges(offset, len, |p, n| {
            // SAFETY: as in copy_out.
            unsafe { std::ptr::write_bytes(p, 0, n) };
        });
    }

    /// Reads everything into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_out(0, &mut v);
        v
    }

    fn for_ranges(&self, offset: usize, len: usize, mut f: impl FnMut(*mut u8, usize)) {
        let end = offset.saturating_add(len).min(self.len);
        let mut pos = 0usize;
        for iov in self.iovecs() {
            let s = pos;
            let e = pos + iov.iov_len;
            pos = e;
            if e <= offset {
                continue;
            }
            if s >= end {
                break;
            }
            let lo = s.max(offset);
            let hi = e.min(end);
            // SAFETY: lo - s < iov_len.
            let p = unsafe { (iov.iov_base as *mut u8).add(lo - s) };
            f(p, hi - lo);
        }
    }
}

/// Copies `n` bytes from `src` to `dst`, the bulk with streaming stores.
///
/// # Safety
/// As `ptr::copy_nonoverlapping`: both ranges valid for `n` bytes and
/// disjoint.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(src: *const u8, dst: *mut u8, n: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    // Streaming stores want 16-byte aligned targets: copy up to alignment
    // the ordinary way, then whole 64-byte lines, then the tail.
    let head = dst.align_offset(16).min(n);
    let body = (n - head) / 64 * 64;
    // SAFETY: every access stays inside `0..n` of both ranges, which the
    // caller vouches for; `dst + head + i` is 16-byte aligned because
    // `head` aligned it and `i` steps by 16. SSE2 is part of the x86_64
    // baseline.
    unsafe {
        // The source was usually just written on another core (the kernel
        // copied the initiator's data in): ask for all of its lines at
        // once so their transfers overlap, not one line behind the other.
        let mut p = 0;
        while p < n {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                src.add(p).cast::<i8>(),
            );
            p += 64;
        }
        std::ptr::copy_nonoverlapping(src, dst, head);
        let (s, d) = (src.add(head), dst.add(head));
        let mut i = 0;
        while i < body {
            _mm_stream_si128(
                d.add(i).cast::<__m128i>(),
                _mm_loadu_si128(s.add(i).cast::<__m128i>()),
            );
            i += 16;
        }
        std::ptr::copy_nonoverlapping(s.add(body), d.add(body), n - head - body);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn stream_copy(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: the caller's contract is copy_nonoverlapping's.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

/// Orders streaming stores before every later store (the completion that
/// tells the kernel a write is done comes after).
fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no preconditions; SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_across_segments() {
        let mut a = vec![0u8; 5];
        let mut b = vec![0u8; 7];
        // SAFETY: both vectors outlive `bufs` (dropped before they are read).
        let bufs = unsafe {
            IoBufs::from_raw(
                &[(a.as_mut_ptr(), a.len()), (b.as_mut_ptr(), b.len())],
                None,
            )
        };
        assert_eq!(bufs.len(), 12);
        let src: Vec<u8> = (1..=12).collect();
        assert_eq!(bufs.copy_in(0, &src), 12);
        let mut out = [0u8; 6];
        assert_eq!(bufs.copy_out(3, &mut out), 6);
        assert_eq!(out, [4, 5, 6, 7, 8, 9]);
        let s = bufs.slice(4, 3).unwrap();
        assert_eq!(s.to_vec(), vec![5, 6, 7]);
        assert!(bufs.slice(10, 3).is_none());
        bufs.fill_zero(4, 2);
        drop(bufs);
        assert_eq!(a, [1, 2, 3, 4, 0]);
        assert_eq!(b, [0, 7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn streaming_copy_matches_plain_copy() {
        // Segments of odd lengths, destinations at every alignment, lengths
        // around the 16-byte and 64-byte steps of the streaming loop.
        let mut a: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
        let mut b: Vec<u8> = (0..4133u32).map(|i| (i * 13 + 5) as u8).collect();
        // SAFETY: both vectors outlive `bufs`.
        let bufs = unsafe {
            IoBufs::from_raw(
                &[(a.as_mut_ptr(), a.len()), (b.as_mut_ptr(), b.len())],
                None,
            )
        };
        let whole = bufs.to_vec();
        for (offset, len) in [
            (0, 4433),
            (1, 4096),
            (3, 63),
            (17, 129),
            (299, 2),
            (250, 1000),
        ] {
            for shift in 0..17 {
                let mut got = vec![0xeeu8; len + shift + 3];
                let n = bufs.copy_out_streaming(offset, &mut got[shift..shift + len]);
                let want = (whole.len() - offset).min(len);
                assert_eq!(n, want, "offset {offset} len {len} shift {shift}");
                assert_eq!(&got[shift..shift + n], &whole[offset..offset + n]);
                assert!(got[..shift].iter().all(|&x| x == 0xee), "wrote before dst");
                assert!(
                    got[shift + len..].iter().all(|&x| x == 0xee),
                    "wrote past dst"
                );
            }
        }
    }

    #[test]
    fn concat_joins_touching_segments_and_keeps_every_part_alive() {
        // One 12-byte block split into three views, and a separate buffer.
        let block = IoBufs::from_vec((0..12u8).collect());
        let (a, b, c) = (
            block.slice(0, 4).unwrap(),
            block.slice(4, 4).unwrap(),
            block.slice(8, 4).unwrap(),
        );
        let other = IoBufs::from_vec(vec![100, 101]);
        let all = IoBufs::concat(&[a.clone(), b.clone(), other.clone(), c]);
        assert_eq!(all.len(), 14);
        // a and b touch (joined), then the other buffer, then c on its own.
        assert_eq!(all.iovecs().len(), 3);
        assert_eq!(
            all.to_vec(),
            [0, 1, 2, 3, 4, 5, 6, 7, 100, 101, 8, 9, 10, 11]
        );
        // Writing through the joined view lands in each part.
        assert_eq!(all.copy_in(2, &[50, 51, 52, 53, 54, 55, 56, 57]), 8);
        assert_eq!(a.to_vec(), [0, 1, 50, 51]);
        assert_eq!(b.to_vec(), [52, 53, 54, 55]);
        assert_eq!(other.to_vec(), [56, 57]);
        // The parts' own keep-alives go; the joined view holds the memory.
        let weak_other = Arc::downgrade(other._keep.as_ref().unwrap());
        drop((block, a, b, other));
        assert!(
            weak_other.upgrade().is_some(),
            "the view keeps its parts alive"
        );
        assert_eq!(all.to_vec()[8..10], [56, 57]);
        drop(all);
        assert!(weak_other.upgrade().is_none(), "and lets them go with it");
        // Parts sharing one keep-alive share it in the joined view too.
        let one = IoBufs::from_vec(vec![1; 8]);
        let joined = IoBufs::concat(&[one.slice(0, 4).unwrap(), one.slice(4, 4).unwrap()]);
        assert_eq!(joined.iovecs().len(), 1);
        assert!(Arc::ptr_eq(
            joined._keep.as_ref().unwrap(),
            one._keep.as_ref().unwrap()
        ));
    }

    #[test]
    fn copy_out_stops_at_end() {
        let bufs = IoBufs::from_vec(vec![9u8; 4]);
        let mut out = [0u8; 8];
        assert_eq!(bufs.copy_out(2, &mut out), 2);
        assert_eq!(&out[..2], &[9, 9]);
    }
}
