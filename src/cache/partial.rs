//! Resumable state of unfinished stages: `<root>/partial/<key>/ckpt-<step>/`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::fsutil;
use super::{Checkpoint, PartialDir};

const CKPT_PREFIX: &str = "ckpt-";
pub(super) const TMP_PREFIX: &str = ".tmp-";

pub(super) fn ckpt_name(step: u64) -> String {
    format!("{CKPT_PREFIX}{step:012}")
}

/// Step of a `ckpt-<digits>` name.
fn parse_ckpt(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(CKPT_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Pid of a `.tmp-<pid>-<nonce>` name.
pub(super) fn parse_tmp_pid(name: &str) -> Option<u32> {
    name.strip_prefix(TMP_PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes a directory on drop unless disarmed.
struct TmpGuard(Option<PathBuf>);
impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

impl PartialDir {
    /// All complete checkpoints, ascending by step.
    fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let mut out: Vec<Checkpoint> = fsutil::read_dir_if_exists(&self.dir)?
            .into_iter()
            .filter(|it| it.file_type.is_dir())
            .filter_map(|it| parse_ckpt(&it.name).map(|step| Checkpoint { step, dir: it.path }))
            .collect();
        out.sort_by_key(|c| c.step);
        Ok(out)
    }

    pub(super) fn latest_impl(&self) -> Result<Option<Checkpoint>> {
        Ok(self.checkpoints()?.pop())
    }

    /// Moves a directory inside the partial dir out of `ckpt-*` naming (so `latest` stops
    /// seeing it at once), then deletes it.
    fn discard(&self, path: &Path) -> Result<()> {
        let aside = self.dir.join(format!("{TMP_PREFIX}{}-{}", std::process::id(), fsutil::nonce()));
        match fs::rename(path, &aside) {
            Ok(()) => fsutil::remove_any(&aside),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("moving {} to {}", path.display(), aside.display())),
        }
    }

    /// Deletes `.tmp-*` directories left behind by processes that are gone; returns them.
    pub(super) fn clean_abandoned_tmp(&self, dry_run: bool) -> Result<Vec<(PathBuf, u64)>> {
        let mut removed = Vec::new();
        for it in fsutil::read_dir_if_exists(&self.dir)? {
            let Some(pid) = parse_tmp_pid(&it.name) else {
                continue;
            };
            if fsutil::is_abandoned(pid, &it.path) {
                let bytes = fsutil::dir_size(&it.path);
                if !dry_run {
                    fsutil::remove_any(&it.path)?;
                }
                removed.push((it.path, bytes));
            }
        }
        Ok(removed)
    }

    pub(super) fn save_impl(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<Checkpoint> {
        fsutil::create_dir_all(&self.dir)?;
        let pid = std::process::id();
        let tmp = fsutil::create_unique_dir(&self.dir, |n| format!("{TMP_PREFIX}{pid}-{n}"))?;
        let mut guard = TmpGuard(Some(tmp.clone()));

        write(&tmp).with_context(|| format!("writing checkpoint {step} into {}", tmp.display()))?;
        fsutil::sync_tree(&tmp)?;

        let target = self.dir.join(ckpt_name(step));
        if fs::symlink_metadata(&target).is_ok() {
            self.discard(&target)?;
        }
        fs::rename(&tmp, &target).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
        guard.0 = None;
        fsutil::sync_dir(&self.dir)?;

        // The checkpoint just written is the one to resume from: drop every other one.
        for old in self.checkpoints()? {
            if old.step != step {
                self.discard(&old.dir)?;
            }
        }
        self.clean_abandoned_tmp(false)?;
        Ok(Checkpoint { step, dir: target })
    }

    pub(super) fn remove_impl(&self) -> Result<()> {
        fsutil::remove_via_tmp(&self.root, &self.dir, &self.key, "partial")
    }
}
