//! The Hugging Face hub environment, read in one place for models and datasets alike, as
//! huggingface_hub reads it: the cache is `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE` (`1`, `ON`, `YES`, `TRUE`, any case) never
//! touches the network; `HF_TOKEN`, else the token file in `HF_HOME`; `HF_ENDPOINT`.
//! Knows nothing of the engine.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use hf_hub::{api::sync::ApiBuilder, Cache};

/// Where and how hub files are found.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub token: Option<String>,
    pub endpoint: Option<String>,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let cache = match std::env::var_os("HF_HUB_CACHE") {
            Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
            _ => Cache::from_env(),
        };
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        Self { cache_dir: cache.path().clone(), offline, token, endpoint }
    }

    /// Offline, reading only the hub cache at `cache_dir` (the directory that holds
    /// `models--…/` and `datasets--…/`). For tests and air-gapped machines.
    pub fn offline_at(cache_dir: impl Into<PathBuf>) -> Self {
        Self { cache_dir: cache_dir.into(), offline: true, token: None, endpoint: None }
    }

    /// The hf-hub cache at [`HubOptions::cache_dir`].
    pub fn cache(&self) -> Cache {
        Cache::new(self.cache_dir.clone())
    }

    /// The hf-hub client for these options; byte progress bars for downloads on a terminal.
    pub fn api(&self) -> Result<hf_hub::api::sync::Api> {
        let mut builder = ApiBuilder::from_cache(self.cache())
            .with_token(self.token.clone())
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        builder.build().context("building the hub client")
    }
}
