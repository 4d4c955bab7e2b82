//! Volumes: 3D voxel grids with a world affine, and everything the pipeline
//! does to them before a network sees them.
//!
//! - [`Volume`] / [`Voxels`]: voxel data (x fastest, NIfTI order) plus a 4×4
//!   affine in world millimetres, RAS+ as nibabel reports it;
//! - [`nifti`]: a focused NIfTI-1 reader/writer (`.nii`, `.nii.gz`) that
//!   follows nibabel's rules for scaling and sform/qform preference;
//! - [`gzip`]: parallel multi-member gzip, so `.nii.gz` is never the bottleneck;
//! - [`orientation`]: axis codes and reorientation (MONAI `Orientationd`);
//! - [`resample`]: MONAI `Spacingd` geometry with trilinear / nearest sampling,
//!   plus the inverse mapping back onto a case's original grid;
//! - [`intensity`]: HU windowing (MONAI `ScaleIntensityRanged`);
//! - [`crop`]: crop to the foreground bounding box (MONAI `CropForegroundd`);
//! - [`phantom`]: synthetic abdominal CTs with the 13 BTCV organs.

pub mod crop;
pub mod gzip;
pub mod intensity;
pub mod nifti;
pub mod orientation;
pub mod phantom;
pub mod resample;
mod volume;

pub use volume::{Affine, DType, Volume, Voxels};
