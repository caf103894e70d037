//! Text data: where experiment text comes from and how it is cut into model inputs.
//!
//! The layer is independent of the engine: it never imports `spec`, `plan`, `cache`, `exec`,
//! `model` or `stages`. The stages use it in four steps (docs/data.md has the full reference):
//!
//! 1. [`Source::from_value`] parses a pipeline's `data = ...` value (a local file or directory,
//!    a WikiText hub name, or `synthetic:<name>`); [`Source::identity`] is what goes into a
//!    stage's cache key.
//! 2. [`Source::text`] gives the exact string that is tokenised (rows joined as the
//!    Wanda/SparseGPT protocol does for WikiText), memoised per process.
//! 3. [`tokens`] tokenises that string once per (tokenizer, source), memoised per process.
//! 4. [`windows`] cuts a token stream into evaluation windows for a perplexity protocol;
//!    [`TrainBatches`] draws training batches that depend on (seed, step) alone.
//!
//! Besides: the synthetic facts world ([`synthetic`]) with its prompt set, and a byte-level
//! BPE trainer ([`train_bpe`]) for tiny builtin models.

mod bpe;
mod bytes;
mod error;
mod file;
mod hub;
mod lines;
mod parquet_io;
mod source;
pub mod synthetic;
pub mod task_hub;
pub mod tasks;
mod text;
mod tokens;
mod train;
mod windows;

pub use crate::rng::SplitMix64;
pub use bpe::{train_bpe, BOS_TOKEN, EOS_TOKEN};
pub use bytes::{scored_bytes, token_bytes};
pub use error::DataError;
pub use hub::{HubOptions, WikiText, WIKITEXT_REPO, WIKITEXT_REVISION};
pub use lines::{hf_text_rows, join_rows, py_strip};
pub use parquet_io::{read_rows, read_text_column, write_rows, write_text_column};
pub use source::{is_wikitext_file_name, RowMode, Source, DEFAULT_JOIN};
pub use text::Text;
pub use tokens::{encoded_stream, long_rows, stripped_rows, token_stream, tokens, Encoding, TokenStream};
pub use train::{Batch, ChunkBatches, TrainBatches};
pub use windows::{
    chunks, llama_cpp, rolling, rpt_notebook, text_windows, windows, Bos, Protocol, Window, WindowOptions,
};
