//! Magnitude pruning on plain slices: the exact selection of the smallest kept magnitudes (radix
//! selection over the magnitude bits, globally over groups visited in order, or per row), and the
//! RPT notebooks' rule (a seeded, sampled percentile of the nonzero magnitudes). Groups are
//! row-major f32 values with keep flags (1 = kept, 0 = pruned); ties are broken by visiting order,
//! then position.

use std::convert::Infallible;

/// The notebook rule's threshold: the `fraction` percentile of the nonzero magnitudes of all
/// groups, each group contributing all its nonzero |w| or, when it has more than `sample`, a
/// uniform random subset of `sample` of them (Floyd's algorithm, seeded per group index).
/// Returns the threshold and N; with no nonzero weight at all, 0 (the zeros are pruned, nothing
/// else).
pub fn notebook_threshold(groups: &[&[f32]], fraction: f64, sample: usize, seed: u64) -> (f32, usize) {
    let pool = groups.iter().enumerate().flat_map(|(g, v)| notebook_sample(v, g, sample, seed)).collect();
    notebook_percentile(pool, fraction)
}

/// Group `g`'s contribution to the notebook threshold: its nonzero magnitudes, or a seeded
/// uniform subset of `sample` of them, in position order.
pub fn notebook_sample(values: &[f32], g: usize, sample: usize, seed: u64) -> Vec<f32> {
    let nonzero: Vec<f32> = values.iter().filter(|x| **x != 0.0).map(|x| x.abs()).collect();
    if nonzero.len() <= sample {
        return nonzero;
    }
    let mut rng = crate::rng::SplitMix64::keyed(seed, &[g as u64]);
    let n = nonzero.len();
    let mut chosen = std::collections::HashSet::with_capacity(sample);
    for j in n - sample..n {
        let t = rng.index(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut idx: Vec<usize> = chosen.into_iter().collect();
    idx.sort_unstable();
    idx.into_iter().map(|i| nonzero[i]).collect()
}

/// Index `min(⌊N·p/100⌋, N − 1)` of the sorted pool, as the notebooks take it (an integral
/// percentage is computed in integers, so 10% of 4,096 is exactly 409), and N.
pub fn notebook_percentile(mut pool: Vec<f32>, fraction: f64) -> (f32, usize) {
    if pool.is_empty() {
        return (0.0, 0);
    }
    pool.sort_by(f32::total_cmp);
    let n = pool.len();
    let percent = fraction * 100.0;
    let k = if (percent - percent.round()).abs() < 1e-9 {
        n * percent.round() as usize / 100
    } else {
        (n as f64 * fraction).floor() as usize
    };
    (pool[k.min(n - 1)], n)
}

/// Sort key of a magnitude: the bits of |x| order like the values (NaN sorts last).
pub fn key(x: f32) -> u32 {
    x.abs().to_bits()
}

/// Number of zeros a group of `n` weights must have at `sparsity` (nearest integer).
pub fn target_zeros(n: usize, sparsity: f64) -> u64 {
    (sparsity * n as f64).round() as u64
}

/// The exact global selection of the `need` smallest kept magnitudes over groups visited in a
/// fixed order: a threshold key found by radix selection on the magnitude bits (two histogram
/// passes, 65,536 buckets each, no copy of the values) and how many entries equal to it to take,
/// which [`GlobalCut::apply`] takes in visiting order.
pub struct GlobalCut {
    threshold: u32,
    take_equal: u64,
    /// Nothing to prune (`need` = 0).
    none: bool,
}

impl GlobalCut {
    /// `each` calls its visitor with every group's values and keep flags, in order.
    pub fn find<E>(
        need: u64,
        mut each: impl FnMut(&mut dyn FnMut(&[f32], &[u8])) -> Result<(), E>,
    ) -> Result<GlobalCut, E> {
        if need == 0 {
            return Ok(GlobalCut { threshold: 0, take_equal: 0, none: true });
        }
        let mut high = vec![0u64; 1 << 16];
        each(&mut |v, k| kept_keys(v, k).for_each(|x| high[(x >> 16) as usize] += 1))?;
        let (bucket, below_bucket) = find_bucket(&high, need);
        let mut low = vec![0u64; 1 << 16];
        each(&mut |v, k| {
            kept_keys(v, k).filter(|x| x >> 16 == bucket as u32).for_each(|x| low[(x & 0xffff) as usize] += 1)
        })?;
        let (lo, below_lo) = find_bucket(&low, need - below_bucket);
        Ok(GlobalCut {
            threshold: ((bucket as u32) << 16) | lo as u32,
            take_equal: need - below_bucket - below_lo,
            none: false,
        })
    }

    /// Prunes one group (the next in visiting order).
    pub fn apply(&mut self, values: &[f32], keep: &mut [u8]) {
        if self.none {
            return;
        }
        for (x, m) in values.iter().zip(keep.iter_mut()) {
            if *m == 0 {
                continue;
            }
            let kx = key(*x);
            if kx < self.threshold {
                *m = 0;
            } else if kx == self.threshold && self.take_equal > 0 {
                *m = 0;
                self.take_equal -= 1;
            }
        }
    }
}

pub fn kept_keys<'a>(values: &'a [f32], keep: &'a [u8]) -> impl Iterator<Item = u32> + 'a {
    values.iter().zip(keep).filter(|(_, &m)| m == 1).map(|(x, _)| key(*x))
}

/// Prunes the smallest kept magnitudes across all groups together until `sparsity` of all their
/// weights are pruned (in-memory groups: per-tensor scope and the tests).
pub fn prune_groups(values: &[&[f32]], keep: &mut [Vec<u8>], sparsity: f64) {
    let n: usize = values.iter().map(|v| v.len()).sum();
    let pruned: u64 = keep.iter().map(|k| k.iter().filter(|&&x| x == 0).count() as u64).sum();
    let need = target_zeros(n, sparsity).saturating_sub(pruned);
    let Ok(mut cut) = GlobalCut::find::<Infallible>(need, |visit| {
        values.iter().zip(keep.iter()).for_each(|(v, k)| visit(v, k));
        Ok(())
    });
    for (v, k) in values.iter().zip(keep.iter_mut()) {
        cut.apply(v, k);
    }
}

/// The bucket in which the `need`-th smallest element (1-based) lies, and the count below it.
pub fn find_bucket(hist: &[u64], need: u64) -> (usize, u64) {
    let mut below = 0;
    for (b, &c) in hist.iter().enumerate() {
        if below + c >= need {
            return (b, below);
        }
        below += c;
    }
    (hist.len() - 1, below)
}

/// Per-row pruning: sorting is cheap for one row; ties go to the lower column.
pub fn prune_row(row: &[f32], keep: &mut [u8], sparsity: f64) {
    let pruned = keep.iter().filter(|&&x| x == 0).count() as u64;
    let need = target_zeros(row.len(), sparsity).saturating_sub(pruned) as usize;
    if need == 0 {
        return;
    }
    let mut order: Vec<(u32, usize)> =
        row.iter().enumerate().filter(|(i, _)| keep[*i] == 1).map(|(i, x)| (key(*x), i)).collect();
    order.select_nth_unstable(need - 1);
    for &(_, i) in &order[..need] {
        keep[i] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_selection_is_exact_with_ties_in_order() {
        let a = [0.5f32, -0.1, 0.1, 2.0];
        let b = [0.1f32, -3.0, 0.0, 0.2];
        let mut keep = vec![vec![1u8; 4], vec![1u8; 4]];
        prune_groups(&[&a, &b], &mut keep, 0.5); // 4 of 8: 0.0, then three of the 0.1 ties, in order
        assert_eq!(keep, vec![vec![1, 0, 0, 1], vec![0, 1, 0, 1]]);
        prune_groups(&[&a, &b], &mut keep, 0.75); // 2 more: 0.2 then 0.5
        assert_eq!(keep, vec![vec![0, 0, 0, 1], vec![0, 1, 0, 0]]);
        prune_groups(&[&a, &b], &mut keep, 0.25); // lower than achieved: nothing comes back
        assert_eq!(keep.iter().flatten().filter(|&&x| x == 0).count(), 6);
    }

    #[test]
    fn global_selection_matches_a_sort_on_random_data() {
        let mut s = crate::rng::SplitMix64::new(5);
        let vals: Vec<f32> = (0..10_000).map(|_| (s.next_u64() % 2001) as f32 / 1000.0 - 1.0).collect();
        for sparsity in [0.0, 0.013, 0.5, 0.9999, 1.0] {
            let mut keep = vec![vec![1u8; vals.len()]];
            prune_groups(&[&vals], &mut keep, sparsity);
            let mut order: Vec<(u32, usize)> = vals.iter().enumerate().map(|(i, x)| (key(*x), i)).collect();
            order.sort();
            let k = target_zeros(vals.len(), sparsity) as usize;
            let mut expect = vec![1u8; vals.len()];
            order[..k].iter().for_each(|&(_, i)| expect[i] = 0);
            assert_eq!(keep[0], expect, "sparsity {sparsity}");
        }
    }

    #[test]
    fn notebook_threshold_is_a_percentile_of_the_nonzeros() {
        // Nonzero magnitudes 1..=10 (the zeros are not counted): 30% → index 3 → 4.0.
        let a = [0.0f32, -1.0, 2.0, 3.0, 0.0];
        let b = [-4.0f32, 5.0, 6.0, 7.0, 8.0, 9.0, -10.0];
        assert_eq!(notebook_threshold(&[&a, &b], 0.3, 100, 0), (4.0, 10));
        // 100% → index min(10, 9) → the largest.
        assert_eq!(notebook_threshold(&[&a, &b], 1.0, 100, 0), (10.0, 10));
        // 0% → the smallest nonzero: the notebook prunes it too (|w| ≤ threshold).
        assert_eq!(notebook_threshold(&[&a, &b], 0.0, 100, 0).0, 1.0);
        assert_eq!(notebook_threshold(&[&[0.0f32][..]], 0.5, 100, 0), (0.0, 0));
    }

    #[test]
    fn notebook_sample_is_seeded_uniform_and_without_repeats() {
        let v: Vec<f32> = (1..=1000).map(|x| x as f32).collect();
        let (t1, n) = notebook_threshold(&[&v], 0.5, 200, 7);
        assert_eq!(n, 200);
        assert_eq!(notebook_threshold(&[&v], 0.5, 200, 7).0, t1, "seeded");
        assert!((350.0..650.0).contains(&t1), "a median estimate of 1..1000, got {t1}");
        assert_ne!(notebook_threshold(&[&v], 0.5, 200, 8).0, t1, "another seed, another sample");
    }

    #[test]
    fn rows_prune_independently() {
        let row = [3.0f32, -1.0, 0.5, 2.0];
        let mut keep = vec![1u8; 4];
        prune_row(&row, &mut keep, 0.5);
        assert_eq!(keep, [1, 0, 0, 1]);
    }
}
