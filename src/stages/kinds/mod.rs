//! One module per stage kind: its schema, typed parameters and `Stage` impl.

pub mod bench_forward;
pub mod eval_ppl;
pub mod eval_tasks;
pub mod finetune;
pub mod generate;
pub mod hook_residuals;
pub mod load;
pub mod perturb;
pub mod prune;
pub mod swap_attention;
pub mod train_ep;
