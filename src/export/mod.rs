//! Getting a cached model out of the hashed cache in a form other tools load: a Hugging Face
//! directory (`hf`) with a model card (`card`) and machine-readable provenance (`provenance`).
//!
//! Like `stages/`, this module bridges the engine (the cache, session records) and the model;
//! the CLI builds a [`provenance::Provenance`] from a pipeline's plan or a session file and hands
//! it here. Nothing is computed from an entry before its files are re-hashed against the manifest.

pub mod card;
pub mod gguf;
pub mod hf;
pub mod outdir;
pub mod provenance;
