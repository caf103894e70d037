//! KV-cached decoding: greedy or sampled (temperature, top-p, seed), stop tokens, max_new_tokens.

use super::causal_lm::Model;
use super::hooks::Hooks;
use super::kv_cache::KvCache;
use super::tokenizer::{Bos, TextTokenizer};
use crate::rng::SplitMix64;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Token selection.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Argmax (first index on ties, like `torch.argmax`).
    Greedy,
    /// Softmax(logits / temperature), nucleus `top_p` (1.0 = off), seeded SplitMix64.
    Sample { temperature: f64, top_p: f64, seed: u64 },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after emitting any of these (the stop token is included in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 32, sampling: Sampling::Greedy, stop_tokens: vec![] }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    StopToken(u32),
    MaxNewTokens,
    /// `max_position_embeddings` reached.
    ContextFull,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The new tokens (not the prompt).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// The new tokens decoded, special tokens skipped (only from [`Model::generate_text`]).
    pub text: Option<String>,
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(v: &[f32], temperature: f64, top_p: f64, rng: &mut SplitMix64) -> u32 {
    if temperature <= 0.0 {
        return argmax(v);
    }
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(usize, f64)> =
        v.iter().enumerate().map(|(i, &x)| (i, ((x as f64 - max) / temperature).exp())).collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = 0;
        for (_, q) in &p {
            keep += 1;
            cum += q;
            if cum >= top_p {
                break;
            }
        }
        p.truncate(keep.max(1));
    }
    let z: f64 = p.iter().map(|x| x.1).sum();
    let mut r = rng.next_f64() * z;
    for (i, q) in &p {
        if r < *q {
            return *i as u32;
        }
        r -= q;
    }
    p.last().map(|x| x.0 as u32).unwrap_or(0)
}

impl Model {
    /// Generate up to `max_new_tokens` after `prompt` with a KV cache (batch 1).
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut hooks: Option<&mut Hooks<'_>>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            bail!("generate: empty prompt");
        }
        let max_pos = self.cfg.max_position_embeddings;
        if prompt.len() > max_pos {
            bail!("prompt of {} tokens exceeds max_position_embeddings {max_pos}", prompt.len());
        }
        let mut rng = match opts.sampling {
            Sampling::Sample { seed, .. } => SplitMix64::new(seed),
            Sampling::Greedy => SplitMix64::new(0),
        };
        let mut cache = KvCache::new(self.num_layers());
        let mut input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let mut tokens = Vec::new();
        let stop = loop {
            if tokens.len() >= opts.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            if cache.seq_len() + input.dim(1)? > max_pos {
                break StopReason::ContextFull;
            }
            let logits = self.forward_cached(&input, &mut cache, hooks.as_deref_mut())?;
            let last = logits.squeeze(0)?.get(input.dim(1)? - 1)?.flatten_all()?.to_vec1::<f32>()?;
            let next = match &opts.sampling {
                Sampling::Greedy => argmax(&last),
                Sampling::Sample { temperature, top_p, .. } => sample(&last, *temperature, *top_p, &mut rng),
            };
            tokens.push(next);
            if opts.stop_tokens.contains(&next) {
                break StopReason::StopToken(next);
            }
            input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
        };
        Ok(Generation { tokens, stop, text: None })
    }

    /// Encode `prompt` (with the given BOS policy), generate, and decode the new tokens. The
    /// tokenizer's stop ids (EOS, `<|eot_id|>`) are added to `opts.stop_tokens`.
    pub fn generate_text(
        &self,
        tok: &TextTokenizer,
        prompt: &str,
        bos: Bos,
        opts: &GenerateOptions,
    ) -> Result<Generation> {
        let ids = tok.encode(prompt, bos)?;
        let mut opts = opts.clone();
        for s in tok.stop_ids() {
            if !opts.stop_tokens.contains(&s) {
                opts.stop_tokens.push(s);
            }
        }
        let mut g = self.generate(&ids, &opts, None)?;
        g.text = Some(tok.decode(&g.tokens, true)?);
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut rng = SplitMix64::new(7);
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p = 0.5 keeps only token 0.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        for _ in 0..50 {
            assert_eq!(sample(&logits, 1.0, 0.5, &mut rng), 0);
        }
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[sample(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 0), "{seen:?}");
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
