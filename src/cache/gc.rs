//! Garbage collection of entries, partial state and abandoned temporary files.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use super::entry::{read_last_used, read_manifest, scan_entry_dirs, MANIFEST};
use super::fsutil::{self, PARTIAL, TMP};
use super::lock::{probe, Probe};
use super::{key, Cache, GcOptions, GcReport, Key};

/// Last use of an entry: last_used.json, else manifest.created, else (manifest unreadable)
/// the directory's modification time.
fn last_use(dir: &Path) -> u64 {
    if let Some(lu) = read_last_used(dir) {
        return lu.unix;
    }
    if let Ok(Some(m)) = read_manifest(dir) {
        return m.created;
    }
    fs::symlink_metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn entry_is_garbage(opts: &GcOptions, key: &Key, dir: &Path, now: u64) -> bool {
    let unreachable = opts.keep.as_ref().is_some_and(|keep| !keep.contains(key));
    let old = opts.older_than.is_some_and(|age| Duration::from_secs(now.saturating_sub(last_use(dir))) >= age);
    unreachable || old
}

fn note_skipped(report: &mut GcReport, key: Key) {
    if !report.skipped_locked.contains(&key) {
        report.skipped_locked.push(key);
    }
}

pub(super) fn gc(cache: &Cache, opts: &GcOptions) -> Result<GcReport> {
    let mut report = GcReport::default();
    let now = fsutil::now_unix();

    let entry_dirs = scan_entry_dirs(&cache.root)?;
    // Keys finished when gc started (so a dry run and a real run agree on partials).
    let finished: HashSet<Key> =
        entry_dirs.iter().filter(|(_, dir)| dir.join(MANIFEST).exists()).map(|(key, _)| *key).collect();

    // Committed entries (also debris directories without a valid manifest).
    for (key, dir) in entry_dirs {
        if !entry_is_garbage(opts, &key, &dir, now) {
            continue;
        }
        let _lock = match probe(cache, &key, opts.dry_run)? {
            Probe::Busy => {
                note_skipped(&mut report, key);
                continue;
            }
            Probe::Held(l) => Some(l),
            Probe::Free => None,
        };
        // Decide again under the lock: it may have been used or removed meanwhile.
        if !dir.exists() || !entry_is_garbage(opts, &key, &dir, fsutil::now_unix()) {
            continue;
        }
        let bytes = fsutil::dir_size(&dir);
        if !opts.dry_run {
            fsutil::remove_via_tmp(&cache.root, &dir, &key, "gc")?;
        }
        report.removed_entries.push((key, bytes));
        report.bytes_freed += bytes;
    }

    // Partial state: finished keys, and keys outside the keep set.
    for item in fsutil::read_dir_if_exists(&cache.root.join(PARTIAL))? {
        let Some(key) = key::parse_canonical(&item.name) else {
            continue;
        };
        if !item.file_type.is_dir() {
            continue;
        }
        let garbage = |c: &Cache| {
            finished.contains(&key) || c.contains(&key) || opts.keep.as_ref().is_some_and(|keep| !keep.contains(&key))
        };
        let partial = cache.partial(&key);
        let _lock = match probe(cache, &key, opts.dry_run)? {
            Probe::Busy => {
                if garbage(cache) {
                    note_skipped(&mut report, key);
                }
                continue;
            }
            Probe::Held(l) => Some(l),
            Probe::Free => None,
        };
        if garbage(cache) {
            let bytes = fsutil::dir_size(&item.path);
            if !opts.dry_run {
                partial.remove()?;
            }
            report.removed_partials.push(key);
            report.bytes_freed += bytes;
        } else {
            for (path, bytes) in partial.clean_abandoned_tmp(opts.dry_run)? {
                report.removed_tmp.push(path);
                report.bytes_freed += bytes;
            }
        }
    }

    // Entries moved aside as damaged (`run` or `verify --fix` put them there): garbage.
    for item in fsutil::read_dir_if_exists(&cache.root.join(super::integrity::QUARANTINE))? {
        remove_tmp_item(&mut report, &item.path, opts.dry_run)?;
    }

    // Temporary entries and files whose writer is gone.
    for item in fsutil::read_dir_if_exists(&cache.root.join(TMP))? {
        let Some((key, pid)) = fsutil::parse_tmp_name(&item.name) else {
            // Not ours to interpret: only remove when clearly ancient.
            let old = fs::symlink_metadata(&item.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|a| a > fsutil::STALE_AGE);
            if old {
                remove_tmp_item(&mut report, &item.path, opts.dry_run)?;
            }
            continue;
        };
        if !fsutil::is_abandoned(pid, &item.path) {
            continue;
        }
        let _lock = match probe(cache, &key, opts.dry_run)? {
            Probe::Busy => continue,
            Probe::Held(l) => Some(l),
            Probe::Free => None,
        };
        remove_tmp_item(&mut report, &item.path, opts.dry_run)?;
    }

    Ok(report)
}

fn remove_tmp_item(report: &mut GcReport, path: &Path, dry_run: bool) -> Result<()> {
    let bytes = fsutil::dir_size(path);
    if !dry_run {
        fsutil::remove_any(path)?;
    }
    report.removed_tmp.push(path.to_path_buf());
    report.bytes_freed += bytes;
    Ok(())
}
