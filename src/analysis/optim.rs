//! The fine-tune's optimiser arithmetic on plain numbers.
//!
//! Learning-rate schedules: `cosine` is torch's CosineAnnealingLR with T_max = steps:
//! lr_t = eta_min + (lr − eta_min)·(1 + cos(π·t/steps))/2 for step t = 0..steps−1; `constant`
//! keeps lr. An optional linear warmup multiplies by (t+1)/warmup for the first `warmup` steps.
//!
//! Global-norm clipping (torch's `clip_grad_norm_`): from the gradients' squared norms, the
//! factor they are scaled by.

/// The learning rate of step `t` (0-based) of `steps`.
pub fn lr_at(schedule: &str, lr: f64, eta_min: f64, warmup: u64, steps: u64, t: u64) -> f64 {
    let base = match schedule {
        "cosine" => eta_min + (lr - eta_min) * (1.0 + (std::f64::consts::PI * t as f64 / steps as f64).cos()) / 2.0,
        _ => lr,
    };
    if t < warmup {
        base * (t + 1) as f64 / warmup as f64
    } else {
        base
    }
}

/// The factor that clips gradients with these squared norms (each summed in f32, accumulated
/// here in f64, in order) to a global norm of `max_norm`: `max_norm / (norm + 1e-6)` when the
/// norm exceeds it, `None` (leave them) otherwise.
pub fn clip_scale(squared_norms: impl IntoIterator<Item = f64>, max_norm: f64) -> Option<f64> {
    let mut sq = 0f64;
    for s in squared_norms {
        sq += s;
    }
    let norm = sq.sqrt();
    (norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_lr_and_halves_midway() {
        assert_eq!(lr_at("cosine", 1.0, 0.0, 0, 100, 0), 1.0);
        assert!((lr_at("cosine", 1.0, 0.0, 0, 100, 50) - 0.5).abs() < 1e-12);
        assert!((lr_at("cosine", 1.0, 0.1, 0, 100, 100) - 0.1).abs() < 1e-12);
        assert_eq!(lr_at("constant", 0.3, 0.0, 0, 100, 77), 0.3);
        assert!((lr_at("constant", 1.0, 0.0, 4, 100, 0) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_only_above_the_norm() {
        assert_eq!(clip_scale([9.0, 16.0], 5.0), None);
        assert_eq!(clip_scale([9.0, 16.0], 10.0), None);
        assert_eq!(clip_scale([9.0, 16.0], 1.0), Some(1.0 / (5.0 + 1e-6)));
        assert_eq!(clip_scale([], 1.0), None);
    }
}
