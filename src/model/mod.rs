//! BitNet b1.58 and Llama in candle. Knows nothing of the engine.
//!
//! See `docs/model.md` for the public API and the parity contract with transformers.
//!
//! Dependencies run one way: `config`, `mode`, `quant`, `train_ops`, `pack`, `rope`, `hooks`, `vb` (names)
//! → the layers (`norm`, `embedding`, `bitlinear` → `attention` (+ `attention_kernel`), `mlp` → `block`) →
//! `causal_lm` → `io` (load from a directory, random init, save) → `hub` (`Model::load` from
//! `hf:` sources); `generate`, `kv_cache`, `loss`, `adamw`, `tokenizer` sit beside `causal_lm`. Each
//! layer loads itself from a name prefix (`vb.rs`), so every checkpoint name is written once.

pub mod adamw;
pub mod attention;
mod attention_kernel;
pub mod bitlinear;
pub mod block;
pub mod causal_lm;
pub mod config;
mod cpu_values;
mod embedding;
mod expf;
pub mod generate;
mod head_kernel;
mod head_tiles;
pub mod holographic;
pub mod hooks;
pub mod hub;
pub mod io;
pub mod kv_cache;
pub mod loss;
pub mod mlp;
mod mlp_kernel;
pub mod mode;
pub mod norm;
pub mod pack;
pub mod quant;
pub mod rope;
mod simd;
pub mod ternary_kernel;
pub mod tokenizer;
pub mod train_ops;
mod vb;

pub use causal_lm::Model;
pub use config::{Activation, Arch, ModelConfig, Quantization, WeightFormat};
pub use generate::{GenerateOptions, Generation, Sampling, StopReason};
pub use holographic::HoloConfig;
pub use hooks::{HookPoint, Hooks};
pub use io::LoadOptions;
pub use kv_cache::KvCache;
pub use loss::{causal_lm_loss, cross_entropy, next_token_targets};
pub use mode::Mode;
pub use tokenizer::{Bos, TextTokenizer};
