//! The `dataset` step.

use super::*;

/// The `dataset` step kind.
pub struct Dataset;

impl StepKind for Dataset {
    fn name(&self) -> &'static str {
        "dataset"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "todo"
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        Ok(params.clone())
    }
}
