//! `compare RUN_A RUN_B`: which params differ, which steps' keys differ, and
//! every published metric side by side with its delta — `dvc params diff`
//! and `dvc metrics diff` in one.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::cache::key::{flatten, show_value};
use crate::cache::RunRecord;

/// Output format of reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned plain text.
    Text,
    /// A Markdown table (paste into a PR or notebook).
    Markdown,
    /// JSON.
    Json,
}

/// One differing parameter.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ParamDiff {
    /// `params.lr` or `train.lr`.
    pub name: String,
    /// Value in run A (`None`: absent).
    pub a: Option<Value>,
    /// Value in run B.
    pub b: Option<Value>,
}

/// One metric side by side.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricRow {
    /// Step instance.
    pub step: String,
    /// Metric name.
    pub metric: String,
    /// Value in A.
    pub a: Option<f64>,
    /// Value in B.
    pub b: Option<f64>,
    /// B − A when both exist.
    pub delta: Option<f64>,
}

/// The comparison of two runs.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Run A's id.
    pub a: String,
    /// Run B's id.
    pub b: String,
    /// Params that differ (pipeline params and step params).
    pub params: Vec<ParamDiff>,
    /// Steps whose keys differ (or exist in one run only).
    pub steps: Vec<String>,
    /// Every metric of either run.
    pub metrics: Vec<MetricRow>,
}

impl Comparison {
    /// Compares two run records.
    pub fn new(a: &RunRecord, b: &RunRecord) -> Self {
        let mut params = Vec::new();
        let mut diff = |prefix: &str, pa: &Value, pb: &Value| {
            let (fa, fb) = (flatten(pa), flatten(pb));
            let names: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
            for n in names {
                let (x, y) = (fa.get(n), fb.get(n));
                if x != y {
                    params.push(ParamDiff {
                        name: format!("{prefix}.{n}"),
                        a: x.cloned(),
                        b: y.cloned(),
                    });
                }
            }
        };
        diff("params", &a.params, &b.params);
        let names: BTreeSet<&String> = a.steps.keys().chain(b.steps.keys()).collect();
        let mut steps = Vec::new();
        let mut metrics = Vec::new();
        for n in names {
            let (sa, sb) = (a.steps.get(n), b.steps.get(n));
            let empty = Value::Object(Default::default());
            diff(
                n,
                sa.map_or(&empty, |s| &s.params),
                sb.map_or(&empty, |s| &s.params),
            );
            if sa.and_then(|s| s.key.as_ref()) != sb.and_then(|s| s.key.as_ref()) {
                steps.push(n.clone());
            }
            let none = BTreeMap::new();
            let (ma, mb) = (
                sa.map_or(&none, |s| &s.metrics),
                sb.map_or(&none, |s| &s.metrics),
            );
            let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            for k in keys {
                let (x, y) = (ma.get(k).copied(), mb.get(k).copied());
                let delta = match (x, y) {
                    (Some(x), Some(y)) => Some(y - x),
                    _ => None,
                };
                metrics.push(MetricRow {
                    step: n.clone(),
                    metric: k.clone(),
                    a: x,
                    b: y,
                    delta,
                });
            }
        }
        Comparison {
            a: a.id.clone(),
            b: b.id.clone(),
            params,
            steps,
            metrics,
        }
    }

    /// Renders in a format.
    pub fn render(&self, format: ReportFormat) -> String {
        match format {
            ReportFormat::Json => serde_json::to_string_pretty(self).expect("serialises") + "\n",
            ReportFormat::Text => self.table(false),
            ReportFormat::Markdown => self.table(true),
        }
    }

    fn table(&self, md: bool) -> String {
        let mut out = String::new();
        let val = |v: &Option<Value>| v.as_ref().map(show_value).unwrap_or_else(|| "—".into());
        let num = |v: Option<f64>| v.map(fmt_num).unwrap_or_else(|| "—".into());
        let sign = |v: Option<f64>| match v {
            Some(d) if d > 0.0 => format!("+{}", fmt_num(d)),
            Some(d) => fmt_num(d),
            None => "—".into(),
        };
        let header = |out: &mut String, title: &str| {
            if md {
                out.push_str(&format!("### {title}\n\n"));
            } else {
                out.push_str(&format!("{title}\n"));
            }
        };
        header(&mut out, &format!("Params ({} vs {})", self.a, self.b));
        let rows: Vec<Vec<String>> = self
            .params
            .iter()
            .map(|p| vec![p.name.clone(), val(&p.a), val(&p.b)])
            .collect();
        out.push_str(&grid(
            &["param", "A", "B"],
            &rows,
            md,
            "(no parameter differs)",
        ));
        header(&mut out, "Steps whose keys differ");
        let rows: Vec<Vec<String>> = self.steps.iter().map(|s| vec![s.clone()]).collect();
        out.push_str(&grid(&["step"], &rows, md, "(none)"));
        header(&mut out, "Metrics");
        let rows: Vec<Vec<String>> = self
            .metrics
            .iter()
            .map(|m| {
                vec![
                    m.step.clone(),
                    m.metric.clone(),
                    num(m.a),
                    num(m.b),
                    sign(m.delta),
                ]
            })
            .collect();
        out.push_str(&grid(
            &["step", "metric", "A", "B", "Δ"],
            &rows,
            md,
            "(no metrics published)",
        ));
        out
    }
}

/// Numbers as people read them: up to 6 significant digits.
pub fn fmt_num(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if x.abs() >= 1e-4 && x.abs() < 1e6 {
        let s = format!(
            "{:.*}",
            (5 - x.abs().log10().floor() as i32).max(0) as usize,
            x
        );
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        return s;
    }
    format!("{x:.4e}")
}

fn grid(head: &[&str], rows: &[Vec<String>], md: bool, empty: &str) -> String {
    if rows.is_empty() {
        return format!("  {empty}\n\n");
    }
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        if md {
            format!("| {} |\n", padded.join(" | "))
        } else {
            format!("  {}\n", padded.join("  ").trim_end())
        }
    };
    let mut out = line(head.iter().map(|s| s.to_string()).collect());
    if md {
        out.push_str(&format!(
            "|{}|\n",
            w.iter()
                .map(|n| "-".repeat(n + 2))
                .collect::<Vec<_>>()
                .join("|")
        ));
    }
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out.push('\n');
    out
}
