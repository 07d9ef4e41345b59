//! The rbd backend: a LUN served from a Ceph RBD image through librbd's
//! asynchronous API.
//!
//! - READ/WRITE go to `rbd_aio_readv`/`rbd_aio_writev` on the command's
//!   data-area iovecs (no copy); the completion closure only hands the
//!   result to the ring worker's queue. Adjacent commands taken off the
//!   ring together arrive as one operation ([`MERGE_LIMIT`]).
//! - Discard and WriteZeroes{unmap: true} go to `rbd_aio_discard` (with
//!   `rbd_skip_partial_discard=false` every discarded byte reads back as
//!   zero), WriteZeroes without unmap to a thick `rbd_aio_write_zeroes`
//!   (the range stays allocated), WriteSame to `rbd_aio_writesame`.
//! - CompareAndWrite goes to librbd's atomic `rbd_aio_compare_and_write`
//!   when the range lies inside one 512-byte sector (librbd refuses more);
//!   larger ranges run on a per-device thread as read, compare, write,
//!   serialised against each other (as tcmu-runner's emulation is).
//! - Flush and Write{fua} add `rbd_aio_flush`; the flush is issued right
//!   after the write, and librbd completes a flush only after the writes
//!   issued before it, so no callback has to submit anything.
//! - Provisioning (GET LBA STATUS) runs `rbd_diff_iterate2`, which is
//!   synchronous, on one daemon-wide thread ([`extents`]).
//! - A blocklisted client (ESHUTDOWN) fails the commands that saw it with
//!   [`IoError::Fenced`] and makes the backend reopen its image on a
//!   fresh rados client in the background, instead of failing forever.
//!
//! Errors map to [`IoError`] as follows (the SCSI layer turns them into
//! sense data):
//!
//! | librbd errno | IoError |
//! |---|---|
//! | EILSEQ (compare-and-write) | `Miscompare { offset }` |
//! | ETIMEDOUT (osd_op_timeout expired) | `Timeout` |
//! | ESHUTDOWN (client blocklisted) | `Fenced` (and the image is reopened) |
//! | EROFS (another client holds the exclusive lock) | `Fenced` |
//! | ENOSPC, EDQUOT | `NoSpace` |
//! | EOPNOTSUPP | `Unsupported` |
//! | anything else | `Io { errno }` |

pub mod config;
pub mod conn;
pub mod extents;
pub mod handoff;
pub mod lock;
pub mod service;
pub mod slack;

use crate::{Backend, Caps, Done, ExtentSlot, Geometry, IoBufs, IoError, IoResult, Op};
use config::RbdConfig;
use conn::ConnKey;
use rbd_ffi::{AioBuf, CawError, Image, OwnedBuf, Rados};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tracing::{debug, error, info, warn};

pub use config::{parse, CONFIG_DESC};

/// How much the ring worker may gather into one librbd read or write
/// from adjacent commands that arrive together ([`Backend::merge_limit`]):
/// one rbd object at the default object size. (The worker also keeps a
/// merged operation within 1,024 iovecs, `IOV_MAX`.)
pub const MERGE_LIMIT: usize = 4 << 20;

/// The ring's data buffers handed to librbd.
struct RingBufs(IoBufs);

// SAFETY: an IoBufs' segments stay valid and exclusively the command's for
// as long as the IoBufs lives (the invariant of `IoBufs::from_raw`, upheld by
// the ring layer and its keep-alive); the value is moved into the pending
// operation and dropped only after librbd's completion.
unsafe impl AioBuf for RingBufs {
    fn iovecs(&self) -> &[libc::iovec] {
        self.0.iovecs()
    }
}

/// A contiguous copy when the buffers have several segments (pattern and
/// compare-and-write buffers: librbd takes one pointer for those).
enum Contig {
    Ring(RingBufs),
    Owned(OwnedBuf),
}

// SAFETY: delegates to the two implementations above.
unsafe impl AioBuf for Contig {
    fn iovecs(&self) -> &[libc::iovec] {
        match self {
            Contig::Ring(r) => r.iovecs(),
            Contig::Owned(o) => o.iovecs(),
        }
    }
}

fn contiguous(b: IoBufs) -> Contig {
    if b.iovecs().len() == 1 {
        Contig::Ring(RingBufs(b))
    } else {
        Contig::Owned(OwnedBuf::new(b.to_vec()))
    }
}

/// An open image on one connection.
struct Session {
    /// Counts reopens; completions report which session they ran on.
    generation: u64,
    /// This client's watch for handoff requests (see [`handoff`]), made
    /// when first needed.
    bus: Mutex<Option<Arc<handoff::Bus>>>,
    /// Making the bus failed once on this session (logged once).
    bus_failed: AtomicBool,
    // Field order: the image closes before the connection is released.
    image: Image,
    rados: Rados,
}

/// State shared with librbd callbacks: plain atomics and the image's
/// name, so a callback never holds (and never drops) an image or a
/// connection.
#[derive(Default)]
struct Signals {
    /// The image (`rbd:pool/image`), for error messages: one reference
    /// per command serves both this and the atomics.
    name: Arc<str>,
    /// Generation of the session that saw ESHUTDOWN (0: none).
    fenced: AtomicU64,
    /// Header updates seen by the watch (resize, lock changes).
    header_updates: AtomicU64,
    /// Operations in flight in librbd.
    inflight: AtomicUsize,
    /// What the image's service-map entry reports (ceph-iscsi's counters).
    status: Arc<service::ImageStatus>,
}

struct Shared {
    cfg: RbdConfig,
    /// The image's id (what handoff requests name).
    image_id: String,
    /// Asked to hand the lock over to another gateway: true if it will
    /// (set by the failover manager; None: never).
    handoff: Mutex<Option<HandoffFn>>,
    key: ConnKey,
    timeout: Duration,
    geometry: Mutex<Geometry>,
    session: RwLock<Arc<Session>>,
    signals: Arc<Signals>,
    reopening: AtomicBool,
    reopens: AtomicU64,
    caw: Mutex<Option<mpsc::Sender<Box<CawJob>>>>,
    /// Set when the backend is dropped: a reopen under way gives up.
    closing: AtomicBool,
    /// Reopen threads not known to have finished, joined on drop: a
    /// process must not exit
    /// while a thread is inside librados (the C++ static destructors
    /// then run under it; a daemon stopped mid-reopen died with
    /// std::out_of_range after logging "stopped").
    reopen_threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct CawJob {
    /// The session the job was admitted on: it runs there or nowhere.
    session: Arc<Session>,
    offset: u64,
    compare: IoBufs,
    write: IoBufs,
    done: Done,
}

/// Answers a request to hand the image's lock over: true if the lock is
/// being released (see [`handoff`]).
pub type HandoffFn = Arc<dyn Fn() -> bool + Send + Sync>;

impl handoff::Holder for Shared {
    fn on_client(&self, rados: &Rados) -> bool {
        self.session
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rados
            .same(rados)
    }

    fn hand_over(&self) -> bool {
        let f = self
            .handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        f.is_some_and(|f| f())
    }
}

/// A LUN backed by an RBD image.
pub struct RbdBackend {
    shared: Arc<Shared>,
    name: Arc<str>,
    /// The image's exclusive-lock feature, as read at open.
    exclusive_lock: Result<bool, String>,
    /// The image's `tcmu-runner` service-map entry (None: turned off).
    _service: Option<service::Registration>,
    /// Held when the image has a librbd QoS limit (see `slack`).
    _qos: Option<slack::QosImage>,
}

impl std::fmt::Debug for RbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdBackend")
            .field("name", &self.name)
            .finish()
    }
}

/// Maps a librbd error to the backend's error type (see the module table).
pub fn map_errno(errno: i32, what: impl Into<String>) -> IoError {
    match errno {
        libc::EROFS => IoError::Fenced(format!(
            "{}: another client holds the image's exclusive lock",
            what.into()
        )),
        libc::ESHUTDOWN => IoError::Fenced(format!("{}: this client is blocklisted", what.into())),
        _ => IoError::errno(errno, what),
    }
}

/// Opens the connection, pool, namespace and image of `cfg`; each failure
/// names its cause.
fn open_session(
    cfg: &RbdConfig,
    key: &ConnKey,
    timeout: Duration,
    stale: Option<&Rados>,
    generation: u64,
) -> Result<Session, String> {
    let rados = conn::get(key, timeout, stale)?;
    let mut io = rados.ioctx(&cfg.pool).map_err(|e| match e.errno {
        libc::ENOENT => format!("rbd: pool {:?} does not exist", cfg.pool),
        libc::EACCES | libc::EPERM => format!(
            "rbd: client.{} may not use pool {:?}: {e}",
            key.id, cfg.pool
        ),
        _ => format!("rbd: cannot open pool {:?}: {e}", cfg.pool),
    })?;
    if let Some(ns) = &cfg.namespace {
        match io.rbd_namespace_exists(ns) {
            Ok(true) => {}
            Ok(false) => {
                return Err(format!(
                    "rbd: namespace {ns:?} does not exist in pool {:?}",
                    cfg.pool
                ))
            }
            Err(e) => return Err(format!("rbd: cannot look up namespace {ns:?}: {e}")),
        }
        io.set_namespace(ns)
            .map_err(|e| format!("rbd: namespace {ns:?}: {e}"))?;
    }
    let image = Image::open(&io, &cfg.image).map_err(|e| match e.errno {
        libc::ENOENT => format!(
            "rbd: image {:?} does not exist in pool {:?}{}",
            cfg.image,
            cfg.pool,
            cfg.namespace
                .as_ref()
                .map_or(String::new(), |n| format!(" namespace {n:?}"))
        ),
        libc::EACCES | libc::EPERM => format!(
            "rbd: client.{} may not open image {}: {e}",
            key.id,
            cfg.image_spec()
        ),
        _ => format!("rbd: cannot open image {}: {e}", cfg.image_spec()),
    })?;
    Ok(Session {
        generation,
        bus: Mutex::new(None),
        bus_failed: AtomicBool::new(false),
        image,
        rados,
    })
}

fn key_of(cfg: &RbdConfig) -> ConnKey {
    ConnKey {
        conf: cfg.conf.clone(),
        id: cfg.id.clone().unwrap_or_else(|| "admin".into()),
    }
}

/// Checks a config string as far as possible without a device: syntax,
/// cluster access, pool, namespace and image (for targetcli's CheckConfig).
pub fn check_config(cfgstring: &str) -> Result<(), String> {
    let cfg = config::parse(cfgstring)?;
    let key = key_of(&cfg);
    let timeout = cfg.osd_op_timeout.unwrap_or(conn::DEFAULT_OP_TIMEOUT);
    open_session(&cfg, &key, timeout, None, 0).map(|_| ())
}

impl RbdBackend {
    /// Opens the image `cfgstring` names for a LUN of `size` bytes in
    /// blocks of `block_size`. The image must be exactly `size` bytes.
    pub fn open(cfgstring: &str, size: u64, block_size: u32) -> Result<RbdBackend, String> {
        // New service-map clients wait while images open (see `service`).
        let _opening = service::opening();
        let cfg = config::parse(cfgstring)?;
        let key = key_of(&cfg);
        let timeout = cfg.osd_op_timeout.unwrap_or(conn::DEFAULT_OP_TIMEOUT);
        let session = open_session(&cfg, &key, timeout, None, 1)?;
        let spec = cfg.image_spec();
        let image_size = session
            .image
            .size()
            .map_err(|e| format!("rbd: cannot read the size of {spec}: {e}"))?;
        if image_size != size {
            return Err(format!(
                "rbd: image {spec} is {image_size} bytes but the device is {size} bytes; \
                 resize one to match"
            ));
        }
        let exclusive_lock = session
            .image
            .has_exclusive_lock_feature()
            .map_err(|e| format!("rbd: cannot read the features of {spec}: {e}"));
        if exclusive_lock == Ok(false) {
            warn!(image = %spec, "the image has no exclusive-lock feature: no lock gating, no failover (never export it from two gateways)");
        }
        let name: Arc<str> = format!("rbd:{spec}").into();
        let signals = Arc::new(Signals {
            name: Arc::clone(&name),
            ..Signals::default()
        });
        let service = service::register(
            service::Entry {
                key: key.clone(),
                spec: spec.clone(),
                pool: cfg.pool.clone(),
                image: cfg.image.clone(),
                image_id: session.image.id().unwrap_or_default(),
            },
            Arc::clone(&signals.status),
        );
        watch(&session, &signals, &spec);
        // An unreadable configuration counts as limited: the timer slack
        // must never pace a limited image below its limit.
        let qos = match session.image.config_list() {
            Ok(opts) => slack::has_qos_limit(&opts),
            Err(e) => {
                debug!(image = %spec, "librbd configuration unreadable ({e}); assuming a QoS limit");
                true
            }
        };
        let qos = qos.then(slack::QosImage::hold);
        // librados' timer and messenger threads this open started.
        slack::settle();
        info!(image = %spec, client = %session.rados.name(), size, block_size, qos_limit = qos.is_some(), "rbd image opened");
        let image_id = session.image.id().unwrap_or_default();
        let shared = Arc::new(Shared {
            cfg,
            image_id,
            handoff: Mutex::new(None),
            key,
            timeout,
            geometry: Mutex::new(Geometry { size, block_size }),
            session: RwLock::new(Arc::new(session)),
            signals,
            reopening: AtomicBool::new(false),
            reopens: AtomicU64::new(0),
            caw: Mutex::new(None),
            closing: AtomicBool::new(false),
            reopen_threads: Mutex::new(Vec::new()),
        });
        Ok(RbdBackend {
            name,
            shared,
            exclusive_lock,
            _service: service,
            _qos: qos,
        })
    }

    /// Whether the image has the exclusive-lock feature (what HA gating
    /// needs).
    pub fn has_exclusive_lock(&self) -> Result<bool, String> {
        self.exclusive_lock.clone()
    }

    /// What the image's service-map entry reports; the failover manager
    /// sets the lock fields.
    pub fn service_status(&self) -> &Arc<service::ImageStatus> {
        &self.shared.signals.status
    }

    /// How many times the image was reopened after blocklisting.
    pub fn reopens(&self) -> u64 {
        self.shared.reopens.load(Ordering::SeqCst)
    }

    /// Operations in flight in librbd now.
    pub fn ops_in_flight(&self) -> usize {
        self.shared.signals.inflight.load(Ordering::SeqCst)
    }

    /// Header updates (resize, lock changes) seen since open.
    pub fn header_updates(&self) -> u64 {
        self.shared.signals.header_updates.load(Ordering::SeqCst)
    }

    /// The client currently serving the image (`client.admin`) and its
    /// instance id.
    pub fn client(&self) -> (String, u64) {
        let s = self.session();
        (s.rados.name().to_string(), s.rados.instance_id())
    }

    /// The op timeout of the client serving the image, as librados has it
    /// (`rados_osd_op_timeout`).
    pub fn op_timeout(&self) -> Result<Duration, String> {
        let v = self
            .session()
            .rados
            .conf_get("rados_osd_op_timeout")
            .map_err(|e| e.to_string())?;
        v.trim()
            .parse::<f64>()
            .map(Duration::from_secs_f64)
            .map_err(|e| format!("rados_osd_op_timeout {v:?}: {e}"))
    }

    /// The addresses of the client serving the image (what `osd blocklist
    /// add` takes).
    pub fn client_addrs(&self) -> Result<String, String> {
        self.session().rados.addrs().map_err(|e| e.to_string())
    }

    /// Makes this image answer another gateway's request to hand its lock
    /// over with `f` (None: decline, so the other gateway fences this
    /// one). Starts watching for requests on the serving client.
    pub fn set_handoff(&self, f: Option<HandoffFn>) {
        let on = f.is_some();
        *self
            .shared
            .handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = f;
        if on && !self.shared.image_id.is_empty() {
            let weak: Weak<dyn handoff::Holder> =
                Arc::downgrade(&self.shared) as Weak<dyn handoff::Holder>;
            handoff::register(&self.shared.image_id, weak);
            self.handoff_ready();
        }
    }

    /// Keeps this gateway reachable for handoff requests: watches on the
    /// serving client (a reopen brings a new one) and renews a lost watch.
    /// Cheap when nothing changed; the failover manager calls it at each
    /// lock check.
    pub fn handoff_ready(&self) {
        handoff_ready(&self.shared);
    }

    /// The cluster this image is in, as its ceph.conf names it (empty:
    /// librados' default search).
    pub fn cluster(&self) -> String {
        self.shared
            .key
            .conf
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    fn session(&self) -> Arc<Session> {
        Arc::clone(
            &self
                .shared
                .session
                .read()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Completion for one librbd call: maps the result, notes fencing.
    fn finisher(
        &self,
        gen: u64,
        what: &'static str,
    ) -> impl Fn(Result<(), rbd_ffi::Error>) -> IoResult + Send + 'static {
        let signals = Arc::clone(&self.shared.signals);
        move |r| match r {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.errno == libc::ESHUTDOWN {
                    signals.fenced.store(gen, Ordering::SeqCst);
                }
                if e.errno == libc::ETIMEDOUT {
                    signals.status.cmd_timed_out();
                }
                Err(map_errno(e.errno, format!("{}: {what}: {e}", signals.name)))
            }
        }
    }
}

/// Counts a header update; runs on librbd's notification thread.
fn watch(s: &Session, signals: &Arc<Signals>, spec: &str) {
    let sig = Arc::clone(signals);
    if let Err(e) = s.image.update_watch(move || {
        sig.header_updates.fetch_add(1, Ordering::SeqCst);
    }) {
        warn!(image = %spec, "no update watch (resize notifications): {e}");
    }
}

/// Collects the results of several librbd calls that make up one
/// operation and completes it once, with the first error.
struct Join {
    left: AtomicUsize,
    first_err: Mutex<Option<IoError>>,
    done: Mutex<Option<Done>>,
}

impl Join {
    fn new(parts: usize, done: Done) -> Arc<Join> {
        Arc::new(Join {
            left: AtomicUsize::new(parts),
            first_err: Mutex::new(None),
            done: Mutex::new(Some(done)),
        })
    }

    fn part(&self, r: IoResult) {
        if let Err(e) = r {
            let mut f = self.first_err.lock().unwrap_or_else(|e| e.into_inner());
            if f.is_none() {
                *f = Some(e);
            }
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let err = self
                .first_err
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(d) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                d.complete(err.map_or(Ok(()), Err));
            }
        }
    }
}

/// Decrements the in-flight count when the operation's closure is done.
struct InflightGuard(Arc<Signals>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RbdBackend {
    fn inflight(&self) -> InflightGuard {
        self.shared.signals.inflight.fetch_add(1, Ordering::SeqCst);
        InflightGuard(Arc::clone(&self.shared.signals))
    }

    /// Starts a background reopen on a fresh client (once at a time).
    fn start_reopen(&self) {
        if self.shared.reopening.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shared.signals.status.conn_lost();
        let weak = Arc::downgrade(&self.shared);
        let name = self.name.to_string();
        let spawned = std::thread::Builder::new()
            .name("rbd-reopen".into())
            .spawn(move || reopen(weak, name));
        match spawned {
            Ok(h) => {
                let mut ts = self
                    .shared
                    .reopen_threads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                ts.retain(|t| !t.is_finished());
                ts.push(h);
            }
            Err(e) => {
                error!(image = %self.name, "cannot start the reopen thread: {e}");
                self.shared.reopening.store(false, Ordering::SeqCst);
            }
        }
    }

    fn submit_caw(
        &self,
        s: &Arc<Session>,
        offset: u64,
        compare: IoBufs,
        write: IoBufs,
        done: Done,
    ) {
        let len = compare.len() as u64;
        if len != write.len() as u64 {
            done.complete(Err(IoError::Io {
                errno: libc::EINVAL,
                msg: format!("{}: compare and write buffers differ in length", self.name),
            }));
            return;
        }
        if len == 0 {
            done.complete(Ok(()));
            return;
        }
        // librbd's native compare-and-write covers one 512-byte sector.
        if len <= 512 && offset / 512 == (offset + len - 1) / 512 {
            let c = self.call(s, "compare and write");
            s.image.aio_compare_and_write(
                offset,
                contiguous(compare),
                contiguous(write),
                move |r, _bufs| {
                    let res = match r {
                        Ok(()) => c(Ok(())),
                        Err(CawError::Miscompare { offset }) => {
                            // (Counted out of flight; a miscompare is no
                            // librbd error.)
                            let _ = c(Ok(()));
                            Err(IoError::Miscompare { offset })
                        }
                        Err(CawError::Other(e)) => c(Err(e)),
                    };
                    done.complete(res);
                },
            );
            return;
        }
        let tx = {
            let mut caw = self.shared.caw.lock().unwrap_or_else(|e| e.into_inner());
            if caw.is_none() {
                let (tx, rx) = mpsc::channel::<Box<CawJob>>();
                let weak = Arc::downgrade(&self.shared);
                let name = self.name.to_string();
                match std::thread::Builder::new()
                    .name("rbd-caw".into())
                    .spawn(move || caw_thread(weak, name, rx))
                {
                    Ok(_) => *caw = Some(tx),
                    Err(e) => {
                        done.complete(Err(IoError::Io {
                            errno: libc::EAGAIN,
                            msg: format!(
                                "{}: cannot start the compare-and-write thread: {e}",
                                self.name
                            ),
                        }));
                        return;
                    }
                }
            }
            caw.clone()
        };
        let job = CawJob {
            session: Arc::clone(s),
            offset,
            compare,
            write,
            done,
        };
        let sent = match tx {
            Some(t) => t.send(Box::new(job)).map_err(|mpsc::SendError(j)| j),
            None => Err(Box::new(job)),
        };
        if let Err(job) = sent {
            job.done.complete(Err(IoError::Io {
                errno: libc::EIO,
                msg: format!("{}: the compare-and-write thread is gone", self.name),
            }));
        }
    }
}

/// Emulated compare-and-write for ranges librbd cannot do natively:
/// synchronous read, compare, write, one at a time.
fn caw_thread(shared: Weak<Shared>, name: String, rx: mpsc::Receiver<Box<CawJob>>) {
    while let Ok(job) = rx.recv() {
        let Some(sh) = shared.upgrade() else {
            job.done.complete(Err(IoError::Io {
                errno: libc::ENODEV,
                msg: format!("{name}: device closed"),
            }));
            continue;
        };
        let fenced = sh.signals.fenced.load(Ordering::SeqCst);
        drop(sh);
        let s = Arc::clone(&job.session);
        if fenced != 0 && fenced == s.generation {
            job.done.complete(Err(IoError::Fenced(format!(
                "{name}: client blocklisted, reopening the image"
            ))));
            continue;
        }
        let map =
            |e: rbd_ffi::Error, what: &str| map_errno(e.errno, format!("{name}: {what}: {e}"));
        let res = crate::compare_then_write(
            |buf| {
                s.image
                    .read_at(job.offset, buf)
                    .map_err(|e| map(e, "compare and write (read)"))
                    .and_then(|n| {
                        if n == buf.len() {
                            Ok(())
                        } else {
                            Err(IoError::OutOfRange)
                        }
                    })
            },
            |w| {
                s.image
                    .write_at(job.offset, &w.to_vec())
                    .map(|_| ())
                    .map_err(|e| map(e, "compare and write (write)"))
            },
            &job.compare,
            &job.write,
        );
        job.done.complete(res);
    }
}

/// Watches for handoff requests on the serving session's client (if the
/// image answers them) and renews a lost watch.
fn handoff_ready(sh: &Shared) {
    let on = sh
        .handoff
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some();
    if on {
        let s = Arc::clone(&sh.session.read().unwrap_or_else(|e| e.into_inner()));
        if let Some(b) = bus_of(sh, &s) {
            b.rearm();
        }
    }
}

/// Session `s`'s handoff bus, made on first use (None if it cannot be:
/// then takeovers fence, as without handoff; logged once per session).
fn bus_of(sh: &Shared, s: &Session) -> Option<Arc<handoff::Bus>> {
    let mut g = s.bus.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = g.as_ref() {
        return Some(Arc::clone(b));
    }
    match handoff::bus(&s.rados, &sh.cfg.pool, sh.cfg.namespace.as_deref()) {
        Ok(b) => {
            *g = Some(Arc::clone(&b));
            Some(b)
        }
        Err(e) => {
            if !s.bus_failed.swap(true, Ordering::SeqCst) {
                warn!(image = %sh.signals.name, "no lock handoff on this client (takeovers fence instead): {e}");
            }
            None
        }
    }
}

/// Reopens the image on a fresh connection after this client was
/// blocklisted; retries until it works or the backend is gone.
fn reopen(shared: Weak<Shared>, name: String) {
    let mut delay = Duration::from_millis(200);
    loop {
        let Some(sh) = shared.upgrade() else { return };
        if sh.closing.load(Ordering::SeqCst) {
            return;
        }
        let old = Arc::clone(&sh.session.read().unwrap_or_else(|e| e.into_inner()));
        let gen = old.generation + 1;
        warn!(image = %name, client = %old.rados.name(), "client blocklisted; reopening the image on a fresh client");
        match open_session(&sh.cfg, &sh.key, sh.timeout, Some(&old.rados), gen) {
            Ok(s) => {
                let size = s.image.size().unwrap_or(0);
                let want = sh.geometry.lock().map(|g| g.size).unwrap_or(0);
                if size != want {
                    warn!(image = %name, size, want, "reopened image has another size; serving the device size");
                }
                watch(&s, &sh.signals, &name);
                info!(image = %name, instance = s.rados.instance_id(), generation = gen, "image reopened");
                *sh.session.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
                sh.signals.fenced.store(0, Ordering::SeqCst);
                sh.reopens.fetch_add(1, Ordering::SeqCst);
                sh.reopening.store(false, Ordering::SeqCst);
                // The fresh client answers handoff requests from now on
                // (the next lock check would too, later).
                handoff_ready(&sh);
                drop(sh);
                // The fresh client's timer and messenger threads.
                slack::settle();
                // Close the fenced image here, not on the ring worker: wait
                // for the worker's short-lived clones to go.
                let mut old = old;
                for _ in 0..500 {
                    match Arc::try_unwrap(old) {
                        Ok(s) => {
                            drop(s);
                            return;
                        }
                        Err(o) => {
                            old = o;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                return;
            }
            Err(e) => {
                drop(old);
                drop(sh);
                error!(image = %name, "reopen failed, retrying in {delay:?}: {e}");
                let t0 = std::time::Instant::now();
                while t0.elapsed() < delay {
                    match shared.upgrade() {
                        Some(sh) if !sh.closing.load(Ordering::SeqCst) => {}
                        _ => return,
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Backend for RbdBackend {
    fn name(&self) -> String {
        self.name.to_string()
    }

    fn geometry(&self) -> Geometry {
        *self
            .shared
            .geometry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn caps(&self) -> Caps {
        Caps {
            discard: true,
            discard_zeroes: true,
            write_cache: false,
            lba_status: true,
        }
    }

    fn merge_limit(&self) -> usize {
        self.shared
            .cfg
            .merge_kb
            .map_or(MERGE_LIMIT, |kb| kb as usize * 1024)
    }

    fn submit(&self, op: Op, done: Done) {
        self.submit_session(self.session(), op, done)
    }

    fn resize(&self, size: u64) -> Result<(), IoError> {
        let s = self.session();
        let image_size = s
            .image
            .size()
            .map_err(|e| map_errno(e.errno, format!("{}: size: {e}", self.name)))?;
        if image_size < size {
            // The LUN grew first: grow the image to match.
            s.image
                .resize(size)
                .map_err(|e| map_errno(e.errno, format!("{}: resize to {size}: {e}", self.name)))?;
        } else if image_size > size {
            // Never shrink data away from under the initiator.
            return Err(IoError::OutOfRange);
        }
        self.shared
            .geometry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .size = size;
        info!(image = %self.name, size, "resized");
        Ok(())
    }
}

impl RbdBackend {
    /// Submits `op` only if the session serving I/O is `generation` (the
    /// one the HA gate admitted it for: the session that took the lock).
    /// The session is read once and the op runs on exactly that session,
    /// so a reopen cannot slip in between the check and the submission.
    pub fn submit_on(&self, generation: u64, op: Op, done: Done) {
        let s = self.session();
        if s.generation != generation {
            done.complete(Err(IoError::Fenced(format!(
                "{}: the session that holds the lock (generation {generation}) was replaced by generation {}",
                self.name, s.generation
            ))));
            return;
        }
        self.submit_session(s, op, done)
    }

    fn submit_session(&self, s: Arc<Session>, op: Op, done: Done) {
        let fenced = self.shared.signals.fenced.load(Ordering::SeqCst);
        if fenced != 0 && fenced == s.generation {
            // The session is known blocklisted: fail fast (the initiator
            // retries) and make sure a reopen is under way.
            self.start_reopen();
            done.complete(Err(IoError::Fenced(format!(
                "{}: client blocklisted, reopening the image",
                self.name
            ))));
            return;
        }
        match op {
            Op::Read { offset, bufs } => self.read(&s, offset, bufs, done),
            Op::Write { offset, bufs, fua } => self.write(&s, offset, bufs, fua, done),
            Op::Flush => self.flush(&s, done),
            Op::Discard { ranges } => self.discard(&s, ranges, done),
            Op::WriteZeroes { offset, len, unmap } => {
                self.write_zeroes(&s, offset, len, unmap, done)
            }
            Op::WriteSame {
                offset,
                len,
                pattern,
            } => self.write_same(&s, offset, len, pattern, done),
            Op::CompareAndWrite {
                offset,
                compare,
                write,
            } => self.submit_caw(&s, offset, compare, write, done),
            Op::Provisioning { offset, len, out } => self.provisioning(&s, offset, len, out, done),
        }
    }

    /// The allocated ranges of `[offset, offset + len)`, found on the
    /// extents thread (see [`extents`] for the granularity and why).
    fn provisioning(&self, s: &Arc<Session>, offset: u64, len: u64, out: ExtentSlot, done: Done) {
        if len == 0 {
            return done.complete(extents::store(&out, Vec::new()));
        }
        let c = self.call(s, "allocation query");
        let s = Arc::clone(s);
        let run = move || {
            let found = s.image.parent_overlap().and_then(|overlap| {
                let mut found = Vec::new();
                s.image
                    .allocated_extents(offset, len, true, |o, l| found.push((o, l)))?;
                Ok(extents::merge(offset, len, overlap, &found))
            });
            match found {
                Ok(ranges) => c(Ok(())).and_then(|()| extents::store(&out, ranges)),
                Err(e) => c(Err(e)),
            }
        };
        extents::submit(Box::new(run), done);
    }

    /// The completion of one librbd call on session `s`: the call counts
    /// as in flight until librbd calls back; the result is mapped to an
    /// [`IoResult`] (noting a blocklisting or a timeout on the way).
    fn call(
        &self,
        s: &Session,
        what: &'static str,
    ) -> impl FnOnce(Result<(), rbd_ffi::Error>) -> IoResult + Send + 'static {
        let fin = self.finisher(s.generation, what);
        let g = self.inflight();
        move |r| {
            drop(g);
            fin(r)
        }
    }

    fn read(&self, s: &Session, offset: u64, bufs: IoBufs, done: Done) {
        if bufs.is_empty() {
            return done.complete(Ok(()));
        }
        let want = bufs.len();
        let c = self.call(s, "read");
        s.image.aio_readv(offset, RingBufs(bufs), move |r, _| {
            let got = r.as_ref().ok().copied();
            let res = c(r.map(|_| ())).and_then(|()| match got {
                Some(n) if n != want => Err(IoError::Io {
                    errno: libc::EIO,
                    msg: format!("short read: {n} of {want} bytes"),
                }),
                _ => Ok(()),
            });
            done.complete(res);
        });
    }

    fn write(&self, s: &Session, offset: u64, bufs: IoBufs, fua: bool, done: Done) {
        if bufs.is_empty() {
            return done.complete(Ok(()));
        }
        let c = self.call(s, "write");
        if !fua {
            s.image.aio_writev(offset, RingBufs(bufs), move |r, _| {
                done.complete(c(r.map(|_| ())));
            });
            return;
        }
        // FUA: the flush right behind the write (librbd completes it only
        // after the writes issued before it); the command ends with both.
        let j = Join::new(2, done);
        let j2 = Arc::clone(&j);
        s.image.aio_writev(offset, RingBufs(bufs), move |r, _| {
            j2.part(c(r.map(|_| ())));
        });
        let c = self.call(s, "flush (FUA)");
        s.image.aio_flush(move |r| j.part(c(r)));
    }

    fn flush(&self, s: &Session, done: Done) {
        let c = self.call(s, "flush");
        s.image.aio_flush(move |r| done.complete(c(r)));
    }

    fn discard(&self, s: &Session, ranges: Vec<(u64, u64)>, done: Done) {
        let ranges: Vec<_> = ranges.into_iter().filter(|r| r.1 > 0).collect();
        if ranges.is_empty() {
            return done.complete(Ok(()));
        }
        let j = Join::new(ranges.len(), done);
        for (off, len) in ranges {
            let j = Arc::clone(&j);
            let c = self.call(s, "discard");
            s.image.aio_discard(off, len, move |r| j.part(c(r)));
        }
    }

    fn write_zeroes(&self, s: &Session, offset: u64, len: u64, unmap: bool, done: Done) {
        if len == 0 {
            return done.complete(Ok(()));
        }
        let c = self.call(s, "write zeroes");
        let cb = move |r| done.complete(c(r));
        if unmap {
            s.image.aio_discard(offset, len, cb);
        } else {
            s.image.aio_write_zeroes(offset, len, true, cb);
        }
    }

    fn write_same(&self, s: &Session, offset: u64, len: u64, pattern: IoBufs, done: Done) {
        if len == 0 {
            return done.complete(Ok(()));
        }
        if pattern.is_empty() || !len.is_multiple_of(pattern.len() as u64) {
            return done.complete(Err(IoError::Io {
                errno: libc::EINVAL,
                msg: format!(
                    "{}: write same of {len} bytes with a {}-byte pattern",
                    self.name,
                    pattern.len()
                ),
            }));
        }
        let c = self.call(s, "write same");
        s.image
            .aio_writesame(offset, len, contiguous(pattern), move |r, _| {
                done.complete(c(r))
            });
    }
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        // Stop the compare-and-write thread; the session closes with the
        // last reference.
        self.shared
            .caw
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // A reopen under way finishes its librados calls (at most the
        // mount timeout) and closes what it opened before this returns.
        self.shared.closing.store(true, Ordering::SeqCst);
        let ts = std::mem::take(
            &mut *self
                .shared
                .reopen_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in ts {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
