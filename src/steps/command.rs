//! The `command` step: a shell command with declared inputs, params and
//! outputs, like a DVC stage. This is how users run anything the engine
//! does not know.
//!
//! The command runs in the pipeline's directory with:
//! `TSD_OUT` (write outputs here), `TSD_WORK` (private, survives a crash),
//! `TSD_INPUT` / `TSD_INPUT_<n>` / `TSD_INPUT_<STEP>` (input artifact
//! directories), `TSD_PARAM_<NAME>` (its `params:`). A `metrics.json` of
//! numbers written to `TSD_OUT` is published to `compare`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// The `command` step kind.
pub struct Command;

/// Parameters of `command`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// The shell script (`sh -c`).
    pub run: String,
    /// Workspace files or globs the command reads (their contents enter the key).
    #[serde(default)]
    pub deps: Vec<String>,
    /// Files the command must write under `$TSD_OUT`.
    #[serde(default)]
    pub outs: Vec<String>,
    /// Values that enter the key and reach the command as `TSD_PARAM_<NAME>`.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Extra environment variables (they enter the key).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// CPU threads the command uses.
    #[serde(default = "one")]
    pub threads: usize,
    /// The command needs the GPU.
    #[serde(default)]
    pub gpu: bool,
}

fn one() -> usize {
    1
}

impl StepKind for Command {
    fn name(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Runs a shell command with declared inputs (`inputs:` step references, \
         `deps:` workspace files), `params:` and `outs:`, like a DVC stage. \
         The command writes into `$TSD_OUT`; inputs are at `$TSD_INPUT_<n>` and \
         `$TSD_INPUT_<STEP>`, params at `$TSD_PARAM_<NAME>`. A `metrics.json` \
         in `$TSD_OUT` is published."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[InputSpec {
            name: "inputs",
            arity: Arity::Many,
        }]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("run", "string (required): shell script, run with `sh -c`"),
            (
                "deps",
                "list of paths/globs in the workspace, hashed into the key",
            ),
            (
                "outs",
                "list of files the command must write under $TSD_OUT",
            ),
            ("params", "mapping: values exported as TSD_PARAM_<NAME>"),
            ("env", "mapping: extra environment variables"),
            (
                "threads",
                "integer (default 1): CPU slots claimed from --jobs",
            ),
            ("gpu", "boolean (default false): claims the GPU slot"),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        canonical_params::<CommandParams>(params)
    }
    fn workspace_deps(&self, params: &serde_json::Value) -> Vec<String> {
        parse_params::<CommandParams>(params)
            .map(|p| p.deps)
            .unwrap_or_default()
    }
    fn resources(&self, params: &serde_json::Value) -> Resources {
        let p = parse_params::<CommandParams>(params).ok();
        Resources {
            threads: p.as_ref().map_or(1, |p| p.threads.max(1)),
            gpu: p.as_ref().is_some_and(|p| p.gpu),
        }
    }
    fn run(&self, ctx: &StepContext) -> StepResult<StepOutput> {
        let p: CommandParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let mut env = shell::param_env(&p.params);
        env.extend(p.env.clone());
        env.insert("TSD_OUT".into(), ctx.out_dir.display().to_string());
        env.insert("TSD_WORK".into(), ctx.work_dir.display().to_string());
        env.insert("TSD_WORKSPACE".into(), abs(ctx.workspace));
        env.insert("TSD_STEP".into(), ctx.step.to_string());
        for (i, a) in ctx.inputs.get("inputs").into_iter().flatten().enumerate() {
            let dir = a.dir.display().to_string();
            if i == 0 {
                env.insert("TSD_INPUT".into(), dir.clone());
            }
            env.insert(format!("TSD_INPUT_{i}"), dir.clone());
            let step = a.reference.split('.').next().unwrap_or(&a.reference);
            env.insert(format!("TSD_INPUT_{}", shell::env_name(step)), dir);
        }
        let log = ctx.work_dir.join("command.log");
        shell::run(&p.run, ctx.workspace, &env, &log, ctx.cancel)?;
        shell::check_outs(ctx.out_dir, &p.outs)?;
        Ok(StepOutput {
            kind: "files".into(),
            ..Default::default()
        })
    }
}

/// Absolute form of a path for the environment.
pub(crate) fn abs(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
