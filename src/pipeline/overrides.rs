//! `--set params.x=v` and `--set step.field=v` overrides.

use serde_json::{Map, Value};

use super::error::{did_you_mean, PipelineError};

/// One parsed `--set TARGET.PATH=VALUE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// As typed.
    pub text: String,
    /// `params`, a step name (`train`) or an instance (`train@weak`).
    pub target: String,
    /// Dotted path below the target (`model.feature_size`).
    pub path: Vec<String>,
    /// The value, typed like a YAML scalar (`[1, 2]` and `{a: 1}` allowed).
    pub value: Value,
}

impl std::str::FromStr for Override {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (lhs, rhs) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected KEY=VALUE, e.g. params.lr=3e-4"))?;
        let mut parts = lhs.trim().split('.').map(str::to_string);
        let target = parts.next().unwrap_or_default();
        let path: Vec<String> = parts.collect();
        if target.is_empty() || path.is_empty() || path.iter().any(String::is_empty) {
            return Err(format!(
                "`{s}`: expected params.NAME=VALUE or STEP.PARAM=VALUE"
            ));
        }
        let rhs = rhs.trim();
        let value = if rhs.starts_with('[') || rhs.starts_with('{') {
            // The loader wants a mapping at the top: wrap the value in one.
            let node = marked_yaml::parse_yaml(0, format!("v: {rhs}"))
                .map_err(|e| format!("`{s}`: not a YAML value ({e})"))?;
            let mut spans = Default::default();
            let v = super::yaml::to_json(std::path::Path::new("--set"), &node, "", &mut spans);
            v.get("v").cloned().unwrap_or(Value::Null)
        } else {
            super::yaml::parse_scalar(rhs)
        };
        Ok(Override {
            text: s.to_string(),
            target,
            path,
            value,
        })
    }
}

/// Applies a `params.*` override; the parameter must exist.
pub fn apply_param(params: &mut Value, o: &Override) -> Result<(), PipelineError> {
    let mut cur = params;
    for (i, key) in o.path.iter().enumerate() {
        let Value::Object(map) = cur else {
            return Err(PipelineError::bare(format!(
                "--set {}: `{}` is not a mapping",
                o.text,
                o.path[..i].join(".")
            )));
        };
        if !map.contains_key(key) {
            let mut e = PipelineError::bare(format!(
                "--set {}: the pipeline has no parameter `params.{}`",
                o.text,
                o.path[..=i].join(".")
            ));
            if let Some(h) = did_you_mean(key, map.keys().map(String::as_str)) {
                e = e.with_hint(h);
            }
            return Err(e);
        }
        if i + 1 == o.path.len() {
            map.insert(key.clone(), o.value.clone());
            return Ok(());
        }
        cur = map.get_mut(key).expect("checked above");
    }
    Ok(())
}

/// Applies a step-field override (creating the field if needed; the
/// step's own parameter check then rejects unknown names).
pub fn apply_field(fields: &mut Map<String, Value>, o: &Override) -> Result<(), PipelineError> {
    let mut cur = fields;
    for (i, key) in o.path.iter().enumerate() {
        if i + 1 == o.path.len() {
            cur.insert(key.clone(), o.value.clone());
            return Ok(());
        }
        let next = cur
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(m) = next else {
            return Err(PipelineError::bare(format!(
                "--set {}: `{key}` is not a mapping",
                o.text
            )));
        };
        cur = m;
    }
    Ok(())
}
