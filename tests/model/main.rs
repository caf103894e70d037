//! The model (BitNet b1.58 / Llama in candle): parity with transformers, quantisation, training,
//! checkpoint io, generation and hooks. One test binary (one link of the crate).

mod common;
mod generate;
mod gguf;
mod holographic;
mod io;
mod parity;
mod quant;
mod train;
