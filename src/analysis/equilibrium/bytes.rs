//! Next-byte prediction as examples for the network: the previous `context` bytes, one-hot and
//! concatenated, clamp the input (`context · 256` units, `context` of them on); the byte itself
//! is the target output unit. Bytes keep the experiment independent of any tokenizer or model.

use super::train::Example;
use crate::rng::SplitMix64;

/// Output units (and one-hot width per context byte).
pub const VOCAB: usize = 256;

/// The example predicting `bytes[pos]` from the `context` bytes before it (`pos ≥ context`).
pub fn example_at(bytes: &[u8], pos: usize, context: usize) -> Example {
    let input = (0..context).map(|c| (c * VOCAB + bytes[pos - context + c] as usize, 1.0)).collect();
    Example { input, target: bytes[pos] as usize }
}

/// Training batch `step`: `batch` positions drawn uniformly from (seed, step) alone, so every
/// method sees the same batches whatever it did before.
pub fn batch_at(bytes: &[u8], context: usize, batch: usize, seed: u64, step: u64) -> Vec<Example> {
    let mut rng = SplitMix64::keyed(seed, &[0xBA7C, step]);
    (0..batch).map(|_| example_at(bytes, context + rng.index(bytes.len() - context), context)).collect()
}

/// `count` evaluation examples at evenly spaced positions over the whole text (all of them when
/// it has fewer), so a held-out text is sampled end to end, not only its first article.
pub fn spread_examples(bytes: &[u8], context: usize, count: usize) -> Vec<Example> {
    let n = bytes.len().saturating_sub(context);
    let count = count.min(n);
    (0..count).map(|i| example_at(bytes, context + i * n / count, context)).collect()
}

/// Perplexity of the examples' targets under the add-one-smoothed byte frequencies of `train`:
/// the bar a model that ignores its context sets.
pub fn unigram_ppl(train: &[u8], examples: &[Example]) -> f64 {
    let mut counts = [1.0f64; VOCAB];
    for &b in train {
        counts[b as usize] += 1.0;
    }
    let total: f64 = counts.iter().sum();
    let nll: f64 = examples.iter().map(|e| -(counts[e.target] / total).ln()).sum();
    (nll / examples.len().max(1) as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_one_hot_contexts_and_the_next_byte() {
        let e = example_at(b"abcd", 3, 2);
        assert_eq!(e.input, vec![(b'b' as usize, 1.0), (VOCAB + b'c' as usize, 1.0)]);
        assert_eq!(e.target, b'd' as usize);
    }

    #[test]
    fn batches_depend_on_seed_and_step_only() {
        let text = b"the quick brown fox jumps over the lazy dog";
        let a = batch_at(text, 3, 5, 1, 7);
        let b = batch_at(text, 3, 5, 1, 7);
        assert_eq!(a.iter().map(|e| e.target).collect::<Vec<_>>(), b.iter().map(|e| e.target).collect::<Vec<_>>());
        let c = batch_at(text, 3, 5, 1, 8);
        assert_ne!(a.iter().map(|e| &e.input).collect::<Vec<_>>(), c.iter().map(|e| &e.input).collect::<Vec<_>>());
    }

    #[test]
    fn evaluation_spans_the_text_and_the_unigram_bar_is_a_perplexity() {
        let text = b"aaaaaaaaab";
        let ex = spread_examples(text, 1, 100);
        assert_eq!(ex.len(), 9, "every position once when the text is short");
        assert_eq!(ex.last().unwrap().target, b'b' as usize);
        let spread = spread_examples(text, 1, 3);
        assert_eq!(spread.iter().map(|e| e.target).collect::<Vec<_>>(), [b'a' as usize; 3]);
        let p = unigram_ppl(text, &ex);
        assert!(p > 1.0 && p < 256.0, "{p}");
    }
}
