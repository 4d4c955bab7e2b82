//! The scheduler: runs ready steps in parallel within resource slots.

pub mod progress;
pub use progress::{CancelToken, Progress};
