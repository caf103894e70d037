//! The text-data layer: sources, the synthetic corpus, tokenisation, windows, training batches.

mod sources;
mod synthetic;
mod tokens;
mod wikitext;
mod windows;
