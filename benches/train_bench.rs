//! Timings of the training-side hot paths (run: `cargo bench --bench train_bench`).
//!
//! - `train_sampler`: 4 patches of 96³ with the recipe's augmentations from a
//!   240×200×120 volume (what one training step needs from the loader);
//! - `train_loader`: the same through the worker-thread loader, 8 batches;
//! - `train_dice_ce`: DiceCE forward + backward on [2, 14, 64, 64, 64] logits;
//! - `train_sliding_window_{constant,gaussian}`: 128×128×96 volume, roi 96³,
//!   overlap 0.25, a cheap 14-channel predictor (measures the blending only).
//!
//! Kept short: the machine is shared. Each timing is the best of 3.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use tsdistill::train::loader::BatchLoader;
use tsdistill::train::loss::{dice_ce_loss, DiceCeOptions};
use tsdistill::train::sampler::{sample_patches, SamplerConfig, SamplingCase};
use tsdistill::train::sliding_window::{sliding_window_inference, BlendMode, SlidingWindow};

fn best_of<F: FnMut()>(mut f: F) -> Duration {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn report(name: &str, d: Duration) {
    println!("{name:<36} {:>10.2} ms", d.as_secs_f64() * 1e3);
}

fn main() {
    let shape = [240usize, 200, 120];
    let n: usize = shape.iter().product();
    let image: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let label: Vec<u8> = (0..n)
        .map(|i| {
            if (i / 97) % 11 == 0 {
                (i % 14) as u8
            } else {
                0
            }
        })
        .collect();
    let cfg = SamplerConfig::default();
    let case = SamplingCase::new("bench", image, label, shape, &cfg).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    report(
        "train_sampler (4 × 96³)",
        best_of(|| drop(sample_patches(&case, &cfg, &mut rng))),
    );

    let cases = Arc::new(vec![case]);
    report(
        "train_loader (8 batches, 2 workers)",
        best_of(|| {
            let mut l = BatchLoader::spawn(cases.clone(), cfg.clone(), 0, 0, 8, 2, 4);
            while l.next_batch().is_some() {}
        }),
    );

    let dev = Device::Cpu;
    let logits =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 14, 64, 64, 64), &dev).unwrap()).unwrap();
    let labels = Tensor::zeros((2, 1, 64, 64, 64), DType::U8, &dev).unwrap();
    report(
        "train_dice_ce fwd+bwd [2,14,64³]",
        best_of(|| {
            let l = dice_ce_loss(logits.as_tensor(), &labels, &DiceCeOptions::default()).unwrap();
            drop(l.backward().unwrap());
        }),
    );

    let vol = Tensor::randn(0f32, 1.0, (1, 1, 128, 128, 96), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (1, 14, 1, 1, 1), &dev).unwrap();
    for mode in [BlendMode::Constant, BlendMode::Gaussian] {
        let sw = SlidingWindow {
            mode,
            ..Default::default()
        };
        let d = best_of(|| {
            let out = sliding_window_inference(&vol, &sw, |p| Ok(p.broadcast_mul(&w)?)).unwrap();
            drop(out);
        });
        report(
            &format!("train_sliding_window_{mode:?} 128²×96").to_lowercase(),
            d,
        );
    }
}
