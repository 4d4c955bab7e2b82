//! The content-addressed store: hashing, objects, manifests, step keys,
//! locks, the stat cache and run records.

pub mod manifest;
pub use manifest::Manifest;
