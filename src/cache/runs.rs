//! Run records: one JSON per `tsdistill run` (params, per-step outcome,
//! times, metrics), written as the run goes so a killed run keeps its record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What happened to a step in a run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// Computed in this run.
    Ran,
    /// Found in the cache.
    Cached,
    /// Failed.
    Failed,
    /// Not run because an input failed.
    Skipped,
    /// Not reached (interrupted, or not selected by `--step`).
    NotRun,
}

/// One step's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// Outcome.
    pub status: StepStatus,
    /// Step kind.
    pub kind: String,
    /// Step key, when known.
    #[serde(default)]
    pub key: Option<String>,
    /// Output object.
    #[serde(default)]
    pub output: Option<String>,
    /// Canonical params.
    #[serde(default)]
    pub params: Value,
    /// Wall seconds spent.
    #[serde(default)]
    pub seconds: f64,
    /// Items computed / total (map steps).
    #[serde(default)]
    pub items: Option<(usize, usize)>,
    /// Published metrics.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The error, if it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// One run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// `YYYYMMDD-HHMMSS-xxxx`.
    pub id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pipeline file.
    pub file: PathBuf,
    /// RFC 3339 start time.
    pub started: String,
    /// Start time in ns since the epoch (orders runs started in one second).
    #[serde(default)]
    pub started_ns: u128,
    /// Seconds the run took (so far).
    #[serde(default)]
    pub seconds: f64,
    /// `running`, `ok`, `failed`, `interrupted`.
    pub status: String,
    /// Pipeline params after overrides.
    pub params: Value,
    /// The `--set` overrides given.
    #[serde(default)]
    pub overrides: Vec<String>,
    /// Step instance → record.
    pub steps: BTreeMap<String, StepRecord>,
    /// Kept runs protect their outputs from `gc`.
    #[serde(default)]
    pub keep: bool,
}

impl RunRecord {
    /// Now, in ns since the epoch.
    pub fn now_ns() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    }

    /// A new id from the current time.
    pub fn new_id() -> String {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let compact: String = now.chars().filter(|c| c.is_ascii_digit()).collect();
        let suffix = &super::hash::hash_bytes(super::store::unique_name().as_bytes())[..4];
        format!("{}-{}-{suffix}", &compact[..8], &compact[8..14])
    }

    fn path(dir: &Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.json"))
    }

    /// Saves (atomically).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("serialises");
        super::store::write_atomic(&Self::path(dir, &self.id), &bytes)
    }

    /// All records, oldest first.
    pub fn list(dir: &Path) -> Vec<RunRecord> {
        let mut v: Vec<RunRecord> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| fs_err::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        v.sort_by(|a: &RunRecord, b| (a.started_ns, &a.id).cmp(&(b.started_ns, &b.id)));
        v
    }

    /// Finds a run by id, unique id prefix, `latest` or `latest~N`.
    pub fn find(dir: &Path, spec: &str) -> Result<RunRecord, String> {
        let all = Self::list(dir);
        if all.is_empty() {
            return Err("no runs recorded yet".into());
        }
        if let Some(rest) = spec.strip_prefix("latest") {
            let back: usize = match rest.strip_prefix('~') {
                Some(n) => n
                    .parse()
                    .map_err(|_| format!("`{spec}`: expected latest~N"))?,
                None if rest.is_empty() => 0,
                None => return Err(format!("`{spec}`: expected latest or latest~N")),
            };
            return all
                .len()
                .checked_sub(back + 1)
                .map(|i| all[i].clone())
                .ok_or_else(|| format!("`{spec}`: only {} runs recorded", all.len()));
        }
        let matches: Vec<&RunRecord> = all.iter().filter(|r| r.id.starts_with(spec)).collect();
        match matches.len() {
            1 => Ok(matches[0].clone()),
            0 => Err(format!("no run `{spec}` (see `tsdistill runs`)")),
            n => Err(format!("`{spec}` matches {n} runs; give more of the id")),
        }
    }
}
