//! The `dataset` step: images (and optional labels) found by glob in the
//! workspace, paired by case id. Each case becomes an item holding
//! `image.<ext>` and `label.<ext>`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::*;

/// The `dataset` step kind.
pub struct Dataset;

/// Parameters of `dataset`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    /// Glob of the images, relative to the pipeline's directory.
    pub images: String,
    /// Glob of the label maps (optional).
    #[serde(default)]
    pub labels: Option<String>,
    /// Regex applied to each file name (extension removed); its first
    /// capture group is the case id. Default: the whole name.
    #[serde(default)]
    pub case_pattern: Option<String>,
}

/// Extensions recognised as one suffix (longest first).
const EXTS: &[&str] = &[".nii.gz", ".nii", ".mha", ".nrrd", ".mhd"];

/// Splits `img0001.nii.gz` into (`img0001`, `.nii.gz`).
fn split_ext(name: &str) -> (&str, &str) {
    for e in EXTS {
        if let Some(stem) = name.strip_suffix(e) {
            return (stem, e);
        }
    }
    match name.rfind('.') {
        Some(i) => (&name[..i], &name[i..]),
        None => (name, ""),
    }
}

/// Files matching a glob under the workspace, sorted.
fn find(workspace: &Path, pattern: &str) -> StepResult<Vec<PathBuf>> {
    let full = workspace.join(pattern);
    let mut v: Vec<PathBuf> = glob::glob(&full.to_string_lossy())
        .map_err(|e| StepError::Params(format!("bad glob `{pattern}`: {e}")))?
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(StepError::Input(format!(
            "no files match `{pattern}` (looked in `{}`)",
            workspace.display()
        )));
    }
    Ok(v)
}

/// Case id → (file, extension), with duplicate ids an error.
fn by_case(
    files: Vec<PathBuf>,
    re: &Option<regex::Regex>,
    what: &str,
) -> StepResult<BTreeMap<String, (PathBuf, String)>> {
    let mut out: BTreeMap<String, (PathBuf, String)> = BTreeMap::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (stem, ext) = split_ext(&name);
        let id = match re {
            None => stem.to_string(),
            Some(re) => re
                .captures(stem)
                .and_then(|c| c.get(1).or_else(|| c.get(0)))
                .map(|m| m.as_str().to_string())
                .ok_or_else(|| {
                    StepError::Input(format!(
                        "{what} `{}`: `case_pattern` /{}/ does not match `{stem}`",
                        f.display(),
                        re.as_str()
                    ))
                })?,
        };
        if let Some((prev, _)) = out.get(&id) {
            return Err(StepError::Input(format!(
                "{what}s `{}` and `{}` both have case id `{id}`",
                prev.display(),
                f.display()
            )));
        }
        out.insert(id, (f.clone(), ext.to_string()));
    }
    Ok(out)
}

impl StepKind for Dataset {
    fn name(&self) -> &'static str {
        "dataset"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "A data set from the workspace: `images` (and optional `labels`) by glob, \
         paired by case id (the file name without extension, or the first capture \
         group of `case_pattern`). An image without a label, or a label without an \
         image, is an error naming the file."
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "images",
                "glob (required), relative to the pipeline file's directory",
            ),
            (
                "labels",
                "glob of label maps, paired with images by case id",
            ),
            (
                "case_pattern",
                "regex on the file name; first capture group = case id",
            ),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        let v = canonical_params::<DatasetParams>(params)?;
        if let Some(pat) = v.get("case_pattern").and_then(|p| p.as_str()) {
            regex::Regex::new(pat).map_err(|e| ParamError::new("case_pattern", e.to_string()))?;
        }
        Ok(v)
    }
    fn workspace_deps(&self, params: &serde_json::Value) -> Vec<String> {
        match parse_params::<DatasetParams>(params) {
            Ok(p) => std::iter::once(p.images).chain(p.labels).collect(),
            Err(_) => Vec::new(),
        }
    }
    fn run(&self, ctx: &StepContext) -> StepResult<StepOutput> {
        let p: DatasetParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let re = p
            .case_pattern
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| StepError::Params(e.to_string()))?;
        let images = by_case(find(ctx.workspace, &p.images)?, &re, "image")?;
        let labels = match &p.labels {
            Some(l) => Some(by_case(find(ctx.workspace, l)?, &re, "label")?),
            None => None,
        };
        let mut items = BTreeMap::new();
        for (id, (img, ext)) in &images {
            let mut files = BTreeMap::new();
            files.insert(format!("image{ext}"), img.clone());
            if let Some(labels) = &labels {
                let (lab, lext) = labels.get(id).ok_or_else(|| {
                    StepError::Input(format!(
                        "image `{}` (case `{id}`) has no label in `{}`",
                        img.display(),
                        p.labels.as_deref().unwrap_or_default()
                    ))
                })?;
                files.insert(format!("label{lext}"), lab.clone());
            }
            items.insert(id.clone(), ItemSource::Files(files));
        }
        if let Some(labels) = &labels {
            if let Some((id, (lab, _))) = labels.iter().find(|(id, _)| !images.contains_key(*id)) {
                return Err(StepError::Input(format!(
                    "label `{}` (case `{id}`) has no image in `{}`",
                    lab.display(),
                    p.images
                )));
            }
        }
        let meta = serde_json::json!({ "cases": items.len(), "labelled": labels.is_some() });
        Ok(StepOutput {
            kind: "dataset".into(),
            items,
            meta,
            ..Default::default()
        })
    }
}
