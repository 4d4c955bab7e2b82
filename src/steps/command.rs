//! The `command` step.

use super::*;

/// The `command` step kind.
pub struct Command;

impl StepKind for Command {
    fn name(&self) -> &'static str {
        "command"
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
