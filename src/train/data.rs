//! From NIfTI volumes to what the loop and the metrics consume: C-order
//! arrays in MONAI's axis order, the intensity window, the foreground crop.
//!
//! Axis order: a [`Volume`] stores x fastest (NIfTI order); MONAI's arrays
//! after `LoadImaged` are indexed `[x, y, z]` with z fastest in memory. The
//! train module works on the latter (C order, `[n0, n1, n2] = [nx, ny, nz]`),
//! so rot90 over axes (0, 1) is the axial plane, as in `RandRotate90d`.
//!
//! Deterministic preprocessing (the recipe's `ScaleIntensityRanged` then
//! `CropForegroundd(source_key="image")`, select `> 0`, margin 0) is applied
//! here to already resampled volumes.

use std::path::Path;

use crate::volume::crop::{crop, foreground_bbox, BBox};
use crate::volume::intensity::{scale_intensity_range, Window};
use crate::volume::{nifti, Volume};

use super::error::{Result, TrainError};
use super::metrics::Grid;

/// NIfTI order (x fastest) → C order over `[nx, ny, nz]` (z fastest).
pub fn to_c_order<T: Copy>(data: &[T], shape: [usize; 3]) -> Vec<T> {
    let [nx, ny, nz] = shape;
    let mut out = Vec::with_capacity(data.len());
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                out.push(data[x + nx * (y + ny * z)]);
            }
        }
    }
    out
}

/// C order over `[nx, ny, nz]` → NIfTI order (x fastest).
pub fn from_c_order<T: Copy + Default>(data: &[T], shape: [usize; 3]) -> Vec<T> {
    let [nx, ny, nz] = shape;
    let mut out = vec![T::default(); data.len()];
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                out[x + nx * (y + ny * z)] = data[(x * ny + y) * nz + z];
            }
        }
    }
    out
}

/// Deterministic preprocessing settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Preprocess {
    /// HU window mapped to [0, 1] with clipping; `null` when the data set is
    /// already scaled.
    pub window: Option<[f64; 2]>,
    /// Crop to the bounding box of (scaled) image > 0.
    pub crop_foreground: bool,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            window: Some([-175.0, 250.0]),
            crop_foreground: true,
        }
    }
}

/// A preprocessed case.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Case id.
    pub id: String,
    /// Intensities, C order over `grid.shape`.
    pub image: Vec<f32>,
    /// Class ids, same layout, when a label was given.
    pub label: Option<Vec<u8>>,
    /// Shape (after the crop) and spacing.
    pub grid: Grid,
    /// The crop box within the input volume (the whole volume without crop).
    pub bbox: BBox,
    /// The input (uncropped) shape.
    pub full_shape: [usize; 3],
}

/// Reads a label volume's voxels as class ids 0..=255, naming the file otherwise.
pub fn label_ids(vol: &Volume, path: &Path) -> Result<Vec<u8>> {
    vol.data
        .to_labels()
        .into_iter()
        .map(|v| {
            u8::try_from(v).map_err(|_| TrainError::BadFile {
                path: path.to_path_buf(),
                message: format!("expected class ids in 0..=255, found {v}"),
            })
        })
        .collect()
}

/// Applies [`Preprocess`] to an image and its optional label (same grid).
pub fn prepare(
    id: &str,
    image: &Volume,
    label: Option<(&Volume, &Path)>,
    pre: &Preprocess,
) -> Result<Prepared> {
    if let Some((lab, path)) = label {
        if lab.shape != image.shape {
            return Err(TrainError::BadFile {
                path: path.to_path_buf(),
                message: format!(
                    "case `{id}`: expected the image's shape {:?}, found {:?}",
                    image.shape, lab.shape
                ),
            });
        }
    }
    let scaled = match pre.window {
        Some([a_min, a_max]) => {
            let w = Window {
                a_min,
                a_max,
                b_min: 0.0,
                b_max: 1.0,
                clip: true,
            };
            scale_intensity_range(image, &w)
        }
        None => image.clone(),
    };
    let full = BBox {
        lo: [0; 3],
        hi: image.shape,
    };
    let bbox = if pre.crop_foreground {
        foreground_bbox(&scaled, 0.0, 0).unwrap_or(full)
    } else {
        full
    };
    let img = crop(&scaled, &bbox);
    let lab = match label {
        Some((l, path)) => {
            let c = crop(l, &bbox);
            Some(to_c_order(&label_ids(&c, path)?, c.shape))
        }
        None => None,
    };
    let spacing = img.spacing();
    Ok(Prepared {
        id: id.to_string(),
        image: to_c_order(&img.data.to_f32(), img.shape),
        label: lab,
        grid: Grid {
            shape: img.shape,
            spacing,
        },
        bbox,
        full_shape: image.shape,
    })
}

/// Reads `image.nii.gz` (and `label.nii.gz` when `with_label`) of an item directory.
pub fn read_item(id: &str, dir: &Path, with_label: bool, pre: &Preprocess) -> Result<Prepared> {
    let ip = dir.join("image.nii.gz");
    let image = nifti::read(&ip).map_err(|e| TrainError::BadFile {
        path: ip.clone(),
        message: e.to_string(),
    })?;
    if !with_label {
        return prepare(id, &image, None, pre);
    }
    let lp = dir.join("label.nii.gz");
    let label = nifti::read(&lp).map_err(|e| TrainError::BadFile {
        path: lp.clone(),
        message: e.to_string(),
    })?;
    prepare(id, &image, Some((&label, &lp)), pre)
}

/// Pastes a label map of the crop box back into the full grid (0 outside),
/// C order.
pub fn uncrop(labels: &[u8], p: &Prepared) -> Vec<u8> {
    let [f0, f1, f2] = p.full_shape;
    let [c0, c1, c2] = p.grid.shape;
    let mut out = vec![0u8; f0 * f1 * f2];
    for i in 0..c0 {
        for j in 0..c1 {
            let src = (i * c1 + j) * c2;
            let dst = ((i + p.bbox.lo[0]) * f1 + j + p.bbox.lo[1]) * f2 + p.bbox.lo[2];
            out[dst..dst + c2].copy_from_slice(&labels[src..src + c2]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_round_trip() {
        let shape = [3, 4, 2];
        let f: Vec<u32> = (0..24).collect();
        let c = to_c_order(&f, shape);
        // voxel (x=1, y=2, z=1): NIfTI index 1 + 3·(2 + 4·1) = 19; C index (1·4 + 2)·2 + 1 = 13.
        assert_eq!(c[13], 19);
        assert_eq!(from_c_order(&c, shape), f);
    }
}
