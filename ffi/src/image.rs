//! Open images: metadata, exclusive lock, update watches and asynchronous
//! I/O.

use crate::{check, cstr, sys, Error, IoCtx, Rados, Result};
use libc::{c_char, c_int, c_void, iovec};
use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Mutex;

/// Memory that an asynchronous call reads or writes until it completes.
///
/// # Safety
/// For as long as the value lives, every segment [`iovecs`](Self::iovecs)
/// returns must be valid for reads and writes of its length, and no other
/// code may touch those bytes. The segments must not change while the
/// value is not moved. (The crate boxes the value before asking for its
/// segments, so segments stored inline in the value are fine.)
pub unsafe trait AioBuf: Send + 'static {
    /// The segments, in order.
    fn iovecs(&self) -> &[iovec];
    /// Total length in bytes.
    fn total_len(&self) -> usize {
        self.iovecs().iter().map(|v| v.iov_len).sum()
    }
}

/// `rbd_aio_readv` / `rbd_aio_writev`.
type AioVecFn = unsafe extern "C" fn(
    sys::rbd_image_t,
    *const libc::iovec,
    c_int,
    u64,
    sys::rbd_completion_t,
) -> c_int;

/// A heap buffer owned by the I/O (tests, bounce buffers).
pub struct OwnedBuf {
    data: Box<[u8]>,
    iov: [iovec; 1],
}

// SAFETY: the iovec points into `data`, which this value owns exclusively.
unsafe impl Send for OwnedBuf {}

impl OwnedBuf {
    /// Takes ownership of `v`.
    pub fn new(v: Vec<u8>) -> Self {
        let mut data = v.into_boxed_slice();
        let iov = [iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        }];
        OwnedBuf { data, iov }
    }

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self::new(vec![0; len])
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// Gives the bytes back.
    pub fn into_vec(self) -> Vec<u8> {
        self.data.into_vec()
    }
}

impl std::fmt::Debug for OwnedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedBuf")
            .field("len", &self.data.len())
            .finish()
    }
}

// SAFETY: the single segment is the boxed slice this value owns; moving
// the value moves the Box pointer, not the heap bytes.
unsafe impl AioBuf for OwnedBuf {
    fn iovecs(&self) -> &[iovec] {
        &self.iov
    }
}

/// Why a compare-and-write did not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CawError {
    /// The image held different data; the first differing byte is
    /// `offset` bytes from the start of the compared range.
    #[error("miscompare at byte {offset} of the range")]
    Miscompare {
        /// Offset relative to the operation's start.
        offset: u64,
    },
    /// Any other failure.
    #[error(transparent)]
    Other(#[from] Error),
}

/// Exclusive-lock mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// One owner (what the exclusive-lock feature and HA use).
    Exclusive,
    /// Shared.
    Shared,
}

impl LockMode {
    fn raw(self) -> sys::rbd_lock_mode_t {
        match self {
            LockMode::Exclusive => sys::RBD_LOCK_MODE_EXCLUSIVE,
            LockMode::Shared => sys::RBD_LOCK_MODE_SHARED,
        }
    }
}

/// Who holds an image's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOwners {
    /// The lock's mode (meaningless when `owners` is empty).
    pub mode: LockMode,
    /// Owner ids as librbd reports them (pass one to [`Image::lock_break`]).
    pub owners: Vec<String>,
}

/// Size and layout of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub obj_size: u64,
    /// Number of objects.
    pub num_objs: u64,
    /// log2 of the object size.
    pub order: i32,
}

/// A registered update watch; pass to [`Image::update_unwatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchHandle(u64);

type WatchFn = Box<dyn Fn() + Send + Sync>;

struct Watch {
    handle: u64,
    cb: *mut WatchFn,
}

/// An open RBD image; closed on drop.
pub struct Image {
    image: sys::rbd_image_t,
    name: std::sync::Arc<str>,
    obj_size: u64,
    watches: Mutex<Vec<Watch>>,
    // Declared last: the cluster handle outlives the image handle.
    _rados: Rados,
}

// SAFETY: librbd image handles are thread-safe for every call made here
// (librbd serialises internally); close happens only in Drop, with &mut.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("name", &self.name).finish()
    }
}

/// One in-flight asynchronous call: what must live until it completes.
struct Pending<B, F> {
    bufs: B,
    mismatch: u64,
    done: F,
}

/// librbd's completion callback: takes the result, releases the
/// completion, then runs the closure once and drops the buffers.
unsafe extern "C" fn trampoline<B, F>(c: sys::rbd_completion_t, arg: *mut c_void)
where
    F: FnOnce(isize, u64, B),
{
    // SAFETY: `c` is the completion we created with `arg`; librbd calls
    // this exactly once per completion.
    let ret = unsafe { sys::rbd_aio_get_return_value(c) };
    // SAFETY: as above; we never touch `c` again.
    unsafe { sys::rbd_aio_release(c) };
    // SAFETY: `arg` is the Box we leaked in `submit`, reclaimed only here
    // (or in `submit` when submission failed, in which case librbd never
    // calls us).
    let p = unsafe { Box::from_raw(arg.cast::<Pending<B, F>>()) };
    let Pending {
        bufs,
        mismatch,
        done,
    } = *p;
    // A panic must not unwind into C.
    let _ = catch_unwind(AssertUnwindSafe(move || done(ret, mismatch, bufs)));
}

impl Image {
    /// Opens `name` in `ioctx`'s pool and namespace.
    pub fn open(ioctx: &IoCtx, name: &str) -> Result<Image> {
        let n = cstr(name, "image name")?;
        let mut img: sys::rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx, valid out-pointer, no snapshot.
        let r = unsafe { sys::rbd_open(ioctx.raw(), n.as_ptr(), &mut img, ptr::null()) };
        let full = if ioctx.namespace().is_empty() {
            format!("{}/{name}", ioctx.pool())
        } else {
            format!("{}/{}/{name}", ioctx.pool(), ioctx.namespace())
        };
        check(r, || format!("opening image {full}"))?;
        let mut image = Image {
            image: img,
            name: full.into(),
            obj_size: 0,
            watches: Mutex::new(Vec::new()),
            _rados: ioctx.rados().clone(),
        };
        image.obj_size = image.stat()?.obj_size;
        Ok(image)
    }

    /// `pool/[namespace/]image`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the image, reporting a failure (drop closes silently).
    pub fn close(mut self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<()> {
        if self.image.is_null() {
            return Ok(());
        }
        let watches = std::mem::take(&mut *self.watches.lock().unwrap_or_else(|e| e.into_inner()));
        for w in watches {
            self.unwatch_one(w);
        }
        // SAFETY: open handle; it is nulled so nothing uses it again. librbd
        // waits for in-flight I/O, whose callbacks own their buffers.
        let r = unsafe { sys::rbd_close(self.image) };
        self.image = ptr::null_mut();
        check(r, || format!("closing image {}", self.name))?;
        Ok(())
    }

    fn op<T>(&self, what: &str, r: c_int, v: T) -> Result<T> {
        check(r, || format!("{what} on {}", self.name))?;
        Ok(v)
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64> {
        let mut s = 0u64;
        // SAFETY: open handle, valid out-pointer.
        let r = unsafe { sys::rbd_get_size(self.image, &mut s) };
        self.op("rbd_get_size", r, s)
    }

    /// The image's effective librbd configuration (ceph.conf and the
    /// monitors' config, then pool and image overrides), as `(name,
    /// value)` pairs. Reads the pool's and the image's metadata: a round
    /// trip to the cluster.
    pub fn config_list(&self) -> Result<Vec<(String, String)>> {
        // Pacific has 77 rbd options; librbd says ERANGE with the count it
        // needs when the array is short, so a second try always fits
        // unless options appear in between.
        let mut cap: c_int = 128;
        for _ in 0..3 {
            let mut opts: Vec<sys::rbd_config_option_t> = (0..cap)
                .map(|_| sys::rbd_config_option_t {
                    name: ptr::null_mut(),
                    value: ptr::null_mut(),
                    source: 0,
                })
                .collect();
            let mut n = cap;
            // SAFETY: open handle; `opts` holds `n` writable entries.
            let r = unsafe { sys::rbd_config_image_list(self.image, opts.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE && n > cap {
                cap = n;
                continue;
            }
            self.op("rbd_config_image_list", r, ())?;
            let n = n.clamp(0, cap);
            let text = |p: *mut c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: librbd filled entry strings, NUL-terminated.
                    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                }
            };
            let out = opts[..n as usize]
                .iter()
                .map(|o| (text(o.name), text(o.value)))
                .collect();
            // SAFETY: frees exactly the `n` entries librbd filled.
            unsafe { sys::rbd_config_image_list_cleanup(opts.as_mut_ptr(), n) };
            return Ok(out);
        }
        Err(Error::new(
            format!("rbd_config_image_list on {}", self.name),
            -libc::ERANGE,
        ))
    }

    /// Size and layout.
    pub fn stat(&self) -> Result<ImageInfo> {
        let mut i = std::mem::MaybeUninit::<sys::rbd_image_info_t>::zeroed();
        // SAFETY: open handle; `i` is a writable struct of the size passed.
        let r = unsafe {
            sys::rbd_stat(
                self.image,
                i.as_mut_ptr(),
                std::mem::size_of::<sys::rbd_image_info_t>(),
            )
        };
        self.op("rbd_stat", r, ())?;
        // SAFETY: zero-initialised plain data, filled by librbd.
        let i = unsafe { i.assume_init() };
        Ok(ImageInfo {
            size: i.size,
            obj_size: i.obj_size,
            num_objs: i.num_objs,
            order: i.order,
        })
    }

    /// Feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: open handle, valid out-pointer.
        let r = unsafe { sys::rbd_get_features(self.image, &mut f) };
        self.op("rbd_get_features", r, f)
    }

    /// True when the exclusive-lock feature is enabled.
    pub fn has_exclusive_lock_feature(&self) -> Result<bool> {
        Ok(self.features()? & sys::RBD_FEATURE_EXCLUSIVE_LOCK != 0)
    }

    /// The image's id.
    pub fn id(&self) -> Result<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: open handle; buffer writable for its length.
        let r = unsafe { sys::rbd_get_id(self.image, buf.as_mut_ptr(), buf.len()) };
        self.op("rbd_get_id", r, ())?;
        // SAFETY: librbd NUL-terminates within the buffer on success.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// Grows or shrinks the image.
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: open handle.
        let r = unsafe { sys::rbd_resize(self.image, size) };
        self.op("rbd_resize", r, ())
    }

    /// The allocated extents of `[offset, offset + len)` since the image
    /// was created, parent data included (`rbd_diff_iterate2` from no
    /// snapshot): `f(offset, len)` for each, in order. With `whole_object`
    /// and a valid object map (fast-diff) librbd answers from the map,
    /// one extent per existing object; otherwise it asks the OSDs object
    /// by object. Synchronous: it blocks until librbd has walked the
    /// range, so keep it off any thread that must not wait.
    ///
    /// Beware: librbd's object-map path may not consult the parent of a
    /// clone (see [`parent_overlap`](Self::parent_overlap)).
    pub fn allocated_extents(
        &self,
        offset: u64,
        len: u64,
        whole_object: bool,
        mut f: impl FnMut(u64, u64) + Send,
    ) -> Result<()> {
        struct Ctx<'a> {
            f: &'a mut (dyn FnMut(u64, u64) + Send),
        }
        unsafe extern "C" fn cb(
            ofs: u64,
            len: libc::size_t,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: `arg` is the Ctx below, alive for the whole call:
            // librbd calls back one call at a time (on this thread, or on
            // its own while this one waits: the closure is Send), and
            // never after rbd_diff_iterate2 returned.
            let ctx = unsafe { &mut *arg.cast::<Ctx<'_>>() };
            // From no snapshot, `exists == 0` marks a range that is a hole.
            if exists == 0 {
                return 0;
            }
            // A panic must not unwind into C: stop the walk instead.
            match catch_unwind(AssertUnwindSafe(|| (ctx.f)(ofs, len as u64))) {
                Ok(()) => 0,
                Err(_) => -libc::EIO,
            }
        }
        let mut ctx = Ctx { f: &mut f };
        // SAFETY: open handle; no snapshot name; `cb` and `ctx` live until
        // the call returns, and librbd keeps neither afterwards.
        let r = unsafe {
            sys::rbd_diff_iterate2(
                self.image,
                ptr::null(),
                offset,
                len,
                1,
                u8::from(whole_object),
                Some(cb),
                (&mut ctx as *mut Ctx<'_>).cast(),
            )
        };
        self.op("rbd_diff_iterate2", r, ())
    }

    /// How many bytes of a clone still come from its parent (0: not a
    /// clone, or flattened).
    pub fn parent_overlap(&self) -> Result<u64> {
        let mut o = 0u64;
        // SAFETY: open handle, valid out-pointer.
        let r = unsafe { sys::rbd_get_overlap(self.image, &mut o) };
        if r == -libc::ENOENT {
            return Ok(0);
        }
        self.op("rbd_get_overlap", r, o)
    }

    /// Synchronous read (tests and tools; the data path uses aio).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        // SAFETY: open handle; buf writable for its length.
        let r = unsafe { sys::rbd_read(self.image, offset, buf.len(), buf.as_mut_ptr().cast()) };
        if r < 0 {
            return Err(Error::new(format!("rbd_read on {}", self.name), r as i32));
        }
        Ok(r as usize)
    }

    /// Synchronous write (tests and tools).
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<usize> {
        // SAFETY: open handle; buf readable for its length.
        let r = unsafe { sys::rbd_write(self.image, offset, buf.len(), buf.as_ptr().cast()) };
        if r < 0 {
            return Err(Error::new(format!("rbd_write on {}", self.name), r as i32));
        }
        Ok(r as usize)
    }

    // ---- exclusive lock

    /// Whether this client holds the exclusive lock now.
    pub fn is_exclusive_lock_owner(&self) -> Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: open handle, valid out-pointer.
        let r = unsafe { sys::rbd_is_exclusive_lock_owner(self.image, &mut owner) };
        self.op("rbd_is_exclusive_lock_owner", r, owner != 0)
    }

    /// Acquires the lock (waits for a cooperative owner to hand it over;
    /// fails if the owner does not release it, see [`lock_break`](Self::lock_break)).
    pub fn lock_acquire(&self, mode: LockMode) -> Result<()> {
        // SAFETY: open handle.
        let r = unsafe { sys::rbd_lock_acquire(self.image, mode.raw()) };
        self.op("rbd_lock_acquire", r, ())
    }

    /// Releases a lock this client holds.
    pub fn lock_release(&self) -> Result<()> {
        // SAFETY: open handle.
        let r = unsafe { sys::rbd_lock_release(self.image) };
        self.op("rbd_lock_release", r, ())
    }

    /// The current owners of the lock (empty when unlocked).
    pub fn lock_owners(&self) -> Result<LockOwners> {
        let mut max: usize = 4;
        loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); max];
            let mut mode: sys::rbd_lock_mode_t = sys::RBD_LOCK_MODE_EXCLUSIVE;
            let mut n = max;
            // SAFETY: open handle; `owners` has room for `n` pointers.
            let r = unsafe {
                sys::rbd_lock_get_owners(self.image, &mut mode, owners.as_mut_ptr(), &mut n)
            };
            if r == -libc::ERANGE && n > max {
                max = n;
                continue;
            }
            if r == -libc::ENOENT {
                return Ok(LockOwners {
                    mode: LockMode::Exclusive,
                    owners: Vec::new(),
                });
            }
            self.op("rbd_lock_get_owners", r, ())?;
            let n = n.min(max);
            let list = owners[..n]
                .iter()
                .filter(|p| !p.is_null())
                // SAFETY: librbd filled the first `n` slots with strdup()ed
                // NUL-terminated strings.
                .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                .collect();
            // SAFETY: frees exactly the `n` strings librbd allocated.
            unsafe { sys::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
            return Ok(LockOwners {
                mode: if mode == sys::RBD_LOCK_MODE_SHARED {
                    LockMode::Shared
                } else {
                    LockMode::Exclusive
                },
                owners: list,
            });
        }
    }

    /// Breaks `owner`'s lock. librbd also blocklists the owner's client
    /// first if `rbd_blocklist_on_break_lock` is set (the default; the
    /// handler's clients turn it off and blocklist the owner themselves).
    pub fn lock_break(&self, mode: LockMode, owner: &str) -> Result<()> {
        let o = cstr(owner, "lock owner")?;
        // SAFETY: open handle, NUL-terminated owner.
        let r = unsafe { sys::rbd_lock_break(self.image, mode.raw(), o.as_ptr()) };
        self.op(&format!("rbd_lock_break({owner})"), r, ())
    }

    // ---- update watch

    /// Calls `f` (on a librbd thread) whenever the image's header changes:
    /// resize, features, lock state. `f` must not block or call back into
    /// librbd for this image.
    pub fn update_watch(&self, f: impl Fn() + Send + Sync + 'static) -> Result<WatchHandle> {
        unsafe extern "C" fn cb(arg: *mut c_void) {
            // SAFETY: `arg` is the WatchFn box registered below; it lives
            // until after rbd_update_unwatch returns.
            let f = unsafe { &*(arg.cast::<WatchFn>()) };
            let _ = catch_unwind(AssertUnwindSafe(f));
        }
        let boxed: *mut WatchFn = Box::into_raw(Box::new(Box::new(f) as WatchFn));
        let mut handle = 0u64;
        // SAFETY: open handle; `boxed` stays valid until unwatched.
        let r = unsafe { sys::rbd_update_watch(self.image, &mut handle, Some(cb), boxed.cast()) };
        if r < 0 {
            // SAFETY: registration failed, librbd holds no reference.
            drop(unsafe { Box::from_raw(boxed) });
            return self.op("rbd_update_watch", r, WatchHandle(0));
        }
        self.watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Watch { handle, cb: boxed });
        Ok(WatchHandle(handle))
    }

    /// Removes a watch registered on this image.
    pub fn update_unwatch(&self, h: WatchHandle) -> Result<()> {
        let w = {
            let mut ws = self.watches.lock().unwrap_or_else(|e| e.into_inner());
            match ws.iter().position(|w| w.handle == h.0) {
                Some(i) => ws.swap_remove(i),
                None => {
                    return Err(Error::new(
                        format!("no update watch {} on {}", h.0, self.name),
                        libc::ENOENT,
                    ))
                }
            }
        };
        self.unwatch_one(w);
        Ok(())
    }

    fn unwatch_one(&self, w: Watch) {
        // SAFETY: open handle and a handle librbd gave us. librbd waits for
        // a running callback before returning, so the box is then unused.
        let r = unsafe { sys::rbd_update_unwatch(self.image, w.handle) };
        if r < 0 {
            // The callback may still be registered: leak the closure rather
            // than free memory librbd might call into.
            return;
        }
        // SAFETY: the box from update_watch, no longer referenced.
        drop(unsafe { Box::from_raw(w.cb) });
    }

    // ---- asynchronous I/O

    /// Creates a completion for `bufs` and `done`, takes the raw buffer
    /// addresses with `prep`, lets `start` submit, and runs `done` inline
    /// if submission fails.
    ///
    /// `prep` sees the buffers where they will stay (inside the boxed
    /// Pending) and returns plain addresses; no reference into Pending is
    /// alive while `start` runs, since the completion may free it on
    /// another thread as soon as librbd has the request.
    fn submit<B, F, A>(
        &self,
        bufs: B,
        done: F,
        prep: impl FnOnce(&B) -> A,
        start: impl FnOnce(A, *mut u64, sys::rbd_completion_t) -> isize,
    ) where
        B: Send + 'static,
        F: FnOnce(isize, u64, B) + Send + 'static,
    {
        let p: *mut Pending<B, F> = Box::into_raw(Box::new(Pending {
            bufs,
            mismatch: 0,
            done,
        }));
        let mut c: sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: valid out-pointer; the callback matches the argument.
        let r =
            unsafe { sys::rbd_aio_create_completion(p.cast(), Some(trampoline::<B, F>), &mut c) };
        let r = if r < 0 {
            r as isize
        } else {
            // SAFETY: `p` is live and ours until `start` hands `c` to
            // librbd; the borrow ends when `prep` returns.
            let args = prep(unsafe { &(*p).bufs });
            // SAFETY: a raw field address, no reference is created.
            let mismatch = unsafe { ptr::addr_of_mut!((*p).mismatch) };
            let r = start(args, mismatch, c);
            if r < 0 {
                // SAFETY: librbd refused the request and did not take `c`.
                unsafe { sys::rbd_aio_release(c) };
            }
            r
        };
        if r < 0 {
            // SAFETY: never handed to librbd (or refused): ours again.
            let p = unsafe { Box::from_raw(p) };
            let Pending { bufs, done, .. } = *p;
            done(r, 0, bufs);
        }
    }

    /// Reads into `bufs` from `offset`; `done` gets the byte count (or the
    /// error) and the buffers back, exactly once.
    pub fn aio_readv<B: AioBuf>(
        &self,
        offset: u64,
        bufs: B,
        done: impl FnOnce(Result<usize>, B) + Send + 'static,
    ) {
        self.aio_vec(sys::rbd_aio_readv, "read", offset, bufs, done)
    }

    /// Writes `bufs` at `offset`; `done` runs exactly once.
    pub fn aio_writev<B: AioBuf>(
        &self,
        offset: u64,
        bufs: B,
        done: impl FnOnce(Result<usize>, B) + Send + 'static,
    ) {
        self.aio_vec(sys::rbd_aio_writev, "write", offset, bufs, done)
    }

    /// The one body of [`aio_readv`](Self::aio_readv) and
    /// [`aio_writev`](Self::aio_writev): librbd's two iovec calls have the
    /// same signature.
    fn aio_vec<B: AioBuf>(
        &self,
        call: AioVecFn,
        what: &'static str,
        offset: u64,
        bufs: B,
        done: impl FnOnce(Result<usize>, B) + Send + 'static,
    ) {
        let img = self.image;
        let name = std::sync::Arc::clone(&self.name);
        self.submit(
            bufs,
            move |r, _, b| done(ret_len(r, || format!("{what} at {offset} on {name}")), b),
            iov_args,
            move |(iov, n), _, c| match c_int::try_from(n) {
                // SAFETY: open handle; the iovecs and the memory they point
                // to stay valid until the completion (Pending owns them).
                Ok(n) => unsafe { call(img, iov, n, offset, c) as isize },
                Err(_) => -(libc::EINVAL as isize),
            },
        )
    }

    /// Discards (deallocates) `len` bytes at `offset`; they read back as
    /// zeros.
    pub fn aio_discard(
        &self,
        offset: u64,
        len: u64,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let img = self.image;
        let name = std::sync::Arc::clone(&self.name);
        self.submit(
            (),
            move |r, _, ()| {
                done(ret_unit(r, || {
                    format!("discard {len} at {offset} on {name}")
                }))
            },
            |_| (),
            // SAFETY: open handle.
            move |(), _, c| unsafe { sys::rbd_aio_discard(img, offset, len, c) as isize },
        )
    }

    /// Writes zeros over `len` bytes at `offset`. With `thick`, the range
    /// stays allocated; without, librbd may deallocate it.
    pub fn aio_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        thick: bool,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let img = self.image;
        let name = std::sync::Arc::clone(&self.name);
        let flags = if thick {
            sys::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        } else {
            0
        };
        self.submit(
            (),
            move |r, _, ()| {
                done(ret_unit(r, || {
                    format!("write zeroes {len} at {offset} on {name}")
                }))
            },
            |_| (),
            move |(), _, c| match usize::try_from(len) {
                // SAFETY: open handle.
                Ok(l) => unsafe { sys::rbd_aio_write_zeroes(img, offset, l, c, flags, 0) as isize },
                Err(_) => -(libc::EINVAL as isize),
            },
        )
    }

    /// Repeats `pattern` (one contiguous segment) over `len` bytes at
    /// `offset`; `len` must be a multiple of the pattern's length.
    pub fn aio_writesame<B: AioBuf>(
        &self,
        offset: u64,
        len: u64,
        pattern: B,
        done: impl FnOnce(Result<()>, B) + Send + 'static,
    ) {
        let img = self.image;
        let name = std::sync::Arc::clone(&self.name);
        self.submit(
            pattern,
            move |r, _, b| {
                done(
                    ret_unit(r, || format!("write same {len} at {offset} on {name}")),
                    b,
                )
            },
            contiguous,
            move |seg, _, c| {
                let Some((p, plen)) = seg else {
                    return -(libc::EINVAL as isize);
                };
                match usize::try_from(len) {
                    // SAFETY: open handle; the pattern stays valid until the
                    // completion.
                    Ok(l) if plen > 0 && l % plen == 0 => unsafe {
                        sys::rbd_aio_writesame(img, offset, l, p.cast(), plen, c, 0) as isize
                    },
                    _ => -(libc::EINVAL as isize),
                }
            },
        )
    }

    /// Atomically compares the image at `offset` with `cmp` and, if equal,
    /// writes `write` (same length, each one contiguous segment). librbd
    /// refuses ranges that cross an object boundary (EINVAL).
    pub fn aio_compare_and_write<C: AioBuf, W: AioBuf>(
        &self,
        offset: u64,
        cmp: C,
        write: W,
        done: impl FnOnce(std::result::Result<(), CawError>, (C, W)) + Send + 'static,
    ) {
        let img = self.image;
        let name = std::sync::Arc::clone(&self.name);
        let len = cmp.total_len() as u64;
        let obj_size = self.obj_size;
        self.submit(
            (cmp, write),
            move |r, mismatch, b| {
                let res = if r == -(libc::EILSEQ as isize) {
                    Err(CawError::Miscompare {
                        offset: miscompare_offset(mismatch, offset, len, obj_size),
                    })
                } else {
                    ret_unit(r, || format!("compare and write at {offset} on {name}"))
                        .map_err(CawError::Other)
                };
                done(res, b)
            },
            |(cb, wb)| (contiguous(cb), contiguous(wb)),
            move |segs, mismatch, c| {
                let (Some((cp, cl)), Some((wp, wl))) = segs else {
                    return -(libc::EINVAL as isize);
                };
                if cl != wl {
                    return -(libc::EINVAL as isize);
                }
                // SAFETY: open handle; both buffers and the mismatch slot
                // live in Pending until the completion.
                unsafe {
                    sys::rbd_aio_compare_and_write(
                        img,
                        offset,
                        cl,
                        cp.cast(),
                        wp.cast(),
                        c,
                        mismatch,
                        0,
                    )
                }
            },
        )
    }

    /// Makes every completed write stable.
    pub fn aio_flush(&self, done: impl FnOnce(Result<()>) + Send + 'static) {
        let img = self.image;
        let name = std::sync::Arc::clone(&self.name);
        self.submit(
            (),
            move |r, _, ()| done(ret_unit(r, || format!("flush on {name}"))),
            |_| (),
            // SAFETY: open handle.
            move |(), _, c| unsafe { sys::rbd_aio_flush(img, c) as isize },
        )
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

/// The first differing byte relative to a compare-and-write at `offset`
/// of `len` bytes, from the `mismatch_off` librbd reported.
///
/// librbd 16.2 (pacific) reports the start of the object holding the range
/// plus the offset inside the compared buffer (it maps the buffer-relative
/// offset as if it were an object offset); later releases report the
/// image offset of the byte. The pacific reading is tried first; the
/// readings can only disagree for a range starting within `len` bytes of an
/// object's start on a fixed librbd.
pub(crate) fn miscompare_offset(mismatch: u64, offset: u64, len: u64, obj_size: u64) -> u64 {
    let obj_start = if obj_size > 0 {
        offset - offset % obj_size
    } else {
        0
    };
    match mismatch.checked_sub(obj_start) {
        Some(rel) if rel < len => rel,
        _ => match mismatch.checked_sub(offset) {
            Some(rel) if rel < len => rel,
            _ => 0,
        },
    }
}

/// The segments' address and count.
fn iov_args<B: AioBuf>(b: &B) -> (*const iovec, usize) {
    let v = b.iovecs();
    (v.as_ptr(), v.len())
}

fn contiguous<B: AioBuf>(b: &B) -> Option<(*const u8, usize)> {
    match b.iovecs() {
        [one] => Some((one.iov_base as *const u8, one.iov_len)),
        _ => None,
    }
}

fn ret_len(r: isize, op: impl FnOnce() -> String) -> Result<usize> {
    if r < 0 {
        Err(Error::new(op(), i32::try_from(-r).unwrap_or(libc::EIO)))
    } else {
        Ok(r as usize)
    }
}

fn ret_unit(r: isize, op: impl FnOnce() -> String) -> Result<()> {
    ret_len(r, op).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::miscompare_offset;

    #[test]
    fn miscompare_offsets() {
        let obj = 4 << 20;
        // pacific: object start + offset in the buffer.
        assert_eq!(miscompare_offset(obj + 123, obj + (1 << 20), 512, obj), 123);
        assert_eq!(miscompare_offset(100, 512, 512, obj), 100);
        // fixed librbd: the image offset of the byte.
        assert_eq!(
            miscompare_offset(obj + (1 << 20) + 7, obj + (1 << 20), 512, obj),
            7
        );
        // nonsense stays inside the range.
        assert_eq!(miscompare_offset(1, obj * 3, 512, obj), 0);
        assert_eq!(miscompare_offset(u64::MAX, 0, 512, 0), 0);
    }
}
