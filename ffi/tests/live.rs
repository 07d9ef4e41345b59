//! The bindings against a live cluster (scripts/test-rbd.sh starts one and
//! sets TCMU_RBD_TEST_CONF). Ignored in plain `cargo test`: they need the
//! cluster, and pass only with it.

use rbd_ffi::{AioBuf, CawError, Image, IoCtx, LockMode, OwnedBuf, Rados, RadosBuilder};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NEEDS: &str = "needs the live Ceph cluster: scripts/test-rbd.sh runs it";

fn conf() -> String {
    std::env::var("TCMU_RBD_TEST_CONF")
        .expect("TCMU_RBD_TEST_CONF is not set: run scripts/test-rbd.sh (it starts the cluster)")
}

fn pool() -> String {
    std::env::var("TCMU_RBD_TEST_POOL").unwrap_or_else(|_| "rbd".into())
}

fn connect(id: Option<&str>) -> Rados {
    RadosBuilder::new(id)
        .and_then(|b| b.read_conf(Some(std::path::Path::new(&conf()))))
        .and_then(|b| b.set("rados_osd_op_timeout", "30"))
        .and_then(|b| b.set("rbd_cache", "false"))
        // Otherwise librbd ignores discards smaller than its granularity
        // (64K) and they do not read back as zeros.
        .and_then(|b| b.set("rbd_skip_partial_discard", "false"))
        .and_then(|b| b.connect())
        .expect("connect to the test cluster")
}

/// A fresh image, removed on drop.
struct TestImage {
    io: IoCtx,
    name: String,
}

impl TestImage {
    fn new(r: &Rados, tag: &str, size: u64) -> Self {
        let io = r.ioctx(&pool()).expect("pool");
        let name = format!("ffi-{tag}-{}", std::process::id());
        let _ = io.remove_image(&name);
        io.create_image(&name, size).expect("create image");
        TestImage { io, name }
    }
    fn open(&self) -> Image {
        Image::open(&self.io, &self.name).expect("open image")
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = self.io.remove_image(&self.name);
    }
}

fn wait<T>(rx: &mpsc::Receiver<T>) -> T {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("completion did not arrive within 60 s")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Two heap segments as one buffer: librbd's iovec path with more than one
/// segment.
struct TwoSegs {
    a: Box<[u8]>,
    b: Box<[u8]>,
    iov: [libc::iovec; 2],
}
// SAFETY: the iovecs point into the two boxes this value owns.
unsafe impl Send for TwoSegs {}
impl TwoSegs {
    fn new(a: Vec<u8>, b: Vec<u8>) -> Self {
        let mut a = a.into_boxed_slice();
        let mut b = b.into_boxed_slice();
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        TwoSegs { a, b, iov }
    }
}
// SAFETY: segments are the owned boxes; heap storage does not move.
unsafe impl AioBuf for TwoSegs {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn config_list_shows_an_image_override() {
    let r = connect(None);
    let t = TestImage::new(&r, "conf", 4 << 20);
    let value = |img: &Image, name: &str| {
        img.config_list()
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    };
    let img = t.open();
    assert_eq!(value(&img, "rbd_qos_iops_limit").as_deref(), Some("0"));
    img.close().unwrap();
    // The override as an admin sets it (`rbd config image set` writes
    // the same metadata key).
    let st = std::process::Command::new("rbd")
        .args(["-c", &conf(), "-p", &pool(), "image-meta", "set", &t.name])
        .args(["conf_rbd_qos_iops_limit", "250"])
        .status()
        .expect("run rbd image-meta set");
    assert!(st.success(), "rbd image-meta set: {st}");
    let img = t.open();
    assert_eq!(value(&img, "rbd_qos_iops_limit").as_deref(), Some("250"));
    img.close().unwrap();
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn metadata_and_sync_io() {
    let _ = NEEDS;
    let r = connect(None);
    assert_eq!(r.name(), "client.admin");
    assert!(r.instance_id() > 0);
    let t = TestImage::new(&r, "meta", 64 << 20);
    let img = t.open();
    assert_eq!(img.size().unwrap(), 64 << 20);
    let st = img.stat().unwrap();
    assert_eq!(st.size, 64 << 20);
    assert_eq!(st.obj_size, 1 << st.order);
    assert_eq!(st.num_objs, (64 << 20) / st.obj_size);
    assert!(!img.id().unwrap().is_empty());
    assert!(img.has_exclusive_lock_feature().unwrap());
    let data = pattern(7, 8192);
    assert_eq!(img.write_at(4096, &data).unwrap(), 8192);
    let mut back = vec![0u8; 8192];
    assert_eq!(img.read_at(4096, &mut back).unwrap(), 8192);
    assert_eq!(back, data);
    img.resize(128 << 20).unwrap();
    assert_eq!(img.size().unwrap(), 128 << 20);
    img.close().unwrap();
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn aio_data_ops() {
    let r = connect(None);
    let t = TestImage::new(&r, "aio", 32 << 20);
    let img = t.open();
    let (tx, rx) = mpsc::channel();

    // writev with two segments, readv into one.
    let a = pattern(1, 4096);
    let b = pattern(2, 8192);
    let tx2 = tx.clone();
    img.aio_writev(
        1 << 20,
        TwoSegs::new(a.clone(), b.clone()),
        move |res, _| tx2.send(res.map(|_| Vec::new())).unwrap(),
    );
    wait(&rx).expect("writev");
    let tx2 = tx.clone();
    img.aio_readv(1 << 20, OwnedBuf::zeroed(12288), move |res, buf| {
        tx2.send(res.map(|n| {
            assert_eq!(n, 12288);
            buf.into_vec()
        }))
        .unwrap()
    });
    let got = wait(&rx).expect("readv");
    assert_eq!(&got[..4096], &a[..]);
    assert_eq!(&got[4096..], &b[..]);

    // readv into two segments.
    let tx2 = tx.clone();
    img.aio_readv(
        (1 << 20) + 1000,
        TwoSegs::new(vec![0; 3000], vec![0; 5000]),
        move |res, buf| {
            tx2.send(res.map(|_| [&buf.a[..], &buf.b[..]].concat()))
                .unwrap()
        },
    );
    let got = wait(&rx).expect("readv 2 segs");
    let whole = [a.clone(), b.clone()].concat();
    assert_eq!(got, whole[1000..9000]);

    let read = |off: u64, len: usize| {
        let mut v = vec![0u8; len];
        img.read_at(off, &mut v).unwrap();
        v
    };

    // discard: reads back zeros.
    let (utx, urx) = mpsc::channel();
    let u = utx.clone();
    img.aio_discard(1 << 20, 4096, move |r| u.send(r).unwrap());
    wait(&urx).expect("discard");
    assert!(read(1 << 20, 4096).iter().all(|&x| x == 0));
    assert_eq!(read((1 << 20) + 4096, 8192), b);

    // write zeroes, thin and thick.
    for thick in [false, true] {
        img.write_at(2 << 20, &pattern(9, 65536)).unwrap();
        let u = utx.clone();
        img.aio_write_zeroes(2 << 20, 65536, thick, move |r| u.send(r).unwrap());
        wait(&urx).expect("write zeroes");
        assert!(
            read(2 << 20, 65536).iter().all(|&x| x == 0),
            "thick={thick}"
        );
    }

    // write same: a 512-byte pattern repeated.
    let pat = pattern(3, 512);
    let (wtx, wrx) = mpsc::channel();
    img.aio_writesame(
        3 << 20,
        512 * 40,
        OwnedBuf::new(pat.clone()),
        move |r, _| wtx.send(r).unwrap(),
    );
    wait(&wrx).expect("writesame");
    let got = read(3 << 20, 512 * 41);
    for k in 0..40 {
        assert_eq!(&got[k * 512..(k + 1) * 512], &pat[..], "block {k}");
    }
    assert!(got[40 * 512..].iter().all(|&x| x == 0));
    // A length not a multiple of the pattern is refused, inline.
    let (wtx, wrx) = mpsc::channel();
    img.aio_writesame(3 << 20, 700, OwnedBuf::new(pat.clone()), move |r, _| {
        wtx.send(r).unwrap()
    });
    assert_eq!(wait(&wrx).unwrap_err().errno, libc::EINVAL);

    // compare and write (librbd does it natively within one 512-byte
    // sector): match writes, miscompare reports the offset relative to the
    // range and leaves the data alone.
    let base = (5 << 20) + 1024;
    let old = pattern(4, 512);
    img.write_at(base, &old).unwrap();
    let new = pattern(5, 512);
    let (ctx, crx) = mpsc::channel();
    let c = ctx.clone();
    img.aio_compare_and_write(
        base,
        OwnedBuf::new(old.clone()),
        OwnedBuf::new(new.clone()),
        move |r, _| c.send(r).unwrap(),
    );
    wait(&crx).expect("caw match");
    assert_eq!(read(base, 512), new);
    let mut wrong = new.clone();
    wrong[123] ^= 0xff;
    let c = ctx.clone();
    img.aio_compare_and_write(
        base,
        OwnedBuf::new(wrong),
        OwnedBuf::new(old.clone()),
        move |r, _| c.send(r).unwrap(),
    );
    assert_eq!(
        wait(&crx),
        Err(CawError::Miscompare { offset: 123 }),
        "miscompare offset"
    );
    assert_eq!(read(base, 512), new, "a miscompare wrote data");
    // A part of a sector works too.
    let c = ctx.clone();
    img.aio_compare_and_write(
        base + 100,
        OwnedBuf::new(new[100..200].to_vec()),
        OwnedBuf::new(vec![0xee; 100]),
        move |r, _| c.send(r).unwrap(),
    );
    wait(&crx).expect("caw in a sector");
    assert_eq!(read(base + 100, 100), vec![0xee; 100]);
    // librbd refuses a range beyond one sector (the handler emulates
    // those): EINVAL from the completion.
    let c = ctx.clone();
    img.aio_compare_and_write(
        base,
        OwnedBuf::zeroed(1024),
        OwnedBuf::zeroed(1024),
        move |r, _| c.send(r).unwrap(),
    );
    assert!(matches!(wait(&crx), Err(CawError::Other(e)) if e.errno == libc::EINVAL));
    // Unequal lengths are refused inline.
    let c = ctx.clone();
    img.aio_compare_and_write(
        base,
        OwnedBuf::zeroed(512),
        OwnedBuf::zeroed(1024),
        move |r, _| c.send(r).unwrap(),
    );
    assert!(matches!(wait(&crx), Err(CawError::Other(e)) if e.errno == libc::EINVAL));

    // flush.
    let u = utx.clone();
    img.aio_flush(move |r| u.send(r).unwrap());
    wait(&urx).expect("flush");
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn many_in_flight_complete_exactly_once() {
    let r = connect(None);
    let t = TestImage::new(&r, "qd", 16 << 20);
    let img = t.open();
    let calls = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let n = 256;
    for i in 0..n {
        let calls = calls.clone();
        let tx = tx.clone();
        img.aio_writev(
            i as u64 * 65536,
            OwnedBuf::new(pattern(i as u8, 4096)),
            move |r, _| {
                calls.fetch_add(1, Ordering::SeqCst);
                tx.send(r.map(|_| ())).unwrap();
            },
        );
    }
    for _ in 0..n {
        wait(&rx).expect("write");
    }
    // Dropping the image with nothing in flight; then check nothing ran twice.
    drop(img);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(calls.load(Ordering::SeqCst), n);
    let img = t.open();
    for i in [0usize, 17, 255] {
        let mut v = vec![0u8; 4096];
        img.read_at(i as u64 * 65536, &mut v).unwrap();
        assert_eq!(v, pattern(i as u8, 4096), "write {i}");
    }
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn exclusive_lock_break_blocklists_the_old_owner() {
    // Two gateways: separate rados clients on one image.
    let ra = connect(None);
    let rb = connect(None);
    assert!(!ra.same(&rb));
    let t = TestImage::new(&ra, "lock", 8 << 20);
    let a = t.open();
    let b = Image::open(&rb.ioctx(&pool()).unwrap(), &t.name).unwrap();
    assert!(a.lock_owners().unwrap().owners.is_empty());

    a.lock_acquire(LockMode::Exclusive).unwrap();
    assert!(a.is_exclusive_lock_owner().unwrap());
    assert!(!b.is_exclusive_lock_owner().unwrap());
    a.write_at(0, &pattern(1, 4096)).unwrap();
    let owners = b.lock_owners().unwrap();
    assert_eq!(owners.mode, LockMode::Exclusive);
    assert_eq!(owners.owners.len(), 1, "{owners:?}");
    // The owner id is A's client address: what `osd blocklist add` takes.
    assert!(
        ra.addrs().unwrap().contains(&owners.owners[0]),
        "{owners:?} vs {}",
        ra.addrs().unwrap()
    );
    // An explicitly acquired lock is not handed over on request: B's write
    // fails rather than silently taking it.
    assert!(b.write_at(0, &pattern(2, 4096)).is_err());

    // B breaks A's lock: librbd blocklists A's client.
    b.lock_break(LockMode::Exclusive, &owners.owners[0])
        .unwrap();
    b.lock_acquire(LockMode::Exclusive).unwrap();
    assert!(b.is_exclusive_lock_owner().unwrap());
    b.write_at(0, &pattern(3, 4096)).unwrap();
    // A can never write again: ESHUTDOWN (blocklisted).
    let (tx, rx) = mpsc::channel();
    a.aio_writev(0, OwnedBuf::new(pattern(4, 4096)), move |r, _| {
        tx.send(r).unwrap()
    });
    let e = wait(&rx).expect_err("a blocklisted client wrote");
    assert_eq!(e.errno, libc::ESHUTDOWN, "{e}");
    let mut v = vec![0u8; 4096];
    b.read_at(0, &mut v).unwrap();
    assert_eq!(v, pattern(3, 4096));
    // The blocklist lists A's address.
    let (out, _) = rb
        .mon_command(r#"{"prefix": "osd blocklist ls", "format": "json"}"#, b"")
        .unwrap();
    let ls = String::from_utf8_lossy(&out);
    let a_addrs = ra.addrs().unwrap();
    let nonce = a_addrs
        .rsplit('/')
        .next()
        .unwrap()
        .trim_end_matches(']')
        .to_string();
    assert!(ls.contains(&format!("/{nonce}")), "{a_addrs} not in {ls}");
    b.lock_release().unwrap();
    assert!(!b.is_exclusive_lock_owner().unwrap());
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn explicit_blocklist_fences_a_client() {
    let ra = connect(None);
    let rb = connect(None);
    let t = TestImage::new(&ra, "bl", 8 << 20);
    let a = t.open();
    a.write_at(0, &pattern(1, 512)).unwrap();
    let addrs = ra.addrs().unwrap();
    assert!(
        addrs.contains("127.0.0.1") || addrs.contains(':'),
        "{addrs}"
    );
    // One entry of the address list (the v2 one if several).
    let one = addrs
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .next()
        .unwrap()
        .to_string();
    rb.blocklist_add(&one, 600).unwrap();
    // The OSD enforces the entry once it has the new osdmap; a write racing
    // the map may still land, so A writes until refused (within seconds).
    let t0 = std::time::Instant::now();
    let errno = loop {
        let (tx, rx) = mpsc::channel();
        a.aio_writev(0, OwnedBuf::new(pattern(2, 512)), move |r, _| {
            tx.send(r).unwrap()
        });
        match wait(&rx) {
            Err(e) => break e.errno,
            Ok(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(_) => panic!("a blocklisted client still writes after 10 s"),
        }
    };
    assert_eq!(errno, libc::ESHUTDOWN);
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn update_watch_sees_resize() {
    let r = connect(None);
    let t = TestImage::new(&r, "watch", 8 << 20);
    let a = t.open();
    let fired = Arc::new(AtomicUsize::new(0));
    let f = fired.clone();
    let h = a
        .update_watch(move || {
            f.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let r2 = connect(None);
    let b = Image::open(&r2.ioctx(&pool()).unwrap(), &t.name).unwrap();
    b.resize(16 << 20).unwrap();
    let t0 = std::time::Instant::now();
    while fired.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(fired.load(Ordering::SeqCst) > 0, "no update notification");
    assert_eq!(a.size().unwrap(), 16 << 20);
    a.update_unwatch(h).unwrap();
    assert!(a.update_unwatch(h).is_err());
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn errors_name_the_fault() {
    let r = connect(None);
    let e = r.ioctx("no-such-pool").unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert!(e.to_string().contains("no-such-pool"), "{e}");
    let io = r.ioctx(&pool()).unwrap();
    let e = Image::open(&io, "no-such-image").unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert!(e.to_string().contains("no-such-image"), "{e}");
    assert!(!io.rbd_namespace_exists("no-such-ns").unwrap());
    // A client with no key cannot connect.
    let e = RadosBuilder::new(Some("nobody"))
        .and_then(|b| b.read_conf(Some(std::path::Path::new(&conf()))))
        .and_then(|b| b.set("client_mount_timeout", "10"))
        .and_then(|b| b.connect())
        .unwrap_err();
    assert!(e.to_string().contains("client.nobody"), "{e}");
    // Service registration works without a mgr (it is kept for later).
    r.service_register("tcmu-rbd-test", "ffi-test", &[("k", "v")])
        .unwrap();
    r.service_update_status(&[("state", "ok")]).unwrap();
    // Config read back.
    assert_eq!(r.conf_get("rados_osd_op_timeout").unwrap(), "30");
    assert!(r.conf_get("no_such_option").is_err());
}

// ---- what the HA lock gate relies on: a handle without the managed lock,
// or a fenced one, has its writes refused (promptly, not parked), and
// releasing the lock drains the writes in flight.

/// `t`'s image opened through another client.
fn open_via(r: &Rados, t: &TestImage) -> Image {
    Image::open(&r.ioctx(&pool()).expect("pool"), &t.name).expect("open image")
}

/// Submits an aio write of `data` at `off`; the receiver gets its result.
fn write_async(img: &Image, off: u64, data: Vec<u8>) -> mpsc::Receiver<rbd_ffi::Result<usize>> {
    let (tx, rx) = mpsc::channel();
    img.aio_writev(off, OwnedBuf::new(data), move |r, _| {
        let _ = tx.send(r);
    });
    rx
}

/// What `rx` delivers within `limit` and the time since `t0`; `None` if
/// nothing came (the request is parked).
fn within<T>(rx: &mpsc::Receiver<T>, t0: Instant, limit: Duration) -> Option<(T, Duration)> {
    rx.recv_timeout(limit).ok().map(|v| (v, t0.elapsed()))
}

/// How long a refused request may take before the test calls it parked.
const PARKED: Duration = Duration::from_secs(60);

/// Waits for `what`, which must fail with `errno`: how long it took, or
/// `None` if it is still parked after [`PARKED`].
fn refused<T: std::fmt::Debug>(
    rx: &mpsc::Receiver<rbd_ffi::Result<T>>,
    t0: Instant,
    errno: i32,
    what: &str,
) -> Option<Duration> {
    let (res, took) = within(rx, t0, PARKED)?;
    eprintln!("{what} -> {res:?} after {took:?}");
    let e = res.expect_err(&format!("{what} succeeded"));
    assert_eq!(e.errno, errno, "{what}: {e}");
    Some(took)
}

/// Fails the test for a request that never completed. The image is leaked:
/// closing it would wait for the parked request, hanging instead of failing.
fn parked(img: Image, what: &str) -> ! {
    std::mem::forget(img);
    panic!("{what} did not complete within {PARKED:?}: librbd parked it");
}

fn read_back(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    assert_eq!(img.read_at(off, &mut v).unwrap(), len);
    v
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn a_write_on_a_handle_that_released_its_managed_lock_is_refused_not_parked() {
    let ra = connect(None);
    let rb = connect(None);
    let t = TestImage::new(&ra, "released", 8 << 20);
    let a = t.open();
    let b = open_via(&rb, &t);
    assert!(a.has_exclusive_lock_feature().unwrap());

    a.lock_acquire(LockMode::Exclusive).unwrap();
    let before = pattern(1, 4096);
    a.write_at(0, &before).unwrap();
    a.lock_release().unwrap();
    assert!(!a.is_exclusive_lock_owner().unwrap());
    b.lock_acquire(LockMode::Exclusive).unwrap();
    assert!(b.is_exclusive_lock_owner().unwrap());

    // A released the lock itself (lock_acquire switched it off automatic
    // lock requests): its write fails with EROFS instead of asking B for
    // the lock or waiting for it.
    let t0 = Instant::now();
    let rx = write_async(&a, 0, pattern(2, 4096));
    let what = "a write on the handle that released the lock";
    let Some(took) = refused(&rx, t0, libc::EROFS, what) else {
        parked(a, what)
    };
    assert!(took < Duration::from_secs(5), "EROFS came after {took:?}");

    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    a.aio_flush(move |r| {
        let _ = tx.send(r);
    });
    let what = "a flush on the handle that released the lock";
    let Some(took) = refused(&rx, t0, libc::EROFS, what) else {
        parked(a, what)
    };
    assert!(took < Duration::from_secs(5), "EROFS came after {took:?}");

    // Nothing landed, and B kept the lock.
    assert_eq!(read_back(&b, 0, 4096), before, "the refused write landed");
    assert!(b.is_exclusive_lock_owner().unwrap());
    assert!(!a.is_exclusive_lock_owner().unwrap());
    b.lock_release().unwrap();
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn a_write_on_a_never_locked_handle_is_refused_while_another_holds_the_managed_lock() {
    let rb = connect(None);
    let rc = connect(None);
    let t = TestImage::new(&rb, "neverlocked", 8 << 20);
    let b = t.open();
    b.lock_acquire(LockMode::Exclusive).unwrap();
    let before = pattern(1, 4096);
    b.write_at(0, &before).unwrap();

    // C never called lock_acquire: its write asks B for the lock, and B
    // (which took it explicitly) refuses; librbd fails the write with
    // EROFS rather than retrying forever.
    let c = open_via(&rc, &t);
    assert!(!c.is_exclusive_lock_owner().unwrap());
    let t0 = Instant::now();
    let rx = write_async(&c, 0, pattern(2, 4096));
    let what = "a write on the never-locked handle";
    let Some(took) = refused(&rx, t0, libc::EROFS, what) else {
        parked(c, what)
    };
    assert!(took < Duration::from_secs(10), "EROFS came after {took:?}");

    assert_eq!(read_back(&b, 0, 4096), before, "the refused write landed");
    assert!(b.is_exclusive_lock_owner().unwrap(), "B lost the lock");
    assert!(!c.is_exclusive_lock_owner().unwrap());
    b.lock_release().unwrap();
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn a_blocklisted_handles_writes_fail_and_close_returns() {
    let ra = connect(None);
    let rb = connect(None);
    // The image's context is B's: A's client is fenced.
    let t = TestImage::new(&rb, "fenced", 8 << 20);
    let a = open_via(&ra, &t);
    a.lock_acquire(LockMode::Exclusive).unwrap();
    let before = pattern(1, 4096);
    a.write_at(0, &before).unwrap();

    let addrs = ra.addrs().unwrap();
    let one = addrs
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .next()
        .unwrap()
        .to_string();
    rb.blocklist_add(&one, 600).unwrap();
    // blocklist_add returns once B's client has the osdmap with the entry.
    // An op from B makes the PG it reaches catch up to that map before
    // serving it, so once this read (of the object A writes below) has
    // completed, that PG enforces the entry: no write of A's can race it.
    let d = t.open();
    assert_eq!(read_back(&d, 0, 4096), before);

    // Several writes at once, all into the first object.
    let n = 8;
    let t0 = Instant::now();
    let rxs: Vec<_> = (0..n)
        .map(|i| write_async(&a, i * 4096, pattern(10 + i as u8, 4096)))
        .collect();
    let mut slowest = Duration::ZERO;
    for (i, rx) in rxs.iter().enumerate() {
        let what = format!("write {i} on the blocklisted handle");
        let Some(took) = refused(rx, t0, libc::ESHUTDOWN, &what) else {
            parked(a, &what)
        };
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_secs(30),
        "ESHUTDOWN after {slowest:?}"
    );

    // None landed: a fresh handle of another client reads the old data.
    let d2 = open_via(&connect(None), &t);
    assert_eq!(read_back(&d2, 0, 4096), before, "write 0 landed");
    assert!(
        read_back(&d2, 4096, (n as usize - 1) * 4096)
            .iter()
            .all(|&x| x == 0),
        "a write of the blocklisted client landed"
    );

    // Closing the fenced handle (it still thinks it holds the lock)
    // returns rather than hanging on the lock it cannot release.
    let t0 = Instant::now();
    let closing = std::thread::spawn(move || a.close());
    while !closing.is_finished() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "closing the blocklisted handle hangs"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let res = closing.join().expect("close panicked");
    eprintln!(
        "blocklisted handle: close -> {res:?} after {:?}",
        t0.elapsed()
    );

    // Only this test's client was fenced; lift the entry.
    let lifted = rb.mon_command(
        &format!(r#"{{"prefix": "osd blocklist", "blocklistop": "rm", "addr": "{one}"}}"#),
        b"",
    );
    eprintln!("blocklist rm {one} -> {lifted:?}");
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn lock_release_waits_for_writes_in_flight() {
    let r = connect(None);
    let t = TestImage::new(&r, "drain", 16 << 20);
    let a = t.open();
    let n = 32;
    let len = 65536;
    // A round whose writes all completed before lock_release was even
    // called proves nothing; such rounds are repeated (a few at most).
    for round in 0..10u8 {
        a.lock_acquire(LockMode::Exclusive).unwrap();
        let completed = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for i in 0..n {
            let completed = completed.clone();
            let tx = tx.clone();
            a.aio_writev(
                (i * len) as u64,
                OwnedBuf::new(pattern(i as u8 ^ round, len)),
                move |r, _| {
                    let _ = tx.send((i, r));
                    completed.fetch_add(1, Ordering::SeqCst);
                },
            );
        }
        let at_release = completed.load(Ordering::SeqCst);
        let t0 = Instant::now();
        a.lock_release().unwrap();
        let after = completed.load(Ordering::SeqCst);
        eprintln!(
            "drain round {round}: {at_release} of {n} done when lock_release was \
             called, {after} when it returned after {:?}",
            t0.elapsed()
        );
        assert_eq!(after, n, "lock_release returned with writes in flight");
        assert!(!a.is_exclusive_lock_owner().unwrap());
        for _ in 0..n {
            let (i, res) = rx.try_recv().expect("a completion counted but not sent");
            // (librbd's write completions return 0, not the length.)
            res.unwrap_or_else(|e| panic!("write {i}: {e}"));
        }
        let fresh = t.open();
        for i in 0..n {
            assert_eq!(
                read_back(&fresh, (i * len) as u64, len),
                pattern(i as u8 ^ round, len),
                "write {i}"
            );
        }
        if at_release < n {
            return;
        }
    }
    panic!("every round's writes completed before lock_release was called");
}
