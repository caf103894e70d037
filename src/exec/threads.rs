//! Where a stage's computation runs: on a worker of rayon's global pool.
//!
//! The model's CPU ops split their work with rayon (`par_iter`). Called from a thread outside the
//! pool — the main thread, or the thread the executor starts for a stage — every such call hands
//! its job to a pool worker and sleeps until the job is done: two thread wake-ups per op, and
//! the op's inputs and outputs move between cores' caches each time. A forward makes a few
//! hundred such calls; on one thread that handoff was 5–20 % of the decoder's time here
//! (docs/benchmarks.md). Run from a worker, nested parallel calls stay on the pool, and with one
//! thread they run inline. The split of the work, and so every result, does not depend on
//! which thread calls.

/// Runs `f` on a worker of rayon's global pool (where it already is, in place) and returns its
/// value; a panic in `f` reaches the caller as if `f` had run here.
///
/// Only for work that is alone on the pool or fine to share it: a job that blocks a worker on
/// something another job must do can deadlock a small pool, and a worker waiting inside a
/// parallel call may pick up another queued job whole. The executor uses it when it runs one
/// stage at a time.
pub fn on_pool_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_worker_and_returns_the_value() {
        assert!(rayon::current_thread_index().is_none(), "the test harness thread is outside the pool");
        let (inside, value) = on_pool_worker(|| (rayon::current_thread_index().is_some(), 41 + 1));
        assert!(inside);
        assert_eq!(value, 42);
        // Nested: already on a worker, it runs in place.
        let nested = on_pool_worker(|| {
            let outer = rayon::current_thread_index();
            on_pool_worker(move || rayon::current_thread_index() == outer)
        });
        assert!(nested);
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| on_pool_worker(|| panic!("stage failed")));
        let message = caught.expect_err("the panic comes back");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"stage failed"));
    }
}
