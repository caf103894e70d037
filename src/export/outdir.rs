//! The export's output directory, written atomically: everything goes into a temporary
//! directory beside it (`.<name>.rpt-export.<pid>.<nanos>`), which is synced and renamed into
//! place only when complete. A killed export leaves at most that hidden sibling, never a
//! half-written directory, and the next export beside it removes such leftovers of processes
//! that are gone; nothing is written anywhere else.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// Why the directory cannot be written (a usage problem, with the fix).
#[derive(Debug)]
pub struct Refused(pub String);

/// An output directory being built.
pub struct OutDir {
    target: PathBuf,
    tmp: PathBuf,
    /// The target existed (empty, or replaced with `--force`).
    existed: bool,
    done: bool,
}

/// The directory that holds `dir` (`.` for a bare name).
fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl OutDir {
    /// Checks that `dir` may be written (absent, an empty directory, or any directory with
    /// `force`; never the cache, inside it, or the current directory or one above it) and
    /// creates the temporary sibling.
    pub fn prepare(dir: &Path, force: bool, cache_root: &Path) -> Result<Result<OutDir, Refused>> {
        let refuse = |m: String| Ok(Err(Refused(m)));
        let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            return refuse(format!("{} is not a directory name to export into: name a new folder", dir.display()));
        };
        let parent = parent_of(dir);
        if !parent.is_dir() {
            return refuse(format!(
                "the folder {} that would hold {} does not exist: create it first (export writes only {name} itself)",
                parent.display(),
                dir.display()
            ));
        }
        let existed = match fs::symlink_metadata(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
            Ok(m) if m.file_type().is_symlink() => {
                return refuse(format!(
                    "{} is a symbolic link: name the real directory (or a new one) to export into",
                    dir.display()
                ))
            }
            Ok(m) if !m.is_dir() => {
                return refuse(format!("{} exists and is not a directory: choose another path", dir.display()))
            }
            Ok(_) => true,
        };
        // Never into the cache, and never over the current directory or one that holds it.
        let canon_parent = parent.canonicalize().with_context(|| format!("resolving {}", parent.display()))?;
        let full = canon_parent.join(&name);
        if let Ok(cache) = cache_root.canonicalize() {
            if full.starts_with(&cache) || cache.starts_with(&full) {
                return refuse(format!(
                    "{} is {} the cache ({}): export into a folder outside it",
                    dir.display(),
                    if full.starts_with(&cache) { "inside" } else { "a folder holding" },
                    cache_root.display()
                ));
            }
        }
        if let Ok(cwd) = std::env::current_dir().and_then(|d| d.canonicalize()) {
            if cwd.starts_with(&full) {
                return refuse(format!(
                    "{} is the current directory or holds it: export into a new folder, e.g. {}/model",
                    dir.display(),
                    dir.display()
                ));
            }
        }
        if existed {
            let mut entries: Vec<String> = fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            if !entries.is_empty() && !force {
                entries.sort();
                let shown: Vec<&str> = entries.iter().take(3).map(String::as_str).collect();
                return refuse(format!(
                    "{} is not empty ({} entries: {}{}): pass --force to replace its contents, or export into a new folder",
                    dir.display(),
                    entries.len(),
                    shown.join(", "),
                    if entries.len() > 3 { ", …" } else { "" }
                ));
            }
        }
        remove_abandoned(&parent, &format!(".{name}.rpt-export."));
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = parent.join(format!(".{name}.rpt-export.{}.{nanos}", std::process::id()));
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Ok(OutDir { target: dir.to_path_buf(), tmp, existed, done: false }))
    }

    /// Where the files go until [`OutDir::commit`].
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs the files and moves the directory into place (replacing what `--force` allowed).
    pub fn commit(mut self) -> Result<()> {
        for entry in fs::read_dir(&self.tmp)? {
            let p = entry?.path();
            if p.is_file() {
                fs::File::open(&p)?.sync_all().with_context(|| format!("syncing {}", p.display()))?;
            }
        }
        sync_dir(&self.tmp)?;
        let empty_or_absent =
            !self.existed || fs::read_dir(&self.target).map(|mut d| d.next().is_none()).unwrap_or(true);
        if empty_or_absent {
            // rename(2) replaces an empty directory atomically.
            fs::rename(&self.tmp, &self.target)
                .with_context(|| format!("renaming {} to {}", self.tmp.display(), self.target.display()))?;
        } else {
            swap_in(&self.tmp, &self.target)?;
            // `tmp` now holds the old contents.
            fs::remove_dir_all(&self.tmp)
                .with_context(|| format!("removing the replaced contents (now in {})", self.tmp.display()))?;
        }
        self.done = true;
        sync_dir(&parent_of(&self.target))
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Removes the scratch directories `<prefix><pid>…` in `parent` whose process is gone (a
/// killed export's leftovers); best effort, never this process's own.
pub fn remove_abandoned(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(prefix).and_then(|rest| rest.split('.').next()?.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|&p| p != std::process::id()) {
            if crate::cache::pid_alive(pid) == Some(false) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

/// Exchanges `new` and `target` atomically where the filesystem can (Linux `renameat2` with
/// `RENAME_EXCHANGE`); elsewhere moves `target` aside first (a kill in between leaves `target`
/// absent and its old contents in the hidden sibling, never a mixture).
fn swap_in(new: &Path, target: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt as _;
        let a = CString::new(new.as_os_str().as_bytes())?;
        let b = CString::new(target.as_os_str().as_bytes())?;
        // SAFETY: two valid NUL-terminated paths relative to the current directory.
        let rc =
            unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if rc == 0 {
            return Ok(());
        }
    }
    let aside = new.with_extension("old");
    fs::rename(target, &aside).with_context(|| format!("moving {} aside", target.display()))?;
    fs::rename(new, target).with_context(|| format!("renaming {} to {}", new.display(), target.display()))?;
    fs::rename(&aside, new).with_context(|| format!("moving {} back for removal", aside.display()))?;
    Ok(())
}
