//! The `compare` step: the metrics of several steps side by side, as a
//! Markdown table, CSV and JSON inside the pipeline (the `tsdistill compare`
//! command does the same across runs).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::*;
use crate::report::compare::fmt_num;

/// The `compare` step kind.
pub struct Compare;

/// Parameters of `compare`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareParams {
    /// Only these metrics (default: every metric any input publishes).
    #[serde(default)]
    pub metrics: Vec<String>,
    /// The input the deltas are taken against (default: the first).
    #[serde(default)]
    pub baseline: Option<String>,
}

impl StepKind for Compare {
    fn name(&self) -> &'static str {
        "compare"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Puts the metrics of its `inputs` (e.g. `[eval@real, eval@weak]`) side by \
         side, with each input's delta against the `baseline` (default: the first). \
         Writes `comparison.md`, `comparison.csv` and `comparison.json`, and publishes \
         every value as `<step>.<metric>` so `tsdistill compare` sees them across runs."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[InputSpec {
            name: "inputs",
            arity: Arity::Many,
        }]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            ("metrics", "list of metric names to show (default: all)"),
            (
                "baseline",
                "input step the deltas are taken against (default: the first)",
            ),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        canonical_params::<CompareParams>(params)
    }
    fn run(&self, ctx: &StepContext) -> StepResult<StepOutput> {
        let p: CompareParams =
            parse_params(ctx.params).map_err(|e| StepError::Params(e.message))?;
        let inputs = ctx.inputs.get("inputs").cloned().unwrap_or_default();
        if inputs.len() < 2 {
            return Err(StepError::Params(
                "`inputs` needs at least two steps to compare".into(),
            ));
        }
        let mut table: Vec<(String, BTreeMap<String, f64>)> = Vec::new();
        for a in &inputs {
            let path = a.dir.join("metrics.json");
            let m = if path.is_file() {
                crate::exec::engine::read_metrics(&path).map_err(StepError::Input)?
            } else {
                BTreeMap::new()
            };
            table.push((a.step.clone(), m));
        }
        let base = match &p.baseline {
            None => 0,
            Some(b) => table.iter().position(|(s, _)| s == b).ok_or_else(|| {
                let names: Vec<&str> = table.iter().map(|(s, _)| s.as_str()).collect();
                StepError::Params(format!(
                    "baseline `{b}` is not an input (inputs: {})",
                    names.join(", ")
                ))
            })?,
        };
        let names: BTreeSet<&String> = if p.metrics.is_empty() {
            table.iter().flat_map(|(_, m)| m.keys()).collect()
        } else {
            p.metrics.iter().collect()
        };
        let mut md = String::from("| metric |");
        let mut csv = String::from("metric");
        for (s, _) in &table {
            let _ = write!(md, " {s} |");
            let _ = write!(csv, ",{s}");
        }
        for (i, (s, _)) in table.iter().enumerate() {
            if i != base {
                let _ = write!(md, " Δ {s} |");
            }
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(table.len() * 2 - 1));
        md.push('\n');
        csv.push('\n');
        let mut metrics = BTreeMap::new();
        let mut json = serde_json::Map::new();
        for name in &names {
            let _ = write!(md, "| {name} |");
            let _ = write!(csv, "{name}");
            let mut row = serde_json::Map::new();
            for (s, m) in &table {
                let v = m.get(*name).copied();
                let _ = write!(md, " {} |", v.map(fmt_num).unwrap_or_else(|| "—".into()));
                let _ = write!(csv, ",{}", v.map(|x| x.to_string()).unwrap_or_default());
                if let Some(v) = v {
                    metrics.insert(format!("{s}.{name}"), v);
                }
                row.insert(
                    s.clone(),
                    v.map_or(serde_json::Value::Null, |x| serde_json::json!(x)),
                );
            }
            let b = table[base].1.get(*name).copied();
            for (i, (_, m)) in table.iter().enumerate() {
                if i != base {
                    let d = match (b, m.get(*name)) {
                        (Some(b), Some(v)) if v - b > 0.0 => format!("+{}", fmt_num(v - b)),
                        (Some(b), Some(v)) => fmt_num(v - b),
                        _ => "—".into(),
                    };
                    let _ = write!(md, " {d} |");
                }
            }
            md.push('\n');
            csv.push('\n');
            json.insert(name.to_string(), serde_json::Value::Object(row));
        }
        fs_err::write(ctx.out_dir.join("comparison.md"), md)?;
        fs_err::write(ctx.out_dir.join("comparison.csv"), csv)?;
        let j = serde_json::json!({ "baseline": table[base].0, "metrics": json });
        fs_err::write(
            ctx.out_dir.join("comparison.json"),
            serde_json::to_vec_pretty(&j).expect("json"),
        )?;
        Ok(StepOutput {
            kind: "report".into(),
            metrics,
            ..Default::default()
        })
    }
}
