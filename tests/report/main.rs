//! Reports: golden markdown from committed session files, flat rows, plots that decode with the
//! expected number of series, and a tiny pipeline run reported end to end.
//!
//! Regenerate the golden markdown after an intended change with
//! `UPDATE_GOLDEN=1 cargo test --test report` and review the diff.

#[path = "../support/mod.rs"]
mod support;

mod end_to_end;
mod equilibrium;
mod font;
mod golden;
mod holographic;
mod plots;
