//! The daemon's file LUNs share one pool of I/O threads: 64 of them cost
//! [`FILE_THREADS`] threads, not 4 each, and each still reads back what
//! was written to it (and not a neighbour's data).

use std::time::Duration;
use tcmu_handler::{CompletionQueue, IoBufs, Op};
use tcmu_rbd::backends::{self, FILE_THREADS};

/// Threads of this process named `file-io-*`.
fn file_io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("file-io-"))
        })
        .count()
}

#[test]
fn many_file_luns_share_a_bounded_pool_and_keep_their_data_apart() {
    const LUNS: usize = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let luns: Vec<_> = (0..LUNS)
        .map(|i| {
            let path = dir.path().join(format!("lun{i}.img"));
            backends::open("file", &path.display().to_string(), 1 << 20, 512)
                .expect("open file LUN")
        })
        .collect();
    // The pool's threads name themselves as they start, so a count taken
    // at once can miss some (5 of 8 in a CI run): wait for all of them.
    let t0 = std::time::Instant::now();
    let mut threads = file_io_threads();
    while threads < FILE_THREADS && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
        threads = file_io_threads();
    }
    assert!(
        (1..=FILE_THREADS).contains(&threads),
        "{LUNS} file LUNs run {threads} file-io threads; the bound is {FILE_THREADS}"
    );

    let cq = CompletionQueue::new().expect("completion queue");
    let wait = |what: &str| {
        let c = cq
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{what}: no completion in 10 s"));
        c.result.unwrap_or_else(|e| panic!("{what}: {e}"));
    };
    // Every LUN at once: a block of its own number at the same offset.
    for (i, b) in luns.iter().enumerate() {
        b.submit(
            Op::Write {
                offset: 4096,
                bufs: IoBufs::from_vec(vec![i as u8; 4096]),
                fua: false,
            },
            cq.done(i as u64),
        );
    }
    for _ in 0..LUNS {
        wait("write");
    }
    let reads: Vec<IoBufs> = (0..LUNS)
        .map(|_| IoBufs::from_vec(vec![0xee; 4096]))
        .collect();
    for (i, b) in luns.iter().enumerate() {
        b.submit(
            Op::Read {
                offset: 4096,
                bufs: reads[i].clone(),
            },
            cq.done(i as u64),
        );
    }
    for _ in 0..LUNS {
        wait("read");
    }
    for (i, r) in reads.iter().enumerate() {
        assert!(
            r.to_vec().iter().all(|&x| x == i as u8),
            "LUN {i} read back another LUN's data"
        );
    }
    assert_eq!(file_io_threads(), threads, "the pool grew with the I/O");
}
