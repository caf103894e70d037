//! The concrete stage kinds: the only module that knows both the engine and the model.
//! A new kind is one file here plus one line in [`registry`].

mod builtin;
mod eval_ppl;
mod generate;
mod load;
pub mod model_artifact;
mod prune;
mod scoring;

use crate::exec::Registry;

/// Every stage kind the shipped binary offers.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(load::Load).register(prune::Prune).register(eval_ppl::EvalPpl).register(generate::Generate);
    r
}
