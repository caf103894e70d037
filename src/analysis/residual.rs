//! Residual-stream corrections c = h_out − h_in per layer: statistics and pruning interventions.
//!
//! Definitions (per layer, over every token of every window):
//! - `mean_abs_c`: mean of |c| over all entries;
//! - `zero_fraction`: fraction of entries with c exactly 0; `near_zero_fraction`: fraction with
//!   |c| ≤ `rel_tol` · ‖h_in‖/√d for its token (small relative to the typical entry of h_in);
//! - `max_abs_c`: max |c|;
//! - `branching_ratio`: per text (window), mean over its tokens of ‖h_out‖ divided by mean over
//!   its tokens of ‖h_in‖ (a ratio of means, the criticality notebook's), averaged over texts;
//!   `correction_ratio` likewise with ‖c‖;
//! - `branching_ratio_token_mean`, `correction_ratio_token_mean`: mean over all tokens of
//!   ‖h_out‖/‖h_in‖ and ‖c‖/‖h_in‖;
//! - `branching_ratio_of_means`, `correction_ratio_of_means`: pooled over every token of every
//!   text, mean‖h_out‖ / mean‖h_in‖ and mean‖c‖ / mean‖h_in‖;
//! - `mean_norm_in`, `mean_norm_out`: mean per-token norms.
//!
//! A text ends with [`LayerAccumulator::end_text`]. Tokens with ‖h_in‖ = 0 are left out of the
//! per-token ratios (counted in `skipped_tokens`); a text whose mean ‖h_in‖ is 0, of the per-text.

use serde::Serialize;

use super::norm;

#[derive(Clone, Debug, Default)]
pub struct LayerAccumulator {
    hidden: usize,
    rel_tol: f64,
    entries: u64,
    sum_abs_c: f64,
    zeros: u64,
    near_zeros: u64,
    max_abs_c: f64,
    tokens: u64,
    skipped: u64,
    sum_corr_ratio: f64,
    sum_branch_ratio: f64,
    sum_norm_c: f64,
    sum_norm_in: f64,
    sum_norm_out: f64,
    /// The open text: Σ‖h_in‖, Σ‖h_out‖, Σ‖c‖ and tokens.
    text: [f64; 4],
    texts: u64,
    sum_text_branch: f64,
    sum_text_corr: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerStats {
    pub mean_abs_c: f64,
    pub zero_fraction: f64,
    pub near_zero_fraction: f64,
    pub max_abs_c: f64,
    pub correction_ratio: f64,
    pub correction_ratio_token_mean: f64,
    pub correction_ratio_of_means: f64,
    pub branching_ratio: f64,
    pub branching_ratio_token_mean: f64,
    pub branching_ratio_of_means: f64,
    pub mean_norm_in: f64,
    pub mean_norm_out: f64,
    pub tokens: u64,
    pub texts: u64,
    pub skipped_tokens: u64,
}

impl LayerAccumulator {
    pub fn new(hidden: usize, rel_tol: f64) -> LayerAccumulator {
        LayerAccumulator { hidden, rel_tol, ..Default::default() }
    }

    /// Adds tokens: `h_in` and `h_out` are `[tokens, hidden]`.
    pub fn add(&mut self, h_in: &[f32], h_out: &[f32]) {
        assert_eq!(h_in.len(), h_out.len(), "h_in and h_out differ in size");
        assert_eq!(h_in.len() % self.hidden, 0, "not a whole number of tokens");
        let d = self.hidden;
        for (xi, xo) in h_in.chunks_exact(d).zip(h_out.chunks_exact(d)) {
            let n_in = norm(xi);
            let n_out = norm(xo);
            let tol = self.rel_tol * n_in / (d as f64).sqrt();
            let mut n_c2 = 0.0;
            for (&a, &b) in xi.iter().zip(xo) {
                let c = b as f64 - a as f64;
                let ac = c.abs();
                self.sum_abs_c += ac;
                self.max_abs_c = self.max_abs_c.max(ac);
                if c == 0.0 {
                    self.zeros += 1;
                }
                if ac <= tol {
                    self.near_zeros += 1;
                }
                n_c2 += c * c;
            }
            let n_c = n_c2.sqrt();
            self.entries += d as u64;
            self.tokens += 1;
            self.sum_norm_c += n_c;
            self.sum_norm_in += n_in;
            self.sum_norm_out += n_out;
            self.text[0] += n_in;
            self.text[1] += n_out;
            self.text[2] += n_c;
            self.text[3] += 1.0;
            if n_in > 0.0 {
                self.sum_corr_ratio += n_c / n_in;
                self.sum_branch_ratio += n_out / n_in;
            } else {
                self.skipped += 1;
            }
        }
    }

    /// Closes the current text: its ratios of means join the per-text averages.
    pub fn end_text(&mut self) {
        let [n_in, n_out, n_c, tokens] = std::mem::take(&mut self.text);
        if tokens > 0.0 && n_in > 0.0 {
            self.sum_text_branch += n_out / n_in;
            self.sum_text_corr += n_c / n_in;
            self.texts += 1;
        }
    }

    /// The statistics so far (an open text is closed first).
    pub fn finish(&self) -> LayerStats {
        let mut acc = self.clone();
        acc.end_text();
        let e = acc.entries.max(1) as f64;
        let t = acc.tokens.max(1) as f64;
        let rated = (acc.tokens - acc.skipped).max(1) as f64;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        LayerStats {
            mean_abs_c: acc.sum_abs_c / e,
            zero_fraction: acc.zeros as f64 / e,
            near_zero_fraction: acc.near_zeros as f64 / e,
            max_abs_c: acc.max_abs_c,
            correction_ratio: ratio(acc.sum_text_corr, acc.texts as f64),
            correction_ratio_token_mean: acc.sum_corr_ratio / rated,
            correction_ratio_of_means: ratio(acc.sum_norm_c, acc.sum_norm_in),
            branching_ratio: ratio(acc.sum_text_branch, acc.texts as f64),
            branching_ratio_token_mean: acc.sum_branch_ratio / rated,
            branching_ratio_of_means: ratio(acc.sum_norm_out, acc.sum_norm_in),
            mean_norm_in: acc.sum_norm_in / t,
            mean_norm_out: acc.sum_norm_out / t,
            tokens: acc.tokens,
            texts: acc.texts,
            skipped_tokens: acc.skipped,
        }
    }
}

/// The p-th percentile (0–100) of a row's |values|, linear interpolation between order
/// statistics (numpy's default).
pub fn abs_percentile(row: &[f32], p: f64) -> f32 {
    assert!(!row.is_empty(), "percentile of an empty row");
    let mut v: Vec<f32> = row.iter().map(|x| x.abs()).collect();
    v.sort_by(f32::total_cmp);
    let pos = (p.clamp(0.0, 100.0) / 100.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = (pos - lo as f64) as f32;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// What an intervention did to a correction: `masked` entries lay below the cut (exact zeros
/// included: the predictive-coding notebook's "% zeroed"), `zeroed` nonzero entries were set to 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    pub masked: u64,
    pub zeroed: u64,
}

impl std::ops::Add for Cut {
    type Output = Cut;
    fn add(self, o: Cut) -> Cut {
        Cut { masked: self.masked + o.masked, zeroed: self.zeroed + o.zeroed }
    }
}

/// Zeroes entries of `c` with |c| < `threshold`.
pub fn zero_below_threshold(c: &mut [f32], threshold: f32) -> Cut {
    let mut cut = Cut::default();
    for x in c.iter_mut() {
        if x.abs() < threshold {
            cut.masked += 1;
            if *x != 0.0 {
                *x = 0.0;
                cut.zeroed += 1;
            }
        }
    }
    cut
}

/// Per token (`[tokens, hidden]`): zeroes the entries whose |c| is below that token's p-th
/// percentile of |c|. Entries equal to the percentile are kept, so p = 0 changes nothing; p = 100
/// zeroes the whole correction (the maximum too).
pub fn zero_below_token_percentile(c: &mut [f32], hidden: usize, p: f64) -> Cut {
    let mut cut = Cut::default();
    for row in c.chunks_exact_mut(hidden) {
        cut = cut
            + if p >= 100.0 {
                let zeroed = row.iter().filter(|x| **x != 0.0).count() as u64;
                row.fill(0.0);
                Cut { masked: row.len() as u64, zeroed }
            } else {
                let t = abs_percentile(row, p);
                zero_below_threshold(row, t)
            };
    }
    cut
}

/// Over the whole tensor (the predictive-coding notebook's `quantile(|c|, p/100)` over a layer's
/// `[batch, seq, hidden]` correction): zeroes the entries below the p-th percentile of all |c|;
/// entries at or above it are kept (at p = 100 only the largest survive).
pub fn zero_below_tensor_percentile(c: &mut [f32], p: f64) -> Cut {
    let t = abs_percentile(c, p);
    zero_below_threshold(c, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_a_hand_made_layer() {
        // Two tokens, d = 2. Token 1: h_in (3,4) → h_out (3,4): c = 0. Token 2: (1,0) → (1,2): c = (0,2).
        let mut acc = LayerAccumulator::new(2, 0.0);
        acc.add(&[3.0, 4.0, 1.0, 0.0], &[3.0, 4.0, 1.0, 2.0]);
        let s = acc.finish();
        assert_eq!(s.tokens, 2);
        assert_eq!(s.mean_abs_c, 0.5); // (0+0+0+2)/4
        assert_eq!(s.zero_fraction, 0.75);
        assert_eq!(s.max_abs_c, 2.0);
        assert_eq!(s.correction_ratio_token_mean, 1.0); // (0/5 + 2/1)/2
        assert!((s.correction_ratio_of_means - 2.0 / 6.0).abs() < 1e-12);
        let b2 = 5f64.sqrt();
        assert!((s.branching_ratio_token_mean - (1.0 + b2) / 2.0).abs() < 1e-12);
        assert!((s.branching_ratio_of_means - (5.0 + b2) / 6.0).abs() < 1e-12);
        // One text: the per-text ratio of means is the pooled one.
        assert_eq!(s.texts, 1);
        assert_eq!(s.branching_ratio, s.branching_ratio_of_means);
        assert_eq!(s.mean_norm_in, 3.0);
    }

    #[test]
    fn per_text_ratios_of_means_are_averaged_over_texts() {
        // Text 1: ‖in‖ 1, 1 and ‖out‖ 2, 4 → 3; text 2: ‖in‖ 2, ‖out‖ 2 → 1. Average 2; pooled
        // (2+4+2)/(1+1+2) = 2 as well, so use a third token to tell them apart.
        let mut acc = LayerAccumulator::new(1, 0.0);
        acc.add(&[1.0, 1.0], &[2.0, 4.0]);
        acc.end_text();
        acc.add(&[2.0, 6.0], &[2.0, 6.0]);
        let s = acc.finish();
        assert_eq!(s.texts, 2);
        assert_eq!(s.branching_ratio, (3.0 + 1.0) / 2.0);
        assert_eq!(s.branching_ratio_of_means, 14.0 / 10.0);
        assert_eq!(s.branching_ratio_token_mean, (2.0 + 4.0 + 1.0 + 1.0) / 4.0);
        assert_eq!(s.correction_ratio, (2.0 + 0.0) / 2.0); // text 1: (1+3)/2 over 1
    }

    #[test]
    fn near_zero_uses_a_tolerance_relative_to_the_token() {
        let mut acc = LayerAccumulator::new(2, 0.1);
        // ‖h_in‖ = 10·√2 → tol = 0.1·10 = 1: c = (0.5, 3) → one near zero, none exactly zero.
        acc.add(&[10.0, 10.0], &[10.5, 13.0]);
        let s = acc.finish();
        assert_eq!(s.zero_fraction, 0.0);
        assert_eq!(s.near_zero_fraction, 0.5);
    }

    #[test]
    fn zero_input_tokens_are_not_divided_by() {
        let mut acc = LayerAccumulator::new(2, 0.0);
        acc.add(&[0.0, 0.0, 1.0, 0.0], &[1.0, 0.0, 2.0, 0.0]);
        let s = acc.finish();
        assert_eq!(s.skipped_tokens, 1);
        assert_eq!(s.branching_ratio_token_mean, 2.0);
        assert!(s.correction_ratio_token_mean.is_finite());
    }

    #[test]
    fn percentiles_interpolate_and_handle_ties() {
        let row = [-4.0, 1.0, 3.0, -2.0];
        assert_eq!(abs_percentile(&row, 0.0), 1.0);
        assert_eq!(abs_percentile(&row, 100.0), 4.0);
        assert_eq!(abs_percentile(&row, 50.0), 2.5);
        assert!((abs_percentile(&row, 60.0) - 2.8).abs() < 1e-6);
        let ties = [2.0, -2.0, 2.0, 2.0];
        assert_eq!(abs_percentile(&ties, 50.0), 2.0);
        let mut c = ties;
        assert_eq!(zero_below_token_percentile(&mut c, 4, 50.0).zeroed, 0, "ties at the percentile are kept");
    }

    #[test]
    fn token_percentile_pruning_at_the_extremes() {
        let mut c = [1.0, -3.0, 0.5, 2.0, /* token 2 */ 0.0, 4.0, -1.0, 1.0];
        let orig = c;
        assert_eq!(zero_below_token_percentile(&mut c, 4, 0.0), Cut::default());
        assert_eq!(c, orig);
        // token 1: p50 of [0.5, 1, 2, 3] is 1.5 → two zeroed; token 2: p50 of [0, 1, 1, 4] is 1 → only the
        // entry already at 0 lies below, so nothing new is zeroed.
        // The natural zero of token 2 counts as masked (the notebook's measure), not as zeroed.
        assert_eq!(zero_below_token_percentile(&mut c, 4, 50.0), Cut { masked: 3, zeroed: 2 });
        assert_eq!(c, [0.0, -3.0, 0.0, 2.0, 0.0, 4.0, -1.0, 1.0]);
        let mut d = orig;
        assert_eq!(zero_below_token_percentile(&mut d, 4, 100.0), Cut { masked: 8, zeroed: 7 });
        assert!(d.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn absolute_threshold_zero_changes_nothing() {
        let mut c = [1e-9, -1e-12, 0.0, 5.0];
        assert_eq!(zero_below_threshold(&mut c, 0.0), Cut::default());
        assert_eq!(zero_below_threshold(&mut c, 1e-6), Cut { masked: 3, zeroed: 2 });
        assert_eq!(c, [0.0, 0.0, 0.0, 5.0]);
    }

    #[test]
    fn tensor_percentile_pools_every_token() {
        // |c| over both tokens: [1, 3, 0.5, 2, 0, 4, 1, 1]; sorted [0, .5, 1, 1, 1, 2, 3, 4];
        // p50 at position 3.5 → 1.0: entries below 1 (0.5 and the natural 0) are masked.
        let mut c = [1.0, -3.0, 0.5, 2.0, 0.0, 4.0, -1.0, 1.0];
        assert_eq!(zero_below_tensor_percentile(&mut c, 50.0), Cut { masked: 2, zeroed: 1 });
        assert_eq!(c, [1.0, -3.0, 0.0, 2.0, 0.0, 4.0, -1.0, 1.0]);
        let mut d = [1.0, -3.0, 0.5, 2.0];
        assert_eq!(zero_below_tensor_percentile(&mut d, 100.0), Cut { masked: 3, zeroed: 3 });
        assert_eq!(d, [0.0, -3.0, 0.0, 0.0], "p100 keeps the largest, as quantile(1.0) = max");
    }
}
