//! `foreach` / `matrix` expansion: one declaration, several instances.
//!
//! ```yaml
//! student:                      # → student@real, student@weak
//!   foreach:
//!     real: {data: prep.unlabeled}
//!     weak: {data: weak}
//!   kind: train
//! sweep:                        # → sweep@lr=0.0001,seed=1 … (cartesian product)
//!   matrix: {lr: [1.0e-4, 3.0e-4], seed: [1, 2]}
//!   kind: train
//!   lr: ${matrix.lr}
//! eval:                         # → eval@real, eval@weak: the variants of `student`
//!   foreach: student
//!   kind: evaluate
//!   model: student              # inside variant `v` this means `student@v`
//! ```
//! `foreach: [a, b]` names variants without per-variant fields (use `${variant}`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::error::{did_you_mean, Location, PipelineError};
use super::yaml::{self, Spans};

/// A step instance before interpolation and checking.
#[derive(Debug, Clone)]
pub struct RawInstance {
    /// `base` or `base@variant`.
    pub name: String,
    /// The declared name.
    pub base: String,
    /// Variant name, if expanded.
    pub variant: Option<String>,
    /// `${matrix.*}` values (an object).
    pub matrix: Value,
    /// Fields (engine keys `foreach`/`matrix` removed, variant fields merged).
    pub fields: Map<String, Value>,
    /// Field → its dotted path in the document (for positions).
    pub origins: BTreeMap<String, String>,
    /// Where the step was declared.
    pub location: Location,
}

impl RawInstance {
    /// Position of a dotted path inside this instance's fields.
    pub fn at(&self, spans: &Spans, path: &str, key: bool) -> Location {
        let (field, rest) = match path.split_once('.') {
            Some((f, r)) => (f, Some(r)),
            None => (path, None),
        };
        let origin = match self.origins.get(field) {
            Some(o) => o.clone(),
            None => return self.location.clone(),
        };
        let full = match rest {
            Some(r) => format!("{origin}.{r}"),
            None => origin,
        };
        yaml::lookup(spans, &full, key).unwrap_or_else(|| self.location.clone())
    }
}

/// Expands all declarations, in order.
pub fn expand_all(
    decls: &Map<String, Value>,
    spans: &Spans,
    file: &Path,
) -> Result<Vec<RawInstance>, PipelineError> {
    let loc = |path: &str, key: bool| {
        yaml::lookup(spans, path, key).unwrap_or(Location {
            file: file.into(),
            line: 1,
            col: 1,
        })
    };
    // Variant names per declaration, resolving `foreach: <step>` chains.
    let mut variants: BTreeMap<String, Option<Vec<Variant>>> = BTreeMap::new();
    for (name, decl) in decls {
        if !super::valid_name(name) {
            return Err(PipelineError::at(
                loc(&format!("steps.{name}"), true),
                format!("step name `{name}` must use only letters, digits, `-` and `_`"),
            ));
        }
        let Value::Object(fields) = decl else {
            return Err(PipelineError::at(
                loc(&format!("steps.{name}"), false),
                format!(
                    "step `{name}` must be a mapping with a `kind`, found {}",
                    super::type_name(decl)
                ),
            ));
        };
        let own = own_variants(name, fields, &loc)?;
        variants.insert(name.clone(), own);
    }
    // `foreach: other` takes other's variant names (iterate to a fixed point).
    for _ in 0..decls.len() {
        for (name, decl) in decls {
            if variants[name].is_some() {
                continue;
            }
            if let Some(Value::String(other)) = decl.get("foreach") {
                let Some(theirs) = variants.get(other) else {
                    let names: Vec<&str> = decls.keys().map(String::as_str).collect();
                    let mut e = PipelineError::at(
                        loc(&format!("steps.{name}.foreach"), false),
                        format!("`foreach: {other}`: there is no step `{other}`"),
                    );
                    if let Some(h) = did_you_mean(other, names) {
                        e = e.with_hint(h);
                    }
                    return Err(e);
                };
                if let Some(v) = theirs.clone() {
                    let names = v
                        .into_iter()
                        .map(|v| Variant {
                            fields: Map::new(),
                            ..v
                        })
                        .collect();
                    variants.insert(name.clone(), Some(names));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (name, decl) in decls {
        let Value::Object(fields) = decl else {
            unreachable!()
        };
        let location = loc(&format!("steps.{name}"), true);
        let mut base_fields = fields.clone();
        let engine_foreach = base_fields.remove("foreach");
        base_fields.remove("matrix");
        let origins: BTreeMap<String, String> = base_fields
            .keys()
            .map(|k| (k.clone(), format!("steps.{name}.{k}")))
            .collect();
        match variants.get(name).cloned().flatten() {
            None if engine_foreach.is_some() => {
                return Err(PipelineError::at(
                    loc(&format!("steps.{name}.foreach"), false),
                    format!("`foreach` of step `{name}` forms a loop of steps without variants"),
                ))
            }
            None => out.push(RawInstance {
                name: name.clone(),
                base: name.clone(),
                variant: None,
                matrix: Value::Object(Map::new()),
                fields: base_fields,
                origins,
                location,
            }),
            Some(vs) => {
                for v in vs {
                    let mut f = base_fields.clone();
                    let mut o = origins.clone();
                    for (k, val) in v.fields {
                        o.insert(k.clone(), format!("steps.{name}.foreach.{}.{k}", v.name));
                        f.insert(k, val);
                    }
                    out.push(RawInstance {
                        name: format!("{name}@{}", v.name),
                        base: name.clone(),
                        variant: Some(v.name),
                        matrix: v.matrix,
                        fields: f,
                        origins: o,
                        location: location.clone(),
                    });
                }
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
struct Variant {
    name: String,
    fields: Map<String, Value>,
    matrix: Value,
}

/// Variants declared by the step itself (`None`: none, or `foreach: <step>`).
fn own_variants(
    name: &str,
    fields: &Map<String, Value>,
    loc: &dyn Fn(&str, bool) -> Location,
) -> Result<Option<Vec<Variant>>, PipelineError> {
    let here = |k: &str| loc(&format!("steps.{name}.{k}"), false);
    match (fields.get("foreach"), fields.get("matrix")) {
        (Some(_), Some(_)) => Err(PipelineError::at(
            here("matrix"),
            format!("step `{name}` has both `foreach` and `matrix`; use one"),
        )),
        (Some(Value::String(_)), None) => Ok(None),
        (Some(Value::Array(list)), None) => {
            let mut out = Vec::new();
            for (i, v) in list.iter().enumerate() {
                let n = scalar_text(v)
                    .filter(|n| variant_name_ok(n))
                    .ok_or_else(|| {
                        PipelineError::at(
                            loc(&format!("steps.{name}.foreach.{i}"), false),
                            "a variant name must be a word (letters, digits, `-`, `_`, `.`)",
                        )
                    })?;
                out.push(Variant {
                    name: n,
                    fields: Map::new(),
                    matrix: Value::Object(Map::new()),
                });
            }
            non_empty(out, here("foreach"))
        }
        (Some(Value::Object(map)), None) => {
            let mut out = Vec::new();
            for (variant, body) in map {
                if !variant_name_ok(variant) {
                    return Err(PipelineError::at(
                        loc(&format!("steps.{name}.foreach.{variant}"), true),
                        format!("variant name `{variant}` must use letters, digits, `-`, `_`, `.`"),
                    ));
                }
                let fields = match body {
                    Value::Object(m) => m.clone(),
                    Value::Null => Map::new(),
                    other => {
                        return Err(PipelineError::at(
                            loc(&format!("steps.{name}.foreach.{variant}"), false),
                            format!(
                                "variant `{variant}` must be a mapping of fields, found {}",
                                super::type_name(other)
                            ),
                        ))
                    }
                };
                out.push(Variant {
                    name: variant.clone(),
                    fields,
                    matrix: Value::Object(Map::new()),
                });
            }
            non_empty(out, here("foreach"))
        }
        (Some(other), None) => Err(PipelineError::at(
            here("foreach"),
            format!(
                "`foreach` must be a list of variant names, a mapping of variant → fields, \
                 or a step name; found {}",
                super::type_name(other)
            ),
        )),
        (None, Some(Value::Object(axes))) => {
            let mut combos: Vec<(Vec<String>, Map<String, Value>)> = vec![(vec![], Map::new())];
            for (axis, values) in axes {
                let Value::Array(values) = values else {
                    return Err(PipelineError::at(
                        loc(&format!("steps.{name}.matrix.{axis}"), false),
                        format!("matrix axis `{axis}` must be a list of values"),
                    ));
                };
                let mut next = Vec::new();
                for (parts, m) in &combos {
                    for v in values {
                        let text = scalar_text(v).ok_or_else(|| {
                            PipelineError::at(
                                loc(&format!("steps.{name}.matrix.{axis}"), false),
                                format!(
                                    "matrix values must be numbers, strings or booleans (`{axis}`)"
                                ),
                            )
                        })?;
                        let mut p = parts.clone();
                        p.push(format!("{axis}={text}"));
                        let mut m = m.clone();
                        m.insert(axis.clone(), v.clone());
                        next.push((p, m));
                    }
                }
                combos = next;
            }
            let out = combos
                .into_iter()
                .map(|(p, m)| Variant {
                    name: p.join(","),
                    fields: Map::new(),
                    matrix: Value::Object(m),
                })
                .collect();
            non_empty(out, here("matrix"))
        }
        (None, Some(other)) => Err(PipelineError::at(
            here("matrix"),
            format!(
                "`matrix` must be a mapping of axis → list of values, found {}",
                super::type_name(other)
            ),
        )),
        (None, None) => Ok(None),
    }
}

fn non_empty(v: Vec<Variant>, at: Location) -> Result<Option<Vec<Variant>>, PipelineError> {
    if v.is_empty() {
        Err(PipelineError::at(at, "expansion yields no variants"))
    } else {
        Ok(Some(v))
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn variant_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.=,".contains(c))
}
