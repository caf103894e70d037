//! Plain Rust loops compiled a second time for AVX2, for the CPUs that have it.
//!
//! The crate is built for baseline x86-64, so an element-wise loop over f32 (scaling the kernel's
//! integer sums, RMSNorm's division, relu²·up) vectorises to 4-wide SSE. [`wide`] runs a
//! closure inside a function compiled with AVX2 enabled, into which the closure is inlined: the
//! same loop, 8 wide. The results are the same bits: Rust never contracts `a * b + c` into an
//! FMA and never reorders float sums, so only the vector width changes.

/// Runs `f`, compiled for AVX2 when this CPU has it (detected once).
#[inline]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether this CPU has AVX2 (detected once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wide loop gives the bits of the plain one, on values where a fused multiply-add or a
    /// reordered sum would differ.
    #[test]
    fn wide_loops_give_the_plain_bits() {
        let mut rng = crate::rng::SplitMix64::new(7);
        let a: Vec<f32> = (0..1001).map(|_| rng.normal() as f32 * 1e3).collect();
        let b: Vec<f32> = (0..1001).map(|_| rng.normal() as f32 * 1e-3).collect();
        let fused = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(x, y)| x * y + x / y).collect() };
        let sum = |a: &[f32]| a.iter().fold(0f32, |s, x| s + x * x);
        assert_eq!(wide(|| fused(&a, &b)), fused(&a, &b));
        assert_eq!(wide(|| sum(&a)).to_bits(), sum(&a).to_bits());
    }
}
