//! Small filesystem helpers: unique names, fsync, directory walks, sizes, staleness.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use super::Key;

/// Name of the directory (under the cache root) holding entries being written or deleted.
pub(super) const TMP: &str = "tmp";
pub(super) const PARTIAL: &str = "partial";
pub(super) const LOCKS: &str = "locks";

/// A temporary directory whose writer process has vanished is only considered stale when
/// its process is gone, or (where that cannot be checked, or the pid may have been reused)
/// when it is older than this.
pub(super) const STALE_AGE: Duration = Duration::from_secs(24 * 3600);

pub(super) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A fresh token made of hex digits only (no '.' or '-'), unique within this process and
/// very likely across processes.
pub(super) fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{t:08x}{n:x}")
}

/// Creates a new directory `parent/<make_name(nonce)>` that did not exist before.
pub(super) fn create_unique_dir(parent: &Path, make_name: impl Fn(&str) -> String) -> Result<PathBuf> {
    for _ in 0..1000 {
        let path = parent.join(make_name(&nonce()));
        match fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating directory {}", path.display())),
        }
    }
    bail!("could not create a unique directory in {}", parent.display())
}

pub(super) fn create_dir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating directory {}", path.display()))
}

/// fsync of one file's data and metadata.
pub(super) fn sync_file(path: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(cfg!(windows))
        .open(path)
        .with_context(|| format!("opening {} to fsync", path.display()))?;
    file.sync_all().with_context(|| format!("fsync {}", path.display()))
}

/// fsync of a directory (makes renames and creations inside it durable). No-op off Unix.
pub(super) fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = File::open(path).with_context(|| format!("opening directory {} to fsync", path.display()))?;
        dir.sync_all().with_context(|| format!("fsync directory {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// fsyncs every file and directory below `dir`, then `dir` itself.
pub(super) fn sync_tree(dir: &Path) -> Result<()> {
    for entry in read_dir_sorted(dir)? {
        let ty = entry.file_type;
        if ty.is_dir() {
            sync_tree(&entry.path)?;
        } else if ty.is_file() {
            sync_file(&entry.path)?;
        }
    }
    sync_dir(dir)
}

/// Writes `bytes` to `path` and fsyncs it (the file must not be visible to readers yet).
pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("fsync {}", path.display()))
}

pub(super) struct DirItem {
    pub name: String,
    pub path: PathBuf,
    pub file_type: fs::FileType,
}

/// Entries of `dir`, sorted by name, not following symlinks. Errors on non-UTF-8 names.
pub(super) fn read_dir_sorted(dir: &Path) -> Result<Vec<DirItem>> {
    let mut out = Vec::new();
    let rd = fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    for entry in rd {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let path = entry.path();
        let name = match entry.file_name().into_string() {
            Ok(name) => name,
            Err(_) => bail!("non-UTF-8 file name {}", path.display()),
        };
        let file_type = entry.file_type().with_context(|| format!("reading file type of {}", path.display()))?;
        out.push(DirItem { name, path, file_type });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Like [`read_dir_sorted`], but an absent directory is empty.
pub(super) fn read_dir_if_exists(dir: &Path) -> Result<Vec<DirItem>> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
        Ok(_) => read_dir_sorted(dir),
    }
}

pub(super) struct WalkedFile {
    /// '/'-separated path relative to the walk root.
    pub rel: String,
    pub path: PathBuf,
    /// Regular file (false: symlink, socket, ...).
    pub regular: bool,
}

/// Every non-directory below `root`, recursively, sorted by relative path.
pub(super) fn walk_files(root: &Path) -> Result<Vec<WalkedFile>> {
    fn go(dir: &Path, prefix: &str, out: &mut Vec<WalkedFile>) -> Result<()> {
        for item in read_dir_sorted(dir)? {
            let rel = if prefix.is_empty() { item.name.clone() } else { format!("{prefix}/{}", item.name) };
            if item.file_type.is_dir() {
                go(&item.path, &rel, out)?;
            } else {
                out.push(WalkedFile { rel, path: item.path, regular: item.file_type.is_file() });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    go(root, "", &mut out)?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Total size in bytes of the non-directories below `path` (0 if absent).
pub(super) fn dir_size(path: &Path) -> u64 {
    dir_usage(path).0
}

/// [`dir_size`], and the files among
/// them that have other hard links (an entry sharing an unchanged file with its input), as
/// (device, inode) → size, so totals can count them once.
pub(super) fn dir_usage(path: &Path) -> (u64, Vec<super::LinkedFile>) {
    let mut linked = Vec::new();
    let bytes = usage(path, &mut linked);
    (bytes, linked)
}

fn usage(path: &Path, linked: &mut Vec<super::LinkedFile>) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        if meta.is_file() && meta.nlink() > 1 {
            linked.push(((meta.dev(), meta.ino()), meta.len()));
        }
        return meta.len();
    }
    let Ok(rd) = fs::read_dir(path) else {
        return 0;
    };
    rd.filter_map(|e| e.ok()).map(|e| usage(&e.path(), linked)).sum()
}

/// blake3 of one file (mmap + rayon for big files) and the number of bytes hashed.
pub(super) fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).with_context(|| format!("hashing {}", path.display()))?;
    Ok((hasher.count(), hasher.finalize().to_hex().to_string()))
}

/// Removes a directory (or file) without ever leaving a half-deleted tree at `path`: it is
/// first renamed to `<root>/tmp/<key>.<pid>.<nonce>.<what>`, then deleted. Absent: Ok.
pub(super) fn remove_via_tmp(cache_root: &Path, path: &Path, key: &Key, what: &str) -> Result<()> {
    let tmp_root = cache_root.join(TMP);
    create_dir_all(&tmp_root)?;
    let pid = std::process::id();
    let mut aside = None;
    for _ in 0..1000 {
        let target = tmp_root.join(format!("{}.{pid}.{}.{what}", key.to_hex(), nonce()));
        if fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        match fs::rename(path, &target) {
            Ok(()) => {
                aside = Some(target);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("moving {} to {}", path.display(), target.display())),
        }
    }
    let Some(aside) = aside else {
        bail!("could not find a free temporary name for {}", path.display());
    };
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    remove_any(&aside)
}

/// Deletes a file or a directory tree. Absent: Ok.
pub(super) fn remove_any(path: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    match res {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.with_context(|| format!("removing {}", path.display())),
    }
}

/// Key and writer pid of a name in `<root>/tmp/`: `<key>.<pid>.<nonce>[.<what>]`.
pub(super) fn parse_tmp_name(name: &str) -> Option<(Key, u32)> {
    let mut parts = name.split('.');
    let key = super::key::parse_canonical(parts.next()?)?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((key, pid))
}

/// Whether a process with this pid exists; None where that cannot be told.
pub(crate) fn pid_alive(pid: u32) -> Option<bool> {
    if cfg!(target_os = "linux") && Path::new("/proc/self").exists() {
        Some(Path::new("/proc").join(pid.to_string()).exists())
    } else {
        None
    }
}

/// Whether a temporary file or directory written by `pid` is abandoned: never for this process;
/// otherwise when that process is gone or the item is older than [`STALE_AGE`].
pub(super) fn is_abandoned(pid: u32, path: &Path) -> bool {
    if pid == std::process::id() {
        return false;
    }
    if pid_alive(pid) == Some(false) {
        return true;
    }
    let age = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    age.is_some_and(|a| a > STALE_AGE)
}
