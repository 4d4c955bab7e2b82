//! Training, inference and evaluation: the seed experiment's loop, MONAI-exact.
//!
//! One concept per file:
//! - [`loss`]: DiceCE (`DiceCELoss(to_onehot_y=True, softmax=True)`);
//! - [`metrics`]: Dice (`DiceMetric`), HD95 in mm, volumes;
//! - [`sliding_window`]: `sliding_window_inference` over whole volumes;
//! - [`sampler`]: `RandCropByPosNegLabeld` + flips, rot90, intensity shift;
//! - [`optim`]: AdamW with checkpointable state;
//! - [`schedule`]: learning-rate schedules, gradient clipping;
//! - [`loader`]: batches built on worker threads ahead of the model;
//! - [`model`]: the model trait the loop drives, seeded initialisation;
//! - [`trainer`]: the loop, validation, checkpoints and resume;
//! - [`data`]: NIfTI volumes → C-order arrays, window, foreground crop;
//! - [`swin`]: the SwinUNETR as a trainable model, device choice;
//! - [`predict`]: segmenting a CT with a trained model (`tsdistill predict`);
//! - [`error`]: the module's error type.

pub mod data;
pub mod error;
pub mod loader;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod predict;
pub mod sampler;
pub mod schedule;
pub mod sliding_window;
pub mod swin;
pub mod trainer;

pub use error::{Result, TrainError};
