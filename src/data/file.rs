//! Local text sources: a file, or a directory of files, and their content digests.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
    time::SystemTime,
};

use anyhow::{bail, Context as _, Result};

use super::error::DataError;

/// The files a local source reads, in order: the file itself, or a directory's regular files
/// (symlinks followed; not recursive; names starting with `.` skipped), sorted by file name
/// (byte order).
pub(crate) fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|_| DataError::MissingFile(path.to_path_buf()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let p = entry.path();
        if std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false) {
            files.push(p);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        bail!("data directory {} holds no files", path.display());
    }
    Ok(files)
}

/// A file's content as UTF-8 text.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::Error::from(DataError::MissingFile(path.into())),
        _ => anyhow::Error::from(e).context(format!("reading {}", path.display())),
    })?;
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

type Stamp = (PathBuf, u64, Option<SystemTime>);

/// blake3 (hex) of a file's bytes, memoised in this process by (canonical path, size, mtime).
pub(crate) fn file_blake3(path: &Path) -> Result<String> {
    static MEMO: OnceLock<Mutex<HashMap<Stamp, String>>> = OnceLock::new();
    let canonical = path.canonicalize().map_err(|_| DataError::MissingFile(path.to_path_buf()))?;
    let meta = std::fs::metadata(&canonical)?;
    let stamp = (canonical, meta.len(), meta.modified().ok());
    let memo = MEMO.get_or_init(Default::default);
    if let Some(hex) = memo.lock().unwrap().get(&stamp) {
        return Ok(hex.clone());
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(&stamp.0).with_context(|| format!("hashing {}", path.display()))?;
    let hex = hasher.finalize().to_hex().to_string();
    memo.lock().unwrap().insert(stamp, hex.clone());
    Ok(hex)
}

/// The content digest of a local source: a file's blake3, or for a directory the blake3 of the
/// listing `"<name>\0<blake3 of the file>\n"` over its files in order (so renaming a file inside
/// the directory changes it, the directory's own path does not).
pub(crate) fn source_digest(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|_| DataError::MissingFile(path.to_path_buf()))?;
    if !meta.is_dir() {
        return file_blake3(path);
    }
    let mut listing = blake3::Hasher::new();
    for file in list_files(path)? {
        let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        listing.update(name.as_bytes());
        listing.update(b"\0");
        listing.update(file_blake3(&file)?.as_bytes());
        listing.update(b"\n");
    }
    Ok(listing.finalize().to_hex().to_string())
}
