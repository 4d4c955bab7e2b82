//! tsdistill: a declarative, content-addressed experiment engine for 3D
//! medical image segmentation (see DESIGN in docs/ and README.md).
//!
//! The crate is cut into one module per concept:
//! - [`pipeline`]: YAML pipelines, interpolation, overrides, expansion, validation;
//! - [`graph`]: the step DAG and its renderings;
//! - [`cache`]: hashing, the object store, step keys, locks, run records;
//! - [`exec`]: the parallel scheduler;
//! - [`steps`]: one file per step kind behind the [`steps::StepKind`] trait;
//! - [`volume`]: NIfTI I/O, orientation, resampling, phantoms;
//! - [`nn`]: 3D convolutions and SwinUNETR on Candle;
//! - [`totalseg`]: TotalSegmentator outputs → BTCV label maps;
//! - [`train`]: patch sampling, training loop, sliding-window inference;
//! - [`alloc`]: allocator tuning for tensor-heavy work.

pub mod alloc;
pub mod cache;
pub mod exec;
pub mod graph;
pub mod nn;
pub mod pipeline;
pub mod report;
pub mod steps;
pub mod totalseg;
pub mod train;
pub mod volume;
