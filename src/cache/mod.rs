//! Content-addressed store of stage outputs. Knows nothing of models or TOML.
//!
//! Layout under the cache root:
//! - `<2 hex>/<64 hex key>/manifest.json` + artifact files: a committed entry (immutable).
//! - `<2 hex>/<key>/last_used.json`: which pipeline last used the entry (not in the manifest).
//! - `tmp/<key>.<pid>.<nonce>/`: an entry being written; renamed into place on commit.
//! - `partial/<key>/ckpt-<step>/`: resumable state of an unfinished stage.
//! - `locks/<key>.lock`: per-key advisory lock file.
//!
//! Conventions for users of this module:
//! - Hold [`Cache::lock`] on a key from [`Cache::begin`] (or from resuming its partial state)
//!   until [`PendingEntry::commit`]; a second process then waits on the lock and finds the
//!   entry afterwards with [`Cache::contains`]. `gc` never removes anything whose key lock is
//!   held, including temporary directories.
//! - Hold [`Cache::lock_shared`] while reading an entry as an input, so `gc` leaves it alone.
//! - Locks are per open file, also within one process: taking `lock_shared` on a key while the
//!   same process holds `lock` on it blocks forever.

mod entry;
mod fsutil;
pub(crate) use fsutil::pid_alive;
mod gc;
mod integrity;
mod key;
mod lock;
mod partial;
mod verify;

#[cfg(test)]
mod tests;

pub use integrity::EntryState;

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
        key::encode(&self.0)
    }
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Key> {
        key::decode(s).map(Key)
    }
    /// First 12 hex digits, for display.
    pub fn short(&self) -> String {
        let mut hex = self.to_hex();
        hex.truncate(12);
        hex
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
// Serialize/Deserialize as the hex string: see key.rs.

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
    /// The entries it was computed from: their content is recorded, so a descendant computed from
    /// other bytes than its inputs hold now is recognised (see [`Manifest::inputs`]).
    pub inputs: Vec<Key>,
}

/// An input of an entry and the content it had when the entry was computed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InputRecord {
    pub key: Key,
    /// [`Manifest::content`] of the input at the time.
    pub content: String,
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
    #[serde(default)]
    pub inputs: Vec<InputRecord>,
    /// blake3 over everything above that matters (key, kind, version, key material, files,
    /// metrics, inputs): an edited metric or file list no longer matches it. Empty in entries
    /// written before rpt-flow 0.1 sealed its manifests.
    #[serde(default)]
    pub seal: String,
}

impl Manifest {
    /// What the seal must be for the manifest's current content.
    pub fn expected_seal(&self) -> String {
        let sealed = serde_json::json!({
            "key": self.key,
            "kind": self.kind,
            "version": self.version,
            "key_material": self.key_material,
            "files": self.files,
            "metrics": self.metrics,
            "inputs": self.inputs,
        });
        blake3::hash(&serde_json::to_vec(&sealed).expect("JSON values serialise")).to_hex().to_string()
    }

    /// The artifact's content: a hash of its files' paths, sizes and hashes (not of its metrics,
    /// which carry timings). Deterministic stages give the same content when recomputed.
    pub fn content(&self) -> String {
        let mut h = blake3::Hasher::new();
        for f in &self.files {
            h.update(format!("{}\0{}\0{}\n", f.path, f.size, f.blake3).as_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    /// Why the manifest cannot be trusted, if it cannot: a seal that does not match. A manifest
    /// without a seal (an older rpt-flow) is accepted.
    pub fn seal_problem(&self) -> Option<String> {
        (!self.seal.is_empty() && self.seal != self.expected_seal())
            .then(|| "manifest.json does not match its seal: its metrics, file list or inputs were edited".to_string())
    }
}

pub struct Cache {
    root: PathBuf,
}

/// An entry being written. Dropping it without `commit` removes the temporary directory.
pub struct PendingEntry {
    key: Key,
    root: PathBuf,
    tmp: PathBuf,
    /// Renamed into place: nothing to clean up.
    done: bool,
}

/// A held advisory lock on one key (released on drop).
pub struct KeyLock {
    file: std::fs::File,
    key: Key,
    shared: bool,
}

/// Resumable state of one unfinished stage.
pub struct PartialDir {
    key: Key,
    /// Cache root (for moving removed state to `tmp/`).
    root: PathBuf,
    /// `<root>/partial/<key>`.
    dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
}

/// What `gc` removes. An entry goes when it matches either filter (not in `keep`, or unused
/// for longer than `older_than`); with both None no entry is removed. Partial state goes when
/// its key has a committed entry or is not in `keep`. Temporary items of processes that are
/// gone are always removed. Nothing whose key lock is held elsewhere is touched.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Keep only these keys (None: no reachability filter).
    pub keep: Option<HashSet<Key>>,
    /// Remove entries whose last use (or creation) is older than this.
    pub older_than: Option<Duration>,
    /// Report what would be removed, delete nothing (and create no lock files).
    pub dry_run: bool,
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_entries: Vec<(Key, u64)>,
    pub removed_partials: Vec<Key>,
    /// Abandoned items in `tmp/` and `.tmp-*` directories inside kept partial dirs.
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
    /// Files of this entry with other hard links.
    pub linked: Vec<LinkedFile>,
    /// Unix seconds of last use, creation if never used since.
    pub last_used: u64,
    pub last_pipeline: String,
}

/// A file with several hard links: ((device, inode), size).
pub type LinkedFile = ((u64, u64), u64);

/// Bytes the entries take on disk: a file hard-linked into several of them counts once.
pub fn disk_bytes(entries: &[EntrySummary]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let repeated: u64 =
        entries.iter().flat_map(|e| &e.linked).filter(|(id, _)| !seen.insert(*id)).map(|(_, size)| size).sum();
    entries.iter().map(|e| e.bytes).sum::<u64>() - repeated
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
        let hex = key.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }
    /// `<root>/locks/<key>.lock`.
    pub fn lock_path(&self, key: &Key) -> PathBuf {
        self.root.join(fsutil::LOCKS).join(format!("{}.lock", key.to_hex()))
    }
    /// True when a committed entry (with its manifest) exists.
    pub fn contains(&self, key: &Key) -> bool {
        self.entry_dir(key).join(entry::MANIFEST).is_file()
    }
    /// The manifest of a committed entry; Ok(None) when there is none, Err when unreadable.
    pub fn manifest(&self, key: &Key) -> Result<Option<Manifest>> {
        entry::read_manifest(&self.entry_dir(key))
    }
    /// All committed entries, with sizes and last use, sorted by key. Entries whose manifest
    /// cannot be read are left out (with a warning); `verify` reports them.
    pub fn entries(&self) -> Result<Vec<EntrySummary>> {
        entry::entries(self)
    }
    /// Starts writing an entry in a temporary directory on the same filesystem.
    pub fn begin(&self, key: &Key) -> Result<PendingEntry> {
        entry::begin(self, key)
    }
    /// Blocking exclusive lock on a key.
    pub fn lock(&self, key: &Key) -> Result<KeyLock> {
        lock::lock(self, key)
    }
    /// Non-blocking exclusive lock; None if another holder has it.
    pub fn try_lock(&self, key: &Key) -> Result<Option<KeyLock>> {
        lock::try_lock(self, key)
    }
    /// Blocking shared lock (held while an entry is being read as an input).
    pub fn lock_shared(&self, key: &Key) -> Result<KeyLock> {
        lock::lock_shared(self, key)
    }
    /// `<root>/partial/<key>` (nothing is created until `save`).
    pub fn partial(&self, key: &Key) -> PartialDir {
        PartialDir { key: *key, root: self.root.clone(), dir: self.root.join(fsutil::PARTIAL).join(key.to_hex()) }
    }
    /// Records that `pipeline` used the entry now (atomic write of last_used.json).
    /// Errors when the entry is not committed.
    pub fn touch(&self, key: &Key, pipeline: &str) -> Result<()> {
        entry::touch(self, key, pipeline)
    }
    /// Re-hashes every file of every entry against its manifest.
    pub fn verify(&self) -> Result<Vec<VerifyProblem>> {
        verify::verify(self)
    }
    /// Removes garbage; see [`GcOptions`]. Anything whose key lock is held elsewhere is left
    /// alone (and listed in `skipped_locked`).
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        gc::gc(self, opts)
    }
}

impl PendingEntry {
    /// Directory the stage writes its artifact files into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }
    pub fn key(&self) -> Key {
        self.key
    }
    /// Hashes the files, writes manifest.json, fsyncs, renames into place.
    ///
    /// Only regular files (in any subdirectories) may be written; `manifest.json` and
    /// `last_used.json` are reserved at the top level. If the entry was committed meanwhile
    /// by someone else, ours is discarded and the existing manifest is returned.
    pub fn commit(mut self, info: EntryInfo) -> Result<Manifest> {
        entry::commit(&mut self, info)
    }
}

impl Drop for PendingEntry {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

impl PartialDir {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// True when any checkpoint exists.
    pub fn exists(&self) -> bool {
        matches!(self.latest(), Ok(Some(_)))
    }
    /// The newest complete checkpoint.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        self.latest_impl()
    }
    /// Writes a checkpoint atomically: `write` fills a temporary directory, which is fsynced
    /// and renamed to `ckpt-<step>`; older checkpoints are then removed.
    ///
    /// Every other checkpoint is removed, also one with a higher step: the checkpoint just
    /// saved is what `latest` returns afterwards. If `write` fails, nothing changes.
    pub fn save(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<Checkpoint> {
        self.save_impl(step, write)
    }
    /// Removes all partial state of this key (Ok when there is none).
    pub fn remove(&self) -> Result<()> {
        self.remove_impl()
    }
}
