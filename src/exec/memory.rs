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
