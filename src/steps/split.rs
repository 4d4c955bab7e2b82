//! The `split` step.

use super::*;

/// The `split` step kind.
pub struct Split;

impl StepKind for Split {
    fn name(&self) -> &'static str {
        "split"
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
