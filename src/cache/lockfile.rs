//! The lock file beside a pipeline (`demo.yaml` → `demo.lock`): per step,
//! its key components, key, output and metrics at the last successful run.
//! `status` diffs against it to explain why a step would run.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::key::KeyComponents;
use super::lock::{FileLock, LockMode};

/// One step's entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockEntry {
    /// The step key.
    pub key: String,
    /// What the key was made of.
    pub components: KeyComponents,
    /// The output object.
    pub output: String,
    /// Published metrics.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// The whole lock file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LockFile {
    /// Format version.
    pub version: u32,
    /// Step instance → entry.
    pub steps: BTreeMap<String, LockEntry>,
}

impl LockFile {
    /// Reads a lock file; a missing one is empty. A corrupt one is an error
    /// (it is never silently overwritten).
    pub fn load(path: &Path) -> Result<Self, String> {
        match fs_err::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                format!(
                    "`{}`: corrupt lock file ({e}); delete it to start afresh",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LockFile {
                version: 1,
                ..Default::default()
            }),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Read-modify-write under the lock beside the file, written atomically
    /// (so concurrent runs and kills never tear it), and only when `change`
    /// actually changed something.
    fn modify(path: &Path, change: impl FnOnce(&mut LockFile)) -> Result<(), String> {
        let guard = path.with_extension("lock.flock");
        let _l = FileLock::acquire(&guard, LockMode::Exclusive).map_err(|e| e.to_string())?;
        let before = Self::load(path)?;
        let mut lf = before.clone();
        lf.version = 1;
        change(&mut lf);
        if lf == before {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&lf).expect("serialises");
        super::store::write_atomic(path, &bytes).map_err(|e| e.to_string())
    }

    /// Records one step's entry.
    pub fn update(path: &Path, step: &str, entry: LockEntry) -> Result<(), String> {
        Self::modify(path, |lf| {
            lf.steps.insert(step.to_string(), entry);
        })
    }

    /// Drops entries of steps that no longer exist in the pipeline.
    pub fn retain(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<(), String> {
        Self::modify(path, |lf| lf.steps.retain(|k, _| keep(k)))
    }
}
