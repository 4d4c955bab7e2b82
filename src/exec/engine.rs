//! Executing a pipeline: keys, cache lookups, leases, running steps (whole
//! or per item), committing outputs, the lock file and the run record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::report::Reporter;
use super::{CancelToken, Progress};
use crate::cache::{
    InputHash, KeyComponents, KeyEntry, LockEntry, LockFile, Manifest, RunRecord, StatCache,
    StepRecord, StepStatus, Store,
};
use crate::graph::StepGraph;
use crate::pipeline::{Pipeline, StepInstance};
use crate::steps::{InputArtifact, ItemContext, ItemSource, StepContext, StepOutput};

/// Options of `tsdistill run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Thread slots (`--jobs`); 0 means the number of cores.
    pub jobs: usize,
    /// Steps to recompute even when cached (`--force`; a base name forces all variants).
    pub force: Vec<String>,
    /// Run only this step and what it needs (`--step`).
    pub step: Option<String>,
    /// Print nothing.
    pub quiet: bool,
    /// Where to link outputs (`runs/`); `None` to skip.
    pub link_dir: Option<PathBuf>,
    /// The `--set` overrides as typed (recorded in the run record).
    pub overrides: Vec<String>,
}

/// What a run did.
#[derive(Debug)]
pub struct RunSummary {
    /// The run record (also saved in the cache).
    pub record: RunRecord,
}

impl RunSummary {
    /// Steps with the given status.
    pub fn with_status(&self, s: StepStatus) -> Vec<String> {
        self.record
            .steps
            .iter()
            .filter(|(_, r)| r.status == s)
            .map(|(n, _)| n.clone())
            .collect()
    }
    /// Whether every selected step succeeded.
    pub fn ok(&self) -> bool {
        self.record.status == "ok"
    }
}

/// A finished step's result.
#[derive(Debug, Clone)]
struct Done {
    output: String,
    status: StepStatus,
    key: String,
    components: KeyComponents,
    metrics: BTreeMap<String, f64>,
    items: Option<(usize, usize)>,
    seconds: f64,
}

/// Runs pipelines against a store.
pub struct Engine<'a> {
    /// The store.
    pub store: &'a Store,
    /// The pipeline.
    pub pipeline: &'a Pipeline,
    /// Its graph.
    pub graph: StepGraph,
    stat: StatCache,
    cancel: CancelToken,
}

impl<'a> Engine<'a> {
    /// Prepares to run `pipeline` on `store`.
    pub fn new(
        store: &'a Store,
        pipeline: &'a Pipeline,
        cancel: CancelToken,
    ) -> Result<Self, String> {
        let graph = StepGraph::build(pipeline).map_err(|e| e.to_string())?;
        let stat = StatCache::open(&store.root().join("stat-v1.json"));
        Ok(Engine {
            store,
            pipeline,
            graph,
            stat,
            cancel,
        })
    }

    /// Files a step reads from the workspace, hashed (stat cache).
    pub fn workspace_files(&self, step: &StepInstance) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        for pattern in step.kind.workspace_deps(&step.params) {
            let full = self.pipeline.workspace.join(&pattern);
            let is_glob = pattern.contains(['*', '?', '[']);
            if !is_glob {
                if !full.is_file() {
                    return Err(format!(
                        "step `{}`: file `{}` does not exist",
                        step.name,
                        full.display()
                    ));
                }
                out.insert(
                    pattern.clone(),
                    self.stat.hash(&full).map_err(|e| e.to_string())?,
                );
                continue;
            }
            let paths = glob::glob(&full.to_string_lossy())
                .map_err(|e| format!("step `{}`: bad glob `{pattern}`: {e}", step.name))?;
            for p in paths {
                let p = p.map_err(|e| e.to_string())?;
                if !p.is_file() {
                    continue;
                }
                let rel = p.strip_prefix(&self.pipeline.workspace).unwrap_or(&p);
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    self.stat.hash(&p).map_err(|e| e.to_string())?,
                );
            }
        }
        Ok(out)
    }

    /// Key components of a step, given its inputs' output hashes.
    pub fn components(
        &self,
        step: &StepInstance,
        outputs: &BTreeMap<String, String>,
    ) -> Result<KeyComponents, String> {
        let mut inputs = BTreeMap::new();
        for (slot, refs) in &step.inputs {
            let mut v = Vec::new();
            for r in refs {
                let hash = outputs
                    .get(&r.step)
                    .ok_or_else(|| format!("input `{}` has no output yet", r.step))?;
                let select = match &r.select {
                    None => None,
                    Some(src) => {
                        let h = outputs
                            .get(src)
                            .ok_or_else(|| format!("input `{src}` has no output yet"))?;
                        Some((src.clone(), h.clone()))
                    }
                };
                v.push(InputHash {
                    step: r.step.clone(),
                    group: r.group.clone(),
                    hash: hash.clone(),
                    select,
                });
            }
            inputs.insert(slot.clone(), v);
        }
        Ok(KeyComponents {
            kind: step.kind.name().to_string(),
            version: step.kind.version(),
            params: step.params.clone(),
            inputs,
            files: self.workspace_files(step)?,
        })
    }

    /// Resolves a step's inputs to artifacts (selecting groups).
    fn input_artifacts(
        &self,
        step: &StepInstance,
        outputs: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, Vec<InputArtifact>>, String> {
        let mut out = BTreeMap::new();
        for (slot, refs) in &step.inputs {
            let mut v = Vec::new();
            for r in refs {
                let hash = &outputs[&r.step];
                let manifest = self.store.manifest(hash).map_err(|e| e.to_string())?;
                // `prep@split.train`: the group comes from another step's output.
                let (group_source, group_step) = match &r.select {
                    None => (manifest.clone(), &r.step),
                    Some(src) => (
                        self.store
                            .manifest(&outputs[src])
                            .map_err(|e| e.to_string())?,
                        src,
                    ),
                };
                let ids: Vec<&String> = match &r.group {
                    None => manifest.items.keys().collect(),
                    Some(g) => group_source
                        .groups
                        .get(g)
                        .ok_or_else(|| {
                            let have: Vec<&str> =
                                group_source.groups.keys().map(String::as_str).collect();
                            format!(
                                "`{}`: step `{}` has no group `{g}` (its groups: {})",
                                r.text,
                                group_step,
                                if have.is_empty() {
                                    "none".to_string()
                                } else {
                                    have.join(", ")
                                }
                            )
                        })?
                        .iter()
                        .collect(),
                };
                let mut items = BTreeMap::new();
                for id in ids {
                    let item = manifest.items.get(id).ok_or_else(|| {
                        format!(
                            "`{}`: group lists case `{id}`, which `{}` does not hold",
                            r.text, r.step
                        )
                    })?;
                    items.insert(id.clone(), self.store.object_dir(item));
                }
                v.push(InputArtifact {
                    reference: r.text.clone(),
                    step: r.step.clone(),
                    dir: self.store.object_dir(hash),
                    manifest,
                    items,
                });
            }
            out.insert(slot.clone(), v);
        }
        Ok(out)
    }

    fn forced(&self, step: &StepInstance, opts: &RunOptions) -> bool {
        opts.force
            .iter()
            .any(|f| *f == step.name || *f == step.base)
    }

    /// Runs one step (cache lookup, lease, compute, commit).
    fn execute(
        &self,
        step: &StepInstance,
        outputs: &BTreeMap<String, String>,
        opts: &RunOptions,
        progress: &Progress,
    ) -> Result<Done, String> {
        let started = Instant::now();
        let components = self.components(step, outputs)?;
        let key = components.key();
        let force = self.forced(step, opts);
        let done = |output: String, status, metrics, items| Done {
            output,
            status,
            key: key.clone(),
            components: components.clone(),
            metrics,
            items,
            seconds: started.elapsed().as_secs_f64(),
        };
        if !force {
            if let Some(e) = self.store.get_key(&key) {
                return Ok(done(e.output, StepStatus::Cached, e.metrics, None));
            }
        }
        // One process computes a key; others wait here, then find it cached.
        let _lease = self.store.lease(&key).map_err(|e| e.to_string())?;
        if !force {
            if let Some(e) = self.store.get_key(&key) {
                return Ok(done(e.output, StepStatus::Cached, e.metrics, None));
            }
        }
        let inputs = self.input_artifacts(step, outputs)?;
        let (output, metrics, items) = match step.kind.map_over() {
            Some(slot) => {
                let (o, computed, total) =
                    self.run_map(step, slot, &components, &inputs, force, opts, progress)?;
                (o, BTreeMap::new(), Some((computed, total)))
            }
            None => {
                let (o, m) = self.run_whole(step, &key, &inputs, progress)?;
                (o, m, None)
            }
        };
        self.store
            .put_key(
                &key,
                &KeyEntry {
                    output: output.clone(),
                    step: step.name.clone(),
                    metrics: metrics.clone(),
                },
            )
            .map_err(|e| e.to_string())?;
        self.store.remove_work_dir(&key);
        Ok(done(output, StepStatus::Ran, metrics, items))
    }

    fn run_whole(
        &self,
        step: &StepInstance,
        key: &str,
        inputs: &BTreeMap<String, Vec<InputArtifact>>,
        progress: &Progress,
    ) -> Result<(String, BTreeMap<String, f64>), String> {
        let staging = self.store.staging().map_err(|e| e.to_string())?;
        let work = self.store.work_dir(key).map_err(|e| e.to_string())?;
        let ctx = StepContext {
            step: &step.name,
            params: &step.params,
            inputs,
            out_dir: staging.path(),
            work_dir: &work,
            workspace: &self.pipeline.workspace,
            progress,
            cancel: &self.cancel,
        };
        let out: StepOutput = step.kind.run(&ctx).map_err(|e| e.to_string())?;
        if self.cancel.is_cancelled() {
            return Err("interrupted".into());
        }
        let mut metrics = out.metrics.clone();
        let mpath = staging.path().join("metrics.json");
        if metrics.is_empty() && mpath.is_file() {
            metrics = read_metrics(&mpath)?;
        } else if !metrics.is_empty() {
            let bytes = serde_json::to_vec_pretty(&metrics).expect("serialises");
            fs_err::write(&mpath, bytes).map_err(|e| e.to_string())?;
        }
        let mut items = BTreeMap::new();
        for (case, src) in out.items {
            let hash = match src {
                ItemSource::Existing(h) => {
                    if !self.store.has_object(&h) {
                        return Err(format!(
                            "case `{case}`: item object {h} is not in the store"
                        ));
                    }
                    h
                }
                ItemSource::Files(files) => {
                    let item = self.store.staging().map_err(|e| e.to_string())?;
                    for (role, path) in files {
                        let dest = item.path().join(&role);
                        fs_err::copy(&path, &dest).map_err(|e| format!("case `{case}`: {e}"))?;
                    }
                    let m = Manifest {
                        kind: "item".into(),
                        ..Default::default()
                    };
                    self.store.commit(item, m).map_err(|e| e.to_string())?
                }
            };
            items.insert(case, hash);
        }
        for (g, ids) in &out.groups {
            if let Some(id) = ids.iter().find(|id| !items.contains_key(*id)) {
                return Err(format!(
                    "group `{g}` lists case `{id}`, which the output does not hold"
                ));
            }
        }
        let manifest = Manifest {
            kind: out.kind,
            files: Default::default(),
            items,
            groups: out.groups,
            meta: out.meta,
        };
        let hash = self
            .store
            .commit(staging, manifest)
            .map_err(|e| e.to_string())?;
        Ok((hash, metrics))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_map(
        &self,
        step: &StepInstance,
        slot: &str,
        components: &KeyComponents,
        inputs: &BTreeMap<String, Vec<InputArtifact>>,
        force: bool,
        opts: &RunOptions,
        progress: &Progress,
    ) -> Result<(String, usize, usize), String> {
        let mapped = match inputs.get(slot).map(Vec::as_slice) {
            Some([one]) => one,
            _ => return Err(format!("map input `{slot}` must be exactly one step")),
        };
        let others: BTreeMap<String, Vec<InputArtifact>> = inputs
            .iter()
            .filter(|(s, _)| s.as_str() != slot)
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect();
        let mut results: BTreeMap<String, String> = BTreeMap::new();
        let mut todo: Vec<(String, String, PathBuf)> = Vec::new();
        for (case, dir) in &mapped.items {
            let item_hash = mapped.manifest.items[case].clone();
            let ik = components.item_key(slot, &item_hash);
            match self.store.get_item(&ik) {
                Some(e) if !force => {
                    results.insert(case.clone(), e.output);
                }
                _ => todo.push((case.clone(), ik, dir.clone())),
            }
        }
        let total = mapped.items.len();
        progress.set_total(todo.len() as u64);
        let next = AtomicUsize::new(0);
        let done = Mutex::new(Vec::<(String, Result<String, String>)>::new());
        let workers = jobs(opts).min(todo.len()).max(1);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= todo.len() || self.cancel.is_cancelled() {
                        break;
                    }
                    let (case, ik, dir) = &todo[i];
                    let r = self.run_item(step, case, ik, dir, &others, force);
                    progress.inc(1);
                    done.lock().unwrap().push((case.clone(), r));
                });
            }
        });
        let mut errors = Vec::new();
        for (case, r) in done.into_inner().unwrap() {
            match r {
                Ok(h) => {
                    results.insert(case, h);
                }
                Err(e) => errors.push(format!("case `{case}`: {e}")),
            }
        }
        if self.cancel.is_cancelled() {
            return Err("interrupted".into());
        }
        if !errors.is_empty() {
            errors.sort();
            return Err(format!(
                "{} of {} cases failed:\n  {}",
                errors.len(),
                todo.len(),
                errors.join("\n  ")
            ));
        }
        // Groups carry through, restricted to the cases mapped.
        let groups = mapped
            .manifest
            .groups
            .iter()
            .map(|(g, ids)| {
                (
                    g.clone(),
                    ids.iter()
                        .filter(|i| results.contains_key(*i))
                        .cloned()
                        .collect(),
                )
            })
            .collect();
        let m = Manifest {
            kind: step.kind.output_kind().to_string(),
            items: results,
            groups,
            ..Default::default()
        };
        let hash = self.store.commit_manifest(m).map_err(|e| e.to_string())?;
        Ok((hash, todo.len(), total))
    }

    fn run_item(
        &self,
        step: &StepInstance,
        case: &str,
        ik: &str,
        dir: &Path,
        others: &BTreeMap<String, Vec<InputArtifact>>,
        force: bool,
    ) -> Result<String, String> {
        let _lease = self.store.lease(ik).map_err(|e| e.to_string())?;
        if !force {
            if let Some(e) = self.store.get_item(ik) {
                return Ok(e.output);
            }
        }
        let staging = self.store.staging().map_err(|e| e.to_string())?;
        let ctx = ItemContext {
            step: &step.name,
            case,
            item_dir: dir,
            params: &step.params,
            inputs: others,
            out_dir: staging.path(),
            workspace: &self.pipeline.workspace,
            cancel: &self.cancel,
        };
        step.kind.run_item(&ctx).map_err(|e| e.to_string())?;
        if self.cancel.is_cancelled() {
            return Err("interrupted".into());
        }
        let hash = self
            .store
            .commit(
                staging,
                Manifest {
                    kind: "item".into(),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
        self.store
            .put_item(
                ik,
                &KeyEntry {
                    output: hash.clone(),
                    step: step.name.clone(),
                    metrics: Default::default(),
                },
            )
            .map_err(|e| e.to_string())?;
        Ok(hash)
    }

    /// Runs the pipeline (or `--step` and what it needs) with the parallel
    /// scheduler. Failures skip dependents; independent steps finish.
    pub fn run(&self, opts: &RunOptions) -> Result<RunSummary, String> {
        let p = self.pipeline;
        let _gc = self
            .store
            .gc_lock(crate::cache::lock::LockMode::Shared)
            .map_err(|e| e.to_string())?;
        self.store
            .add_root(&p.lock_path())
            .map_err(|e| e.to_string())?;
        let reporter = Reporter::new(opts.quiet);
        for f in &opts.force {
            if !p.steps.iter().any(|s| s.name == *f || s.base == *f) {
                return Err(format!("--force {f}: no such step"));
            }
        }
        let selected: Vec<bool> = match &opts.step {
            None => vec![true; p.steps.len()],
            Some(name) => {
                let idx: Vec<usize> = p
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.name == *name || s.base == *name)
                    .map(|(i, _)| i)
                    .collect();
                if idx.is_empty() {
                    let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
                    let hint = crate::pipeline::did_you_mean(name, names)
                        .map(|h| format!("; {h}"))
                        .unwrap_or_default();
                    return Err(format!("--step {name}: no such step{hint}"));
                }
                let mut sel = vec![false; p.steps.len()];
                for i in idx {
                    for a in self.graph.ancestors_with(i) {
                        sel[a] = true;
                    }
                }
                sel
            }
        };
        let started = Instant::now();
        let runs_dir = self.store.root().join("runs-v1");
        let mut record = RunRecord {
            id: RunRecord::new_id(),
            pipeline: p.name.clone(),
            file: std::path::absolute(&p.file).unwrap_or(p.file.clone()),
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            started_ns: RunRecord::now_ns(),
            seconds: 0.0,
            status: "running".into(),
            params: p.params.clone(),
            overrides: opts.overrides.clone(),
            steps: p
                .steps
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        StepRecord {
                            status: StepStatus::NotRun,
                            kind: s.kind.name().into(),
                            key: None,
                            output: None,
                            params: s.params.clone(),
                            seconds: 0.0,
                            items: None,
                            metrics: Default::default(),
                            error: None,
                        },
                    )
                })
                .collect(),
            keep: false,
        };
        record.save(&runs_dir).map_err(|e| e.to_string())?;

        #[derive(Clone, PartialEq)]
        enum State {
            Waiting,
            Running,
            Finished,
            Failed,
            Skipped,
        }
        let n = p.steps.len();
        let mut state = vec![State::Waiting; n];
        for i in 0..n {
            if !selected[i] {
                state[i] = State::Skipped;
            }
        }
        let total_slots = jobs(opts);
        let mut free_slots = total_slots;
        let mut gpu_free = true;
        let mut outputs: BTreeMap<String, String> = BTreeMap::new();
        let (tx, rx) = mpsc::channel::<(usize, Result<Done, String>, Progress)>();
        let mut claims: BTreeMap<usize, (usize, bool)> = BTreeMap::new();
        let lock_path = p.lock_path();
        std::thread::scope(|s| -> Result<(), String> {
            loop {
                // Launch every ready step that fits.
                if !self.cancel.is_cancelled() {
                    for &i in self.graph.order() {
                        if state[i] != State::Waiting {
                            continue;
                        }
                        let ready = self
                            .graph
                            .inputs_of(i)
                            .iter()
                            .all(|&j| state[j] == State::Finished);
                        if !ready {
                            continue;
                        }
                        let step = &p.steps[i];
                        let res = step.kind.resources(&step.params);
                        let want = if step.kind.map_over().is_some() {
                            total_slots
                        } else {
                            res.threads.clamp(1, total_slots)
                        };
                        if want > free_slots || (res.gpu && !gpu_free) {
                            continue;
                        }
                        free_slots -= want;
                        if res.gpu {
                            gpu_free = false;
                        }
                        claims.insert(i, (want, res.gpu));
                        state[i] = State::Running;
                        let tx = tx.clone();
                        let outs = outputs.clone();
                        let bar = reporter.bar(&step.name);
                        s.spawn(move || {
                            let r = self.execute(step, &outs, opts, &bar);
                            let _ = tx.send((i, r, bar));
                        });
                    }
                }
                if !state.contains(&State::Running) {
                    break;
                }
                let (i, result, bar) = match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(e) => return Err(e.to_string()),
                };
                reporter.finish(&bar);
                let (want, gpu) = claims.remove(&i).expect("claimed at launch");
                free_slots += want;
                if gpu {
                    gpu_free = true;
                }
                let step = &p.steps[i];
                let rec = record
                    .steps
                    .get_mut(&step.name)
                    .expect("every step has a record");
                match result {
                    Ok(d) => {
                        state[i] = State::Finished;
                        outputs.insert(step.name.clone(), d.output.clone());
                        let verb = if d.status == StepStatus::Cached {
                            "Fresh"
                        } else {
                            "Finished"
                        };
                        let items = match d.items {
                            Some((c, t)) => format!(", {c} of {t} cases computed"),
                            None => String::new(),
                        };
                        let time = if d.status == StepStatus::Ran {
                            format!(" in {:.2}s", d.seconds)
                        } else {
                            String::new()
                        };
                        reporter.line(
                            verb,
                            &format!("{} ({}){time}{items}", step.name, step.kind.name()),
                        );
                        LockFile::update(
                            &lock_path,
                            &step.name,
                            LockEntry {
                                key: d.key.clone(),
                                components: d.components.clone(),
                                output: d.output.clone(),
                                metrics: d.metrics.clone(),
                            },
                        )?;
                        if let Some(dir) = &opts.link_dir {
                            if let Err(e) = super::links::link_output(
                                self.store,
                                &dir.join(&p.name),
                                &step.name,
                                &d.output,
                            ) {
                                reporter.line(
                                    "Warning",
                                    &format!("could not link output of {}: {e}", step.name),
                                );
                            }
                        }
                        rec.status = d.status;
                        rec.key = Some(d.key);
                        rec.output = Some(d.output);
                        rec.seconds = d.seconds;
                        rec.items = d.items;
                        rec.metrics = d.metrics;
                    }
                    Err(e) => {
                        state[i] = State::Failed;
                        reporter.line(
                            "Failed",
                            &format!("{} ({}): {e}", step.name, step.kind.name()),
                        );
                        rec.status = StepStatus::Failed;
                        rec.error = Some(e);
                        // Skip everything downstream.
                        let mut stack = self.graph.dependents_of(i);
                        while let Some(j) = stack.pop() {
                            if state[j] == State::Waiting {
                                state[j] = State::Skipped;
                                let r = record.steps.get_mut(&p.steps[j].name).expect("record");
                                r.status = StepStatus::Skipped;
                                r.error = Some(format!("input `{}` failed", step.name));
                                stack.extend(self.graph.dependents_of(j));
                            }
                        }
                    }
                }
                record.seconds = started.elapsed().as_secs_f64();
                record.save(&runs_dir).map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        let _ = self.stat.save();
        let failed: Vec<String> = record
            .steps
            .iter()
            .filter(|(_, r)| r.status == StepStatus::Failed)
            .map(|(n, _)| n.clone())
            .collect();
        record.status = if self.cancel.is_cancelled() {
            "interrupted".into()
        } else if failed.is_empty() {
            "ok".into()
        } else {
            "failed".into()
        };
        if opts.step.is_none() && record.status == "ok" {
            LockFile::retain(&lock_path, &|name| p.step(name).is_some())?;
        }
        record.seconds = started.elapsed().as_secs_f64();
        record.save(&runs_dir).map_err(|e| e.to_string())?;
        Ok(RunSummary { record })
    }
}

/// Thread slots for `--jobs` (0 = all cores).
pub fn jobs(opts: &RunOptions) -> usize {
    if opts.jobs == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        opts.jobs
    }
}

/// Reads a flat `metrics.json` of numbers (nested objects are flattened
/// with dots; non-numbers are ignored).
pub fn read_metrics(path: &Path) -> Result<BTreeMap<String, f64>, String> {
    let bytes = fs_err::read(path).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("`{}`: not JSON: {e}", path.display()))?;
    Ok(crate::cache::key::flatten(&v)
        .into_iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
        .collect())
}
