//! Pure maths for the analysis stages, on plain slices: perplexity accumulation, residual-stream
//! statistics and interventions, perturbation growth and the Lyapunov estimate. Activations are
//! row-major `[tokens, hidden]` slices. Knows nothing of the engine or the model.

pub mod perplexity;
pub mod perturb;
pub mod residual;
pub mod text;

/// Euclidean norm of a row, accumulated in f64.
pub fn norm(row: &[f32]) -> f64 {
    row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}
