//! Typed errors of the data layer, for callers that want to tell the cases apart.

use std::path::PathBuf;

/// The failures a user can act on. Everything else is an `anyhow` error with context.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A `data = "..."` name that is not a known source.
    #[error("unknown data source `{name}`{}; known: {known}", did_you_mean(.suggestion))]
    UnknownSource { name: String, suggestion: Option<String>, known: String },
    /// A built-in prompt set name that does not exist.
    #[error("unknown prompt set `{name}`{}; known: {known}", did_you_mean(.suggestion))]
    UnknownPromptSet { name: String, suggestion: Option<String>, known: String },
    /// A `data = ...` value of the wrong shape.
    #[error("invalid data source {value}: {reason}")]
    Invalid { value: String, reason: String },
    /// A local source whose path does not exist.
    #[error("data file `{}` does not exist", .0.display())]
    MissingFile(PathBuf),
    /// A hub file that is not in the local hub cache while offline (or could not be fetched).
    #[error(
        "`{repo}` file `{file}` at revision {revision} is not in the hub cache {}{why}.\n\
         help: download it where network is available, e.g.\n  \
         huggingface-cli download --repo-type dataset {repo} {file} --revision {revision}\n\
         with the same HF_HOME (the cache is $HF_HOME/hub, default ~/.cache/huggingface/hub), \
         or give the file itself: `data = {{ path = \"...\" }}` for a text, `task = {{ jsonl = \"...\" }}` for task items",
        .cache.display()
    )]
    HubNotCached { repo: String, file: String, revision: String, cache: PathBuf, why: String },
    /// A token stream too short for even one window or batch row.
    #[error("{what}: the token stream has {have} tokens, fewer than the {need} needed")]
    TooShort { what: String, have: usize, need: usize },
}

fn did_you_mean(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

/// The nearest candidate to `name`, if one is close enough to help: the shortest candidate
/// that `name` is a prefix of (`valid` → `validation`), else the nearest by Levenshtein distance.
pub(crate) fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    if !name.is_empty() {
        if let Some(c) = candidates.iter().filter(|c| c.starts_with(name)).min_by_key(|c| c.len()) {
            return Some(c.to_string());
        }
    }
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(2))
        .min()
        .map(|(_, c)| c.to_string())
}
