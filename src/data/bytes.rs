//! How many bytes of text each token stands for, so that bits per byte can be computed over
//! exactly the scored tokens (protocols that drop the tail or score half a window cover less
//! than the whole text).

use std::collections::HashSet;

use anyhow::{bail, Result};
use tokenizers::{pre_tokenizers::byte_level::ByteLevel, Tokenizer};

use super::windows::Window;

/// UTF-8 bytes of text that each token id stands for, indexed by id, for byte-level BPE
/// tokenizers (GPT-2, Llama 3 / BitNet, [`super::train_bpe`]): a vocabulary token is written in
/// the byte-level alphabet, one character per byte; a special added token stands for no text
/// (0); a non-special added token for its content. Errors for a tokenizer whose vocabulary is
/// not byte-level (e.g. SentencePiece), where tokens do not map to bytes this simply.
pub fn token_bytes(tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let added = tokenizer.get_added_tokens_decoder();
    let vocab = tokenizer.get_vocab(true);
    let size = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
    let mut out = vec![0u32; size];
    for (token, id) in vocab {
        out[id as usize] = match added.get(&id) {
            Some(t) if t.special => 0,
            Some(t) => t.content.len() as u32,
            None => {
                if let Some(c) = token.chars().find(|c| !alphabet.contains(c)) {
                    bail!(
                        "token {id} ({token:?}) has {c:?}, outside the byte-level alphabet: not a byte-level tokenizer"
                    );
                }
                token.chars().count() as u32
            }
        };
    }
    Ok(out)
}

/// Total bytes of the tokens the windows score (see [`token_bytes`]); ids beyond the table
/// count 0.
pub fn scored_bytes(windows: &[Window], token_bytes: &[u32]) -> u64 {
    windows
        .iter()
        .flat_map(|w| w.target_ids())
        .map(|&id| token_bytes.get(id as usize).copied().unwrap_or(0) as u64)
        .sum()
}
