//! Issue 5: loss, metrics, sliding window, sampler and optimiser against
//! MONAI/PyTorch references (tests/fixtures/train, made by
//! `make_fixtures.py` there with torch 2.15.0 / monai 1.6.1).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tsdistill::train::loader::{build_batch, BatchLoader};
use tsdistill::train::loss::{dice_ce_loss, DiceCeOptions};
use tsdistill::train::metrics::{self, Grid};
use tsdistill::train::optim::{AdamW, AdamWConfig};
use tsdistill::train::sampler::{
    correct_crop_center, rot90, sample_patches, SamplerConfig, SamplingCase,
};
use tsdistill::train::sliding_window::{sliding_window_inference, BlendMode, SlidingWindow};

use crate::common::fixtures;

fn parity() -> HashMap<String, Tensor> {
    let path = fixtures().join("train/monai_parity.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("load parity fixture")
}

fn parity_meta() -> serde_json::Value {
    let path = fixtures().join("train/monai_parity.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Max |a - b| treating equal NaNs and equal infinities as equal; panics when
/// one side is NaN/inf and the other is not.
fn max_diff(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || w.is_infinite() || g.is_nan() || g.is_infinite() {
            assert!(
                (w.is_nan() && g.is_nan()) || g == w,
                "{what}[{i}]: got {g}, MONAI {w}"
            );
            continue;
        }
        worst = worst.max((g - w).abs());
    }
    worst
}

// ------------------------------------------------------------------ loss

#[test]
fn r5_dice_ce_matches_monai_value_and_gradient() {
    let t = parity();
    let logits = t["loss.logits"].clone();
    let labels = &t["loss.labels"];
    for (name, include_background) in [("loss_bg", true), ("loss_nobg", false)] {
        let opts = DiceCeOptions {
            include_background,
            ..Default::default()
        };
        let var = Var::from_tensor(&logits).unwrap();
        let loss = dice_ce_loss(var.as_tensor(), labels, &opts).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        let want = f64s(&t[&format!("{name}.value")])[0];
        assert!((got - want).abs() < 1e-5, "{name}: {got} vs MONAI {want}");
        let grads = loss.backward().unwrap();
        let g = f64s(grads.get(&var).expect("gradient reaches the logits"));
        let gw = f64s(&t[&format!("{name}.grad")]);
        let gmax = gw.iter().fold(0f64, |m, v| m.max(v.abs()));
        let d = max_diff(name, &g, &gw);
        // Gradients are O(1/voxels); compare relative to the largest.
        assert!(
            d < 1e-5 * gmax.max(1.0) && d / gmax < 1e-4,
            "{name}: grad diff {d} (max {gmax})"
        );
        eprintln!("{name}: loss {got:.7} vs {want:.7}, grad max diff {d:.2e} (max |g| {gmax:.2e})");
    }
}

// ------------------------------------------------------------------ metrics

#[test]
fn r5_dice_metric_matches_monai_with_empty_classes() {
    let t = parity();
    let pred = t["metrics.pred"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let refr = t["metrics.ref"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let n = pred.len() / 2;
    let per_case: Vec<Vec<f64>> = (0..2)
        .map(|c| metrics::dice_per_class(&pred[c * n..(c + 1) * n], &refr[c * n..(c + 1) * n], 5))
        .collect();
    for (tag, bg) in [("bg", true), ("nobg", false)] {
        let want = f64s(&t[&format!("dice_{tag}.per_case")]);
        let got: Vec<f64> = per_case
            .iter()
            .flat_map(|r| if bg { r.clone() } else { r[1..].to_vec() })
            .collect();
        let d = max_diff("dice per case", &got, &want);
        // MONAI computes in float32.
        assert!(d < 1e-6, "{tag}: per-case diff {d}");
        eprintln!("dice {tag}: per-case max diff vs MONAI {d:.2e}");
        let mean = metrics::mean_dice(&per_case, bg);
        let want_mean = f64s(&t[&format!("dice_{tag}.mean")])[0];
        assert!(
            (mean - want_mean).abs() < 1e-6,
            "{tag}: mean {mean} vs {want_mean}"
        );
        let per_class = metrics::mean_dice_per_class(&per_case, bg);
        let want_pc = f64s(&t[&format!("dice_{tag}.mean_per_class")]);
        assert!(max_diff("mean_batch", &per_class, &want_pc) < 1e-6);
    }
    // The fixture really contains the empty cases it claims to.
    assert!(per_case[0][3].is_nan() && per_case[0][4].is_nan() && per_case[0][2] == 0.0);
}

#[test]
fn r5_hausdorff_matches_monai_in_mm() {
    let t = parity();
    let meta = parity_meta();
    let sp: Vec<f64> = serde_json::from_value(meta["metrics"]["spacing"].clone()).unwrap();
    let pred = t["metrics.pred"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let refr = t["metrics.ref"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let dims = t["metrics.pred"].dims().to_vec();
    let grid = Grid {
        shape: [dims[1], dims[2], dims[3]],
        spacing: [sp[0], sp[1], sp[2]],
    };
    let n = grid.len();
    for (key, pct) in [("hd95", Some(95.0)), ("hd100", None)] {
        let want = f64s(&t[&format!("{key}.per_case")]);
        let got: Vec<f64> = (0..2)
            .flat_map(|c| {
                let (p, r) = (&pred[c * n..(c + 1) * n], &refr[c * n..(c + 1) * n]);
                (0..5u8)
                    .map(|k| metrics::hausdorff_distance(p, r, &grid, k, pct))
                    .collect::<Vec<_>>()
            })
            .collect();
        let d = max_diff(key, &got, &want);
        // MONAI works in float32 distances.
        assert!(d < 1e-5, "{key}: diff {d}\n got {got:?}\nwant {want:?}");
        eprintln!("{key}: max diff vs MONAI {d:.2e}");
    }
}

#[test]
fn r5_volumes_by_hand() {
    let grid = Grid {
        shape: [2, 2, 2],
        spacing: [1.5, 1.5, 2.0],
    };
    let labels = [0u8, 1, 1, 2, 2, 2, 0, 7];
    // 4.5 mm³ per voxel; class 7 is outside num_classes and not counted.
    assert_eq!(
        metrics::volumes_mm3(&labels, &grid, 3),
        vec![9.0, 9.0, 13.5]
    );
}

// ------------------------------------------------------------------ sliding window

/// The fixture's predictor (see make_fixtures.py), in Candle.
fn predictor(p: &Tensor) -> tsdistill::train::Result<Tensor> {
    let (n, _, d, h, w) = p.dims5()?;
    let dev = p.device();
    let z = (Tensor::arange(0f32, d as f32, dev)?.reshape((1, d, 1, 1))? / d as f64)?;
    let y = Tensor::arange(0f32, h as f32, dev)?.reshape((1, 1, h, 1))?;
    let x = Tensor::arange(0f32, w as f32, dev)?.reshape((1, 1, 1, w))?;
    let mean = p.flatten_from(1)?.mean_keepdim(1)?.reshape((n, 1, 1, 1))?;
    let p0 = p.squeeze(1)?;
    let outs = (0..3)
        .map(|c| {
            let c1 = (c + 1) as f64;
            (p0.clone() * c1)?
                .broadcast_add(&(&z * (0.1 * c1))?)?
                .broadcast_add(&(&y * 0.05)?)?
                .broadcast_sub(&(&x * 0.02)?)?
                .broadcast_add(&mean)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&outs, 1)?)
}

#[test]
fn r5_sliding_window_matches_monai() {
    let t = parity();
    let meta = parity_meta();
    let cases = meta["sliding_window"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let roi: Vec<usize> = serde_json::from_value(case["roi"].clone()).unwrap();
        let cfg = SlidingWindow {
            roi: [roi[0], roi[1], roi[2]],
            sw_batch_size: case["sw_batch_size"].as_u64().unwrap() as usize,
            overlap: case["overlap"].as_f64().unwrap(),
            mode: if case["mode"] == "gaussian" {
                BlendMode::Gaussian
            } else {
                BlendMode::Constant
            },
            sigma_scale: case
                .get("sigma_scale")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.125),
            cval: 0.0,
        };
        let input = &t[&format!("sw.{name}.input")];
        let got = sliding_window_inference(input, &cfg, predictor).unwrap();
        let want = &t[&format!("sw.{name}.output")];
        assert_eq!(got.dims(), want.dims(), "{name}: output shape");
        let d = max_diff(name, &f64s(&got), &f64s(want));
        assert!(d < 1e-5, "{name}: max diff {d}");
        eprintln!("sliding window {name}: max diff vs MONAI {d:.2e}");
    }
}

// ------------------------------------------------------------------ sampler

#[test]
fn r5_crop_centre_correction_matches_monai() {
    let meta = parity_meta();
    let cases = meta["correct_crop_centers"].as_array().unwrap();
    assert_eq!(cases.len(), 60);
    for c in cases {
        let v = |k: &str| -> Vec<i64> { serde_json::from_value(c[k].clone()).unwrap() };
        let (centre, size, shape, want) = (v("centre"), v("size"), v("shape"), v("corrected"));
        let got = correct_crop_center(
            [centre[0], centre[1], centre[2]],
            [size[0] as usize, size[1] as usize, size[2] as usize],
            [shape[0] as usize, shape[1] as usize, shape[2] as usize],
        );
        assert_eq!(got.map(|x| x as i64).to_vec(), want, "{c}");
    }
}

#[test]
fn r5_rot90_matches_monai_rotate90() {
    let meta = parity_meta();
    let r = &meta["rot90"];
    let input: Vec<f32> = serde_json::from_value(r["input"].clone()).unwrap();
    for k in 1..=3usize {
        let want: Vec<f32> = serde_json::from_value(r["k"][k.to_string()].clone()).unwrap();
        let want_shape: Vec<usize> =
            serde_json::from_value(r["shape"][k.to_string()].clone()).unwrap();
        let (got, shape) = rot90(&input, [3, 4, 2], k);
        assert_eq!(got, want, "k={k}");
        assert_eq!(shape.to_vec(), want_shape, "k={k}");
    }
}

/// A 40×36×30 case: a foreground ball of label 1–3 in a body (image 0.5)
/// surrounded by air (image 0, not > threshold 0).
fn synthetic_case(cfg: &SamplerConfig) -> SamplingCase {
    let shape = [40usize, 36, 30];
    let mut image = Vec::new();
    let mut label = Vec::new();
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            for k in 0..shape[2] {
                let body =
                    (i as f64 - 20.0).powi(2) / 300.0 + (j as f64 - 18.0).powi(2) / 200.0 < 1.0;
                let r2 = (i as f64 - 14.0).powi(2)
                    + (j as f64 - 20.0).powi(2)
                    + (k as f64 - 10.0).powi(2);
                image.push(if body { 0.5 + 0.001 * k as f32 } else { 0.0 });
                label.push(if r2 < 25.0 { 1 + (k % 3) as u8 } else { 0 });
            }
        }
    }
    SamplingCase::new("synthetic", image, label, shape, cfg).unwrap()
}

#[test]
fn r5_sampler_positive_fraction_and_background_threshold() {
    for (pos, neg) in [(1.0, 1.0), (1.0, 3.0)] {
        let cfg = SamplerConfig {
            spatial_size: [16, 16, 12],
            pos,
            neg,
            num_samples: 4,
            ..Default::default()
        };
        let case = synthetic_case(&cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let (mut fg, mut total) = (0usize, 0usize);
        for _ in 0..1000 {
            for p in sample_patches(&case, &cfg, &mut rng) {
                total += 1;
                // Judge the drawn voxel by the case data itself, not by the flag.
                if case.label[p.drawn] > 0 {
                    fg += 1;
                    assert!(p.from_foreground);
                } else {
                    assert!(!p.from_foreground);
                    assert!(
                        case.image[p.drawn] > cfg.image_threshold,
                        "background centre in air"
                    );
                }
                assert_eq!(p.image.len(), 16 * 16 * 12);
                assert!(p.start[0] + 16 <= 40 && p.start[1] + 16 <= 36 && p.start[2] + 12 <= 30);
            }
        }
        let frac = fg as f64 / total as f64;
        let want = pos / (pos + neg);
        // 4000 Bernoulli draws: σ ≤ 0.008; 4σ.
        assert!(
            (frac - want).abs() < 0.032,
            "pos {pos} neg {neg}: fraction {frac} vs {want}"
        );
        eprintln!(
            "sampler pos {pos} neg {neg}: measured positive fraction {frac:.4} (want {want})"
        );
    }
}

#[test]
fn r5_same_seed_same_batches_any_worker_count() {
    let cfg = SamplerConfig {
        spatial_size: [16, 16, 12],
        ..Default::default()
    };
    let cases = Arc::new(vec![synthetic_case(&cfg), {
        let mut c = synthetic_case(&cfg);
        c.id = "second".into();
        c
    }]);
    let direct: Vec<_> = (3..9).map(|i| build_batch(&cases, &cfg, 7, i)).collect();
    for workers in [1, 3] {
        let mut loader = BatchLoader::spawn(cases.clone(), cfg.clone(), 7, 3, 9, workers, 2);
        let got: Vec<_> = std::iter::from_fn(|| loader.next_batch()).collect();
        assert_eq!(got, direct, "{workers} workers");
    }
    // Every case is visited once per epoch; a different seed gives other patches.
    let epoch: Vec<String> = (0..2)
        .map(|i| build_batch(&cases, &cfg, 7, i).case)
        .collect();
    assert!(epoch.contains(&"synthetic".to_string()) && epoch.contains(&"second".to_string()));
    assert_ne!(build_batch(&cases, &cfg, 8, 3).image, direct[0].image);
}

// ------------------------------------------------------------------ optimiser

#[test]
fn r5_adamw_matches_torch() {
    let t = parity();
    let p0 = Var::from_tensor(&t["adamw.p0"]).unwrap();
    let p1 = Var::from_tensor(&t["adamw.p1"]).unwrap();
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(
        vec![("p0".into(), p0.clone()), ("p1".into(), p1.clone())],
        cfg,
    )
    .unwrap();
    for i in 0..3 {
        // A loss whose gradient is exactly the fixture's: Σ p·g.
        let g0 = &t[&format!("adamw.g0.{i}")];
        let g1 = &t[&format!("adamw.g1.{i}")];
        let loss = ((p0.as_tensor() * g0).unwrap().sum_all().unwrap()
            + (p1.as_tensor() * g1).unwrap().sum_all().unwrap())
        .unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    let d0 = max_diff("p0", &f64s(p0.as_tensor()), &f64s(&t["adamw.p0.after"]));
    let d1 = max_diff("p1", &f64s(p1.as_tensor()), &f64s(&t["adamw.p1.after"]));
    assert!(d0 < 1e-6 && d1 < 1e-6, "AdamW vs torch: {d0} {d1}");
    // State round trip: a fresh optimiser with the saved state takes the same step.
    let state = opt.state().unwrap();
    let q0 = Var::from_tensor(&p0.as_tensor().copy().unwrap()).unwrap();
    let mut opt2 = AdamW::new(vec![("p0".into(), q0.clone())], cfg).unwrap();
    let only_p0: HashMap<String, Tensor> = state
        .into_iter()
        .filter(|(k, _)| !k.ends_with("p1"))
        .collect();
    opt2.load_state(&only_p0).unwrap();
    assert_eq!(opt2.steps(), 3);
    let g = &t["adamw.g0.0"];
    let mut o1 = AdamW::new(vec![("p0".into(), p0.clone())], cfg).unwrap();
    o1.load_state(&only_p0).unwrap();
    o1.step(
        &(p0.as_tensor() * g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap(),
    )
    .unwrap();
    opt2.step(
        &(q0.as_tensor() * g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(f64s(p0.as_tensor()), f64s(q0.as_tensor()));
}

// ------------------------------------------------------------------ training loop

mod tiny {
    //! A per-voxel quadratic model: logits_c = w_c0·x + w_c1·x² + b_c.
    use candle_core::{Device, Tensor, Var};
    use candle_nn::VarMap;
    use tsdistill::train::model::{reseed_varmap, sorted_vars, TrainModel};

    pub struct Tiny {
        pub varmap: VarMap,
        w: Var,
        b: Var,
    }

    impl Tiny {
        pub fn new(classes: usize, seed: u64) -> Tiny {
            let varmap = VarMap::new();
            let vb =
                candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
            let bound = 1.0 / 2f64.sqrt();
            let init = candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            };
            vb.get_with_hints((classes, 2), "out.weight", init).unwrap();
            vb.get_with_hints(classes, "out.bias", init).unwrap();
            reseed_varmap(&varmap, seed).unwrap();
            let vars = sorted_vars(&varmap);
            let (b, w) = (vars[0].1.clone(), vars[1].1.clone());
            Tiny { varmap, w, b }
        }
    }

    impl TrainModel for Tiny {
        fn forward(&self, x: &Tensor) -> tsdistill::train::Result<Tensor> {
            let (n, _, d, h, w) = x.dims5()?;
            // [n, 1, N] -> features [n, 2, N] -> [n, C, N]
            let f = x.flatten_from(2)?;
            let feats = Tensor::cat(&[&f, &f.sqr()?], 1)?;
            let c = self.w.dims()[0];
            let wt = self.w.as_tensor().unsqueeze(0)?.broadcast_as((n, c, 2))?;
            let out = wt
                .matmul(&feats)?
                .broadcast_add(&self.b.as_tensor().reshape((1, c, 1))?)?;
            Ok(out.reshape((n, c, d, h, w))?)
        }
        fn named_vars(&self) -> Vec<(String, Var)> {
            sorted_vars(&self.varmap)
        }
    }
}

/// A 24×24×20 case: image ramps with a bright ball (label 1) inside.
fn ball_case(
    id: &str,
    cfg: &SamplerConfig,
    nan_inside: bool,
) -> (SamplingCase, tsdistill::train::trainer::ValCase) {
    let shape = [24usize, 24, 20];
    let (mut image, mut label) = (Vec::new(), Vec::new());
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            for k in 0..shape[2] {
                let r2 = (i as f64 - 12.0).powi(2)
                    + (j as f64 - 11.0).powi(2)
                    + (k as f64 - 9.0).powi(2);
                let inside = r2 < 36.0;
                image.push(if inside && nan_inside {
                    f32::NAN
                } else if inside {
                    0.8
                } else {
                    0.2 + 0.01 * k as f32
                });
                label.push(inside as u8);
            }
        }
    }
    let val = tsdistill::train::trainer::ValCase {
        id: id.into(),
        image: image.clone(),
        label: label.clone(),
        grid: Grid {
            shape,
            spacing: [1.0, 1.0, 1.0],
        },
    };
    (
        SamplingCase::new(id, image, label, shape, cfg).unwrap(),
        val,
    )
}

fn tiny_config(iterations: usize) -> tsdistill::train::trainer::TrainConfig {
    use tsdistill::train::trainer::TrainConfig;
    TrainConfig {
        iterations,
        val_every: 10,
        checkpoint_every: 4,
        seed: 11,
        num_classes: 2,
        optimizer: AdamWConfig {
            lr: 0.05,
            ..Default::default()
        },
        schedule: Default::default(),
        grad_clip: Some(10.0),
        sampler: SamplerConfig {
            spatial_size: [12, 12, 12],
            num_samples: 2,
            ..Default::default()
        },
        sliding_window: SlidingWindow {
            roi: [12, 12, 12],
            ..Default::default()
        },
    }
}

fn run_tiny(
    cfg: &tsdistill::train::trainer::TrainConfig,
    dir: &std::path::Path,
    stop_after: Option<usize>,
) -> (
    tiny::Tiny,
    tsdistill::train::Result<tsdistill::train::trainer::TrainOutcome>,
) {
    use tsdistill::train::trainer::{train, Hooks, LoaderSettings};
    let sc = cfg.sampler.clone();
    let (a, va) = ball_case("a", &sc, false);
    let model = tiny::Tiny::new(2, cfg.seed);
    let mut seen = 0usize;
    let count = std::cell::Cell::new(0usize);
    let mut on_iteration = |done: usize, _total: usize, _loss: f64| {
        seen = done;
        count.set(done);
    };
    let cancelled = || stop_after.is_some_and(|n| count.get() >= n);
    let out = train(
        &model,
        Arc::new(vec![a]),
        &[va],
        cfg,
        LoaderSettings {
            workers: 2,
            prefetch: 2,
        },
        &Device::Cpu,
        dir,
        Hooks {
            on_iteration: &mut on_iteration,
            cancelled: &cancelled,
        },
    );
    (model, out)
}

fn weights(m: &tiny::Tiny) -> Vec<Vec<f32>> {
    use tsdistill::train::model::TrainModel;
    m.named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn r5_training_loop_learns_a_ball() {
    let dir = tempfile_dir("learn");
    let cfg = tiny_config(60);
    let (_, out) = run_tiny(&cfg, &dir, None);
    let out = out.unwrap();
    let best = out.best.expect("validated");
    // Threshold between 0.2–0.39 and 0.8 is learnable exactly by a quadratic.
    assert!(best.dice[1] > 0.95, "ball Dice {:?}", best.dice);
    let first = out.history.first().unwrap().loss;
    let last = out.history.last().unwrap().loss;
    assert!(last < first * 0.7, "loss {first} → {last}");
    eprintln!(
        "tiny model: loss {first:.4} → {last:.4}, best Dice {:?}",
        best.dice
    );
}

#[test]
fn r5_resume_after_cancel_gives_bitwise_same_weights() {
    let cfg = tiny_config(14);
    let (full, out) = run_tiny(&cfg, &tempfile_dir("full"), None);
    assert_eq!(out.unwrap().resumed_from, 0);
    let dir = tempfile_dir("resume");
    let (_, cancelled) = run_tiny(&cfg, &dir, Some(6));
    assert!(matches!(
        cancelled,
        Err(tsdistill::train::TrainError::Cancelled)
    ));
    let (resumed, out) = run_tiny(&cfg, &dir, None);
    let out = out.unwrap();
    assert_eq!(
        out.resumed_from, 4,
        "continues from the iteration-4 checkpoint"
    );
    assert_eq!(weights(&resumed), weights(&full));
    // …and a fresh model at the same seed differs from the trained one (the test can fail).
    assert_ne!(weights(&tiny::Tiny::new(2, cfg.seed)), weights(&full));
}

#[test]
fn r5_non_finite_loss_is_a_clear_error() {
    use tsdistill::train::trainer::{train, Hooks, LoaderSettings};
    let cfg = tiny_config(5);
    let (bad, _) = ball_case("nan-case", &cfg.sampler, true);
    let model = tiny::Tiny::new(2, 1);
    let err = train(
        &model,
        Arc::new(vec![bad]),
        &[],
        &cfg,
        LoaderSettings {
            workers: 1,
            prefetch: 1,
        },
        &Device::Cpu,
        &tempfile_dir("nan"),
        Hooks {
            on_iteration: &mut |_, _, _| {},
            cancelled: &|| false,
        },
    )
    .err()
    .expect("NaN image must stop training");
    let msg = err.to_string();
    assert!(
        msg.contains("loss is NaN at iteration 0") && msg.contains("nan-case"),
        "{msg}"
    );
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tsdistill-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ------------------------------------------------------------------ steps (evaluate, train, predict)

mod steps {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use tsdistill::exec::{CancelToken, Progress};
    use tsdistill::steps::{InputArtifact, StepContext, StepKind, StepOutput, StepResult};
    use tsdistill::volume::{nifti, Volume, Voxels};

    /// A data set artifact in a temp dir: case → item dir with the given files.
    pub fn artifact(
        root: &Path,
        name: &str,
        cases: &[(&str, Vec<(&str, &Volume)>)],
    ) -> InputArtifact {
        let dir = root.join(name);
        let mut items = BTreeMap::new();
        for (id, files) in cases {
            let item = dir.join(id);
            std::fs::create_dir_all(&item).unwrap();
            for (role, vol) in files {
                nifti::write(item.join(role), vol).unwrap();
            }
            items.insert(id.to_string(), item);
        }
        InputArtifact {
            reference: name.into(),
            step: name.into(),
            dir,
            manifest: Default::default(),
            items,
        }
    }

    pub fn run(
        kind: &dyn StepKind,
        params: serde_json::Value,
        inputs: BTreeMap<String, Vec<InputArtifact>>,
        out_dir: &Path,
        work_dir: &Path,
        cancel: &CancelToken,
    ) -> StepResult<StepOutput> {
        std::fs::create_dir_all(out_dir).unwrap();
        std::fs::create_dir_all(work_dir).unwrap();
        let params = kind.check_params(&params).expect("params valid");
        let progress = Progress::hidden();
        let ctx = StepContext {
            step: "test",
            params: &params,
            inputs: &inputs,
            out_dir,
            work_dir,
            workspace: out_dir,
            progress: &progress,
            cancel,
        };
        kind.run(&ctx)
    }

    /// A label map volume from C-order data over `[nx, ny, nz]`.
    pub fn label_volume(c_order: &[u8], shape: [usize; 3], spacing: [f64; 3]) -> Volume {
        let data = tsdistill::train::data::from_c_order(c_order, shape);
        let mut affine = [[0.0; 4]; 4];
        for i in 0..3 {
            affine[i][i] = spacing[i];
        }
        affine[0][3] = -12.5;
        affine[3][3] = 1.0;
        Volume::new(shape, affine, Voxels::U8(data))
    }

    pub fn tmp(tag: &str) -> PathBuf {
        super::tempfile_dir(tag)
    }
}

#[test]
fn r5_evaluate_label_sets_matches_monai() {
    use tsdistill::steps::evaluate::Evaluate;
    let t = parity();
    let dims = t["metrics.pred"].dims().to_vec();
    let shape = [dims[1], dims[2], dims[3]];
    let n = shape.iter().product::<usize>();
    let pred = t["metrics.pred"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let refr = t["metrics.ref"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let sp = [1.5, 1.5, 2.0];
    let vols: Vec<_> = (0..2)
        .map(|c| {
            (
                steps::label_volume(&pred[c * n..(c + 1) * n], shape, sp),
                steps::label_volume(&refr[c * n..(c + 1) * n], shape, sp),
            )
        })
        .collect();
    let root = steps::tmp("eval");
    let data = steps::artifact(
        &root,
        "data",
        &[
            ("c0", vec![("label.nii.gz", &vols[0].1)]),
            ("c1", vec![("label.nii.gz", &vols[1].1)]),
        ],
    );
    let preds = steps::artifact(
        &root,
        "weak",
        &[
            ("c0", vec![("label.nii.gz", &vols[0].0)]),
            ("c1", vec![("label.nii.gz", &vols[1].0)]),
        ],
    );
    let inputs = [
        ("data".to_string(), vec![data]),
        ("predictions".to_string(), vec![preds]),
    ]
    .into_iter()
    .collect();
    let out = steps::run(
        &Evaluate,
        serde_json::json!({"num_classes": 5}),
        inputs,
        &root.join("out"),
        &root.join("work"),
        &Default::default(),
    )
    .unwrap();
    let m = &out.metrics;
    let want_mean = f64s(&t["dice_bg.mean"])[0];
    let want_fg = f64s(&t["dice_nobg.mean"])[0];
    assert!(
        (m["mean_dice"] - want_mean).abs() < 1e-6,
        "{} vs MONAI {want_mean}",
        m["mean_dice"]
    );
    assert!(
        (m["mean_dice_fg"] - want_fg).abs() < 1e-6,
        "{} vs MONAI {want_fg}",
        m["mean_dice_fg"]
    );
    // HD95 of class 1, mean of the two cases, against MONAI's per-case numbers.
    let hd = f64s(&t["hd95.per_case"]);
    let want_hd1 = (hd[1] + hd[5 + 1]) / 2.0;
    assert!(
        (m["hd95_mm_1"] - want_hd1).abs() < 1e-5,
        "{} vs {want_hd1}",
        m["hd95_mm_1"]
    );
    let csv = std::fs::read_to_string(root.join("out/per_case.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 5);
    // Class 3 of case 0 is absent from the reference: empty Dice cell.
    assert!(csv.lines().any(|l| l.starts_with("c0,3,,")), "{csv}");
}

fn tiny_train_params(iterations: usize) -> serde_json::Value {
    serde_json::json!({
        "model": {"feature_size": 12, "out_channels": 14},
        "roi": [32, 32, 64],
        "samples_per_volume": 1,
        "iterations": iterations,
        "val_every": iterations,
        "checkpoint_every": 2,
        "lr": 1e-3,
        "aug": {"rot90_prob": 0.0},
        "seed": 3,
        "device": "cpu",
        "workers": 1,
    })
}

fn phantom_data(root: &std::path::Path, n: usize) -> tsdistill::steps::InputArtifact {
    use tsdistill::volume::phantom::{generate_case, PhantomConfig};
    let cfg = PhantomConfig {
        shape: [40, 36, 64],
        mixed_orientation: false,
        ..Default::default()
    };
    let cases: Vec<_> = (0..n).map(|i| generate_case(&cfg, i)).collect();
    let files: Vec<(&str, Vec<(&str, &tsdistill::volume::Volume)>)> = cases
        .iter()
        .map(|c| {
            (
                c.id.as_str(),
                vec![("image.nii.gz", &c.image), ("label.nii.gz", &c.label)],
            )
        })
        .collect();
    steps::artifact(root, "phantom", &files)
}

#[test]
fn r5_train_step_resumes_bitwise_and_predict_keeps_the_affine() {
    use tsdistill::steps::train::Train;
    let root = steps::tmp("trainstep");
    let data = phantom_data(&root, 1);
    let inputs = || {
        [
            ("data".to_string(), vec![data.clone()]),
            ("val".to_string(), vec![data.clone()]),
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
    };
    // Uninterrupted.
    let full = steps::run(
        &Train,
        tiny_train_params(4),
        inputs(),
        &root.join("full"),
        &root.join("wfull"),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(full.kind, "model");
    assert_eq!(full.metrics["resumed_from"], 0.0);
    assert!(full.metrics["best_val_mean_dice"].is_finite());
    // Interrupted after 3 iterations (checkpoint at 2), then rerun.
    let cancel = tsdistill::exec::CancelToken::default();
    let c2 = cancel.clone();
    let watcher = std::thread::spawn({
        let ck = root.join("wpart/checkpoint.json");
        move || {
            while !ck.exists() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            c2.cancel();
        }
    });
    let part = steps::run(
        &Train,
        tiny_train_params(4),
        inputs(),
        &root.join("p1"),
        &root.join("wpart"),
        &cancel,
    );
    watcher.join().unwrap();
    assert!(part.is_err(), "cancelled run must fail");
    let resumed = steps::run(
        &Train,
        tiny_train_params(4),
        inputs(),
        &root.join("p2"),
        &root.join("wpart"),
        &Default::default(),
    )
    .unwrap();
    assert!(resumed.metrics["resumed_from"] >= 2.0);
    // The test process's own peak as read by the kernel: more than the model's weights, less
    // than the machine.
    let peak = full.metrics["peak_rss_gib"];
    assert!(peak > 0.01 && peak < 24.0, "peak_rss_gib {peak}");
    eprintln!(
        "train step (f12, 1×32×32×64): {:.3} it/s, data wait share {:.4}, resumed from {}",
        full.metrics["iterations_per_second"],
        full.metrics["data_wait_share"],
        resumed.metrics["resumed_from"]
    );
    let a = std::fs::read(root.join("full/last.safetensors")).unwrap();
    let b = std::fs::read(root.join("p2/last.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
    for f in [
        "model.safetensors",
        "model.json",
        "inference.json",
        "history.csv",
        "history.json",
        "metrics.json",
    ] {
        assert!(root.join("full").join(f).is_file(), "missing {f}");
    }

    // predict on a non-RAS phantom: the output has the input's grid and affine.
    use tsdistill::volume::phantom::{generate_case, PhantomConfig};
    let cfg = PhantomConfig {
        shape: [40, 36, 64],
        mixed_orientation: true,
        ..Default::default()
    };
    let case = (0..8).map(|i| generate_case(&cfg, i)).find(|c| {
        tsdistill::volume::orientation::axcodes(&c.image.affine).unwrap() != ['R', 'A', 'S']
    });
    let case = case.expect("a non-RAS phantom");
    let input = root.join("ct.nii.gz");
    tsdistill::volume::nifti::write(&input, &case.image).unwrap();
    let output = root.join("seg.nii.gz");
    tsdistill::train::predict::predict_file(&root.join("full"), &input, &output, &Device::Cpu)
        .unwrap();
    let seg = tsdistill::volume::nifti::read(&output).unwrap();
    assert_eq!(seg.shape, case.image.shape);
    for r in 0..4 {
        for c in 0..4 {
            assert!(
                (seg.affine[r][c] - case.image.affine[r][c]).abs() < 1e-5,
                "affine {:?} vs {:?}",
                seg.affine,
                case.image.affine
            );
        }
    }
}

/// Every file named `name` under `dir`.
fn find_files(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p, name));
        } else if p.file_name().is_some_and(|f| f == name) {
            out.push(p);
        }
    }
    out
}

#[test]
fn r5_train_sigkill_then_rerun_gives_the_same_weights() {
    use std::process::Command;
    use std::time::{Duration, Instant};
    let pipeline = r#"
name: kill-train
steps:
  ct: {kind: phantom, count: 1, shape: [40, 36, 64], mixed_orientation: false}
  teacher:
    kind: train
    data: ct
    model: {feature_size: 12}
    roi: [32, 32, 64]
    samples_per_volume: 1
    iterations: 4
    val_every: 0
    checkpoint_every: 2
    aug: {rot90_prob: 0.0}
    seed: 5
    device: cpu
    workers: 1
"#;
    // TSDISTILL_BIN: a private copy of the binary, for worktrees that share a
    // target directory (another build may replace target/release/tsdistill).
    let bin =
        std::env::var("TSDISTILL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tsdistill").into());
    let run = |root: &std::path::Path| {
        Command::new(&bin)
            .args(["run", "p.yaml", "-j", "1", "--quiet", "--cache"])
            .arg(root.join("cache"))
            .current_dir(root)
            .spawn()
            .unwrap()
    };
    let reference = tempfile_dir("kill-train-ref");
    std::fs::write(reference.join("p.yaml"), pipeline).unwrap();
    assert!(run(&reference).wait().unwrap().success());
    let want = find_files(&reference.join("cache"), "last.safetensors");
    assert_eq!(want.len(), 1, "one trained model in the reference cache");

    let d = tempfile_dir("kill-train");
    std::fs::write(d.join("p.yaml"), pipeline).unwrap();
    let mut child = run(&d);
    let t0 = Instant::now();
    // Kill once the checkpoint of iteration 2 or later exists (mid-training).
    while find_files(&d.join("cache"), "checkpoint.json").is_empty()
        && t0.elapsed() < Duration::from_secs(600)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        find_files(&d.join("cache"), "last.safetensors").is_empty(),
        "killed before the end"
    );
    assert!(run(&d).wait().unwrap().success());
    let got = find_files(&d.join("cache"), "last.safetensors");
    assert_eq!(got.len(), 1);
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(got[0].with_file_name("metrics.json")).unwrap(),
    )
    .unwrap();
    assert!(
        metrics["resumed_from"].as_f64().unwrap() >= 2.0,
        "{metrics}"
    );
    assert!(
        std::fs::read(&got[0]).unwrap() == std::fs::read(&want[0]).unwrap(),
        "weights differ"
    );
}
