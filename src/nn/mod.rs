//! Neural-network layers and models on Candle: 3D convolutions, SwinUNETR (numerically equal to
//! MONAI's), and checkpoint I/O (the DiceCE loss
//! is [`crate::train::loss`]).
//!
//! # Using SwinUNETR
//! ```no_run
//! use candle_core::{Device, Tensor};
//! use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
//! use tsdistill::nn::{SwinUnetr, SwinUnetrConfig};
//! use tsdistill::train::loss::{dice_ce_loss, DiceCeOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let mut cfg = SwinUnetrConfig::new(1, 14); // in_channels, out_channels
//! cfg.feature_size = 48;
//!
//! // Training from scratch (MONAI's init): parameters live in a VarMap.
//! let varmap = VarMap::new();
//! let model = SwinUnetr::from_varmap(&cfg, &varmap, &dev)?;
//! let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: 1e-4, weight_decay: 1e-5,
//!     ..Default::default() })?;
//! let image = Tensor::zeros((1, 1, 96, 96, 96), candle_core::DType::F32, &dev)?;
//! let label = Tensor::zeros((1, 1, 96, 96, 96), candle_core::DType::U32, &dev)?;
//! let logits = model.forward(&image)?; // [B, 14, 96, 96, 96]
//! let loss = dice_ce_loss(&logits, &label, &DiceCeOptions::default())?;
//! opt.backward_step(&loss)?;
//! model.save("model.safetensors")?; // also writes model.json (the config)
//!
//! // Inference from a MONAI checkpoint (.pt/.pth/.safetensors).
//! let model = SwinUnetr::load("best_metric_model.pth", &cfg, &dev)?;
//! # Ok(()) }
//! ```
//! - Input `[B, in_channels, D, H, W]` f32, every spatial dim a multiple of 32 (not all 32).
//! - Checkpoints from MONAI ≤ 1.4 need `cfg.downsample = Downsample::Legacy`.
//! - A `SwinUnetr` is cheap to clone (tensors are shared).

pub mod attention;
pub(crate) mod carried;
pub mod checkpoint;
pub mod conv_cpu;
pub(crate) mod cpu_data;
pub(crate) mod fused;
mod matmul;
pub mod norm;
mod norm_generic;
pub mod ops;
mod recompute;
mod softmax_cpu;
pub mod swin_unetr;
mod window;

pub use conv_cpu::CpuConv3d;
pub use fused::with_generic_ops;
pub use ops::{Conv3dKernel, Im2colConv3d};
pub use swin_unetr::{Downsample, SwinUnetr, SwinUnetrConfig};

use std::path::PathBuf;

/// A raw output pointer shared by parallel tasks that write disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: only used by tasks that write disjoint element ranges of one live buffer.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

/// Errors of the nn module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The configuration is invalid.
    #[error("invalid SwinUNETR config: {0}")]
    Config(String),
    /// The input tensor cannot go through the model.
    #[error("input of shape {shape:?} rejected: {reason}")]
    Input {
        /// The offending shape.
        shape: Vec<usize>,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint file could not be read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A checkpoint's tensors do not match the model's parameters.
    #[error("`{path}` does not fit the model: {}\n\nhint: check feature_size, in/out channels and use_v2", .problems.join("; "))]
    Mismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// One entry per missing key, unexpected key or shape mismatch.
        problems: Vec<String>,
    },
}

/// Result with the nn [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
