//! The two ways to get ∂L/∂θ for L(θ) = C(s*(θ)): equilibrium propagation's estimate from
//! nudged equilibria, and the true gradient by implicit differentiation (the adjoint system
//! H λ = ∂C/∂s solved by conjugate gradients; "backprop" in this setting).

use anyhow::{bail, Result};

use super::network::{Input, Network, State};
use super::relax::{relax, Nudge, Relax, Relaxed};

/// EP's estimate of ∂L/∂θ from the free equilibrium `free`: for the energy's parameters
/// one-sided (∂E/∂θ(s^β) − ∂E/∂θ(s^0)) / β, error O(β), or symmetric
/// (∂E/∂θ(s^β) − ∂E/∂θ(s^{−β})) / 2β, error O(β²); a readout's parameters, on which C depends
/// directly, get their exact local gradient ∂C/∂θ at s^0. The energy weights' update is its
/// negative, ΔW_l = (ρρᵀ nudged − ρρᵀ free)/β: the same shape as W_l by construction.
/// Returns the estimate and the nudged relaxations.
pub fn ep_gradient(
    net: &Network,
    x: &Input,
    target: usize,
    free: &State,
    beta: f64,
    symmetric: bool,
    cfg: &Relax,
) -> Result<(Network, Vec<Relaxed>)> {
    let nudged = |b: f64| -> Result<(State, Relaxed)> {
        let mut s = free.clone();
        let r = relax(net, x, Some(Nudge { target, beta: b }), &mut s, cfg)?;
        Ok((s, r))
    };
    let mut g = net.zeros_like();
    let (plus, rp) = nudged(beta)?;
    net.add_cost_grad_theta(free, target, 1.0, &mut g);
    if symmetric {
        let (minus, rm) = nudged(-beta)?;
        net.add_energy_grad_theta(x, &plus, 0.5 / beta, &mut g);
        net.add_energy_grad_theta(x, &minus, -0.5 / beta, &mut g);
        Ok((g, vec![rp, rm]))
    } else {
        net.add_energy_grad_theta(x, &plus, 1.0 / beta, &mut g);
        net.add_energy_grad_theta(x, free, -1.0 / beta, &mut g);
        Ok((g, vec![rp]))
    }
}

/// Conjugate gradients for H λ = b (H symmetric; positive definite at a strict minimum of E).
#[derive(Clone, Copy, Debug)]
pub struct Cg {
    /// Stop when ‖b − Hλ‖ ≤ tol·‖b‖.
    pub tol: f64,
    pub max_iter: usize,
}

fn dot(a: &State, b: &State) -> f64 {
    a.layers.iter().zip(&b.layers).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>()).sum()
}

/// a ← a + c·b
fn add(a: &mut State, c: f64, b: &State) {
    for (x, y) in a.layers.iter_mut().zip(&b.layers) {
        super::network::axpy(x, c, y);
    }
}

/// Solves H(s) λ = b by conjugate gradients; errors when H is not positive definite along a
/// search direction (s is not a strict minimum) or the iterations run out.
pub fn solve_adjoint(net: &Network, x: &Input, s: &State, b: &State, cg: &Cg) -> Result<(State, usize)> {
    let mut lambda = net.zero_state();
    let mut r = b.clone();
    let mut p = r.clone();
    let mut rr = dot(&r, &r);
    let bound = cg.tol * rr.sqrt();
    if rr.sqrt() <= bound || rr == 0.0 {
        return Ok((lambda, 0));
    }
    for it in 1..=cg.max_iter {
        let hp = net.hessian_vec(x, s, &p);
        let php = dot(&p, &hp);
        if php.is_nan() || php <= 0.0 {
            bail!("the Hessian of E is not positive definite at the free equilibrium (pᵀHp = {php:e}): the state is not a strict minimum; relax longer (more free_steps, smaller tolerance) or use smaller weights");
        }
        let alpha = rr / php;
        add(&mut lambda, alpha, &p);
        add(&mut r, -alpha, &hp);
        let rr_new = dot(&r, &r);
        if rr_new.sqrt() <= bound {
            return Ok((lambda, it));
        }
        let beta = rr_new / rr;
        for (pl, rl) in p.layers.iter_mut().zip(&r.layers) {
            for (pv, rv) in pl.iter_mut().zip(rl) {
                *pv = rv + beta * *pv;
            }
        }
        rr = rr_new;
    }
    bail!(
        "the adjoint system did not converge in {} conjugate-gradient iterations (residual {:e} of ‖b‖): raise the limit or relax the free phase more tightly",
        cg.max_iter,
        rr.sqrt() / (bound / cg.tol)
    )
}

/// The true dL/dθ = ∂C/∂θ − λᵀ ∂²E/∂s∂θ with H λ = ∂C/∂s at the free equilibrium `free`
/// (which must be one: relax it tightly), and the conjugate-gradient iterations it took.
pub fn true_gradient(net: &Network, x: &Input, target: usize, free: &State, cg: &Cg) -> Result<(Network, usize)> {
    let b = net.cost_grad_s(free, target);
    let (lambda, iters) = solve_adjoint(net, x, free, &b, cg)?;
    let mut g = net.zeros_like();
    net.add_adjoint_grad(x, free, &lambda, 1.0, &mut g);
    net.add_cost_grad_theta(free, target, 1.0, &mut g);
    Ok((g, iters))
}
