//! Perturbation growth through the layers: relative deviations δ_l, amplification, the Lyapunov
//! exponent estimate, and branching-ratio summaries.

use serde::Serialize;

use super::norm;

/// Mean over tokens of ‖noisy − clean‖ / ‖clean‖ for `[tokens, hidden]` slices. Tokens with a zero
/// clean norm are skipped; returns (mean, tokens used).
pub fn relative_deviation(clean: &[f32], noisy: &[f32], hidden: usize) -> (f64, u64) {
    assert_eq!(clean.len(), noisy.len());
    let (mut sum, mut n) = (0.0, 0);
    for (a, b) in clean.chunks_exact(hidden).zip(noisy.chunks_exact(hidden)) {
        let na = norm(a);
        if na == 0.0 {
            continue;
        }
        let diff = a.iter().zip(b).map(|(&x, &y)| ((y as f64) - (x as f64)).powi(2)).sum::<f64>().sqrt();
        sum += diff / na;
        n += 1;
    }
    (if n == 0 { 0.0 } else { sum / n as f64 }, n)
}

/// How a perturbation grows from δ_0 (embedding output) to δ_L (last layer's output).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Growth {
    pub delta: Vec<f64>,
    /// Index of the largest δ (0 = embeddings).
    pub peak_layer: usize,
    /// δ_L / δ_0 (1 when δ_0 = 0: nothing to amplify).
    pub amplification: f64,
    /// λ = ln(δ_L/δ_0) / L (0 when δ_0 = 0).
    pub lyapunov: f64,
    /// ln(δ_{l+1}/δ_l) for l = 0..L-1 (0 where both are 0).
    pub local_exponents: Vec<f64>,
}

/// `delta[0]` is the deviation at the embedding output, `delta[l]` after layer l.
pub fn growth(delta: &[f64]) -> Growth {
    assert!(delta.len() >= 2, "need δ_0 and at least one layer");
    let layers = (delta.len() - 1) as f64;
    let (d0, dl) = (delta[0], delta[delta.len() - 1]);
    let peak_layer = delta.iter().enumerate().fold(0, |best, (i, &d)| if d > delta[best] { i } else { best });
    let log_ratio = |a: f64, b: f64| if a == 0.0 && b == 0.0 { 0.0 } else { (b / a).ln() };
    let (amplification, lyapunov) = if d0 == 0.0 { (1.0, 0.0) } else { (dl / d0, (dl / d0).ln() / layers) };
    Growth {
        delta: delta.to_vec(),
        peak_layer,
        amplification,
        lyapunov,
        local_exponents: delta.windows(2).map(|w| log_ratio(w[0], w[1])).collect(),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BranchingSummary {
    pub mean: f64,
    pub mean_without_first: f64,
    /// Layers with a ratio in [0.95, 1.05].
    pub near_critical_layers: usize,
}

pub fn branching_summary(ratios: &[f64]) -> BranchingSummary {
    let mean = |x: &[f64]| if x.is_empty() { f64::NAN } else { x.iter().sum::<f64>() / x.len() as f64 };
    BranchingSummary {
        mean: mean(ratios),
        mean_without_first: mean(ratios.get(1..).unwrap_or(&[])),
        near_critical_layers: ratios.iter().filter(|r| (0.95..=1.05).contains(*r)).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_growth_gives_its_rate_as_the_lyapunov_exponent() {
        let delta: Vec<f64> = (0..=4).map(|l| 0.01 * 2f64.powi(l)).collect();
        let g = growth(&delta);
        assert!((g.amplification - 16.0).abs() < 1e-9);
        assert!((g.lyapunov - 2f64.ln()).abs() < 1e-12);
        assert_eq!(g.peak_layer, 4);
        assert!(g.local_exponents.iter().all(|e| (e - 2f64.ln()).abs() < 1e-12));
    }

    #[test]
    fn no_perturbation_gives_zeros_not_nan() {
        let g = growth(&[0.0, 0.0, 0.0]);
        assert_eq!(g.amplification, 1.0);
        assert_eq!(g.lyapunov, 0.0);
        assert_eq!(g.local_exponents, vec![0.0, 0.0]);
        assert_eq!(g.peak_layer, 0);
    }

    #[test]
    fn relative_deviation_per_token() {
        // Token 1: clean (3,4), noisy (3,5): 1/5. Token 2: clean (1,0), noisy (1,0): 0.
        let (d, n) = relative_deviation(&[3.0, 4.0, 1.0, 0.0], &[3.0, 5.0, 1.0, 0.0], 2);
        assert_eq!(n, 2);
        assert!((d - 0.1).abs() < 1e-12);
        let (d0, _) = relative_deviation(&[1.0, 2.0], &[1.0, 2.0], 2);
        assert_eq!(d0, 0.0);
    }

    #[test]
    fn branching_summary_counts_near_critical_layers() {
        let s = branching_summary(&[3.0, 1.0, 0.96, 1.2]);
        assert!((s.mean - 6.16 / 4.0).abs() < 1e-12);
        assert!((s.mean_without_first - 3.16 / 3.0).abs() < 1e-12);
        assert_eq!(s.near_critical_layers, 2);
    }
}
