//! rpt-flow: declarative, cached LLM compression and analysis experiments.
//!
//! Layers (see docs/architecture.md): `spec` (the TOML language) → `plan` (DAG + cache keys)
//! → `exec` (runs a plan, owns the `Stage` trait) with `cache` (content-addressed store) beside
//! them; `stages` is the only module that knows both the engine and `model`.

pub mod analysis;
pub mod atomic_file;
pub mod cache;
pub mod cli;
pub mod data;
pub mod exec;
pub mod export;
pub mod hub;
pub mod model;
pub mod plan;
pub mod report;
pub mod rng;
pub mod session;
pub mod spec;
pub mod stages;
