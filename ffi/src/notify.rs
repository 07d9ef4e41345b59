//! Watch and notify on one RADOS object: a small message bus between the
//! clients that watch it (gateways use it to ask an image's lock owner to
//! hand the lock over instead of being fenced).

use crate::rados::IoCtx;
use crate::{check, cstr, sys, Error, Result};
use libc::{c_int, c_void, size_t};
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// One notify as a watcher receives it; [`ack`](Self::ack) answers it.
pub struct Notice<'a> {
    io: sys::rados_ioctx_t,
    oid: &'a CString,
    notify_id: u64,
    cookie: u64,
    notifier: u64,
    payload: &'a [u8],
}

impl Notice<'_> {
    /// What the notifier sent.
    pub fn payload(&self) -> &[u8] {
        self.payload
    }

    /// The notifier's global client id (`client.N`).
    pub fn notifier(&self) -> u64 {
        self.notifier
    }

    /// Acknowledges the notify with `reply` (the notifier sees it in its
    /// [`NotifyReply`]). Sends and returns without waiting.
    pub fn ack(&self, reply: &[u8]) -> Result<()> {
        let len = c_int::try_from(reply.len())
            .map_err(|_| Error::new("notify ack: reply too long", libc::EINVAL))?;
        // SAFETY: the context outlives the watch (ObjectWatch holds it
        // until after unwatch and flush); the buffer is valid for `len`.
        let r = unsafe {
            sys::rados_notify_ack(
                self.io,
                self.oid.as_ptr(),
                self.notify_id,
                self.cookie,
                reply.as_ptr().cast(),
                len,
            )
        };
        check(r, || "rados_notify_ack".into())?;
        Ok(())
    }
}

type OnNotify = Box<dyn Fn(&Notice<'_>) + Send + Sync>;
type OnError = Box<dyn Fn(i32) + Send + Sync>;

/// What the C callbacks get as their argument.
struct Ctx {
    io: sys::rados_ioctx_t,
    oid: CString,
    on_notify: OnNotify,
    on_error: OnError,
}

unsafe extern "C" fn notify_cb(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    notifier_id: u64,
    data: *mut c_void,
    data_len: size_t,
) {
    // SAFETY: `arg` is the Ctx box registered in `watch`; it is freed only
    // after rados_unwatch2 and rados_watch_flush returned.
    let ctx = unsafe { &*(arg.cast::<Ctx>()) };
    let payload: &[u8] = if data.is_null() || data_len == 0 {
        &[]
    } else {
        // SAFETY: librados passes a buffer of `data_len` bytes, valid for
        // the duration of the callback.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), data_len) }
    };
    let n = Notice {
        io: ctx.io,
        oid: &ctx.oid,
        notify_id,
        cookie: handle,
        notifier: notifier_id,
        payload,
    };
    let _ = catch_unwind(AssertUnwindSafe(|| (ctx.on_notify)(&n)));
}

unsafe extern "C" fn error_cb(arg: *mut c_void, _cookie: u64, err: c_int) {
    // SAFETY: as in notify_cb.
    let ctx = unsafe { &*(arg.cast::<Ctx>()) };
    let _ = catch_unwind(AssertUnwindSafe(|| (ctx.on_error)(-err)));
}

/// A watch on one object; unwatched on drop.
pub struct ObjectWatch {
    cookie: u64,
    ctx: *mut Ctx,
    // Dropped last: the callbacks use its raw context.
    io: Arc<IoCtx>,
}

// SAFETY: the context is only read (by librados' callback thread and by
// Drop, after the callbacks stopped); the closures are Send + Sync.
unsafe impl Send for ObjectWatch {}
// SAFETY: as above.
unsafe impl Sync for ObjectWatch {}

impl std::fmt::Debug for ObjectWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWatch")
            .field("pool", &self.io.pool())
            .field("cookie", &self.cookie)
            .finish()
    }
}

/// Watches `oid` in `io`: `on_notify` runs on librados' callback thread for
/// each notify (it must not block: ack at once, hand the work on);
/// `on_error` gets the errno when the watch is lost (blocklisted, or the
/// OSD lost it): make a new one then.
pub fn watch(
    io: &Arc<IoCtx>,
    oid: &str,
    on_notify: impl Fn(&Notice<'_>) + Send + Sync + 'static,
    on_error: impl Fn(i32) + Send + Sync + 'static,
) -> Result<ObjectWatch> {
    let ctx = Box::into_raw(Box::new(Ctx {
        io: io.raw(),
        oid: cstr(oid, "object")?,
        on_notify: Box::new(on_notify),
        on_error: Box::new(on_error),
    }));
    let mut cookie = 0u64;
    // SAFETY: live context; `ctx` stays valid until the watch is removed
    // (Drop); the object name lives in it.
    let r = unsafe {
        sys::rados_watch2(
            io.raw(),
            (*ctx).oid.as_ptr(),
            &mut cookie,
            Some(notify_cb),
            Some(error_cb),
            ctx.cast(),
        )
    };
    if r < 0 {
        // SAFETY: registration failed; librados holds no reference.
        drop(unsafe { Box::from_raw(ctx) });
        check(r, || format!("rados_watch2 {}/{oid}", io.pool()))?;
    }
    Ok(ObjectWatch {
        cookie,
        ctx,
        io: Arc::clone(io),
    })
}

impl Drop for ObjectWatch {
    fn drop(&mut self) {
        // SAFETY: live context and our cookie. rados_watch_flush then waits
        // for callbacks already queued, so the Ctx is unused afterwards.
        let r = unsafe { sys::rados_unwatch2(self.io.raw(), self.cookie) };
        // SAFETY: live cluster handle.
        unsafe { sys::rados_watch_flush(self.io.rados().raw()) };
        if r < 0 && r != -libc::ENOTCONN && r != -libc::ESHUTDOWN {
            // The watch may still be registered: leak the context rather
            // than free memory librados might call into.
            return;
        }
        // SAFETY: the box from `watch`, no longer referenced.
        drop(unsafe { Box::from_raw(self.ctx) });
    }
}

/// One watcher's acknowledgement of a notify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyAck {
    /// The watcher's global client id (`client.N`).
    pub gid: u64,
    /// Its watch cookie.
    pub cookie: u64,
    /// What it answered.
    pub payload: Vec<u8>,
}

/// What a notify got back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyReply {
    /// The watchers that answered.
    pub acks: Vec<NotifyAck>,
    /// The watchers that did not answer in time (gid, cookie).
    pub timeouts: Vec<(u64, u64)>,
}

/// Decodes librados' notify reply: `le32 n, {le64 gid, le64 cookie, le32
/// len, len bytes} * n, le32 m, {le64 gid, le64 cookie} * m`. None if the
/// buffer is short or inconsistent.
pub fn parse_notify_reply(b: &[u8]) -> Option<NotifyReply> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    fn u32le(b: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
    }
    fn u64le(b: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
    }
    let mut b = b;
    let mut r = NotifyReply::default();
    let n = u32le(&mut b)?;
    for _ in 0..n {
        let gid = u64le(&mut b)?;
        let cookie = u64le(&mut b)?;
        let len = u32le(&mut b)? as usize;
        let payload = take(&mut b, len)?.to_vec();
        r.acks.push(NotifyAck {
            gid,
            cookie,
            payload,
        });
    }
    let m = u32le(&mut b)?;
    for _ in 0..m {
        r.timeouts.push((u64le(&mut b)?, u64le(&mut b)?));
    }
    Some(r)
}

impl IoCtx {
    /// Writes `data` as the whole content of object `oid` (creating it).
    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<()> {
        let o = cstr(oid, "object")?;
        // SAFETY: live context; the buffer is valid for its length.
        let r = unsafe {
            sys::rados_write_full(self.raw(), o.as_ptr(), data.as_ptr().cast(), data.len())
        };
        check(r, || format!("write_full {}/{oid}", self.pool()))?;
        Ok(())
    }

    /// Notifies every watcher of `oid` and waits up to `timeout` for their
    /// acks. A watcher that did not answer in time is listed in
    /// [`NotifyReply::timeouts`], not an error.
    pub fn notify(&self, oid: &str, payload: &[u8], timeout: Duration) -> Result<NotifyReply> {
        let o = cstr(oid, "object")?;
        let len = c_int::try_from(payload.len())
            .map_err(|_| Error::new("notify: payload too long", libc::EINVAL))?;
        let mut reply: *mut libc::c_char = ptr::null_mut();
        let mut reply_len: size_t = 0;
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        // SAFETY: live context; valid buffers and out-pointers.
        let r = unsafe {
            sys::rados_notify2(
                self.raw(),
                o.as_ptr(),
                payload.as_ptr().cast(),
                len,
                ms,
                &mut reply,
                &mut reply_len,
            )
        };
        let parsed = if reply.is_null() {
            None
        } else {
            // SAFETY: librados returns a buffer of reply_len bytes that the
            // caller frees with rados_buffer_free.
            let b = unsafe { std::slice::from_raw_parts(reply.cast::<u8>(), reply_len) };
            let p = parse_notify_reply(b);
            // SAFETY: as above; freed once.
            unsafe { sys::rados_buffer_free(reply) };
            p
        };
        if r < 0 && r != -libc::ETIMEDOUT {
            check(r, || format!("notify {}/{oid}", self.pool()))?;
        }
        parsed.ok_or_else(|| {
            Error::new(
                format!("notify {}/{oid}: no readable reply", self.pool()),
                libc::EIO,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(acks: &[(u64, u64, &[u8])], timeouts: &[(u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((acks.len() as u32).to_le_bytes());
        for (g, c, p) in acks {
            b.extend(g.to_le_bytes());
            b.extend(c.to_le_bytes());
            b.extend((p.len() as u32).to_le_bytes());
            b.extend(*p);
        }
        b.extend((timeouts.len() as u32).to_le_bytes());
        for (g, c) in timeouts {
            b.extend(g.to_le_bytes());
            b.extend(c.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_notify_reply_decodes_acks_and_timeouts() {
        let b = reply(&[(4100, 7, b"releasing"), (4200, 9, b"")], &[(4300, 1)]);
        let r = parse_notify_reply(&b).unwrap();
        assert_eq!(r.acks.len(), 2);
        assert_eq!(r.acks[0].gid, 4100);
        assert_eq!(r.acks[0].payload, b"releasing");
        assert!(r.acks[1].payload.is_empty());
        assert_eq!(r.timeouts, vec![(4300, 1)]);
    }

    #[test]
    fn a_short_or_lying_notify_reply_is_refused() {
        let b = reply(&[(4100, 7, b"releasing")], &[(4300, 1)]);
        for cut in 0..b.len() {
            assert_eq!(parse_notify_reply(&b[..cut]), None, "cut at {cut}");
        }
        // A count far beyond the buffer.
        let mut lie = b.clone();
        lie[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_notify_reply(&lie), None);
        // An ack length beyond the buffer.
        let mut lie = b;
        lie[20..24].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert_eq!(parse_notify_reply(&lie), None);
    }
}
