//! Engine benchmarks (figures for the closing notes; no assertions):
//! 1. a no-op `run` of 50 cases × 3 map steps (in-process and via the
//!    binary), beside `dvc repro` of the same graph as DVC stages when a DVC
//!    is given in `DVC` (e.g. `DVC=target/dvc-venv/bin/dvc`);
//! 2. first-hash throughput of 2 GB of inputs.
//!
//! Run: `cargo bench --bench engine` (add `DVC=...` for the peer).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tsdistill::cache::{StatCache, Store};
use tsdistill::exec::{CancelToken, Engine, RunOptions};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn workspace(root: &Path, cases: usize) {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root.join("data")).unwrap();
    for i in 0..cases {
        std::fs::write(
            root.join(format!("data/case{i:03}.txt")),
            format!("case {i}\n"),
        )
        .unwrap();
    }
    let map = |name: &str, input: &str| {
        format!("  {name}:\n    kind: case-command\n    input: {input}\n    run: cp $TSD_CASE_DIR/image.txt $TSD_OUT/image.txt\n")
    };
    let yaml = format!(
        "name: bench\nsteps:\n  ct: {{kind: dataset, images: \"data/*.txt\"}}\n{}{}{}",
        map("a", "ct"),
        map("b", "a"),
        map("c", "b")
    );
    std::fs::write(root.join("p.yaml"), yaml).unwrap();
    // The same graph as DVC stages: 3 foreach stages over 50 cases.
    let mut dvc = String::from("stages:\n");
    for (stage, src) in [("a", "data"), ("b", "out_a"), ("c", "out_b")] {
        dvc.push_str(&format!(
            "  {stage}:\n    foreach: [{}]\n    do:\n      cmd: mkdir -p out_{stage} && cp {src}/${{item}}.txt out_{stage}/${{item}}.txt\n      deps:\n        - {src}/${{item}}.txt\n      outs:\n        - out_{stage}/${{item}}.txt\n",
            (0..cases).map(|i| format!("case{i:03}")).collect::<Vec<_>>().join(", ")
        ));
    }
    std::fs::write(root.join("dvc.yaml"), dvc).unwrap();
}

fn noop_run(root: &Path) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tsdistill"));
    let p = tsdistill::pipeline::load(&root.join("p.yaml"), &[]).unwrap();
    let store = Store::open(&root.join("cache")).unwrap();
    let engine = Engine::new(&store, &p, CancelToken::default()).unwrap();
    let opts = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let t = Instant::now();
    let first = engine.run(&opts).unwrap();
    println!(
        "first run (150 case commands): {:.2} s, ok={}",
        t.elapsed().as_secs_f64(),
        first.ok()
    );
    let lib: Vec<f64> = (0..10)
        .map(|_| {
            let t = Instant::now();
            let s = engine.run(&opts).unwrap();
            assert_eq!(s.with_status(tsdistill::cache::StepStatus::Ran).len(), 0);
            t.elapsed().as_secs_f64()
        })
        .collect();
    println!(
        "no-op run, in process:      median {:.4} s over 10",
        median(lib)
    );
    if bin.is_file() {
        let cli: Vec<f64> = (0..10)
            .map(|_| {
                let t = Instant::now();
                let o = Command::new(&bin)
                    .args(["run", "p.yaml", "-q", "--cache", "cache"])
                    .current_dir(root)
                    .output()
                    .unwrap();
                assert!(o.status.success());
                t.elapsed().as_secs_f64()
            })
            .collect();
        let m = median(cli);
        println!("no-op run, tsdistill binary: median {m:.4} s over 10");
        if let Some(dvc) = std::env::var_os("DVC") {
            let git = |args: &[&str]| {
                Command::new("git")
                    .args(args)
                    .current_dir(root)
                    .output()
                    .unwrap()
            };
            git(&["init", "-q"]);
            Command::new(&dvc)
                .args(["init", "-q"])
                .current_dir(root)
                .output()
                .unwrap();
            let t = Instant::now();
            let o = Command::new(&dvc)
                .args(["repro", "-q"])
                .current_dir(root)
                .output()
                .unwrap();
            println!(
                "dvc repro first run: {:.2} s (ok={})",
                t.elapsed().as_secs_f64(),
                o.status.success()
            );
            let runs: Vec<f64> = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    Command::new(&dvc)
                        .args(["repro", "-q"])
                        .current_dir(root)
                        .output()
                        .unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let d = median(runs);
            println!(
                "no-op dvc repro:             median {d:.4} s over 3  → tsdistill is {:.1}× faster",
                d / m
            );
        }
    }
}

fn hash_throughput(root: &Path) {
    let dir = root.join("big");
    std::fs::create_dir_all(&dir).unwrap();
    let files = 8;
    let size = 256 << 20;
    let chunk: Vec<u8> = (0..size)
        .map(|i: usize| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for i in 0..files {
        std::fs::write(dir.join(format!("f{i}.bin")), &chunk).unwrap();
    }
    let total = (files * size) as f64;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let _ = std::fs::remove_file(root.join("stat.json"));
        let stat = StatCache::open(&root.join("stat.json"));
        let t = Instant::now();
        for i in 0..files {
            stat.hash(&dir.join(format!("f{i}.bin"))).unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "first hash of {:.1} GB ({files} files, page cache warm): {:.2} s → {:.2} GB/s on {} threads",
        total / 1e9,
        best,
        total / 1e9 / best,
        rayon::current_num_threads()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-engine");
    workspace(&root, 50);
    noop_run(&root);
    hash_throughput(&root);
}
