//! blake3 hashing of bytes, files and canonical JSON.

use std::io;
use std::path::Path;

use serde_json::Value;

/// Files larger than this are hashed memory-mapped on all cores.
const MMAP_THRESHOLD: u64 = 1 << 20;

/// blake3 of a file's bytes, as lowercase hex.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let len = fs_err::metadata(path)?.len();
    let mut h = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        h.update_mmap_rayon(path)
            .map_err(|e| io::Error::new(e.kind(), format!("hashing `{}`: {e}", path.display())))?;
    } else {
        h.update(&fs_err::read(path)?);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// blake3 of bytes, as lowercase hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// JSON with object keys sorted recursively: the same value always gives
/// the same bytes, whatever order the YAML had.
pub fn canonical_json(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).expect("JSON values always serialise")
}

/// blake3 of a value's canonical JSON.
pub fn hash_json(v: &Value) -> String {
    hash_bytes(canonical_json(v).as_bytes())
}
