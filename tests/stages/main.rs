//! The model stages end to end through the shipped binary: shipped pipelines under their tiny
//! profiles, pruning exactness, fine-tuning, hub loading, perplexity parity with transformers.

#[path = "../support/mod.rs"]
mod support;

mod builtin;
mod equilibrium;
mod finetune;
mod hub;
mod kernel_isa;
mod keys_golden;
mod logs;
mod mock_hub;
mod notebook_parity;
mod perturb;
mod pipelines;
mod ppl_parity;
mod prune;
mod residuals;
mod tasks_parity;
