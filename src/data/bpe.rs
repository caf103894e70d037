//! A byte-level BPE tokenizer trained on a corpus, for the builtin tiny models.

use anyhow::{anyhow, Result};
use tokenizers::{
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{BpeTrainerBuilder, BPE},
    models::TrainerWrapper,
    pre_tokenizers::byte_level::ByteLevel,
    processors::template::TemplateProcessing,
    AddedToken, Tokenizer,
};

/// The beginning-of-sequence token (id 0) of tokenizers made by [`train_bpe`].
pub const BOS_TOKEN: &str = "<s>";
/// The end-of-sequence token (id 1).
pub const EOS_TOKEN: &str = "</s>";

/// Trains a byte-level BPE tokenizer (GPT-2 style: ByteLevel pre-tokenizer without a prefix
/// space, ByteLevel decoder, the full 256-byte alphabet so that any text encodes) with
/// [`BOS_TOKEN`] = 0 and [`EOS_TOKEN`] = 1, on `texts` (each string one training sequence), up
/// to `vocab_size` entries (special tokens and the 256 bytes included). Its post-processor puts
/// BOS before a sequence when `add_special_tokens` is true, as Llama tokenizers do.
/// Deterministic: the same texts and vocab size give the same tokenizer.json.
pub fn train_bpe<S: AsRef<str> + Sync>(texts: &[S], vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < 258 {
        return Err(anyhow!("vocab_size must be at least 258 (2 special tokens + 256 bytes), not {vocab_size}"));
    }
    let special = vec![AddedToken::from(BOS_TOKEN, true), AddedToken::from(EOS_TOKEN, true)];
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.train(&mut trainer, texts.iter().map(|t| t.as_ref())).map_err(|e| anyhow!("training BPE: {e}"))?;
    let bos = tok.token_to_id(BOS_TOKEN).ok_or_else(|| anyhow!("BOS missing after training"))?;
    let single = format!("{BOS_TOKEN} $A");
    let pair = format!("{BOS_TOKEN} $A:0 $B:1");
    let processor = TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| anyhow!("{e}"))?
        .try_pair(pair.as_str())
        .map_err(|e| anyhow!("{e}"))?
        .special_tokens(vec![(BOS_TOKEN, bos)])
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    tok.with_post_processor(Some(processor));
    Ok(tok)
}
