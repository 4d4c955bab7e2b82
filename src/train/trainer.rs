//! The training loop: seeded batches → DiceCE → AdamW, periodic
//! sliding-window validation, best-model selection, checkpoints and resume.
//!
//! Resume is exact: a checkpoint holds the model, the AdamW moments and step,
//! the iteration and the history. The data stream is a pure function of
//! `(seed, iteration)` ([`super::loader`]), so restarting the loader at the
//! checkpoint's iteration continues the same sequence, and on CPU the final
//! weights are bitwise those of an uninterrupted run.
//!
//! Files in the work directory (it survives a crash; keyed by the step key):
//! ```text
//! work_dir/
//! ├── checkpoint.safetensors   model.<name>, opt.m.<name>, opt.v.<name>, opt.step
//! ├── checkpoint.json          iteration, config fingerprint, history, best
//! └── best.safetensors         weights at the best validation mean Dice
//! ```
//! Each file is written to a temporary name and renamed, so a kill never
//! leaves a torn checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::error::{param_err, Result, TrainError};
use super::loader::BatchLoader;
use super::loss::{dice_ce_loss, DiceCeOptions};
use super::metrics;
use super::model::TrainModel;
use super::optim::{AdamW, AdamWConfig};
use super::sampler::{SamplerConfig, SamplingCase};
use super::schedule::{clip_grad_norm, LrSchedule};
use super::sliding_window::{sliding_window_inference, SlidingWindow};

/// Everything that decides the numbers a training run produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps.
    pub iterations: usize,
    /// Validate every this many iterations (and after the last); 0 = never.
    pub val_every: usize,
    /// Write a checkpoint every this many iterations; 0 = never.
    pub checkpoint_every: usize,
    /// Seed of the patch stream and of the model init.
    pub seed: u64,
    /// Number of classes (background included).
    pub num_classes: usize,
    /// AdamW settings.
    pub optimizer: AdamWConfig,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this value.
    pub grad_clip: Option<f64>,
    /// Patch sampling and augmentation.
    pub sampler: SamplerConfig,
    /// Validation inference.
    pub sliding_window: SlidingWindow,
}

impl TrainConfig {
    /// Checks every range, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.iterations == 0 {
            return Err(param_err("iterations", "must be at least 1, found 0"));
        }
        if self.num_classes < 2 || self.num_classes > 256 {
            return Err(param_err(
                "model.out_channels",
                format!("must be in 2..=256, found {}", self.num_classes),
            ));
        }
        if !(self.optimizer.lr > 0.0) || self.optimizer.weight_decay < 0.0 {
            return Err(param_err(
                "lr/weight_decay",
                format!(
                    "need lr > 0 and wd ≥ 0, found {} / {}",
                    self.optimizer.lr, self.optimizer.weight_decay
                ),
            ));
        }
        if let Some(c) = self.grad_clip {
            if !(c > 0.0) {
                return Err(param_err("grad_clip", format!("must be > 0, found {c}")));
            }
        }
        self.schedule.validate(self.iterations)?;
        self.sampler.validate()?;
        self.sliding_window.validate()
    }

    fn fingerprint(&self) -> String {
        blake3::hash(
            serde_json::to_string(self)
                .expect("config serialises")
                .as_bytes(),
        )
        .to_hex()
        .to_string()
    }
}

/// A whole validation volume.
#[derive(Debug, Clone)]
pub struct ValCase {
    /// Case id.
    pub id: String,
    /// Intensities, C order.
    pub image: Vec<f32>,
    /// Class ids, C order.
    pub label: Vec<u8>,
    /// Shape and spacing.
    pub grid: metrics::Grid,
}

/// One line of the training history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    /// Iterations completed (1-based).
    pub iteration: usize,
    /// Mean training loss since the previous row.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Wall seconds of training so far (not counting time before a resume).
    pub seconds: f64,
    /// Validation mean Dice with background (MONAI tutorial's number), if validated.
    pub val_mean_dice: Option<f64>,
    /// Validation mean Dice over foreground classes.
    pub val_mean_dice_fg: Option<f64>,
    /// Validation Dice per class (MONAI `mean_batch`), if validated.
    pub val_dice: Option<Vec<f64>>,
}

/// The best validation so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// Iteration of the best validation.
    pub iteration: usize,
    /// Its mean Dice (with background).
    pub mean_dice: f64,
    /// Its foreground mean Dice.
    pub mean_dice_fg: f64,
    /// Its per-class Dice.
    pub dice: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    iteration: usize,
    fingerprint: String,
    history: Vec<HistoryRow>,
    best: Option<Best>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// History rows (one per validation, or per checkpoint interval without validation).
    pub history: Vec<HistoryRow>,
    /// Best validation, if any validation ran.
    pub best: Option<Best>,
    /// The iteration this process started at (0, or a checkpoint's).
    pub resumed_from: usize,
    /// Seconds the loop waited for batches.
    pub data_wait_seconds: f64,
    /// Seconds of the loop in this process.
    pub loop_seconds: f64,
    /// Path of the best weights in the work dir (if validation ran).
    pub best_weights: Option<PathBuf>,
}

/// Callbacks into the caller: progress and cancellation.
pub struct Hooks<'a> {
    /// Called after every iteration with (iterations done, total, loss).
    pub on_iteration: &'a mut dyn FnMut(usize, usize, f64),
    /// Polled every iteration; `true` stops with [`TrainError::Cancelled`].
    pub cancelled: &'a dyn Fn() -> bool,
}

/// Worker threads and look-ahead of the batch loader.
#[derive(Debug, Clone, Copy)]
pub struct LoaderSettings {
    /// Worker threads.
    pub workers: usize,
    /// Batches kept ready.
    pub prefetch: usize,
}

/// Trains `model` in place. `train_cases` feed the patch stream, `val` is
/// scored every `val_every` iterations. Resumes from `work_dir` when it holds
/// a checkpoint of the same config.
pub fn train(
    model: &dyn TrainModel,
    train_cases: Arc<Vec<SamplingCase>>,
    val: &[ValCase],
    cfg: &TrainConfig,
    loader: LoaderSettings,
    device: &Device,
    work_dir: &Path,
    hooks: Hooks,
) -> Result<TrainOutcome> {
    crate::alloc::keep_freed_memory();
    cfg.validate()?;
    if train_cases.is_empty() {
        return Err(param_err("data", "no training case"));
    }
    let vars = model.named_vars();
    let mut opt = AdamW::new(vars.clone(), cfg.optimizer)?;
    let fingerprint = cfg.fingerprint();
    let mut history = Vec::new();
    let mut best: Option<Best> = None;
    let mut start = 0;
    if let Some(meta) = load_checkpoint(work_dir, &fingerprint, &vars, &mut opt)? {
        start = meta.iteration;
        history = meta.history;
        best = meta.best;
    }
    let best_path = work_dir.join("best.safetensors");
    let t0 = Instant::now();
    let mut batches = BatchLoader::spawn(
        train_cases,
        cfg.sampler.clone(),
        cfg.seed,
        start,
        cfg.iterations,
        loader.workers,
        loader.prefetch,
    );
    let var_list: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let (mut loss_sum, mut loss_n) = (0f64, 0usize);
    let mut lr = cfg.optimizer.lr;
    for it in start..cfg.iterations {
        if (hooks.cancelled)() {
            return Err(TrainError::Cancelled);
        }
        let batch = batches.next_batch().expect("loader yields every iteration");
        let (x, y) = batch.tensors(device)?;
        let logits = model.forward(&x)?;
        let loss = dice_ce_loss(&logits, &y, &DiceCeOptions::default())?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                iteration: it,
                value,
                case: batch.case,
            });
        }
        let mut grads = model.backward(&loss)?;
        drop((logits, loss));
        if let Some(max_norm) = cfg.grad_clip {
            clip_grad_norm(&mut grads, &var_list, max_norm)?;
        }
        lr = cfg.schedule.lr(cfg.optimizer.lr, it, cfg.iterations);
        opt.config.lr = lr;
        opt.step(&grads)?;
        drop(grads);
        loss_sum += value as f64;
        loss_n += 1;
        let done = it + 1;
        (hooks.on_iteration)(done, cfg.iterations, value as f64);

        let validate_now =
            cfg.val_every > 0 && (done % cfg.val_every == 0 || done == cfg.iterations);
        let checkpoint_now = cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0;
        // A history row at each validation; without validation, at each checkpoint.
        if validate_now || (cfg.val_every == 0 && checkpoint_now) {
            let mut row = HistoryRow {
                iteration: done,
                loss: loss_sum / loss_n as f64,
                lr,
                seconds: t0.elapsed().as_secs_f64(),
                val_mean_dice: None,
                val_mean_dice_fg: None,
                val_dice: None,
            };
            if validate_now && !val.is_empty() {
                let per_case = validate(model, val, cfg, device)?;
                let mean = metrics::mean_dice(&per_case, true);
                let mean_fg = metrics::mean_dice(&per_case, false);
                row.val_mean_dice = Some(mean);
                row.val_mean_dice_fg = Some(mean_fg);
                row.val_dice = Some(metrics::mean_dice_per_class(&per_case, true));
                // ModelCheckpoint(save_best_only, mode="max"): strictly better only.
                if best.as_ref().is_none_or(|b| mean > b.mean_dice) {
                    best = Some(Best {
                        iteration: done,
                        mean_dice: mean,
                        mean_dice_fg: mean_fg,
                        dice: row.val_dice.clone().unwrap_or_default(),
                    });
                    save_weights(&vars, &best_path)?;
                }
            }
            history.push(row);
            loss_sum = 0.0;
            loss_n = 0;
        }
        if checkpoint_now && done < cfg.iterations {
            let meta = CheckpointMeta {
                iteration: done,
                fingerprint: fingerprint.clone(),
                history: history.clone(),
                best: best.clone(),
            };
            save_checkpoint(work_dir, &meta, &vars, &opt)?;
        }
    }
    if loss_n > 0 {
        history.push(HistoryRow {
            iteration: cfg.iterations,
            loss: loss_sum / loss_n as f64,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            val_mean_dice: None,
            val_mean_dice_fg: None,
            val_dice: None,
        });
    }
    let data_wait_seconds = batches.waited().as_secs_f64();
    Ok(TrainOutcome {
        history,
        best_weights: best.as_ref().map(|_| best_path.clone()),
        best,
        resumed_from: start,
        data_wait_seconds,
        loop_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Sliding-window inference + argmax on each validation case; per-case
/// per-class Dice (background included at index 0).
pub fn validate(
    model: &dyn TrainModel,
    val: &[ValCase],
    cfg: &TrainConfig,
    device: &Device,
) -> Result<Vec<Vec<f64>>> {
    // No autograd graph per window (and the fused attention): a frozen copy where the model has one.
    let frozen = model.frozen()?;
    let model = frozen.as_deref().unwrap_or(model);
    val.iter()
        .map(|case| {
            let pred = predict_labels(
                model,
                &case.image,
                case.grid.shape,
                &cfg.sliding_window,
                device,
            )?;
            Ok(metrics::dice_per_class(&pred, &case.label, cfg.num_classes))
        })
        .collect()
}

/// Whole-volume label map (argmax of the blended logits) for a C-order image.
pub fn predict_labels(
    model: &dyn TrainModel,
    image: &[f32],
    shape: [usize; 3],
    sw: &SlidingWindow,
    device: &Device,
) -> Result<Vec<u8>> {
    let x = Tensor::from_slice(image, (1, 1, shape[0], shape[1], shape[2]), &Device::Cpu)?
        .to_device(device)?;
    let logits = sliding_window_inference(&x, sw, |patch| {
        // Detach: validation needs no graph, and it would pin every window's activations.
        Ok(model.forward(patch)?.detach())
    })?;
    let labels = logits
        .argmax(1)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    Ok(labels)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the variables' current values to `path` (safetensors), atomically.
pub fn save_weights(vars: &[(String, Var)], path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    write_atomic_safetensors(&map, path)
}

fn write_atomic_safetensors(map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(map, &tmp)?;
    fs_err::rename(&tmp, path).map_err(io_err(path))
}

fn save_checkpoint(
    work_dir: &Path,
    meta: &CheckpointMeta,
    vars: &[(String, Var)],
    opt: &AdamW,
) -> Result<()> {
    fs_err::create_dir_all(work_dir).map_err(io_err(work_dir))?;
    let mut map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (format!("model.{k}"), v.as_tensor().clone()))
        .collect();
    for (k, t) in opt.state()? {
        map.insert(format!("opt.{k}"), t);
    }
    // Order matters for a crash in between: tensors first, then the meta that
    // points at them; a stale meta with fresh tensors is caught by `iteration`.
    let st = work_dir.join("checkpoint.safetensors");
    map.insert(
        "meta.iteration".into(),
        Tensor::new(&[meta.iteration as u32], &Device::Cpu)?,
    );
    write_atomic_safetensors(&map, &st)?;
    let json = work_dir.join("checkpoint.json");
    let tmp = json.with_extension("json.tmp");
    fs_err::write(
        &tmp,
        serde_json::to_vec_pretty(meta).expect("meta serialises"),
    )
    .map_err(io_err(&tmp))?;
    fs_err::rename(&tmp, &json).map_err(io_err(&json))
}

fn load_checkpoint(
    work_dir: &Path,
    fingerprint: &str,
    vars: &[(String, Var)],
    opt: &mut AdamW,
) -> Result<Option<CheckpointMeta>> {
    let json = work_dir.join("checkpoint.json");
    let st = work_dir.join("checkpoint.safetensors");
    if !json.exists() || !st.exists() {
        return Ok(None);
    }
    let text = fs_err::read_to_string(&json).map_err(io_err(&json))?;
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| TrainError::BadFile {
        path: json.clone(),
        message: e.to_string(),
    })?;
    if meta.fingerprint != fingerprint {
        // A different configuration left it (cannot happen with step keys): start over.
        return Ok(None);
    }
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu)?;
    let it = tensors
        .get("meta.iteration")
        .map(|t| t.to_vec1::<u32>())
        .transpose()?
        .map(|v| v[0] as usize);
    if it != Some(meta.iteration) {
        return Err(TrainError::BadFile {
            path: st,
            message: format!("expected iteration {}, found {it:?}", meta.iteration),
        });
    }
    for (k, v) in vars {
        let key = format!("model.{k}");
        let t = tensors.get(&key).ok_or_else(|| TrainError::BadFile {
            path: st.clone(),
            message: format!("expected tensor `{key}`, not found"),
        })?;
        v.set(&t.to_device(v.device())?.to_dtype(v.dtype())?)?;
    }
    let opt_state: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix("opt.").map(|s| (s.to_string(), t)))
        .collect();
    opt.load_state(&opt_state)?;
    Ok(Some(meta))
}
