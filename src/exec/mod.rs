//! Execution: the parallel scheduler and the step executor, progress
//! reporting, status explanations and output links.

pub mod engine;
pub mod gc;
pub mod links;
pub mod progress;
pub mod report;
mod show;
pub mod status;

pub use engine::{Engine, RunOptions, RunSummary};
pub use progress::{CancelToken, Progress};
