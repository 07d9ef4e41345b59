//! What this process holds, from /proc/self: what the leak and idle-cost
//! checks compare before and after.

/// A numeric field of /proc/self/status (`"Threads:"`, `"VmRSS:"` in
/// KiB); 0 when absent.
pub fn status(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors.
pub fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Threads.
pub fn threads() -> u64 {
    status("Threads:")
}

/// Resident memory in KiB after handing free heap back to the kernel:
/// glibc keeps what exited threads freed in their arenas, which is not a
/// leak.
pub fn rss_trimmed_kib() -> u64 {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe { libc::malloc_trim(0) };
    status("VmRSS:")
}

/// Bytes the allocator has handed out and not had back, over every arena
/// (small chunks and mmapped large ones): a leak shows here byte for
/// byte, where RSS hides it in heap pages that were already resident.
pub fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

/// The process's CPU time (user + system), every thread's, exited ones
/// included.
pub fn process_cpu() -> std::time::Duration {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[cfg(test)]
mod tests {
    #[test]
    fn heap_in_use_counts_a_live_allocation() {
        let before = super::heap_in_use();
        let v = vec![1u8; 1 << 20];
        let during = super::heap_in_use();
        assert!(during >= before + (1 << 20), "{before} -> {during}");
        drop(v);
    }

    #[test]
    fn reads_this_process() {
        assert!(super::threads() >= 1);
        assert!(super::fds() >= 3, "stdin, stdout, stderr at least");
        assert!(super::rss_trimmed_kib() > 0);
        assert_eq!(super::status("NoSuchField:"), 0);
    }
}
