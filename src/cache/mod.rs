//! Content-addressed store of stage outputs. Knows nothing of models or TOML.
//!
//! Layout under the cache root:
//! - `<2 hex>/<64 hex key>/manifest.json` + artifact files: a committed entry (immutable).
//! - `<2 hex>/<key>/last_used.json`: which pipeline last used the entry (not in the manifest).
//! - `tmp/<key>.<pid>.<nonce>/`: an entry being written; renamed into place on commit.
//! - `partial/<key>/ckpt-<step>/`: resumable state of an unfinished stage.
//! - `locks/<key>.lock`: per-key advisory lock file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// A 32-byte blake3 cache key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// Key of arbitrary bytes (blake3).
    pub fn of_bytes(bytes: &[u8]) -> Key {
        Key(*blake3::hash(bytes).as_bytes())
    }
    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Key> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Key(out))
    }
    /// First 12 hex digits, for display.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.short())
    }
}
impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}
impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let s = String::deserialize(d)?;
        Key::from_hex(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid key `{s}`")))
    }
}

/// One file of an entry, hashed at commit time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    /// Path relative to the entry directory, '/'-separated.
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// What the engine supplies when committing an entry.
#[derive(Clone, Debug)]
pub struct EntryInfo {
    pub kind: String,
    pub version: u32,
    /// The exact canonical object whose blake3 is the key (kind, version, params, settings,
    /// input keys...). Stored so that `explain` can diff against it.
    pub key_material: serde_json::Value,
    pub metrics: serde_json::Value,
    pub seconds: f64,
    /// Pipeline and instance that produced it (informational).
    pub pipeline: String,
    pub instance: String,
}

/// `manifest.json` of a committed entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub key: Key,
    pub kind: String,
    pub version: u32,
    pub key_material: serde_json::Value,
    pub files: Vec<FileRecord>,
    pub metrics: serde_json::Value,
    pub seconds: f64,
    /// Unix seconds at commit.
    pub created: u64,
    pub rpt_flow_version: String,
    pub pipeline: String,
    pub instance: String,
}

pub struct Cache {
    root: PathBuf,
}

/// An entry being written. Dropping it without `commit` removes the temporary directory.
pub struct PendingEntry {}

/// A held advisory lock on one key (released on drop).
pub struct KeyLock {}

/// Resumable state of one unfinished stage.
pub struct PartialDir {}

pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
}

pub struct GcOptions {
    /// Keep only these keys (None: no reachability filter).
    pub keep: Option<HashSet<Key>>,
    /// Remove entries whose last use (or creation) is older than this.
    pub older_than: Option<Duration>,
    pub dry_run: bool,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_entries: Vec<(Key, u64)>,
    pub removed_partials: Vec<Key>,
    pub removed_tmp: Vec<PathBuf>,
    pub skipped_locked: Vec<Key>,
    pub bytes_freed: u64,
}

#[derive(Debug)]
pub struct VerifyProblem {
    pub key: Option<Key>,
    pub dir: PathBuf,
    pub problem: String,
}

#[derive(Debug)]
pub struct EntrySummary {
    pub manifest: Manifest,
    pub bytes: u64,
    /// Unix seconds of last use, creation if never used since.
    pub last_used: u64,
    pub last_pipeline: String,
}

impl Cache {
    /// Opens a cache rooted at `root`. Creates nothing: directories appear on first write.
    pub fn open(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `<root>/<2 hex>/<key>`.
    pub fn entry_dir(&self, key: &Key) -> PathBuf {
        todo!()
    }
    /// True when a committed entry (with its manifest) exists.
    pub fn contains(&self, key: &Key) -> bool {
        todo!()
    }
    pub fn manifest(&self, key: &Key) -> Result<Option<Manifest>> {
        todo!()
    }
    /// All committed entries, with sizes and last use.
    pub fn entries(&self) -> Result<Vec<EntrySummary>> {
        todo!()
    }
    /// Starts writing an entry in a temporary directory on the same filesystem.
    pub fn begin(&self, key: &Key) -> Result<PendingEntry> {
        todo!()
    }
    /// Blocking exclusive lock on a key.
    pub fn lock(&self, key: &Key) -> Result<KeyLock> {
        todo!()
    }
    /// Non-blocking exclusive lock; None if another holder has it.
    pub fn try_lock(&self, key: &Key) -> Result<Option<KeyLock>> {
        todo!()
    }
    /// Blocking shared lock (held while an entry is being read as an input).
    pub fn lock_shared(&self, key: &Key) -> Result<KeyLock> {
        todo!()
    }
    pub fn partial(&self, key: &Key) -> PartialDir {
        todo!()
    }
    /// Records that `pipeline` used the entry now (atomic write of last_used.json).
    pub fn touch(&self, key: &Key, pipeline: &str) -> Result<()> {
        todo!()
    }
    /// Re-hashes every file of every entry against its manifest.
    pub fn verify(&self) -> Result<Vec<VerifyProblem>> {
        todo!()
    }
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        todo!()
    }
}

impl PendingEntry {
    /// Directory the stage writes its artifact files into.
    pub fn dir(&self) -> &Path {
        todo!()
    }
    /// Hashes the files, writes manifest.json, fsyncs, renames into place.
    pub fn commit(self, info: EntryInfo) -> Result<Manifest> {
        todo!()
    }
}

impl PartialDir {
    pub fn dir(&self) -> &Path {
        todo!()
    }
    /// True when any checkpoint exists.
    pub fn exists(&self) -> bool {
        todo!()
    }
    /// The newest complete checkpoint.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        todo!()
    }
    /// Writes a checkpoint atomically: `write` fills a temporary directory, which is fsynced
    /// and renamed to `ckpt-<step>`; older checkpoints are then removed.
    pub fn save(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<Checkpoint> {
        todo!()
    }
    /// Removes all partial state of this key.
    pub fn remove(&self) -> Result<()> {
        todo!()
    }
}
