//! Segmenting a CT with a trained model: the training preprocessing
//! (orientation, spacing, window, crop), sliding-window inference, argmax,
//! and the labels mapped back onto the input's own grid and affine.
//!
//! `tsdistill predict MODEL IN.nii.gz OUT.nii.gz` calls [`predict_file`].

use std::path::Path;

use candle_core::Device;

use crate::nn::SwinUnetr;
use crate::volume::resample::{resample_spacing, to_original_grid, Grid as VGrid, Interp};
use crate::volume::{nifti, orientation, Volume, Voxels};

use super::data::{from_c_order, prepare, uncrop, Preprocess};
use super::error::{Result, TrainError};
use super::sliding_window::SlidingWindow;
use super::swin::{nn_err, Frozen};
use super::trainer::predict_labels;

/// What a trained model needs to see its data again: written by the train
/// step as `model/inference.json` beside `model.safetensors`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Voxel spacing (mm) of the training data (RAS after resampling).
    pub spacing: [f64; 3],
    /// Orientation of the training data.
    pub orientation: String,
    /// Window and crop.
    pub preprocess: Preprocess,
    /// Sliding-window settings.
    pub sliding_window: SlidingWindow,
    /// Number of classes.
    pub num_classes: usize,
}

/// A model directory: `model.safetensors` + `model.json` (the nn config) +
/// `inference.json`.
pub struct LoadedModel {
    /// The network.
    pub model: Frozen,
    /// Its preprocessing.
    pub inference: InferenceConfig,
}

impl LoadedModel {
    /// Loads a model directory (or the `model.safetensors` path inside it).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let weights = dir.join("model.safetensors");
        let net = SwinUnetr::load_saved(&weights, device).map_err(nn_err)?;
        let ip = dir.join("inference.json");
        let text = fs_err::read_to_string(&ip).map_err(|e| TrainError::Io {
            path: ip.clone(),
            source: e,
        })?;
        let inference = serde_json::from_str(&text).map_err(|e| TrainError::BadFile {
            path: ip.clone(),
            message: e.to_string(),
        })?;
        Ok(LoadedModel {
            model: Frozen(net),
            inference,
        })
    }

    /// Segments a volume already on the training grid (resampled data set
    /// items); returns class ids in NIfTI order over `vol`'s grid.
    pub fn segment_resampled(&self, id: &str, vol: &Volume, device: &Device) -> Result<Vec<u8>> {
        let p = prepare(id, vol, None, &self.inference.preprocess)?;
        let inner = predict_labels(
            &self.model,
            &p.image,
            p.grid.shape,
            &self.inference.sliding_window,
            device,
        )?;
        Ok(from_c_order(&uncrop(&inner, &p), vol.shape))
    }

    /// Segments a raw CT on its own grid: reorient + resample like the
    /// training data, segment, and map the labels back (nearest neighbour).
    pub fn segment(&self, id: &str, ct: &Volume, device: &Device) -> Result<Volume> {
        let oriented = orientation::reorient(ct, &self.inference.orientation).map_err(|e| {
            TrainError::Param {
                param: "orientation".into(),
                message: e.to_string(),
            }
        })?;
        let resampled = resample_spacing(&oriented, self.inference.spacing, Interp::Linear)
            .map_err(|e| TrainError::Param {
                param: "spacing".into(),
                message: e.to_string(),
            })?;
        let labels = self.segment_resampled(id, &resampled, device)?;
        let lab = Volume::new(resampled.shape, resampled.affine, Voxels::U8(labels));
        to_original_grid(&lab, &VGrid::of(ct)).map_err(|e| TrainError::Param {
            param: "spacing".into(),
            message: e.to_string(),
        })
    }
}

/// `tsdistill predict MODEL IN.nii.gz OUT.nii.gz`: writes a uint8 label map
/// with the input's shape and affine.
pub fn predict_file(model: &Path, input: &Path, output: &Path, device: &Device) -> Result<()> {
    crate::alloc::keep_freed_memory();
    let m = LoadedModel::load(model, device)?;
    let ct = nifti::read(input).map_err(|e| TrainError::BadFile {
        path: input.to_path_buf(),
        message: e.to_string(),
    })?;
    let id = input
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let labels = m.segment(&id, &ct, device)?;
    nifti::write(output, &labels).map_err(|e| TrainError::BadFile {
        path: output.to_path_buf(),
        message: e.to_string(),
    })
}
