//! Reports: comparison of runs (text / Markdown / JSON).

pub mod compare;
pub use compare::{Comparison, ReportFormat};
