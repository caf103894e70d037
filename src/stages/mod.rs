//! The concrete stage kinds: the only module that knows both the engine and the model.
//! `kinds/` holds one file (or folder) per kind; `common/` the helpers several kinds share.
//! A new kind is one file in `kinds/` plus one line in [`registry`].

mod common;
mod kinds;

pub use common::{mask, model_artifact};

use crate::exec::Registry;

/// Every stage kind the shipped binary offers.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(kinds::load::Load)
        .register(kinds::prune::Prune)
        .register(kinds::eval_ppl::EvalPpl)
        .register(kinds::finetune::Finetune)
        .register(kinds::generate::Generate)
        .register(kinds::hook_residuals::HookResiduals)
        .register(kinds::perturb::Perturb);
    r
}
