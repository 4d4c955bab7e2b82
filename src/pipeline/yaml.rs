//! YAML → JSON values with a position for every node.
//!
//! marked_yaml gives every node a span; we convert to `serde_json::Value`
//! (what step parameter structs deserialise from) and keep a side table of
//! dotted path → position so any later error can point at the exact line.

use std::collections::BTreeMap;
use std::path::Path;

use marked_yaml::types::{MarkedScalarNode, Node};
use serde_json::{Map, Number, Value};

use super::error::{Location, PipelineError};

/// Dotted path (`lr`, `model.feature_size`, `spacing.0`) → position.
pub type Spans = BTreeMap<String, Location>;

/// Position of a node.
pub fn location(file: &Path, node_span: &marked_yaml::Span) -> Location {
    match node_span.start() {
        Some(m) => Location {
            file: file.to_path_buf(),
            line: m.line(),
            col: m.column(),
        },
        None => Location {
            file: file.to_path_buf(),
            line: 1,
            col: 1,
        },
    }
}

/// Parses text into a top-level mapping node, mapping syntax errors to file:line:col.
pub fn parse(file: &Path, text: &str) -> Result<Node, PipelineError> {
    // Quoted scalars stay strings (`run: "true"`); plain ones are typed.
    let opts = marked_yaml::LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    marked_yaml::parse_yaml_with_options(0, text, opts).map_err(|e| {
        use marked_yaml::LoadError as E;
        let (m, msg) = match &e {
            E::TopLevelMustBeMapping(m) => (m.clone(), "the top level must be a mapping".into()),
            E::TopLevelMustBeSequence(m) => (m.clone(), "the top level must be a sequence".into()),
            E::UnexpectedAnchor(m) => (m.clone(), "YAML anchors are not supported".into()),
            E::MappingKeyMustBeScalar(m) => (m.clone(), "mapping keys must be plain names".into()),
            E::UnexpectedTag(m) => (m.clone(), "YAML tags are not supported".into()),
            E::ScanError(m, s) => (m.clone(), format!("YAML syntax error: {}", scan_message(s))),
            E::DuplicateKey(d) => {
                let m = d
                    .key
                    .span()
                    .start()
                    .cloned()
                    .unwrap_or_else(|| marked_yaml::Marker::new(0, 0, 1, 1));
                (m, format!("duplicate key `{}`", d.key.as_str()))
            }
        };
        PipelineError::at(
            Location {
                file: file.to_path_buf(),
                line: m.line(),
                col: m.column(),
            },
            msg,
        )
    })
}

/// The scanner's message without its own position suffix.
fn scan_message(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    match s.find(" at byte ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Converts a node to JSON, recording positions under `prefix`.
pub fn to_json(file: &Path, node: &Node, prefix: &str, spans: &mut Spans) -> Value {
    spans.insert(prefix.to_string(), location(file, node.span()));
    match node {
        Node::Scalar(s) => scalar(s),
        Node::Sequence(seq) => Value::Array(
            seq.iter()
                .enumerate()
                .map(|(i, n)| to_json(file, n, &join(prefix, &i.to_string()), spans))
                .collect(),
        ),
        Node::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map.iter() {
                let path = join(prefix, k.as_str());
                // The key's own position is more useful for "unknown field" errors.
                let v_json = to_json(file, v, &path, spans);
                spans.insert(format!("{path}#key"), location(file, k.span()));
                out.insert(k.as_str().to_string(), v_json);
            }
            Value::Object(out)
        }
    }
}

/// `a` + `b` → `a.b` (or `b` at the root).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Types a plain scalar like YAML 1.2's core schema (plus `1e-4` as a float);
/// quoted scalars stay strings.
fn scalar(s: &MarkedScalarNode) -> Value {
    let text = s.as_str();
    if !s.may_coerce() {
        return Value::String(text.to_string());
    }
    parse_scalar(text)
}

/// Types a plain scalar's text (also used for `--set` values).
pub fn parse_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::Number(i.into());
    }
    let looks_numeric = text
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || "+-.".contains(c))
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || "+-.eE".contains(c));
    if looks_numeric {
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(text.to_string())
}

/// Finds the best position for a dotted path: itself, else its closest parent.
pub fn lookup(spans: &Spans, path: &str, prefer_key: bool) -> Option<Location> {
    let mut p = path.to_string();
    loop {
        if prefer_key {
            if let Some(l) = spans.get(&format!("{p}#key")) {
                return Some(l.clone());
            }
        }
        if let Some(l) = spans.get(&p) {
            return Some(l.clone());
        }
        match p.rfind('.') {
            Some(i) => p.truncate(i),
            None if !p.is_empty() => p.clear(),
            None => return None,
        }
    }
}
