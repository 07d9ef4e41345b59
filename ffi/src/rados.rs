//! The cluster handle and pool I/O contexts.

use crate::{check, cstr, encode_dict, sys, Error, Result};
use std::ffi::CStr;
use std::path::Path;
use std::ptr;
use std::sync::Arc;

/// Owns a `rados_t`; shuts it down on drop.
struct Handle(sys::rados_t);

// SAFETY: librados cluster handles are thread-safe for every call this
// crate makes; configuration (the only non-thread-safe part) happens in
// RadosBuilder before the handle is shared.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and nothing uses it
        // after this: every IoCtx and Image holds an Arc to it.
        unsafe { sys::rados_shutdown(self.0) }
    }
}

/// A cluster handle being configured; [`connect`](Self::connect) turns it
/// into a [`Rados`].
pub struct RadosBuilder {
    handle: Handle,
    name: String,
}

impl RadosBuilder {
    /// A handle for the client `client.<id>` (`client.admin` without one).
    pub fn new(id: Option<&str>) -> Result<Self> {
        let name = format!("client.{}", id.unwrap_or("admin"));
        let c_name = cstr(&name, "client name")?;
        let cluster = cstr("ceph", "cluster name")?;
        let mut h: sys::rados_t = ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated strings.
        let r = unsafe { sys::rados_create2(&mut h, cluster.as_ptr(), c_name.as_ptr(), 0) };
        check(r, || format!("rados_create2({name})"))?;
        Ok(RadosBuilder {
            handle: Handle(h),
            name,
        })
    }

    /// Reads a ceph.conf; `None` searches the default places
    /// ($CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf).
    pub fn read_conf(self, path: Option<&Path>) -> Result<Self> {
        let p = match path {
            Some(p) => Some(cstr(&p.to_string_lossy(), "conf path")?),
            None => None,
        };
        // SAFETY: the handle is live; the path is NUL-terminated or null.
        let r = unsafe {
            sys::rados_conf_read_file(
                self.handle.0,
                p.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
            )
        };
        check(r, || match path {
            Some(p) => format!("reading ceph config {}", p.display()),
            None => "reading the default ceph config".into(),
        })?;
        Ok(self)
    }

    /// Sets one configuration option.
    pub fn set(self, option: &str, value: &str) -> Result<Self> {
        let o = cstr(option, "option")?;
        let v = cstr(value, "value")?;
        // SAFETY: live handle, NUL-terminated strings.
        let r = unsafe { sys::rados_conf_set(self.handle.0, o.as_ptr(), v.as_ptr()) };
        check(r, || format!("setting {option}={value}"))?;
        Ok(self)
    }

    /// Reads one configuration option.
    pub fn get(&self, option: &str) -> Result<String> {
        conf_get(&self.handle, option)
    }

    /// Connects (authenticates with the monitors).
    pub fn connect(self) -> Result<Rados> {
        // SAFETY: live, configured handle.
        let r = unsafe { sys::rados_connect(self.handle.0) };
        check(r, || format!("connecting to the cluster as {}", self.name))?;
        Ok(Rados {
            inner: Arc::new(Inner {
                handle: self.handle,
                name: self.name,
            }),
        })
    }
}

fn conf_get(h: &Handle, option: &str) -> Result<String> {
    let o = cstr(option, "option")?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: live handle; buf is writable for its length.
    let r = unsafe { sys::rados_conf_get(h.0, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    check(r, || format!("reading option {option}"))?;
    let s = CStr::from_bytes_until_nul(&buf).map_err(|_| {
        Error::new(
            format!("option {option}: value too long"),
            libc::ENAMETOOLONG,
        )
    })?;
    Ok(s.to_string_lossy().into_owned())
}

struct Inner {
    handle: Handle,
    name: String,
}

/// A connected cluster handle, shared by cloning.
#[derive(Clone)]
pub struct Rados {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Rados {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rados")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl Rados {
    pub(crate) fn raw(&self) -> sys::rados_t {
        self.inner.handle.0
    }

    /// The client name (`client.admin`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A handle that does not keep the connection open.
    pub fn downgrade(&self) -> WeakRados {
        WeakRados {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// True when both values are the same connection.
    pub fn same(&self, other: &Rados) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// This client's global instance id (the number in `client.NNNN` that
    /// lock owners and the service map show).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: connected handle.
        unsafe { sys::rados_get_instance_id(self.raw()) }
    }

    /// Reads one configuration option.
    pub fn conf_get(&self, option: &str) -> Result<String> {
        conf_get(&self.inner.handle, option)
    }

    /// This client's addresses, as `osd blocklist add` takes them
    /// (e.g. `[v2:127.0.0.1:0/123,v1:127.0.0.1:0/123]` or a single one).
    pub fn addrs(&self) -> Result<String> {
        let mut p: *mut libc::c_char = ptr::null_mut();
        // SAFETY: connected handle, valid out-pointer.
        let r = unsafe { sys::rados_getaddrs(self.raw(), &mut p) };
        check(r, || "rados_getaddrs".into())?;
        if p.is_null() {
            return Err(Error::new("rados_getaddrs returned nothing", libc::EIO));
        }
        // SAFETY: librados returns a NUL-terminated strdup()ed string that
        // the caller frees with free().
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: as above; freed once.
        unsafe { libc::free(p.cast()) };
        Ok(s)
    }

    /// Blocklists a client address (`osd blocklist add ADDR EXPIRE`): its
    /// in-flight and future OSD operations fail with ESHUTDOWN. One entry
    /// of [`addrs`](Self::addrs) or a lock owner's address.
    pub fn blocklist_add(&self, addr: &str, expire_secs: u32) -> Result<()> {
        let a = cstr(addr, "address")?;
        // SAFETY: connected handle; librados only reads the string (the
        // parameter is `char *` for historical reasons).
        let r = unsafe { sys::rados_blocklist_add(self.raw(), a.as_ptr().cast_mut(), expire_secs) };
        check(r, || format!("osd blocklist add {addr}"))?;
        Ok(())
    }

    /// Sends a JSON command to the monitors; returns (output, status).
    pub fn mon_command(&self, cmd_json: &str, input: &[u8]) -> Result<(Vec<u8>, String)> {
        let c = cstr(cmd_json, "mon command")?;
        let mut cmds = [c.as_ptr()];
        let mut out: *mut libc::c_char = ptr::null_mut();
        let mut out_len: libc::size_t = 0;
        let mut outs: *mut libc::c_char = ptr::null_mut();
        let mut outs_len: libc::size_t = 0;
        // SAFETY: connected handle; one valid command string; input valid
        // for its length; out-pointers valid.
        let r = unsafe {
            sys::rados_mon_command(
                self.raw(),
                cmds.as_mut_ptr(),
                1,
                input.as_ptr().cast(),
                input.len(),
                &mut out,
                &mut out_len,
                &mut outs,
                &mut outs_len,
            )
        };
        // librados allocated these (or left them null) for us to free
        // with rados_buffer_free.
        let take = |p: *mut libc::c_char, n: usize| -> Vec<u8> {
            if p.is_null() {
                return Vec::new();
            }
            // SAFETY: a non-null buffer from librados holds `n` bytes.
            let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) }.to_vec();
            // SAFETY: librados allocated it for the caller to free, once.
            unsafe { sys::rados_buffer_free(p) };
            v
        };
        let out = take(out, out_len);
        let status = String::from_utf8_lossy(&take(outs, outs_len)).into_owned();
        if r < 0 {
            return Err(Error::new(format!("mon command {cmd_json}: {status}"), -r));
        }
        Ok((out, status))
    }

    /// Registers this client as a daemon of `service` in the service map
    /// (what `ceph -s` lists under services). Needs a mgr to show up; with
    /// none, librados keeps the registration and sends it when one comes.
    pub fn service_register(
        &self,
        service: &str,
        daemon: &str,
        metadata: &[(&str, &str)],
    ) -> Result<()> {
        let s = cstr(service, "service")?;
        let d = cstr(daemon, "daemon")?;
        let m = encode_dict(metadata)?;
        // SAFETY: connected handle; strings NUL-terminated; the dict ends
        // with an empty key.
        let r = unsafe {
            sys::rados_service_register(self.raw(), s.as_ptr(), d.as_ptr(), m.as_ptr().cast())
        };
        check(r, || format!("registering service {service}/{daemon}"))?;
        Ok(())
    }

    /// Updates this daemon's status in the service map.
    pub fn service_update_status(&self, status: &[(&str, &str)]) -> Result<()> {
        let m = encode_dict(status)?;
        // SAFETY: connected handle; dict encoded as above.
        let r = unsafe { sys::rados_service_update_status(self.raw(), m.as_ptr().cast()) };
        check(r, || "updating service status".into())?;
        Ok(())
    }

    /// An I/O context for `pool`.
    pub fn ioctx(&self, pool: &str) -> Result<IoCtx> {
        let p = cstr(pool, "pool")?;
        let mut io: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle, valid out-pointer.
        let r = unsafe { sys::rados_ioctx_create(self.raw(), p.as_ptr(), &mut io) };
        check(r, || format!("opening pool {pool}"))?;
        Ok(IoCtx {
            io,
            rados: self.clone(),
            pool: pool.to_string(),
            namespace: String::new(),
        })
    }
}

/// A non-owning reference to a [`Rados`] (for connection caches).
#[derive(Clone, Default)]
pub struct WeakRados {
    inner: std::sync::Weak<Inner>,
}

impl WeakRados {
    /// The connection, if something still holds it open.
    pub fn upgrade(&self) -> Option<Rados> {
        self.inner.upgrade().map(|inner| Rados { inner })
    }
}

/// A pool (and namespace) to open images in; destroyed on drop.
pub struct IoCtx {
    io: sys::rados_ioctx_t,
    rados: Rados,
    pool: String,
    namespace: String,
}

// SAFETY: I/O contexts are thread-safe for the reads librbd makes of
// them; the one mutation (set_namespace) takes &mut self.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; images opened from it
        // hold their own duplicate, so nothing uses it after this.
        unsafe { sys::rados_ioctx_destroy(self.io) }
    }
}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCtx")
            .field("pool", &self.pool)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl IoCtx {
    pub(crate) fn raw(&self) -> sys::rados_ioctx_t {
        self.io
    }

    /// The cluster handle this context belongs to.
    pub fn rados(&self) -> &Rados {
        &self.rados
    }

    /// The pool name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The namespace ("" for the default one).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Switches to RADOS namespace `ns` ("" for the default).
    pub fn set_namespace(&mut self, ns: &str) -> Result<()> {
        let n = cstr(ns, "namespace")?;
        // SAFETY: live context; &mut self excludes concurrent use.
        unsafe { sys::rados_ioctx_set_namespace(self.io, n.as_ptr()) };
        self.namespace = ns.to_string();
        Ok(())
    }

    /// Whether the rbd namespace `ns` exists in this pool.
    pub fn rbd_namespace_exists(&self, ns: &str) -> Result<bool> {
        let n = cstr(ns, "namespace")?;
        let mut exists = false;
        // SAFETY: live context, valid out-pointer.
        let r = unsafe { sys::rbd_namespace_exists(self.io, n.as_ptr(), &mut exists) };
        check(r, || format!("checking namespace {}/{ns}", self.pool))?;
        Ok(exists)
    }

    /// Creates an image of `size` bytes with the cluster's default format
    /// and features.
    pub fn create_image(&self, name: &str, size: u64) -> Result<()> {
        let n = cstr(name, "image name")?;
        let mut order: libc::c_int = 0;
        // SAFETY: live context, valid out-pointer.
        let r = unsafe { sys::rbd_create(self.io, n.as_ptr(), size, &mut order) };
        check(r, || format!("creating image {}/{name}", self.pool))?;
        Ok(())
    }

    /// Removes an image.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let n = cstr(name, "image name")?;
        // SAFETY: live context.
        let r = unsafe { sys::rbd_remove(self.io, n.as_ptr()) };
        check(r, || format!("removing image {}/{name}", self.pool))?;
        Ok(())
    }
}
