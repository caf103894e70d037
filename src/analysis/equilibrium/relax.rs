//! Relaxation: gradient descent of the state on F = E + β·C until it stops moving.
//!
//! A step is s ← s − η·∂F/∂s. Training drives hidden units into saturation and strengthens the
//! symmetric feedback, which raises the curvature of E; once η exceeds 2 / the largest
//! curvature, fixed-η descent oscillates forever instead of settling (seen on byte-level runs
//! after a few dozen updates). So a step that would raise F is retried at half the step size,
//! kept for the rest of that relaxation: F never rises, and with η small enough nothing is
//! halved and the iteration is exactly the plain one.

use anyhow::{bail, Result};

use super::network::{Input, Network, State};

/// How a phase relaxes: s ← s − η·∂F/∂s until a step of size η would move no unit by `tol`
/// or more, or `max_steps` steps were taken.
#[derive(Clone, Copy, Debug)]
pub struct Relax {
    pub eta: f64,
    pub max_steps: usize,
    pub tol: f64,
}

/// How a relaxation ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Relaxed {
    /// Steps taken (accepted).
    pub steps: usize,
    /// η·max|∂F/∂s| < tol at the end (else the step budget ran out, or F could not be lowered
    /// further in floating point).
    pub converged: bool,
    /// How often η was halved because a step would have raised F.
    pub halvings: usize,
}

/// A nudge towards the target: F = E + β·C(y, target).
#[derive(Clone, Copy, Debug)]
pub struct Nudge {
    pub target: usize,
    pub beta: f64,
}

/// F and ∂F/∂s at s.
pub fn f_and_grad(net: &Network, x: &Input, nudge: Option<Nudge>, s: &State) -> (f64, State) {
    let (mut f, mut g) = net.energy_and_grad(x, s);
    if let Some(n) = nudge {
        f += n.beta * net.cost(s, n.target);
        let c = net.cost_grad_s(s, n.target);
        for (gl, cl) in g.layers.iter_mut().zip(&c.layers) {
            super::network::axpy(gl, n.beta, cl);
        }
    }
    (f, g)
}

fn max_abs(g: &State) -> f64 {
    g.layers.iter().flatten().fold(0.0, |m, v| m.max(v.abs()))
}

/// s − η·g
fn stepped(s: &State, eta: f64, g: &State) -> State {
    let layers = s.layers.iter().zip(&g.layers).map(|(sl, gl)| sl.iter().zip(gl).map(|(v, d)| v - eta * d).collect());
    State { layers: layers.collect() }
}

/// Relaxes `s` in place; `observe` sees the state after every step (the energy test watches it).
pub fn relax_observed(
    net: &Network,
    x: &Input,
    nudge: Option<Nudge>,
    s: &mut State,
    cfg: &Relax,
    mut observe: impl FnMut(&State),
) -> Result<Relaxed> {
    let (mut f, mut g) = f_and_grad(net, x, nudge, s);
    let mut eta = cfg.eta;
    let mut out = Relaxed { steps: 0, converged: false, halvings: 0 };
    while out.steps < cfg.max_steps {
        let m = max_abs(&g);
        if !(f.is_finite() && m.is_finite()) {
            bail!("relaxation diverged (F = {f}, max|∂F/∂s| = {m}) after {} steps: lower eta or lr", out.steps);
        }
        if cfg.eta * m < cfg.tol {
            out.converged = true;
            return Ok(out);
        }
        // Rounding: near a minimum F changes by less than its last bits; such a step is no rise.
        let slack = 1e-12 * (1.0 + f.abs());
        loop {
            let trial = stepped(s, eta, &g);
            let (ft, gt) = f_and_grad(net, x, nudge, &trial);
            if ft <= f + slack {
                (*s, f, g) = (trial, ft, gt);
                break;
            }
            eta *= 0.5;
            out.halvings += 1;
            if eta < cfg.eta * 1e-12 {
                return Ok(out); // F cannot be lowered along −∂F/∂s in floating point
            }
        }
        out.steps += 1;
        observe(s);
    }
    out.converged = cfg.eta * max_abs(&g) < cfg.tol;
    Ok(out)
}

/// Relaxes `s` in place.
pub fn relax(net: &Network, x: &Input, nudge: Option<Nudge>, s: &mut State, cfg: &Relax) -> Result<Relaxed> {
    relax_observed(net, x, nudge, s, cfg, |_| {})
}

/// The free phase: from the feedforward guess to the equilibrium s* of E alone.
pub fn free_phase(net: &Network, x: &Input, cfg: &Relax) -> Result<(State, Relaxed)> {
    let mut s = net.feedforward(x);
    let r = relax(net, x, None, &mut s, cfg)?;
    Ok((s, r))
}
