//! The content-addressed store: hashing, objects and manifests, step keys,
//! locks and leases, the stat cache, lock files and run records.

pub mod hash;
pub mod key;
pub mod lock;
pub mod lockfile;
pub mod manifest;
pub mod runs;
pub mod statcache;
pub mod store;

pub use key::{InputHash, KeyComponents};
pub use lockfile::{LockEntry, LockFile};
pub use manifest::Manifest;
pub use runs::{RunRecord, StepRecord, StepStatus};
pub use statcache::StatCache;
pub use store::{KeyEntry, Store, StoreError};
