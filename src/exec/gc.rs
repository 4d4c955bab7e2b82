//! `gc`: removes objects that no lock file and no kept run references.

use crate::cache::store::GcReport;
use crate::cache::{LockFile, RunRecord, Store};

/// Collects garbage under the exclusive gc lock (waits for running `run`s).
pub fn collect(store: &Store, dry_run: bool) -> Result<GcReport, String> {
    let _l = store
        .gc_lock(crate::cache::lock::LockMode::Exclusive)
        .map_err(|e| e.to_string())?;
    let mut roots = Vec::new();
    for lock in store.roots() {
        let lf = LockFile::load(&lock)?;
        roots.extend(lf.steps.into_values().map(|e| e.output));
    }
    for r in RunRecord::list(&store.root().join("runs-v1"))
        .into_iter()
        .filter(|r| r.keep)
    {
        roots.extend(r.steps.into_values().filter_map(|s| s.output));
    }
    store.gc(roots, dry_run).map_err(|e| e.to_string())
}
