//! TotalSegmentator → BTCV: reads TotalSegmentator's outputs in either
//! layout and maps its `total` task class ids to the 13 BTCV organ ids.
//!
//! Layouts (TotalSegmentator 2.x, `-o`): with `--ml` one multilabel uint8
//! file of `total` ids; without, a folder with one binary `<structure>.nii.gz`
//! per class. Ids: `totalsegmentator/map_to_binary.py`, `class_map["total"]`
//! (v2) and `class_map["total_v1"]` (v1, or v2 run with `--v1_order`).

use std::path::Path;

use crate::volume::{nifti, Volume, Voxels};

/// BTCV organ names in BTCV order (label = index + 1): the crate's one list.
pub use crate::volume::phantom::BTCV_ORGANS as BTCV;

/// Which TotalSegmentator id table a multilabel file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdTable {
    /// TotalSegmentator ≥ 2.0 `total` task (the default).
    V2,
    /// `total_v1` ids (TotalSegmentator 1.x, or `--v1_order`).
    V1,
}

impl IdTable {
    /// The `total` id of each BTCV organ, in BTCV order.
    pub fn ids(self) -> [u8; 13] {
        match self {
            // spleen, kidney R, kidney L, gallbladder, esophagus, liver, stomach,
            // aorta, IVC, portal+splenic, pancreas, adrenal R, adrenal L
            IdTable::V2 => [1, 2, 3, 4, 15, 5, 6, 52, 63, 64, 7, 8, 9],
            IdTable::V1 => [1, 2, 3, 4, 42, 5, 6, 7, 8, 9, 10, 11, 12],
        }
    }

    /// A 256-entry lookup: `total` id → BTCV id (0 for every other class).
    pub fn lookup(self) -> [u8; 256] {
        let mut t = [0u8; 256];
        for (i, id) in self.ids().iter().enumerate() {
            t[*id as usize] = i as u8 + 1;
        }
        t
    }
}

/// Errors reading TotalSegmentator outputs; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TotalSegError {
    /// A NIfTI read failed.
    #[error("{0}")]
    Nifti(String),
    /// A file holds something other than TotalSegmentator labels.
    #[error("`{path}`: {message}")]
    Bad {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn read(path: &Path) -> Result<Volume, TotalSegError> {
    nifti::read(path).map_err(|e| TotalSegError::Nifti(e.to_string()))
}

fn ids_of(vol: &Volume, path: &Path) -> Result<Vec<u8>, TotalSegError> {
    vol.data
        .to_labels()
        .into_iter()
        .map(|v| {
            u8::try_from(v).map_err(|_| TotalSegError::Bad {
                path: path.to_path_buf(),
                message: format!("voxel value {v} is not a TotalSegmentator class id (0–255)"),
            })
        })
        .collect()
}

/// Maps a multilabel (`--ml`) file to BTCV ids on the same grid.
pub fn from_multilabel(path: &Path, table: IdTable) -> Result<Volume, TotalSegError> {
    let vol = read(path)?;
    let lut = table.lookup();
    let labels: Vec<u8> = ids_of(&vol, path)?
        .into_iter()
        .map(|v| lut[v as usize])
        .collect();
    Ok(Volume::new(vol.shape, vol.affine, Voxels::U8(labels)))
}

/// Builds BTCV labels from a per-structure folder (`<structure>.nii.gz`
/// binary masks). Missing organ files are an error (TotalSegmentator writes
/// every class, empty or not); masks must share one grid and not overlap.
pub fn from_folder(dir: &Path) -> Result<Volume, TotalSegError> {
    let mut grid = None;
    let mut labels: Vec<u8> = Vec::new();
    for (i, name) in BTCV.iter().enumerate() {
        let path = dir.join(format!("{name}.nii.gz"));
        if !path.is_file() {
            return Err(TotalSegError::Bad {
                path,
                message: "missing: a TotalSegmentator output folder has one file per class".into(),
            });
        }
        let mask = read(&path)?;
        let (shape, affine) = *grid.get_or_insert((mask.shape, mask.affine));
        if mask.shape != shape || mask.affine != affine {
            return Err(TotalSegError::Bad {
                path,
                message: format!(
                    "grid {:?} differs from the other masks' {shape:?}",
                    mask.shape
                ),
            });
        }
        if labels.is_empty() {
            labels = vec![0; mask.len()];
        }
        for (j, v) in ids_of(&mask, &path)?.into_iter().enumerate() {
            if v != 0 {
                if labels[j] != 0 {
                    return Err(TotalSegError::Bad {
                        path: path.clone(),
                        message: format!(
                            "overlaps `{}` at voxel {j}",
                            BTCV[labels[j] as usize - 1]
                        ),
                    });
                }
                labels[j] = i as u8 + 1;
            }
        }
    }
    let (shape, affine) = grid.expect("13 organs read");
    Ok(Volume::new(shape, affine, Voxels::U8(labels)))
}

/// Reads either layout: a folder is per-structure, a file multilabel.
pub fn read_btcv(path: &Path, table: IdTable) -> Result<Volume, TotalSegError> {
    if path.is_dir() {
        from_folder(path)
    } else {
        from_multilabel(path, table)
    }
}
