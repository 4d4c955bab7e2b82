//! The `phantom` step: a synthetic abdominal CT data set with the 13 BTCV
//! organs labelled (see [`crate::volume::phantom`]), so a pipeline runs
//! with no download.
//!
//! Output layout (one item per case):
//! ```text
//! case000/
//! ├── image.nii.gz   int16 HU
//! └── label.nii.gz   uint8, BTCV ids 0–13
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;
use crate::volume::nifti;
use crate::volume::phantom::{generate_case, PhantomConfig, BTCV_ORGANS};

/// The `phantom` step kind.
pub struct Phantom;

/// Parameters of `phantom`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhantomParams {
    /// Number of cases.
    pub count: usize,
    /// Seed of the set (the same seed gives the same voxels).
    #[serde(default)]
    pub seed: u64,
    /// Nominal grid (x, y, z), jittered ±6% per case.
    #[serde(default = "default_shape")]
    pub shape: [usize; 3],
    /// Nominal spacing in mm (x, y, z), jittered per case.
    #[serde(default = "default_spacing")]
    pub spacing: [f64; 3],
    /// Voxel noise standard deviation (HU).
    #[serde(default = "default_noise")]
    pub noise_hu: f64,
    /// Store some cases as LPS / LAS / RPI instead of RAS.
    #[serde(default = "yes")]
    pub mixed_orientation: bool,
}

fn default_shape() -> [usize; 3] {
    PhantomConfig::default().shape
}
fn default_spacing() -> [f64; 3] {
    PhantomConfig::default().spacing
}
fn default_noise() -> f64 {
    PhantomConfig::default().noise_hu
}
fn yes() -> bool {
    true
}

impl PhantomParams {
    fn config(&self) -> PhantomConfig {
        PhantomConfig {
            seed: self.seed,
            shape: self.shape,
            spacing: self.spacing,
            noise_hu: self.noise_hu,
            mixed_orientation: self.mixed_orientation,
            jitter_grid: true,
        }
    }
}

impl StepKind for Phantom {
    fn name(&self) -> &'static str {
        "phantom"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "A synthetic abdominal CT data set: `count` cases, each an int16 HU \
         `image.nii.gz` and a uint8 `label.nii.gz` with the 13 BTCV organs in \
         BTCV order (1 spleen … 13 adrenal_gland_left). Anatomy, HU, noise, \
         field of view and spacing vary per case; some cases are stored LPS, \
         LAS or RPI. Deterministic per `seed`. Defaults: about 96×96×48 voxels \
         at 3.2×3.2×3.6 mm."
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "count",
                "integer (required): number of cases (ids case000, case001, …)",
            ),
            ("seed", "integer, default 0"),
            (
                "shape",
                "[x, y, z] voxels, default [96, 96, 48] (±6% per case)",
            ),
            (
                "spacing",
                "[x, y, z] mm, default [3.2, 3.2, 3.6] (±5% in-plane, ±10% z)",
            ),
            ("noise_hu", "voxel noise σ in HU, default 12"),
            (
                "mixed_orientation",
                "bool, default true: some cases LPS/LAS/RPI",
            ),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        let v = canonical_params::<PhantomParams>(params)?;
        let p: PhantomParams = parse_params(&v)?;
        if p.count == 0 || p.count > 1000 {
            return Err(ParamError::new(
                "count",
                format!("expected 1–1000 cases, found {}", p.count),
            ));
        }
        if p.shape.iter().any(|&n| !(8..=1024).contains(&n)) {
            return Err(ParamError::new(
                "shape",
                format!("expected 8–1024 voxels per axis, found {:?}", p.shape),
            ));
        }
        if p.spacing.iter().any(|&s| !(s > 0.1 && s < 20.0)) {
            return Err(ParamError::new(
                "spacing",
                format!("expected 0.1–20 mm, found {:?}", p.spacing),
            ));
        }
        if !(p.noise_hu >= 0.0 && p.noise_hu < 500.0) {
            return Err(ParamError::new(
                "noise_hu",
                format!("expected 0–500 HU, found {}", p.noise_hu),
            ));
        }
        Ok(v)
    }
    fn resources(&self, _params: &serde_json::Value) -> Resources {
        Resources {
            threads: rayon::current_num_threads(),
            gpu: false,
        }
    }
    fn run(&self, ctx: &StepContext) -> StepResult<StepOutput> {
        let p: PhantomParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let cfg = p.config();
        ctx.progress.set_total(p.count as u64);
        let mut items = BTreeMap::new();
        for i in 0..p.count {
            if ctx.cancel.is_cancelled() {
                return Err(StepError::Other("cancelled".into()));
            }
            let case = generate_case(&cfg, i);
            let dir = ctx.out_dir.join(&case.id);
            fs_err::create_dir_all(&dir)?;
            let (img, lab) = (dir.join("image.nii.gz"), dir.join("label.nii.gz"));
            nifti::write(&img, &case.image).map_err(|e| StepError::Other(e.to_string()))?;
            nifti::write(&lab, &case.label).map_err(|e| StepError::Other(e.to_string()))?;
            let files = BTreeMap::from([
                ("image.nii.gz".to_string(), img),
                ("label.nii.gz".to_string(), lab),
            ]);
            items.insert(case.id, ItemSource::Files(files));
            ctx.progress.inc(1);
        }
        let labels: serde_json::Map<String, serde_json::Value> = LABELS
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        Ok(StepOutput {
            kind: "dataset".into(),
            items,
            meta: serde_json::json!({ "labels": labels, "generator": "tsdistill phantom", "seed": p.seed }),
            ..Default::default()
        })
    }
}

/// Label id → BTCV name.
static LABELS: std::sync::LazyLock<Vec<(usize, &'static str)>> = std::sync::LazyLock::new(|| {
    BTCV_ORGANS
        .iter()
        .enumerate()
        .map(|(i, n)| (i + 1, *n))
        .collect()
});
