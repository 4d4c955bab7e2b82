//! Command-line types (clap). `///` comments are the help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tsdistill::graph::DagFormat;
use tsdistill::pipeline::Override;
use tsdistill::report::ReportFormat;

/// Environment variable that moves the cache.
pub const ENV_CACHE: &str = "TSDISTILL_CACHE";

/// tsdistill: run medical-imaging experiments declared in YAML, recomputing
/// only what changed.
#[derive(Debug, Parser)]
#[command(name = "tsdistill", version, about, long_about = None)]
pub struct Cli {
    /// Cache directory (content-addressed store).
    #[arg(long, global = true, env = ENV_CACHE, default_value = "cache")]
    pub cache: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Options shared by commands that load a pipeline.
#[derive(Debug, clap::Args)]
pub struct PipelineArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Override a value: `params.lr=3e-4` or `STEP.PARAM=VALUE` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<Override>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the pipeline: every step whose inputs, params or version changed.
    Run {
        #[command(flatten)]
        p: PipelineArgs,
        /// Show what would run and why, without running.
        #[arg(long)]
        dry_run: bool,
        /// Recompute this step even if cached (repeatable).
        #[arg(long, value_name = "STEP")]
        force: Vec<String>,
        /// Thread slots shared by running steps (default: all cores).
        #[arg(long, short = 'j', default_value_t = 0)]
        jobs: usize,
        /// Run only this step and what it needs.
        #[arg(long, value_name = "NAME")]
        step: Option<String>,
        /// Print nothing but errors.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Folder where step outputs are linked for viewing.
        #[arg(long, default_value = "runs")]
        links: PathBuf,
    },
    /// Tell which steps would run, and exactly why.
    Status {
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Print the step graph.
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Show a step's key components, output path and files.
    Show {
        #[command(flatten)]
        p: PipelineArgs,
        /// The step (instance) name.
        step: String,
    },
    /// List recorded runs.
    Runs {
        /// Only runs of this pipeline (by name).
        #[arg(long)]
        pipeline: Option<String>,
        /// Mark a run as kept: `gc` keeps its outputs.
        #[arg(long, value_name = "RUN")]
        keep: Option<String>,
    },
    /// Compare two runs: params, step keys and metrics with deltas.
    Compare {
        /// Run id (prefix), `latest` or `latest~N`.
        a: String,
        /// Run id (prefix), `latest` or `latest~N`.
        b: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
    },
    /// Remove what no lock file or kept run references.
    Gc {
        /// Only report what would be removed, with sizes.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash every object; quarantine corrupt ones so they are recomputed.
    Verify,
    /// List the step kinds and their parameters.
    Steps,
    /// Segment a CT with a trained model: same preprocessing and sliding
    /// window as training, labels mapped back onto the input's own grid.
    Predict {
        /// A `train` step output folder (e.g. `runs/<pipeline>/<step>`) or its
        /// `model.safetensors`.
        model: PathBuf,
        /// Input CT (`.nii` or `.nii.gz`).
        input: PathBuf,
        /// Output label map (uint8 NIfTI, the input's shape and affine).
        output: PathBuf,
        /// `auto`, `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}
