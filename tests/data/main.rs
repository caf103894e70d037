//! The text-data layer: sources, the synthetic corpus, tokenisation, windows, training batches.

#[path = "../support/mod.rs"]
mod support;

mod sources;
mod synthetic;
mod tokens;
mod wikitext;
mod windows;
