//! Tokenising a source's text once per (tokenizer, source), memoised for the whole process.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

use super::{hub::HubOptions, lines::py_strip, source::Source};

/// A tokenised source: its token ids and the UTF-8 byte count of the text they encode.
#[derive(Debug, Clone)]
pub struct TokenStream {
    pub ids: Arc<Vec<u32>>,
    /// Bytes of the source text (the denominator of bits per byte).
    pub bytes: usize,
}

/// (tokenizer id, source identity, how it was encoded).
type MemoKey = (String, String, String);

/// How a source's rows become one token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The rows joined with the source's join string and tokenised once, as one string (the
    /// Wanda/SparseGPT protocol).
    Joined,
    /// The RPT notebooks' rule: each row stripped (Python's `str.strip`), rows of fewer than
    /// `min_chars` characters (code points) skipped, every kept row tokenised on its own without
    /// special tokens, the ids concatenated with nothing between rows.
    PerRow { min_chars: usize },
}

impl Encoding {
    /// `joined` or `per-row` with its minimum row length.
    pub fn parse(name: &str, min_chars: usize) -> anyhow::Result<Encoding> {
        match name {
            "joined" => Ok(Encoding::Joined),
            "per-row" => Ok(Encoding::PerRow { min_chars }),
            other => anyhow::bail!("encode is \"joined\" or \"per-row\", not \"{other}\""),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Encoding::Joined => "joined",
            Encoding::PerRow { .. } => "per-row",
        }
    }
}

/// The rows of `source` as the per-row encoding keeps them: stripped, and at least `min_chars`
/// characters long.
pub fn stripped_rows(source: &Source, hub: &HubOptions, min_chars: usize) -> Result<Vec<String>> {
    let rows = source.rows_with(hub)?;
    Ok(rows.iter().map(|r| py_strip(r)).filter(|r| r.chars().count() >= min_chars).map(str::to_string).collect())
}

/// The first `count` rows whose stripped length is more than `longer_than` characters, each cut
/// to its first `cut` characters (the row as stored, not stripped): the RPT notebooks' texts
/// for per-text analyses.
pub fn long_rows(
    source: &Source,
    hub: &HubOptions,
    longer_than: usize,
    cut: usize,
    count: usize,
) -> Result<Vec<String>> {
    let rows = source.rows_with(hub)?;
    Ok(rows
        .iter()
        .filter(|r| py_strip(r).chars().count() > longer_than)
        .take(count)
        .map(|r| r.chars().take(cut).collect())
        .collect())
}

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
    let how = format!("joined:{add_special_tokens}");
    memoised((tokenizer_id.to_string(), source.identity()?.to_string(), how), || {
        let text = source.text_with(hub)?;
        let ids = encode_all(tokenizer, &text.text, add_special_tokens)?;
        Ok(TokenStream { ids: Arc::new(ids), bytes: text.bytes() })
    })
}

/// The token stream of `source` under `encoding` (without special tokens), memoised like
/// [`token_stream`]. For [`Encoding::PerRow`], `bytes` counts the kept rows' stripped bytes.
pub fn encoded_stream(
    source: &Source,
    hub: &HubOptions,
    tokenizer: &Tokenizer,
    tokenizer_id: &str,
    encoding: Encoding,
) -> Result<TokenStream> {
    let Encoding::PerRow { min_chars } = encoding else {
        return token_stream(source, hub, tokenizer, tokenizer_id, false);
    };
    let how = format!("per-row:{min_chars}");
    memoised((tokenizer_id.to_string(), source.identity()?.to_string(), how), || {
        let rows = stripped_rows(source, hub, min_chars)?;
        let mut ids = Vec::new();
        for row in &rows {
            ids.extend(encode_all(tokenizer, row, false)?);
        }
        Ok(TokenStream { ids: Arc::new(ids), bytes: rows.iter().map(String::len).sum() })
    })
}

fn memoised(key: MemoKey, make: impl FnOnce() -> Result<TokenStream>) -> Result<TokenStream> {
    static MEMO: OnceLock<Mutex<HashMap<MemoKey, TokenStream>>> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    if let Some(stream) = memo.lock().unwrap().get(&key) {
        return Ok(stream.clone());
    }
    let stream = make()?;
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
