//! Training batches chosen from (seed, step) alone: random windows of `seq_len + 1` tokens
//! ([`TrainBatches`]), or the RPT notebooks' draw with replacement from fixed chunks
//! ([`ChunkBatches`]).

use std::sync::Arc;

use anyhow::{bail, Result};

use super::error::DataError;
use crate::rng::SplitMix64;

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

/// The RPT notebooks' batches: the stream cut into non-overlapping chunks of `chunk` tokens at
/// `range(0, n - chunk, chunk)`; each step draws `batch` chunks uniformly WITH replacement
/// (from `SplitMix64::keyed(seed, [step])`, so a resumed run sees the same draws). A chunk is its
/// own input and labels, so it trains on `chunk - 1` next-token targets.
#[derive(Debug, Clone)]
pub struct ChunkBatches {
    tokens: Arc<Vec<u32>>,
    chunk: usize,
    chunks: usize,
    batch: usize,
    seed: u64,
}

impl ChunkBatches {
    pub fn new(tokens: Arc<Vec<u32>>, chunk: usize, batch: usize, seed: u64) -> Result<Self> {
        if chunk < 2 || batch == 0 {
            bail!("chunks need at least 2 tokens and batch must be positive (got {chunk} and {batch})");
        }
        let chunks = tokens.len().saturating_sub(1) / chunk; // #{i in range(0, n - chunk, chunk)}
        if chunks == 0 {
            return Err(DataError::TooShort {
                what: format!("training chunks of {chunk} tokens"),
                have: tokens.len(),
                need: chunk + 1,
            }
            .into());
        }
        Ok(Self { tokens, chunk, chunks, batch, seed })
    }

    /// How many chunks there are to draw from.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// The batch of step `step`: rows of `chunk - 1` inputs and their targets.
    pub fn get(&self, step: u64) -> Batch {
        let mut rng = SplitMix64::keyed(self.seed, &[step]);
        let offsets: Vec<usize> = (0..self.batch).map(|_| rng.index(self.chunks) * self.chunk).collect();
        let len = self.chunk - 1;
        let mut input_ids = Vec::with_capacity(self.batch * len);
        let mut targets = Vec::with_capacity(self.batch * len);
        for &o in &offsets {
            input_ids.extend_from_slice(&self.tokens[o..o + len]);
            targets.extend_from_slice(&self.tokens[o + 1..o + 1 + len]);
        }
        Batch { batch: self.batch, seq_len: len, input_ids, targets, offsets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_batches_draw_whole_chunks_with_replacement() {
        // 12 tokens, chunks of 4 at range(0, 8, 4) = [0, 4]: the last full chunk is not used.
        let b = ChunkBatches::new(Arc::new((0..12).collect()), 4, 64, 3).unwrap();
        assert_eq!(b.chunks(), 2);
        let batch = b.get(5);
        assert_eq!(batch.seq_len, 3);
        assert!(batch.offsets.iter().all(|o| *o == 0 || *o == 4));
        assert!(batch.offsets.contains(&0) && batch.offsets.contains(&4), "64 draws from 2 chunks repeat");
        let r = batch.offsets.iter().position(|o| *o == 4).unwrap();
        assert_eq!(&batch.input_ids[r * 3..r * 3 + 3], &[4, 5, 6]);
        assert_eq!(&batch.targets[r * 3..r * 3 + 3], &[5, 6, 7]);
        assert_eq!(b.get(5), batch, "a step's batch depends on (seed, step) alone");
        assert!(ChunkBatches::new(Arc::new((0..4).collect()), 4, 1, 0).is_err());
    }
}
