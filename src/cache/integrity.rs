//! Whether an entry may be used, and moving damaged ones aside.
//!
//! `inspect` is cheap (the manifest: readable, keyed right, sealed, computed from the content its
//! inputs hold now) and decides reuse; `inspect_full` re-hashes every file as well and guards
//! bytes that a stage is about to read. A damaged entry is never deleted: `quarantine` moves it
//! to `<root>/quarantine/<key>-<unix seconds>/` with a `why.txt`, and it is recomputed.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

use super::entry::read_manifest;
use super::{fsutil, verify, Cache, Key, Manifest};

pub(super) const QUARANTINE: &str = "quarantine";

/// What a key's entry is good for.
#[derive(Debug)]
pub enum EntryState {
    Missing,
    Intact(Box<Manifest>),
    /// Present but not to be trusted, and why.
    Damaged(String),
}

impl Cache {
    /// The cheap check that decides reuse (no file is hashed).
    pub fn inspect(&self, key: &Key) -> EntryState {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return EntryState::Missing;
        }
        let manifest = match read_manifest(&dir) {
            Ok(Some(m)) => m,
            Ok(None) => return EntryState::Damaged("manifest.json is missing".into()),
            Err(e) => return EntryState::Damaged(format!("manifest.json is unreadable: {e:#}")),
        };
        if manifest.key != *key {
            return EntryState::Damaged(format!("manifest.json names another key ({})", manifest.key.short()));
        }
        if let Some(problem) = manifest.seal_problem().or_else(|| verify::stale_input(self, &manifest)) {
            return EntryState::Damaged(problem);
        }
        EntryState::Intact(Box::new(manifest))
    }

    /// [`Cache::inspect`] and every file re-hashed against the manifest (blake3, GB/s).
    pub fn inspect_full(&self, key: &Key) -> EntryState {
        match self.inspect(key) {
            EntryState::Intact(m) => {
                let problems = verify::check_files(*key, &self.entry_dir(key), &m);
                if problems.is_empty() {
                    EntryState::Intact(m)
                } else {
                    EntryState::Damaged(problems.join("; "))
                }
            }
            other => other,
        }
    }

    /// Moves an entry aside (call with the key's exclusive lock held). Returns where it went.
    pub fn quarantine(&self, key: &Key, why: &str) -> Result<PathBuf> {
        let dir = self.root.join(QUARANTINE);
        fsutil::create_dir_all(&dir)?;
        let to = dir.join(format!("{}-{}", key.to_hex(), fsutil::now_unix()));
        let from = self.entry_dir(key);
        fs::rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        // The reason travels with it; failing to write it must not undo the move.
        let _ = fs::write(to.join("why.txt"), format!("{why}\n"));
        Ok(to)
    }

    /// Keys of the committed entries computed (directly or not) from any of `keys`, by the input
    /// keys their manifests record.
    pub fn descendants(&self, keys: &[Key]) -> Result<Vec<Key>> {
        let entries = self.entries()?;
        let mut found: Vec<Key> = keys.to_vec();
        let mut out = Vec::new();
        let mut grew = true;
        while grew {
            grew = false;
            for e in &entries {
                let k = e.manifest.key;
                if found.contains(&k) {
                    continue;
                }
                let inputs = e.manifest.key_material["inputs"].as_array().cloned().unwrap_or_default();
                let from = inputs.iter().filter_map(|i| i["key"].as_str().and_then(Key::from_hex));
                if from.into_iter().any(|i| found.contains(&i)) {
                    found.push(k);
                    out.push(k);
                    grew = true;
                }
            }
        }
        Ok(out)
    }
}
