//! Helpers several stage kinds share: opening and writing model artifacts, masks, text
//! parameters and scoring windows, the builtin models.

pub mod builtin;
pub mod generation;
pub mod mask;
pub mod model_artifact;
pub mod residual_tap;
pub mod scoring;
pub mod text_param;
