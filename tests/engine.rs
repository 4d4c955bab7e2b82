//! Engine integration tests: caching, early cutoff, per-item maps, kills,
//! concurrency, corruption, YAML errors, status and compare.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tsdistill::cache::{RunRecord, StepStatus, Store};
use tsdistill::exec::{CancelToken, Engine, RunOptions, RunSummary};
use tsdistill::pipeline::{self, Override};

/// A scratch workspace with its own cache.
struct Dir {
    root: PathBuf,
}

impl Dir {
    fn new(name: &str) -> Dir {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("data")).unwrap();
        Dir { root }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    fn cases(&self, n: usize) {
        for i in 1..=n {
            self.write(&format!("data/case{i:02}.txt"), &format!("scan {i}\n"));
        }
    }
    fn cache(&self) -> PathBuf {
        self.path("cache")
    }
    /// Lines appended to `count` by the commands (one per computation).
    fn count(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("count"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
    fn run(&self, file: &str, set: &[&str]) -> RunSummary {
        self.run_opts(
            file,
            set,
            RunOptions {
                quiet: true,
                jobs: 2,
                ..Default::default()
            },
        )
    }
    fn run_opts(&self, file: &str, set: &[&str], mut opts: RunOptions) -> RunSummary {
        opts.overrides = set.iter().map(|s| s.to_string()).collect();
        let overrides: Vec<Override> = set.iter().map(|s| s.parse().unwrap()).collect();
        let p = pipeline::load(&self.path(file), &overrides).unwrap();
        let store = Store::open(&self.cache()).unwrap();
        let e = Engine::new(&store, &p, CancelToken::default()).unwrap();
        e.run(&opts).unwrap()
    }
    fn bin(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
    /// The binary with `args`, on this workspace's cache, not yet started.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tsdistill"));
        c.args(args)
            .arg("--cache")
            .arg(self.cache())
            .current_dir(&self.root);
        c
    }
}

fn ran(s: &RunSummary) -> Vec<String> {
    s.with_status(StepStatus::Ran)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// ct → double (per case) → total; ct → other (independent of `factor`).
const CHAIN: &str = r#"
name: chain
params:
  factor: 2
  tag: a
steps:
  ct:
    kind: dataset
    images: data/*.txt
  double:
    kind: case-command
    input: ct
    params: {factor: "${params.factor}"}
    run: |
      for i in $(seq $TSD_PARAM_FACTOR); do cat $TSD_CASE_DIR/image.txt; done > $TSD_OUT/image.txt
      echo "double $TSD_CASE" >> ../count
  total:
    kind: command
    inputs: double
    run: |
      cat $TSD_INPUT/../*/image.txt 2>/dev/null | wc -l > /dev/null
      echo total >> count
      echo '{"lines": '$(ls $TSD_INPUT | wc -l)', "factor": '${params.factor}'}' > $TSD_OUT/metrics.json
  other:
    kind: command
    inputs: ct
    params: {tag: "${params.tag}"}
    run: echo other >> count; echo "$TSD_PARAM_TAG" > $TSD_OUT/tag.txt
"#;

#[test]
fn changing_one_param_reruns_exactly_its_dependents() {
    let d = Dir::new("param");
    d.cases(3);
    d.write("p.yaml", &CHAIN.replace("../count", "$TSD_WORKSPACE/count"));
    let first = d.run("p.yaml", &[]);
    assert!(first.ok());
    assert_eq!(ran(&first), ["ct", "double", "other", "total"]);
    let again = d.run("p.yaml", &[]);
    assert_eq!(
        ran(&again),
        Vec::<String>::new(),
        "nothing changed, nothing runs"
    );
    let changed = d.run("p.yaml", &["params.factor=3"]);
    assert_eq!(ran(&changed), ["double", "total"]);
    assert_eq!(changed.with_status(StepStatus::Cached), ["ct", "other"]);
    let tag = d.run("p.yaml", &["params.factor=3", "params.tag=b"]);
    assert_eq!(ran(&tag), ["other"]);
}

#[test]
fn adding_one_case_maps_exactly_one_item() {
    let d = Dir::new("addcase");
    d.cases(4);
    d.write("p.yaml", &CHAIN.replace("../count", "$TSD_WORKSPACE/count"));
    let first = d.run("p.yaml", &[]);
    assert_eq!(first.record.steps["double"].items, Some((4, 4)));
    d.write("data/case05.txt", "scan 5\n");
    let second = d.run("p.yaml", &[]);
    assert_eq!(second.record.steps["double"].items, Some((1, 5)));
    let doubles: Vec<String> = d
        .count()
        .into_iter()
        .filter(|l| l.starts_with("double"))
        .collect();
    assert_eq!(doubles.len(), 5, "{doubles:?}");
    assert_eq!(doubles.last().unwrap(), "double case05");
    // `status` names the added file and, after the run, is clean.
    let st = d.bin(&["status", "p.yaml"]);
    assert!(
        text(&st).contains("0 of 4 steps would run"),
        "{}",
        text(&st)
    );
}

#[test]
fn identical_output_does_not_invalidate_dependents() {
    // `norm` ignores its `note` param: a new note re-runs it, same bytes out.
    let d = Dir::new("cutoff");
    d.write(
        "p.yaml",
        r#"
name: cutoff
params: {note: one}
steps:
  norm:
    kind: command
    params: {note: "${params.note}"}
    run: echo norm >> count; echo constant > $TSD_OUT/x.txt
  after:
    kind: command
    inputs: norm
    run: echo after >> count; cat $TSD_INPUT/x.txt > $TSD_OUT/y.txt
"#,
    );
    d.run("p.yaml", &[]);
    let s = d.run("p.yaml", &["params.note=two"]);
    assert_eq!(ran(&s), ["norm"]);
    assert_eq!(s.with_status(StepStatus::Cached), ["after"]);
    assert_eq!(d.count(), ["norm", "after", "norm"]);
    // --force re-runs a step; its identical output still cuts off.
    let f = d.run_opts(
        "p.yaml",
        &["params.note=two"],
        RunOptions {
            quiet: true,
            force: vec!["norm".into()],
            ..Default::default()
        },
    );
    assert_eq!(ran(&f), ["norm"]);
}

#[test]
fn sigkill_mid_step_leaves_a_clean_cache_and_resumes() {
    let pipeline = r#"
name: slow
steps:
  ct: {kind: dataset, images: "data/*.txt"}
  slow:
    kind: case-command
    input: ct
    run: sleep 0.4; tr a-z A-Z < $TSD_CASE_DIR/image.txt > $TSD_OUT/image.txt; echo $TSD_CASE >> $TSD_WORKSPACE/count
  sum:
    kind: command
    inputs: slow
    run: sleep 0.3; for f in $TSD_INPUT/../*/image.txt; do :; done; echo done > $TSD_OUT/sum.txt
"#;
    // Reference: an uninterrupted run in its own workspace.
    let reference = Dir::new("kill-ref");
    reference.cases(6);
    reference.write("p.yaml", pipeline);
    let want = reference.run_opts(
        "p.yaml",
        &[],
        RunOptions {
            quiet: true,
            jobs: 1,
            ..Default::default()
        },
    );
    let want_out = want.record.steps["slow"].output.clone().unwrap();

    let d = Dir::new("kill");
    d.cases(6);
    d.write("p.yaml", pipeline);
    let mut child = d
        .command(&["run", "p.yaml", "-j", "1", "--quiet"])
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while d.count().len() < 2 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mid-item: the third case is sleeping.
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done_before = d.count().len();
    assert!(
        (2..6).contains(&done_before),
        "killed after {done_before} cases"
    );

    let v = d.bin(&["verify"]);
    assert!(v.status.success(), "{}", text(&v));
    assert!(text(&v).contains(" 0 corrupt"), "{}", text(&v));

    let s = d.run_opts(
        "p.yaml",
        &[],
        RunOptions {
            quiet: true,
            jobs: 1,
            ..Default::default()
        },
    );
    assert!(s.ok());
    assert_eq!(
        s.record.steps["slow"].items,
        Some((6 - done_before, 6)),
        "only unfinished cases rerun"
    );
    assert_eq!(
        s.record.steps["slow"].output.as_ref(),
        Some(&want_out),
        "same result as uninterrupted"
    );
    assert_eq!(
        s.record.steps["sum"].output,
        want.record.steps["sum"].output
    );
    let mut cases = d.count();
    cases.sort();
    cases.dedup();
    assert_eq!(cases.len(), 6);
    assert_eq!(d.count().len(), 6, "no case computed twice");
}

#[test]
fn two_concurrent_runs_compute_every_key_once() {
    let d = Dir::new("concurrent");
    d.cases(5);
    d.write(
        "p.yaml",
        r#"
name: conc
steps:
  ct: {kind: dataset, images: "data/*.txt"}
  work:
    kind: case-command
    input: ct
    run: sleep 0.2; echo "item $TSD_CASE" >> $TSD_WORKSPACE/count; cp $TSD_CASE_DIR/image.txt $TSD_OUT/
  sum:
    kind: command
    inputs: work
    run: sleep 0.2; echo sum >> count; ls $TSD_INPUT > /dev/null; echo 1 > $TSD_OUT/s.txt
"#,
    );
    let spawn = || {
        d.command(&["run", "p.yaml", "-j", "2", "--quiet"])
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in d.count() {
        *counts.entry(l).or_default() += 1;
    }
    assert_eq!(counts.len(), 6, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "a key was computed twice: {counts:?}"
    );
    let v = d.bin(&["verify"]);
    assert!(v.status.success(), "{}", text(&v));
}

#[test]
fn corrupt_object_is_found_by_verify_and_recomputed() {
    let d = Dir::new("corrupt");
    d.cases(3);
    d.write("p.yaml", &CHAIN.replace("../count", "$TSD_WORKSPACE/count"));
    let first = d.run("p.yaml", &[]);
    let store = Store::open(&d.cache()).unwrap();
    let double = store
        .manifest(first.record.steps["double"].output.as_ref().unwrap())
        .unwrap();
    let item = store.object_dir(&double.items["case02"]).join("image.txt");
    let mut bytes = std::fs::read(&item).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&item, bytes).unwrap();

    let v = d.bin(&["verify"]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    let out = text(&v);
    assert!(out.contains("file `image.txt` has changed"), "{out}");
    assert!(
        out.contains("2 corrupt"),
        "the item and the collection holding it: {out}"
    );
    let again = d.run("p.yaml", &[]);
    assert!(again.ok());
    assert_eq!(
        again.record.steps["double"].items,
        Some((1, 3)),
        "only the corrupt case recomputed"
    );
    assert_eq!(
        again.record.steps["double"].output,
        first.record.steps["double"].output
    );
    assert!(d.bin(&["verify"]).status.success());
}

/// Loads pipeline text and returns the error message.
fn load_err(d: &Dir, yaml: &str) -> String {
    d.write("bad.yaml", yaml);
    let e = pipeline::load(&d.path("bad.yaml"), &[])
        .unwrap_err()
        .to_string();
    let prefix = format!("{}:", d.path("bad.yaml").display());
    e.strip_prefix(&prefix)
        .map(|s| format!("bad.yaml:{s}"))
        .unwrap_or(e)
}

#[test]
fn yaml_errors_name_file_line_and_column() {
    let d = Dir::new("yaml");
    let e = load_err(&d, "name: x\nsteps:\n  a: {kind: command, run: [unclosed\n");
    assert!(e.starts_with("bad.yaml:4:1: YAML syntax error"), "{e}");
    let e = load_err(&d, "name: x\nstepz:\n  a: {kind: command, run: ls}\n");
    assert!(
        e.starts_with("bad.yaml:2:1: unknown top-level key `stepz`"),
        "{e}"
    );
    assert!(e.contains("hint: did you mean `steps`?"), "{e}");
    let e = load_err(&d, "steps:\n  a:\n    kind: comand\n    run: ls\n");
    assert!(
        e.starts_with("bad.yaml:3:11: unknown step kind `comand`"),
        "{e}"
    );
    assert!(e.contains("did you mean `command`?"), "{e}");
    let e = load_err(
        &d,
        "steps:\n  a:\n    kind: command\n    inputs: [b]\n    run: ls\n",
    );
    assert!(
        e.starts_with("bad.yaml:4:13: step `a` refers to `b`, which is not a step"),
        "{e}"
    );
    let e = load_err(
        &d,
        "steps:\n  a: {kind: command, inputs: c, run: ls}\n  b: {kind: command, inputs: a, run: ls}\n  c: {kind: command, inputs: b, run: ls}\n",
    );
    assert!(
        e.starts_with("bad.yaml:2:3: the steps form a cycle: a → b → c → a"),
        "{e}"
    );
    let e = load_err(
        &d,
        "steps:\n  a:\n    kind: command\n    run: ls\n    threads: many\n",
    );
    assert!(
        e.starts_with(
            "bad.yaml:5:14: step `a` (kind `command`): `threads`: invalid type: string \"many\""
        ),
        "{e}"
    );
    let e = load_err(&d, "steps:\n  a:\n    kind: command\n    runn: ls\n");
    assert!(
        e.starts_with("bad.yaml:4:5: step `a` (kind `command`): unknown field `runn`"),
        "{e}"
    );
    assert!(e.contains("did you mean `run`?"), "{e}");
    let e = load_err(
        &d,
        "params: {lr: 1}\nsteps:\n  a: {kind: command, run: \"${params.lrr}\"}\n",
    );
    assert!(e.starts_with("bad.yaml:3:27:"), "{e}");
    assert!(e.contains("did you mean `lr`"), "{e}");
    // The binary exits non-zero with the same message.
    let o = d.bin(&["run", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("bad.yaml:3:27:"), "{}", text(&o));
}

#[test]
fn foreach_and_matrix_expand_with_variant_references() {
    let d = Dir::new("expand");
    d.write(
        "p.yaml",
        r#"
params: {base: 1}
steps:
  src: {kind: command, run: "echo s > $TSD_OUT/s"}
  alt: {kind: command, run: "echo a > $TSD_OUT/a"}
  student:
    foreach:
      real: {inputs: src}
      weak: {inputs: alt}
    kind: command
    run: echo ${variant} > $TSD_OUT/v
  eval:
    foreach: student
    kind: command
    inputs: student
    run: cat $TSD_INPUT/v > $TSD_OUT/e
  sweep:
    matrix: {lr: [0.1, 0.2], seed: [1, 2]}
    kind: command
    params: {lr: "${matrix.lr}", seed: "${matrix.seed}"}
    run: |
      echo '{"lr": '$TSD_PARAM_LR'}' > $TSD_OUT/metrics.json
  report: {kind: command, inputs: [eval, sweep], run: "ls > /dev/null"}
"#,
    );
    let p = pipeline::load(&d.path("p.yaml"), &[]).unwrap();
    let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "src",
            "alt",
            "student@real",
            "student@weak",
            "eval@real",
            "eval@weak",
            "sweep@lr=0.1,seed=1",
            "sweep@lr=0.1,seed=2",
            "sweep@lr=0.2,seed=1",
            "sweep@lr=0.2,seed=2",
            "report"
        ]
    );
    let eval_weak = p.step("eval@weak").unwrap();
    assert_eq!(eval_weak.inputs["inputs"][0].step, "student@weak");
    assert_eq!(
        p.step("student@real").unwrap().inputs["inputs"][0].step,
        "src"
    );
    assert_eq!(p.step("report").unwrap().inputs["inputs"].len(), 6);
    assert_eq!(
        p.step("sweep@lr=0.2,seed=1").unwrap().params["params"]["lr"],
        serde_json::json!(0.2)
    );
    let s = d.run("p.yaml", &[]);
    assert!(s.ok());
    let store = Store::open(&d.cache()).unwrap();
    let out = store.object_dir(s.record.steps["eval@weak"].output.as_ref().unwrap());
    assert_eq!(std::fs::read_to_string(out.join("e")).unwrap(), "weak\n");
    assert_eq!(s.record.steps["sweep@lr=0.2,seed=2"].metrics["lr"], 0.2);
    // dag renders every instance in each format.
    let dot = text(&d.bin(&["dag", "p.yaml", "--format", "dot"]));
    assert!(
        dot.contains("\"student@weak\" -> \"eval@weak\" [label=\"inputs\"]"),
        "{dot}"
    );
    let mm = text(&d.bin(&["dag", "p.yaml", "--format", "mermaid"]));
    assert!(
        mm.starts_with("flowchart LR") && mm.matches("-->").count() == 10,
        "{mm}"
    );
}

#[test]
fn failure_skips_dependents_and_independent_steps_finish() {
    let d = Dir::new("fail");
    d.write(
        "p.yaml",
        r#"
steps:
  bad: {kind: command, run: "echo boom >&2; exit 3"}
  after: {kind: command, inputs: bad, run: "true"}
  indep: {kind: command, run: "sleep 0.2; echo ok > $TSD_OUT/x"}
"#,
    );
    let o = d.bin(&["run", "p.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("Failed bad (command): command failed (exit status: 3)"),
        "{t}"
    );
    assert!(t.contains("| boom"), "stderr tail shown: {t}");
    assert!(t.contains("after: input `bad` failed"), "{t}");
    assert!(t.contains("1 ran, 0 fresh, 1 failed, 1 skipped"), "{t}");
}

#[test]
fn status_names_changed_param_with_old_and_new_values() {
    let d = Dir::new("status");
    d.cases(2);
    d.write("p.yaml", &CHAIN.replace("../count", "$TSD_WORKSPACE/count"));
    d.run("p.yaml", &[]);
    let o = d.bin(&["status", "p.yaml", "--set", "params.factor=5"]);
    let t = text(&o);
    assert!(
        t.contains("stale  double (case-command) (2 of 2 cases)"),
        "{t}"
    );
    assert!(t.contains("- param params.factor 2 → 5"), "{t}");
    assert!(t.contains("fresh  other (command)"), "{t}");
    assert!(t.contains("- input `double` will be recomputed"), "{t}");
    d.write("data/case02.txt", "changed scan\n");
    let t = text(&d.bin(&["status", "p.yaml"]));
    assert!(t.contains("- input file data/case02.txt changed"), "{t}");
    // After running the changed case, a dependent names the case.
    d.run_opts(
        "p.yaml",
        &[],
        RunOptions {
            quiet: true,
            step: Some("ct".into()),
            ..Default::default()
        },
    );
    let t = text(&d.bin(&["status", "p.yaml"]));
    assert!(t.contains("- input `ct`: case case02 changed"), "{t}");
    assert!(t.contains("(1 of 2 cases)"), "{t}");
    // --dry-run says the same and runs nothing.
    let before = d.count().len();
    let t = text(&d.bin(&["run", "p.yaml", "--dry-run"]));
    assert!(t.contains("would run  double"), "{t}");
    assert_eq!(d.count().len(), before);
}

#[test]
fn compare_shows_the_differing_param_and_metric_deltas() {
    let d = Dir::new("compare");
    d.cases(2);
    d.write("p.yaml", &CHAIN.replace("../count", "$TSD_WORKSPACE/count"));
    let a = d.run("p.yaml", &[]);
    let b = d.run("p.yaml", &["params.factor=3"]);
    let o = d.bin(&["compare", &a.record.id, &b.record.id, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let params = v["params"].as_array().unwrap();
    assert!(
        params
            .iter()
            .any(|p| p["name"] == "params.factor" && p["a"] == 2 && p["b"] == 3),
        "{v}"
    );
    assert!(
        params.iter().any(|p| p["name"] == "double.params.factor"),
        "{v}"
    );
    assert_eq!(v["steps"], serde_json::json!(["double", "total"]));
    let m = v["metrics"].as_array().unwrap();
    let factor = m
        .iter()
        .find(|r| r["step"] == "total" && r["metric"] == "factor")
        .unwrap();
    assert_eq!(
        (
            factor["a"].as_f64(),
            factor["b"].as_f64(),
            factor["delta"].as_f64()
        ),
        (Some(2.0), Some(3.0), Some(1.0))
    );
    let md = String::from_utf8_lossy(
        &d.bin(&["compare", "latest~1", "latest", "--format", "markdown"])
            .stdout,
    )
    .to_string();
    assert!(md.contains("| total | factor | 2 | 3 | +1 |"), "{md}");
    assert!(md.contains("| params.factor"), "{md}");
}

#[test]
fn gc_removes_unreferenced_objects_only() {
    let d = Dir::new("gc");
    d.cases(2);
    d.write("p.yaml", &CHAIN.replace("../count", "$TSD_WORKSPACE/count"));
    d.run("p.yaml", &["params.factor=3"]);
    let kept = d.run("p.yaml", &[]);
    let dry = text(&d.bin(&["gc", "--dry-run"]));
    assert!(
        dry.contains("would remove 4 objects"),
        "factor-3 double items ×2, its collection, its total: {dry}"
    );
    let store = Store::open(&d.cache()).unwrap();
    // Kept: ct (collection + 2 cases), other, and the factor-2 double (3) and total.
    assert_eq!(store.objects().len(), 4 + 8);
    let g = text(&d.bin(&["gc"]));
    assert!(g.contains("removed 4 objects"), "{g}");
    assert_eq!(store.objects().len(), 8);
    let again = d.run("p.yaml", &[]);
    assert_eq!(ran(&again), Vec::<String>::new());
    assert_eq!(
        again.record.steps["total"].output,
        kept.record.steps["total"].output
    );
    assert!(d.bin(&["verify"]).status.success());
}

#[test]
fn unpaired_files_and_missing_inputs_are_clear_errors() {
    let d = Dir::new("unpaired");
    d.write("data/img/a.nii.gz", "x");
    d.write("data/img/b.nii.gz", "x");
    d.write("data/lab/a.nii.gz", "y");
    d.write(
        "p.yaml",
        "steps:\n  ct: {kind: dataset, images: data/img/*.nii.gz, labels: data/lab/*.nii.gz}\n",
    );
    let t = text(&d.bin(&["run", "p.yaml"]));
    assert!(
        t.contains("data/img/b.nii.gz` (case `b`) has no label in `data/lab/*.nii.gz`"),
        "{t}"
    );
    d.write("data/lab/b.nii.gz", "y");
    let s = d.run("p.yaml", &[]);
    let store = Store::open(&d.cache()).unwrap();
    let m = store
        .manifest(s.record.steps["ct"].output.as_ref().unwrap())
        .unwrap();
    let item = store.manifest(&m.items["b"]).unwrap();
    assert_eq!(
        item.files.keys().collect::<Vec<_>>(),
        ["image.nii.gz", "label.nii.gz"]
    );
    assert_eq!(
        item.files["label.nii.gz"],
        blake3::hash(b"y").to_hex().to_string()
    );
}

#[test]
fn stat_cache_skips_rehashing_unchanged_inputs() {
    let d = Dir::new("statcache");
    d.cases(3);
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    for i in 1..=3 {
        let f = std::fs::File::options()
            .write(true)
            .open(d.path(&format!("data/case{i:02}.txt")))
            .unwrap();
        f.set_modified(old).unwrap();
    }
    let stat = tsdistill::cache::StatCache::open(&d.path("stat.json"));
    for i in 1..=3 {
        stat.hash(&d.path(&format!("data/case{i:02}.txt"))).unwrap();
    }
    stat.save().unwrap();
    let again = tsdistill::cache::StatCache::open(&d.path("stat.json"));
    let h = again.hash(&d.path("data/case01.txt")).unwrap();
    assert_eq!(h, blake3::hash(b"scan 1\n").to_hex().to_string());
    assert_eq!(again.rehashed.load(std::sync::atomic::Ordering::Relaxed), 0);
    // A file modified just now (racy) is re-read even if size and mtime match.
    d.write("data/case02.txt", "scan 9\n");
    assert_eq!(
        again.hash(&d.path("data/case02.txt")).unwrap(),
        blake3::hash(b"scan 9\n").to_hex().to_string()
    );
    assert_eq!(again.rehashed.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn step_docs_are_current() {
    let want = tsdistill::steps::docs_markdown();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/steps.md");
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/steps.md is stale: run `cargo run --release -- steps > docs/steps.md`"
    );
    let names: Vec<&str> = tsdistill::steps::STEPS.iter().map(|k| k.name()).collect();
    let mut dedup = names.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        names.len(),
        "duplicate step kind names: {names:?}"
    );
}

#[test]
fn runs_lists_history_and_keep_protects_from_gc() {
    let d = Dir::new("runs");
    d.cases(1);
    d.write("p.yaml", &CHAIN.replace("../count", "$TSD_WORKSPACE/count"));
    let a = d.run("p.yaml", &["params.factor=4"]);
    d.run("p.yaml", &[]);
    let list = text(&d.bin(&["runs"]));
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(
        list.lines()
            .next()
            .unwrap()
            .contains("--set params.factor=4"),
        "{list}"
    );
    assert!(d.bin(&["runs", "--keep", &a.record.id]).status.success());
    let g = text(&d.bin(&["gc", "--dry-run"]));
    assert!(g.contains("would remove 0 objects"), "{g}");
    let r = RunRecord::find(&d.cache().join("runs-v1"), "latest~1").unwrap();
    assert!(r.keep);
}

#[test]
fn scheduler_runs_independent_steps_in_parallel_within_resource_slots() {
    // Each command records its start and end (ns); overlapping intervals prove
    // parallelism, disjoint ones prove the GPU slot and thread budget hold.
    let d = Dir::new("parallel");
    let step = |name: &str, extra: &str| {
        format!(
            "  {name}:\n    kind: command\n{extra}    run: |\n      s=$(date +%s%N); sleep 0.4; e=$(date +%s%N)\n      echo \"{name} $s $e\" >> $TSD_WORKSPACE/count; echo {name} > $TSD_OUT/x\n"
        )
    };
    let yaml = format!(
        "steps:\n{}{}{}{}{}",
        step("a", ""),
        step("b", ""),
        step("g1", "    gpu: true\n"),
        step("g2", "    gpu: true\n"),
        step("wide", "    threads: 2\n")
    );
    d.write("p.yaml", &yaml);
    let s = d.run_opts(
        "p.yaml",
        &[],
        RunOptions {
            quiet: true,
            jobs: 2,
            ..Default::default()
        },
    );
    assert!(s.ok());
    let spans: BTreeMap<String, (u128, u128)> = d
        .count()
        .iter()
        .map(|l| {
            let v: Vec<&str> = l.split(' ').collect();
            (
                v[0].to_string(),
                (v[1].parse().unwrap(), v[2].parse().unwrap()),
            )
        })
        .collect();
    let overlap = |x: &str, y: &str| {
        let (a, b) = (spans[x], spans[y]);
        a.0 < b.1 && b.0 < a.1
    };
    assert!(
        overlap("a", "b"),
        "a and b ran one after the other: {spans:?}"
    );
    assert!(!overlap("g1", "g2"), "two GPU steps overlapped: {spans:?}");
    for other in ["a", "b", "g1", "g2"] {
        assert!(
            !overlap("wide", other),
            "a 2-thread step shared 2 slots with {other}: {spans:?}"
        );
    }
}

#[test]
fn ctrl_c_stops_cleanly_and_the_rerun_finishes_the_rest() {
    let d = Dir::new("sigint");
    d.cases(4);
    d.write(
        "p.yaml",
        r#"
steps:
  ct: {kind: dataset, images: "data/*.txt"}
  slow:
    kind: case-command
    input: ct
    run: echo "start $TSD_CASE" >> $TSD_WORKSPACE/count; sleep 2; cp $TSD_CASE_DIR/image.txt $TSD_OUT/
"#,
    );
    let child = d
        .command(&["run", "p.yaml", "-j", "1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while d.count().is_empty() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "the running command was not stopped"
    );
    assert_eq!(d.count().len(), 1, "no new case started after Ctrl-C");
    assert!(d.bin(&["verify"]).status.success());
    let s = d.run("p.yaml", &[]);
    assert_eq!(
        s.record.steps["slow"].items,
        Some((4, 4)),
        "the interrupted case left nothing behind"
    );
    let show = text(&d.bin(&["show", "p.yaml", "slow"]));
    assert!(show.contains("step      slow (case-command v1)"), "{show}");
    assert!(
        show.contains(&format!(
            "key       {}",
            s.record.steps["slow"].key.as_ref().unwrap()
        )),
        "{show}"
    );
    assert!(show.contains("cases     4"), "{show}");
}

#[test]
fn compare_step_tabulates_metrics_with_deltas_against_the_baseline() {
    let d = Dir::new("comparestep");
    d.write(
        "p.yaml",
        r#"
steps:
  eval:
    foreach:
      real: {params: {dice: 0.82, hd: 4.5}}
      weak: {params: {dice: 0.79, hd: 5.25}}
    kind: command
    run: |
      echo '{"mean_dice": '$TSD_PARAM_DICE', "hd95": {"mean": '$TSD_PARAM_HD'}}' > $TSD_OUT/metrics.json
  report: {kind: compare, inputs: eval}
"#,
    );
    let s = d.run("p.yaml", &[]);
    assert!(s.ok(), "{:?}", s.record.steps);
    let m = &s.record.steps["report"].metrics;
    assert_eq!(m["eval@weak.mean_dice"], 0.79);
    assert_eq!(m["eval@real.hd95.mean"], 4.5);
    let store = Store::open(&d.cache()).unwrap();
    let md = std::fs::read_to_string(
        store
            .object_dir(s.record.steps["report"].output.as_ref().unwrap())
            .join("comparison.md"),
    )
    .unwrap();
    assert!(md.contains("| mean_dice | 0.82 | 0.79 | -0.03 |"), "{md}");
    assert!(md.contains("| hd95.mean | 4.5 | 5.25 | +0.75 |"), "{md}");
}

#[test]
fn set_overrides_parse_yaml_values() {
    let o: Override = "params.spacing=[1.5, 1.5, 2.0]".parse().unwrap();
    assert_eq!(
        (o.target.as_str(), o.path.clone()),
        ("params", vec!["spacing".to_string()])
    );
    assert_eq!(o.value, serde_json::json!([1.5, 1.5, 2.0]));
    let o: Override = "train@weak.model.feature_size=24".parse().unwrap();
    assert_eq!(o.target, "train@weak");
    assert_eq!(o.path, ["model", "feature_size"]);
    assert_eq!(o.value, serde_json::json!(24));
    let o: Override = "train.lr=3e-4".parse().unwrap();
    assert_eq!(o.value, serde_json::json!(0.0003));
    assert!("nodot=1".parse::<Override>().is_err());
    assert!("params.x"
        .parse::<Override>()
        .unwrap_err()
        .contains("KEY=VALUE"));
    let d = Dir::new("setmissing");
    d.write(
        "p.yaml",
        "params: {lr: 1}\nsteps:\n  a: {kind: command, run: ls}\n",
    );
    let e = pipeline::load(&d.path("p.yaml"), &["params.lrr=2".parse().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--set params.lrr=2: the pipeline has no parameter `params.lrr`"),
        "{e}"
    );
    assert!(e.contains("did you mean `lr`?"), "{e}");
}

#[test]
fn group_of_another_step_selects_cases() {
    // DESIGN's `prep@split.train`: prep is computed on every case, split
    // names groups, and the reader takes prep's cases in split's group.
    let d = Dir::new("select");
    d.cases(4);
    d.write(
        "p.yaml",
        r#"
steps:
  ct: {kind: dataset, images: "data/*.txt"}
  split: {kind: split, input: ct, cases: {train: [case01, case03], test: [case02]}}
  prep: {kind: case-command, input: ct, run: "tr a-z A-Z < $TSD_CASE_DIR/image.txt > $TSD_OUT/image.txt"}
  use: {kind: case-command, input: prep@split.train, run: "cp $TSD_CASE_DIR/image.txt $TSD_OUT/"}
"#,
    );
    let dag = text(&d.bin(&["dag", "p.yaml"]));
    assert!(
        dag.contains("use (case-command)  ← input: prep@split.train"),
        "{dag}"
    );
    let s = d.run("p.yaml", &[]);
    assert!(s.ok(), "{:?}", s.record.steps);
    assert_eq!(s.record.steps["use"].items, Some((2, 2)));
    let store = Store::open(&d.cache()).unwrap();
    let m = store
        .manifest(s.record.steps["use"].output.as_ref().unwrap())
        .unwrap();
    assert_eq!(m.items.keys().collect::<Vec<_>>(), ["case01", "case03"]);
    let item = store.object_dir(&m.items["case03"]).join("image.txt");
    assert_eq!(std::fs::read_to_string(item).unwrap(), "SCAN 3\n");
    // A different group of the same split changes the key of `use` only.
    d.write(
        "p.yaml",
        &std::fs::read_to_string(d.path("p.yaml"))
            .unwrap()
            .replace("case03]", "case04]"),
    );
    let s = d.run("p.yaml", &[]);
    assert_eq!(ran(&s), ["split", "use"]);
    assert_eq!(
        s.record.steps["use"].items,
        Some((1, 2)),
        "case01 is reused"
    );
}

#[test]
fn logs_get_plain_progress_lines_when_stderr_is_not_a_terminal() {
    let d = Dir::new("plain-progress");
    d.cases(3);
    d.write(
        "p.yaml",
        r#"
steps:
  ct: {kind: dataset, images: "data/*.txt"}
  slow:
    kind: case-command
    input: ct
    run: sleep 0.2; cp $TSD_CASE_DIR/image.txt $TSD_OUT/
"#,
    );
    // Throttle 0: a line on every update (the default is one per 30 s).
    let out = d
        .command(&["run", "p.yaml", "-j", "1"])
        .env("TSDISTILL_PROGRESS_SECS", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for n in 1..=3 {
        assert!(
            err.contains(&format!("    Progress slow {n}/3 (")),
            "no progress line {n}/3 in:\n{err}"
        );
    }
    assert!(err.contains("left)"), "no time estimate in:\n{err}");
    // --quiet prints none.
    std::fs::remove_dir_all(d.cache()).unwrap();
    let out = d
        .command(&["run", "p.yaml", "-j", "1", "--quiet"])
        .env("TSDISTILL_PROGRESS_SECS", "0")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("Progress"));
}
