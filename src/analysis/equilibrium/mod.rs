//! Equilibrium propagation (Scellier & Bengio 2017) on a layered continuous Hopfield network, in
//! plain f64 (docs/equilibrium.md has the maths and the measurements).
//!
//! State s = (s_1..s_L hidden, y = s_{L+1} output) with the input x clamped. Energy
//! E(s) = ½Σ‖s_l‖² − Σ_l ρ(s_l)ᵀ W_l ρ(s_{l−1}) − Σ_l b_lᵀ ρ(s_l), ρ = tanh on hidden layers, the
//! identity on the output and on x. Cost C = cross-entropy of softmax(y). The free phase relaxes
//! s to a minimum s* of E; the nudged phase relaxes on F = E + βC from s*. EP's estimate of
//! ∂L/∂θ for L(θ) = C(s*(θ)) is the difference of ∂E/∂θ between the two equilibria over β
//! ([`gradient::ep_gradient`]); the true gradient comes from implicit differentiation
//! ([`gradient::true_gradient`]), against which EP is tested and compared.

pub mod bytes;
pub mod gradient;
pub mod network;
pub mod relax;
pub mod train;

#[cfg(test)]
mod tests;

pub use gradient::{ep_gradient, solve_adjoint, true_gradient, Cg};
pub use network::{cross_entropy, cross_entropy_grad, Input, Network, Output, State};
pub use relax::{free_phase, relax, relax_observed, Nudge, Relax, Relaxed};
pub use train::{
    batch_gradient, mean_cost, AdjointCounts, Agreement, BatchOutcome, Example, Method, Optimizer, PhaseCounts,
    Settings,
};
