//! Pure maths for the stages, on plain slices: perplexity accumulation, residual-stream
//! statistics and interventions, perturbation noise and growth and the Lyapunov estimate,
//! magnitude pruning's selection, name globs, and the fine-tune's learning-rate schedule and
//! gradient clipping. Activations are row-major `[tokens, hidden]` slices. Knows nothing of the
//! engine or the model.

pub mod equilibrium;
pub mod glob;
pub mod magnitude;
pub mod multiple_choice;
pub mod optim;
pub mod perplexity;
pub mod perturb;
pub mod residual;
pub mod text;

/// Euclidean norm of a row, accumulated in f64.
pub fn norm(row: &[f32]) -> f64 {
    row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}
