//! Pipeline YAML: types, `${...}` interpolation, `--set` overrides,
//! `foreach`/`matrix` expansion and validation with file:line:col errors.
//!
//! Loading goes: parse (positions kept) → check the top level → apply
//! `--set params.*` → expand each step into instances → interpolate →
//! apply `--set step.*` → check kinds, inputs and params → resolve
//! references. The graph (cycles, order) is built by [`crate::graph`].

mod error;
mod expand;
mod interpolate;
mod overrides;
mod yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use error::{did_you_mean, Location, PipelineError};
pub use overrides::Override;
use yaml::Spans;

use crate::steps::{Arity, StepKind};

/// Top-level keys of a pipeline file.
const TOP_KEYS: &[&str] = &["name", "description", "params", "steps"];

/// A loaded, validated pipeline: every step expanded and resolved.
#[derive(Debug)]
pub struct Pipeline {
    /// `name:` (defaults to the file stem).
    pub name: String,
    /// The pipeline file.
    pub file: PathBuf,
    /// Directory that relative file paths in steps are resolved against.
    pub workspace: PathBuf,
    /// The params after `--set` overrides.
    pub params: Value,
    /// Step instances in declaration order.
    pub steps: Vec<StepInstance>,
}

/// One runnable step (a declaration, or one variant of it).
pub struct StepInstance {
    /// Instance name: `train`, or `train@weak` for a variant.
    pub name: String,
    /// Declared name (`train`).
    pub base: String,
    /// Variant name (`weak`), if expanded.
    pub variant: Option<String>,
    /// The kind.
    pub kind: &'static dyn StepKind,
    /// Canonical params (defaults filled) — these enter the key.
    pub params: Value,
    /// Input slot → references.
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    /// Where it was declared.
    pub location: Location,
}

impl std::fmt::Debug for StepInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepInstance")
            .field("name", &self.name)
            .field("kind", &self.kind.name())
            .field("params", &self.params)
            .field("inputs", &self.inputs)
            .finish()
    }
}

/// A reference to another step's output, optionally one group of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    /// As written after interpolation (`prep.train`).
    pub text: String,
    /// The instance it resolves to (`prep`).
    pub step: String,
    /// The group selected (`train`), if any.
    pub group: Option<String>,
    /// `prep@split.train`: the group is taken from this other step's output
    /// and applied to `step`'s cases.
    pub select: Option<String>,
}

impl InputRef {
    /// Every step this reference reads (the step, and the group's source).
    pub fn steps(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.step).chain(self.select.iter())
    }
}

impl Pipeline {
    /// Looks up an instance by name.
    pub fn step(&self, name: &str) -> Option<&StepInstance> {
        self.steps.iter().find(|s| s.name == name)
    }
    /// Index of an instance.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
    /// Path of the lock file beside the pipeline (`demo.yaml` → `demo.lock`).
    pub fn lock_path(&self) -> PathBuf {
        self.file.with_extension("lock")
    }
}

/// Loads a pipeline file with `--set` overrides.
pub fn load(file: &Path, overrides: &[Override]) -> Result<Pipeline, PipelineError> {
    let text = fs_err::read_to_string(file).map_err(|e| PipelineError::bare(e.to_string()))?;
    load_str(file, &text, overrides)
}

/// Loads pipeline text (as if read from `file`).
pub fn load_str(
    file: &Path,
    text: &str,
    overrides: &[Override],
) -> Result<Pipeline, PipelineError> {
    let root = yaml::parse(file, text)?;
    let mut spans = Spans::new();
    let doc = yaml::to_json(file, &root, "", &mut spans);
    let at = |path: &str, key: bool| {
        yaml::lookup(&spans, path, key).unwrap_or(Location {
            file: file.into(),
            line: 1,
            col: 1,
        })
    };
    let top = match &doc {
        Value::Object(m) => m,
        _ => {
            return Err(PipelineError::at(
                at("", false),
                "a pipeline must be a mapping with `steps:`",
            ))
        }
    };
    for key in top.keys() {
        if !TOP_KEYS.contains(&key.as_str()) {
            let mut e = PipelineError::at(
                at(key, true),
                format!(
                    "unknown top-level key `{key}` (expected one of: {})",
                    TOP_KEYS.join(", ")
                ),
            );
            if let Some(h) = did_you_mean(key, TOP_KEYS.iter().copied()) {
                e = e.with_hint(h);
            }
            return Err(e);
        }
    }
    let name = match top.get("name") {
        None => file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Some(Value::String(s)) if valid_name(s) => s.clone(),
        Some(other) => {
            return Err(PipelineError::at(
                at("name", false),
                format!("`name` must be a word of letters, digits, `-` or `_`, found {other}"),
            ))
        }
    };
    let mut params = match top.get("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(other) => {
            return Err(PipelineError::at(
                at("params", false),
                format!("`params` must be a mapping, found {}", type_name(other)),
            ))
        }
    };
    let (param_sets, step_sets): (Vec<&Override>, Vec<&Override>) =
        overrides.iter().partition(|o| o.target == "params");
    for o in param_sets {
        overrides::apply_param(&mut params, o)?;
    }
    let decls = match top.get("steps") {
        Some(Value::Object(m)) if !m.is_empty() => m,
        Some(Value::Object(_)) | None | Some(Value::Null) => {
            return Err(PipelineError::at(
                at("", false),
                "the pipeline has no `steps:`",
            ))
        }
        Some(other) => {
            return Err(PipelineError::at(
                at("steps", false),
                format!(
                    "`steps` must be a mapping of step name → step, found {}",
                    type_name(other)
                ),
            ))
        }
    };

    // 1. Expansion: each declaration becomes one or more raw instances.
    let raw = expand::expand_all(decls, &spans, file)?;

    // 2. Interpolation, overrides, kinds, inputs, params.
    let mut steps = Vec::new();
    for inst in &raw {
        let vars = interpolate::Vars {
            params: &params,
            matrix: &inst.matrix,
            variant: inst.variant.as_deref(),
            name: &inst.name,
        };
        let mut fields = serde_json::Map::new();
        for (k, v) in &inst.fields {
            let value = interpolate::interpolate(v, &vars).map_err(|(p, msg)| {
                PipelineError::at(inst.at(&spans, &yaml::join(k, &p), false), msg)
            })?;
            fields.insert(k.clone(), value);
        }
        for o in step_sets
            .iter()
            .filter(|o| o.target == inst.base || o.target == inst.name)
        {
            overrides::apply_field(&mut fields, o)?;
        }
        steps.push(check_instance(inst, fields, &spans)?);
    }
    for o in &step_sets {
        if !raw.iter().any(|i| o.target == i.base || o.target == i.name) {
            let names: Vec<&str> = raw.iter().map(|i| i.name.as_str()).collect();
            let mut e = PipelineError::bare(format!("--set {}: no step `{}`", o.text, o.target));
            if let Some(h) = did_you_mean(&o.target, names.iter().copied()) {
                e = e.with_hint(h);
            }
            return Err(e);
        }
    }

    // 3. References.
    resolve_references(&mut steps, &raw, &spans)?;
    let workspace = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let workspace = if workspace.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        workspace
    };
    let pipeline = Pipeline {
        name,
        file: file.to_path_buf(),
        workspace,
        params,
        steps,
    };
    crate::graph::StepGraph::build(&pipeline)?;
    Ok(pipeline)
}

/// Checks kind, splits inputs from params and validates params.
fn check_instance(
    inst: &expand::RawInstance,
    mut fields: serde_json::Map<String, Value>,
    spans: &Spans,
) -> Result<StepInstance, PipelineError> {
    let kind_name = match fields.remove("kind") {
        Some(Value::String(k)) => k,
        Some(other) => {
            return Err(PipelineError::at(
                inst.at(spans, "kind", false),
                format!("`kind` must be a name, found {}", type_name(&other)),
            ))
        }
        None => {
            return Err(PipelineError::at(
                inst.location.clone(),
                format!("step `{}` has no `kind`", inst.base),
            )
            .with_hint(format!("known kinds: {}", kind_names().join(", "))))
        }
    };
    let Some(kind) = crate::steps::find(&kind_name) else {
        let names = kind_names();
        let hint = did_you_mean(&kind_name, names.iter().copied())
            .unwrap_or_else(|| format!("known kinds: {}", names.join(", ")));
        return Err(PipelineError::at(
            inst.at(spans, "kind", false),
            format!("unknown step kind `{kind_name}`"),
        )
        .with_hint(hint));
    };
    fields.remove("description");
    let mut inputs = BTreeMap::new();
    for spec in kind.inputs() {
        let refs = match fields.remove(spec.name) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) if spec.arity == Arity::Many => a
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s),
                    other => Err(PipelineError::at(
                        inst.at(spans, &format!("{}.{i}", spec.name), false),
                        format!(
                            "a step reference must be a name, found {}",
                            type_name(&other)
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                let expected = if spec.arity == Arity::Many {
                    "a step name or a list of step names"
                } else {
                    "a step name (e.g. `prep` or `prep.train`)"
                };
                return Err(PipelineError::at(
                    inst.at(spans, spec.name, false),
                    format!(
                        "input `{}` must be {expected}, found {}",
                        spec.name,
                        type_name(&other)
                    ),
                ));
            }
        };
        if refs.is_empty() && spec.arity == Arity::One {
            return Err(PipelineError::at(
                inst.location.clone(),
                format!(
                    "step `{}` (kind `{}`) needs input `{}`",
                    inst.name,
                    kind.name(),
                    spec.name
                ),
            ));
        }
        let refs = refs
            .into_iter()
            .map(|text| InputRef {
                step: String::new(),
                group: None,
                select: None,
                text,
            })
            .collect();
        inputs.insert(spec.name.to_string(), refs);
    }
    let params = kind.check_params(&Value::Object(fields)).map_err(|e| {
        let unknown = e
            .message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next());
        // serde_path_to_error's path of an unknown field ends with the field.
        let (path, key, shown) = match unknown {
            Some(f) if e.path == f || e.path.ends_with(&format!(".{f}")) => (
                e.path.clone(),
                true,
                e.path
                    .rsplit_once('.')
                    .map(|x| x.0.to_string())
                    .unwrap_or_default(),
            ),
            Some(f) => (yaml::join(&e.path, f), true, e.path.clone()),
            None => (e.path.clone(), false, e.path.clone()),
        };
        let mut err = PipelineError::at(
            inst.at(spans, &path, key),
            format!(
                "step `{}` (kind `{}`): {}{}",
                inst.name,
                kind.name(),
                prefix(&shown),
                e.message
            ),
        );
        if let Some(f) = unknown {
            let expected: Vec<&str> = e
                .message
                .split("expected one of ")
                .nth(1)
                .or_else(|| e.message.split("expected ").nth(1))
                .map(|s| s.split(", ").map(|x| x.trim_matches('`')).collect())
                .unwrap_or_default();
            let inputs: Vec<&str> = kind.inputs().iter().map(|i| i.name).collect();
            if let Some(h) = did_you_mean(f, expected.iter().chain(inputs.iter()).copied()) {
                err = err.with_hint(h);
            }
        }
        err
    })?;
    Ok(StepInstance {
        name: inst.name.clone(),
        base: inst.base.clone(),
        variant: inst.variant.clone(),
        kind,
        params,
        inputs,
        location: inst.location.clone(),
    })
}

fn prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("`{path}`: ")
    }
}

/// Resolves every input reference to an instance (and group).
///
/// `x` inside a variant `v` means `x@v` when `x` has that variant; a slot that
/// takes many inputs gets all variants of `x`; otherwise naming a variant is
/// required.
fn resolve_references(
    steps: &mut [StepInstance],
    raw: &[expand::RawInstance],
    spans: &Spans,
) -> Result<(), PipelineError> {
    let names: Vec<String> = steps.iter().map(|s| s.name.clone()).collect();
    let bases: BTreeMap<&str, Vec<&str>> = raw.iter().fold(BTreeMap::new(), |mut m, r| {
        m.entry(r.base.as_str()).or_default().push(r.name.as_str());
        m
    });
    for (step, inst) in steps.iter_mut().zip(raw) {
        let arities: BTreeMap<&str, Arity> = step
            .kind
            .inputs()
            .iter()
            .map(|s| (s.name, s.arity))
            .collect();
        for (slot, refs) in step.inputs.iter_mut() {
            let mut resolved = Vec::new();
            for (i, r) in refs.iter().enumerate() {
                let path = if arities[slot.as_str()] == Arity::Many && refs.len() > 1 {
                    format!("{slot}.{i}")
                } else {
                    slot.clone()
                };
                let loc = || inst.at(spans, &path, false);
                let (target, group, select) = split_reference(&r.text, &names, &bases);
                let targets: Vec<String> = if names.contains(&target) {
                    vec![target.clone()]
                } else if let Some(variants) = bases.get(target.as_str()) {
                    let same = step.variant.as_ref().map(|v| format!("{target}@{v}"));
                    match same {
                        Some(s) if variants.contains(&s.as_str()) => vec![s],
                        _ if arities[slot.as_str()] == Arity::Many => {
                            variants.iter().map(|v| v.to_string()).collect()
                        }
                        _ => {
                            return Err(PipelineError::at(
                                loc(),
                                format!(
                                    "`{target}` has variants {}: name one, e.g. `{}`",
                                    variants.join(", "),
                                    variants[0]
                                ),
                            ))
                        }
                    }
                } else {
                    let all: Vec<&str> = names.iter().map(String::as_str).collect();
                    let mut e = PipelineError::at(
                        loc(),
                        format!(
                            "step `{}` refers to `{}`, which is not a step",
                            step.name, r.text
                        ),
                    );
                    e = e.with_hint(
                        did_you_mean(&target, all.iter().copied())
                            .unwrap_or_else(|| format!("steps are: {}", all.join(", "))),
                    );
                    return Err(e);
                };
                let select = match select {
                    None => None,
                    Some(src) if names.contains(&src) => Some(src),
                    Some(src) => match bases.get(src.as_str()) {
                        Some(v) if v.len() == 1 => Some(v[0].to_string()),
                        _ => {
                            return Err(PipelineError::at(
                                loc(),
                                format!("`{}`: `{src}` has variants; name one", r.text),
                            ))
                        }
                    },
                };
                if select.as_deref() == Some(step.name.as_str()) {
                    return Err(PipelineError::at(
                        loc(),
                        format!("step `{}` refers to itself", step.name),
                    ));
                }
                for t in targets {
                    if t == step.name {
                        return Err(PipelineError::at(
                            loc(),
                            format!("step `{}` refers to itself", step.name),
                        ));
                    }
                    resolved.push(InputRef {
                        text: r.text.clone(),
                        step: t,
                        group: group.clone(),
                        select: select.clone(),
                    });
                }
            }
            *refs = resolved;
        }
    }
    Ok(())
}

/// `prep.train` → (`prep`, Some(`train`), None); `prep@split.train` →
/// (`prep`, Some(`train`), Some(`split`)) when `prep@split` is not itself a
/// variant. The longest known step name wins, so instance names containing
/// dots (matrix values) still resolve.
fn split_reference(
    text: &str,
    names: &[String],
    bases: &BTreeMap<&str, Vec<&str>>,
) -> (String, Option<String>, Option<String>) {
    let known = |s: &str| names.iter().any(|n| n == s) || bases.contains_key(s);
    if known(text) {
        return (text.to_string(), None, None);
    }
    let mut idx = text.len();
    while let Some(i) = text[..idx].rfind('.') {
        if known(&text[..i]) {
            return (text[..i].to_string(), Some(text[i + 1..].to_string()), None);
        }
        idx = i;
    }
    if let Some((target, rest)) = text.split_once('@') {
        if let Some((source, group)) = rest.rsplit_once('.') {
            if known(target) && known(source) {
                return (
                    target.to_string(),
                    Some(group.to_string()),
                    Some(source.to_string()),
                );
            }
        }
    }
    match text.split_once('.') {
        Some((a, b)) => (a.to_string(), Some(b.to_string()), None),
        None => (text.to_string(), None, None),
    }
}

/// Names of all step kinds.
pub fn kind_names() -> Vec<&'static str> {
    crate::steps::STEPS.iter().map(|k| k.name()).collect()
}

/// Step and pipeline names: letters, digits, `-`, `_`.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A value's type for messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
