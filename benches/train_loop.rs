//! The train step's speed against MONAI + PyTorch's training loop, same data, same config, same
//! run (`cargo bench --bench train_loop`).
//!
//! Both train SwinUNETR(feature_size 12, out 14) on the two phantom cases of the overfit test
//! (tests/learning.rs), resampled to 4.8×4.8×5.4 mm: one 64×64×32 patch per iteration
//! (RandCropByPosNegLabeld 1:1), DiceCE, AdamW. Ours runs the `tsdistill` binary on a pipeline
//! (patches built by worker threads), the peer is `benches/train_convergence_peer.py` with the
//! venv's Python (`TSDISTILL_PYTHON`, default `target/venv/bin/python` in this checkout).
//! `TSDISTILL_BENCH_THREADS` (default 2) threads each, `TSDISTILL_BENCH_ITERS` (default 12).
//! Reported: seconds per iteration of each, their ratio, and our data-wait share (the fraction
//! of the loop spent waiting for a batch).

use std::path::Path;
use std::process::Command;

fn main() {
    let threads = std::env::var("TSDISTILL_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    let iters: usize = std::env::var("TSDISTILL_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let python = std::env::var("TSDISTILL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/venv/bin/python").into());
    let root = std::env::temp_dir().join(format!("tsdistill-train-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let yaml = format!(
        r#"
name: bench
steps:
  ct: {{kind: phantom, count: 2, seed: 3}}
  prep: {{kind: resample, input: ct, spacing: [4.8, 4.8, 5.4]}}
  fit:
    kind: train
    data: prep
    model: {{feature_size: 12, out_channels: 14}}
    roi: [64, 64, 32]
    samples_per_volume: 1
    iterations: {iters}
    val_every: 0
    checkpoint_every: {iters}
    lr: 1.0e-3
    seed: 0
    device: cpu
"#
    );
    std::fs::write(root.join("p.yaml"), yaml).unwrap();
    let ours = Command::new(env!("CARGO_BIN_EXE_tsdistill"))
        .args(["run", "p.yaml", "--quiet"])
        .env("RAYON_NUM_THREADS", &threads)
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(ours.success(), "tsdistill run failed");
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("runs/bench/fit/metrics.json")).unwrap(),
    )
    .unwrap();
    let our_spi = 1.0 / m["iterations_per_second"].as_f64().unwrap();
    let wait = m["data_wait_share"].as_f64().unwrap();

    let prep = root.join("runs/bench/prep");
    let case = |c: &str| prep.join(c).display().to_string();
    let peer = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/train_convergence_peer.py"))
        .args([case("case000"), case("case001")])
        .args(["--iterations", &iters.to_string(), "--val-every", "0"])
        .args(["--threads", &threads])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&peer.stdout);
    let monai_spi: Option<f64> = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("monai train loop: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    println!("train step, f12, 1 × 64×64×32 patch, {threads} threads, {iters} iterations");
    println!("  tsdistill      {our_spi:>8.3} s/it   data-wait share {wait:.4}");
    match monai_spi {
        Some(t) => {
            println!("  MONAI+PyTorch  {t:>8.3} s/it");
            println!("  ratio (ours / MONAI) {:.2}", our_spi / t);
        }
        None => println!(
            "  MONAI peer failed: {}{}",
            text,
            String::from_utf8_lossy(&peer.stderr)
        ),
    }
    let _ = std::fs::remove_dir_all(&root);
}
