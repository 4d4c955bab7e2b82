//! SwinUNETR speed and memory, candle vs MONAI + PyTorch, side by side in one run.
//!
//! `cargo bench --bench nn_swinunetr [-- CASE...]` with CASE among `f12-64`, `f24-64`, `f48-96`
//! (default: all). Each measurement runs in its own process (so that the peak resident memory,
//! VmHWM, belongs to one configuration): this binary re-executes itself with `--one`, and runs
//! `benches/nn_swinunetr_peer.py` with the venv's Python (`TSDISTILL_PYTHON`, default
//! `target/venv/bin/python` in this checkout) for the peer; that venv needs
//! `pip install torch==2.15.0 monai==1.6.1 einops` (MONAI's SwinUNETR imports einops). Threads: `TSDISTILL_BENCH_THREADS` (default 2)
//! for both (RAYON_NUM_THREADS and torch.set_num_threads). `TSDISTILL_BENCH_MODES=forward` (or
//! `train`) restricts the modes.
//!
//! Reported per case: seconds per iteration of a forward (no autograd; MONAI with
//! `use_flash_attention=True`) and of a train step (forward + DiceCE backward + AdamW), and the
//! peak resident memory of the train process; `train-ckpt` (not run unless named in
//! `TSDISTILL_BENCH_MODES`) is the train step with gradient checkpointing on both sides
//! (`use_checkpoint`; MONAI checkpoints the Swin blocks only, we also the residual conv blocks).
//!
//! `nn_swinunetr --graph F SIZE [generic] [ckpt]` (the bench binary itself) lists what the
//! autograd graph of a train step holds, the activation memory, by tensor shape; `generic`: on
//! the tensor-op path CUDA takes (`nn::with_generic_ops`); `ckpt`: with `use_checkpoint`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use std::process::Command;
use std::time::Instant;
use tsdistill::nn::{SwinUnetr, SwinUnetrConfig};
use tsdistill::train::loss::{dice_ce_loss, DiceCeOptions};

struct Case {
    name: &'static str,
    feature: usize,
    size: usize,
    iters: usize,
}

const CASES: &[Case] = &[
    Case {
        name: "f12-64",
        feature: 12,
        size: 64,
        iters: 3,
    },
    Case {
        name: "f24-64",
        feature: 24,
        size: 64,
        iters: 3,
    },
    Case {
        name: "f48-96",
        feature: 48,
        size: 96,
        iters: 1,
    },
];

/// Runs one measurement in this process and prints `secs_per_iter peak_kib`.
fn one(feature: usize, size: usize, mode: &str, iters: usize) {
    let dev = Device::Cpu;
    let mut cfg = SwinUnetrConfig::new(1, 14);
    cfg.feature_size = feature;
    cfg.use_checkpoint = mode == "train-ckpt";
    let varmap = VarMap::new();
    let train_model = SwinUnetr::from_varmap(&cfg, &varmap, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 1, size, size, size), &dev).unwrap();
    let y = (Tensor::rand(0f32, 14.0, (1, 1, size, size, size), &dev)
        .unwrap()
        .floor()
        .unwrap())
    .to_dtype(DType::U32)
    .unwrap();
    let step: Box<dyn FnMut()> = if mode == "forward" {
        let tensors = train_model
            .named_parameters()
            .iter()
            .map(|(k, t)| (k.clone(), t.detach()))
            .collect();
        let model =
            SwinUnetr::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev)).unwrap();
        Box::new(move || {
            model.forward(&x).unwrap();
        })
    } else {
        let mut opt = AdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: 1e-4,
                weight_decay: 1e-5,
                ..Default::default()
            },
        )
        .unwrap();
        Box::new(move || {
            let loss = dice_ce_loss(
                &train_model.forward(&x).unwrap(),
                &y,
                &DiceCeOptions::default(),
            )
            .unwrap();
            opt.step(&train_model.backward(&loss).unwrap()).unwrap();
        })
    };
    let mut step = step;
    step(); // warm-up
    let t = Instant::now();
    for _ in 0..iters {
        step();
    }
    println!(
        "{} {}",
        t.elapsed().as_secs_f64() / iters as f64,
        tsdistill::alloc::peak_rss_bytes().unwrap_or(0) / 1024
    );
}

/// What the autograd graph of one train step's loss holds (`--graph F SIZE`): Candle keeps every
/// node's tensor until backward ends, so this is the activation memory. Unique storages of the
/// non-parameter nodes, grouped by shape, largest first. (Tensors held inside custom ops are
/// not graph nodes and are not counted.)
fn graph_memory(feature: usize, size: usize, use_checkpoint: bool) {
    use std::collections::{HashMap, HashSet};
    let dev = Device::Cpu;
    let mut cfg = SwinUnetrConfig::new(1, 14);
    cfg.feature_size = feature;
    cfg.use_checkpoint = use_checkpoint;
    let varmap = VarMap::new();
    let model = SwinUnetr::from_varmap(&cfg, &varmap, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 1, size, size, size), &dev).unwrap();
    let y = Tensor::zeros((1, 1, size, size, size), DType::U32, &dev).unwrap();
    let loss = dice_ce_loss(&model.forward(&x).unwrap(), &y, &DiceCeOptions::default()).unwrap();
    let nodes = loss.sorted_nodes();
    let (mut seen, mut by_shape) = (HashSet::new(), HashMap::<Vec<usize>, (usize, usize)>::new());
    let mut total = 0;
    for n in &nodes {
        let key = &*n.storage_and_layout().0 as *const _ as usize;
        if n.is_variable() || !seen.insert(key) {
            continue;
        }
        let bytes = n.elem_count() * n.dtype().size_in_bytes();
        total += bytes;
        let e = by_shape.entry(n.dims().to_vec()).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    let mut rows: Vec<_> = by_shape.into_iter().collect();
    rows.sort_by_key(|(_, (_, b))| std::cmp::Reverse(*b));
    println!(
        "f{feature} {size}³: {} graph nodes, {:.2} GB in unique non-parameter storages",
        nodes.len(),
        total as f64 / 1e9
    );
    for (shape, (count, bytes)) in rows.iter().take(20) {
        println!("{:>9.1} MB  ×{count:<3} {shape:?}", *bytes as f64 / 1e6);
    }
}

fn parse(out: &std::process::Output, what: &str) -> (f64, f64) {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    let mut it = last.split_whitespace();
    match (
        it.next().and_then(|v| v.parse().ok()),
        it.next().and_then(|v| v.parse::<f64>().ok()),
    ) {
        (Some(s), Some(k)) => (s, k / (1024.0 * 1024.0)),
        _ => panic!(
            "{what} failed: {}\n{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn main() {
    tsdistill::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--one") {
        let p = |i: usize| args[i].parse::<usize>().unwrap();
        one(p(1), p(2), &args[3], p(4));
        return;
    }
    if args.first().map(String::as_str) == Some("--graph") {
        let p = |i: usize| args[i].parse::<usize>().unwrap();
        let flag = |f: &str| args[3..].iter().any(|a| a == f);
        let ckpt = flag("ckpt");
        if flag("generic") {
            tsdistill::nn::with_generic_ops(|| graph_memory(p(1), p(2), ckpt));
        } else {
            graph_memory(p(1), p(2), ckpt);
        }
        return;
    }
    let threads = std::env::var("TSDISTILL_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    let python = std::env::var("TSDISTILL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/venv/bin/python").into());
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/nn_swinunetr_peer.py");
    let exe = std::env::current_exe().unwrap();
    println!("threads {threads}; seconds/iteration, peak RSS GiB; ratio = candle / torch");
    println!(
        "{:<8} {:<10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7}",
        "case", "mode", "candle s", "torch s", "ratio", "candle GB", "torch GB", "ratio"
    );
    for case in CASES {
        if !args.is_empty() && !args.iter().any(|a| a == case.name) {
            continue;
        }
        let modes =
            std::env::var("TSDISTILL_BENCH_MODES").unwrap_or_else(|_| "forward,train".into());
        for mode in ["forward", "train", "train-ckpt"] {
            if !modes.split(',').any(|m| m == mode) {
                continue;
            }
            let dims = [case.feature, case.size, case.iters].map(|v| v.to_string());
            let ours = Command::new(&exe)
                .args(["--one", &dims[0], &dims[1], mode, &dims[2]])
                .env("RAYON_NUM_THREADS", &threads)
                .output()
                .unwrap();
            let theirs = Command::new(&python)
                .args([peer, &dims[0], &dims[1], mode, &dims[2], &threads])
                .output()
                .unwrap();
            let (a, am) = parse(&ours, "candle");
            let (b, bm) = parse(&theirs, "torch");
            println!(
                "{:<8} {:<10} {:>10.3} {:>10.3} {:>7.2} {:>9.2} {:>9.2} {:>7.2}",
                case.name,
                mode,
                a,
                b,
                a / b,
                am,
                bm,
                am / bm
            );
        }
    }
}
