//! Per-layer key/value cache for incremental decoding.

use candle_core::Tensor;

/// Keys and values of every layer for the positions seen so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    seq_len: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], seq_len: 0 }
    }

    /// Number of cached positions (the position of the next token).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub(crate) fn slot(&mut self, layer: usize) -> &mut Option<(Tensor, Tensor)> {
        &mut self.layers[layer]
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.seq_len += t;
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|s| *s = None);
        self.seq_len = 0;
    }
}
