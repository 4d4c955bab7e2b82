//! Step keys: what a step's result depends on, printable component by component.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::hash::hash_json;

/// One input as it enters a key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputHash {
    /// The upstream instance (for explanations only: renaming a step does not
    /// change keys).
    pub step: String,
    /// The selected group, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The upstream output object's content hash.
    pub hash: String,
    /// For `prep@split.train`: the step the group comes from, and its output hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<(String, String)>,
}

/// Everything a step key is made of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyComponents {
    /// The step kind.
    pub kind: String,
    /// The kind's implementation version.
    pub version: u32,
    /// Canonical params.
    pub params: Value,
    /// Input slot → inputs.
    #[serde(default)]
    pub inputs: BTreeMap<String, Vec<InputHash>>,
    /// Workspace files (relative path → content hash).
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

impl KeyComponents {
    /// The step key: blake3 over kind, version, params, input hashes, files.
    pub fn key(&self) -> String {
        let inputs: BTreeMap<&String, Vec<Value>> = self
            .inputs
            .iter()
            .map(|(slot, v)| {
                let refs = v.iter().map(|i| match &i.select {
                    None => json!([i.hash, i.group]),
                    Some((_, h)) => json!([i.hash, i.group, h]),
                });
                (slot, refs.collect())
            })
            .collect();
        hash_json(&json!({
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "inputs": inputs,
            "files": self.files,
        }))
    }

    /// The key of one item of a map step: the mapped slot is replaced by the
    /// item's own object hash, so other cases do not matter.
    pub fn item_key(&self, mapped_slot: &str, item_hash: &str) -> String {
        let others: BTreeMap<&String, Vec<&String>> = self
            .inputs
            .iter()
            .filter(|(slot, _)| slot.as_str() != mapped_slot)
            .map(|(slot, v)| (slot, v.iter().map(|i| &i.hash).collect()))
            .collect();
        hash_json(&json!({
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "item": item_hash,
            "others": others,
            "files": self.files,
        }))
    }
}

/// Flattens nested params to `a.b.c → value` for explanations.
pub fn flatten(v: &Value) -> BTreeMap<String, Value> {
    fn go(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    go(&p, x, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    go("", v, &mut out);
    out
}

/// Human form of a param value (`0.0001`, `[1.5, 1.5, 2.0]`, `"x"`).
pub fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
