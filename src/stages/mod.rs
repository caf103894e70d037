//! The concrete stage kinds: the only module that knows both the engine and the model.
//! A new kind is one file here plus one line in [`registry`].

mod builtin;
mod eval_ppl;
mod finetune;
mod generate;
mod hook_residuals;
mod load;
pub mod mask;
pub mod model_artifact;
mod perturb;
mod prune;
mod scoring;
mod text_param;

use crate::exec::Registry;

/// Every stage kind the shipped binary offers.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(load::Load)
        .register(prune::Prune)
        .register(eval_ppl::EvalPpl)
        .register(finetune::Finetune)
        .register(generate::Generate)
        .register(hook_residuals::HookResiduals)
        .register(perturb::Perturb);
    r
}
