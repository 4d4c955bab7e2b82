//! The `resample` step: every case to one orientation and voxel spacing,
//! like MONAI `Orientationd(axcodes) + Spacingd(pixdim, mode=(bilinear,
//! nearest))`, optionally after `CropForegroundd` (the experiment's order:
//! crop, then orientation, then spacing). A map step: each case is cached
//! on its own.
//!
//! Per case it reads every `<role>.nii[.gz]` of the input item and writes
//! `<role>.nii.gz` (images f32, labels in their own dtype) plus `grid.json`,
//! the original and resampled grids, so predictions can be mapped back with
//! [`crate::volume::resample::to_original_grid`]:
//! ```text
//! case000/
//! ├── image.nii.gz
//! ├── label.nii.gz
//! └── grid.json      {"source": {shape, affine}, "resampled": {shape, affine}, "crop": …}
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;
use crate::volume::crop::{crop, foreground_bbox};
use crate::volume::nifti;
use crate::volume::orientation::reorient;
use crate::volume::resample::{resample_spacing, Grid, Interp};
use crate::volume::Volume;

/// The `resample` step kind.
pub struct Resample;

/// Crop to the foreground of the `image` role before resampling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropParams {
    /// Voxels of the image above this value are foreground (HU; the
    /// experiment's `ScaleIntensityRanged(a_min=-175)` + `> 0` is −175).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Extra voxels kept around the box.
    #[serde(default)]
    pub margin: usize,
}

fn default_threshold() -> f64 {
    -175.0
}

/// Parameters of `resample`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResampleParams {
    /// Target voxel spacing in mm.
    pub spacing: [f64; 3],
    /// Target axis codes (MONAI `Orientationd(axcodes)`).
    #[serde(default = "default_orientation")]
    pub orientation: String,
    /// Interpolation per role; roles not listed use `linear`, or `nearest`
    /// when the role name starts with `label`.
    #[serde(default)]
    pub interpolation: BTreeMap<String, Interp>,
    /// Optional foreground crop before reorientation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_foreground: Option<CropParams>,
}

fn default_orientation() -> String {
    "RAS".into()
}

impl ResampleParams {
    fn interp(&self, role: &str) -> Interp {
        match self.interpolation.get(role) {
            Some(i) => *i,
            None if role.starts_with("label") => Interp::Nearest,
            None => Interp::Linear,
        }
    }
}

/// `image.nii.gz` → `image`; None for files that are not NIfTI.
fn role_of(name: &str) -> Option<&str> {
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
}

fn grid_json(g: &Grid) -> serde_json::Value {
    serde_json::json!({ "shape": g.shape, "affine": g.affine })
}

/// Reads the `source` grid that `resample` recorded in a case's `grid.json`.
pub fn source_grid(case_dir: &Path) -> Result<Grid, String> {
    let p = case_dir.join("grid.json");
    let text = fs_err::read_to_string(&p).map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("`{}`: {e}", p.display()))?;
    let src = &v["source"];
    let shape = serde_json::from_value(src["shape"].clone())
        .map_err(|e| format!("`{}`: source.shape: {e}", p.display()))?;
    let affine = serde_json::from_value(src["affine"].clone())
        .map_err(|e| format!("`{}`: source.affine: {e}", p.display()))?;
    Ok(Grid { shape, affine })
}

impl StepKind for Resample {
    fn name(&self) -> &'static str {
        "resample"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Brings every case to one orientation and voxel spacing, as MONAI \
         `Orientationd` + `Spacingd` (same output shape and voxel alignment; \
         trilinear for images, nearest for labels, border padding), optionally \
         cropping to the image's foreground first. Writes each role as \
         `<role>.nii.gz` and `grid.json` (original and new grid, for mapping \
         predictions back). Labels must share their image's grid."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[InputSpec {
            name: "input",
            arity: Arity::One,
        }]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("spacing", "[x, y, z] mm (required), e.g. [1.5, 1.5, 2.0]"),
            ("orientation", "axis codes, default RAS"),
            (
                "interpolation",
                "mapping role → linear | nearest (default: label* nearest, else linear)",
            ),
            (
                "crop_foreground",
                "{threshold: HU (default -175), margin: voxels (default 0)}; off when absent",
            ),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        let v = canonical_params::<ResampleParams>(params)?;
        let p: ResampleParams = parse_params(&v)?;
        if p.spacing.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(ParamError::new(
                "spacing",
                format!("expected three positive mm values, found {:?}", p.spacing),
            ));
        }
        let eye =
            crate::volume::Volume::new([1, 1, 1], identity(), crate::volume::Voxels::U8(vec![0]));
        reorient(&eye, &p.orientation)
            .map_err(|e| ParamError::new("orientation", e.to_string()))?;
        Ok(v)
    }
    fn resources(&self, _params: &serde_json::Value) -> Resources {
        Resources {
            threads: rayon::current_num_threads().min(4),
            gpu: false,
        }
    }
    fn map_over(&self) -> Option<&'static str> {
        Some("input")
    }
    fn run_item(&self, ctx: &ItemContext) -> StepResult<()> {
        let p: ResampleParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
        for e in fs_err::read_dir(ctx.item_dir)? {
            let path = e?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(role) = role_of(&name) {
                files.push((role.to_string(), path));
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(StepError::Input(format!(
                "case `{}`: no .nii/.nii.gz files in `{}`",
                ctx.case,
                ctx.item_dir.display()
            )));
        }
        let input_err =
            |e: nifti::NiftiError| StepError::Input(format!("case `{}`: {e}", ctx.case));
        let mut vols: Vec<(String, std::path::PathBuf, Volume)> = Vec::new();
        for (role, path) in files {
            let v = nifti::read(&path).map_err(input_err)?;
            vols.push((role, path, v));
        }
        // Every role must sit on the reference grid (the image's, else the first).
        let ref_i = vols.iter().position(|(r, _, _)| r == "image").unwrap_or(0);
        let (ref_shape, ref_affine) = (vols[ref_i].2.shape, vols[ref_i].2.affine);
        for (_, path, v) in &vols {
            let close =
                (0..3).all(|i| (0..4).all(|j| (v.affine[i][j] - ref_affine[i][j]).abs() < 1e-3));
            if v.shape != ref_shape || !close {
                return Err(StepError::Input(format!(
                    "case `{}`: `{}` has grid {:?} but its image `{}` has {:?} (shapes and affines must match)",
                    ctx.case,
                    path.display(),
                    v.shape,
                    vols[ref_i].1.display(),
                    ref_shape
                )));
            }
        }
        let source = Grid {
            shape: ref_shape,
            affine: ref_affine,
        };
        let bbox = match &p.crop_foreground {
            Some(c) => foreground_bbox(&vols[ref_i].2, c.threshold, c.margin),
            None => None,
        };
        let mut out_grid = None;
        for (role, _, v) in &vols {
            let v = match &bbox {
                Some(b) => crop(v, b),
                None => v.clone(),
            };
            let v = reorient(&v, &p.orientation)
                .map_err(|e| StepError::Input(format!("case `{}`: {e}", ctx.case)))?;
            let r = resample_spacing(&v, p.spacing, p.interp(role))
                .map_err(|e| StepError::Input(format!("case `{}`: {e}", ctx.case)))?;
            out_grid = Some(Grid::of(&r));
            nifti::write(ctx.out_dir.join(format!("{role}.nii.gz")), &r)
                .map_err(|e| StepError::Other(e.to_string()))?;
        }
        let crop_json = bbox.map(|b| serde_json::json!({ "lo": b.lo, "hi": b.hi }));
        let grid = serde_json::json!({
            "source": grid_json(&source),
            "resampled": grid_json(out_grid.as_ref().expect("at least one role")),
            "crop": crop_json,
        });
        fs_err::write(
            ctx.out_dir.join("grid.json"),
            serde_json::to_string_pretty(&grid).unwrap(),
        )?;
        Ok(())
    }
}

fn identity() -> crate::volume::Affine {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    a
}
