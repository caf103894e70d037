//! Which forward path to run.

/// The forward path.
///
/// `Infer` may use candle's fused ops (which have no backward) and caches quantised weights;
/// `Train` uses only ops with a backward and straight-through estimators for both quantisers.
/// Both give the same logits (tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Infer,
    Train,
}
