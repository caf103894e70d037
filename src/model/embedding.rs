//! The token embedding `[vocab, hidden]`; an untied LM head is a matrix of the same shape and
//! kind (the tied head is the embedding itself).

use super::mode::Mode;
use super::vb::{Param, Role, Vb};
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use std::sync::{Arc, RwLock};

/// A `[vocab, hidden]` matrix: the embedding, or an untied LM head.
#[derive(Debug, Clone)]
pub(crate) struct Embedding {
    pub(crate) weight: Param,
    /// Inference-only cache of [`Embedding::exact_bf16`]: unchecked, or the answer.
    bf16: Arc<RwLock<Option<Option<Tensor>>>>,
}

impl Embedding {
    /// `weight [vocab, hidden]` under `vb` (`model.embed_tokens` or `lm_head`).
    pub(crate) fn load(mut vb: Vb<'_>, vocab: usize, hidden: usize) -> anyhow::Result<Self> {
        let weight = vb.param(&[vocab, hidden], "weight", Role::Embedding)?;
        Ok(Self { weight, bf16: Arc::new(RwLock::new(None)) })
    }

    /// The matrix: the variable itself in training (gradients flow), a detached view otherwise
    /// (no graph is recorded).
    pub(crate) fn matrix(&self, mode: Mode) -> Tensor {
        self.weight.value(mode)
    }

    /// The matrix in bf16 if that is exact — an f32 CPU matrix whose every value is a bf16 value,
    /// as when a bf16 hub checkpoint is loaded in f32 — else `None`. The generation head streams
    /// it instead of the f32 matrix: half the bytes, the same products. Cached; see
    /// [`Embedding::invalidate`].
    pub(crate) fn exact_bf16(&self) -> Result<Option<Tensor>> {
        if let Some(answer) = self.bf16.read().expect("embedding cache lock").as_ref() {
            return Ok(answer.clone());
        }
        let w = self.weight.var.as_detached_tensor();
        let exact = w.device().is_cpu() && w.dtype() == DType::F32 && {
            let w = w.contiguous()?;
            let (storage, layout) = w.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                // A bf16 value is an f32 whose low 16 bits are zero.
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => v[a..b].iter().all(|x| x.to_bits() & 0xffff == 0),
                _ => false,
            }
        };
        let answer = if exact { Some(w.to_dtype(DType::BF16)?) } else { None };
        *self.bf16.write().expect("embedding cache lock") = Some(answer.clone());
        Ok(answer)
    }

    /// Drop the cached bf16 copy (call after the weight was changed).
    pub(crate) fn invalidate(&self) {
        *self.bf16.write().expect("embedding cache lock") = None;
    }
}
