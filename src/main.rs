//! The `tsdistill` command line: parse, call the library, map the result
//! to an exit code (0 ok, 1 user or data failure, 2 internal error).

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Cmd, PipelineArgs};
use tsdistill::cache::{RunRecord, Store};
use tsdistill::exec::status::StepState;
use tsdistill::exec::{CancelToken, Engine, RunOptions};
use tsdistill::pipeline::{self, Pipeline};

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

fn user(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

fn main() -> ExitCode {
    tsdistill::alloc::keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn load(p: &PipelineArgs) -> Result<Pipeline, Failure> {
    pipeline::load(&p.pipeline, &p.set).map_err(user)
}

fn open_store(cli: &Cli) -> Result<Store, Failure> {
    Store::open(&cli.cache).map_err(|e| Failure {
        code: 2,
        message: format!("cannot open the cache: {e}"),
    })
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let cancel = CancelToken::default();
    match &cli.command {
        Cmd::Run {
            p,
            dry_run,
            force,
            jobs,
            step,
            quiet,
            links,
        } => {
            let pl = load(p)?;
            let store = open_store(&cli)?;
            let engine = Engine::new(&store, &pl, cancel.clone()).map_err(user)?;
            let opts = RunOptions {
                jobs: *jobs,
                force: force.clone(),
                step: step.clone(),
                quiet: *quiet,
                link_dir: Some(links.clone()),
                overrides: p.set.iter().map(|o| o.text.clone()).collect(),
            };
            if *dry_run {
                print_status(&engine, &opts, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let c = cancel.clone();
            let _ = ctrlc::set_handler(move || {
                if c.is_cancelled() {
                    eprintln!("\nforced exit");
                    std::process::exit(130);
                }
                eprintln!("\ninterrupted: finishing nothing new; running steps stop at their next check (Ctrl-C again to exit now)");
                c.cancel();
            });
            let summary = engine.run(&opts).map_err(user)?;
            let r = &summary.record;
            let count = |s| summary.with_status(s).len();
            use tsdistill::cache::StepStatus as S;
            if !*quiet || !summary.ok() {
                eprintln!(
                    "{:>12} run {} in {:.2}s: {} ran, {} fresh, {} failed, {} skipped",
                    if summary.ok() { "Done" } else { "Stopped" },
                    r.id,
                    r.seconds,
                    count(S::Ran),
                    count(S::Cached),
                    count(S::Failed),
                    count(S::Skipped)
                );
                for (name, s) in &r.steps {
                    if let Some(e) = &s.error {
                        eprintln!("  {name}: {}", e.lines().next().unwrap_or_default());
                    }
                }
            }
            match r.status.as_str() {
                "ok" => Ok(ExitCode::SUCCESS),
                "interrupted" => Err(Failure {
                    code: 130,
                    message: "interrupted".into(),
                }),
                _ => Err(user("some steps failed (see above)")),
            }
        }
        Cmd::Status { p } => {
            let pl = load(p)?;
            let store = open_store(&cli)?;
            let engine = Engine::new(&store, &pl, cancel).map_err(user)?;
            print_status(&engine, &RunOptions::default(), false)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dag { p, format } => {
            let pl = load(p)?;
            let g = tsdistill::graph::StepGraph::build(&pl).map_err(user)?;
            print!("{}", g.render(&pl, *format));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { p, step } => {
            let pl = load(p)?;
            let store = open_store(&cli)?;
            let engine = Engine::new(&store, &pl, cancel).map_err(user)?;
            print!("{}", engine.show(step).map_err(user)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Runs { pipeline, keep } => {
            let store = open_store(&cli)?;
            let dir = store.root().join("runs-v1");
            if let Some(id) = keep {
                let mut r = RunRecord::find(&dir, id).map_err(user)?;
                r.keep = true;
                r.save(&dir).map_err(|e| user(e))?;
                println!("kept run {}", r.id);
                return Ok(ExitCode::SUCCESS);
            }
            let runs: Vec<RunRecord> = RunRecord::list(&dir)
                .into_iter()
                .filter(|r| pipeline.as_ref().is_none_or(|p| *p == r.pipeline))
                .collect();
            if runs.is_empty() {
                println!("no runs recorded in `{}`", store.root().display());
            }
            for r in runs {
                use tsdistill::cache::StepStatus as S;
                let n = |s| r.steps.values().filter(|x| x.status == s).count();
                println!(
                    "{}  {:<16} {:<11} {:>8.2}s  ran {:>2}  fresh {:>2}  failed {}{}{}",
                    r.id,
                    r.pipeline,
                    r.status,
                    r.seconds,
                    n(S::Ran),
                    n(S::Cached),
                    n(S::Failed),
                    if r.overrides.is_empty() {
                        String::new()
                    } else {
                        format!("  --set {}", r.overrides.join(" --set "))
                    },
                    if r.keep { "  (kept)" } else { "" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Compare { a, b, format } => {
            let store = open_store(&cli)?;
            let dir = store.root().join("runs-v1");
            let ra = RunRecord::find(&dir, a).map_err(user)?;
            let rb = RunRecord::find(&dir, b).map_err(user)?;
            print!(
                "{}",
                tsdistill::report::Comparison::new(&ra, &rb).render(*format)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gc { dry_run } => {
            let store = open_store(&cli)?;
            let r = tsdistill::exec::gc::collect(&store, *dry_run).map_err(user)?;
            let bytes: u64 = r.objects.iter().map(|(_, b)| b).sum();
            let verb = if *dry_run { "would remove" } else { "removed" };
            if *dry_run {
                for (h, b) in &r.objects {
                    println!("{h}  {}", human_bytes(*b));
                }
            }
            println!(
                "{verb} {} objects ({}), {} stale entries; kept {} objects",
                r.objects.len(),
                human_bytes(bytes),
                r.entries,
                r.kept
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify => {
            let store = open_store(&cli)?;
            let r = store.verify().map_err(|e| Failure {
                code: 2,
                message: e.to_string(),
            })?;
            for (h, why) in &r.quarantined {
                println!("corrupt {h}: {why} (quarantined; the next run recomputes it)");
            }
            println!(
                "checked {} objects, {} corrupt",
                r.checked,
                r.quarantined.len()
            );
            if r.quarantined.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Failure {
                    code: 1,
                    message: String::new(),
                })
            }
        }
        Cmd::Predict {
            model,
            input,
            output,
            device,
        } => {
            let dev = tsdistill::train::swin::parse_device(device).map_err(user)?;
            eprintln!(
                "{:>12} {} on {}",
                "Predicting",
                input.display(),
                if dev.is_cuda() { "CUDA" } else { "CPU" }
            );
            let t = std::time::Instant::now();
            tsdistill::train::predict::predict_file(model, input, output, &dev).map_err(user)?;
            eprintln!(
                "{:>12} {} in {:.1}s",
                "Wrote",
                output.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Steps => {
            print!("{}", tsdistill::steps::docs_markdown());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_status(engine: &Engine, opts: &RunOptions, dry: bool) -> Result<(), Failure> {
    let lines = engine.status(opts).map_err(user)?;
    let mut stale = 0;
    for l in &lines {
        let items = match l.items {
            Some((m, t)) => format!(" ({m} of {t} cases)"),
            None => String::new(),
        };
        match &l.state {
            StepState::Fresh => println!("  fresh  {} ({})", l.step, l.kind),
            StepState::Stale(reasons) => {
                stale += 1;
                let verb = if dry { "would run" } else { "stale" };
                println!("  {verb}  {} ({}){items}", l.step, l.kind);
                for r in reasons {
                    println!("      - {r}");
                }
            }
        }
    }
    println!("{stale} of {} steps would run", lines.len());
    Ok(())
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}
