//! The token embedding `[vocab, hidden]`; an untied LM head is a matrix of the same shape and
//! kind (the tied head is the embedding itself).

use super::mode::Mode;
use super::vb::{Param, Role, Vb};
use candle_core::Tensor;

/// A `[vocab, hidden]` matrix: the embedding, or an untied LM head.
#[derive(Debug, Clone)]
pub(crate) struct Embedding {
    pub(crate) weight: Param,
}

impl Embedding {
    /// `weight [vocab, hidden]` under `vb` (`model.embed_tokens` or `lm_head`).
    pub(crate) fn load(mut vb: Vb<'_>, vocab: usize, hidden: usize) -> anyhow::Result<Self> {
        Ok(Self { weight: vb.param(&[vocab, hidden], "weight", Role::Embedding)? })
    }

    /// The matrix: the variable itself in training (gradients flow), a detached view otherwise
    /// (no graph is recorded).
    pub(crate) fn matrix(&self, mode: Mode) -> Tensor {
        match mode {
            Mode::Infer => self.weight.var.as_detached_tensor(),
            Mode::Train => self.weight.var.as_tensor().clone(),
        }
    }
}
