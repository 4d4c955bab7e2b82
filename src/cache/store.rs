//! The object store on disk.
//!
//! ```text
//! cache/
//! ├── objects-v1/<hash>/      an artifact: manifest.json + its files
//! ├── keys-v1/<key>.json      step key → output object (the "action cache")
//! ├── items-v1/<key>.json     map-step item key → output item object
//! ├── leases/<key>.lock       flock held while a key is being computed
//! ├── work/<key>/             a step's private area (checkpoints); survives crashes
//! ├── tmp/                    staging: objects are built here, then renamed in
//! ├── runs-v1/<id>.json       run records
//! ├── roots-v1/<id>           lock files that protect objects from `gc`
//! ├── quarantine/             objects `verify` found corrupt
//! ├── gc.lock                 shared by `run`, exclusive for `gc`
//! └── stat-v1.json            the stat cache
//! ```
//! Bump the `-v1` suffixes together when the layout changes.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::hash::{hash_file, hash_json};
use super::lock::{FileLock, LockMode};
use super::manifest::Manifest;

/// Errors of the store, each naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O failure on a path.
    #[error("`{path}`: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A manifest that does not parse.
    #[error("`{path}`: corrupt manifest: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The parse error.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Result alias for the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// What a key entry records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyEntry {
    /// The output object.
    pub output: String,
    /// Step instance that computed it (informational).
    pub step: String,
    /// Metrics it published.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// The content-addressed store rooted at a cache directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh unique file name component (pid, time, counter).
pub fn unique_name() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{t:x}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a file atomically: a temporary beside it, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        unique_name()
    ));
    fs_err::write(&tmp, bytes)?;
    fs_err::rename(&tmp, path)
}

/// A staging directory in `cache/tmp`; removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Objects checked.
    pub checked: usize,
    /// Corrupt objects moved to quarantine, with the reason.
    pub quarantined: Vec<(String, String)>,
}

/// What `gc` removed (or would remove).
#[derive(Debug, Default)]
pub struct GcReport {
    /// Objects removed, with their sizes in bytes.
    pub objects: Vec<(String, u64)>,
    /// Objects kept.
    pub kept: usize,
    /// Stale key entries and work directories removed.
    pub entries: usize,
}

impl Store {
    /// Opens (creating) the store.
    pub fn open(root: &Path) -> StoreResult<Self> {
        for d in [
            "objects-v1",
            "keys-v1",
            "items-v1",
            "leases",
            "work",
            "tmp",
            "runs-v1",
            "roots-v1",
        ] {
            let p = root.join(d);
            fs_err::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let root = std::path::absolute(root).map_err(io_err(root))?;
        Ok(Store { root })
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of an object.
    pub fn object_dir(&self, hash: &str) -> PathBuf {
        self.root.join("objects-v1").join(hash)
    }

    /// Whether a complete object is present.
    pub fn has_object(&self, hash: &str) -> bool {
        self.object_dir(hash).join("manifest.json").is_file()
    }

    /// Reads an object's manifest.
    pub fn manifest(&self, hash: &str) -> StoreResult<Manifest> {
        let path = self.object_dir(hash).join("manifest.json");
        let bytes = fs_err::read(&path).map_err(io_err(&path))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })
    }

    /// A new staging directory.
    pub fn staging(&self) -> StoreResult<Staging> {
        let dir = self.root.join("tmp").join(unique_name());
        fs_err::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Staging {
            dir,
            committed: false,
        })
    }

    /// Hashes the staged files, writes the manifest and renames the
    /// directory into `objects-v1/<hash>`. If the object already exists
    /// (another run produced identical content), the staging is dropped.
    pub fn commit(&self, mut staging: Staging, mut manifest: Manifest) -> StoreResult<String> {
        manifest.files = hash_tree(staging.path())?;
        let hash = hash_json(&serde_json::to_value(&manifest).expect("manifest serialises"));
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        let mpath = staging.path().join("manifest.json");
        fs_err::write(&mpath, bytes).map_err(io_err(&mpath))?;
        let target = self.object_dir(&hash);
        if self.has_object(&hash) {
            return Ok(hash);
        }
        if target.exists() {
            // A leftover without manifest (cannot happen through rename, but
            // a user may have deleted files by hand): replace it.
            let _ = fs_err::remove_dir_all(&target);
        }
        match fs_err::rename(staging.path(), &target) {
            Ok(()) => {
                staging.committed = true;
                Ok(hash)
            }
            // Lost a race with an identical object: fine, it is the same content.
            Err(_) if self.has_object(&hash) => Ok(hash),
            Err(e) => Err(io_err(&target)(e)),
        }
    }

    /// An object made of just a manifest (collections: items + groups).
    pub fn commit_manifest(&self, manifest: Manifest) -> StoreResult<String> {
        let staging = self.staging()?;
        self.commit(staging, manifest)
    }

    fn entry_path(&self, table: &str, key: &str) -> PathBuf {
        self.root.join(table).join(format!("{key}.json"))
    }

    fn get_entry(&self, table: &str, key: &str) -> Option<KeyEntry> {
        let bytes = fs_err::read(self.entry_path(table, key)).ok()?;
        let e: KeyEntry = serde_json::from_slice(&bytes).ok()?;
        self.is_complete(&e.output).then_some(e)
    }

    /// An object is usable when it and all its items are present.
    pub fn is_complete(&self, hash: &str) -> bool {
        match self.manifest(hash) {
            Ok(m) => m.items.values().all(|h| self.has_object(h)),
            Err(_) => false,
        }
    }

    fn put_entry(&self, table: &str, key: &str, e: &KeyEntry) -> StoreResult<()> {
        let path = self.entry_path(table, key);
        write_atomic(&path, &serde_json::to_vec_pretty(e).expect("serialises"))
            .map_err(io_err(&path))
    }

    /// The output of a step key, if computed and still present.
    pub fn get_key(&self, key: &str) -> Option<KeyEntry> {
        self.get_entry("keys-v1", key)
    }

    /// Records a step key's output.
    pub fn put_key(&self, key: &str, e: &KeyEntry) -> StoreResult<()> {
        self.put_entry("keys-v1", key, e)
    }

    /// The output of a map item key.
    pub fn get_item(&self, key: &str) -> Option<KeyEntry> {
        self.get_entry("items-v1", key)
    }

    /// Records a map item key's output.
    pub fn put_item(&self, key: &str, e: &KeyEntry) -> StoreResult<()> {
        self.put_entry("items-v1", key, e)
    }

    /// Takes the lease for computing `key` (blocks while another holds it).
    pub fn lease(&self, key: &str) -> StoreResult<FileLock> {
        let p = self.root.join("leases").join(format!("{key}.lock"));
        FileLock::acquire(&p, LockMode::Exclusive).map_err(io_err(&p))
    }

    /// Shared lock for runs; `gc` takes it exclusively.
    pub fn gc_lock(&self, mode: LockMode) -> StoreResult<FileLock> {
        let p = self.root.join("gc.lock");
        FileLock::acquire(&p, mode).map_err(io_err(&p))
    }

    /// The private work directory of a key (created).
    pub fn work_dir(&self, key: &str) -> StoreResult<PathBuf> {
        let p = self.root.join("work").join(key);
        fs_err::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// Removes a key's work directory (after its output is committed).
    pub fn remove_work_dir(&self, key: &str) {
        let _ = std::fs::remove_dir_all(self.root.join("work").join(key));
    }

    /// Registers a lock file as a gc root.
    pub fn add_root(&self, lock_file: &Path) -> StoreResult<()> {
        let abs = std::path::absolute(lock_file).map_err(io_err(lock_file))?;
        let id = super::hash::hash_bytes(abs.to_string_lossy().as_bytes());
        let p = self.root.join("roots-v1").join(&id[..16]);
        if !p.exists() {
            write_atomic(&p, abs.to_string_lossy().as_bytes()).map_err(io_err(&p))?;
        }
        Ok(())
    }

    /// Registered lock files that still exist.
    pub fn roots(&self) -> Vec<PathBuf> {
        let dir = self.root.join("roots-v1");
        let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .collect();
        out.sort();
        out
    }

    /// All object hashes present.
    pub fn objects(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("objects-v1"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }

    /// Re-hashes every object; corrupt ones move to `quarantine/` so the next
    /// run recomputes them.
    pub fn verify(&self) -> StoreResult<VerifyReport> {
        let mut report = VerifyReport::default();
        let quarantine =
            |hash: &str, reason: String, report: &mut VerifyReport| -> StoreResult<()> {
                let q = self.root.join("quarantine");
                fs_err::create_dir_all(&q).map_err(io_err(&q))?;
                let dest = q.join(format!("{hash}-{}", unique_name()));
                fs_err::rename(self.object_dir(hash), &dest).map_err(io_err(&dest))?;
                report.quarantined.push((hash.to_string(), reason));
                Ok(())
            };
        for hash in self.objects() {
            report.checked += 1;
            if let Err(reason) = self.check_object(&hash) {
                quarantine(&hash, reason, &mut report)?;
            }
        }
        // Collections whose items were just quarantined are incomplete too.
        loop {
            let mut changed = false;
            for hash in self.objects() {
                if let Ok(m) = self.manifest(&hash) {
                    if let Some((case, _)) = m.items.iter().find(|(_, h)| !self.has_object(h)) {
                        quarantine(&hash, format!("item `{case}` is missing"), &mut report)?;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        Ok(report)
    }

    fn check_object(&self, hash: &str) -> Result<(), String> {
        let m = self.manifest(hash).map_err(|e| e.to_string())?;
        let expected = hash_json(&serde_json::to_value(&m).expect("serialises"));
        if expected != hash {
            return Err(format!(
                "manifest hashes to {}, not its name",
                &expected[..12]
            ));
        }
        let dir = self.object_dir(hash);
        let actual = hash_tree(&dir).map_err(|e| e.to_string())?;
        for (f, h) in &m.files {
            match actual.get(f) {
                None => return Err(format!("file `{f}` is missing")),
                Some(a) if a != h => return Err(format!("file `{f}` has changed")),
                _ => {}
            }
        }
        if let Some(extra) = actual.keys().find(|f| !m.files.contains_key(*f)) {
            return Err(format!("unexpected file `{extra}`"));
        }
        Ok(())
    }

    /// Objects reachable from `roots` (an object and its items).
    pub fn reachable(&self, roots: impl IntoIterator<Item = String>) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = roots.into_iter().collect();
        while let Some(h) = stack.pop() {
            if seen.insert(h.clone()) {
                if let Ok(m) = self.manifest(&h) {
                    stack.extend(m.items.into_values());
                }
            }
        }
        seen
    }

    /// Removes every object not reachable from `roots`, and the key entries,
    /// leases and work directories that point at nothing live.
    pub fn gc(
        &self,
        roots: impl IntoIterator<Item = String>,
        dry_run: bool,
    ) -> StoreResult<GcReport> {
        let live = self.reachable(roots);
        let mut report = GcReport::default();
        for hash in self.objects() {
            if live.contains(&hash) {
                report.kept += 1;
                continue;
            }
            let dir = self.object_dir(&hash);
            report.objects.push((hash.clone(), dir_size(&dir)));
            if !dry_run {
                // Rename first so a concurrent reader never sees half an object.
                let doomed = self.root.join("tmp").join(format!("gc-{}", unique_name()));
                fs_err::rename(&dir, &doomed).map_err(io_err(&dir))?;
                let _ = fs_err::remove_dir_all(&doomed);
            }
        }
        for table in ["keys-v1", "items-v1"] {
            for e in std::fs::read_dir(self.root.join(table))
                .into_iter()
                .flatten()
                .flatten()
            {
                let keep = fs_err::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<KeyEntry>(&b).ok())
                    .is_some_and(|k| live.contains(&k.output));
                if !keep {
                    report.entries += 1;
                    if !dry_run {
                        let _ = fs_err::remove_file(e.path());
                    }
                }
            }
        }
        if !dry_run {
            // Nothing runs while gc holds the exclusive lock: leftovers are garbage.
            for d in ["tmp", "leases"] {
                for e in std::fs::read_dir(self.root.join(d))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let _ = std::fs::remove_dir_all(e.path())
                        .or_else(|_| std::fs::remove_file(e.path()));
                }
            }
        }
        Ok(report)
    }
}

/// Relative path → blake3 of every file under `dir` (manifest.json excluded).
pub fn hash_tree(dir: &Path) -> StoreResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs_err::read_dir(&d).map_err(io_err(&d))? {
            let e = e.map_err(io_err(&d))?;
            let p = e.path();
            let ft = e.file_type().map_err(io_err(&p))?;
            if ft.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .expect("under dir")
                    .to_string_lossy()
                    .into_owned();
                if rel == "manifest.json" {
                    continue;
                }
                out.insert(rel, hash_file(&p).map_err(io_err(&p))?);
            }
        }
    }
    Ok(out)
}

/// Total size of the files under a directory.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
