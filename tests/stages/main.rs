//! The model stages end to end through the shipped binary: shipped pipelines under their tiny
//! profiles, pruning exactness, perplexity parity.

#[path = "../support/mod.rs"]
mod support;

mod perturb;
mod pipelines;
mod prune;
mod residuals;
