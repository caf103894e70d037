//! Integrity check of committed entries against their manifests.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;

use anyhow::Result;

use super::entry::{is_shard_name, read_manifest, LAST_USED, MANIFEST};
use super::{fsutil, key, Cache, Key, VerifyProblem};

struct Report {
    problems: Vec<VerifyProblem>,
}

impl Report {
    fn add(&mut self, key: Option<Key>, dir: &Path, problem: impl Into<String>) {
        self.problems.push(VerifyProblem { key, dir: dir.to_path_buf(), problem: problem.into() });
    }
}

/// A manifest path must be relative, '/'-separated, without empty, `.` or `..` components.
fn valid_rel_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && !Path::new(p).is_absolute()
}

/// An input whose entry now holds other content than the entry was computed from (it was
/// damaged, then recomputed or replaced). Inputs that are gone are not a problem here.
pub(super) fn stale_input(cache: &Cache, manifest: &super::Manifest) -> Option<String> {
    manifest.inputs.iter().find_map(|rec| match read_manifest(&cache.entry_dir(&rec.key)) {
        Ok(Some(m)) if m.content() != rec.content => Some(format!(
            "computed from other content of input {} than that entry holds now (recompute it)",
            rec.key.short()
        )),
        _ => None,
    })
}

/// The problems of an entry's files against its (already checked) manifest: every file present,
/// of its size and hash, and nothing unlisted; empty when intact.
pub(super) fn check_files(key: Key, dir: &Path, manifest: &super::Manifest) -> Vec<String> {
    let mut report = Report { problems: Vec::new() };
    verify_files(&mut report, key, dir, manifest);
    report.problems.into_iter().map(|p| p.problem).collect()
}

pub(super) fn verify(cache: &Cache) -> Result<Vec<VerifyProblem>> {
    let mut report = Report { problems: Vec::new() };
    for shard in fsutil::read_dir_if_exists(&cache.root)? {
        if !is_shard_name(&shard.name) || !shard.file_type.is_dir() {
            continue;
        }
        let items = match fsutil::read_dir_sorted(&shard.path) {
            Ok(items) => items,
            Err(e) => {
                report.add(None, &shard.path, format!("cannot list shard directory: {e:#}"));
                continue;
            }
        };
        for item in items {
            let key = key::parse_canonical(&item.name).filter(|_| item.name.starts_with(&shard.name));
            match key {
                Some(key) if item.file_type.is_dir() => verify_entry(&mut report, cache, key, &item.path),
                _ => report.add(None, &item.path, "not a cache entry (unexpected name or type)"),
            }
        }
    }
    Ok(report.problems)
}

fn verify_entry(report: &mut Report, cache: &Cache, key: Key, dir: &Path) {
    let manifest = match read_manifest(dir) {
        Ok(Some(m)) => m,
        Ok(None) => {
            report.add(Some(key), dir, "missing manifest.json");
            return;
        }
        Err(e) => {
            report.add(Some(key), dir, format!("invalid manifest.json: {e:#}"));
            return;
        }
    };
    if manifest.key != key {
        report.add(Some(key), dir, format!("manifest names key {} but lies in the directory of {}", manifest.key, key));
    }
    if let Some(problem) = manifest.seal_problem() {
        report.add(Some(key), dir, problem);
    }
    if let Some(problem) = stale_input(cache, &manifest) {
        report.add(Some(key), dir, problem);
    }
    verify_files(report, key, dir, &manifest);
}

fn verify_files(report: &mut Report, key: Key, dir: &Path, manifest: &super::Manifest) {
    let mut listed = HashSet::new();
    for rec in &manifest.files {
        if !valid_rel_path(&rec.path) || rec.path == MANIFEST || rec.path == LAST_USED {
            report.add(Some(key), dir, format!("invalid file path in manifest: {:?}", rec.path));
            continue;
        }
        if !listed.insert(rec.path.as_str()) {
            report.add(Some(key), dir, format!("file listed twice in manifest: {}", rec.path));
            continue;
        }
        let path = dir.join(&rec.path);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.add(Some(key), dir, format!("missing file {}", rec.path));
                continue;
            }
            Err(e) => {
                report.add(Some(key), dir, format!("cannot read {}: {e}", rec.path));
                continue;
            }
        };
        if !meta.is_file() {
            report.add(Some(key), dir, format!("{} is not a regular file", rec.path));
            continue;
        }
        if meta.len() != rec.size {
            report.add(
                Some(key),
                dir,
                format!("size mismatch for {}: manifest says {} bytes, found {}", rec.path, rec.size, meta.len()),
            );
            continue;
        }
        match fsutil::hash_file(&path) {
            Ok((_, hash)) if hash == rec.blake3 => {}
            Ok((_, hash)) => report.add(
                Some(key),
                dir,
                format!("hash mismatch for {}: manifest {}, found {}", rec.path, rec.blake3, hash),
            ),
            Err(e) => report.add(Some(key), dir, format!("cannot hash {}: {e:#}", rec.path)),
        }
    }

    match fsutil::walk_files(dir) {
        Ok(files) => {
            for f in files {
                let ours = f.rel == MANIFEST || f.rel == LAST_USED;
                if !ours && !listed.contains(f.rel.as_str()) {
                    report.add(Some(key), dir, format!("file not listed in manifest: {}", f.rel));
                }
            }
        }
        Err(e) => report.add(Some(key), dir, format!("cannot list files: {e:#}")),
    }
}
