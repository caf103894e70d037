//! Tokenising a source's text once per (tokenizer, source), memoised for the whole process.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

use super::{hub::HubOptions, source::Source};

/// A tokenised source: its token ids and the UTF-8 byte count of the text they encode.
#[derive(Debug, Clone)]
pub struct TokenStream {
    pub ids: Arc<Vec<u32>>,
    /// Bytes of the source text (the denominator of bits per byte).
    pub bytes: usize,
}

/// (tokenizer id, source identity, add_special_tokens).
type MemoKey = (String, String, bool);

/// The token ids of `source`'s text (hub read as the environment says). See [`token_stream`].
pub fn tokens(
    source: &Source,
    tokenizer: &Tokenizer,
    tokenizer_id: &str,
    add_special_tokens: bool,
) -> Result<Arc<Vec<u32>>> {
    Ok(token_stream(source, &HubOptions::from_env(), tokenizer, tokenizer_id, add_special_tokens)?.ids)
}

/// Tokenises the source's whole text as one string (as the Wanda/SparseGPT protocol does),
/// once per (`tokenizer_id`, source identity, `add_special_tokens`) in this process.
///
/// `tokenizer_id` must identify the tokenizer's behaviour (e.g. the blake3 of its
/// tokenizer.json); the caller vouches that equal ids mean equal tokenizers.
/// `add_special_tokens` is passed to the tokenizer: `true` lets its post-processor add what it
/// adds by default (a Llama tokenizer: one BOS at the start). The evaluation windows have their
/// own BOS policy, so `false` plus [`super::Bos`] is the usual choice. Truncation and padding
/// configured in the tokenizer are ignored.
pub fn token_stream(
    source: &Source,
    hub: &HubOptions,
    tokenizer: &Tokenizer,
    tokenizer_id: &str,
    add_special_tokens: bool,
) -> Result<TokenStream> {
    static MEMO: OnceLock<Mutex<HashMap<MemoKey, TokenStream>>> = OnceLock::new();
    let key = (tokenizer_id.to_string(), source.identity()?.to_string(), add_special_tokens);
    let memo = MEMO.get_or_init(Default::default);
    if let Some(stream) = memo.lock().unwrap().get(&key) {
        return Ok(stream.clone());
    }
    let text = source.text_with(hub)?;
    let ids = encode_all(tokenizer, &text.text, add_special_tokens)?;
    let stream = TokenStream { ids: Arc::new(ids), bytes: text.bytes() };
    memo.lock().unwrap().insert(key, stream.clone());
    Ok(stream)
}

/// Encodes `text` as one sequence, without truncation or padding.
pub(crate) fn encode_all(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
    let owned;
    let tokenizer = if tokenizer.get_truncation().is_some() || tokenizer.get_padding().is_some() {
        let mut t = tokenizer.clone();
        t.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        t.with_padding(None);
        owned = t;
        &owned
    } else {
        tokenizer
    };
    let encoding = tokenizer.encode_fast(text, add_special_tokens).map_err(|e| anyhow!("tokenising: {e}"))?;
    Ok(encoding.get_ids().to_vec())
}
