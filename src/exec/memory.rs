//! Peak resident memory per stage (Linux): the high-water mark is reset before a stage runs
//! (`/proc/self/clear_refs` ← 5) and read after it (`VmHWM`), so each stage reports its own
//! peak rather than the process's. File pages mapped while loading count as resident too.

/// Starts a new high-water mark; false where the kernel does not allow it (the next reading is
/// then the process's peak so far).
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident memory since the last reset, in MiB; `None` off Linux.
pub fn peak_rss_mb() -> Option<f64> {
    status_mb("VmHWM:")
}

/// Resident memory now, in MiB; `None` off Linux.
pub fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Keeps large freed buffers in the process heap instead of returning them to the kernel (glibc:
/// `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` raised to 1 GiB). Tensor work frees and reallocates
/// buffers of the same sizes on every forward; by default every buffer over 32 MiB (e.g. the
/// logits, 131 MB for 1024 positions × 32000) is a fresh `mmap` whose pages the kernel zeroes on
/// first touch, and freed heap tops are trimmed and faulted in again — ~12 % of a CPU forward
/// here was page faults (docs/benchmarks.md). Resident memory then stays at its high-water mark
/// (up to 1 GiB of free heap kept), which is what peak measurements report anyway.
///
/// Every thread allocates from the one main heap (`M_ARENA_MAX` 1): glibc gives other threads
/// heaps of at most 64 MiB, and a larger buffer allocated there — the logits of a stage, which
/// runs on a thread of its own or a pool worker, e.g. 256 × 128256 × 4 bytes for the 2B model —
/// was a fresh `mmap` again on every call whatever the thresholds (a third more LM-head time on
/// one thread, docs/benchmarks.md). Call once, first thing in `main`, before other threads
/// start; no effect off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
