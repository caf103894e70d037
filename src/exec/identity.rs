//! Content hashes of files that parameters name (a local model directory, a text file), for
//! cache keys. Memoised by (path, size, mtime) — in memory, and in `<cache>/file-hashes.json` when
//! running or planning, so a multi-GB checkpoint is hashed once, not on every `plan`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

#[derive(Clone, Serialize, Deserialize, PartialEq)]
struct Memo {
    size: u64,
    mtime_ns: u128,
    blake3: String,
}

pub struct FileHasher {
    memo: Mutex<BTreeMap<PathBuf, Memo>>,
    store: Option<PathBuf>,
    dirty: Mutex<bool>,
    /// The pipeline file's folder: relative paths in parameters resolve against it.
    base_dir: PathBuf,
    /// Whether identities may ask remote services (the hub for a branch's commit); off for
    /// commands that show no keys (`validate`, `graph`), so they work without a network.
    remote: bool,
}

impl FileHasher {
    /// Memoises in this process only (used by `validate`, which writes nothing).
    pub fn in_memory() -> FileHasher {
        FileHasher {
            memo: Mutex::new(BTreeMap::new()),
            store: None,
            dirty: Mutex::new(false),
            base_dir: ".".into(),
            remote: true,
        }
    }

    /// Also remembers hashes across processes in `store` (written by [`FileHasher::save`]).
    pub fn persistent(store: PathBuf) -> FileHasher {
        let memo = std::fs::read_to_string(&store).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        FileHasher {
            memo: Mutex::new(memo),
            store: Some(store),
            dirty: Mutex::new(false),
            base_dir: ".".into(),
            remote: true,
        }
    }

    /// Resolves relative paths against `dir` (the pipeline file's folder).
    pub fn relative_to(mut self, dir: &Path) -> FileHasher {
        self.base_dir = dir.to_path_buf();
        self
    }

    /// Identities from local information only (no hub requests): for commands that show no keys.
    pub fn local_only(mut self) -> FileHasher {
        self.remote = false;
        self
    }

    /// Whether an identity may ask a remote service.
    pub fn remote(&self) -> bool {
        self.remote
    }

    /// The folder relative paths in parameters resolve against.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// `path` resolved against [`FileHasher::base_dir`] (unchanged when absolute).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// blake3 (hex) of a file's contents.
    pub fn hash_file(&self, path: &Path) -> Result<String> {
        let abs = std::fs::canonicalize(path).with_context(|| format!("cannot read `{}`", path.display()))?;
        let meta = std::fs::metadata(&abs).with_context(|| format!("cannot read `{}`", path.display()))?;
        let mtime_ns =
            meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        if let Some(m) = self.memo.lock().expect("hash memo").get(&abs) {
            if m.size == meta.len() && m.mtime_ns == mtime_ns {
                return Ok(m.blake3.clone());
            }
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap_rayon(&abs).with_context(|| format!("hashing `{}`", path.display()))?;
        let hex = hasher.finalize().to_hex().to_string();
        self.memo.lock().expect("hash memo").insert(abs, Memo { size: meta.len(), mtime_ns, blake3: hex.clone() });
        *self.dirty.lock().expect("hash memo") = true;
        Ok(hex)
    }

    /// `{relative path: blake3}` of every file under a directory (sorted), or of one file.
    pub fn hash_tree(&self, path: &Path) -> Result<Json> {
        if path.is_file() {
            return Ok(Json::String(self.hash_file(path)?));
        }
        let mut files = Vec::new();
        collect(path, path, &mut files)?;
        files.sort();
        let mut out = Map::new();
        for rel in files {
            out.insert(rel.clone(), Json::String(self.hash_file(&path.join(&rel))?));
        }
        Ok(Json::Object(out))
    }

    /// Writes the memo if it changed (atomically; failures only cost a re-hash next time).
    pub fn save(&self) {
        let Some(store) = &self.store else { return };
        if !*self.dirty.lock().expect("hash memo") {
            return;
        }
        let text = match serde_json::to_string(&*self.memo.lock().expect("hash memo")) {
            Ok(t) => t,
            Err(_) => return,
        };
        // Cluster jobs on several hosts share this file: each writes its own temporary name.
        let _ = crate::atomic_file::write(store, text.as_bytes());
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read `{}`", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root).expect("under root").to_string_lossy().replace('\\', "/");
            out.push(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_follow_content_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"hello").unwrap();
        let store = dir.path().join("memo.json");
        let h = FileHasher::persistent(store.clone());
        let first = h.hash_file(&f).unwrap();
        assert_eq!(first, blake3::hash(b"hello").to_hex().to_string());
        h.save();
        let again = FileHasher::persistent(store);
        assert_eq!(again.hash_file(&f).unwrap(), first);
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&f, b"hello, world").unwrap();
        assert_eq!(again.hash_file(&f).unwrap(), blake3::hash(b"hello, world").to_hex().to_string());
    }

    #[test]
    fn a_tree_lists_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/x"), b"x").unwrap();
        std::fs::write(dir.path().join("y"), b"y").unwrap();
        let t = FileHasher::in_memory().hash_tree(dir.path()).unwrap();
        let keys: Vec<&String> = t.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["sub/x", "y"]);
    }
}
