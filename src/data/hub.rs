//! WikiText from the Hugging Face hub: the `Salesforce/wikitext` dataset repo, pinned to one
//! revision, read from its parquet files through the standard hub cache.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use hf_hub::{Repo, RepoType};

use super::error::DataError;
pub use crate::hub::HubOptions;

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
        let path = dataset_file(hub, WIKITEXT_REPO, WIKITEXT_REVISION, &self.parquet_file())?;
        super::parquet_io::read_text_column(&path, "text")
            .with_context(|| format!("reading WikiText `{}`", self.name()))
    }
}

/// The local path of `file` in dataset `repo` at `revision`: from the cache when it is there,
/// else downloaded into the cache (unless offline).
pub fn dataset_file(hub: &HubOptions, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
    if let Some(path) = cached_file(&hub.cache_dir, repo, revision, file) {
        return Ok(path);
    }
    let not_cached = |why: String| DataError::HubNotCached {
        repo: repo.to_string(),
        file: file.to_string(),
        revision: revision.to_string(),
        cache: hub.cache_dir.clone(),
        why,
    };
    if hub.offline {
        return Err(not_cached(" and offline mode is on (HF_HUB_OFFLINE)".into()).into());
    }
    let api = hub.api()?;
    let repo = Repo::with_revision(repo.to_string(), RepoType::Dataset, revision.to_string());
    api.repo(repo).get(file).map_err(|e| not_cached(format!(" and downloading it failed: {e}")).into())
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
