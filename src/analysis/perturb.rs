//! Perturbation growth through the layers: the seeded Gaussian noise, relative deviations δ_l,
//! amplification, the Lyapunov exponent estimate, and branching-ratio summaries.

use serde::Serialize;

use super::norm;
use crate::rng::SplitMix64;

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

/// ‖noisy − clean‖_F / ‖clean‖_F over a whole `[tokens, hidden]` output (the criticality
/// notebook's δ); `None` when the clean output is all zeros.
pub fn frobenius_deviation(clean: &[f32], noisy: &[f32]) -> Option<f64> {
    assert_eq!(clean.len(), noisy.len());
    let n = norm(clean);
    let d = clean.iter().zip(noisy).map(|(&x, &y)| ((y as f64) - (x as f64)).powi(2)).sum::<f64>().sqrt();
    (n > 0.0).then_some(d / n)
}

/// How a perturbation grows through the layers. `delta[0]` is the deviation at the embedding
/// output, `delta[l + 1]` at the output of decoder layer l (L layers).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Growth {
    pub delta: Vec<f64>,
    /// Index into `delta` of the largest δ (0 = embeddings, l + 1 = layer l).
    pub peak_layer: usize,
    /// δ at the last layer's output over δ at layer 0's output (the notebook's convention;
    /// 1 when there is nothing to amplify or only one layer).
    pub amplification: f64,
    /// λ = (ln δ_last − ln δ_layer0) / (L − 1): the notebook's estimate (0 where undefined).
    pub lyapunov: f64,
    /// The same from the embedding output: δ_last / δ_embedding and ln(δ_last/δ_embedding) / L.
    pub amplification_from_embedding: f64,
    pub lyapunov_from_embedding: f64,
    /// ln(δ_{i+1}/δ_i) for consecutive boundaries (0 where both are 0).
    pub local_exponents: Vec<f64>,
}

/// Growth from `delta` (embedding output, then each layer's output).
pub fn growth(delta: &[f64]) -> Growth {
    assert!(delta.len() >= 2, "need δ at the embedding and at least one layer");
    let last = delta[delta.len() - 1];
    let peak_layer = delta.iter().enumerate().fold(0, |best, (i, &d)| if d > delta[best] { i } else { best });
    let log_ratio = |a: f64, b: f64| if a == 0.0 && b == 0.0 { 0.0 } else { (b / a).ln() };
    // From δ_first to δ_last over `steps` layers; (1, 0) when δ_first is 0 or there is no step.
    let rate = |first: f64, steps: usize| {
        if first == 0.0 || steps == 0 {
            (1.0, 0.0)
        } else {
            (last / first, (last / first).ln() / steps as f64)
        }
    };
    let layers = delta.len() - 1;
    let (amplification, lyapunov) = rate(delta[1], layers - 1);
    let (amplification_from_embedding, lyapunov_from_embedding) = rate(delta[0], layers);
    Growth {
        delta: delta.to_vec(),
        peak_layer,
        amplification,
        lyapunov,
        amplification_from_embedding,
        lyapunov_from_embedding,
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

/// Standard normal deviates by the Box–Muller transform on SplitMix64 uniforms.
struct Gaussian {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Gaussian {
    fn new(rng: SplitMix64) -> Gaussian {
        Gaussian { rng, spare: None }
    }

    fn next(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] (never 0, so the log is finite), u2 in [0, 1).
        let u1 = ((self.rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// The noise for one window's embedding output `x` (`[tokens, hidden]`, f32): per token, i.i.d.
/// N(0, σ²) with σ = eps · RMS(token) (relative) or σ = eps (absolute).
pub fn noise(x: &[f32], hidden: usize, eps: f64, relative: bool, rng: SplitMix64) -> Vec<f32> {
    let mut g = Gaussian::new(rng);
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(hidden) {
        let sigma = if relative { eps * norm(row) / (hidden as f64).sqrt() } else { eps };
        out.extend((0..hidden).map(|_| (sigma * g.next()) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_growth_gives_its_rate_as_the_lyapunov_exponent() {
        let delta: Vec<f64> = (0..=4).map(|l| 0.01 * 2f64.powi(l)).collect();
        let g = growth(&delta);
        assert!((g.amplification_from_embedding - 16.0).abs() < 1e-9);
        assert!((g.lyapunov_from_embedding - 2f64.ln()).abs() < 1e-12);
        // From layer 0's output (δ = 0.02) to layer 3's (0.16): three steps.
        assert!((g.amplification - 8.0).abs() < 1e-9);
        assert!((g.lyapunov - 2f64.ln()).abs() < 1e-12);
        assert_eq!(g.peak_layer, 4);
        assert!(g.local_exponents.iter().all(|e| (e - 2f64.ln()).abs() < 1e-12));
    }

    #[test]
    fn the_notebook_convention_starts_at_layer_0_output() {
        // The report's numbers: δ after layer 0 = 0.0298, after layer 29 = 0.0282, and a much
        // smaller δ at the embedding: from layer 0 it shrinks (λ < 0), from the embedding it grows.
        let mut delta = vec![0.01, 0.0298];
        delta.extend((0..28).map(|_| 0.03));
        delta.push(0.0282);
        let g = growth(&delta);
        assert!((g.lyapunov - (0.0282f64 / 0.0298).ln() / 29.0).abs() < 1e-15);
        assert!((g.lyapunov - -0.0019).abs() < 1e-4, "{}", g.lyapunov);
        assert!((g.amplification - 0.946).abs() < 1e-3);
        assert!(g.lyapunov_from_embedding > 0.0);
        let one = growth(&[0.5, 0.2]);
        assert_eq!((one.amplification, one.lyapunov), (1.0, 0.0), "one layer: no step to measure");
    }

    #[test]
    fn frobenius_deviation_over_the_whole_output() {
        // ‖(0,1,0,0)‖ / ‖(3,4,1,0)‖ = 1/√26, not the mean of per-token ratios (0.1).
        let d = frobenius_deviation(&[3.0, 4.0, 1.0, 0.0], &[3.0, 5.0, 1.0, 0.0]).unwrap();
        assert!((d - 1.0 / 26f64.sqrt()).abs() < 1e-12);
        assert_eq!(frobenius_deviation(&[0.0, 0.0], &[1.0, 0.0]), None);
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

    #[test]
    fn box_muller_gives_standard_normals() {
        let mut g = Gaussian::new(SplitMix64::new(7));
        let z: Vec<f64> = (0..20000).map(|_| g.next()).collect();
        let mean = z.iter().sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        assert!(z.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn relative_noise_has_the_token_rms_times_eps() {
        let hidden = 4096;
        let x: Vec<f32> = (0..2 * hidden).map(|j| if j < hidden { 3.0 } else { 0.0 }).collect();
        let n = noise(&x, hidden, 0.01, true, SplitMix64::new(1));
        let rms = norm(&n[..hidden]) / (hidden as f64).sqrt();
        assert!((rms - 0.03).abs() < 0.002, "rms {rms}");
        assert!(n[hidden..].iter().all(|v| *v == 0.0), "a zero token gets no relative noise");
        assert_eq!(n, noise(&x, hidden, 0.01, true, SplitMix64::new(1)), "seeded");
    }
}
