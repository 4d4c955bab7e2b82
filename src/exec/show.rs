//! `show STEP`: a step's key components, key, output path and files.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::Engine;
use crate::cache::LockFile;

impl Engine<'_> {
    /// Renders what is known about a step: its key components as they are now
    /// (when its inputs are cached) and its last recorded output.
    pub fn show(&self, name: &str) -> Result<String, String> {
        let p = self.pipeline;
        let step = p.step(name).ok_or_else(|| {
            let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
            let hint = crate::pipeline::did_you_mean(name, names)
                .map(|h| format!("; {h}"))
                .unwrap_or_default();
            format!("no step `{name}` in `{}`{hint}", p.file.display())
        })?;
        let lock = LockFile::load(&p.lock_path())?;
        // Outputs of upstream steps as last recorded, if still present.
        let known: BTreeMap<String, String> = lock
            .steps
            .iter()
            .filter(|(_, e)| self.store.has_object(&e.output))
            .map(|(n, e)| (n.clone(), e.output.clone()))
            .collect();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "step      {} ({} v{})",
            step.name,
            step.kind.name(),
            step.kind.version()
        );
        let _ = writeln!(out, "declared  {}", step.location);
        let _ = writeln!(
            out,
            "params    {}",
            crate::cache::hash::canonical_json(&step.params)
        );
        match self.components(step, &known) {
            Ok(c) => {
                for (slot, ins) in &c.inputs {
                    for i in ins {
                        let g = i
                            .group
                            .as_ref()
                            .map(|g| format!(".{g}"))
                            .unwrap_or_default();
                        let _ = writeln!(out, "input     {slot}: {}{g} = {}", i.step, i.hash);
                    }
                }
                for (f, h) in &c.files {
                    let _ = writeln!(out, "file      {f} = {h}");
                }
                let key = c.key();
                let _ = writeln!(out, "key       {key}");
                match self.store.get_key(&key) {
                    Some(e) => {
                        let dir = self.store.object_dir(&e.output);
                        let _ = writeln!(out, "output    {}", dir.display());
                        if let Ok(m) = self.store.manifest(&e.output) {
                            let _ = writeln!(out, "type      {}", m.kind);
                            for (f, h) in &m.files {
                                let _ = writeln!(out, "  {f}  {}", &h[..16]);
                            }
                            if !m.items.is_empty() {
                                let _ = writeln!(out, "cases     {}", m.items.len());
                                for (c, h) in &m.items {
                                    let _ = writeln!(
                                        out,
                                        "  {c}  {}",
                                        self.store.object_dir(h).display()
                                    );
                                }
                            }
                            for (g, ids) in &m.groups {
                                let _ = writeln!(out, "group     {g}: {}", ids.join(", "));
                            }
                        }
                        for (k, v) in &e.metrics {
                            let _ = writeln!(out, "metric    {k} = {v}");
                        }
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "output    (not computed for this key; `tsdistill status` says why)"
                        );
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(out, "key       unknown: {e}");
            }
        }
        Ok(out)
    }
}
