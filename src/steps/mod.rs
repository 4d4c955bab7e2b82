//! Step kinds: one file per kind, all behind the small [`StepKind`] trait.
//!
//! A kind is a unit struct listed in [`STEPS`]. The engine owns hashing,
//! caching, staging and scheduling; a kind only turns inputs + params into
//! files in an output directory. Two shapes exist:
//! - whole steps implement [`StepKind::run`] (train, compare, command, …);
//! - map steps set [`StepKind::map_over`] and implement [`StepKind::run_item`]:
//!   the engine calls it once per case and caches every case on its own, so
//!   adding one scan to a data set reprocesses only that scan.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub mod case_command;
pub mod command;
pub mod compare;
pub mod dataset;
pub mod evaluate;
pub mod phantom;
pub mod resample;
mod shell;
pub mod split;
pub mod totalseg;
pub mod train;
pub mod weak_label;

/// Every step kind the engine knows, in documentation order.
pub static STEPS: &[&dyn StepKind] = &[
    &dataset::Dataset,
    &phantom::Phantom,
    &split::Split,
    &resample::Resample,
    &command::Command,
    &case_command::CaseCommand,
    &totalseg::TotalSegLabels,
    &train::Train,
    &weak_label::WeakLabel,
    &evaluate::Evaluate,
    &compare::Compare,
];

/// Looks a kind up by its YAML name.
pub fn find(name: &str) -> Option<&'static dyn StepKind> {
    STEPS.iter().copied().find(|k| k.name() == name)
}

/// Error a step returns; the scheduler prints it under the step's name.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Parameters that deserialised but make no sense (message names the field).
    #[error("{0}")]
    Params(String),
    /// Bad input data: the message names the file or case.
    #[error("{0}")]
    Input(String),
    /// An I/O failure while writing the output.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Anything else, already formatted with context.
    #[error("{0}")]
    Other(String),
}

/// Shorthand used by step implementations.
pub type StepResult<T> = Result<T, StepError>;

/// How an input slot is filled in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// Exactly one reference.
    One,
    /// One reference, may be absent.
    Optional,
    /// A list of references (or a single one).
    Many,
}

/// One input slot of a kind, e.g. `input`, `data`, `model`.
#[derive(Debug, Clone, Copy)]
pub struct InputSpec {
    /// The YAML key that holds the reference(s).
    pub name: &'static str,
    /// How many references the slot takes.
    pub arity: Arity,
}

/// What a running step may claim from the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// CPU threads the step uses (counted against `--jobs`).
    pub threads: usize,
    /// The step needs the (single) GPU slot.
    pub gpu: bool,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            threads: 1,
            gpu: false,
        }
    }
}

/// A resolved input artifact as a step sees it.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    /// The reference as written (`prep.train`).
    pub reference: String,
    /// The step instance it resolved to (`eval@weak`).
    pub step: String,
    /// Directory of the object in the store (read-only).
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: crate::cache::Manifest,
    /// Items (cases) selected by the reference: case id → item directory.
    pub items: BTreeMap<String, PathBuf>,
}

impl InputArtifact {
    /// Path of a file of this artifact.
    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

/// What a whole step gets to run.
pub struct StepContext<'a> {
    /// The step's instance name (`train@weak`).
    pub step: &'a str,
    /// Resolved parameters (JSON object, inputs removed).
    pub params: &'a serde_json::Value,
    /// Resolved inputs by slot name; `Many` slots hold several.
    pub inputs: &'a BTreeMap<String, Vec<InputArtifact>>,
    /// Empty staging directory: everything written here becomes the output.
    pub out_dir: &'a Path,
    /// A private directory that survives a crash (checkpoints); it is keyed
    /// by the step key, so a rerun of the same key finds it again.
    pub work_dir: &'a Path,
    /// The workspace root (directory of the pipeline file).
    pub workspace: &'a Path,
    /// Progress reporting.
    pub progress: &'a crate::exec::Progress,
    /// Cooperative cancellation (Ctrl-C): long loops should poll it.
    pub cancel: &'a crate::exec::CancelToken,
}

impl StepContext<'_> {
    /// The single input of a `One` slot.
    pub fn input(&self, slot: &str) -> StepResult<&InputArtifact> {
        self.inputs
            .get(slot)
            .and_then(|v| v.first())
            .ok_or_else(|| StepError::Params(format!("missing input `{slot}`")))
    }
}

/// What a map step gets for one item.
pub struct ItemContext<'a> {
    /// The step's instance name.
    pub step: &'a str,
    /// The case id.
    pub case: &'a str,
    /// Directory of the input item (the case's files).
    pub item_dir: &'a Path,
    /// Resolved parameters.
    pub params: &'a serde_json::Value,
    /// The non-mapped inputs (e.g. a teacher model).
    pub inputs: &'a BTreeMap<String, Vec<InputArtifact>>,
    /// Empty staging directory for this item's output files.
    pub out_dir: &'a Path,
    /// The workspace root (directory of the pipeline file).
    pub workspace: &'a Path,
    /// Cooperative cancellation.
    pub cancel: &'a crate::exec::CancelToken,
}

/// What a step produced besides its files.
#[derive(Debug, Default, Clone)]
pub struct StepOutput {
    /// Artifact type, e.g. `dataset`, `model`, `metrics`.
    pub kind: String,
    /// Items (cases) this output holds: case id → staged item directory.
    /// Whole steps that produce collections (dataset, split) fill this.
    pub items: BTreeMap<String, ItemSource>,
    /// Named groups of case ids (train/val/test).
    pub groups: BTreeMap<String, Vec<String>>,
    /// Free metadata recorded in the manifest.
    pub meta: serde_json::Value,
    /// A flat map of numbers that `compare` puts side by side.
    pub metrics: BTreeMap<String, f64>,
}

/// Where an output item comes from.
#[derive(Debug, Clone)]
pub enum ItemSource {
    /// An existing object (by hash) is reused as is: no copy.
    Existing(String),
    /// Files to ingest: role name (e.g. `image.nii.gz`) → source file path.
    Files(BTreeMap<String, PathBuf>),
}

/// One kind of step. Keep it small: new kinds are one file each.
pub trait StepKind: Send + Sync {
    /// The YAML `kind:` name.
    fn name(&self) -> &'static str;
    /// Bump when the results for the same inputs and params would change.
    fn version(&self) -> u32;
    /// One paragraph for `docs/steps.md`.
    fn doc(&self) -> &'static str;
    /// Input slots (YAML keys that hold references to other steps).
    fn inputs(&self) -> &'static [InputSpec] {
        &[]
    }
    /// Parameters: name → type description, for docs and errors.
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
    /// Validates parameters (the step's serde struct with unknown fields denied,
    /// via [`parse_params`]); returns the canonical form that enters the key.
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError>;
    /// Workspace files (globs, relative to the pipeline's directory) whose
    /// contents enter the step key, e.g. a data set's scans.
    fn workspace_deps(&self, _params: &serde_json::Value) -> Vec<String> {
        Vec::new()
    }
    /// Resources while running.
    fn resources(&self, _params: &serde_json::Value) -> Resources {
        Resources::default()
    }
    /// For map steps: the input slot whose items are mapped one by one.
    fn map_over(&self) -> Option<&'static str> {
        None
    }
    /// Runs a whole step.
    fn run(&self, _ctx: &StepContext) -> StepResult<StepOutput> {
        Err(StepError::Other(format!("{} is a map step", self.name())))
    }
    /// Runs one item of a map step, writing files into `ctx.out_dir`.
    fn run_item(&self, _ctx: &ItemContext) -> StepResult<()> {
        Err(StepError::Other(format!(
            "{} is not a map step",
            self.name()
        )))
    }
    /// Artifact type of a map step's output.
    fn output_kind(&self) -> &'static str {
        "dataset"
    }
}

/// A parameter problem: the dotted path of the field (`model.feature_size`,
/// empty for the step as a whole) and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    /// Dotted path of the offending field.
    pub path: String,
    /// What was expected vs found.
    pub message: String,
}

impl ParamError {
    /// An error about one field.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Deserialises a step's parameter struct from JSON, naming the bad field.
pub fn parse_params<T: serde::de::DeserializeOwned>(
    v: &serde_json::Value,
) -> Result<T, ParamError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ParamError {
            path,
            message: e.into_inner().to_string(),
        }
    })
}

/// Parses a step's params into its struct and returns the canonical JSON
/// (defaults filled in) that enters the step key.
pub fn canonical_params<T>(v: &serde_json::Value) -> Result<serde_json::Value, ParamError>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let parsed: T = parse_params(v)?;
    serde_json::to_value(parsed).map_err(|e| ParamError::new("", e.to_string()))
}

/// The step reference (docs/steps.md), generated from [`STEPS`].
pub fn docs_markdown() -> String {
    let mut out = String::from(
        "# Step kinds\n\n<!-- Generated by `tsdistill steps > docs/steps.md`; a test fails when stale. -->\n\n",
    );
    for k in STEPS {
        out.push_str(&format!(
            "## `{}` (version {})\n\n{}\n\n",
            k.name(),
            k.version(),
            k.doc()
        ));
        if let Some(slot) = k.map_over() {
            out.push_str(&format!(
                "Map step: runs once per case of `{slot}`, each case cached on its own.\n\n"
            ));
        }
        if !k.inputs().is_empty() {
            out.push_str("Inputs:\n\n");
            for i in k.inputs() {
                let a = match i.arity {
                    Arity::One => "one step reference",
                    Arity::Optional => "optional step reference",
                    Arity::Many => "step reference or list",
                };
                out.push_str(&format!("- `{}`: {a}\n", i.name));
            }
            out.push('\n');
        }
        if !k.params_doc().is_empty() {
            out.push_str("| param | meaning |\n|---|---|\n");
            for (n, d) in k.params_doc() {
                out.push_str(&format!("| `{n}` | {d} |\n"));
            }
            out.push('\n');
        }
    }
    out
}
