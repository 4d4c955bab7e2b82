//! The `evaluate` step: per-case, per-organ Dice (MONAI `DiceMetric`
//! semantics), HD95 in mm and volumes, for a model's predictions or for any
//! label set against the reference labels.
//!
//! Output (artifact type `metrics`):
//! ```text
//! metrics.json          flat numbers (also StepOutput.metrics)
//! per_case.csv          case, class, dice, hd95_mm, pred_volume_mm3, ref_volume_mm3
//! predictions/<case>.nii.gz   with `save_predictions: true` and a model
//! ```
//! Scores are computed on the data set's (resampled) grid, as the recipe's
//! validation does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;
use crate::train::data::{label_ids, to_c_order};
use crate::train::metrics::{self, CaseMetrics, Grid};
use crate::train::predict::LoadedModel;
use crate::train::swin::parse_device;
use crate::train::TrainError;
use crate::volume::{nifti, Volume, Voxels};

/// The `evaluate` step kind.
pub struct Evaluate;

/// Parameters of `evaluate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// Classes scored (default: the model's, else 14).
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Write the predicted label maps.
    #[serde(default)]
    pub save_predictions: bool,
    /// Compute HD95 (costly on big volumes).
    #[serde(default = "yes")]
    pub hd95: bool,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "auto")]
    pub device: String,
}

fn yes() -> bool {
    true
}
fn auto() -> String {
    "auto".into()
}

fn err(e: TrainError) -> StepError {
    match e {
        TrainError::Param { .. } => StepError::Params(e.to_string()),
        TrainError::BadFile { .. } | TrainError::Shape { .. } => StepError::Input(e.to_string()),
        other => StepError::Other(other.to_string()),
    }
}

fn read(path: &std::path::Path) -> StepResult<Volume> {
    nifti::read(path).map_err(|e| StepError::Input(format!("`{}`: {e}", path.display())))
}

impl StepKind for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Scores segmentations against the reference labels of `data`: per case and organ \
         Dice (MONAI DiceMetric: an organ absent from the reference is NaN and left out of \
         means; reported with and without background), HD95 in mm and volumes. The \
         segmentations come from `model` (sliding-window inference) or from another label \
         set `predictions` (e.g. weak labels against real ones)."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[
            InputSpec {
                name: "data",
                arity: Arity::One,
            },
            InputSpec {
                name: "model",
                arity: Arity::Optional,
            },
            InputSpec {
                name: "predictions",
                arity: Arity::Optional,
            },
        ]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("num_classes", "classes scored (model's, else 14)"),
            (
                "save_predictions",
                "write predictions/<case>.nii.gz (false)",
            ),
            ("hd95", "compute HD95 in mm (true)"),
            ("device", "auto | cpu | cuda | cuda:N"),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        canonical_params::<EvaluateParams>(params)
    }
    fn run(&self, ctx: &StepContext) -> StepResult<StepOutput> {
        let p: EvaluateParams = parse_params(ctx.params)
            .map_err(|e| StepError::Params(format!("`{}`: {}", e.path, e.message)))?;
        let data = ctx.input("data")?;
        let model_in = ctx.inputs.get("model").and_then(|v| v.first());
        let preds_in = ctx.inputs.get("predictions").and_then(|v| v.first());
        let device = parse_device(&p.device).map_err(err)?;
        let model = match (model_in, preds_in) {
            (Some(m), None) => Some(LoadedModel::load(&m.dir, &device).map_err(err)?),
            (None, Some(_)) => None,
            _ => {
                return Err(StepError::Params(
                    "give exactly one of `model` or `predictions`".into(),
                ))
            }
        };
        let num_classes = p
            .num_classes
            .or(model.as_ref().map(|m| m.inference.num_classes))
            .unwrap_or(14);
        if p.save_predictions {
            std::fs::create_dir_all(ctx.out_dir.join("predictions"))?;
        }
        let mut rows: Vec<(String, CaseMetrics)> = Vec::new();
        let total = data.items.len();
        ctx.progress.set_total(total as u64);
        for (n, (id, dir)) in data.items.iter().enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(StepError::Other("cancelled".into()));
            }
            let lp = dir.join("label.nii.gz");
            let reference = read(&lp)?;
            let pred_vol = match (&model, preds_in) {
                (Some(m), _) => {
                    let image = read(&dir.join("image.nii.gz"))?;
                    let labels = m.segment_resampled(id, &image, &device).map_err(err)?;
                    Volume::new(image.shape, image.affine, Voxels::U8(labels))
                }
                (None, Some(pi)) => {
                    let pdir = pi.items.get(id).ok_or_else(|| {
                        StepError::Input(format!("`{}` has no case `{id}`", pi.reference))
                    })?;
                    read(&pdir.join("label.nii.gz"))?
                }
                (None, None) => unreachable!("checked above"),
            };
            if pred_vol.shape != reference.shape {
                return Err(StepError::Input(format!(
                    "case `{id}`: prediction shape {:?} differs from `{}` {:?}",
                    pred_vol.shape,
                    lp.display(),
                    reference.shape
                )));
            }
            let pp = dir.join("prediction");
            let pred = to_c_order(&label_ids(&pred_vol, &pp).map_err(err)?, pred_vol.shape);
            let refr = to_c_order(&label_ids(&reference, &lp).map_err(err)?, reference.shape);
            let grid = Grid {
                shape: reference.shape,
                spacing: reference.spacing(),
            };
            let m = if p.hd95 {
                metrics::case_metrics(&pred, &refr, &grid, num_classes)
            } else {
                CaseMetrics {
                    dice: metrics::dice_per_class(&pred, &refr, num_classes),
                    hd95: vec![f64::NAN; num_classes],
                    pred_volume_mm3: metrics::volumes_mm3(&pred, &grid, num_classes),
                    ref_volume_mm3: metrics::volumes_mm3(&refr, &grid, num_classes),
                }
            };
            if p.save_predictions && model.is_some() {
                nifti::write(
                    ctx.out_dir.join("predictions").join(format!("{id}.nii.gz")),
                    &pred_vol,
                )
                .map_err(|e| StepError::Other(e.to_string()))?;
            }
            rows.push((id.clone(), m));
            ctx.progress.set_position(n as u64 + 1);
        }

        // metrics.json: MONAI means with and without background, per organ, HD95, volumes.
        let dice_rows: Vec<Vec<f64>> = rows.iter().map(|(_, m)| m.dice.clone()).collect();
        let mut out = BTreeMap::new();
        let mut put = |k: String, v: f64| {
            if v.is_finite() {
                out.insert(k, v);
            }
        };
        put("mean_dice".into(), metrics::mean_dice(&dice_rows, true));
        put("mean_dice_fg".into(), metrics::mean_dice(&dice_rows, false));
        put("cases".into(), rows.len() as f64);
        for c in 0..num_classes {
            let col = |f: &dyn Fn(&CaseMetrics) -> f64| -> Vec<f64> {
                rows.iter().map(|(_, m)| f(m)).collect()
            };
            if let Some(d) = metrics::nan_mean(&col(&|m| m.dice[c])) {
                put(format!("dice_{c}"), d);
            }
            if c > 0 {
                if let Some(h) = metrics::nan_mean(&col(&|m| m.hd95[c])) {
                    put(format!("hd95_mm_{c}"), h);
                }
                let pv: f64 = col(&|m| m.pred_volume_mm3[c]).iter().sum();
                let rv: f64 = col(&|m| m.ref_volume_mm3[c]).iter().sum();
                if rv > 0.0 {
                    put(format!("volume_ratio_{c}"), pv / rv);
                }
            }
        }
        let mut csv = String::from("case,class,dice,hd95_mm,pred_volume_mm3,ref_volume_mm3\n");
        for (id, m) in &rows {
            for c in 0..num_classes {
                let f = |v: f64| {
                    if v.is_nan() {
                        String::new()
                    } else {
                        format!("{v}")
                    }
                };
                csv.push_str(&format!(
                    "{id},{c},{},{},{},{}\n",
                    f(m.dice[c]),
                    f(m.hd95[c]),
                    m.pred_volume_mm3[c],
                    m.ref_volume_mm3[c]
                ));
            }
        }
        std::fs::write(ctx.out_dir.join("per_case.csv"), csv)?;
        std::fs::write(
            ctx.out_dir.join("metrics.json"),
            serde_json::to_string_pretty(&out).expect("serialises"),
        )?;
        Ok(StepOutput {
            kind: "metrics".into(),
            metrics: out,
            ..Default::default()
        })
    }
}
