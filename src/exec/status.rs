//! `status`: which steps would run and exactly why, computed without running
//! anything, by diffing each step's key components against the lock file.

use std::collections::BTreeMap;

use super::engine::{Engine, RunOptions};
use crate::cache::key::{flatten, show_value};
use crate::cache::{KeyComponents, LockFile, Store};

/// One step's state.
#[derive(Debug, Clone, PartialEq)]
pub enum StepState {
    /// Cached: would not run.
    Fresh,
    /// Would run, with the reasons.
    Stale(Vec<String>),
}

/// A step's line in `status`.
#[derive(Debug, Clone)]
pub struct StepStatusLine {
    /// Instance name.
    pub step: String,
    /// Kind.
    pub kind: String,
    /// Fresh or stale with reasons.
    pub state: StepState,
    /// For map steps whose input is known: (cases to compute, total).
    pub items: Option<(usize, usize)>,
}

impl Engine<'_> {
    /// Explains, for every step in order, whether it would run and why.
    pub fn status(&self, opts: &RunOptions) -> Result<Vec<StepStatusLine>, String> {
        let p = self.pipeline;
        let lock = LockFile::load(&p.lock_path())?;
        let mut known: BTreeMap<String, String> = BTreeMap::new();
        let mut lines = Vec::new();
        for &i in self.graph.order() {
            let step = &p.steps[i];
            let mut reasons = Vec::new();
            let unknown: Vec<&str> = step
                .inputs
                .values()
                .flatten()
                .flat_map(|r| r.steps())
                .filter(|s| !known.contains_key(*s))
                .map(|s| s.as_str())
                .collect();
            let forced = opts
                .force
                .iter()
                .any(|f| *f == step.name || *f == step.base);
            if forced {
                reasons.push("forced (--force)".to_string());
            }
            let old = lock.steps.get(&step.name);
            let mut items = None;
            if unknown.is_empty() {
                let comps = self.components(step, &known)?;
                let key = comps.key();
                match old {
                    None => reasons.push("never run".into()),
                    Some(o) if o.key != key => {
                        reasons.extend(explain(self.store, &o.components, &comps))
                    }
                    Some(_) => {}
                }
                match self.store.get_key(&key) {
                    Some(e) => {
                        if !forced && !reasons.is_empty() {
                            // Changed since the lock, but this exact key is cached.
                            reasons.clear();
                        }
                        known.insert(step.name.clone(), e.output);
                    }
                    None => {
                        if reasons.is_empty() {
                            reasons.push("output missing from the cache (removed by gc, or quarantined by verify)".into());
                        }
                        if let Some(slot) = step.kind.map_over() {
                            items = self.missing_items(step, slot, &comps, &known, forced);
                        }
                    }
                }
            } else {
                let mut u = unknown.clone();
                u.sort();
                u.dedup();
                for up in u {
                    reasons.push(format!("input `{up}` will be recomputed"));
                }
                if old.is_none() {
                    reasons.push("never run".into());
                } else if let Some(o) = old {
                    // Params and version can still be compared.
                    let now = KeyComponents {
                        inputs: o.components.inputs.clone(),
                        files: o.components.files.clone(),
                        ..self.components_without_inputs(step)?
                    };
                    reasons.extend(explain(self.store, &o.components, &now));
                }
            }
            let state = if reasons.is_empty() {
                StepState::Fresh
            } else {
                StepState::Stale(reasons)
            };
            lines.push(StepStatusLine {
                step: step.name.clone(),
                kind: step.kind.name().into(),
                state,
                items,
            });
        }
        Ok(lines)
    }

    fn components_without_inputs(
        &self,
        step: &crate::pipeline::StepInstance,
    ) -> Result<KeyComponents, String> {
        Ok(KeyComponents {
            kind: step.kind.name().to_string(),
            version: step.kind.version(),
            params: step.params.clone(),
            inputs: Default::default(),
            files: self.workspace_files(step)?,
        })
    }

    fn missing_items(
        &self,
        step: &crate::pipeline::StepInstance,
        slot: &str,
        comps: &KeyComponents,
        known: &BTreeMap<String, String>,
        forced: bool,
    ) -> Option<(usize, usize)> {
        let r = step.inputs.get(slot)?.first()?;
        let m = self.store.manifest(known.get(&r.step)?).ok()?;
        let source = match &r.select {
            Some(src) => self.store.manifest(known.get(src)?).ok()?,
            None => m.clone(),
        };
        let ids: Vec<&String> = match &r.group {
            Some(g) => source
                .groups
                .get(g)?
                .iter()
                .filter(|id| m.items.contains_key(*id))
                .collect(),
            None => m.items.keys().collect(),
        };
        let missing = ids
            .iter()
            .filter(|id| {
                forced
                    || self
                        .store
                        .get_item(&comps.item_key(slot, &m.items[**id]))
                        .is_none()
            })
            .count();
        Some((missing, ids.len()))
    }
}

/// Why `new` differs from `old`, one reason per change, in words.
pub fn explain(store: &Store, old: &KeyComponents, new: &KeyComponents) -> Vec<String> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(format!("kind changed {} → {}", old.kind, new.kind));
    }
    if old.version != new.version {
        out.push(format!(
            "step version bumped {} → {}",
            old.version, new.version
        ));
    }
    let (po, pn) = (flatten(&old.params), flatten(&new.params));
    for (k, v) in &pn {
        match po.get(k) {
            Some(o) if o != v => {
                out.push(format!("param {k} {} → {}", show_value(o), show_value(v)))
            }
            None => out.push(format!("param {k} added ({})", show_value(v))),
            _ => {}
        }
    }
    for (k, o) in &po {
        if !pn.contains_key(k) {
            out.push(format!("param {k} removed (was {})", show_value(o)));
        }
    }
    for (f, h) in &new.files {
        match old.files.get(f) {
            Some(o) if o != h => out.push(format!("input file {f} changed")),
            None => out.push(format!("input file {f} added")),
            _ => {}
        }
    }
    for f in old.files.keys().filter(|f| !new.files.contains_key(*f)) {
        out.push(format!("input file {f} removed"));
    }
    for (slot, ins) in &new.inputs {
        let olds = old.inputs.get(slot).cloned().unwrap_or_default();
        for (i, inp) in ins.iter().enumerate() {
            let before = olds.iter().find(|o| o.step == inp.step).or(olds.get(i));
            match before {
                Some(b) if b.hash == inp.hash && b.group == inp.group => {}
                Some(b) => out.push(describe_input_change(store, &inp.step, &b.hash, &inp.hash)),
                None => out.push(format!("input `{}` added", inp.step)),
            }
        }
        if olds.len() > ins.len() {
            out.push(format!(
                "input `{slot}` has fewer references ({} → {})",
                olds.len(),
                ins.len()
            ));
        }
    }
    out
}

/// `input `ct`: case img0007 changed, case img0017 added` when both
/// collections are still in the store; else `input `ct` changed`.
fn describe_input_change(store: &Store, step: &str, old: &str, new: &str) -> String {
    let (Ok(a), Ok(b)) = (store.manifest(old), store.manifest(new)) else {
        return format!("input `{step}` changed");
    };
    if a.items.is_empty() && b.items.is_empty() {
        return format!("input `{step}` changed");
    }
    let mut parts = Vec::new();
    for (case, h) in &b.items {
        match a.items.get(case) {
            Some(o) if o != h => parts.push(format!("case {case} changed")),
            None => parts.push(format!("case {case} added")),
            _ => {}
        }
    }
    for case in a.items.keys().filter(|c| !b.items.contains_key(*c)) {
        parts.push(format!("case {case} removed"));
    }
    if parts.is_empty() {
        parts.push("groups changed".into());
    }
    const MAX: usize = 6;
    let more = parts.len().saturating_sub(MAX);
    parts.truncate(MAX);
    let tail = if more > 0 {
        format!(" (and {more} more)")
    } else {
        String::new()
    };
    format!("input `{step}`: {}{tail}", parts.join(", "))
}
