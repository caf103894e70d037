//! Learning-rate schedules. `cosine` is torch's CosineAnnealingLR with T_max = steps:
//! lr_t = eta_min + (lr − eta_min)·(1 + cos(π·t/steps))/2 for step t = 0..steps−1; `constant`
//! keeps lr. An optional linear warmup multiplies by (t+1)/warmup for the first `warmup` steps.

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
}
