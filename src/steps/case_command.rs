//! The `case-command` step: a shell command run once per case, each case
//! cached on its own (e.g. TotalSegmentator over a data set).
//!
//! Per case the command gets `TSD_CASE` (the id), `TSD_CASE_DIR` (the input
//! case's files, e.g. `$TSD_CASE_DIR/image.nii.gz`), `TSD_OUT` (write this
//! case's files here, named by role: `image.nii.gz`, `label.nii.gz`),
//! `TSD_WITH_<n>` / `TSD_WITH_<STEP>` (the `with:` artifacts) and
//! `TSD_PARAM_<NAME>`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// The `case-command` step kind.
pub struct CaseCommand;

/// Parameters of `case-command`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseCommandParams {
    /// The shell script, run once per case.
    pub run: String,
    /// Files each case's command must write under `$TSD_OUT`.
    #[serde(default)]
    pub outs: Vec<String>,
    /// Input files kept from the input case when the command does not
    /// write them (e.g. keep `image.nii.gz` beside a new `label.nii.gz`).
    #[serde(default)]
    pub keep: Vec<String>,
    /// Values exported as `TSD_PARAM_<NAME>`.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Workspace files the command reads (hashed into every case's key).
    #[serde(default)]
    pub deps: Vec<String>,
}

impl StepKind for CaseCommand {
    fn name(&self) -> &'static str {
        "case-command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Runs a shell command once per case of its `input`, caching each case \
         on its own (adding a case runs the command for that case only). The \
         case's files are in `$TSD_CASE_DIR`, its id in `$TSD_CASE`; write the \
         case's output files into `$TSD_OUT`; `keep:` copies input files through."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[
            InputSpec {
                name: "input",
                arity: Arity::One,
            },
            InputSpec {
                name: "with",
                arity: Arity::Many,
            },
        ]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("run", "string (required): shell script run per case"),
            ("outs", "list of files each case must write under $TSD_OUT"),
            (
                "keep",
                "list of input case files copied to the output (e.g. image.nii.gz)",
            ),
            ("params", "mapping: values exported as TSD_PARAM_<NAME>"),
            ("env", "mapping: extra environment variables"),
            ("deps", "list of workspace paths/globs hashed into the key"),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        canonical_params::<CaseCommandParams>(params)
    }
    fn workspace_deps(&self, params: &serde_json::Value) -> Vec<String> {
        parse_params::<CaseCommandParams>(params)
            .map(|p| p.deps)
            .unwrap_or_default()
    }
    fn map_over(&self) -> Option<&'static str> {
        Some("input")
    }
    fn run_item(&self, ctx: &ItemContext) -> StepResult<()> {
        let p: CaseCommandParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let mut env = shell::param_env(&p.params);
        env.extend(p.env.clone());
        env.insert("TSD_CASE".into(), ctx.case.to_string());
        env.insert("TSD_CASE_DIR".into(), ctx.item_dir.display().to_string());
        env.insert("TSD_OUT".into(), ctx.out_dir.display().to_string());
        env.insert("TSD_STEP".into(), ctx.step.to_string());
        for (i, a) in ctx.inputs.get("with").into_iter().flatten().enumerate() {
            let dir = a.dir.display().to_string();
            env.insert(format!("TSD_WITH_{i}"), dir.clone());
            let step = a.reference.split('.').next().unwrap_or(&a.reference);
            env.insert(format!("TSD_WITH_{}", shell::env_name(step)), dir);
        }
        // The log lives outside the output so it never enters the object.
        let log = ctx.out_dir.with_extension("log");
        env.insert("TSD_WORKSPACE".into(), super::command::abs(ctx.workspace));
        shell::run(&p.run, ctx.workspace, &env, &log, ctx.cancel)?;
        let _ = std::fs::remove_file(&log);
        for k in &p.keep {
            let (src, dst) = (ctx.item_dir.join(k), ctx.out_dir.join(k));
            if !dst.exists() {
                if !src.is_file() {
                    return Err(StepError::Input(format!(
                        "`keep: {k}`: the input case has no `{k}`"
                    )));
                }
                fs_err::copy(&src, &dst)?;
            }
        }
        shell::check_outs(ctx.out_dir, &p.outs)
    }
}
