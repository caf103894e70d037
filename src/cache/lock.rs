//! Per-key advisory locks: `<root>/locks/<key>.lock`, std file locks (flock on Unix).
//!
//! Locks belong to an open file, so two `KeyLock`s on the same key conflict even inside one
//! process (each call opens the lock file anew). Lock files are never deleted: removing one
//! while another process has it open would let two holders lock different inodes.

use std::fs::{File, OpenOptions, TryLockError};

use anyhow::{Context, Result};

use super::fsutil::{self, LOCKS};
use super::{Cache, Key, KeyLock};

fn open(cache: &Cache, key: &Key) -> Result<File> {
    fsutil::create_dir_all(&cache.root.join(LOCKS))?;
    let path = cache.lock_path(key);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))
}

pub(super) fn lock(cache: &Cache, key: &Key) -> Result<KeyLock> {
    let file = open(cache, key)?;
    file.lock().with_context(|| format!("locking {}", cache.lock_path(key).display()))?;
    Ok(KeyLock { file, key: *key, shared: false })
}

pub(super) fn lock_shared(cache: &Cache, key: &Key) -> Result<KeyLock> {
    let file = open(cache, key)?;
    file.lock_shared().with_context(|| format!("locking (shared) {}", cache.lock_path(key).display()))?;
    Ok(KeyLock { file, key: *key, shared: true })
}

/// Non-blocking exclusive lock of an already open lock file.
fn try_file(cache: &Cache, key: &Key, file: File) -> Result<Option<KeyLock>> {
    match file.try_lock() {
        Ok(()) => Ok(Some(KeyLock { file, key: *key, shared: false })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", cache.lock_path(key).display())),
    }
}

pub(super) fn try_lock(cache: &Cache, key: &Key) -> Result<Option<KeyLock>> {
    let file = open(cache, key)?;
    try_file(cache, key, file)
}

/// Outcome of a lock attempt by gc.
pub(super) enum Probe {
    Held(KeyLock),
    /// Dry run and no lock file: nobody holds it (nothing was created to find out).
    Free,
    Busy,
}

/// Like `try_lock`, but a dry run creates no lock file.
pub(super) fn probe(cache: &Cache, key: &Key, dry_run: bool) -> Result<Probe> {
    let file = if dry_run {
        let path = cache.lock_path(key);
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Probe::Free),
            Err(e) => return Err(e).with_context(|| format!("opening lock file {}", path.display())),
        }
    } else {
        open(cache, key)?
    };
    Ok(match try_file(cache, key, file)? {
        Some(l) => Probe::Held(l),
        None => Probe::Busy,
    })
}

impl KeyLock {
    /// The locked key.
    pub fn key(&self) -> Key {
        self.key
    }
    /// True for a lock taken with [`Cache::lock_shared`].
    pub fn is_shared(&self) -> bool {
        self.shared
    }
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        // Closing the file releases it too; unlocking explicitly also covers a descriptor that
        // was inherited by a child process.
        let _ = self.file.unlock();
    }
}
