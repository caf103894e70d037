//! SplitMix64: a tiny, well-known 64-bit generator (Steele, Lea & Flood 2014), written here so
//! that every random choice (data windows and batches, random model initialisation, sampling)
//! is reproducible from an integer seed alone, across platforms, and does not change with a
//! dependency's version. The one generator of the crate: `data` and `model` both use it, so it
//! sits beside them and imports nothing.

/// A SplitMix64 generator. `Clone` copies its state; there is no hidden global state.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Outputs of the stream one [`SplitMix64::normal`] takes.
pub const DRAWS_PER_NORMAL: u64 = 2;

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one item of a family: `seed` mixed with each key in turn, so that
    /// `(seed, step)` and `(seed, step + 1)` give unrelated streams.
    pub fn keyed(seed: u64, keys: &[u64]) -> Self {
        let mut state = mix(seed ^ GOLDEN);
        for &k in keys {
            state = mix(state ^ mix(k.wrapping_add(GOLDEN)));
        }
        Self::new(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias (Lemire's method with
    /// rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// A uniform index into a slice of length `n`.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Skips `draws` outputs of [`SplitMix64::next_u64`] in O(1): the state only ever moves by
    /// the same constant, so the generator can start anywhere in its stream (parallel fills).
    pub fn advance(&mut self, draws: u64) {
        self.state = self.state.wrapping_add(GOLDEN.wrapping_mul(draws));
    }

    /// Standard normal (Box–Muller, one value per call: two uniforms each time, so
    /// [`DRAWS_PER_NORMAL`] outputs of the stream).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}

/// The SplitMix64 output function (a bijection on u64).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_sequence() {
        // Reference values of SplitMix64 seeded with 1234567 (from the published C code).
        let mut r = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, vec![6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn advance_skips_exactly_that_many_draws() {
        for skip in [0u64, 1, 2, 7, 1000] {
            let mut walked = SplitMix64::new(99);
            for _ in 0..skip {
                walked.next_u64();
            }
            let mut jumped = SplitMix64::new(99);
            jumped.advance(skip);
            assert_eq!(jumped.next_u64(), walked.next_u64(), "skip {skip}");
        }
        let mut a = SplitMix64::new(5);
        a.normal();
        let mut b = SplitMix64::new(5);
        b.advance(DRAWS_PER_NORMAL);
        assert_eq!(a.normal().to_bits(), b.normal().to_bits());
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(7);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let x = r.below(5);
            seen[x as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn keyed_streams_differ() {
        let a = SplitMix64::keyed(0, &[1]).next_u64();
        let b = SplitMix64::keyed(0, &[2]).next_u64();
        let c = SplitMix64::keyed(1, &[1]).next_u64();
        assert!(a != b && a != c && b != c);
        assert_eq!(a, SplitMix64::keyed(0, &[1]).next_u64());
    }
}
