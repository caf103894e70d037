//! The engine end to end through its CLI, with toy stage kinds (tests/support/toy_stages.rs).

#[path = "../support/mod.rs"]
mod support;

mod cache_cmds;
mod cli_json;
mod concurrency;
mod devices;
mod export;
mod faults;
mod integrity;
mod keys;
mod plan;
mod resume;
mod run;
mod slurm;
mod validate;
