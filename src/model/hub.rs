//! Model sources: a local directory or `hf:org/name[@revision]` through hf-hub.
//!
//! The hub environment (`HF_HUB_CACHE` / `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`)
//! is read by [`crate::hub::HubOptions`], as for datasets. A branch or tag is resolved to its
//! commit ([`resolve_commit`]) before keys are computed. Offline nothing is fetched: the files are read from the local hub cache
//! (`$HF_HOME/hub/models--org--name/{refs,snapshots}`), as transformers does. Pin revisions
//! (a commit hash): the current `main` of the BitNet repos has been re-uploaded with zeroed MLP
//! tensors (notes §7, pitfall 3).
//!
//! The top of `model/`'s dependencies: [`Model::load`] lives here (a source resolved to a
//! directory, then io.rs's [`Model::from_dir`]), so that io.rs never needs the hub.

use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};

use super::causal_lm::Model;
use super::io::{weight_files, LoadOptions, AUX_FILES};
use crate::hub::HubOptions;
use std::path::{Path, PathBuf};

impl Model {
    /// Load from a local directory or `hf:org/name[@revision]` (see [`resolve`]).
    pub fn load(source: &str, opts: &LoadOptions) -> Result<Self> {
        let dir = resolve(source)?;
        Self::from_dir(&dir, opts)
    }
}

/// A parsed `hf:org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
}

impl HubSpec {
    /// Parse `hf:org/name[@revision]` (revision defaults to `main`); `None` if not a hub spec.
    pub fn parse(source: &str) -> Result<Option<Self>> {
        let Some(rest) = source.strip_prefix("hf:") else { return Ok(None) };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (rest, "main"),
        };
        if repo.split('/').count() != 2 || repo.split('/').any(|s| s.is_empty()) || revision.is_empty() {
            bail!("bad hub model {source:?}: expected hf:org/name[@revision]");
        }
        Ok(Some(Self { repo: repo.to_string(), revision: revision.to_string() }))
    }
}

/// The hub environment, as models and datasets read it.
fn env() -> HubOptions {
    HubOptions::from_env()
}

/// The commit `spec` names, known before anything is keyed or downloaded, so a key never moves
/// when a download writes `refs/main`: a 40-hex revision as it is; online, the hub API's answer
/// for the branch or tag (`GET {HF_ENDPOINT}/api/models/{repo}/revision/{rev}`); offline, or when
/// the hub cannot be reached, the local cache's `refs/{rev}`. Memoised per process.
pub fn resolve_commit(spec: &HubSpec) -> Result<String> {
    static MEMO: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<(String, String), String>>> =
        std::sync::OnceLock::new();
    if is_commit(&spec.revision) {
        return Ok(spec.revision.to_ascii_lowercase());
    }
    let memo = MEMO.get_or_init(Default::default);
    let k = (spec.repo.clone(), spec.revision.clone());
    if let Some(c) = memo.lock().expect("commit memo").get(&k) {
        return Ok(c.clone());
    }
    let hub = env();
    let online_error = if hub.offline {
        "HF_HUB_OFFLINE is set".to_string()
    } else {
        match hub.api().and_then(|a| {
            let repo = a.repo(Repo::with_revision(spec.repo.clone(), RepoType::Model, spec.revision.clone()));
            repo.info().with_context(|| format!("asking the hub for {}@{}", spec.repo, spec.revision))
        }) {
            Ok(info) if is_commit(&info.sha) => {
                memo.lock().expect("commit memo").insert(k, info.sha.clone());
                return Ok(info.sha);
            }
            Ok(info) => format!("the hub answered a revision that is not a commit ({:?})", info.sha),
            Err(e) => format!("{e:#}"),
        }
    };
    match cached_ref(&hub.cache_dir, spec) {
        Some(c) => {
            if !hub.offline {
                tracing::warn!("{online_error}; using the cached refs/{} of {} = {c}", spec.revision, spec.repo);
            }
            memo.lock().expect("commit memo").insert(k, c.clone());
            Ok(c)
        }
        None => bail!(
            "cannot resolve hf:{repo}@{rev} to a commit: {online_error}, and the local hub cache ({cache}) has no \
             refs/{rev} for it. Pin a commit (hf:{repo}@<40 hex digits>), or download the repo once online \
             (`huggingface-cli download {repo}`, or an rpt-flow run without HF_HUB_OFFLINE)",
            repo = spec.repo,
            rev = spec.revision,
            cache = hub.cache_dir.display(),
        ),
    }
}

/// `models--org--name/` of `spec` in the hub cache at `cache_dir`.
fn repo_dir(cache_dir: &Path, spec: &HubSpec) -> PathBuf {
    cache_dir.join(Repo::new(spec.repo.clone(), RepoType::Model).folder_name())
}

/// The commit in the cache's `refs/{revision}` of `spec`, if it is there and is one.
fn cached_ref(cache_dir: &Path, spec: &HubSpec) -> Option<String> {
    let r = std::fs::read_to_string(repo_dir(cache_dir, spec).join("refs").join(&spec.revision)).ok()?;
    Some(r.trim().to_string()).filter(|c| is_commit(c))
}

/// Downloads (or finds) `spec` at `commit` and returns the snapshot folder. A branch or tag
/// also gets its `refs/{revision}` written, as huggingface_hub does, so that offline runs later
/// resolve it to the same commit.
pub fn fetch_commit(spec: &HubSpec, commit: &str) -> Result<PathBuf> {
    let dir = resolve(&format!("hf:{}@{commit}", spec.repo))?;
    let hub = env();
    if !is_commit(&spec.revision) && !hub.offline {
        let refs = repo_dir(&hub.cache_dir, spec).join("refs");
        std::fs::create_dir_all(&refs).with_context(|| format!("creating {}", refs.display()))?;
        std::fs::write(refs.join(&spec.revision), commit)
            .with_context(|| format!("writing {}", refs.join(&spec.revision).display()))?;
    }
    Ok(dir)
}

/// The commit `spec` names from local information alone: a 40-hex revision, or the local hub
/// cache's `refs/{revision}`.
pub fn local_commit(spec: &HubSpec) -> Option<String> {
    if is_commit(&spec.revision) {
        return Some(spec.revision.to_ascii_lowercase());
    }
    cached_ref(&env().cache_dir, spec)
}

/// Resolve a source to a local directory holding config.json and the weights.
pub fn resolve(source: &str) -> Result<PathBuf> {
    match HubSpec::parse(source)? {
        None => {
            let p = PathBuf::from(source);
            if !p.join("config.json").exists() {
                bail!("{}: not a model directory (no config.json)", p.display());
            }
            Ok(p)
        }
        Some(spec) => {
            let hub = env();
            if hub.offline {
                resolve_offline(&hub.cache(), &spec)
            } else {
                resolve_online(&hub, &spec)
            }
        }
    }
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Find a snapshot in the local hub cache (`cache` = the `hub` directory).
pub fn resolve_offline(cache: &hf_hub::Cache, spec: &HubSpec) -> Result<PathBuf> {
    let repo_dir = repo_dir(cache.path(), spec);
    let commit = if is_commit(&spec.revision) {
        spec.revision.clone()
    } else {
        let r = repo_dir.join("refs").join(&spec.revision);
        std::fs::read_to_string(&r)
            .with_context(|| format!("HF_HUB_OFFLINE: {} not cached (no {})", spec.repo, r.display()))?
            .trim()
            .to_string()
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.join("config.json").exists() {
        bail!("HF_HUB_OFFLINE: {}@{} has no cached config.json at {}", spec.repo, spec.revision, snap.display());
    }
    if weight_files(&snap).map(|f| f.iter().all(|p| p.exists())).ok() != Some(true) {
        bail!("HF_HUB_OFFLINE: {}@{}: weights not (fully) cached in {}", spec.repo, spec.revision, snap.display());
    }
    Ok(snap)
}

fn resolve_online(hub: &HubOptions, spec: &HubSpec) -> Result<PathBuf> {
    let api = hub.api()?;
    let repo = api.repo(Repo::with_revision(spec.repo.clone(), RepoType::Model, spec.revision.clone()));
    let get = |f: &str| repo.get(f).with_context(|| format!("fetching {f} from {}@{}", spec.repo, spec.revision));
    let config = get("config.json")?;
    let dir = config.parent().map(Path::to_path_buf).context("config path has no parent")?;
    match get("model.safetensors") {
        Ok(_) => {}
        Err(_) => {
            get("model.safetensors.index.json")?;
            for f in weight_files(&dir)? {
                let name = f.file_name().and_then(|n| n.to_str()).context("bad shard name")?.to_string();
                get(&name)?;
            }
        }
    }
    for f in AUX_FILES {
        let _ = repo.get(f); // optional files
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = HubSpec::parse("hf:microsoft/bitnet-b1.58-2B-4T-bf16@abc").unwrap().unwrap();
        assert_eq!(s.repo, "microsoft/bitnet-b1.58-2B-4T-bf16");
        assert_eq!(s.revision, "abc");
        assert_eq!(HubSpec::parse("hf:a/b").unwrap().unwrap().revision, "main");
        assert!(HubSpec::parse("hf:ab").is_err());
        assert!(HubSpec::parse("/local/dir").unwrap().is_none());
    }
}
