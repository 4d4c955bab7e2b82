//! The `weak-label` step: a teacher model labels cases ("weak labels").
//! Map step: each case is labelled and cached on its own, so adding one
//! unlabelled scan labels only that scan. The output keeps each case's
//! `image.nii.gz` and writes the teacher's `label.nii.gz` beside it, so it
//! is a data set the `train` step takes like any other.

use serde::{Deserialize, Serialize};

use super::*;
use crate::train::predict::LoadedModel;
use crate::train::swin::parse_device;
use crate::volume::{nifti, Volume, Voxels};

/// The `weak-label` step kind.
pub struct WeakLabel;

/// Parameters of `weak-label`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeakLabelParams {
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "auto")]
    pub device: String,
}

fn auto() -> String {
    "auto".into()
}

impl StepKind for WeakLabel {
    fn name(&self) -> &'static str {
        "weak-label"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Labels every case of `input` with the teacher `model` (a `train` output): \
         the same preprocessing and sliding-window inference as evaluation, on the \
         input's grid. Each case is cached on its own. The output holds each case's \
         `image.nii.gz` and the teacher's `label.nii.gz`, ready for `train`. \
         (TotalSegmentator as a teacher: use `case-command`, see docs/totalsegmentator.md.)"
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[
            InputSpec {
                name: "input",
                arity: Arity::One,
            },
            InputSpec {
                name: "model",
                arity: Arity::One,
            },
        ]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[("device", "auto | cpu | cuda | cuda:N (default auto)")]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        canonical_params::<WeakLabelParams>(params)
    }
    fn resources(&self, params: &serde_json::Value) -> Resources {
        let gpu =
            parse_params::<WeakLabelParams>(params).is_ok_and(|p| p.device.starts_with("cuda"));
        Resources { threads: 1, gpu }
    }
    fn map_over(&self) -> Option<&'static str> {
        Some("input")
    }
    fn run_item(&self, ctx: &ItemContext) -> StepResult<()> {
        let p: WeakLabelParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let device = parse_device(&p.device).map_err(|e| StepError::Params(e.to_string()))?;
        let model_dir = &ctx
            .inputs
            .get("model")
            .and_then(|v| v.first())
            .ok_or_else(|| StepError::Params("missing input `model`".into()))?
            .dir;
        let model =
            LoadedModel::load(model_dir, &device).map_err(|e| StepError::Other(e.to_string()))?;
        let src = ctx.item_dir.join("image.nii.gz");
        let image = nifti::read(&src).map_err(|e| StepError::Input(e.to_string()))?;
        let labels = model
            .segment_resampled(ctx.case, &image, &device)
            .map_err(|e| StepError::Other(format!("case `{}`: {e}", ctx.case)))?;
        let label = Volume::new(image.shape, image.affine, Voxels::U8(labels));
        fs_err::copy(&src, ctx.out_dir.join("image.nii.gz"))?;
        nifti::write(ctx.out_dir.join("label.nii.gz"), &label)
            .map_err(|e| StepError::Other(e.to_string()))?;
        Ok(())
    }
}
