//! nn integration tests: SwinUNETR parity with MONAI 1.6.1 (fixtures made by
//! `tests/fixtures/nn/make_fixtures.py`), checkpoint I/O, and training sanity.
//!
//! Tolerances: logits max |Δ| < 1e-4 (f32); gradients ‖Δ‖/‖g‖ < 1e-6 per tensor (f64).

use crate::common::fixtures;
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use std::collections::HashMap;
use tsdistill::nn::{Downsample, Error, SwinUnetr, SwinUnetrConfig};
use tsdistill::train::loss::DiceCeOptions;

/// MONAI's default DiceCELoss(to_onehot_y=True, softmax=True).
fn dice_ce_loss(logits: &Tensor, labels: &Tensor) -> tsdistill::train::Result<Tensor> {
    tsdistill::train::loss::dice_ce_loss(logits, labels, &DiceCeOptions::default())
}

fn dir() -> std::path::PathBuf {
    fixtures().join("nn")
}

fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("cases.safetensors"), &Device::Cpu).unwrap()
}

fn cfg(downsample: Downsample, use_v2: bool) -> SwinUnetrConfig {
    let mut c = SwinUnetrConfig::new(1, 2);
    c.feature_size = 12;
    c.downsample = downsample;
    c.use_v2 = use_v2;
    c
}

fn base_weights() -> HashMap<String, Tensor> {
    tsdistill::nn::checkpoint::read_state_dict(&dir().join("swinunetr_f12.pt")).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    let d = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (d / n).sqrt()
}

fn assert_logits(model: &SwinUnetr, input: &Tensor, want: &Tensor, what: &str) {
    let got = model
        .forward(input)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let diff = max_abs_diff(&got, want);
    println!("{what}: max |logit diff| = {diff:e}");
    assert!(diff < 1e-4, "{what}: max |logit diff| {diff} ≥ 1e-4");
}

/// Every one of the model's parameters has a nonzero gradient in `grads` (any dtype, any device).
fn assert_every_parameter_has_a_gradient(
    model: &SwinUnetr,
    grads: &candle_core::backprop::GradStore,
    what: &str,
) {
    for (name, t) in model.named_parameters() {
        let g = grads
            .get(t)
            .unwrap_or_else(|| panic!("{what}: parameter {name} got no gradient"));
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0, "{what}: parameter {name} got a zero gradient");
    }
}

/// The .pt fixture (torch.save, nested under `state_dict`, `module.` prefix) gives MONAI's
/// logits at 64³; every parameter gets a nonzero gradient from one DiceCE backward.
#[test]
fn r3_parity_f12_64_logits_and_all_parameters_get_gradients() {
    let c = cases();
    let cfg = cfg(Downsample::Merging, false);
    let (model, varmap) =
        SwinUnetr::load_trainable(dir().join("swinunetr_f12.pt"), &cfg, &Device::Cpu).unwrap();
    let logits = model.forward(&c["input_64"]).unwrap();
    let diff = max_abs_diff(&logits, &c["logits_merging_64"]);
    println!("f12 64³ merging: max |logit diff| = {diff:e}");
    assert!(diff < 1e-4, "max |logit diff| {diff} ≥ 1e-4");

    let loss = dice_ce_loss(&logits, &c["label_64"]).unwrap();
    let grads = loss.backward().unwrap();
    assert_every_parameter_has_a_gradient(&model, &grads, "fused path");
    assert_eq!(model.named_parameters().len(), varmap.all_vars().len());
    assert_eq!(model.named_parameters().len(), 151); // MONAI's f12 state_dict minus 8 buffers
}

/// The frozen copy used for validation: MONAI's logits without autograd (through the fused
/// attention), and optimiser steps taken after it was made show through.
#[test]
fn r3_frozen_copy_gives_monai_logits_and_follows_parameter_updates() {
    let c = cases();
    let cfg = cfg(Downsample::Merging, false);
    let (model, varmap) =
        SwinUnetr::load_trainable(dir().join("swinunetr_f12.pt"), &cfg, &Device::Cpu).unwrap();
    let frozen = model.frozen().unwrap();
    let before = frozen.forward(&c["input_64"]).unwrap();
    assert!(!before.track_op(), "the frozen copy built a graph");
    let diff = max_abs_diff(&before, &c["logits_merging_64"]);
    println!("frozen f12 64³: max |logit diff| = {diff:e}");
    assert!(diff < 1e-4, "max |logit diff| {diff} ≥ 1e-4");
    // out-conv bias += 1 on the live Var: every logit of the frozen copy moves by 1
    let data = varmap.data().lock().unwrap();
    let bias = &data["out.conv.conv.bias"];
    bias.set(&(bias.as_tensor() + 1.0).unwrap()).unwrap();
    drop(data);
    let after = frozen.forward(&c["input_64"]).unwrap();
    let shift = max_abs_diff(
        &((&after - &before).unwrap() - 1.0).unwrap(),
        &after.zeros_like().unwrap(),
    );
    assert!(shift < 1e-5, "logits moved by 1 ± {shift}");
}

/// One DiceCE backward at 64³ in f64 gives MONAI's (f64) loss and gradients of the patch
/// embedding, a qkv, two relative-position tables, LayerNorms, convs and the output conv.
/// (In f32 both torch and candle are ~2e-3 away from the f64 gradients, so the comparison is made
/// in f64, where it is sharp.)
#[test]
fn r3_parity_f12_64_gradients() {
    let c = cases();
    let cfg = cfg(Downsample::Merging, false);
    let (model, varmap) =
        SwinUnetr::trainable_from_state_dict(base_weights(), &cfg, &Device::Cpu, DType::F64)
            .unwrap();
    let x = c["input_64"].to_dtype(DType::F64).unwrap();
    let loss = dice_ce_loss(&model.forward(&x).unwrap(), &c["label_64"]).unwrap();
    let (l, want) = (
        loss.to_scalar::<f64>().unwrap(),
        c["loss_64_f64"].to_vec1::<f64>().unwrap()[0],
    );
    println!("DiceCE f64: candle {l} MONAI {want}");
    assert!((l - want).abs() < 1e-10, "loss {l} vs MONAI {want}");
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (name, want) in c
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("grad.")?, v)))
    {
        let g = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no grad for {name}"));
        let e = rel_err(g, want);
        println!("grad {name}: rel err {e:e}");
        assert!(e < 1e-6, "grad {name}: rel err {e}");
        checked += 1;
    }
    assert_eq!(checked, 10);
}

/// The path CUDA takes, checked on the CPU: with `with_generic_ops` every fused CPU kernel
/// (3×3×3 conv, norms, window attention and gather, LeakyReLU, DiceCE) is replaced by its
/// composition of Candle tensor ops, as on a GPU. That path must give MONAI's logits (64³ and the
/// non-cubic use_v2 case, f32), MONAI's loss and reference gradients (f64), and a nonzero
/// gradient for every parameter. Its graph is counted to show the switch took effect.
///
/// `TSDISTILL_TEST_DEVICE=cuda` runs the same checks on a GPU (a `--features cuda` build; see
/// docs/cuda.md); the default is `cpu`.
#[test]
fn r3_generic_path_that_cuda_takes_matches_monai() {
    use tsdistill::nn::with_generic_ops;
    let spec = std::env::var("TSDISTILL_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = tsdistill::train::swin::parse_device(&spec).unwrap();
    println!("device: {dev:?}");
    let c = cases();
    let on = |k: &str| c[k].to_device(&dev).unwrap();
    let f64_loss_and_graph = |generic: bool| {
        let (model, varmap) = SwinUnetr::trainable_from_state_dict(
            base_weights(),
            &cfg(Downsample::Merging, false),
            &dev,
            DType::F64,
        )
        .unwrap();
        let run = || {
            let x = on("input_64").to_dtype(DType::F64).unwrap();
            let loss = dice_ce_loss(&model.forward(&x).unwrap(), &on("label_64")).unwrap();
            let nodes = loss.sorted_nodes().len();
            let grads = loss.backward().unwrap();
            (loss.to_scalar::<f64>().unwrap(), nodes, grads)
        };
        let (loss, nodes, grads) = if generic {
            with_generic_ops(run)
        } else {
            run()
        };
        (loss, nodes, grads, model, varmap)
    };
    let (loss, nodes, grads, model, varmap) = f64_loss_and_graph(true);
    if dev.is_cpu() {
        let (_, fused_nodes, ..) = f64_loss_and_graph(false);
        println!("graph nodes: fused {fused_nodes}, generic {nodes}");
        assert_ne!(
            nodes, fused_nodes,
            "the generic graph is the fused one: the switch did not take effect"
        );
    }
    let want = c["loss_64_f64"].to_vec1::<f64>().unwrap()[0];
    println!("generic DiceCE f64: {loss} MONAI {want}");
    assert!((loss - want).abs() < 1e-10, "loss {loss} vs MONAI {want}");
    let vars = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (name, want) in c
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("grad.")?, v)))
    {
        let g = grads.get(vars[name].as_tensor()).unwrap();
        let e = rel_err(&g.to_device(&Device::Cpu).unwrap(), want);
        println!("generic grad {name}: rel err {e:e}");
        assert!(e < 1e-6, "generic grad {name}: rel err {e}");
        checked += 1;
    }
    assert_eq!(checked, 10);
    assert_every_parameter_has_a_gradient(&model, &grads, "generic path");
    assert_eq!(model.named_parameters().len(), 151);

    with_generic_ops(|| {
        let merging = cfg(Downsample::Merging, false);
        let model = SwinUnetr::load(dir().join("swinunetr_f12.pt"), &merging, &dev).unwrap();
        let want = &c["logits_merging_64"];
        assert_logits(&model, &on("input_64"), want, "generic f12 64³");
        let mut v2 = base_weights();
        let extra = dir().join("swinunetr_f12_v2extra.safetensors");
        v2.extend(candle_core::safetensors::load(extra, &Device::Cpu).unwrap());
        let model = SwinUnetr::from_state_dict(v2, &cfg(Downsample::Merging, true), &dev).unwrap();
        let want = &c["logits_v2_64x64x32"];
        assert_logits(
            &model,
            &on("input_64x64x32"),
            want,
            "generic use_v2 64×64×32",
        );
    });
}

/// Gradient checkpointing (`use_checkpoint`) changes where memory goes, not the numbers: the
/// same loss, every one of the 151 parameters' gradients equal to the plain model's (f64), the
/// ten MONAI gradients matched as above; and a plain `loss.backward()` on a checkpointed model is
/// caught at the next forward instead of silently training only part of it.
#[test]
fn r3_gradient_checkpointing_keeps_every_gradient() {
    let c = cases();
    let x = c["input_64"].to_dtype(DType::F64).unwrap();
    let run = |use_checkpoint: bool| {
        let mut cfg = cfg(Downsample::Merging, false);
        cfg.use_checkpoint = use_checkpoint;
        let (model, varmap) =
            SwinUnetr::trainable_from_state_dict(base_weights(), &cfg, &Device::Cpu, DType::F64)
                .unwrap();
        let loss = dice_ce_loss(&model.forward(&x).unwrap(), &c["label_64"]).unwrap();
        let grads = model.backward(&loss).unwrap();
        let vars = varmap.data().lock().unwrap().clone();
        let g: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        (loss.to_scalar::<f64>().unwrap(), g, model)
    };
    let (plain_loss, plain, _) = run(false);
    let (loss, ckpt, model) = run(true);
    assert_eq!(loss, plain_loss);
    assert_eq!(ckpt.len(), 151);
    for (name, g) in &ckpt {
        let e = rel_err(g, &plain[name]);
        assert!(e < 1e-12, "grad {name}: checkpointed vs plain rel err {e}");
    }
    for (name, want) in c
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("grad.")?, v)))
    {
        let e = rel_err(&ckpt[name], want);
        assert!(e < 1e-6, "grad {name}: rel err {e} vs MONAI");
    }
    // The wrong backward: the blocks' parameter gradients are left behind, and said so.
    let loss = dice_ce_loss(&model.forward(&x).unwrap(), &c["label_64"]).unwrap();
    drop(loss.backward().unwrap());
    let err = model.forward(&x).unwrap_err().to_string();
    assert!(err.contains("SwinUnetr::backward"), "{err}");
}

/// Non-cubic 64×64×32 (small windows in stages 3-4, padding, masks with a zero shift in one dim)
/// for each PatchMerging variant and for use_v2, all from one weights file.
#[test]
fn r3_parity_f12_64x64x32_variants() {
    let c = cases();
    let input = &c["input_64x64x32"];
    let base = base_weights();
    for (ds, key) in [
        (Downsample::Merging, "logits_merging_64x64x32"),
        (Downsample::Mergingv2, "logits_mergingv2_64x64x32"),
        (Downsample::Legacy, "logits_legacy_64x64x32"),
    ] {
        let model =
            SwinUnetr::from_state_dict(base.clone(), &cfg(ds, false), &Device::Cpu).unwrap();
        assert_logits(&model, input, &c[key], key);
    }
    let mut v2 = base;
    let extra = dir().join("swinunetr_f12_v2extra.safetensors");
    v2.extend(candle_core::safetensors::load(extra, &Device::Cpu).unwrap());
    let model =
        SwinUnetr::from_state_dict(v2, &cfg(Downsample::Merging, true), &Device::Cpu).unwrap();
    assert_logits(&model, input, &c["logits_v2_64x64x32"], "use_v2");
}

/// save() writes safetensors + config JSON; load_saved() restores identical logits.
#[test]
fn r3_save_and_reload_roundtrip() {
    let c = cases();
    let model = SwinUnetr::from_state_dict(
        base_weights(),
        &cfg(Downsample::Legacy, false),
        &Device::Cpu,
    )
    .unwrap();
    let tmp = std::env::temp_dir().join(format!("tsdistill-nn-{}", std::process::id()));
    fs_err::create_dir_all(&tmp).unwrap();
    let path = tmp.join("model.safetensors");
    model.save(&path).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&fs_err::read_to_string(tmp.join("model.json")).unwrap()).unwrap();
    assert_eq!(json["downsample"], "legacy");
    assert_eq!(json["feature_size"], 12);
    let again = SwinUnetr::load_saved(&path, &Device::Cpu).unwrap();
    let input = &c["input_64x64x32"];
    let (a, b) = (model.forward(input).unwrap(), again.forward(input).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    fs_err::remove_dir_all(&tmp).unwrap();
}

#[test]
fn r3_checkpoint_mismatches_are_listed() {
    // Wrong width: every conv/linear shape differs.
    let mut wide = cfg(Downsample::Merging, false);
    wide.feature_size = 24;
    let err = SwinUnetr::load(dir().join("swinunetr_f12.pt"), &wide, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("swinunetr_f12.pt"), "{msg}");
    assert!(
        msg.contains("shape mismatch for `swinViT.patch_embed.proj.weight`: model [24, 1, 2, 2, 2], checkpoint [12, 1, 2, 2, 2]"),
        "{msg}"
    );
    // use_v2 expects the layers{i}c keys the base file lacks.
    let mut w = base_weights();
    let err = match SwinUnetr::from_state_dict(
        w.clone(),
        &cfg(Downsample::Merging, true),
        &Device::Cpu,
    ) {
        Err(Error::Mismatch { problems, .. }) => problems,
        _ => panic!("expected a mismatch"),
    };
    assert_eq!(err.len(), 8, "{err:?}"); // 4 stages × conv1/conv2
    assert!(err[0].starts_with("missing key `swinViT.layers1c.0.layer.conv1.conv.weight`"));
    // An unexpected key and a missing one at once.
    let t = w.remove("out.conv.conv.bias").unwrap();
    w.insert("out.conv.conv.extra".into(), t);
    let problems =
        match SwinUnetr::from_state_dict(w, &cfg(Downsample::Merging, false), &Device::Cpu) {
            Err(Error::Mismatch { problems, .. }) => problems,
            _ => panic!("expected a mismatch"),
        };
    assert_eq!(
        problems,
        vec![
            "missing key `out.conv.conv.bias` [2]",
            "unexpected key `out.conv.conv.extra`"
        ]
    );
}

#[test]
fn r3_rejects_bad_inputs_and_configs() {
    let model = SwinUnetr::new(
        &cfg(Downsample::Merging, false),
        candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = Tensor::zeros((1, 1, 32, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let msg = model.forward(&x).unwrap_err().to_string();
    assert!(
        msg.contains("[1, 1, 32, 32, 32]") && msg.contains("1 voxel"),
        "{msg}"
    );
    let x = Tensor::zeros((1, 1, 64, 48, 64), DType::F32, &Device::Cpu).unwrap();
    let msg = model.forward(&x).unwrap_err().to_string();
    assert!(
        msg.contains("spatial dims [3]") && msg.contains("32"),
        "{msg}"
    );
    let x = Tensor::zeros((1, 2, 64, 64, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(model
        .forward(&x)
        .unwrap_err()
        .to_string()
        .contains("1 input channels"));

    let mut bad = cfg(Downsample::Merging, false);
    bad.feature_size = 16;
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    assert!(matches!(SwinUnetr::new(&bad, vb), Err(Error::Config(_))));
    let yaml_like = r#"{"in_channels": 1, "out_channels": 2, "feature_sise": 12}"#;
    let e = serde_json::from_str::<SwinUnetrConfig>(yaml_like)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `feature_sise`"), "{e}");
    let c: SwinUnetrConfig =
        serde_json::from_str(r#"{"in_channels": 1, "out_channels": 2, "downsample": "legacy"}"#)
            .unwrap();
    assert_eq!(c.feature_size, 24);
    assert_eq!(c.downsample, Downsample::Legacy);
}

/// A few AdamW steps on one fixed batch strictly decrease the DiceCE loss (MONAI init).
#[test]
fn r3_adamw_steps_decrease_loss() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = SwinUnetr::from_varmap(&cfg(Downsample::Merging, false), &varmap, &dev).unwrap();
    let c = cases();
    // [1,1,64,64,64] -> first 32 planes of H and W: [1,1,64,32,32]
    let narrow = |t: &Tensor| {
        t.narrow(3, 0, 32)
            .unwrap()
            .narrow(4, 0, 32)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (x, y) = (narrow(&c["input_64"]), narrow(&c["label_64"]));
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 1e-5,
        ..Default::default()
    };
    let mut opt = AdamW::new(varmap.all_vars(), params).unwrap();
    let mut losses = Vec::new();
    for _ in 0..4 {
        let loss = dice_ce_loss(&model.forward(&x).unwrap(), &y).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    println!("losses: {losses:?}");
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
}
