//! The stat cache: (path, size, mtime, inode) → content hash, so unchanged
//! large inputs are not re-read on every run.
//!
//! Only an optimisation: an entry is trusted only when size, mtime and inode
//! all match *and* the file's mtime was safely older than the moment it was
//! hashed (git's "racy" rule: a file modified in the same instant it was
//! hashed may have changed again without its mtime moving).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How much older than the hashing moment an mtime must be to be trusted.
const RACY_NS: i128 = 2_000_000_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    hashed_at_ns: i128,
    hash: String,
}

/// A persistent stat cache (`cache/stat-v1.json`).
#[derive(Debug)]
pub struct StatCache {
    path: PathBuf,
    entries: Mutex<BTreeMap<PathBuf, Entry>>,
    dirty: Mutex<bool>,
    /// Files actually read (for tests and `--verbose`).
    pub rehashed: std::sync::atomic::AtomicUsize,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

impl StatCache {
    /// Opens (or starts) the cache stored at `path`; a corrupt file is ignored.
    pub fn open(path: &Path) -> Self {
        let entries = fs_err::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatCache {
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
            rehashed: Default::default(),
        }
    }

    /// The content hash of `file`, from the cache when it can be trusted.
    pub fn hash(&self, file: &Path) -> std::io::Result<String> {
        let abs = std::path::absolute(file)?;
        let md = fs_err::metadata(&abs)?;
        let mtime_ns = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
        if let Some(e) = self.entries.lock().unwrap().get(&abs) {
            if e.size == md.len()
                && e.mtime_ns == mtime_ns
                && e.inode == md.ino()
                && e.hashed_at_ns - mtime_ns > RACY_NS
            {
                return Ok(e.hash.clone());
            }
        }
        let hashed_at_ns = now_ns();
        let hash = super::hash::hash_file(&abs)?;
        self.rehashed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Entry {
            size: md.len(),
            mtime_ns,
            inode: md.ino(),
            hashed_at_ns,
            hash: hash.clone(),
        };
        self.entries.lock().unwrap().insert(abs, entry);
        *self.dirty.lock().unwrap() = true;
        Ok(hash)
    }

    /// Writes the cache back (atomically) if anything changed.
    pub fn save(&self) -> std::io::Result<()> {
        if !*self.dirty.lock().unwrap() {
            return Ok(());
        }
        // Merge with what another process may have saved meanwhile.
        let mut merged: BTreeMap<PathBuf, Entry> = fs_err::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mine = self.entries.lock().unwrap();
        merged.extend(mine.iter().map(|(k, v)| (k.clone(), v.clone())));
        // Drop entries for files that no longer exist.
        merged.retain(|p, _| p.exists());
        let bytes = serde_json::to_vec(&merged).map_err(std::io::Error::other)?;
        super::store::write_atomic(&self.path, &bytes)
    }
}
