//! `manifest.json`: what an artifact directory holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest of an object: its type, its files with their blake3, its
/// items (cases, each an object of its own), groups and metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Artifact type (`dataset`, `model`, `metrics`, `files`, `item`).
    pub kind: String,
    /// Relative path → blake3 hex of the file's bytes.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Case id → object hash of the item.
    #[serde(default)]
    pub items: BTreeMap<String, String>,
    /// Group name → case ids.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Free metadata.
    #[serde(default)]
    pub meta: serde_json::Value,
}
