//! Text ↔ token ids with the `tokenizers` crate (tokenizer.json), and the BOS policy.
//!
//! BOS policy: [`TextTokenizer::encode`] never lets the tokenizer's post-processor add special
//! tokens; it prepends exactly one BOS when asked ([`Bos::Add`]) and the text does not already
//! start with it. This avoids the double BOS of chat-template + `add_special_tokens` (notes §7,
//! pitfall 7). [`Bos::AsTokenizer`] reproduces transformers' `add_special_tokens=True` exactly.

use super::config::ModelConfig;
use anyhow::{anyhow, Context, Result};
use std::path::Path;

/// Whether to start the sequence with BOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bos {
    /// Exactly one BOS at the start (the default for scoring and generation).
    Add,
    /// No BOS added.
    None,
    /// Whatever tokenizer.json's post-processor does (transformers' `add_special_tokens=True`).
    AsTokenizer,
}

/// A tokenizer with the model's special ids.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    /// End-of-sequence ids from config.json (`eos_token_id`, int or list).
    pub eos_ids: Vec<u32>,
    /// `<|eot_id|>` if the vocabulary has it (BitNet's chat turns end with it).
    pub eot_id: Option<u32>,
}

impl TextTokenizer {
    /// Load `dir/tokenizer.json`; special ids from `cfg` (falling back to the vocabulary).
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"), cfg)
    }

    pub fn from_file(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading {}", path.display()))?;
        let bos_id = cfg.bos_token_id.or_else(|| inner.token_to_id("<|begin_of_text|>"));
        let mut eos_ids = cfg.eos_token_ids.clone();
        if eos_ids.is_empty() {
            eos_ids.extend(inner.token_to_id("<|end_of_text|>"));
        }
        let eot_id = inner.token_to_id("<|eot_id|>");
        Ok(Self { inner, bos_id, eos_ids, eot_id })
    }

    /// Ids that end generation: every EOS id and `<|eot_id|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut v = self.eos_ids.clone();
        v.extend(self.eot_id);
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn encode(&self, text: &str, bos: Bos) -> Result<Vec<u32>> {
        let add_special = bos == Bos::AsTokenizer;
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow!("encoding: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if bos == Bos::Add {
            let b = self.bos_id.context("Bos::Add but the model has no bos_token_id")?;
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("decoding: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
