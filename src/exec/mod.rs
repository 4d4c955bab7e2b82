//! Execution: the parallel scheduler and the step executor, progress
//! reporting, status explanations and output links.

pub mod engine;
pub mod links;
pub mod progress;
pub mod report;
pub mod status;

pub use engine::{Engine, RunOptions, RunSummary};
pub use progress::{CancelToken, Progress};
