//! The rbd backend on the live micro cluster (scripts/test-rbd.sh):
//! random I/O through the emulated kernel, ring, SCSI core and rbd backend
//! with every byte verified and checked against `rbd export`; the
//! operations the SCSI layer does not decode yet (UNMAP, WRITE SAME,
//! COMPARE AND WRITE) straight on the backend; every bad config string.

mod common;
mod rbd_util;

use common::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use rbd_util::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tcmu_handler::{IoBufs, IoError, Op};
use tcmu_rbd_testkit::emulator::Data;

const BS: u64 = 512;

fn overlaps(a: (u64, u32), b: (u64, u32)) -> bool {
    a.0 < b.0 + u64::from(b.1) && b.0 < a.0 + u64::from(a.1)
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn random_io_through_the_ring_matches_rbd_export() {
    let img = TestImage::new("ring-rand", 64 << 20);
    let blocks_total = img.size / BS;
    let be = tcmu_rbd::backends::open("rbd", &img.cfg(";osd_op_timeout=60"), img.size, BS as u32)
        .unwrap_or_else(|e| panic!("open: {e}"));
    let (mut emu, mut dev) = emu_device(small_layout(), be);
    let stop = dev.stopper();
    let worker = std::thread::spawn(move || dev.run());
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut model = vec![0u8; img.size as usize];
    let mut ops = 0usize;
    let mut bytes_read = 0usize;
    for round in 0..150 {
        // Up to 32 disjoint commands in flight at once, completed by
        // librbd's threads in whatever order.
        let mut want: HashMap<u16, (bool, u64, u32)> = HashMap::new();
        let mut used: Vec<(u64, u32)> = Vec::new();
        for _ in 0..rng.gen_range(1..=32) {
            let blocks = match rng.gen_range(0..10) {
                0 => rng.gen_range(64..=256),
                1..=3 => rng.gen_range(8..64),
                _ => rng.gen_range(1..8),
            };
            // Cluster half the I/O in the first MiB so reads meet writes.
            let span = if rng.gen_bool(0.5) {
                2048
            } else {
                blocks_total
            };
            let lba = rng.gen_range(0..span - u64::from(blocks));
            if used.iter().any(|&u| overlaps(u, (lba, blocks))) {
                continue;
            }
            used.push((lba, blocks));
            let len = (u64::from(blocks) * BS) as usize;
            let lo = (lba * BS) as usize;
            let write = rng.gen_bool(0.5);
            let id = if write {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                model[lo..lo + len].copy_from_slice(&data);
                emu.queue(&rw16(true, lba, blocks), Data::ToDevice(&data))
            } else {
                emu.queue(&rw16(false, lba, blocks), Data::FromDevice(len))
            }
            .unwrap_or_else(|e| panic!("round {round}: queue: {e}"));
            want.insert(id, (write, lba, blocks));
        }
        emu.kick();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !want.is_empty() {
            assert!(
                Instant::now() < deadline,
                "round {round}: commands never completed"
            );
            let mut fds = [nix::poll::PollFd::new(
                emu.doorbell_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
            emu.ack_doorbell();
            emu.reap(|r, data| {
                let (w, lba, blocks) = want.remove(&r.cmd_id).expect("reaped an unknown id");
                assert_eq!(r.status, 0, "lba {lba} x{blocks} failed: {:?}", r.sense);
                if !w {
                    let lo = (lba * BS) as usize;
                    let hi = lo + (u64::from(blocks) * BS) as usize;
                    assert!(
                        data == &model[lo..hi],
                        "round {round}: read of lba {lba} x{blocks} returned wrong data"
                    );
                    bytes_read += data.len();
                }
                ops += 1;
            })
            .expect("reap");
        }
    }
    stop.stop();
    worker.join().expect("worker").expect("worker run");
    assert!(ops > 2000, "only {ops} commands");
    assert!(bytes_read > 1 << 20);
    assert!(emu.broken().is_none());
    // What the initiator wrote is what the cluster holds.
    let exported = img.export();
    assert_eq!(exported.len(), model.len());
    if let Some(i) = exported.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("rbd export differs from the written data at byte {i}");
    }
}

fn open_direct(img: &TestImage, bs: u32) -> Direct {
    let be = tcmu_rbd::backends::open("rbd", &img.cfg(""), img.size, bs)
        .unwrap_or_else(|e| panic!("open: {e}"));
    Direct::new(be)
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn unmap_and_write_zeroes_read_back_zeros() {
    let img = TestImage::new("unmap", 16 << 20);
    let mut d = open_direct(&img, 512);
    let caps = d.backend.caps();
    assert!(caps.discard && caps.discard_zeroes);
    let data = pattern(1, 1 << 20);
    d.write(0, &data).unwrap();
    // UNMAP: several small ranges, below librbd's 64K discard granularity.
    d.run(Op::Discard {
        ranges: vec![(4096, 512), (8192, 4096), (300_000, 70_000)],
    })
    .unwrap();
    let mut want = data.clone();
    for (o, l) in [(4096usize, 512usize), (8192, 4096), (300_000, 70_000)] {
        want[o..o + l].fill(0);
    }
    assert!(
        d.read(0, 1 << 20).unwrap() == want,
        "UNMAP'd ranges are not zero"
    );
    // WRITE SAME with UNMAP (write zeroes, unmap allowed) and without.
    d.run(Op::WriteZeroes {
        offset: 512 * 1000,
        len: 512 * 300,
        unmap: true,
    })
    .unwrap();
    want[512 * 1000..512 * 1300].fill(0);
    d.run(Op::WriteZeroes {
        offset: 512 * 1500,
        len: 512 * 3,
        unmap: false,
    })
    .unwrap();
    want[512 * 1500..512 * 1503].fill(0);
    assert!(
        d.read(0, 1 << 20).unwrap() == want,
        "write-zeroes ranges are not zero"
    );
    drop(d);
    assert!(img.export()[..1 << 20] == want[..]);
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn write_same_repeats_the_pattern() {
    let img = TestImage::new("wsame", 16 << 20);
    let mut d = open_direct(&img, 512);
    d.write(0, &pattern(2, 65536)).unwrap();
    let pat = pattern(3, 512);
    // The pattern as the ring delivers it: possibly in two segments.
    let mut a = pat[..200].to_vec();
    let mut b = pat[200..].to_vec();
    // SAFETY: both vectors outlive the operation (we wait for it below
    // and drop them after).
    let split = unsafe {
        IoBufs::from_raw(
            &[(a.as_mut_ptr(), a.len()), (b.as_mut_ptr(), b.len())],
            None,
        )
    };
    d.run(Op::WriteSame {
        offset: 4096,
        len: 512 * 20,
        pattern: split,
    })
    .unwrap();
    d.run(Op::WriteSame {
        offset: 65536,
        len: 512 * 128,
        pattern: IoBufs::from_vec(pat.clone()),
    })
    .unwrap();
    drop((a, b));
    let got = d.read(0, 65536 * 2).unwrap();
    let base = pattern(2, 65536);
    assert_eq!(&got[..4096], &base[..4096]);
    for k in 0..20 {
        assert_eq!(
            &got[4096 + k * 512..4096 + (k + 1) * 512],
            &pat[..],
            "block {k}"
        );
    }
    assert_eq!(&got[4096 + 20 * 512..65536], &base[4096 + 20 * 512..]);
    for k in 0..128 {
        assert_eq!(&got[65536 + k * 512..65536 + (k + 1) * 512], &pat[..]);
    }
    // A length that is not a multiple of the pattern is refused.
    let e = d
        .run(Op::WriteSame {
            offset: 0,
            len: 700,
            pattern: IoBufs::from_vec(pat.clone()),
        })
        .unwrap_err();
    assert!(
        matches!(e, IoError::Io { errno, .. } if errno == libc::EINVAL),
        "{e:?}"
    );
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn compare_and_write_native_and_emulated() {
    let img = TestImage::new("caw", 16 << 20);
    for bs in [512u32, 4096] {
        let mut d = open_direct(&img, bs);
        let len = bs as usize;
        // An offset in the middle of a 4 MiB object, and one at its start.
        for off in [(5u64 << 20) + 3 * u64::from(bs), 8 << 20] {
            let old = pattern(off + 1, len);
            d.write(off, &old).unwrap();
            let new = pattern(off + 2, len);
            d.run(Op::CompareAndWrite {
                offset: off,
                compare: IoBufs::from_vec(old.clone()),
                write: IoBufs::from_vec(new.clone()),
            })
            .unwrap_or_else(|e| panic!("bs {bs} off {off}: matching CAW failed: {e}"));
            assert_eq!(d.read(off, len).unwrap(), new);
            // Miscompare: the first differing byte, relative to the range.
            for at in [0usize, 77, len - 1] {
                let mut wrong = new.clone();
                wrong[at] ^= 0x40;
                if at + 9 < len {
                    wrong[at + 9] ^= 0x01;
                }
                let e = d
                    .run(Op::CompareAndWrite {
                        offset: off,
                        compare: IoBufs::from_vec(wrong),
                        write: IoBufs::from_vec(old.clone()),
                    })
                    .unwrap_err();
                assert_eq!(
                    e,
                    IoError::Miscompare { offset: at as u64 },
                    "bs {bs} off {off}"
                );
                assert_eq!(d.read(off, len).unwrap(), new, "a miscompare wrote");
            }
        }
        // Two blocks: emulated for both block sizes.
        let off = 1u64 << 20;
        let old = pattern(9, 2 * len);
        d.write(off, &old).unwrap();
        let mut wrong = old.clone();
        wrong[len + 5] ^= 1;
        assert_eq!(
            d.run(Op::CompareAndWrite {
                offset: off,
                compare: IoBufs::from_vec(wrong),
                write: IoBufs::from_vec(vec![1; 2 * len]),
            }),
            Err(IoError::Miscompare {
                offset: len as u64 + 5
            })
        );
        d.run(Op::CompareAndWrite {
            offset: off,
            compare: IoBufs::from_vec(old),
            write: IoBufs::from_vec(vec![1; 2 * len]),
        })
        .unwrap();
        assert_eq!(d.read(off, 2 * len).unwrap(), vec![1; 2 * len]);
    }
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn flush_and_fua_writes() {
    let img = TestImage::new("flush", 8 << 20);
    let mut d = open_direct(&img, 512);
    d.run(Op::Flush).unwrap();
    let data = pattern(4, 8192);
    d.run(Op::Write {
        offset: 4096,
        bufs: IoBufs::from_vec(data.clone()),
        fua: true,
    })
    .unwrap();
    d.run(Op::Flush).unwrap();
    // Another client sees the FUA write.
    assert_eq!(&img.export()[4096..4096 + 8192], &data[..]);
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn devices_share_one_connection_per_user_and_op_timeout() {
    let a = TestImage::new("share-a", 8 << 20);
    let b = TestImage::new("share-b", 8 << 20);
    let ba = tcmu_handler::rbd::RbdBackend::open(&a.cfg(""), a.size, 512).unwrap();
    let bb = tcmu_handler::rbd::RbdBackend::open(&b.cfg(""), b.size, 512).unwrap();
    assert_eq!(ba.client(), bb.client(), "two connections for one user");
    let bt = tcmu_handler::rbd::RbdBackend::open(&b.cfg(";id=tcmu"), b.size, 512).unwrap();
    assert_eq!(bt.client().0, "client.tcmu");
    assert_ne!(bt.client().1, bb.client().1);
    // Another osd_op_timeout for the same user: a connection of its own,
    // which has that timeout, while the shared one keeps its own.
    let shared = ba.op_timeout().unwrap();
    let other = if shared == Duration::from_secs(45) {
        46
    } else {
        45
    };
    let bo = tcmu_handler::rbd::RbdBackend::open(
        &a.cfg(&format!(";osd_op_timeout={other}")),
        a.size,
        512,
    )
    .unwrap();
    assert_eq!(bo.op_timeout().unwrap(), Duration::from_secs(other));
    assert_eq!(ba.op_timeout().unwrap(), shared);
    assert_ne!(
        bo.client().1,
        ba.client().1,
        "shared a client with another timeout"
    );
    let bo2 = tcmu_handler::rbd::RbdBackend::open(
        &b.cfg(&format!(";osd_op_timeout={other}")),
        b.size,
        512,
    )
    .unwrap();
    assert_eq!(
        bo2.client(),
        bo.client(),
        "same timeout, same user: one connection"
    );
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn a_takeover_never_fences_this_gateways_own_clients() {
    use tcmu_handler::rbd::lock::{LockError, LockView, TakeOptions};
    use tcmu_handler::rbd::RbdBackend;
    let img = TestImage::new("ownclient", 8 << 20);
    let a = RbdBackend::open(&img.cfg(""), img.size, 512).unwrap();
    a.take_lock(&TakeOptions::fence_only(60)).unwrap();
    // A second device on the same client, then one on a client of its own
    // (another osd_op_timeout): both are refused, neither fences `a`.
    let same = RbdBackend::open(&img.cfg(""), img.size, 512).unwrap();
    let other = RbdBackend::open(&img.cfg(";osd_op_timeout=47"), img.size, 512).unwrap();
    assert_ne!(other.client().1, a.client().1);
    for b in [&same, &other] {
        match b.take_lock(&TakeOptions::fence_only(60)) {
            Err(LockError::OwnClient { .. }) => {}
            r => panic!("takeover by a device of this daemon: {r:?}"),
        }
    }
    assert_eq!(a.lock_view().unwrap(), LockView::Mine);
    assert!(!a.is_fenced());
    let mut d = Direct::new(std::sync::Arc::new(a));
    d.write(0, &pattern(9, 4096)).unwrap();
    assert_eq!(d.read(0, 4096).unwrap(), pattern(9, 4096));
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn every_bad_config_string_names_its_fault() {
    let img = TestImage::new("badcfg", 8 << 20);
    let c = conf();
    let p = pool();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "missing pool and image"),
        ("just-an-image".into(), "missing pool name"),
        (format!("{p}/"), "missing image name"),
        (format!("{p}/a/b/c"), "at most 3"),
        (
            format!("{p}/{};osd_op_timeout=soon", img.name),
            "osd_op_timeout=\"soon\"",
        ),
        (
            format!("{p}/{};frobnicate=1", img.name),
            "unknown option \"frobnicate\"",
        ),
        (
            format!("{p}/{};conf=relative.conf", img.name),
            "not an absolute path",
        ),
        (
            format!("{p}/{};conf=/nonexistent/ceph.conf", img.name),
            "ceph config /nonexistent/ceph.conf does not exist",
        ),
        (
            format!("no-such-pool/{};conf={c}", img.name),
            "pool \"no-such-pool\" does not exist",
        ),
        (
            format!("{p}/no-such-image;conf={c}"),
            "image \"no-such-image\" does not exist in pool",
        ),
        (
            format!("{p}/no-such-ns/{};conf={c}", img.name),
            "namespace \"no-such-ns\" does not exist",
        ),
        (
            format!("{p}/{};conf={c};id=nobody;osd_op_timeout=10", img.name),
            "bad credentials: no keyring holds a key for client.nobody",
        ),
        (
            format!("{p}/{};conf={c};id=bogus;osd_op_timeout=10", img.name),
            "bad credentials: the cluster refused the key of client.bogus",
        ),
    ];
    // A cluster that does not answer: the same conf with a dead mon
    // address fails within osd_op_timeout.
    let dead_dir = tempfile::tempdir().expect("tempdir");
    let dead = dead_dir.path().join("ceph.conf");
    let text = std::fs::read_to_string(&c).expect("read conf");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("mon host") {
                "mon host = 127.0.0.1:9".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    std::fs::write(&dead, text).expect("write conf");
    let t0 = Instant::now();
    let e = tcmu_rbd::backends::check_config(
        "rbd",
        &format!("{p}/{};conf={};osd_op_timeout=3", img.name, dead.display()),
    )
    .expect_err("a dead cluster passed");
    assert!(e.contains("no monitor answered client.admin"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    // A conf librados cannot parse (its last line lacks the newline).
    let broken = dead_dir.path().join("broken.conf");
    std::fs::write(&broken, "[global]\nmon host = 127.0.0.1:9").expect("write conf");
    let e = tcmu_rbd::backends::check_config(
        "rbd",
        &format!("{p}/{};conf={}", img.name, broken.display()),
    )
    .expect_err("a broken conf passed");
    assert!(
        e.contains("a syntax error, or no newline at the end"),
        "{e}"
    );
    // A keyring entry for a user the cluster does not know.
    let bogus = format!("{}/client.bogus.keyring", cluster_dir());
    let st = std::process::Command::new("ceph-authtool")
        .args([
            "--create-keyring",
            &bogus,
            "--gen-key",
            "-n",
            "client.bogus",
        ])
        .output()
        .expect("ceph-authtool");
    assert!(st.status.success());
    for (cfg, want) in &cases {
        let e = match tcmu_rbd::backends::open("rbd", cfg, img.size, 512) {
            Ok(_) => panic!("{cfg:?} opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{cfg:?}: {e:?} does not say {want:?}");
        assert_eq!(e.lines().count(), 1, "{cfg:?}: not one line: {e:?}");
        let ce = tcmu_rbd::backends::check_config("rbd", cfg).expect_err(cfg);
        assert!(ce.contains(want), "check_config {cfg:?}: {ce:?}");
    }
    // The size must match the device.
    let e = tcmu_rbd::backends::open("rbd", &img.cfg(""), img.size * 2, 512)
        .err()
        .expect("a size mismatch opened")
        .to_string();
    assert!(
        e.contains(&format!(
            "is {} bytes but the device is {} bytes",
            img.size,
            img.size * 2
        )),
        "{e}"
    );
    // And the good string passes both.
    tcmu_rbd::backends::check_config("rbd", &img.cfg("")).unwrap();
    tcmu_rbd::backends::open("rbd", &img.cfg(""), img.size, 512).unwrap();
    assert!(tcmu_rbd::backends::handlers()
        .iter()
        .any(|h| h.subtype == "rbd" && h.config_desc.contains("pool/")));
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn resize_grows_the_image_and_refuses_to_shrink() {
    let img = TestImage::new("resize", 8 << 20);
    let be = tcmu_handler::rbd::RbdBackend::open(&img.cfg(""), img.size, 512).unwrap();
    use tcmu_handler::Backend;
    be.resize(16 << 20).unwrap();
    assert_eq!(be.geometry().size, 16 << 20);
    let info = cli("rbd", &["info", "--format", "json", &img.spec()]);
    assert!(
        info.contains(&format!("\"size\":{}", 16u64 << 20)),
        "{info}"
    );
    assert_eq!(be.resize(4 << 20), Err(IoError::OutOfRange));
    assert_eq!(be.geometry().size, 16 << 20);
    // A resize made by someone else reaches the update watch (after our
    // own resize's notification has settled).
    std::thread::sleep(Duration::from_secs(1));
    let before = be.header_updates();
    cli("rbd", &["resize", "--size", "32M", &img.spec()]);
    let t0 = Instant::now();
    while be.header_updates() == before && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(be.header_updates() > before, "no header update seen");
}

#[test]
#[ignore = "needs the live Ceph cluster: scripts/test-rbd.sh runs it"]
fn namespace_images_are_served() {
    let ns = format!("ns{}", std::process::id());
    let p = pool();
    let _ = std::process::Command::new("rbd")
        .args(["-c", &conf(), "namespace", "create", &format!("{p}/{ns}")])
        .output();
    // The same name in the default namespace is another image.
    let plain = TestImage::new("nsimg", 8 << 20);
    let spec = format!("{p}/{ns}/{}", plain.name);
    cli("rbd", &["create", "--size", "8M", &spec]);
    let cfg = format!("{spec};conf={}", conf());
    let be = tcmu_rbd::backends::open("rbd", &cfg, 8 << 20, 512)
        .unwrap_or_else(|e| panic!("open {cfg}: {e}"));
    assert_eq!(be.name(), format!("rbd:{spec}"));
    let mut d = Direct::new(be);
    let data = pattern(5, 8192);
    d.write(4096, &data).unwrap();
    assert_eq!(d.read(4096, 8192).unwrap(), data);
    drop(d);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("ns.img");
    cli(
        "rbd",
        &[
            "export",
            "--no-progress",
            &spec,
            out.to_str().expect("utf-8"),
        ],
    );
    let img = std::fs::read(&out).expect("read export");
    assert_eq!(&img[4096..4096 + 8192], &data[..]);
    assert!(
        plain.export().iter().all(|&b| b == 0),
        "wrote to the default namespace"
    );
    cli("rbd", &["rm", "--no-progress", &spec]);
    cli("rbd", &["namespace", "remove", &format!("{p}/{ns}")]);
}
