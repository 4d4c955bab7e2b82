//! The `totalseg-labels` step: TotalSegmentator outputs → BTCV label maps,
//! per case. Pair it with a `case-command` that runs TotalSegmentator:
//!
//! ```yaml
//! ts_raw:
//!   kind: case-command
//!   input: prep.unlabeled
//!   keep: [image.nii.gz]
//!   run: TotalSegmentator -i $TSD_CASE_DIR/image.nii.gz -o $TSD_OUT/totalseg.nii.gz --ml --fast
//! weak:
//!   kind: totalseg-labels
//!   input: ts_raw
//! ```

use serde::{Deserialize, Serialize};

use super::*;
use crate::totalseg::{read_btcv, IdTable};

/// The `totalseg-labels` step kind.
pub struct TotalSegLabels;

/// Parameters of `totalseg-labels`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TotalSegParams {
    /// The case file or folder holding TotalSegmentator's output.
    #[serde(default = "default_source")]
    pub source: String,
    /// Id table of multilabel files: `v2` (default) or `v1`.
    #[serde(default = "v2")]
    pub ids: IdTable,
}

fn default_source() -> String {
    "totalseg.nii.gz".into()
}

fn v2() -> IdTable {
    IdTable::V2
}

impl StepKind for TotalSegLabels {
    fn name(&self) -> &'static str {
        "totalseg-labels"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Maps TotalSegmentator's output for each case to a BTCV label map \
         (`label.nii.gz`, uint8: 1 spleen … 13 adrenal_gland_left; other classes 0), \
         on the same grid. `source` names the case's multilabel file (`--ml`, ids by \
         the `ids` table) or folder of per-structure masks. Other case files (e.g. \
         `image.nii.gz`) are carried through."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[InputSpec {
            name: "input",
            arity: Arity::One,
        }]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "source",
                "case file (--ml) or folder (per-structure); default totalseg.nii.gz",
            ),
            (
                "ids",
                "v2 (default) | v1: TotalSegmentator's class id table",
            ),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        canonical_params::<TotalSegParams>(params)
    }
    fn map_over(&self) -> Option<&'static str> {
        Some("input")
    }
    fn run_item(&self, ctx: &ItemContext) -> StepResult<()> {
        let p: TotalSegParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let src = ctx.item_dir.join(&p.source);
        if !src.exists() {
            return Err(StepError::Input(format!(
                "case `{}` has no `{}` (TotalSegmentator output expected at `{}`)",
                ctx.case,
                p.source,
                src.display()
            )));
        }
        let labels = read_btcv(&src, p.ids).map_err(|e| StepError::Input(e.to_string()))?;
        crate::volume::nifti::write(ctx.out_dir.join("label.nii.gz"), &labels)
            .map_err(|e| StepError::Other(e.to_string()))?;
        for e in fs_err::read_dir(ctx.item_dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != p.source
                && name != "label.nii.gz"
                && name != "manifest.json"
                && e.path().is_file()
            {
                fs_err::copy(e.path(), ctx.out_dir.join(&name))?;
            }
        }
        Ok(())
    }
}
