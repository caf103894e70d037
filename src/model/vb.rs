//! Checkpoint names: a dotted name prefix over a tensor source, in the manner of candle's
//! `VarBuilder::pp`.
//!
//! Each layer's `load` names its own tensors relative to the prefix it is handed (`q_proj`,
//! `weight`, …), so every checkpoint name is written once, in the layer that owns the tensor.
//! Everything else derives names from those `load` functions: the expected checkpoint layout
//! is what they ask a [`Recorder`] for, random initialisation is a source they draw from, and
//! saving, packing and listing projections read the names they stored in each [`Param`].

use super::mode::Mode;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use std::fmt::Display;

/// What a checkpoint tensor is; a source decides from it how to fill the tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// An RMSNorm gain (initialised to ones).
    Norm,
    /// The token embedding or an untied LM head `[vocab, hidden]`.
    Embedding,
    /// A full-precision (latent) projection matrix `[out, in]`.
    Projection,
    /// A packed projection's ternary codes: `[out, in]` in memory, `u8 [out/4, in]` in the file.
    Codes,
    /// A packed projection's per-tensor `weight_scale` (`[1]`).
    Scale,
    /// A holographic-attention tensor (always f32; made by swapping attention, never random).
    Holographic,
}

/// Where tensors come from.
pub(crate) trait Source {
    /// The tensor called `name`, of (in-memory) shape `shape`.
    fn get(&mut self, name: &str, shape: &[usize], role: Role) -> Result<Tensor>;
}

/// A tensor and its checkpoint name.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub name: String,
    pub var: Var,
}

impl Param {
    /// The tensor as a forward in `mode` multiplies by: the variable in training, so ops record
    /// it for the backward; its detached value in inference, so the forward records no graph
    /// (one that did kept all its activations alive until the output was dropped).
    pub fn value(&self, mode: Mode) -> Tensor {
        match mode {
            Mode::Infer => self.var.as_detached_tensor(),
            Mode::Train => self.var.as_tensor().clone(),
        }
    }
}

/// A name prefix over a source. `pp` descends one level.
pub(crate) struct Vb<'a> {
    src: &'a mut dyn Source,
    prefix: String,
    /// Ternary projections keep only the CPU kernel's packed weight (`bitlinear.rs`).
    pack_for_inference: bool,
}

impl<'a> Vb<'a> {
    pub fn root(src: &'a mut dyn Source) -> Self {
        Self::root_packing(src, false)
    }

    /// A root whose ternary projections are packed for CPU inference as they load.
    pub fn root_packing(src: &'a mut dyn Source, pack_for_inference: bool) -> Self {
        Self { src, prefix: String::new(), pack_for_inference }
    }

    pub fn packs_for_inference(&self) -> bool {
        self.pack_for_inference
    }

    fn join(&self, s: &dyn Display) -> String {
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        }
    }

    /// The builder for the sub-module `s` (`model` → `model.layers` → `model.layers.0`).
    pub fn pp(&mut self, s: impl Display) -> Vb<'_> {
        let prefix = self.join(&s);
        Vb { src: &mut *self.src, prefix, pack_for_inference: self.pack_for_inference }
    }

    /// The tensor `leaf` under this prefix as a variable, with its name.
    pub fn param(&mut self, shape: &[usize], leaf: &str, role: Role) -> Result<Param> {
        let name = self.join(&leaf);
        let t = self.src.get(&name, shape, role)?;
        Ok(Param { var: Var::from_tensor(&t)?, name })
    }
}

/// A source that hands out empty tensors and writes down what was asked for: the checkpoint
/// layout (name, in-memory shape, role) of whatever is built from it, in load order.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    pub asked: Vec<(String, Vec<usize>, Role)>,
}

impl Source for Recorder {
    fn get(&mut self, name: &str, shape: &[usize], role: Role) -> Result<Tensor> {
        self.asked.push((name.to_string(), shape.to_vec(), role));
        Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?)
    }
}
