//! Training batches: random windows of `seq_len + 1` tokens, chosen from (seed, step) alone.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::{error::DataError, rng::SplitMix64};

/// Draws the batches of a fine-tune. Batch `step` depends on `(seed, step)` and the token
/// stream only — no generator state is carried from one step to the next — so a run resumed
/// at step `k` sees exactly the batches an uninterrupted run would.
#[derive(Debug, Clone)]
pub struct TrainBatches {
    tokens: Arc<Vec<u32>>,
    seq_len: usize,
    batch: usize,
    seed: u64,
}

/// One training step's data: `batch` rows of `seq_len` inputs and their next-token targets,
/// flattened row-major (ready for a `[batch, seq_len]` tensor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    /// `batch * seq_len` input ids: row `r` is `tokens[offsets[r] .. offsets[r] + seq_len]`.
    pub input_ids: Vec<u32>,
    /// `batch * seq_len` targets: the same windows shifted by one token.
    pub targets: Vec<u32>,
    /// Where each row starts in the token stream.
    pub offsets: Vec<usize>,
}

impl TrainBatches {
    pub fn new(tokens: Arc<Vec<u32>>, seq_len: usize, batch: usize, seed: u64) -> Result<Self> {
        if seq_len == 0 || batch == 0 {
            bail!("seq_len and batch must be positive (got {seq_len} and {batch})");
        }
        if tokens.len() < seq_len + 1 {
            return Err(DataError::TooShort {
                what: format!("training windows of seq_len {seq_len} + 1"),
                have: tokens.len(),
                need: seq_len + 1,
            }
            .into());
        }
        Ok(Self { tokens, seq_len, batch, seed })
    }

    /// The start offsets of step `step`'s rows: each uniform in `0 ..= len - (seq_len + 1)`,
    /// drawn from `SplitMix64::keyed(seed, [step])`.
    pub fn offsets(&self, step: u64) -> Vec<usize> {
        let starts = (self.tokens.len() - self.seq_len) as u64; // number of valid offsets
        let mut rng = SplitMix64::keyed(self.seed, &[step]);
        (0..self.batch).map(|_| rng.below(starts) as usize).collect()
    }

    /// The batch of step `step`.
    pub fn get(&self, step: u64) -> Batch {
        let offsets = self.offsets(step);
        let mut input_ids = Vec::with_capacity(self.batch * self.seq_len);
        let mut targets = Vec::with_capacity(self.batch * self.seq_len);
        for &o in &offsets {
            input_ids.extend_from_slice(&self.tokens[o..o + self.seq_len]);
            targets.extend_from_slice(&self.tokens[o + 1..o + 1 + self.seq_len]);
        }
        Batch { batch: self.batch, seq_len: self.seq_len, input_ids, targets, offsets }
    }
}
