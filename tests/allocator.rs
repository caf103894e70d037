//! `exec::memory::keep_freed_memory`: a buffer larger than the 64 MiB heaps glibc gives threads
//! other than main, freed and allocated again on such a thread (where stages and the model's
//! pool workers run), comes back with its pages still mapped — no page faults the second time.
//!
//! A process of its own without the test harness: the allocator settings must come before any
//! other thread allocates, as in `main`.

/// Minor page faults of the calling thread so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults() -> i64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
    usage.ru_minflt
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    rpt_flow::exec::memory::keep_freed_memory();
    // 96 MiB: more than a thread heap holds, less than the 1 GiB the settings keep.
    const BYTES: usize = 96 << 20;
    // Allocates the buffer, writes one byte per page, frees it: the page faults that took.
    let round = || {
        let before = minor_faults();
        let mut v: Vec<u8> = Vec::with_capacity(BYTES);
        let p = v.as_mut_ptr();
        for i in (0..BYTES).step_by(4096) {
            // SAFETY: within the capacity; plain bytes need no initialisation.
            unsafe { p.add(i).write(1) };
        }
        // SAFETY: every value up to `BYTES` is a `u8` the allocation holds (pages never written
        // read as whatever the allocator left, any byte being valid).
        unsafe { v.set_len(BYTES) };
        std::hint::black_box(&v);
        drop(v);
        minor_faults() - before
    };
    let (first, second) = std::thread::spawn(move || (round(), round())).join().expect("the thread ran");
    let pages = (BYTES / 4096) as i64;
    println!("page faults on a worker thread: {first} allocating {pages} pages, {second} allocating them again");
    assert!(first >= pages / 2, "the first allocation should fault its pages in ({first} faults for {pages} pages)");
    assert!(
        second < pages / 20,
        "the freed buffer was returned to the kernel: {second} page faults on allocating it again (of {pages} pages)"
    );
    println!("test keep_freed_memory ... ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("test keep_freed_memory ... skipped (glibc's allocator only)");
}
