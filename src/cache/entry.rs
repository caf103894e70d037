//! Committed entries: begin/commit, manifests, last use, scanning.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::fsutil::{self, TMP};
use super::{key, Cache, EntryInfo, EntrySummary, FileRecord, Key, Manifest, PendingEntry};

pub(super) const MANIFEST: &str = "manifest.json";
pub(super) const LAST_USED: &str = "last_used.json";

/// Contents of `last_used.json`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LastUsed {
    pub pipeline: String,
    pub unix: u64,
}

/// Reads `<dir>/manifest.json`; Ok(None) when it does not exist.
pub(super) fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let manifest = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(manifest))
}

/// Reads `<dir>/last_used.json`; None when absent or unreadable (it is advisory).
pub(super) fn read_last_used(dir: &Path) -> Option<LastUsed> {
    let bytes = fs::read(dir.join(LAST_USED)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(super) fn summarize(dir: &Path, manifest: Manifest) -> EntrySummary {
    let (bytes, linked) = fsutil::dir_usage(dir);
    let (last_used, last_pipeline) = match read_last_used(dir) {
        Some(lu) => (lu.unix, lu.pipeline),
        None => (manifest.created, manifest.pipeline.clone()),
    };
    EntrySummary { manifest, bytes, linked, last_used, last_pipeline }
}

/// Every `<root>/<2 hex>/<key>` directory (committed or not), sorted by key. Names that are not
/// canonical keys of their shard are left out (verify reports them).
pub(super) fn scan_entry_dirs(root: &Path) -> Result<Vec<(Key, PathBuf)>> {
    let mut out = Vec::new();
    for shard in fsutil::read_dir_if_exists(root)? {
        if !is_shard_name(&shard.name) || !shard.file_type.is_dir() {
            continue;
        }
        for item in fsutil::read_dir_sorted(&shard.path)? {
            if !item.file_type.is_dir() {
                continue;
            }
            if let Some(key) = key::parse_canonical(&item.name) {
                if item.name.starts_with(&shard.name) {
                    out.push((key, item.path));
                }
            }
        }
    }
    out.sort_by_key(|a| a.0);
    Ok(out)
}

/// Two lowercase hex digits.
pub(super) fn is_shard_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(super) fn entries(cache: &Cache) -> Result<Vec<EntrySummary>> {
    let mut out = Vec::new();
    for (key, dir) in scan_entry_dirs(&cache.root)? {
        match read_manifest(&dir) {
            Ok(Some(m)) => out.push(summarize(&dir, m)),
            // Vanished (concurrent gc) or never complete: not an entry.
            Ok(None) => {}
            Err(e) => tracing::warn!(key = %key.short(), "skipping cache entry: {e:#}"),
        }
    }
    Ok(out)
}

pub(super) fn begin(cache: &Cache, key: &Key) -> Result<PendingEntry> {
    let tmp_root = cache.root.join(TMP);
    fsutil::create_dir_all(&tmp_root)?;
    let hex = key.to_hex();
    let pid = std::process::id();
    let tmp = fsutil::create_unique_dir(&tmp_root, |n| format!("{hex}.{pid}.{n}"))?;
    Ok(PendingEntry { key: *key, root: cache.root.clone(), tmp, done: false })
}

/// Hashes every file the stage wrote. Only regular files are allowed; the names of the
/// cache's own files are reserved at the top level.
fn hash_files(dir: &Path) -> Result<Vec<FileRecord>> {
    let mut records = Vec::new();
    for f in fsutil::walk_files(dir)? {
        if !f.regular {
            bail!("{} is not a regular file (symlinks and special files cannot be cached)", f.path.display());
        }
        if f.rel == MANIFEST || f.rel == LAST_USED {
            bail!("{} is a reserved name in a cache entry", f.path.display());
        }
        let (size, blake3) = fsutil::hash_file(&f.path)?;
        records.push(FileRecord { path: f.rel, size, blake3 });
    }
    Ok(records)
}

pub(super) fn commit(pending: &mut PendingEntry, info: EntryInfo) -> Result<Manifest> {
    let cache = Cache::open(pending.root.clone());
    let key = pending.key;
    let final_dir = cache.entry_dir(&key);

    // Someone else finished first: ours is redundant (dropping `pending` removes it).
    if let Some(existing) = read_manifest(&final_dir)? {
        return Ok(existing);
    }

    let files = hash_files(&pending.tmp)?;
    let mut inputs = Vec::with_capacity(info.inputs.len());
    for k in &info.inputs {
        let m =
            read_manifest(&cache.entry_dir(k))?.with_context(|| format!("input entry {k} vanished before commit"))?;
        inputs.push(super::InputRecord { key: *k, content: m.content() });
    }
    let mut manifest = Manifest {
        key,
        kind: info.kind,
        version: info.version,
        key_material: info.key_material,
        files,
        metrics: info.metrics,
        seconds: info.seconds,
        created: fsutil::now_unix(),
        rpt_flow_version: env!("CARGO_PKG_VERSION").to_string(),
        pipeline: info.pipeline,
        instance: info.instance,
        inputs,
        seal: String::new(),
    };
    manifest.seal = manifest.expected_seal();
    let json = serde_json::to_vec_pretty(&manifest).context("serialising manifest")?;
    fsutil::write_synced(&pending.tmp.join(MANIFEST), &json)?;
    fsutil::sync_tree(&pending.tmp)?;

    let shard = final_dir.parent().expect("entry dir has a parent").to_path_buf();
    if !shard.exists() {
        fsutil::create_dir_all(&shard)?;
        fsutil::sync_dir(&cache.root)?;
    }

    for attempt in 0..2 {
        match fs::rename(&pending.tmp, &final_dir) {
            Ok(()) => {
                pending.done = true;
                fsutil::sync_dir(&shard)?;
                return Ok(manifest);
            }
            Err(e) => {
                if let Some(existing) = read_manifest(&final_dir)? {
                    return Ok(existing);
                }
                if attempt == 0 && fs::symlink_metadata(&final_dir).is_ok() {
                    // A directory without manifest at the final place is debris (never produced
                    // by this module): move it away and try again.
                    fsutil::remove_via_tmp(&cache.root, &final_dir, &key, "debris")?;
                    continue;
                }
                return Err(e)
                    .with_context(|| format!("renaming {} to {}", pending.tmp.display(), final_dir.display()));
            }
        }
    }
    bail!("could not commit cache entry {}", final_dir.display())
}

pub(super) fn touch(cache: &Cache, key: &Key, pipeline: &str) -> Result<()> {
    let dir = cache.entry_dir(key);
    if !dir.join(MANIFEST).exists() {
        bail!("no committed cache entry at {}", dir.display());
    }
    let tmp_root = cache.root.join(TMP);
    fsutil::create_dir_all(&tmp_root)?;
    let tmp = tmp_root.join(format!("{}.{}.{}.last-used", key.to_hex(), std::process::id(), fsutil::nonce()));
    let json = serde_json::to_vec_pretty(&LastUsed { pipeline: pipeline.to_string(), unix: fsutil::now_unix() })?;
    fsutil::write_synced(&tmp, &json)?;
    let target = dir.join(LAST_USED);
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()));
    }
    fsutil::sync_dir(&dir)
}
