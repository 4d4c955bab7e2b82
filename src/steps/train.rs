//! The `train` step: a SwinUNETR trained the way the seed experiment does.
//!
//! Output (artifact type `model`):
//! ```text
//! model.safetensors   best weights by validation mean Dice (last without validation)
//! model.json          the SwinUNETR config (nn's format)
//! inference.json      spacing, orientation, preprocessing, sliding window
//! last.safetensors    weights after the last iteration
//! history.csv/.json   iteration, loss, lr, seconds, validation Dice per class
//! metrics.json        best validation numbers and timings (also StepOutput.metrics)
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::*;
use crate::nn::SwinUnetrConfig;
use crate::train::data::{read_item, Prepared, Preprocess};
use crate::train::optim::AdamWConfig;
use crate::train::predict::InferenceConfig;
use crate::train::sampler::{SamplerConfig, SamplingCase};
use crate::train::schedule::LrSchedule;
use crate::train::sliding_window::{BlendMode, SlidingWindow};
use crate::train::swin::{parse_device, SwinModel};
use crate::train::trainer::{self, Hooks, LoaderSettings, TrainConfig, ValCase};
use crate::train::TrainError;

/// The `train` step kind.
pub struct Train;

/// Augmentation probabilities (the recipe's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// `RandFlipd` probability per axis.
    pub flip_prob: [f64; 3],
    /// `RandRotate90d` probability.
    pub rot90_prob: f64,
    /// `RandShiftIntensityd` offsets.
    pub shift_offset: f32,
    /// `RandShiftIntensityd` probability.
    pub shift_prob: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            flip_prob: [0.1; 3],
            rot90_prob: 0.1,
            shift_offset: 0.1,
            shift_prob: 0.5,
        }
    }
}

/// Parameters of `train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// SwinUNETR config (MONAI names); defaults in_channels 1, out_channels 14, feature_size 48.
    #[serde(default = "default_model")]
    pub model: serde_json::Value,
    /// Patch size.
    #[serde(default = "default_roi")]
    pub roi: [usize; 3],
    /// Volumes per iteration (only 1, as the recipe).
    #[serde(default = "one")]
    pub batch: usize,
    /// Patches per volume (RandCropByPosNegLabeld num_samples).
    #[serde(default = "four")]
    pub samples_per_volume: usize,
    /// Optimiser steps; `epochs` × training cases when `epochs` is set instead.
    #[serde(default)]
    pub iterations: Option<usize>,
    /// Passes over the training cases (one iteration per case).
    #[serde(default)]
    pub epochs: Option<usize>,
    /// Validate every N iterations (needs a `val` input).
    #[serde(default = "hundred")]
    pub val_every: usize,
    /// Checkpoint every N iterations.
    #[serde(default = "fifty")]
    pub checkpoint_every: usize,
    /// AdamW learning rate.
    #[serde(default = "lr")]
    pub lr: f64,
    /// AdamW weight decay.
    #[serde(default = "wd")]
    pub weight_decay: f64,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Clip the gradient norm.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Foreground : background patch centres.
    #[serde(default = "pos_neg")]
    pub pos_neg: [f64; 2],
    /// Background centres need scaled image > this.
    #[serde(default)]
    pub image_threshold: f32,
    /// Augmentations.
    #[serde(default)]
    pub aug: Augment,
    /// Window and crop.
    #[serde(default)]
    pub preprocess: Preprocess,
    /// Validation sliding windows per call.
    #[serde(default = "four")]
    pub sw_batch_size: usize,
    /// Validation window overlap.
    #[serde(default = "overlap")]
    pub overlap: f64,
    /// Validation blending.
    #[serde(default = "constant")]
    pub blend: BlendMode,
    /// Seed of init and patches.
    #[serde(default)]
    pub seed: u64,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "auto")]
    pub device: String,
    /// Batch-building threads.
    #[serde(default = "two")]
    pub workers: usize,
}

fn default_model() -> serde_json::Value {
    serde_json::json!({})
}
fn default_roi() -> [usize; 3] {
    [96, 96, 96]
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn hundred() -> usize {
    100
}
fn fifty() -> usize {
    50
}
fn lr() -> f64 {
    1e-4
}
fn wd() -> f64 {
    1e-5
}
fn pos_neg() -> [f64; 2] {
    [1.0, 1.0]
}
fn overlap() -> f64 {
    0.25
}
fn constant() -> BlendMode {
    BlendMode::Constant
}
fn auto() -> String {
    "auto".into()
}

impl TrainParams {
    /// The SwinUNETR config with our defaults filled in.
    pub fn model_config(&self) -> Result<SwinUnetrConfig, ParamError> {
        let mut m = serde_json::json!({"in_channels": 1, "out_channels": 14, "feature_size": 48});
        let given = self
            .model
            .as_object()
            .ok_or_else(|| ParamError::new("model", "expected a mapping"))?;
        for (k, v) in given {
            m[k] = v.clone();
        }
        let cfg: SwinUnetrConfig = parse_params(&m)
            .map_err(|e| ParamError::new(format!("model.{}", e.path), e.message))?;
        cfg.validate()
            .map_err(|e| ParamError::new("model", e.to_string()))?;
        Ok(cfg)
    }

    fn train_config(&self, n_train: usize, num_classes: usize) -> TrainConfig {
        let iterations = self
            .iterations
            .unwrap_or_else(|| self.epochs.unwrap_or(1) * n_train);
        TrainConfig {
            iterations,
            val_every: self.val_every,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            num_classes,
            optimizer: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            schedule: self.schedule.clone(),
            grad_clip: self.grad_clip,
            sampler: SamplerConfig {
                spatial_size: self.roi,
                pos: self.pos_neg[0],
                neg: self.pos_neg[1],
                num_samples: self.samples_per_volume,
                image_threshold: self.image_threshold,
                flip_prob: self.aug.flip_prob,
                rot90_prob: self.aug.rot90_prob,
                rot90_max_k: 3,
                shift_offset: self.aug.shift_offset,
                shift_prob: self.aug.shift_prob,
            },
            sliding_window: SlidingWindow {
                roi: self.roi,
                sw_batch_size: self.sw_batch_size,
                overlap: self.overlap,
                mode: self.blend,
                ..Default::default()
            },
        }
    }

    fn check(&self) -> Result<(), ParamError> {
        self.model_config()?;
        if self.batch != 1 {
            return Err(ParamError::new(
                "batch",
                format!(
                    "only 1 volume per iteration is supported (the recipe's), found {}",
                    self.batch
                ),
            ));
        }
        if self.iterations.is_some() && self.epochs.is_some() {
            return Err(ParamError::new(
                "iterations",
                "give `iterations` or `epochs`, not both",
            ));
        }
        if self.roi.iter().any(|&r| r == 0 || r % 32 != 0) {
            return Err(ParamError::new(
                "roi",
                format!("SwinUNETR needs multiples of 32, found {:?}", self.roi),
            ));
        }
        Ok(())
    }
}

fn train_err(e: TrainError) -> StepError {
    match e {
        TrainError::Param { param, message } => StepError::Params(format!("`{param}`: {message}")),
        TrainError::BadFile { .. }
        | TrainError::Shape { .. }
        | TrainError::NoSamplingLocation { .. } => StepError::Input(e.to_string()),
        other => StepError::Other(other.to_string()),
    }
}

fn load_cases(a: &InputArtifact, pre: &Preprocess) -> StepResult<Vec<Prepared>> {
    a.items
        .iter()
        .map(|(id, dir)| read_item(id, dir, true, pre).map_err(train_err))
        .collect()
}

impl StepKind for Train {
    fn name(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Trains a SwinUNETR on a resampled, labelled data set the way MONAI's BTCV \
         tutorial and ts_distill do: HU window + foreground crop, RandCropByPosNegLabeld \
         patches with flips/rot90/intensity shift, DiceCE loss, AdamW, sliding-window \
         validation every `val_every` iterations keeping the best model by mean Dice. \
         Checkpoints in the step's work area make a killed run resume exactly."
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[
            InputSpec {
                name: "data",
                arity: Arity::One,
            },
            InputSpec {
                name: "val",
                arity: Arity::Optional,
            },
        ]
    }
    fn params_doc(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (
                "model",
                "SwinUNETR config (MONAI names; default in 1, out 14, feature_size 48)",
            ),
            ("roi", "patch size, multiples of 32 (default [96, 96, 96])"),
            ("batch", "volumes per iteration (1)"),
            ("samples_per_volume", "patches per volume (4)"),
            (
                "iterations / epochs",
                "length of training (default 1 epoch)",
            ),
            ("val_every", "validation interval in iterations (100)"),
            ("checkpoint_every", "checkpoint interval (50)"),
            ("lr, weight_decay", "AdamW (1e-4, 1e-5)"),
            (
                "schedule",
                "{kind: constant} or {kind: warmup_cosine, warmup, warmup_start_lr, eta_min}",
            ),
            ("grad_clip", "max gradient norm (off)"),
            ("pos_neg", "foreground:background centre weights ([1, 1])"),
            (
                "image_threshold",
                "background centres need image > this (0)",
            ),
            (
                "aug",
                "flip_prob [0.1]*3, rot90_prob 0.1, shift_offset 0.1, shift_prob 0.5",
            ),
            (
                "preprocess",
                "window [-175, 250] (null: none), crop_foreground true",
            ),
            (
                "sw_batch_size, overlap, blend",
                "validation sliding window (4, 0.25, constant)",
            ),
            ("seed", "init and patch stream (0)"),
            ("device", "auto | cpu | cuda | cuda:N"),
            ("workers", "batch-building threads (2)"),
        ]
    }
    fn check_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        let p: TrainParams = parse_params(params)?;
        p.check()?;
        serde_json::to_value(p).map_err(|e| ParamError::new("", e.to_string()))
    }
    fn resources(&self, params: &serde_json::Value) -> Resources {
        let gpu = params
            .get("device")
            .and_then(|d| d.as_str())
            .is_some_and(|d| d.starts_with("cuda"));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Resources { threads, gpu }
    }
    fn run(&self, ctx: &StepContext) -> StepResult<StepOutput> {
        let p: TrainParams = parse_params(ctx.params)
            .map_err(|e| StepError::Params(format!("`{}`: {}", e.path, e.message)))?;
        let model_cfg = p
            .model_config()
            .map_err(|e| StepError::Params(format!("`{}`: {}", e.path, e.message)))?;
        let device = parse_device(&p.device).map_err(train_err)?;
        let data = ctx.input("data")?;
        let train_cases = load_cases(data, &p.preprocess)?;
        if train_cases.is_empty() {
            return Err(StepError::Input(format!(
                "`{}`: no cases to train on",
                data.reference
            )));
        }
        let val_cases = match ctx.inputs.get("val").and_then(|v| v.first()) {
            Some(v) => load_cases(v, &p.preprocess)?,
            None => Vec::new(),
        };
        let num_classes = model_cfg.out_channels;
        let cfg = p.train_config(train_cases.len(), num_classes);
        let spacing = train_cases[0].grid.spacing;
        let sampler = cfg.sampler.clone();
        let sampling: Vec<SamplingCase> = train_cases
            .into_iter()
            .map(|c| {
                let label = c.label.expect("read with labels");
                if let Some(&bad) = label.iter().find(|&&l| l as usize >= num_classes) {
                    return Err(StepError::Input(format!(
                        "case `{}`: label {bad} but the model has {num_classes} classes (model.out_channels)",
                        c.id
                    )));
                }
                SamplingCase::new(&c.id, c.image, label, c.grid.shape, &sampler).map_err(train_err)
            })
            .collect::<StepResult<_>>()?;
        let val: Vec<ValCase> = val_cases
            .into_iter()
            .map(|c| ValCase {
                id: c.id,
                image: c.image,
                label: c.label.expect("labels"),
                grid: c.grid,
            })
            .collect();

        let model = SwinModel::init(&model_cfg, p.seed, &device).map_err(train_err)?;
        ctx.progress.set_total(cfg.iterations as u64);
        let mut on_iteration = |done: usize, _total: usize, loss: f64| {
            // Message first: a plain (non-terminal) progress line prints on the position update.
            ctx.progress.set_message(format!("loss {loss:.4}"));
            ctx.progress.set_position(done as u64);
        };
        let cancelled = || ctx.cancel.is_cancelled();
        let outcome = trainer::train(
            &model,
            Arc::new(sampling),
            &val,
            &cfg,
            LoaderSettings {
                workers: p.workers,
                prefetch: 4,
            },
            &device,
            ctx.work_dir,
            Hooks {
                on_iteration: &mut on_iteration,
                cancelled: &cancelled,
            },
        )
        .map_err(train_err)?;

        // Outputs: last weights, best weights as the model.
        let out = ctx.out_dir;
        model
            .net
            .save(out.join("last.safetensors"))
            .map_err(|e| StepError::Other(e.to_string()))?;
        match &outcome.best_weights {
            Some(best) => {
                std::fs::copy(best, out.join("model.safetensors"))?;
                let json = serde_json::to_string_pretty(&model_cfg).expect("config serialises");
                std::fs::write(out.join("model.json"), json)?;
            }
            None => model
                .net
                .save(out.join("model.safetensors"))
                .map_err(|e| StepError::Other(e.to_string()))?,
        }
        let inference = InferenceConfig {
            spacing,
            orientation: "RAS".into(),
            preprocess: p.preprocess.clone(),
            sliding_window: cfg.sliding_window.clone(),
            num_classes,
        };
        std::fs::write(
            out.join("inference.json"),
            serde_json::to_string_pretty(&inference).expect("serialises"),
        )?;
        write_history(out, &outcome.history, num_classes)?;

        let mut metrics = BTreeMap::new();
        metrics.insert("iterations".into(), cfg.iterations as f64);
        metrics.insert("resumed_from".into(), outcome.resumed_from as f64);
        metrics.insert("loop_seconds".into(), outcome.loop_seconds);
        metrics.insert(
            "data_wait_share".into(),
            outcome.data_wait_seconds / outcome.loop_seconds.max(1e-9),
        );
        let done_here = (cfg.iterations - outcome.resumed_from).max(1) as f64;
        metrics.insert(
            "iterations_per_second".into(),
            done_here / outcome.loop_seconds.max(1e-9),
        );
        if let Some(last) = outcome.history.last() {
            metrics.insert("final_loss".into(), last.loss);
        }
        // The process's peak, which training dominates: what to ask a scheduler for.
        if let Some(peak) = crate::alloc::peak_rss_bytes() {
            metrics.insert("peak_rss_gib".into(), peak as f64 / (1u64 << 30) as f64);
        }
        if let Some(b) = &outcome.best {
            metrics.insert("best_iteration".into(), b.iteration as f64);
            metrics.insert("best_val_mean_dice".into(), b.mean_dice);
            metrics.insert("best_val_mean_dice_fg".into(), b.mean_dice_fg);
            for (c, d) in b.dice.iter().enumerate().skip(1) {
                if d.is_finite() {
                    metrics.insert(format!("best_val_dice_{c}"), *d);
                }
            }
        }
        std::fs::write(
            out.join("metrics.json"),
            serde_json::to_string_pretty(&metrics).expect("serialises"),
        )?;
        Ok(StepOutput {
            kind: "model".into(),
            meta: serde_json::json!({"num_classes": num_classes, "spacing": spacing}),
            metrics,
            ..Default::default()
        })
    }
}

fn write_history(
    out: &std::path::Path,
    rows: &[trainer::HistoryRow],
    num_classes: usize,
) -> StepResult<()> {
    let mut csv = String::from("iteration,loss,lr,seconds,val_mean_dice,val_mean_dice_fg");
    for c in 0..num_classes {
        csv.push_str(&format!(",val_dice_{c}"));
    }
    csv.push('\n');
    let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{:.3},{},{}",
            r.iteration,
            r.loss,
            r.lr,
            r.seconds,
            f(r.val_mean_dice),
            f(r.val_mean_dice_fg)
        ));
        for c in 0..num_classes {
            csv.push_str(&format!(",{}", f(r.val_dice.as_ref().map(|d| d[c]))));
        }
        csv.push('\n');
    }
    std::fs::write(out.join("history.csv"), csv)?;
    std::fs::write(
        out.join("history.json"),
        serde_json::to_string_pretty(rows).expect("serialises"),
    )?;
    Ok(())
}
