//! WikiText from the Hugging Face hub: the `Salesforce/wikitext` dataset repo, pinned to one
//! revision, read from its parquet files through the standard hub cache.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};

use super::error::DataError;

/// The dataset repo the WikiText names resolve to.
pub const WIKITEXT_REPO: &str = "Salesforce/wikitext";

/// The pinned revision of [`WIKITEXT_REPO`] (the commit that holds the parquet conversion, as
/// pinned by several public projects; the file paths below exist at it). Changing it changes
/// every WikiText source identity, hence every cache key that depends on WikiText.
pub const WIKITEXT_REVISION: &str = "b08601e04326c79dfdd32d625aee71d232d685c3";

/// The WikiText configs and splits that exist as named sources.
pub(crate) const CONFIGS: [&str; 2] = ["wikitext-2-raw-v1", "wikitext-2-v1"];
pub(crate) const SPLITS: [&str; 3] = ["test", "validation", "train"];

/// One split of one WikiText config, e.g. `wikitext-2-raw-v1` / `test`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WikiText {
    pub config: String,
    pub split: String,
}

impl WikiText {
    /// The name used in pipelines: `<config>:<split>`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.config, self.split)
    }

    /// The parquet file of this split inside the dataset repo.
    pub fn parquet_file(&self) -> String {
        format!("{}/{}-00000-of-00001.parquet", self.config, self.split)
    }

    /// The dataset rows (the `text` column), fetched through `hub`.
    pub fn rows(&self, hub: &HubOptions) -> Result<Vec<String>> {
        let path = hub.dataset_file(WIKITEXT_REPO, WIKITEXT_REVISION, &self.parquet_file())?;
        super::parquet_io::read_text_column(&path, "text")
            .with_context(|| format!("reading WikiText `{}`", self.name()))
    }
}

/// Where and how hub files are found. [`HubOptions::from_env`] follows the Hugging Face
/// conventions: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`;
/// `HF_HUB_OFFLINE=1` never touches the network; `HF_TOKEN`, else the token file in `HF_HOME`;
/// `HF_ENDPOINT`.
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
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        Self { cache_dir: cache.path().clone(), offline, token, endpoint }
    }

    /// Offline, reading only the hub cache at `cache_dir` (the directory that holds
    /// `datasets--<owner>--<name>/`). For tests and air-gapped machines.
    pub fn offline_at(cache_dir: impl Into<PathBuf>) -> Self {
        Self { cache_dir: cache_dir.into(), offline: true, token: None, endpoint: None }
    }

    /// The local path of `file` in dataset `repo` at `revision`: from the cache when it is
    /// there, else downloaded into the cache (unless offline).
    pub fn dataset_file(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        if let Some(path) = cached_file(&self.cache_dir, repo, revision, file) {
            return Ok(path);
        }
        let not_cached = |why: String| DataError::HubNotCached {
            repo: repo.to_string(),
            file: file.to_string(),
            revision: revision.to_string(),
            cache: self.cache_dir.clone(),
            why,
        };
        if self.offline {
            return Err(not_cached(" and offline mode is on (HF_HUB_OFFLINE)".into()).into());
        }
        let mut builder = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_token(self.token.clone())
            .with_progress(false);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().context("building the hub client")?;
        let repo = Repo::with_revision(repo.to_string(), RepoType::Dataset, revision.to_string());
        api.repo(repo).get(file).map_err(|e| not_cached(format!(" and downloading it failed: {e}")).into())
    }
}

/// The hub cache layout (shared by huggingface_hub and hf-hub):
/// `<cache>/datasets--<owner>--<name>/snapshots/<commit>/<file>`, where `<commit>` is read from
/// `refs/<revision>` when that file exists (a branch or tag), else is the revision itself (a
/// commit hash, which huggingface_hub stores without a ref file).
fn cached_file(cache_dir: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let folder = cache_dir.join(format!("datasets--{}", repo.replace('/', "--")));
    let commit = match std::fs::read_to_string(folder.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let path = folder.join("snapshots").join(commit).join(file);
    path.is_file().then_some(path)
}
