//! BitNet b1.58 and Llama in candle. Knows nothing of the engine.
