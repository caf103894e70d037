//! Training on a batch: the free phase of every example, the method's gradient (EP, symmetric
//! EP, or the true gradient), optionally EP's cosine to the true gradient on the same batch, and
//! the optimiser that applies it (the same for every method).

use std::time::Instant;

use anyhow::{bail, Result};

use super::gradient::{ep_gradient, true_gradient, Cg};
use super::network::Network;
use super::relax::{free_phase, Relax, Relaxed};

/// How the gradient is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Ep,
    EpSymmetric,
    /// The true gradient of C(s*) by implicit differentiation (recurrent backprop).
    Backprop,
}

impl Method {
    pub const NAMES: [&'static str; 3] = ["ep", "ep-symmetric", "backprop"];

    pub fn parse(name: &str) -> Result<Method> {
        Ok(match name {
            "ep" => Method::Ep,
            "ep-symmetric" => Method::EpSymmetric,
            "backprop" => Method::Backprop,
            other => bail!("method: \"{other}\" is not one of {}", Self::NAMES.join(", ")),
        })
    }
}

/// Everything a gradient step needs besides the data.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub method: Method,
    pub beta: f64,
    pub free: Relax,
    pub nudged: Relax,
    pub cg: Cg,
}

/// One training example: the clamped input (sparse) and the target output unit.
#[derive(Clone, Debug)]
pub struct Example {
    pub input: Vec<(usize, f64)>,
    pub target: usize,
}

/// Relaxation counts of a phase over many examples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseCounts {
    pub relaxations: u64,
    pub steps: u64,
    pub unconverged: u64,
    /// Relaxations that had to halve η (a step would have raised F).
    pub halved: u64,
}

impl PhaseCounts {
    pub fn add(&mut self, r: &Relaxed) {
        self.relaxations += 1;
        self.steps += r.steps as u64;
        self.unconverged += u64::from(!r.converged);
        self.halved += u64::from(r.halvings > 0);
    }
    pub fn merge(&mut self, o: &PhaseCounts) {
        self.relaxations += o.relaxations;
        self.steps += o.steps;
        self.unconverged += o.unconverged;
        self.halved += o.halved;
    }
}

/// Adjoint solves (true gradients) over many examples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdjointCounts {
    pub solves: u64,
    pub iterations: u64,
    /// Solves that failed (H not positive definite at an unconverged state, or CG ran out):
    /// that example is left out of the batch's true gradient.
    pub failed: u64,
}

impl AdjointCounts {
    pub fn merge(&mut self, o: &AdjointCounts) {
        self.solves += o.solves;
        self.iterations += o.iterations;
        self.failed += o.failed;
    }

    /// The true gradient of one example, or `None` (counted) when its solve fails.
    fn solve(&mut self, net: &Network, ex: &Example, s: &super::network::State, cg: &Cg) -> Option<Network> {
        self.solves += 1;
        match true_gradient(net, &ex.input, ex.target, s, cg) {
            Ok((g, it)) => {
                self.iterations += it as u64;
                Some(g)
            }
            Err(_) => {
                self.failed += 1;
                None
            }
        }
    }
}

/// EP's estimate against the true gradient on one batch (both batch means).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    pub cosine: f64,
    /// ‖EP estimate‖ / ‖true gradient‖.
    pub norm_ratio: f64,
}

/// What a batch gave.
#[derive(Clone, Debug)]
pub struct BatchOutcome {
    /// The batch mean of ∂L/∂θ as the method estimates it (backprop: over the examples whose
    /// adjoint solve succeeded).
    pub gradient: Network,
    /// Mean cost at the free equilibria (before the update).
    pub loss: f64,
    pub free: PhaseCounts,
    pub nudged: PhaseCounts,
    pub adjoint: AdjointCounts,
    /// With `compare` and an EP method, when every example's true gradient was solved.
    pub agreement: Option<Agreement>,
    /// Wall time of that comparison's extra true gradients (not part of the method's cost).
    pub check_seconds: f64,
}

/// The batch's gradient by `settings.method`; with `compare`, an EP method also computes the
/// true gradient on the same free equilibria and reports their agreement.
pub fn batch_gradient(net: &Network, batch: &[Example], settings: &Settings, compare: bool) -> Result<BatchOutcome> {
    let mut gradient = net.zeros_like();
    let mut truth = (compare && settings.method != Method::Backprop).then(|| net.zeros_like());
    let (mut free, mut nudged) = (PhaseCounts::default(), PhaseCounts::default());
    let mut adjoint = AdjointCounts::default();
    let (mut loss, mut used, mut truth_complete) = (0.0, 0usize, true);
    let mut check_seconds = 0.0;
    for ex in batch {
        let x = &ex.input[..];
        let (s, r) = free_phase(net, x, &settings.free)?;
        free.add(&r);
        loss += net.cost(&s, ex.target);
        match settings.method {
            Method::Backprop => {
                if let Some(g) = adjoint.solve(net, ex, &s, &settings.cg) {
                    gradient.add_scaled(1.0, &g);
                    used += 1;
                }
            }
            Method::Ep | Method::EpSymmetric => {
                let symmetric = settings.method == Method::EpSymmetric;
                let (g, rs) = ep_gradient(net, x, ex.target, &s, settings.beta, symmetric, &settings.nudged)?;
                rs.iter().for_each(|r| nudged.add(r));
                gradient.add_scaled(1.0, &g);
                used += 1;
                if let Some(t) = truth.as_mut() {
                    let started = Instant::now();
                    match adjoint.solve(net, ex, &s, &settings.cg) {
                        Some(g) => t.add_scaled(1.0, &g),
                        None => truth_complete = false,
                    }
                    check_seconds += started.elapsed().as_secs_f64();
                }
            }
        }
    }
    // Means (a zero gradient when every solve failed: the step then changes nothing).
    let mut mean = net.zeros_like();
    mean.add_scaled(1.0 / used.max(1) as f64, &gradient);
    let agreement = truth.filter(|_| truth_complete).map(|sum| {
        let mut t = net.zeros_like();
        t.add_scaled(1.0 / batch.len() as f64, &sum);
        let ratio = if t.norm() > 0.0 { mean.norm() / t.norm() } else { f64::NAN };
        Agreement { cosine: mean.cosine(&t), norm_ratio: ratio }
    });
    let loss = loss / batch.len() as f64;
    Ok(BatchOutcome { gradient: mean, loss, free, nudged, adjoint, agreement, check_seconds })
}

/// Mean cost at the free equilibria of `examples` (its exp is the perplexity).
pub fn mean_cost(net: &Network, examples: &[Example], free: &Relax) -> Result<(f64, PhaseCounts)> {
    let mut counts = PhaseCounts::default();
    let mut sum = 0.0;
    for ex in examples {
        let (s, r) = free_phase(net, &ex.input, free)?;
        counts.add(&r);
        sum += net.cost(&s, ex.target);
    }
    Ok((sum / examples.len().max(1) as f64, counts))
}

/// The optimiser, the same for every method: plain SGD, or Adam (β₁ 0.9, β₂ 0.999, ε 1e-8).
pub enum Optimizer {
    Sgd,
    Adam { m: Network, v: Network, t: i32 },
}

impl Optimizer {
    pub const NAMES: [&'static str; 2] = ["sgd", "adam"];

    pub fn new(name: &str, net: &Network) -> Result<Optimizer> {
        Ok(match name {
            "sgd" => Optimizer::Sgd,
            "adam" => Optimizer::Adam { m: net.zeros_like(), v: net.zeros_like(), t: 0 },
            other => bail!("optimizer: \"{other}\" is not one of {}", Self::NAMES.join(", ")),
        })
    }

    /// θ ← θ − lr · (the gradient, or Adam's normalised step).
    pub fn step(&mut self, net: &mut Network, grad: &Network, lr: f64) {
        match self {
            Optimizer::Sgd => net.add_scaled(-lr, grad),
            Optimizer::Adam { m, v, t } => {
                const B1: f64 = 0.9;
                const B2: f64 = 0.999;
                *t += 1;
                let (c1, c2) = (1.0 - B1.powi(*t), 1.0 - B2.powi(*t));
                let tensors = net.tensors_mut().zip(grad.tensors()).zip(m.tensors_mut().zip(v.tensors_mut()));
                for ((p, g), (m, v)) in tensors {
                    for i in 0..p.len() {
                        m[i] = B1 * m[i] + (1.0 - B1) * g[i];
                        v[i] = B2 * v[i] + (1.0 - B2) * g[i] * g[i];
                        p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
                    }
                }
            }
        }
    }
}
